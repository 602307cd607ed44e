//! The module management API (`/admin/functions`): authentication, validation before
//! visibility, upload and invoke, atomic replace under load, delete, listing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use wasmbox_integration::{Client, Reply, Supervisor, function_wasm, sha256_file};

const TOKEN: &str = "test-admin-token-0123456789";

async fn put(client: &Client, name: &str, bytes: Vec<u8>) -> anyhow::Result<Reply> {
    let auth = format!("Bearer {TOKEN}");
    client.request(Method::PUT, &format!("/admin/functions/{name}"), &[("authorization", &auth)], bytes.into()).await
}

async fn call(client: &Client, method: Method, path: &str) -> anyhow::Result<Reply> {
    let auth = format!("Bearer {TOKEN}");
    client.request(method, path, &[("authorization", &auth)], Bytes::new()).await
}

fn start() -> anyhow::Result<Supervisor> {
    Supervisor::builder().workers(2).function("hello").env("WASMBOX_ADMIN_TOKEN", TOKEN).start()
}

#[tokio::test]
async fn without_a_token_configured_the_api_does_not_exist() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(1).function("hello").start()?;
    let r = call(&s.client(), Method::GET, "/admin/functions").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::NOT_FOUND, "not_found"));
    assert!(r.json()["message"].as_str().unwrap().contains("WASMBOX_ADMIN_TOKEN"), "{}", r.text());
    let r = put(&s.client(), "x", std::fs::read(function_wasm("hello"))?).await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!s.functions_dir().join("x.wasm").exists());
    Ok(())
}

#[tokio::test]
async fn no_token_or_a_wrong_one_is_401() -> anyhow::Result<()> {
    let s = start()?;
    let c = s.client();
    let hello = Bytes::from(std::fs::read(function_wasm("hello"))?);
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-token-0123456789")],
        vec![("authorization", "Bearer test-admin-token-012345678")],
        vec![("authorization", "Basic dGVzdDp0ZXN0")],
        vec![("authorization", TOKEN)],
    ] {
        for (method, path) in [
            (Method::GET, "/admin/functions"),
            (Method::PUT, "/admin/functions/x"),
            (Method::DELETE, "/admin/functions/hello"),
        ] {
            let r = c.request(method.clone(), path, &headers, hello.clone()).await?;
            assert_eq!(
                (r.status, r.kind().as_str()),
                (StatusCode::UNAUTHORIZED, "unauthorized"),
                "{method} {path} {headers:?}"
            );
            assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"wasmbox-admin\""));
        }
    }
    assert!(!s.functions_dir().join("x.wasm").exists());
    assert!(s.functions_dir().join("hello.wasm").exists(), "nothing was deleted");
    // The scheme is case-insensitive, as HTTP says.
    let r = c
        .request(Method::GET, "/admin/functions", &[("authorization", &format!("bearer {TOKEN}"))], Bytes::new())
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    Ok(())
}

