// SPDX-License-Identifier: Apache-2.0
//! The KVM state a snapshot carries: per vCPU ([`VcpuState`]) and per VM ([`VmState`]), with
//! what this host's KVM supports ([`KvmCaps`]) read once.
//!
//! Every ioctl is checked; a failure names the ioctl. MSRs are every index of
//! KVM_GET_MSR_INDEX_LIST (the MSRs KVM saves plus those it emulates), of
//! KVM_GET_MSR_FEATURE_INDEX_LIST and of [`EXTRA_MSRS`], read in batches; the ones KVM_GET_MSRS refuses on this
//! vCPU are left out of the state and listed in [`VcpuState::msrs_failed`].
//!
//! Restore order (the one Firecracker documents for x86_64): CPUID, MP state, registers,
//! special registers (before anything that depends on EFER/CR4/APIC base), FPU, XSAVE, XCRs,
//! debug registers, LAPIC (after the special registers, which set the APIC base), MSRs (after
//! the LAPIC: the TSC-deadline MSR only sticks when the LAPIC is in TSC-deadline mode), vCPU
//! events last (pending exceptions and interrupts, on top of everything else).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// How many MSRs one KVM_GET_MSRS / KVM_SET_MSRS call carries.
const MSR_BATCH: usize = 64;

/// A KVM state ioctl failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The named ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS took fewer MSRs than it was given.
    #[error("KVM_SET_MSRS stopped at MSR {index:#x} ({set} of {total} set)")]
    MsrsIncomplete {
        /// The first MSR KVM refused.
        index: u32,
        /// How many it took.
        set: usize,
        /// How many it was given.
        total: usize,
    },
    /// The paused vCPU was given no capability probe to save its state with.
    #[error("no KVM capability probe was handed to the vCPU")]
    NoCaps,
    /// An MSR list did not fit a KVM MSR buffer.
    #[error("cannot build a KVM MSR buffer of {0} entries")]
    MsrBuffer(usize),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Ioctl(what, e)
}

/// MSRs a guest uses that KVM_GET_MSR_INDEX_LIST leaves out on this project's hosts but
/// KVM_GET_MSRS reads (QEMU saves them too): MSR_TSC_AUX (RDTSCP/RDPID's CPU number), the
/// MTRR default type, the fixed-range MTRRs and eight variable-range MTRR pairs. One that a
/// vCPU refuses is listed in [`VcpuState::msrs_failed`] like any other.
pub const EXTRA_MSRS: [u32; 29] = [
    0xc000_0103,
    0x2ff,
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f,
];

/// What this host's KVM can save and restore, read from /dev/kvm once.
#[derive(Debug, Clone)]
pub struct KvmCaps {
    /// KVM_CAP_XCRS: KVM_GET/SET_XCRS.
    pub xcrs: bool,
    /// KVM_CAP_XSAVE: KVM_GET/SET_XSAVE.
    pub xsave: bool,
    /// KVM_CAP_XSAVE2 (the value is the buffer size KVM wants, 0 when absent).
    pub xsave2_size: i32,
    /// KVM_CAP_ADJUST_CLOCK (the value is the set of KVM_CLOCK_* flags KVM_GET_CLOCK reports).
    pub adjust_clock: i32,
    /// KVM_CAP_VCPU_EVENTS.
    pub vcpu_events: bool,
    /// KVM_CAP_DEBUGREGS.
    pub debugregs: bool,
    /// KVM_CAP_TSC_CONTROL: KVM_SET_TSC_KHZ.
    pub tsc_control: bool,
    /// KVM_CAP_GET_TSC_KHZ.
    pub get_tsc_khz: bool,
    /// KVM_CAP_KVMCLOCK_CTRL.
    pub kvmclock_ctrl: bool,
    /// KVM_CAP_TSC_DEADLINE_TIMER.
    pub tsc_deadline: bool,
    /// KVM_CAP_IMMEDIATE_EXIT.
    pub immediate_exit: bool,
    /// KVM_CAP_GET_MSR_FEATURES.
    pub msr_features: bool,
    /// KVM_GET_MSR_INDEX_LIST.
    pub msr_index_list: Vec<u32>,
    /// KVM_GET_MSR_FEATURE_INDEX_LIST (empty when KVM has none).
    pub msr_feature_list: Vec<u32>,
}

