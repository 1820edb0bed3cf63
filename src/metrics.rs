// SPDX-License-Identifier: Apache-2.0
//! Metrics as Firecracker writes them: one JSON object per line to a file or FIFO
//! (`PUT /metrics`, a config file's `metrics`), every [`PERIOD`] and on `FlushMetrics`.
//!
//! Counters are process-wide atomics grouped like Firecracker's (`block`, `net`, `entropy`,
//! `uart`, `api_server`, `logger`), summed over the devices of a kind. `uart.write_count`
//! counts the bytes the guest wrote to its serial ports, `missed_write_count` those dropped
//! because nobody read the output fast enough. Each line
//! holds what was counted since the line before (Firecracker's "incremental" metrics), so a
//! reader adds lines up. A line that cannot be written (a full FIFO nobody reads) is lost,
//! never buffered: `logger.missed_metrics_count` in the next line that gets through says how
//! many were.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::api::resources::Refused;

/// How often a metrics line is written.
pub const PERIOD: Duration = Duration::from_secs(60);

/// One counter: the total, and the total at the last line written.
#[derive(Debug, Default)]
pub struct Counter {
    total: AtomicU64,
    written: AtomicU64,
}

impl Counter {
    /// A counter at 0.
    pub const fn new() -> Self {
        Self {
            total: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds 1.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The total so far.
    pub fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// What was added since the last call (the line's value).
    fn take_delta(&self) -> u64 {
        let now = self.get();
        let before = self.written.swap(now, Ordering::Relaxed);
        now.wrapping_sub(before)
    }
}

/// A group of named counters (a JSON object in the line).
#[derive(Debug)]
pub struct Group {
    /// The group's key.
    pub name: &'static str,
    /// Its counters.
    pub counters: &'static [(&'static str, &'static Counter)],
}

macro_rules! counters {
    ($($group:ident: $($name:ident),+;)+) => {
        $(
            #[allow(missing_docs, non_upper_case_globals)]
            pub mod $group {
                use super::Counter;
                $(pub static $name: Counter = Counter::new();)+
                /// The group.
                pub static GROUP: super::Group = super::Group {
                    name: stringify!($group),
                    counters: &[$((stringify!($name), &$name)),+],
                };
            }
        )+
        /// Every group, in the order they are written.
        pub static GROUPS: &[&Group] = &[$(&$group::GROUP),+];
    };
}

counters! {
    api_server: requests, errors;
    block: read_count, read_bytes, write_count, write_bytes, flush_count, failures,
        rate_limiter_throttled_events;
    net: rx_packets_count, rx_bytes_count, tx_packets_count, tx_bytes_count, failures,
        rx_rate_limiter_throttled, tx_rate_limiter_throttled;
    entropy: entropy_event_count, entropy_bytes, entropy_rate_limiter_throttled;
    uart: write_count, missed_write_count, read_count;
}

/// The metrics file, once configured.
#[derive(Debug)]
struct Sink {
    file: Mutex<std::fs::File>,
    /// Lines that could not be written.
    lost: AtomicU64,
    /// Lines written.
    written: AtomicU64,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Opens `path` (a file, created if needed, or a FIFO; non-blocking) for the metrics and
/// starts writing a line every [`PERIOD`]. Once per process.
pub fn configure(path: &str) -> Result<(), Refused> {
    if SINK.get().is_some() {
        return Err(Refused(
            "metrics have a metrics_path already; it can be set once".into(),
        ));
    }
    let file = crate::logger::open_output(path)
        .map_err(|e| Refused(format!("metrics: cannot open metrics_path {path}: {e}")))?;
    let _ = SINK.set(Sink {
        file: Mutex::new(file),
        lost: AtomicU64::new(0),
        written: AtomicU64::new(0),
    });
    let spawned = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(|| {
            let mut sandboxed = false;
            loop {
                std::thread::sleep(PERIOD);
                // Sandboxed once the VM's sandbox exists (it may be installed after this
                // thread started).
                if !sandboxed && crate::sandbox::installed() {
                    crate::sandbox::enter(crate::sandbox::ThreadKind::Api);
                    sandboxed = true;
                }
                let _ = flush();
            }
        });
    if let Err(e) = spawned {
        log::warn!("metrics: cannot start the periodic writer ({e}); FlushMetrics still writes");
    }
    Ok(())
}

/// The line with what was counted since the last one.
pub fn line(lost_logs: u64, lost_metrics: u64) -> String {
    use serde_json::{Map, Value};
    let mut top = Map::new();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    top.insert(
        "utc_timestamp_ms".into(),
        Value::from(u64::try_from(ms).unwrap_or(u64::MAX)),
    );
    for g in GROUPS {
        let mut obj = Map::new();
        for (name, c) in g.counters {
            obj.insert((*name).into(), Value::from(c.take_delta()));
        }
        top.insert(g.name.into(), Value::Object(obj));
    }
    let mut logger = Map::new();
    logger.insert("missed_log_count".into(), Value::from(lost_logs));
    logger.insert("missed_metrics_count".into(), Value::from(lost_metrics));
    top.insert("logger".into(), Value::Object(logger));
    Value::Object(top).to_string()
}

/// Writes a line now (`FlushMetrics`); an error when no metrics file is configured.
pub fn flush() -> Result<(), Refused> {
    let Some(sink) = SINK.get() else {
        return Err(Refused(
            "FlushMetrics: no metrics file: PUT /metrics with metrics_path first".into(),
        ));
    };
    let mut file = crate::devices::bus::lock(&sink.file);
    let text = line(
        crate::logger::lost_lines(),
        sink.lost.load(Ordering::Relaxed),
    ) + "\n";
    match file.write(text.as_bytes()) {
        Ok(n) if n == text.len() => {
            sink.written.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        // A short write to a FIFO leaves a broken line; nothing more can be done for it.
        _ => {
            sink.lost.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_hold_deltas_by_group() {
        // Counters are process-wide: other tests may add to them, so only this test's
        // own additions are relied on (with a counter no device uses in unit tests).
        api_server::errors.add(0);
        let _ = line(0, 0);
        uart::missed_write_count.add(5);
        let v: serde_json::Value = serde_json::from_str(&line(2, 3)).unwrap();
        assert!(v["uart"]["missed_write_count"].as_u64().unwrap() >= 5);
        assert_eq!(v["logger"]["missed_log_count"], 2);
        assert_eq!(v["logger"]["missed_metrics_count"], 3);
        for g in ["block", "net", "entropy", "uart", "api_server"] {
            assert!(v[g].is_object(), "{g} missing: {v}");
        }
        assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
        // The next line holds only what came after.
        let c = Counter::new();
        c.add(7);
        assert_eq!(c.take_delta(), 7);
        c.add(2);
        assert_eq!(c.take_delta(), 2);
        assert_eq!(c.take_delta(), 0);
    }
}
