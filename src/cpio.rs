// SPDX-License-Identifier: Apache-2.0
//! A small writer for "newc" cpio archives (the format Linux unpacks as an initramfs), used by
//! `ember exec` to hand files, the command and its environment to the guest without a disk
//! or a network.
//!
//! Format (see the kernel's `Documentation/driver-api/early-userspace/buffer-format.rst`):
//! every entry is a 110-byte ASCII header (`070701` and 13 eight-digit hex fields), the path
//! name with its terminating NUL, zero padding to a multiple of four bytes, the data, and
//! zero padding to a multiple of four again. The archive ends with an entry named
//! `TRAILER!!!`. Linux unpacks several archives placed one after another (each starting
//! four-byte aligned), later entries replacing earlier files of the same name; directories
//! that already exist are kept as they are.
//!
//! The writer adds every missing parent directory before an entry, so a guest path such as
//! `/root/a/b.txt` needs no separate directory entries, and rejects paths that would escape
//! the root or repeat an entry.

use std::collections::BTreeSet;

/// `S_IFDIR`.
pub const S_IFDIR: u32 = 0o040_000;
/// `S_IFREG`.
pub const S_IFREG: u32 = 0o100_000;
/// `S_IFLNK`.
pub const S_IFLNK: u32 = 0o120_000;
/// Mode of the parent directories the writer creates on its own.
pub const DEFAULT_DIR_MODE: u32 = 0o755;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
/// The kernel's limit on a path name in an initramfs (PATH_MAX).
const MAX_NAME: usize = 4095;
/// First inode number handed out: high enough not to meet the numbers of a base archive
/// (which only matter for hard links, but unique numbers cost nothing).
const FIRST_INO: u32 = 0x00e0_0000;

/// Errors while adding entries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    /// The guest path is empty, relative, or holds `.`/`..`/empty components or a NUL.
    #[error(
        "invalid guest path {0:?}: it must be absolute, without `.`, `..`, `//` or NUL \
         (for example /root/data.txt)"
    )]
    BadPath(String),
    /// The path is longer than Linux accepts.
    #[error("guest path {0:?} is longer than {MAX_NAME} bytes")]
    PathTooLong(String),
    /// The same path was added twice (or a file is used as a directory).
    #[error("guest path {0} is given twice (or used both as a file and as a directory)")]
    Duplicate(String),
    /// The path is the archive's end marker: an unpacker would stop at it.
    #[error("guest path /{TRAILER} cannot be in an archive: it is the cpio format's end marker")]
    Trailer,
    /// The entry is larger than a newc header can describe (4 GiB).
    #[error("{0} is too large for a cpio archive (at most 4 GiB per file)")]
    TooLarge(String),
}

/// One entry of the archive, kept until [`CpioWriter::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    mode: u32,
    mtime: u32,
    data: Vec<u8>,
}

