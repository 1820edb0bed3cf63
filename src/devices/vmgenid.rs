// SPDX-License-Identifier: Apache-2.0
//! The VM generation ID (Microsoft's "Virtual Machine Generation ID" ACPI device, which Linux
//! drives with `drivers/virt/vmgenid.c`, `CONFIG_VMGENID`): 16 random bytes in guest memory
//! that change whenever the VM is started again from a snapshot. A guest that sees them
//! change knows it may be one of several copies of the same VM and reseeds its RNG (Linux:
//! `add_vmfork_randomness`), so that two VMs restored from one snapshot never share keys or
//! random streams.
//!
//! ```text
//!   guest memory  VMGENID_START: 16 random bytes (the page is e820-reserved)
//!   DSDT          \_SB.VGEN  _HID "VMGENCTR", _CID/_DDN "VM_Gen_Counter",
//!                            ADDR = Package { low 32 bits, high 32 bits of VMGENID_START }
//!   change        new bytes written, then GED event bit GED_EVENT_VMGENID + GED_IRQ;
//!                 \_SB.GED._EVT does Notify (\_SB.VGEN, 0x80)
//! ```
//!
//! Linux reads the ID when its driver binds (and mixes it into the RNG), maps the 16 bytes,
//! and on notification 0x80 compares them with the copy it holds: when they differ it
//! reseeds. The ID is written at build time ([`VmGenId::new`]; a VM restored from a snapshot
//! takes the ID its memory holds with [`VmGenId::restored`]); [`VmGenId::regenerate`] is for
//! a restore.
//!
//! **Restore:** a snapshot holds guest RAM, and so the old ID. Call [`VmGenId::regenerate`]
//! (through [`Vmm::new_vm_generation`](crate::vmm::Vmm::new_vm_generation)) after guest
//! RAM, the irqchip and the ACPI platform's registers are all restored, and before any vCPU
//! runs: restoring RAM afterwards would bring the old ID back, and restoring the irqchip or
//! the ACPI registers afterwards would drop the event. Without ACPI (`--no-acpi`) there is
//! no such device.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::VMGENID_START;
use crate::devices::acpi::{GedEvents, GED_EVENT_VMGENID};
use crate::memory::GuestMemory;

/// Length of the generation ID (a 128-bit value).
pub const VMGENID_LEN: usize = 16;

/// A generation ID.
pub type GenerationId = [u8; VMGENID_LEN];

