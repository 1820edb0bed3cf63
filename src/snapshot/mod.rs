// SPDX-License-Identifier: Apache-2.0
//! Snapshots: a stopped VM saved to a directory and restored from it.
//!
//! - [`format`](mod@format): the snapshot directory and its versioned, checksummed `state`
//!   file;
//! - [`devices`]: the state of every device (legacy ports, ACPI, virtio transports and
//!   devices), saved from and restored into the device models;
//! - [`SnapshotMeta`] (here): the configuration the VM was built from, checked against the
//!   VM a snapshot is restored into before anything of it is restored.
//!
//! The configuration is the one [`VmConfig`] the CLI (and a config file or API) produce: it
//! is serialized as it is, not copied into a snapshot-only type.

pub mod devices;
pub mod format;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use devices::DeviceStates;
use format::SnapshotError;

/// Everything in a `state` file: the metadata checked first, the devices, and the KVM state
/// of the VM and its vCPUs (`V`, defined with the vCPU and VM code).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState<V> {
    /// What the VM was built from.
    pub meta: SnapshotMeta,
    /// Every device's state.
    pub devices: DeviceStates,
    /// The KVM state: VM (irqchip, clock...) and vCPUs (registers, MSRs...).
    pub vm: V,
}

/// The facts about a VM that a restore checks: the configuration it was built from, each
/// disk's size and the devices in the order they were attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// The size in bytes of each disk of `config.disks`, in order, when the snapshot was
    /// taken.
    pub disk_sizes: Vec<u64>,
    /// The devices, in the order the builder attaches them ([`device_list`]).
    pub devices: Vec<String>,
}

/// The size of a disk image (a regular file or a block device).
fn disk_size(path: &std::path::Path) -> Result<u64, SnapshotError> {
    use std::io::{Seek, SeekFrom};
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let kind = crate::user_file::Kind::RegularOrBlockDevice;
    let mut f = crate::user_file::open(path, false, 0, kind).map_err(io)?;
    f.seek(SeekFrom::End(0)).map_err(io)
}

/// The devices a VM built from `config` has, in the order the builder attaches them (the
/// order of [`DeviceStates::virtio`]).
pub fn device_list(config: &VmConfig) -> Vec<String> {
    let mut d = vec!["serial COM1".to_string()];
    if config.com2.is_some() {
        d.push("serial COM2".into());
    }
    d.push("i8042".into());
    if config.acpi {
        d.push("ACPI platform".into());
    }
    for (i, disk) in config.disks.iter().enumerate() {
        d.push(format!(
            "virtio-blk {} ({})",
            VmConfig::disk_name(i),
            disk.path.display()
        ));
    }
    for n in &config.net {
        d.push(format!("virtio-net tap={}", n.tap));
    }
    if let Some(v) = &config.vsock {
        d.push(format!("virtio-vsock cid={}", v.cid));
    }
    if config.rng.is_some() {
        d.push("virtio-rng".into());
    }
    d
}

impl SnapshotMeta {
    /// The metadata of a VM built from `config` (the disks' sizes are read now).
    pub fn new(config: &VmConfig) -> Result<Self, SnapshotError> {
        Ok(Self {
            config: config.clone(),
            disk_sizes: config
                .disks
                .iter()
                .map(|d| disk_size(&d.path))
                .collect::<Result<_, _>>()?,
            devices: device_list(config),
        })
    }