/// Builds a newc archive in memory.
#[derive(Debug, Default)]
pub struct CpioWriter {
    entries: Vec<Entry>,
    dirs: BTreeSet<String>,
    others: BTreeSet<String>,
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its missing parents). `mode`: permission bits (`0o755`).
    /// Adding a directory that is already there (explicitly or as a parent) is allowed; the
    /// first mode given wins.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        let name = normalize(path)?;
        if name.is_empty() {
            return Ok(()); // "/" always exists.
        }
        self.add_parents(&name)?;
        if self.others.contains(&name) {
            return Err(CpioError::Duplicate(format!("/{name}")));
        }
        if self.dirs.insert(name.clone()) {
            self.entries.push(Entry {
                name,
                mode: S_IFDIR | (mode & 0o7777),
                mtime: 0,
                data: Vec::new(),
            });
        }
        Ok(())
    }

    /// Adds a regular file with permission bits `mode` (e.g. `0o644`), creating missing
    /// parent directories.
    pub fn add_file(
        &mut self,
        path: &str,
        mode: u32,
        mtime: u32,
        data: Vec<u8>,
    ) -> Result<(), CpioError> {
        self.add_leaf(path, S_IFREG | (mode & 0o7777), mtime, data)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &[u8], mtime: u32) -> Result<(), CpioError> {
        self.add_leaf(path, S_IFLNK | 0o777, mtime, target.to_vec())
    }

    fn add_leaf(
        &mut self,
        path: &str,
        mode: u32,
        mtime: u32,
        data: Vec<u8>,
    ) -> Result<(), CpioError> {
        let name = normalize(path)?;
        if name.is_empty() {
            return Err(CpioError::BadPath(path.to_string()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::TooLarge(format!("/{name}")));
        }
        self.add_parents(&name)?;
        if self.dirs.contains(&name) || !self.others.insert(name.clone()) {
            return Err(CpioError::Duplicate(format!("/{name}")));
        }
        self.entries.push(Entry {
            name,
            mode,
            mtime,
            data,
        });
        Ok(())
    }

    /// Adds every missing parent directory of `name` (already normalized), outermost first.
    fn add_parents(&mut self, name: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(i) = name[end..].find('/') {
            let parent = &name[..end + i];
            if self.others.contains(parent) {
                return Err(CpioError::Duplicate(format!("/{parent}")));
            }
            if self.dirs.insert(parent.to_string()) {
                self.entries.push(Entry {
                    name: parent.to_string(),
                    mode: S_IFDIR | DEFAULT_DIR_MODE,
                    mtime: 0,
                    data: Vec::new(),
                });
            }
            end += i + 1;
        }
        Ok(())
    }

    /// Number of entries so far (without the trailer).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The archive: every entry in the order added (parents first), then the trailer. Its
    /// length is a multiple of four.
    pub fn finish(self) -> Vec<u8> {
        let size: usize = self
            .entries
            .iter()
            .map(|e| entry_len(e.name.len(), e.data.len()))
            .sum::<usize>()
            + entry_len(TRAILER.len(), 0);
        let mut out = Vec::with_capacity(size);
        let mut ino = FIRST_INO;
        for e in &self.entries {
            let nlink = if e.mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
            write_entry(&mut out, ino, e.mode, nlink, e.mtime, &e.name, &e.data);
            ino = ino.wrapping_add(1);
        }
        write_entry(&mut out, 0, 0, 1, 0, TRAILER, &[]);
        debug_assert_eq!(out.len(), size);
        out
    }
}

/// Bytes one entry takes: header and name padded to 4, data padded to 4.
fn entry_len(name_len: usize, data_len: usize) -> usize {
    (110 + name_len + 1).next_multiple_of(4) + data_len.next_multiple_of(4)
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    name: &str,
    data: &[u8],
) {
    let start = out.len();
    out.extend_from_slice(MAGIC);
    // Lengths were checked when the entry was added (name <= MAX_NAME, data < 4 GiB).
    let filesize = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    for field in [
        ino, mode, 0, 0, nlink, mtime, filesize, 0, 0, 0, 0, namesize, 0,
    ] {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out, start);
    let data_start = out.len();
    out.extend_from_slice(data);
    pad4(out, data_start);
}

fn pad4(out: &mut Vec<u8>, from: usize) {
    let len = out.len() - from;
    out.resize(from + len.next_multiple_of(4), 0);
}

