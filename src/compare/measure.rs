// SPDX-License-Identifier: Apache-2.0
//! Running one row of `ember compare` and measuring it from outside: every stdout line
//! timestamped on arrival (since spawn), the process tree's memory sampled while it runs
//! (`/proc/PID/smaps_rollup` of the spawned process and all its descendants: RSS and PSS),
//! and at the end `wait4`'s CPU time (the process and every descendant it reaped).
//!
//! The lines are read by a thread of the `ember compare` process (never of a VM process).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::bench::procfs::wait_child;

use super::workload::Line;

/// Resident memory of a set of processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeMemory {
    /// Summed RSS, bytes (pages shared between the processes count once per process).
    pub rss: u64,
    /// Summed PSS, bytes (shared pages split between their users, host-wide).
    pub pss: u64,
    /// Processes counted.
    pub procs: usize,
}

/// `Rss:` and `Pss:` of a `/proc/PID/smaps_rollup` text, in bytes.
pub fn parse_rollup(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(kib * 1024)
        })
    };
    Some((field("Rss")?, field("Pss")?))
}

/// The parent pid of a `/proc/PID/stat` line (field 4, counted after the command name's
/// last `)`).
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `root` and all its descendants, from the parent links of `pairs` (pid, ppid).
pub fn descendants(root: u32, pairs: &[(u32, u32)]) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        for &(pid, ppid) in pairs {
            if ppid == p && pid != root && !out.contains(&pid) {
                out.push(pid);
            }
        }
        i += 1;
    }
    out
}

fn process_pairs() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some((pid, parse_stat_ppid(&stat)?))
    })
    .collect()
}

/// The memory of `root` and its descendants now (processes that end meanwhile are left
/// out).
pub fn tree_memory(root: u32) -> TreeMemory {
    let mut m = TreeMemory::default();
    for pid in descendants(root, &process_pairs()) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        if let Some((rss, pss)) = parse_rollup(&text) {
            m.rss += rss;
            m.pss += pss;
            m.procs += 1;
        }
    }
    m
}

/// How one run went.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// stdout lines as they arrived.
    pub lines: Vec<Line>,
    /// Spawn to exit, ms.
    pub wall_ms: f64,
    /// Exit code (`None`: killed by a signal or by the timeout).
    pub code: Option<i32>,
    /// User + system CPU time of the process and its reaped descendants, ms.
    pub cpu_ms: f64,
    /// The sample with the largest PSS.
    pub peak: TreeMemory,
    /// The run was killed at the timeout.
    pub timed_out: bool,
    /// The last lines of stderr.
    pub stderr_tail: String,
}

/// How often the process tree's memory is sampled (and at every stdout line).
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Runs `cmd` (its stdout piped and read line by line; stderr to `stderr_file`), samples
/// its process tree's memory until it exits, kills it after `timeout`.
pub fn run_measured(
    mut cmd: Command,
    stderr_file: &Path,
    timeout: Duration,
) -> std::io::Result<RunResult> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    cmd.stderr(std::fs::File::create(stderr_file)?);
    let t0 = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take();
    let (tx, rx) = mpsc::channel::<Line>();
    let reader = std::thread::Builder::new()
        .name("compare-stdout".into())
        .spawn(move || {
            let Some(out) = stdout else { return };
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let at = t0.elapsed();
                        let text = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        if tx.send(Line { at, text }).is_err() {
                            break;
                        }
                    }
                }
            }
        })?;
    let mut res = RunResult::default();
    let sample = |res: &mut RunResult| {
        let m = tree_memory(pid);
        if m.pss > res.peak.pss {
            res.peak = m;
        }
    };
    let exit = loop {
        match rx.recv_timeout(SAMPLE_EVERY) {
            Ok(l) => res.lines.push(l),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // stdout closed: the tree may still run (or have closed it); keep polling.
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(SAMPLE_EVERY / 5),
        }
        sample(&mut res);
        if let Some(exit) = wait_child(pid, Some(Duration::ZERO))? {
            break Some(exit);
        }
        if t0.elapsed() > timeout {
            break None;
        }
    };
    let exit = match exit {
        Some(e) => e,
        None => {
            res.timed_out = true;
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            match wait_child(pid, None)? {
                Some(e) => e,
                None => return Err(std::io::Error::other("the child could not be reaped")),
            }
        }
    };
    res.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    res.code = exit.code;
    res.cpu_ms = (exit.cpu.user_us + exit.cpu.sys_us) as f64 / 1e3;
    // The rest of stdout: what the tree wrote before it ended (a descendant that still holds
    // the pipe is given a moment; the reader ends at EOF).
    let drain_until = Instant::now() + Duration::from_secs(2);
    while let Ok(l) = rx.recv_timeout(drain_until.saturating_duration_since(Instant::now())) {
        res.lines.push(l);
    }
    if reader.is_finished() {
        let _ = reader.join();
    }
    let err = std::fs::read_to_string(stderr_file).unwrap_or_default();
    let tail: Vec<&str> = err.lines().rev().take(4).collect();
    res.stderr_tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_and_stat() {
        let text = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:                4096 kB\n\
                    Pss:                1500 kB\nPss_Anon:           1000 kB\n";
        assert_eq!(parse_rollup(text), Some((4096 * 1024, 1500 * 1024)));
        assert_eq!(parse_rollup("Rss: 1 kB\n"), None);
        assert_eq!(parse_stat_ppid("42 (a) b) c) S 7 42 42"), Some(7));
        assert_eq!(parse_stat_ppid("nonsense"), None);
    }

    #[test]
    fn descendants_follow_parent_links() {
        let pairs = [
            (1, 0),
            (10, 1),
            (11, 10),
            (12, 11),
            (13, 1),
            (14, 12),
            (15, 99),
        ];
        let mut d = descendants(10, &pairs);
        d.sort_unstable();
        assert_eq!(d, vec![10, 11, 12, 14]);
        assert_eq!(descendants(99, &pairs), vec![99, 15]);
    }

    #[test]
    fn a_real_tree_is_measured() {
        let dir = std::env::temp_dir().join(format!("ember-compare-m-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo one; sleep 0.3 & wait; echo two; echo err >&2; exit 3",
        ]);
        let r = run_measured(cmd, &dir.join("err"), Duration::from_secs(30)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(r.code, Some(3));
        assert!(!r.timed_out);
        let texts: Vec<&str> = r.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["one", "two"]);
        assert!(r.lines[0].at <= r.lines[1].at);
        assert!(r.peak.pss > 0 && r.peak.rss >= r.peak.pss, "{:?}", r.peak);
        assert!(r.peak.procs >= 2, "sh and its sleep: {:?}", r.peak);
        assert_eq!(r.stderr_tail, "err");
    }

    #[test]
    fn a_run_past_its_timeout_is_killed() {
        let dir = std::env::temp_dir().join(format!("ember-compare-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let r = run_measured(cmd, &dir.join("err"), Duration::from_millis(200)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(r.timed_out);
        assert_eq!(r.code, None);
    }
}
