// SPDX-License-Identifier: Apache-2.0
//! Raw mode for an interactive console: when stdin is a terminal, ember switches it to raw
//! mode so every key reaches the guest, and restores it on every way out (normal exit,
//! error, signal, panic).

use std::sync::Mutex;

static SAVED: Mutex<Option<(i32, libc::termios)>> = Mutex::new(None);

/// Restores the terminal when dropped.
#[derive(Debug)]
pub struct RawTerminal {
    _private: (),
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the fd number; any value is safe to pass.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawTerminal {
    /// Switches `fd` to raw mode if it is a terminal; `None` if it is not.
    pub fn enable(fd: i32) -> Option<Self> {
        if !is_tty(fd) {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut t) };
        // Keep output processing so host-side messages still start at column 0.
        t.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `t` is a valid termios for this fd.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, saved));
        install_panic_restore();
        Some(Self { _private: () })
    }
}

/// Puts the terminal back the way it was, if ember changed it.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((fd, t)) = saved {
        // SAFETY: `t` was read from this fd by tcgetattr.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

fn install_panic_restore() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
    });
}
