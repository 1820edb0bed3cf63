// SPDX-License-Identifier: Apache-2.0
//! Bad input on the command line: every case gets one clear message naming the problem and
//! the fix, and exit status 2, before any VM runs.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

fn expect_error(args: &[&str], needles: &[&str]) {
    let out = run_ember(args, None, T);
    assert_eq!(out.code, Some(2), "{out:?}");
    for n in needles {
        assert!(out.stderr.contains(n), "stderr lacks {n:?}: {}", out.stderr);
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

fn tiny_kernel(dir: &std::path::Path) -> String {
    let mut a = Asm::new();
    a.reset();
    write_tiny_guest(dir, "k.elf", &a.code, &[])
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn help_documents_exit_codes() {
    let out = run_ember(&["run", "--help"], None, T);
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("Exit status:"));
    assert!(out.stdout.contains("--vcpus"));
    assert!(out.stdout.contains("triple-faulted"));
}

#[test]
fn missing_kernel_file() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        &["no such file", "--kernel"],
    );
}

#[test]
fn kernel_that_is_a_directory() {
    expect_error(&["run", "--kernel", "/"], &["directory", "--kernel"]);
}

#[test]
fn kernel_of_unknown_format() {
    if !kvm_available("unknown_format") {
        return;
    }
    let dir = temp_dir("cli-format");
    let k = dir.join("notakernel");
    std::fs::write(&k, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    expect_error(
        &["run", "--kernel", k.to_str().unwrap()],
        &["neither an ELF vmlinux nor a bzImage"],
    );
}

#[test]
fn missing_initrd() {
    let dir = temp_dir("cli-initrd");
    let k = tiny_kernel(&dir);
    expect_error(
        &["run", "--kernel", &k, "--initrd", "/nonexistent/initrd"],
        &["no such file", "--initrd"],
    );
}

#[test]
fn initrd_that_does_not_fit() {
    if !kvm_available("initrd_too_large") {
        return;
    }
    let dir = temp_dir("cli-bigrd");
    let k = tiny_kernel(&dir);
    let rd = dir.join("big.cpio");
    // Sparse: costs no disk.
    std::fs::File::create(&rd)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    expect_error(
        &[
            "run",
            "--kernel",
            &k,
            "--initrd",
            rd.to_str().unwrap(),
            "--mem",
            "32",
        ],
        &["does not fit", "--mem"],
    );
}

#[test]
fn zero_and_huge_memory() {
    let dir = temp_dir("cli-mem");
    let k = tiny_kernel(&dir);
    expect_error(
        &["run", "--kernel", &k, "--mem", "0"],
        &["--mem 0 MiB is too small"],
    );
    expect_error(
        &["run", "--kernel", &k, "--mem", "100000000"],
        &["more than this host can give"],
    );
}

#[test]
fn bad_vcpu_counts() {
    let dir = temp_dir("cli-vcpus");
    let k = tiny_kernel(&dir);
    expect_error(
        &["run", "--kernel", &k, "--vcpus", "0"],
        &["--vcpus must be at least 1"],
    );
    expect_error(
        &["run", "--kernel", &k, "--vcpus", "5000"],
        &["--vcpus 5000 is more than", "use at most"],
    );
}

#[test]
fn command_line_too_long() {
    if !kvm_available("cmdline_too_long") {
        return;
    }
    let dir = temp_dir("cli-cmdline");
    let k = tiny_kernel(&dir);
    let long = "x".repeat(3000);
    expect_error(
        &["run", "--kernel", &k, "--cmdline", &long],
        &["accepts at most 2047", "shorten"],
    );
}

#[test]
fn no_kvm_device() {
    let dir = temp_dir("cli-nokvm");
    let k = tiny_kernel(&dir);
    let out = std::process::Command::new(ember_bin())
        .args(["run", "--kernel", &k])
        .env("EMBER_KVM_DEVICE", "/nonexistent/kvm")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/dev/kvm does not exist"), "{err}");
    assert!(err.contains("modprobe"), "{err}");
}

#[test]
fn unknown_flag_and_bad_number() {
    let out = run_ember(&["run", "--vcpus", "two"], None, T);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("invalid value 'two'"), "{}", out.stderr);
    let out = run_ember(&["run", "--frobnicate"], None, T);
    assert_eq!(out.code, Some(2));
}

