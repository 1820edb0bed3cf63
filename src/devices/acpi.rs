// SPDX-License-Identifier: Apache-2.0
//! ember's ACPI platform registers (hardware-reduced ACPI, one MMIO window at
//! [`ACPI_MMIO_START`]): the sleep control and status registers (S5 = power off), the reset
//! register, and the event register of the generic event device (GED) that carries the
//! power button. The tables that point the guest here are built in
//! [`arch::x86_64::acpi`](crate::arch::x86_64::acpi).
//!
//! Sleep registers (ACPI 6.5 §4.8.3.7), as this device implements them:
//!
//! ```text
//!   sleep control (8 bits, write):  SLP_EN (bit 5) | SLP_TYP (bits 2..4)
//!       SLP_EN with SLP_TYP = S5  -> the VM ends: ExitReason::PowerOff
//!       SLP_EN with another type  -> not supported: logged, and the guest "wakes" at once
//!                                    (WAK_STS set), so it never waits for a wake-up
//!   sleep status (8 bits):          WAK_STS (bit 7), write 1 to clear
//! ```
//!
//! Power button: [`PowerButton::press`] sets bit 0 of the GED event register and raises
//! [`GED_IRQ`]; the guest's GED driver runs `\_SB.GED._EVT`, which reads (and so clears) the
//! event register and notifies `\_SB.PWRB` (PNP0C0C) with 0x80. The VM generation ID
//! ([`crate::devices::vmgenid`]) uses bit 1 ([`GED_EVENT_VMGENID`]) the same way, notifying
//! `\_SB.VGEN`. Each user raises its bit through a [`GedEvents`] handle.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

#[cfg(doc)]
use crate::arch::x86_64::layout::GED_IRQ;
use crate::arch::x86_64::layout::{
    ACPI_GED_EVENT, ACPI_MMIO_START, ACPI_RESET_REGISTER, ACPI_SLEEP_CONTROL, ACPI_SLEEP_STATUS,
};
use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, VmExit};
use crate::snapshot::devices::AcpiState;

/// `SLP_TYP` value of S5 (soft off), the one sleep state ember offers (`\_S5_` in the DSDT).
pub const S5_SLEEP_TYPE: u8 = 5;
/// Value the guest writes to the reset register to reset (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 1;
/// GED event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u32 = 1;
/// GED event bit: the VM generation ID changed (after a snapshot restore).
pub const GED_EVENT_VMGENID: u32 = 1 << 1;

/// Sleep control: sleep enable.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control: position of the sleep type field.
pub const SLP_TYP_SHIFT: u8 = 2;
/// Sleep control: mask of the sleep type field (after shifting).
pub const SLP_TYP_MASK: u8 = 0x7;
/// Sleep status: the platform woke up.
pub const WAK_STS: u8 = 1 << 7;

const SLEEP_CONTROL: u64 = ACPI_SLEEP_CONTROL - ACPI_MMIO_START;
const SLEEP_STATUS: u64 = ACPI_SLEEP_STATUS - ACPI_MMIO_START;
const RESET: u64 = ACPI_RESET_REGISTER - ACPI_MMIO_START;
const GED_EVENT: u64 = ACPI_GED_EVENT - ACPI_MMIO_START;

/// The ACPI register window.
#[derive(Debug)]
pub struct AcpiPlatform {
    exit: Arc<VmExit>,
    sleep_status: u8,
    ged: GedEvents,
}

impl AcpiPlatform {
    /// A platform whose power-off and reset requests go to `exit`, and whose power button
    /// raises the GED interrupt through `ged_irq` (an irqfd).
    pub fn new(exit: Arc<VmExit>, ged_irq: EventFd) -> (Self, PowerButton) {
        let ged = GedEvents {
            events: Arc::new(AtomicU32::new(0)),
            irq: Arc::new(ged_irq),
        };
        let button = PowerButton { ged: ged.clone() };
        let dev = Self {
            exit,
            sleep_status: 0,
            ged,
        };
        (dev, button)
    }

    /// A handle that raises events of this platform's GED (for devices other than the
    /// power button: the VM generation ID).
    pub fn ged_events(&self) -> GedEvents {
        self.ged.clone()
    }

    /// The registers, for a snapshot.
    pub fn save_state(&self) -> AcpiState {
        AcpiState {
            sleep_status: self.sleep_status,
            ged_events: self.ged.events.load(Ordering::Acquire),
        }
    }

    /// Restores saved registers into a freshly built platform. Pending GED events stay
    /// pending: the guest reads them when its GED interrupt (restored with the irqchip) runs.
    pub fn restore_state(&mut self, state: &AcpiState) {
        self.sleep_status = state.sleep_status & WAK_STS;
        self.ged.events.store(state.ged_events, Ordering::Release);
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == S5_SLEEP_TYPE {
            log::debug!("ACPI: guest entered S5 (soft off)");
            self.exit.request(ExitReason::PowerOff);
        } else {
            crate::guest_warn!(
                "ACPI: guest asked for sleep type {sleep_type}, which ember does not offer \
                 (only S5, power off); it stays running"
            );
            self.sleep_status |= WAK_STS;
        }
    }
}

