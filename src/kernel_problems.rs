// SPDX-License-Identifier: Apache-2.0
//! Kernel problem signatures seen on the guest console: oops, WARN, BUG, panic, general
//! protection fault, and call traces, each with its first line and the function it names.
//!
//! The console ([`crate::devices::legacy::serial::ConsoleOutput`]) hands every completed line
//! (its first [`LINE_MAX`] bytes) to a [`ProblemScanner`], which looks at the start of the line
//! only (after Linux's optional `[ seconds]` timestamp and `<level>` prefix): a few prefix
//! comparisons per line, nothing per byte. What it finds goes into a [`KernelProblems`]
//! shared with the rest of the VM (at most [`MAX_PROBLEMS`] entries; later ones are counted).
//! `ember exec --json` reports them, symbolized with the kernel's ELF symbols where the
//! console gave an address only ([`KernelProblem::symbolize`]).
//!
//! These are the guest's own lines, like the panic line: any guest (or command writing to the
//! console) can print them, and the kernel prints them only at a console log level that
//! shows them (`ember exec` runs with `loglevel=1`; see docs/exec.md).

use std::sync::Mutex;

use crate::devices::bus::lock;
use crate::symbols::Symbols;

/// At most this many problems are kept per VM.
pub const MAX_PROBLEMS: usize = 16;
/// The longest line prefix the console keeps (and a problem's line holds).
pub const LINE_MAX: usize = 160;
/// The longest function name kept.
const FUNCTION_MAX: usize = 80;

/// Report helpers a call trace starts with; the first frame that is none of them is the one
/// that names the problem.
const HELPER_FRAMES: [&str; 14] = [
    "dump_stack",
    "dump_stack_lvl",
    "show_stack",
    "show_trace_log_lvl",
    "panic",
    "vpanic",
    "__warn",
    "warn_slowpath_fmt",
    "report_bug",
    "handle_bug",
    "exc_invalid_op",
    "asm_exc_invalid_op",
    "__die",
    "oops_end",
];

/// One problem signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelProblem {
    /// `oops`, `warning`, `bug`, `panic`, `general-protection-fault` or `call-trace`.
    pub kind: &'static str,
    /// Its first line, without the timestamp (at most [`LINE_MAX`] bytes, lossy UTF-8).
    pub line: String,
    /// The function it names (from the WARNING line, the `RIP:` line or the call trace's
    /// first frame), without the offset.
    pub function: Option<String>,
    /// The address the console gave instead of a function name (a kernel without kallsyms).
    pub address: Option<u64>,
}

impl KernelProblem {
    /// Fills [`function`](Self::function) from `symbols` when the console gave an address
    /// only.
    pub fn symbolize(&mut self, symbols: Option<&Symbols>) {
        if self.function.is_some() {
            return;
        }
        if let (Some(addr), Some(s)) = (self.address, symbols) {
            self.function = s.lookup(addr).map(|(name, _)| name.to_string());
        }
    }
}

/// The problems of one VM (bounded), shared between its console and whoever reports them.
#[derive(Debug, Default)]
pub struct KernelProblems {
    inner: Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    list: Vec<KernelProblem>,
    dropped: usize,
}

impl KernelProblems {
    /// The problems seen so far, and how many more were seen but not kept.
    pub fn snapshot(&self) -> (Vec<KernelProblem>, usize) {
        let r = lock(&self.inner);
        (r.list.clone(), r.dropped)
    }

    /// Records `p`; returns its index, or `None` when the list is full.
    fn push(&self, p: KernelProblem) -> Option<usize> {
        let mut r = lock(&self.inner);
        if r.list.len() >= MAX_PROBLEMS {
            r.dropped += 1;
            return None;
        }
        r.list.push(p);
        Some(r.list.len() - 1)
    }

    /// Sets the function (or address) of problem `i` unless it has one.
    fn set_function(&self, i: usize, f: Frame) {
        let mut r = lock(&self.inner);
        if let Some(p) = r.list.get_mut(i) {
            if p.function.is_none() && p.address.is_none() {
                p.function = f.name;
                p.address = f.address;
            }
        }
    }
}

/// A function as the console names it: a name, or an address only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Frame {
    name: Option<String>,
    address: Option<u64>,
}

