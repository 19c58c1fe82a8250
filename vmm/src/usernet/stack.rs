//! The smoltcp interface, its frame queues, and the table of proxied
//! connections, listeners and DNS queries keyed by event-loop token.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress,
    IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket,
};

use super::conn::{Conn, Phase, Tuple};
use super::dns::Dns;
use super::policy::Destination;
use super::watch::{Tokens, WatchRequest};
use super::{sys, Error, NetConfig, Policy, DNS_IP, GATEWAY_IP, GATEWAY_MAC, GUEST_IP, PREFIX_LEN};
use crate::event_loop::Token;

/// Largest Ethernet frame either way (1500-byte MTU, no VLAN tag, no offloads).
pub const MAX_FRAME_LEN: usize = 1514;
/// Frames waiting for guest receive buffers; at this many smoltcp is held
/// back: it neither sends nor takes in guest frames.
pub(crate) const TO_GUEST_CAP: usize = 512;
/// Guest frames waiting for smoltcp; beyond this they are dropped, as a
/// NIC drops what arrives while its ring is full.
pub(crate) const TO_STACK_CAP: usize = 256;
/// Open proxied connections; more SYNs are reset and more inbound accepts refused.
const MAX_CONNS: usize = 1024;
/// Per-direction buffer of each proxied connection.
const TCP_BUFFER: usize = 128 * 1024;
/// Gateway-side ports for inbound connections.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Never ask for a timer sooner than this (smoltcp may say "now" while the
/// guest has no receive buffers; the guest's refill wakes us instead).
const MIN_TIMER: Duration = Duration::from_millis(1);

/// The frame queues between the virtio queues and smoltcp.
#[derive(Default)]
struct Frames {
    to_stack: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for Frames {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxToken, TxToken<'_>)> {
        // A guest frame may be answered: only take one while there is room.
        if self.to_guest.len() >= TO_GUEST_CAP {
            return None;
        }
        let frame = self.to_stack.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.to_guest)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        (self.to_guest.len() < TO_GUEST_CAP).then_some(TxToken(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME_LEN;
        caps
    }
}

/// The guest's network: see the [module docs](super).
pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    frames: Frames,
    epoch: std::time::Instant,
    policy: Policy,
    /// The host's interface addresses (listed at start when isolated).
    host_addrs: Vec<IpAddr>,
    /// The policy's verdict on DNS, which does not change.
    dns_allowed: bool,
    listeners: HashMap<Token, (TcpListener, u16)>,
    conns: HashMap<Token, Conn>,
    outbound: HashMap<Tuple, Token>,
    inbound_ports: HashSet<u16>,
    dns: Dns,
    tokens: Tokens,
    next_port: u16,
    requests: Vec<WatchRequest>,
}

fn seed() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    since.as_secs() ^ u64::from(since.subsec_nanos()) ^ u64::from(std::process::id()) << 32
}

