// SPDX-License-Identifier: Apache-2.0
//! What `ember compare` runs in every row, and how it reads what came back: the default
//! busybox workload (marker lines around its phases), the isolation probe (`key=value`
//! lines), and the parsers for both.
//!
//! Both scripts are plain busybox `sh`: the same static busybox binary runs them on the host,
//! in the namespace sandbox, in the container (whose root file system is that binary and its
//! applet links) and in the guest (whose initramfs holds the same Debian busybox-static).
//! Commands are found through `PATH`, never by absolute path, so the host row uses the
//! busybox of the bundle and not the host's coreutils.

use std::time::Duration;

/// The prefix of the workload's marker lines.
pub const MARK: &str = "ember-compare: ";

/// Where the bundle keeps the scripts (in every row's root: `/ember-compare/...`).
pub const SCRIPT_DIR: &str = "/ember-compare";

/// The default workload: start, a syscall-heavy phase, a fork-heavy phase, a file I/O
/// phase, a short hold (memory is sampled there), exit. Every phase is announced by a
/// marker line, timed on the host when the line arrives; sizes are small because a PVM
/// guest's kernel is emulated (a syscall there costs milliseconds, a fork about a second).
/// `$WORK` is a writable tmpfs directory in every row.
pub const WORKLOAD: &str = r#"#!/bin/sh
# ember compare's default workload: starts, makes syscalls, forks, reads and writes files, exits.
W="${WORK:-/tmp}/ember-compare-work"
echo "ember-compare: start"
rm -rf "$W"; mkdir -p "$W"
echo "ember-compare: phase syscall"
dd if=/dev/zero of=/dev/null bs=1 count=1000 2>/dev/null
echo "ember-compare: phase fork"
i=0; while [ $i -lt 5 ]; do busybox true; i=$((i+1)); done
echo "ember-compare: phase io"
i=0; while [ $i -lt 20 ]; do echo "file $i" > "$W/f$i"; i=$((i+1)); done
cat "$W"/f* > /dev/null
dd if=/dev/zero of="$W/big" bs=64k count=16 2>/dev/null
dd if="$W/big" of=/dev/null bs=64k 2>/dev/null
rm -rf "$W"
echo "ember-compare: phase hold"
sleep 0.2
echo "ember-compare: end"
"#;

/// The measured phases of [`WORKLOAD`], in order, and what each does.
pub const PHASES: [(&str, &str); 3] = [
    (
        "syscall",
        "dd with 1-byte blocks: 2000 read/write syscalls (and one exec)",
    ),
    ("fork", "5 fork+exec of `busybox true`"),
    (
        "io",
        "20 small files written and read, 1 MiB written and read back in 64 KiB blocks, rm",
    ),
];

/// The isolation probe: what the workload can see and reach. Reads only, except the kernel
/// fault, which runs only when `EMBER_COMPARE_FAULT=1` (set for VM rows only: in a
/// container or sandbox it would be the host's kernel).
pub const PROBE: &str = r#"#!/bin/sh
# ember compare's isolation probe: one key=value per line.
echo "kernel=$(uname -r)"
echo "procs=$(ls -d /proc/[0-9]* 2>/dev/null | wc -l)"
if [ -r "/proc/$EMBER_COMPARE_PID/cmdline" ] && tr '\0' ' ' < "/proc/$EMBER_COMPARE_PID/cmdline" | grep -q compare; then
    echo "host_pid_visible=yes"
else
    echo "host_pid_visible=no"
fi
echo "mounts=$(wc -l < /proc/self/mountinfo)"
if [ -e "$EMBER_COMPARE_CANARY" ]; then echo "host_file_visible=yes"; else echo "host_file_visible=no"; fi
echo "net=$(tail -n +3 /proc/net/dev 2>/dev/null | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
if [ -c /dev/kvm ] && (: < /dev/kvm) 2>/dev/null; then echo "kvm_openable=yes"; else echo "kvm_openable=no"; fi
r=""
for d in $EMBER_COMPARE_DISKS; do
    if [ -b "/dev/$d" ] && dd if="/dev/$d" of=/dev/null bs=512 count=1 2>/dev/null; then r="$r $d"; fi
