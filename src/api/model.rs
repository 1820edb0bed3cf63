// SPDX-License-Identifier: Apache-2.0
//! The request and response bodies of Firecracker's API (its `firecracker.yaml`, version
//! 1.17), as serde types. Unknown fields are refused, as Firecracker refuses them
//! (`deny_unknown_fields`): a misspelt field is an error, not a silently ignored setting.
//! The same types make up the `--config-file` document ([`VmConfigFile`]).

use serde::{Deserialize, Serialize};

/// Parses a request body or configuration document into `T`, refusing a JSON array where
/// `T` (or any struct inside it) expects an object: serde's derived structs also take an
/// array of their fields in order, which Firecracker's swagger file does not allow (every
/// body it describes is an object). Null for an optional field is taken as not given.
pub fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    T::deserialize(ObjectsOnly(&value))
}

/// A deserializer over a parsed JSON value that hands structs objects only.
struct ObjectsOnly<'a>(&'a serde_json::Value);

/// The fields of an object, each value again [`ObjectsOnly`].
struct Fields<'a> {
    iter: serde_json::map::Iter<'a>,
    value: Option<&'a serde_json::Value>,
}

/// The elements of an array, each again [`ObjectsOnly`].
struct Elements<'a>(std::slice::Iter<'a, serde_json::Value>);

impl<'de> serde::de::MapAccess<'de> for Fields<'de> {
    type Error = serde_json::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.iter.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(serde::de::value::BorrowedStrDeserializer::new(k))
                    .map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value.take() {
            Some(v) => seed.deserialize(ObjectsOnly(v)),
            None => Err(serde::de::Error::custom("a value without its key")),
        }
    }
}

impl<'de> serde::de::SeqAccess<'de> for Elements<'de> {
    type Error = serde_json::Error;

    fn next_element_seed<T: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0
            .next()
            .map(|v| seed.deserialize(ObjectsOnly(v)))
            .transpose()
    }
}

impl<'de> serde::Deserializer<'de> for ObjectsOnly<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            serde_json::Value::Object(m) => visitor.visit_map(Fields {
                iter: m.iter(),
                value: None,
            }),
            serde_json::Value::Array(a) => visitor.visit_seq(Elements(a.iter())),
            other => serde::Deserializer::deserialize_any(other, visitor),
        }
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            serde_json::Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            serde_json::Value::Object(_) => self.deserialize_any(visitor),
            other => Err(serde::de::Error::custom(format!(
                "invalid type: {}, expected a JSON object ({name})",
                kind(other)
            ))),
        }
    }

    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        serde::Deserializer::deserialize_enum(self.0, name, variants, visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

/// What a JSON value is, for error messages.
fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /machine-config` (and the answer of `GET /machine-config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs (1 to 32).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: ember offers one thread per core (only `false`).
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking for diff snapshots: accepted, ember's snapshots are full.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A CPU template: only `None` (ember filters CPUID by itself for the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages: only `None`.
    #[serde(default = "huge_pages_none")]
    pub huge_pages: String,
}

fn huge_pages_none() -> String {
    "None".into()
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: huge_pages_none(),
        }
    }
}

/// `PATCH /machine-config`: the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    /// SMT.
    #[serde(default)]
    pub smt: Option<bool>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// CPU template.
    #[serde(default)]
    pub cpu_template: Option<String>,
    /// Huge pages.
    #[serde(default)]
    pub huge_pages: Option<String>,
}

/// A token bucket of a rate limiter: `size` tokens (bytes or operations) refilled every
/// `refill_time` milliseconds, plus a first `one_time_burst`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens per refill period.
    pub size: u64,
    /// Extra tokens usable once, at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// The refill period in milliseconds.
    pub refill_time: u64,
}

impl TokenBucket {
    /// The sustained rate in tokens per second, or `None` for a bucket that limits nothing
    /// (size or refill time 0, as Firecracker treats them).
    pub fn per_second(&self) -> Option<u64> {
        if self.size == 0 || self.refill_time == 0 {
            return None;
        }
        Some(
            u64::try_from(u128::from(self.size) * 1000 / u128::from(self.refill_time))
                .unwrap_or(u64::MAX)
                .max(1),
        )
    }
}

/// A rate limiter: a bandwidth bucket (bytes) and an operations bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations (requests or frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's ID (the URL's).
    pub drive_id: String,
    /// Host path of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// The guest's root file system: attached first (`/dev/vda`), with `root=` added.
    pub is_root_device: bool,
    /// The root partition's UUID (`root=PARTUUID=...`) instead of the whole device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Read-only for the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// `Unsafe` or `Writeback`: ember honours the guest's flushes either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// `Sync` or `Async`: ember's engine is synchronous either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// The drive's rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// A vhost-user block backend's socket: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's ID.
    pub drive_id: String,
    /// A new image.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// A new rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's ID (the URL's).
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's ID.
    pub iface_id: String,
    /// New receive rate limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit rate limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's CID (3 or more).
    pub guest_cid: u32,
    /// The host-side Unix socket.
    pub uds_path: String,
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// The device's rate limiter (bandwidth only: virtio-rng has no operation count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// A file or FIFO the log lines go to (stderr when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Put the level in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Put the source file and line in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only lines of this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// A file or FIFO the metrics lines go to.
    pub metrics_path: String,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    /// `InstanceStart`, `SendCtrlAltDel` or `FlushMetrics`.
    pub action_type: String,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// `Paused` or `Resumed`.
    pub state: String,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The application: `ember`.
    pub app_name: String,
    /// The instance ID (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// ember's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The version of Firecracker's API that ember implements.
    pub firecracker_version: String,
}

