// SPDX-License-Identifier: Apache-2.0
//! `ember exec`: run one command in a throwaway microVM and exit with its status.
//!
//! The command, its environment and the `--file` inputs reach the guest as an extra newc cpio
//! archive ([`crate::cpio`]) that ember appends to the guest's initramfs (Linux unpacks
//! concatenated archives). The archive holds:
//!
//! - `/ember/cmd`: a `sh` script that `exec`s the command's argv, every argument
//!   single-quoted ([`shell_quote`]), so spaces, quotes, `$`, backslashes and newlines arrive
//!   intact;
//! - `/ember/env`: `export K='V'` lines: `EMBER_CWD` (the `--workdir`) first, then every
//!   `--env`;
//! - the `--file`s, by default under `/root` (which is also the default working directory).
//!
//! The guest's init (resources/guest/init; the protocol is in docs/exec.md) runs the script
//! with stdout on the console (COM1, ember's stdout) and stderr on COM2 (ember's stderr),
//! drains both UARTs, and writes the status to the exit device (MMIO 0xC000_1000), which
//! ends the VM with [`ExitReason::GuestStatus`]. The status is never scraped from the
//! console. [`exit_status`] turns the way the VM ended into ember's exit status.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::config::{ConsoleSink, VmConfig};
use crate::cpio::{CpioError, CpioWriter};
use crate::exit::{code, ExitReason};
use crate::vmm::RunOutcome;

pub mod kernel_tree;
pub mod report;
pub mod warm;

/// The guest command line of `ember exec` (before `--append` and ember's host switches):
/// console on COM1, a second UART for stderr, `reboot=k` so the guest's `reboot -f` ends
/// the VM, `panic=-1` so a panic does too, and the kernel kept quiet (`loglevel=1`: only
/// emergency messages such as a panic reach the console, so stdout stays the command's).
/// `random.trust_cpu=on rodata=off retain_initrd noreplace-smp` save boot time (see
/// [`crate::config::DEFAULT_GUEST_TUNING`]).
pub const EXEC_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=2 \
     random.trust_cpu=on rodata=off retain_initrd noreplace-smp quiet loglevel=1";

/// Where `--file` puts files without a guest path, and the default working directory.
pub const DEFAULT_GUEST_DIR: &str = "/root";

/// The archive's directory for ember's own files (reserved).
const EMBER_DIR: &str = "/ember";

/// Guest directories that `--file` may not write into: ember's own, and those the default
/// guest's init mounts over (their archive contents would be hidden). Not `/tmp`: the
/// initramfs root is already a writable tmpfs/ramfs, so the default guest's init leaves its
/// `/tmp` alone (only a disk root gets a tmpfs there, see resources/guest/build.sh).
const RESERVED_DIRS: [&str; 4] = [EMBER_DIR, "/proc", "/sys", "/dev"];

/// The guest's `/tmp`, with its usual mode (world-writable, sticky) in the archive.
const TMP_DIR: &str = "/tmp";
const TMP_MODE: u32 = 0o1777;

/// Errors while preparing the command's archive.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No command after `--`.
    #[error("no command given: put it after `--`, e.g. `ember exec -- uname -r`")]
    NoCommand,
    /// `--env` without a valid name.
    #[error(
        "--env {0:?}: the name must be letters, digits and `_`, not starting with a digit \
         (use --env NAME=VALUE, or --env NAME to pass this process's value)"
    )]
    BadEnvName(String),
    /// `--env NAME` for a variable this process does not have.
    #[error("--env {0}: no such variable in ember's environment (use --env {0}=VALUE)")]
    EnvNotSet(String),
    /// `--file` with an empty part.
    #[error("--file {0:?}: expected HOST_PATH or HOST_PATH:GUEST_PATH")]
    BadFileSpec(String),
    /// The host file cannot be read.
    #[error("--file {path}: cannot read it")]
    ReadFile {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A host file of a kind that cannot be copied (socket, device, fifo).
    #[error("--file {0}: only regular files, directories and symbolic links can be copied")]
    FileKind(PathBuf),
    /// The guest path is in a directory the guest hides or ember owns.
    #[error(
        "--file guest path {path}: files under {dir} would not be visible to the command \
         ({dir} is ember's or is mounted over by the guest's init); choose another path, \
         e.g. /root/..."
    )]
    ReservedPath {
        /// The guest path.
        path: String,
        /// The reserved directory it is in.
        dir: &'static str,
    },
    /// `--workdir` is not absolute.
    #[error("--workdir {0:?} must be an absolute guest path")]
    BadWorkdir(String),
    /// A `--share` whose path is one the guest's init mounts over or ember owns.
    #[error(
        "--share {path}: the guest mounts shares at their host path, and {dir} is ember's or is \
         mounted over by the guest's init; share another directory"
    )]
    ReservedShare {
        /// The host directory.
        path: String,
        /// The reserved directory it is in.
        dir: &'static str,
    },
    /// The guest path is not valid UTF-8.
    #[error("--file guest path {0:?} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    /// Building the archive failed.
    #[error("cannot build the guest archive")]
    Archive(#[from] CpioError),
}

