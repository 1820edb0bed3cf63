// SPDX-License-Identifier: Apache-2.0
//! The device against a real virtiofsd: a FUSE client in the test plays the guest driver
//! (FUSE requests in shared guest memory, offered on the request queue, kicked through the
//! queue eventfd), the replies come back through the used ring and the call eventfd. These
//! check ember's vhost-user hand-over and the security properties of the whole (traversal
//! and symlink escapes, device nodes, `ro`). Skipped (with a note) where virtiofsd is not
//! installed: scripts/test-all.sh installs it.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::config::ShareConfig;
use crate::devices::virtio::test_ring::TestRing;
use crate::memory::{create_shared_guest_memory, GuestMemory};

const RING_SIZE: u16 = 16;
const HIPRIO_RING: u64 = 0x10000;
const REQ_RING: u64 = 0x20000;
const REQ_BUF: u64 = 0x100000;
const REPLY_BUF: u64 = 0x200000;
const REPLY_LEN: u32 = 0x20000;

// FUSE opcodes (include/uapi/linux/fuse.h).
const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RENAME: u32 = 12;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const CREATE: u32 = 35;
const ROOT: u64 = 1;

/// A device, its daemon and a FUSE session over them.
struct Session {
    dev: VirtioFs,
    mem: GuestMemory,
    req: TestRingOwned,
    kick: Arc<EventFd>,
    unique: u64,
}

/// [`TestRing`] borrows the memory; the session keeps its own handle and rebuilds the ring
/// view per request (the ring state is the two counters).
struct TestRingOwned {
    next_desc: u16,
    avail_idx: u16,
}

fn daemon_available() -> bool {
    if find_virtiofsd().is_ok() {
        return true;
    }
    eprintln!("note: virtiofsd not installed; virtio-fs device test skipped");
    false
}

impl Session {
    /// A device for `share`, activated (queues handed to its daemon) and mounted (FUSE_INIT).
    fn start(share: &ShareConfig) -> Self {
        let mut s = Self::activated(share, "t0");
        s.init();
        s
    }

    /// A device for `share` with tag `tag`, activated as the driver does at probe time, but
    /// not mounted: no request made yet.
    fn activated(share: &ShareConfig, tag: &str) -> Self {
        let mem = create_shared_guest_memory(16 << 20).unwrap();
        let hi = TestRing::new(&mem, HIPRIO_RING, RING_SIZE);
        let req = TestRing::new(&mem, REQ_RING, RING_SIZE);
        let queues = vec![hi.queue(), req.queue()];
        Self::hand_queues(
            VirtioFs::new(share, tag).expect("virtiofsd starts"),
            mem,
            queues,
        )
    }

