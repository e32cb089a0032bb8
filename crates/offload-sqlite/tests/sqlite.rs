//! The SQLite store against the conformance suite and property test, plus
//! what only this backend can show: reopening, the process lock, durability
//! settings, and a crash test that `kill -9`s a real process mid-write.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use offload_core::{
    Ack, ClaimRequest, Error, Limits, ManualClock, NewTask, Position, State, Store,
};
use offload_sqlite::{Durability, SqliteOptions, SqliteStore};
use offload_storetest::StoreFactory;
use uuid::Uuid;

/// Fresh databases in one temporary directory.
struct TempStores {
    dir: tempfile::TempDir,
    next: AtomicUsize,
    durability: Durability,
}

impl TempStores {
    fn new(durability: Durability) -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            next: AtomicUsize::new(0),
            durability,
        }
    }
}

#[async_trait::async_trait]
impl StoreFactory for TempStores {
    async fn open(&self, clock: Arc<ManualClock>) -> Arc<dyn Store> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("store-{n}.db"));
        let options = SqliteOptions {
            durability: self.durability,
            clock,
            ..SqliteOptions::default()
        };
        Arc::new(SqliteStore::open(path, options).expect("open store"))
    }
}

// Durable, the default: its answers and effects go out after the WAL sync
// (`wal_sync.rs`), and the suite holds that path to every rule.
offload_storetest::conformance_tests!(crate::TempStores::new(offload_sqlite::Durability::Durable));

#[test]
fn property_invariants_hold() {
    let cases = std::env::var("OFFLOAD_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    // Relaxed: the rules hold alike, and hundreds of cases need no fsyncs.
    offload_storetest::property::check_invariants(
        Arc::new(TempStores::new(Durability::Relaxed)),
        cases,
    );
}

/// Each statement that must scale reaches `tasks` through an index: a plan
/// that scans the table would make background duties and claims cost
/// O(stored tasks) (the retention pass once did, every second).
#[tokio::test]
async fn hot_statements_never_scan_the_tasks_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    store
        .enqueue(vec![
            NewTask::new("t")
                .validate(&Limits::default(), Position::Alone)
                .unwrap(),
        ])
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    for (name, sql) in offload_sqlite::sql::PLANNED {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let params = vec![0i64; stmt.parameter_count()];
        let plan: Vec<String> = stmt
            .query_map(rusqlite::params_from_iter(params), |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !plan.iter().any(|step| step == "SCAN tasks"),
            "{name} scans the whole tasks table: {plan:?}"
        );
        assert!(
            plan.iter().any(|step| step.contains("USING")),
            "{name} uses no index: {plan:?}"
        );
    }
}

/// A list of a rare label walks that label's entries in `task_labels` in
/// seq order and reads each task by its seq, whatever else it filters on:
/// no sort of what it found, no other way into `tasks` or `task_payloads`.
#[tokio::test]
async fn a_rare_labels_list_walks_the_label_index_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let _store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let statement = format!(
        "EXPLAIN QUERY PLAN {} AND task_labels.task_seq < ?2 AND state IN (4, 5) \
         AND owner = ?3 AND type = ?4 ORDER BY task_labels.task_seq DESC LIMIT 51",
        offload_sqlite::sql::LIST_BY_LABEL
    );
    let plan: Vec<String> = conn
        .prepare(&statement)
        .unwrap()
        .query_map(rusqlite::params!["p:rare", 100, "o", "t"], |r| r.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        plan,
        [
            "SEARCH task_labels USING PRIMARY KEY (label=? AND task_seq<?)",
            "SEARCH tasks USING INTEGER PRIMARY KEY (rowid=?)",
            // A payload kept apart, read by its task's seq.
            "CORRELATED SCALAR SUBQUERY 1",
            "SEARCH task_payloads USING INTEGER PRIMARY KEY (rowid=?)",
        ],
        "{statement}"
    );
}

