//! Apps with volumes, end to end on the real kernel, in one test binary
//! so that its three tests share the machine's cores (each boots its own
//! daemon and guests).
//!
//! ## The httpd image with a volume
//!
//! One `little serve`, one volume, and a variant of the busybox httpd test
//! image whose CGI scripts append to and read a file on the volume
//! (`sync` after each write, as a database commits).
//!
//! - `little volume create`, `ls`; bad volumes refused at deploy (missing,
//!   not ext4).
//! - The deploy's first boot fills the new, empty volume with what the
//!   image has at the path (a seed file, the folder's owner).
//! - A write from zero instances (the deploy snapshot restored: the volume
//!   is as it was then); after the idle timeout the instance is suspended
//!   to disk (a diff over the deploy's snapshot) and no guest is left;
//!   the next request resumes it from that file (in the standby VMM
//!   started for it) and reads the write; `little ps` and `/metrics` say
//!   which start happened.
//! - A write, then SIGKILL of the VMM: the next request boots the app cold
//!   (the volume moved on since the last snapshot) and reads it.
//! - A full volume: the app's write fails with "No space left on device"
//!   and loses nothing written before; once freed, writes go on.
//! - A backup (`volume export`) of the volume of a running app, which is
//!   suspended for it; a later write; the backup imported over the
//!   volume: the app boots cold with the backup's data. A junk archive is
//!   refused.
//! - The daemon killed while the app is suspended: a new daemon resumes
//!   it from its suspend file. A redeploy keeps the volume.
//! - One writer: a second app asking for the volume is refused, the
//!   volume cannot be removed while mounted, and can be once its app is.
//!
//! ## Databases
//!
//! Unmodified, with their real clients: the Debian-built PostgreSQL and
//! redis test images.
//!
//! PostgreSQL (`psql`, `pgbench`), one deploy shared by every step, the
//! daemon with its standby pool, `--ready-cmd 'pg_isready'` (postgres
//! accepts while it starts up or recovers), so no `psql` is retried:
//! - from zero instances `psql` creates a table and inserts rows (the
//!   deploy's snapshot restored; the volume was filled on the host with
//!   the image's `$PGDATA`);
//! - after the idle timeout no guest is left and a suspend file is; the
//!   next `psql` resumes it and reads the rows, and `pgbench` runs a short
//!   load against it without errors;
//! - a row committed, then SIGKILL of the VMM: the next `psql` boots the
//!   app cold (postgres replays its WAL) and reads every committed row.
//!
//! Redis with `appendonly yes` (`appendfsync always`), its image declaring
//! `VOLUME /var/lib/redis` and deployed without `--volume` (it gets a
//! volume of its own), the daemon with no standby pool: `SET` from zero
//! VMM processes; after the idle timeout not one VMM is left; `GET` spawns
//! one and resumes the app with the value; a second `SET`, SIGKILL of the
//! VMM, and `GET` (a cold boot that loads the append-only file) returns
//! it.

// A test's helpers are not all used by every test file.
#[allow(dead_code)]
mod platform_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image_tools::test_utils::{extend_layout, LayerBuilder};
use little_tests::{ceiling, free_port};
use platform_util::{
    allocated, args, deploy_args, get, kill9, little_err, little_ok, only_instance, test_image,
    wait_for_zero, wait_until, Daemon,
};

/// The test image's superuser password (`image-tools/test-images`).
const PG_PASSWORD: &str = "little";

/// The ready command the postgres app is deployed with: postgres accepts
/// on its port while it starts up or recovers, and only `pg_isready`
/// tells when it serves.
const PG_READY: &str = "pg_isready -q -t 0 -h 127.0.0.1";

