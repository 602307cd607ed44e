//! The container image as operators run it: built by `make image` from the binaries and
//! example functions built on the host, run with podman (or docker) for real. `make
//! image-test` (scripts/image-test) builds the image and runs these with WASMBOX_TEST_IMAGE
//! set; it skips, with one line, where no container engine can run.
//!
//! Every container carries this run's label (WASMBOX_IMAGE_TEST_LABEL) and is removed,
//! with its anonymous volumes, when its test ends; scripts/image-test then checks that no
//! labelled container and no new volume or image is left.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use http::{Method, StatusCode};
use wasmbox_integration::container::{Container, Engine};
use wasmbox_integration::load::Load;
use wasmbox_integration::nginx::{Nginx, free_port};
use wasmbox_integration::{Client, children_of, is_compile_process, is_zygote, proc_status, repo_root, start_time};

fn image() -> String {
    std::env::var("WASMBOX_TEST_IMAGE")
        .expect("WASMBOX_TEST_IMAGE is not set: run `make image-test`, which builds the image and sets it")
}

fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::detect().expect("container engine")).clone()
}

/// The example functions exactly as the image has them (scripts/image stages them).
fn staged_function(name: &str) -> PathBuf {
    repo_root().join("target/image/functions").join(format!("{name}.wasm"))
}

/// A container name unique to this run and test.
fn name(test: &str) -> String {
    format!("wasmbox-it-{}-{test}", std::process::id())
}

/// The image's port published on a free loopback port of the host.
fn published() -> anyhow::Result<(String, SocketAddr)> {
    let port = free_port()?;
    Ok((format!("127.0.0.1:{port}:8095"), format!("127.0.0.1:{port}").parse()?))
}

async fn answers(client: &Client, path: &str) -> bool {
    matches!(client.get(path).await, Ok(r) if r.status == StatusCode::OK)
}

/// Starts `name` and waits until its supervisor answers /ready with 200.
async fn start_ready(name: &str, args: &[&str]) -> anyhow::Result<(Container, Client)> {
    let (publish, addr) = published()?;
    let mut all = vec!["--publish", publish.as_str()];
    all.extend_from_slice(args);
    let c = engine().start(name, &all, &image())?;
    let client = Client { addr };
    c.wait_until(Duration::from_secs(60), "ready", || answers(&client, "/ready")).await?;
    Ok((c, client))
}

/// Worker processes of the supervisor with host PID `supervisor` (its children but the
/// zygote and compile processes), waiting up to 30 s for `n` of them.
async fn workers(supervisor: i32, n: usize) -> anyhow::Result<Vec<i32>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids: Vec<i32> =
            children_of(supervisor).into_iter().filter(|&p| !is_compile_process(p) && !is_zygote(p)).collect();
        if pids.len() >= n {
            return Ok(pids);
        }
        ensure!(Instant::now() < deadline, "{n} workers never appeared under {supervisor}: {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process tree under `pid` (itself included), as (pid, start time).
fn tree(pid: i32) -> Vec<(i32, u64)> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        all.extend(children_of(all[i]));
        i += 1;
    }
    all.into_iter().filter_map(|p| start_time(p).map(|t| (p, t))).collect()
}

fn netns(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).map(|p| p.display().to_string()).unwrap_or_default()
}

