// SPDX-License-Identifier: Apache-2.0
//! virtio-vsock (device ID 19): stream sockets between the guest and host processes, with the
//! host side on Unix sockets ([`muxer`]).
//!
//! - [`packet`]: the 44-byte packet header;
//! - [`connection`]: one connection's state machine and credit-based flow control;
//! - [`muxer`]: all connections, the `PATH` listener and the `PATH_<port>` connects;
//! - [`VsockConfig`]: `--vsock cid=N,uds=PATH`.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::config::{parse_options, ConfigError};

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket could not be created.
    #[error("cannot listen on the vsock Unix socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An epoll, timer or socket call failed.
    #[error("vsock host-side set-up failed")]
    Host(#[source] std::io::Error),
}

/// Lowest CID a guest may have (0, 1 and 2 are the hypervisor, local and host).
pub const MIN_GUEST_CID: u64 = 3;

/// `--vsock`: the guest's CID and the host Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID.
    pub cid: u64,
    /// Host Unix socket: host processes connect here; guest connects to port P go to
    /// `PATH_P`.
    pub uds: PathBuf,
}

impl VsockConfig {
    /// Syntax help for `--vsock`.
    pub const SYNTAX: &'static str = "cid=N,uds=PATH";

    /// Checks the CID and the socket path without creating anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |why: String| Err(ConfigError::Device(format!("--vsock: {why}")));
        if self.cid < MIN_GUEST_CID {
            return err(format!(
                "cid={} is reserved (0: hypervisor, 1: local, 2: host): use 3 or more",
                self.cid
            ));
        }
        if self.cid >= u64::from(u32::MAX) {
            return err(format!(
                "cid={} is too large: use less than {}",
                self.cid,
                u32::MAX
            ));
        }
        // `PATH_<port>` must fit sockaddr_un (108 bytes with the NUL) for any port.
        let longest = muxer::port_path(&self.uds, u32::MAX);
        if longest.as_os_str().len() >= 108 {
            return err(format!(
                "uds={}: the path is too long for a Unix socket (with `_<port>` appended it \
                 must stay under 108 bytes); use a shorter path",
                self.uds.display()
            ));
        }
        if self.uds.as_os_str().is_empty() {
            return err("uds= is empty".into());
        }
        let parent = match self.uds.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return err(format!(
                "uds={}: directory {} does not exist",
                self.uds.display(),
                parent.display()
            ));
        }
        match socket_path_status(&self.uds) {
            SocketPath::Free | SocketPath::Stale => Ok(()),
            SocketPath::NotASocket => err(format!(
                "uds={} exists and is not a socket: remove it or choose another path",
                self.uds.display()
            )),
            SocketPath::InUse => err(format!(
                "uds={} is in use (something accepts connections on it): is another VM \
                 running with it?",
                self.uds.display()
            )),
        }
    }

    /// Removes a stale socket left at `uds` by an earlier run (nothing listens on it).
    pub fn remove_stale_socket(&self) {
        if socket_path_status(&self.uds) == SocketPath::Stale {
            log::info!("vsock: removing stale socket {}", self.uds.display());
            let _ = std::fs::remove_file(&self.uds);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum SocketPath {
    Free,
    Stale,
    InUse,
    NotASocket,
}

fn socket_path_status(path: &Path) -> SocketPath {
    match std::fs::symlink_metadata(path) {
        Err(_) => SocketPath::Free,
        Ok(m) if !m.file_type().is_socket() => SocketPath::NotASocket,
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => SocketPath::InUse,
            Err(_) => SocketPath::Stale,
        },
    }
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cid = None;
        let mut uds = None;
        for (k, v) in parse_options(s, "--vsock", Self::SYNTAX, &["cid", "uds"])? {
            match k {
                "cid" => {
                    cid = Some(v.parse::<u64>().map_err(|_| {
                        ConfigError::Device(format!("--vsock: cid={v:?} is not a number"))
                    })?);
                }
                _ => uds = Some(PathBuf::from(v)),
            }
        }
        let missing = |k| {
            ConfigError::Device(format!(
                "--vsock {s:?}: {k}= is required (syntax: {})",
                Self::SYNTAX
            ))
        };
        Ok(Self {
            cid: cid.ok_or_else(|| missing("cid"))?,
            uds: uds.ok_or_else(|| missing("uds"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-vsockcfg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn parses_and_validates() {
        let d = tmp("ok");
        let c: VsockConfig = format!("cid=3,uds={}/v.sock", d.display()).parse().unwrap();
        assert_eq!(c.cid, 3);
        assert_eq!(c.uds, d.join("v.sock"));
        c.validate().unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn rejects_bad_values() {
        let e = |s: &str| s.parse::<VsockConfig>().unwrap_err().to_string();
        assert!(e("cid=3").contains("uds= is required"));
        assert!(e("uds=/x").contains("cid= is required"));
        assert!(e("cid=three,uds=/x").contains("not a number"));
        assert!(e("cid=3,uds=/x,port=1").contains("unknown option"));
        let v = |cid: u64, uds: &str| {
            VsockConfig {
                cid,
                uds: uds.into(),
            }
            .validate()
            .unwrap_err()
            .to_string()
        };
        assert!(v(2, "/tmp/x.sock").contains("reserved"));
        assert!(v(0, "/tmp/x.sock").contains("use 3 or more"));
        assert!(v(u64::from(u32::MAX), "/tmp/x.sock").contains("too large"));
        assert!(v(3, "/nonexistent-dir/x.sock").contains("does not exist"));
        assert!(v(3, &format!("/tmp/{}", "a".repeat(100))).contains("too long"));
    }

    #[test]
    fn existing_paths() {
        let d = tmp("exist");
        // A regular file.
        let f = d.join("file");
        std::fs::write(&f, b"x").unwrap();
        let c = VsockConfig { cid: 3, uds: f };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a socket"));
        // A live socket.
        let s = d.join("live.sock");
        let l = std::os::unix::net::UnixListener::bind(&s).unwrap();
        let c = VsockConfig {
            cid: 3,
            uds: s.clone(),
        };
        assert!(c.validate().unwrap_err().to_string().contains("in use"));
        // A stale socket: fine, and removed before binding.
        drop(l);
        c.validate().unwrap();
        c.remove_stale_socket();
        assert!(!s.exists());
        std::fs::remove_dir_all(d).unwrap();
    }
}
