//! The control socket of a running VM: one [`Command`] per line, one
//! [`Reply`] line each, as [`vmm_api`] defines them; an `accept` carries a
//! TCP socket (SCM_RIGHTS) for the network device.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_api::{Command, Reply, MAX_LINE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::virtio::net::InboundHandle;
use crate::error_chain;
use crate::event_loop::{Event, EventHandler, Ops};
use crate::snapshot::working_set::WorkingSet;
use crate::vmm::{ControlError, GuestExit, VmHandle};

/// The control socket: one [`Command`] per line, one [`Reply`] line each
/// (the protocol is [`vmm_api`]'s).
pub struct ApiServer {
    listener: UnixListener,
    clients: Vec<Option<ApiClient>>,
    handle: Arc<VmHandle>,
    inbound: Option<InboundHandle>,
    pending: Option<PendingSnapshot>,
}

/// One control connection: its socket, unparsed input and the file
/// descriptors passed with it (SCM_RIGHTS), oldest first.
type ApiClient = (UnixStream, Vec<u8>, VecDeque<std::fs::File>);

/// Most descriptors a client may pass ahead of its `accept` commands.
const MAX_PASSED_FDS: usize = 64;

/// A snapshot waiting for device I/O to drain (vCPUs already paused).
struct PendingSnapshot {
    slot: usize,
    path: PathBuf,
    start: Instant,
    was_paused: bool,
    diff: bool,
}

/// How long a snapshot waits for in-flight device I/O.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);
const SNAPSHOT_TIMER: u32 = u32::MAX - 1;

/// Most simultaneous control clients.
const MAX_CLIENTS: usize = 16;
const LISTENER_TOKEN: u32 = u32::MAX;

impl ApiServer {
    /// Serves control clients of `listener` for the VM behind `handle`.
    pub fn new(
        listener: UnixListener,
        handle: Arc<VmHandle>,
        inbound: Option<InboundHandle>,
    ) -> Self {
        Self {
            listener,
            clients: Vec::new(),
            handle,
            inbound,
            pending: None,
        }
    }

    /// Runs a pending snapshot if the devices are quiescent (or gives up
    /// after [`QUIESCE_TIMEOUT`]); returns the client slot and reply when done.
    fn try_finish_snapshot(&mut self, ops: &mut Ops<'_>) -> Option<(usize, Reply)> {
        let pending = self.pending.as_ref()?;
        let result = if ops.all_quiescent() {
            self.handle
                .save_paused(&pending.path, pending.start, pending.diff, ops)
        } else if pending.start.elapsed() < QUIESCE_TIMEOUT {
            ops.timer(SNAPSHOT_TIMER, Duration::from_millis(1));
            return None;
        } else {
            Err(ControlError::NotQuiescent(QUIESCE_TIMEOUT))
        };
        let pending = self.pending.take()?;
        if !pending.was_paused {
            self.handle.resume();
        }
        let reply = match result {
            Ok(s) => Reply::Snapshot {
                state_bytes: s.state_bytes,
                mem_written: s.mem_written,
                mem_len: s.mem_len,
                elapsed: s.elapsed,
            },
            Err(e) => refusal(&e),
        };
        Some((pending.slot, reply))
    }

    fn reply(&mut self, slot: usize, reply: &Reply) {
        if let Some(Some((stream, ..))) = self.clients.get_mut(slot) {
            // Replies are short; a client that does not read is dropped.
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = stream.write_all(format!("{reply}\n").as_bytes());
            let _ = stream.set_nonblocking(true);
        }
    }

