// SPDX-License-Identifier: Apache-2.0
//! The `ember` binary: parse the command line, run, print what happened, exit with a
//! documented status (see `ember run --help`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use ember::bench::runner::Progress;
use ember::cli::{BenchArgs, Cli, Command, CompareArgs, ExecArgs, RestoreArgs, RunArgs};
use ember::exit::{code, ExitReason};
use ember::host::HostInfo;
use ember::sandbox::{PathAccess, PathRule};
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
        Command::Bench(args) => bench(&args),
        Command::Exec(args) => exec(&args, start),
        Command::Restore(args) => restore(&args, start),
        Command::Compare(args) => compare(&args),
    }
}

/// `ember compare`: every row, then the table, the JSON and the chart.
fn compare(args: &CompareArgs) -> ExitCode {
    let opts = match args.to_options() {
        Ok(o) => o,
        Err(e) => {
            ember::print_error_chain(&e);
            return ExitCode::from(code::USAGE);
        }
    };
    let result = ember::compare::run(&opts, &mut |line| eprintln!("{line}"));
    let c = match result {
        Ok(c) => c,
        Err(e) => {
            ember::print_error_chain(&e);
            return ExitCode::from(code::VMM_ERROR);
        }
    };
    println!("{}", c.render());
    let mut status = ExitCode::SUCCESS;
    if let Some(p) = &args.json {
        match c.write_json(p) {
            Ok(()) => eprintln!("ember compare: results written to {}", p.display()),
            Err(e) => {
                ember::print_error_chain(&e);
                status = ExitCode::from(code::VMM_ERROR);
            }
        }
    }
    if let Some(p) = &args.svg {
        match c.write_svg(p) {
            Ok(()) => eprintln!("ember compare: chart written to {}", p.display()),
            Err(e) => {
                ember::print_error_chain(&e);
                status = ExitCode::from(code::VMM_ERROR);
            }
        }
    }
    // Every row that ran must have at least one successful run.
    let failed: Vec<&str> = c
        .rows
        .iter()
        .filter(|r| r.skipped.is_none() && r.ok().next().is_none())
        .map(|r| r.kind.name())
        .collect();
    if !failed.is_empty() {
        eprintln!("ember compare: no successful run of {}", failed.join(", "));
        status = ExitCode::from(code::VMM_ERROR);
    }
    status
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
/// With `--json FILE`, the result is written on every way out from here (the watchdog's
/// too, through `status_of`).
fn exec(args: &ExecArgs, start: Instant) -> ExitCode {
    use ember::exec::report::{Ending, ExecPath, ResultWriter, VmWatch};
    let watch = VmWatch::default();
    let mut writer = args.json.as_ref().map(|file| ResultWriter {
        file: file.clone(),
        // Until the configuration is known: a kernel that has no symbols.
        kernel: args
            .kernel
            .clone()
            .or_else(|| args.kernel_tree.as_ref().map(|d| d.join("vmlinux")))
            .unwrap_or_default(),
        start,
        watch: watch.clone(),
    });
    let spec = match args.to_spec() {
        Ok(s) => s,
        Err(e) => return exec_failed(writer.as_ref(), "setup-error", &e),
    };
    let mut config = match args.to_config() {
        Ok(c) => c,
        Err(e) => return exec_failed(writer.as_ref(), "setup-error", &e),
    };
    if let Some(w) = &mut writer {
        w.kernel = config.kernel.clone();
    }
    let failed = |reason, e: &dyn std::error::Error| exec_failed(writer.as_ref(), reason, e);
    // A kernel tree's .config: refuse a kernel that lacks what exec needs, before booting.
    let mut force_cold = None;
    let mut spec = spec;
    if let Some(dir) = &args.kernel_tree {
        // The tree's modules: the tree shared read-only, modules.dep and links in the archive.
        match ember::exec::kernel_tree::modules(dir) {
            Ok(Some(m)) => {
                log::info!(
                    "--kernel-tree: {} modules of {} are available to modprobe in the guest",
                    m.links.len(),
                    m.release
                );
                let mut share = ember::config::ShareConfig::new(dir);
                share.tag = Some(ember::exec::kernel_tree::TREE_SHARE_TAG.to_string());
                share.readonly = true;
                config.shares.push(share);
                match ember::exec::SharedDir::resolve_all(&config.shares) {
                    Ok(s) => spec.shares = s,
                    Err(e) => return failed("setup-error", &e),
                }
                spec.modules = Some(m);
            }
            Ok(None) => {}
            Err(e) => return failed("setup-error", &e),
        }
    }
    if let Some(dir) = &args.kernel_tree {
        match ember::exec::kernel_tree::check_config(dir, !config.shares.is_empty()) {
            Ok(c) if !c.missing_warm.is_empty() => {
                force_cold = Some(format!(
                    "the kernel tree's .config lacks {} (the warm path needs them)",
                    c.missing_warm.join(", ")
                ));
            }
            Ok(c) if !c.checked => log::info!(
                "--kernel-tree {}: no .config in it: the options exec needs were not checked",
                dir.display()
            ),
            Ok(_) => {}
            Err(e) => return failed("setup-error", &e),
        }
    }
    let opts = RunOptions {
        // checked: a deadline past the clock's end is no deadline (the flag is capped anyway).
        deadline: args
            .timeout
            .and_then(|t| start.checked_add(Duration::from_secs_f64(t))),
        // A stop signal ends the VM at once: there is nothing in a throwaway guest to shut
        // down gracefully, so the power button is never pressed.
        shutdown: Some(Box::new(|| false)),
        // The status the watchdog ends the process with when the event loop is stuck (and
        // the --json result, which the run loop will not get to write).
        status_of: Some(Box::new({
            let timeout = args.timeout;
            let writer = writer.clone();
            move |outcome| {
                let ending = Ending::of_run(outcome, timeout);
                if let Some(w) = &writer {
                    w.write(&ending, None);
                }
                ending.status
            }
        })),
        ..Default::default()
    };
    let eligible = match force_cold {
        Some(why) => Err(why),
        None => ember::exec::warm::eligible(&config, args.cold).map_err(str::to_string),
    };
    // The warm path adds its cache and socket directories itself.
    let mut paths = ember::sandbox::vm_paths(&config);
    paths.extend(
        [&args.json, &args.bench_report]
            .into_iter()
            .flatten()
            .map(|f| ember::sandbox::output_file(f)),
    );
    if let Err(e) = ember::sandbox::install(args.sandbox.to_config(paths, None)) {
        return failed("setup-error", &e);
    }
    let result = match eligible {
        Ok(cache) => {
            watch.set_path(ExecPath::WarmBoot);
            ember::exec::warm::run(&config, &spec, &cache, start, opts, &watch)
                .map(|(outcome, report)| (outcome, Some(report)))
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
        }
        Err(why) => {
            log::info!("cold exec (booting the guest for this command): {why}");
            watch.set_path(ExecPath::Cold);
            if let Err(e) = spec.apply(&mut config) {
                return failed("setup-error", &e);
            }
            // A cold exec VM is never snapshotted: it needs no VM generation ID.
            config.vm_generation_id = false;
            run_cold(&config, start, opts, &watch)
        }
    };
    match result {
        Ok((outcome, report)) => {
            let warm = report.as_ref().map(|r| r.to_json());
            if let Some(path) = &args.bench_report {
                use ember::bench::json::Json;
                let text = Json::obj([("warm", warm.clone().unwrap_or(Json::Null))]).to_pretty();
                if let Err(e) = std::fs::write(path, text) {
                    log::error!("cannot write {}: {e}", path.display());
                }
            }
            let ending = Ending::of_run(&outcome, args.timeout);
            if let Some(msg) = &ending.message {
                log::error!("{msg}");
            }
            if let Some(w) = &writer {
                w.write(&ending, warm);
            }
            ExitCode::from(ending.status)
        }
        Err(e) => failed("vm-error", e.as_ref()),
    }
}

/// Says why exec failed in ember, writes the `--json` result, and picks the status (125).
fn exec_failed(
    writer: Option<&ember::exec::report::ResultWriter>,
    reason: &'static str,
    e: &dyn std::error::Error,
) -> ExitCode {
    ember::print_error_chain(e);
    if let Some(w) = writer {
        w.write(&ember::exec::report::Ending::of_error(reason, e), None);
    }
    ExitCode::from(code::EXEC_NO_STATUS)
}

/// The cold exec VM: built (and watched for `--json`), then run.
fn run_cold(
    config: &ember::config::VmConfig,
    start: Instant,
    mut opts: RunOptions,
    watch: &ember::exec::report::VmWatch,
) -> Result<
    (
        ember::vmm::RunOutcome,
        Option<ember::exec::warm::WarmReport>,
    ),
    Box<dyn std::error::Error>,
> {
    match ember::event_loop::block_signals_to_fd() {
        Ok(fd) => opts.signal_fd = Some(fd),
        Err(e) => log::warn!("cannot handle signals: {e}"),
    }
    let vmm = ember::builder::build_vm(config, start, Default::default())?;
    watch.attach(&vmm, ember::exec::report::ExecPath::Cold);
    Ok((vmm.run(opts), None))
}

fn bench(args: &BenchArgs) -> ExitCode {
    if args.exec {
        return bench_exec(args);
    }
    let opts = match args.to_options() {
        Ok(o) => o,
        Err(e) => {
            ember::print_error_chain(&e);
            return ExitCode::from(code::USAGE);
        }
    };
    if opts.snapshot.is_some() {
        return bench_snapshot(args, &opts);
    }
    if opts.ab.is_some() {
        return bench_ab(args, &opts);
    }
    let mut on_progress = bench_progress(&|job: &ember::bench::runner::Job| job.label());
    let results = match ember::bench::run_bench(&opts, &mut on_progress) {
        Ok(r) => r,
        Err(e) => {
            ember::print_error_chain(&e);
            return ExitCode::from(match e {
                ember::bench::BenchError::Usage(_) => code::USAGE,
                _ => code::VMM_ERROR,
            });
        }
    };
    let ok = results
        .records
        .iter()
        .any(|r| r.vmm == "ember" && r.error.is_none());
    report_bench(
        args,
        &results.render(),
        |p| results.write_json(p),
        "raw samples and statistics",
        ok,
    )
}

/// `ember bench --ab`: two ember configurations, ABBA, with a significance test.
fn bench_ab(args: &BenchArgs, opts: &ember::bench::BenchOptions) -> ExitCode {
    let names: Vec<String> = opts
        .ab
        .iter()
        .flat_map(|ab| ab.sides().map(|s| s.name.clone()))
        .collect();
    let label = |job: &ember::bench::runner::Job| {
        let side = names.get(job.ctx).map_or("?", String::as_str);
        format!("{side} #{}", job.run)
    };
    let mut on_progress = bench_progress(&label);
    let results = match ember::bench::ab::run_ab(opts, &mut on_progress) {
        Ok(r) => r,
        Err(e) => {
            ember::print_error_chain(&e);
            return ExitCode::from(match e {
                ember::bench::BenchError::Usage(_) => code::USAGE,
                _ => code::VMM_ERROR,
            });
        }
    };
    let ok = results.comparable();
    let status = report_bench(
        args,
        &results.render(),
        |p| results.write_json(p),
        "raw samples and statistics",
        ok,
    );
    if !ok {
        eprintln!(
            "ember bench --ab: no comparison: each side needs at least {} successful runs \
             ({} of {} and {} of {} succeeded; the notes of the report say why runs failed)",
            ember::bench::ab::MIN_OK_RUNS,
            results.ok_runs[0],
            results.all_runs[0],
            results.ok_runs[1],
            results.all_runs[1]
        );
    }
    status
}

/// The progress lines of a bench on stderr (one line, rewritten, on a terminal); `label`
/// names a job that starts.
fn bench_progress<'a>(
    label: &'a dyn Fn(&ember::bench::runner::Job) -> String,
) -> impl FnMut(&Progress, usize, usize) + 'a {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    move |p: &Progress, done: usize, total: usize| match p {
        Progress::Started(job) if tty => {
            eprint!("\r\x1b[K[{done}/{total}] running {}", label(job));
        }
        Progress::Started(_) => {}
        Progress::Finished(rec) => {
            let status = match &rec.error {
                None => "ok".to_string(),
                Some(e) => format!("FAILED: {e}"),
            };
            let ms = ember::bench::report::milestones(rec);
            let at = |k: &str| {
                ms.iter()
                    .find(|m| m.0 == k)
                    .and_then(|m| m.1)
                    .map_or("-".to_string(), |v| format!("{:.2} s", v / 1000.0))
            };
            let line = format!(
                "[{done}/{total}] {} #{} {status}: marker {}, exit {}",
                rec.vmm,
                rec.run,
                at("marker"),
                at("process_exit")
            );
            if tty {
                eprint!("\r\x1b[K{line}\n");
            } else {
                eprintln!("{line}");
            }
        }
    }
}

