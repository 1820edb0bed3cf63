// SPDX-License-Identifier: Apache-2.0
//! Virtio devices (virtio 1.2, "modern" only) and the virtio-mmio transport that puts them on
//! the MMIO bus.
//!
//! Three parts, each in its own file:
//!
//! - [`VirtioDevice`] (here): what a device model implements — its type, queue sizes, feature
//!   bits, configuration space, and `activate`/`reset`.
//! - [`mmio::MmioTransport`]: the register file the guest driver talks to (version 2
//!   registers, feature negotiation, queue set-up, the status state machine). It owns the
//!   queues until the driver sets DRIVER_OK, then hands them to the device.
//! - [`interrupt::Interrupt`]: the device's interrupt line (a KVM irqfd) with the
//!   interrupt-status bits, the configuration generation and the NEEDS_RESET flag, shared by
//!   the transport and the device.
//!
//! Devices: [`block`] (virtio-blk on a raw image file), [`net`] (virtio-net on a TAP),
//! [`vsock`] (virtio-vsock to host Unix sockets), [`rng`] (virtio-rng from getrandom),
//! [`fs`] (virtio-fs: a host directory, served by virtiofsd over vhost-user).
//!
//! # Life of a device
//!
//! ```text
//!  builder::attach_virtio_device(dev)          (host, before the vCPUs start)
//!    slot = DeviceManager::allocate_mmio_slot()   one 4 KiB MMIO window + one IRQ line
//!    irqfd(slot.irq) -> Interrupt
//!    per queue i: EventFd registered as KVM ioeventfd on QueueNotify, datamatch = i
//!    MmioTransport on the MMIO bus; dev on the event loop; virtio_mmio.device= on the cmdline
//!
//!  guest driver                      transport                         device
//!  status = ACKNOWLEDGE | DRIVER
//!  read DeviceFeatures, write DriverFeatures
//!  status |= FEATURES_OK  -------->  refused unless VERSION_1 acked
//!  QueueSel/QueueNum/QueueDesc.../QueueReady = 1 (each queue)
//!  status |= DRIVER_OK  ---------->  checks the ready queues  ----->  activate(ActivateContext)
//!                                                                      (signals its activation
//!                                                                       event: the event loop
//!                                                                       starts watching queues)
//!  write QueueNotify = i  -- KVM ioeventfd, no VM exit -->  event loop -> device processes
//!                                                           queue i, Interrupt::signal_used_queue
//!  status = 0  ------------------->  reset registers + queues ---->  reset() (drops the queues
//!                                                                    and guest memory handle)
//! ```
//!
//! Device work (walking descriptor chains, file or socket I/O) runs on the main thread's
//! event loop, never on a vCPU thread: `activate` only stores what it is given and wakes the
//! event loop. A device therefore is also an `event_manager::MutEventSubscriber`; the
//! [`ActivationEvent`] helper does the usual "register the queue eventfds once activated"
//! part.
//!
//! # Rules for device code
//!
//! Guest memory and descriptors are hostile: every address, length and chain is checked; a
//! malformed request fails (the guest gets an error status, or a used entry of length 0),
//! and a state the device cannot recover from sets NEEDS_RESET
//! ([`interrupt::Interrupt::set_needs_reset`]). Nothing the guest does may panic the VMM or
//! touch host memory outside the guest's.
//!
//! Every device takes chains off its queues through one path, [`pop_chain`] /
//! [`pop_or_enable`], and returns them through [`add_used`]: these report a corrupt queue
//! (an available index more than the queue size ahead of the device, a head index outside
//! the queue...) as an error instead of "no chain" (which is what
//! `QueueT::pop_descriptor_chain` does, after logging inside virtio-queue: a device loop
//! that asks again would spin and flood the log forever). On any queue error a device calls
//! [`Broken::mark`]: the device sets NEEDS_RESET and ignores its queues until the driver
//! resets it. `clippy.toml` forbids `pop_descriptor_chain` in ember.

pub mod block;
pub mod fs;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod rate_limiter;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_ring;
pub mod vsock;

use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemory;
use crate::snapshot::devices::VirtioDeviceState;
use crate::snapshot::format::SnapshotError;
pub use interrupt::Interrupt;

/// Vendor ID reported in the VendorID register ("EMBR", little-endian).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"EMBR");

