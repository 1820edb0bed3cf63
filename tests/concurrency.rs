// SPDX-License-Identifier: Apache-2.0
//! Many VMs at once: 20 tiny-guest VMs started and stopped concurrently, round after round,
//! booting the same kernel from a cold image cache and sharing a read-only disk, each with a
//! vsock socket (and a TAP, where this test may create network namespaces). After each
//! round nothing is left behind: no ember process, no zombie, no file descriptor or thread
//! of this process, no vsock socket, no TAP, no temporary file in the cache, and the cache
//! holds one intact copy of the kernel. And several `ember restore`s of one snapshot at once
//! each go on from the snapshot's point.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// Hang detection only.
const T: Duration = Duration::from_secs(120);

/// The tests here count this process's file descriptors and threads: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// VMs per round.
const VMS: usize = 20;

/// A guest that prints `ready`, then waits for a byte on COM1 and resets. Padded with data
/// to 1.5 MiB, so that ember maps it from its image cache (files of 1 MiB or more).
fn waiting_guest() -> Vec<u8> {
    let mut a = Asm::new();
    a.print("ready\n");
    let top = a.here();
    a.mov_dx(0x3fd).in_al_dx().bytes(&[0xa8, 0x01]); // test al, 1 (data ready)
    a.jcc(0x74, top); // jz top
    a.reset();
    let mut image = a.code.clone();
    image.resize(0x1000, 0);
    image.extend((0..(3u32 << 19)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    image
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map_or_else(
        |_| Vec::new(),
        |d| d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
    )
}

fn count(dir: &str) -> usize {
    entries(Path::new(dir)).len()
}

/// Processes whose command line names `needle`, and zombie children of this process.
fn leftovers(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for p in entries(Path::new("/proc")) {
        let Some(pid) = p.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmdline = std::fs::read(p.join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("process {pid}: {cmdline}"));
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&me.as_str()) {
            found.push(format!("zombie child {pid}"));
        }
    }
    found
}

/// The TAPs named `embc*` in `netns`.
fn taps(netns: &Netns) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &netns.name, "ip", "-o", "link"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| n.starts_with("embc"))
        .map(str::to_string)
        .collect()
}

