// SPDX-License-Identifier: Apache-2.0
//! `ember exec --json FILE`: the machine-readable result of a run, written when ember exits.
//!
//! ```json
//! {"status": 0, "command_status": 0, "reason": "command-exited", "message": null,
//!  "duration_ms": 812.4, "path": "warm-restore",
//!  "boot": {"vm_created": 1.2, "memory_mapped": 3.4, "first_kvm_run": 9.8, ...},
//!  "kernel_problems": [{"kind": "warning", "line": "WARNING: CPU: 0 PID: 1 at ...",
//!                       "function": "foo_probe", "address": null}],
//!  "kernel_problems_dropped": 0, "warm": {...}}
//! ```
//!
//! `reason` tells a command's failure from a kernel's or ember's (see [`reason_of`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bench::json::Json;
use crate::devices::bus::lock;
use crate::exit::{ExitReason, VmExit};
use crate::symbols::LazySymbols;
use crate::timeline::{Phase, Timeline};
use crate::vmm::{RunOutcome, Vmm};

/// Which way the command ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecPath {
    /// Restored from the cached snapshot of a booted guest.
    WarmRestore,
    /// Booted with the warm protocol (and snapshotted when ready).
    WarmBoot,
    /// Booted with the command in its initramfs.
    Cold,
}

impl ExecPath {
    /// The JSON name.
    pub fn name(self) -> &'static str {
        match self {
            ExecPath::WarmRestore => "warm-restore",
            ExecPath::WarmBoot => "warm-boot",
            ExecPath::Cold => "cold",
        }
    }
}

#[derive(Debug, Default)]
struct Watched {
    path: Option<ExecPath>,
    timeline: Option<Arc<Timeline>>,
    exit: Option<Arc<VmExit>>,
}

/// What the result needs from the VM (its timeline and its console's kernel problems) and
/// the path taken; shared with the watchdog, which may end the process without the run
/// loop. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct VmWatch(Arc<Mutex<Watched>>);

impl VmWatch {
    /// Notes the path about to be taken (before the VM exists).
    pub fn set_path(&self, path: ExecPath) {
        lock(&self.0).path = Some(path);
    }

    /// Watches the VM `vmm`, run by `path`.
    pub fn attach(&self, vmm: &Vmm, path: ExecPath) {
        let mut w = lock(&self.0);
        w.path = Some(path);
        w.timeline = Some(vmm.timeline().clone());
        w.exit = Some(vmm.exit_latch().clone());
    }
}

/// The `reason` of a run that ended: `command-exited` (the command's status came back),
/// `bad-status` (a status outside 0..=255), `timeout`, `signal`, `kernel-panic`,
/// `triple-fault`, `emulation-failure`, `vcpu-error`, or `no-status` (the guest ended
/// without reporting one).
pub fn reason_of(outcome: &RunOutcome) -> &'static str {
    match &outcome.reason {
        ExitReason::GuestStatus(s) if *s <= 255 => "command-exited",
        ExitReason::GuestStatus(_) => "bad-status",
        ExitReason::Timeout => "timeout",
        ExitReason::Stopped { .. } => "signal",
        ExitReason::Panic => "kernel-panic",
        ExitReason::TripleFault => "triple-fault",
        ExitReason::EmulationFailure(_) => "emulation-failure",
        ExitReason::VcpuError(_) => "vcpu-error",
        ExitReason::Reset | ExitReason::PowerOff | ExitReason::Snapshotted => "no-status",
    }
}

/// How the run ended, for the result.
#[derive(Debug, Clone)]
pub struct Ending {
    /// ember's exit status.
    pub status: u8,
    /// The command's status, when it came back.
    pub command_status: Option<u32>,
    /// See [`reason_of`]; `setup-error` when nothing ran (a missing file, a kernel tree
    /// without a kernel), `vm-error` when the VM could not be built.
    pub reason: &'static str,
    /// What ember said on stderr, if anything.
    pub message: Option<String>,
}

impl Ending {
    /// The ending of a run that reached the VM's end.
    pub fn of_run(outcome: &RunOutcome, timeout: Option<f64>) -> Self {
        let st = super::exit_status(outcome, timeout);
        let command_status = match outcome.reason {
            ExitReason::GuestStatus(s) if s <= 255 => Some(s),
            _ => None,
        };
        Self {
            status: st.code,
            command_status,
            reason: reason_of(outcome),
            message: st.message,
        }
    }

    /// The ending of a run that failed in ember (`reason`: `setup-error` or `vm-error`).
    pub fn of_error(reason: &'static str, err: &dyn std::error::Error) -> Self {
        Self {
            status: crate::exit::code::EXEC_NO_STATUS,
            command_status: None,
            reason,
            message: Some(crate::error_chain_line(err)),
        }
    }
}

