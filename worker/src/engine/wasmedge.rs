//! WasmEdge engine (cargo feature `wasmedge`), on libwasmedge 0.17 through the C API that
//! wasmedge-sys exposes.
//!
//! Same semantics as the Wasmtime engine:
//! - validation and linking at compile time: a module whose imports WASI does not provide,
//!   or without a `_start: () -> ()`, is an invalid module, never a run-time surprise;
//! - AOT: where libwasmedge has its LLVM compiler, each module is compiled once into
//!   WasmEdge's native format in the artifact directory (interruptible code, so deadlines
//!   work), else the interpreter runs it;
//! - per invocation a fresh store, executor and WASI instance: argv, env, preopens (through
//!   the supervisor's descriptors, `/proc/self/fd/N/.`), stdin from a memfd, stdout and
//!   stderr through pipes drained into the same [`Capture`]s as Wasmtime's;
//! - linear memory capped at Memory-Request (the executor's maximum page count);
//! - the deadline through WasmEdge's asynchronous invocation: wait for it, then cancel.
//!   A function the engine cannot interrupt (inside a host call) is left to the
//!   supervisor's hard kill.

use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use wasmbox_protocol::Outcome;
use wasmedge_sys::ffi;

use super::{Engine, EngineError, RunRequest, RunResult, bounded};
use crate::capture::Capture;

const PAGE: u64 = 64 * 1024;

/// Owns one C context and frees it with the matching delete function.
struct Owned<T> {
    ptr: *mut T,
    free: unsafe extern "C" fn(*mut T),
}

impl<T> Owned<T> {
    fn new(ptr: *mut T, free: unsafe extern "C" fn(*mut T), what: &str) -> Result<Self, String> {
        if ptr.is_null() { Err(format!("cannot create the WasmEdge {what}")) } else { Ok(Owned { ptr, free }) }
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the matching create function, is non-null, and is freed
        // exactly once, here.
        unsafe { (self.free)(self.ptr) }
    }
}

/// A loaded and validated module. WasmEdge's AST modules are immutable once validated and
/// may be instantiated any number of times (by the worker's one serving thread).
#[derive(Clone)]
pub struct WasmEdgeModule {
    ast: Rc<Owned<ffi::WasmEdge_ASTModuleContext>>,
    /// Pages of the module's own linear memory at instantiation (its minimum).
    min_pages: u64,
}

/// WasmEdge behind the [`Engine`] trait.
pub struct WasmEdgeEngine {
    loader: Owned<ffi::WasmEdge_LoaderContext>,
    validator: Owned<ffi::WasmEdge_ValidatorContext>,
    /// A WASI instance with nothing in it: the reference for which imports WASI provides.
    wasi_reference: Owned<ffi::WasmEdge_ModuleInstanceContext>,
    /// The AOT compiler, where libwasmedge has one.
    compiler: Option<Owned<ffi::WasmEdge_CompilerContext>>,
    version: String,
    drain: std::sync::Mutex<OutputDrain>,
}

/// Set when WasmEdge refuses to grow a linear memory past its page limit: WasmEdge reports
/// it only through its log (memory.grow just returns -1 to the guest).
static GROW_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set when WasmEdge's loader could not use a native artifact and quietly parsed the Wasm
/// embedded in it for the interpreter instead ("falling back to interpreter", a warning).
static AOT_FELL_BACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

