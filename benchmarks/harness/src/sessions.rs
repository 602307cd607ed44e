//! What a stateful session costs per message, by heap size: restoring its snapshot into a
//! fresh instance, capturing (finding and compressing) the pages the message changed, and
//! committing the new snapshot durably; and what a message costs end to end next to a
//! stateless hello on the same supervisor in the same minutes.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

use crate::loadgen::{Conn, Reply, Target};
use crate::modes::{Mode, Server, Setup};
use crate::stats::{Recorder, ratio};
use crate::suite::Plan;

/// Largest snapshot the benchmark's supervisor accepts: a 64 MiB heap compresses to about
/// 32 MiB, a fuller one to more than the default limit of 64 MiB.
const MAX_SNAPSHOT_BYTES: &str = "268435456";

/// Sent with every session request: memory for a 64 MiB heap and the scratch copy `fill`
/// builds, and time for filling it on a slow machine.
const SESSION_HEADERS: [(&str, &str); 2] = [("Memory-Request", "512"), ("Timeout-Ms", "60000")];

/// The example session function (benchmarks/functions/counter).
const FUNCTION: &str = "counter";

/// Every heap size measured, with the figures of both runs of the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sessions {
    /// Filesystem of the state directory the snapshots were committed to (its fsyncs are
    /// most of the commit time).
    pub state_filesystem: String,
    /// Whether the supervisor ran each step in a cgroup (where the host allows).
    pub cgroups_active: bool,
    pub heaps: Vec<Heap>,
}

/// One heap size: a session filled with `heap_mib` MiB, then `messages` times a hello and a
/// `touch 1` (one byte of the heap changed) in turn.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Heap {
    pub heap_mib: u64,
    pub messages: usize,
    /// The snapshot committed by the last touch, compressed, bytes.
    pub snapshot_bytes: u64,
    /// Pages (64 KiB) the last touch restored and compressed.
    pub pages_restored: u64,
    pub pages_compressed: u64,
    /// Worker: decompress the snapshot, write its pages, set the globals.
    pub restore: Quantiles,
    /// Worker: find the pages the message changed, compress them, encode the snapshot.
    pub capture: Quantiles,
    /// Supervisor: temporary file, fsync, rename, fsync of the directory.
    pub commit: Quantiles,
    /// restore + capture + commit of each message.
    pub state: Quantiles,
    /// Worker: the whole step (restore, the guest, capture); what a touch's latency has
    /// beyond it and commit is the supervisor's (reading the snapshot, passing it to the
    /// worker and back, checking the new one) and HTTP.
    pub exec: Quantiles,
    /// A touch as the client sees it, and the hello sent just before each.
    pub touch: Quantiles,
    pub hello: Quantiles,
    /// touch p50 / hello p50.
    pub touch_to_hello: Option<f64>,
    /// The `fill` message that made the heap: the first time all its pages are compressed.
    pub fill: Step,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Quantiles {
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Quantiles {
    pub fn of(recorder: &Recorder) -> Quantiles {
        Quantiles { p50_us: recorder.quantile_us(0.5), p99_us: recorder.quantile_us(0.99) }
    }
}

/// One session message, from its response headers, with its latency at the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    pub latency_us: u64,
    pub exec_us: u64,
    pub restore_us: u64,
    pub capture_us: u64,
    pub commit_us: u64,
    pub snapshot_bytes: u64,
    pub pages_restored: u64,
    pub pages_compressed: u64,
}

impl Step {
    fn of(reply: &Reply, latency: Duration) -> anyhow::Result<Step> {
        let header = |name: &str| reply.header_u64(name).with_context(|| format!("session reply without {name}"));
        Ok(Step {
            latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            exec_us: header("x-wasmbox-exec-time-us")?,
            restore_us: header("x-wasmbox-session-restore-us")?,
            capture_us: header("x-wasmbox-session-capture-us")?,
            commit_us: header("x-wasmbox-session-commit-us")?,
            snapshot_bytes: header("x-wasmbox-snapshot-bytes")?,
            pages_restored: header("x-wasmbox-session-pages-restored")?,
            pages_compressed: header("x-wasmbox-session-pages-compressed")?,
        })
    }

    pub fn state_us(&self) -> u64 {
        self.restore_us + self.capture_us + self.commit_us
    }
}

/// Heap sizes (MiB) and touch messages per heap of a plan.
fn sizes(plan: &Plan) -> (&'static [u64], usize) {
    if plan.name == "quick" { (&[1, 16], 10) } else { (&[1, 16, 64], 50) }
}

/// Measures every heap size of `plan` on one WasmBox supervisor of its own.
pub async fn measure(setup: &Setup, plan: &Plan) -> anyhow::Result<Sessions> {
    let server =
        Server::start_with_env(Mode::WasmBox, setup, &[("WASMBOX_SESSION_MAX_SNAPSHOT_BYTES", MAX_SNAPSHOT_BYTES)])?;
    let stats = crate::extras::get_json(server.addr, "/stats").await.unwrap_or_default();
    let hello = Target { addr: server.addr, path: "/hello".into(), headers: vec![], body: Bytes::new() };
    crate::suite::warm_up(&hello, plan.warmup, Mode::WasmBox, "sessions / hello").await?;
    let (heap_sizes, messages) = sizes(plan);
    let mut heaps = Vec::new();
    for &mib in heap_sizes {
        heaps.push(heap(&server, &hello, mib, messages, plan.warmup).await?);
    }
    server.stop();
    Ok(Sessions {
        state_filesystem: filesystem_of(&std::env::temp_dir()),
        cgroups_active: stats["cgroups"].is_object(),
        heaps,
    })
}

