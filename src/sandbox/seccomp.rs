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
//! kernel sends SIGSYS, and ember's handler writes one line naming the thread and the call
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

/// The name of system call `nr`, for the common ones.
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

/// The ioctl request numbers ember issues, by what they act on (`_IO`/`_IOR`/`_IOW`/`_IOWR`
/// of linux/kvm.h, computed from the kvm-bindings structures; a test checks them against the
/// numbers strace showed).
pub mod requests {
    use kvm_bindings::*;

    const KVMIO: u32 = 0xAE;

    const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
        (dir << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr
    }
    const fn io(nr: u32) -> u32 {
        ioc(0, nr, 0)
    }
    const fn iow<T>(nr: u32) -> u32 {
        ioc(1, nr, std::mem::size_of::<T>())
    }
    const fn ior<T>(nr: u32) -> u32 {
        ioc(2, nr, std::mem::size_of::<T>())
    }
    const fn iowr<T>(nr: u32) -> u32 {
        ioc(3, nr, std::mem::size_of::<T>())
    }

    /// `KVM_RUN`.
    pub const KVM_RUN: u32 = io(0x80);
    /// `KVM_GET_REGS`.
    pub const KVM_GET_REGS: u32 = ior::<kvm_regs>(0x81);
    /// `KVM_SET_REGS`.
    pub const KVM_SET_REGS: u32 = iow::<kvm_regs>(0x82);
    /// `KVM_GET_SREGS`.
    pub const KVM_GET_SREGS: u32 = ior::<kvm_sregs>(0x83);
    /// `KVM_SET_SREGS`.
    pub const KVM_SET_SREGS: u32 = iow::<kvm_sregs>(0x84);
    /// `KVM_TRANSLATE`.
    pub const KVM_TRANSLATE: u32 = iowr::<kvm_translation>(0x85);

    /// What a vCPU thread asks of its vCPU: run it, read its registers (error reports, the
    /// profiler) and save its whole state when paused (SIGUSR1, snapshots).
    pub const VCPU: &[u32] = &[
        KVM_RUN,
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_TRANSLATE,
        iowr::<kvm_msrs>(0x88),       // KVM_GET_MSRS
        iowr::<kvm_cpuid2>(0x91),     // KVM_GET_CPUID2
        ior::<kvm_fpu>(0x8c),         // KVM_GET_FPU
        ior::<kvm_lapic_state>(0x8e), // KVM_GET_LAPIC
        ior::<kvm_mp_state>(0x98),    // KVM_GET_MP_STATE
        ior::<kvm_vcpu_events>(0x9f), // KVM_GET_VCPU_EVENTS
        ior::<kvm_debugregs>(0xa1),   // KVM_GET_DEBUGREGS
        io(0xa3),                     // KVM_GET_TSC_KHZ
        ior::<kvm_xsave>(0xa4),       // KVM_GET_XSAVE
        ior::<kvm_xcrs>(0xa6),        // KVM_GET_XCRS
        io(0xad),                     // KVM_KVMCLOCK_CTRL
    ];

