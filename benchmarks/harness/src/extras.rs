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
    /// The call right after that first one, same module (on WasmEdge still interpreted:
    /// its artifact is being compiled), µs.
    pub cold_second_call_p50_us: u64,
    pub cold_second_call_p99_us: u64,
    /// First invocation of a module the workers have not loaded, artifact on disk, µs.
    pub cold_warm_cache_p50_us: u64,
    pub cold_warm_cache_p99_us: u64,
    pub cold_samples: usize,
    /// From SIGKILL of an idle worker until the pool reports every worker live again, µs.
    pub respawn_p50_us: u64,
    pub respawn_p99_us: u64,
    pub respawn_max_us: u64,
    pub respawn_samples: usize,
    /// The same with WASMBOX_ZYGOTE=false (every worker started by exec), side by side.
    pub respawn_exec_p50_us: u64,
    pub respawn_exec_p99_us: u64,
    /// A request for a tenant no idle worker serves (its module compiled before): from the
    /// request to its answer, so recycling a slot, the new process and the artifact load.
    pub switch_p50_us: u64,
    pub switch_p99_us: u64,
    pub switch_exec_p50_us: u64,
    pub switch_exec_p99_us: u64,
    pub switch_samples: usize,
    /// The same when the pool had a moment to make a spare first (the next switch does not
    /// arrive while the last one's replacement spare is still starting).
    pub switch_ready_p50_us: u64,
    pub switch_ready_p99_us: u64,
    pub switch_ready_exec_p50_us: u64,
    pub switch_ready_exec_p99_us: u64,
    /// The zygote's resident and private memory, KiB.
    pub zygote_rss_kib: u64,
    pub zygote_private_kib: u64,
    /// hello round robin over many functions (each its own tenant), by tenancy mode.
    pub mixed: Vec<Mixed>,
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

/// One mixed-tenant cell.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Mixed {
    pub tenancy: &'static str,
    pub functions: usize,
    pub throughput: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub errors: u64,
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
    tenant_switches(setup, if quick { 6 } else { 60 }, &mut extras).await?;
    let (sizes, duration): (&[usize], _) =
        if quick { (&[10], Duration::from_secs(1)) } else { (&[10, 100], Duration::from_secs(5)) };
    mixed_tenants(setup, sizes, duration, &mut extras).await?;
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
        // One tenant: what is measured is loading a module, not a tenant switch (that has
        // its own measurement).
        std::fs::write(functions.join(format!("v{i}.toml")), "tenant = \"cold\"\n")?;
    }
    let cold = Setup { functions: functions.clone(), cache_dir: dir.join("cache"), ..setup.clone() };
    let mut empty = Recorder::default();
    let mut warm = Recorder::default();
    let mut second = Recorder::default();
    for (round, recorder) in [&mut empty, &mut warm].into_iter().enumerate() {
        // A new supervisor each round: its workers have nothing in memory; the second
        // round finds the artifacts the first one wrote.
        let server = Server::start(Mode::WasmBox, &cold)?;
        for i in 0..samples {
            let target = Target { addr: server.addr, path: format!("/v{i}"), headers: vec![], body: Bytes::new() };
            let load = Load::Closed { connections: 1, duration: Duration::from_secs(120), max_requests: 1 };
            let m = loadgen::run(&target, load, &indicatif::ProgressBar::hidden()).await?;
            anyhow::ensure!(m.ok() == 1, "cold start of v{i}: {:?}", m.statuses);
            recorder.merge(&m.recorder);
            if round == 0 {
                let m = loadgen::run(&target, load, &indicatif::ProgressBar::hidden()).await?;
                anyhow::ensure!(m.ok() == 1, "second call of v{i}: {:?}", m.statuses);
                second.merge(&m.recorder);
            }
        }
        server.stop();
    }
    extras.cold_samples = samples;
    extras.cold_empty_cache_p50_us = empty.quantile_us(0.5);
    extras.cold_empty_cache_p99_us = empty.quantile_us(0.99);
    extras.cold_second_call_p50_us = second.quantile_us(0.5);
    extras.cold_second_call_p99_us = second.quantile_us(0.99);
    extras.cold_warm_cache_p50_us = warm.quantile_us(0.5);
    extras.cold_warm_cache_p99_us = warm.quantile_us(0.99);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn respawn_and_memory(setup: &Setup, samples: usize, extras: &mut Extras) -> anyhow::Result<()> {
    let server = Server::start(Mode::WasmBox, setup)?;
    let exec = Server::start_with_env(Mode::WasmBox, setup, &[("WASMBOX_ZYGOTE", "false")])?;
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
    if let Some(zygote) = crate::modes::zygote(server.pid()) {
        extras.zygote_rss_kib = crate::modes::rss_kib(zygote);
        extras.zygote_private_kib = crate::modes::private_kib(zygote);
    }

    // Taking turns, so a drift of the machine's speed reaches both alike.
    let mut respawn = [Recorder::default(), Recorder::default()];
    for _ in 0..samples {
        for (i, server) in [&server, &exec].into_iter().enumerate() {
            respawn[i].record(respawn_once(server, n).await?);
        }
    }
    extras.respawn_samples = samples;
    extras.respawn_p50_us = respawn[0].quantile_us(0.5);
    extras.respawn_p99_us = respawn[0].quantile_us(0.99);
    extras.respawn_max_us = respawn[0].max_us();
    extras.respawn_exec_p50_us = respawn[1].quantile_us(0.5);
    extras.respawn_exec_p99_us = respawn[1].quantile_us(0.99);
    server.stop();
    exec.stop();
    Ok(())
}

