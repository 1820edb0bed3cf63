// SPDX-License-Identifier: Apache-2.0
//! The `ember` binary: parse the command line, run, print what happened, exit with a
//! documented status (see `ember run --help`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use ember::cli::{Cli, Command, ExecArgs, RunArgs};
use ember::exec::exit_status;
use ember::exit::{code, ExitReason};
use ember::vmm::RunOptions;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    ember::logger::init(cli.log_level());
    match cli.command {
        Command::Run(args) => run(&args, start),
        Command::Exec(args) => exec(&args, start),
    }
}

/// Prints a command-line error (or --help/--version) and picks the exit status: `ember exec`
/// reports its own failures as 125, so that a CI job tells them from the command's statuses.
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if !e.use_stderr() {
        return ExitCode::SUCCESS; // --help, --version
    }
    let mut args = std::env::args().skip(1);
    let subcommand = loop {
        match args.next() {
            Some(a) if a == "--log-level" => {
                args.next();
            }
            Some(a) if a.starts_with('-') => {}
            other => break other,
        }
    };
    if subcommand.as_deref() == Some("exec") {
        ExitCode::from(code::EXEC_NO_STATUS)
    } else {
        ExitCode::from(code::USAGE)
    }
}

/// `ember exec`: boot, run the command, exit with its status (see `ember exec --help`).
fn exec(args: &ExecArgs, start: Instant) -> ExitCode {
    let failed = |e: &dyn std::error::Error| {
        ember::print_error_chain(e);
        ExitCode::from(code::EXEC_NO_STATUS)
    };
    let spec = match args.to_spec() {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    let mut config = match args.to_config() {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    if let Err(e) = spec.apply(&mut config) {
        return failed(&e);
    }
    let opts = RunOptions {
        deadline: args.timeout.map(|t| start + Duration::from_secs_f64(t)),
        ..Default::default()
    };
    match ember::run_vm(&config, start, Default::default(), opts) {
        Ok(outcome) => {
            let status = exit_status(&outcome, args.timeout);
            if let Some(msg) = &status.message {
                log::error!("{msg}");
            }
            ExitCode::from(status.code)
        }
        Err(e) => failed(&e),
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
    let opts = RunOptions {
        shutdown_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    match ember::run_vm(&config, start, Default::default(), opts) {
        Ok(outcome) => {
            let reason = &outcome.reason;
            let code = reason.exit_code();
            match reason {
                ExitReason::Reset | ExitReason::PowerOff => log::info!("{}", reason.describe()),
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
