// SPDX-License-Identifier: Apache-2.0
//! Snapshots: a stopped VM saved to a directory and restored from it (issue 13).
//!
//! - [`format`](mod@format): the snapshot directory and its versioned, checksummed `state`
//!   file, and [`SnapshotError`], every refusal of a snapshot;
//! - [`devices`]: the state of every device (legacy ports, ACPI, virtio transports and
//!   devices), saved from and restored into the device models;
//! - [`kvm_state`]: the KVM state of vCPUs and of the VM that a restore must carry over;
//! - [`file`](mod@file): the snapshot that `ember run --snapshot-to` (experimental) writes
//!   and a second ember process restores (`ember restore`, `ember run --restore-from`), in
//!   the [`format`](mod@format) directory;
//! - [`SnapshotMeta`] (here): the configuration the VM was built from, checked against the
//!   VM a snapshot is restored into before anything of it is restored;
//! - [`Vmm::snapshot_restore`](crate::vmm::Vmm::snapshot_restore) (with the helpers here):
//!   the in-process experiment that moves a running guest into a new KVM VM.
//!
//! docs/snapshot-pvm.md says what this host's KVM (PVM) needs for a restore. The
//! configuration is the one [`VmConfig`] the CLI (and a config file or API) produce: it is
//! serialized as it is, not copied into a snapshot-only type.

pub mod cache;
pub mod devices;
pub mod file;
pub mod format;
pub mod kvm_state;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::devices::acpi::AcpiPlatform;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::memory::{create_guest_memory, GuestMemory};
use crate::vcpu::VcpuShared;
use devices::DeviceStates;
use format::SnapshotError;
use kvm_state::{msr_value, KvmCaps, RestoreOptions, VcpuState, VmState};

/// Everything in a `state` file: the metadata checked first, the devices, and the KVM state
/// of the VM and its vCPUs (`V`, defined with the vCPU and VM code).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState<V> {
    /// What the VM was built from.
    pub meta: SnapshotMeta,
    /// Every device's state.
    pub devices: DeviceStates,
    /// The KVM state: VM (irqchip, clock...) and vCPUs (registers, MSRs...).
    pub vm: V,
}

/// The facts about a VM that a restore checks: the configuration it was built from, each
/// disk's size and the devices in the order they were attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// The size in bytes of each disk of `config.disks`, in order, when the snapshot was
    /// taken.
    pub disk_sizes: Vec<u64>,
    /// The devices, in the order the builder attaches them ([`device_list`]).
    pub devices: Vec<String>,
}

/// The size of a disk image (a regular file or a block device).
fn disk_size(path: &std::path::Path) -> Result<u64, SnapshotError> {
    use std::io::{Seek, SeekFrom};
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let kind = crate::user_file::Kind::RegularOrBlockDevice;
    let mut f = crate::user_file::open(path, false, 0, kind).map_err(io)?;
    f.seek(SeekFrom::End(0)).map_err(io)
}

/// The devices a VM built from `config` has, in the order the builder attaches them (the
/// order of [`DeviceStates::virtio`]).
pub fn device_list(config: &VmConfig) -> Vec<String> {
    let mut d = vec!["serial COM1".to_string()];
    if config.com2.is_some() {
        d.push("serial COM2".into());
    }
    d.push("i8042".into());
    if config.acpi {
        d.push("ACPI platform".into());
    }
    for (i, disk) in config.disks.iter().enumerate() {
        d.push(format!(
            "virtio-blk {} ({})",
            VmConfig::disk_name(i),
            disk.path.display()
        ));
    }
    // By MAC (the guest's), not by TAP (a host-side setting a restore may change).
    for n in &config.net {
        d.push(format!("virtio-net mac={}", n.mac()));
    }
    // Without its CID or socket path: host-side settings a restore may change.
    if config.vsock.is_some() {
        d.push("virtio-vsock".into());
    }
    if config.rng.is_some() {
        d.push("virtio-rng".into());
    }
    // By tag (what the guest mounts), not by directory: a restore may share another one.
    for (i, share) in config.shares.iter().enumerate() {
        d.push(format!("virtio-fs tag={}", share.tag(i)));
    }
    d
}

