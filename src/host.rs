// SPDX-License-Identifier: Apache-2.0
//! What kind of KVM host this is, and what a guest needs to run on it.
//!
//! On a PVM host (`kvm_pvm` module: KVM without hardware virtualization, guest kernel code
//! emulated), a few instructions cannot be emulated and KVM's hypercalls hang. ember then
//! adds guest command-line switches that keep Linux away from those instructions and hides
//! the hypercall-based PV features from CPUID. On hardware KVM nothing is changed.

use std::path::Path;
use std::time::Duration;

/// Guest command-line switches a PVM host needs: no XSAVE (XRSTOR is not emulated), no
/// SMAP (CLAC/STAC), no POPCNT, and an environment variable for init that tells glibc not to
/// use AVX.
///
/// The last one is not about emulation. Guest user code runs natively on a PVM host, so its
/// CPUID and XGETBV see the host's CPU: OSXSAVE set and AVX/AVX2/AVX-512 enabled in XCR0.
/// glibc then picks AVX and EVEX string functions (memcpy, strlen, ...). But the guest
/// kernel runs with `noxsave`, so a context switch saves only the x87/SSE state (FXSAVE):
/// the upper halves of the YMM registers and YMM16-31/ZMM/k registers leak between processes,
/// and a process preempted in the middle of a memcpy resumes with another's data in them.
/// Pipelines of busybox applets died with SIGSEGV in about half of all boots that way.
/// `GLIBC_TUNABLES=glibc.cpu.hwcaps=-OSXSAVE` (the kernel hands unknown `NAME=value` words
/// to init as environment, and every process inherits it) makes glibc treat AVX as unusable,
/// so it stays on SSE code whose registers FXSAVE does save. Programs that test CPUID for AVX
/// themselves instead of through glibc are not covered.
///
///
/// `erms` and `fsrm` in `clearcpuid` are about speed, not emulation: with ERMS/FSRM the
/// kernel's `memcpy`, `memset`, `clear_page` and user copies use `rep movsb`/`rep stosb`,
/// which the instruction emulator runs one byte per iteration; without them the kernel picks
/// its `rep movsq`/`rep stosq` variants (REP_GOOD), eight bytes per iteration.
/// `clear_page` became about six times cheaper in the guest profiler, the default guest's
/// boot 4.8 % shorter (docs/profile.md, change 5).
pub const PVM_CMDLINE_SWITCHES: &str =
    "noxsave clearcpuid=smap,popcnt,erms,fsrm GLIBC_TUNABLES=glibc.cpu.hwcaps=-OSXSAVE";

/// Facts about the host that change how a guest is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostInfo {
    /// The host's KVM is PVM.
    pub pvm: bool,
}

impl HostInfo {
    /// Looks at the running host.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Looks for the PVM module under `sys_module` (testable).
    pub fn detect_in(sys_module: &Path) -> Self {
        Self {
            pvm: sys_module.join("kvm_pvm").exists(),
        }
    }

    /// Command-line switches this host needs, if any.
    pub fn cmdline_switches(&self) -> Option<&'static str> {
        self.pvm.then_some(PVM_CMDLINE_SWITCHES)
    }

    /// Whether KVM PV features that use hypercalls must be hidden.
    pub fn hide_pv_hypercalls(&self) -> bool {
        self.pvm
    }

    /// How long a guest gets to shut down after a stop request, unless the user says: a
    /// guest's kernel is ~1000x slower on a PVM host, so it gets 30 s there, 5 s elsewhere.
    pub fn default_shutdown_timeout(&self) -> Duration {
        Duration::from_secs(if self.pvm { 30 } else { 5 })
    }
}

/// Appends `switches` to `cmdline`, skipping each switch whose key the user already set.
/// Two are merged instead: `GLIBC_TUNABLES` (`:`-separated tunables: ember's are added to the
/// user's unless the user already set the same tunable) and `clearcpuid` (`,`-separated
/// features: the kernel reads only one `clearcpuid=`, so ember's features are added to the
/// user's list).
pub fn append_switches(cmdline: &str, switches: &str) -> String {
    // The user's text is kept byte for byte (a quoted `ember.cmd` may hold double spaces).
    let mut out = cmdline.trim().to_string();
    for s in switches.split_whitespace() {
        let found = word_spans(&out).find(|&(a, b)| param_key(&out[a..b]) == param_key(s));
        match found {
            Some((a, b)) if param_key(s) == "GLIBC_TUNABLES" => {
                let mut word = out[a..b].to_string();
                merge_values(&mut word, s, ':', |t| t.split('=').next().unwrap_or(t));
                out.replace_range(a..b, &word);
            }
            Some((a, b)) if param_key(s) == "clearcpuid" => {
                let mut word = out[a..b].to_string();
                merge_values(&mut word, s, ',', str::trim);
                out.replace_range(a..b, &word);
            }
            Some(_) => {}
            None => {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(s);
            }
        }
    }
    out
}

/// Whether `cmdline` sets `key=...` (outside any other parameter's quoted value).
pub fn has_param(cmdline: &str, key: &str) -> bool {
    word_spans(cmdline).any(|(a, b)| {
        cmdline[a..b]
            .strip_prefix(key)
            .is_some_and(|rest| rest.starts_with('='))
    })
}

/// The value of the last `key=VALUE` word of `cmdline` (the one the kernel uses), quotes
/// removed; `None` when there is none.
pub fn param_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    word_spans(cmdline)
        .filter_map(|(a, b)| cmdline[a..b].strip_prefix(key)?.strip_prefix('='))
        .last()
        .map(|v| v.trim_matches('"'))
}

