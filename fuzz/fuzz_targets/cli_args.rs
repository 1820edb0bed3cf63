// SPDX-License-Identifier: Apache-2.0
//! The command line: the input, split at NUL bytes, is ember's argument vector (any bytes,
//! not only UTF-8), parsed as `main` does, and what parses is turned into what `main` turns
//! it into: the VM configuration and its checks (`run`), the command spec, configuration
//! and archive (`exec`, without `--file`, which would read host files), a snapshot's
//! configuration with the restore's flags applied (`restore`), the bench options, and the
//! durations the flags become.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::{Duration, Instant};

use clap::Parser;
use ember::cli::{Cli, Command};
use ember::config::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args = std::iter::once(OsString::from("ember")).chain(
        data.split(|&b| b == 0)
            .map(|a| OsString::from_vec(a.to_vec())),
    );
    let Ok(cli) = Cli::try_parse_from(args) else {
        return;
    };
    let _ = cli.log_level();
    let start = Instant::now();
    let deadline = |t: Option<f64>| t.and_then(|t| start.checked_add(Duration::from_secs_f64(t)));
    match &cli.command {
        Command::Run(a) => {
            let _ = deadline(a.timeout);
            let _ = deadline(a.snapshot_restore_after);
            let _ = a.stop_after_ms.map(Duration::from_millis);
            let _ = a.shutdown_timeout.map(Duration::from_secs);
            if let Ok(c) = a.to_config() {
                let _ = c.validate();
                let _ = c.root_cmdline();
                let _ = c.root_share_init();
                let _ = c.validate_vcpus(254);
            }
        }
        Command::Exec(a) => {
            let _ = deadline(a.timeout);
            let spec = a.to_spec();
            if let (Ok(spec), Ok(mut c)) = (spec, a.to_config()) {
                if spec.files.is_empty() {
                    let _ = spec.apply(&mut c);
                }
                let _ = c.validate_without_images();
            }
        }
        Command::Restore(a) => {
            let _ = deadline(a.timeout);
            let mut c = VmConfig::new("/vmlinux");
            let _ = a.apply(&mut c);
            let mut c = VmConfig::new("/vmlinux");
            c.net = ["tap=tap0", "tap=tap1,mac=02:00:00:00:00:07"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
            c.vsock = Some("cid=3,uds=/tmp/v.sock".parse().unwrap());
            if a.apply(&mut c).is_ok() {
                let _ = c.validate_without_images();
            }
        }
        Command::Bench(a) => {
            let _ = a.to_exec_options();
            let _ = a.to_options();
        }
        // Its options are checked by clap; what runs is other programs.
        Command::Compare(_) => {}
    }
});
