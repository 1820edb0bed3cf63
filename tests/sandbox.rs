// SPDX-License-Identifier: Apache-2.0
//! The sandbox (docs/security.md) with tiny guests: a forbidden system call from each kind
//! of thread ends ember with SIGSYS and a line naming the thread and the call; `--seccomp
//! log` and `off` let it through; Landlock stops an open outside the allowed paths;
//! `--uid`/`--gid` drop root's privileges. The hidden `--sandbox-selftest` flag makes the
//! thread do the forbidden thing right after its sandbox is in place. The warm exec job
//! thread's case is in tests/exec_linux.rs (it needs the Linux guest).

mod common;

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A run that should end by itself ends long before this (hang detection only).
const LIMIT: Duration = Duration::from_secs(60);

/// What an ember run left: its status and output.
#[derive(Debug)]
struct Ended {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// A tiny guest that prints a line and then spins for ever (a run ends by its --timeout).
fn spinning_guest(dir: &std::path::Path) -> PathBuf {
    let mut a = Asm::new();
    a.print("guest up\n");
    let top = a.here();
    a.jmp(top);
    write_tiny_guest(dir, "spin.elf", &a.code, &[])
}

/// A tiny guest that prints a line and resets (status 0).
fn short_guest(dir: &std::path::Path) -> PathBuf {
    let mut a = Asm::new();
    a.print("guest up\n").reset();
    write_tiny_guest(dir, "short.elf", &a.code, &[])
}

/// Runs `ember run --kernel KERNEL --mem 16 ARGS` with `env`, core dumps off.
fn run(kernel: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Ended {
    let mut cmd = ember_command(&["run", "--kernel", kernel.to_str().unwrap(), "--mem", "16"]);
    cmd.args(args).envs(env.iter().copied());
    // SAFETY: the closure runs in the child before exec and only calls setrlimit, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    finish(cmd.spawn().expect("cannot start ember"))
}

fn finish(mut child: std::process::Child) -> Ended {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let st = child.wait().unwrap();
            panic!("ember did not end: {st:?}\n{}", err_t.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ended {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Runs the spinning guest with `--sandbox-selftest KIND` and checks that ember died of
/// SIGSYS, saying which thread made which call.
fn forbidden_call_kills(kind: &str, thread: &str) {
    let name = format!("sandbox_kill_{kind}");
    if !kvm_available(&name) {
        return;
    }
    let dir = temp_dir(&name);
    let guest = spinning_guest(&dir);
    let out = run(
        &guest,
        &["--timeout", "20", "--sandbox-selftest", kind],
        &[],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "ember did not die of SIGSYS: {out:?}"
    );
    let want = format!(
        "ember: seccomp: the {kind} thread {thread} made a forbidden system call: {} (execve)",
        libc::SYS_execve
    );
    assert!(out.stderr.contains(&want), "wanted {want:?} in {out:?}");
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_ember_with_sigsys() {
    forbidden_call_kills("vcpu", "ember-vcpu0");
}

#[test]
fn a_forbidden_call_on_the_vmm_thread_ends_ember_with_sigsys() {
    forbidden_call_kills("vmm", "main");
}

#[test]
fn a_forbidden_call_on_the_console_thread_ends_ember_with_sigsys() {
    forbidden_call_kills("console", "ember-console");
}

#[test]
fn a_forbidden_call_on_the_watchdog_thread_ends_ember_with_sigsys() {
    forbidden_call_kills("watchdog", "ember-watchdog");
}

/// `--seccomp log` lets the call through (the kernel logs it) and `off` has no filter: the
/// guest runs to its end either way.
#[test]
fn log_and_off_let_the_forbidden_call_through() {
    if !kvm_available("sandbox_log_off") {
        return;
    }
    let dir = temp_dir("sandbox_log_off");
    let guest = short_guest(&dir);
    for mode in ["log", "off"] {
        let out = run(
            &guest,
            &["--seccomp", mode, "--sandbox-selftest", "vcpu"],
            &[],
        );
        assert_eq!(out.status.code(), Some(0), "--seccomp {mode}: {out:?}");
        assert!(out.stdout.contains("guest up"), "{out:?}");
        assert!(
            out.stderr
                .contains("sandbox self-test: execve was not stopped"),
            "--seccomp {mode}: {out:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// After set-up, a file outside the allowed paths cannot be opened (Landlock), unless
/// --no-landlock.
#[test]
fn landlock_stops_an_open_outside_the_allowed_paths() {
    if !kvm_available("sandbox_landlock") {
        return;
    }
    if let Err(why) = ember::sandbox::landlock::kernel_abi() {
        eprintln!("SKIP sandbox_landlock: {why}");
        return;
    }
    let dir = temp_dir("sandbox_landlock");
    let guest = short_guest(&dir);
    let secret = dir.join("outside.txt");
    std::fs::write(&secret, "not for the guest's VMM\n").unwrap();
    let env = [(ember::sandbox::SELFTEST_PATH_ENV, secret.to_str().unwrap())];
    let out = run(&guest, &["--sandbox-selftest", "landlock"], &env);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "sandbox self-test: cannot open {} after set-up: Permission denied",
            secret.display()
        )),
        "{out:?}"
    );
    let out = run(
        &guest,
        &["--sandbox-selftest", "landlock", "--no-landlock"],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("Landlock did not stop it"), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--uid`/`--gid`: the VM runs on as that user (ember checks with getresuid that root's
/// privileges are gone for good).
#[test]
fn uid_and_gid_drop_root() {
    if !kvm_available("sandbox_uid") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP sandbox_uid: needs root");
        return;
    }
    let dir = temp_dir("sandbox_uid");
    let guest = short_guest(&dir);
    let out = run(&guest, &["--uid", "65534", "--gid", "65534"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("guest up"), "{out:?}");
    assert!(
        out.stderr
            .contains("dropped root's privileges: running as uid 65534, gid 65534"),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--uid` needs ember to start as root: a clear refusal otherwise.
#[test]
fn uid_without_root_is_refused() {
    if !kvm_available("sandbox_uid_user") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP sandbox_uid_user: needs root (to start ember as another user)");
        return;
    }
    let dir = temp_dir("sandbox_uid_user");
    let guest = short_guest(&dir);
    let mut perms = std::fs::metadata(&dir).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&dir, perms).unwrap();
    // ember itself where `nobody` can run it: the checkout may be private (a CI clone in a
    // 0700 directory). A hard link when the file system allows, else a copy.
    let bin = dir.join("ember");
    if std::fs::hard_link(ember_bin(), &bin).is_err() {
        std::fs::copy(ember_bin(), &bin).unwrap();
    }
    let mut cmd = std::process::Command::new(&bin);
    cmd.args([
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--uid",
        "65534",
        "--gid",
        "65534",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd.uid(65534).gid(65534).stdin(Stdio::null());
    let out = finish(cmd.spawn().expect("cannot start ember"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains(
            "--uid/--gid drop root's privileges after set-up, but ember runs as uid 65534"
        ),
        "{out:?}"
    );
}

/// Bad sandbox flags: status 2 and what to give instead, before any VM runs.
#[test]
fn bad_sandbox_flags_are_usage_errors() {
    let dir = temp_dir("sandbox_flags");
    let guest = short_guest(&dir);
    let kernel = guest.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["run", "--kernel", kernel, "--seccomp", "strict"],
            "\"strict\" is not a seccomp mode: use off, log or kill",
        ),
        (&["run", "--kernel", kernel, "--uid", "1000"], "--gid"),
        (
            &["run", "--kernel", kernel, "--uid", "0", "--gid", "0"],
            "uid 0 is root: give an unprivileged user and group",
        ),
        (
            &["exec", "--kernel", kernel, "--seccomp", "x", "--", "true"],
            "not a seccomp mode",
        ),
    ];
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for (args, want) in cases {
        if args.contains(&"0") && !root {
            continue; // a user gets "start it as root" first
        }
        let out = run_ember(args, None, LIMIT);
        let status = if args[0] == "exec" { 125 } else { 2 };
        assert_eq!(out.code, Some(status), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains(want),
            "{args:?}: wanted {want:?}: {out:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