/// One `--file HOST_PATH[:GUEST_PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// The file or directory on the host.
    pub host: PathBuf,
    /// Where it goes in the guest, as given (`None`: `/root/<basename>`).
    pub guest: Option<String>,
}

impl FileSpec {
    /// The help text of `--file`.
    pub const SYNTAX: &'static str = "HOST_PATH[:GUEST_PATH]";

    /// The absolute guest path: GUEST_PATH when absolute, `/root/GUEST_PATH` when relative,
    /// `GUEST_PATH<basename>` when it ends in `/`, `/root/<basename>` when left out.
    pub fn guest_path(&self) -> Result<String, ExecError> {
        let base = || -> Result<String, ExecError> {
            let name = self
                .host
                .file_name()
                .ok_or_else(|| ExecError::BadFileSpec(self.host.display().to_string()))?;
            name.to_str()
                .map(str::to_string)
                .ok_or_else(|| ExecError::NonUtf8Path(self.host.clone()))
        };
        let path = match &self.guest {
            None => format!("{DEFAULT_GUEST_DIR}/{}", base()?),
            Some(g) => {
                let g = if g.starts_with('/') {
                    g.clone()
                } else {
                    format!("{DEFAULT_GUEST_DIR}/{g}")
                };
                if g.ends_with('/') {
                    format!("{g}{}", base()?)
                } else {
                    g
                }
            }
        };
        for dir in RESERVED_DIRS {
            if path == dir || path.starts_with(&format!("{dir}/")) {
                return Err(ExecError::ReservedPath { path, dir });
            }
        }
        Ok(path)
    }
}

impl FromStr for FileSpec {
    type Err = ExecError;

    /// `HOST` or `HOST:GUEST`, split at the first `:`.
    fn from_str(s: &str) -> Result<Self, ExecError> {
        let (host, guest) = match s.split_once(':') {
            Some((h, g)) => (h, Some(g)),
            None => (s, None),
        };
        if host.is_empty() || guest.is_some_and(str::is_empty) {
            return Err(ExecError::BadFileSpec(s.to_string()));
        }
        Ok(FileSpec {
            host: PathBuf::from(host),
            guest: guest.map(str::to_string),
        })
    }
}

/// One `--env NAME=VALUE` (or `--env NAME`, taking ember's own value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// The name.
    pub name: String,
    /// The value.
    pub value: OsString,
}

impl EnvVar {
    /// The help text of `--env`.
    pub const SYNTAX: &'static str = "NAME[=VALUE]";

    /// Parses `NAME=VALUE`; a bare `NAME` takes the value from this process's environment.
    pub fn parse(s: &OsStr) -> Result<Self, ExecError> {
        let bytes = s.as_bytes();
        let (name, value) = match bytes.iter().position(|&b| b == b'=') {
            Some(i) => (&bytes[..i], Some(OsStr::from_bytes(&bytes[i + 1..]))),
            None => (bytes, None),
        };
        let name = std::str::from_utf8(name)
            .ok()
            .filter(|n| valid_env_name(n))
            .ok_or_else(|| ExecError::BadEnvName(s.to_string_lossy().into_owned()))?
            .to_string();
        let value = match value {
            Some(v) => v.to_os_string(),
            None => std::env::var_os(&name).ok_or_else(|| ExecError::EnvNotSet(name.clone()))?,
        };
        Ok(EnvVar { name, value })
    }
}

