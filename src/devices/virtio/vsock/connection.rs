// SPDX-License-Identifier: Apache-2.0
//! One vsock stream connection between a guest socket and a host Unix stream, and its state
//! machine (virtio spec 5.10.6.3-5.10.6.6):
//!
//! ```text
//!  host CONNECT line          guest REQUEST
//!        |                          |
//!   LocalInit --guest RESPONSE-->   |  (we queue RESPONSE once the host socket is connected)
//!        |                      Established <-----------------+
//!        +---guest RST/timeout---> Closed                     |
//!                                                             |
//!  Established: RW both ways under credit; SHUTDOWN from either side; RST ends it.
//! ```
//!
//! Flow control is the spec's credit scheme. Each side tells the other its receive buffer
//! size (`buf_alloc`) and how many bytes it has consumed (`fwd_cnt`); a sender may have at
//! most `buf_alloc - (tx_cnt - fwd_cnt)` bytes in flight. ember's side of it:
//! - guest -> host: bytes the host socket cannot take at once wait in `to_host`, which the
//!   credit ember advertises bounds to [`CONN_BUF_ALLOC`] (its allocation to
//!   [`TO_HOST_CAPACITY`], freed when it drains); a guest that sends beyond its credit gets
//!   its connection reset, so it cannot make ember buffer more;
//! - host -> guest: ember reads the host socket only when the guest has credit and has given
//!   a receive buffer, and reads straight into that buffer: nothing is queued in between.
//!
//! A connection never blocks: the host stream is non-blocking, and what it wants to wait
//! for is given by [`Connection::interest`], which the muxer mirrors into its epoll set.

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{Op, VsockHeader, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// The receive buffer ember advertises to the guest for each connection (`buf_alloc`): the
/// most guest -> host bytes ember holds for one connection while its host socket is not
/// reading (past what the host socket's own buffer takes). A guest that sends more than
/// this credit allows is reset, so the credit is never more than ember holds. Host -> guest
/// bytes are never queued in ember (they are read straight into a guest buffer).
pub const CONN_BUF_ALLOC: u32 = 64 * 1024;

/// Longest line ember writes to a host stream itself (`OK <port>\n`, port up to 2^32 - 1).
pub const MAX_OWN_LINE: usize = "OK 4294967295\n".len();

/// The most bytes one connection's host-bound buffer ever holds (and allocates): its guest
/// data plus ember's own `OK` line.
pub const TO_HOST_CAPACITY: usize = CONN_BUF_ALLOC as usize + MAX_OWN_LINE;

/// Send a credit update once this many forwarded bytes have not been reported to the guest.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// A host-side stream a connection can forward to.
pub trait HostStream: Read + Write + AsRawFd {
    /// Shuts down the write half (the host reader sees end of file).
    fn shutdown_write(&self) -> io::Result<()>;
    /// Shuts down both halves (the host sees the connection end at once, even while ember
    /// still owes the guest a RST).
    fn shutdown_both(&self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }

    fn shutdown_both(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Both)
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host asked for it; a REQUEST is (or was) sent to the guest, no answer yet.
    LocalInit,
    /// Connected both ends; data may flow.
    Established,
    /// Over: the muxer drops it once its last packet (if any) has gone to the guest.
    Closed,
}

/// What a connection wants the host stream polled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    /// Readable: host data for the guest (or end of file).
    pub read: bool,
    /// Writable: buffered guest data can go on.
    pub write: bool,
}

/// Counters exposed for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Bytes forwarded guest -> host.
    pub to_host: u64,
    /// Bytes forwarded host -> guest.
    pub to_guest: u64,
}

