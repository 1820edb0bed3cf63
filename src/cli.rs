// SPDX-License-Identifier: Apache-2.0
//! The command line: `ember run` boots a kernel with the console on this terminal. Each
//! subcommand turns its flags into a [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{default_guest_dir, ConfigError, DiskConfig, VmConfig, DEFAULT_CMDLINE};
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::rng::RngConfig;
use crate::devices::virtio::vsock::VsockConfig;

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
    /// A raw disk image as a virtio-blk device (repeatable: /dev/vda, /dev/vdb, ... in
    /// order). `ro`: read-only (shared lock; guest writes fail). `id=NAME`: the serial the
    /// guest sees. `cache=none`: O_DIRECT; `cache=writeback` (default): host page cache. A
    /// guest flush calls fdatasync in both. A writable image is locked: a second VM cannot
    /// open it.
    #[arg(long, value_name = DiskConfig::SYNTAX)]
    pub disk: Vec<DiskConfig>,
    /// Boot from this device: adds `root=DEV rootfstype=ext4 rw` (`ro` for a read-only
    /// disk) to the command line, and with the default kernel leaves out the default
    /// initramfs (so the root file system's /sbin/init runs). Example: `--disk
    /// target/guest/rootfs.ext4 --root /dev/vda`.
    #[arg(long, value_name = "DEV")]
    pub root: Option<String>,
    /// A virtio-net NIC on a host TAP interface (repeatable): tap=NAME[,mac=XX:XX:XX:XX:XX:XX].
    /// The TAP is opened (or created, with CAP_NET_ADMIN); without mac= a stable address is
    /// derived from the host and TAP name. See docs/network.md.
    #[arg(long, value_name = NetConfig::SYNTAX, value_parser = parse_net)]
    pub net: Vec<NetConfig>,
    /// A virtio-vsock device: cid=N (3 or more),uds=PATH. Host programs connect to PATH and
    /// send `CONNECT <port>\n`; guest connections to host port P go to PATH_P.
    #[arg(long, value_name = VsockConfig::SYNTAX, value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// Rate limit of the virtio-rng device (on by default: 1 MiB/s, bursts of 64 KiB).
    #[arg(long, value_name = "rate=N[,burst=N]", value_parser = parse_rng, conflicts_with = "no_rng")]
    pub rng: Option<RngConfig>,
    /// No virtio-rng device.
    #[arg(long)]
    pub no_rng: bool,
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_rng(s: &str) -> Result<RngConfig, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

impl RunArgs {
    /// The VM configuration these flags describe.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let (kernel, initrd) = match &self.kernel {
            Some(k) => (k.clone(), self.initrd.clone()),
            None => {
                let dir = default_guest_dir().ok_or(ConfigError::NoDefaultGuest)?;
                // With --root the guest boots from disk, not from the default initramfs.
                let default_initrd =
                    Some(dir.join("initramfs.cpio")).filter(|p| p.is_file() && self.root.is_none());
                let initrd = self.initrd.clone().or(default_initrd);
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
        c.disks = self.disk.clone();
        c.root = self.root.clone();
        c.net = self.net.clone();
        c.vsock = self.vsock.clone();
        c.rng = if self.no_rng {
            None
        } else {
            Some(self.rng.unwrap_or_default())
        };
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
    fn disks_and_root() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--disk",
            "/a.img",
            "--disk",
            "/b.img,ro,id=b",
            "--root",
            "/dev/vda",
        ])
        .unwrap();
        let Command::Run(a) = cli.command;
        let c = a.to_config().unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, std::path::Path::new("/a.img"));
        assert!(!c.disks[0].read_only);
        assert!(c.disks[1].read_only);
        assert_eq!(c.disks[1].id.as_deref(), Some("b"));
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        let e = parse(&["run", "--kernel", "/k", "--disk", "/a.img,bogus"]).unwrap_err();
        assert!(e.to_string().contains("PATH[,ro]"), "{e}");
    }

    #[test]
    fn root_drops_the_default_initramfs() {
        let dir = std::env::temp_dir().join(format!("ember-cli-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), b"x").unwrap();
        std::fs::write(dir.join("initramfs.cpio"), b"x").unwrap();
        std::env::set_var("EMBER_GUEST_DIR", &dir);
        let Command::Run(a) = parse(&["run"]).unwrap().command;
        assert_eq!(
            a.to_config().unwrap().initrd,
            Some(dir.join("initramfs.cpio"))
        );
        let Command::Run(a) = parse(&["run", "--disk", "/r.img", "--root", "/dev/vda"])
            .unwrap()
            .command;
        let c = a.to_config().unwrap();
        assert_eq!(c.initrd, None);
        assert_eq!(c.kernel, dir.join("vmlinux"));
        // An explicit --initrd is kept.
        let Command::Run(a) = parse(&["run", "--root", "/dev/vda", "--initrd", "/i"])
            .unwrap()
            .command;
        assert_eq!(
            a.to_config().unwrap().initrd.as_deref(),
            Some(std::path::Path::new("/i"))
        );
        std::env::remove_var("EMBER_GUEST_DIR");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn device_flags() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "--net",
            "tap=tap0",
            "--net",
            "tap=tap1,mac=02:00:00:00:00:09",
            "--vsock",
            "cid=7,uds=/tmp/v.sock",
            "--rng",
            "rate=4K",
        ])
        .unwrap();
        let Command::Run(a) = cli.command;
        let c = a.to_config().unwrap();
        assert_eq!(c.net.len(), 2);
        assert_eq!(c.net[1].mac.unwrap().to_string(), "02:00:00:00:00:09");
        assert_eq!(c.vsock.as_ref().map(|v| v.cid), Some(7));
        assert_eq!(c.rng.map(|r| r.rate), Some(4096));
        let Command::Run(a) = parse(&["run", "--kernel", "/k", "--no-rng"])
            .unwrap()
            .command;
        assert_eq!(a.to_config().unwrap().rng, None);
        let Command::Run(a) = parse(&["run", "--kernel", "/k"]).unwrap().command;
        assert_eq!(a.to_config().unwrap().rng, Some(RngConfig::default()));
        // Bad values are refused by the parser, with the reason.
        let e = parse(&["run", "--kernel", "/k", "--net", "tap=t,mac=1:2"]).unwrap_err();
        assert!(e.to_string().contains("not a MAC"), "{e}");
        let e = parse(&["run", "--kernel", "/k", "--vsock", "cid=3"]).unwrap_err();
        assert!(e.to_string().contains("uds= is required"), "{e}");
        assert!(parse(&["run", "--kernel", "/k", "--rng", "rate=1", "--no-rng"]).is_err());
    }

    #[test]
    fn rejects_bad_numbers() {
        assert!(parse(&["run", "--kernel", "/k", "--vcpus", "-1"]).is_err());
        assert!(parse(&["run", "--kernel", "/k", "--mem", "lots"]).is_err());
        assert!(parse(&["run", "--bogus"]).is_err());
    }
}
