use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::block::persist::BlockState;
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{read_config_bytes, VIRTIO_MMIO_INT_VRING};
use crate::event_loop::test_utils::{on_loop, LoopThread};
use crate::event_loop::{Event, EventHandler, EventLoop};

const STATUS_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

#[derive(Default)]
struct Record {
    acked: u64,
    activations: usize,
    restores: usize,
    resets: usize,
    queues: usize,
    config: Vec<u8>,
    /// Handlers started and stopped on a running loop.
    started: usize,
    stopped: usize,
}

struct MockDevice {
    record: Arc<Mutex<Record>>,
    fail_activate: bool,
}

/// The mock's handler: records its life, saves its queues.
struct MockHandler {
    record: Arc<Mutex<Record>>,
    queues: Vec<Queue>,
}

impl EventHandler for MockHandler {
    fn start(&mut self, _ops: &mut Ops<'_>) {
        self.record.lock().expect("unpoisoned").started += 1;
    }
    fn handle(&mut self, _event: Event, _ops: &mut Ops<'_>) {}
    fn stop(&mut self) {
        self.record.lock().expect("unpoisoned").stopped += 1;
    }
    fn save(&mut self) -> Option<Box<dyn Any + Send>> {
        let queues: Vec<&Queue> = self.queues.iter().collect();
        Some(Box::new(RuntimeState::new(
            &queues,
            DeviceState::Block(BlockState::default()),
        )))
    }
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
    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn EventHandler>, ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::InvalidQueue(0));
        }
        let mut r = self.record.lock().expect("unpoisoned");
        r.activations += 1;
        r.queues = ctx.queues.iter().filter(|q| q.ready()).count();
        Ok(Box::new(MockHandler {
            record: self.record.clone(),
            queues: ctx.queues,
        }))
    }
    fn restore(
        &mut self,
        ctx: ActivateContext,
        state: &DeviceState,
    ) -> Result<Box<dyn EventHandler>, ActivateError> {
        let DeviceState::Block(_) = state else {
            return Err(state.mismatch("mock").into());
        };
        self.record.lock().expect("unpoisoned").restores += 1;
        Ok(Box::new(MockHandler {
            record: self.record.clone(),
            queues: ctx.queues,
        }))
    }
    fn reset(&mut self) {
        self.record.lock().expect("unpoisoned").resets += 1;
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mmap")
}

struct Fixture {
    t: MmioTransport,
    record: Arc<Mutex<Record>>,
    irq: EventFd,
    /// A loop that is never run: handlers added wait in its queue.
    _event_loop: EventLoop,
}

fn transport(
    record: &Arc<Mutex<Record>>,
    fail_activate: bool,
    event_loop: LoopHandle,
) -> (MmioTransport, EventFd) {
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("dup")));
    let dev = MockDevice {
        record: record.clone(),
        fail_activate,
    };
    let t =
        MmioTransport::new(Box::new(dev), memory(), interrupt, event_loop).expect("valid queues");
    (t, irq)
}

fn fixture(fail_activate: bool) -> Fixture {
    let record = Arc::new(Mutex::new(Record::default()));
    let event_loop = EventLoop::new(4).expect("io_uring");
    let (t, irq) = transport(&record, fail_activate, event_loop.handle());
    Fixture {
        t,
        record,
        irq,
        _event_loop: event_loop,
    }
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
        fn activate(&mut self, _: ActivateContext) -> Result<Box<dyn EventHandler>, ActivateError> {
            Err(ActivateError::InvalidQueue(0))
        }
        fn restore(
            &mut self,
            _: ActivateContext,
            _: &DeviceState,
        ) -> Result<Box<dyn EventHandler>, ActivateError> {
            Err(ActivateError::InvalidQueue(0))
        }
        fn reset(&mut self) {}
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mmap");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let event_loop = EventLoop::new(4).expect("io_uring");
    let r = MmioTransport::new(
        Box::new(Bad),
        mem,
        Arc::new(Interrupt::new(irq)),
        event_loop.handle(),
    );
    assert!(matches!(r, Err(Error::QueueSize { index: 0, size: 0 })));
}

/// Waits until `done` holds for the record (a handler runs on another thread).
fn wait_for(record: &Mutex<Record>, done: impl Fn(&Record) -> bool) {
    let start = Instant::now();
    while !done(&record.lock().expect("unpoisoned")) {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn the_transport_runs_saves_and_stops_the_device_handler() {
    let event_loop = LoopThread::start();
    let record = Arc::new(Mutex::new(Record::default()));
    let (t, _irq) = transport(&record, false, event_loop.handle().clone());
    let t = Arc::new(Mutex::new(t));
    {
        let mut t = t.lock().expect("unpoisoned");
        assert!(!t.activated());
        init_driver(&mut t, feature(VIRTIO_F_VERSION_1));
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.activated());
    }
    wait_for(&record, |r| r.started == 1);

    let saving = t.clone();
    let saved = on_loop(event_loop.handle(), move |ops| {
        saving.lock().expect("unpoisoned").save(ops)
    })
    .expect("the handler saves");
    let runtime = saved.runtime.clone().expect("active: runtime state");
    assert_eq!(runtime.queues.len(), 2);
    assert_eq!(runtime.device, DeviceState::Block(BlockState::default()));
    assert_eq!(saved.device_type, 42);

    w32(&mut t.lock().expect("unpoisoned"), 0x70, 0);
    wait_for(&record, |r| r.stopped == 1);
    assert_eq!(record.lock().expect("unpoisoned").resets, 1);

    // A fresh transport resumes the saved handler.
    let (mut restored, _irq) = transport(&record, false, event_loop.handle().clone());
    restored.restore(&saved).expect("restored");
    assert!(restored.activated());
    wait_for(&record, |r| r.started == 2);
    assert_eq!(record.lock().expect("unpoisoned").restores, 1);
    // Dropping it takes the handler off the loop.
    drop(restored);
    wait_for(&record, |r| r.stopped == 2);

    // Saved state that does not fit the device is refused.
    let mut bad = saved.clone();
    bad.runtime.as_mut().expect("runtime").queues.pop();
    let (mut other, _irq) = transport(&record, false, event_loop.handle().clone());
    assert!(matches!(
        other.restore(&bad),
        Err(RestoreError::QueueCount(42))
    ));
    let mut bad = saved;
    bad.runtime.as_mut().expect("runtime").device =
        DeviceState::Vsock(crate::devices::virtio::vsock::persist::VsockState::default());
    assert!(matches!(
        other.restore(&bad),
        Err(RestoreError::Activate(ActivateError::State(_)))
    ));
    assert!(!other.activated());
}
