//! Every error a client can get, the one place that maps it to an HTTP status, and the one
//! place domain errors (the service layer's, a worker's outcome) become one of them.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use hyper::Response;
use serde_json::{Map, Value, json};
use wasmbox_protocol::Outcome;

use crate::limits::{InvocationLimits, LimitError};
use crate::pool::InvokeFailure;
use crate::registry::{FunctionName, RegistryError};
use crate::service::{ServiceError, SessionError};

/// How much of a function's stderr an error response carries.
pub use wasmbox_protocol::STDERR_TAIL_BYTES;

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("invalid function name: {0}")]
    InvalidFunctionName(String),
    #[error("invalid {header} header: {reason}")]
    InvalidHeader { header: &'static str, reason: String },
    #[error("invalid query string: {0}")]
    InvalidQuery(String),
    #[error("could not read the request body: {0}")]
    BadBody(String),
    #[error("no function named {0}")]
    FunctionNotFound(String),
    #[error("no route for {0}; invoke a function with POST /{{function}}")]
    RouteNotFound(String),
    #[error("method {method} is not allowed here")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error(
        "the request body arrived too slowly: nothing for {timeout_ms} ms, or below WASMBOX_MIN_DATA_RATE after that (WASMBOX_BODY_READ_TIMEOUT_MS)"
    )]
    BodyTimeout { timeout_ms: u64 },
    /// A resource shared by all clients is spent: `connections` (every connection slot is
    /// taken) or `buffers` (WASMBOX_MAX_BUFFERED_BYTES).
    #[error("the server is overloaded ({resource}); retry shortly or elsewhere")]
    Overloaded { resource: &'static str },
    #[error("invalid module: {0}")]
    InvalidModule(String),
    #[error("invalid function config: {0}")]
    InvalidFunctionConfig(String),
    #[error("all workers are busy and {depth} requests are already waiting")]
    QueueFull { depth: usize },
    #[error("function exited with code {code}")]
    NonZeroExit { code: i32, stderr: String },
    #[error("function trapped: {message}")]
    Trapped { message: String, stderr: String },
    #[error("function output exceeds the limit of {limit} bytes")]
    OutputTooLarge { limit: u64 },
    #[error("function needed more than its memory limit of {limit_mb} MiB")]
    MemoryLimitExceeded { limit_mb: u64, stderr: String },
    #[error(
        "the kernel killed the function's worker for exceeding its memory limit{} (Memory-Request \
         {memory_request_mb} MiB plus the worker's own needs); host-side memory used on the \
         function's behalf counts too",
        limit_bytes.map(|b| format!(" of {} MiB", b >> 20)).unwrap_or_default()
    )]
    OomKilled { memory_request_mb: u64, limit_bytes: Option<u64> },
    #[error("worker process died during the invocation: {detail}")]
    WorkerDied { detail: String },
    #[error(
        "the function's worker made a system call outside its seccomp allow-list and was killed \
         (SIGSYS); the worker was replaced"
    )]
    SeccompViolation,
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("function exceeded its deadline of {timeout_ms} ms")]
    DeadlineExceeded { timeout_ms: u64, worker_killed: bool },
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    #[error("compiling the module took longer than WASMBOX_COMPILE_TIMEOUT_MS ({timeout_ms} ms)")]
    CompileTimeout { timeout_ms: u64 },
    /// The compile process died without a result (a crash, a kill, a seccomp violation).
    #[error("compiling the module failed: the compile process {detail}; the next request tries again")]
    CompileFailed { detail: String },
    #[error("no session {id} of function {function}")]
    SessionNotFound { function: String, id: String },
    #[error("session {id} expired after {idle_secs} s without messages (WASMBOX_SESSION_IDLE_SECS); create a new one")]
    SessionExpired { id: String, idle_secs: u64 },
    #[error(
        "{} holds its maximum of {max} sessions ({}); delete one or wait for idle ones to expire",
        if *scope == "function" { "this function" } else { "the server" },
        if *scope == "function" { "[session] max_sessions or WASMBOX_SESSION_MAX_PER_FUNCTION" } else { "WASMBOX_SESSION_MAX" }
    )]
    SessionLimit { scope: &'static str, max: usize },
    #[error(
        "the state would pass the {limit} bytes of session state {} may hold ({}); nothing was changed",
        if *scope == "function" { "this function" } else { "the server" },
        if *scope == "function" { "[session] max_stored_bytes or WASMBOX_SESSION_MAX_BYTES_PER_FUNCTION" } else { "WASMBOX_SESSION_MAX_TOTAL_BYTES" }
    )]
    SessionStorageFull { scope: &'static str, limit: u64 },
    #[error("invalid snapshot: {0}")]
    SnapshotInvalid(String),
    #[error("snapshot exceeds the limit of {limit} bytes (WASMBOX_SESSION_MAX_SNAPSHOT_BYTES)")]
    SnapshotTooLarge { limit: u64 },
    #[error(
        "the session's state encodes larger than WASMBOX_SESSION_MAX_SNAPSHOT_BYTES ({limit} bytes); the message was not applied"
    )]
    SessionStateTooLarge { limit: u64 },
    #[error(
        "function {function} was replaced since this session's state was saved (state of module {saved}, function is now {current}); delete the session or import a snapshot of the new module"
    )]
    SessionModuleChanged { function: String, saved: String, current: String },
    #[error("session {id}'s stored state is unreadable: {reason}")]
    SessionCorrupt { id: String, reason: String },
    #[error("the function's wasi:http handler returned without setting a response")]
    NoResponse,
    #[error("the function's response is not one the server passes on: {0}")]
    InvalidResponse(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The single status mapping.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidFunctionName(_)
            | ApiError::InvalidHeader { .. }
            | ApiError::InvalidQuery(_)
            | ApiError::BadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::FunctionNotFound(_) | ApiError::RouteNotFound(_) | ApiError::SessionNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::SessionExpired { .. } => StatusCode::GONE,
            ApiError::SnapshotInvalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::SnapshotTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::SessionModuleChanged { .. } => StatusCode::CONFLICT,
            // The server cannot store what the request needs: one more session, or a state
            // this large.
            ApiError::SessionLimit { .. }
            | ApiError::SessionStorageFull { .. }
            | ApiError::SessionStateTooLarge { .. } => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InvalidModule(_) | ApiError::InvalidFunctionConfig(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NonZeroExit { .. }
            | ApiError::Trapped { .. }
            | ApiError::OutputTooLarge { .. }
            | ApiError::SessionCorrupt { .. }
            | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // Distinct from a function bug: the same request may succeed with a larger
            // Memory-Request, and 507 says "could not get the storage it needed".
            // Both memory failures are 507; the kind says which layer stopped the function:
            // the engine's linear-memory cap or the kernel's cgroup OOM killer.
            ApiError::MemoryLimitExceeded { .. } | ApiError::OomKilled { .. } => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::WorkerDied { .. }
            | ApiError::SeccompViolation
            | ApiError::CompileFailed { .. }
            | ApiError::NoResponse
            | ApiError::InvalidResponse(_) => StatusCode::BAD_GATEWAY,
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded { .. } | ApiError::CompileTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `error` field: a stable, machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidFunctionName(_) => "invalid_function_name",
            ApiError::InvalidHeader { .. } => "invalid_header",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::BadBody(_) => "bad_body",
            ApiError::FunctionNotFound(_) => "function_not_found",
            ApiError::RouteNotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BodyTimeout { .. } => "body_timeout",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::InvalidModule(_) => "invalid_module",
            ApiError::InvalidFunctionConfig(_) => "invalid_function_config",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::NonZeroExit { .. } => "nonzero_exit",
            ApiError::Trapped { .. } => "trap",
            ApiError::OutputTooLarge { .. } => "output_too_large",
            ApiError::MemoryLimitExceeded { .. } => "memory_limit_exceeded",
            ApiError::OomKilled { .. } => "oom_killed",
            ApiError::WorkerDied { .. } => "worker_died",
            ApiError::SeccompViolation => "seccomp_violation",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::DeadlineExceeded { .. } => "deadline_exceeded",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::CompileTimeout { .. } => "compile_timeout",
            ApiError::CompileFailed { .. } => "compile_failed",
            ApiError::SessionNotFound { .. } => "session_not_found",
            ApiError::SessionExpired { .. } => "session_expired",
            ApiError::SessionLimit { .. } => "session_limit",
            ApiError::SessionStorageFull { .. } => "session_storage_full",
            ApiError::SnapshotInvalid(_) => "snapshot_invalid",
            ApiError::SnapshotTooLarge { .. } => "snapshot_too_large",
            ApiError::SessionStateTooLarge { .. } => "session_state_too_large",
            ApiError::SessionModuleChanged { .. } => "session_module_changed",
            ApiError::SessionCorrupt { .. } => "session_corrupt",
            ApiError::NoResponse => "no_response",
            ApiError::InvalidResponse(_) => "invalid_response",
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn details(&self, body: &mut Map<String, Value>) {
        match self {
            ApiError::InvalidHeader { header, .. } => {
                body.insert("header".into(), json!(header));
            }
            ApiError::BodyTooLarge { limit } | ApiError::OutputTooLarge { limit } => {
                body.insert("limit_bytes".into(), json!(limit));
            }
            ApiError::SnapshotTooLarge { limit, .. } | ApiError::SessionStateTooLarge { limit } => {
                body.insert("limit_bytes".into(), json!(limit));
            }
            ApiError::SessionLimit { scope, max } => {
                body.insert("scope".into(), json!(scope));
                body.insert("max_sessions".into(), json!(max));
            }
            ApiError::SessionStorageFull { scope, limit } => {
                body.insert("scope".into(), json!(scope));
                body.insert("limit_bytes".into(), json!(limit));
            }
            ApiError::QueueFull { depth } => {
                body.insert("queue_depth".into(), json!(depth));
            }
            ApiError::BodyTimeout { timeout_ms } => {
                body.insert("timeout_ms".into(), json!(timeout_ms));
            }
            ApiError::Overloaded { resource } => {
                body.insert("resource".into(), json!(resource));
            }
            ApiError::NonZeroExit { code, stderr } => {
                body.insert("exit_code".into(), json!(code));
                body.insert("stderr".into(), json!(stderr));
            }
            ApiError::Trapped { stderr, .. } => {
                body.insert("stderr".into(), json!(stderr));
            }
            ApiError::MemoryLimitExceeded { limit_mb, stderr } => {
                body.insert("memory_limit_mb".into(), json!(limit_mb));
                body.insert("stderr".into(), json!(stderr));
            }
            ApiError::OomKilled { memory_request_mb, limit_bytes } => {
                body.insert("memory_request_mb".into(), json!(memory_request_mb));
                body.insert("cgroup_memory_limit_bytes".into(), json!(limit_bytes));
            }
            ApiError::DeadlineExceeded { timeout_ms, worker_killed } => {
                body.insert("timeout_ms".into(), json!(timeout_ms));
                body.insert("worker_killed".into(), json!(worker_killed));
            }
            _ => {}
        }
    }

    /// The JSON error response: `{"error": kind, "message": ..., details...}`.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let mut body = Map::new();
        body.insert("error".into(), json!(self.kind()));
        body.insert("message".into(), json!(self.to_string()));
        self.details(&mut body);
        let mut bytes = serde_json::to_vec(&Value::Object(body)).unwrap_or_default();
        bytes.push(b'\n');
        let mut response = Response::new(Full::new(Bytes::from(bytes)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            ApiError::QueueFull { .. } | ApiError::ShuttingDown | ApiError::Overloaded { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // The rest of the body is not read: the connection cannot carry another request.
            ApiError::BodyTimeout { .. } => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, super::admin::www_authenticate());
            }
            _ => {}
        }
        response
    }
}