/// One connection. `S` is the host stream ([`UnixStream`] in ember).
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    state: State,
    guest_cid: u64,
    /// Host-side port (what the guest sees as the peer port).
    local_port: u32,
    /// Guest-side port.
    peer_port: u32,

    // Guest -> host.
    /// Bytes not yet written to the host stream: guest data (at most CONN_BUF_ALLOC), after
    /// `own_prefix` bytes of ember's own (the `OK <port>` line).
    to_host: Vec<u8>,
    own_prefix: usize,
    /// Bytes taken off `to_host` by the host stream (our `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// The guest said it sends no more: shut the host write half once `to_host` drains.
    guest_send_done: bool,
    /// The host write half is shut.
    host_write_shut: bool,

    // Host -> guest.
    /// Bytes sent to the guest (our `tx_cnt`).
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host stream polled readable; read it when the guest has a buffer.
    host_readable: bool,
    /// The host stream reached end of file (or the guest wants nothing more).
    host_read_done: bool,
    /// The guest said it receives no more.
    guest_recv_done: bool,

    // Packets owed to the guest (one each at most, so this cannot grow).
    pending_request: bool,
    pending_response: bool,
    pending_credit_update: bool,
    pending_credit_request: bool,
    pending_shutdown: u32,
    pending_rst: bool,
    /// The guest asked to close both directions: reset once `to_host` is flushed.
    closing: bool,

    /// When this connection gives up waiting (guest answer, host flush).
    deadline: Option<Instant>,
    /// The host asked for it (a `CONNECT` line), not the guest.
    host_initiated: bool,
    stats: ConnStats,
}

