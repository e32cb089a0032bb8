//! What the commands print: aligned tables for people, JSON for scripts.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use offload_client::Client;
use offload_core::{Counts, QueueInfo, State, Stats, Task, TaskPage};
use serde::Serialize;
use uuid::Uuid;

pub fn print_json(value: &impl Serialize) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// Prints rows under headers, each column as wide as its widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", padded.join("  ").trim_end())
    };
    line(headers.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

fn percent(task: &Task) -> String {
    match task.progress.as_ref().and_then(|p| p.percent) {
        Some(p) => format!("{p:.0}%"),
        None => "-".into(),
    }
}

pub fn task(task: &Task, json: bool) -> Result<()> {
    if json {
        return print_json(task);
    }
    let opt = |t: Option<offload_core::Timestamp>| t.map_or("-".to_owned(), |t| t.to_string());
    let mut rows = vec![
        ("id", task.id.to_string()),
        ("type", task.task_type.clone()),
        ("queue", task.queue.clone()),
        ("state", task.state.to_string()),
        ("priority", task.priority.to_string()),
        (
            "attempt",
            format!("{} of {}", task.attempt, task.max_attempts),
        ),
        ("run_at", task.run_at.to_string()),
        ("created_at", task.created_at.to_string()),
        ("started_at", opt(task.started_at)),
        ("finished_at", opt(task.finished_at)),
    ];
    if let Some(owner) = &task.owner {
        rows.push(("owner", owner.clone()));
    }
    if !task.labels.is_empty() {
        let labels: Vec<String> = task
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        rows.push(("labels", labels.join(" ")));
    }
    if let Some(key) = &task.unique_key {
        rows.push(("unique_key", key.clone()));
    }
    if !task.depends_on.is_empty() {
        let ids: Vec<String> = task.depends_on.iter().map(Uuid::to_string).collect();
        rows.push(("depends_on", ids.join(" ")));
    }
    rows.push(("payload", task.payload.get().to_owned()));
    if let Some(progress) = &task.progress {
        rows.push((
            "progress",
            format!(
                "{} {}",
                percent(task),
                progress.message.as_deref().unwrap_or("")
            ),
        ));
    }
    if let Some(result) = &task.result {
        rows.push(("result", result.get().to_owned()));
    }
    if let Some(error) = &task.error {
        rows.push(("error", format!("{}: {}", error.kind, error.message)));
    }
    if task.cancel_requested {
        rows.push(("cancel_requested", "true".into()));
    }
    if let Some(worker) = &task.worker_id {
        rows.push(("worker_id", worker.clone()));
    }
    if let Some(lease) = task.lease_expires_at {
        rows.push(("lease_expires_at", lease.to_string()));
    }
    const KEY_WIDTH: usize = 17;
    for (key, value) in rows {
        // A message's further lines start under its first.
        let value = printable(&value).replace('\n', &format!("\n{:KEY_WIDTH$}", ""));
        outln!("{key:<KEY_WIDTH$}{value}")?;
    }
    Ok(())
}

/// `text` as it is safe to show on a terminal. Owners, labels and the
/// messages of workers are anyone's text: an escape sequence in one
/// (`ESC [2J`, a title change, a carriage return over the line before)
/// would act on the terminal of the person reading it. Control characters
/// other than newline and tab are shown escaped (`\u{1b}`) instead.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.contains(unsafe_char) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

pub fn task_list(page: &TaskPage, json: bool) -> Result<()> {
    if json {
        return print_json(page);
    }
    let rows: Vec<Vec<String>> = page
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.task_type.clone(),
                t.queue.clone(),
                t.state.to_string(),
                format!("{}/{}", t.attempt, t.max_attempts),
                percent(t),
                t.created_at.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "TYPE", "QUEUE", "STATE", "ATTEMPT", "PROGRESS", "CREATED",
        ],
        &rows,
    )?;
    if let Some(cursor) = &page.next_cursor {
        outln!("more: --cursor {cursor}")?;
    }
    Ok(())
}

