//! What operators rely on: resource-aware readiness, the separate health listener.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use http::StatusCode;
use wasmbox_integration::{Client, Supervisor, skip_without_cgroups};

/// Polls /ready until `want` (and, when given, `reason` among its reasons) or the deadline.
async fn wait_ready(client: &Client, want: bool, reason: Option<&str>, within: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let r = client.get("/ready").await?;
        let body = r.json();
        let has_reason =
            reason.is_none_or(|want| body["reasons"].as_array().is_some_and(|a| a.iter().any(|r| r == want)));
        if body["ready"] == want && has_reason {
            let code = if want { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            ensure!(r.status == code, "/ready {} with body {body}", r.status);
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("/ready did not become {want} ({reason:?}) within {within:?}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Value = serde_json::Value;

#[tokio::test]
async fn readiness_turns_503_while_the_queue_stays_long_and_200_when_it_drains() -> anyhow::Result<()> {
    let s = Supervisor::builder()
        .workers(1)
        .function("cpu-spin")
        .env("WASMBOX_READY_QUEUE_THRESHOLD", 2)
        .env("WASMBOX_READY_WINDOW_MS", 600)
        .env("WASMBOX_READY_INTERVAL_MS", 100)
        .start()?;
    let client = s.client();
    s.wait_pool_full(1, Duration::from_secs(30)).await?;
    let idle = wait_ready(&client, true, None, Duration::from_secs(10)).await?;
    assert_eq!(idle["load"]["queue_threshold"], 2, "{idle}");
    // Warm the module so the queued requests each take the spin time, not a compile.
    assert_eq!(client.get("/cpu-spin?arg=1").await?.status, StatusCode::OK);

    // One running and four waiting for 2.5 s each: the queue's mean passes 2.
    let load: Vec<_> = (0..5)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get("/cpu-spin?arg=1500").await })
        })
        .collect();
    let overloaded = wait_ready(&client, false, Some("queue"), Duration::from_secs(5)).await?;
    assert!(overloaded["load"]["queue_mean"].as_f64().unwrap() >= 2.0, "{overloaded}");
    let metrics = client.get("/metrics").await?.text();
    assert!(metrics.contains("wasmbox_ready 0"), "{metrics}");

    for r in load {
        assert_eq!(r.await??.status, StatusCode::OK, "queued requests still run");
    }
    let recovered = wait_ready(&client, true, None, Duration::from_secs(5)).await?;
    assert_eq!(recovered["reasons"].as_array().map(Vec::len), Some(0), "{recovered}");
    assert!(client.get("/metrics").await?.text().contains("wasmbox_ready 1"));
    assert!(s.logs().contains("overloaded: /ready answers 503"), "{}", s.logs());
    Ok(())
}

/// A v1 memory cgroup of its own for one test, removed when dropped (after the supervisor
/// in it has exited).
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    fn create(name: &str, limit: u64) -> anyhow::Result<Option<MemoryCgroup>> {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
        let Some(own) = cgroup.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned())) else {
            return Ok(None);
        };
        let dir = PathBuf::from("/sys/fs/cgroup/memory").join(own.trim_start_matches('/')).join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string())?;
        Ok(Some(MemoryCgroup { dir }))
    }

    fn set_limit(&self, limit: u64) -> anyhow::Result<()> {
        Ok(std::fs::write(self.dir.join("memory.limit_in_bytes"), limit.to_string())?)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cannot remove {}", self.dir.display());
    }
}

