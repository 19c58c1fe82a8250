//! Places devices in the guest: legacy devices on the port bus, virtio
//! devices in MMIO windows with an irqfd and one ioeventfd per queue, each
//! announced on the kernel command line.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{VIRTIO_IRQ_BASE, VIRTIO_IRQ_MAX, VIRTIO_MMIO_BASE};
use crate::devices::bus::{self, Bus, BusDevice};
use crate::devices::virtio::transport::mmio::{
    self, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::event_loop::LoopHandle;

/// Errors while attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// All interrupt lines for virtio devices are taken.
    #[error("too many virtio devices: at most {} fit", VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1)]
    TooManyDevices,
    /// An eventfd could not be created.
    #[error("failed to create an eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("KVM refused to register the {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The transport could not be created.
    #[error(transparent)]
    Transport(#[from] mmio::Error),
    /// Two devices overlap.
    #[error(transparent)]
    Bus(#[from] bus::Error),
    /// The command-line entry could not be added.
    #[error("failed to announce a virtio-mmio device on the kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
}

/// A virtio device's place in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base of the 4 KiB register window.
    pub base: u64,
    /// Interrupt line (GSI).
    pub irq: u32,
}

/// The guest's buses and the devices on them.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    slots: Vec<MmioSlot>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    event_loop: LoopHandle,
}

impl DeviceManager {
    /// Empty buses; virtio devices will run on `event_loop`.
    pub fn new(event_loop: LoopHandle) -> Self {
        Self {
            pio: Bus::new(),
            mmio: Bus::new(),
            slots: Vec::new(),
            transports: Vec::new(),
            event_loop,
        }
    }

    /// Puts a legacy device on the port bus.
    pub fn attach_pio(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        port: u16,
        len: u16,
    ) -> Result<(), Error> {
        self.pio
            .insert(device, u64::from(port), u64::from(len))
            .map_err(Error::from)
    }

    /// Gives `device` the next MMIO window and interrupt line, wires its
    /// irqfd and queue ioeventfds into the VM `vm_fd`, and returns where it
    /// went; the device reaches guest memory through `mem`.
    pub fn attach_virtio(
        &mut self,
        vm_fd: &VmFd,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<MmioSlot, Error> {
        let index = u32::try_from(self.slots.len()).map_err(|_| Error::TooManyDevices)?;
        let irq = VIRTIO_IRQ_BASE + index;
        if irq > VIRTIO_IRQ_MAX {
            return Err(Error::TooManyDevices);
        }
        let base = VIRTIO_MMIO_BASE + u64::from(index) * MMIO_WINDOW_SIZE;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::EventFd("an irqfd", e))?;
        vm_fd
            .register_irqfd(&irqfd, irq)
            .map_err(|e| Error::Kvm("irqfd", e))?;
        let transport = MmioTransport::new(
            device,
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
            self.event_loop.clone(),
        )?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            let queue = u32::try_from(queue).map_err(|_| Error::TooManyDevices)?;
            vm_fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    queue,
                )
                .map_err(|e| Error::Kvm("queue ioeventfd", e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.transports.push(transport);
        let slot = MmioSlot { base, irq };
        self.slots.push(slot);
        Ok(slot)
    }

    /// Number of virtio devices attached.
    pub fn virtio_count(&self) -> usize {
        self.slots.len()
    }

    /// The virtio transports, in slot order (for snapshots and restores).
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// Adds `virtio_mmio.device=` entries for every attached virtio device.
    pub fn announce(&self, cmdline: &mut Cmdline) -> Result<(), Error> {
        for slot in &self.slots {
            cmdline
                .add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(slot.base), slot.irq, None)
                .map_err(Error::Cmdline)?;
        }
        Ok(())
    }
}
