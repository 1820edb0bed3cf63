// SPDX-License-Identifier: Apache-2.0
//! The ACPI platform end to end with tiny guests (milliseconds each): the tables are where the
//! guest looks for them, S5 and the reset register end the VM, and a stop signal presses the
//! power button — a guest that answers shuts down cleanly (exit 6), one that does not is
//! stopped hard after --shutdown-timeout or at a second signal (exit 7). The VM generation
//! ID is in guest memory where the DSDT says, fresh for every VM.

mod common;
mod common_acpi;

use std::time::Duration;

use common::*;
use common_acpi::Running;
use ember::arch::x86_64::layout::{
    ACPI_GED_EVENT, ACPI_RESET_REGISTER, ACPI_SLEEP_CONTROL, ACPI_START, GED_IRQ, IOAPIC_START,
    VMGENID_START,
};
use ember::devices::acpi::{
    GED_EVENT_POWER_BUTTON, RESET_VALUE, S5_SLEEP_TYPE, SLP_EN, SLP_TYP_SHIFT,
};
use ember::devices::vmgenid::VMGENID_LEN;

const T: Duration = Duration::from_secs(30);

/// The byte a guest writes to the sleep control register to power off.
const S5: u8 = (S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN;

/// `mov rdi, addr; mov al, [rdi]`
fn mmio_read8(a: &mut Asm, addr: u64) {
    a.bytes(&[0x48, 0xbf])
        .bytes(&addr.to_le_bytes())
        .bytes(&[0x8a, 0x07]);
}

/// `mov rdi, addr; mov eax, [rdi]`
fn mmio_read32(a: &mut Asm, addr: u64) {
    a.bytes(&[0x48, 0xbf])
        .bytes(&addr.to_le_bytes())
        .bytes(&[0x8b, 0x07]);
}

/// Prints the byte in al on COM1 (`mov dx, 0x3f8; out dx, al`).
fn print_al(a: &mut Asm) {
    a.mov_dx(0x3f8).out_dx_al();
}

/// Writes S5 to the sleep control register, then halts (a guest whose power off did not
/// work would halt forever and the test would time out).
fn power_off(a: &mut Asm) {
    a.mov_al(S5).mmio_write8(ACPI_SLEEP_CONTROL).halt_loop();
}

struct Tiny {
    dir: std::path::PathBuf,
    elf: std::path::PathBuf,
}

impl Tiny {
    fn new(name: &str, a: &Asm) -> Option<Self> {
        if !kvm_available(name) {
            return None;
        }
        let dir = temp_dir(name);
        let elf = write_tiny_guest(&dir, "guest.elf", &a.code, &[]);
        Some(Self { dir, elf })
    }

    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["run", "--kernel", self.elf.to_str().unwrap(), "--mem", "16"];
        args.extend_from_slice(extra);
        args
    }

    fn run(&self, extra: &[&str]) -> Finished {
        let out = run_ember(&self.args(extra), None, T);
        assert!(!out.timed_out, "ember did not end: {out:?}");
        out
    }
}

