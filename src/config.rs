// SPDX-License-Identifier: Apache-2.0
//! The VM configuration: what the CLI (or, later, a config file or API) asks for, validated
//! before anything is created.

use std::path::{Path, PathBuf};

use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::rate_limiter::BucketConfig;
use crate::devices::virtio::rng::RngConfig;
use crate::devices::virtio::vsock::VsockConfig;
use crate::image_file::ImageCache;

/// The command line a guest gets when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Switches added to the command line when ember boots its own default guest (no --kernel):
/// the guest profiler showed they save boot time (docs/profile.md): `quiet` (no kernel log on
/// the console), `rodata=off` (no read-only remapping of kernel data, 5% of the boot) and
/// `retain_initrd` (the initrd's memory is not handed back page by page), and
/// `random.trust_cpu=on` (RDRAND seeds the kernel's random generator at once; until it is
/// seeded, every random number rehashes the entropy pool: 5% of the boot), and
/// `noreplace-smp` (a one-CPU guest does not rewrite every LOCK prefix of its kernel text
/// through text_poke: 3-4% of the boot, about 2.5 s, where kernel code is emulated).
pub const DEFAULT_GUEST_TUNING: &str =
    "quiet rodata=off retain_initrd random.trust_cpu=on noreplace-smp";
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

/// How a disk's writes reach the host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum CacheMode {
    /// Through the host page cache; a guest FLUSH calls fdatasync (default).
    #[default]
    Writeback,
    /// O_DIRECT, bypassing the host page cache (needs a host file system with direct I/O);
    /// a guest FLUSH still calls fdatasync.
    None,
}

/// One `--disk`: a raw image file given to the guest as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// The guest may only read (the device offers VIRTIO_BLK_F_RO; writes fail).
    pub read_only: bool,
    /// Serial the guest reads with GET_ID (/sys/block/vdX/serial), at most 20 bytes.
    pub id: Option<String>,
    /// Host caching.
    pub cache: CacheMode,
    /// Bandwidth limit in bytes per second (data of reads and writes), `bw=` and `bw_burst=`;
    /// `None`: unlimited.
    pub bw: Option<BucketConfig>,
    /// Request limit in requests per second, `iops=` and `iops_burst=`; `None`: unlimited.
    pub iops: Option<BucketConfig>,
}

impl DiskConfig {
    /// The `--disk` syntax.
    pub const SYNTAX: &'static str = "PATH[,ro][,id=NAME][,cache=none|writeback]\
        [,bw=BYTES_PER_SEC[,bw_burst=BYTES]][,iops=N[,iops_burst=N]]";

    /// A writable, write-back, unlimited disk on `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            id: None,
            cache: CacheMode::Writeback,
            bw: None,
            iops: None,
        }
    }

    /// Checks what can be checked without opening the image for real: it exists, it is a
    /// file or block device, it can be read, and the ID fits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| self.error(&io_why(&e)))?;
        if meta.is_dir() {
            return Err(self.error("is a directory, not a disk image"));
        }
        let kind = crate::user_file::Kind::RegularOrBlockDevice;
        crate::user_file::open(&self.path, !self.read_only, 0, kind).map_err(|e| {
            let why = io_why(&e);
            if self.read_only || e.kind() == std::io::ErrorKind::InvalidInput {
                self.error(&why)
            } else {
                self.error(&format!(
                    "{why} (opening it read-write; add ,ro for a read-only disk)"
                ))
            }
        })?;
        if let Some(id) = &self.id {
            if id.len() > 20 || !id.is_ascii() {
                return Err(ConfigError::Device(format!(
                    "--disk {}: id={id:?} must be at most 20 ASCII characters",
                    self.path.display()
                )));
            }
        }
        Ok(())
    }

    fn error(&self, why: &str) -> ConfigError {
        ConfigError::Device(format!("--disk {}: {why}", self.path.display()))
    }
}

