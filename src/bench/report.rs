// SPDX-License-Identifier: Apache-2.0
//! From run records to what `ember bench` reports: boot milestones of each run in
//! milliseconds since its process was spawned, their statistics per VMM, the side-by-side
//! ratios, the readable tables and the JSON document with every raw sample.

use std::fmt::Write as _;

use super::json::Json;
use super::runner::RunRecord;
use super::stats::{ratio, summarize, Summary};

/// A boot milestone: key (JSON name) and label (table row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Milestone {
    /// JSON key.
    pub key: &'static str,
    /// Table label.
    pub label: &'static str,
}

const fn m(key: &'static str, label: &'static str) -> Milestone {
    Milestone { key, label }
}

/// ember's milestones, in boot order (times since the process was spawned).
pub const EMBER_MILESTONES: [Milestone; 9] = [
    m("main", "process start -> main()"),
    m("vm_created", "VM created"),
    m("memory_mapped", "memory mapped"),
    m("kernel_loaded", "kernel loaded"),
    m("first_kvm_run", "first KVM_RUN (VMM set-up)"),
    m("first_serial_byte", "first guest serial byte"),
    m("boot_timer", "boot timer (init started)"),
    m("guest_end", "guest end"),
    m("process_exit", "process exit"),
];

/// Milestones the host sees from outside, for every VMM (the basis of the comparison).
pub const HOST_SEEN: [Milestone; 4] = [
    m("console_first_byte", "first console byte (host-seen)"),
    m("boot_timer", "boot timer (init started)"),
    m("marker", "marker line (host-seen)"),
    m("process_exit", "process exit"),
];

/// The milestones that must come in this order in every successful ember run (the first
/// serial byte is not among them: with `quiet` the kernel may print nothing before init).
pub const EMBER_ORDER: [&str; 8] = [
    "main",
    "vm_created",
    "memory_mapped",
    "kernel_loaded",
    "first_kvm_run",
    "boot_timer",
    "guest_end",
    "process_exit",
];

fn ms_since(spawn_ns: u64, at_ns: u64) -> f64 {
    (at_ns as f64 - spawn_ns as f64) / 1e6
}

/// Milliseconds since the spawn of every milestone of `rec` (`None`: not reached or not
/// measurable for this VMM).
pub fn milestones(rec: &RunRecord) -> Vec<(&'static str, Option<f64>)> {
    let at = |ns: Option<u64>| ns.map(|n| ms_since(rec.spawn_ns, n));
    let mut out = Vec::new();
    if let Some(r) = &rec.report {
        let phase = |k: &str| {
            r.get("phases_ns")
                .and_then(|p| p.get(k))
                .and_then(Json::as_u64)
        };
        out.push(("main", at(r.get("main_ns").and_then(Json::as_u64))));
        for mi in &EMBER_MILESTONES[1..8] {
            out.push((mi.key, at(phase(mi.key))));
        }
    } else {
        out.push(("boot_timer", at(rec.peer_boot_timer_ns)));
    }
    out.push(("process_exit", at(rec.exit.map(|e| e.at_ns))));
    out.push(("console_first_byte", at(rec.console_first_ns)));
    out.push(("marker", at(rec.marker_ns)));
    out
}

