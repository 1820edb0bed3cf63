// SPDX-License-Identifier: Apache-2.0
//! `ember compare`: the same static busybox workload as a plain host process, in a namespace
//! sandbox (bubblewrap), in an OCI container (crun or runc), and in an ember microVM booted
//! for the command (`ember exec --cold`) and restored from a snapshot (`ember exec`), side by
//! side, measured the same way from outside ([`measure`]): start-up latency (spawn to the
//! workload's first line), end to end, CPU time, the process tree's peak RSS/PSS, the
//! workload's syscall-, fork- and I/O-heavy phases ([`workload`]) as ratios to the host row,
//! and an isolation probe per row.
//!
//! Every row runs from one bundle made at the start: a root file system holding the host's
//! static busybox, its applet links and the scripts. The host row runs that busybox with
//! `PATH` pointing into the bundle; the sandbox and the container use the bundle as their
//! root; the VM rows copy the scripts into the guest (`--file`), whose initramfs has the
//! same Debian busybox-static. Runs alternate between rows (host #1, sandbox #1, ...,
//! host #2, ...) so that every row shares the host's noise.
//!
//! The probe's kernel fault (the guest overwrites its own kernel's `getppid` with `ud2`
//! through `/dev/mem` and calls it) runs in VM rows only: in a sandbox or a container the
//! kernel is the host's, so there ember only checks, without writing anything, whether
//! `/proc/sysrq-trigger` is writable and which capabilities the workload holds.

pub mod measure;
pub mod report;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use measure::RunResult;
use workload::{Marks, ProbeFacts};

/// Errors of `ember compare` before or around its runs.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A flag is wrong.
    #[error("{0}")]
    Usage(String),
    /// The scratch directory or the bundle could not be made.
    #[error("cannot prepare {path}")]
    Prepare {
        /// What could not be made.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No static busybox on the host.
    #[error(
        "no static busybox found (looked for {0}): install it with \
         `apt-get install busybox-static` (scripts/test-all.sh does)"
    )]
    NoBusybox(String),
    /// An output file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The chart could not be drawn.
    #[error("cannot draw the chart {path}: {message}")]
    Chart {
        /// The file.
        path: PathBuf,
        /// What plotters said.
        message: String,
    },
}

/// The kinds of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// A plain host process: the baseline of every ratio.
    Host,
    /// A namespace sandbox (bubblewrap: new user/pid/net/ipc/uts/mount namespaces).
    Sandbox,
    /// An OCI container (crun or runc) with the runtime's default spec.
    Container,
    /// `ember exec` restoring the cached snapshot of a booted guest.
    EmberWarm,
    /// `ember exec --cold`: a guest booted for the command.
    EmberCold,
}

impl RowKind {
    /// Every kind, in the default order (lightest first).
    pub const ALL: [RowKind; 5] = [
        RowKind::Host,
        RowKind::Sandbox,
        RowKind::Container,
        RowKind::EmberWarm,
        RowKind::EmberCold,
    ];

    /// The name `--rows` takes.
    pub fn name(self) -> &'static str {
        match self {
            RowKind::Host => "host",
            RowKind::Sandbox => "sandbox",
            RowKind::Container => "container",
            RowKind::EmberWarm => "ember-warm",
            RowKind::EmberCold => "ember-cold",
        }
    }

    /// Whether the row is a VM (own kernel).
    pub fn is_vm(self) -> bool {
        matches!(self, RowKind::EmberWarm | RowKind::EmberCold)
    }
}

impl FromStr for RowKind {
    type Err = CompareError;

    fn from_str(s: &str) -> Result<Self, CompareError> {
        RowKind::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                CompareError::Usage(format!(
                    "--rows: unknown row {s:?} (rows: {})",
                    RowKind::ALL.map(RowKind::name).join(", ")
                ))
            })
    }
}

