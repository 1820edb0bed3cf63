// SPDX-License-Identifier: Apache-2.0
//! Kernel and initrd files mapped into guest memory instead of copied into it.
//!
//! Copying the default guest's 11 MB of images into fresh guest memory was most of ember's
//! set-up time (about 1 ms per MB on a nested host, where every new page is zeroed and
//! faulted in by two kernels; docs/profile.md, "VMM set-up"). So the page-aligned part of
//! every piece the loader would copy is instead mapped, `MAP_PRIVATE | MAP_FIXED`, over the
//! guest memory it would be copied to: the guest reads the host's page cache, a page it
//! writes becomes its own copy, and guests that boot the same kernel share its unwritten
//! pages.
//!
//! What is mapped is never the user's file but ember's own copy of it, in an image cache
//! (`$EMBER_CACHE_DIR/images`, by default `~/.cache/ember/images`). A private mapping of the
//! user's file would not be private enough: a kernel rebuilt in place (`cp`, `>`) changes
//! the pages the guest has not written, and truncating a file takes away even the pages it
//! has (they then fault in from the new file, or raise SIGBUS). A cache entry is named after
//! the source's device, inode, size, modification and change times, so any change to the
//! source makes a new entry; it is written under a temporary name, synced, made read-only
//! and renamed into place, and ember only ever unlinks entries (a running guest keeps an
//! unlinked file's pages). The first boot of a kernel pays the copy (into the cache instead
//! of guest memory); later boots map it in microseconds. The newest [`KEEP_ENTRIES`] entries
//! are kept.
//!
//! When the cache cannot be used (`EMBER_IMAGE_CACHE=off`, no writable cache directory, a
//! source that changes while it is copied) or a piece is not page-aligned in both the file
//! and guest memory, its bytes are copied into guest memory as before.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::memory::GuestMemory;

const PAGE: usize = 4096;
/// Cache entries kept (the newest by use); older ones are unlinked when an entry is added.
pub const KEEP_ENTRIES: usize = 8;
/// Set to `off` (or `0`) to copy images into guest memory without the cache.
pub const CACHE_ENV: &str = "EMBER_IMAGE_CACHE";
/// Smaller files are copied: they cost little to copy, and would only push kernels out.
pub const MIN_CACHED_SIZE: u64 = 1 << 20;

/// The directory of ember's image cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCache {
    dir: PathBuf,
    min_size: u64,
}

