// SPDX-License-Identifier: Apache-2.0
//! A tiny guest with its own virtio-blk driver (hand-assembled, polling, no interrupts):
//! it writes numbered sectors, each followed by a FLUSH, and after each flush the device
//! acknowledged reports the sequence number on the serial port (`F` + 8 hex digits +
//! newline). With it:
//!
//! - durability: the host `kill -9`s ember at random points and checks that every sequence
//!   number the guest reported is on the image;
//! - rate limits in a real VM: with `iops=` the guest's requests are held and resumed by
//!   ember's timer (the guest notifies once per request and only polls afterwards).

mod common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The disk's virtio-mmio window: with `--no-rng`, the first (and only) virtio device.
const BLK_MMIO: u64 = 0xd000_0000;

// virtio-mmio (version 2) registers.
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_USED_LOW: u64 = 0x0a0;

/// The guest's data, in the loaded image after the code (offsets from TINY_LOAD).
const DATA_AT: usize = 0x1000;
const DESC: u32 = (TINY_LOAD as u32) + 0x1000;
const AVAIL: u32 = (TINY_LOAD as u32) + 0x2000;
const USED: u32 = (TINY_LOAD as u32) + 0x3000;
const HDR_W: u32 = (TINY_LOAD as u32) + 0x4000;
const HDR_F: u32 = (TINY_LOAD as u32) + 0x4100;
const HEX: u32 = (TINY_LOAD as u32) + 0x4200;
const SECTOR: u32 = (TINY_LOAD as u32) + 0x5000;
const STATUS_W: u32 = (TINY_LOAD as u32) + 0x6000;
const STATUS_F: u32 = (TINY_LOAD as u32) + 0x6010;
const IMAGE_END: usize = 0x6100;

/// Two chains in an eight-entry queue (descriptors 0-2 are a write: header, sector,
/// status; 3-4 a flush: header, status), made available in turn: the available ring is
/// static (`[0, 3, 0, 3, ...]`), only the indexes move.
const QSIZE: u32 = 8;

/// Sectors on the test image; the guest stops after `sectors - 1` writes.
const DISK_SECTORS: u32 = 8192;

/// `[disp32]` as a ModRM/SIB memory operand with register field `reg`.
fn abs<'a>(a: &'a mut Asm, opcode: &[u8], reg: u8, addr: u32) -> &'a mut Asm {
    a.bytes(opcode)
        .bytes(&[(reg << 3) | 0x04, 0x25])
        .bytes(&addr.to_le_bytes())
}

/// `lea eax, [rsi*2 + disp]`: the available (and used) index after the write (`disp` -1)
/// or the flush (0) of sequence number `esi`.
fn index_of_seq(a: &mut Asm, disp: i32) -> &mut Asm {
    a.bytes(&[0x8d, 0x04, 0x75]).bytes(&disp.to_le_bytes())
}

/// A near conditional jump (`0f 8x`) to be patched: returns where its offset goes.
fn jcc_fwd(a: &mut Asm, cc: u8) -> usize {
    a.bytes(&[0x0f, cc, 0, 0, 0, 0]);
    a.here() - 4
}

fn patch(a: &mut Asm, at: usize) {
    let rel = (a.here() - (at + 4)) as i32;
    a.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
}

/// Submits the chain whose available index is `rsi*2 + disp`, notifies, polls the used
/// index until the device returned it, and jumps to `fail` fixups unless `status` is 0.
fn submit_and_wait(a: &mut Asm, disp: i32, status: u32, fails: &mut Vec<usize>) {
    abs(a, &[0xc6], 0, status).bytes(&[0xff]); // mov byte [status], 0xff
    index_of_seq(a, disp);
    abs(a, &[0x66, 0x89], 0, AVAIL + 2); // mov [avail.idx], ax
    a.mov_eax(0).mmio_write32(BLK_MMIO + QUEUE_NOTIFY);
    let poll = a.here();
    index_of_seq(a, disp);
    abs(a, &[0x66, 0x39], 0, USED + 2); // cmp [used.idx], ax
    a.jcc(0x75, poll); // jne poll
    abs(a, &[0x80], 7, status).bytes(&[0x00]); // cmp byte [status], 0
    fails.push(jcc_fwd(a, 0x85)); // jne fail
}

