// SPDX-License-Identifier: Apache-2.0
//! The main thread's event loop (event-manager over epoll): host input, device queue
//! notifications, the VM-exit latch and process signals are all handled here, never on vCPU
//! threads.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::exit::VmExit;

/// The event manager ember uses: subscribers are shared, lockable and sendable.
pub type EventManager = event_manager::EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Creates an event manager.
pub fn new_event_manager() -> std::io::Result<EventManager> {
    EventManager::new().map_err(|e| std::io::Error::other(format!("{e}")))
}

/// Wakes the loop when the VM exit latch is set (the loop checks the latch itself).
#[derive(Debug)]
pub struct ExitWatcher {
    exit: Arc<VmExit>,
}

impl ExitWatcher {
    /// Watches `exit`.
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.event_fd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event_fd(), EventSet::IN)) {
            log::error!("cannot watch the VM exit event: {e:?}");
        }
    }
}

/// Wakes the loop for work another thread left it (an eventfd that it only drains).
#[derive(Debug)]
pub struct Wakeup(pub vmm_sys_util::eventfd::EventFd);

impl MutEventSubscriber for Wakeup {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the wake-up event: {e:?}");
        }
    }
}

/// The process signals ember handles itself (through a signalfd on the main thread).
pub const HANDLED_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The control signals of `ember run`: SIGUSR1 pauses or resumes the guest, SIGUSR2 takes
/// the snapshot of `--snapshot-on sigusr2`.
pub const CONTROL_SIGNALS: [libc::c_int; 2] = [libc::SIGUSR1, libc::SIGUSR2];

/// Blocks [`HANDLED_SIGNALS`] in the calling thread (and so in every thread it spawns after
/// this) and returns a signalfd that receives them.
pub fn block_signals_to_fd() -> std::io::Result<OwnedFd> {
    block_to_fd(&HANDLED_SIGNALS)
}

/// Blocks [`CONTROL_SIGNALS`] like [`block_signals_to_fd`], on a signalfd of their own (they
/// are not stop signals: the watchdog leaves them alone).
pub fn block_control_signals_to_fd() -> std::io::Result<OwnedFd> {
    block_to_fd(&CONTROL_SIGNALS)
}

fn block_to_fd(signals: &[libc::c_int]) -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `set` is initialised; -1 asks for a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads every pending signal from a signalfd.
pub fn read_signals(fd: &OwnedFd) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is a live signalfd_siginfo of `size` bytes.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                std::ptr::addr_of_mut!(info).cast::<libc::c_void>(),
                size,
            )
        };
        if n != isize::try_from(size).unwrap_or(-1) {
            break;
        }
        out.push(libc::c_int::try_from(info.ssi_signo).unwrap_or(0));
    }
    out
}

/// Collects signals from a signalfd into a shared list the run loop drains.
#[derive(Debug)]
pub struct SignalWatcher {
    fd: OwnedFd,
    pending: Arc<Mutex<Vec<libc::c_int>>>,
}

impl SignalWatcher {
    /// Watches `fd`; signals land in `pending`.
    pub fn new(fd: OwnedFd, pending: Arc<Mutex<Vec<libc::c_int>>>) -> Self {
        Self { fd, pending }
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let sigs = read_signals(&self.fd);
        crate::devices::bus::lock(&self.pending).extend(sigs);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch signals: {e:?}");
        }
    }
}
