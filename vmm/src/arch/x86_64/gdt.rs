//! The boot GDT and the KVM segment descriptors derived from it.

use kvm_bindings::kvm_segment;

/// Index of the 64-bit code segment in the boot GDT.
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment in the boot GDT.
pub const DATA_INDEX: u8 = 2;
/// Index of the task state segment in the boot GDT.
pub const TSS_INDEX: u8 = 3;

/// Encodes one GDT descriptor from its access/flags word, base and limit.
///
/// `flags` holds the access byte in bits 0..8 and the flags nibble
/// (G, D/B, L, AVL) in bits 12..16, the layout `0xa09b` style constants use.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The four descriptors Linux's 64-bit boot protocol needs: null, code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

fn bit(entry: u64, n: u32) -> u8 {
    u8::from((entry >> n) & 1 == 1)
}

/// Decodes a GDT descriptor into the segment register KVM expects.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff);
    let g = bit(entry, 55);
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = bit(entry, 47);
    kvm_segment {
        base,
        // A 20-bit limit scaled by 4 KiB is at most 0xffff_ffff.
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g,
        avl: bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64bit_present_ring0() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.l, 1, "long mode code");
        assert_eq!(seg.db, 0, "L and D/B are exclusive");
        assert_eq!(seg.present, 1);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.type_, 0xb, "execute/read, accessed");
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
        assert_eq!(data.selector, 0x10);
        assert_eq!(data.type_, 0x3, "read/write, accessed");
        assert_eq!(data.db, 1);
        assert_eq!(data.s, 1);
        let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
        assert_eq!(tss.selector, 0x18);
        assert_eq!(tss.type_, 0xb, "busy 64-bit TSS");
        assert_eq!(tss.s, 0, "system segment");
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(seg.unusable, 1);
        assert_eq!(seg.present, 0);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(e, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde, "byte granularity keeps the raw limit");
        assert_eq!(seg.selector, 40);
    }
}
