// SPDX-License-Identifier: Apache-2.0
//! `ember bench --ab`: two configurations of ember, A and B, booted alternately in one
//! bench, and for each figure whether B differs from A beyond the host's noise.
//!
//! - A is what the usual flags describe; B is A with the `--b-*` overrides (kernel, initrd,
//!   command line, ember binary, ACPI, memory, vCPUs). Each side is an ordinary bench
//!   [`RunContext`]: the same child `ember run --bench-report`, the same host-side watch.
//! - Runs go in ABBA order (A B B A A B B A ...), so that a slow drift of the host (another
//!   build starting, a thermal change) weighs on both sides alike; `--runs` is per side.
//! - Each figure of [`AB_METRICS`] is compared over the successful runs that have it:
//!   medians, means, the relative change of the mean and the two-sided p-value of a
//!   permutation test ([`stats::compare_samples`]); the verdict names a change only when
//!   `p <` [`stats::AB_ALPHA`] and the change is at least [`stats::AB_NOISE`].
//! - A failed run is listed and left out; the bench fails only when a side has fewer than
//!   [`MIN_OK_RUNS`] successful runs.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::json::Json;
use super::peers::GuestSpec;
use super::report::{self, VmmSummary};
use super::runner::{self, Job, Progress, RunContext, RunRecord, Target};
use super::stats::{self, Comparison, MetricKind, Summary};
use super::{BenchError, BenchOptions};

/// Runs per side when `--ab` is given without `--runs`: the fewest with which a permutation
/// test can reach p < 0.01 (2 / C(10, 5) = 0.0079).
pub const DEFAULT_AB_RUNS: usize = 5;

/// Successful runs each side needs for a comparison.
pub const MIN_OK_RUNS: usize = 2;

/// One side of an A/B bench.
#[derive(Debug, Clone, PartialEq)]
pub struct AbSide {
    /// Its name in reports (`A`, `B`, or `--a-name`/`--b-name`).
    pub name: String,
    /// The guest it boots (its command line as ember gets it).
    pub guest: GuestSpec,
    /// The ember binary it runs (`None`: this one).
    pub ember_bin: Option<PathBuf>,
    /// Give the guest ACPI tables.
    pub acpi: bool,
}

/// The two sides of `ember bench --ab`.
#[derive(Debug, Clone, PartialEq)]
pub struct AbOptions {
    /// A: what the usual flags describe.
    pub a: AbSide,
    /// B: A with the `--b-*` overrides.
    pub b: AbSide,
}

impl AbOptions {
    /// A and B.
    pub fn sides(&self) -> [&AbSide; 2] {
        [&self.a, &self.b]
    }

    /// What B changes against A (`kernel`, `cmdline`, ...); empty for an A/A bench.
    pub fn differences(&self) -> Vec<&'static str> {
        let (a, b) = (&self.a, &self.b);
        let mut d = Vec::new();
        if a.ember_bin != b.ember_bin {
            d.push("ember binary");
        }
        if a.guest.kernel != b.guest.kernel {
            d.push("kernel");
        }
        if a.guest.initrd != b.guest.initrd {
            d.push("initrd");
        }
        if a.guest.cmdline != b.guest.cmdline {
            d.push("cmdline");
        }
        if a.acpi != b.acpi {
            d.push("ACPI");
        }
        if a.guest.vcpus != b.guest.vcpus {
            d.push("vCPUs");
        }
        if a.guest.mem_mib != b.guest.mem_mib {
            d.push("memory");
        }
        d
    }
}

/// The sides of `runs` runs each in ABBA order: 0 for A, 1 for B (A B B A A B for 3).
pub fn abba_order(runs: usize) -> Vec<usize> {
    (0..runs)
        .flat_map(|pair| if pair % 2 == 0 { [0, 1] } else { [1, 0] })
        .collect()
}

/// A figure that A/B compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbMetric {
    /// Key: a milestone of [`report::milestones`] or a figure of [`report::metrics`].
    pub key: &'static str,
    /// Table label.
    pub label: &'static str,
    /// Unit.
    pub unit: &'static str,
    /// What it measures (the verdict's wording).
    pub kind: MetricKind,
}

