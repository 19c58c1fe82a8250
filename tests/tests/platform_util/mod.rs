//! A `little serve` daemon on a fresh home for the platform tests, and the
//! `little` CLI around it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use little_tests::{ceiling, free_port, kernel, release_bin, target_dir};
use platform::api::AppStatus;

/// The body of a 200 reply to `GET path` on the app at `port`, or a
/// panic that says what came back instead.
pub fn get(port: u16, path: &str) -> String {
    let reply = little_tests::http_get(port, path)
        .unwrap_or_else(|e| panic!("GET {path} on 127.0.0.1:{port}: {e}"));
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "GET {path} on 127.0.0.1:{port}: not a 200:\n{reply}"
    );
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_else(|| panic!("GET {path} on 127.0.0.1:{port}: no end of headers:\n{reply:?}"))
}

/// A running daemon, killed on drop.
pub struct Daemon {
    pub home: PathBuf,
    pub metrics: u16,
    child: Child,
}

impl Daemon {
    pub fn start(home: &Path) -> Self {
        Self::start_with(home, &[])
    }

    /// Starts `little serve` with `extra` serve flags (`--standby 0`).
    pub fn start_with(home: &Path, extra: &[&str]) -> Self {
        let metrics = free_port();
        let child = Command::new(release_bin("little"))
            .arg("--home")
            .arg(home)
            .arg("serve")
            .arg("--kernel")
            .arg(kernel())
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("little serve starts");
        let sock = home.join("little.sock");
        wait_until("the daemon to answer on little.sock", ceiling::HOST, || {
            platform::api::ps(&sock).is_ok()
        });
        Self {
            home: home.to_owned(),
            metrics,
            child,
        }
    }

    pub fn little(&self, args: &[&str]) -> Output {
        Command::new(release_bin("little"))
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .output()
            .expect("little runs")
    }

    pub fn ps(&self) -> Vec<AppStatus> {
        platform::api::ps(&self.home.join("little.sock")).expect("ps")
    }

    pub fn app(&self, name: &str) -> AppStatus {
        self.ps()
            .into_iter()
            .find(|a| a.spec.name == name)
            .expect("app listed")
    }

    /// Kills the daemon (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends the daemon SIGTERM and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id();
        // SAFETY: kill(2) with the pid of this test's own unreaped child
        // and a valid signal number.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let mut status = None;
        wait_until("the daemon to exit on SIGTERM", ceiling::HOST, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status.expect("the daemon exited")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The value of the metric line that starts with `series` (such as
    /// `little_failed_total{app="web"}`).
    pub fn metric(&self, series: &str) -> u64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
    }

    /// The metrics text.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    /// `vmm` processes started for this home.
    pub fn vmm_processes(&self) -> Vec<u32> {
        let marker = self.home.join("apps").display().to_string();
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).into_owned();
                (cmd.split('\0').next()?.ends_with("vmm") && cmd.contains(&marker)).then_some(pid)
            })
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        // Its instances and standby VMMs are its children's business: stop
        // them too so a failed test leaves nothing running.
        for pid in self.vmm_processes() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        // And its cgroup tree, which a killed daemon leaves behind.
        let tree = platform::cgroup::tree_name(&self.home);
        if let Some(tree) = platform::cgroup::Cgroups::find(&tree) {
            tree.remove();
        }
    }
}

/// A test image's OCI layout, or `None` (with a note) when it was not built.
pub fn test_image(name: &str) -> Option<PathBuf> {
    let path = target_dir().join("test-images").join(format!("{name}.oci"));
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "{} is missing: run image-tools/test-images/build.sh (scripts/setup.sh does)",
            path.display()
        );
        None
    }
}

/// Waits until `check` holds, polling every 20 ms; `ceiling` only catches
/// a hang. Returns how long it took.
pub fn wait_until(what: &str, ceiling: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < ceiling,
            "timed out after {:.1?} waiting for {what}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// A boot's deadline in the tests, unless one says otherwise: a ceiling
/// that only catches a hang, for a database booting on the slowest
/// nested, emulated host (the platform's default is 2 minutes).
pub const READY_TIMEOUT: [&str; 2] = ["--ready-timeout", "15m"];

/// `little deploy NAME --image IMAGE --port PORT --listen LISTEN EXTRA...`
/// (with [`READY_TIMEOUT`] unless `extra` has its own) as owned arguments
/// (see [`args`]).
pub fn deploy_args(
    name: &str,
    image: &str,
    port: &str,
    listen: &str,
    extra: &[&str],
) -> Vec<String> {
    let ready: &[&str] = if extra.contains(&READY_TIMEOUT[0]) {
        &[]
    } else {
        &READY_TIMEOUT
    };
    [
        "deploy", name, "--image", image, "--port", port, "--listen", listen,
    ]
    .iter()
    .chain(ready)
    .chain(extra)
    .map(|a| a.to_string())
    .collect()
}

/// `&str`s of `v`.
pub fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs `little ARGS`; its stdout, or a panic with its stderr.
pub fn little_ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.little(args);
    assert!(
        out.status.success(),
        "little {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `little ARGS`, which must fail; its stderr.
pub fn little_err(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.little(args);
    assert!(
        !out.status.success(),
        "little {} should fail: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Bytes a file takes on disk (holes are free).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    meta.blocks() * 512
}

/// Waits for app `name` to have no instance (its idle timeout passed).
pub fn wait_for_zero(daemon: &Daemon, name: &str) {
    wait_until(
        &format!("{name} to scale to zero after its idle timeout"),
        ceiling::HOST,
        || daemon.app(name).instances.is_empty(),
    );
}

/// Sends SIGKILL to process `pid` (a VMM the daemon reported).
pub fn kill9(pid: u32) {
    // SAFETY: kill(2) on a pid the test got from its own daemon; no
    // memory is involved.
    let killed = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(
        killed,
        0,
        "kill -9 {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// The pid of app `name`'s one running instance.
pub fn only_instance(daemon: &Daemon, name: &str) -> u32 {
    let app = daemon.app(name);
    let [instance] = app.instances.as_slice() else {
        panic!("one instance serves {name}: {:?}", app.instances);
    };
    instance.pid
}
