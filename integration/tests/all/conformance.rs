//! The engine conformance suite: every behaviour a function can observe, run against each
//! engine the workers are built with. Both engines must give the same answers.
//!
//! Each behaviour is one function taking the engine's name; `conformance!` turns it into one
//! test per engine (`conformance::wasmtime::...`, and `conformance::wasmedge::...` in builds
//! with the `wasmedge` feature).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use wasmbox_integration::Supervisor;

macro_rules! conformance {
    ($engine:ident: $($behaviour:ident),+ $(,)?) => {
        mod $engine {
            $(
                #[tokio::test]
                async fn $behaviour() -> anyhow::Result<()> {
                    super::$behaviour(stringify!($engine)).await
                }
            )+
        }
    };
}

macro_rules! suite {
    ($engine:ident) => {
        conformance!($engine:
            hello_answers_with_stdout_and_invocation_headers,
            echo_round_trips_one_mebibyte,
            args_come_from_the_query_and_default_from_toml,
            env_and_preopened_directories_from_toml,
            exit_codes_map_to_200_or_500_with_code_and_stderr,
            trap_is_500_and_the_worker_keeps_serving,
            invalid_modules_are_422,
            realistic_workloads_give_deterministic_results,
            allocation_beyond_memory_request_fails_cleanly_then_next_succeeds,
            infinite_loop_is_504_within_a_second_and_the_pool_goes_on,
            stdout_over_the_cap_is_an_error_not_a_cut_body,
            modules_compile_once_into_the_cache_and_load_from_it_after_a_restart,
            sessions_keep_state_roll_back_failures_and_export_whole,
            every_wasi_preview1_call_runs_under_the_seccomp_filter,
            wasi_http_components_are_served_where_the_engine_has_them_and_refused_where_not,
        );
    };
}

suite!(wasmtime);
#[cfg(feature = "wasmedge")]
suite!(wasmedge);

