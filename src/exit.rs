// SPDX-License-Identifier: Apache-2.0
//! How a VM ends: the [`ExitReason`] that devices and vCPU threads report, the shared
//! [`VmExit`] latch that records the first one and wakes the event loop, and the documented
//! process exit codes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::lock;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 reset line, ACPI reset register): `reboot`.
    Reset,
    /// The guest powered off through ACPI S5.
    PowerOff,
    /// The guest claims its kernel panicked: it printed Linux's panic line ("Kernel panic -
    /// not syncing") on its console before it reset or stopped, or it raised a KVM crash
    /// event. This is the guest's own word, which ember cannot verify: any guest can print
    /// that line. (A pvpanic device would give a separate signal, but needs guest kernel
    /// support.)
    Panic,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not emulate an instruction; the text says where.
    EmulationFailure(String),
    /// A vCPU could not run (a KVM error); the text says which and why.
    VcpuError(String),
    /// The guest wrote a command exit status to the exit device.
    GuestStatus(u32),
    /// Stopped from the host by a signal; `graceful` when the guest shut down in time.
    Stopped {
        /// The guest shut itself down after the request.
        graceful: bool,
    },
    /// `--timeout` elapsed.
    Timeout,
    /// The VM was snapshotted and the run ended there (`ember run --snapshot-then stop`).
    Snapshotted,
}

/// Process exit codes of `ember run` (documented in `--help` and the README).
pub mod code {
    /// The guest powered off or rebooted.
    pub const OK: u8 = 0;
    /// ember itself failed while the VM ran (a KVM or host error).
    pub const VMM_ERROR: u8 = 1;
    /// Bad command line or configuration; nothing was started.
    pub const USAGE: u8 = 2;
    /// The guest triple-faulted (the CPU shut down).
    pub const TRIPLE_FAULT: u8 = 3;
    /// The guest reported a kernel panic (its console printed Linux's panic line): the
    /// guest's own claim, not something ember verified. See [`super::ExitReason::Panic`].
    pub const PANIC: u8 = 4;
    /// KVM could not emulate a guest instruction (internal error).
    pub const EMULATION_FAILURE: u8 = 5;
    /// Stopped by SIGTERM/SIGINT; the guest shut down cleanly within --shutdown-timeout.
    pub const STOPPED: u8 = 6;
    /// Stopped by a signal; the guest did not shut down in time (or a second signal came).
    pub const STOPPED_HARD: u8 = 7;
    /// `ember exec`: the --timeout elapsed (as timeout(1)).
    pub const EXEC_TIMEOUT: u8 = 124;
    /// `ember exec`: the VM ended without reporting the command's status (boot failure,
    /// crash, panic, or a VMM error), or ember could not start it (bad flags, missing
    /// files): as timeout(1), 125 means "the tool failed, not the command".
    pub const EXEC_NO_STATUS: u8 = 125;
    /// `ember exec`: stopped by signal N (SIGINT, SIGTERM, SIGHUP) exits with this plus N,
    /// as a shell reports a command killed by a signal.
    pub const EXEC_SIGNAL_BASE: u8 = 128;
}

