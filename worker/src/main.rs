//! `wasmbox-worker`: one sandbox slot, started by the `wasmbox` supervisor.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before anything else: where the kernel put this process (reported in the handshake).
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut args = wasmbox_worker::WorkerArgs::parse();
    args.initial_cgroup = cgroup;
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let slot = args.slot;
    match wasmbox_worker::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(slot, error = %anyhow::Error::from(e), "worker stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
