//! Wasmtime engine: Cranelift-compiled modules, epoch interruption for deadlines,
//! a resource limiter for the linear-memory cap, WASI preview1 from wasmtime-wasi.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use wasmbox_protocol::Outcome;
use wasmbox_protocol::snapshot::GlobalValue;
use wasmtime::{Config, InstancePre, Linker, ResourceLimiter, Store, Trap, Val};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use super::{ArtifactFile, Engine, EngineError, ModuleKind, RunRequest, RunResult, bounded};

mod component;
use crate::capture::Capture;
use crate::session;

/// Per-invocation store data.
struct StoreState {
    wasi: WasiP1Ctx,
    limits: Limits,
}

/// Caps linear memory at the invocation's Memory-Request and remembers whether the guest
/// hit the cap, so a trap that follows (a Rust guest aborts when allocation fails) is
/// reported as memory exhaustion instead of a generic trap.
struct Limits {
    memory_bytes: usize,
    memory_denied: bool,
    /// Linear memories and core instances the store may hold: one each for a module; a
    /// component may have a few.
    memories: usize,
    instances: usize,
}

impl Limits {
    fn module(memory_bytes: usize) -> Self {
        Limits { memory_bytes, memory_denied: false, memories: 1, instances: 1 }
    }

    fn component(memory_bytes: usize) -> Self {
        Limits {
            memory_bytes,
            memory_denied: false,
            memories: COMPONENT_MEMORIES,
            instances: COMPONENT_CORE_INSTANCES as usize,
        }
    }
}

/// Linear memories, core instances and tables a component may have (the instance pool's
/// slots: a Rust or C `wasi:cli/command` component has one memory and a handful of core
/// instances; more is refused at instantiation).
const COMPONENT_MEMORIES: usize = 2;
const COMPONENT_CORE_INSTANCES: u32 = 16;

/// Tables hold one pointer per element; this bounds them to a few MiB.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for Limits {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.memory_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn memories(&self) -> usize {
        self.memories
    }

    fn tables(&self) -> usize {
        16
    }
}

/// The compiled form of a module or component: already linked against WASI, so
/// instantiating it per invocation does no symbol resolution.
#[derive(Clone)]
pub struct WasmtimeModule(Form);

#[derive(Clone)]
enum Form {
    Core(InstancePre<StoreState>),
    Component(component::Linked),
}

/// Wasmtime behind the [`Engine`] trait.
pub struct WasmtimeEngine {
    engine: wasmtime::Engine,
    linker: Linker<StoreState>,
    /// WASI 0.2, for components.
    components: wasmtime::component::Linker<component::ComponentState>,
    watchdog: Watchdog,
    /// The warm-up module, when it came compiled (from the zygote).
    warm_up: Option<WasmtimeModule>,
}

/// A serving engine and its WASI linker, created and with the warm-up module compiled,
/// but no thread started: what the zygote makes once so that each worker it forks has its
/// engine already (copy-on-write). [`Unstarted::start`] in the worker starts the deadline
/// thread.
///
/// Creating the engine opens `/proc/self/pagemap` (the instance pool's dirty-page scan)
/// into a process-wide descriptor. A forked worker inherits it pointing at the zygote's
/// pages, so it must put its own pagemap in its place before it runs anything (see
/// `zygote::own_pagemap`): Wasmtime does that in a `pthread_atfork` handler, which the
/// zygote's raw `clone` does not run.
pub struct Unstarted {
    engine: wasmtime::Engine,
    linker: Linker<StoreState>,
    components: wasmtime::component::Linker<component::ComponentState>,
    warm_up: WasmtimeModule,
}

impl Unstarted {
    /// Starts the engine's deadline thread: from here on the process is multi-threaded.
    pub fn start(self) -> anyhow::Result<WasmtimeEngine> {
        let watchdog = Watchdog::start(self.engine.clone())?;
        Ok(WasmtimeEngine {
            engine: self.engine,
            linker: self.linker,
            components: self.components,
            watchdog,
            warm_up: Some(self.warm_up),
        })
    }
}

impl WasmtimeEngine {
    /// `test_hooks` adds the host function `wasmbox_test.forbidden_syscall` (the worker
    /// passes true only in debug builds started with `--test-hooks`).
    pub fn new(test_hooks: bool) -> anyhow::Result<Self> {
        Self::with_parallel_compilation(test_hooks, true)
    }

    /// The engine of a worker that serves invocations: it compiles on the calling thread.
    /// Its modules come compiled from the supervisor's compiler processes; it compiles only
    /// when a passed artifact is unusable, and then one module at a time. Without a
    /// compile thread pool a new worker has none to start (nor, under its seccomp filter,
    /// one that could start later).
    pub fn for_serving(test_hooks: bool) -> anyhow::Result<Self> {
        Self::with_parallel_compilation(test_hooks, false)
    }