const fn metric(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    kind: MetricKind,
) -> AbMetric {
    AbMetric {
        key,
        label,
        unit,
        kind,
    }
}

/// The figures compared, each where both sides have it.
pub const AB_METRICS: [AbMetric; 7] = [
    metric("marker", "marker line (host-seen)", "ms", MetricKind::Time),
    metric(
        "boot_timer",
        "boot timer (init started)",
        "ms",
        MetricKind::Time,
    ),
    metric("guest_end", "guest end", "ms", MetricKind::Time),
    metric(
        "first_kvm_run",
        "first KVM_RUN (VMM set-up)",
        "ms",
        MetricKind::Time,
    ),
    metric(
        "vcpu_cpu_to_boot_timer_ms",
        "vCPU CPU time to boot timer",
        "ms",
        MetricKind::Cpu,
    ),
    metric(
        "guest_touched_at_boot_timer_mib",
        "guest memory touched at boot timer",
        "MiB",
        MetricKind::Memory,
    ),
    metric("peak_rss_mib", "peak RSS", "MiB", MetricKind::Memory),
];

/// The value of `key` in one run: a milestone (ms since the spawn) or another figure.
pub fn metric_value(rec: &RunRecord, key: &str) -> Option<f64> {
    report::milestones(rec)
        .into_iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v)
        .or_else(|| {
            report::metrics(rec)
                .into_iter()
                .find(|m| m.0 == key)
                .and_then(|m| m.3)
        })
        .filter(|v| v.is_finite())
}

/// One compared figure: the samples of both sides and, where both have some, the test.
#[derive(Debug, Clone, PartialEq)]
pub struct AbRow {
    /// The figure.
    pub metric: AbMetric,
    /// A's samples (successful runs that have the figure), in run order.
    pub a: Vec<f64>,
    /// B's samples.
    pub b: Vec<f64>,
    /// The comparison; `None` when a side has no sample or too few successful runs.
    pub cmp: Option<Comparison>,
}

/// The outcome of an A/B bench.
#[derive(Debug, Clone)]
pub struct AbResults {
    /// Every run, in order; `vmm` is the side's name.
    pub records: Vec<RunRecord>,
    /// The sides' statistics (A, B), as the usual per-VMM tables.
    pub summaries: Vec<VmmSummary>,
    /// Successful runs of A and B.
    pub ok_runs: [usize; 2],
    /// Runs of A and B in all.
    pub all_runs: [usize; 2],
    /// The compared figures.
    pub rows: Vec<AbRow>,
    /// Notes for the reader.
    pub notes: Vec<String>,
    /// Wall time of the whole bench.
    pub wall: Duration,
    /// The options (each side's ember binary resolved).
    pub options: BenchOptions,
    /// The sides.
    pub ab: AbOptions,
}

