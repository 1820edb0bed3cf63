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

/// A tiny guest as `ember bench` needs one: it prints a first line, the marker line, writes
/// the boot timer (a byte of 123 at its MMIO address), prints `tail` and resets.
fn bench_guest(dir: &std::path::Path, name: &str, tail: &str) -> String {
    let mut a = Asm::new();
    a.print("booting\n")
        .print("tiny-init: running\n")
        .mov_al(123)
        .mmio_write8(0xc000_0000)
        .print(tail)
        .reset();
    write_tiny_guest(dir, name, &a.code, &[])
        .to_str()
        .unwrap()
        .to_string()
}

fn json_strings(v: Option<&Json>) -> Vec<String> {
    v.and_then(Json::as_array)
        .unwrap_or_default()
        .iter()
        .map(|s| s.as_str().unwrap_or("?").to_string())
        .collect()
}

/// `ember bench --ab` with two tiny kernels: runs in ABBA order, 3 samples a side, a
/// comparison with a p-value for each figure, and the report says what A and B are. No
/// timing is asserted (which side is faster is not the point).
#[test]
fn ab_bench_alternates_and_compares() {
    if !kvm_available("ab_bench_alternates_and_compares") {
        return;
    }
    let dir = temp_dir("bench-ab");
    let ka = bench_guest(&dir, "a.elf", "done\n");
    let kb = bench_guest(&dir, "b.elf", "done, with a longer last line\n");
    let json = dir.join("ab.json");
    let out = run_ember(
        &[
            "bench",
            "--kernel",
            &ka,
            "--mem",
            "16",
            "--ab",
            "--b-kernel",
            &kb,
            "--runs",
            "3",
            "--marker",
            "tiny-init:",
            "--timeout",
            "60",
            "--json",
            json.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(300),
    );
    out.expect_code(0);
    for want in [
        "ember bench --ab: A against B, 3 run(s) each in ABBA order (A B B A A B)",
        &format!("   kernel {ka}, initrd none, 1 vCPU(s), 16 MiB, ACPI on"),
        &format!("   kernel {kb}, initrd none"),
        "B differs from A in: kernel",
        "3 of 3 and 3 of 3 runs succeeded",
        // 3 against 3: the smallest p is 2/20.
        "the smallest p-value a permutation test can give is 0.1000: p < 0.01 cannot be reached",
        "marker line (host-seen), ms",
        "== A (3 runs, 0 failed)",
        "== B (3 runs, 0 failed)",
    ] {
        assert!(
            out.stdout.contains(want),
            "{want:?} missing:\n{}",
            out.stdout
        );
    }
    let j = Json::parse(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        j.get("format").and_then(Json::as_str),
        Some("ember-bench-ab/1")
    );
    assert_eq!(json_strings(j.get("run_order")).concat(), "ABBAAB");
    let runs = j.get("runs").and_then(Json::as_array).unwrap();
    let sides: Vec<String> = runs
        .iter()
        .map(|r| r.get("side").and_then(Json::as_str).unwrap().to_string())
        .collect();
    assert_eq!(sides.concat(), "ABBAAB", "{j}");
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r.get("seq").and_then(Json::as_u64), Some(i as u64 + 1));
        assert_eq!(r.get("ok"), Some(&Json::Bool(true)), "{r}");
    }
    // Each side booted its own kernel and read its own report: B's guest prints more, one
    // port I/O exit a byte, so its reports count more port I/O exits than A's.
    let io = |side: &str| -> Vec<u64> {
        runs.iter()
            .filter(|r| r.get("side").and_then(Json::as_str) == Some(side))
            .map(|r| {
                r.get("report")
                    .and_then(|x| x.get("exits"))
                    .and_then(|x| x.get("io"))
                    .and_then(Json::as_u64)
                    .unwrap_or_else(|| panic!("no report of {side}: {r}"))
            })
            .collect()
    };
    let (io_a, io_b) = (io("A"), io("B"));
    assert!(io_a.iter().all(|&n| n == io_a[0]), "{io_a:?}");
    assert!(io_b.iter().all(|&n| n == io_b[0]), "{io_b:?}");
    assert!(io_a[0] < io_b[0], "A {io_a:?}, B {io_b:?}");
    let config = j.get("config").unwrap();
    let kernel = |side: &str| {
        config
            .get(side)
            .and_then(|s| s.get("kernel"))
            .and_then(Json::as_str)
    };
    assert_eq!(kernel("a"), Some(ka.as_str()));
    assert_eq!(kernel("b"), Some(kb.as_str()));
    assert_eq!(json_strings(config.get("differences")), ["kernel"]);
    // Both sides' runs wrote their own reports (a run reading the other side's report
    // would show up as a guest end of another kernel: checked through the samples).
    let cmp = j.get("comparison").unwrap();
    for key in [
        "marker",
        "boot_timer",
        "guest_end",
        "first_kvm_run",
        "peak_rss_mib",
    ] {
        let samples = j.get("samples").and_then(|s| s.get(key)).unwrap();
        for side in ["a", "b"] {
            let v = samples.get(side).and_then(Json::as_array).unwrap();
            assert_eq!(v.len(), 3, "{key} {side}: {samples}");
            assert!(v.iter().all(|x| x.as_f64().is_some_and(|x| x > 0.0)));
        }
        let c = cmp
            .get(key)
            .unwrap_or_else(|| panic!("no comparison of {key}: {cmp}"));
        let p = c.get("p").and_then(Json::as_f64).unwrap();
        assert!((0.0..=1.0).contains(&p), "{key}: {c}");
        // 3 against 3 can never be significant.
        assert_eq!(c.get("significant"), Some(&Json::Bool(false)), "{c}");
        assert_eq!(c.get("test").and_then(Json::as_str), Some("exact"));
        assert_eq!(c.get("permutations").and_then(Json::as_u64), Some(20));
        assert!(c.get("change_pct").and_then(Json::as_f64).is_some(), "{c}");
        assert!(c
            .get("verdict")
            .and_then(Json::as_str)
            .unwrap()
            .starts_with("no significant change (p = "));
    }
    assert_eq!(j.get("comparable"), Some(&Json::Bool(true)));
    let _ = std::fs::remove_dir_all(dir);
}

