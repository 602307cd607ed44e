//! Requests for `wasi:http/proxy` components: `ANY /{function}[/{rest...}]` becomes a
//! `wasi:http` request (method, the path below the mount plus the query, the headers minus
//! hop-by-hop ones and WasmBox's own, the body within `WASMBOX_MAX_BODY_BYTES`) for the
//! component's handler, and its response streams back as the worker sends it. An error
//! before the response head is WasmBox's typed JSON answer; after it, the body is cut (the
//! connection is closed without the body's end), so a client never takes a partial body
//! for a whole one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming};
use wasmbox_protocol::{HttpRequest, ResponseHead, bytes_to_latin1, latin1_to_bytes};

use super::error::ApiError;
use super::request::InvokeRequest;
use super::routes::{Body, HEADER_WORKER, boxed, log_invocation, ran_response, read_body, with_meta};
use crate::App;
use crate::limits::InvocationLimits;
use crate::pool::HttpStreams;
use crate::registry::Function;
use crate::service::invoke::{self, Call};

/// Header under which the handler learns where the function is mounted.
pub const FORWARDED_PREFIX: &str = "x-forwarded-prefix";

/// Most headers a response head may carry (as many as a request may: hyper's default).
pub const MAX_RESPONSE_HEADERS: usize = 100;

/// Response pieces buffered between the worker and a slow client.
const BODY_PIECES: usize = 8;

/// A request body of at most this declared length is read whole and sent with the
/// request, saving the streaming exchange for the common small body.
const INLINE_BODY_BYTES: u64 = wasmbox_protocol::MAX_REQUEST_PIECE as u64;

/// Request pieces buffered between a client and the worker.
const REQUEST_PIECES: usize = 4;

/// What a streamed request body holds of the buffer budget while it is read: the
/// channel's pieces and the one on its way.
const STREAMED_BODY_HELD: u64 = (REQUEST_PIECES as u64 + 1) * wasmbox_protocol::MAX_REQUEST_PIECE as u64;

/// Serves one request with `function`'s handler.
pub async fn serve(
    app: &Arc<App>,
    req: Request<Incoming>,
    parsed: InvokeRequest,
    function: Arc<Function>,
    limits: InvocationLimits,
    request_id: &str,
    started: Instant,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let limit = app.config.max_body_bytes;
    // A body known to be small (or refused for its length) is read whole and goes with
    // the request; any other is streamed to the handler as the client sends it.
    let declared = body.size_hint().exact();
    let whole = body.is_end_stream() || declared.is_some_and(|n| n <= INLINE_BODY_BYTES || n > limit);
    let (input, request_body, body_read) = if whole {
        (read_body(app, &parts, body, limit).await?, None, None)
    } else {
        let held =
            app.buffers.take(STREAMED_BODY_HELD).await.map_err(|_| ApiError::Overloaded { resource: "buffers" })?;
        let (pieces, request_body) = tokio::sync::mpsc::channel(REQUEST_PIECES);
        let (time, _) = super::io::client_bounds(&app.config);
        let bounds = super::body::ReadBounds { limit, time };
        let peer = parts.extensions.get::<super::routes::Peer>().map(|p| p.0);
        let reader = {
            let app = app.clone();
            tokio::spawn(async move {
                let read = super::body::stream(body, bounds, pieces, peer, || app.connections.body_timed_out()).await;
                drop(held);
                read
            })
        };
        let none = super::body::Body { bytes: Bytes::new(), held: app.buffers.none() };
        (none, Some(request_body), Some(reader))
    };
    let mount = format!("/{}", parsed.name);
    let mut path_with_query = parsed.rest.unwrap_or_else(|| "/".to_owned());
    if let Some(query) = parts.uri.query() {
        path_with_query.push('?');
        path_with_query.push_str(query);
    }
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.parse::<http::uri::Authority>().is_ok())
        .unwrap_or("localhost")
        .to_owned();
    let request = HttpRequest {
        method: parts.method.to_string(),
        scheme: "http".into(),
        authority,
        path_with_query,
        headers: forwarded_headers(&parts.headers, &mount),
        streamed: request_body.is_some(),
    };
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let (body_tx, body_rx) = tokio::sync::mpsc::channel(BODY_PIECES);
    let sink = HttpStreams { request: request_body, head: Some(head_tx), body: body_tx };
    let span = tracing::info_span!("invoke", request_id, function = %parsed.name);
    // The exchange goes on while the response streams: it runs as a task of its own.
    let done = {
        let app = app.clone();
        let request_id = request_id.to_owned();
        tokio::spawn(async move {
            let call = Call {
                request_id: &request_id,
                function,
                limits,
                args: None,
                input: input.bytes.clone(),
                step: None,
                http: Some((request, sink)),
            };
            let ran = invoke::run(&app, call).await;
            drop(input);
            ran
        })
    };
    // A request body the client fails to send, before the head, is the answer (the
    // handler saw it cut short); after the head, the response goes on as the handler makes it.
    let head = tokio::select! {
        head = head_rx => head,
        Ok(Err(failed)) = reading(body_read) => {
            let logger = app.clone();
            let (kind, status) = (failed.kind(), failed.status());
            tokio::spawn(async move {
                if let Ok(Ok(ran)) = done.await {
                    log_invocation(&logger, &span, &ran, kind, status, started);
                }
            });
            return Err(failed);
        }
    };
    match head {
        Ok(head) => {
            // A head no client would take is refused here, before anything is sent.
            let bytes: usize = head.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
            if head.headers.len() > MAX_RESPONSE_HEADERS || bytes > app.config.max_header_bytes {
                let logger = app.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(ran)) = done.await {
                        log_invocation(&logger, &span, &ran, "invalid_response", StatusCode::BAD_GATEWAY, started);
                    }
                });
                return Err(ApiError::InvalidResponse(format!(
                    "its head has {} headers of {bytes} bytes; at most {MAX_RESPONSE_HEADERS} headers and \
                     WASMBOX_MAX_HEADER_BYTES ({}) bytes",
                    head.headers.len(),
                    app.config.max_header_bytes
                )));
            }
            let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            // The access log line, once the worker is done: the status the client got, and
            // the outcome (a failure after the head is the cut it made).
            let logger = app.clone();
            tokio::spawn(async move {
                if let Ok(Ok(ran)) = done.await {
                    let (_, kind) = ran_response(&ran);
                    log_invocation(&logger, &span, &ran, kind, status, started);
                }
            });
            // What the stream can hold at once (the channel's pieces and the one hyper is
            // writing) counts against the buffer budget for as long as the body lives.
            let held = app.buffers.charge(((BODY_PIECES + 1) * wasmbox_protocol::MAX_RESPONSE_PIECE) as u64);
            Ok(streamed(head, body_rx, held))
        }
        // No head: the run ended before the handler set a response; its error is the answer.
        Err(_) => {
            let ran = done.await.map_err(|e| ApiError::Internal(format!("worker exchange task failed: {e}")))??;
            let (response, kind) = ran_response(&ran);
            log_invocation(app, &span, &ran, kind, response.status(), started);
            Ok(boxed(with_meta(response, &ran)))
        }
    }
}

