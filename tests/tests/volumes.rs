//! Persistent volumes end to end: one `little serve`, one volume, and a
//! variant of the busybox httpd test image whose CGI scripts append to and
//! read a file on the volume (`sync` after each write, as a database
//! commits).
//!
//! - `little volume create`, `ls`; bad volumes refused at deploy (missing,
//!   not ext4).
//! - The deploy's first boot fills the new, empty volume with what the
//!   image has at the path (a seed file, the folder's owner).
//! - A write from zero instances (the deploy snapshot restored: the volume
//!   is as it was then); after the idle timeout the instance is suspended
//!   to disk (a diff over the deploy's snapshot) and no guest is left;
//!   the next request resumes it from that file (in the standby VMM
//!   started for it) and reads the write; `little ps` and `/metrics` say which
//!   start happened.
//! - A write, then SIGKILL of the VMM: the next request boots the app cold
//!   (the volume moved on since the last snapshot) and reads it.
//! - A backup (`volume export`) of the volume of a running app, which is
//!   suspended for it; a later write; the backup imported over the
//!   volume: the app boots cold with the backup's data. A junk archive is
//!   refused.
//! - The daemon killed while the app is suspended: a new daemon resumes
//!   it from its suspend file. A redeploy keeps the volume.
//! - One writer: a second app asking for the volume is refused, the
//!   volume cannot be removed while mounted, and can be once its app is.

// A test's helpers are not all used by every test file.
#[allow(dead_code)]
mod platform_util;

use std::path::{Path, PathBuf};
use std::time::Instant;

use image_tools::test_utils::{extend_layout, LayerBuilder};
use little_tests::{ceiling, free_port};
use platform_util::{
    allocated, args, get, kill9, little_err, little_ok, only_instance, test_image, wait_for_zero,
    wait_until, Daemon,
};

/// The uid and gid of the httpd image's user `web`.
const WEB_UID: u64 = 1000;

/// `GET /cgi-bin/put?WORD`: appends WORD to /data/log and syncs.
const PUT_CGI: &str = "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
echo \"$QUERY_STRING\" >>/data/log && /bin/busybox sync && echo stored\n";
/// `GET /cgi-bin/get`: the seed the image put at /data, then the log.
const GET_CGI: &str = "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
/bin/busybox cat /data/seed.txt; [ -e /data/log ] && /bin/busybox cat /data/log\n";

/// The httpd image with the two scripts and a seed file at /data.
fn volume_image(httpd: &Path, dir: &Path) -> PathBuf {
    let layer = LayerBuilder::new()
        .dir("data", 0o755, WEB_UID, WEB_UID)
        .file("data/seed.txt", 0o644, WEB_UID, WEB_UID, b"seed\n")
        .dir("www/cgi-bin", 0o755, 0, 0)
        .file("www/cgi-bin/put", 0o755, 0, 0, PUT_CGI.as_bytes())
        .file("www/cgi-bin/get", 0o755, 0, 0, GET_CGI.as_bytes())
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
        [
            "deploy",
            name,
            "--image",
            image,
            "--port",
            "8080",
            "--listen",
            &listen,
            "--idle-timeout",
            "1s",
            "--volume",
            volume,
        ]
        .map(String::from)
        .to_vec()
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
    assert!(said.contains("while app web was held (1 instance(s) suspended first)"), "{said}");
    assert!(daemon.app("web").instances.is_empty());
    assert_eq!(get(port, "/cgi-bin/put?three"), "stored\n");
    let start = daemon.app("web").last_start.unwrap_or_default();
    assert!(start.starts_with("resumed"), "start after the export: {start}");
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
    let e = little_err(&daemon, &["volume", "import", "data", junk.to_str().unwrap()]);
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
    assert!(start.starts_with("resumed"), "start after a daemon restart: {start}");

    // 6. A redeploy keeps the volume (its boot sees the data).
    little_ok(&daemon, &args(&deploy("web", "data:/data")));
    assert_eq!(get(port, "/cgi-bin/get"), "seed\none\ntwo\n");
    eprintln!("restart and redeploy checked after {:.1?}", started.elapsed());

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
