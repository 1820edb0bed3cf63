// SPDX-License-Identifier: Apache-2.0
//! The virtio-net device model: two queues (rx, tx) and a TAP, on the event loop.
//!
//! - tx: each chain the guest queues is one header + frame, written to the TAP as is.
//! - rx: the TAP is polled edge-triggered; ember reads one packet at a time and only while
//!   the guest has receive buffers. A packet waiting for buffers stays in one host buffer
//!   (the TAP's own queue, bounded by the kernel, holds the rest); a packet that no buffers
//!   the guest can offer would hold is dropped and counted.
//! - rate limits (`rx=`, `tx=`: [`Net::with_rate_limit`]): a frame over the limit waits, a
//!   received one in that one host buffer, a sent one in the tx ring, until the limiter's
//!   timer fires on the event loop.
//!
//! # Snapshots
//!
//! What is saved is the NIC's TAP name, its MAC and the TAP's host-side MAC ([`NetState`])
//! and, through the transport, its two queues with the receive buffers the driver had posted
//! and the frames it had queued for sending. A snapshot is taken between event-loop turns,
//! when every chain the device took is back in the used ring; what ember holds in its own
//! buffers is not saved and is lost, as a network may lose any frame (TCP retransmits): a
//! frame read from the TAP that waits for receive buffers, and what waits in the TAP's
//! kernel queue (the kernel drops it when the old process closes the TAP). A transmit frame
//! is never half sent: each one is read from its chain and written to the TAP within one
//! turn.
//!
//! The restoring run builds the NIC from its own configuration: its TAP may be another one
//! (`ember restore --tap`), opened and watched by the event loop as on a boot, while the
//! MAC must be the snapshot's (it is the guest's: [`VirtioDevice::restore_state`] refuses
//! another). The restored device starts with nothing buffered and reads its new TAP at its
//! first turn (the activation a restore performs): rx resumes into the buffers the driver
//! had posted, and tx sends what the driver queued, notified or not. A pending interrupt is
//! raised again by the transport.
//!
//! The guest's neighbour entries for the host's addresses name the old TAP's host-side MAC,
//! and the new TAP drops frames sent to another MAC than its own: a guest would not reach
//! the host until an entry is refreshed (the host's first ARP request to it does that; on
//! its own, the guest took over two minutes here). So when the new TAP's host end has
//! another MAC and an IPv4 address, the restored device gives the guest, before anything
//! from the TAP, a gratuitous ARP request from that address with the new MAC (what the host
//! would send if it announced itself), which updates the guest's entry for it; IPv6
//! neighbours are not announced. The guest itself is not announced to the network
//! (VIRTIO_NET_F_GUEST_ANNOUNCE needs a control queue, which ember does not offer).

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::header::{
    mergeable_rx, plan_rx, set_num_buffers, tun_offload_flags, RxPlan, MAX_PACKET_SIZE,
    NET_HDR_SIZE, OFFERED_FEATURES,
};
use super::tap::Tap;
use super::{MacAddr, NetError};
use crate::devices::virtio::rate_limiter::{BucketConfig, RateLimiter};
use crate::devices::virtio::{
    add_used, pop_or_enable, read_config_bytes, ActivateContext, ActivateError, ActivationEvent,
    Broken, Interrupt, VirtioDevice, ACTIVATION_TOKEN, EVENT_IDX,
};
use crate::memory::GuestMemory;
use crate::snapshot::devices::{NetState, VirtioDeviceState};
use crate::snapshot::format::SnapshotError;

/// Size of the rx and tx queues.
pub const QUEUE_SIZE: u16 = 256;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
/// Event-loop token of the TAP.
const TAP_TOKEN: u32 = ACTIVATION_TOKEN - 1;
/// Event-loop token of the rx rate limiter's timer.
const RX_TIMER: u32 = ACTIVATION_TOKEN - 2;
/// Event-loop token of the tx rate limiter's timer.
const TX_TIMER: u32 = ACTIVATION_TOKEN - 3;

/// Counters of one NIC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames handed to the guest.
    pub rx_frames: u64,
    /// Bytes handed to the guest (headers included).
    pub rx_bytes: u64,
    /// Frames dropped because no guest buffers could hold them.
    pub rx_dropped_too_large: u64,
    /// Frames sent by the guest.
    pub tx_frames: u64,
    /// Bytes sent by the guest (headers included).
    pub tx_bytes: u64,
    /// Guest frames dropped: malformed chain, too large, or refused by the TAP.
    pub tx_dropped: u64,
    /// Times the rx rate limit held a frame from the TAP (it waited for the timer).
    pub rx_throttled: u64,
    /// Times the tx rate limit held the guest's frames (they waited for the timer).
    pub tx_throttled: u64,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<Interrupt>,
    mergeable: bool,
    broken: Broken,
}

/// What became of the packet waiting for the guest.
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Not enough buffers yet; notifications are on.
    Wait,
    /// No buffers the guest can offer hold it.
    Drop,
}

/// Why the rx queue cannot be used any more.
#[derive(Debug)]
enum RxError {
    Queue(virtio_queue::Error),
    Chain(String),
}

impl From<virtio_queue::Error> for RxError {
    fn from(e: virtio_queue::Error) -> Self {
        Self::Queue(e)
    }
}

