// SPDX-License-Identifier: Apache-2.0
//! Guests that do what a well-behaved kernel would not: flood the console nobody reads, use
//! string port I/O on the serial port, loop forever. None of it may hang ember, block its
//! event loop or lose the guest's bytes.

mod common;

use std::time::Duration;

use common::*;

/// Hang detection only: every test here ends in well under a second when ember works.
const T: Duration = Duration::from_secs(30);

fn tiny_args<'a>(elf: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--kernel", elf, "--mem", "16"];
    args.extend_from_slice(extra);
    args
}

/// `mov rdi, imm64`
fn mov_rdi(a: &mut Asm, v: u64) -> &mut Asm {
    a.bytes(&[0x48, 0xbf]).bytes(&v.to_le_bytes())
}

/// `mov rsi, imm64`
fn mov_rsi(a: &mut Asm, v: u64) -> &mut Asm {
    a.bytes(&[0x48, 0xbe]).bytes(&v.to_le_bytes())
}

/// `mov ecx, v` (zero-extends into rcx)
fn mov_ecx(a: &mut Asm, v: u32) -> &mut Asm {
    a.bytes(&[0xb9]).bytes(&v.to_le_bytes())
}

#[test]
fn rep_insb_and_rep_outsb_move_every_byte() {
    if !kvm_available("rep_insb") {
        return;
    }
    // Wait for input, then `rep insb` 4 bytes from COM1 into memory and `rep outsb` them
    // back to COM1. Each byte of a string instruction is a separate access to the UART.
    const BUF: u64 = 0x20_0000;
    let mut a = Asm::new();
    let top = a.here();
    a.mov_dx(0x3fd).in_al_dx().bytes(&[0xa8, 0x01]); // test al, 1 (data ready)
    a.jcc(0x74, top); // jz top
    a.bytes(&[0xfc]); // cld
    a.mov_dx(0x3f8);
    mov_rdi(&mut a, BUF);
    mov_ecx(&mut a, 4);
    a.bytes(&[0xf3, 0x6c]); // rep insb
    mov_rsi(&mut a, BUF);
    mov_ecx(&mut a, 4);
    a.bytes(&[0xf3, 0x6e]); // rep outsb
    a.print("\n").reset();
    let dir = temp_dir("rep_insb");
    let elf = write_tiny_guest(&dir, "guest.elf", &a.code, &[]);
    // One write of 4 bytes to a pipe is atomic, so ember reads all of them into the FIFO at
    // once, before the guest sees "data ready".
    let out = run_ember(&tiny_args(elf.to_str().unwrap(), &[]), Some(b"abcd"), T);
    let _ = std::fs::remove_dir_all(dir);
    assert!(!out.timed_out, "ember did not end: {out:?}");
    out.expect_code(0);
    assert_eq!(out.stdout, "abcd\n", "{out:?}");
}

/// Waits until the pipe behind `fd` is full: it holds at least `bytes` bytes and took no
/// more for 300 ms (or `timeout` passes). Small writes leave a few bytes of the pipe's pages
/// unused, so a full 64 KiB pipe holds a little less than 64 KiB.
fn wait_pipe_full(fd: i32, bytes: usize, timeout: Duration) -> bool {
    let start = std::time::Instant::now();
    let mut last = (0, start);
    while start.elapsed() < timeout {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through a valid pointer.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
            return false;
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n != last.0 {
            last = (n, std::time::Instant::now());
        } else if n >= bytes && last.1.elapsed() >= Duration::from_millis(300) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn console_flood_to_an_unread_stdout_does_not_block_stdin_or_sigterm() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::process::Stdio;
    if !kvm_available("console_flood") {
        return;
    }
    // Print forever.
    let mut a = Asm::new();
    let top = a.here();
    a.print("all work and no play makes jack a dull boy\n")
        .jmp(top);
    let dir = temp_dir("console_flood");
    let elf = write_tiny_guest(&dir, "guest.elf", &a.code, &[]);
    let mut child = ember_command(&tiny_args(elf.to_str().unwrap(), &[]))
        .stdin(Stdio::piped())
        .spawn()
        .expect("cannot start ember");
    // Nobody reads ember's stdout: wait until its pipe is full, so that the next write to
    // it blocks.
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let full = wait_pipe_full(stdout.as_raw_fd(), 60 * 1024, T);
    // Input for the guest (the event loop hands it to the UART), then a stop request.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"x").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill with the pid of our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > T {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(stdout);
    drop(stdin);
    let stderr = err_t.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    assert!(full, "the guest did not fill stdout; stderr: {stderr}");
    let status = status.unwrap_or_else(|| panic!("ember hung after SIGTERM; stderr: {stderr}"));
    // The tiny guest has no ACPI power button: SIGTERM stops it at once.
    assert_eq!(status.code(), Some(7), "{stderr}");
    assert!(
        stderr.contains("bytes of guest console output dropped: stdout was not being read"),
        "{stderr}"
    );
}

#[test]
fn run_timeout_stops_a_guest_that_loops_forever() {
    if !kvm_available("run_timeout") {
        return;
    }
    let mut a = Asm::new();
    a.print("looping\n");
    let top = a.here();
    a.jmp(top);
    let dir = temp_dir("run_timeout");
    let elf = write_tiny_guest(&dir, "guest.elf", &a.code, &[]);
    let out = run_ember(
        &tiny_args(elf.to_str().unwrap(), &["--timeout", "2"]),
        None,
        T,
    );
    let _ = std::fs::remove_dir_all(dir);
    assert!(!out.timed_out, "ember did not end: {out:?}");
    out.expect_code(124);
    assert_eq!(out.stdout, "looping\n");
    assert!(out.stderr.contains("timeout elapsed"), "{out:?}");
}
