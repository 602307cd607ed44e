//! `wasmbox-bench`: runs the benchmark suite and writes its report; also the comparison
//! servers it starts (`serve-*`, not meant to be run by hand).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use wasmbox_bench::modes::{Mode, Setup, absolute, sibling};
use wasmbox_bench::{report, servers, sessions, suite};

#[derive(Debug, Parser)]
#[command(name = "wasmbox-bench", about = "WasmBox against an in-process runtime, spawn-per-request and plain hyper")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs every scenario against every mode, then the extra measurements (cold start,
    /// respawn, memory, cgroups, sessions), and writes the report.
    Run {
        #[command(flatten)]
        bench: Bench,
        /// Modes to run, by letter: a WasmBox, b in-process, c spawn per request, d plain.
        #[arg(long, default_value = "abcd")]
        modes: String,
        /// Scenarios to run (hello, echo, compute, memory, component-hello), comma-separated.
        #[arg(long, value_delimiter = ',')]
        scenarios: Vec<String>,
    },
    /// Runs only the sessions measurement (restore, capture and commit of session state by
    /// heap size, beside a stateless hello) and writes its report (Markdown and JSON).
    Sessions {
        #[command(flatten)]
        bench: Bench,
    },
    /// Offers load to one running server and prints what it measured (for profiling).
    Load {
        /// Server address, e.g. 127.0.0.1:8095.
        addr: SocketAddr,
        /// Request path, e.g. /hello or /json-compress?arg=6000.
        #[arg(default_value = "/hello")]
        path: String,
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Requests per second (open loop); without it, a closed loop.
        #[arg(long)]
        rate: Option<f64>,
        /// Bytes of request body.
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
    },
    #[command(hide = true)]
    ServeInproc {
        #[command(flatten)]
        wasm: WasmServer,
        #[arg(long)]
        threads: usize,
    },
    #[command(hide = true)]
    ServeSpawn {
        #[command(flatten)]
        wasm: WasmServer,
        #[arg(long)]
        worker: PathBuf,
    },
    #[command(hide = true)]
    ServePlain {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

/// What `run` and `sessions` share.
#[derive(Debug, clap::Args)]
struct Bench {
    /// At most about a minute (smoke runs, CI); the default is the full run for reports.
    #[arg(long)]
    quick: bool,
    /// Report name: <out>/<name>.md and .json (and .svg for run) [default: quick or full,
    /// sessions-quick or sessions-full].
    #[arg(long)]
    name: Option<String>,
    /// Directory for the report.
    #[arg(long, default_value = "benchmarks/results")]
    out: PathBuf,
    /// Directory with the example functions (hello, echo, json-compress, alloc, counter).
    #[arg(long, default_value = "functions")]
    functions: PathBuf,
    /// Workers of (a) and threads of (b) [default: the number of cores].
    #[arg(long)]
    workers: Option<usize>,
    /// Artifact cache for every mode [default: a fresh temporary directory].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Engine of modes a, b and c: wasmtime, or wasmedge in a build with the `wasmedge`
    /// feature.
    #[arg(long, default_value = "wasmtime")]
    engine: String,
}

impl Bench {
    fn plan(&self) -> suite::Plan {
        if self.quick { suite::Plan::quick() } else { suite::Plan::full() }
    }

    /// The report's name: `--name`, else `prefix` and the plan's name.
    fn name(&self, prefix: &str) -> String {
        self.name.clone().unwrap_or_else(|| format!("{prefix}{}", self.plan().name))
    }

    /// Where the binaries and inputs are, with the artifact cache to remove at the end (when
    /// it is a temporary one); fails when one of `functions` is missing.
    fn setup(&self, functions: &[&str]) -> anyhow::Result<(Setup, RemoveOnDrop)> {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let (cache_dir, temporary) = match &self.cache_dir {
            Some(dir) => (absolute(dir), RemoveOnDrop(None)),
            None => {
                let dir = std::env::temp_dir().join(format!("wasmbox-bench-cache-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                (dir.clone(), RemoveOnDrop(Some(dir)))
            }
        };
        let setup = Setup {
            wasmbox: sibling("wasmbox")?,
            worker: sibling("wasmbox-worker")?,
            harness: std::env::current_exe()?,
            functions: absolute(&self.functions),
            cache_dir,
            workers: self.workers.unwrap_or(cores),
            engine: self.engine.clone(),
        };
        for f in functions {
            let path = setup.functions.join(format!("{f}.wasm"));
            anyhow::ensure!(path.is_file(), "{} missing: build the example functions (make functions)", path.display());
        }
        Ok((setup, temporary))
    }
}

/// A directory removed when this is dropped (if any).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What the two Wasm-running comparison servers share (modes b and c).
#[derive(Debug, clap::Args)]
struct WasmServer {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    functions: PathBuf,
    #[arg(long)]
    cache_dir: PathBuf,
    #[arg(long, default_value = "wasmtime")]
    engine: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { bench, modes, scenarios } => {
                let (plan, name) = (bench.plan(), bench.name(""));
                let modes: Vec<Mode> = modes
                    .chars()
                    .map(|c| Mode::parse(c).ok_or_else(|| anyhow::anyhow!("unknown mode {c:?} (a, b, c or d)")))
                    .collect::<anyhow::Result<_>>()?;
                let mut all = suite::Scenario::all();
                if !scenarios.is_empty() {
                    for s in &scenarios {
                        anyhow::ensure!(all.iter().any(|a| a.key == s), "unknown scenario {s:?}");
                    }
                    all.retain(|a| scenarios.iter().any(|s| s == a.key));
                }
                let (setup, _cache) =
                    bench.setup(&["hello", "echo", "json-compress", "alloc", "counter", "http-hello"])?;
                let results = suite::run(plan, &setup, &modes, all).await?;
                let md = report::write(&results, &bench.out, &name)?;
                print!("{}", report::markdown(&results, &format!("{name}.svg")));
                eprintln!("report written to {}", md.display());
                Ok(())
            }
            Command::Sessions { bench } => {
                let (plan, name) = (bench.plan(), bench.name("sessions-"));
                let (setup, _cache) = bench.setup(&["hello", "counter"])?;
                let results = sessions::run(plan, &setup).await?;
                let md = report::write_sessions(&results, &bench.out, &name)?;
                print!("{}", report::sessions_markdown(&results));
                eprintln!("report written to {}", md.display());
                Ok(())
            }
            Command::Load { addr, path, connections, duration, rate, body_bytes } => {
                use wasmbox_bench::loadgen::{self, Load, Target};
                let duration = std::time::Duration::from_secs_f64(duration.max(0.0));
                let load = match rate {
                    Some(rate) => Load::Open { rate, connections, duration, max_requests: u64::MAX },
                    None => Load::Closed { connections, duration, max_requests: u64::MAX },
                };
                let target = Target { addr, path, headers: vec![], body: vec![b'x'; body_bytes].into() };
                let m = loadgen::run(&target, load, &indicatif::ProgressBar::hidden()).await?;
                println!("{}", serde_json::to_string_pretty(&wasmbox_bench::stats::Summary::of(&m))?);
                Ok(())
            }
            Command::ServeInproc { wasm, threads } => {
                let listener = servers::bind(wasm.listen).await?;
                servers::in_process(listener, &wasm.functions, wasm.cache_dir, threads, &wasm.engine).await
            }
            Command::ServeSpawn { wasm, worker } => {
                let listener = servers::bind(wasm.listen).await?;
                servers::spawn_per_request(listener, &wasm.functions, worker, wasm.cache_dir, wasm.engine).await
            }
            Command::ServePlain { listen } => servers::plain(servers::bind(listen).await?).await,
        }
    })
}
