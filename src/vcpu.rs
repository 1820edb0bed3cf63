// SPDX-License-Identifier: Apache-2.0
//! vCPUs: per-vCPU register and CPUID set-up, one thread per vCPU running `KVM_RUN`, exits
//! dispatched to the port-I/O and MMIO buses, and the kick that gets a thread out of
//! `KVM_RUN` to stop it (or to sample it for the profiler, or to pause it and hand out its
//! KVM state for a snapshot: [`VcpuHandle::pause`]).

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::cpuid::{filter_cpuid, CpuidParams};
use crate::arch::x86_64::msrs::boot_msr_entries;
use crate::arch::x86_64::regs::{boot_fpu, boot_regs, boot_sregs, set_lint, EntryProtocol};
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, VmExit};
use crate::memory::GuestMemory;
use crate::snapshot::kvm_state::{KvmCaps, RestoreOptions, StateError, VcpuState};
use crate::symbols::LazySymbols;
use crate::timeline::{Phase, Timeline};

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: KVM {what} failed")]
    Kvm {
        /// Which vCPU.
        index: u32,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures failed.
    #[error("vCPU {0}: cannot write boot register structures")]
    Regs(u32, #[source] crate::arch::x86_64::regs::RegsError),
    /// The thread could not be spawned.
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u32, #[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Restoring a saved state into the vCPU failed.
    #[error("vCPU {0}: cannot restore its saved KVM state")]
    Restore(u32, #[source] StateError),
    /// Pausing the vCPU failed.
    #[error("vCPU {0}: {1}")]
    Pause(u32, &'static str),
    /// Saving the state of the paused vCPU failed.
    #[error("vCPU {0}: cannot save its KVM state")]
    Save(u32, #[source] StateError),
    /// A periodic kick timer could not be created.
    #[error("cannot create the periodic kick timer of vCPU thread {0}")]
    Timer(i32, #[source] std::io::Error),
}

/// Port-I/O and MMIO buses shared by all vCPUs.
#[derive(Debug, Default)]
pub struct IoBuses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// Exit counters of one vCPU (read by `ember bench`).
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Port-I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// HLT exits.
    pub hlt: AtomicU64,
    /// Exits because of a signal (kicks, profiler samples).
    pub intr: AtomicU64,
    /// Any other exit.
    pub other: AtomicU64,
    /// Port/MMIO accesses nothing answered.
    pub unhandled: AtomicU64,
    /// Kernel thread id of the vCPU thread (0 until it runs).
    pub tid: AtomicI32,
    /// User CPU time of the vCPU thread in microseconds, recorded when the thread ends.
    pub cpu_user_us: AtomicU64,
    /// System CPU time of the vCPU thread in microseconds (on a PVM host this includes the
    /// emulated guest kernel), recorded when the thread ends.
    pub cpu_sys_us: AtomicU64,
}

/// Called on a vCPU thread whenever it was kicked out of `KVM_RUN` by a signal (the
/// profiler samples registers here).
pub trait KickHook: Send + Sync {
    /// `index` is the vCPU, `fd` its KVM fd.
    fn on_kick(&self, index: u32, fd: &VcpuFd);
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    buses: Arc<IoBuses>,
    exit: Arc<VmExit>,
    stop: Arc<AtomicBool>,
    pause: Arc<PauseCtl>,
    stats: Arc<VcpuStats>,
    mem: GuestMemory,
    symbols: Arc<LazySymbols>,
    hook: Option<Arc<dyn KickHook>>,
    timeline: Arc<Timeline>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("index", &self.index).finish()
    }
}

/// Everything the boot set-up of a vCPU needs.
#[derive(Debug, Clone)]
pub struct VcpuBootParams {
    /// KVM_GET_SUPPORTED_CPUID output, filtered per vCPU.
    pub supported_cpuid: CpuId,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Hide the hypercall-based KVM PV features (PVM hosts).
    pub hide_pv_hypercalls: bool,
    /// Entry protocol of the boot vCPU.
    pub protocol: EntryProtocol,
    /// Kernel entry point.
    pub entry: u64,
}

/// Things shared by every vCPU of a VM.
#[derive(Clone)]
pub struct VcpuShared {
    /// Device buses.
    pub buses: Arc<IoBuses>,
    /// Exit latch.
    pub exit: Arc<VmExit>,
    /// Guest memory.
    pub mem: GuestMemory,
    /// Kernel symbols for error reports (read only when needed).
    pub symbols: Arc<LazySymbols>,
    /// Profiler hook.
    pub hook: Option<Arc<dyn KickHook>>,
    /// Boot phase timestamps.
    pub timeline: Arc<Timeline>,
}

impl std::fmt::Debug for VcpuShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuShared").finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Creates vCPU `index` and sets up its CPUID, MSRs, registers, FPU and LAPIC.
    pub fn new(
        vm: &VmFd,
        index: u32,
        boot: &VcpuBootParams,
        shared: &VcpuShared,
    ) -> Result<Self, VcpuError> {
        let err = |what| {
            move |source| VcpuError::Kvm {
                index,
                what,
                source,
            }
        };
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(err("vCPU creation"))?;

        let mut cpuid = boot.supported_cpuid.clone();
        let tsc_khz = fd.get_tsc_khz().ok().filter(|k| *k > 0);
        filter_cpuid(
            &mut cpuid,
            &CpuidParams {
                vcpu_index: index,
                vcpu_count: boot.vcpu_count,
                hide_pv_hypercalls: boot.hide_pv_hypercalls,
                tsc_khz,
            },
        );
        fd.set_cpuid2(&cpuid).map_err(err("SET_CPUID2"))?;

        let msrs = Msrs::from_entries(&boot_msr_entries()).map_err(|_| VcpuError::Kvm {
            index,
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = fd.set_msrs(&msrs).map_err(err("SET_MSRS"))?;
        if n != msrs.as_slice().len() {
            log::debug!(
                "vCPU {index}: KVM accepted {n} of {} boot MSRs",
                msrs.as_slice().len()
            );
        }

        let mut lapic = fd.get_lapic().map_err(err("GET_LAPIC"))?;
        set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(err("SET_LAPIC"))?;
        fd.set_fpu(&boot_fpu()).map_err(err("SET_FPU"))?;

        // Only the boot vCPU gets an entry state; the others wait for INIT/SIPI from it.
        if index == 0 {
            let current = fd.get_sregs().map_err(err("GET_SREGS"))?;
            let sregs = boot_sregs(&shared.mem, boot.protocol, &current)
                .map_err(|e| VcpuError::Regs(index, e))?;
            fd.set_sregs(&sregs).map_err(err("SET_SREGS"))?;
            fd.set_regs(&boot_regs(boot.protocol, boot.entry))
                .map_err(err("SET_REGS"))?;
        }
        Ok(Self::with_fd(index, fd, shared))
    }

    /// vCPU `index` on its set-up `fd`, not started.
    fn with_fd(index: u32, fd: VcpuFd, shared: &VcpuShared) -> Self {
        Self {
            index,
            fd,
            buses: shared.buses.clone(),
            exit: shared.exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::new(PauseCtl::default()),
            stats: Arc::new(VcpuStats::default()),
            mem: shared.mem.clone(),
            symbols: shared.symbols.clone(),
            hook: shared.hook.clone(),
            timeline: shared.timeline.clone(),
        }
    }

    /// Creates vCPU `index` of a new VM from a saved `state` (instead of the boot set-up of
    /// [`new`](Self::new)).
    pub fn restored(
        vm: &VmFd,
        index: u32,
        state: &VcpuState,
        opts: &RestoreOptions,
        shared: &VcpuShared,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "vCPU creation",
                source,
            })?;
        state
            .restore(&fd, opts)
            .map_err(|e| VcpuError::Restore(index, e))?;
        Ok(Self::with_fd(index, fd, shared))
    }

    /// Makes the vCPU park (paused, its state saved with `caps`) before its first guest
    /// instruction once started: for a VM that starts paused (Firecracker's
    /// `/snapshot/load` with `resume_vm: false`). [`VcpuHandle::resume`] lets it run.
    pub fn pause_before_start(&self, caps: Arc<KvmCaps>) {
        let mut inner = lock(&self.pause.inner);
        inner.caps = Some(caps);
        inner.paused = None;
        inner.generation = inner.generation.wrapping_add(1);
        self.pause.requested.store(true, Ordering::Release);
    }

    /// Starts the vCPU on its own thread `ember-vcpuN`.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let stop = self.stop.clone();
        let pause = self.pause.clone();
        let stats = self.stats.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ember-vcpu{index}"))
            .spawn(move || self.run())
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            stop,
            pause,
            stats,
        })
    }

    fn run(mut self) {
        // Before the first KVM_RUN: this thread's seccomp filter and Landlock rules.
        crate::sandbox::enter(crate::sandbox::ThreadKind::Vcpu);
        // SAFETY: gettid has no preconditions.
        self.stats
            .tid
            .store(unsafe { libc::gettid() }, Ordering::Release);
        self.run_loop();
        let (user, sys) = thread_cpu_time_us();
        self.stats.cpu_user_us.store(user, Ordering::Release);
        self.stats.cpu_sys_us.store(sys, Ordering::Release);
    }

    fn run_loop(&mut self) {
        // Signals meant for the process (SIGTERM, SIGINT...) are handled by the main thread;
        // this thread only takes the kick signal.
        let mut first = true;
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if self.pause.requested.load(Ordering::Acquire) {
                self.park();
                continue;
            }
            if first {
                if let Some(at) = self.timeline.mark(Phase::FirstKvmRun) {
                    log::debug!(
                        "vCPU {}: first KVM_RUN {at:?} after ember started",
                        self.index
                    );
                }
                first = false;
            }
            // Port I/O needs the access size, which `VcpuExit` leaves out: a string
            // instruction (`rep insb`, `rep outsb`) exits once for many accesses. The size is
            // read from the kvm_run header once the exit's borrow of the fd has ended.
            let step = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => Step::Pio(port, PioPtr::In(data)),
                Ok(VcpuExit::IoOut(port, data)) => Step::Pio(port, PioPtr::Out(data)),
                Ok(exit) => Step::Done(handle_exit(self.index, exit, &self.buses, &self.stats)),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.stats.intr.fetch_add(1, Ordering::Relaxed);
                    if let Some(h) = &self.hook {
                        h.on_kick(self.index, &self.fd);
                    }
                    Step::Done(Outcome::Continue)
                }
                Err(e) => Step::Done(Outcome::Exit(ExitReason::VcpuError(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.index
                )))),
            };
            let outcome = match step {
                Step::Done(outcome) => outcome,
                Step::Pio(port, data) => self.handle_pio(port, data),
            };
            match outcome {
                // Once the VM's end is decided (a status written to the exit device, a reset
                // on another vCPU), the guest must not run on: nothing it would print after
                // its exit status may reach the console.
                Outcome::Continue if self.exit.is_set() => break,
                Outcome::Continue => {}
                Outcome::InternalError => {
                    let detail = self.describe_internal_error();
                    self.exit.request(ExitReason::EmulationFailure(detail));
                    break;
                }
                Outcome::Exit(reason) => {
                    self.exit.request(reason);
                    break;
                }
            }
        }
    }

    /// Pauses this vCPU for [`VcpuHandle::pause`]: completes the exit being handled, saves the
    /// KVM state on this thread, hands it out and waits until resumed or stopped.
    fn park(&mut self) {
        // An I/O exit is only complete once KVM_RUN is entered again (an `in` lands in RAX
        // then): with immediate_exit set, KVM finishes it and returns EINTR without running
        // the guest.
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(e),
            Ok(exit) => {
                log::warn!(
                    "vCPU {}: KVM_RUN with immediate_exit returned {exit:?}",
                    self.index
                );
                Ok(())
            }
        };
        self.fd.set_kvm_immediate_exit(0);
        let paused = {
            let caps = lock(&self.pause.inner).caps.clone();
            let state = match (completed, caps) {
                (Err(e), _) => Err(StateError::Ioctl("KVM_RUN (immediate_exit)", e)),
                (Ok(()), Some(caps)) => VcpuState::save(&self.fd, &caps),
                (Ok(()), None) => Err(StateError::NoCaps),
            };
            PausedVcpu {
                state,
                kvmclock_ctrl: self.fd.kvmclock_ctrl(),
            }
        };
        let mut inner = lock(&self.pause.inner);
        let served = inner.generation;
        inner.paused = Some(paused);
        self.pause.cv.notify_all();
        while self.pause.requested.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
            // Another pause request came while parked (a resume and a pause before this
            // thread woke up, or a second pause): park again, with a fresh state for it.
            if inner.generation != served {
                break;
            }
            inner = self
                .pause
                .cv
                .wait_timeout(inner, Duration::from_millis(20))
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// Handles a `KVM_EXIT_IO` whose data area kvm-ioctls handed out as `data`.
    fn handle_pio(&mut self, port: u16, data: PioPtr) -> Outcome {
        // SAFETY: the last KVM_RUN returned KVM_EXIT_IO (kvm-ioctls made `data` from it), so
        // `io` is the active member of the exit union.
        let size = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.io.size };
        // `data` is the slice kvm-ioctls made for this exit: the PIO data area of this
        // vCPU's kvm_run mapping at `io.data_offset`, a page past the kvm_run header read
        // above, so the two do not overlap. The mapping lives as long as `self.fd`, and
        // nothing else touches the area until the next KVM_RUN.
        let data = match data {
            // SAFETY: see above; the area is the guest's read result, ours to fill.
            PioPtr::In(p) => PioData::In(unsafe { &mut *p }),
            // SAFETY: see above; kvm-ioctls handed this area out shared, and it is only read.
            PioPtr::Out(p) => PioData::Out(unsafe { &*p }),
        };
        handle_io(
            self.index,
            port,
            usize::from(size),
            data,
            &self.buses,
            &self.stats,
        )
    }

    /// Where the vCPU stopped, for a KVM internal error: RIP, symbol, instruction bytes.
    fn describe_internal_error(&mut self) -> String {
        // SAFETY: the last KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // active member of the exit union.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let what = match suberror {
            1 => "the instruction could not be emulated",
            2 => "a simultaneous exception occurred",
            3 => "event delivery failed",
            _ => "internal error",
        };
        let Ok(regs) = self.fd.get_regs() else {
            return format!("vCPU {}: {what} (suberror {suberror})", self.index);
        };
        let rip = regs.rip;
        let symbol = self
            .symbols
            .get()
            .and_then(|s| s.lookup(rip).map(|(n, o)| format!(" ({n}+{o:#x})")))
            .unwrap_or_default();
        let bytes = self
            .fd
            .translate_gva(rip)
            .ok()
            .filter(|t| t.valid != 0)
            .and_then(|t| {
                let mut b = [0u8; 15];
                self.mem
                    .read_slice(&mut b, GuestAddress(t.physical_address))
                    .ok()
                    .map(|()| b)
            })
            .map(|b| {
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| "unreadable".into());
        format!(
            "vCPU {} stopped at RIP {rip:#x}{symbol}: {what} (suberror {suberror}); \
             instruction bytes: {bytes}",
            self.index
        )
    }
}

