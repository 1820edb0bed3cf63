// SPDX-License-Identifier: Apache-2.0
//! A virtio device's interrupt line and the state the driver reads with it: the
//! InterruptStatus bits (used buffer / configuration change), the ConfigGeneration counter and
//! the NEEDS_RESET flag. Shared (`Arc`) by the transport, which serves the registers, and the
//! device, which raises the interrupts from the event loop.
//!
//! The line is a KVM irqfd: writing the eventfd pulses the IOAPIC pin (edge-triggered), so no
//! VM exit or vCPU thread is involved.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

use crate::snapshot::devices::InterruptState;

/// A virtio device's interrupt state.
#[derive(Debug)]
pub struct Interrupt {
    irq_evt: EventFd,
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// An interrupt raised by writing `irq_evt` (a registered KVM irqfd, or any eventfd in
    /// tests).
    pub fn new(irq_evt: EventFd) -> Self {
        Self {
            irq_evt,
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Tells the driver that buffers were added to a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver that the configuration space changed (bumps the generation first, so
    /// the driver sees the new generation when it handles the interrupt).
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The device hit an error it cannot recover from: the status register shows
    /// DEVICE_NEEDS_RESET from now until the driver resets the device, and the driver gets a
    /// configuration-change interrupt (virtio 1.2, 2.1.2).
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            crate::guest_warn!("virtio device needs a reset (the guest driver is told so)");
            self.raise(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// Whether [`Interrupt::set_needs_reset`] was called since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged the bits in `bits` (InterruptACK register).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Back to the state after creation (device reset); the generation keeps counting.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The eventfd that raises the line (tests read it to see interrupts).
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// The status bits, configuration generation and NEEDS_RESET flag, for a snapshot.
    pub fn save_state(&self) -> InterruptState {
        InterruptState {
            status: self.status(),
            config_generation: self.config_generation(),
            needs_reset: self.needs_reset(),
        }
    }

    /// Restores saved state. When status bits are pending, the line is pulsed again: a
    /// spurious virtio interrupt is harmless (the driver reads the status), a lost one is not.
    pub fn restore_state(&self, state: &InterruptState) {
        let bits = state.status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        self.config_generation
            .store(state.config_generation, Ordering::SeqCst);
        self.needs_reset.store(state.needs_reset, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
        if bits != 0 {
            self.raise(bits);
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq_evt.write(1) {
            crate::guest_error!("cannot raise a virtio interrupt: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn interrupt() -> Interrupt {
        Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn status_bits_set_and_acked() {
        let i = interrupt();
        assert_eq!(i.status(), 0);
        i.signal_used_queue();
        assert_eq!(i.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(i.irq_evt().read().unwrap(), 1);
        i.signal_config_change();
        assert_eq!(i.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(i.config_generation(), 1);
        i.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(i.status(), VIRTIO_MMIO_INT_CONFIG);
        i.ack(VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(i.status(), 0);
    }

    #[test]
    fn needs_reset_latches_until_reset() {
        let i = interrupt();
        i.set_needs_reset();
        i.set_needs_reset();
        assert!(i.needs_reset());
        // One interrupt for the first report only.
        assert_eq!(i.irq_evt().read().unwrap(), 1);
        assert_eq!(i.status(), VIRTIO_MMIO_INT_CONFIG);
        i.reset();
        assert!(!i.needs_reset());
        assert_eq!(i.status(), 0);
        assert!(
            i.irq_evt().read().is_err(),
            "no interrupt pending after reset"
        );
    }
}
