// SPDX-License-Identifier: Apache-2.0
//! The event-loop watchdog. The run loop on the main thread is where stop signals, the
//! guest's reset and power-off, and deadlines are acted on; a device handler that does not
//! return (a bug, a blocking call) would leave all of them unheard and ember only killable
//! with SIGKILL. The watchdog is a thread of its own that reads the stop signals first (and
//! forwards them to the loop), knows the deadline and the VM exit latch, and sees whether
//! the loop is inside a turn for longer than that turn may take. When a stop is due and the
//! loop is stuck, it says so, restores the terminal, flushes the console and ends the
//! process with the status the run would have ended with.
//!
//! When a stop is due:
//! - the deadline passed, or the guest reset or powered off: at once (once the loop counts as
//!   stuck);
//! - a stop signal: a loop that is merely slow (a long flush) may still come back and ask the
//!   guest to shut down, so the watchdog gives it the shutdown timeout first, as the loop
//!   gives the guest; a second stop signal ends the process at once, as it would stop the
//!   guest at once.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::lock;
use crate::devices::legacy::console::ConsoleHandle;
use crate::exit::{ExitReason, VmExit};
use crate::vcpu::VcpuStats;
use crate::vmm::{ExitCounts, RunOutcome};

/// How long a turn of the loop may run its device handlers before it counts as stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(3);
/// How often the watchdog looks.
const TICK: Duration = Duration::from_millis(200);
/// How long the watchdog waits for console output to drain before it ends the process.
const FLUSH_STALL: Duration = Duration::from_secs(1);

/// What the run loop shares with the watchdog.
#[derive(Debug)]
pub struct LoopWatch {
    base: Instant,
    /// Milliseconds since `base` by which the current turn must be over; 0: not in a turn.
    turn_deadline_ms: AtomicU64,
    /// The loop asked the guest to shut down (pressed its power button).
    stop_asked: AtomicBool,
    /// The first stop signal the loop took (0: none).
    signal: AtomicI32,
}

impl Default for LoopWatch {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            turn_deadline_ms: AtomicU64::new(0),
            stop_asked: AtomicBool::new(false),
            signal: AtomicI32::new(0),
        }
    }
}

impl LoopWatch {
    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    /// The loop starts a turn that waits up to `wait` for events, then runs handlers.
    pub fn enter_turn(&self, wait: Duration) {
        let by = self.ms(Instant::now() + wait + STUCK_AFTER).max(1);
        self.turn_deadline_ms.store(by, Ordering::Release);
    }

    /// The loop finished its turn (and is in ember's own code until the next one).
    pub fn leave_turn(&self) {
        self.turn_deadline_ms.store(0, Ordering::Release);
    }

    /// The loop asked the guest to shut down.
    pub fn note_stop_asked(&self) {
        self.stop_asked.store(true, Ordering::Release);
    }

    /// The loop took stop signal `sig`.
    pub fn note_signal(&self, sig: libc::c_int) {
        let _ = self
            .signal
            .compare_exchange(0, sig, Ordering::AcqRel, Ordering::Acquire);
    }

    fn signal(&self) -> Option<libc::c_int> {
        Some(self.signal.load(Ordering::Acquire)).filter(|s| *s != 0)
    }

    /// Whether the loop is in a turn that should have ended by `now`.
    pub fn stuck(&self, now: Instant) -> bool {
        let by = self.turn_deadline_ms.load(Ordering::Acquire);
        by != 0 && self.ms(now) > by
    }
}

/// What the watchdog needs to end a run the way the run loop would have.
pub struct WatchdogConfig {
    /// A dup of the stop signals' signalfd, read here as well as in the loop: a signal goes
    /// to whichever reads first, and from here on to `pending`.
    pub signal_fd: Option<OwnedFd>,
    /// The signals the run loop has yet to act on...
    pub pending: Arc<Mutex<Vec<libc::c_int>>>,
    /// ...and how it is woken up for them.
    pub wake: EventFd,
    /// The run's deadline.
    pub deadline: Option<Instant>,
    /// How long the guest gets to shut down after a stop signal (the run's
    /// `--shutdown-timeout`): a stuck loop gets as long to come back before one stop signal
    /// ends the process; a second signal ends it at once.
    pub shutdown_timeout: Duration,
    /// The VM exit latch.
    pub exit: Arc<VmExit>,
    /// The loop's turns.
    pub watch: Arc<LoopWatch>,
    /// Console outputs to flush before the process ends.
    pub consoles: Vec<ConsoleHandle>,
    /// The exit device's status.
    pub guest_status: Arc<Mutex<Option<u32>>>,
    /// Exit counters of the vCPUs.
    pub vcpu_stats: Vec<Arc<VcpuStats>>,
    /// The process exit status for an outcome.
    pub status_of: crate::vmm::StatusOf,
}

