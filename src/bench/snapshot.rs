// SPDX-License-Identifier: Apache-2.0
//! `ember bench --snapshot`: snapshot and restore of the same guest, one row per VMM and run
//! (issue 13). Each row boots the guest, lets its init print a marker and then a tick every
//! half second ([`TICK_COMMAND`]), pauses it, writes a full snapshot, ends that process,
//! restores the snapshot in a fresh process and watches the console for a while: did the
//! guest go on printing ticks (`resumed`), did it reset, and how long each step took.
//!
//! Rows, one per VMM and run, alternating (ember #1, then each peer's #1, ember #2, ...):
//! - ember ([`ember_row`]), with its public command line only: `ember run <guest>
//!   --boot-timer --snapshot-to DIR --snapshot-on sigusr2 --snapshot-then stop`; at the
//!   snapshot point SIGUSR2, on which ember pauses the guest, writes the snapshot and ends with
//!   status 0, logging `snapshot written to DIR (guest paused X)`; then, in a new process,
//!   `ember restore --no-stdin DIR`, which logs `restored the snapshot in DIR: vCPUs started
//!   ...` once the guest runs ([`EmberRestoreLine`]). Times are taken from outside as for
//!   Firecracker (spawn, the log lines' arrival, the console), ember's own figures from
//!   those two log lines. Not measured here: the warm `ember exec` path (`ember bench
//!   --exec`).
//! - Firecracker ([`firecracker_row`]), driven through its API socket with the small HTTP
//!   client of [`super::http`]: `PUT /boot-source`, `/machine-config`, `/drives/ID`,
//!   `/actions InstanceStart`; at the snapshot point `PATCH /vm {"state": "Paused"}` and
//!   `PUT /snapshot/create` (Full); then, in a new process, `PUT /snapshot/load` with
//!   `resume_vm: true` and a `File` memory backend.
//!
//! Every process a row starts is killed and reaped on every path (the `VmmProcess` guard,
//! and `PR_SET_PDEATHSIG` should the bench itself die); the row's scratch directory (API
//! sockets, snapshot files) is removed when the row ends, error or not.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{Client, Response};
use super::json::Json;
use super::peers::{self, GuestSpec, Peer, PeerKind, PeerSpec};
use super::procfs::{self, ChildExit};
use super::{runner, BenchError, BenchOptions};
use crate::devices::bus::lock;

/// The guest command of snapshot mode (given to the default guest's init as `ember.cmd=`
/// unless the command line has one): a tick line with the guest's uptime (`tick 3 41.57`)
/// every half second plus the cost of starting `sleep`, for ever. Only `sleep` is a new
/// process (every exec is slow on a PVM host); a busybox without fractional `sleep` falls
/// back to one second.
pub const TICK_COMMAND: &str = "i=0; while :; do read u r </proc/uptime; echo tick $i $u; \
     i=$((i+1)); sleep 0.5 || sleep 1; done";

/// Guest lines after the marker line that the bench waits for before it takes the snapshot
/// (so that the guest's command is running: with [`TICK_COMMAND`], `tick 0` and `tick 1`).
pub const LINES_BEFORE_SNAPSHOT: usize = 2;

/// Seconds the restored guest is watched by default (`--snapshot-watch`).
pub const DEFAULT_WATCH_S: u64 = 8;

/// How long a VMM's API socket may take to answer after the spawn.
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one API request may take (a snapshot of a large guest writes all its memory).
const API_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Log lines of the restoring process kept in a row.
const MAX_LOG_LINES: usize = 100;

/// Options of snapshot mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMode {
    /// How long the restored guest is watched.
    pub watch: Duration,
}

impl Default for SnapshotMode {
    fn default() -> Self {
        Self {
            watch: Duration::from_secs(DEFAULT_WATCH_S),
        }
    }
}

/// One snapshot/restore of one VMM: every figure is `None` when that step was not reached.
/// Times are milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotRow {
    /// The VMM (`ember` or `firecracker`).
    pub vmm: String,
    /// Run number, from 1.
    pub run: usize,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// Booting process: its API socket answered (since its spawn).
    pub boot_api_ready_ms: Option<f64>,
    /// Booting process: the start request took this long (Firecracker's InstanceStart).
    pub instance_start_ms: Option<f64>,
    /// Booting process: the VMM's own boot-timer log line (since its spawn).
    pub boot_timer_ms: Option<f64>,
    /// Booting process: the marker line on the console (since its spawn).
    pub marker_ms: Option<f64>,
    /// Booting process: the guest line the snapshot waited for (since its spawn).
    pub snapshot_point_ms: Option<f64>,
    /// The pause request.
    pub pause_ms: Option<f64>,
    /// The snapshot request (state and memory files written).
    pub create_ms: Option<f64>,
    /// Size of the state file.
    pub state_bytes: Option<u64>,
    /// Size of the memory file.
    pub memory_bytes: Option<u64>,
    /// Disk space the memory file takes (it may be sparse).
    pub memory_disk_bytes: Option<u64>,
    /// The last guest line before the snapshot.
    pub last_line_before: Option<String>,
    /// The booting VMM's log lines from the pause request on (the first 100).
    pub log_at_snapshot: Vec<String>,
    /// Restoring process: its API socket answered (since its spawn).
    pub spawn_to_api_ms: Option<f64>,
    /// The load request (restore, and resume).
    pub load_ms: Option<f64>,
    /// Restoring process: spawn to the load request's answer.
    pub spawn_to_loaded_ms: Option<f64>,
    /// How long the restored guest was watched (less than asked when the VMM ended).
    pub watched_ms: Option<f64>,
    /// The restored guest printed something new.
    pub resumed: Option<bool>,
    /// The first tick after the load is the one after the last tick before the snapshot
    /// (`None` unless both are tick lines).
    pub ticks_continue: Option<bool>,
    /// First new guest output, since the load request's answer (negative: before it).
    pub first_output_after_load_ms: Option<f64>,
    /// Guest lines printed after the load.
    pub lines_after_load: u64,
    /// The longest time without guest output while the restored guest was watched (from the
    /// load's answer to the first line, between lines, from the last line to the end).
    pub longest_silence_ms: Option<f64>,
    /// Of these, tick lines (`tick N`).
    pub ticks_after_load: u64,
    /// The first guest line after the load.
    pub first_line_after: Option<String>,
    /// The last guest line after the load.
    pub last_line_after: Option<String>,
    /// The restoring VMM ended by itself (Firecracker does on a guest reset), this long after
    /// the load request's answer.
    pub reset_after_ms: Option<f64>,
    /// Exit code of the restoring VMM when it ended by itself.
    pub exit_code: Option<i32>,
    /// Signal that ended the restoring VMM, when one did by itself.
    pub signal: Option<i32>,
    /// The restoring VMM's own log lines (the first 100).
    pub log_after_load: Vec<String>,
    /// Durations the VMMs logged themselves, in ms (Firecracker: `'load snapshot' API
    /// request took N us.` as `load snapshot`).
    pub vmm_reported_ms: Vec<(String, f64)>,
    /// ember: SIGUSR2 sent to the booting process's exit (snapshot written, process ended).
    pub signal_to_exit_ms: Option<f64>,
    /// ember: how long its guest was paused for the snapshot (pause, state and memory files
    /// written), from its log line `snapshot written to DIR (guest paused X)`.
    pub snapshot_paused_ms: Option<f64>,
    /// ember: what `ember restore` logged once the restored guest's vCPUs started.
    pub ember_restore: Option<EmberRestoreLine>,
    /// Restoring process: its spawn to the first guest output.
    pub spawn_to_first_output_ms: Option<f64>,
    /// Restoring process: its resident memory (`VmRSS`) when the first guest line had
    /// arrived (read within about 10 ms of it).
    pub rss_at_first_output_bytes: Option<u64>,
}

/// What `ember restore` logs (at info level) once the restored guest's vCPUs run:
/// `restored the snapshot in DIR: vCPUs started 7.9 ms after ember started (VM with guest
/// memory mapped at 3.1 ms); RSS 3.9 MiB (0.3 MiB anonymous, 3.6 MiB file-backed)`
/// (src/builder.rs, `log_restored`). A figure ember could not tell (`-`) is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EmberRestoreLine {
    /// ember's start to every vCPU thread started, ms.
    pub vcpus_started_ms: Option<f64>,
    /// ember's start to the VM with its guest memory mapped from the snapshot, ms.
    pub memory_mapped_ms: Option<f64>,
    /// ember's resident memory then (`VmRSS`), bytes (from MiB with one decimal).
    pub rss_bytes: Option<u64>,
    /// Of it anonymous (`RssAnon`), bytes.
    pub rss_anon_bytes: Option<u64>,
    /// Of it file-backed (`RssFile`), bytes.
    pub rss_file_bytes: Option<u64>,
}

/// Everything `ember bench --snapshot` measured.
#[derive(Debug, Clone)]
pub struct SnapshotResults {
    /// Every row, in order.
    pub rows: Vec<SnapshotRow>,
    /// Notes for the reader.
    pub notes: Vec<String>,
    /// The command line the peers' guest got.
    pub cmdline: String,
    /// The command line ember was given (it adds the host's switches itself).
    pub ember_cmdline: String,
    /// `--version` of each peer binary.
    pub versions: Vec<(String, String)>,
    /// Wall time of the whole bench.
    pub wall: Duration,
    /// Options.
    pub options: BenchOptions,
}

/// What the rows of one bench share.
#[derive(Debug, Clone)]
pub struct SnapshotContext {
    /// The guest, with the command line the peers get.
    pub guest: GuestSpec,
    /// The command line ember gets (it adds the host's switches and the root device itself).
    pub ember_cmdline: String,
    /// Further `ember run` flags (`--no-host-tuning`, `--no-acpi`).
    pub ember_flags: Vec<String>,
    /// Marker line text.
    pub marker: String,
    /// Limit for a boot to the snapshot point.
    pub boot_timeout: Duration,
    /// How long a restored guest is watched.
    pub watch: Duration,
    /// Scratch directory; each row makes and removes its own directory in it.
    pub workdir: PathBuf,
}

