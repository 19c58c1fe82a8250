//! Multi-tenant isolation end to end: one `little serve`, started under
//! umask 022, and three deploys.
//!
//! - The busybox httpd test image, woken once: its instance's VMM has no
//!   capabilities, no_new_privs and the app's own uid, its own mount, PID,
//!   IPC and UTS namespaces, a cgroup whose memory limit is the app's
//!   memory plus the VMM's overhead, and a root that holds only its own
//!   files.
//! - A second `little serve` on the same home refuses to start and leaves
//!   the first one serving.
//! - The home, the API socket, the database and the snapshot are
//!   owner-only.
//! - The instance's VMM, told to make a forbidden system call (the
//!   test-only `fault-injection` build), is killed by its seccomp filter;
//!   `little ps` and `/metrics` say so and a new instance serves.
//! - A probe variant of the httpd image connects, from inside the guest, to
//!   the daemon's metrics port, the first app's port and a listener on the
//!   host's loopback (all as 10.0.2.2), a listener on the host's own
//!   address, and cloud metadata: at its first boot (the deploy) and again
//!   in a woken instance (a CGI script). Each is refused and no host
//!   listener sees a connection. The same image deployed with
//!   `--allow-host 127.0.0.1:PORT` reaches that one listener, and only it.

// A test's helpers are not all used by every test file.
#[allow(dead_code)]
mod platform_util;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image_tools::test_utils::{extend_layout, LayerBuilder};
use little_tests::{ceiling, free_port, kernel, release_bin};
use platform::api::AppStatus;
use platform_util::{get, test_image, wait_until, Daemon};

/// Guest memory of every app here, MiB.
const MEMORY_MIB: u32 = 128;

/// The port httpd listens on in the guest (the test image's).
const GUEST_PORT: &str = "8080";

/// The uid and gid of the httpd image's user `web`
/// (`image-tools/test-images/build.sh`).
const WEB_UID: u64 = 1000;

/// What a jailed VMM's root holds: its sockets, the app's snapshot and
/// base image, its log folder and its own `/proc`.
const JAIL_ROOT: [&str; 7] = [
    "api.sock",
    "app.snap",
    "log",
    "proc",
    "rootfs.erofs",
    "v.sock",
    "v.sock_1024",
];

/// Connects to every `NAME HOST PORT` line of /probe/targets in turn and
/// prints `NAME connected|refused|timeout|error: MESSAGE` for each. nc runs
/// `true` once connected, so a peer that keeps the connection open cannot
/// hold the probe. `-w 30` is a hang ceiling, not a pace: a refusal comes
/// back at once as a RST and an allowed connect in one round trip, so it
/// only ends a connect that nothing answers, and five of them stay within
/// the deploy's wait for the port and the test client's ceiling, so a
/// hang shows as `timeout` for its target. In turn, not at once: every
/// process costs an emulated guest dearly.
const PROBE_SH: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
while read -r name host port; do
	if msg=$($bb nc -w 30 "$host" "$port" -e $bb true </dev/null 2>&1); then
		echo "$name connected"
	else
		case "$msg" in
		*refused*) echo "$name refused" ;;
		*"timed out"*) echo "$name timeout" ;;
		*) echo "$name error: $msg" ;;
		esac
	fi
done </probe/targets
"#;

/// The probe again, from a running (woken) instance: busybox httpd runs
/// /www/cgi-bin/* as CGI, and passes its header lines on as they are, so
/// they end in CRLF.
const PROBE_CGI: &str =
    "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nexec /probe/probe.sh\n";

