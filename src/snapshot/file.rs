// SPDX-License-Identifier: Apache-2.0
//! A snapshot on disk (issue 13): `ember run --snapshot-to DIR` (experimental) writes it and
//! a second ember process starts the guest from it (`ember restore DIR`, or `ember run
//! --restore-from DIR`). The directory is [`format`](mod@super::format)'s:
//!
//! - `state` ([`STATE_FILE`]): a [`FileState`] (the VM's configuration, the device states
//!   ember restores so far, the KVM state of the VM and of every vCPU) in the versioned,
//!   checksummed state file of [`write_state`](super::format::write_state);
//! - `memory` ([`MEMORY_FILE`]): guest RAM as raw bytes, region after region, written
//!   sparse (all-zero pages are holes, see
//!   [`write_memory_sparse`](super::write_memory_sparse)); a restore maps it copy-on-write
//!   ([`map_memory`]) instead of reading it.
//!
//! virtio-rng, virtio-blk, virtio-net and virtio-vsock are carried over: each transport's
//! registers and queues with its device's state (see [`devices`](super::devices)); the
//! restoring run builds its devices from the configuration as usual (disks reopened by path,
//! with the same locks; each NIC's TAP opened, the snapshot's or the one `ember restore
//! --tap` names; the vsock Unix socket at this run's path) and restores each transport once
//! guest memory holds the snapshot's RAM. A vsock snapshot is refused while a vsock
//! connection is open; after a restore the guest gets a vsock TRANSPORT_RESET event (see
//! [`vsock::device`](crate::devices::virtio::vsock::device)). Frames a NIC held in ember's
//! buffers are lost (see [`net::device`](crate::devices::virtio::net::device)). `ember
//! restore` takes the configuration from the state file; `ember run --restore-from` must be
//! given the same VM flags (the vsock CID and socket path, and the TAPs, may differ; each
//! NIC's MAC may not). Either way
//! [`SnapshotMeta::check`](super::SnapshotMeta::check) refuses another configuration (a
//! disk whose size changed included).

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::format::{self, SnapshotError, MEMORY_FILE, STATE_FILE};
use super::kvm_state::KvmState;
use super::SnapshotState;
use crate::memory::GuestMemory;

/// What the `state` file of a `--snapshot-to` directory holds.
pub type FileState = SnapshotState<KvmState>;

/// Why a VM with virtio devices is refused by a move into a new KVM VM in the same process
/// (`--snapshot-restore-after` without `--snapshot-to`).
pub const NO_VIRTIO: &str = "it has virtio devices, which cannot be moved into a new KVM VM \
                             in this process yet: use --no-rng and no --disk/--net/--vsock \
                             (--snapshot-to/--restore-from carry them)";

/// Why a VM whose guest has used a `--share` (virtio-fs) is refused by snapshots.
pub const NO_SHARE: &str = "its guest has mounted a --share directory (virtio-fs): virtiofsd's \
                            open files and inodes live in another process and cannot be \
                            carried; snapshot the guest before it mounts the share";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes guest memory ([`MEMORY_FILE`], sparse) and then `state` ([`STATE_FILE`]) into
/// `dir` (created if needed). Each file is written under a temporary name, synced and
/// renamed into place: a VM restored from `dir` may be mapping the old memory file, whose
/// pages must not change under it (it keeps the replaced file), and a directory with a
/// `state` file has the memory that goes with it.
pub fn write(dir: &Path, state: &FileState, mem: &GuestMemory) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_memory_file(dir, mem)?;
    format::write_state(&dir.join(STATE_FILE), state)
}

