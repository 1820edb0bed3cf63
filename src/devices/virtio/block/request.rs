// SPDX-License-Identifier: Apache-2.0
//! One virtio-blk request: a descriptor chain is walked and checked ([`walk_chain`]), split
//! into header, data and status byte whatever the descriptor layout (virtio 1.x drivers may
//! frame it any way), checked against the disk, executed with positioned file I/O through a
//! bounce buffer, and answered with a status byte.
//!
//! Every guest-supplied value is checked before it is used: descriptor addresses and lengths
//! must lie in guest memory, device-readable descriptors must come before device-writable
//! ones, the chain must end (no loop, no next index past the table) within the queue size,
//! the header must be there in full and a status byte must exist. Chains that break these
//! rules fail (see [`Completion`]); nothing here panics or touches memory outside the guest's.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{DiskFile, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE};
use crate::memory::GuestMemory;

/// Size of the request header (`struct virtio_blk_outhdr`: type, reserved, sector).
pub const HEADER_SIZE: u64 = 16;
/// Bytes moved per host read/write call (and the bounce buffer's size).
pub const BOUNCE_SIZE: usize = 512 << 10;
/// Alignment of the bounce buffer (O_DIRECT needs the logical block size; a page covers all).
const BOUNCE_ALIGN: usize = 4096;

/// The request types ember serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Anything else (answered UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// What is wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No descriptor could be read (head index past the table, unreadable table, bad
    /// indirect table).
    #[error("empty descriptor chain (bad head index or descriptor table)")]
    EmptyChain,
    /// The chain does not end: a loop, a next index past the table, or more descriptors than
    /// the queue holds.
    #[error("descriptor chain does not end (a loop or a next index out of range)")]
    UnterminatedChain,
    /// More descriptors than allowed.
    #[error("descriptor chain is longer than {0} descriptors")]
    ChainTooLong(usize),
    /// A descriptor points outside guest memory.
    #[error("descriptor {index} ({addr:#x}+{len:#x}) is outside guest memory")]
    OutOfBounds {
        /// Position in the chain.
        index: usize,
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable descriptor after a device-writable one.
    #[error("descriptor {0} is device-readable but follows a device-writable one")]
    ReadableAfterWritable(usize),
    /// No device-writable byte for the status.
    #[error("no device-writable descriptor for the status byte")]
    NoStatus,
    /// The header is not all there.
    #[error("request header needs {HEADER_SIZE} device-readable bytes, the chain has {0}")]
    ShortHeader(u64),
    /// Data in the wrong direction for the request type (e.g. readable data with IN).
    #[error("{kind:?} request with {len} unexpected device-{dir} bytes")]
    WrongDirection {
        /// Request type.
        kind: RequestType,
        /// "readable" or "writable".
        dir: &'static str,
        /// How many.
        len: u64,
    },
    /// Data length not a whole number of sectors.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    /// Access past the end of the disk.
    #[error("sectors {sector}..+{count} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors asked for.
        count: u64,
        /// Disk capacity.
        capacity: u64,
    },
    /// Write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Host file I/O failed.
    #[error("disk I/O failed")]
    Io(#[source] std::io::Error),
    /// Copying to or from guest memory failed.
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// How a request ended: what to put in the used ring and whether a status byte was written.
#[derive(Debug)]
pub struct Completion {
    /// Bytes written to guest memory (the used-ring length).
    pub used_len: u32,
    /// The status byte written, if the chain had a place for one.
    pub status: Option<u8>,
    /// Data bytes moved between disk and guest (IN and OUT; 0 otherwise).
    pub data_len: u64,
    /// The request type, or what went wrong.
    pub result: Result<RequestType, RequestError>,
}

/// A checked guest memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// A chain split by direction; every segment lies in guest memory.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// Device-readable ranges, in chain order.
    pub readable: Vec<Segment>,
    /// Device-writable ranges, in chain order.
    pub writable: Vec<Segment>,
}

