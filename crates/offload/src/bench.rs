//! `offload bench`: what this machine does with Offload, like `pgbench` or
//! `redis-benchmark`. It starts its own server as a child process on a free
//! port (so the server's memory is its own), or measures `--url`, and runs:
//!
//! - `enqueue_single_per_sec`: one client, one task per request, in turn;
//! - `enqueue_batch_per_sec`: batches of 1,000 over HTTP;
//! - `process_http_per_sec`: remote Rust workers burning down the tasks the
//!   two phases above left (batched fetch and ack);
//! - `process_embedded_per_sec`: the same with the in-process worker, no HTTP;
//! - `pickup_ms`: an idle server, tasks one after another, from the enqueue
//!   request leaving the client to the handler starting;
//! - `claim_scaling`: processing rate with `--stored` tasks stored divided by
//!   the rate with 10,000 stored, each the median of several rounds. The
//!   stored tasks fill a second server of their own, and the two servers'
//!   rounds take turns, so that the machine drifting between the halves (a
//!   busy neighbour, a slower minute) moves both alike. Against `--url`
//!   there is one server: its small half runs before the fill, the large
//!   one after, and then the run's workers run the tasks it left there;
//! - `server_rss_mb`: the peak resident memory of the servers it started
//!   (the larger: the one holding `--stored` tasks, as a rule).
//!
//! Tasks are no-ops with a small JSON payload; `--payload-bytes` pads the
//! payload of the first four phases' tasks, to see what an application's
//! larger payloads cost (pickup, scaling and memory keep the small one, so
//! that their figures stay comparable). Nothing here asserts a speed: it
//! measures.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use offload_client::Client;
use offload_core::{Limits, NewTask, Store};
use offload_engine::{Engine, EngineConfig};
use offload_worker::{TaskContext, Worker};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::cli::BenchArgs;
use crate::usage;

const TASK_TYPE: &str = "bench.noop";
const BATCH: usize = 1000;
/// Tasks processed for each half of the claim-scaling ratio.
const SCALING_SAMPLE: usize = 10_000;
/// Each half of the claim-scaling ratio is the median of this many rounds:
/// one round lasts about a tenth of a second, where a noisy machine's
/// hiccup would otherwise decide the ratio (with three rounds, the same
/// binary measured 0.73 to 1.19 on one machine in a day; with seven, taken
/// before and after the fill, 0.68 to 1.13).
const SCALING_ROUNDS: usize = 11;
/// Remote workers and the concurrency of each.
const HTTP_WORKERS: usize = 4;
const HTTP_CONCURRENCY: usize = 500;
const EMBEDDED_CONCURRENCY: usize = 512;
const PICKUP_SAMPLES: usize = 1000;
/// How long the tasks left on a `--url` server may go without one of them
/// ending before the run gives up on them.
const LEFT_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
struct Pickup {
    p50: f64,
    p99: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    backend: String,
    tasks: usize,
    durability: String,
    cores: usize,
    enqueue_single_per_sec: f64,
    enqueue_batch_per_sec: f64,
    process_http_per_sec: f64,
    process_embedded_per_sec: Option<f64>,
    pickup_ms: Pickup,
    claim_scaling: f64,
    server_rss_mb: Option<f64>,
}

/// The default payload of the run's tasks, as a web application's e-mail
/// task might carry.
fn small_payload() -> serde_json::Value {
    serde_json::json!({"user_id": 42, "template": "welcome", "locale": "en"})
}

fn task() -> NewTask {
    NewTask::new(TASK_TYPE)
        .payload(&small_payload())
        .expect("a JSON payload")
}

/// The throughput phases' task: the default payload, or with
/// `--payload-bytes` that payload padded to exactly that many bytes of
/// JSON. The padding is pseudo-random letters and digits, not one letter
/// repeated, so that a store that compresses what it keeps (PostgreSQL's
/// TOAST) is measured on a payload it cannot shrink.
fn throughput_task(payload_bytes: Option<usize>) -> Result<NewTask> {
    let Some(bytes) = payload_bytes else {
        return Ok(task());
    };
    let mut payload = small_payload();
    payload["pad"] = serde_json::Value::String(String::new());
    let unpadded = serde_json::to_string(&payload)?.len();
    if bytes < unpadded {
        return Err(usage(format!(
            "--payload-bytes: must be at least {unpadded} (the payload without padding); got {bytes}"
        )));
    }
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let pad: String = (0..bytes - unpadded)
        .map(|_| {
            // xorshift64: cheap, and the same padding in every run.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(ALPHABET[(state >> 58) as usize])
        })
        .collect();
    payload["pad"] = serde_json::Value::String(pad);
    Ok(NewTask::new(TASK_TYPE).payload(&payload)?)
}