/// Runs an A/B bench (`opts.ab` must be set), calling `on_progress` as runs start and end.
pub fn run_ab(
    opts: &BenchOptions,
    on_progress: &mut dyn FnMut(&Progress, usize, usize),
) -> Result<AbResults, BenchError> {
    let Some(ab) = &opts.ab else {
        return Err(BenchError::Usage("an A/B bench needs --ab".into()));
    };
    check_options(opts, ab)?;
    let started = Instant::now();
    let host = crate::host::HostInfo::detect();
    let this = std::env::current_exe().map_err(BenchError::Exe)?;
    let mut ab = ab.clone();
    for side in [&mut ab.a, &mut ab.b] {
        side.ember_bin = Some(
            side.ember_bin
                .clone()
                .or_else(|| opts.ember_bin.clone())
                .unwrap_or_else(|| this.clone()),
        );
    }
    let workdir = std::env::temp_dir().join(format!("ember-bench-ab-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|source| BenchError::Workdir {
        path: workdir.clone(),
        source,
    })?;
    let ctxs: Vec<RunContext> = ab
        .sides()
        .iter()
        .map(|side| {
            let mut ember_flags = Vec::new();
            if !opts.host_tuning {
                ember_flags.push("--no-host-tuning".to_string());
            }
            if !side.acpi {
                ember_flags.push("--no-acpi".to_string());
            }
            RunContext {
                ember_bin: side.ember_bin.clone().unwrap_or_else(|| this.clone()),
                guest: side.guest.clone(),
                ember_cmdline: side.guest.cmdline.clone(),
                ember_flags,
                marker: opts.marker.clone(),
                timeout: opts.timeout,
                workdir: workdir.clone(),
                profile: false,
                setup_only: false,
                name: Some(side.name.clone()),
            }
        })
        .collect();
    let mut per_side = [0usize; 2];
    let jobs = abba_order(opts.runs)
        .into_iter()
        .enumerate()
        .map(|(i, side)| {
            per_side[side] += 1;
            Job {
                target: Target::Ember,
                run: per_side[side],
                seq: i + 1,
                ctx: side,
            }
        })
        .collect();
    let records = super::run_all(&ctxs, jobs, opts.parallel, on_progress);
    runner::remove_workdir(&workdir);

    let mut notes = Vec::new();
    if opts.host_tuning {
        if let Some(sw) = host.cmdline_switches() {
            notes.push(format!(
                "PVM host: ember adds `{sw}` to both command lines itself (not shown above)"
            ));
        }
    }
    let mut options = opts.clone();
    options.ab = Some(ab.clone());
    Ok(analyze(options, ab, records, notes, started.elapsed()))
}

/// Refuses options an A/B bench cannot honour.
fn check_options(opts: &BenchOptions, ab: &AbOptions) -> Result<(), BenchError> {
    if opts.runs == 0 || opts.parallel == 0 {
        return Err(BenchError::Usage(
            "--runs and --parallel must be at least 1".into(),
        ));
    }
    let mut with = Vec::new();
    if !opts.compare.is_empty() {
        with.push("--compare");
    }
    if opts.snapshot.is_some() {
        with.push("--snapshot");
    }
    if opts.setup_only {
        with.push("--setup-only");
    }
    if opts.profile.is_some() {
        with.push("--profile");
    }
    if !with.is_empty() {
        return Err(BenchError::Usage(format!(
            "--ab compares two ember configurations and cannot be combined with {}",
            with.join(", ")
        )));
    }
    let (a, b) = (ab.a.name.trim(), ab.b.name.trim());
    if a.is_empty() || b.is_empty() || a == b {
        return Err(BenchError::Usage(format!(
            "the two sides need two different, non-empty names (--a-name {a:?}, --b-name {b:?})"
        )));
    }
    Ok(())
}

/// The last non-empty line of a failed run's output, for its note.
fn last_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).rev().find(|l| !l.is_empty())
}

