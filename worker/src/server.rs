//! The worker's serve loop: handshake, then one invocation at a time until the supervisor
//! says stop or closes the socket.

use std::io::{BufWriter, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use wasmbox_protocol::{
    FrameError, FromWorker, Hello, Invocation, InvocationResult, ModuleSource, Outcome, PROTOCOL_VERSION, ToWorker,
    read_frame, write_frame,
};

use crate::cache::{ModuleCache, PrepareError};
use crate::engine::{Engine, HttpCall, HttpEvent, ModuleKind, RequestBody, RunRequest, RunResult};
use crate::fdpass::FdReader;
use crate::session;

/// Largest stdin a worker accepts in one frame; the supervisor enforces the real (smaller)
/// body limit, this only bounds what a confused peer can make the worker allocate.
pub const MAX_STDIN_BYTES: u64 = 1 << 30;

/// Serves invocations on `socket` until the supervisor closes it or sends `Shutdown`.
/// `hardening` names the layers applied before this point, reported in the hello.
pub fn serve<E: Engine>(
    socket: UnixStream,
    mut cache: ModuleCache<E>,
    cgroup: String,
    hardening: Vec<String>,
) -> Result<(), FrameError> {
    let mut reader = FdReader::new(socket.try_clone().map_err(FrameError::Io)?);
    let mut writer = BufWriter::new(socket);
    let hello = FromWorker::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        worker_version: env!("CARGO_PKG_VERSION").into(),
        engine: cache.engine().name().into(),
        engine_version: cache.engine().version(),
        pid: std::process::id(),
        cgroup,
        hardening,
        deadlines: cache.engine().deadlines(),
    });
    write_frame(&mut writer, &hello, &[])?;
    loop {
        let Some((message, stdin)) = read_frame::<_, ToWorker>(&mut reader, MAX_STDIN_BYTES)? else {
            return Ok(());
        };
        match message {
            ToWorker::Shutdown => return Ok(()),
            ToWorker::Proceed => return Err(FrameError::Unexpected("proceed outside an invocation")),
            ToWorker::Fork(_) => return Err(FrameError::Unexpected("fork is for the zygote")),
            ToWorker::RequestBody | ToWorker::RequestEnd { .. } => {
                return Err(FrameError::Unexpected("a request body outside an invocation"));
            }
            ToWorker::Invoke(invocation) => {
                let count = usize::try_from(invocation.passed_fds).unwrap_or(usize::MAX);
                let fds = reader.take_fds(count).map_err(|e| {
                    tracing::error!(error = %e, "descriptor count mismatch");
                    FrameError::Unexpected("descriptors do not match the invocation")
                })?;
                let Some((result, run, snapshot)) =
                    invoke(&mut cache, &invocation, stdin, fds, &mut reader, &mut writer)?
                else {
                    continue; // Answered already (a streamed request).
                };
                let snapshot = snapshot.unwrap_or_default();
                write_frame(&mut writer, &FromWorker::Result(result), &[&run.stdout, &run.stderr, &snapshot])?;
            }
        }
    }
}

/// What an invocation replies: the `Result` header, the run and a session's new snapshot;
/// `None` when it has replied itself.
type Reply = Option<(InvocationResult, RunResult, Option<Vec<u8>>)>;

