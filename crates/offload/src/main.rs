//! The `offload` binary: the server (`offload serve`) and its command-line
//! client, per SPEC §3 and §5. It parses arguments, reports errors in one
//! line on stderr and maps them to exit codes; the work is in the crates.
//!
//! Exit codes: 0 success, 1 the operation failed (the server said no),
//! 2 bad usage (caught here, or a 400 from the server that names the
//! argument), 3 cannot reach the server.

// Output goes through `outln!`, which a closed stdout cannot panic.
#![warn(clippy::print_stdout)]

/// `println!` that hands back the write's error instead of panicking, so
/// that a command piped into a reader that stops early (`offload list |
/// head -1`) ends quietly (see [`is_broken_pipe`]) rather than with a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod bench;
mod cli;
mod commands;
mod output;
mod work;

use std::process::ExitCode;

use clap::Parser;
use offload_client::ClientError;

/// The server's writer allocates a few small strings for every task it
/// reads, in a heap that also holds every pending task's place in the
/// claim order. With a million tasks stored, glibc's allocator spent a
/// fifth of the writer's time searching its free lists, and claims ran
/// ~25% slower than with ten thousand stored. With jemalloc the writer's
/// time a task was the same either way (bench/HISTORY.md, round 22).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A mistake in how the command was called (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A node holds a descriptor for each connection, and each long-polling
/// worker and each event stream keeps one open; `offload work` holds about
/// four for each command it runs (its pipes and its guard's). Many systems
/// start a program with a soft limit of 1,024 open files under a far
/// higher hard one: past it a node accepts no connection, new clients
/// waiting unanswered, and a worker's commands fail to start, each failure
/// an attempt spent. The hard limit is what the administrator allows, so
/// both take it. The commands a worker starts inherit it, as they do in a
/// container whose soft limit is its hard one.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
        Err(e) => tracing::warn!(
            limit = soft,
            error = %e,
            "cannot raise the open files limit; connections and commands past it fail"
        ),
    }
}

pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if matches!(cli.command, cli::Command::WorkGuard) {
        // One beside each running command: no logging, no runtime.
        return work::guard();
    }
    let serving = matches!(cli.command, cli::Command::Serve(_) | cli::Command::Work(_));
    init_logging(if serving { "info" } else { "warn" });
    if serving {
        raise_open_files_limit();
    }
    let runtime_threads = match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(n) => match n.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                eprintln!(
                    "offload: TOKIO_WORKER_THREADS must be a whole number above 0; got {n:?}"
                );
                return ExitCode::from(2);
            }
        },
        // One core is the store's: the SQLite writer thread (or, beside
        // PostgreSQL, the database). On 2 cores a single request thread
        // measured faster than two: fewer wake-ups between threads.
        Err(_) if matches!(cli.command, cli::Command::Serve(_)) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Some(cores.saturating_sub(1).max(1))
        }
        Err(_) => None,
    };
    let mut builder = match runtime_threads {
        // One thread: the current-thread scheduler, which never hands work
        // between threads at all.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("offload: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        // The reader of stdout went away: what it wanted, it has.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offload: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Whether the command failed because its stdout was closed: `main` ends
/// such a command with 0 and nothing on stderr, since the reader that left
/// has what it wanted.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { .. }) => 3,
        // The server's 400 names an argument and the rule it broke: the
        // same slip as one caught here before sending, and the same code,
        // wherever the check happens to live.
        Some(ClientError::Api { status: 400, .. } | ClientError::Unaddressable { .. }) => 2,
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
