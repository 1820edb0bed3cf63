// SPDX-License-Identifier: Apache-2.0
//! 16550A serial ports (vm-superio's model) on the port-I/O bus. COM1 is the guest console:
//! its output goes to ember's stdout (or wherever the caller says) through a bounded queue
//! and a writer thread ([`super::console`]), so a stdout nobody reads never blocks a vCPU
//! while it holds the device's lock; host input is fed into its receive FIFO from the event
//! loop, never more than the FIFO holds.

use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::console::{ConsoleHandle, ConsoleWriter};
use super::EventFdTrigger;
use crate::devices::bus::{lock, BusDevice};
use crate::exit::VmExit;
use crate::kernel_problems::ProblemScanner;
use crate::snapshot::devices::SerialState;
use crate::snapshot::format::SnapshotError;
use crate::timeline::{Phase, Timeline};

/// The message Linux prints when it panics. Seeing it makes the run end with
/// [`ExitReason::Panic`](crate::exit::ExitReason::Panic): the guest's claim, printed by the
/// guest, which ember takes at its word (any guest can print it).
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
/// Longest line prefix kept for spotting the panic message and other kernel problems.
const LINE_KEEP: usize = crate::kernel_problems::LINE_MAX;

/// Where guest output goes: a [`ConsoleWriter`] plus the bookkeeping ember does on console
/// output (first-byte timestamp, panic message detection). Holds at most one line prefix.
/// Writing to it never waits for the output.
pub struct ConsoleOutput {
    out: ConsoleWriter,
    timeline: Option<Arc<Timeline>>,
    exit: Option<Arc<VmExit>>,
    line: Vec<u8>,
    problems: ProblemScanner,
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOutput").finish_non_exhaustive()
    }
}

impl ConsoleOutput {
    /// Output to `out` (through a writer thread), named `name` ("stdout") in messages. With
    /// `timeline`, the first byte is recorded; with `exit`, a kernel panic message is noted
    /// so that the following reset reports a panic, and kernel problem signatures (oops,
    /// WARN, BUG, panic: [`crate::kernel_problems`]) are recorded in its
    /// [`VmExit::kernel_problems`].
    pub fn new(
        out: Box<dyn Write + Send>,
        name: &'static str,
        timeline: Option<Arc<Timeline>>,
        exit: Option<Arc<VmExit>>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            out: ConsoleWriter::spawn(out, name)?,
            timeline,
            exit,
            line: Vec::with_capacity(LINE_KEEP),
            problems: ProblemScanner::default(),
        })
    }

    /// A handle for flushing the output and reporting dropped bytes at the end of a run.
    pub fn handle(&self) -> ConsoleHandle {
        self.out.handle()
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(t) = &self.timeline {
            t.mark(Phase::FirstSerialByte);
        }
        if let Some(exit) = &self.exit {
            for &b in buf {
                if b == b'\n' {
                    if self
                        .line
                        .windows(PANIC_MARKER.len())
                        .any(|w| w == PANIC_MARKER)
                    {
                        exit.note_panic();
                    }
                    self.problems.line(&self.line, exit.kernel_problems());
                    self.line.clear();
                } else if self.line.len() < LINE_KEEP {
                    self.line.push(b);
                }
            }
        }
        // Queued for the writer thread; what does not fit is dropped and counted.
        self.out.push(buf);
        Ok(buf.len())
    }

    /// Nothing to do: the UART model flushes after every byte, and the vCPU must not wait
    /// for the output. [`ConsoleHandle::flush`] waits for the writer.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Signals the event loop when the guest has drained the receive FIFO, so that reading
/// host input can resume.
#[derive(Debug)]
pub struct InputReady(pub EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

type Model = Serial<EventFdTrigger, InputReady, ConsoleOutput>;

/// A 16550A on the port-I/O bus.
#[derive(Debug)]
pub struct SerialDevice {
    model: Model,
}

impl SerialDevice {
    /// A serial port raising its interrupt through `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOutput) -> std::io::Result<Self> {
        let ready = EventFd::new(EFD_NONBLOCK)?;
        Ok(Self {
            model: Serial::with_events(EventFdTrigger(irq), InputReady(ready), out),
        })
    }

    /// A serial port as `state` saved it (registers and receive FIFO), raising its interrupt
    /// through `irq` and writing to `out`. An interrupt the saved registers show pending is
    /// raised again.
    pub fn from_state(
        irq: EventFd,
        out: ConsoleOutput,
        state: &SerialState,
    ) -> Result<Self, SnapshotError> {
        let err = |why: String| SnapshotError::Device {
            device: "serial port".into(),
            why,
        };
        let ready = EventFd::new(EFD_NONBLOCK).map_err(|e| err(e.to_string()))?;
        let model = Model::from_state(&state.into(), EventFdTrigger(irq), InputReady(ready), out)
            .map_err(|e| {
            err(format!(
                "{e} (receive FIFO of {} bytes)",
                state.in_buffer.len()
            ))
        })?;
        Ok(Self { model })
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        self.model.state().into()
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.model.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.model.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.model.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                crate::guest_log!(log::Level::Debug, "serial: input dropped: {e}");
                0
            }
        }
    }

    /// The eventfd that fires when the guest emptied the receive FIFO.
    pub fn input_ready_fd(&self) -> &EventFd {
        &self.model.events().0
    }

    /// A handle on the output, for flushing it at the end of a run.
    pub fn console(&self) -> ConsoleHandle {
        self.model.writer().handle()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset)
            .map(|o| self.model.read(o))
            .unwrap_or(0xff);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.model.write(o, v) {
            crate::guest_log!(log::Level::Debug, "serial: write at offset {o} failed: {e}");
        }
    }
}