/// Parses `--rows host,sandbox,...` (no duplicates, at least one).
pub fn parse_rows(s: &str) -> Result<Vec<RowKind>, CompareError> {
    let mut rows = Vec::new();
    for w in s.split(',').filter(|w| !w.trim().is_empty()) {
        let k: RowKind = w.parse()?;
        if rows.contains(&k) {
            return Err(CompareError::Usage(format!("--rows: {w} is given twice")));
        }
        rows.push(k);
    }
    if rows.is_empty() {
        return Err(CompareError::Usage("--rows: no row given".into()));
    }
    Ok(rows)
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Measured runs per row.
    pub runs: usize,
    /// The rows, in order.
    pub rows: Vec<RowKind>,
    /// The user's command (empty: the default workload [`workload::WORKLOAD`]).
    pub command: Vec<String>,
    /// The container runtime (`crun` or `runc`; `None`: the first of them that works).
    pub runtime: Option<String>,
    /// A run that takes longer is killed and counted as failed.
    pub timeout: Duration,
    /// Run the isolation probe.
    pub probe: bool,
    /// The VM rows' kernel (`ember exec --kernel`), for tests with tiny guests; `None`: the
    /// default guest.
    pub vm_kernel: Option<PathBuf>,
    /// The ember binary (default: this one).
    pub ember_bin: Option<PathBuf>,
}

/// One measured run of one row.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Run number (1-based).
    pub run: usize,
    /// What was measured.
    pub result: RunResult,
    /// The marker lines read.
    pub marks: Marks,
    /// `ember exec --json`'s `path` (VM rows).
    pub vm_path: Option<String>,
    /// Why the run counts as failed.
    pub error: Option<String>,
}

/// What one row did.
#[derive(Debug, Clone)]
pub struct Row {
    /// Its kind.
    pub kind: RowKind,
    /// What ran it (`host`, `bwrap`, `runc`, `crun`, `ember exec`, `ember exec --cold`).
    pub label: String,
    /// Why the row was not run, when it was not.
    pub skipped: Option<String>,
    /// The measured runs.
    pub samples: Vec<Sample>,
    /// The isolation probe's findings.
    pub probe: Option<ProbeFacts>,
    /// What the kernel-fault step came to (or why it did not run).
    pub fault: Option<String>,
}

/// The outcome of a comparison.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The options.
    pub opts: CompareOptions,
    /// Every row, in order.
    pub rows: Vec<Row>,
    /// Notes for the reader.
    pub notes: Vec<String>,
    /// The host.
    pub host: HostFacts,
    /// Whole-comparison wall time, s.
    pub wall_s: f64,
}

/// The host the comparison ran on.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// PVM (KVM without hardware virtualization) or hardware KVM.
    pub pvm: bool,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// CPUs available.
    pub cpus: usize,
    /// Load average at the end.
    pub loadavg: String,
    /// Network interfaces.
    pub interfaces: Vec<String>,
    /// Block devices.
    pub disks: Vec<String>,
}

impl HostFacts {
    /// Looks at this host.
    pub fn detect() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        Self {
            pvm: crate::host::HostInfo::detect().pvm,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            interfaces: workload::host_interfaces(),
            disks: workload::host_disks(),
        }
    }

    /// One line naming the host.
    pub fn describe(&self) -> String {
        format!(
            "{} | host kernel {} | {} | {} CPU(s) | load {}",
            if self.pvm {
                "PVM host: KVM without hardware virtualization (guest kernel code is emulated, \
                 ~1000x slower than on hardware KVM)"
            } else {
                "hardware KVM"
            },
            self.kernel,
            self.cpu,
            self.cpus,
            self.loadavg
        )
    }
}

/// Whether the ELF file at `path` is statically linked (no `PT_INTERP` program header).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phent), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let o = phoff + i * usize::from(phent);
        data.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != 3)
    })
}

/// Finds the host's static busybox.
fn find_busybox() -> Result<PathBuf, CompareError> {
    let candidates = ["/bin/busybox", "/usr/bin/busybox", "/usr/sbin/busybox"];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| is_static_elf(p))
        .ok_or_else(|| CompareError::NoBusybox(candidates.join(", ")))
}

/// Whether `prog` is an executable in `PATH`.
pub fn in_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The scratch directory, the bundle and what every row needs.
#[derive(Debug)]
struct Bench {
    scratch: PathBuf,
    rootfs: PathBuf,
    canary: PathBuf,
    host_work: PathBuf,
    ember: PathBuf,
    host: HostFacts,
    runtime: Option<String>,
    opts: CompareOptions,
}