    /// Checks that a VM built from `now` can take this snapshot: the same vCPU count, memory
    /// size, kernel command line, disks (same files, modes and sizes, in the same order) and
    /// devices. Host-side settings (where the console goes, stdin, the image cache) may
    /// differ.
    pub fn check(&self, now: &VmConfig) -> Result<(), SnapshotError> {
        let then = &self.config;
        let mismatch = |what: &str, snapshot: String, now: String| {
            Err(SnapshotError::Mismatch {
                what: what.into(),
                snapshot,
                now,
            })
        };
        if then.vcpus != now.vcpus {
            return mismatch("vCPU count", then.vcpus.to_string(), now.vcpus.to_string());
        }
        if then.mem_mib != now.mem_mib {
            return mismatch(
                "memory size",
                format!("{} MiB", then.mem_mib),
                format!("{} MiB", now.mem_mib),
            );
        }
        if then.cmdline != now.cmdline {
            return mismatch(
                "kernel command line",
                format!("{:?}", then.cmdline),
                format!("{:?}", now.cmdline),
            );
        }
        if then.disks.len() != now.disks.len() || self.disk_sizes.len() != then.disks.len() {
            return mismatch(
                "disk count",
                then.disks.len().to_string(),
                now.disks.len().to_string(),
            );
        }
        for (i, (a, b)) in then.disks.iter().zip(&now.disks).enumerate() {
            let name = VmConfig::disk_name(i);
            if a.path != b.path || a.read_only != b.read_only {
                let show = |d: &crate::config::DiskConfig| {
                    format!(
                        "{}{}",
                        d.path.display(),
                        if d.read_only { ",ro" } else { "" }
                    )
                };
                return mismatch(&format!("disk {name}"), show(a), show(b));
            }
            let size = disk_size(&b.path)?;
            if size != self.disk_sizes[i] {
                return mismatch(
                    &format!("disk {name} ({}) of size", b.path.display()),
                    format!("{} bytes", self.disk_sizes[i]),
                    format!("{size} bytes"),
                );
            }
        }
        let devices = device_list(now);
        if self.devices != devices {
            return mismatch("devices", self.devices.join(", "), devices.join(", "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::DiskConfig;
    use crate::devices::virtio::net::NetConfig;
    use crate::devices::virtio::vsock::VsockConfig;

    fn config(disk: &Path) -> VmConfig {
        let mut c = VmConfig::new("/boot/vmlinux");
        c.vcpus = 2;
        c.mem_mib = 256;
        c.disks = vec![DiskConfig::new(disk)];
        c.net = vec![NetConfig {
            tap: "tap0".into(),
            mac: None,
        }];
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds: "/tmp/v.sock".into(),
        });
        c.initrd_append = Some(vec![1, 2, 3]);
        c
    }

    #[test]
    fn meta_goes_through_the_state_file_and_checks_the_vm() {
        let dir = std::env::temp_dir().join(format!("ember-snapmeta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let c = config(&disk);
        let meta = SnapshotMeta::new(&c).unwrap();
        assert_eq!(meta.disk_sizes, vec![4096]);
        assert_eq!(
            meta.devices,
            vec![
                "serial COM1".to_string(),
                "i8042".into(),
                "ACPI platform".into(),
                format!("virtio-blk vda ({})", disk.display()),
                "virtio-net tap=tap0".into(),
                "virtio-vsock cid=3".into(),
                "virtio-rng".into(),
            ]
        );
        let path = dir.join(format::STATE_FILE);
        format::write_state(&path, &meta).unwrap();
        let back: SnapshotMeta = format::read_state(&path).unwrap();
        assert_eq!(back, meta);
        back.check(&c).unwrap();
        // Host-side settings may differ.
        let mut host = c.clone();
        host.stdin = false;
        host.image_cache = None;
        back.check(&host).unwrap();

        let refused = |edit: &dyn Fn(&mut VmConfig), want: &str| {
            let mut now = c.clone();
            edit(&mut now);
            let e = back.check(&now).unwrap_err();
            assert!(matches!(e, SnapshotError::Mismatch { .. }), "{e}");
            assert!(e.to_string().contains(want), "{want}: {e}");
        };
        refused(
            &|n| n.vcpus = 4,
            "the snapshot was taken with vCPU count 2, but this VM has 4",
        );
        refused(&|n| n.mem_mib = 128, "memory size 256 MiB");
        refused(&|n| n.cmdline.push_str(" quiet"), "kernel command line");
        refused(&|n| n.disks.clear(), "disk count");
        refused(&|n| n.disks[0].read_only = true, "disk vda");
        refused(&|n| n.rng = None, "devices");
        refused(&|n| n.net[0].tap = "tap1".into(), "devices");
        // The disk grew since the snapshot.
        std::fs::write(&disk, vec![0u8; 8192]).unwrap();
        let e = back.check(&c).unwrap_err().to_string();
        assert!(e.contains("4096 bytes") && e.contains("8192 bytes"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn whole_state_with_a_vm_part_round_trips() {
        let c = VmConfig::new("/boot/vmlinux");
        let s = SnapshotState {
            meta: SnapshotMeta::new(&c).unwrap(),
            devices: DeviceStates {
                com1: devices::SerialState::from(vm_superio::serial::SerialState::default()),
                com2: None,
                i8042: devices::I8042State {},
                acpi: Some(devices::AcpiState::default()),
                virtio: Vec::new(),
            },
            // Stands for the KVM state: kvm-bindings' structures serialize with its `serde`
            // feature.
            vm: vec![kvm_bindings::kvm_regs {
                rip: 0x10_0000,
                rflags: 2,
                ..Default::default()
            }],
        };
        let bytes = format::encode_state(&s).unwrap();
        let (_, back): (_, SnapshotState<Vec<kvm_bindings::kvm_regs>>) =
            format::decode_state(Path::new("state"), &bytes).unwrap();
        assert_eq!(back, s);
    }
}
