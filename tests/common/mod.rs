// SPDX-License-Identifier: Apache-2.0
//! Shared fixtures for ember's integration tests: running the `ember` binary with a timeout,
//! building tiny hand-assembled guests as ELF files, and finding the default Linux guest.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the `ember` binary built for these tests.
pub fn ember_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ember"))
}

/// Whether /dev/kvm can be opened; prints why a test is skipped when not.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// Whether this is a PVM host (KVM without hardware virtualization).
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The default guest built by resources/guest/build.sh, or a skip message.
pub fn default_guest(test: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest");
    let k = dir.join("vmlinux");
    let i = dir.join("initramfs.cpio");
    if k.is_file() && i.is_file() {
        Some((k, i))
    } else {
        eprintln!(
            "SKIP {test}: the default guest is not built (run `bash resources/guest/build.sh`)"
        );
        None
    }
}

/// What a finished ember process left.
#[derive(Debug)]
pub struct Finished {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
    /// The process had to be killed at the timeout.
    pub timed_out: bool,
}

impl Finished {
    /// Panics with the whole output unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit status\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// `ember ARGS` with stdout and stderr piped and no stdin, for [`wait_ember`] (add
/// environment variables before spawning it).
pub fn ember_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(ember_bin());
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    cmd
}

/// Starts `ember ARGS` with `stdin` bytes piped in (then closed).
pub fn spawn_ember(args: &[&str], stdin: Option<&[u8]>) -> Child {
    let mut cmd = ember_command(args);
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("cannot start ember");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        });
    }
    child
}

/// Waits for `child`, killing it after `timeout`; collects its output.
pub fn wait_ember(mut child: Child, timeout: Duration) -> Finished {
    let start = Instant::now();
    // stdout may have been taken by the caller (who reads it while ember runs).
    let out = child.stdout.take();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut out) = out {
            let _ = out.read_to_end(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Finished {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out_t.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap()).into_owned(),
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// Runs `ember ARGS` to its end (killed after `timeout`).
pub fn run_ember(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Finished {
    wait_ember(spawn_ember(args, stdin), timeout)
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Guest-physical (and virtual: the boot page tables identity-map) load address of tiny
/// guests.
pub const TINY_LOAD: u64 = 0x10_0000;

/// Writes a minimal ELF64 executable holding `code` at [`TINY_LOAD`], entered in 64-bit
/// long mode (no PVH note), with optional symbols `(name, offset in code, size)`.
pub fn tiny_elf(code: &[u8], symbols: &[(&str, u64, u64)]) -> Vec<u8> {
    let ehdr_size = 64u64;
    let phdr_size = 56u64;
    let code_off = 0x1000u64;
    let mut f = vec![0u8; code_off as usize];
    f.extend_from_slice(code);
    // String table and symbol table after the code.
    let strtab_off = f.len() as u64;
    let mut strtab = vec![0u8];
    let mut name_offs = Vec::new();
    for (name, _, _) in symbols {
        name_offs.push(strtab.len() as u32);
        strtab.extend_from_slice(name.as_bytes());
        strtab.push(0);
    }
    f.extend_from_slice(&strtab);
    while f.len() % 8 != 0 {
        f.push(0);
    }
    let symtab_off = f.len() as u64;
    f.extend_from_slice(&[0u8; 24]); // null symbol
    for ((_, off, size), name) in symbols.iter().zip(&name_offs) {
        let mut s = [0u8; 24];
        s[0..4].copy_from_slice(&name.to_le_bytes());
        s[4] = 0x12; // GLOBAL FUNC
        s[6..8].copy_from_slice(&1u16.to_le_bytes()); // section index (any non-zero)
        s[8..16].copy_from_slice(&(TINY_LOAD + off).to_le_bytes());
        s[16..24].copy_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&s);
    }
    let symtab_size = f.len() as u64 - symtab_off;
    // Section headers: null, .strtab (1), .symtab (2).
    let shoff = f.len() as u64;
    let mut sh = |ty: u32, off: u64, size: u64, link: u32, entsize: u64| {
        let mut h = [0u8; 64];
        h[4..8].copy_from_slice(&ty.to_le_bytes());
        h[24..32].copy_from_slice(&off.to_le_bytes());
        h[32..40].copy_from_slice(&size.to_le_bytes());
        h[40..44].copy_from_slice(&link.to_le_bytes());
        h[56..64].copy_from_slice(&entsize.to_le_bytes());
        f.extend_from_slice(&h);
    };
    sh(0, 0, 0, 0, 0);
    sh(3, strtab_off, strtab.len() as u64, 0, 0);
    sh(2, symtab_off, symtab_size, 1, 24);

    // ELF header.
    let mut e = [0u8; 64];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1; // version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&TINY_LOAD.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&ehdr_size.to_le_bytes()); // phoff
    e[40..48].copy_from_slice(&shoff.to_le_bytes());
    e[52..54].copy_from_slice(&(ehdr_size as u16).to_le_bytes());
    e[54..56].copy_from_slice(&(phdr_size as u16).to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    e[58..60].copy_from_slice(&64u16.to_le_bytes()); // shentsize
    e[60..62].copy_from_slice(&3u16.to_le_bytes()); // shnum
    e[62..64].copy_from_slice(&1u16.to_le_bytes()); // shstrndx (unused)
    f[0..64].copy_from_slice(&e);
    // Program header: one PT_LOAD of the code.
    let mut p = [0u8; 56];
    p[0..4].copy_from_slice(&1u32.to_le_bytes());
    p[4..8].copy_from_slice(&7u32.to_le_bytes());
    p[8..16].copy_from_slice(&code_off.to_le_bytes());
    p[16..24].copy_from_slice(&TINY_LOAD.to_le_bytes());
    p[24..32].copy_from_slice(&TINY_LOAD.to_le_bytes());
    p[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    p[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    p[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    f[64..120].copy_from_slice(&p);
    f
}

/// Writes a tiny guest to a file in `dir`.
pub fn write_tiny_guest(
    dir: &Path,
    name: &str,
    code: &[u8],
    symbols: &[(&str, u64, u64)],
) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(code, symbols)).unwrap();
    p
}

/// A tiny x86-64 assembler for the handful of instructions the tiny guests use.
#[derive(Default)]
pub struct Asm {
    /// The code.
    pub code: Vec<u8>,
}

impl Asm {
    /// Empty program.
    pub fn new() -> Self {
        Self::default()
    }
    /// Current offset.
    pub fn here(&self) -> usize {
        self.code.len()
    }
    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }
    /// `mov dx, port`
    pub fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.bytes(&[0x66, 0xba]).bytes(&port.to_le_bytes())
    }
    /// `mov al, v`
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.bytes(&[0xb0, v])
    }
    /// `mov eax, v`
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.bytes(&[0xb8]).bytes(&v.to_le_bytes())
    }
    /// `out dx, al`
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.bytes(&[0xee])
    }
    /// `in al, dx`
    pub fn in_al_dx(&mut self) -> &mut Self {
        self.bytes(&[0xec])
    }
    /// Writes `s` to COM1, byte by byte.
    pub fn print(&mut self, s: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for b in s.bytes() {
            self.mov_al(b).out_dx_al();
        }
        self
    }
    /// `mov rdi, imm64` then `mov [rdi], eax` (a 32-bit MMIO write of eax at `addr`).
    pub fn mmio_write32(&mut self, addr: u64) -> &mut Self {
        self.bytes(&[0x48, 0xbf])
            .bytes(&addr.to_le_bytes())
            .bytes(&[0x89, 0x07])
    }
    /// `mov rdi, imm64` then `mov [rdi], al` (an 8-bit MMIO write of al at `addr`).
    pub fn mmio_write8(&mut self, addr: u64) -> &mut Self {
        self.bytes(&[0x48, 0xbf])
            .bytes(&addr.to_le_bytes())
            .bytes(&[0x88, 0x07])
    }
    /// Pulses the reset line through the i8042 (`out 0x64, 0xfe`), then halts in a loop.
    pub fn reset(&mut self) -> &mut Self {
        self.mov_al(0xfe).bytes(&[0xe6, 0x64]).halt_loop()
    }
    /// `hlt; jmp back to hlt`.
    pub fn halt_loop(&mut self) -> &mut Self {
        self.bytes(&[0xf4, 0xeb, 0xfd])
    }
    /// `jmp` to offset `target` (short or near).
    pub fn jmp(&mut self, target: usize) -> &mut Self {
        let rel = target as i64 - (self.here() as i64 + 2);
        if (-128..128).contains(&rel) {
            self.bytes(&[0xeb, rel as i8 as u8])
        } else {
            let rel = target as i64 - (self.here() as i64 + 5);
            self.bytes(&[0xe9]).bytes(&(rel as i32).to_le_bytes())
        }
    }
    /// Short conditional jump with opcode `op` (0x74 jz, 0x75 jnz) to `target`.
    pub fn jcc(&mut self, op: u8, target: usize) -> &mut Self {
        let rel = target as i64 - (self.here() as i64 + 2);
        assert!((-128..128).contains(&rel), "jump too far");
        self.bytes(&[op, rel as i8 as u8])
    }
}

