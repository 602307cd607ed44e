//! A lease: one worker held for one invocation, and the exchange of frames with it
//! (deadlines, the switch from compile allowance to the invocation's limits, the reply's
//! checks). A worker that fails in any way is killed and replaced.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal;
use tokio::sync::oneshot;
use wasmbox_protocol::{Deadlines, FrameError, FromWorker, ToWorker};

use super::state::Worker;
use super::{Completed, ExitReason, HttpStreams, InvokeFailure, Job, Pool, PoolConfig, WorkerId, describe_exit};
use crate::cgroup::{Checkpoint, SlotCgroup, SlotRequest};
use crate::registry::files::open_regular;

/// Gives a worker back if the waiting request went away just as it was handed one.
pub(super) struct Waiting {
    pub(super) rx: Option<oneshot::Receiver<Worker>>,
    pub(super) pool: Pool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(worker) = rx.try_recv() {
                self.pool.give_back(worker);
            }
        }
    }
}

/// Exclusive use of one worker for one invocation.
pub struct Lease {
    pool: Pool,
    worker: Option<Worker>,
    /// Whether the worker can be reused if the lease ends now.
    clean: bool,
    pub queue_wait: Duration,
}

impl Lease {
    pub(super) fn new(pool: Pool, worker: Worker, asked: Instant) -> Self {
        Lease { pool, worker: Some(worker), clean: true, queue_wait: asked.elapsed() }
    }

    pub fn worker_id(&self) -> Option<WorkerId> {
        self.worker.as_ref().map(|w| w.id)
    }

    pub fn worker_pid(&self) -> Option<u32> {
        self.worker.as_ref().map(|w| w.pid)
    }

