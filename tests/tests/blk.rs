//! virtio-blk end to end: the real kernel boots (once for this file) with
//! the agent in an initramfs and the image's root on an erofs disk, under
//! an overlay whose writes go to an ext4 scratch disk; the entrypoint reads
//! a marker from the root, writes through the overlay, and mounts a third,
//! writable disk to leave a file there. The host then checks each image.
//!
//! Disks: /dev/vda = root (erofs, `ro`), /dev/vdb = data (ext4),
//! /dev/vdc = overlay scratch (ext4).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use little_tests::{agent_initramfs, busybox, kernel, release_bin, run_vmm, VmmRun};

const BOOT_DEADLINE: Duration = little_tests::ceiling::BOOT;
const MARKER: &str = "root-disk-marker-5f3c";

/// Builtins, plus three forks: mount, umount and nothing else (~0.5 s each
/// on the nested host).
const AGENT_CONF: &str = r#"# virtio-blk end-to-end test
arg=/bin/sh
arg=-c
arg=read m < /marker; echo "marker=$m"; while read dev mnt fs rest; do if [ "$mnt" = / ]; then echo "rootfs=$fs"; fi; done < /proc/mounts; echo overlay-data > /etc/written-by-guest && echo root-writable; /bin/busybox mount -t ext4 /dev/vdb /mnt && echo hello-from-the-guest > /mnt/x && /bin/busybox umount /mnt && echo data-written; exit 0
env=PATH=/bin
hostname=blk-guest
"#;

struct Boot {
    run: VmmRun,
    dir: tempfile::TempDir,
    root_before: Vec<u8>,
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty ext4 image of `mib` MiB.
fn ext4_image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("image file");
    f.set_len(mib << 20).expect("image size");
    tool(Command::new("mkfs.ext4").args(["-q", "-F", path_str(path)]));
}

/// The image's root: busybox, a marker, the mount points.
fn erofs_root(dir: &Path) -> PathBuf {
    let tree = dir.join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run", "mnt"] {
        std::fs::create_dir_all(tree.join(d)).expect("rootfs dir");
    }
    std::fs::copy(busybox(), tree.join("bin/busybox")).expect("busybox");
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).expect("sh link");
    std::fs::write(tree.join("marker"), format!("{MARKER}\n")).expect("marker");
    let image = dir.join("root.erofs");
    tool(Command::new("mkfs.erofs").args([
        "--quiet",
        "--all-root",
        path_str(&image),
        path_str(&tree),
    ]));
    image
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    tool(Command::new("debugfs").args(["-R", &format!("cat {file}"), path_str(image)]))
}

fn boot() -> &'static Boot {
    static BOOT: OnceLock<Boot> = OnceLock::new();
    BOOT.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let initrd = agent_initramfs(dir.path(), AGENT_CONF);
        let root = erofs_root(dir.path());
        let data = dir.path().join("data.ext4");
        let scratch = dir.path().join("scratch.ext4");
        ext4_image(&data, 8);
        ext4_image(&scratch, 8);
        let root_before = std::fs::read(&root).expect("root image");
        let k = kernel();
        let drives = [
            format!("path={},ro,serial=root", path_str(&root)),
            format!("path={}", path_str(&data)),
            format!("path={}", path_str(&scratch)),
        ];
        let run = run_vmm(
            &[
                "--kernel",
                path_str(&k),
                "--initrd",
                path_str(&initrd),
                "--drive",
                &drives[0],
                "--drive",
                &drives[1],
                "--drive",
                &drives[2],
                "--cmdline",
                "little.root=/dev/vda little.rootfstype=erofs little.overlay=/dev/vdc",
            ],
            BOOT_DEADLINE,
        );
        Boot {
            run,
            dir,
            root_before,
        }
    })
}

#[test]
fn guest_boots_from_the_disk_and_exits_cleanly() {
    let run = &boot().run;
    let status = run
        .status
        .unwrap_or_else(|| panic!("guest did not finish in {BOOT_DEADLINE:?}: {run:?}"));
    assert!(status.success(), "vmm exit status {status}: {run:?}");
    assert!(
        run.stdout
            .contains("little-agent: entrypoint exited status=0"),
        "{}",
        run.stdout
    );
}

#[test]
fn root_is_the_overlay_over_the_read_only_disk() {
    let out = &boot().run.stdout;
    assert!(out.contains(&format!("marker={MARKER}")), "marker: {out}");
    assert!(out.contains("rootfs=overlay"), "overlay root: {out}");
    assert!(out.contains("root-writable"), "root accepts writes: {out}");
}

#[test]
fn guest_writes_reach_the_data_disk_image() {
    let b = boot();
    assert!(b.run.stdout.contains("data-written"), "{}", b.run.stdout);
    let file = debugfs_cat(&b.dir.path().join("data.ext4"), "/x");
    assert_eq!(file, "hello-from-the-guest\n");
}

#[test]
fn overlay_writes_land_on_the_scratch_disk() {
    let b = boot();
    assert!(b.run.status.is_some(), "{:?}", b.run);
    let file = debugfs_cat(
        &b.dir.path().join("scratch.ext4"),
        "/upper/etc/written-by-guest",
    );
    assert_eq!(file, "overlay-data\n");
}

#[test]
fn read_only_root_image_is_unchanged() {
    let b = boot();
    assert!(b.run.status.is_some(), "{:?}", b.run);
    let after = std::fs::read(b.dir.path().join("root.erofs")).expect("root image");
    assert!(after == b.root_before, "the read-only image changed");
}

fn vmm_error(args: &[&str]) -> String {
    let out = Command::new(release_bin("vmm"))
        .args(args)
        .output()
        .expect("vmm runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("vmm: error: "), "{err}");
    err
}

#[test]
fn bad_drive_syntax_is_one_error_line() {
    let k = kernel();
    let err = vmm_error(&["--kernel", path_str(&k), "--drive", "file=/x,ro"]);
    assert!(err.contains("invalid drive \"file=/x,ro\""), "{err}");
    let err = vmm_error(&["--kernel", path_str(&k), "--drive", "path=/x,serial=a b"]);
    assert!(err.contains("serial"), "{err}");
}

#[test]
fn missing_drive_file_is_one_error_line() {
    let k = kernel();
    let err = vmm_error(&[
        "--kernel",
        path_str(&k),
        "--drive",
        "path=/nonexistent/disk.img",
    ]);
    assert!(
        err.contains("cannot open disk image /nonexistent/disk.img: No such file"),
        "{err}"
    );
}
