//! The CPUID a guest sees: what KVM supports, minus what this host cannot
//! run, with per-vCPU topology filled in.

use kvm_bindings::CpuId;

use crate::host::HostKind;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_EXTENDED_FEATURES: u32 = 0x7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

// Leaf 1 ECX.
const ECX_FMA: u32 = 1 << 12;
const ECX_CX16: u32 = 1 << 13;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const EDX_HTT: u32 = 1 << 28;
// Leaf 7 EBX.
const EBX_AVX2: u32 = 1 << 5;
const EBX_ERMS: u32 = 1 << 9;
const EBX_AVX512F: u32 = 1 << 16;
const EBX_AVX512DQ: u32 = 1 << 17;
const EBX_SMAP: u32 = 1 << 20;
const EBX_AVX512IFMA: u32 = 1 << 21;
const EBX_AVX512PF: u32 = 1 << 26;
const EBX_AVX512ER: u32 = 1 << 27;
const EBX_AVX512CD: u32 = 1 << 28;
const EBX_AVX512BW: u32 = 1 << 30;
const EBX_AVX512VL: u32 = 1 << 31;
// Leaf 7 EDX.
const EDX_FSRM: u32 = 1 << 4;
// KVM PV features that need no hypercall: kvm-clock (old and new MSRs),
// no-op port-0x80 delays, and the stable-clock bit.
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

/// Leaf 1 ECX bits the nested emulator cannot run (or that need XSAVE).
pub const NESTED_LEAF1_ECX_MASK: u32 =
    ECX_FMA | ECX_CX16 | ECX_POPCNT | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_F16C;
/// Leaf 7 EBX bits the nested emulator cannot run (or that need XSAVE).
pub const NESTED_LEAF7_EBX_MASK: u32 = EBX_AVX2
    | EBX_ERMS
    | EBX_AVX512F
    | EBX_AVX512DQ
    | EBX_SMAP
    | EBX_AVX512IFMA
    | EBX_AVX512PF
    | EBX_AVX512ER
    | EBX_AVX512CD
    | EBX_AVX512BW
    | EBX_AVX512VL;

/// Adjusts KVM's supported CPUID for vCPU `cpu_index` of `cpu_count`.
pub fn filter_cpuid(cpuid: &mut CpuId, cpu_index: u8, cpu_count: u8, host: HostKind) {
    let nested = host == HostKind::NestedEmulated;
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // Initial APIC ID, logical processor count, CLFLUSH line size (8 * 8 bytes).
                entry.ebx = (u32::from(cpu_index) << 24)
                    | (u32::from(cpu_count) << 16)
                    | (8 << 8)
                    | (entry.ebx & 0xff);
                entry.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
                if nested {
                    entry.ecx &= !NESTED_LEAF1_ECX_MASK;
                }
            }
            LEAF_CACHE => {
                // Cores per package - 1, in bits 31:26.
                entry.eax = (entry.eax & 0x03ff_ffff)
                    | (u32::from(cpu_count.saturating_sub(1) & 0x3f) << 26);
            }
            LEAF_EXTENDED_FEATURES if entry.index == 0 && nested => {
                entry.ebx &= !NESTED_LEAF7_EBX_MASK;
                entry.edx &= !EDX_FSRM;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = u32::from(cpu_index);
            }
            LEAF_XSAVE if nested => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_KVM_FEATURES if nested => {
                entry.eax &= KVM_FEATURE_CLOCKSOURCE
                    | KVM_FEATURE_NOP_IO_DELAY
                    | KVM_FEATURE_CLOCKSOURCE2
                    | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE, 0),
            entry(LEAF_EXTENDED_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_XSAVE, 0),
            entry(LEAF_KVM_FEATURES, 0),
        ])
        .expect("six entries fit")
    }

    fn find(c: &CpuId, f: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f)
            .expect("leaf present")
    }

    #[test]
    fn nested_host_masks_unemulated_features() {
        let mut c = sample();
        filter_cpuid(&mut c, 0, 1, HostKind::NestedEmulated);
        let l1 = find(&c, LEAF_FEATURES);
        assert_eq!(l1.ecx & (ECX_POPCNT | ECX_CX16 | ECX_XSAVE | ECX_AVX), 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let l7 = find(&c, LEAF_EXTENDED_FEATURES);
        assert_eq!(l7.ebx & (EBX_SMAP | EBX_ERMS | EBX_AVX2), 0);
        assert_eq!(l7.edx & EDX_FSRM, 0);
        assert_eq!(find(&c, LEAF_XSAVE).eax, 0);
        let pv = find(&c, LEAF_KVM_FEATURES);
        assert_eq!(
            pv.eax,
            KVM_FEATURE_CLOCKSOURCE
                | KVM_FEATURE_NOP_IO_DELAY
                | KVM_FEATURE_CLOCKSOURCE2
                | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT
        );
    }

    #[test]
    fn hardware_host_keeps_features() {
        let mut c = sample();
        filter_cpuid(&mut c, 0, 1, HostKind::Hardware);
        let l1 = find(&c, LEAF_FEATURES);
        assert_ne!(l1.ecx & ECX_POPCNT, 0);
        assert_ne!(find(&c, LEAF_EXTENDED_FEATURES).ebx & EBX_SMAP, 0);
        assert_eq!(find(&c, LEAF_KVM_FEATURES).eax, u32::MAX);
    }

    #[test]
    fn topology_is_per_vcpu() {
        let mut c = sample();
        filter_cpuid(&mut c, 3, 4, HostKind::Hardware);
        let l1 = find(&c, LEAF_FEATURES);
        assert_eq!(l1.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(find(&c, LEAF_TOPOLOGY).edx, 3, "x2APIC ID");
        assert_eq!(find(&c, LEAF_CACHE).eax >> 26, 3);
        let mut single = sample();
        filter_cpuid(&mut single, 0, 1, HostKind::Hardware);
        assert_eq!(find(&single, LEAF_FEATURES).edx & EDX_HTT, 0);
    }
}
