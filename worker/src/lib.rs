//! WasmBox worker: one sandbox slot. A pre-forked process that receives invocations from
//! the supervisor over an inherited Unix socket and runs each in a fresh Wasm instance.

pub mod cache;
pub mod capture;
pub mod compile;
pub mod engine;
pub mod fdpass;
pub mod harden;
pub mod oneshot;
pub mod server;
pub mod session;
pub mod zygote;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use clap::Parser;

/// Command line of `wasmbox-worker`. The supervisor starts it; it is not meant to be run
/// by hand, except `--version`.
#[derive(Debug, Clone, Parser)]
#[command(name = "wasmbox-worker", version, about = "WasmBox worker process (started by the wasmbox supervisor)")]
pub struct WorkerArgs {
    /// Inherited file descriptor of this worker's end of the supervisor socketpair.
    #[arg(long, default_value_t = 3)]
    pub socket_fd: RawFd,
    /// Pool slot this worker serves (for logs).
    #[arg(long, default_value_t = 0)]
    pub slot: usize,
    /// Engine to run functions on.
    #[arg(long, default_value = "wasmtime")]
    pub engine: String,
    /// Root of the precompiled-artifact cache; none disables artifacts.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Compiled modules kept in this worker's memory.
    #[arg(long, default_value_t = 64)]
    pub module_cache_entries: usize,
    /// Largest module file the worker will read.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_module_bytes: u64,
    /// WasmEdge: compile commands with interruption checks, so WasmEdge stops them at their
    /// deadline (3-4x slower loops); by default they are plain native code and the
    /// supervisor kills the worker at the deadline.
    #[arg(long)]
    pub wasmedge_interruptible: bool,
    /// Log filter for the worker's own diagnostics (tracing syntax).
    #[arg(long, default_value = "warn")]
    pub log: String,
    /// Log JSON lines instead of text (the supervisor's LOG_FORMAT=json).
    #[arg(long)]
    pub log_json: bool,

    #[command(flatten)]
    pub hardening: harden::HardeningArgs,

    /// Run this module once instead of serving: stdin to stdout, the guest's exit code as
    /// this process's (125 for a trap or limit). Arguments for the guest follow `--`.
    #[arg(long, value_name = "MODULE")]
    pub one_shot: Option<PathBuf>,
    /// Linear memory limit of a one-shot run, in MiB.
    #[arg(long, default_value_t = 128, requires = "one_shot")]
    pub one_shot_memory_mb: u64,
    /// Deadline of a one-shot run, in milliseconds.
    #[arg(long, default_value_t = 10_000, requires = "one_shot")]
    pub one_shot_timeout_ms: u64,
    /// Arguments for the guest of a one-shot run.
    #[arg(last = true, requires = "one_shot")]
    pub guest_args: Vec<String>,

    /// Environment and preopened directories of a one-shot run, as JSON
    /// (`{"env": [["K", "V"]], "preopens": [{"host": ..., "guest": ..., "read_only": true}]}`);
    /// how `wasmbox invoke` passes a function's config.
    #[arg(long, hide = true, requires = "one_shot")]
    pub one_shot_wasi: Option<String>,

    /// Precompile these modules into the artifact cache (`--cache-dir`) and exit, without
    /// running them (`wasmbox compile`). With `--user`, the artifacts belong to that user,
    /// as the workers that will load them run as it.
    #[arg(long, num_args = 1.., value_name = "MODULE", conflicts_with = "one_shot")]
    pub compile: Vec<PathBuf>,

    /// Compile process of the supervisor's trusted compiler: compile the module read from
    /// stdin (it must have this SHA-256) into the directory at `--socket-fd` (a directory
    /// descriptor here), under the same hardening as a worker, and report on stdout
    /// (`wasmbox_protocol::CompileReport`, one JSON line). The process runs no guest code
    /// and ends after the one module.
    #[arg(long, value_name = "SHA256", conflicts_with_all = ["one_shot", "compile"])]
    pub compile_artifact: Option<String>,
    /// With `--compile-artifact`: the form to compile (`command`, or `session`: the
    /// rewritten module sessions run).
    #[arg(long, default_value = "command", requires = "compile_artifact")]
    pub compile_kind: String,

    /// Serve fork requests on `--socket-fd` instead of invocations: the zygote the
    /// supervisor forks workers from (see `zygote`).
    #[arg(long, conflicts_with_all = ["one_shot", "compile", "compile_artifact"])]
    pub zygote: bool,

    /// `/proc/self/cgroup` as read at the start of `main` (not a flag).
    #[arg(skip)]
    pub initial_cgroup: String,
    /// The parent process at the start of `main` (the supervisor; not a flag).
    #[arg(skip)]
    pub supervisor_pid: Option<nix::unistd::Pid>,
}

