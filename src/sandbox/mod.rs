// SPDX-License-Identifier: Apache-2.0
//! The sandbox ember puts itself in once a VM is set up (see docs/security.md): a seccomp
//! filter per thread ([`seccomp`]), Landlock rules on the file system ([`landlock`]) and,
//! with `--uid`/`--gid`, a drop of root's privileges.
//!
//! How it is used:
//! 1. the command (`ember run`, `exec`, `restore`) calls [`install`] with a
//!    [`SandboxConfig`] before it builds the VM: the filters are compiled, the SIGSYS
//!    handler is installed and the Landlock ruleset is created (nothing is restricted yet);
//! 2. every thread that lives past the set-up calls [`enter`] with its [`ThreadKind`] as
//!    the first thing it does (a vCPU thread before its first `KVM_RUN`, the event loop's
//!    thread when the run loop starts): its Landlock domain, then its seccomp filter;
//! 3. the builder calls [`drop_privileges`] once `/dev/kvm`, the TAPs and the images are
//!    open, before the vCPUs start.
//!
//! Without [`install`] (library users, unit tests) [`enter`] and [`drop_privileges`] do
//! nothing.
//!
//! A thread kind is one variant of [`ThreadKind`] (with its name in [`ThreadKind::name`] and
//! [`ThreadKind::ALL`]) and one arm in `allowed_syscalls` in [`seccomp`]: a new kind of
//! thread adds them (the compiler points at the match arms) and calls [`enter`] first thing
//! on its thread. A thread spawned by a thread that
//! has entered already inherits its parent's filter and Landlock domain (Linux stacks them):
//! it may call [`enter`] for a narrower filter of its own, when the parent's filter allows
//! `seccomp` and `prctl` (the VMM thread's does).

pub mod landlock;
pub mod seccomp;

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

pub use self::landlock::{PathAccess, PathRule};

/// What a thread of ember does, which decides its seccomp allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the event loop (virtio devices, vsock, TAPs,
    /// signals, the SIGUSR1 pause and the snapshots), and whatever the command does after
    /// the run (reports, the snapshot cache).
    Vmm,
    /// A vCPU thread (`ember-vcpuN`): `KVM_RUN` and the port-I/O and MMIO handlers.
    Vcpu,
    /// A console writer (`ember-console`): guest output to stdout or stderr.
    Console,
    /// The event-loop watchdog (`ember-watchdog`), which may end the process.
    Watchdog,
    /// The thread of warm `ember exec` that hands the command to the guest over vsock
    /// (`exec-job`).
    ExecJob,
    /// The API server (`api`, `ember run --api-sock`) once the VM runs, and the metrics
    /// writer (`metrics`): their sockets, the log and metrics files.
    Api,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Console,
        ThreadKind::Watchdog,
        ThreadKind::ExecJob,
        ThreadKind::Api,
    ];

    /// The kind's name (in messages, and for `--sandbox-selftest`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Console => "console",
            ThreadKind::Watchdog => "watchdog",
            ThreadKind::ExecJob => "exec-job",
            ThreadKind::Api => "api",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// What the seccomp filters do with a system call that is not on a thread's allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// No filters.
    Off,
    /// The call is allowed, and the kernel logs it (`SECCOMP_RET_LOG`: an audit record, in
    /// the kernel log when no audit daemon runs; see docs/security.md).
    Log,
    /// The call is stopped: ember's SIGSYS handler names the thread and the call on stderr
    /// and the process dies of SIGSYS.
    #[default]
    Kill,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "log" => Ok(Self::Log),
            "kill" => Ok(Self::Kill),
            _ => Err(format!("{s:?} is not a seccomp mode: use off, log or kill")),
        }
    }
}

/// A hidden test hook (`--sandbox-selftest`): after set-up, make one thread do what its
/// sandbox must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTest {
    /// The thread of this kind makes a system call none of ember's threads may make
    /// ([`seccomp::SELFTEST_SYSCALL`]) right after its filter is installed.
    Seccomp(ThreadKind),
    /// The VMM thread tries to open a file outside the Landlock rules (the path in
    /// `EMBER_SANDBOX_SELFTEST_PATH`, default /etc/hostname) when the run loop starts, and
    /// logs what happened.
    Landlock,
}

impl std::str::FromStr for SelfTest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "landlock" {
            return Ok(Self::Landlock);
        }
        ThreadKind::ALL
            .iter()
            .find(|k| k.name() == s)
            .map(|k| Self::Seccomp(*k))
            .ok_or_else(|| {
                let names: Vec<_> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "{s:?}: use landlock or a thread kind ({})",
                    names.join(", ")
                )
            })
    }
}

/// The environment variable naming the file the Landlock self-test tries to open.
pub const SELFTEST_PATH_ENV: &str = "EMBER_SANDBOX_SELFTEST_PATH";

/// What [`install`] sets up.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// What the seccomp filters do with a call off the allow-list.
    pub seccomp: SeccompMode,
    /// Restrict the file system with Landlock (where the kernel has it).
    pub landlock: bool,
    /// The paths the VM may still use after set-up (Landlock); more can be added with
    /// [`allow_path`] until the threads enter.
    pub paths: Vec<PathRule>,
    /// Drop to this user (and group) once the VM is set up.
    pub uid: Option<libc::uid_t>,
    /// The group for `uid`.
    pub gid: Option<libc::gid_t>,
    /// The hidden self-test.
    pub selftest: Option<SelfTest>,
}

