//! The platform end to end, with one deploy of the busybox httpd test
//! image: from zero instances a request gets a 200 (restored in
//! milliseconds host-side); 50 concurrent clients with concurrency 10
//! scale out to several instances and all succeed; after the idle timeout
//! no instance (and no guest-running vmm) is left, and the next request
//! wakes one again; an instance killed with SIGKILL during a request does
//! not take the daemon down and the next request is served; a restarted
//! daemon serves the app from its database.

// A test's helpers are not all used by every test file.
#[allow(dead_code)]
mod platform_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use little_tests::{ceiling, free_port, http_get};
use platform_util::{test_image, wait_until, Daemon};

/// Concurrent clients in the burst: ten per instance at concurrency 10.
const CLIENTS: usize = 50;

fn get_200(port: u16) -> String {
    let reply = http_get(port, "/index.html").unwrap_or_else(|e| panic!("GET /index.html: {e}"));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("little-test-httpd"), "{reply}");
    reply
}

/// `CLIENTS` GETs at once; every failure with its reason, and the most
/// instances the daemon ran at one time while they were served.
fn burst(daemon: &Daemon, port: u16) -> (Vec<String>, usize) {
    let done = Arc::new(AtomicBool::new(false));
    let sock = daemon.home.join("little.sock");
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Acquire) {
                if let Ok(apps) = platform::api::ps(&sock) {
                    let running = apps.iter().map(|a| a.instances.len()).sum();
                    peak = peak.max(running);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| std::thread::spawn(move || http_get(port, "/index.html")))
        .collect();
    let mut failures = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match c.join().expect("client thread") {
            Ok(reply) if reply.starts_with("HTTP/1.1 200") => {}
            Ok(reply) => failures.push(format!("client {i}: not a 200: {reply:?}")),
            Err(e) => failures.push(format!("client {i}: {e}")),
        }
    }
    done.store(true, Ordering::Release);
    let peak = sampler.join().expect("sampler thread");
    eprintln!(
        "{CLIENTS} clients served in {:.1?} by at most {peak} instances",
        start.elapsed()
    );
    (failures, peak)
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
        platform_util::READY_TIMEOUT[0],
        platform_util::READY_TIMEOUT[1],
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
    let restores = || daemon.metric("little_restores_total{app=\"web\"}");
    assert_eq!(restores(), 1, "one request restores one instance");

    // 50 concurrent clients, 10 connections per instance: scale out, and
    // lose or reset none of them however slowly the guests answer.
    let before = restores();
    let (failures, peak) = burst(&daemon, port);
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients got no reply:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        peak >= 2,
        "{CLIENTS} clients at concurrency 10 ran on at most {peak} instance(s)"
    );
    assert!(restores() > before, "the burst restored instances");
    assert_eq!(daemon.metric("little_failed_total{app=\"web\"}"), 0);

    // Idle for 1 s: every instance is stopped, and its VMM with it; what
    // is left is the standby pool (VMMs with no guest).
    let idle = wait_until("scale to zero", ceiling::HOST, || {
        daemon.app("web").instances.is_empty()
    });
    eprintln!("scaled to zero {idle:.1?} after the last reply (idle timeout 1 s)");
    // The stopped instances' VMMs exit one after the other (each asked
    // to quit first), so their processes may outlast the list a moment.
    let mut left = Vec::new();
    wait_until(
        "only the standby pool's VMMs to be left after scaling to zero",
        ceiling::HOST,
        || {
            left = daemon.vmm_processes();
            left.len() == daemon.app("web").standby
        },
    );
    eprintln!("vmm processes left at zero: {left:?} (the standby pool)");
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
    let before = restores();
    get_200(port);
    assert_eq!(
        restores(),
        before + 1,
        "the next request wakes one instance"
    );

    // SIGKILL the instance in the middle of a request: the daemon lives on
    // and the next request is served by a new instance.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(ceiling::GUEST))
        .expect("timeout");
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\n")
        .expect("half a request");
    let mut victim = 0;
    wait_until(
        "the half request to reach an instance",
        ceiling::HOST,
        || {
            let app = daemon.app("web");
            let busy = app.instances.iter().find(|i| i.connections > 0);
            victim = busy.map_or(0, |i| i.pid);
            victim != 0
        },
    );
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
    wait_until("no vmm left after rm", ceiling::HOST, || {
        daemon.vmm_processes().is_empty()
    });
}

/// A ready command decides when an app is ready, and so when its snapshot
/// is taken: the image's HEALTHCHECK by default, `--ready-cmd` over it.
/// An app whose port accepts but whose command never passes is not
/// deployed; one whose command passes on its second run is, after it.
/// A CGI script: 32 bytes of the guest's /dev/urandom in hex, and its
/// clock in Unix seconds.
const CLONE_CGI: &str = "#!/bin/busybox sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
echo \"random $(/bin/busybox head -c 32 /dev/urandom | /bin/busybox od -An -tx1 | /bin/busybox tr -d ' \\n')\"
echo \"clock $(/bin/busybox date +%s)\"
";

