// SPDX-License-Identifier: Apache-2.0
//! Every device and option string parser, straight (the `cli_args` target reaches them
//! through clap): byte 0 picks the parser, the rest (lossy UTF-8) is the string. What
//! parses is also checked as the builder checks it. Parsers: `--disk`, `--net`, `--vsock`,
//! `--rng`, `--share`, `--root-share`, a MAC address, `exec --file`, `exec --env`, the
//! `key=value,...` splitter, the TAP name check, and the kernel command-line helpers (switch
//! appending, parameter lookup, the command-line check).
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use ember::config::{parse_options, DiskConfig, ShareConfig};
use ember::devices::virtio::net::tap::validate_tap_name;
use ember::devices::virtio::net::{MacAddr, NetConfig};
use ember::devices::virtio::rng::RngConfig;
use ember::devices::virtio::vsock::VsockConfig;
use ember::exec::{EnvVar, FileSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let s = String::from_utf8_lossy(rest);
    let s = s.as_ref();
    match which % 12 {
        0 => {
            if let Ok(d) = s.parse::<DiskConfig>() {
                let _ = d.validate();
            }
        }
        1 => {
            if let Ok(n) = s.parse::<NetConfig>() {
                let _ = n.validate();
                let _ = n.mac();
                let _ = NetConfig::validate_all(&[n.clone(), n]);
            }
        }
        2 => {
            let _ = s.parse::<VsockConfig>();
        }
        3 => {
            if let Ok(r) = s.parse::<RngConfig>() {
                let _ = r.validate();
            }
        }
        4 => {
            if let Ok(sh) = s.parse::<ShareConfig>() {
                let _ = sh.tag(0);
                let _ = ShareConfig::validate_all(&[sh]);
            }
        }
        5 => {
            if let Ok(sh) = ShareConfig::parse_root(s) {
                let _ = ShareConfig::validate_all(&[sh]);
            }
        }
        6 => {
            if let Ok(m) = s.parse::<MacAddr>() {
                let back: MacAddr = m.to_string().parse().expect("a MAC reads back");
                assert_eq!(back, m);
            }
        }
        7 => {
            if let Ok(f) = s.parse::<FileSpec>() {
                let _ = f.guest_path();
            }
        }
        8 => {
            let _ = EnvVar::parse(OsStr::from_bytes(rest));
        }
        9 => {
            let _ = parse_options(s, "--fuzz", "a=A,b=B", &["a", "b", "cid"]);
        }
        10 => {
            let _ = validate_tap_name(s);
        }
        _ => {
            let (cmdline, key) = s.split_once('\n').unwrap_or((s, "root"));
            let _ = ember::host::append_switches(cmdline, key);
            let _ = ember::host::has_param(cmdline, key);
            let _ = ember::host::param_value(cmdline, key);
            let _ = ember::kernel::check_cmdline(cmdline, 2047);
        }
    }
});
