//! OCI images end to end: the offline test images (image-tools/test-images,
//! built by scripts/setup.sh) are imported into a fresh store, and each
//! boots once with its own, unmodified entrypoint: the agent initramfs made
//! from the image config, the erofs base image as a read-only /dev/vda
//! under a tmpfs overlay. The host reaches them through `--publish`:
//! busybox httpd answers HTTP 200 as user `web`, redis-server (glibc, as
//! user `redis`) answers PING.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use image_tools::runconfig::agent_initramfs;
use image_tools::store::{ImportOptions, Source, Store};
use little_tests::client::{wait_until_serving, Until};
use little_tests::{ceiling, kernel, release_bin, target_dir, VmmProcess};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Imports test image `name` and boots it with `guest_port` published on a
/// free host port; returns the VM, the host port and the temp dir.
fn boot(name: &str, guest_port: u16) -> (VmmProcess, u16, tempfile::TempDir) {
    let images = target_dir().join("test-images");
    let layout: PathBuf = images.join(format!("{name}.oci"));
    assert!(
        layout.exists(),
        "{} is missing: run image-tools/test-images/build.sh (scripts/setup.sh does)",
        layout.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::new(dir.path().join("store"));
    let options = ImportOptions {
        quiet: true,
        ..ImportOptions::default()
    };
    let image = store
        .import(&Source::Layout(layout, None), name, &options)
        .expect("import");
    let config = image.run.agent_config(None).expect("agent config");
    let initrd = dir.path().join("agent.cpio");
    agent_initramfs(&release_bin("guest-agent"), &config)
        .expect("initramfs")
        .write_file(&initrd)
        .expect("initramfs written");
    let host_port = free_port();
    let drive = format!("path={},ro", path_str(&store.rootfs(&image.id)));
    let publish = format!("127.0.0.1:{host_port}:{guest_port}");
    let k = kernel();
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        path_str(&k),
        "--initrd",
        path_str(&initrd),
        "--drive",
        &drive,
        "--cmdline",
        "little.root=/dev/vda little.rootfstype=erofs",
        "--mem",
        "256",
        "--publish",
        &publish,
    ]);
    (vmm, host_port, dir)
}

/// Sends `request` until the guest serves, then reads until the reply is
/// complete; returns the reply.
fn poll(port: u16, request: &[u8], until: Until<'_>, vmm: &VmmProcess) -> String {
    let reply = wait_until_serving(port, request, until, ceiling::BOOT, || vmm.output());
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn busybox_httpd_image_serves_http_200_through_a_published_port() {
    let (vmm, port, _dir) = boot("httpd", 8080);
    let reply = poll(
        port,
        b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n",
        Until::Close(b"HTTP/1."),
        &vmm,
    );
    assert!(reply.contains(" 200 OK"), "{reply}");
    assert!(reply.contains("little-test-httpd"), "{reply}");
    assert!(
        vmm.stdout().contains("little-agent: started"),
        "{}",
        vmm.stdout()
    );
}

#[test]
fn redis_image_answers_ping_through_a_published_port() {
    let (vmm, port, _dir) = boot("redis", 6379);
    poll(port, b"PING\r\nQUIT\r\n", Until::Contains(b"+PONG"), &vmm);
    assert!(
        vmm.stdout().contains("Ready to accept connections"),
        "{}",
        vmm.stdout()
    );
}
