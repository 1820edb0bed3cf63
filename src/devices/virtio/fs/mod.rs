// SPDX-License-Identifier: Apache-2.0
//! virtio-fs (device ID 26): a host directory in the guest (`mount -t virtiofs TAG /mnt`),
//! served by an external `virtiofsd` over vhost-user.
//!
//! ember is the vhost-user *frontend* (the `vhost` crate's [`Frontend`]): it owns the
//! virtio-mmio register file like for every other device, and when the driver sets
//! DRIVER_OK it hands the queues to virtiofsd — the guest memory map (the memory file of
//! [`crate::memory::create_shared_guest_memory`], which virtiofsd maps), each ring's
//! addresses, the queue notification eventfds (KVM ioeventfds: guest kicks go straight to
//! virtiofsd) and one "call" eventfd per queue, which ember's event loop turns into the
//! device's interrupt (with the virtio-mmio interrupt-status bit the Linux driver checks).
//! ember never walks these queues itself: virtiofsd does, and it treats guest memory and
//! descriptors as hostile (it bounds every address by the memory map it was given).
//!
//! Why an external virtiofsd (the README's dependency section has the evidence): it is the
//! reference virtio-fs server, and its sandbox is what makes the security requirements hold:
//! it `pivot_root`s into the shared directory inside its own mount, PID and network
//! namespaces (so `..`, absolute symlinks and symlink races cannot reach anything outside
//! the directory: there is nothing outside it in the daemon's view), it opens only regular
//! files and directories for the guest (a device node in the directory is never opened on
//! the host), runs under a seccomp filter, and `--readonly` refuses every modification on
//! the host side. ember adds `--modcaps=-mknod` (the guest cannot create device nodes) and
//! never runs it with `--sandbox none`.
//!
//! Life of the daemon: started when the device is built, on a socket ember bound and
//! connected before the daemon started (so there is no wait for a socket file, and the
//! socket's name is removed at once); it serves that one connection and exits when ember
//! closes it; ember also kills it when the device is dropped.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{QueueState, QueueT};
use vm_memory::{Address as _, GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateContext, ActivateError, ActivationEvent, Interrupt, VirtioDevice, ACTIVATION_TOKEN,
    EVENT_IDX,
};
use crate::config::{ShareConfig, MAX_SHARE_TAG};
use crate::snapshot::devices::{FsState, VirtioDeviceState};
use crate::snapshot::format::SnapshotError;

/// The virtio device ID of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Queues: one high-priority queue (FUSE interrupts and forgets) and one request queue.
pub const NUM_QUEUES: usize = 2;
/// Size of each queue (virtiofsd's own maximum).
pub const QUEUE_SIZE: u16 = 1024;
/// `VIRTIO_RING_F_INDIRECT_DESC` as a mask: virtiofsd walks indirect tables itself.
const INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// The environment variable that names the virtiofsd binary.
pub const VIRTIOFSD_ENV: &str = "EMBER_VIRTIOFSD";
/// Event-loop tokens of the call eventfds: `CALL_TOKEN_BASE + queue index`.
const CALL_TOKEN_BASE: u32 = 0x100;
/// The fd number the listening socket has in the daemon (`virtiofsd --fd`).
const DAEMON_LISTEN_FD: i32 = 3;

/// Errors while setting up a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No virtiofsd binary was found.
    #[error(
        "--share needs virtiofsd (the virtio-fs daemon), which was not found in \
         ${VIRTIOFSD_ENV}, PATH, ~/.cargo/bin or /usr/libexec: install it with `apt-get \
         install libseccomp-dev libcap-ng-dev && cargo install --locked virtiofsd`, or set \
         {VIRTIOFSD_ENV}=PATH"
    )]
    NoDaemon,
    /// Creating the socket, an eventfd or the process failed.
    #[error("virtio-fs {tag}: {what}: {source}")]
    Io {
        /// The share's tag.
        tag: String,
        /// What was being done.
        what: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The daemon refused the vhost-user set-up, or died.
    #[error(
        "virtio-fs {tag}: virtiofsd ({daemon}) {what}: {why} (its own message, if any, is \
         above)"
    )]
    Daemon {
        /// The share's tag.
        tag: String,
        /// The binary.
        daemon: String,
        /// What was being done.
        what: &'static str,
        /// What went wrong.
        why: String,
    },
}

