//! WasmEdge engine (cargo feature `wasmedge`), on libwasmedge 0.17 through the C API that
//! wasmedge-sys exposes.
//!
//! Same semantics as the Wasmtime engine:
//! - validation and linking at compile time: a module whose imports WASI does not provide,
//!   or (a command) without a `_start: () -> ()`, is an invalid module, never a run-time
//!   surprise;
//! - native code only from the trusted compiler: tenant bytes are parsed by a loader in
//!   interpreter mode, so an AOT section a tenant put into its own module is never loaded;
//!   only artifact files (which the supervisor's compile processes wrote) go through the
//!   loader in AOT mode. Where libwasmedge has no LLVM compiler the interpreter runs all;
//! - deadlines: commands are compiled as plain native code, which cannot be interrupted,
//!   and run on the serving thread; the supervisor kills the worker at the deadline
//!   ([`Deadlines::Process`]). With `--wasmedge-interruptible` they are compiled with
//!   interruption checks and stopped by WasmEdge's asynchronous invocation (wait, then
//!   cancel) instead. Session steps are always compiled interruptible and stopped that way,
//!   as their snapshot work follows the guest;
//! - per worker, made once: loaders, validator, a store, and one executor per memory cap
//!   in use. Per invocation only what must be fresh: a WASI instance (argv, env, preopens
//!   through the supervisor's descriptors as `/proc/self/fd/N/.`) and the module instance.
//!   Stdin is a memfd holding the body; stdout and stderr are memfds whose size is sealed
//!   at the capture's bound, read back when the guest is done: no pipe, no thread;
//! - linear memory capped at Memory-Request (the executor's maximum page count);
//! - session steps: the same fresh instance, driven by [`session::drive`] through the
//!   memory and globals the rewritten module exports.
//!
//! Why the C API (`wasmedge_sys::ffi`) and not wasmedge-sdk 0.17's safe types, part by part:
//! - configuration, loader, validator, module inspection: the SDK's `Config` and `Module`
//!   keep their contexts private, so nothing made from them can reach the executor below;
//!   and `ExternalInstanceType` panics on a tag import or export;
//! - store and executor: neither SDK nor sys type exposes its context, which the
//!   asynchronous invocation (the only cancellation WasmEdge has) needs; the SDK's own
//!   timeout interrupts with a signal and `siglongjmp` through WasmEdge's C++ frames;
//! - WASI: there is no wrapper for a WASI instance over chosen descriptors
//!   (`WasmEdge_ModuleInstanceCreateWASIWithFds`);
//! - memory and globals: reached from the instance above, a raw context;
//! - log level and callback: not wrapped (the SDK only turns logging on or off).
//!
//! The ahead-of-time compile is the one operation that stands alone, and it uses the SDK
//! (`wasmedge_sdk::Compiler` with a `ConfigBuilder` configuration).

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use wasmbox_protocol::snapshot::GlobalValue;
use wasmbox_protocol::{Deadlines, ModuleSource, Outcome};
use wasmedge_sys::ffi;

use super::{ArtifactFile, Engine, EngineError, ModuleKind, PathPolicy, RunRequest, RunResult, bounded};
use crate::capture::Capture;
use crate::session;

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
    kind: ModuleKind,
    /// The artifact the supervisor passed, kept open as long as the module: libwasmedge
    /// knows it by its `/proc/self/fd/N` path.
    _artifact: Option<Rc<std::fs::File>>,
}

/// WasmEdge behind the [`Engine`] trait.
pub struct WasmEdgeEngine {
    /// Parses tenant bytes, in interpreter mode: an AOT section inside them is ignored.
    loader: Owned<ffi::WasmEdge_LoaderContext>,
    /// Loads the trusted compiler's artifacts, in AOT mode (where there is a compiler).
    aot_loader: Option<Owned<ffi::WasmEdge_LoaderContext>>,
    validator: Owned<ffi::WasmEdge_ValidatorContext>,
    /// A WASI instance with nothing in it: the reference for which imports WASI provides.
    wasi_reference: Owned<ffi::WasmEdge_ModuleInstanceContext>,
    /// libwasmedge has its LLVM compiler (a compiler context is made per compile).
    has_compiler: bool,
    deadlines: Deadlines,
    version: String,
    /// The store and executors invocations run in, made on first use (in the worker, not
    /// in the zygote it was forked from).
    runtime: RefCell<Runtime>,
}

// SAFETY: the engine's contexts are owned by it alone and used by one thread at a time;
// libwasmedge's contexts are not tied to the thread that made them. The engine is moved to
// another thread only as a whole (the zygote makes it, each forked worker's one thread
// serves with it); `Rc`s inside modules never leave the thread that made them (modules are
// not `Send`).
unsafe impl Send for WasmEdgeEngine {}

/// Executors kept, one per memory cap (WasmEdge fixes the page limit per executor).
const MAX_EXECUTORS: usize = 8;

/// What invocations reuse: one store, and an executor per memory cap, least recently used
/// first out.
#[derive(Default)]
struct Runtime {
    store: Option<Owned<ffi::WasmEdge_StoreContext>>,
    executors: Vec<(u64, Owned<ffi::WasmEdge_ExecutorContext>)>,
}

impl Runtime {
    /// The store and an executor whose memories grow to at most `max_pages`.
    fn get(
        &mut self,
        max_pages: u64,
    ) -> Result<(*mut ffi::WasmEdge_StoreContext, *mut ffi::WasmEdge_ExecutorContext), String> {
        if self.store.is_none() {
            // SAFETY: a fresh store, owned by the `Owned`.
            self.store = Some(Owned::new(unsafe { ffi::WasmEdge_StoreCreate() }, ffi::WasmEdge_StoreDelete, "store")?);
        }
        let store = self.store.as_ref().map(|s| s.ptr).unwrap_or(std::ptr::null_mut());
        if let Some(i) = self.executors.iter().position(|(pages, _)| *pages == max_pages) {
            // Most recently used last.
            let entry = self.executors.remove(i);
            let executor = entry.1.ptr;
            self.executors.push(entry);
            return Ok((store, executor));
        }
        if self.executors.len() >= MAX_EXECUTORS {
            self.executors.remove(0);
        }
        let conf = configuration(Some(max_pages), ffi::WasmEdge_RunMode_Interpreter)?;
        // SAFETY: the executor copies the configuration; both are owned by `Owned`s.
        let executor = Owned::new(
            unsafe { ffi::WasmEdge_ExecutorCreate(conf.ptr, std::ptr::null_mut()) },
            ffi::WasmEdge_ExecutorDelete,
            "executor",
        )?;
        let ptr = executor.ptr;
        self.executors.push((max_pages, executor));
        Ok((store, ptr))
    }
}