unsafe extern "C" fn on_log(msg: *const ffi::WasmEdge_LogMessage) {
    if msg.is_null() {
        return;
    }
    // SAFETY: WasmEdge passes a message valid for the duration of the call.
    let text = rstr(unsafe { (*msg).Message });
    if text.contains("Memory grow page failed") {
        GROW_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if text.contains("falling back to interpreter") {
        AOT_FELL_BACK.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::debug!(message = %bounded(text), "wasmedge");
}

fn message(result: ffi::WasmEdge_Result) -> String {
    // SAFETY: WasmEdge returns a static, NUL-terminated message for every result code.
    let text = unsafe { CStr::from_ptr(ffi::WasmEdge_ResultGetMessage(result)) };
    bounded(text.to_string_lossy().into_owned())
}

fn code(result: ffi::WasmEdge_Result) -> u32 {
    // SAFETY: plain value accessor.
    unsafe { ffi::WasmEdge_ResultGetCode(result) }
}

fn ok(result: ffi::WasmEdge_Result) -> bool {
    // SAFETY: plain value accessor.
    unsafe { ffi::WasmEdge_ResultOK(result) }
}

/// WasmEdge result codes this engine tells apart (include/common/enum.inc).
const TERMINATED: u32 = 0x01;
const INTERRUPTED: u32 = 0x07;

fn wstr(s: &str) -> ffi::WasmEdge_String {
    // SAFETY: wraps the borrowed bytes without copying; callers use it only while `s` lives.
    unsafe { ffi::WasmEdge_StringWrap(s.as_ptr().cast(), s.len() as u32) }
}

fn rstr(s: ffi::WasmEdge_String) -> String {
    if s.Buf.is_null() {
        return String::new();
    }
    // SAFETY: a WasmEdge_String from WasmEdge points at `Length` valid bytes owned by the
    // context it came from, alive for this call.
    let bytes = unsafe { std::slice::from_raw_parts(s.Buf.cast::<u8>(), s.Length as usize) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parameter and result types of a function type, for comparing signatures.
fn signature(
    ty: *const ffi::WasmEdge_FunctionTypeContext,
) -> Option<(Vec<ffi::WasmEdge_ValType>, Vec<ffi::WasmEdge_ValType>)> {
    if ty.is_null() {
        return None;
    }
    // SAFETY: `ty` is a live function type owned by an AST module or instance; the lists are
    // filled up to the lengths WasmEdge reports.
    unsafe {
        let np = ffi::WasmEdge_FunctionTypeGetParametersLength(ty);
        let nr = ffi::WasmEdge_FunctionTypeGetReturnsLength(ty);
        let mut params = vec![std::mem::zeroed::<ffi::WasmEdge_ValType>(); np as usize];
        let mut returns = vec![std::mem::zeroed::<ffi::WasmEdge_ValType>(); nr as usize];
        ffi::WasmEdge_FunctionTypeGetParameters(ty, params.as_mut_ptr(), np);
        ffi::WasmEdge_FunctionTypeGetReturns(ty, returns.as_mut_ptr(), nr);
        Some((params, returns))
    }
}

fn same_types(a: &[ffi::WasmEdge_ValType], b: &[ffi::WasmEdge_ValType]) -> bool {
    // SAFETY: plain value comparison.
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| unsafe { ffi::WasmEdge_ValTypeIsEqual(*x, *y) })
}

/// A path for WasmEdge's file APIs. WasmEdge makes every path absolute (by prefixing the
/// working directory's name), and the absolute name walks through the cache root's parents,
/// which a worker that dropped to an unprivileged user may not be allowed to traverse (the
/// root is private to the supervisor's user). A relative path is therefore given through
/// /proc/self/cwd: the same directory, reached without walking its parents.
fn c_path(path: &Path) -> Result<CString, EngineError> {
    let path = if path.is_relative() { Path::new("/proc/self/cwd").join(path) } else { path.to_path_buf() };
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| EngineError::Io { path: path.clone(), source: std::io::Error::other("NUL in path") })
}

impl WasmEdgeEngine {
    pub fn new() -> anyhow::Result<Self> {
        // SAFETY: creating and configuring fresh contexts; each is owned by an `Owned`.
        unsafe {
            // WasmEdge's own log goes through this callback (its default sink is stdout,
            // which is /dev/null in a worker); warnings and errors, which carry the two
            // facts WasmEdge gives no other way (a refused memory.grow, an artifact it
            // would not run natively).
            ffi::WasmEdge_LogSetCallback(Some(on_log));
            ffi::WasmEdge_LogSetLevel(ffi::WasmEdge_LogLevel_Warn);
            let conf = Owned::new(ffi::WasmEdge_ConfigureCreate(), ffi::WasmEdge_ConfigureDelete, "configuration")
                .map_err(anyhow::Error::msg)?;
            // One linear memory, as with Wasmtime: the cap then covers all of the guest's.
            ffi::WasmEdge_ConfigureRemoveProposal(conf.ptr, ffi::WasmEdge_Proposal_MultiMemories);
            ffi::WasmEdge_ConfigureRemoveProposal(conf.ptr, ffi::WasmEdge_Proposal_Threads);
            ffi::WasmEdge_ConfigureCompilerSetInterruptible(conf.ptr, true);
            ffi::WasmEdge_ConfigureCompilerSetOptimizationLevel(conf.ptr, ffi::WasmEdge_CompilerOptimizationLevel_O2);
            ffi::WasmEdge_ConfigureCompilerSetOutputFormat(conf.ptr, ffi::WasmEdge_CompilerOutputFormat_Native);
            let compiler =
                Owned::new(ffi::WasmEdge_CompilerCreate(conf.ptr), ffi::WasmEdge_CompilerDelete, "compiler").ok();
            if compiler.is_some() {
                // Only a loader in AOT mode runs a native artifact natively: in any other
                // mode WasmEdge takes the Wasm embedded in it and interprets that.
                ffi::WasmEdge_ConfigureSetRunMode(conf.ptr, ffi::WasmEdge_RunMode_AOT);
            } else {
                tracing::warn!("libwasmedge has no AOT compiler: functions run in WasmEdge's interpreter");
            }
            let loader = Owned::new(ffi::WasmEdge_LoaderCreate(conf.ptr), ffi::WasmEdge_LoaderDelete, "loader")
                .map_err(anyhow::Error::msg)?;
            let validator =
                Owned::new(ffi::WasmEdge_ValidatorCreate(conf.ptr), ffi::WasmEdge_ValidatorDelete, "validator")
                    .map_err(anyhow::Error::msg)?;
            let wasi_reference = Owned::new(
                ffi::WasmEdge_ModuleInstanceCreateWASI(std::ptr::null(), 0, std::ptr::null(), 0, std::ptr::null(), 0),
                ffi::WasmEdge_ModuleInstanceDelete,
                "WASI module",
            )
            .map_err(anyhow::Error::msg)?;
            let version = CStr::from_ptr(ffi::WasmEdge_VersionGet()).to_string_lossy().into_owned();
            let version = if compiler.is_some() { format!("{version}-aot") } else { format!("{version}-interp") };
            // The contexts above copied the configuration; `conf` is freed here.
            let drain = std::sync::Mutex::new(OutputDrain::start()?);
            Ok(WasmEdgeEngine { loader, validator, wasi_reference, compiler, version, drain })
        }
    }

    /// Validates a parsed module and checks that it is a WASI command whose every import
    /// WASI provides with the same signature.
    fn check(&self, ast: Owned<ffi::WasmEdge_ASTModuleContext>) -> Result<WasmEdgeModule, EngineError> {
        let invalid = |m: String| EngineError::InvalidModule(bounded(m));
        // SAFETY: `ast` is a live module just parsed by this engine's loader; every list is
        // sized by the length WasmEdge reports and read only while `ast` lives.
        unsafe {
            let res = ffi::WasmEdge_ValidatorValidate(self.validator.ptr, ast.ptr);
            if !ok(res) {
                return Err(invalid(message(res)));
            }
            let n = ffi::WasmEdge_ASTModuleListImportsLength(ast.ptr);
            let mut imports = vec![std::ptr::null(); n as usize];
            ffi::WasmEdge_ASTModuleListImports(ast.ptr, imports.as_mut_ptr(), n);
            for import in imports {
                let module = rstr(ffi::WasmEdge_ImportTypeGetModuleName(import));
                let name = rstr(ffi::WasmEdge_ImportTypeGetExternalName(import));
                let unknown = || invalid(format!("unknown import `{module}::{name}`"));
                if module != "wasi_snapshot_preview1"
                    || ffi::WasmEdge_ImportTypeGetExternalType(import) != ffi::WasmEdge_ExternalType_Function
                {
                    return Err(unknown());
                }
                let provided = ffi::WasmEdge_ModuleInstanceFindFunction(self.wasi_reference.ptr, wstr(&name));
                if provided.is_null() {
                    return Err(unknown());
                }
                let wanted = signature(ffi::WasmEdge_ImportTypeGetFunctionType(ast.ptr, import));
                let given = signature(ffi::WasmEdge_FunctionInstanceGetFunctionType(provided));
                match (wanted, given) {
                    (Some(w), Some(g)) if same_types(&w.0, &g.0) && same_types(&w.1, &g.1) => {}
                    _ => return Err(invalid(format!("incompatible import type for `{module}::{name}`"))),
                }
            }
            let n = ffi::WasmEdge_ASTModuleListExportsLength(ast.ptr);
            let mut exports = vec![std::ptr::null(); n as usize];
            ffi::WasmEdge_ASTModuleListExports(ast.ptr, exports.as_mut_ptr(), n);
            let mut start = None;
            let mut min_pages = 0;
            for export in exports {
                let name = rstr(ffi::WasmEdge_ExportTypeGetExternalName(export));
                match ffi::WasmEdge_ExportTypeGetExternalType(export) {
                    t if t == ffi::WasmEdge_ExternalType_Function && name == "_start" => {
                        start = signature(ffi::WasmEdge_ExportTypeGetFunctionType(ast.ptr, export));
                    }
                    t if t == ffi::WasmEdge_ExternalType_Memory => {
                        let ty = ffi::WasmEdge_ExportTypeGetMemoryType(ast.ptr, export);
                        if !ty.is_null() {
                            min_pages = min_pages.max(ffi::WasmEdge_LimitGetMin(ffi::WasmEdge_MemoryTypeGetLimit(ty)));
                        }
                    }
                    _ => {}
                }
            }
            match start {
                Some((p, r)) if p.is_empty() && r.is_empty() => {}
                Some(_) => return Err(invalid("export `_start` is not a function () -> ()".into())),
                None => return Err(invalid("module has no `_start` export (not a WASI command module)".into())),
            }
            Ok(WasmEdgeModule { ast: Rc::new(ast), min_pages })
        }
    }

    fn parse_buffer(&self, wasm: &[u8]) -> Result<Owned<ffi::WasmEdge_ASTModuleContext>, EngineError> {
        let mut ast = std::ptr::null_mut();
        // SAFETY: the loader reads `wasm` for the duration of the call and hands back a new
        // AST module (or null with an error result).
        let res =
            unsafe { ffi::WasmEdge_LoaderParseFromBuffer(self.loader.ptr, &mut ast, wasm.as_ptr(), wasm.len() as u32) };
        if !ok(res) {
            // Worded as the Wasmtime engine words it, so clients see one message per failure.
            return Err(EngineError::InvalidModule(format!("failed to parse WebAssembly module: {}", message(res))));
        }
        Owned::new(ast, ffi::WasmEdge_ASTModuleDelete, "AST module").map_err(EngineError::InvalidModule)
    }
}

impl Engine for WasmEdgeEngine {
    type Module = WasmEdgeModule;

    fn name(&self) -> &'static str {
        "wasmedge"
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn compile(&self, wasm: &[u8]) -> Result<WasmEdgeModule, EngineError> {
        if wasm.len() > u32::MAX as usize {
            return Err(EngineError::InvalidModule("module larger than 4 GiB".into()));
        }
        let ast = self.parse_buffer(wasm)?;
        self.check(ast)
    }

    fn artifact_extension(&self) -> Option<&'static str> {
        self.compiler.as_ref().map(|_| "so")
    }

    fn precompile(&self, wasm: &[u8], artifact: &Path) -> Result<(), EngineError> {
        let Some(compiler) = &self.compiler else { return Err(EngineError::Unsupported("precompiling")) };
        // Validate first: the compiler's own errors are less precise.
        self.compile(wasm)?;
        let out = c_path(artifact)?;
        // SAFETY: the compiler reads `wasm` and writes the native library at `out`.
        let res = unsafe {
            ffi::WasmEdge_CompilerCompileFromBuffer(compiler.ptr, wasm.as_ptr(), wasm.len() as u64, out.as_ptr())
        };
        if !ok(res) {
            // The module validated above: this is the compiler or the file system failing,
            // and the cache falls back to compiling in memory.
            return Err(EngineError::Io { path: artifact.into(), source: std::io::Error::other(message(res)) });
        }
        Ok(())
    }

    fn load_artifact(&self, artifact: &Path) -> Result<WasmEdgeModule, EngineError> {
        let path = c_path(artifact)?;
        let mut ast = std::ptr::null_mut();
        AOT_FELL_BACK.store(false, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: loading trusts the file to be native code produced by this engine version:
        // the module cache passes only artifacts from its own directory, owned by this uid
        // and not writable by others; WasmEdge checks the version recorded in the file.
        let res = unsafe { ffi::WasmEdge_LoaderParseFromFile(self.loader.ptr, &mut ast, path.as_ptr()) };
        if !ok(res) {
            return Err(EngineError::StaleArtifact { path: artifact.into(), reason: message(res) });
        }
        let ast = Owned::new(ast, ffi::WasmEdge_ASTModuleDelete, "AST module")
            .map_err(|reason| EngineError::StaleArtifact { path: artifact.into(), reason })?;
        if AOT_FELL_BACK.load(std::sync::atomic::Ordering::Relaxed) {
            // Running it would interpret the embedded Wasm: rebuild it instead.
            return Err(EngineError::StaleArtifact {
                path: artifact.into(),
                reason: "WasmEdge cannot run its native code".into(),
            });
        }
        self.check(ast)
    }

    fn run(&self, module: &WasmEdgeModule, request: RunRequest<'_>) -> RunResult {
        super::run_captured(&request, |stdout, stderr| {
            self.run_guest(module, &request, stdout, stderr)
                .unwrap_or_else(|message| Outcome::SetupFailed { message: bounded(message) })
        })
    }
}

/// Copies the guest's stdout and stderr pipes into their captures. One thread does it for
/// the engine's lifetime (WasmEdge's WASI writes to descriptors, so someone must read the
/// other ends while the guest runs), taking one invocation's pipes at a time: no thread is
/// started per invocation. A strict capture that overflows makes it close that pipe, so
/// the guest's next write fails (EPIPE) as with Wasmtime.
struct OutputDrain {
    jobs: std::sync::mpsc::Sender<[(OwnedFd, Capture); 2]>,
    finished: std::sync::mpsc::Receiver<()>,
}

impl OutputDrain {
    fn start() -> std::io::Result<Self> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<[(OwnedFd, Capture); 2]>();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("wasmedge-output".into()).spawn(move || {
            for pipes in job_rx {
                drain_until_closed(pipes);
                if done.send(()).is_err() {
                    return;
                }
            }
        })?;
        Ok(OutputDrain { jobs, finished })
    }

    /// Hands over one invocation's read ends; [`OutputDrain::wait`] returns once both saw
    /// end of file (every write end closed) or were closed for overflowing.
    fn begin(&self, stdout: (OwnedFd, Capture), stderr: (OwnedFd, Capture)) -> Result<(), String> {
        self.jobs.send([stdout, stderr]).map_err(|_| "the output thread is gone".to_string())
    }

    fn wait(&self) {
        // An error means the thread is gone, and the pipes with it: nothing left to wait for.
        let _ = self.finished.recv();
    }
}

/// Reads both pipes until each reaches end of file or overflows its capture.
fn drain_until_closed(pipes: [(OwnedFd, Capture); 2]) {
    use nix::poll::{PollFd, PollFlags, ppoll};
    let mut open: Vec<(std::fs::File, Capture)> =
        pipes.into_iter().map(|(fd, capture)| (std::fs::File::from(fd), capture)).collect();
    let mut buf = vec![0u8; 64 * 1024];
    while !open.is_empty() {
        let mut ready = vec![false; open.len()];
        {
            let mut fds: Vec<PollFd<'_>> =
                open.iter().map(|(f, _)| PollFd::new(f.as_fd(), PollFlags::POLLIN)).collect();
            match ppoll(&mut fds, None, None) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            for (i, fd) in fds.iter().enumerate() {
                ready[i] = fd.revents().is_some_and(|r| !r.is_empty());
            }
        }
        let mut i = 0;
        open.retain_mut(|(file, capture)| {
            let this = i;
            i += 1;
            if !ready[this] {
                return true;
            }
            match file.read(&mut buf) {
                Ok(0) => false,
                Ok(n) => capture.append(&buf[..n]).is_ok(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
                Err(_) => false,
            }
        });
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Stdin as a memfd holding the request body, positioned at its start.
fn stdin_file(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(c"wasmbox-stdin", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
    Ok(OwnedFd::from(file))
}

impl WasmEdgeEngine {
    fn run_guest(
        &self,
        module: &WasmEdgeModule,
        request: &RunRequest<'_>,
        stdout: &Capture,
        stderr: &Capture,
    ) -> Result<Outcome, String> {
        let max_pages = request.memory_limit_bytes / PAGE;
        if module.min_pages > max_pages {
            return Ok(Outcome::MemoryLimitExceeded { limit_bytes: request.memory_limit_bytes });
        }
        let cstrings = |items: Vec<String>| -> Result<Vec<CString>, String> {
            items
                .into_iter()
                .map(|s| CString::new(s).map_err(|_| "NUL in an argument, variable or path".to_string()))
                .collect()
        };
        let args = cstrings(request.argv.to_vec())?;
        let envs = cstrings(request.env.iter().map(|(k, v)| format!("{k}={v}")).collect())?;
        let mut preopens = Vec::new();
        for (i, preopen) in request.preopens.iter().enumerate() {
            if preopen.guest.contains(':') {
                return Err(format!("preopen guest path {:?} contains ':', which WasmEdge cannot map", preopen.guest));
            }
            let host = match request.preopen_dirs.get(i) {
                // The descriptor's own link: reachable by this process whatever its uid.
                Some(dir) => format!("/proc/self/fd/{}/.", dir.as_raw_fd()),
                None => preopen.host.display().to_string(),
            };
            let mode = if preopen.read_only { ":readonly" } else { "" };
            preopens.push(format!("{}:{host}{mode}", preopen.guest));
        }
        let preopens = cstrings(preopens)?;
        let ptrs = |v: &[CString]| v.iter().map(|c| c.as_ptr()).collect::<Vec<_>>();
        let (arg_ptrs, env_ptrs, preopen_ptrs) = (ptrs(&args), ptrs(&envs), ptrs(&preopens));

        let stdin = stdin_file(&request.stdin).map_err(|e| format!("stdin: {e}"))?;
        let (out_read, out_write) = pipe().map_err(|e| format!("stdout pipe: {e}"))?;
        let (err_read, err_write) = pipe().map_err(|e| format!("stderr pipe: {e}"))?;
        let drain = self.drain.lock().unwrap_or_else(|p| p.into_inner());
        drain.begin((out_read, stdout.clone()), (err_read, stderr.clone()))?;

        // SAFETY: every context below is created here, owned by an `Owned` dropped at the end
        // of this block in reverse order (instances before the store and executor), and used
        // only on this thread except by WasmEdge's own async worker, which is joined (waited
        // for) before anything is dropped. The WASI instance borrows the three descriptors
        // passed to it; they outlive it and are closed after it.
        let outcome = (|| unsafe {
            let conf = Owned::new(ffi::WasmEdge_ConfigureCreate(), ffi::WasmEdge_ConfigureDelete, "configuration")?;
            ffi::WasmEdge_ConfigureRemoveProposal(conf.ptr, ffi::WasmEdge_Proposal_MultiMemories);
            ffi::WasmEdge_ConfigureRemoveProposal(conf.ptr, ffi::WasmEdge_Proposal_Threads);
            ffi::WasmEdge_ConfigureSetMaxMemoryPage(conf.ptr, max_pages);
            let store = Owned::new(ffi::WasmEdge_StoreCreate(), ffi::WasmEdge_StoreDelete, "store")?;
            let executor = Owned::new(
                ffi::WasmEdge_ExecutorCreate(conf.ptr, std::ptr::null_mut()),
                ffi::WasmEdge_ExecutorDelete,
                "executor",
            )?;
            let wasi = Owned::new(
                ffi::WasmEdge_ModuleInstanceCreateWASIWithFds(
                    arg_ptrs.as_ptr(),
                    arg_ptrs.len() as u32,
                    env_ptrs.as_ptr(),
                    env_ptrs.len() as u32,
                    preopen_ptrs.as_ptr(),
                    preopen_ptrs.len() as u32,
                    stdin.as_raw_fd(),
                    out_write.as_raw_fd(),
                    err_write.as_raw_fd(),
                ),
                ffi::WasmEdge_ModuleInstanceDelete,
                "WASI module",
            )?;
            let res = ffi::WasmEdge_ExecutorRegisterImport(executor.ptr, store.ptr, wasi.ptr);
            if !ok(res) {
                return Err(format!("registering WASI: {}", message(res)));
            }
            let mut instance = std::ptr::null_mut();
            let res = ffi::WasmEdge_ExecutorInstantiate(executor.ptr, &mut instance, store.ptr, module.ast.ptr);
            let outcome = if !ok(res) {
                Outcome::Trapped { message: message(res) }
            } else {
                let instance = Owned::new(instance, ffi::WasmEdge_ModuleInstanceDelete, "instance")?;
                let start = ffi::WasmEdge_ModuleInstanceFindFunction(instance.ptr, wstr("_start"));
                if start.is_null() {
                    return Err("`_start` vanished".into());
                }
                GROW_REFUSED.store(false, std::sync::atomic::Ordering::Relaxed);
                let job = Owned::new(
                    ffi::WasmEdge_ExecutorAsyncInvoke(executor.ptr, start, std::ptr::null(), 0),
                    ffi::WasmEdge_AsyncDelete,
                    "async invocation",
                )?;
                let millis = u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX);
                let finished = ffi::WasmEdge_AsyncWaitFor(job.ptr, millis);
                if !finished {
                    ffi::WasmEdge_AsyncCancel(job.ptr);
                }
                // Waits for the execution to end (at once after a cancel at the next
                // interruption check).
                let res = ffi::WasmEdge_AsyncGet(job.ptr, std::ptr::null_mut(), 0);
                let pages = {
                    let memory = ffi::WasmEdge_ModuleInstanceFindMemory(instance.ptr, wstr("memory"));
                    if memory.is_null() { 0 } else { ffi::WasmEdge_MemoryInstanceGetPageSize(memory) }
                };
                if ok(res) {
                    let code =
                        if code(res) == TERMINATED { ffi::WasmEdge_ModuleInstanceWASIGetExitCode(wasi.ptr) } else { 0 };
                    Outcome::Exited { code: code as i32 }
                } else if !finished || code(res) == INTERRUPTED {
                    Outcome::DeadlineExceeded
                } else if GROW_REFUSED.load(std::sync::atomic::Ordering::Relaxed)
                    || (max_pages > 0 && pages >= max_pages)
                {
                    // A trap after a refused memory.grow (a Rust guest aborts when allocation
                    // fails), or with the memory at its cap: the guest ran out of memory.
                    Outcome::MemoryLimitExceeded { limit_bytes: request.memory_limit_bytes }
                } else {
                    Outcome::Trapped { message: message(res) }
                }
            };
            drop(wasi);
            Ok(outcome)
        })();
        // WASI borrowed the three descriptors (it never closes them): with the instance gone,
        // closing the write ends here lets the output thread see end of file, also when
        // setting up the instance failed.
        drop((stdin, out_write, err_write));
        drain.wait();
        outcome
    }
}

#[cfg(test)]
mod tests {
    // The conformance suite (integration/tests/all/conformance.rs) runs every behaviour
    // against this engine in builds with the `wasmedge` feature where libwasmedge is found.
    use super::*;

    #[test]
    fn unknown_imports_and_missing_start_are_invalid_modules() {
        let engine = WasmEdgeEngine::new().expect("libwasmedge");
        let unknown = wat::parse_str(r#"(module (import "env" "launch" (func)) (func (export "_start")))"#).unwrap();
        assert!(matches!(engine.compile(&unknown), Err(EngineError::InvalidModule(m)) if m.contains("env::launch")));
        let no_start = wat::parse_str(r#"(module (func (export "main")))"#).unwrap();
        assert!(matches!(engine.compile(&no_start), Err(EngineError::InvalidModule(m)) if m.contains("_start")));
        let fine = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#).unwrap();
        assert_eq!(engine.compile(&fine).unwrap().min_pages, 1);
    }
}
