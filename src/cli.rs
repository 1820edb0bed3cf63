// SPDX-License-Identifier: Apache-2.0
//! The command line: `ember run` boots a kernel with the console on this terminal. Each
//! subcommand turns its flags into a [`VmConfig`].

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::bench::peers::COMPARE_SYNTAX;
use crate::config::{
    default_guest_dir, ConfigError, ConsoleSink, DiskConfig, ShareConfig, VmConfig, DEFAULT_CMDLINE,
};
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::rng::RngConfig;
use crate::devices::virtio::vsock::VsockConfig;
use crate::exec::{EnvVar, ExecError, ExecSpec, FileSpec, EXEC_CMDLINE};
use crate::sandbox::{SandboxConfig, SeccompMode, SelfTest};

const EXIT_CODES_HELP: &str = "\
Exit status:
  0    the guest powered off (`poweroff`: ACPI S5) or rebooted (`reboot`: the i8042 reset
       line with reboot=k, or the ACPI reset register)
  1    ember failed while the VM ran (a KVM or host error)
  2    bad command line or configuration; nothing was started
  3    the guest triple-faulted (CPU shutdown)
  4    the guest reported a kernel panic: Linux's panic line appeared on its console (the
       guest's own claim, not verified by ember: any guest can print that line)
  5    KVM could not emulate a guest instruction (RIP, bytes and symbol are printed)
  6    stopped by SIGTERM/SIGINT; the guest shut down cleanly within --shutdown-timeout
       (ember pressed its ACPI power button)
  7    stopped by a signal; the guest was stopped hard (it did not shut down in time, it
       has no ACPI power button, or a second signal came)
  124  --timeout elapsed: the VM was stopped (as timeout(1))";

/// ember: a fast, small microVM monitor on Linux KVM.
#[derive(Debug, Parser)]
#[command(name = "ember", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log level on stderr: error, warn, info, debug or trace [default: info; warn for exec].
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: Option<log::LevelFilter>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux kernel in a microVM whose serial console is this terminal.
    #[command(after_help = EXIT_CODES_HELP)]
    Run(Box<RunArgs>),
    /// Boot the same guest several times (each in a fresh `ember run` process) and report
    /// boot phases, KVM exits, CPU and memory, optionally side by side with QEMU or
    /// Firecracker.
    #[command(after_help = BENCH_HELP)]
    Bench(Box<BenchArgs>),
    /// Run one command in a throwaway microVM: its stdout and stderr are streamed to ember's,
    /// and ember exits with its exit status (see docs/exec.md).
    #[command(after_help = EXEC_HELP)]
    Exec(ExecArgs),
    /// Start a VM from a snapshot directory and let its guest go on where it stopped: the
    /// VM's configuration (kernel command line, vCPUs, memory, devices) is the snapshot's.
    #[command(after_help = RESTORE_HELP)]
    Restore(RestoreArgs),
    /// Run the same busybox workload as a host process, in a namespace sandbox (bubblewrap),
    /// in an OCI container (crun or runc) and in an ember microVM (warm and cold), and compare
    /// start-up latency, end to end, CPU, memory, syscall/fork/I/O costs and isolation.
    #[command(after_help = COMPARE_HELP)]
    Compare(CompareArgs),
}

impl Cli {
    /// The log level: --log-level, or the subcommand's default (exec keeps stderr for the
    /// command: warnings and errors only).
    pub fn log_level(&self) -> log::LevelFilter {
        self.log_level.unwrap_or(match self.command {
            Command::Run(_) | Command::Restore(_) => log::LevelFilter::Info,
            Command::Exec(_) | Command::Compare(_) => log::LevelFilter::Warn,
            Command::Bench(_) => log::LevelFilter::Info,
        })
    }
}

const EXEC_HELP: &str = "\
The command runs as `exec COMMAND ARGS...` from a sh script in the guest (so a program, not a
shell builtin: use `sh -c '...'` for pipes and shell syntax), with stdin /dev/null, in
--workdir, after --env. Its stdout goes to ember's stdout, its stderr to ember's stderr; the
kernel is kept quiet. --file copies files into the guest's initramfs (no disk or network):
`--file a.sh` -> /root/a.sh, `--file dir:/opt/` -> /opt/dir/..., `--file a:/etc/b` -> /etc/b.

Exit status:
  0-255  the command's exit status (127: command not found)
  124    --timeout elapsed (counted from ember's start, guest boot included)
  125    ember failed or the VM ended without reporting a status (bad flags, missing
         files, boot failure, kernel panic, crash, VMM error)
  128+N  stopped by signal N (130: SIGINT, 143: SIGTERM)

Example:
  ember exec --timeout 300 --file ci/test.sh --env CI=1 -- sh test.sh";

const COMPARE_HELP: &str = "\
Rows (--rows, default all, in this order): host (a plain process: the baseline of the ratios),
sandbox (bwrap), container (crun, else runc, with the runtime's default spec), ember-warm
(`ember exec`, restoring the cached snapshot; one unmeasured exec first prepares it),
ember-cold (`ember exec --cold`, a boot per run: tens of seconds on a PVM host).
Without COMMAND, the default workload runs: start, syscalls, forks, file I/O, exit, with
marker lines that time each phase (docs/containers-vs-microvms.md). The isolation probe runs
once per row; its kernel fault runs in the VM only (in a container it would hit the host).

Example:
  ember compare --runs 3 --json compare.json --svg compare.svg";

/// `ember compare` flags.
#[derive(Debug, Args, Clone)]
pub struct CompareArgs {
    /// Measured runs per row (runs alternate between rows).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Write every run, the statistics, ratios and probe results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw start-up latency, end to end and peak memory per row as an SVG chart to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// The rows, comma-separated: host, sandbox, container, ember-warm, ember-cold.
    #[arg(
        long,
        value_name = "ROWS",
        default_value = "host,sandbox,container,ember-warm,ember-cold"
    )]
    pub rows: String,
    /// The container runtime (crun or runc). Default: crun, else runc, whichever runs.
    #[arg(long, value_name = "NAME")]
    pub runtime: Option<String>,
    /// A run that takes longer than SECS is killed and counted as failed.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub timeout: f64,
    /// Leave out the isolation probe.
    #[arg(long)]
    pub no_probe: bool,
    /// The VM rows' kernel instead of the default guest (tests use tiny guests that print the
    /// workload's markers).
    #[arg(long, value_name = "PATH", hide = true)]
    pub vm_kernel: Option<PathBuf>,
    /// The command to run in every row (default: the built-in busybox workload). It must be
    /// in the bundle's busybox (all rows use it).
    #[arg(value_name = "COMMAND", num_args = 0.., trailing_var_arg = true)]
    pub command: Vec<String>,
}

impl CompareArgs {
    /// The options of [`crate::compare::run`].
    pub fn to_options(
        &self,
    ) -> Result<crate::compare::CompareOptions, crate::compare::CompareError> {
        use crate::compare::CompareError;
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout <= 86_400.0) {
            return Err(CompareError::Usage(format!(
                "--timeout {}: give seconds between 0 and 86400",
                self.timeout
            )));
        }
        if let Some(rt) = &self.runtime {
            if rt != "crun" && rt != "runc" {
                return Err(CompareError::Usage(format!("--runtime {rt}: crun or runc")));
            }
        }
        Ok(crate::compare::CompareOptions {
            runs: self.runs as usize,
            rows: crate::compare::parse_rows(&self.rows)?,
            command: self.command.clone(),
            runtime: self.runtime.clone(),
            timeout: std::time::Duration::from_secs_f64(self.timeout),
            probe: !self.no_probe,
            vm_kernel: self.vm_kernel.clone(),
            ember_bin: None,
        })
    }
}

/// `ember exec` flags.
#[derive(Debug, Args, Clone)]
pub struct ExecArgs {
    /// Guest kernel (ELF vmlinux or bzImage). Default: the guest built by
    /// resources/guest/build.sh (target/guest/vmlinux). Its init must implement the protocol
    /// in docs/exec.md.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// A kernel build tree: boot DIR/vmlinux (else DIR/arch/x86/boot/bzImage) with the
    /// default guest's initramfs. When DIR/.config exists, the options exec needs are checked
    /// first (a missing one is named; without the warm path's CONFIG_VIRTIO_VSOCKETS and
    /// CONFIG_VMGENID the guest is booted for each command).
    #[arg(long, value_name = "DIR", conflicts_with = "kernel")]
    pub kernel_tree: Option<PathBuf>,
    /// Base initramfs; ember appends its archive (command, env, files) to it. Default with
    /// the default kernel: target/guest/initramfs.cpio.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = crate::config::DEFAULT_VCPUS, value_name = "N")]
    pub vcpus: u32,
    /// Guest memory in MiB (the --file contents are held in it, twice while unpacking).
    #[arg(long, default_value_t = crate::config::DEFAULT_MEM_MIB, value_name = "MIB")]
    pub mem: u64,
    /// A raw disk image as a virtio-blk device (repeatable: /dev/vda, /dev/vdb, ... in
    /// order), for inputs too large for --file; the command mounts it itself. Same syntax as
    /// `ember run --disk`.
    #[arg(long, value_name = DiskConfig::SYNTAX)]
    pub disk: Vec<DiskConfig>,
    /// Stop the VM and exit with 124 after this many seconds (decimals allowed), counted from
    /// ember's start: the guest's boot counts too.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// Copy a host file or directory into the guest (repeatable). GUEST_PATH default:
    /// /root/NAME (NAME: the host file's name); a relative GUEST_PATH is under /root; one
    /// ending in / gets NAME appended. Not under /tmp, /proc, /sys, /dev (mounted over) or
    /// /ember (ember's).
    #[arg(long, value_name = FileSpec::SYNTAX, value_parser = parse_file)]
    pub file: Vec<FileSpec>,
    /// Set an environment variable for the command (repeatable); NAME alone passes ember's
    /// own value.
    #[arg(long, value_name = EnvVar::SYNTAX)]
    pub env: Vec<std::ffi::OsString>,
    /// The command's working directory in the guest (default: ember's working directory
    /// when it is inside a --share, else /root).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Extra kernel command-line words (repeatable), after ember's exec command line.
    #[arg(long, value_name = "STRING")]
    pub append: Vec<String>,
    /// Share a host directory with the guest (virtio-fs, repeatable): it is mounted in the
    /// guest at the same absolute path as on the host, and when ember's working directory is
    /// inside it the command runs there (unless --workdir says otherwise). `ro`: the host
    /// refuses writes. Runs with a share boot the guest (no warm path yet).
    #[arg(long, value_name = ShareConfig::SYNTAX, value_parser = parse_share)]
    pub share: Vec<ShareConfig>,
    /// Boot the guest for this command instead of restoring the cached snapshot of a booted
    /// guest (the warm path; see docs/exec.md), and leave the snapshot cache alone.
    #[arg(long)]
    pub cold: bool,
    /// Write the result as JSON to FILE when ember exits: its exit status, the command's
    /// status, the reason (command-exited, timeout, signal, kernel-panic, ...), duration, the
    /// path (warm-restore, warm-boot, cold), boot phases, and kernel oops/WARN/BUG/panic lines
    /// seen on the console (see docs/exec.md). Not written when the command line itself is
    /// rejected.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write how the warm path went (restored or booted, times) as JSON to FILE (used by
    /// `ember bench --exec`).
    #[arg(long, value_name = "FILE", hide = true)]
    pub bench_report: Option<PathBuf>,
    /// The sandbox (seccomp, Landlock).
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// The command and its arguments (after `--`, or after the last ember flag).
    #[arg(
        value_name = "COMMAND",
        required = true,
        num_args = 1..,
        trailing_var_arg = true
    )]
    pub command: Vec<std::ffi::OsString>,
}

