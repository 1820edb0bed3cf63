// SPDX-License-Identifier: Apache-2.0
//! Snapshots: a stopped VM saved to a directory and restored from it.
//!
//! - [`format`]: the snapshot directory and its versioned, checksummed `state` file.

pub mod format;
