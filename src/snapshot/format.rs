// SPDX-License-Identifier: Apache-2.0
//! The on-disk layout of a snapshot: a directory with
//!
//! - `state` ([`STATE_FILE`]): everything but guest RAM, in one versioned, checksummed file
//!   written by [`write_state`] and read back by [`read_state`];
//! - `memory` ([`MEMORY_FILE`]): guest RAM as raw bytes, written and mapped elsewhere.
//!
//! The `state` file (all integers little-endian):
//!
//! ```text
//! offset        size  field
//! 0             8     magic "EMBERSNP"
//! 8             4     format version (u32), FORMAT_VERSION
//! 12            2     length V of the ember version string (u16, at most 64)
//! 14            V     the ember version that wrote the file (UTF-8), for messages
//! 14+V          8     payload length P (u64, at most MAX_PAYLOAD)
//! 22+V          P     payload: the state, serde + postcard
//! 22+V+P        4     CRC-32 (crc32fast, IEEE) of every byte before it
//! ```
//!
//! [`read_state`] checks, in this order: the magic, the format version (a file of another
//! version is refused before anything else of it is interpreted), the header's lengths
//! against the file's size (truncated, trailing bytes, a payload over [`MAX_PAYLOAD`]), the
//! checksum, and last that the payload decodes to the expected type with no byte left over.
//! Each refusal is its own [`SnapshotError`] variant; nothing is allocated beyond the file's
//! size (itself bounded by the header limits), and no byte string makes it panic.
//!
//! The format version is bumped whenever the layout or any serialized state type changes
//! (postcard is not self-describing: a changed struct would decode as garbage or not at all).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::kvm_state::StateError;

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the guest memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The first 8 bytes of every state file.
pub const MAGIC: [u8; 8] = *b"EMBERSNP";
/// The state file format this ember writes and reads.
pub const FORMAT_VERSION: u32 = 3;
/// Longest ember version string in a header.
pub const MAX_VERSION_STRING: usize = 64;
/// Largest payload accepted (and written): the state without guest RAM is kilobytes; the
/// largest part is `ember exec`'s initramfs archive kept in the configuration.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// The ember version written into headers.
pub const EMBER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Bytes of the fixed header before the version string.
const FIXED_HEAD: usize = 8 + 4 + 2;
/// Size of the checksum at the end.
const CRC_LEN: usize = 4;

