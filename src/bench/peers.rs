// SPDX-License-Identifier: Apache-2.0
//! Peer VMMs that `ember bench --compare` boots side by side with ember: QEMU's microvm
//! machine and Firecracker, each given the same kernel, initrd, command line, vCPUs and
//! memory, with the switches this host needs (see `docs` of [`crate::host`]).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::json::Json;

/// Which peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
    /// Firecracker, run without its API (`--no-api --config-file`).
    Firecracker,
}

impl PeerKind {
    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Qemu => "qemu",
            PeerKind::Firecracker => "firecracker",
        }
    }

    fn default_binary(self) -> &'static str {
        match self {
            PeerKind::Qemu => "qemu-system-x86_64",
            PeerKind::Firecracker => "firecracker",
        }
    }
}

/// A peer VMM that can be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Which one.
    pub kind: PeerKind,
    /// Its executable.
    pub binary: PathBuf,
}

/// The syntax of `--compare`.
pub const COMPARE_SYNTAX: &str = "qemu[=PATH] or firecracker[=PATH]";

/// A parsed `--compare` value: which peer, and its path when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Which peer.
    pub kind: PeerKind,
    /// `NAME=PATH`: its executable; `None`: looked up in `PATH`.
    pub path: Option<PathBuf>,
}

impl PeerKind {
    /// How to install it, for the error when it is missing.
    fn install_hint(self) -> &'static str {
        match self {
            PeerKind::Qemu => "apt-get install qemu-system-x86",
            PeerKind::Firecracker => {
                "a release binary from https://github.com/firecracker-microvm/firecracker/releases"
            }
        }
    }
}

impl PeerSpec {
    /// Parses `qemu`, `qemu=PATH`, `firecracker` (or `fc`), `firecracker=PATH`; an unknown
    /// name is an error.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) => (n.trim(), Some(PathBuf::from(p.trim()))),
            None => (spec.trim(), None),
        };
        let kind = match name {
            "qemu" => PeerKind::Qemu,
            "firecracker" | "fc" => PeerKind::Firecracker,
            other => {
                return Err(format!(
                    "--compare {other:?}: unknown peer; use {COMPARE_SYNTAX}"
                ))
            }
        };
        Ok(PeerSpec { kind, path })
    }

    /// The peer's executable: the given path, or its usual name searched in this process's
    /// `PATH`. A peer that was asked for but is not there is an error that says how to
    /// install it or where to point `--compare`.
    pub fn resolve(&self) -> Result<Peer, String> {
        self.resolve_in(std::env::var_os("PATH").as_deref())
    }

    /// [`Self::resolve`] with `path_var` as `PATH`.
    fn resolve_in(&self, path_var: Option<&OsStr>) -> Result<Peer, String> {
        let (kind, name) = (self.kind, self.kind.name());
        let binary = match &self.path {
            Some(p) => {
                if !is_executable_file(p) {
                    return Err(format!(
                        "--compare {name}={}: {} (give the path of {}, or install it: {})",
                        p.display(),
                        if p.exists() {
                            "not an executable file"
                        } else {
                            "no such file"
                        },
                        kind.default_binary(),
                        kind.install_hint()
                    ));
                }
                p.clone()
            }
            None => find_in_path(kind.default_binary(), path_var).ok_or_else(|| {
                format!(
                    "--compare {name}: {} is not installed (not found in PATH); install it \
                     ({}) or give its path: --compare {name}=PATH",
                    kind.default_binary(),
                    kind.install_hint()
                )
            })?,
        };
        Ok(Peer { kind, binary })
    }
}

/// Resolves a `--compare` value (see [`PeerSpec::parse`] and [`PeerSpec::resolve`]): an
/// unknown name and a peer that is not installed are errors, found before anything boots.
pub fn lookup(spec: &str) -> Result<Peer, String> {
    PeerSpec::parse(spec)?.resolve()
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first executable `name` in the directories of `path_var` (a `PATH` value).
fn find_in_path(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path_var?)
        .map(|d| d.join(name))
        .find(|p| is_executable_file(p))
}

