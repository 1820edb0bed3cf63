// SPDX-License-Identifier: Apache-2.0
//! The default Linux guest started two ways a Firecracker user would, both at once (two
//! boots in parallel):
//!
//! - through the API only, in the go SDK's order (GET /machine-config as the health check,
//!   PUT /logger, /metrics, /boot-source, /drives/rootfs, /network-interfaces/net1 on a TAP
//!   `tap0` as in Firecracker's getting-started guide (in a network namespace of the test's;
//!   left out without root), /machine-config, /vsock, then InstanceStart), with its root
//!   file system on the drive; the guest reads its drive's serial (the drive ID) and its NIC's
//!   MAC, the host pauses and resumes it through the API, and it powers off;
//! - from `--no-api --config-file` with a Firecracker configuration file; the same file is
//!   then given to Firecracker itself (../shared/peers/firecracker, when present), which must
//!   accept it and start the kernel.
//!
//! Skipped without /dev/kvm, curl or the built guest.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// What the guest runs: its root device, the drive's serial, then power off.
const GUEST_CMD: &str =
    "echo API-ROOT $(while read d m r; do [ $m = / ] && echo $d; done </proc/mounts); \
                         echo API-SERIAL $(cat /sys/block/vda/serial); \
                         echo API-MAC $(cat /sys/class/net/eth0/address 2>/dev/null)";

fn guest_files(test: &str) -> Option<(PathBuf, PathBuf, PathBuf)> {
    if !kvm_available(test) {
        return None;
    }
    let (kernel, _) = default_guest(test)?;
    let rootfs = kernel.with_file_name("rootfs.ext4");
    if !rootfs.is_file() {
        eprintln!("SKIP {test}: {} is missing", rootfs.display());
        return None;
    }
    let dir = temp_dir(test);
    let root = dir.join("rootfs.ext4");
    std::fs::copy(&rootfs, &root).unwrap();
    Some((kernel, root, dir))
}

fn boot_args() -> String {
    format!("console=ttyS0 reboot=k panic=1 pci=off ember.exit=poweroff ember.cmd=\"{GUEST_CMD}\"")
}

fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "60", "-X", method, "--unix-socket"])
        .arg(sock)
        .args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    c.arg(format!("http://localhost{path}"));
    let out = c.output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn ok(sock: &Path, method: &str, path: &str, body: Option<&str>) -> String {
    let (code, text) = curl(sock, method, path, body);
    assert!(code == 200 || code == 204, "{method} {path}: {code} {text}");
    text
}

