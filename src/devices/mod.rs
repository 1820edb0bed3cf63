// SPDX-License-Identifier: Apache-2.0
//! Emulated devices and the [`DeviceManager`] that places them: it hands out bus ranges,
//! MMIO windows and interrupt lines, wires interrupts to KVM irqfds, and collects the
//! command-line entries that tell the guest about devices it cannot discover.

pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod virtio;
pub mod vmgenid;

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{
    DEVICE_IRQ_LAST, VIRTIO_IRQ_FIRST, VIRTIO_MMIO_END, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use bus::{BusDevice, BusError};

/// Errors while attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A bus registration failed.
    #[error("cannot register a device on the bus")]
    Bus(#[from] BusError),
    /// No interrupt line left.
    #[error("out of interrupt lines: at most {0} devices with interrupts fit")]
    OutOfIrqs(u32),
    /// No MMIO window left.
    #[error("out of MMIO space for devices")]
    OutOfMmio,
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused the irqfd.
    #[error("cannot register irqfd for IRQ {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// KVM refused an ioeventfd (virtio queue notification).
    #[error("cannot register an ioeventfd at {0:#x}")]
    Ioeventfd(u64, #[source] kvm_ioctls::Error),
    /// A virtio-mmio transport could not be created.
    #[error("cannot create a virtio-mmio transport")]
    VirtioTransport(#[from] virtio::mmio::MmioError),
}

/// An MMIO device window the guest is told about (virtio-mmio devices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base.
    pub addr: u64,
    /// Window size.
    pub size: u64,
    /// Interrupt line.
    pub irq: u32,
}

/// Places devices: buses, MMIO windows, interrupt lines, irqfds and command-line entries.
#[derive(Debug)]
pub struct DeviceManager {
    /// The port-I/O and MMIO buses the vCPUs will use.
    pub buses: crate::vcpu::IoBuses,
    next_mmio: u64,
    next_irq: u32,
    cmdline: Vec<String>,
    mmio_slots: Vec<MmioSlot>,
    /// Every irqfd handed out, with its line (a restore registers them with a new VM).
    irqfds: Vec<(EventFd, u32)>,
    /// Every virtio-mmio transport, in the order of its MMIO slot (a snapshot saves them).
    virtio: Vec<Arc<Mutex<virtio::mmio::MmioTransport>>>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self {
            buses: crate::vcpu::IoBuses::default(),
            next_mmio: VIRTIO_MMIO_START,
            next_irq: VIRTIO_IRQ_FIRST,
            cmdline: Vec::new(),
            mmio_slots: Vec::new(),
            irqfds: Vec::new(),
            virtio: Vec::new(),
        }
    }

    /// Registers `dev` on the port-I/O bus.
    pub fn add_pio(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u16,
        len: u16,
    ) -> Result<(), DeviceError> {
        Ok(self
            .buses
            .pio
            .insert(dev, u64::from(base), u64::from(len))?)
    }

    /// Registers `dev` on the MMIO bus.
    pub fn add_mmio(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceError> {
        Ok(self.buses.mmio.insert(dev, base, len)?)
    }

    /// The next free interrupt line for a device.
    pub fn allocate_irq(&mut self) -> Result<u32, DeviceError> {
        if self.next_irq > DEVICE_IRQ_LAST {
            return Err(DeviceError::OutOfIrqs(
                DEVICE_IRQ_LAST - VIRTIO_IRQ_FIRST + 1,
            ));
        }
        let irq = self.next_irq;
        self.next_irq += 1;
        Ok(irq)
    }

    /// The next free virtio-mmio window, with an interrupt line.
    pub fn allocate_mmio_slot(&mut self) -> Result<MmioSlot, DeviceError> {
        if self.next_mmio + VIRTIO_MMIO_SIZE > VIRTIO_MMIO_END {
            return Err(DeviceError::OutOfMmio);
        }
        let irq = self.allocate_irq()?;
        let slot = MmioSlot {
            addr: self.next_mmio,
            size: VIRTIO_MMIO_SIZE,
            irq,
        };
        self.next_mmio += VIRTIO_MMIO_SIZE;
        self.mmio_slots.push(slot.clone());
        Ok(slot)
    }

    /// An eventfd registered as the irqfd of `irq`: writing it raises the line.
    pub fn irqfd(&mut self, vm: &VmFd, irq: u32) -> Result<EventFd, DeviceError> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&fd, irq)
            .map_err(|e| DeviceError::Irqfd(irq, e))?;
        self.irqfds
            .push((fd.try_clone().map_err(DeviceError::EventFd)?, irq));
        Ok(fd)
    }

    /// Every irqfd handed out so far, with its interrupt line.
    pub fn take_irqfds(&mut self) -> Vec<(EventFd, u32)> {
        std::mem::take(&mut self.irqfds)
    }

    /// Adds a guest command-line entry (e.g. `virtio_mmio.device=...`).
    pub fn push_cmdline(&mut self, entry: impl Into<String>) {
        self.cmdline.push(entry.into());
    }

    /// The command-line entries devices asked for.
    pub fn cmdline_entries(&self) -> &[String] {
        &self.cmdline
    }

    /// The virtio-mmio windows handed out so far.
    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.mmio_slots
    }

    /// Keeps a virtio-mmio transport for snapshots (see [`Self::virtio_transports`]).
    pub fn push_virtio_transport(&mut self, t: Arc<Mutex<virtio::mmio::MmioTransport>>) {
        self.virtio.push(t);
    }

    /// Every virtio-mmio transport, in the order of its MMIO slot.
    pub fn virtio_transports(&self) -> &[Arc<Mutex<virtio::mmio::MmioTransport>>] {
        &self.virtio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_do_not_overlap_and_irqs_run_out() {
        let mut dm = DeviceManager::new();
        let a = dm.allocate_mmio_slot().unwrap();
        let b = dm.allocate_mmio_slot().unwrap();
        assert_eq!(a.addr + a.size, b.addr);
        assert_ne!(a.irq, b.irq);
        assert_eq!(dm.mmio_slots().len(), 2);
        let mut n = 2;
        while dm.allocate_mmio_slot().is_ok() {
            n += 1;
        }
        assert_eq!(n, DEVICE_IRQ_LAST - VIRTIO_IRQ_FIRST + 1);
        assert!(matches!(dm.allocate_irq(), Err(DeviceError::OutOfIrqs(_))));
    }
}
