//! `offload work -- COMMAND`: the worker runtime over HTTP, with a handler
//! that runs COMMAND once per task (SPEC §5):
//!
//! - the payload JSON goes to its stdin; `OFFLOAD_TASK_ID` and
//!   `OFFLOAD_ATTEMPT` are in its environment;
//! - stdout lines `progress: PERCENT [MESSAGE]` report progress, one report
//!   at a time, the latest line when they come faster than the server
//!   answers ([`read_stdout`]);
//! - exit 0 completes the task, with the last stdout line as the result if
//!   it is JSON (a last line over 64 MiB fails the task instead); any other
//!   exit fails the attempt with stderr's tail;
//! - the command's exit ends its task even while a process it left running
//!   holds its pipes open: what they hold then is read until they go quiet
//!   ([`Exit`]), and their ends are closed;
//! - on cancel or timeout, or when a shutdown's grace runs out, its whole
//!   process group is killed;
//! - and so it is when the worker's own process ends without killing it,
//!   even by SIGKILL: a guard process leads each command's group and kills
//!   it then (see [`Guard`]), so a task whose lease runs out is not
//!   run again elsewhere while its first run goes on here.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getpgrp, getpid};
use offload_client::Client;
use offload_worker::{CancelReason, TaskContext, TaskFailure, Worker};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::WorkArgs;
use crate::usage;

/// Commands running at once, each a process with its pipes: past this a
/// worker runs into the machine's process and file limits before it runs
/// anything faster, and its tasks fail one by one saying so.
const MAX_CONCURRENCY: usize = 10_000;
/// Bytes of stderr kept for the failure message.
const STDERR_TAIL: usize = 4096;
/// The longest stdout line kept: far above a result's default limit
/// (1 MiB), and a bound on what one command's output holds in memory.
const STDOUT_LINE_LIMIT: usize = 64 << 20;
/// After the command exits, its pipes are read on until they have been
/// silent this long: what the command wrote before it exited is in them
/// already, and a process it left running may hold them open for ever.
const QUIET_AFTER_EXIT: Duration = Duration::from_millis(100);
/// ... and at most this long, however much a process left running writes.
const READ_AFTER_EXIT: Duration = Duration::from_secs(1);