/// Walks a descriptor chain of at most `max_descriptors` entries and checks every
/// descriptor (see the module docs).
pub fn walk_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    max_descriptors: usize,
) -> Result<Walk, RequestError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut walk = Walk::default();
    let mut count = 0;
    let mut last_has_next = false;
    for desc in chain {
        if count == max_descriptors {
            return Err(RequestError::ChainTooLong(max_descriptors));
        }
        let (addr, len) = (desc.addr(), desc.len());
        let in_memory = addr.checked_add(u64::from(len)).is_some()
            && GuestMemoryBackend::check_range(mem, addr, len as usize);
        if !in_memory {
            return Err(RequestError::OutOfBounds {
                index: count,
                addr: addr.raw_value(),
                len,
            });
        }
        let seg = Segment {
            addr,
            len: u64::from(len),
        };
        if desc.is_write_only() {
            walk.writable.push(seg);
        } else if walk.writable.is_empty() {
            walk.readable.push(seg);
        } else {
            return Err(RequestError::ReadableAfterWritable(count));
        }
        last_has_next = desc.has_next();
        count += 1;
    }
    if count == 0 {
        return Err(RequestError::EmptyChain);
    }
    if last_has_next {
        // The iterator stopped while the chain still pointed on: it ran out of descriptors
        // (a loop), the next index was past the table, or the next one was unreadable.
        return Err(RequestError::UnterminatedChain);
    }
    Ok(walk)
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Splits `segs` at byte `at`: the first `at` bytes and the rest.
fn split_at(segs: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let (mut front, mut back) = (Vec::new(), Vec::new());
    let mut left = at;
    for s in segs {
        if left >= s.len {
            front.push(*s);
            left -= s.len;
        } else if left == 0 {
            back.push(*s);
        } else {
            front.push(Segment {
                addr: s.addr,
                len: left,
            });
            back.push(Segment {
                addr: s.addr.unchecked_add(left),
                len: s.len - left,
            });
            left = 0;
        }
    }
    (front, back)
}

/// Walks a list of segments byte by byte range, copying to or from a flat buffer.
struct Cursor<'a> {
    segs: &'a [Segment],
    index: usize,
    offset: u64,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            index: 0,
            offset: 0,
        }
    }

    /// Calls `f(guest address, range of buf)` for consecutive pieces covering `len` bytes.
    fn pieces(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let mut done = 0usize;
        while done < len {
            let Some(seg) = self.segs.get(self.index) else {
                // Callers never ask for more than the segments hold.
                return Err(RequestError::Memory(
                    vm_memory::GuestMemoryError::InvalidBackendAddress,
                ));
            };
            let avail = seg.len - self.offset;
            let n = usize::try_from(avail).unwrap_or(usize::MAX).min(len - done);
            f(seg.addr.unchecked_add(self.offset), done..done + n)?;
            done += n;
            self.offset += n as u64;
            if self.offset == seg.len {
                self.index += 1;
                self.offset = 0;
            }
        }
        Ok(())
    }

    fn write_to_guest(&mut self, mem: &GuestMemory, buf: &[u8]) -> Result<(), RequestError> {
        self.pieces(buf.len(), |addr, r| {
            mem.write_slice(&buf[r], addr).map_err(RequestError::Memory)
        })
    }

    fn read_from_guest(&mut self, mem: &GuestMemory, buf: &mut [u8]) -> Result<(), RequestError> {
        self.pieces(buf.len(), |addr, r| {
            mem.read_slice(&mut buf[r], addr)
                .map_err(RequestError::Memory)
        })
    }
}

/// A page-aligned scratch buffer of [`BOUNCE_SIZE`] bytes (aligned so that O_DIRECT I/O
/// works whatever the guest's buffer addresses are).
#[derive(Debug)]
pub struct BounceBuffer {
    raw: Vec<u8>,
    start: usize,
}

impl Default for BounceBuffer {
    fn default() -> Self {
        let raw = vec![0u8; BOUNCE_SIZE + BOUNCE_ALIGN];
        let start = raw.as_ptr().align_offset(BOUNCE_ALIGN).min(BOUNCE_ALIGN);
        Self { raw, start }
    }
}

