// SPDX-License-Identifier: Apache-2.0
//! The KVM VM: opening /dev/kvm, checking what ember needs, the in-kernel interrupt
//! controllers and PIT, and registering guest memory.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::timeline::{Phase, Timeline};

/// KVM TSS area (three pages inside the MMIO gap, never RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM identity-map page for real-mode emulation (just below the TSS).
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors while setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm does not exist.
    #[error(
        "/dev/kvm does not exist: this host has no KVM. Load the kvm module (modprobe kvm_intel \
         or kvm_amd), enable virtualization in the firmware, or run ember on a KVM-capable host"
    )]
    NoKvm,
    /// /dev/kvm is not accessible.
    #[error(
        "permission denied opening /dev/kvm: add your user to the 'kvm' group \
         (sudo usermod -aG kvm $USER, then log in again) or grant access with \
         sudo setfacl -m u:$USER:rw /dev/kvm"
    )]
    KvmPermission,
    /// Opening /dev/kvm failed otherwise.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0} (ember needs 12)")]
    ApiVersion(i32),
    /// A capability ember needs is missing.
    #[error("this host's KVM lacks a capability ember needs: {0:?}")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm (or the device named by `EMBER_KVM_DEVICE`, for tests), turning the usual
/// failures into advice.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = std::env::var_os("EMBER_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    let path =
        std::ffi::CString::new(path.as_encoded_bytes().to_vec()).map_err(|_| VmError::NoKvm)?;
    match Kvm::new_with_path(&path) {
        Ok(k) => Ok(k),
        Err(e) if e.errno() == libc::ENOENT => Err(VmError::NoKvm),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(VmError::KvmPermission)
        }
        Err(e) => Err(VmError::OpenKvm(e)),
    }
}

/// The capabilities ember cannot work without.
const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
];

/// A KVM VM with its interrupt controllers.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    max_vcpus: usize,
}

impl Vm {
    /// Creates the VM with its guest memory, TSS, in-kernel IOAPIC/PIC/LAPICs and PIT.
    ///
    /// The memory is registered before the interrupt controllers exist: with an in-kernel
    /// irqchip, KVM_SET_USER_MEMORY_REGION waits for an SRCU grace period (about 6-7 ms on
    /// this project's hosts, 0.1 ms without), which would be most of ember's set-up time.
    pub fn new(kvm: &Kvm, mem: &GuestMemory, timeline: &Timeline) -> Result<Self, VmError> {
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("VM creation"))?;
        timeline.mark(Phase::VmCreated);
        let vm = Self {
            fd,
            max_vcpus: kvm.get_max_vcpus(),
        };
        vm.register_memory(mem)?;
        timeline.mark(Phase::MemoryMapped);
        vm.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("TSS address set-up"))?;
        vm.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("identity map set-up"))?;
        vm.fd
            .create_irq_chip()
            .map_err(kvm_err("irqchip creation"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(kvm_err("PIT creation"))?;
        Ok(vm)
    }

    /// Registers every region of `mem` with KVM, one slot each.
    fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range [as_ptr, as_ptr + len) is a live mapping owned by `mem`,
            // and every caller keeps a clone of `mem` (and so the mapping) alive for as long as
            // the VM fd exists: the Vmm holds both and drops the VM first.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(kvm_err("memory registration"))?;
        }
        Ok(())
    }

    /// The VM fd (for vCPU creation, irqfd and ioeventfd registration).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Largest vCPU count this host's KVM allows.
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    /// Whether the guest left IOAPIC input `pin` masked (as it is at reset), i.e. no guest
    /// driver has set up that interrupt line. A pin the IOAPIC does not have reads as masked.
    pub fn ioapic_pin_masked(&self, pin: u32) -> Result<bool, VmError> {
        const REDIRECTION_MASKED: u64 = 1 << 16;
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("IOAPIC state read"))?;
        let index = usize::try_from(pin).unwrap_or(usize::MAX);
        // SAFETY: KVM_GET_IRQCHIP with chip_id KVM_IRQCHIP_IOAPIC fills the `ioapic` member of
        // the union, and every redirection entry is plain data readable as `bits`.
        let entry = unsafe { chip.chip.ioapic.redirtbl.get(index).map(|e| e.bits) };
        Ok(entry.is_none_or(|bits| bits & REDIRECTION_MASKED != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioapic_pins_start_masked() {
        let Ok(kvm) = open_kvm() else {
            eprintln!("SKIP ioapic_pins_start_masked: /dev/kvm is not usable here");
            return;
        };
        let mem = crate::memory::create_guest_memory(2 << 20).unwrap();
        let timeline = Timeline::new(std::time::Instant::now());
        let vm = Vm::new(&kvm, &mem, &timeline).unwrap();
        // Both phases were reached, in order.
        let t = |p| timeline.get(p).unwrap();
        assert!(t(Phase::VmCreated) <= t(Phase::MemoryMapped));
        for pin in [0, 4, 23, 24, u32::MAX] {
            assert!(vm.ioapic_pin_masked(pin).unwrap(), "pin {pin}");
        }
    }
}
