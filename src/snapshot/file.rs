// SPDX-License-Identifier: Apache-2.0
//! A snapshot on disk (experimental, issue 13): `ember run --snapshot-to DIR` writes it and a
//! second ember process starts the guest from it (`ember run --restore-from DIR`). The
//! directory is [`format`](mod@super::format)'s:
//!
//! - `state` ([`STATE_FILE`]): a [`FileState`] (the VM's configuration, the device states
//!   ember restores so far, the KVM state of the VM and of every vCPU) in the versioned,
//!   checksummed state file of [`write_state`](super::format::write_state);
//! - `memory` ([`MEMORY_FILE`]): guest RAM as raw bytes, region after region.
//!
//! virtio-rng, virtio-blk and virtio-vsock are carried over: each transport's registers and
//! queues with its device's state (see [`devices`](super::devices)); the restoring run builds
//! its devices from the configuration as usual (disks reopened by path, with the same locks;
//! the vsock Unix socket at this run's path) and restores each transport once guest memory
//! holds the snapshot's RAM. A vsock snapshot is refused while a vsock connection is open;
//! after a restore the guest gets a vsock TRANSPORT_RESET event (see
//! [`vsock::device`](crate::devices::virtio::vsock::device)). A VM with virtio-net is
//! refused ([`NO_NET`]): TAPs are not carried over yet. The restoring run must be given the
//! same VM flags (the vsock CID and socket path may differ);
//! [`SnapshotMeta::check`](super::SnapshotMeta::check) refuses another configuration (a
//! disk whose size changed included).

use std::io::{Read, Write};
use std::path::Path;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

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
                             (--snapshot-to/--restore-from carry virtio-rng, virtio-blk and \
                             virtio-vsock)";

/// Why a VM with virtio-net is refused by `--snapshot-to`/`--restore-from`.
pub const NO_NET: &str = "it has virtio-net devices, which snapshots do not carry yet \
                          (re-attaching a NIC to its TAP in the restoring run is not done): \
                          use no --net";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `state` ([`STATE_FILE`]) and guest memory ([`MEMORY_FILE`]) into `dir` (created if
/// needed).
pub fn write(dir: &Path, state: &FileState, mem: &GuestMemory) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    format::write_state(&dir.join(STATE_FILE), state)?;
    let p = dir.join(MEMORY_FILE);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&p).map_err(io(&p))?);
    super::write_memory(mem, &mut f, |e| io(&p)(e))?;
    f.flush().map_err(io(&p))
}

/// Reads and checks (magic, format version, checksum) the state file of `dir`.
pub fn read_state(dir: &Path) -> Result<FileState, SnapshotError> {
    format::read_state(&dir.join(STATE_FILE))
}

/// Fills `mem` from the memory file of `dir`, which must be exactly as large.
pub fn read_memory(dir: &Path, mem: &GuestMemory) -> Result<(), SnapshotError> {
    let p = dir.join(MEMORY_FILE);
    let file = std::fs::File::open(&p).map_err(io(&p))?;
    let found = file.metadata().map_err(io(&p))?.len();
    let expected: u64 = mem.iter().map(|r| r.len()).sum();
    if found != expected {
        return Err(SnapshotError::MemorySize {
            path: p,
            found,
            expected,
        });
    }
    let mut f = std::io::BufReader::new(file);
    let mut buf = vec![0u8; super::MEMORY_CHUNK];
    for (addr, n) in super::memory_chunks(mem) {
        f.read_exact(&mut buf[..n]).map_err(io(&p))?;
        mem.write_slice(&buf[..n], addr)
            .map_err(|_| SnapshotError::GuestMemory(addr.0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;
    use crate::snapshot::devices::{DeviceStates, I8042State, SerialState};
    use crate::snapshot::kvm_state::{KvmCaps, VcpuState, VmState};
    use crate::snapshot::SnapshotMeta;
    use crate::vm::open_kvm;

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
        let mem2 = crate::memory::create_guest_memory(1 << 20).unwrap();
        read_memory(&dir, &mem2).unwrap();
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
        let small = crate::memory::create_guest_memory(1 << 19).unwrap();
        let e = read_memory(&dir, &small).unwrap_err();
        assert!(matches!(e, SnapshotError::MemorySize { .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
