// SPDX-License-Identifier: Apache-2.0
//! virtio-rng (device ID 4): the guest's `/dev/hwrng`, filled from the host's `getrandom(2)`
//! through a token bucket, so that a guest reading in a loop costs the host a bounded amount
//! of work.

use std::io::Write;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::rate_limiter::TokenBucket;
use super::{
    add_used, pop_or_enable, ActivateContext, ActivateError, ActivationEvent, Broken, Interrupt,
    VirtioDevice, ACTIVATION_TOKEN, EVENT_IDX,
};
use crate::config::{parse_options, parse_size, ConfigError};
use crate::memory::GuestMemory;
use crate::snapshot::devices::{RngState, VirtioDeviceState};
use crate::snapshot::format::SnapshotError;

/// Default sustained rate: 1 MiB/s.
pub const DEFAULT_RATE: u64 = 1 << 20;
/// Default burst: 64 KiB at once after a quiet period.
pub const DEFAULT_BURST: u64 = 64 << 10;

/// `--rng`: the entropy device and its rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngConfig {
    /// Sustained bytes per second.
    pub rate: u64,
    /// Most bytes at once.
    pub burst: u64,
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
        }
    }
}

impl RngConfig {
    /// Syntax help for `--rng`.
    pub const SYNTAX: &'static str = "[rate=BYTES_PER_SECOND][,burst=BYTES]";

    /// Checks the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rate == 0 {
            return Err(ConfigError::Device(
                "--rng rate=0 would never give the guest a byte: use --no-rng to remove the \
                 device"
                    .into(),
            ));
        }
        if self.burst == 0 {
            return Err(ConfigError::Device(
                "--rng burst= must be at least 1 byte".into(),
            ));
        }
        Ok(())
    }
}

impl FromStr for RngConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut c = Self::default();
        for (k, v) in parse_options(s, "--rng", Self::SYNTAX, &["rate", "burst"])? {
            let n = parse_size(v).ok_or_else(|| {
                ConfigError::Device(format!(
                    "--rng {k}={v:?} is not a size (bytes, or with K/M suffix)"
                ))
            })?;
            match k {
                "rate" => c.rate = n,
                _ => c.burst = n,
            }
        }
        Ok(c)
    }
}

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes handed over per request.
const MAX_REQUEST: usize = 64 << 10;
/// Event-loop token of the rate-limit timer.
const TIMER_TOKEN: u32 = ACTIVATION_TOKEN - 1;

/// Errors of the rng device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The rate-limit timer could not be created.
    #[error("cannot create the virtio-rng rate-limit timer")]
    Timer(#[source] std::io::Error),
    /// The activation eventfd could not be created.
    #[error("cannot create the virtio-rng activation event")]
    EventFd(#[source] std::io::Error),
}

#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    broken: Broken,
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    bucket: TokenBucket,
    activation: ActivationEvent,
    timer: TimerFd,
    timer_armed: bool,
    /// The queue's notification eventfd, kept across resets (it stays on the event loop).
    queue_evts: Vec<Arc<EventFd>>,
    active: Option<Active>,
    buf: Vec<u8>,
    /// Bytes handed to the guest.
    pub bytes_served: u64,
}

impl Rng {
    /// A device limited as `config` says.
    pub fn new(config: &RngConfig) -> Result<Self, RngError> {
        Ok(Self {
            bucket: TokenBucket::new(config.rate, config.burst, Instant::now()),
            activation: ActivationEvent::new().map_err(RngError::EventFd)?,
            timer: TimerFd::new()
                .map_err(|e| RngError::Timer(std::io::Error::from_raw_os_error(e.errno())))?,
            timer_armed: false,
            queue_evts: Vec::new(),
            active: None,
            buf: vec![0; MAX_REQUEST],
            bytes_served: 0,
        })
    }

    /// Fills the guest's buffers while the bucket allows; when it runs dry, waits for the
    /// timer (the guest's requests stay queued, nothing spins). A corrupt queue breaks the
    /// device (NEEDS_RESET) until the driver resets it.
    pub fn process_queue(&mut self) {
        let Some(a) = self.active.as_mut().filter(|a| !a.broken.is_broken()) else {
            return;
        };
        let result = Self::serve(
            a,
            &mut self.bucket,
            &mut self.buf,
            &mut self.bytes_served,
            &mut self.timer,
            &mut self.timer_armed,
        );
        let notify = result.and_then(|used| Ok(used && a.queue.needs_notification(&a.mem)?));
        match notify {
            Ok(true) => a.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => a.broken.mark("virtio-rng", &a.interrupt, &e),
        }
    }

