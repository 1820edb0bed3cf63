// SPDX-License-Identifier: Apache-2.0
//! One short real `ember bench`: two boots of the default guest at once. Checks that the
//! JSON has every phase of every run, in boot order, and the per-run figures (exits, CPU,
//! memory). No timing thresholds: figures go to docs/bench/, not to tests.

mod common;

use std::time::Duration;

use common::*;
use ember::bench::json::Json;
use ember::bench::report::{EMBER_MILESTONES, EMBER_ORDER};

#[test]
fn two_parallel_boots_report_every_phase_in_order() {
    let name = "two_parallel_boots_report_every_phase_in_order";
    if !kvm_available(name) {
        return;
    }
    let Some((kernel, initrd)) = default_guest(name) else {
        return;
    };
    let dir = temp_dir("bench-real");
    let json = dir.join("bench.json");
    let out = run_ember(
        &[
            "bench",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--runs",
            "2",
            "--parallel",
            "2",
            "--timeout",
            "1200",
            "--json",
            json.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(1500),
    );
    out.expect_code(0);
    assert!(
        out.stdout.contains("first KVM_RUN (VMM set-up)"),
        "{}",
        out.stdout
    );
    let j = Json::parse(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = j.get("runs").and_then(Json::as_array).unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        assert_eq!(r.get("ok"), Some(&Json::Bool(true)), "{r}");
        let ms = r.get("milestones_ms").unwrap();
        let at = |k: &str| ms.get(k).and_then(Json::as_f64);
        for m in EMBER_MILESTONES {
            assert!(at(m.key).is_some(), "{} missing in {ms}", m.key);
        }
        for w in EMBER_ORDER.windows(2) {
            assert!(
                at(w[0]).unwrap() <= at(w[1]).unwrap(),
                "{} after {}: {ms}",
                w[0],
                w[1]
            );
        }
        let serial = at("first_serial_byte").unwrap();
        assert!(at("first_kvm_run").unwrap() <= serial && serial <= at("guest_end").unwrap());
        assert!(
            at("main").unwrap() > 0.0,
            "main() comes after the spawn: {ms}"
        );
        // The init's marker line was seen on the console, after init started.
        assert!(at("marker").unwrap() >= at("boot_timer").unwrap(), "{ms}");
        let m = r.get("metrics").unwrap();
        for k in [
            "io",
            "mmio",
            "hlt",
            "vmm_cpu_ms",
            "overhead_at_boot_timer_mib",
            "guest_touched_at_boot_timer_mib",
        ] {
            assert!(
                m.get(k).and_then(Json::as_f64).is_some(),
                "{k} missing in {m}"
            );
        }
        assert!(m.get("io").and_then(Json::as_f64).unwrap() > 0.0, "{m}");
    }
    let s = j.get("summary").and_then(|s| s.get("ember")).unwrap();
    let bt = s
        .get("milestones_ms")
        .and_then(|m| m.get("boot_timer"))
        .unwrap();
    assert_eq!(bt.get("n").and_then(Json::as_u64), Some(2), "{s}");
    let _ = std::fs::remove_dir_all(dir);
}
