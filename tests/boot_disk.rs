// SPDX-License-Identifier: Apache-2.0
//! One real Linux boot with its root file system on virtio-blk, checking that every byte the
//! guest writes reaches the host file and that a read-only disk stays untouched:
//!
//! - /dev/vda: a copy of target/guest/rootfs.ext4, mounted as root (`--root /dev/vda`);
//! - /dev/vdb: a blank 16 MiB image; the guest writes 8 MiB from /dev/urandom to it,
//!   prints the data's sha256, drops its caches and reads the disk back;
//! - /dev/vdc: a 1 MiB image with a known pattern, read-only; the guest tries to write it.
//!
//! The host then checks the sha256 of the first 8 MiB of vdb's file against both guest
//! hashes, that vdc's file is byte-for-byte what it was, and that the guest saw the write to
//! vdc fail. Skipped (with a message) without /dev/kvm or the built guest.

mod common_virtio;

use std::process::Command;
use std::time::Duration;

use common_virtio::{guest_dir, kvm_available, run_ember, TempDir};

/// Generous: guest kernel code is emulated on PVM hosts (tens of seconds to init, and the
/// 8 MiB of /dev/urandom are produced by emulated kernel code too).
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

const GUEST_SCRIPT: &str = "\
dd if=/dev/urandom of=/tmp/r bs=1048576 count=8 2>/dev/null; \
echo SHA-WRITTEN $(sha256sum </tmp/r); \
dd if=/tmp/r of=/dev/vdb bs=1048576 conv=fsync 2>/dev/null; \
sync; echo 3 >/proc/sys/vm/drop_caches; \
echo SHA-READBACK $(head -c 8388608 /dev/vdb | sha256sum); \
if echo x | dd of=/dev/vdc 2>/dev/null; then echo VDC-WRITE-OK; else echo VDC-WRITE-FAILED; fi; \
echo ROOT $(grep ' / ' /proc/mounts); \
sync";

fn host_sha256(bytes: &[u8]) -> String {
    let dir = TempDir::new("sha");
    let f = dir.join("data");
    std::fs::write(&f, bytes).unwrap();
    let out = Command::new("sha256sum")
        .arg(&f)
        .output()
        .expect("sha256sum is needed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The hash printed after `tag` (busybox prints `HASH  -`).
fn guest_value<'a>(stdout: &'a str, tag: &str) -> Option<&'a str> {
    stdout
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(tag))
        .and_then(|rest| rest.split_whitespace().next())
}

#[test]
fn boot_from_disk_keeps_every_byte() {
    const NAME: &str = "boot_from_disk_keeps_every_byte";
    if !kvm_available(NAME) {
        return;
    }
    let Some(guest) = guest_dir(NAME, &["vmlinux", "rootfs.ext4"]) else {
        return;
    };
    let tmp = TempDir::new("bootdisk");
    let root = tmp.join("root.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &root).unwrap();
    let vdb = tmp.join("vdb.img");
    std::fs::write(&vdb, vec![0u8; 16 << 20]).unwrap();
    let vdc = tmp.join("vdc.img");
    let vdc_content: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&vdc, &vdc_content).unwrap();

    let cmd = format!(
        "quiet rodata=off 8250.nr_uarts=1 random.trust_cpu=on ember.cmd=\"{GUEST_SCRIPT}\""
    );
    let kernel = guest.join("vmlinux");
    let args = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        root.to_str().unwrap(),
        "--root",
        "/dev/vda",
        "--disk",
        vdb.to_str().unwrap(),
        "--disk",
        &format!("{},ro", vdc.display()),
        "--append",
        &cmd,
    ];
    let run = run_ember(&args, BOOT_TIMEOUT);
    eprintln!("guest run took {:?}", run.elapsed);
    assert!(
        !run.timed_out,
        "the guest did not finish in {BOOT_TIMEOUT:?}\n{}",
        run.dump()
    );
    assert!(
        run.stdout.contains("ember-init: exit status 0"),
        "the guest command failed\n{}",
        run.dump()
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());

    // The root file system was the disk.
    let root_line = guest_value(&run.stdout, "ROOT ").unwrap_or_default();
    assert_eq!(
        root_line,
        "/dev/root",
        "root is not on the disk\n{}",
        run.dump()
    );
    assert!(
        run.stdout.contains("ext4 rw"),
        "root not mounted ext4 rw\n{}",
        run.dump()
    );

    // Every byte the guest wrote to vdb is in the host file.
    let written = guest_value(&run.stdout, "SHA-WRITTEN ").expect("no SHA-WRITTEN line");
    let readback = guest_value(&run.stdout, "SHA-READBACK ").expect("no SHA-READBACK line");
    let file = std::fs::read(&vdb).unwrap();
    let host = host_sha256(&file[..8 << 20]);
    assert_eq!(written.len(), 64, "{}", run.dump());
    assert_eq!(
        host, written,
        "the host file differs from what the guest wrote"
    );
    assert_eq!(host, readback, "the guest read back something else");
    assert!(
        file[8 << 20..].iter().all(|&b| b == 0),
        "bytes past 8 MiB changed"
    );

    // The read-only disk refused the write and is unchanged.
    assert!(
        run.stdout.contains("VDC-WRITE-FAILED"),
        "the write to vdc did not fail\n{}",
        run.dump()
    );
    assert!(!run.stdout.contains("VDC-WRITE-OK"));
    assert!(
        std::fs::read(&vdc).unwrap() == vdc_content,
        "the read-only image changed"
    );
}
