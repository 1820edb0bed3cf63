// SPDX-License-Identifier: Apache-2.0
//! virtio-blk without Linux: these tests play the guest driver themselves. They talk to the
//! virtio-mmio transport through its registers (as a vCPU's MMIO exits would), lay out the
//! split queue in real guest memory, let the real event loop run the device, and check the
//! real image files. Milliseconds each, no KVM needed — except the lock test, which runs the
//! `ember` binary as a second VM and needs nothing but the binary.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use common::{run_ember, temp_dir};
use ember::config::DiskConfig;
use ember::devices::bus::BusDevice;
use ember::devices::virtio::block::{Block, DiskFile};
use ember::devices::virtio::mmio::MmioTransport;
use ember::devices::virtio::{Interrupt, VERSION_1};
use ember::event_loop::{new_event_manager, EventManager};

const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x40000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// A guest driver for one virtio-blk device, working through the MMIO registers.
struct Guest {
    transport: MmioTransport,
    mem: GuestMemoryMmap,
    events: EventManager,
    interrupt: Arc<Interrupt>,
    block: Arc<Mutex<Block>>,
    avail_idx: u16,
    used_seen: u16,
}

impl Guest {
    /// Plugs a block device for `cfg` in (as `attach_virtio_device` does, minus KVM).
    fn new(cfg: &DiskConfig) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let disk = DiskFile::open(cfg).unwrap();
        let block = Arc::new(Mutex::new(
            Block::new(disk, "vda", cfg.id.as_deref())
                .unwrap()
                .with_rate_limit(cfg.bw, cfg.iops)
                .unwrap(),
        ));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let queue_evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let transport = MmioTransport::new(
            mem.clone(),
            block.clone(),
            interrupt.clone(),
            vec![queue_evt],
        )
        .unwrap();
        let mut events = new_event_manager().unwrap();
        events.add_subscriber(block.clone());
        Self {
            transport,
            mem,
            events,
            interrupt,
            block,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn r(&mut self, reg: u32) -> u32 {
        let mut d = [0u8; 4];
        self.transport.read(u64::from(reg), &mut d);
        u32::from_le_bytes(d)
    }

    fn w(&mut self, reg: u32, v: u32) {
        self.transport.write(u64::from(reg), &v.to_le_bytes());
    }

    fn config_u64(&mut self, offset: u64) -> u64 {
        let mut d = [0u8; 8];
        self.transport
            .read(u64::from(VIRTIO_MMIO_CONFIG) + offset, &mut d);
        u64::from_le_bytes(d)
    }

    /// The Linux driver's probe sequence; accepts `want` of the offered features. Returns the
    /// offered features.
    fn init(&mut self, want: u64) -> u64 {
        assert_eq!(
            self.r(VIRTIO_MMIO_MAGIC_VALUE),
            u32::from_le_bytes(*b"virt")
        );
        assert_eq!(self.r(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(self.r(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_BLOCK);
        self.w(VIRTIO_MMIO_STATUS, 0);
        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        self.w(VIRTIO_MMIO_STATUS, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        self.w(VIRTIO_MMIO_STATUS, status);
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let mut offered = u64::from(self.r(VIRTIO_MMIO_DEVICE_FEATURES)) << 32;
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        offered |= u64::from(self.r(VIRTIO_MMIO_DEVICE_FEATURES));
        let acked = offered & want;
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, (acked >> 32) as u32);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, acked as u32);
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        self.w(VIRTIO_MMIO_STATUS, status);
        assert_eq!(self.r(VIRTIO_MMIO_STATUS), status, "FEATURES_OK refused");
        self.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(self.r(VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(self.r(VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(QSIZE));
        self.w(VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        self.w(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
        self.w(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        self.w(VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
        self.w(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        // Fresh rings.
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
            .unwrap();
        self.avail_idx = 0;
        self.used_seen = 0;
        status |= VIRTIO_CONFIG_S_DRIVER_OK;
        self.w(VIRTIO_MMIO_STATUS, status);
        assert_eq!(self.r(VIRTIO_MMIO_STATUS), status, "DRIVER_OK refused");
        // Let the event loop see the activation.
        self.events.run_with_timeout(100).unwrap();
        offered
    }

    /// Queues one request (descriptors from index `start`) and notifies the device.
    fn submit(&mut self, start: u16, descs: &[(u64, u32, u16)]) {
        for (k, &(addr, len, dir)) in descs.iter().enumerate() {
            let i = start + k as u16;
            let at = DESC + u64::from(i) * 16;
            let last = k + 1 == descs.len();
            let flags = dir | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
        }
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(start, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        // A QueueNotify write that reaches the transport (no KVM ioeventfd here).
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    /// Runs the event loop until the device interrupts and returns the next used entry
    /// (head, length); None if nothing comes within a second.
    fn wait_used(&mut self) -> Option<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if used != self.used_seen {
                assert_ne!(
                    self.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
                    0
                );
                assert!(
                    self.interrupt.irq_evt().read().is_ok(),
                    "no interrupt raised"
                );
                self.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
                let at = USED + 4 + u64::from(self.used_seen % QSIZE) * 8;
                self.used_seen = self.used_seen.wrapping_add(1);
                // With EVENT_IDX: interrupt me again once the next entry is used (what
                // Linux's virtqueue_enable_cb does).
                self.mem
                    .write_obj(
                        self.used_seen,
                        GuestAddress(AVAIL + 4 + u64::from(QSIZE) * 2),
                    )
                    .unwrap();
                return Some((
                    self.mem.read_obj(GuestAddress(at)).unwrap(),
                    self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                ));
            }
            if Instant::now() > deadline {
                return None;
            }
            self.events.run_with_timeout(20).unwrap();
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// One request, start to end: returns the status byte and the used length.
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, u16)>) -> (u8, u32) {
        self.header(kind, sector);
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![(HDR, 16, R)];
        if let Some((len, dir)) = data {
            descs.push((DATA, len, dir));
        }
        descs.push((STATUS, 1, W));
        self.submit(0, &descs);
        let (head, len) = self.wait_used().expect("the device did not answer");
        assert_eq!(head, 0);
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }
}

/// A temporary directory removed at the end of the test.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn image(dir: &Path, name: &str, len: usize, fill: impl Fn(usize) -> u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, (0..len).map(fill).collect::<Vec<u8>>()).unwrap();
    p
}

fn sector(path: &Path, n: usize, count: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[n * 512..(n + count) * 512].to_vec()
}

#[test]
fn sectors_written_reach_the_file_and_read_back() {
    let dir = Scratch(temp_dir("vblk-rw"));
    let img = image(&dir, "disk.img", 1 << 20, |_| 0);
    let mut g = Guest::new(&DiskConfig::new(&img));
    let offered = g.init(u64::MAX);
    assert_ne!(offered & VERSION_1, 0);
    assert_ne!(offered & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(offered & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(g.config_u64(0), 2048, "capacity in sectors");

    // Write 4 sectors at sector 8, flush, and find them in the file.
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 13 + 1) as u8).collect();
    g.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(
        g.request(VIRTIO_BLK_T_OUT, 8, Some((2048, R))),
        (VIRTIO_BLK_S_OK as u8, 1)
    );
    assert_eq!(
        g.request(VIRTIO_BLK_T_FLUSH, 0, None),
        (VIRTIO_BLK_S_OK as u8, 1)
    );
    assert_eq!(sector(&img, 8, 4), pattern);
    assert!(sector(&img, 7, 1).iter().all(|&b| b == 0));
    assert!(sector(&img, 12, 1).iter().all(|&b| b == 0));

    // What the host file holds is what the guest reads.
    let mut file = std::fs::read(&img).unwrap();
    file[100 * 512..101 * 512].fill(0x5a);
    std::fs::write(&img, &file).unwrap();
    g.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 99, Some((1024, W))),
        (VIRTIO_BLK_S_OK as u8, 1025)
    );
    let mut back = vec![0u8; 1024];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back[..512].iter().all(|&b| b == 0));
    assert!(back[512..].iter().all(|&b| b == 0x5a));

    // Out of range: IOERR, and the device goes on.
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 2048, Some((512, W))).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        g.request(VIRTIO_BLK_T_GET_ID, 0, Some((20, W))),
        (VIRTIO_BLK_S_OK as u8, 21)
    );
    let mut id = [0u8; 3];
    g.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"vda");
}

/// A disk limited to one request per second: of four requests queued with one notify, the
/// first is served at once and the others wait; the limiter's timer serves them, one a
/// second, without the driver notifying again.
#[test]
fn requests_over_the_rate_limit_wait_for_the_timer_not_for_a_kick() {
    let dir = Scratch(temp_dir("vblk-limit"));
    let img = image(&dir, "d.img", 64 << 10, |_| 0);
    let cfg: DiskConfig = format!("{},iops=1,iops_burst=1", img.display())
        .parse()
        .unwrap();
    let mut g = Guest::new(&cfg);
    g.init(u64::MAX);
    // Four writes of one sector each (sector k holds k+1), each chain its own header, data
    // and status, all made available before the one notify.
    for k in 0..4u16 {
        let hdr = HDR + u64::from(k) * 0x100;
        let data = DATA + u64::from(k) * 0x1000;
        let status = STATUS + u64::from(k);
        g.mem
            .write_obj(VIRTIO_BLK_T_OUT, GuestAddress(hdr))
            .unwrap();
        g.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        g.mem
            .write_obj(u64::from(k), GuestAddress(hdr + 8))
            .unwrap();
        g.mem
            .write_slice(&[k as u8 + 1; 512], GuestAddress(data))
            .unwrap();
        g.mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        let descs = [(hdr, 16, R), (data, 512, R), (status, 1, W)];
        for (j, &(addr, len, dir)) in descs.iter().enumerate() {
            let i = k * 3 + j as u16;
            let at = DESC + u64::from(i) * 16;
            let flags = dir | if j < 2 { VRING_DESC_F_NEXT as u16 } else { 0 };
            g.mem.write_obj(addr, GuestAddress(at)).unwrap();
            g.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            g.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            g.mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
        }
        g.mem
            .write_obj(k * 3, GuestAddress(AVAIL + 4 + u64::from(k) * 2))
            .unwrap();
    }
    g.mem.write_obj(4u16, GuestAddress(AVAIL + 2)).unwrap();
    g.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let used = |g: &Guest| g.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
    g.events.run_with_timeout(100).unwrap();
    assert_eq!(
        used(&g),
        1,
        "the first request is served at once, the rest held"
    );
    let stats = g.block.lock().unwrap().stats();
    let throttled = || stats.throttled.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(throttled(), 1);
    assert_eq!(sector(&img, 0, 1), vec![1u8; 512]);
    assert_eq!(sector(&img, 1, 1), vec![0u8; 512], "held, not written");
    // No more notifies: the event loop (the limiter's timer) serves the rest. The deadline
    // is hang detection only.
    let deadline = Instant::now() + Duration::from_secs(60);
    while used(&g) < 4 && Instant::now() < deadline {
        g.events.run_with_timeout(100).unwrap();
    }
    assert_eq!(used(&g), 4, "held requests were never served");
    for k in 0..4u16 {
        let at = USED + 4 + u64::from(k) * 8;
        assert_eq!(
            g.mem.read_obj::<u32>(GuestAddress(at)).unwrap(),
            u32::from(k) * 3
        );
        let st: u8 = g.mem.read_obj(GuestAddress(STATUS + u64::from(k))).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK as u8);
        assert_eq!(sector(&img, usize::from(k), 1), vec![k as u8 + 1; 512]);
    }
    assert_eq!(throttled(), 3, "each later request waited once");
    assert_ne!(
        g.interrupt.irq_evt().read().unwrap_or(0),
        0,
        "the guest was told"
    );
}

#[test]
fn read_only_disk_is_offered_ro_and_refuses_writes() {
    let dir = Scratch(temp_dir("vblk-ro"));
    let img = image(&dir, "ro.img", 64 << 10, |i| (i / 512) as u8);
    let before = std::fs::read(&img).unwrap();
    let cfg: DiskConfig = format!("{},ro,id=golden", img.display()).parse().unwrap();
    let mut g = Guest::new(&cfg);
    let offered = g.init(u64::MAX);
    assert_ne!(offered & (1 << VIRTIO_BLK_F_RO), 0);
    g.mem
        .write_slice(&[0xffu8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        g.request(VIRTIO_BLK_T_OUT, 3, Some((512, R))).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        g.request(VIRTIO_BLK_T_FLUSH, 0, None).0,
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 3, Some((512, W))).0,
        VIRTIO_BLK_S_OK as u8
    );
    let mut back = [0u8; 512];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 3));
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the read-only image changed"
    );
    let stats = g.block.lock().unwrap().stats();
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn reset_stops_the_device_and_it_can_start_again() {
    let dir = Scratch(temp_dir("vblk-reset"));
    let img = image(&dir, "d.img", 64 << 10, |i| (i / 512) as u8);
    let mut g = Guest::new(&DiskConfig::new(&img));
    g.init(VERSION_1);
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 1, Some((512, W))).0,
        VIRTIO_BLK_S_OK as u8
    );
    g.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(g.r(VIRTIO_MMIO_STATUS), 0);
    assert!(!g.block.lock().unwrap().is_active());
    // Requests after the reset are not served.
    g.header(VIRTIO_BLK_T_IN, 2);
    g.submit(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(g.wait_used(), None);
    // A new probe brings it back.
    g.init(VERSION_1);
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 2, Some((512, W))).0,
        VIRTIO_BLK_S_OK as u8
    );
    let mut back = [0u8; 512];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 2));
}

