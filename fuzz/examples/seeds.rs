//! Writes the hand-made seed inputs of every fuzz target into
//! `fuzz/corpus/<target>/seed-<name>`: inputs that reach deep (a valid
//! request, a full driver initialization, a stream that carries data, a
//! snapshot that decodes), from which the fuzzer mutates. The rest of each
//! corpus is what short fuzzing runs found and `-merge=1` kept.
//!
//! ```text
//! cd fuzz && cargo run --example seeds
//! ```

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use vmm::devices::legacy::i8042::I8042;
use vmm::devices::legacy::serial::SerialConsoleState;
use vmm::devices::legacy::LegacyState;
use vmm::devices::virtio::net::persist::NetState;
use vmm::devices::virtio::persist::{DeviceState, RuntimeState, SavedQueue, TransportState};
use vmm::snapshot::format::{self, HEADER_LEN};
use vmm::snapshot::memory::RegionState;
use vmm::snapshot::MicrovmState;
use vmm::usernet::test_utils::{arp_request, gateway, guest, tcp, udp, Flags};
use vmm::usernet::GATEWAY_IP;
use vmm::vstate::persist::{VcpuState, VmState};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
/// Where the targets copy the bytes after the descriptor table.
const PAYLOAD_AT: u64 = 0x1000;
/// Bytes of a virtio-net header.
const NET_HDR_LEN: usize = 12;

/// A 16-entry descriptor table with `descs` (addr, len, flags, next) first.
fn table(descs: &[(u64, u32, u16, u16)]) -> Vec<u8> {
    let mut t = vec![0u8; 16 * 16];
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let d = &mut t[i * 16..i * 16 + 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
    }
    t
}

fn le16s(values: &[u16]) -> Vec<u8> {
    let mut out: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.resize(32, 0);
    out
}

struct Corpus {
    root: std::path::PathBuf,
}

impl Corpus {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("corpus folder");
        fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
    }
}

fn agent_line(c: &Corpus) {
    c.put(
        "agent_line",
        "session",
        b"\x00HELLO 1\nREADY\nPONG n0nce\nRESUMED\nEXIT status=0\n",
    );
    c.put(
        "agent_line",
        "exit-signal",
        b"\x02HELLO 1\r\nEXIT signal=9\nBYE\n",
    );
    let mut long = b"\x01READY\n".to_vec();
    long.extend(vec![b'x'; 300]);
    long.extend(b"\nPONG 1\n");
    c.put("agent_line", "overlong-drained", &long);
    let mut long = b"\x00HELLO 1\n".to_vec();
    long.extend(vec![b'y'; 255]);
    long.extend(b"\nREADY\n");
    c.put("agent_line", "longest-line", &long);
}

/// Block request seeds: capacity, flags, head, table, payload at 0x1000.
fn blk_request(c: &Corpus) {
    let request = |name: &str, kind: u32, sector: u64, data_flags: u16, data: &[u8]| {
        let mut input = 1u64.wrapping_shl(20).to_le_bytes().to_vec();
        input.push(0); // writable disk
        input.extend(0u16.to_le_bytes());
        input.extend(table(&[
            (PAYLOAD_AT, 16, NEXT, 1),
            (PAYLOAD_AT + 16, 512, NEXT | data_flags, 2),
            (PAYLOAD_AT + 16 + 512, 1, WRITE, 0),
        ]));
        input.extend(kind.to_le_bytes());
        input.extend(0u32.to_le_bytes());
        input.extend(sector.to_le_bytes());
        let mut buffer = data.to_vec();
        buffer.resize(512, 0);
        input.extend(buffer);
        input.push(0xff);
        c.put("blk_request", name, &input);
    };
    request("read", 0, 8, WRITE, &[]);
    request("write", 1, 16, 0, b"data");
    request("flush", 4, 0, 0, &[]);
    request("get-id", 8, 0, WRITE, &[]);
    let mut range = 2u64.to_le_bytes().to_vec();
    range.extend(8u32.to_le_bytes());
    range.extend(0u32.to_le_bytes());
    request("discard", 11, 0, 0, &range);
    let mut unmap = range.clone();
    unmap[12] = 1;
    request("write-zeroes", 13, 0, 0, &unmap);
    // The same read through an indirect table at 0x1400.
    let mut input = 1u64.wrapping_shl(20).to_le_bytes().to_vec();
    input.push(1);
    input.extend(0u16.to_le_bytes());
    input.extend(table(&[(PAYLOAD_AT + 0x400, 48, INDIRECT, 0)]));
    let mut payload = vec![0u8; 0x400 + 48];
    payload[0..4].copy_from_slice(&0u32.to_le_bytes());
    payload[8..16].copy_from_slice(&1u64.to_le_bytes());
    payload[0x400..].copy_from_slice(
        &table(&[
            (PAYLOAD_AT, 16, NEXT, 1),
            (PAYLOAD_AT + 16, 512, NEXT | WRITE, 2),
            (PAYLOAD_AT + 0x300, 1, WRITE, 0),
        ])[..48],
    );
    input.extend(payload);
    c.put("blk_request", "indirect-read", &input);
}