/// The probe image's entrypoint: probe at the first boot, into a file
/// httpd serves, then serve.
const PROBE_ENTRYPOINT: &str =
    "/probe/probe.sh >/www/probe/boot.txt; exec /bin/busybox httpd -f -v -p 8080 -h /www";

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `little deploy NAME` of `image` at `127.0.0.1:port`, at most one
/// instance, kept while the test runs (the one woken is the one checked),
/// with `extra` flags.
fn deploy(daemon: &Daemon, name: &str, image: &Path, port: u16, extra: &[&str]) -> AppStatus {
    let listen = format!("127.0.0.1:{port}");
    let memory = MEMORY_MIB.to_string();
    let mut args = vec![
        "deploy",
        name,
        "--image",
        image.to_str().expect("a UTF-8 image path"),
        "--port",
        GUEST_PORT,
        "--listen",
        &listen,
        "--memory",
        &memory,
        "--max",
        "1",
        "--idle-timeout",
        "30m",
        platform_util::READY_TIMEOUT[0],
        platform_util::READY_TIMEOUT[1],
    ];
    args.extend_from_slice(extra);
    let start = Instant::now();
    let out = daemon.little(&args);
    assert!(
        out.status.success(),
        "little deploy {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("deployed {name} in {:.1?}", start.elapsed());
    daemon.app(name)
}

/// Makes `name`'s running VMM call what its seccomp filter forbids (the
/// test-only `forbidden-syscall` control command) and checks that the
/// kernel killed it, that `little ps` and `/metrics` say so, and that the
/// next request on `port` is served by a new instance.
fn check_seccomp_kill(daemon: &Daemon, name: &str, port: u16) {
    let app = daemon.app(name);
    let [instance] = app.instances.as_slice() else {
        panic!("{name} should run one instance: {:?}", app.instances);
    };
    let pid = instance.pid;
    // The VMM's control socket, as its own root directory shows it.
    let sock = PathBuf::from(format!("/proc/{pid}/root/api.sock"));
    let mut client = vmm_api::client::Client::connect(&sock, ceiling::HOST)
        .unwrap_or_else(|e| panic!("cannot reach {}: {e}", sock.display()));
    match client.send(&vmm_api::command::Command::ForbiddenSyscall) {
        Err(e) if e.breaks_connection() => {}
        other => panic!("the VMM (pid {pid}) outlived a forbidden system call: {other:?}"),
    }
    wait_until(
        &format!("little ps to report {name}'s instance killed by seccomp"),
        ceiling::HOST,
        || {
            daemon
                .app(name)
                .last_death
                .is_some_and(|d| d.contains("seccomp"))
        },
    );
    let line = format!("little_seccomp_kills_total{{app=\"{name}\"}} 1");
    let metrics = daemon.metrics();
    assert!(
        metrics.lines().any(|l| l == line),
        "/metrics has no {line:?}:\n{metrics}"
    );
    get(port, "/index.html");
    let after: Vec<u32> = daemon.app(name).instances.iter().map(|i| i.pid).collect();
    assert!(
        !after.is_empty() && !after.contains(&pid),
        "{name} should be served by a new instance after pid {pid}'s death: {after:?}"
    );
}

/// Sends SIGTERM to `name`'s running VMM, which is PID 1 of its jail's
/// PID namespace (the kernel drops a signal such a process has no handler
/// for), and checks that it stopped its VM and exited cleanly, that
/// `little ps` says so, and that the next request on `port` is served by
/// a new instance.
fn check_stop_signal(daemon: &Daemon, name: &str, port: u16) {
    let app = daemon.app(name);
    let [instance] = app.instances.as_slice() else {
        panic!("{name} should run one instance: {:?}", app.instances);
    };
    let pid = instance.pid;
    // SAFETY: kill(2) with a pid this test read from `little ps` and a
    // plain signal number; it touches no memory of this process.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(
        rc,
        0,
        "cannot send SIGTERM to the VMM (pid {pid}): {}",
        std::io::Error::last_os_error()
    );
    wait_until(
        &format!("little ps to report {name}'s instance (pid {pid}) stopped by SIGTERM"),
        ceiling::HOST,
        || {
            daemon
                .app(name)
                .last_death
                .is_some_and(|d| d.contains("exited with code 0"))
        },
    );
    get(port, "/index.html");
    let after: Vec<u32> = daemon.app(name).instances.iter().map(|i| i.pid).collect();
    assert!(
        !after.is_empty() && !after.contains(&pid),
        "{name} should be served by a new instance after pid {pid} stopped: {after:?}"
    );
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The daemon's pid, from the lock it holds on its home.
fn daemon_pid(home: &Path) -> u32 {
    let text = read(home.join("lock"));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}/lock holds no pid: {text:?}", home.display()))
}

