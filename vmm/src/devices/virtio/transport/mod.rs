//! Virtio transports. little.cloud guests have no PCI: MMIO only.

pub mod mmio;
