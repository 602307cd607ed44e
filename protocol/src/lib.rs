//! Wire protocol between the WasmBox supervisor and its worker processes.
//!
//! Each message is one frame on a Unix socketpair: a fixed 16-byte prefix (magic, header
//! length, payload length), a small JSON header, then raw payload bytes. Request bodies and
//! function output travel as payload, so large bodies are never re-encoded. The worker opens
//! the conversation with [`FromWorker::Hello`] carrying [`PROTOCOL_VERSION`], so a supervisor
//! refuses a worker binary from another release with a clear error instead of misparsing it.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub mod snapshot;

/// Bumped whenever a message changes shape. Supervisor and worker must agree exactly.
pub const PROTOCOL_VERSION: u32 = 10;

/// First bytes of every frame; a stream that loses sync fails fast on the next frame.
pub const MAGIC: [u8; 4] = *b"WBX\x01";

/// Size of the fixed frame prefix: magic, u32 header length, u64 payload length (LE).
pub const PREFIX_LEN: usize = 16;

/// Headers are small JSON documents; argv and env are their largest part.
pub const MAX_HEADER_LEN: u32 = 4 << 20;

/// Errors decoding or exchanging frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame does not start with the protocol magic (stream out of sync or not a worker)")]
    BadMagic,
    #[error("frame header of {len} bytes exceeds the limit of {limit} bytes")]
    HeaderTooLarge { len: u64, limit: u64 },
    #[error("frame payload of {len} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { len: u64, limit: u64 },
    #[error("malformed frame header")]
    Header(#[source] serde_json::Error),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("i/o error on the worker socket")]
    Io(#[source] io::Error),
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
}

/// Lengths announced by a frame prefix, already checked against the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLengths {
    pub header: usize,
    pub payload: usize,
}

/// Parses and bounds a frame prefix. `max_payload` is the receiver's own limit: a peer can
/// never make the receiver allocate more than it agreed to.
pub fn parse_prefix(prefix: &[u8; PREFIX_LEN], max_payload: u64) -> Result<FrameLengths, FrameError> {
    if prefix[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let header = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    let payload = u64::from_le_bytes([
        prefix[8], prefix[9], prefix[10], prefix[11], prefix[12], prefix[13], prefix[14], prefix[15],
    ]);
    if header > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge { len: header.into(), limit: MAX_HEADER_LEN.into() });
    }
    if payload > max_payload {
        return Err(FrameError::PayloadTooLarge { len: payload, limit: max_payload });
    }
    let payload =
        usize::try_from(payload).map_err(|_| FrameError::PayloadTooLarge { len: payload, limit: usize::MAX as u64 })?;
    Ok(FrameLengths { header: header as usize, payload })
}

/// Encodes the prefix and header of a frame whose payload (`payload_len` bytes) follows.
pub fn encode_head<H: Serialize>(header: &H, payload_len: usize) -> Vec<u8> {
    // Serializing plain data structs to JSON cannot fail (no maps with non-string keys).
    let json = serde_json::to_vec(header).unwrap_or_default();
    let mut out = Vec::with_capacity(PREFIX_LEN + json.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload_len as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Decodes a frame header.
pub fn decode_header<H: DeserializeOwned>(bytes: &[u8]) -> Result<H, FrameError> {
    serde_json::from_slice(bytes).map_err(FrameError::Header)
}

/// Blocking read of one frame. `Ok(None)` means the peer closed the stream cleanly between
/// frames, which is how a worker learns that its supervisor is gone.
pub fn read_frame<R: Read, H: DeserializeOwned>(
    reader: &mut R,
    max_payload: u64,
) -> Result<Option<(H, Vec<u8>)>, FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut filled = 0;
    while filled < PREFIX_LEN {
        match reader.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let lengths = parse_prefix(&prefix, max_payload)?;
    let mut header = vec![0u8; lengths.header];
    read_exact(reader, &mut header)?;
    let mut payload = vec![0u8; lengths.payload];
    read_exact(reader, &mut payload)?;
    Ok(Some((decode_header(&header)?, payload)))
}

fn read_exact<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })
}

