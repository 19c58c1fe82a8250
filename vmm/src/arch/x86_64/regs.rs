//! Boot vCPU register state: 64-bit entry with an identity map, no firmware.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Limit of the boot GDT (four 8-byte descriptors).
const GDT_LIMIT: u16 = 4 * 8 - 1;
const _: () = assert!(std::mem::size_of::<[u64; 4]>() == GDT_LIMIT as usize + 1);
/// Limit of the empty boot IDT (one 8-byte slot).
const IDT_LIMIT: u16 = 7;

/// Page-table entry bits: present, writable.
const PTE_PRESENT_RW: u64 = 0x03;
/// Page-directory entry bits: present, writable, 2 MiB page.
const PDE_PRESENT_RW_HUGE: u64 = 0x83;

/// Errors while writing boot-time CPU structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A boot structure does not fit in guest memory.
    #[error("failed to write the boot {0} into guest memory")]
    WriteGuest(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// General-purpose registers for the Linux 64-bit boot protocol.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Floating-point state as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the GDT, an empty IDT and identity page tables for the first GiB
/// into guest memory, and returns `sregs` updated for long mode.
pub fn boot_sregs<M: GuestMemoryBackend>(
    mem: &M,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, Error> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + (i as u64) * 8))
            .map_err(|e| Error::WriteGuest("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| Error::WriteGuest("IDT", e))?;

    let code = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = IDT_LIMIT;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    write_identity_map(mem)?;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel's
/// startup code, which builds its own tables straight away.
fn write_identity_map<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    let err = |e| Error::WriteGuest("page tables", e);
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(err)?;
    mem.write_obj(PDE_START | PTE_PRESENT_RW, GuestAddress(PDPTE_START))
        .map_err(err)?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PDE_PRESENT_RW_HUGE,
            GuestAddress(PDE_START + i * 8),
        )
        .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("anonymous mmap")
    }

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let m = mem();
        let s = boot_sregs(&m, kvm_sregs::default()).expect("fits in 1 MiB");
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, 0x08);
        assert_eq!(s.ds.selector, 0x10);
        assert_eq!(s.tr.selector, 0x18);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn gdt_is_written_to_guest_memory() {
        let m = mem();
        boot_sregs(&m, kvm_sregs::default()).expect("fits");
        for (i, e) in BOOT_GDT.iter().enumerate() {
            let got: u64 = m
                .read_obj(GuestAddress(BOOT_GDT_START + i as u64 * 8))
                .expect("readable");
            assert_eq!(got, *e);
        }
    }

    #[test]
    fn identity_map_covers_first_gib() {
        let m = mem();
        boot_sregs(&m, kvm_sregs::default()).expect("fits");
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).expect("pml4");
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START)).expect("pdpte");
        assert_eq!(pdpte & !0xfff, PDE_START);
        let first: u64 = m.read_obj(GuestAddress(PDE_START)).expect("pde");
        assert_eq!(first, 0x83);
        let last: u64 = m.read_obj(GuestAddress(PDE_START + 511 * 8)).expect("pde");
        assert_eq!(last & !0xfff, 511 << 21, "maps 1 GiB - 2 MiB .. 1 GiB");
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mmap");
        assert!(matches!(
            boot_sregs(&m, kvm_sregs::default()),
            Err(Error::WriteGuest("page tables", _))
        ));
    }

    #[test]
    fn regs_follow_boot_protocol() {
        let r = boot_regs(0x100_0000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, ZERO_PAGE_START, "boot_params pointer");
        assert_eq!(r.rflags, 2);
        assert_eq!(boot_fpu().mxcsr, 0x1f80);
    }
}
