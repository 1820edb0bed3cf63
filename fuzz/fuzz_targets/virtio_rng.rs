// SPDX-License-Identifier: Apache-2.0
//! virtio-rng: the request queue's chain walk and the rate limiter, on guest memory the
//! fuzzer writes (see `ember_fuzz` for the layout). Flags bit 4: a tight rate limit (64
//! bytes/s, burst 64) instead of the default. Each turn byte: bit 0 set → the driver
//! resets and re-activates the device first; then the queue is processed.
#![no_main]

use std::sync::Mutex;

use ember::devices::virtio::rng::{Rng, RngConfig, QUEUE_SIZE};
use ember::devices::virtio::VirtioDevice;
use ember_fuzz::QueueRig;
use libfuzzer_sys::fuzz_target;

static DEVICES: Mutex<Vec<Rng>> = Mutex::new(Vec::new());

fuzz_target!(|data: &[u8]| {
    let rig = QueueRig::parse(data, 1, QUEUE_SIZE);
    let mut devs = DEVICES.lock().unwrap();
    if devs.is_empty() {
        devs.push(Rng::new(&RngConfig::default()).unwrap());
        devs.push(
            Rng::new(&RngConfig {
                rate: 64,
                burst: 64,
            })
            .unwrap(),
        );
    }
    let dev = &mut devs[usize::from(rig.variant & 1)];
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
