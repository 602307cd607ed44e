//! WASI 0.2 components on Wasmtime. What a component is comes from its exports when it is
//! linked: `wasi:cli/run` makes it a `wasi:cli/command`, which runs exactly like a command
//! module (stdin, argv, env, preopens, exit code, the same limits and deadline);
//! `wasi:http/incoming-handler` makes it a `wasi:http/proxy`, whose handler gets one HTTP
//! request per call and streams its response out as it writes it. Anything else is refused
//! with what it exports. Outgoing HTTP is denied (`HTTP-request-denied`): the worker has
//! no network.

use std::time::Instant;

use wasmbox_protocol::Outcome;
use wasmtime::Store;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::sync::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::{Limits, WasmtimeEngine, classify_with};
use crate::capture::Capture;
use crate::engine::{EngineError, HttpCall, HttpEvent, RunRequest, bounded};

/// Per-invocation store data of a component.
pub(super) struct ComponentState {
    ctx: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    hooks: DenyOutgoing,
    pub(super) limits: Limits,
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
    }
}

impl WasiHttpView for ComponentState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// Every outgoing request is refused with `HTTP-request-denied`: the worker has no network.
struct DenyOutgoing;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<dyn std::future::Future<Output = SendResult> + Send> {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

type SendResult = Result<
    (
        http::Response<wasmtime_wasi_http::WasiBody>,
        Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ),
    wasmtime_wasi_http::Error,
>;

/// A component linked for what it is.
#[derive(Clone)]
pub(super) enum Linked {
    Command(CommandPre<ComponentState>),
    Http(ProxyPre<ComponentState>),
}

/// The WASI 0.2 linker: every `wasi:cli/command` import (`exit-with-code` of 0.2.12
/// included, so a guest that imports it gets its exit status through as it gave it).
pub(super) fn linker(engine: &wasmtime::Engine) -> anyhow::Result<Linker<ComponentState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)?;
    Ok(linker)
}

/// Names of a component's exports, for messages.
fn export_names(engine: &wasmtime::Engine, component: &Component) -> Vec<String> {
    component.component_type().exports(engine).map(|(name, _)| name.to_owned()).collect()
}

/// Whether an export name is interface `interface` of WASI 0.2 (any patch version).
fn is_wasi_02(name: &str, interface: &str) -> bool {
    name.strip_prefix(interface).and_then(|rest| rest.strip_prefix("@0.2.")).is_some()
}

/// Links `component` for the world it exports.
pub(super) fn link(linker: &Linker<ComponentState>, component: &Component) -> Result<Linked, EngineError> {
    let exports = export_names(linker.engine(), component);
    let invalid = |message: String| EngineError::InvalidModule(bounded(message));
    if exports.iter().any(|n| is_wasi_02(n, "wasi:cli/run")) {
        let pre = linker.instantiate_pre(component).map_err(|e| invalid(format!("{e:#}")))?;
        let command = CommandPre::new(pre).map_err(|e| invalid(format!("{e:#}")))?;
        return Ok(Linked::Command(command));
    }
    if exports.iter().any(|n| is_wasi_02(n, "wasi:http/incoming-handler")) {
        let pre = linker.instantiate_pre(component).map_err(|e| invalid(format!("{e:#}")))?;
        let proxy = ProxyPre::new(pre).map_err(|e| invalid(format!("{e:#}")))?;
        return Ok(Linked::Http(proxy));
    }
    Err(invalid(format!(
        "a WebAssembly component that exports neither wasi:cli/run@0.2 (a wasi:cli/command) nor \
         wasi:http/incoming-handler@0.2 (a wasi:http/proxy); its exports: [{}]",
        exports.join(", ")
    )))
}