impl KvmCaps {
    /// Probes `kvm`.
    pub fn probe(kvm: &Kvm) -> Result<Self, StateError> {
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let msr_features = kvm.check_extension(Cap::GetMsrFeatures);
        let msr_feature_list = if msr_features {
            kvm.get_msr_feature_index_list()
                .map_err(ioctl("KVM_GET_MSR_FEATURE_INDEX_LIST"))?
                .as_slice()
                .to_vec()
        } else {
            Vec::new()
        };
        Ok(Self {
            xcrs: kvm.check_extension(Cap::Xcrs),
            xsave: kvm.check_extension(Cap::Xsave),
            xsave2_size: kvm.check_extension_int(Cap::Xsave2),
            adjust_clock: kvm.check_extension_int(Cap::AdjustClock),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            debugregs: kvm.check_extension(Cap::Debugregs),
            tsc_control: kvm.check_extension(Cap::TscControl),
            get_tsc_khz: kvm.check_extension(Cap::GetTscKhz),
            kvmclock_ctrl: kvm.check_extension(Cap::KvmclockCtrl),
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            immediate_exit: kvm.check_extension(Cap::ImmediateExit),
            msr_features,
            msr_index_list,
            msr_feature_list,
        })
    }

    /// Every MSR index to try, without duplicates: KVM's two lists, then [`EXTRA_MSRS`].
    pub fn msrs_to_try(&self) -> Vec<u32> {
        let mut all = Vec::new();
        for &i in self
            .msr_index_list
            .iter()
            .chain(&self.msr_feature_list)
            .chain(&EXTRA_MSRS)
        {
            if !all.contains(&i) {
                all.push(i);
            }
        }
        all
    }
}

/// The KVM state of one vCPU. It serializes (for a snapshot's `state` file) with
/// kvm-bindings' `serde` impls, which write each KVM structure as its raw bytes; CPUID as its
/// entries and the FPU field by field, which kvm-bindings does not cover.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// KVM_GET_CPUID2 (the CPUID the VMM set).
    #[serde(with = "cpuid_entries")]
    pub cpuid: CpuId,
    /// KVM_GET_MP_STATE.
    pub mp_state: kvm_mp_state,
    /// KVM_GET_REGS.
    pub regs: kvm_regs,
    /// KVM_GET_SREGS.
    pub sregs: kvm_sregs,
    /// KVM_GET_FPU.
    #[serde(with = "fpu_fields")]
    pub fpu: kvm_fpu,
    /// KVM_GET_XSAVE, when KVM_CAP_XSAVE.
    pub xsave: Option<kvm_xsave>,
    /// KVM_GET_XCRS, when KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// KVM_GET_DEBUGREGS, when KVM_CAP_DEBUGREGS.
    pub debugregs: Option<kvm_debugregs>,
    /// KVM_GET_LAPIC.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM_GET_MSRS read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The MSRs of [`KvmCaps::msrs_to_try`] KVM_GET_MSRS refused on this vCPU.
    pub msrs_failed: Vec<u32>,
    /// KVM_GET_VCPU_EVENTS, when KVM_CAP_VCPU_EVENTS.
    pub vcpu_events: Option<kvm_vcpu_events>,
    /// KVM_GET_TSC_KHZ, when KVM_CAP_GET_TSC_KHZ.
    pub tsc_khz: Option<u32>,
}

/// [`CpuId`] (a KVM flexible-array buffer) serialized as its list of entries.
mod cpuid_entries {
    use kvm_bindings::{kvm_cpuid_entry2, CpuId};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(cpuid: &CpuId, s: S) -> Result<S::Ok, S::Error> {
        cpuid.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CpuId, D::Error> {
        let entries = Vec::<kvm_cpuid_entry2>::deserialize(d)?;
        CpuId::from_entries(&entries).map_err(|_| {
            serde::de::Error::custom(format!("{} CPUID entries do not fit", entries.len()))
        })
    }
}

/// [`kvm_fpu`] (no serde impl in kvm-bindings) serialized field by field.
mod fpu_fields {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// kvm_fpu's fields but its padding.
    #[derive(Serialize, Deserialize)]
    struct Fpu {
        fpr: [[u8; 16]; 8],
        fcw: u16,
        fsw: u16,
        ftwx: u8,
        last_opcode: u16,
        last_ip: u64,
        last_dp: u64,
        xmm: [[u8; 16]; 16],
        mxcsr: u32,
    }

