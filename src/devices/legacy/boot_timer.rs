// SPDX-License-Identifier: Apache-2.0
//! The boot timer (Firecracker's convention): the guest's init writes the byte 123 to
//! [`BOOT_TIMER_START`](crate::arch::x86_64::layout::BOOT_TIMER_START) when userspace starts;
//! ember records the time since its own start. Other values and widths are ignored.

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::timeline::{Phase, Timeline};

/// The magic value the guest writes.
pub const MAGIC: u8 = 123;

/// The boot-timer device.
#[derive(Debug)]
pub struct BootTimer {
    timeline: Arc<Timeline>,
    log: bool,
}

impl BootTimer {
    /// A boot timer recording into `timeline`; `log` prints the time at info level.
    pub fn new(timeline: Arc<Timeline>, log: bool) -> Self {
        Self { timeline, log }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [MAGIC] {
            log::debug!("boot timer: ignoring write {data:02x?} at offset {offset:#x}");
            return;
        }
        if let Some(t) = self.timeline.mark(Phase::BootTimer) {
            if self.log {
                log::info!(
                    "boot timer: guest userspace started {:.3} s after ember started",
                    t.as_secs_f64()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn only_the_magic_byte_counts() {
        let t = Arc::new(Timeline::new(Instant::now()));
        let mut d = BootTimer::new(t.clone(), false);
        d.write(0, &[122]);
        d.write(0, &[123, 0, 0, 0]);
        d.write(1, &[123]);
        assert!(t.get(Phase::BootTimer).is_none());
        d.write(0, &[123]);
        assert!(t.get(Phase::BootTimer).is_some());
    }
}