#[tokio::test]
async fn invalid_modules_are_422_and_never_visible() -> anyhow::Result<()> {
    let s = Supervisor::builder()
        .workers(1)
        .function("hello")
        .env("WASMBOX_ADMIN_TOKEN", TOKEN)
        .env("WASMBOX_MAX_MODULE_BYTES", 4 << 20)
        .start()?;
    let c = s.client();
    let mut truncated = std::fs::read(function_wasm("hello"))?;
    truncated.truncate(truncated.len() / 2);
    for (bytes, what) in [
        (b"this is not wasm".to_vec(), "no magic"),
        (b"\0asm\x01\0\0\0\x01\xff\xff".to_vec(), "bad section"),
        (truncated, "truncated"),
    ] {
        let r = put(&c, "broken", bytes).await?;
        assert_eq!(
            (r.status, r.kind().as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"),
            "{what}: {}",
            r.text()
        );
        assert_eq!(s.get("/broken").await?.status, StatusCode::NOT_FOUND, "{what}");
    }
    // Over WASMBOX_MAX_MODULE_BYTES: 413 before anything is written.
    let r = put(&c, "big", vec![0; 5 << 20]).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    // Nothing staged is left behind, and the listing shows only the real function.
    let leftovers: Vec<_> =
        std::fs::read_dir(s.functions_dir())?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers, ["hello.wasm"], "{leftovers:?}");
    let list = call(&c, Method::GET, "/admin/functions").await?.json();
    let names: Vec<&str> = list["functions"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hello"]);
    // A bad name never reaches the filesystem.
    let r = put(&c, "..%2Fescape", std::fs::read(function_wasm("hello"))?).await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn upload_invoke_list_replace_delete() -> anyhow::Result<()> {
    let s = start()?;
    let c = s.client();
    let hello = std::fs::read(function_wasm("hello"))?;
    let r = put(&c, "greet", hello.clone()).await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let body = r.json();
    assert_eq!(body["sha256"], sha256_file(&function_wasm("hello")));
    assert_eq!(body["replaced"], false);
    assert_eq!(s.get("/greet").await?.text(), "Hello from WasmBox!\n");

    // Listed with its hash, size and the artifact the upload compiled.
    let entry = call(&c, Method::GET, "/admin/functions/greet").await?.json();
    assert_eq!(entry["size"], hello.len());
    assert!(!entry["artifacts"].as_array().unwrap().is_empty(), "precompiled on upload: {entry}");
    let list = call(&c, Method::GET, "/admin/functions").await?.json();
    let names: Vec<&str> = list["functions"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["greet", "hello"]);

    // Replaced: 200, and the new code serves the next request.
    let r = put(&c, "greet", std::fs::read(function_wasm("echo"))?).await?;
    assert_eq!((r.status, r.json()["replaced"].as_bool()), (StatusCode::OK, Some(true)), "{}", r.text());
    assert_eq!(s.post("/greet", "echoed").await?.text(), "echoed");

    let r = call(&c, Method::DELETE, "/admin/functions/greet").await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(s.get("/greet").await?.kind(), "function_not_found");
    let r = call(&c, Method::DELETE, "/admin/functions/greet").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::NOT_FOUND, "function_not_found"));
    // Methods the API does not have.
    let r = call(&c, Method::POST, "/admin/functions/greet").await?;
    assert_eq!((r.status, r.header("allow")), (StatusCode::METHOD_NOT_ALLOWED, Some("GET, PUT, DELETE")));
    assert!(s.logs().contains("module uploaded"), "{}", s.logs());
    Ok(())
}

#[tokio::test]
async fn replacing_a_module_under_concurrent_invocations_loses_no_request() -> anyhow::Result<()> {
    let s = start()?;
    let c = s.client();
    let hello = std::fs::read(function_wasm("hello"))?;
    let echo = std::fs::read(function_wasm("echo"))?;
    assert_eq!(put(&c, "swap", hello.clone()).await?.status, StatusCode::CREATED);
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|i| {
            let (c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = (0usize, 0usize);
                let body = format!("caller {i}");
                for _ in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = c.post("/swap", body.clone()).await?;
                    anyhow::ensure!(r.status == StatusCode::OK, "{}: {}", r.status, r.text());
                    match r.text() {
                        t if t == "Hello from WasmBox!\n" => seen.0 += 1,
                        t if t == body => seen.1 += 1,
                        other => anyhow::bail!("neither version answered: {other:?}"),
                    }
                }
                Ok(seen)
            })
        })
        .collect();
    for round in 0..6 {
        let bytes = if round % 2 == 0 { echo.clone() } else { hello.clone() };
        let r = put(&c, "swap", bytes).await?;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut hellos, mut echoes) = (0, 0);
    for caller in callers {
        let (h, e) = caller.await??;
        hellos += h;
        echoes += e;
    }
    assert!(hellos > 0 && echoes > 0, "both versions served: {hellos} hello, {echoes} echo");
    Ok(())
}
