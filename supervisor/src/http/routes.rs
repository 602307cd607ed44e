//! Request routing and the invocation path: validate, resolve the function, read the body
//! within its limit, wait for a worker, run, and map the outcome to a response.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use serde_json::json;
use wasmbox_protocol::{Invocation, InvocationResult, ModuleSource, Outcome};

use super::error::{ApiError, stderr_tail};
use super::request;
use crate::cgroup::Accounting;
use crate::pool::{AcquireError, InvokeFailure, Lease};
use crate::registry::files::PreopenError;
use crate::registry::{Function, FunctionName, OpenError, RegistryError};
use crate::{App, error_chain};

pub const HEADER_REQUEST_ID: &str = "x-wasmbox-request-id";
pub const HEADER_WORKER: &str = "x-wasmbox-worker";
pub const HEADER_EXIT_CODE: &str = "x-wasmbox-exit-code";
pub const HEADER_QUEUE_WAIT: &str = "x-wasmbox-queue-wait-us";
pub const HEADER_EXEC_TIME: &str = "x-wasmbox-exec-time-us";
pub const HEADER_PREPARE_TIME: &str = "x-wasmbox-prepare-time-us";
pub const HEADER_MODULE_SOURCE: &str = "x-wasmbox-module-source";
pub const HEADER_CPU_TIME: &str = "x-wasmbox-cpu-time-us";
pub const HEADER_MEMORY_PEAK: &str = "x-wasmbox-memory-peak-bytes";
pub const HEADER_MEMORY_LIMIT: &str = "x-wasmbox-memory-limit-bytes";

/// The client's address, as a request extension (for the log line of a slow client).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Responses at least this large are counted against `WASMBOX_MAX_BUFFERED_BYTES` until
/// they are written out.
const CHARGED_RESPONSE_BYTES: usize = 16 << 10;

/// Handles one request; never fails: every error becomes a typed JSON response.
pub async fn handle(app: Arc<App>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    req.extensions_mut().insert(Peer(peer));
    let request_id = request_id(&req);
    let mut response = match route(&app, req, &request_id).await {
        Ok(response) => response,
        Err(error) => error.to_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(HEADER_REQUEST_ID, value);
    }
    charge_body(&app, response).await
}

/// Counts a large response body against the budget for as long as its bytes live: hyper
/// drops them once they are written to the socket (or the connection goes).
async fn charge_body(app: &App, response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    struct Charged {
        bytes: Bytes,
        _held: super::budget::Held,
    }
    impl AsRef<[u8]> for Charged {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }
    if response.body().size_hint().exact().is_none_or(|n| n < CHARGED_RESPONSE_BYTES as u64) {
        return response;
    }
    let (parts, body) = response.into_parts();
    // One frame, already in memory: collecting it neither waits nor copies.
    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let held = app.buffers.charge(bytes.len() as u64);
    Response::from_parts(parts, Full::new(Bytes::from_owner(Charged { bytes, _held: held })))
}

/// Handles the one request of a connection accepted beyond `WASMBOX_MAX_CONNECTIONS`: the
/// health endpoints as usual (so probes and scrapes still get through), anything else a
/// 503 the client can act on.
pub fn handle_reserve(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match health_route(&app, &req) {
        Some(Ok(response)) => response,
        Some(Err(error)) => error.to_response(),
        None => ApiError::Overloaded { resource: "connections" }.to_response(),
    }
}

/// A client-supplied `X-Request-Id` when it is short and plain, else a fresh one.
fn request_id(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .filter(|v| v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Handles one request on `WASMBOX_HEALTH_LISTEN`: the health endpoints only.
pub async fn handle_health(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match health_route(&app, &req) {
        Some(Ok(response)) => response,
        Some(Err(error)) => error.to_response(),
        None => ApiError::RouteNotFound(req.uri().path().into()).to_response(),
    }
}

async fn route(app: &Arc<App>, req: Request<Incoming>, request_id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    if let Some(answer) = health_route(app, &req) {
        return answer;
    }
    let path = req.uri().path();
    match path {
        "/stats" => {
            only_get(req.method())?;
            let body = json!({
                "pool": app.pool.status(),
                "compiler": app.compiler.stats(),
                "cgroups": app.cgroups,
                "functions": app.usage.snapshot(),
                "http": app.connections.stats(),
                "buffers": app.buffer_stats(),
            });
            Ok(json_response(StatusCode::OK, &body))
        }
        "/" => Err(ApiError::RouteNotFound("/".into())),
        _ if path == super::admin::PREFIX || path.starts_with("/admin/") => {
            super::admin::route(app, req, request_id).await
        }
        _ if path == super::sessions::PREFIX || path.starts_with("/sessions/") => {
            super::sessions::route(app, req, request_id).await
        }
        _ => {
            let name = request::function_name(path)?;
            let stdin_allowed = match *req.method() {
                Method::POST => true,
                Method::GET => false,
                ref other => {
                    return Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "GET, POST" });
                }
            };
            invoke(app, req, name, stdin_allowed, request_id).await
        }
    }
}

