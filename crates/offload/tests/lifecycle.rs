//! Running a node: durability across `kill -9`, graceful shutdown, bad
//! configuration.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use crate::support::{BIN, Http, Server};

#[test]
fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let http = server.http();
    let mut enqueued = Vec::new();
    for i in 0..200 {
        enqueued.push(
            http.enqueue(json!({"type": "t", "payload": i}))["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let claimed = http.fetch("w", json!({"limit": 50}));
    let mut completed = Vec::new();
    for task in &claimed {
        let id = task["id"].as_str().unwrap();
        let (status, _) = http.post(
            &format!("/v1/tasks/{id}/complete"),
            json!({"worker_id": "w"}),
        );
        assert_eq!(status, 200);
        completed.push(id.to_owned());
    }
    server.kill9();

    let restarted = Server::start_in(dir.path(), &[]);
    let http = restarted.http();
    for id in &enqueued {
        let task = http.task(id);
        let expected = if completed.contains(id) {
            "completed"
        } else {
            "pending"
        };
        assert_eq!(task["state"], expected, "task {id} after kill -9");
    }
    let (_, stats) = http.get("/v1/stats");
    assert_eq!(
        (
            stats["total"]["completed"].clone(),
            stats["total"]["pending"].clone()
        ),
        (json!(50), json!(150))
    );
}

/// `offload backup` copies a node's database while the node serves it and
/// writes go on: the copy holds every write answered before the backup
/// began (most of them still in the WAL, not yet in the database file), a
/// node starts on it, and its tasks are as they were: claimed ones running
/// under their worker, completed ones completed.
#[test]
fn a_backup_taken_while_a_node_serves_holds_every_write_answered_before_it() {
    if crate::support::on_postgres() {
        return; // PostgreSQL is backed up with its own tools.
    }
    let server = Server::start();
    let http = server.http();
    let ids = |tasks: &[serde_json::Value]| -> Vec<String> {
        tasks
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, batch) = http.post(
        "/v1/tasks/batch",
        json!({"tasks": (0..300).map(|i| json!({"type": "t", "payload": {"i": i}})).collect::<Vec<_>>()}),
    );
    assert_eq!(status, 201, "{batch}");
    let enqueued = ids(batch["tasks"].as_array().unwrap());
    let claimed = ids(&http.fetch("w", json!({"types": ["t"], "limit": 50})));
    let completed = &claimed[..20];
    for id in completed {
        let (status, answer) = http.post(
            &format!("/v1/tasks/{id}/complete"),
            json!({"worker_id": "w", "result": {"ok": true}}),
        );
        assert_eq!(status, 200, "{answer}");
    }

    // Writes go on beside the backup; the ones answered before it began
    // must be in it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let writer = {
        let (stop, answered, http) = (stop.clone(), answered.clone(), server.http());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = http.enqueue(json!({"type": "later"}))["id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                answered.lock().unwrap().push(id);
            }
        })
    };
    while answered.lock().unwrap().len() < 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let answered_before: Vec<String> = answered.lock().unwrap().clone();
    let copy = server.dir.join("copy.db");
    let backup = Command::new(BIN)
        .args(["backup", "--db"])
        .arg(format!(
            "sqlite://{}",
            server.dir.join("offload.db").display()
        ))
        .arg(&copy)
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(backup.status.success(), "{backup:?}");
    let said = crate::support::stdout(&backup);
    assert!(
        said.starts_with("backed up ") && said.contains(" tasks, "),
        "{said}"
    );

    let restored_dir = tempfile::tempdir().unwrap();
    let restored = Server::start_on(
        &format!("sqlite://{}", copy.display()),
        restored_dir.path(),
        &[],
    );
    let http = restored.http();
    for id in &enqueued {
        let task = http.task(id);
        let expected = if completed.contains(id) {
            "completed"
        } else if claimed.contains(id) {
            "running"
        } else {
            "pending"
        };
        assert_eq!(task["state"], expected, "task {id} in the copy: {task}");
        if expected == "running" {
            assert_eq!(task["worker_id"], "w", "{task}");
        }
        if expected == "completed" {
            assert_eq!(task["result"], json!({"ok": true}), "{task}");
        }
    }
    for id in &answered_before {
        assert_eq!(http.task(id)["state"], "pending", "task {id} in the copy");
    }
    // The copy is a file of its own: the node on it takes work the
    // original's node goes on without.
    let (_, stats) = http.get("/v1/stats");
    assert_eq!(stats["total"]["completed"], json!(20), "{stats}");
    assert_eq!(stats["total"]["running"], json!(30), "{stats}");
}

