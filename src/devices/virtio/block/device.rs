// SPDX-License-Identifier: Apache-2.0
//! The virtio-blk device model: features, configuration space, activation, and the queue
//! loop that turns available descriptor chains into used ones (on the event loop).

use std::mem::{offset_of, size_of};
use std::num::Wrapping;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, BounceBuffer, Completion, RequestContext, RequestType, HEADER_SIZE};
use super::{BlockError, DiskFile, ID_BYTES, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX};
use crate::devices::virtio::rate_limiter::{BucketConfig, RateLimiter};
use crate::devices::virtio::{
    add_used, pop_or_enable, read_config_bytes, ActivateContext, ActivateError, ActivationEvent,
    Broken, Interrupt, VirtioDevice, EVENT_IDX,
};
use crate::memory::GuestMemory;
use crate::snapshot::devices::{BlockState, VirtioDeviceState};
use crate::snapshot::format::SnapshotError;

/// Counters of one block device (shared, so tests and reports can read them while it runs).
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Completed IN requests.
    pub reads: AtomicU64,
    /// Completed OUT requests.
    pub writes: AtomicU64,
    /// Completed FLUSH requests.
    pub flushes: AtomicU64,
    /// Completed GET_ID requests.
    pub get_ids: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub bytes_written: AtomicU64,
    /// Requests answered IOERR or UNSUPP.
    pub failed: AtomicU64,
    /// Chains so malformed that no status could be written (used length 0).
    pub malformed: AtomicU64,
    /// Times the rate limit held the queue (a request waited for the limiter's timer).
    pub throttled: AtomicU64,
}

