// SPDX-License-Identifier: Apache-2.0
//! `ember bench --snapshot`: snapshot and restore of the same guest, one row per VMM and run
//! (issue 13). Each row boots the guest, lets its init print a marker and then a tick every
//! half second ([`TICK_COMMAND`]), pauses it, writes a full snapshot, ends that process,
//! restores the snapshot in a fresh process and watches the console for a while: did the
//! guest go on printing ticks (`resumed`), did it reset, and how long each step took.
//!
//! Rows so far:
//! - Firecracker ([`firecracker_row`]), driven through its API socket with the small HTTP
//!   client of [`super::http`]: `PUT /boot-source`, `/machine-config`, `/drives/ID`,
//!   `/actions InstanceStart`; at the snapshot point `PATCH /vm {"state": "Paused"}` and
//!   `PUT /snapshot/create` (Full); then, in a new process, `PUT /snapshot/load` with
//!   `resume_vm: true` and a `File` memory backend.
//! - ember: not written yet. Its row (restore from its own snapshot files, and the warm
//!   `ember exec` path) is meant to go beside Firecracker's in [`run_snapshot_bench`], as a
//!   function that returns the same [`SnapshotRow`] with `vmm: "ember"`.
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
use super::peers::{self, GuestSpec, Peer, PeerKind, PeerLookup};
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
    /// The VMM (`firecracker`; `ember` once its row exists).
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
}

