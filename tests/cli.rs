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

/// A tiny ELF kernel with its first program header changed by `edit` (offsets: p_type 0,
/// p_offset 8, p_vaddr 16, p_paddr 24, p_filesz 32, p_memsz 40) and its ELF header by
/// `ehdr` (e_phoff 32, e_phnum 56).
fn edited_elf(edit: &dyn Fn(&mut [u8]), ehdr: &dyn Fn(&mut [u8])) -> Vec<u8> {
    let mut a = Asm::new();
    a.reset();
    let mut f = tiny_elf(&a.code, &[]);
    edit(&mut f[64..120]);
    ehdr(&mut f[0..64]);
    f
}

/// A bzImage-shaped file (boot protocol 2.15, 64-bit entry) of 64 KiB with its setup header
/// changed by `edit`: setup_sects 0x1f1, syssize 0x1f4, version 0x206, init_size 0x260.
fn bzimage(edit: &dyn Fn(&mut [u8])) -> Vec<u8> {
    let mut f = vec![0u8; 64 << 10];
    f[0x1f1] = 4; // setup_sects
    f[0x1f4..0x1f8].copy_from_slice(&(((64u32 << 10) - 5 * 512) / 16).to_le_bytes());
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x236..0x238].copy_from_slice(&3u16.to_le_bytes()); // xloadflags: 64-bit entry
    f[0x260..0x264].copy_from_slice(&(1u32 << 20).to_le_bytes()); // init_size
    edit(&mut f);
    f
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Hostile kernel, initrd and disk files (what a downloaded image could be): each is refused
/// with status 2 and a message naming the file and what is wrong; none panics or runs.
#[test]
fn hostile_images_are_refused_with_status_2() {
    if !kvm_available("hostile_images") {
        return;
    }
    let dir = temp_dir("cli-hostile-images");
    let none = |_: &mut [u8]| {};
    let mut second = edited_elf(&none, &|e| e[56..58].copy_from_slice(&2u16.to_le_bytes()));
    // A second PT_LOAD over the first (same address, 16 bytes).
    let mut p2 = second[64..120].to_vec();
    put_u64(&mut p2, 32, 16);
    put_u64(&mut p2, 40, 16);
    second[120..176].copy_from_slice(&p2);
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "header-only.elf",
            second[..64].to_vec(),
            &["past the end of the file", "truncated"],
        ),
        (
            "short.elf",
            second[..40].to_vec(),
            &["shorter than an ELF header"],
        ),
        (
            "filesz-past-end.elf",
            edited_elf(
                &|p| {
                    put_u64(p, 32, 1 << 30);
                    put_u64(p, 40, 1 << 30);
                },
                &none,
            ),
            &["segment 0", "past the end of the file"],
        ),
        (
            "offset-past-end.elf",
            edited_elf(&|p| put_u64(p, 8, u64::MAX - 4), &none),
            &["segment 0", "past the end of the file"],
        ),
        (
            "paddr-past-ram.elf",
            edited_elf(&|p| put_u64(p, 24, 0xffff_ffff_0000), &none),
            &["segment 0", "guest RAM", "--mem"],
        ),
        (
            "paddr-below-1m.elf",
            edited_elf(&|p| put_u64(p, 24, 0x1000), &none),
            &["segment 0", "above 1 MiB"],
        ),
        (
            "memsz-huge.elf",
            edited_elf(&|p| put_u64(p, 40, u64::MAX), &none),
            &["segment 0", "guest RAM"],
        ),
        (
            "filesz-over-memsz.elf",
            edited_elf(&|p| put_u64(p, 40, 1), &none),
            &["segment 0", "only 1 in memory"],
        ),
        (
            "phoff-past-end.elf",
            edited_elf(&none, &|e| put_u64(e, 32, 1 << 40)),
            &["program headers", "past the end of the file"],
        ),
        (
            "phnum-huge.elf",
            edited_elf(&none, &|e| {
                e[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
            }),
            &["65535 program headers"],
        ),
        (
            "not-x86.elf",
            edited_elf(&none, &|e| e[18..20].copy_from_slice(&183u16.to_le_bytes())),
            &["x86-64"],
        ),
        ("overlapping.elf", second, &["segments 0", "overlap"]),
        (
            "setup-past-end.bzimage",
            bzimage(&|h| h[0x1f1] = 200),
            &["setup code", "truncated"],
        ),
        (
            "old-protocol.bzimage",
            bzimage(&|h| h[0x206..0x208].copy_from_slice(&0x0200u16.to_le_bytes())),
            &["boot protocol"],
        ),
        (
            "huge-syssize.bzimage",
            bzimage(&|h| h[0x1f4..0x1f8].copy_from_slice(&u32::MAX.to_le_bytes())),
            &["the kernel is", "truncated"],
        ),
        (
            "huge-init-size.bzimage",
            bzimage(&|h| h[0x260..0x264].copy_from_slice(&u32::MAX.to_le_bytes())),
            &["init_size", "--mem"],
        ),
    ];
    let mut report = Vec::new();
    for (name, bytes, needles) in &cases {
        let k = dir.join(name);
        std::fs::write(&k, bytes).unwrap();
        let out = run_ember(
            &["run", "--kernel", k.to_str().unwrap(), "--mem", "16"],
            None,
            T,
        );
        report.push(format!("{name}: {:?} {}", out.code, out.stderr.trim()));
        assert!(!out.stderr.contains("panicked"), "{name}: {}", out.stderr);
        assert_eq!(out.code, Some(2), "{name}: {out:?}");
        for n in *needles {
            assert!(
                out.stderr.contains(n),
                "{name}: stderr lacks {n:?}: {}",
                out.stderr
            );
        }
    }
    eprintln!("{}", report.join("\n"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn disk_that_is_a_directory_or_missing() {
    let dir = temp_dir("cli-disk-dir");
    let k = tiny_kernel(&dir);
    let d = dir.to_str().unwrap();
    expect_error(
        &["run", "--kernel", &k, "--disk", d],
        &["directory", "--disk"],
    );
    expect_error(
        &["run", "--kernel", &k, "--disk", "/nonexistent/disk.img"],
        &["/nonexistent/disk.img"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `ember bench --ab` refused before anything boots: flags it cannot be combined with, B
/// flags without --ab, --ab with nothing to compare, a B that does not exist. Status 2 and a
/// message naming the flags, no run started.
#[test]
fn bench_ab_usage_errors() {
    let dir = temp_dir("cli-bench-ab");
    let k = tiny_kernel(&dir);
    let b = ["bench", "--kernel", k.as_str(), "--mem", "16"];
    let with =
        |extra: &[&str]| -> Vec<String> { b.iter().chain(extra).map(|s| s.to_string()).collect() };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            with(&["--ab", "--b-append", "x", "--compare", "qemu"]),
            vec!["'--ab' cannot be used with '--compare"],
        ),
        (
            with(&["--ab", "--b-append", "x", "--snapshot"]),
            vec!["'--ab' cannot be used with '--snapshot'"],
        ),
        (
            with(&["--ab", "--b-append", "x", "--exec"]),
            vec!["'--ab' cannot be used with '--exec'"],
        ),
        (
            with(&["--ab", "--b-append", "x", "--setup-only"]),
            vec!["'--ab' cannot be used with '--setup-only'"],
        ),
        (with(&["--b-append", "x"]), vec!["--b-append", "--ab"]),
        (
            with(&["--ab"]),
            vec![
                "--ab needs configuration B to differ from A",
                "--b-kernel PATH",
                "--b-ember PATH",
            ],
        ),
        (
            with(&["--ab", "--b-kernel", "/nonexistent/vmlinux"]),
            vec!["B's kernel image /nonexistent/vmlinux", "check --b-kernel"],
        ),
        (
            with(&["--ab", "--b-initrd", "/nonexistent/initrd"]),
            vec!["B's initrd /nonexistent/initrd", "check --b-initrd"],
        ),
        (
            with(&["--ab", "--b-ember", "/nonexistent/ember"]),
            vec![
                "--b-ember /nonexistent/ember",
                "give the path of an ember binary",
            ],
        ),
        (
            with(&["--ab", "--b-vcpus", "2", "--b-name", "A"]),
            vec!["two different, non-empty names"],
        ),
    ];
    for (args, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_ember(&args, None, T);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
        for n in needles {
            assert!(
                out.stderr.contains(n),
                "{args:?}: stderr lacks {n:?}: {}",
                out.stderr
            );
        }
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        assert!(
            !out.stderr.contains("[1/"),
            "{args:?}: a run started: {}",
            out.stderr
        );
        assert_eq!(out.stdout, "", "{args:?}");
    }
}

#[test]
fn bench_help_explains_ab() {
    let out = run_ember(&["bench", "--help"], None, T);
    assert_eq!(out.code, Some(0));
    for want in [
        "--ab compares two configurations of ember",
        "A B B A A B B A",
        "p < 0.01",
        "ember bench --ab --b-append \"clearcpuid=erms\" --runs 5 --json ab.json",
        "--b-kernel <PATH>",
        "--b-ember <PATH>",
        "--a-append <WORDS>",
    ] {
        assert!(
            out.stdout.contains(want),
            "{want:?} missing: {}",
            out.stdout
        );
    }
}
