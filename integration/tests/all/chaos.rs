//! Chaos: steady mixed traffic while a random worker is SIGKILLed every 100 ms.
//!
//! Runs for WASMBOX_CHAOS_SECS seconds (default 60). Passes when no request goes
//! unanswered, every failure is a 502 `worker_died` (an invocation that was on a killed
//! worker) and there are no more of them than kills, the pool is back to full size, and
//! stopping the supervisor leaves no process and no cgroup behind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wasmbox_integration::{Reply, Supervisor, is_running, start_time, wait_gone};

const WORKERS: usize = 4;
const CLIENTS: usize = 8;
/// Pause between one client's requests: with 8 clients about 200 requests per second
/// offered, well within what 4 workers serve, so failures come from kills, not overload.
const PACE: Duration = Duration::from_millis(40);
const KILL_EVERY: Duration = Duration::from_millis(100);

/// Whether a reply is the correct answer to a request with this body.
type Check = fn(&Reply, &[u8]) -> bool;

/// One request of the mix and what a correct answer looks like.
fn request(n: u64) -> (&'static str, Bytes, Check) {
    match n % 4 {
        0 => ("/hello", Bytes::new(), |r, _| r.status == 200 && r.text() == "Hello from WasmBox!\n"),
        1 => ("/echo", Bytes::from(format!("chaos payload {n}").into_bytes()), |r, body| {
            r.status == 200 && r.body.as_ref() == body
        }),
        2 => ("/exit-code?arg=3", Bytes::new(), |r, _| r.status == 500 && r.json()["exit_code"] == 3),
        _ => ("/alloc?arg=4", Bytes::new(), |r, _| r.status == 200),
    }
}

/// A small xorshift generator: which worker dies next need not be cryptographic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test]
async fn random_worker_kills_lose_no_request() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("WASMBOX_CHAOS_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let mut s = Supervisor::builder()
        .workers(WORKERS)
        .function("hello")
        .function("echo")
        .function("exit-code")
        .function("alloc")
        .start()?;
    s.wait_pool_full(WORKERS, Duration::from_secs(30)).await?;
    // Compile each function once before the clock starts.
    for n in 0..4 {
        let (path, body, _) = request(n);
        s.request(Method::POST, path, &[], body).await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS as u64 {
        let client = s.client();
        let (stop, total) = (stop.clone(), total.clone());
        clients.push(tokio::spawn(async move {
            let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                let (path, body, correct) = request(n);
                n += CLIENTS as u64;
                total.fetch_add(1, Ordering::Relaxed);
                let sent = client.request(Method::POST, path, &[], body.clone());
                let outcome = match tokio::time::timeout(Duration::from_secs(30), sent).await {
                    Ok(Ok(reply)) if correct(&reply, &body) => "ok".to_string(),
                    Ok(Ok(reply)) if reply.status == 502 && reply.kind() == "worker_died" => "worker_died".into(),
                    Ok(Ok(reply)) => format!("unexpected {} {}: {}", reply.status, path, reply.text()),
                    Ok(Err(e)) => format!("lost: {e}"),
                    Err(_) => "lost: no response in 30 s".into(),
                };
                *outcomes.entry(outcome).or_default() += 1;
                tokio::time::sleep(PACE).await;
            }
            outcomes
        }));
    }

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()));
    let mut kills = 0u64;
    let mut killed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        tokio::time::sleep(KILL_EVERY).await;
        let pids = s.worker_pids();
        if pids.is_empty() {
            continue;
        }
        let pid = pids[(rng.next() % pids.len() as u64) as usize];
        let started = start_time(pid);
        if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            kills += 1;
            if let Some(t) = started {
                killed.push((pid, t));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for client in clients {
        for (k, v) in client.await? {
            *outcomes.entry(k).or_default() += v;
        }
    }
    let total = total.load(Ordering::Relaxed);
    let ok = outcomes.get("ok").copied().unwrap_or(0);
    let died = outcomes.get("worker_died").copied().unwrap_or(0);
    let lost: u64 = outcomes.iter().filter(|(k, _)| k.starts_with("lost")).map(|(_, v)| v).sum();
    let status = s.get("/ready").await?.json();
    eprintln!(
        "chaos: {secs} s, {CLIENTS} clients, {WORKERS} workers: requests {total}, ok {ok}, failed {} \
         (worker_died {died}), lost {lost}; workers killed {kills}; pool restarts {}",
        total - ok,
        status["pool"]["restarts"]
    );
    eprintln!("chaos outcomes: {outcomes:#?}");

    assert_eq!(lost, 0, "requests without a response: {outcomes:#?}");
    assert_eq!(ok + died, total, "every failure is a killed worker's invocation: {outcomes:#?}");
    assert!(died <= kills, "{died} failures for {kills} kills");
    assert!(ok > total / 2, "the service kept serving: {ok} of {total}");
    assert!(kills >= secs * 5, "the fault injector kept up: {kills} kills in {secs} s");

    // The pool heals, and nothing outlives the supervisor.
    s.wait_pool_full(WORKERS, Duration::from_secs(10)).await?;
    let reply = s.post("/hello", "").await?;
    assert_eq!(reply.status, 200);
    let survivors: Vec<(i32, u64)> = s.worker_pids().into_iter().filter_map(|p| Some((p, start_time(p)?))).collect();
    for (pid, t) in &killed {
        assert!(!is_running(*pid, *t), "killed worker {pid} still runs");
    }
    let cgroup_parent = s.cgroup_parent.clone();
    s.signal(Signal::SIGTERM)?;
    let exit = s.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(exit.code(), Some(0), "supervisor exit: {exit:?}");
    wait_gone(&survivors, Duration::from_secs(5)).await?;
    assert!(crate::cgroups::cgroup_dirs_named(&cgroup_parent).is_empty(), "cgroup {cgroup_parent} left behind");
    Ok(())
}
