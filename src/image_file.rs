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
//! Read-only is not immutable: the entry's owner (after a `chmod`) or root can still
//! truncate or rewrite an entry that a running guest maps. Pieces are therefore only mapped
//! into guest memory registered by a [`MappedImages`], whose SIGBUS handler keeps ember
//! alive when it reads a page such a truncation took away, and which reports it when the
//! VM ends.
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
        Some(Self::new(cache_root()?.join("images")))
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
        // Never blocks, should something other than an entry (a FIFO) have its name.
        match crate::user_file::open_regular(&path) {
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
        prune_cache_dir(&self.dir, keep, |name| name.ends_with(".img"), KEEP_ENTRIES);
    }
}

/// The root of ember's caches: `$EMBER_CACHE_DIR`, else `$XDG_CACHE_HOME/ember`, else
/// `$HOME/.cache/ember`; `None` when none of them is set.
pub fn cache_root() -> Option<PathBuf> {
    let var = |k| std::env::var_os(k).filter(|v| !v.is_empty());
    var("EMBER_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| var("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ember")))
        .or_else(|| var("HOME").map(|d| PathBuf::from(d).join(".cache/ember")))
}

/// Keeps the newest `keep_entries` entries of the cache directory `dir` (by modification
/// time; `keep`, the entry just added or used, always stays and counts as one): the others
/// whose names `is_entry` accepts are removed (files, or whole directories), and so are
/// `.tmp-*` leftovers of ember processes that died over an hour ago. Errors are ignored: a
/// concurrent ember may be pruning too.
pub(crate) fn prune_cache_dir(
    dir: &Path,
    keep: &Path,
    is_entry: impl Fn(&str) -> bool,
    keep_entries: usize,
) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    let remove = |path: &Path| {
        let _ = match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
            _ => std::fs::remove_file(path),
        };
    };
    let now = SystemTime::now();
    let mut entries = Vec::new();
    for e in list.flatten() {
        let (path, name) = (e.path(), e.file_name());
        let Ok(modified) = e.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        let name = name.to_string_lossy();
        if name.starts_with(".tmp-") {
            if now.duration_since(modified).unwrap_or_default() > Duration::from_secs(3600) {
                remove(&path);
            }
        } else if is_entry(&name) && path != keep {
            entries.push((modified, path));
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, path) in entries.into_iter().skip(keep_entries.saturating_sub(1)) {
        remove(&path);
    }
}

/// The guest memory of one VM, registered with ember's SIGBUS handler so that pieces of
/// cache entries can be mapped into it (and so that guest memory mapped from a snapshot's
/// memory file is covered too: see [`watch_snapshot_memory`](Self::watch_snapshot_memory));
/// dropped (before the memory is unmapped) when the VM is torn down.
///
/// A cache entry is read-only and only ever unlinked by ember, but its owner can `chmod` and
/// truncate it, and root can write it regardless. The pages past a truncated end then
/// vanish from the private mapping, even those the guest wrote (its private copies): the
/// guest loses them, and a read of one by ember (a device reading guest memory) raises
/// SIGBUS, which would kill ember. The handler installed here
/// maps a zero page over the faulting page when it lies in registered guest memory, and
/// returns; KVM's own accesses to such a page fail inside KVM instead (on the PVM host the
/// guest reads all-ones there; elsewhere `KVM_RUN` may fail with EFAULT). Either way
/// [`report`](Self::report) says, once the VM ends, that the entry changed under it.
#[derive(Debug)]
pub struct MappedImages {
    /// Handler slots of the guest memory ranges (none when the handler is unusable).
    slots: Vec<usize>,
    /// Host address ranges of the guest memory.
    host: Vec<(u64, u64)>,
    /// The snapshot memory file all of the guest memory is mapped from, when the VM was
    /// restored (see [`watch_snapshot_memory`](Self::watch_snapshot_memory)).
    snapshot: Option<MappedEntry>,
}

impl MappedImages {
    /// Registers the guest memory `mem`; cache entries are only mapped into registered
    /// memory (without a registration, or when the handler cannot be installed, images are
    /// copied).
    pub fn new(mem: &GuestMemory) -> Self {
        let host = crate::memory::host_ranges(mem);
        let mut slots = Vec::new();
        if let Err(e) = sigbus::install() {
            log::debug!("cannot install the SIGBUS handler ({e}): images are copied");
        } else {
            for &(start, len) in &host {
                match sigbus::register(start, len) {
                    Some(slot) => slots.push(slot),
                    None => {
                        log::debug!("SIGBUS handler table full: images are copied");
                        for slot in slots.drain(..) {
                            sigbus::release(slot);
                        }
                        break;
                    }
                }
            }
        }
        Self {
            slots,
            host,
            snapshot: None,
        }
    }