/// Writes the result of an exec run as JSON.
#[derive(Debug, Clone)]
pub struct ResultWriter {
    /// Where to write it.
    pub file: PathBuf,
    /// The guest kernel (its ELF symbols name functions the console gave as addresses).
    pub kernel: PathBuf,
    /// ember's start.
    pub start: std::time::Instant,
    /// The VM being run.
    pub watch: VmWatch,
}

impl ResultWriter {
    /// The result document for `ending` (`warm`: the warm path's report, if it ran).
    pub fn to_json(&self, ending: &Ending, warm: Option<Json>) -> Json {
        let ms = |d: Duration| Json::Num(d.as_secs_f64() * 1e3);
        let w = lock(&self.watch.0);
        let boot = w.timeline.as_ref().map_or(Json::Null, |t| {
            Json::Obj(
                Phase::ALL
                    .iter()
                    .filter_map(|p| Some((p.name().to_string(), ms(t.get(*p)?))))
                    .collect(),
            )
        });
        let (mut problems, dropped) = w
            .exit
            .as_ref()
            .map(|e| e.kernel_problems().snapshot())
            .unwrap_or_default();
        if problems
            .iter()
            .any(|p| p.function.is_none() && p.address.is_some())
        {
            let symbols = LazySymbols::new(Some(self.kernel.clone()));
            for p in &mut problems {
                p.symbolize(symbols.get());
            }
        }
        let problems = problems
            .into_iter()
            .map(|p| {
                Json::obj([
                    ("kind", Json::Str(p.kind.into())),
                    ("line", Json::Str(p.line)),
                    ("function", p.function.map_or(Json::Null, Json::Str)),
                    (
                        "address",
                        p.address
                            .map_or(Json::Null, |a| Json::Str(format!("{a:#x}"))),
                    ),
                ])
            })
            .collect();
        let num = |n: u64| Json::Num(n as f64);
        Json::obj([
            ("status", num(u64::from(ending.status))),
            (
                "command_status",
                ending
                    .command_status
                    .map_or(Json::Null, |s| num(u64::from(s))),
            ),
            ("reason", Json::Str(ending.reason.into())),
            (
                "message",
                ending.message.clone().map_or(Json::Null, Json::Str),
            ),
            ("duration_ms", ms(self.start.elapsed())),
            (
                "path",
                w.path.map_or(Json::Null, |p| Json::Str(p.name().into())),
            ),
            ("boot", boot),
            ("kernel_problems", Json::Arr(problems)),
            ("kernel_problems_dropped", num(dropped as u64)),
            ("warm", warm.unwrap_or(Json::Null)),
        ])
    }

    /// Writes the result (through a temporary file renamed over FILE, so that a reader never
    /// sees half of it); a failure is logged, and does not change ember's exit status.
    pub fn write(&self, ending: &Ending, warm: Option<Json>) {
        let text = self.to_json(ending, warm).to_pretty();
        let tmp = temp_beside(&self.file);
        let r = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            log::error!("--json: cannot write {}: {e}", self.file.display());
        }
    }
}

fn temp_beside(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    file.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::ExitCounts;

    fn outcome(reason: ExitReason) -> RunOutcome {
        RunOutcome {
            reason,
            guest_status: None,
            exits: ExitCounts::default(),
            stop_signal: Some(libc::SIGTERM),
        }
    }

    #[test]
    fn endings_and_document() {
        let e = Ending::of_run(&outcome(ExitReason::GuestStatus(3)), None);
        assert_eq!(
            (e.status, e.command_status, e.reason),
            (3, Some(3), "command-exited")
        );
        let e = Ending::of_run(&outcome(ExitReason::Timeout), Some(2.0));
        assert_eq!(
            (e.status, e.command_status, e.reason),
            (124, None, "timeout")
        );
        let e = Ending::of_run(&outcome(ExitReason::Panic), None);
        assert_eq!((e.status, e.reason), (125, "kernel-panic"));
        let e = Ending::of_run(&outcome(ExitReason::Stopped { graceful: false }), None);
        assert_eq!((e.status, e.reason), (143, "signal"));

        let dir = std::env::temp_dir().join(format!("ember-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = ResultWriter {
            file: dir.join("r.json"),
            kernel: dir.join("no-kernel"),
            start: std::time::Instant::now(),
            watch: VmWatch::default(),
        };
        w.watch.set_path(ExecPath::Cold);
        w.write(
            &Ending::of_run(&outcome(ExitReason::GuestStatus(0)), None),
            None,
        );
        let j = Json::parse(&std::fs::read_to_string(&w.file).unwrap()).unwrap();
        assert_eq!(j.get("status").and_then(Json::as_u64), Some(0));
        assert_eq!(j.get("command_status").and_then(Json::as_u64), Some(0));
        assert_eq!(j.get("path").and_then(Json::as_str), Some("cold"));
        assert_eq!(
            j.get("kernel_problems")
                .and_then(Json::as_array)
                .map(<[_]>::len),
            Some(0)
        );
        assert!(j.get("duration_ms").and_then(Json::as_f64).is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