impl Frame {
    /// `func+0x1a/0x40 [module]`, `0xffffffff81001234`, `[<ffffffff81001234>] func+0x..`.
    fn parse(text: &str) -> Option<Frame> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("[<") {
            let (hex, after) = rest.split_once(">]")?;
            let named = Frame::parse(after).filter(|f| f.name.is_some());
            return named.or_else(|| {
                Some(Frame {
                    name: None,
                    address: Some(u64::from_str_radix(hex, 16).ok()?),
                })
            });
        }
        let word = text.split_whitespace().next()?;
        if let Some(hex) = word.strip_prefix("0x") {
            let hex = hex.split(['/', '+']).next().unwrap_or(hex);
            return Some(Frame {
                name: None,
                address: Some(u64::from_str_radix(hex, 16).ok()?),
            });
        }
        let name = word.split('+').next().unwrap_or(word);
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        ok.then(|| Frame {
            name: Some(name.chars().take(FUNCTION_MAX).collect()),
            address: None,
        })
    }
}

/// Line-by-line state: which problem still waits for its function, and whether a call
/// trace's first frame is next.
#[derive(Debug, Default)]
pub struct ProblemScanner {
    /// The problem waiting for its function.
    open: Option<usize>,
    /// Inside a report (from its first line to `---[ end`): a call trace belongs to it.
    in_report: bool,
    /// The next frame line is the first of a call trace.
    in_trace: bool,
}

/// Removes Linux's `<N>` level and `[    1.234567] ` timestamp prefixes.
fn strip_prefix(mut line: &[u8]) -> &[u8] {
    if line.first() == Some(&b'<') {
        if let Some(end) = line.iter().take(5).position(|&b| b == b'>') {
            line = &line[end + 1..];
        }
    }
    if line.first() == Some(&b'[') {
        if let Some(end) = line.iter().take(24).position(|&b| b == b']') {
            line = &line[end + 1..];
            if line.first() == Some(&b' ') {
                line = &line[1..];
            }
        }
    }
    line
}