/// Prints a bench's text report, writes its JSON (`--json`; `what` names it in the message)
/// and picks the exit status: success when `ok`.
fn report_bench(
    args: &BenchArgs,
    text: &str,
    write_json: impl FnOnce(&std::path::Path) -> Result<(), ember::bench::BenchError>,
    what: &str,
    ok: bool,
) -> ExitCode {
    println!("{text}");
    if let Some(path) = &args.json {
        if let Err(e) = write_json(path) {
            ember::print_error_chain(&e);
            return ExitCode::from(code::VMM_ERROR);
        }
        eprintln!("{what} written to {}", path.display());
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(code::VMM_ERROR)
    }
}

/// `ember bench --exec`: warm against cold `ember exec`.
fn bench_exec(args: &BenchArgs) -> ExitCode {
    let opts = args.to_exec_options();
    let results = ember::bench::exec::run(&opts, &mut |s| {
        let status = s.error.as_deref().unwrap_or("ok");
        eprintln!("{} #{}: {:.0} ms, {status}", s.mode, s.run, s.wall_ms);
    });
    let ok = results.samples.iter().all(|s| s.error.is_none());
    report_bench(
        args,
        &results.render(),
        |p| results.write_json(p),
        "raw samples and statistics",
        ok,
    )
}

/// `ember bench --snapshot`: snapshot/restore rows (see `ember::bench::snapshot`).
fn bench_snapshot(args: &BenchArgs, opts: &ember::bench::BenchOptions) -> ExitCode {
    let started = Instant::now();
    let mut on_progress = |line: &str| {
        eprintln!("[{:6.1} s] {line}", started.elapsed().as_secs_f64());
    };
    let results = match ember::bench::snapshot::run_snapshot_bench(opts, &mut on_progress) {
        Ok(r) => r,
        Err(e) => {
            ember::print_error_chain(&e);
            return ExitCode::from(match e {
                ember::bench::BenchError::Usage(_) => code::USAGE,
                _ => code::VMM_ERROR,
            });
        }
    };
    let ok = results.all_measured();
    report_bench(
        args,
        &results.render(),
        |p| results.write_json(p),
        "snapshot rows",
        ok,
    )
}

