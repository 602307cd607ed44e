//! The `wasmbox` command line: `serve` (the default), `compile`, `invoke`.
//!
//! Every subcommand reads the same settings (flags and `WASMBOX_*` variables) as the
//! server, so `compile` fills the cache a server with the same environment loads from, and
//! `invoke` runs a function the way its `name.toml` configures it. The supervisor links no
//! engine: both run the worker binary, in its `--compile` and `--one-shot` modes.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::registry::{FunctionName, Registry};

/// WasmBox: a serverless runtime multiplexer for WebAssembly. Serves WASI functions over
/// HTTP, running each invocation in a pre-forked, sandboxed worker process.
#[derive(Debug, Parser)]
#[command(name = "wasmbox", version, max_term_width = 100, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Subcommands>,
    /// With no subcommand: `serve`.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Subcommands {
    /// Serve the functions directory over HTTP (the default).
    Serve(Box<Config>),
    /// Precompile modules into the artifact store (WASMBOX_CACHE_DIR/artifacts) for the
    /// configured engine, each in a sandboxed compile process as the server's compiler
    /// does, so their first invocation loads native code.
    Compile(CompileArgs),
    /// Run a function of the functions directory once, locally: stdin to stdout, its
    /// name.toml applied, its exit code as this command's (125 for a trap or limit). No
    /// worker pool, cgroup or sandbox: for trying functions, not for tenant code.
    Invoke(InvokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct CompileArgs {
    /// Modules to compile.
    #[arg(required = true, value_name = "FILE.wasm")]
    pub modules: Vec<PathBuf>,
    /// The tenant the artifacts are for [default: a module of the functions directory
    /// its function's tenant, any other its file name without `.wasm`].
    #[arg(long)]
    pub tenant: Option<String>,
    #[command(flatten)]
    pub config: Box<Config>,
}

#[derive(Debug, clap::Args)]
pub struct InvokeArgs {
    /// Function name (`name.wasm` in WASMBOX_FUNCTIONS_DIR).
    pub function: String,
    /// Arguments for the function (replacing the `args` of its name.toml).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
    #[command(flatten)]
    pub config: Box<Config>,
}

/// What the worker binary is asked for.
fn worker(config: &Config) -> Result<(Command, &'static str), String> {
    config.validate().map_err(|e| e.to_string())?;
    let binary = crate::worker_binary(config).map_err(|e| e.to_string())?;
    let engine = config.engine().map_err(|e| e.to_string())?.name();
    let mut cmd = Command::new(binary);
    cmd.arg("--engine").arg(engine).args(config.engine_args());
    cmd.arg("--cache-dir").arg(config.resolved_cache_dir());
    cmd.arg(format!("--max-module-bytes={}", config.max_module_bytes));
    Ok((cmd, engine))
}

/// `wasmbox compile`: the server's trusted compiler, run from the command line (without
/// cgroups, which are the server's).
pub fn compile(args: &CompileArgs) -> ExitCode {
    let config = &args.config;
    let prepared = (|| -> Result<_, String> {
        config.validate().map_err(|e| e.to_string())?;
        let binary = crate::worker_binary(config).map_err(|e| e.to_string())?;
        let hardening = crate::hardening::WorkerHardening::resolve(config).map_err(|e| e.to_string())?;
        let compiler =
            crate::compiler::CompilerConfig::new(config, &hardening, binary, Vec::new()).map_err(|e| e.to_string())?;
        let registry = Registry::new(&config.functions_dir, config.max_module_bytes).map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        Ok((compiler, registry, runtime))
    })();
    let (compiler_config, registry, runtime) = match prepared {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    if let Some(tenant) = &args.tenant {
        if let Err(e) = FunctionName::parse(tenant) {
            return fail(&format!("--tenant {tenant:?}: {e}"));
        }
    }
    let failed = runtime.block_on(async {
        let spawner = crate::pool::spawn::Spawner::start(tokio::runtime::Handle::current())
            .map_err(|e| format!("cannot start the spawner thread: {e}"))?;
        let compiler = crate::compiler::Compiler::new(compiler_config, spawner)
            .map_err(|e| format!("cannot set up the artifact store: {e}"))?;
        let mut failed = 0;
        for path in &args.modules {
            match compile_one(&compiler, &registry, args.tenant.as_deref(), path, config.max_module_bytes).await {
                Ok(line) => println!("{}: {line}", path.display()),
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    failed += 1;
                }
            }
        }
        Ok::<_, String>(failed)
    });
    match failed {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => fail(&e),
    }
}

/// Compiles one module file for its tenant; says what happened.
async fn compile_one(
    compiler: &crate::compiler::Compiler,
    registry: &Registry,
    tenant: Option<&str>,
    path: &std::path::Path,
    limit: u64,
) -> Result<String, String> {
    use std::io::Read;
    let file = crate::registry::files::open_regular(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("larger than the limit of {limit} bytes (WASMBOX_MAX_MODULE_BYTES)"));
    }
    let sha256 = crate::registry::sha256_hex(&bytes);
    let stem = path.file_stem().and_then(|s| s.to_str()).and_then(|s| FunctionName::parse(s).ok());
    let tenant = match (tenant, &stem) {
        (Some(t), _) => t.to_owned(),
        (None, Some(name)) => match registry.lookup(name).await {
            Ok(function) if function.module.sha256 == sha256 => function.tenant().to_owned(),
            _ => name.to_string(),
        },
        (None, None) => return Err("the file name is not a function name; pass --tenant".into()),
    };
    let module = wasmbox_protocol::ModuleRef { path: path.to_path_buf(), sha256: sha256.clone() };
    match compiler.prepare(&tenant, &module, crate::compiler::Kind::Command).await {
        Ok((Some(_), true)) => Ok(format!("compiled {sha256} for tenant {tenant}")),
        Ok((Some(_), false)) => Ok(format!("already compiled {sha256} for tenant {tenant}")),
        Ok((None, _)) => Ok(format!("valid; the engine keeps no artifacts ({sha256})")),
        Err(e) => Err(e.to_string()),
    }
}

