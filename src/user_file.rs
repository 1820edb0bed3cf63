// SPDX-License-Identifier: Apache-2.0
//! Opening the files a user names (kernel, initrd, disk images, `ember exec --file` sources)
//! without ever blocking on them.
//!
//! A plain `open` of a FIFO blocks until a writer comes, and a read of a character device
//! like `/dev/zero` never ends; ember would hang (in an uninterruptible-looking wait that
//! ignores SIGTERM's graceful path). So every user-named file is opened with `O_NONBLOCK`
//! (which makes opening a FIFO or a socket return at once), checked with `fstat` on the open
//! file itself (no window between the check and the use), and refused unless it is a
//! regular file (or, for disks, a block device); `O_NONBLOCK` is then cleared again.

use std::fs::{File, FileType, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What kind of file a flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (kernel, initrd, `--file` sources).
    Regular,
    /// A regular file or a block device (disk images).
    RegularOrBlockDevice,
}

impl Kind {
    fn wanted(self) -> &'static str {
        match self {
            Kind::Regular => "a regular file",
            Kind::RegularOrBlockDevice => "a regular file or block device",
        }
    }

    fn accepts(self, ft: &FileType) -> bool {
        ft.is_file() || (self == Kind::RegularOrBlockDevice && ft.is_block_device())
    }
}

/// What a file of type `ft` is, in words.
fn describe(ft: &FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a plain file"
    }
}

/// The error for a file of type `ft` where `kind` was wanted: "is a FIFO, not a regular
/// file".
fn wrong_kind(ft: &FileType, kind: Kind) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {}, not {}", describe(ft), kind.wanted()),
    )
}

/// Opens `path` for reading (and writing when `write`), with `flags` added to the open
/// flags (e.g. `O_DIRECT`), never blocking, and only when it is of `kind`. The error for a
/// file of the wrong kind reads "is a FIFO, not a regular file" (kind `InvalidInput`).
pub fn open(path: &Path, write: bool, flags: i32, kind: Kind) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            // Say what the file is when that is why it cannot be opened (a socket gives
            // ENXIO, a directory opened for writing EISDIR).
            match std::fs::metadata(path) {
                Ok(m) if !kind.accepts(&m.file_type()) => wrong_kind(&m.file_type(), kind),
                _ => e,
            }
        })?;
    let ft = file.metadata()?.file_type();
    if !kind.accepts(&ft) {
        return Err(wrong_kind(&ft, kind));
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd this function owns; no memory is passed.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL with flags on the same owned fd; no memory is passed.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Opens the regular file `path` read-only (see [`open`]).
pub fn open_regular(path: &Path) -> io::Result<File> {
    open(path, false, 0, Kind::Regular)
}

/// Reads all of the regular file `path` (see [`open`]).
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let mut v = Vec::new();
    io::Read::read_to_end(&mut f, &mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn refuses_fifos_sockets_devices_and_directories_at_once() {
        let dir = std::env::temp_dir().join(format!("ember-user-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        let e = open_regular(&fifo).unwrap_err();
        assert_eq!(e.to_string(), "is a FIFO, not a regular file");
        let e = open(&fifo, false, 0, Kind::RegularOrBlockDevice).unwrap_err();
        assert_eq!(
            e.to_string(),
            "is a FIFO, not a regular file or block device"
        );
        // Read-write opens of a FIFO do not block either.
        assert!(open(&fifo, true, 0, Kind::Regular).is_err());
        let sock = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = open_regular(&sock).unwrap_err();
        assert_eq!(e.to_string(), "is a socket, not a regular file");
        let e = read_regular(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e.to_string(), "is a character device, not a regular file");
        let e = open(&dir, true, 0, Kind::Regular).unwrap_err();
        assert_eq!(e.to_string(), "is a directory, not a regular file");
        let f = dir.join("f");
        std::fs::write(&f, b"data").unwrap();
        assert_eq!(read_regular(&f).unwrap(), b"data");
        let file = open(&f, true, 0, Kind::Regular).unwrap();
        // SAFETY: F_GETFL on an open fd.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0, "O_NONBLOCK left set");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