    /// Says that the registered guest memory is mapped from `file` (at `path`, `len` bytes),
    /// a snapshot's memory file (see [`crate::memory::guest_memory_from_file`]). Such a
    /// file is the user's, not a read-only cache entry: if another program truncates it
    /// while the VM runs, the pages past its new end vanish from guest memory, as with a
    /// truncated cache entry, and the SIGBUS handler mends what ember reads there with
    /// zeros (when it is installed: [`covered`](Self::covered)). [`report`](Self::report)
    /// then names the file.
    pub fn watch_snapshot_memory(&mut self, path: PathBuf, file: File, len: u64) {
        let addr = self.host.first().map_or(0, |h| h.0);
        self.snapshot = Some(MappedEntry {
            addr,
            file,
            path,
            len,
        });
    }

    /// Whether the SIGBUS handler watches the guest memory (when it cannot be installed,
    /// a page that vanishes from a mapped file kills ember when ember reads it).
    pub fn covered(&self) -> bool {
        !self.slots.is_empty()
    }

    /// What went wrong with mapped cache entries while the VM ran, for the user: entries
    /// that shrank, and pages ember found gone (and replaced with zeros). `None` when
    /// nothing did.
    pub fn report(&self) -> Option<String> {
        let entries = lock_entries();
        let mut shrunk: Vec<String> = Vec::new();
        for e in entries.iter().filter(|e| self.holds(e.addr)) {
            let now = e.file.metadata().map(|m| m.len()).unwrap_or(0);
            let name = e.path.display().to_string();
            if now < e.len && !shrunk.contains(&name) {
                shrunk.push(name);
            }
        }
        let faults: u64 = self.slots.iter().map(|&s| sigbus::faults(s)).sum();
        if let Some(snap) = &self.snapshot {
            // All of guest memory is the snapshot file's: no cache entry is mapped into it.
            let now = snap.file.metadata().map(|m| m.len()).unwrap_or(0);
            if now >= snap.len && faults == 0 {
                return None;
            }
            return Some(format!(
                "snapshot memory file {} was truncated while the VM ran ({} bytes, now {now}; \
                 another program changed it): the guest lost the pages past its new end, its \
                 own writes to them included, and found zeros or all-ones bytes there \
                 instead ({faults} page(s) read by ember replaced with zeros), so its run is \
                 not to be trusted. Do not modify a snapshot's memory file while a VM \
                 restored from it runs",
                snap.path.display(),
                snap.len
            ));
        }
        if shrunk.is_empty() && faults == 0 {
            return None;
        }
        let which = if shrunk.is_empty() {
            "an image cache entry".to_string()
        } else {
            format!("image cache entry {}", shrunk.join(", "))
        };
        Some(format!(
            "{which} was truncated while the VM ran (another program changed ember's \
             read-only copy of the kernel or initrd): the guest lost those pages, its own \
             writes to them included, and found zeros or all-ones bytes there instead \
             ({faults} page(s) read by ember replaced with zeros), so its run is not to be \
             trusted. Do not modify files under the image cache; boot again to use a fresh \
             copy"
        ))
    }

    fn holds(&self, addr: u64) -> bool {
        self.host.iter().any(|&(s, l)| addr >= s && addr - s < l)
    }
}

impl Drop for MappedImages {
    fn drop(&mut self) {
        lock_entries().retain(|e| !self.holds(e.addr));
        for &slot in &self.slots {
            sigbus::release(slot);
        }
    }
}

/// A piece of a cache entry mapped into guest memory, for [`MappedImages::report`].
#[derive(Debug)]
struct MappedEntry {
    /// Host address the piece is mapped at.
    addr: u64,
    /// The entry (its size is checked at the end).
    file: File,
    /// The entry's path.
    path: PathBuf,
    /// The entry's size when it was mapped.
    len: u64,
}

static ENTRIES: std::sync::Mutex<Vec<MappedEntry>> = std::sync::Mutex::new(Vec::new());

fn lock_entries() -> std::sync::MutexGuard<'static, Vec<MappedEntry>> {
    ENTRIES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The SIGBUS handler and its table of registered guest memory. Everything the handler
/// touches is a static atomic, and it makes only raw system calls (mmap, sigaction, raise):
/// it is async-signal-safe.
mod sigbus {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    const SLOTS: usize = 32;
    const PAGE: usize = super::PAGE;

    struct Slot {
        start: AtomicUsize,
        end: AtomicUsize,
        faults: AtomicU64,
    }

    static TABLE: [Slot; SLOTS] = [const {
        Slot {
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            faults: AtomicU64::new(0),
        }
    }; SLOTS];

    /// The action SIGBUS had before ember's, for faults that are not ember's to mend.
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