fn valid_env_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// The command and its arguments.
    pub argv: Vec<OsString>,
    /// Environment variables, in order (a later one wins).
    pub env: Vec<EnvVar>,
    /// Files and directories to copy in.
    pub files: Vec<FileSpec>,
    /// The working directory in the guest.
    pub workdir: String,
    /// Host directories shared with the guest (`--share`), mounted by its init.
    pub shares: Vec<SharedDir>,
    /// A kernel tree's modules (`--kernel-tree`): `/lib/modules/RELEASE` in the archive.
    pub modules: Option<kernel_tree::TreeModules>,
}

/// A `--share` as the guest's init mounts it: tag, guest path (the host directory's absolute
/// path), read-only or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    /// The virtio-fs tag.
    pub tag: String,
    /// Where it is mounted in the guest: the same absolute path as on the host.
    pub path: String,
    /// Mounted read-only (the host refuses writes either way).
    pub readonly: bool,
}

impl SharedDir {
    /// The mounts of `shares` (`VmConfig::shares` order: tags `share0`, ... by position).
    pub fn resolve_all(shares: &[crate::config::ShareConfig]) -> Result<Vec<Self>, ExecError> {
        shares
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let dir = s.dir.canonicalize().map_err(|source| ExecError::ReadFile {
                    path: s.dir.clone(),
                    source,
                })?;
                let path = dir
                    .to_str()
                    .filter(|p| !p.contains('\n'))
                    .ok_or_else(|| ExecError::NonUtf8Path(dir.clone()))?
                    .to_string();
                if path == "/" {
                    return Err(ExecError::ReservedShare { path, dir: "/" });
                }
                // Shares are mounted after init's own mounts, so /tmp is fine; these are not.
                for reserved in [EMBER_DIR, "/proc", "/sys", "/dev"] {
                    if path == reserved || path.starts_with(&format!("{reserved}/")) {
                        return Err(ExecError::ReservedShare {
                            path,
                            dir: reserved,
                        });
                    }
                }
                Ok(SharedDir {
                    tag: s.tag(i),
                    path,
                    readonly: s.readonly,
                })
            })
            .collect()
    }

    /// ember's working directory, when it is inside one of `shares` (the command then runs
    /// there, as `make` in a checkout would on the host).
    pub fn workdir_inside(shares: &[SharedDir]) -> Option<String> {
        Self::workdir_within(shares, &std::env::current_dir().ok()?)
    }

    /// `cwd`, when it is inside one of `shares`.
    pub fn workdir_within(shares: &[SharedDir], cwd: &Path) -> Option<String> {
        let cwd = cwd.canonicalize().ok()?;
        let cwd = cwd.to_str()?;
        shares
            .iter()
            .any(|s| cwd == s.path || cwd.starts_with(&format!("{}/", s.path)))
            .then(|| cwd.to_string())
    }
}

impl ExecSpec {
    /// A command with no environment, no files, in [`DEFAULT_GUEST_DIR`].
    pub fn new(argv: Vec<OsString>) -> Self {
        Self {
            argv,
            env: Vec::new(),
            files: Vec::new(),
            workdir: DEFAULT_GUEST_DIR.to_string(),
            shares: Vec::new(),
            modules: None,
        }
    }

