//! The HTTP/1.1 front end: accept loop, per-connection service, graceful shutdown.

pub mod error;
pub mod request;
pub mod routes;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::App;

/// Serves until `shutdown` resolves, then stops accepting and lets open connections finish
/// their in-flight requests (bounded by the drain timeout). Returns whether every
/// connection closed in time.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) -> bool {
    let graceful = GracefulShutdown::new();
    let header_timeout = Duration::from_millis(app.config.header_read_timeout_ms);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, std::convert::Infallible>(routes::handle(app, req).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
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