/// A virtio-net device on a TAP.
#[derive(Debug)]
pub struct Net {
    tap: Tap,
    mac: MacAddr,
    config_space: [u8; 8],
    activation: ActivationEvent,
    queue_evts: Vec<Arc<EventFd>>,
    active: Option<Active>,
    /// The packet read from the TAP that waits for guest buffers (`rx_len` bytes of it).
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    /// The rx rate limit has admitted the packet in `rx_buf` (it waits for buffers only).
    rx_paid: bool,
    /// The `rx=` limit (bytes from the TAP to the guest), when there is one.
    rx_limiter: Option<RateLimiter>,
    /// The `tx=` limit (bytes from the guest to the TAP), when there is one.
    tx_limiter: Option<RateLimiter>,
    /// The TAP polled readable and was not yet read to `EAGAIN`.
    tap_readable: bool,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl Net {
    /// A NIC on `tap` with address `mac`.
    pub fn new(tap: Tap, mac: MacAddr) -> Result<Self, NetError> {
        let mut config_space = [0u8; 8];
        config_space[..6].copy_from_slice(&mac.0);
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Ok(Self {
            tap,
            mac,
            config_space,
            activation: ActivationEvent::new().map_err(NetError::EventFd)?,
            queue_evts: Vec::new(),
            active: None,
            rx_buf: vec![0; MAX_PACKET_SIZE],
            rx_len: None,
            rx_paid: false,
            rx_limiter: None,
            tx_limiter: None,
            tap_readable: false,
            tx_buf: vec![0; MAX_PACKET_SIZE],
            stats: NetStats::default(),
        })
    }

    /// Limits the bytes per second the guest receives (`rx`) and sends (`tx`), headers
    /// included (either `None`: no limit). A frame over the limit waits (a received one in
    /// ember's one-frame buffer, the TAP's queue holding the rest; a sent one in the tx
    /// ring) until the limiter's timer fires on the event loop.
    pub fn with_rate_limit(
        mut self,
        rx: Option<BucketConfig>,
        tx: Option<BucketConfig>,
    ) -> Result<Self, NetError> {
        let name = |dir| format!("virtio-net {} {dir}", self.tap.name());
        self.rx_limiter = RateLimiter::new(&name("rx"), rx, None).map_err(NetError::Timer)?;
        self.tx_limiter = RateLimiter::new(&name("tx"), tx, None).map_err(NetError::Timer)?;
        Ok(self)
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The TAP's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The part of `activate` after the checks and the TAP's offload settings: the device
    /// takes the queues and wakes the event loop.
    fn activate_queues(
        &mut self,
        ctx: ActivateContext,
        rxq: Queue,
        txq: Queue,
    ) -> Result<(), ActivateError> {
        self.queue_evts = ctx.queue_evts;
        self.active = Some(Active {
            mem: ctx.mem,
            rxq,
            txq,
            interrupt: ctx.interrupt,
            mergeable: mergeable_rx(ctx.acked_features),
            broken: Broken::default(),
        });
        self.activation.signal()
    }

    /// For the `fuzz/` targets only: activates the device on `ctx`'s two queues (ready, as
    /// the transport checks) as [`VirtioDevice::activate`] does, less the TAP offload ioctl
    /// that a stand-in TAP ([`Tap::from_file`]) cannot take.
    #[doc(hidden)]
    pub fn fuzz_activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let (rxq, txq) = rx_tx_queues(std::mem::take(&mut ctx.queues))?;
        self.activate_queues(ctx, rxq, txq)
    }

    /// For the `fuzz/` targets only: one event-loop turn, as a notification of the transmit
    /// queue (`tx`) or of the receive queue does, with the TAP readable when `tap_readable`.
    #[doc(hidden)]
    pub fn fuzz_turn(&mut self, tx: bool, tap_readable: bool) {
        self.tap_readable |= tap_readable;
        self.run_queues(tx);
    }

    fn process_tx(&mut self) -> Result<bool, virtio_queue::Error> {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken.is_broken()) else {
            return Ok(false);
        };
        if self
            .tx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
        {
            return Ok(false); // the limiter's timer resumes tx
        }
        let mut used = false;
        a.txq.disable_notification(&a.mem)?;
        while let Some(chain) = pop_or_enable(&mut a.txq, &a.mem)? {
            let head = chain.head_index();
            let frame = read_tx_frame(chain, &a.mem, &mut self.tx_buf);
            if let (Ok(n), Some(l)) = (&frame, self.tx_limiter.as_mut()) {
                if !l.consume(*n as u64, Instant::now()) {
                    // Over the limit: the frame goes back to the ring until the timer fires
                    // (notifications stay off meanwhile).
                    self.stats.tx_throttled = l.throttled();
                    crate::metrics::net::tx_rate_limiter_throttled.inc();
                    a.txq
                        .set_next_avail((Wrapping(a.txq.next_avail()) - Wrapping(1)).0);
                    break;
                }
            }
            let sent = frame.and_then(|n| {
                self.tap
                    .write_packet(&self.tx_buf[..n])
                    .map_err(|e| format!("the TAP refused it: {e}"))
            });
            match sent {
                Ok(n) => {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += n as u64;
                    crate::metrics::net::tx_packets_count.inc();
                    crate::metrics::net::tx_bytes_count.add(n as u64);
                }
                Err(why) => {
                    self.stats.tx_dropped += 1;
                    crate::metrics::net::failures.inc();
                    let k = self.stats.tx_dropped;
                    crate::guest_warn!(
                        "virtio-net {}: dropped a guest frame: {why} (#{k})",
                        self.tap.name()
                    );
                }
            }
            add_used(&mut a.txq, &a.mem, head, 0)?;
            used = true;
        }
        Ok(used)
    }

