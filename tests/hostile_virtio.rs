// SPDX-License-Identifier: Apache-2.0
//! Tiny guests that drive ember's virtio devices the way a hostile driver would, and check
//! that ember neither hangs nor floods its log (issue 19).

mod common;

use std::time::Duration;

use common::*;

/// The first virtio-mmio window (arch::x86_64::layout::VIRTIO_MMIO_START): with no disk, NIC
/// or vsock configured, the default virtio-rng device sits there.
const RNG_MMIO: u64 = 0xd000_0000;

// virtio-mmio (version 2) register offsets.
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;

// Status bits.
const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

/// The queue's rings, in the guest's RAM (identity-mapped, zero at boot).
const DESC: u32 = 0x20_0000;
const AVAIL: u32 = 0x20_1000;
const USED: u32 = 0x20_2000;
const QUEUE_SIZE: u32 = 64;

/// Sets up the rng device's queue 0 as a driver would, then claims 1000 available entries in
/// a 64-entry ring and notifies; then spins (`jmp $`).
fn avail_index_flood_guest() -> Vec<u8> {
    let mut a = Asm::new();
    let reg = |r: u64| RNG_MMIO + r;
    a.print("setting up virtio-rng\n");
    a.mov_eax(0).mmio_write32(reg(STATUS));
    a.mov_eax(ACK).mmio_write32(reg(STATUS));
    a.mov_eax(ACK | DRIVER).mmio_write32(reg(STATUS));
    // VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of feature word 1.
    a.mov_eax(1).mmio_write32(reg(DRIVER_FEATURES_SEL));
    a.mov_eax(1).mmio_write32(reg(DRIVER_FEATURES));
    a.mov_eax(ACK | DRIVER | FEATURES_OK)
        .mmio_write32(reg(STATUS));
    a.mov_eax(0).mmio_write32(reg(QUEUE_SEL));
    a.mov_eax(QUEUE_SIZE).mmio_write32(reg(QUEUE_NUM));
    a.mov_eax(DESC).mmio_write32(reg(QUEUE_DESC_LOW));
    a.mov_eax(0).mmio_write32(reg(QUEUE_DESC_HIGH));
    a.mov_eax(AVAIL).mmio_write32(reg(QUEUE_AVAIL_LOW));
    a.mov_eax(0).mmio_write32(reg(QUEUE_AVAIL_HIGH));
    a.mov_eax(USED).mmio_write32(reg(QUEUE_USED_LOW));
    a.mov_eax(0).mmio_write32(reg(QUEUE_USED_HIGH));
    a.mov_eax(1).mmio_write32(reg(QUEUE_READY));
    // avail ring: flags 0, idx 1000 (one 32-bit store of both 16-bit fields).
    a.mov_eax(1000 << 16).mmio_write32(u64::from(AVAIL));
    a.mov_eax(ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        .mmio_write32(reg(STATUS));
    a.mov_eax(0).mmio_write32(reg(QUEUE_NOTIFY));
    a.print("notified\n");
    let spin = a.here();
    a.jmp(spin);
    a.code.clone()
}

#[test]
fn avail_index_beyond_queue_size_neither_hangs_nor_floods() {
    let name = "hostile-availidx";
    if !kvm_available(name) {
        return;
    }
    let dir = temp_dir(name);
    let elf = write_tiny_guest(&dir, "guest.elf", &avail_index_flood_guest(), &[]);
    let elf = elf.to_str().unwrap();
    // Stopped by SIGTERM while the device is broken (the tiny guest has no power button:
    // the signal stops it at once)...
    let child = spawn_ember(&["run", "--kernel", elf, "--mem", "16"], None);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill with the pid of our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_ember(child, Duration::from_secs(60));
    assert!(!out.timed_out, "ember did not stop on SIGTERM");
    assert!(out.stderr.len() < 64 * 1024, "{} bytes", out.stderr.len());
    out.expect_code(7);
    // ...and by --timeout.
    let out = run_ember(
        &["run", "--kernel", elf, "--mem", "16", "--timeout", "3"],
        None,
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_dir_all(dir);
    let head: String = out.stderr.chars().take(2000).collect();
    assert!(
        !out.timed_out,
        "ember did not stop (a device loop spins?); stderr begins:\n{head}"
    );
    assert!(
        out.stderr.len() < 64 * 1024,
        "ember wrote {} bytes to stderr; it begins:\n{head}",
        out.stderr.len()
    );
    assert!(out.stdout.contains("notified"), "{out:?}");
    out.expect_code(124);
    // The device gave up on the queue (and said so, once).
    assert!(
        out.stderr.contains("virtio-rng: virtio queue error"),
        "{out:?}"
    );
}
