// SPDX-License-Identifier: Apache-2.0
//! The VM configuration: what the CLI (or, later, a config file or API) asks for, validated
//! before anything is created.

use std::path::{Path, PathBuf};

/// The command line a guest gets when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Smallest guest memory ember accepts, in MiB.
pub const MIN_MEM_MIB: u64 = 2;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--vcpus 0`.
    #[error("--vcpus must be at least 1")]
    ZeroVcpus,
    /// More vCPUs than KVM allows.
    #[error("--vcpus {asked} is more than this host's KVM allows ({max}); use at most {max}")]
    TooManyVcpus {
        /// Requested.
        asked: u32,
        /// The host's maximum.
        max: u32,
    },
    /// Too little memory.
    #[error("--mem {0} MiB is too small: the guest needs at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u64),
    /// More memory than the host has.
    #[error(
        "--mem {asked} MiB is more than this host can give ({available} MiB of RAM in all): \
         ask for less"
    )]
    MemTooLarge {
        /// Requested.
        asked: u64,
        /// Host RAM.
        available: u64,
    },
    /// The kernel path is missing or unreadable.
    #[error("kernel image {path}: {why} (check --kernel)")]
    Kernel {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The initrd path is missing or unreadable.
    #[error("initrd {path}: {why} (check --initrd)")]
    Initrd {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// No kernel given and no default guest built.
    #[error(
        "no --kernel given and the default guest is not built: run \
         `bash resources/guest/build.sh` in the ember source tree, or pass --kernel PATH"
    )]
    NoDefaultGuest,
    /// A device option is malformed or inconsistent.
    #[error("{0}")]
    Device(String),
}

/// Where a serial port's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsoleSink {
    /// ember's stdout.
    #[default]
    Stdout,
    /// ember's stderr.
    Stderr,
    /// Discarded.
    Null,
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Extra initramfs bytes appended after the initrd file (`ember exec`'s archive).
    pub initrd_append: Option<Vec<u8>>,
    /// Kernel command line (ember's own additions are appended).
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Apply the host's needs (PVM switches and CPUID filtering) automatically.
    pub host_tuning: bool,
    /// Log the boot-timer event.
    pub boot_timer: bool,
    /// Where COM1 (the console) goes.
    pub console: ConsoleSink,
    /// Where COM2 goes, when the guest has a second port (`ember exec`'s stderr).
    pub com2: Option<ConsoleSink>,
    /// Feed stdin to the console.
    pub stdin: bool,
    /// A status write to the exit device ends the VM (`ember exec`).
    pub exit_on_status: bool,
    /// Give the guest ACPI tables and the ACPI platform (power off, reset, power button).
    pub acpi: bool,
}

impl VmConfig {
    /// A configuration with every default and the given kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            initrd_append: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            host_tuning: true,
            boot_timer: false,
            console: ConsoleSink::Stdout,
            com2: None,
            stdin: true,
            exit_on_status: false,
            acpi: true,
        }
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Checks everything that can be checked without KVM: files, sizes, counts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::ZeroVcpus);
        }
        if self.vcpus > 254 {
            return Err(ConfigError::TooManyVcpus {
                asked: self.vcpus,
                max: 254,
            });
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(self.mem_mib));
        }
        if let Some(avail) = host_ram_mib() {
            if self.mem_mib > avail {
                return Err(ConfigError::MemTooLarge {
                    asked: self.mem_mib,
                    available: avail,
                });
            }
        }
        check_readable(&self.kernel).map_err(|why| ConfigError::Kernel {
            path: self.kernel.clone(),
            why,
        })?;
        if let Some(i) = &self.initrd {
            check_readable(i).map_err(|why| ConfigError::Initrd {
                path: i.clone(),
                why,
            })?;
        }
        Ok(())
    }

    /// Checks the vCPU count against the host's KVM limit.
    pub fn validate_vcpus(&self, max: usize) -> Result<(), ConfigError> {
        let max = u32::try_from(max).unwrap_or(u32::MAX).min(254);
        if self.vcpus > max {
            return Err(ConfigError::TooManyVcpus {
                asked: self.vcpus,
                max,
            });
        }
        Ok(())
    }
}

/// Checks that `path` is a readable regular file.
pub fn check_readable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    })?;
    if meta.is_dir() {
        return Err("is a directory, not a file".into());
    }
    std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    })?;
    Ok(())
}

/// Total host RAM in MiB (from /proc/meminfo).
pub fn host_ram_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The default guest ember looks for when no --kernel is given: `$EMBER_GUEST_DIR`, then
/// `target/guest` next to the running binary (`target/release/ember` -> `target/guest`),
/// then `./target/guest`.
pub fn default_guest_dir() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("EMBER_GUEST_DIR") {
        candidates.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(target) = exe.parent().and_then(Path::parent) {
            candidates.push(target.join("guest"));
        }
    }
    candidates.push(PathBuf::from("target/guest"));
    candidates.into_iter().find(|d| d.join("vmlinux").is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_kernel() -> (VmConfig, PathBuf) {
        let p = std::env::temp_dir().join(format!("ember-cfg-{}", std::process::id()));
        std::fs::write(&p, b"\x7fELF").unwrap();
        (VmConfig::new(&p), p)
    }

    #[test]
    fn defaults() {
        let c = VmConfig::new("/k");
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.mem_mib, 128);
        assert_eq!(c.cmdline, "console=ttyS0 reboot=k panic=-1");
    }

    #[test]
    fn validation_messages() {
        let (mut c, p) = with_kernel();
        assert_eq!(c.validate(), Ok(()));
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroVcpus));
        c.vcpus = 1;
        c.mem_mib = 0;
        assert!(c.validate().unwrap_err().to_string().contains("too small"));
        c.mem_mib = 1 << 40;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("more than this host"));
        c.mem_mib = 64;
        c.initrd = Some("/nonexistent/initrd".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("no such file") && e.contains("--initrd"), "{e}");
        c.initrd = None;
        c.kernel = "/".into();
        assert!(c.validate().unwrap_err().to_string().contains("directory"));
        c.vcpus = 8;
        assert!(c
            .validate_vcpus(4)
            .unwrap_err()
            .to_string()
            .contains("at most 4"));
        std::fs::remove_file(p).unwrap();
    }
}