/// SIGKILL of one idle worker until the pool is full again.
async fn respawn_once(server: &Server, n: usize) -> anyhow::Result<Duration> {
    wait_live(server, n, Duration::from_secs(30)).await?;
    let Some(&victim) = crate::modes::children(server.pid()).first() else {
        anyhow::bail!("WasmBox has no workers");
    };
    let t = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL)?;
    // Gone first (the pool may still count it live for a moment), then all live again.
    while crate::modes::children(server.pid()).contains(&victim) && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    wait_live(server, n, Duration::from_secs(30)).await?;
    Ok(t.elapsed())
}

/// A functions directory of `count` copies of hello with distinct hashes (so distinct
/// modules and, by name, distinct tenants).
fn variants(setup: &Setup, what: &str, count: usize) -> anyhow::Result<(std::path::PathBuf, Vec<String>)> {
    let dir = tempdir(what)?;
    let functions = dir.join("functions");
    std::fs::create_dir_all(&functions)?;
    let hello = std::fs::read(setup.functions.join("hello.wasm"))?;
    for i in 0..count {
        std::fs::write(functions.join(format!("t{i}.wasm")), variant(&hello, 1000 + i))?;
    }
    Ok((dir, (0..count).map(|i| format!("/t{i}")).collect()))
}