/// Errors while setting up the sandbox (before the VM is built).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A seccomp filter could not be compiled.
    #[error("cannot compile the seccomp filter of the {0} thread (a bug in ember)")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler for seccomp")]
    Handler(#[source] std::io::Error),
    /// The kernel has no seccomp filters.
    #[error(
        "this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER): run with --seccomp off \
         to go without them"
    )]
    NoSeccomp(#[source] std::io::Error),
    /// The Landlock ruleset could not be set up.
    #[error("cannot set up the Landlock rules ({0}): --no-landlock goes without them")]
    Landlock(String),
    /// --uid/--gid without root.
    #[error(
        "--uid/--gid drop root's privileges after set-up, but ember runs as uid {0}: start it \
         as root (e.g. with sudo), or leave --uid and --gid out"
    )]
    NotRoot(libc::uid_t),
    /// --uid 0 or --gid 0.
    #[error("--uid/--gid: {0} 0 is root: give an unprivileged user and group")]
    RootTarget(&'static str),
    /// Dropping the privileges failed.
    #[error("cannot drop privileges to uid {uid}, gid {gid}: {what}")]
    Drop {
        /// The user.
        uid: libc::uid_t,
        /// The group.
        gid: libc::gid_t,
        /// What failed.
        what: String,
    },
    /// [`install`] was called twice.
    #[error("the sandbox is set up already")]
    Twice,
}

/// The installed sandbox.
struct Sandbox {
    seccomp: SeccompMode,
    /// One compiled filter per [`ThreadKind`] (in [`ThreadKind::ALL`] order).
    filters: Vec<seccompiler::BpfProgram>,
    /// The Landlock ruleset, while rules may still be added.
    landlock: Mutex<Option<landlock::Rules>>,
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
    selftest: Option<SelfTest>,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

thread_local! {
    /// This thread's name and kind, for the SIGSYS handler (plain data: reading it in a
    /// signal handler touches nothing but thread-local memory).
    static THREAD: Cell<ThreadLabel> = const { Cell::new(ThreadLabel::NONE) };
}

/// A thread's name (up to 15 bytes, as Linux keeps it) and kind name.
#[derive(Clone, Copy)]
struct ThreadLabel {
    name: [u8; 16],
    kind: &'static str,
}

impl ThreadLabel {
    const NONE: Self = Self {
        name: [0; 16],
        kind: "",
    };
}

/// Sets up the sandbox (see the module documentation); call it once, on the main thread,
/// before the VM is built.
pub fn install(cfg: SandboxConfig) -> Result<(), SandboxError> {
    if SANDBOX.get().is_some() {
        return Err(SandboxError::Twice);
    }
    if cfg.uid.is_some() || cfg.gid.is_some() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(SandboxError::NotRoot(euid));
        }
        if cfg.uid == Some(0) {
            return Err(SandboxError::RootTarget("uid"));
        }
        if cfg.gid == Some(0) {
            return Err(SandboxError::RootTarget("gid"));
        }
    }
    let mut filters = Vec::new();
    if cfg.seccomp != SeccompMode::Off {
        seccomp::check_kernel().map_err(SandboxError::NoSeccomp)?;
        for kind in ThreadKind::ALL {
            filters.push(
                seccomp::compile(kind, cfg.seccomp, cfg.uid, cfg.gid)
                    .map_err(|e| SandboxError::Compile(kind.name(), e))?,
            );
        }
        seccomp::install_sigsys_handler().map_err(SandboxError::Handler)?;
    }
    let rules = if cfg.landlock {
        landlock::Rules::new(&cfg.paths).map_err(SandboxError::Landlock)?
    } else {
        None
    };
    let sandbox = Sandbox {
        seccomp: cfg.seccomp,
        filters,
        landlock: Mutex::new(rules),
        uid: cfg.uid,
        gid: cfg.gid,
        selftest: cfg.selftest,
    };
    SANDBOX.set(sandbox).map_err(|_| SandboxError::Twice)?;
    if cfg.seccomp == SeccompMode::Log {
        log::info!(
            "--seccomp log: system calls off ember's allow-lists are allowed and logged by the \
             kernel (see dmesg or the audit log: type=1326)"
        );
    }
    Ok(())
}

/// Whether [`install`] has set up a sandbox in this process.
pub fn installed() -> bool {
    SANDBOX.get().is_some()
}

/// Lets the threads use `path` after set-up too (a directory ember creates while it runs,
/// such as warm exec's private socket directory). Call it before the threads that need it
/// [`enter`]; a thread that entered already keeps its rules.
pub fn allow_path(rule: PathRule) {
    let Some(sb) = SANDBOX.get() else {
        return;
    };
    let mut rules = crate::devices::bus::lock(&sb.landlock);
    if let Some(r) = rules.as_mut() {
        if let Err(e) = r.add(&rule) {
            log::warn!("Landlock: cannot allow {}: {e}", rule.path.display());
        }
    }
}

