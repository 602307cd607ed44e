//! The pool over simulated workers: a [`Launch`] whose workers are tasks in this process
//! speaking the worker protocol on a socketpair, each told what to do by the function it is
//! asked to run. Dispatch, queueing, tenancy, replacement and the exchange's deadlines are
//! the pool's real code.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmbox_protocol::{
    Deadlines, FromWorker, Hello, Invocation, InvocationResult, ModuleRef, ModuleSource, Outcome, PREFIX_LEN,
    PROTOCOL_VERSION, ToWorker, decode_header, encode_head, parse_prefix,
};

use super::connection::Connection;
use super::lease::{Exchange, exchange};
use super::spawn::{BoxFuture, Launch, Process, Spawned, WorkerLaunch};
use super::state::{Life, Worker};
use super::{AcquireError, InvokeFailure, Job, Limits, Pool, PoolConfig, SpawnError, WorkerId};

/// A simulated worker process: a task whose return value is its exit code.
pub struct Simulated {
    task: tokio::task::JoinHandle<i32>,
    status: Option<ExitStatus>,
}

impl Simulated {
    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = match (&mut self.task).await {
            Ok(code) => ExitStatus::from_raw(code << 8),
            Err(_) => ExitStatus::from_raw(9),
        };
        self.status = Some(status);
        Ok(status)
    }

    pub(super) fn start_kill(&mut self) -> io::Result<()> {
        self.task.abort();
        Ok(())
    }
}

/// Starts simulated workers that greet with `protocol`.
struct Simulator {
    protocol: u32,
    started: AtomicU32,
}

impl Simulator {
    fn new() -> Arc<Self> {
        Arc::new(Simulator { protocol: PROTOCOL_VERSION, started: AtomicU32::new(0) })
    }
}

impl Launch for Simulator {
    fn launch(&self, _slot: usize, _placement: Vec<RawFd>) -> BoxFuture<'_, io::Result<Spawned>> {
        Box::pin(async move {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
            ours.set_nonblocking(true)?;
            theirs.set_nonblocking(true)?;
            let theirs = tokio::net::UnixStream::from_std(theirs)?;
            let pid = 1000 + self.started.fetch_add(1, Ordering::Relaxed);
            let task = tokio::spawn(simulated_worker(theirs, pid, self.protocol));
            Ok(Spawned { child: Process::Simulated(Simulated { task, status: None }), socket: ours })
        })
    }
}

