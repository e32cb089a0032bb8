//! The `offload` binary: the server (`offload serve`) and its command-line
//! client, per SPEC §3 and §5. It parses arguments, reports errors in one
//! line on stderr and maps them to exit codes; the work is in the crates.
//!
//! Exit codes: 0 success, 1 the operation failed (the server said no),
//! 2 bad usage, 3 cannot reach the server.

mod bench;
mod cli;
mod commands;
mod output;
mod work;

use std::process::ExitCode;

use clap::Parser;
use offload_client::ClientError;

/// A mistake in how the command was called (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let serving = matches!(cli.command, cli::Command::Serve(_) | cli::Command::Work(_));
    init_logging(if serving { "info" } else { "warn" });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if matches!(cli.command, cli::Command::Serve(_))
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none()
    {
        // One core is the store's: the SQLite writer thread (or, beside
        // PostgreSQL, the database). Measured on 2 cores, one request thread
        // instead of two gave ~20% more throughput and ~15% faster pickup,
        // from fewer wake-ups between threads.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads(cores.saturating_sub(1).max(1));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("offload: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("offload: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { .. }) => 3,
        _ => 1,
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OFFLOAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