    /// What the VMM thread asks of KVM after set-up: capabilities (snapshots), the VM's
    /// interrupt controllers, PIT and clock (snapshots, the power button's IOAPIC pin),
    /// irqfds, and for the in-process snapshot/restore experiment a whole new VM with its
    /// vCPUs (their set-up and restore requests).
    pub const VM: &[u32] = &[
        io(0x00),                                 // KVM_GET_API_VERSION
        io(0x01),                                 // KVM_CREATE_VM
        iowr::<kvm_msr_list>(0x02),               // KVM_GET_MSR_INDEX_LIST
        io(0x03),                                 // KVM_CHECK_EXTENSION
        io(0x04),                                 // KVM_GET_VCPU_MMAP_SIZE
        iowr::<kvm_msr_list>(0x0a),               // KVM_GET_MSR_FEATURE_INDEX_LIST
        io(0x41),                                 // KVM_CREATE_VCPU
        iow::<kvm_userspace_memory_region>(0x46), // KVM_SET_USER_MEMORY_REGION
        io(0x47),                                 // KVM_SET_TSS_ADDR
        iow::<u64>(0x48),                         // KVM_SET_IDENTITY_MAP_ADDR
        io(0x60),                                 // KVM_CREATE_IRQCHIP
        iowr::<kvm_irqchip>(0x62),                // KVM_GET_IRQCHIP
        ior::<kvm_irqchip>(0x63),                 // KVM_SET_IRQCHIP
        iow::<kvm_irqfd>(0x76),                   // KVM_IRQFD
        iow::<kvm_pit_config>(0x77),              // KVM_CREATE_PIT2
        iow::<kvm_ioeventfd>(0x79),               // KVM_IOEVENTFD
        iow::<kvm_clock_data>(0x7b),              // KVM_SET_CLOCK
        ior::<kvm_clock_data>(0x7c),              // KVM_GET_CLOCK
        ior::<kvm_pit_state2>(0x9f),              // KVM_GET_PIT2
        iow::<kvm_pit_state2>(0xa0),              // KVM_SET_PIT2
        KVM_SET_REGS,
        KVM_SET_SREGS,
        iow::<kvm_msrs>(0x89),        // KVM_SET_MSRS
        iow::<kvm_cpuid2>(0x90),      // KVM_SET_CPUID2
        iow::<kvm_fpu>(0x8d),         // KVM_SET_FPU
        iow::<kvm_lapic_state>(0x8f), // KVM_SET_LAPIC
        iow::<kvm_mp_state>(0x99),    // KVM_SET_MP_STATE
        iow::<kvm_vcpu_events>(0xa0), // KVM_SET_VCPU_EVENTS
        iow::<kvm_debugregs>(0xa2),   // KVM_SET_DEBUGREGS
        io(0xa2),                     // KVM_SET_TSC_KHZ
        iow::<kvm_xsave>(0xa5),       // KVM_SET_XSAVE
        iow::<kvm_xcrs>(0xa7),        // KVM_SET_XCRS
    ];

    /// A TAP's: offloads (the guest's features, set when it activates the device) and the
    /// host end's addresses (a snapshot records the MAC).
    pub const TAP: &[u32] = &[
        libc::TUNSETOFFLOAD as u32,
        0x4004_54d8, // TUNSETVNETHDRSZ
        libc::SIOCGIFHWADDR as u32,
        libc::SIOCGIFADDR as u32,
    ];

    /// A terminal's: reading and restoring its mode (raw mode ends with the run).
    pub const TERMINAL: &[u32] = &[libc::TCGETS as u32, libc::TCSETS as u32];
}