impl ExitReason {
    /// The process exit code for `ember run`.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Reset | ExitReason::PowerOff => code::OK,
            ExitReason::Panic => code::PANIC,
            ExitReason::TripleFault => code::TRIPLE_FAULT,
            ExitReason::EmulationFailure(_) => code::EMULATION_FAILURE,
            ExitReason::VcpuError(_) => code::VMM_ERROR,
            // The exit device is for `ember exec`; under `ember run` a status write is
            // reported but the VM is still considered to have ended normally.
            ExitReason::GuestStatus(s) => u8::try_from(*s).unwrap_or(u8::MAX),
            ExitReason::Stopped { graceful: true } => code::STOPPED,
            ExitReason::Stopped { graceful: false } => code::STOPPED_HARD,
            ExitReason::Timeout => code::EXEC_TIMEOUT,
            ExitReason::Snapshotted => code::OK,
        }
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::Reset => "guest rebooted".into(),
            ExitReason::PowerOff => "guest powered off".into(),
            ExitReason::Panic => "the guest reported a kernel panic on its console (its own \
                 claim, which ember cannot verify)"
                .into(),
            ExitReason::TripleFault => {
                "guest triple-faulted (CPU shutdown): the guest kernel crashed or reset by fault"
                    .into()
            }
            ExitReason::EmulationFailure(s) => format!("KVM emulation failure: {s}"),
            ExitReason::VcpuError(s) => format!("vCPU failed: {s}"),
            ExitReason::GuestStatus(s) => format!("guest reported exit status {s}"),
            ExitReason::Stopped { graceful: true } => {
                "stopped by signal: the guest shut down cleanly".into()
            }
            ExitReason::Stopped { graceful: false } => {
                "stopped by signal: the guest was stopped hard".into()
            }
            ExitReason::Timeout => "timeout elapsed: the VM was stopped".into(),
            ExitReason::Snapshotted => "the VM was snapshotted and stopped".into(),
        }
    }
}

/// A latch shared by vCPU threads and devices: the first reported [`ExitReason`] wins, and the
/// event loop is woken through an eventfd.
#[derive(Debug)]
pub struct VmExit {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
    panic_seen: AtomicBool,
    problems: crate::kernel_problems::KernelProblems,
}

impl VmExit {
    /// A new, unset latch.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
            panic_seen: AtomicBool::new(false),
            problems: Default::default(),
        })
    }

    /// Records `reason` unless one was recorded before, and wakes the event loop. A reset or
    /// stop after a kernel panic message is reported as the panic.
    pub fn request(&self, reason: ExitReason) {
        let reason = match reason {
            ExitReason::Reset | ExitReason::TripleFault | ExitReason::EmulationFailure(_)
                if self.panic_seen.load(Ordering::SeqCst) =>
            {
                ExitReason::Panic
            }
            r => r,
        };
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            log::debug!("VM exit requested: {reason:?}");
            *slot = Some(reason);
        }
        drop(slot);
        // An eventfd write only fails when the counter would overflow, which it cannot here.
        let _ = self.evt.write(1);
    }

    /// Notes that the guest kernel printed its panic message.
    pub fn note_panic(&self) {
        self.panic_seen.store(true, Ordering::SeqCst);
    }

    /// The kernel problem signatures (oops, WARN, BUG, panic) the guest printed on its
    /// console.
    pub fn kernel_problems(&self) -> &crate::kernel_problems::KernelProblems {
        &self.problems
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    /// Whether an exit was requested.
    pub fn is_set(&self) -> bool {
        lock(&self.reason).is_some()
    }

    /// The eventfd the event loop waits on.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let e = VmExit::new().unwrap();
        assert!(!e.is_set());
        e.request(ExitReason::Reset);
        e.request(ExitReason::TripleFault);
        assert_eq!(e.reason(), Some(ExitReason::Reset));
        assert_eq!(e.event_fd().read().unwrap(), 2);
    }

    #[test]
    fn reset_after_panic_is_a_panic() {
        let e = VmExit::new().unwrap();
        e.note_panic();
        e.request(ExitReason::Reset);
        assert_eq!(e.reason(), Some(ExitReason::Panic));
        assert_eq!(e.reason().unwrap().exit_code(), code::PANIC);
    }

    #[test]
    fn exit_codes_are_distinct() {
        let reasons = [
            ExitReason::Reset,
            ExitReason::TripleFault,
            ExitReason::Panic,
            ExitReason::EmulationFailure(String::new()),
            ExitReason::VcpuError(String::new()),
            ExitReason::Stopped { graceful: true },
            ExitReason::Stopped { graceful: false },
        ];
        let mut codes: Vec<u8> = reasons.iter().map(|r| r.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), reasons.len());
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
    }
}
