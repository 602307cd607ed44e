//! Behind a real load balancer: Debian's nginx in front of two supervisors on loopback,
//! with the configuration deployment/README.md gives operators. One supervisor is
//! overloaded and then sent SIGTERM; every client request still succeeds, served by the
//! other, and the per-invocation headers reach the supervisors intact.

use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use http::{Method, StatusCode};
use wasmbox_integration::load::Load;
use wasmbox_integration::nginx::{Nginx, free_port};
use wasmbox_integration::{Client, Supervisor};

#[tokio::test]
async fn traffic_moves_off_an_overloaded_then_stopping_replica_without_failed_requests() -> anyhow::Result<()> {
    // A: one worker and a queue of one, so it overloads (429) quickly. B: room to spare.
    let mut a = Supervisor::builder()
        .workers(1)
        .function("cpu-spin")
        .function("alloc")
        .env("WASMBOX_QUEUE_DEPTH", 1)
        .env("WASMBOX_DRAIN_TIMEOUT_MS", 20_000)
        .start()?;
    let b = Supervisor::builder()
        .workers(2)
        .function("cpu-spin")
        .function("alloc")
        .env("WASMBOX_QUEUE_DEPTH", 256)
        .start()?;
    a.wait_pool_full(1, Duration::from_secs(30)).await?;
    b.wait_pool_full(2, Duration::from_secs(30)).await?;
    let (port, plain_port) = (free_port()?, free_port()?);
    let nginx = Nginx::start(&[a.addr, b.addr], port, Some(plain_port))?;
    let lb = Client { addr: format!("127.0.0.1:{port}").parse()? };
    let plain = Client { addr: format!("127.0.0.1:{plain_port}").parse()? };

    // The per-invocation headers arrive: a bad cpu_quota is refused by the supervisor,
    // and a 1 MiB Memory-Request stops a function that needs 64 MiB.
    let r = lb.request(Method::POST, "/cpu-spin?arg=1", &[("cpu_quota", "lots")], Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::BAD_REQUEST, "invalid_header"), "{}", r.text());
    assert_eq!(r.json()["header"], "cpu_quota");
    let r = lb.request(Method::POST, "/alloc?arg=64", &[("Memory-Request", "1")], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::INSUFFICIENT_STORAGE, "{}", r.text());
    let r = lb
        .request(Method::POST, "/cpu-spin?arg=1", &[("cpu_quota", "500"), ("Memory-Request", "64")], Bytes::new())
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Without underscores_in_headers, nginx silently drops cpu_quota: the bad value passes.
    let r = plain.request(Method::POST, "/cpu-spin?arg=1", &[("cpu_quota", "lots")], Bytes::new()).await?;
    assert_eq!(r.status, StatusCode::OK, "the header was dropped on the way: {}", r.text());

    // Load: 10 clients in closed loops of 150 ms invocations, until stopped.
    let load = Load::start(&lb, 10, 400, "/cpu-spin?arg=150", &[("cpu_quota", "1000")]);

    // A overloads: nginx sees its 429s and sends those requests to B instead.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nginx.read("access.log").contains(&format!("upstream={}, {} upstream_status=429, 200", a.addr, b.addr)) {
        if Instant::now() > deadline {
            bail!("no request moved from A (429) to B:\n{}", nginx.read("access.log"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then A is stopped while the load goes on; it drains what it accepted.
    let before_stop = load.done();
    a.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = a.wait_exit(Duration::from_secs(30)).await?;
    assert!(status.success(), "A stopped cleanly: {status:?}\n{}", a.logs());
    // Traffic continues on B alone for a while.
    let until = load.done() + 30;
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.done() < until {
        anyhow::ensure!(Instant::now() < deadline, "load stalled after A stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (total, failures) = load.finish().await?;
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        nginx.read("access.log")
    );
    assert!(total > before_stop + 30, "requests kept succeeding after A stopped");
    let log = nginx.read("access.log");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("/cpu-spin?arg=150")).collect();
    assert!(lines.iter().all(|l| l.starts_with("200 ")), "every answer through nginx was 200:\n{log}");
    assert!(
        lines.iter().any(|l| l.contains(&format!("upstream={} upstream_status=200", a.addr))),
        "A served some:\n{log}"
    );
    assert!(a.logs().contains("shutting down"), "{}", a.logs());
    Ok(())
}