    fn process_rx(&mut self) -> Result<bool, RxError> {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken.is_broken()) else {
            return Ok(false);
        };
        if self
            .rx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
        {
            return Ok(false); // the limiter's timer resumes rx
        }
        let mut used = false;
        a.rxq.disable_notification(&a.mem)?;
        loop {
            let len = match self.rx_len {
                Some(len) => len,
                None if !self.tap_readable => break,
                None => match self.tap.read_packet(&mut self.rx_buf) {
                    Ok(n) if n >= NET_HDR_SIZE => {
                        self.rx_len = Some(n);
                        n
                    }
                    Ok(_) => continue, // no frame behind the header: nothing to deliver
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            crate::guest_warn!(
                                "virtio-net {}: TAP read failed: {e}",
                                self.tap.name()
                            );
                        }
                        self.tap_readable = false;
                        break;
                    }
                },
            };
            if !self.rx_paid {
                if let Some(l) = self.rx_limiter.as_mut() {
                    if !l.consume(len as u64, Instant::now()) {
                        // The frame waits in `rx_buf` for the timer.
                        self.stats.rx_throttled = l.throttled();
                        crate::metrics::net::rx_rate_limiter_throttled.inc();
                        break;
                    }
                }
                self.rx_paid = true;
            }
            match deliver(a, &mut self.rx_buf[..len])? {
                Delivery::Delivered => {
                    self.rx_len = None;
                    self.rx_paid = false;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += len as u64;
                    crate::metrics::net::rx_packets_count.inc();
                    crate::metrics::net::rx_bytes_count.add(len as u64);
                    used = true;
                }
                Delivery::Wait => break,
                Delivery::Drop => {
                    self.rx_len = None;
                    self.rx_paid = false;
                    self.stats.rx_dropped_too_large += 1;
                    crate::metrics::net::failures.inc();
                    let k = self.stats.rx_dropped_too_large;
                    crate::guest_warn!(
                        "virtio-net {}: dropped a {len}-byte frame: the guest's receive \
                         buffers cannot hold it (#{k})",
                        self.tap.name()
                    );
                }
            }
        }
        Ok(used)
    }

    /// The TAP's host end has MAC `new`, where the guest knew `old`: puts a gratuitous ARP
    /// request from the TAP's IPv4 address with `new` where a frame from the TAP waits for
    /// the guest's buffers, so that it is the first frame the guest gets. Without an IPv4
    /// address (a TAP in a bridge: the guest talks to the bridge's MAC, which did not
    /// change) there is nothing to announce.
    fn announce_host(&mut self, old: MacAddr, new: MacAddr) {
        let name = self.tap.name();
        match self.tap.host_ipv4() {
            Ok(Some(ip)) => {
                let n = write_gratuitous_arp(&mut self.rx_buf, new, ip);
                self.rx_len = Some(n);
                log::info!(
                    "virtio-net {name}: the TAP's host end has MAC {new}, where the guest knew \
                     {old}: telling the guest that {ip} is at {new} (a gratuitous ARP)"
                );
            }
            Ok(None) => log::debug!(
                "virtio-net {name}: the TAP's host end has MAC {new} ({old} at the snapshot) \
                 and no IPv4 address: nothing to announce"
            ),
            Err(e) => log::warn!(
                "virtio-net {name}: cannot read the TAP's IPv4 address ({e}): the guest may \
                 not reach the host until its neighbour entries are refreshed"
            ),
        }
    }

    /// Runs the queues and interrupts the guest if it wants to know.
    fn run_queues(&mut self, tx: bool) {
        let mut failed = None;
        let mut used = false;
        if tx {
            match self.process_tx() {
                Ok(u) => used |= u,
                Err(e) => failed = Some(e.to_string()),
            }
        }
        if failed.is_none() {
            match self.process_rx() {
                Ok(u) => used |= u,
                Err(RxError::Queue(e)) => failed = Some(e.to_string()),
                Err(RxError::Chain(e)) => failed = Some(format!("bad receive buffer: {e}")),
            }
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if failed.is_none() && used {
            let notify = a
                .rxq
                .needs_notification(&a.mem)
                .and_then(|rx| Ok(rx | a.txq.needs_notification(&a.mem)?));
            match notify {
                Ok(true) => a.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => failed = Some(e.to_string()),
            }
        }
        if let Some(why) = failed {
            let name = format!("virtio-net {}", self.tap.name());
            a.broken.mark(&name, &a.interrupt, &why);
        }
    }
}

/// The receive and transmit queues of an activation, both ready.
fn rx_tx_queues(queues: Vec<Queue>) -> Result<(Queue, Queue), ActivateError> {
    if queues.len() != 2 {
        return Err(ActivateError::QueueCount {
            expected: 2,
            got: queues.len(),
        });
    }
    let mut queues = queues.into_iter();
    let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
        return Err(ActivateError::QueueCount {
            expected: 2,
            got: 0,
        });
    };
    for (i, q) in [&rxq, &txq].into_iter().enumerate() {
        if !q.ready() {
            return Err(ActivateError::QueueNotReady(i));
        }
    }
    Ok((rxq, txq))
}

/// Writes into `buf` a packet (a zeroed virtio-net header, then a broadcast Ethernet frame
/// padded to 60 bytes) with a gratuitous ARP request: `ip` is at `mac`. Returns its length.
fn write_gratuitous_arp(buf: &mut [u8], mac: MacAddr, ip: std::net::Ipv4Addr) -> usize {
    let ip = ip.octets();
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&[0xff; 6]); // destination: broadcast
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    frame.extend_from_slice(&mac.0); // sender
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&[0; 6]); // target: the same address (gratuitous)
    frame.extend_from_slice(&ip);
    frame.resize(60, 0);
    let n = NET_HDR_SIZE + frame.len();
    buf[..NET_HDR_SIZE].fill(0);
    buf[NET_HDR_SIZE..n].copy_from_slice(&frame);
    n
}

/// Reads one tx chain (header + frame) into `buf`; returns its length.
fn read_tx_frame(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    buf: &mut [u8],
) -> Result<usize, String> {
    let mut reader = chain.reader(mem).map_err(|e| e.to_string())?;
    let n = reader.available_bytes();
    if n < NET_HDR_SIZE {
        return Err(format!(
            "{n} bytes, shorter than the {NET_HDR_SIZE}-byte header"
        ));
    }
    if n > buf.len() {
        return Err(format!(
            "{n} bytes, more than {} (64 KiB frame + header)",
            buf.len()
        ));
    }
    reader
        .read_exact(&mut buf[..n])
        .map_err(|e| e.to_string())?;
    Ok(n)
}

