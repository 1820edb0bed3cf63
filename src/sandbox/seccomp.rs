// SPDX-License-Identifier: Apache-2.0
//! The seccomp allow-lists, one per [`ThreadKind`], compiled with `seccompiler`, and the
//! SIGSYS handler that reports a denied call.
//!
//! The lists were measured, not guessed: every test that boots a guest was run under
//! `strace -f` (docs/security.md says how to do it again) and each thread got the calls it
//! made after it entered the sandbox. `ioctl` is filtered on its request number: only the
//! KVM, TAP and terminal requests ember issues.
//!
//! A call off the list: with `--seccomp kill` the filter returns `SECCOMP_RET_TRAP`, the
//! kernel sends SIGSYS, and [`on_sigsys`] writes one line naming the thread and the call
//! (with `write(2)` only), puts SIGSYS back to its default action and raises it again: the
//! process dies of SIGSYS, which its parent sees. With `--seccomp log` the filter returns
//! `SECCOMP_RET_LOG`: the call goes through and the kernel logs it (audit record type
//! 1326, "type=1326 ... comm=THREAD ... syscall=NR").

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{SeccompMode, ThreadKind, THREAD};

/// The call `--sandbox-selftest THREAD` makes: `execve`, which no thread of ember may make
/// after set-up (and which would do nothing here anyway: the path does not exist).
pub const SELFTEST_SYSCALL: i64 = libc::SYS_execve;

/// One system call of an allow-list: its number, its name (for the SIGSYS message), and
/// the argument conditions it is allowed with (any of them; none: always).
struct Allowed {
    nr: i64,
    rules: Vec<SeccompRule>,
}

macro_rules! sys {
    ($name:ident) => {
        (libc::$name, stringify!($name))
    };
}

