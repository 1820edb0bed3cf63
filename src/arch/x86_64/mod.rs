// SPDX-License-Identifier: Apache-2.0
//! x86_64 platform set-up: where things go in guest memory ([`layout`]), the boot
//! structures the kernel reads (zero page or PVH start info, memory map, MP table), and the
//! register state of each vCPU ([`regs`], [`gdt`], [`cpuid`], [`msrs`]).

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{e820_map, E820Entry, GuestMemory};
use layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
    ZERO_PAGE_START,
};

/// Errors while writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A structure could not be written into guest memory.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str),
    /// The memory map has more entries than the boot structure holds.
    #[error("the guest memory map has {0} entries, more than the boot protocol can carry")]
    TooManyE820Entries(usize),
    /// Building the MP table failed.
    #[error("cannot build the MP table")]
    MpTable(#[from] mptable::MpTableError),
    /// Building the ACPI tables failed.
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
}

/// Where the initrd went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// Writes the Linux zero page for the 64-bit boot protocol. `header` is the kernel's own
/// setup header (bzImage) or `None` for an ELF kernel entered at its 64-bit entry.
pub fn write_zero_page(
    mem: &GuestMemory,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    if header.is_none() {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = u32::try_from(initrd.addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
        params.ext_ramdisk_image = u32::try_from(initrd.addr >> 32).unwrap_or(0);
        params.ext_ramdisk_size = u32::try_from(initrd.size >> 32).unwrap_or(0);
    }
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = u8::try_from(map.len()).unwrap_or(u8::MAX);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::Write("zero page"))
}

fn memmap_entry_bytes(e: &E820Entry) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(&e.addr.to_le_bytes());
    b[8..16].copy_from_slice(&e.size.to_le_bytes());
    b[16..20].copy_from_slice(&(e.kind as u32).to_le_bytes());
    b
}

/// Writes the PVH `hvm_start_info`, its module list (the initrd) and memory map.
pub fn write_pvh_start_info(
    mem: &GuestMemory,
    mem_size: u64,
    initrd: Option<InitrdPlacement>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let map = e820_map(mem_size);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (i, e) in map.iter().enumerate() {
        mem.write_slice(
            &memmap_entry_bytes(e),
            GuestAddress(PVH_MEMMAP_START + 24 * i as u64),
        )
        .map_err(|_| BootError::Write("PVH memory map"))?;
    }
    let nr_modules = u32::from(initrd.is_some());
    if let Some(initrd) = initrd {
        let mut m = [0u8; 32];
        m[0..8].copy_from_slice(&initrd.addr.to_le_bytes());
        m[8..16].copy_from_slice(&initrd.size.to_le_bytes());
        mem.write_slice(&m, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| BootError::Write("PVH module list"))?;
    }
    let mut s = Vec::with_capacity(56);
    s.extend_from_slice(&XEN_HVM_START_MAGIC_VALUE.to_le_bytes());
    s.extend_from_slice(&1u32.to_le_bytes()); // version 1: has the memory map
    s.extend_from_slice(&0u32.to_le_bytes()); // flags
    s.extend_from_slice(&nr_modules.to_le_bytes());
    s.extend_from_slice(
        &(if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        })
        .to_le_bytes(),
    );
    s.extend_from_slice(&CMDLINE_START.to_le_bytes());
    s.extend_from_slice(&rsdp.unwrap_or(0).to_le_bytes());
    s.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    s.extend_from_slice(&u32::try_from(map.len()).unwrap_or(0).to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&s, GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::Write("PVH start info"))
}

/// Number of bytes of usable RAM described by the map (for diagnostics and tests).
pub fn usable_ram(mem_size: u64) -> u64 {
    e820_map(mem_size)
        .iter()
        .filter(|e| e.kind as u32 == E820_RAM)
        .map(|e| e.size)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn zero_page_fields() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 0x1234,
        };
        write_zero_page(&mem, 64 << 20, None, 100, Some(initrd)).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!({ last.addr } + { last.size }, 64 << 20);
    }

    #[test]
    fn pvh_start_info_fields() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 4096,
        };
        write_pvh_start_info(&mem, 64 << 20, Some(initrd), None).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let nr: u32 = mem.read_obj(GuestAddress(PVH_INFO_START + 12)).unwrap();
        assert_eq!(nr, 1);
        let entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_START + 48)).unwrap();
        assert_eq!(entries, 3);
        let modaddr: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(modaddr, 0x300_0000);
        assert_eq!(usable_ram(64 << 20), (64 << 20) - (0x100000 - 0x9fc00));
    }
}
