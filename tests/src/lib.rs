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

/// Runs the `vmm` release binary with `args`, killing it after `deadline`.
pub fn run_vmm(args: &[&str], deadline: Duration) -> VmmRun {
    let start = Instant::now();
    let mut child = Command::new(release_bin("vmm"))
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
