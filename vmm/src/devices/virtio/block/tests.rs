//! virtio-blk tests over mock guest memory: the request parser directly, and
//! the device end to end on a real event loop with a temporary image.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::Block;
use super::request::{
    self, Error, Limits, RequestType, MAX_DESCRIPTORS, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use super::{BlockConfig, Disk};
use crate::devices::virtio::{feature, ActivateContext, Interrupt, VirtioDevice};
use crate::event_loop::EventLoop;

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x100_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// (addr, len, device-writable) descriptors, linked from table index `first`.
fn linked(descs: &[(u64, u32, bool)], first: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let i = u16::try_from(i).unwrap();
            let last = usize::from(i) + 1 == descs.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i + 1))
        })
        .collect()
}

fn header(mem: &GuestMemoryMmap, at: u64, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

const LIMITS: Limits = Limits {
    capacity: 64,
    read_only: false,
};

fn parse_with(
    mem: &GuestMemoryMmap,
    descs: &[(u64, u32, bool)],
    limits: Limits,
) -> Result<request::Request, request::Rejected> {
    let vq = MockSplitQueue::new(mem, 512);
    let chain = vq.build_desc_chain(&linked(descs, 0)).unwrap();
    request::parse(chain, mem, limits)
}

fn rejected_with(
    mem: &GuestMemoryMmap,
    descs: &[(u64, u32, bool)],
    limits: Limits,
) -> (Option<GuestAddress>, Error) {
    let r = parse_with(mem, descs, limits).unwrap_err();
    (r.status, r.error)
}

#[test]
fn parses_a_read() {
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    let req = parse_with(
        &mem,
        &[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 1024, true),
            (STATUS, 1, true),
        ],
        LIMITS,
    )
    .unwrap();
    assert_eq!(req.kind, RequestType::In);
    assert_eq!(req.sector, 3);
    assert_eq!(req.offset(), 3 * 512);
    assert_eq!(req.data_len, 1536);
    assert_eq!(
        req.data,
        [
            (GuestAddress(DATA), 512),
            (GuestAddress(DATA + 0x1000), 1024)
        ]
    );
    assert_eq!(req.status, GuestAddress(STATUS));
}

#[test]
fn status_is_the_last_byte_of_the_last_descriptor() {
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let req = parse_with(&mem, &[(HDR, 16, false), (STATUS, 8, true)], LIMITS).unwrap();
    assert_eq!(req.kind, RequestType::Flush);
    assert_eq!(req.status, GuestAddress(STATUS + 7));
}

#[test]
fn out_of_range_sectors_are_io_errors() {
    let mem = memory();
    let read = [(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)];
    header(&mem, HDR, VIRTIO_BLK_T_IN, 62);
    assert!(parse_with(&mem, &read, LIMITS).is_ok(), "last two sectors");
    header(&mem, HDR, VIRTIO_BLK_T_IN, 63);
    let (status, error) = rejected_with(&mem, &read, LIMITS);
    assert_eq!(status, Some(GuestAddress(STATUS)));
    assert!(matches!(error, Error::OutOfRange { sector: 63, .. }));
    assert_eq!(error.status_code(), VIRTIO_BLK_S_IOERR);
    // sector * 512 overflows u64.
    header(&mem, HDR, VIRTIO_BLK_T_IN, u64::MAX / 256);
    assert!(matches!(
        rejected_with(&mem, &read, LIMITS).1,
        Error::OutOfRange { .. }
    ));
    // sector * 512 fits, + len overflows.
    header(&mem, HDR, VIRTIO_BLK_T_IN, (u64::MAX >> 9) - 1);
    assert!(matches!(
        rejected_with(&mem, &read, LIMITS).1,
        Error::OutOfRange { .. }
    ));
}