/// The last `STDERR_TAIL_BYTES` of stderr as text; invalid UTF-8 is replaced, and JSON
/// encoding escapes control characters, so guest bytes cannot forge response structure.
pub fn stderr_tail(stderr: &[u8]) -> String {
    let start = stderr.len().saturating_sub(STDERR_TAIL_BYTES);
    String::from_utf8_lossy(&stderr[start..]).into_owned()
}

impl From<crate::compiler::CompileError> for ApiError {
    fn from(e: crate::compiler::CompileError) -> Self {
        use crate::compiler::CompileError;
        match e {
            CompileError::Invalid(message) => ApiError::InvalidModule(message),
            CompileError::Timeout { timeout_ms } => ApiError::CompileTimeout { timeout_ms },
            CompileError::Died(detail) => ApiError::CompileFailed { detail },
            CompileError::Changed => ApiError::Internal("the module kept changing while it was compiled".into()),
            CompileError::Internal(detail) => {
                tracing::error!(%detail, "compiling a module failed on the supervisor's side");
                ApiError::Internal("cannot compile the module".into())
            }
        }
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        ApiError::InvalidHeader { header: super::request::limit_header(e.limit), reason: e.reason }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(name) => ApiError::FunctionNotFound(name.to_string()),
            RegistryError::ModuleTooLarge { size, limit, .. } => {
                ApiError::InvalidModule(format!("module is {size} bytes, more than the limit of {limit}"))
            }
            // Logged by the registry, once per version of the config.
            RegistryError::InvalidConfig { name, .. } => ApiError::InvalidFunctionConfig(invalid_config_message(&name)),
            RegistryError::Io { .. } => {
                tracing::error!(error = %crate::error_chain(&e), "registry i/o failed");
                ApiError::Internal("cannot read the function".into())
            }
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        use crate::sessions::QuotaError;
        match e {
            SessionError::NotFound { function, id } => ApiError::SessionNotFound { function, id },
            SessionError::Expired { id, idle_secs } => ApiError::SessionExpired { id, idle_secs },
            SessionError::ModuleChanged { function, saved, current } => {
                ApiError::SessionModuleChanged { function, saved, current }
            }
            SessionError::Corrupt { id, reason } => ApiError::SessionCorrupt { id, reason },
            SessionError::StateTooLarge { limit } => ApiError::SessionStateTooLarge { limit },
            SessionError::SnapshotInvalid(message) => ApiError::SnapshotInvalid(message),
            SessionError::SnapshotTooLarge { limit } => ApiError::SnapshotTooLarge { limit },
            SessionError::Quota(QuotaError::Sessions { scope, max }) => ApiError::SessionLimit { scope, max },
            SessionError::Quota(QuotaError::Bytes { scope, limit }) => ApiError::SessionStorageFull { scope, limit },
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        use crate::pool::AcquireError;
        match e {
            ServiceError::ShuttingDown => ApiError::ShuttingDown,
            ServiceError::Registry(e) => e.into(),
            ServiceError::Limits(e) => e.into(),
            ServiceError::Compile(e) => e.into(),
            ServiceError::Acquire(AcquireError::QueueFull { depth }) => ApiError::QueueFull { depth },
            ServiceError::Acquire(AcquireError::ShuttingDown) => ApiError::ShuttingDown,
            ServiceError::InvalidConfig(name) => ApiError::InvalidFunctionConfig(invalid_config_message(&name)),
            ServiceError::ConfigRefused(message) => ApiError::InvalidFunctionConfig(message),
            ServiceError::Unsupported(message) => ApiError::InvalidModule(message),
            ServiceError::Overloaded => ApiError::Overloaded { resource: "buffers" },
            ServiceError::Session(e) => e.into(),
            ServiceError::Internal(message) => ApiError::Internal(message),
        }
    }
}

/// What a caller hears about a config the server refused: which function, not why (the
/// reason can name host paths and config values; it is in the server log).
fn invalid_config_message(name: &FunctionName) -> String {
    format!(
        "function {name}'s name.toml or one of its preopened directories is not acceptable; the server log says why"
    )
}

/// The error a worker's exchange that produced no result answers with.
pub fn invoke_failure(failure: &InvokeFailure, limits: &InvocationLimits) -> ApiError {
    match failure {
        InvokeFailure::WorkerDied { detail } => ApiError::WorkerDied { detail: detail.clone() },
        InvokeFailure::HardDeadline => {
            ApiError::DeadlineExceeded { timeout_ms: limits.timeout_ms, worker_killed: true }
        }
        InvokeFailure::ShuttingDown => ApiError::ShuttingDown,
        InvokeFailure::OomKilled { limit_bytes } => {
            ApiError::OomKilled { memory_request_mb: limits.memory_mb, limit_bytes: *limit_bytes }
        }
        InvokeFailure::SeccompViolation => ApiError::SeccompViolation,
        InvokeFailure::ModuleUnreadable(message) => {
            tracing::error!(error = %message, "cannot open the function's module");
            ApiError::Internal("cannot open the function's module".into())
        }
        InvokeFailure::Limits(message) => {
            tracing::error!(error = %message, "cannot apply cgroup limits");
            ApiError::Internal("cannot apply the invocation's resource limits".into())
        }
    }
}

/// The error a guest's outcome answers with; `None`: it ran to a clean end (exit 0).
pub fn outcome_error(outcome: &Outcome, stderr: &[u8], timeout_ms: u64) -> Option<ApiError> {
    match outcome {
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
        // Sent again with the file by the pool; only a worker that says it twice gets here.
        Outcome::ModuleNotHeld => Some(ApiError::Internal("the worker could not load the module".into())),
        Outcome::SetupFailed { message } => {
            // The worker's message can name host paths: for the log only.
            tracing::error!(error = %message, "the worker could not set the invocation up");
            Some(ApiError::Internal("the worker could not set the invocation up".into()))
        }
        Outcome::SnapshotInvalid { message } => Some(ApiError::SnapshotInvalid(message.clone())),
        Outcome::SnapshotTooLarge { limit_bytes } => Some(ApiError::SessionStateTooLarge { limit: *limit_bytes }),
        Outcome::NoResponse => Some(ApiError::NoResponse),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status() {
        let s = || String::from("x");
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::InvalidFunctionName(s()), 400, "invalid_function_name"),
            (ApiError::InvalidHeader { header: "cpu_quota", reason: s() }, 400, "invalid_header"),
            (ApiError::InvalidQuery(s()), 400, "invalid_query"),
            (ApiError::BadBody(s()), 400, "bad_body"),
            (ApiError::FunctionNotFound(s()), 404, "function_not_found"),
            (ApiError::RouteNotFound(s()), 404, "not_found"),
            (ApiError::MethodNotAllowed { method: s(), allow: "GET" }, 405, "method_not_allowed"),
            (ApiError::BodyTooLarge { limit: 1 }, 413, "body_too_large"),
            (ApiError::BodyTimeout { timeout_ms: 1 }, 408, "body_timeout"),
            (ApiError::Overloaded { resource: "buffers" }, 503, "overloaded"),
            (ApiError::InvalidModule(s()), 422, "invalid_module"),
            (ApiError::InvalidFunctionConfig(s()), 422, "invalid_function_config"),
            (ApiError::QueueFull { depth: 1 }, 429, "queue_full"),
            (ApiError::NonZeroExit { code: 1, stderr: s() }, 500, "nonzero_exit"),
            (ApiError::Trapped { message: s(), stderr: s() }, 500, "trap"),
            (ApiError::OutputTooLarge { limit: 1 }, 500, "output_too_large"),
            (ApiError::Internal(s()), 500, "internal_error"),
            (ApiError::MemoryLimitExceeded { limit_mb: 1, stderr: s() }, 507, "memory_limit_exceeded"),
            (ApiError::OomKilled { memory_request_mb: 1, limit_bytes: Some(1 << 20) }, 507, "oom_killed"),
            (ApiError::WorkerDied { detail: s() }, 502, "worker_died"),
            (ApiError::SeccompViolation, 502, "seccomp_violation"),
            (ApiError::ShuttingDown, 503, "shutting_down"),
            (ApiError::DeadlineExceeded { timeout_ms: 1, worker_killed: false }, 504, "deadline_exceeded"),
            (ApiError::Unauthorized("x"), 401, "unauthorized"),
            (ApiError::CompileTimeout { timeout_ms: 1 }, 504, "compile_timeout"),
            (ApiError::CompileFailed { detail: s() }, 502, "compile_failed"),
            (ApiError::SessionNotFound { function: s(), id: s() }, 404, "session_not_found"),
            (ApiError::SessionExpired { id: s(), idle_secs: 1 }, 410, "session_expired"),
            (ApiError::SessionLimit { scope: "function", max: 1 }, 507, "session_limit"),
            (ApiError::SessionStorageFull { scope: "server", limit: 1 }, 507, "session_storage_full"),
            (ApiError::SnapshotInvalid(s()), 422, "snapshot_invalid"),
            (ApiError::SnapshotTooLarge { limit: 1 }, 413, "snapshot_too_large"),
            (ApiError::SessionStateTooLarge { limit: 1 }, 507, "session_state_too_large"),
            (ApiError::SessionModuleChanged { function: s(), saved: s(), current: s() }, 409, "session_module_changed"),
            (ApiError::SessionCorrupt { id: s(), reason: s() }, 500, "session_corrupt"),
            (ApiError::NoResponse, 502, "no_response"),
            (ApiError::InvalidResponse(s()), 502, "invalid_response"),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.kind(), kind);
            let response = error.to_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        }
    }

    #[test]
    fn queue_full_says_when_to_retry_and_405_says_what_is_allowed() {
        let r = ApiError::QueueFull { depth: 3 }.to_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::Overloaded { resource: "connections" }.to_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::BodyTimeout { timeout_ms: 5 }.to_response();
        assert_eq!(r.headers()[header::CONNECTION], "close");
        let r = ApiError::MethodNotAllowed { method: "PUT".into(), allow: "GET, POST" }.to_response();
        assert_eq!(r.headers()[header::ALLOW], "GET, POST");
    }

    #[test]
    fn stderr_tail_keeps_the_end_and_survives_bad_utf8() {
        let mut bytes = vec![b'a'; STDERR_TAIL_BYTES];
        bytes.extend_from_slice(b"\xff\xfeend");
        let tail = stderr_tail(&bytes);
        assert!(tail.ends_with("end"));
        assert!(tail.contains('\u{FFFD}'));
    }
}
