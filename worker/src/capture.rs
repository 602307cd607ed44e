//! Captured guest stdout and stderr, bounded in memory.
//!
//! Stdout is the response body, so it is all-or-nothing: a write past the cap traps the
//! guest and the invocation reports `output_too_large` rather than a silently cut body.
//! Stderr is diagnostics: it never fails the guest and keeps only its most recent bytes,
//! since the end of stderr is what explains a crash.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Largest single write the guest is offered; WASI preview1 writes come in 4 KiB pieces.
const WRITE_PERMIT: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Fail the guest past the limit.
    Strict,
    /// Keep the last `limit` bytes.
    Tail,
}

#[derive(Debug)]
struct Buffer {
    mode: Mode,
    limit: usize,
    data: Vec<u8>,
    /// Bytes discarded from the front (tail mode) or refused (strict mode).
    dropped: u64,
    overflowed: bool,
}

/// A capture sink handed to the WASI context; clones share one buffer.
#[derive(Debug, Clone)]
pub struct Capture(Arc<Mutex<Buffer>>);

/// What a capture held when the invocation ended.
#[derive(Debug, Default)]
pub struct Captured {
    pub data: Vec<u8>,
    pub dropped: u64,
    pub overflowed: bool,
}

impl Capture {
    /// Stdout: at most `limit` bytes, a write beyond it traps the guest.
    pub fn strict(limit: u64) -> Self {
        Self::new(Mode::Strict, limit)
    }

    /// Stderr: keeps the last `limit` bytes and never fails.
    pub fn tail(limit: u64) -> Self {
        Self::new(Mode::Tail, limit)
    }

    fn new(mode: Mode, limit: u64) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Capture(Arc::new(Mutex::new(Buffer { mode, limit, data: Vec::new(), dropped: 0, overflowed: false })))
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A panic while holding this lock cannot leave the buffer inconsistent.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends guest output; `Err` only in strict mode past the limit.
    pub fn append(&self, bytes: &[u8]) -> Result<(), Overflow> {
        let mut buf = self.lock();
        match buf.mode {
            Mode::Strict => {
                if bytes.len() > buf.limit - buf.data.len() {
                    buf.overflowed = true;
                    buf.dropped += bytes.len() as u64;
                    return Err(Overflow { limit: buf.limit as u64 });
                }
                buf.data.extend_from_slice(bytes);
            }
            Mode::Tail => {
                buf.data.extend_from_slice(bytes);
                // Trim only once the buffer doubles, so trimming stays amortized O(1).
                if buf.data.len() > buf.limit.saturating_mul(2).max(WRITE_PERMIT) {
                    let excess = buf.data.len() - buf.limit;
                    buf.data.drain(..excess);
                    buf.dropped += excess as u64;
                }
            }
        }
        Ok(())
    }

    /// Counts `bytes` written and discarded before what is appended next (a tail capture
    /// given only the end of a longer output).
    pub fn skipped(&self, bytes: u64) {
        self.lock().dropped += bytes;
    }

    /// Takes what was captured, leaving the capture empty.
    pub fn take(&self) -> Captured {
        let mut buf = self.lock();
        let mut data = std::mem::take(&mut buf.data);
        let mut dropped = buf.dropped;
        if buf.mode == Mode::Tail && data.len() > buf.limit {
            let excess = data.len() - buf.limit;
            data.drain(..excess);
            dropped += excess as u64;
        }
        Captured { data, dropped, overflowed: buf.overflowed }
    }
}

/// Strict capture refused a write.
#[derive(Debug, thiserror::Error)]
#[error("output exceeds the limit of {limit} bytes")]
pub struct Overflow {
    pub limit: u64,
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes).map_err(|e| StreamError::trap(&e.to_string()))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(self.append(buf).map(|()| buf.len()).map_err(|e| io::Error::new(io::ErrorKind::StorageFull, e)))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_capture_refuses_past_limit_and_keeps_what_fit() {
        let c = Capture::strict(10);
        c.append(b"0123456789").unwrap();
        assert!(c.append(b"x").is_err());
        let out = c.take();
        assert_eq!(out.data, b"0123456789");
        assert!(out.overflowed);
        assert_eq!(out.dropped, 1);
    }

    #[test]
    fn tail_capture_keeps_the_last_bytes() {
        let c = Capture::tail(4);
        for chunk in (0..100_000u32).map(|i| i.to_string()) {
            c.append(chunk.as_bytes()).unwrap();
        }
        let out = c.take();
        assert_eq!(out.data, b"9999");
        assert!(!out.overflowed);
        let total: u64 = (0..100_000u32).map(|i| i.to_string().len() as u64).sum();
        assert_eq!(out.dropped + 4, total);
    }
}