/// Milestones of `EMBER_ORDER` that are missing or come before the one preceding them, and
/// a first serial byte outside first KVM_RUN..guest end: empty for a sound ember run.
pub fn order_problems(ms: &[(&'static str, Option<f64>)]) -> Vec<String> {
    let get = |k: &str| ms.iter().find(|(n, _)| *n == k).and_then(|(_, v)| *v);
    let mut problems = Vec::new();
    let mut prev: Option<(&str, f64)> = None;
    for k in EMBER_ORDER {
        match get(k) {
            None => problems.push(format!("{k} missing")),
            Some(v) => {
                if let Some((pk, pv)) = prev {
                    if v < pv {
                        problems.push(format!("{k} ({v:.3} ms) before {pk} ({pv:.3} ms)"));
                    }
                }
                prev = Some((k, v));
            }
        }
    }
    match (
        get("first_kvm_run"),
        get("first_serial_byte"),
        get("guest_end"),
    ) {
        (Some(a), Some(b), Some(c)) if !(a <= b && b <= c) => {
            problems.push(format!(
                "first_serial_byte ({b:.3} ms) outside first_kvm_run..guest_end"
            ));
        }
        (_, None, _) => problems.push("first_serial_byte missing".into()),
        _ => {}
    }
    problems
}

/// Per-run figures other than milestones: `(key, label, unit, value)`.
pub fn metrics(rec: &RunRecord) -> Vec<(&'static str, &'static str, &'static str, Option<f64>)> {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut out = Vec::new();
    if let Some(r) = &rec.report {
        let num = |path: &[&str]| {
            let mut v = r;
            for k in path {
                v = v.get(k)?;
            }
            v.as_f64()
        };
        for (k, label) in [
            ("io", "KVM exits: port I/O"),
            ("mmio", "KVM exits: MMIO"),
            ("hlt", "KVM exits: HLT"),
            ("intr", "KVM exits: signal (kick/profiler)"),
            ("other", "KVM exits: other"),
            ("unhandled", "accesses to no device"),
        ] {
            out.push((k, label, "", num(&["exits", k])));
        }
        let sum = |a: &str, b: &str| Some((num(&["cpu_us", a])? + num(&["cpu_us", b])?) / 1000.0);
        out.push((
            "vmm_cpu_ms",
            "VMM threads CPU (user+sys)",
            "ms",
            sum("vmm_user", "vmm_sys"),
        ));
        out.push((
            "vcpu_user_ms",
            "vCPU threads CPU, user",
            "ms",
            num(&["cpu_us", "vcpu_user"]).map(|v| v / 1000.0),
        ));
        out.push((
            "vcpu_sys_ms",
            "vCPU threads CPU, sys (KVM_RUN)",
            "ms",
            num(&["cpu_us", "vcpu_sys"]).map(|v| v / 1000.0),
        ));
        out.push((
            "vcpu_cpu_to_boot_timer_ms",
            "vCPU CPU time to boot timer",
            "ms",
            num(&["cpu_us", "vcpu_at_boot_timer"]).map(|v| v / 1000.0),
        ));
        let at_bt = |k: &str| num(&["memory", "at_boot_timer", k]).map(|b| b / (1024.0 * 1024.0));
        out.push((
            "overhead_at_boot_timer_mib",
            "VMM RSS overhead at boot timer",
            "MiB",
            at_bt("overhead"),
        ));
        out.push((
            "guest_touched_at_boot_timer_mib",
            "guest memory touched at boot timer",
            "MiB",
            at_bt("guest_resident"),
        ));
        out.push((
            "guest_touched_at_end_mib",
            "guest memory touched at end",
            "MiB",
            num(&["memory", "at_end", "guest_resident"]).map(|b| b / (1024.0 * 1024.0)),
        ));
    }
    out.push((
        "cpu_to_marker_ms",
        "process CPU time to marker (host-seen)",
        "ms",
        rec.cpu_at_marker_ms,
    ));
    let cpu = rec
        .exit
        .map(|e| (e.cpu.user_us + e.cpu.sys_us) as f64 / 1000.0);
    out.push((
        "process_cpu_ms",
        "process CPU (user+sys, all threads)",
        "ms",
        cpu,
    ));
    out.push((
        "peak_rss_mib",
        "peak RSS",
        "MiB",
        rec.exit.map(|e| mib(e.max_rss)),
    ));
    out.push((
        "overhead_at_marker_mib",
        "RSS overhead at marker (host-seen)",
        "MiB",
        rec.mem_at_marker.map(|m| mib(m.overhead())),
    ));
    out
}

/// Statistics of one VMM's successful runs.
#[derive(Debug, Clone, Default)]
pub struct VmmSummary {
    /// VMM name.
    pub vmm: String,
    /// Runs in all.
    pub runs: usize,
    /// Runs that failed.
    pub failed: usize,
    /// Milestones: key, label, summary.
    pub milestones: Vec<(&'static str, &'static str, Option<Summary>)>,
    /// Other figures: key, label, unit, summary.
    pub metrics: Vec<(&'static str, &'static str, &'static str, Option<Summary>)>,
}

/// Summarizes the runs of `vmm` among `records` (failed runs are counted, not used).
pub fn summarize_vmm(vmm: &str, records: &[RunRecord]) -> VmmSummary {
    summarize_runs(vmm, records, vmm == "ember")
}

/// Summarizes the runs recorded under `name` among `records` (failed runs are counted, not
/// used), with ember's rows when `ember` (an `--ab` side is ember under another name).
pub fn summarize_runs(name: &str, records: &[RunRecord], ember: bool) -> VmmSummary {
    let vmm = name;
    let mine: Vec<&RunRecord> = records.iter().filter(|r| r.vmm == vmm).collect();
    let ok: Vec<&RunRecord> = mine.iter().copied().filter(|r| r.error.is_none()).collect();
    let rows: Vec<Milestone> = if ember {
        EMBER_MILESTONES
            .iter()
            .chain(
                HOST_SEEN
                    .iter()
                    .filter(|h| h.key == "console_first_byte" || h.key == "marker"),
            )
            .copied()
            .collect()
    } else {
        HOST_SEEN.to_vec()
    };
    let all_ms: Vec<Vec<(&str, Option<f64>)>> = ok.iter().map(|r| milestones(r)).collect();
    let milestones = rows
        .iter()
        .map(|mi| {
            let v: Vec<f64> = all_ms
                .iter()
                .filter_map(|ms| ms.iter().find(|(k, _)| *k == mi.key).and_then(|(_, v)| *v))
                .collect();
            (mi.key, mi.label, summarize(&v))
        })
        .collect();
    let all_metrics: Vec<_> = ok.iter().map(|r| metrics(r)).collect();
    let metrics = all_metrics
        .first()
        .map(|first| {
            first
                .iter()
                .map(|&(key, label, unit, _)| {
                    let v: Vec<f64> = all_metrics
                        .iter()
                        .filter_map(|m| m.iter().find(|x| x.0 == key).and_then(|x| x.3))
                        .collect();
                    (key, label, unit, summarize(&v))
                })
                .collect()
        })
        .unwrap_or_default();
    VmmSummary {
        vmm: vmm.to_string(),
        runs: mine.len(),
        failed: mine.len() - ok.len(),
        milestones,
        metrics,
    }
}

fn median_of(s: &VmmSummary, key: &str) -> Option<f64> {
    s.milestones
        .iter()
        .find(|m| m.0 == key)
        .and_then(|m| m.2)
        .map(|x| x.median)
        .or_else(|| {
            s.metrics
                .iter()
                .find(|m| m.0 == key)
                .and_then(|m| m.3)
                .map(|x| x.median)
        })
}

/// Comparable figures of ember and a peer: key, label, ember median, peer median, ratio
/// peer / ember.
pub type RatioRow = (
    &'static str,
    &'static str,
    Option<f64>,
    Option<f64>,
    Option<f64>,
);

/// What can be compared between ember and `peer`: host-seen milestones (and the boot timer
/// when the peer has one), RSS overhead at the marker, process CPU.
pub fn ratios(ember: &VmmSummary, peer: &VmmSummary) -> Vec<RatioRow> {
    let rows = [
        ("console_first_byte", "first console byte (host-seen), ms"),
        ("boot_timer", "boot timer (init started), ms"),
        ("marker", "marker line (host-seen), ms"),
        ("process_exit", "process exit, ms"),
        ("cpu_to_marker_ms", "CPU time to marker (load-robust), ms"),
        ("overhead_at_marker_mib", "RSS overhead at marker, MiB"),
        ("peak_rss_mib", "peak RSS, MiB"),
        ("process_cpu_ms", "process CPU (user+sys), ms"),
    ];
    rows.iter()
        .filter_map(|&(k, label)| {
            let (e, p) = (median_of(ember, k), median_of(peer, k));
            // A peer without the figure (no boot timer in QEMU) has no row.
            p.map(|p| (k, label, e, Some(p), e.and_then(|e| ratio(p, e))))
        })
        .collect()
}

/// Milestones shown without a step: they are not in boot order with the others (the first
/// serial byte comes after init with `quiet`; host-seen ones are a separate view).
fn off_chain(key: &str) -> bool {
    matches!(key, "console_first_byte" | "marker" | "first_serial_byte")
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

/// The readable tables for all `summaries` (ember first), with `notes`.
pub fn render(summaries: &[VmmSummary], notes: &[String], header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    for s in summaries {
        let _ = writeln!(out, "\n== {} ({} runs, {} failed)", s.vmm, s.runs, s.failed);
        let _ = writeln!(
            out,
            "{:<36} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "milestone (ms since spawn)", "min", "median", "p90", "max", "step"
        );
        let mut prev_median: Option<f64> = Some(0.0);
        for (key, label, sum) in &s.milestones {
            let step = match (sum, prev_median) {
                (Some(x), Some(p)) if !off_chain(key) => Some(x.median - p),
                _ => None,
            };
            if let (Some(x), false) = (sum, off_chain(key)) {
                prev_median = Some(x.median);
            }
            let _ = writeln!(
                out,
                "{:<36} {:>10} {:>10} {:>10} {:>10} {:>10}",
                label,
                fmt_opt(sum.map(|x| x.min), 2),
                fmt_opt(sum.map(|x| x.median), 2),
                fmt_opt(sum.map(|x| x.p90), 2),
                fmt_opt(sum.map(|x| x.max), 2),
                fmt_opt(step, 2),
            );
        }
        if !s.metrics.is_empty() {
            let _ = writeln!(
                out,
                "{:<36} {:>10} {:>10} {:>10} {:>10}",
                "per run", "min", "median", "p90", "max"
            );
            for (_, label, unit, sum) in &s.metrics {
                let label = if unit.is_empty() {
                    label.to_string()
                } else {
                    format!("{label}, {unit}")
                };
                let prec = if unit.is_empty() { 0 } else { 2 };
                let _ = writeln!(
                    out,
                    "{:<36} {:>10} {:>10} {:>10} {:>10}",
                    label,
                    fmt_opt(sum.map(|x| x.min), prec),
                    fmt_opt(sum.map(|x| x.median), prec),
                    fmt_opt(sum.map(|x| x.p90), prec),
                    fmt_opt(sum.map(|x| x.max), prec),
                );
            }
        }
    }
    if let Some(ember) = summaries.iter().find(|s| s.vmm == "ember") {
        for peer in summaries.iter().filter(|s| s.vmm != "ember") {
            let _ = writeln!(
                out,
                "\n== {} vs ember (medians; ratio = {} / ember)",
                peer.vmm, peer.vmm
            );
            let _ = writeln!(
                out,
                "{:<40} {:>12} {:>12} {:>8}",
                "", "ember", peer.vmm, "ratio"
            );
            for (_, label, e, p, r) in ratios(ember, peer) {
                let _ = writeln!(
                    out,
                    "{:<40} {:>12} {:>12} {:>8}",
                    label,
                    fmt_opt(e, 2),
                    fmt_opt(p, 2),
                    fmt_opt(r, 3)
                );
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\nnotes:");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

fn summary_json(s: Option<Summary>) -> Json {
    s.map_or(Json::Null, |s| {
        Json::obj([
            ("n", Json::from(s.n as u64)),
            ("min", Json::from(s.min)),
            ("median", Json::from(s.median)),
            ("p90", Json::from(s.p90)),
            ("max", Json::from(s.max)),
        ])
    })
}

/// One run as JSON: its milestones, figures, and ember's raw report.
pub fn run_json(rec: &RunRecord) -> Json {
    let ms = milestones(rec);
    Json::obj([
        ("vmm", Json::from(rec.vmm.as_str())),
        ("run", Json::from(rec.run as u64)),
        ("seq", Json::from(rec.seq as u64)),
        ("ok", Json::from(rec.error.is_none())),
        ("error", Json::from(rec.error.clone())),
        (
            "exit_code",
            Json::from(rec.exit.and_then(|e| e.code).map(f64::from)),
        ),
        (
            "signal",
            Json::from(rec.exit.and_then(|e| e.signal).map(f64::from)),
        ),
        ("spawn_ns", Json::from(rec.spawn_ns)),
        (
            "milestones_ms",
            Json::obj(ms.into_iter().map(|(k, v)| (k, Json::from(v)))),
        ),
        (
            "metrics",
            Json::obj(
                metrics(rec)
                    .into_iter()
                    .map(|(k, _, _, v)| (k, Json::from(v))),
            ),
        ),
        (
            "process",
            rec.exit.map_or(Json::Null, |e| {
                Json::obj([
                    ("user_us", Json::from(e.cpu.user_us)),
                    ("sys_us", Json::from(e.cpu.sys_us)),
                    ("max_rss", Json::from(e.max_rss)),
                ])
            }),
        ),
        (
            "mem_at_marker",
            rec.mem_at_marker.map_or(Json::Null, |m| {
                Json::obj([
                    ("rss", Json::from(m.rss)),
                    ("guest_resident", Json::from(m.guest_resident)),
                    ("overhead", Json::from(m.overhead())),
                ])
            }),
        ),
        ("report", rec.report.clone().unwrap_or(Json::Null)),
        (
            "output_tail",
            if rec.error.is_some() {
                Json::from(rec.output_tail.as_str())
            } else {
                Json::Null
            },
        ),
    ])
}

/// A VMM's statistics as JSON.
pub fn summary_to_json(s: &VmmSummary) -> Json {
    Json::obj([
        ("runs", Json::from(s.runs as u64)),
        ("failed", Json::from(s.failed as u64)),
        (
            "milestones_ms",
            Json::obj(s.milestones.iter().map(|(k, _, v)| (*k, summary_json(*v)))),
        ),
        (
            "metrics",
            Json::obj(s.metrics.iter().map(|(k, _, _, v)| (*k, summary_json(*v)))),
        ),
    ])
}

/// The side-by-side ratios as JSON.
pub fn ratios_json(ember: &VmmSummary, peer: &VmmSummary) -> Json {
    Json::obj(ratios(ember, peer).into_iter().map(|(k, _, e, p, r)| {
        (
            k,
            Json::obj([
                ("ember", Json::from(e)),
                (peer.vmm.as_str(), Json::from(p)),
                ("ratio", Json::from(r)),
            ]),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::procfs::{ChildExit, CpuTime, MemSample};

    /// A report as `ember run --bench-report` wrote it for a real boot on this host
    /// (monotonic nanoseconds), trimmed.
    const REPORT: &str = r#"{
      "format": "ember-run-report/1", "pid": 4242, "main_ns": 1000700000,
      "phases_ns": {"vm_created": 1001000000, "memory_mapped": 1001100000,
        "kernel_loaded": 1003200000, "first_kvm_run": 1003900000,
        "first_serial_byte": 8000000000, "boot_timer": 21000000000,
        "guest_end": 23500000000},
      "exits": {"io": 5000, "mmio": 12, "hlt": 300, "intr": 2, "other": 1, "unhandled": 40},
      "cpu_us": {"process_user": 30000, "process_sys": 20000000, "vcpu_user": 10000,
        "vcpu_sys": 19900000, "vmm_user": 20000, "vmm_sys": 100000},
      "memory": {"guest_size": 134217728,
        "at_boot_timer": {"rss": 40000000, "guest_resident": 37000000, "overhead": 3000000},
        "at_end": {"rss": 41000000, "guest_resident": 38000000, "overhead": 3000000},
        "peak_rss": 41000000},
      "exit_reason": "guest rebooted", "exit_code": 0, "guest_status": 0, "profile": null
    }"#;

    fn ember_record(run: usize, shift_ms: u64) -> RunRecord {
        let text = REPORT.replace(
            "1003900000",
            &(1_003_900_000 + shift_ms * 1_000_000).to_string(),
        );
        RunRecord {
            vmm: "ember".into(),
            run,
            seq: run,
            spawn_ns: 1_000_000_000,
            exit: Some(ChildExit {
                code: Some(0),
                signal: None,
                cpu: CpuTime {
                    user_us: 30_000,
                    sys_us: 20_000_000,
                },
                max_rss: 41_000_000,
                at_ns: 23_600_000_000,
            }),
            console_first_ns: Some(8_000_500_000),
            marker_ns: Some(21_300_000_000),
            mem_at_marker: Some(MemSample {
                rss: 40 << 20,
                guest_resident: 37 << 20,
            }),
            cpu_at_marker_ms: Some(20_000.0),
            report: Some(Json::parse(&text).unwrap()),
            ..Default::default()
        }
    }

    fn peer_record(run: usize, marker_ms: u64) -> RunRecord {
        RunRecord {
            vmm: "qemu".into(),
            run,
            seq: run,
            spawn_ns: 5_000_000_000,
            exit: Some(ChildExit {
                code: Some(0),
                signal: None,
                cpu: CpuTime {
                    user_us: 400_000,
                    sys_us: 25_000_000,
                },
                max_rss: 60 << 20,
                at_ns: 5_000_000_000 + (marker_ms + 2_000) * 1_000_000,
            }),
            console_first_ns: Some(5_000_000_000 + 9_000 * 1_000_000),
            marker_ns: Some(5_000_000_000 + marker_ms * 1_000_000),
            mem_at_marker: Some(MemSample {
                rss: 60 << 20,
                guest_resident: 40 << 20,
            }),
            cpu_at_marker_ms: Some(marker_ms as f64 * 0.9),
            ..Default::default()
        }
    }

    fn get(ms: &[(&str, Option<f64>)], k: &str) -> Option<f64> {
        ms.iter().find(|m| m.0 == k).and_then(|m| m.1)
    }

    #[test]
    fn milestones_are_relative_to_the_spawn() {
        let ms = milestones(&ember_record(1, 0));
        assert_eq!(get(&ms, "main"), Some(0.7));
        assert_eq!(get(&ms, "first_kvm_run"), Some(3.9));
        assert_eq!(get(&ms, "boot_timer"), Some(20_000.0));
        assert_eq!(get(&ms, "process_exit"), Some(22_600.0));
        assert_eq!(get(&ms, "marker"), Some(20_300.0));
        assert_eq!(get(&ms, "console_first_byte"), Some(7_000.5));
        assert!(order_problems(&ms).is_empty(), "{:?}", order_problems(&ms));

        let q = milestones(&peer_record(1, 25_000));
        assert_eq!(get(&q, "marker"), Some(25_000.0));
        assert_eq!(get(&q, "boot_timer"), None);
        assert_eq!(get(&q, "main"), None);
    }

    #[test]
    fn order_problems_are_found() {
        let mut r = ember_record(1, 0);
        r.exit.as_mut().unwrap().at_ns = 900_000_000; // "exit" before the spawn
        let p = order_problems(&milestones(&r));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("process_exit"), "{p:?}");
        r.report = None;
        assert!(order_problems(&milestones(&r))
            .iter()
            .any(|p| p == "vm_created missing"));
    }

    #[test]
    fn summaries_steps_and_ratios() {
        let recs = vec![
            ember_record(1, 0),
            peer_record(1, 25_000),
            ember_record(2, 2),
            peer_record(2, 30_000),
            ember_record(3, 1),
            peer_record(3, 26_000),
            RunRecord {
                vmm: "ember".into(),
                run: 4,
                error: Some("timed out".into()),
                ..Default::default()
            },
        ];
        let e = summarize_vmm("ember", &recs);
        assert_eq!((e.runs, e.failed), (4, 1));
        let kvm = e
            .milestones
            .iter()
            .find(|m| m.0 == "first_kvm_run")
            .unwrap()
            .2
            .unwrap();
        assert_eq!(kvm.n, 3);
        assert!(
            (kvm.median - 4.9).abs() < 1e-9 && (kvm.max - 5.9).abs() < 1e-9,
            "{kvm:?}"
        );
        let overhead = e
            .metrics
            .iter()
            .find(|m| m.0 == "overhead_at_boot_timer_mib")
            .unwrap()
            .3
            .unwrap();
        assert!((overhead.median - 3_000_000.0 / 1_048_576.0).abs() < 1e-9);
        let q = summarize_vmm("qemu", &recs);
        let r = ratios(&e, &q);
        let marker = r.iter().find(|x| x.0 == "marker").unwrap();
        assert_eq!(marker.2, Some(20_300.0));
        assert_eq!(marker.3, Some(26_000.0));
        assert!((marker.4.unwrap() - 26_000.0 / 20_300.0).abs() < 1e-12);
        assert!(
            r.iter().all(|x| x.0 != "boot_timer"),
            "QEMU has no boot timer"
        );
        let cpu = r.iter().find(|x| x.0 == "cpu_to_marker_ms").unwrap();
        assert_eq!(cpu.4, Some(26_000.0 * 0.9 / 20_000.0));
        let rss = r.iter().find(|x| x.0 == "overhead_at_marker_mib").unwrap();
        assert_eq!(rss.4, Some(20.0 / 3.0));

        let text = render(&[e.clone(), q.clone()], &["a note".into()], "bench");
        assert!(text.contains("== ember (4 runs, 1 failed)"), "{text}");
        assert!(text.contains("first KVM_RUN (VMM set-up)"), "{text}");
        assert!(text.contains("== qemu vs ember"), "{text}");
        assert!(text.contains("- a note"), "{text}");
        let j = summary_to_json(&e);
        let med = j
            .get("milestones_ms")
            .and_then(|m| m.get("boot_timer"))
            .and_then(|b| b.get("median"));
        assert_eq!(med.and_then(Json::as_f64), Some(20_000.0));
        let rj = run_json(&recs[0]);
        assert_eq!(
            rj.get("milestones_ms")
                .and_then(|m| m.get("main"))
                .and_then(Json::as_f64),
            Some(0.7)
        );
    }
}
