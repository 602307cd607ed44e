//! Reading a request body within its bounds: its size limit (413), the budget of bytes
//! held for clients (503 when it stays spent, before anything is read), and time: no byte
//! for `WASMBOX_BODY_READ_TIMEOUT_MS`, or slower than `WASMBOX_MIN_DATA_RATE` once that
//! timeout has passed, is a 408 and the connection is closed (as nginx's
//! `client_body_timeout`, with Kestrel's minimum data rate so a trickle cannot reset the
//! clock forever).

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;

use super::error::ApiError;
use super::io::WriteBounds;
use crate::budget::{Budget, Held};

/// How much budget a body of unknown length (chunked) takes at a time.
const GRANULE: u64 = 64 << 10;

/// Most of a refused body read and discarded after the refusal, so the client finishes
/// sending and reads the answer instead of having its upload reset (nginx's lingering
/// close); past it, or past the read bounds, the connection is simply closed.
const LINGER_BYTES: u64 = 16 << 20;

/// A request body read whole, with the budget it holds: keep it as long as the bytes.
#[derive(Debug)]
pub struct Body {
    pub bytes: Bytes,
    pub held: Held,
}

/// What bounds a body read.
#[derive(Debug, Clone, Copy)]
pub struct ReadBounds {
    pub limit: u64,
    /// The idle timeout and minimum rate (the same rule as for responses).
    pub time: WriteBounds,
}

/// Reads `body` whole (see the module docs). `peer` is for the log line of a timeout.
pub async fn read(
    body: Incoming,
    bounds: ReadBounds,
    budget: &std::sync::Arc<Budget>,
    peer: Option<SocketAddr>,
    on_timeout: impl FnOnce(),
) -> Result<Body, ApiError> {
    let mut body = body;
    let limit = bounds.limit;
    let declared = body.size_hint().exact();
    if let Some(len) = declared {
        if len > limit {
            linger(body, bounds);
            return Err(ApiError::BodyTooLarge { limit });
        }
    }
    let mut held = match declared {
        Some(0) => return Ok(Body { bytes: Bytes::new(), held: budget.none() }),
        Some(len) => match budget.take(len).await {
            Ok(held) => held,
            Err(_) => {
                linger(body, bounds);
                return Err(overloaded());
            }
        },
        None => budget.none(),
    };
    if body.is_end_stream() {
        return Ok(Body { bytes: Bytes::new(), held });
    }
    let capacity = usize::try_from(declared.unwrap_or(0)).unwrap_or(0);
    let mut buf = BytesMut::with_capacity(capacity);
    let started = Instant::now();
    let mut last = started;
    loop {
        let deadline = bounds.time.deadline(started, last, buf.len() as u64);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                on_timeout();
                tracing::info!(
                    peer = peer.map(|p| p.to_string()).unwrap_or_default(),
                    received = buf.len(),
                    declared,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "client too slow sending its request body (WASMBOX_BODY_READ_TIMEOUT_MS, WASMBOX_MIN_DATA_RATE); 408, connection closed"
                );
                return Err(ApiError::BodyTimeout { timeout_ms: bounds.time.timeout.as_millis() as u64 });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ApiError::BadBody(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue }; // trailers
        let total = buf.len() as u64 + data.len() as u64;
        if total > limit {
            linger(body, bounds);
            return Err(ApiError::BodyTooLarge { limit });
        }
        if total > held.bytes() {
            let want = (total.div_ceil(GRANULE) * GRANULE).min(limit);
            if held.grow_to(want.max(total)).await.is_err() {
                linger(body, bounds);
                return Err(overloaded());
            }
        }
        buf.extend_from_slice(&data);
        if !data.is_empty() {
            last = Instant::now();
        }
    }
    Ok(Body { bytes: buf.freeze(), held })
}

/// Streams `body` into `pieces` (each at most [`wasmbox_protocol::MAX_REQUEST_PIECE`]
/// bytes, then `None` once it is whole) within `bounds`, as [`read`] does: the size limit,
/// the idle timeout and the minimum rate, counting only the time spent waiting for the
/// client (not for the function to take what was sent). On failure the channel closes
/// without its end, so the function sees a body cut short, and the error is returned.
/// A function that stops taking the body ends the read; the rest is never read.
pub async fn stream(
    mut body: Incoming,
    bounds: ReadBounds,
    pieces: tokio::sync::mpsc::Sender<Option<Bytes>>,
    peer: Option<SocketAddr>,
    on_timeout: impl FnOnce(),
) -> Result<(), ApiError> {
    let limit = bounds.limit;
    let mut started = Instant::now();
    let (mut last, mut total) = (started, 0u64);
    loop {
        let deadline = bounds.time.deadline(started, last, total);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                on_timeout();
                tracing::info!(
                    peer = peer.map(|p| p.to_string()).unwrap_or_default(),
                    received = total,
                    "client too slow sending a streamed request body (WASMBOX_BODY_READ_TIMEOUT_MS, WASMBOX_MIN_DATA_RATE); 408, connection closed"
                );
                return Err(ApiError::BodyTimeout { timeout_ms: bounds.time.timeout.as_millis() as u64 });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ApiError::BadBody(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue }; // trailers
        total = total.saturating_add(data.len() as u64);
        if total > limit {
            linger(body, bounds);
            return Err(ApiError::BodyTooLarge { limit });
        }
        let waiting = Instant::now();
        let mut rest = data;
        while !rest.is_empty() {
            let piece = rest.split_to(rest.len().min(wasmbox_protocol::MAX_REQUEST_PIECE));
            if pieces.send(Some(piece)).await.is_err() {
                return Ok(());
            }
        }
        // The function's pace is not the client's: the clock restarts where it stopped.
        started += waiting.elapsed();
        last = Instant::now();
    }
    let _ = pieces.send(None).await;
    Ok(())
}

/// Reads and discards what is left of a refused body, in the background, within
/// [`LINGER_BYTES`] and the read bounds: nothing of it is kept.
fn linger(mut body: Incoming, bounds: ReadBounds) {
    if body.is_end_stream() || body.size_hint().lower() > LINGER_BYTES {
        return;
    }
    tokio::spawn(async move {
        let started = Instant::now();
        let (mut seen, mut last) = (0u64, started);
        while seen <= LINGER_BYTES {
            let deadline = bounds.time.deadline(started, last, seen);
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                    last = Instant::now();
                }
                _ => return,
            }
        }
    });
}

fn overloaded() -> ApiError {
    ApiError::Overloaded { resource: "buffers" }
}
