// SPDX-License-Identifier: Apache-2.0
//! The snapshot cache of warm `ember exec` (`$EMBER_CACHE_DIR/snapshots`, by default
//! `~/.cache/ember/snapshots`): one snapshot directory ([`format`](super::format)) per VM
//! configuration, named after a [`CacheKey`].
//!
//! Safe under concurrent ember processes, with the same rules as the image cache
//! ([`crate::image_file`]): an entry is written under a temporary name (`.tmp-*`) and renamed
//! into place whole, so a reader sees a complete entry or none; when two processes create the
//! same entry, the first rename wins and the other discards its copy; entries are never
//! changed in place, only removed (a restored VM maps the memory file privately, and keeps
//! the pages of an unlinked file). Each entry holds a `key` file with the full key text,
//! compared on lookup, so a hash collision can only cost a cold boot, never a wrong guest.
//! The newest [`KEEP_ENTRIES`] entries (by use) are kept.

use std::fmt::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::VmConfig;

/// Entries kept (the newest by use).
pub const KEEP_ENTRIES: usize = 4;

/// The file in an entry that holds the key text.
const KEY_FILE: &str = "key";

/// What a snapshot of a freshly booted VM depends on: ember's version and snapshot format,
/// the ember binary (by identity), the host (its KVM and CPU), the kernel and initrd files (by identity: device, inode,
/// size, modification and change times, so that a rebuilt kernel makes a new key), and the
/// guest-visible parts of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    text: String,
}

impl CacheKey {
    /// The key of a VM built from `config`. Host-side settings that the guest cannot see
    /// (where the consoles go, the vsock socket path, the image cache, which directory a
    /// share serves and how) are left out; files
    /// that cannot be read make the error.
    pub fn new(config: &VmConfig) -> std::io::Result<Self> {
        let mut text = format!(
            "ember {}\nsnapshot format {}\nhost {}\n",
            env!("CARGO_PKG_VERSION"),
            super::format::FORMAT_VERSION,
            host_identity()
        );
        // The ember binary itself: a rebuilt ember may save or restore devices differently
        // without a new version number (during development), so its snapshots are not used.
        if let Ok(exe) = std::env::current_exe() {
            let _ = writeln!(
                text,
                "binary {}",
                file_identity(&exe).unwrap_or_else(|_| exe.display().to_string())
            );
        }
        let _ = writeln!(text, "kernel {}", file_identity(&config.kernel)?);
        if let Some(i) = &config.initrd {
            let _ = writeln!(text, "initrd {}", file_identity(i)?);
        }
        let mut c = config.clone();
        c.console = Default::default();
        c.com2 = c.com2.map(|_| Default::default());
        c.stdin = false;
        c.image_cache = None;
        if let Some(v) = &mut c.vsock {
            v.uds = PathBuf::new();
        }
        // A share is its tag to the guest until it mounts it (after the snapshot): the
        // directory, read-only and cache mode are virtiofsd's settings, given at restore.
        for (i, s) in c.shares.iter_mut().enumerate() {
            *s = crate::config::ShareConfig {
                tag: Some(s.tag(i)),
                ..crate::config::ShareConfig::new("")
            };
        }
        let _ = writeln!(text, "config {c:?}");
        Ok(Self { text })
    }

