//! The trusted compiler and the uid per slot: no process that ran tenant code writes what
//! another tenant's worker loads, and no two slots share a uid.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::StatusCode;
use nix::sys::signal::Signal;
use wasmbox_integration::{Supervisor, function_wasm};

fn status(pid: i32) -> HashMap<String, String> {
    wasmbox_integration::proc_status(pid)
}

/// Real, effective, saved and filesystem uid of `pid`.
fn uids(pid: i32) -> Vec<u32> {
    status(pid)["Uid"].split_whitespace().map(|u| u.parse().unwrap()).collect()
}

/// Every file and directory under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// The stored artifact of `tenant` (one engine version in this store).
fn stored(cache: &Path, tenant: &str) -> PathBuf {
    let engine_dir = std::fs::read_dir(cache.join("artifacts")).unwrap().flatten().next().unwrap().path();
    let dir = engine_dir.join(tenant);
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm" || e == "so"))
        .unwrap_or_else(|| panic!("no artifact in {}", dir.display()))
}

#[tokio::test]
async fn each_slot_runs_as_its_own_uid_and_no_worker_can_reach_the_artifact_store() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the uid per slot needs root");
        return Ok(());
    }
    let cache = tempfile::tempdir()?;
    let s = Supervisor::builder()
        .workers(2)
        .function("hello")
        .function("echo")
        .env("WASMBOX_CACHE_DIR", cache.path().display())
        .env("WASMBOX_WORKER_UID_BASE", 3_100_000)
        .env("WASMBOX_COMPILERS", 1)
        // No spares: no worker is recycled into one while the test reads /proc.
        .env("WASMBOX_SPARE_WORKERS", 0)
        .start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    for path in ["/hello", "/echo"] {
        let r = s.post(path, "x").await?;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let engine = wasmbox_integration::test_engine();
        let first = wasmbox_integration::first_call_source(&engine);
        assert_eq!(
            r.header("x-wasmbox-module-source"),
            Some(first),
            "the first call waited for its compile or was interpreted"
        );
        assert_eq!(s.until_native(path).await?.status, StatusCode::OK);
    }
    let mut worker_uids = BTreeSet::new();
    for pid in s.worker_pids() {
        let ids = uids(pid);
        assert!(ids.iter().all(|&u| u == ids[0]), "real, effective, saved and fs uid agree: {ids:?}");
        assert!((3_100_000..3_100_002).contains(&ids[0]), "a slot's uid from the range: {ids:?}");
        worker_uids.insert(ids[0]);
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))?;
        assert_eq!(cwd, Path::new("/"), "a worker sits in no cache directory");
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))?;
        assert!(!cmdline.contains("--cache-dir"), "a worker is told no cache path: {cmdline:?}");
    }
    assert_eq!(worker_uids.len(), 2, "two slots, two uids: {worker_uids:?}");
    // Everything in the store and staging belongs to the supervisor: no worker or compiler
    // uid owns or can write any of it, and none has a path to it, every directory being
    // closed to others (a worker reads an artifact only through the descriptor it is given).
    let files = walk(cache.path());
    let artifact = |p: &PathBuf| p.extension().is_some_and(|e| e == "cwasm" || e == "so");
    if !wasmbox_integration::test_engine().contains("wasmedge") || files.iter().any(artifact) {
        assert!(files.iter().any(artifact), "artifacts were stored: {files:?}");
    }
    for path in &files {
        let meta = std::fs::symlink_metadata(path)?;
        assert_eq!(meta.uid(), 0, "{} belongs to the supervisor", path.display());
        assert_eq!(meta.mode() & 0o022, 0, "{} is writable by its owner only", path.display());
        if meta.is_dir() {
            assert_eq!(meta.mode() & 0o077, 0, "directory {} is closed to other users", path.display());
        }
    }
    for pid in s.worker_pids() {
        let store = cache.path().join("artifacts");
        let uid = uids(pid)[0];
        // The kernel's own check for that uid: no search permission on the store.
        let meta = std::fs::metadata(&store)?;
        assert!(meta.uid() != uid && meta.mode() & 0o001 == 0, "uid {uid} cannot enter {}", store.display());
    }
    // A compile process's uid is the one after the workers' and was never a worker's.
    let log = s.logs();
    assert!(log.contains("uid per slot(3100000..=3100002"), "the range is logged: {log}");
    Ok(())
}

