//! The real `guest-agent` binary, run on the host in its test modes
//! (`--check-config`, `--run`): the static, libc-free build starts, parses
//! configs, spawns, forwards signals, reaps and reports as it would as
//! PID 1.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_guest-agent");

/// A config file in a fresh temporary directory.
struct Conf {
    dir: PathBuf,
    path: PathBuf,
}

impl Conf {
    fn new(name: &str, text: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("guest-agent-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let path = dir.join("agent.conf");
        std::fs::write(&path, text).expect("temp dir is writable");
        Self { dir, path }
    }
}

impl Drop for Conf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .output()
        .expect("the agent binary runs")
}

fn run(conf: &Conf) -> Output {
    agent(&["--run", conf.path.to_str().expect("temp paths are UTF-8")])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn binary_is_static_without_interpreter() {
    let elf = std::fs::read(AGENT).expect("the binary exists");
    assert_eq!(&elf[..4], b"\x7fELF");
    // e_type: ET_EXEC (2), not ET_DYN (a PIE).
    assert_eq!(u16::from_le_bytes([elf[16], elf[17]]), 2);
    let phoff = usize::try_from(u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")))
        .expect("fits");
    let phentsize = usize::from(u16::from_le_bytes([elf[54], elf[55]]));
    let phnum = usize::from(u16::from_le_bytes([elf[56], elf[57]]));
    for i in 0..phnum {
        let p_type = u32::from_le_bytes(
            elf[phoff + i * phentsize..][..4]
                .try_into()
                .expect("4 bytes"),
        );
        assert_ne!(p_type, 3, "PT_INTERP present");
        assert_ne!(p_type, 2, "PT_DYNAMIC present");
    }
}

#[test]
fn check_config_prints_canonical_form_and_plan() {
    let conf = Conf::new(
        "check",
        "# comment\narg=redis-server\narg=--port\\t6379\nenv=PATH=/opt/bin:/bin\nuid=999\n",
    );
    let out = agent(&[
        "--check-config",
        conf.path.to_str().expect("utf-8"),
        "--nested",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with(
        "arg=redis-server\narg=--port\\t6379\nenv=PATH=/opt/bin:/bin\ncwd=/\nuid=999\n"
    ));
    assert!(stdout.contains("\nstop_grace_ms=1000\n"));
    assert!(stdout.contains("# effective env GLIBC_TUNABLES=glibc.cpu.hwcaps=-XSAVEC,"));
    assert!(stdout
        .contains("# exec candidate /opt/bin/redis-server\n# exec candidate /bin/redis-server\n"));

    let plain = agent(&["--check-config", conf.path.to_str().expect("utf-8")]);
    assert!(!text(&plain.stdout).contains("GLIBC_TUNABLES"));
}

#[test]
fn check_config_rejects_bad_files() {
    let conf = Conf::new("bad", "arg=/bin/true\nuid=root\n");
    let out = agent(&["--check-config", conf.path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "line 2: invalid value for uid\n");

    let missing = agent(&["--check-config", "/nonexistent/agent.conf"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(text(&missing.stderr), "read config failed: errno 2\n");

    let usage = agent(&["--bogus"]);
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn run_passes_argv_env_cwd_and_exit_status() {
    let conf = Conf::new(
        "run",
        "arg=sh\narg=-c\narg=echo \"$0|$1|$X|$(pwd)\"; exit 3\narg=a b\narg=\nenv=X=1\nenv=X=two\ncwd=/tmp\n",
    );
    let out = run(&conf);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stdout), "a b||two|/tmp\n");
    assert_eq!(
        text(&out.stderr),
        "little-agent: started\nlittle-agent: entrypoint exited status=3\n"
    );
}

#[test]
fn exec_failure_exits_127_with_one_line() {
    let conf = Conf::new(
        "noexec",
        "arg=no-such-program-here\nenv=PATH=/nonexistent:/also-not\n",
    );
    let out = run(&conf);
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        text(&out.stderr),
        "little-agent: started\n\
         little-agent: exec no-such-program-here failed: errno 2\n\
         little-agent: entrypoint exited status=127\n"
    );
}

#[test]
fn death_by_signal_is_reported() {
    let conf = Conf::new("killed", "arg=/bin/sh\narg=-c\narg=kill -9 $$\n");
    let out = run(&conf);
    assert_eq!(out.status.code(), Some(128 + 9));
    assert!(text(&out.stderr).ends_with("little-agent: entrypoint killed signal=9\n"));
}

#[test]
fn sigterm_is_forwarded_to_the_entrypoint() {
    let conf = Conf::new(
        "forward",
        "arg=/bin/sh\narg=-c\narg=trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done\n",
    );
    let mut child = Command::new(AGENT)
        .args(["--run", conf.path.to_str().expect("utf-8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the agent binary runs");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut ready)
        .expect("entrypoint writes");
    assert_eq!(ready, "ready\n");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let out = child.wait_with_output().expect("agent exits");
    assert_eq!(out.status.code(), Some(42), "{}", text(&out.stderr));
    assert!(text(&out.stderr).ends_with("little-agent: entrypoint exited status=42\n"));
}

#[test]
fn leftovers_get_sigterm_then_sigkill_after_the_grace() {
    // The background job inherits the ignored SIGTERM (set before the fork,
    // so there is no race, and kept across exec), so only the SIGKILL
    // after the grace period ends it.
    let conf = Conf::new(
        "grace",
        "arg=/bin/sh\narg=-c\narg=trap '' TERM; sleep 120 & exit 0\nstop_grace_ms=300\nverbose=1\n",
    );
    let start = Instant::now();
    let out = run(&conf);
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(0));
    assert!(took >= Duration::from_millis(300), "{took:?}");
    // Far below the 120 s the leftover would live: it was killed, not
    // waited for, however slow this host is.
    assert!(took < Duration::from_secs(60), "{took:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("little-agent: exec /bin/sh\n"), "{stderr}");
    assert!(
        stderr.contains("grace period over, sending SIGKILL"),
        "{stderr}"
    );
}

#[test]
fn cooperative_leftovers_stop_without_waiting_out_the_grace() {
    let conf = Conf::new(
        "quick",
        "arg=/bin/sh\narg=-c\narg=sleep 120 & exit 5\nstop_grace_ms=120000\n",
    );
    let start = Instant::now();
    let out = run(&conf);
    assert_eq!(out.status.code(), Some(5));
    // Far below the 120 s grace (and the leftover's 120 s sleep).
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    assert!(!text(&out.stderr).contains("SIGKILL"));
}

/// Source and destination trees for `--copy-tree`, removed on drop.
struct Trees {
    dir: PathBuf,
    src: PathBuf,
    dst: PathBuf,
}

impl Trees {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("guest-agent-copy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        std::fs::create_dir_all(&src).expect("temp dir is writable");
        // A fresh ext4 file system holds lost+found, which still counts
        // as empty.
        std::fs::create_dir_all(dst.join("lost+found")).expect("temp dir is writable");
        Self { dir, src, dst }
    }

    fn copy(&self) -> Output {
        agent(&[
            "--copy-tree",
            self.src.to_str().expect("utf-8"),
            self.dst.to_str().expect("utf-8"),
        ])
    }
}

impl Drop for Trees {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn sh(script: &str) {
    let status = Command::new("sh")
        .args(["-c", script])
        .status()
        .expect("sh runs");
    assert!(status.success(), "{script}");
}

/// Every entry under `root` (relative paths, sorted), `lost+found`
/// excluded.
fn entries(root: &std::path::Path) -> Vec<PathBuf> {
    fn walk(root: &std::path::Path, rel: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(root.join(rel)).expect("readable") {
            let entry = entry.expect("readable");
            let rel = rel.join(entry.file_name());
            if rel == std::path::Path::new("lost+found") {
                continue;
            }
            out.push(rel.clone());
            if entry.file_type().expect("stat").is_dir() {
                walk(root, &rel, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, std::path::Path::new(""), &mut out);
    out.sort();
    out
}

/// Asserts that `dst` holds what `src` holds: types, modes, owners (as
/// root), mtimes, contents and link targets; the roots too.
fn assert_same_tree(src: &std::path::Path, dst: &std::path::Path) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let names = entries(src);
    assert_eq!(names, entries(dst));
    let root = is_root();
    for rel in std::iter::once(PathBuf::new()).chain(names) {
        let (a, b) = (src.join(&rel), dst.join(&rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&a).expect("stat"),
            std::fs::symlink_metadata(&b).expect("stat"),
        );
        let (ta, tb) = (ma.file_type(), mb.file_type());
        assert_eq!(
            (ta.is_dir(), ta.is_file(), ta.is_symlink(), ta.is_fifo()),
            (tb.is_dir(), tb.is_file(), tb.is_symlink(), tb.is_fifo()),
            "{rel:?}"
        );
        assert_eq!(
            (ta.is_char_device(), ta.is_socket()),
            (tb.is_char_device(), tb.is_socket()),
            "{rel:?}"
        );
        if !ta.is_symlink() {
            assert_eq!(ma.mode(), mb.mode(), "{rel:?}: mode");
        }
        if root {
            assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{rel:?}: owner");
        }
        assert_eq!(ma.rdev(), mb.rdev(), "{rel:?}: rdev");
        assert_eq!(
            (ma.mtime(), ma.mtime_nsec()),
            (mb.mtime(), mb.mtime_nsec()),
            "{rel:?}: mtime"
        );
        if ta.is_file() {
            assert_eq!(
                std::fs::read(&a).expect("read"),
                std::fs::read(&b).expect("read")
            );
        }
        if ta.is_symlink() {
            assert_eq!(
                std::fs::read_link(&a).expect("link"),
                std::fs::read_link(&b).expect("link")
            );
        }
    }
}

#[test]
fn copy_tree_fills_a_new_volume_like_the_image() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let t = Trees::new("fill");
    let s = t.src.to_str().expect("utf-8");
    let root = is_root();
    sh(&format!(
        "set -e; cd '{s}'
         mkdir -p a/nested/deeper secret shared sticky empty
         printf 'hello\\nworld\\n' > a/nested/deeper/file.txt
         head -c 200000 /dev/urandom > a/big.bin
         : > a/empty-file
         ln a/big.bin a/hardlink.bin
         printf x > setuid-tool
         ln -s a/nested relative-link
         ln -s /nonexistent/target dangling-link
         mkfifo pipe
         chmod 0700 secret
         chmod 2775 shared
         chmod 1777 sticky
         chmod 4755 setuid-tool
         chmod 0555 a/nested
         chmod 0750 .
         touch -h -d @1000000000.123456789 relative-link
         touch -d @1234567890.5 a/nested/deeper/file.txt a/nested/deeper
         touch -d @1500000000 a/nested ."
    ));
    if root {
        sh(&format!(
            "set -e; cd '{s}'
             chown 999:999 secret
             chown 1000:50 shared setuid-tool
             chown -h 7:8 relative-link
             chown 70:70 .
             chmod 4755 setuid-tool
             mknod null-device c 1 3 2>/dev/null || true
             touch -d @1500000000 ."
        ));
    }
    // A socket, made the portable way.
    drop(std::os::unix::net::UnixListener::bind(t.src.join("socket")).expect("bind"));
    sh(&format!("touch -d @1500000000 '{s}'"));

    let out = t.copy();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "filled\n");
    assert_same_tree(&t.src, &t.dst);
    // Spot checks of what the tree comparison relies on.
    let meta = |p: &str| std::fs::symlink_metadata(t.dst.join(p)).expect("copied");
    assert_eq!(meta("").mode() & 0o7777, 0o750);
    assert_eq!(meta("shared").mode() & 0o7777, 0o2775);
    assert_eq!(meta("sticky").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(meta("setuid-tool").mode() & 0o7777, 0o4755);
    assert_eq!(meta("a/nested/deeper/file.txt").mtime(), 1_234_567_890);
    assert_eq!(meta("a/nested/deeper/file.txt").mtime_nsec(), 500_000_000);
    assert_eq!(meta("relative-link").mtime_nsec(), 123_456_789);
    if root {
        assert_eq!((meta("").uid(), meta("").gid()), (70, 70));
        assert_eq!((meta("secret").uid(), meta("secret").gid()), (999, 999));
        assert_eq!(
            (meta("relative-link").uid(), meta("relative-link").gid()),
            (7, 8)
        );
    }
    // Hard links become separate copies with the same bytes.
    assert_ne!(meta("a/big.bin").ino(), meta("a/hardlink.bin").ino());
    // lost+found is left alone.
    assert!(t.dst.join("lost+found").is_dir());
}

#[test]
fn copy_tree_keeps_a_volume_that_holds_data() {
    use std::os::unix::fs::PermissionsExt;
    let t = Trees::new("keep");
    std::fs::write(t.src.join("from-image"), "image").expect("writable");
    std::fs::write(t.dst.join("keep.txt"), "data").expect("writable");
    std::fs::set_permissions(&t.dst, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let out = t.copy();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "not empty\n");
    assert_eq!(entries(&t.dst), [PathBuf::from("keep.txt")]);
    let mode = std::fs::metadata(&t.dst)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o711);
}

#[test]
fn copy_tree_leaves_the_volume_when_the_image_has_nothing_there() {
    let t = Trees::new("nosrc");
    std::fs::remove_dir(&t.src).expect("empty");
    let out = t.copy();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no source\n");
    assert!(entries(&t.dst).is_empty());
}

#[test]
fn copy_tree_refuses_trees_deeper_than_its_bound() {
    let t = Trees::new("deep");
    let mut deep = t.src.clone();
    for _ in 0..65 {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).expect("writable");
    let out = t.copy();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "copy failed: errno 40\n");

    // 64 levels below the root are fine.
    let t = Trees::new("deep-ok");
    let mut deep = t.src.clone();
    for _ in 0..64 {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).expect("writable");
    let out = t.copy();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_tree(&t.src, &t.dst);
}