pub async fn run(client: Client, args: WorkArgs) -> Result<ExitCode> {
    if !(1..=MAX_CONCURRENCY).contains(&args.concurrency) {
        return Err(usage(format!(
            "--concurrency: must be 1 to {MAX_CONCURRENCY}; got {}",
            args.concurrency
        )));
    }
    if !(1..=offload_core::MAX_LEASE_SECS).contains(&args.lease_secs) {
        return Err(usage(format!(
            "--lease: must be 1 to {} seconds",
            offload_core::MAX_LEASE_SECS
        )));
    }
    for t in &args.types {
        offload_core::validate_task_type("--type", t).map_err(|e| usage(e.to_string()))?;
    }
    for q in &args.queues {
        offload_core::validate_queue_name("--queue", q).map_err(|e| usage(e.to_string()))?;
    }
    // A command that cannot start would fail every task this worker
    // claims, attempt after attempt.
    runnable(&args.command[0]).map_err(|why| usage(format!("cannot run {why}")))?;
    // Fail fast, with exit code 3, if the server is not there.
    client.health().await?;
    let command = Arc::new(args.command);
    let guard = Arc::new(Guard::find()?);
    let mut worker = Worker::new(Arc::new(client))
        .concurrency(args.concurrency)
        .queues(args.queues)
        .lease(Duration::from_secs(args.lease_secs))
        .shutdown_grace(Duration::from_secs(args.grace_secs))
        // The handler kills the process group itself as soon as the token
        // fires; this is only a backstop.
        .cancel_grace(Duration::from_secs(5));
    for task_type in &args.types {
        let command = Arc::clone(&command);
        let guard = Arc::clone(&guard);
        worker = worker.handle(task_type.clone(), move |ctx: TaskContext| {
            let command = Arc::clone(&command);
            let guard = Arc::clone(&guard);
            async move { run_command(&ctx, &command, &guard).await }
        });
    }
    tracing::info!(types = ?args.types, command = ?command, "worker started");
    let stop = CancellationToken::new();
    let stopping = stop.clone();
    tokio::spawn(async move {
        crate::commands::shutdown_signal().await;
        tracing::info!("stopping: letting running commands finish");
        stopping.cancel();
    });
    worker.run(stop).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_command(
    ctx: &TaskContext,
    command: &[String],
    guard: &Guard,
) -> Result<Option<Box<serde_json::value::RawValue>>, TaskFailure> {
    let task = ctx.task();
    // The guard first, so that the command starts in a group that its
    // guard already leads: there is no moment when the command runs
    // unguarded.
    let mut guard = guard
        .command()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            TaskFailure::new(format!("cannot start the guard of {:?}: {e}", command[0]))
        })?;
    // Never written to; its end, when this process's own comes, is the
    // guard's signal.
    let _lifeline = guard.stdin.take();
    let Some(group) = guard.id() else {
        return Err(TaskFailure::new("the command's guard ended as it started"));
    };
    let group = Pid::from_raw(group as i32);
    let mut group_killer = GroupKiller(Some(group));
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .env("OFFLOAD_TASK_ID", task.id.to_string())
        .env("OFFLOAD_ATTEMPT", task.attempt.to_string())
        .env("OFFLOAD_TASK_TYPE", &task.task_type)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its guard's process group, so that everything it starts dies with it.
        .process_group(group.as_raw())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| TaskFailure::new(format!("cannot start {:?}: {e}", command[0])))?;

    let (exit_tx, exit) = Exit::channel();
    let payload = task.payload.get().as_bytes().to_vec();
    let mut stdin = child.stdin.take();
    let mut feed_exit = exit.clone();
    let feed = async move {
        if let Some(stdin) = stdin.as_mut() {
            let write = async {
                // A command that does not read its stdin is not an error.
                let _ = stdin.write_all(&payload).await;
                let _ = stdin.shutdown().await;
            };
            // Past the command's exit a write would wait on whatever it
            // left running with stdin open.
            tokio::select! {
                () = write => {}
                _ = feed_exit.exited() => {}
            }
        }
        drop(stdin);
    };
    let stdout = child.stdout.take();
    let stdout_exit = exit.clone();
    let read_stdout = async {
        match stdout {
            Some(stdout) => {
                read_stdout(stdout, stdout_exit, |percent, message| async move {
                    // A report that fails (the lease is gone) fires the token.
                    let _ = ctx.progress(percent, message.as_deref()).await;
                })
                .await
            }
            None => None,
        }
    };
    let stderr = child.stderr.take();
    let mut stderr_exit = exit;
    let read_stderr = async {
        let mut tail: VecDeque<u8> = VecDeque::new();
        if let Some(mut stderr) = stderr {
            let mut chunk = [0u8; 4096];
            loop {
                let n = tokio::select! {
                    biased;
                    read = stderr.read(&mut chunk) => match read {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    },
                    () = stderr_exit.gone_quiet() => break,
                };
                tail.extend(&chunk[..n]);
                let excess = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..excess);
            }
        }
        String::from_utf8_lossy(tail.make_contiguous())
            .trim()
            .to_owned()
    };
    let wait = async {
        let status = child.wait().await;
        exit_tx.send_replace(Some(Instant::now()));
        status
    };
    let finish = async { tokio::join!(feed, read_stdout, read_stderr, wait) };

    tokio::select! {
        (_, last_line, stderr_tail, status) = finish => {
            // What the command left running after it exited is its own:
            // the guard goes alone, and before its lifeline is cut.
            let _ = guard.kill().await;
            group_killer.disarm();
            let status = status.map_err(|e| TaskFailure::new(format!("waiting for the command: {e}")))?;
            if status.success() {
                match last_line {
                    // Kept as the command wrote it, not re-encoded.
                    Some(Line::Text(line)) => Ok(serde_json::from_str(&line).ok()),
                    None => Ok(None),
                    // Running it again would print the same line.
                    Some(Line::TooLong) => Err(TaskFailure::permanent(format!(
                        "the command's last stdout line, its result, is over {} MiB",
                        STDOUT_LINE_LIMIT >> 20
                    ))),
                }
            } else {
                let tail = if stderr_tail.is_empty() { "(no stderr)".to_owned() } else { stderr_tail };
                Err(TaskFailure::new(format!("the command exited with {status}: {tail}")))
            }
        }
        _ = ctx.cancellation().cancelled() => {
            group_killer.kill();
            Err(TaskFailure::new(killed_message(ctx.cancel_reason())))
        }
    }
}

