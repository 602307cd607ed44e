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
use crate::engine::Engine;

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
        match cache.get(&module, Some(file), crate::engine::ModuleKind::Command) {
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