/// The server under test: a child process this run started, or one given.
struct Target {
    url: String,
    client: Client,
    child: Option<tokio::process::Child>,
    backend: String,
    durability: String,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    fn rss_peak_mb(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }
}

fn backend_of(db: &str) -> &'static str {
    if db.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    }
}

/// The PostgreSQL schemas a run made in the user's database. Their tasks
/// are of no use after the run and every run makes new ones (one holds the
/// `--stored` tasks), so all are dropped at its end, whether it finished,
/// failed or was interrupted.
#[derive(Default)]
struct MadeSchemas(std::sync::Mutex<Vec<String>>);

impl MadeSchemas {
    /// A PostgreSQL URL with a schema of this run's own.
    fn fresh(&self, db: &str, label: &str) -> String {
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let schema = format!("bench_{label}_{}", &unique[unique.len() - 10..]);
        let joiner = if db.contains('?') { '&' } else { '?' };
        let url = format!("{db}{joiner}schema={schema}");
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(url.clone());
        url
    }

    /// Once nothing uses them: a server still holding a lock (one killed a
    /// moment ago) is waited for, up to `drop_schema`'s lock timeout.
    async fn drop_all(&self) {
        let made = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for url in made {
            if let Err(e) = offload_server::drop_postgres_schema(&url).await {
                eprintln!("offload bench: could not drop the schema of {url}: {e}");
            }
        }
    }
}

/// Which of a run's servers to start.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// The one every phase measures, on `--db`.
    Main,
    /// The one the claim-scaling phase fills with `--stored` tasks: a
    /// database of its own beside `--db` (a schema of its own on
    /// PostgreSQL, a file in a directory beside a SQLite `--db`).
    ManyStored,
}

async fn start_server(args: &BenchArgs, role: Role, made: &MadeSchemas) -> Result<Target> {
    let sqlite_beside = match &args.db {
        Some(db) if backend_of(db) == "sqlite" && role == Role::ManyStored => {
            let path = std::path::Path::new(db.strip_prefix("sqlite://").unwrap_or(db));
            path.parent()
                .filter(|parent| !parent.as_os_str().is_empty())
                .map(std::path::Path::to_path_buf)
        }
        _ => None,
    };
    let dir = match sqlite_beside {
        Some(parent) => tempfile::Builder::new()
            .prefix(".offload-bench-")
            .tempdir_in(&parent)
            .with_context(|| format!("a temporary directory in {}", parent.display()))?,
        None => tempfile::tempdir().context("a temporary directory")?,
    };
    let label = match role {
        Role::Main => "http",
        Role::ManyStored => "stored",
    };
    let db = match &args.db {
        Some(db) if backend_of(db) == "postgres" => made.fresh(db, label),
        Some(db) if role == Role::Main => db.clone(),
        _ => format!(
            "sqlite://{}",
            dir.path().join(format!("{label}.db")).display()
        ),
    };
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--durability",
            &args.durability,
        ])
        // Not a flag: a password in the URL would show in every `ps`.
        .env("OFFLOAD_DB", &db)
        .env("OFFLOAD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the server")?;
    let stdout = child.stdout.take().context("the server's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("the server did not start in a minute")??
        .context("the server exited before listening")?;
    let url = first
        .strip_prefix("offload listening on ")
        .with_context(|| format!("unexpected first line from the server: {first}"))?
        .to_owned();
    Ok(Target {
        client: Client::new(url.clone()),
        url,
        child: Some(child),
        backend: backend_of(&db).into(),
        durability: args.durability.clone(),
        _dir: Some(dir),
    })
}