    pub fn serialize<S: Serializer>(f: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let f = Fpu::deserialize(d)?;
        Ok(kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        })
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .field("msrs_failed", &self.msrs_failed)
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

/// The MSR value of `index` in `msrs`.
pub fn msr_value(msrs: &[kvm_msr_entry], index: u32) -> Option<u64> {
    msrs.iter().find(|e| e.index == index).map(|e| e.data)
}

/// Reads every MSR of `indices` that KVM_GET_MSRS reads on `fd`, in batches. KVM_GET_MSRS
/// stops at the first MSR it cannot read and returns how many it read: that one is recorded
/// as failed and the batch goes on after it.
pub fn read_msrs(
    fd: &VcpuFd,
    indices: &[u32],
) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), StateError> {
    let mut ok = Vec::with_capacity(indices.len());
    let mut failed = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::MsrBuffer(entries.len()))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        ok.extend_from_slice(&msrs.as_slice()[..n.min(batch.len())]);
        if n < batch.len() {
            failed.push(batch[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok((ok, failed))
}

/// Writes `msrs` with KVM_SET_MSRS in batches; every one must be taken.
pub fn write_msrs(fd: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<(), StateError> {
    for batch in msrs.chunks(MSR_BATCH) {
        let buf = Msrs::from_entries(batch).map_err(|_| StateError::MsrBuffer(batch.len()))?;
        let n = fd.set_msrs(&buf).map_err(ioctl("KVM_SET_MSRS"))?;
        if n < batch.len() {
            return Err(StateError::MsrsIncomplete {
                index: batch[n].index,
                set: n,
                total: batch.len(),
            });
        }
    }
    Ok(())
}

impl VcpuState {
    /// Saves the state of the vCPU `fd` (call it on the vCPU's own thread, outside KVM_RUN).
    /// KVM_GET_MP_STATE comes first: it lets KVM take pending INIT/SIPI events, which may
    /// change the registers read after it.
    pub fn save(fd: &VcpuFd, caps: &KvmCaps) -> Result<Self, StateError> {
        let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let fpu = fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?;
        let xsave = caps
            .xsave
            .then(|| fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE")))
            .transpose()?;
        let xcrs = caps
            .xcrs
            .then(|| fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS")))
            .transpose()?;
        let debugregs = caps
            .debugregs
            .then(|| fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS")))
            .transpose()?;
        let lapic = fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let tsc_khz = caps
            .get_tsc_khz
            .then(|| fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ")))
            .transpose()?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_CPUID2"))?;
        let (msrs, msrs_failed) = read_msrs(fd, &caps.msrs_to_try())?;
        let vcpu_events = caps
            .vcpu_events
            .then(|| fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS")))
            .transpose()?;
        Ok(Self {
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            msrs_failed,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Restores this state into the new vCPU `fd`, in the order of the module comment.
    /// `opts` says which of the experimental extras to apply.
    pub fn restore(&self, fd: &VcpuFd, opts: &RestoreOptions) -> Result<(), StateError> {
        if opts.set_tsc_khz {
            if let Some(khz) = self.tsc_khz.filter(|k| *k > 0) {
                fd.set_tsc_khz(khz).map_err(ioctl("KVM_SET_TSC_KHZ"))?;
            }
        }
        fd.set_cpuid2(&self.cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        fd.set_fpu(&self.fpu).map_err(ioctl("KVM_SET_FPU"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: `xsave` is a whole kvm_xsave that KVM_GET_XSAVE filled on a vCPU of the
            // same host, so it is as large as KVM_SET_XSAVE reads (no XSAVE2 extension).
            unsafe { fd.set_xsave(xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        }
        if let Some(d) = &self.debugregs {
            fd.set_debug_regs(d).map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        }
        fd.set_lapic(&self.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        let msrs: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .filter(|e| !opts.skip_msrs.contains(&e.index))
            .copied()
            .collect();
        write_msrs(fd, &msrs)?;
        if let Some(ev) = &self.vcpu_events {
            fd.set_vcpu_events(ev)
                .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

/// Experimental switches of a restore (what docs/snapshot-pvm.md tries).
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore the VM clock with KVM_SET_CLOCK.
    pub set_clock: bool,
    /// Keep KVM_CLOCK_TSC_STABLE (and the other KVM_GET_CLOCK output flags) in the flags
    /// handed to KVM_SET_CLOCK instead of clearing them.
    pub keep_clock_flags: bool,
    /// Call KVM_SET_TSC_KHZ with the saved frequency before the rest.
    pub set_tsc_khz: bool,
    /// MSR indices not to write back.
    pub skip_msrs: Vec<u32>,
    /// Put the new guest memory in a file mapped MAP_PRIVATE (as Firecracker does) instead
    /// of fresh anonymous memory.
    pub memory_file: bool,
    /// Save (state and memory copy), then resume the same VM: no new VM.
    pub pause_only: bool,
    /// Read vCPU 0's kvm-clock page again 200 ms after the restore (the run loop waits).
    pub probe_pvclock: bool,
    /// Wait this long between the save and the restore (a snapshot restored later).
    pub delay: std::time::Duration,
}

impl RestoreOptions {
    /// What a restore does by default: the clock restored, its output flags cleared.
    pub fn standard() -> Self {
        Self {
            set_clock: true,
            ..Self::default()
        }
    }
}

/// The KVM state of a VM: interrupt controllers, PIT and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// KVM_GET_IRQCHIP of the master PIC.
    pub pic_master: kvm_irqchip,
    /// KVM_GET_IRQCHIP of the slave PIC.
    pub pic_slave: kvm_irqchip,
    /// KVM_GET_IRQCHIP of the IOAPIC.
    pub ioapic: kvm_irqchip,
    /// KVM_GET_PIT2.
    pub pit: kvm_pit_state2,
    /// KVM_GET_CLOCK.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock_ns", &self.clock.clock)
            .field("clock_flags", &self.clock.flags)
            .finish_non_exhaustive()
    }
}

/// The KVM state of a whole VM as a snapshot's `state` file carries it (the `V` of
/// [`SnapshotState`](super::SnapshotState)): the VM's, then every vCPU's in index order.
#[derive(Debug, Serialize, Deserialize)]
pub struct KvmState {
    /// The VM's KVM state.
    pub vm: VmState,
    /// Every vCPU's KVM state, in index order.
    pub vcpus: Vec<VcpuState>,
}

fn get_chip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(ioctl(what))?;
    Ok(chip)
}

impl VmState {
    /// Saves the VM's state (with its vCPUs paused).
    pub fn save(fd: &VmFd) -> Result<Self, StateError> {
        Ok(Self {
            pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        })
    }

    /// Restores the state into a new VM that has its irqchip and PIT, before its vCPUs run.
    pub fn restore(&self, fd: &VmFd, opts: &RestoreOptions) -> Result<(), StateError> {
        fd.set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        if opts.set_clock {
            let mut clock = self.clock;
            if !opts.keep_clock_flags {
                // KVM_GET_CLOCK reports KVM_CLOCK_TSC_STABLE (and REALTIME/HOST_TSC on newer
                // kernels) as output; KVM_SET_CLOCK takes only REALTIME as input.
                clock.flags = 0;
            }
            fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        }
        fd.set_irqchip(&self.pic_master)
            .map_err(ioctl("KVM_SET_IRQCHIP (PIC master)"))?;
        fd.set_irqchip(&self.pic_slave)
            .map_err(ioctl("KVM_SET_IRQCHIP (PIC slave)"))?;
        fd.set_irqchip(&self.ioapic)
            .map_err(ioctl("KVM_SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::open_kvm;

    /// Prints what this host's KVM supports for snapshots (docs/snapshot-pvm.md quotes it):
    /// `cargo test --lib kvm_state::tests::probe -- --nocapture`.
    #[test]
    fn probe() {
        let Ok(kvm) = open_kvm() else {
            eprintln!("SKIP probe: /dev/kvm is not usable here");
            return;
        };
        let caps = KvmCaps::probe(&kvm).unwrap();
        eprintln!("{caps:#x?}");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let (ok, failed) = read_msrs(&vcpu, &caps.msrs_to_try()).unwrap();
        eprintln!(
            "{} MSRs to try, {} read: {:x?}; refused: {failed:x?}",
            caps.msrs_to_try().len(),
            ok.len(),
            ok.iter().map(|e| e.index).collect::<Vec<_>>()
        );
        assert_eq!(ok.len() + failed.len(), caps.msrs_to_try().len());
        // MSRs outside the lists: TSC_AUX, SPEC_CTRL, MTRRs, EFER, APIC base, FS/GS base,
        // and PVM's own range (0x4b564df0..).
        let mut extra = vec![
            0xc000_0103,
            0x48,
            0x2ff,
            0x200,
            0x250,
            0xc000_0080,
            0x1b,
            0xc000_0100,
            0xc000_0101,
        ];
        extra.extend(0x4b56_4df0..=0x4b56_4dff);
        let (ok, failed) = read_msrs(&vcpu, &extra).unwrap();
        eprintln!(
            "outside the lists: read {:x?}; refused: {failed:x?}",
            ok.iter().map(|e| (e.index, e.data)).collect::<Vec<_>>()
        );
        // Does a TSC write stick (KVM offsets the guest TSC), or does the guest see the host's?
        let tsc = |fd: &VcpuFd| msr_value(&read_msrs(fd, &[0x10]).unwrap().0, 0x10).unwrap();
        let before = tsc(&vcpu);
        write_msrs(
            &vcpu,
            &[kvm_msr_entry {
                index: 0x10,
                data: 1_000_000,
                ..Default::default()
            }],
        )
        .unwrap();
        let after = tsc(&vcpu);
        // SAFETY: rdtsc has no preconditions.
        let host = unsafe { std::arch::x86_64::_rdtsc() };
        eprintln!("guest TSC {before} before writing 1000000, {after} after; host TSC {host}");
    }

    /// The FPU and CPUID, which kvm-bindings does not serialize itself, go through the
    /// state file format field by field.
    #[test]
    fn fpu_and_cpuid_serialize() {
        #[derive(Serialize, Deserialize)]
        struct Both {
            #[serde(with = "fpu_fields")]
            fpu: kvm_fpu,
            #[serde(with = "cpuid_entries")]
            cpuid: CpuId,
        }
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            fsw: 1,
            ftwx: 2,
            last_opcode: 3,
            last_ip: 4,
            last_dp: 5,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.fpr[7][15] = 6;
        fpu.xmm[15][0] = 7;
        let entry = kvm_bindings::kvm_cpuid_entry2 {
            function: 0x4000_0001,
            eax: 8,
            ..Default::default()
        };
        let both = Both {
            fpu,
            cpuid: CpuId::from_entries(&[entry, entry]).unwrap(),
        };
        let bytes = crate::snapshot::format::encode_state(&both).unwrap();
        let (_, back): (_, Both) =
            crate::snapshot::format::decode_state(std::path::Path::new("state"), &bytes).unwrap();
        let (a, b) = (&both.fpu, &back.fpu);
        assert_eq!((a.fcw, a.fsw, a.ftwx), (b.fcw, b.fsw, b.ftwx));
        assert_eq!(
            (a.last_opcode, a.last_ip, a.last_dp),
            (b.last_opcode, b.last_ip, b.last_dp)
        );
        assert_eq!((a.fpr, a.xmm, a.mxcsr), (b.fpr, b.xmm, b.mxcsr));
        assert_eq!(back.cpuid.as_slice(), both.cpuid.as_slice());
    }

    /// A vCPU's state saved, restored into a vCPU of another VM and saved again reads the
    /// same (the TSC excepted: it runs on).
    #[test]
    fn vcpu_state_round_trip() {
        let Ok(kvm) = open_kvm() else {
            eprintln!("SKIP vcpu_state_round_trip: /dev/kvm is not usable here");
            return;
        };
        let caps = KvmCaps::probe(&kvm).unwrap();
        let make = || {
            let vm = kvm.create_vm().unwrap();
            vm.create_irq_chip().unwrap();
            vm.create_pit2(kvm_bindings::kvm_pit_config::default())
                .unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            (vm, vcpu)
        };
        let (vm1, vcpu1) = make();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu1.set_cpuid2(&cpuid).unwrap();
        let mut regs = vcpu1.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0xfff0;
        vcpu1.set_regs(&regs).unwrap();
        let saved = VcpuState::save(&vcpu1, &caps).unwrap();
        let vm_saved = VmState::save(&vm1).unwrap();

        let (vm2, vcpu2) = make();
        vm_saved.restore(&vm2, &RestoreOptions::standard()).unwrap();
        saved.restore(&vcpu2, &RestoreOptions::standard()).unwrap();
        let again = VcpuState::save(&vcpu2, &caps).unwrap();
        assert_eq!(again.regs.rax, 0x1234_5678);
        assert_eq!(again.regs.rip, 0xfff0);
        assert_eq!(again.sregs.cr0, saved.sregs.cr0);
        assert_eq!(again.lapic.regs[..], saved.lapic.regs[..]);
        for e in &saved.msrs {
            if e.index == 0x10 {
                continue;
            }
            assert_eq!(
                msr_value(&again.msrs, e.index),
                Some(e.data),
                "MSR {:#x}",
                e.index
            );
        }
        let tsc = |s: &VcpuState| msr_value(&s.msrs, 0x10).unwrap();
        assert!(tsc(&again) >= tsc(&saved));
        let clock2 = vm2.get_clock().unwrap();
        assert!(clock2.clock >= vm_saved.clock.clock);
    }
}
