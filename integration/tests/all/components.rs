//! WASI 0.2 components: `wasi:cli/command` components served like command modules on
//! Wasmtime (stdin, argv, env, exit status, limits, accounting, upload), and refused with a
//! 422 that says why where they cannot run (sessions; an engine without the Component
//! Model; a component of no world this server serves).

use bytes::Bytes;
use http::{Method, StatusCode};
use wasmbox_integration::{Supervisor, function_wasm, test_engine};

/// Components run on Wasmtime; the WasmEdge suite checks the refusal instead.
fn on_wasmtime(test: &str) -> bool {
    let engine = test_engine();
    if engine != "wasmtime" {
        eprintln!("{test}: skipped on {engine} (components run on Wasmtime; see the refusal test)");
    }
    engine == "wasmtime"
}

#[tokio::test]
async fn a_cli_command_component_runs_like_a_command_module() -> anyhow::Result<()> {
    if !on_wasmtime("a_cli_command_component_runs_like_a_command_module") {
        return Ok(());
    }
    // An artifact store of its own, so the first call compiles.
    let cache = tempfile::tempdir()?;
    let s = Supervisor::builder()
        .workers(1)
        .env("WASMBOX_CACHE_DIR", cache.path().display())
        .function("cli-hello")
        .function("cli-echo")
        .file("cli-echo.toml", "[env]\nEXIT_CODE = \"0\"\n")
        .start()?;
    let r = s.get("/cli-hello").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "hello from a command component\n"), "{}", r.text());
    assert_eq!(r.header("x-wasmbox-exit-code"), Some("0"));
    assert_eq!(r.header("x-wasmbox-module-source"), Some("compiled"));
    let r = s.get("/cli-hello?arg=a&arg=b%20c").await?;
    assert_eq!(r.text(), "hello from a command component args: a,b c\n");
    assert_eq!(r.header("x-wasmbox-module-source"), Some("memory"), "the worker kept the component");
    // stdin in, stdout out, byte for byte.
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let r = s.post("/cli-echo", body.clone()).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, body);
    // A failing exit: WASI 0.2's exit carries success or failure, so any code is 1.
    let r = s.post("/cli-echo?arg=exit=3&arg=stderr", "out").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "nonzero_exit"), "{}", r.text());
    assert_eq!(r.json()["exit_code"], 1);
    assert_eq!(r.json()["stderr"], "stderr line\n");
    assert_eq!(r.header("x-wasmbox-exit-code"), Some("1"));
    Ok(())
}

#[tokio::test]
async fn a_component_gets_the_deadline_and_the_memory_limit_of_a_module() -> anyhow::Result<()> {
    if !on_wasmtime("a_component_gets_the_deadline_and_the_memory_limit_of_a_module") {
        return Ok(());
    }
    let s = Supervisor::builder().workers(1).function("cli-echo").start()?;
    // Compiled first, so the deadline below is the run's alone.
    assert_eq!(s.post("/cli-echo", "warm").await?.status, StatusCode::OK);
    let r = s.request(Method::POST, "/cli-echo?arg=spin", &[("timeout-ms", "300")], Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"), "{}", r.text());
    assert_eq!(r.json()["worker_killed"], false, "the engine stopped the component");
    let r = s.request(Method::POST, "/cli-echo?arg=alloc=200", &[("memory-request", "64")], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::INSUFFICIENT_STORAGE, "{}", r.text());
    assert_eq!(r.kind(), "memory_limit_exceeded");
    let r = s.request(Method::POST, "/cli-echo?arg=alloc=16", &[("memory-request", "64")], Bytes::new()).await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "allocated 16 MiB\n"));
    // The worker serves on after both.
    assert_eq!(s.post("/cli-echo", "still here").await?.text(), "still here");
    Ok(())
}

#[tokio::test]
async fn an_uploaded_component_is_compiled_before_it_is_published() -> anyhow::Result<()> {
    if !on_wasmtime("an_uploaded_component_is_compiled_before_it_is_published") {
        return Ok(());
    }
    let token = "component-upload-token-0123456789";
    let cache = tempfile::tempdir()?;
    let s = Supervisor::builder()
        .workers(1)
        .env("WASMBOX_ADMIN_TOKEN", token)
        .env("WASMBOX_CACHE_DIR", cache.path().display())
        .start()?;
    let auth = format!("Bearer {token}");
    let bytes = std::fs::read(function_wasm("cli-hello"))?;
    let r = s.request(Method::PUT, "/admin/functions/greeter", &[("authorization", &auth)], bytes.into()).await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["module_source"], "compiled");
    let r = s.get("/greeter").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "hello from a command component\n"));
    assert_eq!(r.header("x-wasmbox-module-source"), Some("artifact"), "the upload's artifact was used");
    Ok(())
}

#[tokio::test]
async fn components_are_refused_where_they_cannot_run_with_what_they_are() -> anyhow::Result<()> {
    let engine = test_engine();
    // Exports nothing: no world this server serves.
    let empty = wat::parse_str("(component)")?;
    let s = Supervisor::builder().workers(1).function("cli-hello").module("nothing", empty).start()?;
    if engine == "wasmtime" {
        let r = s.get("/nothing").await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"), "{}", r.text());
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains("component") && message.contains("wasi:cli/run"), "{message}");
    } else {
        // An engine without the Component Model says so, and which engine has it.
        for path in ["/cli-hello", "/nothing"] {
            let r = s.get(path).await?;
            assert_eq!((r.status, r.kind().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"), "{path}");
            let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
            assert!(message.contains("component") && message.contains(&engine), "{message}");
            assert!(message.contains("WASMBOX_ENGINE=wasmtime"), "{message}");
        }
    }
    // Sessions run core modules only, on every engine.
    let r = s.post("/sessions/cli-hello", "").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"), "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap_or_default().contains("sessions run core WebAssembly modules"));
    Ok(())
}
