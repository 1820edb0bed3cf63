// SPDX-License-Identifier: Apache-2.0
//! The host side of virtio-vsock: guest connections multiplexed onto Unix sockets, the way
//! Firecracker users know it.
//!
//! - Host -> guest: a host process connects to the Unix socket at `PATH` and writes
//!   `CONNECT <port>\n`; ember picks a host port P, sends the guest a REQUEST for `port`, and
//!   when the guest accepts writes `OK <P>\n` back. From then on the Unix stream carries the
//!   connection's bytes.
//! - Guest -> host: a guest connect to host (CID 2) port P connects to the Unix socket
//!   `PATH_P`; the guest gets a RESPONSE if that succeeds and a RST if not.
//!
//! The muxer owns an epoll set with the listener, every host stream and a timer; the device
//! polls that one fd in ember's event loop and calls [`Muxer::process_host_events`]. Memory is
//! bounded: at most [`MAX_CONNECTIONS`] connections, half of them for each side
//! ([`MAX_HOST_CONNECTIONS`], [`MAX_GUEST_CONNECTIONS`]: a host client connecting in a loop
//! cannot starve the guest, nor the reverse), each holding at most
//! [`CONN_BUF_ALLOC`](super::connection::CONN_BUF_ALLOC) bytes of guest data
//! ([`MAX_BUFFERED_TO_HOST`] in all), one pending packet of each kind per connection, and at
//! most [`MAX_PENDING_RSTS`] replies to packets for unknown connections (more are dropped: a
//! RST is advisory).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Interest, State, TO_HOST_CAPACITY};
use super::packet::{Op, VsockHeader, HOST_CID, TYPE_STREAM};
use super::VsockError;

/// Most connections (and pending `CONNECT` handshakes) at once, both sides together.
pub const MAX_CONNECTIONS: usize = 256;
/// Most connections the host side may have (established, waiting for the guest, or still
/// sending its `CONNECT` line): half the slots. More host clients are refused (their stream
/// is closed at once).
pub const MAX_HOST_CONNECTIONS: usize = MAX_CONNECTIONS / 2;
/// Most connections the guest may open: the other half. More get a RST.
pub const MAX_GUEST_CONNECTIONS: usize = MAX_CONNECTIONS - MAX_HOST_CONNECTIONS;
/// The most memory ember holds for host sockets that do not read, all connections together:
/// [`MAX_CONNECTIONS`] x [`TO_HOST_CAPACITY`] (64 KiB of guest data plus the `OK` line
/// each), about 16 MiB. Nothing is held the other way (host data is read straight into a
/// guest buffer, when the guest has given one and credit).
pub const MAX_BUFFERED_TO_HOST: usize = MAX_CONNECTIONS * TO_HOST_CAPACITY;
const _: () = assert!(MAX_BUFFERED_TO_HOST <= 17 << 20);
/// Most RST replies to unknown connections waiting for a guest buffer.
pub const MAX_PENDING_RSTS: usize = 64;
/// How long a host client has to send its `CONNECT` line, and the guest to answer a request.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long ember keeps a closed connection's unsent guest data for a host that is not
/// reading.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First host port handed to host-initiated connections (out of the way of listeners).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_TIMER: u64 = u64::MAX - 1;

/// A connection is named by its host-side and guest-side ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

/// A host client that has connected but not yet sent its whole `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What the muxer saw, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MuxerStats {
    /// Connections established (either direction).
    pub connections: u64,
    /// Guest packets dropped as malformed or misaddressed.
    pub bad_packets: u64,
    /// RST replies not sent because [`MAX_PENDING_RSTS`] were already waiting.
    pub dropped_rsts: u64,
    /// Connections refused because their side's share of [`MAX_CONNECTIONS`] was taken.
    pub refused_full: u64,
}

