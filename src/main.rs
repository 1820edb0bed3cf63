// SPDX-License-Identifier: Apache-2.0
//! The `ember` binary: parse the command line, run, print what happened, exit with a
//! documented status (see `ember run --help`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use ember::cli::{Cli, Command, RunArgs};
use ember::exit::{code, ExitReason};
use ember::host::HostInfo;
use ember::vmm::RunOptions;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    ember::logger::init(cli.log_level);
    match cli.command {
        Command::Run(args) => run(&args, start),
    }
}

fn run(args: &RunArgs, start: Instant) -> ExitCode {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            ember::print_error_chain(&e);
            return ExitCode::from(code::USAGE);
        }
    };
    let shutdown_timeout = args.shutdown_timeout.map_or_else(
        || HostInfo::detect().default_shutdown_timeout(),
        Duration::from_secs,
    );
    let opts = RunOptions {
        shutdown_timeout,
        ..Default::default()
    };
    match ember::run_vm(&config, start, Default::default(), opts) {
        Ok(outcome) => {
            let reason = &outcome.reason;
            let code = reason.exit_code();
            match reason {
                ExitReason::Reset
                | ExitReason::PowerOff
                | ExitReason::Stopped { graceful: true } => log::info!("{}", reason.describe()),
                _ => log::error!("{}", reason.describe()),
            }
            ExitCode::from(code)
        }
        Err(e) => {
            ember::print_error_chain(&e);
            ExitCode::from(code::USAGE)
        }
    }
}
