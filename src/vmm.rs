// SPDX-License-Identifier: Apache-2.0
//! A running VM: the event loop on the main thread until the guest ends (or is stopped),
//! then every vCPU thread stopped and joined, and the outcome reported.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::legacy::console::{ConsoleHandle, FLUSH_STALL};
use crate::event_loop::{EventManager, SignalWatcher};
use crate::exit::{ExitReason, VmExit};
use crate::memory::GuestMemory;
use crate::timeline::{Phase, Timeline};
use crate::vcpu::VcpuHandle;
use crate::vm::Vm;
use event_manager::SubscriberOps;

/// Exit counts of all vCPUs together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O.
    pub io: u64,
    /// MMIO.
    pub mmio: u64,
    /// HLT.
    pub hlt: u64,
    /// Signal kicks.
    pub intr: u64,
    /// Anything else.
    pub other: u64,
    /// Accesses to nothing.
    pub unhandled: u64,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Why the VM stopped.
    pub reason: ExitReason,
    /// Status the guest wrote to the exit device, if any.
    pub guest_status: Option<u32>,
    /// Exit counters.
    pub exits: ExitCounts,
    /// The first stop signal (SIGTERM, SIGINT, SIGHUP) received, if any.
    pub stop_signal: Option<i32>,
}

/// Asks a guest to shut down (ACPI power button, ...). Returns false when the guest cannot
/// be asked, in which case a stop request stops it at once.
pub type ShutdownRequester = Box<dyn FnMut() -> bool + Send>;

/// How the run loop reacts to stop requests and deadlines.
#[derive(Default)]
pub struct RunOptions {
    /// Hard deadline for the whole run (`ember exec --timeout`).
    pub deadline: Option<Instant>,
    /// How long a guest gets to shut down after a stop request.
    pub shutdown_timeout: Duration,
    /// How to ask the guest to shut down.
    pub shutdown: Option<ShutdownRequester>,
    /// A signalfd for SIGTERM/SIGINT/SIGHUP, from
    /// [`block_signals_to_fd`](crate::event_loop::block_signals_to_fd) called before the VM
    /// was built (so no vCPU thread takes those signals).
    pub signal_fd: Option<std::os::fd::OwnedFd>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("deadline", &self.deadline)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

/// A VM with running vCPUs.
pub struct Vmm {
    // Field order matters for drop: vCPU handles, then the VM fd, then memory.
    vcpus: Vec<VcpuHandle>,
    event_manager: EventManager,
    exit: Arc<VmExit>,
    timeline: Arc<Timeline>,
    guest_status: Arc<Mutex<Option<u32>>>,
    shutdown: Option<ShutdownRequester>,
    /// IOAPIC pin the guest unmasks once it listens to `shutdown` (its power button).
    shutdown_irq: Option<u32>,
    /// Guest console outputs, flushed (and their dropped bytes reported) when the run ends.
    consoles: Vec<ConsoleHandle>,
    vm: Vm,
    mem: GuestMemory,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Assembles a VMM from built parts (see [`crate::builder::build_vm`]).
    pub fn new(
        vm: Vm,
        mem: GuestMemory,
        exit: Arc<VmExit>,
        event_manager: EventManager,
        vcpus: Vec<VcpuHandle>,
        timeline: Arc<Timeline>,
        guest_status: Arc<Mutex<Option<u32>>>,
    ) -> Self {
        Self {
            vcpus,
            event_manager,
            exit,
            timeline,
            guest_status,
            shutdown: None,
            shutdown_irq: None,
            consoles: Vec::new(),
            vm,
            mem,
        }
    }

    /// Sets how this VM's guest is asked to shut down (the ACPI power button), used by
    /// [`run`](Self::run) when its [`RunOptions`] bring no requester of their own. `irq` is
    /// the IOAPIC pin of the request: while the guest keeps it masked (no driver for it, or
    /// not booted that far) nothing would hear the request, so a stop signal stops the guest
    /// at once instead of waiting out the shutdown timeout.
    pub fn set_shutdown_requester(&mut self, requester: ShutdownRequester, irq: Option<u32>) {
        self.shutdown = Some(requester);
        self.shutdown_irq = irq;
    }

    /// Adds a console output to flush when the run ends (its writer thread may still hold
    /// bytes then), reporting the bytes it had to drop.
    pub fn add_console(&mut self, console: ConsoleHandle) {
        self.consoles.push(console);
    }

    /// Whether the guest listens for a shutdown request on `irq` (it unmasked that pin).
    fn guest_listens(&self, irq: u32) -> bool {
        match self.vm.ioapic_pin_masked(irq) {
            Ok(masked) => !masked,
            Err(e) => {
                log::debug!(
                    "cannot read the IOAPIC state: {}",
                    crate::error_chain_line(&e)
                );
                true
            }
        }
    }

    /// The boot timeline.
    pub fn timeline(&self) -> &Arc<Timeline> {
        &self.timeline
    }

