// SPDX-License-Identifier: Apache-2.0
//! The guest profiler (`ember run --profile-guest FILE`): a POSIX timer per vCPU thread sends
//! the kick signal at a fixed rate; each kick makes `KVM_RUN` return, and the vCPU thread
//! (through [`KickHook`]) reads the guest's registers, walks its frame-pointer chain through
//! guest memory, and counts the stack. At the end the addresses are symbolized against the
//! kernel's ELF symbol table and written as a flat profile (functions by samples) and as
//! folded stacks (`a;b;c count`, the input of flamegraph tools).
//!
//! Everything read from the guest is untrusted: the walk is bounded, each step must move up
//! the stack, and every read goes through `KVM_TRANSLATE` and checked guest-memory access.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::bus::lock;
use crate::memory::GuestMemory;
use crate::symbols::Symbols;
use crate::vcpu::{KickHook, KickTimer, VcpuError};
use crate::vmm::Vmm;

/// Default sampling rate per vCPU.
pub const DEFAULT_RATE_HZ: u32 = 1000;
/// Deepest stack walked.
const MAX_DEPTH: usize = 48;
/// Addresses from here up are the guest kernel's half of the address space.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// Frame name of samples taken in guest user mode.
pub const USER_FRAME: &str = "[guest user]";

/// Errors of the profiler.
#[derive(Debug, thiserror::Error)]
pub enum ProfilerError {
    /// A vCPU thread never reported its thread id.
    #[error("vCPU {0} did not start, so it cannot be sampled")]
    NoThread(u32),
    /// The sampling timer could not be started.
    #[error("cannot start the sampling timer")]
    Timer(#[from] VcpuError),
    /// Writing the profile failed.
    #[error("cannot write the profile to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading a folded-stacks file failed.
    #[error("cannot read folded stacks from {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Collects guest stack samples; plug it in as the build's kick hook, then [`start`] it.
///
/// [`start`]: GuestProfiler::start
#[derive(Debug)]
pub struct GuestProfiler {
    period: Duration,
    mem: OnceLock<GuestMemory>,
    /// Raw stacks (leaf first) and how often each was seen.
    stacks: Mutex<HashMap<Vec<u64>, u64>>,
    failed: AtomicU64,
    timers: Mutex<Vec<KickTimer>>,
}

impl GuestProfiler {
    /// A profiler sampling each vCPU `rate_hz` times a second.
    pub fn new(rate_hz: u32) -> Self {
        Self {
            period: Duration::from_nanos(1_000_000_000 / u64::from(rate_hz.max(1))),
            mem: OnceLock::new(),
            stacks: Mutex::new(HashMap::new()),
            failed: AtomicU64::new(0),
            timers: Mutex::new(Vec::new()),
        }
    }

    /// Starts sampling the vCPUs of `vmm` (built with this profiler as its kick hook).
    pub fn start(&self, vmm: &Vmm) -> Result<(), ProfilerError> {
        let _ = self.mem.set(vmm.memory().clone());
        let mut timers = lock(&self.timers);
        for v in vmm.vcpus() {
            let tid = v
                .tid(Duration::from_secs(5))
                .ok_or(ProfilerError::NoThread(v.index()))?;
            timers.push(KickTimer::start(tid, self.period)?);
        }
        Ok(())
    }

    /// Stops the sampling timers.
    pub fn stop(&self) {
        lock(&self.timers).clear();
    }

    /// Samples whose registers could not be read.
    pub fn failed_samples(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The samples so far, symbolized with `symbols`.
    pub fn profile(&self, symbols: Option<&Symbols>) -> Profile {
        let stacks = lock(&self.stacks);
        let mut p = Profile::default();
        for (raw, &count) in stacks.iter() {
            p.add(symbolize_stack(raw, symbols), count);
        }
        p
    }
}

impl KickHook for GuestProfiler {
    fn on_kick(&self, _index: u32, fd: &VcpuFd) {
        let Ok(regs) = fd.get_regs() else {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut stack = vec![regs.rip];
        if let Some(mem) = self.mem.get() {
            let mut reader = GuestReader {
                fd,
                mem,
                page: None,
            };
            walk_frames(&mut reader, regs.rbp, &mut stack);
        }
        *lock(&self.stacks).entry(stack).or_insert(0) += 1;
    }
}

/// Reads guest-virtual memory of one vCPU: `KVM_TRANSLATE` per page (remembering the last
/// one), then a checked guest-memory read.
struct GuestReader<'a> {
    fd: &'a VcpuFd,
    mem: &'a GuestMemory,
    page: Option<(u64, u64)>,
}

/// Something that reads 8 bytes of guest-virtual memory (a trait so the walk can be tested
/// without a VM).
trait ReadGuest {
    fn read_u64(&mut self, gva: u64) -> Option<u64>;
}

impl ReadGuest for GuestReader<'_> {
    fn read_u64(&mut self, gva: u64) -> Option<u64> {
        if gva % 8 != 0 {
            return None;
        }
        let page = gva & !0xfff;
        let phys_page = match self.page {
            Some((v, p)) if v == page => p,
            _ => {
                let t = self.fd.translate_gva(page).ok().filter(|t| t.valid != 0)?;
                let p = t.physical_address & !0xfff;
                self.page = Some((page, p));
                p
            }
        };
        self.mem
            .read_obj::<u64>(GuestAddress(phys_page | (gva & 0xfff)))
            .ok()
    }
}

/// Follows the frame-pointer chain from `rbp`: each frame holds the caller's rbp at [rbp]
/// and the return address at [rbp + 8]. Stops at a null or misaligned frame, at a frame that
/// does not move up the stack, at an unreadable one, or at `MAX_DEPTH`.
fn walk_frames(mem: &mut impl ReadGuest, mut rbp: u64, stack: &mut Vec<u64>) {
    while stack.len() < MAX_DEPTH && rbp != 0 && rbp % 8 == 0 {
        let Some(ret) = rbp.checked_add(8).and_then(|a| mem.read_u64(a)) else {
            break;
        };
        let Some(next) = mem.read_u64(rbp) else { break };
        if ret == 0 {
            break;
        }
        stack.push(ret);
        if next <= rbp {
            break;
        }
        rbp = next;
    }
}

/// Names a raw stack (leaf first), root first. The leaf is its function, `[guest user]` for
/// user-mode addresses, or the bare address; caller frames without a symbol are dropped (a
/// chain broken by code without frame pointers ends in garbage). Return addresses are looked
/// up one byte back, at the call instruction.
fn symbolize_stack(raw: &[u64], symbols: Option<&Symbols>) -> Vec<String> {
    let name = |addr: u64| {
        symbols
            .and_then(|s| s.lookup(addr))
            .map(|(n, _)| n.to_string())
    };
    let mut frames = Vec::with_capacity(raw.len());
    let Some((&leaf, callers)) = raw.split_first() else {
        return frames;
    };
    let leaf_name = match name(leaf) {
        Some(n) => n,
        None if leaf < KERNEL_HALF => USER_FRAME.to_string(),
        None => format!("{leaf:#x}"),
    };
    let user = leaf_name == USER_FRAME;
    frames.push(leaf_name);
    if !user {
        frames.extend(callers.iter().filter_map(|&r| name(r.saturating_sub(1))));
    }
    frames.reverse();
    frames
}

/// A symbolized profile: stacks (root first) with sample counts.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Profile {
    stacks: HashMap<Vec<String>, u64>,
}

/// One function of the flat profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatEntry {
    /// Function name.
    pub name: String,
    /// Samples with this function at the top of the stack.
    pub self_samples: u64,
    /// Samples with this function anywhere on the stack.
    pub total_samples: u64,
}

