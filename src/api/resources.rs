// SPDX-License-Identifier: Apache-2.0
//! The pre-boot resources set through Firecracker's API or config file, checked as each is
//! set, and turned into ember's one [`VmConfig`] at `InstanceStart` (where
//! [`VmConfig::validate`] checks the whole, as for the command line).

use std::path::PathBuf;

use super::model::{
    BootSource, Drive, Entropy, Logger, MachineConfig, MachineConfigUpdate, Metrics,
    NetworkInterface, PartialDrive, PartialNetworkInterface, RateLimiter, VmConfigFile, Vsock,
};
use crate::config::{DiskConfig, VmConfig};
use crate::devices::virtio::net::{MacAddr, NetConfig};
use crate::devices::virtio::rng::RngConfig;
use crate::devices::virtio::vsock::VsockConfig;

/// Most vCPUs the API accepts (Firecracker's limit).
pub const MAX_VCPUS: u8 = 32;

/// A request that cannot be carried out: the `fault_message` of a 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(msg.into()))
}

/// Everything set before the VM starts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmResources {
    /// `PUT /boot-source`.
    pub boot_source: Option<BootSource>,
    /// `PUT /machine-config` (defaults: 1 vCPU, 128 MiB).
    pub machine: MachineConfig,
    /// Drives in the order they were first put (the root drive is attached first).
    pub drives: Vec<Drive>,
    /// NICs in the order they were first put.
    pub nets: Vec<NetworkInterface>,
    /// `PUT /vsock`.
    pub vsock: Option<Vsock>,
    /// `PUT /entropy`: without it the guest has no virtio-rng (as under Firecracker).
    pub entropy: Option<Entropy>,
    /// `PUT /logger`.
    pub logger: Option<Logger>,
    /// `PUT /metrics`.
    pub metrics: Option<Metrics>,
}

fn check_path(what: &str, path: &str) -> Result<(), Refused> {
    if path.is_empty() {
        return refuse(format!("{what}: the path is empty"));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => refuse(format!("{what} {path} is not a regular file")),
        Err(e) => refuse(format!("{what} {path} cannot be opened: {e}")),
    }
}

fn check_limiter(what: &str, rl: Option<&RateLimiter>) -> Result<(), Refused> {
    for b in rl.iter().flat_map(|r| [r.bandwidth, r.ops]).flatten() {
        if b.size > 0 && b.refill_time == 0 {
            return refuse(format!(
                "{what}: a token bucket of size {} has refill_time 0 (give a refill time in \
                 milliseconds, or size 0 for no limit)",
                b.size
            ));
        }
    }
    Ok(())
}

