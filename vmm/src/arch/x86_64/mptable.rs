//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI
//! learns its CPUs, its IOAPIC and the ISA interrupt routing.

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, IOAPIC_START, MPTABLE_START};

/// The table holds 32-bit physical addresses; these all sit below 4 GiB.
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const APIC_ADDR: u32 = 0xfee0_0000;
const MPF_SIZE: u32 = 16;
const TABLE_ADDR: u32 = 0x9fc00 + MPF_SIZE;
const _: () = assert!(IOAPIC_ADDR as u64 == IOAPIC_START && APIC_ADDR as u64 == APIC_START);
const _: () = assert!(TABLE_ADDR as u64 == MPTABLE_START + MPF_SIZE as u64);
const _: () = assert!(std::mem::size_of::<MpfIntel>() == MPF_SIZE as usize);

/// Most vCPUs an MP table here describes (the table must fit in the last KiB
/// below 640 KiB).
pub const MAX_CPUS: u8 = 32;
/// IOAPIC pins routed one-to-one from ISA IRQs.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const MPC_SPEC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;
const MPC_APIC_USABLE: u8 = 1;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Zero vCPUs or more than the table can describe.
    #[error("an MP table describes 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// The table does not fit in guest memory.
    #[error("failed to write the MP table into guest memory")]
    WriteGuest(#[source] vm_memory::GuestMemoryError),
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// SAFETY: each struct is `repr(C, packed)` plain old data made only of
// integers and byte arrays, so it has no padding and every bit pattern is valid.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above, packed integers only.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above, packed integers only.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above, packed integers only.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above, packed integers only.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above, packed integers only.
unsafe impl ByteValued for MpcIntsrc {}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Builds the MP configuration table body (header checksum filled in) for
/// `num_cpus` vCPUs.
fn build_table(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let e = MpcCpu {
            type_: MP_PROCESSOR,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        entries.extend_from_slice(e.as_slice());
    }
    let bus = MpcBus {
        type_: MP_BUS,
        busid: BUS_ID_ISA,
        bustype: *b"ISA   ",
    };
    entries.extend_from_slice(bus.as_slice());
    let ioapic = MpcIoapic {
        type_: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: APIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_ADDR,
    };
    entries.extend_from_slice(ioapic.as_slice());
    for irq in 0..IOAPIC_PINS {
        let src = MpcIntsrc {
            type_: MP_INTSRC,
            irqtype: MP_IRQ_INT,
            irqflag: 0,
            srcbus: BUS_ID_ISA,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        };
        entries.extend_from_slice(src.as_slice());
    }
    // The PIC's output goes to LINT0 of the BSP; NMIs to LINT1 of every CPU.
    for (irqtype, dstapic, lint) in [(MP_IRQ_EXTINT, 0, 0), (MP_IRQ_NMI, 0xff, 1)] {
        let src = MpcIntsrc {
            type_: MP_LINTSRC,
            irqtype,
            irqflag: 0,
            srcbus: BUS_ID_ISA,
            srcbusirq: 0,
            dstapic,
            dstirq: lint,
        };
        entries.extend_from_slice(src.as_slice());
    }

    // At most MAX_CPUS entries of 20 bytes plus 30 of 8: well under 64 KiB.
    let length = u16::try_from(std::mem::size_of::<MpcTable>() + entries.len()).unwrap_or(u16::MAX);
    let mut header = MpcTable {
        signature: *b"PCMP",
        length,
        spec: MPC_SPEC,
        checksum: 0,
        oem: *b"LITTLE  ",
        productid: *b"MICROVM     ",
        oemptr: 0,
        oemsize: 0,
        oemcount: u16::from(num_cpus) + 2 + u16::from(IOAPIC_PINS) + 2,
        lapic: APIC_ADDR,
        reserved: 0,
    };
    let sum = checksum(header.as_slice()).wrapping_add(checksum(&entries));
    header.checksum = sum.wrapping_neg();
    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&entries);
    table
}

/// Writes the MP floating pointer and configuration table for `num_cpus`
/// vCPUs at [`MPTABLE_START`].
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u8) -> Result<(), Error> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::CpuCount(num_cpus));
    }
    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        physptr: TABLE_ADDR,
        length: 1,
        specification: MPC_SPEC,
        checksum: 0,
        feature: [0; 5],
    };
    mpf.checksum = checksum(mpf.as_slice()).wrapping_neg();
    mem.write_obj(mpf, GuestAddress(MPTABLE_START))
        .map_err(Error::WriteGuest)?;
    mem.write_slice(&build_table(num_cpus), GuestAddress(u64::from(TABLE_ADDR)))
        .map_err(Error::WriteGuest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xa0000)]).expect("mmap")
    }

    #[test]
    fn checksums_are_zero_and_table_fits_below_640k() {
        for cpus in [1u8, 2, MAX_CPUS] {
            let m = mem();
            setup_mptable(&m, cpus).expect("fits");
            let mut mpf = [0u8; 16];
            m.read_slice(&mut mpf, GuestAddress(MPTABLE_START))
                .expect("read");
            assert_eq!(&mpf[..4], b"_MP_");
            assert_eq!(checksum(&mpf), 0);
            let table_addr = u64::from(u32::from_le_bytes(mpf[4..8].try_into().expect("4")));
            let mut hdr = [0u8; 44];
            m.read_slice(&mut hdr, GuestAddress(u64::from(TABLE_ADDR)))
                .expect("hdr");
            assert_eq!(&hdr[..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
            assert!(table_addr + len as u64 <= 0xa0000, "{cpus} cpus overflow");
            let mut table = vec![0u8; len];
            m.read_slice(&mut table, GuestAddress(u64::from(TABLE_ADDR)))
                .expect("table");
            assert_eq!(checksum(&table), 0);
            let cpu_entries = table[44..]
                .chunks(20)
                .take(usize::from(cpus))
                .filter(|e| e[0] == MP_PROCESSOR)
                .count();
            assert_eq!(cpu_entries, usize::from(cpus));
            assert_eq!(table[44 + 3] & CPU_BOOTPROCESSOR, CPU_BOOTPROCESSOR);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let m = mem();
        assert!(matches!(setup_mptable(&m, 0), Err(Error::CpuCount(0))));
        assert!(matches!(
            setup_mptable(&m, MAX_CPUS + 1),
            Err(Error::CpuCount(_))
        ));
    }
}
