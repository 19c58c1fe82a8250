//! The hybrid Unix-socket backend (Firecracker-compatible): it maps vsock
//! streams to Unix sockets and multiplexes them onto the device's queues.
//!
//! - Host → guest: a client connects to the listening socket `PATH` and
//!   writes `CONNECT <port>\n`; the device sends REQUEST to that guest
//!   port and, once the guest answers RESPONSE, writes `OK <host_port>\n`
//!   to the client and relays bytes. A guest RST (nobody listens) closes
//!   the client socket.
//! - Guest → host: a REQUEST to host port P connects to `PATH_P`; RST if
//!   nobody listens there.
//!
//! All sockets are non-blocking. The muxer never touches the event loop
//! itself: it records [`Interest`]s (watch, unwatch, timer) that the
//! device's handler applies, which keeps this logic testable without one.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::connection::{Connection, Outcome, State};
use super::packet::{Header, Op, TxPacket, HOST_CID, TYPE_STREAM};
use super::unix::connect_nonblocking;
use crate::event_loop::Token;

/// Most streams (and pending host clients) per VM: each may buffer up to
/// `BUF_ALLOC` bytes of guest data.
pub const MAX_CONNECTIONS: usize = 256;
/// Most host clients that have connected but not yet sent `CONNECT`.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// Most device-originated RSTs waiting for RX buffers; a guest that
/// provokes more without reading them loses the surplus.
pub const MAX_CONTROL: usize = 1024;
/// How long the guest has to answer a host-initiated REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a host client has to send its `CONNECT` line.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Period of the deadline sweep while anything has a deadline.
const SWEEP_PERIOD: Duration = Duration::from_millis(250);
/// Host-side ports for host-initiated streams start here (as Firecracker's).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Token of the listening socket.
pub const LISTENER: Token = 8;
/// Token of the deadline sweep timer.
pub const SWEEP: Token = 9;
/// Socket keys start here; a socket's tokens are `2 * key` (POLLIN) and
/// `2 * key + 1` (POLLOUT).
const FIRST_KEY: u32 = 16;
const LAST_KEY: u32 = u32::MAX / 2;

/// What the muxer asks of the event loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Interest {
    /// Watch `fd` for `events` under `token`.
    Watch {
        /// The fd.
        fd: RawFd,
        /// The token events come back with.
        token: Token,
        /// Poll events.
        events: u32,
    },
    /// Stop watching `token`.
    Unwatch(Token),
    /// Fire [`SWEEP`] after this long.
    Timer(Duration),
}

/// A stream's identity: (host port, guest port).
type ConnId = (u32, u32);

struct Client {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Every stream of one device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    clients: HashMap<u32, Client>,
    conns: HashMap<ConnId, Connection>,
    keys: HashMap<u32, ConnId>,
    next_key: u32,
    next_local_port: u32,
    control: VecDeque<Header>,
    rx_queue: VecDeque<ConnId>,
    interests: Vec<Interest>,
    sweep_armed: bool,
}

fn in_token(key: u32) -> Token {
    key * 2
}

fn out_token(key: u32) -> Token {
    key * 2 + 1
}

const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;

