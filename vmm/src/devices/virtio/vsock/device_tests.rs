//! What the device shows the driver, and its host socket's life.
// Tests may unwrap (CONTRIBUTING.md).
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::block::persist::BlockState;
use crate::devices::virtio::vsock::persist::VsockState;
use crate::devices::virtio::Interrupt;

#[test]
fn device_reports_type_cid_and_queues() {
    let dir = tempfile::tempdir().unwrap();
    let config = VsockConfig {
        uds_path: dir.path().join("dev.sock"),
        guest_cid: 0x1234_5678,
    };
    let dev = Vsock::new(&config).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(dev.avail_features(), feature(VIRTIO_F_VERSION_1));
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
    let mut hi = [0u8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(u32::from_le_bytes(hi), 0, "upper half of the le64");
    // A second device on the same live socket is refused; after the first
    // is gone its stale file is reused.
    assert!(matches!(Vsock::new(&config), Err(Error::Bind(..))));
    drop(dev);
    assert!(!config.uds_path.exists(), "socket file removed");
    let stale = UnixListener::bind(&config.uds_path).unwrap();
    drop(stale);
    assert!(Vsock::new(&config).is_ok(), "stale socket replaced");
}

#[test]
fn restore_takes_only_vsock_state_and_three_queues() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(&VsockConfig {
        uds_path: dir.path().join("v.sock"),
        guest_cid: 3,
    })
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let ctx = |n: usize| ActivateContext {
        mem: mem.clone(),
        queues: (0..n).map(|_| Queue::new(QUEUE_SIZE).unwrap()).collect(),
        queue_events: (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
    };
    let block = DeviceState::Block(BlockState::default());
    assert!(matches!(
        dev.restore(ctx(3), &block),
        Err(ActivateError::State(_))
    ));
    assert!(matches!(
        dev.activate(ctx(2)),
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 2
        })
    ));
    let vsock = DeviceState::Vsock(VsockState::default());
    assert!(dev.restore(ctx(3), &vsock).is_ok());
}
