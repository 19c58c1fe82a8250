//! The platform with the redis test image and no standby pool (`little
//! serve --standby 0`), one deploy: from zero instances a raw RESP `PING`
//! over TCP to the app's port answers `+PONG` (the daemon spawns a `vmm`
//! and restores the snapshot on the request); after the idle timeout not
//! one `vmm` process is left for the app (literal scale to zero); the next
//! `PING` wakes an instance again.

#[allow(dead_code)]
mod platform_util;

use std::time::Instant;

use little_tests::client::{exchange, Until};
use little_tests::{ceiling, free_port};
use platform_util::{test_image, wait_until, Daemon};

/// One RESP `PING` (an array of one bulk string); the reply line.
fn ping(port: u16) -> String {
    let reply = exchange(
        port,
        b"*1\r\n$4\r\nPING\r\n",
        Until::Contains(b"\r\n"),
        ceiling::GUEST,
    )
    .unwrap_or_else(|e| panic!("PING: {e}"));
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn redis_answers_ping_from_zero_and_scales_to_zero_vmms() {
    let Some(image) = test_image("redis") else {
        return;
    };
    let home = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with(home.path(), &["--standby", "0"]);
    let port = free_port();
    let out = daemon.little(&[
        "deploy",
        "kv",
        "--image",
        image.to_str().expect("utf-8"),
        "--port",
        "6379",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--memory",
        "256",
        "--max",
        "2",
        "--idle-timeout",
        "1s",
    ]);
    assert!(
        out.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app = daemon.app("kv");
    assert_eq!((app.instances.len(), app.standby), (0, 0));
    wait_until("no vmm after deploy", ceiling::HOST, || {
        daemon.vmm_processes().is_empty()
    });

    // From zero, with no standby VMM: spawn, restore, hand over, +PONG.
    let start = Instant::now();
    let reply = ping(port);
    assert!(reply.starts_with("+PONG"), "{reply:?}");
    eprintln!("PING from zero vmm processes: {:?}", start.elapsed());
    assert_eq!(daemon.app("kv").instances.len(), 1);

    // Idle for 1 s: the instance is stopped and no vmm process is left.
    wait_until("scale to zero", ceiling::HOST, || {
        daemon.app("kv").instances.is_empty()
    });
    wait_until("no vmm process left", ceiling::HOST, || {
        daemon.vmm_processes().is_empty()
    });
    assert_eq!(daemon.app("kv").standby, 0);

    // The next request wakes one again.
    let reply = ping(port);
    assert!(reply.starts_with("+PONG"), "{reply:?}");
    assert_eq!(daemon.app("kv").instances.len(), 1);
    assert_eq!(daemon.vmm_processes().len(), 1);
}