/// Labelled tasks stored before schema version 8 are listed by label once
/// it is applied, and a task's entries in `task_labels` go with it,
/// whichever statement deletes it (a task's delete, a clear of finished
/// tasks).
#[tokio::test]
async fn task_labels_follow_tasks_from_before_version_8_to_their_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let labelled = |labels: &[(&str, &str)]| {
        labels
            .iter()
            .fold(NewTask::new("t"), |task, (k, v)| task.label(*k, *v))
            .validate(&Limits::default(), Position::Alone)
            .unwrap()
    };
    let mut specs: Vec<_> = (0..3).map(|_| labelled(&[("p", "rare")])).collect();
    specs.push(labelled(&[("p", "rare"), ("team", "a: b")]));
    specs.extend((0..2).map(|_| labelled(&[])));
    let stored: Vec<Uuid> = {
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let stored = store.enqueue(specs).await.unwrap();
        stored.iter().map(|(task, _)| task.id).collect()
    };
    let conn = rusqlite::Connection::open(&path).unwrap();
    // The database as version 7 left it: no label entries (and no table of
    // payloads kept apart, version 9's, which these small ones never
    // reach).
    conn.execute_batch(
        "DROP TRIGGER task_payloads_removed; DROP TABLE task_payloads; \
         DROP TRIGGER task_labels_removed; DROP TABLE task_labels; \
         PRAGMA user_version = 7;",
    )
    .unwrap();
    let entries = || -> i64 {
        conn.query_row("SELECT count(*) FROM task_labels", [], |r| r.get(0))
            .unwrap()
    };
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(entries(), 5, "one entry for each label of each task");
    let listed = |key: &str, value: &str| {
        listed_ids(
            &store,
            offload_core::ListQuery {
                labels: vec![(key.to_owned(), value.to_owned())],
                limit: 10,
                ..Default::default()
            },
        )
    };
    let rare: Vec<Uuid> = stored[..4].iter().rev().copied().collect();
    assert_eq!(listed("p", "rare").await, rare, "newest first");
    assert_eq!(listed("team", "a: b").await, [stored[3]]);
    assert!(
        listed("team", "a").await.is_empty(),
        "a label is matched whole"
    );
    let claimed = store.claim(&up_to_ten_for_w()).await.unwrap();
    assert_eq!(claimed.len(), 6);
    store
        .ack("w", offload_storetest::completions(&claimed))
        .await
        .unwrap();
    store.delete(stored[3]).await.unwrap();
    assert_eq!(entries(), 3, "the deleted task's two entries went with it");
    let clear = offload_core::ClearRequest {
        states: vec![State::Completed],
        older_than: None,
    };
    assert_eq!(store.clear(&clear).await.unwrap(), 5);
    assert_eq!(entries(), 0, "the cleared tasks' entries went with them");
}