/// The longest duration any time flag takes: 10 years (365-day years), far beyond any real
/// run but small enough that a deadline computed from it never overflows a clock.
pub const MAX_DURATION_SECS: u64 = 10 * 365 * 24 * 3600;
const MAX_DURATION_TEXT: &str = "315360000 (10 years)";

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        // `as f64` is exact: the maximum is below 2^53.
        Ok(t) if t.is_finite() && t > 0.0 && t <= MAX_DURATION_SECS as f64 => Ok(t),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 and at most {MAX_DURATION_TEXT} \
             (e.g. 300 or 2.5)"
        )),
    }
}

/// Whole seconds, 0 to [`MAX_DURATION_SECS`].
fn parse_secs(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(t) if t <= MAX_DURATION_SECS => Ok(t),
        _ => Err(format!(
            "{s:?} is not a whole number of seconds from 0 to {MAX_DURATION_TEXT} (e.g. 30)"
        )),
    }
}

/// Whole milliseconds, 0 to [`MAX_DURATION_SECS`] in milliseconds.
fn parse_millis(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(t) if t <= MAX_DURATION_SECS * 1000 => Ok(t),
        _ => Err(format!(
            "{s:?} is not a whole number of milliseconds from 0 to 315360000000 (10 years)"
        )),
    }
}

fn parse_file(s: &str) -> Result<FileSpec, String> {
    s.parse().map_err(|e: ExecError| e.to_string())
}

impl ExecArgs {
    /// What to run in the guest.
    pub fn to_spec(&self) -> Result<ExecSpec, ExecError> {
        let mut spec = ExecSpec::new(self.command.clone());
        spec.env = self
            .env
            .iter()
            .map(|e| EnvVar::parse(e))
            .collect::<Result<_, _>>()?;
        spec.files = self.file.clone();
        spec.shares = crate::exec::SharedDir::resolve_all(&self.share)?;
        spec.workdir = match &self.workdir {
            Some(w) => w.clone(),
            None => crate::exec::SharedDir::workdir_inside(&spec.shares)
                .unwrap_or_else(|| crate::exec::DEFAULT_GUEST_DIR.to_string()),
        };
        Ok(spec)
    }

    /// The VM configuration (before [`ExecSpec::apply`]).
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let (kernel, initrd) = match &self.kernel_tree {
            // The tree's kernel with the default guest's initramfs (its init runs the command).
            Some(dir) => {
                let kernel = crate::exec::kernel_tree::pick_kernel(dir)
                    .map_err(|e| ConfigError::Device(e.to_string()))?;
                let initrd = self.initrd.clone().or_else(|| {
                    default_guest_dir()
                        .map(|d| d.join("initramfs.cpio"))
                        .filter(|p| p.is_file())
                });
                let initrd = initrd.ok_or_else(|| {
                    ConfigError::Device(
                        "--kernel-tree boots the default guest's initramfs (its init runs the \
                         command), which is not built: run `bash resources/guest/build.sh` \
                         in the ember source tree, or pass --initrd PATH"
                            .into(),
                    )
                })?;
                (kernel, Some(initrd))
            }
            None => resolve_guest(self.kernel.as_ref(), self.initrd.as_ref(), None)?,
        };
        let mut c = VmConfig::new(kernel);
        c.initrd = initrd;
        c.disks = self.disk.clone();
        c.cmdline = EXEC_CMDLINE.to_string();
        for a in &self.append {
            c.cmdline.push(' ');
            c.cmdline.push_str(a.trim());
        }
        c.vcpus = self.vcpus;
        c.mem_mib = self.mem;
        c.shares = self.share.clone();
        Ok(c)
    }
}

const BENCH_HELP: &str = "\
Each boot runs to the guest's end: bench adds `ember.cmd=true` to the command line (unless it
has an ember.cmd= already), so the default guest's init runs `true` and reboots. Times are
milliseconds since the process was spawned. Peers are timed from outside (first console byte,
the --marker line); ember's own phases come from the boot itself.

--snapshot measures snapshot/restore instead: ember's own (`ember run --snapshot-on sigusr2`,
then `ember restore`) and, with --compare firecracker, Firecracker's (through its API), runs
alternating; the guest's command is then a tick line every 0.5 s, and a restored guest counts
as resumed when it prints again.

--ab compares two configurations of ember: A, what the other flags describe, and B, A with the
--b-* flags (--b-kernel, --b-initrd, --b-cmdline, --b-append, --b-ember, --b-no-acpi, --b-mem,
--b-vcpus; --a-append changes A alone). They boot alternately, A B B A A B B A ..., so that the
host's drift weighs on both alike, --runs each (default 5). For each figure both sides have
(marker line, boot timer, guest end, first KVM_RUN, vCPU CPU time to the boot timer, guest
memory touched, peak RSS) it prints both medians, the change of the mean (B against A), the
two-sided p-value of a permutation test on the difference of the means, and a verdict: a
change counts only when p < 0.01 and it is at least 5 %. With fewer than 5 runs a side, p <
0.01 cannot be reached. Failed runs are listed and left out; the bench fails when a side has
fewer than 2 successful runs. --parallel 2 boots the two runs of a pair together. --b-ember
runs another build of ember (it must know `ember run --bench-report`). --json writes every raw
sample and the statistics.

Examples:
  ember bench --runs 3
  ember bench --runs 3 --compare qemu --compare firecracker=/path/to/firecracker --json out.json
  ember bench --runs 1 --profile boot-profile.txt
  ember bench --snapshot --runs 2
  ember bench --snapshot --runs 2 --compare firecracker=/path/to/firecracker --json snap.json
  ember bench --ab --b-append \"clearcpuid=erms\" --runs 5 --json ab.json
  ember bench --ab --b-ember ../old/target/release/ember --a-name new --b-name old
  ember bench --ab --b-kernel /path/to/new/vmlinux --runs 7";

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: use off, error, warn, info, debug or trace"))
}

const RESTORE_HELP: &str = "\
A snapshot directory holds `state` (the VM's configuration, its devices' and vCPUs' state,
versioned and checksummed) and `memory` (guest RAM, sparse); `ember run ... --snapshot-to DIR`
writes one. Guest memory is mapped from `memory` copy-on-write: the file is only read where
the guest touches it, never written, and VMs restored from one snapshot share its unwritten
pages, so leave it unchanged while they run. Disks are reopened by the paths the snapshot
names and must not have changed size. Each restored VM gets a new VM generation ID.

Exit status: as `ember run` (see `ember run --help`); 2 also when the snapshot is damaged,
of another format version, or does not fit this host (the message says what and why).

Example:
  ember restore --timeout 60 /var/lib/ember/snap";

/// `ember restore` flags: the snapshot, and the host-side settings a restore may change.
#[derive(Debug, Args, Clone)]
pub struct RestoreArgs {
    /// The snapshot directory (its files `state` and `memory`).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Where the guest's console (COM1) output goes.
    #[arg(long, value_name = "stdout|stderr|null", default_value = "stdout", value_parser = parse_console)]
    pub console: ConsoleSink,
    /// Do not feed stdin to the guest's console (by default it is, as with `ember run`: a
    /// terminal is switched to raw mode).
    #[arg(long)]
    pub no_stdin: bool,
    /// The host-side Unix socket of the snapshot's vsock device, instead of the path it was
    /// created with.
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: Option<PathBuf>,
    /// Put the snapshot's NIC on this TAP instead of the one it was on (repeatable: the
    /// first --tap for the first NIC, and so on; a NIC without one keeps its TAP). The guest
    /// keeps its MAC; frames in flight at the snapshot are lost, as on any network.
    #[arg(long, value_name = "NAME")]
    pub tap: Vec<String>,
    /// After SIGTERM (or SIGINT), how long the guest gets to shut down after ember pressed
    /// its power button before it is stopped hard. Default: 30 on PVM hosts, 5 otherwise.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub shutdown_timeout: Option<u64>,
    /// Stop the VM and exit with 124 after this many seconds (decimals allowed), counted from
    /// ember's start.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// The sandbox (seccomp, Landlock).
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// The privilege drop.
    #[command(flatten)]
    pub privileges: PrivilegeArgs,
}

fn parse_console(s: &str) -> Result<ConsoleSink, String> {
    match s {
        "stdout" => Ok(ConsoleSink::Stdout),
        "stderr" => Ok(ConsoleSink::Stderr),
        "null" => Ok(ConsoleSink::Null),
        _ => Err(format!(
            "{s:?} is not a console sink: use stdout, stderr or null"
        )),
    }
}

