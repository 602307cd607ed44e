//! Invoking functions: stdin, stdout, argv, env, preopens, exit codes, traps, errors.

use bytes::Bytes;
use http::{Method, StatusCode};
use wasmbox_integration::Supervisor;

#[tokio::test]
async fn hello_answers_with_stdout_and_invocation_headers() -> anyhow::Result<()> {
    let s = Supervisor::builder().function("hello").start()?;
    let r = s.get("/hello").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "Hello from WasmBox!\n");
    assert_eq!(r.header("x-wasmbox-exit-code"), Some("0"));
    for h in ["x-wasmbox-queue-wait-us", "x-wasmbox-exec-time-us", "x-wasmbox-request-id"] {
        assert!(r.header(h).is_some_and(|v| !v.is_empty()), "missing {h}");
    }
    assert!(r.header("x-wasmbox-worker").is_some_and(|w| w.contains('.')));
    // A client's request id is echoed back.
    let r = s.request(Method::GET, "/hello", &[("x-request-id", "trace-123")], Bytes::new()).await?;
    assert_eq!(r.header("x-wasmbox-request-id"), Some("trace-123"));
    Ok(())
}

#[tokio::test]
async fn echo_round_trips_one_mebibyte() -> anyhow::Result<()> {
    let s = Supervisor::builder().function("echo").start()?;
    let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let r = s.post("/echo", body.clone()).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "echoed bytes differ");
    // GET runs with empty stdin.
    let r = s.get("/echo").await?;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0));
    Ok(())
}

#[tokio::test]
async fn args_come_from_the_query_and_default_from_toml() -> anyhow::Result<()> {
    let s = Supervisor::builder().function("args-env").file("args-env.toml", "args = [\"--default\"]").start()?;
    let r = s.get("/args-env?arg=one&arg=two%20words&arg=%2Fslash").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["args"], serde_json::json!(["args-env", "one", "two words", "/slash"]));
    let r = s.get("/args-env").await?;
    assert_eq!(r.json()["args"], serde_json::json!(["args-env", "--default"]));
    Ok(())
}

#[tokio::test]
async fn env_and_preopened_directories_from_toml() -> anyhow::Result<()> {
    let config = r#"
        [env]
        GREETING = "hi there"
        [[preopen]]
        host = "data"
        guest = "/data"
        [[preopen]]
        host = "scratch"
        guest = "/scratch"
        read_only = false
    "#;
    let s = Supervisor::builder()
        .function("args-env")
        .file("args-env.toml", config)
        .function("fs")
        .file("fs.toml", config)
        .file("data/note.txt", "from the host\n")
        .file("scratch/.keep", "")
        .start()?;
    let r = s.get("/args-env").await?;
    assert_eq!(r.json()["env"], serde_json::json!({"GREETING": "hi there"}), "only declared env is visible");

    let r = s.get("/fs?arg=cat&arg=/data/note.txt").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "from the host\n"));
    let r = s.get("/fs?arg=ls&arg=/data").await?;
    assert_eq!(r.text(), "note.txt\n");

    // Writable preopen: the write lands on the host, once the directory is writable by the
    // user workers run as (nobody, when the tests run as root).
    let scratch = s.functions_dir().join("scratch");
    if nix::unistd::geteuid().is_root() {
        let r = s.post("/fs?arg=write&arg=/scratch/out.txt", "x").await?;
        assert!(r.text().contains("Permission denied"), "root's 0755 directory is not nobody's: {}", r.text());
        let nobody = nix::unistd::User::from_name("nobody")?.expect("nobody exists");
        nix::unistd::chown(&scratch, Some(nobody.uid), Some(nobody.gid))?;
    }
    let r = s.post("/fs?arg=write&arg=/scratch/out.txt", "written by the guest").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(std::fs::read_to_string(scratch.join("out.txt"))?, "written by the guest");

    // Read-only preopen refuses writes; paths outside any preopen do not exist for the guest.
    let r = s.post("/fs?arg=write&arg=/data/evil.txt", "x").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "nonzero_exit"));
    assert!(!s.functions_dir().join("data/evil.txt").exists());
    for outside in ["/etc/passwd", "/data/../fs.toml", "../fs.toml"] {
        let r = s.get(&format!("/fs?arg=cat&arg={outside}")).await?;
        assert_eq!(r.kind(), "nonzero_exit", "{outside}: {}", r.text());
    }
    Ok(())
}

#[tokio::test]
async fn exit_codes_map_to_200_or_500_with_code_and_stderr() -> anyhow::Result<()> {
    let s = Supervisor::builder().function("exit-code").start()?;
    let r = s.get("/exit-code?arg=0").await?;
    assert_eq!((r.status, r.header("x-wasmbox-exit-code")), (StatusCode::OK, Some("0")));
    for code in [1, 3, 42, 125] {
        let r = s.get(&format!("/exit-code?arg={code}")).await?;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.header("x-wasmbox-exit-code"), Some(code.to_string().as_str()));
        let body = r.json();
        assert_eq!(body["error"], "nonzero_exit");
        assert_eq!(body["exit_code"], code);
        assert_eq!(body["stderr"], format!("about to exit with status {code}\n"));
    }
    Ok(())
}

#[tokio::test]
async fn trap_is_500_and_the_worker_keeps_serving() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(1).function("trap").function("hello").start()?;
    let r = s.get("/trap").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "trap"));
    assert!(r.json()["message"].as_str().unwrap().contains("unreachable"));
    assert_eq!(r.json()["stderr"], "about to trap\n");
    let worker = r.header("x-wasmbox-worker").unwrap().to_owned();
    let r = s.get("/hello").await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-wasmbox-worker"), Some(worker.as_str()), "a trap does not cost the worker");
    Ok(())
}

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
async fn invalid_modules_are_422() -> anyhow::Result<()> {
    let no_start = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "main")))"#)?;
    let unknown_import =
        wat::parse_str(r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#)?;
    let s = Supervisor::builder()
        .workers(1)
        .module("garbage", b"\0asm\x01\0\0\0this is not wasm".to_vec())
        .module("text", b"hello, I am a text file".to_vec())
        .module("no-start", no_start)
        .module("unknown-import", unknown_import)
        .function("hello")
        .start()?;
    for name in ["garbage", "text", "no-start", "unknown-import"] {
        let r = s.get(&format!("/{name}")).await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"), "{name}");
        // Asking again is answered from the worker's memory of the failure.
        let again = s.get(&format!("/{name}")).await?;
        assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
    }
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
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

#[tokio::test]
async fn realistic_workloads_give_deterministic_results() -> anyhow::Result<()> {
    let s = Supervisor::builder().function("json-compress").function("password-hash").start()?;
    let a = s.get("/json-compress?arg=2000").await?;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["records"], 2000);
    assert!(a.json()["deflated_bytes"].as_u64().unwrap() < a.json()["json_bytes"].as_u64().unwrap());
    let b = s.get("/json-compress?arg=2000").await?;
    assert_eq!(a.body, b.body);
    let h = s.post("/password-hash?arg=1000", "correct horse").await?;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.text().trim().len(), 64);
    assert_eq!(h.body, s.post("/password-hash?arg=1000", "correct horse").await?.body);
    assert_ne!(h.body, s.post("/password-hash?arg=1000", "battery staple").await?.body);
    Ok(())
}
