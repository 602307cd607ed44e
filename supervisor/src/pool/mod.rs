//! The worker pool: a fixed number of slots, each kept filled with a live worker process.
//!
//! Dispatch takes an idle worker (preferring one that already has the function's module
//! compiled), or waits in a bounded FIFO queue. With tenants isolated, a worker serves one
//! tenant for its whole life: it starts clean (a spare), is bound to the first tenant it
//! runs, and a slot that must run another tenant's code is recycled into a fresh process
//! (see [`state`] for the order of preference). Each slot has a supervision task
//! ([`slot`]) that starts its worker through a [`Launch`], shakes hands, watches it, and
//! replaces it when it dies. A [`Lease`] ends either by returning a healthy worker or by
//! killing a broken one; the slot task then starts a fresh process, so a crash costs one
//! request and never a slot.

pub mod connection;
mod error;
mod lease;
mod slot;
pub mod spawn;
mod state;
pub mod zygote;

#[cfg(test)]
mod tests;

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot, watch};
use wasmbox_protocol::{Invocation, InvocationResult, ToWorker};

pub use self::error::{AcquireError, ExitReason, InvokeFailure, SpawnError, WorkerExits, describe_exit};
pub use self::lease::Lease;
use self::lease::Waiting;
pub use self::spawn::{Launch, LaunchCounts, ProcessLauncher, Spawner, WorkerLaunch};
use self::state::{Life, State, Tenant, Waiter, Worker};
use crate::cgroup::{Accounting, SlotCgroup};

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub size: usize,
    pub queue_depth: usize,
    pub launch: WorkerLaunch,
    pub handshake_timeout: Duration,
    pub kill_grace: Duration,
    pub compile_timeout: Duration,
    /// Largest frame payload accepted from a worker (stdout + stderr tail).
    pub max_reply_bytes: u64,
    /// One cgroup per slot, by slot index; empty when cgroups are off.
    pub cgroups: Vec<Arc<SlotCgroup>>,
    /// Extra memory a worker's cgroup allows while it compiles a module it has not seen.
    pub compile_memory_bytes: u64,
    /// Replace a worker after this many invocations (None: never).
    pub max_invocations: Option<u64>,
    /// A worker runs one tenant's code for its whole life (`WASMBOX_TENANCY=isolated`).
    pub isolate_tenants: bool,
    /// Clean workers kept idle for tenant switches (isolated tenancy only).
    pub spare_workers: usize,
    /// How long a tenant's worker must have been idle before it is recycled into a spare,
    /// so a busy tenant's workers are never taken from it to make spares.
    pub spare_after_idle: Duration,
}

/// Identifies one worker process: its slot and which incarnation of that slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerId {
    pub slot: usize,
    pub generation: u64,
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.slot, self.generation)
    }
}

/// A finished invocation.
#[derive(Debug)]
pub struct Completed {
    pub result: InvocationResult,
    pub stdout: Bytes,
    pub stderr: Bytes,
    /// A session step's new snapshot (empty otherwise).
    pub snapshot: Bytes,
    /// CPU time and peak memory from the worker's cgroup, when cgroups are on.
    pub accounting: Option<Accounting>,
}

/// Pool counters for readiness and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStatus {
    pub configured: usize,
    pub live: usize,
    pub idle: usize,
    pub busy: usize,
    pub queued: usize,
    pub draining: bool,
    pub restarts: u64,
    /// Workers the kernel OOM-killed.
    pub oom_kills: u64,
    /// Idle workers bound to no tenant yet (isolated tenancy).
    pub spares: usize,
    /// Requests served by a worker that had to be given to their tenant first: a spare
    /// bound to it, or a slot recycled for it.
    pub tenant_switches: u64,
    /// Times the zygote was started again after it died.
    pub zygote_restarts: u64,
    /// Workers started by exec because the zygote could not fork them.
    pub exec_spawns: u64,
    /// Workers that ended while the pool ran (each then replaced), by why.
    pub exits: WorkerExits,
}

/// One invocation for a worker: the message it reads, and beside it what only the
/// supervisor enforces.
pub struct Job {
    /// What the worker is told: the module, argv, the engine's own limits (linear memory,
    /// deadline, output caps)...
    pub invocation: Invocation,
    /// What the worker's cgroup enforces; the worker never sees it.
    pub limits: Limits,
    /// The frame's payload in parts, sent as they are (one vectored write).
    pub payload: Vec<Bytes>,
    /// The preopened directories the worker gets with the frame (see
    /// `Invocation::passed_fds`). The module file (`Invocation::module`) and its artifact
    /// go before them only to a worker that does not have the module in memory: the lease
    /// opens the file then.
    pub files: Vec<OwnedFd>,
    pub artifact: Option<Arc<crate::compiler::Artifact>>,
    /// Where a `wasi:http` response goes as the worker sends it (`Invocation::http`).
    pub response: Option<HttpStreams>,
}