/// Blocking write of one frame whose payload is the concatenation of `payload` slices.
/// Head and payload go out in one vectored write where the writer takes them whole (a
/// socket usually does), so the peer wakes up once, to a complete frame.
pub fn write_frame<W: Write, H: Serialize>(writer: &mut W, header: &H, payload: &[&[u8]]) -> Result<(), FrameError> {
    let total = payload.iter().map(|p| p.len()).sum();
    let head = encode_head(header, total);
    let mut slices: Vec<io::IoSlice<'_>> = std::iter::once(head.as_slice())
        .chain(payload.iter().copied())
        .filter(|s| !s.is_empty())
        .map(io::IoSlice::new)
        .collect();
    let mut rest = slices.as_mut_slice();
    while !rest.is_empty() {
        match writer.write_vectored(rest) {
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    writer.flush().map_err(FrameError::Io)
}

/// Messages from the supervisor to a worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
// Built once per invocation and serialized at once; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum ToWorker {
    /// Run one invocation; the frame payload is the function's stdin.
    Invoke(Invocation),
    /// Finish and exit cleanly.
    Shutdown,
    /// Answer to `Started` when the invocation asked for `confirm_start`: the supervisor
    /// has set the limits for running the guest; go ahead.
    Proceed,
    /// To a zygote (`wasmbox-worker --zygote`): fork a worker for this slot. The frame
    /// carries the new worker's socket, then the slot's `cgroup.procs` files (SCM_RIGHTS).
    Fork(ForkRequest),
    /// A piece of a streamed `wasi:http` request body (the frame payload, at most
    /// [`MAX_REQUEST_PIECE`] bytes). Sent only after the worker's `RequestBodyWanted`.
    RequestBody,
    /// The end of a streamed request body, and the last frame of the invocation the
    /// supervisor sends: `whole` when the client sent all of it, otherwise it was cut (the
    /// client failed, or the handler finished without reading it).
    RequestEnd { whole: bool },
}

/// What a forked worker is, beyond the settings it shares with the zygote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForkRequest {
    pub slot: usize,
    /// (uid, gid) the worker switches to.
    #[serde(default)]
    pub user: Option<(u32, u32)>,
    /// `cgroup.procs` descriptors after the socket.
    #[serde(default)]
    pub placement_fds: u32,
}

/// Messages from a worker to the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// First frame after start: who is speaking and which protocol.
    Hello(Hello),
    /// The module is ready and the guest starts now. Sent only when the module was not
    /// already in the worker's memory, so the supervisor restarts its deadline after a
    /// compile instead of counting compile time against the function.
    Started,
    /// The invocation finished; payload is stdout followed by stderr.
    Result(InvocationResult),
    /// From a zygote: the worker asked for is running, as a child of the supervisor.
    Forked { pid: u32 },
    /// A `wasi:http` handler set its response: status and headers. Its body follows as
    /// `ResponseBody` frames, then the `Result`.
    ResponseHead(ResponseHead),
    /// A piece of a `wasi:http` response body (the frame payload).
    ResponseBody,
    /// For a request whose body is streamed (`HttpRequest::streamed`): past `Started` and
    /// `Proceed`, the worker now reads `RequestBody` frames until `RequestEnd`.
    RequestBodyWanted,
}

/// Largest payload of one `RequestBody` frame.
pub const MAX_REQUEST_PIECE: usize = 64 << 10;

/// Largest payload of one `ResponseBody` frame; a worker that sends more is broken.
pub const MAX_RESPONSE_PIECE: usize = 64 << 10;

/// The head of a `wasi:http` response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Names and values, each value's bytes as one char per byte (Latin-1), so any value
    /// survives JSON unchanged.
    pub headers: Vec<(String, String)>,
}

/// A request for a `wasi:http/proxy` component (`Invocation::http`). Its body is the
/// `Invoke` frame's payload, whole; or, when `streamed`, that payload is the body's first
/// part and the rest follows as `RequestBody` frames once the worker asks for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub scheme: String,
    pub authority: String,
    pub path_with_query: String,
    /// As in [`ResponseHead::headers`].
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub streamed: bool,
}

