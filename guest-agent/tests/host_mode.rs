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
