// SPDX-License-Identifier: Apache-2.0
//! Running the boots of a bench: one child process per boot (`ember run --bench-report`, or
//! a peer VMM), a few at a time, each watched from the host: when its console prints its
//! first byte and the marker line, when Firecracker logs the boot-timer write, how much
//! memory it holds at the marker, and how it ends (exit status, CPU time, peak RSS).

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::json::Json;
use super::peers::{GuestSpec, Peer};
use super::procfs::{self, ChildExit, MemSample};
use crate::devices::bus::lock;

/// Which VMM a run boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// ember itself.
    Ember,
    /// A peer.
    Peer(Peer),
}

impl Target {
    /// Name used in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Target::Ember => "ember",
            Target::Peer(p) => p.kind.name(),
        }
    }
}

/// One boot to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// What boots.
    pub target: Target,
    /// Run number of this target, from 1.
    pub run: usize,
    /// Position in the whole bench, from 1.
    pub seq: usize,
    /// Which [`RunContext`] of the bench it runs with (0 but in `ember bench --ab`, where
    /// each side has its own).
    pub ctx: usize,
}

impl Job {
    /// `ember #2`.
    pub fn label(&self) -> String {
        format!("{} #{}", self.target.name(), self.run)
    }
}

/// What every run shares.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The ember binary (for `ember run`).
    pub ember_bin: PathBuf,
    /// The guest.
    pub guest: GuestSpec,
    /// The command line ember gets (it adds the host's switches itself).
    pub ember_cmdline: String,
    /// Extra flags for `ember run`.
    pub ember_flags: Vec<String>,
    /// Marker line text on the console.
    pub marker: String,
    /// Per-run time limit.
    pub timeout: Duration,
    /// Scratch directory for reports and configs.
    pub workdir: PathBuf,
    /// Profile the ember runs.
    pub profile: bool,
    /// Runs are stopped after the set-up (`ember run` exits with 124 then).
    pub setup_only: bool,
    /// The name ember's runs are recorded under instead of `ember` (an `--ab` side).
    pub name: Option<String>,
}

/// What one run produced.
#[derive(Debug, Clone, Default)]
pub struct RunRecord {
    /// VMM name.
    pub vmm: String,
    /// Run number of this VMM.
    pub run: usize,
    /// Position in the bench.
    pub seq: usize,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// `CLOCK_MONOTONIC` just before the spawn: the run's time zero.
    pub spawn_ns: u64,
    /// How the process ended.
    pub exit: Option<ChildExit>,
    /// First byte of guest console output, as the host saw it.
    pub console_first_ns: Option<u64>,
    /// The marker text on the console, as the host saw it.
    pub marker_ns: Option<u64>,
    /// The peer's boot-timer log line (Firecracker).
    pub peer_boot_timer_ns: Option<u64>,
    /// Memory of the process when the marker appeared (guest RAM found by size).
    pub mem_at_marker: Option<MemSample>,
    /// CPU time (all threads) the process had used when the marker appeared, in ms.
    pub cpu_at_marker_ms: Option<f64>,
    /// ember's own report (`--bench-report`).
    pub report: Option<Json>,
    /// Guest profile written by the run.
    pub profile: Option<PathBuf>,
    /// Last console and stderr bytes, for error messages.
    pub output_tail: String,
}

/// Progress of the bench, for the caller's progress line.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A run started.
    Started(Job),
    /// A run ended; the record says how.
    Finished(Box<RunRecord>),
}

/// Scans a console stream: first byte, marker, and (for peers that log to the console)
/// their log lines.
#[derive(Debug)]
pub struct ConsoleScanner {
    marker: Vec<u8>,
    peer: Option<Peer>,
    line: Vec<u8>,
    line_start_ns: u64,
    /// First console byte.
    pub first_ns: Option<u64>,
    /// Marker seen.
    pub marker_ns: Option<u64>,
    /// Peer boot-timer log line seen.
    pub boot_timer_ns: Option<u64>,
}

/// Longest line kept for matching (longer lines are cut; the kernel's are far shorter).
const MAX_LINE: usize = 4096;

