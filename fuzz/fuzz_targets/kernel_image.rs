// SPDX-License-Identifier: Apache-2.0
//! The kernel loaders: the input is a kernel image file (ELF vmlinux or bzImage, told
//! apart by its first bytes as ember does), loaded into a 64 MiB guest as a boot does:
//! format detection, linux-loader's ELF or bzImage loader, ember's checks of the setup
//! header, then the command line, an initrd above the kernel and the zero page or PVH start
//! info that the loaded kernel's fields steer.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ember::arch::x86_64::regs::EntryProtocol;
use ember::arch::x86_64::{write_pvh_start_info, write_zero_page};
use ember::kernel::{load_initrd, load_kernel, write_cmdline};
use ember::memory::{create_guest_memory, GuestMemory};
use libfuzzer_sys::fuzz_target;

const MEM_SIZE: u64 = 64 << 20;

static RIG: OnceLock<(GuestMemory, PathBuf)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (mem, path) = RIG.get_or_init(|| {
        let mem = create_guest_memory(MEM_SIZE).unwrap();
        (mem, ember_fuzz::scratch_dir("kernel").join("vmlinux"))
    });
    std::fs::write(path, data).unwrap();
    let Ok((kernel, _)) = load_kernel(mem, path, None) else {
        return;
    };
    let cmdline_len = write_cmdline(mem, &kernel, "console=ttyS0 panic=-1").ok();
    let initrd = load_initrd(mem, MEM_SIZE, &kernel, &[0x30; 4096]).ok();
    let _ = match kernel.protocol {
        EntryProtocol::Pvh => write_pvh_start_info(mem, MEM_SIZE, initrd, None),
        EntryProtocol::Linux64 => write_zero_page(
            mem,
            MEM_SIZE,
            kernel.header,
            cmdline_len.unwrap_or(0),
            initrd,
        ),
    };
});