    fn with_parallel_compilation(test_hooks: bool, parallel: bool) -> anyhow::Result<Self> {
        let (engine, linker) = Self::build(test_hooks, parallel)?;
        let components = component::linker(&engine)?;
        let watchdog = Watchdog::start(engine.clone())?;
        Ok(WasmtimeEngine { engine, linker, components, watchdog, warm_up: None })
    }

    /// A serving engine made ahead of time without starting a thread (the zygote's: see
    /// [`Unstarted`]), with the warm-up module compiled.
    pub fn unstarted(test_hooks: bool) -> anyhow::Result<Unstarted> {
        let (engine, linker) = Self::build(test_hooks, false)?;
        let components = component::linker(&engine)?;
        let module = wasmtime::Module::new(&engine, warm_up_module())?;
        let warm_up = linker.instantiate_pre(&module)?;
        Ok(Unstarted { engine, linker, components, warm_up: WasmtimeModule(Form::Core(warm_up)) })
    }

    fn build(test_hooks: bool, parallel: bool) -> anyhow::Result<(wasmtime::Engine, Linker<StoreState>)> {
        let mut config = Config::new();
        config
            .parallel_compilation(parallel)
            .epoch_interruption(true)
            .cranelift_opt_level(wasmtime::OptLevel::Speed)
            // One linear memory (threads are not compiled in): the cap then means what it says.
            .wasm_multi_memory(false)
            .wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Disable)
            .allocation_strategy(instance_pool());
        let engine = wasmtime::Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut StoreState| &mut s.wasi)?;
        // WASI's proc_exit takes any u32, but wasmtime-wasi turns codes of 126 and up into a
        // trap without the code. Every code the guest passes is its exit code here.
        linker.allow_shadowing(true);
        linker.func_wrap("wasi_snapshot_preview1", "proc_exit", |code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(I32Exit(code)))
        })?;
        linker.allow_shadowing(false);
        if test_hooks {
            linker.func_wrap("wasmbox_test", "forbidden_syscall", || -> i64 { crate::harden::forbidden_syscall() })?;
        }
        Ok((engine, linker))
    }

    fn link(&self, module: &wasmtime::Module, kind: ModuleKind) -> Result<WasmtimeModule, EngineError> {
        match module.get_export("_start") {
            _ if kind == ModuleKind::Session => {}
            Some(wasmtime::ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {}
            Some(_) => return Err(EngineError::InvalidModule("export `_start` is not a function () -> ()".into())),
            None => {
                return Err(EngineError::InvalidModule(
                    "module has no `_start` export (not a WASI command module)".into(),
                ));
            }
        }
        let pre =
            self.linker.instantiate_pre(module).map_err(|e| EngineError::InvalidModule(bounded(format!("{e:#}"))))?;
        Ok(WasmtimeModule(Form::Core(pre)))
    }

    fn link_component(
        &self,
        component: &wasmtime::component::Component,
        kind: ModuleKind,
    ) -> Result<WasmtimeModule, EngineError> {
        if kind == ModuleKind::Session {
            return Err(EngineError::InvalidModule(SESSION_COMPONENT.into()));
        }
        component::link(&self.components, component).map(|linked| WasmtimeModule(Form::Component(linked)))
    }

    /// Loads an artifact file of this engine: a module's, else a component's (Wasmtime
    /// refuses the one that is not, reading only its header). An artifact that does not
    /// load is `stale`; one that loads but does not link is an invalid module, as from bytes.
    fn load_file(
        &self,
        file: std::fs::File,
        kind: ModuleKind,
        stale: impl Fn(String) -> EngineError,
    ) -> Result<WasmtimeModule, EngineError> {
        let again = file.try_clone().map_err(|e| stale(e.to_string()))?;
        // SAFETY: see the callers: the file is native code this engine version produced,
        // from a source the worker trusts; Wasmtime rejects another version or config.
        match unsafe { wasmtime::Module::deserialize_open_file(&self.engine, file) } {
            Ok(module) => self.link(&module, kind),
            Err(as_module) => {
                // A component's artifact is read into memory first: Wasmtime maps
                // component artifacts only from a path, and the worker opens no paths.
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut &again, &mut bytes).map_err(|e| stale(e.to_string()))?;
                // SAFETY: as above.
                let component = unsafe { wasmtime::component::Component::deserialize(&self.engine, &bytes) }
                    .map_err(|e| stale(bounded(format!("{as_module:#}; as a component: {e:#}"))))?;
                self.link_component(&component, kind)
            }
        }
    }
}

/// What a session of a component is answered with.
const SESSION_COMPONENT: &str =
    "sessions run core WebAssembly modules (WASI reactors); this is a WebAssembly component";