    /// The queue loop of [`Self::process_queue`]; returns whether buffers were used.
    fn serve(
        a: &mut Active,
        bucket: &mut TokenBucket,
        buf: &mut [u8],
        bytes_served: &mut u64,
        timer: &mut TimerFd,
        timer_armed: &mut bool,
    ) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        while let Some(chain) = pop_or_enable(&mut a.queue, &a.mem)? {
            let head = chain.head_index();
            let mut writer = match chain.writer(&a.mem) {
                Ok(w) => w,
                Err(e) => {
                    log::debug!("virtio-rng: bad descriptor chain: {e}");
                    add_used(&mut a.queue, &a.mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let want = writer.available_bytes().min(MAX_REQUEST);
            let n = bucket.take(want as u64, Instant::now());
            let n = usize::try_from(n).unwrap_or(0);
            if want > 0 && n == 0 {
                // Out of tokens: put the request back and come back when there are some.
                crate::metrics::entropy::entropy_rate_limiter_throttled.inc();
                a.queue
                    .set_next_avail((Wrapping(a.queue.next_avail()) - Wrapping(1)).0);
                if !*timer_armed {
                    let wait = bucket.wait_time(Instant::now());
                    if timer.reset(wait, None).is_ok() {
                        *timer_armed = true;
                    }
                }
                break;
            }
            let written = match fill_random(&mut buf[..n]) {
                Ok(()) => writer.write_all(&buf[..n]).map(|()| n).unwrap_or(0),
                Err(e) => {
                    crate::guest_warn!("virtio-rng: getrandom failed: {e}");
                    0
                }
            };
            *bytes_served += written as u64;
            crate::metrics::entropy::entropy_event_count.inc();
            crate::metrics::entropy::entropy_bytes.add(written as u64);
            add_used(
                &mut a.queue,
                &a.mem,
                head,
                u32::try_from(written).unwrap_or(0),
            )?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&[], offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx
            .queues
            .into_iter()
            .next()
            .ok_or(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            })?;
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.queue_evts = ctx.queue_evts;
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            broken: Broken::default(),
        });
        self.activation.signal()
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn saved_queues(&self) -> Vec<(usize, QueueState)> {
        self.active.iter().map(|a| (0, a.queue.state())).collect()
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Rng(RngState {
            tokens: self.bucket.tokens(),
            bytes_served: self.bytes_served,
        })
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), SnapshotError> {
        let VirtioDeviceState::Rng(s) = state else {
            return Err(super::wrong_state_kind("virtio-rng", state));
        };
        self.bucket.set_tokens(s.tokens, Instant::now());
        self.bytes_served = s.bytes_served;
        Ok(())
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATION_TOKEN => {
                let evts = self.queue_evts.clone();
                self.activation.on_activated(ops, &evts);
            }
            TIMER_TOKEN => {
                let _ = self.timer.wait();
                self.timer_armed = false;
            }
            _ => {
                if let Some(e) = self.queue_evts.first() {
                    let _ = e.read();
                }
            }
        }
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        if let Err(e) = ops.add(Events::with_data_raw(
            self.timer.as_raw_fd(),
            TIMER_TOKEN,
            EventSet::IN,
        )) {
            log::error!("virtio-rng: cannot watch the rate-limit timer: {e:?}");
        }
    }
}

/// Fills `buf` from the host's `getrandom(2)` (the urandom pool; never blocks once the host
/// has booted).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn config() {
        assert_eq!("".parse::<RngConfig>().unwrap(), RngConfig::default());
        let c: RngConfig = "rate=2M,burst=4k".parse().unwrap();
        assert_eq!((c.rate, c.burst), (2 << 20, 4 << 10));
        c.validate().unwrap();
        assert!("rate=fast"
            .parse::<RngConfig>()
            .unwrap_err()
            .to_string()
            .contains("not a size"));
        assert!("speed=1".parse::<RngConfig>().is_err());
        let zero: RngConfig = "rate=0".parse().unwrap();
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--no-rng"));
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    #[test]
    fn device_serves_within_the_rate_limit() {
        use crate::devices::virtio::test_ring::TestRing;
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mut ring = TestRing::new(&mem, 0, 16);
        for i in 0..3u64 {
            ring.add_chain(&[(0x10_0000 + i * 0x1_0000, 0x8000, true)]);
        }
        let mut dev = Rng::new(&RngConfig {
            rate: 1000,
            burst: 0x6000,
        })
        .unwrap();
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        dev.active = Some(Active {
            mem: mem.clone(),
            queue: ring.queue(),
            interrupt: Arc::new(Interrupt::new(evt)),
            broken: Broken::default(),
        });
        dev.process_queue();
        // The burst covers the first request partly; then the bucket is dry: the rest
        // waits for the timer instead of spinning.
        assert_eq!(ring.used_idx(), 1);
        assert_eq!(ring.used_entry(0), (0, 0x6000));
        assert_eq!(dev.bytes_served, 0x6000);
        assert!(dev.timer_armed);
        let mut got = vec![0u8; 0x6000];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert!(got.iter().any(|&b| b != 0));
        dev.process_queue();
        assert_eq!(ring.used_idx(), 1, "no tokens, no bytes");
        // Later: the next request gets what accrued, never more than the burst.
        std::thread::sleep(Duration::from_millis(20));
        dev.process_queue();
        assert_eq!(ring.used_idx(), 2);
        let (_, n) = ring.used_entry(1);
        assert!(n > 0 && n <= 0x6000, "{n}");
    }

    #[test]
    fn avail_index_far_ahead_breaks_the_device_instead_of_spinning() {
        use crate::devices::virtio::test_ring::{finishes, TestRing};
        use vm_memory::GuestAddress;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mut ring = TestRing::new(&mem, 0, 16);
        ring.set_avail_idx(16 + 5);
        let mut dev = Rng::new(&RngConfig::default()).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.active = Some(Active {
            mem: mem.clone(),
            queue: ring.queue(),
            interrupt: interrupt.clone(),
            broken: Broken::default(),
        });
        let mut dev = finishes(move || {
            dev.process_queue();
            dev
        });
        assert!(interrupt.needs_reset());
        assert!(dev.active.as_ref().unwrap().broken.is_broken());
        // The driver makes the ring sane again but does not reset the device: a notify
        // does nothing.
        ring.set_avail_idx(0);
        ring.add_chain(&[(0x10_0000, 64, true)]);
        dev.process_queue();
        assert_eq!(ring.used_idx(), 0);
        assert_eq!(dev.bytes_served, 0);
    }

    #[test]
    fn random_bytes() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        fill_random(&mut []).unwrap();
    }
}