#[tokio::test]
async fn a_stored_artifact_is_loaded_only_as_the_supervisors_record_says() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let hello = std::fs::read(function_wasm("hello"))?;
    // Two tenants with the same bytes: two compiles, two records.
    let start = || {
        Supervisor::builder()
            .workers(1)
            .module("a", hello.clone())
            .module("b", hello.clone())
            .env("WASMBOX_CACHE_DIR", cache.path().display())
            .start()
    };
    let source = |r: &wasmbox_integration::Reply| r.header("x-wasmbox-module-source").map(str::to_owned);
    {
        let s = start()?;
        let first = wasmbox_integration::first_call_source(&wasmbox_integration::test_engine());
        for f in ["/a", "/b"] {
            let r = s.get(f).await?;
            assert_eq!((r.status, source(&r).as_deref()), (StatusCode::OK, Some(first)), "{}", r.text());
            s.until_native(f).await?;
        }
        assert_eq!(s.get("/stats").await?.json()["compiler"]["compiles"], 2);
    }
    // Untouched, a restart loads both from the store, compiling nothing.
    {
        let s = start()?;
        for f in ["/a", "/b"] {
            let r = s.get(f).await?;
            assert_eq!((r.status, source(&r).as_deref()), (StatusCode::OK, Some("artifact")), "{}", r.text());
        }
        let compiler = s.get("/stats").await?.json()["compiler"].clone();
        assert_eq!((compiler["compiles"].as_u64(), compiler["refused_artifacts"].as_u64()), (Some(0), Some(0)));
    }
    // a's artifact corrupted in place (same size); b's replaced by a's with a's record: a
    // foreign artifact. Neither is loaded: both are compiled again.
    let (a, b) = (stored(cache.path(), "a"), stored(cache.path(), "b"));
    let mut bytes = std::fs::read(&a)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::copy(&a, &b)?;
    let record = |p: &Path| PathBuf::from(format!("{}.json", p.display()));
    std::fs::copy(record(&a), record(&b))?;
    std::fs::write(&a, &bytes)?;
    {
        let s = start()?;
        let first = wasmbox_integration::first_call_source(&wasmbox_integration::test_engine());
        for f in ["/a", "/b"] {
            let r = s.get(f).await?;
            assert_eq!((r.status, source(&r).as_deref()), (StatusCode::OK, Some(first)), "{f}: {}", r.text());
            assert_eq!(r.text(), "Hello from WasmBox!\n");
            s.until_native(f).await?;
        }
        let compiler = s.get("/stats").await?.json()["compiler"].clone();
        assert_eq!((compiler["compiles"].as_u64(), compiler["refused_artifacts"].as_u64()), (Some(2), Some(2)));
        let log = s.logs();
        assert!(log.contains("recorded digest"), "the corrupt one is named: {log}");
        assert!(log.contains("the record is for another artifact"), "the foreign one is named: {log}");
    }
    Ok(())
}

/// `hello` with a custom section that makes a debug compile process with test hooks hang.
fn hanging_module() -> Vec<u8> {
    let mut wasm = std::fs::read(function_wasm("hello")).unwrap();
    let name = b"wasmbox-test-compile-hang";
    wasm.extend([0u8, (name.len() + 1) as u8, name.len() as u8]);
    wasm.extend(name);
    wasm
}