/// The configuration every context of this engine is made from: one linear memory (as
/// with Wasmtime, so the cap covers all of the guest's), no threads, the given page cap
/// and run mode.
fn configuration(
    max_pages: Option<u64>,
    mode: ffi::WasmEdge_RunMode,
) -> Result<Owned<ffi::WasmEdge_ConfigureContext>, String> {
    // SAFETY: a fresh configuration, owned by the `Owned`, set up before anything reads it.
    unsafe {
        let conf = Owned::new(ffi::WasmEdge_ConfigureCreate(), ffi::WasmEdge_ConfigureDelete, "configuration")?;
        ffi::WasmEdge_ConfigureRemoveProposal(conf.ptr, ffi::WasmEdge_Proposal_MultiMemories);
        ffi::WasmEdge_ConfigureRemoveProposal(conf.ptr, ffi::WasmEdge_Proposal_Threads);
        if let Some(pages) = max_pages {
            ffi::WasmEdge_ConfigureSetMaxMemoryPage(conf.ptr, pages);
        }
        ffi::WasmEdge_ConfigureSetRunMode(conf.ptr, mode);
        Ok(conf)
    }
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
    let path = reachable(path);
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| EngineError::Io { path: path.clone(), source: std::io::Error::other("NUL in path") })
}

/// `path` as WasmEdge should be given it (see [`c_path`]).
fn reachable(path: &Path) -> std::path::PathBuf {
    if path.is_relative() { Path::new("/proc/self/cwd").join(path) } else { path.to_path_buf() }
}

/// The WASI socket calls WasmEdge has in two versions (`lib/executor/instantiate/import.cpp`).
const SOCKET_CALLS_WITH_V2: [&str; 11] = [
    "sock_open",
    "sock_bind",
    "sock_connect",
    "sock_listen",
    "sock_accept",
    "sock_recv",
    "sock_recv_from",
    "sock_send",
    "sock_send_to",
    "sock_getlocaladdr",
    "sock_getpeeraddr",
];

impl WasmEdgeEngine {
    /// An engine whose commands are stopped at their deadline as `deadlines` says: by the
    /// supervisor killing the worker (`Process`: plain native code, the fast choice), or by
    /// WasmEdge itself (`Engine`: code compiled with interruption checks).
    pub fn new(deadlines: Deadlines) -> anyhow::Result<Self> {
        // WasmEdge's own log goes through this callback (its default sink is stdout, which
        // is /dev/null in a worker); warnings and errors, which carry the two facts
        // WasmEdge gives no other way (a refused memory.grow, an artifact it would not run
        // natively).
        // SAFETY: installs a callback that only reads the message it is given.
        unsafe {
            ffi::WasmEdge_LogSetCallback(Some(on_log));
            ffi::WasmEdge_LogSetLevel(ffi::WasmEdge_LogLevel_Warn);
        }
        let interp = configuration(None, ffi::WasmEdge_RunMode_Interpreter).map_err(anyhow::Error::msg)?;
        // SAFETY: each context copies the configuration it is made from and is owned by an
        // `Owned`; the probing compiler is deleted at once.
        unsafe {
            let compiler = ffi::WasmEdge_CompilerCreate(interp.ptr);
            let has_compiler = !compiler.is_null();
            if has_compiler {
                ffi::WasmEdge_CompilerDelete(compiler);
            } else {
                tracing::warn!("libwasmedge has no AOT compiler: functions run in WasmEdge's interpreter");
            }
            let loader = Owned::new(ffi::WasmEdge_LoaderCreate(interp.ptr), ffi::WasmEdge_LoaderDelete, "loader")
                .map_err(anyhow::Error::msg)?;
            let aot_loader = if has_compiler {
                // Only a loader in AOT mode runs a native artifact natively: in any other
                // mode WasmEdge takes the Wasm embedded in it and interprets that.
                let aot = configuration(None, ffi::WasmEdge_RunMode_AOT).map_err(anyhow::Error::msg)?;
                Some(
                    Owned::new(ffi::WasmEdge_LoaderCreate(aot.ptr), ffi::WasmEdge_LoaderDelete, "AOT loader")
                        .map_err(anyhow::Error::msg)?,
                )
            } else {
                None
            };
            let validator =
                Owned::new(ffi::WasmEdge_ValidatorCreate(interp.ptr), ffi::WasmEdge_ValidatorDelete, "validator")
                    .map_err(anyhow::Error::msg)?;
            let wasi_reference = Owned::new(
                ffi::WasmEdge_ModuleInstanceCreateWASI(std::ptr::null(), 0, std::ptr::null(), 0, std::ptr::null(), 0),
                ffi::WasmEdge_ModuleInstanceDelete,
                "WASI module",
            )
            .map_err(anyhow::Error::msg)?;
            let version = CStr::from_ptr(ffi::WasmEdge_VersionGet()).to_string_lossy().into_owned();
            // Artifacts are keyed by this: plain and interruptible commands never mix.
            let version = match (has_compiler, deadlines) {
                (false, _) => format!("{version}-interp"),
                (true, Deadlines::Process) => format!("{version}-aot"),
                (true, Deadlines::Engine) => format!("{version}-aot-interruptible"),
            };
            Ok(WasmEdgeEngine {
                loader,
                aot_loader,
                validator,
                wasi_reference,
                has_compiler,
                deadlines,
                version,
                runtime: RefCell::new(Runtime::default()),
            })
        }
    }

