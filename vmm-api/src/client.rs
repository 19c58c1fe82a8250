//! A blocking client of a VMM's control socket.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{Command, ParseReplyError, Reply, MAX_LINE};

/// How long [`Client::connect`] retries a socket that exists but does not
/// listen yet: the file appears at bind(2), a moment before listen(2).
const LISTEN_GRACE: Duration = Duration::from_secs(1);

/// Why a command got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control socket could not be reached.
    #[error("cannot connect to the control socket {}", .0.display())]
    Connect(PathBuf, #[source] std::io::Error),
    /// Writing the command or reading the reply failed (or timed out).
    #[error("the control socket failed")]
    Io(#[from] std::io::Error),
    /// The VMM hung up before its reply was complete.
    #[error("the vmm closed the control socket before replying")]
    Closed,
    /// The command does not fit one line (a path with a line break, or too
    /// long).
    #[error("the command {0:?} does not fit one line of fewer than {MAX_LINE} bytes")]
    CommandLine(String),
    /// The reply line is too long, or not a reply.
    #[error("the vmm's reply is not understood")]
    Reply(#[from] ParseReplyError),
    /// The VMM answered `error <message>`.
    #[error("the vmm refused: {0}")]
    Refused(String),
    /// The VMM answered with a reply to another command.
    #[error("the vmm answered \"{0}\", which does not answer the command")]
    Unexpected(Reply),
}

impl ClientError {
    /// Whether the connection is unusable after this error: a reply may be
    /// left half read, and later replies would not match their commands.
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            Self::Connect(..) | Self::Io(_) | Self::Closed | Self::Reply(ParseReplyError::TooLong)
        )
    }
}

/// One connection to a VMM's control socket: commands go out one at a
/// time, each waits for its reply.
///
/// ```no_run
/// use std::time::Duration;
/// use vmm_api::{Client, Command, Reply};
///
/// let mut vmm = Client::connect("/tmp/vm/api.sock".as_ref(), Duration::from_secs(5))?;
/// if let Reply::Connections { open, .. } = vmm.send(&Command::Connections)? {
///     println!("{open} connections");
/// }
/// # Ok::<(), vmm_api::ClientError>(())
/// ```
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    /// Bytes read past the last reply's newline.
    pending: Vec<u8>,
}