impl Drop for Tiny {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn guest_finds_the_rsdp_in_the_bios_area() {
    // Print the 8 bytes at ACPI_START ("RSD PTR " with ACPI on), then reset.
    let mut a = Asm::new();
    for i in 0..8 {
        mmio_read8(&mut a, ACPI_START + i);
        print_al(&mut a);
    }
    a.reset();
    let Some(g) = Tiny::new("acpi-rsdp", &a) else {
        return;
    };
    let on = g.run(&[]);
    on.expect_code(0);
    assert_eq!(on.stdout.as_bytes(), b"RSD PTR ", "{on:?}");
    let off = g.run(&["--no-acpi"]);
    off.expect_code(0);
    assert_eq!(off.stdout.as_bytes(), &[0u8; 8], "{off:?}");
}

/// A guest that prints the VM generation ID (the 16 bytes at VMGENID_START) on COM1, two
/// letters per byte ('a' + high nibble, 'a' + low nibble), then resets.
fn vmgenid_printing_guest() -> Asm {
    let mut a = Asm::new();
    for i in 0..VMGENID_LEN as u64 {
        mmio_read8(&mut a, VMGENID_START + i);
        a.bytes(&[0xc0, 0xe8, 0x04, 0x04, b'a']); // shr al, 4; add al, 'a'
        print_al(&mut a);
        a.bytes(&[0x8a, 0x07]); // mov al, [rdi]
        a.bytes(&[0x24, 0x0f, 0x04, b'a']); // and al, 0xf; add al, 'a'
        print_al(&mut a);
    }
    a.reset();
    a
}

/// The ID a [`vmgenid_printing_guest`] printed.
fn printed_id(out: &Finished) -> Vec<u8> {
    let s = out.stdout.as_bytes();
    assert_eq!(s.len(), 2 * VMGENID_LEN, "{out:?}");
    s.chunks(2)
        .map(|p| {
            assert!(p.iter().all(|c| (b'a'..=b'p').contains(c)), "{out:?}");
            ((p[0] - b'a') << 4) | (p[1] - b'a')
        })
        .collect()
}

#[test]
fn guest_reads_a_fresh_nonzero_vm_generation_id_every_run() {
    let Some(g) = Tiny::new("acpi-vmgenid", &vmgenid_printing_guest()) else {
        return;
    };
    // A VM that may be snapshotted has the ID (the snapshot is never triggered here).
    let snap_dir = g.dir.join("snapshot");
    let snap = [
        "--snapshot-to",
        snap_dir.to_str().unwrap(),
        "--snapshot-on",
        "sigusr2",
    ];
    let first = g.run(&snap);
    first.expect_code(0);
    let second = g.run(&snap);
    second.expect_code(0);
    let (a, b) = (printed_id(&first), printed_id(&second));
    assert_ne!(
        a,
        vec![0; VMGENID_LEN],
        "the ID is written before the guest runs"
    );
    assert_ne!(b, vec![0; VMGENID_LEN]);
    assert_ne!(a, b, "two VMs never share a generation ID");
    // Without ACPI there is no generation ID: the page stays zero.
    let mut no_acpi = snap.to_vec();
    no_acpi.push("--no-acpi");
    let off = g.run(&no_acpi);
    off.expect_code(0);
    assert_eq!(printed_id(&off), vec![0; VMGENID_LEN]);
    // Nor in a VM that can never be snapshotted (no --snapshot-to): it would only cost
    // the guest a device to probe.
    let plain = g.run(&[]);
    plain.expect_code(0);
    assert_eq!(printed_id(&plain), vec![0; VMGENID_LEN]);
}

#[test]
fn s5_write_powers_off_with_status_zero() {
    let mut a = Asm::new();
    a.print("powering off\n");
    // A sleep type without SLP_EN does nothing: the guest goes on.
    a.mov_al(S5_SLEEP_TYPE << SLP_TYP_SHIFT)
        .mmio_write8(ACPI_SLEEP_CONTROL);
    a.print("still here\n");
    power_off(&mut a);
    let Some(g) = Tiny::new("acpi-s5", &a) else {
        return;
    };
    let out = g.run(&[]);
    out.expect_code(0);
    assert_eq!(out.stdout, "powering off\nstill here\n");
    assert!(out.stderr.contains("guest powered off"), "{out:?}");
}

#[test]
fn reset_register_reboots_with_status_zero() {
    let mut a = Asm::new();
    a.mov_al(RESET_VALUE)
        .mmio_write8(ACPI_RESET_REGISTER)
        .halt_loop();
    let Some(g) = Tiny::new("acpi-reset", &a) else {
        return;
    };
    let out = g.run(&[]);
    out.expect_code(0);
    assert!(out.stderr.contains("guest rebooted"), "{out:?}");
}

#[test]
fn without_acpi_the_registers_are_absent() {
    // With --no-acpi the S5 write hits nothing; the guest then resets through the i8042.
    let mut a = Asm::new();
    a.mov_al(S5).mmio_write8(ACPI_SLEEP_CONTROL);
    a.print("no acpi\n").reset();
    let Some(g) = Tiny::new("acpi-absent", &a) else {
        return;
    };
    let out = g.run(&["--no-acpi"]);
    out.expect_code(0);
    assert_eq!(out.stdout, "no acpi\n");
    assert!(out.stderr.contains("guest rebooted"), "{out:?}");
}

/// Unmasks the GED's IOAPIC pin (vector 0x30, edge, active high, CPU 0), as a guest's GED
/// driver does: ember only presses the power button of a guest that did. Interrupts stay
/// disabled in the tiny guest (IF=0), so the vector is never delivered.
fn enable_ged_irq(a: &mut Asm) {
    let low_dword_index = 0x10 + 2 * GED_IRQ;
    a.mov_eax(low_dword_index).mmio_write32(IOAPIC_START); // IOREGSEL
    a.mov_eax(0x30).mmio_write32(IOAPIC_START + 0x10); // IOWIN
}

/// A guest that polls the GED event register and powers off when the power button was
/// pressed (what Linux does through the GED interrupt and _EVT).
fn button_aware_guest() -> Asm {
    let mut a = Asm::new();
    enable_ged_irq(&mut a);
    a.print("ready\n");
    let top = a.here();
    mmio_read32(&mut a, ACPI_GED_EVENT);
    a.bytes(&[0xa9])
        .bytes(&GED_EVENT_POWER_BUTTON.to_le_bytes()); // test eax, imm32
    a.bytes(&[0xf3, 0x90]); // pause
    a.jcc(0x74, top); // jz top
    a.print("button pressed\n");
    power_off(&mut a);
    a
}

/// A guest that enabled its power button but ignores it (or, with `listening` false, never
/// enabled it).
fn spinning_guest(listening: bool) -> Asm {
    let mut a = Asm::new();
    if listening {
        enable_ged_irq(&mut a);
    }
    a.print("ready\n");
    let top = a.here();
    a.bytes(&[0xf3, 0x90]).jmp(top); // pause; jmp
    a
}

#[test]
fn sigterm_presses_the_power_button_and_a_clean_shutdown_exits_6() {
    let Some(g) = Tiny::new("acpi-sigterm", &button_aware_guest()) else {
        return;
    };
    let vm = Running::start(&g.args(&["--shutdown-timeout", "60"]));
    assert!(vm.wait_stdout("ready\n", T), "the guest did not start");
    vm.signal(libc::SIGTERM);
    let out = vm.finish(T);
    assert!(!out.timed_out, "{out:?}");
    out.expect_code(6);
    assert_eq!(out.stdout, "ready\nbutton pressed\n");
    assert!(
        out.stderr.contains("asked the guest to shut down"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("the guest shut down cleanly"),
        "{out:?}"
    );
}

#[test]
fn sigint_without_a_terminal_also_asks() {
    let Some(g) = Tiny::new("acpi-sigint", &button_aware_guest()) else {
        return;
    };
    let vm = Running::start(&g.args(&["--shutdown-timeout", "60"]));
    assert!(vm.wait_stdout("ready\n", T), "the guest did not start");
    vm.signal(libc::SIGINT);
    let out = vm.finish(T);
    out.expect_code(6);
    assert!(out.stdout.ends_with("button pressed\n"), "{out:?}");
}

#[test]
fn a_guest_that_ignores_the_button_is_stopped_hard_after_the_timeout() {
    let Some(g) = Tiny::new("acpi-timeout", &spinning_guest(true)) else {
        return;
    };
    let vm = Running::start(&g.args(&["--shutdown-timeout", "2"]));
    assert!(vm.wait_stdout("ready\n", T), "the guest did not start");
    vm.signal(libc::SIGTERM);
    let out = vm.finish(T);
    assert!(!out.timed_out, "{out:?}");
    out.expect_code(7);
    assert!(
        out.stderr.contains("did not shut down within 2s"),
        "{out:?}"
    );
    assert!(out.stderr.contains("stopped hard"), "{out:?}");
}

#[test]
fn a_second_signal_stops_at_once() {
    // The shutdown timeout (10 minutes) is far beyond the wait: only the second signal can
    // end this run in time.
    let Some(g) = Tiny::new("acpi-second", &spinning_guest(true)) else {
        return;
    };
    let vm = Running::start(&g.args(&["--shutdown-timeout", "600"]));
    assert!(vm.wait_stdout("ready\n", T), "the guest did not start");
    vm.signal(libc::SIGTERM);
    // Signals of one kind do not queue: send the second after the first was handled.
    assert!(vm.wait_stderr("asked the guest to shut down", T));
    vm.signal(libc::SIGTERM);
    let out = vm.finish(T);
    assert!(!out.timed_out, "{out:?}");
    out.expect_code(7);
    assert!(
        out.stderr.contains("asked the guest to shut down"),
        "{out:?}"
    );
    assert!(out.stderr.contains("second stop signal"), "{out:?}");
}

#[test]
fn without_acpi_a_signal_stops_at_once() {
    let Some(g) = Tiny::new("acpi-nobutton", &spinning_guest(false)) else {
        return;
    };
    let vm = Running::start(&g.args(&["--no-acpi", "--shutdown-timeout", "600"]));
    assert!(vm.wait_stdout("ready\n", T), "the guest did not start");
    vm.signal(libc::SIGTERM);
    let out = vm.finish(T);
    assert!(!out.timed_out, "{out:?}");
    out.expect_code(7);
    assert!(out.stderr.contains("stopping the guest"), "{out:?}");
}

#[test]
fn a_guest_that_never_enabled_its_power_button_is_stopped_at_once() {
    // ACPI is on, but the guest never unmasked the GED's interrupt line: nothing in it
    // could hear the button, so waiting for it would only waste the shutdown timeout.
    let Some(g) = Tiny::new("acpi-deaf", &spinning_guest(false)) else {
        return;
    };
    let vm = Running::start(&g.args(&["--shutdown-timeout", "600"]));
    assert!(vm.wait_stdout("ready\n", T), "the guest did not start");
    vm.signal(libc::SIGTERM);
    let out = vm.finish(T);
    assert!(!out.timed_out, "{out:?}");
    out.expect_code(7);
    assert!(
        out.stderr.contains("has not enabled its power button"),
        "{out:?}"
    );
}