/// Whether `wasm` is a component (the Component Model's binary layer) rather than a module.
fn is_component(wasm: &[u8]) -> bool {
    wasmparser::Parser::is_component(wasm)
}

impl Engine for WasmtimeEngine {
    type Module = WasmtimeModule;

    fn name(&self) -> &'static str {
        "wasmtime"
    }

    fn version(&self) -> String {
        // Artifacts are only loadable by an engine with the same version and settings;
        // Wasmtime's compatibility hash covers both, so it names the artifact directory.
        let mut hasher = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        format!("{WASMTIME_MAJOR}-{:016x}", hasher.finish())
    }

    fn compile(&self, wasm: &[u8], kind: ModuleKind) -> Result<WasmtimeModule, EngineError> {
        if is_component(wasm) {
            let component = wasmtime::component::Component::new(&self.engine, wasm)
                .map_err(|e| EngineError::InvalidModule(bounded(format!("{e:#}"))))?;
            return self.link_component(&component, kind);
        }
        let module = wasmtime::Module::new(&self.engine, wasm)
            .map_err(|e| EngineError::InvalidModule(bounded(format!("{e:#}"))))?;
        self.link(&module, kind)
    }

    fn artifact_extension(&self) -> Option<&'static str> {
        Some("cwasm")
    }

    fn warm_up(&self) -> Result<(), EngineError> {
        // A WASI write starts wasmtime-wasi's runtime, which reads the CPU count from the
        // cgroup files by absolute paths (so does Cranelift's thread pool in an engine
        // that compiles in parallel, started by the compile here); the first run also
        // sets up this thread's trap handling and the instance pool's slot.
        let module = match &self.warm_up {
            Some(module) => module.clone(),
            None => self.compile(&warm_up_module(), ModuleKind::Command)?,
        };
        let argv = ["warm-up".to_string()];
        let request = RunRequest::bare(&argv, 1 << 20, std::time::Duration::from_secs(10), 16);
        match self.run(&module, request).outcome {
            Outcome::Exited { code: 0 } => Ok(()),
            other => Err(EngineError::InvalidModule(format!("warm-up run: {other:?}"))),
        }
    }

    fn precompile(&self, wasm: &[u8], kind: ModuleKind, artifact: &ArtifactFile<'_>) -> Result<(), EngineError> {
        let invalid = |e: wasmtime::Error| EngineError::InvalidModule(bounded(format!("{e:#}")));
        let bytes = if is_component(wasm) {
            // Compiled once, linked to check what it is, then written.
            let component = wasmtime::component::Component::new(&self.engine, wasm).map_err(invalid)?;
            self.link_component(&component, kind)?;
            component.serialize().map_err(invalid)?
        } else {
            self.engine.precompile_module(wasm).map_err(invalid)?
        };
        artifact
            .create()
            .and_then(|mut file| std::io::Write::write_all(&mut file, &bytes))
            .map_err(|source| EngineError::Io { path: artifact.path.into(), source })
    }

    fn load_artifact(&self, artifact: &ArtifactFile<'_>, kind: ModuleKind) -> Result<WasmtimeModule, EngineError> {
        let stale = |reason: String| EngineError::StaleArtifact { path: artifact.path.into(), reason };
        let file = artifact.open().map_err(|e| stale(e.to_string()))?;
        // Deserializing trusts the file to be native code produced by this engine. The
        // module cache only passes artifacts from its own cache directory, written by this
        // program under this uid and not writable by others (checked before the call).
        self.load_file(file, kind, stale)
    }

    fn load_passed_artifact(&self, file: std::fs::File, kind: ModuleKind) -> Result<WasmtimeModule, EngineError> {
        let stale = |reason: String| EngineError::StaleArtifact { path: "(passed by the supervisor)".into(), reason };
        // Deserializing trusts the file to be native code produced by this engine. The
        // supervisor passes only artifacts its compiler process produced for this module
        // and tenant, checked against the digest it recorded (workers cannot write them).
        self.load_file(file, kind, stale)
    }

    fn run(&self, module: &WasmtimeModule, request: RunRequest<'_>) -> RunResult {
        super::run_captured(&request, |stdout, stderr| match &module.0 {
            Form::Core(pre) => self.run_guest(pre, &request, stdout, stderr),
            Form::Component(component::Linked::Command(command)) => {
                self.run_command_component(command, &request, stdout, stderr)
            }
            Form::Component(component::Linked::Http(_)) => Outcome::InvalidModule {
                message: "a wasi:http/proxy component is invoked through HTTP, not as a command".into(),
            },
        })
    }

    fn run_http(&self, module: &WasmtimeModule, request: RunRequest<'_>, call: super::HttpCall<'_>) -> RunResult {
        super::run_captured(&request, |stdout, stderr| match &module.0 {
            Form::Component(component::Linked::Http(proxy)) => {
                self.run_http_component(proxy, &request, &call, stdout, stderr)
            }
            _ => Outcome::InvalidModule { message: "not a wasi:http/proxy component".into() },
        })
    }

    fn run_session(
        &self,
        module: &WasmtimeModule,
        layout: &session::Layout,
        request: RunRequest<'_>,
        step: &session::Step<'_>,
        out: &mut session::StepOutput,
    ) -> RunResult {
        super::run_captured(&request, |stdout, stderr| match &module.0 {
            Form::Core(pre) => self.session_step(pre, layout, &request, step, out, (stdout, stderr)),
            Form::Component(_) => Outcome::InvalidModule { message: SESSION_COMPONENT.into() },
        })
    }
}

