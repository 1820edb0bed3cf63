// SPDX-License-Identifier: Apache-2.0
//! `ember exec` with the default Linux guest (resources/guest/build.sh). Each test is one real
//! boot (tens of seconds on a PVM host), so each checks several things; cargo runs them two
//! at a time. The exit paths themselves are also covered by the tiny guests of tests/exec.rs.
//! Skipped, with a message, when /dev/kvm or the built guest is missing.

mod common;
mod common_exec;

use std::process::Command;
use std::time::Duration;

use common_exec::{guest_or_skip, run, TempDir};

/// The longest one boot-and-run may take before the harness kills ember and fails. A boot
/// takes 20-40 s on an idle PVM host but several minutes when the host's cores are shared
/// by many guests (7 minutes seen at a load average of 13 on 2 cores).
const LIMIT: Duration = Duration::from_secs(1300);
/// `--timeout` for the runs that should end by themselves: a hang becomes status 124.
const SAFETY_TIMEOUT: &str = "1200";

fn exec() -> Command {
    let mut c = common_exec::ember();
    c.args(["exec", "--timeout", SAFETY_TIMEOUT]);
    c
}

/// The kernel release in the vmlinux banner ("Linux version 6.1.x (...)").
fn kernel_release(vmlinux: &std::path::Path) -> String {
    let bytes = std::fs::read(vmlinux).expect("read vmlinux");
    let key = b"Linux version ";
    let at = bytes
        .windows(key.len() + 1)
        .position(|w| w.starts_with(key) && w[key.len()].is_ascii_digit())
        .expect("no Linux version banner in vmlinux");
    let rest = &bytes[at + key.len()..];
    let end = rest
        .iter()
        .position(|&b| b == b' ' || b == 0)
        .expect("banner end");
    String::from_utf8(rest[..end].to_vec()).expect("release is UTF-8")
}

/// Out of the box (no --kernel): exactly `uname -r`'s line on stdout (no kernel messages, no
/// carriage returns), nothing on stderr, status 0.
#[test]
fn uname_out_of_the_box() {
    let Some(vmlinux) = guest_or_skip("uname_out_of_the_box") else {
        return;
    };
    let release = kernel_release(&vmlinux);
    let mut c = exec();
    c.args(["--", "uname", "-r"]);
    let f = run(c, LIMIT);
    eprintln!(
        "uname -r: {:.1}s, VmHWM {} KiB",
        f.elapsed.as_secs_f64(),
        f.hwm_kib
    );
    assert_eq!(f.code, Some(0), "{f:?}");
    assert_eq!(String::from_utf8_lossy(&f.stdout), format!("{release}\n"));
    assert_eq!(f.stderr, "");
}

/// Deterministic pseudo-random bytes.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn host_sha256(path: &std::path::Path) -> Option<String> {
    let out = Command::new("sha256sum").arg(path).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    Some(s.split_whitespace().next()?.to_string())
}

