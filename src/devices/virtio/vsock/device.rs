// SPDX-License-Identifier: Apache-2.0
//! The virtio-vsock device model: three queues (rx, tx, event), the guest CID in the
//! configuration space, and the loop that moves packets between the queues and the
//! [`Muxer`]. It runs on the event loop; host-side readiness arrives through the muxer's
//! epoll fd.
//!
//! # Snapshots
//!
//! A snapshot is refused while the muxer holds any connection or host client
//! ([`VirtioDevice::check_snapshot`]): host sockets cannot be saved, so snapshots are taken
//! with no vsock connection open (a guest process blocked in `accept()` is fine: a
//! listening socket is guest state only). What is saved is the CID and, through the
//! transport, the three queues, with the receive and event buffers the driver had posted.
//!
//! The restoring run builds the device from its own configuration: its Unix socket path
//! and its CID may differ from the snapshot's. Once restored and active, the device sends
//! the driver one `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2, 5.10.6.7) in the first
//! event-queue buffer: Linux then re-reads the guest CID from the configuration space and
//! resets its connected sockets; listening sockets stay as they are, so a host client can
//! connect to them through the new socket. The event goes out before any packet of the
//! rx queue in the same turn, so that the guest takes a new connection's REQUEST with its
//! new CID and never resets it as an old one. Linux posts its event buffers when the
//! driver probes the device, so they are in the restored queue and the event goes out on
//! the device's first turn. When the queue has no buffer yet the event waits for one (the
//! driver's notify brings it); rx traffic is not held back meanwhile. A driver reset drops
//! a pending event (the driver starts over and reads the CID anyway).