/// Feature bit `VIRTIO_F_VERSION_1` as a mask: every ember device is a virtio 1.x device, the
/// transport offers it always and refuses FEATURES_OK without it.
pub const VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Feature bit `VIRTIO_RING_F_EVENT_IDX` as a mask (used/avail event index suppression). The
/// transport turns it on in the queues it hands over when the driver acked it.
pub const EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Everything a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory, for descriptor chains and buffers.
    pub mem: GuestMemory,
    /// The queues as the driver set them up, one per entry of
    /// [`VirtioDevice::queue_max_sizes`], in order. A queue the driver did not enable has
    /// `ready() == false`; the ready ones have been checked to lie in guest memory.
    pub queues: Vec<Queue>,
    /// Queue notification eventfds, same order as `queues` (KVM ioeventfds on the
    /// QueueNotify register; also signalled by the transport when a notify write reaches it).
    /// The same eventfds come back on every activation of a device.
    pub queue_evts: Vec<Arc<EventFd>>,
    /// The device's interrupt line and status bits.
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted (a subset of [`VirtioDevice::avail_features`] plus
    /// [`VERSION_1`]).
    pub acked_features: u64,
}

/// Why a device could not be activated. The transport then sets NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs was not enabled by the driver.
    #[error("queue {0} is required but the driver did not enable it")]
    QueueNotReady(usize),
    /// A queue does not lie in guest memory, or its size is not valid.
    #[error("queue {0} is not valid (size, alignment or rings outside guest memory)")]
    InvalidQueue(usize),
    /// The number of queues does not match what the device asked for.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// What the device asked for.
        expected: usize,
        /// What it was given.
        got: usize,
    },
    /// Waking the event loop failed.
    #[error("cannot signal the device's activation event")]
    EventFd(#[source] std::io::Error),
    /// The device refused for its own reason.
    #[error("{0}")]
    Device(String),
}

/// A virtio device model, bus-agnostic: the transport ([`mmio::MmioTransport`]) drives it.
///
/// Lifecycle: created by the builder → `activate` (driver set DRIVER_OK) → running on the
/// event loop → `reset` (driver wrote status 0) → may be activated again. `read_config` and
/// `write_config` can come at any time.
///
/// Implementors are normally also `event_manager::MutEventSubscriber` (their queue work runs
/// on the event loop); see [`ActivationEvent`] and `block::Block` for the pattern.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`virtio_bindings::virtio_ids::VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue (a power of two, at most 32768); its length is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device feature bits offered to the driver. The transport adds [`VERSION_1`].
    fn avail_features(&self) -> u64;

    /// Reads `data.len()` bytes of the device configuration space at `offset`. Reads beyond
    /// the configuration space must leave zeros (see [`read_config_bytes`]).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// The driver writes the configuration space. Most devices ignore it (the default).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio device type {}: ignored config write of {} bytes at {offset:#x}",
            self.device_type(),
            data.len()
        );
    }

    /// Starts the device: called by the transport on a vCPU thread when the driver sets
    /// DRIVER_OK. Store what `ctx` holds and wake the event loop; do no queue work here.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Stops the device after the driver wrote 0 to the status register: drop the queues,
    /// guest memory and interrupt handles, and go back to the state before `activate`.
    fn reset(&mut self);

    /// For a snapshot: the queues the device holds while it is active, each with its index
    /// (the device's copies carry the next available and next used indices); empty when it
    /// is not active. A queue the device does not keep (vsock's event queue) is left out:
    /// the transport's copy stands for it.
    fn saved_queues(&self) -> Vec<(usize, QueueState)>;

    /// For a snapshot, asked before [`save_state`](Self::save_state): an error when the
    /// device holds host-side state that a snapshot cannot carry (virtio-vsock with an open
    /// connection), so that no snapshot silently loses it. The default: nothing to refuse.
    fn check_snapshot(&self) -> Result<(), SnapshotError> {
        Ok(())
    }

    /// For a snapshot: the device's own state.
    fn save_state(&self) -> VirtioDeviceState;

    /// Restores `state` into a freshly built, inactive device (or checks that the device
    /// built from the restore's configuration is the one saved), before the transport
    /// activates it again with the saved queues.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError>;
}

/// The error a device gives when handed another kind of device's state.
pub(crate) fn wrong_state_kind(expected: &str, state: &VirtioDeviceState) -> SnapshotError {
    SnapshotError::Device {
        device: expected.to_string(),
        why: format!(
            "the snapshot has a {} device in its place: restore with the same devices in the \
             same order",
            state.kind()
        ),
    }
}

/// Copies `config[offset..offset + data.len()]` into `data`; bytes past the end of `config`
/// read as zero (a driver probing beyond the structure gets zeros, never a panic).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Event-loop token of an [`ActivationEvent`]; queue `i` uses token `i`.
pub const ACTIVATION_TOKEN: u32 = u32::MAX;

