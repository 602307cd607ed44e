//! Supervisor configuration: every setting is a `WASMBOX_*` environment variable and the
//! same `--flag`, with defaults that work on a laptop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};

use crate::cgroup::{CgroupMode, CgroupSettings};

/// WasmBox: a serverless runtime multiplexer for WebAssembly. Serves WASI functions over
/// HTTP, running each invocation in a pre-forked, sandboxed worker process.
#[derive(Debug, Clone, Parser)]
#[command(name = "wasmbox", version, about, max_term_width = 100)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(long, env = "WASMBOX_LISTEN", default_value = "127.0.0.1:8095")]
    pub listen: SocketAddr,

    /// Directory holding `name.wasm` modules and optional `name.toml` configs.
    #[arg(long, env = "WASMBOX_FUNCTIONS_DIR", default_value = "./functions")]
    pub functions_dir: PathBuf,

    /// Directory for precompiled module artifacts [default: $XDG_CACHE_HOME/wasmbox,
    /// ~/.cache/wasmbox, or a per-user directory under /tmp].
    #[arg(long, env = "WASMBOX_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Wasm engine the workers run functions on [default: wasmtime]; wasmedge needs a
    /// wasmbox-worker built with the `wasmedge` feature.
    #[arg(long, env = "WASMBOX_ENGINE", value_enum)]
    pub engine: Option<EngineKind>,

    /// The original deployment's name for WASMBOX_ENGINE.
    #[arg(long = "wasm-runtime", env = "WASM_RUNTIME", value_enum, hide = true)]
    pub wasm_runtime: Option<EngineKind>,

    /// Worker processes (sandbox slots) kept running [default: number of CPUs].
    #[arg(long, env = "WASMBOX_WORKERS", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub workers: Option<u64>,

    /// Threads that serve HTTP and exchange frames with the workers [default: a quarter of
    /// the CPUs, at least one]. The supervisor only moves bytes; the CPUs are for the
    /// workers, and every extra thread here is one more to be scheduled against them.
    #[arg(long, env = "WASMBOX_IO_THREADS", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub io_threads: Option<u64>,

    /// Requests that may wait for a free worker; beyond it requests get 429.
    #[arg(long, env = "WASMBOX_QUEUE_DEPTH", default_value_t = 256)]
    pub queue_depth: usize,

    /// /ready answers 503 while the mean number of waiting requests over the readiness window
    /// is at least this [default: 3/4 of the queue depth].
    #[arg(long, env = "WASMBOX_READY_QUEUE_THRESHOLD")]
    pub ready_queue_threshold: Option<usize>,

    /// /ready answers 503 while the mean memory utilization of the supervisor's cgroup (the
    /// container: supervisor and workers) over the readiness window is above this percentage
    /// of its limit (of the host's memory where the cgroup has none).
    #[arg(long, env = "WASMBOX_READY_MEMORY_PERCENT", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub ready_memory_percent: u64,

    /// The window over which /ready averages memory utilization and queue depth, in ms.
    #[arg(long, env = "WASMBOX_READY_WINDOW_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub ready_window_ms: u64,

    /// How often memory and queue depth are sampled for /ready, in ms.
    #[arg(long, env = "WASMBOX_READY_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub ready_interval_ms: u64,

    /// A second address serving only /healthz, /ready and /metrics, for probes and scrapes
    /// that should not share the invocation port [default: none; they are on WASMBOX_LISTEN].
    #[arg(long, env = "WASMBOX_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Bearer token of the module management API (/admin/functions); unset disables it.
    /// At least 16 characters.
    #[arg(long, env = "WASMBOX_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Path of the wasmbox-worker binary [default: next to the wasmbox binary].
    #[arg(long, env = "WASMBOX_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,

    /// Largest request body (function stdin) in bytes; enforced while streaming.
    #[arg(long, env = "WASMBOX_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_body_bytes: u64,

    /// Largest stdout a function may produce, in bytes (of stderr, the last 4 KiB are kept).
    #[arg(long, env = "WASMBOX_MAX_OUTPUT_BYTES", default_value_t = 16 << 20)]
    pub max_output_bytes: u64,

    /// Largest module file accepted, in bytes.
    #[arg(long, env = "WASMBOX_MAX_MODULE_BYTES", default_value_t = 256 << 20)]
    pub max_module_bytes: u64,

    /// CPU quota in millicores when the request has no cpu_quota header.
    #[arg(long, env = "WASMBOX_DEFAULT_CPU_QUOTA", default_value_t = 1000)]
    pub default_cpu_quota: u64,

    /// Largest cpu_quota a request may ask for [default: 1000 x number of CPUs].
    #[arg(long, env = "WASMBOX_MAX_CPU_QUOTA")]
    pub max_cpu_quota: Option<u64>,

    /// Memory in MiB when the request has no Memory-Request header.
    #[arg(long, env = "WASMBOX_DEFAULT_MEMORY_MB", default_value_t = 128)]
    pub default_memory_mb: u64,

    /// Largest Memory-Request a request may ask for, in MiB.
    #[arg(long, env = "WASMBOX_MAX_MEMORY_MB", default_value_t = 2048)]
    pub max_memory_mb: u64,

    /// Deadline in milliseconds when the request has no Timeout-Ms header.
    #[arg(long, env = "WASMBOX_DEFAULT_TIMEOUT_MS", default_value_t = 10_000)]
    pub default_timeout_ms: u64,

    /// Largest Timeout-Ms a request may ask for.
    #[arg(long, env = "WASMBOX_MAX_TIMEOUT_MS", default_value_t = 300_000)]
    pub max_timeout_ms: u64,

    /// On SIGTERM/SIGINT, how long in-flight invocations may take to finish.
    #[arg(long, env = "WASMBOX_DRAIN_TIMEOUT_MS", default_value_t = 20_000)]
    pub drain_timeout_ms: u64,

    /// How long past its deadline a function may run before its worker is SIGKILLed
    /// (on engines that stop functions themselves; see WASMBOX_WASMEDGE_INTERRUPTIBLE).
    #[arg(long, env = "WASMBOX_KILL_GRACE_MS", default_value_t = 1000)]
    pub kill_grace_ms: u64,

    /// WasmEdge: compile functions with interruption checks so WasmEdge stops them at
    /// their deadline (504 with worker_killed false), at 3-4x the cost of loops. By default
    /// they are plain native code and the worker is killed at the deadline (worker_killed
    /// true) and replaced from the zygote. Session steps are always interruptible.
    #[arg(long, env = "WASMBOX_WASMEDGE_INTERRUPTIBLE", default_value_t = false, action = clap::ArgAction::Set)]
    pub wasmedge_interruptible: bool,

    /// Longest a worker may spend compiling a module before it is killed.
    #[arg(long, env = "WASMBOX_COMPILE_TIMEOUT_MS", default_value_t = 60_000)]
    pub compile_timeout_ms: u64,

    /// Compile processes that may run at once, each in its own cgroup (`compiler-<n>`)
    /// and as its own uid [default: the number of CPUs, at most 4].
    #[arg(long, env = "WASMBOX_COMPILERS")]
    pub compilers: Option<u32>,

    /// Compiled modules each worker keeps in memory.
    #[arg(long, env = "WASMBOX_WORKER_MODULE_CACHE", default_value_t = 64)]
    pub worker_module_cache: usize,

    /// Whether a worker process may run more than one tenant's code. `isolated` (the
    /// default): a worker serves one tenant for its whole life, and a slot that must run
    /// another tenant's function gets a fresh process first. `shared`: any worker runs any
    /// function, for operators who run one tenant per replica.
    #[arg(long, env = "WASMBOX_TENANCY", value_enum, default_value_t = Tenancy::Isolated)]
    pub tenancy: Tenancy,

    /// Clean workers (bound to no tenant yet) the pool keeps idle in isolated tenancy, so a
    /// request for a tenant no idle worker serves takes one at once instead of waiting for
    /// a process; replenished in the background by recycling the least recently used idle
    /// worker. At most the pool size minus one.
    #[arg(long, env = "WASMBOX_SPARE_WORKERS", default_value_t = 1)]
    pub spare_workers: usize,

    /// How long a tenant's worker must have been idle before the pool recycles it into a
    /// spare, so a busy tenant's workers are never taken to make spares.
    #[arg(long, env = "WASMBOX_SPARE_AFTER_IDLE_MS", default_value_t = 1000)]
    pub spare_after_idle_ms: u64,

    /// Fork new workers from a zygote, a process that has loaded the worker binary and its
    /// engine library once, instead of starting each by exec (respawns and tenant switches
    /// then cost a fork). A spawn the zygote cannot serve falls back to exec.
    #[arg(long, env = "WASMBOX_ZYGOTE", default_value_t = true, action = ArgAction::Set,
        value_parser = BoolishValueParser::new())]
    pub zygote: bool,

    /// Replace each worker process after this many invocations (0: never), so nothing a
    /// long-lived process accumulates outlives a bounded number of tenants' requests.
    #[arg(long, env = "WASMBOX_WORKER_MAX_INVOCATIONS")]
    pub worker_max_invocations: Option<u64>,

    /// Time a client has to send complete request headers, counted from the accept or, on a
    /// kept-alive connection, from the previous response: also the idle timeout.
    #[arg(long, env = "WASMBOX_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,

    /// Largest request head (request line and headers) in bytes; beyond it 431 and the
    /// connection is closed. At least 8192, at most 262144.
    #[arg(long, env = "WASMBOX_MAX_HEADER_BYTES", default_value_t = 16 << 10)]
    pub max_header_bytes: usize,

    /// Open client connections. At the limit, up to WASMBOX_RESERVE_CONNECTIONS more are
    /// accepted for /healthz, /ready and /metrics only (anything else gets 503 overloaded);
    /// past those the server stops accepting until one closes (new connections wait in the
    /// kernel's listen backlog).
    #[arg(long, env = "WASMBOX_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Connections accepted beyond WASMBOX_MAX_CONNECTIONS so health checks and scrapes are
    /// answered even when clients hold every connection slot: each serves one request,
    /// health endpoints normally and anything else with 503, then closes.
    #[arg(long, env = "WASMBOX_RESERVE_CONNECTIONS", default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=4096))]
    pub reserve_connections: u64,

    /// Longest a request body may go without a byte arriving, in ms; also the grace period
    /// before WASMBOX_MIN_DATA_RATE applies. A client that misses it gets 408 and the
    /// connection is closed.
    #[arg(long, env = "WASMBOX_BODY_READ_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub body_read_timeout_ms: u64,

    /// Longest writing a response may make no progress while the client does not read it,
    /// in ms; also the grace period before WASMBOX_MIN_DATA_RATE applies. A client that
    /// misses it has its connection closed.
    #[arg(long, env = "WASMBOX_RESPONSE_WRITE_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub response_write_timeout_ms: u64,

    /// Slowest a client may send a request body or take a response once the read or write
    /// timeout has passed, in bytes per second (by then it must have moved timeout-excess x
    /// rate bytes), so a trickle cannot keep a connection forever; 0: no minimum.
    #[arg(long, env = "WASMBOX_MIN_DATA_RATE", default_value_t = 1024)]
    pub min_data_rate: u64,

    /// Bytes the server holds for clients at once: request bodies being read or waiting for
    /// a worker (function stdin, session messages, snapshot imports, uploads), session state
    /// read for a message, responses not yet written. A request whose body would exceed it
    /// waits up to 1 s, then gets 503 overloaded with Retry-After, before any of it is read;
    /// /ready is 503 while a body of WASMBOX_MAX_BODY_BYTES would not fit.
    #[arg(long, env = "WASMBOX_MAX_BUFFERED_BYTES", default_value_t = 256 << 20)]
    pub max_buffered_bytes: u64,

    /// Close every descriptor a worker inherits except its socket.
    #[arg(long, env = "WASMBOX_WORKER_CLOSE_FDS", default_value_t = true, action = ArgAction::Set,
        value_parser = BoolishValueParser::new())]
    pub worker_close_fds: bool,

    /// Resource limits on each worker: no core dumps, WASMBOX_WORKER_NOFILE open files,
    /// WASMBOX_WORKER_FSIZE_MB per file written, and (with a worker user) a process count.
    #[arg(long, env = "WASMBOX_WORKER_RLIMITS", default_value_t = true, action = ArgAction::Set,
        value_parser = BoolishValueParser::new())]
    pub worker_rlimits: bool,

    /// RLIMIT_NOFILE of each worker.
    #[arg(long, env = "WASMBOX_WORKER_NOFILE", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(64..))]
    pub worker_nofile: u64,

    /// RLIMIT_FSIZE of each worker in MiB: the largest file a function (or an artifact)
    /// may write; beyond it writes fail with EFBIG.
    #[arg(long, env = "WASMBOX_WORKER_FSIZE_MB", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub worker_fsize_mb: u64,

    /// User (name, uid or uid:gid) workers run as when the supervisor runs as root
    /// [default: nobody]; empty keeps the supervisor's user.
    #[arg(long, env = "WASMBOX_WORKER_USER")]
    pub worker_user: Option<String>,

    /// First uid of the range workers and compile processes run as when the supervisor is
    /// root: worker slot n as base+n, compiler slot m as base+workers+m (gid the same), so
    /// no slot can signal, trace or read another. The range must be unused on the host
    /// (and mapped, in a user namespace) [default: 2000000].
    #[arg(long, env = "WASMBOX_WORKER_UID_BASE")]
    pub worker_uid_base: Option<u32>,

    /// Give each worker a network namespace of its own with no interface up: functions get
    /// no network (needs CAP_SYS_ADMIN; skipped with a log line where not permitted).
    #[arg(long, env = "WASMBOX_WORKER_NETNS", default_value_t = true, action = ArgAction::Set,
        value_parser = BoolishValueParser::new())]
    pub worker_netns: bool,

    /// Set PR_SET_NO_NEW_PRIVS on workers: nothing they run can gain privileges.
    #[arg(long, env = "WASMBOX_WORKER_NO_NEW_PRIVS", default_value_t = true, action = ArgAction::Set,
        value_parser = BoolishValueParser::new())]
    pub worker_no_new_privs: bool,

    /// Seccomp allow-list on workers: enforce kills a worker making any other syscall
    /// (SIGSYS, 502 seccomp_violation), log only logs it (kernel audit log).
    #[arg(long, env = "WASMBOX_WORKER_SECCOMP", value_enum, default_value_t = SeccompMode::Enforce)]
    pub worker_seccomp: SeccompMode,

    /// Test hooks in workers (debug builds only; refused by release builds).
    #[arg(long, env = "WASMBOX_TEST_HOOKS", hide = true, default_value_t = false, action = ArgAction::Set,
        value_parser = BoolishValueParser::new())]
    pub test_hooks: bool,

    /// Per-worker cgroups: auto uses them where the cgroup file system is writable (else
    /// warns once), required refuses to start without them, off never touches cgroup files.
    #[arg(long, env = "WASMBOX_CGROUPS", value_enum, default_value_t = CgroupMode::Auto)]
    pub cgroups: CgroupMode,

    /// Compatibility switch of the original deployment: false means WASMBOX_CGROUPS=off.
    #[arg(long, env = "ENABLE_CGROUPS", value_parser = clap::builder::BoolishValueParser::new())]
    pub enable_cgroups: Option<bool>,

    /// Parent cgroup of the worker cgroups: relative to the supervisor's own cgroup, or
    /// absolute from the hierarchy root.
    #[arg(long, env = "WASMBOX_CGROUP_PARENT", default_value = "wasmbox")]
    pub cgroup_parent: String,

    /// pids.max of each worker cgroup (counts threads: the worker runs a few, plus the
    /// engine's compiler threads).
    #[arg(long, env = "WASMBOX_PIDS_MAX", default_value_t = 64, value_parser = clap::value_parser!(u64).range(8..))]
    pub pids_max: u64,

    /// MiB added to each invocation's kernel memory limit on top of Memory-Request, the
    /// worker's current use and the request's I/O buffers: room for compiling a module and
    /// for the engine's own bookkeeping.
    #[arg(long, env = "WASMBOX_CGROUP_MEMORY_HEADROOM_MB", default_value_t = 64)]
    pub cgroup_memory_headroom_mb: u64,

    /// MiB a worker's memory limit allows on top while it compiles a module it has not run
    /// before; the invocation's own limit applies before the guest starts.
    #[arg(long, env = "WASMBOX_CGROUP_COMPILE_MEMORY_MB", default_value_t = 1024)]
    pub cgroup_compile_memory_mb: u64,

    /// Directory of durable session state (one snapshot file per session) [default:
    /// $XDG_STATE_HOME/wasmbox, ~/.local/state/wasmbox, or a per-user directory under /tmp].
    /// One supervisor per directory: it is locked while in use.
    #[arg(long, env = "WASMBOX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Sessions held at most, over all functions; creating or importing one more is 507
    /// session_limit (scope server).
    #[arg(long, env = "WASMBOX_SESSION_MAX", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub session_max: u64,

    /// Sessions one function may hold unless its name.toml sets `[session] max_sessions`;
    /// one more is 507 session_limit (scope function), whatever the other functions hold.
    #[arg(long, env = "WASMBOX_SESSION_MAX_PER_FUNCTION", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub session_max_per_function: u64,

    /// Bytes of snapshots the state directory holds at most, over all functions; a
    /// session or message whose state would pass it is 507 session_storage_full (scope
    /// server) and changes nothing.
    #[arg(long, env = "WASMBOX_SESSION_MAX_TOTAL_BYTES", default_value_t = 8 << 30, value_parser = clap::value_parser!(u64).range(4096..))]
    pub session_max_total_bytes: u64,

    /// Bytes of snapshots one function's sessions may hold unless its name.toml sets
    /// `[session] max_stored_bytes` (507 session_storage_full, scope function).
    #[arg(long, env = "WASMBOX_SESSION_MAX_BYTES_PER_FUNCTION", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(4096..))]
    pub session_max_bytes_per_function: u64,

    /// Largest session snapshot in bytes (compressed, as stored): an import above it is 413,
    /// a message whose new state encodes larger fails with 507 and changes nothing.
    #[arg(long, env = "WASMBOX_SESSION_MAX_SNAPSHOT_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..=(4u64 << 30)))]
    pub session_max_snapshot_bytes: u64,

    /// Seconds without a message after which a session is deleted (0: never).
    #[arg(long, env = "WASMBOX_SESSION_IDLE_SECS", default_value_t = 86_400)]
    pub session_idle_secs: u64,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level or filter (tracing syntax); RUST_LOG takes precedence when set.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// The Wasm engines a worker can be built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    Wasmtime,
    Wasmedge,
}

