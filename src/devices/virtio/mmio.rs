// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the register file a
//! guest driver uses to discover a device, negotiate features, set up queues and drive the
//! device status, served as a [`BusDevice`] on the MMIO bus.
//!
//! Register offsets come from `virtio_bindings::virtio_mmio`. Registers below the
//! configuration space are 32 bits wide; other access widths read as zero and are ignored on
//! write. The configuration space (from `VIRTIO_MMIO_CONFIG`) is passed to the device as is.
//!
//! Status state machine (each write may only add bits, in this order; 0 resets; FAILED may
//! be added at any time):
//!
//! ```text
//! 0 -> ACKNOWLEDGE -> +DRIVER -> +FEATURES_OK -> +DRIVER_OK
//!                                 (needs VERSION_1   (ready queues checked, device
//!                                  acked, else not    activated; on failure NEEDS_RESET
//!                                  set)               is shown)
//! ```
//!
//! Feature words can be written only between DRIVER and FEATURES_OK, queue registers only
//! between FEATURES_OK and DRIVER_OK; writes at other times are ignored (and logged, at most
//! one line per kind per 5 s: see [`crate::guest_warn!`]).

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, EVENT_IDX, VENDOR_ID, VERSION_1,
};
use crate::devices::bus::{lock, BusDevice};
use crate::memory::GuestMemory;
use crate::snapshot::devices::{MmioTransportState, QueueSnapshot, VirtioState};
use crate::snapshot::format::SnapshotError;

/// The MagicValue register: "virt" in little-endian.
pub const MMIO_MAGIC_VALUE: u32 = u32::from_le_bytes(*b"virt");
/// The Version register: 2 for the virtio 1.x (non-legacy) register layout.
pub const MMIO_VERSION: u32 = 2;

/// Errors while creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A device asked for a queue size virtio does not allow.
    #[error("virtio device queue {index} has invalid maximum size {size} (must be a power of 2, 1..=32768)")]
    InvalidQueueSize {
        /// Queue index.
        index: usize,
        /// The size asked for.
        size: u16,
    },
    /// The number of notification eventfds does not match the number of queues.
    #[error("virtio device has {queues} queues but {evts} notification eventfds were given")]
    QueueEventCount {
        /// Queues of the device.
        queues: usize,
        /// Eventfds given.
        evts: usize,
    },
}