/// --file (a file, the same file into /tmp, and a directory tree), --disk, --env (given and
/// passed through), argv with awkward characters, the default working directory, stderr on
/// its own channel, and status 42, in one boot (cold: --disk).
#[test]
fn files_env_argv_stderr_and_status() {
    let Some(_) = guest_or_skip("files_env_argv_stderr_and_status") else {
        return;
    };
    let tmp = TempDir::new("linux-files");
    let data = tmp.0.join("data.bin");
    std::fs::write(&data, noise(64 << 10)).unwrap();
    let Some(sha) = host_sha256(&data) else {
        eprintln!("skipped files_env_argv_stderr_and_status: no sha256sum on this host");
        return;
    };
    let tree = tmp.0.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(
        tree.join("sub/tool.sh"),
        "#!/bin/sh\necho \"tool ran in $PWD\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.join("sub/tool.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    // A raw disk image: the command reads its first line from /dev/vda.
    let disk = tmp.0.join("disk.img");
    let mut image = b"disk-marker\n".to_vec();
    image.resize(1 << 20, 0);
    std::fs::write(&disk, image).unwrap();

    let args = [
        "a b",
        "it's",
        "\"dq\"",
        "$HOME `x`",
        "back\\slash",
        "new\nline",
        "",
    ];
    let my_var = "it's \"q\" $x \\ back\nslash";
    // A shared directory (virtio-fs, mounted at its host path): read a file, write one back.
    std::fs::create_dir_all(tmp.0.join("shared")).unwrap();
    let shared = tmp.0.join("shared").canonicalize().unwrap();
    std::fs::write(shared.join("in.txt"), "from the host\n").unwrap();
    let script = format!(
        "pwd; sha256sum data.bin; sha256sum /tmp/payload.bin; stat -c %a /tmp; \
         /opt/tree/sub/tool.sh; head -n 1 /dev/vda; \
         printf '<%s>\\n' \"$@\"; printf '[%s]\\n' \"$MY_VAR\" \"$FROM_HOST\"; \
         cat {s}/in.txt; echo from the guest >{s}/out.txt; \
         echo to-stderr >&2; exit 42",
        s = shared.display()
    );
    let mut c = exec();
    c.env("FROM_HOST", "host value")
        .arg("--file")
        .arg(&data)
        .arg("--file")
        .arg(format!("{}:/tmp/payload.bin", data.display()))
        .arg("--file")
        .arg(format!("{}:/opt/", tree.display()))
        .arg("--disk")
        .arg(format!("{},ro", disk.display()))
        .arg("--share")
        .arg(&shared)
        .arg("--env")
        .arg(format!("MY_VAR={my_var}"))
        .args(["--env", "FROM_HOST", "--", "sh", "-c", &script, "sh"])
        .args(args);
    let f = run(c, LIMIT);
    eprintln!("files/env/argv: {:.1}s", f.elapsed.as_secs_f64());

    // The file under /tmp is there (init mounts no tmpfs over the initramfs's /tmp), and
    // /tmp keeps its mode.
    let mut expected = format!(
        "/root\n{sha}  data.bin\n{sha}  /tmp/payload.bin\n1777\ntool ran in /root\n\
         disk-marker\n"
    );
    for a in args {
        expected.push_str(&format!("<{a}>\n"));
    }
    expected.push_str(&format!("[{my_var}]\n[host value]\nfrom the host\n"));
    assert_eq!(
        String::from_utf8_lossy(&f.stdout),
        expected,
        "stderr: {}",
        f.stderr
    );
    assert_eq!(f.stderr, "to-stderr\n");
    assert_eq!(f.code, Some(42));
    assert_eq!(
        std::fs::read_to_string(shared.join("out.txt")).unwrap_or_default(),
        "from the guest\n",
        "the guest's file is not in the shared directory"
    );
}

/// A command that does not exist ends with 127, as in a shell, with the shell's message on
/// stderr (on the cold path, `--cold`).
#[test]
fn command_not_found_is_127() {
    let Some(_) = guest_or_skip("command_not_found_is_127") else {
        return;
    };
    // The cold path (a boot for the command), which the other tests here leave out unless
    // they attach a disk.
    let mut c = exec();
    c.args(["--cold", "--", "no-such-command", "arg"]);
    let f = run(c, LIMIT);
    assert_eq!(f.code, Some(127), "{f:?}");
    assert!(
        f.stderr.contains("no-such-command") && f.stderr.contains("not found"),
        "{f:?}"
    );
    assert!(f.stdout.is_empty(), "{f:?}");
}

/// Lines written by the guest before it exits arrive complete and in order, then status 1.
/// The guest times its `cat` and reports the rate on stderr (shown with --nocapture).
#[test]
fn bulk_output_complete_in_order() {
    let Some(_) = guest_or_skip("bulk_output_complete_in_order") else {
        return;
    };
    // 12000 lines, 60,894 bytes: seq writes a file first, then one `cat` streams it in large
    // writes (a command that writes line by line to the tty also pays a guest system call,
    // milliseconds here, per line). Through the emulated UART this takes seconds: the guest
    // kernel's transmit path costs tens of microseconds per byte on a PVM host.
    let lines = 12_000;
    let script = format!(
        "seq 1 {lines} >/tmp/s; read t0 x </proc/uptime; cat /tmp/s; read t1 x </proc/uptime; \
         echo \"cat: uptime $t0 -> $t1\" >&2; exit 1"
    );
    let mut c = exec();
    c.args(["--", "sh", "-c", &script]);
    let f = run(c, LIMIT);
    eprintln!(
        "bulk: {:.1}s in all, VmHWM {} KiB; guest says: {}",
        f.elapsed.as_secs_f64(),
        f.hwm_kib,
        f.stderr.trim()
    );
    let expected: String = (1..=lines).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        f.stdout.len(),
        expected.len(),
        "status {:?}, stderr: {}",
        f.code,
        f.stderr
    );
    assert!(
        f.stdout == expected.as_bytes(),
        "stdout is not the lines 1..={lines} in order"
    );
    assert_eq!(f.code, Some(1), "{}", f.stderr);
    // ember holds guest RAM (128 MiB, partly touched) and no copy of the output.
    assert!(f.hwm_kib < (128 + 64) << 10, "VmHWM {} KiB", f.hwm_kib);
}

