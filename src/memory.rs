// SPDX-License-Identifier: Apache-2.0
//! Guest RAM: anonymous mappings laid around the 32-bit MMIO gap (or private mappings of a
//! snapshot's memory file, in the same layout), and the e820-style map that describes them
//! to the guest.

use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::x86_64::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as ember uses it everywhere.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or not a whole number of pages.
    #[error("guest memory size {0} bytes is invalid: it must be a positive multiple of 4 KiB")]
    InvalidSize(u64),
    /// Mapping the memory failed.
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    Map {
        /// Requested size in MiB.
        size_mib: u64,
        /// What the kernel said.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A memory file is not as large as the guest memory it should hold.
    #[error(
        "the guest memory file is {found} bytes, but {expected} bytes of guest memory were \
         asked for"
    )]
    FileSize {
        /// The file's size.
        found: u64,
        /// The guest memory's size.
        expected: u64,
    },
    /// Mapping a memory file failed.
    #[error("cannot map {size_mib} MiB of guest memory from its file: {source}")]
    MapFile {
        /// Size of the region in MiB.
        size_mib: u64,
        /// What the kernel (or vm-memory) said.
        #[source]
        source: std::io::Error,
    },
}

/// One RAM range of the guest: start address and length in bytes.
pub type RamRange = (GuestAddress, u64);

/// The guest-physical RAM ranges for `size` bytes of memory: everything below the MMIO gap
/// first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let below_gap = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), below_gap)];
    if size > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START));
    }
    ranges
}

/// Maps `size` bytes of guest RAM (private anonymous memory; pages are only backed once the
/// guest touches them).
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    if size == 0 || size % 4096 != 0 {
        return Err(MemoryError::InvalidSize(size));
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, usize::try_from(len).unwrap_or(usize::MAX)))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        size_mib: size >> 20,
        source,
    })
}

/// Maps `size` bytes of guest RAM from an anonymous memory file (`memfd_create`),
/// `MAP_SHARED | MAP_NORESERVE`, in the layout of [`create_guest_memory`]: for a VM whose
/// devices run in another process (virtiofsd behind a vhost-user virtio-fs device), which
/// maps the same file. Every region records the file and its offset in it.
pub fn create_shared_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let file = shared_memory_file(size)?;
    map_file_regions(Arc::new(file), size, libc::MAP_SHARED)
}

/// A new anonymous memory file (`memfd_create`) of `size` bytes, all zeros.
fn shared_memory_file(size: u64) -> Result<std::fs::File, MemoryError> {
    if size == 0 || size % 4096 != 0 {
        return Err(MemoryError::InvalidSize(size));
    }
    let map_err = |source: std::io::Error| MemoryError::MapFile {
        size_mib: size >> 20,
        source,
    };
    // SAFETY: the name is a NUL-terminated string literal; the call only returns a new fd.
    let fd = unsafe { libc::memfd_create(c"ember-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(map_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).map_err(map_err)?;
    Ok(file)
}

/// Guest RAM of `size` bytes in a new shared memory file, as [`create_shared_guest_memory`],
/// holding a copy of `src` (a snapshot's memory file, in the same layout): for a restored VM
/// whose devices run in another process (virtio-fs), which must see the pages ember and the
/// guest see — a private mapping of the snapshot's file would not do. Only the data of a
/// sparse `src` is read (`SEEK_DATA`/`SEEK_HOLE`); its holes stay zero pages that take no
/// memory. `src` must be exactly `size` bytes.
pub fn shared_guest_memory_from_file(
    src: &std::fs::File,
    size: u64,
) -> Result<GuestMemory, MemoryError> {
    use std::os::unix::fs::FileExt;
    let map_err = |source: std::io::Error| MemoryError::MapFile {
        size_mib: size >> 20,
        source,
    };
    let found = src.metadata().map_err(map_err)?.len();
    if found != size {
        return Err(MemoryError::FileSize {
            found,
            expected: size,
        });
    }
    let dst = shared_memory_file(size)?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in data_extents(src, size).map_err(map_err)? {
        let mut at = start;
        while at < end {
            let want = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            let n = src.read_at(&mut buf[..want], at).map_err(map_err)?;
            if n == 0 {
                return Err(map_err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the memory file shrank while it was read",
                )));
            }
            dst.write_all_at(&buf[..n], at).map_err(map_err)?;
            at += n as u64;
        }
    }
    map_file_regions(Arc::new(dst), size, libc::MAP_SHARED)
}

