//! One guest ↔ host stream: its state and both directions' credit.
//!
//! Guest → host: the device advertises [`BUF_ALLOC`] bytes of receive
//! buffer and counts in `fwd_cnt` what it has written to the host socket.
//! Data the host socket cannot take yet waits in `to_host`; the guest can
//! never have more than `BUF_ALLOC` bytes outstanding, so a packet that
//! would overflow `to_host` is credit abuse and resets the stream. While
//! the host socket is full, `fwd_cnt` stands still and the guest stops
//! sending: backpressure without blocking the TX queue for other streams.
//!
//! Host → guest: the device reads the host socket only while the guest's
//! advertised credit (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`) is
//! positive; otherwise the bytes stay in the kernel's socket buffer and
//! the host writer blocks.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer the device advertises per stream, in bytes.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Where a stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// What the host end told the device to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Keep the stream.
    Keep,
    /// Reset it: send RST to the guest and close the host socket.
    Reset,
    /// Close it without a word to the guest (it reset already).
    Drop,
}

/// One stream.
pub struct Connection {
    /// The host end.
    pub stream: UnixStream,
    /// Token key of the host socket's watches.
    pub key: u32,
    /// The host-side vsock port.
    pub local_port: u32,
    /// The guest-side vsock port.
    pub peer_port: u32,
    /// The guest's context id.
    pub guest_cid: u64,
    /// Where the stream stands.
    pub state: State,
    /// Connect deadline (host-initiated streams only).
    pub deadline: Option<Instant>,
    /// The host socket may have bytes to read.
    pub readable: bool,
    /// POLLOUT is being watched.
    pub out_watched: bool,
    host_eof: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes for the host socket; the first `exempt` are the device's own
    /// (the `OK <port>` line) and don't count against the guest's credit.
    to_host: Vec<u8>,
    exempt: usize,
    /// Host bytes read with the CONNECT line, sent to the guest first.
    to_guest: Vec<u8>,
    guest_shut: u32,
    pending: Pending,
}

/// Control packets owed to the guest.
#[derive(Default)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
    shutdown_send: bool,
}

impl Connection {
    /// A stream the guest opened: RESPONSE is owed.
    pub fn from_guest(stream: UnixStream, key: u32, hdr: &Header, guest_cid: u64) -> Self {
        let mut conn = Self::new(stream, key, hdr.dst_port, hdr.src_port, guest_cid);
        conn.state = State::Established;
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        conn.pending.response = true;
        conn
    }

    /// A stream a host client asked for with `CONNECT <peer_port>`: REQUEST
    /// is owed; `early` holds host bytes that came with the line.
    pub fn from_host(
        stream: UnixStream,
        key: u32,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        early: Vec<u8>,
        deadline: Instant,
    ) -> Self {
        let mut conn = Self::new(stream, key, local_port, peer_port, guest_cid);
        conn.pending.request = true;
        conn.to_guest = early;
        conn.deadline = Some(deadline);
        conn
    }

    fn new(stream: UnixStream, key: u32, local_port: u32, peer_port: u32, guest_cid: u64) -> Self {
        Self {
            stream,
            key,
            local_port,
            peer_port,
            guest_cid,
            state: State::Connecting,
            deadline: None,
            readable: false,
            out_watched: false,
            host_eof: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            to_host: Vec::new(),
            exempt: 0,
            to_guest: Vec::new(),
            guest_shut: 0,
            pending: Pending::default(),
        }
    }