pub fn action(task: &Task, what: &str, json: bool) -> Result<()> {
    if json {
        return print_json(task);
    }
    outln!("{what} {} (now {})", task.id, task.state)?;
    Ok(())
}

fn count_cells(counts: &Counts) -> Vec<String> {
    State::ALL
        .iter()
        .map(|s| counts.get(*s).to_string())
        .collect()
}

const COUNT_HEADERS: [&str; 7] = [
    "BLOCKED",
    "SCHEDULED",
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
];

pub fn stats(stats: &Stats, json: bool) -> Result<()> {
    if json {
        return print_json(stats);
    }
    let mut rows = vec![
        [
            vec!["(all)".to_owned(), String::new()],
            count_cells(&stats.total),
        ]
        .concat(),
    ];
    for (name, counts) in &stats.queues {
        rows.push(
            [
                vec![format!("queue {name}"), String::new()],
                count_cells(counts),
            ]
            .concat(),
        );
    }
    for (name, counts) in &stats.types {
        rows.push(
            [
                vec![format!("type {name}"), String::new()],
                count_cells(counts),
            ]
            .concat(),
        );
    }
    let mut headers = vec!["", ""];
    headers.extend(COUNT_HEADERS);
    table(&headers, &rows)?;
    Ok(())
}

pub fn queues(queues: &[QueueInfo], json: bool) -> Result<()> {
    if json {
        return print_json(&offload_api::QueueList {
            queues: queues.to_vec(),
        });
    }
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| {
            let settings = vec![
                q.name.clone(),
                if q.paused { "paused" } else { "active" }.to_owned(),
                q.concurrency.map_or("-".to_owned(), |c| c.to_string()),
            ];
            [settings, count_cells(&q.counts)].concat()
        })
        .collect();
    let mut headers = vec!["QUEUE", "STATUS", "CONCURRENCY"];
    headers.extend(COUNT_HEADERS);
    table(&headers, &rows)?;
    Ok(())
}

pub fn queue(queue: &QueueInfo, json: bool) -> Result<()> {
    if json {
        return print_json(queue);
    }
    let status = if queue.paused { "paused" } else { "active" };
    outln!("queue {} is {status}", queue.name)?;
    Ok(())
}

/// Follows a task to its end with a progress bar; the exit code says how
/// it ended.
pub async fn watch(client: &Client, id: Uuid, json: bool) -> Result<ExitCode> {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(100);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos:>3}% {msg}")?
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    };
    // Followed through a restart of the server, as `Client::wait` is.
    let mut following = client.follow(id);
    let task = loop {
        let task = following.next().await?;
        if json {
            outln!("{}", serde_json::to_string(&task)?)?;
        }
        if let Some(p) = task.progress.as_ref().and_then(|p| p.percent) {
            bar.set_position(p.clamp(0.0, 100.0) as u64);
        }
        let note = task
            .progress
            .as_ref()
            .and_then(|p| p.message.as_deref())
            .unwrap_or_default();
        // One line under the bar: a newline would break its redraw.
        let note = printable(note).replace(['\n', '\t'], " ");
        bar.set_message(format!("{} {note}", task.state));
        if task.state.is_finished() {
            break task;
        }
    };
    if task.state == State::Completed {
        bar.set_position(100);
    }
    bar.finish();
    if !json {
        match (&task.state, &task.error) {
            (State::Completed, _) => outln!("completed {}", task.id),
            (state, Some(error)) => {
                outln!("{state} {}: {}", task.id, printable(&error.message))
            }
            (state, None) => outln!("{state} {}", task.id),
        }?;
    }
    Ok(ExitCode::from(match task.state {
        State::Completed => 0,
        State::Failed => 1,
        _ => 2,
    }))
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escape_sequences_are_shown_not_acted_on() {
        assert_eq!(printable("plain text"), "plain text");
        assert_eq!(printable("a\nb\tc"), "a\nb\tc");
        assert_eq!(
            printable("boom\u{1b}[2J\rX\u{7}"),
            "boom\\u{1b}[2J\\rX\\u{7}"
        );
    }
}
