// SPDX-License-Identifier: Apache-2.0
//! `ember exec` end to end with tiny guests (a few instructions, milliseconds each): every way
//! a run can end maps to its documented exit status, output reaches stdout/stderr complete
//! and before the status, and ember's memory does not grow with the output. The same paths
//! with a real Linux guest are in tests/exec_linux.rs.

mod common;
mod common_exec;

use std::time::Duration;

use common::Asm;
use common_exec::tiny::{self, COM1, COM2};
use common_exec::{kvm_or_skip, run, Running, TempDir};

const LIMIT: Duration = Duration::from_secs(120);

/// `ember exec --kernel <tiny guest> [extra...] -- true`.
fn exec_tiny(dir: &TempDir, name: &str, code: &Asm, extra: &[&str]) -> std::process::Command {
    let kernel = common_exec::tiny_guest(&dir.0, name, code);
    let mut cmd = common_exec::ember();
    cmd.arg("exec")
        .arg("--kernel")
        .arg(kernel)
        .args(extra)
        .args(["--", "true"]);
    cmd
}

#[test]
fn exit_device_status_is_the_exit_status() {
    if !kvm_or_skip("exit_device_status_is_the_exit_status") {
        return;
    }
    let dir = TempDir::new("status");
    for status in [0u32, 1, 42, 255] {
        let mut code = Asm::new();
        tiny::write_status(&mut code, status).halt_loop();
        let f = run(exec_tiny(&dir, "status", &code, &[]), LIMIT);
        assert_eq!(f.code, Some(i32::try_from(status).unwrap()), "{f:?}");
        assert!(f.stdout.is_empty(), "{f:?}");
        assert!(
            f.stderr.is_empty(),
            "no message when the command's status came back: {f:?}"
        );
    }
}

#[test]
fn out_of_range_status_is_a_failure() {
    if !kvm_or_skip("out_of_range_status_is_a_failure") {
        return;
    }
    let dir = TempDir::new("range");
    let mut code = Asm::new();
    tiny::write_status(&mut code, 300).halt_loop();
    let f = run(exec_tiny(&dir, "range", &code, &[]), LIMIT);
    assert_eq!(f.code, Some(125), "{f:?}");
    assert!(f.stderr.contains("300"), "{f:?}");
}

/// COM1 goes to stdout and COM2 to stderr; all output written before the status arrives
/// complete and in order; nothing the guest does after its status write reaches stdout.
#[test]
fn output_before_the_status_is_complete_and_nothing_after_it() {
    if !kvm_or_skip("output_before_the_status_is_complete_and_nothing_after_it") {
        return;
    }
    let dir = TempDir::new("order");
    let n = 100_000;
    let mut code = Asm::new();
    tiny::out_counter(&mut code, COM1, n);
    tiny::out_bytes(&mut code, COM2, b"on stderr\n");
    tiny::write_status(&mut code, 7);
    tiny::out_bytes(&mut code, COM1, b"AFTER STATUS").halt_loop();
    let f = run(exec_tiny(&dir, "order", &code, &[]), LIMIT);
    assert_eq!(f.code, Some(7), "stderr: {}", f.stderr);
    let expected: Vec<u8> = (0..n).map(|i| (i % 256) as u8).collect();
    assert_eq!(f.stdout.len(), expected.len(), "stderr: {}", f.stderr);
    assert!(
        f.stdout == expected,
        "stdout differs from the byte sequence the guest wrote"
    );
    assert_eq!(f.stderr, "on stderr\n");
}

#[test]
fn reset_without_status_is_a_failure() {
    if !kvm_or_skip("reset_without_status_is_a_failure") {
        return;
    }
    let dir = TempDir::new("reset");
    let f = run(exec_tiny(&dir, "reset", Asm::new().reset(), &[]), LIMIT);
    assert_eq!(f.code, Some(125), "{f:?}");
    assert!(f.stderr.contains("without reporting"), "{f:?}");
}

#[test]
fn timeout_stops_the_vm_with_124() {
    if !kvm_or_skip("timeout_stops_the_vm_with_124") {
        return;
    }
    let dir = TempDir::new("timeout");
    let f = run(
        exec_tiny(
            &dir,
            "spin",
            tiny::spin(&mut Asm::new()),
            &["--timeout", "1.5"],
        ),
        LIMIT,
    );
    assert_eq!(f.code, Some(124), "{f:?}");
    assert!(f.stderr.contains("timeout"), "{f:?}");
    assert!(f.elapsed >= Duration::from_millis(1500), "{f:?}");
}

