//! The sessions API: `/sessions/{function}[/{id}[/snapshot]]`.
//!
//! - `POST /sessions/{function}`: create (instantiate, `_initialize`, snapshot); 201 with the id.
//! - `POST /sessions/{function}/{id}`: one message (body = stdin, reply = stdout), applied
//!   one at a time per session; the new state is committed only when the message succeeded.
//! - `GET /sessions/{function}/{id}`: what the server knows of the session (JSON).
//! - `GET|PUT /sessions/{function}/{id}/snapshot`: export / import the state.
//! - `DELETE /sessions/{function}/{id}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use wasmbox_protocol::snapshot;
use wasmbox_protocol::{Invocation, Outcome, SessionCall, SessionOp, SessionStats};

use super::error::ApiError;
use super::request::{self, InvocationLimits};
use super::routes::{
    Dispatched, HEADER_WORKER, acquire, add_accounting, invoke_failure, json_response, open_files, outcome_response,
    read_body, registry_error, run,
};
use crate::App;
use crate::pool::Completed;
use crate::registry::{Function, FunctionName};
use crate::sessions::{self, Lookup, Session};

pub const PREFIX: &str = "/sessions";

pub const HEADER_SESSION_ID: &str = "x-wasmbox-session-id";
pub const HEADER_RESTORE_TIME: &str = "x-wasmbox-session-restore-us";
pub const HEADER_CAPTURE_TIME: &str = "x-wasmbox-session-capture-us";
pub const HEADER_COMMIT_TIME: &str = "x-wasmbox-session-commit-us";
pub const HEADER_SNAPSHOT_BYTES: &str = "x-wasmbox-snapshot-bytes";
pub const HEADER_PAGES_RESTORED: &str = "x-wasmbox-session-pages-restored";
pub const HEADER_PAGES_COMPRESSED: &str = "x-wasmbox-session-pages-compressed";
pub const HEADER_MODULE_SHA256: &str = "x-wasmbox-module-sha256";

/// Media type of an exported snapshot.
pub const SNAPSHOT_CONTENT_TYPE: &str = "application/vnd.wasmbox.snapshot";

/// The export sessions call when the function's config names none.
pub const DEFAULT_HANDLER: &str = "handle";

/// Routes a request under [`PREFIX`].
pub async fn route(
    app: &Arc<App>,
    req: Request<Incoming>,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix(PREFIX).unwrap_or_default();
    let parts: Vec<&str> = rest.strip_prefix('/').map(|r| r.split('/').collect()).unwrap_or_default();
    let not_found = || ApiError::RouteNotFound(path.clone());
    let method = req.method().clone();
    match parts.as_slice() {
        [function] => {
            let name = function_name(function)?;
            match method {
                Method::POST => create(app, req, name, request_id).await,
                other => Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "POST" }),
            }
        }
        [function, id] => {
            let name = function_name(function)?;
            match method {
                Method::POST => message(app, req, name, id, request_id).await,
                Method::GET => info(app, &name, id).await,
                Method::DELETE => delete(app, &name, id).await,
                other => Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "POST, GET, DELETE" }),
            }
        }
        [function, id, "snapshot"] => {
            let name = function_name(function)?;
            match method {
                Method::GET => export(app, &name, id).await,
                Method::PUT => import(app, req, name, id, request_id).await,
                other => Err(ApiError::MethodNotAllowed { method: other.to_string(), allow: "GET, PUT" }),
            }
        }
        _ => Err(not_found()),
    }
}

fn function_name(raw: &str) -> Result<FunctionName, ApiError> {
    FunctionName::parse(raw).map_err(|e| ApiError::InvalidFunctionName(e.to_string()))
}

/// The session `id` of `function`, or why there is none.
fn find(app: &App, function: &FunctionName, id: &str) -> Result<Arc<Session>, ApiError> {
    let missing = || ApiError::SessionNotFound { function: function.to_string(), id: id.to_owned() };
    if !sessions::valid_id(id) {
        return Err(missing());
    }
    match app.sessions.lookup(function, id) {
        Lookup::Found(session) => Ok(session),
        Lookup::Expired => Err(ApiError::SessionExpired {
            id: id.to_owned(),
            idle_secs: app.sessions.limits().idle.map_or(0, |d| d.as_secs()),
        }),
        Lookup::Missing => Err(missing()),
    }
}