#[test]
fn data_directions_and_lengths_are_checked() {
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let e = |descs: &[(u64, u32, bool)]| rejected_with(&mem, descs, LIMITS).1;
    // A read into a device-readable buffer.
    assert_eq!(
        e(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
        Error::DataDirection
    );
    // Not whole sectors; no data at all.
    assert_eq!(
        e(&[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)]),
        Error::DataLength(100)
    );
    assert_eq!(
        e(&[(HDR, 16, false), (STATUS, 1, true)]),
        Error::DataLength(0)
    );
    // Data outside guest memory.
    assert!(matches!(
        e(&[
            (HDR, 16, false),
            (MEM_SIZE as u64 - 512, 1024, true),
            (STATUS, 1, true)
        ]),
        Error::DataOutOfMemory { .. }
    ));
    // A write from a device-writable buffer.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        e(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]),
        Error::DataDirection
    );
    // A short or device-writable header.
    assert_eq!(
        e(&[(HDR, 8, false), (DATA, 512, false), (STATUS, 1, true)]),
        Error::BadHeader
    );
    assert_eq!(
        e(&[(HDR, 16, true), (DATA, 512, false), (STATUS, 1, true)]),
        Error::BadHeader
    );
    assert_eq!(e(&[(STATUS, 1, true)]), Error::BadHeader);
}

#[test]
fn missing_status_needs_a_reset() {
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let r = |descs: &[(u64, u32, bool)]| rejected_with(&mem, descs, LIMITS);
    // Last descriptor device-readable.
    assert_eq!(
        r(&[(HDR, 16, false), (DATA, 512, false)]),
        (None, Error::MissingStatus)
    );
    // Zero-length status, status outside memory.
    assert_eq!(
        r(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 0, true)]),
        (None, Error::MissingStatus)
    );
    assert_eq!(
        r(&[
            (HDR, 16, false),
            (DATA, 512, false),
            (MEM_SIZE as u64, 1, true)
        ]),
        (None, Error::MissingStatus)
    );
    assert_eq!(
        r(&[(HDR, 16, false), (u64::MAX, 2, true)]),
        (None, Error::MissingStatus)
    );
}

#[test]
fn over_long_and_looping_chains_need_a_reset() {
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let mut descs = vec![(HDR, 16, false)];
    descs.extend((0..MAX_DESCRIPTORS).map(|i| (DATA + 512 * i as u64, 512, false)));
    descs.push((STATUS, 1, true));
    let (status, error) = rejected_with(&mem, &descs, LIMITS);
    assert_eq!((status, error), (None, Error::BrokenChain));

    // 0 -> 1 -> 0 -> ...: the queue's TTL ends it with "next" still set.
    let vq = MockSplitQueue::new(&mem, 16);
    let table = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, F_NEXT, 0)),
    ];
    let chain = vq.build_multiple_desc_chains(&table).unwrap();
    let r = request::parse(chain, &mem, LIMITS).unwrap_err();
    assert_eq!((r.status, r.error), (None, Error::BrokenChain));

    // A next index outside the table.
    let table = [RawDescriptor::from(SplitDescriptor::new(
        HDR, 16, F_NEXT, 200,
    ))];
    let chain = vq.build_multiple_desc_chains(&table).unwrap();
    let r = request::parse(chain, &mem, LIMITS).unwrap_err();
    assert_eq!((r.status, r.error), (None, Error::BrokenChain));
}

#[test]
fn writes_to_a_read_only_disk_fail_and_reads_work() {
    let mem = memory();
    let ro = Limits {
        capacity: 64,
        read_only: true,
    };
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let (status, error) = rejected_with(
        &mem,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        ro,
    );
    assert_eq!(
        (status, error),
        (Some(GuestAddress(STATUS)), Error::ReadOnly)
    );
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert!(parse_with(
        &mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        ro
    )
    .is_ok());
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = memory();
    header(&mem, HDR, 99, 0);
    let (status, error) = rejected_with(
        &mem,
        &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
        LIMITS,
    );
    assert_eq!(status, Some(GuestAddress(STATUS)));
    assert_eq!(error, Error::Unsupported(99));
    assert_eq!(error.status_code(), VIRTIO_BLK_S_UNSUPP);
}

/// A device on a running event loop with a temporary image.
struct Harness {
    mem: GuestMemoryMmap,
    image: tempfile::NamedTempFile,
    block: Block,
    interrupt: Arc<Interrupt>,
    irq: EventFd,
    kick: EventFd,
    loop_handle: crate::event_loop::LoopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    next_desc: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
}

const QUEUE_LEN: u16 = 64;

