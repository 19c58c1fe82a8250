//! Snapshots end to end: boot the real kernel with the agent once, snapshot
//! it through the control socket, restore three clones at once from the one
//! file, check each answers on its own console and none sees another's
//! writes, and check that damaged snapshot files give clear errors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use little_tests::{agent_initramfs, api, ceiling, kernel, run_vmm, VmmProcess};

/// Reads console lines; remembers each in /tmp (guest memory, tmpfs) and
/// prints how many it has seen, so a clone that saw another clone's line
/// would count too many.
const AGENT_CONF: &str = r#"arg=/bin/sh
arg=-c
arg=echo ready; while read line; do echo "$line" >> /tmp/seen; echo "got: $line seen=$(/bin/busybox wc -l < /tmp/seen)"; done
env=PATH=/bin
"#;

struct Snapshot {
    _dir: tempfile::TempDir,
    path: PathBuf,
    reply: String,
}

fn snapshot() -> &'static Snapshot {
    static SNAP: OnceLock<Snapshot> = OnceLock::new();
    SNAP.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let initrd = agent_initramfs(dir.path(), AGENT_CONF);
        let sock = dir.path().join("api.sock");
        let path = dir.path().join("app.snap");
        let k = kernel();
        let mut vmm = VmmProcess::spawn(&[
            "--kernel",
            k.to_str().expect("utf-8"),
            "--initrd",
            initrd.to_str().expect("utf-8"),
            "--mem",
            "64",
            "--api-sock",
            sock.to_str().expect("utf-8"),
        ]);
        let booted = vmm
            .wait_for("ready", ceiling::BOOT)
            .unwrap_or_else(|e| panic!("the guest never got ready: {e}"));
        eprintln!("host speed: the guest booted to its entrypoint in {booted:.1?}");
        let reply = api(&sock, &format!("snapshot {}", path.display()));
        assert_eq!(api(&sock, "quit"), "ok");
        let status = vmm.wait(ceiling::HOST).expect("vmm quits");
        assert!(status.success(), "quit exits 0: {}", vmm.stderr());
        Snapshot {
            _dir: dir,
            path,
            reply,
        }
    })
}

#[test]
fn snapshot_reply_reports_a_sparse_image() {
    let s = snapshot();
    assert!(s.reply.starts_with("ok "), "{}", s.reply);
    let meta = std::fs::metadata(&s.path).expect("snapshot exists");
    use std::os::unix::fs::MetadataExt;
    let allocated = meta.blocks() * 512;
    assert!(meta.len() > 64 << 20, "holds the whole 64 MiB image");
    assert!(
        allocated < meta.len() / 2,
        "zero pages are holes: {allocated} of {} bytes allocated",
        meta.len()
    );
}

#[test]
fn three_clones_run_at_once_and_do_not_share_writes() {
    let s = snapshot();
    let path = s.path.to_str().expect("utf-8");
    let mut clones: Vec<VmmProcess> = (0..3)
        .map(|_| VmmProcess::spawn(&["--snapshot", path, "--console-input"]))
        .collect();
    for (i, clone) in clones.iter_mut().enumerate() {
        clone.send(&format!("first-{i}\n"));
    }
    for (i, clone) in clones.iter_mut().enumerate() {
        let want = format!("got: first-{i} seen=1");
        if let Err(e) = clone.wait_for(&want, ceiling::GUEST) {
            panic!("clone {i}: {e}");
        }
    }
    for (i, clone) in clones.iter_mut().enumerate() {
        clone.send(&format!("second-{i}\n"));
    }
    for (i, clone) in clones.iter_mut().enumerate() {
        let want = format!("got: second-{i} seen=2");
        if let Err(e) = clone.wait_for(&want, ceiling::GUEST) {
            panic!("clone {i} counts only its own lines: {e}");
        }
        assert!(!clone.stdout().contains("seen=3"), "{}", clone.stdout());
    }
}

fn damaged(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = std::fs::read(&snapshot().path).expect("read snapshot");
    edit(&mut bytes);
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write");
    (dir, path)
}

fn assert_refused(path: &Path, expect: &str) {
    let run = run_vmm(
        &["--snapshot", path.to_str().expect("utf-8")],
        ceiling::HOST,
    );
    let status = run.status.expect("exits by itself");
    assert_eq!(status.code(), Some(1), "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(expect),
        "{:?} should say {expect:?}",
        run.stderr
    );
}