/// What [`Muxer::open_connections`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenConnections {
    /// Connections a host client asked for (established, or waiting for the guest to
    /// answer, or closing with data still to flush).
    pub from_host: usize,
    /// Connections the guest asked for (to a `PATH_<port>` listener).
    pub from_guest: usize,
    /// Host clients that have connected to `PATH` but not yet sent their whole `CONNECT`
    /// line.
    pub handshakes: usize,
    /// Host clients are waiting in the listener's backlog (connected, not yet accepted).
    pub backlog: bool,
}

impl OpenConnections {
    /// No connection, no host client: nothing a snapshot would lose.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl std::fmt::Display for OpenConnections {
    /// E.g. `2 connections open (1 from the host, 1 from the guest), 1 host client in its
    /// CONNECT handshake`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let mut parts = Vec::new();
        let conns = self.from_host + self.from_guest;
        if conns > 0 {
            parts.push(format!(
                "{conns} connection{} open ({} from the host, {} from the guest)",
                plural(conns),
                self.from_host,
                self.from_guest
            ));
        }
        if self.handshakes > 0 {
            parts.push(format!(
                "{} host client{} in {} CONNECT handshake",
                self.handshakes,
                plural(self.handshakes),
                if self.handshakes == 1 { "its" } else { "their" }
            ));
        }
        if self.backlog {
            parts.push("host clients waiting to be accepted".into());
        }
        if parts.is_empty() {
            parts.push("no connection open".into());
        }
        f.write_str(&parts.join(", "))
    }
}

/// Guest connections multiplexed onto host Unix sockets.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: Option<Instant>,
    conns: HashMap<ConnKey, Connection<UnixStream>>,
    /// Host stream fd -> connection.
    by_fd: HashMap<RawFd, ConnKey>,
    /// What each connection's fd is registered for (absent: not in the epoll set).
    registered: HashMap<ConnKey, Interest>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections that may have a packet for the guest, oldest first.
    rxq: VecDeque<ConnKey>,
    in_rxq: HashSet<ConnKey>,
    /// RSTs for packets that matched no connection.
    rsts: VecDeque<VsockHeader>,
    next_local_port: u32,
    stats: MuxerStats,
}