impl Stack {
    /// A stack for `config`, listening on its published ports.
    pub fn new(config: &NetConfig) -> Result<Self, Error> {
        let mut frames = Frames::default();
        let epoch = std::time::Instant::now();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        iface_config.random_seed = seed();
        let mut iface = Interface::new(iface_config, &mut frames, SmolInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            for ip in [GATEWAY_IP, DNS_IP] {
                // Two addresses fit smoltcp's default table of two.
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), PREFIX_LEN));
            }
        });
        // With a default route through one of its own addresses and AnyIP,
        // the interface accepts packets for every destination: that is how
        // guest SYNs to the outside world reach a listening socket here.
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY_IP);
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let upstream = config.dns_upstream.unwrap_or_else(super::host_resolver);
        let dns = Dns::new(&mut sockets, upstream);
        let host_addrs = match (&config.host_addrs, config.policy.isolated) {
            (_, false) => Vec::new(),
            (Some(listed), true) => listed.clone(),
            (None, true) => sys::host_addresses().map_err(Error::HostAddresses)?,
        };
        let dns_allowed = config
            .policy
            .allows(Destination::Dns { upstream }, &host_addrs);
        let mut stack = Self {
            iface,
            sockets,
            frames,
            epoch,
            policy: config.policy.clone(),
            host_addrs,
            dns_allowed,
            listeners: HashMap::new(),
            conns: HashMap::new(),
            outbound: HashMap::new(),
            inbound_ports: HashSet::new(),
            dns,
            tokens: Tokens::default(),
            next_port: *EPHEMERAL.start(),
            requests: Vec::new(),
        };
        for p in &config.publish {
            let listener = TcpListener::bind(p.host).map_err(|e| Error::Listen(p.host, e))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| Error::Listen(p.host, e))?;
            let token = stack.token();
            stack.listeners.insert(token, (listener, p.guest_port));
        }
        Ok(stack)
    }

    fn token(&mut self) -> Token {
        self.tokens.next()
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(
            i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX),
        )
    }

    /// The host addresses the published ports are bound to, in `--publish` order.
    pub fn published(&self) -> Vec<(SocketAddr, u16)> {
        let mut v: Vec<_> = self
            .listeners
            .iter()
            .filter_map(|(t, (l, port))| Some((*t, l.local_addr().ok()?, *port)))
            .collect();
        v.sort_by_key(|(t, ..)| *t);
        v.into_iter().map(|(_, a, p)| (a, p)).collect()
    }

    /// Number of proxied connections (any phase).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Watch requests for every host fd the stack holds, in place of what
    /// was queued: call when a handler (re)starts on the event loop (what
    /// an earlier handler watched went with it).
    pub fn watch_all(&mut self) {
        self.requests.clear();
        let watches: Vec<WatchRequest> = self
            .listeners
            .iter()
            .map(|(&token, (l, _))| (token, l.as_raw_fd(), libc::POLLIN))
            .chain(
                self.conns
                    .iter()
                    .map(|(&token, c)| (token, c.stream.as_raw_fd(), libc::POLLIN | libc::POLLOUT)),
            )
            .map(|(token, fd, events)| WatchRequest::Watch {
                fd,
                token,
                events: events as u32,
            })
            .collect();
        self.requests.extend(watches);
        self.dns.watches(&mut self.requests);
    }

    /// Watch changes queued since the last call, for the event loop.
    pub fn take_requests(&mut self) -> Vec<WatchRequest> {
        std::mem::take(&mut self.requests)
    }

    /// Frames for the guest, oldest first. Pop what fits the guest's receive
    /// buffers; leave the rest (smoltcp is held back while it is full).
    pub fn to_guest(&mut self) -> &mut VecDeque<Vec<u8>> {
        &mut self.frames.to_guest
    }

    /// Guest frames not yet taken in by smoltcp (at most [`TO_STACK_CAP`]
    /// from the guest, plus one held SYN per connection).
    pub fn backlog(&self) -> usize {
        self.frames.to_stack.len()
    }

    /// Takes over an accepted host connection and opens a TCP connection
    /// from the gateway to `guest_port` for it; bytes are copied both ways.
    /// This is also how the platform hands over sockets it accepted itself.
    pub fn accept_inbound(&mut self, stream: TcpStream, guest_port: u16) -> Result<(), Error> {
        if self.conns.len() >= MAX_CONNS {
            sys::set_linger_zero(&stream);
            return Err(Error::TooManyConnections(MAX_CONNS));
        }
        stream.set_nonblocking(true).map_err(Error::Inbound)?;
        let _ = stream.set_nodelay(true);
        let port = self.ephemeral_port();
        let mut socket = tcp_socket();
        socket
            .connect(
                self.iface.context(),
                (IpAddress::Ipv4(GUEST_IP), guest_port),
                (IpAddress::Ipv4(GATEWAY_IP), port),
            )
            .map_err(|e| Error::Inbound(std::io::Error::other(e.to_string())))?;
        let handle = self.sockets.add(socket);
        let token = self.token();
        self.requests.push(WatchRequest::Watch {
            fd: stream.as_raw_fd(),
            token,
            events: (libc::POLLIN | libc::POLLOUT) as u32,
        });
        let mut conn = Conn::new(stream, Phase::Open(handle));
        conn.local_port = Some(port);
        self.inbound_ports.insert(port);
        self.conns.insert(token, conn);
        Ok(())
    }

    fn ephemeral_port(&mut self) -> u16 {
        loop {
            let p = self.next_port;
            self.next_port = if p == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                p + 1
            };
            if !self.inbound_ports.contains(&p) {
                return p;
            }
        }
    }

    /// One Ethernet frame from the guest (without the virtio header).
    /// Frames are processed by the next [`poll`](Self::poll).
    pub fn guest_frame(&mut self, frame: &[u8]) {
        if frame.len() > MAX_FRAME_LEN {
            return;
        }
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                // AnyIP would answer ARP for every address: only the
                // gateway and the DNS forwarder live on this link.
                let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
                    return;
                };
                let target = arp.target_protocol_addr();
                if target != GATEWAY_IP.octets() && target != DNS_IP.octets() {
                    return;
                }
            }
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    return;
                };
                let (src, dst) = (ip.src_addr(), ip.dst_addr());
                match ip.next_header() {
                    IpProtocol::Tcp => {
                        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                            return;
                        };
                        if tcp.syn() && !tcp.ack() {
                            let tuple = (
                                SocketAddrV4::new(src, tcp.src_port()),
                                SocketAddrV4::new(dst, tcp.dst_port()),
                            );
                            if self.outbound_syn(tuple, frame) {
                                return;
                            }
                        }
                    }
                    // AnyIP would answer pings to every address: only the
                    // gateway and the forwarder answer.
                    IpProtocol::Icmp if dst != GATEWAY_IP && dst != DNS_IP => return,
                    _ => {}
                }
            }
            _ => return,
        }
        if self.frames.to_stack.len() >= TO_STACK_CAP {
            tracing::trace!("net: guest frame dropped, {TO_STACK_CAP} already queued");
            return;
        }
        self.frames.to_stack.push_back(frame.to_vec());
    }

    /// Where a guest destination goes on the host, if anywhere (the
    /// mapping table of the [module docs](super)).
    fn host_destination(&self, dst: SocketAddrV4) -> Option<Destination> {
        let ip = *dst.ip();
        let subnet = Ipv4Addr::from(u32::from(GATEWAY_IP) & (u32::MAX << (32 - PREFIX_LEN)));
        if ip == GATEWAY_IP {
            Some(Destination::Connect(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                dst.port(),
            )))
        } else if ip == DNS_IP && dst.port() == 53 {
            Some(Destination::Dns {
                upstream: self.dns.upstream(),
            })
        } else if u32::from(ip) & (u32::MAX << (32 - PREFIX_LEN)) == u32::from(subnet)
            || ip.is_broadcast()
            || ip.is_multicast()
            || ip.is_unspecified()
        {
            None
        } else {
            Some(Destination::Connect(SocketAddr::V4(dst)))
        }
    }

    /// A guest SYN: start the host connect and hold the SYN until it
    /// finishes. Returns whether the frame was taken (held or dropped); a
    /// frame not taken goes to smoltcp, which resets it when no socket
    /// listens (denied, unreachable, or over the limit).
    fn outbound_syn(&mut self, tuple: Tuple, frame: &[u8]) -> bool {
        if let Some(token) = self.outbound.get(&tuple) {
            // A retransmitted SYN while the host connect is in flight is dropped.
            return self
                .conns
                .get(token)
                .is_some_and(|c| matches!(c.phase, Phase::Connecting { .. }));
        }
        if self.conns.len() >= MAX_CONNS {
            return false;
        }
        // The policy decides on where the connection really goes.
        let Some(destination) = self.host_destination(tuple.1) else {
            return false;
        };
        if !self.policy.allows(destination, &self.host_addrs) {
            tracing::debug!("net: {} ({destination:?}) denied by policy", tuple.1);
            return false;
        }
        let target = match destination {
            Destination::Connect(addr) => addr,
            Destination::Dns { upstream } => upstream,
        };
        let stream = match sys::connect_nonblocking(target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("net: connect to {target} failed: {e}");
                return false;
            }
        };
        let token = self.token();
        self.requests.push(WatchRequest::Watch {
            fd: stream.as_raw_fd(),
            token,
            events: (libc::POLLIN | libc::POLLOUT) as u32,
        });
        let mut conn = Conn::new(
            stream,
            Phase::Connecting {
                syn: frame.to_vec(),
            },
        );
        conn.tuple = Some(tuple);
        self.conns.insert(token, conn);
        self.outbound.insert(tuple, token);
        true
    }

    /// A host fd under `token` is ready (`revents` from poll).
    pub fn host_ready(&mut self, token: Token, revents: u32) {
        if let Some((listener, port)) = self.listeners.get(&token) {
            let port = *port;
            let mut accepted = Vec::new();
            while let Ok((stream, _)) = listener.accept() {
                accepted.push(stream);
            }
            for stream in accepted {
                if let Err(e) = self.accept_inbound(stream, port) {
                    tracing::warn!("net: inbound connection to guest port {port} dropped: {e}");
                }
            }
            return;
        }
        if self.dns.owns(token) {
            self.dns
                .answer(token, &mut self.sockets, &mut self.requests);
            return;
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let Phase::Connecting { syn } = &mut conn.phase else {
            return;
        };
        let failed = revents & (libc::POLLERR | libc::POLLHUP) as u32 != 0
            || !matches!(conn.stream.take_error(), Ok(None));
        if !failed && revents & libc::POLLOUT as u32 == 0 {
            return;
        }
        let syn = std::mem::take(syn);
        let mut listening = None;
        if !failed && conn.stream.peer_addr().is_ok() {
            let _ = conn.stream.set_nodelay(true);
            let dst = conn
                .tuple
                .map_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), |t| t.1);
            let mut socket = tcp_socket();
            let endpoint = IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(*dst.ip())),
                port: dst.port(),
            };
            if socket.listen(endpoint).is_ok() {
                listening = Some(socket);
            }
        }
        match listening {
            Some(socket) => {
                let handle = self.sockets.add(socket);
                if let Some(conn) = self.conns.get_mut(&token) {
                    conn.phase = Phase::Open(handle);
                }
            }
            // No listener: smoltcp answers the held SYN with a RST.
            None => self.remove(token),
        }
        self.frames.to_stack.push_back(syn);
        // Deliver the SYN now, before another listener on the same
        // destination could take it.
        let now = self.now();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
    }

    /// Runs the stack: processes queued guest frames, moves data between
    /// host and smoltcp sockets, forwards DNS, and queues frames for the guest.
    pub fn poll(&mut self) {
        for _ in 0..4 {
            let now = self.now();
            self.iface.poll(now, &mut self.frames, &mut self.sockets);
            let mut progress = false;
            for conn in self.conns.values_mut() {
                if let Phase::Open(handle) = conn.phase {
                    progress |= conn.pump(self.sockets.get_mut::<tcp::Socket>(handle));
                }
            }
            progress |= self.dns.forward_queries(
                &mut self.sockets,
                self.dns_allowed,
                &mut self.tokens,
                &mut self.requests,
            );
            if !progress {
                break;
            }
        }
        // The last pump may have queued FINs or RSTs: send them before
        // dropping the finished sockets.
        let now = self.now();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
        let finished: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.finished)
            .map(|(t, _)| *t)
            .collect();
        for token in finished {
            self.remove(token);
        }
        self.dns
            .expire(std::time::Instant::now(), &mut self.requests);
    }

    fn remove(&mut self, token: Token) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        if conn.reset_host {
            sys::set_linger_zero(&conn.stream);
        }
        if let Phase::Open(handle) = conn.phase {
            self.sockets.remove(handle);
        }
        if let Some(tuple) = conn.tuple {
            self.outbound.remove(&tuple);
        }
        if let Some(port) = conn.local_port {
            self.inbound_ports.remove(&port);
        }
        self.requests.push(WatchRequest::Unwatch { token });
    }

    /// How long until [`poll`](Self::poll) is due again; `None` when only an
    /// event (guest frame, host readiness, receive buffers) can make work.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        if self.frames.to_guest.len() >= TO_GUEST_CAP {
            return None;
        }
        let now = self.now();
        let smol = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        let dns = self
            .dns
            .next_expiry()
            .map(|t| t.saturating_duration_since(std::time::Instant::now()));
        let delay = match (smol, dns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        delay.map(|d| d.max(MIN_TIMER))
    }
}

fn tcp_socket() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
    );
    socket.set_nagle_enabled(false);
    socket
}
