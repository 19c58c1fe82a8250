//! One proxied TCP connection: a host socket on one side, a smoltcp socket
//! toward the guest on the other, and the copy between them with
//! backpressure and FIN/RST propagation.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};

/// A guest-originated connection: guest endpoint and the destination it asked for.
pub(super) type Tuple = (SocketAddrV4, SocketAddrV4);

/// Where a connection stands.
pub(super) enum Phase {
    /// Outbound: the host connect is in flight; the guest's SYN waits here
    /// and is answered (or reset) once the connect finishes.
    Connecting {
        /// The guest's SYN frame.
        syn: Vec<u8>,
    },
    /// Both sides exist; data flows.
    Open(SocketHandle),
}

/// A proxied connection.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) phase: Phase,
    /// For outbound connections, their key in the stack's tuple index.
    pub(super) tuple: Option<Tuple>,
    /// For inbound connections, the gateway-side port used toward the guest.
    pub(super) local_port: Option<u16>,
    /// The host side sent FIN (read returned 0); smoltcp was told to close.
    host_eof: bool,
    /// The guest's FIN was forwarded with shutdown(Write).
    host_write_shut: bool,
    /// The host socket failed (reset, broken pipe): only the guest side is left.
    host_dead: bool,
    /// The guest side got to ESTABLISHED at some point.
    established: bool,
    /// The guest sent FIN at some point.
    guest_fin: bool,
    /// Close the host socket with a RST rather than a FIN.
    pub(super) reset_host: bool,
    /// Nothing is left to do; remove after the next interface poll.
    pub(super) finished: bool,
}

/// What happened in one host read/write attempt.
enum Io {
    Moved(usize),
    Blocked,
    Failed,
}

fn classify(r: std::io::Result<usize>) -> Io {
    match r {
        Ok(n) => Io::Moved(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
            Io::Blocked
        }
        Err(_) => Io::Failed,
    }
}

impl Conn {
    pub(super) fn new(stream: TcpStream, phase: Phase) -> Self {
        Self {
            stream,
            phase,
            tuple: None,
            local_port: None,
            host_eof: false,
            host_write_shut: false,
            host_dead: false,
            established: false,
            guest_fin: false,
            reset_host: false,
            finished: false,
        }
    }

    /// Moves what can move without blocking, both ways, and propagates
    /// closes. Returns whether anything changed (bytes or state).
    pub(super) fn pump(&mut self, sock: &mut tcp::Socket<'_>) -> bool {
        if self.finished {
            return false;
        }
        let mut progress = false;
        let state = sock.state();
        if !matches!(
            state,
            State::Closed | State::Listen | State::SynSent | State::SynReceived
        ) {
            self.established = true;
        }
        if matches!(
            state,
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            self.guest_fin = true;
        }

        // Guest to host: write straight out of smoltcp's receive buffer; stop
        // when the host socket would block (POLLOUT resumes us).
        while !self.host_dead && sock.can_recv() {
            let stream = &mut self.stream;
            let r = sock.recv(|buf| match classify(stream.write(buf)) {
                Io::Moved(n) => (n, Io::Moved(n)),
                other => (0, other),
            });
            match r {
                Ok(Io::Moved(0)) | Ok(Io::Blocked) | Err(_) => break,
                Ok(Io::Moved(_)) => progress = true,
                Ok(Io::Failed) => {
                    self.host_dead = true;
                    sock.abort();
                    progress = true;
                }
            }
        }
        if self.guest_fin && !sock.can_recv() && !self.host_write_shut && !self.host_dead {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
            progress = true;
        }

        // Host to guest: read straight into smoltcp's send buffer; stop when
        // it is full (the guest's ACKs resume us) or the host has nothing.
        while !self.host_eof && !self.host_dead && sock.can_send() {
            let stream = &mut self.stream;
            let r = sock.send(|buf| {
                if buf.is_empty() {
                    return (0, Io::Blocked);
                }
                match classify(stream.read(buf)) {
                    Io::Moved(n) => (n, Io::Moved(n)),
                    other => (0, other),
                }
            });
            match r {
                Ok(Io::Moved(0)) => {
                    self.host_eof = true;
                    sock.close();
                    progress = true;
                }
                Ok(Io::Moved(_)) => progress = true,
                Ok(Io::Blocked) | Err(_) => break,
                Ok(Io::Failed) => {
                    self.host_dead = true;
                    sock.abort();
                    progress = true;
                }
            }
        }

        match sock.state() {
            State::Closed => {
                // A guest RST (or a refused inbound connect) reaches the host
                // as a RST; an orderly close already went out as a FIN.
                if !self.guest_fin || !self.established {
                    self.reset_host = true;
                }
                self.finished = true;
                progress = true;
            }
            State::TimeWait if self.host_dead || (self.host_eof && self.host_write_shut) => {
                self.finished = true;
                progress = true;
            }
            _ => {}
        }
        progress
    }
}
