//! Databases with volumes, unmodified, with their real clients: the
//! Debian-built PostgreSQL and redis test images, each with a volume, on
//! the real kernel.
//!
//! PostgreSQL (`psql`, `pgbench`), one deploy shared by every step, the
//! daemon with its standby pool:
//! - from zero instances `psql` creates a table and inserts rows (the
//!   deploy's snapshot restored; the volume was filled on the host with
//!   the image's `$PGDATA`);
//! - after the idle timeout no guest is left and a suspend file is; the
//!   next `psql` resumes it and reads the rows, and `pgbench` runs a short
//!   load against it without errors;
//! - a row committed, then SIGKILL of the VMM: the next `psql` boots the
//!   app cold (postgres replays its WAL) and reads every committed row.
//!
//! Redis with `appendonly yes` (`appendfsync always`) and a volume, the
//! daemon with no standby pool: `SET` from zero VMM processes; after the
//! idle timeout not one VMM is left; `GET` resumes it with the value; a
//! second `SET`, SIGKILL of the VMM, and `GET` (a cold boot that loads the
//! append-only file) returns it.

// A test's helpers are not all used by every test file.
#[allow(dead_code)]
mod platform_util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image_tools::test_utils::{extend_layout, LayerBuilder};
use little_tests::client::{exchange, Until};
use little_tests::{ceiling, free_port};
use platform_util::{
    kill9, little_ok, only_instance, test_image, wait_for_zero, wait_until, Daemon,
};

/// The test image's superuser password (`image-tools/test-images`).
const PG_PASSWORD: &str = "little";

/// What postgres says while it starts or recovers: wait and ask again.
const NOT_YET: [&str; 4] = [
    "the database system is starting up",
    "the database system is in recovery mode",
    "not yet accepting connections",
    "the database system is not yet accepting connections",
];