    /// The exit latch (to stop the VM from elsewhere).
    pub fn exit_latch(&self) -> &Arc<VmExit> {
        &self.exit
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The vCPU threads (for their thread ids and exit counters).
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// The event manager, for devices that attach after the build.
    pub fn event_manager(&mut self) -> &mut EventManager {
        &mut self.event_manager
    }

    /// Runs the event loop until the guest ends or is stopped, then stops every vCPU.
    pub fn run(mut self, mut opts: RunOptions) -> RunOutcome {
        let mut listener_irq = None;
        if opts.shutdown.is_none() {
            opts.shutdown = self.shutdown.take();
            listener_irq = self.shutdown_irq;
        }
        let pending = Arc::new(Mutex::new(Vec::new()));
        if let Some(fd) = opts.signal_fd.take() {
            self.event_manager
                .add_subscriber(Arc::new(Mutex::new(SignalWatcher::new(
                    fd,
                    pending.clone(),
                ))));
        }
        let mut stop_asked_at: Option<Instant> = None;
        let mut stop_signal = None;
        loop {
            if self.exit.is_set() {
                break;
            }
            let now = Instant::now();
            let mut wait = Duration::from_millis(500);
            if let Some(d) = opts.deadline {
                if now >= d {
                    self.exit.request(ExitReason::Timeout);
                    break;
                }
                wait = wait.min(d - now);
            }
            if let Some(asked) = stop_asked_at {
                let d = asked + opts.shutdown_timeout;
                if now >= d {
                    log::warn!(
                        "the guest did not shut down within {:?}; stopping it",
                        opts.shutdown_timeout
                    );
                    self.exit.request(ExitReason::Stopped { graceful: false });
                    break;
                }
                wait = wait.min(d - now);
            }
            let ms = i32::try_from(wait.as_millis()).unwrap_or(500).max(1);
            if let Err(e) = self.event_manager.run_with_timeout(ms) {
                log::error!("event loop failed: {e:?}");
                self.exit
                    .request(ExitReason::VcpuError(format!("event loop failed: {e:?}")));
                break;
            }
            let signals: Vec<_> = std::mem::take(&mut *crate::devices::bus::lock(&pending));
            for sig in signals {
                stop_signal = stop_signal.or(Some(sig));
                if stop_asked_at.is_some() {
                    log::warn!("second stop signal: stopping the guest now");
                    self.exit.request(ExitReason::Stopped { graceful: false });
                    break;
                }
                if let Some(irq) = listener_irq.filter(|irq| !self.guest_listens(*irq)) {
                    log::info!(
                        "signal {sig}: the guest has not enabled its power button (IRQ {irq} \
                         is masked: no ACPI in its kernel, or it has not booted that far); \
                         stopping it"
                    );
                    self.exit.request(ExitReason::Stopped { graceful: false });
                    break;
                }
                let asked = opts.shutdown.as_mut().is_some_and(|f| f());
                if asked {
                    log::info!(
                        "signal {sig}: asked the guest to shut down (waiting up to {:?}; \
                         send it again to stop at once)",
                        opts.shutdown_timeout
                    );
                    stop_asked_at = Some(Instant::now());
                } else {
                    log::info!("signal {sig}: stopping the guest");
                    self.exit.request(ExitReason::Stopped { graceful: false });
                }
            }
        }
        self.timeline.mark(Phase::GuestEnd);
        let mut reason = self
            .exit
            .reason()
            .unwrap_or(ExitReason::VcpuError("no exit reason recorded".into()));
        if stop_asked_at.is_some() && matches!(reason, ExitReason::PowerOff | ExitReason::Reset) {
            reason = ExitReason::Stopped { graceful: true };
        }
        self.stop_vcpus();
        // Let pending device work finish.
        let _ = self.event_manager.run_with_timeout(0);
        // Everything the guest printed is out before ember says how the run ended (unless
        // nobody reads the output: then the count of what was lost).
        for console in &self.consoles {
            console.finish(FLUSH_STALL);
        }
        let exits = self.exit_counts();
        let guest_status = *crate::devices::bus::lock(&self.guest_status);
        RunOutcome {
            reason,
            guest_status,
            exits,
            stop_signal,
        }
    }

    fn stop_vcpus(&mut self) {
        for v in &mut self.vcpus {
            v.stop_and_join(Duration::from_secs(5));
        }
    }

    /// Sums the exit counters of every vCPU.
    pub fn exit_counts(&self) -> ExitCounts {
        use std::sync::atomic::Ordering::Relaxed;
        let mut c = ExitCounts::default();
        for v in &self.vcpus {
            let s = v.stats();
            c.io += s.io.load(Relaxed);
            c.mmio += s.mmio.load(Relaxed);
            c.hlt += s.hlt.load(Relaxed);
            c.intr += s.intr.load(Relaxed);
            c.other += s.other.load(Relaxed);
            c.unhandled += s.unhandled.load(Relaxed);
        }
        c
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
