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
    /// The tree's modules cannot be offered to the guest.
    #[error("--kernel-tree: {0}")]
    Modules(String),
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

/// The tag of the read-only share that carries a kernel tree's modules into the guest.
pub const TREE_SHARE_TAG: &str = "ktree";

/// A kernel tree's loadable modules, as the guest's `modprobe` finds them: the tree is
/// shared read-only at its host path, and `/lib/modules/RELEASE/` (in the exec archive)
/// holds `modules.dep`, computed here from each module's `.modinfo` (`depends=`), and one
/// symbolic link per module into the shared tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeModules {
    /// The kernel release (`include/config/kernel.release`): the directory under
    /// `/lib/modules`.
    pub release: String,
    /// `modules.dep`: `kernel/PATH.ko: DEPENDENCIES...`, each module's dependencies listed so
    /// that the last is loaded first.
    pub dep: String,
    /// `(kernel/PATH.ko, absolute path of the module in the tree)` for each module.
    pub links: Vec<(String, PathBuf)>,
}

/// The modules of the tree `dir`, or `None` when it has none to offer (no `CONFIG_MODULES=y`
/// in its `.config`, or no `modules.order`: `make modules` has not run).
pub fn modules(dir: &Path) -> Result<Option<TreeModules>, KernelTreeError> {
    let config = std::fs::read_to_string(dir.join(".config")).unwrap_or_default();
    if !config.lines().any(|l| l.trim() == "CONFIG_MODULES=y") {
        return Ok(None);
    }
    let Ok(order) = std::fs::read_to_string(dir.join("modules.order")) else {
        return Ok(None);
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| KernelTreeError::ReadConfig(dir.to_path_buf(), e))?;
    let release_path = dir.join("include/config/kernel.release");
    let release = std::fs::read_to_string(&release_path)
        .map_err(|e| KernelTreeError::ReadConfig(release_path.clone(), e))?
        .trim()
        .to_string();
    if release.is_empty() || release.contains('/') {
        return Err(KernelTreeError::Modules(format!(
            "{} does not hold a kernel release",
            release_path.display()
        )));
    }
    // name -> (kernel/PATH.ko, depends)
    let mut by_name: std::collections::BTreeMap<String, (String, Vec<String>)> = Default::default();
    let mut links = Vec::new();
    for line in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let rel = line.strip_prefix("kernel/").unwrap_or(line);
        let rel = match rel.strip_suffix(".o") {
            Some(stem) => format!("{stem}.ko"),
            None => rel.to_string(),
        };
        if rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
            continue;
        }
        let path = dir.join(&rel);
        let Ok(info) = modinfo(&path) else {
            log::debug!("--kernel-tree: {} is not built; skipped", path.display());
            continue;
        };
        let stem = Path::new(&rel)
            .file_stem()
            .map(|s| s.to_string_lossy().replace('-', "_"))
            .unwrap_or_default();
        let name = info
            .iter()
            .find_map(|(k, v)| (k == "name").then(|| v.clone()))
            .unwrap_or(stem);
        let depends = info
            .iter()
            .find_map(|(k, v)| (k == "depends").then(|| v.clone()))
            .unwrap_or_default()
            .split(',')
            .map(|d| d.trim().replace('-', "_"))
            .filter(|d| !d.is_empty())
            .collect();
        let entry = format!("kernel/{rel}");
        links.push((entry.clone(), path));
        by_name.insert(name, (entry, depends));
    }
    let mut dep = String::new();
    for (entry, _) in by_name.values() {
        // Load order: every dependency before what needs it (depth first, post-order);
        // modules.dep lists it the other way round.
        let mut order = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let own = by_name
            .iter()
            .find(|(_, (e, _))| e == entry)
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        visit(&own, &by_name, &mut seen, &mut order);
        order.retain(|e| e != entry);
        order.reverse();
        dep.push_str(entry);
        dep.push(':');
        for d in order {
            dep.push(' ');
            dep.push_str(&d);
        }
        dep.push('\n');
    }
    Ok(Some(TreeModules {
        release,
        dep,
        links,
    }))
}

fn visit(
    name: &str,
    by_name: &std::collections::BTreeMap<String, (String, Vec<String>)>,
    seen: &mut std::collections::BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(name.to_string()) {
        return;
    }
    let Some((entry, depends)) = by_name.get(name) else {
        return;
    };
    for d in depends {
        visit(d, by_name, seen, order);
    }
    order.push(entry.clone());
}