async fn heap(server: &Server, hello: &Target, mib: u64, messages: usize, warmup: u64) -> anyhow::Result<Heap> {
    let session = |path: String, body: &str| Target {
        addr: server.addr,
        path,
        headers: SESSION_HEADERS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        body: Bytes::from(body.to_owned()),
    };
    let create = format!("/sessions/{FUNCTION}");
    let (created, _) = send(&mut Conn::new(&session(create.clone(), "")), &create).await?;
    let created: serde_json::Value = serde_json::from_slice(&created.body)?;
    let id = created["id"].as_str().with_context(|| format!("session without an id: {created}"))?;
    let path = format!("{create}/{id}");
    let fill = format!("fill {mib}");
    let (reply, latency) = send(&mut Conn::new(&session(path.clone(), &fill)), &fill).await?;
    let fill = Step::of(&reply, latency)?;
    let touch = session(path, "touch 1");
    // Not measured: the first messages of a worker that has not loaded the module yet.
    crate::suite::warm_up(&touch, warmup, Mode::WasmBox, "sessions / touch").await?;

    let (mut hello_conn, mut touch_conn) = (Conn::new(hello), Conn::new(&touch));
    let mut hellos = Recorder::default();
    // restore, capture, commit, their sum, the worker's step, and the latency of each touch.
    let mut recorders: [Recorder; 6] = Default::default();
    let mut last = Step::default();
    for _ in 0..messages {
        let (_, latency) = send(&mut hello_conn, "hello").await?;
        hellos.record(latency);
        let (reply, latency) = send(&mut touch_conn, "touch 1").await?;
        last = Step::of(&reply, latency)?;
        let figures =
            [last.restore_us, last.capture_us, last.commit_us, last.state_us(), last.exec_us, last.latency_us];
        for (recorder, us) in recorders.iter_mut().zip(figures) {
            recorder.record(Duration::from_micros(us));
        }
    }
    let [restore, capture, commit, state, exec, touch] = recorders.map(|r| Quantiles::of(&r));
    let hello = Quantiles::of(&hellos);
    Ok(Heap {
        heap_mib: mib,
        messages,
        snapshot_bytes: last.snapshot_bytes,
        pages_restored: last.pages_restored,
        pages_compressed: last.pages_compressed,
        restore,
        capture,
        commit,
        state,
        exec,
        touch,
        hello,
        touch_to_hello: ratio(touch.p50_us as f64, hello.p50_us as f64),
        fill,
    })
}

/// Sends `conn`'s request; its reply and latency, or an error unless it succeeded.
async fn send(conn: &mut Conn, what: &str) -> anyhow::Result<(Reply, Duration)> {
    let started = Instant::now();
    let reply = conn.send().await.with_context(|| format!("sessions / {what}"))?;
    let latency = started.elapsed();
    anyhow::ensure!(
        reply.status.is_success(),
        "sessions / {what}: {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    Ok((reply, latency))
}

/// Type of the filesystem holding `path` (the mount point with the longest matching prefix).
fn filesystem_of(path: &std::path::Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (mount_point, fs_type) = (fields.nth(1)?, fields.next()?);
            path.starts_with(mount_point).then_some((mount_point.len(), fs_type))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, fs_type)| fs_type.to_owned())
}

/// The sessions measurement alone (`wasmbox-bench sessions`), for its own report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    pub plan: Plan,
    pub machine: crate::report::Machine,
    pub workers: usize,
    pub engine: String,
    pub sessions: Sessions,
    pub wall: Duration,
}

pub async fn run(plan: Plan, setup: &Setup) -> anyhow::Result<Results> {
    let started = Instant::now();
    let sessions = measure(setup, &plan).await?;
    Ok(Results {
        machine: crate::report::Machine::describe(),
        workers: setup.workers,
        engine: setup.engine.clone(),
        sessions,
        wall: started.elapsed(),
        plan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_read_from_the_session_headers() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("x-wasmbox-session-restore-us", "120"),
            ("x-wasmbox-session-capture-us", "340"),
            ("x-wasmbox-session-commit-us", "5000"),
            ("x-wasmbox-snapshot-bytes", "8518720"),
            ("x-wasmbox-session-pages-restored", "258"),
            ("x-wasmbox-session-pages-compressed", "4"),
            ("x-wasmbox-exec-time-us", "600"),
        ] {
            headers.insert(name, http::HeaderValue::from_static(value));
        }
        let reply = Reply { status: http::StatusCode::OK, headers, body: Bytes::new() };
        let step = Step::of(&reply, Duration::from_micros(7000)).unwrap();
        assert_eq!((step.latency_us, step.exec_us), (7000, 600));
        assert_eq!(step.state_us(), 5460);
        assert_eq!((step.snapshot_bytes, step.pages_restored, step.pages_compressed), (8_518_720, 258, 4));
        let mut partial = reply.clone();
        partial.headers.remove("x-wasmbox-session-commit-us");
        let err = Step::of(&partial, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("x-wasmbox-session-commit-us"), "{err}");
    }

    #[test]
    fn quick_runs_leave_out_the_largest_heap() {
        assert_eq!(sizes(&Plan::quick()), (&[1u64, 16][..], 10));
        assert_eq!(sizes(&Plan::full()), (&[1u64, 16, 64][..], 50));
    }

    #[test]
    fn the_root_filesystem_has_a_type() {
        assert_ne!(filesystem_of(std::path::Path::new("/")), "unknown");
    }
}
