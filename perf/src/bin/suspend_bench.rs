//! `suspend-bench`: scale to zero by suspending, for a database with a
//! volume, next to a plain restore of the same image.
//!
//! Starts `little serve` on a fresh home and deploys the PostgreSQL test
//! image twice: `pg` with a volume at `$PGDATA` (an idle instance is
//! suspended: a diff snapshot over the deploy's, then resumed from it) and
//! `plain` without one (an idle instance is stopped; each wake restores
//! the deploy's full snapshot). Then, `--cycles` times for each app: wait
//! for the idle instance to go, then connect and send a PostgreSQL
//! StartupMessage and time connect → first byte of the reply (the
//! server's authentication request: the guest resumed, accepted, forked a
//! backend and answered). Reports, per cycle kind:
//! - suspend: pause → diff snapshot written (the VMM), and the whole
//!   suspend with the volume and snapshot `fsync`s (the daemon), from the
//!   daemon's log; memory written; the suspend file's size on disk next to
//!   the deploy snapshot's;
//! - host side of a wake, each woken from a waiting standby VMM: accept →
//!   socket handed to the restored instance (`little_wake_seconds`, per
//!   app) and the VMM's restore command → vCPUs running
//!   (`little_restore_seconds`), resume vs plain restore, and vs `pg`'s
//!   first start (its deploy snapshot with the volume attached: the same
//!   app and devices, only the memory source differs); the page runs in
//!   the last suspend file (a resume maps each one);
//! - client side: connect → first byte, resume vs plain restore.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use perf::{free_port, little, Daemon};

/// Measure suspend and resume of a database with a volume.
#[derive(Parser, Debug)]
struct Args {
    /// Suspend/resume cycles (and plain restores).
    #[arg(long, default_value_t = 10)]
    cycles: usize,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// The guest kernel.
    #[arg(long, default_value = "target/guest-kernel/vmlinux")]
    kernel: PathBuf,
    /// The PostgreSQL image.
    #[arg(long, default_value = "target/test-images/postgresql.oci")]
    image: PathBuf,
}

/// Connect, send a StartupMessage (protocol 3.0, user and database
/// `postgres`), wait for the first byte of the reply.
fn first_byte(port: u16) -> Option<Duration> {
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut msg = Vec::new();
    msg.extend_from_slice(&u32::try_from(8 + params.len()).ok()?.to_be_bytes());
    msg.extend_from_slice(&196_608u32.to_be_bytes());
    msg.extend_from_slice(params);
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(300))).ok()?;
    s.write_all(&msg).ok()?;
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte).ok()?;
    let t = start.elapsed();
    // 'R': authentication request; 'E': an error (still starting up).
    (byte[0] == b'R').then_some(t)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, mut v: Vec<f64>, unit: &str) {
    if v.is_empty() {
        println!("{name}: no samples");
        return;
    }
    v.sort_by(f64::total_cmp);
    let p = |q: usize| v[(v.len() - 1) * q / 100];
    println!(
        "{name}: n={} p50 {:.3} {unit}  p99 {:.3} {unit}  min {:.3} {unit}",
        v.len(),
        p(50),
        p(99),
        v[0]
    );
}

fn metric(port: u16, series: &str) -> f64 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0.0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `app`'s (running instances, standby VMMs).
fn instances(sock: &Path, app: &str) -> (usize, usize) {
    platform::api::ps(sock)
        .ok()
        .and_then(|apps| apps.into_iter().find(|a| a.spec.name == app))
        .map_or((0, 0), |a| (a.instances.len(), a.standby))
}