impl VmResources {
    /// The resources of a `--config-file` document (each part checked as if it was PUT).
    pub fn from_file(doc: &VmConfigFile) -> Result<Self, Refused> {
        for (key, v) in [
            ("balloon", &doc.balloon),
            ("mmds-config", &doc.mmds_config),
            ("cpu-config", &doc.cpu_config),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return refuse(format!(
                    "\"{key}\" is not supported by ember (no balloon device, no MMDS, no \
                     custom CPU templates): remove it from the configuration"
                ));
            }
        }
        let mut r = Self::default();
        if let Some(b) = &doc.boot_source {
            r.set_boot_source(b.clone())?;
        }
        if let Some(m) = &doc.machine_config {
            r.set_machine_config(m.clone())?;
        }
        for d in &doc.drives {
            r.put_drive(&d.drive_id, d.clone())?;
        }
        for n in &doc.network_interfaces {
            r.put_net(&n.iface_id, n.clone())?;
        }
        if let Some(v) = &doc.vsock {
            r.set_vsock(v.clone())?;
        }
        if let Some(e) = &doc.entropy {
            r.set_entropy(e.clone())?;
        }
        r.logger = doc.logger.clone();
        r.metrics = doc.metrics.clone();
        Ok(r)
    }

    /// The document `GET /vm/config` answers.
    pub fn to_file(&self) -> VmConfigFile {
        VmConfigFile {
            boot_source: self.boot_source.clone(),
            machine_config: Some(self.machine.clone()),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            ..Default::default()
        }
    }

    /// The resources that describe `c` (a loaded snapshot's VM), for `GET /vm/config`: drives
    /// and NICs get IDs by position where ember has none (`drive0`, `net0`, ...).
    pub fn from_vm_config(c: &VmConfig) -> Self {
        Self {
            boot_source: Some(BootSource {
                kernel_image_path: c.kernel.display().to_string(),
                boot_args: Some(c.cmdline.clone()),
                initrd_path: c.initrd.as_ref().map(|p| p.display().to_string()),
            }),
            machine: MachineConfig {
                vcpu_count: u8::try_from(c.vcpus).unwrap_or(u8::MAX),
                mem_size_mib: c.mem_mib,
                ..Default::default()
            },
            drives: c
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| Drive {
                    drive_id: d.id.clone().unwrap_or_else(|| format!("drive{i}")),
                    path_on_host: Some(d.path.display().to_string()),
                    is_root_device: false,
                    is_read_only: Some(d.read_only),
                    ..Default::default()
                })
                .collect(),
            nets: c
                .net
                .iter()
                .enumerate()
                .map(|(i, n)| NetworkInterface {
                    iface_id: format!("net{i}"),
                    host_dev_name: n.tap.clone(),
                    guest_mac: Some(n.mac().to_string()),
                    ..Default::default()
                })
                .collect(),
            vsock: c.vsock.as_ref().map(|v| Vsock {
                guest_cid: u32::try_from(v.cid).unwrap_or(u32::MAX),
                uds_path: v.uds.display().to_string(),
                vsock_id: None,
            }),
            entropy: c.rng.as_ref().map(|_| Entropy::default()),
            logger: None,
            metrics: None,
        }
    }

    /// `PUT /boot-source`.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), Refused> {
        check_path("the kernel image", &b.kernel_image_path)?;
        if let Some(i) = &b.initrd_path {
            check_path("the initrd", i)?;
        }
        self.boot_source = Some(b);
        Ok(())
    }

    /// `PUT /machine-config`.
    pub fn set_machine_config(&mut self, m: MachineConfig) -> Result<(), Refused> {
        if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
            return refuse(format!(
                "vcpu_count {} is out of range: give 1 to {MAX_VCPUS}",
                m.vcpu_count
            ));
        }
        if m.mem_size_mib == 0 {
            return refuse("mem_size_mib must be at least 1");
        }
        if m.smt {
            return refuse(
                "smt: true is not supported by ember (each vCPU is a core of its own): set it \
                 to false",
            );
        }
        if let Some(t) = m.cpu_template.as_deref().filter(|t| *t != "None") {
            return refuse(format!(
                "cpu_template {t:?} is not supported by ember (it filters CPUID for the host \
                 by itself): leave it out or give \"None\""
            ));
        }
        if m.huge_pages != "None" {
            return refuse(format!(
                "huge_pages {:?} is not supported by ember: give \"None\"",
                m.huge_pages
            ));
        }
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn update_machine_config(&mut self, u: MachineConfigUpdate) -> Result<(), Refused> {
        let mut m = self.machine.clone();
        m.vcpu_count = u.vcpu_count.unwrap_or(m.vcpu_count);
        m.mem_size_mib = u.mem_size_mib.unwrap_or(m.mem_size_mib);
        m.smt = u.smt.unwrap_or(m.smt);
        m.track_dirty_pages = u.track_dirty_pages.unwrap_or(m.track_dirty_pages);
        if u.cpu_template.is_some() {
            m.cpu_template = u.cpu_template;
        }
        m.huge_pages = u.huge_pages.unwrap_or(m.huge_pages);
        self.set_machine_config(m)
    }

    /// `PUT /drives/{id}`: adds the drive, or replaces the one with its ID.
    pub fn put_drive(&mut self, id: &str, d: Drive) -> Result<(), Refused> {
        if d.drive_id != id {
            return refuse(format!(
                "the drive ID in the path ({id}) differs from drive_id in the body ({})",
                d.drive_id
            ));
        }
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return refuse(format!(
                "drive_id {id:?} is not valid: use letters, digits and _"
            ));
        }
        if d.socket.is_some() {
            return refuse(format!(
                "drive {id}: vhost-user block devices (\"socket\") are not supported by \
                 ember: give path_on_host"
            ));
        }
        let Some(path) = &d.path_on_host else {
            return refuse(format!("drive {id}: path_on_host is required"));
        };
        check_path(&format!("drive {id}: the image"), path)?;
        for (what, v, ok) in [
            ("cache_type", &d.cache_type, &["Unsafe", "Writeback"][..]),
            ("io_engine", &d.io_engine, &["Sync", "Async"][..]),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !ok.contains(v)) {
                return refuse(format!("drive {id}: {what} {v:?} is not one of {ok:?}"));
            }
        }
        check_limiter(&format!("drive {id}"), d.rate_limiter.as_ref())?;
        if d.is_root_device {
            if let Some(other) = self
                .drives
                .iter()
                .find(|o| o.is_root_device && o.drive_id != id)
            {
                return refuse(format!(
                    "drive {id}: drive {} is the root device already; only one can be",
                    other.drive_id
                ));
            }
        }
        match self.drives.iter_mut().find(|o| o.drive_id == id) {
            Some(o) => *o = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PATCH /drives/{id}` before the start: a new image or rate limiter.
    pub fn patch_drive(&mut self, id: &str, p: PartialDrive) -> Result<(), Refused> {
        if p.drive_id != id {
            return refuse(format!(
                "the drive ID in the path ({id}) differs from drive_id in the body ({})",
                p.drive_id
            ));
        }
        let Some(mut d) = self.drives.iter().find(|d| d.drive_id == id).cloned() else {
            return refuse(format!("drive {id} does not exist: PUT it first"));
        };
        if let Some(path) = p.path_on_host {
            d.path_on_host = Some(path);
        }
        if let Some(rl) = p.rate_limiter {
            d.rate_limiter = Some(rl);
        }
        self.put_drive(id, d)
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn put_net(&mut self, id: &str, n: NetworkInterface) -> Result<(), Refused> {
        if n.iface_id != id {
            return refuse(format!(
                "the interface ID in the path ({id}) differs from iface_id in the body ({})",
                n.iface_id
            ));
        }
        let mac = n
            .guest_mac
            .as_deref()
            .map(|m| {
                m.parse::<MacAddr>()
                    .map_err(|e| Refused(format!("interface {id}: guest_mac {m:?}: {e}")))
            })
            .transpose()?;
        for (dir, rl) in [("rx", &n.rx_rate_limiter), ("tx", &n.tx_rate_limiter)] {
            if rl.is_some_and(|r| r.ops.is_some()) {
                return refuse(format!(
                    "interface {id}: an ops bucket in {dir}_rate_limiter is not supported by \
                     ember (its NIC limits bytes): give a bandwidth bucket"
                ));
            }
        }
        let mut cfg = NetConfig::new(n.host_dev_name.clone());
        cfg.mac = mac;
        cfg.validate()
            .map_err(|e| Refused(format!("interface {id}: {e}")))?;
        check_limiter(&format!("interface {id} rx"), n.rx_rate_limiter.as_ref())?;
        check_limiter(&format!("interface {id} tx"), n.tx_rate_limiter.as_ref())?;
        for o in self.nets.iter().filter(|o| o.iface_id != id) {
            if o.host_dev_name == n.host_dev_name {
                return refuse(format!(
                    "interface {id}: TAP {} is used by interface {} already",
                    n.host_dev_name, o.iface_id
                ));
            }
            if n.guest_mac.is_some() && o.guest_mac == n.guest_mac {
                return refuse(format!(
                    "interface {id}: MAC {} is used by interface {} already",
                    n.guest_mac.as_deref().unwrap_or(""),
                    o.iface_id
                ));
            }
        }
        match self.nets.iter_mut().find(|o| o.iface_id == id) {
            Some(o) => *o = n,
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` before the start: new rate limiters.
    pub fn patch_net(&mut self, id: &str, p: PartialNetworkInterface) -> Result<(), Refused> {
        if p.iface_id != id {
            return refuse(format!(
                "the interface ID in the path ({id}) differs from iface_id in the body ({})",
                p.iface_id
            ));
        }
        let Some(mut n) = self.nets.iter().find(|n| n.iface_id == id).cloned() else {
            return refuse(format!("interface {id} does not exist: PUT it first"));
        };
        if p.rx_rate_limiter.is_some() {
            n.rx_rate_limiter = p.rx_rate_limiter;
        }
        if p.tx_rate_limiter.is_some() {
            n.tx_rate_limiter = p.tx_rate_limiter;
        }
        self.put_net(id, n)
    }

    /// `PUT /vsock`.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), Refused> {
        let cfg = VsockConfig {
            cid: u64::from(v.guest_cid),
            uds: PathBuf::from(&v.uds_path),
        };
        cfg.validate().map_err(|e| Refused(e.to_string()))?;
        self.vsock = Some(v);
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, e: Entropy) -> Result<(), Refused> {
        if e.rate_limiter.is_some_and(|r| r.ops.is_some()) {
            return refuse(
                "entropy: an ops rate limiter is not supported by ember's virtio-rng (it \
                 limits bytes): give a bandwidth bucket",
            );
        }
        check_limiter("entropy", e.rate_limiter.as_ref())?;
        self.entropy = Some(e);
        Ok(())
    }

    /// The VM these resources describe, checked as a whole by the caller
    /// ([`VmConfig::validate`]). Drives: the root drive first (`/dev/vda`, with `root=/dev/vda
    /// rw|ro` or `root=PARTUUID=... rw|ro` added to the command line, as Firecracker does),
    /// then the others in the order they were put; each drive's ID is its serial (what the
    /// guest reads as its ID).
    pub fn to_vm_config(&self) -> Result<VmConfig, Refused> {
        let Some(boot) = &self.boot_source else {
            return refuse(
                "no boot source: PUT /boot-source with kernel_image_path before InstanceStart",
            );
        };
        let mut c = VmConfig::new(&boot.kernel_image_path);
        c.initrd = boot.initrd_path.as_ref().map(PathBuf::from);
        if let Some(args) = &boot.boot_args {
            c.cmdline = args.clone();
        }
        c.vcpus = u32::from(self.machine.vcpu_count);
        c.mem_mib = self.machine.mem_size_mib;
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        for d in &drives {
            let mut disk = DiskConfig::new(d.path_on_host.as_deref().unwrap_or_default());
            disk.read_only = d.is_read_only.unwrap_or(false);
            let id: String = d.drive_id.chars().take(20).collect();
            disk.id = Some(id);
            disk.bw = d.rate_limiter.and_then(|r| r.bandwidth).and_then(bucket);
            disk.iops = d.rate_limiter.and_then(|r| r.ops).and_then(bucket);
            c.disks.push(disk);
            if d.is_root_device {
                let root = match &d.partuuid {
                    Some(u) => format!("PARTUUID={u}"),
                    None => "/dev/vda".to_string(),
                };
                let mode = if disk_ro(d) { "ro" } else { "rw" };
                c.cmdline = format!("{} root={root} {mode}", c.cmdline.trim_end());
            }
        }
        for n in &self.nets {
            let mut nic = NetConfig::new(n.host_dev_name.clone());
            nic.mac = n.guest_mac.as_deref().and_then(|m| m.parse().ok());
            nic.rx = n.rx_rate_limiter.and_then(|r| r.bandwidth).and_then(bucket);
            nic.tx = n.tx_rate_limiter.and_then(|r| r.bandwidth).and_then(bucket);
            c.net.push(nic);
        }
        c.vsock = self.vsock.as_ref().map(|v| VsockConfig {
            cid: u64::from(v.guest_cid),
            uds: PathBuf::from(&v.uds_path),
        });
        c.rng = self.entropy.as_ref().map(|e| {
            let bw = e.rate_limiter.and_then(|r| r.bandwidth);
            match bw.and_then(|b| b.per_second().map(|rate| (b, rate))) {
                Some((b, rate)) => RngConfig {
                    rate,
                    burst: b.size.saturating_add(b.one_time_burst.unwrap_or(0)),
                },
                None => RngConfig::default(),
            }
        });
        Ok(c)
    }
}

