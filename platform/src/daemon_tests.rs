use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::*;
use crate::db::AppRecord;

fn at(logs: &Path, file: &str) -> PathBuf {
    crate::logs::test_path(logs, file)
}

fn settings(home: &Path) -> Settings {
    Settings {
        home: home.to_owned(),
        kernel: home.join("no-vmlinux"),
        vmm: home.join("no-vmm"),
        agent: home.join("no-agent"),
        standby: 0,
        jail: false,
        cgroups: None,
    }
}

/// A daemon on `home` with no monitor, no signal handling and no socket:
/// the tests hand its `client` one end of a socket pair.
fn daemon(home: &Path) -> Daemon {
    let claim = HomeLock::claim(home).unwrap();
    Daemon {
        settings: Arc::new(settings(home)),
        db: Db::open(&home.join("state.redb")).unwrap(),
        apps: Mutex::new(BTreeMap::new()),
        deploying: Mutex::new(()),
        claims: Mutex::new(BTreeMap::new()),
        next_id: Arc::new(AtomicU64::new(1)),
        _home: claim,
        uid: peer::my_uid(),
    }
}

/// The spec of a test app `name` with `env`.
fn spec(name: &str, env: &[&str]) -> AppSpec {
    AppSpec {
        name: name.into(),
        image: "img.tar".into(),
        port: 8080,
        listen: "127.0.0.1:0".into(),
        memory_mib: 64,
        concurrency: 4,
        min: 0,
        max: 3,
        idle_timeout_ms: 1000,
        env: env.iter().map(|e| (*e).to_owned()).collect(),
        allow_host: vec![],
        volumes: vec![],
        ready_timeout_ms: 600_000,
        ready_cmd: None,
    }
}

/// Serves an app (no instance, no standby) whose folder is `<home>/apps/web`.
fn add_app(daemon: &Daemon, env: &[&str]) -> PathBuf {
    let dir = daemon.settings.home.join("apps/web");
    home::create_dir_all(&dir.join("logs")).unwrap();
    let record = AppRecord {
        spec: spec("web", env),
        listen: "127.0.0.1:0".into(),
        snapshot: dir.join("app.snap"),
        rootfs: dir.join("rootfs.erofs"),
        dir: dir.clone(),
        deployed_unix: 1,
        uid: 0,
        volume_files: vec![],
    };
    daemon.db.put(&record).unwrap();
    let app = App::start(record, daemon.settings.clone(), daemon.next_id.clone()).unwrap();
    lock(&daemon.apps).insert("web".into(), app);
    dir.join("logs")
}

/// Sends `request` bytes to the daemon's `client` on a fresh connection;
/// returns the client end.
fn connect(daemon: &Arc<Daemon>, request: &[u8]) -> UnixStream {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let me = daemon.clone();
    std::thread::spawn(move || me.client(theirs));
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    ours.write_all(request).unwrap();
    ours
}

