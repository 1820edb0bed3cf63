// SPDX-License-Identifier: Apache-2.0
//! The saved state of every ember device, as plain serializable structs, and the whole
//! device set of a VM ([`DeviceStates`]).
//!
//! The device models save into and restore from these types themselves (they own the private
//! fields): `save_state()` on each device, and on restore either `restore_state()` on a
//! freshly built device (built by the builder from the same [`crate::config::VmConfig`]) or a
//! `from_state()` constructor where the model can only be built whole (the serial port).
//!
//! | device | saved | restore-time check / not carried over |
//! | --- | --- | --- |
//! | serial (COM1, COM2) | every 16550A register and the receive FIFO ([`SerialState`]) | output already handed to the console writer is the host's, not the guest's |
//! | i8042 | nothing: ember's i8042 has no state ([`I8042State`]) | |
//! | ACPI platform | sleep status (WAK_STS), pending GED events ([`AcpiState`]) | |
//! | virtio-mmio transport | status, feature selectors, offered and acked features, queue select, interrupt status, config generation, NEEDS_RESET, each queue ([`MmioTransportState`]) | device type, offered features and queue count must match |
//! | virtio-blk | disk path, size, read-only, GET_ID serial ([`BlockState`]) | the disk given at restore must be the same file, same size and mode |
//! | virtio-net | TAP name, MAC, the TAP's host-side MAC ([`NetState`]); its rx and tx queues | same MAC (the guest's); the TAP may be another (`ember restore --tap`: a host-side setting; when its host end has another MAC the guest gets a gratuitous ARP for the TAP's IPv4 address); a frame read from the TAP but not yet given to the guest is dropped, as is what waits in the old TAP's queue (the network may lose frames); tx frames are never half sent |
//! | virtio-vsock | guest CID ([`VsockState`]); its three queues (the event queue too) | a snapshot is **refused while any vsock connection is open** (host sockets cannot be saved); the restoring run's CID and Unix socket path may differ (host-side settings): after the restore the device sends the guest a TRANSPORT_RESET event, on which it re-reads its CID and resets connected sockets (listening ones survive) |
//! | virtio-rng | tokens left in the rate limiter's bucket, bytes served ([`RngState`]) | |
//!
//! Queues: while a device is active it owns its queues (the transport handed them over at
//! DRIVER_OK), so a transport saves the device's copies
//! ([`VirtioDevice::saved_queues`](crate::devices::virtio::VirtioDevice::saved_queues)), with
//! the device's next available and next used indices. A snapshot is taken between event-loop
//! iterations with the vCPUs stopped: every chain a device took off a queue has been
//! returned to the used ring by then (ember's devices complete each chain in the same
//! iteration), so no request is in flight.
//!
//! A device that had given up on its queues (NEEDS_RESET shown to the driver) is restored
//! inactive: it ignores its queues until the driver resets it, as before.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use crate::devices::virtio::net::MacAddr;

/// A 16550A's registers and receive FIFO (vm-superio's `SerialState`, which has no serde
/// support of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO, oldest first (at most 64: a longer FIFO is refused on
    /// restore).
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The i8042: ember's model only turns a reset command into a VM exit and reads as an idle
/// controller, so there is nothing to save. Kept as a type so that the file format has a
/// place for it if the model grows state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// The ACPI platform registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiState {
    /// The sleep status register (WAK_STS).
    pub sleep_status: u8,
    /// GED events the guest has not read yet (the power button).
    pub ged_events: u32,
}

/// One virtqueue (virtio-queue's `QueueState`, which has no serde support of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The device's maximum size.
    pub max_size: u16,
    /// The device's next available ring index.
    pub next_avail: u16,
    /// The device's next used ring index.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// What a virtio device's interrupt carries: the InterruptStatus bits, the configuration
/// generation and the NEEDS_RESET flag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptState {
    /// InterruptStatus bits not yet acknowledged.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device needs a reset.
    pub needs_reset: bool,
}

