//! A client connection's socket with a bound on writing to it: a client that does not read
//! its response must not hold the connection (and the response in memory) forever.
//!
//! When the socket stops taking bytes (a write would block), a backlog starts. Within it,
//! a write that makes no progress for `WASMBOX_RESPONSE_WRITE_TIMEOUT_MS` fails, as
//! nginx's `send_timeout` does, and so does a client that reads but slower than
//! `WASMBOX_MIN_DATA_RATE` once that timeout has passed: by `timeout + bytes / rate` after
//! the backlog started it must have taken `bytes`. A write that goes through at once ends
//! the backlog. The failed write closes the connection with a reset: what the kernel still
//! buffered for that client is dropped at once, not trickled out to it. It is logged once.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The write bounds of client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteBounds {
    pub timeout: Duration,
    /// Bytes per second a client must take once `timeout` has passed; 0: no minimum.
    pub min_rate: u64,
}

impl WriteBounds {
    /// When a transfer that started at `since` and has moved `bytes` since, with its last
    /// progress at `last`, has taken too long.
    pub fn deadline(&self, since: Instant, last: Instant, bytes: u64) -> Instant {
        // Saturating: no setting or byte count can overflow the clock.
        let far = |at: Instant| at + Duration::from_secs(86_400 * 365);
        let idle = last.checked_add(self.timeout).unwrap_or_else(|| far(last));
        if self.min_rate == 0 {
            return idle;
        }
        let allowed = Duration::try_from_secs_f64(bytes as f64 / self.min_rate as f64).unwrap_or(Duration::MAX);
        let by_rate = since.checked_add(self.timeout.saturating_add(allowed)).unwrap_or_else(|| far(since));
        idle.min(by_rate)
    }
}

/// How slow a client may be: body reads and response writes (`WASMBOX_BODY_READ_TIMEOUT_MS`,
/// `WASMBOX_RESPONSE_WRITE_TIMEOUT_MS`, `WASMBOX_MIN_DATA_RATE`).
pub fn client_bounds(config: &crate::config::Config) -> (WriteBounds, WriteBounds) {
    let bounds = |ms| WriteBounds { timeout: Duration::from_millis(ms), min_rate: config.min_data_rate };
    (bounds(config.body_read_timeout_ms), bounds(config.response_write_timeout_ms))
}

/// A socket that can be closed with a reset (`SO_LINGER` 0): its unsent bytes are dropped
/// instead of being delivered at the pace of a client that has already been cut off.
pub trait Abort {
    fn abort_on_close(&self);
}

impl Abort for tokio::net::TcpStream {
    fn abort_on_close(&self) {
        use nix::sys::socket::{setsockopt, sockopt::Linger};
        let reset = nix::libc::linger { l_onoff: 1, l_linger: 0 };
        if let Err(e) = setsockopt(self, Linger, &reset) {
            tracing::debug!(error = %e, "cannot set SO_LINGER 0 on a timed-out connection");
        }
    }
}

/// Counts what [`ClientIo`] cut off, for `/stats` and metrics.
pub trait OnTimeout: Send + Sync {
    fn response_timed_out(&self);
}

/// The backlog of one stalled transfer.
#[derive(Debug, Clone, Copy)]
struct Backlog {
    since: Instant,
    last: Instant,
    bytes: u64,
    /// The last write would have blocked.
    blocked: bool,
}

pub struct ClientIo<S> {
    inner: S,
    bounds: WriteBounds,
    peer: SocketAddr,
    backlog: Option<Backlog>,
    timer: Pin<Box<Sleep>>,
    timed_out: bool,
    counter: Arc<dyn OnTimeout>,
}

impl<S> ClientIo<S> {
    pub fn new(inner: S, bounds: WriteBounds, peer: SocketAddr, counter: Arc<dyn OnTimeout>) -> Self {
        ClientIo {
            inner,
            bounds,
            peer,
            backlog: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timed_out: false,
            counter,
        }
    }