/// Runs snapshot mode: `opts.snapshot` must be set. Calls `on_progress` with a line at each
/// step.
pub fn run_snapshot_bench(
    opts: &BenchOptions,
    on_progress: &mut dyn FnMut(&str),
) -> Result<SnapshotResults, BenchError> {
    let mode = opts
        .snapshot
        .ok_or_else(|| BenchError::Usage("snapshot mode was not asked for".into()))?;
    if opts.runs == 0 {
        return Err(BenchError::Usage("--runs must be at least 1".into()));
    }
    let started = Instant::now();
    let host = crate::host::HostInfo::detect();
    let mut notes = Vec::new();
    let mut peers = Vec::new();
    // As in the boot bench, a peer that was asked for and is not installed is an error,
    // before anything boots. QEMU is not run here (no snapshot row), so it need not be.
    for spec in &opts.compare {
        let spec = PeerSpec::parse(spec).map_err(BenchError::Usage)?;
        if spec.kind == PeerKind::Firecracker {
            peers.push(spec.resolve().map_err(BenchError::Usage)?);
        } else {
            notes.push(format!(
                "{}: no snapshot row (only ember's and Firecracker's are written)",
                spec.kind.name()
            ));
        }
    }
    if opts.parallel > 1 {
        notes.push("--snapshot runs one VMM process at a time; --parallel is ignored".into());
    }
    let ember_bin = match &opts.ember_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(BenchError::Exe)?,
    };
    let ember_cmdline = opts.guest.cmdline.clone();
    let cmdline = super::peer_cmdline(opts, &host, !peers.is_empty(), &mut notes);
    let mut ember_flags = Vec::new();
    if !opts.host_tuning {
        ember_flags.push("--no-host-tuning".to_string());
    }
    if !opts.acpi {
        ember_flags.push("--no-acpi".to_string());
        notes.push("--no-acpi: ember's guest had no ACPI tables (acpi=off)".into());
    }
    if crate::host::has_param(&opts.guest.cmdline, "ember.cmd")
        && !opts.guest.cmdline.contains(TICK_COMMAND)
    {
        notes.push(format!(
            "the guest runs the command line's own ember.cmd=: the snapshot is taken once it \
             printed {LINES_BEFORE_SNAPSHOT} lines after the marker, and `resumed` means any \
             new line"
        ));
    }
    notes.push(format!(
        "each row: boot, wait for the marker {:?} and {LINES_BEFORE_SNAPSHOT} more guest \
         lines, pause, full snapshot, end the process, restore in a new process and watch the \
         console for {} s; `resumed` = the restored guest printed a new line; runs alternate \
         between VMMs (ember #1, then each peer's #1, ember #2, ...)",
        opts.marker,
        mode.watch.as_secs_f64()
    ));
    notes.push(
        "ember: `ember run <guest> --boot-timer --snapshot-to DIR --snapshot-on sigusr2 \
         --snapshot-then stop`, SIGUSR2 at the snapshot point (ember pauses the guest, writes \
         the snapshot and ends with status 0; `guest paused` is its own log line's figure), \
         then `ember restore --no-stdin DIR` in a new process; its `spawn to VM running` is \
         when its log line `restored the snapshot` arrived, and `vCPUs started`, `memory \
         mapped` and its RSS are that line's own figures (since ember's start)"
            .into(),
    );
    if !peers.is_empty() {
        notes.push(
            "Firecracker: API socket, no jailer; snapshot and memory files in a scratch \
             directory (removed afterwards); load with resume_vm and a File memory backend; \
             its `spawn to VM running` is when the load request (with resume) answered"
                .into(),
        );
    }
    notes.push(
        "`RSS at first output` is the restoring process's VmRSS (/proc/PID/status), read \
         within about 10 ms of the restored guest's first line, for every VMM"
            .into(),
    );
    let mut versions = vec![(
        "ember".to_string(),
        ember_version(&ember_bin, &opts.ember_bin),
    )];
    versions.extend(
        peers
            .iter()
            .map(|p| (p.kind.name().to_string(), peer_version(p))),
    );

    remove_stale_workdirs(&std::env::temp_dir());
    let workdir = std::env::temp_dir().join(format!("{WORKDIR_PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|source| BenchError::Workdir {
        path: workdir.clone(),
        source,
    })?;
    let mut guest = opts.guest.clone();
    guest.cmdline = cmdline.clone();
    let ctx = SnapshotContext {
        guest,
        ember_cmdline: ember_cmdline.clone(),
        ember_flags,
        marker: opts.marker.clone(),
        boot_timeout: opts.timeout,
        watch: mode.watch,
        workdir: workdir.clone(),
    };
    let mut rows = Vec::new();
    for run in 1..=opts.runs {
        // Alternate VMMs so that they share the host's noise: ember first, then each peer.
        let row = ember_row(&ember_bin, &ctx, run, on_progress);
        rows.push(reported(row, on_progress));
        for peer in &peers {
            let row = match peer.kind {
                PeerKind::Firecracker => firecracker_row(peer, &ctx, run, on_progress),
                PeerKind::Qemu => continue, // filtered out above
            };
            rows.push(reported(row, on_progress));
        }
    }
    runner::remove_workdir(&workdir);
    for r in rows.iter().filter(|r| r.error.is_some()) {
        notes.push(format!(
            "{} #{} failed: {}",
            r.vmm,
            r.run,
            r.error.as_deref().unwrap_or_default()
        ));
    }
    Ok(SnapshotResults {
        rows,
        notes,
        cmdline,
        ember_cmdline,
        versions,
        wall: started.elapsed(),
        options: opts.clone(),
    })
}

/// Says how a row ended, and hands it back.
fn reported(row: SnapshotRow, on_progress: &mut dyn FnMut(&str)) -> SnapshotRow {
    on_progress(&format!(
        "{}: {}",
        row.label(),
        match (&row.error, row.resumed) {
            (Some(e), _) => format!("FAILED: {e}"),
            (None, Some(true)) => "restored guest resumed".into(),
            (None, _) => "restored guest printed nothing new".into(),
        }
    ));
    row
}

/// The first line of `ember --version`, and which build it is when it is this process's
/// own binary.
fn ember_version(bin: &Path, given: &Option<PathBuf>) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let v = match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("?")
            .to_string(),
        Err(e) => format!("? ({e})"),
    };
    if given.is_some() {
        v
    } else if cfg!(debug_assertions) {
        format!("{v} (debug build)")
    } else {
        format!("{v} (release build)")
    }
}

/// Scratch directories are `$TMPDIR/ember-bench-snap-PID`.
const WORKDIR_PREFIX: &str = "ember-bench-snap-";

/// Removes the scratch directories (with their snapshot files, a guest's memory each) of
/// snapshot benches whose process is gone: one stopped by a signal could not remove its own.
fn remove_stale_workdirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(WORKDIR_PREFIX))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the pid exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            runner::remove_workdir(&e.path());
        }
    }
}

/// The first line of `BINARY --version` (Firecracker prints a log line after it).
fn peer_version(peer: &Peer) -> String {
    let out = Command::new(&peer.binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("?")
            .to_string(),
        Err(e) => format!("? ({e})"),
    }
}

/// Milliseconds from `from_ns` to `to_ns` (`CLOCK_MONOTONIC`), negative when `to` is earlier.
fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns as f64 - from_ns as f64) / 1e6
}

/// Firecracker's row: see the module documentation.
pub fn firecracker_row(
    peer: &Peer,
    ctx: &SnapshotContext,
    run: usize,
    on_progress: &mut dyn FnMut(&str),
) -> SnapshotRow {
    row_in_workdir(peer.kind.name(), ctx, run, |dir, row| {
        firecracker_steps(peer, ctx, dir, row, on_progress)
    })
}

/// A row of `vmm`: `steps` run in a scratch directory of the bench's work directory, which
/// is removed afterwards (every process of the row has been killed and reaped by then: the
/// guards are dropped); an error of the steps becomes the row's error.
fn row_in_workdir(
    vmm: &str,
    ctx: &SnapshotContext,
    run: usize,
    steps: impl FnOnce(&Path, &mut SnapshotRow) -> Result<(), String>,
) -> SnapshotRow {
    let mut row = SnapshotRow {
        vmm: vmm.to_string(),
        run,
        ..Default::default()
    };
    let dir = ctx.workdir.join(format!("{vmm}-{run}"));
    let result = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
        .and_then(|()| steps(&dir, &mut row));
    runner::remove_workdir(&dir);
    if let Err(e) = result {
        row.error = Some(e);
    }
    row
}

/// The text of ember's `--boot-timer` log line (`boot timer: guest userspace started 18.123 s
/// after ember started`, src/devices/legacy/boot_timer.rs).
const EMBER_BOOT_TIMER_LINE: &str = "boot timer: guest userspace started";

/// ember's row: see the module documentation. `ember` is the ember binary to run.
pub fn ember_row(
    ember: &Path,
    ctx: &SnapshotContext,
    run: usize,
    on_progress: &mut dyn FnMut(&str),
) -> SnapshotRow {
    row_in_workdir("ember", ctx, run, |dir, row| {
        ember_steps(ember, ctx, dir, row, on_progress)
    })
}

/// The arguments of the booting `ember run`: the bench's guest (with ember's own command
/// line: ember adds the host's switches itself), its boot-timer log line, and a snapshot
/// into `snapshot_dir` on SIGUSR2 that ends the run.
fn ember_boot_args(ctx: &SnapshotContext, snapshot_dir: &Path) -> Vec<std::ffi::OsString> {
    let g = &ctx.guest;
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |v: &dyn AsRef<std::ffi::OsStr>| a.push(v.as_ref().to_os_string());
    for v in ["--log-level", "info", "run", "--kernel"] {
        push(&v);
    }
    push(&g.kernel);
    if let Some(i) = &g.initrd {
        push(&"--initrd");
        push(i);
    }
    for d in &g.disks {
        push(&"--disk");
        push(d);
    }
    if let Some(r) = &g.root {
        push(&"--root");
        push(r);
    }
    push(&"--cmdline");
    push(&ctx.ember_cmdline);
    push(&"--vcpus");
    push(&g.vcpus.to_string());
    push(&"--mem");
    push(&g.mem_mib.to_string());
    push(&"--boot-timer");
    push(&"--snapshot-to");
    push(&snapshot_dir);
    for v in ["--snapshot-on", "sigusr2", "--snapshot-then", "stop"] {
        push(&v);
    }
    for f in &ctx.ember_flags {
        push(f);
    }
    a
}