#[tokio::test]
async fn readiness_follows_the_memory_of_the_supervisors_cgroup() -> anyhow::Result<()> {
    if skip_without_cgroups("readiness_follows_the_memory_of_the_supervisors_cgroup") {
        return Ok(());
    }
    let name = format!("wasmbox-ready-test-{}", std::process::id());
    let Some(cgroup) = MemoryCgroup::create(&name, 1 << 30)? else {
        // cgroup v2 hosts: the memory source is covered by the fixture tests.
        eprintln!("SKIPPED readiness_follows_the_memory_of_the_supervisors_cgroup: no cgroup v1 memory hierarchy");
        return Ok(());
    };
    let mut s = Supervisor::builder()
        .workers(1)
        .function("alloc")
        .in_cgroups(vec![cgroup.dir.join("cgroup.procs")])
        .env("WASMBOX_READY_MEMORY_PERCENT", 25)
        .env("WASMBOX_READY_WINDOW_MS", 500)
        .env("WASMBOX_READY_INTERVAL_MS", 100)
        .start()?;
    let client = s.client();
    s.wait_pool_full(1, Duration::from_secs(30)).await?;
    let idle = wait_ready(&client, true, None, Duration::from_secs(10)).await?;
    assert_eq!(idle["load"]["memory"]["limit_bytes"], 1u64 << 30, "the supervisor's own cgroup is read: {idle}");
    assert!(idle["load"]["memory_utilization"].as_f64().unwrap() < 0.25, "{idle}");

    // A function holding 400 MiB for 3 s: 40% of the container's 1 GiB, over the 25%.
    let hold = {
        let c = client.clone();
        tokio::spawn(async move {
            c.request(http::Method::GET, "/alloc?arg=400&arg=3000", &[("memory-request", "512")], bytes::Bytes::new())
                .await
        })
    };
    let overloaded = wait_ready(&client, false, Some("memory"), Duration::from_secs(3)).await?;
    assert!(overloaded["load"]["memory_utilization"].as_f64().unwrap() > 0.25, "{overloaded}");
    let metrics = client.get("/metrics").await?.text();
    assert!(metrics.contains("wasmbox_memory_limit_bytes 1073741824"), "{metrics}");
    let r = hold.await??;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The guest's memory is returned when the invocation ends: ready again.
    wait_ready(&client, true, None, Duration::from_secs(5)).await?;

    // A lower limit makes the same use too much: the limit, not a fixed size, is 100%.
    let calm = client.get("/ready").await?.json();
    let in_use = calm["load"]["memory"]["working_set_bytes"].as_u64().context("working set")?;
    let tight_limit = (in_use * 2).max(8 << 20);
    cgroup.set_limit(tight_limit)?;
    let tight = wait_ready(&client, false, Some("memory"), Duration::from_secs(3)).await?;
    assert_eq!(tight["load"]["memory"]["limit_bytes"], tight_limit, "{tight}");
    cgroup.set_limit(1 << 30)?;
    wait_ready(&client, true, None, Duration::from_secs(3)).await?;

    s.signal(nix::sys::signal::Signal::SIGTERM)?;
    s.wait_exit(Duration::from_secs(20)).await?;
    Ok(())
}

#[tokio::test]
async fn the_health_listener_serves_only_health_endpoints() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(1).function("hello").env("WASMBOX_HEALTH_LISTEN", "127.0.0.1:0").start()?;
    let health = Client { addr: s.health_addr().context("health address in the log")? };
    assert_ne!(health.addr, s.addr);
    assert_eq!(health.get("/healthz").await?.status, StatusCode::OK);
    s.wait_pool_full(1, Duration::from_secs(30)).await?;
    let ready = health.get("/ready").await?;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    let metrics = health.get("/metrics").await?;
    assert!(metrics.text().contains("wasmbox_ready 1"), "{}", metrics.text());
    // No invocations, no stats, no admin there.
    for path in ["/hello", "/stats", "/admin/functions"] {
        let r = health.get(path).await?;
        assert_eq!((r.status, r.kind().as_str()), (StatusCode::NOT_FOUND, "not_found"), "{path}");
    }
    // The main listener still serves everything.
    assert_eq!(s.get("/ready").await?.status, StatusCode::OK);
    assert_eq!(s.get("/hello").await?.text(), "Hello from WasmBox!\n");
    Ok(())
}
