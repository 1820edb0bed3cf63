// SPDX-License-Identifier: Apache-2.0
//! Kernel symbol lookup from the ELF symbol table of a vmlinux, for error reports
//! ("at do_idle+0x1c") and the guest profiler.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A sorted table of function symbols.
#[derive(Debug, Default, Clone)]
pub struct Symbols {
    // (address, size, name), sorted by address.
    entries: Vec<(u64, u64, String)>,
}

const SHT_SYMTAB: u32 = 2;
const STT_FUNC: u8 = 2;
const STT_NOTYPE: u8 = 0;

fn field<const N: usize>(b: &[u8], o: usize) -> Option<[u8; N]> {
    b.get(o..o.checked_add(N)?)?.try_into().ok()
}
fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(field(b, o)?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(field(b, o)?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(field(b, o)?))
}
fn usize_at(b: &[u8], o: usize) -> Option<usize> {
    usize::try_from(u64_at(b, o)?).ok()
}

impl Symbols {
    /// Reads the symbol table of the ELF64 file at `path`. Returns `None` when the file is
    /// not an ELF64 little-endian image or has no symbol table.
    pub fn from_elf_file(path: &Path) -> Option<Self> {
        let bytes = crate::user_file::read_regular(path).ok()?;
        Self::from_elf_bytes(&bytes)
    }

    /// Parses the symbol table of an ELF64 image held in memory. Hostile input is fine: every
    /// offset is bounds-checked.
    pub fn from_elf_bytes(b: &[u8]) -> Option<Self> {
        if b.get(0..4)? != b"\x7fELF" || *b.get(4)? != 2 || *b.get(5)? != 1 {
            return None;
        }
        let shoff = usize_at(b, 0x28)?;
        let shentsize = usize::from(u16_at(b, 0x3a)?);
        let shnum = usize::from(u16_at(b, 0x3c)?);
        if shentsize < 64 {
            return None;
        }
        let section = |i: usize| -> Option<(u32, usize, usize, u32, usize)> {
            let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
            Some((
                u32_at(b, h.checked_add(4)?)?,    // type
                usize_at(b, h.checked_add(24)?)?, // offset
                usize_at(b, h.checked_add(32)?)?, // size
                u32_at(b, h.checked_add(40)?)?,   // link
                usize_at(b, h.checked_add(56)?)?, // entsize
            ))
        };
        let mut entries = Vec::new();
        for i in 0..shnum {
            let (ty, off, size, link, entsize) = section(i)?;
            if ty != SHT_SYMTAB || entsize < 24 {
                continue;
            }
            let (_, stroff, strsize, _, _) = section(usize::try_from(link).ok()?)?;
            let strtab = b.get(stroff..stroff.checked_add(strsize)?)?;
            let syms = b.get(off..off.checked_add(size)?)?;
            for s in syms.chunks_exact(entsize) {
                let info = s[4];
                let ty = info & 0xf;
                let value = u64_at(s, 8)?;
                let sz = u64_at(s, 16)?;
                if (ty != STT_FUNC && ty != STT_NOTYPE) || value == 0 {
                    continue;
                }
                let name_off = usize::try_from(u32_at(s, 0)?).ok()?;
                let Some(rest) = strtab.get(name_off..) else {
                    continue;
                };
                let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
                let name = String::from_utf8_lossy(&rest[..end]).into_owned();
                if name.is_empty() || name.starts_with("__pfx_") {
                    continue;
                }
                entries.push((value, sz, name));
            }
        }
        if entries.is_empty() {
            return None;
        }
        entries.sort_by_key(|e| (e.0, std::cmp::Reverse(e.1)));
        entries.dedup_by_key(|e| e.0);
        Some(Self { entries })
    }

    /// Builds a table from (address, size, name) triples (for tests and hand-made guests).
    pub fn from_entries(mut entries: Vec<(u64, u64, String)>) -> Self {
        entries.sort_by_key(|e| e.0);
        Self { entries }
    }

    /// The symbol containing `addr` and the offset into it. A symbol without a size covers
    /// everything up to the next symbol.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self
            .entries
            .partition_point(|e| e.0 <= addr)
            .checked_sub(1)?;
        let (start, size, name) = &self.entries[i];
        let off = addr - start;
        let within = if *size > 0 {
            off < *size
        } else {
            self.entries.get(i + 1).is_none_or(|n| addr < n.0)
        };
        within.then_some((name.as_str(), off))
    }

    /// `name+0xoff`, or the bare address when no symbol covers it.
    pub fn describe(&self, addr: u64) -> String {
        match self.lookup(addr) {
            Some((name, off)) => format!("{name}+{off:#x}"),
            None => format!("{addr:#x}"),
        }
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_by_range() {
        let s = Symbols::from_entries(vec![
            (0x1000, 0x10, "a".into()),
            (0x2000, 0, "b".into()),
            (0x3000, 0x100, "c".into()),
        ]);
        assert_eq!(s.lookup(0x1004), Some(("a", 4)));
        assert_eq!(s.lookup(0x1010), None);
        assert_eq!(s.lookup(0x2fff), Some(("b", 0xfff)));
        assert_eq!(s.describe(0x3010), "c+0x10");
        assert_eq!(s.describe(0x10), "0x10");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Symbols::from_elf_bytes(b"").is_none());
        assert!(Symbols::from_elf_bytes(b"\x7fELF\x02\x01garbage").is_none());
        let mut b = vec![0u8; 64];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        b[0x3a] = 64;
        b[0x3c] = 5;
        assert!(Symbols::from_elf_bytes(&b).is_none());
    }
}

/// A kernel's symbol table, read from its file the first time it is needed (reading a
/// vmlinux costs milliseconds that a normal boot should not pay).
#[derive(Debug, Default)]
pub struct LazySymbols {
    path: Option<PathBuf>,
    cell: OnceLock<Option<Symbols>>,
}

impl LazySymbols {
    /// Symbols of the ELF file at `path` (`None`: no symbols, e.g. a bzImage).
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            cell: OnceLock::new(),
        }
    }

    /// Symbols already parsed (for hand-made guests in tests).
    pub fn preloaded(symbols: Symbols) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(Some(symbols));
        Self { path: None, cell }
    }

    /// The table, reading it on first use.
    pub fn get(&self) -> Option<&Symbols> {
        self.cell
            .get_or_init(|| self.path.as_deref().and_then(Symbols::from_elf_file))
            .as_ref()
    }
}
