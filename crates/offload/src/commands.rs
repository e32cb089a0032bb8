//! One function per command.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use offload_client::{Client, ListParams};
use offload_core::{Limits, NewTask, OnConflict, PriorityInput, State};
use offload_server::Config;
use uuid::Uuid;

use crate::cli::{BackupArgs, Cli, Command, EnqueueArgs, ListArgs, ServeArgs};
use crate::{output, usage, work};

pub const DEFAULT_URL: &str = "http://127.0.0.1:6490";

pub async fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(url) = &cli.url {
        check_server_url(url)?;
    }
    let mut client = Client::new(cli.url.as_deref().unwrap_or(DEFAULT_URL));
    if let Some(token) = &cli.token {
        client = client.token(token);
    }
    let json = cli.json;
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Enqueue(args) => {
            let task = new_task(args)?;
            let (task, _created) = client.enqueue(&task).await?;
            if json {
                output::print_json(&task)?;
            } else {
                outln!("{}", task.id)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { id } => {
            let task = client.get(parse_id(&id)?).await?;
            output::task(&task, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::List(args) => {
            let wanted = args.limit;
            let mut params = list_params(args)?;
            let mut page = client.list(&params).await?;
            // The server cuts a page of large tasks short (8 MiB of
            // payloads and results); --limit is how many the user asked to
            // see, so the pages that follow make up the rest.
            while page.tasks.len() < wanted
                && let Some(cursor) = page.next_cursor.take()
            {
                params.limit = Some(wanted - page.tasks.len());
                params.cursor = Some(cursor);
                let next = client.list(&params).await?;
                page.tasks.extend(next.tasks);
                page.next_cursor = next.next_cursor;
            }
            output::task_list(&page, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { id } => {
            let task = client.cancel(parse_id(&id)?).await?;
            output::action(
                &task,
                if task.state == State::Cancelled {
                    "cancelled"
                } else {
                    "cancellation requested"
                },
                json,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { id } => {
            let task = client.retry(parse_id(&id)?).await?;
            output::action(&task, "retried", json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete { id } => {
            let id = parse_id(&id)?;
            client.delete(id).await?;
            if json {
                output::print_json(&serde_json::json!({ "deleted": 1 }))?;
            } else {
                outln!("deleted {id}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Clear { states, older_than } => {
            let states = parse_states(&states)?;
            let deleted = client
                .clear(&states, older_than.map(Duration::from_secs))
                .await?;
            if json {
                output::print_json(&offload_api::Deleted { deleted })?;
            } else {
                outln!("deleted {deleted} tasks")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats => {
            output::stats(&client.stats().await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Queues => {
            output::queues(&client.queues().await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { queue } => {
            output::queue(&client.pause(&queue).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { queue } => {
            output::queue(&client.resume(&queue).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { id } => output::watch(&client, parse_id(&id)?, json).await,
        Command::Work(args) => work::run(client, args).await,
        Command::Backup(args) => backup(args, json).await,
        Command::Bench(args) => crate::bench::run(args, cli.url, json).await,
        // `main` runs it before there is a runtime; it never comes here.
        Command::WorkGuard => Ok(work::guard()),
    }
}

/// The node's settings from its `--config` file, or the defaults.
fn node_config(path: Option<&std::path::Path>) -> Result<Config> {
    match path {
        // A file that cannot be read or parsed is a bad setting, as a bad
        // flag is.
        Some(path) => Config::from_toml_file(&path.to_string_lossy())
            .map_err(|e| usage(format!("--config: {:#}", anyhow::Error::from(e)))),
        None => Ok(Config::default()),
    }
}

async fn backup(args: BackupArgs, json: bool) -> Result<ExitCode> {
    let mut config = node_config(args.config.as_deref())?;
    if let Some(db) = args.db {
        config.db = db;
    }
    config.validate().map_err(|e| usage(e.to_string()))?;
    let source = match offload_server::sqlite_path(&config.db) {
        Ok(Some(path)) => std::path::PathBuf::from(path),
        Ok(None) => {
            return Err(usage(
                "--db: offload backup copies a SQLite database; back up a PostgreSQL one \
                 with pg_dump (a node's schema alone: pg_dump --schema=NAME)",
            ));
        }
        Err(e) => return Err(usage(e.to_string())),
    };
    let destination = args.destination;
    let started = std::time::Instant::now();
    let (source, destination, report) = tokio::task::spawn_blocking(move || {
        let report = offload_sqlite::backup(&source, &destination);
        (source, destination, report)
    })
    .await?;
    let report = report.map_err(|e| match e {
        offload_sqlite::BackupError::NoSource(_)
        | offload_sqlite::BackupError::NotOffload(_)
        | offload_sqlite::BackupError::DestinationExists(_) => usage(e.to_string()),
        _ => e.into(),
    })?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        output::print_json(&serde_json::json!({
            "source": source,
            "destination": destination,
            "tasks": report.tasks,
            "bytes": report.bytes,
            "schema_version": report.schema_version,
            "seconds": seconds,
        }))?;
    } else {
        outln!(
            "backed up {} to {}: {} task{}, {:.1} MB, in {seconds:.2} s",
            source.display(),
            destination.display(),
            report.tasks,
            if report.tasks == 1 { "" } else { "s" },
            report.bytes as f64 / 1e6,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let mut config = node_config(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen.parse().map_err(|e| {
            usage(format!(
                "--listen: {listen:?} is not an address like 127.0.0.1:6490 ({e})"
            ))
        })?;
    }
    if let Some(db) = args.db {
        config.db = db;
    }
    if let Some(durability) = args.durability {
        config.durability = durability;
    }
    config.validate().map_err(|e| usage(e.to_string()))?;
    offload_server::serve(config, shutdown_signal(), |address| {
        // On stdout, for people and for scripts that started it on port 0.
        // A closed stdout is no reason not to serve.
        let _ = outln!("offload listening on http://{address}");
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

pub fn parse_id(raw: &str) -> Result<Uuid> {
    Uuid::parse_str(raw).map_err(|_| usage(format!("{raw:?} is not a task id")))
}

fn parse_states(raw: &[String]) -> Result<Vec<State>> {
    raw.iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<State>()
                .map_err(|e| usage(format!("--state: {e}")))
        })
        .collect()
}

fn key_values(flag: &str, raw: &[String]) -> Result<Vec<(String, String)>> {
    raw.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| usage(format!("{flag}: expected key=value; got {kv:?}")))
        })
        .collect()
}

/// Checked before any request: a URL without its scheme (`127.0.0.1:6490`)
/// is the usual slip, and the HTTP stack would word it as "relative URL
/// without a base", exit 3, as if the server were down.
fn check_server_url(url: &str) -> Result<()> {
    let host_and_path = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match host_and_path {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
        _ => Err(usage(format!(
            "--url: must be http:// or https:// and a host, as in {DEFAULT_URL}; got {url:?}"
        ))),
    }
}

fn new_task(args: EnqueueArgs) -> Result<NewTask> {
    let payload = match args.payload {
        None => None,
        Some(text) => {
            let text = match text.strip_prefix('@') {
                // As curl reads `@-`: the payload of a pipeline.
                Some("-") => std::io::read_to_string(std::io::stdin())
                    .map_err(|e| usage(format!("--payload: cannot read stdin: {e}")))?,
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| usage(format!("--payload: cannot read {path}: {e}")))?,
                None => text,
            };
            let raw = serde_json::value::RawValue::from_string(text.trim().to_owned())
                .map_err(|e| usage(format!("--payload: not valid JSON ({e})")))?;
            Some(raw)
        }
    };
    let priority = args.priority.map(|p| match p.parse::<i64>() {
        Ok(n) => PriorityInput::Number(n),
        Err(_) => PriorityInput::Name(p),
    });
    let labels = key_values("--label", &args.labels)?;
    let task = NewTask {
        task_type: args.task_type,
        payload,
        queue: args.queue,
        priority,
        run_at: args.at,
        delay_secs: args.delay,
        max_attempts: args.max_attempts,
        timeout_secs: args.timeout,
        on_conflict: args.unique_key.as_ref().map(|_| {
            if args.replace {
                OnConflict::Replace
            } else {
                OnConflict::Keep
            }
        }),
        unique_key: args.unique_key,
        labels: (!labels.is_empty()).then(|| labels.into_iter().collect::<BTreeMap<_, _>>()),
        depends_on: (!args.after.is_empty()).then_some(args.after),
        owner: args.owner,
    };
    // Check here what can be checked here, so a mistake is a usage error;
    // the payload size limit is the server's to enforce.
    let lenient = Limits {
        max_payload_bytes: usize::MAX,
        ..Limits::default()
    };
    task.clone()
        .validate(&lenient, offload_core::Position::Alone)
        .map_err(|e| match e {
            offload_core::Error::InvalidArgument { field, rule } => {
                usage(format!("{}: {rule}", enqueue_argument(&field)))
            }
            other => usage(other.to_string()),
        })?;
    Ok(task)
}

/// The argument of `offload enqueue` that sets an enqueue request's
/// field, so that a mistake is named as it was typed: `--at`, not
/// `run_at`.
fn enqueue_argument(field: &str) -> &str {
    let name = field.split(['[', '.']).next().unwrap_or(field);
    match name {
        "type" => "TYPE",
        "payload" => "--payload",
        "queue" => "--queue",
        "priority" => "--priority",
        "run_at" => "--at",
        "delay_secs" => "--delay",
        "max_attempts" => "--max-attempts",
        "timeout_secs" => "--timeout",
        "unique_key" => "--unique-key",
        "on_conflict" => "--replace",
        "labels" => "--label",
        "depends_on" => "--after",
        "owner" => "--owner",
        _ => field,
    }
}

fn list_params(args: ListArgs) -> Result<ListParams> {
    if !(1..=1000).contains(&args.limit) {
        return Err(usage(format!(
            "--limit: must be 1 to 1000; got {}",
            args.limit
        )));
    }
    Ok(ListParams {
        states: parse_states(&args.states)?,
        task_type: args.task_type,
        queue: args.queue,
        owner: args.owner,
        labels: key_values("--label", &args.labels)?,
        limit: Some(args.limit),
        cursor: args.cursor,
        ..ListParams::default()
    })
}