/// Builds resources/guest/vsock-io.c; None (with a message) when no C compiler works.
pub fn build_vsock_io(dir: &Path) -> Option<Vec<u8>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/guest/vsock-io.c");
    let bin = dir.join("vsock-io");
    let out = Command::new("cc")
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-Os",
            "-s",
            "-fno-stack-protector",
        ])
        .args([
            "-fno-asynchronous-unwind-tables",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .output();
    match out {
        Ok(o) if o.status.success() => std::fs::read(&bin).ok(),
        Ok(o) => panic!(
            "building vsock-io failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!("SKIP: no C compiler to build resources/guest/vsock-io.c ({e})");
            None
        }
    }
}

/// Whether this test may create network namespaces and TAPs; prints why not.
pub fn netns_capable(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (network namespace and TAP)");
        return false;
    }
    if !Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIP {test}: the `ip` tool (iproute2) is not installed");
        return false;
    }
    true
}

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name (`ip netns exec NAME ...`).
    pub name: String,
}

impl Netns {
    /// A fresh namespace `ember-TAG-PID` (an old one of that name is deleted first).
    pub fn new(tag: &str) -> Option<Self> {
        let name = format!("ember-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { name })
    }

    /// Runs `ip ARGS` inside the namespace; panics on failure.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ember ARGS` inside the namespace (`ip netns exec`, which execs ember: the child's
    /// PID is ember's), as [`ember_command`] sets it up.
    pub fn ember(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(ember_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `f` on a thread that entered the namespace (sockets it creates live there).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.enter_async(f).join().unwrap()
    }

    /// [`Self::enter`], without waiting for `f`: its thread.
    pub fn enter_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns(2) on an open namespace fd; it only moves this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
