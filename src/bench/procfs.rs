// SPDX-License-Identifier: Apache-2.0
//! Facts about host processes that `ember bench` measures: resident memory per mapping
//! (`/proc/PID/smaps`), CPU time (`getrusage`, `wait4`), the monotonic clock shared by all
//! processes, and waiting for a child with a timeout (a pidfd).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// One mapping of a process and its resident size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Resident bytes.
    pub rss: u64,
}

impl Vma {
    /// Size of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parses the text of `/proc/PID/smaps`: every mapping with its `Rss:`.
pub fn parse_smaps(text: &str) -> Vec<Vma> {
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first == "Rss:" {
            let kib = words
                .next()
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
            if let Some(last) = out.last_mut() {
                last.rss = kib * 1024;
            }
            continue;
        }
        // A mapping header: "start-end perms offset dev inode [path]".
        let Some((a, b)) = first.split_once('-') else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
            out.push(Vma { start, end, rss: 0 });
        }
    }
    out
}

/// Reads the mappings of process `pid` (this process when `None`).
pub fn read_smaps(pid: Option<u32>) -> io::Result<Vec<Vma>> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/smaps"),
        None => "/proc/self/smaps".to_string(),
    };
    Ok(parse_smaps(&std::fs::read_to_string(path)?))
}

/// Resident memory of a VMM process at one moment, split into guest RAM and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemSample {
    /// Resident bytes of the whole process.
    pub rss: u64,
    /// Resident bytes of the guest-memory mappings (the guest memory it touched).
    pub guest_resident: u64,
}

impl MemSample {
    /// What the VMM itself costs: RSS beyond resident guest memory.
    pub fn overhead(&self) -> u64 {
        self.rss.saturating_sub(self.guest_resident)
    }

    /// Sums `vmas`, counting as guest memory every mapping inside one of `guest` (host
    /// address ranges `(start, len)` of the guest-memory mappings: exact, for ember itself).
    pub fn by_ranges(vmas: &[Vma], guest: &[(u64, u64)]) -> Self {
        let inside = |v: &Vma| {
            guest
                .iter()
                .any(|&(s, len)| v.start >= s && v.end <= s.saturating_add(len))
        };
        Self::split(vmas, inside)
    }

    /// Sums `vmas`, counting as guest memory every mapping whose size is between the guest
    /// memory size and 16 MiB more (for peers, whose mappings ember cannot name). When no
    /// single mapping qualifies, a run of adjacent mappings of that total size does (guest
    /// memory with image files mapped into it, as ember's image cache does, is several
    /// mappings). Returns `None` when nothing looks like guest memory.
    pub fn by_size(vmas: &[Vma], guest_size: u64) -> Option<Self> {
        let ram_sized = |len: u64| len >= guest_size && len <= guest_size + (16 << 20);
        if vmas.iter().any(|v| ram_sized(v.len())) {
            return Some(Self::split(vmas, |v| ram_sized(v.len())));
        }
        // Runs of adjacent mappings, in address order.
        let mut sorted = vmas.to_vec();
        sorted.sort_by_key(|v| v.start);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for v in &sorted {
            match runs.last_mut() {
                Some(run) if run.1 == v.start => run.1 = v.end,
                _ => runs.push((v.start, v.end)),
            }
        }
        let guest: Vec<(u64, u64)> = runs
            .into_iter()
            .filter(|&(s, e)| ram_sized(e - s))
            .map(|(s, e)| (s, e - s))
            .collect();
        (!guest.is_empty()).then(|| Self::by_ranges(vmas, &guest))
    }

    fn split(vmas: &[Vma], is_guest: impl Fn(&Vma) -> bool) -> Self {
        let mut s = Self::default();
        for v in vmas {
            s.rss += v.rss;
            if is_guest(v) {
                s.guest_resident += v.rss;
            }
        }
        s
    }
}