/// Why a snapshot cannot be written, read or restored (the state file's refusals, and those
/// of taking and restoring the KVM state, guest memory and devices).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error("{path}: not an ember snapshot (it does not start with \"EMBERSNP\")")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
    },
    /// The file is of another format version.
    #[error(
        "{path}: snapshot format version {found}, this ember reads {supported}: take the \
         snapshot again with this ember"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The file's version.
        found: u32,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// The file ends before the header says it should.
    #[error("{path}: corrupt: truncated ({len} bytes, the header announces {expected})")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The size its header announces (at least).
        expected: u64,
    },
    /// The file goes on after the checksum.
    #[error("{path}: corrupt: {extra} trailing bytes after the checksum")]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// How many.
        extra: u64,
    },
    /// A header field is out of range (version string too long or not UTF-8, payload too
    /// large).
    #[error("{path}: corrupt: bad header ({why})")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// Which field.
        why: String,
    },
    /// The checksum does not match the contents.
    #[error(
        "{path}: corrupt: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum in the file.
        stored: u32,
        /// The checksum of its contents.
        computed: u32,
    },
    /// The payload does not decode as the state this ember expects.
    #[error("{path}: corrupt: the state does not decode ({source})")]
    Decode {
        /// The file.
        path: PathBuf,
        /// postcard's error.
        #[source]
        source: postcard::Error,
    },
    /// The payload decodes but bytes are left over.
    #[error("{path}: corrupt: {extra} bytes left over after the state")]
    PayloadTrailing {
        /// The file.
        path: PathBuf,
        /// How many.
        extra: usize,
    },
    /// The state could not be serialized (or is over [`MAX_PAYLOAD`]).
    #[error("cannot serialize the snapshot state: {0}")]
    Encode(String),
    /// The snapshot does not fit the VM it is restored into.
    #[error(
        "the snapshot was taken with {what} {snapshot}, but this VM has {now}: restore with the \
         same configuration"
    )]
    Mismatch {
        /// What differs ("vCPU count", "memory size"...).
        what: String,
        /// The snapshot's value.
        snapshot: String,
        /// The current value.
        now: String,
    },
    /// A device's saved state cannot be restored.
    #[error("cannot restore {device}: {why}")]
    Device {
        /// Which device.
        device: String,
        /// Why.
        why: String,
    },
    /// A device cannot be saved as it is now: it holds host-side state that a snapshot
    /// cannot carry (open vsock connections).
    #[error("cannot snapshot {device} now: {why}")]
    Busy {
        /// Which device.
        device: String,
        /// Why, and what to do.
        why: String,
    },
    /// This VM cannot be snapshotted or restored (yet).
    #[error("this VM cannot be snapshotted or restored: {0}")]
    NotRestorable(&'static str),
    /// Opening /dev/kvm or creating the new VM failed.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Reading what KVM supports failed.
    #[error("cannot probe KVM's capabilities")]
    Caps(#[source] StateError),
    /// Pausing, saving or restoring a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// Saving the VM state failed.
    #[error("cannot save the VM's KVM state")]
    SaveVm(#[source] StateError),
    /// Restoring the VM state failed.
    #[error("cannot restore the VM's KVM state into the new VM")]
    RestoreVm(#[source] StateError),
    /// The new guest memory could not be made.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Guest memory could not be read or written.
    #[error("guest memory at {0:#x} cannot be accessed")]
    GuestMemory(u64),
    /// The memory file is not as large as the guest memory.
    #[error(
        "{path}: the memory file is {found} bytes, but the guest memory is {expected}: \
         restore with the same --mem"
    )]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The guest memory's size.
        expected: u64,
    },
    /// The memory file could not be written or mapped.
    #[error("cannot make the guest memory file")]
    MemoryFile(#[source] std::io::Error),
    /// An irqfd could not be registered with the new VM.
    #[error("cannot register the irqfd of IRQ {0} with the new VM")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// The VM generation ID could not be renewed after a restore.
    #[error(transparent)]
    VmGenId(#[from] crate::devices::vmgenid::VmGenIdError),
}

/// Encodes `state` as a complete state file (header, payload, checksum) in memory.
pub fn encode_state<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_stdvec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let payload_len = payload.len() as u64;
    if payload_len > MAX_PAYLOAD {
        return Err(SnapshotError::Encode(format!(
            "the state is {payload_len} bytes, more than the {MAX_PAYLOAD} a state file may hold"
        )));
    }
    let version = EMBER_VERSION.as_bytes();
    let version = &version[..version.len().min(MAX_VERSION_STRING)];
    let mut out = Vec::with_capacity(FIXED_HEAD + version.len() + 8 + payload.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // At most MAX_VERSION_STRING (64): fits a u16.
    out.extend_from_slice(&(version.len() as u16).to_le_bytes());
    out.extend_from_slice(version);
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// What a state file's header says, once it has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHeader {
    /// The format version (always [`FORMAT_VERSION`] once checked).
    pub format_version: u32,
    /// The ember version that wrote the file.
    pub ember_version: String,
    /// Length of the payload.
    pub payload_len: u64,
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Checks a whole state file in memory (`path` is for messages) and decodes its payload.
pub fn decode_state<T: DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
) -> Result<(StateHeader, T), SnapshotError> {
    let path = || path.to_path_buf();
    let len = bytes.len() as u64;
    let truncated = |expected: usize| SnapshotError::Truncated {
        path: path(),
        len,
        expected: expected as u64,
    };
    // The magic first: an unrelated short file is "not a snapshot", not "truncated".
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot { path: path() });
    }
    if bytes.len() < FIXED_HEAD {
        return Err(truncated(FIXED_HEAD));
    }
    let format_version = le_u32(&bytes[8..12]);
    if format_version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path(),
            found: format_version,
            supported: FORMAT_VERSION,
        });
    }
    let version_len = usize::from(le_u16(&bytes[12..14]));
    if version_len > MAX_VERSION_STRING {
        return Err(SnapshotError::BadHeader {
            path: path(),
            why: format!(
                "ember version string of {version_len} bytes, at most {MAX_VERSION_STRING}"
            ),
        });
    }
    let payload_start = FIXED_HEAD + version_len + 8;
    if bytes.len() < payload_start {
        return Err(truncated(payload_start + CRC_LEN));
    }
    let payload_len = le_u64(&bytes[payload_start - 8..payload_start]);
    if payload_len > MAX_PAYLOAD {
        return Err(SnapshotError::BadHeader {
            path: path(),
            why: format!("payload of {payload_len} bytes, at most {MAX_PAYLOAD}"),
        });
    }
    // payload_len <= MAX_PAYLOAD (64 MiB): fits a usize and the sums cannot overflow.
    let payload_end = payload_start + payload_len as usize;
    let file_end = payload_end + CRC_LEN;
    if bytes.len() < file_end {
        return Err(truncated(file_end));
    }
    if bytes.len() > file_end {
        return Err(SnapshotError::TrailingBytes {
            path: path(),
            extra: (bytes.len() - file_end) as u64,
        });
    }
    let stored = le_u32(&bytes[payload_end..file_end]);
    let computed = crc32fast::hash(&bytes[..payload_end]);
    if stored != computed {
        return Err(SnapshotError::Checksum {
            path: path(),
            stored,
            computed,
        });
    }
    let ember_version = std::str::from_utf8(&bytes[FIXED_HEAD..FIXED_HEAD + version_len])
        .map_err(|_| SnapshotError::BadHeader {
            path: path(),
            why: "the ember version string is not UTF-8".into(),
        })?
        .to_string();
    let payload = &bytes[payload_start..payload_end];
    let (state, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|source| SnapshotError::Decode {
            path: path(),
            source,
        })?;
    if !rest.is_empty() {
        return Err(SnapshotError::PayloadTrailing {
            path: path(),
            extra: rest.len(),
        });
    }
    let header = StateHeader {
        format_version,
        ember_version,
        payload_len,
    };
    Ok((header, state))
}