impl AsRawFd for Muxer {
    /// The epoll fd to poll for host-side events.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Muxer {
    /// Listens on `uds_path` (which must not exist, or be a stale socket: see
    /// [`super::VsockConfig::validate`]) for a guest with CID `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        listener.set_nonblocking(true).map_err(VsockError::Host)?;
        let epoll = Epoll::new().map_err(VsockError::Host)?;
        let timer = TimerFd::new()
            .map_err(|e| VsockError::Host(io::Error::from_raw_os_error(e.errno())))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(VsockError::Host)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )
            .map_err(VsockError::Host)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            timer,
            timer_armed: None,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            registered: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            in_rxq: HashSet::new(),
            rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            stats: MuxerStats::default(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Counters.
    pub fn stats(&self) -> MuxerStats {
        self.stats
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Every connection ember holds, and host clients it has not finished (or started)
    /// taking: what a snapshot cannot carry ([`OpenConnections::is_empty`] when there is
    /// nothing). Host clients still in the listener's backlog (connected, not yet accepted by
    /// ember) are seen with a poll of the listener, which takes nothing from it.
    pub fn open_connections(&self) -> OpenConnections {
        let from_host = self.conns.values().filter(|c| c.host_initiated()).count();
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the whole call, timeout 0 (no wait); poll only writes
        // its revents.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        OpenConnections {
            from_host,
            from_guest: self.conns.len() - from_host,
            handshakes: self.handshakes.len(),
            backlog: ready > 0 && pfd.revents & libc::POLLIN != 0,
        }
    }

    /// Whether a packet for the guest may be waiting ([`Self::recv_pkt`] may still find
    /// none).
    pub fn has_pending_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rxq.is_empty()
    }

    /// Handles whatever is ready on the host side, without blocking.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                self.handle_event(ev.data(), ev.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn handle_event(&mut self, token: u64, set: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_all(),
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                self.timer_armed = None;
                self.sweep_deadlines();
            }
            fd => {
                let Ok(fd) = RawFd::try_from(fd) else { return };
                if self.handshakes.contains_key(&fd) {
                    self.read_handshake(fd);
                } else if let Some(&key) = self.by_fd.get(&fd) {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.notify(
                            set.contains(EventSet::IN),
                            set.contains(EventSet::OUT),
                            set.intersects(EventSet::HANG_UP | EventSet::ERROR),
                        );
                    }
                    self.update(key);
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.host_slots_used() >= MAX_HOST_CONNECTIONS {
                        self.stats.refused_full += 1;
                        crate::guest_warn!(
                            "vsock: {MAX_HOST_CONNECTIONS} host connections open: refusing \
                             a host connection on {}",
                            self.uds_path.display()
                        );
                        continue; // dropping the stream closes it
                    }
                    if let Err(e) = self.add_handshake(stream) {
                        crate::guest_warn!("vsock: cannot take a host connection: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::guest_warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    fn add_handshake(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let fd = stream.as_raw_fd();
        let fd_token = u64::try_from(fd).map_err(|_| io::Error::other("negative fd"))?;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd_token),
        )?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        self.handshakes.insert(
            fd,
            Handshake {
                stream,
                line: Vec::new(),
                deadline,
            },
        );
        self.arm_timer(deadline);
        Ok(())
    }

    /// Reads the `CONNECT` line byte by byte, so that data the client sends right after it
    /// stays in the socket for the guest.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed before its CONNECT line"),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => break Err("line too long"),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        match port {
            Ok(peer_port) => {
                let local_port = self.allocate_local_port();
                let key = ConnKey {
                    local_port,
                    peer_port,
                };
                let mut conn =
                    Connection::new_local(hs.stream, self.guest_cid, local_port, peer_port);
                conn.set_deadline(Some(Instant::now() + HANDSHAKE_TIMEOUT));
                log::debug!(
                    "vsock: host connects to guest port {peer_port} (host port {local_port})"
                );
                self.conns.insert(key, conn);
                self.by_fd.insert(fd, key);
                self.update(key);
            }
            Err(why) => {
                crate::guest_warn!(
                    "vsock: host client on {}: {why}: expected `CONNECT <port>\\n`",
                    self.uds_path.display()
                );
            }
        }
    }

    /// Slots the host side holds: its connections and the clients still in handshake.
    fn host_slots_used(&self) -> usize {
        self.handshakes.len() + self.conns.values().filter(|c| c.host_initiated()).count()
    }

    /// Slots the guest holds: the connections it asked for.
    fn guest_slots_used(&self) -> usize {
        self.conns.values().filter(|c| !c.host_initiated()).count()
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    /// A packet from the guest (its tx queue). `payload` holds the bytes after the header,
    /// `hdr.len()` of them for RW (the caller bounds and checks that).
    pub fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        if hdr.src_cid() != self.guest_cid || hdr.dst_cid() != HOST_CID {
            // Not from this guest, or not for the host: there is no one to answer.
            self.stats.bad_packets += 1;
            log::debug!(
                "vsock: dropping a packet from CID {} to CID {}",
                hdr.src_cid(),
                hdr.dst_cid()
            );
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port(),
            peer_port: hdr.src_port(),
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let was = conn.state();
            conn.send_pkt(hdr, payload);
            if was == State::LocalInit && conn.state() == State::Established {
                self.stats.connections += 1;
            }
            self.update(key);
            return;
        }
        match hdr.known_op() {
            Some(Op::Rst) => {}
            Some(Op::Request) if hdr.type_() == TYPE_STREAM => self.guest_connect(hdr, key),
            _ => self.reply_rst(hdr),
        }
    }

    fn guest_connect(&mut self, hdr: &VsockHeader, key: ConnKey) {
        if self.guest_slots_used() >= MAX_GUEST_CONNECTIONS {
            self.stats.refused_full += 1;
            crate::guest_warn!(
                "vsock: {MAX_GUEST_CONNECTIONS} guest connections open: refusing a guest \
                 connection"
            );
            self.reply_rst(hdr);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                log::debug!(
                    "vsock: guest port {} connected to {}",
                    key.peer_port,
                    path.display()
                );
                let fd = stream.as_raw_fd();
                let conn = Connection::new_peer(stream, self.guest_cid, hdr);
                self.stats.connections += 1;
                self.conns.insert(key, conn);
                self.by_fd.insert(fd, key);
                self.update(key);
            }
            Err(e) => {
                log::debug!(
                    "vsock: guest connect to host port {}: {}: {e}",
                    key.local_port,
                    path.display()
                );
                self.reply_rst(hdr);
            }
        }
    }

    fn reply_rst(&mut self, to: &VsockHeader) {
        if to.known_op() == Some(Op::Rst) {
            return;
        }
        if self.rsts.len() >= MAX_PENDING_RSTS {
            self.stats.dropped_rsts += 1;
            return;
        }
        let mut h = VsockHeader::new(
            (HOST_CID, to.dst_port()),
            (self.guest_cid, to.src_port()),
            Op::Rst,
        );
        h.set_type(to.type_());
        self.rsts.push_back(h);
    }

    /// The next packet for the guest (its rx queue): the header goes to `hdr`, RW payload
    /// into `buf`; returns the payload length, or None when nothing is ready.
    ///
    /// Each connection waiting to send is asked once per call: one that has nothing that
    /// fits `buf` (data, and `buf` has no room for payload) goes back to the end of the
    /// queue and the call ends with None when no connection had a packet, instead of asking
    /// it again forever.
    pub fn recv_pkt(&mut self, hdr: &mut VsockHeader, buf: &mut [u8]) -> Option<usize> {
        if let Some(h) = self.rsts.pop_front() {
            *hdr = h;
            return Some(0);
        }
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            self.in_rxq.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let got = conn.recv_pkt(hdr, buf);
            self.update(key);
            if got.is_some() {
                return got;
            }
        }
        None
    }

    /// Brings the epoll registration, the rx queue and the timer in line with a connection's
    /// state, and drops it when it is over.
    fn update(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        if conn.is_done() {
            if self.registered.remove(&key).is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.by_fd.remove(&fd);
            self.conns.remove(&key);
            log::debug!(
                "vsock: connection {}<->{} closed",
                key.local_port,
                key.peer_port
            );
            return;
        }
        let want = conn.interest();
        let have = self.registered.get(&key).copied();
        if have != Some(want) {
            let mut set = EventSet::empty();
            if want.read {
                set |= EventSet::IN;
            }
            if want.write {
                set |= EventSet::OUT;
            }
            let ev = EpollEvent::new(set, u64::try_from(fd).unwrap_or(0));
            // An fd in the epoll set always reports HUP/ERR: with nothing to wait for, it
            // leaves the set so that a hung-up peer cannot make the loop spin.
            let res = match (have.is_some(), set.is_empty()) {
                (false, true) => Ok(()),
                (false, false) => self.epoll.ctl(ControlOperation::Add, fd, ev),
                (true, true) => self.epoll.ctl(ControlOperation::Delete, fd, ev),
                (true, false) => self.epoll.ctl(ControlOperation::Modify, fd, ev),
            };
            match res {
                Ok(()) if set.is_empty() => {
                    self.registered.remove(&key);
                }
                Ok(()) => {
                    self.registered.insert(key, want);
                }
                Err(e) => crate::guest_warn!("vsock: epoll_ctl failed: {e}"),
            }
        }
        let pending = conn.has_pending_rx();
        if let Some(d) = conn.deadline() {
            self.arm_timer(d);
        }
        if pending && self.in_rxq.insert(key) {
            self.rxq.push_back(key);
        }
    }

    fn arm_timer(&mut self, at: Instant) {
        if self.timer_armed.is_some_and(|t| t <= at) {
            return;
        }
        let dur = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(dur, None) {
            Ok(()) => self.timer_armed = Some(at),
            Err(e) => log::warn!("vsock: cannot arm the timeout timer: {e}"),
        }
    }

    fn sweep_deadlines(&mut self) {
        let now = Instant::now();
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.handshakes.remove(&fd);
            crate::guest_warn!("vsock: host client sent no CONNECT line in time");
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in late {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.expire();
            }
            self.update(key);
        }
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(Connection::deadline))
            .min();
        if let Some(at) = next {
            self.arm_timer(at);
        }
    }

    /// The guest driver reset the device (or went away): every connection is closed; host
    /// clients see their streams end.
    pub fn reset(&mut self) {
        for (key, conn) in self.conns.drain() {
            if self.registered.remove(&key).is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream().as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        self.by_fd.clear();
        self.registered.clear();
        self.rxq.clear();
        self.in_rxq.clear();
        self.rsts.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Parses `CONNECT <port>` (the line without its newline).
fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "not text")?;
    let port = line
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .ok_or("not a CONNECT line")?;
    port.trim().parse().map_err(|_| "bad port number")
}

