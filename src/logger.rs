// SPDX-License-Identifier: Apache-2.0
//! A small `log` backend: `ember: <level>: message` lines on stderr, so stdout stays the
//! guest console.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if is_guest_driven(record.target()) {
            // Crates that log what the guest did to them (a queue register set to a bad
            // value, a corrupt ring): rate-limited like ember's own guest-triggered lines.
            let slot = record.line().unwrap_or(0) as usize % GUEST_DRIVEN_SLOTS;
            let Some(n) = GUEST_DRIVEN_LIMITS[slot].check() else {
                return;
            };
            let more = if n > 0 {
                format!(" ({n} more like it suppressed)")
            } else {
                String::new()
            };
            let target = record.target();
            return self.write(record, format_args!("{target}: {}{more}", record.args()));
        }
        self.write(record, *record.args());
    }

    fn flush(&self) {}
}

/// Log targets (crates) whose messages a guest can trigger at will.
const GUEST_DRIVEN_TARGETS: [&str; 1] = ["virtio_queue"];

/// Rate limits for [`GUEST_DRIVEN_TARGETS`], shared by call sites with the same line number
/// modulo this.
const GUEST_DRIVEN_SLOTS: usize = 16;

static GUEST_DRIVEN_LIMITS: [RateLimit; GUEST_DRIVEN_SLOTS] =
    [const { RateLimit::new() }; GUEST_DRIVEN_SLOTS];

/// Whether `target` is one of [`GUEST_DRIVEN_TARGETS`] (or a module of one).
fn is_guest_driven(target: &str) -> bool {
    GUEST_DRIVEN_TARGETS
        .iter()
        .any(|t| target == *t || target.strip_prefix(t).is_some_and(|r| r.starts_with("::")))
}

impl StderrLogger {
    fn write(&self, record: &Record<'_>, args: std::fmt::Arguments<'_>) {
        if let Some(sink) = FILE_SINK.get() {
            sink.write(record, args);
            return;
        }
        let level = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info => "",
            Level::Debug => "debug: ",
            Level::Trace => "trace: ",
        };
        // With the console in raw mode a bare \n would not return the cursor.
        let _ = write!(std::io::stderr().lock(), "ember: {level}{args}\r\n");
    }
}

static LOGGER: StderrLogger = StderrLogger;

/// Where log lines go once `PUT /logger` (or a config file's `logger`) named a file or FIFO.
#[derive(Debug)]
struct FileSink {
    file: std::fs::File,
    id: String,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    /// Lines that could not be written (a full FIFO, an I/O error).
    lost: AtomicU64,
}

static FILE_SINK: OnceLock<FileSink> = OnceLock::new();

