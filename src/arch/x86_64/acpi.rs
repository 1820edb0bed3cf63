// SPDX-License-Identifier: Apache-2.0
//! The ACPI tables ember gives a guest: a hardware-reduced platform, the minimum Linux needs
//! to enumerate the vCPUs and interrupt controllers, power off through S5, reset, and hear
//! the power button. Written at [`ACPI_START`], inside the BIOS area (0xe0000..0xfffff) where
//! the kernel looks for the RSDP (the PVH start info also carries its address).
//!
//! ```text
//!   RSDP ─► XSDT ─┬─► FADT  hardware-reduced; sleep control/status and reset registers
//!                 │     └─► DSDT  \_SB.GED  (ACPI0013, GED_IRQ, _EVT: power button,
//!                 │                             VM generation ID)
//!                 │               \_SB.PWRB (PNP0C0C, the power button)
//!                 │               \_SB.VGEN (VMGENCTR, the VM generation ID's address)
//!                 │               \_SB.COMn (PNP0501, each serial port: I/O ports + IRQ)
//!                 │               \_SB.VRnn (LNRO0005, each virtio-mmio window + IRQ)
//!                 │               \_S5_     (the one sleep state: soft off)
//!                 └─► MADT  one local APIC per vCPU, the IOAPIC, IRQ0 override, LINT1 NMI
//! ```
//!
//! Why the DSDT lists the serial ports and virtio-mmio windows: on a hardware-reduced
//! platform Linux (x86) drops the legacy PIC and with it the built-in ISA interrupt
//! numbering, so a device it knows only by a fixed IRQ number (the 8250's IRQ 4, a
//! `virtio_mmio.device=...:5` command-line entry) gets no working interrupt. A device whose
//! interrupt comes from its `_CRS` gets its GSI mapped through the IOAPIC. So with ACPI the
//! DSDT is how the guest learns about every device with an interrupt, and the command line
//! carries no `virtio_mmio.device=` entries (see `builder::build_cmdline`).
//!
//! The registers the tables point to live in the MMIO window at
//! [`ACPI_MMIO_START`](super::layout::ACPI_MMIO_START), served by
//! [`devices::acpi`](crate::devices::acpi).

use acpi_tables::aml::{
    self, And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion,
    OpRegionSpace, Package, Path, ResourceTemplate, Scope, Store, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_GED_EVENT, ACPI_GED_EVENT_SIZE, ACPI_RESET_REGISTER, ACPI_SIZE, ACPI_SLEEP_CONTROL,
    ACPI_SLEEP_STATUS, ACPI_START, APIC_START, GED_IRQ, IOAPIC_START,
};
use crate::devices::acpi::{GED_EVENT_POWER_BUTTON, GED_EVENT_VMGENID, RESET_VALUE, S5_SLEEP_TYPE};
use crate::devices::MmioSlot;
use crate::memory::GuestMemory;

/// Errors while building the ACPI tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// More vCPUs than the MADT's 8-bit APIC IDs can name (the IOAPIC takes one ID).
    #[error("the ACPI MADT can describe at most 254 vCPUs, not {0}")]
    TooManyCpus(u32),
    /// More serial ports than the DSDT names (COM1..COM9).
    #[error("the DSDT can describe at most 9 serial ports, not {0}")]
    TooManySerialPorts(usize),
    /// A device window lies above 4 GiB (the DSDT describes 32-bit windows only).
    #[error("the virtio-mmio window at {0:#x} is above 4 GiB; the DSDT cannot describe it")]
    WindowAbove4G(u64),
    /// The tables do not fit the area reserved for them.
    #[error("the ACPI tables ({0} bytes) do not fit their reserved area of {ACPI_SIZE} bytes")]
    TooLarge(u64),
    /// Writing to guest memory failed.
    #[error("cannot write the ACPI tables into guest memory")]
    Write,
}

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"EMBER ";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"EMBERVM ";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// Hypervisor vendor identity in the FADT.
const HYPERVISOR_VENDOR: u64 = u64::from_le_bytes(*b"EMBERVMM");