impl BlockStats {
    fn record(&self, c: &Completion) {
        use crate::metrics::block as m;
        let data_len = c.data_len;
        let counter = match (&c.result, c.status) {
            (Ok(RequestType::In), _) => {
                self.bytes_read.fetch_add(data_len, Ordering::Relaxed);
                m::read_count.inc();
                m::read_bytes.add(data_len);
                &self.reads
            }
            (Ok(RequestType::Out), _) => {
                self.bytes_written.fetch_add(data_len, Ordering::Relaxed);
                m::write_count.inc();
                m::write_bytes.add(data_len);
                &self.writes
            }
            (Ok(RequestType::Flush), _) => {
                m::flush_count.inc();
                &self.flushes
            }
            (Ok(RequestType::GetId), _) => &self.get_ids,
            (Ok(RequestType::Unsupported(_)), _) | (Err(_), Some(_)) => {
                m::failures.inc();
                &self.failed
            }
            (Err(_), None) => {
                m::failures.inc();
                &self.malformed
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that did not succeed, of either kind.
    pub fn errors(&self) -> u64 {
        self.failed.load(Ordering::Relaxed) + self.malformed.load(Ordering::Relaxed)
    }
}

/// The device's state while the driver runs it.
#[derive(Debug)]
pub(super) struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    /// Set after an error the device cannot recover from; the queue is left alone until reset.
    broken: Broken,
}

/// A virtio-blk device on a raw image file.
#[derive(Debug)]
pub struct Block {
    name: String,
    disk: DiskFile,
    id: [u8; ID_BYTES],
    config_space: Vec<u8>,
    avail_features: u64,
    queue_sizes: [u16; 1],
    pub(super) activation: ActivationEvent,
    /// The queue's notification eventfd, kept across resets (it stays on the event loop).
    pub(super) queue_evt: Option<Arc<EventFd>>,
    pub(super) active: Option<Active>,
    bounce: BounceBuffer,
    stats: Arc<BlockStats>,
    /// The `bw=`/`iops=` limits, when there are any.
    pub(super) limiter: Option<RateLimiter>,
}

impl Block {
    /// Puts the image `disk` under the device in place of its own (Firecracker's `PATCH
    /// /drives` after the start): the capacity in the configuration space becomes the new
    /// image's and a running driver gets a configuration-change interrupt, on which Linux
    /// re-reads the size. Requests already completed went to the old image; later ones go to
    /// the new. The new image must have the old one's mode (read-only or not): the driver
    /// was told that once.
    pub fn swap_disk(&mut self, disk: DiskFile) -> Result<(), String> {
        if disk.read_only() != self.disk.read_only() {
            return Err(format!(
                "{}: the new image must be {} like the old one",
                self.name,
                if self.disk.read_only() {
                    "read-only"
                } else {
                    "writable"
                }
            ));
        }
        log::info!(
            "{}: image {} replaced by {} ({} sectors)",
            self.name,
            self.disk.path().display(),
            disk.path().display(),
            disk.sectors()
        );
        self.config_space = config_space(disk.sectors());
        self.disk = disk;
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
        }
        Ok(())
    }

    /// A device for `disk`, called `name` in logs (`vda`), answering GET_ID with `id` (at most
    /// 20 bytes; default: `name`).
    pub fn new(disk: DiskFile, name: &str, id: Option<&str>) -> Result<Self, BlockError> {
        let id_str = id.unwrap_or(name);
        if id_str.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(id_str.to_string()));
        }
        let mut id = [0u8; ID_BYTES];
        id[..id_str.len()].copy_from_slice(id_str.as_bytes());
        let mut avail_features = (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | EVENT_IDX;
        if disk.read_only() {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            name: name.to_string(),
            config_space: config_space(disk.sectors()),
            disk,
            id,
            avail_features,
            queue_sizes: [QUEUE_SIZE],
            activation: ActivationEvent::new().map_err(BlockError::EventFd)?,
            queue_evt: None,
            active: None,
            bounce: BounceBuffer::default(),
            stats: Arc::new(BlockStats::default()),
            limiter: None,
        })
    }

    /// Limits the device to `bw` bytes of data and `iops` requests per second (either
    /// `None`: no limit). A request over the limit waits in the queue, and the device
    /// serves it when its timer fires (on the event loop; the guest need not notify again).
    pub fn with_rate_limit(
        mut self,
        bw: Option<BucketConfig>,
        iops: Option<BucketConfig>,
    ) -> Result<Self, BlockError> {
        self.limiter = RateLimiter::new(&self.name, bw, iops).map_err(BlockError::Timer)?;
        Ok(self)
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// The disk.
    pub fn disk(&self) -> &DiskFile {
        &self.disk
    }

    /// Whether the driver activated the device (and has not reset it since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Serves every available request, then interrupts the guest if it wants to know.
    /// Runs on the event loop.
    pub fn process_queue(&mut self) {
        let Self {
            active,
            disk,
            id,
            bounce,
            stats,
            name,
            limiter,
            ..
        } = self;
        let Some(active) = active.as_mut().filter(|a| !a.broken.is_broken()) else {
            return;
        };
        if limiter.as_ref().is_some_and(RateLimiter::is_blocked) {
            // The limiter's timer resumes the queue.
            return;
        }
        let result = (|| -> Result<bool, virtio_queue::Error> {
            let mut used_any = false;
            active.queue.disable_notification(&active.mem)?;
            while let Some(chain) = pop_or_enable(&mut active.queue, &active.mem)? {
                if let Some(l) = limiter.as_mut() {
                    if !l.consume(data_bytes(&chain), Instant::now()) {
                        // Over the limit: the request goes back to the ring until the
                        // limiter's timer fires (notifications stay off meanwhile).
                        stats.throttled.store(l.throttled(), Ordering::Relaxed);
                        crate::metrics::block::rate_limiter_throttled_events.inc();
                        let q = &mut active.queue;
                        q.set_next_avail((Wrapping(q.next_avail()) - Wrapping(1)).0);
                        break;
                    }
                }
                let head = chain.head_index();
                let mut ctx = RequestContext {
                    mem: &active.mem,
                    disk,
                    id,
                    bounce,
                    max_descriptors: usize::from(QUEUE_SIZE),
                };
                let c = request::process(chain, &mut ctx);
                report(name, stats, &c);
                add_used(&mut active.queue, &active.mem, head, c.used_len)?;
                used_any = true;
            }
            Ok(used_any && active.queue.needs_notification(&active.mem)?)
        })();
        match result {
            Ok(true) => active.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => active.broken.mark(name, &active.interrupt, &e),
        }
    }
}

/// The data bytes a request moves, for the rate limit: the chain's bytes less the header and
/// the status byte (0 for FLUSH; a malformed chain costs what it claims, at most the queue's
/// worth of descriptors).
fn data_bytes(chain: &DescriptorChain<&GuestMemory>) -> u64 {
    let total: u64 = chain
        .clone()
        .take(usize::from(QUEUE_SIZE))
        .map(|d| u64::from(d.len()))
        .sum();
    total.saturating_sub(HEADER_SIZE + 1)
}

