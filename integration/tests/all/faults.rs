//! Fault containment and lifecycle: dead workers, overload, graceful and hard shutdown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use nix::sys::signal::Signal;
use wasmbox_integration::{Supervisor, start_time, wait_busy, wait_gone};

#[tokio::test]
async fn killed_worker_costs_one_502_and_the_pool_refills_within_a_second() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(2).function("cpu-spin").function("hello").start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    let before = s.worker_pids();
    // Run the long invocation concurrently with finding and killing its worker.
    let long = s.request(Method::GET, "/cpu-spin?arg=5000", &[], Bytes::new());
    let killer = async {
        // The busy worker is the one accruing CPU time.
        let pid = wait_busy(&before, 1, Duration::from_secs(10)).await?[0];
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
        anyhow::Ok((pid, Instant::now()))
    };
    let (reply, killed) = tokio::join!(long, killer);
    let (victim, killed_at) = killed?;
    let reply = reply?;
    assert_eq!((reply.status, reply.kind().as_str()), (StatusCode::BAD_GATEWAY, "worker_died"), "{}", reply.text());
    assert!(reply.json()["message"].as_str().unwrap().contains("SIGKILL"), "{}", reply.text());
    s.wait_pool_full(2, Duration::from_secs(1).saturating_sub(killed_at.elapsed())).await?;
    let after = s.worker_pids();
    assert!(!after.contains(&victim), "victim {victim} replaced: {after:?}");
    assert_eq!(s.get("/hello").await?.status, StatusCode::OK);
    assert_eq!(s.get("/ready").await?.json()["pool"]["restarts"], 1);
    Ok(())
}

#[tokio::test]
async fn two_hundred_concurrent_requests_on_two_workers_lose_none() -> anyhow::Result<()> {
    let s = std::sync::Arc::new(
        Supervisor::builder().workers(2).function("cpu-spin").env("WASMBOX_QUEUE_DEPTH", 64).start()?,
    );
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.get("/cpu-spin?arg=5").await }));
    }
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(60), t).await???;
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(r.kind(), "queue_full");
                assert_eq!(r.header("retry-after"), Some("1"));
                full += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!(ok + full, 200, "every request got exactly one answer");
    assert!(ok >= 66, "at least the workers plus the queue were served: ok={ok} full={full}");
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_in_flight_invocations_and_exits_zero() -> anyhow::Result<()> {
    let mut s = Supervisor::builder().workers(2).function("cpu-spin").start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    let workers: Vec<(i32, u64)> = s.worker_pids().into_iter().filter_map(|p| Some((p, start_time(p)?))).collect();
    assert_eq!(workers.len(), 2);
    let client = s.client();
    let mut inflight = Vec::new();
    for _ in 0..4 {
        let c = client.clone();
        inflight.push(tokio::spawn(async move { c.get("/cpu-spin?arg=700").await }));
    }
    // Wait until both workers are running before asking the supervisor to stop.
    let pids: Vec<i32> = workers.iter().map(|(p, _)| *p).collect();
    wait_busy(&pids, 2, Duration::from_secs(10)).await?;
    s.signal(Signal::SIGTERM)?;
    for t in inflight {
        let r = t.await??;
        assert_eq!(r.status, StatusCode::OK, "in-flight and queued invocations complete: {}", r.text());
    }
    let status = s.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0), "logs:\n{}", s.logs());
    wait_gone(&workers, Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test]
async fn sigkill_of_the_supervisor_leaves_no_worker_behind() -> anyhow::Result<()> {
    let mut s = Supervisor::builder().workers(3).function("cpu-spin").start()?;
    s.wait_pool_full(3, Duration::from_secs(10)).await?;
    let workers: Vec<(i32, u64)> = s.worker_pids().into_iter().filter_map(|p| Some((p, start_time(p)?))).collect();
    assert_eq!(workers.len(), 3);
    // One of them busy in a guest, the others idle: all must go.
    let c = s.client();
    let busy = tokio::spawn(async move { c.get("/cpu-spin?arg=10000").await });
    let pids: Vec<i32> = workers.iter().map(|(p, _)| *p).collect();
    wait_busy(&pids, 1, Duration::from_secs(10)).await?;
    s.signal(Signal::SIGKILL)?;
    s.wait_exit(Duration::from_secs(5)).await?;
    wait_gone(&workers, Duration::from_secs(5)).await?;
    assert!(busy.await?.is_err(), "the connection died with the supervisor");
    Ok(())
}

#[tokio::test]
async fn sigterm_while_the_pool_starts_is_a_clean_stop() -> anyhow::Result<()> {
    // Workers that take a second to start: the signal arrives while the supervisor waits
    // for their hello, before it listens. It must stop cleanly once started (exit 0,
    // "stopped"), not die by the signal's default action and leave cgroups behind.
    let dir = tempfile::tempdir()?;
    let slow = dir.path().join("slow-worker");
    let (_, worker) = wasmbox_integration::built();
    std::fs::write(&slow, format!("#!/bin/sh\nsleep 1\nexec '{}' \"$@\"\n", worker.display()))?;
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut s =
        Supervisor::builder().workers(1).function("hello").env("WASMBOX_WORKER_BIN", slow.display()).start_unready()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.logs().contains("starting worker pool") {
        anyhow::ensure!(Instant::now() < deadline, "the supervisor did not start its pool:\n{}", s.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.signal(Signal::SIGTERM)?;
    let status = s.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0), "{status:?}, logs:\n{}", s.logs());
    assert!(s.logs().contains("stopped"), "{}", s.logs());
    Ok(())
}

#[tokio::test]
async fn drain_timeout_answers_unfinished_invocations_with_503() -> anyhow::Result<()> {
    let mut s = Supervisor::builder()
        .workers(1)
        .function("cpu-spin")
        .env("WASMBOX_DRAIN_TIMEOUT_MS", 300)
        .env("WASMBOX_KILL_GRACE_MS", 100)
        .start()?;
    s.wait_pool_full(1, Duration::from_secs(10)).await?;
    let worker: Vec<(i32, u64)> = s.worker_pids().into_iter().filter_map(|p| Some((p, start_time(p)?))).collect();
    let c = s.client();
    let long = tokio::spawn(async move { c.get("/cpu-spin?arg=20000").await });
    wait_busy(&[worker[0].0], 1, Duration::from_secs(10)).await?;
    s.signal(Signal::SIGTERM)?;
    let r = long.await??;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"), "{}", r.text());
    let status = s.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Some(0), "logs:\n{}", s.logs());
    wait_gone(&worker, Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test]
async fn workers_are_recycled_after_max_invocations() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(1).env("WASMBOX_WORKER_MAX_INVOCATIONS", 3).function("hello").start()?;
    let mut workers = Vec::new();
    for _ in 0..7 {
        let r = s.get("/hello").await?;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        workers.push(r.header("x-wasmbox-worker").unwrap_or_default().to_owned());
    }
    // Three invocations per worker process, then a fresh one in the same slot.
    assert_eq!(workers[0], workers[2]);
    assert_ne!(workers[2], workers[3]);
    assert_eq!(workers[3], workers[5]);
    assert_ne!(workers[5], workers[6]);
    assert!(workers.iter().all(|w| w.starts_with("0.")), "{workers:?}");
    Ok(())
}