/// `pid`'s memory cgroup folder and its limit (v1 `memory.limit_in_bytes`,
/// v2 `memory.max`), found through /proc/PID/cgroup and this process's
/// mountinfo. A v1 memory hierarchy wins: a hybrid host also mounts a v2
/// tree without the memory controller.
fn memory_limit(pid: u32) -> (PathBuf, String) {
    let cgroup = read(format!("/proc/{pid}/cgroup"));
    let mountinfo = read("/proc/self/mountinfo");
    let line = |v1: bool| {
        cgroup.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let found = if v1 {
                controllers.split(',').any(|c| c == "memory")
            } else {
                id == "0" && controllers.is_empty()
            };
            found.then(|| path.to_owned())
        })
    };
    let (v1, path) = match (line(true), line(false)) {
        (Some(path), _) => (true, path),
        (None, Some(path)) => (false, path),
        (None, None) => panic!("/proc/{pid}/cgroup names no memory cgroup:\n{cgroup}"),
    };
    let (point, root) = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (root, point) = (left.get(3)?, left.get(4)?);
            let (fstype, options) = (*right.first()?, right.get(2).copied().unwrap_or(""));
            let found = if v1 {
                fstype == "cgroup" && options.split(',').any(|o| o == "memory")
            } else {
                fstype == "cgroup2"
            };
            found.then(|| (PathBuf::from(point), root.to_string()))
        })
        .unwrap_or_else(|| panic!("the memory cgroup hierarchy is not mounted:\n{mountinfo}"));
    let relative = path.strip_prefix(root.as_str()).unwrap_or(&path);
    let dir = point.join(relative.trim_start_matches('/'));
    let file = dir.join(if v1 {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    });
    let limit = read(&file).trim().to_owned();
    (dir, limit)
}

/// The host's memory, bytes.
fn host_memory() -> u64 {
    let meminfo = read("/proc/meminfo");
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("no MemTotal in /proc/meminfo:\n{meminfo}"))
}

/// Check 1: the jail around `name`'s one instance, as `little ps --json`
/// names it.
fn check_jail(daemon: &Daemon, name: &str) {
    let out = daemon.little(&["ps", "--json"]);
    assert!(
        out.status.success(),
        "little ps --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let apps: Vec<AppStatus> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "little ps --json printed no list of apps ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let app = apps
        .iter()
        .find(|a| a.spec.name == name)
        .unwrap_or_else(|| panic!("little ps --json does not list {name}"));
    let [instance] = app.instances.as_slice() else {
        panic!("{name} should run one woken instance: {:?}", app.instances);
    };
    let pid = instance.pid;

    let status = read(format!("/proc/{pid}/status"));
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key}: in /proc/{pid}/status:\n{status}"))
    };
    assert_eq!(
        field("Seccomp"),
        "2",
        "the jailed VMM (pid {pid}) runs without a seccomp filter"
    );
    // Each vCPU thread stacks its narrower filter on the VMM's.
    let main_filters: u32 = field("Seccomp_filters").parse().unwrap_or(0);
    let vcpu_filters = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the VMM's threads")
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with("vcpu").then(|| {
                let status = std::fs::read_to_string(t.path().join("status")).ok()?;
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Seccomp_filters:"))?
                    .trim()
                    .parse::<u32>()
                    .ok()
            })?
        })
        .collect::<Vec<_>>();
    assert!(
        !vcpu_filters.is_empty() && vcpu_filters.iter().all(|n| *n > main_filters),
        "every vCPU thread of pid {pid} should add its own filter to the VMM's {main_filters}: {vcpu_filters:?}"
    );
    assert_eq!(
        field("NoNewPrivs"),
        "1",
        "the jailed VMM (pid {pid}) may gain privileges through exec: no_new_privs is not set"
    );
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            field(caps),
            "0000000000000000",
            "the jailed VMM (pid {pid}) holds capabilities ({caps})"
        );
    }
    if running_as_root() {
        let uid = app
            .user
            .unwrap_or_else(|| panic!("a root daemon gave {name} no user of its own"));
        for (key, what) in [("Uid", "uid"), ("Gid", "gid")] {
            let ids: Vec<u32> = field(key)
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            assert!(
                ids.len() == 4 && ids.iter().all(|id| *id == uid && *id != 0),
                "the jailed VMM (pid {pid}) should run as the app's {what} {uid} \
                 (real, effective, saved, fs), not {ids:?}"
            );
        }
    }

    let daemon_pid = daemon_pid(&daemon.home);
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let of = |pid: u32| {
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
                .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/ns/{ns}: {e}"))
        };
        let (vmm, daemon) = (of(pid), of(daemon_pid));
        assert_ne!(
            vmm, daemon,
            "the jailed VMM (pid {pid}) shares the daemon's {ns} namespace"
        );
    }

    let (group, limit) = memory_limit(pid);
    let bytes: u64 = limit.parse().unwrap_or_else(|_| {
        panic!(
            "the jailed VMM's cgroup {} has no memory limit: {limit:?}",
            group.display()
        )
    });
    let want = platform::jail::limits(MEMORY_MIB).memory_bytes;
    eprintln!(
        "{name}'s instance cgroup {}: memory limit {} MiB",
        group.display(),
        bytes >> 20
    );
    assert!(
        bytes < host_memory(),
        "the jailed VMM's memory limit ({bytes} bytes in {}) is not below the host's memory",
        group.display()
    );
    assert_eq!(
        bytes,
        want,
        "the jailed VMM's memory limit in {} is not the app's {MEMORY_MIB} MiB plus the VMM's overhead",
        group.display()
    );

    let root = format!("/proc/{pid}/root");
    let mut entries: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {root}: {e}"))
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    entries.sort();
    assert_eq!(
        entries, JAIL_ROOT,
        "the jailed VMM's root (pid {pid}) holds other files than its own"
    );
}