fn limit(pid: i32, name: &str) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap_or_default();
    line.get(name.len()..).unwrap_or_default().split_whitespace().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn the_image_as_it_ships_serves_the_examples_and_reports_healthy() -> anyhow::Result<()> {
    let (c, client) = start_ready(&name("ships"), &[]).await?;

    let r = client.post("/hello", "").await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.text().contains("Hello"), "{}", r.text());
    let r = client.post("/echo", "through the container").await?;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "through the container"));
    let r = client.get("/http-hello").await?;
    assert_eq!(r.status, StatusCode::OK, "the wasi:http example: {}", r.text());

    // The image's HEALTHCHECK. podman runs it on demand (it has no timer without
    // systemd); docker runs it on its own schedule (10 s interval).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if engine().is_podman() {
            let out = engine().output(&["healthcheck", "run", &c.name])?;
            assert!(out.status.success(), "healthcheck run: {}", String::from_utf8_lossy(&out.stderr));
        }
        let state: serde_json::Value = serde_json::from_str(&c.inspect("{{json .State}}")?)?;
        let health = if state["Health"].is_object() { &state["Health"] } else { &state["Healthcheck"] };
        let status = health["Status"].as_str().unwrap_or_default().to_string();
        if status == "healthy" || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(status, "healthy", "{}", c.inspect("{{json .State}}")?);

    // It runs as the image's unprivileged user, and says once why there are no cgroups.
    let supervisor = c.pid()?;
    let uids = proc_status(supervisor)["Uid"].clone();
    assert!(uids.split_whitespace().all(|u| u == "10001"), "supervisor uids {uids}");
    let logs = c.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("cgroups unavailable")).collect();
    assert_eq!(lines.len(), 1, "one line says cgroups are off:\n{logs}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).context("the image logs JSON")?;
    assert!(line["error"].as_str().is_some_and(|e| !e.is_empty()), "the line says why: {}", lines[0]);

    // The shipped binaries have no fault-injection hooks: asking for them is refused.
    let hooks = format!("{}-hooks", c.name);
    let out = engine().run_once(&hooks, &["--env", "WASMBOX_TEST_HOOKS=true"], &image(), Duration::from_secs(30))?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the image started with test hooks: {said}");
    assert!(said.contains("WASMBOX_TEST_HOOKS exists only in debug builds"), "{said}");
    Ok(())
}

/// What the kernel guarantees a cgroup with a quota of `cpus` over a window of `window`
/// (as in the host's cgroup tests): at most cpus x (window + two 100 ms periods), plus
/// accounting granularity.
fn quota_bound(cpus: f64, window: Duration) -> Duration {
    (window + Duration::from_millis(200)).mul_f64(cpus) + Duration::from_millis(10)
}

/// Root in a privileged container (what deployment/kubernetes.yaml runs): the container
/// runtime mounts a writable cgroup file system, the supervisor makes a cgroup per worker
/// under its own, and the limits hold inside the container as on the host.
#[tokio::test]
async fn privileged_as_root_the_limits_hold_inside_the_container() -> anyhow::Result<()> {
    limits_hold_inside(&name("privileged"), &["--privileged"]).await
}

/// Root with CAP_SYS_ADMIN and the host's cgroup file system mounted writable, not
/// privileged (what deployment/ksvc.yaml runs: Knative refuses privileged containers). The
/// host's cgroup namespace, so the supervisor's own cgroup path is the one the mounted
/// file system shows (the default on cgroup v1).
#[tokio::test]
async fn with_sys_admin_and_the_hosts_cgroups_the_limits_hold_inside_the_container() -> anyhow::Result<()> {
    limits_hold_inside(
        &name("sys-admin"),
        &["--cap-add", "SYS_ADMIN", "--cgroupns", "host", "--volume", "/sys/fs/cgroup:/sys/fs/cgroup:rw"],
    )
    .await
}

