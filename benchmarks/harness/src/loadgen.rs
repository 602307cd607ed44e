//! The load generator: HTTP/1.1 keep-alive connections on loopback, closed loop (C
//! connections, each sending its next request when the last is answered) or open loop (a
//! fixed request rate, latency counted from when each request was due, so a slow server
//! cannot hide its queueing). Every run is bounded in time and in requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::stats::Recorder;

/// One kind of request.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// How load is offered.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// `connections` connections, each with one request in flight at a time.
    Closed { connections: usize, duration: Duration, max_requests: u64 },
    /// `rate` requests per second on up to `connections` connections.
    Open { rate: f64, connections: usize, duration: Duration, max_requests: u64 },
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub recorder: Recorder,
    /// Requests started.
    pub sent: u64,
    /// Responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no response (connection refused, reset, timed out).
    pub failed: u64,
    pub elapsed: Duration,
}

impl Measurement {
    /// Requests answered with a 2xx status.
    pub fn ok(&self) -> u64 {
        self.statuses.iter().filter(|(s, _)| (200..300).contains(*s)).map(|(_, n)| n).sum()
    }

    /// Adds another run of the same kind (a later round): counts add up, and so does the
    /// time, so throughput stays requests per second of measuring.
    pub fn absorb(&mut self, other: Measurement) {
        self.recorder.merge(&other.recorder);
        self.sent += other.sent;
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.failed += other.failed;
        self.elapsed += other.elapsed;
    }

    pub fn throughput(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Longest a single request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `load` against `target`. `progress` is told of every finished request.
pub async fn run(target: &Target, load: Load, progress: &indicatif::ProgressBar) -> anyhow::Result<Measurement> {
    match load {
        Load::Closed { connections, duration, max_requests } => {
            closed(target, connections.max(1), duration, max_requests, progress).await
        }
        Load::Open { rate, connections, duration, max_requests } => {
            open(target, rate, connections.max(1), duration, max_requests, progress).await
        }
    }
}

/// One keep-alive connection sending `target`'s request, reconnecting when it was closed.
/// The load generator keeps only each answer's status; [`Conn::send`] gives callers that
/// need more (headers, body) the whole response.
pub struct Conn {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// One finished request: its status, or `None` when it failed without one.
type Answer = Option<u16>;

/// A response read to its end.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// Header `name` as a number, if present and numeric.
    pub fn header_u64(&self, name: &str) -> Option<u64> {
        self.headers.get(name)?.to_str().ok()?.parse().ok()
    }
}

impl Conn {
    pub fn new(target: &Target) -> Conn {
        Conn { target: target.clone(), sender: None }
    }

    async fn connect(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.target.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        self.sender.as_mut().ok_or_else(|| anyhow::anyhow!("no connection"))
    }

    /// Sends one request and reads the whole response; its status, or `None` without one.
    async fn request(&mut self) -> Answer {
        self.send().await.ok().map(|reply| reply.status.as_u16())
    }

    /// Sends one request and reads the whole response (within [`REQUEST_TIMEOUT`]).
    pub async fn send(&mut self) -> anyhow::Result<Reply> {
        let attempt = async {
            let mut builder = Request::builder()
                .method(Method::POST)
                .uri(&self.target.path)
                .header(http::header::HOST, self.target.addr.to_string());
            for (k, v) in &self.target.headers {
                builder = builder.header(k, v);
            }
            let request = builder.body(Full::new(self.target.body.clone()))?;
            let sender = self.connect().await?;
            sender.ready().await?;
            let (parts, body) = sender.send_request(request).await?.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Reply { status: parts.status, headers: parts.headers, body })
        };
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}")));
        if reply.is_err() {
            // Whatever state the connection is in, start the next request on a new one.
            self.sender = None;
        }
        reply
    }
}

#[derive(Default)]
struct Tally {
    recorder: Recorder,
    sent: u64,
    statuses: BTreeMap<u16, u64>,
    failed: u64,
}

impl Tally {
    fn add(&mut self, answer: Answer, latency: Duration) {
        self.sent += 1;
        match answer {
            Some(status) => {
                *self.statuses.entry(status).or_default() += 1;
                if (200..300).contains(&status) {
                    self.recorder.record(latency);
                }
            }
            None => self.failed += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.recorder.merge(&other.recorder);
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.failed += other.failed;
        self.sent += other.sent;
    }

    fn into_measurement(self, elapsed: Duration) -> Measurement {
        Measurement { recorder: self.recorder, sent: self.sent, statuses: self.statuses, failed: self.failed, elapsed }
    }
}

async fn closed(
    target: &Target,
    connections: usize,
    duration: Duration,
    max_requests: u64,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Measurement> {
    let started = Instant::now();
    let deadline = started + duration;
    // Tickets: a connection takes one before each request, so at most `max_requests` start.
    let tickets = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (target, tickets, progress) = (target.clone(), tickets.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&target);
            let mut tally = Tally::default();
            while Instant::now() < deadline && tickets.fetch_add(1, Ordering::Relaxed) < max_requests {
                let t = Instant::now();
                let answer = conn.request().await;
                tally.add(answer, t.elapsed());
                progress.inc(1);
            }
            tally
        }));
    }
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await?);
    }
    Ok(tally.into_measurement(started.elapsed()))
}

async fn open(
    target: &Target,
    rate: f64,
    connections: usize,
    duration: Duration,
    max_requests: u64,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Measurement> {
    anyhow::ensure!(rate > 0.0 && rate.is_finite(), "rate must be positive");
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = ((duration.as_secs_f64() * rate) as u64).min(max_requests);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (target, rx, progress) = (target.clone(), rx.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&target);
            let mut tally = Tally::default();
            loop {
                let due = { rx.lock().await.recv().await };
                let Some(due) = due else { return tally };
                let answer = conn.request().await;
                // From when the request was due, not when a connection got to it.
                tally.add(answer, due.elapsed());
                progress.inc(1);
            }
        }));
    }
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        if tx.send(due).is_err() {
            break;
        }
    }
    drop(tx);
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await?);
    }
    // Every request dispatched was taken by a connection and ended one way or the other.
    anyhow::ensure!(tally.sent == total, "{} of {total} dispatched requests were not run", total - tally.sent);
    Ok(tally.into_measurement(started.elapsed()))
}