/// The `(start, end)` byte ranges of `file`'s first `size` bytes that hold data (all of it
/// when the file system cannot say where its holes are).
fn data_extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |off: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let off = libc::off_t::try_from(off).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a valid, open fd only moves its offset (not used elsewhere: reads
        // are positioned).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No data at or after `off`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match seek(at, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            // No SEEK_DATA on this file system: all of it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(0, size)]),
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        extents.push((start, end));
        at = end;
    }
    Ok(extents)
}

/// Maps `size` bytes of guest RAM from `file` (a snapshot's memory file: the RAM of
/// [`ram_ranges`] region after region, the same layout as [`create_guest_memory`]),
/// `MAP_PRIVATE | MAP_NORESERVE`: copy-on-write and lazy. A page is read from the file (the
/// page cache) when it is first touched, a page the guest or ember writes becomes this
/// process's own copy, the file is never written, and VMs that map the same file share the
/// pages none of them wrote. `file` needs only be open for reading.
///
/// The file must be exactly `size` bytes, which is checked here, before anything is mapped.
/// It can still shrink later (another program truncates it): the pages past its new end
/// then vanish from the mapping, written ones too, and a read of one raises SIGBUS. Register
/// the memory with [`MappedImages`](crate::image_file::MappedImages) before using it, as
/// the builder does: its SIGBUS handler mends such pages with zeros and reports it.
pub fn guest_memory_from_file(file: std::fs::File, size: u64) -> Result<GuestMemory, MemoryError> {
    if size == 0 || size % 4096 != 0 {
        return Err(MemoryError::InvalidSize(size));
    }
    let map_err = |len: u64| {
        move |source: std::io::Error| MemoryError::MapFile {
            size_mib: len >> 20,
            source,
        }
    };
    let found = file.metadata().map_err(map_err(size))?.len();
    if found != size {
        return Err(MemoryError::FileSize {
            found,
            expected: size,
        });
    }
    map_file_regions(Arc::new(file), size, libc::MAP_PRIVATE)
}

/// Maps the RAM regions of [`ram_ranges`]`(size)` from `file`, region after region, with
/// `share` (`MAP_SHARED` or `MAP_PRIVATE`) and `MAP_NORESERVE`, read-write.
fn map_file_regions(
    file: Arc<std::fs::File>,
    size: u64,
    share: libc::c_int,
) -> Result<GuestMemory, MemoryError> {
    let map_err = |len: u64| {
        move |source: std::io::Error| MemoryError::MapFile {
            size_mib: len >> 20,
            source,
        }
    };
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let bytes = usize::try_from(len).map_err(|_| {
            map_err(len)(std::io::Error::other(
                "region larger than the address space",
            ))
        })?;
        let mapping = MmapRegionBuilder::new_with_bitmap(bytes, ())
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(share | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(len)(std::io::Error::other(e.to_string())))?;
        let region = GuestRegionMmap::new(mapping, start).ok_or_else(|| {
            map_err(len)(std::io::Error::other(format!(
                "region at {:#x} would overflow the guest address space",
                start.0
            )))
        })?;
        regions.push(Arc::new(region));
        offset += len;
    }
    GuestMemoryMmap::from_arc_regions(regions)
        .map_err(|e| map_err(size)(std::io::Error::other(e.to_string())))
}