impl ConsoleScanner {
    /// A scanner for `marker`, telling `peer`'s log lines apart from guest output.
    pub fn new(marker: &str, peer: Option<Peer>) -> Self {
        Self {
            marker: marker.as_bytes().to_vec(),
            peer,
            line: Vec::new(),
            line_start_ns: 0,
            first_ns: None,
            marker_ns: None,
            boot_timer_ns: None,
        }
    }

    fn logs_to_console(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| p.boot_timer_line().is_some())
    }

    /// Feeds bytes that arrived at `now_ns`. Returns true when this chunk completed the
    /// marker.
    pub fn feed(&mut self, chunk: &[u8], now_ns: u64) -> bool {
        let had_marker = self.marker_ns.is_some();
        if !chunk.is_empty() && !self.logs_to_console() {
            self.first_ns.get_or_insert(now_ns);
        }
        for &b in chunk {
            if self.line.is_empty() {
                self.line_start_ns = now_ns;
            }
            if b == b'\n' {
                self.end_line(now_ns);
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        // A marker at the start of a line that is still being written counts now.
        if self.marker_ns.is_none()
            && !self.line.is_empty()
            && !self.is_log_line()
            && self.line_has_marker()
        {
            self.marker_ns = Some(now_ns);
        }
        !had_marker && self.marker_ns.is_some()
    }

    fn line_has_marker(&self) -> bool {
        !self.marker.is_empty()
            && self
                .line
                .windows(self.marker.len())
                .any(|w| w == self.marker)
    }

    fn is_log_line(&self) -> bool {
        let text = String::from_utf8_lossy(&self.line);
        self.peer.as_ref().is_some_and(|p| p.is_log_line(&text))
    }

    fn end_line(&mut self, now_ns: u64) {
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        if self.is_log_line() {
            let text = String::from_utf8_lossy(&self.line);
            if let Some(pat) = self.peer.as_ref().and_then(Peer::boot_timer_line) {
                if text.contains(pat) {
                    self.boot_timer_ns.get_or_insert(self.line_start_ns);
                }
            }
        } else {
            self.first_ns.get_or_insert(self.line_start_ns);
            if self.marker_ns.is_none() && self.line_has_marker() {
                self.marker_ns = Some(now_ns);
            }
        }
        self.line.clear();
    }
}

/// Keeps the last bytes of a stream.
#[derive(Debug, Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    const MAX: usize = 4096;
    fn push(&mut self, b: &[u8]) {
        self.0.extend(b);
        while self.0.len() > Self::MAX {
            self.0.pop_front();
        }
    }
    fn text(&self) -> String {
        let (a, b) = self.0.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

/// The `ember run` flags of one bench run.
fn ember_command(ctx: &RunContext, job: &Job) -> (Command, PathBuf, Option<PathBuf>) {
    // Named by the position in the bench: unique even when the runs of several contexts
    // share the scratch directory, so no run reads another's report.
    let report = ctx.workdir.join(format!("ember-{}.json", job.seq));
    let g = &ctx.guest;
    let mut cmd = Command::new(&ctx.ember_bin);
    cmd.arg("run").arg("--kernel").arg(&g.kernel);
    if let Some(i) = &g.initrd {
        cmd.arg("--initrd").arg(i);
    }
    for d in &g.disks {
        cmd.arg("--disk").arg(d);
    }
    if let Some(r) = &g.root {
        cmd.arg("--root").arg(r);
    }
    cmd.arg("--cmdline")
        .arg(&ctx.ember_cmdline)
        .arg("--vcpus")
        .arg(g.vcpus.to_string())
        .arg("--mem")
        .arg(g.mem_mib.to_string())
        .arg("--log-level")
        .arg("warn")
        .arg("--bench-report")
        .arg(&report);
    let profile = ctx.profile.then(|| {
        let p = ctx.workdir.join(format!("profile-{}.txt", job.seq));
        cmd.arg("--profile-guest").arg(&p);
        p
    });
    cmd.args(&ctx.ember_flags);
    (cmd, report, profile)
}

/// Makes the child get SIGKILL when the thread that started it goes away (a bench that is
/// stopped must not leave VMs running).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs one boot to its end (or its timeout) and records it.
pub fn run_job(ctx: &RunContext, job: &Job) -> RunRecord {
    let vmm = match (&job.target, &ctx.name) {
        (Target::Ember, Some(name)) => name.clone(),
        _ => job.target.name().to_string(),
    };
    let mut rec = RunRecord {
        vmm,
        run: job.run,
        seq: job.seq,
        ..Default::default()
    };
    let (mut cmd, report_path, peer) = match &job.target {
        Target::Ember => {
            let (cmd, report, profile) = ember_command(ctx, job);
            rec.profile = profile;
            (cmd, Some(report), None)
        }
        Target::Peer(p) => match p.command(&ctx.guest, &ctx.workdir, job.run) {
            Ok(cmd) => (cmd, None, Some(p.clone())),
            Err(e) => {
                rec.error = Some(format!("cannot prepare {}: {e}", p.kind.name()));
                return rec;
            }
        },
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);

    rec.spawn_ns = procfs::monotonic_ns();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            rec.error = Some(format!("cannot start {}: {e}", job.target.name()));
            return rec;
        }
    };
    let pid = child.id();
    let guest_size = ctx.guest.mem_mib << 20;
    let tail = Arc::new(Mutex::new(Tail::default()));
    let scanner = Arc::new(Mutex::new(ConsoleScanner::new(&ctx.marker, peer)));
    let mem_at_marker = Arc::new(Mutex::new((None, None)));

    let mut readers = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let (tail, scanner, mem) = (tail.clone(), scanner.clone(), mem_at_marker.clone());
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match out.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let now = procfs::monotonic_ns();
                        lock(&tail).push(&buf[..n]);
                        if lock(&scanner).feed(&buf[..n], now) {
                            // The child is alive (it just wrote): sample it now, CPU first.
                            let cpu = procfs::process_cpu_ms(pid);
                            let m = procfs::read_smaps(Some(pid))
                                .ok()
                                .and_then(|v| MemSample::by_size(&v, guest_size));
                            *lock(&mem) = (m, cpu);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }));
    }
    if let Some(mut err) = child.stderr.take() {
        let tail = tail.clone();
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                lock(&tail).push(&buf[..n]);
            }
        }));
    }

    match procfs::wait_child(pid, Some(ctx.timeout)) {
        Ok(Some(exit)) => rec.exit = Some(exit),
        Ok(None) => {
            // Not reaped yet, so the pid is still this child's: killing it is safe.
            let _ = child.kill();
            rec.error = Some(format!(
                "did not end within {} s; killed (raise --timeout?)",
                ctx.timeout.as_secs()
            ));
            rec.exit = procfs::wait_child(pid, None).ok().flatten();
        }
        Err(e) => rec.error = Some(format!("cannot wait for the process: {e}")),
    }
    for r in readers {
        let _ = r.join();
    }
    let s = lock(&scanner);
    rec.console_first_ns = s.first_ns;
    rec.marker_ns = s.marker_ns;
    rec.peer_boot_timer_ns = s.boot_timer_ns;
    drop(s);
    (rec.mem_at_marker, rec.cpu_at_marker_ms) = *lock(&mem_at_marker);
    rec.output_tail = lock(&tail).text();

    if let Some(path) = report_path {
        match std::fs::read_to_string(&path) {
            Ok(text) => match Json::parse(&text) {
                Ok(j) => rec.report = Some(j),
                Err(e) => {
                    rec.error = rec
                        .error
                        .take()
                        .or(Some(format!("bad report {}: {e}", path.display())));
                }
            },
            Err(e) => {
                rec.error = rec.error.take().or(Some(format!(
                    "ember wrote no report ({}: {e})",
                    path.display()
                )));
            }
        }
    }
    if rec.error.is_none() {
        if let Some(exit) = &rec.exit {
            let expected = if ctx.setup_only { 124 } else { 0 };
            if exit.code != Some(expected) {
                rec.error = Some(match (exit.code, exit.signal) {
                    (Some(c), _) => format!("exited with status {c}"),
                    (None, Some(s)) => format!("killed by signal {s}"),
                    _ => "ended abnormally".into(),
                });
            }
        }
    }
    rec
}

