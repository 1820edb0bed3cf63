// SPDX-License-Identifier: Apache-2.0
//! Tiny guests: a few hand-assembled instructions loaded as an ELF that drive ember's exit
//! paths (serial out and in, i8042 reset, triple fault, unhandled ports and MMIO, several
//! vCPUs, emulation failures, panic detection) in milliseconds, without Linux.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn run_tiny(
    name: &str,
    code: &[u8],
    syms: &[(&str, u64, u64)],
    extra: &[&str],
    stdin: Option<&[u8]>,
) -> Option<Finished> {
    if !kvm_available(name) {
        return None;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", code, syms);
    let mut args = vec!["run", "--kernel", elf.to_str().unwrap(), "--mem", "16"];
    args.extend_from_slice(extra);
    let out = run_ember(&args, stdin, T);
    let _ = std::fs::remove_dir_all(dir);
    assert!(!out.timed_out, "ember did not end: {out:?}");
    Some(out)
}

#[test]
fn serial_output_then_reset_exits_zero() {
    let mut a = Asm::new();
    a.print("hello from a tiny guest\n").reset();
    let Some(out) = run_tiny("serial", &a.code, &[], &[], None) else {
        return;
    };
    out.expect_code(0);
    assert!(out.stdout.contains("hello from a tiny guest"), "{out:?}");
    assert!(out.stderr.contains("guest rebooted"), "{out:?}");
}

#[test]
fn stdin_reaches_the_guest_and_is_echoed() {
    // Poll the line status register; echo every byte until 'q', then reset.
    let mut a = Asm::new();
    let top = a.here();
    a.mov_dx(0x3fd).in_al_dx().bytes(&[0xa8, 0x01]); // test al, 1
    a.jcc(0x74, top); // jz top
    a.mov_dx(0x3f8).in_al_dx();
    a.bytes(&[0x3c, b'q']); // cmp al, 'q'
    let je_at = a.here();
    a.bytes(&[0x74, 0x00]); // je reset (patched below)
    a.out_dx_al().jmp(top);
    let reset_at = a.here();
    a.reset();
    a.code[je_at + 1] = (reset_at - (je_at + 2)) as u8;
    // More than the 64-byte receive FIFO, so flow control is exercised.
    let mut input = Vec::new();
    for i in 0..40 {
        input.extend_from_slice(format!("line{i:02}\n").as_bytes());
    }
    input.push(b'q');
    let Some(out) = run_tiny("stdin", &a.code, &[], &[], Some(&input)) else {
        return;
    };
    out.expect_code(0);
    let expected = String::from_utf8(input[..input.len() - 1].to_vec()).unwrap();
    assert_eq!(out.stdout, expected);
}

#[test]
fn triple_fault_is_reported() {
    // ud2 with an empty IDT: #UD -> #GP -> double fault -> triple fault.
    let mut a = Asm::new();
    a.print("about to fault\n").bytes(&[0x0f, 0x0b]);
    let Some(out) = run_tiny("triple", &a.code, &[], &[], None) else {
        return;
    };
    assert!(out.stdout.contains("about to fault"));
    // Hardware KVM reports KVM_EXIT_SHUTDOWN; PVM reports the fault as an internal error.
    match out.code {
        Some(3) => assert!(out.stderr.contains("triple-faulted"), "{out:?}"),
        Some(5) if pvm_host() => assert!(out.stderr.contains("KVM emulation failure"), "{out:?}"),
        _ => panic!("unexpected status: {out:?}"),
    }
}

#[test]
fn unhandled_port_and_mmio_are_not_fatal() {
    // Read port 0x80 (nothing there: reads 0xff) and echo the value, write to an empty MMIO
    // page, read from it, then say done.
    let mut a = Asm::new();
    a.bytes(&[0xe4, 0x80]); // in al, 0x80
    a.mov_dx(0x3f8).out_dx_al();
    a.mov_eax(0x1234_5678).mmio_write32(0xd7f0_0000);
    a.bytes(&[0x8b, 0x07]); // mov eax, [rdi]
    a.mov_dx(0x3f8).out_dx_al();
    a.print("done\n").reset();
    let Some(out) = run_tiny("unhandled", &a.code, &[], &["--log-level", "debug"], None) else {
        return;
    };
    out.expect_code(0);
    let bytes = out.stdout.as_bytes();
    assert!(out.stdout.ends_with("done\n"), "{out:?}");
    // Two bytes of all-ones (lossy UTF-8 turns each into U+FFFD), then "done".
    assert!(out.stdout.starts_with("\u{fffd}\u{fffd}done"), "{bytes:?}");
    assert!(out.stderr.contains("unhandled port 0x80"), "{out:?}");
    assert!(out.stderr.contains("unhandled MMIO 0xd7f00000"), "{out:?}");
}

#[test]
fn several_vcpus_start_and_stop() {
    let mut a = Asm::new();
    a.print("bsp running\n").reset();
    let Some(out) = run_tiny("smp", &a.code, &[], &["--vcpus", "4"], None) else {
        return;
    };
    out.expect_code(0);
    assert!(out.stdout.contains("bsp running"));
}

#[test]
fn kernel_panic_message_gives_panic_status() {
    let mut a = Asm::new();
    a.print("[    1.234] Kernel panic - not syncing: VFS: Unable to mount root fs\n")
        .reset();
    let Some(out) = run_tiny("panic", &a.code, &[], &[], None) else {
        return;
    };
    out.expect_code(4);
    assert!(
        out.stderr
            .contains("the guest reported a kernel panic on its console"),
        "{out:?}"
    );
}

#[test]
fn emulation_failure_names_rip_bytes_and_symbol() {
    if !pvm_host() {
        eprintln!("SKIP emulation_failure: only a PVM host emulates guest kernel code");
        return;
    }
    // FWAIT cannot be emulated by KVM's instruction emulator (guest kernel code on PVM).
    let mut a = Asm::new();
    a.print("x");
    let at = a.here() as u64;
    a.bytes(&[0x9b, 0x90, 0x90]).reset();
    let syms = [("tiny_fwait", at, 3)];
    let Some(out) = run_tiny("emufail", &a.code, &syms, &[], None) else {
        return;
    };
    out.expect_code(5);
    let rip = format!("{:#x}", TINY_LOAD + at);
    assert!(out.stderr.contains(&rip), "{out:?}");
    assert!(out.stderr.contains("tiny_fwait+0x0"), "{out:?}");
    assert!(
        out.stderr.contains("instruction bytes: 9b 90 90"),
        "{out:?}"
    );
}

#[test]
fn exit_device_status_is_recorded_but_run_ends_on_reset() {
    let mut a = Asm::new();
    a.mov_eax(42).mmio_write32(0xc000_1000);
    a.print("after status\n").reset();
    let Some(out) = run_tiny("exitdev", &a.code, &[], &[], None) else {
        return;
    };
    out.expect_code(0);
    assert!(out.stdout.contains("after status"));
}

#[test]
fn guest_triggered_log_lines_are_rate_limited() {
    // 20000 rounds of four mistakes that each log a warning: a queue size that is not a power
    // of two (logged by virtio-queue itself), a 1-byte write to a 32-bit virtio-mmio
    // register, an unaligned 32-bit write there, and an ACPI sleep request for a state ember
    // does not offer (S3). Unlimited, that is 80000 lines on stderr; each kind gets one line
    // per interval (plus a count of the suppressed ones).
    use ember::arch::x86_64::layout::{ACPI_SLEEP_CONTROL, VIRTIO_MMIO_START};
    use ember::devices::acpi::{SLP_EN, SLP_TYP_SHIFT};
    const ROUNDS: u32 = 20_000;
    let rng = VIRTIO_MMIO_START; // the first virtio-mmio window: virtio-rng, on by default
    let mut a = Asm::new();
    // Bring the rng's transport to FEATURES_OK so that its queue registers take writes.
    for (reg, v) in [
        (0x70, 1),
        (0x70, 3),
        (0x24, 1),
        (0x20, 1),
        (0x70, 11),
        (0x30, 0),
    ] {
        a.mov_eax(v).mmio_write32(rng + reg);
    }
    a.bytes(&[0xb9]).bytes(&ROUNDS.to_le_bytes()); // mov ecx, ROUNDS
    let top = a.here();
    // QueueNum = 3, not a power of two: virtio-queue itself logs "invalid size".
    a.mov_eax(3).mmio_write32(rng + 0x38);
    a.mov_al(1).mmio_write8(rng + 0x70); // status register, 1 byte wide
    a.mov_eax(0).mmio_write32(rng + 0x72); // unaligned
    a.mov_al((3 << SLP_TYP_SHIFT) | SLP_EN)
        .mmio_write8(ACPI_SLEEP_CONTROL); // S3: not offered
    a.bytes(&[0xff, 0xc9]); // dec ecx
    a.jcc(0x75, top); // jnz top
    a.print("done\n").reset();
    let Some(out) = run_tiny("logflood", &a.code, &[], &[], None) else {
        return;
    };
    out.expect_code(0);
    assert!(out.stdout.contains("done"), "{out:?}");
    let lines = |needle: &str| out.stderr.lines().filter(|l| l.contains(needle)).count();
    let (narrow, unaligned, sleep, size) = (
        lines("1-byte write"),
        lines("unaligned write"),
        lines("sleep type 3"),
        lines("invalid size"),
    );
    assert!(
        narrow >= 1 && unaligned >= 1 && sleep >= 1 && size >= 1,
        "{}",
        out.stderr
    );
    // One line per kind per 5 s: a run this short logs a handful, not thousands.
    assert!(
        narrow + unaligned + sleep + size <= 40,
        "{narrow} + {unaligned} + {sleep} + {size} lines: {}",
        &out.stderr[..out.stderr.len().min(2000)]
    );
    assert!(
        out.stderr.len() < 16 << 10,
        "{} bytes of stderr",
        out.stderr.len()
    );
}

/// With a low limit on open files, creating the devices runs out of fds somewhere; wherever
/// that is (the console's dup included, whose fallback once wrapped fd 2 itself and closed
/// it when the VM was torn down), ember must still say why on stderr.
#[test]
fn running_out_of_fds_never_silences_stderr() {
    use std::os::unix::process::CommandExt;
    if !kvm_available("fd-limit") {
        return;
    }
    let dir = temp_dir("fd-limit");
    let mut a = Asm::new();
    a.reset();
    let elf = write_tiny_guest(&dir, "guest.elf", &a.code, &[]);
    let elf = elf.to_str().unwrap();
    for limit in 8..64u64 {
        let mut cmd = ember_command(&["exec", "--kernel", elf, "--mem", "16", "--", "true"]);
        // SAFETY: setrlimit is async-signal-safe; it limits the child only.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = wait_ember(cmd.spawn().unwrap(), T);
        assert!(!out.timed_out, "limit {limit}: {out:?}");
        assert!(
            out.code.is_some(),
            "limit {limit}: killed by a signal: {out:?}"
        );
        assert!(
            !out.stderr.trim().is_empty(),
            "limit {limit}: exit status {:?} and nothing on stderr",
            out.code
        );
        assert!(!out.stderr.contains("panicked"), "limit {limit}: {out:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
