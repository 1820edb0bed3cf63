// SPDX-License-Identifier: Apache-2.0
//! Snapshot/restore of KVM state (issue 13, docs/snapshot-pvm.md): a running guest is paused,
//! its KVM state saved and its memory copied, and it is moved into a new KVM VM in the same
//! ember process (`ember run --snapshot-restore-after`), or written to a snapshot directory
//! (`--snapshot-to`) that a second process restores (`--restore-from`). It must go on where
//! it stopped; a damaged or unusable snapshot is refused with status 2.

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
    counting_guest_continues("counting_guest_continues_in_a_new_vm", "");
}

/// The same with the new memory mapped MAP_PRIVATE from a file, as Firecracker loads it.
#[test]
fn counting_guest_continues_from_a_memory_file() {
    counting_guest_continues("counting_guest_continues_from_a_memory_file", "memory-file");
}

/// Paused, saved and resumed in the same VM (a snapshot taken while the guest goes on).
#[test]
fn counting_guest_continues_after_a_pause() {
    counting_guest_continues("counting_guest_continues_after_a_pause", "pause-only");
}

fn counting_guest_continues(name: &str, opts: &str) {
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
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
            "--snapshot-restore-opts",
            opts,
        ],
        None,
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_dir_all(dir);
    assert!(!out.timed_out, "ember did not end: {out:?}");
    out.expect_code(0);
    let done = if opts == "pause-only" {
        "snapshot-restore: saved, and resumed in the same VM"
    } else {
        "snapshot-restore: restored into a new KVM VM"
    };
    assert!(
        out.stderr.contains(done),
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

/// The default Linux guest, moved into a new KVM VM 3 s after its init started (while it
/// runs a loop of `sleep 1`), goes on: every tick is printed, its uptime keeps growing, and it
/// ends with its command's status. Ignored: it boots Linux (about 40 s on a PVM host). Run it
/// with `cargo test --test snapshot_kvm -- --ignored --test-threads=1 --nocapture` (one Linux
/// boot at a time); set EMBER_SNAPSHOT_APPEND to add kernel command-line words (e.g.
/// `clocksource=kvm-clock`) and EMBER_SNAPSHOT_OPTS for --snapshot-restore-opts.
#[test]
#[ignore]
fn linux_guest_keeps_ticking_in_a_new_vm() {
    let name = "linux_guest_keeps_ticking_in_a_new_vm";
    if !kvm_available(name) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(name) else {
        return;
    };
    let cmd = "ember.cmd=\"read -r cs </sys/devices/system/clocksource/clocksource0/\
               current_clocksource; echo cs $cs; i=0; while [ $i -lt 8 ]; do read -r u x \
               </proc/uptime; echo tick $i $u; i=$((i+1)); sleep 1; done\"";
    let append = std::env::var("EMBER_SNAPSHOT_APPEND").unwrap_or_default();
    let opts = std::env::var("EMBER_SNAPSHOT_OPTS").unwrap_or_default();
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--no-rng",
        "--timeout",
        "300",
        "--snapshot-restore-after",
        "3",
    ];
    if !opts.is_empty() {
        args.extend(["--snapshot-restore-opts", &opts]);
    }
    if !append.is_empty() {
        args.extend(["--append", &append]);
    }
    args.extend(["--append", cmd]);
    let out = run_ember(&args, None, Duration::from_secs(330));
    for line in out.stdout.lines().chain(out.stderr.lines()) {
        if line.starts_with("tick") || line.starts_with("cs ") || line.contains("snapshot") {
            eprintln!("{line}");
        }
    }
    assert!(!out.timed_out, "ember did not end: {out:?}");
    assert!(
        out.stderr
            .contains("snapshot-restore: restored into a new KVM VM"),
        "no restore happened: {out:?}"
    );
    let ticks: Vec<(u32, f64)> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .map(|l| {
            let (i, up) = l.split_once(' ').unwrap();
            (i.parse().unwrap(), up.trim().parse().unwrap())
        })
        .collect();
    assert_eq!(
        ticks.iter().map(|t| t.0).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>(),
        "{out:?}"
    );
    assert!(
        ticks.windows(2).all(|w| w[1].1 > w[0].1),
        "uptime went backwards: {ticks:?}"
    );
    assert!(out.stdout.contains("ember-init: exit status 0"), "{out:?}");
}

/// Runs the counting guest in one ember process that snapshots it into `dir/snap` `after`
/// seconds (a decimal string) and ends: the guest's ELF, the snapshot directory and that
/// run's output.
fn snapshot_counting_guest(
    dir: &std::path::Path,
    after: &str,
) -> (std::path::PathBuf, std::path::PathBuf, Finished) {
    let elf = write_tiny_guest(dir, "guest.elf", &counting_guest(), &[]);
    let snap = dir.join("snap");
    let out = run_ember(
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "16",
            "--no-rng",
            "--snapshot-restore-after",
            after,
            "--snapshot-to",
            snap.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(120),
    );
    assert!(
        !out.timed_out,
        "the snapshotting ember did not end: {out:?}"
    );
    assert!(
        out.stderr.contains("snapshot written to"),
        "no snapshot: {out:?}"
    );
    (elf, snap, out)
}