/// Statistics and notes of finished A/B runs (`records` named after the sides).
pub fn analyze(
    options: BenchOptions,
    ab: AbOptions,
    records: Vec<RunRecord>,
    mut notes: Vec<String>,
    wall: Duration,
) -> AbResults {
    let names = [ab.a.name.as_str(), ab.b.name.as_str()];
    let side_runs = |i: usize| records.iter().filter(move |r| r.vmm == names[i]);
    let all_runs = [side_runs(0).count(), side_runs(1).count()];
    let ok_runs = [
        side_runs(0).filter(|r| r.error.is_none()).count(),
        side_runs(1).filter(|r| r.error.is_none()).count(),
    ];
    let enough = ok_runs.iter().all(|&n| n >= MIN_OK_RUNS);

    let samples = |i: usize, key: &str| -> Vec<f64> {
        side_runs(i)
            .filter(|r| r.error.is_none())
            .filter_map(|r| metric_value(r, key))
            .collect()
    };
    let mut missing = Vec::new();
    let rows: Vec<AbRow> = AB_METRICS
        .iter()
        .filter_map(|m| {
            let (a, b) = (samples(0, m.key), samples(1, m.key));
            if a.is_empty() || b.is_empty() {
                if ok_runs.iter().all(|&n| n > 0) {
                    missing.push(format!(
                        "{} ({} has {}, {} has {} sample(s))",
                        m.label,
                        names[0],
                        a.len(),
                        names[1],
                        b.len()
                    ));
                }
                return None;
            }
            let cmp = if enough {
                stats::compare_samples(&a, &b)
            } else {
                None
            };
            Some(AbRow {
                metric: *m,
                a,
                b,
                cmp,
            })
        })
        .collect();
    if !missing.is_empty() {
        notes.push(format!(
            "not compared (not measured on both sides): {}",
            missing.join("; ")
        ));
    }
    for r in records.iter().filter(|r| r.error.is_none()) {
        let problems = report::order_problems(&report::milestones(r));
        if !problems.is_empty() {
            notes.push(format!(
                "{} #{}: phases out of order: {}",
                r.vmm,
                r.run,
                problems.join("; ")
            ));
        }
    }
    for r in records.iter().filter(|r| r.error.is_some()) {
        notes.push(format!(
            "{} #{} failed: {}{}",
            r.vmm,
            r.run,
            r.error.as_deref().unwrap_or_default(),
            last_line(&r.output_tail)
                .map(|l| format!(" (last output: {l:?})"))
                .unwrap_or_default()
        ));
    }
    if records
        .iter()
        .any(|r| r.error.is_none() && r.marker_ns.is_none())
    {
        notes.push(format!(
            "some runs never printed the marker {:?} (set it with --marker)",
            options.marker
        ));
    }
    if ab.differences().is_empty() {
        notes.push(format!(
            "{} and {} are the same configuration: an A/A bench, which shows the noise",
            names[0], names[1]
        ));
    }
    let summaries = names
        .iter()
        .map(|n| report::summarize_runs(n, &records, true))
        .collect();
    AbResults {
        records,
        summaries,
        ok_runs,
        all_runs,
        rows,
        notes,
        wall,
        options,
        ab,
    }
}

/// `A B B A A B B A ...`: the first runs of `order` by side name.
fn order_text(order: &[usize], names: [&str; 2]) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<&str> = order.iter().take(SHOWN).map(|&i| names[i]).collect();
    if order.len() > SHOWN {
        s.push("...");
    }
    s.join(" ")
}

impl AbResults {
    /// The side names, A first.
    pub fn names(&self) -> [&str; 2] {
        [self.ab.a.name.as_str(), self.ab.b.name.as_str()]
    }

    /// Whether both sides have enough successful runs for a comparison.
    pub fn comparable(&self) -> bool {
        self.ok_runs.iter().all(|&n| n >= MIN_OK_RUNS)
    }

    /// The side names in the order they ran.
    pub fn run_order(&self) -> Vec<&str> {
        self.records.iter().map(|r| r.vmm.as_str()).collect()
    }

    /// What A and B are: ember binary, guest, command line; what B changes.
    pub fn header(&self) -> String {
        let names = self.names();
        let o = &self.options;
        let mut out = format!(
            "ember bench --ab: {} against {}, {} run(s) each in ABBA order ({}), {} at a time; \
             wall time {:.1} s",
            names[0],
            names[1],
            o.runs,
            order_text(&abba_order(o.runs), names),
            o.parallel,
            self.wall.as_secs_f64()
        );
        for side in self.ab.sides() {
            let g = &side.guest;
            let _ = write!(
                out,
                "\n{}: ember {}\n   kernel {}, initrd {}, {} vCPU(s), {} MiB, ACPI {}\n   \
                 cmdline: {}",
                side.name,
                side.ember_bin
                    .as_ref()
                    .map_or("(this binary)".into(), |p| p.display().to_string()),
                g.kernel.display(),
                g.initrd
                    .as_ref()
                    .map_or("none".into(), |i| i.display().to_string()),
                g.vcpus,
                g.mem_mib,
                if side.acpi { "on" } else { "off" },
                g.cmdline
            );
        }
        let d = self.ab.differences();
        let _ = write!(
            out,
            "\n{} differs from {} in: {}",
            names[1],
            names[0],
            if d.is_empty() {
                "nothing (A/A)".to_string()
            } else {
                d.join(", ")
            }
        );
        out
    }