fn control_line(c: &Corpus) {
    for (name, line) in [
        ("ping", "ping"),
        ("snapshot", "snapshot /tmp/app.snap"),
        ("snapshot-diff", "snapshot-diff /tmp/app.diff"),
        ("working-set", "working-set /tmp/app.ws"),
        ("accept", "accept 8080"),
        ("restore", "restore /a/app.snap /a/app.ws"),
        ("reply-snapshot", "ok state=123 mem=4096/8192 ms=1.500"),
        ("reply-connections", "ok open=2 taken=7"),
        ("reply-running", "ok running 12.250"),
        ("reply-error", "error no such file"),
    ] {
        c.put("control_line", name, line.as_bytes());
    }
}

fn daemon_api(c: &Corpus) {
    let deploy = r#"{"op":"deploy","name":"web","image":"docker.io/library/redis:7","port":6379,"listen":"127.0.0.1:0","memory_mib":128,"concurrency":10,"min":0,"max":4,"idle_timeout_ms":30000,"env":["TOKEN=s3cret","A=b=c"],"allow_host":["127.0.0.1:5432","10.1.0.0/16"]}"#;
    for (name, line) in [
        ("deploy", format!("{deploy}\n")),
        ("ps", "{\"op\":\"ps\",\"show_env\":true}\n".to_owned()),
        ("logs", "{\"op\":\"logs\",\"app\":\"web\",\"follow\":true}\n{\"op\":\"ps\"}\n".to_owned()),
        ("rm", "{\"op\":\"rm\",\"app\":\"web\"}".to_owned()),
        (
            "response-ps",
            r#"{"ok":true,"data":[{"spec":{"name":"web","image":"x.tar","port":80,"listen":"127.0.0.1:8080","memory_mib":128,"concurrency":1,"min":0,"max":1,"idle_timeout_ms":1000,"env":["A=***"]},"listen":"127.0.0.1:8080","snapshot":"/s","instances":[{"id":1,"pid":42,"age_ms":5,"connections":1,"rss_kib":2048}],"standby":1,"last_death":null,"user":1000}]}"#.to_owned(),
        ),
        ("response-error", "{\"ok\":false,\"error\":\"no app web\"}".to_owned()),
    ] {
        c.put("daemon_api", name, line.as_bytes());
    }
}

/// mmio_registers operations: kind, register index or offset, value.
fn mmio_registers(c: &Corpus) {
    fn write(ops: &mut Vec<u8>, register: u16, value: u32) {
        ops.push(1);
        ops.extend((register / 4).to_le_bytes());
        ops.extend(value.to_le_bytes());
    }
    fn read(ops: &mut Vec<u8>, register: u16) {
        ops.push(0);
        ops.extend((register / 4).to_le_bytes());
        ops.extend(0u32.to_le_bytes());
    }
    let init = |features_high: u32| {
        let mut ops = Vec::new();
        write(&mut ops, 0x70, 1);
        write(&mut ops, 0x70, 3);
        write(&mut ops, 0x14, 0);
        read(&mut ops, 0x10);
        write(&mut ops, 0x24, 0);
        write(&mut ops, 0x20, 1 << 5); // VIRTIO_NET_F_MAC
        write(&mut ops, 0x24, 1);
        write(&mut ops, 0x20, features_high); // VIRTIO_F_VERSION_1 is bit 0
        write(&mut ops, 0x70, 11);
        read(&mut ops, 0x70);
        for (queue, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
            write(&mut ops, 0x30, queue);
            read(&mut ops, 0x34);
            write(&mut ops, 0x38, 256);
            write(&mut ops, 0x80, base);
            write(&mut ops, 0x84, 0);
            write(&mut ops, 0x90, base + 0x1000);
            write(&mut ops, 0x94, 0);
            write(&mut ops, 0xa0, base + 0x2000);
            write(&mut ops, 0xa4, 0);
            write(&mut ops, 0x44, 1);
        }
        ops
    };
    let mut ops = init(1);
    write(&mut ops, 0x70, 15);
    read(&mut ops, 0x70);
    write(&mut ops, 0x50, 1);
    read(&mut ops, 0x60);
    write(&mut ops, 0x64, 1);
    // The MAC through narrow config reads.
    ops.extend([2 | (5 << 2), 0x00, 0x01, 0, 0, 0, 0]);
    ops.extend([2 | (1 << 2), 0x04, 0x01, 0, 0, 0, 0]);
    write(&mut ops, 0x70, 0);
    c.put("mmio_registers", "init-activate-reset", &ops);
    let mut refused = init(0);
    write(&mut refused, 0x70, 15);
    c.put("mmio_registers", "legacy-driver-refused", &refused);
    let mut bad_queue = init(1);
    write(&mut bad_queue, 0x30, 1);
    write(&mut bad_queue, 0x44, 0);
    write(&mut bad_queue, 0x80, 0xffff_f000);
    write(&mut bad_queue, 0x44, 1);
    write(&mut bad_queue, 0x70, 15);
    read(&mut bad_queue, 0x70);
    c.put("mmio_registers", "queue-outside-memory", &bad_queue);
}

fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let flags = Flags {
        syn: true,
        ..Flags::default()
    };
    let mut dns = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    dns.extend(b"\x07example\x03com\x00\x00\x01\x00\x01");
    vec![
        ("arp", arp_request(GATEWAY_IP)),
        ("tcp-syn", tcp(guest(40000), gateway(80), 1000, flags, &[])),
        (
            "tcp-syn-outside",
            tcp(
                guest(40001),
                std::net::SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 443),
                7,
                flags,
                &[],
            ),
        ),
        (
            "dns",
            udp(
                guest(5353),
                std::net::SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 53),
                &dns,
            ),
        ),
    ]
}

fn net_frame(c: &Corpus) {
    for (name, frame) in frames() {
        let mut input = u16::try_from(frame.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        input.extend(&frame);
        c.put("net_frame", name, &input);
    }
}

/// net_queues: ctl, avail rings, TX and RX tables, payload at 0x1000.
fn net_queues(c: &Corpus) {
    for (name, frame) in frames() {
        let tx_len = u32::try_from(NET_HDR_LEN + frame.len()).expect("small");
        let mut input = vec![];
        input.extend(2u16.to_le_bytes()); // TX avail idx
        input.extend(2u16.to_le_bytes()); // RX avail idx
        input.push(15); // budget 16
        input.push(3); // four passes
        input.extend(le16s(&[0, 2]));
        input.extend(le16s(&[0, 1]));
        // TX: the frame in one buffer, then header and frame in two.
        input.extend(table(&[
            (PAYLOAD_AT, tx_len, 0, 0),
            (0, 0, 0, 0),
            (PAYLOAD_AT, 12, NEXT, 3),
            (PAYLOAD_AT + 12, tx_len - 12, 0, 0),
        ]));
        // RX: two receive buffers of 1526 bytes.
        input.extend(table(&[
            (PAYLOAD_AT + 0x1000, 1526, WRITE, 0),
            (PAYLOAD_AT + 0x2000, 1526, WRITE, 0),
        ]));
        input.extend(vec![0u8; NET_HDR_LEN]);
        input.extend(&frame);
        c.put("net_queues", name, &input);
    }
}

fn oci_image(c: &Corpus) {
    let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}"#;
    let mut input = vec![0u8];
    input.extend(index);
    c.put("oci_image", "index", &input);
    let mut input = vec![1u8];
    input.extend(br#"{"architecture":"amd64","os":"linux","config":{"User":"app:staff","Env":["PATH=/usr/bin","A=b"],"Entrypoint":["/bin/app"],"Cmd":["--port","80"],"WorkingDir":"/srv","ExposedPorts":{"80/tcp":{}}}}"#);
    input.push(0);
    input.extend(b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n");
    input.push(0);
    input.extend(b"root:x:0:\nstaff:x:50:app\n");
    c.put("oci_image", "config-user", &input);
    let base = image_tools::test_utils::LayerBuilder::new()
        .dir("etc", 0o755, 0, 0)
        .file("etc/hostname", 0o644, 0, 0, b"app\n")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .hardlink("etc/name", b"etc/hostname")
        .dir("srv", 0o755, 1000, 1000)
        .file("srv/old", 0o600, 1000, 1000, b"old")
        .finish();
    let top = image_tools::test_utils::LayerBuilder::new()
        .whiteout("srv/old")
        .opaque("etc")
        .file("etc/new", 0o644, 0, 0, b"new")
        .finish();
    let mut input = vec![2u8];
    input.extend(&base);
    input.extend([0xff, 0xff]);
    input.extend(&top);
    c.put("oci_image", "two-layers", &input);
}

fn registry_auth(c: &Corpus) {
    for (name, text) in [
        (
            "hub",
            "\x01https://auth.docker.io/token\0registry.docker.io\0repository:library/redis:pull",
        ),
        (
            "local",
            "\x03http://127.0.0.1:5001/token\0local\0repository:app:pull,push",
        ),
        ("quoted", "\x00http://[::1]:9/t?a=\"b\"\0svc\\\0x"),
        (
            "challenge",
            "\x02realm=\"https://ghcr.io/token\",service=\"ghcr.io\",scope=\"repository:a/b:pull\"",
        ),
        ("reference", "\x00ghcr.io:443/a/b:v1.2"),
        // ureq connects to evil.example: no credentials over plain HTTP.
        (
            "backslash-realm",
            "\x01http://evil.example\\@127.0.0.1:5001/token",
        ),
    ] {
        c.put("registry_auth", name, text.as_bytes());
    }
}

/// A snapshot file's header and state, as a restore of a one-vCPU VM with
/// an active virtio-net device reads it.
fn snapshot_state(c: &Corpus) {
    let queue = |base: u64| SavedQueue {
        max_size: 256,
        size: 256,
        ready: true,
        desc_table: base,
        avail_ring: base + 0x1000,
        used_ring: base + 0x2000,
        next_avail: 3,
        next_used: 3,
        event_idx: false,
    };
    let net = TransportState {
        device_type: 1,
        status: 15,
        acked_features: (1 << 32) | (1 << 5),
        queues: vec![queue(0x1_0000), queue(0x2_0000)],
        runtime: Some(RuntimeState {
            queues: vec![queue(0x1_0000), queue(0x2_0000)],
            device: DeviceState::Net(NetState::new([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
        }),
        ..TransportState::default()
    };
    let idle = TransportState {
        device_type: 1,
        queues: vec![queue(0), queue(0)],
        ..TransportState::default()
    };
    let state = MicrovmState {
        host: "seed".into(),
        regions: vec![RegionState {
            guest_addr: 0,
            len: 2 << 20,
        }],
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![VcpuState {
            cpuid: vec![Default::default(); 2],
            msrs: vec![Default::default(); 2],
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Some(Default::default()),
            debug_regs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
            tsc_khz: Some(2_000_000),
        }],
        legacy: LegacyState {
            serial: SerialConsoleState {
                registers: [12, 0, 0, 1, 3, 0x60, 8, 0xb0, 0],
                in_buffer: b"typed".to_vec(),
            },
            i8042: I8042::new(Box::new(|| {})).save(),
        },
        virtio: vec![net, idle],
        base: None,
        dirty: Vec::new(),
    };
    let mut file = tempfile::tempfile().expect("a temporary file");
    let header = format::write_state(&mut file, &state, 2 << 20).expect("state written");
    let len = usize::try_from(HEADER_LEN + header.state_len).expect("small");
    let mut bytes = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).expect("read back");
    // Flag 2: extend the file to the memory image's end; flag 1 would
    // recompute the CRCs (already right here).
    let mut input = vec![2u8];
    input.extend(&bytes);
    c.put("snapshot_state", "net-active", &input);
    input[0] = 3;
    c.put("snapshot_state", "net-active-fixed-up", &input);
}

/// virtqueue: avail idx, avail ring, table, payload at 0x1000.
fn virtqueue(c: &Corpus) {
    let mut input = 3u16.to_le_bytes().to_vec();
    input.extend(le16s(&[0, 2, 4]));
    input.extend(table(&[
        (PAYLOAD_AT, 64, NEXT, 1),
        (PAYLOAD_AT + 64, 64, WRITE, 0),
        (PAYLOAD_AT + 128, 32, 0, 0),
        (0, 0, 0, 0),
        (PAYLOAD_AT + 0x100, 32, INDIRECT, 0),
    ]));
    let mut payload = vec![0x11u8; 0x100];
    payload.extend(
        table(&[(PAYLOAD_AT, 16, NEXT, 1), (PAYLOAD_AT + 16, 16, WRITE, 0)])[..32].to_vec(),
    );
    input.extend(payload);
    c.put("virtqueue", "three-chains", &input);
}

/// A vsock header from the guest (cid 3) to the host.
fn vsock_header(op: u16, src_port: u32, dst_port: u32, len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(3u64.to_le_bytes());
    h.extend(2u64.to_le_bytes());
    h.extend(src_port.to_le_bytes());
    h.extend(dst_port.to_le_bytes());
    h.extend(len.to_le_bytes());
    h.extend(1u16.to_le_bytes());
    h.extend(op.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h.extend(65536u32.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h
}

fn vsock_packet(c: &Corpus) {
    let mut input = 0u16.to_le_bytes().to_vec();
    input.extend(table(&[
        (PAYLOAD_AT, 44, NEXT, 1),
        (PAYLOAD_AT + 44, 5, NEXT, 2),
        (PAYLOAD_AT + 0x100, 256, WRITE, 0),
    ]));
    input.extend(vsock_header(5, 5000, 1024, 5));
    input.extend(b"hello");
    c.put("vsock_packet", "rw", &input);
    let mut input = 0u16.to_le_bytes().to_vec();
    input.extend(table(&[(PAYLOAD_AT, 44, 0, 0)]));
    input.extend(vsock_header(1, 5000, 1024, 0));
    c.put("vsock_packet", "request", &input);
}

/// vsock_muxer operations (see the target's `Op` kinds).
fn vsock_muxer(c: &Corpus) {
    fn guest(ops: &mut Vec<u8>, op: u8, ports: u8, payload: &[u8]) {
        ops.extend([0, op, ports, 0, 0]);
        ops.extend(65536u32.to_le_bytes());
        ops.extend(0u32.to_le_bytes());
        ops.extend(u16::try_from(payload.len()).expect("short").to_le_bytes());
        ops.extend(payload);
    }
    fn drain(ops: &mut Vec<u8>, room: u16) {
        ops.push(7);
        ops.extend(room.to_le_bytes());
        ops.push(15);
    }
    fn ready(ops: &mut Vec<u8>, pick: u8) {
        ops.extend([5, pick, 0]);
    }
    // The guest connects to the listening host port, data both ways.
    let mut ops = Vec::new();
    guest(&mut ops, 1, 0x00, &[]);
    drain(&mut ops, 4096);
    guest(&mut ops, 5, 0x00, b"from the guest");
    ops.extend([4, 0, 0, 1]); // the peer reads
    ops.extend([2, 0, 9, 0]); // the peer writes 9 bytes
    ops.extend(b"from host");
    ready(&mut ops, 1);
    drain(&mut ops, 4);
    drain(&mut ops, 4096);
    guest(&mut ops, 7, 0x00, &[]);
    drain(&mut ops, 4096);
    guest(&mut ops, 4, 0x00, &[]);
    ops.extend([3, 0, 0, 0]); // the peer shuts down
    ready(&mut ops, 1);
    drain(&mut ops, 4096);
    guest(&mut ops, 3, 0x00, &[]);
    c.put("vsock_muxer", "guest-stream", &ops);
    // A host client connects, the guest accepts, data both ways.
    let mut ops = vec![1, 0];
    ready(&mut ops, 1);
    drain(&mut ops, 4096);
    guest(&mut ops, 2, 0x02, &[]);
    ops.extend([4, 0, 64, 0]);
    guest(&mut ops, 5, 0x02, b"answer");
    ops.extend([2, 0, 4, 0]);
    ops.extend(b"more");
    ready(&mut ops, 1);
    drain(&mut ops, 4096);
    ops.push(6);
    guest(&mut ops, 5, 0x01, b"refused");
    drain(&mut ops, 4096);
    c.put("vsock_muxer", "host-stream", &ops);
    // Host data waits while the guest offers header-only RX buffers.
    let mut ops = Vec::new();
    guest(&mut ops, 1, 0x00, &[]);
    drain(&mut ops, 4096);
    ops.extend([2, 0, 4, 0]);
    ops.extend(b"wait");
    ready(&mut ops, 1);
    drain(&mut ops, 0);
    drain(&mut ops, 4096);
    c.put("vsock_muxer", "header-only-buffer", &ops);
    // Bad CONNECT lines and a client that says nothing.
    let mut ops = vec![1, 2, 9];
    ops.extend(b"CONNECT x");
    ops.extend([1, 3]);
    ready(&mut ops, 1);
    ready(&mut ops, 2);
    ops.push(6);
    drain(&mut ops, 0);
    c.put("vsock_muxer", "bad-clients", &ops);
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let c = Corpus { root };
    agent_line(&c);
    blk_request(&c);
    control_line(&c);
    daemon_api(&c);
    mmio_registers(&c);
    net_frame(&c);
    net_queues(&c);
    oci_image(&c);
    registry_auth(&c);
    snapshot_state(&c);
    virtqueue(&c);
    vsock_packet(&c);
    vsock_muxer(&c);
}