impl WasmtimeEngine {
    /// A store with fresh WASI (and `wasi:http`) state for one call of a component, its
    /// memory limiter and its deadline armed at one epoch tick.
    fn component_store(
        &self,
        request: &RunRequest<'_>,
        stdout: &Capture,
        stderr: &Capture,
    ) -> Result<Store<ComponentState>, Outcome> {
        let mut wasi = super::wasi_builder(request, stdout, stderr)?;
        let memory_bytes = usize::try_from(request.memory_limit_bytes).unwrap_or(usize::MAX);
        let state = ComponentState {
            ctx: wasi.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: DenyOutgoing,
            limits: Limits::component(memory_bytes),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        Ok(store)
    }

    /// Runs a `wasi:cli/command` component's `run` in a fresh store with fresh WASI state.
    pub(super) fn run_command_component(
        &self,
        command: &CommandPre<ComponentState>,
        request: &RunRequest<'_>,
        stdout: &Capture,
        stderr: &Capture,
    ) -> Outcome {
        let mut store = match self.component_store(request, stdout, stderr) {
            Ok(store) => store,
            Err(outcome) => return outcome,
        };
        let guard = self.watchdog.arm(Instant::now() + request.timeout);
        let result = command.instantiate(&mut store).and_then(|c| c.wasi_cli_run().call_run(&mut store));
        let fired = guard.disarm();
        match result {
            Ok(Ok(())) => Outcome::Exited { code: 0 },
            // `exit(err)` comes back as an exit trap; a `run` that returns `err` is the same.
            Ok(Err(())) => Outcome::Exited { code: 1 },
            Err(e) => classify_with(&e, store.data().limits.memory_denied, fired, request.memory_limit_bytes),
        }
    }
}

/// How a handler's response went out.
enum Forwarded {
    /// Head and whole body sent.
    Done,
    /// The handler returned (or dropped its outparam) without setting a response.
    NoResponse,
    /// It set an error code instead of a response.
    ErrorCode(String),
    /// The body passed the output limit; what was sent stands, the rest was not.
    TooLarge,
    /// The body failed while it was read.
    BodyFailed(String),
    /// The supervisor's socket failed.
    Lost,
}

/// Waits for the handler's response and sends its head, then its body as it is written,
/// at most `limit` bytes of it.
async fn forward(
    response: tokio::sync::oneshot::Receiver<
        Result<
            http::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>,
            wasmtime_wasi_http::p2::bindings::http::types::ErrorCode,
        >,
    >,
    emit: &(dyn Fn(HttpEvent<'_>) -> std::io::Result<()> + Sync),
    limit: u64,
) -> Forwarded {
    use http_body_util::BodyExt;
    let response = match response.await {
        Ok(Ok(response)) => response,
        Ok(Err(code)) => return Forwarded::ErrorCode(format!("{code:?}")),
        Err(_) => return Forwarded::NoResponse,
    };
    let (parts, mut body) = response.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), wasmbox_protocol::bytes_to_latin1(value.as_bytes())))
        .collect();
    let head = wasmbox_protocol::ResponseHead { status: parts.status.as_u16(), headers };
    if emit(HttpEvent::Head(head)).is_err() {
        return Forwarded::Lost;
    }
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: not forwarded.
                Err(_) => continue,
            },
            Err(e) => return Forwarded::BodyFailed(bounded(format!("{e:?}"))),
        };
        sent = sent.saturating_add(data.len() as u64);
        if sent > limit {
            return Forwarded::TooLarge;
        }
        for piece in data.chunks(wasmbox_protocol::MAX_RESPONSE_PIECE) {
            if emit(HttpEvent::Body(piece)).is_err() {
                return Forwarded::Lost;
            }
        }
    }
    Forwarded::Done
}