/// /healthz, /ready and /metrics, served on both listeners; `None` for any other path.
fn health_route(app: &Arc<App>, req: &Request<Incoming>) -> Option<Result<Response<Full<Bytes>>, ApiError>> {
    let path = req.uri().path();
    matches!(path, "/healthz" | "/ready" | "/metrics").then(|| health(app, req.method(), path))
}

fn health(app: &Arc<App>, method: &Method, path: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    only_get(method)?;
    match path {
        "/healthz" => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        "/ready" => {
            let readiness = app.readiness();
            let code = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            Ok(json_response(code, &serde_json::to_value(&readiness).unwrap_or_default()))
        }
        "/metrics" => {
            let usage = app.usage.snapshot();
            app.metrics.set_sessions(app.sessions.count());
            let text = app
                .metrics
                .encode(&usage, &app.readiness())
                .map_err(|e| ApiError::Internal(format!("encoding metrics: {e}")))?;
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
            Ok(response)
        }
        _ => Err(ApiError::RouteNotFound(path.into())),
    }
}

fn only_get(method: &Method) -> Result<(), ApiError> {
    if method == Method::GET {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed { method: method.to_string(), allow: "GET" })
    }
}

async fn invoke(
    app: &Arc<App>,
    req: Request<Incoming>,
    name: FunctionName,
    with_body: bool,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if app.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let args = request::query_args(parts.uri.query())?;
    let function = app.registry.lookup(&name).await.map_err(registry_error)?;
    let limits = request::limits(&parts.headers, &function.config.limits, &app.limits)?;
    // Held until the invocation is done: the bytes live as long.
    let stdin = if with_body { Some(read_body(app, &parts, body, app.config.max_body_bytes).await?) } else { None };
    let stdin_bytes = stdin.as_ref().map(|b| b.bytes.clone()).unwrap_or_default();

    let span = tracing::info_span!("invoke", request_id, function = %name);
    let _entered = span.enter();
    let argv: Vec<String> =
        std::iter::once(name.to_string()).chain(args.unwrap_or_else(|| function.config.default_args.clone())).collect();
    let mut invocation = Invocation {
        request_id: request_id.to_owned(),
        function: name.to_string(),
        module: function.module.clone(),
        argv,
        env: function.config.env.clone(),
        preopens: function.config.preopens.clone(),
        memory_limit_bytes: limits.memory_mb << 20,
        timeout_ms: limits.timeout_ms,
        cpu_quota_millis: limits.cpu_quota_millis,
        max_output_bytes: app.config.max_output_bytes,
        confirm_start: false,
        passed_fds: 0,
        artifact: false,
        session: None,
    };
    drop(_entered);

    // One retry when the module changed between our hash and the worker's read of it.
    let mut function = function;
    for attempt in 0..2 {
        let Opened { function: opened, files, artifact } =
            open_files(app, function.clone(), crate::compiler::Kind::Command).await?;
        if !Arc::ptr_eq(&opened, &function) {
            // The config was read again (a preopen changed): use it as it is now.
            invocation.module = opened.module.clone();
            invocation.preopens = opened.config.preopens.clone();
        }
        let Dispatched { completed, worker, queue_wait } =
            dispatch(app, opened.tenant(), &invocation, vec![stdin_bytes.clone()], files, artifact).await?;
        let meta = Meta { worker, queue_wait };
        let ran =
            completed.as_ref().ok().map(|done| (Duration::from_micros(done.result.exec_us), done.result.module_source));
        let used = completed.as_ref().ok().and_then(|done| done.accounting.as_ref());
        let cpu_us = used.and_then(|u| u.cpu_time).map(micros);
        let memory_peak_bytes = used.and_then(|u| u.memory_peak_bytes);
        // `kind` is "ok" or the error kind the answer carries, also for a guest's own
        // failure (a trap or a non-zero exit), which is answered without an ApiError.
        let (response, kind) = match completed {
            Ok(done) if done.result.outcome == Outcome::ModuleChanged && attempt == 0 => {
                app.registry.invalidate(&name);
                function = app.registry.lookup(&name).await.map_err(registry_error)?;
                invocation.module = function.module.clone();
                invocation.preopens = function.config.preopens.clone();
                continue;
            }
            Ok(done) => {
                if let Some(used) = &done.accounting {
                    app.usage.record(&name, opened.tenant(), used);
                }
                let (mut r, kind) = outcome_response(&done.result, done.stdout, &done.stderr, invocation.timeout_ms);
                add_accounting(r.headers_mut(), done.accounting.as_ref());
                (r, kind)
            }
            Err(failure) => {
                if matches!(failure, InvokeFailure::OomKilled { .. }) {
                    app.usage.record_oom_kill(&name, opened.tenant());
                }
                let e = invoke_failure(failure, &invocation);
                (e.to_response(), e.kind())
            }
        };
        let status = response.status();
        let total = started.elapsed();
        app.metrics.record_invocation(
            name.as_str(),
            kind,
            queue_wait,
            ran.map(|(exec, _)| exec),
            total,
            ran.and_then(|(_, source)| source),
        );
        tracing::info!(
            parent: &span,
            status = status.as_u16(),
            outcome = kind,
            worker = %meta.worker,
            queue_us = micros(queue_wait),
            exec_us = ran.map(|(exec, _)| micros(exec)),
            total_us = micros(total),
            cpu_us,
            memory_peak_bytes,
            "invocation"
        );
        return Ok(with_meta(response, &meta));
    }
    Err(ApiError::Internal("module kept changing while it was being loaded".into()))
}