fn little_ok(home: &Path, args: &[&str]) {
    let out = Command::new(little())
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("little runs");
    assert!(
        out.status.success(),
        "little {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The suspends in the daemon's log: (memory KiB, pause → written ms,
/// whole suspend ms).
fn suspends(log: &Path) -> Vec<(f64, f64, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(": suspended instance "))
        .filter_map(|l| {
            let inner = l.split_once('(')?.1;
            let mut numbers = inner
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter(|w| !w.is_empty())
                .filter_map(|w| w.parse::<f64>().ok());
            Some((numbers.next()?, numbers.next()?, numbers.next()?))
        })
        .collect()
}

/// Waits for `app` to have no instance and a standby VMM waiting for the
/// next wake (for `pg`, once its suspend has settled: the standby restores
/// the suspend file), so that both apps are woken the same way.
fn wait_idle(sock: &Path, app: &str) {
    let began = Instant::now();
    loop {
        let (running, standby) = instances(sock, app);
        if running == 0 && standby > 0 {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(600),
            "{app}: still {running} instances and {standby} standby VMMs after 600 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let args = Args::parse();
    let home = tempfile::tempdir().expect("tempdir");
    let home = home.path();
    let sock = home.join("little.sock");
    let metrics = free_port(15432);
    let log = home.join("daemon.log");
    let _daemon = Daemon(
        Command::new(little())
            .arg("--home")
            .arg(home)
            .arg("serve")
            .arg("--kernel")
            .arg(&args.kernel)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics}"))
            .stderr(std::fs::File::create(&log).expect("daemon log"))
            .stdout(Stdio::null())
            .spawn()
            .expect("little serve starts (cargo build --release --workspace)"),
    );
    while platform::api::ps(&sock).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let image = args.image.display().to_string();
    let memory = args.memory.to_string();
    let ports = [("pg", free_port(15432)), ("plain", free_port(15432))];
    little_ok(home, &["volume", "create", "pgdata", "--size", "1G"]);
    for (app, port) in ports {
        let deploy_start = Instant::now();
        let listen = format!("127.0.0.1:{port}");
        let mut deploy = vec![
            "deploy",
            app,
            "--image",
            &image,
            "--port",
            "5432",
            "--memory",
            &memory,
            "--listen",
            &listen,
            "--idle-timeout",
            "1s",
            // Ready once it serves, not once it accepts: postgres accepts
            // while it starts up.
            "--ready-cmd",
            "pg_isready -q -t 0 -h 127.0.0.1",
            // Minutes on a nested host, whose guest kernel is emulated.
            "--ready-timeout",
            "15m",
        ];
        if app == "pg" {
            deploy.extend(["--volume", "pgdata:/var/lib/postgresql/data"]);
        }
        little_ok(home, &deploy);
        println!(
            "deploy {app} ({} MiB guest): {:.1} s, guest kernel emulated on a nested host",
            args.memory,
            deploy_start.elapsed().as_secs_f64()
        );
    }

    let mut first = [Vec::new(), Vec::new()];
    // [wake, restore][pg, plain]
    let mut host = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    // [wake, restore] of pg's first start: its deploy snapshot, with the
    // volume (every later start resumes its suspend file).
    let mut pg_first = [Vec::new(), Vec::new()];
    for cycle in 0..args.cycles {
        for (k, (app, port)) in ports.iter().enumerate() {
            wait_idle(&sock, app);
            let series = |name: &str| {
                let sum = format!("{name}_sum{{app=\"{app}\"}}");
                let count = format!("{name}_count{{app=\"{app}\"}}");
                (metric(metrics, &sum), metric(metrics, &count))
            };
            let before = [
                series("little_wake_seconds"),
                series("little_restore_seconds"),
            ];
            if let Some(t) = first_byte(*port) {
                first[k].push(ms(t));
            }
            let after = [
                series("little_wake_seconds"),
                series("little_restore_seconds"),
            ];
            for (j, ((s0, c0), (s1, c1))) in before.into_iter().zip(after).enumerate() {
                if c1 > c0 {
                    let sample = (s1 - s0) / (c1 - c0) * 1e3;
                    if k == 0 && cycle == 0 {
                        pg_first[j].push(sample);
                    } else {
                        host[j][k].push(sample);
                    }
                }
            }
        }
    }
    wait_idle(&sock, "pg");

    let taken = suspends(&log);
    report(
        "suspend, pause -> diff snapshot written (vmm)",
        taken.iter().map(|s| s.1).collect(),
        "ms",
    );
    report(
        "suspend, whole (with the volume and snapshot fsyncs)",
        taken.iter().map(|s| s.2).collect(),
        "ms",
    );
    report(
        "suspend, guest memory written",
        taken.iter().map(|s| s.0 / 1024.0).collect(),
        "MiB",
    );
    let on_disk =
        |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.blocks() * 512) as f64 / 1048576.0;
    let apps = home.join("apps");
    println!(
        "disk: suspend file {:.1} MiB, next to the deploy snapshot {:.1} MiB ({} MiB guest)",
        on_disk(apps.join("pg/suspend.snap")),
        on_disk(apps.join("pg/app.snap")),
        args.memory
    );
    let suspended = apps.join("pg/suspend.snap");
    match std::fs::File::open(&suspended)
        .map(|mut f| vmm::snapshot::format::read_state::<vmm::snapshot::MicrovmState>(&mut f))
    {
        Ok(Ok((_, state))) => println!(
            "suspend file: {} page runs (each one mapping at resume), {} pages",
            state.dirty.len(),
            state.dirty.iter().map(|r| r.1).sum::<u64>()
        ),
        Ok(Err(e)) => println!("suspend file {}: {e}", suspended.display()),
        Err(e) => println!("suspend file {}: {e}", suspended.display()),
    }
    for (j, what) in [
        "accept -> hand-over",
        "the VMM's restore command -> vCPUs running",
    ]
    .iter()
    .enumerate()
    {
        report(
            &format!("host side, resume from the suspend file ({what})"),
            host[j][0].clone(),
            "ms",
        );
        report(
            &format!("host side, plain restore of the deploy snapshot ({what})"),
            host[j][1].clone(),
            "ms",
        );
        report(
            &format!(
                "host side, the app with the volume, first start from its deploy snapshot ({what})"
            ),
            pg_first[j].clone(),
            "ms",
        );
    }
    report(
        "client, resume -> first byte of the postgres reply",
        first[0].clone(),
        "ms",
    );
    report(
        "client, plain restore -> first byte of the postgres reply",
        first[1].clone(),
        "ms",
    );
}