impl SnapshotMeta {
    /// The metadata of a VM built from `config` (the disks' sizes are read now). Each NIC's
    /// MAC is written out even where `config` derives it from the TAP name, so that a
    /// restore onto another TAP keeps the guest's address.
    pub fn new(config: &VmConfig) -> Result<Self, SnapshotError> {
        let mut config = config.clone();
        for n in &mut config.net {
            n.mac = Some(n.mac());
        }
        Ok(Self {
            disk_sizes: config
                .disks
                .iter()
                .map(|d| disk_size(&d.path))
                .collect::<Result<_, _>>()?,
            devices: device_list(&config),
            config,
        })
    }

    /// Checks that a VM built from `now` can take this snapshot: the same vCPU count, memory
    /// size, kernel command line, disks (same files, modes and sizes, in the same order) and
    /// devices (a VM with virtio-vsock only into one with virtio-vsock; as many NICs, each
    /// with the MAC it had). Host-side settings (where the console goes, stdin, the image
    /// cache, the vsock Unix socket path, each NIC's TAP, the disks' and NICs' rate limits) and the vsock CID (the restored
    /// guest re-reads it) may differ.
    pub fn check(&self, now: &VmConfig) -> Result<(), SnapshotError> {
        let then = &self.config;
        let mismatch = |what: &str, snapshot: String, now: String| {
            Err(SnapshotError::Mismatch {
                what: what.into(),
                snapshot,
                now,
            })
        };
        if then.vcpus != now.vcpus {
            return mismatch("vCPU count", then.vcpus.to_string(), now.vcpus.to_string());
        }
        if then.mem_mib != now.mem_mib {
            return mismatch(
                "memory size",
                format!("{} MiB", then.mem_mib),
                format!("{} MiB", now.mem_mib),
            );
        }
        if then.cmdline != now.cmdline {
            return mismatch(
                "kernel command line",
                format!("{:?}", then.cmdline),
                format!("{:?}", now.cmdline),
            );
        }
        if then.disks.len() != now.disks.len() || self.disk_sizes.len() != then.disks.len() {
            return mismatch(
                "disk count",
                then.disks.len().to_string(),
                now.disks.len().to_string(),
            );
        }
        for (i, (a, b)) in then.disks.iter().zip(&now.disks).enumerate() {
            let name = VmConfig::disk_name(i);
            if a.path != b.path || a.read_only != b.read_only {
                let show = |d: &crate::config::DiskConfig| {
                    format!(
                        "{}{}",
                        d.path.display(),
                        if d.read_only { ",ro" } else { "" }
                    )
                };
                return mismatch(&format!("disk {name}"), show(a), show(b));
            }
            let size = disk_size(&b.path)?;
            if size != self.disk_sizes[i] {
                return mismatch(
                    &format!("disk {name} ({}) of size", b.path.display()),
                    format!("{} bytes", self.disk_sizes[i]),
                    format!("{size} bytes"),
                );
            }
        }
        // NICs before the device list, with messages that say what to give.
        if then.net.len() != now.net.len() {
            let taps = |c: &VmConfig| match c.net.len() {
                0 => "0".to_string(),
                n => {
                    let t: Vec<&str> = c.net.iter().map(|n| n.tap.as_str()).collect();
                    format!("{n} (TAP {})", t.join(", "))
                }
            };
            return Err(SnapshotError::Mismatch {
                what: "NIC count".into(),
                snapshot: taps(then),
                now: format!(
                    "{}; give one --net per NIC of the snapshot (`ember restore DIR --tap NAME` \
                     moves a NIC onto another TAP)",
                    taps(now)
                ),
            });
        }
        for (i, (a, b)) in then.net.iter().zip(&now.net).enumerate() {
            if a.mac() != b.mac() {
                return mismatch(
                    &format!("NIC {i} MAC"),
                    a.mac().to_string(),
                    format!(
                        "{} (TAP {}); a NIC keeps the guest's MAC: give --net tap={},mac={}",
                        b.mac(),
                        b.tap,
                        b.tap,
                        a.mac()
                    ),
                );
            }
        }
        let devices = device_list(now);
        if self.devices != devices {
            return mismatch("devices", self.devices.join(", "), devices.join(", "));
        }
        Ok(())
    }
}

