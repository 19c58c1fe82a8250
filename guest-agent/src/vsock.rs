//! The agent's end of the host channel (`guest_agent::protocol`): one
//! vsock stream to the host, opened at boot if the VM has a vsock device
//! and the host listens. Without it the agent works as before, reporting
//! on the console only.

use crate::sys::sock::{self, PollFd, POLLIN};
use crate::sys::{self, Errno, O_RDWR};
use guest_agent::protocol::{AgentMsg, HostMsg, LineReader, AGENT_PORT, HOST_CID, VERSION};
use guest_agent::report::LineBuf;
use guest_agent::status::ExitStatus;

use crate::ready::Readiness;

/// How long the agent waits for the host to hang up after `EXIT` before
/// restarting the VM, so the line leaves the guest first.
const FLUSH_MS: u64 = 200;

/// The open channel.
pub struct Channel {
    fd: i32,
    lines: LineReader,
}

impl Channel {
    /// Connects and says `HELLO`; `None` if there is no device, no
    /// listener, or the host went away.
    pub fn open() -> Option<Self> {
        let fd = sock::vsock_connect(HOST_CID, AGENT_PORT).ok()?;
        let mut channel = Self {
            fd,
            lines: LineReader::new(),
        };
        channel.send(AgentMsg::Hello { version: VERSION }).ok()?;
        Some(channel)
    }

    /// The fd to poll for host lines.
    pub fn pollfd(&self) -> PollFd {
        PollFd {
            fd: self.fd,
            events: POLLIN,
            revents: 0,
        }
    }

    /// Sends one line (a single write).
    pub fn send(&mut self, msg: AgentMsg<'_>) -> sys::Result<()> {
        sys::write_all(self.fd, LineBuf::<128>::line(msg).as_bytes())
    }

    /// Reads what the host sent and answers it. `Err` once the host is
    /// gone: the caller drops the channel.
    pub fn readable(&mut self) -> sys::Result<()> {
        let n = sys::read(self.fd, self.lines.spare())?;
        if n == 0 {
            return Err(sys::EBADF);
        }
        self.lines.filled(n);
        let mut replies: [Option<Reply>; 4] = [None; 4];
        let mut count = 0;
        while let Some(line) = self.lines.next_line() {
            let reply = match line.map(HostMsg::parse) {
                Ok(Ok(HostMsg::Ping { nonce })) => Reply::pong(nonce),
                Ok(Ok(HostMsg::Restored { unix_ns, entropy })) => {
                    restored(unix_ns, entropy.as_bytes());
                    Reply::Resumed
                }
                // Unknown lines are ignored, so the host may add messages.
                _ => continue,
            };
            if count == replies.len() {
                self.flush_replies(&replies)?;
                replies = [None; 4];
                count = 0;
            }
            replies[count] = Some(reply);
            count += 1;
        }
        self.flush_replies(&replies)
    }

    fn flush_replies(&mut self, replies: &[Option<Reply>]) -> sys::Result<()> {
        for reply in replies.iter().flatten() {
            match reply {
                Reply::Pong { nonce, len } => {
                    self.send(AgentMsg::Pong {
                        nonce: &nonce[..*len],
                    })?;
                }
                Reply::Resumed => self.send(AgentMsg::Resumed)?,
            }
        }
        Ok(())
    }

    /// Sends the entrypoint's `EXIT` line and half-closes the stream.
    pub fn exit(&mut self, msg: AgentMsg<'_>) {
        let _ = self.send(msg);
        sock::shutdown_write(self.fd);
    }