/// A payload longer than the bound is written once to `task_payloads` and
/// its row holds '' (schema version 9); one of the bound's length stays in
/// its row. Every read gives each payload back whole, from the table after
/// a reopen (the writer's memory empty), acks leave the entries be, and an
/// entry goes with its task, whichever statement deletes it.
#[tokio::test]
async fn payloads_past_the_inline_bound_are_kept_apart_and_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let bound = offload_sqlite::sql::INLINE_PAYLOAD_BYTES;
    // `{"b":"…"}` is 8 bytes besides the text.
    let payload = |bytes: usize| {
        let text =
            serde_json::to_string(&serde_json::json!({ "b": "y".repeat(bytes - 8) })).unwrap();
        assert_eq!(text.len(), bytes);
        text
    };
    let plain = |bytes: usize| {
        NewTask::new("t")
            .payload(&serde_json::from_str::<serde_json::Value>(&payload(bytes)).unwrap())
            .unwrap()
    };
    let specs = vec![
        plain(9),
        plain(bound),
        plain(bound + 1),
        plain(100_000),
        // A unique key takes the writer's one-row insert.
        plain(2 * bound).unique_key("k", offload_core::OnConflict::Keep),
    ];
    let sizes = [9, bound, bound + 1, 100_000, 2 * bound];
    let specs: Vec<_> = specs
        .into_iter()
        .map(|t| t.validate(&Limits::default(), Position::Alone).unwrap())
        .collect();
    let ids: Vec<Uuid> = {
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let stored = store.enqueue(specs).await.unwrap();
        stored.iter().map(|(task, _)| task.id).collect()
    };
    let wanted = |id: Uuid| payload(sizes[ids.iter().position(|i| *i == id).unwrap()]);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let apart = || -> (i64, i64) {
        conn.query_row(
            "SELECT (SELECT count(*) FROM tasks WHERE payload = ''), \
                    (SELECT count(*) FROM task_payloads)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    assert_eq!(apart(), (3, 3), "the three payloads past the bound, apart");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    for &id in &ids {
        let task = store.get(id).await.unwrap().unwrap();
        assert_eq!(task.payload.get(), wanted(id), "read by id");
    }
    let listed = store
        .list(&offload_core::ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.tasks.len(), 5);
    for task in &listed.tasks {
        assert_eq!(task.payload.get(), wanted(task.id), "listed");
    }
    let claimed = store.claim(&up_to_ten_for_w()).await.unwrap();
    assert_eq!(claimed.len(), 5);
    for task in &claimed {
        assert_eq!(task.payload.get(), wanted(task.id), "claimed");
    }
    store
        .ack("w", offload_storetest::completions(&claimed))
        .await
        .unwrap();
    for &id in &ids {
        let task = store.get(id).await.unwrap().unwrap();
        assert_eq!(task.state, State::Completed);
        assert_eq!(task.payload.get(), wanted(id), "read once completed");
    }
    assert_eq!(apart(), (3, 3), "an ack leaves the payloads apart be");
    store.delete(ids[3]).await.unwrap();
    assert_eq!(apart(), (2, 2), "the deleted task's payload went with it");
    let clear = offload_core::ClearRequest {
        states: vec![State::Completed],
        older_than: None,
    };
    assert_eq!(store.clear(&clear).await.unwrap(), 4);
    assert_eq!(
        apart(),
        (0, 0),
        "the cleared tasks' payloads went with them"
    );
}

