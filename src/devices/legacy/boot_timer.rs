// SPDX-License-Identifier: Apache-2.0
//! The boot timer (Firecracker's convention): the guest's init writes the byte 123 to
//! [`BOOT_TIMER_START`](crate::arch::x86_64::layout::BOOT_TIMER_START) when userspace starts;
//! ember records the time since its own start (and, for `ember bench`, signals an eventfd so
//! that the main thread can sample the process at that moment). Other values and widths are
//! ignored.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::timeline::{Phase, Timeline};

/// The magic value the guest writes.
pub const MAGIC: u8 = 123;

/// The boot-timer device.
#[derive(Debug)]
pub struct BootTimer {
    timeline: Arc<Timeline>,
    log: bool,
    notify: Option<EventFd>,
}

impl BootTimer {
    /// A boot timer recording into `timeline`; `log` prints the time at info level.
    pub fn new(timeline: Arc<Timeline>, log: bool) -> Self {
        Self {
            timeline,
            log,
            notify: None,
        }
    }

    /// Also signals `notify` (once) when the guest writes the magic byte.
    pub fn with_notify(mut self, notify: Option<EventFd>) -> Self {
        self.notify = notify;
        self
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [MAGIC] {
            crate::guest_log!(
                log::Level::Debug,
                "boot timer: ignoring write {data:02x?} at offset {offset:#x}"
            );
            return;
        }
        if let Some(t) = self.timeline.mark(Phase::BootTimer) {
            if let Some(n) = &self.notify {
                // Fails only if the counter would overflow, which one write cannot do.
                let _ = n.write(1);
            }
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

    #[test]
    fn notifies_once() {
        let t = Arc::new(Timeline::new(Instant::now()));
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut d = BootTimer::new(t, false).with_notify(Some(evt.try_clone().unwrap()));
        d.write(0, &[7]);
        assert!(evt.read().is_err(), "no notification for other values");
        d.write(0, &[123]);
        d.write(0, &[123]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
