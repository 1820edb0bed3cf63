// SPDX-License-Identifier: Apache-2.0
//! Token buckets and the rate limiter of a device queue, so that a guest doing I/O in a loop
//! costs the host a bounded amount of work per second.
//!
//! - [`TokenBucket`]: `rate` tokens per second, at most `burst` saved up; time is passed in,
//!   so it is testable without sleeping. Two ways to take tokens: [`TokenBucket::take`]
//!   grants part of a request (virtio-rng fills a buffer with what it may), and
//!   [`TokenBucket::try_consume`] admits a whole request or nothing (a disk request, a
//!   frame): a request larger than the burst is admitted when the bucket is full and leaves
//!   it in debt, so that any request size goes through and the long-term rate still holds.
//! - [`RateLimiter`]: up to two buckets (bytes and operations) and a timerfd. A device asks
//!   it before each request; when it says no, the device puts the request back, stops
//!   serving that queue and waits: the limiter has armed its timer for the moment the
//!   request fits, and the device's event-loop handler calls
//!   [`RateLimiter::timer_fired`] and serves the queue again. The guest need not kick
//!   again (it would not: it already did), and the device neither spins nor polls.
//!
//! The plain configuration ([`BucketConfig`]) is what `--disk ...,bw=,iops=` and `--net
//! ...,rx=,tx=` produce (parsed in [`crate::config`]); devices take it as is.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

const NS_PER_SEC: u128 = 1_000_000_000;

/// Shortest timer the limiter arms (a zero duration would disarm a timerfd).
const MIN_WAIT: Duration = Duration::from_micros(100);

/// One limit: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketConfig {
    /// Sustained tokens (bytes or operations) per second; at least 1.
    pub rate: u64,
    /// Most tokens at once after a quiet period; at least 1.
    pub burst: u64,
}

impl BucketConfig {
    /// A limit of `rate` per second with `burst` at once; without a burst, a tenth of a
    /// second's worth (at least 1), as QEMU's throttling does.
    pub fn new(rate: u64, burst: Option<u64>) -> Self {
        Self {
            rate: rate.max(1),
            burst: burst.unwrap_or(rate / 10).max(1),
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up, possibly in debt
/// after a request larger than the burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    /// Tokens owed (after a request larger than the burst); refills pay it first.
    debt: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate: rate.max(1),
            burst: burst.max(1),
            tokens: burst.max(1),
            debt: 0,
            last: now,
        }
    }

    /// A full bucket for `config`.
    pub fn from_config(config: &BucketConfig, now: Instant) -> Self {
        Self::new(config.rate, config.burst, now)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = u128::from(self.rate) * elapsed.as_nanos() / NS_PER_SEC;
        if add == 0 {
            return;
        }
        let add = u64::try_from(add).unwrap_or(u64::MAX);
        let pay = add.min(self.debt);
        self.debt -= pay;
        self.tokens = self.tokens.saturating_add(add - pay).min(self.burst);
        if self.tokens == self.burst {
            self.last = now;
        } else {
            // Advance by the time those tokens took, keeping the remainder.
            let used_ns = u128::from(add) * NS_PER_SEC / u128::from(self.rate);
            self.last += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        }
    }

    /// Tokens left (for a snapshot).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Sets the tokens left (at most the burst), with no debt, refilling from `now` on (a
    /// restore).
    pub fn set_tokens(&mut self, tokens: u64, now: Instant) {
        self.tokens = tokens.min(self.burst);
        self.debt = 0;
        self.last = now;
    }

    /// Takes up to `want` tokens; returns how many were granted (maybe 0).
    pub fn take(&mut self, want: u64, now: Instant) -> u64 {
        self.refill(now);
        if self.debt > 0 {
            return 0;
        }
        let got = want.min(self.tokens);
        self.tokens -= got;
        got
    }

    /// Whether a request of `cost` tokens would be admitted now (see
    /// [`try_consume`](Self::try_consume)).
    pub fn admits(&mut self, cost: u64, now: Instant) -> bool {
        self.refill(now);
        self.debt == 0 && self.tokens >= cost.min(self.burst)
    }

    /// Admits a request of `cost` tokens whole, or not at all: when the bucket holds `cost`
    /// tokens, or is full and `cost` is more than the burst (it is then left in debt).
    pub fn try_consume(&mut self, cost: u64, now: Instant) -> bool {
        if !self.admits(cost, now) {
            return false;
        }
        if cost <= self.tokens {
            self.tokens -= cost;
        } else {
            self.debt = cost - self.tokens;
            self.tokens = 0;
        }
        true
    }