async fn limits_hold_inside(name: &str, mode: &[&str]) -> anyhow::Result<()> {
    let token = "image-test-token";
    let token_env = format!("WASMBOX_ADMIN_TOKEN={token}");
    let mut args = mode.to_vec();
    args.extend_from_slice(&[
        "--user",
        "0",
        "--env",
        "WASMBOX_CACHE_DIR=/var/cache/wasmbox-root",
        "--env",
        "WASMBOX_STATE_DIR=/var/lib/wasmbox-root",
        "--env",
        "WASMBOX_CGROUPS=required",
        "--env",
        "WASMBOX_WORKERS=2",
        "--env",
        "WASMBOX_CGROUP_MEMORY_HEADROOM_MB=16",
        "--env",
        &token_env,
    ]);
    let (c, client) = start_ready(name, &args).await?;
    let stats = client.get("/stats").await?.json();
    let parents: Vec<String> = stats["cgroups"]["parents"]
        .as_array()
        .with_context(|| format!("cgroups on in /stats: {stats}"))?
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    ensure!(!parents.is_empty(), "no cgroup parents: {stats}");

    // cpu_quota: a quarter CPU for a second of spinning stays within the kernel's bound,
    // and the kernel throttled the worker's cgroup; without a quota it uses more.
    client.get("/cpu-spin?arg=1").await?;
    let spin = |quota: &'static str| {
        let client = client.clone();
        async move {
            let sent = Instant::now();
            let r = client.request(Method::GET, "/cpu-spin?arg=1000", &[("cpu_quota", quota)], Bytes::new()).await?;
            let window = sent.elapsed();
            ensure!(r.status == StatusCode::OK, "cpu-spin: {} {}", r.status, r.text());
            for header in ["x-wasmbox-cpu-time-us", "x-wasmbox-memory-peak-bytes", "x-wasmbox-memory-limit-bytes"] {
                ensure!(r.header(header).is_some(), "accounting header {header} missing: {:?}", r.headers);
            }
            let cpu = Duration::from_micros(r.header("x-wasmbox-cpu-time-us").unwrap_or_default().parse()?);
            let slot: usize =
                r.header("x-wasmbox-worker").unwrap_or_default().split('.').next().unwrap_or("").parse()?;
            anyhow::Ok((cpu, window, slot))
        }
    };
    let (cpu, window, slot) = spin("250").await?;
    let bound = quota_bound(0.25, window);
    let mut throttled = None;
    for parent in &parents {
        if let Ok(stat) = c.exec(&["cat", &format!("{parent}/worker-{slot}/cpu.stat")]) {
            throttled =
                stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")).and_then(|n| n.trim().parse::<u64>().ok());
            if throttled.is_some() {
                break;
            }
        }
    }
    let (free_cpu, free_window, _) = spin("2000").await?;
    eprintln!(
        "in the container: cpu_quota 250 used {cpu:?} in {window:?} (bound {bound:?}), throttled {throttled:?}; \
         without a quota {free_cpu:?} in {free_window:?}"
    );
    assert!(cpu <= bound, "cpu_quota 250 used {cpu:?} of CPU in {window:?}: above {bound:?}");
    assert!(throttled.is_some_and(|n| n >= 1), "the kernel never throttled worker-{slot} ({throttled:?})");
    assert!(free_cpu > quota_bound(0.25, free_window), "without a quota the spin used only {free_cpu:?}");

    // Memory-Request: the engine's cap (memory_limit_exceeded) and the kernel's (the table
    // hog, uploaded through the admin API, is OOM-killed in its cgroup): both 507.
    let r = client.request(Method::GET, "/alloc?arg=64", &[("Memory-Request", "32")], Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INSUFFICIENT_STORAGE, "memory_limit_exceeded"));
    let auth = format!("Bearer {token}");
    let r = client
        .request(
            Method::PUT,
            "/admin/functions/table-hog",
            &[("Authorization", &auth)],
            Bytes::from(wasmbox_integration::table_hog()),
        )
        .await?;
    assert_eq!(r.status, StatusCode::CREATED, "upload: {}", r.text());
    let r = client.request(Method::GET, "/table-hog", &[("Memory-Request", "32")], Bytes::new()).await?;
    assert_eq!((r.status, r.kind().as_str()), (StatusCode::INSUFFICIENT_STORAGE, "oom_killed"), "{}", r.text());
    let r = client.post("/hello", "").await?;
    assert_eq!(r.status, StatusCode::OK, "served on after the OOM kill: {}", r.text());

    // The workers, seen from the host's /proc: every layer as in the host's hardening test.
    let supervisor = c.pid()?;
    for pid in workers(supervisor, 2).await? {
        let st = proc_status(pid);
        assert_eq!(st["NoNewPrivs"], "1", "worker {pid}");
        assert_eq!(st["Seccomp"], "2", "worker {pid}: seccomp filter mode");
        let uids: Vec<&str> = st["Uid"].split_whitespace().collect();
        assert!(uids.iter().all(|u| u.parse::<u32>().is_ok_and(|u| u >= 2_000_000)), "worker {pid} uids {uids:?}");
        assert_eq!(st["Groups"], "", "worker {pid}: no supplementary groups");
        assert_eq!(st["CapEff"], "0000000000000000", "worker {pid}: no capabilities");
        assert_ne!(netns(pid), netns(supervisor), "worker {pid} has a network namespace of its own");
        assert_eq!(limit(pid, "Max core file size"), "0");
    }
    Ok(())
}