/// An invocation's exchange with a worker, and which worker and how long it waited for it.
pub(super) struct Dispatched {
    pub completed: Result<crate::pool::Completed, InvokeFailure>,
    pub worker: String,
    pub queue_wait: Duration,
}

/// Waits for a worker and runs `invocation` on it (`payload`: its frame payload, in
/// parts; `files`: the descriptors it passes).
pub(super) async fn dispatch(
    app: &App,
    tenant: &str,
    invocation: &Invocation,
    payload: Vec<Bytes>,
    files: Vec<OwnedFd>,
    artifact: Artifact,
) -> Result<Dispatched, ApiError> {
    let lease = acquire(app, tenant, invocation).await?;
    run(lease, invocation, payload, files, artifact).await
}

/// A worker for `tenant`'s `invocation`, or why there is none (429 queue full, 503
/// shutting down).
pub(super) async fn acquire(app: &App, tenant: &str, invocation: &Invocation) -> Result<Lease, ApiError> {
    app.pool.acquire(tenant, &invocation.module_key()).await.map_err(|e| match e {
        AcquireError::QueueFull { depth } => ApiError::QueueFull { depth },
        AcquireError::ShuttingDown => ApiError::ShuttingDown,
    })
}

/// Runs `invocation` on the worker `lease` holds. The exchange runs in its own task: a
/// client that disconnects must not cancel it halfway, which would leave the worker's
/// protocol state unknown.
pub(super) async fn run(
    lease: Lease,
    invocation: &Invocation,
    payload: Vec<Bytes>,
    files: Vec<OwnedFd>,
    artifact: Artifact,
) -> Result<Dispatched, ApiError> {
    let queue_wait = lease.queue_wait;
    let worker = lease.worker_id().map(|w| w.to_string()).unwrap_or_default();
    let run = tokio::spawn(lease.invoke(invocation.clone(), payload, files, artifact.file));
    let mut completed = run.await.map_err(|e| ApiError::Internal(format!("worker exchange task failed: {e}")))?;
    // The compile this request waited for happened in the compiler, not the worker: the
    // module was still compiled for it.
    if let Ok(done) = completed.as_mut() {
        if artifact.compiled && done.result.module_source == Some(ModuleSource::Artifact) {
            done.result.module_source = Some(ModuleSource::Compiled);
        }
    }
    Ok(Dispatched { completed, worker, queue_wait })
}

/// Opens what an invocation of `function` passes to its worker (module file, preopened
/// directories). Inline, as the registry's `stat`s are: neither open can block (the module
/// is opened `O_NONBLOCK`, directories as path handles). A preopen that is no longer the
/// directory the config was checked with (renamed, replaced, a link put in its path) makes
/// the registry read and check the config again, once, against the directories as they are
/// now; it is used only if it passes. Returns the function as it was opened.
/// What an invocation takes to its worker: the function as it is now, the descriptors it
/// passes, and the module's artifact from the trusted compiler (compiled now if needed).
pub(super) struct Opened {
    pub function: Arc<Function>,
    pub files: Vec<OwnedFd>,
    pub artifact: Artifact,
}