/// Everything `ember bench --snapshot` measured.
#[derive(Debug, Clone)]
pub struct SnapshotResults {
    /// Every row, in order.
    pub rows: Vec<SnapshotRow>,
    /// Notes for the reader.
    pub notes: Vec<String>,
    /// The command line the VMMs' guest got.
    pub cmdline: String,
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
    /// The guest, with the command line the VMMs get.
    pub guest: GuestSpec,
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
    for spec in &opts.compare {
        match peers::lookup(spec).map_err(BenchError::Usage)? {
            PeerLookup::Found(p) if p.kind == PeerKind::Firecracker => peers.push(p),
            PeerLookup::Found(p) => notes.push(format!(
                "{}: no snapshot row (only Firecracker's is written)",
                p.kind.name()
            )),
            PeerLookup::Missing(note) => notes.push(note),
        }
    }
    if peers.is_empty() {
        let mut msg = "--snapshot needs --compare firecracker[=PATH] (ember's own row is not \
                       written yet)"
            .to_string();
        for n in &notes {
            let _ = write!(msg, "; {n}");
        }
        return Err(BenchError::Usage(msg));
    }
    if opts.parallel > 1 {
        notes.push("--snapshot runs one VMM process at a time; --parallel is ignored".into());
    }
    let cmdline = super::peer_cmdline(opts, &host, true, &mut notes);
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
         lines, pause, full snapshot, kill the process, restore in a new process and watch the \
         console for {} s; `resumed` = the restored guest printed a new line",
        opts.marker,
        mode.watch.as_secs_f64()
    ));
    notes.push(
        "Firecracker: API socket, no jailer; snapshot and memory files in a scratch directory \
         (removed afterwards); load with resume_vm and a File memory backend"
            .into(),
    );
    let versions = peers
        .iter()
        .map(|p| (p.kind.name().to_string(), peer_version(p)))
        .collect();

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
        marker: opts.marker.clone(),
        boot_timeout: opts.timeout,
        watch: mode.watch,
        workdir: workdir.clone(),
    };
    let mut rows = Vec::new();
    for run in 1..=opts.runs {
        // ember's row (its own restore, and the warm `ember exec`) goes here, before the
        // peers', as `ember_row(&ctx, run, on_progress) -> SnapshotRow`: not written yet.
        for peer in &peers {
            let row = match peer.kind {
                PeerKind::Firecracker => firecracker_row(peer, &ctx, run, on_progress),
                PeerKind::Qemu => continue, // filtered out above
            };
            on_progress(&format!(
                "{} #{run}: {}",
                row.vmm,
                match (&row.error, row.resumed) {
                    (Some(e), _) => format!("FAILED: {e}"),
                    (None, Some(true)) => "restored guest resumed".into(),
                    (None, _) => "restored guest printed nothing new".into(),
                }
            ));
            rows.push(row);
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
        versions,
        wall: started.elapsed(),
        options: opts.clone(),
    })
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
    let mut row = SnapshotRow {
        vmm: peer.kind.name().to_string(),
        run,
        ..Default::default()
    };
    let dir = ctx.workdir.join(format!("{}-{run}", row.vmm));
    let result = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
        .and_then(|()| firecracker_steps(peer, ctx, &dir, &mut row, on_progress));
    // Every process of the row has been killed and reaped by now (the guards are dropped).
    runner::remove_workdir(&dir);
    if let Err(e) = result {
        row.error = Some(e);
    }
    row
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
    let config = peers::firecracker_config(&ctx.guest);
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
    let deadline = Instant::now()
        .checked_add(ctx.boot_timeout)
        .ok_or("--timeout is too large")?;
    let marker = ctx.marker.clone();
    let waited = fc.wait(deadline, |log| {
        log.nth_line_after_marker(&marker, LINES_BEFORE_SNAPSHOT)
            .map(|l| (l.at_ns, l.text.clone()))
    });
    {
        let log = lock(&fc.log);
        row.boot_timer_ms = log
            .log_lines()
            .find(|l| l.text.contains("Guest-boot-time"))
            .map(|l| ms_between(fc.spawn_ns, l.at_ns));
        row.marker_ms = log
            .guest_lines()
            .find(|l| l.text.contains(&marker))
            .map(|l| ms_between(fc.spawn_ns, l.at_ns));
    }
    let (at_ns, line) = match waited {
        Waited::Found(x) => x,
        Waited::Exited(e) => {
            return Err(format!(
                "the booting VMM ended ({}) before the snapshot point; its last output: {}",
                describe_exit(&e),
                fc.tail()
            ))
        }
        Waited::TimedOut => {
            return Err(format!(
                "no marker {marker:?} and {LINES_BEFORE_SNAPSHOT} guest lines after it within \
                 {} s (raise --timeout?); last output: {}",
                ctx.boot_timeout.as_secs(),
                fc.tail()
            ))
        }
    };
    row.snapshot_point_ms = Some(ms_between(fc.spawn_ns, at_ns));
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
        .chain(log.stderr.iter().cloned())
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
    let watch_end = Instant::now()
        .checked_add(ctx.watch)
        .ok_or("--snapshot-watch is too large")?;
    let waited = fc.wait(watch_end, |_| None::<()>);
    let end_ns = procfs::monotonic_ns();
    if let Waited::Exited(e) = &waited {
        row.reset_after_ms = Some(ms_between(loaded_ns, e.at_ns));
        (row.exit_code, row.signal) = (e.code, e.signal);
    }
    row.watched_ms = Some(ms_between(
        loaded_ns,
        match &waited {
            Waited::Exited(e) => e.at_ns,
            _ => end_ns,
        },
    ));
    drop(client);
    fc.kill();
    let log = fc.finish();
    let guest: Vec<&ConsoleLine> = log.guest_lines().collect();
    row.lines_after_load = guest.len() as u64;
    row.ticks_after_load = guest.iter().filter(|l| is_tick(&l.text)).count() as u64;
    row.resumed = Some(!guest.is_empty());
    row.ticks_continue = tick_number(row.last_line_before.as_deref().unwrap_or_default())
        .zip(guest.first().and_then(|l| tick_number(&l.text)))
        .map(|(before, after)| before.checked_add(1) == Some(after));
    row.first_output_after_load_ms = guest.first().map(|l| ms_between(loaded_ns, l.at_ns));
    row.longest_silence_ms = longest_silence(
        loaded_ns,
        guest.iter().map(|l| l.at_ns),
        match &waited {
            Waited::Exited(e) => e.at_ns,
            _ => end_ns,
        },
    );
    row.first_line_after = guest.first().map(|l| l.text.clone());
    row.last_line_after = guest.last().map(|l| l.text.clone());
    row.log_after_load = log
        .log_lines()
        .map(|l| l.text.clone())
        .chain(log.stderr.iter().cloned())
        .take(MAX_LOG_LINES)
        .collect();
    row.vmm_reported_ms
        .extend(log.log_lines().filter_map(|l| api_request_took(&l.text)));
    match load_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
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

