//! The HTTP/1.1 front end: accept loop, connection limit and reserve, per-connection
//! service, graceful shutdown.
//!
//! What bounds a client before any worker is involved:
//! - `WASMBOX_HEADER_READ_TIMEOUT_MS`: hyper's header read timer starts when the connection
//!   is ready for a request head (at accept, and on a kept-alive connection once the previous
//!   response is written), not at the first byte. So it bounds a head dribbled byte by byte,
//!   a connection that never sends anything, and an idle keep-alive connection alike.
//! - `WASMBOX_MAX_HEADER_BYTES`: a longer request head, or more than hyper's 100 headers, is
//!   answered 431 and the connection closed.
//! - `WASMBOX_BODY_READ_TIMEOUT_MS`, `WASMBOX_RESPONSE_WRITE_TIMEOUT_MS` and
//!   `WASMBOX_MIN_DATA_RATE`: a body that stalls or trickles is a 408 ([`body`]); a response
//!   the client does not take closes the connection ([`io`]).
//! - `WASMBOX_MAX_BUFFERED_BYTES`: what all clients' bodies and responses may hold in memory
//!   together ([`crate::budget`]).
//! - `WASMBOX_MAX_CONNECTIONS`: one semaphore permit per accepted connection, held until it
//!   closes. At the limit up to `WASMBOX_RESERVE_CONNECTIONS` more are accepted, each for one
//!   request: `/healthz`, `/ready` (503, reason `connections`) and `/metrics` answer as
//!   usual, anything else gets 503 `overloaded`, so a load balancer sees the replica is full
//!   instead of hearing nothing. Past the reserve the loop stops calling `accept` until a
//!   permit frees, so new connections wait in the kernel's listen backlog (and past it, the
//!   kernel drops SYNs and clients retry), the way nginx's `worker_connections` or Go's
//!   `LimitListener` behave.
//! - `WASMBOX_MAX_BODY_BYTES` is enforced while reading the body.

pub mod admin;
pub mod body;
pub mod component;
pub mod error;
pub mod io;
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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::App;

pub use crate::config::{MAX_CONNECTIONS_CEILING, MAX_HEADER_BYTES_CEILING, MIN_HEADER_BYTES};

/// How long accepting pauses after a resource error (EMFILE, ENFILE, ENOBUFS, ENOMEM).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this interval for a condition that can repeat quickly.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Client connections open against `WASMBOX_MAX_CONNECTIONS` and its reserve, and what
/// slow clients cost.
#[derive(Debug)]
pub struct Connections {
    limit: usize,
    permits: Arc<Semaphore>,
    reserve_limit: usize,
    reserve: Arc<Semaphore>,
    limit_reached: AtomicU64,
    reserve_accepted: AtomicU64,
    body_timeouts: AtomicU64,
    response_timeouts: AtomicU64,
}

/// The connection counters in `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionStats {
    pub open_connections: usize,
    pub max_connections: usize,
    /// Connections open in the reserve (health endpoints only).
    pub reserve_connections: usize,
    pub max_reserve_connections: usize,
    /// Times accepting found every connection slot taken.
    pub limit_reached: u64,
    /// Connections accepted into the reserve.
    pub reserve_accepted: u64,
    /// Request bodies that stalled or trickled (408).
    pub body_timeouts: u64,
    /// Responses the client did not take in time (connection closed).
    pub response_timeouts: u64,
}

impl ConnectionStats {
    /// Every connection slot taken (the reserve aside).
    pub fn full(&self) -> bool {
        self.open_connections >= self.max_connections
    }
}

/// Which slot a connection holds.
enum Slot {
    Main(OwnedSemaphorePermit),
    Reserve(OwnedSemaphorePermit),
}

impl Connections {
    pub fn new(limit: usize, reserve: usize) -> Self {
        let limit = limit.clamp(1, MAX_CONNECTIONS_CEILING);
        let reserve_limit = reserve.min(MAX_CONNECTIONS_CEILING);
        Connections {
            limit,
            permits: Arc::new(Semaphore::new(limit)),
            reserve_limit,
            reserve: Arc::new(Semaphore::new(reserve_limit)),
            limit_reached: AtomicU64::new(0),
            reserve_accepted: AtomicU64::new(0),
            body_timeouts: AtomicU64::new(0),
            response_timeouts: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open_connections: self.limit.saturating_sub(self.permits.available_permits()),
            max_connections: self.limit,
            reserve_connections: self.reserve_limit.saturating_sub(self.reserve.available_permits()),
            max_reserve_connections: self.reserve_limit,
            limit_reached: self.limit_reached.load(Ordering::Relaxed),
            reserve_accepted: self.reserve_accepted.load(Ordering::Relaxed),
            body_timeouts: self.body_timeouts.load(Ordering::Relaxed),
            response_timeouts: self.response_timeouts.load(Ordering::Relaxed),
        }
    }

    /// A free slot, or `None` right away when all are taken.
    fn try_open(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.reserve.clone().try_acquire_owned().ok()
    }

    /// Waits for a slot to free, of either kind.
    async fn open(&self) -> Option<Slot> {
        tokio::select! {
            biased;
            main = self.permits.clone().acquire_owned() => main.ok().map(Slot::Main),
            reserve = self.reserve.clone().acquire_owned() => reserve.ok().map(Slot::Reserve),
        }
    }