fn io_why(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses [`DiskConfig::SYNTAX`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| {
            ConfigError::Device(format!(
                "--disk {s:?}: {why}; the syntax is {}",
                DiskConfig::SYNTAX
            ))
        };
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("no image path".into()));
        }
        let mut disk = DiskConfig::new(path);
        let mut limits = RateOptions::default();
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => disk.read_only = true,
                None if opt == "rw" => disk.read_only = false,
                Some(("id", v)) if !v.is_empty() => disk.id = Some(v.to_string()),
                Some(("cache", "none")) => disk.cache = CacheMode::None,
                Some(("cache", "writeback")) => disk.cache = CacheMode::Writeback,
                Some(("cache", v)) => {
                    return Err(bad(format!("unknown cache mode {v:?} (none or writeback)")))
                }
                Some((k @ ("bw" | "bw_burst" | "iops" | "iops_burst"), v)) => {
                    limits.set(k, v).map_err(bad)?;
                }
                _ => return Err(bad(format!("unknown option {opt:?}"))),
            }
        }
        disk.bw = limits.bucket("bw", "bw_burst").map_err(bad)?;
        disk.iops = limits.bucket("iops", "iops_burst").map_err(bad)?;
        Ok(disk)
    }
}

/// Where a serial port's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ConsoleSink {
    /// ember's stdout.
    #[default]
    Stdout,
    /// ember's stderr.
    Stderr,
    /// Discarded.
    Null,
}