enum Outcome {
    Continue,
    InternalError,
    Exit(ExitReason),
}

/// The data of a port-I/O exit.
enum PioData<'a> {
    /// The guest reads: fill this.
    In(&'a mut [u8]),
    /// The guest writes this.
    Out(&'a [u8]),
}

/// The data area of a port-I/O exit, kept as a pointer while the exit's borrow of the
/// vCPU fd ends (see [`Vcpu::handle_pio`]).
#[derive(Clone, Copy)]
enum PioPtr {
    In(*mut [u8]),
    Out(*const [u8]),
}

/// What one KVM_RUN led to.
enum Step {
    /// Handled.
    Done(Outcome),
    /// A port-I/O exit, handled once the exit's borrow of the vCPU fd has ended.
    Pio(u16, PioPtr),
}

/// Handles a port-I/O exit: the data holds `len / size` accesses of `size` bytes each, one
/// for `in`/`out` and up to a page's worth for a string instruction (`rep insb`, `rep outsw`,
/// ...), which go to the device one by one and in order, as on hardware. A size that does
/// not divide the data (KVM never reports one) is taken as one access of all of it.
fn handle_io(
    index: u32,
    port: u16,
    size: usize,
    data: PioData<'_>,
    buses: &IoBuses,
    stats: &VcpuStats,
) -> Outcome {
    stats.io.fetch_add(1, Ordering::Relaxed);
    let access_size = |len: usize| {
        if size == 0 || len % size != 0 {
            len.max(1)
        } else {
            size
        }
    };
    match data {
        PioData::In(data) => {
            for access in data.chunks_mut(access_size(data.len())) {
                if !buses.pio.read(u64::from(port), access) {
                    stats.unhandled.fetch_add(1, Ordering::Relaxed);
                    crate::guest_log!(
                        log::Level::Debug,
                        "vCPU {index}: read of {} bytes from unhandled port {port:#x}",
                        access.len()
                    );
                    access.fill(0xff);
                }
            }
        }
        PioData::Out(data) => {
            for access in data.chunks(access_size(data.len())) {
                if !buses.pio.write(u64::from(port), access) {
                    stats.unhandled.fetch_add(1, Ordering::Relaxed);
                    crate::guest_log!(
                        log::Level::Debug,
                        "vCPU {index}: write {access:02x?} to unhandled port {port:#x}"
                    );
                }
            }
        }
    }
    Outcome::Continue
}

/// Handles one exit. Accesses to nothing are answered like absent hardware (reads return all
/// ones) and logged at debug level.
fn handle_exit(index: u32, exit: VcpuExit<'_>, buses: &IoBuses, stats: &VcpuStats) -> Outcome {
    match exit {
        // Without the access size (see `Vcpu::handle_pio`, which the run loop uses), one
        // access of the whole data.
        VcpuExit::IoIn(port, data) => handle_io(index, port, 0, PioData::In(data), buses, stats),
        VcpuExit::IoOut(port, data) => handle_io(index, port, 0, PioData::Out(data), buses, stats),
        VcpuExit::MmioRead(addr, data) => {
            stats.mmio.fetch_add(1, Ordering::Relaxed);
            if !buses.mmio.read(addr, data) {
                stats.unhandled.fetch_add(1, Ordering::Relaxed);
                crate::guest_log!(
                    log::Level::Debug,
                    "vCPU {index}: read of {} bytes from unhandled MMIO {addr:#x}",
                    data.len()
                );
                data.fill(0xff);
            }
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio.fetch_add(1, Ordering::Relaxed);
            if !buses.mmio.write(addr, data) {
                stats.unhandled.fetch_add(1, Ordering::Relaxed);
                crate::guest_log!(
                    log::Level::Debug,
                    "vCPU {index}: write {data:02x?} to unhandled MMIO {addr:#x}"
                );
            }
            Outcome::Continue
        }
        VcpuExit::Hlt => {
            stats.hlt.fetch_add(1, Ordering::Relaxed);
            Outcome::Continue
        }
        VcpuExit::Shutdown => Outcome::Exit(ExitReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::Exit(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Outcome::Exit(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => Outcome::Exit(ExitReason::Panic),
                other => {
                    crate::guest_log!(
                        log::Level::Debug,
                        "vCPU {index}: ignoring system event {other}"
                    );
                    Outcome::Continue
                }
            }
        }
        VcpuExit::InternalError => Outcome::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Outcome::Exit(ExitReason::VcpuError(format!(
            "vCPU {index}: KVM could not enter the guest (hardware entry failure reason \
             {reason:#x} on host CPU {cpu})"
        ))),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => {
            stats.intr.fetch_add(1, Ordering::Relaxed);
            Outcome::Continue
        }
        other => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            Outcome::Exit(ExitReason::VcpuError(format!(
                "vCPU {index}: unexpected KVM exit {other:?}"
            )))
        }
    }
}

/// A pause request to a vCPU thread ([`VcpuHandle::pause`]), and what the thread hands back.
#[derive(Debug, Default)]
struct PauseCtl {
    /// Set to pause, cleared to resume.
    requested: AtomicBool,
    inner: Mutex<PauseInner>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct PauseInner {
    /// What the state is read with.
    caps: Option<Arc<KvmCaps>>,
    /// Set by the vCPU thread once it is parked.
    paused: Option<PausedVcpu>,
    /// Counts pause requests: a parked thread that sees it change parks again and hands out
    /// a new state, so a request is never left waiting for one.
    generation: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a paused vCPU thread hands out.
#[derive(Debug)]
pub struct PausedVcpu {
    /// Its KVM state, or the ioctl that failed.
    pub state: Result<VcpuState, StateError>,
    /// What KVM_KVMCLOCK_CTRL (tell the guest it was paused) said.
    pub kvmclock_ctrl: Result<(), kvm_ioctls::Error>,
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pause: Arc<PauseCtl>,
    stats: Arc<VcpuStats>,
}

impl VcpuHandle {
    /// Interrupts `KVM_RUN` on the thread with the kick signal.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread_t belongs to a thread we have not joined yet (the handle
            // is only taken by `join`), so it is valid; the kick signal has a handler.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), kick_signal());
            }
        }
    }

    /// Pauses the vCPU between two KVM_RUNs (kicking it out of the guest) and returns its
    /// KVM state, read with `caps` on the vCPU's own thread. The thread stays parked until
    /// [`resume`](Self::resume) or [`stop_and_join`](Self::stop_and_join).
    pub fn pause(&self, caps: Arc<KvmCaps>, timeout: Duration) -> Result<PausedVcpu, VcpuError> {
        let Some(t) = &self.thread else {
            return Err(VcpuError::Pause(self.index, "the thread has ended"));
        };
        {
            let mut inner = lock(&self.pause.inner);
            inner.caps = Some(caps);
            inner.paused = None;
            inner.generation = inner.generation.wrapping_add(1);
        }
        self.pause.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        let mut inner = lock(&self.pause.inner);
        loop {
            if let Some(p) = inner.paused.take() {
                return Ok(p);
            }
            if t.is_finished() {
                self.pause.requested.store(false, Ordering::Release);
                return Err(VcpuError::Pause(
                    self.index,
                    "the thread ended instead of pausing",
                ));
            }
            if Instant::now() > deadline {
                self.pause.requested.store(false, Ordering::Release);
                return Err(VcpuError::Pause(self.index, "it did not pause in time"));
            }
            self.kick();
            inner = self
                .pause
                .cv
                .wait_timeout(inner, Duration::from_millis(2))
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// Lets a paused vCPU run on.
    pub fn resume(&self) {
        self.pause.requested.store(false, Ordering::Release);
        let _guard = lock(&self.pause.inner);
        self.pause.cv.notify_all();
    }

    /// The exit counters.
    pub fn stats(&self) -> &Arc<VcpuStats> {
        &self.stats
    }

    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The kernel thread id of the vCPU thread, waiting up to `timeout` for the thread to
    /// record it (it does so first thing when it starts).
    pub fn tid(&self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let tid = self.stats.tid.load(Ordering::Acquire);
            if tid != 0 {
                return Some(tid);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Asks the thread to stop and waits for it, kicking it until it leaves `KVM_RUN`.
    /// Returns false when it did not stop within `timeout`.
    pub fn stop_and_join(&mut self, timeout: Duration) -> bool {
        self.stop.store(true, Ordering::Release);
        // A paused thread waits on the pause condition: wake it to see the stop.
        drop(lock(&self.pause.inner));
        self.pause.cv.notify_all();
        let Some(t) = self.thread.take() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while !t.is_finished() {
            if Instant::now() > deadline {
                log::warn!("vCPU {} did not stop within {timeout:?}", self.index);
                self.thread = Some(t);
                return false;
            }
            // SAFETY: as in `kick`: the thread is not joined yet.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), kick_signal());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.join().is_err() {
            log::error!("vCPU {} thread panicked", self.index);
        }
        true
    }
}

/// User and system CPU time of the calling thread, in microseconds.
fn thread_cpu_time_us() -> (u64, u64) {
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid pointer to an rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return (0, 0);
    }
    let us = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    (us(ru.ru_utime), us(ru.ru_stime))
}

/// A POSIX timer that sends the kick signal to one vCPU thread periodically (the guest
/// profiler's sampling clock). Deleted on drop; a timer whose thread has ended does nothing.
#[derive(Debug)]
pub struct KickTimer {
    id: libc::timer_t,
}

// SAFETY: a timer_t is a process-wide kernel timer id; any thread may delete it.
unsafe impl Send for KickTimer {}

impl KickTimer {
    /// Kicks thread `tid` (of this process) every `period`, starting one period from now.
    pub fn start(tid: i32, period: Duration) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let err = |e| VcpuError::Timer(tid, e);
        // SAFETY: sigevent is plain data; the fields that matter are set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        sev.sigev_notify_thread_id = tid;
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid pointers to an initialised sigevent and to the timer id out-value.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let timer = Self { id };
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(period.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(period.subsec_nanos()),
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `id` is the timer just created; `spec` is a valid itimerspec.
        if unsafe { libc::timer_settime(timer.id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(timer)
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: `id` is a timer this value created and has not deleted.
        unsafe {
            libc::timer_delete(self.id);
        }
    }
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal makes KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VcpuError::Signal);
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhandled_io_reads_all_ones() {
        let buses = IoBuses::default();
        let stats = VcpuStats::default();
        let mut data = [0u8; 2];
        let out = handle_exit(0, VcpuExit::IoIn(0x80, &mut data), &buses, &stats);
        assert!(matches!(out, Outcome::Continue));
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        handle_exit(
            0,
            VcpuExit::MmioRead(0xd000_0000, &mut data),
            &buses,
            &stats,
        );
        assert_eq!(data, [0xff; 4]);
        handle_exit(0, VcpuExit::IoOut(0x80, &[1]), &buses, &stats);
        assert_eq!(stats.unhandled.load(Ordering::Relaxed), 3);
        assert_eq!(stats.io.load(Ordering::Relaxed), 2);
    }

    /// A device that answers each read with the next byte of a counter and records writes.
    struct Counter {
        next: u8,
        writes: Vec<Vec<u8>>,
    }
    impl crate::devices::bus::BusDevice for Counter {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
            self.next += 1;
            data[0] = self.next;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.writes.push(data.to_vec());
        }
    }

    #[test]
    fn string_io_is_one_device_access_per_item() {
        let dev = Arc::new(std::sync::Mutex::new(Counter {
            next: 0,
            writes: vec![],
        }));
        let mut buses = IoBuses::default();
        buses.pio.insert(dev.clone(), 0x3f8, 8).unwrap();
        let stats = VcpuStats::default();
        // rep insb, rcx = 4: four byte reads, in order.
        let mut data = [0u8; 4];
        handle_io(0, 0x3f8, 1, PioData::In(&mut data), &buses, &stats);
        assert_eq!(data, [1, 2, 3, 4]);
        // rep insw, rcx = 2: two word reads.
        let mut data = [0u8; 4];
        handle_io(0, 0x3f8, 2, PioData::In(&mut data), &buses, &stats);
        assert_eq!(data, [5, 0, 6, 0]);
        // rep outsb of "abc": three byte writes.
        handle_io(0, 0x3f8, 1, PioData::Out(b"abc"), &buses, &stats);
        // A plain 32-bit out: one access.
        handle_io(0, 0x3f8, 4, PioData::Out(&[1, 2, 3, 4]), &buses, &stats);
        assert_eq!(
            dev.lock().unwrap().writes,
            [vec![b'a'], vec![b'b'], vec![b'c'], vec![1, 2, 3, 4]]
        );
        // Unhandled string reads read all ones, each access counted.
        let mut data = [0u8; 3];
        handle_io(0, 0x80, 1, PioData::In(&mut data), &buses, &stats);
        assert_eq!(data, [0xff; 3]);
        assert_eq!(stats.unhandled.load(Ordering::Relaxed), 3);
        assert_eq!(stats.io.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn system_events_map_to_reasons() {
        let buses = IoBuses::default();
        let stats = VcpuStats::default();
        let out = handle_exit(
            0,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
            &buses,
            &stats,
        );
        assert!(matches!(out, Outcome::Exit(ExitReason::Reset)));
        let out = handle_exit(
            0,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
            &buses,
            &stats,
        );
        assert!(matches!(out, Outcome::Exit(ExitReason::PowerOff)));
        let out = handle_exit(0, VcpuExit::Shutdown, &buses, &stats);
        assert!(matches!(out, Outcome::Exit(ExitReason::TripleFault)));
    }
}