/// Requests round robin over more tenants than workers, one at a time: none finds an idle
/// worker of its tenant. With the zygote and without, taking turns.
async fn tenant_switches(setup: &Setup, samples: usize, extras: &mut Extras) -> anyhow::Result<()> {
    let (dir, paths) = variants(setup, "switch", setup.workers * 2 + 1)?;
    let with = Setup { functions: dir.join("functions"), cache_dir: dir.join("cache"), ..setup.clone() };
    let servers = [
        Server::start(Mode::WasmBox, &with)?,
        Server::start_with_env(Mode::WasmBox, &with, &[("WASMBOX_ZYGOTE", "false")])?,
    ];
    let mut clients = Vec::new();
    for server in &servers {
        let mut client = Client::connect(server.addr).await?;
        // Compile every module first: a switch, not a compile, is what is measured.
        for path in &paths {
            client.get(path).await?;
        }
        clients.push(client);
    }
    // Per server: a switch with a spare ready, then one right after it (back to back).
    let mut ready = [Recorder::default(), Recorder::default()];
    let mut recorders = [Recorder::default(), Recorder::default()];
    for i in 0..samples {
        for (k, client) in clients.iter_mut().enumerate() {
            wait_spare(&servers[k], setup.workers, Duration::from_secs(5)).await?;
            for (n, recorder) in [&mut ready[k], &mut recorders[k]].into_iter().enumerate() {
                let path = &paths[(2 * i + n) % paths.len()];
                let t = Instant::now();
                let status = client.get(path).await?;
                anyhow::ensure!(status == 200, "tenant switch to {path}: {status}");
                recorder.record(t.elapsed());
            }
        }
    }
    extras.switch_ready_p50_us = ready[0].quantile_us(0.5);
    extras.switch_ready_p99_us = ready[0].quantile_us(0.99);
    extras.switch_ready_exec_p50_us = ready[1].quantile_us(0.5);
    extras.switch_ready_exec_p99_us = ready[1].quantile_us(0.99);
    extras.switch_samples = samples;
    extras.switch_p50_us = recorders[0].quantile_us(0.5);
    extras.switch_p99_us = recorders[0].quantile_us(0.99);
    extras.switch_exec_p50_us = recorders[1].quantile_us(0.5);
    extras.switch_exec_p99_us = recorders[1].quantile_us(0.99);
    for server in servers {
        server.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// hello over each of `sizes` functions (10 and 100 in a full run), round robin from two connections, in both
/// tenancy modes (the two modes of one size run at once and take turns).
async fn mixed_tenants(setup: &Setup, sizes: &[usize], duration: Duration, extras: &mut Extras) -> anyhow::Result<()> {
    for &count in sizes {
        let (dir, paths) = variants(setup, "mixed", count)?;
        let with = Setup { functions: dir.join("functions"), cache_dir: dir.join("cache"), ..setup.clone() };
        let modes = ["isolated", "shared"];
        let servers = [
            Server::start_with_env(Mode::WasmBox, &with, &[("WASMBOX_TENANCY", "isolated")])?,
            Server::start_with_env(Mode::WasmBox, &with, &[("WASMBOX_TENANCY", "shared")])?,
        ];
        let mut cells: Vec<(Recorder, u64, u64, Duration)> = vec![Default::default(); 2];
        // Every module compiled once on each, then rounds of load.
        for server in &servers {
            let mut client = Client::connect(server.addr).await?;
            for path in &paths {
                client.get(path).await?;
            }
        }
        for _ in 0..4 {
            for (k, server) in servers.iter().enumerate() {
                let (recorder, ok, errors, took) = round_robin(server.addr, &paths, 2, duration / 4).await?;
                cells[k].0.merge(&recorder);
                cells[k].1 += ok;
                cells[k].2 += errors;
                cells[k].3 += took;
            }
        }
        for (k, (recorder, ok, errors, took)) in cells.into_iter().enumerate() {
            extras.mixed.push(Mixed {
                tenancy: modes[k],
                functions: count,
                throughput: ok as f64 / took.as_secs_f64().max(1e-9),
                p50_us: recorder.quantile_us(0.5),
                p99_us: recorder.quantile_us(0.99),
                errors,
            });
        }
        for server in servers {
            server.stop();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// `connections` clients, each requesting `paths` in turn for `duration`.
async fn round_robin(
    addr: std::net::SocketAddr,
    paths: &[String],
    connections: usize,
    duration: Duration,
) -> anyhow::Result<(Recorder, u64, u64, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let paths = paths.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await?;
            let (mut recorder, mut ok, mut errors) = (Recorder::default(), 0u64, 0u64);
            let mut i = c * paths.len() / connections.max(1);
            while started.elapsed() < duration {
                let t = Instant::now();
                match client.get(&paths[i % paths.len()]).await {
                    Ok(200) => {
                        ok += 1;
                        recorder.record(t.elapsed());
                    }
                    _ => errors += 1,
                }
                i += 1;
            }
            anyhow::Ok((recorder, ok, errors))
        }));
    }
    let mut all = (Recorder::default(), 0, 0);
    for task in tasks {
        let (recorder, ok, errors) = task.await??;
        all.0.merge(&recorder);
        all.1 += ok;
        all.2 += errors;
    }
    Ok((all.0, all.1, all.2, started.elapsed()))
}

/// One keep-alive HTTP/1.1 connection for sequential requests.
struct Client {
    addr: std::net::SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Client> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client { addr, sender })
    }

    /// GET `path`; the status (the body is read and dropped).
    async fn get(&mut self, path: &str) -> anyhow::Result<u16> {
        self.sender.ready().await?;
        let req =
            http::Request::get(path).header(http::header::HOST, self.addr.to_string()).body(Empty::<Bytes>::new())?;
        let response = self.sender.send_request(req).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// Waits until `/ready` reports `n` live workers (polling every millisecond).
/// Waits until the pool has every worker live and a clean spare idle.
async fn wait_spare(server: &Server, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let stats = get_json(server.addr, "/stats").await.unwrap_or_default();
        if stats["pool"]["live"].as_u64() == Some(n as u64) && stats["pool"]["spares"].as_u64() >= Some(1) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "no spare within {within:?}: {}", stats["pool"]);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

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