/// The name of a command-line word: what comes before its first `=`.
fn param_key(word: &str) -> &str {
    word.split('=').next().unwrap_or(word)
}

/// Byte ranges of the words of a kernel command line: whitespace separates them, except
/// inside double quotes (`ember.cmd="echo a b"` is one word), as the kernel splits them.
fn word_spans(s: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut start = None;
    let mut quoted = false;
    s.char_indices()
        .chain(std::iter::once((s.len(), ' ')))
        .filter_map(move |(i, c)| {
            let separator = c.is_whitespace() && (!quoted || i == s.len());
            if c == '"' {
                quoted = !quoted;
            }
            match (separator, start) {
                (false, None) => {
                    start = Some(i);
                    None
                }
                (true, Some(a)) => {
                    start = None;
                    Some((a, i))
                }
                _ => None,
            }
        })
}

/// Adds the `sep`-separated items of `ours` (`KEY=a:b=1`) whose `name` is not among the
/// items of `word` (`KEY=...`) to `word`. A quoted value (`KEY="a,b"`) is left alone.
fn merge_values(word: &mut String, ours: &str, sep: char, name: fn(&str) -> &str) {
    if word.contains('"') {
        return;
    }
    let items = |w: &str| -> Vec<String> {
        w.split_once('=')
            .map(|(_, v)| {
                v.split(sep)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let theirs = items(word);
    for t in items(ours) {
        if !theirs.iter().any(|u| name(u) == name(&t)) {
            if !word.ends_with('=') && !word.ends_with(sep) {
                word.push(sep);
            }
            word.push_str(&t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_by_module_dir() {
        let dir = std::env::temp_dir().join(format!("ember-host-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert!(!HostInfo::detect_in(&dir).pvm);
        assert_eq!(HostInfo::detect_in(&dir).cmdline_switches(), None);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        let h = HostInfo::detect_in(&dir);
        assert!(h.pvm && h.hide_pv_hypercalls());
        assert_eq!(h.cmdline_switches(), Some(PVM_CMDLINE_SWITCHES));
        let hardware = HostInfo { pvm: false };
        assert!(h.default_shutdown_timeout() > hardware.default_shutdown_timeout());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn appends_without_duplicates() {
        assert_eq!(
            append_switches("console=ttyS0", "noxsave clearcpuid=smap"),
            "console=ttyS0 noxsave clearcpuid=smap"
        );
        assert_eq!(
            append_switches(
                "console=ttyS0 clearcpuid=smap,popcnt,cx16",
                "noxsave clearcpuid=smap"
            ),
            "console=ttyS0 clearcpuid=smap,popcnt,cx16 noxsave"
        );
        // The kernel reads one clearcpuid=: ember's features join the user's list.
        assert_eq!(
            append_switches("a clearcpuid=cx16 b", "clearcpuid=smap,popcnt,erms"),
            "a clearcpuid=cx16,smap,popcnt,erms b"
        );
        assert_eq!(
            append_switches("clearcpuid=", "clearcpuid=smap"),
            "clearcpuid=smap"
        );
        assert_eq!(append_switches("", "a b"), "a b");
        assert_eq!(
            append_switches(" ember.cmd=\"echo  a\"\tq ", "b"),
            "ember.cmd=\"echo  a\"\tq b"
        );
        // A user's GLIBC_TUNABLES keeps its tunables and gains ember's...
        assert_eq!(
            append_switches("GLIBC_TUNABLES=glibc.malloc.check=3", PVM_CMDLINE_SWITCHES),
            "GLIBC_TUNABLES=glibc.malloc.check=3:glibc.cpu.hwcaps=-OSXSAVE noxsave \
             clearcpuid=smap,popcnt,erms,fsrm"
        );
        // ...unless it sets the same one: the user's choice stands.
        assert_eq!(
            append_switches(
                "x GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2",
                PVM_CMDLINE_SWITCHES
            ),
            "x GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2 noxsave clearcpuid=smap,popcnt,erms,fsrm"
        );
        assert_eq!(
            append_switches("GLIBC_TUNABLES=", "GLIBC_TUNABLES=a.b=1"),
            "GLIBC_TUNABLES=a.b=1"
        );
        // Words inside a quoted value are not parameters: nothing is skipped or merged there.
        assert_eq!(
            append_switches(
                "ember.cmd=\"echo GLIBC_TUNABLES=x noxsave\"",
                PVM_CMDLINE_SWITCHES
            ),
            format!("ember.cmd=\"echo GLIBC_TUNABLES=x noxsave\" {PVM_CMDLINE_SWITCHES}")
        );
    }

    #[test]
    fn finds_parameters_outside_quotes() {
        assert!(has_param("a ember.cmd=true", "ember.cmd"));
        assert!(has_param("ember.exit=\"poweroff\" b", "ember.exit"));
        assert!(!has_param(
            "ember.cmd=\"echo ember.exit=poweroff\"",
            "ember.exit"
        ));
        assert!(!has_param("ember.cmdx=1 ember.cmd", "ember.cmd"));
        assert!(!has_param("", "ember.cmd"));
    }

    #[test]
    fn reads_parameter_values() {
        assert_eq!(param_value("a init=/bin/sh b", "init"), Some("/bin/sh"));
        assert_eq!(param_value("init=/a init=\"/b\"", "init"), Some("/b"));
        assert_eq!(param_value("ember.cmd=\"x init=/c\" q", "init"), None);
        assert_eq!(param_value("rdinit=/x initx=1", "init"), None);
        assert_eq!(param_value("init=", "init"), Some(""));
    }
}