/// Locks the session for one operation; fails when it was deleted while waiting.
async fn lock(app: &App, session: &Arc<Session>) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
    let guard = session.lock.clone().lock_owned().await;
    if session.deleted.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(match app.sessions.lookup(&session.function, &session.id) {
            Lookup::Expired => ApiError::SessionExpired {
                id: session.id.clone(),
                idle_secs: app.sessions.limits().idle.map_or(0, |d| d.as_secs()),
            },
            _ => ApiError::SessionNotFound { function: session.function.to_string(), id: session.id.clone() },
        });
    }
    Ok(guard)
}

fn handler(function: &Function) -> String {
    function.config.session_handler.clone().unwrap_or_else(|| DEFAULT_HANDLER.to_owned())
}

/// The function a step runs and its limits (from the request's headers), and the body.
async fn resolve(
    app: &App,
    name: &FunctionName,
    req: Request<Incoming>,
) -> Result<(Arc<Function>, InvocationLimits, http::request::Parts, Incoming), ApiError> {
    let (parts, body) = req.into_parts();
    let function = app.registry.lookup(name).await.map_err(registry_error)?;
    let limits = request::limits(&parts.headers, &function.config.limits, &app.limits)?;
    Ok((function, limits, parts, body))
}

/// A session step's result with what the response needs besides it.
struct StepDone {
    completed: Completed,
    worker: String,
    queue_wait: Duration,
}

/// Where a step's snapshot comes from.
enum State<'a> {
    /// A new session: none.
    Fresh,
    /// An import: the request body, already read (and counted).
    Given(Bytes),
    /// A message: the session's committed state, read only once a worker is ours.
    Stored(&'a Session),
}

/// Runs one session step on a pool worker. Admission comes before allocation: the budget
/// for the stored state, then a worker (the queue), then the state is read, and it goes to
/// the worker as it was read, beside the message (one vectored write, no copy).
async fn step(
    app: &Arc<App>,
    function: &Arc<Function>,
    op: SessionOp,
    limits: InvocationLimits,
    state: State<'_>,
    message: Bytes,
    request_id: &str,
) -> Result<StepDone, ApiError> {
    let mut invocation = Invocation {
        request_id: request_id.to_owned(),
        function: function.name.to_string(),
        module: function.module.clone(),
        argv: vec![function.name.to_string()],
        env: function.config.env.clone(),
        preopens: function.config.preopens.clone(),
        memory_limit_bytes: limits.memory_mb << 20,
        timeout_ms: limits.timeout_ms,
        cpu_quota_millis: limits.cpu_quota_millis,
        max_output_bytes: app.config.max_output_bytes,
        confirm_start: false,
        passed_fds: 0,
        artifact: false,
        session: Some(SessionCall {
            op,
            handler: handler(function),
            snapshot_len: 0,
            max_snapshot_bytes: app.sessions.limits().max_snapshot_bytes,
        }),
    };
    let _state_budget = match &state {
        State::Stored(session) => Some(
            app.buffers
                .take(session.snapshot_bytes.load(std::sync::atomic::Ordering::Relaxed))
                .await
                .map_err(|_| ApiError::Overloaded { resource: "buffers" })?,
        ),
        _ => None,
    };
    let lease = acquire(app, function.tenant(), &invocation).await?;
    let super::routes::Opened { files, artifact, .. } =
        open_files(app, function.clone(), crate::compiler::Kind::Session).await?;
    let snapshot = match state {
        State::Fresh => Bytes::new(),
        State::Given(bytes) => bytes,
        State::Stored(session) => load(app, session, function).await?,
    };
    if let Some(call) = invocation.session.as_mut() {
        call.snapshot_len = snapshot.len() as u64;
    }
    let Dispatched { completed, worker, queue_wait } =
        run(lease, &invocation, vec![snapshot, message], files, artifact).await?;
    match completed {
        Ok(mut completed) => {
            if let Some(used) = &completed.accounting {
                app.usage.record(&function.name, function.tenant(), used);
            }
            if completed.result.outcome == Outcome::ModuleChanged {
                app.registry.invalidate(&function.name);
                return Err(ApiError::SessionModuleChanged {
                    function: function.name.to_string(),
                    saved: function.module.sha256.clone(),
                    current: "(replaced during the message)".into(),
                });
            }
            // The new state is in memory until it is committed: counted like a response.
            let held = app.buffers.charge(completed.snapshot.len() as u64);
            completed.snapshot =
                Bytes::from_owner(Counted { bytes: std::mem::take(&mut completed.snapshot), _held: held });
            Ok(StepDone { completed, worker, queue_wait })
        }
        Err(failure) => {
            if matches!(failure, crate::pool::InvokeFailure::OomKilled { .. }) {
                app.usage.record_oom_kill(&function.name, function.tenant());
            }
            Err(invoke_failure(failure, &invocation))
        }
    }
}

