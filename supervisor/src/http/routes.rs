//! Request routing: parse the request ([`request::parse`]), read its body within its limit
//! where the operation takes one, have the service layer execute it, and render the result.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use serde_json::json;
use wasmbox_protocol::{InvocationResult, Outcome};

use super::error::{ApiError, invoke_failure, outcome_error};
use super::request::{self, InvokeRequest, Parsed, Probe};
use crate::App;
use crate::cgroup::Accounting;
use crate::service::invoke::{self, Call, Ran};

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
pub async fn handle(app: Arc<App>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    req.extensions_mut().insert(Peer(peer));
    let request_id = request_id(&req);
    let mut response = match route(&app, req, &request_id).await {
        Ok(response) => response,
        Err(error) => boxed(error.to_response()),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(HEADER_REQUEST_ID, value);
    }
    charge_body(&app, response).await
}

/// Counts a large response body against the budget for as long as its bytes live: hyper
/// drops them once they are written to the socket (or the connection goes).
async fn charge_body(app: &App, response: Response<Body>) -> Response<Body> {
    struct Charged {
        bytes: Bytes,
        _held: crate::budget::Held,
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
    Response::from_parts(parts, full_body(Bytes::from_owner(Charged { bytes, _held: held })))
}

/// A response body: whole (most answers) or streamed (a `wasi:http` component's).
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A whole body as a [`Body`].
pub fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A whole response as one with a [`Body`].
pub fn boxed(response: Response<Full<Bytes>>) -> Response<Body> {
    response.map(|body| body.map_err(|never| match never {}).boxed())
}

/// Handles the one request of a connection accepted beyond `WASMBOX_MAX_CONNECTIONS`: the
/// health endpoints as usual (so probes and scrapes still get through), anything else a
/// 503 the client can act on.
pub fn handle_reserve(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match request::probe(req.method(), req.uri().path()) {
        Some(probe) => probe.and_then(|p| health(&app, p)).unwrap_or_else(|e| e.to_response()),
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
    match request::probe(req.method(), req.uri().path()) {
        Some(probe) => probe.and_then(|p| health(&app, p)).unwrap_or_else(|e| e.to_response()),
        None => ApiError::RouteNotFound(req.uri().path().into()).to_response(),
    }
}

async fn route(app: &Arc<App>, req: Request<Incoming>, request_id: &str) -> Result<Response<Body>, ApiError> {
    let parsed = request::parse(req.method(), req.uri().path(), req.headers())?;
    let full = |r: Result<Response<Full<Bytes>>, ApiError>| r.map(boxed);
    match parsed {
        Parsed::Probe(probe) => full(health(app, probe)),
        Parsed::Stats => {
            let body = json!({
                "pool": app.pool.status(),
                "compiler": app.compiler.stats(),
                "cgroups": app.cgroups,
                "functions": app.usage.snapshot(),
                "http": app.connections.stats(),
                "buffers": app.buffer_stats(),
                "registry": {"watched": app.registry.watched(), "file_checks": app.registry.file_checks()},
            });
            Ok(boxed(json_response(StatusCode::OK, &body)))
        }
        Parsed::Admin => full(super::admin::route(app, req, request_id).await),
        Parsed::Session(op) => full(super::sessions::route(app, req, op, request_id).await),
        Parsed::Invoke(invocation) => invoke(app, req, invocation, request_id).await,
    }
}

/// /healthz, /ready and /metrics, served on both listeners.
fn health(app: &Arc<App>, probe: Probe) -> Result<Response<Full<Bytes>>, ApiError> {
    match probe {
        Probe::Healthz => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        Probe::Ready => {
            let readiness = app.readiness();
            let code = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            Ok(json_response(code, &serde_json::to_value(&readiness).unwrap_or_default()))
        }
        Probe::Metrics => {
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
    }
}

async fn invoke(
    app: &Arc<App>,
    req: Request<Incoming>,
    parsed: InvokeRequest,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    if app.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let started = Instant::now();
    let (function, limits) = invoke::resolve(app, &parsed.name, parsed.limits).await?;
    if function.http_handler {
        return super::component::serve(app, req, parsed, function, limits, request_id, started).await;
    }
    let (args, with_body) = parsed.command(req.method(), req.uri().path(), req.uri().query())?;
    let name = parsed.name;
    let (parts, body) = req.into_parts();
    // Held until the invocation is done: the bytes live as long.
    let stdin = if with_body { Some(read_body(app, &parts, body, app.config.max_body_bytes).await?) } else { None };
    let input = stdin.as_ref().map(|b| b.bytes.clone()).unwrap_or_default();
    let span = tracing::info_span!("invoke", request_id, function = %name);
    let call = Call { request_id, function, limits, args, input, step: None, http: None };
    let ran = invoke::run(app, call).await?;
    let (response, kind) = ran_response(&ran);
    let response = with_meta(response, &ran);
    log_invocation(app, &span, &ran, kind, response.status(), started);
    Ok(boxed(response))
}

/// Records an invocation's metrics and writes its access log line.
pub(super) fn log_invocation(
    app: &App,
    span: &tracing::Span,
    ran: &Ran,
    kind: &'static str,
    status: StatusCode,
    started: Instant,
) {
    let done = ran.completed.as_ref().ok();
    let exec = done.map(|d| Duration::from_micros(d.result.exec_us));
    let used = done.and_then(|d| d.accounting.as_ref());
    let total = started.elapsed();
    app.metrics.record_invocation(
        ran.function.name.as_str(),
        kind,
        ran.queue_wait,
        exec,
        total,
        done.and_then(|d| d.result.module_source),
    );
    tracing::info!(
        parent: span,
        status = status.as_u16(),
        outcome = kind,
        worker = %ran.worker,
        queue_us = micros(ran.queue_wait),
        exec_us = exec.map(micros),
        total_us = micros(total),
        cpu_us = used.and_then(|u| u.cpu_time).map(micros),
        memory_peak_bytes = used.and_then(|u| u.memory_peak_bytes),
        "invocation"
    );
}

/// A run's response and its kind: "ok" or the error kind the answer carries, also for a
/// guest's own failure (a trap or a non-zero exit).
pub(super) fn ran_response(ran: &Ran) -> (Response<Full<Bytes>>, &'static str) {
    match &ran.completed {
        Ok(done) => {
            let (mut r, kind) =
                outcome_response(&done.result, done.stdout.clone(), &done.stderr, ran.limits.timeout_ms);
            add_accounting(r.headers_mut(), done.accounting.as_ref());
            (r, kind)
        }
        Err(failure) => {
            let e = invoke_failure(failure, &ran.limits);
            (e.to_response(), e.kind())
        }
    }
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

/// Which worker ran it and how long the request waited for one.
pub(super) fn with_meta(mut response: Response<Full<Bytes>>, ran: &Ran) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ran.worker) {
        headers.insert(HEADER_WORKER, v);
    }
    headers.insert(HEADER_QUEUE_WAIT, HeaderValue::from(micros(ran.queue_wait)));
    response
}

/// A worker's result as a response: stdout on a clean exit, else the outcome's error;
/// with the exit code, timings and where the module came from.
pub(super) fn outcome_response(
    result: &InvocationResult,
    stdout: Bytes,
    stderr: &[u8],
    timeout_ms: u64,
) -> (Response<Full<Bytes>>, &'static str) {
    let (mut response, kind) = match outcome_error(&result.outcome, stderr, timeout_ms) {
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

/// Reads a request body within `limit`, the budget of bytes held for clients and the body
/// read timeout and minimum rate (see [`super::body`]). A Content-Length over the limit is
/// refused before any byte is read, and a chunked body is cut off at the limit (413).
pub(super) async fn read_body(
    app: &App,
    parts: &http::request::Parts,
    body: Incoming,
    limit: u64,
) -> Result<super::body::Body, ApiError> {
    let (time, _) = super::io::client_bounds(&app.config);
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
