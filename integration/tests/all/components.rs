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
    let s = Supervisor::builder()
        .workers(1)
        .function("cli-hello")
        .function("http-hello")
        .module("nothing", empty)
        .start()?;
    if engine == "wasmtime" {
        let r = s.get("/nothing").await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"), "{}", r.text());
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains("component") && message.contains("wasi:cli/run"), "{message}");
    } else {
        // An engine without the Component Model says so, and which engine has it.
        for path in ["/cli-hello", "/http-hello", "/nothing"] {
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

/// A supervisor serving the example wasi:http components.
fn http_components() -> wasmbox_integration::Builder {
    let mut b = Supervisor::builder().workers(2);
    for name in [
        "http-hello",
        "http-echo",
        "http-stream",
        "http-trap",
        "http-busy",
        "http-alloc",
        "http-flood",
        "http-noresponse",
        "http-headers",
        "http-outgoing",
        "http-pipe",
    ] {
        b = b.function(name);
    }
    b
}

#[tokio::test]
async fn a_wasi_http_component_gets_the_request_and_its_response_comes_back() -> anyhow::Result<()> {
    if !on_wasmtime("a_wasi_http_component_gets_the_request_and_its_response_comes_back") {
        return Ok(());
    }
    let s = http_components().start()?;
    let r = s.get("/http-hello").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "hello from a component\n"), "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(r.header("x-wasmbox-request-id").is_some());
    // Method, the path below the mount with its query, the headers, the body.
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let headers = [
        ("x-test", "value 1"),
        ("cpu_quota", "500"),
        ("timeout-ms", "5000"),
        ("x-wasmbox-fake", "1"),
        ("expect", "100-continue"),
    ];
    let r = s.request(Method::PUT, "/http-echo/sub/path?x=1&y=%20", &headers, body.into()).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path_with_query"], "/sub/path?x=1&y=%20");
    assert_eq!(echo["body_len"], 100_000);
    assert_eq!(echo["body_sha256"], sha);
    let got: Vec<(String, String)> = serde_json::from_value(echo["headers"].clone())?;
    let has = |name: &str| got.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!(has("x-test"), Some("value 1"));
    assert_eq!(has("x-forwarded-prefix"), Some("/http-echo"));
    for control in ["cpu_quota", "timeout-ms", "x-wasmbox-fake", "connection", "content-length", "expect"] {
        assert_eq!(has(control), None, "{control} reached the handler: {got:?}");
    }
    // The function's status and headers are the answer's.
    let r = s.request(Method::DELETE, "/http-echo?status=201&header=x-made:by%20guest", &[], Bytes::new()).await?;
    assert_eq!((r.status, r.header("x-made")), (StatusCode::CREATED, Some("by guest")), "{}", r.text());
    assert_eq!(r.json()["path_with_query"], "/?status=201&header=x-made:by%20guest");
    // Streamed: 50 pieces make one body.
    let r = s.get("/http-stream?chunks=50&size=1000").await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 50_000);
    assert!(r.body.iter().all(|&b| b == b'x'));
    // A path below a module is still not a function.
    let s2 = Supervisor::builder().workers(1).function("hello").start()?;
    let r = s2.get("/hello/below").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_REQUEST, "invalid_function_name"));
    Ok(())
}