/// The guest every VMM of a bench boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Disk images (`PATH[,ro][,...]`, ember's `--disk` syntax).
    pub disks: Vec<String>,
    /// Root device (`ember run --root`).
    pub root: Option<String>,
    /// What `--root` adds to the command line (`root=... rootfstype=ext4 rw`), for peers.
    pub root_cmdline: Option<String>,
    /// The full command line the guest gets (host switches included).
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// The machine describes itself to the guest with ACPI tables (ember's default;
    /// `--no-acpi` turns it off). QEMU's microvm follows it (`acpi=on`/`acpi=off`);
    /// Firecracker always has ACPI.
    pub acpi: bool,
    /// The guest has a virtio-rng device (ember's default). Peers then get theirs (QEMU's
    /// `virtio-rng-device`, Firecracker's entropy device), so that every VMM's guest probes
    /// the same devices: on a PVM host one virtio-mmio device costs the guest ~0.1 s of
    /// boot (its ACPI entry, the virtio probe, the hwrng driver).
    pub rng: bool,
}

/// Path and read-only flag of an ember `--disk` value.
fn disk_path(spec: &str) -> (&str, bool) {
    let mut parts = spec.split(',');
    let path = parts.next().unwrap_or_default();
    (path, parts.any(|p| p == "ro" || p == "readonly=on"))
}

impl Peer {
    /// Whether the peer reports the guest's boot-timer write (Firecracker `--boot-timer`).
    pub fn has_boot_timer(&self) -> bool {
        self.kind == PeerKind::Firecracker
    }

    /// Whether a console line is the peer's own log line rather than guest output
    /// (Firecracker logs to its stdout, which is also the serial console).
    pub fn is_log_line(&self, line: &str) -> bool {
        self.kind == PeerKind::Firecracker && is_firecracker_log_line(line)
    }

    /// Text of the log line that reports the boot-timer write.
    pub fn boot_timer_line(&self) -> Option<&'static str> {
        (self.kind == PeerKind::Firecracker).then_some("Guest-boot-time")
    }

    /// The command that boots `guest`; files it needs go into `workdir`.
    pub fn command(
        &self,
        guest: &GuestSpec,
        workdir: &Path,
        run: usize,
    ) -> std::io::Result<Command> {
        let mut cmd = Command::new(&self.binary);
        match self.kind {
            PeerKind::Qemu => {
                cmd.args(qemu_args(guest));
            }
            PeerKind::Firecracker => {
                let template = workdir.join(format!("firecracker-cpu-{run}.json"));
                std::fs::write(&template, firecracker_cpu_template().to_pretty())?;
                let config = workdir.join(format!("firecracker-{run}.json"));
                std::fs::write(
                    &config,
                    firecracker_config(guest, Some(&template)).to_pretty(),
                )?;
                cmd.arg("--no-api")
                    .arg("--config-file")
                    .arg(&config)
                    .arg("--boot-timer");
            }
        }
        Ok(cmd)
    }
}

/// Appends `ember.exit=reboot` to a peer's command line unless it already says how the
/// guest ends; returns whether it did. Peers end guests through the i8042 reset line only.
pub fn ask_for_reboot(cmdline: &mut String) -> bool {
    if crate::host::has_param(cmdline, "ember.exit") {
        return false;
    }
    if !cmdline.is_empty() {
        cmdline.push(' ');
    }
    cmdline.push_str("ember.exit=reboot");
    true
}

