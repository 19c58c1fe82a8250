//! Guest physical memory layout for x86_64 microVMs.
//!
//! Everything the VMM writes before the first KVM_RUN lives below 1 MiB; the
//! kernel is loaded at its ELF physical address (16 MiB for Linux); devices
//! live in a hole just below 4 GiB.

/// GDT used during boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT used during boot (the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Level-3 page table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Level-2 page table of the boot identity map (2 MiB pages over 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the VMM hands to the guest (Linux's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer and configuration table (in the last KiB below 640 KiB,
/// one of the places Linux's `mpparse` scans).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional memory usable by the guest (the EBDA follows).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory; the kernel and initrd live above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit device hole.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit device hole (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the virtio-mmio device windows.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First interrupt line given to virtio-mmio devices (0-4 are legacy).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last interrupt line usable by virtio-mmio devices (the IOAPIC has 24 pins).
pub const VIRTIO_IRQ_MAX: u32 = 23;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS region (three pages) for real-mode emulation, inside the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Legacy serial COM1 port base.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 controller data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 controller command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;