#[test]
fn broken_queue_shows_needs_reset_through_the_registers() {
    let dir = Scratch(temp_dir("vblk-needsreset"));
    let img = image(&dir, "d.img", 64 << 10, |_| 0);
    let mut g = Guest::new(&DiskConfig::new(&img));
    g.init(VERSION_1);
    // A head index past the queue: it cannot even be returned in the used ring.
    g.mem.write_obj(QSIZE + 5, GuestAddress(AVAIL + 4)).unwrap();
    g.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    g.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    g.events.run_with_timeout(100).unwrap();
    assert_ne!(g.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_ne!(
        g.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    // The driver resets and starts over; the device works again.
    g.init(VERSION_1);
    assert_eq!(g.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(
        g.request(VIRTIO_BLK_T_FLUSH, 0, None).0,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn legacy_driver_without_version_1_is_refused() {
    let dir = Scratch(temp_dir("vblk-legacy"));
    let img = image(&dir, "d.img", 4096, |_| 0);
    let mut g = Guest::new(&DiskConfig::new(&img));
    g.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    g.w(
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    g.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    g.w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    g.w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(g.r(VIRTIO_MMIO_STATUS), s);
}

fn dump(f: &common::Finished) -> String {
    format!("--- stdout ---\n{}\n--- stderr ---\n{}", f.stdout, f.stderr)
}

/// A second VM on a writable image is refused before it starts, by the same code path a
/// real VM uses (the `ember` binary; this process holds the image like a running VM).
#[test]
fn second_vm_on_a_writable_image_is_refused() {
    let dir = Scratch(temp_dir("vblk-lock"));
    let img = image(&dir, "shared.img", 64 << 10, |_| 0);
    // Any readable file passes the kernel check; the disks are opened before it is loaded.
    let kernel = image(&dir, "not-a-kernel", 64, |_| 0);
    let k = kernel.to_str().unwrap();
    let i = img.to_str().unwrap();
    let t = Duration::from_secs(30);
    let first = DiskFile::open(&DiskConfig::new(&img)).unwrap();

    let second = run_ember(&["run", "--kernel", k, "--disk", i], None, t);
    assert_eq!(second.code, Some(2), "{}", dump(&second));
    assert!(second.stderr.contains("is in use"), "{}", dump(&second));
    assert!(second.stderr.contains(i), "{}", dump(&second));
    // Read-only is refused too while a writer holds it.
    let ro = format!("{i},ro");
    let second = run_ember(&["run", "--kernel", k, "--disk", &ro], None, t);
    assert!(second.stderr.contains("is in use"), "{}", dump(&second));

    // Once the first VM is gone, the lock is not what stops the (bogus) kernel.
    drop(first);
    let third = run_ember(&["run", "--kernel", k, "--disk", i], None, t);
    assert!(!third.stderr.contains("is in use"), "{}", dump(&third));
    assert_ne!(third.code, Some(0), "{}", dump(&third));

    // A missing image is a clear error, before anything starts.
    let missing = "/nonexistent/disk.img";
    let gone = run_ember(&["run", "--kernel", k, "--disk", missing], None, t);
    assert_eq!(gone.code, Some(2), "{}", dump(&gone));
    assert!(gone.stderr.contains(missing), "{}", dump(&gone));
    assert!(gone.stderr.contains("no such file"), "{}", dump(&gone));
}