fn run(args: &RunArgs, start: Instant) -> ExitCode {
    if args.config_file.is_some() || args.api_sock.is_some() {
        return firecracker_mode(args, start);
    }
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
    // --timeout (public) and --stop-after-ms (ember bench's) both stop the VM with 124.
    let deadline = [
        args.timeout
            .and_then(|t| start.checked_add(Duration::from_secs_f64(t))),
        args.stop_after_ms
            .and_then(|ms| start.checked_add(Duration::from_millis(ms))),
    ]
    .into_iter()
    .flatten()
    .min();
    let snapshot_restore =
        args.snapshot_restore_after
            .map(|after| ember::snapshot::SnapshotTrigger {
                after: Duration::from_secs_f64(after),
                opts: args
                    .snapshot_restore_opts
                    .clone()
                    .unwrap_or_else(ember::snapshot::kvm_state::RestoreOptions::standard),
                to: args.snapshot_to.clone(),
            });
    if args.snapshot_to.is_some()
        && args.snapshot_on.is_none()
        && args.snapshot_restore_after.is_none()
    {
        eprintln!(
            "ember: error: --snapshot-to needs --snapshot-on ready|sigusr2 (when to take it)"
        );
        return ExitCode::from(code::USAGE);
    }
    let mut opts = RunOptions {
        shutdown_timeout,
        deadline,
        snapshot_restore,
        ..Default::default()
    };
    match ember::event_loop::block_control_signals_to_fd() {
        Ok(fd) => opts.control_fd = Some(fd),
        Err(e) => log::warn!("SIGUSR1/SIGUSR2 will not be handled: {e}"),
    }
    if let (Some(on), Some(dir)) = (&args.snapshot_on, &args.snapshot_to) {
        let action = ember::vmm::ReadyAction {
            snapshot_to: Some(dir.clone()),
            stop_after: args.snapshot_then == "stop",
            then: Box::new({
                let dir = dir.clone();
                move |ev| match ev.snapshot {
                    Some(Ok(paused)) => log::info!(
                        "snapshot written to {} (guest paused {paused:?}); `ember restore {}` \
                         starts it again",
                        dir.display(),
                        dir.display()
                    ),
                    Some(Err(e)) => log::error!(
                        "snapshot into {} failed: {}",
                        dir.display(),
                        ember::error_chain_line(&e)
                    ),
                    None => {}
                }
            }),
        };
        if on == "ready" {
            opts.on_ready = Some(action);
        } else {
            opts.snapshot_on_signal = Some(action);
        }
    }
    if let Err(e) = ember::sandbox::install(
        args.sandbox
            .to_config(run_sandbox_paths(args, &config), Some(&args.privileges)),
    ) {
        ember::print_error_chain(&e);
        return ExitCode::from(code::USAGE);
    }
    let result = if args.bench_report.is_some() || args.profile_guest.is_some() {
        let inst = ember::bench::probe::Instruments {
            report: args.bench_report.clone(),
            profile: args.profile_guest.clone(),
            profile_rate_hz: args.profile_rate,
        };
        ember::bench::probe::run_instrumented(&config, start, &inst, opts)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
    } else {
        let hooks = ember::builder::BuildHooks {
            restore_from: args.restore_from.clone(),
            ..Default::default()
        };
        ember::run_vm(&config, start, hooks, opts)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
    };
    run_status(result)
}