fn invoke<E: Engine, R: Read + Send, W: Write + Send>(
    cache: &mut ModuleCache<E>,
    invocation: &Invocation,
    stdin: Vec<u8>,
    fds: Vec<OwnedFd>,
    reader: &mut R,
    writer: &mut W,
) -> Result<Reply, FrameError> {
    let span = tracing::debug_span!("invoke", request_id = %invocation.request_id, function = %invocation.function);
    let _enter = span.enter();
    let prepare_started = Instant::now();
    // The descriptors: the module file (unless the supervisor knows this worker has the
    // module), then its artifact if one was passed, then one directory per preopen.
    let mut fds = fds.into_iter();
    let module_file = if invocation.module_fd { fds.next().map(std::fs::File::from) } else { None };
    if invocation.module_fd && module_file.is_none() {
        return Err(FrameError::Unexpected("module descriptor missing"));
    }
    let artifact = if invocation.artifact { fds.next().map(std::fs::File::from) } else { None };
    if invocation.artifact && artifact.is_none() {
        return Err(FrameError::Unexpected("artifact descriptor missing"));
    }
    let preopen_dirs: Vec<OwnedFd> = fds.collect();
    if !preopen_dirs.is_empty() && preopen_dirs.len() != invocation.preopens.len() {
        return Err(FrameError::Unexpected("preopen descriptors do not match the preopens"));
    }
    let kind = if invocation.session.is_some() { ModuleKind::Session } else { ModuleKind::Command };
    // Sent without the file, for a module this worker no longer has: it cannot be read
    // here (the worker opens no host path), so the supervisor sends it again with it.
    if !invocation.module_fd && !cache.holds(&invocation.module, kind, artifact.is_some()) {
        let run = no_run(Outcome::ModuleNotHeld);
        return Ok(Some((result_header(&run, None, 0), run, None)));
    }
    let prepared = cache.get(&invocation.module, module_file, artifact, kind);
    let prepare_us = micros(prepare_started.elapsed());
    let (module, source) = match prepared {
        Ok(found) => found,
        Err(e) => {
            let outcome = match e {
                PrepareError::Invalid(message) => Outcome::InvalidModule { message },
                PrepareError::Changed => Outcome::ModuleChanged,
                other => Outcome::SetupFailed { message: other.to_string() },
            };
            let run = no_run(outcome);
            return Ok(Some((result_header(&run, None, prepare_us), run, None)));
        }
    };
    // Loading took its time (and the compile allowance's memory): say it is done.
    if !cache.last_hit() {
        write_frame(writer, &FromWorker::Started, &[])?;
        if invocation.confirm_start {
            match read_frame::<_, ToWorker>(reader, 0)? {
                Some((ToWorker::Proceed, _)) => {}
                Some((ToWorker::Shutdown, _)) | None => {
                    return Err(FrameError::Unexpected("stopped before the guest ran"));
                }
                Some(_) => return Err(FrameError::Unexpected("expected proceed")),
            }
        }
    }
    let stdin = bytes::Bytes::from(stdin);
    let request = |stdin| RunRequest {
        argv: &invocation.argv,
        env: &invocation.env,
        preopens: &invocation.preopens,
        preopen_dirs: &preopen_dirs,
        stdin,
        memory_limit_bytes: invocation.memory_limit_bytes,
        timeout: Duration::from_millis(invocation.timeout_ms),
        max_output_bytes: invocation.max_output_bytes,
    };
    if let Some(http) = &invocation.http {
        // The response goes out from the engine's forwarding thread while the guest runs
        // here; nothing else writes to the socket until it is done.
        let writer = std::sync::Mutex::new(&mut *writer);
        let send = |message: &FromWorker, payload: &[&[u8]]| {
            let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
            write_frame(&mut **writer, message, payload)
        };
        let emit = |event: HttpEvent<'_>| -> std::io::Result<()> {
            let sent = match event {
                HttpEvent::Head(head) => send(&FromWorker::ResponseHead(head), &[]),
                HttpEvent::Body(bytes) => send(&FromWorker::ResponseBody, &[bytes]),
            };
            sent.map_err(|e| std::io::Error::other(e.to_string()))
        };
        let run_http = |body| {
            let call = HttpCall { request: http, body, emit: &emit };
            let run = cache.engine().run_http(&module.module, request(bytes::Bytes::new()), call);
            tracing::debug!(outcome = ?run.outcome, exec_us = micros(run.exec), "request handled");
            run
        };
        if !http.streamed {
            let run = run_http(RequestBody { first: stdin, rest: None });
            return Ok(Some((result_header(&run, Some(source), prepare_us), run, None)));
        }
        // A streamed body: this worker reads its pieces on a thread of its own while the
        // handler runs, until the supervisor's `RequestEnd`, which comes after the reply.
        send(&FromWorker::RequestBodyWanted, &[])?;
        let (pieces, rest) = tokio::sync::mpsc::channel(REQUEST_PIECES);
        let rest = std::sync::Arc::new(std::sync::Mutex::new(rest));
        return std::thread::scope(|scope| {
            let body_reader = std::thread::Builder::new()
                .name("wasmbox-body".into())
                .spawn_scoped(scope, move || read_request_body(reader, pieces))
                .map_err(FrameError::Io)?;
            let run = run_http(RequestBody { first: stdin, rest: Some(rest.clone()) });
            // Whatever the handler did not read is read and dropped from here on.
            rest.lock().unwrap_or_else(|p| p.into_inner()).close();
            let header = FromWorker::Result(result_header(&run, Some(source), prepare_us));
            send(&header, &[&run.stdout, &run.stderr])?;
            body_reader.join().unwrap_or(Err(FrameError::Unexpected("the request body reader failed")))?;
            Ok(None)
        });
    }
    let Some(call) = &invocation.session else {
        let run = cache.engine().run(&module.module, request(stdin));
        tracing::debug!(outcome = ?run.outcome, exec_us = micros(run.exec), "invocation finished");
        return Ok(Some((result_header(&run, Some(source), prepare_us), run, None)));
    };
    // A session step: the payload is the snapshot, then the message.
    let snapshot_len = usize::try_from(call.snapshot_len).unwrap_or(usize::MAX);
    if snapshot_len > stdin.len() {
        return Err(FrameError::Unexpected("snapshot length exceeds the payload"));
    }
    let (Some(layout), Some(module_sha256)) =
        (module.layout.as_deref(), session::sha256_bytes(&invocation.module.sha256))
    else {
        return Err(FrameError::Unexpected("session module without a layout"));
    };
    let step = session::Step {
        op: call.op,
        handler: &call.handler,
        snapshot: &stdin[..snapshot_len],
        module_sha256,
        memory_limit_bytes: invocation.memory_limit_bytes,
        max_snapshot_bytes: call.max_snapshot_bytes,
    };
    let mut out = session::StepOutput::default();
    let run = cache.engine().run_session(&module.module, layout, request(stdin.slice(snapshot_len..)), &step, &mut out);
    // Only a step that succeeded as a whole commits: a guest that filled its stdout cap
    // (turned into OutputTooLarge after the handler returned) does not.
    let snapshot = out.snapshot.filter(|_| run.outcome == Outcome::Exited { code: 0 });
    tracing::debug!(outcome = ?run.outcome, exec_us = micros(run.exec), stats = ?out.stats, "session step finished");
    let mut header = result_header(&run, Some(source), prepare_us);
    header.snapshot_len = snapshot.as_ref().map_or(0, |s| s.len() as u64);
    header.session = Some(out.stats);
    Ok(Some((header, run, snapshot)))
}

