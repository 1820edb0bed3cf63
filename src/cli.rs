// SPDX-License-Identifier: Apache-2.0
//! The command line: `ember run` boots a kernel with the console on this terminal. Each
//! subcommand turns its flags into a [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{default_guest_dir, ConfigError, VmConfig, DEFAULT_CMDLINE};
use crate::exec::{EnvVar, ExecError, ExecSpec, FileSpec, EXEC_CMDLINE};

const EXIT_CODES_HELP: &str = "\
Exit status:
  0    the guest powered off or rebooted (`reboot` with reboot=k: the i8042 reset line)
  1    ember failed while the VM ran (a KVM or host error)
  2    bad command line or configuration; nothing was started
  3    the guest triple-faulted (CPU shutdown)
  4    the guest kernel panicked (its panic message was seen on the console)
  5    KVM could not emulate a guest instruction (RIP, bytes and symbol are printed)
  6    stopped by SIGTERM/SIGINT; the guest shut down cleanly in time
  7    stopped by a signal; the guest was stopped hard";

/// ember: a fast, small microVM monitor on Linux KVM.
#[derive(Debug, Parser)]
#[command(name = "ember", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log level on stderr: error, warn, info, debug or trace [default: info; warn for exec].
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: Option<log::LevelFilter>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux kernel in a microVM whose serial console is this terminal.
    #[command(after_help = EXIT_CODES_HELP)]
    Run(RunArgs),
    /// Run one command in a throwaway microVM: its stdout and stderr are streamed to ember's,
    /// and ember exits with its exit status (see docs/exec.md).
    #[command(after_help = EXEC_HELP)]
    Exec(ExecArgs),
}

impl Cli {
    /// The log level: --log-level, or the subcommand's default (exec keeps stderr for the
    /// command: warnings and errors only).
    pub fn log_level(&self) -> log::LevelFilter {
        self.log_level.unwrap_or(match self.command {
            Command::Run(_) => log::LevelFilter::Info,
            Command::Exec(_) => log::LevelFilter::Warn,
        })
    }
}

const EXEC_HELP: &str = "\
The command runs as `exec COMMAND ARGS...` from a sh script in the guest (so a program, not a
shell builtin: use `sh -c '...'` for pipes and shell syntax), with stdin /dev/null, in
--workdir, after --env. Its stdout goes to ember's stdout, its stderr to ember's stderr; the
kernel is kept quiet. --file copies files into the guest's initramfs (no disk or network):
`--file a.sh` -> /root/a.sh, `--file dir:/opt/` -> /opt/dir/..., `--file a:/etc/b` -> /etc/b.

Exit status:
  0-255  the command's exit status (127: command not found)
  124    --timeout elapsed (counted from ember's start, guest boot included)
  125    ember failed or the VM ended without reporting a status (bad flags, missing
         files, boot failure, kernel panic, crash, VMM error)
  128+N  stopped by signal N (130: SIGINT, 143: SIGTERM)

Example:
  ember exec --timeout 300 --file ci/test.sh --env CI=1 -- sh test.sh";

/// `ember exec` flags.
#[derive(Debug, Args, Clone)]
pub struct ExecArgs {
    /// Guest kernel (ELF vmlinux or bzImage). Default: the guest built by
    /// resources/guest/build.sh (target/guest/vmlinux). Its init must implement the protocol
    /// in docs/exec.md.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Base initramfs; ember appends its archive (command, env, files) to it. Default with
    /// the default kernel: target/guest/initramfs.cpio.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = crate::config::DEFAULT_VCPUS, value_name = "N")]
    pub vcpus: u32,
    /// Guest memory in MiB (the --file contents are held in it, twice while unpacking).
    #[arg(long, default_value_t = crate::config::DEFAULT_MEM_MIB, value_name = "MIB")]
    pub mem: u64,
    /// Stop the VM and exit with 124 after this many seconds (decimals allowed), counted from
    /// ember's start: the guest's boot counts too.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// Copy a host file or directory into the guest (repeatable). GUEST_PATH default:
    /// /root/<name>; a relative GUEST_PATH is under /root; one ending in / gets <name>
    /// appended. Not under /tmp, /proc, /sys, /dev (mounted over) or /ember (ember's).
    #[arg(long, value_name = FileSpec::SYNTAX, value_parser = parse_file)]
    pub file: Vec<FileSpec>,
    /// Set an environment variable for the command (repeatable); NAME alone passes ember's
    /// own value.
    #[arg(long, value_name = EnvVar::SYNTAX)]
    pub env: Vec<std::ffi::OsString>,
    /// The command's working directory in the guest.
    #[arg(long, value_name = "DIR", default_value = crate::exec::DEFAULT_GUEST_DIR)]
    pub workdir: String,
    /// Extra kernel command-line words (repeatable), after ember's exec command line.
    #[arg(long, value_name = "STRING")]
    pub append: Vec<String>,
    /// The command and its arguments (after `--`, or after the last ember flag).
    #[arg(
        value_name = "COMMAND",
        required = true,
        num_args = 1..,
        trailing_var_arg = true
    )]
    pub command: Vec<std::ffi::OsString>,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 && t < 1e9 => Ok(t),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 (e.g. 300 or 2.5)"
        )),
    }
}

