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

/// Sub-leaf `index` of the extended topology leaf `leaf` (0xB or 0x1F) for the vCPU with
/// APIC ID `apic_id` of `count`: level 0 is the SMT level (one thread per core), level 1 the
/// core level (`count` cores, APIC ID bits above `core_shift` name the package), and every
/// other level is invalid (ends the list).
fn topology_entry(
    leaf: u32,
    index: u32,
    apic_id: u32,
    core_shift: u32,
    count: u32,
) -> kvm_cpuid_entry2 {
    let (eax, ebx, ecx) = match index {
        0 => (0, 1, 1 << 8),
        1 => (core_shift, count, 1 | (2 << 8)),
        i => (0, 0, i & 0xff),
    };
    kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    }
}

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
                let t = topology_entry(e.function, e.index, apic_id, core_shift, count);
                (e.eax, e.ebx, e.ecx, e.edx) = (t.eax, t.ebx, t.ecx, t.edx);
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
    // KVM may list only sub-leaf 0 (the SMT level) of a topology leaf; a guest that finds no
    // core level behind it takes every vCPU for a package of its own (Linux then shows N
    // one-core packages). Add the core level and the invalid level that ends the list.
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if find(cpuid, leaf, 0).is_none() {
            continue;
        }
        for index in [1, 2] {
            if find(cpuid, leaf, index).is_none()
                && cpuid
                    .push(topology_entry(leaf, index, apic_id, core_shift, count))
                    .is_err()
            {
                log::warn!(
                    "no room for CPUID leaf {leaf:#x}.{index}: the guest may see each vCPU as a \
                     package of its own"
                );
            }
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

/// Looks up a leaf as the CPU would: an entry without a significant index answers every
/// sub-leaf.
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
    fn adds_the_core_level_when_kvm_lists_only_the_smt_level() {
        // What KVM_GET_SUPPORTED_CPUID returns on the PVM hosts: 0xB and 0x1F with sub-leaf
        // 0 only, all zero.
        let entries = [0xb, 0x1f].map(|function| kvm_cpuid_entry2 {
            function,
            index: 0,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ..Default::default()
        });
        let mut c = CpuId::from_entries(&entries).unwrap();
        let p = CpuidParams {
            vcpu_index: 1,
            vcpu_count: 2,
            hide_pv_hypercalls: false,
            tsc_khz: None,
        };
        filter_cpuid(&mut c, &p);
        for leaf in [0xb, 0x1f] {
            let smt = find(&c, leaf, 0).unwrap();
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 1));
            // The core level: 2 cores, one APIC ID bit for them, so both vCPUs are in package 0.
            let core = find(&c, leaf, 1).unwrap();
            assert_eq!((core.eax, core.ebx, (core.ecx >> 8) & 0xff), (1, 2, 2));
            assert_eq!(core.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            assert_eq!(core.edx, 1);
            // Then the end of the list (level type 0).
            let end = find(&c, leaf, 2).unwrap();
            assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
        }
        // Nothing is added for a leaf KVM does not list.
        let mut c = sample();
        let before = c.as_slice().len();
        filter_cpuid(&mut c, &p);
        assert!(find(&c, 0x1f, 1).is_none());
        assert_eq!(c.as_slice().len(), before + 1, "only 0xB.2 is added");
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