/// Runs `jobs` with `parallel` at a time, in order, each with its context among `ctxs`,
/// reporting progress on `progress`.
pub fn run_jobs(
    ctxs: &[RunContext],
    jobs: Vec<Job>,
    parallel: usize,
    progress: &Sender<Progress>,
) -> Vec<RunRecord> {
    let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            let (queue, results, progress) = (queue.clone(), results.clone(), progress.clone());
            s.spawn(move || loop {
                let Some(job) = lock(&queue).pop_front() else {
                    break;
                };
                let _ = progress.send(Progress::Started(job.clone()));
                let rec = match ctxs.get(job.ctx) {
                    Some(ctx) => run_job(ctx, &job),
                    None => RunRecord {
                        vmm: job.target.name().to_string(),
                        run: job.run,
                        seq: job.seq,
                        error: Some(format!("no run context #{} (a bench bug)", job.ctx)),
                        ..Default::default()
                    },
                };
                let _ = progress.send(Progress::Finished(Box::new(rec.clone())));
                lock(&results).push(rec);
            });
        }
    });
    let mut out = std::mem::take(&mut *lock(&results));
    out.sort_by_key(|r| r.seq);
    out
}

/// Removes the scratch directory of a bench.
pub fn remove_workdir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        log::debug!("cannot remove {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::peers::PeerKind;

    #[test]
    fn scanner_finds_first_byte_and_marker_across_chunks() {
        let mut s = ConsoleScanner::new("ember-init:", None);
        assert!(!s.feed(b"[    0.1] Linux version\r\n[ 0.2] x", 100));
        assert_eq!(s.first_ns, Some(100));
        assert!(!s.feed(b"yz\r\nember-i", 200));
        assert!(s.feed(b"nit: running: true\r\n", 300));
        assert!(!s.feed(b"ember-init: exit status 0\r\n", 400));
        assert_eq!(s.marker_ns, Some(300));
    }

    #[test]
    fn scanner_tells_firecracker_logs_from_guest_output() {
        let fc = Peer {
            kind: PeerKind::Firecracker,
            binary: "fc".into(),
        };
        let mut s = ConsoleScanner::new("ember-init:", Some(fc));
        s.feed(
            b"2026-11-23T15:49:22.194758174 [anonymous-instance:main] Running Firecracker v1\n",
            10,
        );
        assert_eq!(s.first_ns, None, "a log line is not guest output");
        s.feed(b"[    0.000000] Linux", 20);
        s.feed(b" version\n", 30);
        assert_eq!(s.first_ns, Some(20));
        s.feed(
            b"2026-11-23T15:49:50.1 [anonymous-instance:fc_vcpu 0] Guest-boot-time = 123 us 0 ms\n",
            40,
        );
        assert_eq!(s.boot_timer_ns, Some(40));
        assert!(s.feed(b"ember-init: running: true\n", 50));
        assert_eq!(s.marker_ns, Some(50));
    }

    #[test]
    fn every_run_has_its_own_report_file() {
        // A/B: run 1 of A and run 1 of B share the scratch directory (and may run at once).
        let ctx = |name: &str| RunContext {
            ember_bin: "/bin/ember".into(),
            guest: GuestSpec {
                kernel: "/k".into(),
                initrd: None,
                disks: vec![],
                root: None,
                root_cmdline: None,
                cmdline: "console=ttyS0".into(),
                vcpus: 1,
                mem_mib: 16,
                acpi: true,
                rng: true,
            },
            ember_cmdline: "console=ttyS0".into(),
            ember_flags: vec![],
            marker: "x".into(),
            timeout: Duration::from_secs(1),
            workdir: "/tmp/w".into(),
            profile: true,
            setup_only: false,
            name: Some(name.into()),
        };
        let job = |seq, ctx| Job {
            target: Target::Ember,
            run: 1,
            seq,
            ctx,
        };
        let (_, report_a, profile_a) = ember_command(&ctx("A"), &job(1, 0));
        let (_, report_b, profile_b) = ember_command(&ctx("B"), &job(2, 1));
        assert_ne!(report_a, report_b);
        assert_ne!(profile_a, profile_b);
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; 5000]);
        t.push(b"end");
        let s = t.text();
        assert_eq!(s.len(), Tail::MAX);
        assert!(s.ends_with("aend"));
    }
}
