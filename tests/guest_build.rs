//! Tests for the guest build helpers in resources/guest/ that need no kernel build:
//! verify-config.sh (the fragment-vs-.config check of build.sh), when busybox is installed
//! the /init command-line parser and tty drain (resources/guest/test-init.sh), and, when a C
//! compiler works, the newc unpacker of vsock-io.c (`vsock-io unpack`, what init's warm
//! exec helper does with the archive `ember exec` sends), run on the host; and progress.sh,
//! the kernel build's progress line and log.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use ember::exec::{command_script, env_script, EnvVar, ExecSpec, FileSpec};

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

/// Runs `bash -c SCRIPT` with resources/guest/progress.sh sourced and LOG set; stderr piped
/// (not a tty).
fn with_progress(tmp: &TempDir, script: &str) -> (Output, PathBuf) {
    let log = tmp.0.join("build.log");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source \"$1\"; LOG=$2; {script}"))
        .arg("bash")
        .arg(guest_dir().join("progress.sh"))
        .arg(&log)
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    (out, log)
}

/// A stand-in for `make vmlinux`: N Kbuild lines, a compiler warning on stderr, a last line
/// without a newline, then exit status S.
const FAKE_MAKE: &str = r#"fake_make() {
    local i
    for ((i = 1; i <= $1; i++)); do printf '  CC      dir/file%d.o\n' "$i"; done
    echo 'dir/file1.c:1: warning: something' >&2
    printf '  LD      vmlinux\nlast line'
    return "$2"
}"#;

/// The kernel build (build.sh, through progress.sh) shows one progress line instead of the
/// make lines, and keeps every line in the log, in order.
#[test]
fn progress_replaces_the_make_lines_and_keeps_them_in_the_log() {
    let tmp = TempDir::new("progress");
    // No periodic line (the interval is longer than any run), so the output is exact.
    let (out, log) = with_progress(
        &tmp,
        &format!(
            "{FAKE_MAKE}\nprogress_interval=100000\n\
             run_logged \"$LOG\" 'compiling vmlinux' fake_make 300 0; echo \"status $?\""
        ),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "status 0\n",
        "{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("==> compiling vmlinux: done, 301 files in 0m"),
        "{stderr}"
    );
    let logged = fs::read_to_string(&log).unwrap();
    let mut want: String = (1..=300)
        .map(|i| format!("  CC      dir/file{i}.o\n"))
        .collect();
    // The warning went through the same pipe; it is in the log, wherever stdio buffering
    // put it.
    let logged_lines: Vec<&str> = logged.lines().collect();
    assert!(
        logged_lines.contains(&"dir/file1.c:1: warning: something"),
        "{logged}"
    );
    let without_warning: String = logged
        .lines()
        .filter(|l| !l.contains("warning"))
        .map(|l| format!("{l}\n"))
        .collect();
    want.push_str("  LD      vmlinux\nlast line\n");
    assert_eq!(without_warning, want);
}

/// A failing step: run_logged returns the command's status, and log_tail prints the end of
/// the log (the error) with the log's path.
#[test]
fn progress_reports_a_failure_with_the_log_tail() {
    let tmp = TempDir::new("progress-fail");
    let (out, log) = with_progress(
        &tmp,
        &format!(
            "{FAKE_MAKE}\nprogress_interval=100000\n\
             run_logged \"$LOG\" 'compiling vmlinux' fake_make 50 2 || {{ \
             st=$?; log_tail \"$LOG\" 3; echo \"status $st\"; }}"
        ),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "status 2\n",
        "{stderr}"
    );
    let path = log.display().to_string();
    assert!(
        stderr.contains(&format!("---- last 3 lines of {path} ----\n")),
        "{stderr}"
    );
    assert!(
        stderr.contains("  LD      vmlinux\nlast line\n---- end of"),
        "{stderr}"
    );
    assert!(!stderr.contains("dir/file7.o"), "{stderr}");
}

