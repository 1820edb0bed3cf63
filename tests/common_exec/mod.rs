// SPDX-License-Identifier: Apache-2.0
//! Helpers for the `ember exec` tests: spawning the binary with a hard wall-clock limit
//! (killed on drop), collecting stdout/stderr and ember's peak memory (VmHWM), hand-built
//! tiny ELF guests, and the checks that skip a test when /dev/kvm or the default guest is
//! missing.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The ember binary under test.
pub fn ember() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ember"))
}

/// Whether /dev/kvm can be used; prints why a test is skipped when not.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped {test}: /dev/kvm is not usable ({e})");
            false
        }
    }
}

/// The default guest the binary finds by itself (`target/guest` next to `target/<profile>/`),
/// or `$EMBER_GUEST_DIR`; prints why a test is skipped when it is not built.
pub fn guest_or_skip(test: &str) -> Option<PathBuf> {
    if !kvm_or_skip(test) {
        return None;
    }
    let dir = std::env::var_os("EMBER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_BIN_EXE_ember"))
                .parent()
                .and_then(Path::parent)
                .map(|t| t.join("guest"))
                .unwrap_or_default()
        });
    if dir.join("vmlinux").is_file() && dir.join("initramfs.cpio").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipped {test}: the default guest is not built in {} (run `bash \
             resources/guest/build.sh`)",
            dir.display()
        );
        None
    }
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
    /// The highest VmHWM (KiB) seen in /proc/PID/status while it ran.
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
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

    /// Waits for the end, at most `limit` (then kills it and panics), sampling VmHWM.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let mut hwm = 0;
        let status = loop {
            if let Some(kib) = vm_hwm_kib(self.child.id()) {
                hwm = hwm.max(kib);
            }
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
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

/// Tiny guests: a few hand-assembled x86-64 instructions in a minimal ELF64 without a PVH
/// note, so ember enters them in 64-bit mode with the first 4 GiB identity-mapped.
pub mod tiny {
    /// Guest-physical load address of the code (HIMEM_START).
    pub const LOAD: u64 = 0x10_0000;
    const EHDR: usize = 64;
    const PHDR: usize = 56;

    /// `mov eax, 0xC000_1000; mov dword [rax], status` (exit device).
    pub fn write_status(status: u32) -> Vec<u8> {
        let mut c = vec![0xb8, 0x00, 0x10, 0x00, 0xc0, 0xc7, 0x00];
        c.extend_from_slice(&status.to_le_bytes());
        c
    }

    /// `mov dx, port; mov al, b; out dx, al` for each byte.
    pub fn out_bytes(port: u16, bytes: &[u8]) -> Vec<u8> {
        let mut c = vec![0x66, 0xba];
        c.extend_from_slice(&port.to_le_bytes());
        for &b in bytes {
            c.extend_from_slice(&[0xb0, b, 0xee]);
        }
        c
    }

    /// Writes bytes `i % 256` for i in 0..n to `port`, one OUT each:
    /// `mov dx, port; xor ebx, ebx; l: mov al, bl; out dx, al; inc ebx; cmp ebx, n; jne l`.
    pub fn out_counter(port: u16, n: u32) -> Vec<u8> {
        let mut c = vec![0x66, 0xba];
        c.extend_from_slice(&port.to_le_bytes());
        c.extend_from_slice(&[0x31, 0xdb, 0x88, 0xd8, 0xee, 0xff, 0xc3, 0x81, 0xfb]);
        c.extend_from_slice(&n.to_le_bytes());
        c.extend_from_slice(&[0x75, 0xf3]); // back 13 bytes, to `mov al, bl`
        c
    }

    /// `mov al, 0xfe; out 0x64, al`: reset through the i8042.
    pub fn reset() -> Vec<u8> {
        vec![0xb0, 0xfe, 0xe6, 0x64]
    }

    /// `hlt; jmp hlt`: stop for good (interrupts are off).
    pub fn halt() -> Vec<u8> {
        vec![0xf4, 0xeb, 0xfd]
    }

    /// `jmp $`: spin forever.
    pub fn spin() -> Vec<u8> {
        vec![0xeb, 0xfe]
    }

    /// A minimal ELF64 executable with one PT_LOAD segment holding `code` at [`LOAD`].
    pub fn elf(code: &[u8]) -> Vec<u8> {
        let total = EHDR + PHDR + code.len();
        let total64 = u64::try_from(total).expect("size");
        let entry = LOAD + u64::try_from(EHDR + PHDR).expect("size");
        let mut e = Vec::with_capacity(total);
        e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        e.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
        e.extend_from_slice(&entry.to_le_bytes());
        e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        e.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        e.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
        assert_eq!(e.len(), EHDR);
        e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e.extend_from_slice(&5u32.to_le_bytes()); // R+X
        e.extend_from_slice(&0u64.to_le_bytes()); // p_offset
        e.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
        e.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
        e.extend_from_slice(&total64.to_le_bytes()); // p_filesz
        e.extend_from_slice(&total64.to_le_bytes()); // p_memsz
        e.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
        assert_eq!(e.len(), EHDR + PHDR);
        e.extend_from_slice(code);
        e
    }

    /// Writes the ELF for `code` into `dir` and returns its path.
    pub fn write(dir: &std::path::Path, name: &str, code: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, elf(code)).expect("write tiny guest");
        p
    }
}