impl BounceBuffer {
    fn get(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(BOUNCE_SIZE);
        &mut self.raw[self.start..self.start + len]
    }
}

/// What a request needs besides its chain.
#[derive(Debug)]
pub struct RequestContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// The disk.
    pub disk: &'a DiskFile,
    /// GET_ID answer (NUL-padded).
    pub id: &'a [u8; ID_BYTES],
    /// Scratch buffer.
    pub bounce: &'a mut BounceBuffer,
    /// Longest chain accepted.
    pub max_descriptors: usize,
}

/// Handles one descriptor chain completely: checks, I/O, status byte.
pub fn process<M>(chain: DescriptorChain<M>, ctx: &mut RequestContext<'_>) -> Completion
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let walk = match walk_chain(chain, ctx.mem, ctx.max_descriptors) {
        Ok(w) => w,
        Err(e) => return failed_without_status(e),
    };
    // The status byte is the last device-writable byte.
    let writable = total(&walk.writable);
    if writable == 0 {
        return failed_without_status(RequestError::NoStatus);
    }
    let (data_out, status_seg) = split_at(&walk.writable, writable - 1);
    let status_addr = status_seg
        .iter()
        .find(|s| s.len > 0)
        .map(|s| s.addr)
        .unwrap_or(GuestAddress(0));
    let (status, result, written, data_len) = match execute(&walk.readable, &data_out, ctx) {
        Ok(done) => (VIRTIO_BLK_S_OK, Ok(done.kind), done.written, done.data_len),
        Err(e @ RequestError::Unsupported(_)) => (VIRTIO_BLK_S_UNSUPP, Err(e), 0, 0),
        Err(e) => (VIRTIO_BLK_S_IOERR, Err(e), 0, 0),
    };
    // The status address was checked to lie in guest memory by walk_chain.
    let status = status as u8;
    if let Err(e) = ctx.mem.write_obj(status, status_addr) {
        return failed_without_status(RequestError::Memory(e));
    }
    Completion {
        used_len: u32::try_from(written + 1).unwrap_or(u32::MAX),
        status: Some(status),
        data_len,
        result,
    }
}

fn failed_without_status(e: RequestError) -> Completion {
    Completion {
        used_len: 0,
        status: None,
        data_len: 0,
        result: Err(e),
    }
}

/// A request that succeeded.
struct Done {
    kind: RequestType,
    /// Bytes written to guest memory (status excluded).
    written: u64,
    /// Data bytes moved between disk and guest.
    data_len: u64,
}

/// Runs a request whose chain has been split into readable bytes and writable data (status
/// excluded).
fn execute(
    readable: &[Segment],
    writable: &[Segment],
    ctx: &mut RequestContext<'_>,
) -> Result<Done, RequestError> {
    let have = total(readable);
    if have < HEADER_SIZE {
        return Err(RequestError::ShortHeader(have));
    }
    let (header_segs, data_in) = split_at(readable, HEADER_SIZE);
    let mut header = [0u8; HEADER_SIZE as usize];
    Cursor::new(&header_segs).read_from_guest(ctx.mem, &mut header)?;
    let kind = RequestType::from(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let (readable_len, writable_len) = (total(&data_in), total(writable));
    let unexpected = |dir, len| RequestError::WrongDirection { kind, dir, len };

    match kind {
        RequestType::In => {
            if readable_len != 0 {
                return Err(unexpected("readable", readable_len));
            }
            check_range(ctx.disk, sector, writable_len)?;
            read_sectors(ctx, sector, writable)?;
            Ok(Done {
                kind,
                written: writable_len,
                data_len: writable_len,
            })
        }
        RequestType::Out => {
            if writable_len != 0 {
                return Err(unexpected("writable", writable_len));
            }
            if ctx.disk.read_only() {
                return Err(RequestError::ReadOnly);
            }
            check_range(ctx.disk, sector, readable_len)?;
            write_sectors(ctx, sector, &data_in)?;
            Ok(Done {
                kind,
                written: 0,
                data_len: readable_len,
            })
        }
        RequestType::Flush => {
            if !ctx.disk.read_only() {
                ctx.disk.flush().map_err(RequestError::Io)?;
            }
            Ok(Done {
                kind,
                written: 0,
                data_len: 0,
            })
        }
        RequestType::GetId => {
            if readable_len != 0 {
                return Err(unexpected("readable", readable_len));
            }
            let n = usize::try_from(writable_len)
                .unwrap_or(usize::MAX)
                .min(ID_BYTES);
            Cursor::new(writable).write_to_guest(ctx.mem, &ctx.id[..n])?;
            Ok(Done {
                kind,
                written: n as u64,
                data_len: 0,
            })
        }
        RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
    }
}

fn check_range(disk: &DiskFile, sector: u64, len: u64) -> Result<(), RequestError> {
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength(len));
    }
    let count = len >> SECTOR_SHIFT;
    match sector.checked_add(count) {
        Some(end) if end <= disk.sectors() => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity: disk.sectors(),
        }),
    }
}