pub async fn hello_answers_with_stdout_and_invocation_headers(engine: &str) -> anyhow::Result<()> {
    let s = Supervisor::builder().engine(engine).function("hello").start()?;
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

pub async fn echo_round_trips_one_mebibyte(engine: &str) -> anyhow::Result<()> {
    let s = Supervisor::builder().engine(engine).function("echo").start()?;
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

pub async fn args_come_from_the_query_and_default_from_toml(engine: &str) -> anyhow::Result<()> {
    let s = Supervisor::builder()
        .engine(engine)
        .function("args-env")
        .file("args-env.toml", "args = [\"--default\"]")
        .start()?;
    let r = s.get("/args-env?arg=one&arg=two%20words&arg=%2Fslash").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["args"], serde_json::json!(["args-env", "one", "two words", "/slash"]));
    let r = s.get("/args-env").await?;
    assert_eq!(r.json()["args"], serde_json::json!(["args-env", "--default"]));
    Ok(())
}

pub async fn env_and_preopened_directories_from_toml(engine: &str) -> anyhow::Result<()> {
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
        .engine(engine)
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
    // uid the worker runs as (its slot's, when the tests run as root).
    let scratch = s.functions_dir().join("scratch");
    if nix::unistd::geteuid().is_root() {
        let r = s.post("/fs?arg=write&arg=/scratch/out.txt", "x").await?;
        assert!(r.text().contains("Permission denied"), "root's 0755 directory is not the worker's: {}", r.text());
        // The slot that ran it (and keeps serving this tenant) runs as the range's first
        // uid (WASMBOX_WORKER_UID_BASE's default) plus its number.
        let slot: u32 = r.header("x-wasmbox-worker").and_then(|w| w.split('.').next()?.parse().ok()).expect("slot");
        let uid = 2_000_000 + slot;
        nix::unistd::chown(&scratch, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(uid)))?;
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

pub async fn exit_codes_map_to_200_or_500_with_code_and_stderr(engine: &str) -> anyhow::Result<()> {
    let s = Supervisor::builder().engine(engine).function("exit-code").start()?;
    let r = s.get("/exit-code?arg=0").await?;
    assert_eq!((r.status, r.header("x-wasmbox-exit-code")), (StatusCode::OK, Some("0")));
    for code in [1, 3, 42, 125, 126, 255] {
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

pub async fn trap_is_500_and_the_worker_keeps_serving(engine: &str) -> anyhow::Result<()> {
    let s = Supervisor::builder().engine(engine).workers(1).function("trap").function("hello").tenant("t").start()?;
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

pub async fn invalid_modules_are_422(engine: &str) -> anyhow::Result<()> {
    let no_start = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "main")))"#)?;
    let unknown_import =
        wat::parse_str(r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#)?;
    let s = Supervisor::builder()
        .engine(engine)
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

pub async fn realistic_workloads_give_deterministic_results(engine: &str) -> anyhow::Result<()> {
    let s = Supervisor::builder().engine(engine).function("json-compress").function("password-hash").start()?;
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

pub async fn allocation_beyond_memory_request_fails_cleanly_then_next_succeeds(engine: &str) -> anyhow::Result<()> {
    let s = Supervisor::builder().engine(engine).workers(1).function("alloc").start()?;
    let r = s.request(Method::GET, "/alloc?arg=64", &[("Memory-Request", "16")], Bytes::new()).await?;
    assert_eq!(
        (r.status, r.kind().as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, "memory_limit_exceeded"),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["memory_limit_mb"], 16);
    let worker = r.header("x-wasmbox-worker").unwrap().to_owned();
    let r = s.request(Method::GET, "/alloc?arg=8", &[("Memory-Request", "16")], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-wasmbox-worker"), Some(worker.as_str()), "same worker, still healthy");
    let r = s.request(Method::GET, "/alloc?arg=64", &[("Memory-Request", "128")], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    Ok(())
}

pub async fn infinite_loop_is_504_within_a_second_and_the_pool_goes_on(engine: &str) -> anyhow::Result<()> {
    let spin = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))"#)?;
    let s = Supervisor::builder().engine(engine).workers(1).module("forever", spin).function("hello").start()?;
    // Compile first so the measured call is pure execution.
    let _ = s.request(Method::GET, "/forever", &[("Timeout-Ms", "50")], Bytes::new()).await?;
    let started = Instant::now();
    let r = s.request(Method::GET, "/forever", &[("Timeout-Ms", "200")], Bytes::new()).await?;
    let took = started.elapsed();
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"));
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(took >= Duration::from_millis(200), "took {took:?}");
    let engine_stops = wasmbox_integration::engine_stops_commands(engine);
    assert_eq!(r.json()["worker_killed"], !engine_stops, "who stopped it: {}", r.text());
    let r = s.get("/hello").await?;
    assert_eq!(r.status, StatusCode::OK);
    if engine == "wasmedge" {
        // The operator's other choice: interruptible code, stopped by WasmEdge itself.
        let s = Supervisor::builder()
            .engine(engine)
            .workers(1)
            .module(
                "forever",
                wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))"#)?,
            )
            .env("WASMBOX_WASMEDGE_INTERRUPTIBLE", "true")
            .start()?;
        let warm = Instant::now() + Duration::from_secs(60);
        while s
            .request(Method::GET, "/forever", &[("Timeout-Ms", "50")], Bytes::new())
            .await?
            .header("x-wasmbox-module-source")
            == Some("interpreted")
        {
            anyhow::ensure!(Instant::now() < warm, "no artifact within 60 s");
        }
        let started = Instant::now();
        let r = s.request(Method::GET, "/forever", &[("Timeout-Ms", "200")], Bytes::new()).await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"));
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        assert_eq!(r.header("x-wasmbox-module-source"), Some("memory"), "the interruptible artifact ran");
        assert_eq!(r.json()["worker_killed"], false, "WasmEdge stopped it: {}", r.text());
    }
    Ok(())
}

pub async fn stdout_over_the_cap_is_an_error_not_a_cut_body(engine: &str) -> anyhow::Result<()> {
    let s = Supervisor::builder().engine(engine).function("echo").env("WASMBOX_MAX_OUTPUT_BYTES", 1000).start()?;
    let r = s.post("/echo", vec![b'z'; 1000]).await?;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 1000));
    let r = s.post("/echo", vec![b'z'; 1001]).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "output_too_large"), "{}", r.text());
    Ok(())
}

/// The engine's version as the supervisor logged it at startup.
fn logged_engine_version(s: &Supervisor, engine: &str) -> String {
    let logs = s.logs();
    let line = logs.lines().find(|l| l.contains("engine engine=")).expect("startup logs the engine");
    assert!(line.contains(&format!("engine={engine}")), "{line}");
    line.split("version=").nth(1).and_then(|v| v.split_whitespace().next()).expect("version in the line").to_owned()
}