impl Muxer {
    /// A muxer for guest `guest_cid` behind `listener`, bound at `uds_path`
    /// (guest-initiated streams go to `<uds_path>_<port>`).
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            clients: HashMap::new(),
            conns: HashMap::new(),
            keys: HashMap::new(),
            next_key: FIRST_KEY,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            rx_queue: VecDeque::new(),
            interests: Vec::new(),
            sweep_armed: false,
        }
    }

    /// Registers the listener; call once when the device starts.
    pub fn start(&mut self) {
        let _ = self.listener.set_nonblocking(true);
        self.interests.push(Interest::Watch {
            fd: self.listener.as_raw_fd(),
            token: LISTENER,
            events: POLLIN,
        });
    }

    /// Takes the interests recorded since the last call.
    pub fn take_interests(&mut self) -> Vec<Interest> {
        std::mem::take(&mut self.interests)
    }

    /// Number of streams (any state).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn alloc_key(&mut self) -> u32 {
        loop {
            let key = self.next_key;
            self.next_key = if key >= LAST_KEY { FIRST_KEY } else { key + 1 };
            if !self.keys.contains_key(&key) && !self.clients.contains_key(&key) {
                return key;
            }
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn arm_sweep(&mut self) {
        if !self.sweep_armed {
            self.sweep_armed = true;
            self.interests.push(Interest::Timer(SWEEP_PERIOD));
        }
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(hdr);
        }
    }

    fn reset_reply(&mut self, hdr: &Header) {
        if let Some(rst) = hdr.reset_reply() {
            self.push_control(rst);
        }
    }

    fn schedule(&mut self, id: ConnId) {
        if self.conns.get(&id).is_some_and(Connection::wants_rx) && !self.rx_queue.contains(&id) {
            self.rx_queue.push_back(id);
        }
    }

    /// Closes a stream; with `rst` the guest is told.
    fn remove(&mut self, id: ConnId, rst: bool) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        self.keys.remove(&conn.key);
        self.interests.push(Interest::Unwatch(in_token(conn.key)));
        if conn.out_watched {
            self.interests.push(Interest::Unwatch(out_token(conn.key)));
        }
        self.rx_queue.retain(|&q| q != id);
        if rst {
            let hdr = conn.header(Op::Rst, 0);
            self.push_control(hdr);
        }
    }

    /// Applies what a host-socket call said about stream `id`.
    fn after(&mut self, id: ConnId, outcome: Outcome) {
        match outcome {
            Outcome::Keep => {
                let Some(conn) = self.conns.get_mut(&id) else {
                    return;
                };
                let want_out = conn.has_output();
                let (fd, key) = (conn.stream.as_raw_fd(), conn.key);
                if want_out && !conn.out_watched {
                    conn.out_watched = true;
                    self.interests.push(Interest::Watch {
                        fd,
                        token: out_token(key),
                        events: POLLOUT,
                    });
                } else if !want_out && conn.out_watched {
                    conn.out_watched = false;
                    self.interests.push(Interest::Unwatch(out_token(key)));
                }
                self.schedule(id);
            }
            Outcome::Reset => self.remove(id, true),
            Outcome::Drop => self.remove(id, false),
        }
    }

    /// Handles one valid packet from the guest.
    pub fn handle_tx(&mut self, pkt: &TxPacket) {
        let hdr = &pkt.hdr;
        let id = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&id) else {
            match pkt.op {
                Op::Request => self.guest_connect(hdr),
                Op::Rst => {}
                _ => self.reset_reply(hdr),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        let outcome = match pkt.op {
            Op::Response => conn.accepted(),
            Op::Rw => conn.guest_data(&pkt.payload),
            Op::Shutdown => conn.guest_shutdown(hdr.flags),
            Op::CreditRequest => {
                conn.credit_requested();
                Outcome::Keep
            }
            Op::CreditUpdate => Outcome::Keep,
            Op::Rst => Outcome::Drop,
            // A second REQUEST for a live stream: the guest lost track.
            Op::Request => Outcome::Reset,
        };
        self.after(id, outcome);
    }

    /// Handles a packet whose header was invalid.
    pub fn handle_rejected(&mut self, hdr: &Header) {
        // Answer only what is addressed from the guest: a forged source
        // gets nothing, so RSTs cannot be aimed elsewhere.
        if hdr.src_cid == self.guest_cid {
            let mut h = *hdr;
            h.dst_cid = HOST_CID;
            h.type_ = TYPE_STREAM;
            self.reset_reply(&h);
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: connection limit reached; refusing guest REQUEST");
            self.reset_reply(hdr);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(std::path::Path::new(&path)) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!("vsock: guest connect to host port {}: {e}", hdr.dst_port);
                self.reset_reply(hdr);
                return;
            }
        };
        let key = self.alloc_key();
        let id = (hdr.dst_port, hdr.src_port);
        self.interests.push(Interest::Watch {
            fd: stream.as_raw_fd(),
            token: in_token(key),
            events: POLLIN,
        });
        self.keys.insert(key, id);
        self.conns
            .insert(id, Connection::from_guest(stream, key, hdr, self.guest_cid));
        self.schedule(id);
    }

    /// Accepts pending host clients.
    pub fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.clients.len() >= MAX_PENDING_CLIENTS
                || self.conns.len() + self.clients.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                tracing::warn!("vsock: too many host connections; closing a new one");
                continue;
            }
            let key = self.alloc_key();
            self.interests.push(Interest::Watch {
                fd: stream.as_raw_fd(),
                token: in_token(key),
                events: POLLIN,
            });
            self.clients.insert(
                key,
                Client {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + CLIENT_TIMEOUT,
                },
            );
            self.arm_sweep();
        }
    }

    /// A watched socket is ready.
    pub fn ready(&mut self, token: Token, revents: u32) {
        let key = token / 2;
        if self.clients.contains_key(&key) {
            self.client_readable(key);
            return;
        }
        let Some(&id) = self.keys.get(&key) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let outcome = if token == out_token(key) {
            conn.flush()
        } else {
            if revents & (POLLIN | libc::POLLHUP as u32 | libc::POLLERR as u32) != 0 {
                conn.readable = true;
            }
            Outcome::Keep
        };
        self.after(id, outcome);
    }

    /// Reads a host client's `CONNECT <port>\n`.
    fn client_readable(&mut self, key: u32) {
        let Some(client) = self.clients.get_mut(&key) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - client.line.len();
        match client.stream.read(&mut buf[..room]) {
            Ok(0) => return self.drop_client(key),
            Ok(n) => client.line.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(_) => return self.drop_client(key),
        }
        let Some(nl) = client.line.iter().position(|&b| b == b'\n') else {
            if client.line.len() >= MAX_CONNECT_LINE {
                self.drop_client(key);
            }
            return;
        };
        let port = parse_connect(&client.line[..nl]);
        let early = client.line.split_off(nl + 1);
        let Some(client) = self.clients.remove(&key) else {
            return;
        };
        let Some(peer_port) = port else {
            self.interests.push(Interest::Unwatch(in_token(key)));
            return;
        };
        let local_port = self.alloc_local_port(peer_port);
        let id = (local_port, peer_port);
        let conn = Connection::from_host(
            client.stream,
            key,
            local_port,
            peer_port,
            self.guest_cid,
            early,
            Instant::now() + CONNECT_TIMEOUT,
        );
        self.keys.insert(key, id);
        self.conns.insert(id, conn);
        self.arm_sweep();
        self.schedule(id);
    }

    fn drop_client(&mut self, key: u32) {
        if self.clients.remove(&key).is_some() {
            self.interests.push(Interest::Unwatch(in_token(key)));
        }
    }

    /// The sweep timer fired: expire clients and unanswered REQUESTs.
    pub fn sweep(&mut self) {
        self.sweep_armed = false;
        let now = Instant::now();
        let stale: Vec<u32> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&k, _)| k)
            .collect();
        for key in stale {
            self.drop_client(key);
        }
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Connecting && c.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            tracing::debug!("vsock: guest port {} did not answer; closing", id.1);
            self.remove(id, true);
        }
        if !self.clients.is_empty() || self.conns.values().any(|c| c.deadline.is_some()) {
            self.arm_sweep();
        }
    }

    /// Whether a packet is waiting for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest, payload at most `room` bytes.
    pub fn next_rx(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(hdr) = self.control.pop_front() {
            return Some((hdr, Vec::new()));
        }
        // One pass over the waiting streams at most: a stream with data
        // but nothing that fits `room` (an RX buffer with room for the
        // header only) still wants RX and goes back to the end of the
        // queue, for a larger buffer.
        for _ in 0..self.rx_queue.len() {
            let Some(id) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            let packet = conn.next_rx(room);
            if conn.wants_rx() {
                self.rx_queue.push_back(id);
            }
            if packet.is_some() {
                return packet;
            }
        }
        None
    }
}

/// Parses `CONNECT <port>` (no newline).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
