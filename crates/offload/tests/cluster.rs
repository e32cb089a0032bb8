//! Several nodes on one PostgreSQL database, and PostgreSQL going away
//! under a running node. These run in the PostgreSQL pass of the suite.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{BIN, Http, Server, on_postgres};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn work(server: &Server, log: &Path) -> Killed {
    let script = format!(
        "echo \"$OFFLOAD_TASK_ID $OFFLOAD_ATTEMPT\" >> {}; sleep 0.05",
        log.display()
    );
    let child = Command::new(BIN)
        .args([
            "work",
            "--type",
            "job",
            "--concurrency",
            "4",
            "--lease",
            "3",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("OFFLOAD_URL", &server.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Killed(child)
}

fn completed(http: &Http) -> u64 {
    http.get("/v1/stats").1["total"]["completed"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn three_nodes_finish_every_task_when_one_is_killed() {
    if !on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = crate::support::database_for(dir.path());
    let mut nodes: Vec<Server> = (0..3)
        .map(|_| Server::start_on(&db, dir.path(), &[]))
        .collect();
    let runs = dir.path().join("runs.log");
    let _workers: Vec<Killed> = nodes.iter().map(|n| work(n, &runs)).collect();

    let http = nodes[0].http();
    let tasks: Vec<Value> = (0..300)
        .map(|i| json!({"type": "job", "payload": i, "max_attempts": 10}))
        .collect();
    let (status, answer) = http.post("/v1/tasks/batch", json!({ "tasks": tasks }));
    assert_eq!(status, 201, "{answer}");

    // Kill a node mid-run, with work in flight on it.
    let started = Instant::now();
    while completed(&http) < 60 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[1].kill9();

    let started = Instant::now();
    while completed(&http) < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of 300 completed after the kill",
            completed(&http)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every run of every task was a distinct attempt, and every attempt but
    // the last ended because its lease expired.
    let log = std::fs::read_to_string(&runs).unwrap();
    let mut attempts: HashMap<String, Vec<u64>> = HashMap::new();
    for line in log.lines() {
        let (id, attempt) = line.split_once(' ').unwrap();
        attempts
            .entry(id.to_owned())
            .or_default()
            .push(attempt.parse().unwrap());
    }
    assert_eq!(attempts.len(), 300, "every task ran");
    let mut rerun = 0;
    for (id, mut seen) in attempts {
        seen.sort_unstable();
        let before = seen.len();
        seen.dedup();
        assert_eq!(
            seen.len(),
            before,
            "task {id} ran twice in one attempt: {seen:?}"
        );
        let task = http.task(&id);
        assert_eq!(task["state"], "completed");
        assert_eq!(task["attempt"].as_u64(), seen.last().copied());
        for error in task["errors"].as_array().unwrap() {
            assert_eq!(error["kind"], "lease_expired", "task {id}: {error}");
        }
        if seen.len() > 1 {
            rerun += 1;
        }
    }
    eprintln!(
        "three nodes, one killed: 300 tasks completed, {rerun} ran again after their lease expired"
    );
}

/// A throwaway PostgreSQL cluster that this test may stop and start.
struct Cluster {
    bin: String,
    data: String,
    port: u16,
    _dir: tempfile::TempDir,
}

fn as_postgres(bin: &str, tool: &str, args: &[&str]) -> std::process::Output {
    let path = format!("{bin}/{tool}");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    // initdb and pg_ctl refuse to run as root.
    let mut command = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(&path)
    };
    command.args(args).output().unwrap()
}

impl Cluster {
    fn start() -> Option<Self> {
        let bin = std::env::var("OFFLOAD_TEST_PG_BIN").ok()?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let data = dir.path().join("data").display().to_string();
        let init = as_postgres(
            &bin,
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres"],
        );
        assert!(init.status.success(), "initdb: {init:?}");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            bin,
            data,
            port,
            _dir: dir,
        };
        cluster.up();
        Some(cluster)
    }

    fn up(&self) {
        let options = format!("-p {} -k /tmp -c listen_addresses=127.0.0.1", self.port);
        let log = format!("{}/../log", self.data);
        let started = as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data, "-l", &log, "-w", "-o", &options, "start"],
        );
        assert!(started.status.success(), "pg_ctl start: {started:?}");
    }

    fn down(&self) {
        let stopped = as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data, "-m", "fast", "-w", "stop"],
        );
        assert!(stopped.status.success(), "pg_ctl stop: {stopped:?}");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &self.data, "-m", "immediate", "stop"],
        );
    }
}

#[test]
fn a_node_rides_out_a_postgresql_restart() {
    if !on_postgres() {
        return;
    }
    let Some(cluster) = Cluster::start() else {
        eprintln!("skipped: OFFLOAD_TEST_PG_BIN (initdb, pg_ctl) is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_on(&cluster.url(), dir.path(), &[]);
    let http = server.http();
    let before = http.enqueue(json!({"type": "t"}));

    cluster.down();
    // While the database is away: 503 unavailable, never a crash.
    let (status, body) = http.post("/v1/tasks", json!({"type": "t"}));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(http.get("/health").0, 503);
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the node is still running"
    );

    cluster.up();
    // It reconnects by itself.
    let started = Instant::now();
    loop {
        let (status, _) = http.post("/v1/tasks", json!({"type": "t"}));
        if status == 201 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the node never reconnected (last status {status})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http.get("/health").0, 200);
    assert_eq!(
        http.task(before["id"].as_str().unwrap())["state"],
        "pending"
    );
    // Long polls wake again too: the listener reconnected.
    let claimed = http.fetch("w", json!({"wait_ms": 5000, "limit": 10}));
    assert_eq!(claimed.len(), 2);
    server.kill9();
}