/// Check 2: a second `little serve` on the same home stops with the first
/// daemon's pid and leaves its instance serving on `port`.
fn check_second_daemon(daemon: &Daemon, name: &str, port: u16) {
    let before: Vec<u32> = daemon.app(name).instances.iter().map(|i| i.pid).collect();
    let first = daemon_pid(&daemon.home);
    let mut second = Command::new(release_bin("little"))
        .arg("--home")
        .arg(&daemon.home)
        .arg("serve")
        .arg("--kernel")
        .arg(kernel())
        .arg("--metrics")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("a second little serve starts");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait for the second daemon") {
            break status;
        }
        if start.elapsed() > ceiling::HOST {
            let _ = second.kill();
            let _ = second.wait();
            panic!(
                "a second little serve on {} still ran after {:.1?}: a home must have one daemon",
                daemon.home.display(),
                start.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = second
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr);
    assert!(
        !status.success(),
        "a second little serve on the same home exited successfully: {stderr}"
    );
    assert!(
        stderr.contains("another daemon serves") && stderr.contains(&format!("(pid {first})")),
        "a second little serve should say that daemon {first} serves the home; it said: {stderr}"
    );
    assert_eq!(
        daemon_pid(&daemon.home),
        first,
        "the second daemon rewrote the lock"
    );
    get(port, "/index.html");
    let after: Vec<u32> = daemon.app(name).instances.iter().map(|i| i.pid).collect();
    assert_eq!(
        after, before,
        "the second daemon changed the first one's instances"
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Check 3: owner-only files, though the daemon started under umask 022
/// in a home made 0755.
fn check_modes(home: &Path, snapshot: &Path) {
    assert_eq!(
        mode(home),
        0o700,
        "the home {} (0755 when the daemon started) is not 0700",
        home.display()
    );
    for file in ["little.sock", "state.redb", "lock"] {
        let path = home.join(file);
        assert_eq!(
            mode(&path),
            0o600,
            "{} is not 0600 (the daemon ran under umask 022)",
            path.display()
        );
    }
    let snap = mode(snapshot);
    assert_eq!(
        snap & 0o077,
        0,
        "the snapshot {} is {snap:o}: others can read the guest's memory",
        snapshot.display()
    );
}

/// A TCP listener that counts the connections it accepts, closing each at
/// once.
struct Witness {
    port: u16,
    seen: Arc<AtomicUsize>,
}

impl Witness {
    fn bind(addr: &str) -> Self {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let port = listener.local_addr().expect("a bound address").port();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stream.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self { port, seen }
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

/// An IPv4 address of this host other than loopback: the source address of
/// its default route (a UDP connect sends nothing). `None` without one, or
/// when it lies in the guest network 10.0.2.0/24, where the guest would
/// mean something else by it.
fn host_address() -> Option<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("203.0.113.1:9").ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip)
            if !ip.is_loopback() && !ip.is_unspecified() && ip.octets()[..3] != [10, 0, 2] =>
        {
            Some(ip)
        }
        _ => None,
    }
}

/// The httpd image with the probe on top: `targets` (name, host, port) are
/// tried at the first boot (results in /probe/boot.txt) and on every
/// GET /cgi-bin/probe.
fn probe_image(httpd: &Path, dir: &Path, targets: &[(&str, String, u16)]) -> PathBuf {
    let list: String = targets
        .iter()
        .map(|(name, host, port)| format!("{name} {host} {port}\n"))
        .collect();
    let layer = LayerBuilder::new()
        .dir("probe", 0o755, 0, 0)
        .file("probe/probe.sh", 0o755, 0, 0, PROBE_SH.as_bytes())
        .file("probe/targets", 0o644, 0, 0, list.as_bytes())
        .dir("www/probe", 0o755, WEB_UID, WEB_UID)
        .dir("www/cgi-bin", 0o755, 0, 0)
        .file("www/cgi-bin/probe", 0o755, 0, 0, PROBE_CGI.as_bytes())
        .finish();
    let layout = dir.join("probe.oci");
    extend_layout(httpd, &layout, &layer, |config| {
        config.entrypoint = Some(
            ["/bin/busybox", "sh", "-c", PROBE_ENTRYPOINT]
                .map(String::from)
                .to_vec(),
        );
        config.cmd = None;
    });
    layout
}

/// `NAME RESULT` lines as a map.
fn results(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(name, result)| (name.to_owned(), result.to_owned()))
        .collect()
}