    /// Runs one command; `None` when the reply comes later (a snapshot
    /// waiting for devices).
    fn execute(&mut self, slot: usize, command: Command, ops: &mut Ops<'_>) -> Option<Reply> {
        Some(match command {
            Command::Ping => Reply::Pong,
            Command::Pause => match self.handle.pause() {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e.to_string()),
            },
            Command::Resume => {
                self.handle.resume();
                Reply::Ok
            }
            Command::WorkingSet { path } => {
                match WorkingSet::record(self.handle.memory()).and_then(|ws| {
                    ws.save(&path)?;
                    Ok(ws.pages())
                }) {
                    Ok(pages) => Reply::WorkingSet { pages },
                    Err(e) => refusal(&e),
                }
            }
            Command::Snapshot { .. } | Command::SnapshotDiff { .. } if self.pending.is_some() => {
                Reply::Error("a snapshot is already in progress".into())
            }
            Command::Snapshot { path } => return self.snapshot(slot, path, false, ops),
            Command::SnapshotDiff { path } => return self.snapshot(slot, path, true, ops),
            Command::Accept { guest_port } => self.accept(slot, guest_port, ops),
            Command::Connections => match &self.inbound {
                Some(inbound) => {
                    let (open, taken) = inbound.counts();
                    Reply::Connections { open, taken }
                }
                None => Reply::Error("the VM has no network device".into()),
            },
            Command::Quit => {
                self.handle.finish(GuestExit::Quit);
                ops.stop_loop();
                Reply::Ok
            }
            Command::ForbiddenSyscall => Reply::Error(crate::seccomp::forbidden_syscall()),
            Command::Restore { .. } => Reply::Error(
                "restore: this vmm already runs a guest (only a standby vmm restores)".into(),
            ),
        })
    }

    /// Pauses the VM and writes a snapshot once the devices are quiescent;
    /// `None` while they are not.
    fn snapshot(
        &mut self,
        slot: usize,
        path: PathBuf,
        diff: bool,
        ops: &mut Ops<'_>,
    ) -> Option<Reply> {
        let start = Instant::now();
        let was_paused = self.handle.is_paused();
        if let Err(e) = self.handle.pause() {
            return Some(refusal(&e));
        }
        self.pending = Some(PendingSnapshot {
            slot,
            path,
            start,
            was_paused,
            diff,
        });
        self.try_finish_snapshot(ops).map(|(_, reply)| reply)
    }

    /// `accept <guest_port>`: hands the oldest descriptor this client passed
    /// to the network device, through `ops` on this loop. Only TCP sockets
    /// are taken.
    fn accept(&mut self, slot: usize, port: u16, ops: &mut Ops<'_>) -> Reply {
        let Some(Some((_, _, fds))) = self.clients.get_mut(slot) else {
            return Reply::Error("no client".into());
        };
        let Some(file) = fds.pop_front() else {
            return Reply::Error("accept needs a TCP socket passed with SCM_RIGHTS".into());
        };
        let Some(stream) = connected_tcp(file) else {
            return Reply::Error("the passed descriptor is not a connected TCP socket".into());
        };
        match &self.inbound {
            Some(inbound) => {
                inbound.accept_inbound(ops, stream, port);
                Reply::Ok
            }
            None => Reply::Error("the VM has no network device".into()),
        }
    }

    fn serve(&mut self, slot: usize, ops: &mut Ops<'_>) {
        let Some(Some((stream, buf, fds))) = self.clients.get_mut(slot) else {
            return;
        };
        let mut chunk = [0u8; 1024];
        let mut too_many_fds = false;
        let closed = match stream.recv_with_fd(&mut chunk) {
            Ok((0, _)) => true,
            Ok((n, file)) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(file) = file {
                    too_many_fds = fds.len() >= MAX_PASSED_FDS;
                    fds.push_back(file);
                }
                false
            }
            Err(e) => e.errno() != libc::EAGAIN && e.errno() != libc::EINTR,
        };
        let mut lines = Vec::new();
        let mut too_long = too_many_fds;
        if let Some(Some((_, buf, _))) = self.clients.get_mut(slot) {
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                lines.push(String::from_utf8_lossy(&line).trim().to_owned());
            }
            too_long |= buf.len() > MAX_LINE;
        }
        let mut out = Vec::new();
        for line in lines.iter().filter(|l| !l.is_empty()) {
            let reply = match Command::parse(line) {
                Ok(command) => self.execute(slot, command, ops),
                Err(e) => Some(Reply::Error(e.to_string())),
            };
            out.extend(reply);
        }
        if too_long {
            out.push(Reply::Error("command too long".into()));
        }
        for reply in &out {
            self.reply(slot, reply);
        }
        if closed || too_long {
            ops.unwatch(u32::try_from(slot).unwrap_or(0));
            if let Some(entry) = self.clients.get_mut(slot) {
                *entry = None;
            }
        }
    }
}

/// A descriptor passed over the control socket, if it is a connected TCP
/// socket (anything else would have the network stack read a file or a
/// listener as if it were a client).
fn connected_tcp(file: std::fs::File) -> Option<std::net::TcpStream> {
    let stream = std::net::TcpStream::from(std::os::fd::OwnedFd::from(file));
    stream.peer_addr().is_ok().then_some(stream)
}

