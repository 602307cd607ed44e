//! The HTTP/1.1 front end: accept loop, connection limit, per-connection service, graceful
//! shutdown.
//!
//! What bounds a client before any worker is involved:
//! - `WASMBOX_HEADER_READ_TIMEOUT_MS`: hyper's header read timer starts when the connection
//!   is ready for a request head (at accept, and on a kept-alive connection once the previous
//!   response is written), not at the first byte. So it bounds a head dribbled byte by byte,
//!   a connection that never sends anything, and an idle keep-alive connection alike.
//! - `WASMBOX_MAX_HEADER_BYTES`: a longer request head, or more than hyper's 100 headers, is
//!   answered 431 and the connection closed.
//! - `WASMBOX_MAX_CONNECTIONS`: one semaphore permit per accepted connection, held until it
//!   closes. At the limit the loop stops calling `accept` until a permit frees, so new
//!   connections wait in the kernel's listen backlog (and past it, the kernel drops SYNs and
//!   clients retry), the way nginx's `worker_connections` or Go's `LimitListener` behave.
//! - `WASMBOX_MAX_BODY_BYTES` is enforced while reading the body (`routes::read_limited`).

pub mod admin;
pub mod error;
pub mod request;
pub mod routes;
pub mod sessions;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use nix::errno::Errno;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::App;

/// Smallest `WASMBOX_MAX_HEADER_BYTES`: hyper's floor for its read buffer, and what ordinary
/// clients (cookies, bearer tokens) need.
pub const MIN_HEADER_BYTES: usize = 8192;
/// Largest `WASMBOX_MAX_HEADER_BYTES`: below hyper's default read buffer limit (about
/// 400 KiB), so the configured limit is always the one that applies.
pub const MAX_HEADER_BYTES_CEILING: usize = 256 << 10;
/// Largest `WASMBOX_MAX_CONNECTIONS`.
pub const MAX_CONNECTIONS_CEILING: usize = 1 << 20;

/// How long accepting pauses after a resource error (EMFILE, ENFILE, ENOBUFS, ENOMEM).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this interval for a condition that can repeat quickly.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Client connections open against `WASMBOX_MAX_CONNECTIONS`.
#[derive(Debug)]
pub struct Connections {
    limit: usize,
    permits: Arc<Semaphore>,
    limit_reached: AtomicU64,
}

/// The connection counters in `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionStats {
    pub open_connections: usize,
    pub max_connections: usize,
    /// Times accepting paused because every connection slot was taken.
    pub limit_reached: u64,
}

impl Connections {
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, MAX_CONNECTIONS_CEILING);
        Connections { limit, permits: Arc::new(Semaphore::new(limit)), limit_reached: AtomicU64::new(0) }
    }

    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open_connections: self.limit.saturating_sub(self.permits.available_permits()),
            max_connections: self.limit,
            limit_reached: self.limit_reached.load(Ordering::Relaxed),
        }
    }

    /// A free slot, or `None` right away when all are taken.
    fn try_open(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Waits for a slot to free.
    async fn open(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }
}