/// The host address and length of every guest RAM mapping.
pub fn host_ranges(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.as_ptr() as u64, r.len())).collect()
}

/// Kind of an entry of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (firmware areas, the BIOS hole).
    Reserved = 2,
}

/// One entry of the guest's memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

/// The memory map the guest is told about: low RAM up to the EBDA, the BIOS area reserved
/// (it holds the MP and ACPI tables and the VM generation ID page), RAM from 1 MiB to the MMIO gap, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Kind::Reserved,
        },
    ];
    for (start, len) in ram_ranges(mem_size) {
        let start = start.0;
        let end = start + len;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_range_below_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
        let total: u64 = r.iter().map(|x| x.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn e820_matches_the_ram_ranges() {
        let map = e820_map(4 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[0].kind, E820Kind::Ram);
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, MMIO_GAP_END);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the BIOS hole between the EBDA and 1 MiB is RAM.
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
        // Entries never overlap and are sorted.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn vm_generation_id_page_is_reserved_not_ram() {
        use crate::arch::x86_64::layout::{VMGENID_SIZE, VMGENID_START};
        for mem_size in [16 << 20, 64 << 20, 4 << 30] {
            let map = e820_map(mem_size);
            let (start, end) = (VMGENID_START, VMGENID_START + VMGENID_SIZE);
            let overlaps = |e: &&E820Entry| e.addr < end && start < e.addr + e.size;
            let hits: Vec<_> = map.iter().filter(overlaps).collect();
            assert_eq!(hits.len(), 1, "{mem_size:#x}: {hits:?}");
            assert_eq!(hits[0].kind, E820Kind::Reserved);
            assert!(hits[0].addr <= start && end <= hits[0].addr + hits[0].size);
            // ... and it is backed by guest memory, so ember can write the ID there.
            let mem = create_guest_memory(mem_size.min(64 << 20)).unwrap();
            assert!(mem.address_in_range(GuestAddress(end - 1)));
        }
    }

    #[test]
    fn guest_memory_is_created_and_sized() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        assert_eq!(total, 64 << 20);
        assert!(matches!(
            create_guest_memory(0),
            Err(MemoryError::InvalidSize(0))
        ));
        assert!(create_guest_memory(4097).is_err());
    }

    #[test]
    fn a_memory_file_is_copied_into_shared_memory_data_and_holes() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let p = std::env::temp_dir().join(format!("ember-shmem-copy-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let size = 8u64 << 20;
        f.set_len(size).unwrap();
        // Data at the start, in the middle across an extent's edge, and in the last page.
        f.write_all_at(b"first", 0).unwrap();
        f.write_all_at(&[7u8; 5000], (3 << 20) - 100).unwrap();
        f.write_all_at(b"last", size - 4).unwrap();
        let extents = data_extents(&f, size).unwrap();
        assert!(!extents.is_empty() && extents.iter().all(|(a, b)| a < b && *b <= size));
        let mem = shared_guest_memory_from_file(&f, size).unwrap();
        let read = |at: u64, n: usize| {
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            b
        };
        assert_eq!(read(0, 5), b"first");
        assert_eq!(read((3 << 20) - 100, 5000), vec![7u8; 5000]);
        assert_eq!(read(size - 4, 4), b"last");
        assert_eq!(read(5 << 20, 4096), vec![0u8; 4096]);
        // Shared: each region records its file, which another process could map.
        assert!(mem.iter().all(|r| r.file_offset().is_some()));
        // A change to guest memory does not reach the snapshot's file.
        mem.write_slice(b"GUEST", GuestAddress(0)).unwrap();
        let mut b = [0u8; 5];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"first");
        // A file of another size is refused.
        assert!(matches!(
            shared_guest_memory_from_file(&f, size * 2),
            Err(MemoryError::FileSize { .. })
        ));
        let _ = std::fs::remove_file(p);
    }
}
