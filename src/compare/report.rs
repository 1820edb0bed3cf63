// SPDX-License-Identifier: Apache-2.0
//! `ember compare`'s statistics and outputs: per-row medians and spread over the runs, the
//! terminal tables, the JSON document and the SVG chart (plotters, SVG backend only: no
//! font or system libraries; text is left to the SVG viewer).

use std::path::Path;

use serde_json::{json, Value};

use super::{CompareError, Comparison, Row, RowKind, Sample};
use crate::bench::stats::{ratio, summarize, Summary};

/// A per-run figure of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Spawn to the first stdout line, ms.
    Startup,
    /// Spawn to exit, ms.
    EndToEnd,
    /// CPU time, ms.
    Cpu,
    /// Peak PSS of the process tree, MiB.
    Pss,
    /// Peak RSS of the process tree, MiB.
    Rss,
    /// A workload phase, ms.
    Phase(&'static str),
}

impl Metric {
    fn of(self, s: &Sample) -> Option<f64> {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        match self {
            Metric::Startup => s.marks.first_line_ms,
            Metric::EndToEnd => Some(s.result.wall_ms),
            Metric::Cpu => Some(s.result.cpu_ms),
            Metric::Pss => (s.result.peak.pss > 0).then(|| mib(s.result.peak.pss)),
            Metric::Rss => (s.result.peak.rss > 0).then(|| mib(s.result.peak.rss)),
            Metric::Phase(p) => s.marks.phase_ms(p),
        }
    }

    /// The JSON key.
    pub fn key(self) -> String {
        match self {
            Metric::Startup => "startup_ms".into(),
            Metric::EndToEnd => "end_to_end_ms".into(),
            Metric::Cpu => "cpu_ms".into(),
            Metric::Pss => "peak_pss_mib".into(),
            Metric::Rss => "peak_rss_mib".into(),
            Metric::Phase(p) => format!("phase_{p}_ms"),
        }
    }
}

/// Every metric the report gives.
pub fn metrics() -> Vec<Metric> {
    let mut v = vec![
        Metric::Startup,
        Metric::EndToEnd,
        Metric::Cpu,
        Metric::Pss,
        Metric::Rss,
    ];
    v.extend(super::workload::PHASES.iter().map(|p| Metric::Phase(p.0)));
    v
}

impl Row {
    /// The successful runs.
    pub fn ok(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.error.is_none())
    }

    /// `m` over the successful runs.
    pub fn stat(&self, m: Metric) -> Option<Summary> {
        summarize(&self.ok().filter_map(|s| m.of(s)).collect::<Vec<_>>())
    }
}

impl Comparison {
    fn host_row(&self) -> Option<&Row> {
        self.rows.iter().find(|r| r.kind == RowKind::Host)
    }

    /// `row`'s median of `m` over the host row's.
    pub fn ratio_to_host(&self, row: &Row, m: Metric) -> Option<f64> {
        ratio(row.stat(m)?.median, self.host_row()?.stat(m)?.median)
    }

    /// Memory beyond the host row's (median peak PSS minus the host row's), MiB.
    pub fn pss_overhead(&self, row: &Row) -> Option<f64> {
        Some(row.stat(Metric::Pss)?.median - self.host_row()?.stat(Metric::Pss)?.median)
    }

