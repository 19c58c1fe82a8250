//! The stack against synthetic guest frames and real host sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use smoltcp::wire::ArpOperation;

use super::test_utils::{
    self, arp_request, gateway, guest, parse, tcp, udp, Flags, Parsed, Segment,
};
use super::*;

fn stack(config: NetConfig) -> Stack {
    let mut s = Stack::new(&config).expect("stack");
    // Teach the stack the guest's MAC, as the guest's first ARP does.
    s.guest_frame(&arp_request(GATEWAY_IP));
    s.poll();
    s.to_guest().clear();
    s
}

fn drain(s: &mut Stack) -> Vec<Parsed> {
    s.to_guest().drain(..).map(|f| parse(&f)).collect()
}

fn segments(s: &mut Stack) -> Vec<Segment> {
    drain(s)
        .into_iter()
        .filter_map(|p| match p {
            Parsed::Tcp(seg) => Some(seg),
            _ => None,
        })
        .collect()
}

/// Polls until `f` yields something (host sockets need a moment), or panics.
fn until<T>(s: &mut Stack, mut f: impl FnMut(&mut Stack) -> Option<T>) -> T {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        s.poll();
        if let Some(t) = f(s) {
            return t;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out");
}

fn watched_tokens(s: &mut Stack) -> Vec<(Token, RawFdLike)> {
    s.take_requests()
        .into_iter()
        .filter_map(|r| match r {
            WatchRequest::Watch { token, fd, .. } => Some((token, fd)),
            WatchRequest::Unwatch { .. } => None,
        })
        .collect()
}

type Token = crate::event_loop::Token;
type RawFdLike = std::os::fd::RawFd;

#[test]
fn arp_for_the_gateway_and_dns_is_answered() {
    let mut s = Stack::new(&NetConfig::default()).expect("stack");
    for ip in [GATEWAY_IP, DNS_IP] {
        s.guest_frame(&arp_request(ip));
        s.poll();
        assert_eq!(
            drain(&mut s),
            [Parsed::Arp(ArpOperation::Reply, GATEWAY_MAC, ip, GUEST_IP)]
        );
    }
}

#[test]
fn arp_and_pings_for_other_addresses_are_ignored() {
    let mut s = Stack::new(&NetConfig::default()).expect("stack");
    s.guest_frame(&arp_request(std::net::Ipv4Addr::new(10, 0, 2, 77)));
    s.guest_frame(&arp_request(GUEST_IP));
    s.poll();
    assert!(drain(&mut s).is_empty());
}

#[test]
fn inbound_connection_handshakes_and_copies_both_ways() {
    let mut s = stack(NetConfig::default());
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    s.accept_inbound(accepted, 8080).expect("take over");
    s.poll();
    let syn = segments(&mut s).pop().expect("a SYN to the guest");
    assert!(syn.syn && syn.ack.is_none(), "{syn:?}");
    assert_eq!((*syn.src.ip(), syn.dst), (GATEWAY_IP, guest(8080)));

    // The guest accepts: SYN-ACK, then smoltcp ACKs.
    let isn = 1000;
    let synack = Flags {
        syn: true,
        ack: Some(syn.seq + 1),
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(8080), syn.src, isn, synack, b""));
    s.poll();
    assert!(segments(&mut s)
        .iter()
        .any(|seg| seg.ack == Some(isn + 1) && !seg.syn));

    // Host to guest.
    client.write_all(b"ping").expect("write");
    let data = until(&mut s, |s| {
        segments(s).into_iter().find(|seg| !seg.payload.is_empty())
    });
    assert_eq!(data.payload, b"ping");
    assert_eq!(data.seq, syn.seq + 1);

    // Guest to host, acknowledging the ping.
    let ack = Flags {
        ack: Some(syn.seq + 5),
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(8080), syn.src, isn + 1, ack, b"pong"));
    s.poll();
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).expect("pong reaches the host");
    assert_eq!(&buf, b"pong");

    // The guest resets: the host sees a reset, the connection goes away.
    let rst = Flags {
        rst: true,
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(8080), syn.src, isn + 5, rst, b""));
    s.poll();
    assert_eq!(s.connections(), 0);
    let err = client.read(&mut buf).expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn outbound_syn_to_the_gateway_reaches_host_loopback() {
    let host = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = host.local_addr().expect("addr").port();
    let mut s = stack(NetConfig::default());
    let syn = Flags {
        syn: true,
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(40000), gateway(port), 5000, syn, b""));
    s.poll();
    // The SYN is held until the host connect finishes.
    assert!(segments(&mut s).is_empty());
    let (token, _) = watched_tokens(&mut s).pop().expect("host socket watched");
    let (mut accepted, _) = host.accept().expect("the VMM connected on the host");
    s.host_ready(token, libc::POLLOUT as u32);
    s.poll();
    let synack = segments(&mut s).pop().expect("SYN-ACK");
    assert!(synack.syn && synack.ack == Some(5001), "{synack:?}");
    assert_eq!(synack.src, gateway(port));

    let ack = Flags {
        ack: Some(synack.seq + 1),
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(40000), gateway(port), 5001, ack, b"hello host"));
    s.poll();
    accepted
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 10];
    accepted
        .read_exact(&mut buf)
        .expect("data reaches the host");
    assert_eq!(&buf, b"hello host");

    // Host FIN reaches the guest as FIN.
    drop(accepted);
    let fin = until(&mut s, |s| segments(s).into_iter().find(|seg| seg.fin));
    assert_eq!(fin.dst, guest(40000));
}