/// QEMU microvm flags that work on this project's hosts (see /work/shared/kvm-host.md): KVM's
/// hypercall-based PV features off (they hang on PVM), no default devices, the console on
/// stdio, an i8042 so that `reboot=k` ends the VM, and `-no-reboot` so that a reset exits.
/// ACPI as the guest spec says (microvm's own default is on; off, QEMU puts its virtio-mmio
/// devices on the command line and the guest finds its CPUs in the MP table).
pub fn qemu_args(g: &GuestSpec) -> Vec<String> {
    let machine = if g.acpi {
        "microvm,acpi=on"
    } else {
        "microvm,acpi=off"
    };
    let mut a: Vec<String> = [
        "-M",
        machine,
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities,kvm-pv-ipi=off,kvm-pv-unhalt=off,kvm-pv-sched-yield=off",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "i8042",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "-m".into(),
        g.mem_mib.to_string(),
        "-smp".into(),
        g.vcpus.to_string(),
    ]);
    a.extend(["-kernel".into(), g.kernel.display().to_string()]);
    if let Some(i) = &g.initrd {
        a.extend(["-initrd".into(), i.display().to_string()]);
    }
    for (n, d) in g.disks.iter().enumerate() {
        let (path, ro) = disk_path(d);
        let ro = if ro { ",readonly=on" } else { "" };
        a.push("-drive".into());
        a.push(format!("file={path},if=none,id=disk{n},format=raw{ro}"));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=disk{n}"));
    }
    if g.rng {
        a.extend(["-device".into(), "virtio-rng-device".into()]);
    }
    a.extend(["-append".into(), g.cmdline.clone()]);
    a
}

/// A Firecracker custom CPU template that clears KVM's hypercall-based PV features (PV
/// unhalt, send-IPI, sched-yield, map-GPA-range) in CPUID leaf 0x4000_0001, as ember hides
/// them on a PVM host and as [`qemu_args`] does with `kvm-pv-ipi=off,...`: an SMP guest that
/// sees them hangs in its first PV send-IPI hypercall there (a 2-vCPU Firecracker guest did
/// not reach its init in 90 s without this template, and did with it).
pub fn firecracker_cpu_template() -> Json {
    let mut bitmap = ['x'; 32];
    for bit in crate::arch::x86_64::cpuid::HYPERCALL_FEATURES {
        bitmap[31 - bit as usize] = '0';
    }
    let bitmap: String = bitmap.iter().collect();
    Json::obj([(
        "cpuid_modifiers",
        Json::Arr(vec![Json::obj([
            ("leaf", Json::from("0x40000001")),
            ("subleaf", Json::from("0x0")),
            ("flags", Json::from(0u32)),
            (
                "modifiers",
                Json::Arr(vec![Json::obj([
                    ("register", Json::from("eax")),
                    ("bitmap", Json::from(format!("0b{bitmap}"))),
                ])]),
            ),
        ])]),
    )])
}

/// Firecracker's configuration file for `guest`; `cpu_config`: a custom CPU template file
/// ([`firecracker_cpu_template`]).
pub fn firecracker_config(g: &GuestSpec, cpu_config: Option<&Path>) -> Json {
    let mut boot = vec![
        (
            "kernel_image_path",
            Json::from(g.kernel.display().to_string()),
        ),
        ("boot_args", Json::from(g.cmdline.as_str())),
    ];
    if let Some(i) = &g.initrd {
        boot.push(("initrd_path", Json::from(i.display().to_string())));
    }
    let drives = g
        .disks
        .iter()
        .enumerate()
        .map(|(n, d)| {
            let (path, ro) = disk_path(d);
            Json::obj([
                ("drive_id", Json::from(format!("disk{n}"))),
                ("path_on_host", Json::from(path)),
                ("is_root_device", Json::from(false)),
                ("is_read_only", Json::from(ro)),
            ])
        })
        .collect();
    let mut parts = vec![
        ("boot-source", Json::obj(boot)),
        ("drives", Json::Arr(drives)),
        (
            "machine-config",
            Json::obj([
                ("vcpu_count", Json::from(g.vcpus)),
                ("mem_size_mib", Json::from(g.mem_mib)),
            ]),
        ),
    ];
    if g.rng {
        parts.push(("entropy", Json::obj::<&str>([])));
    }
    if let Some(t) = cpu_config {
        parts.push(("cpu-config", Json::from(t.display().to_string())));
    }
    Json::obj(parts)
}