/// The Unix socket a guest connect to host port `port` goes to: `PATH_port`.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_os_string();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects a non-blocking Unix stream socket to `path` without waiting: a listener whose
/// backlog is full refuses instead of stalling ember's event loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all-zero is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns; the UnixStream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is a live socket.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::connection::CONN_BUF_ALLOC;
    use super::super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};
    use super::*;

    const CID: u64 = 3;

    struct Fixture {
        dir: PathBuf,
        mux: Muxer,
    }

    impl Fixture {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ember-mux-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mux = Muxer::new(CID, &dir.join("v.sock")).unwrap();
            Self { dir, mux }
        }

        fn uds(&self) -> PathBuf {
            self.dir.join("v.sock")
        }

        /// Polls the muxer until `f` holds (bounded: a broken muxer fails, not hangs).
        fn pump_until(&mut self, mut f: impl FnMut(&mut Muxer) -> bool) {
            for _ in 0..2000 {
                self.mux.process_host_events();
                if f(&mut self.mux) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            panic!("condition not reached");
        }

        fn next_pkt(&mut self, buf: &mut [u8]) -> (VsockHeader, usize) {
            let mut out = None;
            self.pump_until(|m| {
                let mut h = VsockHeader::default();
                out = m.recv_pkt(&mut h, buf).map(|n| (h, n));
                out.is_some()
            });
            out.unwrap()
        }

        fn no_pkt(&mut self) {
            self.mux.process_host_events();
            let mut h = VsockHeader::default();
            let got = self.mux.recv_pkt(&mut h, &mut [0; 64]);
            assert!(got.is_none(), "unexpected {:?}", h.known_op());
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn from_guest(op: Op, guest_port: u32, host_port: u32) -> VsockHeader {
        let mut h = VsockHeader::new((CID, guest_port), (HOST_CID, host_port), op);
        h.set_buf_alloc(CONN_BUF_ALLOC);
        h
    }

    fn read_line(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn host_initiated_connection_round_trip() {
        let mut f = Fixture::new("host");
        let mut client = UnixStream::connect(f.uds()).unwrap();
        // Data written right after the CONNECT line must reach the guest too.
        client.write_all(b"CONNECT 52\nearly").unwrap();
        let (req, _) = f.next_pkt(&mut []);
        assert_eq!(req.known_op(), Some(Op::Request));
        assert_eq!(
            (req.dst_cid(), req.dst_port(), req.src_cid()),
            (CID, 52, HOST_CID)
        );
        let host_port = req.src_port();
        assert!(host_port >= FIRST_LOCAL_PORT);
        // The guest accepts.
        f.mux
            .send_pkt(&from_guest(Op::Response, 52, host_port), &[]);
        assert_eq!(read_line(&mut client), format!("OK {host_port}"));
        // Host -> guest.
        let mut buf = [0u8; 64];
        let (rw, n) = f.next_pkt(&mut buf);
        assert_eq!((rw.known_op(), rw.dst_port()), (Some(Op::Rw), 52));
        assert_eq!(&buf[..n], b"early");
        // Guest -> host.
        let mut rw = from_guest(Op::Rw, 52, host_port);
        rw.set_len(4);
        f.mux.send_pkt(&rw, b"pong");
        let mut got = [0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(f.mux.stats().connections, 1);
        // The guest closes: the host sees EOF, the guest gets RST.
        let mut sd = from_guest(Op::Shutdown, 52, host_port);
        sd.set_flags(SHUTDOWN_RCV | SHUTDOWN_SEND);
        f.mux.send_pkt(&sd, &[]);
        let (rst, _) = f.next_pkt(&mut buf);
        assert_eq!(rst.known_op(), Some(Op::Rst));
        assert_eq!(client.read(&mut got).unwrap(), 0);
        assert_eq!(f.mux.connection_count(), 0);
    }

    #[test]
    fn host_connect_refused_by_guest_closes_client() {
        let mut f = Fixture::new("refused");
        let mut client = UnixStream::connect(f.uds()).unwrap();
        client.write_all(b"CONNECT 9\n").unwrap();
        let (req, _) = f.next_pkt(&mut []);
        f.mux.send_pkt(&from_guest(Op::Rst, 9, req.src_port()), &[]);
        assert_eq!(f.mux.connection_count(), 0);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            client.read(&mut [0u8; 8]).unwrap(),
            0,
            "client sees EOF, no OK"
        );
        f.no_pkt();
    }

    #[test]
    fn bad_connect_lines_are_dropped() {
        let mut f = Fixture::new("badline");
        for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'A'; 100]] {
            let mut c = UnixStream::connect(f.uds()).unwrap();
            c.write_all(line).unwrap();
            c.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 8];
            let mut got = None;
            f.pump_until(|_| {
                got = c.read(&mut buf).ok();
                got.is_some()
            });
            assert_eq!(got, Some(0), "client dropped");
        }
        f.no_pkt();
        assert_eq!(f.mux.connection_count(), 0);
    }

    #[test]
    fn guest_initiated_connection_to_port_path() {
        let mut f = Fixture::new("guest");
        let listener = UnixListener::bind(port_path(&f.uds(), 1234)).unwrap();
        f.mux.send_pkt(&from_guest(Op::Request, 7000, 1234), &[]);
        let (resp, _) = f.next_pkt(&mut []);
        assert_eq!(resp.known_op(), Some(Op::Response));
        assert_eq!((resp.src_port(), resp.dst_port()), (1234, 7000));
        let (mut server, _) = listener.accept().unwrap();
        let mut rw = from_guest(Op::Rw, 7000, 1234);
        rw.set_len(3);
        f.mux.send_pkt(&rw, b"abc");
        let mut got = [0u8; 3];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        server.write_all(b"xyz").unwrap();
        let mut buf = [0u8; 16];
        let (h, n) = f.next_pkt(&mut buf);
        assert_eq!((h.known_op(), &buf[..n]), (Some(Op::Rw), &b"xyz"[..]));
        // The host side closes: the guest gets SHUTDOWN(SEND).
        drop(server);
        let (h, _) = f.next_pkt(&mut buf);
        assert_eq!(h.known_op(), Some(Op::Shutdown));
        assert_eq!(h.flags() & SHUTDOWN_SEND, SHUTDOWN_SEND);
    }

    #[test]
    fn unknown_port_and_unknown_connection_get_rst() {
        let mut f = Fixture::new("unknown");
        // Nobody listens on PATH_4321.
        f.mux.send_pkt(&from_guest(Op::Request, 7000, 4321), &[]);
        let (h, _) = f.next_pkt(&mut []);
        assert_eq!(h.known_op(), Some(Op::Rst));
        assert_eq!((h.src_port(), h.dst_port(), h.dst_cid()), (4321, 7000, CID));
        // Data for a connection that does not exist.
        let mut rw = from_guest(Op::Rw, 7001, 80);
        rw.set_len(1);
        f.mux.send_pkt(&rw, b"x");
        assert_eq!(f.next_pkt(&mut []).0.known_op(), Some(Op::Rst));
        // A RST for nothing is not answered.
        f.mux.send_pkt(&from_guest(Op::Rst, 7002, 80), &[]);
        f.no_pkt();
        // Packets from another CID or for another destination are dropped silently.
        let mut h = from_guest(Op::Request, 7003, 80);
        h.set_src_cid(99);
        f.mux.send_pkt(&h, &[]);
        let mut h = from_guest(Op::Request, 7003, 80);
        h.set_dst_cid(5);
        f.mux.send_pkt(&h, &[]);
        f.no_pkt();
        assert_eq!(f.mux.stats().bad_packets, 2);
    }

    #[test]
    fn rst_flood_without_guest_buffers_stays_bounded() {
        let mut f = Fixture::new("flood");
        for port in 0..10_000u32 {
            f.mux.send_pkt(&from_guest(Op::Request, port, 4321), &[]);
        }
        assert!(f.mux.rsts.len() <= MAX_PENDING_RSTS);
        assert_eq!(f.mux.stats().dropped_rsts, 10_000 - MAX_PENDING_RSTS as u64);
    }

    #[test]
    fn host_flood_waits_for_guest_buffers() {
        let mut f = Fixture::new("hostflood");
        let listener = UnixListener::bind(port_path(&f.uds(), 1)).unwrap();
        f.mux.send_pkt(&from_guest(Op::Request, 7000, 1), &[]);
        f.next_pkt(&mut []);
        let (mut server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        // The host writes as much as its socket takes; the guest never reads.
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0usize;
        while let Ok(n) = server.write(&chunk) {
            written += n;
        }
        assert!(written > 0);
        // ember holds nothing for it: it polls, sees data, and waits for a guest buffer.
        for _ in 0..100 {
            f.mux.process_host_events();
        }
        assert!(f.mux.has_pending_rx());
        assert_eq!(
            f.mux
                .conns
                .values()
                .map(|c| c.stats().to_guest)
                .sum::<u64>(),
            0
        );
        // And its epoll set is quiet (no busy loop): the stream is out of it until read.
        let mut events = [EpollEvent::default(); 4];
        assert_eq!(f.mux.epoll.wait(0, &mut events).unwrap(), 0);
    }

    #[test]
    fn handshake_timeout_drops_silent_client() {
        let mut f = Fixture::new("silent");
        let mut c = UnixStream::connect(f.uds()).unwrap();
        f.mux.process_host_events();
        assert_eq!(f.mux.handshakes.len(), 1);
        // Pretend time passed.
        for h in f.mux.handshakes.values_mut() {
            h.deadline = Instant::now();
        }
        f.mux.sweep_deadlines();
        assert!(f.mux.handshakes.is_empty());
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
    }

    #[test]
    fn parse_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"connect 52").is_err());
        assert!(parse_connect(b"CONNECT 99999999999").is_err());
        assert_eq!(
            port_path(Path::new("/tmp/v.sock"), 52),
            PathBuf::from("/tmp/v.sock_52")
        );
    }

    #[test]
    fn reset_closes_everything() {
        let mut f = Fixture::new("reset");
        let listener = UnixListener::bind(port_path(&f.uds(), 1)).unwrap();
        f.mux.send_pkt(&from_guest(Op::Request, 7000, 1), &[]);
        let (mut server, _) = listener.accept().unwrap();
        assert_eq!(f.mux.connection_count(), 1);
        f.mux.reset();
        assert_eq!(f.mux.connection_count(), 0);
        assert!(!f.mux.has_pending_rx());
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(server.read(&mut [0u8; 1]).unwrap(), 0);
    }

    /// Guest connections to a host listener that accepts but never reads, each sending as
    /// much as its credit allows: what ember holds for them stays under the bound.
    #[test]
    fn non_reading_listener_keeps_buffered_bytes_bounded() {
        let mut f = Fixture::new("noread");
        let listener = UnixListener::bind(port_path(&f.uds(), 1)).unwrap();
        let mut servers = Vec::new();
        let chunk = vec![0x5au8; 32 * 1024];
        let mut established = 0;
        for port in 0..512u32 {
            f.mux
                .send_pkt(&from_guest(Op::Request, 10_000 + port, 1), &[]);
            // The answer (credit updates for earlier connections may come first).
            let h = loop {
                let (h, _) = f.next_pkt(&mut []);
                if h.dst_port() == 10_000 + port {
                    break h;
                }
            };
            if h.known_op() != Some(Op::Response) {
                assert_eq!(h.known_op(), Some(Op::Rst));
                continue;
            }
            established += 1;
            // Accepted, never read.
            servers.push(listener.accept().unwrap().0);
            let key = ConnKey {
                local_port: 1,
                peer_port: 10_000 + port,
            };
            // A guest that respects its credit: at most buf_alloc bytes not yet forwarded.
            let credit = h.buf_alloc() as usize;
            for _ in 0..64 {
                let held = f.mux.conns[&key].buffered_to_host();
                if held + chunk.len() > credit {
                    break;
                }
                let mut rw = from_guest(Op::Rw, 10_000 + port, 1);
                rw.set_len(chunk.len() as u32);
                f.mux.send_pkt(&rw, &chunk);
            }
            assert_eq!(f.mux.conns[&key].state(), State::Established);
        }
        assert!(established > 0);
        let total: usize = f.mux.conns.values().map(|c| c.buffered_to_host()).sum();
        let memory: usize = f.mux.conns.values().map(|c| c.buffer_capacity()).sum();
        assert!(
            total <= memory && memory <= MAX_BUFFERED_TO_HOST && memory <= 17 << 20,
            "{established} connections hold {total} bytes ({memory} allocated) for the host"
        );
    }

    /// One host client opening connection after connection cannot take the slots the guest
    /// needs for its own connections.
    #[test]
    fn one_host_client_cannot_take_every_slot() {
        let mut f = Fixture::new("hostslots");
        let mut clients = Vec::new();
        for _ in 0..512 {
            let mut c = UnixStream::connect(f.uds()).unwrap();
            c.write_all(b"CONNECT 52\n").unwrap();
            clients.push(c);
            f.mux.process_host_events();
        }
        for _ in 0..10 {
            f.mux.process_host_events();
        }
        assert!(f.mux.connection_count() + f.mux.handshakes.len() <= MAX_HOST_CONNECTIONS);
        assert!(f.mux.stats().refused_full > 0);
        // The guest can still connect out.
        let listener = UnixListener::bind(port_path(&f.uds(), 1)).unwrap();
        f.mux.send_pkt(&from_guest(Op::Request, 7000, 1), &[]);
        let mut buf = [0u8; 16];
        let mut answer = None;
        f.pump_until(|m| {
            let mut h = VsockHeader::default();
            while m.recv_pkt(&mut h, &mut buf).is_some() {
                if h.dst_port() == 7000 {
                    answer = h.known_op();
                    return true;
                }
            }
            false
        });
        assert_eq!(answer, Some(Op::Response));
        drop(listener);
    }
}