/// Bytes as a string of one char per byte (Latin-1), for header values in JSON.
pub fn bytes_to_latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// The bytes [`bytes_to_latin1`] made; `None` for a char above U+00FF.
pub fn latin1_to_bytes(text: &str) -> Option<Vec<u8>> {
    text.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    pub worker_version: String,
    pub engine: String,
    pub engine_version: String,
    pub pid: u32,
    /// The worker's `/proc/self/cgroup`, read as the first thing its `main` does: the
    /// supervisor checks it was placed in its slot's cgroup before it ran any code.
    #[serde(default)]
    pub cgroup: String,
    /// The hardening layers this worker applied before it said hello, by name (see
    /// [`HARDENING_LAYERS`]); the supervisor refuses a worker missing one it asked for.
    #[serde(default)]
    pub hardening: Vec<String>,
    /// Who stops a command at its deadline: the engine, or the supervisor by killing the
    /// worker (an engine whose native code cannot be interrupted).
    #[serde(default)]
    pub deadlines: Deadlines,
}

/// Who enforces an invocation's deadline.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Deadlines {
    /// The engine interrupts the guest and the worker answers `DeadlineExceeded`; the
    /// supervisor kills the worker only after the kill grace (its backstop).
    #[default]
    Engine,
    /// The guest runs as plain native code: the supervisor kills the worker at the
    /// deadline itself, with no grace. Session steps are still stopped by the engine.
    Process,
}

/// Names of the worker hardening layers, as reported in [`Hello::hardening`].
pub const HARDENING_LAYERS: [&str; 8] =
    ["close_fds", "rlimits", "netns", "user", "pdeathsig", "non_dumpable", "no_new_privs", "seccomp"];

/// Bytes of a function's stderr that are kept (its tail): what error responses carry.
pub const STDERR_TAIL_BYTES: usize = 4096;

/// Most descriptors one frame may carry: the module file and one per preopened directory.
pub const MAX_PASSED_FDS: usize = 64;

/// A module as the supervisor's registry knows it: where it lives and what it hashes to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModuleRef {
    pub path: PathBuf,
    /// Lowercase hex SHA-256 of the module bytes; the cache key everywhere.
    pub sha256: String,
}

/// A directory the guest sees at `guest`, backed by host directory `host`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// Everything a worker needs to run one invocation, besides stdin (the payload).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Invocation {
    pub request_id: String,
    pub function: String,
    pub module: ModuleRef,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub preopens: Vec<Preopen>,
    /// Cap on the guest's linear memory, in bytes.
    pub memory_limit_bytes: u64,
    /// Wall-clock deadline for the guest, from the moment it starts.
    pub timeout_ms: u64,
    /// Cap on captured stdout and on retained stderr, each.
    pub max_output_bytes: u64,
    /// After compiling or loading the module (when it sends `Started`), wait for `Proceed`
    /// before running the guest, so the supervisor can switch the worker's cgroup from its
    /// compile allowance to the invocation's own memory limit first.
    #[serde(default)]
    pub confirm_start: bool,
    /// Descriptors sent with this frame (SCM_RIGHTS): the module file, opened read-only,
    /// when `module_fd` is set, then the module's artifact when `artifact` is set, then one
    /// directory per entry of `preopens`, in order. The worker opens no host path
    /// itself, so it needs no access to the functions directory or the preopened
    /// directories' parents once it runs as an unprivileged user.
    #[serde(default)]
    pub passed_fds: u32,
    /// The first descriptor is the module file. The supervisor leaves it out when its
    /// record says the worker has the module (`module_key`) in memory; a worker that does
    /// not answers [`Outcome::ModuleNotHeld`] without running anything, and is sent the
    /// invocation again with the file.
    #[serde(default)]
    pub module_fd: bool,
    /// The descriptor after the module file is the module's precompiled artifact (for
    /// `module_key`), made by the supervisor's compiler process and checked against its
    /// record: the worker loads it instead of compiling. Workers never write artifacts.
    #[serde(default)]
    pub artifact: bool,
    /// A step of a stateful session instead of a command run: the module is a reactor,
    /// and the payload starts with the session's snapshot (see [`SessionCall`]).
    #[serde(default)]
    pub session: Option<SessionCall>,
    /// A request for a `wasi:http/proxy` component instead of a command run: the payload
    /// is the request body; the worker answers `ResponseHead`, `ResponseBody`s, `Result`.
    #[serde(default)]
    pub http: Option<HttpRequest>,
}

impl Invocation {
    /// What the worker's module cache knows this module as: a session module is rewritten
    /// before it is compiled (every mutable global exported), so it is a module of its own.
    pub fn module_key(&self) -> String {
        module_key(&self.module.sha256, self.session.is_some())
    }
}

