use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;

use crate::devices::virtio::{
    read_config_bytes, ActivateError, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};

const STATUS_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

#[derive(Default)]
struct Record {
    acked: u64,
    activations: usize,
    resets: usize,
    queues: usize,
    config: Vec<u8>,
}

struct MockDevice {
    record: Arc<Mutex<Record>>,
    fail_activate: bool,
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1) | 0b101
    }
    fn set_acked_features(&mut self, features: u64) {
        self.record.lock().expect("unpoisoned").acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
    }
    fn write_config(&mut self, _offset: u64, data: &[u8]) {
        self.record.lock().expect("unpoisoned").config = data.to_vec();
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::InvalidQueue(0));
        }
        let mut r = self.record.lock().expect("unpoisoned");
        r.activations += 1;
        r.queues = ctx.queues.iter().filter(|q| q.ready()).count();
        Ok(())
    }
    fn reset(&mut self) {
        self.record.lock().expect("unpoisoned").resets += 1;
    }
}

/// A loop handle for devices that never reach the loop in these tests.
fn test_loop() -> crate::event_loop::LoopHandle {
    crate::event_loop::EventLoop::new(4)
        .expect("io_uring")
        .handle()
}

struct Fixture {
    t: MmioTransport,
    record: Arc<Mutex<Record>>,
    irq: EventFd,
}

