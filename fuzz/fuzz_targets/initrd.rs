// SPDX-License-Identifier: Apache-2.0
//! The initrd loader: where an initrd goes (as high as the kernel's limits allow, above the
//! kernel) and the reading of the file into guest memory, with the kernel's fields as a
//! lying bzImage header could set them. Input: the kernel's end (u32, scaled by 4 KiB),
//! initrd_addr_max (u32), a byte: bit 0 → an extra archive follows the file (`ember
//! exec`'s), bits 1-7 → the file is made sparse-larger by that many 64 KiB; an extra length
//! byte; then the extra archive's bytes and the file's contents.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ember::arch::x86_64::regs::EntryProtocol;
use ember::kernel::{load_initrd, load_initrd_file, KernelFormat, LoadedKernel};
use ember::memory::{create_guest_memory, GuestMemory};
use ember_fuzz::Bytes8;
use libfuzzer_sys::fuzz_target;

const MEM_SIZE: u64 = 64 << 20;

static RIG: OnceLock<(GuestMemory, PathBuf)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (mem, path) = RIG.get_or_init(|| {
        let mem = create_guest_memory(MEM_SIZE).unwrap();
        (mem, ember_fuzz::scratch_dir("initrd").join("initrd.img"))
    });
    let mut b = Bytes8::new(data);
    let kernel_end = u64::from(b.u32()) << 12;
    let initrd_addr_max = u64::from(b.u32());
    let flags = b.u8();
    let extra = b.chunk();
    let contents = b.rest();
    let kernel = LoadedKernel {
        format: KernelFormat::BzImage,
        protocol: EntryProtocol::Linux64,
        entry: 0x100_0200,
        kernel_end,
        header: None,
        cmdline_limit: 2047,
        initrd_addr_max,
    };
    let _ = load_initrd(mem, MEM_SIZE, &kernel, contents);
    let file = std::fs::File::create(path).unwrap();
    std::io::Write::write_all(&mut &file, contents).unwrap();
    let grow = u64::from(flags >> 1) << 16;
    if grow > 0 {
        file.set_len(contents.len() as u64 + grow).unwrap();
    }
    drop(file);
    let extra = (flags & 1 != 0).then_some(extra);
    let _ = load_initrd_file(mem, MEM_SIZE, &kernel, path, extra, None);
});
