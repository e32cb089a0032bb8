//! The command line of SPEC §5: output, exit codes, `watch` and `work`.

use std::io::BufRead;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::support::{BIN, Server, stdout};

fn json_of(output: &std::process::Output) -> Value {
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {output:?}"))
}

#[test]
fn commands_print_for_people_and_for_scripts() {
    let server = Server::start();
    let enqueued = server.cli(&[
        "enqueue",
        "report.build",
        "--payload",
        r#"{"month": 5}"#,
        "--queue",
        "reports",
        "--priority",
        "high",
        "--label",
        "project_id=p1",
        "--max-attempts",
        "2",
        "--timeout",
        "60",
    ]);
    assert!(enqueued.status.success(), "{enqueued:?}");
    let id = stdout(&enqueued);
    assert_eq!(
        uuid::Uuid::parse_str(&id).unwrap().get_version_num(),
        7,
        "prints the new id alone"
    );

    let task = json_of(&server.cli(&["get", &id, "--json"]));
    assert_eq!(task["payload"], json!({"month": 5}));

    assert_eq!(
        (task["queue"].clone(), task["priority"].clone()),
        (json!("reports"), json!(8))
    );
    assert_eq!(task["labels"], json!({"project_id": "p1"}));
    assert_eq!(
        (task["max_attempts"].clone(), task["timeout_secs"].clone()),
        (json!(2), json!(60))
    );

    let people = stdout(&server.cli(&["get", &id]));
    assert!(
        people.contains("report.build") && people.contains("pending"),
        "{people}"
    );
    assert!(
        people.contains("labels           project_id=p1"),
        "{people}"
    );
    let table = stdout(&server.cli(&["list", "--queue", "reports"]));
    assert!(table.starts_with("ID") && table.contains(&id), "{table}");
    let listed = json_of(&server.cli(&["list", "--label", "project_id=p1", "--json"]));
    assert_eq!(listed["tasks"][0]["id"], id.as_str());
    assert_eq!(listed["next_cursor"], Value::Null);
    let stats = json_of(&server.cli(&["stats", "--json"]));
    assert_eq!(stats["queues"]["reports"]["pending"], 1);
    assert!(stdout(&server.cli(&["stats"])).contains("PENDING"));

    let paused = json_of(&server.cli(&["pause", "reports", "--json"]));
    assert_eq!(paused["paused"], true);
    let queues = json_of(&server.cli(&["queues", "--json"]));
    assert_eq!(queues["queues"][0]["paused"], true);
    assert!(stdout(&server.cli(&["resume", "reports"])).contains("active"));

    // `--payload @-` reads it from a pipeline, as curl's `@-` does.
    let mut piped = Command::new(BIN)
        .args(["enqueue", "from.stdin", "--payload", "@-"])
        .env("OFFLOAD_URL", &server.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut piped.stdin.take().unwrap(), br#"{"from": "stdin"}"#).unwrap();
    let piped = piped.wait_with_output().unwrap();
    assert!(piped.status.success(), "{piped:?}");
    let from_stdin = json_of(&server.cli(&["get", &stdout(&piped), "--json"]));
    assert_eq!(from_stdin["payload"], json!({"from": "stdin"}));

    let after = server.cli(&[
        "enqueue",
        "publish",
        "--after",
        &id,
        "--delay",
        "5",
        "--unique-key",
        "pub-1",
    ]);
    let child = json_of(&server.cli(&["get", &stdout(&after), "--json"]));
    assert_eq!(child["state"], "blocked");
    assert_eq!(child["depends_on"], json!([id]));
    let child_for_people = stdout(&server.cli(&["get", &stdout(&after)]));
    for row in [
        format!("depends_on       {id}"),
        "unique_key       pub-1".to_owned(),
    ] {
        assert!(child_for_people.contains(&row), "{child_for_people}");
    }

    // What a worker wrote is shown, never acted on by the terminal, and a
    // message's lines line up under its first.
    let http = server.http();
    let marked = http.enqueue(json!({"type": "shown", "owner": "user\u{1b}]0;title\u{7}"}));
    let marked_id = marked["id"].as_str().unwrap();
    http.post("/v1/fetch", json!({"worker_id": "w", "types": ["shown"]}));
    http.post(
        &format!("/v1/tasks/{marked_id}/fail"),
        json!({"worker_id": "w", "error": {"message": "boom\u{1b}[2J\n  at step 2"}, "retry": false}),
    );
    let shown = stdout(&server.cli(&["get", marked_id]));
    assert!(!shown.contains('\u{1b}'), "{shown:?}");
    assert!(
        shown.contains("owner            user\\u{1b}]0;title\\u{7}"),
        "{shown}"
    );
    assert!(
        shown.contains("error            error: boom\\u{1b}[2J\n                   at step 2"),
        "{shown}"
    );

    assert!(server.cli(&["cancel", &id]).status.success());
    assert_eq!(
        json_of(&server.cli(&["retry", &id, "--json"]))["state"],
        "pending"
    );
    server.cli(&["cancel", &id]);
    assert!(server.cli(&["delete", &id]).status.success());
    let cleared = json_of(&server.cli(&["clear", "--state", "cancelled", "--json"]));
    assert_eq!(
        cleared["deleted"], 1,
        "the blocked child was cancelled with its dependency"
    );
}

#[test]
fn list_shows_as_many_tasks_as_its_limit_asks_across_pages_the_server_cut_short() {
    let server = Server::start();
    let http = server.http();
    let bulky = "x".repeat(900_000);
    for _ in 0..12 {
        http.enqueue(json!({"type": "t", "queue": "bulky", "payload": {"text": bulky}}));
    }
    // The server ends a page at 8 MiB of payloads: ten of these.
    let (_, page) = http.get("/v1/tasks?queue=bulky&limit=12");
    assert_eq!(page["tasks"].as_array().unwrap().len(), 10);

    let listed = |limit: &str| {
        json_of(&server.cli(&["list", "--queue", "bulky", "--limit", limit, "--json"]))
    };
    let eleven = listed("11");
    assert_eq!(eleven["tasks"].as_array().unwrap().len(), 11);
    assert!(eleven["next_cursor"].is_string(), "one task is left");
    let all = listed("12");
    assert_eq!(all["tasks"].as_array().unwrap().len(), 12);
    assert_eq!(all["next_cursor"], Value::Null);
    let table = stdout(&server.cli(&["list", "--queue", "bulky", "--limit", "12"]));
    assert_eq!(
        table.lines().count(),
        13,
        "a header and twelve rows: {table}"
    );
}

#[test]
fn exit_codes_say_what_went_wrong() {
    let server = Server::start();
    let code = |args: &[&str]| server.cli(args).status.code().unwrap();
    // Exit 2, the reason on stderr.
    let refused_saying = |args: &[&str], said: &str| {
        let slip = server.cli(args);
        assert_eq!(slip.status.code(), Some(2), "{args:?}");
        let message = String::from_utf8_lossy(&slip.stderr);
        assert!(message.contains(said), "{args:?}: {message}");
    };
    // 2: bad usage, caught before anything is sent.
    assert_eq!(code(&["get", "not-an-id"]), 2);
    assert_eq!(code(&["enqueue", "t", "--priority", "11"]), 2);
    assert_eq!(code(&["enqueue", "t", "--payload", "{broken"]), 2);
    assert_eq!(
        code(&["enqueue", "t", "--payload", "@/nonexistent/p.json"]),
        2
    );
    assert_eq!(code(&["list", "--limit", "5000"]), 2);
    assert_eq!(code(&["list", "--state", "sleeping"]), 2);
    assert_eq!(code(&["frobnicate"]), 2);
    assert_eq!(code(&["enqueue"]), 2);
    // Named as typed, not by the request field behind it.
    for (args, named) in [
        (&["enqueue", "t", "--at", "tomorrow"][..], "--at: "),
        (&["enqueue", "t", "--delay", "999999999999"], "--delay: "),
        (&["enqueue", "t", "--max-attempts", "0"], "--max-attempts: "),
        // A negative number is a value to check, not an unknown flag.
        (
            &["enqueue", "t", "--priority", "-3"],
            "--priority: must be 1 to 10",
        ),
        (&["enqueue", "t", "--delay", "-5"], "--delay: must be 0 to"),
        (
            &["enqueue", "t", "--timeout", "-2"],
            "--timeout: must be 1 to",
        ),
        (&["enqueue", "t", "--after", "nope"], "--after: "),
        (&["enqueue", "no spaces"], "TYPE: "),
        (
            &[
                "work",
                "--type",
                "t",
                "--concurrency",
                "100000",
                "--",
                "true",
            ],
            "--concurrency: must be 1 to 10000",
        ),
    ] {
        refused_saying(args, named);
    }
    let bench = server.cli(&["bench", "--batch-answer", "everything"]);
    assert_eq!(bench.status.code(), Some(2));
    assert_eq!(
        code(&["work", "--type", "t", "--queue", "no spaces", "--", "true"]),
        2
    );
    // A name no URL's path can carry: said so, not the 404 of the route
    // the folded path would reach.
    for args in [["pause", ".."], ["resume", "."]] {
        refused_saying(&args, "cannot be named in a URL's path");
    }
    // The same slips, caught by the server: its 400 names the argument.
    assert_eq!(code(&["pause", "no spaces"]), 2);
    // Names that would have named another route (`/`, `?`, `#`) reach the
    // server as names all the same.
    for args in [["pause", "a/b"], ["resume", "q?x"], ["pause", "a#b"]] {
        refused_saying(&args, "name: must be 1 to 64");
    }
    assert_eq!(code(&["clear", "--state", "pending"]), 2);
    let message = String::from_utf8_lossy(&bench.stderr);
    assert!(message.contains("--batch-answer"), "{message}");
    // A server's address without its scheme is a slip in the call, not a
    // server that is down.
    let stats_at = |url: &str| {
        Command::new(BIN)
            .args(["stats"])
            .env("OFFLOAD_URL", url)
            .output()
            .unwrap()
    };
    let schemeless = stats_at("127.0.0.1:6490");
    assert_eq!(schemeless.status.code(), Some(2));
    let message = String::from_utf8_lossy(&schemeless.stderr);
    assert!(message.contains("--url: must be http://"), "{message}");
    // 1: the server said no.
    let id = stdout(&server.cli(&["enqueue", "t"]));
    assert_eq!(code(&["retry", &id]), 1);
    assert_eq!(code(&["delete", &id]), 1);
    assert_eq!(code(&["get", "01a2041e-d5a1-730d-971c-a89e0eec346a"]), 1);
    // 3: no server there.
    let unreachable = stats_at("http://127.0.0.1:1");
    assert_eq!(unreachable.status.code(), Some(3));
    let message = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(
        message.trim().lines().count(),
        1,
        "one clear line: {message}"
    );
    assert!(message.contains("cannot reach"), "{message}");
    // And 0 for success.
    assert_eq!(code(&["get", &id]), 0);
}

/// `offload get ID | head -c 1`: the reader goes away with most of the
/// output unread, and the command ends with 0 and nothing on stderr, as
/// a Unix filter does, not with a panic about a broken pipe.
#[test]
fn a_reader_that_stops_early_ends_the_command_quietly() {
    use std::io::Read;

    let server = Server::start();
    // Far more than a pipe holds, so the write is still going on when the
    // reader closes its end.
    let task = server.http().enqueue(json!({
        "type": "t",
        "payload": { "text": "x".repeat(512 * 1024) },
    }));
    let id = task["id"].as_str().unwrap().to_owned();
    for args in [vec!["get", id.as_str(), "--json"], vec!["get", id.as_str()]] {
        let mut child = Command::new(BIN)
            .args(&args)
            .env("OFFLOAD_URL", &server.url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 1];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        let output = child.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
        assert!(output.stderr.is_empty(), "{args:?}: {output:?}");
    }
}

/// Runs `offload watch ID` in the background; its exit code when done.
fn watch(server: &Server, id: &str) -> std::thread::JoinHandle<i32> {
    let mut child = Command::new(BIN)
        .args(["watch", id])
        .env("OFFLOAD_URL", &server.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::spawn(move || child.wait().unwrap().code().unwrap())
}

#[test]
fn watch_rides_out_a_server_restart() {
    let mut server = Server::start();
    let id = server.http().enqueue(json!({"type": "t"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut watcher = Command::new(BIN)
        .args(["watch", &id, "--json"])
        .env("OFFLOAD_URL", &server.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Its first line: the stream is open.
    let mut lines = std::io::BufReader::new(watcher.stdout.take().unwrap()).lines();
    assert!(lines.next().is_some(), "watch printed nothing");
    server.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    server.restart();
    let http = server.http();
    assert_eq!(http.fetch("w", json!({})).len(), 1);
    http.post(
        &format!("/v1/tasks/{id}/complete"),
        json!({"worker_id": "w"}),
    );
    let last = lines.last().expect("a line after the restart").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&last).unwrap()["state"],
        "completed"
    );
    assert_eq!(watcher.wait().unwrap().code(), Some(0));
}

#[test]
fn watch_follows_a_task_and_exits_by_its_outcome() {
    let server = Server::start();
    let http = server.http();
    let outcomes = [("complete", 0), ("fail", 1), ("cancel", 2)];
    for (outcome, expected) in outcomes {
        // A payload written over CRLF lines, as it is kept and streamed.
        let (status, task) = http.post_raw(
            "/v1/tasks",
            "{\"type\": \"t\", \"max_attempts\": 1, \"payload\": {\r\n  \"a\": 1\r\n}}",
        );
        assert_eq!(status, 201, "{task}");
        let id = task["id"].as_str().unwrap().to_owned();
        let watcher = watch(&server, &id);
        std::thread::sleep(Duration::from_millis(300));
        http.fetch("w", json!({}));
        http.post(
            &format!("/v1/tasks/{id}/heartbeat"),
            json!({"worker_id": "w", "progress": {"percent": 60}}),
        );
        match outcome {
            "complete" => http.post(
                &format!("/v1/tasks/{id}/complete"),
                json!({"worker_id": "w"}),
            ),
            "fail" => http.post(
                &format!("/v1/tasks/{id}/fail"),
                json!({"worker_id": "w", "error": {"message": "x"}}),
            ),
            _ => {
                http.post(&format!("/v1/tasks/{id}/cancel"), json!(null));
                http.post(
                    &format!("/v1/tasks/{id}/fail"),
                    json!({"worker_id": "w", "error": {"message": "stopped"}}),
                )
            }
        };
        assert_eq!(
            watcher.join().unwrap(),
            expected,
            "watch of a task that ended by {outcome}"
        );
    }
}

/// A running `offload work`, killed when dropped.
struct WorkProcess(std::process::Child);

impl Drop for WorkProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn work(server: &Server, task_type: &str, script: &str) -> WorkProcess {
    work_with(server, task_type, &[], script)
}

fn work_with(server: &Server, task_type: &str, options: &[&str], script: &str) -> WorkProcess {
    let child = Command::new(BIN)
        .args(["work", "--type", task_type, "--concurrency", "2"])
        .args(options)
        .args(["--", "sh", "-c", script])
        .env("OFFLOAD_URL", &server.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    WorkProcess(child)
}

#[test]
fn work_runs_a_command_per_task() {
    let server = Server::start();
    let http = server.http();
    // A result the server refuses: nested past its limit of 64.
    let too_deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    let script = format!(
        r#"payload=$(cat)
echo "progress: 25 started"
echo "payload was $payload and attempt $OFFLOAD_ATTEMPT" >&2
case "$payload" in
  *fail*) echo "it went wrong for $OFFLOAD_TASK_ID" >&2; exit 3 ;;
  *deep*) echo '{too_deep}'; exit 0 ;;
  *latin*) printf 'caf\351\n'; sleep 0.2; echo '{{"after": "latin"}}'; exit 0 ;;
  *huge*) head -c 68000000 /dev/zero | tr '\0' 7; echo; exit 0 ;;
esac
echo "progress: 90 nearly"
echo "{{\"task\": \"$OFFLOAD_TASK_ID\", \"attempt\": $OFFLOAD_ATTEMPT, \"got\": $payload}}""#
    );
    let _worker = work(&server, "shell", &script);

    let ok = http.enqueue(json!({"type": "shell", "payload": {"n": 7}}));
    let id = ok["id"].as_str().unwrap();
    let done = http.wait_for(id, "completed", |t| t["state"] == "completed");
    assert_eq!(
        done["result"],
        json!({"task": id, "attempt": 1, "got": {"n": 7}})
    );
    assert_eq!(done["progress"]["percent"], 90.0);
    assert_eq!(done["progress"]["message"], "nearly");

    let bad = http.enqueue(json!({"type": "shell", "payload": "fail", "max_attempts": 1}));
    let id = bad["id"].as_str().unwrap();
    let failed = http.wait_for(id, "failed", |t| t["state"] == "failed");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("exit status: 3"), "{message}");
    assert!(
        message.contains(&format!("it went wrong for {id}")),
        "stderr's tail: {message}"
    );

    // The work was done; its result was refused. The task fails saying
    // why, at once and without running the command again.
    let deep = http.enqueue(json!({"type": "shell", "payload": "deep"}));
    let id = deep["id"].as_str().unwrap();
    let failed = http.wait_for(id, "failed", |t| t["state"] == "failed");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("result was refused") && message.contains("at most 64 deep"),
        "{message}"
    );
    assert_eq!(failed["attempt"], 1, "{failed}");

    // Output that is not UTF-8 is read on, not left to fill the pipe.
    let latin = http.enqueue(json!({"type": "shell", "payload": "latin"}));
    let id = latin["id"].as_str().unwrap();
    let done = http.wait_for(id, "completed", |t| t["state"] == "completed");
    assert_eq!(done["result"], json!({"after": "latin"}));

    // A last line past what the worker holds fails the task at once.
    let huge = http.enqueue(json!({"type": "shell", "payload": "huge"}));
    let id = huge["id"].as_str().unwrap();
    let failed = http.wait_for(id, "failed", |t| t["state"] == "failed");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("is over 64 MiB"), "{message}");
    assert_eq!(failed["attempt"], 1, "{failed}");
}

