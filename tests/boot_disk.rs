// SPDX-License-Identifier: Apache-2.0
//! One real Linux boot with its root file system on virtio-blk, checking that every byte the
//! guest writes reaches the host file and that a read-only disk stays untouched:
//!
//! - /dev/vda: a copy of target/guest/rootfs.ext4, mounted as root (`--root /dev/vda`);
//! - /dev/vdb: a blank 16 MiB image the guest writes to;
//! - /dev/vdc: a 1 MiB image with a known pattern, read-only; the guest tries to write it;
//! - /dev/vdd: 8 MiB the host took from its /dev/urandom, read-only.
//!
//! The guest copies the 8 MiB from vdd to vdb (O_DIRECT both ways), writes 4 KiB of its own
//! /dev/urandom after them, prints the sha256 of both as it reads them back from vdb (O_DIRECT,
//! so from the device, not a cache), fails to write vdc, and syncs. The host then checks its
//! own sha256 of vdb's file against the guest's, that vdc's file is byte-for-byte what it
//! was, and that the guest saw the write to vdc fail.
//!
//! Why the 8 MiB come from the host's /dev/urandom and not the guest's: on a PVM host guest
//! kernel code is emulated, and the guest's /dev/urandom produced 64 KiB in 30 s (a loaded
//! 2-core machine), so 8 MiB would take most of an hour; every byte the guest kernel copies
//! costs about as much. O_DIRECT moves the data between guest user memory and the device
//! without a kernel copy.
//!
//! Skipped (with a message) without /dev/kvm or the built guest.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{default_guest, kvm_available, run_ember, temp_dir};

/// Generous: guest kernel code is emulated on PVM hosts (tens of seconds to init, more on a
/// loaded machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(1200);
const MIB: usize = 1 << 20;

/// The guest's side: every step writes a file in /tmp and prints one tagged line, so a failed
/// step is visible in the output. (Pipelines are covered by boot_linux.)
const GUEST_SCRIPT: &str = "\
dd if=/dev/vdd of=/dev/vdb bs=1048576 count=8 iflag=direct oflag=direct 2>/dev/null; \
dd if=/dev/urandom of=/tmp/u bs=4096 count=1 2>/dev/null; \
dd if=/tmp/u of=/dev/vdb bs=4096 seek=2048 oflag=direct 2>/dev/null; \
dd if=/dev/vdb of=/tmp/bulk bs=1048576 count=8 iflag=direct 2>/dev/null; \
sha256sum /tmp/bulk >/tmp/s1; read h _ </tmp/s1; echo SHA-BULK $h; rm /tmp/bulk; \
dd if=/dev/vdb of=/tmp/own bs=4096 skip=2048 count=1 iflag=direct 2>/dev/null; \
sha256sum /tmp/u /tmp/own >/tmp/s2; { read h1 _; read h2 _; } </tmp/s2; echo SHA-OWN $h1 $h2; \
echo x >/tmp/x; \
if dd if=/tmp/x of=/dev/vdc 2>/dev/null; then echo VDC-WRITE-OK; else echo VDC-WRITE-FAILED; fi; \
while read dev mnt rest; do case $mnt in /) echo ROOT $dev $mnt $rest;; esac; done </proc/mounts; \
sync";

fn host_sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum is needed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The words printed after `tag` on its line (busybox sha256sum prints `HASH  -`).
fn guest_words<'a>(stdout: &'a str, tag: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(tag))
        .map(|rest| rest.split_whitespace().filter(|w| *w != "-").collect())
        .unwrap_or_default()
}