    /// Gives the host up to [`FLUSH_MS`] to hang up, so the last line is
    /// out of the guest before the VM restarts.
    pub fn linger(self) {
        let deadline = sys::monotonic_ms().saturating_add(FLUSH_MS);
        let mut buf = [0u8; 64];
        loop {
            let now = sys::monotonic_ms();
            if now >= deadline {
                break;
            }
            let mut fds = [self.pollfd()];
            match sock::poll(&mut fds, Some(deadline - now)) {
                Ok(0) => continue,
                Ok(_) => {
                    if !matches!(sys::read(self.fd, &mut buf), Ok(n) if n > 0) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        sys::close(self.fd);
    }
}

/// A reply owed, copied out of the line buffer.
#[derive(Clone, Copy)]
enum Reply {
    Pong {
        nonce: [u8; guest_agent::protocol::MAX_NONCE],
        len: usize,
    },
    Resumed,
}

impl Reply {
    fn pong(nonce: &[u8]) -> Self {
        let mut buf = [0u8; guest_agent::protocol::MAX_NONCE];
        let len = nonce.len().min(buf.len());
        buf[..len].copy_from_slice(&nonce[..len]);
        Self::Pong { nonce: buf, len }
    }
}

/// Applies a snapshot restore: the clock, then fresh entropy.
fn restored(unix_ns: u64, entropy: &[u8]) {
    let _ = sock::set_realtime(unix_ns);
    if let Ok(fd) = sys::open(c"/dev/urandom", O_RDWR) {
        // The host's bytes into the input pool, then a new CRNG key from
        // it: each clone of one snapshot draws its own stream from here.
        let _ = sock::add_entropy(fd, entropy);
        let _ = sock::reseed_crng(fd);
        sys::close(fd);
    }
}

/// Wait after the first, immediate, reconnect try of a lost channel;
/// doubled after each try.
const RECONNECT_FIRST_MS: u64 = 20;
/// Reconnect tries before the agent carries on without a channel (at
/// once, then after 20 ms, 40 ms, ... 1.28 s: about 2.5 s in all). The
/// first is immediate: after a restore the host listens already, and
/// waits for this channel before the instance gets a connection.
const RECONNECT_TRIES: u8 = 8;

/// A lost channel being re-opened: the next try and what is left.
#[derive(Clone, Copy)]
struct Reconnect {
    at: u64,
    delay: u64,
    tries_left: u8,
}

/// The channel (if any) and the readiness it reports, as the supervise
/// loop drives them.
pub struct HostLink {
    channel: Option<Channel>,
    /// The entrypoint's readiness checks, run until they pass, the
    /// entrypoint ends or the channel is gone for good: how long to wait
    /// is the host's decision (an emulated guest may take minutes to start
    /// a database), not the agent's.
    readiness: Readiness,
    /// The entrypoint was reported ready (said again after a reconnect).
    ready: bool,
    /// The channel broke (a snapshot restore resets every vsock stream):
    /// when to try again.
    reconnect: Option<Reconnect>,
}

impl HostLink {
    /// No channel: the supervise loop behaves as without vsock.
    pub fn none() -> Self {
        Self {
            channel: None,
            readiness: Readiness::at_exec(),
            ready: false,
            reconnect: None,
        }
    }

    /// Opens the channel (silently absent without device or listener).
    pub fn open(readiness: Readiness) -> Self {
        Self {
            channel: Channel::open(),
            readiness,
            ready: false,
            reconnect: None,
        }
    }

    /// Whether the loop must poll the channel beside the signalfd (or
    /// wake up to re-open it).
    pub fn active(&self) -> bool {
        self.channel.is_some() || self.reconnect.is_some()
    }

    /// The entrypoint was exec'd: the readiness checks start (`READY`
    /// now if there are none).
    pub fn started(&mut self) {
        self.readiness.start();
        self.probe();
    }

    fn report_ready(&mut self) {
        self.ready = true;
        self.send(AgentMsg::Ready);
    }

    /// How long the loop may sleep.
    pub fn timeout(&self) -> Option<u64> {
        let probe = self.readiness.timeout();
        let reconnect = self
            .reconnect
            .map(|r| r.at.saturating_sub(sys::monotonic_ms()));
        match (probe, reconnect) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs what is due after a wake-up: the readiness probe, and a
    /// reconnect try.
    pub fn tick(&mut self) {
        self.probe();
        let Some(r) = self.reconnect else {
            return;
        };
        let now = sys::monotonic_ms();
        if now < r.at {
            return;
        }
        self.try_reconnect(now, r);
    }

    /// One try at re-opening the channel: `HELLO` again (and `READY` if
    /// the entrypoint was ready), so the host on the other end, which may
    /// be a different one after a restore, learns the state.
    fn try_reconnect(&mut self, now: u64, r: Reconnect) {
        self.reconnect = None;
        self.channel = Channel::open();
        if self.channel.is_some() {
            if self.ready {
                self.send(AgentMsg::Ready);
            }
            return;
        }
        if r.tries_left > 1 {
            let delay = r.delay.saturating_mul(2);
            self.reconnect = Some(Reconnect {
                at: now.saturating_add(r.delay),
                delay,
                tries_left: r.tries_left - 1,
            });
        } else {
            // Nobody listens: carry on as without a channel.
            self.readiness.abandon();
        }
    }

    /// The channel's poll entry (a negative fd, ignored by poll, if gone).
    pub fn pollfd(&self) -> PollFd {
        self.channel.as_ref().map_or(
            PollFd {
                fd: -1,
                ..PollFd::default()
            },
            Channel::pollfd,
        )
    }

    /// Runs the readiness checks that are due.
    fn probe(&mut self) {
        if self.readiness.check() {
            self.report_ready();
        }
    }

    /// The pid of the ready command's run under way, for the reaper.
    pub fn ready_command(&self) -> Option<i32> {
        self.readiness.running()
    }

    /// The ready command's run ended with `status`.
    pub fn ready_command_exited(&mut self, status: Option<ExitStatus>) {
        if self.readiness.exited(status) {
            self.report_ready();
        }
    }

    /// The channel is readable: answer the host, or re-open a dead channel.
    pub fn readable(&mut self) {
        if let Some(channel) = &mut self.channel {
            if channel.readable().is_err() {
                self.lost();
            }
        }
    }

    fn send(&mut self, msg: AgentMsg<'_>) {
        if let Some(channel) = &mut self.channel {
            if channel.send(msg).is_err() {
                self.lost();
            }
        }
    }

    /// The host hung up or the stream was reset (ECONNRESET after a
    /// snapshot restore, whose VMM carries no vsock stream over): close it
    /// and reconnect shortly, with a doubling delay and a bounded number
    /// of tries.
    fn lost(&mut self) {
        if let Some(channel) = self.channel.take() {
            sys::close(channel.fd);
        }
        self.reconnect = Some(Reconnect {
            at: sys::monotonic_ms(),
            delay: RECONNECT_FIRST_MS,
            tries_left: RECONNECT_TRIES,
        });
    }

    /// Reports the entrypoint's end (`EXIT`).
    pub fn exited(&mut self, status: ExitStatus) {
        self.readiness.abandon();
        if let Some(r) = self.reconnect {
            // The channel was being re-opened: one last try, now.
            self.try_reconnect(sys::monotonic_ms(), r);
            self.reconnect = None;
        }
        if let Some(channel) = &mut self.channel {
            channel.exit(AgentMsg::Exit(status));
        }
    }

    /// Lets the last line leave the guest, then closes.
    pub fn close(mut self) {
        if let Some(channel) = self.channel.take() {
            channel.linger();
        }
    }
}

fn console_line(line: core::fmt::Arguments<'_>) {
    let _ = sys::write_all(1, LineBuf::<256>::line(line).as_bytes());
}

/// `--vsock-test LISTEN HOSTPORT TCPPORT` (see `host.rs`); returns the
/// exit code.
pub fn self_test(listen: &[u8], host_port: &[u8], tcp_port: &[u8]) -> u8 {
    use guest_agent::config::parse_u32;
    let (Some(listen), Some(host_port), Some(tcp_port)) = (
        parse_u32(listen),
        parse_u32(host_port),
        parse_u32(tcp_port).and_then(|p| u16::try_from(p).ok()),
    ) else {
        console_line(format_args!("vsock-test: bad arguments"));
        return 2;
    };
    // Guest -> host, beside the agent's own channel.
    match sock::vsock_connect(HOST_CID, host_port) {
        Ok(fd) => {
            let _ = sys::write_all(fd, b"hello from the guest\n");
            let mut lines = LineReader::new();
            let reply = loop {
                match sys::read(fd, lines.spare()) {
                    Ok(n) if n > 0 => lines.filled(n),
                    _ => break None,
                }
                if let Some(Ok(line)) = lines.next_line() {
                    break Some(LineBuf::<128>::line(format_args!(
                        "vsock-test: host said {}",
                        core::str::from_utf8(line).unwrap_or("?")
                    )));
                }
            };
            if let Some(reply) = reply {
                let _ = sys::write_all(1, reply.as_bytes());
            }
            sys::close(fd);
        }
        Err(Errno(errno)) => {
            console_line(format_args!("vsock-test: connect failed: errno {errno}"))
        }
    }
    // Ready for the agent's probe only now.
    let _tcp = sock::tcp_listen_loopback(tcp_port);
    // Host -> guest: one echoed stream.
    let server = match sock::vsock_listen(listen) {
        Ok(fd) => fd,
        Err(Errno(errno)) => {
            console_line(format_args!("vsock-test: listen failed: errno {errno}"));
            return 1;
        }
    };
    let Ok(conn) = sock::accept(server) else {
        return 1;
    };
    let mut buf = [0u8; 4096];
    loop {
        match sys::read(conn, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if sys::write_all(conn, &buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    sys::close(conn);
    console_line(format_args!("vsock-test: echo done"));
    0
}
