// SPDX-License-Identifier: Apache-2.0
//! A running VM: the event loop on the main thread until the guest ends (or is stopped),
//! then every vCPU thread stopped and joined, and the outcome reported.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::legacy::console::{ConsoleHandle, FLUSH_STALL};
use crate::devices::legacy::exit_device::ReadySignal;
use crate::devices::vmgenid::{GenerationId, VmGenId, VmGenIdError};
use crate::event_loop::{EventManager, SignalWatcher, Wakeup};
use crate::exit::{ExitReason, VmExit};
use crate::memory::GuestMemory;
use crate::snapshot::devices::{DeviceStates, I8042State};
use crate::snapshot::format::SnapshotError;
use crate::snapshot::kvm_state::{self, KvmCaps, KvmState, RestoreOptions, VcpuState, VmState};
use crate::snapshot::{
    copy_memory, file_memory, read_pvclock, RestoreParts, SnapshotMeta, SnapshotReport,
};
use crate::timeline::{Phase, Timeline};
use crate::vcpu::{Vcpu, VcpuError, VcpuHandle};
use crate::vm::{open_kvm, Vm};
use crate::watchdog::{LoopWatch, Watchdog, WatchdogConfig};
use event_manager::SubscriberOps;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

impl ExitCounts {
    /// The counters of `vcpus`, added up.
    pub fn sum<'a>(vcpus: impl IntoIterator<Item = &'a crate::vcpu::VcpuStats>) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let mut c = Self::default();
        for s in vcpus {
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

/// The process exit status for how a run ended.
pub type StatusOf = Box<dyn Fn(&RunOutcome) -> u8 + Send>;

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
    /// Move the running guest into a new KVM VM once, this long after its init started
    /// (the snapshot/restore experiment of issue 13, docs/snapshot-pvm.md).
    pub snapshot_restore: Option<crate::snapshot::SnapshotTrigger>,
    /// What to do when the guest signals it is ready to take a command (warm `ember exec`,
    /// `ember run --snapshot-on ready`).
    pub on_ready: Option<ReadyAction>,
    /// A signalfd for SIGUSR1 (pause/resume) and SIGUSR2 (`snapshot_on_signal`), from
    /// [`block_control_signals_to_fd`](crate::event_loop::block_control_signals_to_fd)
    /// called before the VM was built.
    pub control_fd: Option<std::os::fd::OwnedFd>,
    /// What SIGUSR2 does (`ember run --snapshot-on sigusr2`).
    pub snapshot_on_signal: Option<ReadyAction>,
    /// The process exit status for an outcome, for the [`watchdog`](crate::watchdog) that
    /// ends the process itself when the event loop is stuck. Default: `ember run`'s
    /// ([`ExitReason::exit_code`]).
    pub status_of: Option<StatusOf>,
    /// Requests from the API server (`ember run --api-sock`): pause, resume, Ctrl+Alt+Del,
    /// snapshots; carried out between two turns of the event loop.
    pub api: Option<crate::api::ApiLink>,
    /// The vCPUs were built paused ([`BuildHooks::start_paused`](crate::builder::BuildHooks::start_paused)):
    /// the guest waits for a resume (SIGUSR1, or the API's `PATCH /vm`).
    pub start_paused: bool,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("deadline", &self.deadline)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

/// What the run loop does, once, when the guest writes the exit device's ready register
/// (see [`ReadySignal`]) or SIGUSR2 arrives: optionally snapshot the VM into a directory
/// (pausing the vCPUs, then resuming them), then call `then`, then end the run if asked.
pub struct ReadyAction {
    /// Write a snapshot here first (the directory is created).
    pub snapshot_to: Option<std::path::PathBuf>,
    /// End the run after a successful snapshot (`ember run --snapshot-then stop`): the
    /// guest does not run on. A failed snapshot ends the run with the error either way.
    pub stop_after: bool,
    /// Called on the event loop's thread after the snapshot (keep it short: spawn a thread
    /// for slow work).
    pub then: Box<dyn FnOnce(ReadyEvent) + Send>,
}

impl std::fmt::Debug for ReadyAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyAction")
            .field("snapshot_to", &self.snapshot_to)
            .finish_non_exhaustive()
    }
}

/// What happened when the guest said it was ready.
#[derive(Debug)]
pub struct ReadyEvent {
    /// The value the guest wrote (warm `ember exec`: the vsock port it listens on).
    pub value: u32,
    /// The snapshot, when one was asked for: how long the vCPUs were paused, or why it failed.
    pub snapshot: Option<Result<Duration, SnapshotError>>,
}