/// The virtio-mmio register file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The virtio device ID (checked on restore).
    pub device_type: u32,
    /// Features offered, VERSION_1 included (checked on restore).
    pub device_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver acked.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The status the driver wrote (without NEEDS_RESET, which is in `interrupt`).
    pub status: u32,
    /// DRIVER_OK was accepted and the device activated.
    pub activated: bool,
    /// The interrupt's state.
    pub interrupt: InterruptState,
    /// Every queue, in order (the device's copy while it is active).
    pub queues: Vec<QueueSnapshot>,
}

/// virtio-blk: no state beyond the configuration; what is saved is checked on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The disk image.
    pub path: PathBuf,
    /// Its capacity in 512-byte sectors.
    pub sectors: u64,
    /// Read-only.
    pub read_only: bool,
    /// The GET_ID serial (20 bytes, NUL-padded).
    pub id: Vec<u8>,
}

/// virtio-net: what identifies the NIC. Frames ember held are not carried (a network may
/// lose frames); a restore may put the NIC on another TAP, never give it another MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The TAP interface.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// The MAC address of the TAP's host end (the one the guest's neighbour entries for the
    /// host name), when it could be read: a restore onto a TAP with another one tells the
    /// guest the new one.
    pub host_mac: Option<MacAddr>,
}

/// virtio-vsock: the guest's CID when the snapshot was taken. There are no connections to
/// carry: a snapshot with one open is refused. A restore may give the guest another CID
/// (the guest re-reads it on the TRANSPORT_RESET event the restored device sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context ID.
    pub cid: u64,
}

/// virtio-rng: the rate limiter and the counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Tokens (bytes) left in the bucket; the bucket refills from the restore on.
    pub tokens: u64,
    /// Bytes handed to the guest so far.
    pub bytes_served: u64,
}

/// virtio-fs: only its tag. Saved only while the guest has not used the share (no request on
/// its queues: not mounted); a restore hands the queues to a new virtiofsd, which may serve
/// another directory. A mounted share is refused
/// ([`NO_SHARE`](crate::snapshot::file::NO_SHARE)): the daemon's open files cannot be carried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The mount tag.
    pub tag: String,
}

/// A virtio device's own state, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-rng.
    Rng(RngState),
    /// virtio-fs.
    Fs(FsState),
}

impl VirtioDeviceState {
    /// The kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block(_) => "virtio-blk",
            Self::Net(_) => "virtio-net",
            Self::Vsock(_) => "virtio-vsock",
            Self::Rng(_) => "virtio-rng",
            Self::Fs(_) => "virtio-fs",
        }
    }
}

/// One virtio device behind its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// The transport's registers and queues.
    pub transport: MmioTransportState,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

