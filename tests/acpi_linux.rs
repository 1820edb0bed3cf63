// SPDX-License-Identifier: Apache-2.0
//! The ACPI platform with the real default guest (two Linux boots, run in parallel; tens of
//! seconds each on a PVM host): `poweroff -f` ends ember with status 0 through S5, the
//! kernel reports no ACPI table or AML problem and its vmgenid driver bound to ember's VM
//! generation ID device (the boot has --snapshot-to, which gives it one); SIGTERM to ember presses the power button and
//! the guest's init shuts it down cleanly (status 6). The hard-stop paths (timeout, second
//! signal, no ACPI) are covered by tiny guests in tests/acpi.rs.

mod common;
mod common_acpi;

use std::time::{Duration, Instant};

use common::*;
use common_acpi::Running;

/// Generous: guests are slow on PVM hosts, and CI machines are shared.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The speed switches of the other real-boot tests; `loglevel=5` (after `quiet`) lets kernel
/// warnings through, so an ACPI warning would show on the console.
const FAST: &str = "quiet loglevel=5 rodata=off retain_initrd 8250.nr_uarts=1 random.trust_cpu=on";

fn guest_args(kernel: &str, initrd: &str, cmd: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--append",
        FAST,
        "--append",
        &format!("ember.cmd=\"{cmd}\""),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Lines in which the kernel reports a problem with ember's tables or AML.
fn acpi_complaints(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("acpi")
                && [
                    "error",
                    "warning",
                    "exception",
                    "bad",
                    "invalid",
                    "incorrect",
                    "fail",
                ]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect()
}

#[test]
fn poweroff_in_the_guest_ends_ember_with_status_0() {
    let test = "acpi_linux_poweroff";
    if !kvm_available(test) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(test) else {
        return;
    };
    let mut args = guest_args(
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
        "ls /sys/firmware/acpi/tables; ls /sys/bus/acpi/drivers/vmgenid; poweroff -f",
    );
    // A VM that may be snapshotted (never triggered here) has the VM generation ID device.
    let snap_dir = std::env::temp_dir().join(format!("ember-{test}-{}", std::process::id()));
    args.extend(
        [
            "--snapshot-to",
            snap_dir.to_str().unwrap(),
            "--snapshot-on",
            "sigusr2",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ember(&args, None, BOOT_TIMEOUT);
    assert!(!out.timed_out, "guest did not finish in time: {out:?}");
    out.expect_code(0);
    assert!(out.stderr.contains("guest powered off"), "{out:?}");
    // The kernel read ember's tables (sysfs lists them) and said nothing against them.
    for table in ["APIC", "DSDT", "FACP"] {
        assert!(out.stdout.contains(table), "no {table} in sysfs: {out:?}");
    }
    assert_eq!(acpi_complaints(&out.stdout), Vec::<&str>::new(), "{out:?}");
    // Linux's vmgenid driver (CONFIG_VMGENID) bound to \_SB.VGEN: its probe evaluated ADDR
    // and mapped the ID (a failed probe leaves no link in the driver's directory).
    assert!(
        out.stdout.contains("VMGENCTR:00"),
        "vmgenid not bound: {out:?}"
    );
    // The command itself powered the guest off: init never reported its status.
    assert!(!out.stdout.contains("ember-init: exit status"), "{out:?}");
}

#[test]
fn sigterm_asks_the_guest_to_shut_down_and_it_does() {
    let test = "acpi_linux_sigterm";
    if !kvm_available(test) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(test) else {
        return;
    };
    let args = guest_args(
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
        "sleep 1000",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Running::start(&args);
    let start = Instant::now();
    while !vm.stdout().contains("ember-init: running: sleep 1000") {
        assert!(
            start.elapsed() < BOOT_TIMEOUT && !vm.ended(),
            "the guest did not start its command: {}",
            vm.stdout()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    vm.signal(libc::SIGTERM);
    let out = vm.finish(BOOT_TIMEOUT);
    assert!(!out.timed_out, "ember did not end: {out:?}");
    out.expect_code(6);
    assert!(
        out.stdout
            .contains("ember-init: power button pressed, shutting down"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("asked the guest to shut down"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("the guest shut down cleanly"),
        "{out:?}"
    );
}
