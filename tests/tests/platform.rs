//! The platform end to end, with one deploy of the busybox httpd test
//! image: from zero instances a request gets a 200 (restored in
//! milliseconds host-side); 50 concurrent clients with concurrency 10
//! scale out to several instances and all succeed; after the idle timeout
//! no instance (and no guest-running vmm) is left, and the next request
//! wakes one again; an instance killed with SIGKILL during a request does
//! not take the daemon down and the next request is served; a restarted
//! daemon serves the app from its database.

mod platform_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use little_tests::{free_port, http_get};
use platform_util::{test_image, wait_until, Daemon};

const IDLE: Duration = Duration::from_secs(10);

fn get_200(port: u16) -> String {
    let reply = http_get(port, "/index.html").expect("an HTTP reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("little-test-httpd"), "{reply}");
    reply
}

#[test]
fn httpd_wakes_from_zero_scales_out_and_back_to_zero() {
    let Some(image) = test_image("httpd") else {
        return;
    };
    let home = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start(home.path());
    let port = free_port();
    let out = daemon.little(&[
        "deploy",
        "web",
        "--image",
        image.to_str().expect("utf-8"),
        "--port",
        "8080",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--memory",
        "128",
        "--concurrency",
        "10",
        "--max",
        "5",
        "--idle-timeout",
        "1s",
    ]);
    assert!(
        out.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        daemon.app("web").instances.len(),
        0,
        "deploy leaves no instance"
    );

    // From zero: one request restores an instance and gets its answer.
    get_200(port);
    assert_eq!(daemon.app("web").instances.len(), 1);

    // 50 concurrent clients, 10 connections per instance: scale out.
    let clients: Vec<_> = (0..50)
        .map(|_| std::thread::spawn(move || http_get(port, "/index.html")))
        .collect();
    let mut ok = 0;
    for c in clients {
        let reply = c.join().expect("client thread").unwrap_or_default();
        assert!(reply.starts_with("HTTP/1.1 200"), "a client got {reply:?}");
        ok += 1;
    }
    assert_eq!(ok, 50);
    let running = daemon.app("web").instances.len();
    assert!(
        running >= 2,
        "50 clients at concurrency 10 ran on {running} instance(s)"
    );

    // Idle for 1 s: every instance is stopped, and its VMM with it; what
    // is left is the standby pool (VMMs with no guest).
    wait_until("scale to zero", IDLE, || {
        daemon.app("web").instances.is_empty()
    });
    let app = daemon.app("web");
    let vmms = daemon.vmm_processes();
    assert_eq!(
        vmms.len(),
        app.standby,
        "only the standby pool is left: {vmms:?}"
    );
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("little_instances{app=\"web\"} 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("little_kills_total{app=\"web\"} 0\n"),
        "{metrics}"
    );

    // The next request wakes one again.
    get_200(port);
    let app = daemon.app("web");
    assert_eq!(app.instances.len(), 1);

    // SIGKILL the instance in the middle of a request: the daemon lives on
    // and the next request is served by a new instance.
    let victim = app.instances[0].pid;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\n")
        .expect("half a request");
    std::thread::sleep(Duration::from_millis(100));
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(daemon.alive(), "the daemon survives a dead instance");
    get_200(port);
    let app = daemon.app("web");
    assert!(
        app.instances.iter().all(|i| i.pid != victim),
        "the dead instance is gone: {:?}",
        app.instances
    );
    assert!(daemon
        .metrics()
        .contains("little_crashes_total{app=\"web\"} 1"));

    // A restarted daemon serves the app from its database.
    daemon.kill();
    let daemon = Daemon::start(home.path());
    assert!(daemon.vmm_processes().len() <= 1, "leftovers were stopped");
    get_200(port);
    let logs = daemon.little(&["logs", "web"]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("==> boot <=="), "{logs}");
    let out = daemon.little(&["rm", "web"]);
    assert!(out.status.success());
    assert!(daemon.ps().is_empty());
    wait_until("no vmm left after rm", IDLE, || {
        daemon.vmm_processes().is_empty()
    });
}