    fn wrote(&mut self, n: usize) {
        match &mut self.backlog {
            Some(b) if b.blocked => {
                b.bytes += n as u64;
                b.last = Instant::now();
                b.blocked = false;
            }
            // Through without blocking: the client keeps up.
            _ => self.backlog = None,
        }
    }

    /// The write would block: arms the deadline; an error once it has passed.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>>
    where
        S: Abort,
    {
        let now = Instant::now();
        let backlog = self.backlog.get_or_insert(Backlog { since: now, last: now, bytes: 0, blocked: true });
        backlog.blocked = true;
        let deadline = self.bounds.deadline(backlog.since, backlog.last, backlog.bytes);
        let (since, bytes) = (backlog.since, backlog.bytes);
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        if now < deadline && self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.timed_out = true;
        self.inner.abort_on_close();
        self.counter.response_timed_out();
        tracing::info!(
            peer = %self.peer,
            stalled_ms = now.duration_since(since).as_millis() as u64,
            bytes_taken = bytes,
            "client too slow taking its response (WASMBOX_RESPONSE_WRITE_TIMEOUT_MS, WASMBOX_MIN_DATA_RATE); connection closed"
        );
        Poll::Ready(Err(timed_out()))
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "response write timed out")
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Abort + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out()));
        }
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.blocked(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out()));
        }
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.blocked(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.timed_out {
            // Nothing more goes out; dropping the socket closes it.
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    impl Abort for tokio::io::DuplexStream {
        fn abort_on_close(&self) {}
    }

    #[derive(Default)]
    struct Count(AtomicU64);

    impl OnTimeout for Count {
        fn response_timed_out(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_deadline_is_the_idle_timeout_or_the_minimum_rate() {
        let t0 = Instant::now();
        let b = WriteBounds { timeout: Duration::from_secs(10), min_rate: 1000 };
        // Nothing moved: the timeout from the start.
        assert_eq!(b.deadline(t0, t0, 0), t0 + Duration::from_secs(10));
        // 5000 bytes buy 5 s more, as long as the last progress is recent enough.
        let last = t0 + Duration::from_secs(12);
        assert_eq!(b.deadline(t0, last, 5000), t0 + Duration::from_secs(15));
        // A trickle that keeps progressing still runs out of rate.
        assert_eq!(b.deadline(t0, t0 + Duration::from_secs(30), 1), t0 + Duration::from_millis(10_001));
        // A burst followed by silence runs out of idle time.
        assert_eq!(b.deadline(t0, t0, 1 << 30), t0 + Duration::from_secs(10));
        let no_rate = WriteBounds { timeout: Duration::from_secs(10), min_rate: 0 };
        assert_eq!(no_rate.deadline(t0, last, 1), last + Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_is_cut_off_and_a_fast_one_is_not() {
        let bounds = WriteBounds { timeout: Duration::from_millis(200), min_rate: 1 << 20 };
        let counter = Arc::new(Count::default());
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut io = ClientIo::new(ours, bounds, peer, counter.clone());
        // The peer reads everything: 1 MiB goes through whatever the buffer size.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 1 << 20];
            theirs.read_exact(&mut got).await.map(|_| theirs)
        });
        io.write_all(&vec![7u8; 1 << 20]).await.unwrap();
        let mut theirs = reader.await.unwrap().unwrap();
        assert_eq!(counter.0.load(Ordering::Relaxed), 0);
        // Now the peer stops reading: the write fails after about the timeout.
        let started = std::time::Instant::now();
        let err = io.write_all(&vec![7u8; 1 << 20]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(5), "{took:?}");
        assert_eq!(counter.0.load(Ordering::Relaxed), 1);
        // And stays failed.
        assert!(io.write_all(b"x").await.is_err());
        let _ = theirs.read(&mut [0u8; 16]).await;
    }
}
