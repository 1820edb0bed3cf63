// SPDX-License-Identifier: Apache-2.0
//! Landlock: once a thread has entered the sandbox, it can open only what the VM was told
//! about (its kernel and initrd, read-only; the directories its command writes into), not
//! the rest of the host's file system. Files opened during set-up (`/dev/kvm`, disk images,
//! TAPs, the snapshot's memory file) stay usable through their descriptors.
//!
//! Best effort: on a kernel without Landlock (or with it disabled) ember says so on an info
//! line and runs without it. Only file-system rights are handled, those of Landlock ABI 5
//! (network ports and scopes are left alone: ember signals its virtiofsd, which is outside
//! its domain).

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, ABI,
};

/// The Landlock ABI whose file-system rights ember handles.
const HANDLED_ABI: ABI = ABI::V5;

/// What a thread may do with a path (and, for a directory, everything beneath it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAccess {
    /// Read files, list directories.
    Read,
    /// Everything: read, write, create and remove files and directories.
    ReadWrite,
    /// Create, write and replace files in the directory (outputs written under a temporary
    /// name and renamed), without reading anything in it.
    CreateFiles,
    /// Remove entries (an empty directory ember made there, at the end of the run).
    Remove,
}

impl PathAccess {
    fn rights(self) -> BitFlags<AccessFs> {
        match self {
            PathAccess::Read => AccessFs::from_read(HANDLED_ABI),
            PathAccess::ReadWrite => AccessFs::from_all(HANDLED_ABI) & !AccessFs::Execute,
            PathAccess::CreateFiles => {
                AccessFs::MakeReg | AccessFs::WriteFile | AccessFs::RemoveFile | AccessFs::Truncate
            }
            PathAccess::Remove => AccessFs::RemoveDir | AccessFs::RemoveFile,
        }
    }
}

/// One path the sandbox lets ember's threads use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRule {
    /// The file or directory.
    pub path: PathBuf,
    /// What may be done with it.
    pub access: PathAccess,
}

impl PathRule {
    /// `access` to `path`.
    pub fn new(path: impl Into<PathBuf>, access: PathAccess) -> Self {
        Self {
            path: path.into(),
            access,
        }
    }
}

/// The ruleset every thread restricts itself with when it enters.
#[derive(Debug)]
pub(super) struct Rules {
    ruleset: RulesetCreated,
}

/// The Landlock ABI of the running kernel: `Ok(version)`, or why there is none.
pub fn kernel_abi() -> Result<i64, &'static str> {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag only
    // returns the ABI version (or an error); it reads and writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v >= 1 {
        return Ok(v);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) => Err("Landlock is built into this kernel but not enabled (add \
                                       landlock to the lsm= boot parameter)"),
        _ => Err("this kernel has no Landlock (CONFIG_SECURITY_LANDLOCK)"),
    }
}

impl Rules {
    /// The ruleset with `paths` in it, or `None` (and an info line) when the kernel has no
    /// Landlock.
    pub(super) fn new(paths: &[PathRule]) -> Result<Option<Self>, String> {
        if let Err(why) = kernel_abi() {
            log::info!("Landlock: {why}; ember runs without its file-system rules");
            return Ok(None);
        }
        let ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(HANDLED_ABI))
            .and_then(|r| r.create())
            .map_err(|e| e.to_string())?;
        let mut rules = Self { ruleset };
        for p in paths {
            rules.add(p)?;
        }
        Ok(Some(rules))
    }

    /// Adds `rule`. A path that does not exist is left out (nothing can be opened there).
    pub(super) fn add(&mut self, rule: &PathRule) -> Result<(), String> {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            Err(e) => {
                log::debug!("Landlock: {} left out: {e}", rule.path.display());
                return Ok(());
            }
        };
        let mut rights = rule.access.rights();
        if !is_dir(&fd) {
            // Directory rights on a file are refused: keep the file ones.
            rights &= AccessFs::from_file(HANDLED_ABI);
        }
        let clone = self.ruleset.try_clone().map_err(|e| e.to_string())?;
        // The clone shares the ruleset's fd: the rule lands in `self.ruleset` too.
        clone
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(|e| format!("{}: {e}", rule.path.display()))?;
        log::debug!("Landlock: {:?} for {}", rule.access, rule.path.display());
        Ok(())
    }

    /// Restricts the calling thread (and the threads it spawns from now on).
    pub(super) fn restrict_thread(&self) -> Result<(), String> {
        let ruleset = self.ruleset.try_clone().map_err(|e| e.to_string())?;
        ruleset.restrict_self().map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Whether `fd` (an O_PATH descriptor) is a directory.
fn is_dir(fd: &PathFd) -> bool {
    use std::os::fd::AsFd;
    // SAFETY: stat is plain data that fstat fills in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live descriptor and a valid stat to fill.
    let rc = unsafe { libc::fstat(fd.as_fd().as_raw_fd(), &mut st) };
    rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// The Landlock self-test: tries to open a file outside the rules and logs the outcome (the
/// test expects "Permission denied").
pub(super) fn selftest_open() {
    let path = std::env::var_os(super::SELFTEST_PATH_ENV)
        .map_or_else(|| PathBuf::from("/etc/hostname"), PathBuf::from);
    match std::fs::File::open(&path) {
        Ok(_) => log::error!(
            "sandbox self-test: opened {} after set-up: Landlock did not stop it",
            path.display()
        ),
        Err(e) => log::error!(
            "sandbox self-test: cannot open {} after set-up: {e}",
            path.display()
        ),
    }
}
