//! Synthetic Ethernet frames for tests, benches and fuzz targets: what a
//! guest at 10.0.2.15 would send, and a parser for what the stack answers.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress,
    IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber, UdpPacket,
};

use super::{GATEWAY_IP, GATEWAY_MAC, GUEST_IP, GUEST_MAC};

const ETH: usize = 14;
const IP: usize = 20;

fn ethernet(ethertype: EthernetProtocol, payload_len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; ETH + payload_len];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.set_dst_addr(EthernetAddress(GATEWAY_MAC));
    eth.set_src_addr(EthernetAddress(GUEST_MAC));
    eth.set_ethertype(ethertype);
    buf
}

/// The guest asking who has `target` (the gateway, say).
pub fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut buf = ethernet(EthernetProtocol::Arp, 28);
    EthernetFrame::new_unchecked(&mut buf[..]).set_dst_addr(EthernetAddress::BROADCAST);
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[ETH..]));
    buf
}

fn ipv4(buf: &mut [u8], proto: IpProtocol, src: Ipv4Addr, dst: Ipv4Addr) {
    let total = buf.len() - ETH;
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETH..]);
    ip.set_version(4);
    ip.set_header_len(20);
    ip.set_total_len(u16::try_from(total).expect("test frames are small"));
    ip.set_hop_limit(64);
    ip.set_next_header(proto);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    ip.fill_checksum();
}

/// TCP flags of a synthetic segment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Flags {
    /// SYN.
    pub syn: bool,
    /// ACK (with the acknowledgment number).
    pub ack: Option<u32>,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
}

/// A TCP segment from `src` to `dst`.
pub fn tcp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    flags: Flags,
    payload: &[u8],
) -> Vec<u8> {
    let mut buf = ethernet(EthernetProtocol::Ipv4, IP + 20 + payload.len());
    ipv4(&mut buf, IpProtocol::Tcp, *src.ip(), *dst.ip());
    let mut t = TcpPacket::new_unchecked(&mut buf[ETH + IP..]);
    t.set_src_port(src.port());
    t.set_dst_port(dst.port());
    t.set_seq_number(TcpSeqNumber(seq as i32));
    t.set_header_len(20);
    t.set_syn(flags.syn);
    t.set_fin(flags.fin);
    t.set_rst(flags.rst);
    if let Some(ack) = flags.ack {
        t.set_ack(true);
        t.set_ack_number(TcpSeqNumber(ack as i32));
    }
    t.set_window_len(65535);
    t.payload_mut().copy_from_slice(payload);
    t.fill_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip()));
    buf
}

/// A UDP datagram from `src` to `dst`.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut buf = ethernet(EthernetProtocol::Ipv4, IP + 8 + payload.len());
    ipv4(&mut buf, IpProtocol::Udp, *src.ip(), *dst.ip());
    let mut u = UdpPacket::new_unchecked(&mut buf[ETH + IP..]);
    u.set_src_port(src.port());
    u.set_dst_port(dst.port());
    u.set_len(u16::try_from(8 + payload.len()).expect("test frames are small"));
    u.payload_mut().copy_from_slice(payload);
    u.fill_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip()));
    buf
}

/// A parsed frame from the stack to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// An ARP packet: operation, sender MAC, sender IP, target IP.
    Arp(ArpOperation, [u8; 6], Ipv4Addr, Ipv4Addr),
    /// A TCP segment.
    Tcp(Segment),
    /// A UDP datagram: source, destination, payload.
    Udp(SocketAddrV4, SocketAddrV4, Vec<u8>),
    /// Anything else.
    Other,
}

/// A TCP segment's fields that tests look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Source endpoint.
    pub src: SocketAddrV4,
    /// Destination endpoint.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number, when ACK is set.
    pub ack: Option<u32>,
    /// SYN.
    pub syn: bool,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Parses a frame the stack sent toward the guest.
pub fn parse(frame: &[u8]) -> Parsed {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Parsed::Other;
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            match ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p)) {
                Ok(ArpRepr::EthernetIpv4 {
                    operation,
                    source_hardware_addr,
                    source_protocol_addr,
                    target_protocol_addr,
                    ..
                }) => Parsed::Arp(
                    operation,
                    source_hardware_addr.0,
                    source_protocol_addr,
                    target_protocol_addr,
                ),
                _ => Parsed::Other,
            }
        }
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return Parsed::Other;
            };
            match ip.next_header() {
                IpProtocol::Tcp => match TcpPacket::new_checked(ip.payload()) {
                    Ok(t) => Parsed::Tcp(Segment {
                        src: SocketAddrV4::new(ip.src_addr(), t.src_port()),
                        dst: SocketAddrV4::new(ip.dst_addr(), t.dst_port()),
                        seq: t.seq_number().0 as u32,
                        ack: t.ack().then(|| t.ack_number().0 as u32),
                        syn: t.syn(),
                        fin: t.fin(),
                        rst: t.rst(),
                        payload: t.payload().to_vec(),
                    }),
                    Err(_) => Parsed::Other,
                },
                IpProtocol::Udp => match UdpPacket::new_checked(ip.payload()) {
                    Ok(u) => Parsed::Udp(
                        SocketAddrV4::new(ip.src_addr(), u.src_port()),
                        SocketAddrV4::new(ip.dst_addr(), u.dst_port()),
                        u.payload().to_vec(),
                    ),
                    Err(_) => Parsed::Other,
                },
                _ => Parsed::Other,
            }
        }
        _ => Parsed::Other,
    }
}

/// The gateway endpoint on `port`.
pub fn gateway(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(GATEWAY_IP, port)
}

/// The guest endpoint on `port`.
pub fn guest(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(GUEST_IP, port)
}
