// SPDX-License-Identifier: Apache-2.0
//! The boot GDT and the segment registers derived from it.

use kvm_bindings::kvm_segment;

/// Builds a GDT entry from flags (the upper 4 bits of byte 6 and byte 5), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Selector index of the code segment in [`boot_gdt`].
pub const CODE_INDEX: u16 = 1;
/// Selector index of the data segment.
pub const DATA_INDEX: u16 = 2;
/// Selector index of the task-state segment.
pub const TSS_INDEX: u16 = 3;

/// The boot GDT: null, code, data, TSS. `long_mode` picks a 64-bit code segment (L bit) or
/// a 32-bit one (D bit) for the PVH entry.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code_flags = if long_mode { 0xa09b } else { 0xc09b };
    [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn bits(entry: u64, shift: u32, mask: u64) -> u8 {
    // Every caller masks to at most 4 bits.
    u8::try_from((entry >> shift) & mask).unwrap_or(0)
}

/// The `kvm_segment` a selector of `index` into a GDT holding `entry` would load.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = bits(entry, 55, 1);
    // With 4 KiB granularity the limit counts pages.
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index * 8,
        type_: bits(entry, 40, 0xf),
        present: bits(entry, 47, 1),
        dpl: bits(entry, 45, 3),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g,
        avl: bits(entry, 52, 1),
        padding: 0,
        unusable: u8::from(bits(entry, 47, 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let gdt = boot_gdt(true);
        let cs = segment_from_gdt(gdt[1], CODE_INDEX);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.s, 1);
        assert_eq!(cs.g, 1);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn protected_mode_segments() {
        let gdt = boot_gdt(false);
        let cs = segment_from_gdt(gdt[1], CODE_INDEX);
        assert_eq!((cs.l, cs.db), (0, 1));
        let ds = segment_from_gdt(gdt[2], DATA_INDEX);
        assert_eq!(ds.type_, 3);
        assert_eq!(ds.selector, 16);
        let tss = segment_from_gdt(gdt[3], TSS_INDEX);
        assert_eq!(tss.type_, 0xb);
        assert_eq!(tss.s, 0);
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn entry_encoding_round_trips() {
        let e = gdt_entry(0xa09b, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 1);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd_efff);
    }
}
