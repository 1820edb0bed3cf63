// SPDX-License-Identifier: Apache-2.0
//! Firecracker's API and config file, driven by real clients (curl over the Unix socket, and
//! raw sockets for malformed input) against `ember run --api-sock` / `--config-file`, with
//! tiny guests (milliseconds): every endpoint, the pre-/post-boot rules, the error bodies,
//! pause/resume, a snapshot, and a socket flooded with connections, a 10 MB body and
//! half-written requests while the VM runs. tests/api_linux.rs boots Linux through both.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// An `ember run --api-sock` process and its socket.
struct Instance {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Instance {
    fn start(name: &str, extra: &[&str]) -> Option<Self> {
        if !kvm_available(name) {
            return None;
        }
        let dir = temp_dir(name);
        let sock = dir.join("api.sock");
        let mut args = vec!["run", "--api-sock", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        let child = ember_command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "the API socket did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Self { child, sock, dir })
    }

    /// A request through curl: (status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "30", "-X", method, "--unix-socket"])
            .arg(&self.sock)
            .args(["-H", "Accept: application/json", "-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "-d", b]);
        }
        c.arg(format!("http://localhost{path}"));
        let out = c.output().expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> String {
        let (got, text) = self.curl(method, path, body);
        assert_eq!(got, status, "{method} {path} {body:?}: {text}");
        if status >= 400 {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("{method} {path}: error body is not JSON ({e}): {text}")
            });
            assert!(
                v["fault_message"].as_str().is_some_and(|m| !m.is_empty()),
                "{method} {path}: no fault_message: {text}"
            );
        }
        text
    }

    fn state(&self) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.expect("GET", "/", None, 200)).unwrap();
        v["state"].as_str().unwrap_or_default().to_string()
    }

    /// Ends the process (SIGTERM, then SIGKILL) and returns its output.
    fn finish(&mut self) -> (Option<i32>, String, String) {
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = self.child.wait().unwrap();
        let read = |pipe: Option<&mut dyn Read>| {
            let mut text = String::new();
            if let Some(p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        };
        let stdout = read(self.child.stdout.as_mut().map(|p| p as &mut dyn Read));
        let stderr = read(self.child.stderr.as_mut().map(|p| p as &mut dyn Read));
        (status.code(), stdout, stderr)
    }
}

impl Drop for Instance {
    /// A test that fails half-way does not leave its ember running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn curl_available() -> bool {
    let ok = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("note: curl not installed (scripts/test-all.sh installs it); skipped");
    }
    ok
}

/// A tiny guest that prints `up` and halts for ever (until ember is stopped).
fn idle_guest(dir: &Path) -> PathBuf {
    let mut a = Asm::new();
    a.print("up\n").halt_loop();
    write_tiny_guest(dir, "idle.elf", &a.code, &[])
}

