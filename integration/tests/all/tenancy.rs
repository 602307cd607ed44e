//! Tenants: a worker process runs one tenant's code for its whole life (WASMBOX_TENANCY).

use std::time::Duration;

use http::StatusCode;
use wasmbox_integration::Supervisor;

/// The worker (slot.generation) that answered: a new generation is a new process.
async fn served_by(s: &Supervisor, path: &str) -> anyhow::Result<String> {
    let reply = s.post(path, "x").await?;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    Ok(reply.header("x-wasmbox-worker").expect("worker header").to_owned())
}

/// Waits until `/stats` satisfies `done`; returns the last stats seen.
async fn stats_until(
    s: &Supervisor,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let stats = s.get("/stats").await?.json();
        if done(&stats) || tokio::time::Instant::now() >= deadline {
            return Ok(stats);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_worker_runs_a_then_b_then_a_in_three_processes_and_a_twice_in_one() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(1).function("hello").function("echo").start()?;
    let a1 = served_by(&s, "/hello").await?;
    let a2 = served_by(&s, "/hello").await?;
    assert_eq!(a1, a2, "the same tenant twice keeps its worker");
    let b = served_by(&s, "/echo").await?;
    let a3 = served_by(&s, "/hello").await?;
    assert!(a1 != b && b != a3 && a1 != a3, "A, B, A ran in three processes: {a1} {b} {a3}");
    let stats = s.get("/stats").await?.json();
    let pool = &stats["pool"];
    assert_eq!(pool["exits"]["tenant_switch"], 2, "{pool}");
    assert_eq!(pool["exits"]["crash"], 0, "{pool}");
    // The spare the pool started with, then the two recycled slots.
    assert_eq!(pool["tenant_switches"], 3, "{pool}");
    assert_eq!(stats["functions"]["hello"]["tenant"], "hello", "{stats}");
    assert_eq!(stats["functions"]["echo"]["tenant"], "echo", "{stats}");
    let metrics = s.get("/metrics").await?.text();
    assert!(metrics.contains("wasmbox_tenant_switches_total 3"), "{metrics}");
    assert!(metrics.contains("wasmbox_worker_exits_total{reason=\"tenant_switch\"} 2"), "{metrics}");
    Ok(())
}

#[tokio::test]
async fn functions_that_name_one_tenant_share_its_workers() -> anyhow::Result<()> {
    let s = Supervisor::builder()
        .workers(1)
        .function("hello")
        .function("echo")
        .file("hello.toml", "tenant = \"acme\"\n")
        .file("echo.toml", "tenant = \"acme\"\n")
        .env("WASMBOX_ADMIN_TOKEN", "tenancy-admin-t0ken")
        .start()?;
    let a1 = served_by(&s, "/hello").await?;
    let b = served_by(&s, "/echo").await?;
    let a2 = served_by(&s, "/hello").await?;
    assert!(a1 == b && b == a2, "one tenant, one process: {a1} {b} {a2}");
    let described = s
        .request(
            http::Method::GET,
            "/admin/functions/echo",
            &[("authorization", "Bearer tenancy-admin-t0ken")],
            Default::default(),
        )
        .await?;
    assert_eq!(described.json()["tenant"], "acme", "{}", described.text());
    let stats = s.get("/stats").await?.json();
    assert_eq!(stats["pool"]["exits"]["tenant_switch"], 0, "{stats}");
    assert_eq!(stats["functions"]["echo"]["tenant"], "acme", "{stats}");
    Ok(())
}

#[tokio::test]
async fn shared_tenancy_runs_every_function_in_the_same_worker() -> anyhow::Result<()> {
    let s =
        Supervisor::builder().workers(1).function("hello").function("echo").env("WASMBOX_TENANCY", "shared").start()?;
    let a1 = served_by(&s, "/hello").await?;
    let b = served_by(&s, "/echo").await?;
    let a2 = served_by(&s, "/hello").await?;
    assert!(a1 == b && b == a2, "shared tenancy keeps the worker: {a1} {b} {a2}");
    let pool = s.get("/stats").await?.json()["pool"].clone();
    assert_eq!(
        (pool["exits"]["tenant_switch"].as_u64(), pool["tenant_switches"].as_u64()),
        (Some(0), Some(0)),
        "{pool}"
    );
    Ok(())
}

#[tokio::test]
async fn a_spare_takes_a_new_tenant_and_the_pool_replenishes_spares_from_idle_tenants() -> anyhow::Result<()> {
    let s = Supervisor::builder().workers(3).function("hello").function("echo").function("exit-code").start()?;
    s.wait_pool_full(3, Duration::from_secs(10)).await?;
    // Three clean workers; two tenants take one each and one spare is left.
    let a = served_by(&s, "/hello").await?;
    let b = served_by(&s, "/echo").await?;
    assert_ne!(a, b);
    let stats = s.get("/stats").await?.json();
    assert_eq!(
        (stats["pool"]["spares"].as_u64(), stats["pool"]["exits"]["tenant_switch"].as_u64()),
        (Some(1), Some(0))
    );
    // A third tenant takes the last spare; the least recently used idle worker (A's) is
    // recycled in the background so a spare is ready for the next new tenant.
    let c = served_by(&s, "/exit-code?arg=0").await?;
    let stats =
        stats_until(&s, Duration::from_secs(10), |st| st["pool"]["spares"] == 1 && st["pool"]["live"] == 3).await?;
    assert_eq!(stats["pool"]["spares"], 1, "{stats}");
    assert_eq!(stats["pool"]["exits"]["tenant_switch"], 1, "{stats}");
    // B's and C's workers were kept: they still answer from the same processes.
    assert_eq!(served_by(&s, "/echo").await?, b);
    assert_eq!(served_by(&s, "/exit-code?arg=0").await?, c);
    // A comes back to the spare, not to its old (recycled) process.
    let a_again = served_by(&s, "/hello").await?;
    assert!(a_again != a && a_again != b && a_again != c, "{a} {b} {c} -> {a_again}");
    Ok(())
}

#[tokio::test]
async fn a_spare_taken_is_replaced_at_once_from_another_tenant_and_never_from_the_taker() -> anyhow::Result<()> {
    // Idle time alone would make no spare for ten minutes: what happens here is the
    // replacement of a spare that was taken.
    let s = Supervisor::builder()
        .workers(2)
        .function("hello")
        .function("echo")
        .env("WASMBOX_SPARE_AFTER_IDLE_MS", "600000")
        .start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    // Two clean workers, one kept spare: A takes the first.
    let a = served_by(&s, "/hello").await?;
    let stats = s.get("/stats").await?.json();
    assert_eq!(stats["pool"]["spares"], 1, "{stats}");
    // A again, while its worker is idle: its own worker, the spare stays.
    assert_eq!(served_by(&s, "/hello").await?, a);
    // B takes the spare; A's idle worker is recycled into the next spare right away.
    let b = served_by(&s, "/echo").await?;
    assert_ne!(a, b);
    let stats =
        stats_until(&s, Duration::from_secs(10), |st| st["pool"]["spares"] == 1 && st["pool"]["live"] == 2).await?;
    assert_eq!(
        (stats["pool"]["spares"].as_u64(), stats["pool"]["exits"]["tenant_switch"].as_u64()),
        (Some(1), Some(1)),
        "{stats}"
    );
    // B's worker was not the one recycled.
    assert_eq!(served_by(&s, "/echo").await?, b);
    // A finds the spare, and B's idle worker becomes the next one.
    let a_again = served_by(&s, "/hello").await?;
    assert!(a_again != a && a_again != b, "{a} {b} -> {a_again}");
    let stats = stats_until(&s, Duration::from_secs(10), |st| st["pool"]["exits"]["tenant_switch"] == 2).await?;
    assert_eq!(stats["pool"]["exits"]["tenant_switch"], 2, "{stats}");
    Ok(())
}

#[tokio::test]
async fn one_busy_tenant_keeps_every_worker_it_took_from_the_spares() -> anyhow::Result<()> {
    let s =
        Supervisor::builder().workers(2).function("cpu-spin").env("WASMBOX_SPARE_AFTER_IDLE_MS", "600000").start()?;
    s.wait_pool_full(2, Duration::from_secs(10)).await?;
    // Two invocations at once: the second takes the spare.
    let (one, two) = tokio::join!(s.post("/cpu-spin?arg=300", ""), s.post("/cpu-spin?arg=300", ""));
    let (one, two) = (one?, two?);
    assert_eq!((one.status, two.status), (StatusCode::OK, StatusCode::OK));
    assert_ne!(one.header("x-wasmbox-worker"), two.header("x-wasmbox-worker"), "the two ran at once");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // With no other tenant to take a spare from, none is made from this one's workers.
    let stats = s.get("/stats").await?.json();
    assert_eq!(
        (stats["pool"]["spares"].as_u64(), stats["pool"]["exits"]["tenant_switch"].as_u64()),
        (Some(0), Some(0)),
        "{stats}"
    );
    Ok(())
}
