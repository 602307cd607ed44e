//! WasmBox supervisor: takes HTTP invocations and runs each in a pre-forked worker
//! process from a pool. No tenant code ever runs in this process.

pub mod budget;
pub mod cgroup;
pub mod cli;
pub mod compiler;
pub mod config;
pub mod hardening;
pub mod http;
pub mod limits;
pub mod logwriter;
pub mod metrics;
pub mod pool;
pub mod readiness;
pub mod registry;
pub mod service;
pub mod sessions;
pub mod usage;

#[cfg(test)]
mod proptests;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::cgroup::{Cgroups, Description};
use crate::config::{Config, LimitDefaults};
use crate::pool::{Pool, PoolConfig, PoolStatus, ProcessLauncher, Spawner, WorkerLaunch};
use crate::registry::Registry;
use crate::usage::UsageLedger;

/// What /ready answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Why not ready: draining, no_live_worker, connections, buffers, memory, queue.
    pub reasons: Vec<&'static str>,
    pub pool: PoolStatus,
    pub load: readiness::LoadState,
    pub http: http::ConnectionStats,
    pub buffers: BufferStats,
}

/// The budget of bytes held for clients (`WASMBOX_MAX_BUFFERED_BYTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BufferStats {
    pub used_bytes: u64,
    pub max_bytes: u64,
    /// Requests answered 503 because the budget stayed spent.
    pub refused: u64,
}

