// SPDX-License-Identifier: Apache-2.0
//! Tiny guests for the bench instruments of `ember run`: the boot-timer device as seen in
//! the `--bench-report` JSON (only an 8-bit write of 123 at offset 0 counts), and the guest
//! profiler finding the function a guest spins in, with its callers from the frame chain.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ember::bench::json::Json;

const T: Duration = Duration::from_secs(60);

fn report(path: &std::path::Path) -> Json {
    let text = std::fs::read_to_string(path).expect("ember wrote no --bench-report");
    Json::parse(&text).expect("the report is not JSON")
}

fn phase(r: &Json, name: &str) -> Option<u64> {
    r.get("phases_ns")
        .and_then(|p| p.get(name))
        .and_then(Json::as_u64)
}

#[test]
fn boot_timer_counts_only_the_magic_byte() {
    if !kvm_available("boot_timer_counts_only_the_magic_byte") {
        return;
    }
    let dir = temp_dir("bench-boot-timer");

    // Wrong value, wrong width, wrong offset: none of them is the boot-timer event.
    let mut a = Asm::new();
    a.mov_al(122).mmio_write8(0xc000_0000);
    a.mov_eax(123).mmio_write32(0xc000_0000);
    a.mov_al(123).mmio_write8(0xc000_0001);
    a.print("no timer\n").reset();
    let elf = write_tiny_guest(&dir, "ignored.elf", &a.code, &[]);
    let rep = dir.join("ignored.json");
    let out = run_ember(
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "16",
            "--bench-report",
            rep.to_str().unwrap(),
        ],
        None,
        T,
    );
    out.expect_code(0);
    let r = report(&rep);
    assert_eq!(phase(&r, "boot_timer"), None, "{r}");
    assert!(phase(&r, "first_serial_byte").is_some(), "{r}");
    assert_eq!(
        r.get("memory").and_then(|m| m.get("at_boot_timer")),
        Some(&Json::Null)
    );

    // A byte of 123 at offset 0, after a serial byte: recorded, in order.
    let mut a = Asm::new();
    a.print("x")
        .mov_al(123)
        .mmio_write8(0xc000_0000)
        .print("y\n")
        .reset();
    let elf = write_tiny_guest(&dir, "timer.elf", &a.code, &[]);
    let rep = dir.join("timer.json");
    let out = run_ember(
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "16",
            "--bench-report",
            rep.to_str().unwrap(),
        ],
        None,
        T,
    );
    out.expect_code(0);
    assert_eq!(out.stdout, "xy\n");
    let r = report(&rep);
    let serial = phase(&r, "first_serial_byte").expect("no first serial byte");
    let timer = phase(&r, "boot_timer").expect("the write of 123 was not recorded");
    let end = phase(&r, "guest_end").expect("no guest end");
    let kvm = phase(&r, "first_kvm_run").expect("no first KVM_RUN");
    assert!(kvm <= serial && serial <= timer && timer <= end, "{r}");
    // Memory was sampled when the timer fired: resident guest memory is part of the RSS.
    let m = r
        .get("memory")
        .and_then(|m| m.get("at_boot_timer"))
        .expect("no memory sample");
    let rss = m.get("rss").and_then(Json::as_u64).unwrap();
    let guest = m.get("guest_resident").and_then(Json::as_u64).unwrap();
    assert!(guest > 0 && guest < rss, "{m}");
    assert!(
        r.get("exits")
            .and_then(|e| e.get("io"))
            .and_then(Json::as_u64)
            .unwrap()
            >= 3
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `_start` calls `outer`, which calls `spin`, which loops forever; both callees set up a
/// frame (push rbp; mov rbp, rsp), as compiled kernel code with frame pointers does.
fn spinning_guest() -> (Vec<u8>, Vec<(&'static str, u64, u64)>) {
    let mut a = Asm::new();
    a.print("spinning\n");
    let call_outer = a.here();
    a.bytes(&[0xe8, 0, 0, 0, 0]); // call outer (patched)
    a.reset();
    let start_len = a.here() as u64;
    let outer = a.here();
    a.bytes(&[0x55, 0x48, 0x89, 0xe5]); // push rbp; mov rbp, rsp
    let call_spin = a.here();
    a.bytes(&[0xe8, 0, 0, 0, 0]); // call spin (patched)
    a.bytes(&[0x5d, 0xc3]); // pop rbp; ret
    let spin = a.here();
    a.bytes(&[0x55, 0x48, 0x89, 0xe5]); // push rbp; mov rbp, rsp
    let top = a.here();
    a.bytes(&[0x90, 0x90]); // nop; nop
    a.jmp(top);
    let end = a.here();
    let rel = |from: usize, to: usize| ((to as i64 - (from as i64 + 5)) as i32).to_le_bytes();
    a.code[call_outer + 1..call_outer + 5].copy_from_slice(&rel(call_outer, outer));
    a.code[call_spin + 1..call_spin + 5].copy_from_slice(&rel(call_spin, spin));
    let syms = vec![
        ("_start", 0, start_len),
        ("outer", outer as u64, (spin - outer) as u64),
        ("spin_here", spin as u64, (end - spin) as u64),
    ];
    (a.code, syms)
}

#[test]
fn profiler_finds_the_spin_loop_and_its_callers() {
    if !kvm_available("profiler_finds_the_spin_loop_and_its_callers") {
        return;
    }
    let dir = temp_dir("bench-profiler");
    let (code, syms) = spinning_guest();
    let elf = write_tiny_guest(&dir, "spin.elf", &code, &syms);
    let prof = dir.join("profile.txt");
    let rep = dir.join("report.json");
    let mut child = Command::new(ember_bin())
        .args([
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "16",
            "--profile-guest",
        ])
        .arg(&prof)
        .args(["--profile-rate", "2000", "--bench-report"])
        .arg(&rep)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ember");
    // Wait until the guest is about to spin, let it be sampled for a while, then stop it.
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("spinning") {
        assert!(Instant::now() < deadline, "the guest never printed");
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "ember ended early: {:?}", child.wait());
        seen.extend_from_slice(&buf[..n]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been waited for (its pid is its own).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    // Stopped by a signal, the guest not shutting down by itself: exit status 7.
    assert_eq!(status.code(), Some(7), "{err}");

    let flat = std::fs::read_to_string(&prof).expect("no profile written");
    let top = flat
        .lines()
        .find(|l| l.contains('%') && l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .expect("the profile lists no function");
    assert!(
        top.trim_end().ends_with("spin_here"),
        "top function is not the spin loop:\n{flat}"
    );
    let folded = std::fs::read_to_string(dir.join("profile.txt.folded")).unwrap();
    let first = folded.lines().next().expect("no folded stacks");
    assert!(first.starts_with("_start;outer;spin_here "), "{folded}");
    let r = report(&rep);
    let samples = r
        .get("profile")
        .and_then(|p| p.get("samples"))
        .and_then(Json::as_u64);
    assert!(samples.unwrap_or(0) > 0, "{r}");
    let intr = r
        .get("exits")
        .and_then(|e| e.get("intr"))
        .and_then(Json::as_u64)
        .unwrap();
    assert!(
        intr >= samples.unwrap(),
        "every sample is a signal exit: {r}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `ember bench --compare qemu` (and `--snapshot --compare firecracker`) with the peer not
/// installed: an error before anything boots (status 2, no run started), saying how to
/// install it or give its path. Needs no /dev/kvm: nothing may boot. PATH is a directory
/// without either peer, whatever this host has installed.
#[test]
fn a_missing_peer_is_an_error_before_any_boot() {
    let dir = temp_dir("bench-missing-peer");
    let empty = dir.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let mut a = Asm::new();
    a.print("ember-init: hello\n").reset();
    let elf = write_tiny_guest(&dir, "hello.elf", &a.code, &[]);
    let elf = elf.to_str().unwrap();
    for (args, want) in [
        (
            &[
                "bench",
                "--kernel",
                elf,
                "--mem",
                "16",
                "--runs",
                "1",
                "--compare",
                "qemu",
            ][..],
            &[
                "qemu-system-x86_64 is not installed",
                "apt-get install qemu-system-x86",
                "--compare qemu=PATH",
            ][..],
        ),
        (
            &[
                "bench",
                "--kernel",
                elf,
                "--mem",
                "16",
                "--runs",
                "1",
                "--snapshot",
                "--compare",
                "firecracker",
            ],
            &["firecracker is not installed", "--compare firecracker=PATH"],
        ),
    ] {
        let mut cmd = ember_command(args);
        cmd.env("PATH", &empty);
        let out = wait_ember(cmd.spawn().expect("cannot start ember"), T);
        out.expect_code(2);
        for w in want {
            assert!(
                out.stderr.contains(w),
                "{args:?}: {w:?} missing: {}",
                out.stderr
            );
        }
        // No run started: no progress lines, no report.
        assert!(!out.stderr.contains("[1/"), "{}", out.stderr);
        assert!(!out.stderr.contains("ember #1"), "{}", out.stderr);
        assert_eq!(out.stdout, "", "{args:?}");
    }
}