impl ProblemScanner {
    /// Looks at one console line (without its newline); records what it finds in `out`.
    pub fn line(&mut self, raw: &[u8], out: &KernelProblems) {
        let end = raw
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let line = strip_prefix(&raw[..end]);
        if line.is_empty() {
            return;
        }
        let kind = if line.starts_with(b"Oops:") {
            Some("oops")
        } else if line.starts_with(b"WARNING:") {
            Some("warning")
        } else if line.starts_with(b"BUG:") || line.starts_with(b"kernel BUG at") {
            Some("bug")
        } else if line.starts_with(b"Kernel panic - not syncing") {
            Some("panic")
        } else if line.starts_with(b"general protection fault") {
            Some("general-protection-fault")
        } else {
            None
        };
        if let Some(kind) = kind {
            // An oops following a BUG: line is the same report.
            if kind == "oops" && self.in_report && self.open.is_some() {
                return;
            }
            let text = String::from_utf8_lossy(&line[..line.len().min(LINE_MAX)]);
            let mut frame = Frame::default();
            if kind == "warning" {
                // "WARNING: CPU: 0 PID: 1 at kernel/foo.c:12 func+0x1/0x2"
                if let Some((_, after)) = text.split_once(" at ") {
                    let mut words = after.split_whitespace();
                    words.next(); // FILE:LINE
                    frame = words.next().and_then(Frame::parse).unwrap_or_default();
                }
            }
            let found = frame.name.is_some() || frame.address.is_some();
            let idx = out.push(KernelProblem {
                kind,
                line: text.into_owned(),
                function: frame.name,
                address: frame.address,
            });
            self.open = if found { None } else { idx };
            self.in_report = true;
            self.in_trace = false;
            return;
        }
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        if let Some(rip) = text.strip_prefix("RIP: ") {
            // "RIP: 0010:func+0x1/0x2" or "RIP: 0010:0xffffffff81001234"
            let at = rip.split_once(':').map_or(rip, |(_, f)| f);
            if let (Some(i), Some(f)) = (self.open, Frame::parse(at)) {
                out.set_function(i, f);
                self.open = None;
            }
            return;
        }
        if text.starts_with("Call Trace:") {
            self.in_trace = true;
            if !self.in_report {
                self.open = out.push(KernelProblem {
                    kind: "call-trace",
                    line: text.to_string(),
                    function: None,
                    address: None,
                });
                self.in_report = true;
            }
            return;
        }
        if text.starts_with("---[ end") {
            *self = Self::default();
            return;
        }
        if self.in_trace {
            let t = text.trim_start();
            if t.starts_with('<') || t.starts_with('?') {
                return; // <TASK>, <IRQ>, unreliable frames
            }
            match Frame::parse(t) {
                Some(f)
                    if f.name
                        .as_deref()
                        .is_some_and(|n| HELPER_FRAMES.contains(&n)) => {}
                Some(f) => {
                    if let Some(i) = self.open.take() {
                        out.set_function(i, f);
                    }
                    self.in_trace = false;
                }
                None => self.in_trace = false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> (Vec<KernelProblem>, usize) {
        let out = KernelProblems::default();
        let mut s = ProblemScanner::default();
        for l in text.lines() {
            let b = l.as_bytes();
            s.line(&b[..b.len().min(LINE_MAX)], &out);
        }
        out.snapshot()
    }

    #[test]
    fn warning_names_its_function() {
        let (p, _) = scan(
            "[    1.234567] ------------[ cut here ]------------\n\
             [    1.234600] WARNING: CPU: 0 PID: 1 at drivers/foo/bar.c:42 foo_probe+0x1a/0x40\n\
             [    1.234700] Modules linked in:\n\
             [    1.234800] RIP: 0010:foo_probe+0x1a/0x40\n\
             [    1.234900] Call Trace:\n\
             [    1.235000]  <TASK>\n\
             [    1.235100]  ? __warn+0x80/0x100\n\
             [    1.235200]  really_probe+0x10/0x20\n\
             [    1.235300] ---[ end trace 0000000000000000 ]---\n",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].kind, "warning");
        assert_eq!(
            p[0].line,
            "WARNING: CPU: 0 PID: 1 at drivers/foo/bar.c:42 foo_probe+0x1a/0x40"
        );
        assert_eq!(p[0].function.as_deref(), Some("foo_probe"));
    }

    #[test]
    fn oops_takes_the_rip_function_and_panic_the_first_real_frame() {
        let (p, _) = scan(
            "BUG: kernel NULL pointer dereference, address: 0000000000000000\n\
             #PF: supervisor read access in kernel mode\n\
             Oops: 0000 [#1] PREEMPT SMP NOPTI\n\
             CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0 #1\n\
             RIP: 0010:bad_read+0x5/0x10\n\
             Call Trace:\n\
             \x20do_thing+0x1/0x2\n\
             ---[ end trace 0000000000000000 ]---\n\
             Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\n\
             CPU: 0 PID: 1 Comm: sh\n\
             Call Trace:\n\
             \x20<TASK>\n\
             \x20dump_stack_lvl+0x5d/0x80\n\
             \x20panic+0x100/0x300\n\
             \x20do_exit+0x900/0xa00\n\
             ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n",
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].kind, "bug");
        assert_eq!(p[0].function.as_deref(), Some("bad_read"));
        assert_eq!(p[1].kind, "panic");
        assert!(p[1]
            .line
            .starts_with("Kernel panic - not syncing: Attempted"));
        assert_eq!(p[1].function.as_deref(), Some("do_exit"));
    }

    #[test]
    fn addresses_are_symbolized() {
        let (mut p, _) = scan(
            "<4>[    2.000000] general protection fault, probably for non-canonical address\n\
             [    2.000001] RIP: 0010:0xffffffff81001234\n\
             [    3.0] Call Trace:\n\
             [    3.1]  [<ffffffff81002008>] 0xffffffff81002008\n",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].kind, "general-protection-fault");
        assert_eq!(p[0].address, Some(0xffff_ffff_8100_1234));
        let syms = Symbols::from_entries(vec![
            (0xffff_ffff_8100_1200, 0x100, "gp_func".into()),
            (0xffff_ffff_8100_2000, 0x100, "other".into()),
        ]);
        p[0].symbolize(Some(&syms));
        assert_eq!(p[0].function.as_deref(), Some("gp_func"));
        // A lone call trace (dump_stack, hung task) is recorded with its first frame.
        let (mut p, _) = scan("Call Trace:\n [<ffffffff81002008>] 0xffffffff81002008\n");
        assert_eq!(p[0].kind, "call-trace");
        p[0].symbolize(Some(&syms));
        assert_eq!(p[0].function.as_deref(), Some("other"));
    }

    #[test]
    fn bounded_and_quiet_on_ordinary_output() {
        let (p, dropped) = scan("hello\nWARNINGS: none\n  BUG: not at line start\nok\n");
        assert!(p.is_empty() && dropped == 0, "{p:?}");
        let many = "BUG: x\n---[ end trace ]---\n".repeat(MAX_PROBLEMS + 5);
        let (p, dropped) = scan(&many);
        assert_eq!((p.len(), dropped), (MAX_PROBLEMS, 5));
        let long = format!("Kernel panic - not syncing: {}", "x".repeat(1000));
        let (p, _) = scan(&long);
        assert_eq!(p[0].line.len(), LINE_MAX);
    }
}