/// A side whose runs all fail (its guest triple-faults after the marker): every failure is
/// listed with the side's name, A's runs are still summarized, and the bench ends with
/// status 1 saying that a comparison needs 2 successful runs a side. Two runs at a time.
#[test]
fn ab_bench_lists_failed_runs() {
    if !kvm_available("ab_bench_lists_failed_runs") {
        return;
    }
    let dir = temp_dir("bench-ab-fail");
    let ka = bench_guest(&dir, "a.elf", "done\n");
    // Marker, then ud2 with no IDT: #UD, #DF, triple fault (ember exits with status 3).
    let mut b = Asm::new();
    b.print("tiny-init: running\n").bytes(&[0x0f, 0x0b]);
    let kb = write_tiny_guest(&dir, "b.elf", &b.code, &[]);
    let json = dir.join("ab.json");
    let out = run_ember(
        &[
            "bench",
            "--kernel",
            &ka,
            "--mem",
            "16",
            "--ab",
            "--b-kernel",
            kb.to_str().unwrap(),
            "--a-name",
            "good",
            "--b-name",
            "crashy",
            "--runs",
            "2",
            "--parallel",
            "2",
            "--marker",
            "tiny-init:",
            "--json",
            json.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(300),
    );
    out.expect_code(1);
    for want in [
        "2 of 2 and 0 of 2 runs succeeded",
        "no comparison: each side needs at least 2 successful runs; crashy had 0",
        "crashy #1 failed: exited with status 3",
        "crashy #2 failed: exited with status 3",
        "== good (2 runs, 0 failed)",
        "== crashy (2 runs, 2 failed)",
    ] {
        assert!(
            out.stdout.contains(want),
            "{want:?} missing:\n{}",
            out.stdout
        );
    }
    assert!(out.stderr.contains("no comparison"), "{}", out.stderr);
    let j = Json::parse(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        json_strings(j.get("run_order")).concat(),
        "goodcrashycrashygood"
    );
    assert_eq!(j.get("comparable"), Some(&Json::Bool(false)));
    assert_eq!(
        j.get("failed_runs")
            .and_then(|f| f.get("b"))
            .and_then(Json::as_u64),
        Some(2)
    );
    let _ = std::fs::remove_dir_all(dir);
}
