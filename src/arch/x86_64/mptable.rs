// SPDX-License-Identifier: Apache-2.0
//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds every
//! vCPU, the IOAPIC and the legacy interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_SIZE, MPTABLE_START};
use crate::memory::GuestMemory;

/// Errors while building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// More vCPUs than the table can describe (APIC IDs are 8 bits; the IOAPIC takes one).
    #[error("the MP table can describe at most 254 vCPUs, not {0}")]
    TooManyCpus(u32),
    /// The table does not fit the area reserved for it.
    #[error("the MP table ({0} bytes) does not fit its reserved area")]
    TooLarge(usize),
    /// Writing to guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    Write,
}

const MPC_SPEC_REV: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const CPU_FEATURE_FPU: u32 = 1;
const BUS_ID_ISA: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The bytes of the MP floating pointer followed by the configuration table, for a table
/// placed at `base`.
pub fn build(vcpus: u32, base: u64) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(MpTableError::TooManyCpus(vcpus));
    }
    let ioapic_id = u8::try_from(vcpus).map_err(|_| MpTableError::TooManyCpus(vcpus))?;
    let table_addr = u32::try_from(base + 16).map_err(|_| MpTableError::Write)?;

    // Entries of the configuration table.
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let mut e = vec![ENTRY_PROCESSOR, cpu as u8, APIC_VERSION];
        e.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        e.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        e.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        entries.push(e);
    }
    let mut bus = vec![ENTRY_BUS, BUS_ID_ISA];
    bus.extend_from_slice(b"ISA   ");
    entries.push(bus);
    let mut ioapic = vec![ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1];
    ioapic.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    entries.push(ioapic);
    for irq in 0..IOAPIC_PINS as u8 {
        // ISA IRQ n -> IOAPIC pin n, conforming polarity and trigger.
        entries.push(vec![
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ID_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // LINT0 of every local APIC is ExtINT, LINT1 is NMI.
    entries.push(vec![
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        BUS_ID_ISA,
        0,
        0xff,
        0,
    ]);
    entries.push(vec![
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        BUS_ID_ISA,
        0,
        0xff,
        1,
    ]);

    let body: Vec<u8> = entries.concat();
    let entry_count = u16::try_from(entries.len()).map_err(|_| MpTableError::TooLarge(0))?;
    let table_len = 44 + body.len();
    let table_len16 = u16::try_from(table_len).map_err(|_| MpTableError::TooLarge(table_len))?;

    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len16.to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"EMBER   "); // OEM ID
    table.extend_from_slice(b"MICROVM     "); // product ID
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&u32::try_from(APIC_START).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(MPC_SPEC_REV);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    if out.len() as u64 > MPTABLE_SIZE {
        return Err(MpTableError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Writes the MP table for `vcpus` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemory, vcpus: u32) -> Result<(), MpTableError> {
    let bytes = build(vcpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u32, 2, 4, 64, 254] {
            let t = build(n, MPTABLE_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(addr, MPTABLE_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "configuration table checksum");
            let count = u16::from_le_bytes([cfg[34], cfg[35]]) as u32;
            assert_eq!(count, n + 1 + 1 + IOAPIC_PINS + 2);
            // Processor entries: APIC IDs 0..n, only the first is the BSP.
            for cpu in 0..n as usize {
                let e = &cfg[44 + cpu * 20..44 + cpu * 20 + 20];
                assert_eq!(e[0], ENTRY_PROCESSOR);
                assert_eq!(e[1] as usize, cpu);
                assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
                assert_ne!(e[3] & CPU_ENABLED, 0);
            }
        }
    }

    #[test]
    fn rejects_bad_counts() {
        assert_eq!(build(0, 0), Err(MpTableError::TooManyCpus(0)));
        assert_eq!(build(255, 0), Err(MpTableError::TooManyCpus(255)));
    }

    #[test]
    fn written_to_memory() {
        let mem = crate::memory::create_guest_memory(2 << 20).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
