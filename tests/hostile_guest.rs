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