/// Firecracker's token bucket (`size` tokens every `refill_time` ms, plus a first
/// `one_time_burst`) as ember's rate and burst; `None` for a bucket that limits nothing.
fn bucket(
    b: super::model::TokenBucket,
) -> Option<crate::devices::virtio::rate_limiter::BucketConfig> {
    let rate = b.per_second()?;
    let burst = b.size.saturating_add(b.one_time_burst.unwrap_or(0)).max(1);
    Some(crate::devices::virtio::rate_limiter::BucketConfig::new(
        rate,
        Some(burst),
    ))
}

fn disk_ro(d: &Drive) -> bool {
    d.is_read_only.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_file(name: &str) -> String {
        let p = std::env::temp_dir().join(format!("ember-api-res-{}-{name}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        p.display().to_string()
    }

    fn drive(id: &str, path: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            path_on_host: Some(path.into()),
            is_root_device: root,
            ..Default::default()
        }
    }

    #[test]
    fn getting_started_resources_make_the_vm_config() {
        let (k, rootfs, data) = (tmp_file("k"), tmp_file("rootfs"), tmp_file("data"));
        let mut r = VmResources::default();
        r.set_boot_source(BootSource {
            kernel_image_path: k.clone(),
            boot_args: Some("console=ttyS0 reboot=k panic=1 pci=off".into()),
            initrd_path: None,
        })
        .unwrap();
        r.set_machine_config(MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            ..Default::default()
        })
        .unwrap();
        // The data drive first: the root drive is still /dev/vda.
        r.put_drive("data", drive("data", &data, false)).unwrap();
        let mut root = drive("rootfs", &rootfs, true);
        root.is_read_only = Some(true);
        r.put_drive("rootfs", root).unwrap();
        let tb = |size, refill_time| super::super::model::TokenBucket {
            size,
            one_time_burst: None,
            refill_time,
        };
        let mut data_drive = drive("data", &data, false);
        data_drive.rate_limiter = Some(RateLimiter {
            bandwidth: Some(tb(1 << 20, 1000)),
            ops: Some(tb(100, 100)),
        });
        r.put_drive("data", data_drive).unwrap();
        r.put_net(
            "eth0",
            NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "tap0".into(),
                guest_mac: Some("06:00:AC:10:00:02".into()),
                rx_rate_limiter: Some(RateLimiter {
                    bandwidth: Some(tb(5000, 500)),
                    ops: None,
                }),
                ..Default::default()
            },
        )
        .unwrap();
        let c = r.to_vm_config().unwrap();
        assert_eq!(c.kernel, PathBuf::from(&k));
        assert_eq!(
            c.cmdline,
            "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro"
        );
        assert_eq!((c.vcpus, c.mem_mib), (2, 256));
        assert_eq!(c.disks[0].path, PathBuf::from(&rootfs));
        assert!(c.disks[0].read_only);
        assert_eq!(c.disks[0].id.as_deref(), Some("rootfs"));
        assert_eq!(c.disks[1].path, PathBuf::from(&data));
        assert_eq!(c.net[0].mac().to_string(), "06:00:ac:10:00:02");
        // Rate limiters: Firecracker's buckets as rates and bursts.
        let bw = c.disks[1].bw.unwrap();
        assert_eq!((bw.rate, bw.burst), (1 << 20, 1 << 20));
        let iops = c.disks[1].iops.unwrap();
        assert_eq!((iops.rate, iops.burst), (1000, 100));
        let rx = c.net[0].rx.unwrap();
        assert_eq!((rx.rate, rx.burst), (10_000, 5000));
        assert!(c.net[0].tx.is_none() && c.disks[0].bw.is_none());
        // No entropy device unless asked for, as under Firecracker.
        assert!(c.rng.is_none() && c.vsock.is_none());
        // The same resources through the file form.
        let again = VmResources::from_file(&r.to_file()).unwrap();
        assert_eq!(again.to_vm_config().unwrap().cmdline, c.cmdline);
    }

    #[test]
    fn bad_resources_are_refused_with_the_fix() {
        let k = tmp_file("k2");
        let mut r = VmResources::default();
        let e = r.to_vm_config().unwrap_err();
        assert!(e.0.contains("PUT /boot-source"), "{e}");
        let e = r
            .set_boot_source(BootSource {
                kernel_image_path: "/nonexistent/vmlinux".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.0.contains("cannot be opened"), "{e}");
        for (m, needle) in [
            (
                MachineConfig {
                    vcpu_count: 0,
                    ..Default::default()
                },
                "1 to 32",
            ),
            (
                MachineConfig {
                    vcpu_count: 33,
                    ..Default::default()
                },
                "1 to 32",
            ),
            (
                MachineConfig {
                    smt: true,
                    ..Default::default()
                },
                "smt",
            ),
            (
                MachineConfig {
                    cpu_template: Some("T2".into()),
                    ..Default::default()
                },
                "cpu_template",
            ),
        ] {
            let e = r.set_machine_config(m).unwrap_err();
            assert!(e.0.contains(needle), "{e}");
        }
        let e = r.put_drive("a", drive("b", &k, false)).unwrap_err();
        assert!(e.0.contains("differs"), "{e}");
        r.put_drive("r1", drive("r1", &k, true)).unwrap();
        let e = r.put_drive("r2", drive("r2", &k, true)).unwrap_err();
        assert!(e.0.contains("root device already"), "{e}");
        let e = r
            .put_drive("d", drive("d", "/nonexistent", false))
            .unwrap_err();
        assert!(e.0.contains("cannot be opened"), "{e}");
        let e = r
            .patch_drive(
                "nope",
                PartialDrive {
                    drive_id: "nope".into(),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(e.0.contains("PUT it first"), "{e}");
        let e = r
            .set_vsock(Vsock {
                guest_cid: 2,
                uds_path: "/tmp/v.sock".into(),
                vsock_id: None,
            })
            .unwrap_err();
        assert!(e.0.contains("cid"), "{e}");
        let doc: VmConfigFile = serde_json::from_str(r#"{"balloon": {"amount_mib": 1}}"#).unwrap();
        let e = VmResources::from_file(&doc).unwrap_err();
        assert!(e.0.contains("balloon"), "{e}");
    }

    /// Firecracker's swagger file has no nullable fields: `GET /vm/config` leaves out what
    /// is not set instead of answering `null` (which its schema, and schemathesis, refuse).
    #[test]
    fn vm_config_document_has_no_nulls() {
        fn nulls(v: &serde_json::Value, at: &str, found: &mut Vec<String>) {
            match v {
                serde_json::Value::Null => found.push(at.to_string()),
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        nulls(v, &format!("{at}/{k}"), found);
                    }
                }
                serde_json::Value::Array(a) => {
                    for (i, v) in a.iter().enumerate() {
                        nulls(v, &format!("{at}/{i}"), found);
                    }
                }
                _ => {}
            }
        }
        let k = tmp_file("k3");
        let mut configured = VmResources::default();
        configured
            .set_boot_source(BootSource {
                kernel_image_path: k.clone(),
                ..Default::default()
            })
            .unwrap();
        configured.put_drive("d", drive("d", &k, false)).unwrap();
        for r in [VmResources::default(), configured] {
            let v = serde_json::to_value(r.to_file()).unwrap();
            let mut found = Vec::new();
            nulls(&v, "", &mut found);
            assert!(found.is_empty(), "null at {found:?} in {v}");
            assert!(v["machine-config"]["vcpu_count"].is_u64(), "{v}");
            assert!(
                v["drives"].is_array() && v["network-interfaces"].is_array(),
                "{v}"
            );
        }
    }

    #[test]
    fn patch_machine_config_merges() {
        let mut r = VmResources::default();
        r.update_machine_config(MachineConfigUpdate {
            mem_size_mib: Some(512),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((r.machine.vcpu_count, r.machine.mem_size_mib), (1, 512));
        assert!(r
            .update_machine_config(MachineConfigUpdate {
                vcpu_count: Some(0),
                ..Default::default()
            })
            .is_err());
        assert_eq!(
            r.machine.mem_size_mib, 512,
            "a refused patch changes nothing"
        );
    }
}