/// FADT IA-PC boot architecture flags: no VGA, no MSI, no CMOS RTC (ember has none of them).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT: the platform also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_REVISION: u8 = 5;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_ENABLED: u32 = 1;
/// All processors, in a local APIC NMI entry.
const MADT_ALL_PROCESSORS: u8 = 0xff;
/// DSDT revision 2 and later have 64-bit AML integers.
const DSDT_REVISION: u8 = 6;

/// ACPI notification "device-specific event 0x80": for a power button, "pressed".
const NOTIFY_POWER_BUTTON_PRESSED: u8 = 0x80;
/// The same notification value on the VM generation ID device: "the ID changed".
const NOTIFY_VMGENID_CHANGED: u8 = 0x80;

/// A 16550 UART on the port-I/O bus, as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialPort {
    /// First of its 8 I/O ports.
    pub base: u16,
    /// Its interrupt line (GSI).
    pub irq: u32,
}

/// The devices the DSDT describes besides the platform's own (GED, power button).
#[derive(Debug, Clone, Copy, Default)]
pub struct AcpiDevices<'a> {
    /// Serial ports, COM1 first.
    pub serial: &'a [SerialPort],
    /// virtio-mmio windows.
    pub virtio: &'a [MmioSlot],
    /// Guest-physical address of the VM generation ID, when the VM has one
    /// ([`devices::vmgenid`](crate::devices::vmgenid)).
    pub vmgenid: Option<u64>,
}

/// Number of I/O ports of a 16550.
const UART_PORTS: u8 = 8;

/// Guest-physical addresses of the tables ember wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiTables {
    /// The RSDP (hand it to the kernel in the PVH start info).
    pub rsdp: u64,
    /// XSDT.
    pub xsdt: u64,
    /// FADT.
    pub fadt: u64,
    /// MADT.
    pub madt: u64,
    /// DSDT.
    pub dsdt: u64,
}

/// Builds the tables for `vcpus` vCPUs and `devices`, and writes them to guest memory at
/// [`ACPI_START`].
pub fn create_acpi_tables(
    mem: &GuestMemory,
    vcpus: u32,
    devices: &AcpiDevices<'_>,
) -> Result<AcpiTables, AcpiError> {
    let (tables, blobs) = build(vcpus, devices)?;
    for (addr, bytes) in blobs {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|_| AcpiError::Write)?;
    }
    Ok(tables)
}

/// Table bytes with their guest-physical addresses.
type Blobs = Vec<(u64, Vec<u8>)>;

/// Places tables one after another, 16-byte aligned, inside the ACPI area.
struct Placer {
    next: u64,
    blobs: Blobs,
}

impl Placer {
    /// Reserves `len` bytes and returns their address.
    fn reserve(&mut self, len: usize) -> Result<u64, AcpiError> {
        let addr = self.next;
        let end = addr + len as u64;
        if end > ACPI_START + ACPI_SIZE {
            return Err(AcpiError::TooLarge(end - ACPI_START));
        }
        self.next = end.next_multiple_of(16);
        Ok(addr)
    }

