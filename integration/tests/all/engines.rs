//! Engine selection: WASMBOX_ENGINE (or the original WASM_RUNTIME) picks the workers' engine.

use wasmbox_integration::Supervisor;

#[tokio::test]
async fn the_engine_and_its_version_are_logged_and_the_alias_works() -> anyhow::Result<()> {
    for (var, value) in [("WASMBOX_ENGINE", "wasmtime"), ("WASM_RUNTIME", "wasmtime")] {
        let s = Supervisor::builder().default_engine().workers(1).env(var, value).function("hello").start()?;
        assert_eq!(s.post("/hello", "").await?.status, 200);
        let logs = s.logs();
        let line = logs.lines().find(|l| l.contains(" engine ") || l.ends_with(" engine")).unwrap_or_default();
        assert!(line.contains("engine=wasmtime") && line.contains("version=48"), "{var}: no engine line in\n{logs}");
    }
    Ok(())
}

#[cfg(not(feature = "wasmedge"))]
#[tokio::test]
async fn wasmedge_without_the_feature_fails_at_start_saying_how_to_build_it() -> anyhow::Result<()> {
    let Err(e) = Supervisor::builder().workers(1).engine("wasmedge").start() else {
        anyhow::bail!("a supervisor without WasmEdge started with WASMBOX_ENGINE=wasmedge");
    };
    let message = format!("{e:#}");
    assert!(message.contains("--features wasmedge"), "{message}");
    assert!(message.contains("cannot start the worker pool"), "{message}");
    Ok(())
}