/// The reply to a command that failed with `e`.
fn refusal(e: &dyn std::error::Error) -> Reply {
    Reply::Error(error_chain(e))
}

impl EventHandler for ApiServer {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(
            self.listener.as_raw_fd(),
            LISTENER_TOKEN,
            libc::POLLIN as u32,
        );
    }

    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        if let Event::Timer {
            token: SNAPSHOT_TIMER,
        } = event
        {
            if let Some((slot, reply)) = self.try_finish_snapshot(ops) {
                self.reply(slot, &reply);
            }
            return;
        }
        let Event::Ready { token, .. } = event else {
            return;
        };
        if token != LISTENER_TOKEN {
            self.serve(usize::try_from(token).unwrap_or(usize::MAX), ops);
            return;
        }
        while let Ok((stream, _)) = self.listener.accept() {
            let Some(slot) = self.clients.iter().position(Option::is_none).or_else(|| {
                (self.clients.len() < MAX_CLIENTS).then(|| {
                    self.clients.push(None);
                    self.clients.len() - 1
                })
            }) else {
                continue;
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            self.clients[slot] = Some((stream, Vec::new(), VecDeque::new()));
            ops.watch(fd, u32::try_from(slot).unwrap_or(0), libc::POLLIN as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    use super::connected_tcp;

    /// What the platform does: pass an accepted TCP socket with an
    /// `accept` line; the VMM side gets the line and a working socket.
    #[test]
    fn a_tcp_socket_passed_with_scm_rights_arrives_connected() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let (platform, vmm) = UnixStream::pair().expect("pair");
        platform
            .send_with_fd(&b"accept 8080\n"[..], accepted.as_raw_fd())
            .expect("send");
        drop(accepted);
        let mut buf = [0u8; 64];
        let (n, file) = vmm.recv_with_fd(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"accept 8080\n");
        let mut stream = connected_tcp(file.expect("a descriptor came along")).expect("tcp");
        stream.write_all(b"hello").expect("write");
        drop(stream);
        let mut got = String::new();
        client.read_to_string(&mut got).expect("read");
        assert_eq!(got, "hello", "the client sees the VMM's copy, then EOF");
    }

    /// A standby VMM answers `ping`, refuses anything but `restore`, and
    /// hands back what a `restore` asked for with the client to tell.
    #[test]
    fn standby_waits_for_restore() {
        use std::time::Duration;
        use vmm_api::{Client, ClientError, Command, Reply};

        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let waiter = {
            let sock = sock.clone();
            std::thread::spawn(move || crate::api::standby::wait_for_restore(&sock))
        };
        let connect = || {
            while !sock.exists() {
                std::thread::sleep(Duration::from_millis(1));
            }
            Client::connect(&sock, Duration::from_secs(10)).expect("connect")
        };
        assert_eq!(
            connect().send(&Command::Ping).expect("ping"),
            Reply::Standby
        );
        match connect().send(&Command::Connections) {
            Err(ClientError::Refused(message)) => assert!(message.contains("restore")),
            other => panic!("a standby vmm only restores: {other:?}"),
        }
        let mut client = connect();
        let restorer = std::thread::spawn(move || {
            client.send(&Command::Restore {
                snapshot: "/a/app.snap".into(),
                working_set: Some("/a/app.ws".into()),
            })
        });
        let (snapshot, working_set, _listener, mut notify) =
            waiter.join().expect("no panic").expect("restore requested");
        assert_eq!(snapshot, std::path::Path::new("/a/app.snap"));
        assert_eq!(working_set.as_deref(), Some("/a/app.ws".as_ref()));
        let running = Reply::Running {
            elapsed: Duration::from_millis(2),
        };
        writeln!(notify, "{running}").expect("tell the client");
        assert_eq!(
            restorer.join().expect("no panic").expect("running"),
            running
        );
    }

    #[test]
    fn files_and_listeners_are_not_taken_as_connections() {
        let file = tempfile::tempfile().expect("tempfile");
        assert!(connected_tcp(file).is_none());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = std::os::fd::OwnedFd::from(listener);
        assert!(connected_tcp(std::fs::File::from(fd)).is_none());
    }
}