impl ImageCache {
    /// A cache in `dir` (created on first use) for files of [`MIN_CACHED_SIZE`] or more.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            min_size: MIN_CACHED_SIZE,
        }
    }

    /// The same cache, for files of `bytes` or more.
    pub fn with_min_size(mut self, bytes: u64) -> Self {
        self.min_size = bytes;
        self
    }

    /// The cache this process uses: `$EMBER_CACHE_DIR/images`, else
    /// `$XDG_CACHE_HOME/ember/images`, else `$HOME/.cache/ember/images`; none when
    /// `EMBER_IMAGE_CACHE` is `off` or `0`, or no directory is known.
    pub fn from_env() -> Option<Self> {
        let var = |k| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(v) = var(CACHE_ENV) {
            if v == "off" || v == "0" {
                return None;
            }
        }
        let root = var("EMBER_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| var("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ember")))
            .or_else(|| var("HOME").map(|d| PathBuf::from(d).join(".cache/ember")))?;
        Some(Self::new(root.join("images")))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry name for a source file: it changes whenever the file does.
    fn entry_name(meta: &Metadata) -> String {
        format!(
            "{:x}-{:x}-{:x}-{:x}.{:x}-{:x}.{:x}.img",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        )
    }

    /// An open, read-only cache file with the bytes of `source` (whose metadata is `meta`),
    /// made now when the cache has none.
    pub fn entry(&self, source: &File, meta: &Metadata) -> io::Result<File> {
        let path = self.dir.join(Self::entry_name(meta));
        match File::open(&path) {
            Ok(f) => {
                let m = f.metadata()?;
                // SAFETY: geteuid has no preconditions.
                let me = unsafe { libc::geteuid() };
                if !m.is_file() || m.len() != meta.len() || m.uid() != me {
                    return Err(io::Error::other(format!(
                        "{} is not an entry ember made; remove it",
                        path.display()
                    )));
                }
                // Most recently used: the last to be pruned. Failing that is harmless.
                let _ = f.set_modified(SystemTime::now());
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.create(source, meta, &path)
    }

    fn create(&self, source: &File, meta: &Metadata, path: &Path) -> io::Result<File> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            Self::entry_name(meta)
        ));
        let result = (|| {
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            let mut src = source;
            src.seek(SeekFrom::Start(0))?;
            let copied = io::copy(&mut src, &mut out)?;
            let after = source.metadata()?;
            if copied != meta.len() || Self::entry_name(&after) != Self::entry_name(meta) {
                return Err(io::Error::other(
                    "the file changed while ember copied it into its image cache",
                ));
            }
            // On disk before it has its name: a later boot trusts a named entry.
            out.sync_data()?;
            out.set_permissions(std::fs::Permissions::from_mode(0o444))?;
            std::fs::rename(&tmp, path)?;
            File::open(path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            self.prune(path);
        }
        result
    }

    /// Unlinks all but the newest [`KEEP_ENTRIES`] entries (never `keep`), and temporary
    /// files of copies that died more than an hour ago. Errors are ignored: pruning is
    /// housekeeping, and a guest that maps an unlinked entry keeps its pages.
    fn prune(&self, keep: &Path) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        let mut entries = Vec::new();
        for e in dir.flatten() {
            let (path, name) = (e.path(), e.file_name());
            let Ok(modified) = e.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-") {
                if now.duration_since(modified).unwrap_or_default() > Duration::from_secs(3600) {
                    let _ = std::fs::remove_file(&path);
                }
            } else if name.ends_with(".img") && path != keep {
                entries.push((modified, path));
            }
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, path) in entries.into_iter().skip(KEEP_ENTRIES.saturating_sub(1)) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An image file as the kernel and initrd loaders read it: `Read + Seek` for headers, and
/// a [`ReadVolatile`] that maps page-aligned pieces into guest memory instead of copying
/// them when the file is a cache entry.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    len: u64,
    /// The file is an immutable cache entry, so pieces of it may be mapped.
    mappable: bool,
    /// Host address ranges of guest memory: the only places pieces may be mapped to.
    guest: Vec<(u64, u64)>,
    mapped: usize,
    copied: usize,
}

impl ImageFile {
    /// Opens `path` for loading into `mem`, through `cache` when there is one.
    pub fn open(path: &Path, mem: &GuestMemory, cache: Option<&ImageCache>) -> io::Result<Self> {
        let source = crate::user_file::open_regular(path)?;
        let meta = source.metadata()?;
        let cacheable = |c: &&ImageCache| meta.is_file() && meta.len() >= c.min_size;
        let (file, mappable) = match cache.filter(cacheable) {
            Some(c) => match c.entry(&source, &meta) {
                Ok(entry) => (entry, true),
                Err(e) => {
                    log::debug!(
                        "image cache {}: {e}; copying {} into guest memory",
                        c.dir().display(),
                        path.display()
                    );
                    (source, false)
                }
            },
            None => (source, false),
        };
        let guest = crate::memory::host_ranges(mem);
        Ok(Self {
            file,
            len: meta.len(),
            mappable,
            guest,
            mapped: 0,
            copied: 0,
        })
    }

    /// The file's size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes mapped and bytes copied into guest memory so far.
    pub fn stats(&self) -> (usize, usize) {
        (self.mapped, self.copied)
    }

    fn inside_guest(&self, addr: usize, len: usize) -> bool {
        let (addr, len) = (addr as u64, len as u64);
        self.guest
            .iter()
            .any(|&(s, l)| addr >= s && addr.checked_add(len).is_some_and(|e| e <= s + l))
    }

    /// Maps `len` bytes (whole pages) of the file at the current position over guest
    /// memory at `addr`. `false` when it cannot (the bytes are then copied).
    fn map_pages(&mut self, addr: usize, len: usize) -> io::Result<bool> {
        let off = self.file.stream_position()?;
        let Ok(off_t) = libc::off_t::try_from(off) else {
            return Ok(false);
        };
        // SAFETY: [addr, addr + len) lies inside guest memory (checked by the caller with
        // `inside_guest`), a private anonymous mapping that ember owns for the VM's lifetime
        // and that nothing else reads or writes while images load (no vCPU runs yet).
        // MAP_FIXED replaces those pages with private (copy-on-write) pages of the file in
        // place: the guest memory mapping keeps its address and length, so every pointer
        // into it stays valid, and unmapping guest memory unmaps these pages too. The file
        // is an immutable cache entry at least `off + len` bytes long (the caller keeps the
        // range within the size), so no page of the mapping can go away under the guest.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // A failed MAP_FIXED may have unmapped the old pages: put fresh memory back.
            // SAFETY: the same guest range as above; zeroed anonymous pages are what it held.
            let q = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if q == libc::MAP_FAILED {
                return Err(io::Error::other(format!(
                    "mapping the image into guest memory failed ({err}), and so did restoring \
                     that memory"
                )));
            }
            log::debug!("cannot map the image into guest memory ({err}): copying it");
            return Ok(false);
        }
        let step = i64::try_from(len).map_err(|_| io::Error::other("mapping too large"))?;
        self.file.seek(SeekFrom::Current(step))?;
        self.mapped += len;
        Ok(true)
    }

    fn copy_into<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
        from: usize,
        len: usize,
    ) -> Result<(), VolatileMemoryError> {
        if len == 0 {
            return Ok(());
        }
        let mut part = buf.subslice(from, len)?;
        self.file.read_exact_volatile(&mut part)?;
        self.copied += len;
        Ok(())
    }
}