/// The worker side: hello, then per invocation what its function name says:
/// `ok` echoes stdin with exit 0, `crash` exits 1 without answering, `hang` never answers.
async fn simulated_worker(mut stream: tokio::net::UnixStream, pid: u32, protocol: u32) -> i32 {
    let hello = FromWorker::Hello(Hello {
        protocol,
        worker_version: "test".into(),
        engine: "wasmtime".into(),
        engine_version: "test".into(),
        pid,
        cgroup: String::new(),
        hardening: Vec::new(),
        deadlines: Deadlines::Engine,
    });
    if stream.write_all(&encode_head(&hello, 0)).await.is_err() {
        return 2;
    }
    loop {
        let (message, mut payload) = match read_message(&mut stream).await {
            Ok(Some(read)) => read,
            Ok(None) => return 0,
            Err(code) => return code,
        };
        let invocation = match message {
            ToWorker::Invoke(invocation) => invocation,
            ToWorker::Shutdown => return 0,
            _ => return 5,
        };
        match invocation.function.as_str() {
            // A wasi:http handler that asks for its streamed body and echoes each piece as
            // it comes (`stream-echo`), or answers after the first piece without reading on
            // (`stream-early`); the stdout it reports is what it read, and it expects the
            // body's end (whole, or cut) before its next invocation.
            echo @ ("stream-echo" | "stream-early") => {
                let head =
                    FromWorker::ResponseHead(wasmbox_protocol::ResponseHead { status: 200, headers: Vec::new() });
                let mut out = encode_head(&FromWorker::RequestBodyWanted, 0);
                out.extend_from_slice(&encode_head(&head, 0));
                if stream.write_all(&out).await.is_err() {
                    return 7;
                }
                loop {
                    match read_message(&mut stream).await {
                        Ok(Some((ToWorker::RequestBody, piece))) => {
                            let mut frame = encode_head(&FromWorker::ResponseBody, piece.len());
                            frame.extend_from_slice(&piece);
                            payload.extend_from_slice(&piece);
                            if stream.write_all(&frame).await.is_err() {
                                return 8;
                            }
                            if echo == "stream-early" {
                                break;
                            }
                        }
                        Ok(Some((ToWorker::RequestEnd { whole: true }, _))) if echo == "stream-echo" => break,
                        _ => return 9,
                    }
                }
                if echo == "stream-early" {
                    let result = result_frame(&payload);
                    if stream.write_all(&result).await.is_err() {
                        return 6;
                    }
                    // What follows until the end is dropped; the end says the body was cut.
                    loop {
                        match read_message(&mut stream).await {
                            Ok(Some((ToWorker::RequestBody, _))) => {}
                            Ok(Some((ToWorker::RequestEnd { whole: false }, _))) => break,
                            _ => return 10,
                        }
                    }
                    continue;
                }
            }
            // Reports whether the module file came with the invocation, and which
            // descriptors the invocation says it has (`module_fd artifact passed_fds`).
            "fd-report" => {
                payload = format!("{} {} {}", invocation.module_fd, invocation.artifact, invocation.passed_fds).into();
            }
            // A worker whose own cache keeps nothing: without the file it cannot run.
            "forgetful" if !invocation.module_fd => {
                let frame = FromWorker::Result(InvocationResult {
                    outcome: Outcome::ModuleNotHeld,
                    stdout_len: 0,
                    stderr_len: 0,
                    stderr_dropped: 0,
                    module_source: None,
                    prepare_us: 0,
                    exec_us: 0,
                    snapshot_len: 0,
                    session: None,
                });
                if stream.write_all(&encode_head(&frame, 0)).await.is_err() {
                    return 6;
                }
                continue;
            }
            "crash" => return 1,
            "hang" => std::future::pending::<()>().await,
            // A response whose body breaks the bounds: one piece too large, or pieces past
            // the invocation's output limit.
            piece @ ("big-piece" | "past-limit") => {
                let head =
                    FromWorker::ResponseHead(wasmbox_protocol::ResponseHead { status: 200, headers: Vec::new() });
                if stream.write_all(&encode_head(&head, 0)).await.is_err() {
                    return 7;
                }
                let (size, count) =
                    if piece == "big-piece" { (wasmbox_protocol::MAX_RESPONSE_PIECE + 1, 1) } else { (1000, 2) };
                for _ in 0..count {
                    let mut frame = encode_head(&FromWorker::ResponseBody, size);
                    frame.resize(frame.len() + size, b'x');
                    if stream.write_all(&frame).await.is_err() {
                        return 8;
                    }
                }
                std::future::pending::<()>().await
            }
            _ => {}
        }
        if stream.write_all(&result_frame(&payload)).await.is_err() {
            return 6;
        }
    }
}

/// One frame from the supervisor; `Err` is the exit code of a worker that got garbage.
async fn read_message(stream: &mut tokio::net::UnixStream) -> Result<Option<(ToWorker, Vec<u8>)>, i32> {
    let mut prefix = [0u8; PREFIX_LEN];
    if stream.read_exact(&mut prefix).await.is_err() {
        return Ok(None);
    }
    let Ok(lengths) = parse_prefix(&prefix, 1 << 20) else { return Err(3) };
    let mut header = vec![0u8; lengths.header];
    let mut payload = vec![0u8; lengths.payload];
    if stream.read_exact(&mut header).await.is_err() || stream.read_exact(&mut payload).await.is_err() {
        return Err(4);
    }
    decode_header::<ToWorker>(&header).map(|m| Some((m, payload))).map_err(|_| 5)
}