impl Bench {
    fn prepare(opts: &CompareOptions, notes: &mut Vec<String>) -> Result<Self, CompareError> {
        let pid = std::process::id();
        let scratch = std::env::temp_dir().join(format!("ember-compare-{pid}"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CompareError::Prepare { path, source }
        };
        let _ = std::fs::remove_dir_all(&scratch);
        let rootfs = scratch.join("rootfs");
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "proc", "dev", "sys", "tmp", "root",
        ] {
            std::fs::create_dir_all(rootfs.join(d)).map_err(io(&rootfs.join(d)))?;
        }
        let busybox = find_busybox()?;
        std::fs::copy(&busybox, rootfs.join("bin/busybox")).map_err(io(&rootfs))?;
        let list = Command::new(&busybox)
            .arg("--list-full")
            .output()
            .map_err(io(&busybox))?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let applet = applet.trim();
            if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
                continue;
            }
            let _ = std::os::unix::fs::symlink("/bin/busybox", rootfs.join(applet));
        }
        let scripts = rootfs.join(workload::SCRIPT_DIR.trim_start_matches('/'));
        std::fs::create_dir_all(&scripts).map_err(io(&scripts))?;
        std::fs::write(scripts.join("work.sh"), workload::WORKLOAD).map_err(io(&scripts))?;
        std::fs::write(scripts.join("probe.sh"), workload::PROBE).map_err(io(&scripts))?;
        let canary = scratch.join("host-canary");
        std::fs::write(&canary, "a host file outside every row's root\n").map_err(io(&canary))?;
        // The host row's $WORK: tmpfs, like every other row's /tmp.
        let shm = Path::new("/dev/shm");
        let host_work = if shm.is_dir() {
            shm.join(format!("ember-compare-{pid}"))
        } else {
            scratch.join("work")
        };
        std::fs::create_dir_all(&host_work).map_err(io(&host_work))?;
        let ember = match &opts.ember_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?,
        };
        notes.push(format!(
            "bundle: {} (static busybox from {}, {} applet links) as every row's root",
            rootfs.display(),
            busybox.display(),
            String::from_utf8_lossy(&list.stdout).lines().count()
        ));
        Ok(Self {
            scratch,
            rootfs,
            canary,
            host_work,
            ember,
            host: HostFacts::detect(),
            runtime: None,
            opts: opts.clone(),
        })
    }

    fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
        let _ = std::fs::remove_dir_all(&self.host_work);
    }

    /// The environment of a workload (`work`: its $WORK).
    fn env(&self, work: &str, fault: bool) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), "/root".into()),
            ("WORK".into(), work.into()),
            ("EMBER_COMPARE_PID".into(), std::process::id().to_string()),
            (
                "EMBER_COMPARE_CANARY".into(),
                self.canary.display().to_string(),
            ),
            ("EMBER_COMPARE_DISKS".into(), self.host.disks.join(" ")),
            ("EMBER_COMPARE_FAULT".into(), u8::from(fault).to_string()),
        ]
    }

    /// The argv inside a row's root: the user's command, or `sh SCRIPT`.
    fn argv(&self, script: Option<&str>) -> Vec<String> {
        match script {
            Some(s) => vec!["sh".into(), format!("{}/{s}", workload::SCRIPT_DIR)],
            None => self.opts.command.clone(),
        }
    }

    /// The command of one run of `kind`; `tag` names its files.
    fn command(
        &self,
        kind: RowKind,
        script: Option<&str>,
        fault: bool,
        tag: &str,
    ) -> Result<Command, String> {
        let argv = self.argv(script);
        match kind {
            RowKind::Host => {
                let r = &self.rootfs;
                let mut argv = argv;
                if script.is_some() {
                    argv[0] = r.join("bin/sh").display().to_string();
                    argv[1] = format!("{}{}", r.display(), argv[1]);
                }
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]).env_clear().env(
                    "PATH",
                    ["bin", "sbin", "usr/bin", "usr/sbin"]
                        .map(|d| r.join(d).display().to_string())
                        .join(":"),
                );
                cmd.envs(self.env(&self.host_work.display().to_string(), false));
                cmd.current_dir(&self.host_work);
                Ok(cmd)
            }
            RowKind::Sandbox => {
                let bwrap = in_path("bwrap").ok_or(
                    "bubblewrap is not installed (apt-get install bubblewrap; \
                     scripts/test-all.sh does)",
                )?;
                let mut cmd = Command::new(bwrap);
                cmd.args(["--unshare-all", "--die-with-parent", "--new-session"])
                    .arg("--ro-bind")
                    .arg(&self.rootfs)
                    .args(["/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
                    .args(["--chdir", "/", "--clearenv", "--setenv", "PATH"])
                    .arg("/bin:/sbin:/usr/bin:/usr/sbin");
                for (k, v) in self.env("/tmp", false) {
                    cmd.args(["--setenv", &k, &v]);
                }
                cmd.arg("--").args(argv);
                Ok(cmd)
            }
            RowKind::Container => {
                let rt = self
                    .runtime
                    .as_deref()
                    .ok_or("no working container runtime (see the notes)")?;
                let bundle = self.scratch.join(format!("bundle-{tag}"));
                write_bundle(rt, &bundle, &self.rootfs, &argv, &self.env("/tmp", false))?;
                let id = format!("ember-compare-{}-{tag}", std::process::id());
                let mut cmd = Command::new(rt);
                cmd.arg("run").arg("--bundle").arg(&bundle).arg(id);
                Ok(cmd)
            }
            RowKind::EmberWarm | RowKind::EmberCold => {
                let mut cmd = Command::new(&self.ember);
                cmd.arg("exec");
                if kind == RowKind::EmberCold {
                    cmd.arg("--cold");
                }
                if let Some(k) = &self.opts.vm_kernel {
                    cmd.arg("--kernel").arg(k);
                }
                let t = self.opts.timeout.as_secs_f64();
                cmd.arg("--timeout").arg(format!("{t}"));
                cmd.arg("--file").arg(format!(
                    "{}{}:/",
                    self.rootfs.display(),
                    workload::SCRIPT_DIR
                ));
                for (k, v) in self.env("/tmp", fault) {
                    cmd.arg("--env").arg(format!("{k}={v}"));
                }
                cmd.arg("--json")
                    .arg(self.scratch.join(format!("{tag}.json")));
                cmd.arg("--").args(argv);
                Ok(cmd)
            }
        }
    }

    fn run(
        &self,
        kind: RowKind,
        script: Option<&str>,
        fault: bool,
        tag: &str,
    ) -> Result<(RunResult, Option<crate::bench::json::Json>), String> {
        let cmd = self.command(kind, script, fault, tag)?;
        let json_path = self.scratch.join(format!("{tag}.json"));
        let _ = std::fs::remove_file(&json_path);
        let res = measure::run_measured(cmd, &self.scratch.join(format!("{tag}.err")), {
            self.opts.timeout + Duration::from_secs(5)
        })
        .map_err(|e| format!("cannot run: {e}"))?;
        if kind == RowKind::Container {
            if let Some(rt) = &self.runtime {
                let id = format!("ember-compare-{}-{tag}", std::process::id());
                let _ = Command::new(rt)
                    .args(["delete", "-f", &id])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        let json = std::fs::read_to_string(&json_path)
            .ok()
            .and_then(|t| crate::bench::json::Json::parse(&t).ok());
        Ok((res, json))
    }
}

/// Writes an OCI bundle for `rt`: its default spec (`RT spec`), made non-interactive, with
/// `rootfs` as a read-only root, a tmpfs on /tmp, and `argv` and `env` as the process.
fn write_bundle(
    rt: &str,
    bundle: &Path,
    rootfs: &Path,
    argv: &[String],
    env: &[(String, String)],
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(bundle);
    std::fs::create_dir_all(bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let out = Command::new(rt)
        .args(["spec", "--bundle"])
        .arg(bundle)
        .output()
        .map_err(|e| format!("cannot run `{rt} spec`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{rt} spec` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut spec: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("`{rt} spec` wrote bad JSON: {e}"))?;
    let mut envs = vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".to_string()];
    envs.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = argv.into();
    spec["process"]["env"] = envs.into();
    spec["process"]["cwd"] = "/".into();
    spec["root"] = serde_json::json!({"path": rootfs.display().to_string(), "readonly": true});
    spec["hostname"] = "ember-compare".into();
    if let Some(m) = spec["mounts"].as_array_mut() {
        m.push(serde_json::json!({
            "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777"]
        }));
    }
    std::fs::write(&path, spec.to_string()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Picks the container runtime: the one asked for, else the first of crun and runc that
/// runs `true` in a container (notes say why one was passed over).
fn pick_runtime(b: &mut Bench, notes: &mut Vec<String>) -> Result<(), String> {
    let candidates: Vec<String> = match &b.opts.runtime {
        Some(r) => vec![r.clone()],
        None => vec!["crun".into(), "runc".into()],
    };
    if !nix_is_root() {
        return Err("containers need root here (rootful runc/crun)".into());
    }
    let mut why = Vec::new();
    for rt in candidates {
        if in_path(&rt).is_none() {
            why.push(format!("{rt}: not installed"));
            continue;
        }
        b.runtime = Some(rt.clone());
        let saved = std::mem::replace(&mut b.opts.command, vec!["true".into()]);
        let r = b.run(RowKind::Container, None, false, "runtime-check");
        b.opts.command = saved;
        match r {
            Ok((res, _)) if res.code == Some(0) => {
                if !why.is_empty() {
                    notes.push(format!("container runtime {rt} ({})", why.join("; ")));
                }
                return Ok(());
            }
            Ok((res, _)) => why.push(format!("{rt} failed: {}", res.stderr_tail)),
            Err(e) => why.push(format!("{rt}: {e}")),
        }
        b.runtime = None;
    }
    Err(format!(
        "no container runtime works: {} (apt-get install runc crun; scripts/test-all.sh does)",
        why.join("; ")
    ))
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The label of a row.
fn label(kind: RowKind, b: &Bench) -> String {
    match kind {
        RowKind::Host => "host process".into(),
        RowKind::Sandbox => "bwrap".into(),
        RowKind::Container => b.runtime.clone().unwrap_or_else(|| "container".into()),
        RowKind::EmberWarm => "ember exec (warm)".into(),
        RowKind::EmberCold => "ember exec --cold".into(),
    }
}

/// What went wrong in a run, if anything.
fn run_error(
    kind: RowKind,
    res: &RunResult,
    marks: &Marks,
    default_workload: bool,
) -> Option<String> {
    if res.timed_out {
        return Some("timed out".into());
    }
    if res.code != Some(0) {
        return Some(format!(
            "exit status {:?}{}{}",
            res.code,
            if res.stderr_tail.is_empty() { "" } else { ": " },
            res.stderr_tail
        ));
    }
    if default_workload && !marks.complete {
        return Some(format!(
            "the workload's end marker never came ({} lines)",
            res.lines.len()
        ));
    }
    let _ = kind;
    None
}

/// Runs the comparison, calling `progress` with one line per finished run.
pub fn run(
    opts: &CompareOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Comparison, CompareError> {
    if opts.runs == 0 {
        return Err(CompareError::Usage("--runs must be at least 1".into()));
    }
    let started = std::time::Instant::now();
    let mut notes = Vec::new();
    let mut b = Bench::prepare(opts, &mut notes)?;
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let mut rows: Vec<Row> = Vec::new();
    for &kind in &opts.rows {
        let mut skipped = None;
        if kind == RowKind::Container {
            if let Err(e) = pick_runtime(&mut b, &mut notes) {
                skipped = Some(e);
            }
        }
        if kind == RowKind::Sandbox && in_path("bwrap").is_none() {
            skipped = Some(
                "bubblewrap is not installed (apt-get install bubblewrap; scripts/test-all.sh \
                 does)"
                    .into(),
            );
        }
        rows.push(Row {
            kind,
            label: label(kind, &b),
            skipped,
            samples: Vec::new(),
            probe: None,
            fault: None,
        });
    }
    let default_workload = opts.command.is_empty();
    let script = default_workload.then_some("work.sh");

    // The warm row's snapshot: one exec first (not measured) boots the guest and saves it.
    if let Some(row) = rows
        .iter_mut()
        .find(|r| r.kind == RowKind::EmberWarm && r.skipped.is_none())
    {
        progress("ember-warm: preparing the snapshot (the first warm exec boots the guest)");
        match b.run(RowKind::EmberWarm, Some("work.sh"), false, "warm-prime") {
            Ok((res, json)) => {
                let path = json
                    .as_ref()
                    .and_then(|j| j.get("path")?.as_str().map(str::to_string));
                progress(&format!(
                    "ember-warm: prepared in {:.1} s ({})",
                    res.wall_ms / 1e3,
                    path.as_deref().unwrap_or("?")
                ));
                if res.code != Some(0) {
                    row.skipped = Some(format!(
                        "the first warm exec failed: exit status {:?}: {}",
                        res.code, res.stderr_tail
                    ));
                }
            }
            Err(e) => row.skipped = Some(e),
        }
    }

    for run in 1..=opts.runs {
        for row in rows.iter_mut().filter(|r| r.skipped.is_none()) {
            let tag = format!("{}-{run}", row.kind.name());
            let sample = match b.run(row.kind, script, false, &tag) {
                Ok((result, json)) => {
                    let marks = workload::parse_marks(&result.lines);
                    let error = run_error(row.kind, &result, &marks, default_workload);
                    let vm_path = json
                        .as_ref()
                        .and_then(|j| j.get("path")?.as_str().map(str::to_string));
                    Sample {
                        run,
                        result,
                        marks,
                        vm_path,
                        error,
                    }
                }
                Err(e) => Sample {
                    run,
                    result: RunResult::default(),
                    marks: Marks::default(),
                    vm_path: None,
                    error: Some(e),
                },
            };
            progress(&report::progress_line(row, &sample));
            row.samples.push(sample);
        }
    }

    if opts.probe {
        probe_rows(&b, &mut rows, &boot_id, progress, &mut notes);
    }
    if rows
        .iter()
        .any(|r| r.kind == RowKind::EmberWarm && r.skipped.is_none())
    {
        let booted = rows
            .iter()
            .filter(|r| r.kind == RowKind::EmberWarm)
            .flat_map(|r| &r.samples)
            .filter(|s| s.vm_path.as_deref().is_some_and(|p| p != "warm-restore"))
            .count();
        if booted > 0 {
            notes.push(format!(
                "{booted} ember-warm run(s) did not restore a snapshot (path in the JSON): \
                 the warm path needs the default guest"
            ));
        }
    }
    b.host = HostFacts::detect();
    let host = b.host.clone();
    b.cleanup();
    Ok(Comparison {
        opts: opts.clone(),
        rows,
        notes,
        host,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// The isolation probe: once per row (once for both VM rows: same guest, same isolation),
/// after the measured runs.
fn probe_rows(
    b: &Bench,
    rows: &mut [Row],
    boot_id: &str,
    progress: &mut dyn FnMut(&str),
    notes: &mut Vec<String>,
) {
    let mut vm_probe: Option<(ProbeFacts, String)> = None;
    for row in rows.iter_mut().filter(|r| r.skipped.is_none()) {
        if row.kind.is_vm() {
            if let Some((p, f)) = &vm_probe {
                row.probe = Some(p.clone());
                row.fault = Some(f.clone());
                continue;
            }
            if b.opts.vm_kernel.is_some() {
                row.fault = Some("not run: --vm-kernel guests run no shell".into());
                continue;
            }
        }
        let tag = format!("probe-{}", row.kind.name());
        match b.run(row.kind, Some("probe.sh"), row.kind.is_vm(), &tag) {
            Ok((res, json)) => {
                let text: Vec<&str> = res.lines.iter().map(|l| l.text.as_str()).collect();
                let facts = workload::parse_probe(&text.join("\n"));
                let fault = if row.kind.is_vm() {
                    let reason = json
                        .as_ref()
                        .and_then(|j| j.get("reason")?.as_str().map(str::to_string))
                        .unwrap_or_else(|| "unknown".into());
                    let same_host = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                        .is_ok_and(|id| id == boot_id);
                    fault_verdict(facts.fault.as_deref(), res.code, &reason, same_host)
                } else {
                    format!(
                        "skipped: the kernel here is the host's, so a kernel fault would crash \
                         the host; /proc/sysrq-trigger {} (access(2), nothing written)",
                        match facts.sysrq_writable {
                            Some(true) => "is WRITABLE",
                            Some(false) => "is not writable",
                            None => "was not checked",
                        }
                    )
                };
                progress(&format!("probe {}: {fault}", row.kind.name()));
                if row.kind.is_vm() {
                    vm_probe = Some((facts.clone(), fault.clone()));
                }
                row.probe = Some(facts);
                row.fault = Some(fault);
            }
            Err(e) => notes.push(format!("probe {}: {e}", row.kind.name())),
        }
    }
}

/// What the VM's kernel-fault step came to: `fault` is the probe's last `fault=` word, `code`
/// ember's exit status, `reason` its `--json` reason, `same_host` whether the host's boot id
/// is unchanged.
pub fn fault_verdict(
    fault: Option<&str>,
    code: Option<i32>,
    reason: &str,
    same_host: bool,
) -> String {
    match fault {
        Some("attempted") if code == Some(125) && same_host => format!(
            "contained: the guest kernel died ({reason}), ember exited 125, the host kernel \
             runs on (same boot id)"
        ),
        Some("attempted") => {
            format!("unclear: ember exited {code:?} ({reason}) after the fault was attempted")
        }
        Some("survived") => "not triggered: the guest kernel survived the overwrite".into(),
        Some("unavailable") => {
            "not run: the guest kernel shows no /proc/iomem or kallsyms addresses".into()
        }
        _ => format!("not run (ember exited {code:?}, {reason})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_parse() {
        assert_eq!(
            parse_rows("host,container, ember-cold").unwrap(),
            vec![RowKind::Host, RowKind::Container, RowKind::EmberCold]
        );
        let e = parse_rows("host,vm").unwrap_err().to_string();
        assert!(
            e.contains("unknown row \"vm\"") && e.contains("ember-warm"),
            "{e}"
        );
        assert!(parse_rows("host,host")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(parse_rows(",").is_err());
        assert!(RowKind::EmberWarm.is_vm() && !RowKind::Container.is_vm());
    }

    #[test]
    fn static_elf_detection() {
        let dir = std::env::temp_dir().join(format!("ember-compare-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A 64-bit ELF header with one PT_LOAD, then the same with a PT_INTERP.
        let elf = |ptype: u32| {
            let mut f = vec![0u8; 64 + 56];
            f[..4].copy_from_slice(b"\x7fELF");
            f[4] = 2;
            f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
            f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
            f[64..68].copy_from_slice(&ptype.to_le_bytes());
            f
        };
        std::fs::write(dir.join("static"), elf(1)).unwrap();
        std::fs::write(dir.join("dynamic"), elf(3)).unwrap();
        std::fs::write(dir.join("text"), "#!/bin/sh\n").unwrap();
        assert!(is_static_elf(&dir.join("static")));
        assert!(!is_static_elf(&dir.join("dynamic")));
        assert!(!is_static_elf(&dir.join("text")));
        assert!(!is_static_elf(&dir.join("missing")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fault_verdicts() {
        let v = fault_verdict(Some("attempted"), Some(125), "kernel-panic", true);
        assert!(
            v.starts_with("contained") && v.contains("kernel-panic"),
            "{v}"
        );
        assert!(
            fault_verdict(Some("attempted"), Some(0), "command-exited", true)
                .starts_with("unclear")
        );
        assert!(fault_verdict(Some("attempted"), Some(125), "x", false).starts_with("unclear"));
        assert!(fault_verdict(Some("survived"), Some(0), "x", true).starts_with("not triggered"));
        assert!(fault_verdict(None, None, "x", true).starts_with("not run"));
    }
}
