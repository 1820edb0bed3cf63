// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio register file: any sequence of register and configuration-space reads
//! and writes (every width and offset), with a real device behind it (virtio-rng, or
//! virtio-blk when byte 0 is odd), and the device's queue processed when asked (after a
//! DRIVER_OK the transport accepted). Input: byte 0 device, byte 1 the number of
//! operations, the operations, then guest memory from address 0 (64 KiB at most).
//! Operation: a kind byte `k`; `k & 3` = 0 → read of `1 << ((k >> 2) & 3)` bytes at a u16
//! offset (mod 0x200); 1 → write of that width at that offset of a u64 value; 2 → the device
//! processes its queue; 3 → a whole driver set-up (status, features, queue 0 of `1 << (k >>
//! 5)` entries at 0x0/0x1000/0x2000, DRIVER_OK) as Linux does it.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use ember::config::{CacheMode, DiskConfig};
use ember::devices::bus::BusDevice;
use ember::devices::virtio::block::{Block, DiskFile};
use ember::devices::virtio::mmio::MmioTransport;
use ember::devices::virtio::rng::{Rng, RngConfig};
use ember::devices::virtio::{Interrupt, VirtioDevice};
use ember::memory::GuestMemory;
use ember_fuzz::{Bytes8, MEM_SIZE};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

static RNG: OnceLock<Arc<Mutex<Rng>>> = OnceLock::new();
static BLK: OnceLock<Arc<Mutex<Block>>> = OnceLock::new();

fn block() -> Arc<Mutex<Block>> {
    BLK.get_or_init(|| {
        let dir = ember_fuzz::scratch_dir("mmio");
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![7u8; 64 * 512]).unwrap();
        let disk = DiskFile::open(&DiskConfig {
            path: path.clone(),
            read_only: false,
            id: None,
            cache: CacheMode::Writeback,
            bw: None,
            iops: None,
        })
        .unwrap();
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        Arc::new(Mutex::new(Block::new(disk, "vda", None).unwrap()))
    })
    .clone()
}

fn w32(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}

/// What Linux's virtio_mmio driver writes to bring a device up, with one queue.
fn driver_setup(t: &mut MmioTransport, size: u32) {
    w32(t, VIRTIO_MMIO_STATUS, 0);
    w32(t, VIRTIO_MMIO_STATUS, 1);
    w32(t, VIRTIO_MMIO_STATUS, 3);
    for sel in 0..2 {
        w32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        let mut f = [0u8; 4];
        t.read(u64::from(VIRTIO_MMIO_DEVICE_FEATURES), &mut f);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, u32::from_le_bytes(f));
    }
    w32(t, VIRTIO_MMIO_STATUS, 0xb);
    w32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w32(t, VIRTIO_MMIO_QUEUE_NUM, size);
    w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
    w32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    w32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1000);
    w32(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
    w32(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x2000);
    w32(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
    w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    w32(t, VIRTIO_MMIO_STATUS, 0xf);
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes8::new(data);
    let use_block = b.u8() & 1 != 0;
    let n = b.u8();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let rng = RNG
        .get_or_init(|| Arc::new(Mutex::new(Rng::new(&RngConfig::default()).unwrap())))
        .clone();
    let blk = block();
    let device: Arc<Mutex<dyn VirtioDevice>> = if use_block { blk.clone() } else { rng.clone() };
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let evts = vec![Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())];
    let mut t = MmioTransport::new(mem.clone(), device, irq, evts).unwrap();
    let mut ops = Vec::new();
    for _ in 0..n {
        let k = b.u8();
        let (off, val) = match k & 3 {
            0 => (b.u16(), 0),
            1 => (b.u16(), b.u64()),
            _ => (0, 0),
        };
        ops.push((k, off, val));
    }
    let image = b.take(MEM_SIZE);
    mem.write_slice(image, GuestAddress(0)).unwrap();
    for (k, off, val) in ops {
        let width = 1usize << ((k >> 2) & 3);
        let off = u64::from(off % 0x200);
        match k & 3 {
            0 => {
                let mut d = [0u8; 8];
                t.read(off, &mut d[..width]);
            }
            1 => t.write(off, &val.to_le_bytes()[..width]),
            2 => {
                if use_block {
                    blk.lock().unwrap().process_queue();
                } else {
                    rng.lock().unwrap().process_queue();
                }
            }
            _ => driver_setup(&mut t, 1 << (k >> 5)),
        }
    }
    // The driver goes away: the device is free for the next input.
    w32(&mut t, VIRTIO_MMIO_STATUS, 0);
});