fn read_sectors(
    ctx: &mut RequestContext<'_>,
    sector: u64,
    segs: &[Segment],
) -> Result<(), RequestError> {
    let mut cursor = Cursor::new(segs);
    let mut offset = sector << SECTOR_SHIFT;
    let mut left = total(segs);
    while left > 0 {
        let n = usize::try_from(left)
            .unwrap_or(BOUNCE_SIZE)
            .min(BOUNCE_SIZE);
        let buf = ctx.bounce.get(n);
        ctx.disk
            .read_exact_at(buf, offset)
            .map_err(RequestError::Io)?;
        cursor.write_to_guest(ctx.mem, buf)?;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(())
}

fn write_sectors(
    ctx: &mut RequestContext<'_>,
    sector: u64,
    segs: &[Segment],
) -> Result<(), RequestError> {
    let mut cursor = Cursor::new(segs);
    let mut offset = sector << SECTOR_SHIFT;
    let mut left = total(segs);
    while left > 0 {
        let n = usize::try_from(left)
            .unwrap_or(BOUNCE_SIZE)
            .min(BOUNCE_SIZE);
        let buf = ctx.bounce.get(n);
        cursor.read_from_guest(ctx.mem, buf)?;
        ctx.disk
            .write_all_at(buf, offset)
            .map_err(RequestError::Io)?;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u64) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn split_at_cuts_inside_and_between_segments() {
        let segs = [seg(0x1000, 10), seg(0x2000, 6)];
        assert_eq!(split_at(&segs, 0), (vec![], segs.to_vec()));
        assert_eq!(
            split_at(&segs, 10),
            (vec![seg(0x1000, 10)], vec![seg(0x2000, 6)])
        );
        assert_eq!(
            split_at(&segs, 12),
            (vec![seg(0x1000, 10), seg(0x2000, 2)], vec![seg(0x2002, 4)])
        );
        assert_eq!(
            split_at(&segs, 4),
            (vec![seg(0x1000, 4)], vec![seg(0x1004, 6), seg(0x2000, 6)])
        );
        assert_eq!(split_at(&segs, 16), (segs.to_vec(), vec![]));
    }

    #[test]
    fn request_types() {
        assert_eq!(RequestType::from(VIRTIO_BLK_T_IN), RequestType::In);
        assert_eq!(RequestType::from(VIRTIO_BLK_T_OUT), RequestType::Out);
        assert_eq!(RequestType::from(VIRTIO_BLK_T_FLUSH), RequestType::Flush);
        assert_eq!(RequestType::from(VIRTIO_BLK_T_GET_ID), RequestType::GetId);
        assert_eq!(RequestType::from(99), RequestType::Unsupported(99));
    }

    #[test]
    fn bounce_buffer_is_page_aligned() {
        let mut b = BounceBuffer::default();
        let s = b.get(BOUNCE_SIZE * 2);
        assert_eq!(s.len(), BOUNCE_SIZE);
        assert_eq!(s.as_ptr() as usize % BOUNCE_ALIGN, 0);
    }
}
