// SPDX-License-Identifier: Apache-2.0
//! Timestamps of the boot phases, relative to the process start, recorded once each (the
//! first time a phase is reached). `ember bench` reports them; `--boot-timer` logs one.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A boot phase, in the order they normally happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The KVM VM exists.
    VmCreated = 0,
    /// Guest memory is mapped and registered.
    MemoryMapped,
    /// Kernel, initrd and command line are in guest memory.
    KernelLoaded,
    /// Every vCPU thread was started (after a boot's set-up, or a restore's: the first
    /// KVM_RUN may come just before or just after).
    VcpusStarted,
    /// The first vCPU entered KVM_RUN.
    FirstKvmRun,
    /// The guest wrote its first byte to the serial console.
    FirstSerialByte,
    /// The guest wrote 123 to the boot-timer device (init started).
    BootTimer,
    /// The guest ended (reset, power-off, crash) or was stopped.
    GuestEnd,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 8] = [
        Phase::VmCreated,
        Phase::MemoryMapped,
        Phase::KernelLoaded,
        Phase::VcpusStarted,
        Phase::FirstKvmRun,
        Phase::FirstSerialByte,
        Phase::BootTimer,
        Phase::GuestEnd,
    ];

    /// A short name for reports and JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            Phase::VmCreated => "vm_created",
            Phase::MemoryMapped => "memory_mapped",
            Phase::KernelLoaded => "kernel_loaded",
            Phase::VcpusStarted => "vcpus_started",
            Phase::FirstKvmRun => "first_kvm_run",
            Phase::FirstSerialByte => "first_serial_byte",
            Phase::BootTimer => "boot_timer",
            Phase::GuestEnd => "guest_end",
        }
    }
}

/// Phase timestamps of one VM.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    marks: [OnceLock<Duration>; Phase::ALL.len()],
}

impl Timeline {
    /// A timeline counting from `start` (the process start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marks: Default::default(),
        }
    }

    /// Records `phase` now, unless it was recorded before. Returns the time since start
    /// when this call recorded it.
    pub fn mark(&self, phase: Phase) -> Option<Duration> {
        let now = self.start.elapsed();
        let slot = &self.marks[phase as usize];
        let mut recorded = false;
        slot.get_or_init(|| {
            recorded = true;
            now
        });
        recorded.then_some(now)
    }

    /// When `phase` was reached, if it was.
    pub fn get(&self, phase: Phase) -> Option<Duration> {
        self.marks[phase as usize].get().copied()
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_mark_wins() {
        let t = Timeline::new(Instant::now());
        assert!(t.get(Phase::BootTimer).is_none());
        assert!(t.mark(Phase::BootTimer).is_some());
        let first = t.get(Phase::BootTimer).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert!(t.mark(Phase::BootTimer).is_none());
        assert_eq!(t.get(Phase::BootTimer).unwrap(), first);
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "{p:?} out of order in Phase::ALL");
        }
    }
}