/// The paths an `ember run` VM uses after set-up (see [`ember::sandbox`]): its kernel and
/// initrd, the snapshot directory, the reports it writes.
fn run_sandbox_paths(args: &RunArgs, config: &ember::config::VmConfig) -> Vec<PathRule> {
    let mut paths = ember::sandbox::vm_paths(config);
    if let Some(dir) = &args.snapshot_to {
        paths.push(ember::sandbox::writable_dir(dir));
    }
    if let Some(p) = &args.bench_report {
        paths.push(ember::sandbox::output_file(p));
    }
    if let Some(p) = &args.profile_guest {
        paths.push(ember::sandbox::output_file(p));
        paths.push(ember::sandbox::output_file(&ember::profiler::folded_path(
            p,
        )));
    }
    if args.bench_report.is_some() || args.profile_guest.is_some() {
        // The instruments read the process's memory map and CPU times.
        paths.push(PathRule::new("/proc/self", PathAccess::Read));
    }
    if args.snapshot_restore_after.is_some() {
        // The in-process snapshot/restore experiment may put guest memory in a file there.
        // (created, read and written back, and unlinked at once).
        paths.push(PathRule::new(std::env::temp_dir(), PathAccess::ReadWrite));
    }
    paths
}

/// `ember restore DIR`: the VM of the snapshot in DIR, with this run's host-side settings;
/// the exit statuses of `ember run`.
fn restore(args: &RestoreArgs, start: Instant) -> ExitCode {
    let refused = |e: &dyn std::error::Error| {
        ember::print_error_chain(e);
        ExitCode::from(code::USAGE)
    };
    // The state file gives the configuration; build_vm checks it against the snapshot's
    // KVM state and memory file as for `ember run --restore-from`.
    let saved = match ember::snapshot::file::read_state(&args.dir) {
        Ok(s) => s,
        Err(e) => return refused(&e),
    };
    let mut config = saved.meta.config.clone();
    if let Err(e) = args.apply(&mut config) {
        return refused(&e);
    }
    let shutdown_timeout = args.shutdown_timeout.map_or_else(
        || HostInfo::detect().default_shutdown_timeout(),
        Duration::from_secs,
    );
    let opts = RunOptions {
        shutdown_timeout,
        deadline: args
            .timeout
            .and_then(|t| start.checked_add(Duration::from_secs_f64(t))),
        ..Default::default()
    };
    let paths = ember::sandbox::vm_paths(&config);
    if let Err(e) = ember::sandbox::install(args.sandbox.to_config(paths, Some(&args.privileges))) {
        return refused(&e);
    }
    let hooks = ember::builder::BuildHooks {
        restore_from: Some(args.dir.clone()),
        restore_state: Some(Box::new(saved)),
        ..Default::default()
    };
    let result = ember::run_vm(&config, start, hooks, opts)
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error>);
    run_status(result)
}