/// Whether `program` names a file this process could run, found as the
/// command's own start will find it: a path as it is, a bare name in
/// `PATH`. Why not, otherwise, beginning with the name.
fn runnable(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let check = |path: &Path| match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("no such file".to_owned()),
        Err(e) => Err(e.to_string()),
        Ok(meta) if !meta.is_file() => Err("it is not a file".to_owned()),
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => {
            Err("it is not executable".to_owned())
        }
        Ok(_) => Ok(()),
    };
    if program.contains('/') {
        return check(Path::new(program)).map_err(|why| format!("{program}: {why}"));
    }
    // Where PATH is unset the C library looks in its default places.
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    let found = std::env::split_paths(&path).any(|dir| check(&dir.join(program)).is_ok());
    if found {
        Ok(())
    } else {
        Err(format!("{program}: not found in PATH"))
    }
}

/// The guard of one command: the leader of the command's process group,
/// with a pipe from this worker on its stdin that the worker never writes
/// to. The pipe ends when the worker's process does, however it ends (a
/// SIGKILL leaves the worker no chance to kill anything itself); the guard
/// then kills the group: the command, all it started, and itself. When the
/// command ends first, the worker kills the guard alone.
enum Guard {
    /// A shell running [`GUARD_SCRIPT`]: it starts in a third of the time
    /// this program takes, which a worker of short commands pays each task.
    Shell,
    /// This program's `offload work-guard` ([`guard`]), where there is no
    /// shell: an image that holds only the programs it runs.
    ThisProgram(PathBuf),
}

const SHELL: &str = "/bin/sh";
const GUARD_SCRIPT: &str = "while read -r _; do :; done; kill -KILL 0";

impl Guard {
    fn find() -> Result<Self> {
        if Path::new(SHELL).exists() {
            return Ok(Self::Shell);
        }
        // Linux's /proc/self/exe names this program even after a deploy
        // replaced or removed the file it was started from.
        let this = Path::new("/proc/self/exe");
        if this.exists() {
            return Ok(Self::ThisProgram(this.to_owned()));
        }
        let this = std::env::current_exe().map_err(|e| {
            anyhow::anyhow!("cannot find the offload program to guard commands with: {e}")
        })?;
        Ok(Self::ThisProgram(this))
    }

    fn command(&self) -> Command {
        let mut command = match self {
            Self::Shell => {
                let mut shell = Command::new(SHELL);
                shell.args(["-c", GUARD_SCRIPT]);
                shell
            }
            Self::ThisProgram(path) => {
                let mut this = Command::new(path);
                this.arg("work-guard");
                this
            }
        };
        // What `ps` shows.
        command.arg0("offload-work-guard");
        // It needs none, and a shell would run what `ENV` or `BASH_ENV`
        // name before its script.
        command.env_clear();
        command
    }
}