impl WasmtimeEngine {
    /// Runs a `wasi:http/proxy` component's handler for one request. A thread of this call
    /// forwards the response while the guest runs on this one; the store goes (closing
    /// whatever the guest left open) before that thread is joined.
    pub(super) fn run_http_component(
        &self,
        proxy: &ProxyPre<ComponentState>,
        request: &RunRequest<'_>,
        call: &HttpCall<'_>,
        stdout: &Capture,
        stderr: &Capture,
    ) -> Outcome {
        let mut store = match self.component_store(request, stdout, stderr) {
            Ok(store) => store,
            Err(outcome) => return outcome,
        };
        let incoming = match incoming_request(call) {
            Ok(incoming) => incoming,
            Err(message) => return Outcome::SetupFailed { message: bounded(message) },
        };
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let resources = store
            .data_mut()
            .http()
            .new_incoming_request(wasmtime_wasi_http::p2::bindings::http::types::Scheme::Http, incoming)
            .and_then(|req| Ok((req, store.data_mut().http().new_response_outparam(sender)?)));
        let (req, out) = match resources {
            Ok(pair) => pair,
            Err(e) => return Outcome::SetupFailed { message: bounded(format!("{e:#}")) },
        };
        let limit = request.max_output_bytes;
        let emit = call.emit;
        std::thread::scope(|scope| {
            let forwarder = std::thread::Builder::new()
                .name("wasmbox-http".into())
                .spawn_scoped(scope, move || wasmtime_wasi::runtime::in_tokio(forward(receiver, emit, limit)));
            let forwarder = match forwarder {
                Ok(f) => f,
                Err(e) => return Outcome::SetupFailed { message: format!("cannot start the response thread: {e}") },
            };
            let guard = self.watchdog.arm(Instant::now() + request.timeout);
            let result = proxy
                .instantiate(&mut store)
                .and_then(|p| p.wasi_http_incoming_handler().call_handle(&mut store, req, out));
            let fired = guard.disarm();
            let memory_denied = store.data().limits.memory_denied;
            drop(store);
            let forwarded = forwarder.join().unwrap_or(Forwarded::Lost);
            match (result, forwarded) {
                (Err(e), _) => classify_with(&e, memory_denied, fired, request.memory_limit_bytes),
                (Ok(()), Forwarded::Done) => Outcome::Exited { code: 0 },
                (Ok(()), Forwarded::NoResponse) => Outcome::NoResponse,
                (Ok(()), Forwarded::ErrorCode(code)) => {
                    Outcome::Trapped { message: format!("the handler answered with wasi:http error {code}") }
                }
                (Ok(()), Forwarded::TooLarge) => Outcome::OutputTooLarge { limit_bytes: limit },
                (Ok(()), Forwarded::BodyFailed(message)) => {
                    Outcome::Trapped { message: format!("the response body failed: {message}") }
                }
                (Ok(()), Forwarded::Lost) => Outcome::SetupFailed { message: "the supervisor's socket failed".into() },
            }
        })
    }
}

/// The request as wasmtime-wasi-http takes it.
fn incoming_request(
    call: &HttpCall<'_>,
) -> Result<http::Request<http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, wasmtime_wasi_http::Error>>, String>
{
    use http_body_util::BodyExt;
    let r = call.request;
    let mut builder = http::Request::builder()
        .method(r.method.as_str())
        .uri(format!("{}://{}{}", r.scheme, r.authority, r.path_with_query));
    for (name, value) in &r.headers {
        let value = wasmbox_protocol::latin1_to_bytes(value).ok_or("a header value is not bytes")?;
        builder = builder.header(name.as_str(), value);
    }
    let body =
        Incoming { first: Some(call.body.first.clone()).filter(|b| !b.is_empty()), rest: call.body.rest.clone() }
            .boxed_unsync();
    builder.body(body).map_err(|e| e.to_string())
}

/// A request body for the handler: the first part, then the streamed pieces.
struct Incoming {
    first: Option<bytes::Bytes>,
    rest: Option<crate::engine::StreamedBody>,
}

impl http_body::Body for Incoming {
    type Data = bytes::Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        let Some(rest) = &self.rest else { return Poll::Ready(None) };
        let polled = rest.lock().unwrap_or_else(|p| p.into_inner()).poll_recv(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(piece))) => Poll::Ready(Some(Ok(http_body::Frame::data(piece)))),
            Poll::Ready(Some(Err(()))) => {
                self.rest = None;
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::ConnectionTerminated)))
            }
            Poll::Ready(None) => {
                self.rest = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasi_interfaces_match_any_02_patch_and_nothing_else() {
        assert!(is_wasi_02("wasi:cli/run@0.2.0", "wasi:cli/run"));
        assert!(is_wasi_02("wasi:http/incoming-handler@0.2.12", "wasi:http/incoming-handler"));
        assert!(!is_wasi_02("wasi:cli/run@0.3.0", "wasi:cli/run"));
        assert!(!is_wasi_02("wasi:cli/runner@0.2.0", "wasi:cli/run"));
        assert!(!is_wasi_02("wasi:cli/run", "wasi:cli/run"));
    }
}