/// SIGTERM and SIGINT stop a guest that would never end, and ember exits 128 + signal.
#[test]
fn signals_stop_the_vm() {
    if !kvm_or_skip("signals_stop_the_vm") {
        return;
    }
    let dir = TempDir::new("signal");
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let r = Running::spawn(exec_tiny(&dir, "spin", tiny::spin(&mut Asm::new()), &[]));
        // Let ember block the signals and start the vCPU; a signal before that would kill it
        // with the default action, which the assertion below would report.
        std::thread::sleep(Duration::from_millis(700));
        r.signal(sig);
        let f = r.finish(LIMIT);
        assert_eq!(f.code, Some(code), "signal {sig}: {f:?}");
        assert!(f.stderr.contains("stopped by signal"), "{f:?}");
    }
}

/// ember's peak memory does not grow with the amount of output: a run writing 1 MiB peaks no
/// more than 448 KiB (half the difference) above one writing 128 KiB (if ember buffered
/// output, the difference would be the whole 896 KiB). Both runs last seconds (~16 us per
/// byte here), so that what ember touches once in a run of some length is in both peaks, and
/// the margin is twice the run-to-run spread of the peak seen here (~200 KiB): with 16 KiB
/// (0.3 s) against 512 KiB and a 256 KiB margin it once failed at +336 KiB without any
/// buffering.
#[test]
fn memory_stays_bounded_while_streaming() {
    if !kvm_or_skip("memory_stays_bounded_while_streaming") {
        return;
    }
    let dir = TempDir::new("hwm");
    let hwm = |n: u32| {
        let mut code = Asm::new();
        tiny::out_counter(&mut code, COM1, n);
        tiny::write_status(&mut code, 0).halt_loop();
        let f = run(
            exec_tiny(&dir, "bulk", &code, &[]),
            Duration::from_secs(300),
        );
        assert_eq!(f.code, Some(0), "{}", f.stderr);
        assert_eq!(f.stdout.len(), n as usize);
        eprintln!(
            "{n} bytes: VmHWM {} KiB, {:.2}s ({:.1} us/byte incl. start-up)",
            f.hwm_kib,
            f.elapsed.as_secs_f64(),
            f.elapsed.as_secs_f64() * 1e6 / f64::from(n)
        );
        f.hwm_kib
    };
    let small = hwm(128 << 10);
    let big = hwm(1 << 20);
    assert!(small > 0 && big > 0, "VmHWM was not sampled");
    assert!(
        big <= small + 448,
        "VmHWM grew from {small} KiB to {big} KiB with 896 KiB more output"
    );
}

/// ember's own failures (bad flags, missing files) exit 125, never a status a command could
/// also return such as 2; no KVM needed.
#[test]
fn usage_errors_exit_125() {
    let cases: [&[&str]; 5] = [
        &["exec", "--bogus", "--", "true"],
        &["exec", "--kernel", "/nonexistent/vmlinux", "--", "true"],
        &[
            "exec",
            "--kernel",
            "/nonexistent/vmlinux",
            "--file",
            "/nonexistent/f",
            "--",
            "true",
        ],
        &[
            "exec",
            "--kernel",
            "/nonexistent/vmlinux",
            "--env",
            "1BAD=x",
            "--",
            "true",
        ],
        &[
            "--log-level",
            "debug",
            "exec",
            "--timeout",
            "-1",
            "--",
            "true",
        ],
    ];
    for args in cases {
        let mut cmd = common_exec::ember();
        cmd.args(args);
        let f = run(cmd, LIMIT);
        assert_eq!(f.code, Some(125), "{args:?}: {f:?}");
        assert!(!f.stderr.is_empty(), "{args:?}: no message");
    }
    let mut cmd = common_exec::ember();
    cmd.args(["run", "--bogus"]);
    assert_eq!(
        run(cmd, LIMIT).code,
        Some(2),
        "ember run keeps its usage status"
    );
    let mut cmd = common_exec::ember();
    cmd.args(["exec", "--help"]);
    let f = run(cmd, LIMIT);
    assert_eq!(f.code, Some(0));
    assert!(
        String::from_utf8_lossy(&f.stdout).contains("124"),
        "help documents the statuses"
    );
}

/// Reads the `--json` result ember wrote.
fn read_json(path: &std::path::Path) -> ember::bench::json::Json {
    let text = std::fs::read_to_string(path).expect("ember wrote no --json result");
    ember::bench::json::Json::parse(&text).expect("--json result is JSON")
}

