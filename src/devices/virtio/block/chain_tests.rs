// SPDX-License-Identifier: Apache-2.0
//! The block device against hand-built descriptor chains in a guest memory made here: every
//! malformed chain fails its request (or sets NEEDS_RESET) and the device goes on serving the
//! next request; well-formed chains of any layout work.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Block, DiskFile, QUEUE_SIZE};
use crate::config::{CacheMode, DiskConfig};
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VERSION_1};
use crate::memory::GuestMemory;

const MEM_SIZE: u64 = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const DISK_SECTORS: u64 = 128;

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// The guest side of one split queue, written by hand.
struct Driver {
    mem: GuestMemory,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        Self { mem, avail_idx: 0 }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn set_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + u64::from(i) * 16);
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Writes `descs` (addr, len, R/W) as a linked chain from index `start` and makes it
    /// available. Returns the head index.
    fn chain(&mut self, start: u16, descs: &[(u64, u32, u16)]) -> u16 {
        for (k, &(addr, len, dir)) in descs.iter().enumerate() {
            let i = start + k as u16;
            let last = k + 1 == descs.len();
            let flags = dir | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
            self.set_desc(DESC, i, addr, len, flags, i + 1);
        }
        self.push(start);
        start
    }

    fn push(&mut self, head: u16) {
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn header(&self, addr: u64, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(addr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used-ring element `n`: (descriptor head, length).
    fn used(&self, n: u16) -> (u32, u32) {
        let at = USED + 4 + u64::from(n % QSIZE) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

struct Rig {
    driver: Driver,
    block: Block,
    interrupt: Arc<Interrupt>,
    path: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A block device on a fresh 64 KiB image whose sector `n` is filled with byte `n`, activated
/// on the driver's queue.
fn rig(name: &str, read_only: bool) -> Rig {
    rig_sized(name, read_only, DISK_SECTORS)
}

fn rig_sized(name: &str, read_only: bool, sectors: u64) -> Rig {
    rig_with(name, read_only, sectors, CacheMode::Writeback).unwrap()
}

fn rig_with(name: &str, read_only: bool, sectors: u64, cache: CacheMode) -> Option<Rig> {
    let path = std::env::temp_dir().join(format!("ember-chain-{}-{name}", std::process::id()));
    let content: Vec<u8> = (0..sectors).flat_map(|s| [s as u8; 512]).collect();
    std::fs::write(&path, content).unwrap();
    let disk = DiskFile::open(&DiskConfig {
        path: path.clone(),
        read_only,
        id: Some("test-disk".into()),
        cache,
        ..DiskConfig::new(&path)
    });
    let disk = match disk {
        Err(e @ super::BlockError::NoDirectIo(_)) => {
            eprintln!("SKIP: {e}");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        other => other.unwrap(),
    };
    let mut block = Block::new(disk, "vdt", Some("test-disk")).unwrap();
    let driver = Driver::new();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    block
        .activate(ActivateContext {
            mem: driver.mem.clone(),
            queues: vec![driver.queue()],
            queue_evts: vec![Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())],
            interrupt: interrupt.clone(),
            acked_features: VERSION_1,
        })
        .unwrap();
    Some(Rig {
        driver,
        block,
        interrupt,
        path,
    })
}

impl Rig {
    /// Reads sector `sector` through a well-formed chain at descriptor 12 and checks the data:
    /// the proof that the device still works.
    fn assert_still_serves(&mut self, sector: u64) {
        let d = &mut self.driver;
        d.header(HDR + 0x800, VIRTIO_BLK_T_IN, sector);
        d.mem
            .write_obj(0xffu8, GuestAddress(STATUS + 0x80))
            .unwrap();
        let n = d.used_idx();
        d.chain(
            12,
            &[
                (HDR + 0x800, 16, R),
                (DATA + 0x8000, 512, W),
                (STATUS + 0x80, 1, W),
            ],
        );
        self.block.process_queue();
        let d = &self.driver;
        assert_eq!(
            d.used_idx(),
            n.wrapping_add(1),
            "the valid request was not completed"
        );
        assert_eq!(d.used(n), (12, 513));
        assert_eq!(d.byte(STATUS + 0x80), VIRTIO_BLK_S_OK as u8);
        let mut buf = [0u8; 512];
        d.mem
            .read_slice(&mut buf, GuestAddress(DATA + 0x8000))
            .unwrap();
        assert!(buf.iter().all(|&b| b == sector as u8));
        assert!(!self.interrupt.needs_reset());
    }
}

/// What a malformed request must end with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// No status byte could be written: used length 0.
    NoStatus,
    /// The status byte at this address says this.
    Status(u64, u32),
}

#[test]
fn malformed_chains_fail_and_the_device_survives() {
    let far = MEM_SIZE + 0x1000;
    // (name, request type, sector, descriptors, expected outcome)
    #[allow(clippy::type_complexity)]
    let cases: &[(&str, u32, u64, &[(u64, u32, u16)], Expect)] = &[
        (
            "header outside memory",
            VIRTIO_BLK_T_IN,
            0,
            &[(far, 16, R), (DATA, 512, W), (STATUS, 1, W)],
            Expect::NoStatus,
        ),
        (
            "data outside memory",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (far, 512, W), (STATUS, 1, W)],
            Expect::NoStatus,
        ),
        (
            "data straddles the end of memory",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (MEM_SIZE - 256, 512, W), (STATUS, 1, W)],
            Expect::NoStatus,
        ),
        (
            "address + length overflows",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (u64::MAX - 100, 512, W), (STATUS, 1, W)],
            Expect::NoStatus,
        ),
        (
            "status outside memory",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (DATA, 512, W), (far, 1, W)],
            Expect::NoStatus,
        ),
        (
            "readable after writable",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)],
            Expect::NoStatus,
        ),
        (
            "no writable status",
            VIRTIO_BLK_T_OUT,
            0,
            &[(HDR, 16, R), (DATA, 512, R)],
            Expect::NoStatus,
        ),
        (
            "zero-length status only",
            VIRTIO_BLK_T_FLUSH,
            0,
            &[(HDR, 16, R), (STATUS, 0, W)],
            Expect::NoStatus,
        ),
        (
            "header write-only",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
        (
            "header too short",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
        (
            "IN with readable data",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
        (
            "OUT with writable data",
            VIRTIO_BLK_T_OUT,
            0,
            &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
        (
            "length not whole sectors",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
        // A zero-length status descriptor: the last writable byte (end of data) becomes the
        // status, leaving 511 data bytes, which is not whole sectors.
        (
            "zero-length status after data",
            VIRTIO_BLK_T_IN,
            0,
            &[(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)],
            Expect::Status(DATA + 511, VIRTIO_BLK_S_IOERR),
        ),
        (
            "sector past the end",
            VIRTIO_BLK_T_IN,
            DISK_SECTORS,
            &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
        (
            "request runs past the end",
            VIRTIO_BLK_T_OUT,
            DISK_SECTORS - 1,
            &[(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
        (
            "sector + count overflows",
            VIRTIO_BLK_T_IN,
            u64::MAX,
            &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
        (
            "unknown request type",
            99,
            0,
            &[(HDR, 16, R), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_UNSUPP),
        ),
        (
            "GET_ID with readable data",
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16, R), (DATA, 20, R), (STATUS, 1, W)],
            Expect::Status(STATUS, VIRTIO_BLK_S_IOERR),
        ),
    ];
    for &(name, kind, sector, descs, expect) in cases {
        let mut rig = rig("table", false);
        rig.driver.header(HDR, kind, sector);
        if let Expect::Status(addr, _) = expect {
            rig.driver
                .mem
                .write_obj(0xeeu8, GuestAddress(addr))
                .unwrap();
        }
        let before = std::fs::read(&rig.path).unwrap();
        let head = rig.driver.chain(0, descs);
        rig.block.process_queue();
        let d = &rig.driver;
        assert_eq!(d.used_idx(), 1, "{name}: the request was not completed");
        let (id, len) = d.used(0);
        assert_eq!(id, u32::from(head), "{name}");
        match expect {
            Expect::NoStatus => assert_eq!(len, 0, "{name}"),
            Expect::Status(addr, status) => {
                assert_eq!(len, 1, "{name}");
                assert_eq!(u32::from(d.byte(addr)), status, "{name}");
            }
        }
        assert_eq!(rig.block.stats().errors(), 1, "{name}");
        assert_eq!(
            std::fs::read(&rig.path).unwrap(),
            before,
            "{name}: the disk changed"
        );
        rig.assert_still_serves(5);
    }
}

#[test]
fn descriptor_loops_and_bad_next_indexes_end_the_walk() {
    // (name, descriptors as (index, addr, len, flags, next), head)
    let n = VRING_DESC_F_NEXT as u16;
    #[allow(clippy::type_complexity)]
    let cases: &[(&str, &[(u16, u64, u32, u16, u16)])] = &[
        ("self loop", &[(0, HDR, 16, R | n, 0)]),
        (
            "two-descriptor loop",
            &[(0, HDR, 16, R | n, 1), (1, DATA, 512, W | n, 0)],
        ),
        (
            "loop back into the chain",
            &[
                (0, HDR, 16, R | n, 1),
                (1, DATA, 512, W | n, 2),
                (2, STATUS, 1, W | n, 1),
            ],
        ),
        (
            "next index past the table",
            &[(0, HDR, 16, R | n, QSIZE + 3)],
        ),
        (
            "next index at u16::MAX",
            &[(0, HDR, 16, R | n, 1), (1, DATA, 512, W | n, u16::MAX)],
        ),
    ];
    for &(name, descs) in cases {
        let mut rig = rig("loops", false);
        rig.driver.header(HDR, VIRTIO_BLK_T_IN, 0);
        for &(i, addr, len, flags, next) in descs {
            rig.driver.set_desc(DESC, i, addr, len, flags, next);
        }
        rig.driver.push(0);
        rig.block.process_queue();
        assert_eq!(rig.driver.used_idx(), 1, "{name}");
        assert_eq!(rig.driver.used(0), (0, 0), "{name}");
        assert_eq!(
            rig.block.stats().malformed.load(Ordering::Relaxed),
            1,
            "{name}"
        );
        rig.assert_still_serves(7);
    }
}

#[test]
fn indirect_tables_too_long_or_malformed_fail() {
    const TABLE: u64 = 0x40000;
    let ind = VRING_DESC_F_INDIRECT as u16;
    // (name, table length in bytes, entries to write)
    let long = usize::from(QUEUE_SIZE) + 20;
    let cases: &[(&str, u32, usize)] = &[
        ("longer than the queue", (long * 16) as u32, long),
        ("length not a multiple of 16", 40, 2),
        ("table outside memory", 32, 0),
    ];
    for &(name, table_len, entries) in cases {
        let mut rig = rig("indirect", false);
        rig.driver.header(HDR, VIRTIO_BLK_T_OUT, 0);
        let table = if entries == 0 {
            MEM_SIZE + 0x10000
        } else {
            TABLE
        };
        for i in 0..entries {
            let last = i + 1 == entries;
            let (addr, len, dir) = match i {
                0 => (HDR, 16, R),
                _ if last => (STATUS, 1, W),
                _ => (DATA, 512, R),
            };
            let flags = dir | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
            rig.driver
                .set_desc(table, i as u16, addr, len, flags, i as u16 + 1);
        }
        rig.driver.set_desc(DESC, 0, table, table_len, ind, 0);
        rig.driver.push(0);
        let before = std::fs::read(&rig.path).unwrap();
        rig.block.process_queue();
        assert_eq!(rig.driver.used(0), (0, 0), "{name}");
        assert_eq!(
            std::fs::read(&rig.path).unwrap(),
            before,
            "{name}: the disk changed"
        );
        rig.assert_still_serves(3);
    }
}

#[test]
fn head_index_out_of_range_needs_reset() {
    let mut rig = rig("head", false);
    rig.driver.push(QSIZE + 1);
    rig.block.process_queue();
    // The head cannot be returned in the used ring: the device asks for a reset and stops
    // touching the queue.
    assert!(rig.interrupt.needs_reset());
    assert_eq!(rig.driver.used_idx(), 0);
    rig.driver.header(HDR, VIRTIO_BLK_T_IN, 0);
    rig.driver
        .chain(1, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(
        rig.driver.used_idx(),
        0,
        "a broken device must leave the queue alone"
    );
    // After a reset and a new activation it works again.
    rig.block.reset();
    rig.interrupt.reset();
    let mut fresh = Driver::new();
    std::mem::swap(&mut rig.driver, &mut fresh);
    rig.block
        .activate(ActivateContext {
            mem: rig.driver.mem.clone(),
            queues: vec![rig.driver.queue()],
            queue_evts: vec![Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())],
            interrupt: rig.interrupt.clone(),
            acked_features: VERSION_1,
        })
        .unwrap();
    rig.assert_still_serves(9);
}

#[test]
fn avail_index_jumping_ahead_needs_reset() {
    let mut rig = rig("availidx", false);
    // The driver claims 100 new entries in a 16-entry ring, then just past the size.
    for claimed in [100u16, QSIZE + 5] {
        rig.driver
            .mem
            .write_obj(claimed, GuestAddress(AVAIL + 2))
            .unwrap();
        rig.block.process_queue();
        assert!(rig.interrupt.needs_reset());
        assert_eq!(rig.driver.used_idx(), 0);
    }
    // The driver puts a sane index back and a valid request, without a reset: a notify
    // does nothing.
    rig.driver
        .mem
        .write_obj(0u16, GuestAddress(AVAIL + 2))
        .unwrap();
    rig.driver.header(HDR, VIRTIO_BLK_T_IN, 0);
    rig.driver
        .chain(1, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.used_idx(), 0, "a broken device does no work");
}

#[test]
fn write_then_read_back_with_any_layout() {
    let mut rig = rig("rw", false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    rig.driver
        .mem
        .write_slice(&pattern, GuestAddress(DATA))
        .unwrap();
    // OUT: header split 10+6 over two descriptors, data split 700+324 (not sector-aligned
    // pieces), status on its own.
    rig.driver.header(HDR, VIRTIO_BLK_T_OUT, 10);
    rig.driver.chain(
        0,
        &[
            (HDR, 10, R),
            (HDR + 10, 6, R),
            (DATA, 700, R),
            (DATA + 700, 324, R),
            (STATUS, 1, W),
        ],
    );
    rig.block.process_queue();
    assert_eq!(rig.driver.byte(STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.driver.used(0), (0, 1));
    let disk = std::fs::read(&rig.path).unwrap();
    assert_eq!(&disk[10 * 512..12 * 512], &pattern[..]);
    assert!(
        disk[12 * 512..13 * 512].iter().all(|&b| b == 12),
        "sector 12 untouched"
    );
    // IN: header and data in one readable/writable pair each, status in the same descriptor
    // as the data (513 bytes).
    rig.driver.header(HDR + 0x100, VIRTIO_BLK_T_IN, 10);
    rig.driver
        .chain(5, &[(HDR + 0x100, 16, R), (DATA + 0x4000, 1025, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.used(1), (5, 1025));
    let mut back = vec![0u8; 1024];
    rig.driver
        .mem
        .read_slice(&mut back, GuestAddress(DATA + 0x4000))
        .unwrap();
    assert_eq!(back, pattern);
    assert_eq!(rig.driver.byte(DATA + 0x4000 + 1024), VIRTIO_BLK_S_OK as u8);
    let stats = rig.block.stats();
    assert_eq!(stats.writes.load(Ordering::Relaxed), 1);
    assert_eq!(stats.reads.load(Ordering::Relaxed), 1);
    assert_eq!(stats.bytes_written.load(Ordering::Relaxed), 1024);
    assert_eq!(stats.bytes_read.load(Ordering::Relaxed), 1024);
    // One interrupt per batch.
    assert_eq!(rig.interrupt.irq_evt().read().unwrap(), 2);
}

#[test]
fn large_request_crosses_bounce_chunks() {
    // More than one bounce buffer's worth in one request.
    let mut rig = rig_sized("large", false, 4096);
    let big = super::request::BOUNCE_SIZE as u64 + 4096;
    let path = rig.path.clone();
    let pattern: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    rig.driver
        .mem
        .write_slice(&pattern, GuestAddress(0x40000))
        .unwrap();
    rig.driver.header(HDR, VIRTIO_BLK_T_OUT, 1);
    rig.driver
        .chain(0, &[(HDR, 16, R), (0x40000, big as u32, R), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.byte(STATUS), VIRTIO_BLK_S_OK as u8);
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(&disk[512..512 + big as usize], &pattern[..]);
    rig.driver
        .mem
        .write_slice(&vec![0u8; big as usize], GuestAddress(0x40000))
        .unwrap();
    rig.driver.header(HDR, VIRTIO_BLK_T_IN, 1);
    rig.driver
        .chain(3, &[(HDR, 16, R), (0x40000, big as u32, W), (STATUS, 1, W)]);
    rig.block.process_queue();
    let mut back = vec![0u8; big as usize];
    rig.driver
        .mem
        .read_slice(&mut back, GuestAddress(0x40000))
        .unwrap();
    assert!(back == pattern);
}

#[test]
fn read_only_disk_refuses_writes_but_reads_and_flushes() {
    let mut rig = rig("ro", true);
    let before = std::fs::read(&rig.path).unwrap();
    rig.driver.header(HDR, VIRTIO_BLK_T_OUT, 0);
    rig.driver
        .chain(0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.byte(STATUS), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(std::fs::read(&rig.path).unwrap(), before);
    rig.driver.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    rig.driver.chain(3, &[(HDR, 16, R), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.byte(STATUS), VIRTIO_BLK_S_OK as u8);
    rig.assert_still_serves(1);
}

#[test]
fn flush_and_get_id() {
    let mut rig = rig("flushid", false);
    rig.driver.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    rig.driver.chain(0, &[(HDR, 16, R), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.byte(STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.block.stats().flushes.load(Ordering::Relaxed), 1);
    rig.driver.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    rig.driver
        .mem
        .write_slice(&[0xaa; 20], GuestAddress(DATA))
        .unwrap();
    rig.driver
        .chain(2, &[(HDR, 16, R), (DATA, 20, W), (STATUS + 1, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.used(1), (2, 21));
    let mut id = [0u8; 20];
    rig.driver
        .mem
        .read_slice(&mut id, GuestAddress(DATA))
        .unwrap();
    assert_eq!(&id[..9], b"test-disk");
    assert!(id[9..].iter().all(|&b| b == 0));
    // A short ID buffer gets what fits.
    rig.driver.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    rig.driver
        .chain(5, &[(HDR, 16, R), (DATA + 0x100, 4, W), (STATUS + 2, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.used(2), (5, 5));
    let mut id = [0u8; 4];
    rig.driver
        .mem
        .read_slice(&mut id, GuestAddress(DATA + 0x100))
        .unwrap();
    assert_eq!(&id, b"test");
}

#[test]
fn inactive_or_reset_device_ignores_the_queue() {
    let mut rig = rig("reset", false);
    rig.block.reset();
    assert!(!rig.block.is_active());
    rig.driver.header(HDR, VIRTIO_BLK_T_IN, 0);
    rig.driver
        .chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.used_idx(), 0);
}

#[test]
fn direct_io_works_with_unaligned_guest_buffers() {
    let Some(mut rig) = rig_with("direct", false, DISK_SECTORS, CacheMode::None) else {
        return;
    };
    assert!(rig.block.disk().direct());
    let pattern: Vec<u8> = (0..1536u32).map(|i| (i % 241) as u8).collect();
    // Guest buffers at odd addresses: the bounce buffer keeps O_DIRECT aligned.
    rig.driver
        .mem
        .write_slice(&pattern, GuestAddress(DATA + 3))
        .unwrap();
    rig.driver.header(HDR, VIRTIO_BLK_T_OUT, 4);
    rig.driver.chain(
        0,
        &[
            (HDR, 16, R),
            (DATA + 3, 1000, R),
            (DATA + 1003, 536, R),
            (STATUS, 1, W),
        ],
    );
    rig.block.process_queue();
    assert_eq!(rig.driver.byte(STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        &std::fs::read(&rig.path).unwrap()[4 * 512..7 * 512],
        &pattern[..]
    );
    rig.driver.header(HDR, VIRTIO_BLK_T_IN, 4);
    rig.driver
        .chain(4, &[(HDR, 16, R), (DATA + 0x8001, 1536, W), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.byte(STATUS), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 1536];
    rig.driver
        .mem
        .read_slice(&mut back, GuestAddress(DATA + 0x8001))
        .unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mut rig = rig("eventidx", false);
    let mut q = rig.driver.queue();
    q.set_event_idx(true);
    rig.block.reset();
    rig.block
        .activate(ActivateContext {
            mem: rig.driver.mem.clone(),
            queues: vec![q],
            queue_evts: vec![Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())],
            interrupt: rig.interrupt.clone(),
            acked_features: VERSION_1 | crate::devices::virtio::EVENT_IDX,
        })
        .unwrap();
    let used_event = GuestAddress(AVAIL + 4 + u64::from(QSIZE) * 2);
    // used_event = 0: interrupt when the first entry is used.
    rig.driver.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    rig.driver.chain(0, &[(HDR, 16, R), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.interrupt.irq_evt().read().unwrap(), 1);
    // The driver does not move used_event: the second completion raises nothing.
    rig.driver.chain(2, &[(HDR, 16, R), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.driver.used_idx(), 2);
    assert!(
        rig.interrupt.irq_evt().read().is_err(),
        "unwanted interrupt"
    );
    // Asking for the next one (used_event = 2) brings it back.
    rig.driver.mem.write_obj(2u16, used_event).unwrap();
    rig.driver.chain(4, &[(HDR, 16, R), (STATUS, 1, W)]);
    rig.block.process_queue();
    assert_eq!(rig.interrupt.irq_evt().read().unwrap(), 1);
    // The device published avail_event (in the used ring) so the driver can skip kicks.
    let avail_event: u16 = rig
        .driver
        .mem
        .read_obj(GuestAddress(USED + 4 + u64::from(QSIZE) * 8))
        .unwrap();
    assert_eq!(avail_event, 3);
}