/// A module's artifact for an invocation, and whether this request had it compiled.
#[derive(Clone, Default)]
pub(super) struct Artifact {
    pub file: Option<Arc<crate::compiler::Artifact>>,
    pub compiled: bool,
}

pub(super) async fn open_files(
    app: &App,
    function: Arc<Function>,
    kind: crate::compiler::Kind,
) -> Result<Opened, ApiError> {
    let mut function = function;
    for attempt in 0..2 {
        match function.open_files() {
            Ok(files) => match artifact(app, &function, kind).await {
                Ok((file, compiled)) => return Ok(Opened { function, files, artifact: Artifact { file, compiled } }),
                // Replaced since the registry hashed it: once more with the new one.
                Err(crate::compiler::CompileError::Changed) if attempt == 0 => {
                    app.registry.invalidate(&function.name);
                    function = app.registry.lookup(&function.name).await.map_err(registry_error)?;
                }
                Err(e) => return Err(e.into()),
            },
            Err(OpenError::Preopen(e @ PreopenError::Changed { .. })) if attempt == 0 => {
                tracing::info!(function = %function.name, reason = %e, "preopened directory changed; checking the config again");
                app.registry.invalidate(&function.name);
                function = app.registry.lookup(&function.name).await.map_err(registry_error)?;
            }
            Err(OpenError::Preopen(e @ PreopenError::Changed { .. })) => {
                tracing::warn!(function = %function.name, reason = %e, "preopened directory keeps changing; refused");
                return Err(ApiError::InvalidFunctionConfig(invalid_config_message(&function.name)));
            }
            Err(e) => {
                tracing::error!(function = %function.name, error = %error_chain(&e), "cannot open the function's files");
                return Err(ApiError::Internal("cannot open the function's module or preopened directories".into()));
            }
        }
    }
    Err(ApiError::Internal("cannot open the function's module or preopened directories".into()))
}

/// The trusted compiler's artifact of `function`'s module, compiled now, or (an engine
/// that interprets first) later while the worker interprets it.
async fn artifact(
    app: &App,
    function: &Function,
    kind: crate::compiler::Kind,
) -> Result<(Option<Arc<crate::compiler::Artifact>>, bool), crate::compiler::CompileError> {
    if app.compiler.interprets_first() {
        app.compiler.artifact_or_later(function.tenant(), &function.module, kind).await
    } else {
        app.compiler.artifact(function.tenant(), &function.module, kind).await
    }
}

/// What a caller hears about a config the server refused: which function, not why (the
/// reason can name host paths and config values; it is in the server log).
fn invalid_config_message(name: &FunctionName) -> String {
    format!(
        "function {name}'s name.toml or one of its preopened directories is not acceptable; the server log says why"
    )
}

/// CPU time, peak memory and the kernel memory limit of the invocation, from its cgroup.
pub(super) fn add_accounting(headers: &mut http::HeaderMap, accounting: Option<&Accounting>) {
    let Some(used) = accounting else { return };
    if let Some(cpu) = used.cpu_time {
        headers.insert(HEADER_CPU_TIME, HeaderValue::from(micros(cpu)));
    }
    if let Some(peak) = used.memory_peak_bytes {
        headers.insert(HEADER_MEMORY_PEAK, HeaderValue::from(peak));
    }
    if let Some(limit) = used.memory_limit_bytes {
        headers.insert(HEADER_MEMORY_LIMIT, HeaderValue::from(limit));
    }
}

struct Meta {
    worker: String,
    queue_wait: Duration,
}

fn with_meta(mut response: Response<Full<Bytes>>, meta: &Meta) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&meta.worker) {
        headers.insert(HEADER_WORKER, v);
    }
    headers.insert(HEADER_QUEUE_WAIT, HeaderValue::from(micros(meta.queue_wait)));
    response
}