#[tokio::test]
async fn a_wasi_http_component_fails_with_typed_errors_before_its_head_and_a_cut_after() -> anyhow::Result<()> {
    if !on_wasmtime("a_wasi_http_component_fails_with_typed_errors_before_its_head_and_a_cut_after") {
        return Ok(());
    }
    let s = http_components().env("WASMBOX_MAX_OUTPUT_BYTES", 1 << 20).start()?;
    let r = s.get("/http-trap?when=before").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "trap"), "{}", r.text());
    let r = s.get("/http-noresponse").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_GATEWAY, "no_response"), "{}", r.text());
    let r = s.request(Method::GET, "/http-busy", &[("timeout-ms", "300")], Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"), "{}", r.text());
    // The handler survives the refused growth (it uses try_reserve) and says so itself.
    let r = s.request(Method::GET, "/http-alloc?mb=200", &[("memory-request", "64")], Bytes::new()).await?;
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "allocating 200 MiB failed
"
        )
    );
    let r = s.request(Method::GET, "/http-alloc?mb=16", &[("memory-request", "64")], Bytes::new()).await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "allocated 16 MiB\n"));
    // After the head: the body is cut, never ended as if whole.
    let cut = s.get("/http-trap?when=after").await;
    assert!(cut.is_err(), "a trap after the head was answered as a whole body: {:?}", cut.map(|r| r.status));
    let flood = s.get("/http-flood").await;
    assert!(
        flood.is_err(),
        "a body past WASMBOX_MAX_OUTPUT_BYTES was answered whole: {:?}",
        flood.map(|r| r.body.len())
    );
    // Outgoing HTTP is refused with wasi:http's own error, not a crash.
    let r = s.get("/http-outgoing").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.text().contains("HttpRequestDenied"), "{}", r.text());
    // A header set: a modest one comes through; one past what clients take is refused
    // before anything is sent; a huge one cannot even be built in the guest.
    let r = s.get("/http-headers?n=50").await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers.keys().filter(|k| k.as_str().starts_with("x-h-")).count(), 50);
    let r = s.get("/http-headers?n=200").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_GATEWAY, "invalid_response"), "{}", r.text());
    let r = s.get("/http-headers?n=100000").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "trap"), "{}", r.text());
    assert!(r.text().contains("fields exceeds limit"), "{}", r.text());
    // And the server serves on.
    assert_eq!(s.get("/http-hello").await?.text(), "hello from a component\n");
    Ok(())
}

/// A client that sends a component's request body slowly is cut off by the body read
/// bounds before the handler ever runs, with the typed 408, and the worker is untouched.
#[tokio::test]
async fn a_slow_request_body_for_a_component_is_408_before_the_handler_runs() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !on_wasmtime("a_slow_request_body_for_a_component_is_408_before_the_handler_runs") {
        return Ok(());
    }
    let s = Supervisor::builder().workers(1).function("http-echo").env("WASMBOX_BODY_READ_TIMEOUT_MS", 500).start()?;
    assert_eq!(s.post("/http-echo", "warm").await?.status, StatusCode::OK);
    let mut stream = tokio::net::TcpStream::connect(s.addr).await?;
    stream.write_all(b"POST /http-echo/x HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nabc").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    // Nothing reached the worker: it serves the next request as the same process.
    let before = s.worker_pids();
    assert_eq!(s.post("/http-echo", "next").await?.status, StatusCode::OK);
    assert_eq!(s.worker_pids(), before);
    Ok(())
}

