//! The worker pool: a fixed number of slots, each kept filled with a live worker process.
//!
//! Dispatch takes an idle worker (preferring one that already has the function's module
//! compiled), or waits in a bounded FIFO queue. With tenants isolated, a worker serves one
//! tenant for its whole life: it starts clean (a spare), is bound to the first tenant it
//! runs, and a slot that must run another tenant's code is recycled into a fresh process
//! (see [`State::take_idle`] and [`State::place`] for the order of preference). Each slot has a supervision task that
//! spawns its worker, shakes hands, watches it, and replaces it when it dies. A lease ends
//! either by returning a healthy worker or by killing a broken one; the slot task then
//! starts a fresh process, so a crash costs one request and never a slot.

pub mod connection;
pub mod spawn;
pub mod zygote;

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal;
use tokio::sync::{Notify, oneshot, watch};
use wasmbox_protocol::{
    Deadlines, FrameError, FromWorker, Hello, Invocation, InvocationResult, PROTOCOL_VERSION, ToWorker,
};

use self::connection::Connection;
use self::spawn::{Process, Spawned, Spawner, WorkerLaunch};
use self::zygote::Zygote;
use crate::cgroup::{Accounting, Checkpoint, SlotCgroup, SlotRequest};

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
    /// Fork workers from a zygote (exec when it cannot).
    pub zygote: bool,
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

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start worker binary {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {binary} did not complete its handshake: {detail}")]
    Handshake { binary: String, detail: String },
    #[error(
        "worker binary {binary} speaks protocol {theirs} but this supervisor speaks {ours}; \
         install wasmbox and wasmbox-worker from the same build"
    )]
    ProtocolMismatch { binary: String, theirs: u32, ours: u32 },
}

/// Why no worker could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    #[error("queue is full ({depth} requests waiting)")]
    QueueFull { depth: usize },
    #[error("shutting down")]
    ShuttingDown,
}

/// Why an invocation produced no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeFailure {
    #[error("worker died during the invocation: {detail}")]
    WorkerDied { detail: String },
    #[error("function ran past its deadline and grace period; worker killed")]
    HardDeadline,
    #[error("shutting down")]
    ShuttingDown,
    /// The kernel OOM-killed the worker: it went past its cgroup memory limit.
    #[error("worker was killed by the kernel for exceeding its memory limit")]
    OomKilled { limit_bytes: Option<u64> },
    /// The worker's cgroup limits could not be written; the invocation did not run.
    #[error("cannot apply the invocation's limits: {0}")]
    Limits(String),
    /// The worker made a syscall outside its seccomp allow-list and the kernel killed it.
    #[error("worker was killed by its seccomp filter (SIGSYS)")]
    SeccompViolation,
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

/// Why a worker process ended while the pool was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// It died on its own: a crash, a signal from outside, an unexpected exit.
    Crash,
    /// The kernel killed it at its cgroup's memory limit.
    OomKill,
    /// The kernel killed it for a syscall outside the seccomp allow-list.
    Seccomp,
    /// The supervisor killed it at an invocation's hard deadline.
    TimeoutKill,
    /// It served `WASMBOX_WORKER_MAX_INVOCATIONS` and was replaced.
    Recycle,
    /// The supervisor stopped it for another reason (a protocol error, an exchange
    /// abandoned halfway).
    Discarded,
    /// It served another tenant than the one its slot must run now (or a spare was
    /// wanted): replaced by a fresh process.
    TenantSwitch,
}

/// Worker exits counted by [`ExitReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkerExits {
    pub crash: u64,
    pub oom_kill: u64,
    pub seccomp: u64,
    pub timeout_kill: u64,
    pub recycle: u64,
    pub discarded: u64,
    pub tenant_switch: u64,
}

impl WorkerExits {
    fn count(&mut self, reason: ExitReason) {
        let n = match reason {
            ExitReason::Crash => &mut self.crash,
            ExitReason::OomKill => &mut self.oom_kill,
            ExitReason::Seccomp => &mut self.seccomp,
            ExitReason::TimeoutKill => &mut self.timeout_kill,
            ExitReason::Recycle => &mut self.recycle,
            ExitReason::Discarded => &mut self.discarded,
            ExitReason::TenantSwitch => &mut self.tenant_switch,
        };
        *n += 1;
    }

