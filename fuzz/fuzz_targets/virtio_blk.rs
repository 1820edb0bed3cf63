// SPDX-License-Identifier: Apache-2.0
//! virtio-blk: the request queue's chain walk, request checks and disk I/O, on guest memory
//! the fuzzer writes (see `ember_fuzz` for the layout). Flags bits 4-5 pick the disk: 0
//! read-write, 1 read-only, 2 read-write with cache=none (O_DIRECT, the bounce buffer; the
//! read-write disk where the file system refuses O_DIRECT). Each turn byte: bit 0 set →
//! the driver resets and re-activates the device first; then the queue is processed.
#![no_main]

use std::sync::Mutex;

use ember::config::{CacheMode, DiskConfig};
use ember::devices::virtio::block::{Block, DiskFile, QUEUE_SIZE};
use ember::devices::virtio::VirtioDevice;
use ember_fuzz::QueueRig;
use libfuzzer_sys::fuzz_target;

/// Three devices made once (each on its own 64-sector image, unlinked after opening).
static DEVICES: Mutex<Vec<Block>> = Mutex::new(Vec::new());

fn devices() -> std::sync::MutexGuard<'static, Vec<Block>> {
    let mut devs = DEVICES.lock().unwrap();
    if devs.is_empty() {
        let dir = ember_fuzz::scratch_dir("blk");
        for (i, (read_only, cache)) in [
            (false, CacheMode::Writeback),
            (true, CacheMode::Writeback),
            (false, CacheMode::None),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.join(format!("disk{i}.img"));
            let content: Vec<u8> = (0..64u8).flat_map(|s| [s; 512]).collect();
            std::fs::write(&path, content).unwrap();
            let cfg = DiskConfig {
                path: path.clone(),
                read_only,
                id: Some(format!("fuzz{i}")),
                cache,
                bw: None,
                iops: None,
            };
            let disk = DiskFile::open(&cfg).or_else(|_| {
                DiskFile::open(&DiskConfig {
                    cache: CacheMode::Writeback,
                    ..cfg
                })
            });
            let _ = std::fs::remove_file(&path);
            devs.push(Block::new(disk.unwrap(), "vda", None).unwrap());
        }
        let _ = std::fs::remove_dir(&dir);
    }
    devs
}

fuzz_target!(|data: &[u8]| {
    let rig = QueueRig::parse(data, 1, QUEUE_SIZE);
    let mut devs = devices();
    let dev = &mut devs[usize::from(rig.variant & 3) % 3];
    let Some(ctx) = rig.activate_context(QUEUE_SIZE, dev.avail_features()) else {
        return;
    };
    if dev.activate(ctx).is_err() {
        return;
    }
    for &turn in &rig.turns {
        if turn & 1 != 0 {
            dev.reset();
            let Some(ctx) = rig.activate_context(QUEUE_SIZE, dev.avail_features()) else {
                return;
            };
            let _ = dev.activate(ctx);
        }
        dev.process_queue();
    }
    if rig.turns.is_empty() {
        dev.process_queue();
    }
    dev.reset();
});