impl Read for ImageFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for ImageFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for ImageFile {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        if !self.mappable {
            let n = self.file.read_volatile(buf)?;
            self.copied += n;
            return Ok(n);
        }
        let pos = self
            .file
            .stream_position()
            .map_err(VolatileMemoryError::IOError)?;
        let left = usize::try_from(self.len.saturating_sub(pos)).unwrap_or(usize::MAX);
        let n = buf.len().min(left);
        let dst = buf.ptr_guard_mut().as_ptr() as usize;
        let head = (dst.next_multiple_of(PAGE) - dst).min(n);
        let pages = (n - head) & !(PAGE - 1);
        let aligned = dst % PAGE == (pos % PAGE as u64) as usize;
        if pages == 0 || !aligned || !self.inside_guest(dst, n) {
            self.copy_into(buf, 0, n)?;
            return Ok(n);
        }
        self.copy_into(buf, 0, head)?;
        if self
            .map_pages(dst + head, pages)
            .map_err(VolatileMemoryError::IOError)?
        {
            self.copy_into(buf, head + pages, n - head - pages)?;
        } else {
            self.copy_into(buf, head, n - head)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-image-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096 + seed) as u8).collect()
    }

    fn write(path: &Path, data: &[u8]) {
        File::create(path).unwrap().write_all(data).unwrap();
    }

    fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    #[test]
    fn maps_aligned_pieces_and_copies_the_rest() {
        let d = temp_dir("aligned");
        let cache = ImageCache::new(d.join("cache")).with_min_size(0);
        let data = pattern(5 * PAGE + 123, 0);
        let src = d.join("image");
        write(&src, &data);
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        let mut f = ImageFile::open(&src, &mem, Some(&cache)).unwrap();
        assert!(f.mappable);
        // File offset 100 to guest 0x1064: the same offset in a page, so the middle maps.
        f.seek(SeekFrom::Start(100)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x1064), &mut f, 4 * PAGE)
            .unwrap();
        assert_eq!(f.stats(), (3 * PAGE, PAGE));
        // Misaligned: copied.
        f.seek(SeekFrom::Start(0)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x8_0001), &mut f, 2 * PAGE)
            .unwrap();
        assert_eq!(f.stats(), (3 * PAGE, 3 * PAGE));
        // The end of the file: whole pages map, the last 123 bytes are copied.
        f.seek(SeekFrom::Start(PAGE as u64)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x4_0000), &mut f, 4 * PAGE + 123)
            .unwrap();
        assert_eq!(f.stats(), (7 * PAGE, 3 * PAGE + 123));
        assert_eq!(
            read_guest(&mem, 0x1064, 4 * PAGE),
            data[100..100 + 4 * PAGE]
        );
        assert_eq!(read_guest(&mem, 0x8_0001, 2 * PAGE), data[..2 * PAGE]);
        assert_eq!(read_guest(&mem, 0x4_0000, 4 * PAGE + 123), data[PAGE..]);
        // Past the piece, guest memory is still zero.
        assert_eq!(
            read_guest(&mem, 0x4_0000 + 4 * PAGE as u64 + 123, 16),
            [0; 16]
        );
        // Guest writes stay in the guest: neither the source nor the cache entry change.
        mem.write_slice(&[0xee; 16], GuestAddress(0x2000)).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), data);
        let entries: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().flatten().collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(std::fs::read(entries[0].path()).unwrap(), data);
        let mode = entries[0].metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_source_rewritten_in_place_does_not_reach_the_guest() {
        let d = temp_dir("rewrite");
        let cache = ImageCache::new(d.join("cache")).with_min_size(0);
        let data = pattern(8 * PAGE, 1);
        let src = d.join("vmlinux");
        write(&src, &data);
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        let mut f = ImageFile::open(&src, &mem, Some(&cache)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x4000), &mut f, 8 * PAGE)
            .unwrap();
        assert_eq!(f.stats(), (8 * PAGE, 0));
        // As `cp` or a shell redirection rebuilds it: truncated, then written shorter.
        write(&src, &[0x55; 2 * PAGE]);
        assert_eq!(read_guest(&mem, 0x4000, 8 * PAGE), data);
        // The next load sees the new file, through a new entry.
        let mut g = ImageFile::open(&src, &mem, Some(&cache)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x2_0000), &mut g, 2 * PAGE)
            .unwrap();
        assert_eq!(g.stats(), (2 * PAGE, 0));
        assert_eq!(read_guest(&mem, 0x2_0000, 2 * PAGE), [0x55; 2 * PAGE]);
        assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 2);
        // Pruning unlinks old entries; the guest keeps their pages.
        for i in 0..KEEP_ENTRIES + 2 {
            write(&src, &pattern(PAGE + i, i + 10));
            ImageFile::open(&src, &mem, Some(&cache)).unwrap();
        }
        assert_eq!(
            std::fs::read_dir(cache.dir()).unwrap().count(),
            KEEP_ENTRIES
        );
        assert_eq!(read_guest(&mem, 0x4000, 8 * PAGE), data);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn without_a_cache_everything_is_copied() {
        let d = temp_dir("nocache");
        let data = pattern(3 * PAGE, 2);
        let src = d.join("initrd");
        write(&src, &data);
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        let mut f = ImageFile::open(&src, &mem, None).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x8000), &mut f, 3 * PAGE)
            .unwrap();
        assert_eq!(f.stats(), (0, 3 * PAGE));
        // Small files are not cached.
        let small = ImageCache::new(d.join("cache"));
        assert!(!ImageFile::open(&src, &mem, Some(&small)).unwrap().mappable);
        assert!(!d.join("cache").exists());
        assert_eq!(read_guest(&mem, 0x8000, 3 * PAGE), data);
        // An unusable cache directory (a file in its way) falls back to copying.
        write(&d.join("blocker"), b"x");
        let bad = ImageCache::new(d.join("blocker/images")).with_min_size(0);
        let f = ImageFile::open(&src, &mem, Some(&bad)).unwrap();
        assert!(!f.mappable);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_foreign_file_in_the_cache_is_not_used() {
        let d = temp_dir("foreign");
        let cache = ImageCache::new(d.join("cache")).with_min_size(0);
        let src = d.join("k");
        write(&src, &pattern(2 * PAGE, 3));
        let meta = std::fs::metadata(&src).unwrap();
        std::fs::create_dir_all(cache.dir()).unwrap();
        // Same name, wrong size: not trusted.
        write(&cache.dir().join(ImageCache::entry_name(&meta)), b"short");
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        let f = ImageFile::open(&src, &mem, Some(&cache)).unwrap();
        assert!(!f.mappable);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn entry_name_follows_every_change() {
        let d = temp_dir("names");
        let p = d.join("f");
        write(&p, b"one");
        let a = ImageCache::entry_name(&std::fs::metadata(&p).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        write(&p, b"two");
        let b = ImageCache::entry_name(&std::fs::metadata(&p).unwrap());
        assert_ne!(a, b, "a rewrite of the same size must change the name");
        assert!(a.ends_with(".img"));
        std::fs::remove_dir_all(d).unwrap();
    }
}
