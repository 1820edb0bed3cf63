// SPDX-License-Identifier: Apache-2.0
//! virtio-rng (device ID 4): the guest's `/dev/hwrng`, filled from the host's `getrandom(2)`
//! through a token bucket, so that a guest reading in a loop costs the host a bounded amount
//! of work.

use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::config::{parse_options, ConfigError};

/// Default sustained rate: 1 MiB/s.
pub const DEFAULT_RATE: u64 = 1 << 20;
/// Default burst: 64 KiB at once after a quiet period.
pub const DEFAULT_BURST: u64 = 64 << 10;

/// `--rng`: the entropy device and its rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// `123`, `64K`, `1M` (binary multiples).
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// A token bucket: `rate` bytes per second, at most `burst` saved up. Time is passed in, so
/// it is testable without sleeping.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate: rate.max(1),
            burst: burst.max(1),
            tokens: burst.max(1),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = u128::from(self.rate) * elapsed.as_nanos() / 1_000_000_000;
        if add > 0 {
            let add = u64::try_from(add).unwrap_or(u64::MAX);
            self.tokens = self.tokens.saturating_add(add).min(self.burst);
            // Advance by the time those tokens took, keeping the remainder.
            let used_ns = u128::from(add) * 1_000_000_000 / u128::from(self.rate);
            self.last += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
            if self.tokens == self.burst {
                self.last = now;
            }
        }
    }

    /// Takes up to `want` bytes' worth; returns how many were granted (maybe 0).
    pub fn take(&mut self, want: u64, now: Instant) -> u64 {
        self.refill(now);
        let got = want.min(self.tokens);
        self.tokens -= got;
        got
    }

    /// How long until at least one byte can be granted.
    pub fn wait_time(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens > 0 {
            return Duration::ZERO;
        }
        let ns = 1_000_000_000u64.div_ceil(self.rate);
        let since = now.saturating_duration_since(self.last);
        Duration::from_nanos(ns)
            .saturating_sub(since)
            .max(Duration::from_micros(100))
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
    fn random_bytes() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        fill_random(&mut []).unwrap();
    }
}