/// An error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong.
    pub fault_message: String,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Where the guest memory goes.
    pub mem_file_path: String,
    /// Where the VM state goes.
    pub snapshot_path: String,
    /// `Full` (ember has no diff snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<String>,
}

/// The memory backend of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// `File` (`Uffd` is not supported).
    pub backend_type: String,
    /// The memory file.
    pub backend_path: String,
}

/// A NIC moved onto another TAP at `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new TAP.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The VM state file.
    pub snapshot_path: String,
    /// The memory file (deprecated in Firecracker for `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// The memory backend.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Diff snapshots: not supported.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// Dirty page tracking: accepted.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Resume the guest once loaded (else it stays paused until `PATCH /vm`).
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// NICs moved onto other TAPs.
    #[serde(default)]
    pub network_overrides: Option<Vec<NetworkOverride>>,
}

/// The `--config-file` document, and the answer of `GET /vm/config`: every pre-boot
/// resource in one object, keyed as in Firecracker. Parts ember does not have (`balloon`,
/// `mmds-config`, `cpu-config`) must be absent or null. Parts not set are left out of the
/// answer (Firecracker answers `null` for them, which its own swagger schema does not allow).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigFile {
    /// `boot-source`.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// `machine-config`.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    /// `drives`.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// `network-interfaces`.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// `vsock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// `entropy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    /// `logger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// `metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// `balloon`: refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<serde_json::Value>,
    /// `mmds-config`: refused when set.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<serde_json::Value>,
    /// `cpu-config`: refused when set.
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_getting_started_bodies_parse() {
        let b: BootSource = serde_json::from_str(
            r#"{"kernel_image_path": "./vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}"#,
        )
        .unwrap();
        assert_eq!(b.kernel_image_path, "./vmlinux");
        let d: Drive = serde_json::from_str(
            r#"{"drive_id": "rootfs", "path_on_host": "./rootfs.ext4", "is_root_device": true, "is_read_only": false}"#,
        )
        .unwrap();
        assert!(d.is_root_device);
        let m: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 1024}"#).unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib, m.smt), (2, 1024, false));
        assert_eq!(m.huge_pages, "None");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        let e = from_json::<BootSource>(br#"{"kernel_image_path": "k", "boot_arg": "typo"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `boot_arg`"), "{e}");
        assert!(from_json::<MachineConfig>(br#"{"vcpu_count": "2"}"#).is_err());
        let e =
            from_json::<MachineConfig>(br#"{"vcpu_count": 300, "mem_size_mib": 1}"#).unwrap_err();
        assert!(e.to_string().contains("300"), "{e}");
        let e = from_json::<VmConfigFile>(br#"{"boot_source": {}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = from_json::<MachineConfig>(br#"{"vcpu_count": 1"#).unwrap_err();
        assert!(
            e.to_string().contains("line 1"),
            "syntax errors keep their place: {e}"
        );
    }

    #[test]
    fn structs_take_objects_only() {
        let e = from_json::<Logger>(b"[null, null]").unwrap_err();
        assert!(e.to_string().contains("expected a JSON object"), "{e}");
        let doc = br#"{"boot-source": {"kernel_image_path": "k", "initrd_path": null},
            "drives": [{"drive_id": "a", "is_root_device": true, "path_on_host": "r"}]}"#;
        let c = from_json::<VmConfigFile>(doc).unwrap();
        assert_eq!(c.drives[0].drive_id, "a");
        assert_eq!(c.boot_source.unwrap().initrd_path, None);
        let e = from_json::<VmConfigFile>(br#"{"drives": [["a", true]]}"#).unwrap_err();
        assert!(e.to_string().contains("expected a JSON object"), "{e}");
        let e = from_json::<VmConfigFile>(br#"{"drives": {"drive_id": "a"}}"#).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
    }

    #[test]
    fn token_bucket_rates() {
        let b = TokenBucket {
            size: 1000,
            one_time_burst: None,
            refill_time: 100,
        };
        assert_eq!(b.per_second(), Some(10_000));
        assert_eq!(
            TokenBucket {
                refill_time: 0,
                ..b
            }
            .per_second(),
            None
        );
        assert_eq!(TokenBucket { size: 0, ..b }.per_second(), None);
        let huge = TokenBucket {
            size: u64::MAX,
            one_time_burst: None,
            refill_time: 1,
        };
        assert_eq!(huge.per_second(), Some(u64::MAX));
    }
}