/// A streamed response counts against WASMBOX_MAX_BUFFERED_BYTES while it is on its way
/// (what it can hold at once), and gives it back when it is done.
#[tokio::test]
async fn a_streamed_response_is_charged_against_the_buffer_budget_while_it_streams() -> anyhow::Result<()> {
    if !on_wasmtime("a_streamed_response_is_charged_against_the_buffer_budget_while_it_streams") {
        return Ok(());
    }
    let s = Supervisor::builder().workers(1).function("http-stream").start()?;
    assert_eq!(s.get("/http-stream?chunks=1&size=1").await?.status, StatusCode::OK);
    let used = |stats: serde_json::Value| stats["buffers"]["used_bytes"].as_u64().unwrap_or(0);
    assert_eq!(used(s.get("/stats").await?.json()), 0);
    let client = s.client();
    let stream = tokio::spawn(async move { client.get("/http-stream?chunks=60&size=10&delay_ms=100").await });
    // Nine pieces of 64 KiB: the channel's eight and the one being written.
    let charge = 9 * (64 << 10);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = used(s.get("/stats").await?.json());
        if now >= charge {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the stream was never charged (used {now})");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = stream.await??;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 600));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while used(s.get("/stats").await?.json()) != 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the stream's charge was not given back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Writes `data` as one chunk of a chunked body.
async fn chunk(stream: &mut tokio::net::TcpStream, data: &[u8]) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    stream.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
    stream.write_all(data).await?;
    stream.write_all(b"\r\n").await?;
    Ok(())
}

/// Reads from `stream` into `seen` until it holds `needle`, within 20 s.
async fn read_until(stream: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, needle: &[u8]) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await.map_err(|_| {
            anyhow::anyhow!("no {:?} in time; got {:?}", String::from_utf8_lossy(needle), String::from_utf8_lossy(seen))
        })??;
        anyhow::ensure!(
            n > 0,
            "closed before {:?}: {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// A request body reaches the handler as the client sends it: a handler that writes back
/// what it reads answers each chunk before the client sends the next, and the whole body
/// arrives intact whether its length is declared or not, past the size a request carries
/// at once.
#[tokio::test]
async fn a_request_body_streams_to_the_handler_as_the_client_sends_it() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    if !on_wasmtime("a_request_body_streams_to_the_handler_as_the_client_sends_it") {
        return Ok(());
    }
    let s = http_components().env("WASMBOX_MAX_BODY_BYTES", 8 << 20).start()?;
    let mut stream = tokio::net::TcpStream::connect(s.addr).await?;
    stream.write_all(b"POST /http-pipe HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n").await?;
    let mut seen = Vec::new();
    for piece in ["first-piece", "second-piece", "third-piece"] {
        chunk(&mut stream, piece.as_bytes()).await?;
        // Its echo comes back while the rest of the body is still unsent.
        read_until(&mut stream, &mut seen, piece.as_bytes()).await?;
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    stream.write_all(b"0\r\n\r\n").await?;
    // The response ends as a whole chunked body.
    read_until(&mut stream, &mut seen, b"\r\n0\r\n\r\n").await?;
    // Declared and undeclared lengths of a few MiB: the handler hashes what it read.
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = {
        use sha2::Digest;
        sha2::Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let r = s.post("/http-echo", body.clone()).await?;
    assert_eq!((r.status, r.json()["body_len"].as_u64()), (StatusCode::OK, Some(3_000_000)), "{}", r.text());
    assert_eq!(r.json()["body_sha256"], sha);
    let mut stream = tokio::net::TcpStream::connect(s.addr).await?;
    stream
        .write_all(b"POST /http-echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n")
        .await?;
    for part in body.chunks(100_000) {
        chunk(&mut stream, part).await?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, sha.as_bytes()).await?;
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    assert!(String::from_utf8_lossy(&seen).contains("\"body_len\":3000000"), "{}", String::from_utf8_lossy(&seen));
    Ok(())
}

/// A streamed request body that breaks its bounds while the handler reads it (too large,
/// or too slow) is the typed error when the handler has not answered yet; the handler sees
/// its body cut, and its worker serves on as the same process.
#[tokio::test]
async fn a_streamed_request_body_past_its_bounds_is_the_typed_error_and_the_worker_serves_on() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !on_wasmtime("a_streamed_request_body_past_its_bounds_is_the_typed_error_and_the_worker_serves_on") {
        return Ok(());
    }
    let s = Supervisor::builder()
        .workers(1)
        .function("http-echo")
        .env("WASMBOX_MAX_BODY_BYTES", 1 << 20)
        .env("WASMBOX_BODY_READ_TIMEOUT_MS", 500)
        .start()?;
    assert_eq!(s.post("/http-echo", "warm").await?.status, StatusCode::OK);
    let before = s.worker_pids();
    let head = b"POST /http-echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
    // Too large: chunks past WASMBOX_MAX_BODY_BYTES, with no length declared.
    let mut stream = tokio::net::TcpStream::connect(s.addr).await?;
    stream.write_all(head).await?;
    let mut seen = Vec::new();
    for _ in 0..20 {
        if chunk(&mut stream, &[b'a'; 100_000]).await.is_err() {
            break; // Refused and closed while sending: the answer is already there.
        }
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), stream.read_to_end(&mut seen)).await;
    let answer = String::from_utf8_lossy(&seen);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    // Too slow: a first chunk (the handler is reading), then nothing.
    let mut stream = tokio::net::TcpStream::connect(s.addr).await?;
    stream.write_all(head).await?;
    chunk(&mut stream, &[b'b'; 100_000]).await?;
    let mut seen = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), stream.read_to_end(&mut seen)).await??;
    let answer = String::from_utf8_lossy(&seen);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    // The handler ran and saw its body cut; the worker is the same process and serves on.
    let r = s.post("/http-echo", "next").await?;
    assert_eq!((r.status, r.json()["body_len"].as_u64()), (StatusCode::OK, Some(4)), "{}", r.text());
    assert_eq!(s.worker_pids(), before);
    Ok(())
}