/// Counts a completion and logs failures (rate-limited, so a misbehaving guest cannot flood
/// the log).
fn report(name: &str, stats: &BlockStats, c: &Completion) {
    stats.record(c);
    if let Err(e) = &c.result {
        let n = stats.errors();
        let status = c
            .status
            .map_or("none: chain malformed".to_string(), |s| s.to_string());
        crate::guest_warn!(
            "{name}: request failed ({}), status {status} (failure #{n})",
            crate::error_chain_line(e)
        );
    }
}

/// The configuration space (`struct virtio_blk_config`, little-endian): capacity, seg_max,
/// blk_size; everything else zero.
fn config_space(sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; size_of::<virtio_blk_config>()];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(
        offset_of!(virtio_blk_config, capacity),
        &sectors.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            interrupt,
            ..
        } = ctx;
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let (Some(queue), Some(queue_evt)) =
            (queues.into_iter().next(), queue_evts.into_iter().next())
        else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.queue_evt = Some(queue_evt);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
            broken: Broken::default(),
        });
        self.activation.signal()
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn saved_queues(&self) -> Vec<(usize, QueueState)> {
        self.active.iter().map(|a| (0, a.queue.state())).collect()
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(BlockState {
            path: self.disk.path().to_path_buf(),
            sectors: self.disk.sectors(),
            read_only: self.disk.read_only(),
            id: self.id.to_vec(),
        })
    }

    /// Nothing to restore: checks that the disk is the one the guest had, the same file with
    /// the same size and mode (the guest's page cache and file systems expect it).
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        let VirtioDeviceState::Block(s) = state else {
            return Err(crate::devices::virtio::wrong_state_kind(
                "virtio-blk",
                state,
            ));
        };
        let err = |why: String| SnapshotError::Device {
            device: format!("disk {} ({})", self.name, self.disk.path().display()),
            why,
        };
        if s.path != self.disk.path() {
            return Err(err(format!(
                "the snapshot's disk {} is {}: give the same disks in the same order",
                self.name,
                s.path.display()
            )));
        }
        if s.sectors != self.disk.sectors() {
            return Err(err(format!(
                "it has {} sectors, {} when the snapshot was taken: the image changed size",
                self.disk.sectors(),
                s.sectors
            )));
        }
        if s.read_only != self.disk.read_only() {
            return Err(err(format!(
                "it is {} now and was {} in the snapshot",
                mode(self.disk.read_only()),
                mode(s.read_only)
            )));
        }
        if s.id[..] != self.id[..] {
            return Err(err(format!(
                "its id is {:?}, {:?} in the snapshot",
                String::from_utf8_lossy(&self.id).trim_end_matches('\0'),
                String::from_utf8_lossy(&s.id).trim_end_matches('\0')
            )));
        }
        Ok(())
    }
}

fn mode(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheMode, DiskConfig};

    fn block(len: usize, read_only: bool) -> (Block, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!(
            "ember-blkdev-{}-{len}-{read_only}",
            std::process::id()
        ));
        std::fs::write(&p, vec![0u8; len]).unwrap();
        let disk = DiskFile::open(&DiskConfig {
            path: p.clone(),
            read_only,
            id: None,
            cache: CacheMode::Writeback,
            ..DiskConfig::new(&p)
        })
        .unwrap();
        (Block::new(disk, "vda", None).unwrap(), p)
    }

    #[test]
    fn features_and_config_space() {
        let (b, p) = block(1 << 20, false);
        assert_eq!(b.device_type(), VIRTIO_ID_BLOCK);
        assert_eq!(b.queue_max_sizes(), &[QUEUE_SIZE]);
        let f = b.avail_features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_BLK_SIZE), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let mut seg = [0u8; 4];
        b.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        b.read_config(20, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 512);
        drop(b);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn read_only_disk_offers_ro() {
        let (b, p) = block(4096, true);
        assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        drop(b);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn long_ids_are_refused() {
        let (b, p) = block(8192, false);
        let disk = b.disk;
        let e = Block::new(disk, "vda", Some("a-very-long-disk-identifier")).unwrap_err();
        assert!(matches!(e, BlockError::IdTooLong(_)));
        std::fs::remove_file(p).unwrap();
    }
}
