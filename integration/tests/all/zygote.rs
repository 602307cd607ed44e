//! The zygote: workers are forked from one sandboxed process, as children of the
//! supervisor; if it dies it is started again and the pool keeps serving.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::StatusCode;
use nix::sys::signal::Signal;
use wasmbox_integration::Supervisor;

fn status(pid: i32) -> HashMap<String, String> {
    wasmbox_integration::proc_status(pid)
}

fn parent(pid: i32) -> i32 {
    procfs::process::Process::new(pid).and_then(|p| p.stat()).map(|s| s.ppid).unwrap_or(0)
}

#[tokio::test]
async fn workers_are_forked_from_a_sandboxed_zygote_as_children_of_the_supervisor() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(2).function("hello").start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    let zygote = s.zygote_pid().expect("a zygote runs");
    assert_eq!(parent(zygote), s.pid());
    for pid in s.worker_pids() {
        assert_eq!(parent(pid), s.pid(), "a forked worker is the supervisor's child, not the zygote's");
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))?;
        assert!(cmdline.contains("forked by the zygote"), "{cmdline:?}");
    }
    let stats = s.get("/stats").await?.json();
    assert_eq!(stats["pool"]["exec_spawns"], 0, "every worker came from the zygote: {stats}");
    let z = status(zygote);
    assert_eq!(z["NoNewPrivs"], "1", "{z:?}");
    assert_eq!(z["Seccomp"], "2", "{z:?}");
    if nix::unistd::geteuid().is_root() {
        // setgid (6), setuid (7), sys_admin (21): all it keeps for its children.
        let keep = format!("{:016x}", (1u64 << 6) | (1 << 7) | (1 << 21));
        assert_eq!((z["CapEff"].as_str(), z["CapBnd"].as_str()), (keep.as_str(), keep.as_str()), "{z:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_killed_zygote_is_started_again_and_the_pool_keeps_serving() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(2).function("hello").function("cpu-spin").start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    let zygote = s.zygote_pid().expect("a zygote runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygote), Signal::SIGKILL)?;
    // The workers do not depend on it: they keep serving.
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    // A worker that dies needs a new process: the next zygote forks it.
    let victim = s.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pool = s.get("/stats").await?.json()["pool"].clone();
        if pool["restarts"] == 1 && pool["live"] == 2 {
            assert_eq!(pool["zygote_restarts"], 1, "{pool}");
            assert_eq!(pool["exec_spawns"], 0, "the new zygote forked the replacement: {pool}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the pool did not recover: {pool}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    let again = s.zygote_pid().expect("a zygote runs again");
    assert_ne!(again, zygote);
    assert!(!s.worker_pids().contains(&victim));
    for _ in 0..4 {
        assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    }
    let metrics = s.get("/metrics").await?.text();
    assert!(metrics.contains("wasmbox_zygote_restarts_total 1"), "{metrics}");
    Ok(())
}

#[tokio::test]
async fn without_the_zygote_every_worker_is_started_by_exec() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(2).function("hello").env("WASMBOX_ZYGOTE", "false").start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    assert_eq!(s.zygote_pid(), None, "no zygote runs");
    for pid in s.worker_pids() {
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))?;
        assert!(cmdline.contains("--slot") && !cmdline.contains("forked"), "{cmdline:?}");
        assert_eq!(parent(pid), s.pid());
    }
    // A replaced worker is exec'd again, into its slot's cgroup as before.
    let victim = s.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL)?;
    // Gone first (a signal takes a moment to land), then the slot full again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.worker_pids().contains(&victim) {
        anyhow::ensure!(Instant::now() < deadline, "worker {victim} survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    let pool = s.get("/stats").await?.json()["pool"].clone();
    assert_eq!((pool["exec_spawns"].as_u64(), pool["zygote_restarts"].as_u64()), (Some(0), Some(0)), "{pool}");
    Ok(())
}

/// A module that prints the byte at 30000 of its memory as a digit and then increments it:
/// a fresh instance prints 0 every time.
fn remember() -> Vec<u8> {
    wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
              (i32.store8 (i32.const 100) (i32.add (i32.const 48) (i32.load8_u (i32.const 30000))))
              (i32.store8 (i32.const 30000) (i32.add (i32.const 1) (i32.load8_u (i32.const 30000))))
              (i32.store (i32.const 0) (i32.const 100))
              (i32.store (i32.const 4) (i32.const 1))
              (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .expect("valid wat")
}

/// The pagemap descriptors a process holds, by what they name.
fn pagemaps(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|target| target.display().to_string())
        .filter(|target| target.ends_with("/pagemap"))
        .collect()
}

/// The engine comes made from the zygote, with the descriptor through which it asks the
/// kernel which guest pages were written. A forked worker reading the zygote's pages
/// there would see none written and skip resetting its guest's memory: each worker holds
/// its own, and every invocation starts from a fresh memory, also with the worker's
/// descriptors not closed (the zygote's would then survive in it).
#[tokio::test]
async fn a_forked_worker_asks_about_its_own_pages_and_each_invocation_gets_fresh_memory() -> anyhow::Result<()> {
    for close_fds in ["true", "false"] {
        let s = Supervisor::builder()
            .workers(1)
            .module("remember", remember())
            .env("WASMBOX_WORKER_CLOSE_FDS", close_fds)
            .start()?;
        for i in 0..4 {
            let r = s.get("/remember").await?;
            assert_eq!((r.status, r.text()), (StatusCode::OK, "0".to_string()), "call {i}, close_fds={close_fds}");
        }
        // Read as root: the workers are not dumpable. WasmEdge's engine is made in each
        // worker and holds no pagemap.
        if nix::unistd::geteuid().is_root() && wasmbox_integration::test_engine() == "wasmtime" {
            let zygote = s.zygote_pid().expect("a zygote runs");
            assert_eq!(pagemaps(zygote), [format!("/proc/{zygote}/pagemap")], "the zygote made the engine");
            for pid in s.worker_pids() {
                assert_eq!(pagemaps(pid), [format!("/proc/{pid}/pagemap")], "worker {pid}, close_fds={close_fds}");
            }
        }
    }
    Ok(())
}
