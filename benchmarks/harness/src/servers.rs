//! The comparison servers, each run as its own process by `wasmbox-bench serve-*`:
//! - in-process: one process runs the same engine and module cache as a worker, on a pool of
//!   threads, with no process boundary (the thread-based architecture);
//! - spawn: a fresh `wasmbox-worker --one-shot` process per request (CGI style);
//! - plain: hyper answering without Wasm, the HTTP stack's ceiling.
//!
//! They speak the part of WasmBox's API the scenarios use: `POST /{function}?arg=...` with
//! the body as stdin, `Memory-Request` in MiB, the guest's stdout as a 200 body.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use wasmbox_protocol::{ModuleRef, Outcome};
use wasmbox_worker::cache::{ModuleCache, sha256_hex};
use wasmbox_worker::engine::{Engine, RunRequest};

/// Largest request body the comparison servers accept.
const MAX_BODY: usize = 16 << 20;
/// The guests' deadline, as WasmBox's default.
const TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MEMORY_MB: u64 = 128;

/// One parsed invocation.
#[derive(Debug)]
pub struct Call {
    pub function: String,
    pub args: Vec<String>,
    pub memory_mb: u64,
    pub body: Bytes,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn parse(req: Request<Incoming>) -> Result<Call, Reply> {
    let function = req.uri().path().trim_start_matches('/').to_owned();
    if function.is_empty() || !function.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(reply(StatusCode::NOT_FOUND, "no such function\n"));
    }
    let args = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == "arg").map(|(_, v)| v.into_owned()).collect()
        })
        .unwrap_or_default();
    let memory_mb = req
        .headers()
        .get("memory-request")
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .unwrap_or(DEFAULT_MEMORY_MB);
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| reply(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"))?
        .to_bytes();
    Ok(Call { function, args, memory_mb, body })
}

/// Serves `handler` on `listener` until the process ends. Prints the address first, as
/// "listening on ADDR", for the harness that started it.
pub async fn serve<F, Fut>(listener: tokio::net::TcpListener, handler: F) -> anyhow::Result<()>
where
    F: Fn(Call) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move {
                    Ok::<_, Infallible>(match parse(req).await {
                        Ok(call) => handler(call).await,
                        Err(r) => r,
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// The `.wasm` files of a directory by function name, with their hashes.
pub fn registry(dir: &Path) -> anyhow::Result<HashMap<String, ModuleRef>> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let sha256 = sha256_hex(&std::fs::read(&path)?);
            out.insert(name, ModuleRef { path, sha256 });
        }
    }
    Ok(out)
}

fn outcome_reply(outcome: Outcome, stdout: Vec<u8>) -> Reply {
    match outcome {
        Outcome::Exited { code: 0 } => reply(StatusCode::OK, stdout),
        other => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{other:?}\n")),
    }
}

struct Job {
    module: ModuleRef,
    call: Call,
    done: tokio::sync::oneshot::Sender<Reply>,
}

/// Mode (b): `threads` threads, each with its own engine and module cache (one engine per
/// thread, as one per worker: the engines' deadline timers are per engine), sharing the
/// artifact cache directory; requests queue for the next free thread.
pub async fn in_process(
    listener: tokio::net::TcpListener,
    functions: &Path,
    cache_dir: PathBuf,
    threads: usize,
    engine: &str,
) -> anyhow::Result<()> {
    let registry = Arc::new(registry(functions)?);
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for i in 0..threads.max(1) {
        match engine {
            "wasmtime" => {
                start_thread(i, &rx, &cache_dir, || wasmbox_worker::engine::wasmtime::WasmtimeEngine::new(false))?
            }
            #[cfg(feature = "wasmedge")]
            "wasmedge" => start_thread(i, &rx, &cache_dir, || {
                wasmbox_worker::engine::wasmedge::WasmEdgeEngine::new(wasmbox_protocol::Deadlines::Process)
            })?,
            other => anyhow::bail!("engine {other:?} is not in this build (WasmEdge: --features wasmedge)"),
        }
    }
    let tx = Arc::new(std::sync::Mutex::new(tx));
    serve(listener, move |call: Call| {
        let (registry, tx) = (registry.clone(), tx.clone());
        async move {
            let Some(module) = registry.get(&call.function).cloned() else {
                return reply(StatusCode::NOT_FOUND, "no such function\n");
            };
            let (done, answer) = tokio::sync::oneshot::channel();
            let sent = tx.lock().map(|tx| tx.send(Job { module, call, done }).is_ok()).unwrap_or(false);
            if !sent {
                return reply(StatusCode::SERVICE_UNAVAILABLE, "no threads\n");
            }
            answer.await.unwrap_or_else(|_| reply(StatusCode::INTERNAL_SERVER_ERROR, "thread lost\n"))
        }
    })
    .await
}