impl RestoreArgs {
    /// Applies the host-side settings to `config`, the configuration a snapshot was taken
    /// with (its [`SnapshotMeta`](crate::snapshot::SnapshotMeta)).
    pub fn apply(&self, config: &mut VmConfig) -> Result<(), ConfigError> {
        config.console = self.console;
        config.stdin = !self.no_stdin;
        if let Some(uds) = &self.vsock_uds {
            let vsock = config.vsock.as_mut().ok_or_else(|| {
                ConfigError::Device(format!(
                    "--vsock-uds {}: the snapshot's VM has no vsock device",
                    uds.display()
                ))
            })?;
            vsock.uds = uds.clone();
        }
        if self.tap.len() > config.net.len() {
            let had: Vec<&str> = config.net.iter().map(|n| n.tap.as_str()).collect();
            return Err(ConfigError::Device(format!(
                "--tap {}: the snapshot's VM has {} NIC(s){}: give at most one --tap per NIC, \
                 in order",
                self.tap[config.net.len()],
                config.net.len(),
                if had.is_empty() {
                    String::new()
                } else {
                    format!(" (on TAP {})", had.join(", "))
                }
            )));
        }
        for (n, tap) in config.net.iter_mut().zip(&self.tap) {
            crate::devices::virtio::net::tap::validate_tap_name(tap)
                .map_err(|why| ConfigError::Device(format!("--tap {tap}: {why}")))?;
            // The MAC is the guest's: one derived from the old TAP's name stays.
            n.mac = Some(n.mac());
            n.tap = tap.clone();
        }
        for (i, n) in config.net.iter().enumerate() {
            if config.net[..i].iter().any(|m| m.tap == n.tap) {
                return Err(ConfigError::Device(format!(
                    "--tap: two NICs would be on TAP {}: give each NIC its own TAP",
                    n.tap
                )));
            }
        }
        Ok(())
    }
}

/// `ember run` flags.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux (PVH entry used when present) or a bzImage. Default: the
    /// guest built by resources/guest/build.sh (target/guest/vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive, compressed or not). Default with the default kernel:
    /// target/guest/initramfs.cpio.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Extra kernel command-line words appended to --cmdline (repeatable).
    #[arg(long, value_name = "STRING")]
    pub append: Vec<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = crate::config::DEFAULT_VCPUS, value_name = "N")]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = crate::config::DEFAULT_MEM_MIB, value_name = "MIB")]
    pub mem: u64,
    /// Do not adapt the guest to this host (on a PVM host ember otherwise adds
    /// `noxsave clearcpuid=smap,popcnt,erms,fsrm GLIBC_TUNABLES=glibc.cpu.hwcaps=-OSXSAVE` to
    /// the command line and hides KVM's hypercall-based PV features from CPUID).
    #[arg(long)]
    pub no_host_tuning: bool,
    /// Log when the guest's init signals it started (a write of 123 to MMIO 0xc0000000).
    #[arg(long)]
    pub boot_timer: bool,
    /// A raw disk image as a virtio-blk device (repeatable: /dev/vda, /dev/vdb, ... in
    /// order). `ro`: read-only (shared lock; guest writes fail). `id=NAME`: the serial the
    /// guest sees. `cache=none`: O_DIRECT; `cache=writeback` (default): host page cache. A
    /// guest flush calls fdatasync in both. A writable image is locked: a second VM cannot
    /// open it. `bw=`: at most this many bytes of data per second (K/M/G suffixes: binary
    /// multiples), in bursts of `bw_burst=` bytes (default: a tenth of a second's worth);
    /// `iops=`: at most this many requests per second, in bursts of `iops_burst=` (default a
    /// tenth of a second's worth, at least 1). A request over the limit waits in the queue.
    #[arg(long, value_name = DiskConfig::SYNTAX)]
    pub disk: Vec<DiskConfig>,
    /// Boot from this device: adds `root=DEV rootfstype=ext4 rw` (`ro` for a read-only
    /// disk) to the command line, and with the default kernel leaves out the default
    /// initramfs (so the root file system's /sbin/init runs). Example: `--disk
    /// target/guest/rootfs.ext4 --root /dev/vda`.
    #[arg(long, value_name = "DEV")]
    pub root: Option<String>,
    /// Boot with a host directory as the root file system, over virtio-fs (as virtme-ng does
    /// with the host's /): shares DIR as the first share (tag `rootfs`, served by virtiofsd
    /// like --share), adds `root=rootfs rootfstype=virtiofs rw` (`ro`: read-only on the host
    /// side too) and leaves out the default initramfs. The kernel runs DIR/init when there
    /// is one, else DIR/sbin/init; `--append init=/PATH` names another program in DIR.
    #[arg(
        long,
        value_name = ShareConfig::ROOT_SYNTAX,
        value_parser = parse_root_share,
        conflicts_with_all = ["root", "initrd"]
    )]
    pub root_share: Option<ShareConfig>,
    /// A virtio-net NIC on a host TAP interface (repeatable): tap=NAME[,mac=XX:XX:XX:XX:XX:XX].
    /// The TAP is opened (or created, with CAP_NET_ADMIN); without mac= a stable address is
    /// derived from the host and TAP name. `rx=`/`tx=`: at most this many bytes per second
    /// received/sent by the guest (K/M/G suffixes: binary multiples), in bursts of
    /// `rx_burst=`/`tx_burst=` bytes (default: a tenth of a second's worth); frames over the
    /// limit wait. See docs/network.md.
    #[arg(long, value_name = NetConfig::SYNTAX, value_parser = parse_net)]
    pub net: Vec<NetConfig>,
    /// A virtio-vsock device: cid=N (3 or more),uds=PATH. Host programs connect to PATH and
    /// send `CONNECT <port>\n`; guest connections to host port P go to PATH_P.
    #[arg(long, value_name = VsockConfig::SYNTAX, value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// Export a host directory to the guest over virtio-fs (repeatable); in the guest:
    /// `mount -t virtiofs TAG /mnt`. TAG defaults to share0, share1, ... in order. `ro`:
    /// writes are refused on the host side. `cache=`: guest caching (auto: default; always:
    /// for a directory only the guest changes; never). Served by virtiofsd (`cargo install
    /// virtiofsd`), sandboxed to the directory.
    #[arg(long, value_name = ShareConfig::SYNTAX, value_parser = parse_share)]
    pub share: Vec<ShareConfig>,
    /// Rate limit of the virtio-rng device (on by default: 1 MiB/s, bursts of 64 KiB).
    /// `--rng` alone means on with those defaults.
    #[arg(
        long,
        value_name = "rate=N[,burst=N]",
        value_parser = parse_rng,
        conflicts_with = "no_rng",
        num_args = 0..=1,
        default_missing_value = ""
    )]
    pub rng: Option<RngConfig>,
    /// No virtio-rng device.
    #[arg(long)]
    pub no_rng: bool,
    /// Give the guest no ACPI tables (and `acpi=off` on its command line): it then finds its
    /// CPUs through the MP table, cannot power off (only reboot), has no power button for
    /// a graceful stop, and no VM generation ID.
    #[arg(long)]
    pub no_acpi: bool,
    /// After SIGTERM (or SIGINT), how long the guest gets to shut down after ember pressed
    /// its power button before it is stopped hard. Default: 30 on PVM hosts (guest kernel
    /// code is emulated there), 5 otherwise.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub shutdown_timeout: Option<u64>,
    /// Stop the VM and exit with 124 after this many seconds (decimals allowed), counted from
    /// ember's start: the guest's boot counts too.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// Sample each vCPU's guest RIP and stack at --profile-rate and write a flat profile of
    /// guest kernel functions to FILE (folded stacks to FILE.folded), symbolized with the
    /// kernel's ELF symbol table.
    #[arg(long, value_name = "FILE")]
    pub profile_guest: Option<PathBuf>,
    /// Samples per second and vCPU for --profile-guest.
    #[arg(long, value_name = "HZ", default_value_t = crate::profiler::DEFAULT_RATE_HZ,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub profile_rate: u32,
    /// Write boot phases, exits, CPU and memory figures as JSON to FILE at the end (used
    /// by `ember bench`).
    #[arg(long, value_name = "FILE", hide = true)]
    pub bench_report: Option<PathBuf>,
    /// Stop the VM this many milliseconds after ember started (exit status 124; used by
    /// `ember bench --setup-only`).
    #[arg(long, value_name = "MS", hide = true, value_parser = parse_millis)]
    pub stop_after_ms: Option<u64>,
    /// Experimental (issue 13, docs/snapshot-pvm.md): this many seconds (decimals allowed)
    /// after the guest's init started (its boot-timer write), pause the guest, save its KVM
    /// state, copy its memory and move it into a new KVM VM in this process. Needs --no-rng
    /// and no other virtio device (--snapshot-to carries them).
    #[arg(long, value_name = "SECS", hide = true, value_parser = parse_timeout)]
    pub snapshot_restore_after: Option<f64>,
    /// Experimental switches of that restore, comma-separated: no-clock (no KVM_SET_CLOCK),
    /// keep-clock-flags, tsc-khz (KVM_SET_TSC_KHZ), skip-msr=0xN (repeatable), delay-ms=N
    /// (wait between save and restore), memory-file (new memory mapped MAP_PRIVATE from a
    /// file, as Firecracker does), probe-pvclock (read the guest's kvm-clock page 200 ms after
    /// the restore), pause-only (save, then resume the same VM).
    #[arg(long, value_name = "LIST", hide = true, value_parser = parse_restore_opts)]
    pub snapshot_restore_opts: Option<crate::snapshot::kvm_state::RestoreOptions>,
    /// Write a snapshot of the VM (files `state` and `memory`) into DIR when --snapshot-on
    /// says (or, experimental, at --snapshot-restore-after), then do what --snapshot-then
    /// says. `ember restore DIR` starts the guest again from it (`--tap` there moves a NIC
    /// onto another TAP). With it (and ACPI) the guest has a VM generation ID device, which
    /// tells each guest restored from the snapshot that it is a new instance; a VM without
    /// --snapshot-to does not get one.
    #[arg(long, value_name = "DIR")]
    pub snapshot_to: Option<PathBuf>,
    /// When to write the --snapshot-to snapshot: `ready` (the guest writes the exit device's
    /// ready register at 0xC000_1004, as warm `ember exec`'s agent does) or `sigusr2` (on
    /// `kill -USR2`). SIGUSR1 pauses and resumes the guest at any time.
    #[arg(long, value_name = "EVENT", value_parser = ["ready", "sigusr2"], requires = "snapshot_to")]
    pub snapshot_on: Option<String>,
    /// After the snapshot: `stop` (end the run, status 0; the default) or `continue` (the
    /// guest runs on).
    #[arg(long, value_name = "WHAT", value_parser = ["stop", "continue"], default_value = "stop")]
    pub snapshot_then: String,
    /// Start the guest from the snapshot in DIR instead of booting it (what `ember restore
    /// DIR` does with the snapshot's own configuration). The other flags must be those of
    /// the run that wrote it (--mem, --vcpus, --disk...).
    #[arg(long, value_name = "DIR", hide = true)]
    pub restore_from: Option<PathBuf>,
    /// The VM from a Firecracker configuration file (JSON: boot-source, machine-config,
    /// drives, network-interfaces, vsock, entropy, logger, metrics; see docs/api.md), instead
    /// of the flags that describe the VM (--kernel, --disk, --net...). With --api-sock the
    /// VM starts at once and the API serves it running.
    #[arg(long, value_name = "FILE", conflicts_with_all = VM_FLAGS)]
    pub config_file: Option<PathBuf>,
    /// Serve Firecracker's REST API on this Unix socket (which must not exist): the VM is
    /// configured and started through it (PUT /boot-source, /drives/ID, /machine-config...,
    /// then PUT /actions InstanceStart), unless --config-file gives it. See docs/api.md.
    #[arg(long, value_name = "PATH", conflicts_with_all = VM_FLAGS)]
    pub api_sock: Option<PathBuf>,
    /// No API socket (Firecracker's flag; ember serves none unless --api-sock is given):
    /// needs --config-file.
    #[arg(long, requires = "config_file", conflicts_with = "api_sock")]
    pub no_api: bool,
    /// The instance ID in `GET /` and in log lines (Firecracker's --id).
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    pub id: String,
    /// Largest API request body in bytes (Firecracker's --http-api-max-payload-size).
    #[arg(long, value_name = "BYTES", default_value_t = crate::api::http::DEFAULT_MAX_PAYLOAD as u32,
          value_parser = clap::value_parser!(u32).range(1..=(16 << 20)))]
    pub http_api_max_payload_size: u32,
    /// The sandbox (seccomp, Landlock).
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// The privilege drop.
    #[command(flatten)]
    pub privileges: PrivilegeArgs,
}