    /// The terminal report.
    pub fn render(&self) -> String {
        let mut o = format!(
            "ember compare: {} run(s) per row of {}\nhost: {}\nwall time {:.1} s\n\n",
            self.opts.runs,
            if self.opts.command.is_empty() {
                "the default busybox workload".to_string()
            } else {
                format!("`{}`", self.opts.command.join(" "))
            },
            self.host.describe(),
            self.wall_s
        );
        o.push_str(
            "row                 ok  start-up ms (min-max)   end-to-end ms (min-max)   CPU ms  \
             PSS MiB  +PSS vs host\n",
        );
        let cell = |s: Option<Summary>| {
            s.map_or("-".to_string(), |s| {
                format!("{} ({}-{})", num(s.median), num(s.min), num(s.max))
            })
        };
        for r in &self.rows {
            if let Some(why) = &r.skipped {
                o.push_str(&format!("{:<18} skipped: {why}\n", r.kind.name()));
                continue;
            }
            o.push_str(&format!(
                "{:<18} {:>3}  {:<22}  {:<24}  {:>7}  {:>7}  {:>12}\n",
                r.kind.name(),
                r.ok().count(),
                cell(r.stat(Metric::Startup)),
                cell(r.stat(Metric::EndToEnd)),
                r.stat(Metric::Cpu).map_or("-".into(), |s| num(s.median)),
                r.stat(Metric::Pss)
                    .map_or("-".into(), |s| format!("{:.1}", s.median)),
                self.pss_overhead(r)
                    .map_or("-".into(), |v| format!("{v:+.1}")),
            ));
        }
        if self.opts.command.is_empty() {
            o.push_str("\nworkload phases: median ms (x host)\nrow               ");
            for (p, _) in super::workload::PHASES {
                o.push_str(&format!(" {p:>20}"));
            }
            o.push('\n');
            for r in self.rows.iter().filter(|r| r.skipped.is_none()) {
                o.push_str(&format!("{:<18}", r.kind.name()));
                for (p, _) in super::workload::PHASES {
                    let m = Metric::Phase(p);
                    let v = r.stat(m).map_or("-".into(), |s| num(s.median));
                    let x = self
                        .ratio_to_host(r, m)
                        .map_or(String::new(), |x| format!(" ({})", times(x)));
                    o.push_str(&format!(" {:>20}", format!("{v}{x}")));
                }
                o.push('\n');
            }
            for (p, what) in super::workload::PHASES {
                o.push_str(&format!("  {p}: {what}\n"));
            }
        }
        if self
            .rows
            .iter()
            .any(|r| r.probe.is_some() || r.fault.is_some())
        {
            o.push_str(&self.render_isolation());
        }
        for r in &self.rows {
            for s in r.samples.iter().filter(|s| s.error.is_some()) {
                o.push_str(&format!(
                    "FAILED {} #{}: {}\n",
                    r.kind.name(),
                    s.run,
                    s.error.as_deref().unwrap_or_default()
                ));
            }
        }
        for n in &self.notes {
            o.push_str(&format!("note: {n}\n"));
        }
        o
    }

    fn render_isolation(&self) -> String {
        let mut o = String::from(
            "\nisolation probe (what the workload sees and reaches)\n\
             row                kernel              own  host-PIDs host-file net        /dev/kvm \
             host-disk CAP_SYS_MODULE sysrq-w\n",
        );
        let yn = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        for r in &self.rows {
            let Some(p) = &r.probe else { continue };
            let own = p.kernel.as_ref().map(|k| *k != self.host.kernel);
            let host_net = p
                .net
                .iter()
                .any(|n| n != "lo" && self.host.interfaces.contains(n));
            o.push_str(&format!(
                "{:<18} {:<19} {:<4} {:<9} {:<9} {:<10} {:<8} {:<9} {:<14} {}\n",
                r.kind.name(),
                p.kernel.as_deref().unwrap_or("-"),
                yn(own),
                yn(p.host_pid_visible),
                yn(p.host_file_visible),
                if host_net {
                    "host's"
                } else if p.net.is_empty() {
                    "none"
                } else {
                    "own (lo)"
                },
                yn(p.kvm_openable),
                if p.disks_readable.is_empty() {
                    "no".to_string()
                } else {
                    p.disks_readable.join(",")
                },
                yn(p.has_cap(super::workload::CAP_SYS_MODULE)),
                yn(p.sysrq_writable),
            ));
        }
        o.push_str("kernel-level fault:\n");
        for r in &self.rows {
            if let Some(f) = &r.fault {
                o.push_str(&format!("  {:<16} {f}\n", r.kind.name()));
            }
        }
        o.push_str(
            "  (VM rows: device nodes, capabilities and /dev/mem are the guest's own; the fault \
             is the guest overwriting its kernel's getppid with ud2 through /dev/mem)\n",
        );
        o
    }