/// The steps of ember's row; figures land in `row` as they are measured, so a failure keeps
/// what came before it.
fn ember_steps(
    ember: &Path,
    ctx: &SnapshotContext,
    dir: &Path,
    row: &mut SnapshotRow,
    on_progress: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let label = row.label();
    let snapshot = dir.join("snapshot");

    // 1. Boot, with the snapshot armed for SIGUSR2.
    on_progress(&format!(
        "{label}: booting (ember run --snapshot-on sigusr2)"
    ));
    let args = ember_boot_args(ctx, &snapshot);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut vm = VmmProcess::spawn(ember, &args)?;

    // 2. Wait for the marker and the guest's first lines after it.
    let (at_ns, line) = wait_for_snapshot_point(&mut vm, ctx, row, EMBER_BOOT_TIMER_LINE)?;
    on_progress(&format!(
        "{label}: {line:?} at {:.1} s; SIGUSR2 (snapshot, then the run ends)",
        ms_between(vm.spawn_ns, at_ns) / 1e3
    ));

    // 3. SIGUSR2: ember pauses the guest, writes the snapshot and ends with status 0.
    let signal_ns = procfs::monotonic_ns();
    vm.signal(libc::SIGUSR2)?;
    let deadline = Instant::now()
        .checked_add(API_CALL_TIMEOUT)
        .ok_or("the clock is at its end")?;
    let exit = match vm.wait(deadline, |_| None::<()>) {
        Waited::Exited(e) => e,
        _ => {
            return Err(format!(
                "ember run did not end within {} s of SIGUSR2; its last output: {}",
                API_CALL_TIMEOUT.as_secs(),
                vm.tail()
            ))
        }
    };
    row.signal_to_exit_ms = Some(ms_between(signal_ns, exit.at_ns));
    let tail = vm.tail();
    let log = vm.finish();
    // The guest's last line in this process: the snapshot's, unless the guest printed
    // after the snapshot before the process ended (`ticks_continue` then says no).
    row.last_line_before = log.guest_lines().last().map(|l| l.text.clone());
    row.log_at_snapshot = log
        .stderr
        .iter()
        .filter(|l| l.at_ns >= signal_ns)
        .map(|l| l.text.clone())
        .take(MAX_LOG_LINES)
        .collect();
    row.snapshot_paused_ms = log
        .stderr
        .iter()
        .find_map(|l| snapshot_written_paused_ms(&l.text));
    if exit.code != Some(0) || row.snapshot_paused_ms.is_none() {
        return Err(format!(
            "ember run ended ({}) after SIGUSR2 without saying `snapshot written to`; its \
             last output: {tail}",
            describe_exit(&exit)
        ));
    }
    row.state_bytes = Some(file_sizes(&snapshot.join(crate::snapshot::format::STATE_FILE))?.0);
    let (len, disk) = file_sizes(&snapshot.join(crate::snapshot::format::MEMORY_FILE))?;
    (row.memory_bytes, row.memory_disk_bytes) = (Some(len), Some(disk));

    // 4. Restore in a fresh process; it says when the guest's vCPUs run.
    on_progress(&format!(
        "{label}: restoring in a new process (ember restore)"
    ));
    let mut vm = VmmProcess::spawn(
        ember,
        &[
            "--log-level".as_ref(),
            "info".as_ref(),
            "restore".as_ref(),
            "--no-stdin".as_ref(),
            snapshot.as_os_str(),
        ],
    )?;
    let deadline = Instant::now()
        .checked_add(API_CALL_TIMEOUT)
        .ok_or("the clock is at its end")?;
    let waited = vm.wait(deadline, |log| {
        log.stderr
            .iter()
            .find_map(|l| parse_ember_restored(&l.text).map(|r| (l.at_ns, r)))
    });
    let loaded_ns = match waited {
        Waited::Found((at_ns, restored)) => {
            row.ember_restore = Some(restored);
            at_ns
        }
        other => {
            let why = match other {
                Waited::Exited(e) => {
                    (row.exit_code, row.signal) = (e.code, e.signal);
                    format!("ended ({})", describe_exit(&e))
                }
                _ => format!("did not get there within {} s", API_CALL_TIMEOUT.as_secs()),
            };
            let tail = vm.tail();
            row.log_after_load = stderr_log(&vm.finish());
            return Err(format!(
                "ember restore {why} before it logged `restored the snapshot`; its last \
                 output: {tail}"
            ));
        }
    };
    row.spawn_to_loaded_ms = Some(ms_between(vm.spawn_ns, loaded_ns));
    on_progress(&format!(
        "{label}: restored; watching the console for {:.0} s",
        ctx.watch.as_secs_f64()
    ));

    // 5. Watch: new guest output, or ember ending by itself (a guest reset ends it).
    let log = watch_restored(vm, ctx, row, loaded_ns)?;
    row.log_after_load = stderr_log(&log);
    Ok(())
}

/// ember's log lines (its stderr), the first [`MAX_LOG_LINES`].
fn stderr_log(log: &ConsoleLog) -> Vec<String> {
    log.stderr
        .iter()
        .map(|l| l.text.clone())
        .take(MAX_LOG_LINES)
        .collect()
}

/// The pause of ember's log line `snapshot written to DIR (guest paused 12.3456ms); \`ember
/// restore DIR\` starts it again` (src/main.rs), in ms.
fn snapshot_written_paused_ms(line: &str) -> Option<f64> {
    let rest = line.split_once("snapshot written to ")?.1;
    // Up to the figure's `)`: the directory comes again after it.
    let head = match rest.rsplit_once("); `ember restore ") {
        Some((head, _)) => head,
        None => rest.rsplit_once(')')?.0,
    };
    debug_duration_ms(head.rsplit_once("(guest paused ")?.1)
}

/// A `Duration` as its `{:?}` writes it (`1.5s`, `12.3456ms`, `950.1µs`, `800ns`), in ms.
fn debug_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|&i| i > 0)?;
    let (number, unit) = s.split_at(split);
    let v: f64 = number.parse().ok()?;
    // Units per ms (a division keeps `950µs` exactly 0.95).
    let per_ms = match unit {
        "s" => 1e-3,
        "ms" => 1.0,
        "µs" | "us" => 1e3,
        "ns" => 1e6,
        _ => return None,
    };
    Some(v / per_ms)
}

/// ember's restore log line ([`EmberRestoreLine`]), or `None` for any other line.
fn parse_ember_restored(line: &str) -> Option<EmberRestoreLine> {
    let rest = line.split_once("restored the snapshot in ")?.1;
    // After the directory (which may hold anything): the figures.
    let figures = rest.rsplit_once(": vCPUs started ")?.1;
    let (vcpus, rest) = figures.split_once(" after ember started (")?;
    let mapped = rest.split_once("memory mapped at ")?.1.split_once(");")?.0;
    let rss = rest.split_once("; RSS ")?.1;
    let (total, rest) = rss.split_once(" (")?;
    let (anon, rest) = rest.split_once(" anonymous, ")?;
    let file = rest.split_once(" file-backed)")?.0;
    let ms = |v: &str| v.trim().strip_suffix(" ms")?.trim().parse::<f64>().ok();
    let mib = |v: &str| {
        let m: f64 = v.trim().strip_suffix(" MiB")?.trim().parse().ok()?;
        (m.is_finite() && m >= 0.0).then(|| (m * 1048576.0).round() as u64)
    };
    Some(EmberRestoreLine {
        vcpus_started_ms: ms(vcpus),
        memory_mapped_ms: ms(mapped),
        rss_bytes: mib(total),
        rss_anon_bytes: mib(anon),
        rss_file_bytes: mib(file),
    })
}

/// Sends one API request and fails with Firecracker's own message unless it succeeded.
fn api(client: &mut Client, method: &str, path: &str, body: &Json) -> Result<Response, String> {
    let r = client
        .call(method, path, Some(body))
        .map_err(|e| format!("{method} {path}: {e}"))?;
    if r.is_success() {
        Ok(r)
    } else {
        Err(format!(
            "{method} {path} answered {}: {}",
            r.status,
            r.fault_message()
        ))
    }
}

/// Times one API request.
fn timed_api(
    client: &mut Client,
    method: &str,
    path: &str,
    body: &Json,
) -> Result<(f64, u64), String> {
    let t = Instant::now();
    api(client, method, path, body)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    Ok((ms, procfs::monotonic_ns()))
}

/// A Unix socket path must fit `sockaddr_un` (107 bytes and a NUL).
fn check_socket_path(p: &Path) -> Result<(), String> {
    if p.as_os_str().len() > 107 {
        return Err(format!(
            "the API socket path {} is longer than 107 bytes; set TMPDIR to a shorter directory",
            p.display()
        ));
    }
    Ok(())
}

/// Size and disk usage of a file.
fn file_sizes(p: &Path) -> Result<(u64, u64), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).map_err(|e| format!("snapshot file {}: {e}", p.display()))?;
    Ok((m.len(), m.blocks() * 512))
}