pub(super) fn outcome_response(
    result: &InvocationResult,
    stdout: Bytes,
    stderr: &[u8],
    timeout_ms: u64,
) -> (Response<Full<Bytes>>, &'static str) {
    let error = match &result.outcome {
        Outcome::Exited { code: 0 } => None,
        Outcome::Exited { code } => Some(ApiError::NonZeroExit { code: *code, stderr: stderr_tail(stderr) }),
        Outcome::Trapped { message } => {
            Some(ApiError::Trapped { message: message.clone(), stderr: stderr_tail(stderr) })
        }
        Outcome::DeadlineExceeded => Some(ApiError::DeadlineExceeded { timeout_ms, worker_killed: false }),
        Outcome::MemoryLimitExceeded { limit_bytes } => {
            Some(ApiError::MemoryLimitExceeded { limit_mb: limit_bytes >> 20, stderr: stderr_tail(stderr) })
        }
        Outcome::OutputTooLarge { limit_bytes } => Some(ApiError::OutputTooLarge { limit: *limit_bytes }),
        Outcome::InvalidModule { message } => Some(ApiError::InvalidModule(message.clone())),
        Outcome::ModuleChanged => Some(ApiError::Internal("module file changed during the invocation".into())),
        Outcome::SetupFailed { message } => {
            // The worker's message can name host paths: for the log only.
            tracing::error!(error = %message, "the worker could not set the invocation up");
            Some(ApiError::Internal("the worker could not set the invocation up".into()))
        }
        Outcome::SnapshotInvalid { message } => Some(ApiError::SnapshotInvalid(message.clone())),
        Outcome::SnapshotTooLarge { limit_bytes } => Some(ApiError::SessionStateTooLarge { limit: *limit_bytes }),
    };
    let (mut response, kind) = match error {
        None => {
            let mut r = Response::new(Full::new(stdout));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            (r, "ok")
        }
        Some(e) => (e.to_response(), e.kind()),
    };
    let headers = response.headers_mut();
    if let Outcome::Exited { code } = result.outcome {
        headers.insert(HEADER_EXIT_CODE, HeaderValue::from(code));
    }
    headers.insert(HEADER_EXEC_TIME, HeaderValue::from(result.exec_us));
    headers.insert(HEADER_PREPARE_TIME, HeaderValue::from(result.prepare_us));
    if let Some(source) = result.module_source {
        headers.insert(HEADER_MODULE_SOURCE, HeaderValue::from_static(source.as_str()));
    }
    (response, kind)
}

pub(super) fn invoke_failure(failure: InvokeFailure, invocation: &Invocation) -> ApiError {
    match failure {
        InvokeFailure::WorkerDied { detail } => ApiError::WorkerDied { detail },
        InvokeFailure::HardDeadline => {
            ApiError::DeadlineExceeded { timeout_ms: invocation.timeout_ms, worker_killed: true }
        }
        InvokeFailure::ShuttingDown => ApiError::ShuttingDown,
        InvokeFailure::OomKilled { limit_bytes } => {
            ApiError::OomKilled { memory_request_mb: invocation.memory_limit_bytes >> 20, limit_bytes }
        }
        InvokeFailure::SeccompViolation => ApiError::SeccompViolation,
        InvokeFailure::Limits(message) => {
            tracing::error!(error = %message, "cannot apply cgroup limits");
            ApiError::Internal("cannot apply the invocation's resource limits".into())
        }
    }
}

pub(super) fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::NotFound(name) => ApiError::FunctionNotFound(name.to_string()),
        RegistryError::ModuleTooLarge { size, limit, .. } => {
            ApiError::InvalidModule(format!("module is {size} bytes, more than the limit of {limit}"))
        }
        // Logged by the registry, once per version of the config.
        RegistryError::InvalidConfig { name, .. } => ApiError::InvalidFunctionConfig(invalid_config_message(&name)),
        RegistryError::Io { .. } => {
            tracing::error!(error = %error_chain(&e), "registry i/o failed");
            ApiError::Internal("cannot read the function".into())
        }
    }
}

/// Reads a request body within `limit`, the budget of bytes held for clients and the body
/// read timeout and minimum rate (see [`super::body`]). A Content-Length over the limit is
/// refused before any byte is read, and a chunked body is cut off at the limit (413).
pub(super) async fn read_body(
    app: &App,
    parts: &http::request::Parts,
    body: Incoming,
    limit: u64,
) -> Result<super::body::Body, ApiError> {
    let (time, _) = app.config.client_bounds();
    let bounds = super::body::ReadBounds { limit, time };
    let peer = parts.extensions.get::<Peer>().map(|p| p.0);
    let read = super::body::read(body, bounds, &app.buffers, peer, || app.connections.body_timed_out()).await;
    if let Err(ApiError::Overloaded { .. }) = &read {
        tracing::warn!(
            used = app.buffers.used(),
            limit = app.buffers.limit(),
            "request refused: the bytes held for clients are at WASMBOX_MAX_BUFFERED_BYTES"
        );
    }
    read
}

pub(super) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
