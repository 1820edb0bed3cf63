// SPDX-License-Identifier: Apache-2.0
//! The part of the i8042 keyboard controller a guest uses to reset the machine: writing
//! 0xFE (pulse the reset line) to the command port ends the VM as a reset. Everything else
//! reads as an idle controller with no keyboard.

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, VmExit};
use crate::snapshot::devices::I8042State;

/// Command that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
/// Offset of the command/status port (0x64) from the data port (0x60).
pub const COMMAND_OFFSET: u64 = 4;

/// The i8042, registered on ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<VmExit>,
}

impl I8042 {
    /// A controller that reports resets to `exit`.
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }

    /// The controller's state for a snapshot: it has none.
    pub fn save_state(&self) -> I8042State {
        I8042State {}
    }

    /// Restores a saved state: nothing to restore.
    pub fn restore_state(&mut self, _state: &I8042State) {}
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty, no data.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            crate::guest_log!(log::Level::Debug, "i8042: guest pulsed the reset line");
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut d = I8042::new(exit.clone());
        d.write(0, &[0xfe]);
        assert!(!exit.is_set(), "0xfe on the data port is not a reset");
        d.write(COMMAND_OFFSET, &[0xaa]);
        assert!(!exit.is_set());
        let mut b = [0xffu8];
        d.read(COMMAND_OFFSET, &mut b);
        assert_eq!(b[0], 0);
        d.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