/// Every device of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1, the console.
    pub com1: SerialState,
    /// COM2, when the VM has one.
    pub com2: Option<SerialState>,
    /// The i8042.
    pub i8042: I8042State,
    /// The ACPI platform, when the VM has ACPI.
    pub acpi: Option<AcpiState>,
    /// The virtio devices in the order of their MMIO slots.
    pub virtio: Vec<VirtioState>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRV,
        VIRTIO_CONFIG_S_DRIVER_OK as DOK, VIRTIO_CONFIG_S_FEATURES_OK as FOK,
        VIRTIO_CONFIG_S_NEEDS_RESET,
    };
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::arch::x86_64::layout::ACPI_SLEEP_STATUS;
    use crate::arch::x86_64::layout::{ACPI_GED_EVENT, ACPI_MMIO_START, ACPI_SLEEP_CONTROL};
    use crate::config::DiskConfig;
    use crate::devices::acpi::{AcpiPlatform, SLP_EN, SLP_TYP_SHIFT};
    use crate::devices::bus::BusDevice;
    use crate::devices::legacy::i8042::I8042;
    use crate::devices::legacy::serial::{ConsoleOutput, SerialDevice};
    use crate::devices::virtio::block::{Block, DiskFile};
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::rng::{Rng, RngConfig};
    use crate::devices::virtio::test_ring::TestRing;
    use crate::devices::virtio::{Interrupt, VirtioDevice, EVENT_IDX, VERSION_1};
    use crate::exit::VmExit;
    use crate::memory::GuestMemory;
    use crate::snapshot::format::{decode_state, encode_state, SnapshotError};

    /// Through the state file format and back, as a restore would see it.
    fn through_file<T: Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
        let bytes = encode_state(v).unwrap();
        decode_state(Path::new("state"), &bytes).unwrap().1
    }

    fn r32(t: &mut impl BusDevice, reg: u32) -> u32 {
        let mut d = [0u8; 4];
        t.read(u64::from(reg), &mut d);
        u32::from_le_bytes(d)
    }

    fn w32(t: &mut impl BusDevice, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    fn console() -> ConsoleOutput {
        ConsoleOutput::new(Box::new(std::io::sink()), "test", None, None).unwrap()
    }

    fn serial() -> SerialDevice {
        SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), console()).unwrap()
    }

    /// Reads every register a driver reads, in the same order on both ports, the receive
    /// FIFO last (reading it pops it).
    fn serial_view(d: &mut SerialDevice) -> Vec<u8> {
        let mut rd = |o: u64| {
            let mut b = [0u8];
            d.read(o, &mut b);
            b[0]
        };
        let mut v: Vec<u8> = (1..8).map(&mut rd).collect();
        // The divisor latch, behind DLAB.
        let lcr = v[2];
        d.write(3, &[lcr | 0x80]);
        let mut rd = |o: u64| {
            let mut b = [0u8];
            d.read(o, &mut b);
            b[0]
        };
        v.push(rd(0));
        v.push(rd(1));
        d.write(3, &[lcr]);
        for _ in 0..70 {
            let mut b = [0u8];
            d.read(0, &mut b);
            v.push(b[0]);
        }
        v
    }

    #[test]
    fn serial_registers_and_fifo_survive_a_snapshot() {
        let mut a = serial();
        // 9600 baud, 7 data bits + parity, scratch, receive interrupts on, modem lines.
        a.write(3, &[0x80]);
        a.write(0, &[12]);
        a.write(1, &[0]);
        a.write(3, &[0x1a]);
        a.write(1, &[0x01]);
        a.write(4, &[0x0b]);
        a.write(7, &[0x5a]);
        assert_eq!(a.enqueue_input(b"hello"), 5);
        let state = through_file(&a.save_state());
        assert_eq!(state.in_buffer, b"hello");
        assert_eq!(state.scratch, 0x5a);
        let mut b =
            SerialDevice::from_state(EventFd::new(EFD_NONBLOCK).unwrap(), console(), &state)
                .unwrap();
        assert_eq!(b.save_state(), state);
        let (va, vb) = (serial_view(&mut a), serial_view(&mut b));
        assert_eq!(va, vb);
        assert_eq!(&va[9..14], b"hello");
        // A FIFO longer than a 16550A's is refused, not truncated or panicked on.
        let mut bad = state.clone();
        bad.in_buffer = vec![b'x'; 65];
        let e = SerialDevice::from_state(EventFd::new(EFD_NONBLOCK).unwrap(), console(), &bad)
            .unwrap_err();
        assert!(matches!(e, SnapshotError::Device { .. }), "{e}");
    }

    #[test]
    fn acpi_and_i8042_survive_a_snapshot() {
        let exit = Arc::new(VmExit::new().unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let (mut a, button) = AcpiPlatform::new(exit.clone(), irq);
        // An S3 request wakes at once (WAK_STS); the power button is pressed, unread.
        a.write(
            ACPI_SLEEP_CONTROL - ACPI_MMIO_START,
            &[(3 << SLP_TYP_SHIFT) | SLP_EN],
        );
        button.press().unwrap();
        let state = through_file(&a.save_state());
        assert_eq!(state.ged_events, 1);
        let (mut b, _) = AcpiPlatform::new(exit.clone(), EventFd::new(EFD_NONBLOCK).unwrap());
        b.restore_state(&state);
        for d in [&mut a, &mut b] {
            let mut s = [0u8];
            d.read(ACPI_SLEEP_STATUS - ACPI_MMIO_START, &mut s);
            assert_eq!(s[0], 0x80);
            assert_eq!(r32(d, (ACPI_GED_EVENT - ACPI_MMIO_START) as u32), 1);
        }
        assert!(!exit.is_set());

        let i = I8042::new(exit.clone());
        let s = through_file(&i.save_state());
        I8042::new(exit).restore_state(&s);
    }

    struct RngRig {
        t: MmioTransport,
        dev: Arc<Mutex<Rng>>,
        irq: Arc<Interrupt>,
    }

    fn rng_rig(mem: &GuestMemory) -> RngRig {
        let dev = Arc::new(Mutex::new(
            Rng::new(&RngConfig {
                rate: 1000,
                burst: 0x6000,
            })
            .unwrap(),
        ));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let evts = vec![Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())];
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq.clone(), evts).unwrap();
        RngRig { t, dev, irq }
    }

    /// What Linux's virtio_mmio does: negotiate, set queue 0 up over `ring`, DRIVER_OK.
    fn bring_up(t: &mut MmioTransport, features: u64) {
        w32(t, VIRTIO_MMIO_STATUS, ACK);
        w32(t, VIRTIO_MMIO_STATUS, ACK | DRV);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w32(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        w32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w32(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
        w32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1000);
        w32(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w32(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x2000);
        w32(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
        w32(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    }

    /// Every register a driver reads, for each feature word and each queue index (0, 1).
    fn transport_view(t: &mut MmioTransport) -> Vec<u32> {
        let queue_sel = r32(t, VIRTIO_MMIO_QUEUE_SEL);
        let mut v = Vec::new();
        for reg in [
            VIRTIO_MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID,
            VIRTIO_MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES,
            VIRTIO_MMIO_STATUS,
            VIRTIO_MMIO_INTERRUPT_STATUS,
            VIRTIO_MMIO_CONFIG_GENERATION,
        ] {
            v.push(r32(t, reg));
        }
        for sel in 0..2 {
            w32(t, VIRTIO_MMIO_QUEUE_SEL, sel);
            for reg in [
                VIRTIO_MMIO_QUEUE_NUM_MAX,
                VIRTIO_MMIO_QUEUE_NUM,
                VIRTIO_MMIO_QUEUE_READY,
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
            ] {
                v.push(r32(t, reg));
            }
        }
        w32(t, VIRTIO_MMIO_QUEUE_SEL, queue_sel);
        v
    }

    #[test]
    fn rng_transport_at_driver_ok_survives_a_snapshot_and_goes_on_where_it_was() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mut ring = TestRing::new(&mem, 0, 16);
        let mut a = rng_rig(&mem);
        bring_up(&mut a.t, VERSION_1 | EVENT_IDX);
        assert!(a.t.is_activated());
        // The device serves one request, then its bucket is dry.
        ring.add_chain(&[(0x10_0000, 0x6000, true)]);
        ring.add_chain(&[(0x20_0000, 0x100, true)]);
        a.dev.lock().unwrap().process_queue();
        assert_eq!(ring.used_idx(), 1);
        a.irq.signal_config_change();
        w32(&mut a.t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);

        let saved = through_file(&a.t.save_state().unwrap());
        let tq = &saved.transport;
        assert!(tq.activated);
        assert_eq!(tq.acked_features, VERSION_1 | EVENT_IDX);
        assert_eq!(
            tq.queues[0].next_avail, 1,
            "the device's copy of the queue is saved"
        );
        assert_eq!(tq.queues[0].next_used, 1);
        assert!(tq.queues[0].event_idx_enabled);
        assert_eq!(tq.interrupt.config_generation, 1);
        assert_eq!(
            saved.device,
            VirtioDeviceState::Rng(RngState {
                tokens: 0,
                bytes_served: 0x6000
            })
        );

        // The same guest memory stands for the restored memory file.
        let mut b = rng_rig(&mem);
        b.t.restore_state(&saved).unwrap();
        assert!(b.t.is_activated());
        assert_eq!(b.t.save_state().unwrap(), saved);
        assert_eq!(transport_view(&mut a.t), transport_view(&mut b.t));
        // A pending interrupt is raised again on the restored line.
        assert_eq!(b.irq.irq_evt().read().unwrap(), 1);
        assert_eq!(b.dev.lock().unwrap().bytes_served, 0x6000);

        // The restored device goes on from the second request, not the first.
        std::thread::sleep(Duration::from_millis(300));
        b.dev.lock().unwrap().process_queue();
        assert_eq!(ring.used_idx(), 2);
        assert_eq!(ring.used_entry(1), (1, 0x100));
    }

    #[test]
    fn transport_before_driver_ok_survives_a_snapshot() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut a = rng_rig(&mem);
        w32(&mut a.t, VIRTIO_MMIO_STATUS, ACK);
        w32(&mut a.t, VIRTIO_MMIO_STATUS, ACK | DRV);
        w32(&mut a.t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(&mut a.t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        let saved = through_file(&a.t.save_state().unwrap());
        let mut b = rng_rig(&mem);
        b.t.restore_state(&saved).unwrap();
        assert!(!b.t.is_activated());
        assert_eq!(transport_view(&mut a.t), transport_view(&mut b.t));
        // The driver can go on negotiating on the restored transport.
        w32(&mut b.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        assert_eq!(r32(&mut b.t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
    }

    #[test]
    fn broken_device_is_restored_inactive_with_needs_reset() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mut ring = TestRing::new(&mem, 0, 16);
        let mut a = rng_rig(&mem);
        bring_up(&mut a.t, VERSION_1);
        ring.set_avail_idx(40);
        a.dev.lock().unwrap().process_queue();
        assert!(a.irq.needs_reset());
        let saved = through_file(&a.t.save_state().unwrap());
        let mut b = rng_rig(&mem);
        b.t.restore_state(&saved).unwrap();
        assert!(!b.t.is_activated());
        assert_ne!(
            r32(&mut b.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        // The driver resets and starts over.
        w32(&mut b.t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r32(&mut b.t, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn transport_restore_refuses_a_state_that_does_not_fit() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let _ring = TestRing::new(&mem, 0, 16);
        let mut a = rng_rig(&mem);
        bring_up(&mut a.t, VERSION_1);
        let good = a.t.save_state().unwrap();
        type Edit = fn(&mut VirtioState);
        let cases: Vec<(&str, Edit)> = vec![
            ("device type", |s| s.transport.device_type = 2),
            ("features", |s| s.transport.device_features |= 1 << 3),
            ("never offered", |s| s.transport.acked_features |= 1 << 3),
            ("queues", |s| {
                s.transport.queues.push(QueueSnapshot::default());
            }),
            ("max size", |s| s.transport.queues[0].max_size = 32),
            ("queue size", |s| s.transport.queues[0].size = 3),
            ("alignment", |s| s.transport.queues[0].desc_table = 0x8),
            ("memory", |s| {
                s.transport.queues[0].used_ring = 0x1_0000_0000;
            }),
            ("status", |s| s.transport.status = 0x40),
            ("not driver ok", |s| s.transport.status = ACK),
            ("device kind", |s| {
                s.device = VirtioDeviceState::Vsock(VsockState { cid: 3 });
            }),
        ];
        for (what, edit) in cases {
            let mut s = good.clone();
            edit(&mut s);
            let mut b = rng_rig(&mem);
            let e = b.t.restore_state(&s).unwrap_err();
            assert!(matches!(e, SnapshotError::Device { .. }), "{what}: {e}");
            assert!(!b.t.is_activated(), "{what}");
            assert_eq!(r32(&mut b.t, VIRTIO_MMIO_STATUS), 0, "{what}: untouched");
        }
        // A transport already in use is not restored into.
        let e = a.t.restore_state(&good).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
    }

    #[test]
    fn block_restore_checks_the_disk_is_the_same() {
        let dir = std::env::temp_dir().join(format!("ember-snapdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (p1, p2) = (dir.join("a.img"), dir.join("b.img"));
        std::fs::write(&p1, vec![0u8; 8192]).unwrap();
        std::fs::write(&p2, vec![0u8; 4096]).unwrap();
        let saved = {
            let blk =
                Block::new(DiskFile::open(&DiskConfig::new(&p1)).unwrap(), "vda", None).unwrap();
            through_file(&blk.save_state())
        };
        assert_eq!(
            saved,
            VirtioDeviceState::Block(BlockState {
                path: p1.clone(),
                sectors: 16,
                read_only: false,
                id: b"vda\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec(),
            })
        );
        let mut same =
            Block::new(DiskFile::open(&DiskConfig::new(&p1)).unwrap(), "vda", None).unwrap();
        same.restore_state(&saved).unwrap();
        drop(same);
        let mut other =
            Block::new(DiskFile::open(&DiskConfig::new(&p2)).unwrap(), "vda", None).unwrap();
        assert!(other.restore_state(&saved).is_err());
        // Same path, other size.
        let mut grown = saved.clone();
        if let VirtioDeviceState::Block(b) = &mut grown {
            b.sectors = 8;
        }
        let ro = DiskConfig {
            read_only: true,
            ..DiskConfig::new(&p1)
        };
        let mut dev = Block::new(DiskFile::open(&ro).unwrap(), "vda", None).unwrap();
        let e = dev.restore_state(&grown).unwrap_err().to_string();
        assert!(e.contains("changed size"), "{e}");
        let e = dev.restore_state(&saved).unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
        let e = dev
            .restore_state(&VirtioDeviceState::Rng(RngState::default()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("virtio-rng device in its place"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fuzzed_device_states_never_panic_on_decode_or_restore() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let _ring = TestRing::new(&mem, 0, 16);
        let mut a = rng_rig(&mem);
        bring_up(&mut a.t, VERSION_1 | EVENT_IDX);
        let mut com = serial();
        com.enqueue_input(b"abc");
        let good = postcard::to_stdvec(&(a.t.save_state().unwrap(), com.save_state())).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut decoded = 0;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = next() as u8;
            }
            let Ok(((t, ser), _)) = postcard::take_from_bytes::<(VirtioState, SerialState)>(&b)
            else {
                continue;
            };
            decoded += 1;
            let mut fresh = rng_rig(&mem);
            let _ = fresh.t.restore_state(&t);
            let _ = transport_view(&mut fresh.t);
            if let Ok(mut d) =
                SerialDevice::from_state(EventFd::new(EFD_NONBLOCK).unwrap(), console(), &ser)
            {
                let _ = serial_view(&mut d);
            }
        }
        assert!(decoded > 100, "only {decoded} mutated states decoded");
    }

    #[test]
    fn device_states_of_a_whole_vm_go_through_the_state_file() {
        let s = DeviceStates {
            com1: serial().save_state(),
            com2: None,
            i8042: I8042State {},
            acpi: Some(AcpiState {
                sleep_status: 0x80,
                ged_events: 1,
            }),
            virtio: vec![VirtioState {
                transport: MmioTransportState {
                    device_type: 4,
                    device_features: VERSION_1,
                    device_features_sel: 0,
                    driver_features_sel: 1,
                    acked_features: VERSION_1,
                    queue_sel: 0,
                    status: 15,
                    activated: true,
                    interrupt: InterruptState::default(),
                    queues: vec![QueueSnapshot::default()],
                },
                device: VirtioDeviceState::Net(NetState {
                    tap: "tap0".into(),
                    mac: MacAddr([2, 0, 0, 0, 0, 1]),
                    host_mac: Some(MacAddr([0x5e, 0, 0, 0, 0, 2])),
                }),
            }],
        };
        assert_eq!(through_file(&s), s);
    }
}
