//! Bad input to `vmm`: one clear line on stderr, a non-zero exit, no panic.

use std::time::Duration;

use little_tests::{kernel, run_vmm, VmmRun};

fn assert_clean_failure(run: &VmmRun, expect: &str) {
    let status = run.status.expect("vmm exits by itself on bad input");
    assert!(!status.success(), "bad input must fail: {run:?}");
    assert!(!run.stderr.contains("panicked"), "no panic: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {:?}", run.stderr);
    assert!(
        lines[0].contains(expect),
        "{:?} should mention {expect:?}",
        lines[0]
    );
}

/// Bad input fails before any guest runs: host-side work only.
const QUICK: Duration = little_tests::ceiling::HOST;

#[test]
fn missing_kernel() {
    let run = run_vmm(&["--kernel", "/nonexistent/vmlinux"], QUICK);
    assert_clean_failure(&run, "cannot open kernel /nonexistent/vmlinux");
}

#[test]
fn kernel_that_is_not_an_elf() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bogus = dir.path().join("vmlinux");
    std::fs::write(&bogus, vec![0x5au8; 8192]).expect("write");
    let run = run_vmm(&["--kernel", bogus.to_str().expect("utf-8")], QUICK);
    assert_clean_failure(&run, "not a loadable uncompressed ELF vmlinux");
}

#[test]
fn truncated_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = std::fs::read(kernel()).expect("kernel readable");
    let cut = dir.path().join("vmlinux");
    std::fs::write(&cut, &real[..real.len().min(64 * 1024)]).expect("write");
    let run = run_vmm(&["--kernel", cut.to_str().expect("utf-8")], QUICK);
    assert_clean_failure(&run, "not a loadable uncompressed ELF vmlinux");
}

#[test]
fn too_little_memory() {
    let k = kernel();
    let run = run_vmm(
        &["--kernel", k.to_str().expect("utf-8"), "--mem", "4"],
        QUICK,
    );
    assert_clean_failure(&run, "guest memory must be between");
}

#[test]
fn zero_vcpus() {
    let k = kernel();
    let run = run_vmm(
        &["--kernel", k.to_str().expect("utf-8"), "--vcpus", "0"],
        QUICK,
    );
    assert_clean_failure(&run, "vCPU count must be between 1 and");
}

#[test]
fn missing_initrd() {
    let k = kernel();
    let run = run_vmm(
        &[
            "--kernel",
            k.to_str().expect("utf-8"),
            "--initrd",
            "/nonexistent.cpio",
        ],
        QUICK,
    );
    assert_clean_failure(&run, "cannot read initrd /nonexistent.cpio");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let run = run_vmm(&["--kernal", "x"], QUICK);
    let status = run.status.expect("exits");
    assert_eq!(status.code(), Some(2), "clap usage error");
    assert!(run.stderr.contains("unexpected argument '--kernal'"));
}

#[test]
fn help_lists_every_flag() {
    let run = run_vmm(&["--help"], QUICK);
    assert!(run.status.expect("exits").success());
    for flag in [
        "--kernel",
        "--initrd",
        "--mem",
        "--vcpus",
        "--cmdline",
        "--console",
    ] {
        assert!(run.stdout.contains(flag), "--help mentions {flag}");
    }
}

/// Without permission on /dev/kvm (an unprivileged user, where the test runs
/// as root and /dev/kvm is not world-accessible): a clear hint, no panic.
#[test]
fn no_permission_on_dev_kvm() {
    use std::os::unix::fs::PermissionsExt;
    let kvm_mode = std::fs::metadata("/dev/kvm").map(|m| m.permissions().mode());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || kvm_mode.map_or(true, |m| m & 0o006 != 0) {
        eprintln!("skipped: needs root and a /dev/kvm closed to other users");
        return;
    }
    let vmm = little_tests::release_bin("vmm");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&vmm)
        .args(["--kernel", "/nonexistent"])
        .output()
        .expect("setpriv (util-linux) runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no permission to open /dev/kvm"),
        "{stderr}"
    );
}