/// [`VmConfig::vm_generation_id`] of snapshots written before the field existed: they all
/// had one (with ACPI).
fn generation_id_by_default() -> bool {
    true
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Block devices, in order: the first is /dev/vda in the guest, then vdb, ...
    pub disks: Vec<DiskConfig>,
    /// Root device for the guest (`root=`), e.g. `/dev/vda`; adds `root=.. rootfstype=ext4
    /// rw` (or `ro` for a read-only disk) to the command line. When it is the tag of one of
    /// [`shares`](Self::shares) (`--root-share`: [`ROOT_SHARE_TAG`]), that share is the root
    /// file system: `root=TAG rootfstype=virtiofs rw` (see [`Self::root_cmdline`]).
    pub root: Option<String>,
    /// virtio-net devices, one per TAP (`--net`).
    pub net: Vec<NetConfig>,
    /// The virtio-vsock device (`--vsock`).
    pub vsock: Option<VsockConfig>,
    /// The virtio-rng device (on unless `--no-rng`).
    pub rng: Option<RngConfig>,
    /// Host directories exported to the guest over virtio-fs (`--share`), one device each,
    /// in order.
    pub shares: Vec<ShareConfig>,
    /// Give the guest ACPI tables and the ACPI platform (power off, reset, power button).
    pub acpi: bool,
    /// With ACPI, give the guest a VM generation ID ([`crate::devices::vmgenid`]): how a
    /// guest learns that it runs from a snapshot once more (Linux then reseeds its random
    /// number generator), so a VM that may be snapshotted needs it, and one that never can
    /// has no use for it. On a PVM host the device costs the guest ~0.1 s of boot (its ACPI
    /// device, platform device and driver probe), so `ember run` gives it only with
    /// `--snapshot-to` and `ember exec` only on its warm path. On in [`VmConfig::new`] (an
    /// API-driven VM may be snapshotted at any time) and in snapshots written before this
    /// field existed.
    #[serde(default = "generation_id_by_default")]
    pub vm_generation_id: bool,
    /// Where kernel and initrd copies are kept to be mapped into guest memory instead of
    /// copied (see [`crate::image_file`]); `None` copies them.
    pub image_cache: Option<ImageCache>,
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
            disks: Vec::new(),
            root: None,
            net: Vec::new(),
            vsock: None,
            rng: Some(RngConfig::default()),
            shares: Vec::new(),
            acpi: true,
            vm_generation_id: true,
            image_cache: ImageCache::from_env(),
        }
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Checks everything that can be checked without KVM: files, sizes, counts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_without_images()?;
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
        self.root_share_init()?;
        Ok(())
    }

    /// Everything [`validate`](Self::validate) checks but the kernel and initrd files: what a
    /// VM restored from a snapshot needs (its memory holds kernel and initrd).
    pub fn validate_without_images(&self) -> Result<(), ConfigError> {
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
        for d in &self.disks {
            d.validate()?;
        }
        if let Some(root) = &self.root {
            self.root_disk(root)?;
        }
        NetConfig::validate_all(&self.net)?;
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        if let Some(r) = &self.rng {
            r.validate()?;
        }
        if let Some(s) = self.root_share() {
            match std::fs::metadata(&s.dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ConfigError::Device(format!(
                        "--root-share {}: not a directory (give the directory that holds the \
                         guest's root file system)",
                        s.dir.display()
                    )))
                }
                Err(e) => {
                    return Err(ConfigError::Device(format!(
                        "--root-share {}: {} (give the directory that holds the guest's root \
                         file system)",
                        s.dir.display(),
                        io_why(&e)
                    )))
                }
            }
        }
        ShareConfig::validate_all(&self.shares)?;
        Ok(())
    }

    /// The guest name of disk `index` (0 -> `vda`, 25 -> `vdz`, 26 -> `vdaa`), as Linux's
    /// virtio_blk names disks in probe order.
    pub fn disk_name(index: usize) -> String {
        let mut n = index;
        let mut suffix = Vec::new();
        loop {
            suffix.push(b'a' + (n % 26) as u8);
            if n < 26 {
                break;
            }
            n = n / 26 - 1;
        }
        suffix.reverse();
        format!("vd{}", String::from_utf8_lossy(&suffix))
    }

    /// The disk `root` names when it is `/dev/vdX` (None for other root specifications such
    /// as `PARTUUID=...`, which are passed on as they are).
    pub fn root_disk(&self, root: &str) -> Result<Option<&DiskConfig>, ConfigError> {
        let Some(name) = root.strip_prefix("/dev/") else {
            return Ok(None);
        };
        // A partition (vda1) has no separate --disk; look its disk up.
        let disk_name = name.trim_end_matches(|c: char| c.is_ascii_digit());
        if !disk_name.starts_with("vd") {
            return Ok(None);
        }
        (0..self.disks.len())
            .find(|&i| Self::disk_name(i) == disk_name)
            .map(|i| Some(&self.disks[i]))
            .ok_or_else(|| {
                ConfigError::Device(format!(
                    "--root {root}: there is no such disk ({} --disk given; the first is \
                     /dev/vda)",
                    self.disks.len()
                ))
            })
    }

    /// The share [`root`](Self::root) names by its tag (`--root-share`): the guest's root
    /// file system, mounted by the kernel over virtio-fs. `None` for a disk root.
    pub fn root_share(&self) -> Option<&ShareConfig> {
        let root = self.root.as_deref()?;
        if root.starts_with("/dev/") {
            return None;
        }
        self.shares
            .iter()
            .enumerate()
            .find(|(i, s)| s.tag(*i) == root)
            .map(|(_, s)| s)
    }

    /// The program the kernel must be told to run from a root share: `Some("/init")` when
    /// the directory has an /init (what an initramfs runs; the kernel itself only looks for
    /// /sbin/init, /etc/init, /bin/init and /bin/sh on a root file system), `None` when the
    /// command line names one with `init=` (it must exist in the directory) or the kernel
    /// finds /sbin/init, or when the root is no share. An error names the paths looked for.
    pub fn root_share_init(&self) -> Result<Option<&'static str>, ConfigError> {
        let Some(share) = self.root_share() else {
            return Ok(None);
        };
        let dir = &share.dir;
        let path = |p: &str| dir.join(p.trim_start_matches('/'));
        // symlink_metadata: a symbolic link is resolved by the guest, in its own root (an
        // absolute /sbin/init -> /bin/busybox names the directory's busybox, not the host's).
        let exists = |p: &str| std::fs::symlink_metadata(path(p)).is_ok();
        if let Some(init) = crate::host::param_value(&self.cmdline, "init") {
            if !init.trim_start_matches('/').is_empty() && exists(init) {
                return Ok(None);
            }
            return Err(ConfigError::Device(format!(
                "--root-share {}: init={init} names {}, which does not exist (init= is a path \
                 inside the shared directory)",
                dir.display(),
                path(init).display()
            )));
        }
        if exists("init") {
            return Ok(Some("/init"));
        }
        if exists("sbin/init") {
            return Ok(None);
        }
        Err(ConfigError::Device(format!(
            "--root-share {}: no init to run: neither {} nor {} exists (share a root file \
             system, or name its init program with --append init=/PATH)",
            dir.display(),
            path("init").display(),
            path("sbin/init").display()
        )))
    }

    /// The command-line words `--root` adds: `root=R rootfstype=ext4 rw` (`ro` when the root
    /// disk is read-only); for a root share `root=TAG rootfstype=virtiofs rw` (`ro` for a
    /// read-only share), and `init=/init` when [`Self::root_share_init`] says so.
    pub fn root_cmdline(&self) -> Option<String> {
        let root = self.root.as_deref()?;
        if let Some(share) = self.root_share() {
            let mut words = format!(
                "root={root} rootfstype=virtiofs {}",
                if share.readonly { "ro" } else { "rw" }
            );
            if let Ok(Some(init)) = self.root_share_init() {
                words.push_str(" init=");
                words.push_str(init);
            }
            return Some(words);
        }
        let ro = matches!(self.root_disk(root), Ok(Some(d)) if d.read_only);
        Some(format!(
            "root={root} rootfstype=ext4 {}",
            if ro { "ro" } else { "rw" }
        ))
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

/// The guest-side caching of a `--share` (virtiofsd's `--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ShareCache {
    /// Cache data and metadata for a short while (the default): right for a directory the
    /// host may change while the guest runs.
    #[default]
    Auto,
    /// Cache everything until the guest drops it: fastest, for a directory only the guest
    /// changes.
    Always,
    /// No caching: every access goes to the host.
    Never,
}