/// The steps of Firecracker's row; figures land in `row` as they are measured, so a failure
/// keeps what came before it.
fn firecracker_steps(
    peer: &Peer,
    ctx: &SnapshotContext,
    dir: &Path,
    row: &mut SnapshotRow,
    on_progress: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let label = format!("{} #{}", row.vmm, row.run);
    let boot_sock = dir.join("api-boot.sock");
    let load_sock = dir.join("api-load.sock");
    let state = dir.join("vmstate");
    let memory = dir.join("memory");
    check_socket_path(&boot_sock)?;
    check_socket_path(&load_sock)?;

    // 1. Boot through the API, with the config the boot peer gets from its file.
    on_progress(&format!("{label}: booting (API socket)"));
    let mut fc = VmmProcess::spawn(
        &peer.binary,
        &[
            "--api-sock".as_ref(),
            boot_sock.as_os_str(),
            "--boot-timer".as_ref(),
        ],
    )?;
    let mut client = fc.wait_for_api(&boot_sock, API_READY_TIMEOUT)?;
    row.boot_api_ready_ms = Some(ms_between(fc.spawn_ns, procfs::monotonic_ns()));
    let config = peers::firecracker_config(&ctx.guest, None);
    for (path, key) in [
        ("/boot-source", "boot-source"),
        ("/machine-config", "machine-config"),
    ] {
        let body = config
            .get(key)
            .ok_or_else(|| format!("no {key} in the Firecracker config"))?;
        api(&mut client, "PUT", path, body)?;
    }
    for drive in config
        .get("drives")
        .and_then(Json::as_array)
        .unwrap_or_default()
    {
        let id = drive
            .get("drive_id")
            .and_then(Json::as_str)
            .ok_or("a drive without an id in the Firecracker config")?;
        api(&mut client, "PUT", &format!("/drives/{id}"), drive)?;
    }
    let start = Json::obj([("action_type", Json::from("InstanceStart"))]);
    let (ms, _) = timed_api(&mut client, "PUT", "/actions", &start)?;
    row.instance_start_ms = Some(ms);

    // 2. Wait for the marker and the guest's first lines after it.
    let (at_ns, line) = wait_for_snapshot_point(&mut fc, ctx, row, "Guest-boot-time")?;
    on_progress(&format!(
        "{label}: {line:?} at {:.1} s; pausing and snapshotting",
        ms_between(fc.spawn_ns, at_ns) / 1e3
    ));

    // 3. Pause, snapshot, end the process.
    let pause_ns = procfs::monotonic_ns();
    let paused = Json::obj([("state", Json::from("Paused"))]);
    let (ms, _) = timed_api(&mut client, "PATCH", "/vm", &paused)?;
    row.pause_ms = Some(ms);
    let create = Json::obj([
        ("snapshot_type", Json::from("Full")),
        ("snapshot_path", Json::from(state.display().to_string())),
        ("mem_file_path", Json::from(memory.display().to_string())),
    ]);
    let (ms, _) = timed_api(&mut client, "PUT", "/snapshot/create", &create)?;
    row.create_ms = Some(ms);
    row.last_line_before = lock(&fc.log).guest_lines().last().map(|l| l.text.clone());
    drop(client);
    let log = fc.finish();
    row.log_at_snapshot = log
        .log_lines()
        .filter(|l| l.at_ns >= pause_ns)
        .map(|l| l.text.clone())
        .chain(log.stderr_texts())
        .take(MAX_LOG_LINES)
        .collect();
    row.vmm_reported_ms
        .extend(log.log_lines().filter_map(|l| api_request_took(&l.text)));
    row.state_bytes = Some(file_sizes(&state)?.0);
    let (len, disk) = file_sizes(&memory)?;
    (row.memory_bytes, row.memory_disk_bytes) = (Some(len), Some(disk));

    // 4. Restore in a fresh process.
    on_progress(&format!("{label}: restoring in a new process"));
    let mut fc = VmmProcess::spawn(
        &peer.binary,
        &["--api-sock".as_ref(), load_sock.as_os_str()],
    )?;
    let mut client = fc.wait_for_api(&load_sock, API_READY_TIMEOUT)?;
    row.spawn_to_api_ms = Some(ms_between(fc.spawn_ns, procfs::monotonic_ns()));
    let load = Json::obj([
        ("snapshot_path", Json::from(state.display().to_string())),
        (
            "mem_backend",
            Json::obj([
                ("backend_path", Json::from(memory.display().to_string())),
                ("backend_type", Json::from("File")),
            ]),
        ),
        ("resume_vm", Json::from(true)),
    ]);
    let load_result = timed_api(&mut client, "PUT", "/snapshot/load", &load);
    // Whatever the load did, watch (a failed load ends Firecracker; its log says why).
    let (loaded_ns, load_error) = match load_result {
        Ok((ms, at)) => {
            row.load_ms = Some(ms);
            row.spawn_to_loaded_ms = Some(ms_between(fc.spawn_ns, at));
            (at, None)
        }
        Err(e) => (procfs::monotonic_ns(), Some(e)),
    };
    on_progress(&format!(
        "{label}: loaded; watching the console for {:.0} s",
        ctx.watch.as_secs_f64()
    ));

    // 5. Watch: new guest output, or the VMM ending (a guest reset ends Firecracker).
    let log = watch_restored(fc, ctx, row, loaded_ns)?;
    drop(client);
    row.log_after_load = log
        .log_lines()
        .map(|l| l.text.clone())
        .chain(log.stderr_texts())
        .take(MAX_LOG_LINES)
        .collect();
    row.vmm_reported_ms
        .extend(log.log_lines().filter_map(|l| api_request_took(&l.text)));
    match load_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Waits (at most `--timeout`) for the guest's marker line and the
/// [`LINES_BEFORE_SNAPSHOT`] guest lines after it, and records the boot's times: the VMM's
/// own log line that holds `boot_timer_line` (on stdout or stderr), the marker, and the
/// snapshot point. Returns the snapshot point's time and text.
fn wait_for_snapshot_point(
    p: &mut VmmProcess,
    ctx: &SnapshotContext,
    row: &mut SnapshotRow,
    boot_timer_line: &str,
) -> Result<(u64, String), String> {
    let deadline = Instant::now()
        .checked_add(ctx.boot_timeout)
        .ok_or("--timeout is too large")?;
    let marker = ctx.marker.clone();
    let waited = p.wait(deadline, |log| {
        log.nth_line_after_marker(&marker, LINES_BEFORE_SNAPSHOT)
            .map(|l| (l.at_ns, l.text.clone()))
    });
    {
        let log = lock(&p.log);
        row.boot_timer_ms = log
            .log_lines()
            .chain(&log.stderr)
            .find(|l| l.text.contains(boot_timer_line))
            .map(|l| ms_between(p.spawn_ns, l.at_ns));
        row.marker_ms = log
            .guest_lines()
            .find(|l| l.text.contains(&marker))
            .map(|l| ms_between(p.spawn_ns, l.at_ns));
    }
    let (at_ns, line) = match waited {
        Waited::Found(x) => x,
        Waited::Exited(e) => {
            return Err(format!(
                "the booting VMM ended ({}) before the snapshot point; its last output: {}",
                describe_exit(&e),
                p.tail()
            ))
        }
        Waited::TimedOut => {
            return Err(format!(
                "no marker {marker:?} and {LINES_BEFORE_SNAPSHOT} guest lines after it within \
                 {} s (raise --timeout?); last output: {}",
                ctx.boot_timeout.as_secs(),
                p.tail()
            ))
        }
    };
    row.snapshot_point_ms = Some(ms_between(p.spawn_ns, at_ns));
    Ok((at_ns, line))
}

/// Watches a restored guest for `--snapshot-watch` from now (its new output, or the VMM
/// ending by itself: a guest reset ends Firecracker), then kills the VMM and records what the
/// guest did, with times since `loaded_ns` (when the VMM said the guest runs again). The
/// VMM's resident memory is read when the first guest line has arrived. Returns the VMM's
/// whole output.
fn watch_restored(
    mut p: VmmProcess,
    ctx: &SnapshotContext,
    row: &mut SnapshotRow,
    loaded_ns: u64,
) -> Result<ConsoleLog, String> {
    let watch_end = Instant::now()
        .checked_add(ctx.watch)
        .ok_or("--snapshot-watch is too large")?;
    let pid = p.child.id();
    let waited = match p.wait(watch_end, |log| log.guest_lines().next().map(|_| ())) {
        Waited::Found(()) => {
            // Not reaped yet (the wait saw no exit), so the pid is still the VMM's.
            row.rss_at_first_output_bytes = procfs::status_bytes(Some(pid), "VmRSS");
            p.wait(watch_end, |_| None::<()>)
        }
        other => other,
    };
    let end_ns = match &waited {
        Waited::Exited(e) => {
            row.reset_after_ms = Some(ms_between(loaded_ns, e.at_ns));
            (row.exit_code, row.signal) = (e.code, e.signal);
            e.at_ns
        }
        _ => procfs::monotonic_ns(),
    };
    row.watched_ms = Some(ms_between(loaded_ns, end_ns));
    let spawn_ns = p.spawn_ns;
    let log = p.finish();
    let guest: Vec<&ConsoleLine> = log.guest_lines().collect();
    row.lines_after_load = guest.len() as u64;
    row.ticks_after_load = guest.iter().filter(|l| is_tick(&l.text)).count() as u64;
    row.resumed = Some(!guest.is_empty());
    row.ticks_continue = tick_number(row.last_line_before.as_deref().unwrap_or_default())
        .zip(guest.first().and_then(|l| tick_number(&l.text)))
        .map(|(before, after)| before.checked_add(1) == Some(after));
    row.first_output_after_load_ms = guest.first().map(|l| ms_between(loaded_ns, l.at_ns));
    row.spawn_to_first_output_ms = guest.first().map(|l| ms_between(spawn_ns, l.at_ns));
    row.longest_silence_ms = longest_silence(loaded_ns, guest.iter().map(|l| l.at_ns), end_ns);
    row.first_line_after = guest.first().map(|l| l.text.clone());
    row.last_line_after = guest.last().map(|l| l.text.clone());
    Ok(log)
}

/// The longest gap, in ms, in `from_ns`, then `times`, then `to_ns` (times before `from_ns`
/// count as at it).
fn longest_silence(from_ns: u64, times: impl Iterator<Item = u64>, to_ns: u64) -> Option<f64> {
    let mut prev = from_ns;
    let mut longest: Option<f64> = None;
    for t in times
        .map(|t| t.max(from_ns))
        .chain(std::iter::once(to_ns.max(from_ns)))
    {
        let gap = ms_between(prev, t);
        longest = Some(longest.map_or(gap, |l| l.max(gap)));
        prev = t;
    }
    longest
}

/// N of a tick line (`tick N` or `tick N UPTIME`).
fn tick_number(line: &str) -> Option<u64> {
    let n = line.strip_prefix("tick ")?.split(' ').next()?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

fn is_tick(line: &str) -> bool {
    tick_number(line).is_some()
}

/// Firecracker's own timing of an API request: `... 'create snapshot' API request took 240123
/// us.` gives `("create snapshot", 240.123)`.
fn api_request_took(line: &str) -> Option<(String, f64)> {
    let (head, rest) = line.split_once("' API request took ")?;
    let name = head.rsplit_once('\'')?.1;
    let us: f64 = rest.strip_suffix(" us.")?.trim().parse().ok()?;
    Some((name.to_string(), us / 1e3))
}

fn describe_exit(e: &ChildExit) -> String {
    match (e.code, e.signal) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "ended".into(),
    }
}

/// One line of a VMM's stdout: the guest's console, or the VMM's own log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLine {
    /// `CLOCK_MONOTONIC` when its first byte arrived.
    pub at_ns: u64,
    /// The text, without the line end.
    pub text: String,
    /// A log line of the VMM (Firecracker's start with a timestamp), not guest output.
    pub log: bool,
}

/// Lines kept per process (a guest that floods its console cannot take the bench's memory).
const MAX_LINES: usize = 20_000;
/// Longest line kept (longer lines are cut).
const MAX_LINE: usize = 4096;

/// A byte stream split into lines, each stamped with the arrival time of its first byte.
#[derive(Debug, Default)]
struct LineSplitter {
    partial: Vec<u8>,
    partial_ns: u64,
}

