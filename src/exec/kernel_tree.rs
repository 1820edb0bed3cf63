// SPDX-License-Identifier: Apache-2.0
//! `ember exec --kernel-tree DIR`: a kernel build tree as the guest kernel. The kernel is
//! `DIR/vmlinux` (an ELF, booted through PVH, with symbols for reports) or else
//! `DIR/arch/x86/boot/bzImage`; the default guest's initramfs runs the command. When the tree
//! has a `.config`, the options ember's exec needs are checked before booting
//! ([`check_config`]), so that a missing one is named instead of ending in a hang.

use std::path::{Path, PathBuf};

/// Options the default guest's init needs for any exec, and what each is for.
pub const REQUIRED: [(&str, &str); 5] = [
    ("CONFIG_VIRTIO_MMIO", "ember's virtio devices"),
    (
        "CONFIG_SERIAL_8250_CONSOLE",
        "the console (the command's stdout)",
    ),
    ("CONFIG_DEVTMPFS", "the guest's /dev"),
    (
        "CONFIG_BLK_DEV_INITRD",
        "the initramfs that holds init and the command",
    ),
    (
        "CONFIG_DEVMEM",
        "the exit device through which the command's status comes back",
    ),
];

/// Options the warm path (snapshot of a booted guest, command over vsock) needs.
pub const WARM: [(&str, &str); 2] = [
    ("CONFIG_VIRTIO_VSOCKETS", "the command channel"),
    (
        "CONFIG_VMGENID",
        "reseeding the random number generator of a restored guest",
    ),
];

/// Options `--share` needs.
pub const SHARE: [(&str, &str); 2] = [
    ("CONFIG_VIRTIO_FS", "virtio-fs"),
    ("CONFIG_FUSE_FS", "FUSE, which virtio-fs is built on"),
];

/// Errors of `--kernel-tree`.
#[derive(Debug, thiserror::Error)]
pub enum KernelTreeError {
    /// Neither kernel file exists.
    #[error(
        "--kernel-tree {dir}: no kernel in it: neither {vmlinux} nor {bzimage} exists (build \
         the kernel first, e.g. `make -j$(nproc)`, or give the image with --kernel)"
    )]
    NoKernel {
        /// The tree.
        dir: PathBuf,
        /// The ELF looked for.
        vmlinux: PathBuf,
        /// The bzImage looked for.
        bzimage: PathBuf,
    },
    /// The `.config` exists but cannot be read.
    #[error("--kernel-tree: cannot read {0}")]
    ReadConfig(PathBuf, #[source] std::io::Error),
    /// Options ember's exec needs are not set.
    #[error(
        "--kernel-tree {config}: the kernel lacks {}; enable {} (e.g. `scripts/config -e \
         {}` and `make olddefconfig`) and rebuild",
        describe(.missing),
        if .missing.len() == 1 { "it" } else { "them" },
        .missing.iter().map(|(o, _)| o.trim_start_matches("CONFIG_")).collect::<Vec<_>>()
            .join(" -e ")
    )]
    MissingOptions {
        /// The `.config`.
        config: PathBuf,
        /// The missing options and what each is for.
        missing: Vec<(&'static str, &'static str)>,
    },
}