fn response(reader: &mut impl BufRead) -> Response {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Whether the daemon closed the connection: a read ends (a reset is a
/// close with our unread bytes still queued on its side).
fn closed(reader: &mut impl Read) -> bool {
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// A client that sends 2 MiB without a newline gets one error line, and
/// the connection is closed.
#[test]
fn an_over_long_request_gets_an_error_and_the_connection_closes() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Arc::new(daemon(home.path()));
    let (ours, theirs) = UnixStream::pair().unwrap();
    let me = daemon.clone();
    let served = std::thread::spawn(move || me.client(theirs));
    let mut writer = ours.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        while sent < 2 << 20 {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(&ours);
    let answer = response(&mut reader);
    assert!(!answer.ok);
    assert_eq!(
        answer.error.as_deref(),
        Some("request longer than 1048576 bytes")
    );
    served.join().unwrap();
    assert!(closed(&mut reader));
    assert!(flood.join().unwrap() < 2 << 20, "the daemon read it all");
}

#[test]
fn a_malformed_request_gets_an_error_line() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Arc::new(daemon(home.path()));
    let ours = connect(&daemon, b"{\"op\":\"fly\"}\n");
    let mut reader = BufReader::new(&ours);
    let answer = response(&mut reader);
    let error = answer.error.unwrap_or_default();
    assert!(error.starts_with("malformed request: "), "{error}");
    assert!(closed(&mut reader));
}

/// `ps` shows env keys with masked values; `show_env` shows the values.
#[test]
fn ps_masks_env_values_unless_asked() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Arc::new(daemon(home.path()));
    add_app(&daemon, &["TOKEN=s3cret", "MODE=a=b"]);
    let env_of = |request: &[u8]| {
        let ours = connect(&daemon, request);
        let answer = response(&mut BufReader::new(&ours));
        let apps: Vec<crate::api::AppStatus> = serde_json::from_value(answer.data).unwrap();
        apps[0].spec.env.clone()
    };
    assert_eq!(env_of(b"{\"op\":\"ps\"}\n"), ["TOKEN=***", "MODE=***"]);
    assert_eq!(
        env_of(b"{\"op\":\"ps\",\"show_env\":true}\n"),
        ["TOKEN=s3cret", "MODE=a=b"]
    );
    lock(&daemon.apps).values().for_each(|a| a.stop());
}

/// `scale` changes a serving app's settings in `ps` and in the database
/// (what a restarted daemon serves); a change a deploy would refuse, an
/// empty one and an unknown app each get an error and change nothing.
#[test]
fn scale_changes_a_serving_app_and_its_record() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Arc::new(daemon(home.path()));
    add_app(&daemon, &[]);
    let ask = |request: &[u8]| response(&mut BufReader::new(&connect(&daemon, request)));
    let answer =
        ask(b"{\"op\":\"scale\",\"app\":\"web\",\"max\":5,\"min\":1,\"idle_timeout_ms\":2500}\n");
    assert!(answer.ok, "{:?}", answer.error);
    let status: crate::api::AppStatus = serde_json::from_value(answer.data).unwrap();
    let scaled = |spec: &AppSpec| (spec.min, spec.max, spec.concurrency, spec.idle_timeout_ms);
    assert_eq!(scaled(&status.spec), (1, 5, 4, 2500));
    let stored = |daemon: &Daemon| scaled(&daemon.db.list().unwrap()[0].spec);
    assert_eq!(stored(&daemon), (1, 5, 4, 2500));
    for (request, why) in [
        (
            &b"{\"op\":\"scale\",\"app\":\"web\",\"min\":9}\n"[..],
            "min <= max",
        ),
        (
            b"{\"op\":\"scale\",\"app\":\"web\",\"concurrency\":0}\n",
            "concurrency >= 1",
        ),
        (b"{\"op\":\"scale\",\"app\":\"web\"}\n", "nothing to change"),
        (
            b"{\"op\":\"scale\",\"app\":\"nope\",\"max\":2}\n",
            "no app named",
        ),
    ] {
        let answer = ask(request);
        let error = answer.error.unwrap_or_default();
        assert!(!answer.ok && error.contains(why), "{why}: {error}");
    }
    assert_eq!(stored(&daemon), (1, 5, 4, 2500));
    let ps = ask(b"{\"op\":\"ps\"}\n");
    let apps: Vec<crate::api::AppStatus> = serde_json::from_value(ps.data).unwrap();
    assert_eq!(scaled(&apps[0].spec), (1, 5, 4, 2500));
    lock(&daemon.apps).values().for_each(|a| a.stop());
}

#[test]
fn deploys_of_different_apps_claim_their_own_users_and_an_app_one_deploy() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Arc::new(daemon(home.path()));
    let spec = |name: &str| spec(name, &[]);
    let (a, _, uid_a) = daemon.claim(&spec("a")).unwrap();
    let (b, _, uid_b) = daemon.claim(&spec("b")).unwrap();
    assert_ne!(uid_a, uid_b, "two new apps deployed side by side");
    let again = daemon.claim(&spec("a")).err().unwrap_or_default();
    assert!(again.contains("a deploy of \"a\" is under way"), "{again}");
    let ask = |request: &[u8]| response(&mut BufReader::new(&connect(&daemon, request)));
    let rm = ask(b"{\"op\":\"rm\",\"app\":\"b\"}\n");
    assert!(
        !rm.ok && rm.error.unwrap_or_default().contains("under way"),
        "rm during the deploy"
    );
    drop(a);
    let (_a, _, uid) = daemon
        .claim(&spec("a"))
        .expect("a deploy that ended gave its claim back");
    assert_ne!(uid, uid_b);
    drop(b);
}

#[test]
fn instance_ids_go_on_after_the_logs_of_the_last_daemon() {
    let home = tempfile::tempdir().unwrap();
    let daemon = daemon(home.path());
    let logs = add_app(&daemon, &[]);
    let records = daemon.db.list().unwrap();
    assert_eq!(first_instance_id(&records), 1, "no instance log yet");
    for name in ["boot", "3", "17", "9"] {
        home::create_dir_all(&logs.join(name)).unwrap();
    }
    assert_eq!(first_instance_id(&records), 18);
    lock(&daemon.apps).values().for_each(|a| a.stop());
}