/// Feeds a host input file descriptor (stdin) into a serial port from the event loop.
/// Reads only as much as the guest's FIFO can take; when it is full, stops watching the
/// input until the guest drains the FIFO.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: std::fs::File,
    ready: EventFd,
    watching_input: bool,
    input_closed: bool,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput").finish_non_exhaustive()
    }
}

impl SerialInput {
    /// Input from `input` (a dup of stdin) into `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: std::fs::File) -> std::io::Result<Self> {
        let ready = lock(&serial).input_ready_fd().try_clone()?;
        Ok(Self {
            serial,
            input,
            ready,
            watching_input: false,
            input_closed: false,
        })
    }

    fn pump(&mut self, ops: &mut EventOps) {
        use std::io::Read;
        let room = lock(&self.serial).input_room();
        if room == 0 {
            if self.watching_input {
                let _ = ops.remove(Events::new(&self.input, EventSet::IN));
                self.watching_input = false;
            }
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                // End of input: stop watching it for good.
                self.input_closed = true;
                if self.watching_input {
                    let _ = ops.remove(Events::new(&self.input, EventSet::IN));
                    self.watching_input = false;
                }
            }
            Ok(n) => {
                lock(&self.serial).enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("serial input: {e}; ignoring further input");
                self.input_closed = true;
                if self.watching_input {
                    let _ = ops.remove(Events::new(&self.input, EventSet::IN));
                    self.watching_input = false;
                }
            }
        }
    }
}

const TOKEN_INPUT: u32 = 0;
const TOKEN_READY: u32 = 1;

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_INPUT => {
                if events.event_set().contains(EventSet::HANG_UP)
                    && !events.event_set().contains(EventSet::IN)
                {
                    self.input_closed = true;
                    let _ = ops.remove(Events::new(&self.input, EventSet::IN));
                    self.watching_input = false;
                    return;
                }
                self.pump(ops);
            }
            TOKEN_READY => {
                let _ = self.ready.read();
                if !self.input_closed && !self.watching_input {
                    match ops.add(Events::with_data(&self.input, TOKEN_INPUT, EventSet::IN)) {
                        Ok(()) => self.watching_input = true,
                        Err(e) => log::warn!("serial input: cannot watch input: {e:?}"),
                    }
                }
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.ready, TOKEN_READY, EventSet::IN)) {
            log::warn!("serial input: cannot watch the FIFO-ready event: {e:?}");
        }
        match ops.add(Events::with_data(&self.input, TOKEN_INPUT, EventSet::IN)) {
            Ok(()) => self.watching_input = true,
            // Regular files and /dev/null cannot be polled: no interactive input then.
            Err(e) => {
                log::debug!("serial input: input not pollable ({e:?}); no guest input");
                self.input_closed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::devices::legacy::console::tests::Sink;

    #[test]
    fn output_reaches_the_writer_and_panics_are_noted() {
        let sink = Sink::default();
        let exit = Arc::new(VmExit::new().unwrap());
        let out =
            ConsoleOutput::new(Box::new(sink.clone()), "test", None, Some(exit.clone())).unwrap();
        let mut dev = SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), out).unwrap();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert!(dev.console().flush(Duration::from_secs(10)));
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        for b in b"[ 1.0] Kernel panic - not syncing: oops\n" {
            dev.write(0, &[*b]);
        }
        exit.request(crate::exit::ExitReason::Reset);
        assert_eq!(exit.reason(), Some(crate::exit::ExitReason::Panic));
    }

    #[test]
    fn input_never_overfills_the_fifo() {
        let out = ConsoleOutput::new(Box::new(Sink::default()), "test", None, None).unwrap();
        let mut dev = SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), out).unwrap();
        let room = dev.input_room();
        assert!(room > 0);
        let big = vec![b'x'; room * 2];
        assert_eq!(dev.enqueue_input(&big), room);
        assert_eq!(dev.enqueue_input(b"y"), 0);
        // The guest reads one byte (RBR at offset 0) and there is room for one more.
        let mut d = [0u8];
        dev.read(0, &mut d);
        assert_eq!(d[0], b'x');
        assert_eq!(dev.enqueue_input(b"yz"), 1);
    }
}