/// Tasks, counts and what the writer keeps in memory (`src/ready.rs`,
/// `src/running.rs`) outlive a reopen: the pending and the running task are
/// listed, the running one counts against its queue's concurrency and is
/// recovered when its lease runs out.
#[tokio::test]
async fn reopening_keeps_tasks_counts_and_running_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let clock = Arc::new(ManualClock::new(offload_core::Timestamp::from_millis(
        1_795_000_000_000,
    )));
    let options = || SqliteOptions {
        clock: Arc::clone(&clock) as Arc<dyn offload_core::Clock>,
        ..SqliteOptions::default()
    };
    let (claimed, waiting) = {
        let store = SqliteStore::open(&path, options()).unwrap();
        let spec = NewTask::new("t")
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        let stored = store.enqueue(vec![spec.clone(), spec]).await.unwrap();
        let elsewhere = NewTask::new("u")
            .queue("other")
            .delay(Duration::from_secs(3600))
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        store.enqueue(vec![elsewhere]).await.unwrap();
        let claimed = store.claim(&up_to_one_for_w()).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, stored[0].0.id, "the oldest first");
        (claimed[0].id, stored[1].0.id)
    };
    let store = SqliteStore::open(&path, options()).unwrap();
    assert_eq!(store.get(claimed).await.unwrap().unwrap().id, claimed);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.total.running, stats.total.pending), (1, 1));
    assert_eq!(
        (
            stats.queues["default"].total(),
            stats.queues["other"].scheduled
        ),
        (2, 1),
        "counted by queue and state again at open"
    );
    let listed = |state: State| {
        listed_ids(
            &store,
            offload_core::ListQuery {
                states: vec![state],
                limit: 10,
                ..Default::default()
            },
        )
    };
    assert_eq!(listed(State::Running).await, [claimed]);
    assert_eq!(listed(State::Pending).await, [waiting]);
    let one_at_a_time = offload_core::QueuePatch {
        concurrency: Some(Some(1)),
        ..Default::default()
    };
    store.update_queue("default", one_at_a_time).await.unwrap();
    assert!(
        store.claim(&up_to_one_for_w()).await.unwrap().is_empty(),
        "the running task fills the queue's one slot"
    );
    clock.advance(Duration::from_secs(31));
    assert_eq!(store.count_stuck(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(store.recover_expired().await.unwrap().len(), 1);
    assert_eq!(
        store.get(claimed).await.unwrap().unwrap().state,
        State::Scheduled,
        "to be retried after its backoff"
    );
    assert_eq!(store.count_stuck(Duration::ZERO).await.unwrap(), 0);
}

/// A database file removed or replaced under a running node: SQLite in WAL
/// mode goes on committing to the unlinked file, so every write answered
/// after it would be gone at the next start. The store stops writing and
/// `/health` (which reads `count_stuck` as the database's check, where the
/// counts in memory alone would go on saying all is well) says why, both
/// until a restart; `/health` looks at once, the writer once a second.
#[tokio::test]
async fn a_database_file_removed_or_replaced_under_the_store_stops_its_writes() {
    let task = |task_type: &str| {
        NewTask::new(task_type)
            .validate(&Limits::default(), Position::Alone)
            .unwrap()
    };
    let is_stopped = |err: &Error| matches!(err, Error::Storage(m) if m.contains("was removed or replaced") && m.contains("offload.db"));
    for (replaced, health_first) in [(false, true), (true, true), (false, false)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        store.enqueue(vec![task("before")]).await.unwrap();
        assert_eq!(store.count_stuck(Duration::ZERO).await.unwrap(), 0);
        for suffix in ["", "-wal", "-shm"] {
            let file = format!("{}{suffix}", path.display());
            let _ = std::fs::remove_file(&file);
            if replaced {
                std::fs::write(&file, b"").unwrap();
            }
        }
        if health_first {
            let err = store.count_stuck(Duration::ZERO).await.unwrap_err();
            assert!(is_stopped(&err), "replaced: {replaced}: {err}");
        } else {
            // Past the writer's interval, its own check finds it first.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let refused = store.enqueue(vec![task("after")]).await;
        assert!(refused.is_err(), "replaced: {replaced}: {refused:?}");
        let err = store.count_stuck(Duration::ZERO).await.unwrap_err();
        assert!(is_stopped(&err), "replaced: {replaced}: {err}");
    }
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let first = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let second = SqliteStore::open(&path, SqliteOptions::default());
    assert!(
        matches!(second, Err(Error::Unavailable(ref m)) if m.contains("in use")),
        "{second:?}"
    );
    first.close();
    drop(first);
    SqliteStore::open(&path, SqliteOptions::default()).expect("the lock is released on close");
}

/// Durable mode syncs every commit before answering: a write alone with
/// SQLite's own fsync (`synchronous = FULL` while it commits), writes
/// committed together through the store's WAL sync. Relaxed mode does
/// neither.
#[tokio::test]
async fn durable_mode_syncs_every_commit_before_answering() {
    let dir = tempfile::tempdir().unwrap();
    let spec = || {
        NewTask::new("sync")
            .validate(&Limits::default(), Position::Alone)
            .unwrap()
    };
    let durable =
        Arc::new(SqliteStore::open(dir.path().join("a.db"), SqliteOptions::default()).unwrap());
    assert_eq!(durable.synchronous_mode().await.unwrap(), 2, "a lone write");
    // Writers at once, so that commits are grouped.
    let writers: Vec<_> = (0..16)
        .map(|_| {
            let store = Arc::clone(&durable);
            tokio::spawn(async move {
                for _ in 0..50 {
                    store.enqueue(vec![spec()]).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(
        durable.wal_syncs() > 0,
        "no grouped commit was synced by the store"
    );
    // Back from grouped commits to one alone: the switch is made again,
    // not remembered (SQLite applies it when the PRAGMA is prepared). The
    // syncer counts its last group done just after answering that group's
    // callers, so the first write after may still find it busy and be
    // handed over; a bound, not a timing assertion.
    let mut mode = 0;
    for _ in 0..1000 {
        mode = durable.synchronous_mode().await.unwrap();
        if mode == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(mode, 2, "a lone write after grouped ones");

    let relaxed = SqliteStore::open(
        dir.path().join("b.db"),
        SqliteOptions {
            durability: Durability::Relaxed,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    assert_eq!(relaxed.synchronous_mode().await.unwrap(), 1);
    relaxed.enqueue(vec![spec()]).await.unwrap();
    assert_eq!(relaxed.wal_syncs(), 0);
}

// ---- crash test -------------------------------------------------------------

const CHILD_ENV: &str = "OFFLOAD_CRASH_CHILD_DB";

/// The parent half: runs this same test binary as a child that writes as
/// fast as it can and prints each write it got acknowledged, kills it with
/// SIGKILL mid-stream, reopens the database and finds every acknowledged
/// write. The child half runs when `OFFLOAD_CRASH_CHILD_DB` is set.
#[test]
fn crash_keeps_every_acknowledged_write() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        crash_child(&path);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_keeps_every_acknowledged_write",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().unwrap();
    let mut enqueued = Vec::new();
    let mut completed = Vec::new();
    // Each claim answered: the task, its worker and its lease's end.
    let mut claimed = std::collections::HashMap::new();
    let started = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(id) = line.strip_prefix("enqueued ") {
            enqueued.push(Uuid::parse_str(id).unwrap());
        } else if let Some(id) = line.strip_prefix("completed ") {
            completed.push(Uuid::parse_str(id).unwrap());
        } else if let Some(claim) = line.strip_prefix("claimed ") {
            let mut fields = claim.split(' ');
            let id = Uuid::parse_str(fields.next().unwrap()).unwrap();
            let worker = fields.next().unwrap().to_owned();
            let lease: i64 = fields.next().unwrap().parse().unwrap();
            claimed.insert(id, (worker, lease));
        }
        // Kill in the middle of the stream, once there is plenty to check.
        let held = claimed.values().any(|(worker, _)| worker == HOLDER);
        if (completed.len() >= 300 && held) || started.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    // SIGKILL: no destructor, no flush, no clean close.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        completed.len() >= 300,
        "the child made too little progress: {} completions",
        completed.len()
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store =
            SqliteStore::open(&path, SqliteOptions::default()).expect("reopen after the crash");
        for id in &enqueued {
            assert!(
                store.get(*id).await.unwrap().is_some(),
                "acknowledged enqueue {id} was lost"
            );
        }
        for id in &completed {
            let task = store.get(*id).await.unwrap().unwrap();
            assert_eq!(
                task.state,
                State::Completed,
                "acknowledged completion of {id} was lost"
            );
        }
        // A claim is a write too: a task claimed and not completed is
        // still held by its worker until its lease ends, whether its claim
        // was written to its row before the crash or not.
        let mut held = 0;
        for (id, (worker, lease)) in &claimed {
            let task = store.get(*id).await.unwrap().unwrap();
            if task.state == State::Completed {
                continue;
            }
            assert_eq!(task.state, State::Running, "acknowledged claim of {id} was lost");
            assert_eq!(task.worker_id.as_deref(), Some(worker.as_str()));
            assert_eq!(task.lease_expires_at.map(|t| t.as_millis()), Some(*lease));
            held += 1;
        }
        assert!(held > 0, "no claim was outstanding at the crash");
        assert!(
            claimed
                .iter()
                .filter(|(_, (worker, _))| worker == HOLDER)
                .all(|(id, _)| !completed.contains(id)),
            "the holder's tasks are never completed"
        );
        store.verify_bookkeeping().await.unwrap();
        let stats = store.stats().await.unwrap();
        assert!(stats.total.total() >= enqueued.len() as u64);
        eprintln!(
            "crash test: {} enqueues, {} completions and {} claims ({held} still held) survived kill -9",
            enqueued.len(),
            completed.len(),
            claimed.len()
        );
    });
}

/// The crash test's worker that claims and never acks.
const HOLDER: &str = "w0";

fn crash_child(path: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Arc::new(SqliteStore::open(path, SqliteOptions::default()).unwrap());
        let (lines, mut printer) = tokio::sync::mpsc::unbounded_channel::<String>();
        // Several producers and consumers at once, so commits are grouped.
        for _ in 0..4 {
            let store = Arc::clone(&store);
            let lines = lines.clone();
            tokio::spawn(async move {
                loop {
                    let spec = NewTask::new("crash")
                        .validate(&Limits::default(), Position::Alone)
                        .unwrap();
                    let answers = store.enqueue(vec![spec]).await.unwrap();
                    let _ = lines.send(format!("enqueued {}", answers[0].0.id));
                }
            });
        }
        for w in 0..4 {
            let store = Arc::clone(&store);
            let lines = lines.clone();
            tokio::spawn(async move {
                let worker_id = format!("w{w}");
                debug_assert_eq!(w == 0, worker_id == HOLDER);
                loop {
                    let claimed = store
                        .claim(&ClaimRequest {
                            worker_id: worker_id.clone(),
                            types: vec![],
                            queues: vec![],
                            limit: 8,
                            lease: Duration::from_secs(60),
                        })
                        .await
                        .unwrap();
                    if claimed.is_empty() {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    for task in &claimed {
                        let lease = task.lease_expires_at.unwrap().as_millis();
                        let _ = lines.send(format!("claimed {} {worker_id} {lease}", task.id));
                    }
                    // The first worker never acks: its claims are
                    // outstanding when the kill comes.
                    if w == 0 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let acks = offload_storetest::completions(&claimed);
                    let outcomes = store.ack(&worker_id, acks).await.unwrap();
                    for outcome in outcomes {
                        let _ = lines.send(format!("completed {}", outcome.unwrap().id));
                    }
                }
            });
        }
        drop(lines);
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        while let Some(line) = printer.recv().await {
            // Printed only after the store answered, i.e. after the commit.
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
}

/// A database of schema version 3, whose ids do not carry their seq, opens
/// at version 4 and its tasks are found by id by every path: a read, an
/// acknowledgement after a restart (no claim in memory), a dependency.
#[tokio::test]
async fn tasks_stored_before_ids_carried_their_seq_are_still_found_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let old_ids = [Uuid::now_v7(), Uuid::now_v7()];
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        for sql in [
            include_str!("../migrations/0001_init.sql"),
            include_str!("../migrations/0002_fewer_index_writes.sql"),
            include_str!("../migrations/0003_ready_in_memory.sql"),
        ] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "PRAGMA user_version = 3; \
             INSERT INTO queues (name, created_at) VALUES ('default', 1795000000000);",
        )
        .unwrap();
        for id in old_ids {
            conn.execute(
                "INSERT INTO tasks (id, type, queue, payload, priority, state, attempt, \
                 max_attempts, timeout_secs, run_at, cancel_requested, created_at, updated_at) \
                 VALUES (?1, 'old', 'default', '{}', 0, 2, 0, 3, 60, 1795000000000, 0, \
                 1795000000000, 1795000000000)",
                [id.as_bytes().as_slice()],
            )
            .unwrap();
        }
    }
    let claim = up_to_ten_for_w();
    let dependent = {
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(store.get(old_ids[0]).await.unwrap().unwrap().id, old_ids[0]);
        let claimed: Vec<Uuid> = store
            .claim(&claim)
            .await
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(claimed, old_ids, "claimed in their old order");
        let spec = NewTask::new("new")
            .depends_on(old_ids[0])
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        let (task, _) = store.enqueue(vec![spec]).await.unwrap().remove(0);
        assert_eq!(task.state, State::Blocked);
        task.id
    };
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let outcomes = store
        .ack(
            "w",
            vec![Ack::Complete {
                id: old_ids[0],
                result: None,
            }],
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(
        store.get(old_ids[0]).await.unwrap().unwrap().state,
        State::Completed
    );
    let dependent = store.get(dependent).await.unwrap().unwrap();
    assert_eq!(
        dependent.state,
        State::Pending,
        "unblocked by its old dependency"
    );
    let page = store
        .list(&offload_core::ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed: Vec<Uuid> = page.tasks.iter().map(|t| t.id).collect();
    assert_eq!(
        listed,
        [dependent.id, old_ids[1], old_ids[0]],
        "newest first"
    );
    assert!(store.get(Uuid::now_v7()).await.unwrap().is_none());
}

/// A database written before completed dependencies' rows left
/// `task_deps` when they completed still holds such rows for tasks blocked
/// then; those tasks are unblocked when their last dependency completes.
#[tokio::test]
async fn rows_of_dependencies_completed_under_an_earlier_version_do_not_hold_a_dependent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let (first, second, dependent) = {
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let (first, second, child) = offload_storetest::a_child_of_two(&store).await;
        let claimed = store.claim(&up_to_one_for_w()).await.unwrap();
        assert_eq!(claimed[0].id, first.id);
        offload_storetest::complete(&store, "w", first.id).await;
        (first.id, second.id, child.id)
    };
    {
        // What an earlier version left: the completed dependency's row.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let dependent_seq = offload_core::seq_carried_by(dependent);
        conn.execute(
            "INSERT INTO task_deps (dep_id, task_seq) VALUES (?1, ?2)",
            rusqlite::params![first.as_bytes().as_slice(), dependent_seq],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(
        store.get(dependent).await.unwrap().unwrap().state,
        State::Blocked
    );
    let claimed = store.claim(&up_to_one_for_w()).await.unwrap();
    assert_eq!(claimed[0].id, second);
    offload_storetest::complete(&store, "w", second).await;
    assert_eq!(
        store.get(dependent).await.unwrap().unwrap().state,
        State::Pending,
        "unblocked once its last dependency completed"
    );
}

/// A claim by worker `w` of one task of any type and queue.
fn up_to_one_for_w() -> ClaimRequest {
    ClaimRequest {
        limit: 1,
        ..up_to_ten_for_w()
    }
}

/// A claim by worker `w` of up to ten tasks of any type and queue.
/// The ids of the first page of `query`, in the order listed.
async fn listed_ids(store: &SqliteStore, query: offload_core::ListQuery) -> Vec<Uuid> {
    let page = store.list(&query).await.unwrap();
    page.tasks.iter().map(|t| t.id).collect()
}

fn up_to_ten_for_w() -> ClaimRequest {
    ClaimRequest {
        worker_id: "w".into(),
        types: vec![],
        queues: vec![],
        limit: 10,
        lease: Duration::from_secs(30),
    }
}

/// Claims the one pending task `id`, completes it and deletes it.
async fn run_and_delete(store: &SqliteStore, id: Uuid) {
    let claim = up_to_ten_for_w();
    assert_eq!(store.claim(&claim).await.unwrap().len(), 1);
    let acks = vec![Ack::Complete { id, result: None }];
    store.ack("w", acks).await.unwrap();
    store.delete(id).await.unwrap();
}

/// Ids carry their row's seq (src/ids.rs). When the newest row goes, SQLite
/// would hand its seq out again; the id of the task that went must still
/// find nothing, within a process and after a restart.
#[tokio::test]
async fn the_id_of_a_deleted_task_never_finds_a_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.db");
    let spec = || {
        NewTask::new("t")
            .validate(&Limits::default(), Position::Alone)
            .unwrap()
    };
    let mut gone = Vec::new();
    for _restart in 0..2 {
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let (task, _) = store.enqueue(vec![spec()]).await.unwrap().remove(0);
        run_and_delete(&store, task.id).await;
        gone.push(task.id);
        let (later, _) = store.enqueue(vec![spec()]).await.unwrap().remove(0);
        assert!(!gone.contains(&later.id));
        for id in &gone {
            assert!(
                store.get(*id).await.unwrap().is_none(),
                "{id} found {later:?}"
            );
        }
        assert_eq!(store.get(later.id).await.unwrap().unwrap().id, later.id);
        run_and_delete(&store, later.id).await;
        gone.push(later.id);
        store.close();
    }
}