impl LineSplitter {
    /// Feeds bytes that arrived at `now_ns`; calls `done` with each completed line (without
    /// its line end, `\r` included) and its time. Lines longer than [`MAX_LINE`] are cut.
    fn feed(&mut self, chunk: &[u8], now_ns: u64, done: &mut dyn FnMut(String, u64)) {
        for &b in chunk {
            if self.partial.is_empty() {
                self.partial_ns = now_ns;
            }
            if b == b'\n' {
                self.end_line(done);
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
    }

    /// Ends an unterminated last line.
    fn finish(&mut self, done: &mut dyn FnMut(String, u64)) {
        if !self.partial.is_empty() {
            self.end_line(done);
        }
    }

    fn end_line(&mut self, done: &mut dyn FnMut(String, u64)) {
        let text = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_string();
        self.partial.clear();
        done(text, self.partial_ns);
    }
}

/// A VMM's stdout and stderr, split into lines with their arrival times. Empty lines are
/// dropped.
#[derive(Debug, Default)]
pub struct ConsoleLog {
    lines: Vec<ConsoleLine>,
    out: LineSplitter,
    /// Lines not kept (past the first 20000).
    pub dropped: u64,
    /// The VMM's stderr, line by line (the first 20000; all are log lines). ember logs
    /// there; Firecracker only what goes wrong before its logger starts.
    pub stderr: Vec<ConsoleLine>,
    err: LineSplitter,
}

impl ConsoleLog {
    /// Feeds stdout bytes that arrived at `now_ns`.
    pub fn feed(&mut self, chunk: &[u8], now_ns: u64) {
        let lines = &mut self.lines;
        let dropped = &mut self.dropped;
        self.out.feed(chunk, now_ns, &mut |text, at_ns| {
            Self::keep(lines, dropped, text, at_ns, None);
        });
    }

    /// Feeds stderr bytes that arrived at `now_ns`.
    pub fn feed_stderr(&mut self, chunk: &[u8], now_ns: u64) {
        let lines = &mut self.stderr;
        let dropped = &mut self.dropped;
        self.err.feed(chunk, now_ns, &mut |text, at_ns| {
            Self::keep(lines, dropped, text, at_ns, Some(true));
        });
    }

    /// Ends unterminated last lines.
    pub fn finish(&mut self) {
        let (lines, dropped) = (&mut self.lines, &mut self.dropped);
        self.out.finish(&mut |text, at_ns| {
            Self::keep(lines, dropped, text, at_ns, None);
        });
        let (lines, dropped) = (&mut self.stderr, &mut self.dropped);
        self.err.finish(&mut |text, at_ns| {
            Self::keep(lines, dropped, text, at_ns, Some(true));
        });
    }

    /// Keeps a line unless it is empty or `lines` is full; `log` says whether it is a log
    /// line (`None`: a stdout line, a log line when it looks like Firecracker's).
    fn keep(
        lines: &mut Vec<ConsoleLine>,
        dropped: &mut u64,
        text: String,
        at_ns: u64,
        log: Option<bool>,
    ) {
        if text.trim().is_empty() {
            return;
        }
        if lines.len() >= MAX_LINES {
            *dropped += 1;
            return;
        }
        let log = log.unwrap_or_else(|| peers::is_firecracker_log_line(&text));
        lines.push(ConsoleLine { at_ns, text, log });
    }

    /// The stderr lines as the report shows them (`stderr: ` and the line).
    pub fn stderr_texts(&self) -> impl Iterator<Item = String> + '_ {
        self.stderr.iter().map(|l| format!("stderr: {}", l.text))
    }

    /// The guest's lines.
    pub fn guest_lines(&self) -> impl Iterator<Item = &ConsoleLine> {
        self.lines.iter().filter(|l| !l.log)
    }

    /// The VMM's log lines.
    pub fn log_lines(&self) -> impl Iterator<Item = &ConsoleLine> {
        self.lines.iter().filter(|l| l.log)
    }

    /// The `n`th guest line (from 1) after the first guest line that holds `marker`.
    pub fn nth_line_after_marker(&self, marker: &str, n: usize) -> Option<&ConsoleLine> {
        let mut guest = self.guest_lines();
        guest.find(|l| l.text.contains(marker))?;
        guest.nth(n.checked_sub(1)?)
    }
}

/// How a wait on a VMM process ended.
#[derive(Debug)]
enum Waited<T> {
    /// What was waited for.
    Found(T),
    /// The process ended first.
    Exited(ChildExit),
    /// The deadline passed first.
    TimedOut,
}

/// A VMM process of a snapshot row, with its output read into a [`ConsoleLog`]. Dropping it
/// kills and reaps the process.
#[derive(Debug)]
struct VmmProcess {
    child: Child,
    /// Set once reaped: the pid must not be signalled after that.
    exit: Option<ChildExit>,
    log: Arc<Mutex<ConsoleLog>>,
    readers: Vec<JoinHandle<()>>,
    /// `CLOCK_MONOTONIC` just before the spawn.
    spawn_ns: u64,
    binary: PathBuf,
}

impl VmmProcess {
    fn spawn(binary: &Path, args: &[&std::ffi::OsStr]) -> Result<Self, String> {
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        runner::die_with_parent(&mut cmd);
        let spawn_ns = procfs::monotonic_ns();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let log = Arc::new(Mutex::new(ConsoleLog::default()));
        let mut readers = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match out.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => lock(&log).feed(&buf[..n], procfs::monotonic_ns()),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match err.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => lock(&log).feed_stderr(&buf[..n], procfs::monotonic_ns()),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        Ok(Self {
            child,
            exit: None,
            log,
            readers,
            spawn_ns,
            binary: binary.to_path_buf(),
        })
    }

    /// Waits until `found` finds something in the output, the process ends, or `deadline`.
    fn wait<T>(
        &mut self,
        deadline: Instant,
        mut found: impl FnMut(&ConsoleLog) -> Option<T>,
    ) -> Waited<T> {
        loop {
            if let Some(x) = found(&lock(&self.log)) {
                return Waited::Found(x);
            }
            if let Some(e) = self.exit {
                return Waited::Exited(e);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Waited::TimedOut;
            };
            if left.is_zero() {
                return Waited::TimedOut;
            }
            // The exit poll is the sleep between two looks at the output.
            match procfs::wait_child(self.child.id(), Some(left.min(Duration::from_millis(10)))) {
                Ok(Some(e)) => {
                    self.exit = Some(e);
                    // Let the readers take the last output before the final look.
                    self.join_readers();
                }
                Ok(None) => {}
                Err(e) => {
                    log::warn!("cannot wait for {}: {e}", self.binary.display());
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Sends `sig` to the process (which must not have ended).
    fn signal(&mut self, sig: libc::c_int) -> Result<(), String> {
        if let Some(e) = self.exit {
            return Err(format!(
                "{} ended ({}) before it could be signalled; its last output: {}",
                self.binary.display(),
                describe_exit(&e),
                self.tail()
            ));
        }
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| format!("pid {} is out of range", self.child.id()))?;
        // SAFETY: kill(2) takes plain integers. The pid is this child's: it has not been
        // reaped (`exit` is None, and nothing else waits for it), so it names no other
        // process.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(format!(
                "cannot send signal {sig} to {} (pid {pid}): {}",
                self.binary.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Connects to the API socket once it answers.
    fn wait_for_api(&mut self, sock: &Path, timeout: Duration) -> Result<Client, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last_err = match Client::connect(sock, API_CALL_TIMEOUT) {
                Ok(c) => return Ok(c),
                Err(e) => e.to_string(),
            };
            let waited = self.wait(
                (Instant::now() + Duration::from_millis(1)).min(deadline),
                |_| None::<()>,
            );
            match waited {
                Waited::Exited(e) => {
                    return Err(format!(
                        "{} ended ({}) before its API socket answered; its output: {}",
                        self.binary.display(),
                        describe_exit(&e),
                        self.tail()
                    ))
                }
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "{}'s API socket did not answer within {} s ({last_err})",
                        self.binary.display(),
                        timeout.as_secs()
                    ))
                }
                _ => {}
            }
        }
    }

    /// The last lines of output, for error messages.
    fn tail(&self) -> String {
        let log = lock(&self.log);
        let mut lines: Vec<&str> = log.lines.iter().map(|l| l.text.as_str()).collect();
        lines.extend(log.stderr.iter().map(|l| l.text.as_str()));
        let from = lines.len().saturating_sub(8);
        if lines.is_empty() {
            "(nothing)".into()
        } else {
            lines[from..].join(" | ")
        }
    }