done
echo "disks_readable=$r"
echo "capeff=$(grep CapEff /proc/self/status | cut -f2)"
if [ -w /proc/sysrq-trigger ]; then echo "sysrq_writable=yes"; else echo "sysrq_writable=no"; fi
if [ "$EMBER_COMPARE_FAULT" = 1 ]; then
    # Overwrite the guest kernel's getppid() with ud2 through /dev/mem and call it: the
    # guest kernel faults in kernel mode (an oops made a panic).
    code=$(sed -n 's/^ *\([0-9a-f]*\)-.*Kernel code$/\1/p' /proc/iomem)
    text=$(grep ' _text$' /proc/kallsyms | cut -d' ' -f1)
    sym=$(grep ' __x64_sys_getppid$' /proc/kallsyms | cut -d' ' -f1)
    if [ -n "$code" ] && [ -n "$text" ] && [ -n "$sym" ]; then
        off=$((0x${sym#????????} - 0x${text#????????}))
        echo 1 > /proc/sys/kernel/panic_on_oops
        echo "fault=attempted"
        devmem $((0x$code + off)) 16 0x0b0f
        sh -c ':'
        echo "fault=survived"
    else
        echo "fault=unavailable"
    fi
fi
echo "probe=done"
"#;

/// One line of a row's stdout and when it arrived (since the row's process was spawned).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Time since spawn.
    pub at: Duration,
    /// The line, without its newline (lossy UTF-8).
    pub text: String,
}

/// What the marker lines of one run say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Marks {
    /// Spawn to the first line (the first marker with the default workload).
    pub first_line_ms: Option<f64>,
    /// Spawn to the `end` marker.
    pub end_ms: Option<f64>,
    /// Each phase with its duration (its marker to the next marker), in order.
    pub phases: Vec<(String, f64)>,
    /// Whether the workload ran to its `end` marker.
    pub complete: bool,
}

impl Marks {
    /// The duration of `phase`, when it ran.
    pub fn phase_ms(&self, phase: &str) -> Option<f64> {
        self.phases.iter().find(|p| p.0 == phase).map(|p| p.1)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Reads the marker lines of a run. A marker line may come after other output on the same
/// console line (a guest's kernel message without a newline): only its last
/// `ember-compare: ` counts. `phase NAME` lasts until the next marker; the `hold` phase is
/// not reported.
pub fn parse_marks(lines: &[Line]) -> Marks {
    let mut m = Marks {
        first_line_ms: lines.first().map(|l| ms(l.at)),
        ..Marks::default()
    };
    let mut open: Option<(String, Duration)> = None;
    for l in lines {
        let Some(i) = l.text.rfind(MARK) else {
            continue;
        };
        let word = l.text[i + MARK.len()..].trim();
        if let Some((name, since)) = open.take() {
            if name != "hold" {
                m.phases.push((name, ms(l.at.saturating_sub(since))));
            }
        }
        if let Some(name) = word.strip_prefix("phase ") {
            open = Some((name.trim().to_string(), l.at));
        } else if word == "end" {
            m.end_ms = Some(ms(l.at));
            m.complete = true;
        }
    }
    m
}

/// What the isolation probe saw, with what the host has to compare it with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeFacts {
    /// The kernel release seen (`uname -r`).
    pub kernel: Option<String>,
    /// Processes visible in `/proc`.
    pub procs: Option<u64>,
    /// The `ember compare` process itself is visible (host PIDs).
    pub host_pid_visible: Option<bool>,
    /// Mount count (`/proc/self/mountinfo` lines).
    pub mounts: Option<u64>,
    /// A file the host made outside the row's root is visible.
    pub host_file_visible: Option<bool>,
    /// Network interfaces seen (`/proc/net/dev`).
    pub net: Vec<String>,
    /// `/dev/kvm` exists and opens.
    pub kvm_openable: Option<bool>,
    /// Host block devices (by the host's names) that could be read.
    pub disks_readable: Vec<String>,
    /// Effective capabilities (hex mask).
    pub capeff: Option<u64>,
    /// `/proc/sysrq-trigger` is writable (access(2), nothing written).
    pub sysrq_writable: Option<bool>,
    /// `attempted`, `survived`, `unavailable`, or `None` when not run.
    pub fault: Option<String>,
    /// The probe ran to its end.
    pub done: bool,
}

/// Linux capability numbers the report names.
pub const CAP_SYS_MODULE: u32 = 16;
/// `CAP_SYS_RAWIO` (/dev/mem, port I/O).
pub const CAP_SYS_RAWIO: u32 = 17;
/// `CAP_SYS_ADMIN`.
pub const CAP_SYS_ADMIN: u32 = 21;

impl ProbeFacts {
    /// Whether capability `cap` is in the effective set (`None`: not seen).
    pub fn has_cap(&self, cap: u32) -> Option<bool> {
        self.capeff.map(|m| m & (1u64 << cap) != 0)
    }
}

fn yes_no(v: &str) -> Option<bool> {
    match v.trim() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Parses the probe's `key=value` lines; unknown keys and other lines are ignored (a guest
/// console may carry other output). The last `fault=` wins.
pub fn parse_probe(text: &str) -> ProbeFacts {
    let mut f = ProbeFacts::default();
    let words = |v: &str| v.split_whitespace().map(str::to_string).collect();
    for line in text.lines() {
        let Some((k, v)) = line.trim_end_matches('\r').split_once('=') else {
            continue;
        };
        match k.trim() {
            "kernel" => f.kernel = Some(v.trim().to_string()),
            "procs" => f.procs = v.trim().parse().ok(),
            "host_pid_visible" => f.host_pid_visible = yes_no(v),
            "mounts" => f.mounts = v.trim().parse().ok(),
            "host_file_visible" => f.host_file_visible = yes_no(v),
            "net" => f.net = words(v),
            "kvm_openable" => f.kvm_openable = yes_no(v),
            "disks_readable" => f.disks_readable = words(v),
            "capeff" => f.capeff = u64::from_str_radix(v.trim(), 16).ok(),
            "sysrq_writable" => f.sysrq_writable = yes_no(v),
            "fault" => f.fault = Some(v.trim().to_string()),
            "probe" => f.done = v.trim() == "done",
            _ => {}
        }
    }
    f
}

/// The host's block devices that a probe tries to read (`/sys/block`, without loop, ram
/// and zram devices, which every kernel has and which hold nothing of the host's).
pub fn host_disks() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut v: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            !["loop", "ram", "zram", "nbd"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    v.sort();
    v
}

/// The host's network interfaces (`/proc/net/dev`).
pub fn host_interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/net/dev")
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default()
}

/// Interface names of a `/proc/net/dev` text.
pub fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| Some(l.split_once(':')?.0.trim().to_string()))
        .filter(|n| !n.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ms: u64, text: &str) -> Line {
        Line {
            at: Duration::from_millis(ms),
            text: text.into(),
        }
    }

    #[test]
    fn marks_of_a_full_run() {
        let lines = [
            line(40, "ember-compare: start"),
            line(41, "ember-compare: phase syscall"),
            line(51, "ember-compare: phase fork"),
            line(71, "ember-compare: phase io"),
            line(76, "ember-compare: phase hold"),
            line(280, "ember-compare: end"),
        ];
        let m = parse_marks(&lines);
        assert_eq!(m.first_line_ms, Some(40.0));
        assert_eq!(m.end_ms, Some(280.0));
        assert!(m.complete);
        assert_eq!(
            m.phases,
            vec![
                ("syscall".to_string(), 10.0),
                ("fork".to_string(), 20.0),
                ("io".to_string(), 5.0)
            ]
        );
        assert_eq!(m.phase_ms("fork"), Some(20.0));
        assert_eq!(m.phase_ms("hold"), None);
    }

    #[test]
    fn marks_of_a_cut_run_and_of_noise() {
        // A run killed in its fork phase: the open phase is not reported.
        let lines = [
            line(5, "some banner"),
            line(9, "[ 0.1] x ember-compare: start"),
            line(10, "ember-compare: phase syscall"),
            line(15, "ember-compare: phase fork"),
        ];
        let m = parse_marks(&lines);
        assert_eq!(m.first_line_ms, Some(5.0));
        assert!(!m.complete);
        assert_eq!(m.end_ms, None);
        assert_eq!(m.phases, vec![("syscall".to_string(), 5.0)]);
        assert_eq!(parse_marks(&[]), Marks::default());
    }

    #[test]
    fn probe_lines() {
        let text = "\
noise line
kernel=6.1.172
procs=7
host_pid_visible=no
mounts=5
host_file_visible=no
net=lo 
kvm_openable=no
disks_readable=
capeff=000001ffffffffff
sysrq_writable=no
fault=attempted\r
";
        let f = parse_probe(text);
        assert_eq!(f.kernel.as_deref(), Some("6.1.172"));
        assert_eq!(f.procs, Some(7));
        assert_eq!(f.host_pid_visible, Some(false));
        assert_eq!(f.mounts, Some(5));
        assert_eq!(f.net, vec!["lo".to_string()]);
        assert_eq!(f.kvm_openable, Some(false));
        assert!(f.disks_readable.is_empty());
        assert_eq!(f.has_cap(CAP_SYS_MODULE), Some(true));
        assert_eq!(f.sysrq_writable, Some(false));
        assert_eq!(f.fault.as_deref(), Some("attempted"));
        assert!(!f.done);

        let f = parse_probe("capeff=00000000a80425fb\ndisks_readable= vda vdb\nprobe=done\n");
        assert_eq!(f.has_cap(CAP_SYS_MODULE), Some(false));
        assert_eq!(f.has_cap(CAP_SYS_ADMIN), Some(false));
        assert_eq!(f.disks_readable, vec!["vda".to_string(), "vdb".to_string()]);
        assert!(f.done);
        assert_eq!(parse_probe("capeff=zz").capeff, None);
        assert_eq!(ProbeFacts::default().has_cap(CAP_SYS_RAWIO), None);
    }

    #[test]
    fn net_dev() {
        let text = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\n";
        assert_eq!(parse_net_dev(text), vec!["lo", "eth0"]);
    }

    /// The scripts are valid sh, and the workload prints its markers in order when the
    /// host's busybox runs it.
    #[test]
    fn scripts_run_under_busybox() {
        let Ok(out) = std::process::Command::new("busybox")
            .args(["sh", "-n", "-c", PROBE])
            .output()
        else {
            eprintln!("skipped: no busybox on this host");
            return;
        };
        assert!(out.status.success(), "{out:?}");
        let dir = std::env::temp_dir().join(format!("ember-compare-wl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("busybox")
            .args(["sh", "-c", WORKLOAD])
            .env("WORK", &dir)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<Line> = text.lines().map(|l| line(0, l)).collect();
        let m = parse_marks(&lines);
        assert!(m.complete, "{text}");
        let names: Vec<&str> = m.phases.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(names, PHASES.map(|p| p.0));
    }
}
