// SPDX-License-Identifier: Apache-2.0
//! Legacy PC devices: the 16550A serial ports, the i8042 reset line, and ember's small
//! pseudo devices (boot timer, exit device).

pub mod boot_timer;
pub mod console;
pub mod exit_device;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line raised by writing an eventfd registered with KVM as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