impl BusDevice for AcpiPlatform {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (offset, data.len()) {
            (SLEEP_STATUS, 1) => data[0] = self.sleep_status,
            (GED_EVENT, 4) => {
                let pending = self.ged.events.swap(0, Ordering::AcqRel);
                data.copy_from_slice(&pending.to_le_bytes());
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            log::debug!(
                "ACPI: ignoring {}-byte write at register offset {offset:#x}",
                data.len()
            );
            return;
        };
        match offset {
            SLEEP_CONTROL => self.write_sleep_control(*value),
            SLEEP_STATUS => self.sleep_status &= !(value & WAK_STS),
            RESET if *value == RESET_VALUE => {
                log::debug!("ACPI: guest wrote the reset register");
                self.exit.request(ExitReason::Reset);
            }
            _ => log::debug!("ACPI: ignoring write {value:#x} at register offset {offset:#x}"),
        }
    }
}

/// Raises events of the generic event device: sets bits of the GED event register and
/// raises [`GED_IRQ`]; the guest's `\_SB.GED._EVT` reads (and clears) the register and
/// notifies the device of each bit. Cheap to clone; used from any thread.
#[derive(Debug, Clone)]
pub struct GedEvents {
    events: Arc<AtomicU32>,
    irq: Arc<EventFd>,
}

impl GedEvents {
    /// Records `bits` in the event register, then raises the GED interrupt.
    pub fn raise(&self, bits: u32) -> std::io::Result<()> {
        self.events.fetch_or(bits, Ordering::AcqRel);
        self.irq.write(1)
    }

    /// The events raised and not yet read by the guest (tests, diagnostics).
    pub fn pending(&self) -> u32 {
        self.events.load(Ordering::Acquire)
    }
}

/// The power button of the VM: asks the guest to shut down. Cheap to clone; used from the
/// main thread while the vCPUs run.
#[derive(Debug, Clone)]
pub struct PowerButton {
    ged: GedEvents,
}

impl PowerButton {
    /// Presses the button: records the GED event and raises the GED interrupt.
    pub fn press(&self) -> std::io::Result<()> {
        self.ged.raise(GED_EVENT_POWER_BUTTON)
    }

    /// The button as a [`ShutdownRequester`](crate::vmm::ShutdownRequester) for the run loop.
    pub fn requester(self) -> crate::vmm::ShutdownRequester {
        Box::new(move || match self.press() {
            Ok(()) => true,
            Err(e) => {
                log::warn!("cannot press the ACPI power button: {e}");
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn platform() -> (AcpiPlatform, PowerButton, Arc<VmExit>) {
        let exit = Arc::new(VmExit::new().unwrap());
        let (dev, button) = AcpiPlatform::new(exit.clone(), EventFd::new(EFD_NONBLOCK).unwrap());
        (dev, button, exit)
    }

    fn read8(d: &mut AcpiPlatform, offset: u64) -> u8 {
        let mut b = [0xaa];
        d.read(offset, &mut b);
        b[0]
    }

    fn sleep_value(sleep_type: u8) -> u8 {
        (sleep_type << SLP_TYP_SHIFT) | SLP_EN
    }

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let (mut d, _, exit) = platform();
        // Linux's acpi_hw_extended_sleep(): clear WAK_STS, then write the sleep type.
        d.write(SLEEP_STATUS, &[WAK_STS]);
        d.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        assert!(!exit.is_set(), "no SLP_EN: no transition");
        d.write(SLEEP_CONTROL, &[sleep_value(S5_SLEEP_TYPE)]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(sleep_value(S5_SLEEP_TYPE), 0x34);
    }

    #[test]
    fn other_sleep_states_wake_at_once_and_wak_sts_clears() {
        let (mut d, _, exit) = platform();
        assert_eq!(read8(&mut d, SLEEP_STATUS), 0);
        for s in [0, 1, 3, 4, 6, 7] {
            d.write(SLEEP_CONTROL, &[sleep_value(s)]);
            assert_eq!(read8(&mut d, SLEEP_STATUS), WAK_STS, "sleep type {s}");
            d.write(SLEEP_STATUS, &[0x01]);
            assert_eq!(
                read8(&mut d, SLEEP_STATUS),
                WAK_STS,
                "only WAK_STS clears it"
            );
            d.write(SLEEP_STATUS, &[WAK_STS]);
            assert_eq!(read8(&mut d, SLEEP_STATUS), 0);
        }
        assert!(!exit.is_set());
        // Wider accesses are not the register's width: ignored.
        d.write(
            SLEEP_CONTROL,
            &u32::from(sleep_value(S5_SLEEP_TYPE)).to_le_bytes(),
        );
        assert!(!exit.is_set());
    }

    #[test]
    fn reset_register_needs_the_reset_value() {
        let (mut d, _, exit) = platform();
        d.write(RESET, &[RESET_VALUE.wrapping_add(1)]);
        assert!(!exit.is_set());
        d.write(RESET, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn power_button_sets_the_event_and_raises_the_line_once() {
        let (mut d, button, exit) = platform();
        let mut ev = [0xffu8; 4];
        d.read(GED_EVENT, &mut ev);
        assert_eq!(u32::from_le_bytes(ev), 0);
        let mut ask = button.clone().requester();
        assert!(ask());
        assert_eq!(
            button.ged.irq.read().unwrap(),
            1,
            "the irqfd was written once"
        );
        // A 1-byte read is not the register's width: it neither reports nor clears.
        assert_eq!(read8(&mut d, GED_EVENT), 0);
        d.read(GED_EVENT, &mut ev);
        assert_eq!(u32::from_le_bytes(ev), GED_EVENT_POWER_BUTTON);
        d.read(GED_EVENT, &mut ev);
        assert_eq!(u32::from_le_bytes(ev), 0, "reading clears the events");
        assert!(!exit.is_set());
    }
}