/// What a compile process (`wasmbox-worker --compile-artifact`) reports on its stdout, one
/// JSON line; the artifact itself is the file `file` in the directory it was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CompileReport {
    Compiled {
        engine: String,
        version: String,
        file: String,
    },
    /// Not valid Wasm, or not what the kind needs; the message says why.
    Invalid {
        message: String,
    },
    /// The module's bytes do not have the hash it was asked to compile.
    Changed,
    /// The engine keeps no artifacts (WasmEdge without its AOT compiler).
    Unsupported {
        engine: String,
        version: String,
    },
    /// The module is valid but compiling or writing the artifact failed (not the module's
    /// fault: it may work next time).
    Failed {
        message: String,
    },
}

/// Cache key of a module: its hash, marked for the rewritten form sessions run.
pub fn module_key(sha256: &str, session: bool) -> String {
    if session { format!("{sha256}+session") } else { sha256.to_owned() }
}

/// One step of a session. The payload of the `Invoke` frame is the snapshot to restore
/// (`snapshot_len` bytes, none for `Create`) followed by the message (stdin).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionCall {
    pub op: SessionOp,
    /// The export to call with the message (`Message` only).
    pub handler: String,
    pub snapshot_len: u64,
    /// The largest snapshot the worker may send back; a state that encodes larger fails
    /// the step with [`Outcome::SnapshotTooLarge`].
    pub max_snapshot_bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SessionOp {
    /// Instantiate, run `_initialize` when the module exports it, snapshot.
    Create,
    /// Restore the snapshot, deliver the message to the handler, snapshot when it returns.
    Message,
    /// Restore the snapshot and stop: proves an imported snapshot fits the module.
    Check,
}

/// Timings and sizes of a session step, reported by the worker.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStats {
    /// Restoring the snapshot into the fresh instance (decompress, write pages, set globals).
    pub restore_us: u64,
    /// Capturing the new snapshot (find changed pages, compress, encode).
    pub capture_us: u64,
    /// Pages written at restore.
    pub pages_restored: u32,
    /// Pages compressed anew at capture (the others were carried over as they were).
    pub pages_compressed: u32,
    /// Memory size at capture, in pages.
    pub memory_pages: u32,
}

/// How the module got into the worker for this invocation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModuleSource {
    /// Already compiled in this worker's memory.
    Memory,
    /// Loaded from a precompiled artifact in the cache directory.
    Artifact,
    /// Compiled from the `.wasm` bytes (and written to the cache directory).
    Compiled,
    /// Parsed from the `.wasm` bytes and run by the engine's interpreter, while its native
    /// artifact is compiled in the background (WasmEdge).
    Interpreted,
}

impl ModuleSource {
    /// The name used on the wire, in the `x-wasmbox-module-source` header and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleSource::Memory => "memory",
            ModuleSource::Artifact => "artifact",
            ModuleSource::Compiled => "compiled",
            ModuleSource::Interpreted => "interpreted",
        }
    }
}

/// Result of one invocation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InvocationResult {
    pub outcome: Outcome,
    pub stdout_len: u64,
    pub stderr_len: u64,
    /// Bytes of stderr that were dropped to keep only its tail.
    pub stderr_dropped: u64,
    pub module_source: Option<ModuleSource>,
    /// Time spent compiling or loading the module, in microseconds.
    pub prepare_us: u64,
    /// Time from instantiation to the guest's exit, in microseconds.
    pub exec_us: u64,
    /// Bytes of new session snapshot at the end of the payload, after stderr: present only
    /// when a session step succeeded and its state is to be committed.
    #[serde(default)]
    pub snapshot_len: u64,
    #[serde(default)]
    pub session: Option<SessionStats>,
}