/// A successful result whose stdout is `stdout`.
fn result_frame(stdout: &[u8]) -> Vec<u8> {
    let result = FromWorker::Result(InvocationResult {
        outcome: Outcome::Exited { code: 0 },
        stdout_len: stdout.len() as u64,
        stderr_len: 0,
        stderr_dropped: 0,
        module_source: Some(ModuleSource::Compiled),
        prepare_us: 0,
        exec_us: 1,
        snapshot_len: 0,
        session: None,
    });
    let mut frame = encode_head(&result, stdout.len());
    frame.extend_from_slice(stdout);
    frame
}

fn config(size: usize) -> PoolConfig {
    PoolConfig {
        size,
        queue_depth: 1,
        launch: WorkerLaunch {
            binary: "wasmbox-worker".into(),
            engine: "wasmtime".into(),
            cache_dir: None,
            module_cache_entries: 4,
            max_module_bytes: 1 << 20,
            log_filter: "warn".into(),
            log_json: false,
            engine_args: Vec::new(),
            hardening_args: Vec::new(),
            hardening_layers: Vec::new(),
            users: Vec::new(),
        },
        handshake_timeout: Duration::from_secs(5),
        kill_grace: Duration::from_millis(100),
        compile_timeout: Duration::from_millis(200),
        max_reply_bytes: 1 << 20,
        cgroups: Vec::new(),
        compile_memory_bytes: 0,
        max_invocations: None,
        isolate_tenants: false,
        spare_workers: 0,
        spare_after_idle: Duration::from_secs(60),
    }
}

fn invocation(function: &str, hash: &str, timeout_ms: u64) -> Invocation {
    Invocation {
        request_id: "r".into(),
        function: function.into(),
        // Any regular file stands in for the module: the pool opens it for a cold worker.
        module: ModuleRef { path: std::env::current_exe().unwrap(), sha256: hash.into() },
        argv: vec![function.into()],
        env: Vec::new(),
        preopens: Vec::new(),
        memory_limit_bytes: 1 << 20,
        timeout_ms,
        max_output_bytes: 1024,
        confirm_start: false,
        passed_fds: 0,
        module_fd: false,
        artifact: false,
        session: None,
        http: None,
    }
}

fn job(function: &str, hash: &str, timeout_ms: u64, stdin: &'static [u8]) -> Job {
    Job {
        invocation: invocation(function, hash, timeout_ms),
        limits: Limits { cpu_quota_millis: 1000, memory_request_bytes: 1 << 20 },
        payload: vec![Bytes::from_static(stdin)],
        files: Vec::new(),
        artifact: None,
        response: None,
    }
}

async fn start(config: PoolConfig) -> Pool {
    tokio::time::timeout(Duration::from_secs(10), Pool::start(config, Simulator::new()))
        .await
        .expect("the pool started in time")
        .expect("the pool started")
}

