// SPDX-License-Identifier: Apache-2.0
//! Architecture-specific code. ember supports x86_64 only; this is the one place that says
//! so.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("ember supports x86_64 hosts only");

pub mod x86_64;