/// Check 4, for one deploy of the probe image: what its first boot and
/// then its woken instance reached, against `want`.
fn check_probes(port: u16, name: &str, want: &BTreeMap<String, String>) {
    for (when, path) in [
        ("at its first boot", "/probe/boot.txt"),
        ("in a woken instance", "/cgi-bin/probe"),
    ] {
        let text = get(port, path);
        assert_eq!(
            &results(&text),
            want,
            "{name}'s guest connects {when} (GET {path}):\n{text}"
        );
    }
}

#[test]
fn apps_are_jailed_and_fenced_off_from_the_host() {
    let Some(httpd) = test_image("httpd") else {
        return;
    };
    let started = Instant::now();
    // The usual umask, which alone would make 0755 folders and 0644 files.
    // SAFETY: umask(2) only sets this process's file mode mask; this test
    // is the only one in its binary.
    unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    std::fs::create_dir(&home).expect("home");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let daemon = Daemon::start(&home);

    // 1. The jail around a woken instance of the httpd image.
    let web_port = free_port();
    let web = deploy(&daemon, "web", &httpd, web_port, &[]);
    get(web_port, "/index.html");
    check_jail(&daemon, "web");

    // 2. One daemon per home.
    check_second_daemon(&daemon, "web", web_port);

    // 3. Owner-only files.
    check_modes(&home, Path::new(&web.snapshot));

    // 4. A VMM that breaks its filter dies alone, and the daemon says so.
    check_seccomp_kill(&daemon, "web", web_port);

    // 5. SIGTERM stops a jailed VMM cleanly.
    check_stop_signal(&daemon, "web", web_port);
    eprintln!(
        "jail, second daemon, modes, a seccomp kill and SIGTERM checked after {:.1?}",
        started.elapsed()
    );

    // 6. From inside a guest, the host is out of reach, but for what
    //    --allow-host opens. Each target has a listener behind it, so a
    //    refusal is the isolation's, but for cloud metadata, which is not
    //    on this host.
    let loopback = Witness::bind("127.0.0.1:0");
    let anywhere = Witness::bind("0.0.0.0:0");
    let mut targets = vec![
        ("metrics", "10.0.2.2".to_owned(), daemon.metrics),
        ("web", "10.0.2.2".to_owned(), web_port),
        ("loopback", "10.0.2.2".to_owned(), loopback.port),
        ("metadata", "169.254.169.254".to_owned(), 80),
    ];
    match host_address() {
        Some(ip) => targets.push(("host-address", ip.to_string(), anywhere.port)),
        None => eprintln!("no host address outside 10.0.2.0/24 to probe"),
    }
    let image = probe_image(&httpd, dir.path(), &targets);
    let mut want: BTreeMap<String, String> = targets
        .iter()
        .map(|(name, ..)| (name.to_string(), "refused".to_owned()))
        .collect();

    let probe_port = free_port();
    deploy(&daemon, "probe", &image, probe_port, &[]);
    check_probes(probe_port, "probe", &want);
    assert_eq!(
        (loopback.seen(), anywhere.seen()),
        (0, 0),
        "the host's listeners (loopback, any address) saw connections from an isolated guest"
    );

    let open_port = free_port();
    let rule = format!("127.0.0.1:{}", loopback.port);
    deploy(
        &daemon,
        "probe-open",
        &image,
        open_port,
        &["--allow-host", &rule],
    );
    want.insert("loopback".into(), "connected".into());
    check_probes(open_port, "probe-open", &want);
    wait_until(
        "the loopback listener to accept the allowed guest's two connections",
        ceiling::HOST,
        || loopback.seen() >= 2,
    );
    assert_eq!(
        anywhere.seen(),
        0,
        "--allow-host {rule} opened the host's other addresses too"
    );
    eprintln!("isolation checked in {:.1?}", started.elapsed());
}
