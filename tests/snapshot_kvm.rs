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
    counting_code(Some(COUNT), None, true)
}

/// The counting guests' code: from 0, a line per value in hex (8 digits), until `count`
/// (then a reset) or for ever (`None`); with `busy_wait`, a short wait after each line; with
/// `ready_at`, a 4-byte write of 52 to the exit device's ready register (0xC000_1004, what warm
/// `ember exec`'s agent writes) when the counter reaches that value, before it is printed.
fn counting_code(count: Option<u32>, ready_at: Option<u32>, busy_wait: bool) -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_al(123).mmio_write8(0xc000_0000); // boot timer: "init started"
    a.bytes(&[0x31, 0xdb]); // xor ebx, ebx (the counter)
    let top = a.here();
    if let Some(at) = ready_at {
        a.bytes(&[0x81, 0xfb]).bytes(&at.to_le_bytes()); // cmp ebx, at
        a.bytes(&[0x75, 17]); // jne over the next 17 bytes
        a.mov_eax(52).mmio_write32(0xc000_1004); // 5 + 12 bytes
    }
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
    if busy_wait {
        a.bytes(&[0xb9, 0x00, 0x04, 0, 0]); // mov ecx, 1024 (busy wait)
        let wait = a.here();
        a.bytes(&[0xff, 0xc9]); // dec ecx
        a.jcc(0x75, wait); // jnz wait
    }
    a.bytes(&[0xff, 0xc3]); // inc ebx
    match count {
        Some(n) => {
            a.bytes(&[0x81, 0xfb]).bytes(&n.to_le_bytes()); // cmp ebx, n
            a.jcc(0x75, top); // jnz top
            a.reset();
        }
        None => {
            a.jmp(top);
        }
    }
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
/// from where the first process stopped. The VM has its default virtio-rng, which this guest
/// never activates: its transport is saved and restored as it was.
#[test]
fn counting_guest_continues_in_a_new_process() {
    let name = "counting_guest_continues_in_a_new_process";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let (elf, snap, out1) = snapshot_counting_guest(&dir, "0.3");
    let common = ["--kernel", elf.to_str().unwrap(), "--mem", "16"];
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

/// `ember restore DIR` with no VM flags: the configuration comes from the snapshot, the
/// kernel file is not needed any more (guest memory is mapped from the snapshot), and the
/// counter goes on. The memory file is not written (the restore wrote a new VM generation
/// ID into guest memory: into a private copy of its page), and restored again, the guest
/// goes on from the same point.
#[test]
fn ember_restore_resumes_the_counting_guest() {
    let name = "ember_restore_resumes_the_counting_guest";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let (elf, snap, out1) = snapshot_counting_guest(&dir, "0.3");
    std::fs::remove_file(&elf).unwrap();
    let memory = std::fs::read(snap.join("memory")).unwrap();
    let restore = ["restore", snap.to_str().unwrap()];
    let out2 = run_ember(&restore, None, Duration::from_secs(120));
    assert!(!out2.timed_out, "the restored guest hung: {out2:?}");
    out2.expect_code(0);
    assert!(
        out2.stderr.contains("restored the snapshot in") && out2.stderr.contains("vCPUs started"),
        "no restore line: {}",
        out2.stderr
    );
    assert_counted_on(&out1, &out2);
    assert!(
        std::fs::read(snap.join("memory")).unwrap() == memory,
        "the restored VM wrote into the snapshot's memory file"
    );
    let out3 = run_ember(&restore, None, Duration::from_secs(120));
    out3.expect_code(0);
    assert!(
        out3.stdout == out2.stdout,
        "the second restore did not go on from the snapshot's point: first starts {:?}, \
         second {:?}",
        out2.stdout.lines().next(),
        out3.stdout.lines().next()
    );
    // The console may go elsewhere (a host-side setting, not the snapshot's).
    let out4 = run_ember(
        &[
            "restore",
            "--console",
            "null",
            "--no-stdin",
            snap.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_dir_all(&dir);
    out4.expect_code(0);
    assert!(out4.stdout.is_empty(), "--console null: {out4:?}");
}

/// `ember restore` refuses, with status 2 and a message that names the problem, before the
/// guest runs: a memory file that was truncated, a state file with one bit flipped, a
/// directory that is not a snapshot, and --vsock-uds for a VM without vsock.
#[test]
fn ember_restore_refuses_a_truncated_or_corrupt_snapshot() {
    let name = "ember_restore_refuses_a_truncated_or_corrupt_snapshot";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let (_, snap, _) = snapshot_counting_guest(&dir, "0.1");
    let snap_arg = snap.to_str().unwrap();
    let refused = |args: &[&str], want: &[&str]| {
        let out = run_ember(args, None, Duration::from_secs(60));
        out.expect_code(2);
        assert!(
            want.iter().all(|w| out.stderr.contains(w)),
            "{args:?}: wanted {want:?} in: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "the guest ran: {out:?}");
    };

    refused(
        &["restore", "--vsock-uds", "/tmp/x.sock", snap_arg],
        &["--vsock-uds /tmp/x.sock: the snapshot's VM has no vsock device"],
    );

    // The memory file loses its second half.
    let memory = snap.join("memory");
    let len = std::fs::metadata(&memory).unwrap().len();
    assert_eq!(len, 16 << 20);
    f_set_len(&memory, len / 2);
    refused(
        &["restore", snap_arg],
        &[
            "the memory file is 8388608 bytes, but the guest memory is 16777216",
            "memory",
        ],
    );
    f_set_len(&memory, len);

    // One byte of the state file changed.
    let state = snap.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&state, &bytes).unwrap();
    refused(&["restore", snap_arg], &["corrupt: checksum mismatch"]);

    // Not a snapshot directory at all.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(
        &["restore", empty.to_str().unwrap()],
        &[&format!("snapshot file {}", empty.join("state").display())],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sets the length of the file at `path`.
fn f_set_len(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// The joined output of a counting guest's two processes is every value once, in order.
fn assert_counted_on(out1: &Finished, out2: &Finished) {
    let both = format!("{}{}", out1.stdout, out2.stdout);
    let all: Vec<u32> = both
        .lines()
        .map(|l| u32::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect();
    assert!(
        all == (0..COUNT).collect::<Vec<_>>(),
        "counter went wrong: first {} lines, second starts with {:?}",
        out1.stdout.lines().count(),
        out2.stdout.lines().next()
    );
}

/// A VM with a virtio-blk disk (and its virtio-rng) is snapshotted to files and restored with
/// the disk reopened by path: the counter goes on. A disk whose size changed since the
/// snapshot is refused (status 2, both sizes named) before the guest runs.
#[test]
fn restore_with_a_disk_reopens_it_and_refuses_another_size() {
    let name = "restore_with_a_disk_reopens_it_and_refuses_another_size";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &counting_guest(), &[]);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let snap = dir.join("snap");
    let common = [
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--mem",
        "16",
        "--disk",
        disk.to_str().unwrap(),
    ];
    let mut first = common.to_vec();
    first.extend([
        "--snapshot-restore-after",
        "0.3",
        "--snapshot-to",
        snap.to_str().unwrap(),
    ]);
    let out1 = run_ember(&first, None, Duration::from_secs(120));
    assert!(!out1.timed_out, "{out1:?}");
    assert!(
        out1.stderr.contains("snapshot written to"),
        "no snapshot: {out1:?}"
    );
    let mut second = common.to_vec();
    second.extend(["--restore-from", snap.to_str().unwrap()]);

    // The disk grew.
    std::fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    let grown = run_ember(&second, None, Duration::from_secs(60));
    grown.expect_code(2);
    assert!(
        grown.stderr.contains("1048576 bytes") && grown.stderr.contains("2097152 bytes"),
        "no size message: {}",
        grown.stderr
    );
    assert!(grown.stdout.is_empty(), "the guest ran: {grown:?}");

    // The same size again: restored.
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let out2 = run_ember(&second, None, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out2.timed_out, "second ember did not end: {out2:?}");
    out2.expect_code(0);
    assert_counted_on(&out1, &out2);
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
    let common = ["--kernel", elf.to_str().unwrap(), "--mem", "16"];

    // Another memory size: refused before anything is restored.
    let mut other = vec!["run", "--kernel", elf.to_str().unwrap(), "--mem", "32"];
    other.extend(["--restore-from", snap.to_str().unwrap()]);
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

/// A VM with virtio-vsock (which this guest never activates) is snapshotted to files and
/// restored with another CID and another Unix socket path (host-side settings): the counter
/// goes on. Restoring it without --vsock is refused (status 2, the devices named), and so is
/// a restore with a NIC the snapshot's VM did not have (status 2, before its TAP is opened:
/// this one does not exist), as is a move into a new KVM VM with any virtio device (the
/// default virtio-rng). (`restore_moves_a_nic_onto_another_tap` restores a VM with a NIC.)
#[test]
fn restore_with_vsock_goes_on_and_with_another_nic_count_is_refused() {
    let name = "restore_with_vsock_goes_on_and_with_another_nic_count_is_refused";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &counting_guest(), &[]);
    let snap = dir.join("snap");
    let vsock_a = format!("cid=3,uds={}", dir.join("a.sock").display());
    let vsock_b = format!("cid=4,uds={}", dir.join("b.sock").display());
    let common = ["run", "--kernel", elf.to_str().unwrap(), "--mem", "16"];
    let mut first = common.to_vec();
    first.extend([
        "--vsock",
        &vsock_a,
        "--snapshot-restore-after",
        "0.3",
        "--snapshot-to",
        snap.to_str().unwrap(),
    ]);
    let out1 = run_ember(&first, None, Duration::from_secs(120));
    assert!(!out1.timed_out, "{out1:?}");
    assert!(
        out1.stderr.contains("snapshot written to"),
        "no snapshot of a VM with vsock: {out1:?}"
    );

    // Without the vsock device: refused, the devices named.
    let mut without = common.to_vec();
    without.extend(["--restore-from", snap.to_str().unwrap()]);
    let out = run_ember(&without, None, Duration::from_secs(60));
    out.expect_code(2);
    assert!(
        out.stderr.contains("devices") && out.stderr.contains("virtio-vsock"),
        "no device mismatch message: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "the guest ran: {out:?}");

    // With a NIC the snapshot's VM did not have: refused, saying why, before the TAP (which
    // does not exist) is opened.
    let mut net = without.clone();
    net.extend(["--vsock", &vsock_b, "--net", "tap=embernotap9"]);
    let out = run_ember(&net, None, Duration::from_secs(60));
    out.expect_code(2);
    assert!(
        out.stderr.contains(
            "the snapshot was taken with NIC count 0, but this VM has 1 (TAP embernotap9); \
             give one --net per NIC of the snapshot"
        ) && !out.stderr.contains("does not exist"),
        "no NIC count message: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "the guest ran: {out:?}");

    // Another CID and socket path: restored, the counter goes on.
    let mut second = common.to_vec();
    second.extend([
        "--vsock",
        &vsock_b,
        "--restore-from",
        snap.to_str().unwrap(),
    ]);
    let out2 = run_ember(&second, None, Duration::from_secs(120));
    assert!(!out2.timed_out, "second ember did not end: {out2:?}");
    out2.expect_code(0);
    assert_counted_on(&out1, &out2);

    // A move into a new KVM VM in this process refuses the default virtio-rng.
    let args = [
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--mem",
        "16",
        "--snapshot-restore-after",
        "0.1",
    ];
    let out = run_ember(&args, None, Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.timed_out, "{out:?}");
    assert!(
        out.stderr.contains("virtio devices") && out.stderr.contains("--no-rng"),
        "no --no-rng hint: {}",
        out.stderr
    );
}

/// A VM with a NIC (which this guest never activates) on TAP embsnapA, in a network
/// namespace, is snapshotted to files. `ember restore --tap embsnapB` puts the NIC on another
/// TAP (its MAC, derived from the old TAP's name, kept) and the counter goes on; a plain
/// `ember restore` puts it back on embsnapA (free again: the first process ended) and the
/// guest goes on from the same point. Refused with status 2 before the guest runs: more
/// --tap than NICs, and `ember run --restore-from` with a NIC on embsnapB whose (derived)
/// MAC is not the guest's. Needs root and iproute2 for the namespace and TAPs (skips
/// otherwise).
#[test]
fn restore_moves_a_nic_onto_another_tap() {
    let name = "restore_moves_a_nic_onto_another_tap";
    if !kvm_available(name) || !netns_capable(name) {
        return;
    }
    let ns = Netns::new("snapnic").expect("cannot create a network namespace");
    for tap in ["embsnapA", "embsnapB"] {
        ns.ip(&["tuntap", "add", tap, "mode", "tap"]);
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &counting_guest(), &[]);
    let snap = dir.join("snap");
    let snap_arg = snap.to_str().unwrap();
    let run = |args: &[&str]| {
        let child = ns.ember(args).spawn().expect("cannot start ember");
        wait_ember(child, Duration::from_secs(120))
    };
    let common = ["--kernel", elf.to_str().unwrap(), "--mem", "16"];
    let mut first = vec!["run"];
    first.extend(common);
    first.extend([
        "--net",
        "tap=embsnapA",
        "--snapshot-restore-after",
        "0.3",
        "--snapshot-to",
        snap_arg,
    ]);
    let out1 = run(&first);
    assert!(!out1.timed_out, "{out1:?}");
    assert!(
        out1.stderr.contains("snapshot written to"),
        "no snapshot of a VM with a NIC: {out1:?}"
    );

    let refused = |out: Finished, want: &str| {
        out.expect_code(2);
        assert!(
            out.stderr.contains(want),
            "wanted {want:?} in: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "the guest ran: {out:?}");
    };
    refused(
        run(&[
            "restore", "--tap", "embsnapB", "--tap", "embsnapC", snap_arg,
        ]),
        "--tap embsnapC: the snapshot's VM has 1 NIC(s) (on TAP embsnapA): give at most one \
         --tap per NIC",
    );
    let mut other_mac = vec!["run"];
    other_mac.extend(common);
    other_mac.extend(["--net", "tap=embsnapB", "--restore-from", snap_arg]);
    refused(
        run(&other_mac),
        "a NIC keeps the guest's MAC: give --net tap=embsnapB,mac=",
    );

    let out2 = run(&["restore", "--no-stdin", "--tap", "embsnapB", snap_arg]);
    assert!(!out2.timed_out, "the restored guest hung: {out2:?}");
    out2.expect_code(0);
    assert!(
        out2.stderr
            .contains("was on TAP embsnapA at the snapshot and is on TAP embsnapB now"),
        "no TAP move logged: {}",
        out2.stderr
    );
    assert_counted_on(&out1, &out2);
    let out3 = run(&["restore", "--no-stdin", snap_arg]);
    let _ = std::fs::remove_dir_all(&dir);
    out3.expect_code(0);
    assert!(!out3.stderr.contains("is on TAP"), "{}", out3.stderr);
    assert!(
        out3.stdout == out2.stdout,
        "the restore on the snapshot's own TAP did not go on from the same point"
    );
}

/// The first virtio-mmio window: with no disk, NIC or vsock, the default virtio-rng.
const RNG_MMIO: u64 = 0xd000_0000;
/// The rng queue's rings and buffers in the guest's RAM (identity-mapped, zero at boot).
const DESC: u32 = 0x20_0000;
const AVAIL: u32 = 0x20_1000;
const USED: u32 = 0x20_2000;
const BUF: u32 = 0x20_3000;
/// TSC ticks for which the rng guest prints dots between its two requests (the snapshot is
/// taken meanwhile, 0.2 s in): about 2.5 s at this host's 2.6 GHz, so that a loaded CI
/// machine that runs ember's snapshot timer late still takes it before the second request.
const DOT_TICKS: u64 = 6_500_000_000;

/// Makes the guest wait until the rng's used ring index is `n`, then print it as a digit and
/// a newline.
fn wait_used_and_print(a: &mut Asm, n: u8) {
    a.bytes(&[0x48, 0xbf]).bytes(&u64::from(USED).to_le_bytes()); // mov rdi, USED
    let top = a.here();
    a.bytes(&[0x0f, 0xb7, 0x47, 0x02]); // movzx eax, word [rdi + 2] (used->idx)
    a.bytes(&[0x83, 0xf8, n]); // cmp eax, n
    a.jcc(0x75, top); // jnz top
    a.bytes(&[0x04, b'0']); // add al, '0'
    a.mov_dx(0x3f8).out_dx_al();
    a.mov_al(b'\n').out_dx_al();
}

/// A guest that drives virtio-rng as a driver would: status ACK, DRIVER, VERSION_1,
/// FEATURES_OK, queue 0 (size 4) set up and ready, DRIVER_OK; it posts one 16-byte request,
/// waits for the device to fill it and prints the used index ('1'), prints dots for
/// DOT_TICKS of the TSC (the snapshot is taken meanwhile), posts a second request, waits and
/// prints '2', and resets.
fn rng_guest() -> Vec<u8> {
    let reg = |r: u64| RNG_MMIO + r;
    let mut a = Asm::new();
    a.mov_al(123).mmio_write8(0xc000_0000); // boot timer: "init started"
    for (r, v) in [
        (0x70, 0),    // status: reset
        (0x70, 1),    // ACK
        (0x70, 3),    // DRIVER
        (0x24, 1),    // DriverFeaturesSel 1
        (0x20, 1),    // VERSION_1 (feature bit 32)
        (0x70, 11),   // FEATURES_OK
        (0x30, 0),    // QueueSel 0
        (0x38, 4),    // QueueNum
        (0x80, DESC), // QueueDesc
        (0x84, 0),
        (0x90, AVAIL), // QueueAvail
        (0x94, 0),
        (0xa0, USED), // QueueUsed
        (0xa4, 0),
        (0x44, 1),  // QueueReady
        (0x70, 15), // DRIVER_OK
    ] {
        a.mov_eax(v).mmio_write32(reg(r));
    }
    // Descriptors 0 and 1: 16 device-writable bytes each.
    for i in 0..2u32 {
        let d = u64::from(DESC + 16 * i);
        a.mov_eax(BUF + 0x100 * i).mmio_write32(d);
        a.mov_eax(0).mmio_write32(d + 4);
        a.mov_eax(16).mmio_write32(d + 8);
        a.mov_eax(2).mmio_write32(d + 12); // VIRTQ_DESC_F_WRITE, next 0
    }
    a.mov_eax(1 << 16).mmio_write32(u64::from(AVAIL + 4)); // ring[0] = 0, ring[1] = 1
                                                           // Request 1: avail idx 1, notify.
    a.mov_eax(1 << 16).mmio_write32(u64::from(AVAIL));
    a.mov_eax(0).mmio_write32(reg(0x50));
    wait_used_and_print(&mut a, 1);
    // Dots, each after a short busy wait, for DOT_TICKS of the TSC.
    let rdtsc = [0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0]; // rax = TSC
    a.bytes(&rdtsc).bytes(&[0x48, 0x89, 0xc6]); // mov rsi, rax
    let top = a.here();
    a.mov_dx(0x3f8).mov_al(b'.').out_dx_al();
    a.bytes(&[0xb9, 0x00, 0x04, 0, 0]); // mov ecx, 1024
    let wait = a.here();
    a.bytes(&[0xff, 0xc9]); // dec ecx
    a.jcc(0x75, wait);
    a.bytes(&rdtsc).bytes(&[0x48, 0x29, 0xf0]); // sub rax, rsi
    a.bytes(&[0x48, 0xbf]).bytes(&DOT_TICKS.to_le_bytes()); // mov rdi, DOT_TICKS
    a.bytes(&[0x48, 0x39, 0xf8]); // cmp rax, rdi
    a.jcc(0x72, top); // jb top
    a.mov_dx(0x3f8).mov_al(b'\n').out_dx_al();
    // Request 2: avail idx 2, notify.
    a.mov_eax(2 << 16).mmio_write32(u64::from(AVAIL));
    a.mov_eax(0).mmio_write32(reg(0x50));
    wait_used_and_print(&mut a, 2);
    a.reset();
    a.code
}

/// A guest that activated virtio-rng and had one request filled is snapshotted to files;
/// restored in a second process, its second request is filled by the restored device (its
/// queue, in the new process's guest memory, goes on at used index 2).
#[test]
fn activated_rng_serves_requests_after_a_restore() {
    let name = "activated_rng_serves_requests_after_a_restore";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &rng_guest(), &[]);
    let snap = dir.join("snap");
    let common = ["run", "--kernel", elf.to_str().unwrap(), "--mem", "16"];
    let mut first = common.to_vec();
    first.extend([
        "--snapshot-restore-after",
        "0.2",
        "--snapshot-to",
        snap.to_str().unwrap(),
    ]);
    let out1 = run_ember(&first, None, Duration::from_secs(60));
    assert!(
        !out1.timed_out,
        "the snapshotting ember did not end: {out1:?}"
    );
    assert!(
        out1.stderr.contains("snapshot written to"),
        "no snapshot: {out1:?}"
    );
    assert!(
        out1.stdout.starts_with("1\n") && !out1.stdout.contains('2'),
        "the first request was not filled, or the snapshot came after the second: {:?}",
        &out1.stdout[..out1.stdout.len().min(200)]
    );
    let mut second = common.to_vec();
    second.extend(["--restore-from", snap.to_str().unwrap()]);
    let out2 = run_ember(&second, None, Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out2.timed_out, "the restored guest hung: {out2:?}");
    out2.expect_code(0);
    let both = format!("{}{}", out1.stdout, out2.stdout);
    eprintln!(
        "first process printed {} dots, second {}",
        out1.stdout.matches('.').count(),
        out2.stdout.matches('.').count()
    );
    let dots = both.len() - "1\n\n2\n".len();
    assert!(
        both.starts_with("1\n") && both[2..2 + dots].bytes().all(|b| b == b'.'),
        "the guest restarted or printed something else: {:?}",
        &both[..both.len().min(200)]
    );
    assert!(
        both.ends_with(".\n2\n"),
        "no second request filled: {:?}",
        &both[both.len().saturating_sub(200)..]
    );
}

/// What `linux_guest_continues_in_a_new_process` puts on its disk for the guest to read.
const DISK_MARK: &str = "ember-snapshot-disk!";

/// The default Linux guest with its virtio-rng and a virtio-blk disk, snapshotted to files 3 s after its init
/// started (in its loop of `sleep 1`), restored by a second ember process: the ticks go on
/// there, the guest reads 16 bytes from /dev/hwrng and reads and writes its disk (the restored
/// devices), and ends cleanly. Ignored: it boots Linux (about 40 s on a PVM host). Run it with `cargo test
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
    // A 1 MiB disk with a mark in sector 1024 (far from what the kernel reads when it probes
    // the disk, so not in its page cache).
    let disk = dir.join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[1024 * 512..][..DISK_MARK.len()].copy_from_slice(DISK_MARK.as_bytes());
    std::fs::write(&disk, &image).unwrap();
    // After the ticks, 16 bytes read from /dev/hwrng and the disk's mark read, then a line
    // written to sector 1536 (synced): the restored virtio-rng and virtio-blk serve them.
    let cmd = "ember.cmd=\"i=0; while [ $i -lt 8 ]; do read -r u x </proc/uptime; echo tick \
               $i $u; i=$((i+1)); sleep 1; done; read -r cur </sys/class/misc/hw_random/\
               rng_current; echo hwrng $cur $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | \
               base64); echo disk $(dd if=/dev/vda bs=512 skip=1024 count=1 2>/dev/null | \
               head -c 20); echo written-after-restore | dd of=/dev/vda bs=512 seek=1536 \
               conv=fsync 2>/dev/null; echo wrote $?\"";
    let common = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
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
    let written = std::fs::read(&disk).unwrap();
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
    let hwrng = out2.stdout.lines().find(|l| l.starts_with("hwrng "));
    eprintln!("second process: {hwrng:?}");
    let words: Vec<&str> = hwrng.unwrap_or_default().split_whitespace().collect();
    assert!(
        words.len() == 3 && words[1].starts_with("virtio_rng") && words[2].len() == 24,
        "the restored guest read nothing from its virtio-rng: {out2:?}"
    );
    let mark = out2.stdout.lines().find(|l| l.starts_with("disk "));
    eprintln!("second process: {mark:?}");
    assert_eq!(mark, Some(format!("disk {DISK_MARK}").as_str()), "{out2:?}");
    assert!(out2.stdout.contains("wrote 0"), "{out2:?}");
    assert!(
        written[1536 * 512..].starts_with(b"written-after-restore\n"),
        "the restored guest's write did not reach the disk image"
    );
    assert!(
        out2.stdout.contains("ember-init: exit status 0"),
        "{out2:?}"
    );
    out2.expect_code(0);
}

/// The value of the counter at which [`ready_counting_guest`] writes the ready register.
const READY_AT: u32 = COUNT / 2;

/// [`counting_guest`] without the busy wait, writing the ready register once the counter
/// reaches [`READY_AT`]: a point to snapshot at that does not depend on the host's speed.
fn ready_counting_guest() -> Vec<u8> {
    counting_code(Some(COUNT), Some(READY_AT), false)
}

fn counted(out: &Finished) -> Vec<u32> {
    out.stdout
        .lines()
        .map(|l| u32::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect()
}

/// `ember run --snapshot-on ready --snapshot-to DIR`: the snapshot is taken when the guest
/// writes the ready register (the run loop pauses the vCPUs right after; the guest may print
/// a few more lines before they stop). With `--snapshot-then stop` the run ends there (status
/// 0); with `continue` the guest counts to the end. A restore of either snapshot goes on
/// from where the snapshot was taken.
#[test]
fn snapshot_on_ready_is_taken_at_the_guests_signal() {
    let name = "snapshot_on_ready_is_taken_at_the_guests_signal";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &ready_counting_guest(), &[]);
    let vm = ["--kernel", elf.to_str().unwrap(), "--mem", "16"];
    for then in ["stop", "continue"] {
        let snap = dir.join(then);
        let mut args = vec!["run"];
        args.extend(vm);
        args.extend(["--snapshot-on", "ready", "--snapshot-to"]);
        args.extend([snap.to_str().unwrap(), "--snapshot-then", then]);
        let out1 = run_ember(&args, None, Duration::from_secs(120));
        assert!(!out1.timed_out, "{out1:?}");
        out1.expect_code(0);
        assert!(out1.stderr.contains("snapshot written to"), "{out1:?}");
        let mut args = vec!["run"];
        args.extend(vm);
        args.extend(["--restore-from", snap.to_str().unwrap()]);
        let out2 = run_ember(&args, None, Duration::from_secs(120));
        assert!(!out2.timed_out, "{out2:?}");
        out2.expect_code(0);
        let printed = out1.stdout.lines().count() as u32;
        eprintln!(
            "--snapshot-then {then}: first run {printed} lines, restore {} lines",
            out2.stdout.lines().count()
        );
        if then == "stop" {
            assert!(
                (READY_AT..COUNT).contains(&printed),
                "stopped after {printed} lines, not at the signal ({READY_AT})"
            );
            assert_counted_on(&out1, &out2);
        } else {
            assert_eq!(counted(&out1), (0..COUNT).collect::<Vec<_>>());
            // The restore prints the tail from the snapshot point on (its first line may be
            // the end of a line the first run had started).
            let tail = out2.stdout.lines().count() as u32;
            assert!(tail <= COUNT - READY_AT + 1, "restore printed {tail} lines");
            assert!(out1.stdout.ends_with(&out2.stdout), "{out2:?}");
        }
    }
    // Without --snapshot-to the flag is refused.
    let mut args = vec!["run"];
    args.extend(vm);
    args.extend(["--snapshot-on", "ready"]);
    run_ember(&args, None, Duration::from_secs(60)).expect_code(2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The vsock port the guest of `linux_vsock_listener_is_reached_after_a_restore` listens on.
const VSOCK_PORT: u32 = 5000;

/// What the host of that test got: connect attempts (each a `CONNECT` line), the replies
/// that were not `OK`, time to the `OK` line and to the whole echo (from the restoring
/// process's start), and the bytes echoed.
#[derive(Debug)]
struct VsockEcho {
    attempts: u32,
    refused: Vec<String>,
    ok_after: Duration,
    echo_after: Duration,
    back: Vec<u8>,
}

/// Connects to the guest's port through the Unix socket `uds` (`CONNECT <port>`), retrying
/// until the socket exists and the guest accepts (or `deadline`), sends `data`, shuts down
/// its write half and reads the echo to its end.
fn vsock_echo_from_host(
    uds: &std::path::Path,
    data: &[u8],
    start: std::time::Instant,
    deadline: std::time::Instant,
) -> Result<VsockEcho, String> {
    use std::io::{Read, Write};
    let mut attempts = 0;
    let mut refused = Vec::new();
    loop {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the guest never accepted: {attempts} attempts, replies {refused:?}"
            ));
        }
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(uds) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        attempts += 1;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(format!("CONNECT {VSOCK_PORT}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        if !line.starts_with("OK ") {
            // ember closed the stream: the guest answered with a RST.
            refused.push(line);
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let ok_after = start.elapsed();
        let mut w = s.try_clone().unwrap();
        let data = data.to_vec();
        let writer = std::thread::spawn(move || {
            let r = w.write_all(&data);
            let _ = w.shutdown(std::net::Shutdown::Write);
            r
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .map_err(|e| format!("reading the echo: {e}"))?;
        writer
            .join()
            .unwrap()
            .map_err(|e| format!("sending: {e}"))?;
        return Ok(VsockEcho {
            attempts,
            refused,
            ok_after,
            echo_after: start.elapsed(),
            back,
        });
    }
}

/// The warm-exec shape: the default Linux guest with virtio-vsock runs vsock-io
/// (resources/guest/vsock-io.c, appended to the initramfs), blocked in accept() on vsock
/// port 5000 when it is snapshotted to files (5 s after its init started; no connection
/// exists). A second ember process restores it with another CID (7 for 3) and another Unix
/// socket path; the host connects to the guest's port through the new socket and gets back
/// what it sends. The new CID makes the restored device's TRANSPORT_RESET event necessary:
/// a guest that did not re-read its CID would answer from CID 3, which ember drops. Ignored:
/// it boots Linux (about 40-70 s on a PVM host). Run it with `cargo test --test snapshot_kvm
/// -- --ignored --test-threads=1 --nocapture linux_vsock` (one Linux boot at a time).
#[test]
#[ignore]
fn linux_vsock_listener_is_reached_after_a_restore() {
    let name = "linux_vsock_listener_is_reached_after_a_restore";
    if !kvm_available(name) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(name) else {
        return;
    };
    let dir = temp_dir(name);
    let Some(helper) = build_vsock_io(&dir) else {
        return;
    };
    // The default initramfs plus a second archive with /vsock-io.
    let mut initramfs = std::fs::read(&initrd).unwrap();
    initramfs.resize(initramfs.len().next_multiple_of(4), 0);
    let mut extra = ember::cpio::CpioWriter::new();
    extra.add_file("/vsock-io", 0o755, 0, helper).unwrap();
    initramfs.extend(extra.finish());
    let initrd = dir.join("initramfs.cpio");
    std::fs::write(&initrd, &initramfs).unwrap();

    let snap = dir.join("snap");
    let (uds_a, uds_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let cmd = format!(
        "ember.cmd=\"echo vsock-listen; /vsock-io echo {VSOCK_PORT} 1; echo vsock-echo-status $?\""
    );
    let common = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--timeout",
        "300",
        "--append",
        &cmd,
    ];
    let vsock_a = format!("cid=3,uds={}", uds_a.display());
    let mut first = common.to_vec();
    first.extend([
        "--vsock",
        &vsock_a,
        "--snapshot-restore-after",
        "5",
        "--snapshot-to",
        snap.to_str().unwrap(),
    ]);
    let out1 = run_ember(&first, None, Duration::from_secs(330));
    eprintln!("first process: {:?} in all", out1.elapsed);
    for line in out1.stderr.lines().filter(|l| l.contains("snapshot")) {
        eprintln!("  {line}");
    }
    assert!(
        out1.stderr.contains("snapshot written to"),
        "no snapshot: {out1:?}"
    );
    // (The command line, which holds these words too, is echoed in the boot log: whole
    // lines only.)
    let has_line = |out: &str, f: &dyn Fn(&str) -> bool| out.lines().any(|l| f(l.trim_end()));
    assert!(
        has_line(&out1.stdout, &|l| l == "vsock-listen")
            && !has_line(&out1.stdout, &|l| l.starts_with("vsock-echo-status")),
        "the guest was not in its vsock listener at the snapshot: {out1:?}"
    );

    // Restored with another CID and socket path; the host connects as soon as it can.
    let vsock_b = format!("cid=7,uds={}", uds_b.display());
    let mut second = common.to_vec();
    second.extend([
        "--vsock",
        &vsock_b,
        "--restore-from",
        snap.to_str().unwrap(),
    ]);
    let data: Vec<u8> = (0..400)
        .flat_map(|i| format!("vsock line {i} after the restore\n").into_bytes())
        .collect();
    let start = std::time::Instant::now();
    let child = spawn_ember(&second, None);
    let host = {
        let (uds, data) = (uds_b.clone(), data.clone());
        let deadline = start + Duration::from_secs(120);
        std::thread::spawn(move || vsock_echo_from_host(&uds, &data, start, deadline))
    };
    let out2 = wait_ember(child, Duration::from_secs(150));
    let echo = host.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("second process: {:?} in all", out2.elapsed);
    for line in out2
        .stderr
        .lines()
        .filter(|l| l.contains("restor") || l.contains("vsock"))
    {
        eprintln!("  {line}");
    }
    for line in out2.stdout.lines().filter(|l| l.starts_with("vsock")) {
        eprintln!("  guest: {line}");
    }
    let echo = echo.unwrap_or_else(|e| panic!("{e}\n{out2:?}"));
    eprintln!(
        "host: OK after {:?} ({} attempt(s), refused: {:?}), {} bytes echoed after {:?}",
        echo.ok_after,
        echo.attempts,
        echo.refused,
        echo.back.len(),
        echo.echo_after
    );
    assert!(!out2.timed_out, "the restored guest did not end: {out2:?}");
    assert!(
        echo.back == data,
        "the echo differs: {} bytes back of {}",
        echo.back.len(),
        data.len()
    );
    assert!(
        has_line(&out2.stdout, &|l| l == "vsock-echo-status 0"),
        "the guest's vsock-io did not end well: {out2:?}"
    );
    assert!(
        out2.stdout.contains("ember-init: exit status 0"),
        "{out2:?}"
    );
    out2.expect_code(0);
}

/// A guest that prints a counter in hex, one line per value, for ever (with a short busy
/// wait between lines): only a signal, a snapshot or `--timeout` ends it.
fn endless_counting_guest() -> Vec<u8> {
    counting_code(None, None, true)
}

/// ember's stdout, read on a thread into a shared buffer while it runs (join the thread
/// for all of it).
type Collected = (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::thread::JoinHandle<()>,
);

fn stdout_collector(child: &mut std::process::Child) -> Collected {
    use std::io::Read;
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut pipe = child.stdout.take().unwrap();
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    (out, reader)
}

fn wait_for_lines(out: &std::sync::Mutex<Vec<u8>>, lines: usize) {
    let start = std::time::Instant::now();
    while out.lock().unwrap().iter().filter(|&&b| b == b'\n').count() < lines {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest printed too little"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGUSR1 pauses a running guest (its output stops growing) and resumes it; SIGUSR2 with
/// `--snapshot-on sigusr2` snapshots it and ends the run with status 0; `ember restore` of
/// that snapshot goes on counting from where it stopped.
#[test]
fn sigusr1_pauses_and_sigusr2_snapshots() {
    let name = "sigusr1_pauses_and_sigusr2_snapshots";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &endless_counting_guest(), &[]);
    let snap = dir.join("snap");
    let mut child = spawn_ember(
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "16",
            "--timeout",
            "120",
            "--snapshot-to",
            snap.to_str().unwrap(),
            "--snapshot-on",
            "sigusr2",
        ],
        None,
    );
    let (out, reader) = stdout_collector(&mut child);
    let pid = child.id() as libc::pid_t;
    let signal = |sig| {
        // SAFETY: kill(2) on our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    };
    wait_for_lines(&out, 20);
    signal(libc::SIGUSR1);
    // Give the pause and the console's writer thread time to settle, then watch.
    std::thread::sleep(Duration::from_millis(500));
    let paused_len = out.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        out.lock().unwrap().len(),
        paused_len,
        "the guest printed while paused"
    );
    signal(libc::SIGUSR1);
    let resumed_from = paused_len;
    let start = std::time::Instant::now();
    while out.lock().unwrap().len() <= resumed_from + 90 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no output after the resume"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(libc::SIGUSR2);
    let first = wait_ember(child, Duration::from_secs(60));
    assert!(!first.timed_out, "{first:?}");
    first.expect_code(0);
    assert!(first.stderr.contains("paused"), "{first:?}");
    assert!(first.stderr.contains("snapshot written to"), "{first:?}");
    reader.join().unwrap();
    let first_out = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    let second = run_ember(
        &[
            "restore",
            "--no-stdin",
            "--timeout",
            "1",
            snap.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(60),
    );
    second.expect_code(124);
    let both = format!("{first_out}{}", second.stdout);
    let values: Vec<u32> = both
        .lines()
        .map(|l| u32::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect();
    // The last line may have been cut by the timeout.
    let whole = &values[..values.len() - 1];
    if let Some(i) = whole.iter().zip(0u32..).position(|(v, i)| *v != i) {
        panic!(
            "the count is not continuous across pause, snapshot and restore: at line {i} of \
             {} (first run {} lines): {:?}",
            whole.len(),
            first_out.lines().count(),
            &whole[i.saturating_sub(3)..(i + 3).min(whole.len())]
        );
    }
    assert!(second.stdout.lines().count() > 1, "{second:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
