//! The invocation path, the one way anything runs on a worker: resolve the function and
//! its limits, open what the worker gets (module, preopens) and the module's artifact from
//! the trusted compiler, take a worker of the function's tenant, run, and account for it.
//! Commands and session steps both come through here.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmbox_protocol::{HttpRequest, Invocation, ModuleSource, Outcome, SessionCall, SessionOp};

use super::ServiceError;
use crate::App;
use crate::compiler::{CompileError, Kind};
use crate::error_chain;
use crate::limits::{InvocationLimits, Requested};
use crate::pool::{Completed, HttpStreams, InvokeFailure, Job, Lease};
use crate::registry::files::PreopenError;
use crate::registry::{Function, FunctionName, OpenError};

/// The function a request names, as the registry has it now, and the limits the request
/// gets with it.
pub async fn resolve(
    app: &App,
    name: &FunctionName,
    requested: Requested,
) -> Result<(Arc<Function>, InvocationLimits), ServiceError> {
    let function = app.registry.lookup(name).await?;
    let limits = crate::limits::resolve(requested, &function.config.limits, &app.limits)?;
    Ok((function, limits))
}

/// One run of a function on a worker.
pub struct Call<'a> {
    pub request_id: &'a str,
    pub function: Arc<Function>,
    pub limits: InvocationLimits,
    /// argv[1..]; `None`: the function's default arguments.
    pub args: Option<Vec<String>>,
    /// The guest's stdin (a session step: the message).
    pub input: Bytes,
    pub step: Option<Step<'a>>,
    /// A request for a `wasi:http/proxy` component (`input` is its body), and where its
    /// response goes.
    pub http: Option<(HttpRequest, HttpStreams)>,
}

/// A session step: what it does, and the state it starts from.
pub struct Step<'a> {
    pub op: SessionOp,
    pub state: State<'a>,
}

/// Where a step's snapshot comes from.
pub enum State<'a> {
    /// A new session: none.
    Fresh,
    /// An import: the request body, already read (and counted).
    Given(Bytes),
    /// A message: the session's committed state, read only once a worker is ours.
    Stored(&'a crate::sessions::Session),
}

/// A run that reached a worker: its result (or why it produced none), which worker, and
/// how long the request waited for it.
pub struct Ran {
    /// The function as it ran (the registry may have read it again on the way).
    pub function: Arc<Function>,
    pub limits: InvocationLimits,
    pub completed: Result<Completed, InvokeFailure>,
    pub worker: String,
    pub queue_wait: Duration,
}

impl Ran {
    /// The guest's outcome, when the worker gave one.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.completed.as_ref().ok().map(|c| &c.result.outcome)
    }
}

/// Runs `call`. A command whose module was replaced between the registry's hash and the
/// worker's read runs once more, with the module as it is now.
pub async fn run(app: &App, call: Call<'_>) -> Result<Ran, ServiceError> {
    if app.is_draining() {
        return Err(ServiceError::ShuttingDown);
    }
    let Call { request_id, mut function, limits, args, input, step, http } = call;
    if let Some((request, sink)) = http {
        // One attempt: a response may be under way when anything fails.
        let opened = open(app, function, Kind::Command).await?;
        let function = opened.function.clone();
        let mut invocation = invocation(app, request_id, &function, vec![function.name.to_string()], limits, None);
        invocation.http = Some(request);
        let lease = acquire(app, &function, &invocation).await?;
        return dispatch(app, lease, &function, limits, job(invocation, limits, vec![input], opened, Some(sink))).await;
    }
    // A session step's guest gets no arguments.
    let is_step = step.is_some();
    let argv = |function: &Function| -> Vec<String> {
        let rest =
            if is_step { Vec::new() } else { args.clone().unwrap_or_else(|| function.config.default_args.clone()) };
        std::iter::once(function.name.to_string()).chain(rest).collect()
    };
    let kind = if is_step { Kind::Session } else { Kind::Command };
    let Some(step) = step else {
        for attempt in 0..2 {
            let opened = open(app, function, kind).await?;
            function = opened.function.clone();
            let invocation = invocation(app, request_id, &function, argv(&function), limits, None);
            let lease = acquire(app, &function, &invocation).await?;
            let job = job(invocation, limits, vec![input.clone()], opened, None);
            let ran = dispatch(app, lease, &function, limits, job).await?;
            if attempt == 0 && ran.outcome() == Some(&Outcome::ModuleChanged) {
                app.registry.invalidate(&function.name);
                function = app.registry.lookup(&function.name).await?;
                continue;
            }
            return Ok(ran);
        }
        return Err(ServiceError::Internal("module kept changing while it was being loaded".into()));
    };
    // A session step: compiled first, then admission before allocation: the budget for the
    // stored state, then a worker (the queue), then the state is read, and it goes to the
    // worker as it was read, beside the message (one vectored write, no copy).
    let opened = open(app, function, kind).await?;
    let function = opened.function.clone();
    let call = SessionCall {
        op: step.op,
        handler: super::sessions::handler(&function),
        snapshot_len: 0,
        max_snapshot_bytes: app.sessions.limits().max_snapshot_bytes,
    };
    let mut invocation = invocation(app, request_id, &function, argv(&function), limits, Some(call));
    let _state_budget = match &step.state {
        State::Stored(session) => Some(
            app.buffers
                .take(session.snapshot_bytes.load(std::sync::atomic::Ordering::Relaxed))
                .await
                .map_err(|_| ServiceError::Overloaded)?,
        ),
        _ => None,
    };
    let lease = acquire(app, &function, &invocation).await?;
    let snapshot = match step.state {
        State::Fresh => Bytes::new(),
        State::Given(bytes) => bytes,
        State::Stored(session) => super::sessions::load(app, session, &function).await?,
    };
    if let Some(call) = invocation.session.as_mut() {
        call.snapshot_len = snapshot.len() as u64;
    }
    dispatch(app, lease, &function, limits, job(invocation, limits, vec![snapshot, input], opened, None)).await
}