#[test]
fn boot_from_disk_keeps_every_byte() {
    const NAME: &str = "boot_from_disk_keeps_every_byte";
    if !kvm_available(NAME) {
        return;
    }
    let Some((kernel, _)) = default_guest(NAME) else {
        return;
    };
    let rootfs = kernel.with_file_name("rootfs.ext4");
    if !rootfs.is_file() {
        eprintln!(
            "SKIP {NAME}: {} is missing (run `bash resources/guest/build.sh`)",
            rootfs.display()
        );
        return;
    }
    let tmp = temp_dir("bootdisk");
    let root = tmp.join("root.ext4");
    std::fs::copy(&rootfs, &root).unwrap();
    let vdb = tmp.join("vdb.img");
    std::fs::write(&vdb, vec![0u8; 16 * MIB]).unwrap();
    let vdc = tmp.join("vdc.img");
    let vdc_content: Vec<u8> = (0..MIB as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&vdc, &vdc_content).unwrap();
    let vdd = tmp.join("vdd.img");
    let mut random = vec![0u8; 8 * MIB];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut random,
    )
    .unwrap();
    std::fs::write(&vdd, &random).unwrap();

    let cmd = format!(
        "quiet rodata=off 8250.nr_uarts=1 random.trust_cpu=on ember.cmd=\"{GUEST_SCRIPT}\""
    );
    let (k, r, b) = (
        kernel.to_str().unwrap(),
        root.to_str().unwrap(),
        vdb.to_str().unwrap(),
    );
    let c = format!("{},ro", vdc.display());
    let d = format!("{},ro", vdd.display());
    let args = [
        "run", "--kernel", k, "--disk", r, "--root", "/dev/vda", "--disk", b, "--disk", &c,
        "--disk", &d, "--append", &cmd,
    ];
    let run = run_ember(&args, None, BOOT_TIMEOUT);
    let dump = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    eprintln!("guest run took {:?}", run.elapsed);
    assert!(
        !run.timed_out,
        "the guest did not finish in {BOOT_TIMEOUT:?}\n{dump}"
    );
    assert!(
        run.stdout.contains("ember-init: exit status 0"),
        "the guest command failed\n{dump}"
    );
    assert_eq!(run.code, Some(0), "{dump}");

    // The root file system was the disk, mounted read-write.
    let root_line = guest_words(&run.stdout, "ROOT ");
    assert_eq!(
        root_line.first().copied(),
        Some("/dev/root"),
        "root is not the disk\n{dump}"
    );
    assert_eq!(root_line.get(2).copied(), Some("ext4"), "{dump}");
    assert!(
        root_line.get(3).is_some_and(|o| o.starts_with("rw")),
        "{dump}"
    );

    // Every byte the guest wrote to vdb is in the host file, where it belongs.
    let file = std::fs::read(&vdb).unwrap();
    assert!(
        file[..8 * MIB] == random[..],
        "vdb's first 8 MiB differ from what was copied"
    );
    let bulk_file = tmp.join("bulk");
    std::fs::write(&bulk_file, &file[..8 * MIB]).unwrap();
    let own_file = tmp.join("own");
    std::fs::write(&own_file, &file[8 * MIB..8 * MIB + 4096]).unwrap();
    assert_eq!(
        guest_words(&run.stdout, "SHA-BULK "),
        [host_sha256(&bulk_file)],
        "{dump}"
    );
    // The guest's own random block: what it generated, what it read back, what the host has.
    let own = host_sha256(&own_file);
    assert_eq!(
        guest_words(&run.stdout, "SHA-OWN "),
        [own.as_str(), own.as_str()],
        "{dump}"
    );
    assert!(
        file[8 * MIB + 4096..].iter().all(|&x| x == 0),
        "bytes past the writes changed"
    );

    // The read-only disk refused the write and is unchanged. (Whole lines: the init echoes
    // the command, which names both markers.)
    let said = |marker: &str| run.stdout.lines().any(|l| l.trim() == marker);
    assert!(
        said("VDC-WRITE-FAILED"),
        "the write to vdc did not fail\n{dump}"
    );
    assert!(!said("VDC-WRITE-OK"), "{dump}");
    assert!(
        std::fs::read(&vdc).unwrap() == vdc_content,
        "the read-only image changed"
    );
    let _ = std::fs::remove_dir_all(tmp);
}
