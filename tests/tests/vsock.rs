//! virtio-vsock end to end: the real kernel boots once with
//! `--vsock uds=...`, the agent reports over its host channel
//! (`guest_agent::protocol`) and the entrypoint (the agent binary's
//! `--vsock-test` mode) talks vsock in both directions. Every test below
//! checks one thing about that boot.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use little_tests::{accept_within, agent_initramfs, ceiling, kernel, read_line, VmmProcess};

/// The entrypoint: connect to host port 2000, then listen on TCP 8080 (the
/// readiness port) and echo one vsock stream on port 5000.
const AGENT_CONF: &str = "arg=/init
arg=--vsock-test
arg=5000
arg=2000
arg=8080
ready_port=8080
stop_grace_ms=200
";

const BOOT_DEADLINE: Duration = ceiling::BOOT;
const STEP: Duration = ceiling::GUEST;

#[derive(Debug, Default)]
struct Seen {
    agent_lines: Vec<String>,
    pong: Option<String>,
    guest_hello: Option<(String, Instant)>,
    ready_at: Option<Instant>,
    connect_reply: Option<String>,
    echoed: Option<String>,
    vmm_exit: Option<std::process::ExitStatus>,
    console: String,
    stderr: String,
}

/// `CONNECT 5000` until the guest listens (it starts listening just after
/// it reports ready), then one echo round trip.
fn host_to_guest(uds: &Path, seen: &mut Seen) {
    let start = Instant::now();
    while start.elapsed() < STEP {
        let mut stream = UnixStream::connect(uds).expect("the VMM listens");
        stream.set_read_timeout(Some(STEP)).expect("timeout");
        stream.write_all(b"CONNECT 5000\n").expect("write CONNECT");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let Some(reply) = read_line(&mut reader) else {
            // RST: nobody listens on port 5000 yet.
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        seen.connect_reply = Some(reply);
        stream
            .write_all(b"echo me through the guest\n")
            .expect("write data");
        seen.echoed = read_line(&mut reader);
        // End of our data: the guest's echo loop ends and the entrypoint exits.
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        return;
    }
}

fn scenario() -> Seen {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let agent_listener =
        UnixListener::bind(dir.path().join("v.sock_1024")).expect("bind agent port");
    let hello_listener =
        UnixListener::bind(dir.path().join("v.sock_2000")).expect("bind port 2000");
    let initrd = agent_initramfs(dir.path(), AGENT_CONF);
    let k = kernel();
    let vsock_arg = format!("uds={}", uds.display());
    let mut vmm = VmmProcess::spawn(&[
        "--kernel",
        k.to_str().expect("utf-8 path"),
        "--initrd",
        initrd.to_str().expect("utf-8 path"),
        "--mem",
        "128",
        "--vsock",
        &vsock_arg,
    ]);
    let mut seen = Seen::default();

    // Guest -> host beyond the agent: the entrypoint says hello on port 2000.
    let hello = std::thread::spawn(move || {
        let stream = accept_within(&hello_listener, BOOT_DEADLINE, STEP)?;
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let line = read_line(&mut reader)?;
        let at = Instant::now();
        (&stream).write_all(b"welcome\n").ok()?;
        Some((line, at))
    });

    if let Some(agent) = accept_within(&agent_listener, BOOT_DEADLINE, STEP) {
        let mut reader = BufReader::new(agent.try_clone().expect("clone"));
        // HELLO, then READY once the readiness port accepts.
        while seen.agent_lines.len() < 2 {
            let Some(line) = read_line(&mut reader) else {
                break;
            };
            if line == "READY" {
                seen.ready_at = Some(Instant::now());
            }
            seen.agent_lines.push(line);
        }
        (&agent).write_all(b"PING n-42\n").expect("write PING");
        seen.pong = read_line(&mut reader);
        host_to_guest(&uds, &mut seen);
        // The entrypoint ends: EXIT comes before the VM restarts.
        if let Some(line) = read_line(&mut reader) {
            seen.agent_lines.push(line);
        }
        drop(reader);
        drop(agent);
    }
    seen.guest_hello = hello.join().ok().flatten();
    seen.vmm_exit = vmm.wait(STEP);
    seen.console = vmm.stdout();
    seen.stderr = vmm.stderr();
    seen
}

fn seen() -> &'static Seen {
    static SEEN: OnceLock<Seen> = OnceLock::new();
    SEEN.get_or_init(scenario)
}

#[test]
fn agent_says_hello_then_ready() {
    let s = seen();
    assert_eq!(
        s.agent_lines.first().map(String::as_str),
        Some("HELLO 1"),
        "{s:#?}"
    );
    assert_eq!(
        s.agent_lines.get(1).map(String::as_str),
        Some("READY"),
        "{s:#?}"
    );
}

#[test]
fn ready_waits_for_the_ready_port() {
    let s = seen();
    // The entrypoint greets port 2000 before it listens on the ready port.
    let (Some((_, hello_at)), Some(ready_at)) = (&s.guest_hello, s.ready_at) else {
        panic!("both seen: {s:#?}");
    };
    assert!(hello_at <= &ready_at, "{s:#?}");
}

#[test]
fn host_ping_gets_pong() {
    let s = seen();
    assert_eq!(s.pong.as_deref(), Some("PONG n-42"), "{s:#?}");
}

#[test]
fn guest_connects_to_a_host_unix_socket() {
    let s = seen();
    let hello = s.guest_hello.as_ref().map(|(l, _)| l.as_str());
    assert_eq!(hello, Some("hello from the guest"), "{s:#?}");
    assert!(
        s.console.contains("vsock-test: host said welcome"),
        "the guest read the host's answer: {s:#?}"
    );
}

#[test]
fn host_connects_to_a_guest_port_and_data_flows_both_ways() {
    let s = seen();
    let reply = s.connect_reply.as_deref().unwrap_or_default();
    let port = reply.strip_prefix("OK ").map(str::parse::<u32>);
    assert!(matches!(port, Some(Ok(_))), "OK <host_port>: {s:#?}");
    assert_eq!(
        s.echoed.as_deref(),
        Some("echo me through the guest"),
        "{s:#?}"
    );
}

#[test]
fn exit_status_is_reported_over_vsock_and_vmm_exits_zero() {
    let s = seen();
    assert_eq!(
        s.agent_lines.get(2).map(String::as_str),
        Some("EXIT status=0"),
        "{s:#?}"
    );
    assert!(s.vmm_exit.is_some_and(|e| e.success()), "{s:#?}");
    assert!(
        s.console
            .contains("little-agent: entrypoint exited status=0"),
        "console reporting stays: {s:#?}"
    );
}