/// Logs how a run (`ember run`, `ember restore`) ended and picks its exit status.
fn run_status(result: Result<ember::vmm::RunOutcome, Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(outcome) => {
            let reason = &outcome.reason;
            let code = reason.exit_code();
            match reason {
                ExitReason::Reset
                | ExitReason::PowerOff
                | ExitReason::Snapshotted
                | ExitReason::Stopped { graceful: true } => log::info!("{}", reason.describe()),
                _ => log::error!("{}", reason.describe()),
            }
            ExitCode::from(code)
        }
        Err(e) => {
            ember::print_error_chain(e.as_ref());
            ExitCode::from(code::USAGE)
        }
    }
}

/// `ember run --config-file FILE` and/or `--api-sock PATH`: the VM described by a
/// Firecracker configuration file, or configured and started through Firecracker's API (see
/// `ember::api` and docs/api.md). With both, the VM starts at once and the API serves it.
fn firecracker_mode(args: &RunArgs, start: Instant) -> ExitCode {
    use ember::api::{http::HttpServer, resources::VmResources, Api, VmmHandle};
    let refused = |msg: String| {
        eprintln!("ember: error: {msg}");
        ExitCode::from(code::USAGE)
    };
    let resources = match &args.config_file {
        Some(path) => match load_config_file(path, &args.id) {
            Ok(r) => r,
            Err(msg) => return refused(msg),
        },
        None => VmResources::default(),
    };
    let server = match &args.api_sock {
        Some(p) => match HttpServer::bind(p, args.http_api_max_payload_size as usize) {
            Ok(s) => Some(s),
            Err(e) => return refused(e.to_string()),
        },
        None => None,
    };
    // The sandbox: what the API mode writes after set-up is the socket's directory (the
    // snapshots of PUT /snapshot/create go there or in the working directory) and the log
    // and metrics files; the VM's files are added at the start.
    let mut paths = vec![ember::sandbox::writable_dir(std::path::Path::new("."))];
    if let Some(p) = &args.api_sock {
        paths.push(ember::sandbox::output_file(p));
    }
    for p in [
        resources
            .logger
            .as_ref()
            .and_then(|l| l.log_path.as_deref()),
        resources.metrics.as_ref().map(|m| m.metrics_path.as_str()),
    ]
    .into_iter()
    .flatten()
    {
        paths.push(ember::sandbox::output_file(std::path::Path::new(p)));
    }
    if let Err(e) = ember::sandbox::install(args.sandbox.to_config(paths, Some(&args.privileges))) {
        return refused(e.to_string());
    }
    // Before any thread exists: stop and control signals go to signalfds of the main thread.
    let mut opts = RunOptions {
        shutdown_timeout: args.shutdown_timeout.map_or_else(
            || HostInfo::detect().default_shutdown_timeout(),
            Duration::from_secs,
        ),
        deadline: args
            .timeout
            .and_then(|t| start.checked_add(Duration::from_secs_f64(t))),
        ..Default::default()
    };
    match ember::event_loop::block_signals_to_fd() {
        Ok(fd) => opts.signal_fd = Some(fd),
        Err(e) => log::warn!("cannot handle signals: {e}"),
    }
    match ember::event_loop::block_control_signals_to_fd() {
        Ok(fd) => opts.control_fd = Some(fd),
        Err(e) => log::warn!("SIGUSR1 will not be handled: {e}"),
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serve = |server: HttpServer, mut api: Api| {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // A started VM's API thread is sandboxed at once; before the start, once the VM
                // is built (Api::start_vm).
                if api.phase() != ember::api::Phase::NotStarted {
                    ember::sandbox::enter(ember::sandbox::ThreadKind::Api);
                }
                server.serve(&stop, &mut |req| api.handle(req));
            })
    };
    let run_built = |vmm: ember::vmm::Vmm, mut opts: RunOptions, link| {
        opts.api = link;
        let _raw = std::io::IsTerminal::is_terminal(&std::io::stdin())
            .then(|| ember::terminal::RawTerminal::enable(libc::STDIN_FILENO))
            .flatten();
        let outcome = vmm.run(opts);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // The API thread is not waited for: its socket is removed here.
        if let Some(p) = &args.api_sock {
            let _ = std::fs::remove_file(p);
        }
        // The last metrics (as Firecracker writes them at exit); none configured: nothing.
        let _ = ember::metrics::flush();
        run_status(Ok(outcome))
    };

    if args.config_file.is_some() {
        // The file describes the whole VM: start it now.
        let config = match resources.to_vm_config() {
            Ok(c) => c,
            Err(e) => return refused(format!("{}: {e}", path_of(args))),
        };
        for rule in ember::sandbox::vm_paths(&config) {
            ember::sandbox::allow_path(rule);
        }
        let vmm = match ember::builder::build_vm(&config, start, Default::default()) {
            Ok(v) => v,
            Err(e) => return run_status(Err(Box::new(e))),
        };
        let mut link = None;
        if let Some(server) = server {
            let (handle, l) = match VmmHandle::pair() {
                Ok(p) => p,
                Err(e) => return refused(format!("API: {e}")),
            };
            if let Err(e) = serve(server, Api::started(args.id.clone(), resources, handle)) {
                return refused(format!("cannot start the API thread: {e}"));
            }
            link = Some(l);
        }
        return run_built(vmm, opts, link);
    }

    // API only: wait for InstanceStart.
    let Some(server) = server else {
        return refused("--no-api needs --config-file".into());
    };
    log::info!(
        "API socket {}: configure the microVM and PUT /actions InstanceStart",
        server.path().display()
    );
    let (start_tx, start_rx) = std::sync::mpsc::channel();
    if let Err(e) = serve(server, Api::new(args.id.clone(), resources, start_tx)) {
        return refused(format!("cannot start the API thread: {e}"));
    }
    loop {
        match start_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(call) => match build_for_api(&call, start) {
                Ok(vmm) => {
                    opts.start_paused = call.restore.as_ref().is_some_and(|(_, resume)| !resume);
                    let (handle, link) = match VmmHandle::pair() {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = call.reply.send(Err(e.to_string()));
                            continue;
                        }
                    };
                    let _ = call.reply.send(Ok(handle));
                    return run_built(vmm, opts, Some(link));
                }
                Err(e) => {
                    let _ = call.reply.send(Err(ember::error_chain_line(&e)));
                }
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(sig) = opts.signal_fd.as_ref().and_then(pending_signal) {
                    log::info!("signal {sig} before the microVM started: exiting");
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    if let Some(p) = &args.api_sock {
                        let _ = std::fs::remove_file(p);
                    }
                    return ExitCode::SUCCESS;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return refused("the API thread ended".into());
            }
        }
    }
}