/// The largest state file [`read_state`] reads.
const MAX_FILE: u64 = (FIXED_HEAD + MAX_VERSION_STRING + 8 + CRC_LEN) as u64 + MAX_PAYLOAD;

/// Writes `state` to the state file `path` atomically: a temporary file next to it is
/// written, synced, and renamed over `path` (then the directory is synced), so `path` holds
/// either the old file or the complete new one, never half of it.
pub fn write_state<T: Serialize>(path: &Path, state: &T) -> Result<(), SnapshotError> {
    let bytes = encode_state(state)?;
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the state file path has no file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Reads and checks the state file `path` (see the module documentation for what is
/// refused) and decodes its payload. Never reads more than the largest valid file.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    read_state_with_header(path).map(|(_, state)| state)
}

/// [`read_state`], also returning the checked header.
pub fn read_state_with_header<T: DeserializeOwned>(
    path: &Path,
) -> Result<(StateHeader, T), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = crate::user_file::open_regular(path).map_err(io)?;
    let mut bytes = Vec::new();
    // One byte more than the largest valid file: enough to tell "too long" from "fits".
    f.take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(io)?;
    decode_state(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        vcpus: u32,
        name: String,
        regs: Vec<u64>,
        bytes: Vec<u8>,
        flag: Option<bool>,
    }

    fn sample() -> Sample {
        Sample {
            vcpus: 4,
            name: "ember".into(),
            regs: vec![1, u64::MAX, 0x1234_5678],
            bytes: (0..=255).collect(),
            flag: Some(true),
        }
    }

    fn p() -> &'static Path {
        Path::new("test-state")
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-snapfmt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Rewrites the checksum of an encoded file after a deliberate edit.
    fn fix_crc(bytes: &mut [u8]) {
        let n = bytes.len() - CRC_LEN;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Offset of the payload in an encoded file.
    fn payload_start(bytes: &[u8]) -> usize {
        FIXED_HEAD + usize::from(le_u16(&bytes[12..14])) + 8
    }

    #[test]
    fn round_trip_through_a_file() {
        let d = tmpdir("rt");
        let path = d.join(STATE_FILE);
        write_state(&path, &sample()).unwrap();
        let (h, back): (StateHeader, Sample) = read_state_with_header(&path).unwrap();
        assert_eq!(back, sample());
        assert_eq!(h.format_version, FORMAT_VERSION);
        assert_eq!(h.ember_version, EMBER_VERSION);
        // Overwriting is atomic and leaves no temporary file behind.
        let mut s2 = sample();
        s2.vcpus = 1;
        write_state(&path, &s2).unwrap();
        assert_eq!(read_state::<Sample>(&path).unwrap(), s2);
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn layout_matches_the_documentation() {
        let b = encode_state(&7u32).unwrap();
        assert_eq!(&b[..8], b"EMBERSNP");
        assert_eq!(le_u32(&b[8..12]), FORMAT_VERSION);
        let v = usize::from(le_u16(&b[12..14]));
        assert_eq!(&b[14..14 + v], EMBER_VERSION.as_bytes());
        let plen = le_u64(&b[14 + v..22 + v]) as usize;
        assert_eq!(&b[22 + v..22 + v + plen], &[7]);
        assert_eq!(b.len(), 22 + v + plen + 4);
        assert_eq!(
            le_u32(&b[22 + v + plen..]),
            crc32fast::hash(&b[..22 + v + plen])
        );
    }

    #[test]
    fn wrong_magic_is_not_a_snapshot() {
        for bad in [
            &b""[..],
            b"E",
            b"ELF\x7f",
            b"EMBERSNQ and more bytes after it",
        ] {
            let e = decode_state::<Sample>(p(), bad).unwrap_err();
            assert!(
                matches!(e, SnapshotError::NotASnapshot { .. }),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("not an ember snapshot"), "{e}");
        }
    }

    #[test]
    fn other_format_version_is_refused_with_advice() {
        let mut b = encode_state(&sample()).unwrap();
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        fix_crc(&mut b);
        let e = decode_state::<Sample>(p(), &b).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Version { found, supported, .. }
                if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("snapshot format version {}", FORMAT_VERSION + 1))
                && msg.contains(&format!("this ember reads {FORMAT_VERSION}"))
                && msg.contains("take the snapshot again with this ember"),
            "{msg}"
        );
    }

    #[test]
    fn bad_checksum_is_corrupt() {
        let mut b = encode_state(&sample()).unwrap();
        let at = payload_start(&b) + 3;
        b[at] ^= 0x10;
        let e = decode_state::<Sample>(p(), &b).unwrap_err();
        assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("corrupt: checksum mismatch"), "{e}");
        // The checksum itself damaged.
        let mut b = encode_state(&sample()).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        assert!(matches!(
            decode_state::<Sample>(p(), &b),
            Err(SnapshotError::Checksum { .. })
        ));
    }

    #[test]
    fn truncated_and_trailing_files_are_refused() {
        let b = encode_state(&sample()).unwrap();
        for cut in [
            FIXED_HEAD - 1,
            FIXED_HEAD + 2,
            payload_start(&b) + 1,
            b.len() - 1,
        ] {
            let e = decode_state::<Sample>(p(), &b[..cut]).unwrap_err();
            assert!(
                matches!(e, SnapshotError::Truncated { .. }),
                "cut {cut}: {e}"
            );
            assert!(e.to_string().contains("truncated"), "{e}");
        }
        let mut long = b.clone();
        long.extend_from_slice(b"xyz");
        let e = decode_state::<Sample>(p(), &long).unwrap_err();
        assert!(
            matches!(e, SnapshotError::TrailingBytes { extra: 3, .. }),
            "{e}"
        );
    }

    #[test]
    fn header_limits_are_enforced() {
        // A version string longer than allowed.
        let mut b = encode_state(&sample()).unwrap();
        b[12..14].copy_from_slice(&1000u16.to_le_bytes());
        let e = decode_state::<Sample>(p(), &b).unwrap_err();
        assert!(matches!(e, SnapshotError::BadHeader { .. }), "{e}");
        // A payload length that would need gigabytes: refused before any allocation.
        let mut b = encode_state(&sample()).unwrap();
        let at = payload_start(&b) - 8;
        b[at..at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        let e = decode_state::<Sample>(p(), &b).unwrap_err();
        assert!(matches!(e, SnapshotError::BadHeader { .. }), "{e}");
        // A version string that is not UTF-8 (with a valid checksum).
        let mut b = encode_state(&sample()).unwrap();
        b[FIXED_HEAD] = 0xff;
        fix_crc(&mut b);
        let e = decode_state::<Sample>(p(), &b).unwrap_err();
        assert!(matches!(e, SnapshotError::BadHeader { .. }), "{e}");
    }

    #[test]
    fn payload_of_another_shape_does_not_decode() {
        // A valid file whose payload is a different type.
        let b = encode_state(&"just a string").unwrap();
        let e = decode_state::<Sample>(p(), &b).unwrap_err();
        assert!(matches!(e, SnapshotError::Decode { .. }), "{e}");
        assert!(e.to_string().contains("does not decode"), "{e}");
        // A payload that decodes with bytes left over.
        let b = encode_state(&(5u32, 6u32)).unwrap();
        let e = decode_state::<u32>(p(), &b).unwrap_err();
        assert!(
            matches!(e, SnapshotError::PayloadTrailing { extra: 1, .. }),
            "{e}"
        );
    }

    /// Builds a file around `payload` with a correct header and checksum.
    fn file_with_payload(payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(&[0; CRC_LEN]);
        fix_crc(&mut b);
        b
    }

    #[test]
    fn length_prefixes_inside_the_payload_cannot_make_it_allocate() {
        // A Vec<u8> claiming u64::MAX/2 elements (LEB128 varint), then a few bytes: postcard
        // checks lengths against the bytes left, serde caps preallocation.
        let mut payload = vec![0x04]; // vcpus = 4
        payload.push(0x00); // name = ""
        payload.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        payload.extend_from_slice(&[1, 2, 3]);
        let e = decode_state::<Sample>(p(), &file_with_payload(&payload)).unwrap_err();
        assert!(matches!(e, SnapshotError::Decode { .. }), "{e}");
        // A string length larger than the payload.
        let payload = [0x01, 0xff, 0xff, 0xff, 0xff, 0x0f, b'a'];
        let e = decode_state::<Sample>(p(), &file_with_payload(&payload)).unwrap_err();
        assert!(matches!(e, SnapshotError::Decode { .. }), "{e}");
    }

    #[test]
    fn oversized_file_is_refused_without_reading_it_all() {
        let d = tmpdir("big");
        let path = d.join(STATE_FILE);
        // A valid file followed by a sparse hole: only MAX_FILE + 1 bytes are read.
        std::fs::write(&path, encode_state(&sample()).unwrap()).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(MAX_FILE + (1 << 30)).unwrap();
        drop(f);
        let e = read_state::<Sample>(&path).unwrap_err();
        assert!(matches!(e, SnapshotError::TrailingBytes { .. }), "{e}");
        let e = read_state::<Sample>(&d.join("missing")).unwrap_err();
        assert!(matches!(e, SnapshotError::Io { .. }), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    /// xorshift64*: a small deterministic generator for the fuzz loops.
    struct Rand(u64);
    impl Rand {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn fuzz_random_truncated_and_bit_flipped_files_never_panic() {
        let good = encode_state(&sample()).unwrap();
        // Every truncation is refused.
        for cut in 0..good.len() {
            assert!(
                decode_state::<Sample>(p(), &good[..cut]).is_err(),
                "cut {cut}"
            );
        }
        // Every single-bit flip is refused (CRC-32 catches all of them).
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    decode_state::<Sample>(p(), &b).is_err(),
                    "flip byte {byte} bit {bit}"
                );
            }
        }
        let mut r = Rand(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            // Random bytes, sometimes behind a valid magic and version.
            let len = r.below(200);
            let mut b: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
            if r.below(2) == 0 && b.len() >= 12 {
                b[..8].copy_from_slice(&MAGIC);
                b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            }
            assert!(decode_state::<Sample>(p(), &b).is_err());
            // Several random byte changes in a valid file.
            let mut b = good.clone();
            for _ in 0..1 + r.below(4) {
                let i = r.below(b.len());
                b[i] = r.next() as u8;
            }
            if b != good {
                assert!(decode_state::<Sample>(p(), &b).is_err());
            }
            // A random payload behind a valid header and checksum: reaches the decoder,
            // which may accept it (any bytes may be a valid Sample) but never panics.
            let len = r.below(64);
            let payload: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
            let _ = decode_state::<Sample>(p(), &file_with_payload(&payload));
            // And a valid payload with its tail mutated.
            let mut payload = postcard::to_stdvec(&sample()).unwrap();
            let i = r.below(payload.len());
            payload[i] = r.next() as u8;
            let _ = decode_state::<Sample>(p(), &file_with_payload(&payload));
        }
    }
}