/// Errors of the VM generation ID.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    /// The host's `getrandom(2)` failed.
    #[error("cannot get random bytes for the VM generation ID")]
    Random(#[source] std::io::Error),
    /// The ID could not be read from guest memory.
    #[error("cannot read the VM generation ID from guest memory at {VMGENID_START:#x}")]
    Read,
    /// The ID could not be written to guest memory.
    #[error("cannot write the VM generation ID to guest memory at {VMGENID_START:#x}")]
    Write,
    /// The GED interrupt could not be raised.
    #[error("cannot notify the guest of a new VM generation ID")]
    Notify(#[source] std::io::Error),
}

/// The VM generation ID device: the ID in guest memory at [`VMGENID_START`] and the GED
/// event that tells the guest it changed.
#[derive(Debug)]
pub struct VmGenId {
    id: GenerationId,
    ged: GedEvents,
}

impl VmGenId {
    /// A fresh random ID, written to guest memory at [`VMGENID_START`]. No event is raised:
    /// the guest reads the ID when its driver binds.
    pub fn new(mem: &GuestMemory, ged: GedEvents) -> Result<Self, VmGenIdError> {
        let id = fresh_id(None)?;
        write_id(mem, &id)?;
        Ok(Self { id, ged })
    }

    /// The ID guest memory holds already (a snapshot's memory: the ID of the VM the snapshot
    /// was taken from), taken as the current one. Nothing is written and no event is raised:
    /// [`regenerate`](Self::regenerate) does both, once the rest of the snapshot is
    /// restored.
    pub fn restored(mem: &GuestMemory, ged: GedEvents) -> Result<Self, VmGenIdError> {
        let mut id = [0u8; VMGENID_LEN];
        mem.read_slice(&mut id, GuestAddress(VMGENID_START))
            .map_err(|_| VmGenIdError::Read)?;
        Ok(Self { id, ged })
    }

    /// The guest-physical address of the ID (what `\_SB.VGEN.ADDR` says).
    pub fn addr(&self) -> u64 {
        VMGENID_START
    }

    /// The current ID.
    pub fn id(&self) -> GenerationId {
        self.id
    }

    /// Gives the VM a new generation: writes a fresh random ID (never equal to the current
    /// one) to guest memory, then raises [`GED_EVENT_VMGENID`] so that the guest's
    /// `\_SB.GED._EVT` notifies `\_SB.VGEN` (0x80). Call it after a restore, before the vCPUs
    /// run (see the module documentation). Returns the new ID.
    pub fn regenerate(&mut self, mem: &GuestMemory) -> Result<GenerationId, VmGenIdError> {
        let id = fresh_id(Some(&self.id))?;
        // The bytes first: the guest reads them when it handles the event.
        write_id(mem, &id)?;
        self.id = id;
        self.ged
            .raise(GED_EVENT_VMGENID)
            .map_err(VmGenIdError::Notify)?;
        log::debug!("VM generation ID changed; the guest was notified");
        Ok(id)
    }
}

/// Random bytes, never all zero (a guest could take zero for "no ID") nor equal to `old`.
fn fresh_id(old: Option<&GenerationId>) -> Result<GenerationId, VmGenIdError> {
    loop {
        let mut id = [0u8; VMGENID_LEN];
        crate::devices::virtio::rng::fill_random(&mut id).map_err(VmGenIdError::Random)?;
        if id != [0; VMGENID_LEN] && Some(&id) != old {
            return Ok(id);
        }
    }
}

fn write_id(mem: &GuestMemory, id: &GenerationId) -> Result<(), VmGenIdError> {
    mem.write_slice(id, GuestAddress(VMGENID_START))
        .map_err(|_| VmGenIdError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::acpi::AcpiPlatform;
    use crate::devices::bus::BusDevice;
    use crate::exit::VmExit;
    use crate::memory::create_guest_memory;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn read_id(mem: &GuestMemory) -> GenerationId {
        let mut id = [0u8; VMGENID_LEN];
        mem.read_slice(&mut id, GuestAddress(VMGENID_START))
            .unwrap();
        id
    }

    /// The GED event register, as the guest's `_EVT` reads it (a 4-byte read clears it).
    fn read_ged_events(p: &mut AcpiPlatform) -> u32 {
        let mut b = [0u8; 4];
        let offset = crate::arch::x86_64::layout::ACPI_GED_EVENT
            - crate::arch::x86_64::layout::ACPI_MMIO_START;
        p.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn new_writes_a_random_id_and_raises_nothing() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let exit = Arc::new(VmExit::new().unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = irq.try_clone().unwrap();
        let (mut platform, _) = AcpiPlatform::new(exit, irq);
        let g = VmGenId::new(&mem, platform.ged_events()).unwrap();
        assert_eq!(g.addr(), VMGENID_START);
        assert_eq!(read_id(&mem), g.id());
        assert_ne!(g.id(), [0; VMGENID_LEN]);
        assert_eq!(read_ged_events(&mut platform), 0);
        assert!(probe.read().is_err(), "no interrupt at build time");
        // Two VMs get different IDs.
        let other = create_guest_memory(16 << 20).unwrap();
        let g2 = VmGenId::new(&other, platform.ged_events()).unwrap();
        assert_ne!(g.id(), g2.id());
    }

    #[test]
    fn regenerate_writes_a_new_id_then_raises_the_ged_event_and_interrupt() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let exit = Arc::new(VmExit::new().unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = irq.try_clone().unwrap();
        let (mut platform, button) = AcpiPlatform::new(exit.clone(), irq);
        let mut g = VmGenId::new(&mem, platform.ged_events()).unwrap();
        let first = g.id();
        let mut seen = vec![first];
        for _ in 0..3 {
            let new = g.regenerate(&mem).unwrap();
            assert_eq!(new, g.id());
            assert_eq!(read_id(&mem), new, "the new ID is in guest memory");
            assert!(!seen.contains(&new), "a regenerated ID differs");
            seen.push(new);
            assert_eq!(probe.read().unwrap(), 1, "the GED interrupt fired once");
            assert_eq!(read_ged_events(&mut platform), GED_EVENT_VMGENID);
            assert_eq!(read_ged_events(&mut platform), 0, "reading clears it");
        }
        // The power button and the generation ID share the register, one bit each.
        button.press().unwrap();
        g.regenerate(&mem).unwrap();
        assert_eq!(
            read_ged_events(&mut platform),
            crate::devices::acpi::GED_EVENT_POWER_BUTTON | GED_EVENT_VMGENID
        );
        assert_eq!(probe.read().unwrap(), 2);
        assert!(!exit.is_set());
    }

    #[test]
    fn regenerate_must_come_after_the_acpi_registers_are_restored() {
        // The order a restore must follow: restore_state overwrites pending events.
        let mem = create_guest_memory(16 << 20).unwrap();
        let exit = Arc::new(VmExit::new().unwrap());
        let (mut platform, _) = AcpiPlatform::new(exit, EventFd::new(EFD_NONBLOCK).unwrap());
        let mut g = VmGenId::new(&mem, platform.ged_events()).unwrap();
        let saved = platform.save_state();
        g.regenerate(&mem).unwrap();
        platform.restore_state(&saved);
        assert_eq!(read_ged_events(&mut platform), 0, "the event was lost");
        platform.restore_state(&saved);
        g.regenerate(&mem).unwrap();
        assert_eq!(read_ged_events(&mut platform), GED_EVENT_VMGENID);
    }

    #[test]
    fn fresh_ids_are_never_zero_or_the_old_one() {
        let old = fresh_id(None).unwrap();
        for _ in 0..100 {
            let id = fresh_id(Some(&old)).unwrap();
            assert_ne!(id, old);
            assert_ne!(id, [0; VMGENID_LEN]);
        }
    }
}