#[tokio::test]
async fn a_hung_or_killed_compile_costs_only_its_own_request() -> anyhow::Result<()> {
    // Requests that wait for their compile: on Wasmtime. WasmEdge's first calls do not
    // wait (they are interpreted), which the conformance suite checks.
    let s = std::sync::Arc::new(
        Supervisor::builder()
            .engine("wasmtime")
            .workers(2)
            .function("hello")
            .module("stuck", hanging_module())
            .env("WASMBOX_TEST_HOOKS", 1)
            .env("WASMBOX_COMPILE_TIMEOUT_MS", 1500)
            .env("WASMBOX_COMPILERS", 2)
            .start()?,
    );
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    // Hung: the compile is stopped at the compile timeout, and that request alone fails.
    let hung = tokio::spawn({
        let s = s.clone();
        async move { s.get("/stuck").await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.compile_pids().is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "no compile process started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its output is bounded on disk too: RLIMIT_FSIZE is the largest artifact the store
    // takes (32 x WASMBOX_MAX_MODULE_BYTES, at most 2 GiB), not the workers' 4 GiB.
    // (Once it has locked itself down: it hangs after that, before compiling.)
    let pid = s.compile_pids()[0];
    let fsize = || {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        limits.lines().find(|l| l.starts_with("Max file size")).unwrap_or_default().to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while fsize().split_whitespace().nth(3) != Some("2147483648") {
        anyhow::ensure!(Instant::now() < deadline, "compile process RLIMIT_FSIZE: {}", fsize());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = s.get("/hello").await?;
    assert_eq!(r.status, StatusCode::OK, "others are served while a compile hangs: {}", r.text());
    let r = tokio::time::timeout(Duration::from_secs(20), hung).await???;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::GATEWAY_TIMEOUT, "compile_timeout"), "{}", r.text());
    // Killed: the request gets 502 compile_failed naming the signal; nothing is left.
    let killed = tokio::spawn({
        let s = s.clone();
        async move { s.get("/stuck").await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(&pid) = s.compile_pids().first() {
            break pid;
        }
        anyhow::ensure!(Instant::now() < deadline, "no second compile process started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
    let r = tokio::time::timeout(Duration::from_secs(20), killed).await???;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_GATEWAY, "compile_failed"), "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap_or_default().contains("SIGKILL"), "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.compile_pids().is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "compile processes left: {:?}", s.compile_pids());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    let stats = s.get("/stats").await?.json();
    assert_eq!(stats["pool"]["exits"]["crash"], 0, "no worker paid for the compiler: {stats}");
    assert_eq!(stats["compiler"]["failures"], 2, "{stats}");
    Ok(())
}

/// A client that goes away while its module compiles takes nothing with it: the compile
/// process is stopped and the compiler slot is free for the next module.
#[tokio::test]
async fn a_client_that_leaves_during_its_compile_leaves_the_compiler_usable() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    // A request that waits for its compile: Wasmtime (see the test above).
    let s = Supervisor::builder()
        .engine("wasmtime")
        .env("WASMBOX_CACHE_DIR", cache.path().display())
        .workers(1)
        .function("hello")
        .module("stuck", hanging_module())
        .env("WASMBOX_TEST_HOOKS", 1)
        .env("WASMBOX_COMPILERS", 1)
        .start()?;
    s.wait_pool_full(1, Duration::from_secs(10)).await?;
    for _ in 0..3 {
        // Gone long before the (60 s) compile timeout.
        let gone = tokio::time::timeout(Duration::from_millis(300), s.get("/stuck")).await;
        assert!(gone.is_err(), "the hanging compile answered: {gone:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.compile_pids().is_empty() {
            anyhow::ensure!(Instant::now() < deadline, "the compile outlived its request: {:?}", s.compile_pids());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let r = tokio::time::timeout(Duration::from_secs(30), s.get("/hello")).await??;
    assert_eq!((r.status, r.header("x-wasmbox-module-source")), (StatusCode::OK, Some("compiled")), "{}", r.text());
    Ok(())
}
