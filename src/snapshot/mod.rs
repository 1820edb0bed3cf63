// SPDX-License-Identifier: Apache-2.0
//! Snapshot and restore (issue 13). So far: [`kvm_state`], the KVM state of vCPUs and of the
//! VM that a restore must carry over; [`Vmm::snapshot_restore`](crate::vmm::Vmm), the
//! in-process experiment that moves a running guest into a new KVM VM; and [`file`], an
//! experimental snapshot on disk that a second ember process restores
//! (`ember run --snapshot-to` / `--restore-from`). docs/snapshot-pvm.md says what this host's
//! KVM (PVM) needs for that.

pub mod file;
pub mod kvm_state;

use std::fmt::Write as _;
use std::time::Duration;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{create_guest_memory, GuestMemory, MemoryError};
use crate::vcpu::{VcpuError, VcpuShared};
use crate::vm::VmError;
use kvm_state::{msr_value, KvmCaps, RestoreOptions, StateError, VcpuState, VmState};

/// Errors of [`Vmm::snapshot_restore`](crate::vmm::Vmm::snapshot_restore).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// This VM cannot be moved (yet).
    #[error("this VM cannot be snapshotted: {0}")]
    NotRestorable(&'static str),
    /// Opening /dev/kvm or creating the new VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Reading what KVM supports failed.
    #[error("cannot probe KVM's capabilities")]
    Caps(#[source] StateError),
    /// Pausing, saving or restoring a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Saving the VM state failed.
    #[error("cannot save the VM's KVM state")]
    SaveVm(#[source] StateError),
    /// Restoring the VM state failed.
    #[error("cannot restore the VM's KVM state into the new VM")]
    RestoreVm(#[source] StateError),
    /// The new guest memory could not be made.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Copying guest memory failed.
    #[error("cannot copy guest memory at {0:#x}")]
    Copy(u64),
    /// The snapshot files could not be written.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// The memory file could not be written or mapped.
    #[error("cannot make the guest memory file")]
    MemoryFile(#[source] std::io::Error),
    /// An irqfd could not be registered with the new VM.
    #[error("cannot register the irqfd of IRQ {0} with the new VM")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
}

/// What a VM needs kept from its build to be moved into a new KVM VM.
#[derive(Debug)]
pub struct RestoreParts {
    /// The vCPUs' buses, exit latch, hooks (its memory is replaced).
    pub shared: VcpuShared,
    /// Every device irqfd, with its line.
    pub irqfds: Vec<(EventFd, u32)>,
    /// How many virtio devices the VM has (they hold the old memory: not movable yet).
    pub virtio_devices: usize,
    /// COM1, whose registers a snapshot file carries.
    pub com1:
        Option<std::sync::Arc<std::sync::Mutex<crate::devices::legacy::serial::SerialDevice>>>,
}

/// When the run loop moves the guest into a new KVM VM (`ember run
/// --snapshot-restore-after`).
#[derive(Debug, Clone)]
pub struct SnapshotTrigger {
    /// How long after the guest's boot-timer write (its init started).
    pub after: Duration,
    /// How to restore.
    pub opts: RestoreOptions,
    /// Instead of moving the guest, write a snapshot into this directory and end the run
    /// (`ember run --snapshot-to`; `--restore-from` starts it again in a new process).
    pub to: Option<std::path::PathBuf>,
}

/// What one snapshot-and-restore did and saw.
#[derive(Debug)]
pub struct SnapshotReport {
    /// What KVM supports.
    pub caps: KvmCaps,
    /// The saved vCPU states.
    pub vcpus: Vec<VcpuState>,
    /// What KVM_KVMCLOCK_CTRL said on each vCPU at the pause.
    pub kvmclock_ctrl: Vec<Result<(), kvm_ioctls::Error>>,
    /// The saved VM state.
    pub vm: VmState,
    /// KVM_GET_CLOCK of the new VM right after the restore.
    pub new_clock: Option<kvm_bindings::kvm_clock_data>,
    /// Time to pause every vCPU and save its state.
    pub pause_save: Duration,
    /// Time to copy guest memory.
    pub copy: Duration,
    /// Time to create the new VM and restore everything into it.
    pub restore: Duration,
    /// vCPU 0's kvm-clock page: as saved, right after the restore, and (with
    /// `probe-pvclock`) 200 ms later.
    pub pvclock: Vec<(&'static str, Pvclock)>,
    /// The steps of `restore` and their times.
    pub restore_steps: Vec<(&'static str, Duration)>,
}

/// Copies `old` into fresh guest memory of the same layout.
pub fn copy_memory(old: &GuestMemory) -> Result<GuestMemory, SnapshotError> {
    let size: u64 = old.iter().map(|r| r.len()).sum();
    let new = create_guest_memory(size)?;
    let mut buf = vec![0u8; 1 << 20];
    for region in old.iter() {
        let start = region.start_addr();
        let mut off = 0u64;
        while off < region.len() {
            let n = usize::try_from((region.len() - off).min(buf.len() as u64)).unwrap_or(0);
            let addr = vm_memory::GuestAddress(start.0 + off);
            old.read_slice(&mut buf[..n], addr)
                .map_err(|_| SnapshotError::Copy(addr.0))?;
            new.write_slice(&buf[..n], addr)
                .map_err(|_| SnapshotError::Copy(addr.0))?;
            off += n as u64;
        }
    }
    Ok(new)
}

/// Writes `old` to a file in the temporary directory and maps the file MAP_PRIVATE as the
/// new guest memory (as Firecracker loads a snapshot's memory file); the file is unlinked at
/// once, the mappings keep it.
pub fn file_memory(old: &GuestMemory) -> Result<GuestMemory, SnapshotError> {
    use std::io::Write as _;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};

    let io = SnapshotError::MemoryFile;
    let path = std::env::temp_dir().join(format!("ember-snapshot-mem-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    let _ = std::fs::remove_file(&path);
    let mut buf = vec![0u8; 1 << 20];
    let mut layout = Vec::new();
    let mut file_off = 0u64;
    for region in old.iter() {
        let start = region.start_addr();
        let mut off = 0u64;
        while off < region.len() {
            let n = usize::try_from((region.len() - off).min(buf.len() as u64)).unwrap_or(0);
            let addr = vm_memory::GuestAddress(start.0 + off);
            old.read_slice(&mut buf[..n], addr)
                .map_err(|_| SnapshotError::Copy(addr.0))?;
            file.write_all(&buf[..n]).map_err(io)?;
            off += n as u64;
        }
        layout.push((start, region.len(), file_off));
        file_off += region.len();
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::new();
    for (start, len, off) in layout {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let mapping = MmapRegionBuilder::new_with_bitmap(len, ())
            .with_file_offset(FileOffset::from_arc(file.clone(), off))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::MemoryFile(std::io::Error::other(e.to_string())))?;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or(SnapshotError::Copy(start.0))?);
    }
    GuestMemory::from_regions(regions)
        .map_err(|e| SnapshotError::MemoryFile(std::io::Error::other(e.to_string())))
}

/// The kvm-clock page (struct pvclock_vcpu_time_info) of a vCPU as it is in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Pvclock {
    /// Update counter (odd while KVM writes it).
    pub version: u32,
    /// TSC when KVM last wrote it.
    pub tsc_timestamp: u64,
    /// Guest time in ns at `tsc_timestamp`.
    pub system_time: u64,
    /// PVCLOCK_* flags.
    pub flags: u8,
}

/// Reads the kvm-clock page at the address in MSR_KVM_SYSTEM_TIME_NEW `msr` (enabled: bit 0).
pub fn read_pvclock(mem: &GuestMemory, msr: u64) -> Option<Pvclock> {
    if msr & 1 == 0 {
        return None;
    }
    let mut b = [0u8; 32];
    mem.read_slice(&mut b, vm_memory::GuestAddress(msr & !1))
        .ok()?;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    Some(Pvclock {
        version: u32::from_le_bytes(b[0..4].try_into().unwrap_or_default()),
        tsc_timestamp: u64_at(8),
        system_time: u64_at(16),
        flags: b[29],
    })
}

/// MSR_IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// MSR_KVM_SYSTEM_TIME_NEW (kvm-clock's per-vCPU time page).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

impl std::fmt::Display for SnapshotReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = format!(
            "pause+save {:?}, memory copy {:?}, new VM + restore {:?}; clock {} ns (flags {:#x})",
            self.pause_save, self.copy, self.restore, self.vm.clock.clock, self.vm.clock.flags
        );
        let _ = write!(s, " (");
        for (i, (name, d)) in self.restore_steps.iter().enumerate() {
            let _ = write!(s, "{}{name} {d:?}", if i > 0 { ", " } else { "" });
        }
        let _ = write!(s, ")");
        for (when, p) in &self.pvclock {
            let _ = write!(
                s,
                ", kvm-clock page {when}: system_time {} ns at TSC {} (version {}, flags {:#x})",
                p.system_time, p.tsc_timestamp, p.version, p.flags
            );
        }
        if let Some(c) = &self.new_clock {
            let _ = write!(s, ", new VM clock {} ns (flags {:#x})", c.clock, c.flags);
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            let _ = write!(
                s,
                "; vCPU {i}: RIP {:#x}, mp_state {}, TSC {:?}, kvm-clock MSR {:?}, tsc_khz {:?}, \
                 {} MSRs saved, refused: {:x?}, KVMCLOCK_CTRL: {}",
                v.regs.rip,
                v.mp_state.mp_state,
                msr_value(&v.msrs, MSR_IA32_TSC),
                msr_value(&v.msrs, MSR_KVM_SYSTEM_TIME_NEW).map(|m| format!("{m:#x}")),
                v.tsc_khz,
                v.msrs.len(),
                v.msrs_failed,
                match self.kvmclock_ctrl.get(i) {
                    Some(Ok(())) => "ok".to_string(),
                    Some(Err(e)) => e.to_string(),
                    None => "-".to_string(),
                }
            );
        }
        f.write_str(&s)
    }
}
