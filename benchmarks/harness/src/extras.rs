//! What WasmBox costs besides request latency: cold starts, worker respawn, idle memory, the
//! per-invocation price of cgroups, and that of session state by heap size.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::loadgen::{self, Load, Target};
use crate::modes::{Mode, Server, Setup};
use crate::stats::Recorder;
use crate::suite::Plan;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Extras {
    /// First invocation of a never-seen module, empty artifact cache (compile + run), µs.
    pub cold_empty_cache_p50_us: u64,
    pub cold_empty_cache_p99_us: u64,
    /// First invocation of a module the workers have not loaded, artifact on disk, µs.
    pub cold_warm_cache_p50_us: u64,
    pub cold_warm_cache_p99_us: u64,
    pub cold_samples: usize,
    /// From SIGKILL of an idle worker until the pool reports every worker live again, µs.
    pub respawn_p50_us: u64,
    pub respawn_max_us: u64,
    pub respawn_samples: usize,
    /// Resident memory when idle (after one hello per worker), KiB.
    pub supervisor_rss_kib: u64,
    pub worker_rss_kib: Vec<u64>,
    /// Of that, the pages each worker alone maps (the rest is shared code), KiB.
    pub worker_private_kib: Vec<u64>,
    /// Mean hello latency with per-worker cgroups and without, µs; the difference is what
    /// cgroups cost per invocation end to end.
    pub hello_mean_cgroups_us: f64,
    pub hello_mean_no_cgroups_us: f64,
    pub cgroups_active: bool,
    /// Restore, capture and commit of session state, by heap size.
    pub sessions: crate::sessions::Sessions,
}

/// A copy of `wasm` with a custom section that makes its hash (so its cache key) unique.
pub fn variant(wasm: &[u8], n: usize) -> Vec<u8> {
    let name = b"wasmbox-bench-variant";
    let payload = n.to_le_bytes();
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    leb128(&mut out, section.len() as u64);
    out.extend_from_slice(&section);
    out
}

fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub async fn measure(setup: &Setup, plan: &Plan) -> anyhow::Result<Extras> {
    let mut extras = Extras::default();
    let quick = plan.name == "quick";
    cold_starts(setup, if quick { 5 } else { 50 }, &mut extras).await?;
    respawn_and_memory(setup, if quick { 3 } else { 20 }, &mut extras).await?;
    cgroup_cost(setup, plan, &mut extras).await?;
    extras.sessions = crate::sessions::measure(setup, plan).await?;
    Ok(extras)
}

