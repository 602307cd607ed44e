//! The log's way out: lines go into a bounded buffer in memory, and a thread of their own
//! writes them to stderr, many lines per `write`. The request path then never makes a
//! system call for its access log line and never waits on a slow or blocked stderr (a
//! container runtime's log pipe that nobody drains): it copies the line and goes on.
//!
//! The per-request access lines (events with a `total_us` field) are written within
//! [`FLUSH_EVERY`] of being logged, or at once when the buffer holds [`FLUSH_AT`] bytes; every
//! other line (startup, warnings, errors, the admin API's) and, when stderr is a terminal,
//! every line, is written at once, taking the access lines before it along. A buffer at [`MAX_BUFFERED`] drops new lines and counts them
//! ([`LogWriter::dropped`], `wasmbox_log_lines_dropped_total`); the writer thread says how
//! many it dropped once it can write again. [`LogGuard`] writes what is left when it is
//! dropped, waiting at most [`FINAL_FLUSH`] for stderr.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// The longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this full is written out at once.
pub const FLUSH_AT: usize = 64 << 10;
/// Lines beyond this many buffered bytes are dropped (and counted) until stderr takes some.
pub const MAX_BUFFERED: usize = 4 << 20;
/// The field that marks an access line, the one kind of line that waits in the buffer.
pub const ACCESS_FIELD: &str = "total_us";

/// How long the last flush at exit may wait for stderr.
pub const FINAL_FLUSH: Duration = Duration::from_secs(2);

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread: the buffer wants writing now, or it is time to stop.
    wake: Condvar,
    dropped: AtomicU64,
    /// Write every line at once (stderr is a terminal).
    immediate: bool,
    /// The longest a line waits ([`FLUSH_EVERY`]).
    interval: Duration,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    /// Set when a line asks to be written without waiting for the interval.
    urgent: bool,
    closing: bool,
    /// Dropped lines not yet reported in the log itself.
    unreported: u64,
}

/// The [`MakeWriter`] for the log: cheap to clone, every clone fills the same buffer.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes what is buffered and stops the writer thread when dropped.
pub struct LogGuard {
    shared: Arc<Shared>,
    done: Option<std::sync::mpsc::Receiver<()>>,
}

/// Starts the writer thread for `out` (stderr in the server).
pub fn start<W: Write + Send + 'static>(out: W, immediate: bool) -> io::Result<(LogWriter, LogGuard)> {
    start_with(out, immediate, FLUSH_EVERY)
}

fn start_with<W: Write + Send + 'static>(
    out: W,
    immediate: bool,
    interval: Duration,
) -> io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        interval,
        state: Mutex::new(State { buffer: Vec::with_capacity(FLUSH_AT), ..State::default() }),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        immediate,
    });
    let (done_tx, done) = std::sync::mpsc::channel();
    let thread_shared = shared.clone();
    std::thread::Builder::new().name("wasmbox-log".into()).spawn(move || {
        write_out(&thread_shared, out);
        let _ = done_tx.send(());
    })?;
    Ok((LogWriter { shared: shared.clone() }, LogGuard { shared, done: Some(done) }))
}

impl LogWriter {
    /// Lines dropped because stderr did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Lines dropped by every log writer of this process.
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Log lines this process dropped because stderr did not keep up.
pub fn dropped_total() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer thread: takes the buffer whole (leaving an empty one of the same capacity) and
/// writes it, until told to stop.
fn write_out<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::with_capacity(FLUSH_AT);
    loop {
        let (closing, unreported) = {
            let mut state = lock(shared);
            if !state.closing && !state.urgent {
                state = shared
                    .wake
                    .wait_timeout(state, shared.interval)
                    .map(|(s, _)| s)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            std::mem::swap(&mut state.buffer, &mut spare);
            state.urgent = false;
            (state.closing, std::mem::take(&mut state.unreported))
        };
        // A failed write loses those lines; there is nowhere else to say so.
        let _ = out.write_all(&spare);
        if unreported > 0 {
            let _ = writeln!(
                out,
                "WARN wasmbox_supervisor::logwriter: {unreported} log lines dropped: stderr did not keep up"
            );
        }
        let _ = out.flush();
        spare.clear();
        if spare.capacity() > MAX_BUFFERED {
            spare = Vec::with_capacity(FLUSH_AT);
        }
        if closing {
            return;
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        lock(&self.shared).closing = true;
        self.shared.wake.notify_one();
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(FINAL_FLUSH);
        }
    }
}

/// One line on its way into the buffer (the formatter writes each event with one call).
pub struct Line<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut state = lock(self.shared);
        if state.buffer.len() + bytes.len() > MAX_BUFFERED {
            state.unreported += 1;
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes.len());
        }
        state.buffer.extend_from_slice(bytes);
        let wake = self.urgent || self.shared.immediate || state.buffer.len() >= FLUSH_AT;
        if wake && !state.urgent {
            state.urgent = true;
            drop(state);
            self.shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line { shared: &self.shared, urgent: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line<'a> {
        Line { shared: &self.shared, urgent: meta.fields().field(ACCESS_FIELD).is_none() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A stderr stand-in: what was written, and a switch that blocks writes.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        blocked: Arc<Mutex<bool>>,
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            while *self.blocked.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn text(sink: &Sink) -> String {
        String::from_utf8(sink.written.lock().unwrap().clone()).unwrap()
    }

    fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_come_out_whole_in_order_and_all_at_exit() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone(), false).unwrap();
        for i in 0..1000 {
            writer.make_writer().write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text(&sink), expected);
    }

    #[test]
    fn an_access_line_waits_for_the_interval_and_other_lines_do_not() {
        let sink = Sink::default();
        let (writer, _guard) = start_with(sink.clone(), false, Duration::from_millis(20)).unwrap();
        writer.make_writer().write_all(b"an access line\n").unwrap();
        until("the interval writes it", || text(&sink) == "an access line\n");
        // An interval that cannot pass during the test: only the other line makes them appear.
        let sink = Sink::default();
        let (writer, _guard) = start_with(sink.clone(), false, Duration::from_secs(3600)).unwrap();
        let subscriber = tracing_subscriber::fmt().with_writer(writer).with_ansi(false).without_time().finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(total_us = 5u64, "an access line");
            tracing::info!("module uploaded");
        });
        until("the other line writes both, in order", || {
            let out = text(&sink);
            out.find("an access line").zip(out.find("module uploaded")).is_some_and(|(a, w)| a < w)
        });
    }

    #[test]
    fn a_blocked_stderr_costs_lines_not_the_caller() {
        let sink = Sink::default();
        *sink.blocked.lock().unwrap() = true;
        let (writer, guard) = start(sink.clone(), false).unwrap();
        let line = vec![b'x'; 1023];
        let started = Instant::now();
        // Three times the bound, while nothing can be written: the caller never waits.
        for _ in 0..(3 * MAX_BUFFERED / 1024) {
            let mut with_newline = line.clone();
            with_newline.push(b'\n');
            writer.make_writer().write_all(&with_newline).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the writes did not wait for stderr");
        let dropped = writer.dropped();
        assert!(dropped >= (MAX_BUFFERED / 1024) as u64 - 1, "{dropped} dropped");
        *sink.blocked.lock().unwrap() = false;
        drop(guard);
        let out = text(&sink);
        assert!(out.contains(&format!("{dropped} log lines dropped")), "the loss is reported");
        // The buffer, and what the writer thread had taken out of it when stderr blocked.
        assert!(out.len() <= 2 * MAX_BUFFERED + 200, "at most the bound was held: {}", out.len());
    }
}
