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
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use super::error::ApiError;
use super::request::SessionRequest;
use super::routes::{json_response, ran_response, read_body, with_meta};
use crate::App;
use crate::registry::FunctionName;
use crate::service::invoke;
use crate::service::sessions::{self as service, Stepped};
use crate::sessions;

pub use super::request::SESSIONS_PREFIX as PREFIX;

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

/// Serves one session operation.
pub async fn route(
    app: &Arc<App>,
    req: Request<Incoming>,
    op: SessionRequest,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let started = Instant::now();
    match op {
        SessionRequest::Create { name, limits } => {
            if app.is_draining() {
                return Err(ApiError::ShuttingDown);
            }
            let (function, limits) = invoke::resolve(app, &name, limits).await?;
            let (parts, body) = req.into_parts();
            let input = read_body(app, &parts, body, app.config.max_body_bytes).await?;
            let stepped = service::create(app, &function, limits, input.bytes.clone(), request_id).await?;
            Ok(stepped_response(app, &name, "create", &stepped, started))
        }
        SessionRequest::Message { name, id, limits } => {
            if app.is_draining() {
                return Err(ApiError::ShuttingDown);
            }
            let session = service::find(app, &name, &id)?;
            let (function, limits) = invoke::resolve(app, &name, limits).await?;
            let (parts, body) = req.into_parts();
            let input = read_body(app, &parts, body, app.config.max_body_bytes).await?;
            let stepped = service::message(app, &session, &function, limits, input.bytes.clone(), request_id).await?;
            Ok(stepped_response(app, &name, "message", &stepped, started))
        }
        SessionRequest::Import { name, id, limits } => {
            if app.is_draining() {
                return Err(ApiError::ShuttingDown);
            }
            if !sessions::valid_id(&id) {
                return Err(ApiError::SnapshotInvalid(format!(
                    "session id {id:?} is not 32 lowercase hex digits (as the server makes them)"
                )));
            }
            let (function, limits) = invoke::resolve(app, &name, limits).await?;
            let (parts, body) = req.into_parts();
            let max = app.sessions.limits().max_snapshot_bytes;
            let upload = read_body(app, &parts, body, max).await.map_err(|e| match e {
                ApiError::BodyTooLarge { limit } => ApiError::SnapshotTooLarge { limit },
                other => other,
            })?;
            let stepped = service::import(app, &function, limits, &id, upload.bytes.clone(), request_id).await?;
            Ok(stepped_response(app, &name, "import", &stepped, started))
        }
        SessionRequest::Info { name, id } => {
            let info = service::info(app, &name, &id)?;
            Ok(json_response(StatusCode::OK, &serde_json::to_value(&info).unwrap_or_default()))
        }
        SessionRequest::Delete { name, id } => {
            service::delete(app, &name, &id).await?;
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok(response)
        }
        SessionRequest::Export { name, id } => {
            let exported = service::export(app, &name, &id).await?;
            // Counted while it was read; the response counts from here until it is written.
            drop(exported.budget);
            let mut response = Response::new(Full::new(exported.state));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(SNAPSHOT_CONTENT_TYPE));
            if let Ok(v) = HeaderValue::from_str(&exported.module_sha256) {
                headers.insert(HEADER_MODULE_SHA256, v);
            }
            Ok(response)
        }
    }
}

