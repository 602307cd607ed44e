//! Compile mode (`wasmbox-worker --compile a.wasm b.wasm ...`, behind `wasmbox compile`):
//! precompiles modules into the artifact cache the workers load from, so their first
//! invocation loads native code instead of compiling (like `wasmedge compile`, but into
//! the content-addressed cache, keyed by the module's SHA-256).
//!
//! With `--user`, the engine's artifact directory and every artifact belong to that user:
//! the files are opened and the directory is set up first, then the process drops to the
//! user before it compiles anything, exactly as a worker does.

use std::fs::File;
use std::io::Read;

use wasmbox_protocol::{ModuleRef, ModuleSource};

use crate::WorkerArgs;
use crate::cache::{ModuleCache, sha256_hex};
use crate::engine::{ArtifactFile, Engine, EngineError, ModuleKind};
use crate::{WorkerError, harden};
use wasmbox_protocol::CompileReport;

/// Compiles every `--compile` module on `engine`; 0 when all compiled, 1 when any failed.
pub fn run<E: Engine>(engine: E, args: &WorkerArgs) -> anyhow::Result<u8> {
    let Some(cache_dir) = args.cache_dir.as_deref() else {
        anyhow::bail!("--compile needs --cache-dir (where the workers look for artifacts)");
    };
    let owner = args.hardening.user;
    let mut cache = ModuleCache::new_owned(engine, Some(cache_dir), owner, 1, args.max_module_bytes)?;
    let Some(artifact_dir) = cache.artifact_dir().map(std::path::Path::to_path_buf) else {
        anyhow::bail!("engine {} keeps no artifacts on disk", cache.engine().name());
    };
    // Open everything while still the invoking user: the modules may not be readable by
    // the worker user.
    let mut failed = 0;
    let mut modules = Vec::new();
    for path in &args.compile {
        match read(path, args.max_module_bytes) {
            Ok((file, sha256)) => modules.push((path, file, sha256)),
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                failed += 1;
            }
        }
    }
    cache.enter_artifact_dir()?;
    if let Some((uid, gid)) = owner {
        crate::harden::become_user(uid, gid)?;
    }
    for (path, file, sha256) in modules {
        let module = ModuleRef { path: path.clone(), sha256: sha256.clone() };
        match cache.get(&module, Some(file), None, crate::engine::ModuleKind::Command) {
            Ok((_, source)) => {
                let what = match source {
                    ModuleSource::Compiled => "compiled",
                    _ => "already compiled",
                };
                let ext = cache.engine().artifact_extension().unwrap_or_default();
                println!("{}: {what} {sha256} -> {}/{sha256}.{ext}", path.display(), artifact_dir.display());
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                failed += 1;
            }
        }
    }
    Ok(u8::from(failed > 0))
}

/// Opens a module and hashes it; the worker reads it again from the same descriptor.
fn read(path: &std::path::Path, limit: u64) -> anyhow::Result<(File, String)> {
    use std::io::Seek;
    let mut file = File::open(path)?;
    let mut bytes = Vec::new();
    (&mut file).take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        anyhow::bail!("larger than the limit of {limit} bytes (WASMBOX_MAX_MODULE_BYTES)");
    }
    file.rewind()?;
    Ok((file, sha256_hex(&bytes)))
}

/// Where a compile process writes its artifact, in the directory it was given.
const ARTIFACT_STEM: &str = "artifact";

