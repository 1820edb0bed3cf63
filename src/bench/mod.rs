// SPDX-License-Identifier: Apache-2.0
//! `ember bench`: boots the same guest several times, each boot in a fresh process, and
//! reports where the time goes, phase by phase, with the same boots under peer VMMs (QEMU
//! microvm, Firecracker) in the same run for comparison.
//!
//! How it measures:
//! - Every ember boot is a child `ember run ... --bench-report FILE` ([`probe`]); the child
//!   writes its boot phases as `CLOCK_MONOTONIC` timestamps, which the parent turns into
//!   times since it spawned the child, so "process start" is real (fork + exec + loading
//!   included). The child also reports KVM exits by reason, CPU time of its vCPU threads
//!   apart from its other threads, and its resident memory minus resident guest memory
//!   (from `/proc/self/smaps`, the guest mapping found by its address) when the guest
//!   writes the boot timer.
//! - Every run, ember or peer, is also watched from outside ([`runner`]): first console
//!   byte, the marker line (default `ember-init:`, the default guest's init printing its
//!   first line), exit time, CPU time and peak RSS (`wait4`), and RSS at the marker. These
//!   host-seen figures are the comparison basis; Firecracker's boot-timer log line is
//!   compared with ember's boot timer too.
//! - Runs alternate between VMMs (ember #1, peer #1, ember #2, ...) so that both sides share
//!   the host's noise; `--parallel` runs that many at once.
//! - `--ab` ([`ab`]) boots two configurations of ember, A and B, in ABBA order and says for
//!   each figure whether B differs from A beyond the noise (a permutation test, [`stats`]).

pub mod ab;
pub mod exec;
pub mod http;
pub mod json;
pub mod peers;
pub mod probe;
pub mod procfs;
pub mod report;
pub mod runner;
pub mod snapshot;
pub mod stats;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use json::Json;
use peers::GuestSpec;
use runner::{Job, Progress, RunContext, RunRecord, Target};

/// The host a bench ran on, for its JSON: PVM or not, CPUs, load average at the end.
pub(crate) fn host_json() -> Json {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get() as u64);
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    Json::obj([
        ("pvm", Json::from(crate::host::HostInfo::detect().pvm)),
        ("cpus", Json::from(cpus)),
        ("loadavg_at_end", Json::from(loadavg)),
    ])
}

