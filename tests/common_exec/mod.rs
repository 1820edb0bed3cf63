// SPDX-License-Identifier: Apache-2.0
//! Helpers for the `ember exec` tests, beside the shared tests/common: spawning the binary
//! with a hard wall-clock limit (killed on drop), collecting stdout as bytes, stderr, and
//! ember's peak memory (VmHWM), sending it signals, and the tiny-guest programs the exec
//! tests use.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The ember binary under test.
pub fn ember() -> Command {
    Command::new(crate::common::ember_bin())
}

/// Whether /dev/kvm can be used; prints why a test is skipped when not.
pub fn kvm_or_skip(test: &str) -> bool {
    crate::common::kvm_available(test)
}

/// The default guest's vmlinux when /dev/kvm is usable and the guest is built (the binary
/// finds the same guest by itself); prints why a test is skipped otherwise.
pub fn guest_or_skip(test: &str) -> Option<PathBuf> {
    if !kvm_or_skip(test) {
        return None;
    }
    crate::common::default_guest(test).map(|(vmlinux, _)| vmlinux)
}

/// Writes the tiny guest `code` into `dir` and returns its path.
pub fn tiny_guest(dir: &Path, name: &str, code: &crate::common::Asm) -> PathBuf {
    crate::common::write_tiny_guest(dir, name, &code.code, &[])
}

/// What a finished ember run left behind.
#[derive(Debug)]
pub struct Finished {
    /// The exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: Vec<u8>,
    /// Everything on stderr.
    pub stderr: String,
    /// Peak resident memory (KiB): wait4's ru_maxrss, or the highest VmHWM seen in
    /// /proc/PID/status while it ran if that was higher.
    pub hwm_kib: u64,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

/// A running ember, killed on drop.
pub struct Running {
    child: Child,
    started: Instant,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    err: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// Reaped by `finish` (with wait4, behind std's back): nothing left to kill or wait for.
    reaped: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

impl Running {
    /// Spawns `cmd` with piped stdout/stderr and stdin from /dev/null.
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ember");
        let out = Some(reader(child.stdout.take().expect("stdout")));
        let err = Some(reader(child.stderr.take().expect("stderr")));
        Running {
            child,
            started: Instant::now(),
            out,
            err,
            reaped: false,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to ember.
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits for the end, at most `limit` (then kills it and panics). The peak RSS is the
    /// kernel's (`wait4`'s ru_maxrss), so a short run's peak is not missed between samples;
    /// VmHWM is also sampled while it runs.
    pub fn finish(mut self, limit: Duration) -> Finished {
        use std::os::unix::process::ExitStatusExt;
        let mut hwm = 0;
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        let status = loop {
            if let Some(kib) = vm_hwm_kib(self.child.id()) {
                hwm = hwm.max(kib);
            }
            let mut raw = 0;
            // SAFETY: rusage is plain data; wait4 on our own unreaped child, not blocking.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointers to `raw` and `usage` for the call's duration.
            let r = unsafe { libc::wait4(pid, &mut raw, libc::WNOHANG, &mut usage) };
            if r == pid {
                self.reaped = true;
                hwm = hwm.max(u64::try_from(usage.ru_maxrss).unwrap_or(0));
                break std::process::ExitStatus::from_raw(raw);
            }
            assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("ember still running after {limit:?}: killed it");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            h.map(|h| h.join().expect("output reader"))
                .unwrap_or_default()
        };
        Finished {
            code: status.code(),
            stdout: join(self.out.take()),
            stderr: String::from_utf8_lossy(&join(self.err.take())).into_owned(),
            hwm_kib: hwm,
            elapsed,
        }
    }
}

/// Runs `cmd` to its end (at most `limit`).
pub fn run(cmd: Command, limit: Duration) -> Finished {
    Running::spawn(cmd).finish(limit)
}

/// VmHWM of a live process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A fresh scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "ember-exec-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Tiny-guest programs for the exec tests, on top of the shared [`Asm`]: the guest is a
/// minimal ELF64 without a PVH note (`common::tiny_elf`), entered in 64-bit mode with the
/// first 4 GiB identity-mapped.
pub mod tiny {
    use crate::common::Asm;

    /// The exit device (arch/x86_64/layout.rs EXIT_DEVICE_START).
    pub const EXIT_DEVICE: u64 = 0xc000_1000;
    /// COM1 and COM2.
    pub const COM1: u16 = 0x3f8;
    /// COM2 (ember exec's stderr).
    pub const COM2: u16 = 0x2f8;

    /// Writes `status` to the exit device (a 32-bit MMIO store).
    pub fn write_status(a: &mut Asm, status: u32) -> &mut Asm {
        a.mov_eax(status).mmio_write32(EXIT_DEVICE)
    }

    /// Writes `bytes` to `port`, one OUT each.
    pub fn out_bytes<'a>(a: &'a mut Asm, port: u16, bytes: &[u8]) -> &'a mut Asm {
        a.mov_dx(port);
        for &b in bytes {
            a.mov_al(b).out_dx_al();
        }
        a
    }

    /// Writes the bytes `i % 256` for i in 0..n to `port`, one OUT each:
    /// `xor ebx, ebx; l: mov al, bl; out dx, al; inc ebx; cmp ebx, n; jne l`.
    pub fn out_counter(a: &mut Asm, port: u16, n: u32) -> &mut Asm {
        a.mov_dx(port).bytes(&[0x31, 0xdb]);
        let top = a.here();
        a.bytes(&[0x88, 0xd8])
            .out_dx_al()
            .bytes(&[0xff, 0xc3, 0x81, 0xfb]);
        a.bytes(&n.to_le_bytes()).jcc(0x75, top)
    }

    /// `jmp $`: spins forever.
    pub fn spin(a: &mut Asm) -> &mut Asm {
        let here = a.here();
        a.jmp(here)
    }
}
