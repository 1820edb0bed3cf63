// SPDX-License-Identifier: Apache-2.0
//! `ember bench --exec`: `ember exec -- COMMAND` end to end, cold (a boot per command,
//! `--cold`) against warm (restored from the snapshot cache, see [`crate::exec::warm`]),
//! side by side in one run.
//!
//! The first warm run starts with no cache entry for the guest (the bench removes it), so it
//! boots and writes the snapshot ("first"); then cold and warm runs alternate, so that both
//! share the host's noise. Each run is a child `ember exec` process timed from spawn to exit
//! (`wait4`: exit status and peak RSS); a warm child also reports, through its hidden
//! `--bench-report`, whether it restored and when its first vCPU entered KVM_RUN (for a
//! restore: the first guest instruction after the restore).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::json::Json;
use super::procfs::wait_child;
use super::stats::{summarize, Summary};
use super::BenchError;

/// What to run.
#[derive(Debug, Clone)]
pub struct ExecBenchOptions {
    /// The ember binary.
    pub ember: PathBuf,
    /// Runs of each of cold and warm (after the first warm run).
    pub runs: usize,
    /// `ember exec` flags before `--` (`--kernel`, `--mem`, ...).
    pub exec_flags: Vec<String>,
    /// The command.
    pub command: Vec<String>,
    /// A run that takes longer is killed and counted as failed.
    pub timeout: Duration,
}

/// One run.
#[derive(Debug, Clone)]
pub struct ExecSample {
    /// `first` (warm, booting and writing the snapshot), `cold` or `warm`.
    pub mode: &'static str,
    /// Index of the run within its mode.
    pub run: usize,
    /// Spawn to exit.
    pub wall_ms: f64,
    /// Exit status (`None`: killed).
    pub code: Option<i32>,
    /// Peak resident set of the ember process, KiB.
    pub max_rss_kib: u64,
    /// The child's `--bench-report` (warm runs).
    pub report: Option<Json>,
    /// Why the run failed (its stderr's last lines, or the timeout).
    pub error: Option<String>,
}