/// Names of the system calls ember's threads make, and of the ones a compromised thread
/// would try first, for the SIGSYS message ("syscall 59 (execve)").
static NAMES: &[(i64, &str)] = &[
    sys!(SYS_read),
    sys!(SYS_write),
    sys!(SYS_open),
    sys!(SYS_close),
    sys!(SYS_stat),
    sys!(SYS_fstat),
    sys!(SYS_lstat),
    sys!(SYS_poll),
    sys!(SYS_lseek),
    sys!(SYS_mmap),
    sys!(SYS_mprotect),
    sys!(SYS_munmap),
    sys!(SYS_brk),
    sys!(SYS_rt_sigaction),
    sys!(SYS_rt_sigprocmask),
    sys!(SYS_rt_sigreturn),
    sys!(SYS_ioctl),
    sys!(SYS_pread64),
    sys!(SYS_pwrite64),
    sys!(SYS_readv),
    sys!(SYS_writev),
    sys!(SYS_access),
    sys!(SYS_pipe),
    sys!(SYS_sched_yield),
    sys!(SYS_mremap),
    sys!(SYS_madvise),
    sys!(SYS_dup),
    sys!(SYS_dup2),
    sys!(SYS_nanosleep),
    sys!(SYS_getpid),
    sys!(SYS_sendfile),
    sys!(SYS_socket),
    sys!(SYS_connect),
    sys!(SYS_accept),
    sys!(SYS_sendto),
    sys!(SYS_recvfrom),
    sys!(SYS_sendmsg),
    sys!(SYS_recvmsg),
    sys!(SYS_shutdown),
    sys!(SYS_bind),
    sys!(SYS_listen),
    sys!(SYS_getsockname),
    sys!(SYS_getpeername),
    sys!(SYS_socketpair),
    sys!(SYS_setsockopt),
    sys!(SYS_getsockopt),
    sys!(SYS_clone),
    sys!(SYS_fork),
    sys!(SYS_vfork),
    sys!(SYS_execve),
    sys!(SYS_exit),
    sys!(SYS_wait4),
    sys!(SYS_kill),
    sys!(SYS_uname),
    sys!(SYS_fcntl),
    sys!(SYS_flock),
    sys!(SYS_fsync),
    sys!(SYS_fdatasync),
    sys!(SYS_truncate),
    sys!(SYS_ftruncate),
    sys!(SYS_getdents64),
    sys!(SYS_getcwd),
    sys!(SYS_chdir),
    sys!(SYS_rename),
    sys!(SYS_mkdir),
    sys!(SYS_rmdir),
    sys!(SYS_link),
    sys!(SYS_unlink),
    sys!(SYS_symlink),
    sys!(SYS_readlink),
    sys!(SYS_chmod),
    sys!(SYS_fchmod),
    sys!(SYS_chown),
    sys!(SYS_fchown),
    sys!(SYS_umask),
    sys!(SYS_getrusage),
    sys!(SYS_sysinfo),
    sys!(SYS_ptrace),
    sys!(SYS_getuid),
    sys!(SYS_getgid),
    sys!(SYS_setuid),
    sys!(SYS_setgid),
    sys!(SYS_geteuid),
    sys!(SYS_getegid),
    sys!(SYS_getppid),
    sys!(SYS_setsid),
    sys!(SYS_setresuid),
    sys!(SYS_getresuid),
    sys!(SYS_setresgid),
    sys!(SYS_getresgid),
    sys!(SYS_setgroups),
    sys!(SYS_sigaltstack),
    sys!(SYS_personality),
    sys!(SYS_statfs),
    sys!(SYS_fstatfs),
    sys!(SYS_prctl),
    sys!(SYS_arch_prctl),
    sys!(SYS_chroot),
    sys!(SYS_mount),
    sys!(SYS_umount2),
    sys!(SYS_reboot),
    sys!(SYS_init_module),
    sys!(SYS_gettid),
    sys!(SYS_tkill),
    sys!(SYS_futex),
    sys!(SYS_sched_getaffinity),
    sys!(SYS_getdents64),
    sys!(SYS_set_tid_address),
    sys!(SYS_restart_syscall),
    sys!(SYS_timer_create),
    sys!(SYS_timer_settime),
    sys!(SYS_timer_delete),
    sys!(SYS_clock_gettime),
    sys!(SYS_clock_nanosleep),
    sys!(SYS_exit_group),
    sys!(SYS_epoll_wait),
    sys!(SYS_epoll_ctl),
    sys!(SYS_tgkill),
    sys!(SYS_openat),
    sys!(SYS_mkdirat),
    sys!(SYS_newfstatat),
    sys!(SYS_unlinkat),
    sys!(SYS_renameat),
    sys!(SYS_readlinkat),
    sys!(SYS_faccessat),
    sys!(SYS_ppoll),
    sys!(SYS_unshare),
    sys!(SYS_set_robust_list),
    sys!(SYS_splice),
    sys!(SYS_fallocate),
    sys!(SYS_timerfd_create),
    sys!(SYS_timerfd_settime),
    sys!(SYS_accept4),
    sys!(SYS_signalfd4),
    sys!(SYS_eventfd2),
    sys!(SYS_epoll_create1),
    sys!(SYS_dup3),
    sys!(SYS_pipe2),
    sys!(SYS_preadv),
    sys!(SYS_pwritev),
    sys!(SYS_prlimit64),
    sys!(SYS_syncfs),
    sys!(SYS_sendmmsg),
    sys!(SYS_setns),
    sys!(SYS_getrandom),
    sys!(SYS_memfd_create),
    sys!(SYS_bpf),
    sys!(SYS_execveat),
    sys!(SYS_statx),
    sys!(SYS_rseq),
    sys!(SYS_pidfd_open),
    sys!(SYS_clone3),
    sys!(SYS_openat2),
    sys!(SYS_pidfd_send_signal),
    sys!(SYS_process_vm_readv),
    sys!(SYS_process_vm_writev),
    sys!(SYS_io_uring_setup),
    sys!(SYS_seccomp),
    sys!(SYS_landlock_create_ruleset),
    sys!(SYS_landlock_add_rule),
    sys!(SYS_landlock_restrict_self),
    sys!(SYS_membarrier),
    sys!(SYS_mlock),
    sys!(SYS_munlock),
    sys!(SYS_msync),
    sys!(SYS_mincore),
    sys!(SYS_sched_setaffinity),
    sys!(SYS_getcpu),
];

/// The name of system call `nr`, when [`NAMES`] has it.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.strip_prefix("SYS_").unwrap_or(name))
}