/// The artifact files of `tenant` in the store for `engine`: exactly one directory per
/// engine version, its name carrying the engine's name and version, so nothing crosses
/// engines or versions; records (`.json`) left out.
fn artifacts(cache: &std::path::Path, engine: &str, version: &str, tenant: &str) -> Vec<std::path::PathBuf> {
    let store = cache.join("artifacts");
    let dirs: Vec<_> =
        std::fs::read_dir(store).map(|d| d.map_while(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(dirs.len() <= 1, "one artifact directory per engine version: {dirs:?}");
    let Some(dir) = dirs.first() else { return Vec::new() };
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(&format!("{engine}-{version}")), "{name}");
    let Ok(entries) = std::fs::read_dir(dir.join(tenant)) else { return Vec::new() };
    let mut files: Vec<_> =
        entries.map_while(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_none_or(|e| e != "json")).collect();
    files.sort();
    files
}

pub async fn modules_compile_once_into_the_cache_and_load_from_it_after_a_restart(engine: &str) -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let hash = wasmbox_integration::sha256_file(&wasmbox_integration::function_wasm("hello"));
    let start = || {
        Supervisor::builder()
            .engine(engine)
            .workers(1)
            .env("WASMBOX_CACHE_DIR", cache.path().display())
            .function("hello")
            .start()
    };

    let s = start()?;
    let version = logged_engine_version(&s, engine);
    let r = s.get("/hello").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-wasmbox-module-source"), Some(wasmbox_integration::first_call_source(engine)));
    if engine == "wasmedge" && !version.ends_with("-interp") {
        // Interpreted until the trusted compiler's artifact is ready; then that is loaded.
        assert_eq!(s.until_native("/hello").await?.header("x-wasmbox-module-source"), Some("artifact"));
    }
    assert_eq!(s.get("/hello").await?.header("x-wasmbox-module-source"), Some("memory"));
    let files = artifacts(cache.path(), engine, &version, "hello");
    if version.ends_with("-interp") {
        // A libwasmedge without its compiler: the interpreter runs the module, nothing is
        // written, and the startup said so.
        assert!(files.is_empty(), "{files:?}");
        assert!(s.logs().contains("interpreter"), "{}", s.logs());
        return Ok(());
    }
    let [artifact] = files.as_slice() else { panic!("one artifact, no temporary files: {files:?}") };
    let file_name = artifact.file_name().unwrap().to_string_lossy().into_owned();
    assert!(file_name.starts_with(&format!("{hash}.")), "named after the module's hash: {file_name}");
    let written = std::fs::metadata(artifact)?.modified()?;
    drop(s);

    // A restarted supervisor's worker loads the artifact instead of compiling.
    let s = start()?;
    let r = s.get("/hello").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "Hello from WasmBox!\n"));
    assert_eq!(r.header("x-wasmbox-module-source"), Some("artifact"));
    assert_eq!(std::fs::metadata(artifact)?.modified()?, written, "loaded, not rewritten");
    // The native code that ran is the artifact's: the worker has it mapped (an engine that
    // took only the Wasm embedded in an artifact and interpreted it would not).
    let [worker] = s.worker_pids()[..] else { panic!("one worker: {:?}", s.worker_pids()) };
    let maps = std::fs::read_to_string(format!("/proc/{worker}/maps"))?;
    assert!(maps.contains(&file_name), "{file_name} is not mapped in worker {worker}:\n{maps}");
    drop(s);

    // A damaged artifact is discarded and rebuilt, never run.
    std::fs::write(artifact, b"\x7fELF not really")?;
    let s = start()?;
    let r = s.get("/hello").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "Hello from WasmBox!\n"));
    assert_eq!(r.header("x-wasmbox-module-source"), Some(wasmbox_integration::first_call_source(engine)));
    s.until_native("/hello").await?;
    assert_eq!(artifacts(cache.path(), engine, &version, "hello"), vec![artifact.clone()]);
    assert!(std::fs::metadata(artifact)?.len() > 1000, "rebuilt");
    Ok(())
}

pub async fn sessions_keep_state_roll_back_failures_and_export_whole(engine: &str) -> anyhow::Result<()> {
    use crate::sessions::{create, ok, send};
    let s = Supervisor::builder().engine(engine).function("counter").start()?;
    let c = s.client();
    let id = create(&c, "counter").await?;
    for i in 1..=5 {
        assert_eq!(ok(&c, "counter", &id, "incr n").await?, i.to_string());
    }
    assert_eq!(send(&c, "counter", &id, "trap n").await?.kind(), "trap");
    let path = format!("/sessions/counter/{id}");
    let r = c.request(Method::POST, &path, &[("Timeout-Ms", "300")], "spin n".into()).await?;
    assert_eq!(r.kind(), "deadline_exceeded");
    let r = c.request(Method::POST, &path, &[("Memory-Request", "32")], "grow 64".into()).await?;
    assert_eq!(r.kind(), "memory_limit_exceeded");
    assert_eq!(ok(&c, "counter", &id, "get n").await?, "5");
    // A heap of 4 MiB, then a message that changes one byte of it: the state moves through
    // export and import intact.
    assert_eq!(ok(&c, "counter", &id, "fill 4 9").await?, "filled 4");
    assert_eq!(ok(&c, "counter", &id, "touch 1").await?, (4 << 20).to_string());
    let snapshot = c.get(&format!("{path}/snapshot")).await?.body;
    let copy = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";
    let r = c.request(Method::PUT, &format!("/sessions/counter/{copy}/snapshot"), &[], snapshot).await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(ok(&c, "counter", copy, "keys").await?, "n=5");
    let sum = ok(&c, "counter", &id, "sum").await?;
    assert_eq!(sum.len(), 16);
    assert_eq!(ok(&c, "counter", copy, "sum").await?, sum);
    // Both copies change the same way from the same state.
    ok(&c, "counter", &id, "touch 3").await?;
    ok(&c, "counter", copy, "touch 3").await?;
    assert_eq!(ok(&c, "counter", copy, "sum").await?, ok(&c, "counter", &id, "sum").await?);
    assert_ne!(ok(&c, "counter", &id, "sum").await?, sum);
    Ok(())
}