impl Profile {
    /// Adds `count` samples of `stack` (root first).
    pub fn add(&mut self, stack: Vec<String>, count: u64) {
        if !stack.is_empty() && count > 0 {
            *self.stacks.entry(stack).or_insert(0) += count;
        }
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Profile) {
        for (s, &c) in &other.stacks {
            self.add(s.clone(), c);
        }
    }

    /// Number of samples.
    pub fn total(&self) -> u64 {
        self.stacks.values().sum()
    }

    /// Functions sorted by self samples (then total, then name).
    pub fn flat(&self) -> Vec<FlatEntry> {
        let mut by_name: HashMap<&str, (u64, u64)> = HashMap::new();
        for (stack, &count) in &self.stacks {
            if let Some(leaf) = stack.last() {
                by_name.entry(leaf).or_default().0 += count;
            }
            let mut seen: Vec<&str> = Vec::with_capacity(stack.len());
            for f in stack {
                if !seen.contains(&f.as_str()) {
                    seen.push(f);
                    by_name.entry(f).or_default().1 += count;
                }
            }
        }
        let mut out: Vec<FlatEntry> = by_name
            .into_iter()
            .map(|(name, (s, t))| FlatEntry {
                name: name.to_string(),
                self_samples: s,
                total_samples: t,
            })
            .collect();
        out.sort_by(|a, b| {
            b.self_samples
                .cmp(&a.self_samples)
                .then(b.total_samples.cmp(&a.total_samples))
                .then(a.name.cmp(&b.name))
        });
        out
    }

