//! The engine seam: what the worker needs from a WebAssembly runtime to serve invocations.
//!
//! Required: compile a module, run an invocation. Optional, with defaults: precompiled
//! artifacts on disk. Wasmtime is the default implementation; WasmEdge is the second one.

use std::path::Path;
use std::time::Duration;

use wasmbox_protocol::{Deadlines, ModuleSource, Outcome, Preopen};

pub use crate::harden::PathPolicy;

#[cfg(feature = "wasmedge")]
pub mod wasmedge;
pub mod wasmtime;

/// Longest message kept from a trap or compile error (they can carry long backtraces).
const MAX_MESSAGE: usize = 4096;

/// Cuts an engine's message to [`MAX_MESSAGE`] bytes (on a character boundary).
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" [...]");
    }
    message
}

/// Why a module could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The module itself is at fault: not valid Wasm, not a WASI command, unknown imports.
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// The engine does not support the requested operation (for example artifacts).
    #[error("{0} is not supported by this engine")]
    Unsupported(&'static str),
    /// Reading or writing an artifact failed.
    #[error("artifact i/o at {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An artifact exists but the engine refused it (other engine version or settings).
    #[error("artifact {path} is not usable: {reason}")]
    StaleArtifact { path: std::path::PathBuf, reason: String },
}

/// One invocation as the engine sees it.
#[derive(Debug)]
pub struct RunRequest<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub preopens: &'a [Preopen],
    /// The preopened directories, opened by the supervisor, one per entry of `preopens`;
    /// empty means open `Preopen::host` by path.
    pub preopen_dirs: &'a [std::os::fd::OwnedFd],
    pub stdin: bytes::Bytes,
    pub memory_limit_bytes: u64,
    pub timeout: Duration,
    pub max_output_bytes: u64,
}

impl<'a> RunRequest<'a> {
    /// A run with `argv` and nothing else: no environment, preopens or stdin.
    pub fn bare(argv: &'a [String], memory_limit_bytes: u64, timeout: Duration, max_output_bytes: u64) -> Self {
        RunRequest {
            argv,
            env: &[],
            preopens: &[],
            preopen_dirs: &[],
            stdin: bytes::Bytes::new(),
            memory_limit_bytes,
            timeout,
            max_output_bytes,
        }
    }
}

/// A `wasi:http` request for a proxy component, and where its response goes.
pub struct HttpCall<'a> {
    pub request: &'a wasmbox_protocol::HttpRequest,
    pub body: RequestBody,
    /// Sends the response's head and body pieces to the supervisor as they come (from
    /// another thread than the guest's).
    pub emit: &'a (dyn Fn(HttpEvent<'_>) -> std::io::Result<()> + Sync),
}

/// A request body as the handler reads it: its first part (the whole body unless it is
/// streamed), then the pieces the supervisor streams.
pub struct RequestBody {
    pub first: bytes::Bytes,
    pub rest: Option<StreamedBody>,
}

/// The pieces of a streamed body as the worker's reader thread hands them over: `Err` is
/// a body cut short; the channel closing after its pieces is the body's end. Shared with
/// the serve loop, which closes it once the handler is done so the reader never waits for
/// a handler that will not read again.
pub type StreamedBody = std::sync::Arc<std::sync::Mutex<tokio::sync::mpsc::Receiver<Result<bytes::Bytes, ()>>>>;

/// What a `wasi:http` handler produced, in order: the head, then body pieces.
pub enum HttpEvent<'a> {
    Head(wasmbox_protocol::ResponseHead),
    Body(&'a [u8]),
}

/// What a run produced.
#[derive(Debug)]
pub struct RunResult {
    pub outcome: Outcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stderr_dropped: u64,
    pub exec: Duration,
}

/// Runs `guest` with fresh stdout/stderr captures and turns what it produced into a
/// [`RunResult`]: stdout is capped (a guest that overflowed it gets `OutputTooLarge` and no
/// byte of its cut body is kept), stderr keeps only the tail error responses carry.
pub fn run_captured(
    request: &RunRequest<'_>,
    guest: impl FnOnce(&crate::capture::Capture, &crate::capture::Capture) -> Outcome,
) -> RunResult {
    use crate::capture::Capture;
    let stdout = Capture::strict(request.max_output_bytes);
    let stderr = Capture::tail(request.max_output_bytes.min(wasmbox_protocol::STDERR_TAIL_BYTES as u64));
    let started = std::time::Instant::now();
    let outcome = guest(&stdout, &stderr);
    let exec = started.elapsed();
    let out = stdout.take();
    let err = stderr.take();
    let (outcome, stdout) = match outcome {
        // A guest that swallowed the failed write and went on still produced a cut body.
        _ if out.overflowed => (Outcome::OutputTooLarge { limit_bytes: request.max_output_bytes }, Vec::new()),
        other => (other, out.data),
    };
    RunResult { outcome, stdout, stderr: err.data, stderr_dropped: err.dropped, exec }
}