impl ShareCache {
    /// The name used by `cache=` (and by virtiofsd's `--cache`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Always => "always",
            Self::Never => "never",
        }
    }
}

/// `--share HOST_DIR[,tag=NAME][,ro][,cache=auto|always|never]`: a host directory exported
/// to the guest over virtio-fs (`mount -t virtiofs TAG /mnt` in the guest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareConfig {
    /// The host directory.
    pub dir: PathBuf,
    /// The mount tag; `None`: `share0`, `share1`, ... by position (see [`Self::tag`]).
    pub tag: Option<String>,
    /// Read-only: refused by the host side (virtiofsd `--readonly`), whatever the guest does.
    pub readonly: bool,
    /// Guest caching.
    pub cache: ShareCache,
}

/// Longest mount tag: the virtio-fs configuration space has 36 bytes for it.
pub const MAX_SHARE_TAG: usize = 36;

/// The mount tag of the `--root-share` share (`root=rootfs rootfstype=virtiofs`).
pub const ROOT_SHARE_TAG: &str = "rootfs";

impl ShareConfig {
    /// Syntax help for `--share`.
    pub const SYNTAX: &'static str = "HOST_DIR[,tag=NAME][,ro][,cache=auto|always|never]";

    /// A read-write share of `dir` with the default tag and caching.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            tag: None,
            readonly: false,
            cache: ShareCache::Auto,
        }
    }

    /// Syntax help for `--root-share`.
    pub const ROOT_SYNTAX: &'static str = "DIR[,ro]";

    /// Parses `--root-share DIR[,ro]`: a share with the tag [`ROOT_SHARE_TAG`].
    pub fn parse_root(s: &str) -> Result<Self, ConfigError> {
        let syntax = Self::ROOT_SYNTAX;
        let mut parts = s.split(',');
        let dir = parts.next().unwrap_or_default();
        if dir.is_empty() || dir.contains('=') {
            return Err(ConfigError::Device(format!(
                "--root-share {s:?}: the host directory comes first (syntax: {syntax})"
            )));
        }
        let mut c = Self::new(dir);
        c.tag = Some(ROOT_SHARE_TAG.to_string());
        for part in parts.filter(|p| !p.is_empty()) {
            match part {
                "ro" => c.readonly = true,
                _ => {
                    return Err(ConfigError::Device(format!(
                        "--root-share {s:?}: unknown option {part:?} (syntax: {syntax})"
                    )))
                }
            }
        }
        Ok(c)
    }

    /// The mount tag of the share at position `index` of [`VmConfig::shares`].
    pub fn tag(&self, index: usize) -> String {
        self.tag.clone().unwrap_or_else(|| format!("share{index}"))
    }

    /// Checks every share: an existing directory each, valid and distinct tags.
    pub fn validate_all(shares: &[ShareConfig]) -> Result<(), ConfigError> {
        let mut tags: Vec<String> = Vec::new();
        for (i, s) in shares.iter().enumerate() {
            let tag = s.tag(i);
            if tag.is_empty() || tag.len() > MAX_SHARE_TAG || tag.contains(['\0', ',', ' ']) {
                return Err(ConfigError::Device(format!(
                    "--share tag={tag:?}: a tag must be 1 to {MAX_SHARE_TAG} bytes without \
                     spaces or commas"
                )));
            }
            if tags.contains(&tag) {
                return Err(ConfigError::Device(format!(
                    "--share: two shares have the tag {tag:?}; give each its own tag=NAME"
                )));
            }
            tags.push(tag);
            match std::fs::metadata(&s.dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ConfigError::Device(format!(
                        "--share {}: not a directory (share the directory that holds it)",
                        s.dir.display()
                    )))
                }
                Err(e) => {
                    return Err(ConfigError::Device(format!(
                        "--share {}: {}",
                        s.dir.display(),
                        io_why(&e)
                    )))
                }
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for ShareConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = Self::SYNTAX;
        let mut parts = s.split(',');
        let dir = parts.next().unwrap_or_default();
        if dir.is_empty() || dir.contains('=') {
            return Err(ConfigError::Device(format!(
                "--share {s:?}: the host directory comes first (syntax: {syntax})"
            )));
        }
        let mut c = Self::new(dir);
        let mut seen: Vec<&str> = Vec::new();
        for part in parts.filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            if seen.contains(&k) {
                return Err(ConfigError::Device(format!(
                    "--share {s:?}: {k} is given twice"
                )));
            }
            seen.push(k);
            match (k, v) {
                ("tag", t) => c.tag = Some(t.to_string()),
                ("ro", "") => c.readonly = true,
                ("cache", "auto") => c.cache = ShareCache::Auto,
                ("cache", "always") => c.cache = ShareCache::Always,
                ("cache", "never") => c.cache = ShareCache::Never,
                ("cache", v) => {
                    return Err(ConfigError::Device(format!(
                        "--share cache={v:?}: use cache=auto, cache=always or cache=never"
                    )))
                }
                _ => {
                    return Err(ConfigError::Device(format!(
                        "--share {s:?}: unknown option {part:?} (syntax: {syntax})"
                    )))
                }
            }
        }
        Ok(c)
    }
}