/// On a terminal the progress line is rewritten in place (carriage return, clear to end of
/// line) and never wraps; the last line gives the totals. Needs python3 (for a pty).
#[test]
fn progress_on_a_tty_is_one_line_rewritten_in_place() {
    let Ok(probe) = Command::new("python3").arg("-c").arg("import pty").output() else {
        eprintln!("skipping: python3 not installed");
        return;
    };
    assert!(probe.status.success());
    let tmp = TempDir::new("progress-tty");
    let log = tmp.0.join("build.log");
    // The fake make sleeps past a second boundary, so that at least one update is drawn.
    let script = format!(
        "source \"$1\"; {FAKE_MAKE}\nslow_make() {{ fake_make 20 0; sleep 1.2; \
         printf '\\n  CC      %0100d.o\\n' 7; sleep 1.2; }}\n\
         run_logged \"$2\" 'compiling vmlinux' slow_make"
    );
    let py = r#"
import os, pty, subprocess, sys
m, s = pty.openpty()
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=s, stderr=s)
os.close(s)
out = b""
while True:
    try:
        b = os.read(m, 4096)
    except OSError:
        break
    if not b:
        break
    out += b
p.wait()
sys.stdout.buffer.write(out)
sys.exit(p.returncode)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(py)
        .args(["bash", "-c", &script, "bash"])
        .arg(guest_dir().join("progress.sh"))
        .arg(&log)
        .output()
        .expect("run python3");
    let tty = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{tty:?}");
    let draws: Vec<&str> = tty.split("\r\x1b[K").filter(|d| !d.is_empty()).collect();
    assert!(draws.len() >= 2, "{tty:?}");
    for d in &draws[..draws.len() - 1] {
        assert!(d.starts_with("==> compiling vmlinux: "), "{d:?}");
        assert!(!d.contains('\n') && d.chars().count() <= 79, "{d:?}");
    }
    let last = draws[draws.len() - 1];
    assert!(
        last.starts_with("==> compiling vmlinux: done, 22 files in 0m"),
        "{tty:?}"
    );
    assert!(!tty.contains("dir/file3.o\r\n"), "{tty:?}");
}

/// Builds resources/guest/vsock-io.c with the command line in its header (as build.sh
/// does); None (with a message) when no C compiler works.
fn build_vsock_io(dir: &Path) -> Option<PathBuf> {
    let bin = dir.join("vsock-io");
    let out = Command::new("cc")
        .args(["-static", "-nostdlib", "-ffreestanding", "-Os", "-s"])
        .args(["-fno-stack-protector", "-fno-asynchronous-unwind-tables"])
        .args(["-Wl,--build-id=none", "-o"])
        .arg(&bin)
        .arg(guest_dir().join("vsock-io.c"))
        .output();
    match out {
        Ok(o) if o.status.success() => Some(bin),
        Ok(o) => panic!("building vsock-io failed:\n{}", text(&o)),
        Err(e) => {
            eprintln!("skipping: no C compiler to build resources/guest/vsock-io.c ({e})");
            None
        }
    }
}

