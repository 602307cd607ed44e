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