/// What `offload backup` cannot do, it says in one line with exit code 2,
/// and writes nothing.
#[test]
fn backup_refuses_what_it_cannot_copy_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let backup = |db: &str, destination: &std::path::Path| {
        Command::new(BIN)
            .args(["backup", "--db", db])
            .arg(destination)
            .output()
            .unwrap()
    };
    let refused = |output: &std::process::Output, needle: &str| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        assert!(stderr.contains(needle), "{stderr:?} should say {needle:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr:?}");
    };
    let destination = dir.path().join("copy.db");
    let missing = dir.path().join("missing.db");
    refused(
        &backup(&format!("sqlite://{}", missing.display()), &destination),
        "there is no database at",
    );
    assert!(!missing.exists(), "the backup created its source");
    refused(
        &backup("postgres://postgres@127.0.0.1:5432/test", &destination),
        "pg_dump",
    );
    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE notes (x)")
        .unwrap();
    refused(
        &backup(&format!("sqlite://{}", other.display()), &destination),
        "is not an Offload database",
    );
    assert!(!destination.exists());

    // A SQLite node in either pass of the suite.
    let source = format!("sqlite://{}", dir.path().join("offload.db").display());
    let server = Server::start_on(&source, dir.path(), &[]);
    server.http().enqueue(json!({"type": "t"}));
    std::fs::write(&destination, "kept").unwrap();
    refused(&backup(&source, &destination), "exists");
    assert_eq!(std::fs::read_to_string(&destination).unwrap(), "kept");
}