impl EngineKind {
    /// The name workers know it by (`wasmbox-worker --engine`).
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Wasmtime => "wasmtime",
            EngineKind::Wasmedge => "wasmedge",
        }
    }

    /// Whether the engine runs WebAssembly components (WASI 0.2) besides core modules.
    pub fn runs_components(self) -> bool {
        matches!(self, EngineKind::Wasmtime)
    }
}

/// `WASMBOX_TENANCY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Tenancy {
    Isolated,
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Shortest WASMBOX_ADMIN_TOKEN accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Defaults and maxima for the per-invocation limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitDefaults {
    pub default_cpu_quota: u64,
    pub max_cpu_quota: u64,
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
}

impl Config {
    /// Number of CPUs this process may use.
    pub fn cpus() -> u64 {
        std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1)
    }

    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(Self::cpus) as usize
    }

    /// Compile processes that may run at once (`WASMBOX_COMPILERS`).
    pub fn compiler_count(&self) -> usize {
        self.compilers.map_or_else(|| Self::cpus().min(4), u64::from).max(1) as usize
    }

    pub fn io_thread_count(&self) -> usize {
        self.io_threads.unwrap_or_else(|| Self::cpus().div_ceil(4)) as usize
    }

    pub fn ready_queue_threshold(&self) -> usize {
        self.ready_queue_threshold.unwrap_or((self.queue_depth * 3 / 4).max(1))
    }

    pub fn readiness(&self) -> crate::readiness::ReadinessSettings {
        crate::readiness::ReadinessSettings {
            interval: Duration::from_millis(self.ready_interval_ms),
            window: Duration::from_millis(self.ready_window_ms),
            memory_threshold: self.ready_memory_percent as f64 / 100.0,
            queue_threshold: self.ready_queue_threshold(),
        }
    }

    /// The admin token, when the admin API is on.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref().filter(|t| !t.is_empty())
    }

    pub fn limits(&self) -> LimitDefaults {
        LimitDefaults {
            default_cpu_quota: self.default_cpu_quota,
            max_cpu_quota: self.max_cpu_quota.unwrap_or(Self::cpus() * 1000),
            default_memory_mb: self.default_memory_mb,
            max_memory_mb: self.max_memory_mb,
            default_timeout_ms: self.default_timeout_ms,
            max_timeout_ms: self.max_timeout_ms,
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// The engine, from WASMBOX_ENGINE or its alias WASM_RUNTIME.
    pub fn engine(&self) -> Result<EngineKind, ConfigError> {
        match (self.engine, self.wasm_runtime) {
            (Some(a), Some(b)) if a != b => {
                Err(ConfigError(format!("WASMBOX_ENGINE={} contradicts WASM_RUNTIME={}", a.name(), b.name())))
            }
            (Some(e), _) | (None, Some(e)) => Ok(e),
            (None, None) => Ok(EngineKind::Wasmtime),
        }
    }

    /// Engine flags of `wasmbox-worker`, for workers and compile processes alike (the
    /// two must compile and run functions the same way).
    pub fn engine_args(&self) -> Vec<String> {
        let wasmedge = matches!(self.engine(), Ok(EngineKind::Wasmedge));
        if wasmedge && self.wasmedge_interruptible { vec!["--wasmedge-interruptible".into()] } else { Vec::new() }
    }

    /// Session state directory, resolved from the flag or the per-user default.
    pub fn resolved_state_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.clone();
        }
        let from_env = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(xdg) = from_env("XDG_STATE_HOME") {
            return xdg.join("wasmbox");
        }
        if let Some(home) = from_env("HOME") {
            return home.join(".local").join("state").join("wasmbox");
        }
        std::env::temp_dir().join(format!("wasmbox-state-{}", nix::unistd::geteuid()))
    }

    /// The session limits.
    pub fn session_limits(&self) -> crate::sessions::SessionLimits {
        crate::sessions::SessionLimits {
            max_sessions: usize::try_from(self.session_max).unwrap_or(usize::MAX),
            max_total_bytes: self.session_max_total_bytes,
            per_function: crate::sessions::Quota {
                max_sessions: usize::try_from(self.session_max_per_function).unwrap_or(usize::MAX),
                max_bytes: self.session_max_bytes_per_function,
            },
            max_snapshot_bytes: self.session_max_snapshot_bytes,
            idle: (self.session_idle_secs > 0).then(|| Duration::from_secs(self.session_idle_secs)),
        }
    }

    /// Cache directory, resolved from the flag or the per-user default.
    pub fn resolved_cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.cache_dir {
            return dir.clone();
        }
        let from_env = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(xdg) = from_env("XDG_CACHE_HOME") {
            return xdg.join("wasmbox");
        }
        if let Some(home) = from_env("HOME") {
            return home.join(".cache").join("wasmbox");
        }
        std::env::temp_dir().join(format!("wasmbox-cache-{}", nix::unistd::geteuid()))
    }

    /// The cgroup settings, with `ENABLE_CGROUPS=false` meaning off.
    pub fn cgroup_settings(&self) -> Result<CgroupSettings, ConfigError> {
        let mode = match (self.enable_cgroups, self.cgroups) {
            (Some(false), CgroupMode::Required) => {
                return Err(ConfigError("ENABLE_CGROUPS=false contradicts WASMBOX_CGROUPS=required".into()));
            }
            (Some(false), _) => CgroupMode::Off,
            (_, mode) => mode,
        };
        Ok(CgroupSettings {
            mode,
            parent: self.cgroup_parent.clone(),
            pids_max: self.pids_max,
            memory_headroom_bytes: self.cgroup_memory_headroom_mb.saturating_mul(1 << 20),
            compilers: self.compiler_count(),
        })
    }

    /// Checks relations between settings that flags alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let limits = self.limits();
        let pairs = [
            ("WASMBOX_DEFAULT_CPU_QUOTA", limits.default_cpu_quota, "WASMBOX_MAX_CPU_QUOTA", limits.max_cpu_quota),
            ("WASMBOX_DEFAULT_MEMORY_MB", limits.default_memory_mb, "WASMBOX_MAX_MEMORY_MB", limits.max_memory_mb),
            ("WASMBOX_DEFAULT_TIMEOUT_MS", limits.default_timeout_ms, "WASMBOX_MAX_TIMEOUT_MS", limits.max_timeout_ms),
        ];
        for (default_name, default, max_name, max) in pairs {
            if default == 0 {
                return Err(ConfigError(format!("{default_name} must be at least 1")));
            }
            if default > max {
                return Err(ConfigError(format!("{default_name}={default} exceeds {max_name}={max}")));
            }
        }
        self.cgroup_settings()?;
        self.engine()?;
        if limits.default_cpu_quota < crate::cgroup::MIN_CPU_QUOTA_MILLIS {
            return Err(ConfigError(format!(
                "WASMBOX_DEFAULT_CPU_QUOTA must be at least {} millicores",
                crate::cgroup::MIN_CPU_QUOTA_MILLIS
            )));
        }
        // Paths travel to workers in JSON frame headers (module path, preopen hosts under it).
        if self.functions_dir.to_str().is_none() {
            return Err(ConfigError(format!(
                "WASMBOX_FUNCTIONS_DIR={} is not valid UTF-8",
                self.functions_dir.display()
            )));
        }
        if self.max_body_bytes == 0 || self.max_output_bytes == 0 || self.max_module_bytes == 0 {
            return Err(ConfigError("byte limits must be at least 1".into()));
        }
        self.validate_http()?;
        if let Some(token) = self.admin_token() {
            if token.len() < MIN_ADMIN_TOKEN_LEN || token.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(ConfigError(format!(
                    "WASMBOX_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LEN} printable characters without spaces"
                )));
            }
        }
        if self.health_listen.is_some_and(|h| h == self.listen && h.port() != 0) {
            return Err(ConfigError("WASMBOX_HEALTH_LISTEN must differ from WASMBOX_LISTEN".into()));
        }
        Ok(())
    }

    /// The HTTP front end's settings (`crate::http`).
    fn validate_http(&self) -> Result<(), ConfigError> {
        if self.header_read_timeout_ms == 0 {
            return Err(ConfigError(
                "WASMBOX_HEADER_READ_TIMEOUT_MS must be at least 1: it also bounds idle connections".into(),
            ));
        }
        let header_bytes = self.max_header_bytes;
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES_CEILING).contains(&header_bytes) {
            return Err(ConfigError(format!(
                "WASMBOX_MAX_HEADER_BYTES={header_bytes} is outside {MIN_HEADER_BYTES}..={MAX_HEADER_BYTES_CEILING} \
                 (hyper's smallest read buffer is {MIN_HEADER_BYTES} bytes; ordinary clients need that much)"
            )));
        }
        if !(1..=MAX_CONNECTIONS_CEILING).contains(&self.max_connections) {
            return Err(ConfigError(format!(
                "WASMBOX_MAX_CONNECTIONS={} is outside 1..={MAX_CONNECTIONS_CEILING}",
                self.max_connections
            )));
        }
        // Every request that is allowed at all must fit the budget on its own.
        let mut largest = vec![
            ("WASMBOX_MAX_BODY_BYTES", self.max_body_bytes),
            ("WASMBOX_SESSION_MAX_SNAPSHOT_BYTES", self.session_max_snapshot_bytes),
        ];
        if self.admin_token().is_some() {
            largest.push(("WASMBOX_MAX_MODULE_BYTES", self.max_module_bytes));
        }
        for (name, bytes) in largest {
            if bytes > self.max_buffered_bytes {
                return Err(ConfigError(format!(
                    "{name}={bytes} exceeds WASMBOX_MAX_BUFFERED_BYTES={}: such a request could never be read",
                    self.max_buffered_bytes
                )));
            }
        }
        Ok(())
    }
}

