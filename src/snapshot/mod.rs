// SPDX-License-Identifier: Apache-2.0
//! Snapshots: a stopped VM saved to a directory and restored from it.
//!
//! - [`format`](self::format): the snapshot directory and its versioned, checksummed `state` file;
//! - [`devices`]: the state of every device (legacy ports, ACPI, virtio transports and
//!   devices), saved from and restored into the device models.

pub mod devices;
pub mod format;