fn describe(missing: &[(&str, &str)]) -> String {
    missing
        .iter()
        .map(|(o, why)| format!("{o} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The kernel image of the build tree `dir`: `vmlinux`, else `arch/x86/boot/bzImage`.
pub fn pick_kernel(dir: &Path) -> Result<PathBuf, KernelTreeError> {
    let vmlinux = dir.join("vmlinux");
    let bzimage = dir.join("arch/x86/boot/bzImage");
    if vmlinux.is_file() {
        Ok(vmlinux)
    } else if bzimage.is_file() {
        Ok(bzimage)
    } else {
        Err(KernelTreeError::NoKernel {
            dir: dir.to_path_buf(),
            vmlinux,
            bzimage,
        })
    }
}

/// What the tree's `.config` says about the options exec needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigCheck {
    /// Whether the tree has a `.config` (nothing was checked without one).
    pub checked: bool,
    /// Options of the warm path that are not set: exec then boots the guest (cold path).
    pub missing_warm: Vec<&'static str>,
}

/// Checks `DIR/.config` (when there is one) for the options exec needs: an error naming
/// every missing one of [`REQUIRED`] (and [`SHARE`] with `share`), and the missing [`WARM`]
/// ones in the result. Only `=y` counts as set: the default guest's initramfs holds no
/// modules of the tree.
pub fn check_config(dir: &Path, share: bool) -> Result<ConfigCheck, KernelTreeError> {
    let path = dir.join(".config");
    let text = match std::fs::read(&path) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigCheck::default()),
        Err(e) => return Err(KernelTreeError::ReadConfig(path, e)),
    };
    let set = |opt: &str| {
        text.lines()
            .any(|l| l.strip_prefix(opt).is_some_and(|rest| rest.trim() == "=y"))
    };
    let mut need: Vec<(&'static str, &'static str)> = REQUIRED.to_vec();
    if share {
        need.extend(SHARE);
    }
    let missing: Vec<_> = need.into_iter().filter(|(o, _)| !set(o)).collect();
    if !missing.is_empty() {
        return Err(KernelTreeError::MissingOptions {
            config: path,
            missing,
        });
    }
    Ok(ConfigCheck {
        checked: true,
        missing_warm: WARM.iter().map(|(o, _)| *o).filter(|o| !set(o)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!(
                "ember-ktree-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(opts: &[&str]) -> String {
        let mut s = String::from("#\n# Automatically generated file; DO NOT EDIT.\n");
        for o in opts {
            s.push_str(o);
            s.push('\n');
        }
        s
    }

    const ALL_REQUIRED: [&str; 5] = [
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_SERIAL_8250_CONSOLE=y",
        "CONFIG_DEVTMPFS=y",
        "CONFIG_BLK_DEV_INITRD=y",
        "CONFIG_DEVMEM=y",
    ];

    #[test]
    fn picks_vmlinux_then_bzimage_and_names_both_when_neither() {
        let t = Tmp::new("pick");
        let e = pick_kernel(&t.0).unwrap_err().to_string();
        assert!(
            e.contains(&t.0.join("vmlinux").display().to_string()),
            "{e}"
        );
        assert!(
            e.contains(&t.0.join("arch/x86/boot/bzImage").display().to_string()),
            "{e}"
        );
        std::fs::create_dir_all(t.0.join("arch/x86/boot")).unwrap();
        std::fs::write(t.0.join("arch/x86/boot/bzImage"), b"bz").unwrap();
        assert_eq!(
            pick_kernel(&t.0).unwrap(),
            t.0.join("arch/x86/boot/bzImage")
        );
        std::fs::write(t.0.join("vmlinux"), b"elf").unwrap();
        assert_eq!(pick_kernel(&t.0).unwrap(), t.0.join("vmlinux"));
    }

    #[test]
    fn config_options_are_named() {
        let t = Tmp::new("config");
        // No .config: nothing checked.
        assert_eq!(check_config(&t.0, true).unwrap(), ConfigCheck::default());

        let mut opts = ALL_REQUIRED.to_vec();
        opts.retain(|o| !o.starts_with("CONFIG_DEVMEM") && !o.starts_with("CONFIG_DEVTMPFS"));
        opts.push("# CONFIG_DEVMEM is not set");
        opts.push("CONFIG_DEVTMPFS_MOUNT=y"); // a longer name is not the option
        std::fs::write(t.0.join(".config"), config(&opts)).unwrap();
        let e = check_config(&t.0, false).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("CONFIG_DEVMEM (") && msg.contains("CONFIG_DEVTMPFS ("),
            "{msg}"
        );
        assert!(!msg.contains("CONFIG_VIRTIO_MMIO"), "{msg}");
        assert!(
            msg.contains("scripts/config -e DEVTMPFS -e DEVMEM"),
            "{msg}"
        );

        // Everything required, no warm options: fine, but the warm path is not.
        std::fs::write(t.0.join(".config"), config(&ALL_REQUIRED)).unwrap();
        let c = check_config(&t.0, false).unwrap();
        assert!(c.checked);
        assert_eq!(c.missing_warm, ["CONFIG_VIRTIO_VSOCKETS", "CONFIG_VMGENID"]);
        // With --share, virtio-fs and FUSE are required; a module does not count.
        let mut opts = ALL_REQUIRED.to_vec();
        opts.extend(["CONFIG_VIRTIO_FS=m", "CONFIG_VMGENID=y"]);
        std::fs::write(t.0.join(".config"), config(&opts)).unwrap();
        let msg = check_config(&t.0, true).unwrap_err().to_string();
        assert!(
            msg.contains("CONFIG_VIRTIO_FS (") && msg.contains("CONFIG_FUSE_FS ("),
            "{msg}"
        );
        let c = check_config(&t.0, false).unwrap();
        assert_eq!(c.missing_warm, ["CONFIG_VIRTIO_VSOCKETS"]);
        // Everything.
        opts.extend([
            "CONFIG_VIRTIO_FS=y",
            "CONFIG_FUSE_FS=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
        ]);
        opts.retain(|o| *o != "CONFIG_VIRTIO_FS=m");
        std::fs::write(t.0.join(".config"), config(&opts)).unwrap();
        let c = check_config(&t.0, true).unwrap();
        assert!(c.checked && c.missing_warm.is_empty(), "{c:?}");
    }
}
