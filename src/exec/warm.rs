// SPDX-License-Identifier: Apache-2.0
//! Warm `ember exec`: a booted guest restored from a snapshot instead of a boot per command.
//!
//! The first exec with a given kernel, initramfs, command line, vCPUs and memory boots the
//! guest with `ember.warm=PORT` on its command line and a virtio-vsock device. The default
//! guest's init then gets ready for a command and, once its agent listens on vsock port
//! `PORT`, says so through the exit device's ready register
//! ([`READY_OFFSET`](crate::devices::legacy::exit_device::READY_OFFSET)). ember pauses the
//! vCPUs there, writes a snapshot into the snapshot cache ([`SnapshotCache`]), resumes them
//! and hands the command over. Every later exec with the same configuration restores that
//! snapshot (in about the time it takes to map its memory file) and hands its own command
//! over the same way. The command travels as the same newc archive the cold path appends to
//! the initramfs ([`ExecSpec::archive`](super::ExecSpec::archive)), behind a one-line header
//! ([`job_payload`]); output, status, `--timeout` and signals work as on the cold path.
//!
//! Each restored guest gets a new VM generation ID, on which its kernel reseeds its random
//! number generator, so two restored guests never share random streams; the header carries
//! the host's wall-clock time, which the guest's agent sets (the guest's clock would
//! otherwise read the time of the snapshot).
//!
//! Shared directories (`--share`) are part of the snapshot as devices the guest has probed
//! but not mounted (it mounts them after the command arrives): a restore starts a virtiofsd
//! for this exec's directories and hands it the device's queues, so the snapshot of a guest
//! with one share serves every exec with one share, whatever the directory.
//!
//! The warm path is taken when the guest is the default guest's initramfs (its init knows
//! the protocol), no `--disk` is given (the guest's page cache of a disk would be the one of
//! snapshot time), `--cold` is not given and a cache directory is known. [`eligible`] says
//! why not otherwise.

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{exec_devices, ExecSpec};
use crate::builder::{build_vm, BuildError, BuildHooks};
use crate::config::VmConfig;
use crate::devices::virtio::vsock::VsockConfig;
use crate::exit::{ExitReason, VmExit};
use crate::sandbox::{PathAccess, PathRule};
use crate::snapshot::cache::{CacheKey, SnapshotCache};
use crate::vmm::{ReadyAction, ReadyEvent, RunOptions, RunOutcome};

/// The vsock port the guest's agent listens on for the command.
pub const WARM_PORT: u32 = 52;

/// The guest's vsock CID in warm exec VMs.
pub const WARM_CID: u64 = 3;

/// The first line of what ember sends the guest's agent, before the archive:
/// `EMBERJOB1 <seconds> <nanoseconds>\n`, the host's wall-clock time.
pub const JOB_MAGIC: &str = "EMBERJOB1";

/// How long the guest's agent gets to take the connection (the guest may be slow on a busy
/// PVM host, but it is already listening).
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the cold path is taken instead, or the cache to use.
pub fn eligible(config: &VmConfig, cold: bool) -> Result<SnapshotCache, &'static str> {
    if cold {
        return Err("--cold");
    }
    if !config.disks.is_empty() {
        return Err(
            "--disk is given (a restored guest would hold the disk's blocks as they were \
                    when the snapshot was taken)",
        );
    }
    let default_initrd = crate::config::default_guest_dir()
        .map(|d| d.join("initramfs.cpio"))
        .and_then(|p| p.canonicalize().ok());
    let initrd = config.initrd.as_ref().and_then(|p| p.canonicalize().ok());
    let Some(initrd) = initrd.filter(|i| Some(i) == default_initrd.as_ref()) else {
        return Err(
            "the initramfs is not the default guest's (its init may not take commands \
                    over vsock; see docs/exec.md)",
        );
    };
    if !knows_warm_protocol(&initrd) {
        return Err(
            "the default guest was built before warm exec existed: rebuild it with \
                    `bash resources/guest/build.sh`",
        );
    }
    SnapshotCache::from_env().ok_or("no cache directory (set HOME or EMBER_CACHE_DIR)")
}