    /// (label, count) for every reason.
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("crash", self.crash),
            ("oom_kill", self.oom_kill),
            ("seccomp", self.seccomp),
            ("timeout_kill", self.timeout_kill),
            ("recycle", self.recycle),
            ("discarded", self.discarded),
            ("tenant_switch", self.tenant_switch),
        ]
    }
}

/// Shared between a worker handle and its slot task.
struct Life {
    kill: Notify,
    exit: watch::Sender<Option<ExitStatus>>,
    /// Set (before `exit`) when the kernel OOM-killed this worker.
    oom_killed: AtomicBool,
    /// Why the supervisor asked this worker to die, set before `kill` is notified.
    kill_reason: std::sync::Mutex<Option<ExitReason>>,
    /// Set when the pool counted this worker's replacement in `State::coming` as it
    /// recycled it, so the slot task does not count it again.
    replacement_counted: AtomicBool,
}

impl Life {
    fn new() -> Self {
        Life {
            kill: Notify::new(),
            exit: watch::channel(None).0,
            oom_killed: AtomicBool::new(false),
            kill_reason: std::sync::Mutex::new(None),
            replacement_counted: AtomicBool::new(false),
        }
    }

    fn is_dead(&self) -> bool {
        self.exit.borrow().is_some()
    }

    fn set_kill_reason(&self, reason: ExitReason) {
        *self.kill_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    fn kill_reason(&self) -> Option<ExitReason> {
        *self.kill_reason.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A live worker, owned by whoever holds it: the idle set or a lease.
pub struct Worker {
    id: WorkerId,
    pid: u32,
    conn: Connection,
    life: Arc<Life>,
    /// Hashes of modules the worker most likely has compiled, most recent last. Mirrors
    /// the worker's own LRU closely enough to steer dispatch.
    modules: VecDeque<String>,
    /// Invocations this worker completed.
    invocations: u64,
    /// The tenant whose code this process has run or was handed to run (isolated
    /// tenancy); `None`: a clean spare.
    tenant: Option<Tenant>,
    /// When it last became idle.
    idle_since: Instant,
    /// Who stops its commands at their deadline (its hello).
    deadlines: Deadlines,
}

/// A tenant's name, shared by the workers bound to it and the requests waiting for one.
pub type Tenant = Arc<str>;

impl Worker {
    fn note_module(&mut self, hash: &str, capacity: usize) {
        if let Some(pos) = self.modules.iter().position(|h| h == hash) {
            self.modules.remove(pos);
        }
        self.modules.push_back(hash.to_owned());
        while self.modules.len() > capacity.max(1) {
            self.modules.pop_front();
        }
    }
}

/// A request waiting for a worker of `tenant` (`None` in shared tenancy: any worker).
struct Waiter {
    tenant: Option<Tenant>,
    tx: oneshot::Sender<Worker>,
}

struct State {
    /// Least recently used first.
    idle: Vec<Worker>,
    waiters: VecDeque<Waiter>,
    live: usize,
    busy: usize,
    /// Workers on their way: slots between a worker's end (or the decision to recycle
    /// it) and its successor's handshake. Each arrives clean, so it can serve any waiter.
    coming: usize,
    draining: bool,
    closed: bool,
    isolate_tenants: bool,
    spare_workers: usize,
    spare_after_idle: Duration,
    tenant_switches: u64,
}

impl State {
    fn new(config: &PoolConfig) -> Self {
        State {
            idle: Vec::new(),
            waiters: VecDeque::new(),
            live: 0,
            busy: 0,
            coming: 0,
            draining: false,
            closed: false,
            isolate_tenants: config.isolate_tenants,
            spare_workers: config.spare_workers.min(config.size.saturating_sub(1)),
            spare_after_idle: config.spare_after_idle,
            tenant_switches: 0,
        }
    }

    /// Whether `worker` may run `tenant`'s code: always in shared tenancy; in isolated
    /// tenancy if it is a spare or already that tenant's.
    fn fits(&self, worker: &Worker, tenant: Option<&Tenant>) -> bool {
        !self.isolate_tenants || worker.tenant.is_none() || worker.tenant.as_ref() == tenant
    }

    /// Binds a spare to the tenant it is about to run (isolated tenancy).
    fn bind(&mut self, worker: &mut Worker, tenant: Option<&Tenant>) {
        if self.isolate_tenants && worker.tenant.is_none() {
            worker.tenant = tenant.cloned();
            self.tenant_switches += 1;
        }
    }

    /// An idle worker for `tenant` (`None`: any): first one of that tenant that has the
    /// module, then one of that tenant, then a spare (bound to the tenant). Among equals
    /// the most recently used, which keeps warm workers warm.
    fn take_idle(&mut self, tenant: Option<&Tenant>, hash: &str) -> Option<Worker> {
        self.idle.retain(|w| !w.life.is_dead());
        let own = |w: &Worker| !self.isolate_tenants || w.tenant.as_ref() == tenant;
        let pick = self
            .idle
            .iter()
            .rposition(|w| own(w) && w.modules.iter().any(|h| h == hash))
            .or_else(|| self.idle.iter().rposition(own))
            .or_else(|| self.idle.iter().rposition(|w| w.tenant.is_none()))?;
        let mut worker = self.idle.remove(pick);
        self.bind(&mut worker, tenant);
        Some(worker)
    }

    /// Hands a worker to the oldest live waiter it may serve, or parks it idle. A worker
    /// that may serve none of the waiters, or only some behind an older waiter no worker on
    /// its way will serve, is recycled into a fresh process for them (isolated tenancy), so
    /// no tenant starves behind another's queue.
    fn place(&mut self, mut worker: Worker) {
        self.waiters.retain(|w| !w.tx.is_closed());
        loop {
            let fits = self.waiters.iter().position(|w| self.fits(&worker, w.tenant.as_ref()));
            match fits {
                Some(i) if i <= self.coming => {
                    let Some(waiter) = self.waiters.remove(i) else { return };
                    let was_spare = worker.tenant.is_none();
                    self.bind(&mut worker, waiter.tenant.as_ref());
                    match waiter.tx.send(worker) {
                        Ok(()) => {
                            self.busy += 1;
                            if was_spare {
                                self.keep_spares(waiter.tenant.as_ref());
                            }
                            return;
                        }
                        Err(back) => worker = back,
                    }
                }
                _ if self.waiters.len() > self.coming => {
                    self.recycle(worker);
                    return;
                }
                _ => break,
            }
        }
        worker.idle_since = Instant::now();
        self.idle.push(worker);
        self.keep_spares(None);
    }

    /// After a request took a worker: with waiters that no idle worker fits and no worker
    /// on its way will serve, recycle idle workers of other tenants for them, least
    /// recently used first; then top up the spares.
    fn serve_waiters(&mut self) {
        while self.isolate_tenants && self.waiters.len() > self.coming {
            let Some(i) = self.idle.iter().position(|w| w.tenant.is_some()) else { break };
            let worker = self.idle.remove(i);
            self.recycle(worker);
        }
        self.keep_spares(None);
    }

    /// Keeps `spare_workers` clean workers idle or on their way (beyond what waiters will
    /// take) by recycling the least recently used idle worker bound to a tenant that has
    /// been idle for `spare_after_idle` (the pool's maintenance tick comes back for those
    /// not idle long enough yet). When `taker` has just taken a spare, its replacement
    /// starts at once from the least recently used idle worker of any other tenant: the
    /// next new tenant then finds a spare ready instead of a process to wait for, and the
    /// taker's own workers are never the ones recycled.
    fn keep_spares(&mut self, taker: Option<&Tenant>) {
        if !self.isolate_tenants || self.draining {
            return;
        }
        loop {
            let idle_spares = self.idle.iter().filter(|w| w.tenant.is_none()).count();
            let coming_spares = self.coming.saturating_sub(self.waiters.len());
            if idle_spares + coming_spares >= self.spare_workers {
                return;
            }
            let recyclable = |w: &Worker| match &w.tenant {
                None => false,
                Some(tenant) => w.idle_since.elapsed() >= self.spare_after_idle || taker.is_some_and(|t| t != tenant),
            };
            let Some(i) = self.idle.iter().position(recyclable) else { return };
            let worker = self.idle.remove(i);
            self.recycle(worker);
        }
    }

    /// Ends `worker` (its slot starts a fresh process, counted in `coming` from now).
    fn recycle(&mut self, worker: Worker) {
        tracing::debug!(worker = %worker.id, tenant = worker.tenant.as_deref(), "recycling worker for another tenant");
        worker.life.set_kill_reason(ExitReason::TenantSwitch);
        worker.life.replacement_counted.store(true, Ordering::Relaxed);
        self.coming += 1;
        worker.life.kill.notify_one();
    }
}

struct Shared {
    config: PoolConfig,
    state: Mutex<State>,
    spawner: Spawner,
    launch: Arc<WorkerLaunch>,
    zygote: Option<Zygote>,
    exec_spawns: AtomicU64,
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
    /// Starts every slot and waits until each has a worker that completed its handshake.
    pub async fn start(config: PoolConfig) -> Result<Pool, SpawnError> {
        let spawner = Spawner::start(tokio::runtime::Handle::current())
            .map_err(|source| SpawnError::Spawn { binary: config.launch.binary.display().to_string(), source })?;
        let pool = Pool(Arc::new(Shared {
            state: Mutex::new(State::new(&config)),
            zygote: config.zygote.then(|| Zygote::new(Arc::new(config.launch.clone()), spawner.clone())),
            exec_spawns: AtomicU64::new(0),
            spawner,
            launch: Arc::new(config.launch.clone()),
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

    /// The thread every worker and compile process is forked from.
    pub fn spawner(&self) -> Spawner {
        self.0.spawner.clone()
    }

    /// The engine and its version, as the first worker reported them.
    pub fn engine(&self) -> Option<(String, String)> {
        lock(&self.0.engine).clone()
    }

    pub fn status(&self) -> PoolStatus {
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
            zygote_restarts: self.0.zygote.as_ref().map_or(0, Zygote::restarts),
            exec_spawns: self.0.exec_spawns.load(Ordering::Relaxed),
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
        if let Some(zygote) = &self.0.zygote {
            zygote.stop().await;
        }
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

    async fn supervise_slot(self, slot: usize, ready: oneshot::Sender<Result<(), SpawnError>>) {
        let mut ready = Some(ready);
        let mut failures = 0u32;
        let mut closed = self.0.closed.subscribe();
        // Whether the worker on its way is already counted in `State::coming`.
        let mut counted = false;
        loop {
            if *closed.borrow() {
                return;
            }
            if !counted {
                self.state().coming += 1;
            }
            counted = false;
            let generation = self.0.generations.fetch_add(1, Ordering::Relaxed) + 1;
            let id = WorkerId { slot, generation };
            match self.start_worker(id).await {
                Ok((mut child, worker, hello)) => {
                    failures = 0;
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                    } else {
                        self.0.restarts.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(worker = %id, pid = hello.pid, engine = %hello.engine, "worker ready");
                    let life = worker.life.clone();
                    {
                        let mut st = self.state();
                        st.live += 1;
                        st.coming -= 1;
                        st.place(worker);
                    }
                    self.0.changed.notify_waiters();
                    let status = tokio::select! {
                        status = child.wait() => status,
                        () = life.kill.notified() => {
                            // The whole cgroup at once where the kernel can (v2 cgroup.kill),
                            // then the worker itself in any case.
                            if let Some(cg) = self.slot_cgroup(slot) {
                                if let Err(e) = cg.kill_all() {
                                    tracing::warn!(worker = %id, error = %e, "cannot kill the worker's cgroup");
                                }
                            }
                            let _ = child.start_kill();
                            child.wait().await
                        }
                        () = closed_signal(&mut closed) => {
                            // Idle workers exit on Shutdown; one still busy after the grace
                            // period is stopped the hard way.
                            match tokio::time::timeout(self.0.config.kill_grace, child.wait()).await {
                                Ok(status) => status,
                                Err(_) => {
                                    let _ = child.start_kill();
                                    child.wait().await
                                }
                            }
                        }
                    };
                    let status = status.unwrap_or_else(|_| ExitStatus::from_raw(0));
                    let oom_kills = self.slot_cgroup(slot).map_or(0, |cg| cg.new_oom_kills());
                    if oom_kills > 0 {
                        life.oom_killed.store(true, Ordering::Relaxed);
                        self.0.oom_kills.fetch_add(oom_kills, Ordering::Relaxed);
                        tracing::warn!(worker = %id, pid = hello.pid, "worker was OOM-killed by the kernel (cgroup memory limit)");
                    }
                    life.exit.send_replace(Some(status));
                    counted = life.replacement_counted.load(Ordering::Relaxed);
                    {
                        let mut st = self.state();
                        st.live -= 1;
                        st.idle.retain(|w| w.id != id);
                    }
                    self.0.changed.notify_waiters();
                    if *closed.borrow() {
                        tracing::debug!(worker = %id, status = %describe_exit(status), "worker stopped");
                        return;
                    }
                    let reason = if oom_kills > 0 {
                        ExitReason::OomKill
                    } else if status.signal() == Some(Signal::SIGSYS as i32) {
                        ExitReason::Seccomp
                    } else {
                        life.kill_reason().unwrap_or(ExitReason::Crash)
                    };
                    self.0.exits.lock().unwrap_or_else(|p| p.into_inner()).count(reason);
                    tracing::warn!(worker = %id, pid = hello.pid, status = %describe_exit(status), "worker exited; replacing it");
                }
                Err(e) => {
                    self.state().coming -= 1;
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    failures += 1;
                    let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(6))).min(Duration::from_secs(5));
                    tracing::error!(slot, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot start worker");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = closed_signal(&mut closed) => return,
                    }
                }
            }
        }
    }

    async fn start_worker(&self, id: WorkerId) -> Result<(Process, Worker, Hello), SpawnError> {
        let config = &self.0.config;
        let binary = config.launch.binary.display().to_string();
        let spawn_err = |source| SpawnError::Spawn { binary: binary.clone(), source };
        let cgroup = self.slot_cgroup(id.slot);
        let placement = cgroup.map(|cg| cg.placement_fds()).unwrap_or_default();
        let forked = match &self.0.zygote {
            Some(zygote) => {
                let user = config.launch.users.get(id.slot).copied();
                match zygote.fork(id.slot, user, &placement).await {
                    Ok(spawned) => Some(spawned),
                    Err(e) => {
                        tracing::warn!(worker = %id, error = %e, "the zygote cannot fork this worker; starting it by exec");
                        None
                    }
                }
            }
            None => None,
        };
        let Spawned { mut child, socket } = match forked {
            Some(spawned) => spawned,
            None => {
                if self.0.zygote.is_some() {
                    self.0.exec_spawns.fetch_add(1, Ordering::Relaxed);
                }
                self.0.spawner.spawn(self.0.launch.clone(), id.slot, placement).await.map_err(spawn_err)?
            }
        };
        let stream = match tokio::net::UnixStream::from_std(socket) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(spawn_err(e));
            }
        };
        let mut conn = Connection::new(stream, config.max_reply_bytes);
        let hello = match tokio::time::timeout(config.handshake_timeout, conn.recv()).await {
            Ok(Ok((FromWorker::Hello(hello), _))) => Ok(hello),
            Ok(Ok((other, _))) => Err(format!("expected hello, got {other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no hello within {:?}", config.handshake_timeout)),
        };
        // A worker that is not where its cgroup placement put it must not run anything.
        let hello = match (hello, cgroup) {
            (Ok(h), Some(cg)) if h.protocol == PROTOCOL_VERSION => {
                cg.verify_membership(&h.cgroup).map(|()| h).map_err(|e| format!("cgroup placement failed: {e}"))
            }
            (hello, _) => hello,
        };
        // Nor one that left out a hardening layer it was asked for.
        let hello = hello.and_then(|h| {
            let missing: Vec<&str> = config
                .launch
                .hardening_layers
                .iter()
                .copied()
                .filter(|l| !h.hardening.iter().any(|a| a == l))
                .collect();
            if missing.is_empty() || h.protocol != PROTOCOL_VERSION {
                Ok(h)
            } else {
                Err(format!("worker did not apply hardening layers {missing:?}"))
            }
        });
        // Nor one running another engine than the one configured.
        let hello = hello.and_then(|h| {
            if h.protocol == PROTOCOL_VERSION && h.engine != config.launch.engine {
                Err(format!("worker runs engine {:?}, not the configured {:?}", h.engine, config.launch.engine))
            } else {
                Ok(h)
            }
        });
        let hello = match hello {
            Ok(h) if h.protocol == PROTOCOL_VERSION => {
                lock(&self.0.engine).get_or_insert_with(|| (h.engine.clone(), h.engine_version.clone()));
                h
            }
            other => {
                // A worker that gave up on its own says why in its exit status (and its log
                // line); give it a moment before killing it.
                let status = match tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                let status = status.map(describe_exit).unwrap_or_default();
                return Err(match other {
                    Ok(h) => SpawnError::ProtocolMismatch { binary, theirs: h.protocol, ours: PROTOCOL_VERSION },
                    Err(detail) => SpawnError::Handshake { binary, detail: format!("{detail} (worker {status})") },
                });
            }
        };
        let life = Arc::new(Life::new());
        let worker = Worker {
            id,
            pid: hello.pid,
            conn,
            life,
            modules: VecDeque::new(),
            invocations: 0,
            tenant: None,
            idle_since: Instant::now(),
            deadlines: hello.deadlines,
        };
        Ok((child, worker, hello))
    }
}

/// Gives a worker back if the waiting request went away just as it was handed one.
struct Waiting {
    rx: Option<oneshot::Receiver<Worker>>,
    pool: Pool,
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
    fn new(pool: Pool, worker: Worker, asked: Instant) -> Self {
        Lease { pool, worker: Some(worker), clean: true, queue_wait: asked.elapsed() }
    }

    pub fn worker_id(&self) -> Option<WorkerId> {
        self.worker.as_ref().map(|w| w.id)
    }

    pub fn worker_pid(&self) -> Option<u32> {
        self.worker.as_ref().map(|w| w.pid)
    }

    /// Runs one invocation: `payload` is the frame's payload in parts (sent as they are, one
    /// vectored write), `files` the descriptors the worker gets with it (see
    /// `Invocation::passed_fds`: the module, then the preopens). `artifact` is passed too
    /// when the worker does not have the module in memory yet. A worker that fails in any
    /// way is killed and replaced.
    pub async fn invoke(
        mut self,
        mut invocation: Invocation,
        payload: Vec<Bytes>,
        mut files: Vec<OwnedFd>,
        artifact: Option<Arc<crate::compiler::Artifact>>,
    ) -> Result<Completed, InvokeFailure> {
        // The pool handle is one Arc; cloning the config would copy the launch settings and
        // every slot's cgroup handle on each invocation.
        let pool = self.pool.clone();
        let config = &pool.0.config;
        let Some(worker) = self.worker.as_mut() else {
            return Err(InvokeFailure::ShuttingDown);
        };
        let hash = invocation.module_key();
        let cold = !worker.modules.contains(&hash);
        if let Some(fd) = artifact.as_ref().filter(|_| cold && !files.is_empty()).and_then(|a| a.for_worker()) {
            files.insert(1, fd);
            invocation.artifact = true;
        }
        invocation.passed_fds = files.len() as u32;
        let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
        let cgroup = self.pool.slot_cgroup(worker.id.slot).cloned();
        let request = SlotRequest {
            cpu_quota_millis: invocation.cpu_quota_millis,
            memory_request_bytes: invocation.memory_limit_bytes,
            // A session step also holds the snapshot it restored and the one it captures.
            io_bytes: payload_len
                .saturating_add(invocation.max_output_bytes.saturating_mul(2))
                .saturating_add(invocation.session.as_ref().map_or(0, |s| s.max_snapshot_bytes)),
        };
        let mut checkpoint = match &cgroup {
            Some(cg) => {
                let allowance = if cold { config.compile_memory_bytes } else { 0 };
                // Nothing was sent yet: on failure the worker goes back to the pool unharmed.
                Some(cg.prepare(&request, allowance).map_err(|e| InvokeFailure::Limits(e.to_string()))?)
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
        match exchange(worker, config, invocation, &payload, &files, limits).await {
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
struct StartLimits<'a> {
    cgroup: &'a SlotCgroup,
    request: SlotRequest,
    checkpoint: &'a mut Checkpoint,
}

enum Exchange {
    HardDeadline,
    /// The connection broke (the worker died or closed it).
    Lost(String),
    /// The worker sent something it must not; it was killed.
    Protocol(String),
}

async fn exchange(
    worker: &mut Worker,
    config: &PoolConfig,
    invocation: Invocation,
    payload: &[Bytes],
    files: &[OwnedFd],
    mut limits: Option<StartLimits<'_>>,
) -> Result<Completed, Exchange> {
    // A session step restores and captures a snapshot besides running the guest: host work
    // bounded by the memory size, allowed as long as a compile.
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
    worker.conn.send_with_fds(&ToWorker::Invoke(invocation), payload, files).await.map_err(broken)?;
    let mut started = false;
    loop {
        match tokio::time::timeout_at(hard_deadline, worker.conn.recv()).await {
            Err(_) => return Err(Exchange::HardDeadline),
            Ok(Err(e)) => return Err(broken(e)),
            // `Started` restarts the hard deadline once; a worker that sends it again is
            // trying to run forever.
            Ok(Ok((FromWorker::Started, _))) if started => {
                return Err(Exchange::Protocol("protocol violation: a second started in one invocation".into()));
            }
            Ok(Ok((FromWorker::Started, _))) => {
                started = true;
                if let Some(limits) = limits.as_mut() {
                    limits
                        .cgroup
                        .tighten(&limits.request, limits.checkpoint)
                        .map_err(|e| Exchange::Protocol(format!("cannot apply the invocation's memory limit: {e}")))?;
                    worker.conn.send(&ToWorker::Proceed).await.map_err(broken)?;
                }
                hard_deadline = tokio::time::Instant::now() + timeout + grace;
            }
            Ok(Ok((FromWorker::Result(result), mut payload))) => {
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

/// "exited with status 1", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(sig) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(name) => format!("killed by signal {sig} ({name})"),
            Err(_) => format!("killed by signal {sig}"),
        },
        None => "ended".into(),
    }
}

/// Resolves once the pool is closed (owning nothing across awaits, so it stays `Send`).
async fn closed_signal(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await.map(|_| ());
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn futures_join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions_name_the_signal() {
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by signal 9 (SIGKILL)");
        assert_eq!(describe_exit(ExitStatus::from_raw(1 << 8)), "exited with status 1");
    }

    fn config(kill_grace: Duration) -> PoolConfig {
        PoolConfig {
            size: 1,
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
            handshake_timeout: Duration::from_secs(1),
            kill_grace,
            compile_timeout: Duration::from_secs(60),
            max_reply_bytes: 1 << 20,
            cgroups: Vec::new(),
            compile_memory_bytes: 0,
            max_invocations: None,
            isolate_tenants: true,
            spare_workers: 1,
            spare_after_idle: Duration::from_secs(1),
            zygote: false,
        }
    }

    fn invocation(timeout_ms: u64) -> Invocation {
        Invocation {
            request_id: "r".into(),
            function: "f".into(),
            module: wasmbox_protocol::ModuleRef { path: "/f.wasm".into(), sha256: "0".repeat(64) },
            argv: vec!["f".into()],
            env: Vec::new(),
            preopens: Vec::new(),
            memory_limit_bytes: 1 << 20,
            timeout_ms,
            cpu_quota_millis: 1000,
            max_output_bytes: 1024,
            confirm_start: false,
            passed_fds: 0,
            artifact: false,
            session: None,
        }
    }

    /// A compromised worker that answers every invocation with `Started` over and over
    /// would push its hard deadline out forever; the second one ends the exchange.
    #[tokio::test]
    async fn a_second_started_is_a_protocol_violation() {
        use tokio::io::AsyncWriteExt;
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut worker = Worker {
            id: WorkerId { slot: 0, generation: 1 },
            pid: 1,
            conn: Connection::new(ours, 1 << 20),
            life: Arc::new(Life::new()),
            // Warm: no compile allowance, so the deadline is the invocation's own.
            modules: VecDeque::from(["0".repeat(64)]),
            invocations: 0,
            tenant: None,
            idle_since: Instant::now(),
            deadlines: Deadlines::Engine,
        };
        let fake = tokio::spawn(async move {
            let started = wasmbox_protocol::encode_head(&FromWorker::Started, 0);
            for _ in 0..100 {
                if theirs.write_all(&started).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let config = config(Duration::from_millis(100));
        let ran = tokio::time::timeout(
            Duration::from_secs(3),
            exchange(&mut worker, &config, invocation(200), &[], &[], None),
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
}