/// Every wasi_snapshot_preview1 function, called with valid arguments by the wasi-coverage
/// guest (files, directories, links, rights, flags with an append write, clocks, random,
/// poll, sockets as far as the preview has them), runs without the worker being killed:
/// the seccomp allow-list covers what each engine's WASI needs. Twice, on the same worker,
/// so a second run (artifact loaded, leftovers cleaned) is covered too.
pub async fn every_wasi_preview1_call_runs_under_the_seccomp_filter(engine: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let s = Supervisor::builder()
        .engine(engine)
        .workers(1)
        .env("WASMBOX_WORKER_SECCOMP", "enforce")
        .function("wasi-coverage")
        .file("wasi-coverage.toml", "[[preopen]]\nhost = \"scratch\"\nguest = \"/scratch\"\nread_only = false\n")
        .file("scratch/.keep", "")
        .start()?;
    // The worker may run as an unprivileged user.
    std::fs::set_permissions(s.functions_dir().join("scratch"), std::fs::Permissions::from_mode(0o777))?;
    let mut worker = None;
    for run in 0..2 {
        let r = s.get("/wasi-coverage?arg=a&arg=b").await?;
        assert_eq!(r.status, StatusCode::OK, "run {run}: {}", r.text());
        let out = r.text();
        assert!(out.ends_with("done 46\n"), "run {run}: {out}");
        let called: std::collections::BTreeSet<&str> =
            out.lines().filter_map(|l| l.split_once(' ').map(|(f, _)| f)).filter(|f| *f != "done").collect();
        assert_eq!(called.len(), 46, "run {run}: {called:?}");
        // The calls that cannot fail on a working host did not.
        for line in ["fd_write 0", "path_open 0", "fd_fdstat_set_flags 0", "path_rename 0", "poll_oneoff 0"] {
            assert!(out.lines().any(|l| l == line), "run {run}: no {line:?} in\n{out}");
        }
        let this = r.header("x-wasmbox-worker").map(str::to_owned);
        assert!(worker.is_none() || worker == this, "the worker was replaced: {worker:?} then {this:?}");
        worker = this;
    }
    let stats = s.get("/stats").await?.json();
    assert_eq!(stats["pool"]["exits"]["seccomp"], 0, "{stats}");
    Ok(())
}

/// Components: an engine with the Component Model serves a wasi:http handler (its
/// response, a streamed request body, a handler that never answers, a header set past what
/// clients take, an output flood cut off); one without refuses the same component with 422.
pub async fn wasi_http_components_are_served_where_the_engine_has_them_and_refused_where_not(
    engine: &str,
) -> anyhow::Result<()> {
    let s = Supervisor::builder()
        .engine(engine)
        .function("http-echo")
        .function("http-noresponse")
        .function("http-headers")
        .function("http-flood")
        .env("WASMBOX_MAX_OUTPUT_BYTES", 1 << 20)
        .start()?;
    if engine != "wasmtime" {
        let r = s.post("/http-echo", "x").await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_module"), "{}", r.text());
        return Ok(());
    }
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 249) as u8).collect();
    let r = s.request(Method::PUT, "/http-echo/a?b=c", &[("x-k", "v")], body.into()).await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!((r.json()["method"].as_str(), r.json()["body_len"].as_u64()), (Some("PUT"), Some(300_000)));
    assert_eq!(r.json()["path_with_query"], "/a?b=c");
    let r = s.get("/http-noresponse").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_GATEWAY, "no_response"), "{}", r.text());
    let r = s.get("/http-headers?n=200").await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_GATEWAY, "invalid_response"), "{}", r.text());
    assert!(s.get("/http-flood").await.is_err(), "an output flood was answered as a whole body");
    assert_eq!(s.post("/http-echo", "after").await?.json()["body_len"], 5);
    Ok(())
}