    /// Runs one invocation (see [`Job`]). The module file is opened and passed only when
    /// the worker does not have the module in memory, and its artifact with it when there
    /// is one; a worker that turns out not to have it after all is sent the invocation
    /// again with both. A worker that fails in any way is killed and replaced.
    pub async fn invoke(mut self, job: Job) -> Result<Completed, InvokeFailure> {
        let Job { invocation, limits, payload, files: mut preopens, artifact, mut response } = job;
        // The pool handle is one Arc; cloning the config would copy the launch settings and
        // every slot's cgroup handle on each invocation.
        let pool = self.pool.clone();
        let config = &pool.0.config;
        let Some(worker) = self.worker.as_mut() else {
            return Err(InvokeFailure::ShuttingDown);
        };
        let hash = invocation.module_key();
        let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
        let cgroup = self.pool.slot_cgroup(worker.id.slot).cloned();
        let request = SlotRequest {
            cpu_quota_millis: limits.cpu_quota_millis,
            memory_request_bytes: limits.memory_request_bytes,
            // A session step also holds the snapshot it restored and the one it captures.
            io_bytes: payload_len
                .saturating_add(invocation.max_output_bytes.saturating_mul(2))
                .saturating_add(if response.as_ref().is_some_and(|r| r.request.is_some()) {
                    super::STREAMED_BODY_HELD
                } else {
                    0
                })
                .saturating_add(invocation.session.as_ref().map_or(0, |s| s.max_snapshot_bytes)),
        };
        let mut message = ToWorker::Invoke(invocation);
        let mut attempt = 0;
        let (outcome, checkpoint) = loop {
            attempt += 1;
            let cold = !worker.modules.contains(&hash);
            let ToWorker::Invoke(invocation) = &mut message else { unreachable!("built above") };
            // Descriptors in the invocation's order: module, artifact, preopens.
            let mut files = Vec::with_capacity(preopens.len() + 2);
            if cold {
                let module = open_regular(&invocation.module.path).map_err(|e| {
                    InvokeFailure::ModuleUnreadable(format!("{}: {e}", invocation.module.path.display()))
                })?;
                files.push(OwnedFd::from(module));
                if let Some(fd) = artifact.as_ref().and_then(|a| a.for_worker()) {
                    files.push(fd);
                }
            }
            invocation.module_fd = cold;
            invocation.artifact = files.len() > 1;
            let passed_files = files.len();
            files.append(&mut preopens);
            invocation.passed_fds = files.len() as u32;
            let mut checkpoint = match &cgroup {
                Some(cg) => {
                    let allowance = if cold { config.compile_memory_bytes } else { 0 };
                    // Nothing was sent yet: on failure the worker goes back to the pool unharmed.
                    let prepared = cg.prepare_for(&request, allowance, worker.pid);
                    Some(prepared.map_err(|e| InvokeFailure::Limits(e.to_string()))?)
                }
                None => None,
            };
            invocation.confirm_start = cgroup.is_some();
            self.clean = false;
            let limits = cgroup.as_deref().zip(checkpoint.as_mut()).map(|(cg, cp)| StartLimits {
                cgroup: cg,
                request,
                checkpoint: cp,
            });
            let outcome = exchange(worker, config, &message, &payload, &files, limits, &mut response).await;
            match &outcome {
                // Its record was wrong: nothing ran, the connection is in step; again with the file.
                Ok(done)
                    if done.result.outcome == wasmbox_protocol::Outcome::ModuleNotHeld && !cold && attempt == 1 =>
                {
                    tracing::debug!(worker = %worker.id, module = %hash, "worker no longer has the module; sending it");
                    worker.forget_module(&hash);
                    preopens = files.split_off(passed_files);
                    self.clean = true;
                }
                _ => break (outcome, checkpoint),
            }
        };
        match outcome {
            Ok(mut done) => {
                // Only a module the worker prepared is in its cache now: one that failed to
                // compile or load is not, and must not make later calls look warm or cold.
                // One it interprets stays cold: its artifact is passed once there is one.
                if done.result.module_source.is_some_and(|s| s != wasmbox_protocol::ModuleSource::Interpreted) {
                    worker.note_module(&hash, config.launch.module_cache_entries);
                }
                worker.invocations += 1;
                // Recycling: a worker that served its quota is replaced instead of reused.
                let retire = config.max_invocations.is_some_and(|max| worker.invocations >= max);
                if retire {
                    tracing::debug!(worker = %worker.id, invocations = worker.invocations, "recycling worker");
                    worker.life.set_kill_reason(ExitReason::Recycle);
                }
                self.clean = !retire;
                done.accounting = cgroup.zip(checkpoint).map(|(cg, cp)| cg.finish(&cp));
                Ok(done)
            }
            Err(failure) => {
                let Some(worker) = self.worker.take() else {
                    return Err(InvokeFailure::ShuttingDown);
                };
                // A broken connection means it died by itself: the slot tells why.
                match failure {
                    Exchange::HardDeadline => worker.life.set_kill_reason(ExitReason::TimeoutKill),
                    Exchange::Protocol(_) => worker.life.set_kill_reason(ExitReason::Discarded),
                    Exchange::Lost(_) => {}
                }
                let life = self.pool.discard(worker);
                let mut exit = life.exit.subscribe();
                let status = tokio::time::timeout(Duration::from_secs(2), exit.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|s| *s));
                if life.oom_killed.load(Ordering::Relaxed) {
                    return Err(InvokeFailure::OomKilled {
                        limit_bytes: checkpoint.and_then(|c| c.memory_limit_bytes),
                    });
                }
                if *self.pool.0.closed.borrow() {
                    return Err(InvokeFailure::ShuttingDown);
                }
                Err(match failure {
                    Exchange::HardDeadline => InvokeFailure::HardDeadline,
                    Exchange::Protocol(detail) => InvokeFailure::WorkerDied { detail },
                    // The connection broke: the exit status says why (crash, OOM kill...).
                    Exchange::Lost(_) if status.and_then(|s| s.signal()) == Some(Signal::SIGSYS as i32) => {
                        InvokeFailure::SeccompViolation
                    }
                    Exchange::Lost(detail) => {
                        InvokeFailure::WorkerDied { detail: status.map(describe_exit).unwrap_or(detail) }
                    }
                })
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            if self.clean {
                self.pool.give_back(worker);
            } else {
                // Dropped mid-invocation: the worker's protocol state is unknown. (A
                // recycled worker comes here too, its reason already set.)
                if worker.life.kill_reason().is_none() {
                    worker.life.set_kill_reason(ExitReason::Discarded);
                }
                self.pool.discard(worker);
            }
        }
    }
}

/// What `exchange` needs to switch a worker from its compile allowance to the invocation's
/// own memory limit when the worker reports the module ready.
pub(super) struct StartLimits<'a> {
    cgroup: &'a SlotCgroup,
    request: SlotRequest,
    checkpoint: &'a mut Checkpoint,
}

pub(super) enum Exchange {
    HardDeadline,
    /// The connection broke (the worker died or closed it).
    Lost(String),
    /// The worker sent something it must not; it was killed.
    Protocol(String),
}