/// Bytes counted against the budget for as long as they live.
struct Counted {
    bytes: Bytes,
    _held: crate::http::budget::Held,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Maps a step that did not succeed to its error response (as an invocation's would be).
fn failed_step(done: &StepDone, limits: InvocationLimits) -> Option<Response<Full<Bytes>>> {
    let c = &done.completed;
    (c.result.outcome != Outcome::Exited { code: 0 })
        .then(|| outcome_response(&c.result, c.stdout.clone(), &c.stderr, limits.timeout_ms).0)
}

/// Checks a snapshot a worker produced before it is committed: whole, of this module,
/// within the size limit.
fn verify_new_snapshot(app: &App, function: &Function, bytes: &[u8]) -> Result<(), ApiError> {
    let limit = app.sessions.limits().max_snapshot_bytes;
    if bytes.len() as u64 > limit {
        return Err(ApiError::SessionStateTooLarge { limit });
    }
    snapshot::parse_for(bytes, &function.module.sha256)
        .map(drop)
        .map_err(|e| ApiError::Internal(format!("worker produced an unusable snapshot: {e}")))
}

fn session_headers(response: &mut Response<Full<Bytes>>, done: &StepDone, stats: Option<SessionStats>) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&done.worker) {
        headers.insert(HEADER_WORKER, v);
    }
    headers.insert(super::routes::HEADER_QUEUE_WAIT, HeaderValue::from(micros(done.queue_wait)));
    add_accounting(headers, done.completed.accounting.as_ref());
    if let Some(stats) = stats {
        headers.insert(HEADER_RESTORE_TIME, HeaderValue::from(stats.restore_us));
        headers.insert(HEADER_CAPTURE_TIME, HeaderValue::from(stats.capture_us));
        headers.insert(HEADER_PAGES_RESTORED, HeaderValue::from(stats.pages_restored));
        headers.insert(HEADER_PAGES_COMPRESSED, HeaderValue::from(stats.pages_compressed));
    }
}

