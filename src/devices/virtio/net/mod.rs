// SPDX-License-Identifier: Apache-2.0
//! virtio-net (device ID 1) on a host TAP interface.
//!
//! - [`tap`]: the TAP device (`/dev/net/tun`, `IFF_VNET_HDR`, `TUNSETOFFLOAD`);
//! - [`header`]: the virtio-net header, offered features and offloads, receive-buffer
//!   planning;
//! - [`NetConfig`]: `--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,rx=..,tx=..]`, with
//!   [`MacAddr`].

pub mod device;
pub mod header;
pub mod tap;

use std::fmt;
use std::str::FromStr;

use crate::config::{parse_options, ConfigError, RateOptions};
use crate::devices::virtio::rate_limiter::BucketConfig;

/// Errors of the net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The interface name is not valid.
    #[error("{0}")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and may this user open it?)")]
    OpenTun(#[source] std::io::Error),
    /// The TAP does not exist and ember may not create it.
    #[error(
        "TAP {0} does not exist and ember may not create it (that needs CAP_NET_ADMIN): \
         create it first, e.g. `sudo ip tuntap add {0} mode tap user $(id -un) && sudo ip \
         link set {0} up`"
    )]
    TapMissing(String),
    /// The TAP exists but belongs to someone else.
    #[error(
        "no permission to open TAP {0}: it belongs to another user or group (recreate it \
         with `ip tuntap add {0} mode tap user $(id -un)`, or run ember with CAP_NET_ADMIN)"
    )]
    TapPermission(String),
    /// The TAP is already attached to another process.
    #[error("TAP {0} is in use by another process (another VM?): give each VM its own TAP")]
    TapBusy(String),
    /// The interface exists but is not a (single-queue) TAP.
    #[error(
        "interface {0} is not a TAP that ember can use (a TUN, or a multi-queue TAP?): \
         create it with `ip tuntap add {0} mode tap`"
    )]
    NotATap(String),
    /// The device's activation eventfd could not be created.
    #[error("cannot create the virtio-net activation event")]
    EventFd(#[source] std::io::Error),
    /// A rate limiter's timer could not be created.
    #[error("cannot create a virtio-net rate-limit timer")]
    Timer(#[source] std::io::Error),
    /// A TAP ioctl failed.
    #[error("{what} on TAP {tap} failed")]
    Ioctl {
        /// The TAP.
        tap: String,
        /// The ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A multicast (group) address: not usable as a NIC's address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// A stable, locally administered unicast address for the NIC on TAP `tap` of this host:
    /// derived from the host's machine ID and the TAP name, so two VMs on one host (which
    /// cannot share a TAP) get different addresses, and a VM keeps its address across
    /// restarts.
    pub fn derive(tap: &str) -> Self {
        let machine = std::fs::read_to_string("/etc/machine-id")
            .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/random/boot_id"))
            .unwrap_or_default();
        Self::derive_from(machine.trim(), tap)
    }

    /// [`Self::derive`] with the machine ID given.
    pub fn derive_from(machine_id: &str, tap: &str) -> Self {
        // FNV-1a, 64 bits: stable across Rust versions, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in machine_id.bytes().chain([0]).chain(tap.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        // 0x02: locally administered, unicast.
        Self([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a MAC address (expected XX:XX:XX:XX:XX:XX in hex)");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

/// `--net`: one virtio-net device on a TAP.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The TAP interface name.
    pub tap: String,
    /// The guest's MAC address; derived from the TAP name when not given.
    pub mac: Option<MacAddr>,
    /// Limit on the bytes per second the guest receives (`rx=`, `rx_burst=`); `None`:
    /// unlimited.
    pub rx: Option<BucketConfig>,
    /// Limit on the bytes per second the guest sends (`tx=`, `tx_burst=`); `None`:
    /// unlimited.
    pub tx: Option<BucketConfig>,
}

impl NetConfig {
    /// Syntax help for `--net`.
    pub const SYNTAX: &'static str = "tap=NAME[,mac=XX:XX:XX:XX:XX:XX]\
        [,rx=BYTES_PER_SEC[,rx_burst=BYTES]][,tx=BYTES_PER_SEC[,tx_burst=BYTES]]";

    /// An unlimited NIC on TAP `tap` with the derived MAC.
    pub fn new(tap: impl Into<String>) -> Self {
        Self {
            tap: tap.into(),
            mac: None,
            rx: None,
            tx: None,
        }
    }

    /// The MAC the guest gets.
    pub fn mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| MacAddr::derive(&self.tap))
    }

    /// Checks the TAP name and the MAC address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        tap::validate_tap_name(&self.tap)
            .map_err(|why| ConfigError::Device(format!("--net tap={}: {why}", self.tap)))?;
        if let Some(mac) = self.mac {
            if mac.is_multicast() {
                return Err(ConfigError::Device(format!(
                    "--net mac={mac}: a multicast address cannot be a NIC's address (the first \
                     byte must be even)"
                )));
            }
            if mac.0 == [0; 6] {
                return Err(ConfigError::Device(
                    "--net mac=00:00:00:00:00:00 is not usable".into(),
                ));
            }
        }
        Ok(())
    }

    /// Checks a set of `--net` devices together: no TAP or MAC twice.
    pub fn validate_all(nets: &[NetConfig]) -> Result<(), ConfigError> {
        for (i, n) in nets.iter().enumerate() {
            n.validate()?;
            for m in &nets[..i] {
                if m.tap == n.tap {
                    return Err(ConfigError::Device(format!(
                        "--net tap={} is given twice: each NIC needs its own TAP",
                        n.tap
                    )));
                }
                if m.mac() == n.mac() {
                    return Err(ConfigError::Device(format!(
                        "--net: TAPs {} and {} would both have MAC {}",
                        m.tap,
                        n.tap,
                        n.mac()
                    )));
                }
            }
        }
        Ok(())
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        let mut limits = RateOptions::default();
        let keys = ["tap", "mac", "rx", "rx_burst", "tx", "tx_burst"];
        let bad = |why: String| ConfigError::Device(format!("--net {s:?}: {why}"));
        for (k, v) in parse_options(s, "--net", Self::SYNTAX, &keys)? {
            match k {
                "tap" => tap = Some(v.to_string()),
                "mac" => {
                    mac = Some(
                        v.parse::<MacAddr>()
                            .map_err(|e| ConfigError::Device(format!("--net mac=: {e}")))?,
                    );
                }
                _ => limits.set(k, v).map_err(bad)?,
            }
        }
        let rx = limits.bucket("rx", "rx_burst").map_err(bad)?;
        let tx = limits.bucket("tx", "tx_burst").map_err(bad)?;
        let tap = tap.ok_or_else(|| {
            ConfigError::Device(format!(
                "--net {s:?}: tap= is required (syntax: {})",
                Self::SYNTAX
            ))
        })?;
        Ok(Self { tap, mac, rx, tx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_and_format() {
        let m: MacAddr = "02:AB:cd:00:01:ff".parse().unwrap();
        assert_eq!(m.0, [2, 0xab, 0xcd, 0, 1, 0xff]);
        assert_eq!(m.to_string(), "02:ab:cd:00:01:ff");
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "2:ab:cd:00:01:ff",
            "zz:ab:cd:00:01:ff",
            "02-ab-cd-00-01-ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_macs_are_local_unicast_stable_and_distinct() {
        let a = MacAddr::derive_from("machine", "tap0");
        assert_eq!(a, MacAddr::derive_from("machine", "tap0"));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast: {a}");
        let mut seen = std::collections::HashSet::new();
        for m in ["m1", "m2"] {
            for i in 0..500 {
                assert!(seen.insert(MacAddr::derive_from(m, &format!("tap{i}"))));
            }
        }
        assert!(!MacAddr::derive("tap0").is_multicast());
    }

    #[test]
    fn net_config() {
        let c: NetConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac().to_string(), "02:00:00:00:00:01");
        c.validate().unwrap();
        let c: NetConfig = "tap=tap1".parse().unwrap();
        assert_eq!(c.mac, None);
        assert_eq!(c.mac(), MacAddr::derive("tap1"));
        let e = |s: &str| s.parse::<NetConfig>().unwrap_err().to_string();
        assert!(e("mac=02:00:00:00:00:01").contains("tap= is required"));
        assert!(e("tap=a,mac=nope").contains("not a MAC"));
        assert!(e("tap=a,ip=1.2.3.4").contains("unknown option"));
        assert!(e("tap=a,tap=b").contains("twice"));
        // Rate limits.
        assert_eq!((c.rx, c.tx), (None, None));
        let c: NetConfig = "tap=t,rx=1M,tx=64k,tx_burst=128k".parse().unwrap();
        assert_eq!(c.rx, Some(BucketConfig::new(1 << 20, None)));
        assert_eq!(c.rx.unwrap().burst, (1 << 20) / 10);
        assert_eq!(
            c.tx,
            Some(BucketConfig {
                rate: 64 << 10,
                burst: 128 << 10
            })
        );
        assert!(e("tap=a,rx=0").contains("rx=0 would stop the device"));
        assert!(e("tap=a,rx_burst=4k").contains("rx_burst= needs rx="));
        assert!(e("tap=a,tx=lots").contains("not a number"));
        assert!(e("tap=a,tx=1,tx=2").contains("twice"));
        let v = |s: &str| {
            s.parse::<NetConfig>()
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(v("tap=a,mac=01:00:5e:00:00:01").contains("multicast"));
        assert!(v("tap=a,mac=00:00:00:00:00:00").contains("not usable"));
        assert!(v("tap=waytoolongtapname0").contains("longer"));
        let two = |a: &str, b: &str| {
            NetConfig::validate_all(&[a.parse().unwrap(), b.parse().unwrap()])
                .map_err(|e| e.to_string())
        };
        assert!(two("tap=a", "tap=b").is_ok());
        assert!(two("tap=a", "tap=a").unwrap_err().contains("twice"));
        assert!(
            two("tap=a,mac=02:00:00:00:00:01", "tap=b,mac=02:00:00:00:00:01")
                .unwrap_err()
                .contains("both have MAC")
        );
    }
}