/// Writes `mem` as the memory file of `dir` (sparse, under a temporary name, synced, then
/// renamed into place); returns the bytes of data written.
fn write_memory_file(dir: &Path, mem: &GuestMemory) -> Result<u64, SnapshotError> {
    let p = dir.join(MEMORY_FILE);
    let tmp = dir.join(format!(".{MEMORY_FILE}.tmp-{}", std::process::id()));
    let result = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let written = super::write_memory_sparse(mem, &f, |e| io(&tmp)(e))?;
        f.sync_data().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
        log::debug!(
            "snapshot memory: {written} bytes of data in {} (the rest are holes)",
            p.display()
        );
        Ok(written)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and checks (magic, format version, checksum) the state file of `dir`.
pub fn read_state(dir: &Path) -> Result<FileState, SnapshotError> {
    format::read_state(&dir.join(STATE_FILE))
}

/// Guest memory of `size` bytes mapped copy-on-write from the memory file of `dir`
/// ([`crate::memory::guest_memory_from_file`]: nothing is read until the guest touches
/// it). The file must be exactly `size` bytes: a truncated (or grown) one is refused
/// before anything is mapped. Returns the memory and the file, whose size the caller
/// watches while the VM runs (see
/// [`MappedImages::watch_snapshot_memory`](crate::image_file::MappedImages::watch_snapshot_memory)).
pub fn map_memory(dir: &Path, size: u64) -> Result<(GuestMemory, std::fs::File), SnapshotError> {
    let (p, file, meta) = open_memory(dir, size)?;
    let watched = file.try_clone().map_err(io(&p))?;
    log::debug!(
        "snapshot memory {}: {} MiB, {} MiB of it on disk",
        p.display(),
        size >> 20,
        (meta.blocks() * 512) >> 20
    );
    let mem = crate::memory::guest_memory_from_file(file, size)?;
    Ok((mem, watched))
}

/// The memory file of `dir` (a regular file), refused unless it is exactly `size` bytes: its
/// path, the open file and its metadata.
fn open_memory(
    dir: &Path,
    size: u64,
) -> Result<(std::path::PathBuf, std::fs::File, std::fs::Metadata), SnapshotError> {
    let p = dir.join(MEMORY_FILE);
    let file = crate::user_file::open_regular(&p).map_err(io(&p))?;
    let meta = file.metadata().map_err(io(&p))?;
    if meta.len() != size {
        return Err(SnapshotError::MemorySize {
            path: p,
            found: meta.len(),
            expected: size,
        });
    }
    Ok((p, file, meta))
}

/// Guest memory of `size` bytes in a new shared memory file holding a copy of the memory file
/// of `dir` ([`crate::memory::shared_guest_memory_from_file`]): for a VM with virtio-fs
/// shares, whose daemon maps guest memory too. Costs a read of the file's data (not of its
/// holes) at restore, instead of the lazy private mapping of [`map_memory`].
pub fn copy_memory_shared(dir: &Path, size: u64) -> Result<GuestMemory, SnapshotError> {
    let (_, file, _) = open_memory(dir, size)?;
    Ok(crate::memory::shared_guest_memory_from_file(&file, size)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;
    use crate::snapshot::devices::{DeviceStates, I8042State, SerialState};
    use crate::snapshot::kvm_state::{KvmCaps, VcpuState, VmState};
    use crate::snapshot::SnapshotMeta;
    use crate::vm::open_kvm;
    use vm_memory::Bytes;

    #[test]
    fn state_file_round_trip() {
        let Ok(kvm) = open_kvm() else {
            eprintln!("SKIP state_file_round_trip: /dev/kvm is not usable here");
            return;
        };
        let caps = KvmCaps::probe(&kvm).unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rbx = 0xdead_beef;
        vcpu.set_regs(&regs).unwrap();
        let mut fpu = vcpu.get_fpu().unwrap();
        fpu.xmm[3][5] = 42;
        vcpu.set_fpu(&fpu).unwrap();
        let com1 = SerialState::from(vm_superio::serial::SerialState {
            interrupt_enable: 3,
            in_buffer: b"ab".to_vec(),
            ..Default::default()
        });
        let mut config = VmConfig::new("/boot/vmlinux");
        config.vcpus = 1;
        let saved = FileState {
            meta: SnapshotMeta::new(&config).unwrap(),
            devices: DeviceStates {
                com1,
                com2: None,
                i8042: I8042State {},
                acpi: None,
                virtio: Vec::new(),
            },
            vm: KvmState {
                vm: VmState::save(&vm).unwrap(),
                vcpus: vec![VcpuState::save(&vcpu, &caps).unwrap()],
            },
        };
        let dir = std::env::temp_dir().join(format!("ember-snapfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        mem.write_slice(b"guest", vm_memory::GuestAddress(0x1000))
            .unwrap();
        write(&dir, &saved, &mem).unwrap();
        let back = read_state(&dir).unwrap();
        assert_eq!(back.meta, saved.meta);
        assert_eq!(back.devices, saved.devices);
        let (v, w) = (&saved.vm.vcpus[0], &back.vm.vcpus[0]);
        assert_eq!(w.regs.rbx, 0xdead_beef);
        assert_eq!(w.fpu.xmm[3][5], 42);
        assert_eq!(w.fpu.mxcsr, v.fpu.mxcsr);
        assert_eq!(w.fpu.fcw, v.fpu.fcw);
        assert_eq!(w.msrs.len(), v.msrs.len());
        assert_eq!(w.cpuid.as_slice().len(), v.cpuid.as_slice().len());
        assert_eq!(w.lapic.regs[..], v.lapic.regs[..]);
        assert_eq!(back.vm.vm.clock.clock, saved.vm.vm.clock.clock);
        let again = format::encode_state(&back).unwrap();
        assert_eq!(again, format::encode_state(&saved).unwrap());
        let (mem2, _) = map_memory(&dir, 1 << 20).unwrap();
        let mut b = [0u8; 5];
        mem2.read_slice(&mut b, vm_memory::GuestAddress(0x1000))
            .unwrap();
        assert_eq!(&b, b"guest");

        // Damage is reported, not trusted: one byte of the state file flipped...
        let state = dir.join(STATE_FILE);
        let mut bytes = std::fs::read(&state).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&state, &bytes).unwrap();
        let e = read_state(&dir).unwrap_err();
        assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
        // ...and a memory file of another size.
        let e = map_memory(&dir, 1 << 19).unwrap_err();
        assert!(matches!(e, SnapshotError::MemorySize { .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ember-snapmem-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, vm_memory::GuestAddress(addr))
            .unwrap();
        b
    }

    #[test]
    fn mostly_zero_memory_is_written_sparse_and_mapped_back() {
        const SIZE: u64 = 16 << 20;
        let d = temp_dir("sparse");
        let mem = crate::memory::create_guest_memory(SIZE).unwrap();
        mem.write_slice(b"guest", vm_memory::GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(&[0xaa; 4096], vm_memory::GuestAddress(0x80_0000))
            .unwrap();
        mem.write_slice(&[0x55], vm_memory::GuestAddress(SIZE - 1))
            .unwrap();
        // Three pages hold data; nothing else is written.
        assert_eq!(write_memory_file(&d, &mem).unwrap(), 3 * 4096);
        assert!(
            std::fs::read_dir(&d).unwrap().count() == 1,
            "a temporary file was left"
        );
        let meta = std::fs::metadata(d.join(MEMORY_FILE)).unwrap();
        assert_eq!(meta.len(), SIZE);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated <= 256 << 10,
            "{allocated} bytes allocated for 12 KiB of data in a {SIZE}-byte file"
        );
        // Mapped back: the data where it was, zeros in the holes.
        let (back, _) = map_memory(&d, SIZE).unwrap();
        assert_eq!(read_guest(&back, 0x1000, 5), b"guest");
        assert_eq!(read_guest(&back, 0x80_0000, 4096), [0xaa; 4096]);
        assert_eq!(read_guest(&back, SIZE - 1, 1), [0x55]);
        assert!(read_guest(&back, 0x10_0000, 1 << 20)
            .iter()
            .all(|&b| b == 0));
        // Copy-on-write: the guest's writes stay in this mapping, the file is unchanged and
        // a second VM mapping it sees the snapshot.
        back.write_slice(b"after", vm_memory::GuestAddress(0x1000))
            .unwrap();
        back.write_slice(&[7; 16], vm_memory::GuestAddress(0x20_0000))
            .unwrap();
        let (other, _) = map_memory(&d, SIZE).unwrap();
        assert_eq!(read_guest(&other, 0x1000, 5), b"guest");
        assert_eq!(read_guest(&other, 0x20_0000, 16), [0; 16]);
        let file = std::fs::read(d.join(MEMORY_FILE)).unwrap();
        assert_eq!(&file[0x1000..0x1005], b"guest");
        assert!(file[0x20_0000..0x20_0010].iter().all(|&b| b == 0));
        // A snapshot written again into the directory of one that is mapped (all zeros
        // now): the mappings keep the file they were made from.
        write_memory_file(&d, &crate::memory::create_guest_memory(SIZE).unwrap()).unwrap();
        assert_eq!(read_guest(&other, 0x1000, 5), b"guest");
        assert_eq!(read_guest(&back, 0x80_0000, 4), [0xaa; 4]);
        assert_eq!(std::fs::metadata(d.join(MEMORY_FILE)).unwrap().blocks(), 0);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_truncated_memory_file_is_refused_and_mended_while_mapped() {
        const SIZE: u64 = 4 << 20;
        let d = temp_dir("truncated");
        let mem = crate::memory::create_guest_memory(SIZE).unwrap();
        mem.write_slice(&[0x11; 8192], vm_memory::GuestAddress(0x30_0000))
            .unwrap();
        write_memory_file(&d, &mem).unwrap();
        let path = d.join(MEMORY_FILE);
        // Cut before the restore: refused, with both sizes, before anything is mapped.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(SIZE / 2).unwrap();
        let e = map_memory(&d, SIZE).unwrap_err();
        assert!(matches!(e, SnapshotError::MemorySize { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("is {} bytes", SIZE / 2))
                && e.to_string().contains(&SIZE.to_string()),
            "{e}"
        );
        // Cut while a VM runs on it: ember's reads of the vanished pages give zeros (the
        // SIGBUS handler), not a crash, and the end-of-run report names the file.
        write_memory_file(&d, &mem).unwrap();
        let (back, file) = map_memory(&d, SIZE).unwrap();
        let mut watch = crate::image_file::MappedImages::new(&back);
        assert!(watch.covered());
        watch.watch_snapshot_memory(path.clone(), file, SIZE);
        assert_eq!(read_guest(&back, 0x30_0000, 8192), [0x11; 8192]);
        assert_eq!(watch.report(), None);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(SIZE / 2).unwrap();
        assert!(read_guest(&back, 0x30_0000, 8192).iter().all(|&b| b == 0));
        let report = watch.report().expect("no report");
        assert!(
            report.contains("snapshot memory file") && report.contains(&path.display().to_string()),
            "{report}"
        );
        assert!(report.contains("(2 page(s) read by ember"), "{report}");
        drop(watch);
        drop(back);
        std::fs::remove_dir_all(d).unwrap();
    }
}
