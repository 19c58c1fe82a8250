//! Snapshots of a microVM with every virtio device, end to end: boot once
//! with `--net --publish`, `--vsock` and `--drive`, serve HTTP from the
//! guest, snapshot through the control socket, then restore three clones at
//! once from the one file, each with its own published port, vsock socket
//! and copy of the disk. Each clone serves HTTP on its own port, its agent
//! re-opens the host channel after the vsock transport reset (`HELLO`) and
//! answers `RESTORED` with `RESUMED`, and what one clone writes (to /tmp and
//! to its disk) is not seen by another.
//!
//! Guest forks are few: httpd's daemonizing fork, one child per HTTP
//! request, one `sync` per clone.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use little_tests::{
    accept_within, agent_initramfs, api, ceiling, free_port, kernel, read_line, VmmProcess,
};

const INDEX: &str = "served-from-the-snapshot";
/// httpd in the background, then one console line per write: the word goes
/// to /tmp/mark (served over HTTP) and to the start of /dev/vda.
const AGENT_CONF: &str = "arg=/bin/sh
arg=-c
arg=echo served-from-the-snapshot > /tmp/index.html; /bin/busybox httpd -p 8080 -h /tmp; echo ready; while read m; do echo $m > /tmp/mark; echo $m > /dev/vda; /bin/busybox sync; echo \"marked $m\"; done
env=PATH=/bin
";
const DISK_LEN: usize = 1 << 20;
const ORIGINAL: &[u8] = b"original-disk\n";

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn wait_for_http(port: u16, path: &str, vmm: &VmmProcess) -> String {
    little_tests::wait_for_http(port, path, ceiling::BOOT, || vmm.output())
}

/// Boots the guest, checks it serves and reports, snapshots it, quits.
fn take_snapshot(dir: &Path) -> PathBuf {
    let initrd = agent_initramfs(dir, AGENT_CONF);
    let disk = dir.join("disk.img");
    let mut image = ORIGINAL.to_vec();
    image.resize(DISK_LEN, 0);
    std::fs::write(&disk, &image).expect("disk image");
    let (api_sock, uds) = (dir.join("api.sock"), dir.join("v.sock"));
    let agent = UnixListener::bind(dir.join("v.sock_1024")).expect("agent listener");
    let port = free_port();
    let k = kernel();
    let vmm = VmmProcess::spawn(&[
        "--kernel",
        utf8(&k),
        "--initrd",
        utf8(&initrd),
        "--mem",
        "64",
        "--api-sock",
        utf8(&api_sock),
        "--net",
        "--publish",
        &format!("127.0.0.1:{port}:8080"),
        "--vsock",
        &format!("uds={}", utf8(&uds)),
        "--drive",
        &format!("path={}", utf8(&disk)),
    ]);
    let channel = accept_within(&agent, ceiling::BOOT, ceiling::GUEST).unwrap_or_else(|| {
        panic!(
            "the agent never connected: {} / {}",
            vmm.stdout(),
            vmm.stderr()
        )
    });
    let mut lines = BufReader::new(channel);
    assert_eq!(read_line(&mut lines).as_deref(), Some("HELLO 1"));
    let reply = wait_for_http(port, "/index.html", &vmm);
    assert!(reply.contains(INDEX), "{reply}");
    let snap = dir.join("devices.snap");
    let reply = api(&api_sock, &format!("snapshot {}", utf8(&snap)));
    assert!(
        reply.starts_with("ok "),
        "snapshot with active net, blk and vsock: {reply}; {}",
        vmm.stderr()
    );
    assert_eq!(api(&api_sock, "quit"), "ok");
    let mut vmm = vmm;
    let status = vmm.wait(ceiling::HOST).expect("vmm quits");
    assert!(status.success(), "quit exits 0: {}", vmm.stderr());
    snap
}

struct Clone {
    vmm: VmmProcess,
    port: u16,
    disk: PathBuf,
    agent: UnixListener,
}

#[test]
fn three_clones_of_a_vm_with_net_vsock_and_a_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = take_snapshot(dir.path());

    let mut clones: Vec<Clone> = (0..3)
        .map(|i| {
            let disk = dir.path().join(format!("disk{i}.img"));
            std::fs::copy(dir.path().join("disk.img"), &disk).expect("copy disk");
            let uds = dir.path().join(format!("v{i}.sock"));
            let agent =
                UnixListener::bind(dir.path().join(format!("v{i}.sock_1024"))).expect("bind");
            let port = free_port();
            let vmm = VmmProcess::spawn(&[
                "--snapshot",
                utf8(&snap),
                "--console-input",
                "--net",
                "--publish",
                &format!("127.0.0.1:{port}:8080"),
                "--vsock",
                &format!("uds={}", utf8(&uds)),
                "--drive",
                &format!("path={}", utf8(&disk)),
            ]);
            Clone {
                vmm,
                port,
                disk,
                agent,
            }
        })
        .collect();

    // Each agent lost its stream to the transport reset and comes back to
    // its own clone's host socket: HELLO, READY (it was ready before), then
    // the host, which knows it restored this instance, says RESTORED.
    for (i, c) in clones.iter().enumerate() {
        let stream = accept_within(&c.agent, ceiling::BOOT, ceiling::GUEST).unwrap_or_else(|| {
            panic!(
                "clone {i}: the agent did not reconnect: {} / {}",
                c.vmm.stdout(),
                c.vmm.stderr()
            )
        });
        let mut writer = stream.try_clone().expect("clone stream");
        let mut lines = BufReader::new(stream);
        assert_eq!(
            read_line(&mut lines).as_deref(),
            Some("HELLO 1"),
            "clone {i}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos();
        writer
            .write_all(format!("RESTORED {now} 00112233445566778899aabbccddeeff\n").as_bytes())
            .expect("send RESTORED");
        let mut seen = Vec::new();
        loop {
            match read_line(&mut lines) {
                Some(line) if line == "RESUMED" => break,
                Some(line) => seen.push(line),
                None => panic!("clone {i}: no RESUMED after {seen:?}: {}", c.vmm.stderr()),
            }
        }
        assert_eq!(seen, ["READY"], "clone {i}");
    }

    // Each clone serves through its own published port.
    for (i, c) in clones.iter().enumerate() {
        let reply = wait_for_http(c.port, "/index.html", &c.vmm);
        assert!(reply.contains(INDEX), "clone {i}: {reply}");
    }

    // Each writes its own word to /tmp and to its disk; none sees another's.
    for (i, c) in clones.iter_mut().enumerate() {
        c.vmm.send(&format!("clone-{i}\n"));
    }
    for (i, c) in clones.iter_mut().enumerate() {
        let done = format!("marked clone-{i}");
        if let Err(e) = c.vmm.wait_for(&done, ceiling::GUEST) {
            panic!("clone {i}: {e}");
        }
    }
    for (i, c) in clones.iter().enumerate() {
        let reply = wait_for_http(c.port, "/mark", &c.vmm);
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert_eq!(body, format!("clone-{i}\n"), "clone {i}: {reply}");
        let image = std::fs::read(&c.disk).expect("read disk");
        let want = format!("clone-{i}\n");
        assert!(
            image.starts_with(want.as_bytes()),
            "clone {i}'s disk starts with {:?}",
            String::from_utf8_lossy(&image[..32])
        );
        assert_eq!(image.len(), DISK_LEN);
    }
    let original = std::fs::read(dir.path().join("disk.img")).expect("read disk");
    assert!(
        original.starts_with(ORIGINAL),
        "the snapshot's disk is untouched"
    );
}