#[test]
fn linux_boots_through_the_api() {
    const NAME: &str = "linux_boots_through_the_api";
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIP {NAME}: no curl");
        return;
    }
    let Some((kernel, root, dir)) = guest_files(NAME) else {
        return;
    };
    let sock = dir.join("fc.sock");
    let args = [
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--id",
        "api-linux",
    ];
    // Firecracker's getting-started network: a TAP `tap0` (here in a namespace of the
    // test's own, where ember runs).
    let netns = if netns_capable(NAME) {
        Netns::new("api-linux")
    } else {
        None
    };
    let child = match &netns {
        Some(ns) => {
            ns.ip(&["tuntap", "add", "tap0", "mode", "tap"]);
            ns.ip(&["addr", "add", "172.16.0.1/30", "dev", "tap0"]);
            ns.ip(&["link", "set", "tap0", "up"]);
            ns.ember(&args).spawn().unwrap()
        }
        None => ember_command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    ok(&sock, "GET", "/machine-config", None);
    let log = dir.join("fc.log");
    let metrics = dir.join("fc.metrics");
    ok(
        &sock,
        "PUT",
        "/logger",
        Some(&format!(
            r#"{{"log_path": "{}", "level": "Info", "show_level": true, "show_log_origin": true}}"#,
            log.display()
        )),
    );
    ok(
        &sock,
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, metrics.display())),
    );
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "boot_args": boot_args(),
    });
    ok(&sock, "PUT", "/boot-source", Some(&boot.to_string()));
    ok(
        &sock,
        "PUT",
        "/drives/rootfs",
        Some(&format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
            root.display()
        )),
    );
    if netns.is_some() {
        ok(
            &sock,
            "PUT",
            "/network-interfaces/net1",
            Some(
                r#"{"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}"#,
            ),
        );
    }
    ok(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#),
    );
    let vsock = dir.join("v.sock");
    ok(
        &sock,
        "PUT",
        "/vsock",
        Some(&format!(
            r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
            vsock.display()
        )),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    eprintln!("configured and started in {:?}", t0.elapsed());
    let info = ok(&sock, "GET", "/", None);
    assert!(
        info.contains("\"Running\"") && info.contains("api-linux"),
        "{info}"
    );
    ok(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert!(ok(&sock, "GET", "/", None).contains("\"Paused\""));
    ok(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    let config = ok(&sock, "GET", "/vm/config", None);
    assert!(config.contains("\"rootfs\""), "{config}");

    let out = wait_ember(child, BOOT_TIMEOUT);
    let dump = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout, out.stderr
    );
    assert!(!out.timed_out, "the guest did not finish\n{dump}");
    assert!(
        out.stdout.contains("API-ROOT /dev/root"),
        "root is not the drive\n{dump}"
    );
    assert!(
        out.stdout.contains("API-SERIAL rootfs"),
        "the drive's serial is not its ID\n{dump}"
    );
    if netns.is_some() {
        assert!(
            out.stdout.contains("API-MAC 06:00:ac:10:00:02"),
            "the NIC is missing\n{dump}"
        );
    }
    assert_eq!(out.code, Some(0), "{dump}");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("[api-linux:"), "log: {log_text:?}");
    // A metrics line is written when ember ends: the API's requests are in it.
    let m = std::fs::read_to_string(&metrics).unwrap_or_default();
    let total: u64 = m
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["api_server"]["requests"].as_u64())
        .sum();
    assert!(total >= 10, "metrics: {m:?}");
    // The guest read its root file system from the drive, and printed on the serial port.
    let sum = |group: &str, key: &str| -> u64 {
        m.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v[group][key].as_u64())
            .sum()
    };
    assert!(
        sum("block", "read_count") > 0 && sum("block", "read_bytes") > 0,
        "metrics: {m:?}"
    );
    assert!(sum("uart", "write_count") > 0, "metrics: {m:?}");
    assert!(!sock.exists(), "the API socket was left behind");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn linux_boots_from_a_firecracker_config_file() {
    const NAME: &str = "linux_boots_from_a_firecracker_config_file";
    let Some((kernel, root, dir)) = guest_files(NAME) else {
        return;
    };
    let doc = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args()},
        "drives": [{"drive_id": "rootfs", "path_on_host": root, "is_root_device": true, "is_read_only": false}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": false},
    });
    let file = dir.join("vm.json");
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let out = run_ember(
        &["run", "--no-api", "--config-file", file.to_str().unwrap()],
        None,
        BOOT_TIMEOUT,
    );
    let dump = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout, out.stderr
    );
    assert!(!out.timed_out, "{dump}");
    assert!(out.stdout.contains("API-SERIAL rootfs"), "{dump}");
    assert_eq!(out.code, Some(0), "{dump}");

    // Firecracker takes the same file and starts the kernel (its own boot is not waited for:
    // it is the file that is checked).
    let fc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/firecracker");
    if !fc.is_file() {
        eprintln!(
            "note: {} not present: the file was not given to Firecracker",
            fc.display()
        );
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    let mut child = Command::new(&fc)
        .args(["--no-api", "--config-file"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&seen).contains("Linux version") {
                break;
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let seen = reader.join().unwrap();
    let _ = child.kill();
    let fc_out = child.wait_with_output().unwrap();
    assert!(
        seen.contains("Linux version"),
        "Firecracker did not start the kernel from the same file: {seen}\n{}",
        String::from_utf8_lossy(&fc_out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}