/// How ember sandboxes itself once a VM is set up (see docs/security.md): the flags of every
/// command that runs a VM.
#[derive(Debug, Args, Clone, Default)]
pub struct SandboxArgs {
    /// Per-thread seccomp filters, installed once the VM is set up: `kill` (a system call
    /// off the thread's allow-list ends ember with SIGSYS, naming the thread and the call on
    /// stderr), `log` (the call is allowed and the kernel logs it: dmesg or the audit log,
    /// type=1326), `off`.
    #[arg(long, value_name = "off|log|kill", default_value = "kill")]
    pub seccomp: SeccompMode,
    /// Do not restrict the file system with Landlock once the VM is set up (by default ember
    /// can then open only the files it was told about; best effort: a kernel without
    /// Landlock gets an info line).
    #[arg(long)]
    pub no_landlock: bool,
    /// Test hook: right after set-up, make this thread kind (vmm, vcpu, console, watchdog,
    /// exec-job) make a forbidden system call, or (landlock) the VMM thread open a file
    /// outside the Landlock rules.
    #[arg(long, value_name = "WHAT", hide = true)]
    pub sandbox_selftest: Option<SelfTest>,
}

impl SandboxArgs {
    /// The sandbox configuration with `paths` allowed after set-up and `privileges`.
    pub fn to_config(
        &self,
        paths: Vec<crate::sandbox::PathRule>,
        privileges: Option<&PrivilegeArgs>,
    ) -> SandboxConfig {
        SandboxConfig {
            seccomp: self.seccomp,
            landlock: !self.no_landlock,
            paths,
            uid: privileges.and_then(|p| p.uid),
            gid: privileges.and_then(|p| p.gid),
            selftest: self.sandbox_selftest,
        }
    }
}

/// `--uid`/`--gid`: the user ember runs as once the VM is set up.
#[derive(Debug, Args, Clone, Default)]
pub struct PrivilegeArgs {
    /// Once /dev/kvm, the TAPs and the images are open, drop root's privileges to this user
    /// ID (needs --gid; ember must be started as root). Files ember creates after set-up
    /// (snapshots) are then this user's.
    #[arg(long, value_name = "UID", requires = "gid")]
    pub uid: Option<u32>,
    /// The group ID for --uid (supplementary groups are cleared).
    #[arg(long, value_name = "GID", requires = "uid")]
    pub gid: Option<u32>,
}

/// The flags that describe the VM, which --config-file and --api-sock replace.
const VM_FLAGS: [&str; 16] = [
    "kernel",
    "initrd",
    "cmdline",
    "append",
    "vcpus",
    "mem",
    "disk",
    "root",
    "root_share",
    "net",
    "vsock",
    "share",
    "rng",
    "no_rng",
    "restore_from",
    "snapshot_restore_after",
];

/// `--snapshot-restore-opts`: see [`RunArgs::snapshot_restore_opts`].
fn parse_restore_opts(s: &str) -> Result<crate::snapshot::kvm_state::RestoreOptions, String> {
    let mut o = crate::snapshot::kvm_state::RestoreOptions::standard();
    for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match word {
            "no-clock" => o.set_clock = false,
            "keep-clock-flags" => o.keep_clock_flags = true,
            "tsc-khz" => o.set_tsc_khz = true,
            "memory-file" => o.memory_file = true,
            "probe-pvclock" => o.probe_pvclock = true,
            "pause-only" => o.pause_only = true,
            w if w.starts_with("delay-ms=") => {
                let ms = w["delay-ms=".len()..]
                    .parse()
                    .map_err(|_| format!("bad delay in {w:?}"))?;
                o.delay = std::time::Duration::from_millis(ms);
            }
            w => {
                let msr = w
                    .strip_prefix("skip-msr=")
                    .map(|v| v.trim_start_matches("0x"))
                    .and_then(|v| u32::from_str_radix(v, 16).ok())
                    .ok_or_else(|| format!("unknown restore switch {w:?}"))?;
                o.skip_msrs.push(msr);
            }
        }
    }
    Ok(o)
}

/// `ember bench` flags.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Guest kernel (default: the default guest, as for `ember run`).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (default with the default kernel: its initramfs).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Disk image for every VMM, in `ember run --disk` syntax (repeatable; peers get the
    /// image path and read-only flag).
    #[arg(long, value_name = DiskConfig::SYNTAX)]
    pub disk: Vec<String>,
    /// Boot every VMM from this device (as `ember run --root`; the default initramfs is then
    /// left out).
    #[arg(long, value_name = "DEV")]
    pub root: Option<String>,
    /// Kernel command line (bench adds `ember.cmd=true` unless it has an ember.cmd=).
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Extra command-line words appended to --cmdline (repeatable).
    #[arg(long, value_name = "STRING")]
    pub append: Vec<String>,
    /// vCPUs per VM.
    #[arg(long, default_value_t = crate::config::DEFAULT_VCPUS, value_name = "N")]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = crate::config::DEFAULT_MEM_MIB, value_name = "MIB")]
    pub mem: u64,
    /// Boots per VMM (default 3), or per side with --ab (default 5).
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: Option<u32>,
    /// Boots at once.
    #[arg(long, default_value_t = 1, value_name = "P",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,
    /// Also write every raw sample and the statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Boot the same guest with a peer VMM in the same bench, alternating runs, and print
    /// ratios (repeatable). A peer that is not installed is an error (before anything
    /// boots) that says how to install it or to give its path.
    #[arg(long, value_name = "PEER", help = format!("Compare with a peer VMM: {COMPARE_SYNTAX} (repeatable); a peer that is not installed is an error"))]
    pub compare: Vec<String>,
    /// Profile the guest in every ember boot and write the merged flat profile to FILE
    /// (default ember-profile.txt; folded stacks to FILE.folded).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "ember-profile.txt")]
    pub profile: Option<PathBuf>,
    /// Console text that says the guest's init started (timed from outside, for every VMM).
    #[arg(long, value_name = "TEXT", default_value = "ember-init:")]
    pub marker: String,
    /// Seconds a boot may take before it is killed and counted as failed.
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = parse_secs)]
    pub timeout: u64,
    /// Do not adapt the guest to this host (see `ember run --help`).
    #[arg(long)]
    pub no_host_tuning: bool,
    /// Measure only the VMM's set-up (process start to first KVM_RUN): each ember run is
    /// stopped half a second after it started, so many runs take little time. Peers are not
    /// run.
    #[arg(long)]
    pub setup_only: bool,
    /// Boot ember's guests without ACPI (as `ember run --no-acpi`): the guest then skips
    /// ACPI's set-up, and ends through the reset line. QEMU's microvm in the comparison
    /// follows (acpi=off; by default it has ACPI, as ember's guests do); Firecracker's guests
    /// always have ACPI.
    #[arg(long)]
    pub no_acpi: bool,
    /// Instead of boots, time `ember exec -- true` end to end, cold (`--cold`, a boot per
    /// command) against warm (restored from the snapshot cache), alternating, --runs each
    /// after a first warm run that boots and writes the snapshot (uses --kernel, --initrd,
    /// --vcpus, --mem, --append, --timeout, --json).
    #[arg(long, conflicts_with_all = ["setup_only", "profile", "snapshot", "compare"])]
    pub exec: bool,
    /// The command of --exec (split at spaces).
    #[arg(long, value_name = "CMD", default_value = "true", requires = "exec")]
    pub exec_command: String,
    /// Snapshot mode, instead of boot times: for ember (`ember run --snapshot-to DIR
    /// --snapshot-on sigusr2`, then `ember restore DIR`) and for each peer given with
    /// `--compare` (so far Firecracker only, through its API), runs alternating: boot the
    /// guest, wait for init's marker line and two lines of the guest's tick command, pause,
    /// take a full snapshot, end the process, restore the snapshot in a new process and
    /// watch whether the guest goes on printing. Reports pause, snapshot and restore times,
    /// snapshot sizes, whether the guest resumed and whether it reset. The guest's command
    /// is a tick every 0.5 s unless the command line has an ember.cmd=.
    #[arg(long, conflicts_with_all = ["setup_only", "profile"])]
    pub snapshot: bool,
    /// Seconds to watch a restored guest in `--snapshot` mode.
    #[arg(long, value_name = "SECS", requires = "snapshot",
          default_value_t = crate::bench::snapshot::DEFAULT_WATCH_S as f64,
          value_parser = parse_timeout)]
    pub snapshot_watch: f64,
    /// A/B mode: boot two ember configurations alternately (A B B A A B ...), --runs each
    /// (default 5), and for each figure say whether B differs from A (a permutation test:
    /// p < 0.01 and a change of at least 5 %). A is what the other flags describe; B is A
    /// with the --b-* flags (at least one of them, or --a-append, is needed).
    #[arg(long, conflicts_with_all = ["compare", "snapshot", "exec", "setup_only", "profile"])]
    pub ab: bool,
    /// --ab: B's kernel instead of A's (B keeps A's initrd unless --b-initrd).
    #[arg(long, value_name = "PATH", requires = "ab")]
    pub b_kernel: Option<PathBuf>,
    /// --ab: B's initial ramdisk instead of A's.
    #[arg(long, value_name = "PATH", requires = "ab")]
    pub b_initrd: Option<PathBuf>,
    /// --ab: B's kernel command line instead of --cmdline (built the same way: --append,
    /// then --b-append, then `ember.cmd=true` unless it has an ember.cmd=).
    #[arg(long, value_name = "STRING", requires = "ab")]
    pub b_cmdline: Option<String>,
    /// --ab: words appended to B's command line only (repeatable).
    #[arg(long, value_name = "WORDS", requires = "ab")]
    pub b_append: Vec<String>,
    /// --ab: words appended to A's command line only (repeatable).
    #[arg(long, value_name = "WORDS", requires = "ab")]
    pub a_append: Vec<String>,
    /// --ab: the ember binary B runs (another build, to measure a VMM change; A runs this
    /// one).
    #[arg(long, value_name = "PATH", requires = "ab")]
    pub b_ember: Option<PathBuf>,
    /// --ab: boot B's guest without ACPI (as --no-acpi does for A).
    #[arg(long, requires = "ab")]
    pub b_no_acpi: bool,
    /// --ab: B's guest memory in MiB instead of --mem.
    #[arg(long, value_name = "MIB", requires = "ab")]
    pub b_mem: Option<u64>,
    /// --ab: B's vCPUs instead of --vcpus.
    #[arg(long, value_name = "N", requires = "ab")]
    pub b_vcpus: Option<u32>,
    /// --ab: A's name in the report.
    #[arg(long, value_name = "NAME", default_value = "A", requires = "ab")]
    pub a_name: String,
    /// --ab: B's name in the report.
    #[arg(long, value_name = "NAME", default_value = "B", requires = "ab")]
    pub b_name: String,
}