/// Peak resident set (`VmHWM`) of process `pid` (this process when `None`), in bytes.
pub fn peak_rss(pid: Option<u32>) -> Option<u64> {
    status_bytes(pid, "VmHWM")
}

/// A size field of `/proc/PID/status` (`VmRSS`, `RssAnon`, `RssFile`...) of process `pid`
/// (this process when `None`), in bytes.
pub fn status_bytes(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// CPU time thread `tid` of this process has run, in nanoseconds (`/proc/self/task/TID/
/// schedstat`, exact, unlike the tick-sampled times of `stat`).
pub fn thread_run_ns(tid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// CPU time (user + system) of every thread of process `pid` so far, in milliseconds, from
/// `/proc/PID/stat` (which counts in clock ticks, usually 10 ms).
pub fn process_cpu_ms(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_ticks(&text).map(|t| t as f64 * 1000.0 / clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line; the command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last ')'.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU time, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTime {
    /// User mode.
    pub user_us: u64,
    /// Kernel mode.
    pub sys_us: u64,
}

impl CpuTime {
    fn from_rusage(ru: &libc::rusage) -> Self {
        let us = |t: libc::timeval| {
            u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
        };
        Self {
            user_us: us(ru.ru_utime),
            sys_us: us(ru.ru_stime),
        }
    }
}

/// CPU time of this whole process so far (threads that ended included).
pub fn process_cpu_time() -> CpuTime {
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to an rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return CpuTime::default();
    }
    CpuTime::from_rusage(&ru)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the host, so a
/// child's timestamps can be compared with its parent's.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: CLOCK_MONOTONIC is always available; `ts` is a valid out-pointer.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The `CLOCK_MONOTONIC` time of an earlier `Instant` (Rust's `Instant` is that clock on
/// Linux, but opaque).
pub fn monotonic_ns_of(instant: Instant) -> u64 {
    // Elapsed first, then the clock: the result can only err late (by the gap between the two
    // reads), never before `instant` (reading the clock first made it up to that gap early,
    // which a preempted thread saw as time going backwards).
    let ago = u64::try_from(instant.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let now = monotonic_ns();
    now.saturating_sub(ago)
}

/// How a child process ended, with what it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal that killed it, when one did.
    pub signal: Option<i32>,
    /// CPU time of the child (all its threads).
    pub cpu: CpuTime,
    /// Peak resident set in bytes.
    pub max_rss: u64,
    /// `CLOCK_MONOTONIC` when the exit was seen.
    pub at_ns: u64,
}

/// Waits for child `pid` to end, at most `timeout`, and reaps it. `Ok(None)` on timeout (the
/// child is still running and still needs reaping).
///
/// The caller must own `pid` as an unreaped child (spawned by this process, not yet waited
/// for): after `Ok(Some(_))` the pid is gone and must not be signalled again.
pub fn wait_child(pid: u32, timeout: Option<Duration>) -> io::Result<Option<ChildExit>> {
    let pid_t =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // A timeout past the clock's end is no timeout.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let pidfd = pidfd_open(pid_t);
    loop {
        if let Some(exit) = try_reap(pid_t)? {
            return Ok(Some(exit));
        }
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Ok(None),
            },
            None => None,
        };
        match &pidfd {
            Some(fd) => {
                let ms = left.map_or(-1, |l| {
                    i32::try_from(l.as_millis().max(1)).unwrap_or(i32::MAX)
                });
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the count matches.
                let rc = unsafe { libc::poll(&mut p, 1, ms) };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
            // Kernels without pidfd_open: poll the child every 2 ms.
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn try_reap(pid: libc::pid_t) -> io::Result<Option<ChildExit>> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers; `pid` is our child (the caller's contract).
    let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(e)
        };
    }
    if rc == 0 {
        return Ok(None);
    }
    let at_ns = monotonic_ns();
    Ok(Some(ChildExit {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        cpu: CpuTime::from_rusage(&ru),
        max_rss: u64::try_from(ru.ru_maxrss).unwrap_or(0) * 1024,
        at_ns,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a2c000 r--p 00000000 fe:01 1234   /usr/bin/ember
Size:                176 kB
Rss:                 172 kB
Pss:                 172 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               40960 kB
7f0008000000-7f0008021000 rw-p 00000000 00:00 0   [heap]
Size:                132 kB
Rss:                  64 kB
VmFlags: rd wr mr mw me ac
";

    #[test]
    fn smaps_split_by_ranges_and_by_size() {
        let vmas = parse_smaps(SMAPS);
        assert_eq!(vmas.len(), 3);
        assert_eq!(vmas[1].len(), 128 << 20);
        assert_eq!(vmas[1].rss, 40960 << 10);
        let s = MemSample::by_ranges(&vmas, &[(0x7f00_0000_0000, 128 << 20)]);
        assert_eq!(s.rss, (172 + 40960 + 64) << 10);
        assert_eq!(s.guest_resident, 40960 << 10);
        assert_eq!(s.overhead(), (172 + 64) << 10);
        assert_eq!(MemSample::by_size(&vmas, 128 << 20), Some(s));
        assert_eq!(MemSample::by_size(&vmas, 256 << 20), None);
        assert_eq!(MemSample::by_ranges(&vmas, &[]).guest_resident, 0);
    }

    #[test]
    fn guest_memory_split_by_mapped_images_is_found_by_size() {
        // 128 MiB of guest memory as anonymous | file (kernel) | anonymous, plus the
        // process's own heap elsewhere.
        let base = 0x7f00_0000_0000u64;
        let vma = |start: u64, end: u64, rss: u64| Vma { start, end, rss };
        let vmas = [
            vma(0x5500_0000_0000, 0x5500_0010_0000, 300 << 10),
            vma(base + (16 << 20), base + (26 << 20), 4 << 20),
            vma(base, base + (16 << 20), 2 << 20),
            vma(base + (26 << 20), base + (128 << 20), 1 << 20),
        ];
        let s = MemSample::by_size(&vmas, 128 << 20).unwrap();
        assert_eq!(s.guest_resident, 7 << 20);
        assert_eq!(s.overhead(), 300 << 10);
        assert_eq!(MemSample::by_size(&vmas[..2], 128 << 20), None);
    }

    #[test]
    fn stat_cpu_fields() {
        let line = "1234 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(280));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert!(process_cpu_ms(std::process::id()).is_some());
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let spin: u64 = (0..100_000u64).map(|x| x ^ 3).sum();
        assert!(spin > 0);
        assert!(thread_run_ns(tid).unwrap() > 0);
    }

    #[test]
    fn own_process_is_readable() {
        let vmas = read_smaps(None).unwrap();
        assert!(vmas.iter().any(|v| v.rss > 0));
        assert!(peak_rss(None).unwrap() > 0);
        let a = monotonic_ns();
        let i = Instant::now();
        assert!(monotonic_ns_of(i) >= a);
        assert!(monotonic_ns() >= monotonic_ns_of(i));
    }

    #[test]
    // The children are reaped by wait_child (wait4), which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn waits_for_and_reaps_a_child() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let exit = wait_child(child.id(), Some(Duration::from_secs(20)))
            .unwrap()
            .expect("sh did not exit");
        assert_eq!(exit.code, Some(3));
        assert_eq!(exit.signal, None);

        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = sleeper.id();
        assert_eq!(
            wait_child(pid, Some(Duration::from_millis(20))).unwrap(),
            None
        );
        sleeper.kill().unwrap();
        let exit = wait_child(pid, None).unwrap().unwrap();
        assert_eq!(exit.signal, Some(libc::SIGKILL));
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reaped by wait_child
    fn a_timeout_past_the_clock_s_end_does_not_panic() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let exit = wait_child(child.id(), Some(Duration::MAX))
            .unwrap()
            .expect("true did not exit");
        assert_eq!(exit.code, Some(0));
    }
}