/// A VMM's stdout, split into lines with their arrival times. Empty lines are dropped.
#[derive(Debug, Default)]
pub struct ConsoleLog {
    lines: Vec<ConsoleLine>,
    partial: Vec<u8>,
    partial_ns: u64,
    /// Lines not kept (past the first 20000).
    pub dropped: u64,
    /// The VMM's stderr, line by line (the first 100).
    pub stderr: Vec<String>,
}

impl ConsoleLog {
    /// Feeds bytes that arrived at `now_ns`.
    pub fn feed(&mut self, chunk: &[u8], now_ns: u64) {
        for &b in chunk {
            if self.partial.is_empty() {
                self.partial_ns = now_ns;
            }
            if b == b'\n' {
                self.end_line();
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
    }

    /// Ends an unterminated last line.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            self.end_line();
        }
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_string();
        self.partial.clear();
        if text.trim().is_empty() {
            return;
        }
        if self.lines.len() >= MAX_LINES {
            self.dropped += 1;
            return;
        }
        let log = peers::is_firecracker_log_line(&text);
        self.lines.push(ConsoleLine {
            at_ns: self.partial_ns,
            text,
            log,
        });
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
                let mut text = Vec::new();
                let _ = err.read_to_end(&mut text);
                let mut log = lock(&log);
                for l in String::from_utf8_lossy(&text).lines().take(MAX_LOG_LINES) {
                    if !l.trim().is_empty() {
                        log.stderr.push(format!("stderr: {l}"));
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
        lines.extend(log.stderr.iter().map(String::as_str));
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
            ("restore: spawn to loaded", fmt_ms(self.spawn_to_loaded_ms)),
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
            ("load_ms", f(self.load_ms)),
            ("spawn_to_loaded_ms", f(self.spawn_to_loaded_ms)),
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
             watched {:.0} s\ncmdline: {}\nwall time {:.1} s",
            self.options.runs,
            g.vcpus,
            g.mem_mib,
            g.kernel.display(),
            g.initrd
                .as_ref()
                .map(|i| format!(", initrd {}", i.display()))
                .unwrap_or_default(),
            watch.as_secs_f64(),
            self.cmdline,
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
        let host = crate::host::HostInfo::detect();
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get() as u64);
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let watch = self.options.snapshot.unwrap_or_default().watch;
        Json::obj([
            ("format", Json::from("ember-bench-snapshot/1")),
            (
                "host",
                Json::obj([
                    ("pvm", Json::from(host.pvm)),
                    ("cpus", Json::from(cpus)),
                    ("loadavg_at_end", Json::from(loadavg)),
                ]),
            ),
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
        }
    }

    #[test]
    fn snapshot_mode_needs_firecracker() {
        for compare in [&[][..], &["qemu=/bin/sh"], &["firecracker=/nonexistent/fc"]] {
            let e = run_snapshot_bench(&options(compare), &mut |_| {}).unwrap_err();
            assert!(matches!(e, BenchError::Usage(_)), "{e}");
            assert!(e.to_string().contains("--compare firecracker"), "{e}");
        }
        let e = run_snapshot_bench(&options(&["firecracker=/nonexistent/fc"]), &mut |_| {})
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/fc"), "{e}");
        let mut o = options(&[]);
        o.snapshot = None;
        assert!(run_snapshot_bench(&o, &mut |_| {}).is_err());
    }
}
