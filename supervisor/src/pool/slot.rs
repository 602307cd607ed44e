//! Slot supervision: each slot's task starts its worker, checks its handshake, watches it,
//! and replaces it when it ends.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::oneshot;
use wasmbox_protocol::{FromWorker, Hello, PROTOCOL_VERSION};

use super::connection::Connection;
use super::spawn::{Process, Spawned};
use super::state::{Life, Worker};
use super::{ExitReason, Pool, SpawnError, WorkerId, closed_signal, describe_exit, lock};

impl Pool {
    pub(super) async fn supervise_slot(self, slot: usize, ready: oneshot::Sender<Result<(), SpawnError>>) {
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
        let Spawned { mut child, socket } = self.0.launcher.launch(id.slot, placement).await.map_err(spawn_err)?;
        let mut conn = match Connection::new(socket, config.max_reply_bytes) {
            Ok(conn) => conn,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(spawn_err(e));
            }
        };
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