/// Waits for a streamed request body's read to end; never ends for a body read whole.
async fn reading(
    read: Option<tokio::task::JoinHandle<Result<(), ApiError>>>,
) -> Result<Result<(), ApiError>, tokio::task::JoinError> {
    match read {
        Some(read) => read.await,
        None => std::future::pending().await,
    }
}

/// The request's headers for the handler: without hop-by-hop headers, WasmBox's own
/// control headers and any forwarded prefix the client sent; with the mount.
fn forwarded_headers(headers: &HeaderMap, mount: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| !hop_by_hop(name) && !control(name) && name.as_str() != FORWARDED_PREFIX)
        .map(|(name, value)| (name.as_str().to_owned(), bytes_to_latin1(value.as_bytes())))
        .collect();
    out.push((FORWARDED_PREFIX.to_owned(), mount.to_owned()));
    out
}

/// Headers of one connection, not of the request (RFC 9110 7.6.1), and framing.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            // Answered by WasmBox itself (100 Continue, once the body is read).
            | "expect"
    )
}

/// WasmBox's own request headers: the limits and request id are the server's business.
fn control(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.eq_ignore_ascii_case(super::request::CPU_QUOTA)
        || name.eq_ignore_ascii_case(super::request::MEMORY_REQUEST)
        || name.eq_ignore_ascii_case(super::request::TIMEOUT_MS)
        || name.starts_with("x-wasmbox-")
}

/// The handler's response: its status and headers (minus hop-by-hop ones and any that claim
/// to be WasmBox's), its body as it comes.
fn streamed(
    head: ResponseHead,
    body: tokio::sync::mpsc::Receiver<Option<Bytes>>,
    held: crate::budget::Held,
) -> Response<Body> {
    let mut response = Response::new(Streamed { pieces: body, ended: false, _held: held }.boxed());
    *response.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in head.headers {
        let (Ok(name), Some(value)) = (HeaderName::from_bytes(name.as_bytes()), latin1_to_bytes(&value)) else {
            continue;
        };
        if hop_by_hop(&name) || name.as_str().starts_with("x-wasmbox-") || name.as_str() == HEADER_WORKER {
            continue;
        }
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            headers.append(name, value);
        }
    }
    response
}

/// A body fed by the exchange: pieces, then `None` when whole. A channel that closes
/// without that end is a body cut short, and is an error (hyper then closes the connection
/// without the final chunk).
struct Streamed {
    pieces: tokio::sync::mpsc::Receiver<Option<Bytes>>,
    ended: bool,
    _held: crate::budget::Held,
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.pieces.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Some(piece))) => Poll::Ready(Some(Ok(Frame::data(piece)))),
            Poll::Ready(Some(None)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err(std::io::Error::other("the function's response was cut short"))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