/// Runs `vsock-io unpack DIR` with `archive` on its stdin.
fn unpack(bin: &Path, dir: &Path, archive: &[u8]) -> Output {
    let mut child = Command::new(bin)
        .arg("unpack")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vsock-io unpack");
    // A refused archive may end vsock-io before it read everything: ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(archive);
    child.wait_with_output().unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn mtime(p: &Path) -> i64 {
    fs::symlink_metadata(p).unwrap().mtime()
}

/// The archive `ember exec` builds (ExecSpec::archive, with --env and --file trees holding
/// a symlink, a set-uid file and mtimes) comes out as the kernel's initramfs unpacker would
/// make it: contents, modes, file and link mtimes; an existing directory takes the
/// archive's mode; an existing symlink at a file's name is replaced, not written through.
#[test]
fn vsock_io_unpacks_the_exec_archive() {
    let tmp = TempDir::new("unpack");
    let Some(bin) = build_vsock_io(&tmp.0) else {
        return;
    };
    let host = tmp.0.join("host");
    fs::create_dir_all(host.join("tree/sub")).unwrap();
    fs::write(host.join("tree/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(host.join("tree/run.sh"), fs::Permissions::from_mode(0o4754)).unwrap();
    fs::write(host.join("tree/sub/data"), vec![0xa5u8; 70_000]).unwrap();
    fs::set_permissions(
        host.join("tree/sub/data"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::symlink("sub/data", host.join("tree/link")).unwrap();
    fs::set_permissions(host.join("tree"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(host.join("in.txt"), "input\n").unwrap();
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800);
    for f in ["tree/run.sh", "tree/sub/data", "in.txt"] {
        let file = fs::File::options().write(true).open(host.join(f)).unwrap();
        file.set_modified(when).unwrap();
    }
    let argv: Vec<OsString> = ["sh", "-c", "echo 'a b'"]
        .iter()
        .map(OsString::from)
        .collect();
    let env = vec![EnvVar::parse("X=1 2".as_ref()).unwrap()];
    let spec = ExecSpec {
        argv: argv.clone(),
        env: env.clone(),
        files: vec![
            FileSpec {
                host: host.join("tree"),
                guest: Some("/opt/".into()),
            },
            FileSpec {
                host: host.join("in.txt"),
                guest: Some("in/data".into()),
            },
        ],
        workdir: "/root".into(),
        shares: Vec::new(),
        modules: None,
    };
    let archive = spec.archive().unwrap();

    // A root that already has /root (another mode), a file to protect and a symlink to it
    // where the archive puts /root/in/data.
    let root = tmp.0.join("root");
    fs::create_dir_all(root.join("root/in")).unwrap();
    fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("victim"), "keep\n").unwrap();
    std::os::unix::fs::symlink(root.join("victim"), root.join("root/in/data")).unwrap();

    let out = unpack(&bin, &root, &archive);
    assert!(
        out.status.success(),
        "vsock-io unpack failed:\n{}",
        text(&out)
    );
    assert_eq!(
        fs::read(root.join("ember/cmd")).unwrap(),
        command_script(&argv).unwrap()
    );
    assert_eq!(mode(&root.join("ember/cmd")), 0o755);
    assert_eq!(
        fs::read(root.join("ember/env")).unwrap(),
        env_script("/root", &env)
    );
    assert_eq!(mode(&root.join("ember/env")), 0o644);
    assert_eq!(
        mode(&root.join("root")),
        0o700,
        "an existing directory takes the mode"
    );
    assert_eq!(
        fs::read_to_string(root.join("root/in/data")).unwrap(),
        "input\n"
    );
    assert!(fs::symlink_metadata(root.join("root/in/data"))
        .unwrap()
        .is_file());
    assert_eq!(fs::read_to_string(root.join("victim")).unwrap(), "keep\n");
    let t = root.join("opt/tree");
    assert_eq!(mode(&t), 0o750);
    assert_eq!(
        fs::read(t.join("run.sh")).unwrap(),
        b"#!/bin/sh\necho run\n"
    );
    assert_eq!(mode(&t.join("run.sh")), 0o4754, "set-uid bit kept");
    assert_eq!(fs::read(t.join("sub/data")).unwrap(), vec![0xa5u8; 70_000]);
    assert_eq!(mode(&t.join("sub/data")), 0o640);
    assert_eq!(
        fs::read_link(t.join("link")).unwrap(),
        Path::new("sub/data")
    );
    for f in ["run.sh", "sub/data"] {
        assert_eq!(mtime(&t.join(f)), 1_577_836_800, "mtime of {f}");
    }
    assert_eq!(mtime(&root.join("root/in/data")), 1_577_836_800);
    assert_eq!(mtime(&t.join("link")), mtime(&host.join("tree/link")));

    // The same archive again over what it made: everything replaced, still success.
    let out = unpack(&bin, &root, &archive);
    assert!(
        out.status.success(),
        "second unpack failed:\n{}",
        text(&out)
    );
}

/// One raw newc entry (no checks: for archives ember would never build).
fn newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let start = out.len();
    out.extend_from_slice(b"070701");
    for v in [
        1,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ] {
        out.extend_from_slice(format!("{v:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(start + (out.len() - start).next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn newc(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, mode, data) in entries {
        newc_entry(&mut out, name, *mode, data);
    }
    newc_entry(&mut out, "TRAILER!!!", 0, &[]);
    out
}

/// Archives that escape DIR, are cut short, are not newc or hold a device are refused
/// with a message naming the problem, exit status 1.
#[test]
fn vsock_io_refuses_bad_archives() {
    let tmp = TempDir::new("unpack-bad");
    let Some(bin) = build_vsock_io(&tmp.0) else {
        return;
    };
    let root = tmp.0.join("root");
    fs::create_dir_all(&root).unwrap();
    let good = newc(&[("ok", 0o100644, b"ok\n")]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            newc(&[("../escaped", 0o100644, b"x")]),
            "refusing the archive name",
        ),
        (
            "inner dotdot",
            newc(&[("a/../../escaped", 0o100644, b"x")]),
            "refusing the archive name",
        ),
        (
            "absolute",
            newc(&[("/escaped", 0o100644, b"x")]),
            "refusing the archive name",
        ),
        ("truncated", good[..good.len() - 140].to_vec(), "ends early"),
        ("empty", Vec::new(), "ends early"),
        ("not newc", b"070707".repeat(40), "not a newc"),
        (
            "device",
            newc(&[("tty", 0o020644, b"")]),
            "unsupported file type",
        ),
    ];
    for (what, archive, msg) in cases {
        let out = unpack(&bin, &root, &archive);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {all}");
        assert!(all.contains(msg), "{what}: expected {msg:?} in:\n{all}");
    }
    assert!(!tmp.0.join("escaped").exists());
    assert!(!Path::new("/escaped").exists());
    let out = unpack(&bin, &root, &good);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fs::read(root.join("ok")).unwrap(), b"ok\n");
}

/// init's own steps in vsock-io: `end` (power off), `boot-timer` (a store to physical
/// memory) and `start` (mounts, then the boot timer) refuse to run anywhere but in init, so
/// running them on a host by mistake does nothing; `opost-off` switches OPOST off on a tty
/// (a pty here) and keeps the rest.
#[test]
fn vsock_io_init_steps() {
    let tmp = TempDir::new("vsock-io-init");
    let Some(bin) = build_vsock_io(&tmp.0) else {
        return;
    };
    for args in [
        &["end", "0", "poweroff"][..],
        &["end", "-", "reboot", "/dev/null"],
        &["boot-timer"],
        &["boot-timer", "cmdline"],
        &["start", "/etc/fstab"],
    ] {
        let out = Command::new(&bin).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("only init (process 1)"),
            "{args:?}: {}",
            text(&out)
        );
    }

    // A pty with OPOST (and ONLCR) on, as a tty starts.
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the two ints; the other pointers may be
    // null (no name, default termios and window size).
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    let oflag = |fd: i32| {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is our open pty slave and t a valid termios to fill.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        t.c_oflag
    };
    let before = oflag(slave);
    assert_ne!(before & libc::OPOST, 0, "a fresh pty has OPOST");
    let path = std::fs::read_link(format!("/proc/self/fd/{slave}")).unwrap();
    let out = Command::new(&bin)
        .arg("opost-off")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(oflag(slave), before & !libc::OPOST, "only OPOST changed");
    let out = Command::new(&bin)
        .args(["opost-off", "/nonexistent/tty"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("open /nonexistent/tty"),
        "{}",
        text(&out)
    );
    // SAFETY: closing the two descriptors openpty gave us, once.
    unsafe {
        libc::close(master);
        libc::close(slave);
    }
}
