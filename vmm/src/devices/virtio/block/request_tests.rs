//! The request parser against well-formed and hostile chains.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{
    Error, Limits, RequestType, MAX_DESCRIPTORS, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use crate::devices::virtio::block::request;
use crate::devices::virtio::block::test_utils::{
    header, linked, memory, segment, DATA, F_NEXT, HDR, MEM_SIZE, STATUS,
};

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