fn expect_rst(s: &mut Stack, port: u16) {
    expect_rst_from(s, gateway(port));
}

/// Waits for the RST from `from` to guest port 40001 (failing pending host
/// connects, as a refused connect would).
fn expect_rst_from(s: &mut Stack, from: SocketAddrV4) {
    let rst = until(s, |s| {
        for (token, _) in watched_tokens(s) {
            s.host_ready(token, (libc::POLLOUT | libc::POLLERR) as u32);
        }
        segments(s).into_iter().find(|seg| seg.rst)
    });
    assert_eq!((rst.src, rst.dst), (from, guest(40001)));
}

fn syn() -> Flags {
    Flags {
        syn: true,
        ..Flags::default()
    }
}

fn isolated(allow: &[&str]) -> NetConfig {
    let mut config = NetConfig::default();
    config.policy.isolated = true;
    config.policy.allow = allow
        .iter()
        .map(|r| r.parse().expect("a valid rule"))
        .collect();
    config
}

/// A non-loopback IPv4 address of this host, if it has one.
fn host_ipv4() -> Option<std::net::Ipv4Addr> {
    sys::host_addresses()
        .expect("getifaddrs")
        .into_iter()
        .find_map(|ip| match ip {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
}

#[test]
fn denied_outbound_syn_is_reset() {
    let host = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = host.local_addr().expect("addr").port();
    let mut config = NetConfig::default();
    config.policy.allow_by_default = false;
    let mut s = stack(config);
    let syn = Flags {
        syn: true,
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(40001), gateway(port), 1, syn, b""));
    expect_rst(&mut s, port);
    host.set_nonblocking(true).expect("nonblocking");
    assert!(
        host.accept().is_err(),
        "a denied connection never reaches the host"
    );
}

#[test]
fn refused_outbound_connect_is_reset() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut s = stack(NetConfig::default());
    let syn = Flags {
        syn: true,
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(40001), gateway(port), 1, syn, b""));
    expect_rst(&mut s, port);
    assert_eq!(s.connections(), 0);
}

#[test]
fn dns_queries_are_forwarded_to_the_resolver_and_answered() {
    let resolver = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let config = NetConfig {
        dns_upstream: Some(resolver.local_addr().expect("addr")),
        ..NetConfig::default()
    };
    let mut s = stack(config);
    let dns = SocketAddrV4::new(DNS_IP, 53);
    s.guest_frame(&udp(guest(5353), dns, b"query"));
    s.poll();
    let (token, _) = watched_tokens(&mut s)
        .pop()
        .expect("upstream socket watched");
    resolver
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let (n, from) = resolver.recv_from(&mut buf).expect("query forwarded");
    assert_eq!(&buf[..n], b"query");
    resolver.send_to(b"answer", from).expect("answer");
    let answer = until(&mut s, |s| {
        s.host_ready(token, libc::POLLIN as u32);
        drain(s).into_iter().find(|p| matches!(p, Parsed::Udp(..)))
    });
    assert_eq!(answer, Parsed::Udp(dns, guest(5353), b"answer".to_vec()));
}

#[test]
fn published_ports_bind_and_report_their_address() {
    let config = NetConfig {
        publish: vec!["127.0.0.1:0:80".parse().expect("spec")],
        ..NetConfig::default()
    };
    let s = Stack::new(&config).expect("stack");
    let published = s.published();
    assert_eq!(published.len(), 1);
    assert_ne!(published[0].0.port(), 0);
    assert_eq!(published[0].1, 80);
    // The same port again cannot be bound.
    let again = NetConfig {
        publish: vec![Publish {
            host: published[0].0,
            guest_port: 80,
        }],
        ..NetConfig::default()
    };
    assert!(matches!(Stack::new(&again), Err(Error::Listen(..))));
}

#[test]
fn publish_specs_parse() {
    let p: Publish = "[::1]:8000:80".parse().expect("v6");
    assert_eq!(p.host, "[::1]:8000".parse::<SocketAddr>().expect("addr"));
    for bad in ["", "80", "a:b", "1:0", "127.0.0.1:x:80", "1.2.3.4:70000:80"] {
        assert!(bad.parse::<Publish>().is_err(), "{bad}");
    }
}

