//! The command line of SPEC §5.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "offload",
    version,
    about = "Offload: background tasks, one binary."
)]
pub struct Cli {
    /// The server to talk to [default: http://127.0.0.1:6490]. For `bench`,
    /// the server to measure instead of starting one.
    #[arg(long, global = true, env = "OFFLOAD_URL")]
    pub url: Option<String>,
    /// Bearer token for the server.
    #[arg(long, global = true, env = "OFFLOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON for scripts instead of tables for people.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Enqueue a task and print its id.
    Enqueue(EnqueueArgs),
    /// Show one task.
    Get { id: String },
    /// List tasks, newest first.
    List(ListArgs),
    /// Cancel a task (a running one is asked to stop).
    Cancel { id: String },
    /// Put a failed or cancelled task back to pending with one more attempt
    /// (to blocked while a dependency is still active).
    Retry { id: String },
    /// Delete a finished task.
    Delete { id: String },
    /// Delete finished tasks.
    Clear {
        /// completed, failed or cancelled; repeat or separate with commas. Default: all three.
        #[arg(long = "state", value_delimiter = ',')]
        states: Vec<String>,
        /// Only tasks finished at least this many seconds ago.
        #[arg(long = "older-than")]
        older_than: Option<u64>,
    },
    /// Counts by state, overall, per queue and per type.
    Stats,
    /// Every queue with its settings and counts.
    Queues,
    /// Stop handing a queue's tasks to workers.
    Pause { queue: String },
    /// Start handing a queue's tasks to workers again.
    Resume { queue: String },
    /// Follow a task with a live progress bar until it finishes; exit 0
    /// completed, 1 failed, 2 cancelled.
    Watch { id: String },
    /// Run a worker that runs COMMAND once per task.
    ///
    /// The task's payload JSON is on the command's stdin; OFFLOAD_TASK_ID,
    /// OFFLOAD_ATTEMPT and OFFLOAD_TASK_TYPE are in its environment. Lines
    /// `progress: PERCENT [MESSAGE]` on its stdout report progress (the
    /// latest goes to the server when the one before was answered). Exit 0
    /// completes the task, with the last other stdout line as its result if
    /// that line is JSON; any other exit fails the attempt with the tail of
    /// stderr as the message, and the task is retried while it has attempts
    /// left. The command's exit ends its task: a process it leaves running
    /// (`sleep 60 &`) is not waited for, and the worker closes its ends of
    /// the pipes that process holds soon after the exit (redirect its
    /// output, as for a daemon).
    ///
    /// Each command runs in a process group of its own, killed whole on
    /// cancel, on timeout, when a shutdown's grace runs out, and when this
    /// worker dies, even by SIGKILL.
    Work(WorkArgs),
    /// Copy a node's SQLite database to DESTINATION while the node serves
    /// it: one consistent snapshot, compacted, synced to disk before it
    /// takes its name. Back up a PostgreSQL database with pg_dump.
    Backup(BackupArgs),
    /// Measure this machine: enqueue, processing, pickup latency, claim
    /// scaling and server memory, against a server it starts (or --url).
    Bench(BenchArgs),
    /// Started by `offload work` beside each command where there is no
    /// shell to do it: kills the command's process group when the worker
    /// dies (`work::Guard`).
    #[command(name = "work-guard", hide = true)]
    WorkGuard,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Database for the server it starts: sqlite://PATH or postgres://…
    /// [default: SQLite in a temporary directory]
    #[arg(long)]
    pub db: Option<String>,
    /// Tasks per throughput phase.
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// Tasks stored for the claim-scaling and memory phase.
    #[arg(long = "stored", default_value_t = 1_000_000)]
    pub stored: usize,
    /// durable or relaxed, for the server it starts.
    #[arg(long, default_value = "durable")]
    pub durability: String,
    /// What the batch phase's requests ask back: tasks (the default answer)
    /// or ids (`Prefer: return=minimal`).
    #[arg(long, default_value = "tasks")]
    pub batch_answer: String,
    /// Pad the throughput phases' payloads to this many bytes of JSON
    /// [default: a 49-byte payload]
    #[arg(long)]
    pub payload_bytes: Option<usize>,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The file to write; it must not exist yet.
    pub destination: PathBuf,
    /// The node's database: sqlite://PATH [env: OFFLOAD_DB] [default: sqlite://offload.db]
    #[arg(long, env = "OFFLOAD_DB", hide_env = true)]
    pub db: Option<String>,
    /// The node's TOML file, for its `db` [env: OFFLOAD_CONFIG]
    #[arg(long, env = "OFFLOAD_CONFIG", hide_env = true)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on [env: OFFLOAD_LISTEN] [default: 127.0.0.1:6490]
    #[arg(long, env = "OFFLOAD_LISTEN", hide_env = true)]
    pub listen: Option<String>,
    /// Database: sqlite://PATH or postgres://USER@HOST/DB[?schema=NAME]
    /// [env: OFFLOAD_DB] [default: sqlite://offload.db]
    #[arg(long, env = "OFFLOAD_DB", hide_env = true)]
    pub db: Option<String>,
    /// durable (fsync before answering) or relaxed [env: OFFLOAD_DURABILITY]
    #[arg(long, env = "OFFLOAD_DURABILITY", hide_env = true)]
    pub durability: Option<String>,
    /// A TOML file with further settings; flags and OFFLOAD_* variables win over it.
    #[arg(long, env = "OFFLOAD_CONFIG", hide_env = true)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// The task's type, e.g. email.send.
    pub task_type: String,
    /// The payload: JSON text, @FILE to read it from a file, or @- from stdin.
    #[arg(long)]
    pub payload: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    /// 1–10, or low, normal, high.
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<String>,
    /// Run no earlier than this many seconds from now.
    #[arg(long, conflicts_with = "at", allow_negative_numbers = true)]
    pub delay: Option<i64>,
    /// Run no earlier than this RFC 3339 time.
    #[arg(long)]
    pub at: Option<String>,
    #[arg(long = "max-attempts", allow_negative_numbers = true)]
    pub max_attempts: Option<i64>,
    /// Seconds an attempt may run.
    #[arg(long, allow_negative_numbers = true)]
    pub timeout: Option<i64>,
    #[arg(long = "unique-key")]
    pub unique_key: Option<String>,
    /// With --unique-key: cancel the active holder instead of returning it.
    #[arg(long, requires = "unique_key")]
    pub replace: bool,
    /// A label key=value; repeat for more.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Run only after this task completes; repeat for more.
    #[arg(long = "after")]
    pub after: Vec<String>,
    #[arg(long)]
    pub owner: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Filter by state; repeat or separate with commas.
    #[arg(long = "state", value_delimiter = ',')]
    pub states: Vec<String>,
    #[arg(long = "type")]
    pub task_type: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    #[arg(long)]
    pub owner: Option<String>,
    /// key=value; repeat for more.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// 1–1000.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// The next_cursor of a previous page.
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(Debug, Args)]
pub struct WorkArgs {
    /// Task types to run; repeat for more.
    #[arg(long = "type", required = true)]
    pub types: Vec<String>,
    /// Queues to serve; repeat for more. Default: all.
    #[arg(long = "queue")]
    pub queues: Vec<String>,
    /// Commands running at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Seconds of lease per claim, renewed while the command runs.
    #[arg(long = "lease", default_value_t = 60)]
    pub lease_secs: u64,
    /// On SIGINT/SIGTERM, seconds running commands may finish in before they
    /// are killed and their tasks handed back.
    #[arg(long = "grace", default_value_t = 30)]
    pub grace_secs: u64,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}