    /// Whether a run of `kind` is stopped by WasmEdge (asynchronous invocation, cancelled
    /// at the deadline) rather than by the supervisor's kill.
    fn engine_stops(&self, kind: ModuleKind) -> bool {
        kind == ModuleKind::Session || self.deadlines == Deadlines::Engine
    }

    /// Validates a parsed module and checks that every import is one WASI provides with the
    /// same signature and, for a command, that it exports `_start: () -> ()`.
    fn check(
        &self,
        ast: Owned<ffi::WasmEdge_ASTModuleContext>,
        kind: ModuleKind,
    ) -> Result<WasmEdgeModule, EngineError> {
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
                let matches = |function: *const ffi::WasmEdge_FunctionInstanceContext| {
                    let given = signature(ffi::WasmEdge_FunctionInstanceGetFunctionType(function));
                    matches!((&wanted, given), (Some(w), Some(g)) if same_types(&w.0, &g.0) && same_types(&w.1, &g.1))
                };
                // WasmEdge registers its socket calls under their pre-0.12 signatures and
                // the preview1 ones (`sock_accept(fd, flags, fd_out)`...) as `{name}_v2`;
                // its executor links the second when the first does not fit, so this check
                // must accept it too.
                let v2 = || {
                    let versioned = format!("{name}_v2");
                    let f = ffi::WasmEdge_ModuleInstanceFindFunction(self.wasi_reference.ptr, wstr(&versioned));
                    !f.is_null() && matches(f)
                };
                let linkable = matches(provided) || (SOCKET_CALLS_WITH_V2.contains(&name.as_str()) && v2());
                if !linkable {
                    return Err(invalid(format!("incompatible import type for `{module}::{name}`")));
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
                _ if kind == ModuleKind::Session => {}
                Some((p, r)) if p.is_empty() && r.is_empty() => {}
                Some(_) => return Err(invalid("export `_start` is not a function () -> ()".into())),
                None => return Err(invalid("module has no `_start` export (not a WASI command module)".into())),
            }
            Ok(WasmEdgeModule { ast: Rc::new(ast), min_pages, kind, _artifact: None })
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

    fn deadlines(&self) -> Deadlines {
        self.deadlines
    }

    fn memory_source(&self) -> ModuleSource {
        // Tenant bytes are only ever interpreted; native code comes from artifacts.
        ModuleSource::Interpreted
    }

    fn compile(&self, wasm: &[u8], kind: ModuleKind) -> Result<WasmEdgeModule, EngineError> {
        if wasm.len() > u32::MAX as usize {
            return Err(EngineError::InvalidModule("module larger than 4 GiB".into()));
        }
        let ast = self.parse_buffer(wasm)?;
        self.check(ast, kind)
    }

    fn artifact_extension(&self) -> Option<&'static str> {
        self.has_compiler.then_some("so")
    }

    fn path_policy(&self) -> PathPolicy {
        // libwasmedge takes paths only: its compiler's output, the artifacts it loads,
        // preopens as /proc/self/fd/N/.
        PathPolicy::Ambient
    }

    fn precompile(&self, wasm: &[u8], kind: ModuleKind, artifact: &ArtifactFile<'_>) -> Result<(), EngineError> {
        let artifact = artifact.path;
        if !self.has_compiler {
            return Err(EngineError::Unsupported("precompiling"));
        }
        // Validate first: the compiler's own errors are less precise. `_start` is checked
        // when the artifact is loaded (as with Wasmtime).
        self.compile(wasm, ModuleKind::Session)?;
        let out = reachable(artifact);
        let failed = |m: String| EngineError::Io { path: artifact.into(), source: std::io::Error::other(m) };
        // WasmEdge's safe API covers this whole operation: the configuration (the same
        // proposals as `configuration`) and the compile. It names its output `<stem>.so`.
        let (Some(dir), Some(stem)) = (out.parent(), out.file_stem().and_then(|s| s.to_str())) else {
            return Err(failed("an artifact path needs a directory and a name".into()));
        };
        if out.extension().and_then(|e| e.to_str()) != Some("so") {
            return Err(failed("WasmEdge artifacts end in .so".into()));
        }
        use wasmedge_sdk::config::{CommonConfigOptions, CompilerConfigOptions, ConfigBuilder};
        use wasmedge_sdk::{CompilerOptimizationLevel, CompilerOutputFormat};
        let config = ConfigBuilder::new(CommonConfigOptions::default().multi_memories(false).threads(false))
            .with_compiler_config(
                CompilerConfigOptions::new()
                    // Interruption checks cost 3-4x on loops; only code WasmEdge must be able
                    // to stop carries them.
                    .interruptible(self.engine_stops(kind))
                    .optimization_level(CompilerOptimizationLevel::O2)
                    .out_format(CompilerOutputFormat::Native),
            )
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let compiler = wasmedge_sdk::Compiler::new(Some(&config)).map_err(|e| failed(e.to_string()))?;
        // The module validated above: a failure here is the compiler or the file system,
        // and the cache falls back to compiling in memory.
        compiler.compile_from_bytes(wasm, stem, dir).map_err(|e| failed(bounded(e.to_string())))?;
        Ok(())
    }

