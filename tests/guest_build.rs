//! Tests for the guest build helpers in resources/guest/ that need no kernel build:
//! verify-config.sh (the fragment-vs-.config check of build.sh) and, when busybox is
//! installed, the /init command-line parser (resources/guest/test-init.sh).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/guest")
}

/// A fresh scratch directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ember-guest-build-{}-{}-{}",
            tag,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const DOTCONFIG: &str = "\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_NR_CPUS=4
CONFIG_SERIAL_8250_NR_UARTS=2
CONFIG_SERIAL_8250_RUNTIME_UARTS=1
CONFIG_DEVMEM=y
# CONFIG_STRICT_DEVMEM is not set
CONFIG_IPV6=y
# CONFIG_ACPI is not set
CONFIG_CMDLINE=\"console=ttyS0\"
";

fn verify(tag: &str, fragment: &str) -> Output {
    let tmp = TempDir::new(tag);
    let frag = tmp.0.join("config.fragment");
    let dotconfig = tmp.0.join(".config");
    fs::write(&frag, fragment).unwrap();
    fs::write(&dotconfig, DOTCONFIG).unwrap();
    Command::new("bash")
        .arg(guest_dir().join("verify-config.sh"))
        .arg(&frag)
        .arg(&dotconfig)
        .output()
        .expect("run verify-config.sh")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn verify_config_passes_when_every_option_holds() {
    let out = verify(
        "pass",
        "# a comment line that is not an option\n\
         CONFIG_64BIT=y\n\
         CONFIG_NR_CPUS=4\n\
         CONFIG_SERIAL_8250_NR_UARTS=2\n\
         CONFIG_CMDLINE=\"console=ttyS0\"\n\
         # CONFIG_STRICT_DEVMEM is not set\n\
         # CONFIG_ACPI is not set\n\
         \n\
         # absent from .config (dependencies off) counts as not set\n\
         # CONFIG_PCI is not set\n",
    );
    assert!(
        out.status.success(),
        "expected success, got:\n{}",
        text(&out)
    );
}

#[test]
fn verify_config_names_every_mismatching_option() {
    let out = verify(
        "fail",
        "CONFIG_64BIT=y\n\
         # missing from .config entirely:\n\
         CONFIG_VIRTIO_BLK=y\n\
         # present but enabled, fragment wants it off:\n\
         # CONFIG_IPV6 is not set\n\
         # wrong value:\n\
         CONFIG_NR_CPUS=8\n\
         # wants y, .config says is not set:\n\
         CONFIG_STRICT_DEVMEM=y\n\
         # CONFIG_ACPI is not set\n",
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, got:\n{all}");
    for name in [
        "CONFIG_VIRTIO_BLK",
        "CONFIG_IPV6",
        "CONFIG_NR_CPUS",
        "CONFIG_STRICT_DEVMEM",
    ] {
        assert!(all.contains(name), "output does not name {name}:\n{all}");
    }
    for ok in ["CONFIG_64BIT", "CONFIG_ACPI"] {
        assert!(!all.contains(ok), "output names {ok}, which holds:\n{all}");
    }
}

#[test]
fn verify_config_rejects_bad_usage() {
    let out = Command::new("bash")
        .arg(guest_dir().join("verify-config.sh"))
        .arg("/nonexistent/fragment")
        .output()
        .expect("run verify-config.sh");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn init_cmdline_parsing() {
    let have_busybox = Command::new("busybox")
        .arg("true")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_busybox {
        eprintln!("skipping: busybox not installed");
        return;
    }
    let out = Command::new("bash")
        .arg(guest_dir().join("test-init.sh"))
        .output()
        .expect("run test-init.sh");
    assert!(out.status.success(), "test-init.sh failed:\n{}", text(&out));
}