/// Sends raw bytes on a new connection and reads the answer (until close or timeout).
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    // Headers are in; the body (if any) follows at once.
                    std::thread::sleep(Duration::from_millis(50));
                    if let Ok(n) = s.read(&mut buf) {
                        out.extend_from_slice(&buf[..n]);
                    }
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every pre-boot endpoint, its errors, InstanceStart, and the post-boot rules.
#[test]
fn api_configures_starts_and_controls_a_vm() {
    if !curl_available() {
        return;
    }
    let Some(mut vm) = Instance::start("api-flow", &[]) else {
        return;
    };
    let kernel = idle_guest(&vm.dir);
    let disk = vm.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    // Health check (the go SDK's first call) and the defaults.
    let m: serde_json::Value =
        serde_json::from_str(&vm.expect("GET", "/machine-config", None, 200)).unwrap();
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(1), Some(128))
    );
    assert_eq!(vm.state(), "Not started");
    let v: serde_json::Value =
        serde_json::from_str(&vm.expect("GET", "/version", None, 200)).unwrap();
    assert!(v["firecracker_version"].is_string());

    // Errors before the start: each a 400 with a fault_message.
    vm.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
    );
    let t = vm.expect(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/k"}"#),
        400,
    );
    assert!(t.contains("cannot be opened"), "{t}");
    let t = vm.expect(
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}", "boot_arg": "x"}}"#,
            kernel.display()
        )),
        400,
    );
    assert!(t.contains("unknown field"), "{t}");
    vm.expect("PUT", "/boot-source", None, 400);
    vm.expect("PUT", "/boot-source", Some("{not json"), 400);
    vm.expect(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
        400,
    );
    vm.expect(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 16, "smt": true}"#),
        400,
    );
    vm.expect(
        "PUT",
        "/drives/a",
        Some(&format!(
            r#"{{"drive_id": "b", "path_on_host": "{}", "is_root_device": false}}"#,
            disk.display()
        )),
        400,
    );
    vm.expect(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 1, "uds_path": "/tmp/x.sock"}"#),
        400,
    );
    vm.expect("PUT", "/actions", Some(r#"{"action_type": "Reboot"}"#), 400);
    vm.expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 400);
    vm.expect(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": false}"#),
        400,
    );
    vm.expect("GET", "/no-such-thing", None, 400);
    vm.expect("DELETE", "/boot-source", None, 400);
    vm.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        400,
    );

    // The configuration, as the go SDK sends it.
    vm.expect(
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
            kernel.display()
        )),
        204,
    );
    vm.expect(
        "PUT",
        "/drives/rootfs",
        Some(&format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
            disk.display()
        )),
        204,
    );
    vm.expect(
        "PATCH",
        "/drives/rootfs",
        Some(&format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}"}}"#,
            disk.display()
        )),
        204,
    );
    vm.expect(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 32}"#),
        204,
    );
    vm.expect(
        "PATCH",
        "/machine-config",
        Some(r#"{"mem_size_mib": 16}"#),
        204,
    );
    vm.expect(
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#),
        204,
    );
    let metrics = vm.dir.join("metrics.json");
    vm.expect(
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, metrics.display())),
        204,
    );
    let log = vm.dir.join("log.txt");
    vm.expect(
        "PUT",
        "/logger",
        Some(&format!(
            r#"{{"log_path": "{}", "level": "Info", "show_level": true}}"#,
            log.display()
        )),
        204,
    );
    let c: serde_json::Value =
        serde_json::from_str(&vm.expect("GET", "/vm/config", None, 200)).unwrap();
    assert_eq!(c["machine-config"]["vcpu_count"], 2);
    assert_eq!(c["machine-config"]["mem_size_mib"], 16);
    assert_eq!(c["drives"][0]["drive_id"], "rootfs");
    assert_eq!(c["boot-source"]["boot_args"], "console=ttyS0");

    vm.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        204,
    );
    assert_eq!(vm.state(), "Running");

    // After the start: configuration is refused, control works.
    let t = vm.expect(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 16}"#),
        400,
    );
    assert!(t.contains("after starting"), "{t}");
    vm.expect(
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}"}}"#,
            kernel.display()
        )),
        400,
    );
    vm.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
    );
    vm.expect("GET", "/machine-config", None, 200);
    // A new image under the running drive (a bigger one), and refusals.
    let disk2 = vm.dir.join("disk2.img");
    std::fs::write(&disk2, vec![0u8; 2 << 20]).unwrap();
    vm.expect(
        "PATCH",
        "/drives/rootfs",
        Some(&format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}"}}"#,
            disk2.display()
        )),
        204,
    );
    let t = vm.expect(
        "PATCH",
        "/drives/rootfs",
        Some(&format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}"}}"#,
            vm.dir.join("missing.img").display()
        )),
        400,
    );
    assert!(t.contains("missing.img"), "{t}");
    vm.expect(
        "PATCH",
        "/drives/rootfs",
        Some(r#"{"drive_id": "rootfs", "rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#),
        400,
    );
    vm.expect(
        "PATCH",
        "/drives/nope",
        Some(r#"{"drive_id": "nope", "path_on_host": "/x"}"#),
        400,
    );
    let c: serde_json::Value =
        serde_json::from_str(&vm.expect("GET", "/vm/config", None, 200)).unwrap();
    assert_eq!(
        c["drives"][0]["path_on_host"],
        disk2.display().to_string(),
        "{c}"
    );
    vm.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        204,
    );
    vm.expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    assert_eq!(vm.state(), "Paused");
    vm.expect(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "x", "mem_file_path": "y", "snapshot_type": "Diff"}"#),
        400,
    );
    let (state, mem) = (vm.dir.join("snap/state"), vm.dir.join("snap/memory"));
    std::fs::create_dir_all(vm.dir.join("snap")).unwrap();
    vm.expect(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        )),
        204,
    );
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 16 << 20);
    assert!(std::fs::metadata(&state).unwrap().len() > 0);
    vm.expect("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    assert_eq!(vm.state(), "Running");
    vm.expect("PATCH", "/vm", Some(r#"{"state": "Running"}"#), 400);
    vm.expect(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "x", "mem_file_path": "y"}"#),
        400,
    );
    // The tiny guest never enables an ACPI power button.
    let t = vm.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        400,
    );
    assert!(t.contains("power button"), "{t}");

    let metrics_text = std::fs::read_to_string(&metrics).unwrap_or_default();
    let line: serde_json::Value =
        serde_json::from_str(metrics_text.lines().next().unwrap_or("{}")).unwrap();
    assert!(
        line["api_server"]["requests"].as_u64().unwrap_or(0) > 10,
        "{metrics_text}"
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();

    // A second ember loads the snapshot (paused, then resumed; the first one still runs,
    // and shares the read-only drive).
    let Some(mut vm2) = Instance::start("api-flow-load", &[]) else {
        return;
    };
    let load = |extra: &str| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}{extra}}}"#,
            state.display(),
            mem.display()
        )
    };
    vm2.expect(
        "PUT",
        "/snapshot/load",
        Some(&load(r#", "enable_diff_snapshots": true"#)),
        400,
    );
    vm2.expect(
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "/x"}}}}"#,
            state.display()
        )),
        400,
    );
    vm2.expect(
        "PUT",
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/nonexistent", "mem_file_path": "/x"}"#),
        400,
    );
    vm2.expect(
        "PUT",
        "/snapshot/load",
        Some(&load(r#", "resume_vm": false"#)),
        204,
    );
    assert_eq!(vm2.state(), "Paused");
    let c: serde_json::Value =
        serde_json::from_str(&vm2.expect("GET", "/vm/config", None, 200)).unwrap();
    assert_eq!(c["machine-config"]["vcpu_count"], 2, "{c}");
    assert_eq!(c["machine-config"]["mem_size_mib"], 16, "{c}");
    vm2.expect("PUT", "/snapshot/load", Some(&load("")), 400);
    vm2.expect("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    assert_eq!(vm2.state(), "Running");
    let dir2 = vm2.dir.clone();
    let (_, _, stderr2) = vm2.finish();
    assert!(stderr2.contains("restored the snapshot"), "{stderr2}");
    let _ = std::fs::remove_dir_all(dir2);

    let (sock, dir) = (vm.sock.clone(), vm.dir.clone());
    let (code, stdout, stderr) = vm.finish();
    assert!(
        stdout.contains("up"),
        "the guest did not run: {stdout:?} {stderr}"
    );
    assert!(code.is_some(), "ember was killed: {stderr}");
    assert!(log_text.contains(":INFO] "), "log lines: {log_text:?}");
    assert!(
        log_text.contains("replaced by"),
        "the swap is not logged: {log_text:?}"
    );
    assert!(!sock.exists(), "the API socket was left behind");
    let _ = std::fs::remove_dir_all(dir);
}

/// Malformed and hostile clients: bounded, answered, and the VM unaffected.
#[test]
fn api_socket_survives_floods_and_bad_requests() {
    if !curl_available() {
        return;
    }
    let Some(mut vm) = Instance::start("api-flood", &[]) else {
        return;
    };
    let kernel = idle_guest(&vm.dir);
    // A 10 MB body: refused (413) before it is read.
    let mut big = format!(
        "PUT /boot-source HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    )
    .into_bytes();
    big.extend(std::iter::repeat_n(b'x', 64 << 10));
    let answer = raw(&vm.sock, &big);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Garbage, and a header section without end.
    assert!(raw(&vm.sock, b"\x00\x01\x02\r\n\r\n").starts_with("HTTP/1.1 400"));
    let answer = raw(
        &vm.sock,
        format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(20 << 10)).as_bytes(),
    );
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // Half-written requests and a thousand idle connections: the API still answers.
    let mut held = Vec::new();
    for i in 0..1000 {
        if let Ok(mut s) = UnixStream::connect(&vm.sock) {
            if i % 2 == 0 {
                let _ = s.write_all(
                    b"PUT /machine-config HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"vcpu",
                );
            }
            held.push(s);
        }
    }
    // The refused ones get 503 and are closed; the first 64 stay open and idle.
    let last = held.last_mut().expect("connections");
    last.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = last.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    drop(held.drain(64..));
    drop(held);
    vm.expect(
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}"}}"#,
            kernel.display()
        )),
        204,
    );
    vm.expect(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 16}"#),
        204,
    );
    vm.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        204,
    );
    // Floods after the start do not stop the VM.
    for _ in 0..200 {
        let _ = raw(&vm.sock, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    }
    assert_eq!(vm.state(), "Running");
    let dir = vm.dir.clone();
    let (_, stdout, stderr) = vm.finish();
    assert!(stdout.contains("up"), "{stdout:?} {stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `--config-file`: Firecracker's document boots the VM; bad documents are refused with 2.
#[test]
fn config_file_boots_and_bad_ones_are_refused() {
    if !kvm_available("config_file") {
        return;
    }
    let dir = temp_dir("api-config-file");
    let mut a = Asm::new();
    a.print("from a config file\n").reset();
    let kernel = write_tiny_guest(&dir, "k.elf", &a.code, &[]);
    let disk = dir.join("d.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = write(
        "vm.json",
        format!(
            r#"{{
  "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}},
  "drives": [{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}],
  "machine-config": {{"vcpu_count": 1, "mem_size_mib": 16, "smt": false}}
}}"#,
            kernel.display(),
            disk.display()
        ),
    );
    let out = run_ember(
        &["run", "--no-api", "--config-file", good.to_str().unwrap()],
        None,
        Duration::from_secs(30),
    );
    out.expect_code(0);
    assert!(out.stdout.contains("from a config file"), "{out:?}");

    let cases = [
        (
            "balloon.json",
            r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": false}}"#.to_string(),
            "balloon",
        ),
        (
            "typo.json",
            r#"{"boot_source": {}}"#.to_string(),
            "unknown field",
        ),
        (
            "nokernel.json",
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 16}}"#.to_string(),
            "boot-source",
        ),
        (
            "notjson.json",
            "vcpus=2".to_string(),
            "not a Firecracker configuration",
        ),
    ];
    for (name, text, needle) in cases {
        let p = write(name, text);
        let out = run_ember(
            &["run", "--config-file", p.to_str().unwrap()],
            None,
            Duration::from_secs(30),
        );
        out.expect_code(2);
        assert!(out.stderr.contains(needle), "{name}: {out:?}");
    }
    // --config-file replaces the VM flags: both at once is a usage error.
    let out = run_ember(
        &[
            "run",
            "--config-file",
            good.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(30),
    );
    out.expect_code(2);
    let _ = std::fs::remove_dir_all(dir);
}