/// `/a/b` -> `a/b`; `/` -> ``. Rejects relative paths and `.`, `..`, empty components.
fn normalize(path: &str) -> Result<String, CpioError> {
    let bad = || CpioError::BadPath(path.to_string());
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if path.contains('\0') {
        return Err(bad());
    }
    if !rest.is_empty()
        && rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    if rest.len() > MAX_NAME {
        return Err(CpioError::PathTooLong(path.to_string()));
    }
    // An entry named like the end marker would end the archive for the unpacker there (found
    // by the cpio_writer fuzz target).
    if rest.split('/').next() == Some(TRAILER) {
        return Err(CpioError::Trailer);
    }
    Ok(rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed entry: (name, mode, nlink, mtime, data).
    type Parsed = (String, u32, u32, u32, Vec<u8>);

    /// An independent reader for the archive the writer produced: checks the magic, the
    /// alignment of every header and data block, and that all padding is zero.
    fn parse(archive: &[u8]) -> Vec<Parsed> {
        let field = |h: &[u8], i: usize| {
            let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(pos % 4, 0, "header at {pos} not aligned");
            let h = &archive[pos..pos + 110];
            assert_eq!(&h[..6], b"070701");
            let (mode, nlink, mtime, size, namesize) = (
                field(h, 1),
                field(h, 4),
                field(h, 5),
                field(h, 6) as usize,
                field(h, 11) as usize,
            );
            assert_eq!(field(h, 12), 0, "check field");
            let name_start = pos + 110;
            let name = &archive[name_start..name_start + namesize];
            assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
            let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
            let data_start = (name_start + namesize).next_multiple_of(4);
            assert!(archive[name_start + namesize..data_start]
                .iter()
                .all(|&b| b == 0));
            let data = archive[data_start..data_start + size].to_vec();
            let next = (data_start + size).next_multiple_of(4);
            assert!(archive[data_start + size..next].iter().all(|&b| b == 0));
            pos = next;
            if name == "TRAILER!!!" {
                assert_eq!(pos, archive.len(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, nlink, mtime, data));
        }
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let a = CpioWriter::new().finish();
        assert_eq!(a.len() % 4, 0);
        assert!(parse(&a).is_empty());
        // 110-byte header + "TRAILER!!!\0" (11) = 121, padded to 124.
        assert_eq!(a.len(), 124);
        assert_eq!(&a[110..121], b"TRAILER!!!\0");
    }

    #[test]
    fn header_fields_are_exact() {
        let mut w = CpioWriter::new();
        w.add_file("/x", 0o644, 0x1234, b"abc".to_vec()).unwrap();
        let a = w.finish();
        let expected_header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            FIRST_INO, 0o100_644, 0, 0, 1, 0x1234, 3, 0, 0, 0, 0, 2, 0
        );
        assert_eq!(&a[..110], expected_header.as_bytes());
        // name "x\0" ends at 112 (aligned), data "abc" + one pad byte.
        assert_eq!(&a[110..116], b"x\0abc\0");
        assert_eq!(&a[116..122], b"070701");
    }

    #[test]
    fn padding_for_every_name_and_data_length() {
        for name_len in 1..=9 {
            for data_len in 0..=9 {
                let mut w = CpioWriter::new();
                let path = format!("/{}", "n".repeat(name_len));
                let data: Vec<u8> = (0..data_len)
                    .map(|i| u8::try_from(i).unwrap() + 1)
                    .collect();
                w.add_file(&path, 0o600, 0, data.clone()).unwrap();
                let a = w.finish();
                assert_eq!(a.len() % 4, 0);
                let e = parse(&a);
                assert_eq!(e.len(), 1);
                assert_eq!(e[0].0, path[1..]);
                assert_eq!(e[0].4, data);
            }
        }
    }

    #[test]
    fn parents_come_first_and_once() {
        let mut w = CpioWriter::new();
        w.add_file("/root/a/b.txt", 0o644, 0, b"b".to_vec())
            .unwrap();
        w.add_file("/root/a/c.txt", 0o755, 0, b"c".to_vec())
            .unwrap();
        w.add_dir("/root", 0o700).unwrap(); // already there as a parent: no new entry
        w.add_dir("/ember", 0o700).unwrap();
        let e = parse(&w.finish());
        let names: Vec<_> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            ["root", "root/a", "root/a/b.txt", "root/a/c.txt", "ember"]
        );
        assert_eq!(e[0].1, S_IFDIR | 0o755);
        assert_eq!(e[0].2, 2);
        assert_eq!(e[3].1, S_IFREG | 0o755);
        assert_eq!(e[4].1, S_IFDIR | 0o700);
    }

    #[test]
    fn mode_bits_keep_only_permissions() {
        let mut w = CpioWriter::new();
        w.add_file("/f", 0o104_755, 0, vec![]).unwrap(); // a stray type bit is dropped
        w.add_symlink("/l", b"f", 0).unwrap();
        let e = parse(&w.finish());
        assert_eq!(e[0].1, S_IFREG | 0o4755);
        assert_eq!(e[1].1, S_IFLNK | 0o777);
        assert_eq!(e[1].4, b"f");
    }

    #[test]
    fn bad_paths_are_rejected() {
        let mut w = CpioWriter::new();
        for p in ["", "rel", "/a/../b", "/a/./b", "/a//b", "/..", "/a\0b"] {
            assert!(
                matches!(w.add_file(p, 0o644, 0, vec![]), Err(CpioError::BadPath(_))),
                "{p:?}"
            );
        }
        assert!(matches!(
            w.add_file("/", 0o644, 0, vec![]),
            Err(CpioError::BadPath(_))
        ));
        let long = format!("/{}", "a".repeat(MAX_NAME + 1));
        assert!(matches!(
            w.add_file(&long, 0o644, 0, vec![]),
            Err(CpioError::PathTooLong(_))
        ));
        assert!(w.is_empty());
    }

    #[test]
    fn duplicates_and_file_as_directory_are_rejected() {
        let mut w = CpioWriter::new();
        w.add_file("/a", 0o644, 0, vec![]).unwrap();
        assert_eq!(
            w.add_file("/a", 0o644, 0, vec![]),
            Err(CpioError::Duplicate("/a".into()))
        );
        assert_eq!(
            w.add_file("/a/b", 0o644, 0, vec![]),
            Err(CpioError::Duplicate("/a".into()))
        );
        assert_eq!(
            w.add_dir("/a", 0o755),
            Err(CpioError::Duplicate("/a".into()))
        );
        w.add_dir("/d", 0o755).unwrap();
        assert_eq!(
            w.add_file("/d", 0o644, 0, vec![]),
            Err(CpioError::Duplicate("/d".into()))
        );
        w.add_dir("/d/", 0o755).unwrap();
        assert_eq!(w.len(), 2);
    }

    /// The host's GNU cpio, when installed, reads the archive back with the same names, modes
    /// and contents (an independent implementation of the format).
    #[test]
    fn gnu_cpio_reads_it() {
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("skipped: no cpio(1) on this host");
            return;
        };
        assert!(out.status.success());
        let dir = std::env::temp_dir().join(format!("ember-cpio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = CpioWriter::new();
        w.add_file(
            "/root/sub dir/it's.txt",
            0o640,
            1_700_000_000,
            b"hello\n".to_vec(),
        )
        .unwrap();
        w.add_file("/ember/cmd", 0o755, 0, b"exec true\n".to_vec())
            .unwrap();
        w.add_symlink("/root/link", b"sub dir/it's.txt", 0).unwrap();
        let archive = w.finish();
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet", "--no-absolute-filenames"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&archive).unwrap();
        }
        assert!(child.wait().unwrap().success());
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let f = dir.join("root/sub dir/it's.txt");
        assert_eq!(std::fs::read(&f).unwrap(), b"hello\n");
        let meta = std::fs::metadata(&f).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(meta.mtime(), 1_700_000_000);
        let cmd = std::fs::metadata(dir.join("ember/cmd")).unwrap();
        assert_eq!(cmd.permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            std::fs::read_link(dir.join("root/link")).unwrap(),
            std::path::Path::new("sub dir/it's.txt")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_entry_named_like_the_end_marker_is_refused() {
        let mut w = CpioWriter::new();
        assert!(matches!(
            w.add_file("/TRAILER!!!", 0o644, 0, b"x".to_vec()),
            Err(CpioError::Trailer)
        ));
        assert!(matches!(
            w.add_symlink("/TRAILER!!!/", b"/x", 0),
            Err(CpioError::Trailer)
        ));
        assert!(matches!(
            w.add_dir("/TRAILER!!!", 0o755),
            Err(CpioError::Trailer)
        ));
        // Below it: the parent directory's entry would be named like the marker.
        assert!(matches!(
            w.add_file("/TRAILER!!!/f", 0o644, 0, vec![]),
            Err(CpioError::Trailer)
        ));
        // Other names that contain it are fine.
        w.add_file("/a/TRAILER!!!", 0o644, 0, vec![]).unwrap();
        w.add_file("/TRAILER!!!x", 0o644, 0, vec![]).unwrap();
    }
}