/// `arg` (0-based) equals `value` (compared as 64 bits).
fn eq(arg: u8, value: u64) -> SeccompCondition {
    // Only fails for an argument index above 5.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
        .unwrap_or_else(|_| unreachable!("argument index {arg} is below 6"))
}

/// `arg` (0-based) equals `value` in its low 32 bits (an `int` or `unsigned int`
/// argument, such as ioctl's request, which the kernel takes as 32 bits).
fn eq32(arg: u8, value: u32) -> SeccompCondition {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(value),
    )
    .unwrap_or_else(|_| unreachable!("argument index {arg} is below 6"))
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    // Only fails for an empty condition list, which no caller passes.
    SeccompRule::new(conditions).unwrap_or_else(|_| unreachable!("a rule has conditions"))
}

/// Always allowed.
fn any(nr: i64) -> Allowed {
    Allowed {
        nr,
        rules: Vec::new(),
    }
}

/// Allowed when one of `rules` matches.
fn when(nr: i64, rules: Vec<SeccompRule>) -> Allowed {
    Allowed { nr, rules }
}

/// `ioctl` with one of `requests`.
fn ioctls(requests: &[u32]) -> Allowed {
    when(
        libc::SYS_ioctl,
        requests.iter().map(|r| rule(vec![eq32(1, *r)])).collect(),
    )
}

/// What every thread needs: memory (the allocator), futexes (locks, condition variables,
/// thread joins), time, signal returns, `write` (log lines; the SIGSYS handler's report),
/// the SIGSYS handler's re-raise, and the end of a thread or of the process.
fn common() -> Vec<Allowed> {
    [
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_write,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    .map(any)
    .collect()
}

/// glibc applies `setgroups`/`setresgid`/`setresuid` to every thread of the process (a
/// signal makes each thread repeat the call): a thread that is filtered before
/// [`drop_privileges`](super::drop_privileges) must be allowed exactly these calls.
fn privilege_drop(uid: Option<libc::uid_t>, gid: Option<libc::gid_t>) -> Vec<Allowed> {
    let (Some(uid), Some(gid)) = (uid, gid) else {
        return Vec::new();
    };
    let (uid, gid) = (u64::from(uid), u64::from(gid));
    vec![
        when(libc::SYS_setgroups, vec![rule(vec![eq(0, 0)])]),
        when(
            libc::SYS_setresgid,
            vec![rule(vec![eq(0, gid), eq(1, gid), eq(2, gid)])],
        ),
        when(
            libc::SYS_setresuid,
            vec![rule(vec![eq(0, uid), eq(1, uid), eq(2, uid)])],
        ),
    ]
}

/// Entering the sandbox on a thread spawned by one that entered already (a vCPU thread
/// started by a snapshot restore, warm exec's job thread): `prctl(PR_SET_NO_NEW_PRIVS)`,
/// `landlock_restrict_self` and `seccomp(SECCOMP_SET_MODE_FILTER)` only add restrictions.
fn enter_again() -> Vec<Allowed> {
    vec![
        when(
            libc::SYS_prctl,
            vec![rule(vec![eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)])],
        ),
        any(libc::SYS_landlock_restrict_self),
        when(
            libc::SYS_seccomp,
            vec![rule(vec![eq(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))])],
        ),
    ]
}

/// The calls a thread of `kind` may make (besides [`common`]).
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<Allowed> {
    let mut list = common();
    let any_of = |nrs: &[i64]| nrs.iter().copied().map(any).collect::<Vec<_>>();
    match kind {
        ThreadKind::Vmm => {
            list.extend(any_of(&[libc::SYS_read]));
        }
        ThreadKind::Vcpu => {
            list.extend(any_of(&[libc::SYS_read]));
        }
        ThreadKind::Console => {}
        ThreadKind::Watchdog => {
            list.extend(any_of(&[libc::SYS_read, libc::SYS_poll]));
        }
        ThreadKind::ExecJob => {
            list.extend(any_of(&[libc::SYS_read]));
        }
    }
    list
}

/// Merges the conditions of calls listed twice (a call allowed always stays so).
fn to_map(list: Vec<Allowed>) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for a in list {
        let entry = map.entry(a.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), a.rules.is_empty()) {
            (_, true) => *entry = None,
            (Some(rules), false) => rules.extend(a.rules),
            (None, false) => {}
        }
    }
    map.into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect()
}