/// What a VM needs kept from its build to be moved into a new KVM VM or saved to a snapshot
/// directory.
#[derive(Debug)]
pub struct RestoreParts {
    /// The configuration the VM was built from (a snapshot's [`SnapshotMeta`]).
    pub config: VmConfig,
    /// The vCPUs' buses, exit latch, hooks (its memory is replaced).
    pub shared: VcpuShared,
    /// Every device irqfd, with its line.
    pub irqfds: Vec<(EventFd, u32)>,
    /// Every virtio-mmio transport with its device, in slot order (a snapshot file carries
    /// them all; they hold the VM's memory, so a move into a new KVM VM in this process
    /// refuses them).
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
    /// COM1, whose registers a snapshot carries.
    pub com1: Arc<Mutex<SerialDevice>>,
    /// COM2, when the VM has one.
    pub com2: Option<Arc<Mutex<SerialDevice>>>,
    /// The ACPI platform registers, when the VM has ACPI.
    pub acpi: Option<Arc<Mutex<AcpiPlatform>>>,
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
    let mut buf = vec![0u8; MEMORY_CHUNK];
    for (addr, n) in memory_chunks(old) {
        old.read_slice(&mut buf[..n], addr)
            .map_err(|_| SnapshotError::GuestMemory(addr.0))?;
        new.write_slice(&buf[..n], addr)
            .map_err(|_| SnapshotError::GuestMemory(addr.0))?;
    }
    Ok(new)
}

/// Writes guest memory into `file`, which must be empty, in the memory file's layout
/// ([`memory_chunks`]), sparse: pages that are all zeros are not written but left as holes,
/// which read back as zeros, and the file is given its exact size at the end. A guest's
/// never-touched RAM thus costs no disk blocks, and a restore that maps the file reads no
/// data for it. Returns the bytes written (the rest are holes). `io` turns a write error
/// into the caller's error.
pub fn write_memory_sparse(
    mem: &GuestMemory,
    file: &std::fs::File,
    io: impl Fn(std::io::Error) -> SnapshotError,
) -> Result<u64, SnapshotError> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    static ZEROS: [u8; PAGE] = [0; PAGE];
    let mut buf = vec![0u8; MEMORY_CHUNK];
    let (mut offset, mut written) = (0u64, 0u64);
    for (addr, n) in memory_chunks(mem) {
        let chunk = &mut buf[..n];
        mem.read_slice(chunk, addr)
            .map_err(|_| SnapshotError::GuestMemory(addr.0))?;
        // Runs of pages that are not all zeros, each written with one call (a slice
        // comparison is a memcmp, fast in debug builds too).
        let mut page = 0;
        while page * PAGE < n {
            let zero = |p: usize| {
                let b = &chunk[p * PAGE..((p + 1) * PAGE).min(n)];
                b == &ZEROS[..b.len()]
            };
            if zero(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page * PAGE < n && !zero(page) {
                page += 1;
            }
            let data = &chunk[first * PAGE..(page * PAGE).min(n)];
            file.write_all_at(data, offset + (first * PAGE) as u64)
                .map_err(&io)?;
            written += data.len() as u64;
        }
        offset += n as u64;
    }
    file.set_len(offset).map_err(&io)?;
    Ok(written)
}

/// Size of the pieces [`memory_chunks`] cuts guest memory into.
pub const MEMORY_CHUNK: usize = 1 << 20;