/// A step's answer: its error when the guest failed (as an invocation's would be), else
/// the message's output (`message`) or the session's description (`create`, `import`);
/// with the step's and the commit's headers. Logs the step.
fn stepped_response(
    app: &App,
    name: &FunctionName,
    op: &'static str,
    stepped: &Stepped,
    started: Instant,
) -> Response<Full<Bytes>> {
    let ran = &stepped.ran;
    let (mut response, kind) = ran_response(ran);
    let id =
        stepped.commit.is_some().then_some(stepped.id.as_str()).or((op != "create").then_some(stepped.id.as_str()));
    if stepped.succeeded() {
        let size = stepped.stored_bytes;
        match op {
            "create" | "import" => {
                let mut body = json!({"id": stepped.id, "function": name.as_str(), "snapshot_bytes": size});
                if op == "create" {
                    body["module_sha256"] = json!(ran.function.module.sha256);
                }
                let status = if stepped.created { StatusCode::CREATED } else { StatusCode::OK };
                let mut r = json_response(status, &body);
                if op == "create" {
                    if let Ok(v) = HeaderValue::from_str(&format!("{PREFIX}/{name}/{}", stepped.id)) {
                        r.headers_mut().insert(header::LOCATION, v);
                    }
                }
                // An import reports the commit alone, as it ran nothing.
                if op == "import" {
                    commit_headers(&mut r, &stepped.id, size, Duration::ZERO);
                    log_step(app, name, id, op, kind, stepped, started);
                    return r;
                }
                response = with_accounting_of(r, &response);
            }
            _ => {
                let committed = stepped.commit.is_some();
                response.headers_mut().insert(
                    "x-wasmbox-session-committed",
                    HeaderValue::from_static(if committed { "true" } else { "false" }),
                );
            }
        }
        commit_headers(&mut response, &stepped.id, size, stepped.commit.map_or(Duration::ZERO, |c| c.took));
    }
    session_headers(&mut response, stepped);
    log_step(app, name, id, op, kind, stepped, started);
    with_meta(response, ran)
}

/// `to` with the accounting headers `from` carries.
fn with_accounting_of(mut to: Response<Full<Bytes>>, from: &Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    for name in [super::routes::HEADER_CPU_TIME, super::routes::HEADER_MEMORY_PEAK, super::routes::HEADER_MEMORY_LIMIT]
    {
        if let Some(v) = from.headers().get(name) {
            to.headers_mut().insert(name, v.clone());
        }
    }
    to
}

fn session_headers(response: &mut Response<Full<Bytes>>, stepped: &Stepped) {
    let Some(stats) = stepped.ran.completed.as_ref().ok().and_then(|c| c.result.session) else { return };
    let headers = response.headers_mut();
    headers.insert(HEADER_RESTORE_TIME, HeaderValue::from(stats.restore_us));
    headers.insert(HEADER_CAPTURE_TIME, HeaderValue::from(stats.capture_us));
    headers.insert(HEADER_PAGES_RESTORED, HeaderValue::from(stats.pages_restored));
    headers.insert(HEADER_PAGES_COMPRESSED, HeaderValue::from(stats.pages_compressed));
}

fn commit_headers(response: &mut Response<Full<Bytes>>, id: &str, bytes: u64, commit: Duration) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(HEADER_SESSION_ID, v);
    }
    headers.insert(HEADER_SNAPSHOT_BYTES, HeaderValue::from(bytes));
    headers.insert(HEADER_COMMIT_TIME, HeaderValue::from(micros(commit)));
}

fn log_step(
    app: &App,
    name: &FunctionName,
    id: Option<&str>,
    op: &'static str,
    kind: &'static str,
    stepped: &Stepped,
    started: Instant,
) {
    let ran = &stepped.ran;
    let result = ran.completed.as_ref().ok().map(|c| &c.result);
    let total = started.elapsed();
    app.metrics.record_invocation(
        name.as_str(),
        kind,
        ran.queue_wait,
        result.map(|r| Duration::from_micros(r.exec_us)),
        total,
        result.and_then(|r| r.module_source),
    );
    tracing::info!(
        function = %name,
        session = id.map(sessions::log_id).unwrap_or_default(),
        op,
        outcome = kind,
        worker = %ran.worker,
        queue_us = micros(ran.queue_wait),
        exec_us = result.map(|r| r.exec_us),
        restore_us = result.and_then(|r| r.session).map(|s| s.restore_us),
        capture_us = result.and_then(|r| r.session).map(|s| s.capture_us),
        snapshot_bytes = result.map(|r| r.snapshot_len),
        total_us = micros(total),
        "session step"
    );
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
