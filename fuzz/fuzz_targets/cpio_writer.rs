// SPDX-License-Identifier: Apache-2.0
//! The cpio (newc) writer that builds `ember exec`'s archive: any sequence of directories,
//! files and symlinks with any paths, modes and contents, then the archive, which is read
//! back here (an independent reader) and checked: well-formed headers, every name once,
//! every parent directory before its children, the trailer last, nothing after it.
//! Operation: a kind byte `k` (`k % 3`: directory, file, symlink), a path (length byte +
//! bytes, lossy UTF-8), a mode (u16), an mtime (u32), and for files and symlinks the data
//! (length byte + bytes).
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use ember::cpio::{CpioWriter, S_IFDIR};
use ember_fuzz::Bytes8;
use libfuzzer_sys::fuzz_target;

fn hex(field: &[u8]) -> u32 {
    let s = std::str::from_utf8(field).expect("header fields are ASCII");
    u32::from_str_radix(s, 16).expect("header fields are hex")
}

/// Reads the archive back: (name, mode, data) of every entry, the trailer excluded.
fn read_back(a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        assert!(at + 110 <= a.len(), "truncated header at {at}");
        let h = &a[at..at + 110];
        assert_eq!(&h[..6], b"070701", "magic at {at}");
        let field = |i: usize| hex(&h[6 + 8 * i..14 + 8 * i]);
        let mode = field(1);
        let filesize = field(6) as usize;
        let namesize = field(11) as usize;
        assert!(namesize >= 1);
        let name_end = at + 110 + namesize;
        assert!(name_end <= a.len());
        assert_eq!(a[name_end - 1], 0, "name not NUL-terminated");
        let name = std::str::from_utf8(&a[at + 110..name_end - 1]).expect("UTF-8 name");
        assert!(!name.contains('\0'));
        let data_start = (name_end - at).next_multiple_of(4) + at;
        let data_end = data_start + filesize;
        assert!(data_end <= a.len());
        let next = (data_end - at).next_multiple_of(4) + at;
        if name == "TRAILER!!!" {
            assert_eq!(next, a.len(), "bytes after the trailer");
            return out;
        }
        out.push((name.to_string(), mode, a[data_start..data_end].to_vec()));
        at = next;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes8::new(data);
    let mut w = CpioWriter::new();
    let mut added: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    while !b.is_empty() {
        let k = b.u8() % 3;
        let path = String::from_utf8_lossy(b.chunk()).into_owned();
        let mode = u32::from(b.u16());
        let mtime = b.u32();
        let r = match k {
            0 => w.add_dir(&path, mode),
            1 => {
                let d = b.chunk().to_vec();
                let r = w.add_file(&path, mode, mtime, d.clone());
                if r.is_ok() {
                    added.insert(path.trim_matches('/').to_string(), d);
                }
                r
            }
            _ => {
                let d = b.chunk().to_vec();
                let r = w.add_symlink(&path, &d, mtime);
                if r.is_ok() {
                    added.insert(path.trim_matches('/').to_string(), d);
                }
                r
            }
        };
        let _ = r;
    }
    let n = w.len();
    let archive = w.finish();
    assert_eq!(archive.len() % 4, 0);
    let entries = read_back(&archive);
    assert_eq!(entries.len(), n);
    let mut seen = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for (name, mode, content) in &entries {
        assert!(!name.is_empty() && !name.starts_with('/') && !name.ends_with('/'));
        assert!(
            name.split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."),
            "{name:?}"
        );
        assert!(seen.insert(name.clone()), "{name:?} twice");
        if let Some((parent, _)) = name.rsplit_once('/') {
            assert!(dirs.contains(parent), "{name:?} before its directory");
        }
        if mode & 0o170_000 == S_IFDIR {
            dirs.insert(name.clone());
            assert!(content.is_empty());
        } else {
            assert_eq!(added.get(name), Some(content), "{name:?}");
        }
    }
});