#[test]
fn truncated_snapshot_is_refused() {
    let (_d, p) = damaged("cut.snap", |b| b.truncate(b.len() / 2));
    assert_refused(&p, "truncated");
}

#[test]
fn corrupt_state_is_refused() {
    let (_d, p) = damaged("flip.snap", |b| b[200] ^= 0x55);
    assert_refused(&p, "checksum mismatch");
}

#[test]
fn foreign_file_is_refused() {
    let (_d, p) = damaged("junk.snap", |b| b[..8].copy_from_slice(b"NOTASNAP"));
    assert_refused(&p, "bad magic");
}

#[test]
fn other_version_is_refused() {
    let (_d, p) = damaged("v9.snap", |b| b[8] = 9);
    assert_refused(&p, "version 9 is not supported");
}

#[test]
fn missing_snapshot_is_refused() {
    assert_refused(Path::new("/nonexistent/app.snap"), "cannot open snapshot");
}

/// Suspend a running clone to a diff snapshot (only the pages it changed
/// since its restore) and resume it later from there.
#[test]
fn diff_snapshot_suspends_and_resumes_a_clone() {
    use std::os::unix::fs::MetadataExt;
    let s = snapshot();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("clone.sock");
    let diff = dir.path().join("clone.diff");
    let mut clone = VmmProcess::spawn(&[
        "--snapshot",
        s.path.to_str().expect("utf-8"),
        "--console-input",
        "--api-sock",
        sock.to_str().expect("utf-8"),
    ]);
    clone.send("before-suspend\n");
    if let Err(e) = clone.wait_for("got: before-suspend seen=1", ceiling::GUEST) {
        panic!("{e}");
    }
    let reply = api(&sock, &format!("snapshot-diff {}", diff.display()));
    assert!(reply.starts_with("ok "), "{reply}");
    assert_eq!(api(&sock, "quit"), "ok");
    assert!(clone.wait(ceiling::HOST).is_some_and(|s| s.success()));

    let full = std::fs::metadata(&s.path).expect("full").blocks();
    let small = std::fs::metadata(&diff).expect("diff").blocks();
    assert!(
        small * 4 < full,
        "diff holds only dirtied pages: {small} vs {full} blocks"
    );

    // The resume maps the diff's pages; a second suspend must still hold
    // them all, the ones the guest has not written again included.
    let sock2 = dir.path().join("resumed.sock");
    let diff2 = dir.path().join("resumed.diff");
    let mut resumed = VmmProcess::spawn(&[
        "--snapshot",
        diff.to_str().expect("utf-8"),
        "--console-input",
        "--api-sock",
        sock2.to_str().expect("utf-8"),
    ]);
    resumed.send("after-resume\n");
    if let Err(e) = resumed.wait_for("got: after-resume seen=2", ceiling::GUEST) {
        panic!("the resumed guest remembers its line: {e}");
    }
    let reply = api(&sock2, &format!("snapshot-diff {}", diff2.display()));
    assert!(reply.starts_with("ok "), "{reply}");
    assert_eq!(api(&sock2, "quit"), "ok");
    assert!(resumed.wait(ceiling::HOST).is_some_and(|s| s.success()));
    std::fs::remove_file(&diff).expect("the first diff is no longer needed");

    let mut again = VmmProcess::spawn(&[
        "--snapshot",
        diff2.to_str().expect("utf-8"),
        "--console-input",
    ]);
    again.send("second-resume\n");
    if let Err(e) = again.wait_for("got: second-resume seen=3", ceiling::GUEST) {
        panic!("a guest resumed twice remembers both lines: {e}");
    }
}

#[test]
fn diff_snapshot_without_its_base_is_refused() {
    let s = snapshot();
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.snap");
    std::fs::copy(&s.path, &base).expect("copy");
    let sock = dir.path().join("c.sock");
    let diff = dir.path().join("c.diff");
    let mut clone = VmmProcess::spawn(&[
        "--snapshot",
        base.to_str().expect("utf-8"),
        "--api-sock",
        sock.to_str().expect("utf-8"),
    ]);
    let deadline = std::time::Instant::now() + ceiling::HOST;
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(api(&sock, &format!("snapshot-diff {}", diff.display())).starts_with("ok "));
    assert_eq!(api(&sock, "quit"), "ok");
    let _ = clone.wait(ceiling::HOST);
    std::fs::remove_file(&base).expect("remove base");
    assert_refused(&diff, "base snapshot");
}
