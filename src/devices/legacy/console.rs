// SPDX-License-Identifier: Apache-2.0
//! Guest console output, written off the vCPU threads. A UART hands every byte the guest
//! sends to a [`ConsoleWriter`]: a bounded queue ([`CONSOLE_BUFFER`] bytes) that a thread of
//! its own writes to ember's stdout (or stderr). A vCPU thread only ever takes the queue's
//! lock for a copy, never waits for the output: when stdout is not being read (a full pipe,
//! a stopped terminal) the queue fills, further bytes are dropped and counted, and the guest,
//! the device locks and the event loop carry on. The count is reported when the VM ends
//! ([`ConsoleHandle::finish`]), after everything still queued was written out (or the
//! writer stopped making progress).
//!
//! The writer thread, not a non-blocking stdout, is what keeps the vCPU from blocking:
//! O_NONBLOCK would be set on the open file description ember shares with its parent shell.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::devices::bus::lock;

/// How many bytes of guest output may wait for the writer: a Linux boot log is 30-60 KiB,
/// and a guest printing without end to an output nobody reads grows ember's memory by
/// this much at most (the queue is allocated once, at full size, and its pages are touched
/// as it fills: tests/floods.rs measures the peak RSS).
pub const CONSOLE_BUFFER: usize = 256 << 10;
/// The most the writer takes from the queue for one write.
const CHUNK: usize = 16 * 1024;
/// How long [`ConsoleHandle::finish`] waits for a writer that makes no progress.
pub const FLUSH_STALL: Duration = Duration::from_secs(2);
/// How long the writer, woken by a first byte, lets more gather before it writes. A guest
/// sends its console a byte every few tens of µs at best (each one a port-I/O exit), so
/// without this every byte would wake the writer (a futex wake on the vCPU thread, and the
/// writer's wake, write and sleep: three futex calls and a write per byte, ~3 µs of the
/// vCPU's time per byte where Firecracker writes the byte itself). Half a millisecond is
/// below what a person at the console notices.
const GATHER: Duration = Duration::from_micros(500);

#[derive(Debug, Default)]
struct State {
    /// Bytes waiting for the writer.
    queue: VecDeque<u8>,
    /// Bytes the writer took and has not finished writing.
    in_flight: usize,
    /// Bytes written so far (progress, for flushes).
    written: u64,
    /// Bytes dropped (queue full, or given up at a flush) and not reported yet.
    dropped: u64,
    /// The writer sleeps until bytes come.
    idle: bool,
    /// The output went away (closed pipe): everything is discarded from now on.
    broken: bool,
    /// `written` when a flush last gave up on the writer: later flushes do not wait for it
    /// again (nor count its bytes twice) until it makes progress.
    gave_up_at: Option<u64>,
    /// No more bytes will come: the writer ends once the queue is empty.
    closed: bool,
    /// Flushes waiting for the writer's progress (it signals `progress` only when there are).
    flushers: usize,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer.
    data: Condvar,
    /// Wakes flushers when the writer finished a chunk.
    progress: Condvar,
    /// Where the output goes, for messages ("stdout").
    name: &'static str,
}

/// The queue and its writer thread. Dropping it flushes what is queued (see
/// [`ConsoleHandle::finish`]) and ends the thread unless it is stuck in a write.
#[derive(Debug)]
pub struct ConsoleWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A handle on a [`ConsoleWriter`]'s queue, for flushing it from elsewhere (the end of a
/// run, the event-loop watchdog).
#[derive(Debug, Clone)]
pub struct ConsoleHandle(Arc<Shared>);

