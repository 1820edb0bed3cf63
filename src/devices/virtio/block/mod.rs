// SPDX-License-Identifier: Apache-2.0
//! virtio-blk on a raw disk image file (virtio 1.2, section 5.2).
//!
//! - [`DiskFile`] (here): opening the image, locking it against a second writer, its size.
//! - [`device::Block`]: the [`VirtioDevice`](super::VirtioDevice): features, configuration
//!   space, activation.
//! - [`request`]: one descriptor chain → one checked request → file I/O → status byte.
//! - `event_handler`: the event-loop side (queue notifications).
//!
//! Requests: IN, OUT, FLUSH, GET_ID (anything else is answered UNSUPP). Features offered:
//! FLUSH, BLK_SIZE (512), SEG_MAX, RO for read-only disks, and EVENT_IDX.
//!
//! Durability: an OUT request is written to the image (`pwrite`) before it is returned in
//! the used ring, and a FLUSH calls `fdatasync` before it is: what the guest saw flushed is
//! on the image, whatever happens to ember afterwards (tests/blk_guest.rs kills it at
//! random points). An optional rate limit (`bw=`, `iops=`:
//! [`Block::with_rate_limit`](device::Block::with_rate_limit)) holds requests in the queue
//! until its timer fires.

#[cfg(test)]
mod chain_tests;
pub mod device;
mod event_handler;
pub mod request;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use device::{Block, BlockStats};

use crate::config::{CacheMode, DiskConfig};

/// Bytes per virtio-blk sector (fixed by the specification).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request (SEG_MAX): the queue minus the header and status
/// descriptors, so a request always fits the queue without indirect descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Errors while opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path} ({mode}): {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// "read-write" or "read-only".
        mode: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// O_DIRECT is not supported where the image lives.
    #[error(
        "disk image {0}: its file system does not support O_DIRECT, which cache=none needs; \
         use cache=writeback"
    )]
    NoDirectIo(PathBuf),
    /// Another process (another VM) holds a conflicting lock on the image.
    #[error(
        "disk image {path} is in use: another process holds a {held} lock on it (is another VM \
         using it?). A writable disk can be open in one VM only; read-only disks (,ro) can be \
         shared"
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// The kind of lock that is in the way.
        held: &'static str,
    },
    /// flock failed for another reason.
    #[error("cannot lock disk image {path}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The image's size cannot be found.
    #[error("cannot find the size of disk image {path}")]
    Size {
        /// The image.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The image is smaller than one sector.
    #[error("disk image {0} is empty (smaller than one 512-byte sector)")]
    Empty(PathBuf),
    /// The ID is too long.
    #[error("disk id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
    /// The device's eventfd could not be created.
    #[error("cannot create an eventfd for a block device")]
    EventFd(#[source] std::io::Error),
    /// The rate limiter's timer could not be created.
    #[error("cannot create the rate-limit timer of a block device")]
    Timer(#[source] std::io::Error),
}

/// An open, locked disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
    direct: bool,
}

impl DiskFile {
    /// Opens and locks the image `cfg` names: an exclusive lock for a writable disk, a shared
    /// one for a read-only disk, never waiting (a conflicting lock is an error at once).
    pub fn open(cfg: &DiskConfig) -> Result<Self, BlockError> {
        let path = cfg.path.clone();
        let mode = if cfg.read_only {
            "read-only"
        } else {
            "read-write"
        };
        let direct = cfg.cache == CacheMode::None;
        let flags = if direct { libc::O_DIRECT } else { 0 };
        // Never blocks on a FIFO, and refuses anything but a regular file or block device.
        let kind = crate::user_file::Kind::RegularOrBlockDevice;
        let mut file =
            crate::user_file::open(&path, !cfg.read_only, flags, kind).map_err(|source| {
                if direct && source.raw_os_error() == Some(libc::EINVAL) {
                    BlockError::NoDirectIo(path.clone())
                } else {
                    BlockError::Open {
                        path: path.clone(),
                        mode,
                        source,
                    }
                }
            })?;
        lock_file(&file, &path, cfg.read_only)?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        let sectors = size >> SECTOR_SHIFT;
        if sectors == 0 {
            return Err(BlockError::Empty(path));
        }
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes \
                 are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Self {
            file,
            path,
            sectors,
            read_only: cfg.read_only,
            direct,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the guest may only read.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether I/O bypasses the host page cache (cache=none).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads exactly `buf.len()` bytes at byte `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at byte `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes everything written so far durable (fdatasync).
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

fn lock_file(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a file descriptor this function borrows from a live File; it touches
    // no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(BlockError::Locked {
            path: path.to_path_buf(),
            // A shared request only conflicts with an exclusive lock; an exclusive request
            // conflicts with either.
            held: if read_only {
                "exclusive (read-write)"
            } else {
                "shared or exclusive"
            },
        });
    }
    Err(BlockError::Lock {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_image(name: &str, len: usize) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ember-blk-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![0u8; len]).unwrap();
        p
    }

    fn cfg(path: &Path, read_only: bool) -> DiskConfig {
        DiskConfig {
            path: path.to_path_buf(),
            read_only,
            id: None,
            cache: CacheMode::Writeback,
            ..DiskConfig::new(path)
        }
    }

    #[test]
    fn locks_exclude_a_second_writer() {
        let p = temp_image("lock", 4096);
        let a = DiskFile::open(&cfg(&p, false)).unwrap();
        assert_eq!(a.sectors(), 8);
        let e = DiskFile::open(&cfg(&p, false)).unwrap_err();
        assert!(matches!(e, BlockError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        // A reader is refused while a writer holds it.
        assert!(matches!(
            DiskFile::open(&cfg(&p, true)),
            Err(BlockError::Locked { .. })
        ));
        drop(a);
        // Readers share; a writer is refused while they hold it.
        let r1 = DiskFile::open(&cfg(&p, true)).unwrap();
        let r2 = DiskFile::open(&cfg(&p, true)).unwrap();
        assert!(matches!(
            DiskFile::open(&cfg(&p, false)),
            Err(BlockError::Locked { .. })
        ));
        drop((r1, r2));
        DiskFile::open(&cfg(&p, false)).unwrap();
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn missing_and_empty_images_are_clear_errors() {
        let e = DiskFile::open(&cfg(Path::new("/nonexistent/disk.img"), false)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
        let p = temp_image("empty", 100);
        let e = DiskFile::open(&cfg(&p, false)).unwrap_err();
        assert!(matches!(e, BlockError::Empty(_)), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn partial_last_sector_is_not_visible() {
        let p = temp_image("odd", 1024 + 100);
        assert_eq!(DiskFile::open(&cfg(&p, true)).unwrap().sectors(), 2);
        std::fs::remove_file(p).unwrap();
    }
}