/// Runs `rounds` rounds of [`VMS`] VMs started together and stopped together (half by
/// SIGTERM, half by a byte on stdin that makes the guest reset), checking after each round
/// that nothing was left behind.
fn start_and_stop(name: &str, rounds: usize) {
    if !kvm_available(name) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp_dir(name);
    let cache = dir.join("cache");
    let elf_bytes = tiny_elf(&waiting_guest(), &[]);
    let elf = dir.join("guest.elf");
    std::fs::write(&elf, &elf_bytes).unwrap();
    let shared = dir.join("shared.img");
    std::fs::write(&shared, vec![0u8; 64 << 10]).unwrap();
    let netns = if netns_capable(name) {
        Netns::new("conc")
    } else {
        None
    };
    let dir_str = dir.to_str().unwrap().to_string();
    let fds_before = count("/proc/self/fd");
    let threads_before = count("/proc/self/task");
    let start = Instant::now();
    for round in 0..rounds {
        let mut vms = Vec::new();
        for i in 0..VMS {
            let uds = dir.join(format!("v{i}.sock"));
            let args: Vec<String> = [
                "run",
                "--kernel",
                elf.to_str().unwrap(),
                "--mem",
                "16",
                "--disk",
                &format!("{},ro", shared.display()),
                "--vsock",
                &format!("cid={},uds={}", 3 + i, uds.display()),
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(
                netns
                    .iter()
                    .flat_map(|_| ["--net".to_string(), format!("tap=embc{i}")]),
            )
            .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut cmd = match &netns {
                Some(ns) => ns.ember(&args),
                None => ember_command(&args),
            };
            cmd.env("EMBER_CACHE_DIR", &cache).stdin(Stdio::piped());
            vms.push(cmd.spawn().expect("cannot start ember"));
        }
        // Every guest gets going.
        let mut outs = Vec::new();
        for vm in &mut vms {
            let mut out = vm.stdout.take().unwrap();
            let mut seen = Vec::new();
            let mut b = [0u8; 1];
            while !seen.ends_with(b"ready\n") {
                match out.read(&mut b) {
                    Ok(1) => seen.push(b[0]),
                    _ => {
                        let mut err = String::new();
                        let _ = vm.stderr.take().unwrap().read_to_string(&mut err);
                        panic!("round {round}: a VM ended before its guest was ready: {err}");
                    }
                }
            }
            outs.push(out);
        }
        // All stop at once.
        for (i, vm) in vms.iter_mut().enumerate() {
            if i % 2 == 0 {
                // SAFETY: kill with the pid of our own child process.
                unsafe { libc::kill(vm.id() as i32, libc::SIGTERM) };
            } else {
                vm.stdin.as_mut().unwrap().write_all(b"q").unwrap();
            }
        }
        for (i, mut vm) in vms.into_iter().enumerate() {
            drop(vm.stdin.take());
            let f = wait_ember(vm, T);
            assert!(!f.timed_out, "round {round}: VM {i} did not stop: {f:?}");
            f.expect_code(if i % 2 == 0 { 7 } else { 0 });
        }
        drop(outs);
        // Nothing left behind.
        let left = leftovers(&dir_str);
        assert!(left.is_empty(), "round {round}: {left:?}");
        let sockets: Vec<_> = entries(&dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "sock"))
            .collect();
        assert!(
            sockets.is_empty(),
            "round {round}: sockets left: {sockets:?}"
        );
        if let Some(ns) = &netns {
            let t = taps(ns);
            assert!(t.is_empty(), "round {round}: TAPs left: {t:?}");
        }
        let images = entries(&cache.join("images"));
        let names: BTreeSet<String> = images
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".tmp")),
            "round {round}: temporary files left in the image cache: {names:?}"
        );
        assert_eq!(
            names.len(),
            1,
            "round {round}: one kernel, one entry: {names:?}"
        );
        assert!(
            std::fs::read(&images[0]).unwrap() == elf_bytes,
            "round {round}: the cache entry is not the kernel"
        );
        assert_eq!(
            count("/proc/self/fd"),
            fds_before,
            "round {round}: file descriptors of this process leaked"
        );
        assert_eq!(
            count("/proc/self/task"),
            threads_before,
            "round {round}: threads of this process left"
        );
    }
    eprintln!(
        "{name}: {rounds} rounds of {VMS} VMs started and stopped together in {:.1?}{}; \
         nothing left behind",
        start.elapsed(),
        if netns.is_some() {
            ", each with a TAP"
        } else {
            ""
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// 20 VMs x 5 rounds.
#[test]
fn twenty_vms_start_and_stop_together_and_leave_nothing_behind() {
    start_and_stop("conc-5", 5);
}

/// 20 VMs x 100 rounds; by hand: `cargo test --test concurrency -- --ignored --nocapture`.
#[test]
#[ignore = "100 rounds: minutes"]
fn twenty_vms_start_and_stop_together_100_times() {
    start_and_stop("conc-100", 100);
}

/// A guest that signals the start of its init, prints a counter (0 to 1999, 8 hex digits a
/// line, with a short busy wait after each) and resets.
fn counting_guest() -> Vec<u8> {
    let mut a = Asm::new();
    // The boot-timer write ("init started"), from which --snapshot-restore-after counts.
    a.mov_al(123).mmio_write8(0xc000_0000);
    a.bytes(&[0x31, 0xdb]); // xor ebx, ebx
    let top = a.here();
    a.bytes(&[0x89, 0xde]); // mov esi, ebx
    a.bytes(&[0xb9, 8, 0, 0, 0]); // mov ecx, 8
    a.mov_dx(0x3f8);
    let digit = a.here();
    a.bytes(&[0xc1, 0xc6, 0x04]); // rol esi, 4
    a.bytes(&[0x89, 0xf0]); // mov eax, esi
    a.bytes(&[0x83, 0xe0, 0x0f]); // and eax, 15
    a.bytes(&[0x04, b'0']); // add al, '0'
    a.bytes(&[0x3c, b'9']); // cmp al, '9'
    a.bytes(&[0x76, 0x02]); // jbe +2
    a.bytes(&[0x04, 7]); // add al, 7
    a.out_dx_al();
    a.bytes(&[0xff, 0xc9]); // dec ecx
    a.jcc(0x75, digit);
    a.mov_al(b'\n').out_dx_al();
    a.bytes(&[0xb9, 0x00, 0x04, 0, 0]); // mov ecx, 1024
    let wait = a.here();
    a.bytes(&[0xff, 0xc9]); // dec ecx
    a.jcc(0x75, wait);
    a.bytes(&[0xff, 0xc3]); // inc ebx
    a.bytes(&[0x81, 0xfb]).bytes(&2000u32.to_le_bytes()); // cmp ebx, 2000
    a.jcc(0x72, top); // jb top
    a.reset();
    a.code.clone()
}

/// Four `ember restore`s of one snapshot at once: each goes on counting from the
/// snapshot's point to the end, and the snapshot is unchanged.
#[test]
fn concurrent_restores_of_one_snapshot_each_go_on() {
    let name = "conc-restore";
    if !kvm_available(name) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &counting_guest(), &[]);
    let snap = dir.join("snap");
    let first = run_ember(
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "16",
            "--snapshot-restore-after",
            "0.2",
            "--snapshot-to",
            snap.to_str().unwrap(),
        ],
        None,
        T,
    );
    assert!(
        first.stderr.contains("snapshot written to"),
        "no snapshot: {}",
        first.stderr
    );
    let memory = std::fs::read(snap.join("memory")).unwrap();
    let state = std::fs::read(snap.join("state")).unwrap();
    let restores: Vec<_> = (0..4)
        .map(|_| spawn_ember(&["restore", snap.to_str().unwrap()], None))
        .collect();
    let outs: Vec<Finished> = restores.into_iter().map(|c| wait_ember(c, T)).collect();
    // The snapshot may fall in the middle of a line: what the first run printed and what a
    // restore prints must make the whole count together, byte for byte.
    let counted = first.stdout.lines().count();
    assert!(
        counted > 0 && counted < 2000,
        "the snapshot was not taken while the guest counted: {counted} lines before it"
    );
    let whole: String = (0..2000u32).map(|n| format!("{n:08X}\n")).collect();
    for (i, out) in outs.iter().enumerate() {
        assert!(!out.timed_out, "restore {i} hung: {}", out.stderr);
        out.expect_code(0);
        let joined = format!("{}{}", first.stdout, out.stdout);
        assert!(
            joined == whole,
            "restore {i} did not go on from the snapshot's point: the first run printed {} \
             bytes, the restore {} (starting {:?})",
            first.stdout.len(),
            out.stdout.len(),
            out.stdout.lines().next()
        );
    }
    assert!(std::fs::read(snap.join("memory")).unwrap() == memory);
    assert!(std::fs::read(snap.join("state")).unwrap() == state);
    let _ = std::fs::remove_dir_all(dir);
}