/// `stop` sends SIGTERM: the invocation in flight finishes, the supervisor exits 0 well
/// within its drain timeout, and no process of the container is left.
#[tokio::test]
async fn stop_drains_in_flight_invocations_and_exits_zero() -> anyhow::Result<()> {
    let (c, client) = start_ready(&name("stop"), &["--env", "WASMBOX_DRAIN_TIMEOUT_MS=15000"]).await?;
    let supervisor = c.pid()?;
    let pool = workers(supervisor, 1).await?;
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.post("/cpu-spin?arg=2500", "").await })
    };
    wasmbox_integration::wait_busy(&pool, 1, Duration::from_secs(20)).await?;
    let processes = tree(supervisor);
    let stopped = Instant::now();
    // --time above the drain timeout: the engine's SIGKILL would show as exit 137.
    engine().run(&["stop", "--time", "30", &c.name])?;
    let took = stopped.elapsed();
    let r = in_flight.await??;
    assert_eq!(r.status, StatusCode::OK, "the in-flight invocation finished: {}", r.text());
    assert_eq!(c.exit_code()?, 0, "{}", c.logs());
    assert!(took < Duration::from_secs(15), "stop took {took:?}, past the 15 s drain timeout");
    wasmbox_integration::wait_gone(&processes, Duration::from_secs(10)).await?;
    let logs = c.logs();
    assert!(logs.contains("shutting down"), "{logs}");
    eprintln!("stop: drained one in-flight invocation and exited 0 in {took:?}; {} processes gone", processes.len());
    Ok(())
}

/// A host directory with `mode`, owned by `uid`.
fn host_dir(parent: &Path, name: &str, uid: u32, mode: u32) -> anyhow::Result<PathBuf> {
    let dir = parent.join(name);
    std::fs::create_dir(&dir)?;
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
    Ok(dir)
}