impl ConsoleWriter {
    /// Starts a writer thread writing to `out`; `name` names the output in messages.
    pub fn spawn(out: Box<dyn Write + Send>, name: &'static str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            // Allocated once: a queue that grew by doubling would hold the old and the new
            // buffer at once while it moves.
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(CONSOLE_BUFFER),
                ..State::default()
            }),
            data: Condvar::new(),
            progress: Condvar::new(),
            name,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ember-console".into())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::ThreadKind::Console);
                write_loop(&s, out);
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `bytes` for output, dropping (and counting) what does not fit. Never waits for
    /// the output.
    pub fn push(&self, bytes: &[u8]) {
        let mut st = lock(&self.shared.state);
        if st.broken {
            return;
        }
        let room = CONSOLE_BUFFER.saturating_sub(st.queue.len() + st.in_flight);
        let n = room.min(bytes.len());
        st.queue.extend(&bytes[..n]);
        st.dropped += (bytes.len() - n) as u64;
        crate::metrics::uart::write_count.add(n as u64);
        crate::metrics::uart::missed_write_count.add((bytes.len() - n) as u64);
        let wake = st.idle && n > 0;
        drop(st);
        if wake {
            self.shared.data.notify_one();
        }
    }

    /// A handle for flushing from elsewhere.
    pub fn handle(&self) -> ConsoleHandle {
        ConsoleHandle(self.shared.clone())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        let handle = self.handle();
        handle.finish(FLUSH_STALL);
        lock(&self.shared.state).closed = true;
        self.shared.data.notify_one();
        if let Some(t) = self.thread.take() {
            // A writer stuck in a write to an output nobody reads is left behind: it ends
            // with the process.
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl ConsoleHandle {
    /// Waits until everything queued was written, giving up when the writer made no
    /// progress for `stall`; what is left then is counted as dropped. Returns whether all
    /// was written.
    pub fn flush(&self, stall: Duration) -> bool {
        let mut st = lock(&self.0.state);
        st.flushers += 1;
        let mut seen = st.written;
        let mut last_progress = Instant::now();
        let all = loop {
            if st.broken || (st.queue.is_empty() && st.in_flight == 0) {
                break true;
            }
            if st.gave_up_at == Some(st.written) {
                // Still stuck where an earlier flush left it: what it holds was counted.
                let left = st.queue.len();
                st.queue.clear();
                st.dropped += left as u64;
                break false;
            }
            if st.written != seen {
                seen = st.written;
                last_progress = Instant::now();
            }
            let waited = last_progress.elapsed();
            if waited >= stall {
                let left = st.queue.len() + st.in_flight;
                st.queue.clear();
                st.dropped += left as u64;
                st.gave_up_at = Some(st.written);
                break false;
            }
            let wait = (stall - waited).min(Duration::from_millis(100));
            st = self
                .0
                .progress
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        st.flushers -= 1;
        all
    }

    /// Flushes (see [`flush`](Self::flush)) and reports the bytes dropped since the last
    /// report, if any, with one warning.
    pub fn finish(&self, stall: Duration) {
        self.flush(stall);
        let dropped = std::mem::take(&mut lock(&self.0.state).dropped);
        if dropped > 0 {
            // Once per console and run: cannot flood.
            log::warn!(
                "{dropped} {} of guest console output dropped: {} was not being read",
                if dropped == 1 { "byte" } else { "bytes" },
                self.0.name
            );
        }
    }

    /// Bytes dropped and not reported yet.
    pub fn dropped(&self) -> u64 {
        lock(&self.0.state).dropped
    }

    /// Bytes written out so far.
    pub fn written(&self) -> u64 {
        lock(&self.0.state).written
    }
}

/// The writer thread: takes a chunk at a time off the queue and writes it out.
fn write_loop(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        {
            let mut st = lock(&shared.state);
            let mut woken = false;
            while st.queue.is_empty() && !st.closed {
                st.idle = true;
                st = shared.data.wait(st).unwrap_or_else(|p| p.into_inner());
                woken = true;
            }
            st.idle = false;
            if st.queue.is_empty() {
                return; // closed and drained
            }
            if woken && st.queue.len() < CHUNK && !st.closed && st.flushers == 0 {
                // Let the bytes that follow the first one gather (see GATHER): producers do
                // not signal a writer that is not idle, so this is a plain timed wait, cut
                // short only by a close.
                st = shared
                    .data
                    .wait_timeout(st, GATHER)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let n = st.queue.len().min(CHUNK);
            chunk.clear();
            chunk.extend(st.queue.drain(..n));
            st.in_flight = n;
        }
        let broken = !write_chunk(&mut *out, &chunk, shared.name);
        let flushers = {
            let mut st = lock(&shared.state);
            st.in_flight = 0;
            st.written += chunk.len() as u64;
            if broken {
                st.broken = true;
                st.queue.clear();
            }
            st.flushers
        };
        if flushers > 0 {
            shared.progress.notify_all();
        }
    }
}

/// Writes all of `buf`, waiting as long as the output needs. Returns false when the output
/// went away (closed pipe): nothing more should be written to it.
fn write_chunk(out: &mut dyn Write, mut buf: &[u8], name: &str) -> bool {
    while !buf.is_empty() {
        match out.write(buf) {
            Ok(0) => return false,
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Someone made the output non-blocking (it is shared with the parent): wait.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            // A console that went away must not stop the guest: its bytes are dropped.
            Err(e) if e.kind() == ErrorKind::BrokenPipe => return false,
            Err(e) => {
                crate::guest_warn!("guest console output to {name}: {e}; bytes dropped");
                return true;
            }
        }
    }
    let _ = out.flush();
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An output that keeps what it is given (also used by the serial tests).
    #[derive(Clone, Default)]
    pub(crate) struct Sink(pub(crate) Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An output that takes nothing until released (a pipe nobody reads).
    struct Blocked(Arc<(Mutex<bool>, Condvar)>, Sink);
    impl Write for Blocked {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (m, c) = &*self.0;
            let mut open = m.lock().unwrap();
            while !*open {
                open = c.wait(open).unwrap();
            }
            self.1.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn everything_is_written_in_order() {
        let sink = Sink::default();
        let w = ConsoleWriter::spawn(Box::new(sink.clone()), "test").unwrap();
        let mut expected = Vec::new();
        for i in 0..100_000u32 {
            let b = [(i % 251) as u8];
            w.push(&b);
            expected.push(b[0]);
        }
        assert!(w.handle().flush(Duration::from_secs(10)));
        assert_eq!(*sink.0.lock().unwrap(), expected);
        assert_eq!(w.handle().dropped(), 0);
    }

    #[test]
    fn a_blocked_output_never_blocks_the_producer_and_drops_are_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let w = ConsoleWriter::spawn(Box::new(Blocked(gate.clone(), sink.clone())), "x").unwrap();
        // Three times the buffer, with nothing taken by the output: push returns each time.
        let block = vec![b'a'; 4096];
        for _ in 0..(3 * CONSOLE_BUFFER / block.len()) {
            w.push(&block);
        }
        let dropped = w.handle().dropped() as usize;
        assert!(dropped >= CONSOLE_BUFFER, "{dropped}");
        assert!(dropped <= 2 * CONSOLE_BUFFER, "{dropped}");
        // A flush gives up on a writer that makes no progress, counting what is left.
        assert!(!w.handle().flush(Duration::from_millis(200)));
        assert_eq!(w.handle().dropped() as usize, 3 * CONSOLE_BUFFER);
        // Released, the output gets what the writer had taken; new bytes go through.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let start = Instant::now();
        while w.handle().written() == 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        w.push(b"tail");
        assert!(w.handle().flush(Duration::from_secs(10)));
        assert!(sink.0.lock().unwrap().ends_with(b"tail"));
    }

    #[test]
    fn a_closed_output_discards_without_blocking() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let w = ConsoleWriter::spawn(Box::new(Closed), "closed").unwrap();
        for _ in 0..1000 {
            w.push(b"0123456789");
        }
        assert!(w.handle().flush(Duration::from_secs(10)));
    }
}