impl<S: HostStream> Connection<S> {
    fn new(stream: S, guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            to_host: Vec::new(),
            own_prefix: 0,
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            guest_send_done: false,
            host_write_shut: false,
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_readable: false,
            host_read_done: false,
            guest_recv_done: false,
            pending_request: false,
            pending_response: false,
            pending_credit_update: false,
            pending_credit_request: false,
            pending_shutdown: 0,
            pending_rst: false,
            closing: false,
            deadline: None,
            host_initiated: state == State::LocalInit,
            stats: ConnStats::default(),
        }
    }

    /// A connection the host asked for (its `CONNECT <peer_port>` line was read): a REQUEST
    /// for the guest is queued; the host gets `OK <local_port>` when the guest accepts.
    pub fn new_local(stream: S, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port, State::LocalInit);
        c.pending_request = true;
        c
    }

    /// A connection the guest asked for (its REQUEST `hdr`), already connected on the host:
    /// a RESPONSE for the guest is queued.
    pub fn new_peer(stream: S, guest_cid: u64, hdr: &VsockHeader) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            hdr.dst_port(),
            hdr.src_port(),
            State::Established,
        );
        c.peer_buf_alloc = hdr.buf_alloc();
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt());
        c.pending_response = true;
        c
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// Guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// Byte counters.
    pub fn stats(&self) -> ConnStats {
        self.stats
    }

    /// Bytes of guest data waiting for the host stream.
    pub fn buffered_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Bytes allocated for data waiting for the host stream (at most [`TO_HOST_CAPACITY`]).
    pub fn buffer_capacity(&self) -> usize {
        self.to_host.capacity()
    }

    /// Whether the host asked for this connection (else the guest did).
    pub fn host_initiated(&self) -> bool {
        self.host_initiated
    }

    /// When this connection gives up waiting, if it is waiting.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Sets (or clears) the deadline.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// The deadline passed: a guest that never answered, or a host that never read.
    pub fn expire(&mut self) {
        log::debug!(
            "vsock: connection {}<->{} timed out in state {:?}",
            self.local_port,
            self.peer_port,
            self.state
        );
        if self.state == State::LocalInit && self.pending_request {
            // The guest never saw the request (no driver yet, or no receive buffers): there
            // is nothing to reset on its side.
            self.close_silently();
        } else {
            self.reset();
        }
    }

    /// The connection is over and has nothing more for the guest: the muxer may drop it.
    pub fn is_done(&self) -> bool {
        self.state == State::Closed && !self.pending_rst
    }

    /// Credit the guest has given us: how many bytes we may send it now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// What to poll the host stream for.
    pub fn interest(&self) -> Interest {
        if self.state != State::Established {
            return Interest::default();
        }
        Interest {
            read: !self.host_readable
                && !self.host_read_done
                && !self.guest_recv_done
                && self.peer_credit() > 0,
            write: !self.to_host.is_empty(),
        }
    }

    /// Whether a packet for the guest is ready ([`Self::recv_pkt`] would produce one).
    pub fn has_pending_rx(&self) -> bool {
        if self.pending_rst {
            return true;
        }
        self.state != State::Closed
            && (self.pending_request
                || self.pending_response
                || self.pending_credit_update
                || self.pending_credit_request
                || self.pending_shutdown != 0
                || (self.host_readable && self.peer_credit() > 0))
    }

    /// Ends the connection: the host stream is left for the muxer to drop, the guest gets a
    /// RST.
    pub fn reset(&mut self) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.pending_rst = true;
            let _ = self.stream.shutdown_both();
        }
        self.to_host = Vec::new();
        self.own_prefix = 0;
        self.deadline = None;
    }

    /// Ends the connection without telling the guest (it reset it, or is gone).
    pub fn close_silently(&mut self) {
        self.state = State::Closed;
        self.pending_rst = false;
        let _ = self.stream.shutdown_both();
        self.to_host = Vec::new();
        self.own_prefix = 0;
        self.deadline = None;
    }

    fn header(&mut self, op: Op) -> VsockHeader {
        let mut h = VsockHeader::new(
            (HOST_CID, self.local_port),
            (self.guest_cid, self.peer_port),
            op,
        );
        h.set_buf_alloc(CONN_BUF_ALLOC).set_fwd_cnt(self.fwd_cnt.0);
        self.fwd_cnt_sent = self.fwd_cnt;
        self.pending_credit_update = false;
        h
    }

    /// The host stream is ready for what [`Self::interest`] asked.
    pub fn notify(&mut self, readable: bool, writable: bool, hangup: bool) {
        if self.state != State::Established {
            return;
        }
        if readable || hangup {
            // Read when the guest gives a buffer (recv_pkt); a hang-up reads as EOF there.
            self.host_readable = true;
        }
        if writable || hangup {
            self.flush_to_host();
        }
    }

    /// Writes buffered guest data to the host stream, as much as it takes.
    fn flush_to_host(&mut self) {
        if !self.to_host.is_empty() {
            let Some(n) = write_some(&mut self.stream, &self.to_host) else {
                self.reset();
                return;
            };
            self.to_host.drain(..n);
            // ember's own bytes do not count as forwarded guest data.
            let own = n.min(self.own_prefix);
            self.own_prefix -= own;
            self.forwarded(n - own);
            if self.to_host.is_empty() {
                // Idle connections hold no buffer.
                self.to_host = Vec::new();
            }
        }
        self.after_flush();
    }

    /// Queues `bytes` for the host stream behind what waits already. The caller keeps the
    /// total within [`TO_HOST_CAPACITY`], which is allocated once, exactly: the buffer never
    /// grows past it.
    fn buffer_to_host(&mut self, bytes: &[u8]) {
        if self.to_host.capacity() < TO_HOST_CAPACITY {
            self.to_host
                .reserve_exact(TO_HOST_CAPACITY - self.to_host.len());
        }
        self.to_host.extend_from_slice(bytes);
    }

    fn forwarded(&mut self, n: usize) {
        // n <= CONN_BUF_ALLOC-sized chunks; wrapping is the protocol's arithmetic.
        self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
        self.stats.to_host += n as u64;
        if (self.fwd_cnt - self.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending_credit_update = true;
        }
    }

    fn after_flush(&mut self) {
        if !self.to_host.is_empty() || self.state != State::Established {
            return;
        }
        if self.closing {
            // Everything the guest sent reached the host: finish as the guest asked.
            self.reset();
            return;
        }
        if self.guest_send_done && !self.host_write_shut {
            self.host_write_shut = true;
            if let Err(e) = self.stream.shutdown_write() {
                log::debug!("vsock: cannot shut the host stream's write half: {e}");
            }
            // Tell the guest its last bytes were consumed.
            self.pending_credit_update = true;
        }
        self.maybe_finished();
    }

    /// Both directions are done: close it.
    fn maybe_finished(&mut self) {
        if self.host_read_done
            && self.pending_shutdown == 0
            && self.guest_send_done
            && self.host_write_shut
        {
            self.reset();
        }
    }

    /// A packet from the guest for this connection. `payload` holds the RW bytes (exactly
    /// `hdr.len()` of them, which the caller checked).
    pub fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        if hdr.type_() != TYPE_STREAM {
            self.reset();
            return;
        }
        // Every packet carries the peer's credit information.
        self.peer_buf_alloc = hdr.buf_alloc();
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt());

        match (self.state, hdr.known_op()) {
            (_, Some(Op::Rst)) => self.close_silently(),
            (State::LocalInit, Some(Op::Response)) => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.own_prefix = line.len();
                self.buffer_to_host(line.as_bytes());
                self.flush_to_host();
            }
            (State::Established, Some(Op::Rw)) => self.guest_data(payload),
            (State::Established, Some(Op::CreditUpdate)) => {}
            (State::Established, Some(Op::CreditRequest)) => self.pending_credit_update = true,
            (State::Established, Some(Op::Shutdown)) => self.guest_shutdown(hdr.flags()),
            (state, op) => {
                log::debug!(
                    "vsock: unexpected {op:?} (op {}) in state {state:?}: reset",
                    hdr.op()
                );
                self.reset();
            }
        }
    }

    fn guest_data(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        if self.guest_send_done {
            log::debug!("vsock: guest sent data after shutting down sending: reset");
            self.reset();
            return;
        }
        if self.to_host.len() - self.own_prefix + payload.len() > CONN_BUF_ALLOC as usize {
            log::debug!(
                "vsock: guest overran its credit ({} buffered + {} bytes > {CONN_BUF_ALLOC}): \
                 reset",
                self.to_host.len(),
                payload.len()
            );
            self.reset();
            return;
        }
        if !self.to_host.is_empty() {
            // Behind what waits already, in order.
            self.buffer_to_host(payload);
            self.flush_to_host();
            return;
        }
        // Straight to the host stream; only what it does not take is held.
        let Some(n) = write_some(&mut self.stream, payload) else {
            self.reset();
            return;
        };
        self.forwarded(n);
        if n < payload.len() {
            self.buffer_to_host(&payload[n..]);
        }
        self.after_flush();
    }

    fn guest_shutdown(&mut self, flags: u32) {
        if flags & SHUTDOWN_RCV != 0 {
            self.guest_recv_done = true;
            self.host_readable = false;
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_send_done = true;
        }
        if flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == (SHUTDOWN_RCV | SHUTDOWN_SEND) {
            // The guest closed its socket: deliver what it sent, then reset (as Linux does).
            self.closing = true;
            if !self.to_host.is_empty() {
                // A host that never reads must not keep the connection forever.
                self.deadline = Some(Instant::now() + super::muxer::FLUSH_TIMEOUT);
            }
        }
        self.after_flush();
    }

    /// The next packet for the guest, if any: the header is written to `hdr` and RW payload
    /// into `buf` (at most `buf.len()` bytes); returns the payload length.
    pub fn recv_pkt(&mut self, hdr: &mut VsockHeader, buf: &mut [u8]) -> Option<usize> {
        if self.pending_rst {
            self.pending_rst = false;
            *hdr = self.header(Op::Rst);
            return Some(0);
        }
        if self.state == State::Closed {
            return None;
        }
        if self.pending_request {
            self.pending_request = false;
            *hdr = self.header(Op::Request);
            return Some(0);
        }
        if self.pending_response {
            self.pending_response = false;
            *hdr = self.header(Op::Response);
            return Some(0);
        }
        if self.host_readable && self.peer_credit() > 0 && !buf.is_empty() {
            if let Some(n) = self.read_host(buf) {
                *hdr = self.header(Op::Rw);
                hdr.set_len(u32::try_from(n).unwrap_or(0));
                return Some(n);
            }
            if self.pending_rst {
                return self.recv_pkt(hdr, buf);
            }
        }
        if self.pending_shutdown != 0 {
            let flags = std::mem::take(&mut self.pending_shutdown);
            *hdr = self.header(Op::Shutdown);
            hdr.set_flags(flags);
            self.maybe_finished();
            return Some(0);
        }
        if self.pending_credit_update {
            *hdr = self.header(Op::CreditUpdate);
            return Some(0);
        }
        if self.pending_credit_request {
            self.pending_credit_request = false;
            *hdr = self.header(Op::CreditRequest);
            return Some(0);
        }
        None
    }

    /// Reads host data for the guest, at most its credit. None when there is none (would
    /// block, end of file, error: the state says which).
    fn read_host(&mut self, buf: &mut [u8]) -> Option<usize> {
        let max = buf.len().min(self.peer_credit() as usize);
        loop {
            return match self.stream.read(&mut buf[..max]) {
                Ok(0) => {
                    self.host_readable = false;
                    self.host_read_done = true;
                    self.pending_shutdown |= SHUTDOWN_SEND;
                    None
                }
                Ok(n) => {
                    self.tx_cnt += Wrapping(u32::try_from(n).unwrap_or(0));
                    self.stats.to_guest += n as u64;
                    if n < max {
                        // Drained for now: wait for the next readable event.
                        self.host_readable = false;
                    }
                    if self.peer_credit() == 0 {
                        // Out of credit: ask for more (the guest answers with an update).
                        self.pending_credit_request = true;
                        self.host_readable = false;
                    }
                    Some(n)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    None
                }
                Err(e) => {
                    log::debug!("vsock: host stream read failed, resetting: {e}");
                    self.reset();
                    None
                }
            };
        }
    }
}