use std::io::Write;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{Op, VsockHeader, HEADER_SIZE};
use super::VsockConfig;
use super::VsockError;
use crate::devices::virtio::{
    add_used, pop_or_enable, read_config_bytes, ActivateContext, ActivateError, ActivationEvent,
    Broken, Interrupt, VirtioDevice, ACTIVATION_TOKEN, EVENT_IDX,
};
use crate::memory::GuestMemory;
use crate::snapshot::devices::{VirtioDeviceState, VsockState};
use crate::snapshot::format::SnapshotError;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the ID of the only vsock event.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event` (its little-endian 32-bit ID).
pub const EVENT_SIZE: usize = 4;
/// Event-loop token of the muxer's epoll fd.
const MUXER_TOKEN: u32 = ACTIVATION_TOKEN - 1;

#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    rxq: Queue,
    txq: Queue,
    /// The event queue (not ready when the driver did not enable it).
    evq: Queue,
    interrupt: Arc<Interrupt>,
    broken: Broken,
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
    /// Events put on the event queue.
    pub events: u64,
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
    /// The device was restored from a snapshot and the driver has not been sent its
    /// TRANSPORT_RESET event yet.
    reset_pending: bool,
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
            reset_pending: false,
        })
    }

    /// Counters.
    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// For the `fuzz/` targets only: one event-loop turn, as a notification of the transmit
    /// queue (`tx`) or of the receive or event queue does; with `host`, the muxer first
    /// handles what its host sockets have (as when its epoll fd is readable).
    #[doc(hidden)]
    pub fn fuzz_turn(&mut self, tx: bool, host: bool) {
        if host {
            self.muxer.process_host_events();
        }
        self.run_queues(tx);
    }

    /// Takes every packet the guest queued and hands it to the muxer.
    fn process_tx(&mut self) -> Result<bool, virtio_queue::Error> {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken.is_broken()) else {
            return Ok(false);
        };
        let mut used = false;
        a.txq.disable_notification(&a.mem)?;
        while let Some(chain) = pop_or_enable(&mut a.txq, &a.mem)? {
            let head = chain.head_index();
            match read_tx_packet(chain, &a.mem, &mut self.buf) {
                Ok((hdr, len)) => {
                    self.stats.tx_packets += 1;
                    self.muxer.send_pkt(&hdr, &self.buf[..len]);
                }
                Err(why) => {
                    self.stats.bad_chains += 1;
                    crate::guest_warn!(
                        "virtio-vsock: dropping a malformed tx packet: {why} (#{})",
                        self.stats.bad_chains
                    );
                }
            }
            add_used(&mut a.txq, &a.mem, head, 0)?;
            used = true;
        }
        Ok(used)
    }

    /// Fills the guest's receive buffers with what the muxer has for it, until either runs
    /// out. Without buffers, packets wait in the muxer (bounded) and host sockets are not
    /// read.
    fn process_rx(&mut self) -> Result<bool, virtio_queue::Error> {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken.is_broken()) else {
            return Ok(false);
        };
        let mut used = false;
        a.rxq.disable_notification(&a.mem)?;
        while self.muxer.has_pending_rx() {
            // Out of buffers: notifications are on again, the guest tells when it adds some.
            let Some(chain) = pop_or_enable(&mut a.rxq, &a.mem)? else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&a.mem) {
                Ok(w) if w.available_bytes() >= HEADER_SIZE => w,
                _ => {
                    self.stats.bad_chains += 1;
                    add_used(&mut a.rxq, &a.mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let cap = (writer.available_bytes() - HEADER_SIZE).min(MAX_PKT_PAYLOAD);
            let mut hdr = VsockHeader::default();
            let Some(n) = self.muxer.recv_pkt(&mut hdr, &mut self.buf[..cap]) else {
                // Nothing that fits after all (or nothing: host data went away, or the
                // buffer has no room for payload, which Linux never gives): give the buffer
                // back for next time, unused, and wait for the guest or the host to move.
                a.rxq
                    .set_next_avail((Wrapping(a.rxq.next_avail()) - Wrapping(1)).0);
                a.rxq.enable_notification(&a.mem)?;
                break;
            };
            let len = match writer
                .write_all(hdr.as_slice())
                .and_then(|()| writer.write_all(&self.buf[..n]))
            {
                Ok(()) => HEADER_SIZE + n,
                Err(e) => {
                    // Checked above to fit; a failure means guest memory went away.
                    crate::guest_warn!("virtio-vsock: cannot write an rx packet: {e}");
                    0
                }
            };
            self.stats.rx_packets += 1;
            add_used(&mut a.rxq, &a.mem, head, u32::try_from(len).unwrap_or(0))?;
            used = true;
        }
        Ok(used)
    }

    /// Sends the TRANSPORT_RESET event a restore left pending, in the first event buffer
    /// the driver offers; returns whether the event queue was used. A buffer too small for
    /// the event is given back empty (Linux ignores an event of another length) and the next
    /// one tried.
    fn process_events(&mut self) -> Result<bool, virtio_queue::Error> {
        if !self.reset_pending {
            return Ok(false);
        }
        let Some(a) = self.active.as_mut().filter(|a| !a.broken.is_broken()) else {
            return Ok(false);
        };
        if !a.evq.ready() {
            return Ok(false);
        }
        let mut used = false;
        while self.reset_pending {
            // None: no buffer yet; notifications are on, the driver's next one wakes us.
            let Some(chain) = pop_or_enable(&mut a.evq, &a.mem)? else {
                break;
            };
            let head = chain.head_index();
            let written = chain
                .writer(&a.mem)
                .map_err(|e| e.to_string())
                .and_then(|mut w| {
                    if w.available_bytes() < EVENT_SIZE {
                        return Err(format!(
                            "{} bytes, the event needs {EVENT_SIZE}",
                            w.available_bytes()
                        ));
                    }
                    w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                        .map_err(|e| e.to_string())
                });
            let len = match written {
                Ok(()) => {
                    self.reset_pending = false;
                    self.stats.events += 1;
                    EVENT_SIZE as u32
                }
                Err(why) => {
                    self.stats.bad_chains += 1;
                    crate::guest_warn!("virtio-vsock: unusable event buffer: {why}");
                    0
                }
            };
            add_used(&mut a.evq, &a.mem, head, len)?;
            used = true;
        }
        Ok(used)
    }

    /// Runs the queues and interrupts the guest if it wants to know. A pending event goes
    /// first, before any packet for the guest (see the module's Snapshots section).
    fn run_queues(&mut self, tx: bool) {
        let result = (|| -> Result<(bool, bool), virtio_queue::Error> {
            let events = self.process_events()?;
            let mut used = false;
            if tx {
                used |= self.process_tx()?;
            }
            used |= self.process_rx()?;
            Ok((used, events))
        })();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let notify = result.and_then(|(used, events)| {
            let rx = used && a.rxq.needs_notification(&a.mem)?;
            let tx = used && a.txq.needs_notification(&a.mem)?;
            let ev = events && a.evq.needs_notification(&a.mem)?;
            Ok(rx || tx || ev)
        });
        match notify {
            Ok(true) => a.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => a.broken.mark("virtio-vsock", &a.interrupt, &e),
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
        let (Some(rxq), Some(txq), Some(evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: 0,
            });
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
            evq,
            interrupt: ctx.interrupt,
            broken: Broken::default(),
        });
        self.activation.signal()
    }

    fn reset(&mut self) {
        // The driver is gone: so are its connections, and it reads the CID again.
        self.active = None;
        self.muxer.reset();
        self.reset_pending = false;
    }

    /// All three queues: the device takes event buffers too.
    fn saved_queues(&self) -> Vec<(usize, QueueState)> {
        match &self.active {
            Some(a) => vec![
                (RX_QUEUE, a.rxq.state()),
                (TX_QUEUE, a.txq.state()),
                (EVENT_QUEUE, a.evq.state()),
            ],
            None => Vec::new(),
        }
    }

    /// Refuses while the muxer holds any connection or host client: host sockets cannot be
    /// saved, and a snapshot that dropped them would leave both ends waiting.
    fn check_snapshot(&self) -> Result<(), SnapshotError> {
        let open = self.muxer.open_connections();
        if open.is_empty() {
            return Ok(());
        }
        Err(SnapshotError::Busy {
            device: "virtio-vsock".into(),
            why: format!(
                "{open}; snapshots are taken with no vsock connection open (a guest socket \
                 that listens is fine): close them, on the host and in the guest, and take \
                 the snapshot again"
            ),
        })
    }

    /// The CID (there are no connections to save: [`Self::check_snapshot`]).
    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Vsock(VsockState { cid: self.cid })
    }

    /// Accepts the snapshot's state whatever its CID (this run's is the one the guest will
    /// read) and leaves a TRANSPORT_RESET event pending, sent once the device is active and
    /// the driver has an event buffer: the driver then re-reads the CID and resets the
    /// connected sockets it had (there were none at the snapshot; listening sockets stay).
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        let VirtioDeviceState::Vsock(s) = state else {
            return Err(crate::devices::virtio::wrong_state_kind(
                "virtio-vsock",
                state,
            ));
        };
        if s.cid != self.cid {
            log::info!(
                "virtio-vsock: the guest CID was {} at the snapshot and is {} now: the guest \
                 reads it again on the transport reset",
                s.cid,
                self.cid
            );
        }
        self.reset_pending = true;
        Ok(())
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
                    // New event buffers: a pending TRANSPORT_RESET may go out now.
                    RX_QUEUE | EVENT_QUEUE => self.run_queues(false),
                    TX_QUEUE => self.run_queues(true),
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

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::super::packet::HOST_CID;
    use super::*;
    use crate::devices::virtio::test_ring::{finishes, TestRing};

    const CID: u64 = 3;

    struct Fixture {
        dir: PathBuf,
        mem: GuestMemory,
    }

    impl Fixture {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ember-vsockdev-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
            Self { dir, mem }
        }

        /// A device for `cid` on the socket `name` in the fixture's directory.
        fn new_device(&self, name: &str, cid: u64) -> Vsock {
            Vsock::new(&VsockConfig {
                cid,
                uds: self.dir.join(name),
            })
            .unwrap()
        }

        fn device(&self, rx: &TestRing<'_>, tx: &TestRing<'_>) -> Vsock {
            let mut dev = self.new_device("v.sock", CID);
            dev.active = Some(Active {
                mem: self.mem.clone(),
                rxq: rx.queue(),
                txq: tx.queue(),
                evq: Queue::new(QUEUE_SIZE).unwrap(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                broken: Broken::default(),
            });
            dev
        }
    }

    /// Activates `dev` as the transport does (at DRIVER_OK, or at the end of a restore) with
    /// `rings` as its rx, tx and event queues; returns its interrupt.
    fn activate(dev: &mut Vsock, mem: &GuestMemory, rings: [&TestRing<'_>; 3]) -> Arc<Interrupt> {
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: rings.iter().map(|r| r.queue()).collect(),
            queue_evts: (0..3)
                .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
                .collect(),
            interrupt: interrupt.clone(),
            acked_features: crate::devices::virtio::VERSION_1,
        })
        .unwrap();
        interrupt
    }

    /// Through the state file format and back, as a restore in a new process sees it.
    fn through_file(s: &VirtioDeviceState) -> VirtioDeviceState {
        use crate::snapshot::format::{decode_state, encode_state};
        let bytes = encode_state(s).unwrap();
        decode_state(std::path::Path::new("state"), &bytes)
            .unwrap()
            .1
    }

    /// The guest-visible result of an interrupt: the eventfd was written, with the used-ring
    /// bit in the status register.
    fn interrupted(irq: &Interrupt) -> bool {
        irq.irq_evt().read().is_ok()
            && irq.status() & virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING != 0
    }

    /// Offers `n` event buffers of `len` bytes at 0x30_0000, 0x30_1000..., filled with 0xff
    /// so that the event's bytes show.
    fn post_event_buffers(mem: &GuestMemory, ev: &mut TestRing<'_>, n: u64, len: u32) {
        for i in 0..n {
            let at = 0x30_0000 + i * 0x1000;
            mem.write_slice(&[0xff; 8], GuestAddress(at)).unwrap();
            ev.add_chain(&[(at, len, true)]);
        }
    }

    fn event_at(mem: &GuestMemory, at: u64) -> [u8; 8] {
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Queues a guest packet (header descriptor + payload descriptor, as Linux does).
    fn guest_send(
        mem: &GuestMemory,
        tx: &mut TestRing<'_>,
        at: u64,
        hdr: &VsockHeader,
        payload: &[u8],
    ) {
        mem.write_slice(hdr.as_slice(), GuestAddress(at)).unwrap();
        mem.write_slice(payload, GuestAddress(at + 0x100)).unwrap();
        let mut chain = vec![(at, HEADER_SIZE as u32, false)];
        if !payload.is_empty() {
            chain.push((at + 0x100, payload.len() as u32, false));
        }
        tx.add_chain(&chain);
    }

    fn guest_rx_header(mem: &GuestMemory, at: u64) -> VsockHeader {
        let mut b = [0u8; HEADER_SIZE];
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        VsockHeader::from_bytes(&b).unwrap()
    }

    #[test]
    fn guest_connect_data_and_rst_through_the_queues() {
        let f = Fixture::new("queues");
        let listener = UnixListener::bind(f.dir.join("v.sock_80")).unwrap();
        let mut rx = TestRing::new(&f.mem, 0, 16);
        let mut tx = TestRing::new(&f.mem, 0x4000, 16);
        let mut dev = f.device(&rx, &tx);
        // Two receive buffers: header + 4 KiB payload each, as Linux gives them.
        for i in 0..2u64 {
            let at = 0x10_0000 + i * 0x1_0000;
            rx.add_chain(&[(at, HEADER_SIZE as u32, true), (at + 0x100, 4096, true)]);
        }
        let mut req = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Request);
        req.set_buf_alloc(65536);
        guest_send(&f.mem, &mut tx, 0x20_0000, &req, &[]);
        dev.run_queues(true);
        assert_eq!(tx.used_idx(), 1);
        assert_eq!(rx.used_idx(), 1);
        assert_eq!(rx.used_entry(0), (0, HEADER_SIZE as u32));
        let resp = guest_rx_header(&f.mem, 0x10_0000);
        assert_eq!(resp.known_op(), Some(Op::Response));
        assert_eq!(
            (resp.src_port(), resp.dst_port(), resp.dst_cid()),
            (80, 5000, CID)
        );
        let (mut server, _) = listener.accept().unwrap();

        // Guest -> host data.
        let mut rw = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Rw);
        rw.set_len(5).set_buf_alloc(65536);
        guest_send(&f.mem, &mut tx, 0x21_0000, &rw, b"hello");
        dev.run_queues(true);
        let mut got = [0u8; 5];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        // Host -> guest data, through the muxer's epoll fd.
        std::io::Write::write_all(&mut server, b"world").unwrap();
        for _ in 0..100 {
            dev.muxer.process_host_events();
            dev.run_queues(false);
            if rx.used_idx() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(rx.used_entry(1), (2, HEADER_SIZE as u32 + 5));
        let h = guest_rx_header(&f.mem, 0x11_0000);
        assert_eq!((h.known_op(), h.len()), (Some(Op::Rw), 5));
        let mut data = [0u8; 5];
        f.mem
            .read_slice(&mut data, GuestAddress(0x11_0100))
            .unwrap();
        assert_eq!(&data, b"world");

        // A packet whose header claims more payload than the chain holds is dropped.
        let mut bad = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Rw);
        bad.set_len(60_000);
        guest_send(&f.mem, &mut tx, 0x22_0000, &bad, b"short");
        dev.run_queues(true);
        assert_eq!(dev.stats().bad_chains, 1);
        assert_eq!(tx.used_idx(), 3, "still returned to the guest");

        // The driver resets the device: host streams end.
        dev.reset();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(server.read(&mut got).unwrap(), 0);
    }

    #[test]
    fn config_space_holds_the_cid() {
        let f = Fixture::new("cfg");
        let rx = TestRing::new(&f.mem, 0, 16);
        let dev = f.device(&rx, &rx);
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), CID);
        let mut b = [0xffu8; 4];
        dev.read_config(8, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(dev.queue_max_sizes().len(), 3);
    }

    #[test]
    fn tx_avail_index_far_ahead_breaks_the_device_instead_of_spinning() {
        let f = Fixture::new("txidx");
        let rx = TestRing::new(&f.mem, 0, 16);
        let mut tx = TestRing::new(&f.mem, 0x4000, 16);
        tx.set_avail_idx(16 + 5);
        let dev = f.device(&rx, &tx);
        let interrupt = dev.active.as_ref().unwrap().interrupt.clone();
        let mut dev = finishes(move || {
            let mut dev = dev;
            dev.run_queues(true);
            dev
        });
        assert!(interrupt.needs_reset());
        assert!(dev.active.as_ref().unwrap().broken.is_broken());
        // A sane ring again, without a reset: a notify takes nothing.
        tx.set_avail_idx(0);
        let req = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Request);
        guest_send(&f.mem, &mut tx, 0x20_0000, &req, &[]);
        dev.run_queues(true);
        assert_eq!(tx.used_idx(), 0);
        assert_eq!(dev.stats().tx_packets, 0);
        assert!(!dev.muxer.has_pending_rx(), "the muxer saw nothing");
    }

    #[test]
    fn rx_avail_index_far_ahead_breaks_the_device_instead_of_spinning() {
        let f = Fixture::new("rxidx");
        let mut rx = TestRing::new(&f.mem, 0, 16);
        let tx = TestRing::new(&f.mem, 0x4000, 16);
        rx.set_avail_idx(16 + 5);
        let mut dev = f.device(&rx, &tx);
        let interrupt = dev.active.as_ref().unwrap().interrupt.clone();
        // A packet for the guest waits: the RST for a connect to a port nobody listens on.
        let req = VsockHeader::new((CID, 5000), (HOST_CID, 4321), Op::Request);
        dev.muxer.send_pkt(&req, &[]);
        assert!(dev.muxer.has_pending_rx());
        let mut dev = finishes(move || {
            dev.run_queues(false);
            dev
        });
        assert!(interrupt.needs_reset());
        assert!(dev.active.as_ref().unwrap().broken.is_broken());
        rx.set_avail_idx(0);
        rx.add_chain(&[
            (0x10_0000, HEADER_SIZE as u32, true),
            (0x10_0100, 4096, true),
        ]);
        dev.run_queues(false);
        assert_eq!(rx.used_idx(), 0, "a broken device delivers nothing");
        assert_eq!(dev.stats().rx_packets, 0);
    }

    #[test]
    fn header_only_rx_buffers_with_host_data_waiting_do_not_spin() {
        let f = Fixture::new("hdronly");
        let listener = UnixListener::bind(f.dir.join("v.sock_80")).unwrap();
        let mut rx = TestRing::new(&f.mem, 0, 16);
        let mut tx = TestRing::new(&f.mem, 0x4000, 16);
        let mut dev = f.device(&rx, &tx);
        // Receive buffers of exactly one header: room for control packets, none for data.
        for i in 0..3u64 {
            rx.add_chain(&[(0x10_0000 + i * 0x1000, HEADER_SIZE as u32, true)]);
        }
        let mut req = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Request);
        req.set_buf_alloc(65536);
        guest_send(&f.mem, &mut tx, 0x20_0000, &req, &[]);
        dev.run_queues(true);
        assert_eq!(rx.used_entry(0), (0, HEADER_SIZE as u32));
        assert_eq!(
            guest_rx_header(&f.mem, 0x10_0000).known_op(),
            Some(Op::Response)
        );
        let (mut server, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut server, b"host data").unwrap();
        for _ in 0..500 {
            dev.muxer.process_host_events();
            if dev.muxer.has_pending_rx() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(dev.muxer.has_pending_rx(), "the host data was seen");
        let mut dev = finishes(move || {
            dev.run_queues(false);
            dev
        });
        assert_eq!(
            rx.used_idx(),
            1,
            "no data packet in a buffer without room for it"
        );
        assert_eq!(dev.stats().rx_packets, 1);
        // Control packets still fit: the guest asks for credit and gets the update.
        let mut creq = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::CreditRequest);
        creq.set_buf_alloc(65536);
        guest_send(&f.mem, &mut tx, 0x21_0000, &creq, &[]);
        dev.run_queues(true);
        assert_eq!(rx.used_idx(), 2);
        assert_eq!(rx.used_entry(1), (1, HEADER_SIZE as u32));
        assert_eq!(
            guest_rx_header(&f.mem, 0x10_1000).known_op(),
            Some(Op::CreditUpdate)
        );
        // A buffer with room gets the data once the guest offers one at the head of the
        // ring (after the header-only one left there is used by another control packet).
        rx.add_chain(&[
            (0x10_3000, HEADER_SIZE as u32, true),
            (0x10_3100, 4096, true),
        ]);
        guest_send(&f.mem, &mut tx, 0x22_0000, &creq, &[]);
        dev.run_queues(true);
        assert_eq!(rx.used_idx(), 4);
        assert_eq!(rx.used_entry(3), (3, HEADER_SIZE as u32 + 9));
        let mut data = [0u8; 9];
        f.mem
            .read_slice(&mut data, GuestAddress(0x10_3100))
            .unwrap();
        assert_eq!(&data, b"host data");
    }

    #[test]
    fn state_round_trip_takes_this_runs_cid_and_saves_all_three_queues() {
        let f = Fixture::new("state");
        let rx = TestRing::new(&f.mem, 0, 16);
        let tx = TestRing::new(&f.mem, 0x4000, 16);
        let mut ev = TestRing::new(&f.mem, 0x8000, 16);
        post_event_buffers(&f.mem, &mut ev, 2, EVENT_SIZE as u32);
        let mut a = f.new_device("a.sock", 3);
        let irq = activate(&mut a, &f.mem, [&rx, &tx, &ev]);
        a.run_queues(true);
        // A device that was not restored sends no event.
        assert_eq!(ev.used_idx(), 0);
        assert!(!interrupted(&irq));
        a.check_snapshot().unwrap();
        let queues = a.saved_queues();
        assert_eq!(
            queues.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![RX_QUEUE, TX_QUEUE, EVENT_QUEUE],
            "the event queue is the device's too"
        );
        let saved = through_file(&a.save_state());
        assert_eq!(saved, VirtioDeviceState::Vsock(VsockState { cid: 3 }));

        // Restored in a run with another CID and socket path: accepted, the new CID is the
        // one saved next and the one the guest reads.
        let mut b = f.new_device("b.sock", 4);
        b.restore_state(&saved).unwrap();
        assert_eq!(
            b.save_state(),
            VirtioDeviceState::Vsock(VsockState { cid: 4 })
        );
        let mut cfg = [0u8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 4);
        // Another device kind's state is refused.
        let e = b
            .restore_state(&VirtioDeviceState::Rng(Default::default()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("virtio-rng device in its place"), "{e}");
    }

    #[test]
    fn snapshot_refused_while_a_connection_or_host_client_is_open() {
        let f = Fixture::new("busy");
        let listener = UnixListener::bind(f.dir.join("v.sock_80")).unwrap();
        let mut rx = TestRing::new(&f.mem, 0, 16);
        let mut tx = TestRing::new(&f.mem, 0x4000, 16);
        let mut dev = f.device(&rx, &tx);
        dev.check_snapshot().unwrap();
        // The guest connects to host port 80.
        rx.add_chain(&[
            (0x10_0000, HEADER_SIZE as u32, true),
            (0x10_0100, 4096, true),
        ]);
        let mut req = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Request);
        req.set_buf_alloc(65536);
        guest_send(&f.mem, &mut tx, 0x20_0000, &req, &[]);
        dev.run_queues(true);
        let (_server, _) = listener.accept().unwrap();
        let e = dev.check_snapshot().unwrap_err();
        assert!(matches!(e, SnapshotError::Busy { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("virtio-vsock")
                && msg.contains("1 connection open (0 from the host, 1 from the guest)")
                && msg.contains("snapshots are taken with no vsock connection open"),
            "{msg}"
        );
        // The guest closes it (RST): nothing is open any more.
        let rst = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Rst);
        guest_send(&f.mem, &mut tx, 0x21_0000, &rst, &[]);
        dev.run_queues(true);
        dev.check_snapshot().unwrap();

        // A host client that connected, not yet accepted by ember...
        let client = std::os::unix::net::UnixStream::connect(f.dir.join("v.sock")).unwrap();
        let msg = dev.check_snapshot().unwrap_err().to_string();
        assert!(msg.contains("host clients waiting to be accepted"), "{msg}");
        // ...then taken, still without its CONNECT line: refused through the transport too.
        dev.muxer.process_host_events();
        let msg = dev.check_snapshot().unwrap_err().to_string();
        assert!(
            msg.contains("1 host client in its CONNECT handshake"),
            "{msg}"
        );
        let mem = f.mem.clone();
        let dev = Arc::new(std::sync::Mutex::new(dev));
        let evts = (0..3)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let t =
            crate::devices::virtio::mmio::MmioTransport::new(mem, dev.clone(), irq, evts).unwrap();
        let e = t.save_state().unwrap_err();
        assert!(matches!(e, SnapshotError::Busy { .. }), "{e}");
        // The client goes away: the snapshot can be taken.
        drop(client);
        dev.lock().unwrap().muxer.process_host_events();
        let saved = t.save_state().unwrap();
        assert_eq!(
            saved.device,
            VirtioDeviceState::Vsock(VsockState { cid: CID })
        );
    }

    #[test]
    fn restored_device_sends_one_transport_reset_in_an_event_buffer() {
        let f = Fixture::new("reset");
        let rx = TestRing::new(&f.mem, 0, 16);
        let tx = TestRing::new(&f.mem, 0x4000, 16);
        // Linux posts its event buffers when it probes the device: they are in the
        // snapshot's memory and queue.
        let mut ev = TestRing::new(&f.mem, 0x8000, 16);
        post_event_buffers(&f.mem, &mut ev, 2, EVENT_SIZE as u32);
        let saved = through_file(&VirtioDeviceState::Vsock(VsockState { cid: 3 }));
        let mut dev = f.new_device("v.sock", 4);
        dev.restore_state(&saved).unwrap();
        let irq = activate(&mut dev, &f.mem, [&rx, &tx, &ev]);
        assert!(!interrupted(&irq), "nothing is sent from activate()");
        // The activation wakes the event loop, which runs the queues.
        dev.run_queues(true);
        assert_eq!(ev.used_idx(), 1);
        assert_eq!(ev.used_entry(0), (0, EVENT_SIZE as u32));
        assert_eq!(
            event_at(&f.mem, 0x30_0000),
            [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (0, le32), and nothing past it"
        );
        assert!(interrupted(&irq));
        assert_eq!(dev.stats().events, 1);
        // Once: the second buffer stays with the device for a later event.
        dev.run_queues(true);
        dev.run_queues(false);
        assert_eq!(ev.used_idx(), 1);
        assert!(!interrupted(&irq));
        let (_, evq) = dev.saved_queues()[EVENT_QUEUE];
        assert_eq!((evq.next_avail, evq.next_used), (1, 1));
        // The guest, with its new CID, connects to a host port nobody listens on: the muxer
        // answers it (a RST), so the restored device moves packets under the new CID.
        let mut rx = rx;
        let mut tx = tx;
        rx.add_chain(&[(0x10_0000, HEADER_SIZE as u32, true)]);
        let req = VsockHeader::new((4, 5000), (HOST_CID, 4321), Op::Request);
        guest_send(&f.mem, &mut tx, 0x20_0000, &req, &[]);
        dev.run_queues(true);
        assert_eq!(rx.used_idx(), 1);
        let h = guest_rx_header(&f.mem, 0x10_0000);
        assert_eq!((h.known_op(), h.dst_cid()), (Some(Op::Rst), 4));
    }

    #[test]
    fn transport_reset_waits_for_an_event_buffer_and_a_driver_reset_drops_it() {
        let f = Fixture::new("noevbuf");
        let rx = TestRing::new(&f.mem, 0, 16);
        let tx = TestRing::new(&f.mem, 0x4000, 16);
        let mut ev = TestRing::new(&f.mem, 0x8000, 16);
        let saved = VirtioDeviceState::Vsock(VsockState { cid: CID });
        let mut dev = f.new_device("v.sock", CID);
        dev.restore_state(&saved).unwrap();
        let irq = activate(&mut dev, &f.mem, [&rx, &tx, &ev]);
        dev.run_queues(true);
        assert_eq!(ev.used_idx(), 0, "no buffer: nothing sent");
        assert!(!interrupted(&irq));
        // The driver posts a buffer too small for an event, then a good one, and notifies
        // the event queue: the small one comes back empty, the event goes in the next.
        post_event_buffers(&f.mem, &mut ev, 1, 2);
        mem_post_at(&f.mem, &mut ev, 0x30_1000);
        dev.run_queues(false);
        assert_eq!(ev.used_idx(), 2);
        assert_eq!(ev.used_entry(0), (0, 0));
        assert_eq!(ev.used_entry(1), (1, EVENT_SIZE as u32));
        assert_eq!(&event_at(&f.mem, 0x30_1000)[..5], &[0, 0, 0, 0, 0xff]);
        assert!(interrupted(&irq));
        assert_eq!((dev.stats().events, dev.stats().bad_chains), (1, 1));

        // Restored again, but the driver resets the device before it posts a buffer: the
        // driver starts over (and reads the CID anyway), so no event is left for it.
        let f2 = Fixture::new("noevbuf2");
        let rx = TestRing::new(&f2.mem, 0, 16);
        let tx = TestRing::new(&f2.mem, 0x4000, 16);
        let mut ev = TestRing::new(&f2.mem, 0x8000, 16);
        let mut dev = f2.new_device("v.sock", CID);
        dev.restore_state(&saved).unwrap();
        activate(&mut dev, &f2.mem, [&rx, &tx, &ev]);
        dev.run_queues(true);
        dev.reset();
        post_event_buffers(&f2.mem, &mut ev, 1, EVENT_SIZE as u32);
        let irq = activate(&mut dev, &f2.mem, [&rx, &tx, &ev]);
        dev.run_queues(true);
        assert_eq!(ev.used_idx(), 0);
        assert!(!interrupted(&irq));
    }

    /// Offers one 4-byte event buffer at `at`, filled with 0xff.
    fn mem_post_at(mem: &GuestMemory, ev: &mut TestRing<'_>, at: u64) {
        mem.write_slice(&[0xff; 8], GuestAddress(at)).unwrap();
        ev.add_chain(&[(at, EVENT_SIZE as u32, true)]);
    }
}