    /// The cpio archive to append to the guest's initramfs.
    pub fn archive(&self) -> Result<Vec<u8>, ExecError> {
        if !self.workdir.starts_with('/') {
            return Err(ExecError::BadWorkdir(self.workdir.clone()));
        }
        let script = command_script(&self.argv)?;
        let mut w = CpioWriter::new();
        w.add_dir(EMBER_DIR, 0o755)?;
        w.add_file("/ember/cmd", 0o755, 0, script)?;
        w.add_file("/ember/env", 0o644, 0, env_script(&self.workdir, &self.env))?;
        if !self.shares.is_empty() {
            w.add_file("/ember/mounts", 0o644, 0, mounts_file(&self.shares))?;
        }
        if let Some(m) = &self.modules {
            // modprobe's view of the tree: modules.dep and a link per module into the tree,
            // which is shared at its host path.
            let base = format!("/lib/modules/{}", m.release);
            w.add_file(
                &format!("{base}/modules.dep"),
                0o644,
                0,
                m.dep.clone().into_bytes(),
            )?;
            for (entry, target) in &m.links {
                w.add_symlink(
                    &format!("{base}/{entry}"),
                    target.as_os_str().as_encoded_bytes(),
                    0,
                )?;
            }
        }
        w.add_dir(DEFAULT_GUEST_DIR, 0o700)?;
        for f in &self.files {
            let guest = f.guest_path()?;
            if guest.starts_with(&format!("{TMP_DIR}/")) {
                // Before its entries: the archive's first mode wins, and the unpackers
                // (the kernel's, vsock-io) give an existing directory the archive's mode;
                // a parent made on the fly would leave the guest's /tmp 0755.
                w.add_dir(TMP_DIR, TMP_MODE)?;
            }
            add_host_path(&mut w, &f.host, &guest, true)?;
        }
        Ok(w.finish())
    }

    /// Turns `base` (kernel, initrd, vCPUs, memory, the user's `--append` words in its
    /// cmdline) into the exec VM: the archive appended to the initrd, console on stdout,
    /// COM2 on stderr, no stdin, and the exit device ending the VM.
    pub fn apply(&self, base: &mut VmConfig) -> Result<(), ExecError> {
        base.initrd_append = Some(self.archive()?);
        exec_devices(base);
        Ok(())
    }
}

/// The devices of every exec VM: console on stdout, COM2 on stderr, no stdin, and the exit
/// device ending the VM.
pub fn exec_devices(c: &mut VmConfig) {
    c.console = ConsoleSink::Stdout;
    c.com2 = Some(ConsoleSink::Stderr);
    c.stdin = false;
    c.exit_on_status = true;
}

/// Single-quotes `arg` for `sh`: `'...'`, with each `'` written as `'\''`. Everything else
/// (spaces, `"`, `$`, `` ` ``, `\`, newlines, non-UTF-8 bytes) is literal inside single
/// quotes.
pub fn shell_quote(arg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(b'\'');
    for &b in arg {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// The `/ember/cmd` script: `exec` of the argv, each argument quoted. `exec` saves a fork
/// (costly in this guest) and makes the command's status the script's; a command that is
/// not found ends with 127 as in any shell.
pub fn command_script(argv: &[OsString]) -> Result<Vec<u8>, ExecError> {
    let first = argv.first().ok_or(ExecError::NoCommand)?;
    let mut s = b"#!/bin/sh\n# written by ember exec\nexec".to_vec();
    if first.as_bytes().starts_with(b"-") {
        // A command starting with '-' would read as an option of `exec`.
        s.extend_from_slice(b" --");
    }
    for a in argv {
        s.push(b' ');
        s.extend_from_slice(&shell_quote(a.as_bytes()));
    }
    s.push(b'\n');
    Ok(s)
}

/// The `/ember/env` script: `export EMBER_CWD=...` then one `export NAME='VALUE'` line per
/// variable.
pub fn env_script(workdir: &str, env: &[EnvVar]) -> Vec<u8> {
    let mut s = b"export EMBER_CWD=".to_vec();
    s.extend_from_slice(&shell_quote(workdir.as_bytes()));
    s.push(b'\n');
    for v in env {
        s.extend_from_slice(b"export ");
        s.extend_from_slice(v.name.as_bytes());
        s.push(b'=');
        s.extend_from_slice(&shell_quote(v.value.as_bytes()));
        s.push(b'\n');
    }
    s
}

/// The `/ember/mounts` file: one `ro|rw TAG PATH` line per share (the path last, so that it
/// may hold spaces; it holds no newline).
pub fn mounts_file(shares: &[SharedDir]) -> Vec<u8> {
    let mut s = String::new();
    for m in shares {
        let mode = if m.readonly { "ro" } else { "rw" };
        s.push_str(&format!("{mode} {} {}\n", m.tag, m.path));
    }
    s.into_bytes()
}

/// Adds a host file, symlink or directory tree at `guest`. The top-level path is followed
/// when it is a symlink (`follow`); links inside a directory are copied as links.
fn add_host_path(
    w: &mut CpioWriter,
    host: &Path,
    guest: &str,
    follow: bool,
) -> Result<(), ExecError> {
    let read_err = |source| ExecError::ReadFile {
        path: host.to_path_buf(),
        source,
    };
    let meta = if follow {
        std::fs::metadata(host)
    } else {
        std::fs::symlink_metadata(host)
    }
    .map_err(read_err)?;
    let mtime = u32::try_from(meta.mtime().max(0)).unwrap_or(u32::MAX);
    let mode = meta.permissions().mode();
    let ft = meta.file_type();
    if ft.is_file() {
        // Opened without blocking: the path may have become a FIFO since the stat.
        let data = crate::user_file::read_regular(host).map_err(read_err)?;
        w.add_file(guest, mode, mtime, data)?;
    } else if ft.is_symlink() {
        let target = std::fs::read_link(host).map_err(read_err)?;
        w.add_symlink(guest, target.as_os_str().as_bytes(), mtime)?;
    } else if ft.is_dir() {
        w.add_dir(guest, mode)?;
        let mut children = std::fs::read_dir(host)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err)?;
        children.sort();
        for name in children {
            let name_str = name
                .to_str()
                .ok_or_else(|| ExecError::NonUtf8Path(host.join(&name)))?;
            add_host_path(w, &host.join(&name), &format!("{guest}/{name_str}"), false)?;
        }
    } else {
        return Err(ExecError::FileKind(host.to_path_buf()));
    }
    Ok(())
}

/// How an exec run ended, for the process exit status and the message on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecStatus {
    /// ember's exit status.
    pub code: u8,
    /// What to tell the user on stderr (nothing when the command's status came back).
    pub message: Option<String>,
}