/// What every thread needs: memory (the allocator, thread stacks), futexes (locks,
/// condition variables, joins), time, signal returns, `write` (log lines; the SIGSYS
/// handler's report), the SIGSYS handler's re-raise, `close`, and the end of a thread or of
/// the process. `fcntl(F_GETFD)`: a debug build's std checks a descriptor before it closes
/// it.
fn common() -> Vec<Allowed> {
    let mut list: Vec<Allowed> = [
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
        libc::SYS_close,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    .map(any)
    .collect();
    list.push(fcntl(&[libc::F_GETFD]));
    list
}

/// `fcntl` with one of `commands`.
fn fcntl(commands: &[libc::c_int]) -> Allowed {
    when(
        libc::SYS_fcntl,
        commands
            .iter()
            .map(|c| rule(vec![eq32(1, *c as u32)]))
            .collect(),
    )
}

/// `prctl` with one of `options`.
fn prctl(options: &[libc::c_int]) -> Allowed {
    when(
        libc::SYS_prctl,
        options
            .iter()
            .map(|o| rule(vec![eq32(0, *o as u32)]))
            .collect(),
    )
}

/// Starting a thread: `clone3` in the parent, then what glibc and std do on the new thread
/// before its own code runs (its filter is still the parent's then).
fn thread_start() -> Vec<Allowed> {
    vec![
        any(libc::SYS_clone3),
        any(libc::SYS_rseq),
        any(libc::SYS_set_robust_list),
        any(libc::SYS_sched_getaffinity),
        prctl(&[libc::PR_SET_NAME]),
    ]
}

/// Only Unix sockets: the vsock device's host side, virtio-fs's vhost-user connection,
/// warm exec's job.
fn unix_socket() -> Allowed {
    when(
        libc::SYS_socket,
        vec![rule(vec![eq32(0, libc::AF_UNIX as u32)])],
    )
}

/// glibc applies `setgroups`/`setresgid`/`setresuid` to every thread of the process (a
/// signal makes each thread repeat the call): a thread that is filtered before
/// [`drop_privileges`](super::drop_privileges) must be allowed exactly these calls.
fn privilege_drop(uid: Option<libc::uid_t>, gid: Option<libc::gid_t>) -> Vec<Allowed> {
    let (Some(uid), Some(gid)) = (uid, gid) else {
        return Vec::new();
    };
    vec![
        when(libc::SYS_setgroups, vec![rule(vec![eq(0, 0)])]),
        when(
            libc::SYS_setresgid,
            vec![rule(vec![eq32(0, gid), eq32(1, gid), eq32(2, gid)])],
        ),
        when(
            libc::SYS_setresuid,
            vec![rule(vec![eq32(0, uid), eq32(1, uid), eq32(2, uid)])],
        ),
    ]
}

/// Entering the sandbox on a thread spawned by one that entered already (a vCPU thread
/// started by the in-process snapshot/restore, warm exec's job thread, the watchdog's
/// message thread): `prctl(PR_SET_NO_NEW_PRIVS)`, `landlock_restrict_self` and
/// `seccomp(SECCOMP_SET_MODE_FILTER)` only add restrictions (the Landlock ruleset's
/// descriptor is duplicated for the call).
fn enter_again() -> Vec<Allowed> {
    vec![
        prctl(&[libc::PR_SET_NO_NEW_PRIVS]),
        fcntl(&[libc::F_DUPFD_CLOEXEC]),
        any(libc::SYS_landlock_restrict_self),
        when(
            libc::SYS_seccomp,
            vec![rule(vec![eq32(0, libc::SECCOMP_SET_MODE_FILTER)])],
        ),
    ]
}

/// The calls a vCPU thread makes: `KVM_RUN` and the other vCPU requests, and what the
/// port-I/O and MMIO handlers run on it do: eventfd writes (interrupts, the exit latch),
/// console queueing, a virtio device's activation (a TAP's offloads) and reset (virtio-fs
/// stops its rings over the vhost-user socket, vsock closes its connections), the kernel
/// file read for symbols when the guest fails, the thread's CPU time at its end.
fn vcpu() -> Vec<Allowed> {
    let mut requests = requests::VCPU.to_vec();
    requests.extend_from_slice(requests::TAP);
    let mut list: Vec<Allowed> = [
        libc::SYS_read,
        libc::SYS_lseek,
        libc::SYS_openat,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_shutdown,
        libc::SYS_getrusage,
    ]
    .into_iter()
    .map(any)
    .collect();
    // A user-named file is opened O_NONBLOCK and then made blocking (src/user_file.rs).
    list.push(fcntl(&[libc::F_GETFL, libc::F_SETFL]));
    list.push(ioctls(&requests));
    list
}

/// The calls a thread of `kind` may make (besides [`common`]).
fn allowed_syscalls(kind: ThreadKind) -> Vec<Allowed> {
    let mut list = common();
    let any_of = |nrs: &[i64]| nrs.iter().copied().map(any).collect::<Vec<_>>();
    match kind {
        // The event loop: every device's queues (disk I/O, TAP frames, vsock and vhost-user
        // sockets, rng), signals, the SIGUSR1 pause and snapshots (files in the snapshot
        // directory or cache), the in-process snapshot/restore (a new VM and vCPU threads,
        // which start under this filter: it allows what a vCPU thread does), virtiofsd's
        // end, and what the command does after the run (reports, the warm path's clean-up).
        ThreadKind::Vmm => {
            list.extend(vcpu());
            list.extend(any_of(&[
                // A drive's new image (the API's PATCH /drives) is opened and locked here.
                libc::SYS_flock,
                libc::SYS_read,
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_epoll_wait,
                libc::SYS_epoll_ctl,
                libc::SYS_poll,
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_sendto,
                libc::SYS_recvfrom,
                libc::SYS_setsockopt,
                libc::SYS_timerfd_settime,
                libc::SYS_getrandom,
                libc::SYS_mkdir,
                libc::SYS_rename,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_getdents64,
                libc::SYS_ftruncate,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_kill,
                libc::SYS_wait4,
                libc::SYS_timer_delete,
            ]));
            list.push(unix_socket());
            list.push(fcntl(&[
                libc::F_GETFD,
                libc::F_SETFD,
                libc::F_GETFL,
                libc::F_SETFL,
                libc::F_DUPFD_CLOEXEC,
            ]));
            let mut requests = requests::VM.to_vec();
            requests.extend_from_slice(requests::TERMINAL);
            requests.push(libc::FIONBIO as u32);
            list.push(ioctls(&requests));
            list.extend(thread_start());
            list.extend(enter_again());
        }
        ThreadKind::Vcpu => list.extend(vcpu()),
        // Guest output to stdout or stderr: `write` only.
        ThreadKind::Console => {}
        // Waiting on its eventfd and the signalfd; ending the process: a thread for the
        // message, the `--json` result (written and renamed), the terminal's mode.
        ThreadKind::Watchdog => {
            list.extend(any_of(&[
                libc::SYS_poll,
                libc::SYS_read,
                libc::SYS_openat,
                libc::SYS_rename,
                libc::SYS_unlink,
            ]));
            list.push(ioctls(requests::TERMINAL));
            list.extend(thread_start());
            list.extend(enter_again());
        }
        // Serving the API socket once the VM runs (poll, accept, read, answer; requests to
        // the event loop go through a channel and an eventfd `write`), and the metrics
        // writer's periodic `write`.
        ThreadKind::Api => {
            list.extend(any_of(&[
                libc::SYS_poll,
                libc::SYS_accept4,
                libc::SYS_read,
                libc::SYS_sendto,
                libc::SYS_recvfrom,
                libc::SYS_setsockopt,
            ]));
            list.push(fcntl(&[libc::F_GETFL, libc::F_SETFL]));
            list.push(ioctls(&[libc::FIONBIO as u32]));
        }
        // Connecting to the vsock device's host socket and handing the job over.
        ThreadKind::ExecJob => {
            list.extend(any_of(&[
                libc::SYS_connect,
                libc::SYS_sendto,
                libc::SYS_recvfrom,
                libc::SYS_setsockopt,
                libc::SYS_shutdown,
            ]));
            list.push(unix_socket());
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

    /// The numbers strace printed for these requests while the tests ran.
    #[test]
    fn request_numbers_are_the_kernels() {
        assert_eq!(requests::KVM_RUN, 0xae80);
        assert_eq!(requests::KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(requests::KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(requests::KVM_TRANSLATE, 0xc018_ae85);
        let vcpu = [
            0xc008_ae88, // KVM_GET_MSRS
            0xc008_ae91, // KVM_GET_CPUID2
            0x81a0_ae8c, // KVM_GET_FPU
            0x8400_ae8e, // KVM_GET_LAPIC
            0x8004_ae98, // KVM_GET_MP_STATE
            0x8040_ae9f, // KVM_GET_VCPU_EVENTS
            0x8080_aea1, // KVM_GET_DEBUGREGS
            0xaea3,      // KVM_GET_TSC_KHZ
            0x9000_aea4, // KVM_GET_XSAVE
            0x8188_aea6, // KVM_GET_XCRS
            0xaead,      // KVM_KVMCLOCK_CTRL
        ];
        for r in vcpu {
            assert!(requests::VCPU.contains(&r), "{r:#x}");
        }
        let vm = [
            0xae00,
            0xae01,
            0xc004_ae02,
            0xae03,
            0xae04,
            0xc004_ae0a,
            0xae41,
            0x4020_ae46,
            0xae47,
            0x4008_ae48,
            0xae60,
            0xc208_ae62,
            0x8208_ae63,
            0x4020_ae76,
            0x4040_ae77,
            0x4030_ae7b,
            0x8030_ae7c,
            0x8070_ae9f,
            0x4070_aea0,
            0x4090_ae82,
            0x4138_ae84,
            0x4008_ae89,
            0x4008_ae90,
            0x41a0_ae8d,
            0x4400_ae8f,
            0x4004_ae99,
            0x4040_aea0,
            0x4080_aea2,
            0x5000_aea5,
            0x4188_aea7,
        ];
        for r in vm {
            assert!(requests::VM.contains(&r), "{r:#x}");
        }
        assert!(requests::TAP.contains(&0x4004_54d0), "TUNSETOFFLOAD");
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

#[cfg(test)]
mod dump {
    use super::*;

    /// Writes each kind's BPF program to `$EMBER_DUMP_FILTERS/KIND.bpf` (for replaying
    /// traced system calls against the filters by hand).
    #[test]
    #[ignore = "a tool, not a test"]
    fn dump_filters() {
        let Some(dir) = std::env::var_os("EMBER_DUMP_FILTERS") else {
            return;
        };
        for kind in ThreadKind::ALL {
            let prog = compile(kind, SeccompMode::Kill, None, None).unwrap();
            let mut bytes = Vec::new();
            for i in &prog {
                bytes.extend_from_slice(&i.code.to_le_bytes());
                bytes.push(i.jt);
                bytes.push(i.jf);
                bytes.extend_from_slice(&i.k.to_le_bytes());
            }
            std::fs::write(
                std::path::Path::new(&dir).join(format!("{}.bpf", kind.name())),
                bytes,
            )
            .unwrap();
        }
    }
}