/// --timeout stops a command that would run for 1000 s: status 124, and ember ends soon
/// after the deadline (counted from ember's start, so the boot is included).
#[test]
fn timeout_stops_a_running_command() {
    let Some(_) = guest_or_skip("timeout_stops_a_running_command") else {
        return;
    };
    let timeout = 60;
    let mut c = common_exec::ember();
    c.args(["exec", "--timeout", &timeout.to_string(), "--"])
        .args(["sh", "-c", "echo started; exec sleep 1000"]);
    // Well below 1000 s: a VM that is not stopped fails here.
    let f = run(c, Duration::from_secs(timeout + 60));
    eprintln!(
        "timeout {timeout}s: ended after {:.1}s; the command had {}started",
        f.elapsed.as_secs_f64(),
        if f.stdout.is_empty() { "not yet " } else { "" }
    );
    assert_eq!(f.code, Some(124), "{f:?}");
    assert!(f.stderr.contains("timeout"), "{f:?}");
    assert!(f.stdout.is_empty() || f.stdout == b"started\n", "{f:?}");
}

/// The warm path end to end, in a cache of its own: a first exec boots the guest, snapshots
/// it when its init is ready and runs its command (status 3); then three execs run at once,
/// each restoring that snapshot, with their own commands, `--file`, `--env`, `--workdir` and
/// exit statuses (one `--file` into /tmp). Each restored guest reads fresh random bytes (no two the same: the VM
/// generation ID makes each reseed), has the host's wall-clock time (set from the job's
/// header), and reports that it was restored (`--bench-report`). Every exec shares a
/// directory of its own (`--share`): the snapshot holds the unmounted virtio-fs device, and
/// each restore hands it to a new virtiofsd serving that exec's directory (read-only for
/// one, the working directory for another).
#[test]
fn warm_execs_restore_one_snapshot_in_parallel() {
    let Some(_) = guest_or_skip("warm_execs_restore_one_snapshot_in_parallel") else {
        return;
    };
    let tmp = TempDir::new("linux-warm");
    let cache = tmp.0.join("cache");
    let report = |name: &str| tmp.0.join(format!("{name}.json"));
    let warm_exec = |name: &str| {
        let mut c = exec();
        c.env("EMBER_CACHE_DIR", &cache)
            .arg("--bench-report")
            .arg(report(name));
        c
    };
    let restored = |name: &str| {
        let text = std::fs::read_to_string(report(name)).unwrap_or_default();
        text.contains("\"restored\": true")
    };
    // Random bytes and the wall clock, as the guest sees them.
    let probe = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s";

    let share = |name: &str| {
        let d = tmp.0.join(format!("share-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    };
    let (share_first, share_a, share_b) = (share("first"), share("a"), share("b"));
    std::fs::write(share_a.join("in.txt"), "share a\n").unwrap();

    let mut c = warm_exec("first");
    c.arg("--share").arg(&share_first).args([
        "--",
        "sh",
        "-c",
        &format!(
            "echo first >{}/out.txt; {probe}; exit 3",
            share_first.display()
        ),
    ]);
    let first = run(c, LIMIT);
    eprintln!(
        "first (boot + snapshot): {:.1}s",
        first.elapsed.as_secs_f64()
    );
    assert_eq!(first.code, Some(3), "{first:?}");
    assert!(!restored("first"), "the first exec restored a snapshot");
    let entries: Vec<_> = std::fs::read_dir(cache.join("snapshots"))
        .expect("no snapshot cache")
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(entries.len(), 1, "one snapshot expected: {entries:?}");

    // The job thread of a restored exec runs under its seccomp filter: a forbidden call
    // there ends ember with SIGSYS, naming the thread and the call.
    let mut t = warm_exec("selftest");
    t.args(["--sandbox-selftest", "exec-job", "--", "true"]);
    let selftest = run(t, LIMIT);
    assert_eq!(selftest.code, None, "not killed by a signal: {selftest:?}");
    assert!(
        selftest.stderr.contains(&format!(
            "ember: seccomp: the exec-job thread exec-job made a forbidden system call: {} \
             (execve)",
            libc::SYS_execve
        )),
        "{selftest:?}"
    );

    let script = tmp.0.join("job.sh");
    std::fs::write(
        &script,
        format!(
            "echo \"job $JOB_NAME in $PWD\"\ncmp /opt/job.sh /tmp/job.sh && \
             echo \"tmp $(stat -c %a /tmp)\"\ncat {a}/in.txt\n\
             touch {a}/new 2>/dev/null || echo ro-refused\n\
             [ -f /ember/mounts.done ] && echo mounted-by-the-agent\n{probe}\nexit 0\n",
            a = share_a.display()
        ),
    )
    .unwrap();
    let mut a = warm_exec("a");
    a.arg("--share")
        .arg(format!("{},ro", share_a.display()))
        .arg("--file")
        .arg(format!("{}:/opt/job.sh", script.display()))
        .arg("--file")
        .arg(format!("{}:/tmp/", script.display()))
        .args([
            "--env",
            "JOB_NAME=a",
            "--workdir",
            "/opt",
            "--",
            "sh",
            "job.sh",
        ]);
    // b runs in its share, ember's working directory.
    let mut b = warm_exec("b");
    b.current_dir(&share_b).arg("--share").arg(".").args([
        "--",
        "sh",
        "-c",
        &format!("pwd >out.txt; {probe}; echo b-err >&2; exit 7"),
    ]);
    let share_c = share("c");
    let mut n = warm_exec("c");
    n.arg("--share")
        .arg(&share_c)
        .args(["--", "no-such-command"]);
    // Without the time in the job's header, a restored guest's clock would read the
    // snapshot's time plus its own run time: 15 s behind after this wait.
    std::thread::sleep(Duration::from_secs(15));
    let started = std::time::SystemTime::now();
    let running: Vec<_> = [a, b, n]
        .into_iter()
        .map(common_exec::Running::spawn)
        .collect();
    let done: Vec<_> = running.into_iter().map(|r| r.finish(LIMIT)).collect();
    for (name, f) in ["a", "b", "c"].iter().zip(&done) {
        eprintln!(
            "warm {name}: {:.2}s, status {:?}",
            f.elapsed.as_secs_f64(),
            f.code
        );
        assert!(
            restored(name),
            "exec {name} did not restore the snapshot: {f:?}"
        );
    }
    let (a, b, c) = (&done[0], &done[1], &done[2]);
    assert_eq!(a.code, Some(0), "{a:?}");
    assert_eq!(b.code, Some(7), "{b:?}");
    assert_eq!(c.code, Some(127), "{c:?}");
    assert_eq!(b.stderr, "b-err\n");
    assert!(c.stderr.contains("not found"), "{c:?}");
    let a_out = String::from_utf8_lossy(&a.stdout).into_owned();
    let mut a_lines = a_out.lines();
    assert_eq!(a_lines.next(), Some("job a in /opt"), "{a:?}");
    assert_eq!(a_lines.next(), Some("tmp 1777"), "{a:?}");
    assert_eq!(a_lines.next(), Some("share a"), "{a:?}");
    assert_eq!(a_lines.next(), Some("ro-refused"), "{a:?}");
    // The guest's agent (vsock-io) mounted the share, not a `mount` process per share.
    assert_eq!(a_lines.next(), Some("mounted-by-the-agent"), "{a:?}");
    assert!(
        !share_a.join("new").exists(),
        "a read-only share was written"
    );
    let out = |d: &std::path::Path| std::fs::read_to_string(d.join("out.txt")).unwrap_or_default();
    assert_eq!(out(&share_first), "first\n");
    assert_eq!(out(&share_b), format!("{}\n", share_b.display()));
    let secs =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (host_start, host_end) = (secs(started), secs(std::time::SystemTime::now()));
    let mut randoms = Vec::new();
    for (i, out) in [&first.stdout, &a.stdout, &b.stdout]
        .into_iter()
        .enumerate()
    {
        let text = String::from_utf8_lossy(out).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let n = lines.len();
        assert!(n >= 2, "{text:?}");
        let (random, date) = (lines[n - 2].to_string(), lines[n - 1]);
        assert_eq!(random.len(), 32, "16 random bytes in hex: {random:?}");
        let guest_now: u64 = date.trim().parse().expect("date +%s");
        // Within 3 s of the host's clock while the restored guests ran (the first ran
        // earlier, and its clock is only checked not to be ahead).
        assert!(
            guest_now <= host_end + 3 && (i == 0 || guest_now + 3 >= host_start),
            "guest clock {guest_now}, host {host_start}..{host_end}"
        );
        randoms.push(random);
    }
    let mut unique = randoms.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        randoms.len(),
        "random bytes repeat: {randoms:?}"
    );
}