    /// How long until a request of `cost` tokens is admitted (zero if it is now).
    pub fn wait_for(&mut self, cost: u64, now: Instant) -> Duration {
        if self.admits(cost, now) {
            return Duration::ZERO;
        }
        let need =
            u128::from(self.debt) + u128::from(cost.min(self.burst)) - u128::from(self.tokens);
        let ns = (need * NS_PER_SEC).div_ceil(u128::from(self.rate));
        // Part of the next token has accrued since `last`.
        let since = now.saturating_duration_since(self.last).as_nanos();
        let ns = u64::try_from(ns.saturating_sub(since)).unwrap_or(u64::MAX);
        Duration::from_nanos(ns).max(MIN_WAIT)
    }

    /// How long until at least one token can be granted by [`take`](Self::take).
    pub fn wait_time(&mut self, now: Instant) -> Duration {
        self.wait_for(1, now)
    }
}

/// A queue's rate limit: a bucket of bytes and one of operations (either may be absent),
/// and the timer that wakes the device when a refused request would fit.
#[derive(Debug)]
pub struct RateLimiter {
    name: String,
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
    throttled: u64,
}

impl RateLimiter {
    /// A limiter for `bytes` per second and `ops` per second (either may be `None`: no limit
    /// on it); `None` when neither is limited. `name` names the queue in the log line that
    /// the limiter writes when it goes (how many times it held the queue).
    pub fn new(
        name: &str,
        bytes: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> std::io::Result<Option<Self>> {
        if bytes.is_none() && ops.is_none() {
            return Ok(None);
        }
        let now = Instant::now();
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(Some(Self {
            name: name.to_string(),
            bytes: bytes.map(|c| TokenBucket::from_config(&c, now)),
            ops: ops.map(|c| TokenBucket::from_config(&c, now)),
            timer,
            blocked: false,
            throttled: 0,
        }))
    }

    /// Admits a request of `bytes` bytes (one operation), taking its tokens from both
    /// buckets, or refuses it: then the queue is blocked, the throttle counted, and the
    /// timer armed for when the request would fit. While blocked, every request is refused
    /// (without counting) until [`timer_fired`](Self::timer_fired).
    pub fn consume(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let fits_bytes = self.bytes.as_mut().is_none_or(|b| b.admits(bytes, now));
        let fits_ops = self.ops.as_mut().is_none_or(|b| b.admits(1, now));
        if fits_bytes && fits_ops {
            if let Some(b) = &mut self.bytes {
                b.try_consume(bytes, now);
            }
            if let Some(b) = &mut self.ops {
                b.try_consume(1, now);
            }
            return true;
        }
        let wait_bytes = self.bytes.as_mut().map(|b| b.wait_for(bytes, now));
        let wait_ops = self.ops.as_mut().map(|b| b.wait_for(1, now));
        let wait = wait_bytes
            .into_iter()
            .chain(wait_ops)
            .max()
            .unwrap_or(MIN_WAIT)
            .max(MIN_WAIT);
        self.throttled += 1;
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            // Without a timer the queue would never resume: let the next kick retry.
            Err(e) => log::error!("rate limiter: cannot arm its timer: {e}"),
        }
        false
    }

    /// Whether the queue waits for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer expired (the event loop saw it readable): reads it and unblocks the queue.
    /// Blocks until it expires if it has not yet (tests call it to wait).
    pub fn timer_fired(&mut self) {
        if self.blocked {
            let _ = self.timer.wait();
        }
        self.blocked = false;
    }

    /// How many times a request was refused (the queue throttled).
    pub fn throttled(&self) -> u64 {
        self.throttled
    }
}

impl Drop for RateLimiter {
    fn drop(&mut self) {
        let n = self.throttled;
        if n > 0 {
            // Once per queue and run.
            log::info!(
                "{}: the rate limit held the queue {n} {}",
                self.name,
                if n == 1 { "time" } else { "times" }
            );
        }
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd, for the event loop.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_rate_and_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        assert_eq!(b.take(500, t0), 100, "burst first");
        assert_eq!(b.take(1, t0), 0);
        let w = b.wait_time(t0);
        assert!(w > Duration::ZERO && w <= Duration::from_millis(1), "{w:?}");
        // 50 ms at 1000 B/s = 50 bytes.
        assert_eq!(b.take(500, t0 + Duration::from_millis(50)), 50);
        // Over a long time, never more than the burst.
        assert_eq!(b.take(10_000, t0 + Duration::from_secs(100)), 100);
        // Sustained: 10 s of asking in 1 ms steps gives ~rate * 10 s.
        let mut b = TokenBucket::new(1000, 100, t0);
        let mut total = 0;
        for ms in 0..10_000u64 {
            total += b.take(1 << 20, t0 + Duration::from_millis(ms));
        }
        assert!((10_000..=10_100).contains(&total), "{total}");
    }