/// The message a worker gets for one run: the one place an [`Invocation`] is made.
fn invocation(
    app: &App,
    request_id: &str,
    function: &Function,
    argv: Vec<String>,
    limits: InvocationLimits,
    session: Option<SessionCall>,
) -> Invocation {
    Invocation {
        request_id: request_id.to_owned(),
        function: function.name.to_string(),
        module: function.module.clone(),
        argv,
        env: function.config.env.clone(),
        preopens: function.config.preopens.clone(),
        memory_limit_bytes: limits.memory_bytes(),
        timeout_ms: limits.timeout_ms,
        max_output_bytes: app.config.max_output_bytes,
        confirm_start: false,
        passed_fds: 0,
        module_fd: false,
        artifact: false,
        session,
        http: None,
    }
}

/// A worker for `function`'s tenant, or why there is none (queue full, shutting down).
async fn acquire(app: &App, function: &Function, invocation: &Invocation) -> Result<Lease, ServiceError> {
    Ok(app.pool.acquire(function.tenant(), &invocation.module_key()).await?)
}

/// Runs `invocation` on the worker `lease` holds, and records what it used. The exchange
/// runs in its own task: a client that disconnects must not cancel it halfway, which
/// would leave the worker's protocol state unknown.
async fn dispatch(
    app: &App,
    lease: Lease,
    function: &Arc<Function>,
    limits: InvocationLimits,
    (job, compiled): (Job, bool),
) -> Result<Ran, ServiceError> {
    let queue_wait = lease.queue_wait;
    let worker = lease.worker_id().map(|w| w.to_string()).unwrap_or_default();
    let mut completed = tokio::spawn(lease.invoke(job))
        .await
        .map_err(|e| ServiceError::Internal(format!("worker exchange task failed: {e}")))?;
    match completed.as_mut() {
        Ok(done) => {
            // The compile this request waited for happened in the compiler, not the
            // worker: the module was still compiled for it.
            if compiled && done.result.module_source == Some(ModuleSource::Artifact) {
                done.result.module_source = Some(ModuleSource::Compiled);
            }
            if let Some(used) = &done.accounting {
                app.usage.record(&function.name, function.tenant(), used);
            }
        }
        Err(InvokeFailure::OomKilled { .. }) => app.usage.record_oom_kill(&function.name, function.tenant()),
        Err(_) => {}
    }
    Ok(Ran { function: function.clone(), limits, completed, worker, queue_wait })
}

/// The pool's job for a run, and whether this request had the artifact compiled.
fn job(
    invocation: Invocation,
    limits: InvocationLimits,
    payload: Vec<Bytes>,
    opened: Opened,
    response: Option<HttpStreams>,
) -> (Job, bool) {
    let job = Job {
        invocation,
        limits: limits.for_cgroup(),
        payload,
        files: opened.files,
        artifact: opened.artifact,
        response,
    };
    (job, opened.compiled)
}

/// What a run takes to its worker: the function as it is now, its preopened directories,
/// and the module's artifact from the trusted compiler (compiled now if needed). The module
/// file itself is opened by the pool, for a worker that does not have the module.
struct Opened {
    function: Arc<Function>,
    files: Vec<OwnedFd>,
    artifact: Option<Arc<crate::compiler::Artifact>>,
    /// Whether this request had the artifact compiled.
    compiled: bool,
}

