// SPDX-License-Identifier: Apache-2.0
//! What kind of KVM host this is, and what a guest needs to run on it.
//!
//! On a PVM host (`kvm_pvm` module: KVM without hardware virtualization, guest kernel code
//! emulated), a few instructions cannot be emulated and KVM's hypercalls hang. ember then
//! adds guest command-line switches that keep Linux away from those instructions and hides
//! the hypercall-based PV features from CPUID. On hardware KVM nothing is changed.

use std::path::Path;
use std::time::Duration;

/// Guest command-line switches a PVM host needs: no XSAVE (XRSTOR is not emulated), no
/// SMAP (CLAC/STAC), no POPCNT. (Hiding ERMS/FSRM too made `clear_page` eight times cheaper in
/// one profiled boot, docs/profile.md, but another boot with `clearcpuid=erms` crashed early
/// on an unemulated `lsl` in `paranoid_entry`; until that is understood the switches stay
/// the verified set.)
pub const PVM_CMDLINE_SWITCHES: &str = "noxsave clearcpuid=smap,popcnt";

/// Facts about the host that change how a guest is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostInfo {
    /// The host's KVM is PVM.
    pub pvm: bool,
}

impl HostInfo {
    /// Looks at the running host.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Looks for the PVM module under `sys_module` (testable).
    pub fn detect_in(sys_module: &Path) -> Self {
        Self {
            pvm: sys_module.join("kvm_pvm").exists(),
        }
    }

    /// Command-line switches this host needs, if any.
    pub fn cmdline_switches(&self) -> Option<&'static str> {
        self.pvm.then_some(PVM_CMDLINE_SWITCHES)
    }

    /// Whether KVM PV features that use hypercalls must be hidden.
    pub fn hide_pv_hypercalls(&self) -> bool {
        self.pvm
    }

    /// How long a guest gets to shut down after a stop request, unless the user says: a
    /// guest's kernel is ~1000x slower on a PVM host, so it gets 30 s there, 5 s elsewhere.
    pub fn default_shutdown_timeout(&self) -> Duration {
        Duration::from_secs(if self.pvm { 30 } else { 5 })
    }
}

/// Appends `switches` to `cmdline`, skipping each switch whose key the user already set.
pub fn append_switches(cmdline: &str, switches: &str) -> String {
    let key = |s: &str| s.split('=').next().unwrap_or(s).to_string();
    let present: Vec<String> = cmdline.split_whitespace().map(key).collect();
    let mut out = cmdline.trim().to_string();
    for s in switches.split_whitespace() {
        if !present.contains(&key(s)) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_by_module_dir() {
        let dir = std::env::temp_dir().join(format!("ember-host-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert!(!HostInfo::detect_in(&dir).pvm);
        assert_eq!(HostInfo::detect_in(&dir).cmdline_switches(), None);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        let h = HostInfo::detect_in(&dir);
        assert!(h.pvm && h.hide_pv_hypercalls());
        assert_eq!(h.cmdline_switches(), Some(PVM_CMDLINE_SWITCHES));
        let hardware = HostInfo { pvm: false };
        assert!(h.default_shutdown_timeout() > hardware.default_shutdown_timeout());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn appends_without_duplicates() {
        assert_eq!(
            append_switches("console=ttyS0", "noxsave clearcpuid=smap"),
            "console=ttyS0 noxsave clearcpuid=smap"
        );
        assert_eq!(
            append_switches(
                "console=ttyS0 clearcpuid=smap,popcnt,cx16",
                "noxsave clearcpuid=smap"
            ),
            "console=ttyS0 clearcpuid=smap,popcnt,cx16 noxsave"
        );
        assert_eq!(append_switches("", "a b"), "a b");
    }
}