/// The BPF program of `kind`'s filter.
pub(super) fn compile(
    kind: ThreadKind,
    mode: SeccompMode,
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut list = allowed_syscalls(kind);
    list.extend(privilege_drop(uid, gid));
    if matches!(kind, ThreadKind::Vmm | ThreadKind::Watchdog) {
        list.extend(enter_again());
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(
        to_map(list),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    filter.try_into()
}

/// Checks that the kernel has seccomp filters (`PR_GET_SECCOMP` answers).
pub(super) fn check_kernel() -> std::io::Result<()> {
    // SAFETY: PR_GET_SECCOMP takes no pointer and changes nothing.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the self-test's forbidden call.
pub(super) fn selftest_call() {
    let path = c"/nonexistent/ember-sandbox-selftest";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    log::debug!("sandbox self-test: calling execve");
    // SAFETY: execve with a NUL-terminated path and null-terminated argv and envp arrays;
    // the path does not exist, so it returns (when it is allowed at all).
    let r = unsafe {
        libc::syscall(
            SELFTEST_SYSCALL,
            path.as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    log::error!(
        "sandbox self-test: execve was not stopped (it returned {r}: {})",
        std::io::Error::last_os_error()
    );
}

/// Installs [`on_sigsys`] for SIGSYS.
pub(super) fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; all zeroes is a valid (empty) value of it.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t to fill.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: a valid sigaction; `on_sigsys` has the SA_SIGINFO signature and only makes
    // async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The SIGSYS part of `siginfo_t` on x86_64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// A line built in a fixed buffer (no allocation: this runs in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    fn num(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
        self
    }
}

/// The SIGSYS handler: one line on stderr naming the thread and the call, then SIGSYS
/// again with its default action, which ends the process (see the module documentation).
/// Only `write`, `rt_sigaction`, `getpid`, `gettid` and `tgkill`: every filter allows them.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGSYS its
    // union holds the _sigsys member that SigsysInfo lays out.
    let (code, nr) = unsafe {
        let si = &*info.cast::<SigsysInfo>();
        (si.code, si.syscall)
    };
    let label = THREAD.with(std::cell::Cell::get);
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"ember: seccomp: ");
    if label.kind.is_empty() {
        line.push(b"a thread");
    } else {
        let n = label.name.iter().position(|b| *b == 0).unwrap_or(16);
        line.push(b"the ")
            .push(label.kind.as_bytes())
            .push(b" thread ")
            .push(&label.name[..n]);
    }
    if code == SYS_SECCOMP {
        line.push(b" made a forbidden system call: ")
            .num(u64::try_from(nr).unwrap_or(0));
        if let Some(name) = syscall_name(i64::from(nr)) {
            line.push(b" (").push(name.as_bytes()).push(b")");
        }
    } else {
        line.push(b" got SIGSYS (not from seccomp)");
    }
    line.push(b"; ending ember with SIGSYS (see docs/security.md)\n");
    // SAFETY: write, sigaction, getpid, gettid and tgkill are async-signal-safe; the buffer
    // is valid for `len` bytes; a zeroed sigaction is SIG_DFL with no flags. The raised
    // SIGSYS is blocked until this handler returns, then ends the process.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        let dfl: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGSYS, &dfl, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::Log, SeccompMode::Kill] {
                let prog = compile(kind, mode, Some(1000), Some(1000)).unwrap();
                assert!(!prog.is_empty(), "{kind:?}");
            }
        }
    }

    #[test]
    fn no_thread_may_exec() {
        for kind in ThreadKind::ALL {
            let map = to_map(allowed_syscalls(kind));
            assert!(!map.contains_key(&SELFTEST_SYSCALL), "{kind:?}");
            assert!(!map.contains_key(&libc::SYS_execveat), "{kind:?}");
        }
    }

    #[test]
    fn names_for_the_common_calls() {
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
        assert_eq!(syscall_name(libc::SYS_ioctl), Some("ioctl"));
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn an_unconditional_entry_wins_over_conditions() {
        let map = to_map(vec![
            when(libc::SYS_ioctl, vec![rule(vec![eq32(1, 1)])]),
            any(libc::SYS_ioctl),
        ]);
        assert!(map[&libc::SYS_ioctl].is_empty());
    }
}