fn parse_file(s: &str) -> Result<FileSpec, String> {
    s.parse().map_err(|e: ExecError| e.to_string())
}

impl ExecArgs {
    /// What to run in the guest.
    pub fn to_spec(&self) -> Result<ExecSpec, ExecError> {
        let mut spec = ExecSpec::new(self.command.clone());
        spec.env = self
            .env
            .iter()
            .map(|e| EnvVar::parse(e))
            .collect::<Result<_, _>>()?;
        spec.files = self.file.clone();
        spec.workdir = self.workdir.clone();
        Ok(spec)
    }

    /// The VM configuration (before [`ExecSpec::apply`]).
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let (kernel, initrd) = resolve_guest(self.kernel.as_ref(), self.initrd.as_ref())?;
        let mut c = VmConfig::new(kernel);
        c.initrd = initrd;
        c.cmdline = EXEC_CMDLINE.to_string();
        for a in &self.append {
            c.cmdline.push(' ');
            c.cmdline.push_str(a.trim());
        }
        c.vcpus = self.vcpus;
        c.mem_mib = self.mem;
        Ok(c)
    }
}

/// The kernel and initrd: the ones given, or the default guest's.
fn resolve_guest(
    kernel: Option<&PathBuf>,
    initrd: Option<&PathBuf>,
) -> Result<(PathBuf, Option<PathBuf>), ConfigError> {
    match kernel {
        Some(k) => Ok((k.clone(), initrd.cloned())),
        None => {
            let dir = default_guest_dir().ok_or(ConfigError::NoDefaultGuest)?;
            let initrd = initrd
                .cloned()
                .or_else(|| Some(dir.join("initramfs.cpio")).filter(|p| p.is_file()));
            Ok((dir.join("vmlinux"), initrd))
        }
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: use off, error, warn, info, debug or trace"))
}

/// `ember run` flags.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux (PVH entry used when present) or a bzImage. Default: the
    /// guest built by resources/guest/build.sh (target/guest/vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive, compressed or not). Default with the default kernel:
    /// target/guest/initramfs.cpio.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Extra kernel command-line words appended to --cmdline (repeatable).
    #[arg(long, value_name = "STRING")]
    pub append: Vec<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = crate::config::DEFAULT_VCPUS, value_name = "N")]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = crate::config::DEFAULT_MEM_MIB, value_name = "MIB")]
    pub mem: u64,
    /// Do not adapt the guest to this host (on a PVM host ember otherwise adds
    /// `noxsave clearcpuid=smap,popcnt` to the command line and hides KVM's hypercall-based
    /// PV features from CPUID).
    #[arg(long)]
    pub no_host_tuning: bool,
    /// Log when the guest's init signals it started (a write of 123 to MMIO 0xc0000000).
    #[arg(long)]
    pub boot_timer: bool,
}

