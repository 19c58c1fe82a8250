//! `wake-bench`: the platform's request path, measured from a client.
//!
//! Starts `little serve` on a fresh home, deploys the busybox httpd test
//! image with a short idle timeout, then measures connect → first byte of
//! the reply: (1) from zero instances (a restore per request; the bench
//! waits for the idle instance to be stopped before each), (2) through a
//! warm instance, (3) against a host HTTP server on loopback, the floor
//! any proxy adds to. Prints p50/p99/min per case and the daemon's own
//! accept → hand-over figure for wakes (from /metrics).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use perf::{free_port, little, Daemon};

/// Measure the platform's wake and request latency.
#[derive(Parser, Debug)]
struct Args {
    /// Requests from zero instances.
    #[arg(long, default_value_t = 30)]
    wakes: usize,
    /// Requests through a warm instance (and to the loopback server).
    #[arg(long, default_value_t = 100)]
    warm: usize,
    /// The guest kernel.
    #[arg(long, default_value = "target/guest-kernel/vmlinux")]
    kernel: PathBuf,
    /// The image to deploy.
    #[arg(long, default_value = "target/test-images/httpd.oci")]
    image: PathBuf,
    /// Its guest port.
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

/// Connect, send a GET, wait for the first byte; then drain.
fn first_byte(port: u16) -> Option<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte).ok()?;
    let t = start.elapsed();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Some(t)
}

fn report(name: &str, mut v: Vec<Duration>) {
    if v.is_empty() {
        println!("{name}: no samples");
        return;
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = |q: usize| v[(v.len() - 1) * q / 100];
    println!(
        "{name}: n={} p50 {:.3} ms  p99 {:.3} ms  min {:.3} ms",
        v.len(),
        ms(p(50)),
        ms(p(99)),
        ms(v[0])
    );
}

fn instances(sock: &std::path::Path) -> usize {
    platform::api::ps(sock)
        .ok()
        .and_then(|apps| apps.first().map(|a| a.instances.len()))
        .unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    let home = tempfile::tempdir().expect("tempdir");
    let sock = home.path().join("little.sock");
    let metrics = free_port(18080);
    let _daemon = Daemon(
        Command::new(little())
            .arg("--home")
            .arg(home.path())
            .arg("serve")
            .arg("--kernel")
            .arg(&args.kernel)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics}"))
            .stderr(Stdio::null())
            .spawn()
            .expect("little serve starts (cargo build --release --workspace)"),
    );
    while platform::api::ps(&sock).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let port = free_port(18080);
    let deploy_start = Instant::now();
    let out = Command::new(little())
        .arg("--home")
        .arg(home.path())
        .args(["deploy", "bench", "--port", &args.port.to_string()])
        .arg("--image")
        .arg(&args.image)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--idle-timeout", "200ms", "--concurrency", "10"])
        .args(["--ready-timeout", "15m"])
        .output()
        .expect("little deploy");
    assert!(
        out.status.success(),
        "deploy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "deploy (import, boot to READY, snapshot): {:.1} s, guest kernel emulated on a nested host",
        deploy_start.elapsed().as_secs_f64()
    );

    let mut wakes = Vec::new();
    for _ in 0..args.wakes {
        while instances(&sock) != 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the standby pool refill.
        std::thread::sleep(Duration::from_millis(100));
        wakes.extend(first_byte(port));
    }
    report("from zero (restore), connect -> first byte", wakes);

    let mut warm = Vec::new();
    first_byte(port);
    for _ in 0..args.warm {
        warm.extend(first_byte(port));
    }
    report("warm instance, connect -> first byte", warm);

    let host = TcpListener::bind("127.0.0.1:0").expect("bind");
    let host_port = host.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in host.incoming().flatten() {
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let mut direct = Vec::new();
    for _ in 0..args.warm {
        direct.extend(first_byte(host_port));
    }
    report(
        "host loopback server (no VM), connect -> first byte",
        direct,
    );

    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", metrics)) {
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let get = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        for (series, what) in [
            (
                "little_wake_seconds",
                "daemon, accept -> socket handed to a restored instance (host side)",
            ),
            (
                "little_restore_seconds",
                "of which the VMM's restore command -> vCPUs running",
            ),
            (
                "little_agent_resumed_seconds",
                "of which vCPUs running -> the guest agent applied RESTORED (clone safety)",
            ),
        ] {
            let (sum, count) = (
                get(&format!("{series}_sum")),
                get(&format!("{series}_count")),
            );
            if count > 0.0 {
                println!(
                    "{what}: mean {:.3} ms over {count} wakes",
                    sum / count * 1e3
                );
            }
        }
    }
}