impl Harness {
    fn new(read_only: bool, features: u64) -> Self {
        let mut image = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..64 * 512).map(|i| (i / 512) as u8).collect();
        image.write_all(&content).unwrap();
        let mut config = BlockConfig::new(image.path());
        config.read_only = read_only;
        config.serial = Some("test-serial".into());
        let mut block = Block::new(Disk::open(&config).unwrap());
        block.set_acked_features(features);

        let mem = memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // The loop is not Send: it is built on its own thread.
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut event_loop = EventLoop::new(64).unwrap();
            tx.send(event_loop.handle()).unwrap();
            event_loop.run().unwrap();
        });
        let loop_handle = rx.recv().unwrap();
        // The mock zeroes the rings each time one is made: make it once and
        // drive the rings through their addresses afterwards.
        let vq = MockSplitQueue::new(&mem, QUEUE_LEN);
        let queue: Queue = vq.create_queue().unwrap();
        let (desc_table, avail, used) =
            (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
        drop(vq);
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![queue],
                queue_events: vec![kick.try_clone().unwrap()],
                interrupt: interrupt.clone(),
                event_loop: loop_handle.clone(),
            })
            .unwrap();
        Self {
            mem,
            image,
            block,
            interrupt,
            irq,
            kick,
            loop_handle,
            thread: Some(thread),
            next_desc: 0,
            desc_table,
            avail,
            used,
        }
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Queues one chain and kicks the device, as a driver does.
    fn submit(&mut self, descs: &[(u64, u32, bool)]) {
        let first = self.next_desc;
        for (i, d) in linked(descs, first).into_iter().enumerate() {
            let at = self.desc_table + 16 * (u64::from(first) + i as u64);
            self.mem.write_obj(d, GuestAddress(at)).unwrap();
        }
        self.next_desc += u16::try_from(descs.len()).unwrap();
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % QUEUE_LEN);
        self.mem.write_obj(first, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        self.kick.write(1).unwrap();
    }

    /// Waits until `n` chains are used; returns the last used (id, len).
    fn wait_used(&self, n: u16) -> (u32, u32) {
        let start = Instant::now();
        while self.used_idx() < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "device did not complete request {n}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = self.used + 4 + 8 * u64::from((n - 1) % QUEUE_LEN);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn image_bytes(&self) -> Vec<u8> {
        let mut f = self.image.reopen().unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.block.reset();
        let _ = self.loop_handle.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn reads_land_in_guest_memory() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 5);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.submit(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA + 0x1000, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(h.wait_used(1), (0, 1025));
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK);
    let mut buf = [0u8; 512];
    h.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|&b| b == 5), "sector 5");
    h.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(buf.iter().all(|&b| b == 6), "sector 6");
    assert!(h.interrupt.status() & 1 != 0, "used-ring interrupt");
    assert!(h.irq.read().is_ok(), "irqfd raised");
}

#[test]
fn writes_reach_the_image_and_flush_succeeds() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_OUT, 2);
    h.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    h.submit(&[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 1);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK);
    let image = h.image_bytes();
    assert!(image[1024..2048].iter().all(|&b| b == 0xab));
    assert!(
        image[512..1024].iter().all(|&b| b == 1),
        "neighbours untouched"
    );
    assert!(image[2048..2560].iter().all(|&b| b == 4));

    header(&h.mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS + 1)).unwrap();
    h.submit(&[(HDR + 0x100, 16, false), (STATUS + 1, 1, true)]);
    assert_eq!(h.wait_used(2).1, 1);
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_OK);
}

#[test]
fn get_id_returns_the_serial() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    h.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 21);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"test-serial");
    assert!(id[11..].iter().all(|&b| b == 0));
}

#[test]
fn read_only_disk_rejects_writes_with_ioerr() {
    let mut h = Harness::new(true, feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BLK_F_RO));
    assert!(h.block.avail_features() & feature(VIRTIO_BLK_F_RO) != 0);
    header(&h.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    h.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    h.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 1);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_IOERR);
    assert!(
        h.image_bytes()[..512].iter().all(|&b| b == 0),
        "image unchanged"
    );
}