/// Snapshot to files in one ember process, restore in a second one: the counter goes on
/// from where the first process stopped.
#[test]
fn counting_guest_continues_in_a_new_process() {
    let name = "counting_guest_continues_in_a_new_process";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let (elf, snap, out1) = snapshot_counting_guest(&dir, "0.3");
    let common = ["--kernel", elf.to_str().unwrap(), "--mem", "16", "--no-rng"];
    let mut second = vec!["run"];
    second.extend(common);
    second.extend(["--restore-from", snap.to_str().unwrap()]);
    let out2 = run_ember(&second, None, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out2.timed_out, "second ember did not end: {out2:?}");
    out2.expect_code(0);
    // The guest may have been paused in the middle of a line: the second process prints its
    // end, so the two outputs are joined before they are split into lines.
    let both = format!("{}{}", out1.stdout, out2.stdout);
    let all: Vec<u32> = both
        .lines()
        .map(|l| u32::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect();
    let first = out1.stdout.lines().count();
    eprintln!(
        "first process printed {first} lines (ending {:?}), second {} lines",
        out1.stdout.lines().last(),
        out2.stdout.lines().count()
    );
    assert!(
        all == (0..COUNT).collect::<Vec<_>>(),
        "counter went wrong: first {first} lines, second starts with {:?}",
        out2.stdout.lines().next()
    );
}

/// A snapshot whose state file lost one bit is refused (status 2, the checksum named), as is
/// one restored with another configuration.
#[test]
fn damaged_or_mismatched_snapshot_is_refused() {
    let name = "damaged_or_mismatched_snapshot_is_refused";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let (elf, snap, _) = snapshot_counting_guest(&dir, "0.1");
    let common = ["--kernel", elf.to_str().unwrap(), "--mem", "16", "--no-rng"];

    // Another memory size: refused before anything is restored.
    let mut other = vec!["run", "--kernel", elf.to_str().unwrap(), "--mem", "32"];
    other.extend(["--no-rng", "--restore-from", snap.to_str().unwrap()]);
    let out = run_ember(&other, None, Duration::from_secs(60));
    out.expect_code(2);
    assert!(
        out.stderr.contains("memory size 16 MiB"),
        "no mismatch message: {}",
        out.stderr
    );

    // One byte of the state file changed.
    let state = snap.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&state, &bytes).unwrap();
    let mut second = vec!["run"];
    second.extend(common);
    second.extend(["--restore-from", snap.to_str().unwrap()]);
    let out2 = run_ember(&second, None, Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
    out2.expect_code(2);
    assert!(
        out2.stderr.contains("corrupt: checksum mismatch"),
        "no checksum message: {}",
        out2.stderr
    );
    assert!(out2.stdout.is_empty(), "the guest ran: {out2:?}");
}

/// A VM with virtio devices cannot be restored yet: refused with status 2, saying that
/// `--no-rng` is needed.
#[test]
fn restore_with_virtio_devices_is_refused() {
    let name = "restore_with_virtio_devices_is_refused";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &counting_guest(), &[]);
    let snap = dir.join("snap");
    let args = [
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--mem",
        "16",
        "--restore-from",
        snap.to_str().unwrap(),
    ];
    let out = run_ember(&args, None, Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
    out.expect_code(2);
    assert!(
        out.stderr.contains("virtio devices") && out.stderr.contains("--no-rng"),
        "no --no-rng hint: {}",
        out.stderr
    );
}

/// The default Linux guest, snapshotted to files 3 s after its init started (in its loop of
/// `sleep 1`), restored by a second ember process: the ticks go on there and the guest ends
/// cleanly. Ignored: it boots Linux (about 40 s on a PVM host). Run it with `cargo test
/// --test snapshot_kvm -- --ignored --test-threads=1 --nocapture`.
#[test]
#[ignore]
fn linux_guest_continues_in_a_new_process() {
    let name = "linux_guest_continues_in_a_new_process";
    if !kvm_available(name) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(name) else {
        return;
    };
    let dir = temp_dir(name);
    let snap = dir.join("snap");
    let cmd = "ember.cmd=\"i=0; while [ $i -lt 8 ]; do read -r u x </proc/uptime; echo tick \
               $i $u; i=$((i+1)); sleep 1; done\"";
    let common = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--no-rng",
        "--timeout",
        "300",
    ];
    let mut first = common.to_vec();
    first.extend([
        "--snapshot-restore-after",
        "3",
        "--snapshot-to",
        snap.to_str().unwrap(),
        "--append",
        cmd,
    ]);
    let out1 = run_ember(&first, None, Duration::from_secs(330));
    assert!(
        out1.stderr.contains("snapshot written to"),
        "no snapshot: {out1:?}"
    );
    // The same VM flags (the command line included: the snapshot's configuration is
    // checked).
    let mut second = common.to_vec();
    second.extend(["--restore-from", snap.to_str().unwrap(), "--append", cmd]);
    let out2 = run_ember(&second, None, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&dir);
    let ticks = |s: &str| -> Vec<u32> {
        s.lines()
            .filter_map(|l| l.strip_prefix("tick "))
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    };
    let (a, b) = (ticks(&out1.stdout), ticks(&out2.stdout));
    eprintln!("first process: ticks {a:?}; second process: ticks {b:?}");
    let all: Vec<u32> = a.iter().chain(&b).copied().collect();
    assert_eq!(all, (0..8).collect::<Vec<_>>(), "{out1:?}\n{out2:?}");
    assert!(!b.is_empty(), "nothing ran in the second process: {out2:?}");
    assert!(
        out2.stdout.contains("ember-init: exit status 0"),
        "{out2:?}"
    );
    out2.expect_code(0);
}