/// Results that together pass the server's `batch_body_limit_bytes` all
/// reach it: the worker splits the call the server refuses for its size.
/// Sent again whole, it was given up, and the tasks ran again once their
/// leases ran out.
#[test]
fn work_delivers_results_whose_sum_is_over_the_body_limit() {
    let server = Server::start_configured("batch_body_limit_bytes = 1048576\n");
    let http = server.http();
    // Eight results of 300 KB that end together: 2.4 MB in one call.
    let script = r#"cat > /dev/null; sleep 0.5; printf '"%0300000d"\n' 0"#;
    let _worker = WorkProcess(
        Command::new(BIN)
            .args(["work", "--type", "report", "--concurrency", "8"])
            .args(["--", "sh", "-c", script])
            .env("OFFLOAD_URL", &server.url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ids: Vec<String> = (0..8)
        .map(|_| {
            http.enqueue(json!({"type": "report"}))["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for id in &ids {
        let done = http.wait_for(id, "completed", |t| t["state"] == "completed");
        assert_eq!(done["attempt"], 1, "ran once");
        assert_eq!(done["result"].as_str().map(str::len), Some(300_000));
    }
}

/// Started with a soft limit of 64 open files, a worker running 40 commands
/// at once (about four descriptors each) takes its hard limit: every
/// command starts, and none spends an attempt failing to.
#[test]
fn work_takes_the_hard_open_files_limit() {
    let server = Server::start();
    let http = server.http();
    let tasks: Vec<Value> = (0..40).map(|_| json!({"type": "fd"})).collect();
    assert_eq!(http.post("/v1/tasks/batch", json!({"tasks": tasks})).0, 201);
    let worker = Command::new("/bin/sh")
        .args(["-c", r#"ulimit -S -n 64 && exec "$0" "$@""#, BIN])
        .args([
            "work",
            "--type",
            "fd",
            "--concurrency",
            "40",
            "--",
            "sleep",
            "1",
        ])
        .env("OFFLOAD_URL", &server.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _worker = WorkProcess(worker);
    let deadline = Instant::now() + Duration::from_secs(30);
    let finished = loop {
        let (_, page) = http.get("/v1/tasks?type=fd&limit=100");
        let tasks = page["tasks"].as_array().unwrap().clone();
        if tasks.iter().all(|t| t["state"] == "completed") {
            break tasks;
        }
        assert!(Instant::now() < deadline, "not all completed: {page}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let retried: Vec<&Value> = finished.iter().filter(|t| t["attempt"] != 1).collect();
    assert!(retried.is_empty(), "tasks run more than once: {retried:?}");
}

/// A worker whose command cannot run says so and exits at once, before it
/// claims anything. It started, and failed every task it claimed, each
/// attempt after attempt: a typo in a deploy failed the whole backlog.
#[test]
fn work_refuses_a_command_it_cannot_run() {
    let server = Server::start();
    let http = server.http();
    let id = http.enqueue(json!({"type": "typo"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let not_executable = server.dir.join("notes.txt");
    std::fs::write(&not_executable, "not a program").unwrap();
    let not_executable = not_executable.display().to_string();
    let dir = server.dir.display().to_string();
    for (command, says) in [
        ("/no/such/program", "/no/such/program: no such file"),
        (
            "no-such-program-xyz",
            "no-such-program-xyz: not found in PATH",
        ),
        (not_executable.as_str(), "is not executable"),
        (dir.as_str(), "is not a file"),
    ] {
        let mut worker = Command::new(BIN)
            .args(["work", "--type", "typo", "--", command, "arg"])
            .env("OFFLOAD_URL", &server.url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = worker.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = worker.kill();
                let task = http.task(&id);
                panic!("a worker of {command} started; its task: {task}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut worker.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("cannot run") && stderr.contains(says),
            "{command}: {stderr}"
        );
    }
    // A program PATH finds, as the command's own PATH would.
    let found = Command::new(BIN)
        .args(["work", "--type", "typo", "--", "true"])
        .env("OFFLOAD_URL", &server.url)
        .env("PATH", "/nowhere:/usr/bin:/bin")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _found = WorkProcess(found);
    let done = http.wait_for(&id, "completed", |t| t["state"] == "completed");
    assert_eq!(done["attempt"], 1, "{done}");
}

/// A command that exits while a process it started still holds its
/// stdout, stderr and stdin ends its task: the worker waited for the pipes
/// to close, and the task stayed `running` until its timeout, half an hour
/// by default, though the command had long answered.
#[test]
fn work_ends_a_task_when_its_command_exits_though_what_it_started_holds_its_pipes() {
    let server = Server::start();
    let http = server.http();
    // The payload is more than a pipe holds, and nothing reads it: the
    // process left running holds stdin open unread.
    let script = format!(
        r#"sleep 300 & echo $! > {}/left.$OFFLOAD_ATTEMPT.pid
echo "progress: 50 half"
case "$OFFLOAD_ATTEMPT" in
  1) echo "it went wrong" >&2; exit 4 ;;
esac
echo '{{"done": true}}'"#,
        server.dir.display()
    );
    let _worker = work(&server, "leaves", &script);
    let big = "x".repeat(256 * 1024);
    let id = http.enqueue(json!({"type": "leaves", "payload": big}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let retried = http.wait_for(&id, "failed once", |t| t["errors"][0].is_object());
    let message = retried["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("exit status: 4") && message.contains("it went wrong"),
        "{message}"
    );
    // The retry's backoff is a few seconds; `wait_for` waits longer.
    let done = http.wait_for(&id, "completed", |t| t["state"] == "completed");
    assert_eq!(done["result"], json!({"done": true}));
    assert_eq!(done["progress"]["percent"], 50.0);
    // What the command left running is its own: not killed with the task.
    for attempt in [1, 2] {
        let pid = read_pid_file(&server.dir.join(format!("left.{attempt}.pid")));
        assert!(is_alive(pid), "process {pid} left running was killed");
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

#[test]
fn work_kills_the_process_group_on_cancel() {
    let server = Server::start();
    let http = server.http();
    let (_worker, id, grandchild) = a_command_with_a_grandchild(&server, &[]);
    http.post(&format!("/v1/tasks/{id}/cancel"), json!(null));
    let cancelled = http.wait_for(&id, "cancelled", |t| t["state"] == "cancelled");
    assert_eq!(cancelled["error"]["kind"], "cancelled");
    wait_until_dead(grandchild, "the cancel");
}

#[test]
fn work_fails_a_command_past_its_timeout_and_says_so_once() {
    let server = Server::start();
    let http = server.http();
    let id = http.enqueue(json!({"type": "slow", "timeout_secs": 1, "max_attempts": 1}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _worker = work(&server, "slow", "sleep 30");
    let failed = http.wait_for(&id, "failed", |t| t["state"] == "failed");
    assert_eq!(failed["error"]["kind"], "timeout");
    // The worker's failure or, where the server's recovery pass comes
    // first, the server's expiry: each names the timeout once. The
    // worker's own words are checked in `work::tests`.
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        [
            "the attempt ran longer than its timeout of 1s: the command's process group was killed",
            "attempt ran longer than timeout_secs (1)",
        ]
        .contains(&message),
        "{message}"
    );
}

#[test]
fn work_kills_the_process_group_when_its_shutdown_grace_runs_out() {
    let server = Server::start();
    let http = server.http();
    let (mut worker, id, grandchild) = a_command_with_a_grandchild(&server, &["--grace", "1"]);
    kill(Pid::from_raw(worker.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = worker.0.wait().unwrap();
    assert!(status.success(), "offload work after SIGTERM: {status}");
    let handed_back = http.task(&id);
    assert_eq!(handed_back["state"], "pending", "{handed_back}");
    wait_until_dead(grandchild, "its worker's shutdown");
}

#[test]
fn work_kills_the_process_group_when_it_is_killed() {
    let server = Server::start();
    let (mut worker, _id, grandchild) = a_command_with_a_grandchild(&server, &[]);
    // SIGKILL: the worker itself has no chance to kill anything.
    worker.0.kill().unwrap();
    worker.0.wait().unwrap();
    wait_until_dead(grandchild, "its worker's SIGKILL");
}

#[test]
fn work_stops_a_command_whose_lease_ran_out_unrenewed() {
    let mut server = Server::start();
    let (_worker, _id, grandchild) = a_command_with_a_grandchild(&server, &["--lease", "2"]);
    // No heartbeat reaches a server that is gone. Once the lease it last
    // renewed has run out, the server (back, or another node) may give the
    // task to another worker: this run must be over by then.
    server.kill9();
    wait_until_dead(grandchild, "its lease, with no server to renew it");
}

#[test]
fn work_guard_kills_its_group_when_its_pipe_ends() {
    // The guard `offload work` starts where there is no shell, as it
    // starts it: leading a group, with a pipe from the worker on stdin.
    let mut guard = Command::new(BIN)
        .arg("work-guard")
        .stdin(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut command = Command::new("sleep")
        .arg("300")
        .process_group(guard.id() as i32)
        .spawn()
        .unwrap();
    drop(guard.stdin.take());
    wait_until_dead(command.id(), "its guard's pipe closing");
    assert_eq!(
        command.wait().unwrap().signal(),
        Some(9),
        "the command's end"
    );
    assert_eq!(
        guard.wait().unwrap().signal(),
        Some(9),
        "the guard's own end"
    );
}

#[test]
fn work_guard_started_by_hand_kills_nothing() {
    // Not its group's leader, as `offload work` makes it: the group is the
    // shell's, which must live on to say so.
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("{BIN} work-guard </dev/null; echo \"exit $?\""),
        ])
        .process_group(0)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exit 2\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("started by `offload work`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `offload work` (with `options`) running a task whose command started a
/// grandchild, which must die with the command's group; the worker, the
/// task's id and the grandchild's pid.
fn a_command_with_a_grandchild(server: &Server, options: &[&str]) -> (WorkProcess, String, u32) {
    let http = server.http();
    let pid_file = server.dir.join("child.pid");
    let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
    let worker = work_with(server, "long", options, &script);
    let id = http.enqueue(json!({"type": "long"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    http.wait_for(&id, "running", |t| t["state"] == "running");
    let grandchild = read_pid_file(&pid_file);
    (worker, id, grandchild)
}

/// The pid a command wrote to `path`, once it has; the process is alive.
fn read_pid_file(path: &std::path::Path) -> u32 {
    let started = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            assert!(is_alive(pid), "{pid} died before the test could see it");
            return pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the command never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_until_dead(pid: u32, after: &str) {
    let started = Instant::now();
    while is_alive(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "process {pid} outlived {after}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a process exists and is not a zombie awaiting its parent.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .split_whitespace()
            .nth(2)
            .is_none_or(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Offload served over HTTPS by a proxy whose certificate an
/// organisation's own CA signed, as internal services are: the command
/// line (and `offload work` and the Rust client, which share its HTTP
/// client) trusts the system's roots, or `SSL_CERT_FILE`'s as curl and
/// OpenSSL do, besides the public ones it carries. It trusted only the
/// public ones, and no setting could reach such a server.
#[test]
fn the_command_line_reaches_a_server_behind_tls_that_a_private_ca_signed() {
    let server = Server::start();
    let upstream = server.url.strip_prefix("http://").expect("an http URL");
    let (port, ca) = tls_front(upstream.to_owned());
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let enqueue = |trusted: Option<&std::path::Path>| {
        let mut command = Command::new(BIN);
        command
            .args(["enqueue", "hello"])
            .env("OFFLOAD_URL", format!("https://localhost:{port}"))
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        if let Some(ca_file) = trusted {
            command.env("SSL_CERT_FILE", ca_file);
        }
        command.output().expect("run offload")
    };
    let untrusted = enqueue(None);
    assert_eq!(untrusted.status.code(), Some(3), "{untrusted:?}");
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("UnknownIssuer"),
        "{untrusted:?}"
    );
    let trusted = enqueue(Some(&ca_file));
    assert!(trusted.status.success(), "{trusted:?}");
    let id = stdout(&trusted);
    assert_eq!(server.http().task(&id)["state"], "pending");
}

/// A TLS front for `upstream` (`host:port`) on a port of its own, whose
/// certificate for `localhost` a CA made here signed: the port, and that
/// CA's certificate in PEM.
fn tls_front(upstream: String) -> (u16, String) {
    use tokio_rustls::rustls;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Offload tests' own CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![certificate.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends
                    // the handshake.
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
    });
    (port, ca.pem())
}