impl WasmtimeEngine {
    /// A store with fresh WASI state for one invocation or session step.
    fn new_store(
        &self,
        request: &RunRequest<'_>,
        stdout: &Capture,
        stderr: &Capture,
    ) -> Result<Store<StoreState>, Outcome> {
        let mut wasi = wasi_builder(request, stdout, stderr)?;
        let memory_bytes = usize::try_from(request.memory_limit_bytes).unwrap_or(usize::MAX);
        let state = StoreState { wasi: wasi.build_p1(), limits: Limits::module(memory_bytes) };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // Deadline = one epoch tick; the watchdog ticks exactly once, at this invocation's
        // deadline, so an idle worker costs no timer wakeups.
        store.set_epoch_deadline(1);
        Ok(store)
    }

    fn run_guest(
        &self,
        pre: &InstancePre<StoreState>,
        request: &RunRequest<'_>,
        stdout: &Capture,
        stderr: &Capture,
    ) -> Outcome {
        let mut store = match self.new_store(request, stdout, stderr) {
            Ok(store) => store,
            Err(outcome) => return outcome,
        };
        let guard = self.watchdog.arm(Instant::now() + request.timeout);
        let result = pre
            .instantiate(&mut store)
            .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .and_then(|start| start.call(&mut store, ()));
        let fired = guard.disarm();
        match result {
            Ok(()) => Outcome::Exited { code: 0 },
            Err(e) => classify(&e, &store, fired, request.memory_limit_bytes),
        }
    }
}

/// A guest's WASI state as the request gives it: argv, env, stdin, the captures, preopens.
fn wasi_builder(request: &RunRequest<'_>, stdout: &Capture, stderr: &Capture) -> Result<WasiCtxBuilder, Outcome> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.args(request.argv)
        .envs(request.env)
        .stdin(MemoryInputPipe::new(request.stdin.clone()))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .allow_blocking_current_thread(true);
    add_preopens(&mut wasi, request).map_err(|message| Outcome::SetupFailed { message: bounded(message) })?;
    Ok(wasi)
}

/// A command that writes one byte to stdout:
/// `(func (export "_start") (drop (call $fd_write 1 iovec@0 1 nwritten@8)))` with the
/// iovec pointing at byte 16.
fn warm_up_module() -> Vec<u8> {
    use wasm_encoder::{
        CodeSection, EntityType, ExportKind, ExportSection, Function, FunctionSection, ImportSection, Instruction,
        MemArg, MemorySection, MemoryType, Module, TypeSection, ValType,
    };
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32; 4], [ValType::I32]);
    types.ty().function([], []);
    let mut imports = ImportSection::new();
    imports.import("wasi_snapshot_preview1", "fd_write", EntityType::Function(0));
    let mut functions = FunctionSection::new();
    functions.function(1);
    let mut memories = MemorySection::new();
    memories.memory(MemoryType { minimum: 1, maximum: None, memory64: false, shared: false, page_size_log2: None });
    let mut exports = ExportSection::new();
    exports.export("memory", ExportKind::Memory, 0).export("_start", ExportKind::Func, 1);
    let store = MemArg { offset: 0, align: 2, memory_index: 0 };
    let mut start = Function::new([]);
    for instruction in [
        Instruction::I32Const(0),
        Instruction::I32Const(16),
        Instruction::I32Store(store),
        Instruction::I32Const(4),
        Instruction::I32Const(1),
        Instruction::I32Store(store),
        Instruction::I32Const(1),
        Instruction::I32Const(0),
        Instruction::I32Const(1),
        Instruction::I32Const(8),
        Instruction::Call(0),
        Instruction::Drop,
        Instruction::End,
    ] {
        start.instruction(&instruction);
    }
    let mut code = CodeSection::new();
    code.function(&start);
    let mut module = Module::new();
    module.section(&types).section(&imports).section(&functions).section(&memories).section(&exports).section(&code);
    module.finish()
}

/// What ended a guest that did not return: its exit code, the deadline, the memory cap or
/// a trap.
fn classify(e: &wasmtime::Error, store: &Store<StoreState>, fired: bool, memory_limit_bytes: u64) -> Outcome {
    classify_with(e, store.data().limits.memory_denied, fired, memory_limit_bytes)
}

