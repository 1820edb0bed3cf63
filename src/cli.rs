// SPDX-License-Identifier: Apache-2.0
//! The command line: `ember run` boots a kernel with the console on this terminal. Each
//! subcommand turns its flags into a [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{default_guest_dir, ConfigError, VmConfig, DEFAULT_CMDLINE};

const EXIT_CODES_HELP: &str = "\
Exit status:
  0    the guest powered off (`poweroff`: ACPI S5) or rebooted (`reboot`: the i8042 reset
       line with reboot=k, or the ACPI reset register)
  1    ember failed while the VM ran (a KVM or host error)
  2    bad command line or configuration; nothing was started
  3    the guest triple-faulted (CPU shutdown)
  4    the guest kernel panicked (its panic message was seen on the console)
  5    KVM could not emulate a guest instruction (RIP, bytes and symbol are printed)
  6    stopped by SIGTERM/SIGINT; the guest shut down cleanly within --shutdown-timeout
       (ember pressed its ACPI power button)
  7    stopped by a signal; the guest was stopped hard (it did not shut down in time, it
       has no ACPI power button, or a second signal came)";

/// ember: a fast, small microVM monitor on Linux KVM.
#[derive(Debug, Parser)]
#[command(name = "ember", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
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
    /// Give the guest no ACPI tables (and `acpi=off` on its command line): it then finds its
    /// CPUs through the MP table, cannot power off (only reboot), and has no power button for
    /// a graceful stop.
    #[arg(long)]
    pub no_acpi: bool,
    /// After SIGTERM (or SIGINT), how long the guest gets to shut down after ember pressed
    /// its power button before it is stopped hard. Default: 30 on PVM hosts (guest kernel
    /// code is emulated there), 5 otherwise.
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,
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
        c.acpi = !self.no_acpi;
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
        let Command::Run(a) = cli.command;
        let c = a.to_config().unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.mem_mib, 128);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(c.host_tuning);
        assert!(c.acpi);
        assert_eq!(a.shutdown_timeout, None);
    }

    #[test]
    fn acpi_and_shutdown_flags() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--no-acpi",
            "--shutdown-timeout",
            "2",
        ]);
        let Command::Run(a) = cli.unwrap().command;
        assert_eq!(a.shutdown_timeout, Some(2));
        assert!(!a.to_config().unwrap().acpi);
        assert!(parse(&["run", "--kernel", "/k", "--shutdown-timeout", "-1"]).is_err());
    }

    #[test]
    fn run_flags() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--vcpus",
            "2",
            "--mem",
            "256",
            "--cmdline",
            "console=ttyS0",
            "--append",
            "quiet",
            "--no-host-tuning",
        ])
        .unwrap();
        let Command::Run(a) = cli.command;
        let c = a.to_config().unwrap();
        assert_eq!((c.vcpus, c.mem_mib), (2, 256));
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!(c.initrd.as_deref(), Some(std::path::Path::new("/i")));
        assert!(!c.host_tuning);
    }

    #[test]
    fn rejects_bad_numbers() {
        assert!(parse(&["run", "--kernel", "/k", "--vcpus", "-1"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--mem", "lots"]).is_err());
        assert!(parse(&["run", "--bogus"]).is_err());
    }
}