/// Writes as much of `data` as `stream` takes without blocking; None when the stream is
/// closed or failed (the connection must be reset).
fn write_some<S: Write>(stream: &mut S, data: &[u8]) -> Option<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return None,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("vsock: host stream write failed, resetting: {e}");
                return None;
            }
        }
    }
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn guest_pkt(op: Op, conn: &Connection<UnixStream>) -> VsockHeader {
        let mut h = VsockHeader::new((CID, conn.peer_port()), (HOST_CID, conn.local_port()), op);
        h.set_buf_alloc(64 * 1024);
        h
    }

    fn recv(conn: &mut Connection<UnixStream>, buf: &mut [u8]) -> Option<(VsockHeader, usize)> {
        let mut h = VsockHeader::default();
        conn.recv_pkt(&mut h, buf).map(|n| (h, n))
    }

    fn established_peer() -> (Connection<UnixStream>, UnixStream) {
        let (ours, host) = pair();
        let mut req = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Request);
        req.set_buf_alloc(64 * 1024);
        let mut c = Connection::new_peer(ours, CID, &req);
        let (h, _) = recv(&mut c, &mut []).unwrap();
        assert_eq!(h.known_op(), Some(Op::Response));
        (c, host)
    }

    #[test]
    fn guest_connect_gets_response_with_credit() {
        let (ours, _host) = pair();
        let mut req = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Request);
        req.set_buf_alloc(1000);
        let mut c = Connection::new_peer(ours, CID, &req);
        assert!(c.has_pending_rx());
        let (h, n) = recv(&mut c, &mut [0; 16]).unwrap();
        assert_eq!(n, 0);
        assert_eq!(h.known_op(), Some(Op::Response));
        assert_eq!((h.src_cid(), h.src_port()), (HOST_CID, 80));
        assert_eq!((h.dst_cid(), h.dst_port()), (CID, 5000));
        assert_eq!(h.buf_alloc(), CONN_BUF_ALLOC);
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.peer_credit(), 1000);
        assert!(recv(&mut c, &mut [0; 16]).is_none());
        assert_eq!(
            c.interest(),
            Interest {
                read: true,
                write: false
            }
        );
    }

    #[test]
    fn host_connect_waits_for_guest_response_then_says_ok() {
        let (ours, mut host) = pair();
        let mut c = Connection::new_local(ours, CID, 1 << 30, 52);
        let (h, _) = recv(&mut c, &mut []).unwrap();
        assert_eq!(h.known_op(), Some(Op::Request));
        assert_eq!(
            (h.dst_cid(), h.dst_port(), h.src_port()),
            (CID, 52, 1 << 30)
        );
        assert_eq!(c.interest(), Interest::default());
        c.send_pkt(&guest_pkt(Op::Response, &c), &[]);
        assert_eq!(c.state(), State::Established);
        let mut line = [0u8; 32];
        let n = host.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {}\n", 1u32 << 30).as_bytes());
        // The OK line is not guest data: the guest's credit view starts at zero.
        c.send_pkt(&guest_pkt(Op::CreditRequest, &c), &[]);
        let (h, _) = recv(&mut c, &mut []).unwrap();
        assert_eq!((h.known_op(), h.fwd_cnt()), (Some(Op::CreditUpdate), 0));
    }

    #[test]
    fn host_connect_refused_by_guest() {
        let (ours, _host) = pair();
        let mut c = Connection::new_local(ours, CID, 1 << 30, 52);
        recv(&mut c, &mut []).unwrap();
        c.send_pkt(&guest_pkt(Op::Rst, &c), &[]);
        assert!(c.is_done());
        assert!(recv(&mut c, &mut []).is_none());
    }

    #[test]
    fn data_both_ways_within_credit() {
        let (mut c, mut host) = established_peer();
        // Guest -> host.
        let mut rw = guest_pkt(Op::Rw, &c);
        rw.set_len(5);
        c.send_pkt(&rw, b"hello");
        let mut got = [0u8; 16];
        let n = host.read(&mut got).unwrap();
        assert_eq!(&got[..n], b"hello");
        assert_eq!(c.stats().to_host, 5);
        // Host -> guest: only after the stream polls readable.
        host.write_all(b"world!").unwrap();
        assert!(!c.has_pending_rx());
        c.notify(true, false, false);
        assert!(c.has_pending_rx());
        let mut buf = [0u8; 4];
        let (h, n) = recv(&mut c, &mut buf).unwrap();
        assert_eq!((h.known_op(), h.len(), n), (Some(Op::Rw), 4, 4));
        assert_eq!(&buf, b"worl");
        assert_eq!(h.fwd_cnt(), 5, "every packet carries our fwd_cnt");
        let (h, n) = recv(&mut c, &mut buf).unwrap();
        assert_eq!((h.known_op(), n), (Some(Op::Rw), 2));
        assert_eq!(&buf[..2], b"d!");
        // Drained: nothing more, and the stream is polled again.
        assert!(recv(&mut c, &mut buf).is_none());
        assert!(c.interest().read);
    }

    #[test]
    fn host_reads_stop_at_guest_credit_and_resume_on_update() {
        let (ours, mut host) = pair();
        let mut req = VsockHeader::new((CID, 5000), (HOST_CID, 80), Op::Request);
        req.set_buf_alloc(8);
        let mut c = Connection::new_peer(ours, CID, &req);
        recv(&mut c, &mut []).unwrap();
        host.write_all(b"0123456789abcdef").unwrap();
        c.notify(true, false, false);
        let mut buf = [0u8; 64];
        let (_, n) = recv(&mut c, &mut buf).unwrap();
        assert_eq!(n, 8, "never more than the guest's credit");
        assert_eq!(c.peer_credit(), 0);
        // Out of credit: ask for more, and stop polling the host stream.
        let (h, _) = recv(&mut c, &mut buf).unwrap();
        assert_eq!(h.known_op(), Some(Op::CreditRequest));
        assert!(!c.interest().read);
        assert!(recv(&mut c, &mut buf).is_none());
        // The guest consumed 8 bytes.
        let mut upd = guest_pkt(Op::CreditUpdate, &c);
        upd.set_buf_alloc(8).set_fwd_cnt(8);
        c.send_pkt(&upd, &[]);
        assert!(c.interest().read);
        c.notify(true, false, false);
        let (_, n) = recv(&mut c, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"89abcdef");
    }

    #[test]
    fn guest_over_credit_is_reset_and_memory_stays_bounded() {
        let (mut c, host) = established_peer();
        // Fill the host socket's buffer so guest data has to be held by ember.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        while c.state() == State::Established && sent < 64 << 20 {
            let mut rw = guest_pkt(Op::Rw, &c);
            rw.set_len(chunk.len() as u32);
            c.send_pkt(&rw, &chunk);
            sent += chunk.len();
            assert!(c.buffered_to_host() <= CONN_BUF_ALLOC as usize);
        }
        assert_eq!(c.state(), State::Closed, "a guest ignoring credit is reset");
        let (h, _) = recv(&mut c, &mut []).unwrap();
        assert_eq!(h.known_op(), Some(Op::Rst));
        assert!(c.is_done());
        drop(host);
    }

    #[test]
    fn buffered_data_flushes_when_writable_and_credit_is_reported() {
        let (mut c, mut host) = established_peer();
        let chunk = vec![1u8; 32 * 1024];
        // Send until ember holds some bytes (the socket buffer is full), within credit.
        while c.buffered_to_host() == 0 {
            let mut rw = guest_pkt(Op::Rw, &c);
            rw.set_len(chunk.len() as u32);
            c.send_pkt(&rw, &chunk);
        }
        assert!(c.interest().write);
        let total = c.stats().to_host as usize + c.buffered_to_host();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        while got < total {
            match host.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.notify(false, true, false),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, total);
        assert_eq!(c.buffered_to_host(), 0);
        assert!(!c.interest().write);
        let mut last = None;
        while let Some((h, _)) = recv(&mut c, &mut []) {
            last = Some(h);
        }
        let h = last.expect("a credit update once the backlog drained");
        assert_eq!(h.known_op(), Some(Op::CreditUpdate));
        assert_eq!(h.fwd_cnt() as usize, total);
    }

    #[test]
    fn host_eof_becomes_shutdown_send_and_half_close_still_carries_guest_data() {
        let (mut c, mut host) = established_peer();
        host.write_all(b"last").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        c.notify(true, false, false);
        let mut buf = [0u8; 64];
        let (h, n) = recv(&mut c, &mut buf).unwrap();
        assert_eq!((h.known_op(), n), (Some(Op::Rw), 4));
        c.notify(true, false, false);
        let (h, _) = recv(&mut c, &mut buf).unwrap();
        assert_eq!(h.known_op(), Some(Op::Shutdown));
        assert_eq!(h.flags(), SHUTDOWN_SEND);
        assert!(!c.interest().read);
        // The guest can still answer over the other half.
        let mut rw = guest_pkt(Op::Rw, &c);
        rw.set_len(5);
        c.send_pkt(&rw, b"reply");
        let n = host.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"reply");
        // The guest finishes sending: host sees EOF, and with both halves done, RST.
        let mut sd = guest_pkt(Op::Shutdown, &c);
        sd.set_flags(SHUTDOWN_SEND);
        c.send_pkt(&sd, &[]);
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        let ops: Vec<_> = std::iter::from_fn(|| recv(&mut c, &mut buf))
            .map(|(h, _)| h.known_op())
            .collect();
        assert_eq!(ops.last(), Some(&Some(Op::Rst)), "{ops:?}");
        assert!(c.is_done());
    }

    #[test]
    fn guest_close_flushes_then_resets() {
        let (mut c, mut host) = established_peer();
        let mut rw = guest_pkt(Op::Rw, &c);
        rw.set_len(3);
        c.send_pkt(&rw, b"bye");
        let mut sd = guest_pkt(Op::Shutdown, &c);
        sd.set_flags(SHUTDOWN_RCV | SHUTDOWN_SEND);
        c.send_pkt(&sd, &[]);
        let (h, _) = recv(&mut c, &mut []).unwrap();
        assert_eq!(h.known_op(), Some(Op::Rst));
        assert!(c.is_done());
        let mut buf = [0u8; 8];
        let n = host.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"bye");
    }

    #[test]
    fn guest_reset_closes_without_reply_and_host_hangup_resets() {
        let (mut c, _host) = established_peer();
        c.send_pkt(&guest_pkt(Op::Rst, &c), &[]);
        assert!(c.is_done());
        assert!(recv(&mut c, &mut [0; 8]).is_none());

        let (mut c, host) = established_peer();
        drop(host);
        let mut rw = guest_pkt(Op::Rw, &c);
        rw.set_len(2);
        c.send_pkt(&rw, b"hi");
        let (h, _) = recv(&mut c, &mut []).unwrap();
        assert_eq!(
            h.known_op(),
            Some(Op::Rst),
            "write to a closed host stream resets"
        );
    }

    #[test]
    fn protocol_violations_reset() {
        // RESPONSE on an established connection.
        let (mut c, _h) = established_peer();
        c.send_pkt(&guest_pkt(Op::Response, &c), &[]);
        assert_eq!(recv(&mut c, &mut []).unwrap().0.known_op(), Some(Op::Rst));
        // Data before the guest accepted.
        let (ours, _h2) = pair();
        let mut c = Connection::new_local(ours, CID, 1 << 30, 52);
        recv(&mut c, &mut []).unwrap();
        let mut rw = guest_pkt(Op::Rw, &c);
        rw.set_len(1);
        c.send_pkt(&rw, b"x");
        assert_eq!(recv(&mut c, &mut []).unwrap().0.known_op(), Some(Op::Rst));
        // Unknown socket type, unknown op.
        let (mut c, _h3) = established_peer();
        let mut h = guest_pkt(Op::Rw, &c);
        h.set_type(2);
        c.send_pkt(&h, &[]);
        assert_eq!(recv(&mut c, &mut []).unwrap().0.known_op(), Some(Op::Rst));
        let (mut c, _h4) = established_peer();
        let mut h = guest_pkt(Op::Rw, &c);
        h.set_op_raw(42);
        c.send_pkt(&h, &[]);
        assert_eq!(recv(&mut c, &mut []).unwrap().0.known_op(), Some(Op::Rst));
    }

    #[test]
    fn timeout_resets() {
        // The guest got the request but never answered: it gets a RST.
        let (ours, mut host) = pair();
        let mut c = Connection::new_local(ours, CID, 1 << 30, 52);
        assert_eq!(
            recv(&mut c, &mut []).unwrap().0.known_op(),
            Some(Op::Request)
        );
        c.set_deadline(Some(Instant::now()));
        c.expire();
        let ops: Vec<_> = std::iter::from_fn(|| recv(&mut c, &mut []))
            .map(|(h, _)| h.known_op())
            .collect();
        assert_eq!(ops, vec![Some(Op::Rst)]);
        assert!(c.is_done());
        assert_eq!(
            host.read(&mut [0u8; 4]).unwrap(),
            0,
            "the host client sees EOF"
        );
        // The guest never saw the request: nothing to tell it, the connection is gone.
        let (ours, _h) = pair();
        let mut c = Connection::new_local(ours, CID, 1 << 30, 53);
        c.expire();
        assert!(c.is_done());
        assert!(recv(&mut c, &mut []).is_none());
    }
}