/// [`classify`], given whether the store's limiter refused a memory growth.
fn classify_with(e: &wasmtime::Error, memory_denied: bool, fired: bool, memory_limit_bytes: u64) -> Outcome {
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        return Outcome::Exited { code: exit.0 };
    }
    // The deadline first: a guest that survived a refused growth and then ran out of time
    // was stopped by the deadline, not by memory.
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return Outcome::DeadlineExceeded;
    }
    if memory_denied {
        return Outcome::MemoryLimitExceeded { limit_bytes: memory_limit_bytes };
    }
    if fired {
        return Outcome::DeadlineExceeded;
    }
    Outcome::Trapped { message: bounded(format!("{e:#}")) }
}

/// A live session instance on Wasmtime.
struct SessionInstance<'a> {
    engine: &'a WasmtimeEngine,
    store: Store<StoreState>,
    instance: wasmtime::Instance,
    memory: wasmtime::Memory,
    deadline: Instant,
    memory_limit_bytes: u64,
}

impl session::Instance for SessionInstance<'_> {
    fn memory_pages(&mut self) -> Result<u32, String> {
        u32::try_from(self.memory.size(&self.store)).map_err(|_| "memory larger than 4 GiB".to_string())
    }

    fn grow_memory(&mut self, pages: u32) -> Result<(), String> {
        self.memory.grow(&mut self.store, u64::from(pages)).map(drop).map_err(|e| format!("{e:#}"))
    }

    fn memory(&mut self) -> Result<&mut [u8], String> {
        Ok(self.memory.data_mut(&mut self.store))
    }

    fn global(&mut self, index: u32, ty: u8) -> Result<[u8; 16], String> {
        let name = session::instrument::global_export(index);
        let global = self.instance.get_global(&mut self.store, &name).ok_or_else(|| format!("no export {name}"))?;
        let mut out = [0u8; 16];
        match (global.get(&mut self.store), ty) {
            (Val::I32(v), 0x7f) => out[..4].copy_from_slice(&v.to_le_bytes()),
            (Val::I64(v), 0x7e) => out[..8].copy_from_slice(&v.to_le_bytes()),
            (Val::F32(v), 0x7d) => out[..4].copy_from_slice(&v.to_le_bytes()),
            (Val::F64(v), 0x7c) => out[..8].copy_from_slice(&v.to_le_bytes()),
            (Val::V128(v), 0x7b) => out.copy_from_slice(&v.as_u128().to_le_bytes()),
            (other, _) => return Err(format!("global {index} holds {other:?}, expected type {ty:#x}")),
        }
        Ok(out)
    }

    fn set_global(&mut self, value: &GlobalValue) -> Result<(), String> {
        let name = session::instrument::global_export(value.index);
        let global = self.instance.get_global(&mut self.store, &name).ok_or_else(|| format!("no export {name}"))?;
        let b = value.bytes;
        let word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let dword = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let val = match value.ty {
            0x7f => Val::I32(word as i32),
            0x7e => Val::I64(dword as i64),
            0x7d => Val::F32(word),
            0x7c => Val::F64(dword),
            0x7b => Val::V128(u128::from_le_bytes(b).into()),
            other => return Err(format!("type code {other:#x}")),
        };
        global.set(&mut self.store, val).map_err(|e| format!("{e:#}"))
    }

    fn has_function(&mut self, name: &str) -> bool {
        self.instance.get_typed_func::<(), ()>(&mut self.store, name).is_ok()
    }

    fn call(&mut self, name: &str) -> Result<(), Outcome> {
        let func = self
            .instance
            .get_typed_func::<(), ()>(&mut self.store, name)
            .map_err(|e| Outcome::InvalidModule { message: bounded(format!("export `{name}`: {e:#}")) })?;
        self.store.set_epoch_deadline(1);
        let guard = self.engine.watchdog.arm(self.deadline);
        let result = func.call(&mut self.store, ());
        let fired = guard.disarm();
        result.map_err(|e| classify(&e, &self.store, fired, self.memory_limit_bytes))
    }
}

