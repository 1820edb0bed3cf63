// SPDX-License-Identifier: Apache-2.0
//! A split virtqueue laid out in guest memory by hand, for device tests: what a driver does
//! (descriptors, available ring) and what it sees (used ring). virtio-queue's
//! `MockSplitQueue` (0.18) places its used ring over the end of its available ring, so
//! device tests that fill more than a few buffers need this instead.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// One virtqueue: descriptor table at `base`, available ring at `base + 0x1000`, used ring
/// at `base + 0x2000`.
#[derive(Debug)]
pub struct TestRing<'a> {
    mem: &'a GuestMemory,
    size: u16,
    base: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestRing<'a> {
    /// A ring of `size` entries at `base` (which needs 12 KiB).
    pub fn new(mem: &'a GuestMemory, base: u64, size: u16) -> Self {
        let r = Self {
            mem,
            size,
            base: GuestAddress(base),
            next_desc: 0,
            avail_idx: 0,
        };
        mem.write_slice(&[0u8; 0x3000], r.base).unwrap();
        r
    }

    /// The driver's view of a ring already set up at `base` by [`Self::new`], continuing
    /// from its counters (see [`Self::counters`]); nothing is written.
    pub fn new_at(
        mem: &'a GuestMemory,
        base: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
    ) -> Self {
        Self {
            mem,
            size,
            base: GuestAddress(base),
            next_desc,
            avail_idx,
        }
    }

    /// The next descriptor to fill and the available index, for [`Self::new_at`].
    pub fn counters(&self) -> (u16, u16) {
        (self.next_desc, self.avail_idx)
    }

    fn avail(&self) -> GuestAddress {
        self.base.unchecked_add(0x1000)
    }

    fn used(&self) -> GuestAddress {
        self.base.unchecked_add(0x2000)
    }

    /// A device-side queue over this ring, ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(self.base);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used());
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    /// Offers a chain of `(addr, len, device_writable)` buffers; returns its head.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = self.next_desc % self.size;
            self.next_desc += 1;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = self.next_desc % self.size;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = self.base.unchecked_add(u64::from(idx) * 16);
            self.mem.write_obj(addr, d).unwrap();
            self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, d.unchecked_add(14)).unwrap();
        }
        let slot = self
            .avail()
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % self.size));
        self.mem.write_obj(head % self.size, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, self.avail().unchecked_add(2))
            .unwrap();
        head % self.size
    }

    /// Writes the available ring's index as a driver would, `idx` whatever it is (a hostile
    /// driver may put it more than the queue size ahead); later chains follow from it.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx, self.avail().unchecked_add(2))
            .unwrap();
    }

    /// The used ring's index (entries the device returned).
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used().unchecked_add(2)).unwrap()
    }

    /// Used entry `i`: (head, length).
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let e = self.used().unchecked_add(4 + 8 * u64::from(i % self.size));
        (
            self.mem.read_obj(e).unwrap(),
            self.mem.read_obj(e.unchecked_add(4)).unwrap(),
        )
    }
}

/// Runs `f` on a thread and returns its result, or fails the test when it has not finished
/// within 10 s (a device loop that spins forever fails the test instead of hanging it; the
/// spinning thread is left behind).
pub fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("the device did not return within 10 s: it spins")
}