impl WorkerArgs {
    /// Who stops WasmEdge commands at their deadline (`--wasmedge-interruptible`).
    pub fn wasmedge_deadlines(&self) -> wasmbox_protocol::Deadlines {
        if self.wasmedge_interruptible {
            wasmbox_protocol::Deadlines::Engine
        } else {
            wasmbox_protocol::Deadlines::Process
        }
    }
}

/// Where a worker finds its socket.
pub const DEFAULT_SOCKET_FD: RawFd = 3;

/// The engines compiled into this worker.
pub const ENGINES: &[&str] = &[
    "wasmtime",
    #[cfg(feature = "wasmedge")]
    "wasmedge",
];

/// Errors that end a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "engine {0:?} is not in this wasmbox-worker (it has: {engines}); WasmEdge needs a build with \
         `--features wasmedge` against libwasmedge 0.17 (see the README's Engines section)",
        engines = ENGINES.join(", ")
    )]
    UnknownEngine(String),
    #[error("engine failed to start")]
    Engine(#[source] anyhow::Error),
    #[error(transparent)]
    CacheDir(#[from] cache::CacheDirError),
    #[error("socket fd {0} is not an open socket")]
    Socket(RawFd),
    #[error("supervisor connection failed")]
    Protocol(#[from] wasmbox_protocol::FrameError),
    #[error(transparent)]
    Hardening(#[from] harden::HardeningError),
    #[error("cannot enter the artifact directory")]
    WorkDir(#[source] std::io::Error),
}

/// Runs the worker until the supervisor closes its socket. `applied` lists the hardening
/// layers `main` already applied (closing inherited descriptors).
pub fn run(args: WorkerArgs, mut applied: harden::Applied) -> Result<(), WorkerError> {
    let socket = adopt_socket(args.socket_fd)?;
    let hardening = &args.hardening;
    // Namespaces belong to threads: enter the new one while this is the only thread.
    if hardening.netns {
        harden::enter_network_namespace(&mut applied)?;
    }
    // Test hooks exist only in builds that have them, whatever the flag says.
    let test_hooks = crate::harden::TEST_HOOKS_BUILT && hardening.test_hooks;
    let supervisor = args.supervisor_pid.unwrap_or_else(nix::unistd::getppid);
    match args.engine.as_str() {
        "wasmtime" => {
            let engine = match zygote::take_prepared_engine() {
                Some(unstarted) => unstarted.start(),
                None => engine::wasmtime::WasmtimeEngine::for_serving(test_hooks),
            }
            .map_err(WorkerError::Engine)?;
            serve_on(engine, socket, &args, supervisor, applied)
        }
        #[cfg(feature = "wasmedge")]
        "wasmedge" => {
            let engine = match zygote::take_prepared_wasmedge() {
                Some(engine) => engine,
                None => {
                    engine::wasmedge::WasmEdgeEngine::new(args.wasmedge_deadlines()).map_err(WorkerError::Engine)?
                }
            };
            serve_on(engine, socket, &args, supervisor, applied)
        }
        other => Err(WorkerError::UnknownEngine(other.into())),
    }
}

/// Runs `--one-shot`'s module once on the chosen engine; returns the exit status.
pub fn run_one_shot(args: &WorkerArgs) -> anyhow::Result<u8> {
    let wasi: oneshot::Wasi = match &args.one_shot_wasi {
        Some(json) => serde_json::from_str(json).map_err(|e| anyhow::anyhow!("--one-shot-wasi: {e}"))?,
        None => oneshot::Wasi::default(),
    };
    let job = oneshot::OneShot {
        module: args.one_shot.clone().ok_or_else(|| anyhow::anyhow!("--one-shot needs a module"))?,
        args: args.guest_args.clone(),
        wasi,
        cache_dir: args.cache_dir.clone(),
        memory_limit_bytes: args.one_shot_memory_mb << 20,
        timeout: std::time::Duration::from_millis(args.one_shot_timeout_ms),
        max_output_bytes: 16 << 20,
        max_module_bytes: args.max_module_bytes,
    };
    match args.engine.as_str() {
        "wasmtime" => oneshot::run(engine::wasmtime::WasmtimeEngine::new(false)?, &job),
        #[cfg(feature = "wasmedge")]
        "wasmedge" => oneshot::run(engine::wasmedge::WasmEdgeEngine::new(args.wasmedge_deadlines())?, &job),
        other => Err(WorkerError::UnknownEngine(other.into()).into()),
    }
}

/// `--compile`: precompiles every module into the artifact cache; returns the exit status
/// (0 when all compiled, 1 when any failed; each failure is reported on stderr).
pub fn run_compile(args: &WorkerArgs) -> anyhow::Result<u8> {
    match args.engine.as_str() {
        "wasmtime" => compile::run(engine::wasmtime::WasmtimeEngine::new(false)?, args),
        #[cfg(feature = "wasmedge")]
        "wasmedge" => compile::run(engine::wasmedge::WasmEdgeEngine::new(args.wasmedge_deadlines())?, args),
        other => Err(WorkerError::UnknownEngine(other.into()).into()),
    }
}

/// `--zygote`: serves fork requests (see [`zygote`]); each child runs [`run`].
pub fn run_zygote(args: WorkerArgs, applied: harden::Applied) -> Result<(), WorkerError> {
    let socket = adopt_socket(args.socket_fd)?;
    zygote::serve(args, socket, applied, run)
}

/// `--compile-artifact`: compiles one module for the supervisor (see
/// [`compile::artifact`]); `applied` as for [`run`].
pub fn run_compile_artifact(args: WorkerArgs, mut applied: harden::Applied) -> Result<(), WorkerError> {
    if args.hardening.netns {
        harden::enter_network_namespace(&mut applied)?;
    }
    let supervisor = args.supervisor_pid.unwrap_or_else(nix::unistd::getppid);
    // The test hooks' host functions must link in the compile check as in the worker.
    let test_hooks = crate::harden::TEST_HOOKS_BUILT && args.hardening.test_hooks;
    match args.engine.as_str() {
        "wasmtime" => {
            let engine = engine::wasmtime::WasmtimeEngine::new(test_hooks).map_err(WorkerError::Engine)?;
            compile::artifact(engine, &args, supervisor, applied)
        }
        #[cfg(feature = "wasmedge")]
        "wasmedge" => {
            let engine =
                engine::wasmedge::WasmEdgeEngine::new(args.wasmedge_deadlines()).map_err(WorkerError::Engine)?;
            compile::artifact(engine, &args, supervisor, applied)
        }
        other => Err(WorkerError::UnknownEngine(other.into())),
    }
}

/// Sets up the module cache on `engine`, applies the remaining hardening, then serves.
fn serve_on<E: engine::Engine>(
    engine: E,
    socket: UnixStream,
    args: &WorkerArgs,
    supervisor: nix::unistd::Pid,
    mut applied: harden::Applied,
) -> Result<(), WorkerError> {
    let mut cache = cache::ModuleCache::new_owned(
        engine,
        args.cache_dir.as_deref(),
        args.hardening.user,
        args.module_cache_entries,
        args.max_module_bytes,
    )?;
    cache.enter_artifact_dir().map_err(WorkerError::WorkDir)?;
    harden::limit_and_become_user(&args.hardening, &mut applied)?;
    batch_scheduling();
    cache.engine().warm_up().map_err(|e| WorkerError::Engine(e.into()))?;
    harden::prime_allocator().map_err(WorkerError::WorkDir)?;
    let paths = cache.engine().path_policy();
    harden::seal(&args.hardening, supervisor, paths, &mut applied)?;
    server::serve(socket, cache, args.initial_cgroup.clone(), applied.0)?;
    Ok(())
}

/// Puts this thread, and every thread it starts from here on (the engine's), under
/// `SCHED_BATCH`: the same share of CPU, but a worker the supervisor wakes does not
/// preempt the supervisor's I/O thread on its CPU; it runs when that thread waits or its
/// slice ends. The supervisor, which serves every tenant, goes on with its other requests
/// instead of being switched out once per invocation. Unprivileged; a refusal is logged.
fn batch_scheduling() {
    let param = nix::libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system call on this thread (pid 0) with a valid parameter block.
    if unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_BATCH, &param) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot switch to SCHED_BATCH");
    }
}

fn adopt_socket(fd: RawFd) -> Result<UnixStream, WorkerError> {
    // Refuse anything that is not an open socket before taking ownership of it.
    if fd < 0 {
        return Err(WorkerError::Socket(fd));
    }
    let is_socket = nix::sys::stat::fstat(unsafe_borrow(fd))
        .map(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFSOCK)
        .unwrap_or(false);
    if !is_socket {
        return Err(WorkerError::Socket(fd));
    }
    // SAFETY: the fd was checked above to be an open socket; the supervisor hands it to
    // this process for its exclusive use, and nothing else in the worker refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixStream::from(owned))
}

fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: `fd` is non-negative (checked by the caller); the borrow is used for a single
    // fstat, which reports EBADF for a closed fd rather than touching anything else.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