/// `--compile-artifact`: reads the module from stdin (bounded, hash checked), locks the
/// process down exactly as a worker, compiles the requested form into the directory at
/// `--socket-fd` and reports on stdout. The supervisor, not this process, decides what
/// becomes of the file: it copies it into the artifact store and records its digest.
pub fn artifact<E: Engine>(
    engine: E,
    args: &WorkerArgs,
    supervisor: nix::unistd::Pid,
    mut applied: harden::Applied,
) -> Result<(), WorkerError> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    let sha256 = args.compile_artifact.clone().unwrap_or_default();
    let kind = match args.compile_kind.as_str() {
        "session" => ModuleKind::Session,
        _ => ModuleKind::Command,
    };
    let mut wasm = Vec::new();
    // SAFETY: fd 0 is this process's stdin, the module file the supervisor opened; it is
    // read here and never closed by anyone else.
    let stdin = unsafe { File::from_raw_fd(0) };
    let read = (&stdin).take(args.max_module_bytes + 1).read_to_end(&mut wasm);
    std::mem::forget(stdin);
    read.map_err(|e| WorkerError::WorkDir(std::io::Error::new(e.kind(), format!("reading the module: {e}"))))?;
    // SAFETY: the directory descriptor was placed at --socket-fd by the supervisor and
    // stays open for the whole process.
    let dir = unsafe { BorrowedFd::borrow_raw(args.socket_fd) };
    engine.warm_up().map_err(|e| WorkerError::Engine(e.into()))?;
    harden::prime_allocator().map_err(WorkerError::WorkDir)?;
    std::env::set_current_dir("/").map_err(WorkerError::WorkDir)?;
    harden::lock_down(&args.hardening, supervisor, engine.path_policy(), &mut applied)?;
    // Test hook (builds that have them, run with --test-hooks): a module with this custom
    // section makes the compile process hang, as a compiler stuck on a hostile module would.
    if crate::harden::TEST_HOOKS_BUILT
        && args.hardening.test_hooks
        && has_custom_section(&wasm, "wasmbox-test-compile-hang")
    {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    let report = if wasm.len() as u64 > args.max_module_bytes {
        CompileReport::Invalid { message: format!("module is larger than {} bytes", args.max_module_bytes) }
    } else if sha256_hex(&wasm) != sha256 {
        CompileReport::Changed
    } else {
        compile_into(&engine, &wasm, kind, dir)
    };
    let mut line = serde_json::to_vec(&report).unwrap_or_default();
    line.push(b'\n');
    std::io::Write::write_all(&mut std::io::stdout().lock(), &line).map_err(WorkerError::WorkDir)?;
    Ok(())
}

fn compile_into<E: Engine>(
    engine: &E,
    wasm: &[u8],
    kind: ModuleKind,
    dir: std::os::fd::BorrowedFd<'_>,
) -> CompileReport {
    use std::os::fd::AsRawFd;
    let (name, version) = (engine.name().to_owned(), engine.version());
    let Some(ext) = engine.artifact_extension() else {
        return CompileReport::Unsupported { engine: name, version };
    };
    let form = match kind {
        ModuleKind::Command => std::borrow::Cow::Borrowed(wasm),
        ModuleKind::Session => match crate::session::instrument::instrument(wasm) {
            Ok(instrumented) => std::borrow::Cow::Owned(instrumented.wasm),
            Err(e) => return CompileReport::Invalid { message: e.to_string() },
        },
    };
    let file = format!("{ARTIFACT_STEM}.{ext}");
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}/{file}", dir.as_raw_fd()));
    let artifact = ArtifactFile { dir, name: &file, path: &path };
    // Loading what was written checks it for the kind (a command needs `_start`), as the
    // worker will.
    match engine.precompile(&form, kind, &artifact).and_then(|()| engine.load_artifact(&artifact, kind)) {
        Ok(_) => CompileReport::Compiled { engine: name, version, file },
        Err(EngineError::InvalidModule(message)) => CompileReport::Invalid { message },
        Err(e) => CompileReport::Failed { message: format!("{e:#}") },
    }
}

/// Whether `wasm` has a custom section named `name` (a shallow walk of the sections).
fn has_custom_section(wasm: &[u8], name: &str) -> bool {
    wasmparser::Parser::new(0)
        .parse_all(wasm)
        .any(|payload| matches!(payload, Ok(wasmparser::Payload::CustomSection(section)) if section.name() == name))
}