/// The `key=value` pairs of the `.modinfo` section of the ELF module at `path` (only the
/// headers and that section are read: modules with debug information are large).
pub fn modinfo(path: &Path) -> std::io::Result<Vec<(String, String)>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an ELF64 module");
    let read = |off: u64, n: u64| -> std::io::Result<Vec<u8>> {
        // Sections of a module are never near this big; a larger one is a damaged file.
        if n > (16 << 20) || off.checked_add(n).is_none_or(|end| end > len) {
            return Err(bad());
        }
        let mut b = vec![0u8; usize::try_from(n).map_err(|_| bad())?];
        f.read_exact_at(&mut b, off)?;
        Ok(b)
    };
    let eh = read(0, 64)?;
    if eh.get(..5) != Some(b"\x7fELF\x02") {
        return Err(bad());
    }
    let u16_at = |b: &[u8], at: usize| u64::from(u16::from_le_bytes([b[at], b[at + 1]]));
    let u32_at = |b: &[u8], at: usize| {
        u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
    };
    let u64_at = |b: &[u8], at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    };
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(&eh, 0x28),
        u16_at(&eh, 0x3a),
        u16_at(&eh, 0x3c),
        u16_at(&eh, 0x3e),
    );
    if shentsize < 64 || shstrndx >= shnum {
        return Err(bad());
    }
    let table = read(shoff, shnum * shentsize)?;
    let section = |i: u64| {
        let h = usize::try_from(i * shentsize).unwrap_or(usize::MAX);
        (
            u32_at(&table, h),
            u64_at(&table, h + 0x18),
            u64_at(&table, h + 0x20),
        )
    };
    let (_, str_off, str_size) = section(shstrndx);
    let strtab = read(str_off, str_size)?;
    for i in 0..shnum {
        let (name, off, size) = section(i);
        let Some(n) = usize::try_from(name).ok().and_then(|n| strtab.get(n..)) else {
            continue;
        };
        if !n.starts_with(b".modinfo\0") {
            continue;
        }
        let data = read(off, size)?;
        return Ok(data
            .split(|&b| b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "no .modinfo section",
    ))
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

    /// A module built by the host's C compiler: an ELF object whose `.modinfo` holds `info`.
    fn module(path: &Path, info: &str) -> bool {
        let c = path.with_extension("c");
        let bytes: String = info
            .bytes()
            .map(|b| {
                if b == 0 {
                    "\\0".to_string()
                } else {
                    (b as char).to_string()
                }
            })
            .collect();
        std::fs::write(
            &c,
            format!(
                "__attribute__((section(\".modinfo\"), used)) static const char info[] = \"{bytes}\";\nint f(void) {{ return 1; }}\n"
            ),
        )
        .unwrap();
        std::process::Command::new("cc")
            .arg("-c")
            .arg(&c)
            .arg("-o")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn tree_modules_get_a_modules_dep_from_their_modinfo() {
        let dir = std::env::temp_dir().join(format!("ember-ktree-mods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("drivers/x")).unwrap();
        std::fs::create_dir_all(dir.join("lib/y")).unwrap();
        std::fs::create_dir_all(dir.join("include/config")).unwrap();
        let built = module(
            &dir.join("drivers/x/a.ko"),
            "name=a\0depends=b\0license=GPL",
        ) && module(&dir.join("lib/y/b-mod.ko"), "license=GPL\0depends=\0name=b")
            && module(&dir.join("drivers/x/c.ko"), "depends=a\0name=c");
        if !built {
            eprintln!("note: no C compiler; tree_modules test skipped");
            return;
        }
        // No modules without CONFIG_MODULES=y, or before `make modules`.
        std::fs::write(dir.join(".config"), "# CONFIG_MODULES is not set\n").unwrap();
        assert_eq!(modules(&dir).unwrap(), None);
        std::fs::write(dir.join(".config"), "CONFIG_MODULES=y\n").unwrap();
        assert_eq!(modules(&dir).unwrap(), None);
        std::fs::write(
            dir.join("modules.order"),
            "drivers/x/a.o\nlib/y/b-mod.o\ndrivers/x/c.ko\ndrivers/x/missing.o\n../../etc/passwd.ko\n",
        )
        .unwrap();
        let e = modules(&dir).unwrap_err();
        assert!(e.to_string().contains("kernel.release"), "{e}");
        std::fs::write(dir.join("include/config/kernel.release"), "6.1.0-test\n").unwrap();
        let m = modules(&dir).unwrap().unwrap();
        assert_eq!(m.release, "6.1.0-test");
        assert_eq!(
            m.dep,
            "kernel/drivers/x/a.ko: kernel/lib/y/b-mod.ko\n\
             kernel/lib/y/b-mod.ko:\n\
             kernel/drivers/x/c.ko: kernel/drivers/x/a.ko kernel/lib/y/b-mod.ko\n"
        );
        let canon = dir.canonicalize().unwrap();
        assert_eq!(
            m.links.len(),
            3,
            "the missing and the escaping one are left out"
        );
        assert!(m
            .links
            .iter()
            .all(|(e, p)| p.starts_with(&canon) && e.starts_with("kernel/")));
        assert_eq!(
            modinfo(&canon.join("lib/y/b-mod.ko")).unwrap()[2],
            ("name".into(), "b".into())
        );
        assert!(modinfo(&dir.join(".config")).is_err());
        // The exec archive carries modules.dep and the links.
        let mut spec = super::super::ExecSpec::new(vec!["true".into()]);
        spec.modules = Some(m);
        let archive = spec.archive().unwrap();
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains("lib/modules/6.1.0-test/modules.dep"));
        assert!(text.contains(&format!("{}/drivers/x/c.ko", canon.display())));
        let _ = std::fs::remove_dir_all(dir);
    }
}