/// Builds the VM of an `InstanceStart` or `PUT /snapshot/load` (whose link directory is
/// removed once the VM is built: the memory file is open by then).
fn build_for_api(
    call: &ember::api::StartCall,
    start: Instant,
) -> Result<ember::vmm::Vmm, ember::builder::BuildError> {
    for rule in ember::sandbox::vm_paths(&call.config) {
        ember::sandbox::allow_path(rule);
    }
    let hooks = ember::builder::BuildHooks {
        restore_from: call.restore.as_ref().map(|(dir, _)| dir.clone()),
        start_paused: call.restore.as_ref().is_some_and(|(_, resume)| !resume),
        ..Default::default()
    };
    let built = ember::builder::build_vm(&call.config, start, hooks);
    if let Some((dir, _)) = &call.restore {
        let _ = std::fs::remove_dir_all(dir);
    }
    built
}

fn path_of(args: &RunArgs) -> String {
    args.config_file
        .as_ref()
        .map_or_else(String::new, |p| p.display().to_string())
}

/// Reads and checks a Firecracker configuration file; logger and metrics take effect now.
fn load_config_file(
    path: &std::path::Path,
    id: &str,
) -> Result<ember::api::resources::VmResources, String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("--config-file {}: cannot read it: {e}", path.display()))?;
    let doc: ember::api::model::VmConfigFile =
        ember::api::model::from_json(&text).map_err(|e| {
            format!(
                "--config-file {}: not a Firecracker configuration: {e}",
                path.display()
            )
        })?;
    let r = ember::api::resources::VmResources::from_file(&doc)
        .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
    if let Some(l) = &r.logger {
        ember::logger::configure(l, id)
            .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
    }
    if let Some(m) = &r.metrics {
        ember::metrics::configure(&m.metrics_path)
            .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
    }
    Ok(r)
}

/// A stop signal waiting on `fd` (a non-blocking signalfd), if any.
fn pending_signal(fd: &std::os::fd::OwnedFd) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: signalfd_siginfo is plain data; read writes at most its size into it.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is valid for `size` bytes; the fd is a signalfd owned by the caller.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (usize::try_from(n).ok() == Some(size)).then_some(info.ssi_signo)
}
