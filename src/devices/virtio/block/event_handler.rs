// SPDX-License-Identifier: Apache-2.0
//! The block device on the event loop: the activation event (register the queue eventfd),
//! queue notifications (serve the queue) and the rate limiter's timer (serve the queue
//! again).

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Block;
use crate::devices::virtio::ACTIVATION_TOKEN;

/// Event token of the request queue.
const PROCESS_QUEUE: u32 = 0;
/// Event token of the rate limiter's timer.
const LIMITER_TIMER: u32 = ACTIVATION_TOKEN - 1;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATION_TOKEN => {
                let evts: Vec<_> = self.queue_evt.iter().cloned().collect();
                self.activation.on_activated(ops, &evts);
                // The driver may have queued requests before the loop was watching.
                self.process_queue();
            }
            PROCESS_QUEUE => {
                if let Some(evt) = &self.queue_evt {
                    let _ = evt.read();
                }
                self.process_queue();
            }
            LIMITER_TIMER => {
                if let Some(l) = self.limiter.as_mut() {
                    l.timer_fired();
                }
                self.process_queue();
            }
            other => log::warn!("virtio-blk: unexpected event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        if let Some(l) = &self.limiter {
            let ev = Events::with_data_raw(l.as_raw_fd(), LIMITER_TIMER, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                log::error!("virtio-blk: cannot watch the rate-limit timer: {e:?}");
            }
        }
    }
}