/// Whether the (uncompressed) initramfs at `path` has an init that parses `ember.warm=`.
fn knows_warm_protocol(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let needle = b"ember.warm=";
    // SAFETY: both pointers are valid for the lengths given; memmem only reads them and
    // returns null or a pointer into `bytes`.
    let found = unsafe {
        libc::memmem(
            bytes.as_ptr().cast(),
            bytes.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    !found.is_null()
}

/// The header and archive ember sends the guest's agent.
pub fn job_payload(archive: &[u8]) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut p = format!("{JOB_MAGIC} {} {}\n", now.as_secs(), now.subsec_nanos()).into_bytes();
    p.extend_from_slice(archive);
    p
}

/// The exec VM of the warm path, from `base` (kernel, initrd, vCPUs, memory, the exec
/// command line with the user's `--append` words): exec's devices, a vsock device whose host
/// socket is in `runtime`, and `ember.warm=PORT clocksource=kvm-clock` on the command line
/// (kvm-clock: a restored guest's monotonic clock goes on from where the snapshot stopped it
/// instead of jumping by the time in between).
pub fn warm_config(base: &VmConfig, runtime: &Path) -> VmConfig {
    let mut c = base.clone();
    exec_devices(&mut c);
    // Each command restores the same snapshot: the generation ID tells each guest so.
    c.vm_generation_id = true;
    c.initrd_append = None;
    c.cmdline = format!(
        "{} ember.warm={WARM_PORT} clocksource=kvm-clock",
        c.cmdline.trim()
    );
    c.vsock = Some(VsockConfig {
        cid: WARM_CID,
        uds: runtime.join("vsock"),
    });
    c
}

/// Errors of the warm path before the VM runs.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The private runtime directory (for the vsock socket) could not be made.
    #[error("cannot create a private directory for the VM's vsock socket in {0}")]
    Runtime(PathBuf, #[source] std::io::Error),
    /// The kernel or initrd cannot be looked at.
    #[error("cannot read the guest's kernel or initrd")]
    Key(#[source] std::io::Error),
    /// The command's archive.
    #[error(transparent)]
    Exec(#[from] super::ExecError),
    /// Building the VM.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// A private directory for the VM's host sockets, removed when dropped.
#[derive(Debug)]
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn new() -> Result<Self, WarmError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let dir = base.join(format!("ember-exec-{}-{nanos:09}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| WarmError::Runtime(base, e))?;
        Ok(Self(dir))
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a warm exec went, for `ember bench --exec` (times since ember's start).
#[derive(Debug, Clone, Default)]
pub struct WarmReport {
    /// The guest was restored from the cache (else booted).
    pub restored: bool,
    /// The VM was built (restored or ready to boot) and its vCPUs started.
    pub built: Option<Duration>,
    /// The first vCPU entered KVM_RUN: for a restore, the first guest instruction.
    pub first_kvm_run: Option<Duration>,
    /// A booted guest said it was ready.
    pub ready: Option<Duration>,
    /// How long the snapshot of a booted guest kept it paused.
    pub snapshot_paused: Option<Duration>,
}

impl WarmReport {
    /// The report as JSON.
    pub fn to_json(&self) -> crate::bench::json::Json {
        use crate::bench::json::Json;
        let ms = |d: Option<Duration>| d.map_or(Json::Null, |d| Json::Num(d.as_secs_f64() * 1e3));
        Json::obj([
            ("restored", Json::Bool(self.restored)),
            ("built_ms", ms(self.built)),
            ("first_kvm_run_ms", ms(self.first_kvm_run)),
            ("ready_ms", ms(self.ready)),
            ("snapshot_paused_ms", ms(self.snapshot_paused)),
        ])
    }
}

/// Runs `spec` on the warm path: restores the cached snapshot for `base`, or boots and
/// snapshots the guest when it is ready (see the module documentation). A cached snapshot
/// that cannot be restored is removed, and the guest booted instead. `watch` is told which
/// VM runs (for `--json`).
pub fn run(
    base: &VmConfig,
    spec: &ExecSpec,
    cache: &SnapshotCache,
    start: Instant,
    mut opts: RunOptions,
    watch: &super::report::VmWatch,
) -> Result<(RunOutcome, WarmReport), WarmError> {
    let mut report = WarmReport::default();
    let runtime = RuntimeDir::new()?;
    // The sandbox: the VM's socket directory, removed at the end (and so, once empty, from
    // its parent), and the snapshot cache.
    crate::sandbox::allow_path(PathRule::new(&runtime.0, PathAccess::ReadWrite));
    if let Some(parent) = runtime.0.parent() {
        crate::sandbox::allow_path(PathRule::new(parent, PathAccess::Remove));
    }
    let config = warm_config(base, &runtime.0);
    let key = CacheKey::new(&config).map_err(WarmError::Key)?;
    let payload = Arc::new(job_payload(&spec.archive()?));
    let uds = runtime.0.join("vsock");
    if opts.signal_fd.is_none() {
        match crate::event_loop::block_signals_to_fd() {
            Ok(fd) => opts.signal_fd = Some(fd),
            Err(e) => log::warn!("cannot handle signals: {e}"),
        }
    }

    if let Some(entry) = cache.lookup(&key) {
        let hooks = BuildHooks {
            restore_from: Some(entry.clone()),
            ..Default::default()
        };
        match build_vm(&config, start, hooks) {
            Ok(vmm) => {
                watch.attach(&vmm, super::report::ExecPath::WarmRestore);
                report.restored = true;
                report.built = Some(start.elapsed());
                log::info!(
                    "warm exec: restored the booted guest of {} in {:?} (--cold boots instead)",
                    entry.display(),
                    start.elapsed()
                );
                send_job_in_background(uds, WARM_PORT, payload, vmm.exit_latch().clone());
                let timeline = vmm.timeline().clone();
                let outcome = vmm.run(opts);
                report.first_kvm_run = timeline.get(crate::timeline::Phase::FirstKvmRun);
                return Ok((outcome, report));
            }
            Err(BuildError::Snapshot(e)) => {
                log::warn!(
                    "warm exec: the cached snapshot {} cannot be restored ({}); removing it \
                     and booting the guest",
                    entry.display(),
                    crate::error_chain_line(&e)
                );
                cache.remove(&key);
            }
            Err(e) => return Err(e.into()),
        }
    }

    // No usable snapshot: boot, and snapshot the guest when it is ready for the command.
    let vmm = build_vm(&config, start, BuildHooks::default())?;
    watch.attach(&vmm, super::report::ExecPath::WarmBoot);
    report.built = Some(start.elapsed());
    let timeline = vmm.timeline().clone();
    let ready_at = Arc::new(std::sync::Mutex::new(None));
    let staging = cache.staging();
    if staging.is_ok() {
        crate::sandbox::allow_path(PathRule::new(cache.dir(), PathAccess::ReadWrite));
    }
    let staging = staging
        .map_err(|e| {
            log::warn!(
                "warm exec: cannot write into the snapshot cache {} ({e}); running without a \
                 snapshot",
                cache.dir().display()
            );
        })
        .ok();
    log::info!(
        "warm exec: no snapshot of this guest yet: booting it (later execs restore it from {})",
        cache.dir().display()
    );
    let exit = vmm.exit_latch().clone();
    let cache = cache.clone();
    opts.on_ready = Some(ReadyAction {
        snapshot_to: staging.clone(),
        stop_after: false,
        then: Box::new({
            let ready_at = ready_at.clone();
            move |ev: ReadyEvent| {
                if let Some(Ok(paused)) = &ev.snapshot {
                    *crate::devices::bus::lock(&ready_at) = Some((start.elapsed(), *paused));
                }
                if ev.value != WARM_PORT {
                    crate::guest_warn!(
                        "warm exec: the guest said it listens on vsock port {}, not {WARM_PORT}",
                        ev.value
                    );
                }
                if let (Some(staging), Some(result)) = (staging, ev.snapshot) {
                    keep_snapshot(&cache, &key, &staging, result);
                }
                send_job_in_background(uds, WARM_PORT, payload, exit);
            }
        }),
    });
    let outcome = vmm.run(opts);
    drop(runtime);
    report.first_kvm_run = timeline.get(crate::timeline::Phase::FirstKvmRun);
    if let Some((at, paused)) = *crate::devices::bus::lock(&ready_at) {
        report.ready = Some(at.saturating_sub(paused));
        report.snapshot_paused = Some(paused);
    }
    Ok((outcome, report))
}

/// Installs the snapshot written into `staging` as the cache entry for `key`, or says why
/// there is none.
fn keep_snapshot(
    cache: &SnapshotCache,
    key: &CacheKey,
    staging: &Path,
    result: Result<Duration, crate::snapshot::format::SnapshotError>,
) {
    match result {
        Ok(paused) => match cache.install(staging, key) {
            Ok(entry) => log::info!(
                "warm exec: snapshot of the ready guest saved in {} (guest paused {paused:?})",
                entry.display()
            ),
            Err(e) => log::warn!(
                "warm exec: cannot keep the snapshot in {} ({e}); the next exec boots again",
                cache.dir().display()
            ),
        },
        Err(e) => {
            let _ = std::fs::remove_dir_all(staging);
            log::warn!(
                "warm exec: the guest could not be snapshotted ({}); the command runs, but \
                 the next exec boots again",
                crate::error_chain_line(&e)
            );
        }
    }
}

/// Hands `payload` to the guest's agent on a thread of its own; a failure ends the VM with a
/// message saying what went wrong.
fn send_job_in_background(uds: PathBuf, port: u32, payload: Arc<Vec<u8>>, exit: Arc<VmExit>) {
    let spawned = std::thread::Builder::new()
        .name("exec-job".into())
        .spawn(move || {
            crate::sandbox::enter(crate::sandbox::ThreadKind::ExecJob);
            if let Err(e) = send_job(&uds, port, &payload) {
                exit.request(ExitReason::VcpuError(format!(
                    "could not hand the command to the guest over vsock port {port}: {e} (the \
                     guest's agent did not take it; `ember exec --cold` boots the guest for \
                     the command instead)"
                )));
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the thread that sends the command: {e}");
    }
}

/// Connects to the guest's `port` through the vsock device's host socket `uds` (the
/// `CONNECT <port>` handshake), writes `payload`, closes the writing half and waits until the
/// guest's agent has read everything and closed its end.
pub fn send_job(uds: &Path, port: u32, payload: &[u8]) -> std::io::Result<()> {
    let t0 = Instant::now();
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(ACCEPT_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            // The muxer closes the connection when the guest refuses it.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "the guest refused the connection (answer {:?})",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    let accepted = t0.elapsed();
    s.write_all(payload)?;
    s.shutdown(std::net::Shutdown::Write)?;
    // The agent closes its end once it has read everything.
    s.set_read_timeout(None)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    log::debug!(
        "warm exec: the guest took the connection after {accepted:?} and had the {} bytes \
         of the job after {:?}",
        payload.len(),
        t0.elapsed()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_starts_with_the_host_time() {
        let p = job_payload(b"070701");
        let text = String::from_utf8_lossy(&p);
        let (line, rest) = text.split_once('\n').unwrap();
        assert_eq!(rest, "070701");
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f[0], JOB_MAGIC);
        let secs: u64 = f[1].parse().unwrap();
        let nanos: u32 = f[2].parse().unwrap();
        assert!(secs > 1_700_000_000 && nanos < 1_000_000_000);
    }

    #[test]
    fn warm_config_adds_the_protocol_and_keeps_the_guest() {
        let mut base = VmConfig::new("/k");
        base.cmdline = "console=ttyS0 quiet ".into();
        let c = warm_config(&base, Path::new("/run/x"));
        assert_eq!(
            c.cmdline,
            format!("console=ttyS0 quiet ember.warm={WARM_PORT} clocksource=kvm-clock")
        );
        let v = c.vsock.unwrap();
        assert_eq!((v.cid, v.uds), (WARM_CID, PathBuf::from("/run/x/vsock")));
        assert!(c.exit_on_status && !c.stdin && c.initrd_append.is_none());
    }

    #[test]
    fn cold_when_asked_or_with_disks_or_another_initramfs() {
        let mut c = VmConfig::new("/k");
        assert_eq!(eligible(&c, true).unwrap_err(), "--cold");
        // A share alone does not make it cold (here the initramfs does).
        c.shares.push(crate::config::ShareConfig::new("/s"));
        assert!(eligible(&c, false).unwrap_err().contains("initramfs"));
        c.shares.clear();
        c.disks.push(crate::config::DiskConfig::new("/d"));
        assert!(eligible(&c, false).unwrap_err().contains("--disk"));
        c.disks.clear();
        c.initrd = Some("/nonexistent".into());
        assert!(eligible(&c, false).unwrap_err().contains("initramfs"));
    }

    #[test]
    fn an_initramfs_without_the_warm_init_is_recognized() {
        let dir = std::env::temp_dir().join(format!("ember-warm-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (old, new) = (dir.join("old.cpio"), dir.join("new.cpio"));
        std::fs::write(&old, b"070701...init: ember.cmd= ember.exit=").unwrap();
        std::fs::write(&new, b"070701...init: ember.cmd= ember.warm= ember.exit=").unwrap();
        assert!(!knows_warm_protocol(&old));
        assert!(knows_warm_protocol(&new));
        assert!(!knows_warm_protocol(&dir.join("missing")));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn send_job_hands_over_the_payload_and_waits_for_the_close() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("ember-sendjob-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v");
        let l = UnixListener::bind(&uds).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while b[0] != b'\n' {
                s.read_exact(&mut b).unwrap();
                got.push(b[0]);
            }
            assert_eq!(got, b"CONNECT 52\n");
            s.write_all(b"OK 1234\n").unwrap();
            let mut data = Vec::new();
            s.read_to_end(&mut data).unwrap();
            data
        });
        send_job(&uds, 52, b"payload").unwrap();
        assert_eq!(t.join().unwrap(), b"payload");
        // A refusal (the muxer closes the connection) is an error.
        let l = UnixListener::bind(dir.join("w")).unwrap();
        let t = std::thread::spawn(move || drop(l.accept().unwrap()));
        let e = send_job(&dir.join("w"), 52, b"x").unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