async fn cold_starts(setup: &Setup, samples: usize, extras: &mut Extras) -> anyhow::Result<()> {
    let dir = tempdir("cold")?;
    let functions = dir.join("functions");
    std::fs::create_dir_all(&functions)?;
    let hello = std::fs::read(setup.functions.join("hello.wasm"))?;
    for i in 0..samples {
        std::fs::write(functions.join(format!("v{i}.wasm")), variant(&hello, i))?;
    }
    let cold = Setup { functions: functions.clone(), cache_dir: dir.join("cache"), ..setup.clone() };
    let mut empty = Recorder::default();
    let mut warm = Recorder::default();
    for recorder in [&mut empty, &mut warm] {
        // A new supervisor each round: its workers have nothing in memory; the second
        // round finds the artifacts the first one wrote.
        let server = Server::start(Mode::WasmBox, &cold)?;
        for i in 0..samples {
            let target = Target { addr: server.addr, path: format!("/v{i}"), headers: vec![], body: Bytes::new() };
            let load = Load::Closed { connections: 1, duration: Duration::from_secs(120), max_requests: 1 };
            let m = loadgen::run(&target, load, &indicatif::ProgressBar::hidden()).await?;
            anyhow::ensure!(m.ok() == 1, "cold start of v{i}: {:?}", m.statuses);
            recorder.merge(&m.recorder);
        }
        server.stop();
    }
    extras.cold_samples = samples;
    extras.cold_empty_cache_p50_us = empty.quantile_us(0.5);
    extras.cold_empty_cache_p99_us = empty.quantile_us(0.99);
    extras.cold_warm_cache_p50_us = warm.quantile_us(0.5);
    extras.cold_warm_cache_p99_us = warm.quantile_us(0.99);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn respawn_and_memory(setup: &Setup, samples: usize, extras: &mut Extras) -> anyhow::Result<()> {
    let server = Server::start(Mode::WasmBox, setup)?;
    let n = setup.workers;
    // One hello per worker, concurrently, so each has loaded a module once.
    let target = Target { addr: server.addr, path: "/hello".into(), headers: vec![], body: Bytes::new() };
    let load = Load::Closed { connections: n, duration: Duration::from_secs(60), max_requests: n as u64 * 4 };
    loadgen::run(&target, load, &indicatif::ProgressBar::hidden()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    extras.supervisor_rss_kib = crate::modes::rss_kib(server.pid());
    let workers = crate::modes::children(server.pid());
    extras.worker_rss_kib = workers.iter().copied().map(crate::modes::rss_kib).collect();
    extras.worker_private_kib = workers.iter().copied().map(crate::modes::private_kib).collect();

    let mut respawn = Recorder::default();
    for _ in 0..samples {
        wait_live(&server, n, Duration::from_secs(30)).await?;
        let Some(&victim) = crate::modes::children(server.pid()).first() else {
            anyhow::bail!("WasmBox has no workers");
        };
        let t = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL)?;
        // Gone first (the pool may still count it live for a moment), then all live again.
        while crate::modes::children(server.pid()).contains(&victim) && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        wait_live(&server, n, Duration::from_secs(30)).await?;
        respawn.record(t.elapsed());
    }
    extras.respawn_samples = samples;
    extras.respawn_p50_us = respawn.quantile_us(0.5);
    extras.respawn_max_us = respawn.max_us();
    server.stop();
    Ok(())
}

/// Waits until `/ready` reports `n` live workers (polling every millisecond).
async fn wait_live(server: &Server, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let ready = get_json(server.addr, "/ready").await.unwrap_or_default();
        if ready["pool"]["live"].as_u64() == Some(n as u64) && crate::modes::children(server.pid()).len() == n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "pool not back to {n} live workers: {ready}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn cgroup_cost(setup: &Setup, plan: &Plan, extras: &mut Extras) -> anyhow::Result<()> {
    // Both supervisors run at once (the one without cgroups touches no cgroup file) and take
    // turns in rounds, so a drift of the machine's speed reaches both alike.
    let with = Server::start_with_env(Mode::WasmBox, setup, &[("WASMBOX_CGROUPS", "auto")])?;
    let without = Server::start_with_env(Mode::WasmBox, setup, &[("WASMBOX_CGROUPS", "off")])?;
    let stats = get_json(with.addr, "/stats").await.unwrap_or_default();
    extras.cgroups_active = stats["cgroups"].is_object();
    let rounds = plan.rounds.max(1) * 2;
    let mut recorders = [Recorder::default(), Recorder::default()];
    for (i, server) in [&with, &without].into_iter().enumerate() {
        let target = Target { addr: server.addr, path: "/hello".into(), headers: vec![], body: Bytes::new() };
        let warm = Load::Closed { connections: 1, duration: Duration::from_secs(60), max_requests: plan.warmup };
        let m = loadgen::run(&target, warm, &indicatif::ProgressBar::hidden()).await?;
        anyhow::ensure!(m.ok() == plan.warmup, "cgroups {}: warm-up got {:?}", ["on", "off"][i], m.statuses);
    }
    for _ in 0..rounds {
        for (i, server) in [&with, &without].into_iter().enumerate() {
            let target = Target { addr: server.addr, path: "/hello".into(), headers: vec![], body: Bytes::new() };
            // One connection: latency without queueing, so the difference is per invocation.
            let load =
                Load::Closed { connections: 1, duration: plan.duration / rounds, max_requests: plan.max_requests };
            let m = loadgen::run(&target, load, &indicatif::ProgressBar::hidden()).await?;
            recorders[i].merge(&m.recorder);
        }
    }
    with.stop();
    without.stop();
    extras.hello_mean_cgroups_us = recorders[0].mean_us();
    extras.hello_mean_no_cgroups_us = recorders[1].mean_us();
    Ok(())
}

/// GET `path` as JSON (a new connection per call; for slow polling only).
pub async fn get_json(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(path).header(http::header::HOST, addr.to_string()).body(Empty::<Bytes>::new())?;
    let body = sender.send_request(req).await?.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

fn tempdir(what: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("wasmbox-bench-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_are_valid_modules_with_distinct_bytes() {
        let hello = smallest_module();
        let (a, b) = (variant(&hello, 1), variant(&hello, 2));
        assert_ne!(a, b);
        assert!(a.starts_with(&hello));
        // The appended custom section: id 0, its size, then the name and payload.
        let tail = &a[hello.len()..];
        assert_eq!(tail[0], 0);
        assert_eq!(usize::from(tail[1]), tail.len() - 2);
        assert_eq!(&tail[3..3 + 21], b"wasmbox-bench-variant");
    }

    fn smallest_module() -> Vec<u8> {
        // The smallest module: magic and version.
        b"\0asm\x01\0\0\0".to_vec()
    }

    #[test]
    fn leb128_encodes_multi_byte_lengths() {
        let mut out = Vec::new();
        leb128(&mut out, 624_485);
        assert_eq!(out, [0xe5, 0x8e, 0x26]);
    }
}