impl std::fmt::Debug for WatchdogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchdogConfig")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// The running watchdog thread; [`disarm`](Self::disarm) it when the loop is done.
#[derive(Debug)]
pub struct Watchdog {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the watchdog thread.
    pub fn spawn(cfg: WatchdogConfig) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("ember-watchdog".into())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::ThreadKind::Watchdog);
                run(&cfg, &stop_rx);
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the watchdog (the loop ended; ember's own code takes it from here).
    pub fn disarm(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(cfg: &WatchdogConfig, stop: &EventFd) {
    let mut first_signal: Option<libc::c_int> = None;
    // Stop signals read here, and when the first one was known while the loop was stuck.
    let mut signals_read = 0usize;
    let mut signal_known_at: Option<Instant> = None;
    loop {
        let mut fds = vec![libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = &cfg.signal_fd {
            fds.push(libc::pollfd {
                fd: fd.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = libc::c_int::try_from(TICK.as_millis()).unwrap_or(200);
        // SAFETY: `fds` is a live array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n > 0 && fds[0].revents != 0 {
            return;
        }
        if let Some(fd) = &cfg.signal_fd {
            if n > 0 && fds[1].revents != 0 {
                let sigs = crate::event_loop::read_signals(fd);
                signals_read += sigs.len();
                if let Some(&s) = sigs.first() {
                    first_signal.get_or_insert(s);
                    lock(&cfg.pending).extend(sigs);
                    let _ = cfg.wake.write(1);
                }
            }
        }
        let now = Instant::now();
        if !cfg.watch.stuck(now) {
            continue;
        }
        let stop_asked = cfg.watch.stop_asked.load(Ordering::Acquire);
        // A stop signal: one the loop took, one it has not taken yet, one read here.
        let stop_signal = cfg
            .watch
            .signal()
            .or_else(|| lock(&cfg.pending).first().copied())
            .or(first_signal);
        let reason = match cfg.exit.reason() {
            Some(ExitReason::PowerOff | ExitReason::Reset) if stop_asked => {
                ExitReason::Stopped { graceful: true }
            }
            Some(r) => r,
            None if cfg.deadline.is_some_and(|d| now >= d) => ExitReason::Timeout,
            None if stop_signal.is_some() => {
                let took_one = usize::from(cfg.watch.signal().is_some());
                let since = *signal_known_at.get_or_insert(now);
                let waited_enough = since
                    .checked_add(cfg.shutdown_timeout)
                    .is_some_and(|d| now >= d);
                if took_one + signals_read < 2 && !waited_enough {
                    continue;
                }
                ExitReason::Stopped { graceful: false }
            }
            None => continue,
        };
        end_process(cfg, reason, stop_signal);
    }
}

/// Ends the process the way the run would have ended, without the run loop.
fn end_process(cfg: &WatchdogConfig, reason: ExitReason, stop_signal: Option<libc::c_int>) -> ! {
    let exits = ExitCounts::sum(cfg.vcpu_stats.iter().map(AsRef::as_ref));
    // The stuck handler might hold this lock: do not wait for it.
    let guest_status = cfg.guest_status.try_lock().ok().and_then(|g| *g);
    let outcome = RunOutcome {
        reason,
        guest_status,
        exits,
        stop_signal,
    };
    let code = (cfg.status_of)(&outcome);
    // The stuck handler may be what holds stderr (a write to a full pipe): say it from
    // another thread, and end the process whether or not the message got out.
    let describe = outcome.reason.describe();
    let (said, heard) = std::sync::mpsc::channel();
    let speaker = std::thread::Builder::new()
        .name("ember-watchdog-log".into())
        .spawn(move || {
            // Under the watchdog's filter already (inherited): this labels the thread for
            // the SIGSYS report.
            crate::sandbox::enter(crate::sandbox::ThreadKind::Watchdog);
            log::error!(
                "the event loop is stuck in a device handler; exiting without a graceful \
                 shutdown"
            );
            log::error!("{describe}");
            let _ = said.send(());
        });
    if speaker.is_ok() {
        let _ = heard.recv_timeout(Duration::from_secs(2));
    }
    crate::terminal::restore();
    for console in &cfg.consoles {
        console.finish(FLUSH_STALL);
    }
    std::process::exit(i32::from(code));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_stuck_only_past_its_wait_and_the_grace() {
        let w = LoopWatch::default();
        let now = Instant::now();
        assert!(!w.stuck(now + Duration::from_secs(3600)), "not in a turn");
        w.enter_turn(Duration::from_millis(500));
        assert!(!w.stuck(Instant::now()));
        assert!(!w.stuck(Instant::now() + Duration::from_secs(2)));
        assert!(w.stuck(Instant::now() + Duration::from_millis(500) + STUCK_AFTER + TICK));
        w.leave_turn();
        assert!(!w.stuck(Instant::now() + Duration::from_secs(3600)));
    }
}