    /// Folded stacks, one `root;...;leaf count` line each, most frequent first.
    pub fn folded(&self) -> String {
        let mut lines: Vec<(&Vec<String>, u64)> =
            self.stacks.iter().map(|(s, &c)| (s, c)).collect();
        lines.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut out = String::new();
        for (stack, count) in lines {
            let _ = writeln!(out, "{} {count}", stack.join(";"));
        }
        out
    }

    /// Parses folded stacks (as [`folded`](Self::folded) writes them); bad lines are skipped.
    pub fn from_folded(text: &str) -> Self {
        let mut p = Profile::default();
        for line in text.lines() {
            let Some((stack, count)) = line.trim_end().rsplit_once(' ') else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            p.add(stack.split(';').map(str::to_string).collect(), count);
        }
        p
    }

    /// The flat profile as text: the `top` functions by self samples, with their share of
    /// all samples and their inclusive (on-stack) share.
    pub fn render_flat(&self, title: &str, top: usize) -> String {
        let total = self.total();
        let pct = |n: u64| {
            if total == 0 {
                0.0
            } else {
                n as f64 * 100.0 / total as f64
            }
        };
        let mut out = String::new();
        let _ = writeln!(out, "{title}");
        let _ = writeln!(out, "{total} samples\n");
        let _ = writeln!(
            out,
            "{:>8} {:>7} {:>8} {:>7}  function",
            "self", "self%", "total", "total%"
        );
        for e in self.flat().iter().take(top) {
            let _ = writeln!(
                out,
                "{:>8} {:>6.2}% {:>8} {:>6.2}%  {}",
                e.self_samples,
                pct(e.self_samples),
                e.total_samples,
                pct(e.total_samples),
                e.name
            );
        }
        out
    }

    /// Writes the flat profile to `path` and the folded stacks to `path` + `.folded`.
    pub fn write(&self, path: &Path, title: &str) -> Result<(), ProfilerError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ProfilerError::Write { path, source }
        };
        std::fs::write(path, self.render_flat(title, 60)).map_err(err(path))?;
        let folded = folded_path(path);
        std::fs::write(&folded, self.folded()).map_err(err(&folded))
    }

    /// Reads the folded stacks a profile run wrote next to `path`.
    pub fn read_folded(path: &Path) -> Result<Self, ProfilerError> {
        let folded = folded_path(path);
        let text = std::fs::read_to_string(&folded).map_err(|source| ProfilerError::Read {
            path: folded,
            source,
        })?;
        Ok(Self::from_folded(&text))
    }
}