/// One invocation's frames with `worker`: `message` (an [`ToWorker::Invoke`]) out, then
/// what comes back until its `Result`. `response` is left as the exchange leaves it (a
/// `ModuleNotHeld` answer leaves it untouched, for another try).
pub(super) async fn exchange(
    worker: &mut Worker,
    config: &PoolConfig,
    message: &ToWorker,
    payload: &[Bytes],
    files: &[OwnedFd],
    mut limits: Option<StartLimits<'_>>,
    response: &mut Option<HttpStreams>,
) -> Result<Completed, Exchange> {
    let ToWorker::Invoke(invocation) = message else {
        return Err(Exchange::Protocol("not an invocation".into()));
    };
    // A session step restores and captures a snapshot besides running the guest: host work
    // bounded by the memory size, allowed as long as a compile.
    // What a wasi:http body may bring in all: the worker stops at the output limit itself;
    // one that does not is broken.
    let max_body = invocation.max_output_bytes;
    let mut body_bytes = 0u64;
    let timeout = Duration::from_millis(invocation.timeout_ms)
        + if invocation.session.is_some() { config.compile_timeout } else { Duration::ZERO };
    let compile_allowance =
        if worker.modules.contains(&invocation.module_key()) { Duration::ZERO } else { config.compile_timeout };
    // A worker whose engine cannot stop a command is killed at the deadline itself: that
    // kill is how the deadline is kept, not a backstop that waits for the engine.
    let grace = if worker.deadlines == Deadlines::Process && invocation.session.is_none() {
        Duration::ZERO
    } else {
        config.kill_grace
    };
    let mut hard_deadline = tokio::time::Instant::now() + compile_allowance + timeout + grace;
    let broken = |e: FrameError| match e {
        FrameError::Io(_) | FrameError::Truncated => Exchange::Lost(e.to_string()),
        other => Exchange::Protocol(format!("protocol violation: {other}")),
    };
    let streamed = invocation.http.as_ref().is_some_and(|h| h.streamed);
    if streamed && response.as_ref().is_none_or(|r| r.request.is_none()) {
        return Err(Exchange::Protocol("a streamed request without its body".into()));
    }
    let (sender, mut receiver) = worker.conn.split();
    sender.send_with_fds(message, payload, files).await.map_err(broken)?;
    let mut started = false;
    // The streamed request body goes out (once the worker asks for it) while its frames
    // come in; `stop` ends it early when the worker has answered without reading it all.
    let stop = tokio::sync::Notify::new();
    let mut pump: Option<Pump<'_>> = None;
    let mut asked = false;
    loop {
        let received = tokio::select! {
            received = tokio::time::timeout_at(hard_deadline, receiver.recv()) => received,
            sent = pumping(&mut pump) => {
                sent.map_err(broken)?;
                pump = None;
                continue;
            }
        };
        match received {
            Err(_) => return Err(Exchange::HardDeadline),
            Ok(Err(e)) => return Err(broken(e)),
            // `Started` restarts the hard deadline once; a worker that sends it again is
            // trying to run forever.
            Ok(Ok((FromWorker::Started, _))) if started || asked => {
                return Err(Exchange::Protocol("protocol violation: a second started in one invocation".into()));
            }
            Ok(Ok((FromWorker::Started, _))) => {
                started = true;
                if let Some(limits) = limits.as_mut() {
                    limits
                        .cgroup
                        .tighten(&limits.request, limits.checkpoint)
                        .map_err(|e| Exchange::Protocol(format!("cannot apply the invocation's memory limit: {e}")))?;
                    sender.send(&ToWorker::Proceed, &[]).await.map_err(broken)?;
                }
                hard_deadline = tokio::time::Instant::now() + timeout + grace;
            }
            Ok(Ok((FromWorker::RequestBodyWanted, _))) => {
                let Some(pieces) = response.as_mut().and_then(|r| r.request.take()).filter(|_| streamed) else {
                    return Err(Exchange::Protocol("protocol violation: a request body asked for out of place".into()));
                };
                asked = true;
                pump = Some(Box::pin(send_request_body(sender, pieces, &stop)));
            }
            Ok(Ok((FromWorker::ResponseHead(head), _))) => {
                let Some(head_sender) = response.as_mut().and_then(|r| r.head.take()) else {
                    return Err(Exchange::Protocol("protocol violation: a response head out of place".into()));
                };
                let _ = head_sender.send(head);
            }
            Ok(Ok((FromWorker::ResponseBody, payload))) => {
                let Some(sink) = response.as_ref().filter(|r| r.head.is_none()) else {
                    return Err(Exchange::Protocol("protocol violation: a response body out of place".into()));
                };
                body_bytes = body_bytes.saturating_add(payload.len() as u64);
                if payload.len() > wasmbox_protocol::MAX_RESPONSE_PIECE || body_bytes > max_body {
                    return Err(Exchange::Protocol(format!(
                        "protocol violation: a response body piece of {} bytes, {body_bytes} in all (limits {} and \
                         {max_body})",
                        payload.len(),
                        wasmbox_protocol::MAX_RESPONSE_PIECE
                    )));
                }
                // At the client's pace, within the hard deadline; a client that left takes
                // nothing more, and the rest is read and dropped. The request body keeps
                // going out meanwhile (a handler may echo as it reads).
                let delivered = sink.body.send(Some(payload));
                tokio::pin!(delivered);
                loop {
                    tokio::select! {
                        _ = &mut delivered => break,
                        sent = pumping(&mut pump) => {
                            sent.map_err(broken)?;
                            pump = None;
                        }
                        _ = tokio::time::sleep_until(hard_deadline) => return Err(Exchange::HardDeadline),
                    }
                }
            }
            Ok(Ok((FromWorker::Result(result), mut payload))) => {
                // A response whose body was whole says so; any other end leaves it cut.
                if let Some(sink) = response.as_ref().filter(|r| r.head.is_none()) {
                    if matches!(result.outcome, wasmbox_protocol::Outcome::Exited { code: 0 }) {
                        let _ = tokio::time::timeout_at(hard_deadline, sink.body.send(None)).await;
                    }
                }
                // The worker waits for the request body's end before its next frame: what
                // the handler did not read is cut short now.
                if let Some(body) = pump.take() {
                    stop.notify_one();
                    match tokio::time::timeout_at(hard_deadline, body).await {
                        Err(_) => return Err(Exchange::HardDeadline),
                        Ok(sent) => sent.map_err(broken)?,
                    }
                }
                let (out, err, snap) = (result.stdout_len, result.stderr_len, result.snapshot_len);
                if out.checked_add(err).and_then(|n| n.checked_add(snap)) != Some(payload.len() as u64) {
                    return Err(Exchange::Protocol(format!(
                        "protocol violation: reply payload is {} bytes, header says {out}+{err}+{snap}",
                        payload.len()
                    )));
                }
                let stdout = payload.split_to(out as usize);
                let stderr = payload.split_to(err as usize);
                return Ok(Completed { result, stdout, stderr, snapshot: payload, accounting: None });
            }
            Ok(Ok((FromWorker::Hello(_), _))) => {
                return Err(Exchange::Protocol("protocol violation: hello in the middle of a session".into()));
            }
            Ok(Ok((FromWorker::Forked { .. }, _))) => {
                return Err(Exchange::Protocol("protocol violation: a worker does not fork".into()));
            }
        }
    }
}

/// A streamed request body going out.
type Pump<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), FrameError>> + Send + 'a>>;

/// Waits for the request body to be sent, if one is being sent; otherwise never ends.
async fn pumping(pump: &mut Option<Pump<'_>>) -> Result<(), FrameError> {
    match pump.as_mut() {
        Some(body) => body.await,
        None => std::future::pending().await,
    }
}

/// Sends a streamed request body's pieces as the client sends them, then its end:
/// `whole` when the client sent all of it, cut when the client failed or `stop` came (the
/// worker answered without reading it all). Every frame is sent whole before `stop` is
/// heeded, so the stream to the worker stays in step.
async fn send_request_body(
    sender: super::connection::Sender<'_>,
    mut pieces: tokio::sync::mpsc::Receiver<Option<Bytes>>,
    stop: &tokio::sync::Notify,
) -> Result<(), FrameError> {
    let whole = loop {
        let piece = tokio::select! {
            biased;
            _ = stop.notified() => break false,
            piece = pieces.recv() => piece,
        };
        match piece {
            Some(Some(piece)) => sender.send(&ToWorker::RequestBody, &[piece]).await?,
            Some(None) => break true,
            None => break false,
        }
    };
    sender.send(&ToWorker::RequestEnd { whole }, &[]).await
}