    /// The comparison table (or why there is none).
    pub fn comparison(&self) -> String {
        let names = self.names();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n== {} against {} ({} of {} and {} of {} runs succeeded)\nchange: {}'s mean \
             against {}'s; p: permutation test, two-sided; a change counts when p < {} and \
             |change| >= {} %",
            names[1],
            names[0],
            self.ok_runs[0],
            self.all_runs[0],
            self.ok_runs[1],
            self.all_runs[1],
            names[1],
            names[0],
            stats::AB_ALPHA,
            stats::AB_NOISE * 100.0
        );
        if !self.comparable() {
            let _ = writeln!(
                out,
                "no comparison: each side needs at least {MIN_OK_RUNS} successful runs; {} \
                 (the failures are listed under notes)",
                names
                    .iter()
                    .zip(self.ok_runs)
                    .filter(|(_, n)| *n < MIN_OK_RUNS)
                    .map(|(s, n)| format!("{s} had {n}"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            );
            return out;
        }
        let min_p = stats::min_two_sided_p(self.ok_runs[0], self.ok_runs[1]);
        if min_p >= stats::AB_ALPHA {
            let _ = writeln!(
                out,
                "with {} and {} successful runs the smallest p-value a permutation test can give \
                 is {}: p < {} cannot be reached, so no change can count; an exact test needs \
                 at least 5 runs per side (--runs 5)",
                self.ok_runs[0],
                self.ok_runs[1],
                stats::fmt_p(min_p),
                stats::AB_ALPHA
            );
        }
        let (ma, mb) = (
            format!("{} median", names[0]),
            format!("{} median", names[1]),
        );
        let _ = writeln!(
            out,
            "{:<40} {:>7} {:>11} {:>11} {:>8} {:>8}  verdict",
            "", "n", ma, mb, "change", "p"
        );
        for row in &self.rows {
            let Some(c) = &row.cmp else { continue };
            let _ = writeln!(
                out,
                "{:<40} {:>7} {:>11} {:>11} {:>8} {:>8}  {}",
                format!("{}, {}", row.metric.label, row.metric.unit),
                format!("{}/{}", row.a.len(), row.b.len()),
                format!("{:.2}", c.a.median),
                format!("{:.2}", c.b.median),
                c.change_pct
                    .map_or_else(|| "-".into(), |x| format!("{x:+.1} %")),
                stats::fmt_p(c.test.p),
                c.verdict(row.metric.kind, names[1])
            );
        }
        out
    }

    /// The readable report: header, comparison, then each side's usual tables and notes.
    pub fn render(&self) -> String {
        let head = format!("{}\n{}", self.header(), self.comparison());
        report::render(&self.summaries, &self.notes, head.trim_end())
    }

    /// Everything as JSON: both configurations, every raw run and sample, the statistics.
    pub fn to_json(&self) -> Json {
        let names = self.names();
        let o = &self.options;
        let side_json = |s: &AbSide| {
            let g = &s.guest;
            Json::obj([
                ("name", Json::from(s.name.as_str())),
                (
                    "ember",
                    Json::from(s.ember_bin.as_ref().map(|p| p.display().to_string())),
                ),
                ("kernel", Json::from(g.kernel.display().to_string())),
                (
                    "initrd",
                    Json::from(g.initrd.as_ref().map(|i| i.display().to_string())),
                ),
                ("disks", Json::from(g.disks.clone())),
                ("cmdline", Json::from(g.cmdline.as_str())),
                ("vcpus", Json::from(g.vcpus)),
                ("mem_mib", Json::from(g.mem_mib)),
                ("acpi", Json::from(s.acpi)),
            ])
        };
        let summary = |s: Option<Summary>| {
            s.map_or(Json::Null, |s| {
                Json::obj([
                    ("n", Json::from(s.n as u64)),
                    ("min", Json::from(s.min)),
                    ("median", Json::from(s.median)),
                    ("p90", Json::from(s.p90)),
                    ("max", Json::from(s.max)),
                ])
            })
        };
        let comparison = Json::obj(self.rows.iter().map(|row| {
            let c = row.cmp.as_ref();
            (
                row.metric.key,
                Json::obj([
                    ("label", Json::from(row.metric.label)),
                    ("unit", Json::from(row.metric.unit)),
                    ("n_a", Json::from(row.a.len() as u64)),
                    ("n_b", Json::from(row.b.len() as u64)),
                    ("a", summary(c.map(|c| c.a))),
                    ("b", summary(c.map(|c| c.b))),
                    ("mean_a", Json::from(c.map(|c| c.mean_a))),
                    ("mean_b", Json::from(c.map(|c| c.mean_b))),
                    ("change_pct", Json::from(c.and_then(|c| c.change_pct))),
                    ("p", Json::from(c.map(|c| c.test.p))),
                    ("test", Json::from(c.map(|c| c.test.method.name()))),
                    ("permutations", Json::from(c.map(|c| c.test.permutations))),
                    ("p_passes", Json::from(c.map(Comparison::p_passes))),
                    (
                        "threshold_passes",
                        Json::from(c.map(Comparison::threshold_passes)),
                    ),
                    (
                        "significant",
                        Json::from(c.is_some_and(Comparison::significant)),
                    ),
                    (
                        "verdict",
                        Json::from(c.map(|c| c.verdict(row.metric.kind, names[1]))),
                    ),
                ]),
            )
        }));
        let samples = Json::obj(self.rows.iter().map(|row| {
            (
                row.metric.key,
                Json::obj([
                    ("a", Json::from(row.a.clone())),
                    ("b", Json::from(row.b.clone())),
                ]),
            )
        }));
        let runs = self.records.iter().map(|r| {
            // The run as the usual bench writes it, its VMM named as its side.
            let mut j = report::run_json(r);
            if let Json::Obj(members) = &mut j {
                for (k, _) in members.iter_mut() {
                    if k == "vmm" {
                        *k = "side".into();
                    }
                }
            }
            j
        });
        let pair = |v: [usize; 2]| {
            Json::obj([
                ("a", Json::from(v[0] as u64)),
                ("b", Json::from(v[1] as u64)),
            ])
        };
        Json::obj([
            ("format", Json::from("ember-bench-ab/1")),
            ("host", super::host_json()),
            (
                "config",
                Json::obj([
                    ("a", side_json(&self.ab.a)),
                    ("b", side_json(&self.ab.b)),
                    ("differences", Json::from(self.ab.differences())),
                    ("runs_per_side", Json::from(o.runs as u64)),
                    ("parallel", Json::from(o.parallel as u64)),
                    ("order", Json::from("ABBA")),
                    ("marker", Json::from(o.marker.as_str())),
                    ("host_tuning", Json::from(o.host_tuning)),
                    ("alpha", Json::from(stats::AB_ALPHA)),
                    ("noise_threshold", Json::from(stats::AB_NOISE)),
                    ("exact_limit", Json::from(stats::EXACT_LIMIT)),
                    (
                        "monte_carlo_permutations",
                        Json::from(stats::MC_PERMUTATIONS),
                    ),
                    (
                        "monte_carlo_seed",
                        Json::from(format!("{:#018x}", stats::MC_SEED)),
                    ),
                ]),
            ),
            ("wall_s", Json::from(self.wall.as_secs_f64())),
            ("notes", Json::from(self.notes.clone())),
            ("run_order", Json::from(self.run_order())),
            ("ok_runs", pair(self.ok_runs)),
            (
                "failed_runs",
                pair([0, 1].map(|i| self.all_runs[i] - self.ok_runs[i])),
            ),
            ("comparable", Json::from(self.comparable())),
            ("runs", Json::Arr(runs.collect())),
            ("samples", samples),
            ("comparison", comparison),
            (
                "summary",
                Json::obj([
                    ("a", report::summary_to_json(&self.summaries[0])),
                    ("b", report::summary_to_json(&self.summaries[1])),
                ]),
            ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::procfs::{ChildExit, CpuTime};

    fn guest(kernel: &str) -> GuestSpec {
        GuestSpec {
            kernel: kernel.into(),
            initrd: None,
            disks: vec![],
            root: None,
            root_cmdline: None,
            cmdline: "console=ttyS0 ember.cmd=true".into(),
            vcpus: 1,
            mem_mib: 128,
            acpi: true,
            rng: true,
        }
    }

    fn options(runs: usize) -> (BenchOptions, AbOptions) {
        let side = |name: &str, kernel: &str| AbSide {
            name: name.into(),
            guest: guest(kernel),
            ember_bin: Some("/usr/bin/ember".into()),
            acpi: true,
        };
        let ab = AbOptions {
            a: side("A", "/k/a"),
            b: side("B", "/k/b"),
        };
        let opts = BenchOptions {
            guest: ab.a.guest.clone(),
            runs,
            parallel: 1,
            compare: vec![],
            marker: "ember-init:".into(),
            timeout: Duration::from_secs(60),
            profile: None,
            host_tuning: true,
            ember_bin: None,
            setup_only: false,
            acpi: true,
            snapshot: None,
            ab: Some(ab.clone()),
        };
        (opts, ab)
    }

    /// A successful run of `side` seen from outside only: marker at `marker_ms`, peak RSS.
    fn record(side: &str, run: usize, seq: usize, marker_ms: f64, rss_mib: u64) -> RunRecord {
        let spawn = 1_000_000_000u64;
        RunRecord {
            vmm: side.into(),
            run,
            seq,
            spawn_ns: spawn,
            exit: Some(ChildExit {
                code: Some(0),
                signal: None,
                cpu: CpuTime {
                    user_us: 1000,
                    sys_us: 2000,
                },
                max_rss: rss_mib << 20,
                at_ns: spawn + 30_000_000_000,
            }),
            marker_ns: Some(spawn + (marker_ms * 1e6) as u64),
            ..Default::default()
        }
    }

    #[test]
    fn runs_alternate_in_abba_order() {
        let s = |o: Vec<usize>| o.iter().map(|&i| ["A", "B"][i]).collect::<String>();
        assert_eq!(s(abba_order(1)), "AB");
        assert_eq!(s(abba_order(3)), "ABBAAB");
        assert_eq!(s(abba_order(5)), "ABBAABBAAB");
        let o = abba_order(7);
        assert_eq!(o.iter().filter(|&&i| i == 0).count(), 7);
        assert_eq!(o.len(), 14);
        assert_eq!(
            order_text(&abba_order(5), ["A", "B"]),
            "A B B A A B B A ..."
        );
        assert_eq!(
            order_text(&abba_order(2), ["old", "new"]),
            "old new new old"
        );
    }

    #[test]
    fn failed_runs_are_left_out_and_listed() {
        let (opts, ab) = options(5);
        // B boots 10 % later; B's run #2 crashed and #4 timed out.
        let mut records = Vec::new();
        for (seq, side) in abba_order(5).into_iter().enumerate() {
            let name = ["A", "B"][side];
            let run = records
                .iter()
                .filter(|r: &&RunRecord| r.vmm == name)
                .count()
                + 1;
            let base = [20_000.0, 22_000.0][side];
            let mut r = record(name, run, seq + 1, base + run as f64 * 10.0, 40);
            if side == 1 && (run == 2 || run == 4) {
                r.error = Some("exited with status 3".into());
                r.output_tail = "boot\nember: the guest triple-faulted\n\n".into();
            }
            records.push(r);
        }
        let res = analyze(opts, ab, records, vec![], Duration::from_secs(1));
        assert_eq!(res.ok_runs, [5, 3]);
        assert_eq!(res.all_runs, [5, 5]);
        assert!(res.comparable());
        assert_eq!(res.run_order().concat(), "ABBAABBAAB");
        let marker = res.rows.iter().find(|r| r.metric.key == "marker").unwrap();
        assert_eq!((marker.a.len(), marker.b.len()), (5, 3));
        let c = marker.cmp.as_ref().unwrap();
        // 5 against 3, fully apart: only the observed split is as far out, 1 of C(8, 3) = 56.
        assert!((c.test.p - 1.0 / 56.0).abs() < 1e-12, "{c:?}");
        assert!(c.threshold_passes() && !c.p_passes());
        // Peak RSS is the same everywhere: p = 1.
        let rss = res
            .rows
            .iter()
            .find(|r| r.metric.key == "peak_rss_mib")
            .unwrap();
        assert_eq!(rss.cmp.as_ref().unwrap().test.p, 1.0);
        // Figures no run has are not rows (these records have no ember report).
        assert!(res.rows.iter().all(|r| r.metric.key != "boot_timer"));
        let text = res.render();
        assert!(
            text.contains("== B against A (5 of 5 and 3 of 5 runs succeeded)"),
            "{text}"
        );
        assert!(
            text.contains("B #2 failed: exited with status 3 (last output: \"ember: the guest triple-faulted\")"),
            "{text}"
        );
        assert!(text.contains("B #4 failed"), "{text}");
        assert!(text.contains("p < 0.01 cannot be reached"), "{text}");
        assert!(
            text.contains("no significant change (p = 0.0179 >= 0.01)"),
            "{text}"
        );
        assert!(text.contains("B differs from A in: kernel"), "{text}");
        assert!(text.contains("== A (5 runs, 0 failed)"), "{text}");
        assert!(text.contains("== B (5 runs, 2 failed)"), "{text}");
        let j = res.to_json();
        assert_eq!(
            j.get("failed_runs")
                .and_then(|f| f.get("b"))
                .and_then(Json::as_u64),
            Some(2)
        );
        let runs = j.get("runs").and_then(Json::as_array).unwrap();
        assert_eq!(runs[1].get("side").and_then(Json::as_str), Some("B"));
        assert_eq!(runs[1].get("vmm"), None);
    }

    #[test]
    fn a_side_with_fewer_than_two_good_runs_is_not_compared() {
        let (opts, ab) = options(2);
        let mut records = vec![
            record("A", 1, 1, 100.0, 40),
            record("B", 1, 2, 100.0, 40),
            record("B", 2, 3, 100.0, 40),
            record("A", 2, 4, 100.0, 40),
        ];
        records[0].error = Some("did not end within 600 s; killed (raise --timeout?)".into());
        let res = analyze(opts, ab, records, vec![], Duration::from_secs(1));
        assert_eq!(res.ok_runs, [1, 2]);
        assert!(!res.comparable());
        assert!(res.rows.iter().all(|r| r.cmp.is_none()));
        let text = res.render();
        assert!(
            text.contains("no comparison: each side needs at least 2 successful runs; A had 1"),
            "{text}"
        );
        assert!(text.contains("A had 1"), "{text}");
        assert!(
            text.contains("A #1 failed: did not end within 600 s"),
            "{text}"
        );
        assert_eq!(res.to_json().get("comparable"), Some(&Json::Bool(false)));
    }

    #[test]
    fn differences_and_bad_options() {
        let (mut opts, mut ab) = options(3);
        assert_eq!(ab.differences(), ["kernel"]);
        ab.b.acpi = false;
        ab.b.guest.cmdline.push_str(" quiet");
        ab.b.ember_bin = Some("/old/ember".into());
        assert_eq!(
            ab.differences(),
            ["ember binary", "kernel", "cmdline", "ACPI"]
        );
        ab.b = ab.a.clone();
        ab.b.name = "B".into();
        assert!(ab.differences().is_empty());
        let res = analyze(opts.clone(), ab.clone(), vec![], vec![], Duration::ZERO);
        assert!(
            res.notes.iter().any(|n| n.contains("an A/A bench")),
            "{:?}",
            res.notes
        );

        let err = |o: &BenchOptions, ab: &AbOptions| check_options(o, ab).unwrap_err().to_string();
        assert!(check_options(&opts, &ab).is_ok());
        opts.compare = vec!["qemu".into()];
        opts.setup_only = true;
        assert_eq!(
            err(&opts, &ab),
            "--ab compares two ember configurations and cannot be combined with --compare, \
             --setup-only"
        );
        let (opts, mut ab) = options(3);
        ab.b.name = "A".into();
        assert!(err(&opts, &ab).contains("two different, non-empty names"));
        ab.b.name = " ".into();
        assert!(err(&opts, &ab).contains("two different, non-empty names"));
    }
}