/// `offload work-guard`: a [`Guard`] where there is no shell.
pub fn guard() -> ExitCode {
    // Started any other way, the group it is in is someone else's.
    if getpgrp() != getpid() {
        eprintln!("offload: work-guard is started by `offload work`, as a process group's leader");
        return ExitCode::from(2);
    }
    let mut stdin = std::io::stdin().lock();
    let mut buffer = [0u8; 64];
    loop {
        match stdin.read(&mut buffer) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = killpg(getpgrp(), Signal::SIGKILL);
    ExitCode::FAILURE
}

/// When the command exited, for the readers of its pipes: a process it
/// started inherits them, and one left running after the command exits
/// keeps them open (`sleep 300 &` in a script). Read to their end, the
/// task stayed `running` until its timeout, the command long gone.
#[derive(Clone)]
struct Exit(watch::Receiver<Option<Instant>>);

impl Exit {
    fn channel() -> (watch::Sender<Option<Instant>>, Self) {
        let (sender, receiver) = watch::channel(None);
        (sender, Self(receiver))
    }

    /// When the command exited, once it has; never, if the sender is
    /// dropped first.
    async fn exited(&mut self) -> Instant {
        let exited = self.0.wait_for(Option::is_some).await.map(|at| *at);
        match exited {
            Ok(Some(at)) => at,
            _ => std::future::pending().await,
        }
    }

    /// Resolves once the command has exited and then [`QUIET_AFTER_EXIT`]
    /// has passed, or [`READ_AFTER_EXIT`] after the exit if that is sooner:
    /// raced with one read of a pipe, it ends the reading.
    async fn gone_quiet(&mut self) {
        let exited = self.exited().await;
        let deadline = (Instant::now() + QUIET_AFTER_EXIT).min(exited + READ_AFTER_EXIT);
        tokio::time::sleep_until(deadline).await;
    }
}

/// A line of a command's stdout.
enum Line {
    /// Without its line ending; bytes that are not UTF-8 are replaced.
    Text(String),
    /// Longer than the limit; its bytes were read and dropped.
    TooLong,
}

/// The next line of `reader`, or `None` at its end, or once `exit` says
/// it has gone quiet. Unlike `AsyncBufReadExt::lines` it takes any bytes
/// and holds at most `limit` of them.
async fn next_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    exit: &mut Exit,
    limit: usize,
) -> std::io::Result<Option<Line>> {
    let mut line = Vec::new();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let available = tokio::select! {
            biased;
            available = reader.fill_buf() => available?,
            () = exit.gone_quiet() => &[],
        };
        if available.is_empty() {
            if !read_any {
                return Ok(None);
            }
            break;
        }
        read_any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let content = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if line.len() + content.len() > limit {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(content);
            }
        }
        let used = content.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if too_long {
        return Ok(Some(Line::TooLong));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(Line::Text(
        String::from_utf8_lossy(&line).into_owned(),
    )))
}

/// A `progress:` line as reported: the percent and the message.
type ProgressLine = (Option<f64>, Option<String>);

/// Reads a command's stdout to its end and answers its last line that is
/// neither blank nor a progress report (the result, if it is JSON).
/// Progress lines go to `report` one report at a time, and a line that
/// comes while one is under way replaces any that waits: a command that
/// prints progress for each of a million items must not wait on a server
/// round trip for each line (it did: 20,000 lines took a command 9.2 s
/// where it ran alone in 0.2), and only the latest report is worth
/// sending. The last one is sent before this returns, so it reaches the
/// server before the task's completion does.
async fn read_stdout<R, F, Fut>(stdout: R, mut exit: Exit, report: F) -> Option<Line>
where
    R: tokio::io::AsyncRead + Unpin,
    F: Fn(Option<f64>, Option<String>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // The count of progress lines read and the latest of them.
    let (latest_tx, mut latest_rx) =
        tokio::sync::watch::channel::<(u64, ProgressLine)>((0, (None, None)));
    let read = async move {
        let mut last_line = None;
        let mut progress_lines = 0;
        // Read to the end whatever it holds: a reader that stopped early
        // would close the pipe, and the command die of SIGPIPE.
        let mut stdout = BufReader::new(stdout);
        while let Ok(Some(line)) = next_line(&mut stdout, &mut exit, STDOUT_LINE_LIMIT).await {
            match &line {
                Line::Text(text) => {
                    if let Some(progress) = text.strip_prefix("progress:") {
                        progress_lines += 1;
                        latest_tx.send_replace((progress_lines, parse_progress(progress)));
                    } else if !text.trim().is_empty() {
                        last_line = Some(line);
                    }
                }
                Line::TooLong => last_line = Some(line),
            }
        }
        // Dropping the sender ends the relay once it has sent the latest.
        drop(latest_tx);
        last_line
    };
    let relay = async {
        let mut reported = 0;
        loop {
            let closed = latest_rx.changed().await.is_err();
            let (count, (percent, message)) = latest_rx.borrow_and_update().clone();
            if count != reported {
                reported = count;
                report(percent, message).await;
            }
            if closed {
                break;
            }
        }
    };
    let (last_line, ()) = tokio::join!(read, relay);
    last_line
}