/// Errors of `ember bench` and of the bench instruments in `ember run`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] crate::builder::BuildError),
    /// The profiler failed.
    #[error(transparent)]
    Profiler(#[from] crate::profiler::ProfilerError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The report could not be written.
    #[error("cannot write the bench report to {path}")]
    WriteReport {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bench option is wrong.
    #[error("{0}")]
    Usage(String),
    /// The scratch directory could not be made.
    #[error("cannot create the scratch directory {path}")]
    Workdir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// ember's own binary could not be found (to run `ember run`).
    #[error("cannot find the ember binary to run")]
    Exe(#[source] std::io::Error),
    /// The JSON file could not be written.
    #[error("cannot write the bench results to {path}")]
    WriteJson {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What to bench.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The guest (its command line as the user gave it, without host switches).
    pub guest: GuestSpec,
    /// Boots per VMM.
    pub runs: usize,
    /// Boots at once.
    pub parallel: usize,
    /// `--compare` values.
    pub compare: Vec<String>,
    /// Marker text on the console that says init started.
    pub marker: String,
    /// Per-run time limit.
    pub timeout: Duration,
    /// Profile the ember runs and write the merged profile here.
    pub profile: Option<PathBuf>,
    /// Adapt guests to this host (PVM switches); off with `--no-host-tuning`.
    pub host_tuning: bool,
    /// The ember binary to run (default: this one).
    pub ember_bin: Option<PathBuf>,
    /// Only the VMM set-up: stop each ember run soon after its first KVM_RUN; no peers.
    pub setup_only: bool,
    /// Give ember's guests ACPI (off with `--no-acpi`).
    pub acpi: bool,
    /// Snapshot mode (`--snapshot`): snapshot/restore rows instead of boots
    /// ([`snapshot::run_snapshot_bench`]).
    pub snapshot: Option<snapshot::SnapshotMode>,
    /// A/B mode (`--ab`): two ember configurations instead of ember and peers
    /// ([`ab::run_ab`]).
    pub ab: Option<ab::AbOptions>,
}

/// How long after its start a `--setup-only` run is stopped.
pub const SETUP_ONLY_STOP_MS: u64 = 500;

/// The outcome of a bench.
#[derive(Debug, Clone)]
pub struct BenchResults {
    /// Every run, in order.
    pub records: Vec<RunRecord>,
    /// Per-VMM statistics, ember first.
    pub summaries: Vec<report::VmmSummary>,
    /// Notes for the reader (skipped peers, how things were measured).
    pub notes: Vec<String>,
    /// The guest command line ember was given, and the one peers got.
    pub cmdlines: (String, String),
    /// Wall time of the whole bench.
    pub wall: Duration,
    /// Options.
    pub options: BenchOptions,
}

/// The command line peers get: the guest's, with its root device, this host's switches
/// (unless host tuning is off) and `ember.exit=reboot`; with `with_peers`, notes say what was
/// added.
pub(crate) fn peer_cmdline(
    opts: &BenchOptions,
    host: &crate::host::HostInfo,
    with_peers: bool,
    notes: &mut Vec<String>,
) -> String {
    let mut peer_cmdline = opts.guest.cmdline.clone();
    if let Some(root) = &opts.guest.root_cmdline {
        peer_cmdline.push(' ');
        peer_cmdline.push_str(root);
    }
    if opts.host_tuning {
        if let Some(sw) = host.cmdline_switches() {
            peer_cmdline = crate::host::append_switches(&peer_cmdline, sw);
            if with_peers {
                notes.push(format!(
                    "PVM host: peers get `{sw}` on their command line, as ember adds it itself"
                ));
            }
        }
    }
    // Neither peer powers a guest off the way ember's init expects (QEMU's microvm without
    // ACPI cannot; Firecracker's ACPI tables have no S5 sleep control, so `poweroff -f` only
    // halts the guest and the VMM waits forever): they end through the i8042 reset line, so
    // the default guest's init is told to reboot.
    if with_peers && peers::ask_for_reboot(&mut peer_cmdline) {
        notes.push(
            "peers get `ember.exit=reboot`: they end a guest through the i8042 reset line, \
             not through ACPI poweroff"
                .into(),
        );
    }
    peer_cmdline
}

/// Runs the bench, calling `on_progress` as runs start and end.
pub fn run_bench(
    opts: &BenchOptions,
    on_progress: &mut dyn FnMut(&Progress, usize, usize),
) -> Result<BenchResults, BenchError> {
    if opts.runs == 0 || opts.parallel == 0 {
        return Err(BenchError::Usage(
            "--runs and --parallel must be at least 1".into(),
        ));
    }
    let started = Instant::now();
    let host = crate::host::HostInfo::detect();
    let mut notes = Vec::new();

    let mut peers = Vec::new();
    if opts.setup_only && !opts.compare.is_empty() {
        notes.push(
            "--setup-only: peers are not run (their set-up is not visible from outside)".into(),
        );
    }
    // A peer that was asked for and is not installed is an error, before anything boots.
    for spec in opts.compare.iter().filter(|_| !opts.setup_only) {
        peers.push(peers::lookup(spec).map_err(BenchError::Usage)?);
    }

    // ember adds the host's switches itself; peers get them from us.
    let ember_cmdline = opts.guest.cmdline.clone();
    let peer_cmdline = peer_cmdline(opts, &host, !peers.is_empty(), &mut notes);
    if !peers.is_empty() {
        notes.push(format!(
            "peers are timed from outside: first console byte and the marker line {:?} on \
             the serial console, for ember too in the comparison; {}",
            opts.marker,
            if peers.iter().any(|p| p.has_boot_timer()) {
                "Firecracker's boot-timer log line is compared with ember's boot timer"
            } else {
                "QEMU has no boot-timer device, so only ember's table shows it"
            }
        ));
        notes.push(
            "peer RSS overhead counts as guest memory every mapping sized like guest RAM \
             (ember's own table uses its exact guest mapping)"
                .into(),
        );
    }

    let ember_bin = match &opts.ember_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(BenchError::Exe)?,
    };
    let workdir = std::env::temp_dir().join(format!("ember-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|source| BenchError::Workdir {
        path: workdir.clone(),
        source,
    })?;
    let mut ember_flags = Vec::new();
    if opts.setup_only {
        ember_flags.push("--stop-after-ms".to_string());
        ember_flags.push(SETUP_ONLY_STOP_MS.to_string());
        notes.push(format!(
            "--setup-only: each run was stopped {SETUP_ONLY_STOP_MS} ms after it started; \
             phases after the first KVM_RUN are not measured"
        ));
    }
    if !opts.host_tuning {
        ember_flags.push("--no-host-tuning".to_string());
    }
    if !opts.acpi {
        ember_flags.push("--no-acpi".to_string());
        notes.push("--no-acpi: ember's guests had no ACPI tables (acpi=off)".into());
    }
    if peers.iter().any(|p| p.kind == peers::PeerKind::Qemu) {
        notes.push(format!(
            "QEMU's microvm ran with acpi={} as ember's guests did (--no-acpi switches both)",
            if opts.acpi { "on" } else { "off" }
        ));
    }
    if peers.iter().any(|p| p.kind == peers::PeerKind::Firecracker) {
        notes.push(
            "Firecracker gets a custom CPU template that hides KVM's hypercall-based PV \
             features (as QEMU gets kvm-pv-ipi=off,kvm-pv-unhalt=off,kvm-pv-sched-yield=off \
             and as ember hides them on a PVM host, where SMP guests hang on them)"
                .into(),
        );
    }
    if !opts.acpi && peers.iter().any(|p| p.kind == peers::PeerKind::Firecracker) {
        notes.push("Firecracker's guests have ACPI whatever --no-acpi says".into());
    }
    notes.push(match crate::image_file::ImageCache::from_env() {
        Some(c) => format!(
            "ember maps kernel and initrd from its image cache ({}; {}=off copies them)",
            c.dir().display(),
            crate::image_file::CACHE_ENV
        ),
        None => format!(
            "ember copies kernel and initrd into guest memory ({} is off or no cache \
             directory is known)",
            crate::image_file::CACHE_ENV
        ),
    });
    let mut peer_guest = opts.guest.clone();
    peer_guest.cmdline = peer_cmdline.clone();
    let ctx = RunContext {
        ember_bin,
        guest: peer_guest,
        ember_cmdline: ember_cmdline.clone(),
        ember_flags,
        marker: opts.marker.clone(),
        timeout: opts.timeout,
        workdir: workdir.clone(),
        profile: opts.profile.is_some(),
        setup_only: opts.setup_only,
        name: None,
    };

    // Alternate VMMs so that they share the host's noise.
    let mut jobs = Vec::new();
    for run in 1..=opts.runs {
        let targets = std::iter::once(Target::Ember).chain(peers.iter().cloned().map(Target::Peer));
        for target in targets {
            jobs.push(Job {
                target,
                run,
                seq: jobs.len() + 1,
                ctx: 0,
            });
        }
    }
    let records = run_all(std::slice::from_ref(&ctx), jobs, opts.parallel, on_progress);

    if let Some(path) = &opts.profile {
        let mut merged = crate::profiler::Profile::default();
        let mut n = 0;
        for r in records.iter().filter(|r| r.error.is_none()) {
            if let Some(p) = &r.profile {
                match crate::profiler::Profile::read_folded(p) {
                    Ok(p) => {
                        merged.merge(&p);
                        n += 1;
                    }
                    Err(e) => notes.push(format!("profile of {} #{}: {e}", r.vmm, r.run)),
                }
            }
        }
        let title = format!(
            "ember guest profile: {} boots of {} (cmdline: {ember_cmdline})",
            n,
            opts.guest.kernel.display()
        );
        merged.write(path, &title)?;
        notes.push(format!(
            "guest profile of {n} boots ({} samples): {} (folded stacks: {})",
            merged.total(),
            path.display(),
            crate::profiler::folded_path(path).display()
        ));
    }
    runner::remove_workdir(&workdir);

    for r in records
        .iter()
        .filter(|r| r.vmm == "ember" && r.error.is_none() && !opts.setup_only)
    {
        let problems = report::order_problems(&report::milestones(r));
        if !problems.is_empty() {
            notes.push(format!(
                "ember #{}: phases out of order: {}",
                r.run,
                problems.join("; ")
            ));
        }
    }
    for r in records.iter().filter(|r| r.error.is_some()) {
        notes.push(format!(
            "{} #{} failed: {}",
            r.vmm,
            r.run,
            r.error.as_deref().unwrap_or_default()
        ));
    }
    if records
        .iter()
        .any(|r| r.error.is_none() && r.marker_ns.is_none() && !opts.setup_only)
    {
        notes.push(format!(
            "some runs never printed the marker {:?} (set it with --marker)",
            opts.marker
        ));
    }

    let mut names = vec!["ember".to_string()];
    names.extend(peers.iter().map(|p| p.kind.name().to_string()));
    let summaries = names
        .iter()
        .map(|n| report::summarize_vmm(n, &records))
        .collect();
    Ok(BenchResults {
        records,
        summaries,
        notes,
        cmdlines: (ember_cmdline, peer_cmdline),
        wall: started.elapsed(),
        options: opts.clone(),
    })
}

/// Runs `jobs` (each with its context among `ctxs`), `parallel` at a time, calling
/// `on_progress` as they start and end; the records in bench order.
pub(crate) fn run_all(
    ctxs: &[RunContext],
    jobs: Vec<Job>,
    parallel: usize,
    on_progress: &mut dyn FnMut(&Progress, usize, usize),
) -> Vec<RunRecord> {
    let total = jobs.len();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let worker = s.spawn(|| runner::run_jobs(ctxs, jobs, parallel, &tx));
        let mut done = 0;
        while done < total {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(p) => {
                    if matches!(p, Progress::Finished(_)) {
                        done += 1;
                    }
                    on_progress(&p, done, total);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        worker.join().unwrap_or_default()
    })
}

impl BenchResults {
    /// The header line of the tables.
    pub fn header(&self) -> String {
        let g = &self.options.guest;
        format!(
            "ember bench: {} x {} run(s), {} at a time, {} vCPU(s), {} MiB, kernel {}{}\n\
             cmdline: {}\nwall time {:.1} s",
            self.summaries.len(),
            self.options.runs,
            self.options.parallel,
            g.vcpus,
            g.mem_mib,
            g.kernel.display(),
            g.initrd
                .as_ref()
                .map(|i| format!(", initrd {}", i.display()))
                .unwrap_or_default(),
            self.cmdlines.0,
            self.wall.as_secs_f64()
        )
    }

    /// The readable tables.
    pub fn render(&self) -> String {
        report::render(&self.summaries, &self.notes, &self.header())
    }

    /// Everything as JSON: options, host, every raw run, statistics and ratios.
    pub fn to_json(&self) -> Json {
        let g = &self.options.guest;
        let ember = self.summaries.iter().find(|s| s.vmm == "ember");
        let ratios = Json::obj(
            self.summaries
                .iter()
                .filter(|s| s.vmm != "ember")
                .filter_map(|p| ember.map(|e| (p.vmm.clone(), report::ratios_json(e, p)))),
        );
        Json::obj([
            ("format", Json::from("ember-bench/1")),
            ("host", host_json()),
            (
                "config",
                Json::obj([
                    ("kernel", Json::from(g.kernel.display().to_string())),
                    (
                        "initrd",
                        Json::from(g.initrd.as_ref().map(|i| i.display().to_string())),
                    ),
                    ("disks", Json::from(g.disks.clone())),
                    ("cmdline_ember", Json::from(self.cmdlines.0.as_str())),
                    ("cmdline_peers", Json::from(self.cmdlines.1.as_str())),
                    ("vcpus", Json::from(g.vcpus)),
                    ("mem_mib", Json::from(g.mem_mib)),
                    ("runs", Json::from(self.options.runs as u64)),
                    ("parallel", Json::from(self.options.parallel as u64)),
                    ("marker", Json::from(self.options.marker.as_str())),
                    ("compare", Json::from(self.options.compare.clone())),
                ]),
            ),
            ("wall_s", Json::from(self.wall.as_secs_f64())),
            ("notes", Json::from(self.notes.clone())),
            (
                "runs",
                Json::Arr(self.records.iter().map(report::run_json).collect()),
            ),
            (
                "summary",
                Json::obj(
                    self.summaries
                        .iter()
                        .map(|s| (s.vmm.clone(), report::summary_to_json(s))),
                ),
            ),
            ("ratios", ratios),
        ])
    }

    /// Writes [`to_json`](Self::to_json) to `path`.
    pub fn write_json(&self, path: &std::path::Path) -> Result<(), BenchError> {
        std::fs::write(path, self.to_json().to_pretty()).map_err(|source| BenchError::WriteJson {
            path: path.to_path_buf(),
            source,
        })
    }
}