/// The guest: sets up the disk (VERSION_1 and FLUSH), then for n = 1, 2, ... up to
/// `last`: writes sector n (its first and last 4 bytes hold n), flushes, prints
/// `F<n as 8 hex digits>\n`. Then prints `done\n` and resets (or halts when `reset` is
/// false). A request answered with a non-zero status prints `FAIL\n` and resets.
fn flushing_writer(last: u32, reset: bool) -> Vec<u8> {
    let mut a = Asm::new();
    let reg = |r: u64| BLK_MMIO + r;
    a.mov_eax(0).mmio_write32(reg(STATUS));
    a.mov_eax(1).mmio_write32(reg(STATUS));
    a.mov_eax(3).mmio_write32(reg(STATUS));
    // Feature word 0: VIRTIO_BLK_F_FLUSH (bit 9); word 1: VIRTIO_F_VERSION_1 (bit 32).
    a.mov_eax(0).mmio_write32(reg(DRIVER_FEATURES_SEL));
    a.mov_eax(1 << 9).mmio_write32(reg(DRIVER_FEATURES));
    a.mov_eax(1).mmio_write32(reg(DRIVER_FEATURES_SEL));
    a.mov_eax(1).mmio_write32(reg(DRIVER_FEATURES));
    a.mov_eax(11).mmio_write32(reg(STATUS)); // + FEATURES_OK
    a.mov_eax(0).mmio_write32(reg(QUEUE_SEL));
    a.mov_eax(QSIZE).mmio_write32(reg(QUEUE_NUM));
    a.mov_eax(DESC).mmio_write32(reg(QUEUE_DESC_LOW));
    a.mov_eax(AVAIL).mmio_write32(reg(QUEUE_AVAIL_LOW));
    a.mov_eax(USED).mmio_write32(reg(QUEUE_USED_LOW));
    a.mov_eax(1).mmio_write32(reg(QUEUE_READY));
    a.mov_eax(15).mmio_write32(reg(STATUS)); // + DRIVER_OK
    a.bytes(&[0xbe]).bytes(&1u32.to_le_bytes()); // mov esi, 1
    a.bytes(&[0xbb]).bytes(&HEX.to_le_bytes()); // mov ebx, HEX (for xlatb)
    let mut fails = Vec::new();
    let top = a.here();
    abs(&mut a, &[0x89], 6, HDR_W + 8); // mov [hdr.sector], esi
    abs(&mut a, &[0x89], 6, SECTOR); // mov [sector], esi
    abs(&mut a, &[0x89], 6, SECTOR + 508); // mov [sector + 508], esi
    submit_and_wait(&mut a, -1, STATUS_W, &mut fails);
    submit_and_wait(&mut a, 0, STATUS_F, &mut fails);
    // Report: "F" + esi in hex + "\n".
    a.print("F");
    a.bytes(&[0x89, 0xf1]); // mov ecx, esi
    for shift in (0..8).rev().map(|d| d * 4) {
        a.bytes(&[0x89, 0xc8]); // mov eax, ecx
        a.bytes(&[0xc1, 0xe8, shift]); // shr eax, shift
        a.bytes(&[0x83, 0xe0, 0x0f]); // and eax, 15
        a.bytes(&[0xd7]); // xlatb
        a.out_dx_al();
    }
    a.mov_al(b'\n').out_dx_al();
    a.bytes(&[0xff, 0xc6]); // inc esi
    a.bytes(&[0x81, 0xfe]).bytes(&(last + 1).to_le_bytes()); // cmp esi, last + 1
    let done = jcc_fwd(&mut a, 0x83); // jae done
    a.jmp(top);
    patch(&mut a, done);
    a.print("done\n");
    if reset {
        a.reset();
    } else {
        a.halt_loop();
    }
    for f in &fails {
        patch(&mut a, *f);
    }
    a.print("FAIL\n").reset();
    assert!(a.code.len() <= DATA_AT, "the code runs into the data");

    // The data after the code.
    let mut image = a.code.clone();
    image.resize(IMAGE_END, 0);
    let put = |image: &mut Vec<u8>, addr: u32, bytes: &[u8]| {
        let at = (u64::from(addr) - TINY_LOAD) as usize;
        image[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let desc = |addr: u32, len: u32, flags: u16, next: u16| {
        let mut d = Vec::new();
        d.extend_from_slice(&u64::from(addr).to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        d
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let table = [
        desc(HDR_W, 16, NEXT, 1),
        desc(SECTOR, 512, NEXT, 2),
        desc(STATUS_W, 1, WRITE, 0),
        desc(HDR_F, 16, NEXT, 4),
        desc(STATUS_F, 1, WRITE, 0),
    ]
    .concat();
    put(&mut image, DESC, &table);
    // avail: flags 0, idx 0, ring [0, 3, 0, 3, ...].
    let mut avail = vec![0u8; 4];
    for _ in 0..QSIZE / 2 {
        avail.extend_from_slice(&[0, 0, 3, 0]);
    }
    put(&mut image, AVAIL, &avail);
    put(&mut image, HDR_W, &1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    put(&mut image, HDR_F, &4u32.to_le_bytes()); // VIRTIO_BLK_T_FLUSH
    put(&mut image, HEX, b"0123456789abcdef");
    image
}

/// The sequence numbers the guest reported, in order, from its serial output (a record cut
/// short by the kill is left out).
fn reported(stdout: &[u8]) -> Result<Vec<u32>, String> {
    let text = String::from_utf8_lossy(stdout);
    let mut seqs = Vec::new();
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        let line = line.trim_end();
        if line == "done" {
            continue;
        }
        let hex = line
            .strip_prefix('F')
            .ok_or_else(|| format!("unexpected guest output line {line:?}"))?;
        let n = u32::from_str_radix(hex, 16).map_err(|_| format!("bad record {line:?}"))?;
        seqs.push(n);
    }
    Ok(seqs)
}

/// The sequence numbers `1..=last` are on the image: sector n begins and ends with n.
fn check_image(image: &Path, last: u32) -> Result<(), String> {
    let bytes = std::fs::read(image).map_err(|e| e.to_string())?;
    for n in 1..=last {
        let s = &bytes[n as usize * 512..(n as usize + 1) * 512];
        let head = u32::from_le_bytes(s[..4].try_into().unwrap());
        let tail = u32::from_le_bytes(s[508..].try_into().unwrap());
        if head != n || tail != n {
            return Err(format!(
                "sequence {n} was reported flushed but sector {n} holds {head}/{tail}"
            ));
        }
    }
    Ok(())
}

/// A small xorshift generator (no dependency), seeded from the clock unless
/// `EMBER_KILL_SEED` is set; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("EMBER_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        eprintln!("kill -9 test seed: EMBER_KILL_SEED={seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What one run killed at a random point left.
struct Killed {
    reported: u32,
    killed_after: Duration,
}

/// Starts the guest on a fresh zeroed image, kills ember with SIGKILL after a random delay
/// (up to `max_delay`), and checks the image against what the guest reported.
fn kill_once(dir: &Path, elf: &str, cache: &str, rng: &mut Rng, max_delay: u64) -> Killed {
    let img = dir.join("disk.img");
    let _ = std::fs::remove_file(&img);
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(u64::from(DISK_SECTORS) * 512).unwrap();
    drop(f);
    let disk = format!("{},cache={cache}", img.display());
    let args = [
        "run", "--kernel", elf, "--mem", "16", "--no-rng", "--disk", &disk,
    ];
    let mut child = ember_command(&args).spawn().expect("cannot start ember");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let delay = Duration::from_millis(rng.below(max_delay));
    let start = Instant::now();
    std::thread::sleep(delay);
    let _ = child.kill(); // SIGKILL
    let status = child.wait().unwrap();
    let killed_after = start.elapsed();
    let stdout = reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let seqs = reported(&stdout).unwrap_or_else(|e| panic!("{e}\nstderr:\n{stderr}"));
    let expected: Vec<u32> = (1..=seqs.len() as u32).collect();
    assert_eq!(seqs, expected, "reports out of order; stderr:\n{stderr}");
    assert!(
        !String::from_utf8_lossy(&stdout).contains("FAIL"),
        "a request failed; stderr:\n{stderr}"
    );
    let last = seqs.len() as u32;
    if let Err(e) = check_image(&img, last) {
        panic!(
            "{e} (killed after {killed_after:?}, status {status:?}, cache={cache})\nstderr:\n\
             {stderr}"
        );
    }
    Killed {
        reported: last,
        killed_after,
    }
}

/// Runs `iterations` kills; returns how many flushed writes were checked in all.
fn kill_loop(name: &str, iterations: usize, cache: &str) -> Option<u64> {
    if !kvm_available(name) {
        return None;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(
        &dir,
        "guest.elf",
        &flushing_writer(DISK_SECTORS - 1, false),
        &[],
    );
    let elf = elf.to_str().unwrap();
    let mut rng = Rng::new();
    let (mut total, mut none, mut most) = (0u64, 0, 0);
    let mut slowest = Duration::ZERO;
    for _ in 0..iterations {
        // Most kills land while the guest writes; some before the device is up.
        let k = kill_once(&dir, elf, cache, &mut rng, 400);
        total += u64::from(k.reported);
        most = most.max(k.reported);
        none += usize::from(k.reported == 0);
        slowest = slowest.max(k.killed_after);
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{name}: {iterations} runs killed with SIGKILL at random points (cache={cache}); \
         {total} flushed writes reported and all found on the image (most in one run: \
         {most}; {none} runs killed before the first flush)"
    );
    Some(total)
}

/// 200 runs of the guest, each killed with SIGKILL at a random point: every write the guest
/// saw flushed is on the image.
#[test]
fn every_flushed_write_survives_kill_9() {
    let iterations = std::env::var("EMBER_KILL_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    if let Some(total) = kill_loop("blk-kill9", iterations, "writeback") {
        assert!(
            total > 0,
            "no run got as far as a flush: the test checked nothing"
        );
    }
}

/// The same with O_DIRECT (cache=none), where the host file system allows it.
#[test]
fn every_flushed_write_survives_kill_9_with_direct_io() {
    let probe = std::env::temp_dir().join(format!("ember-odirect-{}", std::process::id()));
    std::fs::write(&probe, [0u8; 4096]).unwrap();
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    if !direct {
        eprintln!("SKIP: the temporary directory's file system has no O_DIRECT");
        return;
    }
    if let Some(total) = kill_loop("blk-kill9-direct", 50, "none") {
        assert!(
            total > 0,
            "no run got as far as a flush: the test checked nothing"
        );
    }
}

/// In a real VM, a disk limited to 4 requests per second, one at a time: the guest
/// notifies once per request and then only polls, so a held request can only be resumed by
/// ember's timer; all 6 requests complete, the sectors are on the image, and ember says how
/// many times the queue was held.
#[test]
fn a_rate_limited_disk_serves_a_polling_guest() {
    let name = "blk-limited";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &flushing_writer(3, true), &[]);
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 64 << 10]).unwrap();
    let disk = format!("{},iops=4,iops_burst=1", img.display());
    let elf = elf.to_str().unwrap();
    let args = [
        "run", "--kernel", elf, "--mem", "16", "--no-rng", "--disk", &disk,
    ];
    let out = run_ember(&args, None, Duration::from_secs(60));
    assert!(!out.timed_out, "the guest never finished: {out:?}");
    out.expect_code(0);
    let seqs = reported(out.stdout.as_bytes()).unwrap();
    assert_eq!(seqs, vec![1, 2, 3], "{out:?}");
    assert!(out.stdout.ends_with("done\n"), "{out:?}");
    check_image(&img, 3).unwrap();
    let held = out
        .stderr
        .lines()
        .find_map(|l| {
            l.split("vda: the rate limit held the queue ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no throttle count in the log: {out:?}"));
    eprintln!("the rate limit held the queue {held} times for 6 requests");
    assert!(held >= 1, "{out:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Throughput figures (no assertion): the writing guest for two seconds on an unlimited
/// disk, with `iops=200` and with `bw=64K` (each write moves 512 bytes; a flush none); by
/// hand: `cargo test --test blk_guest -- --ignored --nocapture rate_limit_figures`.
#[test]
#[ignore = "a benchmark: prints figures"]
fn rate_limit_figures() {
    let name = "blk-figures";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(
        &dir,
        "guest.elf",
        &flushing_writer(DISK_SECTORS - 1, false),
        &[],
    );
    let img = dir.join("disk.img");
    for limit in ["", ",iops=200", ",bw=64K"] {
        std::fs::write(&img, vec![0u8; DISK_SECTORS as usize * 512]).unwrap();
        let disk = format!("{}{limit}", img.display());
        let elf = elf.to_str().unwrap();
        let args = [
            "run", "--kernel", elf, "--mem", "16", "--no-rng", "--disk", &disk,
        ];
        let child = spawn_ember(&args, None);
        let run = Duration::from_secs(2);
        std::thread::sleep(run);
        // SAFETY: kill with the pid of our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = wait_ember(child, Duration::from_secs(60));
        let n = reported(out.stdout.as_bytes()).unwrap().len() as f64;
        let secs = run.as_secs_f64();
        eprintln!(
            "--disk ...{limit}: {:.0} requests/s ({:.0} writes + {:.0} flushes), {:.1} KiB/s \
             written (over about {secs:.0} s with start-up)",
            2.0 * n / secs,
            n / secs,
            n / secs,
            n * 512.0 / secs / 1024.0
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
