// SPDX-License-Identifier: Apache-2.0
//! Every guest-physical address, I/O port and interrupt line that ember uses on x86_64.
//!
//! ```text
//!  0x0000_0000  real-mode IVT / BDA (RAM)
//!  0x0000_0500  GDT                    0x0000_0520  IDT (empty)
//!  0x0000_6000  PVH hvm_start_info     0x0000_6040  PVH memory map
//!  0x0000_7000  Linux zero page (boot_params)
//!  0x0000_8ff0  boot stack top
//!  0x0000_9000  PML4 / PDPT / 4 page directories (identity map of the first 4 GiB)
//!  0x0002_0000  kernel command line
//!  0x0009_fc00  start of the reserved EBDA/BIOS area (not RAM)
//!  0x000d_f000  VM generation ID (16 bytes; the page is reserved, see devices::vmgenid)
//!  0x000e_0000  ACPI tables (RSDP is searched for in 0xe0000..0xfffff)
//!  0x000f_0000  MP table (floating pointer + configuration table)
//!  0x0010_0000  kernel (high memory starts here)
//!  ...          initrd, placed as high as the kernel allows
//!  0xc000_0000  start of the 32-bit MMIO gap: boot timer (0xc000_0000), exit device
//!               (0xc000_1000), ACPI registers (0xc000_2000), virtio-mmio windows (0xd000_0000)
//!  0xfec0_0000  IOAPIC               0xfee0_0000  local APIC
//!  0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! ```

/// Global descriptor table used at boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table used at boot (all zero: no interrupts before the kernel's own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Most PVH memory-map entries ember writes (they must fit before the zero page).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 64;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line ember will ever write (the kernel's own limit is usually lower).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the EBDA/BIOS hole: RAM below this address is usable, above it reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// The VM generation ID: a page in the reserved BIOS area (e820 "reserved", so the guest never
/// uses it as RAM) whose first 16 bytes hold the ID the DSDT's `\_SB.VGEN.ADDR` points at
/// (see [`devices::vmgenid`](crate::devices::vmgenid)). Just below the ACPI tables.
pub const VMGENID_START: u64 = ACPI_START - VMGENID_SIZE;
/// Size of the page reserved for the VM generation ID.
pub const VMGENID_SIZE: u64 = 0x1000;
/// ACPI tables live here (within the BIOS area the kernel scans for the RSDP).
pub const ACPI_START: u64 = 0xe0000;
/// Size reserved for ACPI tables.
pub const ACPI_SIZE: u64 = 0x10000;
/// MP table (found by the kernel's scan of 0xf0000..0xfffff).
pub const MPTABLE_START: u64 = 0xf0000;
/// Size reserved for the MP table.
pub const MPTABLE_SIZE: u64 = 0x10000;
/// Where the kernel is loaded and where high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;

// The generation ID page lies in the reserved EBDA..HIMEM hole, page-aligned, before the
// ACPI tables.
const _: () = assert!(
    VMGENID_START >= EBDA_START
        && VMGENID_START % 0x1000 == 0
        && VMGENID_START + VMGENID_SIZE <= ACPI_START
);

/// Start of the 32-bit MMIO gap (no RAM between this and 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;

/// Boot-timer device (Firecracker's convention): the guest writes 123 here when init starts.
pub const BOOT_TIMER_START: u64 = 0xc000_0000;
/// Size of the boot-timer window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// Exit device: the guest writes its command's exit status (32-bit) here.
pub const EXIT_DEVICE_START: u64 = 0xc000_1000;
/// Size of the exit-device window.
pub const EXIT_DEVICE_SIZE: u64 = 0x1000;
/// ACPI platform registers (sleep control/status, reset, GED) live in this window.
pub const ACPI_MMIO_START: u64 = 0xc000_2000;
/// Size of the ACPI register window.
pub const ACPI_MMIO_SIZE: u64 = 0x1000;
/// ACPI sleep control register (8 bits, FADT `SLEEP_CONTROL_REG`): the guest writes
/// `SLP_TYP << 2 | SLP_EN` here; S5 powers the VM off.
pub const ACPI_SLEEP_CONTROL: u64 = ACPI_MMIO_START;
/// ACPI sleep status register (8 bits, FADT `SLEEP_STATUS_REG`): `WAK_STS`, write 1 to clear.
pub const ACPI_SLEEP_STATUS: u64 = ACPI_MMIO_START + 1;
/// ACPI reset register (8 bits, FADT `RESET_REG`): writing the FADT's reset value resets.
pub const ACPI_RESET_REGISTER: u64 = ACPI_MMIO_START + 2;
/// Event register of the ACPI generic event device (32 bits, read clears): which events
/// raised [`GED_IRQ`]. Read by the DSDT's `\_SB.GED._EVT`.
pub const ACPI_GED_EVENT: u64 = ACPI_MMIO_START + 4;
/// Size of the GED event register.
pub const ACPI_GED_EVENT_SIZE: u64 = 4;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// End (exclusive) of the area for virtio-mmio windows.
pub const VIRTIO_MMIO_END: u64 = 0xfe00_0000;

/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;

/// COM1 I/O port base.
pub const COM1_PORT: u16 = 0x3f8;
/// COM2 I/O port base.
pub const COM2_PORT: u16 = 0x2f8;
/// Number of I/O ports of a 16550A.
pub const SERIAL_PORT_SIZE: u16 = 8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// COM2 interrupt line.
pub const COM2_IRQ: u32 = 3;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// First interrupt line handed to virtio-mmio devices.
pub const VIRTIO_IRQ_FIRST: u32 = 5;
/// Last interrupt line (inclusive) of the IOAPIC's 24 pins.
pub const IRQ_LAST: u32 = 23;
/// Interrupt line of the ACPI generic event device (ACPI0013: the power button), the
/// IOAPIC's last pin, kept out of the device allocator.
pub const GED_IRQ: u32 = IRQ_LAST;
/// Last interrupt line (inclusive) the device allocator hands out.
pub const DEVICE_IRQ_LAST: u32 = GED_IRQ - 1;

/// Number of IOAPIC pins (and of the legacy interrupt lines described in the MP table).
pub const IOAPIC_PINS: u32 = 24;
