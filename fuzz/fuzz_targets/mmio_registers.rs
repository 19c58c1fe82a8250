//! The virtio-mmio transport as a hostile driver programs it: any sequence
//! of register reads and writes (narrow, misaligned and past the window
//! too) against a real virtio-net device, through feature negotiation,
//! queue setup, activation and reset.
//!
//! Input: 7-byte operations: kind, offset (u16 LE), value (u32 LE).
//! Kinds 0 and 1 read and write the 32-bit register `4 * (offset % 128)`
//! (the registers, then the config space); kinds 2 and 3 read and write
//! `1 + kind / 4 % 8` bytes at `offset % 0x1100`.
//!
//! What the spec (virtio 1.2, 4.2.2) promises the driver, and what keeps
//! the host safe: the identification registers never change; features are
//! accepted (FEATURES_OK) only if they are a subset of the offer that
//! includes VERSION_1; the device starts only from a DRIVER_OK write that
//! follows an accepted FEATURES_OK; a reset (status 0) stops it and clears
//! status, interrupts and queues; malformed accesses read zero and change
//! nothing.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use little_fuzz::deny_all_net;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::net::{Net, QUEUE_SIZE};
use vmm::devices::virtio::transport::mmio::MmioTransport;
use vmm::devices::virtio::{feature, Interrupt};
use vmm::event_loop::EventLoop;
use vmm_sys_util::eventfd::EventFd;

// Register offsets (virtio 1.2, 4.2.2).
const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const VENDOR_ID: u64 = 0x0c;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_READY: u64 = 0x44;
const INTERRUPT_STATUS: u64 = 0x60;
const STATUS: u64 = 0x70;
const CONFIG: u64 = 0x100;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// What the driver wrote that the checks depend on.
#[derive(Default)]
struct Driver {
    features_sel: u32,
    features: u64,
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// The identification registers, the queue sizes and the config space
/// (the MAC, zero past it): what the driver probes and may read any time.
fn check_constants(t: &mut MmioTransport) {
    assert_eq!(read(t, MAGIC), 0x7472_6976);
    assert_eq!(read(t, VERSION), 2);
    assert_eq!(read(t, DEVICE_ID), VIRTIO_ID_NET);
    assert_eq!(read(t, VENDOR_ID), 0x4c43_4c54);
    assert_eq!(read(t, QUEUE_SEL), 0, "QueueSel is write-only");
    let mut config = [0xffu8; 8];
    t.read(CONFIG, &mut config);
    assert_eq!(
        config,
        [MAC[0], MAC[1], MAC[2], MAC[3], MAC[4], MAC[5], 0, 0]
    );
    assert_eq!(
        read(t, DEVICE_FEATURES_SEL),
        0,
        "DeviceFeaturesSel is write-only"
    );
}

fn check_queue_sizes(t: &mut MmioTransport, queue_sel: u32) {
    let max = read(t, QUEUE_NUM_MAX);
    if queue_sel < 2 {
        assert_eq!(max, u32::from(QUEUE_SIZE));
    } else {
        assert_eq!(max, 0, "queue {queue_sel} does not exist");
        assert_eq!(read(t, QUEUE_READY), 0);
    }
}

fn check_reset(t: &mut MmioTransport) {
    assert_eq!(read(t, STATUS), 0);
    assert_eq!(read(t, INTERRUPT_STATUS), 0);
    assert!(!t.activated());
    for q in 0..2 {
        write(t, QUEUE_SEL, q);
        assert_eq!(read(t, QUEUE_READY), 0, "queue {q} is reset");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(event_loop) = EventLoop::new(8) else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]) else {
        return;
    };
    let config = vmm::usernet::NetConfig {
        mac: MAC,
        ..deny_all_net()
    };
    let Ok(net) = Net::new(&config) else {
        return;
    };
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let interrupt = Arc::new(Interrupt::new(irq));
    let Ok(mut t) = MmioTransport::new(Box::new(net), mem, interrupt, event_loop.handle()) else {
        return;
    };
    let offered = {
        write(&mut t, DEVICE_FEATURES_SEL, 0);
        let low = read(&mut t, DEVICE_FEATURES);
        write(&mut t, DEVICE_FEATURES_SEL, 1);
        let high = read(&mut t, DEVICE_FEATURES);
        write(&mut t, DEVICE_FEATURES_SEL, 0);
        (u64::from(high) << 32) | u64::from(low)
    };
    assert_ne!(offered & feature(VIRTIO_F_VERSION_1), 0);
    check_constants(&mut t);