    /// Kills the process (unless it already ended) and reaps it.
    fn kill(&mut self) {
        if self.exit.is_none() {
            // Not reaped yet, so the pid is still this child's: killing it is safe.
            let _ = self.child.kill();
            match procfs::wait_child(self.child.id(), Some(Duration::from_secs(10))) {
                Ok(Some(e)) => self.exit = Some(e),
                Ok(None) => log::warn!(
                    "{} (pid {}) did not end 10 s after SIGKILL",
                    self.binary.display(),
                    self.child.id()
                ),
                Err(e) => log::warn!("cannot reap {}: {e}", self.binary.display()),
            }
        }
        if self.exit.is_some() {
            self.join_readers();
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Kills, reaps, and hands out the whole output.
    fn finish(mut self) -> ConsoleLog {
        self.kill();
        let mut log = std::mem::take(&mut *lock(&self.log));
        log.finish();
        log
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn fmt_mib(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}", v as f64 / 1048576.0))
}

fn fmt_text(v: Option<&str>) -> String {
    v.map_or_else(|| "-".into(), |t| format!("{t:?}"))
}

impl SnapshotRow {
    /// Column title in the table (`firecracker #1`).
    pub fn label(&self) -> String {
        format!("{} #{}", self.vmm, self.run)
    }

    /// The table rows: label and value.
    pub fn table(&self) -> Vec<(String, String)> {
        let exit = match (self.exit_code, self.signal) {
            (Some(c), _) => format!("status {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => "-".into(),
        };
        let er = self.ember_restore.unwrap_or_default();
        let rows = vec![
            (
                "boot: API ready (since spawn)",
                fmt_ms(self.boot_api_ready_ms),
            ),
            (
                "boot: InstanceStart request",
                fmt_ms(self.instance_start_ms),
            ),
            ("boot: boot-timer log line", fmt_ms(self.boot_timer_ms)),
            ("boot: marker line", fmt_ms(self.marker_ms)),
            ("boot: snapshot point", fmt_ms(self.snapshot_point_ms)),
            ("pause (PATCH /vm Paused)", fmt_ms(self.pause_ms)),
            ("snapshot (PUT /snapshot/create)", fmt_ms(self.create_ms)),
            (
                "snapshot: guest paused (ember's log)",
                fmt_ms(self.snapshot_paused_ms),
            ),
            (
                "snapshot: SIGUSR2 to process exit",
                fmt_ms(self.signal_to_exit_ms),
            ),
            (
                "state file, KiB",
                self.state_bytes
                    .map_or_else(|| "-".into(), |b| format!("{:.1}", b as f64 / 1024.0)),
            ),
            ("memory file, MiB", fmt_mib(self.memory_bytes)),
            ("memory file on disk, MiB", fmt_mib(self.memory_disk_bytes)),
            (
                "restore: API ready (since spawn)",
                fmt_ms(self.spawn_to_api_ms),
            ),
            ("load (PUT /snapshot/load)", fmt_ms(self.load_ms)),
            (
                "restore: spawn to VM running",
                fmt_ms(self.spawn_to_loaded_ms),
            ),
            (
                "restore: vCPUs started (ember's log)",
                fmt_ms(er.vcpus_started_ms),
            ),
            (
                "restore: memory mapped (ember's log)",
                fmt_ms(er.memory_mapped_ms),
            ),
            (
                "restore: RSS then, MiB (ember's log)",
                fmt_mib(er.rss_bytes),
            ),
            (
                "  anonymous / file-backed, MiB",
                match (er.rss_anon_bytes, er.rss_file_bytes) {
                    (None, None) => "-".into(),
                    (a, f) => format!("{} / {}", fmt_mib(a), fmt_mib(f)),
                },
            ),
            (
                "restore: spawn to first guest output",
                fmt_ms(self.spawn_to_first_output_ms),
            ),
            (
                "restore: RSS at first output, MiB",
                fmt_mib(self.rss_at_first_output_bytes),
            ),
            (
                "resumed (new guest output)",
                self.resumed
                    .map_or_else(|| "-".into(), |r| if r { "yes" } else { "no" }.into()),
            ),
            (
                "ticks go on from the last one",
                self.ticks_continue
                    .map_or_else(|| "-".into(), |r| if r { "yes" } else { "no" }.into()),
            ),
            (
                "first output after load",
                fmt_ms(self.first_output_after_load_ms),
            ),
            (
                "guest lines / ticks after load",
                format!("{} / {}", self.lines_after_load, self.ticks_after_load),
            ),
            (
                "longest silence after load",
                fmt_ms(self.longest_silence_ms),
            ),
            (
                "VMM ended by itself after load",
                fmt_ms(self.reset_after_ms),
            ),
            ("  its exit", exit),
            ("watched after load", fmt_ms(self.watched_ms)),
            (
                "last line before snapshot",
                fmt_text(self.last_line_before.as_deref()),
            ),
            (
                "first line after load",
                fmt_text(self.first_line_after.as_deref()),
            ),
            (
                "last line after load",
                fmt_text(self.last_line_after.as_deref()),
            ),
        ];
        let mut rows: Vec<(String, String)> =
            rows.into_iter().map(|(l, v)| (l.to_string(), v)).collect();
        for (name, ms) in &self.vmm_reported_ms {
            rows.push((format!("VMM's log: '{name}' took"), format!("{ms:.1}")));
        }
        rows
    }

    /// The row as JSON: `vmm` says whose row it is; times in ms, sizes in bytes, `null` for
    /// a step that was not reached.
    pub fn to_json(&self) -> Json {
        let f = |v: Option<f64>| Json::from(v);
        let i = |v: Option<i32>| Json::from(v.map(f64::from));
        Json::obj([
            ("vmm", Json::from(self.vmm.as_str())),
            ("run", Json::from(self.run as u64)),
            ("ok", Json::from(self.error.is_none())),
            ("error", Json::from(self.error.clone())),
            ("boot_api_ready_ms", f(self.boot_api_ready_ms)),
            ("instance_start_ms", f(self.instance_start_ms)),
            ("boot_timer_ms", f(self.boot_timer_ms)),
            ("marker_ms", f(self.marker_ms)),
            ("snapshot_point_ms", f(self.snapshot_point_ms)),
            ("pause_ms", f(self.pause_ms)),
            ("create_ms", f(self.create_ms)),
            ("state_bytes", Json::from(self.state_bytes)),
            ("memory_bytes", Json::from(self.memory_bytes)),
            ("memory_disk_bytes", Json::from(self.memory_disk_bytes)),
            ("spawn_to_api_ms", f(self.spawn_to_api_ms)),
            ("signal_to_exit_ms", f(self.signal_to_exit_ms)),
            ("snapshot_paused_ms", f(self.snapshot_paused_ms)),
            ("load_ms", f(self.load_ms)),
            ("spawn_to_loaded_ms", f(self.spawn_to_loaded_ms)),
            (
                "ember_restore",
                self.ember_restore.map_or(Json::Null, |r| {
                    Json::obj([
                        ("vcpus_started_ms", f(r.vcpus_started_ms)),
                        ("memory_mapped_ms", f(r.memory_mapped_ms)),
                        ("rss_bytes", Json::from(r.rss_bytes)),
                        ("rss_anon_bytes", Json::from(r.rss_anon_bytes)),
                        ("rss_file_bytes", Json::from(r.rss_file_bytes)),
                    ])
                }),
            ),
            ("spawn_to_first_output_ms", f(self.spawn_to_first_output_ms)),
            (
                "rss_at_first_output_bytes",
                Json::from(self.rss_at_first_output_bytes),
            ),
            ("resumed", Json::from(self.resumed)),
            ("ticks_continue", Json::from(self.ticks_continue)),
            (
                "first_output_after_load_ms",
                f(self.first_output_after_load_ms),
            ),
            ("lines_after_load", Json::from(self.lines_after_load)),
            ("ticks_after_load", Json::from(self.ticks_after_load)),
            ("longest_silence_ms", f(self.longest_silence_ms)),
            ("reset_after_ms", f(self.reset_after_ms)),
            ("exit_code", i(self.exit_code)),
            ("signal", i(self.signal)),
            ("watched_ms", f(self.watched_ms)),
            (
                "last_line_before",
                Json::from(self.last_line_before.clone()),
            ),
            (
                "first_line_after",
                Json::from(self.first_line_after.clone()),
            ),
            ("last_line_after", Json::from(self.last_line_after.clone())),
            (
                "vmm_reported_ms",
                Json::obj(
                    self.vmm_reported_ms
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::from(*v))),
                ),
            ),
            ("log_at_snapshot", Json::from(self.log_at_snapshot.clone())),
            ("log_after_load", Json::from(self.log_after_load.clone())),
        ])
    }
}

/// The readable table of `rows` (one column per row), with the restoring VMMs' log lines and
/// `notes`.
pub fn render(rows: &[SnapshotRow], notes: &[String], header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    let tables: Vec<_> = rows.iter().map(SnapshotRow::table).collect();
    // Every label in order of first appearance; a row without one shows "-".
    let mut labels: Vec<&str> = Vec::new();
    for (label, _) in tables.iter().flatten() {
        if !labels.contains(&label.as_str()) {
            labels.push(label);
        }
    }
    let title = "snapshot/restore (times in ms)";
    let lw = labels
        .iter()
        .map(|l| l.len())
        .chain([title.len()])
        .max()
        .unwrap_or(0);
    let cell = |t: &[(String, String)], label: &str| {
        t.iter()
            .find(|c| c.0 == label)
            .map_or_else(|| "-".to_string(), |c| c.1.clone())
    };
    let widths: Vec<usize> = rows
        .iter()
        .zip(&tables)
        .map(|(r, t)| {
            t.iter()
                .map(|c| c.1.len())
                .chain([r.label().len(), 12])
                .max()
                .unwrap_or(12)
        })
        .collect();
    let _ = write!(out, "\n{title:<lw$}");
    for (r, w) in rows.iter().zip(&widths) {
        let _ = write!(out, "  {:>w$}", r.label());
    }
    let _ = writeln!(out);
    for label in &labels {
        let _ = write!(out, "{label:<lw$}");
        for (t, w) in tables.iter().zip(&widths) {
            let _ = write!(out, "  {:>w$}", cell(t, label));
        }
        let _ = writeln!(out);
    }
    for r in rows {
        for (what, lines) in [
            (
                "the booting process's log from the pause on",
                &r.log_at_snapshot,
            ),
            ("the restoring process's log", &r.log_after_load),
        ] {
            if !lines.is_empty() {
                let _ = writeln!(out, "\n{}: {what}", r.label());
                for l in lines {
                    let _ = writeln!(out, "  {l}");
                }
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

impl SnapshotResults {
    /// The header line of the table.
    pub fn header(&self) -> String {
        let g = &self.options.guest;
        let watch = self.options.snapshot.unwrap_or_default().watch;
        format!(
            "ember bench --snapshot: {} run(s), {} vCPU(s), {} MiB, kernel {}{}, restored guest \
             watched {:.0} s\nversions: {}\n{}\nwall time {:.1} s",
            self.options.runs,
            g.vcpus,
            g.mem_mib,
            g.kernel.display(),
            g.initrd
                .as_ref()
                .map(|i| format!(", initrd {}", i.display()))
                .unwrap_or_default(),
            watch.as_secs_f64(),
            self.versions
                .iter()
                .map(|(vmm, v)| format!("{vmm}: {v}"))
                .collect::<Vec<_>>()
                .join("; "),
            if self.cmdline == self.ember_cmdline || !self.rows.iter().any(|r| r.vmm != "ember") {
                format!("cmdline: {}", self.ember_cmdline)
            } else {
                format!(
                    "cmdline (ember, which adds the host's switches itself): {}\n\
                     cmdline (peers): {}",
                    self.ember_cmdline, self.cmdline
                )
            },
            self.wall.as_secs_f64()
        )
    }

    /// The readable report.
    pub fn render(&self) -> String {
        render(&self.rows, &self.notes, &self.header())
    }

    /// Everything as JSON: options, host, versions, every row.
    pub fn to_json(&self) -> Json {
        let g = &self.options.guest;
        let watch = self.options.snapshot.unwrap_or_default().watch;
        Json::obj([
            ("format", Json::from("ember-bench-snapshot/1")),
            ("host", super::host_json()),
            (
                "config",
                Json::obj([
                    ("kernel", Json::from(g.kernel.display().to_string())),
                    (
                        "initrd",
                        Json::from(g.initrd.as_ref().map(|i| i.display().to_string())),
                    ),
                    ("disks", Json::from(g.disks.clone())),
                    ("cmdline", Json::from(self.cmdline.as_str())),
                    ("cmdline_ember", Json::from(self.ember_cmdline.as_str())),
                    ("vcpus", Json::from(g.vcpus)),
                    ("mem_mib", Json::from(g.mem_mib)),
                    ("runs", Json::from(self.options.runs as u64)),
                    ("marker", Json::from(self.options.marker.as_str())),
                    (
                        "lines_before_snapshot",
                        Json::from(LINES_BEFORE_SNAPSHOT as u64),
                    ),
                    ("watch_s", Json::from(watch.as_secs_f64())),
                    ("compare", Json::from(self.options.compare.clone())),
                ]),
            ),
            (
                "versions",
                Json::obj(
                    self.versions
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::from(v.as_str()))),
                ),
            ),
            ("wall_s", Json::from(self.wall.as_secs_f64())),
            ("notes", Json::from(self.notes.clone())),
            (
                "rows",
                Json::Arr(self.rows.iter().map(SnapshotRow::to_json).collect()),
            ),
        ])
    }

    /// Writes [`to_json`](Self::to_json) to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        std::fs::write(path, self.to_json().to_pretty()).map_err(|source| BenchError::WriteJson {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Whether every row was measured to its end (a guest that did not resume is a result,
    /// not a failure).
    pub fn all_measured(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.error.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FC_LOG: &str = "2026-12-06T06:33:12.033339712 [anonymous-instance:fc_api] ";

    #[test]
    fn console_log_tells_guest_lines_from_firecracker_s_and_finds_the_snapshot_point() {
        let mut log = ConsoleLog::default();
        log.feed(
            format!("{FC_LOG}Running Firecracker v1.17.0-dev\n").as_bytes(),
            1,
        );
        log.feed(b"ember-init: running: i=0; while ...\r\n\r\ntick 0 3", 2);
        log.feed(b"1.50\r\n", 3);
        assert_eq!(log.nth_line_after_marker("ember-init:", 2), None);
        log.feed(format!("{FC_LOG}Guest-boot-time = 1 us\n").as_bytes(), 4);
        log.feed(b"tick 1 32.61\r\ntick 2", 5);
        let point = log.nth_line_after_marker("ember-init:", 2).unwrap();
        // Line times are those of their first byte; Firecracker's lines are not guest output.
        assert_eq!((point.at_ns, point.text.as_str()), (5, "tick 1 32.61"));
        assert_eq!(log.guest_lines().count(), 3, "the empty line is dropped");
        assert_eq!(log.log_lines().count(), 2);
        assert_eq!(log.nth_line_after_marker("no such marker", 1), None);
        assert_eq!(log.nth_line_after_marker("ember-init:", 0), None);
        log.finish();
        assert_eq!(log.guest_lines().last().unwrap().text, "tick 2");
    }

    #[test]
    fn console_log_is_bounded() {
        let mut log = ConsoleLog::default();
        let long = vec![b'x'; MAX_LINE * 2];
        log.feed(&long, 1);
        log.feed(b"\n", 1);
        assert_eq!(log.lines[0].text.len(), MAX_LINE);
        for _ in 0..MAX_LINES + 5 {
            log.feed(b"tick 1\n", 2);
        }
        assert_eq!(log.lines.len(), MAX_LINES);
        assert_eq!(log.dropped, 6);
    }

    #[test]
    fn tick_lines_and_firecracker_timings_parse() {
        assert_eq!(tick_number("tick 12 41.57"), Some(12));
        assert_eq!(tick_number("tick 3"), Some(3));
        for not in [
            "tick",
            "tick ",
            "tick x",
            "tick -1",
            "ticks 1",
            " tick 1",
            "tick 1x 2",
        ] {
            assert_eq!(tick_number(not), None, "{not:?}");
        }
        assert_eq!(
            api_request_took(&format!(
                "{FC_LOG}'load snapshot' API request took 24338 us."
            )),
            Some(("load snapshot".to_string(), 24.338))
        );
        assert_eq!(
            api_request_took(&format!("{FC_LOG}The request was executed successfully.")),
            None
        );
        assert_eq!(
            api_request_took(&format!("{FC_LOG}'pause' API request took lots us.")),
            None
        );
        // Silence: to the first line, between lines, after the last.
        let ms = 1_000_000;
        let t = |v: &[u64]| longest_silence(10 * ms, v.iter().copied(), 100 * ms);
        assert_eq!(t(&[]), Some(90.0));
        assert_eq!(t(&[40 * ms, 45 * ms]), Some(55.0));
        assert_eq!(t(&[80 * ms, 90 * ms]), Some(70.0));
        assert_eq!(t(&[5 * ms, 30 * ms, 95 * ms]), Some(65.0));
    }

    fn measured_row() -> SnapshotRow {
        SnapshotRow {
            vmm: "firecracker".into(),
            run: 1,
            pause_ms: Some(1.0),
            create_ms: Some(247.1),
            state_bytes: Some(13_824),
            memory_bytes: Some(128 << 20),
            memory_disk_bytes: Some(128 << 20),
            spawn_to_api_ms: Some(2.9),
            load_ms: Some(24.5),
            spawn_to_loaded_ms: Some(27.5),
            resumed: Some(true),
            ticks_continue: Some(true),
            lines_after_load: 6,
            ticks_after_load: 6,
            last_line_before: Some("tick 1 32.6".into()),
            first_line_after: Some("tick 2 33.9".into()),
            vmm_reported_ms: vec![("load snapshot".into(), 24.338)],
            log_after_load: vec![format!("{FC_LOG}Artificially kick devices")],
            ..Default::default()
        }
    }

    #[test]
    fn row_json_has_every_field_and_says_whose_row_it_is() {
        let failed = SnapshotRow {
            vmm: "firecracker".into(),
            run: 2,
            error: Some("PUT /snapshot/load answered 400: bad".into()),
            reset_after_ms: Some(5012.0),
            exit_code: Some(1),
            ..Default::default()
        };
        let text = Json::Arr(vec![measured_row().to_json(), failed.to_json()]).to_pretty();
        let rows = Json::parse(&text).unwrap();
        let rows = rows.as_array().unwrap();
        let ok = &rows[0];
        for key in [
            "vmm",
            "run",
            "ok",
            "error",
            "create_ms",
            "load_ms",
            "spawn_to_loaded_ms",
            "resumed",
            "ticks_continue",
            "reset_after_ms",
            "state_bytes",
            "memory_bytes",
            "memory_disk_bytes",
            "log_after_load",
            "vmm_reported_ms",
        ] {
            assert!(ok.get(key).is_some(), "no {key} in {text}");
        }
        assert_eq!(ok.get("vmm").and_then(Json::as_str), Some("firecracker"));
        assert_eq!(ok.get("ok"), Some(&Json::Bool(true)));
        assert_eq!(ok.get("resumed"), Some(&Json::Bool(true)));
        assert_eq!(ok.get("create_ms").and_then(Json::as_f64), Some(247.1));
        assert_eq!(
            ok.get("memory_bytes").and_then(Json::as_u64),
            Some(128 << 20)
        );
        assert_eq!(ok.get("reset_after_ms"), Some(&Json::Null));
        assert_eq!(
            ok.get("vmm_reported_ms")
                .and_then(|m| m.get("load snapshot"))
                .and_then(Json::as_f64),
            Some(24.338)
        );
        let bad = &rows[1];
        assert_eq!(bad.get("ok"), Some(&Json::Bool(false)));
        assert_eq!(bad.get("resumed"), Some(&Json::Null));
        assert_eq!(
            bad.get("reset_after_ms").and_then(Json::as_f64),
            Some(5012.0)
        );
        assert_eq!(bad.get("exit_code").and_then(Json::as_f64), Some(1.0));
    }

    #[test]
    fn report_has_a_column_per_row_and_the_logs() {
        let mut second = measured_row();
        second.run = 2;
        second.resumed = Some(false);
        second.reset_after_ms = Some(5012.4);
        second.exit_code = Some(0);
        let text = render(&[measured_row(), second], &["a note".into()], "the header");
        assert!(text.starts_with("the header\n"), "{text}");
        let line = |label: &str| {
            text.lines()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no {label:?} in {text}"))
                .split_whitespace()
                .rev()
                .take(2)
                .collect::<Vec<_>>()
        };
        assert!(text.contains("firecracker #1  firecracker #2\n"), "{text}");
        assert_eq!(line("load (PUT /snapshot/load)"), ["24.5", "24.5"]);
        assert_eq!(line("resumed (new guest output)"), ["no", "yes"]);
        assert_eq!(line("VMM ended by itself after load"), ["5012.4", "-"]);
        assert!(
            text.lines()
                .any(|l| l.starts_with("  its exit") && l.ends_with("status 0")),
            "{text}"
        );
        assert_eq!(line("memory file, MiB"), ["128.0", "128.0"]);
        assert!(text.contains("firecracker #2: the restoring process's log\n  2026-12-06T"));
        assert_eq!(line("VMM's log: 'load snapshot' took"), ["24.3", "24.3"]);
        assert!(text.ends_with("notes:\n- a note\n"), "{text}");
    }

    #[test]
    fn a_vmm_process_is_killed_and_reaped_when_dropped() {
        let p = VmmProcess::spawn(Path::new("/bin/sleep"), &["1000".as_ref()]).unwrap();
        let pid = libc::pid_t::try_from(p.child.id()).unwrap();
        drop(p);
        // SAFETY: signal 0 only checks whether the pid exists.
        let rc = unsafe { libc::kill(pid, 0) };
        assert_eq!(rc, -1, "pid {pid} is still there (running or a zombie)");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ESRCH)
        );
    }

    #[test]
    fn a_vmm_that_ends_before_its_api_answers_is_a_clear_error() {
        let mut p = VmmProcess::spawn(
            Path::new("/bin/sh"),
            &["-c".as_ref(), "echo no api; exit 3".as_ref()],
        )
        .unwrap();
        let e = p
            .wait_for_api(Path::new("/nonexistent/api.sock"), Duration::from_secs(20))
            .unwrap_err();
        assert!(e.contains("ended (status 3)"), "{e}");
        assert!(e.contains("no api"), "{e}");
        let e = VmmProcess::spawn(Path::new("/nonexistent/firecracker"), &[]).unwrap_err();
        assert!(e.contains("cannot start /nonexistent/firecracker"), "{e}");
    }

    #[test]
    fn scratch_directories_of_ended_benches_are_removed() {
        let tmp = std::env::temp_dir().join(format!("ember-snap-stale-{}", std::process::id()));
        // A pid that has ended: a reaped child's.
        let mut child = Command::new("/bin/true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = tmp.join(format!("{WORKDIR_PREFIX}{dead}"));
        let alive = tmp.join(format!("{WORKDIR_PREFIX}{}", std::process::id()));
        let other = tmp.join("ember-bench-snap-x");
        for d in [&stale, &alive, &other] {
            std::fs::create_dir_all(d.join("firecracker-1")).unwrap();
            std::fs::write(d.join("firecracker-1/memory"), b"guest").unwrap();
        }
        remove_stale_workdirs(&tmp);
        assert!(!stale.exists(), "pid {dead} ended");
        assert!(alive.exists() && other.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    fn options(compare: &[&str]) -> BenchOptions {
        BenchOptions {
            guest: GuestSpec {
                kernel: "/k".into(),
                initrd: None,
                disks: vec![],
                root: None,
                root_cmdline: None,
                cmdline: "console=ttyS0".into(),
                vcpus: 1,
                mem_mib: 128,
                acpi: true,
                rng: true,
            },
            runs: 1,
            parallel: 1,
            compare: compare.iter().map(|s| s.to_string()).collect(),
            marker: "ember-init:".into(),
            timeout: Duration::from_secs(60),
            profile: None,
            host_tuning: true,
            ember_bin: None,
            setup_only: false,
            acpi: true,
            snapshot: Some(SnapshotMode::default()),
            ab: None,
        }
    }

    #[test]
    fn snapshot_mode_runs_ember_alone_or_beside_firecracker() {
        // ember's row alone, with or without peers that have no snapshot row (QEMU need not
        // even be installed: it is not run); a binary that cannot start is that row's clear
        // error, not the bench's.
        for (compare, note) in [
            (&[][..], None),
            (&["qemu=/bin/sh"][..], Some("qemu: no snapshot row")),
            (
                &["qemu=/nonexistent/qemu"][..],
                Some("qemu: no snapshot row"),
            ),
        ] {
            let mut o = options(compare);
            o.ember_bin = Some("/nonexistent/ember".into());
            o.runs = 2;
            let mut progress = Vec::new();
            let r = run_snapshot_bench(&o, &mut |l| progress.push(l.to_string())).unwrap();
            let rows: Vec<_> = r.rows.iter().map(|r| (r.vmm.as_str(), r.run)).collect();
            assert_eq!(rows, [("ember", 1), ("ember", 2)], "{compare:?}");
            let e = r.rows[0].error.as_deref().unwrap_or_default();
            assert!(e.contains("cannot start /nonexistent/ember"), "{e}");
            assert!(!r.all_measured());
            assert!(progress.iter().any(|l| l.starts_with("ember #2: FAILED")));
            if let Some(note) = note {
                assert!(r.notes.iter().any(|n| n.contains(note)), "{:?}", r.notes);
            }
            assert_eq!(r.versions[0].0, "ember");
            // ember alone: one command line, ember's own.
            let header = r.header();
            assert!(header.contains("\nversions: ember: "), "{header}");
            assert!(header.contains("\ncmdline: console=ttyS0\n"), "{header}");
            let json = r.to_json();
            let config = json.get("config").unwrap();
            assert_eq!(
                config.get("cmdline_ember").and_then(Json::as_str),
                Some("console=ttyS0")
            );
        }
        // Refused before anything runs: an unknown peer, a Firecracker that was asked for and
        // is not there (as in the boot bench), no runs, no snapshot mode.
        let e = run_snapshot_bench(&options(&["xen"]), &mut |_| {}).unwrap_err();
        assert!(matches!(e, BenchError::Usage(_)), "{e}");
        let mut o = options(&["firecracker=/nonexistent/fc"]);
        o.ember_bin = Some("/nonexistent/ember".into());
        let mut progress = Vec::new();
        let e = run_snapshot_bench(&o, &mut |l| progress.push(l.to_string())).unwrap_err();
        assert!(matches!(e, BenchError::Usage(_)), "{e}");
        assert!(
            e.to_string().contains("/nonexistent/fc: no such file"),
            "{e}"
        );
        assert!(progress.is_empty(), "{progress:?}");
        let mut o = options(&[]);
        o.runs = 0;
        assert!(matches!(
            run_snapshot_bench(&o, &mut |_| {}),
            Err(BenchError::Usage(_))
        ));
        let mut o = options(&[]);
        o.snapshot = None;
        assert!(run_snapshot_bench(&o, &mut |_| {}).is_err());
    }

    #[test]
    fn ember_runs_the_bench_s_guest_with_its_snapshot_on_sigusr2() {
        let ctx = SnapshotContext {
            guest: GuestSpec {
                kernel: "/g/vmlinux".into(),
                initrd: Some("/g/initramfs.cpio".into()),
                disks: vec!["/g/a.img,ro".into()],
                root: Some("/dev/vda".into()),
                root_cmdline: Some("root=/dev/vda rootfstype=ext4 ro".into()),
                cmdline: "console=ttyS0 noxsave ember.exit=reboot".into(),
                vcpus: 2,
                mem_mib: 96,
                acpi: true,
                rng: true,
            },
            ember_cmdline: "console=ttyS0 ember.cmd=\"echo hi\"".into(),
            ember_flags: vec!["--no-acpi".into()],
            marker: "ember-init:".into(),
            boot_timeout: Duration::from_secs(1),
            watch: Duration::from_secs(1),
            workdir: "/w".into(),
        };
        let args = ember_boot_args(&ctx, Path::new("/w/ember-1/snapshot"));
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        let after = |flag: &str| {
            let i = args.iter().position(|a| *a == flag).unwrap_or_else(|| {
                panic!("no {flag} in {args:?}");
            });
            args.get(i + 1).copied()
        };
        assert_eq!(args[..3], ["--log-level", "info", "run"]);
        assert_eq!(after("--kernel"), Some("/g/vmlinux"));
        assert_eq!(after("--initrd"), Some("/g/initramfs.cpio"));
        assert_eq!(after("--disk"), Some("/g/a.img,ro"));
        assert_eq!(after("--root"), Some("/dev/vda"));
        // ember's own command line: it adds the host's switches and the root itself.
        assert_eq!(
            after("--cmdline"),
            Some("console=ttyS0 ember.cmd=\"echo hi\"")
        );
        assert_eq!(after("--vcpus"), Some("2"));
        assert_eq!(after("--mem"), Some("96"));
        assert_eq!(after("--snapshot-to"), Some("/w/ember-1/snapshot"));
        assert_eq!(after("--snapshot-on"), Some("sigusr2"));
        assert_eq!(after("--snapshot-then"), Some("stop"));
        assert!(args.contains(&"--boot-timer") && args.ends_with(&["--no-acpi"]));
    }

    #[test]
    fn ember_s_log_lines_give_its_figures() {
        let dir = "/tmp/ember-bench-snap-1/ember-1/snapshot";
        assert_eq!(
            snapshot_written_paused_ms(&format!(
                "ember: snapshot written to {dir} (guest paused 48.965821ms); `ember restore \
                 {dir}` starts it again"
            )),
            Some(48.965821)
        );
        // A directory with the same words in it does not confuse either parser.
        assert_eq!(
            snapshot_written_paused_ms(
                "ember: snapshot written to /x (guest paused 1s) (guest paused 1.5s); `ember \
                 restore /x (guest paused 1s)` starts it again"
            ),
            Some(1500.0)
        );
        assert_eq!(
            snapshot_written_paused_ms("ember: snapshot written to /x (guest paused 2.5s)"),
            Some(2500.0)
        );
        for not in [
            "ember: SIGUSR2: taking the snapshot",
            "ember: error: snapshot into /x failed: no space",
            "ember: snapshot written to /x (guest paused soon)",
            "ember: snapshot written to /x (guest paused 12.5)",
        ] {
            assert_eq!(snapshot_written_paused_ms(not), None, "{not:?}");
        }
        for (text, ms) in [
            ("1.5s", Some(1500.0)),
            ("12.25ms", Some(12.25)),
            ("950µs", Some(0.95)),
            ("800ns", Some(0.0008)),
            ("3m", None),
            ("ms", None),
            ("1.2.3ms", None),
        ] {
            assert_eq!(debug_duration_ms(text), ms, "{text:?}");
        }

        let line = format!(
            "ember: restored the snapshot in {dir}: vCPUs started 3.8 ms after ember started \
             (VM with guest memory mapped at 2.4 ms); RSS 7.9 MiB (0.8 MiB anonymous, 7.1 MiB \
             file-backed)"
        );
        let mib = |m: f64| Some((m * 1048576.0_f64).round() as u64);
        assert_eq!(
            parse_ember_restored(&line),
            Some(EmberRestoreLine {
                vcpus_started_ms: Some(3.8),
                memory_mapped_ms: Some(2.4),
                rss_bytes: mib(7.9),
                rss_anon_bytes: mib(0.8),
                rss_file_bytes: mib(7.1),
            })
        );
        // A figure ember could not tell is `-`; the line still counts.
        let unknown = "ember: restored the snapshot in /a: b: vCPUs started x: vCPUs started - \
                       after ember started (VM with guest memory mapped at 1.0 ms); RSS - (- \
                       anonymous, - file-backed)";
        assert_eq!(
            parse_ember_restored(unknown),
            Some(EmberRestoreLine {
                memory_mapped_ms: Some(1.0),
                ..Default::default()
            })
        );
        for not in [
            "ember: PVM host detected",
            "ember: restored the snapshot in /a",
            "tick 3 41.57",
        ] {
            assert_eq!(parse_ember_restored(not), None, "{not:?}");
        }
    }

    #[test]
    fn stderr_lines_keep_their_arrival_times_apart_from_the_console() {
        let mut log = ConsoleLog::default();
        log.feed(b"tick 0 1.0\r\n", 1);
        log.feed_stderr(b"ember: boot timer: guest userspace started 1.2 s", 2);
        log.feed(b"tick 1", 3);
        log.feed_stderr(b" after ember started\r\n\nember: SIGUSR2", 4);
        log.finish();
        let err: Vec<_> = log
            .stderr
            .iter()
            .map(|l| (l.at_ns, l.text.as_str()))
            .collect();
        assert_eq!(
            err,
            [
                (
                    2,
                    "ember: boot timer: guest userspace started 1.2 s after ember started"
                ),
                (4, "ember: SIGUSR2"),
            ]
        );
        assert!(log.stderr.iter().all(|l| l.log));
        let guest: Vec<_> = log.guest_lines().map(|l| l.text.as_str()).collect();
        assert_eq!(guest, ["tick 0 1.0", "tick 1"]);
        assert_eq!(
            log.stderr_texts().next().as_deref(),
            Some("stderr: ember: boot timer: guest userspace started 1.2 s after ember started")
        );
    }

    #[test]
    fn a_signalled_vmm_process_ends_and_cannot_be_signalled_again() {
        let mut p = VmmProcess::spawn(Path::new("/bin/sleep"), &["1000".as_ref()]).unwrap();
        p.signal(libc::SIGUSR2).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        match p.wait(deadline, |_| None::<()>) {
            Waited::Exited(e) => assert_eq!(e.signal, Some(libc::SIGUSR2)),
            other => panic!("sleep did not end on SIGUSR2: {other:?}"),
        }
        let e = p.signal(libc::SIGUSR2).unwrap_err();
        assert!(e.contains("ended (signal 12)"), "{e}");
    }

    #[test]
    fn ember_row_json_and_report_show_its_own_figures() {
        let ember = SnapshotRow {
            vmm: "ember".into(),
            run: 1,
            snapshot_paused_ms: Some(49.0),
            signal_to_exit_ms: Some(69.7),
            state_bytes: Some(12_288),
            memory_bytes: Some(128 << 20),
            memory_disk_bytes: Some(16_150_528),
            spawn_to_loaded_ms: Some(6.3),
            ember_restore: Some(EmberRestoreLine {
                vcpus_started_ms: Some(3.8),
                memory_mapped_ms: Some(2.4),
                rss_bytes: Some(8_283_750),
                rss_anon_bytes: Some(838_861),
                rss_file_bytes: None,
            }),
            spawn_to_first_output_ms: Some(1004.9),
            rss_at_first_output_bytes: Some(19_712_000),
            resumed: Some(true),
            ..Default::default()
        };
        let text = Json::Arr(vec![ember.to_json(), measured_row().to_json()]).to_pretty();
        let rows = Json::parse(&text).unwrap();
        let rows = rows.as_array().unwrap();
        let e = &rows[0];
        assert_eq!(e.get("vmm").and_then(Json::as_str), Some("ember"));
        let num = |r: &Json, k: &str| r.get(k).and_then(Json::as_f64);
        assert_eq!(num(e, "snapshot_paused_ms"), Some(49.0));
        assert_eq!(num(e, "signal_to_exit_ms"), Some(69.7));
        assert_eq!(num(e, "memory_disk_bytes"), Some(16_150_528.0));
        assert_eq!(num(e, "spawn_to_first_output_ms"), Some(1004.9));
        assert_eq!(num(e, "rss_at_first_output_bytes"), Some(19_712_000.0));
        assert_eq!(e.get("load_ms"), Some(&Json::Null));
        let er = e.get("ember_restore").unwrap();
        assert_eq!(num(er, "vcpus_started_ms"), Some(3.8));
        assert_eq!(num(er, "memory_mapped_ms"), Some(2.4));
        assert_eq!(num(er, "rss_anon_bytes"), Some(838_861.0));
        assert_eq!(er.get("rss_file_bytes"), Some(&Json::Null));
        // Firecracker's row has the keys too, empty where they are ember's own.
        let fc = &rows[1];
        assert_eq!(fc.get("ember_restore"), Some(&Json::Null));
        assert_eq!(fc.get("snapshot_paused_ms"), Some(&Json::Null));

        let report = render(&[ember, measured_row()], &[], "h");
        let line = |label: &str| {
            report
                .lines()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no {label:?} in {report}"))
                .split_whitespace()
                .rev()
                .take(2)
                .collect::<Vec<_>>()
        };
        assert!(report.contains("ember #1  firecracker #1\n"), "{report}");
        assert_eq!(line("snapshot: guest paused (ember's log)"), ["-", "49.0"]);
        assert_eq!(line("restore: vCPUs started (ember's log)"), ["-", "3.8"]);
        assert_eq!(line("restore: spawn to VM running"), ["27.5", "6.3"]);
        assert_eq!(line("load (PUT /snapshot/load)"), ["24.5", "-"]);
        assert_eq!(line("memory file on disk, MiB"), ["128.0", "15.4"]);
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("  anonymous / file-backed") && l.contains("0.8 / -")),
            "{report}"
        );
    }
}
