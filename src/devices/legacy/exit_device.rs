// SPDX-License-Identifier: Apache-2.0
//! The exit device: a 32-bit register at
//! [`EXIT_DEVICE_START`](crate::arch::x86_64::layout::EXIT_DEVICE_START) that the guest
//! writes its command's exit status to (`devmem 0xc0001000 32 $status`), in the spirit of
//! QEMU's isa-debug-exit. A write of exactly four bytes at offset 0 records the status and
//! ends the VM when the VM was started to run one command (`ember exec`); otherwise the
//! status is only remembered and logged.
//!
//! A 4-byte write at offset 4 ([`READY_OFFSET`], guest-physical `0xC000_1004`) is the
//! guest's "ready to take a command" signal of warm `ember exec` (docs/exec.md): the guest's
//! agent writes the vsock port it listens on, and the run loop (which learns of it through
//! [`ReadySignal`]) may snapshot the VM at that point and then hands it the command. Only the
//! first value is kept until the run loop takes it; the guest cannot make it do more than
//! that.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::{lock, BusDevice};
use crate::exit::{ExitReason, VmExit};

/// The offset of the "ready" register.
pub const READY_OFFSET: u64 = 4;

/// The guest's "ready to take a command" signal, from the vCPU that wrote it to the run loop.
#[derive(Debug)]
pub struct ReadySignal {
    value: Mutex<Option<u32>>,
    wake: EventFd,
}

impl ReadySignal {
    /// A signal not raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            value: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// An eventfd that becomes readable when the guest signals (for the event loop).
    pub fn wake_fd(&self) -> std::io::Result<EventFd> {
        self.wake.try_clone()
    }

    /// The value the guest wrote, once (later calls return `None` until it writes again).
    pub fn take(&self) -> Option<u32> {
        lock(&self.value).take()
    }

    /// Records `value` (the first one wins until it is taken) and wakes the event loop.
    pub fn raise(&self, value: u32) {
        let mut v = lock(&self.value);
        if v.is_none() {
            *v = Some(value);
            let _ = self.wake.write(1);
        }
    }
}

/// The exit device.
#[derive(Debug)]
pub struct ExitDevice {
    exit: Arc<VmExit>,
    ends_vm: bool,
    status: Arc<Mutex<Option<u32>>>,
    ready: Option<Arc<ReadySignal>>,
}

impl ExitDevice {
    /// `ends_vm`: a status write ends the VM (exec mode).
    pub fn new(exit: Arc<VmExit>, ends_vm: bool) -> Self {
        Self {
            exit,
            ends_vm,
            status: Arc::new(Mutex::new(None)),
            ready: None,
        }
    }

    /// Raises `ready` when the guest writes the ready register.
    pub fn with_ready(mut self, ready: Arc<ReadySignal>) -> Self {
        self.ready = Some(ready);
        self
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
        if offset == READY_OFFSET {
            let value = u32::from_le_bytes(bytes);
            crate::guest_log!(
                log::Level::Debug,
                "exit device: the guest is ready to take a command (value {value})"
            );
            if let Some(r) = &self.ready {
                r.raise(value);
            }
            return;
        }
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
    fn ready_register_raises_the_signal_once_until_taken() {
        let exit = Arc::new(VmExit::new().unwrap());
        let ready = Arc::new(ReadySignal::new().unwrap());
        let wake = ready.wake_fd().unwrap();
        let mut d = ExitDevice::new(exit.clone(), true).with_ready(ready.clone());
        d.write(READY_OFFSET, &[1, 0]); // not 4 bytes: ignored
        assert_eq!(ready.take(), None);
        d.write(READY_OFFSET, &52u32.to_le_bytes());
        d.write(READY_OFFSET, &53u32.to_le_bytes());
        assert_eq!(wake.read().unwrap(), 1);
        assert_eq!(ready.take(), Some(52));
        assert_eq!(ready.take(), None);
        assert!(!exit.is_set(), "ready does not end the VM");
        assert_eq!(*d.status().lock().unwrap(), None);
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