async fn create(
    app: &Arc<App>,
    req: Request<Incoming>,
    name: FunctionName,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if app.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let started = Instant::now();
    let (function, limits, parts, body) = resolve(app, &name, req).await?;
    let stdin = read_body(app, &parts, body, app.config.max_body_bytes).await?;
    let quota = app.sessions.quota(&function.config);
    let reservation = app.sessions.reserve(&name, quota).map_err(quota_error)?;
    let done = step(app, &function, SessionOp::Create, limits, State::Fresh, stdin.bytes.clone(), request_id).await?;
    let outcome_kind = outcome_kind(&done);
    if let Some(response) = failed_step(&done, limits) {
        log_step(app, &name, None, "create", outcome_kind, &done, started);
        let mut response = response;
        session_headers(&mut response, &done, done.completed.result.session);
        return Ok(response);
    }
    let state = done.completed.snapshot.clone();
    verify_new_snapshot(app, &function, &state)?;
    let id = sessions::new_id();
    let growth = app.sessions.grow(&name, 0, state.len() as u64, quota).map_err(quota_error)?;
    let commit_started = Instant::now();
    app.sessions.write(&name, &id, state.clone()).await.map_err(|e| store_error(&id, &e))?;
    let commit = commit_started.elapsed();
    growth.keep();
    app.sessions.insert(reservation, &name, &id, state.len() as u64);
    let body = json!({
        "id": id,
        "function": name.as_str(),
        "module_sha256": function.module.sha256,
        "snapshot_bytes": state.len(),
    });
    let mut response = json_response(StatusCode::CREATED, &body);
    let location = format!("{PREFIX}/{name}/{id}");
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    commit_headers(&mut response, &id, state.len() as u64, commit);
    session_headers(&mut response, &done, done.completed.result.session);
    log_step(app, &name, Some(&id), "create", "ok", &done, started);
    Ok(response)
}

fn commit_headers(response: &mut Response<Full<Bytes>>, id: &str, bytes: u64, commit: Duration) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(HEADER_SESSION_ID, v);
    }
    headers.insert(HEADER_SNAPSHOT_BYTES, HeaderValue::from(bytes));
    headers.insert(HEADER_COMMIT_TIME, HeaderValue::from(micros(commit)));
}

fn quota_error(e: sessions::QuotaError) -> ApiError {
    match e {
        sessions::QuotaError::Sessions { scope, max } => ApiError::SessionLimit { scope, max },
        sessions::QuotaError::Bytes { scope, limit } => ApiError::SessionStorageFull { scope, limit },
    }
}

fn store_error(id: &str, e: &std::io::Error) -> ApiError {
    tracing::error!(session = %sessions::log_id(id), error = %e, "session store i/o failed");
    ApiError::Internal("cannot write the session's state".into())
}

fn outcome_kind(done: &StepDone) -> &'static str {
    match &done.completed.result.outcome {
        Outcome::Exited { code: 0 } => "ok",
        Outcome::Exited { .. } => "nonzero_exit",
        Outcome::Trapped { .. } => "trap",
        Outcome::DeadlineExceeded => "deadline_exceeded",
        Outcome::MemoryLimitExceeded { .. } => "memory_limit_exceeded",
        Outcome::OutputTooLarge { .. } => "output_too_large",
        Outcome::InvalidModule { .. } => "invalid_module",
        Outcome::SnapshotInvalid { .. } => "snapshot_invalid",
        Outcome::SnapshotTooLarge { .. } => "session_state_too_large",
        Outcome::ModuleChanged | Outcome::SetupFailed { .. } => "internal_error",
    }
}

fn log_step(
    app: &App,
    name: &FunctionName,
    id: Option<&str>,
    op: &'static str,
    kind: &'static str,
    done: &StepDone,
    started: Instant,
) {
    let result = &done.completed.result;
    let total = started.elapsed();
    app.metrics.record_invocation(
        name.as_str(),
        kind,
        done.queue_wait,
        Some(Duration::from_micros(result.exec_us)),
        total,
        result.module_source,
    );
    tracing::info!(
        function = %name,
        session = id.map(sessions::log_id).unwrap_or_default(),
        op,
        outcome = kind,
        worker = %done.worker,
        queue_us = micros(done.queue_wait),
        exec_us = result.exec_us,
        restore_us = result.session.map(|s| s.restore_us),
        capture_us = result.session.map(|s| s.capture_us),
        snapshot_bytes = result.snapshot_len,
        total_us = micros(total),
        "session step"
    );
}