/// GET /cgi-bin/clone on `port`: the guest's random bytes, once its clock
/// is checked to be the host's (to the second either way).
fn clone_probe(port: u16) -> String {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    };
    let before = now();
    let body = platform_util::get(port, "/cgi-bin/clone");
    let after = now();
    let field = |key: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| panic!("no {key:?} line in the CGI's reply:\n{body}"))
            .to_owned()
    };
    let random = field("random");
    assert_eq!(random.len(), 64, "32 random bytes in hex: {body}");
    let clock: u64 = field("clock")
        .parse()
        .unwrap_or_else(|_| panic!("the guest's clock is not a number: {body}"));
    assert!(
        clock + 1 >= before && clock <= after + 1,
        "the restored guest's clock ({clock}) is not the host's ({before}..{after}) within 1 s"
    );
    random
}

#[test]
fn a_ready_command_decides_when_an_app_is_ready() {
    use image_tools::oci::Healthcheck;
    use image_tools::test_utils::{extend_layout, LayerBuilder};
    use platform_util::{deploy_args, little_err, little_ok};

    let Some(httpd) = test_image("httpd") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let daemon = Daemon::start(&home);
    // The httpd image with a shell, a CGI script that shows the guest's
    // random bytes and clock, and a HEALTHCHECK that never passes.
    let layer = LayerBuilder::new()
        .symlink("bin/sh", "busybox")
        .dir("www/cgi-bin", 0o755, 0, 0)
        .file("www/cgi-bin/clone", 0o755, 0, 0, CLONE_CGI.as_bytes())
        .finish();
    let image = dir.path().join("checked.oci");
    extend_layout(&httpd, &image, &layer, |config| {
        config.healthcheck = Some(Healthcheck {
            test: Some(vec!["CMD".into(), "/bin/busybox".into(), "false".into()]),
        });
    });
    let image = image.to_str().expect("utf-8");
    let port = free_port();
    let deploy = |name: &str, extra: &[&str]| -> Vec<String> {
        let listen = if name == "web" { port } else { free_port() };
        deploy_args(name, image, "8080", &format!("127.0.0.1:{listen}"), extra)
    };
    let twice = deploy(
        "web",
        &[
            "--idle-timeout",
            "1s",
            "--ready-cmd",
            "if [ -e /tmp/tried ]; then echo ready-check-passed; \
             else : >/tmp/tried; echo ready-check-failed; exit 1; fi",
        ],
    );
    let deployed = Instant::now();
    little_ok(&daemon, &platform_util::args(&twice));
    let took = deployed.elapsed();
    let logs = little_ok(&daemon, &["logs", "web"]);
    let failed = logs.find("ready-check-failed");
    let passed = logs.find("ready-check-passed");
    assert!(
        matches!((failed, passed), (Some(f), Some(p)) if f < p),
        "the command failed once, then passed, in the deploy's boot:\n{logs}"
    );
    get_200(port);

    // Clone safety: two instances restored from the one snapshot, one
    // after the other, draw different random bytes, and each runs on the
    // host's clock, not the snapshot's.
    let first = clone_probe(port);
    platform_util::wait_for_zero(&daemon, "web");
    let second = clone_probe(port);
    assert_ne!(
        first, second,
        "two instances restored from one snapshot read the same 32 bytes from /dev/urandom"
    );

    // The image's HEALTHCHECK never passes: a deadline well past what a
    // whole deploy took here runs out while the port accepts.
    let deadline = format!("{}s", (took.as_secs() * 2).max(60));
    let e = little_err(
        &daemon,
        &platform_util::args(&deploy("never", &["--ready-timeout", &deadline])),
    );
    assert!(
        e.contains(&format!("was not ready within {deadline}")),
        "{e}"
    );

    // SIGTERM to the daemon while a deploy boots: no vmm is left behind.
    let mut daemon = daemon;
    let before = daemon.vmm_processes();
    let hung = deploy("hung", &["--ready-timeout", "1h"]);
    let mut client = std::process::Command::new(little_tests::release_bin("little"))
        .arg("--home")
        .arg(&home)
        .args(platform_util::args(&hung))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("little deploy runs");
    wait_until("the deploy's boot vmm to start", ceiling::HOST, || {
        daemon.vmm_processes().iter().any(|p| !before.contains(p))
    });
    // Meanwhile another app deploys and serves: deploys of different apps
    // do not wait for each other.
    let other_port = free_port();
    let other = deploy_args(
        "other",
        image,
        "8080",
        &format!("127.0.0.1:{other_port}"),
        &["--ready-cmd", ""],
    );
    little_ok(&daemon, &platform_util::args(&other));
    assert!(
        matches!(client.try_wait(), Ok(None)),
        "the hung deploy ended while the other app deployed"
    );
    get_200(other_port);
    let status = daemon.terminate();
    assert!(status.success(), "the daemon's exit on SIGTERM: {status}");
    wait_until(
        "no vmm process of the stopped daemon left",
        ceiling::HOST,
        || daemon.vmm_processes().is_empty(),
    );
    let out = client.wait().expect("little deploy ends");
    assert!(
        !out.success(),
        "the deploy cut short by the daemon's stop reported success"
    );
}