/// Opens what a run of `function` passes to its worker (its preopened directories) and
/// has its artifact made. Inline: no open can block (directories are opened as path
/// handles, the module, where the pool opens it, `O_NONBLOCK`). A
/// preopen that is no longer the directory the config was checked with (renamed, replaced,
/// a link put in its path) makes the registry read and check the config again, once,
/// against the directories as they are now; it is used only if it passes.
async fn open(app: &App, function: Arc<Function>, kind: Kind) -> Result<Opened, ServiceError> {
    runnable(app.engine, &function.name, function.component, kind)?;
    let mut function = function;
    for attempt in 0..2 {
        match function.open_files() {
            Ok(files) => match artifact(app, &function, kind).await {
                Ok((artifact, compiled)) => return Ok(Opened { function, files, artifact, compiled }),
                // Replaced since the registry hashed it: once more with the new one.
                Err(CompileError::Changed) if attempt == 0 => {
                    app.registry.invalidate(&function.name);
                    function = app.registry.lookup(&function.name).await?;
                }
                Err(e) => return Err(e.into()),
            },
            Err(OpenError::Preopen(e @ PreopenError::Changed { .. })) if attempt == 0 => {
                tracing::info!(function = %function.name, reason = %e, "preopened directory changed; checking the config again");
                app.registry.invalidate(&function.name);
                function = app.registry.lookup(&function.name).await?;
            }
            Err(OpenError::Preopen(e @ PreopenError::Changed { .. })) => {
                tracing::warn!(function = %function.name, reason = %e, "preopened directory keeps changing; refused");
                return Err(ServiceError::InvalidConfig(function.name.clone()));
            }
            Err(e) => {
                tracing::error!(function = %function.name, error = %error_chain(&e), "cannot open the function's files");
                break;
            }
        }
    }
    Err(ServiceError::Internal("cannot open the function's module or preopened directories".into()))
}

/// Whether this server can run function `name`'s module as `kind`: a component needs an
/// engine with the Component Model, and sessions run core modules only.
pub fn runnable(
    engine: crate::config::EngineKind,
    name: &FunctionName,
    component: bool,
    kind: Kind,
) -> Result<(), ServiceError> {
    if !component {
        return Ok(());
    }
    if kind == Kind::Session {
        return Err(ServiceError::Unsupported(format!(
            "sessions run core WebAssembly modules (WASI reactors); function {name} is a WebAssembly component"
        )));
    }
    if !engine.runs_components() {
        return Err(ServiceError::Unsupported(format!(
            "function {name} is a WebAssembly component (WASI 0.2, the Component Model); the {} engine runs \
             core WebAssembly modules (WASI preview1) only: serve components with WASMBOX_ENGINE=wasmtime",
            engine.name()
        )));
    }
    Ok(())
}

/// The trusted compiler's artifact of `function`'s module, compiled now, or (an engine
/// that interprets first) later while the worker interprets it.
async fn artifact(
    app: &App,
    function: &Function,
    kind: Kind,
) -> Result<(Option<Arc<crate::compiler::Artifact>>, bool), CompileError> {
    if app.compiler.interprets_first() {
        app.compiler.artifact_or_later(function.tenant(), &function.module, kind).await
    } else {
        app.compiler.artifact(function.tenant(), &function.module, kind).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EngineKind;

    fn message(e: ServiceError) -> String {
        match e {
            ServiceError::Unsupported(message) => message,
            other => panic!("expected unsupported, got {other:?}"),
        }
    }

    #[test]
    fn components_run_only_where_the_engine_has_them_and_never_as_sessions() {
        let name = FunctionName::parse("f").unwrap();
        for engine in [EngineKind::Wasmtime, EngineKind::Wasmedge] {
            for kind in [Kind::Command, Kind::Session] {
                assert!(runnable(engine, &name, false, kind).is_ok(), "a module on {engine:?}");
            }
        }
        assert!(runnable(EngineKind::Wasmtime, &name, true, Kind::Command).is_ok());
        let session = message(runnable(EngineKind::Wasmtime, &name, true, Kind::Session).unwrap_err());
        assert!(session.contains("sessions run core WebAssembly modules"), "{session}");
        let wasmedge = message(runnable(EngineKind::Wasmedge, &name, true, Kind::Command).unwrap_err());
        assert!(wasmedge.contains("the wasmedge engine") && wasmedge.contains("WASMBOX_ENGINE=wasmtime"), "{wasmedge}");
    }
}