/// Started with a soft limit of 64 open files, a node takes its hard limit,
/// so that 150 idle connections (long polls, event streams) do not keep the
/// next client from being accepted.
#[test]
fn serve_takes_the_hard_open_files_limit() {
    let server = Server::start_through_shell(r#"ulimit -S -n 64 && exec "$0" "$@""#);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id()))
        .expect("the node's /proc limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a line of open files")
        .split_whitespace()
        .collect();
    let (soft, hard) = (open_files[3], open_files[4]);
    assert_eq!(soft, hard, "{limits}");
    let address = server.url.strip_prefix("http://").expect("an http URL");
    let idle: Vec<std::net::TcpStream> = (0..150)
        .map(|_| std::net::TcpStream::connect(address).expect("connect"))
        .collect();
    let answer = reqwest::blocking::Client::new()
        .post(format!("{}/v1/tasks", server.url))
        .body(r#"{"type": "t"}"#)
        .timeout(Duration::from_secs(10))
        .send()
        .expect("an answer beside 150 idle connections");
    assert_eq!(answer.status(), 201);
    drop(idle);
}

/// A node whose writes fail, as on a full disk (here its files may grow
/// no further), answers `/health` 503 with the cause while it still reads;
/// once they may grow again, `/health` finds it out with a write of its
/// own and answers ok, and writes go through. Before, `/health` answered
/// ok throughout, reading only.
#[test]
fn health_says_when_writes_fail_and_when_they_go_through_again() {
    if crate::support::on_postgres() {
        // The database server's disk, not this node's files.
        return;
    }
    // SIGXFSZ ignored, a write past the limit fails with EFBIG, as one on a
    // full disk fails with ENOSPC. The hard limit stays, to be raised to.
    let server = Server::start_through_shell(
        r#"trap '' XFSZ; exec prlimit --fsize=600000:unlimited -- "$0" "$@""#,
    );
    let http = server.http();
    let batch = json!({"tasks": vec![json!({"type": "fill", "payload": "y".repeat(200)}); 20]});
    let mut refused = None;
    for _ in 0..500 {
        let (status, answer) = http.post("/v1/tasks/batch", batch.clone());
        if status != 201 {
            refused = Some((status, answer));
            break;
        }
    }
    let (status, answer) = refused.expect("a write past the files' limit");
    assert_eq!(status, 503, "{answer}");
    // A refused batch leaves its frames' room in the log unused, and
    // `/health`'s own write, one page, may still fit there: it then goes
    // through, and rightly says so. Smaller writes fill that room until
    // `/health`'s fails too.
    let mut health = http.get("/health");
    for _ in 0..200 {
        if health.0 != 200 {
            break;
        }
        http.post("/v1/tasks", json!({"type": "fill"}));
        health = http.get("/health");
    }
    let (status, health) = health;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "unavailable");
    let cause = health["database"].as_str().unwrap();
    assert!(
        cause.starts_with("writes fail: storage unavailable"),
        "{cause}"
    );
    assert_eq!(http.get("/v1/stats").0, 200, "reads go on");

    let raised = Command::new("prlimit")
        .args([
            "--pid",
            &server.child.id().to_string(),
            "--fsize=unlimited:unlimited",
        ])
        .status()
        .expect("run prlimit");
    assert!(raised.success());
    let (status, health) = http.get("/health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["database"], "ok");
    http.enqueue(json!({"type": "after"}));
}

#[test]
fn sigterm_stops_gracefully_with_exit_code_0() {
    let mut server = Server::start();
    let http = server.http();
    http.enqueue(json!({"type": "t"}));
    // A long poll in flight must not hold the shutdown up.
    let url = server.url.clone();
    let poll = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .post(format!("{url}/v1/fetch"))
            .json(&json!({"worker_id": "w", "types": ["other"], "wait_ms": 60000}))
            .timeout(Duration::from_secs(90))
            .send()
            .map(|r| r.status().as_u16())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sigterm_and_wait(&mut server, "the server did not stop"),
        Some(0)
    );
    assert_eq!(
        poll.join().unwrap().ok(),
        Some(200),
        "the waiting fetch was answered"
    );
}

#[test]
fn sigterm_closes_connections_still_open_when_the_grace_runs_out() {
    let mut server = Server::start_configured("shutdown_grace_secs = 1\n");
    // An event stream whose client never reads: once the socket's buffers
    // are full, the server cannot finish writing it.
    let address = server.url.strip_prefix("http://").unwrap().to_owned();
    let mut stalled = std::net::TcpStream::connect(&address).unwrap();
    stalled
        .write_all(b"GET /v1/events HTTP/1.1\r\nHost: offload\r\n\r\n")
        .unwrap();
    let http = server.http();
    let payload = "x".repeat(1000);
    for _ in 0..15 {
        let tasks: Vec<_> = (0..1000)
            .map(|_| json!({"type": "t", "payload": payload}))
            .collect();
        let (status, _) = http.post("/v1/tasks/batch", json!({ "tasks": tasks }));
        assert_eq!(status, 201);
    }
    assert_eq!(
        sigterm_and_wait(
            &mut server,
            "a client that stopped reading held the shutdown open"
        ),
        Some(0)
    );
    drop(stalled);
}

#[test]
fn a_connection_that_goes_quiet_is_closed_after_the_idle_timeout() {
    use std::io::Read;
    let server = Server::start_configured("idle_timeout_secs = 1\n");
    let address = server.url.strip_prefix("http://").unwrap().to_owned();
    let open = |sent: &[u8]| {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        stream.write_all(sent).unwrap();
        // Far past the timeout, so that a node that never closes fails
        // the read rather than hangs the test.
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
    };
    // What the node answers before it closes, and how long it took.
    let read_until_closed = |mut stream: std::net::TcpStream| {
        let started = Instant::now();
        let mut answer = String::new();
        let closed = stream.read_to_string(&mut answer);
        assert!(closed.is_ok(), "not closed within 20 s: {closed:?}");
        (answer, started.elapsed())
    };

    let silent = open(b"");
    let head_cut_off = open(b"GET /health HTTP/1.1\r\nHost: offload\r\n");
    let body_cut_off = open(
        b"POST /v1/tasks HTTP/1.1\r\nHost: offload\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"type\": ",
    );
    let mut idle_after_an_answer = open(b"GET /health HTTP/1.1\r\nHost: offload\r\n\r\n");
    let mut first = [0; 15];
    idle_after_an_answer.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200 OK");

    for (what, stream) in [
        ("a connection that sent nothing", silent),
        ("a request whose head stopped", head_cut_off),
    ] {
        let (answer, took) = read_until_closed(stream);
        assert_eq!(answer, "", "{what}");
        assert!(
            took < Duration::from_secs(15),
            "{what}: closed after {took:?}"
        );
    }
    let (answer, _) = read_until_closed(body_cut_off);
    assert!(
        answer.starts_with("HTTP/1.1 408")
            && answer.contains(r#""code":"request_timeout""#)
            && answer.contains("the request body stopped arriving: no byte for 1 s"),
        "{answer}"
    );
    // A byte well inside each second, but far below the slowest rate a
    // body may arrive at once its first second has passed.
    let mut trickle = open(
        b"POST /v1/tasks HTTP/1.1\r\nHost: offload\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n",
    );
    let trickled = Instant::now();
    let mut answer = String::new();
    for byte in std::iter::repeat_n(b' ', 30) {
        if trickle.write_all(&[byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if trickled.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    assert!(trickle.read_to_string(&mut answer).is_ok(), "not closed");
    assert!(
        answer.starts_with("HTTP/1.1 408")
            && answer.contains(r#""code":"request_timeout""#)
            && answer.contains("the request body arrives too slowly"),
        "{answer}"
    );
    let (rest, _) = read_until_closed(idle_after_an_answer);
    assert!(rest.contains(r#""status":"ok""#), "{rest}");
    // The node still serves.
    let (status, _) = server.http().get("/health");
    assert_eq!(status, 200);
}

/// A client that asks for answers and reads none of them: each waits in
/// the node's memory (a page of a list is up to 8 MiB) until the
/// connection is closed, which it is once its writes have made no progress
/// for the idle timeout.
#[test]
fn a_client_that_reads_no_answer_is_closed_after_the_idle_timeout() {
    use std::io::Read;
    let server = Server::start_configured("idle_timeout_secs = 1\n");
    let http = server.http();
    enqueue_a_page_of_8_mb(&http);
    // Four pages of 8 MB asked for at once: more than the kernel's
    // buffers on both ends hold, so the node's writes stall.
    let address = server.url.strip_prefix("http://").unwrap().to_owned();
    let mut unread = std::net::TcpStream::connect(&address).unwrap();
    let ask = "GET /v1/tasks?limit=1000 HTTP/1.1\r\nHost: offload\r\n\r\n";
    unread.write_all(ask.repeat(4).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    unread
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut received = 0;
    let mut buffer = vec![0; 1 << 20];
    let ended = loop {
        match unread.read(&mut buffer) {
            Ok(0) => break "closed",
            Ok(n) => received += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Err(e) => panic!("not closed within 20 s of reading: {e}"),
        }
    };
    assert!(
        received < 16_000_000,
        "the node sent {received} bytes to a client that read nothing for 4 s, \
         then the connection {ended}"
    );
    let (status, _) = http.get("/health");
    assert_eq!(status, 200);
}

/// Large answers waiting for their clients hold memory up to
/// `unread_answers_limit_bytes`; past it a read is a 503 to retry, and
/// once the answer held is read, the same read is answered.
#[test]
fn large_answers_unread_are_bounded_by_the_budget() {
    use std::io::Read;
    let server = Server::start_configured("unread_answers_limit_bytes = 16777216\n");
    let http = server.http();
    enqueue_a_page_of_8_mb(&http);
    let mut unread = ask_for_a_page_and_read_nothing(&server);
    let (status, refused) = http.get("/v1/tasks?limit=1000");
    assert_eq!(
        status, 503,
        "a second page does not fit beside the first: {refused}"
    );
    assert_eq!(refused["error"]["code"], "unavailable");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("unread_answers_limit_bytes"), "{message}");
    let (status, small) = http.get("/v1/tasks?limit=5");
    assert_eq!(status, 200, "small answers go out as ever: {small}");
    let mut held = Vec::new();
    unread.read_to_end(&mut held).unwrap();
    assert!(held.len() > 8_000_000, "the page held came whole");
    let (status, page) = http.get("/v1/tasks?limit=1000");
    assert_eq!(status, 200, "{}", page["error"]);
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1000);
}

/// A failure that repeats with every request reaches the log a few times
/// a second, and the lines written account for every one.
#[test]
fn a_failure_repeated_by_every_request_is_logged_a_few_times_a_second() {
    let server = Server::start_configured("unread_answers_limit_bytes = 16777216\n");
    let http = server.http();
    enqueue_a_page_of_8_mb(&http);
    let _unread = ask_for_a_page_and_read_nothing(&server);
    let refusals = 100;
    for _ in 0..refusals {
        assert_eq!(http.get("/v1/tasks?limit=1000").0, 503);
    }
    // Past the second, one more: its line counts those left out before it.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(http.get("/v1/tasks?limit=1000").0, 503);
    let log = server.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request failed") && l.contains("status=503"))
        .collect();
    let not_logged: usize = lines
        .iter()
        .map(|line| {
            let (_, count) = line.rsplit_once("not_logged=").expect("a count");
            count.trim().parse::<usize>().expect("a number")
        })
        .sum();
    assert!(lines.len() < refusals, "{} lines: {log}", lines.len());
    assert_eq!(lines.len() + not_logged, refusals + 1, "{log}");
}

/// Asks for a page of `limit=1000` on a connection of its own that reads
/// nothing yet, and waits for the node to have built the answer.
fn ask_for_a_page_and_read_nothing(server: &Server) -> std::net::TcpStream {
    let address = server.url.strip_prefix("http://").unwrap().to_owned();
    let mut unread = std::net::TcpStream::connect(&address).unwrap();
    unread
        .write_all(
            b"GET /v1/tasks?limit=1000 HTTP/1.1\r\nHost: offload\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    unread
}

/// 1,000 tasks of 8,000-byte payloads: a page of `limit=1000` is 8.6 MB.
fn enqueue_a_page_of_8_mb(http: &Http) {
    let payload = "x".repeat(8000);
    let tasks: Vec<_> = (0..1000)
        .map(|_| json!({"type": "t", "payload": payload}))
        .collect();
    let (status, _) = http.post("/v1/tasks/batch", json!({ "tasks": tasks }));
    assert_eq!(status, 201);
}

/// Sends SIGTERM and waits, 30 s at most, for the node to exit; its code.
fn sigterm_and_wait(server: &mut Server, if_it_hangs: &str) -> Option<i32> {
    kill(Pid::from_raw(server.child.id() as i32), Signal::SIGTERM).unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status.code();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{if_it_hangs}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_refuses_bad_settings_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("x.db").display());
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let bad_listen = run(&["serve", "--listen", "nowhere", "--db", &db]);
    assert_eq!(bad_listen.status.code(), Some(2), "{bad_listen:?}");
    assert!(String::from_utf8_lossy(&bad_listen.stderr).contains("--listen"));
    let bad_durability = run(&[
        "serve",
        "--durability",
        "sometimes",
        "--db",
        &db,
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(bad_durability.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_durability.stderr).contains("durability"));
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nunknown_setting = 1\n").unwrap();
    let bad_config = run(&["serve", "--config", config.to_str().unwrap(), "--db", &db]);
    assert_eq!(bad_config.status.code(), Some(2), "{bad_config:?}");
    let message = String::from_utf8_lossy(&bad_config.stderr);
    assert!(
        message.contains("line 2, column 1: unknown field `unknown_setting`"),
        "{message}"
    );
    assert_eq!(message.trim().lines().count(), 1, "one line: {message}");
    let no_config = run(&["serve", "--config", "/nonexistent/offload.toml"]);
    assert_eq!(no_config.status.code(), Some(2), "{no_config:?}");
    let message = String::from_utf8_lossy(&no_config.stderr);
    assert_eq!(
        message.trim(),
        "offload: --config: cannot read /nonexistent/offload.toml: No such file or directory (os error 2)",
        "the cause once"
    );
    let other_database = run(&["serve", "--db", "mysql://localhost/tasks"]);
    assert_eq!(other_database.status.code(), Some(2), "{other_database:?}");
    assert!(String::from_utf8_lossy(&other_database.stderr).contains("db must be sqlite://PATH"));
}

/// A PostgreSQL that refuses connections is named with the reason, not
/// only as a pool's timeout. Port 1 of this machine refuses at once.
#[test]
fn serve_says_why_it_cannot_reach_postgresql() {
    let refused = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--db", "postgres://offload:s3cret@127.0.0.1:1/tasks"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("cannot connect to PostgreSQL at 127.0.0.1:1")
            && message.contains("Connection refused"),
        "{message}"
    );
    assert!(!message.contains("s3cret"), "{message}");
}

#[test]
fn a_second_node_on_the_same_sqlite_file_is_refused() {
    if crate::support::on_postgres() {
        return; // Several nodes on one PostgreSQL database is the point there.
    }
    let first = Server::start();
    let db = format!("sqlite://{}", first.dir.join("offload.db").display());
    let second = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--db", &db])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{second:?}"
    );
}

/// A node whose pool PostgreSQL has no room for says so at start, with
/// the figures to size by: past the room, requests fail 503 after waiting
/// for a connection.
#[test]
fn serve_warns_when_postgresql_has_no_room_for_its_connections() {
    if !crate::support::on_postgres() {
        return; // SQLite has no connections to run out of.
    }
    let server = Server::start_configured("db_pool_size = 1000");
    let log = server.log();
    assert!(
        log.contains("PostgreSQL has room for") && log.contains("db_pool_size 1000"),
        "{log}"
    );
    assert_eq!(server.http().get("/health").0, 200);
}

/// The `bench_*` schemas of the PostgreSQL database at `url`.
fn bench_schemas(url: &str) -> std::collections::BTreeSet<String> {
    use sqlx::Connection;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'bench\\_%'")
            .fetch_all(&mut conn)
            .await
            .expect("list schemas")
            .into_iter()
            .collect()
    })
}

#[test]
fn bench_runs_and_prints_every_key() {
    let mut command = Command::new(BIN);
    command.args(["bench", "--tasks", "2000", "--json"]);
    let pg_url =
        crate::support::on_postgres().then(|| std::env::var("OFFLOAD_TEST_PG_URL").unwrap());
    let schemas_before = pg_url.as_deref().map(bench_schemas);
    if let Some(url) = &pg_url {
        command.args(["--db", url, "--stored", "20000"]);
    }
    let output = command.env_remove("OFFLOAD_URL").output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for key in [
        "enqueue_single_per_sec",
        "enqueue_batch_per_sec",
        "process_http_per_sec",
        "process_embedded_per_sec",
        "claim_scaling",
        "server_rss_mb",
        "cores",
        "tasks",
    ] {
        assert!(
            report[key].as_f64().is_some_and(|v| v > 0.0),
            "{key} in {report}"
        );
    }
    assert!(
        report["pickup_ms"]["p50"].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
    assert!(
        report["pickup_ms"]["p99"].as_f64().is_some_and(|v| v > 0.0),
        "{report}"
    );
    let backend = if crate::support::on_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(report["backend"], backend);
    assert_eq!(report["durability"], "durable");
    assert_eq!(report["tasks"], 2000);
    // The run's schemas (three: served, in process, stored) are dropped.
    if let (Some(url), Some(before)) = (&pg_url, schemas_before) {
        let left: Vec<String> = bench_schemas(url).difference(&before).cloned().collect();
        assert!(left.is_empty(), "bench left {left:?}");
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            interrupted_bench_drops_its_schemas(url, &before, signal);
        }
    }
}

/// Against a running server the run leaves none of its tasks waiting
/// there for a worker: with the default `--stored` they would be over a
/// million.
#[test]
fn bench_against_a_server_runs_the_tasks_it_left_there() {
    let server = Server::start();
    let output = server.cli(&["bench", "--tasks", "200", "--stored", "10000", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (status, stats) = server.http().get("/v1/stats");
    assert_eq!(status, 200, "{stats}");
    for task_type in ["bench.noop", "bench.pickup"] {
        let counts = &stats["types"][task_type];
        for state in ["scheduled", "pending", "running"] {
            assert_eq!(counts[state], 0, "{task_type} {state}: {stats}");
        }
        assert!(
            counts["completed"].as_u64().is_some_and(|n| n > 0),
            "{task_type}: {stats}"
        );
    }
}

/// A run stopped half-way by `signal` (its first schema made, its server
/// busy) fails, stops the servers it started and drops what it made all
/// the same. Part of the test above: two runs at once would see each
/// other's schemas.
fn interrupted_bench_drops_its_schemas(
    url: &str,
    before: &std::collections::BTreeSet<String>,
    signal: Signal,
) {
    // Its errors go to a file, not a pipe: a server it left running would
    // hold a pipe open, and reading it to its end would never end.
    let errors = tempfile::NamedTempFile::new().unwrap();
    let mut bench = Command::new(BIN)
        .args(["bench", "--tasks", "20000", "--json", "--db", url])
        .env_remove("OFFLOAD_URL")
        .stdout(std::process::Stdio::null())
        .stderr(errors.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while bench_schemas(url).difference(before).next().is_none() {
        assert!(
            Instant::now() < deadline,
            "bench made no schema in a minute"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let made: Vec<String> = bench_schemas(url).difference(before).cloned().collect();
    kill(Pid::from_raw(bench.id() as i32), signal).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = bench.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = bench.kill();
            panic!("the bench did not end within a minute of {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(errors.path()).unwrap();
    assert!(
        !status.success(),
        "a run stopped by {signal} succeeded: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "{signal}: {stderr}");
    let left: Vec<String> = bench_schemas(url).difference(before).cloned().collect();
    assert!(
        left.is_empty(),
        "the bench stopped by {signal} left {left:?}"
    );
    // Its servers were given their schema in their environment; killed,
    // they may take a moment to go.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut running = processes_with_environment_naming(&made);
    while !running.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        running = processes_with_environment_naming(&made);
    }
    assert!(
        running.is_empty(),
        "the bench stopped by {signal} left its servers {running:?} running"
    );
}

/// The processes whose environment names any of `names`, from `/proc`.
fn processes_with_environment_naming(names: &[String]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let environment = std::fs::read(entry.path().join("environ")).ok()?;
            let environment = String::from_utf8_lossy(&environment);
            names
                .iter()
                .any(|name| environment.contains(name.as_str()))
                .then_some(pid)
        })
        .collect()
}