/// `--json`: a guest that prints a WARNING (function named on the line), an oops whose RIP is
/// an address only (symbolized from the kernel's ELF symbols) and a panic line, then writes
/// its status: the result has the status, the path, boot phases, and the three problems.
#[test]
fn json_result_reports_status_and_kernel_problems() {
    use ember::bench::json::Json;
    if !kvm_or_skip("json_result_reports_status_and_kernel_problems") {
        return;
    }
    let dir = TempDir::new("json");
    let rip = common::TINY_LOAD + 0x10;
    let console = format!(
        "hello from the command\n\
         [    1.000000] WARNING: CPU: 0 PID: 1 at drivers/foo/bar.c:42 foo_probe+0x1a/0x40\r\n\
         [    1.100000] BUG: unable to handle page fault for address: 0000000000001000\r\n\
         [    1.100001] Oops: 0000 [#1] SMP\r\n\
         [    1.100002] RIP: 0010:{rip:#x}\r\n\
         [    1.200000] Kernel panic - not syncing: Fatal exception\r\n"
    );
    let mut code = Asm::new();
    tiny::out_bytes(&mut code, COM1, console.as_bytes());
    tiny::write_status(&mut code, 3).halt_loop();
    let kernel =
        common::write_tiny_guest(&dir.0, "oops", &code.code, &[("tiny_fault_fn", 0, 0x100)]);
    let json = dir.0.join("result.json");
    let mut cmd = common_exec::ember();
    cmd.arg("exec")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--json")
        .arg(&json)
        .args(["--", "true"]);
    let f = run(cmd, LIMIT);
    assert_eq!(f.code, Some(3), "{f:?}");
    let j = read_json(&json);
    assert_eq!(j.get("status").and_then(Json::as_u64), Some(3), "{j}");
    assert_eq!(j.get("command_status").and_then(Json::as_u64), Some(3));
    assert_eq!(
        j.get("reason").and_then(Json::as_str),
        Some("command-exited")
    );
    assert_eq!(j.get("path").and_then(Json::as_str), Some("cold"));
    assert!(j.get("duration_ms").and_then(Json::as_f64).is_some());
    let boot = j.get("boot").expect("boot phases");
    for phase in [
        "vm_created",
        "kernel_loaded",
        "first_kvm_run",
        "first_serial_byte",
    ] {
        assert!(
            boot.get(phase).and_then(Json::as_f64).is_some(),
            "{phase}: {j}"
        );
    }
    let problems = j.get("kernel_problems").and_then(Json::as_array).unwrap();
    let got: Vec<(&str, Option<&str>)> = problems
        .iter()
        .map(|p| {
            (
                p.get("kind").and_then(Json::as_str).unwrap(),
                p.get("function").and_then(Json::as_str),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("warning", Some("foo_probe")),
            ("bug", Some("tiny_fault_fn")),
            ("panic", None)
        ],
        "{j}"
    );
    assert_eq!(
        problems[1].get("line").and_then(Json::as_str),
        Some("BUG: unable to handle page fault for address: 0000000000001000")
    );
    assert_eq!(
        problems[1].get("address").and_then(Json::as_str),
        Some(format!("{rip:#x}").as_str())
    );
}

/// `--json` is written when the VM is stopped by the timeout, and when ember fails before
/// booting (here: a kernel tree without a kernel, named with both paths looked for).
#[test]
fn json_result_on_timeout_and_setup_errors() {
    use ember::bench::json::Json;
    let dir = TempDir::new("json-err");
    let json = dir.0.join("err.json");
    let tree = dir.0.join("linux");
    std::fs::create_dir_all(&tree).unwrap();
    let mut cmd = common_exec::ember();
    cmd.arg("exec")
        .arg("--kernel-tree")
        .arg(&tree)
        .arg("--json")
        .arg(&json)
        .args(["--", "true"]);
    let f = run(cmd, LIMIT);
    assert_eq!(f.code, Some(125), "{f:?}");
    assert!(
        f.stderr.contains("arch/x86/boot/bzImage") && f.stderr.contains("vmlinux"),
        "{f:?}"
    );
    let j = read_json(&json);
    assert_eq!(j.get("status").and_then(Json::as_u64), Some(125), "{j}");
    assert_eq!(j.get("command_status"), Some(&Json::Null));
    assert_eq!(j.get("reason").and_then(Json::as_str), Some("setup-error"));
    assert!(j
        .get("message")
        .and_then(Json::as_str)
        .is_some_and(|m| m.contains("bzImage")));

    if !kvm_or_skip("json_result_on_timeout_and_setup_errors") {
        return;
    }
    let json = dir.0.join("timeout.json");
    let json_arg = json.to_str().unwrap().to_string();
    let f = run(
        exec_tiny(
            &dir,
            "spin",
            tiny::spin(&mut Asm::new()),
            &["--timeout", "1", "--json", &json_arg],
        ),
        LIMIT,
    );
    assert_eq!(f.code, Some(124), "{f:?}");
    let j = read_json(&json);
    assert_eq!(j.get("status").and_then(Json::as_u64), Some(124), "{j}");
    assert_eq!(j.get("reason").and_then(Json::as_str), Some("timeout"));
    assert_eq!(j.get("command_status"), Some(&Json::Null));
}