/// Kills a command's process group unless disarmed, at the latest when
/// dropped. The worker runtime drops a handler that outlives the shutdown
/// grace; `kill_on_drop` would then kill the command alone, and whatever it
/// started would run on with its task handed back to run again elsewhere.
struct GroupKiller(Option<Pid>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(group) = self.0.take() {
            let _ = killpg(group, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `PERCENT [MESSAGE]` from the text after `progress:`.
fn parse_progress(report: &str) -> (Option<f64>, Option<String>) {
    let report = report.trim();
    let (first, rest) = report
        .split_once(char::is_whitespace)
        .unwrap_or((report, ""));
    // Rust reads "nan", "inf" and "infinity" as numbers; a person writing
    // them meant words, and NaN would reach the server as no percent at all.
    match first.trim_end_matches('%').parse::<f64>() {
        Ok(p) if p.is_finite() => (
            Some(p.clamp(0.0, 100.0)),
            Some(rest.trim().to_owned()).filter(|m| !m.is_empty()),
        ),
        _ => (None, Some(report.to_owned()).filter(|m| !m.is_empty())),
    }
}

/// Why a command's process group was killed, for its failure.
fn killed_message(reason: Option<CancelReason>) -> String {
    let killed = "the command's process group was killed";
    match reason {
        // The worker runtime puts the timeout before the message; said here
        // too, it read "ran longer than its timeout of 1s: … killed: the
        // attempt ran past its timeout".
        Some(CancelReason::Timeout) => killed.to_owned(),
        reason => {
            let why = reason.map_or("it was stopped".to_owned(), |r| r.to_string());
            format!("{killed}: {why}")
        }
    }
}

#[cfg(test)]
mod tests {
    use offload_worker::CancelReason;

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::{
        Exit, Instant, Line, QUIET_AFTER_EXIT, READ_AFTER_EXIT, killed_message, next_line,
        parse_progress, read_stdout,
    };

    #[test]
    fn a_kill_says_why_unless_the_runtime_does() {
        assert_eq!(
            killed_message(Some(CancelReason::Timeout)),
            "the command's process group was killed"
        );
        assert_eq!(
            killed_message(Some(CancelReason::Cancelled)),
            format!(
                "the command's process group was killed: {}",
                CancelReason::Cancelled
            )
        );
    }

    #[tokio::test]
    async fn stdout_lines_take_any_bytes_and_hold_at_most_the_limit() {
        let output = b"ab\r\ncaf\xe9\n123456\n\nlast";
        let mut reader = tokio::io::BufReader::with_capacity(2, &output[..]);
        let mut lines = Vec::new();
        let (_running, mut exit) = Exit::channel();
        while let Some(line) = next_line(&mut reader, &mut exit, 5).await.unwrap() {
            lines.push(match line {
                Line::Text(text) => text,
                Line::TooLong => "(too long)".to_owned(),
            });
        }
        assert_eq!(lines, ["ab", "caf\u{fffd}", "(too long)", "", "last"]);
    }

    #[tokio::test]
    async fn progress_lines_are_read_on_while_a_report_waits_and_the_latest_is_sent_last() {
        // A pipe of 64 bytes: the command's writes go through only as fast
        // as its lines are read.
        let (mut command, stdout) = tokio::io::duplex(64);
        let reported = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = tokio::sync::watch::channel(false);
        let reader = tokio::spawn({
            let reported = Arc::clone(&reported);
            let (running, exit) = Exit::channel();
            async move {
                let _running = running;
                read_stdout(stdout, exit, |percent, message| {
                    let reported = Arc::clone(&reported);
                    let mut released = released.clone();
                    async move {
                        reported.lock().unwrap().push((percent, message));
                        // Every report waits until the test lets it end:
                        // a server that is slow to answer.
                        let _ = released.wait_for(|r| *r).await;
                    }
                })
                .await
            }
        });
        let write = async {
            for i in 0..1000 {
                command
                    .write_all(format!("progress: {} item {i}\n", i / 10).as_bytes())
                    .await
                    .unwrap();
            }
            command.write_all(b"{\"done\": true}\n\n").await.unwrap();
        };
        // Without a relay the writes would wait for the report for ever.
        tokio::time::timeout(std::time::Duration::from_secs(30), write)
            .await
            .expect("the command's output is read only as its reports are answered");
        // All of it was read while the first report still waits.
        let first = {
            let reported = reported.lock().unwrap();
            assert_eq!(reported.len(), 1, "{reported:?}");
            reported[0].clone()
        };
        assert_ne!(first.1.as_deref(), Some("item 999"));
        drop(command);
        release.send_replace(true);
        let last_line = reader.await.unwrap();
        assert!(matches!(last_line, Some(Line::Text(ref t)) if t == "{\"done\": true}"));
        assert_eq!(
            *reported.lock().unwrap(),
            [first, (Some(99.0), Some("item 999".to_owned()))]
        );
    }

    /// A process the command left running holds its stdout: what the
    /// command wrote before it exited is read, and the reading ends though
    /// the pipe stays open, at the latest a second after the exit however
    /// much comes.
    #[tokio::test(start_paused = true)]
    async fn stdout_is_read_after_the_exit_only_until_it_goes_quiet() {
        let (mut left_running, stdout) = tokio::io::duplex(1 << 16);
        left_running
            .write_all(b"progress: 10\n{\"the\": \"result\"}\n")
            .await
            .unwrap();
        let (exited, exit) = Exit::channel();
        exited.send_replace(Some(Instant::now()));
        let started = Instant::now();
        let last_line = read_stdout(stdout, exit, |_, _| async {}).await;
        assert!(matches!(last_line, Some(Line::Text(ref t)) if t == r#"{"the": "result"}"#));
        assert_eq!(started.elapsed(), QUIET_AFTER_EXIT);

        let (mut left_running, stdout) = tokio::io::duplex(1 << 16);
        let (exited, exit) = Exit::channel();
        let chatter = tokio::spawn(async move {
            for i in 0.. {
                let line = format!("line {i}\n");
                if left_running.write_all(line.as_bytes()).await.is_err() {
                    return i;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            unreachable!()
        });
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        exited.send_replace(Some(Instant::now()));
        let last_line = read_stdout(stdout, exit, |_, _| async {}).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(500) + READ_AFTER_EXIT
        );
        assert!(matches!(last_line, Some(Line::Text(ref t)) if t.starts_with("line ")));
        // The pipe's end is closed: its writer learns it.
        chatter.await.unwrap();
    }

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_progress(" 40 halfway there"),
            (Some(40.0), Some("halfway there".into()))
        );
        assert_eq!(parse_progress("75%"), (Some(75.0), None));
        assert_eq!(parse_progress("250"), (Some(100.0), None));
        assert_eq!(
            parse_progress("warming up"),
            (None, Some("warming up".into()))
        );
        assert_eq!(parse_progress("NaN"), (None, Some("NaN".into())));
        assert_eq!(
            parse_progress("infinity and beyond"),
            (None, Some("infinity and beyond".into()))
        );
    }
}