async fn message(
    app: &Arc<App>,
    req: Request<Incoming>,
    name: FunctionName,
    id: &str,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if app.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let started = Instant::now();
    let session = find(app, &name, id)?;
    let (function, limits, parts, body) = resolve(app, &name, req).await?;
    let stdin = read_body(app, &parts, body, app.config.max_body_bytes).await?;
    let _guard = lock(app, &session).await?;
    session.touch();
    let old_size = session.snapshot_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let state = State::Stored(&session);
    let done = step(app, &function, SessionOp::Message, limits, state, stdin.bytes.clone(), request_id).await?;
    let kind = outcome_kind(&done);
    let stats = done.completed.result.session;
    if let Some(mut response) = failed_step(&done, limits) {
        session_headers(&mut response, &done, stats);
        log_step(app, &name, Some(id), "message", kind, &done, started);
        return Ok(response);
    }
    let new_state = done.completed.snapshot.clone();
    let mut commit = Duration::ZERO;
    let committed = !new_state.is_empty();
    if committed {
        verify_new_snapshot(app, &function, &new_state)?;
        let quota = app.sessions.quota(&function.config);
        let growth = app.sessions.grow(&name, old_size, new_state.len() as u64, quota).map_err(quota_error)?;
        let commit_started = Instant::now();
        app.sessions.write(&name, id, new_state.clone()).await.map_err(|e| store_error(id, &e))?;
        commit = commit_started.elapsed();
        growth.keep();
        session.snapshot_bytes.store(new_state.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let c = &done.completed;
    let (mut response, _) = outcome_response(&c.result, c.stdout.clone(), &c.stderr, limits.timeout_ms);
    let size = if committed { new_state.len() as u64 } else { old_size };
    commit_headers(&mut response, id, size, commit);
    response.headers_mut().insert("x-wasmbox-session-committed", HeaderValue::from_static(bool_str(committed)));
    session_headers(&mut response, &done, stats);
    log_step(app, &name, Some(id), "message", kind, &done, started);
    Ok(response)
}

fn bool_str(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// Reads the session's committed state and checks it belongs to the function's module as
/// it is now.
async fn load(app: &App, session: &Session, function: &Function) -> Result<Bytes, ApiError> {
    let state = app.sessions.read(session).await.map_err(|e| {
        tracing::error!(session = %sessions::log_id(&session.id), error = %e, "cannot read session state");
        ApiError::SessionCorrupt { id: session.id.clone(), reason: format!("cannot read it: {e}") }
    })?;
    match snapshot::parse(&state) {
        Ok(parsed) if parsed.module_hex() != function.module.sha256 => Err(ApiError::SessionModuleChanged {
            function: function.name.to_string(),
            saved: parsed.module_hex(),
            current: function.module.sha256.clone(),
        }),
        Ok(_) => Ok(state),
        Err(e) => Err(ApiError::SessionCorrupt { id: session.id.clone(), reason: e.to_string() }),
    }
}

async fn info(app: &Arc<App>, name: &FunctionName, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = find(app, name, id)?;
    let idle = app.sessions.limits().idle;
    let body = json!({
        "id": session.id,
        "function": name.as_str(),
        "snapshot_bytes": session.snapshot_bytes.load(std::sync::atomic::Ordering::Relaxed),
        "last_used_unix_ms": session.last_used_ms(),
        "expires_unix_ms": idle.map(|d| session.last_used_ms() + d.as_millis() as u64),
    });
    Ok(json_response(StatusCode::OK, &body))
}

async fn delete(app: &Arc<App>, name: &FunctionName, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = find(app, name, id)?;
    let _guard = lock(app, &session).await?;
    app.sessions.remove(&session).await.map_err(|e| store_error(id, &e))?;
    tracing::info!(function = %name, session = %sessions::log_id(id), "session deleted");
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

async fn export(app: &Arc<App>, name: &FunctionName, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = find(app, name, id)?;
    let _guard = lock(app, &session).await?;
    // Counted before it is read; the response then counts until it is written.
    let _budget = app
        .buffers
        .take(session.snapshot_bytes.load(std::sync::atomic::Ordering::Relaxed))
        .await
        .map_err(|_| ApiError::Overloaded { resource: "buffers" })?;
    let state = app
        .sessions
        .read(&session)
        .await
        .map_err(|e| ApiError::SessionCorrupt { id: id.to_owned(), reason: format!("cannot read it: {e}") })?;
    let module = snapshot::parse(&state)
        .map_err(|e| ApiError::SessionCorrupt { id: id.to_owned(), reason: e.to_string() })?
        .module_hex();
    let mut response = Response::new(Full::new(state));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(SNAPSHOT_CONTENT_TYPE));
    if let Ok(v) = HeaderValue::from_str(&module) {
        headers.insert(HEADER_MODULE_SHA256, v);
    }
    Ok(response)
}

/// Imports a snapshot as session `id` (creating or replacing it), after checking that it is
/// whole, within the limits, of this function's module, and restorable (a worker restores
/// it without running anything). On any failure nothing changes.
async fn import(
    app: &Arc<App>,
    req: Request<Incoming>,
    name: FunctionName,
    id: &str,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if app.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let started = Instant::now();
    if !sessions::valid_id(id) {
        return Err(ApiError::SnapshotInvalid(format!(
            "session id {id:?} is not 32 lowercase hex digits (as the server makes them)"
        )));
    }
    let (function, limits, parts, body) = resolve(app, &name, req).await?;
    let max = app.sessions.limits().max_snapshot_bytes;
    let upload = read_body(app, &parts, body, max).await.map_err(|e| match e {
        ApiError::BodyTooLarge { limit } => ApiError::SnapshotTooLarge { limit },
        other => other,
    })?;
    let state = upload.bytes.clone();
    snapshot::parse_for(&state, &function.module.sha256).map_err(|e| ApiError::SnapshotInvalid(e.to_string()))?;
    let quota = app.sessions.quota(&function.config);
    let given = State::Given(state.clone());
    let done = step(app, &function, SessionOp::Check, limits, given, Bytes::new(), request_id).await?;
    if let Some(mut response) = failed_step(&done, limits) {
        session_headers(&mut response, &done, done.completed.result.session);
        log_step(app, &name, Some(id), "import", outcome_kind(&done), &done, started);
        return Ok(response);
    }
    let (session, status) = match app.sessions.lookup(&name, id) {
        Lookup::Found(session) => (Some(session), StatusCode::OK),
        _ => (None, StatusCode::CREATED),
    };
    match session {
        Some(session) => {
            let _guard = lock(app, &session).await?;
            let old = session.snapshot_bytes.load(std::sync::atomic::Ordering::Relaxed);
            let growth = app.sessions.grow(&name, old, state.len() as u64, quota).map_err(quota_error)?;
            app.sessions.write(&name, id, state.clone()).await.map_err(|e| store_error(id, &e))?;
            growth.keep();
            session.snapshot_bytes.store(state.len() as u64, std::sync::atomic::Ordering::Relaxed);
            session.touch();
        }
        None => {
            // An expired session the sweep has not removed yet: it goes now, as the sweep
            // would remove it (under its lock, so the two never race on the file), and the
            // import makes a new session of the id.
            if let Some(stale) = app.sessions.expired_entry(&name, id) {
                let _guard = stale.lock.clone().lock_owned().await;
                if !stale.deleted.load(std::sync::atomic::Ordering::Relaxed) {
                    app.sessions.remove(&stale).await.map_err(|e| store_error(id, &e))?;
                }
            }
            if app.sessions.exists_elsewhere(&name, id) {
                return Err(ApiError::SnapshotInvalid(format!("session id {id} belongs to another function")));
            }
            let reservation = app.sessions.reserve(&name, quota).map_err(quota_error)?;
            let growth = app.sessions.grow(&name, 0, state.len() as u64, quota).map_err(quota_error)?;
            app.sessions.write(&name, id, state.clone()).await.map_err(|e| store_error(id, &e))?;
            growth.keep();
            app.sessions.insert(reservation, &name, id, state.len() as u64);
        }
    }
    log_step(app, &name, Some(id), "import", "ok", &done, started);
    let body = json!({"id": id, "function": name.as_str(), "snapshot_bytes": state.len()});
    let mut response = json_response(status, &body);
    commit_headers(&mut response, id, state.len() as u64, Duration::ZERO);
    Ok(response)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