/// ember's exit status for an exec run: the command's status (0..=255) when the guest
/// reported one; [`code::EXEC_TIMEOUT`] (124) when `--timeout` elapsed; 128 + the signal
/// number when ember was stopped by SIGINT/SIGTERM/SIGHUP; [`code::EXEC_NO_STATUS`] (125)
/// when the VM ended any other way (boot failure, panic, crash, VMM error, an init that does
/// not implement the protocol).
pub fn exit_status(outcome: &RunOutcome, timeout_secs: Option<f64>) -> ExecStatus {
    let none = |code, msg: String| ExecStatus {
        code,
        message: Some(msg),
    };
    match &outcome.reason {
        ExitReason::GuestStatus(s) => match u8::try_from(*s) {
            Ok(code) => ExecStatus {
                code,
                message: None,
            },
            Err(_) => none(
                code::EXEC_NO_STATUS,
                format!("the guest reported exit status {s}, outside 0..=255"),
            ),
        },
        ExitReason::Timeout => none(
            code::EXEC_TIMEOUT,
            format!(
                "timeout: the command did not finish within {}s of ember's start (boot \
                 included); the VM was stopped",
                timeout_secs.unwrap_or(0.0)
            ),
        ),
        ExitReason::Stopped { .. } => {
            let sig = outcome.stop_signal.unwrap_or(libc::SIGTERM);
            let code = u8::try_from(i32::from(code::EXEC_SIGNAL_BASE) + sig)
                .unwrap_or(code::EXEC_NO_STATUS);
            none(code, format!("stopped by signal {sig}: the VM was stopped"))
        }
        ExitReason::Reset | ExitReason::PowerOff => none(
            code::EXEC_NO_STATUS,
            "the guest ended without reporting the command's exit status: its init does not \
             implement ember exec's protocol (see docs/exec.md), or it could not run the \
             command"
                .into(),
        ),
        other => none(
            code::EXEC_NO_STATUS,
            format!("the command's exit status is unknown: {}", other.describe()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::ExitCounts;
    use std::process::Command;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    /// Runs `script` + `extra` with each shell the host has among `sh` and `busybox sh` (the
    /// guest's shell) and returns their stdouts.
    fn host_sh(script: &[u8], extra: &str) -> Vec<Vec<u8>> {
        let mut full = script.to_vec();
        full.extend_from_slice(extra.as_bytes());
        let mut outs = Vec::new();
        for shell in [&["sh"][..], &["busybox", "sh"][..]] {
            let Ok(out) = Command::new(shell[0])
                .args(&shell[1..])
                .arg("-c")
                .arg(OsStr::from_bytes(&full))
                .output()
            else {
                eprintln!("{shell:?} not on this host: not tried");
                continue;
            };
            assert!(
                out.status.success(),
                "{shell:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            outs.push(out.stdout);
        }
        assert!(!outs.is_empty(), "no sh on this host");
        outs
    }

    const NASTY: [&str; 9] = [
        "plain",
        "with space",
        "it's",
        "\"double\"",
        "$HOME `id` $(id)",
        "back\\slash\\",
        "new\nline",
        "",
        "'",
    ];

    #[test]
    fn quoting_survives_a_real_shell() {
        // printf '%s\0' every argument, as the guest's shell would exec it.
        let mut argv = os(&["printf", "%s\\0"]);
        argv.extend(NASTY.iter().map(OsString::from));
        argv.push(std::os::unix::ffi::OsStringExt::from_vec(vec![0xff, b'x']));
        let script = command_script(&argv).unwrap();
        let mut expected = Vec::new();
        for a in &argv[2..] {
            expected.extend_from_slice(a.as_bytes());
            expected.push(0);
        }
        for out in host_sh(&script, "") {
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn env_values_survive_a_real_shell() {
        let env: Vec<EnvVar> = NASTY
            .iter()
            .enumerate()
            .map(|(i, v)| EnvVar {
                name: format!("V{i}"),
                value: OsString::from(v),
            })
            .collect();
        let script = env_script("/root/my dir", &env);
        let mut probe = String::from("\nprintf '%s\\0' \"$EMBER_CWD\"");
        for i in 0..NASTY.len() {
            probe.push_str(&format!(" \"$V{i}\""));
        }
        let mut expected = b"/root/my dir\0".to_vec();
        for v in NASTY {
            expected.extend_from_slice(v.as_bytes());
            expected.push(0);
        }
        for out in host_sh(&script, &probe) {
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn script_shape() {
        let s = command_script(&os(&["uname", "-r"])).unwrap();
        assert_eq!(
            s,
            b"#!/bin/sh\n# written by ember exec\nexec 'uname' '-r'\n"
        );
        let s = command_script(&os(&["-weird"])).unwrap();
        assert!(s.ends_with(b"exec -- '-weird'\n"));
        assert!(matches!(command_script(&[]), Err(ExecError::NoCommand)));
        assert_eq!(shell_quote(b"a'b"), b"'a'\\''b'");
    }

    #[test]
    fn env_parsing() {
        let v = EnvVar::parse(OsStr::new("K=a=b c")).unwrap();
        assert_eq!(
            (v.name.as_str(), v.value.as_os_str()),
            ("K", OsStr::new("a=b c"))
        );
        let v = EnvVar::parse(OsStr::new("EMPTY=")).unwrap();
        assert_eq!(v.value, OsString::new());
        for bad in ["=x", "1A=x", "A-B=x", "A B=x", ""] {
            assert!(
                matches!(
                    EnvVar::parse(OsStr::new(bad)),
                    Err(ExecError::BadEnvName(_))
                ),
                "{bad}"
            );
        }
        let path = EnvVar::parse(OsStr::new("PATH")).unwrap();
        assert_eq!(Some(path.value), std::env::var_os("PATH"));
        let e = EnvVar::parse(OsStr::new("EMBER_SURELY_UNSET_VARIABLE")).unwrap_err();
        assert!(e.to_string().contains("no such variable"));
    }

    #[test]
    fn file_specs_and_guest_paths() {
        let f: FileSpec = "dir/a.txt".parse().unwrap();
        assert_eq!(f.guest_path().unwrap(), "/root/a.txt");
        let f: FileSpec = "a.txt:/opt/b.txt".parse().unwrap();
        assert_eq!(f.guest_path().unwrap(), "/opt/b.txt");
        let f: FileSpec = "x/a.txt:/opt/".parse().unwrap();
        assert_eq!(f.guest_path().unwrap(), "/opt/a.txt");
        let f: FileSpec = "a.txt:sub/c".parse().unwrap();
        assert_eq!(f.guest_path().unwrap(), "/root/sub/c");
        for bad in ["", ":x", "a:"] {
            assert!(bad.parse::<FileSpec>().is_err(), "{bad}");
        }
        for reserved in [
            "a:/ember/cmd",
            "a:/ember",
            "a:/proc",
            "a:/sys/x",
            "a:/dev/x",
        ] {
            let e = reserved
                .parse::<FileSpec>()
                .unwrap()
                .guest_path()
                .unwrap_err();
            assert!(
                matches!(e, ExecError::ReservedPath { .. }),
                "{reserved}: {e}"
            );
        }
        // Only whole components are reserved.
        let f: FileSpec = "a:/devices/a".parse().unwrap();
        assert_eq!(f.guest_path().unwrap(), "/devices/a");
        // /tmp is where users put files: the default guest does not mount over it in an
        // initramfs.
        let f: FileSpec = "payload.bin:/tmp/payload.bin".parse().unwrap();
        assert_eq!(f.guest_path().unwrap(), "/tmp/payload.bin");
        let f: FileSpec = "x/payload.bin:/tmp/".parse().unwrap();
        assert_eq!(f.guest_path().unwrap(), "/tmp/payload.bin");
    }

    /// The archive, unpacked by the host's cpio(1), holds the script, the environment and
    /// the files (a directory tree with a symlink) with their modes.
    #[test]
    fn archive_unpacks_with_cpio() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("skipped: no cpio(1) on this host");
            return;
        }
        let tmp = std::env::temp_dir().join(format!("ember-exec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let src = tmp.join("src");
        std::fs::create_dir_all(src.join("tree/sub")).unwrap();
        std::fs::write(src.join("tool.sh"), "echo hi\n").unwrap();
        std::fs::set_permissions(src.join("tool.sh"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::write(src.join("tree/sub/data"), [0u8, 1, 2, 255]).unwrap();
        std::os::unix::fs::symlink("sub/data", src.join("tree/link")).unwrap();

        let mut spec = ExecSpec::new(os(&["sh", "tool.sh"]));
        spec.env.push(EnvVar {
            name: "K".into(),
            value: "v".into(),
        });
        spec.files.push(FileSpec {
            host: src.join("tool.sh"),
            guest: None,
        });
        spec.files.push(FileSpec {
            host: src.join("tree"),
            guest: Some("/opt/t".into()),
        });
        spec.files.push(FileSpec {
            host: src.join("tool.sh"),
            guest: Some("/tmp/in/payload".into()),
        });
        let archive = spec.archive().unwrap();

        let out = tmp.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut child = Command::new("cpio")
            .args(["-id", "--quiet", "--no-absolute-filenames"])
            .current_dir(&out)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &archive).unwrap();
        assert!(child.wait().unwrap().success());

        assert_eq!(
            std::fs::read(out.join("ember/cmd")).unwrap(),
            command_script(&spec.argv).unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(out.join("ember/env")).unwrap(),
            "export EMBER_CWD='/root'\nexport K='v'\n"
        );
        let mode = |p: &str| std::fs::metadata(out.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            std::fs::read(out.join("root/tool.sh")).unwrap(),
            b"echo hi\n"
        );
        assert_eq!(mode("root/tool.sh"), 0o750);
        assert_eq!(mode("ember/cmd"), 0o755);
        assert_eq!(
            std::fs::read(out.join("opt/t/sub/data")).unwrap(),
            [0u8, 1, 2, 255]
        );
        assert_eq!(
            std::fs::read_link(out.join("opt/t/link")).unwrap(),
            Path::new("sub/data")
        );
        assert_eq!(
            std::fs::read(out.join("tmp/in/payload")).unwrap(),
            b"echo hi\n"
        );
        // The guest's /tmp keeps its usual mode; the parents below it are 0755.
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("tmp/in"), 0o755);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn archive_errors_name_the_problem() {
        let mut spec = ExecSpec::new(os(&["true"]));
        spec.files.push("/nonexistent/file".parse().unwrap());
        let e = spec.archive().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/file"), "{e}");
        let mut spec = ExecSpec::new(os(&["true"]));
        spec.workdir = "relative".into();
        assert!(matches!(spec.archive(), Err(ExecError::BadWorkdir(_))));
        let mut spec = ExecSpec::new(os(&["true"]));
        spec.files.push("/dev/null".parse().unwrap());
        assert!(matches!(spec.archive(), Err(ExecError::FileKind(_))));
    }

    #[test]
    fn apply_sets_exec_mode() {
        let mut c = VmConfig::new("/k");
        ExecSpec::new(os(&["true"])).apply(&mut c).unwrap();
        assert!(c.exit_on_status && !c.stdin);
        assert_eq!(c.com2, Some(ConsoleSink::Stderr));
        assert_eq!(c.console, ConsoleSink::Stdout);
        assert_eq!(c.initrd_append.as_ref().map(|a| a.len() % 4), Some(0));
    }

    fn outcome(reason: ExitReason, sig: Option<i32>) -> RunOutcome {
        RunOutcome {
            reason,
            guest_status: None,
            exits: ExitCounts::default(),
            stop_signal: sig,
        }
    }

    #[test]
    fn statuses() {
        let st = |r, sig| exit_status(&outcome(r, sig), Some(5.0));
        for s in [0, 1, 42, 127, 255] {
            assert_eq!(
                st(ExitReason::GuestStatus(s), None).code,
                u8::try_from(s).unwrap()
            );
            assert_eq!(st(ExitReason::GuestStatus(s), None).message, None);
        }
        assert_eq!(st(ExitReason::GuestStatus(256), None).code, 125);
        let t = st(ExitReason::Timeout, None);
        assert_eq!(t.code, 124);
        assert!(t.message.unwrap().contains("5s"));
        assert_eq!(
            st(ExitReason::Stopped { graceful: false }, Some(libc::SIGINT)).code,
            130
        );
        assert_eq!(
            st(ExitReason::Stopped { graceful: false }, Some(libc::SIGTERM)).code,
            143
        );
        for r in [
            ExitReason::Reset,
            ExitReason::PowerOff,
            ExitReason::Panic,
            ExitReason::TripleFault,
            ExitReason::EmulationFailure("x".into()),
            ExitReason::VcpuError("x".into()),
        ] {
            let s = st(r.clone(), None);
            assert_eq!(s.code, 125, "{r:?}");
            assert!(s.message.is_some());
        }
    }

    #[test]
    fn shares_mount_at_their_host_path() {
        let dir = std::env::temp_dir().join(format!("ember-share-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let canon = dir.canonicalize().unwrap().to_str().unwrap().to_string();
        let mut ro = crate::config::ShareConfig::new(dir.join("sub"));
        ro.readonly = true;
        ro.tag = Some("data".into());
        let shares = SharedDir::resolve_all(&[crate::config::ShareConfig::new(&dir), ro]).unwrap();
        assert_eq!(shares[0].tag, "share0");
        assert_eq!(shares[0].path, canon);
        assert_eq!(
            String::from_utf8(mounts_file(&shares)).unwrap(),
            format!("rw share0 {canon}\nro data {canon}/sub\n")
        );
        let mut spec = ExecSpec::new(os(&["true"]));
        spec.shares = shares.clone();
        let archive = spec.archive().unwrap();
        assert!(archive.windows(12).any(|w| w == b"ember/mounts"));
        // Only paths the guest's init would hide, and a missing directory, are refused.
        for bad in ["/", "/proc", "/dev/shm"] {
            let e = SharedDir::resolve_all(&[crate::config::ShareConfig::new(bad)]);
            assert!(
                matches!(e, Err(ExecError::ReservedShare { .. })),
                "{bad}: {e:?}"
            );
        }
        assert!(
            SharedDir::resolve_all(&[crate::config::ShareConfig::new(dir.join("nope"))]).is_err()
        );
        // The working directory follows ember's when it is inside a share.
        let sub = dir.join("sub");
        assert_eq!(
            SharedDir::workdir_within(&shares, &sub),
            Some(format!("{canon}/sub"))
        );
        assert_eq!(SharedDir::workdir_within(&shares[1..], &dir), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