/// Restricts the calling thread as a thread of `kind`: its Landlock domain, then its seccomp
/// filter (and, with `--sandbox-selftest` naming this kind, the forbidden call). Call it
/// first thing on the thread. Does nothing without [`install`]. When the filter cannot be
/// installed the process ends: a thread must not run unfiltered when filters were asked for.
pub fn enter(kind: ThreadKind) {
    let Some(sb) = SANDBOX.get() else {
        return;
    };
    label_thread(kind);
    if let Some(rules) = crate::devices::bus::lock(&sb.landlock).as_ref() {
        if let Err(e) = rules.restrict_thread() {
            fail(kind, &format!("cannot apply the Landlock rules: {e}"));
        }
    }
    if sb.seccomp != SeccompMode::Off {
        if let Err(e) = seccompiler::apply_filter(&sb.filters[kind.index()]) {
            fail(kind, &format!("cannot install its seccomp filter: {e}"));
        }
    }
    match sb.selftest {
        Some(SelfTest::Seccomp(k)) if k == kind => seccomp::selftest_call(),
        Some(SelfTest::Landlock) if kind == ThreadKind::Vmm => landlock::selftest_open(),
        _ => {}
    }
}

/// Ends the process because `kind`'s thread could not be sandboxed.
fn fail(kind: ThreadKind, what: &str) -> ! {
    log::error!(
        "sandbox: the {} thread {what}; ending ember (--seccomp off and --no-landlock go \
         without the sandbox)",
        kind.name()
    );
    crate::terminal::restore();
    std::process::exit(i32::from(crate::exit::code::VMM_ERROR));
}

/// Records this thread's name and `kind` for the SIGSYS handler.
fn label_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let n = current.name().unwrap_or("main").as_bytes();
    let len = n.len().min(15);
    name[..len].copy_from_slice(&n[..len]);
    THREAD.with(|t| {
        t.set(ThreadLabel {
            name,
            kind: kind.name(),
        });
    });
}

/// Drops root's privileges to `--uid`/`--gid` (every thread: glibc applies set*id to the
/// whole process), and checks that they cannot be taken back. Call it once the VM is set up
/// and before its vCPUs start. Does nothing without `--uid`.
pub fn drop_privileges() -> Result<(), SandboxError> {
    let Some(sb) = SANDBOX.get() else {
        return Ok(());
    };
    let (Some(uid), Some(gid)) = (sb.uid, sb.gid) else {
        return Ok(());
    };
    let err = |what: String| SandboxError::Drop { uid, gid, what };
    let os = || std::io::Error::last_os_error();
    // SAFETY: setgroups with a count of 0 reads no list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(err(format!("setgroups: {}", os())));
    }
    // SAFETY: setresgid and setresuid take plain integers.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(err(format!("setresgid: {}", os())));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(err(format!("setresuid: {}", os())));
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid pointers to uid_t.
    if unsafe { libc::getresuid(&mut r, &mut e, &mut s) } != 0 || (r, e, s) != (uid, uid, uid) {
        return Err(err(format!("getresuid says {r}/{e}/{s}")));
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid pointers to gid_t.
    if unsafe { libc::getresgid(&mut r, &mut e, &mut s) } != 0 || (r, e, s) != (gid, gid, gid) {
        return Err(err(format!("getresgid says {r}/{e}/{s}")));
    }
    // The raw call, which only this thread makes (glibc's wrapper would have every thread
    // repeat it, and the filtered ones may not). It must fail now.
    // SAFETY: setresuid takes plain integers.
    if unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) } == 0 {
        return Err(err(
            "root could be taken back (setresuid(0) succeeded)".into()
        ));
    }
    log::info!("dropped root's privileges: running as uid {uid}, gid {gid}");
    Ok(())
}

/// The paths a VM built from `config` may use after set-up: its kernel (read for symbols in
/// error reports) and initrd, read-only. The caller adds what its command writes.
pub fn vm_paths(config: &crate::config::VmConfig) -> Vec<PathRule> {
    let mut paths = vec![PathRule::new(&config.kernel, PathAccess::Read)];
    if let Some(i) = &config.initrd {
        paths.push(PathRule::new(i, PathAccess::Read));
    }
    // The vsock device removes its socket when the VM ends.
    if let Some(v) = &config.vsock {
        paths.push(output_file(&v.uds));
    }
    paths
}

/// A directory ember writes into after set-up (a snapshot directory, the snapshot cache);
/// when it does not exist yet, its nearest existing ancestor (ember creates it).
pub fn writable_dir(dir: &std::path::Path) -> PathRule {
    let mut d = dir.to_path_buf();
    while !d.exists() {
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p.to_path_buf(),
            _ => {
                d = PathBuf::from(".");
                break;
            }
        }
    }
    PathRule::new(d, PathAccess::ReadWrite)
}

/// A file ember writes after set-up (`--json`, reports): its directory, for files created
/// in it (ember writes such files under a temporary name, then renames them).
pub fn output_file(file: &std::path::Path) -> PathRule {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    writable_dir(&dir)
}
