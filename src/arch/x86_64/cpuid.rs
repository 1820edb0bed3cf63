// SPDX-License-Identifier: Apache-2.0
//! Per-vCPU CPUID: KVM's supported leaves with the APIC ID, topology, hypervisor bit and TSC
//! frequency filled in, and — on hosts where they hang — the KVM PV features that work
//! through hypercalls hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// KVM paravirtual feature bits in CPUID 0x4000_0001 EAX.
pub mod kvm_feature {
    /// PV spinlock unhalt (KVM_HC_KICK_CPU hypercall).
    pub const PV_UNHALT: u32 = 7;
    /// PV send-IPI (KVM_HC_SEND_IPI hypercall).
    pub const PV_SEND_IPI: u32 = 11;
    /// PV sched-yield (KVM_HC_SCHED_YIELD hypercall).
    pub const PV_SCHED_YIELD: u32 = 13;
    /// Map-GPA-range hypercall.
    pub const HC_MAP_GPA_RANGE: u32 = 16;
}

/// The KVM PV features that are driven through hypercalls; on a PVM host a hypercall hangs
/// the vCPU that makes it, so these are hidden there.
pub const HYPERCALL_FEATURES: [u32; 4] = [
    kvm_feature::PV_UNHALT,
    kvm_feature::PV_SEND_IPI,
    kvm_feature::PV_SCHED_YIELD,
    kvm_feature::HC_MAP_GPA_RANGE,
];

/// What the CPUID of one vCPU must say.
#[derive(Debug, Clone, Copy)]
pub struct CpuidParams {
    /// This vCPU's index, which is also its APIC ID.
    pub vcpu_index: u32,
    /// Number of vCPUs in the VM.
    pub vcpu_count: u32,
    /// Hide the hypercall-based KVM PV features.
    pub hide_pv_hypercalls: bool,
    /// TSC frequency in kHz, when the host knows it.
    pub tsc_khz: Option<u32>,
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_TIMING: u32 = 0x4000_0010;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `count` items (ceil(log2(count))).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Rewrites `cpuid` (KVM_GET_SUPPORTED_CPUID output) for one vCPU. Each vCPU is one core of
/// one package, one thread per core.
pub fn filter_cpuid(cpuid: &mut CpuId, p: &CpuidParams) {
    let apic_id = p.vcpu_index;
    let count = p.vcpu_count.max(1);
    let core_shift = bits_for(count);
    let mut has_timing_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let shared = if (e.eax >> 5) & 0x7 >= 3 {
                    count - 1
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | ((shared & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level.
                        e.eax = core_shift;
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff;
                    }
                }
            }
            LEAF_KVM_SIGNATURE if p.tsc_khz.is_some() => {
                e.eax = e.eax.max(LEAF_TIMING);
            }
            LEAF_KVM_FEATURES if p.hide_pv_hypercalls => {
                for bit in HYPERCALL_FEATURES {
                    e.eax &= !(1 << bit);
                }
            }
            LEAF_TIMING => has_timing_leaf = true,
            _ => {}
        }
    }
    if let (Some(khz), false) = (p.tsc_khz, has_timing_leaf) {
        // EAX: TSC frequency in kHz; EBX: local APIC bus frequency in kHz (KVM: 1 GHz).
        let entry = kvm_cpuid_entry2 {
            function: LEAF_TIMING,
            index: 0,
            flags: 0,
            eax: khz,
            ebx: 1_000_000,
            ..Default::default()
        };
        if cpuid.push(entry).is_err() {
            log::debug!("no room for the CPUID timing leaf; the guest will calibrate its TSC");
        }
    }
}

/// Looks up a leaf (for tests and diagnostics).
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| {
            e.function == function
                && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
        })
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0x1,
                ebx: 0xff12_3456,
                edx: EDX_HTT,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0xffff_ffff,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_id_and_topology() {
        let mut c = sample();
        let p = CpuidParams {
            vcpu_index: 2,
            vcpu_count: 3,
            hide_pv_hypercalls: false,
            tsc_khz: None,
        };
        filter_cpuid(&mut c, &p);
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_eq!(l1.ebx & 0xffff, 0x3456);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let core = find(&c, 0xb, 1).unwrap();
        assert_eq!(core.eax, 2);
        assert_eq!(core.ebx, 3);
        assert_eq!(core.edx, 2);
        let smt = find(&c, 0xb, 0).unwrap();
        assert_eq!(smt.ebx, 1);
        // KVM features untouched when not asked.
        assert_eq!(find(&c, 0x4000_0001, 0).unwrap().eax, 0xffff_ffff);
    }

    #[test]
    fn hides_hypercall_features_and_adds_tsc_leaf() {
        let mut c = sample();
        let p = CpuidParams {
            vcpu_index: 0,
            vcpu_count: 1,
            hide_pv_hypercalls: true,
            tsc_khz: Some(2_500_000),
        };
        filter_cpuid(&mut c, &p);
        let f = find(&c, 0x4000_0001, 0).unwrap().eax;
        for bit in HYPERCALL_FEATURES {
            assert_eq!(f & (1 << bit), 0, "bit {bit} still set");
        }
        // Other PV features (kvm-clock = bit 3) stay.
        assert_ne!(f & (1 << 3), 0);
        assert_eq!(find(&c, 0x4000_0010, 0).unwrap().eax, 2_500_000);
        assert_eq!(find(&c, 0x4000_0000, 0).unwrap().eax, 0x4000_0010);
        assert_eq!(find(&c, 1, 0).unwrap().edx & EDX_HTT, 0);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
