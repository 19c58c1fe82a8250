// Tests may unwrap (CONTRIBUTING.md).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::*;

const GUEST_CID: u64 = 3;

fn guest(op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1024,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc,
        fwd_cnt,
        ..Header::default()
    }
}

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    (a, b)
}

fn established(buf_alloc: u32) -> (Connection, UnixStream) {
    let (a, b) = pair();
    let mut conn = Connection::from_guest(a, 16, &guest(Op::Request, buf_alloc, 0), GUEST_CID);
    let (hdr, _) = conn.next_rx(4096).unwrap();
    assert_eq!(hdr.op, Op::Response as u16);
    assert_eq!(
        (hdr.src_port, hdr.dst_port, hdr.dst_cid),
        (1024, 5000, GUEST_CID)
    );
    assert_eq!(hdr.buf_alloc, BUF_ALLOC);
    (conn, b)
}

#[test]
fn guest_data_reaches_the_host_and_credit_comes_back() {
    let (mut conn, mut host) = established(4096);
    assert_eq!(conn.guest_data(b"ping"), Outcome::Keep);
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // Everything was forwarded: the guest hears about it.
    let (hdr, data) = conn.next_rx(4096).unwrap();
    assert_eq!((hdr.op, hdr.fwd_cnt), (Op::CreditUpdate as u16, 4));
    assert!(data.is_empty());
    assert!(conn.next_rx(4096).is_none());
    conn.credit_requested();
    assert_eq!(conn.next_rx(4096).unwrap().0.op, Op::CreditUpdate as u16);
}

#[test]
fn a_full_host_socket_holds_fwd_cnt_and_overrun_resets() {
    let (mut conn, _host) = established(4096);
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0usize;
    let outcome = loop {
        let o = conn.guest_data(&chunk);
        if o != Outcome::Keep {
            break o;
        }
        sent += chunk.len();
        assert!(sent < 16 << 20, "never reset");
    };
    assert_eq!(outcome, Outcome::Reset);
    // The host never read: what the socket took is forwarded, the rest
    // is buffered, and the overrun came only past BUF_ALLOC buffered bytes.
    let fwd = conn.header(Op::CreditUpdate, 0).fwd_cnt as usize;
    assert_eq!(fwd + conn.buffered(), sent);
    assert!(conn.buffered() + chunk.len() > BUF_ALLOC as usize);
    assert!(conn.buffered() <= BUF_ALLOC as usize);
}

#[test]
fn host_data_respects_the_guest_credit() {
    let (mut conn, mut host) = established(10);
    host.write_all(&[1u8; 100]).unwrap();
    conn.readable = true;
    assert!(conn.wants_rx());
    let (hdr, data) = conn.next_rx(4096).unwrap();
    assert_eq!((hdr.op, data.len()), (Op::Rw as u16, 10));
    assert_eq!(conn.peer_credit(), 0);
    assert!(!conn.wants_rx(), "no credit: the socket is not read");
    assert!(conn.next_rx(4096).is_none());
    // The guest consumed 10 bytes.
    conn.update_peer_credit(&guest(Op::CreditUpdate, 10, 10));
    assert!(conn.wants_rx());
    let (_, data) = conn.next_rx(4).unwrap();
    assert_eq!(data.len(), 4, "limited by the RX buffer");
    // A guest claiming to have consumed more than it got stalls itself.
    conn.update_peer_credit(&guest(Op::CreditUpdate, 10, 1000));
    assert_eq!(conn.peer_credit(), 0);
}

#[test]
fn host_eof_shuts_down_sending_and_guest_close_resets() {
    let (mut conn, host) = established(4096);
    host.shutdown(Shutdown::Write).unwrap();
    conn.readable = true;
    let (hdr, _) = conn.next_rx(4096).unwrap();
    assert_eq!((hdr.op, hdr.flags), (Op::Shutdown as u16, SHUTDOWN_SEND));
    assert!(!conn.wants_rx());
    // Guest half-closes: the host socket is shut for writing.
    assert_eq!(conn.guest_shutdown(SHUTDOWN_SEND), Outcome::Keep);
    assert_eq!(
        conn.guest_shutdown(SHUTDOWN_SEND | SHUTDOWN_RCV),
        Outcome::Reset
    );
    drop(host);
    assert_eq!(
        conn.guest_data(b"x"),
        Outcome::Reset,
        "no data after SHUTDOWN_SEND"
    );
}

#[test]
fn host_initiated_stream_requests_then_greets_the_client() {
    let (a, _host) = pair();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn =
        Connection::from_host(a, 17, 1 << 30, 5000, GUEST_CID, b"early".to_vec(), deadline);
    let (hdr, _) = conn.next_rx(4096).unwrap();
    assert_eq!(hdr.op, Op::Request as u16);
    assert_eq!((hdr.src_port, hdr.dst_port), (1 << 30, 5000));
    assert!(conn.next_rx(4096).is_none(), "no data before RESPONSE");
    assert_eq!(
        conn.guest_data(b"x"),
        Outcome::Reset,
        "no data before RESPONSE"
    );
    conn.update_peer_credit(&guest(Op::Response, 4096, 0));
    assert_eq!(conn.accepted(), Outcome::Keep);
    assert_eq!(conn.accepted(), Outcome::Reset, "a second RESPONSE");
}

#[test]
fn ok_line_precedes_data_and_is_not_credited() {
    let (a, mut host) = pair();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn =
        Connection::from_host(a, 17, 1 << 30, 5000, GUEST_CID, b"early".to_vec(), deadline);
    let _ = conn.next_rx(4096);
    conn.update_peer_credit(&guest(Op::Response, 4096, 0));
    assert_eq!(conn.accepted(), Outcome::Keep);
    assert_eq!(conn.guest_data(b"hi"), Outcome::Keep);
    let mut buf = [0u8; 16];
    let mut got = Vec::new();
    while got.len() < 16 {
        let n = host.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"OK 1073741824\nhi");
    let (hdr, data) = conn.next_rx(4096).unwrap();
    assert_eq!((hdr.op, hdr.fwd_cnt), (Op::Rw as u16, 2));
    assert_eq!(data, b"early");
}