impl BenchArgs {
    /// The `--exec` bench these flags describe.
    pub fn to_exec_options(&self) -> crate::bench::exec::ExecBenchOptions {
        let mut exec_flags = Vec::new();
        if let Some(k) = &self.kernel {
            exec_flags.extend(["--kernel".to_string(), k.display().to_string()]);
        }
        if let Some(i) = &self.initrd {
            exec_flags.extend(["--initrd".to_string(), i.display().to_string()]);
        }
        exec_flags.extend(["--vcpus".to_string(), self.vcpus.to_string()]);
        exec_flags.extend(["--mem".to_string(), self.mem.to_string()]);
        for a in &self.append {
            exec_flags.extend(["--append".to_string(), a.clone()]);
        }
        crate::bench::exec::ExecBenchOptions {
            ember: std::env::current_exe().unwrap_or_else(|_| "ember".into()),
            runs: self.runs.map_or(DEFAULT_BENCH_RUNS, |r| r as usize),
            exec_flags,
            command: self
                .exec_command
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            timeout: std::time::Duration::from_secs(self.timeout.max(1)),
        }
    }

    /// The guest command line of a bench: `base` (--cmdline or --b-cmdline), the default
    /// guest's tuning when it is the default guest's default line, --append, `extra`
    /// (--a-append or --b-append), and the guest's command unless it has one.
    fn guest_cmdline(&self, base: &str, extra: &[String]) -> String {
        let mut cmdline = base.trim().to_string();
        if self.kernel.is_none() && base == DEFAULT_CMDLINE {
            // ember's own guest with the default command line: the switches that make it boot
            // faster (for every VMM).
            cmdline = crate::host::append_switches(&cmdline, crate::config::DEFAULT_GUEST_TUNING);
        }
        for a in self.append.iter().chain(extra) {
            cmdline.push(' ');
            cmdline.push_str(a.trim());
        }
        if !crate::host::has_param(&cmdline, "ember.cmd") {
            if self.snapshot {
                // A guest that keeps printing, so that a restored one shows it runs.
                cmdline.push_str(&format!(
                    " ember.cmd=\"{}\"",
                    crate::bench::snapshot::TICK_COMMAND
                ));
            } else {
                cmdline.push_str(" ember.cmd=true");
            }
        }
        cmdline.trim().to_string()
    }

    /// The bench these flags describe.
    pub fn to_options(&self) -> Result<crate::bench::BenchOptions, ConfigError> {
        let (kernel, initrd) = resolve_guest(
            self.kernel.as_ref(),
            self.initrd.as_ref(),
            self.root.as_deref(),
        )?;
        let cmdline = self.guest_cmdline(&self.cmdline, &self.a_append);
        let mut probe = VmConfig::new(&kernel);
        probe.initrd = initrd.clone();
        probe.vcpus = self.vcpus;
        probe.mem_mib = self.mem;
        probe.disks = self
            .disk
            .iter()
            .map(|d| d.parse::<DiskConfig>())
            .collect::<Result<_, _>>()?;
        probe.root = self.root.clone();
        probe.validate()?;
        let guest = crate::bench::peers::GuestSpec {
            kernel,
            initrd,
            disks: self.disk.clone(),
            root: self.root.clone(),
            root_cmdline: probe.root_cmdline(),
            cmdline,
            vcpus: self.vcpus,
            mem_mib: self.mem,
            acpi: !self.no_acpi,
            // What `ember run` gives a guest by default (bench has no --no-rng).
            rng: probe.rng.is_some(),
        };
        let ab = if self.ab {
            Some(self.ab_options(&guest, probe)?)
        } else {
            None
        };
        let default_runs = if self.ab {
            crate::bench::ab::DEFAULT_AB_RUNS
        } else {
            DEFAULT_BENCH_RUNS
        };
        Ok(crate::bench::BenchOptions {
            guest,
            runs: self.runs.map_or(default_runs, |r| r as usize),
            parallel: self.parallel as usize,
            compare: self.compare.clone(),
            marker: self.marker.clone(),
            timeout: std::time::Duration::from_secs(self.timeout.max(1)),
            profile: self.profile.clone(),
            host_tuning: !self.no_host_tuning,
            ember_bin: None,
            setup_only: self.setup_only,
            acpi: !self.no_acpi,
            snapshot: self.snapshot.then(|| crate::bench::snapshot::SnapshotMode {
                watch: std::time::Duration::from_secs_f64(self.snapshot_watch),
            }),
            ab,
        })
    }

    /// The sides of `--ab`: A is `a_guest` (the usual flags with --a-append), B is A with
    /// the --b-* overrides, checked as A was (`probe` is A's checked configuration).
    fn ab_options(
        &self,
        a_guest: &crate::bench::peers::GuestSpec,
        mut probe: VmConfig,
    ) -> Result<crate::bench::ab::AbOptions, ConfigError> {
        use crate::bench::ab::{AbOptions, AbSide};
        let overridden = self.b_kernel.is_some()
            || self.b_initrd.is_some()
            || self.b_cmdline.is_some()
            || !self.b_append.is_empty()
            || !self.a_append.is_empty()
            || self.b_ember.is_some()
            || self.b_no_acpi
            || self.b_mem.is_some()
            || self.b_vcpus.is_some();
        if !overridden {
            return Err(ConfigError::Device(
                "--ab needs configuration B to differ from A: add at least one of \
                 --b-kernel PATH, --b-initrd PATH, --b-cmdline STRING, --b-append WORDS, \
                 --b-ember PATH, --b-no-acpi, --b-mem MIB, --b-vcpus N (or --a-append WORDS \
                 for A), e.g. `ember bench --ab --b-append \"clearcpuid=erms\"`"
                    .into(),
            ));
        }
        let (a_name, b_name) = (self.a_name.trim(), self.b_name.trim());
        if a_name.is_empty() || b_name.is_empty() || a_name == b_name {
            return Err(ConfigError::Device(format!(
                "--a-name {a_name:?} and --b-name {b_name:?}: the two sides need two \
                 different, non-empty names"
            )));
        }
        let b_ember = match &self.b_ember {
            Some(p) => Some(check_executable(p)?),
            None => None,
        };
        let mut b = a_guest.clone();
        if let Some(k) = &self.b_kernel {
            b.kernel = k.clone();
        }
        if let Some(i) = &self.b_initrd {
            b.initrd = Some(i.clone());
        }
        b.cmdline = self.guest_cmdline(
            self.b_cmdline.as_deref().unwrap_or(&self.cmdline),
            &self.b_append,
        );
        b.vcpus = self.b_vcpus.unwrap_or(self.vcpus);
        b.mem_mib = self.b_mem.unwrap_or(self.mem);
        probe.kernel = b.kernel.clone();
        probe.initrd = b.initrd.clone();
        probe.vcpus = b.vcpus;
        probe.mem_mib = b.mem_mib;
        probe.validate().map_err(|e| match e {
            ConfigError::Kernel { path, why } => ConfigError::Device(format!(
                "B's kernel image {}: {why} (check --b-kernel)",
                path.display()
            )),
            ConfigError::Initrd { path, why } => ConfigError::Device(format!(
                "B's initrd {}: {why} (check --b-initrd)",
                path.display()
            )),
            e => ConfigError::Device(format!(
                "configuration B: {e} (B's values come from --b-mem and --b-vcpus where given)"
            )),
        })?;
        Ok(AbOptions {
            a: AbSide {
                name: a_name.to_string(),
                guest: a_guest.clone(),
                ember_bin: None,
                acpi: !self.no_acpi,
            },
            b: AbSide {
                name: b_name.to_string(),
                guest: b,
                ember_bin: b_ember,
                acpi: !self.no_acpi && !self.b_no_acpi,
            },
        })
    }
}

/// Boots per VMM of `ember bench` without `--runs`.
pub const DEFAULT_BENCH_RUNS: usize = 3;

/// `--b-ember PATH`: an executable file, as an absolute path (a bare file name would
/// otherwise be looked up in PATH when the bench starts it).
fn check_executable(path: &Path) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |why: String| {
        ConfigError::Device(format!(
            "--b-ember {}: {why}; give the path of an ember binary (e.g. target/release/ember \
             of another checkout)",
            path.display()
        ))
    };
    let abs = std::fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
    let meta = std::fs::metadata(&abs).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(bad("not executable".into()));
    }
    Ok(abs)
}

