//! Linux boot protocol: the zero page with its e820 map, the command line and
//! the initrd, for a kernel entered directly in 64-bit mode.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, ZERO_PAGE_START,
};

/// The command line's address as the 32-bit boot header field holds it.
const CMDLINE_PTR: u32 = 0x20000;
const _: () = assert!(CMDLINE_PTR as u64 == CMDLINE_START);
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Errors while writing the boot protocol structures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory has more regions than an e820 map holds.
    #[error("guest memory layout needs more than {0} e820 entries")]
    TooManyE820Entries(usize),
    /// Writing the zero page failed.
    #[error("failed to write the boot parameters into guest memory")]
    ZeroPage(#[source] linux_loader::configurator::Error),
}

/// Where the initrd was placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical start address.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Returns the e820 map for `mem`: low RAM below the EBDA, then every region
/// from 1 MiB up, with the 32-bit device hole left out.
pub fn e820_map<M: GuestMemoryBackend>(mem: &M) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    map.push(boot_e820_entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        r#type: E820_RESERVED,
    });
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.last_addr().raw_value() + 1;
        if end <= start {
            continue;
        }
        map.push(boot_e820_entry {
            addr: start,
            size: end - start,
            r#type: E820_RAM,
        });
    }
    map
}

/// Picks the highest page-aligned address below the device hole where an
/// initrd of `size` bytes fits, above `kernel_end`.
pub fn initrd_address<M: GuestMemoryBackend>(
    mem: &M,
    size: u64,
    kernel_end: u64,
) -> Option<GuestAddress> {
    let low_end = mem
        .iter()
        .filter(|r| r.start_addr().raw_value() < MMIO_GAP_START)
        .map(|r| r.last_addr().raw_value() + 1)
        .max()?;
    let addr = low_end.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(GuestAddress(addr))
}

/// Writes the zero page: boot header, command line pointer, initrd and e820.
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_PTR;
    params.hdr.cmdline_size = u32::try_from(cmdline_size).unwrap_or(u32::MAX);
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        // The device hole is below 4 GiB and the initrd below it, so both fit in 32 bits.
        params.hdr.ramdisk_image = u32::try_from(initrd.addr.raw_value()).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
    }
    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(Error::TooManyE820Entries(params.e820_table.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *entry;
    }
    // Checked above: at most the table's 128 slots.
    params.e820_entries = u8::try_from(map.len()).unwrap_or(u8::MAX);
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(Error::ZeroPage)
}

/// Guest RAM ranges for `mem_bytes` of memory: one range below the device
/// hole and, for large guests, the rest above 4 GiB.
pub fn memory_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    // little.cloud runs on 64-bit hosts only, where usize holds any u64.
    let size = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
    let mut ranges = vec![(GuestAddress(0), size(low))];
    if mem_bytes > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), size(mem_bytes - MMIO_GAP_START)));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&memory_ranges(size)).expect("mmap")
    }

    #[test]
    fn small_guest_has_one_range() {
        assert_eq!(memory_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_device_hole() {
        let r = memory_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 0xd000_0000));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, 4 << 30);
    }

    #[test]
    fn e820_reserves_ebda_and_covers_ram() {
        let m = mem(64 << 20);
        let map = e820_map(&m);
        assert_eq!({ map[0].addr }, 0);
        assert_eq!({ map[0].size }, EBDA_START);
        assert_eq!({ map[1].r#type }, E820_RESERVED);
        assert_eq!({ map[2].addr }, HIMEM_START);
        assert_eq!({ map[2].size }, (64 << 20) - HIMEM_START);
        assert!(map.iter().all(|e| e.addr + e.size <= MMIO_GAP_START));
    }

    #[test]
    fn boot_params_are_written() {
        let m = mem(64 << 20);
        let initrd = InitrdPlacement {
            addr: GuestAddress(0x300_0000),
            size: 4096,
        };
        write_boot_params(&m, 100, Some(initrd)).expect("zero page");
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).expect("read");
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_PTR);
        assert_eq!({ p.hdr.cmdline_size }, 100);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn initrd_goes_to_top_of_low_memory() {
        let m = mem(64 << 20);
        let a = initrd_address(&m, 10_000, 0x200_0000).expect("fits");
        assert_eq!(a.raw_value() & 0xfff, 0);
        assert!(a.raw_value() + 10_000 <= 64 << 20);
        assert!(
            initrd_address(&m, 63 << 20, 0x200_0000).is_none(),
            "overlaps kernel"
        );
        assert!(
            initrd_address(&m, 1 << 40, 0).is_none(),
            "bigger than memory"
        );
    }
}