/// Runs `psql -c SQL` against the app at `port`: its output, or a panic
/// with what psql said. No retry: every start (restore, resume, cold
/// boot) hands the connection over only once the app is ready.
fn psql(port: u16, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args([
            "-p",
            &port.to_string(),
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", PG_PASSWORD)
        .env("PGCONNECT_TIMEOUT", &ceiling::BOOT.as_secs().to_string())
        .output()
        .expect("psql runs (scripts/setup.sh installs postgresql-client)");
    assert!(
        out.status.success(),
        "psql -c {sql:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
            "--ready-cmd",
            PG_READY,
            platform_util::READY_TIMEOUT[0],
            platform_util::READY_TIMEOUT[1],
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
    assert_eq!(
        psql(port, "select string_agg(word, ',' order by n) from t"),
        "one,two\n"
    );
    let start = daemon.app("pg").last_start.unwrap_or_default();
    assert!(
        start.starts_with("resumed"),
        "start after the suspend: {start}"
    );
    pgbench(port, dir.path());
    eprintln!(
        "suspend, resume and pgbench checked after {:.1?}",
        started.elapsed()
    );

    // 3. A committed row, then SIGKILL of the VMM: a cold boot recovers it.
    psql(port, "insert into t values (3, 'three')");
    kill9(only_instance(&daemon, "pg"));
    assert_eq!(
        psql(port, "select string_agg(word, ',' order by n) from t"),
        "one,two,three\n"
    );
    let start = daemon.app("pg").last_start.unwrap_or_default();
    assert!(
        start.starts_with("booted cold"),
        "start after kill -9: {start}"
    );
    eprintln!("kill -9 checked after {:.1?}", started.elapsed());
}

/// A short `pgbench` load with its own read-only script (the built-in
/// one needs `-i`, whose 100,000 rows, and any write load's WAL syncs,
/// take minutes through an emulated guest kernel): two clients, ten
/// transactions each, no errors.
fn pgbench(port: u16, dir: &Path) {
    let script = dir.join("bench.sql");
    std::fs::write(
        &script,
        "\\set n random(1, 2)\nSELECT word FROM t WHERE n = :n;\n",
    )
    .expect("pgbench script");
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
        .args(["-n", "-c", "2", "-t", "10", "-f"])
        .arg(&script)
        .arg("postgres")
        .env("PGPASSWORD", PG_PASSWORD)
        .output()
        .expect("pgbench runs (scripts/setup.sh installs postgresql-contrib)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("number of transactions actually processed: 20/20"),
        "pgbench: {}: {said}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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
    extend_layout(redis, &layout, &layer, |config| {
        // Docker's `VOLUME /var/lib/redis`.
        let declared = [("/var/lib/redis".to_owned(), serde_json::json!({}))];
        config.volumes = Some(declared.into_iter().collect());
    });
    layout
}

/// One whole RESP reply from `stream`: a line, and for a bulk string
/// (`$n`) its `n` bytes and their line end.
fn resp_reply(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte)?;
        reply.push(byte[0]);
        if reply.ends_with(b"\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&reply).into_owned();
    if let Some(n) = head
        .strip_prefix('$')
        .and_then(|n| n.trim().parse::<usize>().ok())
    {
        let mut body = vec![0u8; n + 2];
        stream.read_exact(&mut body)?;
        reply.extend(body);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// Sends one RESP command (`words` as bulk strings) and checks that the
/// reply is `expect`. Redis answers `-LOADING` while it reads its
/// append-only file after a cold boot (it listens first): the command is
/// sent again until it has loaded.
fn redis(port: u16, words: &[&str], expect: &str) {
    let mut command = format!("*{}\r\n", words.len());
    for w in words {
        command.push_str(&format!("${}\r\n{w}\r\n", w.len()));
    }
    let start = Instant::now();
    loop {
        let reply = TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                s.set_read_timeout(Some(ceiling::BOOT))?;
                s.write_all(command.as_bytes())?;
                resp_reply(&mut s)
            })
            .unwrap_or_else(|e| panic!("{words:?} after {:.1?}: {e}", start.elapsed()));
        if !reply.starts_with("-LOADING") {
            assert_eq!(reply, expect, "{words:?}");
            return;
        }
        assert!(
            start.elapsed() < ceiling::BOOT,
            "timed out after {:.1?}: redis still loading",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
            platform_util::READY_TIMEOUT[0],
            platform_util::READY_TIMEOUT[1],
        ],
    );
    eprintln!("redis deployed after {:.1?}", started.elapsed());
    // The path the image declares got the app's own volume.
    let listed = little_ok(&daemon, &["volume", "ls"]);
    let private = platform::volume::private_name("kv", "/var/lib/redis");
    assert!(
        listed.contains(&format!("{private}  1024 MiB")) && listed.contains("mounted by kv"),
        "{listed}"
    );
    assert_eq!(daemon.app("kv").spec.max, 1, "one writer");
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
    assert!(
        start.starts_with("resumed"),
        "start after the suspend: {start}"
    );
    assert_eq!(daemon.vmm_processes().len(), 1, "the wake spawned one VMM");

    // A SET, SIGKILL of the VMM: a cold boot loads the append-only file.
    redis(port, &["SET", "after", "kill"], "+OK\r\n");
    kill9(only_instance(&daemon, "kv"));
    redis(port, &["GET", "after"], "$4\r\nkill\r\n");
    redis(port, &["GET", "greeting"], "$5\r\nhello\r\n");
    let start = daemon.app("kv").last_start.unwrap_or_default();
    assert!(
        start.starts_with("booted cold"),
        "start after kill -9: {start}"
    );
    eprintln!("redis checked in {:.1?}", started.elapsed());
}

/// The uid and gid of the httpd image's user `web`.
const WEB_UID: u64 = 1000;

/// `GET /cgi-bin/put?WORD`: appends WORD to /data/log and syncs.
const PUT_CGI: &str = "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
echo \"$QUERY_STRING\" >>/data/log && /bin/busybox sync && echo stored\n";
/// `GET /cgi-bin/get`: the seed the image put at /data, then the log.
const GET_CGI: &str = "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
/bin/busybox cat /data/seed.txt; [ -e /data/log ] && /bin/busybox cat /data/log\n";

/// `GET /cgi-bin/fill`: fills the volume with the largest file it can
/// allocate (`fallocate`, so nothing is written), then writes into what
/// is left until the volume is full, then frees it all.
const FILL_CGI: &str = "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
n=64; while [ $n -gt 0 ] && ! /bin/busybox fallocate -l ${n}M /data/big 2>/dev/null; \
do n=$((n - 1)); done\n\
echo \"allocated ${n} MiB\"\n\
/bin/busybox dd if=/dev/zero of=/data/more bs=64k count=64 2>&1\n\
/bin/busybox rm -f /data/big /data/more && /bin/busybox sync && echo freed\n";

/// The httpd image with the scripts and a seed file at /data.
fn volume_image(httpd: &Path, dir: &Path) -> PathBuf {
    let layer = LayerBuilder::new()
        .dir("data", 0o755, WEB_UID, WEB_UID)
        .file("data/seed.txt", 0o644, WEB_UID, WEB_UID, b"seed\n")
        .dir("www/cgi-bin", 0o755, 0, 0)
        .file("www/cgi-bin/put", 0o755, 0, 0, PUT_CGI.as_bytes())
        .file("www/cgi-bin/get", 0o755, 0, 0, GET_CGI.as_bytes())
        .file("www/cgi-bin/fill", 0o755, 0, 0, FILL_CGI.as_bytes())
        .finish();
    let layout = dir.join("volume.oci");
    extend_layout(httpd, &layout, &layer, |_| {});
    layout
}

#[test]
fn a_volume_keeps_an_apps_writes_across_scale_to_zero_and_kills() {
    let Some(httpd) = test_image("httpd") else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let daemon = Daemon::start(&home);
    let image = volume_image(&httpd, dir.path());
    let image = image.to_str().expect("a UTF-8 path");

    little_ok(&daemon, &["volume", "create", "data", "--size", "64M"]);
    let listed = little_ok(&daemon, &["volume", "ls"]);
    assert!(
        listed.contains("data") && listed.contains("unused"),
        "{listed}"
    );

    // Bad volumes are refused before anything boots.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let deploy = |name: &str, volume: &str| -> Vec<String> {
        deploy_args(
            name,
            image,
            "8080",
            &listen,
            &["--idle-timeout", "1s", "--volume", volume],
        )
    };
    let e = little_err(&daemon, &args(&deploy("web", "missing:/data")));
    assert!(e.contains("no volume named \"missing\""), "{e}");
    std::fs::write(home.join("volumes/junk.ext4"), vec![0u8; 1 << 20]).expect("junk volume");
    let e = little_err(&daemon, &args(&deploy("web", "junk:/data")));
    assert!(e.contains("not an ext4 filesystem"), "{e}");
    let mut too_many = deploy("web", "data:/data");
    too_many.extend(["--max".into(), "2".into()]);
    let e = little_err(&daemon, &args(&too_many));
    assert!(e.contains("one instance at a time"), "{e}");

    little_ok(&daemon, &args(&deploy("web", "data:/data")));
    eprintln!("deployed after {:.1?}", started.elapsed());

    // 1. The new volume was filled from the image; a write from zero.
    let body = get(port, "/cgi-bin/get");
    assert_eq!(body, "seed\n", "the volume holds the image's /data");
    assert_eq!(get(port, "/cgi-bin/put?one"), "stored\n");
    let app = daemon.app("web");
    let start = app.last_start.unwrap_or_default();
    assert!(start.starts_with("restored"), "first start: {start}");

    // 2. Idle: suspended to disk, no guest left (only the standby VMM,
    //    which has none, for the suspend file); the next request resumes
    //    it, with the write.
    wait_for_zero(&daemon, "web");
    wait_until("the idle instance to be suspended", ceiling::HOST, || {
        daemon.metric("little_suspends_total{app=\"web\"}") == 1
    });
    wait_until(
        "the only VMM left to be the standby for the suspend file",
        ceiling::HOST,
        || {
            let app = daemon.app("web");
            app.instances.is_empty() && app.standby == 1 && daemon.vmm_processes().len() == 1
        },
    );
    let app_dir = home.join("apps/web");
    assert!(
        !app_dir.join("volumes.moved").exists(),
        "the suspend left a snapshot matching the volume"
    );
    // A diff over the deploy's snapshot: the pages the instance wrote.
    let full = allocated(&app_dir.join("app.snap"));
    let diff = allocated(&app_dir.join("suspend.snap"));
    assert!(
        diff < full,
        "the suspend file ({diff} bytes on disk) is a diff, smaller than the snapshot ({full})"
    );
    assert_eq!(get(port, "/cgi-bin/get"), "seed\none\n");
    let start = daemon.app("web").last_start.unwrap_or_default();
    assert!(start.starts_with("resumed"), "second start: {start}");
    assert_eq!(daemon.metric("little_cold_boots_total{app=\"web\"}"), 0);
    eprintln!("suspend and resume checked after {:.1?}", started.elapsed());

    // 3. A synced write survives SIGKILL of its VMM.
    assert_eq!(get(port, "/cgi-bin/put?two"), "stored\n");
    kill9(only_instance(&daemon, "web"));
    assert_eq!(get(port, "/cgi-bin/get"), "seed\none\ntwo\n");
    let start = daemon.app("web").last_start.unwrap_or_default();
    assert!(
        start.starts_with("booted cold"),
        "start after kill -9: {start}"
    );
    assert_eq!(daemon.metric("little_cold_boots_total{app=\"web\"}"), 1);
    eprintln!("kill -9 checked after {:.1?}", started.elapsed());

    // A full volume: the app's write fails with ENOSPC and what it wrote
    // before stays; once it frees the space, it writes again (below).
    let filled = get(port, "/cgi-bin/fill");
    assert!(
        filled.contains("No space left on device") && filled.ends_with("freed\n"),
        "{filled}"
    );
    assert_eq!(get(port, "/cgi-bin/get"), "seed\none\ntwo\n");
    eprintln!("a full volume checked after {:.1?}", started.elapsed());

    // 4. A backup of the running app's volume (it is suspended for it),
    //    a write, then the backup imported over the volume: the app boots
    //    cold with the backup's data (its suspend file no longer matches).
    let backup = dir.path().join("backup.tar");
    let out = std::process::Command::new(little_tests::release_bin("little"))
        .arg("--home")
        .arg(&home)
        .args(["volume", "export", "data"])
        .stdout(std::fs::File::create(&backup).expect("backup file"))
        .output()
        .expect("little volume export runs");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "export: {said}");
    assert!(
        said.contains("while app web was held (1 instance(s) suspended first)"),
        "{said}"
    );
    assert!(daemon.app("web").instances.is_empty());
    assert_eq!(get(port, "/cgi-bin/put?three"), "stored\n");
    let start = daemon.app("web").last_start.unwrap_or_default();
    assert!(
        start.starts_with("resumed"),
        "start after the export: {start}"
    );
    let backup_arg = backup.to_str().expect("a UTF-8 path");
    let said = little_ok(&daemon, &["volume", "import", "data", backup_arg]);
    assert!(said.contains("imported volume data"), "{said}");
    assert_eq!(get(port, "/cgi-bin/get"), "seed\none\ntwo\n");
    let start = daemon.app("web").last_start.unwrap_or_default();
    assert!(
        start.starts_with("booted cold") && start.contains("was changed since its snapshot"),
        "start after the import: {start}"
    );
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, b"junk").expect("junk archive");
    let e = little_err(
        &daemon,
        &[
            "volume",
            "import",
            "data",
            junk.to_str().expect("a UTF-8 path"),
        ],
    );
    assert!(e.contains("cannot import"), "{e}");
    eprintln!("export and import checked after {:.1?}", started.elapsed());

    // 5. The daemon killed while the app is suspended: a new one resumes
    //    it from its suspend file, with its data.
    wait_for_zero(&daemon, "web");
    wait_until("the instance to be suspended again", ceiling::HOST, || {
        daemon.metric("little_suspends_total{app=\"web\"}") >= 1
            && home.join("apps/web/suspend.snap").exists()
            && !home.join("apps/web/volumes.moved").exists()
    });
    drop(daemon);
    let daemon = Daemon::start(&home);
    assert_eq!(get(port, "/cgi-bin/get"), "seed\none\ntwo\n");
    let start = daemon.app("web").last_start.unwrap_or_default();
    assert!(
        start.starts_with("resumed"),
        "start after a daemon restart: {start}"
    );

    // 6. A redeploy keeps the volume (its boot sees the data).
    little_ok(&daemon, &args(&deploy("web", "data:/data")));
    assert_eq!(get(port, "/cgi-bin/get"), "seed\none\ntwo\n");
    eprintln!(
        "restart and redeploy checked after {:.1?}",
        started.elapsed()
    );

    // 4. One writer.
    let e = little_err(&daemon, &args(&deploy("other", "data:/data")));
    assert!(e.contains("mounted by app \"web\""), "{e}");
    let e = little_err(&daemon, &["volume", "rm", "data"]);
    assert!(e.contains("used by app \"web\""), "{e}");
    let listed = little_ok(&daemon, &["volume", "ls"]);
    assert!(listed.contains("mounted by web"), "{listed}");
    little_ok(&daemon, &["rm", "web"]);
    little_ok(&daemon, &["volume", "rm", "data"]);
    eprintln!("volumes checked in {:.1?}", started.elapsed());
}