/// Kernel and initrd: the ones given, or the default guest's (without its initramfs when
/// the guest boots from a disk, `root`).
fn resolve_guest(
    kernel: Option<&PathBuf>,
    initrd: Option<&PathBuf>,
    root: Option<&str>,
) -> Result<(PathBuf, Option<PathBuf>), ConfigError> {
    Ok(match kernel {
        Some(k) => (k.clone(), initrd.cloned()),
        None => {
            let dir = default_guest_dir().ok_or(ConfigError::NoDefaultGuest)?;
            let default_initrd =
                Some(dir.join("initramfs.cpio")).filter(|p| p.is_file() && root.is_none());
            (dir.join("vmlinux"), initrd.cloned().or(default_initrd))
        }
    })
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_share(s: &str) -> Result<ShareConfig, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_root_share(s: &str) -> Result<ShareConfig, String> {
    ShareConfig::parse_root(s).map_err(|e| e.to_string())
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_rng(s: &str) -> Result<RngConfig, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

impl RunArgs {
    /// The VM configuration these flags describe.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        // With --root (or --root-share) the guest boots from its root file system, not from
        // the default initramfs.
        let root = match &self.root_share {
            Some(_) => Some(crate::config::ROOT_SHARE_TAG.to_string()),
            None => self.root.clone(),
        };
        let (kernel, initrd) =
            resolve_guest(self.kernel.as_ref(), self.initrd.as_ref(), root.as_deref())?;
        let mut c = VmConfig::new(kernel);
        c.initrd = initrd;
        c.cmdline = self.cmdline.clone();
        if self.kernel.is_none() && self.cmdline == DEFAULT_CMDLINE {
            // ember's own guest with the default command line: add the switches that make it
            // boot faster.
            c.cmdline =
                crate::host::append_switches(&c.cmdline, crate::config::DEFAULT_GUEST_TUNING);
        }
        for a in &self.append {
            c.cmdline.push(' ');
            c.cmdline.push_str(a.trim());
        }
        c.vcpus = self.vcpus;
        c.mem_mib = self.mem;
        c.host_tuning = !self.no_host_tuning;
        c.boot_timer = self.boot_timer;
        c.disks = self.disk.clone();
        c.root = root;
        c.net = self.net.clone();
        c.vsock = self.vsock.clone();
        c.shares = self.share.clone();
        if let Some(r) = &self.root_share {
            // The root share comes first; the others keep the tags their positions among the
            // --share flags gave them (share0, share1, ...).
            for (i, s) in c.shares.iter_mut().enumerate() {
                s.tag = Some(s.tag(i));
            }
            c.shares.insert(0, r.clone());
        }
        c.rng = if self.no_rng {
            None
        } else {
            Some(self.rng.unwrap_or_default())
        };
        if self.bench_report.is_some() {
            // Bench children have no console input (and no terminal to put in raw mode).
            c.stdin = false;
        }
        c.acpi = !self.no_acpi;
        // Only a VM that can be snapshotted needs the generation ID (see the field).
        c.vm_generation_id = self.snapshot_to.is_some() || self.snapshot_restore_after.is_some();
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ember").chain(args.iter().copied()))
    }

    #[test]
    fn restore_switches_parse() {
        let o = parse_restore_opts("no-clock, tsc-khz,skip-msr=0x10,skip-msr=4b564d01,delay-ms=5")
            .unwrap();
        assert!(!o.set_clock && o.set_tsc_khz && !o.keep_clock_flags);
        assert_eq!(o.skip_msrs, [0x10, 0x4b56_4d01]);
        assert_eq!(o.delay, std::time::Duration::from_millis(5));
        let o = parse_restore_opts("").unwrap();
        assert!(o.set_clock && !o.pause_only && !o.memory_file);
        assert!(
            parse_restore_opts("memory-file,pause-only,probe-pvclock,keep-clock-flags").is_ok_and(
                |o| o.memory_file && o.pause_only && o.probe_pvclock && o.keep_clock_flags
            )
        );
        assert!(parse_restore_opts("skip-msr=zz").is_err());
        assert!(parse_restore_opts("delay-ms=x").is_err());
        assert!(parse_restore_opts("bogus").is_err());
        let cli = parse(&["run", "--snapshot-restore-after", "2.5"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.snapshot_restore_after, Some(2.5));
    }

    #[test]
    fn duration_flags_stop_at_ten_years() {
        assert_eq!(MAX_DURATION_TEXT, format!("{MAX_DURATION_SECS} (10 years)"));
        let max = MAX_DURATION_SECS.to_string();
        let over = (MAX_DURATION_SECS + 1).to_string();
        assert_eq!(parse_secs(&max), Ok(MAX_DURATION_SECS));
        assert!(parse_secs(&over).unwrap_err().contains(MAX_DURATION_TEXT));
        assert!(parse_millis(&(MAX_DURATION_SECS * 1000).to_string()).is_ok());
        assert!(parse_millis(&(MAX_DURATION_SECS * 1000 + 1).to_string()).is_err());
        assert!(parse_timeout(&max).is_ok());
        assert!(parse_timeout(&over)
            .unwrap_err()
            .contains(MAX_DURATION_TEXT));
        assert!(parse_timeout("1e300").is_err());
    }

    #[test]
    fn run_defaults() {
        let cli = parse(&["run", "--kernel", "/k"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let c = a.to_config().unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.mem_mib, 128);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(c.host_tuning);
        assert!(c.acpi);
        assert_eq!(a.shutdown_timeout, None);
    }

    #[test]
    fn acpi_and_shutdown_flags() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--no-acpi",
            "--shutdown-timeout",
            "2",
        ]);
        let Command::Run(a) = cli.unwrap().command else {
            panic!("not run")
        };
        assert_eq!(a.shutdown_timeout, Some(2));
        assert!(!a.to_config().unwrap().acpi);
        assert!(parse(&["run", "--kernel", "/k", "--shutdown-timeout", "-1"]).is_err());
    }

    #[test]
    fn run_flags() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--vcpus",
            "2",
            "--mem",
            "256",
            "--cmdline",
            "console=ttyS0",
            "--append",
            "quiet",
            "--no-host-tuning",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let c = a.to_config().unwrap();
        assert_eq!((c.vcpus, c.mem_mib), (2, 256));
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!(c.initrd.as_deref(), Some(std::path::Path::new("/i")));
        assert!(!c.host_tuning);
    }

    fn exec_args(args: &[&str]) -> ExecArgs {
        match parse(args).unwrap().command {
            Command::Exec(a) => a,
            _ => panic!("not exec"),
        }
    }

    #[test]
    fn exec_flags() {
        let args = "exec --kernel /k --timeout 2.5 --file a.sh --file d:/opt/ --append foo=1 \
                    --disk /d.img,ro";
        let mut args: Vec<&str> = args.split(' ').collect();
        args.extend(["--env", "A=b c", "--", "sh", "-c", "exit 3"]);
        let a = exec_args(&args);
        assert_eq!(a.timeout, Some(2.5));
        assert_eq!(a.command, ["sh", "-c", "exit 3"]);
        let spec = a.to_spec().unwrap();
        assert_eq!(spec.files[1].guest_path().unwrap(), "/opt/d");
        assert_eq!(spec.env[0].value, "b c");
        assert_eq!(spec.workdir, "/root");
        let c = a.to_config().unwrap();
        assert_eq!(c.cmdline, format!("{EXEC_CMDLINE} foo=1"));
        assert_eq!(c.disks.len(), 1);
        assert!(c.disks[0].read_only);
        let cli = parse(&["exec", "--kernel", "/k", "--", "true"]).unwrap();
        assert_eq!(cli.log_level(), log::LevelFilter::Warn);
        let cli = parse(&["--log-level", "debug", "exec", "--kernel", "/k", "true"]).unwrap();
        assert_eq!(cli.log_level(), log::LevelFilter::Debug);
    }

    #[test]
    fn exec_command_without_dashes_keeps_its_flags() {
        let a = exec_args(&["exec", "--kernel", "/k", "ls", "-l", "--timeout", "3"]);
        assert_eq!(a.command, ["ls", "-l", "--timeout", "3"]);
        assert_eq!(a.timeout, None);
    }

    #[test]
    fn exec_rejects_bad_flags() {
        assert!(parse(&["exec", "--kernel", "/k"]).is_err()); // no command
        assert!(parse(&["exec", "--timeout", "0", "--", "true"]).is_err());
        assert!(parse(&["exec", "--timeout", "soon", "--", "true"]).is_err());
        assert!(parse(&["exec", "--file", "a:", "--", "true"]).is_err());
        let a = exec_args(&["exec", "--kernel", "/k", "--env", "1X=y", "--", "true"]);
        assert!(a.to_spec().is_err());
    }

    #[test]
    fn disks_and_root() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--disk",
            "/a.img",
            "--disk",
            "/b.img,ro,id=b",
            "--root",
            "/dev/vda",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let c = a.to_config().unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, std::path::Path::new("/a.img"));
        assert!(!c.disks[0].read_only);
        assert!(c.disks[1].read_only);
        assert_eq!(c.disks[1].id.as_deref(), Some("b"));
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        let e = parse(&["run", "--kernel", "/k", "--disk", "/a.img,bogus"]).unwrap_err();
        assert!(e.to_string().contains("PATH[,ro]"), "{e}");
    }

    #[test]
    fn root_share_conflicts() {
        for (other, v) in [("--root", "/dev/vda"), ("--initrd", "/i")] {
            let e = parse(&["run", "--kernel", "/k", "--root-share", "/r", other, v]).unwrap_err();
            assert!(e.to_string().contains("cannot be used with"), "{e}");
        }
        let e = parse(&["run", "--root-share", "/r,tag=x"]).unwrap_err();
        assert!(e.to_string().contains("DIR[,ro]"), "{e}");
    }

    #[test]
    fn root_drops_the_default_initramfs() {
        let dir = std::env::temp_dir().join(format!("ember-cli-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), b"x").unwrap();
        std::fs::write(dir.join("initramfs.cpio"), b"x").unwrap();
        std::env::set_var("EMBER_GUEST_DIR", &dir);
        let a = run_args(&["run"]);
        assert_eq!(
            a.to_config().unwrap().initrd,
            Some(dir.join("initramfs.cpio"))
        );
        let a = run_args(&["run", "--disk", "/r.img", "--root", "/dev/vda"]);
        let c = a.to_config().unwrap();
        assert_eq!(c.initrd, None);
        assert_eq!(c.kernel, dir.join("vmlinux"));
        // An explicit --initrd is kept.
        let a = run_args(&["run", "--root", "/dev/vda", "--initrd", "/i"]);
        assert_eq!(
            a.to_config().unwrap().initrd.as_deref(),
            Some(std::path::Path::new("/i"))
        );
        // --root-share: the default kernel without its initramfs, the root share first with
        // the other shares keeping their tags, and the virtiofs root on the command line.
        let a = run_args(&[
            "run",
            "--share",
            "/s0",
            "--root-share",
            "/r,ro",
            "--share",
            "/s1,tag=x",
            "--share",
            "/s2",
        ]);
        let c = a.to_config().unwrap();
        assert_eq!(c.initrd, None);
        assert_eq!(c.kernel, dir.join("vmlinux"));
        assert_eq!(c.root.as_deref(), Some("rootfs"));
        let shares: Vec<_> = c
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| (s.dir.display().to_string(), s.tag(i), s.readonly))
            .collect();
        assert_eq!(
            shares,
            [
                ("/r".to_string(), "rootfs".to_string(), true),
                ("/s0".to_string(), "share0".to_string(), false),
                ("/s1".to_string(), "x".to_string(), false),
                ("/s2".to_string(), "share2".to_string(), false),
            ]
        );
        assert_eq!(
            c.root_cmdline().unwrap(),
            "root=rootfs rootfstype=virtiofs ro"
        );
        std::env::remove_var("EMBER_GUEST_DIR");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn device_flags() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--net",
            "tap=tap0",
            "--net",
            "tap=tap1,mac=02:00:00:00:00:09",
            "--vsock",
            "cid=7,uds=/tmp/v.sock",
            "--rng",
            "rate=4K",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let c = a.to_config().unwrap();
        assert_eq!(c.net.len(), 2);
        assert_eq!(c.net[1].mac.unwrap().to_string(), "02:00:00:00:00:09");
        assert_eq!(c.vsock.as_ref().map(|v| v.cid), Some(7));
        assert_eq!(c.rng.map(|r| r.rate), Some(4096));
        let a = run_args(&["run", "--kernel", "/k", "--no-rng"]);
        assert_eq!(a.to_config().unwrap().rng, None);
        // The VM generation ID only for a VM that may be snapshotted.
        assert!(!a.to_config().unwrap().vm_generation_id);
        let a = run_args(&[
            "run",
            "--kernel",
            "/k",
            "--snapshot-to",
            "/s",
            "--snapshot-on",
            "sigusr2",
        ]);
        assert!(a.to_config().unwrap().vm_generation_id);
        let a = run_args(&["run", "--kernel", "/k"]);
        assert_eq!(a.to_config().unwrap().rng, Some(RngConfig::default()));
        // Bad values are refused by the parser, with the reason.
        let e = parse(&["run", "--kernel", "/k", "--net", "tap=t,mac=1:2"]).unwrap_err();
        assert!(e.to_string().contains("not a MAC"), "{e}");
        let e = parse(&["run", "--kernel", "/k", "--vsock", "cid=3"]).unwrap_err();
        assert!(e.to_string().contains("uds= is required"), "{e}");
        assert!(parse(&["run", "--kernel", "/k", "--rng", "rate=1", "--no-rng"]).is_err());
        // `--rng` alone (last, or before another flag): on, with the defaults; one option
        // given keeps the other's default.
        for args in [
            &["run", "--kernel", "/k", "--rng"][..],
            &["run", "--rng", "--kernel", "/k"],
            &["run", "--kernel", "/k", "--rng="],
        ] {
            let a = run_args(args);
            assert_eq!(a.rng, Some(RngConfig::default()), "{args:?}");
            assert_eq!(a.to_config().unwrap().rng, Some(RngConfig::default()));
        }
        let a = run_args(&["run", "--kernel", "/k", "--rng", "burst=1K"]);
        let rng = a.to_config().unwrap().rng.unwrap();
        assert_eq!((rng.rate, rng.burst), (RngConfig::default().rate, 1024));
        assert!(parse(&["run", "--kernel", "/k", "--rng", "--no-rng"]).is_err());
    }

    #[test]
    fn bench_flags() {
        let cli = parse(&[
            "bench",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--runs",
            "2",
            "--parallel",
            "2",
            "--compare",
            "qemu",
            "--compare",
            "firecracker=/fc",
            "--profile",
            "--json",
            "o.json",
            "--append",
            "quiet",
        ])
        .unwrap();
        let Command::Bench(b) = cli.command else {
            panic!("not bench")
        };
        assert_eq!((b.runs, b.parallel), (Some(2), 2));
        assert_eq!(b.compare, ["qemu", "firecracker=/fc"]);
        assert_eq!(
            b.profile.as_deref(),
            Some(std::path::Path::new("ember-profile.txt"))
        );
        assert_eq!(b.marker, "ember-init:");
        // Validation needs a real kernel file.
        assert!(b.to_options().unwrap_err().to_string().contains("--kernel"));
        assert!(parse(&["bench", "--runs", "0"]).is_err());
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--profile-guest",
            "p.txt",
            "--bench-report",
            "r",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.profile_rate, crate::profiler::DEFAULT_RATE_HZ);
        assert!(
            !a.to_config().unwrap().stdin,
            "bench children take no input"
        );
    }

    /// The flags of `ember ARGS` (`ARGS` starting with `run`).
    fn run_args(args: &[&str]) -> RunArgs {
        let Command::Run(a) = parse(args).unwrap().command else {
            panic!("not run")
        };
        *a
    }

    /// `ember bench --kernel KERNEL EXTRA...`'s options.
    fn bench_options(kernel: &str, extra: &[&str]) -> crate::bench::BenchOptions {
        let mut args = vec!["bench", "--kernel", kernel];
        args.extend_from_slice(extra);
        let Command::Bench(b) = parse(&args).unwrap().command else {
            panic!("not bench")
        };
        b.to_options().unwrap()
    }

    #[test]
    fn bench_adds_the_guest_command_once() {
        let k = std::env::temp_dir().join(format!("ember-cli-k-{}", std::process::id()));
        std::fs::write(&k, b"\x7fELF").unwrap();
        let ks = k.to_str().unwrap();
        let parse_opts = |extra: &[&str]| bench_options(ks, extra);
        assert_eq!(
            parse_opts(&[]).guest.cmdline,
            format!("{DEFAULT_CMDLINE} ember.cmd=true")
        );
        let o = parse_opts(&[
            "--cmdline",
            "console=ttyS0",
            "--append",
            "ember.cmd=\"ls /\"",
        ]);
        assert_eq!(o.guest.cmdline, "console=ttyS0 ember.cmd=\"ls /\"");
        std::fs::remove_file(k).unwrap();
    }

    #[test]
    fn bench_ab_sides() {
        let dir = std::env::temp_dir().join(format!("ember-cli-ab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        let k2 = dir.join("k2");
        let exe = dir.join("old-ember");
        let plain = dir.join("not-executable");
        let (i, i2) = (dir.join("i"), dir.join("i2"));
        for f in [&k, &k2, &exe, &plain, &i, &i2] {
            std::fs::write(f, b"\x7fELF").unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ks = k.to_str().unwrap();
        let opts = |extra: &[&str]| bench_options(ks, extra);
        let tried = |extra: &[&str]| {
            let mut args = vec!["bench", "--kernel", ks];
            args.extend_from_slice(extra);
            let Command::Bench(b) = parse(&args).unwrap().command else {
                panic!("not bench")
            };
            b.to_options()
        };

        // Without --ab: no sides, 3 runs.
        let o = opts(&[]);
        assert!(o.ab.is_none());
        assert_eq!(o.runs, 3);

        // B appends words; both keep --append; A and B otherwise the same; 5 runs a side.
        let o = opts(&[
            "--ab",
            "--append",
            "quiet",
            "--b-append",
            "clearcpuid=erms",
            "--b-append",
            "nokaslr",
            "--initrd",
            i.to_str().unwrap(),
        ]);
        assert_eq!(o.runs, crate::bench::ab::DEFAULT_AB_RUNS);
        let ab = o.ab.clone().unwrap();
        let base = format!("{DEFAULT_CMDLINE} quiet");
        assert_eq!(ab.a.guest.cmdline, format!("{base} ember.cmd=true"));
        assert_eq!(
            ab.b.guest.cmdline,
            format!("{base} clearcpuid=erms nokaslr ember.cmd=true")
        );
        assert_eq!(ab.a.guest, o.guest, "A is the bench's guest");
        assert_eq!((ab.a.name.as_str(), ab.b.name.as_str()), ("A", "B"));
        assert_eq!(ab.differences(), ["cmdline"]);
        assert_eq!(ab.b.guest.initrd.as_ref(), Some(&i), "B keeps A's initrd");
        assert!(ab.a.acpi && ab.b.acpi);
        assert_eq!(
            (ab.a.ember_bin.as_ref(), ab.b.ember_bin.as_ref()),
            (None, None)
        );

        // Every B override; --b-cmdline replaces --cmdline for B only; --a-append is A's.
        let o = opts(&[
            "--ab",
            "--runs",
            "7",
            "--cmdline",
            "console=ttyS0",
            "--a-append",
            "a=1",
            "--b-cmdline",
            "console=hvc0",
            "--b-kernel",
            k2.to_str().unwrap(),
            "--b-initrd",
            i2.to_str().unwrap(),
            "--b-ember",
            exe.to_str().unwrap(),
            "--b-no-acpi",
            "--b-mem",
            "512",
            "--b-vcpus",
            "2",
            "--a-name",
            "new",
            "--b-name",
            "old",
        ]);
        assert_eq!(o.runs, 7);
        let ab = o.ab.unwrap();
        assert_eq!(ab.a.guest.cmdline, "console=ttyS0 a=1 ember.cmd=true");
        assert_eq!(ab.b.guest.cmdline, "console=hvc0 ember.cmd=true");
        assert_eq!(ab.b.guest.kernel, k2);
        assert_eq!(ab.b.guest.initrd.as_ref(), Some(&i2));
        assert_eq!((ab.b.guest.mem_mib, ab.b.guest.vcpus), (512, 2));
        assert_eq!(
            (ab.a.guest.mem_mib, ab.a.guest.vcpus),
            (crate::config::DEFAULT_MEM_MIB, crate::config::DEFAULT_VCPUS)
        );
        assert_eq!(ab.b.ember_bin, Some(std::fs::canonicalize(&exe).unwrap()));
        assert!(ab.a.acpi && !ab.b.acpi);
        assert_eq!((ab.a.name.as_str(), ab.b.name.as_str()), ("new", "old"));
        assert_eq!(
            ab.differences(),
            [
                "ember binary",
                "kernel",
                "initrd",
                "cmdline",
                "ACPI",
                "vCPUs",
                "memory"
            ]
        );
        // --a-append alone makes the sides differ; --no-acpi is A's and B's.
        let ab = opts(&["--ab", "--a-append", "x", "--no-acpi"]).ab.unwrap();
        assert_eq!(ab.differences(), ["cmdline"]);
        assert!(!ab.a.acpi && !ab.b.acpi);
        // The default guest's tuning follows the default command line, for B too.
        let o = opts(&["--ab", "--b-cmdline", DEFAULT_CMDLINE]).ab.unwrap();
        assert_eq!(o.a.guest.cmdline, o.b.guest.cmdline);

        // Usage errors, each saying what to do.
        let err = |extra: &[&str]| tried(extra).unwrap_err().to_string();
        let e = err(&["--ab"]);
        assert!(
            e.contains("--ab needs configuration B to differ from A"),
            "{e}"
        );
        assert!(
            e.contains("--b-kernel PATH") && e.contains("--b-append WORDS"),
            "{e}"
        );
        let e = err(&["--ab", "--b-kernel", "/nonexistent/vmlinux"]);
        assert!(
            e.contains("/nonexistent/vmlinux") && e.contains("check --b-kernel"),
            "{e}"
        );
        let e = err(&["--ab", "--b-ember", "/nonexistent/ember"]);
        assert!(e.contains("--b-ember /nonexistent/ember"), "{e}");
        let e = err(&["--ab", "--b-ember", plain.to_str().unwrap()]);
        assert!(e.contains("not executable"), "{e}");
        let e = err(&["--ab", "--b-ember", dir.to_str().unwrap()]);
        assert!(e.contains("not a regular file"), "{e}");
        let e = err(&["--ab", "--b-mem", "1"]);
        assert!(
            e.contains("configuration B") && e.contains("--b-mem"),
            "{e}"
        );
        let e = err(&["--ab", "--b-vcpus", "1", "--a-name", "X", "--b-name", "X"]);
        assert!(e.contains("two different, non-empty names"), "{e}");
        let e = err(&["--ab", "--b-vcpus", "1", "--b-name", " "]);
        assert!(e.contains("two different, non-empty names"), "{e}");
        for bad in [
            &["bench", "--ab", "--b-vcpus", "2", "--compare", "qemu"][..],
            &["bench", "--ab", "--b-vcpus", "2", "--snapshot"],
            &["bench", "--ab", "--b-vcpus", "2", "--exec"],
            &["bench", "--ab", "--b-vcpus", "2", "--setup-only"],
            &["bench", "--ab", "--b-vcpus", "2", "--profile"],
            &["bench", "--b-append", "x"],
            &["bench", "--a-append", "x"],
            &["bench", "--b-kernel", "/k"],
            &["bench", "--b-no-acpi"],
            &["bench", "--a-name", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bench_snapshot_mode_gives_the_guest_a_tick_command() {
        let k = std::env::temp_dir().join(format!("ember-cli-snap-k-{}", std::process::id()));
        std::fs::write(&k, b"\x7fELF").unwrap();
        let ks = k.to_str().unwrap();
        let parse_opts = |extra: &[&str]| bench_options(ks, extra);
        let o = parse_opts(&["--snapshot", "--compare", "firecracker"]);
        assert_eq!(
            o.guest.cmdline,
            format!(
                "{DEFAULT_CMDLINE} ember.cmd=\"{}\"",
                crate::bench::snapshot::TICK_COMMAND
            )
        );
        assert_eq!(
            o.snapshot.map(|m| m.watch),
            Some(std::time::Duration::from_secs(
                crate::bench::snapshot::DEFAULT_WATCH_S
            ))
        );
        // The user's own command wins; the watch time can be set.
        let o = parse_opts(&[
            "--snapshot",
            "--snapshot-watch",
            "2.5",
            "--append",
            "ember.cmd=\"cat /dev/zero\"",
        ]);
        assert!(o.guest.cmdline.ends_with(" ember.cmd=\"cat /dev/zero\""));
        assert!(!o.guest.cmdline.contains("tick"));
        assert_eq!(
            o.snapshot.map(|m| m.watch),
            Some(std::time::Duration::from_millis(2500))
        );
        // Not in snapshot mode: no snapshot options, the usual `true`.
        let o = parse_opts(&[]);
        assert!(o.snapshot.is_none());
        assert!(o.guest.cmdline.ends_with(" ember.cmd=true"));
        std::fs::remove_file(k).unwrap();
        // Flags that make no sense together.
        assert!(parse(&["bench", "--snapshot-watch", "3"]).is_err());
        assert!(parse(&["bench", "--snapshot", "--setup-only"]).is_err());
        assert!(parse(&["bench", "--snapshot", "--profile"]).is_err());
        assert!(parse(&["bench", "--snapshot", "--snapshot-watch", "0"]).is_err());
    }

    #[test]
    fn restore_flags_are_host_side_settings() {
        let cli = parse(&["restore", "/snap"]).unwrap();
        assert_eq!(cli.log_level(), log::LevelFilter::Info);
        let Command::Restore(a) = cli.command else {
            panic!("not restore")
        };
        assert_eq!(a.dir, std::path::Path::new("/snap"));
        assert_eq!(
            (a.console, a.no_stdin, a.timeout),
            (ConsoleSink::Stdout, false, None)
        );
        // The snapshot's configuration keeps its VM settings; only the host side changes.
        let mut saved = VmConfig::new("/k");
        saved.vcpus = 2;
        saved.stdin = false;
        saved.console = ConsoleSink::Null;
        let mut c = saved.clone();
        a.apply(&mut c).unwrap();
        assert_eq!(
            (c.stdin, c.console, c.vcpus),
            (true, ConsoleSink::Stdout, 2)
        );
        let Command::Restore(a) = parse(&[
            "restore",
            "--console",
            "stderr",
            "--no-stdin",
            "--timeout",
            "2.5",
            "--vsock-uds",
            "/run/v.sock",
            "/snap",
        ])
        .unwrap()
        .command
        else {
            panic!("not restore")
        };
        assert_eq!(a.timeout, Some(2.5));
        let e = a.apply(&mut saved.clone()).unwrap_err().to_string();
        assert!(e.contains("has no vsock device"), "{e}");
        saved.vsock = Some(VsockConfig {
            cid: 3,
            uds: "/old.sock".into(),
        });
        let mut c = saved.clone();
        a.apply(&mut c).unwrap();
        assert_eq!((c.stdin, c.console), (false, ConsoleSink::Stderr));
        assert_eq!(
            c.vsock.map(|v| (v.cid, v.uds)),
            Some((3, "/run/v.sock".into()))
        );
        // --tap: one per NIC, in order; the guest's MAC stays.
        let tap = |args: &[&str], nics: &[&str]| {
            let mut all = vec!["restore"];
            all.extend(args);
            all.push("/snap");
            let Command::Restore(a) = parse(&all).unwrap().command else {
                panic!("not restore")
            };
            let mut c = VmConfig::new("/k");
            c.net = nics.iter().map(|t| NetConfig::new(*t)).collect();
            a.apply(&mut c).map(|()| c.net).map_err(|e| e.to_string())
        };
        let net = tap(&["--tap", "tapB"], &["tapA", "tapX"]).unwrap();
        assert_eq!(
            net,
            vec![
                NetConfig {
                    tap: "tapB".into(),
                    mac: Some(crate::devices::virtio::net::MacAddr::derive("tapA")),
                    ..NetConfig::new("")
                },
                NetConfig::new("tapX"),
            ]
        );
        let net = tap(&["--tap", "tapB", "--tap", "tapC"], &["tapA", "tapX"]).unwrap();
        assert_eq!((net[0].tap.as_str(), net[1].tap.as_str()), ("tapB", "tapC"));
        let e = tap(&["--tap", "tapB"], &[]).unwrap_err();
        assert!(
            e.contains("--tap tapB: the snapshot's VM has 0 NIC(s): give at most one --tap"),
            "{e}"
        );
        let e = tap(&["--tap", "tapB", "--tap", "tapC"], &["tapA"]).unwrap_err();
        assert!(
            e.contains("--tap tapC: the snapshot's VM has 1 NIC(s) (on TAP tapA)"),
            "{e}"
        );
        let e = tap(&["--tap", "tapX"], &["tapA", "tapX"]).unwrap_err();
        assert!(e.contains("two NICs would be on TAP tapX"), "{e}");
        let e = tap(&["--tap", "this-name-is-too-long"], &["tapA"]).unwrap_err();
        assert!(
            e.contains("--tap this-name-is-too-long: ") && e.contains("15"),
            "{e}"
        );
        // The directory is required; a bad sink is refused with the choices.
        assert!(parse(&["restore"]).is_err());
        let e = parse(&["restore", "--console", "tty", "/snap"]).unwrap_err();
        assert!(e.to_string().contains("stdout, stderr or null"), "{e}");
        // VM flags belong to `ember run`.
        assert!(parse(&["restore", "--mem", "64", "/snap"]).is_err());
    }

    #[test]
    fn rejects_bad_numbers() {
        assert!(parse(&["run", "--kernel", "/k", "--vcpus", "-1"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--mem", "lots"]).is_err());
        assert!(parse(&["run", "--bogus"]).is_err());
    }

    #[test]
    fn exec_kernel_tree_and_json() {
        let a = exec_args(&["exec", "--json", "/r.json", "--", "true"]);
        assert_eq!(a.json.as_deref(), Some(std::path::Path::new("/r.json")));
        assert!(parse(&[
            "exec",
            "--kernel",
            "/k",
            "--kernel-tree",
            "/t",
            "--",
            "true"
        ])
        .is_err());
        // The tree's kernel: vmlinux, else the bzImage; neither: both paths named.
        let dir = std::env::temp_dir().join(format!("ember-cli-ktree-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("arch/x86/boot")).unwrap();
        let tree = dir.to_str().unwrap();
        let a = exec_args(&[
            "exec",
            "--kernel-tree",
            tree,
            "--initrd",
            "/i",
            "--",
            "true",
        ]);
        let e = a.to_config().unwrap_err().to_string();
        assert!(
            e.contains("vmlinux") && e.contains("arch/x86/boot/bzImage"),
            "{e}"
        );
        std::fs::write(dir.join("arch/x86/boot/bzImage"), b"bz").unwrap();
        let c = a.to_config().unwrap();
        assert_eq!(c.kernel, dir.join("arch/x86/boot/bzImage"));
        assert_eq!(c.initrd.as_deref(), Some(std::path::Path::new("/i")));
        std::fs::write(dir.join("vmlinux"), b"elf").unwrap();
        assert_eq!(a.to_config().unwrap().kernel, dir.join("vmlinux"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