/// The bits of the status register, in the order a driver sets them.
const STATUS_STEPS: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// A virtio device behind the virtio-mmio register file.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<Arc<EventFd>>,
    queues: Vec<Queue>,
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`. `queue_evts[i]` is signalled when the driver notifies queue
    /// `i` (normally a KVM ioeventfd on the QueueNotify register; the transport also signals
    /// it itself when a notify write reaches it).
    pub fn new(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<Arc<EventFd>>,
    ) -> Result<Self, MmioError> {
        let (device_type, device_features, sizes) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.avail_features() | VERSION_1,
                d.queue_max_sizes().to_vec(),
            )
        };
        if sizes.len() != queue_evts.len() {
            return Err(MmioError::QueueEventCount {
                queues: sizes.len(),
                evts: queue_evts.len(),
            });
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| MmioError::InvalidQueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
        })
    }

    /// The device model.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The interrupt shared with the device.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the driver acked.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The register file, the interrupt and every queue (the device's copies while it is
    /// active), with the device's own state, for a snapshot. Call it with the vCPUs stopped
    /// and the event loop between iterations. Fails when the device refuses to be saved as
    /// it is ([`VirtioDevice::check_snapshot`]).
    pub fn save_state(&self) -> Result<VirtioState, SnapshotError> {
        let device = lock(&self.device);
        device.check_snapshot()?;
        let mut queues: Vec<QueueSnapshot> = self.queues.iter().map(|q| q.state().into()).collect();
        if self.activated {
            for (i, q) in device.saved_queues() {
                if let Some(slot) = queues.get_mut(i) {
                    *slot = q.into();
                }
            }
        }
        Ok(VirtioState {
            transport: MmioTransportState {
                device_type: self.device_type,
                device_features: self.device_features,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                acked_features: self.acked_features,
                queue_sel: self.queue_sel,
                status: self.status,
                activated: self.activated,
                interrupt: self.interrupt.save_state(),
                queues,
            },
            device: device.save_state(),
        })
    }

    /// Restores `state` into this freshly built transport (its device built from the same
    /// configuration) once guest memory holds the snapshot's RAM: checks that the device is
    /// the one saved, restores the device's state, the registers and the queues, and
    /// activates the device again with the saved queues if it was active. The saved state is
    /// checked before the device is touched, and the registers change only once everything
    /// succeeded; on an error the VM being restored is to be thrown away, never run.
    ///
    /// A device that had given up on its queues (NEEDS_RESET) stays inactive, ignoring its
    /// queues until the driver resets it.
    pub fn restore_state(&mut self, state: &VirtioState) -> Result<(), SnapshotError> {
        let t = &state.transport;
        let err = |why: String| SnapshotError::Device {
            device: format!("virtio device type {}", self.device_type),
            why,
        };
        if self.status != 0 || self.activated {
            return Err(err(
                "the transport is in use: restore into a fresh VM".into()
            ));
        }
        if t.device_type != self.device_type {
            return Err(err(format!(
                "the snapshot has device type {} in its place: restore with the same devices \
                 in the same order",
                t.device_type
            )));
        }
        if t.device_features != self.device_features {
            return Err(err(format!(
                "it offers features {:#x}, {:#x} in the snapshot (another disk mode or ember \
                 version?)",
                self.device_features, t.device_features
            )));
        }
        if t.acked_features & !t.device_features != 0 {
            return Err(err(format!(
                "acked features {:#x} were never offered",
                t.acked_features
            )));
        }
        if t.queues.len() != self.queues.len() {
            return Err(err(format!(
                "it has {} queues, {} in the snapshot",
                self.queues.len(),
                t.queues.len()
            )));
        }
        let known = STATUS_STEPS.iter().sum::<u32>() | VIRTIO_CONFIG_S_FAILED;
        if t.status & !known != 0 || (t.activated && t.status & VIRTIO_CONFIG_S_DRIVER_OK == 0) {
            return Err(err(format!("status {:#x} is not a valid state", t.status)));
        }
        let mut queues = Vec::with_capacity(t.queues.len());
        for (i, (saved, mine)) in t.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != mine.max_size() {
                return Err(err(format!(
                    "queue {i} has maximum size {}, {} in the snapshot",
                    mine.max_size(),
                    saved.max_size
                )));
            }
            let q = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| err(format!("queue {i}: {e}")))?;
            queues.push(q);
        }
        let activate = t.activated && !t.interrupt.needs_reset;
        if activate {
            for (i, q) in queues.iter().enumerate() {
                if q.ready() && !q.is_valid(&self.mem) {
                    return Err(err(format!("queue {i} does not lie in guest memory")));
                }
            }
        }
        lock(&self.device).restore_state(&state.device)?;
        if activate {
            let ctx_queues = queues
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    Queue::try_from(q.state()).map_err(|e| err(format!("queue {i}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ctx = ActivateContext {
                mem: self.mem.clone(),
                queues: ctx_queues,
                queue_evts: self.queue_evts.clone(),
                interrupt: self.interrupt.clone(),
                acked_features: t.acked_features,
            };
            lock(&self.device)
                .activate(ctx)
                .map_err(|e| err(format!("activation: {}", crate::error_chain_line(&e))))?;
        }
        self.activated = activate;
        self.device_features_sel = t.device_features_sel;
        self.driver_features_sel = t.driver_features_sel;
        self.acked_features = t.acked_features;
        self.queue_sel = t.queue_sel;
        self.status = t.status;
        self.queues = queues;
        self.interrupt.restore_state(&t.interrupt);
        Ok(())
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn read_register(&self, reg: u32) -> u32 {
        let queue = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i));
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => low(self.device_features),
                1 => high(self.device_features),
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.map_or(0, |q| low(q.desc_table())),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.map_or(0, |q| high(q.desc_table())),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.map_or(0, |q| low(q.avail_ring())),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.map_or(0, |q| high(q.avail_ring())),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.map_or(0, |q| low(q.used_ring())),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.map_or(0, |q| high(q.used_ring())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            // No shared memory regions: every region reads as length -1 (virtio 1.2, 4.2.2.1).
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {reg:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, reg: u32, v: u32) {
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(reg, v),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => crate::guest_warn!(
                "virtio-mmio: write of {v:#x} to unknown or read-only register {reg:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if !self.has_status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
        ) {
            crate::guest_warn!(
                "virtio-mmio: driver features written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let (shift, mask) = match self.driver_features_sel {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffffu64 << 32),
            sel => {
                log::debug!("virtio-mmio: driver features word {sel} ignored");
                return;
            }
        };
        let asked = u64::from(v) << shift;
        let unknown = asked & !self.device_features;
        if unknown != 0 {
            crate::guest_warn!(
                "virtio-mmio: driver acked features {unknown:#x} that were not offered; dropped"
            );
        }
        self.acked_features = (self.acked_features & !mask) | (asked & self.device_features);
    }

    fn write_queue_register(&mut self, reg: u32, v: u32) {
        if !self.has_status(
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
        ) {
            log::debug!(
                "virtio-mmio: queue register {reg:#x} written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            crate::guest_warn!(
                "virtio-mmio: queue register {reg:#x} written for missing queue {sel}; ignored"
            );
            return;
        };
        match reg {
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(v) {
                Ok(size) => q.set_size(size),
                Err(_) => {
                    crate::guest_warn!("virtio-mmio: queue {sel} size {v} too large; ignored");
                }
            },
            VIRTIO_MMIO_QUEUE_READY => q.set_ready(v == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    /// A QueueNotify write that KVM did not turn into an ioeventfd signal (no ioeventfd
    /// registered, or a write KVM did not match): signal the queue's eventfd ourselves.
    fn notify(&mut self, v: u32) {
        if !self.activated {
            log::debug!("virtio-mmio: queue {v} notified before DRIVER_OK; ignored");
            return;
        }
        match usize::try_from(v).ok().and_then(|i| self.queue_evts.get(i)) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::guest_error!("virtio-mmio: cannot signal queue {v}: {e}");
                }
            }
            None => crate::guest_warn!("virtio-mmio: notify for missing queue {v}; ignored"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & VIRTIO_CONFIG_S_FAILED != 0 {
            crate::guest_warn!(
                "virtio-mmio: the guest driver gave up on device type {} (status FAILED)",
                self.device_type
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if v & self.status != self.status {
            crate::guest_warn!(
                "virtio-mmio: status {v:#x} clears bits of {:#x} without a reset; ignored",
                self.status
            );
            return;
        }
        let added = v & !self.status;
        let known: u32 = STATUS_STEPS.iter().sum();
        if added & !known != 0 {
            crate::guest_warn!(
                "virtio-mmio: status bits {:#x} cannot be set by the driver; ignored",
                added & !known
            );
        }
        for (i, &bit) in STATUS_STEPS.iter().enumerate() {
            if added & bit == 0 {
                continue;
            }
            let before: u32 = STATUS_STEPS[..i].iter().sum();
            if self.status != before {
                crate::guest_warn!(
                    "virtio-mmio: status bit {bit:#x} set out of order (status {:#x}); ignored",
                    self.status
                );
                return;
            }
            match bit {
                VIRTIO_CONFIG_S_FEATURES_OK if self.acked_features & VERSION_1 == 0 => {
                    crate::guest_warn!(
                        "virtio-mmio: the driver did not accept VIRTIO_F_VERSION_1 (legacy \
                         drivers are not supported); FEATURES_OK refused"
                    );
                    return;
                }
                VIRTIO_CONFIG_S_DRIVER_OK => {
                    self.status |= bit;
                    if let Err(e) = self.activate() {
                        crate::guest_error!(
                            "virtio-mmio: cannot activate device type {}: {}",
                            self.device_type,
                            crate::error_chain_line(&e)
                        );
                        self.interrupt.set_needs_reset();
                    }
                    continue;
                }
                _ => {}
            }
            self.status |= bit;
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.acked_features & EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
            let mut copy =
                Queue::try_from(q.state()).map_err(|_| ActivateError::InvalidQueue(i))?;
            copy.set_event_idx(event_idx);
            queues.push(copy);
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts: self.queue_evts.clone(),
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        lock(&self.device).activate(ctx)?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
    }
}

fn low(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn high(v: u64) -> u32 {
    (v >> 32) as u32
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            lock(&self.device).read_config(offset - config, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            crate::guest_warn!(
                "virtio-mmio: {}-byte read at {offset:#x} (registers are 32-bit); read as 0",
                data.len()
            );
            return;
        }
        // offset < VIRTIO_MMIO_CONFIG, so it fits.
        let v = self.read_register(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            lock(&self.device).write_config(offset - config, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(
                "virtio-mmio: {}-byte write at {offset:#x} (registers are 32-bit); ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            crate::guest_warn!("virtio-mmio: unaligned write at {offset:#x}; ignored");
            return;
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct FakeDevice {
        config: Vec<u8>,
        activations: usize,
        resets: usize,
        acked: u64,
        ready: Vec<bool>,
        fail_activate: bool,
    }

    const FAKE_FEATURES: u64 = (1 << 5) | (1 << 40);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            virtio_bindings::virtio_ids::VIRTIO_ID_RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            FAKE_FEATURES
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            if o + data.len() <= self.config.len() {
                self.config[o..o + data.len()].copy_from_slice(data);
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Device("refused".into()));
            }
            self.activations += 1;
            self.acked = ctx.acked_features;
            self.ready = ctx.queues.iter().map(|q| q.ready()).collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn saved_queues(&self) -> Vec<(usize, QueueState)> {
            Vec::new()
        }
        fn save_state(&self) -> crate::snapshot::devices::VirtioDeviceState {
            crate::snapshot::devices::VirtioDeviceState::Rng(Default::default())
        }
        fn restore_state(
            &mut self,
            _: &crate::snapshot::devices::VirtioDeviceState,
        ) -> Result<(), SnapshotError> {
            Ok(())
        }
    }

    struct Rig {
        t: MmioTransport,
        dev: Arc<Mutex<FakeDevice>>,
        evts: Vec<Arc<EventFd>>,
        mem: GuestMemory,
    }

    fn rig() -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(FakeDevice {
            config: vec![1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        }));
        let evts: Vec<_> = (0..2)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq, evts.clone()).unwrap();
        Rig { t, dev, evts, mem }
    }

    fn r(t: &mut MmioTransport, reg: u32) -> u32 {
        let mut d = [0u8; 4];
        t.read(u64::from(reg), &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    /// Drives the transport the way Linux does up to FEATURES_OK, acking `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, VIRTIO_MMIO_STATUS, ACK);
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, low(features));
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, high(features));
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
    }

    /// Sets queue `i` up with rings laid out by a MockSplitQueue at `base`.
    fn setup_queue(t: &mut MmioTransport, mem: &GuestMemory, i: u32, size: u16, base: u64) {
        let mq = MockSplitQueue::create(mem, GuestAddress(base), size);
        w(t, VIRTIO_MMIO_QUEUE_SEL, i);
        w(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        let d = mq.desc_table_addr().0;
        let a = mq.avail_addr().0;
        let u = mq.used_addr().0;
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, low(d));
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, high(d));
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, low(a));
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, high(a));
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, low(u));
        w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, high(u));
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let mut rig = rig();
        let t = &mut rig.t;
        assert_eq!(r(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(
            r(t, VIRTIO_MMIO_DEVICE_ID),
            virtio_bindings::virtio_ids::VIRTIO_ID_RNG
        );
        assert_eq!(r(t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(r(t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(r(t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        // Queue sizes per selected queue; a missing queue reads 0.
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w(t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        w(t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn odd_width_register_accesses_are_harmless() {
        let mut rig = rig();
        let t = &mut rig.t;
        let mut b = [0xffu8; 2];
        t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(1, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
        t.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &1u32.to_le_bytes());
        assert_eq!(r(t, VIRTIO_MMIO_STATUS), 0);
        // Out-of-range offsets below the config space read 0.
        assert_eq!(r(t, 0xf0), 0);
    }

    #[test]
    fn features_are_offered_with_version_1_and_masked_when_acked() {
        let mut rig = rig();
        let t = &mut rig.t;
        let offered = FAKE_FEATURES | VERSION_1;
        w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(t, VIRTIO_MMIO_DEVICE_FEATURES), low(offered));
        w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(t, VIRTIO_MMIO_DEVICE_FEATURES), high(offered));
        w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(t, VIRTIO_MMIO_DEVICE_FEATURES), 0);

        // Features written before DRIVER are ignored.
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        assert_eq!(t.acked_features(), 0);
        // A bit that was not offered (bit 0) is dropped.
        negotiate(t, offered | 1);
        assert_eq!(t.acked_features(), offered);
        assert_eq!(r(t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
        // After FEATURES_OK the features are frozen.
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features(), offered);
    }

    #[test]
    fn features_ok_needs_version_1() {
        let mut rig = rig();
        let t = &mut rig.t;
        negotiate(t, FAKE_FEATURES);
        assert_eq!(
            r(t, VIRTIO_MMIO_STATUS),
            ACK | DRV,
            "FEATURES_OK must not stick"
        );
        // The driver may retry with VERSION_1.
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, high(VERSION_1));
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        assert_eq!(r(t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
    }

    #[test]
    fn status_transitions_table() {
        // (writes, expected status afterwards)
        let cases: &[(&[u32], u32)] = &[
            (&[ACK], ACK),
            (&[DRV], 0),                                     // DRIVER before ACKNOWLEDGE
            (&[ACK, ACK | FOK], ACK),                        // FEATURES_OK before DRIVER
            (&[ACK, ACK | DRV, ACK | DRV | DOK], ACK | DRV), // DRIVER_OK before FEATURES_OK
            (&[ACK, ACK | DRV, ACK], ACK | DRV),             // clearing a bit without reset
            (&[ACK | DRV], ACK | DRV),                       // several steps in one write
            (&[ACK, ACK | DRV, 0], 0),                       // reset
            (
                &[ACK, ACK | VIRTIO_CONFIG_S_FAILED],
                ACK | VIRTIO_CONFIG_S_FAILED,
            ),
            (&[ACK, ACK | VIRTIO_CONFIG_S_NEEDS_RESET], ACK), // driver cannot set NEEDS_RESET
        ];
        for (writes, want) in cases {
            let mut rig = rig();
            for &v in *writes {
                w(&mut rig.t, VIRTIO_MMIO_STATUS, v);
            }
            assert_eq!(
                r(&mut rig.t, VIRTIO_MMIO_STATUS),
                *want,
                "writes {writes:x?}"
            );
        }
    }

    #[test]
    fn queue_setup_and_activation() {
        let mut rig = rig();
        let mem = rig.mem.clone();
        let t = &mut rig.t;
        // Queue registers are ignored before FEATURES_OK.
        w(t, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_NUM), 16);
        negotiate(t, VERSION_1 | EVENT_IDX);
        setup_queue(t, &mem, 0, 16, 0x1000);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0x1000);
        // Queue 1 stays disabled.
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(r(t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
        assert!(t.is_activated());
        {
            let d = rig.dev.lock().unwrap();
            assert_eq!(d.activations, 1);
            assert_eq!(d.ready, vec![true, false]);
            // EVENT_IDX was not offered by the fake device, so it was dropped.
            assert_eq!(d.acked, VERSION_1);
        }
        // Queue registers are frozen after DRIVER_OK.
        w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_READY), 1);
        // Notify writes that reach the transport signal the queue's eventfd.
        w(t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(rig.evts[1].read().unwrap(), 1);
        w(t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        assert!(rig.evts[0].read().is_err());
    }

    #[test]
    fn queue_outside_guest_memory_fails_activation_with_needs_reset() {
        let mut rig = rig();
        let mem = rig.mem.clone();
        let t = &mut rig.t;
        negotiate(t, VERSION_1);
        setup_queue(t, &mem, 0, 16, 0x1000);
        // Move the used ring beyond guest memory.
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x2000_0000);
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(!t.is_activated());
        assert_eq!(
            r(t, VIRTIO_MMIO_STATUS),
            ACK | DRV | FOK | DOK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(rig.dev.lock().unwrap().activations, 0);
        // A config-change interrupt tells the driver.
        assert_eq!(r(t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        // Reset clears it all; the device was never active so it is not reset.
        w(t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(rig.dev.lock().unwrap().resets, 0);
    }

    #[test]
    fn device_activation_failure_sets_needs_reset() {
        let mut rig = rig();
        rig.dev.lock().unwrap().fail_activate = true;
        let mem = rig.mem.clone();
        negotiate(&mut rig.t, VERSION_1);
        setup_queue(&mut rig.t, &mem, 0, 16, 0x1000);
        w(&mut rig.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_ne!(
            r(&mut rig.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn reset_returns_everything_to_initial_state() {
        let mut rig = rig();
        let mem = rig.mem.clone();
        let t = &mut rig.t;
        negotiate(t, VERSION_1);
        setup_queue(t, &mem, 0, 8, 0x1000);
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        t.interrupt().signal_used_queue();
        assert_eq!(r(t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        w(t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        w(t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rig.dev.lock().unwrap().resets, 1);
        assert!(!t.is_activated());
        assert_eq!(t.acked_features(), 0);
        w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_NUM), 16);
        // And the device can be brought up again.
        negotiate(t, VERSION_1);
        setup_queue(t, &mem, 0, 16, 0x1000);
        w(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rig.dev.lock().unwrap().activations, 2);
    }

    #[test]
    fn config_space_and_generation() {
        let mut rig = rig();
        let t = &mut rig.t;
        let base = u64::from(VIRTIO_MMIO_CONFIG);
        let mut b = [0u8; 2];
        t.read(base + 2, &mut b);
        assert_eq!(b, [3, 4]);
        t.write(base, &[9]);
        let mut one = [0u8; 1];
        t.read(base, &mut one);
        assert_eq!(one, [9]);
        // Past the device's config space: zeros.
        let mut far = [0xffu8; 4];
        t.read(base + 0x100, &mut far);
        assert_eq!(far, [0; 4]);
        let g = r(t, VIRTIO_MMIO_CONFIG_GENERATION);
        t.interrupt().signal_config_change();
        assert_eq!(r(t, VIRTIO_MMIO_CONFIG_GENERATION), g + 1);
    }

    #[test]
    fn mismatched_queue_events_are_refused() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dev = Arc::new(Mutex::new(FakeDevice::default()));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let e = MmioTransport::new(mem, dev, irq, vec![]).unwrap_err();
        assert!(matches!(
            e,
            MmioError::QueueEventCount { queues: 2, evts: 0 }
        ));
    }
}
