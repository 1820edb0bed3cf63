// SPDX-License-Identifier: Apache-2.0
//! The block device on the event loop: the activation event (register the queue eventfd)
//! and queue notifications (serve the queue).

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Block;
use crate::devices::virtio::ACTIVATION_TOKEN;

/// Event token of the request queue.
const PROCESS_QUEUE: u32 = 0;

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
            other => log::warn!("virtio-blk: unexpected event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
    }
}