    /// Installs the handler (once per process).
    pub(super) fn install() -> std::io::Result<()> {
        let r = INSTALLED.get_or_init(|| {
            // SAFETY: sigaction is plain data; all zeroes is a valid (empty) value of it.
            let (mut new, mut old): (libc::sigaction, libc::sigaction) =
                unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            // SAFETY: sa_mask is a valid sigset_t to fill.
            unsafe { libc::sigemptyset(&mut new.sa_mask) };
            // SAFETY: valid pointers to two sigaction structs; `on_sigbus` has the
            // SA_SIGINFO signature and is async-signal-safe. Until PREVIOUS is set just
            // below, a foreign SIGBUS gets the default action (what it had before).
            if unsafe { libc::sigaction(libc::SIGBUS, &new, &mut old) } != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            let _ = PREVIOUS.set(old);
            Ok(())
        });
        r.map_err(std::io::Error::from_raw_os_error)
    }

    /// Registers host range `[start, start + len)`; its slot, or `None` when all are taken.
    pub(super) fn register(start: u64, len: u64) -> Option<usize> {
        let start = usize::try_from(start).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        for (i, slot) in TABLE.iter().enumerate() {
            if slot
                .start
                .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.faults.store(0, Ordering::Relaxed);
                slot.end.store(end, Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    /// Frees a slot from [`register`].
    pub(super) fn release(slot: usize) {
        TABLE[slot].end.store(0, Ordering::Release);
        TABLE[slot].start.store(0, Ordering::Release);
    }

    /// Pages mended in a slot's range.
    pub(super) fn faults(slot: usize) -> u64 {
        TABLE[slot].faults.load(Ordering::Relaxed)
    }

    /// Whether `[addr, addr + len)` lies in one registered range.
    pub(super) fn covers(addr: usize, len: usize) -> bool {
        let Some(last) = addr.checked_add(len) else {
            return false;
        };
        TABLE.iter().any(|s| {
            let start = s.start.load(Ordering::Acquire);
            start != 0 && addr >= start && last <= s.end.load(Ordering::Acquire)
        })
    }

    extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; si_addr is
        // the fault address for the BUS_ADRERR code checked first.
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        if code == libc::BUS_ADRERR {
            for slot in &TABLE {
                let start = slot.start.load(Ordering::Acquire);
                if start == 0 || addr < start || addr >= slot.end.load(Ordering::Acquire) {
                    continue;
                }
                let page = addr & !(PAGE - 1);
                // SAFETY: the page lies in registered guest memory, a mapping ember owns for
                // the VM's lifetime (the registration is released before it is unmapped).
                // Guest memory is only ever accessed through volatile copies, so replacing a
                // page that vanished (its file was truncated) with a zero page in place
                // breaks no Rust reference: the faulting copy retries and reads zeros.
                let p = unsafe {
                    libc::mmap(
                        page as *mut libc::c_void,
                        PAGE,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE
                            | libc::MAP_ANONYMOUS
                            | libc::MAP_FIXED
                            | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    slot.faults.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        // Not ember's to mend: what SIGBUS would have done without this handler.
        match PREVIOUS.get() {
            Some(prev)
                if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN =>
            {
                if prev.sa_flags & libc::SA_SIGINFO != 0 {
                    // SAFETY: an SA_SIGINFO handler has this signature; it was installed for
                    // SIGBUS before ours, so it handles exactly this situation.
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        unsafe { std::mem::transmute(prev.sa_sigaction) };
                    f(sig, info, ctx);
                } else {
                    // SAFETY: a plain handler has this signature (see above).
                    let f: extern "C" fn(libc::c_int) =
                        unsafe { std::mem::transmute(prev.sa_sigaction) };
                    f(sig);
                }
            }
            _ => {
                // SAFETY: a zeroed sigaction is SIG_DFL with no flags; sigaction and raise
                // are async-signal-safe. The raised SIGBUS is blocked until this handler
                // returns, then kills the process as it would have without ember's handler.
                unsafe {
                    let dfl: libc::sigaction = std::mem::zeroed();
                    libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
                    libc::raise(libc::SIGBUS);
                }
            }
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
    /// The file is a cache entry, so pieces of it may be mapped (into guest memory that a
    /// [`MappedImages`] registered).
    mappable: bool,
    /// The cache entry's path, when it is one.
    entry: Option<PathBuf>,
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
        let (file, entry) = match cache.filter(cacheable) {
            Some(c) => match c.entry(&source, &meta) {
                Ok(entry) => (entry, Some(c.dir.join(ImageCache::entry_name(&meta)))),
                Err(e) => {
                    log::debug!(
                        "image cache {}: {e}; copying {} into guest memory",
                        c.dir().display(),
                        path.display()
                    );
                    (source, None)
                }
            },
            None => (source, None),
        };
        let guest = crate::memory::host_ranges(mem);
        Ok(Self {
            file,
            len: meta.len(),
            mappable: entry.is_some(),
            entry,
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
        if !sigbus::covers(addr, len) {
            // No SIGBUS handler watches this memory: a truncated entry could kill ember.
            return Ok(false);
        }
        // SAFETY: [addr, addr + len) lies inside guest memory (checked by the caller with
        // `inside_guest`), a private anonymous mapping that ember owns for the VM's lifetime
        // and that nothing else reads or writes while images load (no vCPU runs yet).
        // MAP_FIXED replaces those pages with private (copy-on-write) pages of the file in
        // place: the guest memory mapping keeps its address and length, so every pointer
        // into it stays valid, and unmapping guest memory unmaps these pages too. The file
        // is a cache entry at least `off + len` bytes long now (the caller keeps the range
        // within the size). Nothing makes it immutable: ember never writes or truncates an
        // entry, but its owner (after a chmod) or root can. Then the guest's unwritten pages
        // show the new bytes, or, past a truncated end, vanish (written ones too). Ember only reaches guest
        // memory through volatile copies, so changed bytes break no Rust invariant, and a
        // vanished page read by ember raises SIGBUS in registered memory (`covers` above),
        // which `sigbus` mends with a zero page; KVM's own accesses fail inside KVM.
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
        if let (Some(path), Ok(file)) = (&self.entry, self.file.try_clone()) {
            let mut entries = lock_entries();
            let guest = &self.guest;
            let same_vm = |a: u64| guest.iter().any(|&(s, l)| a >= s && a - s < l);
            if !entries.iter().any(|e| &e.path == path && same_vm(e.addr)) {
                entries.push(MappedEntry {
                    addr: addr as u64,
                    file,
                    path: path.clone(),
                    len: self.len,
                });
            }
        }
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
        let _registered = MappedImages::new(&mem);
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
        let _registered = MappedImages::new(&mem);
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
    fn a_cache_entry_truncated_under_the_guest_reads_as_zeros_not_sigbus() {
        let d = temp_dir("truncated");
        let cache = ImageCache::new(d.join("cache")).with_min_size(0);
        let data = pattern(8 * PAGE, 4);
        let src = d.join("vmlinux");
        write(&src, &data);
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        let registered = MappedImages::new(&mem);
        let mut f = ImageFile::open(&src, &mem, Some(&cache)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x4000), &mut f, 8 * PAGE)
            .unwrap();
        assert_eq!(f.stats(), (8 * PAGE, 0));
        // The guest writes one page of its own (a private copy, but truncation takes even
        // those away: POSIX wants SIGBUS past the end of any mapping of the file).
        mem.write_slice(&[0xee; 16], GuestAddress(0x4000 + 5 * PAGE as u64))
            .unwrap();
        assert_eq!(registered.report(), None);
        // Another writer (the entry's owner after a chmod, or root) truncates the entry.
        let entry = std::fs::read_dir(cache.dir())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        OpenOptions::new()
            .write(true)
            .open(entry.path())
            .unwrap()
            .set_len(2 * PAGE as u64)
            .unwrap();
        // Reading the mapped range must not raise SIGBUS: the pages within the new size
        // are the old bytes, the vanished ones (the written one too) read as zeros.
        let got = read_guest(&mem, 0x4000, 8 * PAGE);
        assert_eq!(got[..2 * PAGE], data[..2 * PAGE]);
        assert!(got[2 * PAGE..].iter().all(|&b| b == 0));
        let report = registered.report().expect("no report");
        assert!(
            report.contains("was truncated while the VM ran"),
            "{report}"
        );
        assert!(
            report.contains(&entry.path().display().to_string()),
            "{report}"
        );
        assert!(report.contains("(6 page(s) read by ember"), "{report}");
        // The mended pages are plain memory again.
        mem.write_slice(&[0x77; 4], GuestAddress(0x4000 + 3 * PAGE as u64))
            .unwrap();
        assert_eq!(read_guest(&mem, 0x4000 + 3 * PAGE as u64, 4), [0x77; 4]);
        drop(registered);
        // Without a registration nothing is mapped (a SIGBUS there would not be mended).
        let mut g = ImageFile::open(&src, &mem, Some(&cache)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x4000), &mut g, 8 * PAGE)
            .unwrap();
        assert_eq!(g.stats(), (0, 8 * PAGE));
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
        // A FIFO with the entry's name: not opened for reading (that would block), not used.
        let entry = cache.dir().join(ImageCache::entry_name(&meta));
        std::fs::remove_file(&entry).unwrap();
        let c = std::ffi::CString::new(entry.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
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