/// Firecracker log lines start with an ISO-8601 timestamp: `2026-11-23T15:49:22.194758174 [`.
pub(crate) fn is_firecracker_log_line(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 30
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && line[19..].contains(" [")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> GuestSpec {
        GuestSpec {
            kernel: "/g/vmlinux".into(),
            initrd: Some("/g/initramfs.cpio".into()),
            disks: vec!["/g/root.ext4,ro".into()],
            root: None,
            root_cmdline: None,
            cmdline: "console=ttyS0 reboot=k ember.cmd=true".into(),
            vcpus: 1,
            mem_mib: 128,
            acpi: true,
            rng: true,
        }
    }

    #[test]
    fn peers_are_asked_to_reboot_unless_the_cmdline_says_otherwise() {
        let mut c = "console=ttyS0 ember.cmd=\"echo ember.exit=poweroff\"".to_string();
        // A word inside a quoted value does not count...
        assert!(ask_for_reboot(&mut c));
        assert!(c.ends_with(" ember.exit=reboot"), "{c}");
        // ...the user's own choice does, and nothing is added twice.
        let mut c = "console=ttyS0 ember.exit=poweroff".to_string();
        assert!(!ask_for_reboot(&mut c));
        assert_eq!(c, "console=ttyS0 ember.exit=poweroff");
        assert!(!ask_for_reboot(&mut "x ember.exit=reboot".to_string()));
        assert!(!ask_for_reboot(
            &mut "x ember.exit=\"poweroff\" y".to_string()
        ));
        let mut c = String::new();
        assert!(ask_for_reboot(&mut c));
        assert_eq!(c, "ember.exit=reboot");
    }

    #[test]
    fn qemu_gets_the_same_guest() {
        let a = qemu_args(&guest()).join(" ");
        assert!(a.contains("-m 128 -smp 1"), "{a}");
        assert!(
            a.contains("-kernel /g/vmlinux -initrd /g/initramfs.cpio"),
            "{a}"
        );
        assert!(
            a.contains("file=/g/root.ext4,if=none,id=disk0,format=raw,readonly=on"),
            "{a}"
        );
        assert!(
            a.ends_with("-append console=ttyS0 reboot=k ember.cmd=true"),
            "{a}"
        );
        assert!(
            a.contains("-device i8042") && a.contains("-no-reboot"),
            "{a}"
        );
        // ACPI as ember's guest has it.
        assert!(a.contains("-M microvm,acpi=on "), "{a}");
        let no_acpi = GuestSpec {
            acpi: false,
            ..guest()
        };
        let a = qemu_args(&no_acpi).join(" ");
        assert!(a.contains("-M microvm,acpi=off "), "{a}");
        // The same virtio-rng device as ember's guest, and none when it has none.
        assert!(a.contains("-device virtio-rng-device "), "{a}");
        let no_rng = GuestSpec {
            rng: false,
            ..guest()
        };
        assert!(!qemu_args(&no_rng).join(" ").contains("rng"));
    }

    #[test]
    fn firecracker_config_has_every_part() {
        let c = firecracker_config(&guest(), None);
        let boot = c.get("boot-source").unwrap();
        assert_eq!(
            boot.get("initrd_path").and_then(Json::as_str),
            Some("/g/initramfs.cpio")
        );
        assert_eq!(
            boot.get("boot_args").and_then(Json::as_str),
            Some("console=ttyS0 reboot=k ember.cmd=true")
        );
        let m = c.get("machine-config").unwrap();
        assert_eq!(m.get("mem_size_mib").and_then(Json::as_u64), Some(128));
        let d = &c.get("drives").and_then(Json::as_array).unwrap()[0];
        assert_eq!(d.get("is_read_only"), Some(&Json::Bool(true)));
        assert_eq!(c.get("cpu-config"), None);
        // The entropy device, as ember's guest has its virtio-rng; none without it.
        assert_eq!(c.get("entropy"), Some(&Json::obj::<&str>([])));
        let no_rng = GuestSpec {
            rng: false,
            ..guest()
        };
        assert_eq!(firecracker_config(&no_rng, None).get("entropy"), None);
        let c = firecracker_config(&guest(), Some(Path::new("/w/cpu.json")));
        assert_eq!(
            c.get("cpu-config").and_then(Json::as_str),
            Some("/w/cpu.json")
        );
    }

    #[test]
    fn firecracker_cpu_template_clears_the_hypercall_features() {
        let t = firecracker_cpu_template();
        let m = &t.get("cpuid_modifiers").and_then(Json::as_array).unwrap()[0];
        assert_eq!(m.get("leaf").and_then(Json::as_str), Some("0x40000001"));
        let r = &m.get("modifiers").and_then(Json::as_array).unwrap()[0];
        assert_eq!(r.get("register").and_then(Json::as_str), Some("eax"));
        let bitmap = r.get("bitmap").and_then(Json::as_str).unwrap();
        // 0b, then bit 31 first: PV unhalt (7), send-IPI (11), sched-yield (13) and
        // map-GPA-range (16) cleared, every other bit left as KVM has it.
        assert_eq!(bitmap, "0bxxxxxxxxxxxxxxx0xx0x0xxx0xxxxxxx");
    }

    #[test]
    fn lookup_names_and_missing_peers() {
        assert!(lookup("bochs").unwrap_err().contains("unknown peer"));
        // A path given that is not there, or not executable: an error naming it.
        let e = lookup("firecracker=/nonexistent/fc").unwrap_err();
        assert!(e.contains("/nonexistent/fc: no such file"), "{e}");
        let sh = lookup("qemu=/bin/sh").unwrap();
        assert_eq!(
            sh,
            Peer {
                kind: PeerKind::Qemu,
                binary: "/bin/sh".into()
            }
        );
        assert_eq!(
            PeerSpec::parse("fc").unwrap(),
            PeerSpec {
                kind: PeerKind::Firecracker,
                path: None
            }
        );

        // Not in PATH (a directory without it, an empty PATH, none at all): an error with
        // both fixes.
        let dir = std::env::temp_dir().join(format!("ember-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let qemu = PeerSpec::parse("qemu").unwrap();
        for path_var in [Some(dir.as_os_str()), Some(OsStr::new("")), None] {
            let e = qemu.resolve_in(path_var).unwrap_err();
            assert!(e.contains("qemu-system-x86_64 is not installed"), "{e}");
            assert!(e.contains("apt-get install qemu-system-x86"), "{e}");
            assert!(e.contains("--compare qemu=PATH"), "{e}");
        }
        let e = PeerSpec::parse("firecracker")
            .unwrap()
            .resolve_in(Some(dir.as_os_str()))
            .unwrap_err();
        assert!(e.contains("--compare firecracker=PATH"), "{e}");
        // A file of that name that is not executable does not count, given or in PATH; an
        // executable does.
        let fake = dir.join("qemu-system-x86_64");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(qemu.resolve_in(Some(dir.as_os_str())).is_err());
        let e = lookup(&format!("qemu={}", fake.display())).unwrap_err();
        assert!(e.contains("not an executable file"), "{e}");
        assert!(e.contains("apt-get install qemu-system-x86"), "{e}");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path_var = std::env::join_paths([Path::new("/nonexistent"), &dir]).unwrap();
        assert_eq!(
            qemu.resolve_in(Some(&path_var)).unwrap(),
            Peer {
                kind: PeerKind::Qemu,
                binary: fake
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn firecracker_log_lines() {
        let p = Peer {
            kind: PeerKind::Firecracker,
            binary: "fc".into(),
        };
        assert!(p.is_log_line(
            "2026-11-23T15:49:22.194758174 [anonymous-instance:main] Running Firecracker"
        ));
        assert!(!p.is_log_line("[    0.000000] Linux version 6.1.192"));
        assert!(!p.is_log_line("ember-init: running: true"));
        let q = Peer {
            kind: PeerKind::Qemu,
            binary: "q".into(),
        };
        assert!(!q.is_log_line("2026-11-23T15:49:22.194758174 [anonymous-instance:main] x"));
    }
}