fn fixture(fail_activate: bool) -> Fixture {
    let record = Arc::new(Mutex::new(Record::default()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mmap");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("dup")));
    let dev = MockDevice {
        record: record.clone(),
        fail_activate,
    };
    let t = MmioTransport::new(Box::new(dev), mem, interrupt, test_loop()).expect("valid queues");
    Fixture { t, record, irq }
}

fn r32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Drives the driver side of initialization up to DRIVER_OK.
fn init_driver(t: &mut MmioTransport, features: u64) {
    w32(t, 0x70, STATUS_ACKNOWLEDGE);
    w32(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(t, 0x24, 0);
    w32(
        t,
        0x20,
        u32::try_from(features & 0xffff_ffff).expect("low half"),
    );
    w32(t, 0x24, 1);
    w32(t, 0x20, u32::try_from(features >> 32).expect("high half"));
    w32(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
        w32(t, 0x30, q);
        w32(t, 0x38, 16);
        w32(t, 0x80, base);
        w32(t, 0x84, 0);
        w32(t, 0x90, base + 0x1000);
        w32(t, 0x94, 0);
        w32(t, 0xa0, base + 0x2000);
        w32(t, 0xa4, 0);
        w32(t, 0x44, 1);
    }
}

#[test]
fn identification_registers() {
    let mut f = fixture(false);
    assert_eq!(r32(&mut f.t, 0x00), MAGIC_VALUE);
    assert_eq!(r32(&mut f.t, 0x04), 2);
    assert_eq!(r32(&mut f.t, 0x08), 42);
    assert_eq!(r32(&mut f.t, 0x34), 16, "queue 0 max size");
    w32(&mut f.t, 0x30, 7);
    assert_eq!(r32(&mut f.t, 0x34), 0, "no queue 7");
}

#[test]
fn feature_pages() {
    let mut f = fixture(false);
    w32(&mut f.t, 0x14, 0);
    assert_eq!(r32(&mut f.t, 0x10), 0b101);
    w32(&mut f.t, 0x14, 1);
    assert_eq!(r32(&mut f.t, 0x10), 1, "VERSION_1 is bit 32");
    w32(&mut f.t, 0x14, 9);
    assert_eq!(r32(&mut f.t, 0x10), 0);
}

#[test]
fn full_initialization_activates_device() {
    let mut f = fixture(false);
    init_driver(&mut f.t, feature(VIRTIO_F_VERSION_1) | 1);
    assert_ne!(r32(&mut f.t, 0x70) & STATUS_FEATURES_OK, 0);
    w32(
        &mut f.t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    let r = f.record.lock().expect("unpoisoned");
    assert_eq!(r.activations, 1);
    assert_eq!(r.queues, 2);
    assert_eq!(r.acked, feature(VIRTIO_F_VERSION_1) | 1);
}

#[test]
fn unoffered_features_are_refused() {
    let mut f = fixture(false);
    init_driver(&mut f.t, feature(VIRTIO_F_VERSION_1) | 0b10);
    assert_eq!(r32(&mut f.t, 0x70) & STATUS_FEATURES_OK, 0);
    assert_eq!(f.record.lock().expect("unpoisoned").acked, 0);
}

#[test]
fn legacy_drivers_without_version_1_are_refused() {
    let mut f = fixture(false);
    init_driver(&mut f.t, 1);
    assert_eq!(r32(&mut f.t, 0x70) & STATUS_FEATURES_OK, 0);
}

#[test]
fn driver_ok_without_features_ok_needs_reset() {
    let mut f = fixture(false);
    w32(
        &mut f.t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_ne!(r32(&mut f.t, 0x70) & STATUS_NEEDS_RESET, 0);
    assert_eq!(f.record.lock().expect("unpoisoned").activations, 0);
}

#[test]
fn queue_outside_guest_memory_needs_reset() {
    let mut f = fixture(false);
    init_driver(&mut f.t, feature(VIRTIO_F_VERSION_1));
    w32(&mut f.t, 0x30, 1);
    w32(&mut f.t, 0x44, 0);
    w32(&mut f.t, 0x80, 0xffff_f000);
    w32(&mut f.t, 0x84, 0xffff);
    w32(&mut f.t, 0x44, 1);
    w32(
        &mut f.t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    assert_ne!(r32(&mut f.t, 0x70) & STATUS_NEEDS_RESET, 0);
    assert_eq!(f.record.lock().expect("unpoisoned").activations, 0);
    assert!(f.irq.read().is_ok(), "config interrupt tells the driver");
}

#[test]
fn runtime_errors_surface_as_needs_reset_until_reset() {
    let mut f = fixture(false);
    init_driver(&mut f.t, feature(VIRTIO_F_VERSION_1));
    w32(
        &mut f.t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    f.t.interrupt.set_needs_reset();
    assert_ne!(r32(&mut f.t, 0x70) & STATUS_NEEDS_RESET, 0);
    assert_ne!(r32(&mut f.t, 0x60) & VIRTIO_MMIO_INT_CONFIG, 0);
    w32(&mut f.t, 0x70, 0);
    assert_eq!(r32(&mut f.t, 0x70), 0);
    assert_eq!(r32(&mut f.t, 0x60), 0);
}

#[test]
fn failed_activation_needs_reset() {
    let mut f = fixture(true);
    init_driver(&mut f.t, feature(VIRTIO_F_VERSION_1));
    w32(
        &mut f.t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    assert_ne!(r32(&mut f.t, 0x70) & STATUS_NEEDS_RESET, 0);
}

#[test]
fn reset_clears_state_and_resets_device() {
    let mut f = fixture(false);
    init_driver(&mut f.t, feature(VIRTIO_F_VERSION_1));
    w32(
        &mut f.t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    w32(&mut f.t, 0x70, 0);
    assert_eq!(r32(&mut f.t, 0x70), 0);
    assert_eq!(f.record.lock().expect("unpoisoned").resets, 1);
    w32(&mut f.t, 0x30, 0);
    assert_eq!(r32(&mut f.t, 0x44), 0, "queue no longer ready");
}

#[test]
fn queue_config_is_frozen_after_driver_ok() {
    let mut f = fixture(false);
    init_driver(&mut f.t, feature(VIRTIO_F_VERSION_1));
    w32(
        &mut f.t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    w32(&mut f.t, 0x30, 0);
    w32(&mut f.t, 0x44, 0);
    assert_eq!(r32(&mut f.t, 0x44), 1, "ready cannot be cleared while live");
}

#[test]
fn notify_and_interrupt_ack() {
    let mut f = fixture(false);
    w32(&mut f.t, 0x50, 1);
    assert_eq!(f.t.queue_events()[1].read().expect("notified"), 1);
    w32(&mut f.t, 0x50, 99);
    f.t.interrupt.trigger(VIRTIO_MMIO_INT_VRING).expect("irqfd");
    assert_eq!(r32(&mut f.t, 0x60), VIRTIO_MMIO_INT_VRING);
    w32(&mut f.t, 0x64, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut f.t, 0x60), 0);
}

#[test]
fn config_space_and_odd_accesses() {
    let mut f = fixture(false);
    let mut b = [0u8; 2];
    f.t.read(0x106, &mut b);
    assert_eq!(b, [7, 8]);
    let mut far = [9u8; 4];
    f.t.read(0x1000, &mut far);
    assert_eq!(far, [0; 4], "past the config is zero");
    let gen = r32(&mut f.t, 0xfc);
    f.t.write(0x100, &[5]);
    assert_eq!(f.record.lock().expect("unpoisoned").config, vec![5]);
    assert_ne!(r32(&mut f.t, 0xfc), gen);
    let mut one = [0xaau8];
    f.t.read(0x00, &mut one);
    assert_eq!(one, [0], "narrow register reads are refused");
    f.t.write(0x70, &[1]);
    assert_eq!(r32(&mut f.t, 0x70), 0, "narrow register writes are ignored");
    f.t.write(0x72, &[1, 0, 0, 0]);
    assert_eq!(r32(&mut f.t, 0x70), 0, "misaligned writes are ignored");
}

#[test]
fn invalid_queue_sizes_are_rejected_at_creation() {
    struct Bad;
    impl VirtioDevice for Bad {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[0]
        }
        fn avail_features(&self) -> u64 {
            0
        }
        fn set_acked_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: ActivateContext) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mmap");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let r = MmioTransport::new(
        Box::new(Bad),
        mem,
        Arc::new(Interrupt::new(irq)),
        test_loop(),
    );
    assert!(matches!(r, Err(Error::QueueSize { index: 0, size: 0 })));
}