/// What happened to the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// `_start` returned (code 0) or the guest called `proc_exit(code)`.
    Exited { code: i32 },
    /// The guest trapped (unreachable, out-of-bounds access, stack overflow...).
    Trapped { message: String },
    /// The engine interrupted the guest at its deadline.
    DeadlineExceeded,
    /// The guest needed more linear memory than the invocation allows.
    MemoryLimitExceeded { limit_bytes: u64 },
    /// The guest wrote more than the stdout cap.
    OutputTooLarge { limit_bytes: u64 },
    /// The module failed validation, compilation or linking, or is not a command module.
    InvalidModule { message: String },
    /// The module file no longer has the hash the supervisor sent: it was replaced.
    ModuleChanged,
    /// The invocation came without the module file (`Invocation::module_fd` unset) and the
    /// worker does not have the module in memory: nothing ran; send it with the file.
    ModuleNotHeld,
    /// The host could not set the invocation up (for example a preopen that vanished).
    SetupFailed { message: String },
    /// A session snapshot does not fit the module (its globals or pages do not match).
    SnapshotInvalid { message: String },
    /// The session's new state encodes larger than the snapshot size limit.
    SnapshotTooLarge { limit_bytes: u64 },
    /// A `wasi:http` handler returned without setting a response.
    NoResponse,
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation() -> Invocation {
        Invocation {
            request_id: "r1".into(),
            function: "hello".into(),
            module: ModuleRef { path: "/f/hello.wasm".into(), sha256: "ab".repeat(32) },
            argv: vec!["hello".into(), "x y".into()],
            env: vec![("K".into(), "V".into())],
            preopens: vec![Preopen { host: "/data".into(), guest: "/data".into(), read_only: true }],
            memory_limit_bytes: 64 << 20,
            timeout_ms: 1000,
            max_output_bytes: 1 << 20,
            confirm_start: true,
            passed_fds: 2,
            module_fd: true,
            artifact: false,
            session: Some(SessionCall {
                op: SessionOp::Message,
                handler: "handle".into(),
                snapshot_len: 3,
                max_snapshot_bytes: 1 << 20,
            }),
            http: None,
        }
    }

    #[test]
    fn frame_round_trip_keeps_header_and_payload() {
        let msg = ToWorker::Invoke(invocation());
        let mut wire = Vec::new();
        write_frame(&mut wire, &msg, &[b"std", b"in"]).unwrap();
        let (back, payload): (ToWorker, _) = read_frame(&mut wire.as_slice(), 1024).unwrap().unwrap();
        assert_eq!(back, msg);
        assert_eq!(payload, b"stdin");
    }

    #[test]
    fn clean_eof_between_frames_is_none_and_mid_frame_is_truncated() {
        let empty: &[u8] = &[];
        assert!(read_frame::<_, ToWorker>(&mut &*empty, 10).unwrap().is_none());
        let mut wire = Vec::new();
        write_frame(&mut wire, &ToWorker::Shutdown, &[b"abc"]).unwrap();
        for cut in 1..wire.len() {
            let err = read_frame::<_, ToWorker>(&mut &wire[..cut], 10).unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut at {cut}: {err:?}");
        }
    }

    #[test]
    fn prefix_limits_are_enforced_before_allocation() {
        let mut prefix = [0u8; PREFIX_LEN];
        assert!(matches!(parse_prefix(&prefix, 10), Err(FrameError::BadMagic)));
        prefix[..4].copy_from_slice(&MAGIC);
        prefix[4..8].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
        assert!(matches!(parse_prefix(&prefix, 10), Err(FrameError::HeaderTooLarge { .. })));
        prefix[4..8].copy_from_slice(&2u32.to_le_bytes());
        prefix[8..].copy_from_slice(&11u64.to_le_bytes());
        assert!(matches!(parse_prefix(&prefix, 10), Err(FrameError::PayloadTooLarge { len: 11, limit: 10 })));
        prefix[8..].copy_from_slice(&10u64.to_le_bytes());
        assert_eq!(parse_prefix(&prefix, 10).unwrap(), FrameLengths { header: 2, payload: 10 });
    }

    #[test]
    fn garbage_header_is_an_error_not_a_panic() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&MAGIC);
        wire.extend_from_slice(&3u32.to_le_bytes());
        wire.extend_from_slice(&0u64.to_le_bytes());
        wire.extend_from_slice(b"{x}");
        assert!(matches!(read_frame::<_, FromWorker>(&mut wire.as_slice(), 0), Err(FrameError::Header(_))));
    }

    #[test]
    fn latin1_carries_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(latin1_to_bytes(&bytes_to_latin1(&all)).unwrap(), all);
        assert_eq!(latin1_to_bytes("\u{100}"), None);
    }

    #[test]
    fn outcome_wire_format_is_tagged() {
        let json = serde_json::to_string(&Outcome::Exited { code: 3 }).unwrap();
        assert_eq!(json, r#"{"kind":"exited","code":3}"#);
    }
}
