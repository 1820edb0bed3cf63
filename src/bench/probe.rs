// SPDX-License-Identifier: Apache-2.0
//! The child side of `ember bench`: `ember run --bench-report FILE` (and `--profile-guest`)
//! runs the VM as usual while recording what bench needs, and writes it as JSON at the end:
//! boot-phase timestamps on the host's monotonic clock, KVM exits by reason, CPU time of the
//! vCPU threads apart from the VMM's other threads, and resident memory split into guest RAM
//! and the VMM's own, sampled when the guest writes the boot timer and again at the end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::json::Json;
use super::procfs::{self, CpuTime, MemSample};
use super::BenchError;
use crate::builder::BuildHooks;
use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::profiler::GuestProfiler;
use crate::symbols::Symbols;
use crate::timeline::{Phase, Timeline};
use crate::vcpu::VcpuStats;
use crate::vmm::{RunOptions, RunOutcome};

/// Name and version of the report format.
pub const REPORT_FORMAT: &str = "ember-run-report/1";

/// What to record during one `ember run`.
#[derive(Debug, Clone, Default)]
pub struct Instruments {
    /// Write the bench report here.
    pub report: Option<PathBuf>,
    /// Profile the guest and write the profile here (plus `.folded`).
    pub profile: Option<PathBuf>,
    /// Samples per second and vCPU for the profiler.
    pub profile_rate_hz: u32,
}

/// Samples this process's memory when the guest writes the boot timer (on the main thread,
/// from the event loop, so the vCPU is not held up).
struct BootTimerSampler {
    evt: EventFd,
    guest: Vec<(u64, u64)>,
    vcpu_tids: Vec<i32>,
    slot: Arc<Mutex<Option<MemSample>>>,
    vcpu_cpu_ns: Arc<Mutex<Option<u64>>>,
}

impl MutEventSubscriber for BootTimerSampler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        // CPU first: it is what keeps growing while we read smaps.
        let cpu: Option<u64> = self
            .vcpu_tids
            .iter()
            .map(|&t| procfs::thread_run_ns(t))
            .sum();
        *lock(&self.vcpu_cpu_ns) = cpu;
        match procfs::read_smaps(None) {
            Ok(vmas) => *lock(&self.slot) = Some(MemSample::by_ranges(&vmas, &self.guest)),
            Err(e) => log::warn!("bench: cannot read /proc/self/smaps: {e}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::warn!("bench: cannot watch the boot-timer event: {e:?}");
        }
    }
}

/// Builds and runs the VM like [`crate::run_vm`], with the instruments asked for.
pub fn run_instrumented(
    config: &VmConfig,
    start: Instant,
    inst: &Instruments,
    mut opts: RunOptions,
) -> Result<RunOutcome, BenchError> {
    if opts.signal_fd.is_none() {
        match crate::event_loop::block_signals_to_fd() {
            Ok(fd) => opts.signal_fd = Some(fd),
            Err(e) => log::warn!("cannot handle signals: {e}"),
        }
    }
    let profiler = inst
        .profile
        .as_ref()
        .map(|_| Arc::new(GuestProfiler::new(inst.profile_rate_hz)));
    let notify = match &inst.report {
        Some(_) => Some(EventFd::new(EFD_NONBLOCK).map_err(BenchError::EventFd)?),
        None => None,
    };
    let hooks = BuildHooks {
        kick_hook: profiler
            .clone()
            .map(|p| p as Arc<dyn crate::vcpu::KickHook>),
        boot_timer_notify: notify
            .as_ref()
            .map(EventFd::try_clone)
            .transpose()
            .map_err(BenchError::EventFd)?,
        restore_from: None,
        restore_state: None,
        ..Default::default()
    };
    let mut vmm = crate::builder::build_vm(config, start, hooks)?;

    let mem = vmm.memory().clone();
    let guest = crate::memory::host_ranges(&mem);
    let guest_size: u64 = guest.iter().map(|g| g.1).sum();
    let at_boot_timer = Arc::new(Mutex::new(None));
    let vcpu_cpu_at_boot_timer = Arc::new(Mutex::new(None));
    if let Some(evt) = notify {
        let vcpu_tids = vmm
            .vcpus()
            .iter()
            .filter_map(|v| v.tid(std::time::Duration::from_secs(5)))
            .collect();
        vmm.event_manager()
            .add_subscriber(Arc::new(Mutex::new(BootTimerSampler {
                evt,
                guest: guest.clone(),
                vcpu_tids,
                slot: at_boot_timer.clone(),
                vcpu_cpu_ns: vcpu_cpu_at_boot_timer.clone(),
            })));
    }
    if let Some(p) = &profiler {
        p.start(&vmm)?;
    }
    let timeline = vmm.timeline().clone();
    let vcpu_stats: Vec<Arc<VcpuStats>> = vmm.vcpus().iter().map(|v| v.stats().clone()).collect();

    let _raw = config
        .stdin
        .then(|| crate::terminal::RawTerminal::enable(libc::STDIN_FILENO))
        .flatten();
    let outcome = vmm.run(opts);

    let mut profile_summary = None;
    if let (Some(p), Some(path)) = (&profiler, &inst.profile) {
        p.stop();
        let symbols = Symbols::from_elf_file(&config.kernel);
        if symbols.is_none() {
            log::warn!(
                "profile: {} has no ELF symbol table; addresses are not symbolized",
                config.kernel.display()
            );
        }
        let profile = p.profile(symbols.as_ref());
        let title = format!(
            "ember guest profile: {} ({} Hz per vCPU)",
            config.kernel.display(),
            inst.profile_rate_hz
        );
        profile.write(path, &title)?;
        log::info!(
            "profile: {} samples written to {} (folded stacks in {})",
            profile.total(),
            path.display(),
            crate::profiler::folded_path(path).display()
        );
        profile_summary = Some((profile.total(), p.failed_samples()));
    }

    if let Some(path) = &inst.report {
        let end = MemSample::by_ranges(&procfs::read_smaps(None).unwrap_or_default(), &guest);
        let report = RunReport {
            start,
            timeline: &timeline,
            outcome: &outcome,
            vcpu_stats: &vcpu_stats,
            process_cpu: procfs::process_cpu_time(),
            guest_size,
            at_boot_timer: *lock(&at_boot_timer),
            vcpu_cpu_at_boot_timer_ns: *lock(&vcpu_cpu_at_boot_timer),
            at_end: end,
            peak_rss: procfs::peak_rss(None),
            profile: profile_summary,
        };
        std::fs::write(path, report.to_json().to_pretty()).map_err(|source| {
            BenchError::WriteReport {
                path: path.clone(),
                source,
            }
        })?;
    }
    drop(mem);
    Ok(outcome)
}

