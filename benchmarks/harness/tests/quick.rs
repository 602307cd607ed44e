//! The quick mode against the real binaries: every mode must produce numbers for every
//! scenario and lose no request. No timing threshold: performance is read from reports.

use std::process::Command;

#[test]
fn quick_mode_measures_every_mode_and_loses_no_request() {
    // Builds wasmbox, wasmbox-worker and the example functions into this target directory.
    let _ = wasmbox_integration::built();
    let functions = wasmbox_integration::function_wasm("hello").parent().expect("functions dir").to_path_buf();
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new(env!("CARGO_BIN_EXE_wasmbox-bench"))
        .args(["run", "--quick", "--name", "ci", "--out"])
        .arg(out.path())
        .arg("--functions")
        .arg(&functions)
        .status()
        .expect("running wasmbox-bench");
    assert!(status.success(), "wasmbox-bench run --quick failed: {status}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("ci.json")).expect("ci.json")).expect("JSON report");
    let modes = ["WasmBox", "InProcess", "SpawnPerRequest", "PlainHttp"];
    let scenarios = ["hello", "echo", "compute", "memory"];
    let closed = json["closed"].as_array().expect("closed-loop cells");
    // The component scenario runs on WasmBox alone (the other modes serve modules).
    assert_eq!(closed.len(), modes.len() * scenarios.len() + 1, "one cell per mode and scenario, and the component's");
    let cells =
        modes.iter().flat_map(|m| scenarios.iter().map(move |s| (*m, *s))).chain([("WasmBox", "component-hello")]);
    for (mode, scenario) in cells {
        let cell = closed
            .iter()
            .find(|c| c["mode"] == mode && c["scenario"] == scenario)
            .unwrap_or_else(|| panic!("no cell for {mode} / {scenario}"));
        let s = &cell["summary"];
        assert!(s["requests"].as_u64().unwrap_or(0) > 0, "{mode} / {scenario}: no requests: {s}");
        assert!(s["throughput"].as_f64().unwrap_or(0.0) > 0.0, "{mode} / {scenario}: {s}");
        assert!(s["p50_us"].as_u64().unwrap_or(0) > 0, "{mode} / {scenario}: {s}");
        assert!(s["p99_us"].as_u64() >= s["p50_us"].as_u64(), "{mode} / {scenario}: {s}");
        assert_eq!(s["errors"], serde_json::json!([]), "{mode} / {scenario}: errors or lost requests: {s}");
        // Where the CPU went: every loaded server used some; WasmBox's partly in workers.
        let cpu = &cell["cpu"];
        let total = cpu["server_us"].as_f64().unwrap_or(0.0) + cpu["children_us"].as_f64().unwrap_or(0.0);
        assert!(total > 0.0, "{mode} / {scenario}: no server CPU measured: {cpu}");
        if mode == "WasmBox" {
            assert!(cpu["children_us"].as_f64().unwrap_or(0.0) > 0.0, "{scenario}: no worker CPU: {cpu}");
        }
    }
    // Open loop: each mode ran at the rate or is listed with the reason it did not.
    let open = json["open"].as_array().expect("open-loop cells");
    let skipped = json["open_skipped"].as_object().expect("skipped modes");
    assert_eq!(open.len() + skipped.len(), modes.len(), "{open:?} {skipped:?}");
    for cell in open {
        let s = &cell["summary"];
        assert!(s["requests"].as_u64().unwrap_or(0) > 0, "{s}");
        assert_eq!(s["errors"], serde_json::json!([]), "open loop lost requests: {s}");
    }
    let e = &json["extras"];
    for key in [
        "cold_empty_cache_p50_us",
        "cold_warm_cache_p50_us",
        "respawn_p50_us",
        "supervisor_rss_kib",
        "hello_mean_cgroups_us",
        "hello_mean_no_cgroups_us",
    ] {
        assert!(e[key].as_f64().unwrap_or(0.0) > 0.0, "extras.{key} missing: {e}");
    }
    for key in ["worker_rss_kib", "worker_private_kib"] {
        let per_worker = e[key].as_array();
        assert!(
            per_worker.is_some_and(|w| !w.is_empty() && w.iter().all(|k| k.as_u64() > Some(0))),
            "extras.{key}: {e}"
        );
    }
    // Sessions: the quick plan's heaps of 1 and 16 MiB, each message with its state costs.
    let heaps = e["sessions"]["heaps"].as_array().expect("extras.sessions.heaps");
    assert_eq!(heaps.iter().map(|h| h["heap_mib"].as_u64()).collect::<Vec<_>>(), [Some(1), Some(16)], "{heaps:?}");
    for h in heaps {
        assert!(h["snapshot_bytes"].as_u64() > Some(0), "{h}");
        for figure in ["capture", "commit", "state", "touch", "hello"] {
            assert!(h[figure]["p50_us"].as_u64() > Some(0), "sessions.{figure}: {h}");
        }
        assert!(h["touch_to_hello"].as_f64() > Some(0.0), "{h}");
        // The fill compressed every page of the heap: at least 16 of 64 KiB per MiB.
        assert!(h["fill"]["pages_compressed"].as_u64() >= h["heap_mib"].as_u64().map(|m| m * 16), "{h}");
    }

    let md = std::fs::read_to_string(out.path().join("ci.md")).expect("ci.md");
    for needle in
        ["| (a)/(b) |", "| (a)/(c) |", "| (a)/(d) |", "Machine:", "## Sessions", "![latency by percentile](ci.svg)"]
    {
        assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
    }
    let svg = std::fs::read_to_string(out.path().join("ci.svg")).expect("ci.svg");
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "plot has no lines");
}