/// Where the folded stacks of the profile at `path` go.
pub fn folded_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".folded");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory as a map from address to 8-byte value.
    struct FakeStack(HashMap<u64, u64>);
    impl ReadGuest for FakeStack {
        fn read_u64(&mut self, gva: u64) -> Option<u64> {
            self.0.get(&gva).copied()
        }
    }

    fn symbols() -> Symbols {
        Symbols::from_entries(vec![
            (0xffff_ffff_8100_0000, 0x100, "start_kernel".into()),
            (0xffff_ffff_8100_0100, 0x100, "do_initcalls".into()),
            (0xffff_ffff_8100_0200, 0x100, "memset".into()),
        ])
    }

    #[test]
    fn walks_a_frame_chain_and_stops_on_garbage() {
        // memset's frame at 0x1000 -> do_initcalls' at 0x1040 -> start_kernel's at 0x1080,
        // whose saved rbp is 0 (the end).
        let mut m = FakeStack(HashMap::from([
            (0x1000, 0x1040),
            (0x1008, 0xffff_ffff_8100_0123),
            (0x1040, 0x1080),
            (0x1048, 0xffff_ffff_8100_0050),
            (0x1080, 0),
            (0x1088, 0xffff_ffff_dead_0000),
        ]));
        let mut stack = vec![0xffff_ffff_8100_0210];
        walk_frames(&mut m, 0x1000, &mut stack);
        assert_eq!(stack.len(), 4);
        let names = symbolize_stack(&stack, Some(&symbols()));
        assert_eq!(names, ["start_kernel", "do_initcalls", "memset"]);

        // A loop (a frame pointing at itself or downwards) ends the walk.
        let mut m = FakeStack(HashMap::from([
            (0x2000, 0x2000),
            (0x2008, 0xffff_ffff_8100_0010),
        ]));
        let mut stack = vec![1];
        walk_frames(&mut m, 0x2000, &mut stack);
        assert_eq!(stack.len(), 2);
        // Misaligned, null and unreadable frames are not followed.
        for rbp in [0, 0x2001, 0x9000] {
            let mut stack = vec![1];
            walk_frames(&mut m, rbp, &mut stack);
            assert_eq!(stack.len(), 1);
        }
        // Depth is bounded even for an endless, well-formed chain.
        let mut m = FakeStack(
            (0..10_000u64)
                .flat_map(|i| {
                    [
                        (0x10_0000 + i * 16, 0x10_0000 + (i + 1) * 16),
                        (0x10_0008 + i * 16, 5),
                    ]
                })
                .collect(),
        );
        let mut stack = vec![1];
        walk_frames(&mut m, 0x10_0000, &mut stack);
        assert_eq!(stack.len(), MAX_DEPTH);
    }

    #[test]
    fn user_mode_and_unknown_addresses() {
        let s = symbols();
        assert_eq!(
            symbolize_stack(&[0x40_1000, 0xffff_ffff_8100_0001], Some(&s)),
            [USER_FRAME]
        );
        assert_eq!(
            symbolize_stack(&[0xffff_ffff_9000_0000], Some(&s)),
            ["0xffffffff90000000"]
        );
        assert_eq!(
            symbolize_stack(&[0xffff_ffff_8100_0000], None),
            ["0xffffffff81000000"]
        );
    }

    #[test]
    fn flat_profile_and_folded_round_trip() {
        let mut p = Profile::default();
        let st = |s: &str| s.split(';').map(str::to_string).collect::<Vec<_>>();
        p.add(st("start_kernel;do_initcalls;memset"), 6);
        p.add(st("start_kernel;do_initcalls"), 3);
        p.add(st("start_kernel;memset"), 1);
        p.add(st("[guest user]"), 2);
        assert_eq!(p.total(), 12);
        let flat = p.flat();
        assert_eq!(flat[0].name, "memset");
        assert_eq!((flat[0].self_samples, flat[0].total_samples), (7, 7));
        let sk = flat.iter().find(|e| e.name == "start_kernel").unwrap();
        assert_eq!((sk.self_samples, sk.total_samples), (0, 10));
        let back = Profile::from_folded(&p.folded());
        assert_eq!(back, p);
        let text = p.render_flat("test", 10);
        assert!(text.contains("12 samples"), "{text}");
        assert!(text.contains("58.33%  memset"), "{text}");
        let mut m = back.clone();
        m.merge(&p);
        assert_eq!(m.total(), 24);
        assert_eq!(
            Profile::from_folded("garbage\nx;y notanumber\n a 0\n").total(),
            0
        );
    }
}