/// Checks that `path` is a readable regular file (never blocking on a FIFO: see
/// [`crate::user_file`]).
pub fn check_readable(path: &Path) -> Result<(), String> {
    crate::user_file::open_regular(path).map_err(|e| io_why(&e))?;
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

/// A size or rate: `123`, `64K`, `10M`, `1G` (binary multiples); `None` when it is not one
/// or does not fit 64 bits.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The rate-limit options of one device option string (`bw=`/`bw_burst=`, `iops=`/...,
/// `rx=`/`rx_burst=`, `tx=`/...), collected by key, then turned into [`BucketConfig`]s.
#[derive(Debug, Default)]
pub struct RateOptions(Vec<(String, u64)>);

impl RateOptions {
    /// Records `key=value`; refuses a value that is not a size, a zero, or a key given twice.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let n = parse_size(value).ok_or_else(|| {
            format!("{key}={value:?} is not a number (with an optional K, M or G suffix)")
        })?;
        if n == 0 {
            let what = if key.ends_with("_burst") {
                format!("{key}=0: a burst must be at least 1")
            } else {
                format!("{key}=0 would stop the device; leave {key}= out for no limit")
            };
            return Err(what);
        }
        if self.0.iter().any(|(k, _)| k == key) {
            return Err(format!("{key}= given twice"));
        }
        self.0.push((key.to_string(), n));
        Ok(())
    }

    fn get(&self, key: &str) -> Option<u64> {
        self.0.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
    }

    /// The limit that `rate=` (and `burst=`) give: `None` without `rate=`; a burst alone is
    /// refused.
    pub fn bucket(&self, rate: &str, burst: &str) -> Result<Option<BucketConfig>, String> {
        match (self.get(rate), self.get(burst)) {
            (Some(r), b) => Ok(Some(BucketConfig::new(r, b))),
            (None, Some(_)) => Err(format!("{burst}= needs {rate}=")),
            (None, None) => Ok(None),
        }
    }
}

