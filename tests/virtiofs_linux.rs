// SPDX-License-Identifier: Apache-2.0
//! A real Linux boot with two `--share` directories (virtio-fs through virtiofsd): the guest
//! mounts a read-write share of 1 000 files, hashes them all (the hashes must match the
//! host's), writes a file that must appear on the host, and mounts a read-only share
//! read-write on its side: its writes must still be refused (the host enforces `ro`). One
//! boot checks all of it: tens of seconds on a PVM host. A second boot runs the guest from a
//! `--root-share` directory (the default guest's initramfs unpacked) with no initramfs.
//! Skipped without virtiofsd.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn virtiofsd_installed() -> bool {
    let home = std::env::var("HOME").unwrap_or_default();
    let found = std::env::var_os("EMBER_VIRTIOFSD").is_some()
        || Command::new("sh")
            .args(["-c", "command -v virtiofsd"])
            .output()
            .is_ok_and(|o| o.status.success())
        || std::path::Path::new(&format!("{home}/.cargo/bin/virtiofsd")).is_file()
        || std::path::Path::new("/usr/libexec/virtiofsd").is_file();
    if !found {
        eprintln!("note: virtiofsd not installed (scripts/test-all.sh installs it); skipped");
    }
    found
}

#[test]
fn shares_in_a_linux_guest() {
    let test = "shares_in_a_linux_guest";
    if !kvm_available(test) || !virtiofsd_installed() {
        return;
    }
    let Some((kernel, initrd)) = default_guest(test) else {
        return;
    };
    let dir = temp_dir("virtiofs-linux");
    let rw = dir.join("rw");
    let ro = dir.join("ro");
    std::fs::create_dir_all(rw.join("files")).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("keep"), b"read-only share\n").unwrap();
    // 1 000 files of different sizes and contents (a cheap deterministic generator).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut expected = Vec::new();
    for i in 0..1000 {
        let len = (i * 37) % 5000 + 1;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let name = format!("f{i:04}");
        std::fs::write(rw.join("files").join(&name), &data).unwrap();
        expected.push(name);
    }
    let host = Command::new("sh")
        .arg("-c")
        .arg("cd files && sha256sum f*")
        .current_dir(&rw)
        .output()
        .unwrap();
    assert!(host.status.success());
    let host_sums = String::from_utf8(host.stdout).unwrap();
    assert_eq!(host_sums.lines().count(), 1000);

    let cmd = "ember.cmd=\"mount -t virtiofs t0 /mnt && mkdir -p /ro && \
               mount -t virtiofs -o rw t1 /ro && cd /mnt/files && sha256sum f* > /mnt/guest.sums \
               && echo written by the guest > /mnt/out && \
               (echo x > /ro/new && echo RO_WRITE_WORKED || echo RO_REFUSED) && \
               (rm /ro/keep && echo RO_RM_WORKED || echo RO_RM_REFUSED) && echo GUEST_DONE\"";
    let rw_share = format!("{},tag=t0", rw.display());
    let ro_share = format!("{},tag=t1,ro", ro.display());
    let out = run_ember(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem",
            "256",
            "--share",
            &rw_share,
            "--share",
            &ro_share,
            "--append",
            "quiet rodata=off retain_initrd 8250.nr_uarts=1 random.trust_cpu=on",
            "--append",
            cmd,
        ],
        None,
        BOOT_TIMEOUT,
    );
    assert!(!out.timed_out, "guest did not finish in time: {out:?}");
    out.expect_code(0);
    assert!(out.stdout.contains("GUEST_DONE"), "{out:?}");
    // The guest's hashes (written into the share) are the host's.
    let guest_sums = std::fs::read_to_string(rw.join("guest.sums")).expect("guest.sums");
    assert_eq!(guest_sums, host_sums);
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "written by the guest\n"
    );
    // ro is the host's decision: the guest mounted it read-write and still could not write.
    assert!(out.stdout.contains("RO_REFUSED"), "{out:?}");
    assert!(out.stdout.contains("RO_RM_REFUSED"), "{out:?}");
    assert!(!ro.join("new").exists());
    assert!(ro.join("keep").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--root-share DIR`: the default guest's initramfs unpacked into a host directory is the
/// guest's root file system over virtio-fs (no initramfs). The guest's /init (found in the
/// share: ember adds `init=/init`) runs the command, which reads a file the host put there
/// and writes one the host must then see.
#[test]
fn root_share_boots_from_a_host_directory() {
    let test = "root_share_boots_from_a_host_directory";
    if !kvm_available(test) || !virtiofsd_installed() {
        return;
    }
    let Some((kernel, initrd)) = default_guest(test) else {
        return;
    };
    let dir = temp_dir("virtiofs-root-share");
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    // dev/console is a device node (only root may create one; devtmpfs provides /dev).
    let unpacked = Command::new("cpio")
        .args(["-idm", "--quiet", "-f", "dev/console"])
        .stdin(std::fs::File::open(&initrd).unwrap())
        .current_dir(&root)
        .status()
        .expect("cpio (apt-get install cpio)");
    assert!(unpacked.success(), "cpio failed: {unpacked}");
    assert!(root.join("init").is_file() && root.join("bin/busybox").is_file());
    std::fs::write(root.join("etc/hostname-test"), "ROOT_SHARE_FROM_HOST\n").unwrap();

    let root_share = root.display().to_string();
    let out = run_ember(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "256",
            "--root-share",
            &root_share,
            "--append",
            "quiet rodata=off 8250.nr_uarts=1 random.trust_cpu=on",
            "--append",
            "ember.cmd=\"echo hi >/from-guest; cat /etc/hostname-test\"",
        ],
        None,
        BOOT_TIMEOUT,
    );
    assert!(!out.timed_out, "guest did not finish in time: {out:?}");
    out.expect_code(0);
    // The guest ran from the share: it read the host's file and its write is on the host.
    assert!(out.stdout.contains("ROOT_SHARE_FROM_HOST"), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(root.join("from-guest")).expect("from-guest"),
        "hi\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
