// SPDX-License-Identifier: Apache-2.0
//! Helpers of the ACPI tests: an ember process whose output is read while it runs, so a test
//! can wait for a line and then send it a signal.
#![allow(dead_code)]

use std::io::Read;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::{spawn_ember, Finished};

/// A running ember whose stdout and stderr are collected as they come.
pub struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut b = [0u8; 256];
        while let Ok(n) = pipe.read(&mut b) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&b[..n]);
        }
    });
    buf
}

/// What a collected stream holds so far, as text.
pub fn text(buf: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

impl Running {
    pub fn start(args: &[&str]) -> Self {
        let mut child = spawn_ember(args, None);
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits until stdout (or stderr) contains `marker`; false after `timeout`.
    pub fn wait_for(&self, stream: &Mutex<Vec<u8>>, marker: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if text(stream).contains(marker) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn wait_stdout(&self, marker: &str, timeout: Duration) -> bool {
        self.wait_for(&self.stdout, marker, timeout)
    }

    pub fn wait_stderr(&self, marker: &str, timeout: Duration) -> bool {
        self.wait_for(&self.stderr, marker, timeout)
    }

    /// Whether the process has ended.
    pub fn ended(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// stdout so far.
    pub fn stdout(&self) -> String {
        text(&self.stdout)
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the end (killing ember after `timeout`).
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > timeout {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Let the readers drain what the process wrote before it ended.
        std::thread::sleep(Duration::from_millis(50));
        Finished {
            code: status.code(),
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
            elapsed: start.elapsed(),
            timed_out,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