#[test]
fn malformed_frames_are_dropped_without_a_reply() {
    let mut s = stack(NetConfig::default());
    let good = tcp(guest(1), gateway(2), 0, Flags::default(), b"x");
    let mut frames: Vec<Vec<u8>> = vec![vec![], vec![0; 13], vec![0xff; 60], vec![0; 5000]];
    for cut in [15, 20, 33, 34, 40, 53] {
        frames.push(good[..cut].to_vec());
    }
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x4f;
    frames.push(bad_ihl);
    let mut bad_len = good.clone();
    bad_len[16] = 0xff;
    frames.push(bad_len);
    for f in &frames {
        s.guest_frame(f);
    }
    s.poll();
    assert!(drain(&mut s).is_empty());
    let _ = test_utils::guest(0);
}

#[test]
fn a_fresh_stack_resets_a_connection_it_never_saw() {
    // After a restore the guest still believes in its connections; the
    // stack is new, so the guest's next segment is answered with RST.
    let mut s = stack(NetConfig::default());
    let ack = Flags {
        ack: Some(1000),
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(40001), gateway(8080), 5000, ack, b"late data"));
    let rst = until(&mut s, |s| segments(s).into_iter().find(|seg| seg.rst));
    assert_eq!((rst.src, rst.dst), (gateway(8080), guest(40001)));
    assert_eq!(s.connections(), 0);
}

#[test]
fn isolated_connects_to_the_host_and_internal_ranges_are_reset_unopened() {
    // Listening on every host address: a connection to the host, whichever
    // address it used, would show up here.
    let host = TcpListener::bind("0.0.0.0:0").expect("bind");
    host.set_nonblocking(true).expect("nonblocking");
    let port = host.local_addr().expect("addr").port();
    let mut dsts = vec![
        gateway(port),
        SocketAddrV4::new([169, 254, 169, 254].into(), 80),
        SocketAddrV4::new([10, 1, 2, 3].into(), port),
        SocketAddrV4::new([192, 168, 1, 1].into(), port),
        SocketAddrV4::new([172, 16, 0, 1].into(), port),
        SocketAddrV4::new([100, 64, 0, 1].into(), port),
    ];
    match host_ipv4() {
        Some(ip) => dsts.push(SocketAddrV4::new(ip, port)),
        None => eprintln!("no non-loopback IPv4 address on this host"),
    }
    let mut s = stack(isolated(&[]));
    for dst in dsts {
        s.guest_frame(&tcp(guest(40001), dst, 1, syn(), b""));
        s.poll();
        assert!(
            watched_tokens(&mut s).is_empty(),
            "no host connect is even tried for {dst}"
        );
        expect_rst_from(&mut s, dst);
        assert_eq!(s.connections(), 0);
    }
    assert!(host.accept().is_err(), "nothing reached the host");
}

#[test]
fn isolated_syns_to_multicast_and_broadcast_are_never_connected() {
    let mut s = stack(isolated(&[]));
    for dst in [[224, 0, 0, 1], [255, 255, 255, 255], [0, 0, 0, 0]] {
        let dst = SocketAddrV4::new(dst.into(), 80);
        s.guest_frame(&tcp(guest(40001), dst, 1, syn(), b""));
        s.poll();
        assert!(watched_tokens(&mut s).is_empty(), "{dst}");
        assert!(
            segments(&mut s).iter().all(|seg| !seg.syn),
            "{dst} is not answered as open"
        );
        assert_eq!(s.connections(), 0);
    }
}

#[test]
fn an_allow_rule_opens_one_host_loopback_port_through_the_gateway() {
    let allowed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = allowed.local_addr().expect("addr").port();
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    other.set_nonblocking(true).expect("nonblocking");
    let other_port = other.local_addr().expect("addr").port();
    let rule = format!("127.0.0.1:{port}");
    let mut s = stack(isolated(&[&rule]));

    // The guest connects to the gateway; the rule names the mapped 127.0.0.1.
    s.guest_frame(&tcp(guest(40000), gateway(port), 5000, syn(), b""));
    s.poll();
    let (token, _) = watched_tokens(&mut s).pop().expect("host socket watched");
    let (mut accepted, _) = allowed.accept().expect("the VMM connected on the host");
    s.host_ready(token, libc::POLLOUT as u32);
    s.poll();
    let synack = segments(&mut s).pop().expect("SYN-ACK");
    assert!(synack.syn && synack.ack == Some(5001), "{synack:?}");
    assert_eq!(synack.src, gateway(port));
    let ack = Flags {
        ack: Some(synack.seq + 1),
        ..Flags::default()
    };
    s.guest_frame(&tcp(guest(40000), gateway(port), 5001, ack, b"SELECT 1"));
    s.poll();
    accepted
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    accepted
        .read_exact(&mut buf)
        .expect("data reaches the host");
    assert_eq!(&buf, b"SELECT 1");

    // Any other loopback port stays closed.
    s.guest_frame(&tcp(guest(40001), gateway(other_port), 1, syn(), b""));
    s.poll();
    assert!(watched_tokens(&mut s).is_empty());
    expect_rst_from(&mut s, gateway(other_port));
    assert!(
        other.accept().is_err(),
        "the other port was never connected"
    );
}

