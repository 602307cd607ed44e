//! One-shot mode (`wasmbox-worker --one-shot module.wasm -- args...`): a fresh process runs
//! one module once, stdin to stdout, and exits with the guest's code. It is the CGI-style
//! alternative the benchmark harness measures pooled workers against (a process and an
//! engine per request), and a way to run a module by hand with the worker's own engine and
//! artifact cache. No sandbox slot, cgroup or hardening: not for tenant code.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use wasmbox_protocol::{ModuleRef, Outcome, Preopen};

use crate::cache::{ModuleCache, sha256_hex};
use crate::engine::{Engine, RunRequest};

/// What one run needs besides the engine.
#[derive(Debug, Clone)]
pub struct OneShot {
    pub module: PathBuf,
    pub args: Vec<String>,
    pub wasi: Wasi,
    pub cache_dir: Option<PathBuf>,
    pub memory_limit_bytes: u64,
    pub timeout: Duration,
    pub max_output_bytes: u64,
    pub max_module_bytes: u64,
}

/// The guest's environment and preopened directories (a function's `name.toml`).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
pub struct Wasi {
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub preopens: Vec<Preopen>,
}

/// Exit status for anything but the guest exiting by itself (traps, limits, bad modules),
/// as a shell reports a command that could not run.
pub const FAILED: u8 = 125;

/// Runs the module once on `engine` with this process's stdin and stdout; the guest's
/// stderr goes to stderr, followed by one line describing any outcome but an exit.
pub fn run<E: Engine>(engine: E, job: &OneShot) -> anyhow::Result<u8> {
    let mut cache = ModuleCache::new(engine, job.cache_dir.as_deref(), 1, job.max_module_bytes)?;
    let bytes = std::fs::read(&job.module).map_err(|e| anyhow::anyhow!("{}: {e}", job.module.display()))?;
    let module = ModuleRef { path: job.module.clone(), sha256: sha256_hex(&bytes) };
    drop(bytes);
    let (compiled, _) = cache
        .get(&module, None, None, crate::engine::ModuleKind::Command)
        .map_err(|e| anyhow::anyhow!("{}: {e}", job.module.display()))?;
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin)?;
    if cache.engine().deadlines() == wasmbox_protocol::Deadlines::Process {
        // The engine does not stop commands: this process ends at the deadline instead.
        let timeout = job.timeout;
        std::thread::Builder::new().name("deadline".into()).spawn(move || {
            std::thread::sleep(timeout);
            eprintln!("wasmbox-worker: {:?}", Outcome::DeadlineExceeded);
            std::process::exit(i32::from(FAILED));
        })?;
    }
    let mut argv = vec![program_name(&job.module)];
    argv.extend(job.args.iter().cloned());
    let result = cache.engine().run(
        &compiled.module,
        RunRequest {
            argv: &argv,
            env: &job.wasi.env,
            preopens: &job.wasi.preopens,
            preopen_dirs: &[],
            stdin: stdin.into(),
            memory_limit_bytes: job.memory_limit_bytes,
            timeout: job.timeout,
            max_output_bytes: job.max_output_bytes,
        },
    );
    std::io::stdout().write_all(&result.stdout)?;
    std::io::stdout().flush()?;
    std::io::stderr().write_all(&result.stderr)?;
    Ok(match result.outcome {
        // Exit statuses are 8 bits wide, as for any process.
        Outcome::Exited { code } => (code & 0xff) as u8,
        other => {
            eprintln!("wasmbox-worker: {other:?}");
            FAILED
        }
    })
}

fn program_name(module: &Path) -> String {
    module.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "main".into())
}
