// SPDX-License-Identifier: Apache-2.0
//! virtio-vsock: the transmit queue's chain walk (packets from the guest: header checks,
//! connection state machines in the muxer), the receive queue (packets for the guest) and
//! the event queue, on guest memory the fuzzer writes (see `ember_fuzz` for the layout).
//! The guest is CID 3; a host program listens on port 1024 (`<uds>_1024`). Each turn byte
//! `t`: `t & 3` = 0 → a transmit notification; 1 → a receive notification; 2 → host
//! activity: the listener's connections are accepted and sent `t >> 2` bytes, a host
//! client connects to the device's socket and asks for guest port `t >> 2` (`CONNECT
//! <port>\n`), and the muxer handles its host events; 3 → the driver resets and
//! re-activates the device.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Mutex;

use ember::devices::virtio::vsock::device::{Vsock, QUEUE_SIZE};
use ember::devices::virtio::vsock::VsockConfig;
use ember::devices::virtio::VirtioDevice;
use ember_fuzz::QueueRig;
use libfuzzer_sys::fuzz_target;

struct Rig {
    dev: Vsock,
    uds: PathBuf,
    listener: UnixListener,
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let rig = QueueRig::parse(data, 3, QUEUE_SIZE);
    let mut guard = RIG.lock().unwrap();
    let r = guard.get_or_insert_with(|| {
        let uds = ember_fuzz::scratch_dir("vsock").join("v.sock");
        let dev = Vsock::new(&VsockConfig {
            cid: 3,
            uds: uds.clone(),
        })
        .unwrap();
        let mut port = uds.as_os_str().to_os_string();
        port.push("_1024");
        let _ = std::fs::remove_file(&port);
        let listener = UnixListener::bind(&port).unwrap();
        listener.set_nonblocking(true).unwrap();
        Rig { dev, uds, listener }
    });
    let Some(ctx) = rig.activate_context(QUEUE_SIZE, 0) else {
        return;
    };
    if r.dev.activate(ctx).is_err() {
        return;
    }
    let mut host = Vec::new();
    for &t in &rig.turns {
        match t & 3 {
            0 => r.dev.fuzz_turn(true, false),
            1 => r.dev.fuzz_turn(false, false),
            2 => {
                while let Ok((mut s, _)) = r.listener.accept() {
                    let _ = s.set_nonblocking(true);
                    let _ = s.write_all(&vec![b'h'; usize::from(t >> 2)]);
                    host.push(s);
                }
                if let Ok(mut c) = UnixStream::connect(&r.uds) {
                    let _ = c.set_nonblocking(true);
                    let _ = writeln!(c, "CONNECT {}", t >> 2);
                    host.push(c);
                }
                r.dev.fuzz_turn(false, true);
            }
            _ => {
                r.dev.reset();
                let Some(ctx) = rig.activate_context(QUEUE_SIZE, 0) else {
                    break;
                };
                let _ = r.dev.activate(ctx);
            }
        }
    }
    if rig.turns.is_empty() {
        r.dev.fuzz_turn(true, false);
    }
    r.dev.reset();
    drop(host);
    while let Ok((s, _)) = r.listener.accept() {
        drop(s);
    }
});