/// A `wasi:http` exchange's streams. The request body, when it is streamed
/// (`HttpRequest::streamed`): pieces, then `None` once it is whole; a channel closed
/// before that is a body the client failed to send. The response: the head once, then the
/// body pieces and `None` once the body is whole. A body that ends without `None` was cut
/// (the function failed after its head, or the worker died): its reader must treat it as
/// an error.
pub struct HttpStreams {
    pub request: Option<tokio::sync::mpsc::Receiver<Option<Bytes>>>,
    pub head: Option<oneshot::Sender<wasmbox_protocol::ResponseHead>>,
    pub body: tokio::sync::mpsc::Sender<Option<Bytes>>,
}

/// Bytes of a streamed request body a worker may hold at once besides the guest's memory
/// (its socket reader's pieces), counted in its cgroup's allowance.
pub const STREAMED_BODY_HELD: u64 = 8 * wasmbox_protocol::MAX_REQUEST_PIECE as u64;

/// An invocation's limits as the kernel enforces them, on the worker's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU share in millicores (1000 = one CPU).
    pub cpu_quota_millis: u64,
    /// The memory the invocation asked for (`Memory-Request`); its cgroup allows this
    /// plus the bytes the worker holds for its input and output.
    pub memory_request_bytes: u64,
}

struct Shared {
    config: PoolConfig,
    state: Mutex<State>,
    /// How workers are started: the zygote or exec (a simulation in the pool's tests).
    launcher: Arc<dyn Launch>,
    changed: Notify,
    closed: watch::Sender<bool>,
    generations: AtomicU64,
    restarts: AtomicU64,
    oom_kills: AtomicU64,
    exits: std::sync::Mutex<WorkerExits>,
    /// (engine, version) from the first hello.
    engine: Mutex<Option<(String, String)>>,
    slots: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Handle to the pool; clones share it.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

impl Pool {
    /// Starts every slot, its workers started by `launcher`, and waits until each has a
    /// worker that completed its handshake.
    pub async fn start(config: PoolConfig, launcher: Arc<dyn Launch>) -> Result<Pool, SpawnError> {
        let pool = Pool(Arc::new(Shared {
            state: Mutex::new(State::new(&config)),
            launcher,
            changed: Notify::new(),
            closed: watch::channel(false).0,
            generations: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            oom_kills: AtomicU64::new(0),
            exits: std::sync::Mutex::new(WorkerExits::default()),
            engine: Mutex::new(None),
            slots: Mutex::new(Vec::new()),
            config,
        }));
        let mut ready = Vec::new();
        for slot in 0..pool.0.config.size {
            let (tx, rx) = oneshot::channel();
            let task = tokio::spawn(pool.clone().supervise_slot(slot, tx));
            lock(&pool.0.slots).push(task);
            ready.push(rx);
        }
        if pool.0.config.isolate_tenants && pool.0.config.spare_workers > 0 {
            let task = tokio::spawn(pool.clone().tend_spares());
            lock(&pool.0.slots).push(task);
        }
        for rx in ready {
            if let Ok(Err(e)) | Err(e) = rx.await.map_err(|_| SpawnError::Handshake {
                binary: pool.0.config.launch.binary.display().to_string(),
                detail: "slot task ended".into(),
            }) {
                pool.shutdown(Duration::from_secs(2)).await;
                return Err(e);
            }
        }
        Ok(pool)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.0.state)
    }

    pub fn config(&self) -> &PoolConfig {
        &self.0.config
    }

    /// The engine and its version, as the first worker reported them.
    pub fn engine(&self) -> Option<(String, String)> {
        lock(&self.0.engine).clone()
    }