/// `logs` answers `ok`, then streams each VM's `.1` before its current
/// file and closes; an unknown app gets an error line.
#[test]
fn logs_stream_after_an_ok_line() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Arc::new(daemon(home.path()));
    let logs = add_app(&daemon, &[]);
    std::fs::write(at(&logs, "boot.log"), "booted\n").unwrap();
    std::fs::write(at(&logs, "1.log.1"), "older\n").unwrap();
    std::fs::write(at(&logs, "1.log"), "newer\n").unwrap();

    let ours = connect(&daemon, b"{\"op\":\"logs\",\"app\":\"web\"}\n");
    let mut reader = BufReader::new(&ours);
    assert!(response(&mut reader).ok);
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    assert_eq!(text, "==> boot <==\nbooted\n==> 1 <==\nolder\nnewer\n");

    let ours = connect(&daemon, b"{\"op\":\"logs\",\"app\":\"db\"}\n");
    let answer = response(&mut BufReader::new(&ours));
    assert_eq!(answer.error.as_deref(), Some("no app named \"db\""));
    lock(&daemon.apps).values().for_each(|a| a.stop());
}

/// `logs --follow` keeps streaming across a rotation and while a redeploy
/// has the app out of service, and ends when the app is removed.
#[test]
fn following_logs_survive_rotation_and_end_with_the_app() {
    let home = tempfile::tempdir().unwrap();
    let daemon = Arc::new(daemon(home.path()));
    let logs = add_app(&daemon, &[]);
    std::fs::write(at(&logs, "1.log"), "a\n").unwrap();
    let ours = connect(
        &daemon,
        b"{\"op\":\"logs\",\"app\":\"web\",\"follow\":true}\n",
    );
    let mut reader = BufReader::new(&ours);
    assert!(response(&mut reader).ok);
    let mut line = String::new();
    for expected in ["==> 1 <==\n", "a\n"] {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, expected);
    }
    std::fs::rename(at(&logs, "1.log"), at(&logs, "1.log.1")).unwrap();
    std::fs::write(at(&logs, "1.log"), "b\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "b\n");

    // A redeploy takes the app out of service while it boots.
    let app = lock(&daemon.apps).remove("web").unwrap();
    std::thread::sleep(FOLLOW_POLL * 2);
    std::fs::write(at(&logs, "boot.log"), "redeploying\n").unwrap();
    for expected in ["==> boot <==\n", "redeploying\n"] {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, expected);
    }
    lock(&daemon.apps).insert("web".into(), app);

    let rm = connect(&daemon, b"{\"op\":\"rm\",\"app\":\"web\"}\n");
    assert!(response(&mut BufReader::new(&rm)).ok);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "the stream ends once the app is gone");
}

/// A second daemon on a claimed home stops at the claim: before its own
/// checks (the tools here do not exist) and before leftover instances are killed.
#[test]
fn a_second_daemon_on_a_home_stops_before_anything_else() {
    let home = tempfile::tempdir().unwrap();
    let _first = HomeLock::claim(home.path()).unwrap();
    let Err(e) = Daemon::open(settings(home.path())) else {
        panic!("a second daemon opened the home");
    };
    assert_eq!(
        e.to_string(),
        format!(
            "another daemon serves {} (pid {})",
            home.path().display(),
            std::process::id()
        )
    );
    assert!(!home.path().join("apps").exists());
    assert!(!home.path().join("state.redb").exists());
}

/// The other end of `a_client_of_another_uid_is_refused`: run by that test
/// as another user, it asks `ps` as the CLI does and prints the answer.
#[test]
#[ignore = "a helper: runs as another uid from a_client_of_another_uid_is_refused"]
fn other_uid_client() {
    let Some(sock) = std::env::var_os("LITTLE_TEST_SOCK") else {
        return;
    };
    match crate::api::ps(Path::new(&sock)) {
        Ok(apps) => println!("REPLY:ok {apps:?}"),
        Err(e) => println!("REPLY:{}", error_chain(&e)),
    }
}

/// A client with another uid is refused with a clear message (one error
/// line, sent before its request is read) even when the socket's mode
/// lets it connect (here loosened on purpose). Needs root, to run the
/// client as `nobody`.
#[test]
fn a_client_of_another_uid_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if peer::my_uid() != 0 {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let daemon = Arc::new(daemon(home.path()));
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = open.path().join("api.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let me = daemon.clone();
    let served = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        me.client(stream);
    });
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "daemon::tests::other_uid_client"])
        .args(["--ignored", "--nocapture", "--test-threads=1"])
        .env("LITTLE_TEST_SOCK", &sock)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    served.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reply = stdout
        .split("REPLY:")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| {
            panic!(
                "no reply: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(
        reply,
        "permission denied: this daemon answers uid 0 and root, not uid 65534"
    );
}
