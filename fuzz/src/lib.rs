// SPDX-License-Identifier: Apache-2.0
//! What ember's fuzz targets share: a cursor over the fuzzer's bytes, and the guest side of a
//! virtio device's queues laid out in a guest memory that the fuzzer writes.
//!
//! # Queue input layout ([`QueueRig::parse`])
//!
//! ```text
//!  byte 0          flags: bits 0-2 queue size log2 (1..128), bit 3 EVENT_IDX acked,
//!                  bits 4-7 for the target (a device variant, a feature)
//!  6 bytes/queue   descriptor table, available ring, used ring addresses (u16 LE each)
//!  1 byte          n: the number of turns (n % 16)
//!  n bytes         the turns, each a byte the target interprets (which queue is notified...)
//!  the rest        guest memory from address 0 (descriptors, rings, buffers; at most
//!                  MEM_SIZE bytes, the rest of guest memory is zero)
//! ```
//!
//! Guest memory is two regions, `[0, 64 KiB)` and `[128 KiB, 192 KiB)`, so that buffers can
//! also straddle a hole. The queues are set up as the virtio-mmio transport does at
//! DRIVER_OK: a queue whose rings do not lie in guest memory makes the transport refuse
//! activation, so such an input ends there.

use std::sync::Arc;

use ember::devices::virtio::{ActivateContext, Interrupt, EVENT_IDX, VERSION_1};
use ember::memory::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of the first guest memory region, which the input fills.
pub const MEM_SIZE: usize = 0x1_0000;
/// Start of the second region (after a 64 KiB hole).
pub const MEM2_START: u64 = 0x2_0000;
/// Size of the second region.
pub const MEM2_SIZE: usize = 0x1_0000;

/// A cursor over the fuzzer's bytes; past the end everything reads as zero.
#[derive(Debug)]
pub struct Bytes8<'a> {
    data: &'a [u8],
}

impl<'a> Bytes8<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte (0 at the end).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A length byte, then that many bytes.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8());
        self.take(n)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
}

/// One queue's ring addresses, from the input.
#[derive(Debug, Clone, Copy)]
struct RingAddrs {
    desc: u64,
    avail: u64,
    used: u64,
}

/// A guest memory written by the fuzzer with the queues of one device in it.
#[derive(Debug)]
pub struct QueueRig {
    /// Guest memory.
    pub mem: GuestMemory,
    /// Bits 4-7 of the flags byte, for the target.
    pub variant: u8,
    /// Whether the driver acked EVENT_IDX.
    pub event_idx: bool,
    /// The turns, one byte each.
    pub turns: Vec<u8>,
    size: u16,
    rings: Vec<RingAddrs>,
}

impl QueueRig {
    /// Reads the layout above for a device with `queues` queues of at most `max_size`
    /// entries each.
    pub fn parse(data: &[u8], queues: usize, max_size: u16) -> Self {
        let mut b = Bytes8::new(data);
        let flags = b.u8();
        let size = (1u16 << (flags & 7)).min(max_size);
        let rings = (0..queues)
            .map(|_| RingAddrs {
                desc: u64::from(b.u16()),
                avail: u64::from(b.u16()),
                used: u64::from(b.u16()),
            })
            .collect();
        let n = usize::from(b.u8() % 16);
        let turns = b.take(n).to_vec();
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), MEM_SIZE),
            (GuestAddress(MEM2_START), MEM2_SIZE),
        ])
        .expect("guest memory for the fuzz target");
        let image = b.take(MEM_SIZE);
        mem.write_slice(image, GuestAddress(0))
            .expect("the image fits the first region");
        Self {
            mem,
            variant: flags >> 4,
            event_idx: flags & 8 != 0,
            turns,
            size,
            rings,
        }
    }

    /// The device's queues as the transport hands them over at DRIVER_OK (`max_size` as in
    /// [`Self::parse`]); `None` when one does not lie in guest memory (the transport then
    /// refuses DRIVER_OK).
    pub fn queues(&self, max_size: u16) -> Option<Vec<Queue>> {
        self.rings
            .iter()
            .map(|r| {
                let mut q = Queue::new(max_size).ok()?;
                q.set_size(self.size);
                q.set_desc_table_address(Some(r.desc as u32), Some(0));
                q.set_avail_ring_address(Some(r.avail as u32), Some(0));
                q.set_used_ring_address(Some(r.used as u32), Some(0));
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return None;
                }
                q.set_event_idx(self.event_idx);
                Some(q)
            })
            .collect()
    }

    /// What the transport gives the device at DRIVER_OK, with `features` (and VERSION_1,
    /// EVENT_IDX as flagged) acked; `None` as for [`Self::queues`].
    pub fn activate_context(&self, max_size: u16, features: u64) -> Option<ActivateContext> {
        let queues = self.queues(max_size)?;
        let event_idx = if self.event_idx { EVENT_IDX } else { 0 };
        Some(ActivateContext {
            mem: self.mem.clone(),
            queue_evts: (0..queues.len())
                .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")))
                .collect(),
            queues,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))),
            acked_features: VERSION_1 | event_idx | features,
        })
    }
}

/// A private temporary directory for one fuzz process (removed by nobody: under the
/// system's temporary directory, one per process).
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-fuzz-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}