#[test]
fn bad_requests_complete_with_a_status_and_the_queue_goes_on() {
    let mut h = Harness::new(
        false,
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX),
    );
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 1000);
    h.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 1);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_IOERR);
    header(&h.mem, HDR + 0x100, 99, 0);
    h.submit(&[(HDR + 0x100, 16, false), (STATUS + 1, 1, true)]);
    h.wait_used(2);
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_UNSUPP);
    assert!(!h.interrupt.needs_reset());
}

#[test]
fn a_chain_without_status_sets_needs_reset() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    h.submit(&[(HDR, 16, false), (DATA, 512, false)]);
    let start = Instant::now();
    while !h.interrupt.needs_reset() {
        assert!(start.elapsed() < Duration::from_secs(60), "no NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(h.interrupt.status() & 2 != 0, "config interrupt");
    // Nothing more is processed until the driver resets the device.
    header(&h.mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    h.submit(&[(HDR + 0x100, 16, false), (STATUS, 1, true)]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.used_idx(), 0);
}

#[test]
fn drive_syntax() {
    let c = BlockConfig::parse("path=/a.img").unwrap();
    assert_eq!(c, BlockConfig::new("/a.img"));
    let c = BlockConfig::parse("ro,serial=disk0,path=/b").unwrap();
    assert!(c.read_only);
    assert_eq!(c.serial.as_deref(), Some("disk0"));
    for bad in [
        "",
        "ro",
        "path=",
        "path=/a,path=/b",
        "path=/a,serial=",
        "path=/a,serial=123456789012345678901",
        "path=/a,serial=a b",
        "path=/a,cache=none",
        "/a.img",
    ] {
        let e = BlockConfig::parse(bad).unwrap_err();
        assert!(e.to_string().starts_with("invalid drive"), "{bad}: {e}");
    }
}

#[test]
fn open_errors_name_the_file() {
    let e = Disk::open(&BlockConfig::new("/nonexistent/disk.img")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot open disk image /nonexistent/disk.img"
    );
    let empty = tempfile::NamedTempFile::new().unwrap();
    assert!(matches!(
        Disk::open(&BlockConfig::new(empty.path())),
        Err(super::Error::Empty(_))
    ));
}

#[test]
fn config_space_reports_capacity_and_features() {
    let h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    let mut cap = [0u8; 8];
    h.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    let mut blk = [0u8; 4];
    h.block.read_config(20, &mut blk);
    assert_eq!(u32::from_le_bytes(blk), 512);
    assert_eq!(h.block.device_type(), 2);
    assert!(h.block.avail_features() & feature(VIRTIO_F_VERSION_1) != 0);
    assert!(h.block.avail_features() & feature(VIRTIO_BLK_F_RO) == 0);
    let _ = h.kick.as_raw_fd();
}

fn segment(mem: &GuestMemoryMmap, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_ranges_are_checked() {
    let mem = memory();
    let chain = [(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)];
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 2, 4, 0);
    let req = parse_with(&mem, &chain, LIMITS).unwrap();
    assert_eq!(req.kind, RequestType::Discard { sectors: 4 });
    assert_eq!((req.sector, req.data_len), (2, 2048));
    assert!(req.data.is_empty());
    // Discard takes no flags; write-zeroes takes UNMAP only.
    segment(&mem, DATA, 2, 4, 1);
    let e = rejected_with(&mem, &chain, LIMITS).1;
    assert_eq!(
        (e.clone(), e.status_code()),
        (Error::RangeFlags(1), VIRTIO_BLK_S_UNSUPP)
    );
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let req = parse_with(&mem, &chain, LIMITS).unwrap();
    assert_eq!(
        req.kind,
        RequestType::WriteZeroes {
            sectors: 4,
            unmap: true
        }
    );
    segment(&mem, DATA, 2, 4, 2);
    assert_eq!(rejected_with(&mem, &chain, LIMITS).1, Error::RangeFlags(2));
    // Beyond the disk, overflowing, empty, read-only, two segments.
    segment(&mem, DATA, 60, 5, 0);
    assert!(matches!(
        rejected_with(&mem, &chain, LIMITS).1,
        Error::OutOfRange { .. }
    ));
    segment(&mem, DATA, u64::MAX >> 9, 1, 0);
    assert!(matches!(
        rejected_with(&mem, &chain, LIMITS).1,
        Error::OutOfRange { .. }
    ));
    segment(&mem, DATA, 0, 0, 0);
    assert_eq!(rejected_with(&mem, &chain, LIMITS).1, Error::DataLength(0));
    segment(&mem, DATA, 0, 1, 0);
    let ro = Limits {
        capacity: 64,
        read_only: true,
    };
    assert_eq!(rejected_with(&mem, &chain, ro).1, Error::ReadOnly);
    let two = [(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)];
    assert_eq!(rejected_with(&mem, &two, LIMITS).1, Error::RangeSegments);
}

#[test]
fn write_zeroes_and_discard_zero_the_image_range() {
    let mut h = Harness::new(false, feature(VIRTIO_F_VERSION_1));
    header(&h.mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 3);
    segment(&h.mem, DATA, 3, 2, 0);
    h.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1).1, 1);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK);
    header(&h.mem, HDR + 0x100, VIRTIO_BLK_T_DISCARD, 0);
    segment(&h.mem, DATA + 0x100, 16, 8, 0);
    h.submit(&[
        (HDR + 0x100, 16, false),
        (DATA + 0x100, 16, false),
        (STATUS + 1, 1, true),
    ]);
    h.wait_used(2);
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_OK);
    let image = h.image_bytes();
    assert_eq!(image.len(), 64 * 512, "size kept");
    assert!(
        image[512 * 2..512 * 3].iter().all(|&b| b == 2),
        "before the range"
    );
    assert!(image[512 * 3..512 * 5].iter().all(|&b| b == 0), "zeroed");
    assert!(
        image[512 * 5..512 * 6].iter().all(|&b| b == 5),
        "after the range"
    );
    assert!(
        image[512 * 16..512 * 24].iter().all(|&b| b == 0),
        "discarded"
    );
    assert!(image[512 * 24..512 * 25].iter().all(|&b| b == 24));
}