/// What KVM_KVMCLOCK_CTRL said on one vCPU at a pause.
type KvmclockCtrl = Result<(), kvm_ioctls::Error>;

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
    /// Image cache entries mapped into `mem` (released before `mem` is unmapped).
    mapped_images: Option<crate::image_file::MappedImages>,
    /// Guest console outputs, flushed (and their dropped bytes reported) when the run ends.
    consoles: Vec<ConsoleHandle>,
    /// The VM generation ID (with ACPI).
    vmgenid: Option<VmGenId>,
    /// What moving the guest into a new KVM VM needs (see [`Self::snapshot_restore`]).
    restore_parts: Option<RestoreParts>,
    /// The virtio-blk devices, in `--disk` order (the API swaps their images).
    blocks: Vec<Arc<Mutex<crate::devices::virtio::block::Block>>>,
    /// The guest's "ready to take a command" signal.
    ready: Option<Arc<ReadySignal>>,
    /// The /dev/kvm descriptor of the build, for snapshots and pauses: nothing opens
    /// /dev/kvm again once the sandbox is entered (Landlock, a dropped uid).
    kvm: Option<kvm_ioctls::Kvm>,
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
            mapped_images: None,
            consoles: Vec::new(),
            vmgenid: None,
            restore_parts: None,
            blocks: Vec::new(),
            ready: None,
            kvm: None,
            vm,
            mem,
        }
    }

    /// Keeps the /dev/kvm descriptor the VM was created with, for pauses and snapshots.
    pub fn set_kvm(&mut self, kvm: kvm_ioctls::Kvm) {
        self.kvm = Some(kvm);
    }

    /// The KVM capabilities a pause or snapshot needs, from the kept /dev/kvm descriptor
    /// (or a new one, for a VMM assembled without it).
    fn kvm_caps(&self) -> Result<KvmCaps, SnapshotError> {
        match &self.kvm {
            Some(kvm) => KvmCaps::probe(kvm).map_err(SnapshotError::Caps),
            None => KvmCaps::probe(&open_kvm()?).map_err(SnapshotError::Caps),
        }
    }

    /// Keeps the signal the guest raises when it is ready to take a command.
    pub fn set_ready_signal(&mut self, ready: Arc<ReadySignal>) {
        self.ready = Some(ready);
    }

    /// Pauses every vCPU and collects its saved state and KVM_KVMCLOCK_CTRL's answer; on a
    /// failure the vCPUs paused so far run on.
    fn pause_all(
        &self,
        caps: &Arc<KvmCaps>,
    ) -> Result<(Vec<VcpuState>, Vec<KvmclockCtrl>), SnapshotError> {
        let mut states = Vec::new();
        let mut kvmclock_ctrl = Vec::new();
        for v in &self.vcpus {
            let saved = v.pause(caps.clone(), Duration::from_secs(5)).and_then(|p| {
                kvmclock_ctrl.push(p.kvmclock_ctrl);
                p.state.map_err(|e| VcpuError::Save(v.index(), e))
            });
            match saved {
                Ok(s) => states.push(s),
                Err(e) => {
                    self.vcpus.iter().for_each(VcpuHandle::resume);
                    return Err(e.into());
                }
            }
        }
        Ok((states, kvmclock_ctrl))
    }

    /// Keeps the virtio-blk devices (in `--disk` order) for image swaps.
    pub fn set_block_devices(
        &mut self,
        blocks: Vec<Arc<Mutex<crate::devices::virtio::block::Block>>>,
    ) {
        self.blocks = blocks;
    }

    /// Keeps what [`snapshot_restore`](Self::snapshot_restore) needs.
    pub fn set_restore_parts(&mut self, parts: RestoreParts) {
        self.restore_parts = Some(parts);
    }

    /// Moves the running guest into a new KVM VM in this process: pauses every vCPU and
    /// saves its KVM state on its own thread, saves the VM's KVM state, copies guest memory
    /// into a fresh mapping, ends the old vCPU threads, creates a new VM (irqchip, PIT) on the
    /// new memory, registers the device irqfds with it, restores the VM state and then every
    /// vCPU into new vCPU fds, and starts them. Devices are the same objects. On an error
    /// before the old vCPUs are stopped the guest runs on in the old VM.
    pub fn snapshot_restore(
        &mut self,
        opts: &RestoreOptions,
    ) -> Result<SnapshotReport, SnapshotError> {
        let parts = snapshottable(self.restore_parts.as_ref(), false)?;
        let opened;
        let kvm = match &self.kvm {
            Some(k) => k,
            None => {
                opened = open_kvm()?;
                &opened
            }
        };
        let caps = Arc::new(KvmCaps::probe(kvm).map_err(SnapshotError::Caps)?);
        let t0 = Instant::now();
        let resume_all = |vcpus: &[VcpuHandle]| vcpus.iter().for_each(VcpuHandle::resume);
        let (states, kvmclock_ctrl) = self.pause_all(&caps)?;
        let vm_state = match VmState::save(self.vm.fd()) {
            Ok(s) => s,
            Err(e) => {
                resume_all(&self.vcpus);
                return Err(SnapshotError::SaveVm(e));
            }
        };
        let pause_save = t0.elapsed();
        let t1 = Instant::now();
        let copied = if opts.memory_file {
            file_memory(&self.mem)
        } else {
            copy_memory(&self.mem)
        };
        let mem = match copied {
            Ok(m) => m,
            Err(e) => {
                resume_all(&self.vcpus);
                return Err(e);
            }
        };
        let copy = t1.elapsed();
        let pvclock_msr = states
            .first()
            .and_then(|s| kvm_state::msr_value(&s.msrs, crate::snapshot::MSR_KVM_SYSTEM_TIME_NEW))
            .unwrap_or(0);
        let mut pvclock: Vec<(&'static str, crate::snapshot::Pvclock)> = Vec::new();
        pvclock.extend(read_pvclock(&mem, pvclock_msr).map(|p| ("saved", p)));
        if opts.pause_only {
            // A snapshot taken while the guest goes on: the same vCPUs resume.
            drop(mem);
            resume_all(&self.vcpus);
            return Ok(SnapshotReport {
                caps: (*caps).clone(),
                vcpus: states,
                kvmclock_ctrl,
                vm: vm_state,
                new_clock: None,
                pause_save,
                copy,
                restore: Duration::ZERO,
                pvclock,
                restore_steps: Vec::new(),
            });
        }
        std::thread::sleep(opts.delay);

        // From here on there is no way back: the old vCPU threads end (closing their fds).
        let t2 = Instant::now();
        let mut steps = Vec::new();
        let mut step = |name: &'static str, since: &mut Instant| {
            steps.push((name, since.elapsed()));
            *since = Instant::now();
        };
        let mut t = Instant::now();
        for v in &mut self.vcpus {
            v.stop_and_join(Duration::from_secs(5));
        }
        step("stop old vCPUs", &mut t);
        // An eventfd is the irqfd of one VM at a time (EBUSY otherwise, on this project's
        // 6.18 hosts): unbind it from the old VM first.
        for (fd, irq) in &parts.irqfds {
            self.vm
                .fd()
                .unregister_irqfd(fd, *irq)
                .map_err(|e| SnapshotError::Irqfd(*irq, e))?;
        }
        step("unbind irqfds", &mut t);
        let vm = Vm::new(kvm, &mem, &self.timeline)?;
        step("new VM", &mut t);
        for (fd, irq) in &parts.irqfds {
            vm.fd()
                .register_irqfd(fd, *irq)
                .map_err(|e| SnapshotError::Irqfd(*irq, e))?;
        }
        step("bind irqfds", &mut t);
        vm_state
            .restore(vm.fd(), opts)
            .map_err(SnapshotError::RestoreVm)?;
        step("VM state", &mut t);
        let new_clock = vm.fd().get_clock().ok();
        let shared = crate::vcpu::VcpuShared {
            mem: mem.clone(),
            ..parts.shared.clone()
        };
        let vcpus = states
            .iter()
            .zip(0u32..)
            .map(|(s, i)| Vcpu::restored(vm.fd(), i, s, opts, &shared))
            .collect::<Result<Vec<_>, _>>()?;
        step("vCPUs restored", &mut t);
        let handles = vcpus
            .into_iter()
            .map(Vcpu::start)
            .collect::<Result<Vec<_>, _>>()?;
        step("vCPUs started", &mut t);

        // The guest runs in the new VM. The old vCPUs are joined: the old VM and then its
        // memory can go (destroying a VM takes a while here; the guest does not wait for it).
        self.vcpus = handles;
        let restore = t2.elapsed();
        let old_vm = std::mem::replace(&mut self.vm, vm);
        let old_mem = std::mem::replace(&mut self.mem, mem);
        drop(old_vm);
        drop(old_mem);
        step("old VM and memory freed (guest already running)", &mut t);
        pvclock.extend(read_pvclock(&self.mem, pvclock_msr).map(|p| ("after restore", p)));
        if opts.probe_pvclock {
            std::thread::sleep(Duration::from_millis(200));
            pvclock.extend(read_pvclock(&self.mem, pvclock_msr).map(|p| ("200 ms later", p)));
        }
        Ok(SnapshotReport {
            caps: (*caps).clone(),
            vcpus: states,
            kvmclock_ctrl,
            vm: vm_state,
            new_clock,
            pause_save,
            copy,
            restore,
            pvclock,
            restore_steps: steps,
        })
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

    /// Hands over the registration of this VM's memory with the image cache's SIGBUS
    /// handler, so that it lasts as long as the memory and is reported on at the end.
    pub fn set_mapped_images(&mut self, images: crate::image_file::MappedImages) {
        self.mapped_images = Some(images);
    }

    /// Sets the VM generation ID device (the builder does, with ACPI).
    pub fn set_vm_generation_id(&mut self, vmgenid: VmGenId) {
        self.vmgenid = Some(vmgenid);
    }

    /// The VM generation ID device, if the VM has one (with ACPI).
    pub fn vm_generation_id(&self) -> Option<&VmGenId> {
        self.vmgenid.as_ref()
    }

    /// Gives the VM a new generation: writes a fresh VM generation ID into guest memory and
    /// notifies the guest (GED event, then ACPI Notify 0x80 on `\_SB.VGEN`; Linux reseeds
    /// its RNG). **A snapshot restore must call this** after guest RAM, the irqchip and the
    /// ACPI platform registers are restored and before any vCPU runs, so that two VMs
    /// restored from one snapshot never share random streams (see
    /// [`devices::vmgenid`](crate::devices::vmgenid)). Returns the new ID, or `None` when
    /// the VM has no generation ID (`--no-acpi`): the guest cannot be told, and the caller
    /// should say so.
    pub fn new_vm_generation(&mut self) -> Result<Option<GenerationId>, VmGenIdError> {
        match &mut self.vmgenid {
            Some(g) => g.regenerate(&self.mem).map(Some),
            None => Ok(None),
        }
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
        let watch = Arc::new(LoopWatch::default());
        let watchdog = self.start_watchdog(&mut opts, &pending, &watch);
        // Set-up is over: from here this thread runs under its seccomp filter and Landlock
        // rules (the vCPU, console and watchdog threads entered theirs already).
        crate::sandbox::enter(crate::sandbox::ThreadKind::Vmm);
        if let Some(fd) = opts.signal_fd.take() {
            self.event_manager
                .add_subscriber(Arc::new(Mutex::new(SignalWatcher::new(
                    fd,
                    pending.clone(),
                ))));
        }
        let mut stop_asked_at: Option<Instant> = None;
        let mut stop_signal = None;
        let mut snapshot = opts.snapshot_restore.take();
        let mut on_ready = opts.on_ready.take();
        let mut on_sigusr2 = opts.snapshot_on_signal.take();
        let control = Arc::new(Mutex::new(Vec::new()));
        if let Some(fd) = opts.control_fd.take() {
            self.event_manager
                .add_subscriber(Arc::new(Mutex::new(SignalWatcher::new(
                    fd,
                    control.clone(),
                ))));
        }
        let api = opts.api.take();
        if let Some(link) = &api {
            match link.wake.try_clone() {
                Ok(fd) => {
                    self.event_manager
                        .add_subscriber(Arc::new(Mutex::new(crate::event_loop::Wakeup(fd))));
                }
                Err(e) => log::error!("API: cannot watch for requests: {e}"),
            }
        }
        let mut paused = opts.start_paused;
        loop {
            watch.leave_turn();
            if self.exit.is_set() {
                break;
            }
            if let Some(value) = self.ready.as_ref().and_then(|r| r.take()) {
                match on_ready.take() {
                    Some(action) => self.guest_ready(value, action),
                    None => crate::guest_log!(
                        log::Level::Debug,
                        "the guest said it is ready (value {value}); nothing to do"
                    ),
                }
                continue;
            }
            let controls: Vec<_> = std::mem::take(&mut *crate::devices::bus::lock(&control));
            for sig in controls {
                if sig == libc::SIGUSR1 {
                    self.toggle_pause(&mut paused);
                } else if let Some(action) = on_sigusr2.take() {
                    log::info!("SIGUSR2: taking the snapshot");
                    if paused {
                        self.vcpus.iter().for_each(VcpuHandle::resume);
                        paused = false;
                    }
                    self.guest_ready(0, action);
                } else {
                    log::info!("SIGUSR2 ignored (no --snapshot-on sigusr2, or taken already)");
                }
            }
            if let Some(link) = &api {
                while let Ok(call) = link.calls.try_recv() {
                    let deaf = listener_irq.is_some_and(|irq| !self.guest_listens(irq));
                    let r = if deaf && call.request == crate::api::VmmRequest::CtrlAltDel {
                        Err(
                            "SendCtrlAltDel: the guest has not enabled its ACPI power button \
                             (no ACPI in its kernel, or it has not booted that far)"
                                .to_string(),
                        )
                    } else {
                        self.api_request(&call.request, &mut paused, &mut opts.shutdown)
                    };
                    let _ = call.reply.send(r);
                }
            }
            let mut wait = Duration::from_millis(500);
            if let Some(trigger) = &snapshot {
                match self.snapshot_due(trigger) {
                    Some(left) if left.is_zero() => {
                        match &trigger.to {
                            Some(dir) => self.snapshot_to_file(dir),
                            None => self.snapshot_now(&trigger.opts),
                        }
                        snapshot = None;
                        continue;
                    }
                    Some(left) => wait = wait.min(left),
                    None => {}
                }
            }
            let now = Instant::now();
            if let Some(d) = opts.deadline {
                if now >= d {
                    self.exit.request(ExitReason::Timeout);
                    break;
                }
                wait = wait.min(d - now);
            }
            // checked: a shutdown timeout past the clock's end means waiting for ever.
            if let Some(d) = stop_asked_at.and_then(|a| a.checked_add(opts.shutdown_timeout)) {
                if now >= d {
                    crate::guest_warn!(
                        "the guest did not shut down within {:?}; stopping it",
                        opts.shutdown_timeout
                    );
                    self.exit.request(ExitReason::Stopped { graceful: false });
                    break;
                }
                wait = wait.min(d - now);
            }
            let ms = i32::try_from(wait.as_millis()).unwrap_or(500).max(1);
            // From here to the end of the turn the watchdog expects the loop back in time.
            watch.enter_turn(wait);
            if let Err(e) = self.event_manager.run_with_timeout(ms) {
                log::error!("event loop failed: {e:?}");
                self.exit
                    .request(ExitReason::VcpuError(format!("event loop failed: {e:?}")));
                break;
            }
            let signals: Vec<_> = std::mem::take(&mut *crate::devices::bus::lock(&pending));
            for sig in signals {
                stop_signal = stop_signal.or(Some(sig));
                watch.note_signal(sig);
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
                    watch.note_stop_asked();
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
        watch.leave_turn();
        self.timeline.mark(Phase::GuestEnd);
        let mut reason = self
            .exit
            .reason()
            .unwrap_or(ExitReason::VcpuError("no exit reason recorded".into()));
        if stop_asked_at.is_some() && matches!(reason, ExitReason::PowerOff | ExitReason::Reset) {
            reason = ExitReason::Stopped { graceful: true };
        }
        self.stop_vcpus();
        // Let pending device work finish (watched: a handler may stick here too).
        watch.enter_turn(Duration::ZERO);
        let _ = self.event_manager.run_with_timeout(0);
        watch.leave_turn();
        if let Some(w) = watchdog {
            w.disarm();
        }
        // Everything the guest printed is out before ember says how the run ended (unless
        // nobody reads the output: then the count of what was lost).
        for console in &self.consoles {
            console.finish(FLUSH_STALL);
        }
        if let Some(msg) = self.mapped_images.as_ref().and_then(|m| m.report()) {
            log::error!("{msg}");
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

    /// Runs `action` for the guest's ready signal: the snapshot (the vCPUs paused while it is
    /// written, and resumed after unless the run ends there), then its `then`.
    fn guest_ready(&mut self, value: u32, action: ReadyAction) {
        let snapshot = action.snapshot_to.as_deref().map(|dir| {
            let t0 = Instant::now();
            let r = self.save_snapshot(dir).map(|()| t0.elapsed());
            // A run that ends here stays paused: what the guest would do after the snapshot
            // (print, write a disk) must not happen in this run.
            if r.is_err() || !action.stop_after {
                self.vcpus.iter().for_each(VcpuHandle::resume);
            }
            r
        });
        let end = match &snapshot {
            Some(Ok(_)) if action.stop_after => Some(ExitReason::Snapshotted),
            Some(Err(e)) if action.stop_after => Some(ExitReason::VcpuError(format!(
                "snapshot failed: {}",
                crate::error_chain_line(e)
            ))),
            _ => None,
        };
        (action.then)(ReadyEvent { value, snapshot });
        if let Some(reason) = end {
            self.exit.request(reason);
        }
    }

    /// Carries out a request of the API server; `Err` is the `fault_message` of its answer.
    fn api_request(
        &mut self,
        request: &crate::api::VmmRequest,
        paused: &mut bool,
        shutdown: &mut Option<ShutdownRequester>,
    ) -> Result<(), String> {
        use crate::api::VmmRequest;
        match request {
            VmmRequest::Pause if *paused => Ok(()),
            VmmRequest::Pause => {
                let caps = self
                    .kvm_caps()
                    .map_err(|e| format!("cannot pause the microVM: {e}"))?;
                self.pause_all(&Arc::new(caps))
                    .map_err(|e| format!("cannot pause the microVM: {e}"))?;
                *paused = true;
                log::info!("API: the guest is paused");
                Ok(())
            }
            VmmRequest::Resume => {
                if *paused {
                    self.vcpus.iter().for_each(VcpuHandle::resume);
                    *paused = false;
                    log::info!("API: the guest runs again");
                }
                Ok(())
            }
            VmmRequest::CtrlAltDel => match shutdown.as_mut().map(|press| press()) {
                Some(true) => {
                    log::info!("API: SendCtrlAltDel: pressed the ACPI power button");
                    Ok(())
                }
                _ => Err(
                    "SendCtrlAltDel: the microVM has no ACPI power button (started \
                          with --no-acpi?), so the guest cannot be asked to shut down"
                        .into(),
                ),
            },
            VmmRequest::SwapDrive { index, disk } => {
                let block = self
                    .blocks
                    .get(*index)
                    .ok_or_else(|| format!("there is no drive number {index}"))?;
                let file = crate::devices::virtio::block::DiskFile::open(disk)
                    .map_err(|e| crate::error_chain_line(&e))?;
                crate::devices::bus::lock(block).swap_disk(file)?;
                // A snapshot from now on names the new image.
                if let Some(d) = self
                    .restore_parts
                    .as_mut()
                    .and_then(|p| p.config.disks.get_mut(*index))
                {
                    d.path = disk.path.clone();
                }
                Ok(())
            }
            VmmRequest::SnapshotCreate {
                snapshot_path,
                mem_file_path,
            } => {
                if !*paused {
                    return Err("the microVM must be paused for a snapshot".into());
                }
                // save_snapshot pauses the (parked) vCPUs again, which hand out their state
                // once more, and leaves them paused; a failure resumes them: pause again.
                let result = self.snapshot_to_paths(snapshot_path, mem_file_path);
                if result.is_err() {
                    *paused = false;
                    let _ = self.api_request(&VmmRequest::Pause, paused, shutdown);
                }
                result
            }
        }
    }

    /// Writes a snapshot with its state file at `state` and its memory file at `memory`
    /// (Firecracker's `/snapshot/create` paths): written as a snapshot directory beside
    /// `state`, whose two files are then renamed into place. The vCPUs stay paused.
    fn snapshot_to_paths(
        &mut self,
        state: &std::path::Path,
        memory: &std::path::Path,
    ) -> Result<(), String> {
        let parent = state
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let tmp = parent.join(format!(".ember-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = self
            .save_snapshot(&tmp)
            .map_err(|e| format!("snapshot failed: {}", crate::error_chain_line(&e)))
            .and_then(|()| {
                let mv = |from: &str, to: &std::path::Path| {
                    std::fs::rename(tmp.join(from), to).map_err(|e| {
                        format!(
                            "snapshot: cannot move the {from} file to {} ({e}); it must be on \
                             the file system of {}",
                            to.display(),
                            parent.display()
                        )
                    })
                };
                mv(crate::snapshot::format::STATE_FILE, state)?;
                mv(crate::snapshot::format::MEMORY_FILE, memory)
            });
        let _ = std::fs::remove_dir_all(&tmp);
        if result.is_ok() {
            log::info!(
                "API: snapshot written: state {}, memory {}",
                state.display(),
                memory.display()
            );
        }
        result
    }

    /// SIGUSR1: pauses every vCPU, or resumes them when paused.
    fn toggle_pause(&mut self, paused: &mut bool) {
        if *paused {
            self.vcpus.iter().for_each(VcpuHandle::resume);
            *paused = false;
            log::info!("SIGUSR1: the guest runs again");
            return;
        }
        let caps = match self.kvm_caps() {
            Ok(c) => Arc::new(c),
            Err(e) => {
                log::error!("SIGUSR1: cannot pause the guest: {e}");
                return;
            }
        };
        match self.pause_all(&caps) {
            Ok(_) => {
                *paused = true;
                log::info!("SIGUSR1: the guest is paused (SIGUSR1 again resumes it)");
            }
            Err(e) => log::error!("SIGUSR1: cannot pause the guest: {e}"),
        }
    }

    /// Pauses the guest, writes a snapshot into `dir` and ends the run (`ember run
    /// --snapshot-to`).
    fn snapshot_to_file(&mut self, dir: &std::path::Path) {
        let t0 = Instant::now();
        let result = self.save_snapshot(dir);
        let reason = match result {
            Ok(()) => {
                log::info!(
                    "snapshot-restore: snapshot written to {} in {:?}; stopping",
                    dir.display(),
                    t0.elapsed()
                );
                ExitReason::Stopped { graceful: true }
            }
            Err(e) => {
                let msg = format!("snapshot failed: {}", crate::error_chain_line(&e));
                log::error!("{msg}");
                ExitReason::VcpuError(msg)
            }
        };
        self.exit.request(reason);
    }

    /// Pauses every vCPU (they stay paused) and writes the snapshot into `dir`: the state
    /// file (configuration, serial ports, ACPI registers, virtio transports with their
    /// devices, KVM state) and guest memory.
    pub fn save_snapshot(&mut self, dir: &std::path::Path) -> Result<(), SnapshotError> {
        let parts = snapshottable(self.restore_parts.as_ref(), true)?;
        let meta = SnapshotMeta::new(&parts.config)?;
        let caps = Arc::new(self.kvm_caps()?);
        let (vcpus, kvmclock_ctrl) = self.pause_all(&caps)?;
        for (i, r) in kvmclock_ctrl.iter().enumerate() {
            if let Err(e) = r {
                log::debug!("vCPU {i}: KVM_KVMCLOCK_CTRL: {e}");
            }
        }
        let vm = VmState::save(self.vm.fd()).map_err(SnapshotError::SaveVm)?;
        use crate::devices::bus::lock;
        let devices = DeviceStates {
            com1: lock(&parts.com1).save_state(),
            com2: parts.com2.as_ref().map(|c| lock(c).save_state()),
            i8042: I8042State {},
            acpi: parts.acpi.as_ref().map(|a| lock(a).save_state()),
            // The vCPUs are paused and the event loop is between turns (this runs at the top
            // of the run loop): every chain a device took has been returned to its used ring.
            // A device that refuses (virtio-vsock with an open connection) fails the
            // snapshot here.
            virtio: parts
                .virtio
                .iter()
                .map(|t| lock(t).save_state())
                .collect::<Result<_, _>>()?,
        };
        let state = crate::snapshot::file::FileState {
            meta,
            devices,
            vm: KvmState { vm, vcpus },
        };
        crate::snapshot::file::write(dir, &state, &self.mem)
    }

    /// How long until `trigger` is due (zero: now); `None` while the guest's init has not
    /// started.
    fn snapshot_due(&self, trigger: &crate::snapshot::SnapshotTrigger) -> Option<Duration> {
        let init = self.timeline.get(Phase::BootTimer)?;
        Some((init + trigger.after).saturating_sub(self.timeline.elapsed()))
    }

    /// Runs [`snapshot_restore`](Self::snapshot_restore) for the run loop and logs what it
    /// did; a failure ends the run (even one that left the old VM running: this is an
    /// experiment, whose failures must be seen).
    fn snapshot_now(&mut self, opts: &RestoreOptions) {
        log::info!("snapshot-restore: pausing the guest ({opts:?})");
        match self.snapshot_restore(opts) {
            Ok(report) if opts.pause_only => {
                log::info!("snapshot-restore: saved, and resumed in the same VM: {report}");
            }
            Ok(report) => log::info!("snapshot-restore: restored into a new KVM VM: {report}"),
            Err(e) => {
                let msg = format!("snapshot-restore failed: {}", crate::error_chain_line(&e));
                self.exit.request(ExitReason::VcpuError(msg));
            }
        }
    }

    /// Starts the watchdog that ends the run when the loop is stuck in a device handler
    /// (see [`crate::watchdog`]); `None` (and a warning) when it cannot run.
    fn start_watchdog(
        &mut self,
        opts: &mut RunOptions,
        pending: &Arc<Mutex<Vec<libc::c_int>>>,
        watch: &Arc<LoopWatch>,
    ) -> Option<Watchdog> {
        let wake = EventFd::new(EFD_NONBLOCK)
            .and_then(|e| Ok((e.try_clone()?, e)))
            .map_err(|e| log::warn!("no event-loop watchdog: {e}"))
            .ok()?;
        let signal_fd = match opts.signal_fd.as_ref().map(|fd| fd.try_clone()).transpose() {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("no event-loop watchdog: {e}");
                return None;
            }
        };
        let cfg = WatchdogConfig {
            signal_fd,
            pending: pending.clone(),
            wake: wake.0,
            deadline: opts.deadline,
            shutdown_timeout: opts.shutdown_timeout,
            exit: self.exit.clone(),
            watch: watch.clone(),
            consoles: self.consoles.clone(),
            guest_status: self.guest_status.clone(),
            vcpu_stats: self.vcpus.iter().map(|v| v.stats().clone()).collect(),
            status_of: opts
                .status_of
                .take()
                .unwrap_or_else(|| Box::new(|o: &RunOutcome| o.reason.exit_code())),
        };
        match Watchdog::spawn(cfg) {
            Ok(w) => {
                self.event_manager
                    .add_subscriber(Arc::new(Mutex::new(Wakeup(wake.1))));
                Some(w)
            }
            Err(e) => {
                log::warn!("no event-loop watchdog: cannot start its thread: {e}");
                None
            }
        }
    }

    fn stop_vcpus(&mut self) {
        for v in &mut self.vcpus {
            v.stop_and_join(Duration::from_secs(5));
        }
    }

    /// Sums the exit counters of every vCPU.
    pub fn exit_counts(&self) -> ExitCounts {
        ExitCounts::sum(self.vcpus.iter().map(|v| v.stats().as_ref()))
    }
}

/// The parts a snapshot is taken from, or why a VM with `parts` cannot be snapshotted: into
/// a snapshot directory (`to_file`), which carries every device (virtio-vsock with no
/// connection open: the device refuses otherwise), or into a new KVM VM in this process,
/// which carries no virtio device (they hold the old memory).
fn snapshottable(
    parts: Option<&RestoreParts>,
    to_file: bool,
) -> Result<&RestoreParts, SnapshotError> {
    let Some(parts) = parts else {
        return Err(SnapshotError::NotRestorable(
            "it was not built with its restore parts",
        ));
    };
    // Into a file, each device says whether it can be saved as it is (virtio-fs: only while
    // its guest has not mounted it).
    if !to_file && !parts.virtio.is_empty() {
        return Err(SnapshotError::NotRestorable(
            crate::snapshot::file::NO_VIRTIO,
        ));
    }
    Ok(parts)
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}

#[cfg(test)]
mod tests {
    //! A device handler that never returns must not stop the run from ending on a stop
    //! signal, its deadline or the guest's own exit. The watchdog ends such a run by ending
    //! the process, so each case runs in a child process: this test binary again, running
    //! only [`stuck_loop_child`].
    use super::*;
    use crate::event_loop::{new_event_manager, ExitWatcher};
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const CHILD_ENV: &str = "EMBER_TEST_STUCK_LOOP";
    /// Set: the child runs in ember's sandbox (seccomp filters that kill, Landlock).
    const SANDBOX_ENV: &str = "EMBER_TEST_STUCK_SANDBOX";

    /// A device whose event handler never returns (a bug, or a blocking call).
    struct Stuck(EventFd);
    impl MutEventSubscriber for Stuck {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
        }
    }

    /// Writes what a signalfd would deliver for `sig` into `fd`.
    fn fake_signal(fd: &OwnedFd, sig: i32) {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        info.ssi_signo = sig as u32;
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: writes `size` bytes from a live signalfd_siginfo.
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                std::ptr::addr_of!(info).cast::<libc::c_void>(),
                size,
            )
        };
        assert_eq!(n, size as isize);
    }

    /// Not a test on its own: the child process of the tests below (see the module doc).
    /// Runs a VM without vCPUs whose event loop sticks in its first turn, then (by the mode
    /// in the environment) gets SIGTERM, reaches its deadline, or sees the guest reset.
    #[test]
    #[ignore = "run by the stuck_event_loop_* tests in a child process"]
    fn stuck_loop_child() {
        let Ok(mode) = std::env::var(CHILD_ENV) else {
            eprintln!("stuck_loop_child only runs as the child of the stuck_event_loop_* tests");
            return;
        };
        crate::logger::init(log::LevelFilter::Info);
        if std::env::var_os(SANDBOX_ENV).is_some_and(|v| !v.is_empty()) {
            // The watchdog's way out (a thread for the message, the exit) under its filter.
            crate::sandbox::install(crate::sandbox::SandboxConfig {
                seccomp: crate::sandbox::SeccompMode::Kill,
                landlock: true,
                ..Default::default()
            })
            .unwrap();
        }
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let kvm = crate::vm::open_kvm().unwrap();
        let vm = Vm::new(&kvm, &mem, &timeline).unwrap();
        let exit = Arc::new(VmExit::new().unwrap());
        let mut em = new_event_manager().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(exit.clone()))));
        let stuck = EventFd::new(EFD_NONBLOCK).unwrap();
        stuck.write(1).unwrap();
        em.add_subscriber(Arc::new(Mutex::new(Stuck(stuck.try_clone().unwrap()))));
        // A pipe standing in for the signalfd: the test writes signalfd records into it.
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds into a valid array.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: pipe2 returned two fresh fds that nothing else owns.
        let (sig_r, sig_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let vmm = Vmm::new(
            vm,
            mem,
            exit.clone(),
            em,
            Vec::new(),
            timeline,
            Arc::new(Mutex::new(None)),
        );
        let mut opts = RunOptions {
            shutdown_timeout: Duration::from_secs(3600),
            signal_fd: Some(sig_r),
            ..Default::default()
        };
        match mode.as_str() {
            // One stop signal: the stuck loop gets the shutdown timeout to come back first.
            "signal" => {
                opts.shutdown_timeout = Duration::from_secs(2);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    fake_signal(&sig_w, libc::SIGTERM);
                    std::thread::sleep(Duration::from_secs(3600));
                });
            }
            // A second stop signal ends it at once, however long the shutdown timeout.
            "two-signals" => {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    fake_signal(&sig_w, libc::SIGTERM);
                    std::thread::sleep(Duration::from_millis(500));
                    fake_signal(&sig_w, libc::SIGINT);
                    std::thread::sleep(Duration::from_secs(3600));
                });
            }
            "deadline" => opts.deadline = Some(Instant::now() + Duration::from_secs(1)),
            "reset" => {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    exit.request(crate::exit::ExitReason::Reset);
                });
            }
            other => panic!("unknown mode {other}"),
        }
        let outcome = vmm.run(opts);
        eprintln!("the run returned: {outcome:?}");
        std::process::exit(99);
    }

    /// Runs [`stuck_loop_child`] in `mode`; its exit status and stderr (None: no KVM here).
    fn run_child(mode: &str, sandboxed: bool) -> Option<(Option<i32>, String)> {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            eprintln!("SKIP: /dev/kvm is not usable here");
            return None;
        }
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "vmm::tests::stuck_loop_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, mode)
            .env(SANDBOX_ENV, if sandboxed { "1" } else { "" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        // Hang detection only.
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let st = child.wait().unwrap();
                let err = err_t.join().unwrap();
                panic!("the run did not end ({mode}): {st:?}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Some((status.code(), err_t.join().unwrap()))
    }

    const STUCK_MESSAGE: &str =
        "the event loop is stuck in a device handler; exiting without a graceful shutdown";

    /// Runs the stuck-loop child in `mode` and checks that the watchdog ended it with
    /// `status`, saying why.
    fn expect_watchdog_end(mode: &str, status: u8) {
        expect_watchdog_end_in(mode, status, false);
    }

    fn expect_watchdog_end_in(mode: &str, status: u8, sandboxed: bool) {
        let Some((code, stderr)) = run_child(mode, sandboxed) else {
            return;
        };
        assert!(stderr.contains(STUCK_MESSAGE), "{stderr}");
        assert_eq!(code, Some(i32::from(status)), "{stderr}");
    }

    #[test]
    fn stuck_event_loop_still_ends_on_a_stop_signal() {
        expect_watchdog_end("signal", crate::exit::code::STOPPED_HARD);
    }

    /// The same end under the seccomp filters (kill) and Landlock: the watchdog's way out
    /// is on its allow-list.
    #[test]
    fn stuck_event_loop_ends_in_the_sandbox() {
        expect_watchdog_end_in("two-signals", crate::exit::code::STOPPED_HARD, true);
    }

    #[test]
    fn stuck_event_loop_ends_at_once_on_a_second_stop_signal() {
        expect_watchdog_end("two-signals", crate::exit::code::STOPPED_HARD);
    }

    #[test]
    fn stuck_event_loop_still_ends_at_the_deadline() {
        expect_watchdog_end("deadline", crate::exit::code::EXEC_TIMEOUT);
    }

    #[test]
    fn stuck_event_loop_still_ends_when_the_guest_resets() {
        expect_watchdog_end("reset", crate::exit::code::OK);
    }
}