    fn load_passed_artifact(&self, file: std::fs::File, kind: ModuleKind) -> Result<WasmEdgeModule, EngineError> {
        use std::os::fd::{AsFd, AsRawFd};
        // libwasmedge loads by path only: the passed descriptor's own, kept open with the
        // module. The dynamic loader knows a library by its path string, so each load gets
        // one of its own (`/proc/self/fd/./././N`): a later artifact at a reused descriptor
        // number is never taken for an earlier one.
        static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}{}", "./".repeat(n), file.as_raw_fd()));
        // libwasmedge does not check that it could open and map the file before it reads
        // it: make sure it can (the reopen checks the file's mode).
        std::fs::File::open(&path)
            .map_err(|e| EngineError::StaleArtifact { path: path.clone(), reason: e.to_string() })?;
        let artifact = ArtifactFile { dir: file.as_fd(), name: "", path: &path };
        let mut module = self.load_artifact(&artifact, kind)?;
        module._artifact = Some(Rc::new(file));
        Ok(module)
    }

    fn load_artifact(&self, artifact: &ArtifactFile<'_>, kind: ModuleKind) -> Result<WasmEdgeModule, EngineError> {
        let artifact = artifact.path;
        let path = c_path(artifact)?;
        let mut ast = std::ptr::null_mut();
        let Some(loader) = &self.aot_loader else { return Err(EngineError::Unsupported("loading artifacts")) };
        AOT_FELL_BACK.store(false, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: loading trusts the file to be native code produced by this engine version:
        // the module cache passes only artifacts from its own directory, owned by this uid
        // and not writable by others; WasmEdge checks the version recorded in the file.
        let res = unsafe { ffi::WasmEdge_LoaderParseFromFile(loader.ptr, &mut ast, path.as_ptr()) };
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
        self.check(ast, kind)
    }

    fn run(&self, module: &WasmEdgeModule, request: RunRequest<'_>) -> RunResult {
        super::run_captured(&request, |stdout, stderr| self.run_guest(module, &request, (stdout, stderr)))
    }

    fn run_session(
        &self,
        module: &WasmEdgeModule,
        layout: &session::Layout,
        request: RunRequest<'_>,
        step: &session::Step<'_>,
        out: &mut session::StepOutput,
    ) -> RunResult {
        super::run_captured(&request, |stdout, stderr| {
            self.with_guest(module, &request, (stdout, stderr), |guest| {
                let memory = guest.memory(session::instrument::MEMORY_EXPORT);
                if memory.is_null() {
                    return Ok(Outcome::InvalidModule { message: "session module has no memory export".into() });
                }
                let mut live = SessionInstance { guest, memory };
                Ok(session::drive(&mut live, layout, step, out))
            })
        })
    }
}

/// A memfd the guest's stdout or stderr is written to. Its size is fixed, sealed, at the
/// first page boundary past `bound`: writes stop there (the kernel refuses to grow it; a
/// write that crosses the end is cut at it), so the file offset passes `bound` exactly
/// when the guest wrote more than `bound` bytes, and the memory it can take is bounded.
struct OutputFile {
    file: std::fs::File,
    size: u64,
}

impl OutputFile {
    fn new(bound: u64) -> std::io::Result<Self> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create(c"wasmbox-output", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
        let file = std::fs::File::from(fd);
        // Page-aligned, so every write the kernel splits into pages ends at or before it.
        let size = bound.saturating_add(1).div_ceil(4096).saturating_mul(4096);
        file.set_len(size)?;
        let seals =
            nix::fcntl::SealFlag::F_SEAL_GROW | nix::fcntl::SealFlag::F_SEAL_SHRINK | nix::fcntl::SealFlag::F_SEAL_SEAL;
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_ADD_SEALS(seals))?;
        Ok(OutputFile { file, size })
    }

    /// Copies what the guest wrote into `capture`: all of it (a strict capture refuses
    /// what passes its limit), or for a tail capture only its last `keep` bytes.
    fn drain_into(&self, capture: &Capture, keep: Option<u64>) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let written = nix::unistd::lseek(&self.file, 0, nix::unistd::Whence::SeekCur)?;
        let end = u64::try_from(written).unwrap_or(0).min(self.size);
        let start = keep.map_or(0, |keep| end.saturating_sub(keep));
        capture.skipped(start);
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        self.file.read_exact_at(&mut buf, start)?;
        // A strict capture marks itself overflowed past its limit.
        let _ = capture.append(&buf);
        Ok(())
    }
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

/// A module instantiated with fresh WASI state, alive while the body given to
/// [`WasmEdgeEngine::with_guest`] runs (which only lends it out by reference).
struct Guest {
    executor: *mut ffi::WasmEdge_ExecutorContext,
    wasi: *const ffi::WasmEdge_ModuleInstanceContext,
    instance: *const ffi::WasmEdge_ModuleInstanceContext,
    /// The memory cap, in pages (as the executor enforces it) and in bytes.
    max_pages: u64,
    memory_limit_bytes: u64,
    /// WasmEdge stops the guest at its deadline (asynchronous invocation, cancelled); else
    /// it runs on this thread until it ends or the supervisor kills the worker.
    engine_stops: bool,
    /// `Instant::now() + request.timeout`, taken before instantiation.
    deadline: Instant,
}

impl Guest {
    /// The exported function `name`, or null.
    fn function(&self, name: &str) -> *mut ffi::WasmEdge_FunctionInstanceContext {
        // SAFETY: `instance` is live (see `Guest`); `wstr` borrows `name`, which outlives the call.
        unsafe { ffi::WasmEdge_ModuleInstanceFindFunction(self.instance, wstr(name)) }
    }

    /// Whether `func` (non-null, from [`Guest::function`]) has type `() -> ()`.
    fn is_nullary(func: *const ffi::WasmEdge_FunctionInstanceContext) -> bool {
        if func.is_null() {
            return false;
        }
        // SAFETY: `func` is a live function instance of the guest; its type is owned by it.
        let ty = unsafe { ffi::WasmEdge_FunctionInstanceGetFunctionType(func) };
        matches!(signature(ty), Some((p, r)) if p.is_empty() && r.is_empty())
    }

    /// The exported memory `name`, or null.
    fn memory(&self, name: &str) -> *mut ffi::WasmEdge_MemoryInstanceContext {
        // SAFETY: `instance` is live (see `Guest`); `wstr` borrows `name`, which outlives the call.
        unsafe { ffi::WasmEdge_ModuleInstanceFindMemory(self.instance, wstr(name)) }
    }

    /// The exported global `name`.
    fn global(&self, name: &str) -> Result<*mut ffi::WasmEdge_GlobalInstanceContext, String> {
        // SAFETY: `instance` is live (see `Guest`); `wstr` borrows `name`, which outlives the call.
        let global = unsafe { ffi::WasmEdge_ModuleInstanceFindGlobal(self.instance, wstr(name)) };
        if global.is_null() { Err(format!("no export {name}")) } else { Ok(global) }
    }