#[test]
fn a_saved_runtime_resumes_from_its_ring_positions() {
    use crate::devices::virtio::persist::RuntimeState;
    use crate::event_loop::test_utils::save_handler;

    let features = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX);
    let mut h = Harness::new(false, features);
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 5);
    h.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(h.wait_used(1), (0, 513));

    let id = h
        .block
        .runtime()
        .expect("an active device names its runtime");
    let (quiescent, saved) = save_handler(&h.loop_handle, id);
    assert!(quiescent, "no I/O in flight once the request is used");
    let state = RuntimeState::decode(&saved.expect("the runtime saves")).unwrap();
    assert!(state.extra.is_empty());
    let [queue] = state.queues.as_slice() else {
        panic!("one queue: {state:?}");
    };
    assert_eq!((queue.next_avail, queue.next_used), (1, 1));
    assert!(queue.event_idx, "EVENT_IDX is part of the saved queue");

    // The VMM that took the snapshot goes away; the driver queues one more
    // request meanwhile (available, not yet seen by any device).
    h.block.reset();
    assert!(h.block.runtime().is_none());
    header(&h.mem, HDR + 0x100, VIRTIO_BLK_T_IN, 7);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS + 1)).unwrap();
    h.submit(&[
        (HDR + 0x100, 16, false),
        (DATA + 0x1000, 512, true),
        (STATUS + 1, 1, true),
    ]);

    // Restore as the transport does: acked features first, then the runtime.
    h.block.set_acked_features(features);
    h.block
        .restore_runtime(
            ActivateContext {
                mem: h.mem.clone(),
                queues: vec![queue.to_queue(0).unwrap()],
                queue_events: vec![h.kick.try_clone().unwrap()],
                interrupt: h.interrupt.clone(),
                event_loop: h.loop_handle.clone(),
            },
            &state.extra,
        )
        .unwrap();
    // The pending request is picked up without a new kick and lands in
    // used slot 1, after the one completed before the snapshot.
    let _ = h.kick.read();
    assert_eq!(h.wait_used(2), (3, 513));
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_OK);
    let mut buf = [0u8; 512];
    h.mem
        .read_slice(&mut buf, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(buf.iter().all(|&b| b == 7), "sector 7");

    let (_, saved) = save_handler(&h.loop_handle, h.block.runtime().unwrap());
    let state = RuntimeState::decode(&saved.unwrap()).unwrap();
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (2, 2)
    );
    assert!(state.queues[0].event_idx, "still on after the restore");
}