/// Why the supervisor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("worker binary not found at {0} (set WASMBOX_WORKER_BIN or install wasmbox-worker next to wasmbox)")]
    WorkerBinary(PathBuf),
    #[error("functions directory {path} is unusable")]
    FunctionsDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the worker pool")]
    Pool(#[from] pool::SpawnError),
    #[error("cannot set up worker cgroups (WASMBOX_CGROUPS)")]
    Cgroups(#[from] cgroup::CgroupError),
    #[error("cannot open the session store (WASMBOX_STATE_DIR)")]
    Sessions(#[from] sessions::StoreError),
    #[error("cannot set up the artifact store in WASMBOX_CACHE_DIR")]
    Compiler(#[source] std::io::Error),
}

/// State shared by every request.
pub struct App {
    pub config: Config,
    /// The engine workers run (validated at start).
    pub engine: config::EngineKind,
    pub limits: LimitDefaults,
    pub registry: Registry,
    pub pool: Pool,
    /// Compiles modules into the artifact store (the trusted compiler).
    pub compiler: Arc<compiler::Compiler>,
    /// The worker cgroups in use, if any.
    pub cgroups: Option<Description>,
    pub usage: UsageLedger,
    pub metrics: metrics::Metrics,
    /// The load verdict /ready reports (memory and queue over a window).
    pub load: Arc<readiness::Readiness>,
    /// Open client connections against `WASMBOX_MAX_CONNECTIONS` and its reserve.
    pub connections: Arc<http::Connections>,
    /// Bytes held for clients against `WASMBOX_MAX_BUFFERED_BYTES`.
    pub buffers: Arc<budget::Budget>,
    /// Serializes module uploads and deletions (the admin API).
    pub admin: tokio::sync::Mutex<()>,
    /// Stateful sessions and their durable snapshots.
    pub sessions: Arc<sessions::SessionStore>,
    draining: AtomicBool,
}

impl App {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn begin_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.pool.begin_drain();
    }

    /// The budget of bytes held for clients, as `/stats` and `/ready` show it.
    pub fn buffer_stats(&self) -> BufferStats {
        BufferStats {
            used_bytes: self.buffers.used(),
            max_bytes: self.buffers.limit(),
            refused: self.buffers.refused(),
        }
    }

    /// Ready while not draining, at least one worker is up, a connection slot and budget
    /// for one more body of the maximum size are free, and not overloaded over the
    /// readiness window (see [`readiness`]). Connections and buffers count at once: a
    /// replica whose slots slow clients hold must be taken out of rotation now.
    pub fn readiness(&self) -> Readiness {
        let pool = self.pool.status();
        let load = self.load.state();
        let http = self.connections.stats();
        let buffers = self.buffer_stats();
        let mut reasons: Vec<&'static str> = Vec::new();
        if self.is_draining() {
            reasons.push("draining");
        }
        if pool.live == 0 {
            reasons.push("no_live_worker");
        }
        if http.full() {
            reasons.push("connections");
        }
        if self.buffers.short_of(self.config.max_body_bytes) {
            reasons.push("buffers");
        }
        reasons.extend(load.reasons.iter().copied());
        Readiness { ready: reasons.is_empty(), reasons, pool, load, http, buffers }
    }
}

/// Starts the pool, serves HTTP until SIGTERM/SIGINT, drains, stops every worker.
pub async fn run(config: Config) -> Result<(), StartError> {
    // Caught from the start: a SIGTERM while the pool starts (or just after "listening" is
    // logged) must mean a clean stop, not death by the default action.
    let signals = shutdown_signals();
    config.validate()?;
    let hardening = hardening::WorkerHardening::resolve(&config)?;
    let worker_bin = worker_binary(&config)?;
    let registry = Registry::new(&config.functions_dir, config.max_module_bytes)
        .map_err(|source| StartError::FunctionsDir { path: config.functions_dir.clone(), source })?;
    if !registry.dir().is_dir() {
        tracing::warn!(dir = %registry.dir().display(), "functions directory does not exist yet; every function is 404 until it does");
    }
    service::admin::remove_stale_uploads(registry.dir());
    if config.admin_token().is_some() {
        tracing::info!("module management API on at /admin/functions (bearer token from WASMBOX_ADMIN_TOKEN)");
    }
    let cache_dir = config.resolved_cache_dir();
    let state_dir = config.resolved_state_dir();
    let session_store = {
        let limits = config.session_limits();
        let dir = state_dir.clone();
        tokio::task::spawn_blocking(move || sessions::SessionStore::open(&dir, limits))
            .await
            .map_err(|e| sessions::StoreError::Dir { path: state_dir.clone(), source: std::io::Error::other(e) })??
    };
    tracing::info!(state = %state_dir.display(), sessions = session_store.count(), "session store");
    // Created here (as the workers would) so the registry can compare preopens with its
    // canonical path.
    {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&cache_dir);
    }
    let registry = registry.protect(&[("cache", &cache_dir), ("state", &state_dir)]);
    tracing::info!("worker hardening: {hardening}");
    // The supervisor's memory cgroup as the container runtime made it, before the
    // supervisor moves itself into a leaf beside its workers (cgroup v2).
    let memory_source = readiness::MemorySource::detect(&cgroup::fs::KernelFs);
    let cgroup_settings = config.cgroup_settings()?;
    let slots = config.worker_count();
    let mut cgroups = tokio::task::spawn_blocking(move || {
        Cgroups::setup(std::sync::Arc::new(cgroup::fs::KernelFs), &cgroup_settings, slots)
    })
    .await
    .map_err(|e| StartError::Cgroups(cgroup::CgroupError::Detect(format!("setup task failed: {e}"))))??;
    let slot_cgroups =
        cgroups.as_ref().map(|c| (0..slots).filter_map(|i| c.slot(i).cloned()).collect()).unwrap_or_default();
    let users = hardening.user.as_ref().map(|u| (0..slots).map(|i| u.worker(i)).collect()).unwrap_or_default();
    let compiler_cgroups = cgroups
        .as_ref()
        .map(|c| (0..config.compiler_count()).filter_map(|i| c.compiler(i).cloned()).collect())
        .unwrap_or_default();
    let compiler_config = compiler::CompilerConfig::new(&config, &hardening, worker_bin.clone(), compiler_cgroups)?;
    let launch = WorkerLaunch {
        binary: worker_bin,
        engine: config.engine()?.name().into(),
        // Workers write no artifacts: the compiler does, and passes them.
        cache_dir: None,
        module_cache_entries: config.worker_module_cache,
        max_module_bytes: config.max_module_bytes,
        log_filter: worker_log_filter(),
        log_json: config.log_format == config::LogFormat::Json,
        engine_args: config.engine_args(),
        hardening_args: hardening.worker_args(),
        hardening_layers: hardening.expected_layers(),
        users,
    };
    // Every worker and compile process is forked from this one thread.
    let spawner = match Spawner::start(tokio::runtime::Handle::current()) {
        Ok(spawner) => spawner,
        Err(source) => {
            remove_cgroups(cgroups.take()).await;
            return Err(pool::SpawnError::Spawn { binary: launch.binary.display().to_string(), source }.into());
        }
    };
    let launcher = Arc::new(ProcessLauncher::new(launch.clone(), spawner.clone(), config.zygote));
    let pool_config = PoolConfig {
        size: config.worker_count(),
        queue_depth: config.queue_depth,
        launch,
        handshake_timeout: Duration::from_secs(30),
        kill_grace: Duration::from_millis(config.kill_grace_ms),
        compile_timeout: Duration::from_millis(config.compile_timeout_ms),
        // stdout (capped) + stderr tail (capped) + slack for framing.
        // stdout (capped) + stderr tail (capped) + a session snapshot (capped) + slack.
        max_reply_bytes: config
            .max_output_bytes
            .saturating_mul(2)
            .saturating_add(config.session_max_snapshot_bytes)
            .saturating_add(1 << 16),
        cgroups: slot_cgroups,
        compile_memory_bytes: config.cgroup_compile_memory_mb.saturating_mul(1 << 20),
        max_invocations: config.worker_max_invocations.filter(|&n| n > 0),
        isolate_tenants: config.tenancy == config::Tenancy::Isolated,
        spare_workers: config.spare_workers,
        spare_after_idle: Duration::from_millis(config.spare_after_idle_ms),
    };
    tracing::info!(
        workers = pool_config.size,
        io_threads = config.io_thread_count(),
        queue_depth = pool_config.queue_depth,
        functions = %registry.dir().display(),
        cache = %cache_dir.display(),
        worker_bin = %pool_config.launch.binary.display(),
        "starting worker pool"
    );
    let pool = match Pool::start(pool_config, launcher).await {
        Ok(pool) => pool,
        Err(e) => {
            remove_cgroups(cgroups.take()).await;
            return Err(e.into());
        }
    };
    let compiler = match compiler::Compiler::new(compiler_config, spawner) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            pool.shutdown(Duration::from_secs(1)).await;
            remove_cgroups(cgroups.take()).await;
            return Err(StartError::Compiler(e));
        }
    };
    if let Some((engine, version)) = pool.engine() {
        tracing::info!(%engine, %version, "engine");
        compiler.set_engine(&engine, &version);
    }
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(source) => {
            pool.shutdown(Duration::from_secs(1)).await;
            remove_cgroups(cgroups.take()).await;
            return Err(StartError::Listen { addr: config.listen, source });
        }
    };
    let health_listener = match config.health_listen {
        Some(health) => match TcpListener::bind(health).await {
            Ok(l) => Some(l),
            Err(source) => {
                pool.shutdown(Duration::from_secs(1)).await;
                remove_cgroups(cgroups.take()).await;
                return Err(StartError::Listen { addr: health, source });
            }
        },
        None => None,
    };
    let addr = listener.local_addr().unwrap_or(config.listen);
    let app = Arc::new(App {
        engine: config.engine()?,
        limits: config.limits(),
        registry,
        pool: pool.clone(),
        compiler,
        cgroups: cgroups.as_ref().map(Cgroups::describe),
        usage: UsageLedger::default(),
        metrics: metrics::Metrics::new(),
        load: Arc::new(readiness::Readiness::new(config.readiness())),
        connections: Arc::new(http::Connections::new(config.max_connections, config.reserve_connections as usize)),
        buffers: budget::Budget::new(config.max_buffered_bytes),
        admin: tokio::sync::Mutex::new(()),
        sessions: Arc::new(session_store),
        draining: AtomicBool::new(false),
        config,
    });
    tracing::info!(memory = %memory_source.describe(), settings = ?app.load.settings(), "readiness sampling");
    readiness::sample_now(&app.load, &memory_source, pool.status().queued);
    let sampler = {
        let pool = pool.clone();
        tokio::spawn(readiness::sample_forever(app.load.clone(), memory_source, move || pool.status().queued))
    };
    let sweeper = tokio::spawn(app.sessions.clone().sweep_forever());
    let (stop_health, health_stopped) = tokio::sync::oneshot::channel::<()>();
    let health = health_listener.map(|listener| {
        match listener.local_addr() {
            Ok(a) => {
                tracing::info!("health endpoints on http://{a} (/healthz, /ready, /metrics; WASMBOX_HEALTH_LISTEN)")
            }
            Err(e) => tracing::warn!(error = %e, "health listener has no address"),
        }
        tokio::spawn(http::serve_health(listener, app.clone(), async move {
            let _ = health_stopped.await;
        }))
    });
    tracing::info!(%addr, "listening on http://{addr}");

    let drained = http::serve(listener, app.clone(), shutdown_signal(signals)).await;
    let _ = stop_health.send(());
    if let Some(health) = health {
        let _ = health.await;
    }
    sampler.abort();
    sweeper.abort();
    let status = pool.status();
    tracing::info!(drained, "connections closed");
    tracing::info!(busy = status.busy, "stopping workers");
    pool.shutdown(app.config.drain_timeout().min(Duration::from_secs(2))).await;
    remove_cgroups(cgroups.take()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Removes the worker cgroups (workers must be stopped first).
async fn remove_cgroups(cgroups: Option<Cgroups>) {
    if let Some(mut cgroups) = cgroups {
        let _ = tokio::task::spawn_blocking(move || cgroups.teardown()).await;
    }
}

/// An error and its sources, "outer: inner: root", for one log field.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

type ShutdownSignals = std::io::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>;

/// Installs the SIGTERM and SIGINT handlers; signals arriving from now on are kept until
/// [`shutdown_signal`] waits for them.
fn shutdown_signals() -> ShutdownSignals {
    use tokio::signal::unix::{SignalKind, signal};
    Ok((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
}

async fn shutdown_signal(signals: ShutdownSignals) {
    let Ok((mut term, mut int)) = signals else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down: no new requests, draining in-flight invocations");
}

pub(crate) fn worker_binary(config: &Config) -> Result<PathBuf, StartError> {
    let path = match &config.worker_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("wasmbox-worker")))
            .unwrap_or_else(|| PathBuf::from("wasmbox-worker")),
    };
    if path.is_file() { Ok(path) } else { Err(StartError::WorkerBinary(path)) }
}

/// Workers log warnings and errors unless RUST_LOG asks for more about them.
pub(crate) fn worker_log_filter() -> String {
    std::env::var("WASMBOX_WORKER_LOG").unwrap_or_else(|_| "warn".into())
}