impl Client {
    /// Connects to the control socket at `path`; each later read and write
    /// gives up after `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && start.elapsed() < LISTEN_GRACE =>
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(ClientError::Connect(path.to_owned(), e)),
            }
        };
        let client = Self {
            stream,
            pending: Vec::new(),
        };
        client.set_timeout(timeout)?;
        Ok(client)
    }

    /// Changes how long a read or a write may wait.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), ClientError> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        Ok(())
    }

    /// Sends `command` and reads its reply. An `error` reply is
    /// [`ClientError::Refused`]; any other reply answers `command` (see
    /// [`Reply::answers`]).
    pub fn send(&mut self, command: &Command) -> Result<Reply, ClientError> {
        let line = Self::line(command)?;
        self.stream.write_all(&line)?;
        self.reply(command)
    }

    /// Sends `command` with a copy of the descriptor `fd` (SCM_RIGHTS), as
    /// [`Command::Accept`] needs, and reads its reply like [`send`](Self::send).
    pub fn send_with_fd(&mut self, command: &Command, fd: impl AsFd) -> Result<Reply, ClientError> {
        let line = Self::line(command)?;
        let sent = self
            .stream
            .send_with_fd(&line[..], fd.as_fd().as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.stream
            .write_all(line.get(sent..).unwrap_or_default())?;
        self.reply(command)
    }

    /// The command's line with its newline.
    fn line(command: &Command) -> Result<Vec<u8>, ClientError> {
        let mut line = command.to_string();
        if line.contains(['\n', '\r']) || line.len() >= MAX_LINE {
            return Err(ClientError::CommandLine(line));
        }
        line.push('\n');
        Ok(line.into_bytes())
    }

    fn reply(&mut self, command: &Command) -> Result<Reply, ClientError> {
        let mut chunk = [0u8; 512];
        let line = loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                break line;
            }
            if self.pending.len() >= MAX_LINE {
                return Err(ParseReplyError::TooLong.into());
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.pending.extend_from_slice(&chunk[..n]);
        };
        match Reply::parse(&String::from_utf8_lossy(&line))? {
            Reply::Error(message) => Err(ClientError::Refused(message)),
            reply if reply.answers(command) => Ok(reply),
            reply => Err(ClientError::Unexpected(reply)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixListener;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A control socket that answers each line with the next of `replies`,
    /// and reports the lines it read (and whether a descriptor came along).
    fn fake_vmm(
        replies: &[&str],
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<(String, bool)>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let replies: Vec<String> = replies.iter().map(|r| r.to_string()).collect();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let mut buf = [0u8; MAX_LINE];
                let (n, fd) = stream.recv_with_fd(&mut buf).unwrap();
                seen.push((
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                    fd.is_some(),
                ));
                (&stream).write_all(reply.as_bytes()).unwrap();
            }
            seen
        });
        (dir, path, server)
    }

    #[test]
    fn replies_come_back_typed() {
        let (_dir, path, server) = fake_vmm(&["ok open=2 taken=5\n", "ok pong\n"]);
        let mut client = Client::connect(&path, TIMEOUT).unwrap();
        assert_eq!(
            client.send(&Command::Connections).unwrap(),
            Reply::Connections { open: 2, taken: 5 }
        );
        assert_eq!(client.send(&Command::Ping).unwrap(), Reply::Pong);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [("connections\n".into(), false), ("ping\n".into(), false)]
        );
    }

    #[test]
    fn an_error_reply_is_a_refusal_with_the_vmms_message() {
        let (_dir, path, server) = fake_vmm(&["error the VM has no network device\n"]);
        let mut client = Client::connect(&path, TIMEOUT).unwrap();
        match client.send(&Command::Connections) {
            Err(ClientError::Refused(message)) => {
                assert_eq!(message, "the VM has no network device");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        server.join().unwrap();
    }

    #[test]
    fn a_reply_to_another_command_is_unexpected() {
        let (_dir, path, server) = fake_vmm(&["ok pages=3\n"]);
        let mut client = Client::connect(&path, TIMEOUT).unwrap();
        let error = client.send(&Command::Quit).unwrap_err();
        assert!(matches!(
            error,
            ClientError::Unexpected(Reply::WorkingSet { pages: 3 })
        ));
        assert!(!error.breaks_connection(), "the whole reply line was read");
        server.join().unwrap();
    }

    #[test]
    fn a_hang_up_before_the_newline_is_closed() {
        let (_dir, path, server) = fake_vmm(&["ok pon"]);
        let mut client = Client::connect(&path, TIMEOUT).unwrap();
        let result = client.send(&Command::Ping);
        server.join().unwrap();
        assert!(matches!(result, Err(ClientError::Closed)), "{result:?}");
        assert!(result.unwrap_err().breaks_connection());
    }

    #[test]
    fn an_endless_reply_is_cut_off() {
        let (_dir, path, server) = fake_vmm(&[&"x".repeat(3 * MAX_LINE)]);
        let mut client = Client::connect(&path, TIMEOUT).unwrap();
        let result = client.send(&Command::Ping);
        assert!(
            matches!(result, Err(ClientError::Reply(ParseReplyError::TooLong))),
            "{result:?}"
        );
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn a_command_that_is_not_one_line_is_not_sent() {
        let (_dir, path, _server) = fake_vmm(&[]);
        let mut client = Client::connect(&path, TIMEOUT).unwrap();
        let sneaky = Command::Snapshot {
            path: "/tmp/a\nquit".into(),
        };
        assert!(matches!(
            client.send(&sneaky),
            Err(ClientError::CommandLine(_))
        ));
        let long = Command::Snapshot {
            path: "a".repeat(MAX_LINE).into(),
        };
        assert!(matches!(
            client.send(&long),
            Err(ClientError::CommandLine(_))
        ));
    }

    #[test]
    fn accept_passes_a_tcp_socket_along() {
        let (_dir, path, server) = fake_vmm(&["ok\n"]);
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let mut client = Client::connect(&path, TIMEOUT).unwrap();
        let reply = client
            .send_with_fd(&Command::Accept { guest_port: 8080 }, &stream)
            .unwrap();
        assert_eq!(reply, Reply::Ok);
        assert_eq!(server.join().unwrap(), [("accept 8080\n".into(), true)]);
    }

    #[test]
    fn connecting_to_no_socket_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.sock");
        let error = Client::connect(&path, TIMEOUT).unwrap_err();
        assert!(matches!(error, ClientError::Connect(..)));
        assert!(error.to_string().contains("missing.sock"), "{error}");
    }

    #[test]
    fn a_restore_reads_the_running_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut client = Client {
            stream: a,
            pending: Vec::new(),
        };
        client.set_timeout(TIMEOUT).unwrap();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            BufReader::new(&b).read_line(&mut line).unwrap();
            (&b).write_all(b"ok running 3.000\n").unwrap();
            line
        });
        let restore = Command::Restore {
            snapshot: "/a/app.snap".into(),
            working_set: None,
        };
        assert_eq!(
            client.send(&restore).unwrap(),
            Reply::Running {
                elapsed: Duration::from_millis(3)
            }
        );
        assert_eq!(reader.join().unwrap(), "restore /a/app.snap\n");
    }
}
