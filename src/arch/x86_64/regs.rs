// SPDX-License-Identifier: Apache-2.0
//! Initial register state of the boot vCPU for each entry protocol, the boot identity
//! page tables, and the FPU and local-APIC set-up every vCPU gets.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{boot_gdt, segment_from_gdt, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemory;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryProtocol {
    /// Linux 64-bit boot protocol: long mode, paging on, `rsi` = zero page.
    Linux64,
    /// Xen PVH: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors while writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A boot structure did not fit in guest memory.
    #[error("cannot write the boot {0} into guest memory")]
    Write(&'static str),
}

/// General-purpose registers at the kernel entry point.
pub fn boot_regs(protocol: EntryProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        EntryProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryProtocol::Pvh => {
            regs.rbx = PVH_INFO_START;
        }
    }
    regs
}

/// Writes the boot GDT and IDT and returns the special registers for the entry protocol
/// (based on `current`, the vCPU's state after creation). For the 64-bit entry this also
/// writes identity page tables covering the first 4 GiB.
pub fn boot_sregs(
    mem: &GuestMemory,
    protocol: EntryProtocol,
    current: &kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let long_mode = protocol == EntryProtocol::Linux64;
    let gdt = boot_gdt(long_mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| RegsError::Write("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::Write("IDT"))?;

    let mut sregs = *current;
    let code = segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&gdt) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        EntryProtocol::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: one PML4 entry, four PDPT entries, four
/// page directories of 512 entries.
pub fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| RegsError::Write("page tables"))
    };
    w(PDPTE_START | PRESENT_RW, PML4_START)?;
    for dir in 0..4u64 {
        let pd = PDE_START + dir * 0x1000;
        w(pd | PRESENT_RW, PDPTE_START + dir * 8)?;
        for i in 0..512u64 {
            let phys = (dir << 30) | (i << 21);
            w(phys | PRESENT_RW | HUGE, pd + i * 8)?;
        }
    }
    Ok(())
}

/// The FPU state Linux expects at entry: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

/// Programs LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as firmware would.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let set_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = get_reg(state, APIC_LVT0);
    set_reg(state, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(state, APIC_LVT1);
    set_reg(state, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = create_guest_memory(16 << 20).unwrap();
        write_identity_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for dir in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + dir * 8)).unwrap();
            assert_eq!(pdpte & !0xfff, PDE_START + dir * 0x1000);
        }
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
        assert_eq!(last & 0x83, 0x83);
    }

    #[test]
    fn long_mode_sregs() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let s = boot_sregs(&mem, EntryProtocol::Linux64, &kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 31);
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, boot_gdt(true)[1]);
    }

    #[test]
    fn pvh_sregs_and_regs() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let s = boot_sregs(&mem, EntryProtocol::Pvh, &kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(s.efer, 0);
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
        let r = boot_regs(EntryProtocol::Pvh, 0x100_0000);
        assert_eq!(r.rbx, PVH_INFO_START);
        assert_eq!(r.rip, 0x100_0000);
        let r = boot_regs(EntryProtocol::Linux64, 0x100_0200);
        assert_eq!(r.rsi, ZERO_PAGE_START);
        assert_eq!(r.rflags, 2);
    }

    #[test]
    fn lint_modes() {
        let mut st = kvm_lapic_state::default();
        set_lint(&mut st);
        assert_eq!((get_reg(&st, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((get_reg(&st, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