fn bar(len: usize, phase: &str, quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len as u64)
    };
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>26} {bar:30} {pos}/{len} {per_sec} {msg}")
    {
        bar.set_style(style);
    }
    bar.set_prefix(phase.to_owned());
    bar
}

pub async fn run(args: BenchArgs, url: Option<String>, json: bool) -> Result<ExitCode> {
    if args.tasks == 0 {
        return Err(usage("--tasks: must be at least 1"));
    }
    if !matches!(args.durability.as_str(), "durable" | "relaxed") {
        return Err(usage("--durability: must be durable or relaxed"));
    }
    let batch_answer = match args.batch_answer.as_str() {
        "tasks" => BatchAnswer::Tasks,
        "ids" => BatchAnswer::Ids,
        _ => return Err(usage("--batch-answer: must be tasks or ids")),
    };
    let task = throughput_task(args.payload_bytes)?;
    let made = MadeSchemas::default();
    // Interrupted (Ctrl-C, or SIGTERM, which would otherwise end this
    // process and leave its servers running) or failed, the servers this
    // run started are killed as their handles drop, before the schemas
    // they used are dropped.
    let measured = tokio::select! {
        measured = measure(&args, url, &task, batch_answer, json, &made) => measured,
        () = crate::commands::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    made.drop_all().await;
    let (report, scaling) = measured?;
    if json {
        outln!("{}", serde_json::to_string(&report)?)?;
    } else {
        print_report(&report, &scaling)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure(
    args: &BenchArgs,
    url: Option<String>,
    task: &NewTask,
    batch_answer: BatchAnswer,
    quiet: bool,
    made: &MadeSchemas,
) -> Result<(Report, Scaling)> {
    let mut target = match url {
        Some(url) => {
            let client = Client::new(url.clone());
            let health = client.health().await?;
            Target {
                url,
                client,
                child: None,
                backend: "remote".into(),
                durability: health.durability,
                _dir: None,
            }
        }
        None => start_server(args, Role::Main, made).await?,
    };
    let n = args.tasks;
    let client = target.client.clone();

    let enqueue_single_per_sec = enqueue_single(&target.url, task, n, quiet).await?;
    let enqueue_batch_per_sec = enqueue_batch(&client, task, n, batch_answer, quiet).await?;
    let process_http_per_sec = process_http(&client, 2 * n, quiet, "process over HTTP").await?;
    let process_embedded_per_sec = match &target.child {
        Some(_) => Some(process_embedded(args, task, n, quiet, made).await?),
        None => None,
    };
    let pickup_ms = pickup(&client, n.min(PICKUP_SAMPLES), quiet).await?;
    let stored = args.stored.max(SCALING_SAMPLE);
    let mut many_stored = match &target.child {
        Some(_) => Some(start_server(args, Role::ManyStored, made).await?),
        None => None,
    };
    let scaling = claim_scaling(
        &client,
        many_stored.as_ref().map(|t| &t.client),
        stored,
        quiet,
    )
    .await?;
    if target.child.is_none() {
        run_what_is_left(&client, quiet).await?;
    }
    let server_rss_mb = [Some(&target), many_stored.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(Target::rss_peak_mb)
        .reduce(f64::max);
    for server in [Some(&mut target), many_stored.as_mut()]
        .into_iter()
        .flatten()
    {
        if let Some(child) = server.child.as_mut() {
            let _ = child.kill().await;
        }
    }
    let report = Report {
        backend: target.backend.clone(),
        tasks: n,
        durability: target.durability.clone(),
        cores: std::thread::available_parallelism().map_or(1, |c| c.get()),
        enqueue_single_per_sec,
        enqueue_batch_per_sec,
        process_http_per_sec,
        process_embedded_per_sec,
        pickup_ms,
        claim_scaling: scaling.large / scaling.small,
        server_rss_mb,
    };
    Ok((report, scaling))
}

fn print_report(r: &Report, scaling: &Scaling) -> std::io::Result<()> {
    outln!()?;
    outln!(
        "backend {} ({}), {} cores, {} tasks per phase",
        r.backend,
        r.durability,
        r.cores,
        r.tasks
    )?;
    outln!(
        "  enqueue, one per request    {:>12.0} tasks/s",
        r.enqueue_single_per_sec
    )?;
    outln!(
        "  enqueue, batches of 1000    {:>12.0} tasks/s",
        r.enqueue_batch_per_sec
    )?;
    outln!(
        "  process over HTTP           {:>12.0} tasks/s",
        r.process_http_per_sec
    )?;
    match r.process_embedded_per_sec {
        Some(rate) => outln!("  process in process          {rate:>12.0} tasks/s"),
        None => outln!("  process in process                   n/a (remote server)"),
    }?;
    outln!(
        "  pickup p50 / p99            {:>8.2} / {:.2} ms",
        r.pickup_ms.p50,
        r.pickup_ms.p99
    )?;
    outln!(
        "  claim scaling ({} stored vs {SCALING_SAMPLE}) {:.2} ({:.0} / {:.0} tasks/s)",
        scaling.stored,
        r.claim_scaling,
        scaling.large,
        scaling.small
    )?;
    match r.server_rss_mb {
        Some(mb) => outln!("  server peak memory          {mb:>12.1} MB"),
        None => outln!("  server peak memory                   n/a (remote server)"),
    }
}

/// Claim and completion rate with `stored` tasks stored over the rate with
/// [`SCALING_SAMPLE`] stored. With a server of its own for the stored tasks
/// (`many`), the rounds of the two take turns; otherwise the one server
/// runs the small half, is filled, and runs the large half.
async fn claim_scaling(
    small: &Client,
    many: Option<&Client>,
    stored: usize,
    quiet: bool,
) -> Result<Scaling> {
    // Each round consumes its sample and a little more (tasks fetched before
    // the workers stop still run): the rounds must never run dry.
    let to_store = stored + 2 * SCALING_SAMPLE * SCALING_ROUNDS;
    let fill = |client: Client| async move {
        let progress = bar(to_store, "store for scaling", quiet);
        enqueue_counted(&client, &task(), to_store, BatchAnswer::Ids, &progress).await?;
        progress.finish();
        anyhow::Ok(())
    };
    const LARGE_ROUND: &str = "claim, many stored";
    let small_round = || async {
        enqueue_quietly(small, SCALING_SAMPLE).await?;
        process_http(small, SCALING_SAMPLE, quiet, "claim, 10,000 stored").await
    };
    let mut rates_small = Vec::with_capacity(SCALING_ROUNDS);
    let mut rates_large = Vec::with_capacity(SCALING_ROUNDS);
    match many {
        Some(many) => {
            fill(many.clone()).await?;
            for _ in 0..SCALING_ROUNDS {
                rates_small.push(small_round().await?);
                rates_large.push(process_http(many, SCALING_SAMPLE, quiet, LARGE_ROUND).await?);
            }
        }
        None => {
            for _ in 0..SCALING_ROUNDS {
                rates_small.push(small_round().await?);
            }
            fill(small.clone()).await?;
            for _ in 0..SCALING_ROUNDS {
                rates_large.push(process_http(small, SCALING_SAMPLE, quiet, LARGE_ROUND).await?);
            }
        }
    }
    Ok(Scaling {
        stored,
        small: median(rates_small),
        large: median(rates_large),
    })
}

/// The two halves of the claim-scaling ratio, tasks a second.
struct Scaling {
    /// Tasks stored for the large half.
    stored: usize,
    small: f64,
    large: f64,
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// One client sending one task per request, each after the last, on a
/// thread of its own with a single-threaded runtime and a connection of its
/// own: how a sequential client runs. On this command's multi-threaded
/// runtime each request hopped between threads: 5–14% fewer requests a
/// second against the same server (bench/HISTORY.md).
async fn enqueue_single(url: &str, task: &NewTask, n: usize, quiet: bool) -> Result<f64> {
    let progress = bar(n, "enqueue, one per request", quiet);
    let url = url.to_owned();
    let task = task.clone();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for the single-enqueue client")?;
        runtime.block_on(async {
            let client = Client::new(url);
            // Connected before the clock starts.
            client.health().await?;
            let started = Instant::now();
            for _ in 0..n {
                client.enqueue(&task).await?;
                progress.inc(1);
            }
            progress.finish();
            Ok(n as f64 / started.elapsed().as_secs_f64())
        })
    })
    .await
    .context("the single-enqueue client's thread")?
}

/// What a batch enqueue asks to be answered with.
#[derive(Clone, Copy)]
enum BatchAnswer {
    /// The tasks, SPEC §4's answer.
    Tasks,
    /// Their ids alone (`Prefer: return=minimal`).
    Ids,
}

async fn enqueue_counted(
    client: &Client,
    task: &NewTask,
    n: usize,
    answer: BatchAnswer,
    progress: &ProgressBar,
) -> Result<f64> {
    let batch = vec![task.clone(); BATCH];
    let started = Instant::now();
    let mut left = n;
    while left > 0 {
        let size = left.min(BATCH);
        match answer {
            BatchAnswer::Tasks => drop(client.enqueue_batch(&batch[..size]).await?),
            BatchAnswer::Ids => drop(client.enqueue_batch_ids(&batch[..size]).await?),
        }
        left -= size;
        progress.inc(size as u64);
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn enqueue_batch(
    client: &Client,
    task: &NewTask,
    n: usize,
    answer: BatchAnswer,
    quiet: bool,
) -> Result<f64> {
    let progress = bar(n, "enqueue, batches of 1000", quiet);
    let rate = enqueue_counted(client, task, n, answer, &progress).await?;
    progress.finish();
    Ok(rate)
}

/// Fills the store for a later phase; the tasks are not needed back.
async fn enqueue_quietly(client: &Client, n: usize) -> Result<()> {
    enqueue_counted(client, &task(), n, BatchAnswer::Ids, &ProgressBar::hidden())
        .await
        .map(drop)
}

/// Runs `workers` until `target` handlers have run; the rate is measured
/// from start to the last handler.
async fn burn(
    workers: Vec<Worker>,
    target: usize,
    count: Arc<AtomicUsize>,
    progress: &ProgressBar,
) -> Result<f64> {
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(w.run(stop.clone())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let done = count.load(Ordering::Relaxed);
        progress.set_position(done as u64);
        if done >= target {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {target} tasks ran within an hour");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    for r in running {
        r.await??;
    }
    progress.finish();
    Ok(target as f64 / elapsed.as_secs_f64())
}

fn counting_handler(
    count: &Arc<AtomicUsize>,
) -> impl Fn(TaskContext) -> std::future::Ready<Result<(), offload_worker::TaskFailure>>
+ Send
+ Sync
+ 'static {
    let count = Arc::clone(count);
    move |_ctx: TaskContext| {
        count.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(()))
    }
}

/// The remote workers of the processing phases, each handler run counted.
fn http_workers(client: &Client, count: &Arc<AtomicUsize>) -> Vec<Worker> {
    (0..HTTP_WORKERS)
        .map(|i| {
            Worker::new(Arc::new(client.clone()))
                .worker_id(format!("bench-http-{i}-{}", std::process::id()))
                .concurrency(HTTP_CONCURRENCY)
                .handle(TASK_TYPE, counting_handler(count))
        })
        .collect()
}

async fn process_http(client: &Client, n: usize, quiet: bool, phase: &str) -> Result<f64> {
    let progress = bar(n, phase, quiet);
    let count = Arc::new(AtomicUsize::new(0));
    burn(http_workers(client, &count), n, count, &progress).await
}

/// The run's tasks still to do on a server it did not start: the stored
/// ones and those the rounds left.
async fn bench_tasks_left(client: &Client) -> Result<u64> {
    let stats = client.stats().await?;
    Ok(stats
        .types
        .get(TASK_TYPE)
        .map_or(0, |c| c.scheduled + c.pending + c.running))
}

/// Against `--url`, runs the tasks the run left (over a million with the
/// default `--stored`), so that none waits there for a worker of the
/// server's own; finished, they go with the server's retention.
async fn run_what_is_left(client: &Client, quiet: bool) -> Result<()> {
    let mut left = bench_tasks_left(client).await?;
    if left == 0 {
        return Ok(());
    }
    let progress = bar(
        usize::try_from(left).unwrap_or(usize::MAX),
        "run the tasks left",
        quiet,
    );
    let count = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let running: Vec<_> = http_workers(client, &count)
        .into_iter()
        .map(|w| tokio::spawn(w.run(stop.clone())))
        .collect();
    let mut last_progress = Instant::now();
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = match bench_tasks_left(client).await {
            Ok(now) => now,
            Err(e) => break Err(e),
        };
        progress.set_position(count.load(Ordering::Relaxed) as u64);
        if now == 0 {
            break Ok(());
        }
        if now < left {
            left = now;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > LEFT_PATIENCE {
            break Err(anyhow::anyhow!(
                "{now} {TASK_TYPE} tasks are still on the server after {}s without one ending (another client holding them?)",
                LEFT_PATIENCE.as_secs()
            ));
        }
    };
    stop.cancel();
    for r in running {
        r.await??;
    }
    progress.finish();
    outcome
}

/// The in-process phase's store.
async fn open_embedded(
    args: &BenchArgs,
    dir: &std::path::Path,
    made: &MadeSchemas,
) -> Result<Arc<dyn Store>> {
    match &args.db {
        Some(db) if backend_of(db) == "postgres" => {
            let url = made.fresh(db, "embedded");
            let config = offload_server::Config {
                db: url.clone(),
                durability: args.durability.clone(),
                ..offload_server::Config::default()
            };
            Ok(offload_server::open_store(&url, &config).await?)
        }
        _ => {
            let durability = if args.durability == "relaxed" {
                offload_sqlite::Durability::Relaxed
            } else {
                offload_sqlite::Durability::Durable
            };
            let options = offload_sqlite::SqliteOptions {
                durability,
                ..offload_sqlite::SqliteOptions::default()
            };
            let store = offload_sqlite::SqliteStore::open(dir.join("embedded.db"), options)?;
            Ok(Arc::new(store))
        }
    }
}

async fn process_embedded(
    args: &BenchArgs,
    task: &NewTask,
    n: usize,
    quiet: bool,
    made: &MadeSchemas,
) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let store = open_embedded(args, dir.path(), made).await?;
    let spec = task
        .clone()
        .validate(&Limits::default(), offload_core::Position::Alone)?;
    let mut left = n;
    while left > 0 {
        let size = left.min(BATCH);
        store.enqueue(vec![spec.clone(); size]).await?;
        left -= size;
    }
    let engine = Engine::start(Arc::clone(&store), EngineConfig::default());
    let progress = bar(n, "process in process", quiet);
    let count = Arc::new(AtomicUsize::new(0));
    let worker = Worker::new(Arc::clone(&engine))
        .worker_id(format!("bench-embedded-{}", std::process::id()))
        .concurrency(EMBEDDED_CONCURRENCY)
        .handle(TASK_TYPE, counting_handler(&count));
    let rate = burn(vec![worker], n, count, &progress).await?;
    engine.shutdown().await;
    drop((engine, store));
    Ok(rate)
}

/// An idle server, a waiting worker, and tasks one after another: from just
/// before each enqueue request to its handler starting.
async fn pickup(client: &Client, samples: usize, quiet: bool) -> Result<Pickup> {
    let progress = bar(samples, "pickup latency", quiet);
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let worker = Worker::new(Arc::new(client.clone()))
        .worker_id(format!("bench-pickup-{}", std::process::id()))
        .concurrency(4)
        .handle("bench.pickup", move |_ctx: TaskContext| {
            let _ = started_tx.send(Instant::now());
            std::future::ready(Ok::<(), offload_worker::TaskFailure>(()))
        });
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    // Let the worker's first long poll reach the server.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let task = NewTask::new("bench.pickup").payload(&serde_json::json!({"n": 1}))?;
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let sent = Instant::now();
        client.enqueue(&task).await?;
        let began = tokio::time::timeout(Duration::from_secs(30), started_rx.recv())
            .await
            .context("a task was not picked up within 30 s")?
            .context("the pickup worker stopped")?;
        latencies.push(began.duration_since(sent).as_secs_f64() * 1000.0);
        progress.inc(1);
        // Let the worker settle back into its wait, as on an idle server.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.cancel();
    running.await??;
    progress.finish();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    Ok(Pickup {
        p50: at(0.50),
        p99: at(0.99),
    })
}
