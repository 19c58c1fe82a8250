//! Fixtures for little.cloud's end-to-end tests: where the built artifacts
//! are, how to assemble a guest root filesystem, and how to run `vmm` with a
//! deadline.
//!
//! The tests use release binaries built by `scripts/test.sh` (or
//! `cargo build --release --workspace`) and the kernel built by
//! `guest-kernel/build.sh`; a missing artifact fails the test with the
//! command that makes it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use image_tools::initramfs::Initramfs;

pub mod client;

pub use client::{http_get, wait_for_http, RequestError};

/// How long an end-to-end wait may last before the test calls it a hang.
///
/// Every wait in these tests returns as soon as its event happens (a line
/// on the console, the agent's READY, a socket answering, the daemon's
/// state changing); these ceilings never pace a test, they only turn a
/// hang into a failure that says what it waited for. They are set far
/// above the slowest host seen (a nested, emulated KVM host with one of
/// its two cores kept busy), so no test depends on how fast this host is.
pub mod ceiling {
    use std::time::Duration;

    /// A real kernel boot up to its app serving (or its agent's READY).
    pub const BOOT: Duration = Duration::from_secs(600);
    /// One step of a running guest: a request answered, a line printed.
    pub const GUEST: Duration = Duration::from_secs(300);
    /// Host-side work: a control command answered, a process exiting, the
    /// daemon's state changing.
    pub const HOST: Duration = Duration::from_secs(60);
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn require(path: PathBuf, how: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `{how}` first (scripts/test.sh does it all)",
        path.display()
    );
    path
}

/// The guest kernel (`LITTLE_VMLINUX`, or the one `guest-kernel/build.sh` linked).
pub fn kernel() -> PathBuf {
    let path = std::env::var_os("LITTLE_VMLINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest-kernel/vmlinux"));
    require(path, "guest-kernel/build.sh")
}

/// A release binary of this workspace.
pub fn release_bin(name: &str) -> PathBuf {
    require(
        target_dir().join("release").join(name),
        "cargo build --release --workspace",
    )
}

/// Debian's static busybox (package busybox-static).
pub fn busybox() -> PathBuf {
    require(
        PathBuf::from("/bin/busybox"),
        "apt-get install busybox-static",
    )
}

/// Writes an initramfs with the agent as /init, `agent_conf` as its
/// configuration and busybox as /bin/busybox (+ /bin/sh), into `dir`.
pub fn agent_initramfs(dir: &Path, agent_conf: &str) -> PathBuf {
    let mut fs = Initramfs::new();
    for d in [
        "/bin", "/dev", "/etc", "/proc", "/sys", "/tmp", "/run", "/root", "/little",
    ] {
        fs.dir(d, 0o755).expect("fresh directory");
    }
    fs.char_dev("/dev/console", 0o600, 5, 1)
        .expect("console node");
    fs.host_file("/init", 0o755, &release_bin("guest-agent"))
        .expect("agent readable");
    fs.file("/little/agent.conf", 0o644, agent_conf.as_bytes().to_vec())
        .expect("config");
    fs.host_file("/bin/busybox", 0o755, &busybox())
        .expect("busybox readable");
    fs.symlink("/bin/sh", "busybox").expect("sh link");
    let out = dir.join("initramfs.cpio");
    fs.write_file(&out).expect("initramfs written");
    out
}

/// What a finished (or killed) `vmm` run left behind.
#[derive(Debug)]
pub struct VmmRun {
    /// Exit status, `None` if it was killed at the deadline.
    pub status: Option<ExitStatus>,
    /// Everything written to stdout (the guest console).
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// Wall time until exit or kill.
    pub elapsed: Duration,
}

/// Runs the `vmm` release binary with `args` under its seccomp filters
/// (`--seccomp`, as the platform runs it), killing it after `deadline`.
pub fn run_vmm(args: &[&str], deadline: Duration) -> VmmRun {
    let start = Instant::now();
    let mut child = Command::new(release_bin("vmm"))
        .arg("--seccomp")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait on vmm") {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    VmmRun {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// A `vmm` process the test talks to while it runs: stdin is a pipe,
/// stdout (the guest console) and stderr are collected as they arrive.
pub struct VmmProcess {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

fn collect(mut from: impl Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<String>> {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&chunk[..n]).into_owned();
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&text);
        }
    });
    buf
}

impl VmmProcess {
    /// Starts the `vmm` release binary with `args`, under its seccomp
    /// filters (`--seccomp`, as the platform runs it).
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(release_bin("vmm"))
            .arg("--seccomp")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vmm starts");
        let stdin = child.stdin.take();
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Everything the guest console printed so far.
    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Everything on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until stdout contains `needle`: how long that took, or why it
    /// never came (the process exited, or `ceiling` passed), with the
    /// console and stderr so far.
    pub fn wait_for(&mut self, needle: &str, ceiling: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            if self.stdout().contains(needle) {
                return Ok(start.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The readers may still hold the last output.
                std::thread::sleep(Duration::from_millis(100));
                if self.stdout().contains(needle) {
                    return Ok(start.elapsed());
                }
                return Err(format!(
                    "vmm exited ({status}) after {:.1?} without printing {needle:?}\n{}",
                    start.elapsed(),
                    self.output()
                ));
            }
            if start.elapsed() > ceiling {
                return Err(format!(
                    "timed out after {:.1?} waiting for {needle:?}\n{}",
                    start.elapsed(),
                    self.output()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The console and stderr so far, labelled, for failure messages.
    pub fn output(&self) -> String {
        format!("console:\n{}\nstderr:\n{}", self.stdout(), self.stderr())
    }

    /// Writes to the guest's console input (needs `--console-input`).
    pub fn send(&mut self, text: &str) {
        use std::io::Write;
        if let Some(stdin) = self.stdin.as_mut() {
            stdin.write_all(text.as_bytes()).expect("vmm stdin open");
            stdin.flush().expect("flush");
        }
    }

    /// Waits for the process to exit, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one control command, written as on the wire (`"snapshot <path>"`),
/// to a `vmm --api-sock` and returns the reply line: `ok ...`, or
/// `error <message>` when the VMM refused.
pub fn api(sock: &Path, command: &str) -> String {
    use vmm_api::{Client, ClientError, Command, Reply};
    let command =
        Command::parse(command).unwrap_or_else(|e| panic!("{command:?} is no command: {e}"));
    let mut vmm = Client::connect(sock, ceiling::HOST).expect("control socket");
    match vmm.send(&command) {
        Ok(reply) => reply.to_string(),
        Err(ClientError::Refused(message)) => Reply::Error(message).to_string(),
        Err(e) => panic!(
            "no reply to \"{command}\" within {:?}: {}",
            ceiling::HOST,
            vmm::error_chain(&e)
        ),
    }
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Waits up to `timeout` for a connection on `listener` (a host-side vsock
/// port socket, say); the stream it returns blocks, with reads timing out
/// after `read_timeout`.
pub fn accept_within(
    listener: &std::os::unix::net::UnixListener,
    timeout: Duration,
    read_timeout: Duration,
) -> Option<std::os::unix::net::UnixStream> {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok((stream, _)) = listener.accept() {
            stream.set_nonblocking(false).expect("blocking stream");
            stream
                .set_read_timeout(Some(read_timeout))
                .expect("read timeout");
            return Some(stream);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// One line without its line ending, or `None` at EOF or on an error.
pub fn read_line(reader: &mut impl std::io::BufRead) -> Option<String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim_end().to_owned()),
        _ => None,
    }
}