    let mut driver = Driver::default();
    let mut queue_sel = 0u32;
    for op in data.chunks_exact(7) {
        let kind = op[0];
        let offset = u16::from_le_bytes([op[1], op[2]]);
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        let was_active = t.activated();
        let status_before = read(&mut t, STATUS);
        match kind % 4 {
            0 => {
                let register = 4 * u64::from(offset % 128);
                let got = read(&mut t, register);
                if register == DEVICE_FEATURES_SEL || register == QUEUE_SEL {
                    assert_eq!(got, 0, "write-only register {register:#x}");
                }
            }
            1 => {
                let register = 4 * u64::from(offset % 128);
                write(&mut t, register, value);
                let status = read(&mut t, STATUS);
                match register {
                    QUEUE_SEL => queue_sel = value,
                    DRIVER_FEATURES_SEL => driver.features_sel = value,
                    DRIVER_FEATURES if status_before & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                        match driver.features_sel {
                            0 => {
                                driver.features =
                                    (driver.features & !0xffff_ffff) | u64::from(value)
                            }
                            1 => {
                                driver.features =
                                    (driver.features & 0xffff_ffff) | (u64::from(value) << 32)
                            }
                            _ => {}
                        }
                    }
                    STATUS if value == 0 => {
                        check_reset(&mut t);
                        queue_sel = 0;
                        driver = Driver::default();
                    }
                    STATUS => {
                        let accepted = value & VIRTIO_CONFIG_S_FEATURES_OK != 0
                            && status & VIRTIO_CONFIG_S_FEATURES_OK != 0
                            && status_before & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                        if accepted {
                            assert_eq!(driver.features & !offered, 0, "unoffered features");
                            assert_ne!(driver.features & feature(VIRTIO_F_VERSION_1), 0);
                        }
                        if t.activated() && !was_active {
                            assert_ne!(value & VIRTIO_CONFIG_S_DRIVER_OK, 0);
                            assert_ne!(value & VIRTIO_CONFIG_S_FEATURES_OK, 0);
                            assert_eq!(value & VIRTIO_CONFIG_S_FAILED, 0);
                            assert_eq!(status_before & VIRTIO_CONFIG_S_DRIVER_OK, 0);
                        }
                    }
                    _ => {}
                }
                if value != 0 || register != STATUS {
                    // Only a reset stops a started device.
                    assert!(!was_active || t.activated(), "stopped by {register:#x}");
                }
                if register == QUEUE_SEL {
                    check_queue_sizes(&mut t, queue_sel);
                }
            }
            2 => {
                let len = 1 + usize::from(kind / 4 % 8);
                let offset = u64::from(offset % 0x1100);
                let mut buf = [0xa5u8; 8];
                t.read(offset, &mut buf[..len]);
                let register_access = offset < CONFIG;
                if register_access && (len != 4 || offset % 4 != 0) {
                    assert_eq!(
                        buf[..len],
                        [0u8; 8][..len],
                        "malformed read {offset:#x}+{len}"
                    );
                }
                if offset >= CONFIG {
                    let start = usize::try_from(offset - CONFIG).unwrap_or(usize::MAX);
                    for (i, &b) in buf[..len].iter().enumerate() {
                        let want = MAC.get(start.saturating_add(i)).copied().unwrap_or(0);
                        assert_eq!(b, want, "config byte {}", start + i);
                    }
                }
            }
            _ => {
                let len = 1 + usize::from(kind / 4 % 8);
                let offset = u64::from(offset % 0x1100);
                t.write(offset, &value.to_le_bytes().repeat(2)[..len]);
                if offset < CONFIG && (len != 4 || offset % 4 != 0) {
                    assert_eq!(
                        read(&mut t, STATUS),
                        status_before,
                        "malformed write changed status"
                    );
                    assert_eq!(t.activated(), was_active);
                }
            }
        }
    }
    check_constants(&mut t);
    write(&mut t, STATUS, 0);
    check_reset(&mut t);
});