impl WasmtimeEngine {
    fn session_step(
        &self,
        pre: &InstancePre<StoreState>,
        layout: &session::Layout,
        request: &RunRequest<'_>,
        step: &session::Step<'_>,
        out: &mut session::StepOutput,
        (stdout, stderr): (&Capture, &Capture),
    ) -> Outcome {
        let mut store = match self.new_store(request, stdout, stderr) {
            Ok(store) => store,
            Err(outcome) => return outcome,
        };
        let deadline = Instant::now() + request.timeout;
        // Instantiation only applies data segments (a session module has no start
        // function), but it runs under the deadline all the same.
        let guard = self.watchdog.arm(deadline);
        let instance = pre.instantiate(&mut store);
        let fired = guard.disarm();
        let instance = match instance {
            Ok(instance) => instance,
            Err(e) => return classify(&e, &store, fired, request.memory_limit_bytes),
        };
        let Some(memory) = instance.get_memory(&mut store, session::instrument::MEMORY_EXPORT) else {
            return Outcome::InvalidModule { message: "session module has no memory export".into() };
        };
        let mut live = SessionInstance {
            engine: self,
            store,
            instance,
            memory,
            deadline,
            memory_limit_bytes: request.memory_limit_bytes,
        };
        session::drive(&mut live, layout, step, out)
    }
}

/// The instance allocator: a pool with room for exactly one instance, because an engine
/// runs one invocation at a time (a worker serves one request after another). Its memory,
/// table and instance slots are reserved once, when the engine starts, and reset between
/// invocations instead of being mapped and unmapped for each: no mmap/munmap pair (and no
/// TLB shootdown across the worker's threads) per request, and the slot stays warm for the
/// module that ran last.
///
/// The slot bounds what a module may declare, so they are set wide: a memory may grow to
/// the whole 32-bit space (Memory-Request, enforced by the store's limiter and the cgroup,
/// is the real bound), and a module may define up to 16 tables of up to a million elements
/// (compilers of large C++ and C# programs emit tables of tens of thousands). All of it is
/// address space, not memory: nothing is resident until a guest touches it.
fn instance_pool() -> wasmtime::InstanceAllocationStrategy {
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_core_instances(COMPONENT_CORE_INSTANCES)
        .total_memories(COMPONENT_MEMORIES as u32)
        .total_tables(16)
        .total_stacks(0)
        .total_component_instances(1)
        .max_core_instances_per_component(COMPONENT_CORE_INSTANCES)
        .max_memories_per_component(COMPONENT_MEMORIES as u32)
        .max_tables_per_component(16)
        .max_memories_per_module(1)
        .max_tables_per_module(16)
        .table_elements(1 << 20)
        .max_memory_size(1 << 32)
        .max_core_instance_size(16 << 20)
        .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
        .table_keep_resident(KEEP_RESIDENT_BYTES)
        .pagemap_scan(wasmtime::Enabled::Auto);
    wasmtime::InstanceAllocationStrategy::Pooling(pool)
}

/// Of the guest memory an invocation wrote, how much stays mapped for the next one (reset
/// in place, found with the kernel's PAGEMAP_SCAN where it has it) instead of being handed
/// back to the kernel and faulted in again. Covers a typical guest's stack and data and
/// the start of its heap; bounds what an idle worker keeps resident.
const KEEP_RESIDENT_BYTES: usize = 2 << 20;

/// Adds the request's preopened directories. With descriptors from the supervisor, each
/// one becomes the working directory for a moment and is opened as "." (WASI's builder only
/// takes paths), so no path to it, nor search permission on its parents, is needed.
fn add_preopens(wasi: &mut WasiCtxBuilder, request: &RunRequest<'_>) -> Result<(), String> {
    use nix::fcntl::{OFlag, open};
    let describe = |p: &wasmbox_protocol::Preopen, e: &str| format!("preopen {} -> {}: {e}", p.host.display(), p.guest);
    let home = if request.preopen_dirs.is_empty() {
        None
    } else {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        Some(open(".", flags, nix::sys::stat::Mode::empty()).map_err(|e| format!("working directory: {e}"))?)
    };
    let mut result = Ok(());
    for (i, preopen) in request.preopens.iter().enumerate() {
        let perms = if preopen.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
        let added = match request.preopen_dirs.get(i) {
            Some(dir) => match nix::unistd::fchdir(dir) {
                Ok(()) => wasi.preopened_dir(".", &preopen.guest, perms).map(drop).map_err(|e| format!("{e:#}")),
                Err(e) => Err(e.to_string()),
            },
            None => wasi.preopened_dir(&preopen.host, &preopen.guest, perms).map(drop).map_err(|e| format!("{e:#}")),
        };
        if let Err(e) = added {
            result = Err(describe(preopen, &e));
            break;
        }
    }
    if let Some(home) = home {
        nix::unistd::fchdir(&home).map_err(|e| format!("working directory: {e}"))?;
    }
    result
}

/// Major version of the linked Wasmtime, for display; the compatibility hash is the real key.
const WASMTIME_MAJOR: &str = "48";

/// A single timer thread per worker that bumps the engine's epoch when the current
/// invocation's deadline passes. Arming is generation-checked, so a deadline that fires
/// just as one invocation ends can never interrupt the next one.
struct Watchdog {
    shared: Arc<WatchdogShared>,
}

struct WatchdogShared {
    state: Mutex<WatchdogState>,
    wake: Condvar,
}