impl RunArgs {
    /// The VM configuration these flags describe.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let (kernel, initrd) = match &self.kernel {
            Some(k) => (k.clone(), self.initrd.clone()),
            None => {
                let dir = default_guest_dir().ok_or(ConfigError::NoDefaultGuest)?;
                let initrd = self
                    .initrd
                    .clone()
                    .or_else(|| Some(dir.join("initramfs.cpio")).filter(|p| p.is_file()));
                (dir.join("vmlinux"), initrd)
            }
        };
        let mut c = VmConfig::new(kernel);
        c.initrd = initrd;
        c.cmdline = self.cmdline.clone();
        for a in &self.append {
            c.cmdline.push(' ');
            c.cmdline.push_str(a.trim());
        }
        c.vcpus = self.vcpus;
        c.mem_mib = self.mem;
        c.host_tuning = !self.no_host_tuning;
        c.boot_timer = self.boot_timer;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ember").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults() {
        let cli = parse(&["run", "--kernel", "/k"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let c = a.to_config().unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.mem_mib, 128);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(c.host_tuning);
    }

    #[test]
    fn run_flags() {
        let cli = parse(&[
            "run", "--kernel", "/k", "--initrd", "/i", "--vcpus", "2", "--mem", "256",
            "--cmdline", "console=ttyS0", "--append", "quiet", "--no-host-tuning",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        let c = a.to_config().unwrap();
        assert_eq!((c.vcpus, c.mem_mib), (2, 256));
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!(c.initrd.as_deref(), Some(std::path::Path::new("/i")));
        assert!(!c.host_tuning);
    }

    fn exec_args(args: &[&str]) -> ExecArgs {
        match parse(args).unwrap().command {
            Command::Exec(a) => a,
            Command::Run(_) => panic!("not exec"),
        }
    }

    #[test]
    fn exec_flags() {
        let args = "exec --kernel /k --timeout 2.5 --file a.sh --file d:/opt/ --append foo=1";
        let mut args: Vec<&str> = args.split(' ').collect();
        args.extend(["--env", "A=b c", "--", "sh", "-c", "exit 3"]);
        let a = exec_args(&args);
        assert_eq!(a.timeout, Some(2.5));
        assert_eq!(a.command, ["sh", "-c", "exit 3"]);
        let spec = a.to_spec().unwrap();
        assert_eq!(spec.files[1].guest_path().unwrap(), "/opt/d");
        assert_eq!(spec.env[0].value, "b c");
        assert_eq!(spec.workdir, "/root");
        let c = a.to_config().unwrap();
        assert_eq!(c.cmdline, format!("{EXEC_CMDLINE} foo=1"));
        let cli = parse(&["exec", "--kernel", "/k", "--", "true"]).unwrap();
        assert_eq!(cli.log_level(), log::LevelFilter::Warn);
        let cli = parse(&["--log-level", "debug", "exec", "--kernel", "/k", "true"]).unwrap();
        assert_eq!(cli.log_level(), log::LevelFilter::Debug);
    }

    #[test]
    fn exec_command_without_dashes_keeps_its_flags() {
        let a = exec_args(&["exec", "--kernel", "/k", "ls", "-l", "--timeout", "3"]);
        assert_eq!(a.command, ["ls", "-l", "--timeout", "3"]);
        assert_eq!(a.timeout, None);
    }

    #[test]
    fn exec_rejects_bad_flags() {
        assert!(parse(&["exec", "--kernel", "/k"]).is_err()); // no command
        assert!(parse(&["exec", "--timeout", "0", "--", "true"]).is_err());
        assert!(parse(&["exec", "--timeout", "soon", "--", "true"]).is_err());
        assert!(parse(&["exec", "--file", "a:", "--", "true"]).is_err());
        let a = exec_args(&["exec", "--kernel", "/k", "--env", "1X=y", "--", "true"]);
        assert!(a.to_spec().is_err());
    }

    #[test]
    fn rejects_bad_numbers() {
        assert!(parse(&["run", "--kernel", "/k", "--vcpus", "-1"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--mem", "lots"]).is_err());
        assert!(parse(&["run", "--bogus"]).is_err());
    }
}