impl ExecSample {
    fn restored(&self) -> Option<bool> {
        match self.report.as_ref()?.get("warm")?.get("restored")? {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn first_kvm_run_ms(&self) -> Option<f64> {
        self.report
            .as_ref()?
            .get("warm")?
            .get("first_kvm_run_ms")?
            .as_f64()
    }
}

/// Every run, and what to say about them.
#[derive(Debug, Clone)]
pub struct ExecBench {
    /// The options.
    pub opts: ExecBenchOptions,
    /// Every run, in the order they ran.
    pub samples: Vec<ExecSample>,
}

/// Runs the bench.
pub fn run(opts: &ExecBenchOptions, on_sample: &mut dyn FnMut(&ExecSample)) -> ExecBench {
    forget_snapshot(opts);
    let work = std::env::temp_dir().join(format!("ember-bench-exec-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&work);
    let mut samples = Vec::new();
    let mut one = |mode: &'static str, run: usize| {
        let s = run_one(opts, &work, mode, run);
        on_sample(&s);
        samples.push(s);
    };
    one("first", 0);
    for i in 0..opts.runs {
        one("cold", i);
        one("warm", i);
    }
    let _ = std::fs::remove_dir_all(&work);
    ExecBench {
        opts: opts.clone(),
        samples,
    }
}

/// Removes the snapshot cache entry the warm runs would use, so that the first one boots.
fn forget_snapshot(opts: &ExecBenchOptions) {
    use clap::Parser;
    let mut argv = vec!["ember".to_string(), "exec".into()];
    argv.extend(opts.exec_flags.iter().cloned());
    argv.push("--".into());
    argv.extend(opts.command.iter().cloned());
    let Ok(cli) = crate::cli::Cli::try_parse_from(argv) else {
        return;
    };
    let crate::cli::Command::Exec(args) = cli.command else {
        return;
    };
    let (Ok(base), Some(cache)) = (
        args.to_config(),
        crate::snapshot::cache::SnapshotCache::from_env(),
    ) else {
        return;
    };
    let config = crate::exec::warm::warm_config(&base, Path::new("/"));
    if let Ok(key) = crate::snapshot::cache::CacheKey::new(&config) {
        cache.remove(&key);
    }
}

fn run_one(opts: &ExecBenchOptions, work: &Path, mode: &'static str, run: usize) -> ExecSample {
    let report_path = work.join(format!("{mode}-{run}.json"));
    let err_path = work.join(format!("{mode}-{run}.err"));
    let mut sample = ExecSample {
        mode,
        run,
        wall_ms: 0.0,
        code: None,
        max_rss_kib: 0,
        report: None,
        error: None,
    };
    let mut cmd = Command::new(&opts.ember);
    cmd.arg("exec").args(&opts.exec_flags);
    if mode == "cold" {
        cmd.arg("--cold");
    }
    cmd.arg("--bench-report")
        .arg(&report_path)
        .arg("--")
        .args(&opts.command)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match std::fs::File::create(&err_path) {
        Ok(f) => cmd.stderr(f),
        Err(_) => cmd.stderr(Stdio::null()),
    };
    let t0 = Instant::now();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            sample.error = Some(format!("cannot start {}: {e}", opts.ember.display()));
            return sample;
        }
    };
    match wait_child(child.id(), Some(opts.timeout)) {
        Ok(Some(exit)) => {
            sample.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
            sample.code = exit.code;
            sample.max_rss_kib = exit.max_rss / 1024;
        }
        Ok(None) | Err(_) => {
            // SAFETY: kill(2) on our own unreaped child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = wait_child(child.id(), None);
            sample.error = Some(format!("did not end within {:?}", opts.timeout));
            return sample;
        }
    }
    sample.report = std::fs::read_to_string(&report_path)
        .ok()
        .and_then(|t| Json::parse(&t).ok());
    if sample.code != Some(0) {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        sample.error = Some(format!(
            "exit status {:?}: {}",
            sample.code,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    sample
}

fn summary_json(s: Option<Summary>) -> Json {
    s.map_or(Json::Null, |s| {
        Json::obj([
            ("n", Json::Num(s.n as f64)),
            ("min", Json::Num(s.min)),
            ("median", Json::Num(s.median)),
            ("p90", Json::Num(s.p90)),
            ("max", Json::Num(s.max)),
        ])
    })
}

impl ExecBench {
    fn ok(&self, mode: &str) -> impl Iterator<Item = &ExecSample> + '_ {
        let mode = mode.to_string();
        self.samples
            .iter()
            .filter(move |s| s.mode == mode && s.error.is_none())
    }

    /// Wall times of the successful runs of `mode`.
    pub fn wall(&self, mode: &str) -> Option<Summary> {
        summarize(&self.ok(mode).map(|s| s.wall_ms).collect::<Vec<_>>())
    }

    /// Peak RSS (KiB) of the successful runs of `mode`.
    pub fn rss(&self, mode: &str) -> Option<Summary> {
        summarize(
            &self
                .ok(mode)
                .map(|s| s.max_rss_kib as f64)
                .collect::<Vec<_>>(),
        )
    }

    /// Process start to the restored guest's first instruction, warm runs that restored.
    pub fn restore(&self) -> Option<Summary> {
        summarize(
            &self
                .ok("warm")
                .filter(|s| s.restored() == Some(true))
                .filter_map(ExecSample::first_kvm_run_ms)
                .collect::<Vec<_>>(),
        )
    }

    /// Cold median / warm median.
    pub fn speedup(&self) -> Option<f64> {
        super::stats::ratio(self.wall("cold")?.median, self.wall("warm")?.median)
    }

    /// The text report.
    pub fn render(&self) -> String {
        let mut out = format!(
            "ember exec -- {}: end to end (spawn to exit), cold (--cold) vs warm (restored \
             snapshot), {} runs each\n\n",
            self.opts.command.join(" "),
            self.opts.runs
        );
        out.push_str("mode    runs   min ms  median ms   p90 ms   max ms  peak RSS MiB (median)\n");
        for mode in ["first", "cold", "warm"] {
            let Some(w) = self.wall(mode) else {
                out.push_str(&format!("{mode:<6}  no successful run\n"));
                continue;
            };
            let rss = self.rss(mode).map_or(0.0, |r| r.median / 1024.0);
            out.push_str(&format!(
                "{mode:<6} {:>5} {:>8.0} {:>10.0} {:>8.0} {:>8.0} {:>10.1}\n",
                w.n, w.min, w.median, w.p90, w.max, rss
            ));
        }
        if let Some(r) = self.restore() {
            out.push_str(&format!(
                "\nwarm: restored guest's first instruction {:.1} ms after ember's start \
                 (median of {}; min {:.1}, max {:.1})\n",
                r.median, r.n, r.min, r.max
            ));
        }
        if let Some(x) = self.speedup() {
            out.push_str(&format!("warm is {x:.1}x faster than cold (medians)\n"));
        }
        let not_restored = self
            .ok("warm")
            .filter(|s| s.restored() != Some(true))
            .count();
        if not_restored > 0 {
            out.push_str(&format!(
                "note: {not_restored} warm run(s) booted instead of restoring (see the JSON)\n"
            ));
        }
        for s in self.samples.iter().filter(|s| s.error.is_some()) {
            out.push_str(&format!(
                "FAILED {} #{}: {}\n",
                s.mode,
                s.run,
                s.error.as_deref().unwrap_or("")
            ));
        }
        out
    }

    /// The JSON report: every sample and the summaries.
    pub fn to_json(&self) -> Json {
        let samples = self
            .samples
            .iter()
            .map(|s| {
                Json::obj([
                    ("mode", Json::Str(s.mode.into())),
                    ("run", Json::Num(s.run as f64)),
                    ("wall_ms", Json::Num(s.wall_ms)),
                    (
                        "code",
                        s.code.map_or(Json::Null, |c| Json::Num(f64::from(c))),
                    ),
                    ("max_rss_kib", Json::Num(s.max_rss_kib as f64)),
                    ("report", s.report.clone().unwrap_or(Json::Null)),
                    ("error", s.error.clone().map_or(Json::Null, Json::Str)),
                ])
            })
            .collect();
        Json::obj([
            ("bench", Json::Str("exec".into())),
            ("host", super::host_json()),
            (
                "command",
                Json::Arr(self.opts.command.iter().cloned().map(Json::Str).collect()),
            ),
            (
                "exec_flags",
                Json::Arr(
                    self.opts
                        .exec_flags
                        .iter()
                        .cloned()
                        .map(Json::Str)
                        .collect(),
                ),
            ),
            ("runs", Json::Num(self.opts.runs as f64)),
            ("samples", Json::Arr(samples)),
            (
                "wall_ms",
                Json::obj(["first", "cold", "warm"].map(|m| (m, summary_json(self.wall(m))))),
            ),
            (
                "max_rss_kib",
                Json::obj(["first", "cold", "warm"].map(|m| (m, summary_json(self.rss(m))))),
            ),
            ("restore_first_kvm_run_ms", summary_json(self.restore())),
            (
                "speedup_cold_over_warm",
                self.speedup().map_or(Json::Null, Json::Num),
            ),
        ])
    }

    /// Writes [`to_json`](Self::to_json) to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        std::fs::write(path, self.to_json().to_pretty()).map_err(|source| BenchError::WriteReport {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: &'static str, wall: f64, restored: bool, first_run: f64) -> ExecSample {
        let report = Json::obj([(
            "warm",
            Json::obj([
                ("restored", Json::Bool(restored)),
                ("first_kvm_run_ms", Json::Num(first_run)),
            ]),
        )]);
        ExecSample {
            mode,
            run: 0,
            wall_ms: wall,
            code: Some(0),
            max_rss_kib: 2048,
            report: Some(report),
            error: None,
        }
    }

    #[test]
    fn summaries_speedup_and_report() {
        let opts = ExecBenchOptions {
            ember: "ember".into(),
            runs: 2,
            exec_flags: vec![],
            command: vec!["true".into()],
            timeout: Duration::from_secs(1),
        };
        let mut failed = sample("warm", 1.0, true, 1.0);
        failed.error = Some("exit status Some(125): boom".into());
        let b = ExecBench {
            opts,
            samples: vec![
                sample("first", 50_000.0, false, 30.0),
                sample("cold", 40_000.0, false, 30.0),
                sample("warm", 800.0, true, 12.0),
                sample("cold", 42_000.0, false, 30.0),
                sample("warm", 1_000.0, true, 14.0),
                failed,
            ],
        };
        assert_eq!(b.wall("cold").unwrap().median, 41_000.0);
        assert_eq!(b.wall("warm").unwrap().n, 2);
        assert_eq!(b.restore().unwrap().median, 13.0);
        assert!((b.speedup().unwrap() - 41_000.0 / 900.0).abs() < 1e-9);
        let text = b.render();
        assert!(text.contains("45.6x faster"), "{text}");
        assert!(text.contains("FAILED warm #0"), "{text}");
        let j = Json::parse(&b.to_json().to_pretty()).unwrap();
        assert_eq!(j.get("samples").unwrap().as_array().unwrap().len(), 6);
        assert_eq!(
            j.get("wall_ms")
                .unwrap()
                .get("warm")
                .unwrap()
                .get("median")
                .unwrap()
                .as_f64(),
            Some(900.0)
        );
    }
}