/// How a seccomp violation is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the worker with SIGSYS: the request gets 502 `seccomp_violation`.
    Enforce,
    /// Allow the syscall but have the kernel log it (audit log / dmesg).
    Log,
    /// No filter.
    Off,
}

impl SeccompMode {
    pub(crate) fn flag(self) -> &'static str {
        match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        }
    }
}

/// Smallest `WASMBOX_MAX_HEADER_BYTES`: hyper's floor for its read buffer, and what ordinary
/// clients (cookies, bearer tokens) need.
pub const MIN_HEADER_BYTES: usize = 8192;
/// Largest `WASMBOX_MAX_HEADER_BYTES`: below hyper's default read buffer limit (about
/// 400 KiB), so the configured limit is always the one that applies.
pub const MAX_HEADER_BYTES_CEILING: usize = 256 << 10;
/// Largest `WASMBOX_MAX_CONNECTIONS`.
pub const MAX_CONNECTIONS_CEILING: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("wasmbox").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_work_on_a_laptop() {
        let c = parse(&[]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8095");
        assert!(c.worker_count() >= 1);
        c.validate().unwrap();
        assert_eq!(c.limits().max_cpu_quota, Config::cpus() * 1000);
    }

    #[test]
    fn default_above_max_is_refused() {
        let c = parse(&["--default-memory-mb", "512", "--max-memory-mb", "256"]);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("WASMBOX_DEFAULT_MEMORY_MB=512"), "{err}");
    }

    #[test]
    fn enable_cgroups_false_means_off() {
        assert_eq!(parse(&[]).cgroup_settings().unwrap().mode, CgroupMode::Auto);
        for off in ["false", "0", "no", "off"] {
            let c = parse(&["--enable-cgroups", off]);
            assert_eq!(c.cgroup_settings().unwrap().mode, CgroupMode::Off, "{off}");
        }
        assert_eq!(parse(&["--enable-cgroups", "true"]).cgroup_settings().unwrap().mode, CgroupMode::Auto);
        let c = parse(&["--enable-cgroups", "false", "--cgroups", "required"]);
        assert!(c.validate().unwrap_err().to_string().contains("ENABLE_CGROUPS=false"));
    }

    #[test]
    fn http_limits_are_checked_and_named() {
        let c = parse(&[]);
        assert_eq!((c.max_header_bytes, c.max_connections, c.header_read_timeout_ms), (16 << 10, 1024, 10_000));
        for (args, named) in [
            (&["--max-header-bytes", "8191"][..], "WASMBOX_MAX_HEADER_BYTES=8191"),
            (&["--max-header-bytes", "262145"], "WASMBOX_MAX_HEADER_BYTES=262145"),
            (&["--max-connections", "0"], "WASMBOX_MAX_CONNECTIONS=0"),
            (&["--max-connections", "1048577"], "WASMBOX_MAX_CONNECTIONS=1048577"),
            (&["--header-read-timeout-ms", "0"], "WASMBOX_HEADER_READ_TIMEOUT_MS"),
        ] {
            let err = parse(args).validate().unwrap_err().to_string();
            assert!(err.contains(named), "{args:?}: {err}");
        }
        parse(&["--max-header-bytes", "8192", "--max-connections", "1"]).validate().unwrap();
        // Every request that is allowed must fit the budget of buffered bytes on its own.
        for (args, named) in [
            (&["--max-buffered-bytes", "1000"][..], "WASMBOX_MAX_BODY_BYTES"),
            (&["--max-buffered-bytes", "20000000", "--max-body-bytes", "1000"], "WASMBOX_SESSION_MAX_SNAPSHOT_BYTES"),
            (
                &[
                    "--max-buffered-bytes",
                    "100000000",
                    "--admin-token",
                    "0123456789abcdef",
                    "--max-module-bytes",
                    "200000000",
                ],
                "WASMBOX_MAX_MODULE_BYTES",
            ),
        ] {
            let err = parse(args).validate().unwrap_err().to_string();
            assert!(err.contains(named) && err.contains("WASMBOX_MAX_BUFFERED_BYTES"), "{args:?}: {err}");
        }
        let c = parse(&[]);
        assert_eq!((c.max_buffered_bytes, c.reserve_connections, c.min_data_rate), (256 << 20, 32, 1024));
        assert_eq!((c.body_read_timeout_ms, c.response_write_timeout_ms), (10_000, 10_000));
        assert!(Config::try_parse_from(["wasmbox", "--body-read-timeout-ms", "0"]).is_err());
        parse(&["--max-header-bytes", "262144", "--max-connections", "1048576"]).validate().unwrap();
        assert!(Config::try_parse_from(["wasmbox", "--max-connections", "-1"]).is_err());
    }

    #[test]
    fn a_functions_dir_that_is_not_utf8_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let mut c = parse(&[]);
        c.functions_dir = std::ffi::OsStr::from_bytes(b"/srv/fn\xff").into();
        assert!(c.validate().unwrap_err().to_string().contains("WASMBOX_FUNCTIONS_DIR"));
    }

    #[test]
    fn engine_from_wasmbox_engine_or_its_alias() {
        assert_eq!(parse(&[]).engine().unwrap(), EngineKind::Wasmtime);
        assert_eq!(parse(&["--engine", "wasmedge"]).engine().unwrap(), EngineKind::Wasmedge);
        assert_eq!(parse(&["--wasm-runtime", "wasmedge"]).engine().unwrap(), EngineKind::Wasmedge);
        assert_eq!(
            parse(&["--engine", "wasmedge", "--wasm-runtime", "wasmedge"]).engine().unwrap(),
            EngineKind::Wasmedge
        );
        let err = parse(&["--engine", "wasmtime", "--wasm-runtime", "wasmedge"]).validate().unwrap_err();
        assert!(err.to_string().contains("WASM_RUNTIME=wasmedge"), "{err}");
        assert!(Config::try_parse_from(["wasmbox", "--engine", "v8"]).is_err());
    }

    #[test]
    fn admin_token_and_health_listen_are_checked() {
        assert!(parse(&[]).admin_token().is_none());
        assert!(parse(&["--admin-token", ""]).admin_token().is_none(), "empty means off");
        let err = parse(&["--admin-token", "short"]).validate().unwrap_err().to_string();
        assert!(err.contains("WASMBOX_ADMIN_TOKEN"), "{err}");
        let err = parse(&["--admin-token", "has a space in it, 16+"]).validate().unwrap_err().to_string();
        assert!(err.contains("WASMBOX_ADMIN_TOKEN"), "{err}");
        let c = parse(&["--admin-token", "0123456789abcdef"]);
        c.validate().unwrap();
        assert_eq!(c.admin_token(), Some("0123456789abcdef"));
        let err = parse(&["--listen", "0.0.0.0:8095", "--health-listen", "0.0.0.0:8095"]).validate().unwrap_err();
        assert!(err.to_string().contains("WASMBOX_HEALTH_LISTEN"), "{err}");
        let r = parse(&["--ready-memory-percent", "80", "--ready-window-ms", "2000"]).readiness();
        assert_eq!((r.memory_threshold, r.window), (0.8, Duration::from_secs(2)));
        assert!(Config::try_parse_from(["wasmbox", "--ready-memory-percent", "101"]).is_err());
        assert!(Config::try_parse_from(["wasmbox", "--ready-interval-ms", "0"]).is_err());
    }

    #[test]
    fn zero_workers_is_a_parse_error() {
        assert!(Config::try_parse_from(["wasmbox", "--workers", "0"]).is_err());
    }
}
