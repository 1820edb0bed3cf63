// SPDX-License-Identifier: Apache-2.0
//! Real Linux boots of the default guest (resources/guest/build.sh): with 1 and with 2
//! vCPUs, each boot checks several things at once — the init runs the command, its output
//! reaches stdout, the guest sees every vCPU and its memory, and ember exits 0 when the
//! guest powers off. The two tests run in parallel. Each takes tens of seconds on a PVM host.

mod common;

use std::time::Duration;

use common::*;

/// Generous: guests are slow on PVM hosts, and CI machines are shared.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn boot(test: &str, vcpus: u32) {
    if !kvm_available(test) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(test) else {
        return;
    };
    // The loop at the end runs 5 two-process pipelines: on a PVM host they used to die with
    // SIGSEGV about half the time, until ember kept glibc off AVX (resources/guest/README.md,
    // "Known problems").
    let cmd = "ember.cmd=\"echo EMBER_MARK; nproc; grep -c ^processor /proc/cpuinfo; \
               grep MemTotal /proc/meminfo; cat /proc/cmdline; i=0; ok=0; \
               while [ $i -lt 5 ]; do n=$(ls /proc/self | wc -l); [ $n -gt 10 ] && ok=$((ok+1)); \
               i=$((i+1)); done; echo PIPES $ok of $i; echo TUNABLES=$GLIBC_TUNABLES; \
               env uname -s; echo ERMS $(grep -c ' erms' /proc/cpuinfo); \
               echo TOPO $(grep -c '^physical id.*: 0$' /proc/cpuinfo) \
               $(grep -m1 '^cpu cores' /proc/cpuinfo | tr -dc 0-9)\"";
    let vcpus_s = vcpus.to_string();
    let out = run_ember(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--vcpus",
            &vcpus_s,
            "--mem",
            "128",
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
    let lines: Vec<&str> = out.stdout.lines().map(str::trim_end).collect();
    let mark = lines
        .iter()
        .position(|l| *l == "EMBER_MARK")
        .unwrap_or_else(|| panic!("init did not run the command: {out:?}"));
    // nproc and /proc/cpuinfo both see every vCPU.
    assert_eq!(lines[mark + 1], vcpus_s, "{out:?}");
    assert_eq!(lines[mark + 2], vcpus_s, "{out:?}");
    // One package (physical id 0) with a core per vCPU, as ember's CPUID describes it (KVM
    // lists only the SMT level of the topology leaves here; without the core level the
    // guest saw a package per vCPU).
    assert_eq!(lines[mark + 9], format!("TOPO {vcpus} {vcpus}"), "{out:?}");
    // The guest got (nearly all of) its 128 MiB.
    let kib: u64 = lines[mark + 3]
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(kib > 100 * 1024 && kib <= 128 * 1024, "{}", lines[mark + 3]);
    // Every pipeline ran both its processes to the end.
    assert_eq!(lines[mark + 5], "PIPES 5 of 5", "{out:?}");
    // An applet that execs another by name finds it without a link (the initramfs has only
    // /bin/sh, /bin/mount and /usr/bin/env: busybox runs its applets by name).
    assert_eq!(lines[mark + 7], "Linux", "{out:?}");
    // ember added this host's switches by itself on a PVM host, and init's environment
    // reached the command.
    if pvm_host() {
        assert!(
            lines[mark + 4].contains("noxsave clearcpuid=smap,popcnt,erms,fsrm"),
            "{out:?}"
        );
        // The kernel took the hint: no ERMS, so its string functions move 8 bytes per
        // emulated iteration (docs/profile.md).
        assert_eq!(lines[mark + 8], "ERMS 0", "{out:?}");
        assert_eq!(
            lines[mark + 6],
            "TUNABLES=glibc.cpu.hwcaps=-OSXSAVE",
            "{out:?}"
        );
        assert!(out.stderr.contains("PVM host detected"), "{out:?}");
    }
    assert!(out.stdout.contains("ember-init: exit status 0"), "{out:?}");
    // With ACPI (ember's default) the init ends with poweroff.
    assert!(out.stderr.contains("guest powered off"), "{out:?}");
}

#[test]
fn default_guest_boots_with_one_vcpu() {
    boot("boot_1_vcpu", 1);
}

#[test]
fn default_guest_boots_with_two_vcpus() {
    boot("boot_2_vcpus", 2);
}