/// An artifact file: its name in the artifact directory, reached through the directory's
/// descriptor (engines that take descriptors) or by `path` (engines that take paths only;
/// relative to the working directory, which is the artifact directory in a worker).
#[derive(Debug, Clone, Copy)]
pub struct ArtifactFile<'a> {
    pub dir: std::os::fd::BorrowedFd<'a>,
    pub name: &'a str,
    pub path: &'a Path,
}

impl ArtifactFile<'_> {
    /// Opens the artifact for reading (never through a symbolic link).
    pub fn open(&self) -> std::io::Result<std::fs::File> {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        Ok(nix::fcntl::openat(self.dir, self.name, flags, nix::sys::stat::Mode::empty())?.into())
    }

    /// Creates the artifact (it must not exist), owner-only.
    pub fn create(&self) -> std::io::Result<std::fs::File> {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        Ok(nix::fcntl::openat(self.dir, self.name, flags, nix::sys::stat::Mode::from_bits_truncate(0o600))?.into())
    }
}

/// What a module is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// A WASI command: `_start: () -> ()` is required and runs per invocation.
    Command,
    /// A session module (a WASI reactor, rewritten by [`crate::session::instrument`]): no
    /// entry point is required at compile time; the handler is looked up per step.
    Session,
}

/// A WebAssembly engine able to run WASI preview1 command modules and session steps.
pub trait Engine {
    /// A compiled, validated, linked module, cheap to clone and ready to instantiate.
    type Module: Clone;

    /// Short stable name (`wasmtime`, `wasmedge`), part of artifact cache keys.
    fn name(&self) -> &'static str;

    /// Version string; artifacts are keyed by it so one version never loads another's.
    fn version(&self) -> String;

    /// Validates and compiles a module held in memory.
    fn compile(&self, wasm: &[u8], kind: ModuleKind) -> Result<Self::Module, EngineError>;

    /// Who stops a command at its deadline (see [`Deadlines`]). An engine that answers
    /// `Process` does not stop commands itself: whoever runs it must.
    fn deadlines(&self) -> Deadlines {
        Deadlines::Engine
    }

    /// What a module compiled in memory by [`Engine::compile`] runs as: native code
    /// (`Compiled`), or the engine's interpreter (`Interpreted`), which a native artifact
    /// passed later replaces.
    fn memory_source(&self) -> ModuleSource {
        ModuleSource::Compiled
    }

    /// How the engine reaches files once the worker is locked down; the seccomp filter
    /// allows just that. Engines that take descriptors keep the default.
    fn path_policy(&self) -> PathPolicy {
        PathPolicy::DescriptorsOnly
    }

    /// Runs whatever the engine does once per process on first use (thread pools, runtime
    /// set-up, reading the CPU count from the cgroup files) before the worker is locked
    /// down, so none of it needs to happen under the seccomp filter.
    fn warm_up(&self) -> Result<(), EngineError> {
        Ok(())
    }

    /// File extension of precompiled artifacts, or `None` when the engine has none.
    fn artifact_extension(&self) -> Option<&'static str> {
        None
    }

    /// Compiles `wasm` into a native artifact written at `artifact` (a new file), for
    /// running as `kind`.
    fn precompile(&self, wasm: &[u8], kind: ModuleKind, artifact: &ArtifactFile<'_>) -> Result<(), EngineError> {
        let _ = (wasm, kind, artifact);
        Err(EngineError::Unsupported("precompiling"))
    }

    /// Loads an artifact written by [`Engine::precompile`] of this same engine version.
    fn load_artifact(&self, artifact: &ArtifactFile<'_>, kind: ModuleKind) -> Result<Self::Module, EngineError> {
        let _ = (artifact, kind);
        Err(EngineError::Unsupported("loading artifacts"))
    }

    /// Loads an artifact of this engine version that the supervisor passed as a
    /// descriptor (its compiler process made it; the supervisor checked it against its
    /// record before passing it).
    fn load_passed_artifact(&self, file: std::fs::File, kind: ModuleKind) -> Result<Self::Module, EngineError> {
        let _ = (file, kind);
        Err(EngineError::Unsupported("loading artifacts"))
    }

    /// Runs `_start` in a fresh instance with fresh WASI state.
    fn run(&self, module: &Self::Module, request: RunRequest<'_>) -> RunResult;

    /// Runs a `wasi:http/proxy` component's handler for one request in a fresh instance
    /// (stdout is unused: the response goes out through `call.emit`).
    fn run_http(&self, module: &Self::Module, request: RunRequest<'_>, call: HttpCall<'_>) -> RunResult {
        let _ = (module, call);
        run_captured(&request, |_, _| Outcome::InvalidModule {
            message: format!("the {} engine does not serve wasi:http components", self.name()),
        })
    }

    /// Runs one session step in a fresh instance with fresh WASI state (stdin is the
    /// message): [`crate::session::drive`] over the engine's [`crate::session::Instance`].
    fn run_session(
        &self,
        module: &Self::Module,
        layout: &crate::session::Layout,
        request: RunRequest<'_>,
        step: &crate::session::Step<'_>,
        out: &mut crate::session::StepOutput,
    ) -> RunResult;
}
