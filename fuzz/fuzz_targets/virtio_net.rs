// SPDX-License-Identifier: Apache-2.0
//! virtio-net: the transmit queue's chain walk (frames to the TAP) and the receive path
//! (frames from the TAP into the guest's buffers, mergeable or not), on guest memory the
//! fuzzer writes (see `ember_fuzz` for the layout). The TAP is a stand-in: one end of a
//! datagram socket pair. Flags bit 4: the driver acked every offered feature
//! (MRG_RXBUF among them) instead of none. Each turn byte `t`:
//! `t & 3` = 0 → a transmit notification; 1 → a receive notification with the TAP
//! readable; 2 → a frame of `(t >> 2)² × 17` bytes arrives on the TAP, then the TAP's
//! event; 3 → the driver resets and re-activates the device.
#![no_main]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use ember::devices::virtio::net::device::{Net, QUEUE_SIZE};
use ember::devices::virtio::net::header::OFFERED_FEATURES;
use ember::devices::virtio::net::tap::Tap;
use ember::devices::virtio::net::MacAddr;
use ember::devices::virtio::VirtioDevice;
use ember_fuzz::QueueRig;
use libfuzzer_sys::fuzz_target;

struct Rig {
    net: Net,
    /// The host's end of the stand-in TAP.
    peer: UnixDatagram,
    /// The device's end, to drain what it left unread.
    ours: UnixDatagram,
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fn drain(s: &UnixDatagram) {
    let mut buf = vec![0u8; 70_000];
    while s.recv(&mut buf).is_ok() {}
}

fuzz_target!(|data: &[u8]| {
    let rig = QueueRig::parse(data, 2, QUEUE_SIZE);
    let mut guard = RIG.lock().unwrap();
    let r = guard.get_or_insert_with(|| {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let keep = ours.try_clone().unwrap();
        let file = std::fs::File::from(OwnedFd::from(ours));
        let net = Net::new(
            Tap::from_file(file, "fuzztap0"),
            MacAddr([2, 0, 0, 0, 0, 1]),
        )
        .unwrap();
        Rig {
            net,
            peer,
            ours: keep,
        }
    });
    let features = if rig.variant & 1 != 0 {
        OFFERED_FEATURES
    } else {
        0
    };
    let Some(ctx) = rig.activate_context(QUEUE_SIZE, features) else {
        return;
    };
    if r.net.fuzz_activate(ctx).is_err() {
        return;
    }
    let frame: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    for &t in &rig.turns {
        match t & 3 {
            0 => r.net.fuzz_turn(true, false),
            1 => r.net.fuzz_turn(false, true),
            2 => {
                let len = usize::from(t >> 2).pow(2) * 17;
                let _ = r.peer.send(&frame[..len]);
                r.net.fuzz_turn(false, true);
            }
            _ => {
                r.net.reset();
                let Some(ctx) = rig.activate_context(QUEUE_SIZE, features) else {
                    break;
                };
                let _ = r.net.fuzz_activate(ctx);
            }
        }
    }
    if rig.turns.is_empty() {
        r.net.fuzz_turn(true, false);
    }
    r.net.reset();
    drain(&r.peer);
    drain(&r.ours);
});