/// Writes a file the way an operator's deploy should: a temporary name, then a rename.
fn drop_in(dir: &Path, name: &str, from: &Path) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(from, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

async fn eventually(
    client: &Client,
    path: &str,
    body: &str,
    what: &str,
    ok: impl Fn(StatusCode, &str) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client.post(path, body.to_string()).await?;
        if ok(r.status, &r.text()) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: still {} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Functions from a host volume are served as they are dropped in, replaced and removed;
/// sessions in the state volume outlive a restart of the container.
#[tokio::test]
async fn host_volumes_serve_dropped_in_functions_and_keep_sessions_across_a_restart() -> anyhow::Result<()> {
    let host = tempfile::tempdir()?;
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755))?;
    let functions = host_dir(host.path(), "functions", 0, 0o755)?;
    // The state directory must belong to the supervisor's uid (10001) and be private.
    let state = host_dir(host.path(), "state", 10001, 0o700)?;
    drop_in(&functions, "counter.wasm", &staged_function("counter"))?;
    let functions_mount = format!("{}:/functions:ro", functions.display());
    let state_mount = format!("{}:/var/lib/wasmbox", state.display());
    let (c, client) = start_ready(&name("volumes"), &["--volume", &functions_mount, "--volume", &state_mount]).await?;

    let r = client.post("/mine", "").await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "nothing named mine yet: {}", r.text());
    drop_in(&functions, "mine.wasm", &staged_function("hello"))?;
    eventually(&client, "/mine", "", "dropped in", |s, t| s == StatusCode::OK && t.contains("Hello")).await?;
    drop_in(&functions, "mine.wasm", &staged_function("echo"))?;
    eventually(&client, "/mine", "replaced", "replaced", |s, t| s == StatusCode::OK && t == "replaced").await?;
    std::fs::remove_file(functions.join("mine.wasm"))?;
    eventually(&client, "/mine", "", "removed", |s, _| s == StatusCode::NOT_FOUND).await?;

    let r = client.post("/sessions/counter", "").await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let id = r.json()["id"].as_str().context("session id")?.to_string();
    let message = format!("/sessions/counter/{id}");
    for expected in ["1", "2"] {
        let r = client.post(&message, "incr visits").await?;
        assert_eq!((r.status, r.text().trim()), (StatusCode::OK, expected));
    }
    engine().run(&["restart", "--time", "30", &c.name])?;
    c.wait_until(Duration::from_secs(60), "ready after the restart", || answers(&client, "/ready")).await?;
    let r = client.post(&message, "get visits").await?;
    assert_eq!((r.status, r.text().trim()), (StatusCode::OK, "2"), "the session outlived the restart");
    let r = client.post(&message, "incr visits").await?;
    assert_eq!((r.status, r.text().trim()), (StatusCode::OK, "3"));
    drop(c);
    // What the container wrote into the state volume is the supervisor's, as the operator
    // set it up.
    let sessions = state.join("sessions/counter");
    let snapshots: Vec<u32> = std::fs::read_dir(&sessions)
        .with_context(|| format!("{} on the host", sessions.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "snap"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .collect();
    assert_eq!(snapshots, vec![10001], "one snapshot, the supervisor's, in {}", sessions.display());
    Ok(())
}

/// Steady load through nginx (Debian's, on the host, configured as deployment/README.md
/// says) onto two replicas while one is stopped gracefully and started again, and then the
/// other is killed and started again: every request is answered.
#[tokio::test]
async fn two_replicas_behind_nginx_answer_every_request_through_a_stop_and_a_kill() -> anyhow::Result<()> {
    let replica_env = ["--env", "WASMBOX_DRAIN_TIMEOUT_MS=10000", "--env", "WASMBOX_WORKERS=2"];
    let (first, first_client) = start_ready(&name("replica-1"), &replica_env).await?;
    let (second, second_client) = start_ready(&name("replica-2"), &replica_env).await?;
    let port = free_port()?;
    let nginx = Nginx::start(&[first_client.addr, second_client.addr], port, None)?;
    let lb = Client { addr: format!("127.0.0.1:{port}").parse()? };

    // Bounded: at most 3000 requests per client, whatever happens.
    let load = Load::start(&lb, 6, 3000, "/cpu-spin?arg=20", &[]);
    let progress = |more: usize, what: &'static str| {
        let load = &load;
        async move {
            let until = load.done() + more;
            let deadline = Instant::now() + Duration::from_secs(60);
            while load.done() < until {
                ensure!(Instant::now() < deadline, "load stalled {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(load.done())
        }
    };

    // A replica nginx saw fail stays out of its rotation for fail_timeout (10 s), also once
    // it is ready again: as in a rolling restart, the next one is touched only once nginx
    // sends requests to the restarted one again.
    let back_in_rotation = |addr: SocketAddr| {
        let seen = nginx.read("access.log").lines().count();
        let nginx = &nginx;
        async move {
            let deadline = Instant::now() + Duration::from_secs(40);
            let served = format!("upstream={addr} upstream_status=200");
            while !nginx.read("access.log").lines().skip(seen).any(|l| l.contains(&served)) {
                ensure!(Instant::now() < deadline, "nginx never sent a request to {addr} again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        }
    };

    let warm = progress(50, "before anything happened").await?;
    engine().run(&["stop", "--time", "30", &first.name])?;
    assert_eq!(first.exit_code()?, 0, "the first replica drained and exited 0:\n{}", first.logs());
    let after_stop = progress(50, "with the first replica stopped").await?;
    let rotation = back_in_rotation(first_client.addr);
    engine().run(&["start", &first.name])?;
    first.wait_until(Duration::from_secs(60), "ready again", || answers(&first_client, "/ready")).await?;
    rotation.await?;
    let after_start = progress(50, "after the first replica started again").await?;
    engine().run(&["kill", &second.name])?;
    let after_kill = progress(50, "with the second replica killed").await?;
    ensure!(!second.running(), "the second replica still runs after kill");
    let rotation = back_in_rotation(second_client.addr);
    engine().run(&["start", &second.name])?;
    second.wait_until(Duration::from_secs(60), "ready again", || answers(&second_client, "/ready")).await?;
    rotation.await?;
    let end = progress(50, "after the second replica started again").await?;
    let (total, failures) = load.finish().await?;
    let log = nginx.read("access.log");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("/cpu-spin?arg=20")).collect();
    let served_by = |addr: SocketAddr| lines.iter().filter(|l| l.contains(&format!("upstream={addr} "))).count();
    let retried = lines.iter().filter(|l| l.contains(", ")).count();
    eprintln!(
        "behind nginx: {total} requests, {} failed; {} answered by the first replica, {} by the second, {retried} \
         retried on the other after an error; milestones: warm {warm}, first stopped {after_stop}, started \
         {after_start}, second killed {after_kill}, started {end}",
        failures.len(),
        served_by(first_client.addr),
        served_by(second_client.addr),
    );
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}\n{log}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(lines.iter().all(|l| l.starts_with("200 ")), "every answer through nginx was 200:\n{log}");
    assert!(served_by(first_client.addr) > 0 && served_by(second_client.addr) > 0, "both replicas served:\n{log}");
    // Requests nginx sent to a replica as it went away were handed to the other (the
    // README's proxy_next_upstream), not failed.
    assert!(retried >= 1, "no request was retried on the other replica:\n{log}");
    let killed = second.logs();
    assert!(!killed.is_empty(), "the second replica logged");
    Ok(())
}
