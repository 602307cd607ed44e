//! `wasmbox`: the supervisor binary.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wasmbox_supervisor::cli::{self, Cli, Subcommands};
use wasmbox_supervisor::config::{Config, LogFormat};
use wasmbox_supervisor::logwriter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Subcommands::Serve(config)) => serve(*config),
        Some(Subcommands::Compile(args)) => cli::compile(&args),
        Some(Subcommands::Invoke(args)) => cli::invoke(&args),
    }
}

fn serve(config: Config) -> std::process::ExitCode {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Lines leave through a buffer and a thread of their own (see logwriter); the guard
    // writes what is left when serving ends.
    let terminal = std::io::stderr().is_terminal();
    let (writer, _log) = match logwriter::start(std::io::stderr(), terminal) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("cannot start the log writer thread: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.with_ansi(terminal).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_thread_count())
        .thread_name("wasmbox-io")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wasmbox_supervisor::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            std::process::ExitCode::FAILURE
        }
    }
}
