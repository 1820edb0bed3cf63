// SPDX-License-Identifier: Apache-2.0
//! `ember compare --runs 1` end to end, fast: the host, sandbox (bwrap) and container
//! (crun/runc) rows run the real default busybox workload, and the VM row is a tiny guest
//! (`--vm-kernel`, hidden) that prints the workload's marker lines and reports status 0
//! through the exit device, so the VM row goes through the same `ember exec --cold` child,
//! line timing, memory sampling and statistics as a Linux guest, in milliseconds. The
//! real-guest rows are run by hand (docs/containers-vs-microvms.md).

mod common;
mod common_exec;

use std::time::Duration;

use common::Asm;
use common_exec::tiny::{self, COM1};
use common_exec::{kvm_or_skip, run, TempDir};
use ember::bench::json::Json;

const LIMIT: Duration = Duration::from_secs(300);

/// A tiny guest that prints the default workload's markers, then status 0.
fn marker_guest(dir: &TempDir) -> std::path::PathBuf {
    let mut code = Asm::new();
    let text = "ember-compare: start\nember-compare: phase syscall\nember-compare: phase fork\n\
                ember-compare: phase io\nember-compare: phase hold\nember-compare: end\n";
    tiny::out_bytes(&mut code, COM1, text.as_bytes());
    tiny::write_status(&mut code, 0).halt_loop();
    common_exec::tiny_guest(&dir.0, "markers.elf", &code)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn row<'a>(j: &'a Json, name: &str) -> &'a Json {
    j.get("rows")
        .and_then(Json::as_array)
        .and_then(|rows| {
            rows.iter()
                .find(|r| r.get("row").and_then(Json::as_str) == Some(name))
        })
        .unwrap_or_else(|| panic!("no row {name} in {j}"))
}

fn field<'a>(j: &'a Json, path: &[&str]) -> &'a Json {
    path.iter()
        .try_fold(j, |j, k| j.get(k))
        .unwrap_or_else(|| panic!("no {path:?} in {j}"))
}

#[test]
fn one_run_of_every_fast_row_and_a_tiny_guest_vm_row() {
    if !kvm_or_skip("one_run_of_every_fast_row_and_a_tiny_guest_vm_row") {
        return;
    }
    if !is_root() {
        eprintln!("SKIP: the container row needs root (rootful crun/runc)");
        return;
    }
    let dir = TempDir::new("compare");
    let kernel = marker_guest(&dir);
    let json = dir.0.join("c.json");
    let svg = dir.0.join("c.svg");
    let mut cmd = common_exec::ember();
    cmd.args([
        "compare",
        "--runs",
        "1",
        "--rows",
        "host,sandbox,container,ember-cold",
    ])
    .arg("--vm-kernel")
    .arg(&kernel)
    .arg("--json")
    .arg(&json)
    .arg("--svg")
    .arg(&svg);
    let f = run(cmd, LIMIT);
    let out = String::from_utf8_lossy(&f.stdout);
    assert_eq!(f.code, Some(0), "stdout:\n{out}\nstderr:\n{}", f.stderr);
    assert!(out.contains("ember compare: 1 run(s)"), "{out}");
    assert!(out.contains("isolation probe"), "{out}");

    let j = Json::parse(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(field(&j, &["format"]).as_str(), Some("ember-compare/1"));
    let kvm = field(&j, &["host", "kvm"]).as_str().unwrap();
    assert_eq!(kvm == "pvm", common::pvm_host(), "{j}");
    for name in ["host", "sandbox", "container", "ember-cold"] {
        let r = row(&j, name);
        assert_eq!(
            field(r, &["skipped"]),
            &Json::Null,
            "{name} was skipped: {r}"
        );
        let s = &field(r, &["samples"]).as_array().unwrap()[0];
        assert_eq!(field(s, &["error"]), &Json::Null, "{name}: {s}");
        let startup = field(s, &["startup_ms"]).as_f64().unwrap();
        let e2e = field(s, &["end_to_end_ms"]).as_f64().unwrap();
        assert!(startup > 0.0 && startup <= e2e, "{name}: {s}");
        assert!(
            field(s, &["peak_pss_bytes"]).as_u64().unwrap() > 0,
            "{name}: {s}"
        );
        for p in ["syscall", "fork", "io"] {
            assert!(
                field(s, &["phases_ms", p]).as_f64().is_some(),
                "{name} {p}: {s}"
            );
        }
        assert_eq!(
            field(r, &["summary", "end_to_end_ms", "n"]).as_u64(),
            Some(1),
            "{name}"
        );
    }
    // The VM row went through ember exec's cold path and printed the tiny guest's markers.
    let vm = row(&j, "ember-cold");
    assert_eq!(
        field(vm, &["samples"]).as_array().unwrap()[0]
            .get("vm_path")
            .and_then(Json::as_str),
        Some("cold")
    );
    assert!(field(vm, &["kernel_fault"])
        .as_str()
        .unwrap()
        .contains("--vm-kernel"));
    // Isolation: the host row sees this process; the sandbox and the container do not, and
    // see only their own loopback; nobody's fault probe ran on the host's kernel.
    assert_eq!(
        field(row(&j, "host"), &["probe", "host_pid_visible"]),
        &Json::Bool(true)
    );
    for name in ["sandbox", "container"] {
        let p = field(row(&j, name), &["probe"]);
        assert_eq!(
            field(p, &["host_pid_visible"]),
            &Json::Bool(false),
            "{name}"
        );
        assert_eq!(
            field(p, &["host_file_visible"]),
            &Json::Bool(false),
            "{name}"
        );
        assert_eq!(field(p, &["own_kernel"]), &Json::Bool(false), "{name}");
        assert_eq!(field(p, &["kvm_openable"]), &Json::Bool(false), "{name}");
        assert!(field(row(&j, name), &["kernel_fault"])
            .as_str()
            .unwrap()
            .starts_with("skipped"));
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg") && chart.contains("ember-cold"),
        "{chart}"
    );
}

#[test]
fn bad_flags_are_refused_with_the_reason() {
    let f = run(
        {
            let mut c = common_exec::ember();
            c.args(["compare", "--rows", "host,vm"]);
            c
        },
        LIMIT,
    );
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(f.stderr.contains("unknown row \"vm\""), "{}", f.stderr);
    let f = run(
        {
            let mut c = common_exec::ember();
            c.args(["compare", "--runtime", "docker"]);
            c
        },
        LIMIT,
    );
    assert_eq!(f.code, Some(2), "{f:?}");
    assert!(f.stderr.contains("crun or runc"), "{}", f.stderr);
}