    /// Runs `func` on this thread to its end: the deadline is the supervisor's kill.
    fn invoke_here(&self, func: *const ffi::WasmEdge_FunctionInstanceContext) -> (bool, ffi::WasmEdge_Result) {
        // SAFETY: the executor and `func` are live (see `Guest`) and `func` takes no
        // parameters and returns nothing.
        let res =
            unsafe { ffi::WasmEdge_ExecutorInvoke(self.executor, func, std::ptr::null(), 0, std::ptr::null_mut(), 0) };
        (true, res)
    }

    /// Runs `func` on WasmEdge's asynchronous worker thread, cancelled at `deadline`; the
    /// flag says whether it ended by itself. (WasmEdge offers cancellation only this way,
    /// and starts a thread per call.)
    fn invoke_async(
        &self,
        func: *const ffi::WasmEdge_FunctionInstanceContext,
        deadline: Instant,
    ) -> Result<(bool, ffi::WasmEdge_Result), Outcome> {
        let millis = u64::try_from(deadline.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000))
            .unwrap_or(u64::MAX);
        // SAFETY: the executor and `func` are live (see `Guest`) and `func` takes no
        // parameters. The asynchronous job is owned by `job` and joined (`AsyncGet` waits for
        // the execution to end) before it is deleted and before this returns, so WasmEdge's
        // worker thread never touches the instance afterwards.
        unsafe {
            let job = Owned::new(
                ffi::WasmEdge_ExecutorAsyncInvoke(self.executor, func, std::ptr::null(), 0),
                ffi::WasmEdge_AsyncDelete,
                "async invocation",
            )
            .map_err(|message| Outcome::SetupFailed { message: bounded(message) })?;
            let finished = ffi::WasmEdge_AsyncWaitFor(job.ptr, millis);
            if !finished {
                ffi::WasmEdge_AsyncCancel(job.ptr);
            }
            // Waits for the execution to end (at once after a cancel at the next
            // interruption check).
            Ok((finished, ffi::WasmEdge_AsyncGet(job.ptr, std::ptr::null_mut(), 0)))
        }
    }

    /// Runs `func` (a `() -> ()` function of the instance) until it returns or `deadline`
    /// passes. `Ok` when it returned; otherwise what ended it: `Exited` for a `proc_exit`
    /// (whatever the code), the deadline, the memory cap (`memory_export` names the memory
    /// whose size tells it) or a trap.
    fn invoke(
        &self,
        func: *const ffi::WasmEdge_FunctionInstanceContext,
        deadline: Instant,
        memory_export: &str,
    ) -> Result<(), Outcome> {
        GROW_REFUSED.store(false, std::sync::atomic::Ordering::Relaxed);
        let (finished, res) =
            if self.engine_stops { self.invoke_async(func, deadline)? } else { self.invoke_here(func) };
        if ok(res) {
            if code(res) == TERMINATED {
                // SAFETY: the WASI instance is live (see `Guest`).
                let code = unsafe { ffi::WasmEdge_ModuleInstanceWASIGetExitCode(self.wasi) };
                return Err(Outcome::Exited { code: code as i32 });
            }
            return Ok(());
        }
        let memory = self.memory(memory_export);
        // SAFETY: a live memory instance of the guest, checked non-null.
        let pages = if memory.is_null() { 0 } else { unsafe { ffi::WasmEdge_MemoryInstanceGetPageSize(memory) } };
        Err(if !finished || code(res) == INTERRUPTED {
            Outcome::DeadlineExceeded
        } else if GROW_REFUSED.load(std::sync::atomic::Ordering::Relaxed)
            || (self.max_pages > 0 && pages >= self.max_pages)
        {
            // A trap after a refused memory.grow (a Rust guest aborts when allocation
            // fails), or with the memory at its cap: the guest ran out of memory.
            Outcome::MemoryLimitExceeded { limit_bytes: self.memory_limit_bytes }
        } else {
            Outcome::Trapped { message: message(res) }
        })
    }
}

impl WasmEdgeEngine {
    fn run_guest(&self, module: &WasmEdgeModule, request: &RunRequest<'_>, captures: (&Capture, &Capture)) -> Outcome {
        self.with_guest(module, request, captures, |guest| {
            let start = guest.function("_start");
            if start.is_null() {
                return Err("`_start` vanished".into());
            }
            // A command's deadline counts from the call of `_start`.
            match guest.invoke(start, Instant::now() + request.timeout, "memory") {
                Ok(()) => Ok(Outcome::Exited { code: 0 }),
                Err(outcome) => Ok(outcome),
            }
        })
    }

    /// Instantiates `module` with fresh WASI state for `request` (stdout and stderr into
    /// `captures`) and runs `body` on it; the outcome of a failed instantiation otherwise.
    /// Setting up failing, in `body` too, is [`Outcome::SetupFailed`].
    fn with_guest(
        &self,
        module: &WasmEdgeModule,
        request: &RunRequest<'_>,
        (stdout, stderr): (&Capture, &Capture),
        body: impl FnOnce(&Guest) -> Result<Outcome, String>,
    ) -> Outcome {
        let max_pages = request.memory_limit_bytes / PAGE;
        if module.min_pages > max_pages {
            return Outcome::MemoryLimitExceeded { limit_bytes: request.memory_limit_bytes };
        }
        self.instantiate(module, request, (stdout, stderr), max_pages, body)
            .unwrap_or_else(|message| Outcome::SetupFailed { message: bounded(message) })
    }

