// SPDX-License-Identifier: Apache-2.0
//! Snapshot/restore of KVM state (issue 13, docs/snapshot-pvm.md): a running guest is paused,
//! its KVM state saved and its memory copied, and it is moved into a new KVM VM in the same
//! ember process (`ember run --snapshot-restore-after`). It must go on where it stopped.

mod common;

use std::time::Duration;

use common::*;

/// Lines the counting guest prints before it resets.
const COUNT: u32 = 1500;

/// A guest that starts its "init" (the boot-timer write), then prints a counter in hex, one
/// line per value from 0 to COUNT - 1, with a short busy wait between lines, and resets.
fn counting_guest() -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_al(123).mmio_write8(0xc000_0000); // boot timer: "init started"
    a.bytes(&[0x31, 0xdb]); // xor ebx, ebx (the counter)
    let top = a.here();
    a.bytes(&[0x89, 0xde]); // mov esi, ebx
    a.bytes(&[0xb9, 8, 0, 0, 0]); // mov ecx, 8 (hex digits)
    a.mov_dx(0x3f8);
    let digit = a.here();
    a.bytes(&[0xc1, 0xc6, 0x04]); // rol esi, 4
    a.bytes(&[0x89, 0xf0]); // mov eax, esi
    a.bytes(&[0x83, 0xe0, 0x0f]); // and eax, 0xf
    a.bytes(&[0x04, b'0']); // add al, '0'
    a.bytes(&[0x3c, b'9']); // cmp al, '9'
    a.bytes(&[0x76, 0x02]); // jbe +2
    a.bytes(&[0x04, 7]); // add al, 7 ('A'..'F')
    a.out_dx_al();
    a.bytes(&[0xff, 0xc9]); // dec ecx
    a.jcc(0x75, digit); // jnz digit
    a.mov_al(b'\n').out_dx_al();
    a.bytes(&[0xb9, 0x00, 0x04, 0, 0]); // mov ecx, 1024 (busy wait)
    let wait = a.here();
    a.bytes(&[0xff, 0xc9]); // dec ecx
    a.jcc(0x75, wait); // jnz wait
    a.bytes(&[0xff, 0xc3]); // inc ebx
    a.bytes(&[0x81, 0xfb]).bytes(&COUNT.to_le_bytes()); // cmp ebx, COUNT
    a.jcc(0x75, top); // jnz top
    a.reset();
    a.code
}

#[test]
fn counting_guest_continues_in_a_new_vm() {
    if !kvm_available("counting_guest_continues_in_a_new_vm") {
        return;
    }
    let dir = temp_dir("snapshot_counting");
    let elf = write_tiny_guest(&dir, "guest.elf", &counting_guest(), &[]);
    let out = run_ember(
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "16",
            "--no-rng",
            "--snapshot-restore-after",
            "0.3",
        ],
        None,
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_dir_all(dir);
    assert!(!out.timed_out, "ember did not end: {out:?}");
    out.expect_code(0);
    assert!(
        out.stderr
            .contains("snapshot-restore: restored into a new KVM VM"),
        "no restore happened (did the guest finish before it?): {}",
        out.stderr
    );
    for line in out
        .stderr
        .lines()
        .filter(|l| l.contains("snapshot-restore"))
    {
        eprintln!("{line}");
    }
    // Every value once, in order: the guest neither restarted nor skipped after the move.
    let values: Vec<u32> = out
        .stdout
        .lines()
        .map(|l| u32::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect();
    let expected: Vec<u32> = (0..COUNT).collect();
    assert!(
        values == expected,
        "counter went wrong: {} lines, first bad at {:?}",
        values.len(),
        values.iter().zip(&expected).position(|(a, b)| a != b)
    );
    assert!(out.stderr.contains("guest rebooted"), "{}", out.stderr);
}