/// Waits (bounded) until `check` holds of the pool's status.
async fn until(pool: &Pool, what: &str, check: impl Fn(&super::PoolStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check(&pool.status()) {
        assert!(Instant::now() < deadline, "{what}: {:?}", pool.status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const A: &str = "aaaa";
const B: &str = "bbbb";

#[tokio::test]
async fn an_invocation_runs_and_its_worker_is_reused() {
    let pool = start(config(1)).await;
    let lease = pool.acquire("t", A).await.unwrap();
    let first = lease.worker_id().unwrap();
    let done = lease.invoke(job("ok", A, 1000, b"stdin")).await.unwrap();
    assert_eq!(done.result.outcome, Outcome::Exited { code: 0 });
    assert_eq!(done.stdout, "stdin");
    let again = pool.acquire("t", A).await.unwrap();
    assert_eq!(again.worker_id(), Some(first), "a healthy worker goes back to the pool");
    drop(again);
    assert_eq!(pool.status().restarts, 0);
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn the_module_file_goes_only_to_a_worker_without_the_module() {
    let pool = start(config(1)).await;
    let report = |hash| {
        let pool = pool.clone();
        async move {
            let lease = pool.acquire("t", hash).await.unwrap();
            let done = lease.invoke(job("fd-report", hash, 1000, b"")).await.unwrap();
            String::from_utf8(done.stdout.to_vec()).unwrap()
        }
    };
    assert_eq!(report(A).await, "true false 1", "cold: the module file");
    assert_eq!(report(A).await, "false false 0", "warm: nothing to open or pass");
    assert_eq!(report(B).await, "true false 1", "another module is cold again");
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_worker_without_the_module_it_was_thought_to_have_gets_the_file() {
    let pool = start(config(1)).await;
    for round in 0..3 {
        let lease = pool.acquire("t", A).await.unwrap();
        let done = lease.invoke(job("forgetful", A, 1000, b"in")).await.unwrap();
        assert_eq!(done.result.outcome, Outcome::Exited { code: 0 }, "round {round}");
        assert_eq!(done.stdout, "in");
    }
    assert_eq!(pool.status().restarts, 0, "the same worker, in step");
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_worker_that_has_the_module_is_preferred() {
    let pool = start(config(2)).await;
    let (la, lb) = (pool.acquire("t", A).await.unwrap(), pool.acquire("t", B).await.unwrap());
    let (wa, wb) = (la.worker_id().unwrap(), lb.worker_id().unwrap());
    assert_ne!(wa, wb);
    la.invoke(job("ok", A, 1000, b"")).await.unwrap();
    lb.invoke(job("ok", B, 1000, b"")).await.unwrap();
    // B's worker was used last, so without the preference A would get it.
    let a = pool.acquire("t", A).await.unwrap();
    assert_eq!(a.worker_id(), Some(wa), "A's module is warm in its worker");
    let b = pool.acquire("t", B).await.unwrap();
    assert_eq!(b.worker_id(), Some(wb));
    drop((a, b));
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn the_queue_is_bounded_and_a_waiter_gets_the_next_free_worker() {
    let pool = start(config(1)).await;
    let held = pool.acquire("t", A).await.unwrap();
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire("t", A).await.map(|l| l.worker_id()) }
    });
    until(&pool, "one request queued", |s| s.queued == 1).await;
    match pool.acquire("t", A).await {
        Err(AcquireError::QueueFull { depth: 1 }) => {}
        other => panic!("expected a full queue, got {:?}", other.map(|l| l.worker_id())),
    }
    let id = held.worker_id();
    drop(held);
    let got = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
    assert_eq!(got, id, "the waiter got the worker given back");
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_worker_that_dies_mid_invocation_is_replaced() {
    let pool = start(config(1)).await;
    let lease = pool.acquire("t", A).await.unwrap();
    let first = lease.worker_id().unwrap();
    match lease.invoke(job("crash", A, 1000, b"")).await {
        Err(InvokeFailure::WorkerDied { detail }) => assert_eq!(detail, "exited with status 1"),
        other => panic!("expected the worker's death, got {other:?}"),
    }
    until(&pool, "a replacement is up", |s| s.live == 1 && s.idle == 1).await;
    let status = pool.status();
    assert_eq!((status.restarts, status.exits.crash), (1, 1));
    let next = pool.acquire("t", A).await.unwrap();
    let second = next.worker_id().unwrap();
    assert_eq!(second.slot, first.slot);
    assert!(second.generation > first.generation, "{first} then {second}");
    next.invoke(job("ok", A, 1000, b"")).await.unwrap();
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_worker_past_its_hard_deadline_is_killed_and_replaced() {
    let pool = start(config(1)).await;
    let lease = pool.acquire("t", A).await.unwrap();
    let ran = tokio::time::timeout(Duration::from_secs(10), lease.invoke(job("hang", A, 50, b""))).await;
    match ran.expect("the hard deadline ended it") {
        Err(InvokeFailure::HardDeadline) => {}
        other => panic!("expected the hard deadline, got {other:?}"),
    }
    until(&pool, "a replacement is up", |s| s.live == 1 && s.idle == 1).await;
    assert_eq!(pool.status().exits.timeout_kill, 1);
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn workers_are_recycled_after_their_quota_of_invocations() {
    let mut config = config(1);
    config.max_invocations = Some(2);
    let pool = start(config).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let lease = tokio::time::timeout(Duration::from_secs(10), pool.acquire("t", A)).await.unwrap().unwrap();
        ids.push(lease.worker_id().unwrap());
        lease.invoke(job("ok", A, 1000, b"")).await.unwrap();
    }
    assert_eq!(ids[0], ids[1]);
    assert_ne!(ids[1], ids[2], "the third invocation ran in a fresh worker");
    until(&pool, "the recycle is counted", |s| s.exits.recycle == 1).await;
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn isolated_tenants_never_share_a_worker_process() {
    let mut config = config(2);
    config.isolate_tenants = true;
    config.spare_workers = 1;
    let pool = start(config).await;
    let mut seen: Vec<(String, WorkerId)> = Vec::new();
    for tenant in ["a", "b", "c", "a", "b"] {
        let lease = tokio::time::timeout(Duration::from_secs(10), pool.acquire(tenant, A)).await.unwrap().unwrap();
        let id = lease.worker_id().unwrap();
        for (other, other_id) in &seen {
            assert!(other == tenant || *other_id != id, "{tenant} got worker {id}, which ran {other}'s code");
        }
        seen.push((tenant.to_owned(), id));
        lease.invoke(job("ok", A, 1000, b"")).await.unwrap();
    }
    assert!(pool.status().tenant_switches >= 3);
    pool.shutdown(Duration::from_millis(100)).await;
}

/// A worker's response body is bounded by the supervisor too, not only by the worker: a
/// piece larger than a frame may carry, or more than the output limit in all, ends the
/// exchange and the worker.
#[tokio::test]
async fn a_response_body_past_its_bounds_is_a_protocol_violation() {
    let mut config = config(1);
    config.max_reply_bytes = 1 << 20;
    let pool = start(config).await;
    for function in ["big-piece", "past-limit"] {
        let lease = tokio::time::timeout(Duration::from_secs(10), pool.acquire("t", A)).await.unwrap().unwrap();
        let (head, _head_rx) = tokio::sync::oneshot::channel();
        let (body, mut body_rx) = tokio::sync::mpsc::channel(8);
        let mut job = job(function, A, 5000, b"");
        job.response = Some(super::HttpStreams { request: None, head: Some(head), body });
        let drain = tokio::spawn(async move { while body_rx.recv().await.is_some() {} });
        let ran = tokio::time::timeout(Duration::from_secs(10), lease.invoke(job)).await.expect("ended in time");
        match ran {
            Err(InvokeFailure::WorkerDied { detail }) => assert!(detail.contains("response body piece"), "{detail}"),
            other => panic!("{function}: expected a protocol violation, got {other:?}"),
        }
        drain.abort();
    }
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_draining_pool_takes_no_new_requests() {
    let pool = start(config(1)).await;
    pool.begin_drain();
    assert!(matches!(pool.acquire("t", A).await.map(|l| l.worker_id()), Err(AcquireError::ShuttingDown)));
    pool.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_worker_of_another_protocol_fails_the_start() {
    let launcher = Arc::new(Simulator { protocol: PROTOCOL_VERSION + 1, started: AtomicU32::new(0) });
    let started = tokio::time::timeout(Duration::from_secs(10), Pool::start(config(1), launcher)).await.unwrap();
    match started {
        Err(SpawnError::ProtocolMismatch { theirs, ours, .. }) => assert_eq!((theirs, ours), (ours + 1, ours)),
        Err(other) => panic!("expected a protocol mismatch, got {other}"),
        Ok(_) => panic!("a pool of workers speaking another protocol started"),
    }
}

/// A compromised worker that answers every invocation with `Started` over and over
/// would push its hard deadline out forever; the second one ends the exchange.
#[tokio::test]
async fn a_second_started_is_a_protocol_violation() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let mut theirs = tokio::net::UnixStream::from_std(theirs).unwrap();
    let mut worker = Worker {
        id: WorkerId { slot: 0, generation: 1 },
        pid: 1,
        conn: Connection::new(ours, 1 << 20).unwrap(),
        life: Arc::new(Life::new()),
        // Warm: no compile allowance, so the deadline is the invocation's own.
        modules: VecDeque::from([A.to_owned()]),
        invocations: 0,
        tenant: None,
        idle_since: Instant::now(),
        deadlines: Deadlines::Engine,
    };
    let fake = tokio::spawn(async move {
        let started = encode_head(&FromWorker::Started, 0);
        for _ in 0..100 {
            if theirs.write_all(&started).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let config = config(1);
    let ran = tokio::time::timeout(
        Duration::from_secs(3),
        exchange(&mut worker, &config, &ToWorker::Invoke(invocation("ok", A, 200)), &[], &[], None, &mut None),
    )
    .await
    .expect("the exchange ended instead of being extended by each started");
    match ran {
        Err(Exchange::Protocol(detail)) => assert!(detail.contains("second started"), "{detail}"),
        Err(Exchange::HardDeadline) => panic!("ended by the hard deadline, not by the second started"),
        Err(Exchange::Lost(detail)) => panic!("connection lost: {detail}"),
        Ok(_) => panic!("a result out of nothing"),
    }
    fake.abort();
}

#[test]
fn worker_id_display_is_slot_dot_generation() {
    assert_eq!(WorkerId { slot: 3, generation: 12 }.to_string(), "3.12");
}

/// A streamed request body goes out while the response comes in (the handler echoes each
/// piece before the next is sent), ends whole; a handler that answers before reading it
/// all gets the rest cut and the body's end, and its worker serves the next call in step.
#[tokio::test]
async fn a_streamed_request_body_flows_beside_the_response_and_ends_in_step() {
    let pool = start(config(1)).await;
    for function in ["stream-echo", "stream-early"] {
        let lease = tokio::time::timeout(Duration::from_secs(10), pool.acquire("t", A)).await.unwrap().unwrap();
        let pid = lease.worker_pid();
        let (head, head_rx) = tokio::sync::oneshot::channel();
        let (body, mut body_rx) = tokio::sync::mpsc::channel(8);
        let (pieces, request) = tokio::sync::mpsc::channel(2);
        let mut job = job(function, A, 5000, b"");
        job.invocation.http = Some(wasmbox_protocol::HttpRequest {
            method: "POST".into(),
            scheme: "http".into(),
            authority: "x".into(),
            path_with_query: "/".into(),
            headers: Vec::new(),
            streamed: true,
        });
        job.response = Some(super::HttpStreams { request: Some(request), head: Some(head), body });
        let ran = tokio::spawn(lease.invoke(job));
        tokio::time::timeout(Duration::from_secs(10), head_rx).await.unwrap().unwrap();
        // Each piece comes back before the next is sent: the two directions are concurrent.
        let mut echoed = Vec::new();
        for piece in ["one", "two", "three"] {
            if pieces.send(Some(Bytes::from(piece))).await.is_err() {
                break; // The early handler is done.
            }
            match tokio::time::timeout(Duration::from_secs(10), body_rx.recv()).await.unwrap() {
                Some(Some(back)) => echoed.push(String::from_utf8_lossy(&back).into_owned()),
                _ => break,
            }
        }
        let _ = pieces.send(None).await;
        let done = tokio::time::timeout(Duration::from_secs(10), ran).await.unwrap().unwrap().unwrap();
        if function == "stream-echo" {
            assert_eq!(echoed, ["one", "two", "three"]);
            assert_eq!(&done.stdout[..], b"onetwothree");
            let end = tokio::time::timeout(Duration::from_secs(10), body_rx.recv()).await.unwrap();
            assert_eq!(end, Some(None), "a whole response says so");
        } else {
            assert_eq!(echoed, ["one"]);
            assert_eq!(&done.stdout[..], b"one");
        }
        // The same worker takes the next call: the stream stayed in step.
        let lease = tokio::time::timeout(Duration::from_secs(10), pool.acquire("t", A)).await.unwrap().unwrap();
        assert_eq!(lease.worker_pid(), pid, "{function}");
        let again = tokio::time::timeout(Duration::from_secs(10), lease.invoke(job_ok())).await.unwrap().unwrap();
        assert_eq!(&again.stdout[..], b"next");
    }
}

fn job_ok() -> Job {
    job("ok", A, 5000, b"next")
}
