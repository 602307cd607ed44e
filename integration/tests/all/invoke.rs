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
        "/a/b",
        "/hello%00",
        "/hello%2Fx",
        "/.hidden",
        "/-dash",
        long.as_str(),
    ] {
        let r = s.get(path).await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_REQUEST, "invalid_function_name"), "{path}");
    }
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