#[derive(Default)]
struct WatchdogState {
    generation: u64,
    deadline: Option<Instant>,
    fired: bool,
    /// When the watchdog thread wakes up by itself: `None` while it waits without a timeout
    /// (or has not waited yet). Arming a deadline no earlier than this needs no wake-up: the
    /// thread will see it then. So under steady load the thread wakes about once per
    /// deadline length, not once per invocation (each wake-up is a context switch and
    /// spreads the process over another CPU, which makes every unmap an IPI).
    wakes_at: Option<Instant>,
}

impl Watchdog {
    fn start(engine: wasmtime::Engine) -> std::io::Result<Self> {
        let shared = Arc::new(WatchdogShared { state: Mutex::default(), wake: Condvar::new() });
        let thread_shared = shared.clone();
        std::thread::Builder::new().name("wasmbox-deadline".into()).spawn(move || {
            let shared = thread_shared;
            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match state.deadline {
                    None => {
                        state.wakes_at = None;
                        state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                    }
                    Some(deadline) => {
                        let now = Instant::now();
                        if now >= deadline {
                            engine.increment_epoch();
                            state.deadline = None;
                            state.fired = true;
                        } else {
                            state.wakes_at = Some(deadline);
                            state =
                                shared.wake.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
                        }
                    }
                }
            }
        })?;
        Ok(Watchdog { shared })
    }

    fn arm(&self, deadline: Instant) -> ArmedDeadline<'_> {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        state.generation += 1;
        state.deadline = Some(deadline);
        state.fired = false;
        let generation = state.generation;
        // The thread checks the deadline whenever it wakes, under this lock.
        let wake = state.wakes_at.is_none_or(|at| at > deadline);
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        ArmedDeadline { watchdog: self, generation }
    }
}

struct ArmedDeadline<'a> {
    watchdog: &'a Watchdog,
    generation: u64,
}