/// Pieces of a streamed request body held between this worker's socket and the handler.
const REQUEST_PIECES: usize = 4;

/// Hands a streamed body's pieces to the handler until the supervisor's `RequestEnd`; once
/// the handler is done (the channel closed), the rest is read and dropped.
fn read_request_body<R: Read>(
    reader: &mut R,
    pieces: tokio::sync::mpsc::Sender<Result<bytes::Bytes, ()>>,
) -> Result<(), FrameError> {
    let mut pieces = Some(pieces);
    loop {
        match read_frame::<_, ToWorker>(reader, wasmbox_protocol::MAX_REQUEST_PIECE as u64)? {
            Some((ToWorker::RequestBody, piece)) => {
                if let Some(to) = &pieces {
                    if to.blocking_send(Ok(bytes::Bytes::from(piece))).is_err() {
                        pieces = None;
                    }
                }
            }
            Some((ToWorker::RequestEnd { whole }, _)) => {
                if let Some(to) = pieces.filter(|_| !whole) {
                    let _ = to.blocking_send(Err(()));
                }
                return Ok(());
            }
            Some((ToWorker::Shutdown, _)) | None => {
                return Err(FrameError::Unexpected("stopped within a request body"));
            }
            Some(_) => return Err(FrameError::Unexpected("expected a piece of the request body")),
        }
    }
}

fn no_run(outcome: Outcome) -> RunResult {
    RunResult { outcome, stdout: Vec::new(), stderr: Vec::new(), stderr_dropped: 0, exec: Duration::ZERO }
}

fn result_header(run: &RunResult, source: Option<ModuleSource>, prepare_us: u64) -> InvocationResult {
    InvocationResult {
        outcome: run.outcome.clone(),
        stdout_len: run.stdout.len() as u64,
        stderr_len: run.stderr.len() as u64,
        stderr_dropped: run.stderr_dropped,
        module_source: source,
        prepare_us,
        exec_us: micros(run.exec),
        snapshot_len: 0,
        session: None,
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
