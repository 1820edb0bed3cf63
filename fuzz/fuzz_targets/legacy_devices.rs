// SPDX-License-Identifier: Apache-2.0
//! The legacy and platform register models on their buses as the builder places them:
//! COM1 (a 16550A whose output feeds the console bookkeeping: panic and kernel-problem
//! line scanning), the i8042, the ACPI platform registers, the boot timer and the exit
//! device. Input: a sequence of operations, each a kind byte `k` then its operands:
//! `k & 3` = 0 → read, 1 → write (a u64 value follows), of `1 << ((k >> 5) & 3)` bytes at
//! offset byte `o` of device `(k >> 2) % 5` (COM1, i8042, ACPI, boot timer, exit device);
//! 2 → host input for COM1 (a length byte and the bytes); 3 → the guest writes a length
//! byte's worth of bytes to COM1's transmit register (console output, lines and all).
#![no_main]

use std::sync::{Arc, Mutex};

use ember::arch::x86_64::layout::{
    ACPI_MMIO_START, BOOT_TIMER_START, COM1_PORT, EXIT_DEVICE_START, I8042_DATA_PORT,
};
use ember::devices::acpi::AcpiPlatform;
use ember::devices::bus::{Bus, BusDevice};
use ember::devices::legacy::boot_timer::BootTimer;
use ember::devices::legacy::exit_device::ExitDevice;
use ember::devices::legacy::i8042::I8042;
use ember::devices::legacy::serial::{ConsoleOutput, SerialDevice};
use ember::exit::VmExit;
use ember::timeline::Timeline;
use ember_fuzz::Bytes8;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct Rig {
    bus: Bus,
    com1: Arc<Mutex<SerialDevice>>,
}

/// (base, length) of each device on the bus.
const DEVICES: [(u64, u64); 5] = [
    (COM1_PORT as u64, 8),
    (I8042_DATA_PORT as u64, 5),
    (ACPI_MMIO_START, 0x1000),
    (BOOT_TIMER_START, 0x1000),
    (EXIT_DEVICE_START, 0x1000),
];

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fn rig() -> Rig {
    let exit = Arc::new(VmExit::new().unwrap());
    let timeline = Arc::new(Timeline::new(std::time::Instant::now()));
    let out = ConsoleOutput::new(
        Box::new(std::io::sink()),
        "fuzz",
        Some(timeline.clone()),
        Some(exit.clone()),
    )
    .unwrap();
    let com1 = Arc::new(Mutex::new(
        SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), out).unwrap(),
    ));
    let (acpi, _button) = AcpiPlatform::new(exit.clone(), EventFd::new(EFD_NONBLOCK).unwrap());
    let mut bus = Bus::new();
    let devs: [Arc<Mutex<dyn BusDevice>>; 5] = [
        com1.clone(),
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        Arc::new(Mutex::new(acpi)),
        Arc::new(Mutex::new(BootTimer::new(timeline, false))),
        Arc::new(Mutex::new(ExitDevice::new(exit, true))),
    ];
    for (dev, (base, len)) in devs.into_iter().zip(DEVICES) {
        bus.insert(dev, base, len).unwrap();
    }
    Rig { bus, com1 }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = RIG.lock().unwrap();
    let r = guard.get_or_insert_with(rig);
    let mut b = Bytes8::new(data);
    while !b.is_empty() {
        let k = b.u8();
        let (base, len) = DEVICES[usize::from(k >> 2) % DEVICES.len()];
        let width = 1usize << ((k >> 5) & 3);
        match k & 3 {
            0 => {
                let off = u64::from(b.u8()) % len;
                let mut d = [0u8; 8];
                r.bus.read(base + off, &mut d[..width]);
            }
            1 => {
                let off = u64::from(b.u8()) % len;
                let v = b.u64().to_le_bytes();
                r.bus.write(base + off, &v[..width]);
            }
            2 => {
                let input = b.chunk();
                r.com1.lock().unwrap().enqueue_input(input);
            }
            _ => {
                for &byte in b.chunk() {
                    r.bus.write(u64::from(COM1_PORT), &[byte]);
                }
            }
        }
    }
});