    #[test]
    fn whole_requests_wait_until_they_fit() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        assert!(b.try_consume(60, t0));
        assert!(!b.try_consume(60, t0), "40 left");
        assert_eq!(b.tokens(), 40, "a refusal takes nothing");
        // 20 more tokens take 20 ms.
        assert_eq!(b.wait_for(60, t0), Duration::from_millis(20));
        let t1 = t0 + Duration::from_millis(20);
        assert_eq!(b.wait_for(60, t1), Duration::ZERO);
        assert!(b.try_consume(60, t1));
        assert_eq!(b.tokens(), 0);
    }

    #[test]
    fn a_request_larger_than_the_burst_goes_into_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        // Full bucket: admitted, 900 owed.
        assert!(b.try_consume(1000, t0));
        // Half a second later, 400 are still owed: the debt and then the next request's
        // token take 401 ms more.
        let w = b.wait_for(1, t0 + Duration::from_millis(500));
        assert_eq!(w, Duration::from_millis(401));
        assert!(!b.try_consume(1, t0 + Duration::from_millis(900)));
        assert_eq!(b.take(1, t0 + Duration::from_millis(900)), 0);
        assert!(b.try_consume(1, t0 + Duration::from_millis(901)));
        // A large request waits for a full bucket, not for its whole cost.
        let mut b = TokenBucket::new(1000, 100, t0);
        assert!(b.try_consume(50, t0));
        assert_eq!(b.wait_for(5000, t0), Duration::from_millis(50));
        // Sustained: 10 s of 1000-token requests at 1000/s: about ten of them.
        let mut b = TokenBucket::new(1000, 100, t0);
        let mut n = 0;
        for ms in 0..10_000u64 {
            if b.try_consume(1000, t0 + Duration::from_millis(ms)) {
                n += 1;
            }
        }
        assert!((10..=11).contains(&n), "{n}");
    }

    #[test]
    fn absurd_values_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(u64::MAX, u64::MAX, t0);
        assert!(b.try_consume(u64::MAX, t0));
        assert!(b.try_consume(u64::MAX, t0 + Duration::from_secs(3600)));
        let mut b = TokenBucket::new(1, 1, t0);
        assert!(b.try_consume(u64::MAX, t0));
        let w = b.wait_for(u64::MAX, t0);
        assert!(w > Duration::from_secs(1 << 30), "{w:?}");
        let mut b = TokenBucket::new(0, 0, t0);
        assert!(b.try_consume(1, t0), "rate and burst are at least 1");
        assert_eq!(
            BucketConfig::new(5, None),
            BucketConfig { rate: 5, burst: 1 }
        );
        assert_eq!(
            BucketConfig::new(10 << 20, None),
            BucketConfig {
                rate: 10 << 20,
                burst: 1 << 20
            }
        );
    }

    #[test]
    fn limiter_blocks_arms_its_timer_and_resumes_when_it_fires() {
        assert!(RateLimiter::new("t", None, None).unwrap().is_none());
        let mut l = RateLimiter::new(
            "t",
            Some(BucketConfig::new(1 << 20, Some(4096))),
            Some(BucketConfig::new(1000, Some(2))),
        )
        .unwrap()
        .unwrap();
        let now = Instant::now();
        assert!(l.consume(1024, now));
        assert!(l.consume(1024, now));
        // The operations bucket is empty (two requests), the bytes one is not.
        assert!(!l.consume(1024, now));
        assert!(l.is_blocked());
        assert_eq!(l.throttled(), 1);
        // Blocked: refused without counting again, whatever the clock says.
        assert!(!l.consume(1, now + Duration::from_secs(10)));
        assert_eq!(l.throttled(), 1);
        // The timer fires (waiting for it here) and the request fits.
        l.timer_fired();
        assert!(!l.is_blocked());
        assert!(l.consume(1024, Instant::now()));
        // The bytes bucket refuses too.
        let mut l = RateLimiter::new("t", Some(BucketConfig::new(1000, Some(1000))), None)
            .unwrap()
            .unwrap();
        assert!(l.consume(1000, now));
        assert!(!l.consume(10, now));
        assert_eq!(l.throttled(), 1);
        l.timer_fired();
        assert!(l.consume(10, Instant::now()));
    }
}