/// Guest memory as (guest address, length) pieces of at most [`MEMORY_CHUNK`] bytes, region
/// by region in address order: the layout of a snapshot's memory file.
pub fn memory_chunks(mem: &GuestMemory) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    const CHUNK: u64 = MEMORY_CHUNK as u64;
    mem.iter().flat_map(|region| {
        let (start, len) = (region.start_addr().0, region.len());
        (0..len.div_ceil(CHUNK)).map(move |i| {
            let off = i * CHUNK;
            // At most CHUNK, so it fits.
            (GuestAddress(start + off), (len - off).min(CHUNK) as usize)
        })
    })
}

/// Writes `old` to a file in the temporary directory and maps the file MAP_PRIVATE as the
/// new guest memory (as Firecracker loads a snapshot's memory file, and as `ember restore`
/// does); the file is unlinked at once, the mappings keep it.
pub fn file_memory(old: &GuestMemory) -> Result<GuestMemory, SnapshotError> {
    let io = SnapshotError::MemoryFile;
    let path = std::env::temp_dir().join(format!("ember-snapshot-mem-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    let _ = std::fs::remove_file(&path);
    write_memory_sparse(old, &file, io)?;
    let size: u64 = old.iter().map(|r| r.len()).sum();
    Ok(crate::memory::guest_memory_from_file(file, size)?)
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::devices::virtio::net::{MacAddr, NetConfig};
    use crate::devices::virtio::vsock::VsockConfig;

    fn config(disk: &Path) -> VmConfig {
        let mut c = VmConfig::new("/boot/vmlinux");
        c.vcpus = 2;
        c.mem_mib = 256;
        // Rate limits on the disk and the NIC: the snapshot carries them.
        c.disks = vec![format!("{},bw=8M,iops=100", disk.display())
            .parse()
            .unwrap()];
        c.net = vec!["tap=tap0,rx=1M,tx=2M,tx_burst=64k".parse().unwrap()];
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds: "/tmp/v.sock".into(),
        });
        c.initrd_append = Some(vec![1, 2, 3]);
        c
    }

    #[test]
    fn meta_goes_through_the_state_file_and_checks_the_vm() {
        let dir = std::env::temp_dir().join(format!("ember-snapmeta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let c = config(&disk);
        let meta = SnapshotMeta::new(&c).unwrap();
        assert_eq!(meta.disk_sizes, vec![4096]);
        assert_eq!(
            meta.devices,
            vec![
                "serial COM1".to_string(),
                "i8042".into(),
                "ACPI platform".into(),
                format!("virtio-blk vda ({})", disk.display()),
                format!("virtio-net mac={}", MacAddr::derive("tap0")),
                "virtio-vsock".into(),
                "virtio-rng".into(),
            ]
        );
        // The derived MAC is written out: a restore onto another TAP keeps it.
        assert_eq!(meta.config.net[0].mac, Some(MacAddr::derive("tap0")));
        let path = dir.join(format::STATE_FILE);
        format::write_state(&path, &meta).unwrap();
        let back: SnapshotMeta = format::read_state(&path).unwrap();
        assert_eq!(back, meta);
        // `ember restore` builds the VM from this configuration: the limits are kept.
        let limited = |b: &SnapshotMeta| {
            let (d, n) = (&b.config.disks[0], &b.config.net[0]);
            (
                d.bw.map(|l| l.rate),
                d.iops.map(|l| l.rate),
                n.rx.map(|l| l.rate),
            )
        };
        assert_eq!(limited(&back), (Some(8 << 20), Some(100), Some(1 << 20)));
        assert_eq!(back.config.net[0].tx.map(|l| l.burst), Some(64 << 10));
        back.check(&c).unwrap();
        // Host-side settings may differ.
        let mut host = c.clone();
        host.stdin = false;
        host.image_cache = None;
        back.check(&host).unwrap();
        // So may the vsock socket path and CID.
        let mut vsock = c.clone();
        vsock.vsock = Some(VsockConfig {
            cid: 7,
            uds: "/run/other.sock".into(),
        });
        back.check(&vsock).unwrap();
        // So may the rate limits (`ember run --restore-from` with other limits).
        let mut limits = c.clone();
        limits.disks[0].bw = None;
        limits.disks[0].iops = Some(crate::devices::virtio::rate_limiter::BucketConfig::new(
            5, None,
        ));
        limits.net[0].rx = None;
        back.check(&limits).unwrap();
        // So may a NIC's TAP, with the guest's MAC kept (`ember restore --tap`).
        let mut tap = back.config.clone();
        tap.net[0].tap = "tap9".into();
        back.check(&tap).unwrap();

        let refused = |edit: &dyn Fn(&mut VmConfig), want: &str| {
            let mut now = c.clone();
            edit(&mut now);
            let e = back.check(&now).unwrap_err();
            assert!(matches!(e, SnapshotError::Mismatch { .. }), "{e}");
            assert!(e.to_string().contains(want), "{want}: {e}");
        };
        refused(
            &|n| n.vcpus = 4,
            "the snapshot was taken with vCPU count 2, but this VM has 4",
        );
        refused(&|n| n.mem_mib = 128, "memory size 256 MiB");
        refused(&|n| n.cmdline.push_str(" quiet"), "kernel command line");
        refused(&|n| n.disks.clear(), "disk count");
        refused(&|n| n.disks[0].read_only = true, "disk vda");
        refused(&|n| n.rng = None, "devices");
        // Another TAP whose derived MAC is another: refused, saying which MAC to give.
        refused(
            &|n| n.net[0].tap = "tap1".into(),
            &format!(
                "NIC 0 MAC {}, but this VM has {} (TAP tap1); a NIC keeps the guest's MAC: \
                 give --net tap=tap1,mac={}",
                MacAddr::derive("tap0"),
                MacAddr::derive("tap1"),
                MacAddr::derive("tap0")
            ),
        );
        refused(
            &|n| n.net[0].mac = Some(MacAddr([2, 0, 0, 0, 0, 9])),
            "NIC 0 MAC",
        );
        // Another NIC count, either way.
        refused(
            &|n| n.net.clear(),
            "NIC count 1 (TAP tap0), but this VM has 0;",
        );
        refused(
            &|n| {
                n.net.push(NetConfig::new("tap1"));
            },
            "NIC count 1 (TAP tap0), but this VM has 2 (TAP tap0, tap1)",
        );
        // A VM with vsock into one without, and the reverse.
        refused(
            &|n| n.vsock = None,
            "virtio-vsock, virtio-rng, but this VM has",
        );
        let mut without = c.clone();
        without.vsock = None;
        let meta2 = SnapshotMeta::new(&without).unwrap();
        let e = meta2.check(&c).unwrap_err();
        assert!(e.to_string().contains("virtio-vsock"), "{e}");
        // The disk grew since the snapshot.
        std::fs::write(&disk, vec![0u8; 8192]).unwrap();
        let e = back.check(&c).unwrap_err().to_string();
        assert!(e.contains("4096 bytes") && e.contains("8192 bytes"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn whole_state_with_a_vm_part_round_trips() {
        let c = VmConfig::new("/boot/vmlinux");
        let s = SnapshotState {
            meta: SnapshotMeta::new(&c).unwrap(),
            devices: DeviceStates {
                com1: devices::SerialState::from(vm_superio::serial::SerialState::default()),
                com2: None,
                i8042: devices::I8042State {},
                acpi: Some(devices::AcpiState::default()),
                virtio: Vec::new(),
            },
            // Stands for the KVM state: kvm-bindings' structures serialize with its `serde`
            // feature.
            vm: vec![kvm_bindings::kvm_regs {
                rip: 0x10_0000,
                rflags: 2,
                ..Default::default()
            }],
        };
        let bytes = format::encode_state(&s).unwrap();
        let (_, back): (_, SnapshotState<Vec<kvm_bindings::kvm_regs>>) =
            format::decode_state(Path::new("state"), &bytes).unwrap();
        assert_eq!(back, s);
    }
}