/// Splits a device option string `key=value,key=value` for `flag` (e.g. `--net`), allowing
/// only `keys`, each at most once. Values may not contain commas.
pub fn parse_options<'a>(
    s: &'a str,
    flag: &str,
    syntax: &str,
    keys: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            ConfigError::Device(format!(
                "{flag} {s:?}: {part:?} is not key=value (syntax: {syntax})"
            ))
        })?;
        if !keys.contains(&k) {
            return Err(ConfigError::Device(format!(
                "{flag} {s:?}: unknown option {k:?} (syntax: {syntax})"
            )));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ConfigError::Device(format!(
                "{flag} {s:?}: {k}= given twice"
            )));
        }
        out.push((k, v));
    }
    Ok(out)
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
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(c.cmdline.starts_with("console=ttyS0 reboot=k panic=-1"));
    }

    #[test]
    fn disk_syntax() {
        let d: DiskConfig = "/img".parse().unwrap();
        assert_eq!(d, DiskConfig::new("/img"));
        // A comma ends the path: "b.img" is not an option.
        assert!("/a,b.img,ro".parse::<DiskConfig>().is_err());
        let d: DiskConfig = "/img,ro,id=data,cache=none".parse().unwrap();
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("data"));
        assert_eq!(d.cache, CacheMode::None);
        for bad in ["", ",ro", "/img,rx", "/img,cache=always", "/img,id="] {
            let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.contains(DiskConfig::SYNTAX), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_rate_limits() {
        assert_eq!(DiskConfig::new("/img").bw, None);
        let d: DiskConfig = "/img,bw=10M,iops=500,ro".parse().unwrap();
        assert_eq!(d.bw, Some(BucketConfig::new(10 << 20, Some(1 << 20))));
        assert_eq!(d.iops, Some(BucketConfig::new(500, Some(50))));
        assert!(d.read_only);
        let d: DiskConfig = "/img,iops=5,iops_burst=32,bw=4096,bw_burst=1k"
            .parse()
            .unwrap();
        assert_eq!(d.iops, Some(BucketConfig { rate: 5, burst: 32 }));
        assert_eq!(
            d.bw,
            Some(BucketConfig {
                rate: 4096,
                burst: 1024
            })
        );
        // A tiny rate still lets one request through at a time.
        let d: DiskConfig = "/img,iops=3".parse().unwrap();
        assert_eq!(d.iops, Some(BucketConfig { rate: 3, burst: 1 }));
        let e = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
        assert!(e("/img,bw=0").contains("bw=0 would stop the device"));
        assert!(e("/img,bw=1M,bw_burst=0").contains("at least 1"));
        assert!(e("/img,bw=fast").contains("\"fast\" is not a number"));
        assert!(e("/img,bw=99999999999G").contains("not a number"));
        assert!(e("/img,bw_burst=1M").contains("bw_burst= needs bw="));
        assert!(e("/img,iops=1,iops=2").contains("given twice"));
        assert!(e("/img,rx=1M").contains("unknown option"));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
    }

    #[test]
    fn disk_validation_and_root() {
        let p = std::env::temp_dir().join(format!("ember-cfg-disk-{}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let mut c = VmConfig::new(&p);
        c.disks = vec![DiskConfig::new("/nonexistent.img")];
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent.img") && e.contains("no such file"),
            "{e}"
        );
        c.disks = vec![
            DiskConfig::new(&p),
            DiskConfig {
                read_only: true,
                ..DiskConfig::new(&p)
            },
        ];
        assert_eq!(c.validate(), Ok(()));
        c.root = Some("/dev/vdb".into());
        assert_eq!(
            c.root_cmdline().unwrap(),
            "root=/dev/vdb rootfstype=ext4 ro"
        );
        c.root = Some("/dev/vda".into());
        assert_eq!(
            c.root_cmdline().unwrap(),
            "root=/dev/vda rootfstype=ext4 rw"
        );
        c.root = Some("/dev/vdc".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no such disk"));
        c.root = Some("PARTUUID=1234".into());
        assert_eq!(c.validate(), Ok(()));
        c.disks[0].id = Some("x".repeat(21));
        assert!(c.validate().is_err());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn disk_names_follow_linux() {
        assert_eq!(VmConfig::disk_name(0), "vda");
        assert_eq!(VmConfig::disk_name(25), "vdz");
        assert_eq!(VmConfig::disk_name(26), "vdaa");
        assert_eq!(VmConfig::disk_name(27), "vdab");
        assert_eq!(VmConfig::disk_name(52), "vdba");
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

    #[test]
    fn share_parsing_and_validation() {
        let s: ShareConfig = "/srv/d,tag=src,ro,cache=never".parse().unwrap();
        assert_eq!(s.dir, PathBuf::from("/srv/d"));
        assert_eq!(s.tag.as_deref(), Some("src"));
        assert!(s.readonly);
        assert_eq!(s.cache, ShareCache::Never);
        let d: ShareConfig = "/srv/d".parse().unwrap();
        assert_eq!(
            (d.tag(1), d.readonly, d.cache),
            ("share1".into(), false, ShareCache::Auto)
        );
        for bad in [
            "",
            "tag=x",
            "/d,cache=sometimes",
            "/d,rw",
            "/d,ro,ro",
            "/d,ro=1",
        ] {
            assert!(bad.parse::<ShareConfig>().is_err(), "{bad:?} accepted");
        }
        let dir = std::env::temp_dir();
        let ok = ShareConfig::new(&dir);
        assert!(ShareConfig::validate_all(&[ok.clone(), ok.clone()]).is_ok());
        let mut same = ok.clone();
        same.tag = Some("share0".into());
        let e = ShareConfig::validate_all(&[ok.clone(), same]).unwrap_err();
        assert!(e.to_string().contains("two shares"), "{e}");
        let mut long = ok.clone();
        long.tag = Some("x".repeat(37));
        assert!(ShareConfig::validate_all(&[long]).is_err());
        let missing = ShareConfig::new("/nonexistent/ember-share");
        let e = ShareConfig::validate_all(&[missing]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ember-share"), "{e}");
    }

    #[test]
    fn root_share_cmdline_and_refusals() {
        let base = std::env::temp_dir().join(format!("ember-cfg-rootshare-{}", std::process::id()));
        let dir = base.join("root");
        std::fs::create_dir_all(dir.join("sbin")).unwrap();
        let kernel = base.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let mut c = VmConfig::new(&kernel);
        c.shares = vec![
            ShareConfig::parse_root(dir.to_str().unwrap()).unwrap(),
            ShareConfig::new(&base),
        ];
        c.root = Some(ROOT_SHARE_TAG.into());
        assert_eq!(c.root_share(), Some(&c.shares[0]));

        // No init: refused, naming both paths looked for and init=.
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("{}/init", dir.display())), "{e}");
        assert!(e.contains(&format!("{}/sbin/init", dir.display())), "{e}");
        assert!(e.contains("init=/PATH"), "{e}");

        // /sbin/init (a dangling symbolic link counts: the guest resolves it in its root):
        // the kernel finds it itself.
        std::os::unix::fs::symlink("/bin/busybox-not-on-host", dir.join("sbin/init")).unwrap();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.root_cmdline().unwrap(),
            "root=rootfs rootfstype=virtiofs rw"
        );
        // /init wins, as in an initramfs: the kernel would not look for it.
        std::fs::write(dir.join("init"), b"#!/bin/sh\n").unwrap();
        assert_eq!(c.root_share_init(), Ok(Some("/init")));
        assert_eq!(
            c.root_cmdline().unwrap(),
            "root=rootfs rootfstype=virtiofs rw init=/init"
        );
        // init= on the command line is the user's choice, when the directory has it.
        c.cmdline.push_str(" init=/sbin/init");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.root_cmdline().unwrap(),
            "root=rootfs rootfstype=virtiofs rw"
        );
        c.cmdline.push_str(" init=/bin/missing");
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("init=/bin/missing") && e.contains("does not exist"),
            "{e}"
        );
        c.cmdline = DEFAULT_CMDLINE.to_string();

        // Read-only share: a read-only root.
        c.shares[0] = ShareConfig::parse_root(&format!("{},ro", dir.display())).unwrap();
        assert!(c.shares[0].readonly);
        assert_eq!(
            c.root_cmdline().unwrap(),
            "root=rootfs rootfstype=virtiofs ro init=/init"
        );

        // A missing directory is named as the root share's.
        c.shares[0] = ShareConfig::parse_root("/nonexistent/ember-root").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("--root-share /nonexistent/ember-root: no such file"),
            "{e}"
        );
        c.shares[0] = ShareConfig::parse_root(kernel.to_str().unwrap()).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");

        // A disk root is no share, whatever the tags.
        c.root = Some("/dev/vda".into());
        assert_eq!(c.root_share(), None);

        for bad in ["", ",ro", "/d,tag=x", "/d,rw", "tag=x"] {
            let e = ShareConfig::parse_root(bad).unwrap_err().to_string();
            assert!(e.contains(ShareConfig::ROOT_SYNTAX), "{bad:?}: {e}");
        }
        std::fs::remove_dir_all(base).unwrap();
    }
}