    pub fn body_timed_out(&self) {
        self.body_timeouts.fetch_add(1, Ordering::Relaxed);
    }
}

impl io::OnTimeout for Connections {
    fn response_timed_out(&self) {
        self.response_timeouts.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long a reserve connection may take to send its one request head.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves until `shutdown` resolves, then stops accepting and lets open connections finish
/// their in-flight requests (bounded by the drain timeout). Returns whether every
/// connection closed in time.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) -> bool {
    let graceful = GracefulShutdown::new();
    let builder = connection_builder(&app);
    let reserve_builder = reserve_builder(&app);
    ensure_fd_headroom(app.config.max_connections + app.config.reserve_connections as usize, app.config.worker_count());
    let mut last_limit_warning: Option<Instant> = None;
    let mut last_accept_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        // A slot first, then accept: past the reserve, connections wait in the listen backlog.
        let slot = match app.connections.try_open() {
            Some(permit) => Slot::Main(permit),
            None => {
                app.connections.limit_reached.fetch_add(1, Ordering::Relaxed);
                if due(&mut last_limit_warning) {
                    tracing::warn!(
                        limit = app.connections.limit,
                        reserve = app.connections.reserve_limit,
                        "connection limit reached (WASMBOX_MAX_CONNECTIONS); new connections get health endpoints only, past the reserve none until one closes"
                    );
                }
                match app.connections.try_reserve() {
                    Some(permit) => Slot::Reserve(permit),
                    None => tokio::select! {
                        slot = app.connections.open() => match slot {
                            Some(slot) => slot,
                            None => break,
                        },
                        () = &mut shutdown => break,
                    },
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
                        drop(slot);
                        tokio::select! {
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                            () = &mut shutdown => break,
                        }
                    }
                };
                let _ = stream.set_nodelay(true);
                // The slot was taken before accept, which may have waited: a connection
                // slot freed meanwhile serves this connection fully.
                let slot = match slot {
                    Slot::Reserve(reserve) => match app.connections.try_open() {
                        Some(permit) => {
                            drop(reserve);
                            Slot::Main(permit)
                        }
                        None => Slot::Reserve(reserve),
                    },
                    main => main,
                };
                let io = TokioIo::new(client_io(&app, stream, peer));
                let service_app = app.clone();
                match slot {
                    Slot::Main(permit) => {
                        let service = service_fn(move |req| {
                            let app = service_app.clone();
                            async move { Ok::<_, std::convert::Infallible>(routes::handle(app, req, peer).await) }
                        });
                        let conn = graceful.watch(builder.serve_connection(io, service));
                        tokio::spawn(connection_task(conn, permit, peer));
                    }
                    Slot::Reserve(permit) => {
                        app.connections.reserve_accepted.fetch_add(1, Ordering::Relaxed);
                        let service = service_fn(move |req| {
                            let app = service_app.clone();
                            async move { Ok::<_, std::convert::Infallible>(routes::boxed(routes::handle_reserve(app, req))) }
                        });
                        let conn = graceful.watch(reserve_builder.serve_connection(io, service));
                        tokio::spawn(connection_task(conn, permit, peer));
                    }
                }
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

/// Runs one connection to its end, holding its slot.
async fn connection_task<E: std::fmt::Display>(
    conn: impl Future<Output = Result<(), E>>,
    permit: OwnedSemaphorePermit,
    peer: std::net::SocketAddr,
) {
    // Header timeouts, 431s and client resets all end here; logging them above debug
    // would let any client flood the log (slow clients are logged where they are cut off).
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    drop(permit);
}

/// The accepted socket, with the response write bounds of the configuration.
fn client_io(app: &Arc<App>, stream: TcpStream, peer: std::net::SocketAddr) -> io::ClientIo<TcpStream> {
    let (_, write) = io::client_bounds(&app.config);
    io::ClientIo::new(stream, write, peer, app.connections.clone())
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

/// A reserve connection serves one request and must send it quickly: a client that holds
/// it idle would take the health checks' place.
fn reserve_builder(app: &App) -> http1::Builder {
    let mut builder = connection_builder(app);
    builder
        .keep_alive(false)
        .header_read_timeout(Duration::from_millis(app.config.header_read_timeout_ms).min(RESERVE_HEADER_TIMEOUT));
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
        let (stream, peer) = tokio::select! {
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
            async move { Ok::<_, std::convert::Infallible>(routes::boxed(routes::handle_health(app, req).await)) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(client_io(&app, stream, peer)), service));
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
        let c = Connections::new(2, 1);
        let a = c.try_open().unwrap();
        let _b = c.try_open().unwrap();
        assert!(c.try_open().is_none());
        assert!(c.stats().full());
        let r = c.try_reserve().unwrap();
        assert!(c.try_reserve().is_none());
        let stats = c.stats();
        assert_eq!((stats.open_connections, stats.max_connections, stats.reserve_connections), (2, 2, 1));
        drop(a);
        drop(r);
        assert_eq!((c.stats().open_connections, c.stats().reserve_connections), (1, 0));
        assert!(!c.stats().full());
        assert!(c.try_open().is_some());
        // Out-of-range limits are clamped rather than panicking the semaphore.
        assert_eq!(Connections::new(0, 0).stats().max_connections, 1);
        assert_eq!(Connections::new(usize::MAX, 0).stats().max_connections, MAX_CONNECTIONS_CEILING);
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