impl ArmedDeadline<'_> {
    /// Stops the timer; returns whether the deadline had fired.
    fn disarm(self) -> bool {
        let mut state = self.watchdog.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        debug_assert_eq!(state.generation, self.generation);
        state.deadline = None;
        std::mem::take(&mut state.fired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    trait CompileCommand {
        fn compile_command(&self, wasm: &[u8]) -> Result<WasmtimeModule, EngineError>;
    }

    impl CompileCommand for WasmtimeEngine {
        fn compile_command(&self, wasm: &[u8]) -> Result<WasmtimeModule, EngineError> {
            self.compile(wasm, ModuleKind::Command)
        }
    }

    fn engine() -> WasmtimeEngine {
        WasmtimeEngine::new(false).unwrap()
    }

    fn request<'a>(argv: &'a [String], timeout_ms: u64, memory: u64) -> RunRequest<'a> {
        RunRequest::bare(argv, memory, Duration::from_millis(timeout_ms), 1024)
    }

    #[test]
    fn version_is_stable_for_one_configuration() {
        assert_eq!(engine().version(), engine().version());
    }

    #[test]
    fn infinite_loop_is_interrupted_at_the_deadline() {
        let e = engine();
        let wasm =
            wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))"#).unwrap();
        let m = e.compile_command(&wasm).unwrap();
        let argv = vec!["loop".to_string()];
        let started = Instant::now();
        let r = e.run(&m, request(&argv, 100, 1 << 20));
        assert_eq!(r.outcome, Outcome::DeadlineExceeded);
        assert!(started.elapsed() < Duration::from_secs(2));
        // The next run on the same engine is not hit by a stale tick.
        let ok = wat::parse_str(r#"(module (func (export "_start")))"#).unwrap();
        let m = e.compile_command(&ok).unwrap();
        assert_eq!(e.run(&m, request(&argv, 1000, 1 << 20)).outcome, Outcome::Exited { code: 0 });
    }

    #[test]
    fn deadlines_hold_whatever_the_watchdog_was_sleeping_for() {
        let e = engine();
        let argv = vec!["loop".to_string()];
        let spin = e
            .compile_command(
                &wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))"#)
                    .unwrap(),
            )
            .unwrap();
        let quick = e.compile_command(&wat::parse_str(r#"(module (func (export "_start")))"#).unwrap()).unwrap();
        // A long deadline leaves the watchdog asleep until far ahead: a shorter one armed
        // after it must wake it.
        assert_eq!(e.run(&quick, request(&argv, 60_000, 1 << 20)).outcome, Outcome::Exited { code: 0 });
        let started = Instant::now();
        assert_eq!(e.run(&spin, request(&argv, 100, 1 << 20)).outcome, Outcome::DeadlineExceeded);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(2), "{took:?}");
        // A short deadline, disarmed, leaves it asleep until that time: a longer one armed
        // after it is not woken for, and still fires on time.
        assert_eq!(e.run(&quick, request(&argv, 50, 1 << 20)).outcome, Outcome::Exited { code: 0 });
        let started = Instant::now();
        assert_eq!(e.run(&spin, request(&argv, 300, 1 << 20)).outcome, Outcome::DeadlineExceeded);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn the_pooled_slot_comes_back_clean_for_every_invocation() {
        // Each run checks that memory and table look as the module declares them, then
        // dirties both: a byte of the data segment, a page inside the part of memory kept
        // resident between invocations, one far beyond it (after growing), and a table slot.
        // Any of it surviving into the next run makes that run trap.
        let wasm = wat::parse_str(
            r#"(module
                (memory 2)
                (data (i32.const 64) "\07")
                (table 4 funcref)
                (func $f)
                (func (export "_start")
                  (if (i32.ne (i32.load8_u (i32.const 64)) (i32.const 7)) (then unreachable))
                  (if (i32.ne (i32.load (i32.const 70000)) (i32.const 0)) (then unreachable))
                  (if (i32.ne (memory.size) (i32.const 2)) (then unreachable))
                  (if (i32.eqz (ref.is_null (table.get (i32.const 3)))) (then unreachable))
                  (i32.store8 (i32.const 64) (i32.const 9))
                  (i32.store (i32.const 70000) (i32.const 1))
                  (drop (memory.grow (i32.const 100)))
                  (i32.store (i32.const 6000000) (i32.const 1))
                  (table.set (i32.const 3) (ref.func $f)))
                (elem declare func $f))"#,
        )
        .unwrap();
        let e = engine();
        let m = e.compile_command(&wasm).unwrap();
        let argv = vec!["clean".to_string()];
        for run in 0..3 {
            let r = e.run(&m, request(&argv, 5000, 64 << 20));
            assert_eq!(r.outcome, Outcome::Exited { code: 0 }, "run {run}");
        }
    }

    #[test]
    fn tables_larger_than_the_usual_default_work_and_too_large_ones_are_invalid() {
        let e = engine();
        let argv = vec!["table".to_string()];
        // 100,000 elements: over Wasmtime's default pool limit (20,000), which large C++ and
        // C# programs exceed; within WasmBox's.
        let big = wat::parse_str(r#"(module (table 100000 funcref) (func (export "_start")))"#).unwrap();
        let m = e.compile_command(&big).unwrap();
        assert_eq!(e.run(&m, request(&argv, 5000, 1 << 20)).outcome, Outcome::Exited { code: 0 });
        // Past the slot: refused when the module is compiled, with the reason, not per call.
        let huge = wat::parse_str(r#"(module (table 2000000 funcref) (func (export "_start")))"#).unwrap();
        match e.compile_command(&huge) {
            Err(EngineError::InvalidModule(m)) => assert!(m.contains("table"), "{m}"),
            other => panic!("expected an invalid module, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn initial_memory_above_the_cap_is_memory_exceeded() {
        let e = engine();
        let wasm = wat::parse_str(r#"(module (memory 100) (func (export "_start")))"#).unwrap();
        let m = e.compile_command(&wasm).unwrap();
        let argv = vec!["big".to_string()];
        let r = e.run(&m, request(&argv, 1000, 1 << 20));
        assert_eq!(r.outcome, Outcome::MemoryLimitExceeded { limit_bytes: 1 << 20 });
    }

    #[test]
    fn modules_without_start_or_with_unknown_imports_are_invalid() {
        let e = engine();
        let no_start = wat::parse_str(r#"(module (func (export "main")))"#).unwrap();
        assert!(matches!(e.compile_command(&no_start), Err(EngineError::InvalidModule(m)) if m.contains("_start")));
        let unknown = wat::parse_str(r#"(module (import "env" "nope" (func)) (func (export "_start")))"#).unwrap();
        assert!(matches!(e.compile_command(&unknown), Err(EngineError::InvalidModule(_))));
        assert!(matches!(e.compile_command(b"\0asm garbage"), Err(EngineError::InvalidModule(_))));
    }

    #[test]
    fn trap_and_exit_codes_are_distinct() {
        let e = engine();
        let argv = vec!["t".to_string()];
        let trap =
            e.compile_command(&wat::parse_str(r#"(module (func (export "_start") unreachable))"#).unwrap()).unwrap();
        assert!(matches!(e.run(&trap, request(&argv, 1000, 1 << 20)).outcome, Outcome::Trapped { .. }));
        let exit = e
            .compile_command(
                &wat::parse_str(
                    r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                       (memory (export "memory") 1)
                       (func (export "_start") (call $exit (i32.const 7))))"#,
                )
                .unwrap(),
            )
            .unwrap();
        assert_eq!(e.run(&exit, request(&argv, 1000, 1 << 20)).outcome, Outcome::Exited { code: 7 });
    }
}
