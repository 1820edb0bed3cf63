// SPDX-License-Identifier: Apache-2.0
//! The virtio-vsock device model: three queues (rx, tx, event), the guest CID in the
//! configuration space, and the loop that moves packets between the queues and the
//! [`Muxer`]. It runs on the event loop; host-side readiness arrives through the muxer's
//! epoll fd.

use std::io::Write;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{Op, VsockHeader, HEADER_SIZE};
use super::VsockConfig;
use super::VsockError;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, ActivationEvent, Interrupt, VirtioDevice,
    ACTIVATION_TOKEN, EVENT_IDX,
};
use crate::memory::GuestMemory;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// Event-loop token of the muxer's epoll fd.
const MUXER_TOKEN: u32 = ACTIVATION_TOKEN - 1;

#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<Interrupt>,
    broken: bool,
}

/// Packet counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Packets taken from the tx queue.
    pub tx_packets: u64,
    /// Packets put on the rx queue.
    pub rx_packets: u64,
    /// Malformed tx chains (dropped).
    pub bad_chains: u64,
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    activation: ActivationEvent,
    queue_evts: Vec<Arc<EventFd>>,
    active: Option<Active>,
    buf: Vec<u8>,
    stats: VsockStats,
}

impl Vsock {
    /// A device for `config`: listens on its Unix socket at once (a stale socket from an
    /// earlier run is replaced).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        config.remove_stale_socket();
        Ok(Self {
            cid: config.cid,
            muxer: Muxer::new(config.cid, &config.uds)?,
            activation: ActivationEvent::new().map_err(VsockError::Host)?,
            queue_evts: Vec::new(),
            active: None,
            buf: vec![0; MAX_PKT_PAYLOAD],
            stats: VsockStats::default(),
        })
    }

    /// Counters.
    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// Takes every packet the guest queued and hands it to the muxer.
    fn process_tx(&mut self) -> Result<bool, virtio_queue::Error> {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken) else {
            return Ok(false);
        };
        let mut used = false;
        loop {
            a.txq.disable_notification(&a.mem)?;
            while let Some(chain) = a.txq.pop_descriptor_chain(&a.mem) {
                let head = chain.head_index();
                match read_tx_packet(chain, &a.mem, &mut self.buf) {
                    Ok((hdr, len)) => {
                        self.stats.tx_packets += 1;
                        self.muxer.send_pkt(&hdr, &self.buf[..len]);
                    }
                    Err(why) => {
                        self.stats.bad_chains += 1;
                        if self.stats.bad_chains <= 10 || self.stats.bad_chains.is_power_of_two() {
                            log::warn!(
                                "virtio-vsock: dropping a malformed tx packet: {why} (#{})",
                                self.stats.bad_chains
                            );
                        }
                    }
                }
                a.txq.add_used(&a.mem, head, 0)?;
                used = true;
            }
            if !a.txq.enable_notification(&a.mem)? {
                break;
            }
        }
        Ok(used)
    }

    /// Fills the guest's receive buffers with what the muxer has for it, until either runs
    /// out. Without buffers, packets wait in the muxer (bounded) and host sockets are not
    /// read.
    fn process_rx(&mut self) -> Result<bool, virtio_queue::Error> {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken) else {
            return Ok(false);
        };
        let mut used = false;
        a.rxq.disable_notification(&a.mem)?;
        while self.muxer.has_pending_rx() {
            let Some(chain) = a.rxq.pop_descriptor_chain(&a.mem) else {
                // Out of buffers: be told when the guest adds some.
                if a.rxq.enable_notification(&a.mem)? {
                    a.rxq.disable_notification(&a.mem)?;
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&a.mem) {
                Ok(w) if w.available_bytes() >= HEADER_SIZE => w,
                _ => {
                    self.stats.bad_chains += 1;
                    a.rxq.add_used(&a.mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let cap = (writer.available_bytes() - HEADER_SIZE).min(MAX_PKT_PAYLOAD);
            let mut hdr = VsockHeader::default();
            let Some(n) = self.muxer.recv_pkt(&mut hdr, &mut self.buf[..cap]) else {
                // Nothing after all: give the buffer back for next time.
                a.rxq
                    .set_next_avail((Wrapping(a.rxq.next_avail()) - Wrapping(1)).0);
                break;
            };
            let len = match writer
                .write_all(hdr.as_slice())
                .and_then(|()| writer.write_all(&self.buf[..n]))
            {
                Ok(()) => HEADER_SIZE + n,
                Err(e) => {
                    // Checked above to fit; a failure means guest memory went away.
                    log::warn!("virtio-vsock: cannot write an rx packet: {e}");
                    0
                }
            };
            self.stats.rx_packets += 1;
            a.rxq
                .add_used(&a.mem, head, u32::try_from(len).unwrap_or(0))?;
            used = true;
        }
        Ok(used)
    }

    /// Runs the queues and interrupts the guest if it wants to know.
    fn run_queues(&mut self, tx: bool) {
        let result = (|| -> Result<bool, virtio_queue::Error> {
            let mut used = false;
            if tx {
                used |= self.process_tx()?;
            }
            used |= self.process_rx()?;
            Ok(used)
        })();
        let Some(a) = self.active.as_mut() else { return };
        let notify = result.and_then(|used| {
            let rx = used && a.rxq.needs_notification(&a.mem)?;
            let tx = used && a.txq.needs_notification(&a.mem)?;
            Ok(rx || tx)
        });
        match notify {
            Ok(true) => a.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => {
                log::error!("virtio-vsock: virtio queue error ({e}); the device needs a reset");
                a.broken = true;
                a.interrupt.set_needs_reset();
            }
        }
    }
}

/// Reads a tx packet: header, then `len` payload bytes for RW into `buf`.
fn read_tx_packet(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    buf: &mut [u8],
) -> Result<(VsockHeader, usize), String> {
    let mut reader = chain.reader(mem).map_err(|e| e.to_string())?;
    let hdr: VsockHeader = reader
        .read_obj()
        .map_err(|_| "shorter than a packet header".to_string())?;
    if hdr.known_op() != Some(Op::Rw) {
        return Ok((hdr, 0));
    }
    let len = hdr.len() as usize;
    if len > buf.len() {
        return Err(format!("payload of {len} bytes (at most {})", buf.len()));
    }
    if len > reader.available_bytes() {
        return Err(format!(
            "header says {len} payload bytes, the chain holds {}",
            reader.available_bytes()
        ));
    }
    std::io::Read::read_exact(&mut reader, &mut buf[..len]).map_err(|e| e.to_string())?;
    Ok((hdr, len))
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        // Stream sockets only: with no feature bit, that is what the device offers.
        EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: ctx.queues.len(),
            });
        }
        let mut queues = ctx.queues.into_iter();
        let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 3, got: 0 });
        };
        for (i, q) in [&rxq, &txq].into_iter().enumerate() {
            if !q.ready() {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        self.queue_evts = ctx.queue_evts;
        self.active = Some(Active {
            mem: ctx.mem,
            rxq,
            txq,
            interrupt: ctx.interrupt,
            broken: false,
        });
        self.activation.signal()
    }

    fn reset(&mut self) {
        // The driver is gone: so are its connections.
        self.active = None;
        self.muxer.reset();
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATION_TOKEN => {
                let evts = self.queue_evts.clone();
                self.activation.on_activated(ops, &evts);
                self.run_queues(true);
            }
            MUXER_TOKEN => {
                self.muxer.process_host_events();
                self.run_queues(false);
            }
            token => {
                let i = token as usize;
                if let Some(evt) = self.queue_evts.get(i) {
                    let _ = evt.read();
                }
                match i {
                    RX_QUEUE => self.run_queues(false),
                    TX_QUEUE => self.run_queues(true),
                    EVENT_QUEUE => {} // ember sends no events (no migration)
                    _ => log::warn!("virtio-vsock: unexpected event token {token}"),
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        let ev = Events::with_data_raw(self.muxer.as_raw_fd(), MUXER_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            log::error!("virtio-vsock: cannot watch host sockets: {e:?}");
        }
    }
}