/// Finds the virtiofsd binary: `$EMBER_VIRTIOFSD`, then `virtiofsd` on PATH, then
/// `~/.cargo/bin/virtiofsd` (where `cargo install virtiofsd` puts it), then
/// `/usr/libexec/virtiofsd` (distribution packages). QEMU's old C daemon
/// (`/usr/lib/qemu/virtiofsd`) has another command line and is not used.
pub fn find_virtiofsd() -> Result<PathBuf, FsError> {
    if let Some(p) = std::env::var_os(VIRTIOFSD_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(FsError::NoDaemon)
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/virtiofsd"));
    }
    candidates.push(PathBuf::from("/usr/libexec/virtiofsd"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(FsError::NoDaemon)
}

/// The virtiofsd command line for `share` (without the socket).
pub fn daemon_args(share: &ShareConfig) -> Vec<String> {
    let mut args = vec![
        "--shared-dir".to_string(),
        share.dir.to_string_lossy().into_owned(),
        format!("--cache={}", share.cache.as_str()),
        // The sandbox is what keeps the guest inside the directory: never "none".
        "--sandbox=namespace".to_string(),
        "--seccomp=kill".to_string(),
        // No device nodes from the guest (only matters when ember runs as root).
        "--modcaps=-mknod".to_string(),
        "--log-level=error".to_string(),
        // Leave ember's open-file limit alone (and no warning about it on every start).
        "--rlimit-nofile=0".to_string(),
    ];
    if share.readonly {
        args.push("--readonly".to_string());
    }
    args
}

/// The configuration space: the tag (36 bytes, NUL-padded) and `num_request_queues` (u32).
pub fn config_space(tag: &str) -> Vec<u8> {
    let mut c = vec![0u8; MAX_SHARE_TAG + 4];
    let n = tag.len().min(MAX_SHARE_TAG);
    c[..n].copy_from_slice(&tag.as_bytes()[..n]);
    c[MAX_SHARE_TAG..].copy_from_slice(&1u32.to_le_bytes());
    c
}

/// The running daemon and ember's end of its socket.
struct Daemon {
    child: Child,
    frontend: Frontend,
    path: String,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("pid", &self.child.id())
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // It exits when the connection closes; this makes sure, and reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the device holds while the driver has it running.
#[derive(Debug)]
struct Active {
    interrupt: Arc<Interrupt>,
    /// The queues handed to the daemon (for a reset: which rings to stop).
    enabled: Vec<usize>,
    /// Guest memory and each queue's (avail ring, used ring) addresses: a snapshot checks
    /// that the guest never used the queues.
    mem: crate::memory::GuestMemory,
    rings: Vec<(GuestAddress, GuestAddress)>,
}

/// A virtio-fs device backed by a virtiofsd process.
#[derive(Debug)]
pub struct VirtioFs {
    tag: String,
    config: Vec<u8>,
    daemon: Daemon,
    /// Features the daemon offers (without `VHOST_USER_F_PROTOCOL_FEATURES`).
    backend_features: u64,
    activation: ActivationEvent,
    /// The context of the latest activation, until the event loop has handed it over.
    pending: Option<ActivateContext>,
    /// One per queue: the daemon signals it when it used buffers.
    call_evts: Vec<EventFd>,
    calls_registered: bool,
    active: Option<Active>,
}

impl VirtioFs {
    /// Starts virtiofsd for `share` (with mount tag `tag`) and negotiates the vhost-user
    /// basics with it.
    pub fn new(share: &ShareConfig, tag: &str) -> Result<Self, FsError> {
        let daemon_path = find_virtiofsd()?;
        let io = |what: &str| {
            let tag = tag.to_string();
            let what = what.to_string();
            move |source| FsError::Io { tag, what, source }
        };
        // Bind and connect before the daemon runs: the connection waits in the backlog, and
        // the name is removed at once (nothing is left behind, nothing else can connect).
        let dir = std::env::temp_dir();
        let sock_path = dir.join(format!(
            "ember-{}-virtiofs-{}.sock",
            std::process::id(),
            unique()
        ));
        let listener = UnixListener::bind(&sock_path)
            .map_err(io(&format!("cannot bind {}", sock_path.display())))?;
        let stream = UnixStream::connect(&sock_path);
        let _ = std::fs::remove_file(&sock_path);
        let stream = stream.map_err(io("cannot connect to the daemon's socket"))?;
        let listen_fd: OwnedFd = listener.into();
        let raw_listen = listen_fd.as_raw_fd();

        let mut cmd = Command::new(&daemon_path);
        cmd.args(daemon_args(share))
            .arg(format!("--fd={DAEMON_LISTEN_FD}"))
            .stdin(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls dup2 and
        // fcntl, which are async-signal-safe; `raw_listen` stays open in the parent until
        // after spawn.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 clears FD_CLOEXEC on the new descriptor, so the daemon inherits it;
                // when the socket already is fd 3, dup2 does nothing and the flag is
                // cleared by hand.
                let r = if raw_listen == DAEMON_LISTEN_FD {
                    libc::fcntl(DAEMON_LISTEN_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(raw_listen, DAEMON_LISTEN_FD)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(io(&format!("cannot start {}", daemon_path.display())))?;
        drop(listen_fd);
        let frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        let daemon = Daemon {
            child,
            frontend,
            path: daemon_path.display().to_string(),
        };
        let fail = |what: &'static str, why: String| FsError::Daemon {
            tag: tag.to_string(),
            daemon: daemon.path.clone(),
            what,
            why,
        };
        daemon
            .frontend
            .set_owner()
            .map_err(|e| fail("refused SET_OWNER", e.to_string()))?;
        let features = daemon
            .frontend
            .get_features()
            .map_err(|e| fail("did not answer GET_FEATURES", e.to_string()))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & protocol == 0 || features & super::VERSION_1 == 0 {
            return Err(fail(
                "offers features ember cannot use",
                format!("{features:#x} lacks VERSION_1 or PROTOCOL_FEATURES"),
            ));
        }
        let mut dev = Self {
            tag: tag.to_string(),
            config: config_space(tag),
            daemon,
            backend_features: features & !protocol,
            activation: ActivationEvent::new().map_err(io("cannot create an eventfd"))?,
            pending: None,
            call_evts: Vec::with_capacity(NUM_QUEUES),
            calls_registered: false,
            active: None,
        };
        for _ in 0..NUM_QUEUES {
            dev.call_evts
                .push(EventFd::new(EFD_NONBLOCK).map_err(io("cannot create an eventfd"))?);
        }
        // Protocol features: ember needs none of the optional ones; the exchange itself
        // is required once PROTOCOL_FEATURES is offered.
        dev.daemon
            .frontend
            .get_protocol_features()
            .map_err(|e| fail_owned(&dev, "did not answer GET_PROTOCOL_FEATURES", e))?;
        dev.daemon
            .frontend
            .set_protocol_features(VhostUserProtocolFeatures::empty())
            .map_err(|e| fail_owned(&dev, "refused SET_PROTOCOL_FEATURES", e))?;
        Ok(dev)
    }

    /// The mount tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Hands the activated queues to the daemon (on the event loop).
    fn hand_over(&mut self, ctx: ActivateContext) -> Result<Active, FsError> {
        let f = &self.daemon.frontend;
        let err = |what: &'static str| {
            let tag = self.tag.clone();
            let daemon = self.daemon.path.clone();
            move |e: vhost::Error| FsError::Daemon {
                tag,
                daemon,
                what,
                why: e.to_string(),
            }
        };
        let acked = ctx.acked_features & (self.backend_features | super::VERSION_1);
        f.set_features(acked | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(err("refused SET_FEATURES"))?;
        let regions = ctx
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(err(
                "cannot describe guest memory (not a shared memory file)",
            ))?;
        f.set_mem_table(&regions)
            .map_err(err("refused SET_MEM_TABLE"))?;
        let mut enabled = Vec::new();
        let rings = ctx
            .queues
            .iter()
            .map(|q| (GuestAddress(q.avail_ring()), GuestAddress(q.used_ring())))
            .collect();
        for (i, q) in ctx.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let host = |gpa: u64| -> Result<u64, FsError> {
                ctx.mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| FsError::Daemon {
                        tag: self.tag.clone(),
                        daemon: self.daemon.path.clone(),
                        what: "was not given queue addresses",
                        why: format!("queue {i}: ring address {gpa:#x} is not in guest memory"),
                    })
            };
            let cfg = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            let evts = (self.call_evts.get(i), ctx.queue_evts.get(i));
            let (Some(call), Some(kick)) = evts else {
                continue;
            };
            f.set_vring_num(i, q.size())
                .map_err(err("refused SET_VRING_NUM"))?;
            f.set_vring_addr(i, &cfg)
                .map_err(err("refused SET_VRING_ADDR"))?;
            f.set_vring_base(i, q.next_avail())
                .map_err(err("refused SET_VRING_BASE"))?;
            f.set_vring_call(i, call)
                .map_err(err("refused SET_VRING_CALL"))?;
            f.set_vring_kick(i, kick)
                .map_err(err("refused SET_VRING_KICK"))?;
            enabled.push(i);
        }
        // `set_vring_enable` needs `&mut`: done after the borrows above end.
        let fm = &mut self.daemon.frontend;
        for &i in &enabled {
            fm.set_vring_enable(i, true).map_err(|e| FsError::Daemon {
                tag: self.tag.clone(),
                daemon: self.daemon.path.clone(),
                what: "refused SET_VRING_ENABLE",
                why: e.to_string(),
            })?;
        }
        Ok(Active {
            interrupt: ctx.interrupt,
            enabled,
            mem: ctx.mem,
            rings,
        })
    }

    fn on_activated(&mut self, ops: &mut EventOps) {
        // The queue eventfds are the daemon's kick fds: the event loop must not read them.
        self.activation.on_activated(ops, &[]);
        if !self.calls_registered {
            for (i, evt) in self.call_evts.iter().enumerate() {
                let token = CALL_TOKEN_BASE + u32::try_from(i).unwrap_or(0);
                if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                    log::error!(
                        "virtio-fs {}: cannot watch call eventfd {i}: {e:?}",
                        self.tag
                    );
                }
            }
            self.calls_registered = true;
        }
        let Some(ctx) = self.pending.take() else {
            return;
        };
        let interrupt = ctx.interrupt.clone();
        match self.hand_over(ctx) {
            Ok(a) => self.active = Some(a),
            Err(e) => {
                crate::guest_error!("{e}; the device stops until the driver resets it");
                interrupt.set_needs_reset();
            }
        }
    }
}

fn fail_owned(dev: &VirtioFs, what: &'static str, e: vhost::Error) -> FsError {
    FsError::Daemon {
        tag: dev.tag.clone(),
        daemon: dev.daemon.path.clone(),
        what,
        why: e.to_string(),
    }
}

/// A number unique in this process (socket names).
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        self.backend_features & (EVENT_IDX | INDIRECT_DESC)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: ctx.queues.len(),
            });
        }
        if let Some(i) = ctx.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        // The vhost-user exchange is socket I/O: done on the event loop, not here.
        self.pending = Some(ctx);
        self.activation.signal()
    }

    fn reset(&mut self) {
        self.pending = None;
        if let Some(a) = self.active.take() {
            // GET_VRING_BASE stops a ring in the daemon.
            for i in a.enabled {
                if let Err(e) = self.daemon.frontend.get_vring_base(i) {
                    crate::guest_warn!("virtio-fs {}: stopping queue {i}: {e}", self.tag);
                }
            }
        }
    }

    fn saved_queues(&self) -> Vec<(usize, QueueState)> {
        // The transport's copies are right as long as the guest never used the queues
        // (next_avail 0), which check_snapshot makes sure of.
        Vec::new()
    }

    fn check_snapshot(&self) -> Result<(), SnapshotError> {
        match &self.active {
            Some(a) if guest_used_queues(a) => Err(SnapshotError::NotRestorable(
                crate::snapshot::file::NO_SHARE,
            )),
            _ => Ok(()),
        }
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Fs(FsState {
            tag: self.tag.clone(),
        })
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        let VirtioDeviceState::Fs(s) = state else {
            return Err(super::wrong_state_kind("virtio-fs", state));
        };
        if s.tag != self.tag {
            return Err(SnapshotError::Mismatch {
                what: "virtio-fs tag".into(),
                snapshot: s.tag.clone(),
                now: self.tag.clone(),
            });
        }
        Ok(())
    }
}

/// Whether the guest ever made a request on `a`'s queues (a ring index that is not 0, or
/// one that cannot be read): a mounted share, whose daemon state a snapshot cannot carry.
fn guest_used_queues(a: &Active) -> bool {
    use vm_memory::Bytes;
    a.rings.iter().any(|&(avail, used)| {
        let idx = |ring: GuestAddress| {
            ring.checked_add(2)
                .and_then(|at| a.mem.read_obj::<u16>(at).ok())
        };
        idx(avail) != Some(0) || idx(used) != Some(0)
    })
}

impl MutEventSubscriber for VirtioFs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATION_TOKEN => self.on_activated(ops),
            t if t >= CALL_TOKEN_BASE => {
                let i = (t - CALL_TOKEN_BASE) as usize;
                if let Some(e) = self.call_evts.get(i) {
                    let _ = e.read();
                }
                if let Some(a) = &self.active {
                    a.interrupt.signal_used_queue();
                }
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
    }
}

#[cfg(test)]
mod tests;