const HUGE: &str = "18446744073709551615";

#[test]
fn huge_shutdown_timeout_is_refused() {
    let dir = temp_dir("cli-huge-shutdown");
    let k = tiny_kernel(&dir);
    expect_error(
        &["run", "--kernel", &k, "--shutdown-timeout", HUGE],
        &["--shutdown-timeout", "to 315360000 (10 years)"],
    );
}

#[test]
fn huge_stop_after_ms_is_refused() {
    let dir = temp_dir("cli-huge-stop");
    let k = tiny_kernel(&dir);
    expect_error(
        &["run", "--kernel", &k, "--stop-after-ms", HUGE],
        &["--stop-after-ms", "315360000000 (10 years)"],
    );
}

#[test]
fn huge_bench_timeout_is_refused() {
    let dir = temp_dir("cli-huge-bench");
    let k = tiny_kernel(&dir);
    let json = dir.join("bench.json");
    expect_error(
        &[
            "bench",
            "--kernel",
            &k,
            "--runs",
            "1",
            "--setup-only",
            "--json",
            json.to_str().unwrap(),
            "--timeout",
            HUGE,
        ],
        &["--timeout", "to 315360000 (10 years)"],
    );
}

#[test]
fn huge_exec_timeout_is_refused() {
    // ember exec reports its own usage errors as 125, apart from the command's statuses.
    let out = run_ember(&["exec", "--timeout", HUGE, "--", "true"], None, T);
    assert_eq!(out.code, Some(125), "{out:?}");
    assert!(out.stderr.contains("--timeout"), "{}", out.stderr);
    assert!(
        out.stderr.contains("at most 315360000 (10 years)"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// A FIFO at `dir/name`: opening it for reading blocks until a writer comes.
fn fifo(dir: &std::path::Path, name: &str) -> String {
    let p = dir.join(name);
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    p.to_str().unwrap().to_string()
}

#[test]
fn kernel_that_is_a_fifo() {
    let dir = temp_dir("cli-fifo-kernel");
    let f = fifo(&dir, "k");
    expect_error(
        &["run", "--kernel", &f],
        &["is a FIFO, not a regular file", "--kernel"],
    );
    let out = run_ember(&["exec", "--kernel", &f, "--", "true"], None, T);
    assert_eq!(out.code, Some(125), "{out:?}");
    assert!(
        out.stderr.contains("is a FIFO, not a regular file"),
        "{out:?}"
    );
}

#[test]
fn initrd_that_is_a_fifo() {
    let dir = temp_dir("cli-fifo-initrd");
    let k = tiny_kernel(&dir);
    let f = fifo(&dir, "rd");
    expect_error(
        &["run", "--kernel", &k, "--initrd", &f],
        &["is a FIFO, not a regular file", "--initrd"],
    );
}

#[test]
fn read_only_disk_that_is_a_fifo() {
    let dir = temp_dir("cli-fifo-disk");
    let k = tiny_kernel(&dir);
    let f = fifo(&dir, "disk");
    for disk in [format!("{f},ro"), f.clone()] {
        expect_error(
            &["run", "--kernel", &k, "--disk", &disk],
            &["--disk", "is a FIFO, not a regular file or block device"],
        );
    }
}

#[test]
fn bench_kernel_and_initrd_that_are_fifos() {
    let dir = temp_dir("cli-fifo-bench");
    let k = tiny_kernel(&dir);
    let f = fifo(&dir, "f");
    let json = dir.join("bench.json");
    let json = json.to_str().unwrap();
    let common = ["bench", "--runs", "1", "--setup-only", "--json", json];
    let mut args = common.to_vec();
    args.extend(["--kernel", &f]);
    expect_error(&args, &["is a FIFO, not a regular file", "--kernel"]);
    let mut args = common.to_vec();
    args.extend(["--kernel", &k, "--initrd", &f]);
    expect_error(&args, &["is a FIFO, not a regular file", "--initrd"]);
}

#[test]
fn bad_run_timeouts() {
    let dir = temp_dir("cli-timeout");
    let k = tiny_kernel(&dir);
    for bad in ["0", "-1", "nan", "inf", "1e20", "soon"] {
        let flag = format!("--timeout={bad}");
        expect_error(
            &["run", "--kernel", &k, &flag],
            &["--timeout", "not a number of seconds above 0"],
        );
    }
}