    /// The entry's directory name: 16 hex digits of a hash of the key text.
    pub fn name(&self) -> String {
        // FNV-1a, 64 bits: stable across Rust versions (unlike std's hasher); collisions are
        // caught by the key file.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.text.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The full key text.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// `path`'s device, inode, size, modification and change times.
fn file_identity(path: &Path) -> std::io::Result<String> {
    let m = std::fs::metadata(path)?;
    Ok(format!(
        "{} dev {:x} ino {:x} size {} mtime {}.{:09} ctime {}.{:09}",
        path.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// The host facts a snapshot depends on: PVM or not, the host kernel, the CPU model.
fn host_identity() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("", |(_, m)| m.trim());
    format!(
        "pvm={} kernel={} cpu={model}",
        crate::host::HostInfo::detect().pvm,
        kernel.trim()
    )
}

/// The snapshot cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotCache {
    dir: PathBuf,
}

impl SnapshotCache {
    /// A cache in `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache this process uses: `snapshots` under [`crate::image_file::cache_root`].
    pub fn from_env() -> Option<Self> {
        Some(Self::new(
            crate::image_file::cache_root()?.join("snapshots"),
        ))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry for `key`, when there is a complete one with the same key text. Marks it
    /// used (its modification time), so pruning keeps it.
    pub fn lookup(&self, key: &CacheKey) -> Option<PathBuf> {
        let dir = self.dir.join(key.name());
        let text = std::fs::read_to_string(dir.join(KEY_FILE)).ok()?;
        if text != key.text {
            log::info!(
                "snapshot cache: {} belongs to another configuration (hash collision); \
                 ignoring it",
                dir.display()
            );
            return None;
        }
        let complete = [super::format::STATE_FILE, super::format::MEMORY_FILE]
            .iter()
            .all(|f| dir.join(f).is_file());
        if !complete {
            return None;
        }
        touch(&dir);
        Some(dir)
    }

    /// A new, empty staging directory to write an entry into (`.tmp-*`, private).
    pub fn staging(&self) -> std::io::Result<PathBuf> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = self
            .dir
            .join(format!(".tmp-{}-{nanos:09}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(path)
    }

    /// Makes the snapshot written into `staging` the entry for `key` (adding the key file),
    /// unless another process was first (then `staging` is removed and its entry is
    /// returned). Prunes old entries.
    pub fn install(&self, staging: &Path, key: &CacheKey) -> std::io::Result<PathBuf> {
        let entry = self.dir.join(key.name());
        let result = std::fs::write(staging.join(KEY_FILE), &key.text)
            .and_then(|()| std::fs::rename(staging, &entry));
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(staging);
            // Another ember installed the same entry first (the rename onto a non-empty
            // directory fails): use theirs.
            if self.lookup(key).is_none() {
                return Err(e);
            }
        }
        crate::image_file::prune_cache_dir(
            &self.dir,
            &entry,
            |name| name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()),
            KEEP_ENTRIES,
        );
        Ok(entry)
    }

    /// Removes the entry for `key` (one that could not be restored).
    pub fn remove(&self, key: &CacheKey) {
        let entry = self.dir.join(key.name());
        // Renamed away first, so that no other process finds it half-removed.
        let doomed = self
            .dir
            .join(format!(".tmp-rm-{}-{}", std::process::id(), key.name()));
        if std::fs::rename(&entry, &doomed).is_ok() {
            let _ = std::fs::remove_dir_all(&doomed);
        }
    }
}

/// Sets `path`'s modification time to now (errors ignored: only pruning order depends on it).
fn touch(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path; a null `times` sets both times to now.
    unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        let mut c = VmConfig::new(kernel);
        c.image_cache = None;
        c
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn fake_snapshot(dir: &Path) {
        std::fs::write(dir.join(super::super::format::STATE_FILE), b"s").unwrap();
        std::fs::write(dir.join(super::super::format::MEMORY_FILE), b"m").unwrap();
    }

    #[test]
    fn key_follows_the_guest_not_the_host_side_settings() {
        let d = tmpdir("key");
        let c = config(&d);
        let k = CacheKey::new(&c).unwrap();
        let mut host_side = c.clone();
        host_side.console = crate::config::ConsoleSink::Null;
        host_side.stdin = true;
        assert_eq!(CacheKey::new(&host_side).unwrap(), k);
        let mut more_mem = c.clone();
        more_mem.mem_mib += 1;
        assert_ne!(CacheKey::new(&more_mem).unwrap().name(), k.name());
        let mut cmdline = c.clone();
        cmdline.cmdline.push_str(" x");
        assert_ne!(CacheKey::new(&cmdline).unwrap().name(), k.name());
        // A share is its tag: another directory, ro or cache mode is the same guest; another
        // tag or another count is not.
        let mut share = c.clone();
        share.shares.push(crate::config::ShareConfig::new("/a"));
        let ks = CacheKey::new(&share).unwrap();
        assert_ne!(ks.name(), k.name());
        let mut other_dir = share.clone();
        other_dir.shares[0].dir = "/b".into();
        other_dir.shares[0].readonly = true;
        other_dir.shares[0].cache = crate::config::ShareCache::Never;
        assert_eq!(CacheKey::new(&other_dir).unwrap(), ks);
        let mut explicit = share.clone();
        explicit.shares[0].tag = Some("share0".into());
        assert_eq!(CacheKey::new(&explicit).unwrap(), ks);
        explicit.shares[0].tag = Some("data".into());
        assert_ne!(CacheKey::new(&explicit).unwrap(), ks);
        share.shares.push(crate::config::ShareConfig::new("/a"));
        assert_ne!(CacheKey::new(&share).unwrap(), ks);
        // A kernel rebuilt in place is another kernel.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&c.kernel, b"kernel 2").unwrap();
        assert_ne!(CacheKey::new(&c).unwrap().name(), k.name());
        std::fs::remove_file(&c.kernel).unwrap();
        assert!(CacheKey::new(&c).is_err());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn install_lookup_collision_and_prune() {
        let d = tmpdir("install");
        let cache = SnapshotCache::new(d.join("snapshots"));
        let c = config(&d);
        let key = CacheKey::new(&c).unwrap();
        assert_eq!(cache.lookup(&key), None);
        let s = cache.staging().unwrap();
        fake_snapshot(&s);
        let entry = cache.install(&s, &key).unwrap();
        assert!(!s.exists());
        assert_eq!(cache.lookup(&key), Some(entry.clone()));
        // A second process installing the same key keeps the first entry.
        let s2 = cache.staging().unwrap();
        fake_snapshot(&s2);
        assert_eq!(cache.install(&s2, &key).unwrap(), entry);
        assert!(!s2.exists());
        // An entry whose key text differs (a hash collision) is not used.
        std::fs::write(entry.join(KEY_FILE), "something else").unwrap();
        assert_eq!(cache.lookup(&key), None);
        cache.remove(&key);
        assert!(!entry.exists());
        // Only the newest KEEP_ENTRIES stay.
        for mem in 0..(KEEP_ENTRIES as u64 + 2) {
            let mut c2 = c.clone();
            c2.mem_mib = 100 + mem;
            let s = cache.staging().unwrap();
            fake_snapshot(&s);
            cache.install(&s, &CacheKey::new(&c2).unwrap()).unwrap();
        }
        let n = std::fs::read_dir(cache.dir()).unwrap().count();
        assert_eq!(n, KEEP_ENTRIES);
        let _ = std::fs::remove_dir_all(d);
    }
}