    fn put(&mut self, bytes: Vec<u8>) -> Result<u64, AcpiError> {
        let addr = self.reserve(bytes.len())?;
        self.blobs.push((addr, bytes));
        Ok(addr)
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Every table with its guest-physical address (pure: for [`create_acpi_tables`] and tests).
fn build(vcpus: u32, devices: &AcpiDevices<'_>) -> Result<(AcpiTables, Blobs), AcpiError> {
    let mut at = Placer {
        next: ACPI_START,
        blobs: Vec::new(),
    };
    // The RSDP first: at ACPI_START it is on the 16-byte boundary the kernel's scan wants.
    let rsdp = at.reserve(Rsdp::len())?;
    let dsdt = at.put(dsdt(devices)?)?;
    let fadt = at.put(fadt(dsdt))?;
    let madt = at.put(madt(vcpus)?)?;
    let mut x = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    x.add_entry(fadt);
    x.add_entry(madt);
    let xsdt = at.put(bytes_of(&x))?;
    at.blobs.push((rsdp, bytes_of(&Rsdp::new(OEM_ID, xsdt))));
    let tables = AcpiTables {
        rsdp,
        xsdt,
        fadt,
        madt,
        dsdt,
    };
    Ok((tables, at.blobs))
}

/// An 8-bit register in system memory, as the FADT describes it.
fn mmio_register8(addr: u64) -> GAS {
    GAS::new(
        AddressSpace::SystemMemory,
        8,
        0,
        AccessSize::ByteAccess,
        addr,
    )
}

/// The FADT of a hardware-reduced platform: no fixed hardware, no SCI, no PM timer; sleep
/// control/status and reset are plain MMIO registers; the power button is a device in the
/// DSDT (PWR_BUTTON/SLP_BUTTON set: no fixed-feature buttons).
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.sleep_control_reg = mmio_register8(ACPI_SLEEP_CONTROL);
    f.sleep_status_reg = mmio_register8(ACPI_SLEEP_STATUS);
    f.reset_reg = mmio_register8(ACPI_RESET_REGISTER);
    f.reset_value = RESET_VALUE;
    f.iapc_boot_arch = (IAPC_BOOT_ARCH_VGA_NOT_PRESENT
        | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED
        | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
        .into();
    f.hypervisor_vendor_identity = HYPERVISOR_VENDOR.into();
    bytes_of(&f.finalize())
}

/// The MADT: a local APIC per vCPU (APIC ID = vCPU index, as CPUID and KVM say), the IOAPIC
/// (ID after the last vCPU, GSIs from 0), an explicit identity override for IRQ 0 (KVM routes
/// the PIT to IOAPIC pin 0, not pin 2 as on PC chipsets), and LINT1 as NMI on every CPU — the
/// same machine the MP table describes.
fn madt(vcpus: u32) -> Result<Vec<u8>, AcpiError> {
    let ioapic_id = match u8::try_from(vcpus) {
        Ok(n) if (1..=254).contains(&n) => n,
        _ => return Err(AcpiError::TooManyCpus(vcpus)),
    };
    let mut m = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    m.write_u32(36, u32::try_from(APIC_START).unwrap_or(0));
    m.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..ioapic_id {
        let mut e = vec![MADT_LOCAL_APIC, 8, id, id];
        e.extend_from_slice(&MADT_LOCAL_APIC_ENABLED.to_le_bytes());
        m.append_slice(&e);
    }
    let mut e = vec![MADT_IO_APIC, 12, ioapic_id, 0];
    e.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    m.append_slice(&e);
    // ISA bus 0, IRQ 0 -> GSI 0, flags 0: polarity and trigger conform to the ISA bus (edge,
    // active high).
    let mut e = vec![MADT_INTERRUPT_OVERRIDE, 10, 0, 0];
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    m.append_slice(&e);
    let mut e = vec![MADT_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS];
    e.extend_from_slice(&0u16.to_le_bytes()); // flags: conforming
    e.push(1); // LINT1
    m.append_slice(&e);
    Ok(m.as_slice().to_vec())
}

/// The DSDT's AML. In ASL:
///
/// ```text
/// Scope (\_SB) {
///     Device (GED) {
///         Name (_HID, "ACPI0013")  Name (_UID, 0)
///         Name (_CRS, ResourceTemplate () {
///             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { GED_IRQ } })
///         OperationRegion (GDST, SystemMemory, ACPI_GED_EVENT, 4)
///         Field (GDST, DWordAcc, NoLock, WriteAsZeros) { GDAT, 32 }
///         Method (_EVT, 1, Serialized) {
///             Local0 = GDAT                     // reading clears the events
///             If (And (Local0, 1, Local1)) { Notify (\_SB.PWRB, 0x80) }
///             If (And (Local0, 2, Local1)) { Notify (\_SB.VGEN, 0x80) }   // with VGEN
///         }
///     }
///     Device (PWRB) { Name (_HID, EisaId ("PNP0C0C"))  Name (_UID, 0) }
///     Device (VGEN) {                           // with a VM generation ID
///         Name (_HID, "VMGENCTR")  Name (_CID, "VM_Gen_Counter")  Name (_DDN, "VM_Gen_Counter")
///         Name (ADDR, Package () { addr & 0xffffffff, addr >> 32 })
///     }
///     Device (COM1) {                           // one per serial port
///         Name (_HID, EisaId ("PNP0501"))  Name (_UID, 1)
///         Name (_CRS, ResourceTemplate () {
///             IO (Decode16, base, base, 0, 8)
///             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq } })
///     }
///     Device (VR00) {                           // one per virtio-mmio window
///         Name (_HID, "LNRO0005")  Name (_UID, 0)
///         Name (_CRS, ResourceTemplate () {
///             Memory32Fixed (ReadWrite, base, size)
///             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq } })
///     }
/// }
/// Name (\_S5, Package () { 5, 0 })
/// ```
fn dsdt_aml(devices: &AcpiDevices<'_>) -> Result<Vec<u8>, AcpiError> {
    let mut sb: Vec<u8> = Vec::new();

    // The generic event device.
    let ged_hid = Name::new("_HID".into(), &"ACPI0013");
    let uid0 = Name::new("_UID".into(), &aml::ZERO);
    let ged_irq = Interrupt::new(true, true, false, false, GED_IRQ);
    let ged_res = ResourceTemplate::new(vec![&ged_irq]);
    let ged_crs = Name::new("_CRS".into(), &ged_res);
    let region = OpRegion::new(
        "GDST".into(),
        OpRegionSpace::SystemMemory,
        &ACPI_GED_EVENT,
        &ACPI_GED_EVENT_SIZE,
    );
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = Path::new("GDAT");
    let read_events = Store::new(&Local(0), &gdat);
    let pressed = And::new(&Local(1), &Local(0), &GED_EVENT_POWER_BUTTON);
    let pwrb = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&pwrb, &NOTIFY_POWER_BUTTON_PRESSED);
    let on_press = If::new(&pressed, vec![&notify]);
    let new_generation = And::new(&Local(1), &Local(0), &GED_EVENT_VMGENID);
    let vgen = Path::new("\\_SB_.VGEN");
    let notify_vgen = Notify::new(&vgen, &NOTIFY_VMGENID_CHANGED);
    let on_new_generation = If::new(&new_generation, vec![&notify_vgen]);
    let mut evt_body: Vec<&dyn Aml> = vec![&read_events, &on_press];
    if devices.vmgenid.is_some() {
        evt_body.push(&on_new_generation);
    }
    let evt = Method::new("_EVT".into(), 1, true, evt_body);
    Device::new(
        "GED_".into(),
        vec![&ged_hid, &uid0, &ged_crs, &region, &field, &evt],
    )
    .to_aml_bytes(&mut sb);

    // The power button it notifies.
    let pwrb_hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    Device::new("PWRB".into(), vec![&pwrb_hid, &uid0]).to_aml_bytes(&mut sb);

    // The VM generation ID. Linux's driver matches _HID "VMGENCTR" (or the _CID, which ACPICA
    // upper-cases to "VM_GEN_COUNTER"); Windows looks for the _CID "VM_Gen_Counter". ADDR
    // is the ID's 64-bit address split in two 32-bit integers, low first.
    if let Some(addr) = devices.vmgenid {
        let hid = Name::new("_HID".into(), &"VMGENCTR");
        let cid = Name::new("_CID".into(), &"VM_Gen_Counter");
        let ddn = Name::new("_DDN".into(), &"VM_Gen_Counter");
        let (low, high) = (addr & 0xffff_ffff, addr >> 32);
        let addr_pkg = Package::new(vec![&low, &high]);
        let addr_name = Name::new("ADDR".into(), &addr_pkg);
        Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr_name]).to_aml_bytes(&mut sb);
    }

    // Serial ports.
    if devices.serial.len() > 9 {
        return Err(AcpiError::TooManySerialPorts(devices.serial.len()));
    }
    let uart_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    for (i, port) in devices.serial.iter().enumerate() {
        let uid = Name::new("_UID".into(), &(i + 1));
        let ports = IO::new(port.base, port.base, 0, UART_PORTS);
        let irq = Interrupt::new(true, true, false, false, port.irq);
        let res = ResourceTemplate::new(vec![&ports, &irq]);
        let crs = Name::new("_CRS".into(), &res);
        let name = format!("COM{}", i + 1);
        Device::new(name.as_str().into(), vec![&uart_hid, &uid, &crs]).to_aml_bytes(&mut sb);
    }

    // virtio-mmio windows.
    let mmio_hid = Name::new("_HID".into(), &"LNRO0005");
    for (i, slot) in devices.virtio.iter().enumerate() {
        let base = u32::try_from(slot.addr).map_err(|_| AcpiError::WindowAbove4G(slot.addr))?;
        let size = u32::try_from(slot.size).map_err(|_| AcpiError::WindowAbove4G(slot.addr))?;
        let uid = Name::new("_UID".into(), &i);
        let window = Memory32Fixed::new(true, base, size);
        let irq = Interrupt::new(true, true, false, false, slot.irq);
        let res = ResourceTemplate::new(vec![&window, &irq]);
        let crs = Name::new("_CRS".into(), &res);
        let name = format!("VR{:02X}", i & 0xff);
        Device::new(name.as_str().into(), vec![&mmio_hid, &uid, &crs]).to_aml_bytes(&mut sb);
    }

    let mut out = Scope::raw("\\_SB_".into(), sb);
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &aml::ZERO]);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut out);
    Ok(out)
}