type Jobs = Arc<std::sync::Mutex<std::sync::mpsc::Receiver<Job>>>;

/// Starts one engine thread; the engine is made on the thread (engines need not be `Send`)
/// and its failure to start is returned here.
fn start_thread<E: Engine + 'static>(
    i: usize,
    rx: &Jobs,
    cache_dir: &Path,
    make: fn() -> anyhow::Result<E>,
) -> anyhow::Result<()> {
    let (rx, cache_dir) = (rx.clone(), cache_dir.to_path_buf());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name(format!("wasm-{i}")).spawn(move || {
        let mut cache = match make().and_then(|e| Ok(ModuleCache::new(e, Some(&cache_dir), 64, 256 << 20)?)) {
            Ok(cache) => {
                let _ = ready_tx.send(Ok(()));
                cache
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        loop {
            let job = match rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok(job) = job else { return };
            let reply = match cache.get(&job.module, None, None, wasmbox_worker::engine::ModuleKind::Command) {
                Ok((module, _)) => {
                    let mut argv = vec![job.call.function.clone()];
                    argv.extend(job.call.args);
                    let run = cache.engine().run(
                        &module.module,
                        RunRequest {
                            argv: &argv,
                            env: &[],
                            preopens: &[],
                            preopen_dirs: &[],
                            stdin: job.call.body.clone(),
                            memory_limit_bytes: job.call.memory_mb << 20,
                            timeout: TIMEOUT,
                            max_output_bytes: 1 << 20,
                        },
                    );
                    outcome_reply(run.outcome, run.stdout)
                }
                Err(e) => reply(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n")),
            };
            let _ = job.done.send(reply);
        }
    })?;
    ready_rx.recv().map_err(|_| anyhow::anyhow!("engine thread {i} ended before starting"))?
}

/// Mode (c): a fresh worker process per request, `wasmbox-worker --one-shot`.
pub async fn spawn_per_request(
    listener: tokio::net::TcpListener,
    functions: &Path,
    worker: PathBuf,
    cache_dir: PathBuf,
    engine: String,
) -> anyhow::Result<()> {
    let registry = Arc::new(registry(functions)?);
    let (worker, cache_dir, engine) = (Arc::new(worker), Arc::new(cache_dir), Arc::new(engine));
    serve(listener, move |call: Call| {
        let (registry, worker, cache_dir, engine) =
            (registry.clone(), worker.clone(), cache_dir.clone(), engine.clone());
        async move {
            let Some(module) = registry.get(&call.function) else {
                return reply(StatusCode::NOT_FOUND, "no such function\n");
            };
            match one_shot(&worker, &engine, &cache_dir, &module.path, &call).await {
                Ok((true, stdout)) => reply(StatusCode::OK, stdout),
                Ok((false, _)) => reply(StatusCode::INTERNAL_SERVER_ERROR, "function failed\n"),
                Err(e) => reply(StatusCode::BAD_GATEWAY, format!("{e}\n")),
            }
        }
    })
    .await
}

async fn one_shot(
    worker: &Path,
    engine: &str,
    cache_dir: &Path,
    module: &Path,
    call: &Call,
) -> anyhow::Result<(bool, Vec<u8>)> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(worker)
        .arg("--engine")
        .arg(engine)
        .arg("--one-shot")
        .arg(module)
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--one-shot-memory-mb")
        .arg(call.memory_mb.to_string())
        .arg("--")
        .args(&call.args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin pipe"))?;
    let body = call.body.clone();
    // Feed stdin while reading stdout, so neither pipe can fill up and stall the other.
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let output = tokio::time::timeout(TIMEOUT * 2, child.wait_with_output()).await??;
    let _ = feed.await;
    Ok((output.status.success(), output.stdout))
}

/// Mode (d): no Wasm at all: `/echo` returns the body, anything else hello's answer.
pub async fn plain(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    serve(listener, |call: Call| async move {
        if call.function == "echo" {
            reply(StatusCode::OK, call.body)
        } else {
            reply(StatusCode::OK, "Hello from WasmBox!\n")
        }
    })
    .await
}

/// Binds a loopback listener: `addr` as given, port 0 for any free port.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    Ok(tokio::net::TcpListener::bind(addr).await?)
}