/// The usual activation plumbing of a device on the event loop: an eventfd that `activate`
/// signals, and on it, the queue eventfds registered once (with their queue index as token).
///
/// In the device's `MutEventSubscriber`:
/// `init` → [`ActivationEvent::init`]; in `process`, when `events.data() ==`
/// [`ACTIVATION_TOKEN`] → [`ActivationEvent::on_activated`] with the context's queue eventfds;
/// any other token is a queue index. Queue eventfds stay registered across resets (they are
/// the same fds every time); a device that is not active drains and ignores them.
#[derive(Debug)]
pub struct ActivationEvent {
    evt: EventFd,
    queues_registered: bool,
}

impl ActivationEvent {
    /// A fresh activation event.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            queues_registered: false,
        })
    }

    /// Wakes the event loop (from `activate`).
    pub fn signal(&self) -> Result<(), ActivateError> {
        self.evt.write(1).map_err(ActivateError::EventFd)
    }

    /// Registers the activation eventfd (from the subscriber's `init`).
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.evt, ACTIVATION_TOKEN, EventSet::IN)) {
            log::error!("cannot watch a virtio activation event: {e:?}");
        }
    }

    /// Consumes the activation event and registers `queue_evts` (token = queue index) the
    /// first time.
    pub fn on_activated(&mut self, ops: &mut EventOps, queue_evts: &[Arc<EventFd>]) {
        let _ = self.evt.read();
        if self.queues_registered {
            return;
        }
        for (i, evt) in queue_evts.iter().enumerate() {
            let token = u32::try_from(i).unwrap_or(ACTIVATION_TOKEN - 1);
            if let Err(e) = ops.add(Events::with_data(evt.as_ref(), token, EventSet::IN)) {
                log::error!("cannot watch virtio queue {i}: {e:?}");
            }
        }
        self.queues_registered = true;
    }
}

/// The next available descriptor chain of `queue`, `Ok(None)` when the driver offers no
/// more, or an error when the available ring is corrupt (its index is more than the queue
/// size ahead of the device's: the driver offers entries it never filled, or offers them
/// twice). On an error the caller must stop using the queue: see [`Broken::mark`].
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// [`pop_chain`], and when the queue is empty, notifications are enabled again and the queue
/// looked at once more (so that a chain the driver added meanwhile is not missed).
/// `Ok(None)`: the queue is empty and the driver will notify the device when it adds to it.
///
/// Bounded: a driver whose available index says "more" while nothing can be taken off the
/// ring gets an error (from [`pop_chain`]) or `Ok(None)`, never an endless retry.
pub fn pop_or_enable<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, virtio_queue::Error> {
    for _ in 0..2 {
        if let Some(chain) = pop_chain(queue, mem)? {
            return Ok(Some(chain));
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(None)
}

/// Puts the chain with head `head` on the used ring with `len` bytes written. A head outside
/// the queue (the driver put a bogus index in its available ring) is an error, checked here
/// so that virtio-queue does not log it on every call.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    if head >= queue.size() {
        return Err(virtio_queue::Error::InvalidDescriptorIndex);
    }
    #[allow(clippy::disallowed_methods)] // the one checked caller
    queue.add_used(mem, head, len)
}

/// Whether a device gave up on its queues: set by [`Broken::mark`] after a queue error the
/// device cannot recover from (a corrupt available ring, a used ring it cannot write...).
/// A broken device does no queue work at all (every notification is ignored) until the
/// driver resets it; the driver sees DEVICE_NEEDS_RESET in the status register. Keep it in
/// the state a device builds on activation, so that a reset clears it.
#[derive(Debug, Default)]
pub struct Broken(bool);

impl Broken {
    /// Whether the device gave up on its queues.
    pub fn is_broken(&self) -> bool {
        self.0
    }

    /// The device gives up: logs why (rate-limited: the guest can make this happen again
    /// after each reset), marks itself broken and sets NEEDS_RESET through `interrupt`.
    pub fn mark(&mut self, device: &str, interrupt: &Interrupt, why: &dyn std::fmt::Display) {
        if !self.0 {
            crate::guest_error!(
                "{device}: virtio queue error ({why}); the device stops until the driver \
                 resets it"
            );
        }
        self.0 = true;
        interrupt.set_needs_reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 4, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
        let mut one = [0u8; 1];
        read_config_bytes(&cfg, 0, &mut one);
        assert_eq!(one, [1]);
    }

    #[test]
    fn vendor_id_spells_embr() {
        assert_eq!(&VENDOR_ID.to_le_bytes(), b"EMBR");
    }
}
