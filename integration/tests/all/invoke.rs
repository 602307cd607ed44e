//! Routing and registry behaviour that does not depend on the engine: names, methods, health,
//! replacing a module (the engine-visible behaviours are in `conformance.rs`).

use bytes::Bytes;
use http::{Method, StatusCode};
use wasmbox_integration::Supervisor;

#[tokio::test]
async fn unknown_function_404_and_other_methods_405() -> anyhow::Result<()> {
    let s = Supervisor::builder().function("hello").start()?;
    let r = s.get("/nope").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::NOT_FOUND, "function_not_found"));
    let r = s.get("/").await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    for method in [Method::PUT, Method::DELETE, Method::PATCH] {
        let r = s.request(method.clone(), "/hello", &[], Bytes::new()).await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"), "{method}");
        assert_eq!(r.header("allow"), Some("GET, POST"));
    }
    Ok(())
}

#[tokio::test]
async fn bad_names_are_400_and_never_reach_the_filesystem() -> anyhow::Result<()> {
    // A module outside the functions dir that traversal would reach.
    let s = Supervisor::builder().function("hello").file("../secret.wasm", "not here").start()?;
    let long = format!("/{}", "a".repeat(65));
    for path in [
        "/..%2Fsecret",
        "/../secret",
        "/%2e%2e%2fsecret",
        "//etc/passwd",
        "/hello%00",
        "/hello%2Fx",
        "/.hidden",
        "/-dash",
        long.as_str(),
    ] {
        let r = s.get(path).await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_REQUEST, "invalid_function_name"), "{path}");
    }
    // A path below a function names the function (wasi:http components serve such paths).
    let r = s.get("/a/b").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::NOT_FOUND, "function_not_found"));
    let r = s.get("/hello/b").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_REQUEST, "invalid_function_name"));
    Ok(())
}