/// `wasmbox invoke`.
pub fn invoke(args: &InvokeArgs) -> ExitCode {
    let config = &args.config;
    let (mut cmd, _) = match worker(config) {
        Ok(found) => found,
        Err(e) => return fail(&e),
    };
    let name = match FunctionName::parse(&args.function) {
        Ok(name) => name,
        Err(e) => return fail(&format!("{:?}: {e}", args.function)),
    };
    let registry = match Registry::new(&config.functions_dir, config.max_module_bytes) {
        Ok(r) => r,
        Err(e) => return fail(&format!("{}: {e}", config.functions_dir.display())),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let function = match runtime.block_on(registry.lookup(&name)) {
        Ok(f) => f,
        Err(e) => {
            return fail(&format!("{} (in {})", crate::error_chain(&e), registry.dir().display()));
        }
    };
    let limits = &function.config.limits;
    let memory_mb = limits.memory_mb.unwrap_or(config.default_memory_mb);
    let timeout_ms = limits.timeout_ms.unwrap_or(config.default_timeout_ms);
    let wasi = serde_json::json!({"env": function.config.env, "preopens": function.config.preopens});
    let guest_args = if args.args.is_empty() { &function.config.default_args } else { &args.args };
    cmd.arg("--one-shot")
        .arg(&function.module.path)
        .arg(format!("--one-shot-memory-mb={memory_mb}"))
        .arg(format!("--one-shot-timeout-ms={timeout_ms}"))
        .arg(format!("--one-shot-wasi={wasi}"))
        .arg("--")
        .args(guest_args);
    run(cmd)
}

/// Runs the worker with this process's stdin, stdout and stderr; its status is ours.
fn run(mut cmd: Command) -> ExitCode {
    match cmd.status() {
        Ok(status) => match status.code() {
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            None => fail(&format!("the worker {}", crate::pool::describe_exit(status))),
        },
        Err(e) => fail(&format!("cannot run {}: {e}", cmd.get_program().to_string_lossy())),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("wasmbox: {message}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("wasmbox").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn serve_is_the_default_and_each_subcommand_takes_the_settings() {
        let cli = parse(&["--workers", "3"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.workers, Some(3));
        let Some(Subcommands::Serve(config)) = parse(&["serve", "--workers", "2"]).command else { panic!() };
        assert_eq!(config.workers, Some(2));
        let Some(Subcommands::Compile(c)) = parse(&["compile", "--engine", "wasmedge", "a.wasm", "b.wasm"]).command
        else {
            panic!()
        };
        assert_eq!(c.modules, [PathBuf::from("a.wasm"), PathBuf::from("b.wasm")]);
        assert_eq!(c.config.engine().unwrap().name(), "wasmedge");
        let Some(Subcommands::Invoke(i)) = parse(&["invoke", "echo", "-n", "--flag"]).command else { panic!() };
        assert_eq!((i.function.as_str(), i.args.as_slice()), ("echo", &["-n".to_string(), "--flag".into()][..]));
        assert!(Cli::try_parse_from(["wasmbox", "compile"]).is_err(), "compile needs a module");
    }
}