    /// The JSON document: host, options, every run, per-row statistics, ratios, probes.
    pub fn to_json(&self) -> Value {
        let stat = |s: Option<Summary>| {
            s.map_or(
                Value::Null,
                |s| json!({"n": s.n, "min": s.min, "median": s.median, "p90": s.p90, "max": s.max}),
            )
        };
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let stats: serde_json::Map<String, Value> = metrics()
                    .into_iter()
                    .map(|m| (m.key(), stat(r.stat(m))))
                    .collect();
                let ratios: serde_json::Map<String, Value> = metrics()
                    .into_iter()
                    .filter_map(|m| Some((m.key(), json!(self.ratio_to_host(r, m)?))))
                    .collect();
                let samples: Vec<Value> = r
                    .samples
                    .iter()
                    .map(|s| {
                        json!({
                            "run": s.run,
                            "code": s.result.code,
                            "timed_out": s.result.timed_out,
                            "startup_ms": s.marks.first_line_ms,
                            "end_to_end_ms": s.result.wall_ms,
                            "cpu_ms": s.result.cpu_ms,
                            "peak_rss_bytes": s.result.peak.rss,
                            "peak_pss_bytes": s.result.peak.pss,
                            "peak_procs": s.result.peak.procs,
                            "phases_ms": s.marks.phases.iter()
                                .map(|(k, v)| (k.clone(), json!(v)))
                                .collect::<serde_json::Map<_, _>>(),
                            "vm_path": s.vm_path,
                            "error": s.error,
                        })
                    })
                    .collect();
                json!({
                    "row": r.kind.name(),
                    "label": r.label,
                    "skipped": r.skipped,
                    "summary": stats,
                    "ratio_to_host": ratios,
                    "pss_overhead_vs_host_mib": self.pss_overhead(r),
                    "samples": samples,
                    "probe": r.probe.as_ref().map(|p| json!({
                        "kernel": p.kernel,
                        "own_kernel": p.kernel.as_ref().map(|k| *k != self.host.kernel),
                        "procs_visible": p.procs,
                        "host_pid_visible": p.host_pid_visible,
                        "mounts": p.mounts,
                        "host_file_visible": p.host_file_visible,
                        "net": p.net,
                        "kvm_openable": p.kvm_openable,
                        "host_disks_readable": p.disks_readable,
                        "capeff": p.capeff.map(|c| format!("{c:016x}")),
                        "sysrq_writable": p.sysrq_writable,
                        "complete": p.done,
                    })),
                    "kernel_fault": r.fault,
                })
            })
            .collect();
        json!({
            "format": "ember-compare/1",
            "host": {
                "kvm": if self.host.pvm { "pvm" } else { "hardware" },
                "kernel": self.host.kernel,
                "cpu": self.host.cpu,
                "cpus": self.host.cpus,
                "loadavg_at_end": self.host.loadavg,
            },
            "runs": self.opts.runs,
            "command": if self.opts.command.is_empty() { Value::Null } else { json!(self.opts.command) },
            "workload": self.opts.command.is_empty().then_some(super::workload::WORKLOAD),
            "phases": super::workload::PHASES.iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
            "wall_s": self.wall_s,
            "rows": rows,
            "notes": self.notes,
        })
    }

    /// Writes [`to_json`](Self::to_json) to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), CompareError> {
        let text = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        std::fs::write(path, text + "\n").map_err(|source| CompareError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Draws the chart: start-up latency, end to end and peak PSS per row (medians as
    /// bars, min-max as whiskers, log scales), to an SVG file.
    pub fn write_svg(&self, path: &Path) -> Result<(), CompareError> {
        let err = |e: &dyn std::fmt::Display| CompareError::Chart {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let rows: Vec<&Row> = self.rows.iter().filter(|r| r.skipped.is_none()).collect();
        let panels = [
            (
                Metric::Startup,
                "start-up latency, ms (spawn to first line)",
            ),
            (Metric::EndToEnd, "end to end, ms"),
            (Metric::Pss, "peak PSS of the process tree, MiB"),
        ];
        draw_chart(path, &self.chart_title(), &rows, &panels).map_err(|e| err(&e))
    }

    fn chart_title(&self) -> String {
        format!(
            "ember compare: {} run(s) per row, {} host, kernel {}",
            self.opts.runs,
            if self.host.pvm { "PVM" } else { "hardware-KVM" },
            self.host.kernel
        )
    }
}

fn draw_chart(
    path: &Path,
    title: &str,
    rows: &[&Row],
    panels: &[(Metric, &str)],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let height = 80 + panels.len() as u32 * (60 + 28 * rows.len().max(1) as u32);
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let areas = root.split_evenly((panels.len(), 1));
    let names: Vec<String> = rows.iter().map(|r| r.kind.name().to_string()).collect();
    for (area, (metric, caption)) in areas.iter().zip(panels) {
        let stats: Vec<Option<Summary>> = rows.iter().map(|r| r.stat(*metric)).collect();
        let hi = stats.iter().flatten().map(|s| s.max).fold(1.0f64, f64::max) * 2.0;
        let lo = stats
            .iter()
            .flatten()
            .map(|s| s.min)
            .filter(|v| *v > 0.0)
            .fold(hi, f64::min)
            / 2.0;
        let lo = lo.clamp(1e-3, hi / 10.0);
        let mut chart = ChartBuilder::on(area)
            .caption(*caption, ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(110)
            .build_cartesian_2d((lo..hi).log_scale(), (0..rows.len()).into_segmented())?;
        let names = names.clone();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_label_formatter(&move |v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .x_label_formatter(&|v| num(*v))
            .draw()?;
        let colour = |i: usize| Palette99::pick(i).mix(0.8);
        chart.draw_series(stats.iter().enumerate().filter_map(|(i, s)| {
            let s = (*s)?;
            Some(Rectangle::new(
                [
                    (lo, SegmentValue::Exact(i)),
                    (s.median.max(lo), SegmentValue::Exact(i + 1)),
                ],
                colour(i).filled(),
            ))
        }))?;
        // Whiskers: min to max through the middle of the bar.
        chart.draw_series(stats.iter().enumerate().filter_map(|(i, s)| {
            let s = (*s)?;
            Some(PathElement::new(
                vec![
                    (s.min.max(lo), SegmentValue::CenterOf(i)),
                    (s.max.max(lo), SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            ))
        }))?;
        chart.draw_series(stats.iter().enumerate().filter_map(|(i, s)| {
            let s = (*s)?;
            Some(Text::new(
                num(s.median),
                (s.median.max(lo) * 1.1, SegmentValue::CenterOf(i)),
                ("sans-serif", 12),
            ))
        }))?;
    }
    root.present()?;
    Ok(())
}

/// A figure with as many digits as it needs: 0.123, 12.3, 1234.
pub fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A ratio: `12x`, `1.5x`.
pub fn times(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}x")
    } else {
        format!("{x:.1}x")
    }
}

/// One progress line for a finished run.
pub fn progress_line(row: &Row, s: &Sample) -> String {
    match &s.error {
        Some(e) => format!("{} #{}: FAILED: {e}", row.kind.name(), s.run),
        None => format!(
            "{} #{}: first line {} ms, end to end {} ms, peak PSS {:.1} MiB{}",
            row.kind.name(),
            s.run,
            s.marks.first_line_ms.map_or("-".into(), num),
            num(s.result.wall_ms),
            s.result.peak.pss as f64 / 1048576.0,
            s.vm_path
                .as_ref()
                .map_or(String::new(), |p| format!(" ({p})"))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::measure::{RunResult, TreeMemory};
    use super::super::workload::{Line, Marks};
    use super::super::{CompareOptions, HostFacts};
    use super::*;
    use std::time::Duration;

    fn sample(run: usize, first: f64, wall: f64, pss_mib: u64, syscall: f64) -> Sample {
        Sample {
            run,
            result: RunResult {
                lines: vec![Line {
                    at: Duration::from_millis(1),
                    text: "x".into(),
                }],
                wall_ms: wall,
                code: Some(0),
                cpu_ms: wall / 2.0,
                peak: TreeMemory {
                    rss: pss_mib << 21,
                    pss: pss_mib << 20,
                    procs: 2,
                },
                timed_out: false,
                stderr_tail: String::new(),
            },
            marks: Marks {
                first_line_ms: Some(first),
                end_ms: Some(wall),
                phases: vec![("syscall".into(), syscall)],
                complete: true,
            },
            vm_path: None,
            error: None,
        }
    }

    fn row(kind: RowKind, samples: Vec<Sample>) -> Row {
        Row {
            kind,
            label: kind.name().into(),
            skipped: None,
            samples,
            probe: None,
            fault: None,
        }
    }

    fn comparison() -> Comparison {
        let mut failed = sample(3, 1.0, 1.0, 1, 1.0);
        failed.error = Some("exit status Some(1)".into());
        Comparison {
            opts: CompareOptions {
                runs: 3,
                rows: vec![RowKind::Host, RowKind::EmberWarm],
                command: vec![],
                runtime: None,
                timeout: Duration::from_secs(1),
                probe: false,
                vm_kernel: None,
                ember_bin: None,
            },
            rows: vec![
                row(
                    RowKind::Host,
                    vec![
                        sample(1, 2.0, 10.0, 2, 1.0),
                        sample(2, 4.0, 30.0, 4, 3.0),
                        sample(3, 3.0, 20.0, 3, 2.0),
                    ],
                ),
                row(
                    RowKind::EmberWarm,
                    vec![
                        sample(1, 300.0, 2000.0, 40, 4000.0),
                        sample(2, 500.0, 3000.0, 44, 6000.0),
                        failed,
                    ],
                ),
            ],
            notes: vec!["a note".into()],
            host: HostFacts {
                pvm: true,
                kernel: "6.18".into(),
                ..HostFacts::default()
            },
            wall_s: 12.0,
        }
    }

    #[test]
    fn statistics_and_ratios() {
        let c = comparison();
        let host = &c.rows[0];
        let vm = &c.rows[1];
        assert_eq!(host.stat(Metric::Startup).unwrap().median, 3.0);
        assert_eq!(host.stat(Metric::EndToEnd).unwrap().max, 30.0);
        // The failed run is left out: medians of two.
        assert_eq!(vm.stat(Metric::Startup).unwrap().n, 2);
        assert_eq!(vm.stat(Metric::Startup).unwrap().median, 400.0);
        assert_eq!(vm.stat(Metric::Pss).unwrap().median, 42.0);
        assert_eq!(c.pss_overhead(vm), Some(39.0));
        assert_eq!(c.ratio_to_host(vm, Metric::Phase("syscall")), Some(2500.0));
        assert_eq!(c.ratio_to_host(vm, Metric::Phase("io")), None);
        assert_eq!(c.ratio_to_host(host, Metric::EndToEnd), Some(1.0));
    }

    #[test]
    fn outputs() {
        let c = comparison();
        let text = c.render();
        assert!(text.contains("PVM host"), "{text}");
        assert!(text.contains("ember-warm"), "{text}");
        assert!(text.contains("400 (300-500)"), "{text}");
        assert!(text.contains("+39.0"), "{text}");
        assert!(text.contains("2500x"), "{text}");
        assert!(text.contains("FAILED ember-warm #3"), "{text}");
        assert!(text.contains("note: a note"), "{text}");
        let j = c.to_json();
        assert_eq!(j["host"]["kvm"], "pvm");
        assert_eq!(j["rows"][1]["summary"]["startup_ms"]["median"], 400.0);
        assert_eq!(j["rows"][1]["ratio_to_host"]["phase_syscall_ms"], 2500.0);
        assert_eq!(j["rows"][1]["samples"].as_array().unwrap().len(), 3);

        let dir = std::env::temp_dir().join(format!("ember-compare-svg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("c.svg");
        c.write_svg(&svg).unwrap();
        let s = std::fs::read_to_string(&svg).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(s.starts_with("<svg"), "{s}");
        assert!(s.contains("ember-warm") && s.contains("start-up latency"));
        // The background and one bar per row in each of the 3 panels.
        assert_eq!(s.matches("<rect").count(), 1 + 3 * 2);
    }

    #[test]
    fn numbers() {
        assert_eq!(num(1234.4), "1234");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(0.1234), "0.123");
        assert_eq!(times(2500.0), "2500x");
        assert_eq!(times(1.46), "1.5x");
    }
}