#[test]
fn isolated_dns_reaches_a_loopback_resolver_that_stays_closed_otherwise() {
    // A resolver on the host's loopback, UDP and TCP on one port.
    let tcp_resolver = TcpListener::bind("127.0.0.1:0").expect("bind");
    tcp_resolver.set_nonblocking(true).expect("nonblocking");
    let addr = tcp_resolver.local_addr().expect("addr");
    let Ok(udp_resolver) = UdpSocket::bind(addr) else {
        eprintln!("UDP port {} is taken; skipping", addr.port());
        return;
    };
    let config = NetConfig {
        dns_upstream: Some(addr),
        ..isolated(&[])
    };
    let mut s = stack(config);
    let dns = SocketAddrV4::new(DNS_IP, 53);

    s.guest_frame(&udp(guest(5353), dns, b"query"));
    s.poll();
    udp_resolver
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let (n, _) = udp_resolver
        .recv_from(&mut buf)
        .expect("UDP query forwarded");
    assert_eq!(&buf[..n], b"query");

    s.guest_frame(&tcp(guest(40000), dns, 1, syn(), b""));
    s.poll();
    let stream = until(&mut s, |_| tcp_resolver.accept().ok());
    drop(stream);

    // The resolver's own address is no way in: 10.0.2.2:PORT is refused.
    let _ = watched_tokens(&mut s);
    s.guest_frame(&tcp(guest(40001), gateway(addr.port()), 1, syn(), b""));
    s.poll();
    assert!(watched_tokens(&mut s).is_empty());
    expect_rst_from(&mut s, gateway(addr.port()));
    assert!(tcp_resolver.accept().is_err());
}

#[test]
fn a_denied_dns_query_is_answered_refused_not_dropped() {
    let resolver = UdpSocket::bind("127.0.0.1:0").expect("bind");
    resolver.set_nonblocking(true).expect("nonblocking");
    let mut config = NetConfig {
        dns_upstream: Some(resolver.local_addr().expect("addr")),
        ..isolated(&[])
    };
    config.policy.allow_by_default = false;
    let mut s = stack(config);
    let dns = SocketAddrV4::new(DNS_IP, 53);
    // ID 0x1234, RD, one question: "a." IN A.
    let query = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
    ];
    s.guest_frame(&udp(guest(5353), dns, &query));
    s.poll();
    let answer = drain(&mut s)
        .into_iter()
        .find_map(|p| match p {
            Parsed::Udp(src, dst, payload) => Some((src, dst, payload)),
            _ => None,
        })
        .expect("an answer at once");
    assert_eq!((answer.0, answer.1), (dns, guest(5353)));
    assert_eq!(&answer.2[..2], &[0x12, 0x34]);
    assert_eq!(answer.2[3] & 0x0f, 5, "REFUSED");
    assert!(watched_tokens(&mut s).is_empty());
    let mut buf = [0u8; 64];
    assert!(
        resolver.recv_from(&mut buf).is_err(),
        "nothing went upstream"
    );
}

#[test]
fn a_guest_that_posts_no_receive_buffers_cannot_grow_the_queues() {
    use super::stack::{TO_GUEST_CAP, TO_STACK_CAP};
    let mut config = NetConfig::default();
    config.policy.allow_by_default = false;
    let mut s = stack(config);
    let syn = Flags {
        syn: true,
        ..Flags::default()
    };
    // Every frame here is answered (an ARP reply, a RST), and the guest
    // never takes an answer.
    for i in 0..20_000u32 {
        let port = 1024 + (i % 60_000) as u16;
        s.guest_frame(&tcp(guest(port), gateway(9), i, syn, b""));
        s.guest_frame(&arp_request(GATEWAY_IP));
        if i % 7 == 0 {
            s.poll();
        }
        assert!(
            s.to_guest().len() <= TO_GUEST_CAP && s.backlog() <= TO_STACK_CAP,
            "after {i} frames: {} toward the guest, {} toward the stack",
            s.to_guest().len(),
            s.backlog()
        );
    }
    assert_eq!(
        s.to_guest().len(),
        TO_GUEST_CAP,
        "the stack filled the guest's queue"
    );
    // Once the guest reads again, what was held back is answered.
    s.to_guest().clear();
    s.poll();
    assert!(
        !s.to_guest().is_empty(),
        "held frames are answered after a refill"
    );
}