/// Serves until `shutdown` resolves, then stops accepting and lets open connections finish
/// their in-flight requests (bounded by the drain timeout). Returns whether every
/// connection closed in time.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) -> bool {
    let graceful = GracefulShutdown::new();
    let builder = connection_builder(&app);
    ensure_fd_headroom(app.config.max_connections, app.config.worker_count());
    let mut last_limit_warning: Option<Instant> = None;
    let mut last_accept_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        // A slot first, then accept: at the limit, connections wait in the listen backlog.
        let permit = match app.connections.try_open() {
            Some(permit) => permit,
            None => {
                app.connections.limit_reached.fetch_add(1, Ordering::Relaxed);
                if due(&mut last_limit_warning) {
                    tracing::warn!(
                        limit = app.connections.limit,
                        "connection limit reached (WASMBOX_MAX_CONNECTIONS); not accepting until a connection closes"
                    );
                }
                tokio::select! {
                    permit = app.connections.open() => match permit {
                        Some(permit) => permit,
                        None => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) if is_connection_error(&e) => {
                        // That one connection failed between SYN and accept; the next is fine.
                        tracing::debug!(error = %e, "accepted connection was already broken");
                        continue;
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning; a connection that
                        // closes meanwhile frees what the next accept needs.
                        if due(&mut last_accept_warning) {
                            let open = app.connections.stats().open_connections;
                            tracing::warn!(error = %e, open, "accept failed; backing off");
                        }
                        drop(permit);
                        tokio::select! {
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                            () = &mut shutdown => break,
                        }
                    }
                };
                let _ = stream.set_nodelay(true);
                let service_app = app.clone();
                let service = service_fn(move |req| {
                    let app = service_app.clone();
                    async move { Ok::<_, std::convert::Infallible>(routes::handle(app, req).await) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    // Header timeouts, 431s and client resets all end here; logging them
                    // above debug would let any client flood the log.
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    app.begin_drain();
    let all_closed = graceful.shutdown();
    tokio::pin!(all_closed);
    if tokio::time::timeout(app.config.drain_timeout(), &mut all_closed).await.is_ok() {
        return true;
    }
    // Drain timed out: stop the workers still running, then give their connections a
    // moment to write the resulting 503s, so no request goes unanswered.
    tracing::warn!("drain timeout passed with invocations still running; stopping them");
    app.pool.shutdown(Duration::from_millis(app.config.kill_grace_ms)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut all_closed).await;
    false
}

/// HTTP/1.1 with the header read timeout and head size limit of the configuration.
fn connection_builder(app: &App) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(app.config.header_read_timeout_ms))
        .max_header_size(app.config.max_header_bytes);
    builder
}

/// Connections the health listener serves at once: probes and scrapers, not clients.
const HEALTH_CONNECTIONS: usize = 64;

/// Serves `WASMBOX_HEALTH_LISTEN` (only /healthz, /ready, /metrics) until `stop` resolves:
/// through the main listener's drain it keeps answering, so probes see /ready turn 503.
pub async fn serve_health(listener: TcpListener, app: Arc<App>, stop: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let builder = connection_builder(&app);
    let slots = Arc::new(Semaphore::new(HEALTH_CONNECTIONS));
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            () = &mut stop => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "health listener accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service_app = app.clone();
        let service = service_fn(move |req| {
            let app = service_app.clone();
            async move { Ok::<_, std::convert::Infallible>(routes::handle_health(app, req).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

/// Whether a warning last given at `last` may be given again now (and records it).
fn due(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < WARN_INTERVAL) {
        return false;
    }
    *last = Some(now);
    true
}

/// Errors `accept` reports about one incoming connection rather than the listener: Linux
/// passes pending network errors of the new socket through `accept` (see accept(2)), and
/// the right response is to accept the next one.
fn is_connection_error(e: &std::io::Error) -> bool {
    let Some(code) = e.raw_os_error() else {
        return matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset);
    };
    matches!(
        Errno::from_raw(code),
        Errno::ECONNABORTED
            | Errno::ECONNRESET
            | Errno::EPROTO
            | Errno::EPERM
            | Errno::ENETDOWN
            | Errno::ENOPROTOOPT
            | Errno::EHOSTDOWN
            | Errno::ENONET
            | Errno::EHOSTUNREACH
            | Errno::EOPNOTSUPP
            | Errno::ENETUNREACH
    )
}

/// File descriptors the supervisor needs besides client connections: the listener, a socket
/// and a few cgroup files per worker, logs, the functions directory, the blocking pool.
fn reserved_fds(workers: usize) -> u64 {
    64 + 16 * workers as u64
}

/// Raises the soft `RLIMIT_NOFILE` (up to the hard limit) when it is too low for
/// `max_connections`, so the connection limit, not EMFILE, is what stops accepting; warns
/// when even the hard limit is too low.
fn ensure_fd_headroom(max_connections: usize, workers: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = max_connections as u64 + reserved_fds(workers);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft >= needed {
        return;
    }
    let raised = needed.min(hard);
    if raised > soft && setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
        tracing::info!(from = soft, to = raised, "raised the open file limit for WASMBOX_MAX_CONNECTIONS");
    }
    if raised < needed {
        tracing::warn!(
            max_connections,
            open_file_limit = raised,
            needed,
            "the open file limit is below WASMBOX_MAX_CONNECTIONS plus what the supervisor needs; \
             accept will fail with EMFILE before the connection limit is reached"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_counted_and_freed() {
        let c = Connections::new(2);
        let a = c.try_open().unwrap();
        let _b = c.try_open().unwrap();
        assert!(c.try_open().is_none());
        assert_eq!(c.stats(), ConnectionStats { open_connections: 2, max_connections: 2, limit_reached: 0 });
        drop(a);
        assert_eq!(c.stats().open_connections, 1);
        assert!(c.try_open().is_some());
        // Out-of-range limits are clamped rather than panicking the semaphore.
        assert_eq!(Connections::new(0).stats().max_connections, 1);
        assert_eq!(Connections::new(usize::MAX).stats().max_connections, MAX_CONNECTIONS_CEILING);
    }

    #[test]
    fn per_connection_accept_errors_are_told_from_resource_exhaustion() {
        let os = |e: Errno| std::io::Error::from_raw_os_error(e as i32);
        for e in [Errno::ECONNABORTED, Errno::ECONNRESET, Errno::EPROTO, Errno::ENETUNREACH] {
            assert!(is_connection_error(&os(e)), "{e}");
        }
        for e in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM, Errno::EBADF] {
            assert!(!is_connection_error(&os(e)), "{e}");
        }
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut last = None;
        assert!(due(&mut last));
        assert!(!due(&mut last));
        last = Some(Instant::now() - WARN_INTERVAL - Duration::from_millis(1));
        assert!(due(&mut last));
    }
}