    fn instantiate(
        &self,
        module: &WasmEdgeModule,
        request: &RunRequest<'_>,
        (stdout, stderr): (&Capture, &Capture),
        max_pages: u64,
        body: impl FnOnce(&Guest) -> Result<Outcome, String>,
    ) -> Result<Outcome, String> {
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
        let out_file = OutputFile::new(request.max_output_bytes).map_err(|e| format!("stdout: {e}"))?;
        // Stderr keeps only its tail, but the guest may write as much as stdout may hold.
        let err_file = OutputFile::new(request.max_output_bytes.max(64 << 10)).map_err(|e| format!("stderr: {e}"))?;
        let mut runtime = self.runtime.borrow_mut();
        let (store, executor) = runtime.get(max_pages)?;
        let engine_stops = self.engine_stops(module.kind);

        // SAFETY: the store and executor are live for the engine's lifetime; the WASI and
        // module instances are created here, owned by `Owned`s dropped at the end of this
        // block in reverse order (the module instance before the WASI one it imports from;
        // deleting the WASI instance unregisters it from the store). They are used only on
        // this thread except by WasmEdge's own async worker, which is joined before anything
        // is dropped. The WASI instance borrows the three descriptors passed to it; they
        // outlive it. `body` gets the contexts only through a `&Guest` that does not outlive
        // its call.
        let outcome = (|| unsafe {
            let wasi = Owned::new(
                ffi::WasmEdge_ModuleInstanceCreateWASIWithFds(
                    arg_ptrs.as_ptr(),
                    arg_ptrs.len() as u32,
                    env_ptrs.as_ptr(),
                    env_ptrs.len() as u32,
                    preopen_ptrs.as_ptr(),
                    preopen_ptrs.len() as u32,
                    stdin.as_raw_fd(),
                    out_file.file.as_raw_fd(),
                    err_file.file.as_raw_fd(),
                ),
                ffi::WasmEdge_ModuleInstanceDelete,
                "WASI module",
            )?;
            let res = ffi::WasmEdge_ExecutorRegisterImport(executor, store, wasi.ptr);
            if !ok(res) {
                return Err(format!("registering WASI: {}", message(res)));
            }
            let deadline = Instant::now() + request.timeout;
            let mut instance = std::ptr::null_mut();
            let res = ffi::WasmEdge_ExecutorInstantiate(executor, &mut instance, store, module.ast.ptr);
            let outcome = if !ok(res) {
                Outcome::Trapped { message: message(res) }
            } else {
                let instance = Owned::new(instance, ffi::WasmEdge_ModuleInstanceDelete, "instance")?;
                body(&Guest {
                    executor,
                    wasi: wasi.ptr,
                    instance: instance.ptr,
                    max_pages,
                    memory_limit_bytes: request.memory_limit_bytes,
                    engine_stops,
                    deadline,
                })?
            };
            drop(wasi);
            Ok(outcome)
        })();
        drop(runtime);
        out_file.drain_into(stdout, None).map_err(|e| format!("reading stdout: {e}"))?;
        let tail = wasmbox_protocol::STDERR_TAIL_BYTES as u64;
        err_file.drain_into(stderr, Some(tail)).map_err(|e| format!("reading stderr: {e}"))?;
        outcome
    }
}

/// A live session instance on WasmEdge.
struct SessionInstance<'g> {
    guest: &'g Guest,
    /// The rewritten module's memory export ([`session::instrument::MEMORY_EXPORT`]), non-null.
    memory: *mut ffi::WasmEdge_MemoryInstanceContext,
}

impl session::Instance for SessionInstance<'_> {
    fn memory_pages(&mut self) -> Result<u32, String> {
        // SAFETY: a live memory instance of the guest.
        let pages = unsafe { ffi::WasmEdge_MemoryInstanceGetPageSize(self.memory) };
        u32::try_from(pages).map_err(|_| "memory larger than 4 GiB".to_string())
    }

    fn grow_memory(&mut self, pages: u32) -> Result<(), String> {
        let current = u64::from(self.memory_pages()?);
        if current + u64::from(pages) > self.guest.max_pages {
            return Err(format!("growing {current} pages by {pages} passes the cap of {} pages", self.guest.max_pages));
        }
        // SAFETY: a live memory instance of the guest, not borrowed (`memory()` lends it out
        // only while `self` is borrowed mutably, and no guest code is running).
        let res = unsafe { ffi::WasmEdge_MemoryInstanceGrowPage(self.memory, u64::from(pages)) };
        if ok(res) { Ok(()) } else { Err(message(res)) }
    }

    fn memory(&mut self) -> Result<&mut [u8], String> {
        let pages = u64::from(self.memory_pages()?);
        let len = usize::try_from(pages * PAGE).map_err(|_| "memory larger than the address space".to_string())?;
        if len == 0 {
            // WasmEdge has no pointer to give for an empty memory.
            return Ok(&mut []);
        }
        // SAFETY: a live memory instance of the guest, `len` being exactly its size.
        let data = unsafe { ffi::WasmEdge_MemoryInstanceGetPointer(self.memory, 0, len as u64) };
        if data.is_null() {
            return Err("WasmEdge gave no pointer to the memory".into());
        }
        // SAFETY: `data` points at the `len` bytes of the linear memory, which stay mapped
        // and in place until the memory grows or the instance is deleted. The slice borrows
        // `self` mutably, so neither `grow_memory` nor `call` (the only ways to grow it, and
        // to run guest code that could touch it) can run while it lives, and the instance
        // outlives `self` (`'g`). WasmEdge's async worker is idle: every call was joined.
        Ok(unsafe { std::slice::from_raw_parts_mut(data, len) })
    }

    fn global(&mut self, index: u32, ty: u8) -> Result<[u8; 16], String> {
        let global = self.guest.global(&session::instrument::global_export(index))?;
        let mut out = [0u8; 16];
        // SAFETY: a live global instance of the guest; the value accessors only read the
        // value after its type was checked.
        unsafe {
            let value = ffi::WasmEdge_GlobalInstanceGetValue(global);
            let t = value.Type;
            match ty {
                0x7f if ffi::WasmEdge_ValTypeIsI32(t) => {
                    out[..4].copy_from_slice(&ffi::WasmEdge_ValueGetI32(value).to_le_bytes());
                }
                0x7e if ffi::WasmEdge_ValTypeIsI64(t) => {
                    out[..8].copy_from_slice(&ffi::WasmEdge_ValueGetI64(value).to_le_bytes());
                }
                0x7d if ffi::WasmEdge_ValTypeIsF32(t) => {
                    out[..4].copy_from_slice(&ffi::WasmEdge_ValueGetF32(value).to_bits().to_le_bytes());
                }
                0x7c if ffi::WasmEdge_ValTypeIsF64(t) => {
                    out[..8].copy_from_slice(&ffi::WasmEdge_ValueGetF64(value).to_bits().to_le_bytes());
                }
                0x7b if ffi::WasmEdge_ValTypeIsV128(t) => {
                    out.copy_from_slice(&ffi::WasmEdge_ValueGetV128(value).to_le_bytes());
                }
                _ => return Err(format!("global {index} does not hold a value of type {ty:#x}")),
            }
        }
        Ok(out)
    }

    fn set_global(&mut self, value: &GlobalValue) -> Result<(), String> {
        let global = self.guest.global(&session::instrument::global_export(value.index))?;
        let b = value.bytes;
        let word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let dword = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        // SAFETY: value constructors, and a live global instance of the guest (WasmEdge
        // refuses a value of another type, or an immutable global, with an error result).
        let res = unsafe {
            let val = match value.ty {
                0x7f => ffi::WasmEdge_ValueGenI32(word as i32),
                0x7e => ffi::WasmEdge_ValueGenI64(dword as i64),
                0x7d => ffi::WasmEdge_ValueGenF32(f32::from_bits(word)),
                0x7c => ffi::WasmEdge_ValueGenF64(f64::from_bits(dword)),
                0x7b => ffi::WasmEdge_ValueGenV128(i128::from_le_bytes(b)),
                other => return Err(format!("type code {other:#x}")),
            };
            ffi::WasmEdge_GlobalInstanceSetValue(global, val)
        };
        if ok(res) { Ok(()) } else { Err(message(res)) }
    }

    fn has_function(&mut self, name: &str) -> bool {
        Guest::is_nullary(self.guest.function(name))
    }

    fn call(&mut self, name: &str) -> Result<(), Outcome> {
        let func = self.guest.function(name);
        if !Guest::is_nullary(func) {
            return Err(Outcome::InvalidModule { message: format!("export `{name}` is not a function () -> ()") });
        }
        self.guest.invoke(func, self.guest.deadline, session::instrument::MEMORY_EXPORT)
    }
}

