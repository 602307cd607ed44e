//! Who gets which worker: the idle set, the queue of waiting requests, tenant binding and
//! spares. Plain data under the pool's lock; no I/O.

use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot, watch};
use wasmbox_protocol::Deadlines;

use super::connection::Connection;
use super::{ExitReason, PoolConfig, WorkerId};

/// Shared between a worker handle and its slot task.
pub(super) struct Life {
    pub(super) kill: Notify,
    pub(super) exit: watch::Sender<Option<ExitStatus>>,
    /// Set (before `exit`) when the kernel OOM-killed this worker.
    pub(super) oom_killed: AtomicBool,
    /// Why the supervisor asked this worker to die, set before `kill` is notified.
    pub(super) kill_reason: std::sync::Mutex<Option<ExitReason>>,
    /// Set when the pool counted this worker's replacement in `State::coming` as it
    /// recycled it, so the slot task does not count it again.
    pub(super) replacement_counted: AtomicBool,
}

impl Life {
    pub(super) fn new() -> Self {
        Life {
            kill: Notify::new(),
            exit: watch::channel(None).0,
            oom_killed: AtomicBool::new(false),
            kill_reason: std::sync::Mutex::new(None),
            replacement_counted: AtomicBool::new(false),
        }
    }

    pub(super) fn is_dead(&self) -> bool {
        self.exit.borrow().is_some()
    }

    pub(super) fn set_kill_reason(&self, reason: ExitReason) {
        *self.kill_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    pub(super) fn kill_reason(&self) -> Option<ExitReason> {
        *self.kill_reason.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A live worker, owned by whoever holds it: the idle set or a lease.
pub(super) struct Worker {
    pub(super) id: WorkerId,
    pub(super) pid: u32,
    pub(super) conn: Connection,
    pub(super) life: Arc<Life>,
    /// Hashes of modules the worker most likely has compiled, most recent last. Mirrors
    /// the worker's own LRU closely enough to steer dispatch.
    pub(super) modules: VecDeque<String>,
    /// Invocations this worker completed.
    pub(super) invocations: u64,
    /// The tenant whose code this process has run or was handed to run (isolated
    /// tenancy); `None`: a clean spare.
    pub(super) tenant: Option<Tenant>,
    /// When it last became idle.
    pub(super) idle_since: Instant,
    /// Who stops its commands at their deadline (its hello).
    pub(super) deadlines: Deadlines,
}

/// A tenant's name, shared by the workers bound to it and the requests waiting for one.
pub(super) type Tenant = Arc<str>;

impl Worker {
    /// The worker said it does not have `hash` (its own cache evicted it first).
    pub(super) fn forget_module(&mut self, hash: &str) {
        self.modules.retain(|h| h != hash);
    }

    pub(super) fn note_module(&mut self, hash: &str, capacity: usize) {
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
pub(super) struct Waiter {
    pub(super) tenant: Option<Tenant>,
    pub(super) tx: oneshot::Sender<Worker>,
}

pub(super) struct State {
    /// Least recently used first.
    pub(super) idle: Vec<Worker>,
    pub(super) waiters: VecDeque<Waiter>,
    pub(super) live: usize,
    pub(super) busy: usize,
    /// Workers on their way: slots between a worker's end (or the decision to recycle
    /// it) and its successor's handshake. Each arrives clean, so it can serve any waiter.
    pub(super) coming: usize,
    pub(super) draining: bool,
    pub(super) closed: bool,
    pub(super) isolate_tenants: bool,
    pub(super) spare_workers: usize,
    pub(super) spare_after_idle: Duration,
    pub(super) tenant_switches: u64,
}

impl State {
    pub(super) fn new(config: &PoolConfig) -> Self {
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
    pub(super) fn fits(&self, worker: &Worker, tenant: Option<&Tenant>) -> bool {
        !self.isolate_tenants || worker.tenant.is_none() || worker.tenant.as_ref() == tenant
    }

    /// Binds a spare to the tenant it is about to run (isolated tenancy).
    pub(super) fn bind(&mut self, worker: &mut Worker, tenant: Option<&Tenant>) {
        if self.isolate_tenants && worker.tenant.is_none() {
            worker.tenant = tenant.cloned();
            self.tenant_switches += 1;
        }
    }

    /// An idle worker for `tenant` (`None`: any): first one of that tenant that has the
    /// module, then one of that tenant, then a spare (bound to the tenant). Among equals
    /// the most recently used, which keeps warm workers warm.
    pub(super) fn take_idle(&mut self, tenant: Option<&Tenant>, hash: &str) -> Option<Worker> {
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
    pub(super) fn place(&mut self, mut worker: Worker) {
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
    pub(super) fn serve_waiters(&mut self) {
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
    pub(super) fn keep_spares(&mut self, taker: Option<&Tenant>) {
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
    pub(super) fn recycle(&mut self, worker: Worker) {
        tracing::debug!(worker = %worker.id, tenant = worker.tenant.as_deref(), "recycling worker for another tenant");
        worker.life.set_kill_reason(ExitReason::TenantSwitch);
        worker.life.replacement_counted.store(true, Ordering::Relaxed);
        self.coming += 1;
        worker.life.kill.notify_one();
    }
}