#[tokio::test]
async fn replaced_module_is_served_without_restart() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(1).function("hello").start()?;
    assert_eq!(s.get("/hello").await?.text(), "Hello from WasmBox!\n");
    // Drop a new module in (rename, as a deploy would).
    let dir = s.functions_dir();
    std::fs::copy(wasmbox_integration::function_wasm("echo"), dir.join("tmp.upload"))?;
    std::fs::rename(dir.join("tmp.upload"), dir.join("hello.wasm"))?;
    let r = s.post("/hello", "now I echo").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "now I echo"));
    // A new function appears.
    std::fs::copy(wasmbox_integration::function_wasm("exit-code"), dir.join("fresh.wasm"))?;
    assert_eq!(s.get("/fresh?arg=0").await?.status, StatusCode::OK);
    // And a deleted one disappears.
    std::fs::remove_file(dir.join("fresh.wasm"))?;
    assert_eq!(s.get("/fresh").await?.status, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn metrics_count_known_invocations() -> anyhow::Result<()> {
    // One tenant: both modules in the one worker, so each is loaded once and then warm.
    let s = Supervisor::builder().workers(1).function("hello").function("trap").tenant("t").start()?;
    s.wait_pool_full(1, std::time::Duration::from_secs(10)).await?;
    for _ in 0..3 {
        assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    }
    let trapped = s.get("/trap").await?;
    assert_eq!(trapped.kind(), "trap", "{}", trapped.text());
    assert_eq!(s.get("/no-such-function").await?.status, StatusCode::NOT_FOUND);

    let r = s.get("/metrics").await?;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.header("content-type").is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    let value = |series: &str| -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    assert_eq!(value("wasmbox_invocations_total{function=\"hello\",outcome=\"ok\"}"), Some(3.0), "{text}");
    assert_eq!(value("wasmbox_invocations_total{function=\"trap\",outcome=\"trap\"}"), Some(1.0), "{text}");
    // Unknown functions are not series: their names are whatever clients send.
    assert!(!text.contains("no-such-function"), "{text}");
    assert_eq!(value("wasmbox_invocation_duration_seconds_count{phase=\"total\"}"), Some(4.0), "{text}");
    assert_eq!(value("wasmbox_invocation_duration_seconds_count{phase=\"exec\"}"), Some(4.0), "{text}");
    let source = |s: &str| value(&format!("wasmbox_module_loads_total{{source=\"{s}\"}}")).unwrap_or(0.0);
    if wasmbox_integration::test_engine() == "wasmedge" {
        // Each module's first call is interpreted; later ones interpreted, or its artifact
        // (once, when the compile finished), or memory: four calls in all.
        assert!(source("interpreted") >= 2.0, "{text}");
        let all = ["interpreted", "artifact", "compiled", "memory"].map(source).iter().sum::<f64>();
        assert_eq!(all, 4.0, "{text}");
    } else {
        // One worker: each module is compiled or loaded once (first call), then warm.
        assert_eq!(source("compiled") + source("artifact"), 2.0, "{text}");
        assert_eq!(source("memory"), 2.0, "{text}");
    }
    assert_eq!(value("wasmbox_workers{state=\"configured\"}"), Some(1.0), "{text}");
    assert_eq!(value("wasmbox_workers{state=\"live\"}"), Some(1.0), "{text}");
    assert_eq!(value("wasmbox_queue_depth"), Some(0.0), "{text}");
    assert_eq!(value("wasmbox_worker_restarts_total"), Some(0.0), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert_eq!(s.post("/metrics", "").await?.status, StatusCode::METHOD_NOT_ALLOWED);
    Ok(())
}

#[tokio::test]
async fn metrics_count_worker_exits_by_reason() -> anyhow::Result<()> {
    use std::time::Duration;
    let s = Supervisor::builder().workers(1).function("hello").env("WASMBOX_WORKER_MAX_INVOCATIONS", 2).start()?;
    s.wait_pool_full(1, Duration::from_secs(10)).await?;
    // Two invocations: the worker has served its quota and is recycled.
    for _ in 0..2 {
        assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    }
    let exits = |text: &str, reason: &str| -> Option<f64> {
        let series = format!("wasmbox_worker_exits_total{{reason=\"{reason}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
    };
    // Polls /metrics until `reason` has been counted once; returns that scrape.
    let counted = |reason: &'static str| {
        let s = &s;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let text = s.get("/metrics").await?.text();
                if exits(&text, reason) == Some(1.0) {
                    return anyhow::Ok(text);
                }
                anyhow::ensure!(std::time::Instant::now() < deadline, "no {reason} counted:\n{text}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    counted("recycle").await?;
    // Killed from outside: a crash, as far as the supervisor can tell.
    s.wait_pool_full(1, Duration::from_secs(10)).await?;
    let worker = s.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), nix::sys::signal::Signal::SIGKILL)?;
    let text = counted("crash").await?;
    assert_eq!(exits(&text, "recycle"), Some(1.0), "{text}");
    assert_eq!(exits(&text, "timeout_kill"), Some(0.0), "{text}");
    s.wait_pool_full(1, Duration::from_secs(10)).await?;
    let stats = s.get("/stats").await?.json();
    assert_eq!(stats["pool"]["exits"]["recycle"], 1, "{stats}");
    assert_eq!(stats["pool"]["exits"]["crash"], 1, "{stats}");
    assert_eq!(stats["pool"]["restarts"], 2, "{stats}");
    Ok(())
}

#[tokio::test]
async fn json_logs_have_one_line_per_invocation_without_guest_output() -> anyhow::Result<()> {
    // Workers share the supervisor's stderr: at debug they log every invocation too, and
    // those lines must be JSON as well.
    let s = Supervisor::builder()
        .workers(1)
        .function("hello")
        .env("LOG_FORMAT", "json")
        .env("WASMBOX_WORKER_LOG", "debug")
        .start()?;
    let r = s.get("/hello").await?;
    assert_eq!(r.status, StatusCode::OK);
    let id = r.header("x-wasmbox-request-id").unwrap_or_default().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        let logs = s.logs();
        let lines: Vec<serde_json::Value> =
            logs.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
        let worker_lines = lines.iter().filter(|l| l["message"] == "invocation finished").count();
        if let Some(line) = lines.into_iter().find(|l| l["message"] == "invocation") {
            if worker_lines > 0 {
                break line;
            }
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no invocation line:\n{logs}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(line["span"]["request_id"], id.as_str(), "{line}");
    assert_eq!(line["span"]["function"], "hello", "{line}");
    assert_eq!((line["status"].as_u64(), line["outcome"].as_str()), (Some(200), Some("ok")), "{line}");
    for timing in ["queue_us", "exec_us", "total_us"] {
        assert!(line[timing].is_u64(), "{timing} missing: {line}");
    }
    if wasmbox_integration::cgroup_skip_reason().is_none() {
        assert!(line["cpu_us"].is_u64() && line["memory_peak_bytes"].as_u64() > Some(0), "{line}");
    }
    // The guest's output goes to the client only.
    assert!(!s.logs().contains("Hello from WasmBox"), "{}", s.logs());
    Ok(())
}

#[tokio::test]
async fn health_and_readiness() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(2).start()?;
    let r = s.get("/healthz").await?;
    assert_eq!((r.status, r.json()["status"].as_str()), (StatusCode::OK, Some("ok")));
    let r = s.get("/ready").await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["pool"]["live"], 2);
    assert_eq!(r.json()["ready"], true);
    let r = s.post("/ready", "").await?;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    Ok(())
}