#[cfg(test)]
mod tests {
    // The conformance suite (integration/tests/all/conformance.rs) runs every behaviour
    // against this engine in builds with the `wasmedge` feature where libwasmedge is found.
    use super::*;
    use std::time::Duration;
    use wasmbox_protocol::SessionOp;

    /// A command that exits with `code`.
    fn exits_with(code: u32) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                (memory (export "memory") 1)
                (func (export "_start") (call $exit (i32.const {code}))))"#
        ))
        .unwrap()
    }

    #[test]
    fn native_code_a_tenant_puts_into_its_module_is_never_run() {
        let engine = WasmEdgeEngine::new(Deadlines::Process).expect("libwasmedge");
        if !engine.has_compiler {
            return;
        }
        // WasmEdge's "universal" format: the module with its native code in a custom
        // section named `wasmedge`. Made here for a module exiting 3...
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("universal.wasm");
        let three = exits_with(3);
        let conf = configuration(None, ffi::WasmEdge_RunMode_AOT).unwrap();
        let path = CString::new(out.to_str().unwrap()).unwrap();
        // SAFETY: a compiler made, used once and deleted here, writing to `path`.
        let res = unsafe {
            ffi::WasmEdge_ConfigureCompilerSetOutputFormat(conf.ptr, ffi::WasmEdge_CompilerOutputFormat_Wasm);
            let compiler =
                Owned::new(ffi::WasmEdge_CompilerCreate(conf.ptr), ffi::WasmEdge_CompilerDelete, "c").unwrap();
            ffi::WasmEdge_CompilerCompileFromBuffer(compiler.ptr, three.as_ptr(), three.len() as u64, path.as_ptr())
        };
        assert!(ok(res), "{}", message(res));
        let universal = std::fs::read(&out).unwrap();
        let mut native = None;
        for payload in wasmparser::Parser::new(0).parse_all(&universal) {
            if let Ok(wasmparser::Payload::CustomSection(section)) = payload {
                if section.name() == "wasmedge" {
                    native = Some(section.data().to_vec());
                }
            }
        }
        let native = native.expect("a universal module carries a `wasmedge` section");
        // ...then put into a module that exits 4. A tenant can upload either.
        let leb = |mut n: usize, out: &mut Vec<u8>| loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n == 0 { byte } else { byte | 0x80 });
            if n == 0 {
                break;
            }
        };
        let mut content = Vec::new();
        leb("wasmedge".len(), &mut content);
        content.extend_from_slice(b"wasmedge");
        content.extend_from_slice(&native);
        let mut spliced = exits_with(4);
        spliced.push(0);
        leb(content.len(), &mut spliced);
        spliced.extend_from_slice(&content);
        for (wasm, code) in [(universal.clone(), 3), (spliced, 4)] {
            let module = engine.compile(&wasm, ModuleKind::Command).expect("a valid module");
            let argv = vec!["m".to_string()];
            let run = engine.run(&module, RunRequest::bare(&argv, 1 << 20, Duration::from_secs(5), 1024));
            // The module's own Wasm ran, interpreted: never the native code it carries.
            assert_eq!(run.outcome, Outcome::Exited { code });
        }
    }

    #[test]
    fn unknown_imports_and_missing_start_are_invalid_modules() {
        let engine = WasmEdgeEngine::new(Deadlines::Process).expect("libwasmedge");
        let command = |wat: &str| engine.compile(&wat::parse_str(wat).unwrap(), ModuleKind::Command);
        let unknown = command(r#"(module (import "env" "launch" (func)) (func (export "_start")))"#);
        assert!(matches!(unknown, Err(EngineError::InvalidModule(m)) if m.contains("env::launch")));
        let no_start = command(r#"(module (func (export "main")))"#);
        assert!(matches!(no_start, Err(EngineError::InvalidModule(m)) if m.contains("_start")));
        let fine = command(r#"(module (memory (export "memory") 1) (func (export "_start")))"#);
        assert_eq!(fine.unwrap().min_pages, 1);
    }

    #[test]
    fn a_module_without_start_is_a_session_module_but_not_a_command() {
        let engine = WasmEdgeEngine::new(Deadlines::Process).expect("libwasmedge");
        let reactor = wat::parse_str(
            r#"(module (memory (export "__wasmbox_memory") 2) (func (export "_initialize")) (func (export "handle")))"#,
        )
        .unwrap();
        assert_eq!(engine.compile(&reactor, ModuleKind::Session).unwrap().min_pages, 2);
        assert!(matches!(
            engine.compile(&reactor, ModuleKind::Command),
            Err(EngineError::InvalidModule(m)) if m.contains("_start")
        ));
        // Imports are checked for sessions all the same.
        let unknown = wat::parse_str(r#"(module (import "env" "launch" (func)) (func (export "handle")))"#).unwrap();
        assert!(matches!(engine.compile(&unknown, ModuleKind::Session), Err(EngineError::InvalidModule(_))));
    }

    /// Memory (grown past its initial size) and globals of every type, including a
    /// signalling NaN, survive snapshot and restore; `check` traps unless they did.
    const SESSION: &str = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (global $i (mut i32) (i32.const 0))
        (global $l (mut i64) (i64.const 0))
        (global $f (mut f32) (f32.const 0))
        (global $d (mut f64) (f64.const 0))
        (global $v (mut v128) (v128.const i32x4 0 0 0 0))
        (global $nan (mut f32) (f32.const 0))
        (func $last (result i32) (i32.sub (i32.shl (memory.size) (i32.const 16)) (i32.const 4)))
        (func (export "bump")
          (global.set $i (i32.add (global.get $i) (i32.const 1)))
          (global.set $l (i64.add (global.get $l) (i64.const 0x100000000)))
          (global.set $f (f32.add (global.get $f) (f32.const 1.5)))
          (global.set $d (f64.add (global.get $d) (f64.const 0.25)))
          (global.set $v (i32x4.add (global.get $v) (v128.const i32x4 1 2 3 4)))
          (global.set $nan (f32.reinterpret_i32 (i32.const 0x7fa00001)))
          (i32.store (i32.const 1024) (i32.add (i32.load (i32.const 1024)) (i32.const 1)))
          (drop (memory.grow (i32.const 1)))
          (i32.store (call $last) (global.get $i)))
        (func (export "check")
          (if (i32.ne (global.get $i) (i32.const 2)) (then unreachable))
          (if (i64.ne (global.get $l) (i64.const 0x200000000)) (then unreachable))
          (if (f32.ne (global.get $f) (f32.const 3)) (then unreachable))
          (if (f64.ne (global.get $d) (f64.const 0.5)) (then unreachable))
          (if (i32.ne (i32x4.extract_lane 3 (global.get $v)) (i32.const 8)) (then unreachable))
          (if (i32.ne (i32.reinterpret_f32 (global.get $nan)) (i32.const 0x7fa00001)) (then unreachable))
          (if (i32.ne (i32.load (i32.const 1024)) (i32.const 2)) (then unreachable))
          (if (i32.ne (memory.size) (i32.const 3)) (then unreachable))
          (if (i32.ne (i32.load (call $last)) (i32.const 2)) (then unreachable)))
        (func (export "spin") (loop (br 0)))
        (func (export "quit") (call $exit (i32.const 3))))"#;

    #[test]
    fn session_state_survives_snapshots_and_steps_end_as_with_wasmtime() {
        let engine = WasmEdgeEngine::new(Deadlines::Process).expect("libwasmedge");
        let instrumented = session::instrument::instrument(&wat::parse_str(SESSION).unwrap()).unwrap();
        let module = engine.compile(&instrumented.wasm, ModuleKind::Session).unwrap();
        let layout = &instrumented.layout;
        let argv = vec!["session".to_string()];
        let step = |op, handler: &str, snapshot: &[u8], timeout_ms| {
            let request = RunRequest::bare(&argv, 16 << 16, Duration::from_millis(timeout_ms), 1024);
            let step = session::Step {
                op,
                handler,
                snapshot,
                module_sha256: [7; 32],
                memory_limit_bytes: request.memory_limit_bytes,
                max_snapshot_bytes: 1 << 20,
            };
            let mut out = session::StepOutput::default();
            let outcome = engine.run_session(&module, layout, request, &step, &mut out).outcome;
            (outcome, out.snapshot)
        };
        let (outcome, created) = step(SessionOp::Create, "bump", &[], 5000);
        assert_eq!(outcome, Outcome::Exited { code: 0 });
        let created = created.unwrap();
        let mut snapshot = created.clone();
        for _ in 0..2 {
            let (outcome, next) = step(SessionOp::Message, "bump", &snapshot, 5000);
            assert_eq!(outcome, Outcome::Exited { code: 0 });
            snapshot = next.unwrap();
        }
        assert_eq!(wasmbox_protocol::snapshot::parse(&snapshot).unwrap().memory_pages, 3);
        let (outcome, checked) = step(SessionOp::Message, "check", &snapshot, 5000);
        assert_eq!(outcome, Outcome::Exited { code: 0 });
        assert!(checked.is_some());
        assert_eq!(step(SessionOp::Check, "check", &snapshot, 5000).0, Outcome::Exited { code: 0 });

        let started = std::time::Instant::now();
        assert_eq!(step(SessionOp::Message, "spin", &snapshot, 200), (Outcome::DeadlineExceeded, None));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(step(SessionOp::Message, "quit", &snapshot, 5000), (Outcome::Exited { code: 3 }, None));
        let (outcome, _) = step(SessionOp::Message, "nothing", &snapshot, 5000);
        assert!(matches!(outcome, Outcome::InvalidModule { message } if message.contains("nothing")));
        // A fresh instance has not seen the steps above.
        let (outcome, _) = step(SessionOp::Message, "check", &created, 5000);
        assert!(matches!(outcome, Outcome::Trapped { .. }));
    }
}