    /// Activates `dev` with `queues` in `mem`, as the transport and the event loop do.
    fn hand_queues(mut dev: VirtioFs, mem: GuestMemory, queues: Vec<virtio_queue::Queue>) -> Self {
        let evts: Vec<Arc<EventFd>> = (0..NUM_QUEUES)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues,
            queue_evts: evts.clone(),
            interrupt,
            acked_features: super::super::VERSION_1,
        };
        dev.activate(ctx).unwrap();
        // What the event loop does on the activation event.
        let ctx = dev.pending.take().unwrap();
        let active = dev.hand_over(ctx).expect("vhost-user hand-over");
        dev.active = Some(active);
        Self {
            dev,
            mem,
            req: TestRingOwned {
                next_desc: 0,
                avail_idx: 0,
            },
            kick: evts[1].clone(),
            unique: 0,
        }
    }

    /// FUSE_INIT (protocol 7.31): what the guest's mount sends first.
    fn init(&mut self) {
        let mut body = Vec::new();
        for v in [7u32, 31, 0x20000, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let (err, _) = self.call(INIT, 0, &body);
        assert_eq!(err, 0, "FUSE_INIT");
    }

    /// Sends one request; returns (error, reply body).
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let len = 40 + body.len() as u32;
        let mut msg = Vec::new();
        msg.extend_from_slice(&len.to_le_bytes());
        msg.extend_from_slice(&opcode.to_le_bytes());
        msg.extend_from_slice(&self.unique.to_le_bytes());
        msg.extend_from_slice(&nodeid.to_le_bytes());
        for v in [0u32, 0, 1, 0] {
            msg.extend_from_slice(&v.to_le_bytes()); // uid, gid, pid, padding
        }
        msg.extend_from_slice(body);
        self.mem.write_slice(&msg, GuestAddress(REQ_BUF)).unwrap();
        self.mem
            .write_slice(&vec![0u8; REPLY_LEN as usize], GuestAddress(REPLY_BUF))
            .unwrap();
        // Rebuild the driver's view of the request ring at its counters.
        let mut ring = TestRing::new_at(
            &self.mem,
            REQ_RING,
            RING_SIZE,
            self.req.next_desc,
            self.req.avail_idx,
        );
        let before = ring.used_idx();
        ring.add_chain(&[(REQ_BUF, len, false), (REPLY_BUF, REPLY_LEN, true)]);
        let (nd, ai) = ring.counters();
        self.req = TestRingOwned {
            next_desc: nd,
            avail_idx: ai,
        };
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ring.used_idx() == before {
            assert!(Instant::now() < deadline, "virtiofsd did not answer");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (_, used_len) = ring.used_entry(before);
        let mut reply = vec![0u8; used_len as usize];
        self.mem
            .read_slice(&mut reply, GuestAddress(REPLY_BUF))
            .unwrap();
        assert!(reply.len() >= 16, "short FUSE reply");
        let err = i32::from_le_bytes(reply[4..8].try_into().unwrap());
        (err, reply[16..].to_vec())
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<(u64, u64, u32), i32> {
        let mut b = name.as_bytes().to_vec();
        b.push(0);
        match self.call(LOOKUP, parent, &b) {
            (0, r) => Ok(entry(&r)),
            (e, _) => Err(e),
        }
    }

    fn open(&mut self, node: u64, flags: u32) -> Result<u64, i32> {
        let mut b = flags.to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        match self.call(OPEN, node, &b) {
            (0, r) => Ok(u64_at(&r, 0)),
            (e, _) => Err(e),
        }
    }

    fn read(&mut self, node: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
        let mut b = Vec::new();
        b.extend_from_slice(&fh.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&[0u8; 20]);
        match self.call(READ, node, &b) {
            (0, r) => Ok(r),
            (e, _) => Err(e),
        }
    }

    fn create(&mut self, parent: u64, name: &str) -> Result<(u64, u64), i32> {
        let mut b = Vec::new();
        for v in [libc::O_RDWR as u32, 0o100644, 0o022, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        match self.call(CREATE, parent, &b) {
            // fuse_entry_out (128 bytes) then fuse_open_out.
            (0, r) => Ok((entry(&r).0, u64_at(&r, 128))),
            (e, _) => Err(e),
        }
    }

    fn write(&mut self, node: u64, fh: u64, data: &[u8]) -> Result<u32, i32> {
        let mut b = Vec::new();
        b.extend_from_slice(&fh.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0u8; 20]);
        b.extend_from_slice(data);
        match self.call(WRITE, node, &b) {
            (0, r) => Ok(u32::from_le_bytes(r[..4].try_into().unwrap())),
            (e, _) => Err(e),
        }
    }

    fn release(&mut self, node: u64, fh: u64) {
        let mut b = fh.to_le_bytes().to_vec();
        b.extend_from_slice(&[0u8; 16]);
        let _ = self.call(RELEASE, node, &b);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.dev.reset();
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// fuse_entry_out: (nodeid, attr.ino, attr.mode).
fn entry(r: &[u8]) -> (u64, u64, u32) {
    let attr = 40;
    (
        u64_at(r, 0),
        u64_at(r, attr),
        u32::from_le_bytes(r[attr + 60..attr + 64].try_into().unwrap()),
    )
}

fn name(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    b
}

/// A share directory inside a parent that holds a secret the guest must never reach.
fn layout() -> (std::path::PathBuf, std::path::PathBuf) {
    let top = std::env::temp_dir().join(format!(
        "ember-fs-test-{}-{}",
        std::process::id(),
        super::unique()
    ));
    let share = top.join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(top.join("secret"), b"host secret").unwrap();
    std::fs::write(share.join("hello"), b"hello from the host\n").unwrap();
    std::os::unix::fs::symlink(top.join("secret"), share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../secret", share.join("rel")).unwrap();
    std::os::unix::fs::symlink("/", share.join("root")).unwrap();
    (top, share)
}

#[test]
fn config_space_holds_tag_and_one_request_queue() {
    let c = config_space("t0");
    assert_eq!(c.len(), 40);
    assert_eq!(&c[..2], b"t0");
    assert!(c[2..36].iter().all(|&b| b == 0));
    assert_eq!(&c[36..], &1u32.to_le_bytes());
    let long = "x".repeat(50);
    assert_eq!(&config_space(&long)[..36], "x".repeat(36).as_bytes());
}

#[test]
fn daemon_args_keep_the_sandbox_and_ro() {
    let mut s = ShareConfig::new("/srv/d");
    let a = daemon_args(&s);
    assert!(a.contains(&"--sandbox=namespace".to_string()));
    assert!(a.contains(&"--modcaps=-mknod".to_string()));
    assert!(a.contains(&"--cache=auto".to_string()));
    assert!(!a.contains(&"--readonly".to_string()));
    s.readonly = true;
    s.cache = crate::config::ShareCache::Never;
    let a = daemon_args(&s);
    assert!(a.contains(&"--readonly".to_string()));
    assert!(a.contains(&"--cache=never".to_string()));
}

#[test]
fn fuse_requests_through_the_device() {
    if !daemon_available() {
        return;
    }
    let (top, share) = layout();
    let mut s = Session::start(&ShareConfig::new(&share));

    // lookup + getattr + open + read.
    let (hello, ino, mode) = s.lookup(ROOT, "hello").expect("lookup hello");
    assert_eq!(ino, std::fs::metadata(share.join("hello")).unwrap().ino());
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);
    let (err, attr) = s.call(GETATTR, hello, &[0u8; 16]);
    assert_eq!(err, 0);
    assert_eq!(u64_at(&attr, 16 + 8), 20, "size in fuse_attr_out");
    let fh = s.open(hello, libc::O_RDONLY as u32).expect("open");
    assert_eq!(
        s.read(hello, fh, 4096).unwrap(),
        b"hello from the host\n".to_vec()
    );
    s.release(hello, fh);

    // create + write: the file appears on the host.
    let (out, fh) = s.create(ROOT, "out").expect("create");
    assert_eq!(s.write(out, fh, b"written by the guest").unwrap(), 20);
    s.release(out, fh);
    assert_eq!(
        std::fs::read(share.join("out")).unwrap(),
        b"written by the guest"
    );

    // setattr (truncate to 7 bytes: FATTR_SIZE).
    let mut b = Vec::new();
    b.extend_from_slice(&(1u32 << 3).to_le_bytes()); // valid = FATTR_SIZE
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // fh
    b.extend_from_slice(&7u64.to_le_bytes()); // size
    b.extend_from_slice(&[0u8; 64]);
    assert_eq!(s.call(SETATTR, out, &b).0, 0, "setattr");
    assert_eq!(std::fs::read(share.join("out")).unwrap(), b"written");

    // rename + unlink + mkdir.
    let mut b = ROOT.to_le_bytes().to_vec(); // newdir
    b.extend(name("out"));
    b.extend(name("renamed"));
    assert_eq!(s.call(RENAME, ROOT, &b).0, 0, "rename");
    assert!(share.join("renamed").is_file() && !share.join("out").exists());
    assert_eq!(s.call(UNLINK, ROOT, &name("renamed")).0, 0, "unlink");
    assert!(!share.join("renamed").exists());
    let mut b = 0o755u32.to_le_bytes().to_vec();
    b.extend_from_slice(&0o022u32.to_le_bytes());
    b.extend(name("made"));
    assert_eq!(s.call(MKDIR, ROOT, &b).0, 0, "mkdir");
    assert!(share.join("made").is_dir());

    // readdir lists the share, nothing of the parent.
    let (err, r) = s.call(OPENDIR, ROOT, &[0u8; 8]);
    assert_eq!(err, 0, "opendir");
    let dfh = u64_at(&r, 0);
    let mut b = dfh.to_le_bytes().to_vec();
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&8192u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]);
    let (err, r) = s.call(READDIR, ROOT, &b);
    assert_eq!(err, 0, "readdir");
    let listing = String::from_utf8_lossy(&r);
    assert!(
        listing.contains("hello") && listing.contains("sub"),
        "{listing}"
    );
    assert!(!listing.contains("secret"), "{listing}");

    // statfs.
    let (err, r) = s.call(STATFS, ROOT, &[]);
    assert_eq!(err, 0, "statfs");
    assert!(u64_at(&r, 0) > 0, "blocks");

    // Traversal: ".." of the root is the root; names with a slash reach nothing outside.
    let root_ino = std::fs::metadata(&share).unwrap().ino();
    match s.lookup(ROOT, "..") {
        Ok((_, ino, _)) => assert_eq!(ino, root_ino, "'..' of the share left it"),
        Err(e) => assert!(e < 0),
    }
    if let Ok((up, _, _)) = s.lookup(ROOT, "..") {
        assert!(s.lookup(up, "secret").is_err(), "secret reached through ..");
    }
    assert!(
        s.lookup(ROOT, "../secret").is_err(),
        "secret reached by name"
    );
    // ".." of a subdirectory (the kernel only sends it for exported file handles) stays
    // inside too: never the directory above the share.
    let top_ino = std::fs::metadata(&top).unwrap().ino();
    let (sub, _, _) = s.lookup(ROOT, "sub").unwrap();
    let mut node = sub;
    for _ in 0..4 {
        match s.lookup(node, "..") {
            Ok((up, ino, _)) => {
                assert_ne!(ino, top_ino, "'..' reached the directory above the share");
                assert!(s.lookup(up, "secret").is_err(), "secret reached through ..");
                node = up;
            }
            Err(_) => break,
        }
    }

    // Symlinks are the guest's to resolve: the daemon never follows them, opening one fails.
    for link in ["abs", "rel", "root"] {
        let (node, _, mode) = s.lookup(ROOT, link).unwrap();
        assert_eq!(mode & libc::S_IFMT, libc::S_IFLNK, "{link}");
        assert!(
            s.open(node, libc::O_RDONLY as u32).is_err(),
            "{link} opened"
        );
        let (err, target) = s.call(READLINK, node, &[]);
        assert_eq!(err, 0);
        assert!(!target.windows(11).any(|w| w == b"host secret"));
    }

    // Device nodes cannot be created.
    let mut b = Vec::new();
    for v in [libc::S_IFCHR | 0o666, libc::makedev(1, 3) as u32, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend(name("null"));
    let (err, _) = s.call(MKNOD, ROOT, &b);
    assert!(err < 0, "mknod of a character device succeeded");
    assert!(!share.join("null").exists());

    drop(s);
    let _ = std::fs::remove_dir_all(&top);
}

#[test]
fn read_only_share_refuses_writes_on_the_host_side() {
    if !daemon_available() {
        return;
    }
    let (top, share) = layout();
    let mut cfg = ShareConfig::new(&share);
    cfg.readonly = true;
    let mut s = Session::start(&cfg);
    let (hello, _, _) = s.lookup(ROOT, "hello").unwrap();
    let fh = s.open(hello, libc::O_RDONLY as u32).unwrap();
    assert_eq!(
        s.read(hello, fh, 4096).unwrap(),
        b"hello from the host\n".to_vec()
    );
    s.release(hello, fh);
    assert_eq!(s.create(ROOT, "new").unwrap_err(), -libc::EROFS);
    assert!(!share.join("new").exists());
    assert!(s.open(hello, libc::O_RDWR as u32).is_err());
    assert_eq!(s.call(UNLINK, ROOT, &name("hello")).0, -libc::EROFS);
    assert!(share.join("hello").exists());
    drop(s);
    let _ = std::fs::remove_dir_all(&top);
}

/// A snapshot of a share the guest has not mounted yet restores onto a new daemon, which may
/// serve another directory (warm `ember exec --share`); a mounted share is refused, and so is
/// a restore under another tag.
#[test]
fn an_unmounted_share_moves_to_a_new_daemon_and_directory() {
    if !daemon_available() {
        return;
    }
    let (top, first) = layout();
    let second = top.join("second");
    std::fs::create_dir_all(&second).unwrap();
    std::fs::write(second.join("only-here"), b"from the second directory").unwrap();

    let old = Session::activated(&ShareConfig::new(&first), "t0");
    old.dev
        .check_snapshot()
        .expect("an unmounted share can be saved");
    let state = old.dev.save_state();
    // The transport's copies of the queues: what a restore activates the device with.
    let queues = || {
        vec![
            TestRing::new_at(&old.mem, HIPRIO_RING, RING_SIZE, 0, 0).queue(),
            TestRing::new_at(&old.mem, REQ_RING, RING_SIZE, 0, 0).queue(),
        ]
    };

    let mut wrong = VirtioFs::new(&ShareConfig::new(&second), "t1").unwrap();
    let e = wrong.restore_state(&state).unwrap_err();
    assert!(e.to_string().contains("tag"), "{e}");

    let mut dev = VirtioFs::new(&ShareConfig::new(&second), "t0").unwrap();
    dev.restore_state(&state).unwrap();
    let mut s = Session::hand_queues(dev, old.mem.clone(), queues());
    drop(old);
    s.init();
    let (node, ..) = s
        .lookup(ROOT, "only-here")
        .expect("the new directory is served");
    let fh = s.open(node, libc::O_RDONLY as u32).unwrap();
    assert_eq!(s.read(node, fh, 100).unwrap(), b"from the second directory");
    assert_eq!(s.lookup(ROOT, "hello").unwrap_err(), -libc::ENOENT);

    // Mounted now: a snapshot would lose the daemon's inodes.
    let e = s.dev.check_snapshot().unwrap_err();
    assert!(e.to_string().contains("mounted"), "{e}");
    let _ = std::fs::remove_dir_all(top);
}

/// Set in the child process of
/// [`files_the_guest_makes_belong_to_the_user_running_ember`]: the share to write into.
const AS_USER_CHILD: &str = "EMBER_FS_TEST_AS_USER_CHILD";
/// The user the child runs as (`nobody`).
const CHILD_UID: u32 = 65534;

/// Files the guest creates (as its root: uid 0 in the FUSE request) appear on the host owned
/// by the user who runs ember, not by root: an unprivileged virtiofsd cannot take the guest's
/// ids. Run as root, the test runs the device (and so virtiofsd) in a child process as
/// `nobody`.
#[test]
fn files_the_guest_makes_belong_to_the_user_running_ember() {
    use std::os::unix::process::CommandExt;
    if let Some(share) = std::env::var_os(AS_USER_CHILD) {
        let mut s = Session::start(&ShareConfig::new(std::path::PathBuf::from(share)));
        let (node, fh) = s.create(ROOT, "made-by-the-guest").unwrap();
        assert_eq!(s.write(node, fh, b"guest data").unwrap(), 10);
        s.release(node, fh);
        return;
    }
    if !daemon_available() {
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("note: not root: cannot run the device as another user; skipped");
        return;
    }
    let (top, share) = layout();
    let lchown = |p: &std::path::Path| {
        std::os::unix::fs::lchown(p, Some(CHILD_UID), Some(CHILD_UID)).unwrap();
    };
    lchown(&share);
    // The daemon, where `nobody` can run it (root's ~/.cargo/bin is private).
    let daemon = top.join("virtiofsd");
    std::fs::copy(find_virtiofsd().unwrap(), &daemon).unwrap();
    // This test binary too: it may lie in a directory `nobody` cannot enter (a private
    // checkout). A hard link when the file system allows, else a copy.
    let exe = top.join("test-binary");
    let me = std::env::current_exe().unwrap();
    if std::fs::hard_link(&me, &exe).is_err() {
        std::fs::copy(&me, &exe).unwrap();
    }
    let status = std::process::Command::new(&exe)
        .args([
            "--exact",
            "devices::virtio::fs::tests::files_the_guest_makes_belong_to_the_user_running_ember",
            "--test-threads=1",
        ])
        .env(AS_USER_CHILD, &share)
        .env(VIRTIOFSD_ENV, &daemon)
        .uid(CHILD_UID)
        .gid(CHILD_UID)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the child as uid {CHILD_UID}: {status}");
    let made = share.join("made-by-the-guest");
    assert_eq!(std::fs::read(&made).unwrap(), b"guest data");
    let meta = std::fs::metadata(&made).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (CHILD_UID, CHILD_UID));
    let _ = std::fs::remove_dir_all(top);
}