impl FileSink {
    fn write(&self, record: &Record<'_>, args: std::fmt::Arguments<'_>) {
        if let Some(m) = &self.module {
            if !record.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let thread = std::thread::current();
        let mut tag = format!("{}:{}", self.id, thread.name().unwrap_or("?"));
        if self.show_level {
            tag.push(':');
            tag.push_str(match record.level() {
                Level::Error => "ERROR",
                Level::Warn => "WARN",
                Level::Info => "INFO",
                Level::Debug => "DEBUG",
                Level::Trace => "TRACE",
            });
        }
        if self.show_origin {
            tag.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        // One write per line, so lines from several threads do not interleave.
        let line = format!("{} [{tag}] {args}\n", utc_timestamp());
        if (&self.file).write_all(line.as_bytes()).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Log lines lost since the logger went to a file (`logger.missed_log_count` of the metrics).
pub fn lost_lines() -> u64 {
    FILE_SINK
        .get()
        .map_or(0, |s| s.lost.load(Ordering::Relaxed))
}

/// The time now as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn` (UTC), as Firecracker's log lines start.
pub fn utc_timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// The (year, month, day) of a count of days since 1970-01-01 (the proleptic Gregorian
/// calendar; Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Opens `path` for Firecracker-style output (log or metrics lines): a file (created if
/// needed, appended to) or a FIFO. Read and write, non-blocking: opening a FIFO then does
/// not wait for a reader, and a full FIFO loses lines (which the callers count) instead of
/// stopping ember.
pub fn open_output(path: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Sends the log to the file or FIFO of Firecracker's `logger` settings, at its level
/// (`Error`, `Warning`, `Info`, `Debug`, `Trace`, `Off`; any case), with the instance `id`
/// in each line. Once per process: a second call is refused.
pub fn configure(
    settings: &crate::api::model::Logger,
    id: &str,
) -> Result<(), crate::api::resources::Refused> {
    use crate::api::resources::Refused;
    let level = match settings
        .level
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("info") => LevelFilter::Info,
        Some("error") => LevelFilter::Error,
        Some("warning") | Some("warn") => LevelFilter::Warn,
        Some("debug") => LevelFilter::Debug,
        Some("trace") => LevelFilter::Trace,
        Some("off") => LevelFilter::Off,
        Some(other) => {
            return Err(Refused(format!(
                "logger level {other:?} is not one of Error, Warning, Info, Debug, Trace, Off"
            )))
        }
    };
    if let Some(path) = &settings.log_path {
        if FILE_SINK.get().is_some() {
            return Err(Refused(
                "the logger has a log_path already; it can be set once".into(),
            ));
        }
        let file = open_output(path)
            .map_err(|e| Refused(format!("logger: cannot open log_path {path}: {e}")))?;
        let _ = FILE_SINK.set(FileSink {
            file,
            id: id.to_string(),
            show_level: settings.show_level.unwrap_or(false),
            show_origin: settings.show_log_origin.unwrap_or(false),
            module: settings.module.clone(),
            lost: AtomicU64::new(0),
        });
    }
    log::set_max_level(level);
    Ok(())
}

/// Installs the logger at `level` (once; later calls only change the level).
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// How often one kind of guest-triggered message may be logged.
pub const GUEST_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// A rate limit for one kind of log line (one call site of [`guest_log!`](crate::guest_log!)): the first line
/// is logged, then at most one per [`GUEST_LOG_INTERVAL`]; the lines dropped in between are
/// counted and the count is printed with the next line that gets through. Lock-free, so a
/// vCPU thread and the event loop can share it.
#[derive(Debug)]
pub struct RateLimit {
    /// Milliseconds since [`epoch`] of the last line logged, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limit that has logged nothing yet.
    pub const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines dropped since
    /// the last one, or `None` (and the line is counted as dropped).
    pub fn check(&self) -> Option<u64> {
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.check_at(now, GUEST_LOG_INTERVAL)
    }

    /// [`check`](Self::check) at `now_ms` milliseconds since the epoch.
    pub fn check_at(&self, now_ms: u64, interval: Duration) -> Option<u64> {
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let stamp = now_ms.saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || stamp.saturating_sub(last) >= interval_ms;
        if due
            && self
                .last
                .compare_exchange(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Lines dropped since the last one logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// The time rate limits count from (the first use).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Logs a line that the guest can trigger (a bad register access, a malformed queue, a sleep
/// request...), rate-limited per call site: see [`RateLimit`]. A guest that repeats the
/// same mistake in a loop costs one line per kind per [`GUEST_LOG_INTERVAL`], and the next
/// line says how many were dropped.
///
/// `guest_log!(log::Level::Warn, "virtio-mmio: bad write at {offset:#x}")`
#[macro_export]
macro_rules! guest_log {
    ($lvl:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logger::RateLimit = $crate::logger::RateLimit::new();
        let lvl: ::log::Level = $lvl;
        if ::log::log_enabled!(lvl) {
            match LIMIT.check() {
                Some(0) => ::log::log!(lvl, $($arg)+),
                Some(n) => ::log::log!(
                    lvl,
                    "{} ({n} more like it suppressed)",
                    format_args!($($arg)+)
                ),
                None => {}
            }
        }
    }};
}

/// [`guest_log!`](crate::guest_log!) at warning level.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::guest_log!(::log::Level::Warn, $($arg)+) };
}

/// [`guest_log!`](crate::guest_log!) at error level.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => { $crate::guest_log!(::log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_one_line_per_interval_through_and_counts_the_rest() {
        let r = RateLimit::new();
        let i = Duration::from_secs(5);
        assert_eq!(
            r.check_at(0, i),
            Some(0),
            "the first line always gets through"
        );
        for t in 1..1000 {
            assert_eq!(r.check_at(t, i), None);
        }
        assert_eq!(r.suppressed(), 999);
        assert_eq!(r.check_at(4_999, i), None);
        assert_eq!(
            r.check_at(5_000, i),
            Some(1000),
            "the next line says how many"
        );
        assert_eq!(r.suppressed(), 0);
        assert_eq!(r.check_at(5_001, i), None);
        assert_eq!(r.check_at(u64::MAX, i), Some(1));
    }

    #[test]
    fn crates_that_log_guest_mistakes_are_recognised_by_target() {
        assert!(is_guest_driven("virtio_queue"));
        assert!(is_guest_driven("virtio_queue::queue"));
        assert!(!is_guest_driven("virtio_queue_extra"));
        assert!(!is_guest_driven("ember::devices::virtio::mmio"));
    }

    #[test]
    fn guest_log_macro_compiles_at_every_level() {
        for i in 0..3 {
            crate::guest_warn!("test line {i}");
            crate::guest_error!("test line {}", i);
            crate::guest_log!(log::Level::Debug, "test line {i}");
        }
    }
}