/// Runs `psql -c SQL` against the app at `port` once the database accepts
/// connections (it may be replaying its WAL after a cold boot); its
/// output, or a panic with what psql said.
fn psql(port: u16, sql: &str) -> String {
    let start = Instant::now();
    loop {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .args(["-p", &port.to_string(), "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "300")
            .output()
            .expect("psql runs (scripts/setup.sh installs postgresql-client)");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            NOT_YET.iter().any(|n| stderr.contains(n)),
            "psql -c {sql:?}: {}: {stderr}",
            out.status
        );
        assert!(
            start.elapsed() < ceiling::BOOT,
            "timed out after {:.1?} waiting for postgres to accept connections: {stderr}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn postgres_keeps_its_rows_across_suspend_resume_and_a_killed_vmm() {
    let Some(image) = test_image("postgresql") else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let daemon = Daemon::start(&home);
    let port = free_port();
    little_ok(&daemon, &["volume", "create", "pgdata", "--size", "256M"]);
    little_ok(
        &daemon,
        &[
            "deploy",
            "pg",
            "--image",
            image.to_str().expect("a UTF-8 path"),
            "--port",
            "5432",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--memory",
            "256",
            "--idle-timeout",
            "2s",
            "--volume",
            "pgdata:/var/lib/postgresql/data",
        ],
    );
    eprintln!("postgres deployed after {:.1?}", started.elapsed());

    // 1. From zero: a table and rows.
    psql(
        port,
        "create table t (n int primary key, word text); insert into t values (1, 'one'), (2, 'two');",
    );
    let start = daemon.app("pg").last_start.unwrap_or_default();
    assert!(start.starts_with("restored"), "first start: {start}");

    // 2. Idle: suspended to disk; the next psql resumes it; pgbench.
    wait_for_zero(&daemon, "pg");
    wait_until("the idle instance to be suspended", ceiling::HOST, || {
        daemon.metric("little_suspends_total{app=\"pg\"}") == 1
    });
    assert!(home.join("apps/pg/suspend.snap").exists());
    assert_eq!(psql(port, "select string_agg(word, ',' order by n) from t"), "one,two\n");
    let start = daemon.app("pg").last_start.unwrap_or_default();
    assert!(start.starts_with("resumed"), "start after the suspend: {start}");
    pgbench(port, dir.path());
    eprintln!("suspend, resume and pgbench checked after {:.1?}", started.elapsed());

    // 3. A committed row, then SIGKILL of the VMM: a cold boot recovers it.
    psql(port, "insert into t values (3, 'three')");
    kill9(only_instance(&daemon, "pg"));
    assert_eq!(
        psql(port, "select string_agg(word, ',' order by n) from t"),
        "one,two,three\n"
    );
    let start = daemon.app("pg").last_start.unwrap_or_default();
    assert!(start.starts_with("booted cold"), "start after kill -9: {start}");
    eprintln!("kill -9 checked after {:.1?}", started.elapsed());
}

/// A short `pgbench` load (its own script: the built-in one needs `-i`,
/// whose 100,000 rows take minutes on an emulated guest kernel): two
/// clients, 25 transactions each, no errors.
fn pgbench(port: u16, dir: &Path) {
    psql(port, "create table bench (id serial primary key, v int)");
    let script = dir.join("bench.sql");
    std::fs::write(
        &script,
        "\\set v random(1, 1000)\nBEGIN;\nINSERT INTO bench (v) VALUES (:v);\nSELECT count(*) FROM bench WHERE v <= :v;\nEND;\n",
    )
    .expect("pgbench script");
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
        .args(["-n", "-c", "2", "-t", "25", "-f"])
        .arg(&script)
        .arg("postgres")
        .env("PGPASSWORD", PG_PASSWORD)
        .output()
        .expect("pgbench runs (scripts/setup.sh installs postgresql-contrib)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("number of failed transactions: 0"),
        "pgbench: {}: {said}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(psql(port, "select count(*) from bench"), "50\n");
}

/// The redis test image with `appendonly yes`, `appendfsync always` (a
/// write is on disk before `+OK`), its files in /var/lib/redis.
fn redis_aof_image(redis: &Path, dir: &Path) -> PathBuf {
    let conf = "bind 0.0.0.0\nprotected-mode no\nport 6379\nsave \"\"\n\
appendonly yes\nappendfsync always\ndir /var/lib/redis\n";
    let layer = LayerBuilder::new()
        .file("etc/redis/little.conf", 0o644, 0, 0, conf.as_bytes())
        .finish();
    let layout = dir.join("redis-aof.oci");
    extend_layout(redis, &layout, &layer, |_| {});
    layout
}

/// Sends one RESP command (`words` as bulk strings) and checks that the
/// reply is `expect` (waiting for all of it, which the ceiling bounds).
fn redis(port: u16, words: &[&str], expect: &str) {
    let mut command = format!("*{}\r\n", words.len());
    for w in words {
        command.push_str(&format!("${}\r\n{w}\r\n", w.len()));
    }
    let reply = exchange(
        port,
        command.as_bytes(),
        Until::Contains(expect.as_bytes()),
        ceiling::BOOT,
    )
    .unwrap_or_else(|e| panic!("{words:?}: {e}"));
    assert_eq!(String::from_utf8_lossy(&reply), expect, "{words:?}");
}

#[test]
fn redis_with_an_append_only_file_keeps_its_keys_across_suspend_and_a_killed_vmm() {
    let Some(base) = test_image("redis") else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = redis_aof_image(&base, dir.path());
    let home = dir.path().join("home");
    let daemon = Daemon::start_with(&home, &["--standby", "0"]);
    let port = free_port();
    little_ok(&daemon, &["volume", "create", "kvdata", "--size", "64M"]);
    little_ok(
        &daemon,
        &[
            "deploy",
            "kv",
            "--image",
            image.to_str().expect("a UTF-8 path"),
            "--port",
            "6379",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--memory",
            "256",
            "--idle-timeout",
            "1s",
            "--volume",
            "kvdata:/var/lib/redis",
        ],
    );
    eprintln!("redis deployed after {:.1?}", started.elapsed());
    wait_until("no vmm after the deploy", ceiling::HOST, || {
        daemon.vmm_processes().is_empty()
    });

    // From zero VMM processes: SET.
    redis(port, &["SET", "greeting", "hello"], "+OK\r\n");
    // Idle: suspended, and not one VMM left (no standby pool).
    wait_for_zero(&daemon, "kv");
    wait_until("the idle instance to be suspended", ceiling::HOST, || {
        daemon.metric("little_suspends_total{app=\"kv\"}") == 1
    });
    wait_until("no vmm process left", ceiling::HOST, || {
        daemon.vmm_processes().is_empty()
    });
    redis(port, &["GET", "greeting"], "$5\r\nhello\r\n");
    let start = daemon.app("kv").last_start.unwrap_or_default();
    assert!(start.starts_with("resumed"), "start after the suspend: {start}");

    // A SET, SIGKILL of the VMM: a cold boot loads the append-only file.
    redis(port, &["SET", "after", "kill"], "+OK\r\n");
    kill9(only_instance(&daemon, "kv"));
    redis(port, &["GET", "after"], "$4\r\nkill\r\n");
    redis(port, &["GET", "greeting"], "$5\r\nhello\r\n");
    let start = daemon.app("kv").last_start.unwrap_or_default();
    assert!(start.starts_with("booted cold"), "start after kill -9: {start}");
    eprintln!("redis checked in {:.1?}", started.elapsed());
}
