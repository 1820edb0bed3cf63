// SPDX-License-Identifier: Apache-2.0
//! The exit device: a 32-bit register at
//! [`EXIT_DEVICE_START`](crate::arch::x86_64::layout::EXIT_DEVICE_START) that the guest
//! writes its command's exit status to (`devmem 0xc0001000 32 $status`), in the spirit of
//! QEMU's isa-debug-exit. A write of exactly four bytes at offset 0 records the status and
//! ends the VM when the VM was started to run one command (`ember exec`); otherwise the
//! status is only remembered and logged.

use std::sync::{Arc, Mutex};

use crate::devices::bus::{lock, BusDevice};
use crate::exit::{ExitReason, VmExit};

/// The exit device.
#[derive(Debug)]
pub struct ExitDevice {
    exit: Arc<VmExit>,
    ends_vm: bool,
    status: Arc<Mutex<Option<u32>>>,
}

impl ExitDevice {
    /// `ends_vm`: a status write ends the VM (exec mode).
    pub fn new(exit: Arc<VmExit>, ends_vm: bool) -> Self {
        Self {
            exit,
            ends_vm,
            status: Arc::new(Mutex::new(None)),
        }
    }

    /// The status slot, shared with whoever reports it.
    pub fn status(&self) -> Arc<Mutex<Option<u32>>> {
        self.status.clone()
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_log!(
                log::Level::Debug,
                "exit device: ignoring {}-byte write",
                data.len()
            );
            return;
        };
        if offset != 0 {
            return;
        }
        let status = u32::from_le_bytes(bytes);
        crate::guest_log!(
            log::Level::Debug,
            "exit device: guest reported status {status}"
        );
        *lock(&self.status) = Some(status);
        if self.ends_vm {
            self.exit.request(ExitReason::GuestStatus(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_write_ends_vm_in_exec_mode() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut d = ExitDevice::new(exit.clone(), true);
        d.write(0, &[42]);
        assert!(!exit.is_set());
        d.write(0, &42u32.to_le_bytes());
        assert_eq!(exit.reason(), Some(ExitReason::GuestStatus(42)));
        assert_eq!(*d.status().lock().unwrap(), Some(42));
    }

    #[test]
    fn status_is_only_recorded_otherwise() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut d = ExitDevice::new(exit.clone(), false);
        d.write(0, &7u32.to_le_bytes());
        assert!(!exit.is_set());
        assert_eq!(*d.status().lock().unwrap(), Some(7));
    }
}
