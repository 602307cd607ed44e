//! `wasmbox-worker`: one sandbox slot, started by the `wasmbox` supervisor.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before anything else: where the kernel put this process (reported in the handshake).
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let parent = nix::unistd::getppid();
    let mut args = wasmbox_worker::WorkerArgs::parse();
    if !args.compile.is_empty() {
        return match wasmbox_worker::run_compile(&args) {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                eprintln!("wasmbox-worker: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if args.one_shot.is_some() {
        return match wasmbox_worker::run_one_shot(&args) {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                eprintln!("wasmbox-worker: {e:#}");
                std::process::ExitCode::from(wasmbox_worker::oneshot::FAILED)
            }
        };
    }
    args.initial_cgroup = cgroup;
    args.supervisor_pid = Some(parent);
    let mut applied = wasmbox_worker::harden::Applied::default();
    if args.hardening.close_fds {
        if let Err(e) = wasmbox_worker::harden::close_inherited_fds(&[args.socket_fd], &mut applied) {
            eprintln!("wasmbox-worker: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    if args.log_json {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
    let slot = args.slot;
    let result = if args.zygote {
        wasmbox_worker::run_zygote(args, applied)
    } else if args.compile_artifact.is_some() {
        wasmbox_worker::run_compile_artifact(args, applied)
    } else {
        wasmbox_worker::run(args, applied)
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(slot, error = %anyhow::Error::from(e), "worker stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