/// Everything one instrumented run reports.
struct RunReport<'a> {
    start: Instant,
    timeline: &'a Timeline,
    outcome: &'a RunOutcome,
    vcpu_stats: &'a [Arc<VcpuStats>],
    process_cpu: CpuTime,
    guest_size: u64,
    at_boot_timer: Option<MemSample>,
    vcpu_cpu_at_boot_timer_ns: Option<u64>,
    at_end: MemSample,
    peak_rss: Option<u64>,
    profile: Option<(u64, u64)>,
}

fn mem_json(m: Option<MemSample>) -> Json {
    m.map_or(Json::Null, |m| {
        Json::obj([
            ("rss", Json::from(m.rss)),
            ("guest_resident", Json::from(m.guest_resident)),
            ("overhead", Json::from(m.overhead())),
        ])
    })
}

impl RunReport<'_> {
    fn to_json(&self) -> Json {
        use std::sync::atomic::Ordering::Acquire;
        let start_ns = procfs::monotonic_ns_of(self.start);
        let phases = Phase::ALL.iter().map(|&p| {
            let at = self
                .timeline
                .get(p)
                .map(|d| start_ns + u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            (p.name(), Json::from(at))
        });
        let (mut vu, mut vs) = (0u64, 0u64);
        for s in self.vcpu_stats {
            vu += s.cpu_user_us.load(Acquire);
            vs += s.cpu_sys_us.load(Acquire);
        }
        let e = &self.outcome.exits;
        Json::obj([
            ("format", Json::from(REPORT_FORMAT)),
            ("pid", Json::from(std::process::id())),
            ("main_ns", Json::from(start_ns)),
            ("phases_ns", Json::obj(phases)),
            (
                "exits",
                Json::obj([
                    ("io", Json::from(e.io)),
                    ("mmio", Json::from(e.mmio)),
                    ("hlt", Json::from(e.hlt)),
                    ("intr", Json::from(e.intr)),
                    ("other", Json::from(e.other)),
                    ("unhandled", Json::from(e.unhandled)),
                ]),
            ),
            (
                "cpu_us",
                Json::obj([
                    ("process_user", Json::from(self.process_cpu.user_us)),
                    ("process_sys", Json::from(self.process_cpu.sys_us)),
                    ("vcpu_user", Json::from(vu)),
                    ("vcpu_sys", Json::from(vs)),
                    (
                        "vmm_user",
                        Json::from(self.process_cpu.user_us.saturating_sub(vu)),
                    ),
                    (
                        "vmm_sys",
                        Json::from(self.process_cpu.sys_us.saturating_sub(vs)),
                    ),
                    (
                        "vcpu_at_boot_timer",
                        Json::from(self.vcpu_cpu_at_boot_timer_ns.map(|n| n / 1000)),
                    ),
                ]),
            ),
            (
                "memory",
                Json::obj([
                    ("guest_size", Json::from(self.guest_size)),
                    ("at_boot_timer", mem_json(self.at_boot_timer)),
                    ("at_end", mem_json(Some(self.at_end))),
                    ("peak_rss", Json::from(self.peak_rss)),
                ]),
            ),
            ("exit_reason", Json::from(self.outcome.reason.describe())),
            (
                "exit_code",
                Json::from(u32::from(self.outcome.reason.exit_code())),
            ),
            ("guest_status", Json::from(self.outcome.guest_status)),
            (
                "profile",
                self.profile.map_or(Json::Null, |(n, failed)| {
                    Json::obj([("samples", Json::from(n)), ("failed", Json::from(failed))])
                }),
            ),
        ])
    }
}
