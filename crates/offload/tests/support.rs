//! Starting servers and talking to them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_offload");

/// Whether this run of the suite uses PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("OFFLOAD_TEST_BACKEND").as_deref() == Ok("postgres")
}

/// The `--db` URL for the database that belongs to `dir`.
pub fn database_for(dir: &Path) -> String {
    if !on_postgres() {
        return format!("sqlite://{}", dir.join("offload.db").display());
    }
    let base = std::env::var("OFFLOAD_TEST_PG_URL")
        .expect("OFFLOAD_TEST_PG_URL with OFFLOAD_TEST_BACKEND=postgres");
    let name: String = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{base}?schema=bb_{name}_{}", std::process::id())
}

/// A running `offload serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    db: String,
    pub dir: PathBuf,
    log: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        let mut server = Self::start_in(&dir, extra);
        server._temp = Some(temp);
        server
    }

    /// Starts a server in a directory of its own with `settings` as its
    /// `offload.toml`.
    pub fn start_configured(settings: &str) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let config = temp.path().join("offload.toml");
        std::fs::write(&config, settings).expect("write offload.toml");
        let config = config.to_str().expect("a UTF-8 path").to_owned();
        let mut server = Self::start_in(temp.path(), &["--config", &config]);
        server._temp = Some(temp);
        server
    }

    /// Starts a server on the database of `dir`, on a free port: SQLite in
    /// `dir`, or with `OFFLOAD_TEST_BACKEND=postgres` a PostgreSQL schema
    /// named after `dir`.
    pub fn start_in(dir: &Path, extra: &[&str]) -> Self {
        Self::start_on(&database_for(dir), dir, extra)
    }

    /// Starts a server on database `db`, writing its log into `dir`.
    pub fn start_on(db: &str, dir: &Path, extra: &[&str]) -> Self {
        Self::start_listening("127.0.0.1:0", db, dir, extra)
    }

    /// Kills the node with `kill -9` and starts it again on the same
    /// address and database, as a crash and a restart would.
    pub fn restart(&mut self) {
        self.kill9();
        let address = self.url.strip_prefix("http://").expect("an http URL");
        let mut restarted = Self::start_listening(address, &self.db, &self.dir, &[]);
        // The dead process goes to `restarted`, whose drop reaps it.
        std::mem::swap(&mut self.child, &mut restarted.child);
        std::mem::swap(&mut self.log, &mut restarted.log);
    }

    /// Starts a server as [`Server::start`] does, through `sh -c SCRIPT`,
    /// where `exec "$0" "$@"` starts the server: for the limits a shell's
    /// `ulimit` sets.
    pub fn start_through_shell(script: &str) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new("/bin/sh");
        command.args(["-c", script, BIN]);
        let mut server = Self::spawn(
            command,
            "127.0.0.1:0",
            &database_for(temp.path()),
            temp.path(),
            &[],
        );
        server._temp = Some(temp);
        server
    }

    fn start_listening(listen: &str, db: &str, dir: &Path, extra: &[&str]) -> Self {
        Self::spawn(Command::new(BIN), listen, db, dir, extra)
    }

    fn spawn(mut command: Command, listen: &str, db: &str, dir: &Path, extra: &[&str]) -> Self {
        let log_name = format!("serve-{}.log", uuid::Uuid::now_v7().simple());
        let log_path = dir.join(log_name);
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut child = command
            .args(["serve", "--listen", listen, "--db", db])
            .args(extra)
            .env("OFFLOAD_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start offload serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines
            .next()
            .expect("a line from the server")
            .expect("readable");
        let url = first
            .strip_prefix("offload listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_owned();
        Self {
            child,
            url,
            db: db.to_owned(),
            dir: dir.to_path_buf(),
            log: log_path,
            _temp: None,
        }
    }

    /// What the node has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).expect("the node's log")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn http(&self) -> Http {
        Http {
            base: self.url.clone(),
            client: reqwest::blocking::Client::new(),
        }
    }

    /// Runs the command line against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("OFFLOAD_URL", &self.url)
            .output()
            .expect("run offload")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Http {
    pub base: String,
    pub client: reqwest::blocking::Client,
}

impl Http {
    fn answer(response: reqwest::blocking::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        let text = response.text().expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        Self::answer(
            self.client
                .get(format!("{}{path}", self.base))
                .send()
                .expect("GET"),
        )
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        Self::answer(
            self.client
                .post(format!("{}{path}", self.base))
                .json(&body)
                .send()
                .expect("POST"),
        )
    }

    pub fn post_raw(&self, path: &str, body: impl Into<reqwest::blocking::Body>) -> (u16, Value) {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        Self::answer(request.send().expect("POST"))
    }

    pub fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        Self::answer(
            self.client
                .patch(format!("{}{path}", self.base))
                .json(&body)
                .send()
                .expect("PATCH"),
        )
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        Self::answer(
            self.client
                .delete(format!("{}{path}", self.base))
                .send()
                .expect("DELETE"),
        )
    }

    /// Enqueues and returns the created task.
    pub fn enqueue(&self, body: Value) -> Value {
        let (status, task) = self.post("/v1/tasks", body);
        assert_eq!(status, 201, "{task}");
        task
    }

    pub fn fetch(&self, worker: &str, extra: Value) -> Vec<Value> {
        let mut body = json!({ "worker_id": worker });
        if let Value::Object(more) = extra {
            body.as_object_mut().expect("object").extend(more);
        }
        let (status, answer) = self.post("/v1/fetch", body);
        assert_eq!(status, 200, "{answer}");
        answer["tasks"].as_array().expect("tasks").clone()
    }

    pub fn task(&self, id: &str) -> Value {
        let (status, task) = self.get(&format!("/v1/tasks/{id}"));
        assert_eq!(status, 200, "{task}");
        task
    }

    /// Waits until the task satisfies `done`; a bound, not a timing assertion.
    pub fn wait_for(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let task = self.task(id);
            if done(&task) {
                return task;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "task never became {what}: {task}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Asserts an error answer: its status and code, and that the message
/// mentions `needle` (the field, typically).
pub fn assert_error(answer: (u16, Value), status: u16, code: &str, needle: &str) {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains(needle),
        "message {message:?} should mention {needle:?}"
    );
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