/// Puts `packet` (header + frame) into the guest's receive buffers, taking them one chain
/// at a time until [`plan_rx`] says they suffice.
fn deliver(a: &mut Active, packet: &mut [u8]) -> Result<Delivery, RxError> {
    let Active {
        mem,
        rxq,
        mergeable,
        ..
    } = a;
    let max = usize::from(rxq.size());
    let mut heads = Vec::new();
    let mut writers = Vec::new();
    let mut caps = Vec::new();
    let give_back = |rxq: &mut Queue, n: usize| {
        let n = u16::try_from(n).unwrap_or(u16::MAX);
        rxq.set_next_avail((Wrapping(rxq.next_avail()) - Wrapping(n)).0);
    };
    loop {
        match plan_rx(packet.len(), &caps, *mergeable, max) {
            RxPlan::Use(k) => {
                set_num_buffers(packet, u16::try_from(k).unwrap_or(u16::MAX));
                let mut off = 0;
                for (head, w) in heads.iter().zip(writers.iter_mut()).take(k) {
                    let w: &mut virtio_queue::Writer<'_> = w;
                    let n = w.available_bytes().min(packet.len() - off);
                    w.write_all(&packet[off..off + n])
                        .map_err(|e| RxError::Chain(e.to_string()))?;
                    off += n;
                    add_used(rxq, mem, *head, u32::try_from(n).unwrap_or(0))?;
                }
                return Ok(Delivery::Delivered);
            }
            RxPlan::TooLarge => {
                give_back(rxq, heads.len());
                return Ok(Delivery::Drop);
            }
            RxPlan::NeedMore => match pop_or_enable(rxq, mem)? {
                Some(chain) => {
                    heads.push(chain.head_index());
                    let w = chain
                        .writer(mem)
                        .map_err(|e| RxError::Chain(e.to_string()))?;
                    caps.push(w.available_bytes());
                    writers.push(w);
                }
                None => {
                    // Notifications are on again (pop_or_enable): give the buffers taken
                    // back until the rest arrives.
                    give_back(rxq, heads.len());
                    return Ok(Delivery::Wait);
                }
            },
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn avail_features(&self) -> u64 {
        OFFERED_FEATURES | EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let (rxq, txq) = rx_tx_queues(std::mem::take(&mut ctx.queues))?;
        // The TAP may hand over only what the guest's receive path accepts.
        let flags = tun_offload_flags(ctx.acked_features);
        self.tap
            .set_offload(flags)
            .map_err(|e| ActivateError::Device(crate::error_chain_line(&e)))?;
        log::debug!(
            "virtio-net {}: activated, features {:#x}, TAP offloads {flags:#x}",
            self.tap.name(),
            ctx.acked_features
        );
        self.activate_queues(ctx, rxq, txq)
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_len = None;
        self.rx_paid = false;
    }

    fn saved_queues(&self) -> Vec<(usize, QueueState)> {
        match &self.active {
            Some(a) => vec![(0, a.rxq.state()), (1, a.txq.state())],
            None => Vec::new(),
        }
    }

    /// The TAP name, the MAC and the TAP's host-side MAC. A frame read from the TAP and not
    /// yet given to the guest is not saved: it is lost, as a network may lose any frame (see
    /// the module's Snapshots).
    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(NetState {
            tap: self.tap.name().to_string(),
            mac: self.mac,
            host_mac: self.tap.host_mac().ok(),
        })
    }

    /// Checks that the NIC has the MAC the guest had (its TAP may be another: a host-side
    /// setting), drops anything buffered from before, has the first turn read the TAP
    /// (frames may be waiting on it already), and when the TAP's host end has another MAC
    /// than at the snapshot, queues a gratuitous ARP for the guest first
    /// (`announce_host`).
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        let VirtioDeviceState::Net(s) = state else {
            return Err(crate::devices::virtio::wrong_state_kind(
                "virtio-net",
                state,
            ));
        };
        if s.mac != self.mac {
            return Err(SnapshotError::Device {
                device: format!("virtio-net on TAP {}", self.tap.name()),
                why: format!(
                    "its MAC is {}, {} in the snapshot (the guest's address, which a restore \
                     keeps: give --net tap={},mac={}, or use `ember restore`)",
                    self.mac,
                    s.mac,
                    self.tap.name(),
                    s.mac
                ),
            });
        }
        if s.tap != self.tap.name() {
            log::info!(
                "virtio-net: the NIC with MAC {} was on TAP {} at the snapshot and is on TAP {} \
                 now",
                self.mac,
                s.tap,
                self.tap.name()
            );
        }
        self.rx_len = None;
        self.rx_paid = false;
        self.tap_readable = true;
        if let (Some(old), Ok(new)) = (s.host_mac, self.tap.host_mac()) {
            if old != new {
                self.announce_host(old, new);
            }
        }
        Ok(())
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATION_TOKEN => {
                let evts = self.queue_evts.clone();
                self.activation.on_activated(ops, &evts);
                self.run_queues(true);
            }
            TAP_TOKEN => {
                self.tap_readable = true;
                self.run_queues(false);
            }
            RX_TIMER => {
                if let Some(l) = self.rx_limiter.as_mut() {
                    l.timer_fired();
                }
                self.run_queues(false);
            }
            TX_TIMER => {
                if let Some(l) = self.tx_limiter.as_mut() {
                    l.timer_fired();
                }
                self.run_queues(true);
            }
            token @ (RX_QUEUE | TX_QUEUE) => {
                if let Some(evt) = self.queue_evts.get(token as usize) {
                    let _ = evt.read();
                }
                self.run_queues(token == TX_QUEUE);
            }
            other => log::warn!("virtio-net: unexpected event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        // Edge-triggered: the TAP is read until EAGAIN, or until the guest runs out of
        // buffers, in which case `tap_readable` remembers to go on when it gives more.
        let ev = Events::with_data_raw(
            self.tap.as_raw_fd(),
            TAP_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(ev) {
            log::error!(
                "virtio-net {}: cannot watch the TAP: {e:?}",
                self.tap.name()
            );
        }
        for (limiter, token) in [(&self.rx_limiter, RX_TIMER), (&self.tx_limiter, TX_TIMER)] {
            let Some(l) = limiter else { continue };
            if let Err(e) = ops.add(Events::with_data_raw(l.as_raw_fd(), token, EventSet::IN)) {
                log::error!(
                    "virtio-net {}: cannot watch a rate-limit timer: {e:?}",
                    self.tap.name()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::devices::virtio::test_ring::{finishes, TestRing};

    const BUF_BASE: u64 = 0x10_0000;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// Offers one single-descriptor receive buffer per entry of `sizes`; buffer `k` (in
    /// offer order over the ring's life) lies at `BUF_BASE + k * 0x1_0000`.
    fn offer(ring: &mut TestRing<'_>, first: u64, sizes: &[u32]) {
        for (i, &len) in sizes.iter().enumerate() {
            ring.add_chain(&[(BUF_BASE + (first + i as u64) * 0x1_0000, len, true)]);
        }
    }

    fn active(mem: &GuestMemory, ring: &TestRing<'_>, mergeable: bool) -> Active {
        Active {
            mem: mem.clone(),
            rxq: ring.queue(),
            txq: ring.queue(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            mergeable,
            broken: Broken::default(),
        }
    }

    fn packet(len: usize) -> Vec<u8> {
        let mut p: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        p[..NET_HDR_SIZE].fill(0);
        p
    }

    #[test]
    fn mergeable_packet_spans_buffers_with_num_buffers_set() {
        let m = mem();
        let mut ring = TestRing::new(&m, 0, 16);
        offer(&mut ring, 0, &[2048, 2048, 2048]);
        let mut a = active(&m, &ring, true);
        let mut p = packet(3000);
        assert!(matches!(
            deliver(&mut a, &mut p).unwrap(),
            Delivery::Delivered
        ));
        assert_eq!(ring.used_idx(), 2, "two buffers used, the third kept");
        assert_eq!(ring.used_entry(0), (0, 2048));
        assert_eq!(ring.used_entry(1), (1, 952));
        let mut got = vec![0u8; 3000];
        m.read_slice(&mut got[..2048], GuestAddress(BUF_BASE))
            .unwrap();
        m.read_slice(&mut got[2048..], GuestAddress(BUF_BASE + 0x1_0000))
            .unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        assert_eq!(&got[NET_HDR_SIZE..], &p[NET_HDR_SIZE..]);
        assert_eq!(a.rxq.next_avail(), 2);
    }

    #[test]
    fn waits_for_enough_buffers_without_consuming_any() {
        let m = mem();
        let mut ring = TestRing::new(&m, 0, 16);
        offer(&mut ring, 0, &[2048, 2048]);
        let mut a = active(&m, &ring, true);
        let mut p = packet(5000);
        assert!(matches!(deliver(&mut a, &mut p).unwrap(), Delivery::Wait));
        assert_eq!(a.rxq.next_avail(), 0, "the buffers taken were given back");
        assert_eq!(ring.used_idx(), 0);
        offer(&mut ring, 2, &[2048]);
        assert!(matches!(
            deliver(&mut a, &mut p).unwrap(),
            Delivery::Delivered
        ));
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(ring.used_entry(2), (2, 5000 - 4096));
    }

    #[test]
    fn oversized_frames_are_dropped_and_buffers_kept() {
        let m = mem();
        // Without mergeable buffers a frame must fit one buffer.
        let mut ring = TestRing::new(&m, 0, 16);
        offer(&mut ring, 0, &[1526, 1526]);
        let mut a = active(&m, &ring, false);
        assert!(matches!(
            deliver(&mut a, &mut packet(4000)).unwrap(),
            Delivery::Drop
        ));
        assert_eq!(a.rxq.next_avail(), 0);
        assert!(matches!(
            deliver(&mut a, &mut packet(1500)).unwrap(),
            Delivery::Delivered
        ));
        assert_eq!(ring.used_entry(0), (0, 1500));
        // Mergeable, but the whole ring cannot hold it.
        let mut ring = TestRing::new(&m, 0x8000, 8);
        offer(&mut ring, 0, &[100; 8]);
        let mut a = active(&m, &ring, true);
        assert!(matches!(
            deliver(&mut a, &mut packet(1000)).unwrap(),
            Delivery::Drop
        ));
        assert_eq!((a.rxq.next_avail(), ring.used_idx()), (0, 0));
    }

    #[test]
    fn buffers_outside_guest_memory_break_the_queue_not_ember() {
        let m = mem();
        let mut ring = TestRing::new(&m, 0, 16);
        ring.add_chain(&[(0x1_0000_0000, 4096, true)]);
        let mut a = active(&m, &ring, true);
        assert!(matches!(
            deliver(&mut a, &mut packet(100)),
            Err(RxError::Chain(_))
        ));
    }

    /// A NIC on a stand-in TAP (one end of a datagram socket pair, so reads say
    /// `WouldBlock` until the test writes a frame), with both queues on `rx` and `tx`.
    fn net_on(
        m: &GuestMemory,
        rx: &TestRing<'_>,
        tx: &TestRing<'_>,
    ) -> (Net, std::os::unix::net::UnixDatagram, Arc<Interrupt>) {
        let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let file = std::fs::File::from(std::os::fd::OwnedFd::from(ours));
        let mut net = Net::new(
            Tap::from_file(file, "testtap0"),
            MacAddr([2, 0, 0, 0, 0, 1]),
        )
        .unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut a = active(m, rx, true);
        a.txq = tx.queue();
        a.interrupt = interrupt.clone();
        net.active = Some(a);
        (net, theirs, interrupt)
    }

    #[test]
    fn tx_avail_index_far_ahead_breaks_the_device_instead_of_spinning() {
        let m = mem();
        let rx = TestRing::new(&m, 0, 16);
        let mut tx = TestRing::new(&m, 0x4000, 16);
        tx.set_avail_idx(16 + 5);
        let (net, peer, interrupt) = net_on(&m, &rx, &tx);
        let mut net = finishes(move || {
            let mut net = net;
            net.run_queues(true);
            net
        });
        assert!(interrupt.needs_reset());
        assert!(net.active.as_ref().unwrap().broken.is_broken());
        // A sane ring again, without a reset: a notify sends nothing.
        tx.set_avail_idx(0);
        let frame = packet(60);
        m.write_slice(&frame, GuestAddress(BUF_BASE)).unwrap();
        tx.add_chain(&[(BUF_BASE, 60, false)]);
        net.run_queues(true);
        assert_eq!(tx.used_idx(), 0);
        assert_eq!(net.stats().tx_frames, 0);
        peer.set_nonblocking(true).unwrap();
        assert!(
            peer.recv(&mut [0u8; 128]).is_err(),
            "nothing reached the TAP"
        );
    }

    #[test]
    fn rx_avail_index_far_ahead_breaks_the_device_instead_of_spinning() {
        let m = mem();
        let mut rx = TestRing::new(&m, 0, 16);
        let tx = TestRing::new(&m, 0x4000, 16);
        rx.set_avail_idx(16 + 5);
        let (net, peer, interrupt) = net_on(&m, &rx, &tx);
        // A frame from the host waits for the guest.
        peer.send(&packet(100)).unwrap();
        let mut net = finishes(move || {
            let mut net = net;
            net.tap_readable = true;
            net.run_queues(false);
            net
        });
        assert!(interrupt.needs_reset());
        assert!(net.active.as_ref().unwrap().broken.is_broken());
        rx.set_avail_idx(0);
        offer(&mut rx, 0, &[2048]);
        net.run_queues(false);
        assert_eq!(rx.used_idx(), 0, "a broken device delivers nothing");
        assert_eq!(net.stats().rx_frames, 0);
    }

    /// Runs `events` until `done` says so; false if it does not within 30 s (hang
    /// detection only: the tests below take about a second).
    fn run_until(
        events: &mut crate::event_loop::EventManager,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            events.run_with_timeout(100).unwrap();
        }
        true
    }

    #[test]
    fn tx_over_the_limit_waits_for_the_timer_not_for_a_kick() {
        use event_manager::SubscriberOps;
        let m = mem();
        let rx = TestRing::new(&m, 0, 16);
        let mut tx = TestRing::new(&m, 0x4000, 16);
        let (net, peer, _) = net_on(&m, &rx, &tx);
        // 600-byte frames; 600 bytes at once, then 1000 bytes per second.
        let limit = BucketConfig {
            rate: 1000,
            burst: 600,
        };
        let net = Arc::new(std::sync::Mutex::new(
            net.with_rate_limit(None, Some(limit)).unwrap(),
        ));
        let mut events = crate::event_loop::new_event_manager().unwrap();
        events.add_subscriber(net.clone());
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|k| {
                let mut p = packet(600);
                p[NET_HDR_SIZE] = k;
                m.write_slice(&p, GuestAddress(0x30_0000 + u64::from(k) * 0x1000))
                    .unwrap();
                tx.add_chain(&[(0x30_0000 + u64::from(k) * 0x1000, 600, false)]);
                p
            })
            .collect();
        // The guest's one kick: the first frame goes, the others are held.
        net.lock().unwrap().run_queues(true);
        assert_eq!(tx.used_idx(), 1);
        assert_eq!(net.lock().unwrap().stats().tx_throttled, 1);
        let mut got = [0u8; 4096];
        assert_eq!(peer.recv(&mut got).unwrap(), 600);
        assert_eq!(&got[..600], &frames[0][..]);
        // No kick again: the limiter's timer on the event loop sends the rest, in order.
        assert!(run_until(&mut events, || tx.used_idx() == 3), "tx stalled");
        for f in &frames[1..] {
            assert_eq!(peer.recv(&mut got).unwrap(), 600);
            assert_eq!(&got[..600], &f[..]);
        }
        let stats = net.lock().unwrap().stats();
        assert_eq!((stats.tx_frames, stats.tx_bytes), (3, 1800));
        assert_eq!(stats.tx_throttled, 2, "{stats:?}");
    }

    #[test]
    fn rx_over_the_limit_waits_for_the_timer_with_the_frame_held() {
        use event_manager::SubscriberOps;
        let m = mem();
        let mut rx = TestRing::new(&m, 0, 16);
        let tx = TestRing::new(&m, 0x4000, 16);
        let (net, peer, _) = net_on(&m, &rx, &tx);
        let limit = BucketConfig {
            rate: 1000,
            burst: 600,
        };
        let net = Arc::new(std::sync::Mutex::new(
            net.with_rate_limit(Some(limit), None).unwrap(),
        ));
        let mut events = crate::event_loop::new_event_manager().unwrap();
        events.add_subscriber(net.clone());
        offer(&mut rx, 0, &[2048, 2048, 2048]);
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|k| {
                let mut p = packet(600);
                p[NET_HDR_SIZE] = k;
                peer.send(&p).unwrap();
                p
            })
            .collect();
        // The TAP turns readable: one frame fits the limit, the next waits in ember's
        // buffer (the third in the TAP's queue).
        assert!(run_until(&mut events, || rx.used_idx() >= 1), "rx stalled");
        assert_eq!(rx.used_idx(), 1);
        assert_eq!(net.lock().unwrap().rx_len, Some(600));
        assert_eq!(net.lock().unwrap().stats().rx_throttled, 1);
        // Nothing more arrives on the TAP and the guest does nothing: the timer delivers.
        assert!(run_until(&mut events, || rx.used_idx() == 3), "rx stalled");
        for (k, f) in frames.iter().enumerate() {
            assert_eq!(rx.used_entry(k as u16), (k as u32, 600));
            assert_eq!(received(&m, k as u64, 600), f[NET_HDR_SIZE..]);
        }
        let stats = net.lock().unwrap().stats();
        assert_eq!((stats.rx_frames, stats.rx_throttled), (3, 2), "{stats:?}");
    }

    /// A NIC with address `mac` on a stand-in TAP named `name` (as in [`net_on`]), not
    /// active; with the test's end of the stand-in.
    fn stand_in(name: &str, mac: MacAddr) -> (Net, std::os::unix::net::UnixDatagram) {
        let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let file = std::fs::File::from(std::os::fd::OwnedFd::from(ours));
        (Net::new(Tap::from_file(file, name), mac).unwrap(), theirs)
    }

    /// What a restoring transport does with a freshly built NIC: the device state restored,
    /// then the device activated on the saved queues (as `activate`, less the TAP offload
    /// ioctl, which the stand-in cannot take), then the activation turn.
    fn restore_on(
        net: &mut Net,
        m: &GuestMemory,
        device: &VirtioDeviceState,
        queues: &[(usize, QueueState)],
    ) -> Arc<Interrupt> {
        net.restore_state(device).unwrap();
        let q = |i: usize| Queue::try_from(queues[i].1).unwrap();
        assert_eq!((queues[0].0, queues[1].0), (0, 1));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        net.active = Some(Active {
            mem: m.clone(),
            rxq: q(0),
            txq: q(1),
            interrupt: interrupt.clone(),
            mergeable: true,
            broken: Broken::default(),
        });
        net.run_queues(true);
        interrupt
    }

    /// Through the state file format and back, as a restore would see it.
    fn through_file(s: &VirtioDeviceState) -> VirtioDeviceState {
        let bytes = crate::snapshot::format::encode_state(s).unwrap();
        crate::snapshot::format::decode_state(std::path::Path::new("state"), &bytes)
            .unwrap()
            .1
    }

    /// The frame of a received packet in guest buffer `k` (see [`offer`]), `len` bytes with
    /// the header.
    fn received(m: &GuestMemory, k: u64, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        m.read_slice(&mut got, GuestAddress(BUF_BASE + k * 0x1_0000))
            .unwrap();
        got.split_off(NET_HDR_SIZE)
    }

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 7]);

    #[test]
    fn state_round_trip_keeps_the_mac_and_may_change_the_tap() {
        let (a, _) = stand_in("embstandinA", MAC);
        let saved = through_file(&a.save_state());
        assert_eq!(
            saved,
            VirtioDeviceState::Net(NetState {
                tap: "embstandinA".into(),
                mac: MAC,
                // A stand-in TAP has no host end.
                host_mac: None,
            })
        );
        assert!(
            a.saved_queues().is_empty(),
            "inactive: no queues of its own"
        );
        // Another TAP (a host-side setting): accepted.
        let (mut b, _) = stand_in("embstandinB", MAC);
        b.restore_state(&saved).unwrap();
        assert_eq!((b.tap_name(), b.mac()), ("embstandinB", MAC));
        // Another MAC: refused, both named, with the fix.
        let (mut c, _) = stand_in("embstandinA", MacAddr([2, 0, 0, 0, 0, 8]));
        let e = c.restore_state(&saved).unwrap_err().to_string();
        assert!(
            e.contains("its MAC is 02:00:00:00:00:08, 02:00:00:00:00:07 in the snapshot")
                && e.contains("mac=02:00:00:00:00:07"),
            "{e}"
        );
        // Another device's state: refused.
        let rng = VirtioDeviceState::Rng(crate::snapshot::devices::RngState::default());
        let e = c.restore_state(&rng).unwrap_err().to_string();
        assert!(e.contains("virtio-net") && e.contains("virtio-rng"), "{e}");
    }

    #[test]
    fn a_frame_held_at_the_snapshot_is_never_delivered_after_the_restore() {
        let m = mem();
        let mut rx = TestRing::new(&m, 0, 16);
        let tx = TestRing::new(&m, 0x4000, 16);
        let (mut a, peer_a, _) = net_on(&m, &rx, &tx);
        // A frame from the host and no receive buffer: ember holds it.
        let old = packet(300);
        peer_a.send(&old).unwrap();
        a.tap_readable = true;
        a.run_queues(false);
        assert_eq!(a.rx_len, Some(300), "the frame waits in ember's buffer");
        let device = through_file(&a.save_state());
        let queues = a.saved_queues();

        // Restored into that very device (what restore_state leaves behind): the held frame
        // is dropped, not given to the buffers the guest posts next.
        a.restore_state(&device).unwrap();
        assert_eq!(a.rx_len, None);
        offer(&mut rx, 0, &[2048]);
        a.run_queues(false);
        assert_eq!(
            rx.used_idx(),
            0,
            "the held frame was delivered after the restore"
        );
        assert_eq!(a.stats().rx_frames, 0);

        // Restored into a fresh NIC on another TAP, on which a frame waits already (no
        // epoll edge is needed: the activation turn reads the TAP): that frame, and only
        // it, reaches the guest's buffer.
        let (mut b, peer_b) = stand_in("testtap1", MacAddr([2, 0, 0, 0, 0, 1]));
        let new = packet(200);
        peer_b.send(&new).unwrap();
        let interrupt = restore_on(&mut b, &m, &device, &queues);
        assert_eq!(rx.used_idx(), 1);
        assert_eq!(rx.used_entry(0), (0, 200));
        assert_eq!(received(&m, 0, 200), new[NET_HDR_SIZE..]);
        assert_eq!(b.stats().rx_frames, 1);
        assert_eq!(interrupt.status() & 1, 1, "the guest was interrupted");
    }

    #[test]
    fn tx_and_rx_go_on_after_a_restore_on_another_tap() {
        let m = mem();
        let mut rx = TestRing::new(&m, 0, 16);
        let mut tx = TestRing::new(&m, 0x4000, 16);
        offer(&mut rx, 0, &[2048, 2048, 2048]);
        let (mut a, peer_a, _) = net_on(&m, &rx, &tx);
        let tx_buf = |k: u64| 0x30_0000 + k * 0x1000;
        let send = |tx: &mut TestRing<'_>, k: u64, len: usize| {
            let p = packet(len);
            m.write_slice(&p, GuestAddress(tx_buf(k))).unwrap();
            tx.add_chain(&[(tx_buf(k), len as u32, false)]);
            p
        };
        // Before the snapshot: one frame each way.
        let f1 = send(&mut tx, 0, 100);
        a.run_queues(true);
        let mut got = [0u8; 4096];
        assert_eq!(peer_a.recv(&mut got).unwrap(), 100);
        assert_eq!(&got[..100], &f1[..]);
        let f2 = packet(150);
        peer_a.send(&f2).unwrap();
        a.tap_readable = true;
        a.run_queues(false);
        assert_eq!((rx.used_idx(), rx.used_entry(0)), (1, (0, 150)));
        // The guest queues a frame whose notification the old process never handles.
        let f3 = send(&mut tx, 1, 120);
        let device = through_file(&a.save_state());
        let queues = a.saved_queues();
        drop(a);

        // Restored on another TAP: the queued frame goes out on the new TAP at the first
        // turn, frames from the new TAP fill the next posted buffers, and nothing reaches
        // the old TAP.
        let (mut b, peer_b) = stand_in("testtap1", MacAddr([2, 0, 0, 0, 0, 1]));
        let interrupt = restore_on(&mut b, &m, &device, &queues);
        assert_eq!(peer_b.recv(&mut got).unwrap(), 120);
        assert_eq!(&got[..120], &f3[..]);
        assert_eq!(tx.used_idx(), 2);
        assert_eq!(
            interrupt.status() & 1,
            1,
            "the guest was told of the used tx chain"
        );
        let f4 = packet(180);
        peer_b.send(&f4).unwrap();
        b.tap_readable = true; // the TAP's epoll edge
        b.run_queues(false);
        assert_eq!((rx.used_idx(), rx.used_entry(1)), (2, (1, 180)));
        assert_eq!(received(&m, 1, 180), f4[NET_HDR_SIZE..]);
        let f5 = send(&mut tx, 2, 90);
        b.run_queues(true);
        assert_eq!(peer_b.recv(&mut got).unwrap(), 90);
        assert_eq!(&got[..90], &f5[..]);
        assert_eq!(
            b.stats(),
            NetStats {
                rx_frames: 1,
                rx_bytes: 180,
                tx_frames: 2,
                tx_bytes: 210,
                ..NetStats::default()
            }
        );
        peer_a.set_nonblocking(true).unwrap();
        assert!(
            peer_a.recv(&mut got).is_err(),
            "the old TAP got a frame after the snapshot"
        );
    }

    #[test]
    fn gratuitous_arp_says_the_address_is_at_the_mac() {
        let mut buf = vec![0xaau8; MAX_PACKET_SIZE];
        let mac = MacAddr([0x5e, 1, 2, 3, 4, 5]);
        let n = write_gratuitous_arp(&mut buf, mac, std::net::Ipv4Addr::new(10, 0, 0, 1));
        let mut want = vec![0u8; NET_HDR_SIZE];
        want.extend_from_slice(&[0xff; 6]);
        want.extend_from_slice(&mac.0);
        want.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        want.extend_from_slice(&mac.0);
        want.extend_from_slice(&[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
        want.resize(NET_HDR_SIZE + 60, 0);
        assert_eq!(&buf[..n], &want[..]);
    }

    /// On real TAPs (root only: a network namespace of its own): the TAP's host-side MAC is
    /// saved; a restore onto the same TAP, or onto another one without an IPv4 address,
    /// announces nothing; onto another TAP with an address, the guest's first frame is a
    /// gratuitous ARP from that address with the new TAP's MAC.
    #[test]
    fn a_restore_onto_a_tap_with_another_host_mac_announces_it() {
        let ran = crate::devices::virtio::net::tap::tests::in_new_netns(|| {
            let m = mem();
            let mut rx = TestRing::new(&m, 0, 16);
            let tx = TestRing::new(&m, 0x4000, 16);
            let queues = [(0, rx.queue().state()), (1, tx.queue().state())];
            let a = Net::new(Tap::open("embsnapA").unwrap(), MAC).unwrap();
            let old_mac = a.tap.host_mac().unwrap();
            let saved = through_file(&a.save_state());
            assert_eq!(
                saved,
                VirtioDeviceState::Net(NetState {
                    tap: "embsnapA".into(),
                    mac: MAC,
                    host_mac: Some(old_mac),
                })
            );
            drop(a);
            let mut same = Net::new(Tap::open("embsnapA").unwrap(), MAC).unwrap();
            same.restore_state(&saved).unwrap();
            assert_eq!(same.rx_len, None, "same TAP: nothing to announce");
            let b_tap = Tap::open("embsnapB").unwrap();
            let new_mac = b_tap.host_mac().unwrap();
            assert_ne!(new_mac, old_mac);
            let mut b = Net::new(b_tap, MAC).unwrap();
            b.restore_state(&saved).unwrap();
            assert_eq!(b.rx_len, None, "no IPv4 address: nothing to announce");
            let status = std::process::Command::new("ip")
                .args(["addr", "add", "10.11.13.1/24", "dev", "embsnapB"])
                .status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("skipped the announcement: `ip` not usable");
                return;
            }
            offer(&mut rx, 0, &[2048]);
            let interrupt = restore_on(&mut b, &m, &saved, &queues);
            assert_eq!(rx.used_idx(), 1);
            assert_eq!(rx.used_entry(0), (0, (NET_HDR_SIZE + 60) as u32));
            let mut want = vec![0u8; MAX_PACKET_SIZE];
            let n =
                write_gratuitous_arp(&mut want, new_mac, std::net::Ipv4Addr::new(10, 11, 13, 1));
            assert_eq!(received(&m, 0, n), want[NET_HDR_SIZE..n]);
            assert_eq!(interrupt.status() & 1, 1);
        });
        if !ran {
            eprintln!("SKIP a_restore_onto_a_tap_with_another_host_mac_announces_it");
        }
    }
}