    pub fn status(&self) -> PoolStatus {
        let launches = self.0.launcher.counts();
        let st = self.state();
        PoolStatus {
            configured: self.0.config.size,
            live: st.live,
            idle: st.idle.len(),
            busy: st.busy,
            queued: st.waiters.len(),
            draining: st.draining,
            restarts: self.0.restarts.load(Ordering::Relaxed),
            oom_kills: self.0.oom_kills.load(Ordering::Relaxed),
            spares: st.idle.iter().filter(|w| st.isolate_tenants && w.tenant.is_none()).count(),
            tenant_switches: st.tenant_switches,
            zygote_restarts: launches.zygote_restarts,
            exec_spawns: launches.exec_spawns,
            exits: *self.0.exits.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    fn slot_cgroup(&self, slot: usize) -> Option<&Arc<SlotCgroup>> {
        self.0.config.cgroups.get(slot)
    }

    /// Takes a worker for one invocation of `tenant`'s module with hash `module_hash`.
    pub async fn acquire(&self, tenant: &str, module_hash: &str) -> Result<Lease, AcquireError> {
        let asked = Instant::now();
        let rx = {
            let mut st = self.state();
            if st.draining {
                return Err(AcquireError::ShuttingDown);
            }
            let tenant: Option<Tenant> = st.isolate_tenants.then(|| Arc::from(tenant));
            let switches = st.tenant_switches;
            if let Some(worker) = st.take_idle(tenant.as_ref(), module_hash) {
                st.busy += 1;
                let took_spare = st.tenant_switches != switches;
                st.keep_spares(if took_spare { tenant.as_ref() } else { None });
                drop(st);
                return Ok(Lease::new(self.clone(), worker, asked));
            }
            let depth = self.0.config.queue_depth;
            if st.waiters.len() >= depth {
                // Waiters whose clients went away still hold a place; drop them first.
                st.waiters.retain(|w| !w.tx.is_closed());
            }
            if st.waiters.len() >= depth {
                return Err(AcquireError::QueueFull { depth });
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(Waiter { tenant, tx });
            st.serve_waiters();
            rx
        };
        self.0.changed.notify_waiters();
        let mut wait = Waiting { rx: Some(rx), pool: self.clone() };
        let received = match wait.rx.as_mut() {
            Some(rx) => rx.await,
            None => return Err(AcquireError::ShuttingDown),
        };
        wait.rx = None;
        match received {
            Ok(worker) => Ok(Lease::new(self.clone(), worker, asked)),
            Err(_) => Err(AcquireError::ShuttingDown),
        }
    }

    /// A lease ended with a healthy worker.
    fn give_back(&self, worker: Worker) {
        let mut st = self.state();
        st.busy -= 1;
        if !st.closed && !worker.life.is_dead() {
            st.place(worker);
        }
        drop(st);
        self.0.changed.notify_waiters();
    }

    /// A lease ended with a worker in an unknown state: kill it; its slot starts a new one.
    fn discard(&self, worker: Worker) -> Arc<Life> {
        worker.life.kill.notify_one();
        let life = worker.life.clone();
        self.state().busy -= 1;
        self.0.changed.notify_waiters();
        life
    }

    /// Stops handing out workers to new requests; queued ones are still served.
    pub fn begin_drain(&self) {
        self.state().draining = true;
        self.0.changed.notify_waiters();
    }

    /// Waits until no invocation runs or waits, or the deadline passes; true if quiet.
    pub async fn wait_quiet(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.0.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.state();
                if st.busy == 0 && st.waiters.iter().all(|w| w.tx.is_closed()) {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until every slot has a live worker, or the deadline passes.
    pub async fn wait_full(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.0.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state().live == self.0.config.size {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Stops every worker: idle ones get `Shutdown`, busy ones are killed after `grace`.
    /// Queued requests are answered with `ShuttingDown`. Returns when all are reaped.
    pub async fn shutdown(&self, grace: Duration) {
        let (idle, waiters) = {
            let mut st = self.state();
            st.closed = true;
            st.draining = true;
            (std::mem::take(&mut st.idle), std::mem::take(&mut st.waiters))
        };
        drop(waiters);
        self.0.closed.send_replace(true);
        for mut worker in idle {
            let _ = worker.conn.send(&ToWorker::Shutdown).await;
        }
        let slots = std::mem::take(&mut *lock(&self.0.slots));
        let all = futures_join_all(slots);
        if tokio::time::timeout(grace + Duration::from_secs(5), all).await.is_err() {
            tracing::warn!("some worker slots did not stop in time");
        }
        self.0.launcher.stop().await;
        self.0.changed.notify_waiters();
    }

    /// Turns tenants' workers that stayed idle into spares (see [`State::keep_spares`]),
    /// until the pool closes.
    async fn tend_spares(self) {
        let mut closed = self.0.closed.subscribe();
        let tick = (self.0.config.spare_after_idle / 4).max(Duration::from_millis(50));
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => self.state().keep_spares(None),
                () = closed_signal(&mut closed) => return,
            }
        }
    }
}

/// Resolves once the pool is closed (owning nothing across awaits, so it stays `Send`).
pub(super) async fn closed_signal(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await.map(|_| ());
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn futures_join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}