    /// A header from the device to the guest for this stream.
    pub fn header(&mut self, op: Op, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest reporting more consumed than was sent gets nothing: its
        // own stream stalls, nobody else's.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host socket.
    pub fn buffered(&self) -> usize {
        self.to_host.len() - self.exempt
    }

    /// Whether anything waits for the host socket.
    pub fn has_output(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Whether the stream has something for the guest's RX queue now.
    pub fn wants_rx(&self) -> bool {
        let p = &self.pending;
        if p.request || p.response || p.credit_update || p.shutdown_send {
            return true;
        }
        self.data_ready()
    }

    /// Host bytes may be waiting and the guest has room for them.
    fn data_ready(&self) -> bool {
        self.state == State::Established
            && self.guest_shut & SHUTDOWN_RCV == 0
            && !self.host_eof
            && (self.readable || !self.to_guest.is_empty())
            && self.peer_credit() > 0
    }

    /// Every packet from the guest carries its receive credit.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// The guest accepted a host-initiated stream: tell the host client.
    pub fn accepted(&mut self) -> Outcome {
        if self.state != State::Connecting {
            return Outcome::Reset;
        }
        self.state = State::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.local_port);
        self.exempt = line.len();
        self.to_host = line.into_bytes();
        self.flush()
    }

    /// Guest data for the host socket.
    pub fn guest_data(&mut self, payload: &[u8]) -> Outcome {
        if self.state != State::Established || self.guest_shut & SHUTDOWN_SEND != 0 {
            return Outcome::Reset;
        }
        let budget = usize::try_from(BUF_ALLOC).unwrap_or(usize::MAX);
        if self.buffered() + payload.len() > budget {
            tracing::warn!(
                "vsock: guest port {} overran its credit; resetting",
                self.peer_port
            );
            return Outcome::Reset;
        }
        self.to_host.extend_from_slice(payload);
        self.flush()
    }

    /// The guest shuts down one or both directions.
    pub fn guest_shutdown(&mut self, flags: u32) -> Outcome {
        self.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.flush()
    }

    /// The guest asked for our credit.
    pub fn credit_requested(&mut self) {
        self.pending.credit_update = true;
    }

    /// Writes what the host socket takes; called on POLLOUT too.
    pub fn flush(&mut self) -> Outcome {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Outcome::Reset,
                Ok(n) => {
                    let own = n.min(self.exempt);
                    self.exempt -= own;
                    let counted = u32::try_from(n - own).unwrap_or(u32::MAX);
                    self.fwd_cnt += counted;
                    self.to_host.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return Outcome::Reset,
            }
        }
        // Tell the guest about freed space before it can run dry: once half
        // the buffer was forwarded unannounced, or everything it sent is out.
        let unannounced = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        if unannounced >= BUF_ALLOC / 2 || (unannounced > 0 && self.to_host.is_empty()) {
            self.pending.credit_update = true;
        }
        if self.to_host.is_empty() && self.guest_shut & SHUTDOWN_SEND != 0 {
            if self.guest_shut & SHUTDOWN_RCV != 0 {
                // Both directions closed and everything delivered: the
                // guest waits for our RST to finish its close.
                return Outcome::Reset;
            }
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Outcome::Keep
    }

    /// The next packet for the guest, with at most `room` payload bytes.
    /// `None` when nothing is owed after all (the socket had no data).
    pub fn next_rx(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if std::mem::take(&mut self.pending.request) {
            return Some((self.header(Op::Request, 0), Vec::new()));
        }
        if std::mem::take(&mut self.pending.response) {
            return Some((self.header(Op::Response, 0), Vec::new()));
        }
        if std::mem::take(&mut self.pending.shutdown_send) {
            return Some((self.header(Op::Shutdown, SHUTDOWN_SEND), Vec::new()));
        }
        if self.data_ready() {
            let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
            if let Some(data) = self.read_host(room.min(credit)) {
                self.rx_cnt += u32::try_from(data.len()).unwrap_or(u32::MAX);
                // The data packet carries fwd_cnt: no separate update needed.
                self.pending.credit_update = false;
                return Some((self.header(Op::Rw, 0), data));
            }
            if std::mem::take(&mut self.pending.shutdown_send) {
                return Some((self.header(Op::Shutdown, SHUTDOWN_SEND), Vec::new()));
            }
        }
        if std::mem::take(&mut self.pending.credit_update) {
            return Some((self.header(Op::CreditUpdate, 0), Vec::new()));
        }
        None
    }

    /// Up to `n` bytes from the early buffer or the host socket.
    fn read_host(&mut self, n: usize) -> Option<Vec<u8>> {
        if n == 0 {
            return None;
        }
        if !self.to_guest.is_empty() {
            let take = n.min(self.to_guest.len());
            return Some(self.to_guest.drain(..take).collect());
        }
        let mut data = vec![0u8; n];
        loop {
            match self.stream.read(&mut data) {
                Ok(0) => {
                    // The host will send no more; the guest may still.
                    self.host_eof = true;
                    self.readable = false;
                    self.pending.shutdown_send = true;
                    return None;
                }
                Ok(got) => {
                    data.truncate(got);
                    return Some(data);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return None;
                }
                Err(_) => {
                    // A broken host socket reads as the end of its data.
                    self.host_eof = true;
                    self.readable = false;
                    self.pending.shutdown_send = true;
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