fn dsdt(devices: &AcpiDevices<'_>) -> Result<Vec<u8>, AcpiError> {
    let mut d = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    d.append_slice(&dsdt_aml(devices)?);
    Ok(d.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn slots(n: u32) -> Vec<MmioSlot> {
        (0..n)
            .map(|i| MmioSlot {
                addr: 0xd000_0000 + u64::from(i) * 0x1000,
                size: 0x1000,
                irq: 5 + i,
            })
            .collect()
    }

    const COM1: SerialPort = SerialPort {
        base: 0x3f8,
        irq: 4,
    };
    const COM2: SerialPort = SerialPort {
        base: 0x2f8,
        irq: 3,
    };

    fn devices<'a>(serial: &'a [SerialPort], virtio: &'a [MmioSlot]) -> AcpiDevices<'a> {
        AcpiDevices {
            serial,
            virtio,
            vmgenid: None,
        }
    }

    /// Reads every table back from guest memory the way the kernel finds them.
    fn tables_in_memory(vcpus: u32, virtio: &[MmioSlot]) -> (AcpiTables, Blobs) {
        let mem = create_guest_memory(64 << 20).unwrap();
        let t = create_acpi_tables(&mem, vcpus, &devices(&[COM1], virtio)).unwrap();
        let read = |addr: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        };
        let mut out = Vec::new();
        for addr in [t.xsdt, t.fadt, t.madt, t.dsdt] {
            let len = u32_at(&read(addr, 8), 4) as usize;
            out.push((addr, read(addr, len)));
        }
        out.insert(0, (t.rsdp, read(t.rsdp, Rsdp::len())));
        (t, out)
    }

    #[test]
    fn every_table_has_its_signature_length_and_checksum() {
        let (t, tables) = tables_in_memory(2, &slots(3));
        assert_eq!(t.rsdp, ACPI_START);
        assert_eq!(t.rsdp % 16, 0);
        let names: Vec<&[u8]> = vec![b"RSD PTR ", b"XSDT", b"FACP", b"APIC", b"DSDT"];
        for ((addr, b), name) in tables.iter().zip(names) {
            assert_eq!(&b[..name.len()], name, "table at {addr:#x}");
            assert!(*addr + b.len() as u64 <= ACPI_START + ACPI_SIZE);
            if name == b"RSD PTR " {
                assert_eq!(b.len(), 36);
                assert_eq!(sum(&b[..20]), 0, "RSDP checksum (first 20 bytes)");
                assert_eq!(sum(b), 0, "RSDP extended checksum");
                assert_eq!(b[15], 2, "ACPI 2.0+ RSDP");
                assert_eq!(u32_at(b, 20), 36);
                assert_eq!(u64_at(b, 24), t.xsdt);
            } else {
                assert_eq!(sum(b), 0, "{} checksum", String::from_utf8_lossy(name));
                assert_eq!(&b[10..16], &OEM_ID);
            }
        }
        // Tables do not overlap.
        let mut spans: Vec<(u64, u64)> = tables
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:x?}");
        }
        // The XSDT lists the FADT and the MADT; the FADT points to the DSDT.
        let xsdt = &tables[1].1;
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!((u64_at(xsdt, 36), u64_at(xsdt, 44)), (t.fadt, t.madt));
        let fadt = &tables[2].1;
        assert_eq!(fadt.len(), 276, "FADT of ACPI 6.x");
        assert_eq!(u64_at(fadt, 140), t.dsdt, "X_DSDT");
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let b = fadt(0x1234_5678);
        let flags = u32_at(&b, 112);
        for f in [
            Flags::HwReducedAcpi,
            Flags::ResetRegSup,
            Flags::PwrButton,
            Flags::SlpButton,
        ] {
            assert_ne!(flags & f as u32, 0, "{f:?}");
        }
        assert_eq!(flags & Flags::Wbinvd as u32, 0);
        // No fixed hardware: SCI, PM1 and PM timer blocks are all zero.
        assert_eq!(u32_at(&b, 46) & 0xffff, 0, "SCI_INT");
        assert!(
            b[56..88].iter().all(|x| *x == 0),
            "PM1/PM2/PM timer/GPE blocks"
        );
        // Generic address structures: (space, width, offset, access size, address).
        let gas = |o: usize| (b[o], b[o + 1], b[o + 2], b[o + 3], u64_at(&b, o + 4));
        assert_eq!(gas(116), (0, 8, 0, 1, ACPI_RESET_REGISTER), "RESET_REG");
        assert_eq!(b[128], RESET_VALUE);
        assert_eq!(
            gas(244),
            (0, 8, 0, 1, ACPI_SLEEP_CONTROL),
            "SLEEP_CONTROL_REG"
        );
        assert_eq!(
            gas(256),
            (0, 8, 0, 1, ACPI_SLEEP_STATUS),
            "SLEEP_STATUS_REG"
        );
        let boot_arch = u16::from_le_bytes([b[109], b[110]]);
        assert_eq!(boot_arch, 0b10_1100, "no VGA, no MSI, no CMOS RTC");
        assert_eq!((b[8], b[131]), (6, 5), "FADT 6.5");
    }

    fn madt_entries(b: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut o = 44;
        while o < b.len() {
            let len = usize::from(b[o + 1]);
            assert!(
                len >= 2 && o + len <= b.len(),
                "entry at {o} runs past the table"
            );
            out.push(&b[o..o + len]);
            o += len;
        }
        out
    }

    #[test]
    fn madt_has_a_local_apic_per_vcpu_and_the_ioapic() {
        for n in [1u32, 2, 7, 254] {
            let b = madt(n).unwrap();
            assert_eq!(u32_at(&b, 4) as usize, b.len());
            assert_eq!(sum(&b), 0);
            assert_eq!(u64::from(u32_at(&b, 36)), APIC_START);
            assert_eq!(u32_at(&b, 40), MADT_PCAT_COMPAT);
            let entries = madt_entries(&b);
            let lapics: Vec<_> = entries.iter().filter(|e| e[0] == MADT_LOCAL_APIC).collect();
            assert_eq!(lapics.len(), n as usize);
            for (i, e) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!(
                    (usize::from(e[2]), usize::from(e[3])),
                    (i, i),
                    "UID, APIC ID"
                );
                assert_eq!(u32_at(e, 4), MADT_LOCAL_APIC_ENABLED);
            }
            let ioapics: Vec<_> = entries.iter().filter(|e| e[0] == MADT_IO_APIC).collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0];
            assert_eq!(
                (io.len(), u32::from(io[2])),
                (12, n),
                "IOAPIC ID follows the CPUs"
            );
            assert_eq!((u64::from(u32_at(io, 4)), u32_at(io, 8)), (IOAPIC_START, 0));
            let ovr: Vec<_> = entries
                .iter()
                .filter(|e| e[0] == MADT_INTERRUPT_OVERRIDE)
                .collect();
            assert_eq!(ovr.len(), 1);
            assert_eq!(
                ovr[0],
                &[2, 10, 0, 0, 0, 0, 0, 0, 0, 0],
                "ISA IRQ0 -> GSI 0"
            );
            let nmi: Vec<_> = entries
                .iter()
                .filter(|e| e[0] == MADT_LOCAL_APIC_NMI)
                .collect();
            assert_eq!(nmi.len(), 1);
            assert_eq!(nmi[0], &[4, 6, 0xff, 0, 0, 1], "LINT1 NMI on all CPUs");
            assert_eq!(entries.len(), n as usize + 3);
        }
        assert_eq!(madt(0), Err(AcpiError::TooManyCpus(0)));
        assert_eq!(madt(255), Err(AcpiError::TooManyCpus(255)));
    }

    #[test]
    fn dsdt_describes_the_ged_power_button_s5_serial_ports_and_virtio_windows() {
        let b = dsdt(&devices(&[COM1, COM2], &slots(2))).unwrap();
        assert_eq!(u32_at(&b, 4) as usize, b.len());
        assert_eq!(sum(&b), 0);
        assert_eq!(b[8], DSDT_REVISION);
        for name in [
            &b"ACPI0013"[..],
            b"GED_",
            b"_EVT",
            b"GDST",
            b"GDAT",
            b"PWRB",
            b"_S5_",
        ] {
            assert!(contains(&b, name), "{}", String::from_utf8_lossy(name));
        }
        // EisaId("PNP0C0C") as AML: DWordPrefix + 0x0c0cd041.
        assert!(contains(&b, &[0x0c, 0x41, 0xd0, 0x0c, 0x0c]));
        // GED: extended interrupt descriptor, consumer + edge, one GSI.
        let mut irq = vec![0x89, 6, 0, 0x03, 1];
        irq.extend_from_slice(&GED_IRQ.to_le_bytes());
        assert!(contains(&b, &irq));
        // The event register's address, as an AML QWord/DWord.
        assert!(contains(
            &b,
            &u32::try_from(ACPI_GED_EVENT).unwrap().to_le_bytes()
        ));
        // Notify (\_SB.PWRB, 0x80)
        assert!(contains(&b, b"\x86\\\x2e_SB_PWRB\x0a\x80"));
        // \_S5 = Package (2) { 5, 0 }
        assert!(contains(&b, b"_S5_\x12\x05\x02\x0a\x05\x00"));
        // Each window: LNRO0005 device with its memory range and interrupt.
        assert!(contains(&b, b"LNRO0005"));
        for (i, s) in slots(2).iter().enumerate() {
            assert!(contains(&b, format!("VR{i:02X}").as_bytes()));
            let mut mem = vec![0x86, 9, 0, 1];
            mem.extend_from_slice(&(s.addr as u32).to_le_bytes());
            mem.extend_from_slice(&(s.size as u32).to_le_bytes());
            let mut irq = vec![0x89, 6, 0, 0x03, 1];
            irq.extend_from_slice(&s.irq.to_le_bytes());
            assert!(contains(&b, &mem) && contains(&b, &irq), "window {i}");
        }
        // Each serial port: PNP0501 (EisaId 0x0105d041) with its 8 I/O ports and its IRQ.
        assert!(contains(&b, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        for (i, com) in [COM1, COM2].iter().enumerate() {
            assert!(contains(&b, format!("COM{}", i + 1).as_bytes()));
            let mut io = vec![0x47, 1];
            io.extend_from_slice(&com.base.to_le_bytes());
            io.extend_from_slice(&com.base.to_le_bytes());
            io.extend_from_slice(&[0, 8]);
            let mut irq = vec![0x89, 6, 0, 0x03, 1];
            irq.extend_from_slice(&com.irq.to_le_bytes());
            assert!(contains(&b, &io) && contains(&b, &irq), "COM{}", i + 1);
        }
        let none = dsdt(&AcpiDevices::default()).unwrap();
        assert!(!contains(&none, b"LNRO0005") && !contains(&none, b"COM1"));
        let high = [MmioSlot {
            addr: 1 << 32,
            size: 0x1000,
            irq: 5,
        }];
        let err = dsdt(&devices(&[], &high));
        assert_eq!(err, Err(AcpiError::WindowAbove4G(1 << 32)));
        let many = [COM1; 10];
        let err = dsdt(&devices(&many, &[]));
        assert_eq!(err, Err(AcpiError::TooManySerialPorts(10)));
    }

    /// Decodes the AML PkgLength at `b[o..]`: (value, bytes it takes).
    fn pkg_length(b: &[u8], o: usize) -> (usize, usize) {
        let lead = b[o];
        let follow = usize::from(lead >> 6);
        if follow == 0 {
            return (usize::from(lead & 0x3f), 1);
        }
        let mut v = usize::from(lead & 0x0f);
        for i in 0..follow {
            v |= usize::from(b[o + 1 + i]) << (4 + 8 * i);
        }
        (v, follow + 1)
    }

    /// The bytes of the method `name` (MethodOp, PkgLength, name, flags, body).
    fn method<'a>(b: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
        for o in 0..b.len() - 6 {
            if b[o] != 0x14 {
                continue;
            }
            let (len, n) = pkg_length(b, o + 1);
            if &b[o + 1 + n..o + 5 + n] == name {
                return &b[o..o + 1 + len];
            }
        }
        panic!("no method {}", String::from_utf8_lossy(name));
    }

    fn position(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn dsdt_has_the_vm_generation_id_device_and_the_ged_notifies_it() {
        use crate::arch::x86_64::layout::VMGENID_START;
        let with = AcpiDevices {
            vmgenid: Some(VMGENID_START),
            ..devices(&[COM1], &[])
        };
        let b = dsdt(&with).unwrap();
        assert_eq!(sum(&b), 0);
        // Device (VGEN) with _HID "VMGENCTR" (what Linux's vmgenid driver matches), the
        // _CID and _DDN of the specification.
        assert!(contains(&b, b"VGEN"));
        assert!(contains(&b, b"_HID\x0dVMGENCTR\x00"));
        assert!(contains(&b, b"_CID\x0dVM_Gen_Counter\x00"));
        assert!(contains(&b, b"_DDN\x0dVM_Gen_Counter\x00"));
        // ADDR = Package (2) { DWord VMGENID_START, Zero }: the reserved page.
        let mut addr = b"ADDR\x12\x08\x02\x0c".to_vec();
        addr.extend_from_slice(&u32::try_from(VMGENID_START).unwrap().to_le_bytes());
        addr.push(0x00);
        assert!(contains(&b, &addr), "ADDR points at VMGENID_START");
        // _EVT: If (And (Local0, 2, Local1)) { Notify (\_SB.VGEN, 0x80) }, inside the method,
        // after the power button's bit.
        let evt = method(&b, b"_EVT");
        let notify_vgen = b"\xa0\x13\x7b\x60\x0a\x02\x61\x86\\\x2e_SB_VGEN\x0a\x80";
        assert_eq!(GED_EVENT_VMGENID, 2);
        assert!(contains(evt, notify_vgen), "{evt:x?}");
        let button = position(evt, b"\x86\\\x2e_SB_PWRB\x0a\x80").unwrap();
        assert!(button < position(evt, notify_vgen).unwrap());
        // The device sits in \_SB (the Notify's path names it there).
        let sb = position(&b, b"_SB_").unwrap();
        assert!(sb < position(&b, b"VMGENCTR").unwrap());

        // A 64-bit address is split low, high.
        let high = AcpiDevices {
            vmgenid: Some(0x1_2345_6000),
            ..devices(&[], &[])
        };
        let b = dsdt(&high).unwrap();
        assert!(contains(&b, b"ADDR\x12\x08\x02\x0c\x00\x60\x45\x23\x01"));

        // Without it: no device, and _EVT does not name it.
        let b = dsdt(&devices(&[COM1], &[])).unwrap();
        assert!(!contains(&b, b"VGEN") && !contains(&b, b"VMGENCTR"));
        assert!(contains(method(&b, b"_EVT"), b"_SB_PWRB"));
    }

    #[test]
    fn tables_fit_with_many_vcpus_and_devices() {
        let serial = [COM1, COM2];
        let virtio = slots(18);
        let many = AcpiDevices {
            vmgenid: Some(crate::arch::x86_64::layout::VMGENID_START),
            ..devices(&serial, &virtio)
        };
        let (_, blobs) = build(254, &many).unwrap();
        let end = blobs.iter().map(|(a, b)| a + b.len() as u64).max().unwrap();
        assert!(end <= ACPI_START + ACPI_SIZE);
    }
}
