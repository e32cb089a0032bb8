//! The PostgreSQL store against the conformance suite and property test,
//! plus what only this backend has: several stores (nodes) on one database.
//!
//! The database comes from `OFFLOAD_TEST_PG_URL` (scripts/test sets it, and
//! starts a throwaway cluster if it must). Without it these tests skip,
//! except under `CI=true`, where a missing PostgreSQL is a failure.

use std::sync::Arc;
use std::time::Duration;

use offload_core::{
    Ack, ClaimRequest, Clock, Interest, Limits, ManualClock, NewTask, OnConflict, Position,
    QueuePatch, Readiness, State, Store, SystemClock, TaskSpec,
};
use offload_postgres::{PgOptions, PgStore};
use offload_storetest::StoreFactory;
use sqlx::Connection;
use uuid::Uuid;

fn database_url() -> Option<String> {
    match std::env::var("OFFLOAD_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and OFFLOAD_TEST_PG_URL is not set: the PostgreSQL tests may not be skipped in CI"
            );
            eprintln!("skipped: OFFLOAD_TEST_PG_URL is not set");
            None
        }
    }
}

fn available() -> bool {
    database_url().is_some()
}

fn fresh_schema() -> String {
    format!("t_{}", uuid::Uuid::now_v7().simple())
}

/// Each store in a schema of its own, so tests never see each other's tasks.
struct FreshSchemas;

#[async_trait::async_trait]
impl StoreFactory for FreshSchemas {
    async fn open(&self, clock: Arc<ManualClock>) -> Arc<dyn Store> {
        let url = database_url().expect("checked by the test");
        let options = PgOptions {
            schema: fresh_schema(),
            max_connections: 4,
            clock,
            follow_database_clock: false,
            ..PgOptions::default()
        };
        PgStore::open(&url, options).await.expect("open the store")
    }
}

offload_storetest::conformance_tests!(crate::FreshSchemas, if crate::available());

#[test]
fn property_invariants_hold() {
    if !available() {
        return;
    }
    let cases = std::env::var("OFFLOAD_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    offload_storetest::property::check_invariants(Arc::new(FreshSchemas), cases);
}

/// A claim of up to `limit` tasks of any type and queue by `worker_id`.
fn claim_by(worker_id: &str, limit: usize) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker_id.into(),
        types: vec![],
        queues: vec![],
        limit,
        lease: Duration::from_secs(30),
    }
}

async fn node(schema: &str) -> Arc<PgStore> {
    let options = PgOptions {
        schema: schema.to_owned(),
        max_connections: 4,
        ..PgOptions::default()
    };
    PgStore::open(&database_url().expect("checked"), options)
        .await
        .expect("open")
}

/// Two nodes sharing a schema of their own, as two `offload serve`
/// processes on one database.
async fn two_nodes() -> (Arc<PgStore>, Arc<PgStore>) {
    let schema = fresh_schema();
    (node(&schema).await, node(&schema).await)
}

/// The last two dependencies of a task completed at the same moment on two
/// nodes unblock it: whichever ack comes second sees the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_completed_at_once_on_two_nodes_unblock_their_dependent() {
    if !available() {
        return;
    }
    let (first, second) = two_nodes().await;
    for round in 0..30 {
        let (_, _, dependent) = offload_storetest::a_child_of_two(&*first).await;
        let on_first = first.claim(&claim_by("one", 1)).await.unwrap();
        let on_second = second.claim(&claim_by("two", 1)).await.unwrap();
        tokio::join!(
            offload_storetest::complete(&*first, "one", on_first[0].id),
            offload_storetest::complete(&*second, "two", on_second[0].id),
        );
        let state = first.get(dependent.id).await.unwrap().unwrap().state;
        assert_eq!(
            state,
            State::Pending,
            "round {round}: the dependent is {state}"
        );
        let child = first.claim(&claim_by("one", 1)).await.unwrap();
        assert_eq!(child[0].id, dependent.id);
        offload_storetest::complete(&*first, "one", dependent.id).await;
    }
}

/// A schema written before completed dependencies' rows left
/// `offload_task_deps` as they completed still holds such rows for tasks
/// blocked then; those tasks are unblocked when their last dependency
/// completes.
#[tokio::test]
async fn rows_of_dependencies_completed_under_an_earlier_version_do_not_hold_a_dependent() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let store = node(&schema).await;
    let (first, second, dependent) = offload_storetest::a_child_of_two(&*store).await;
    assert_eq!(
        store.claim(&claim_by("w", 1)).await.unwrap()[0].id,
        first.id
    );
    offload_storetest::complete(&*store, "w", first.id).await;
    // What an earlier version left: the completed dependency's row.
    let mut conn = connection_in(&url, &schema).await;
    sqlx::query("INSERT INTO offload_task_deps (dep_id, dep_seq, task_seq) VALUES ($1, $2, $3)")
        .bind(first.id)
        .bind(offload_core::seq_carried_by(first.id).unwrap())
        .bind(offload_core::seq_carried_by(dependent.id).unwrap())
        .execute(&mut conn)
        .await
        .expect("the completed dependency's row was gone, and goes back");
    assert_eq!(
        store.claim(&claim_by("w", 1)).await.unwrap()[0].id,
        second.id
    );
    offload_storetest::complete(&*store, "w", second.id).await;
    assert_eq!(
        store.get(dependent.id).await.unwrap().unwrap().state,
        State::Pending,
        "unblocked once its last dependency completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_failover_when_it_goes() {
    if !available() {
        return;
    }
    let (first, second) = two_nodes().await;
    let leaders = |nodes: &[&Arc<PgStore>]| nodes.iter().filter(|n| n.is_leader()).count();
    for _ in 0..100 {
        if leaders(&[&first, &second]) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leaders(&[&first, &second]), 1, "exactly one leader");
    let (leader, follower) = if first.is_leader() {
        (first, second)
    } else {
        (second, first)
    };
    leader.close();
    drop(leader);
    for _ in 0..100 {
        if follower.is_leader() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(follower.is_leader(), "the other node took over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_enqueued_on_one_node_wakes_a_waiter_on_another() {
    if !available() {
        return;
    }
    let (a, b) = two_nodes().await;
    let mut ready = b.hub().watch_ready();
    ready.borrow_and_update();
    let mut events = b.hub().watch(Interest::Every).await;
    let spec = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let task = a.enqueue(vec![spec]).await.unwrap().remove(0).0;
    tokio::time::timeout(Duration::from_secs(10), ready.changed())
        .await
        .expect("node b heard of the task")
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("node b streams node a's changes")
        .unwrap();
    assert_eq!(event.task.id, task.id);
    let claimed = b.claim(&claim_by("w", 10)).await.unwrap();
    assert_eq!(claimed[0].id, task.id);
    assert_eq!(a.get(task.id).await.unwrap().unwrap().state, State::Running);
}

/// A commit's notifications go out in one statement; a batch's changed
/// ids take several of them (a NOTIFY payload has a size limit), and a
/// cancel its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_of_a_batch_and_a_cancel_reach_another_node() {
    if !available() {
        return;
    }
    let (a, b) = two_nodes().await;
    let mut events = b.hub().watch(Interest::Every).await;
    let mut cancels = b.hub().subscribe_cancels();
    let spec = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let enqueued: std::collections::HashSet<Uuid> = a
        .enqueue(vec![spec; 500])
        .await
        .unwrap()
        .into_iter()
        .map(|(task, _)| task.id)
        .collect();
    let mut streamed = std::collections::HashSet::new();
    while streamed.len() < enqueued.len() {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap_or_else(|_| panic!("node b streamed {} of 500 changes", streamed.len()))
            .unwrap();
        streamed.insert(event.task.id);
    }
    assert_eq!(streamed, enqueued);
    let running = b.claim(&claim_by("w", 1)).await.unwrap().remove(0);
    a.cancel(running.id).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), cancels.recv())
        .await
        .expect("node b heard of the cancel")
        .unwrap();
    assert_eq!(heard, running.id);
}

/// A node reads another's changed tasks only for what someone watches on
/// it; a watch of one task, and of one queue, hears the other node's
/// changes to them among many it makes to tasks nobody watches here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_node_hears_another_nodes_changes_to_what_it_names() {
    if !available() {
        return;
    }
    let (a, b) = two_nodes().await;
    let plain = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let watched = a.enqueue(vec![plain.clone()]).await.unwrap().remove(0).0;
    let mut task_watch = b.hub().watch(Interest::Task(watched.id)).await;
    let mut queue_watch = b.hub().watch(Interest::Queue("reports".into())).await;
    a.enqueue(vec![plain.clone(); 200]).await.unwrap();
    let report = NewTask::new("t")
        .queue("reports")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let report = a.enqueue(vec![report]).await.unwrap().remove(0).0;
    a.cancel(watched.id).await.unwrap();
    // The task's creation may be heard first: its notification can come
    // after the watch began.
    let cancelled = async {
        loop {
            let heard = task_watch.recv().await.unwrap();
            assert_eq!(heard.task.id, watched.id);
            if heard.task.state == State::Cancelled {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), cancelled)
        .await
        .expect("node b streams node a's change to the watched task");
    let heard = tokio::time::timeout(Duration::from_secs(10), queue_watch.recv())
        .await
        .expect("node b streams node a's task in the watched queue")
        .unwrap();
    assert_eq!(heard.task.id, report.id);
}

/// A watch that begins while a change is on its way to commit with no
/// event built for it (nobody watched when it was made) begins once that
/// change is published, so the task it then reads is as the change left
/// it. It began at once and read the task before the commit, and never
/// heard the change: a task's page opened as its task ended stayed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_begun_while_an_unheard_change_commits_reads_what_it_left() {
    if !available() {
        return;
    }
    let schema = fresh_schema();
    let store = node(&schema).await;
    let spec = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let task = store.enqueue(vec![spec]).await.unwrap().remove(0).0;
    // Holds the cancel's transaction open after its change, where it
    // records the counts just before COMMIT.
    let url = database_url().expect("checked");
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    let counts = format!("\"{schema}\".offload_counts");
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(&format!("LOCK TABLE {counts} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut holder)
        .await
        .unwrap();
    let cancelling = tokio::spawn({
        let store = Arc::clone(&store);
        async move { store.cancel(task.id).await }
    });
    let mut observer = sqlx::PgConnection::connect(&url).await.unwrap();
    let held_at_counts = async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted",
            )
            .bind(&counts)
            .fetch_one(&mut observer)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), held_at_counts)
        .await
        .expect("the cancel waits at the counts");
    let watching = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let watch = store.hub().watch(Interest::Task(task.id)).await;
            let read = store.get(task.id).await.unwrap().unwrap();
            (watch, read)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !watching.is_finished(),
        "the watch waits for the change on its way to commit"
    );
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    cancelling.await.unwrap().unwrap();
    let (_watch, read) = tokio::time::timeout(Duration::from_secs(10), watching)
        .await
        .expect("the watch begins once the change is published")
        .unwrap();
    assert_eq!(read.state, State::Cancelled);
}

/// Another node reads a changed task when the notification comes, which
/// may be after later changes: tasks enqueued, claimed and completed in
/// quick turns were read completed three times each, and streamed as
/// completed three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_streams_each_version_of_a_task_once() {
    if !available() {
        return;
    }
    let (a, b) = two_nodes().await;
    let mut events = b.hub().watch(Interest::Every).await;
    let spec = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let enqueued = a.enqueue(vec![spec; 500]).await.unwrap();
    let claimed = a.claim(&claim_by("w", 500)).await.unwrap();
    assert_eq!(claimed.len(), enqueued.len());
    a.ack("w", offload_storetest::completions(&claimed))
        .await
        .unwrap();
    // Each task's state events: its state and updated_at in each.
    type Streamed = std::collections::HashMap<Uuid, Vec<(State, String)>>;
    let mut state_events = Streamed::new();
    let completed = |seen: &Streamed| {
        seen.values()
            .filter(|v| v.iter().any(|(s, _)| *s == State::Completed))
            .count()
    };
    // Until every task was streamed completed, then a second more for
    // whatever would follow.
    let mut quiet_until = None;
    loop {
        let wait = match quiet_until {
            Some(until) => until - tokio::time::Instant::now(),
            None => Duration::from_secs(20),
        };
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(event) => {
                let event = event.expect("no event lost to a full channel");
                if event.kind == offload_core::EventKind::State {
                    state_events
                        .entry(event.task.id)
                        .or_default()
                        .push((event.task.state, event.task.updated_at.to_string()));
                }
            }
            Err(_) if quiet_until.is_some() => break,
            Err(_) => panic!(
                "{} of 500 were streamed completed",
                completed(&state_events)
            ),
        }
        if quiet_until.is_none() && completed(&state_events) == enqueued.len() {
            quiet_until = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
    }
    for (id, seen) in &state_events {
        let mut versions = seen.clone();
        versions.dedup();
        assert_eq!(
            &versions, seen,
            "task {id} streamed as one version more than once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_from_several_nodes_never_share_a_task() {
    if !available() {
        return;
    }
    let nodes = three_nodes().await;
    // Of several types, so that claims also take the path that picks
    // among them all before it locks, and meet each other's locks there.
    let specs = (0..300)
        .map(|i| {
            NewTask::new(format!("t{}", i % 5))
                .validate(&Limits::default(), Position::Alone)
                .unwrap()
        })
        .collect();
    nodes[0].enqueue(specs).await.unwrap();
    let all: Vec<Uuid> = claim_on_every_node(&nodes, 7, None)
        .await
        .into_iter()
        .map(|t| t.id)
        .collect();
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 300);
    assert_eq!(unique.len(), 300, "no task claimed twice");
}

/// Single enqueues that come together share transactions, each answered
/// with its own task; one whose dependency is not there fails alone, and
/// one with a unique key is answered as it always was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_enqueues_that_come_together_share_transactions() {
    if !available() {
        return;
    }
    let url = database_url().expect("checked");
    let schema = fresh_schema();
    let store = node(&schema).await;
    let spec = |task: NewTask| task.validate(&Limits::default(), Position::Alone).unwrap();
    let plain = (0..200).map(|n| {
        let store = Arc::clone(&store);
        let spec = spec(
            NewTask::new("t")
                .payload(&serde_json::json!({ "n": n }))
                .unwrap(),
        );
        async move { store.enqueue(vec![spec]).await }
    });
    let missing = spec(NewTask::new("t").depends_on(Uuid::now_v7()));
    let keyed = spec(NewTask::new("t").unique_key("k", OnConflict::Keep));
    let (plain, missing, keyed) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(
            futures::future::join_all(plain),
            store.enqueue(vec![missing]),
            store.enqueue(vec![keyed]),
        )
    })
    .await
    .expect("every enqueue answered");

    let missing = missing.expect_err("a dependency that is not there");
    assert!(missing.to_string().contains("depends_on[0]"), "{missing}");
    let keyed = keyed.expect("the keyed task");
    assert!(keyed[0].1, "created");
    let mut ids = Vec::new();
    for (n, answer) in plain.into_iter().enumerate() {
        let answer = answer.expect("a plain task");
        let [(task, created)] = &answer[..] else {
            panic!("one answer for one task: {answer:?}");
        };
        assert!(created);
        assert_eq!(
            task.payload.get(),
            format!(r#"{{"n":{n}}}"#),
            "its own task"
        );
        let stored = store.get(task.id).await.unwrap().expect("stored");
        assert_eq!(stored.payload.get(), task.payload.get());
        ids.push(task.id);
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200);

    let mut conn = connection_in(&url, &schema).await;
    let (tasks, transactions): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT xmin::text) FROM offload_tasks")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(tasks, 201);
    // The keyed task's own transaction and at least one that took many.
    assert!(
        transactions < 100,
        "201 tasks written by {transactions} transactions"
    );
}

/// Single enqueues checked against what is stored (a unique key,
/// dependencies) that come together share transactions, each answered as
/// if it came alone: its own task for a key of its own, and for a key
/// another sent too, the task it met or, as a replace, its own as made; a
/// dependent blocked, pending or cancelled by where its dependency stands;
/// one whose dependency is not there refused alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_single_enqueues_that_come_together_share_transactions() {
    if !available() {
        return;
    }
    let url = database_url().expect("checked");
    let schema = fresh_schema();
    let store = node(&schema).await;
    let spec = |task: NewTask| task.validate(&Limits::default(), Position::Alone).unwrap();
    let waiting = store
        .enqueue(vec![spec(NewTask::new("parent"))])
        .await
        .unwrap();
    let cancelled = store
        .enqueue(vec![spec(NewTask::new("parent"))])
        .await
        .unwrap();
    let (waiting, cancelled) = (waiting[0].0.id, cancelled[0].0.id);
    store.cancel(cancelled).await.unwrap();
    let send = |task: NewTask| {
        let store = Arc::clone(&store);
        let spec = spec(task);
        async move { store.enqueue(vec![spec]).await }
    };
    let own =
        (0..200).map(|n| send(NewTask::new("t").unique_key(format!("own-{n}"), OnConflict::Keep)));
    let replaces =
        (0..20).map(|_| send(NewTask::new("t").unique_key("replaced", OnConflict::Replace)));
    let dependents = (0..60).map(|n| {
        send(NewTask::new("child").depends_on(if n % 3 == 0 { cancelled } else { waiting }))
    });
    let missing = send(
        NewTask::new("t")
            .unique_key("missing", OnConflict::Keep)
            .depends_on(waiting)
            .depends_on(Uuid::now_v7()),
    );
    let (own, replaces, dependents, missing) =
        tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(
                futures::future::join_all(own),
                futures::future::join_all(replaces),
                futures::future::join_all(dependents),
                missing,
            )
        })
        .await
        .expect("every enqueue answered");

    let missing = missing.expect_err("a dependency that is not there");
    assert!(missing.to_string().contains("depends_on[1]"), "{missing}");
    for (n, answer) in own.into_iter().enumerate() {
        let answer = answer.expect("a task of its own key");
        let [(task, true)] = &answer[..] else {
            panic!("one task made for one key: {answer:?}");
        };
        assert_eq!(
            task.unique_key.as_deref(),
            Some(format!("own-{n}").as_str())
        );
    }
    let mut replaced = Vec::new();
    for answer in replaces {
        let answer = answer.expect("every replace goes through");
        let [(task, true)] = &answer[..] else {
            panic!("a replace makes its task: {answer:?}");
        };
        assert_eq!(task.state, State::Pending, "answered as made");
        replaced.push(store.get(task.id).await.unwrap().expect("stored").state);
    }
    assert_eq!(
        replaced.iter().filter(|s| **s == State::Pending).count(),
        1,
        "one task holds the replaced key: {replaced:?}"
    );
    for (n, answer) in dependents.into_iter().enumerate() {
        let answer = answer.expect("a dependent of a task that is there");
        let [(task, true)] = &answer[..] else {
            panic!("a dependent is made: {answer:?}");
        };
        let expected = if n % 3 == 0 {
            State::Cancelled
        } else {
            State::Blocked
        };
        assert_eq!(task.state, expected, "dependent {n}");
        let stored = store.get(task.id).await.unwrap().expect("stored");
        assert_eq!(stored.state, expected, "dependent {n} as answered");
    }
    let claimed = store
        .claim(&ClaimRequest {
            types: vec!["parent".into()],
            ..claim_by("w", 10)
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    store
        .ack(
            "w",
            vec![Ack::Complete {
                id: waiting,
                result: None,
            }],
        )
        .await
        .unwrap();
    let children = store
        .claim(&ClaimRequest {
            types: vec!["child".into()],
            ..claim_by("w", 100)
        })
        .await
        .unwrap();
    assert_eq!(children.len(), 40, "each dependent recorded as waiting");

    let mut conn = connection_in(&url, &schema).await;
    let (tasks, transactions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT xmin::text) FROM offload_tasks WHERE type <> 'parent'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(tasks, 280);
    // The last write of each replaced task is its cancellation, and of
    // each dependent made ready the ack's and the claim's.
    assert!(
        transactions < 140,
        "280 tasks written last by {transactions} transactions"
    );
    // Made cancelled by the transaction that made them.
    let broken: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM offload_tasks WHERE type = 'child' AND state = $1",
    )
    .bind(State::Cancelled.code() as i16)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(
        broken < 10,
        "20 dependents of a cancelled task made by {broken} transactions"
    );
}

/// A dependency deleted while gathered enqueues that name it are written:
/// those callers are refused (the dependency is not there), and the
/// others of their transaction, whose dependencies are there, are made.
/// The transaction looks for every named dependency before it writes and
/// locks them as it writes; one gone between the two runs it again, where
/// the look refuses its dependents alone. Written as one, the refusal
/// would have failed every caller the transaction gathered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_deleted_while_its_dependents_are_gathered_refuses_only_them() {
    if !available() {
        return;
    }
    let store = node(&fresh_schema()).await;
    let spec = |task: NewTask| task.validate(&Limits::default(), Position::Alone).unwrap();
    let mut refused = 0;
    for round in 0..40 {
        let kind = format!("parent-{round}");
        let mut parents = Vec::new();
        for _ in 0..2 {
            let made = store
                .enqueue(vec![spec(NewTask::new(&kind))])
                .await
                .unwrap();
            parents.push(made[0].0.id);
        }
        let claimed = store
            .claim(&ClaimRequest {
                types: vec![kind.clone()],
                ..claim_by("w", 2)
            })
            .await
            .unwrap();
        assert_eq!(claimed.len(), 2);
        let acks = parents
            .iter()
            .map(|&id| Ack::Complete { id, result: None })
            .collect();
        store.ack("w", acks).await.unwrap();
        let [deleted, kept] = parents[..] else {
            unreachable!()
        };
        let send = |dependency: Uuid| {
            let store = Arc::clone(&store);
            let spec = spec(NewTask::new("child").depends_on(dependency));
            async move { store.enqueue(vec![spec]).await }
        };
        let (of_deleted, of_kept, deletion) =
            tokio::time::timeout(Duration::from_secs(30), async {
                tokio::join!(
                    futures::future::join_all((0..6).map(|_| send(deleted))),
                    futures::future::join_all((0..6).map(|_| send(kept))),
                    store.delete(deleted),
                )
            })
            .await
            .expect("every enqueue answered");
        deletion.expect("a completed task is deleted");
        for answer in of_kept {
            let answer = answer.expect("a dependent of a task that is there is made");
            assert_eq!(
                answer[0].0.state,
                State::Pending,
                "its dependency completed"
            );
        }
        for answer in of_deleted {
            match answer {
                Ok(answer) => assert_eq!(answer[0].0.state, State::Pending),
                Err(e) => {
                    assert!(e.to_string().contains("depends_on[0]"), "{e}");
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 0, "no enqueue ever met its dependency deleted");
}

/// Claims of a few tasks that come together share transactions, each
/// answered with tasks of its own. A transaction takes one turn on limited
/// queues' rows at most (its first claim's, as every claim takes them, in
/// name order), so claims on two limited queues never share one; together
/// they keep to each queue's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_a_few_tasks_that_come_together_share_transactions() {
    if !available() {
        return;
    }
    let url = database_url().expect("checked");
    let schema = fresh_schema();
    let store = node(&schema).await;
    let spec = |queue: &str| {
        NewTask::new("t")
            .queue(queue)
            .validate(&Limits::default(), Position::Alone)
            .unwrap()
    };
    for (queue, n) in [("free", 200), ("limited-a", 100), ("limited-b", 100)] {
        store
            .enqueue((0..n).map(|_| spec(queue)).collect())
            .await
            .unwrap();
    }
    for queue in ["limited-a", "limited-b"] {
        let limit = QueuePatch {
            paused: None,
            concurrency: Some(Some(15)),
        };
        store.update_queue(queue, limit).await.unwrap();
    }
    let claim = |n: usize, queue: &str, limit: usize| {
        let store = Arc::clone(&store);
        let request = ClaimRequest {
            queues: vec![queue.to_owned()],
            ..claim_by(&format!("w{n}"), limit)
        };
        async move { store.claim(&request).await }
    };
    let free = (0..100).map(|n| claim(n, "free", if n % 10 == 0 { 5 } else { 1 }));
    let limited = (0..40).map(|n| {
        let queue = if n % 2 == 0 { "limited-a" } else { "limited-b" };
        claim(100 + n, queue, 1)
    });
    let (free, limited) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(
            futures::future::join_all(free),
            futures::future::join_all(limited)
        )
    })
    .await
    .expect("every claim answered");

    let mut seen = std::collections::HashSet::new();
    for (n, claimed) in free.into_iter().enumerate() {
        let claimed = claimed.expect("a claim");
        assert_eq!(claimed.len(), if n % 10 == 0 { 5 } else { 1 }, "claim {n}");
        for task in claimed {
            assert_eq!(task.worker_id.as_deref(), Some(format!("w{n}").as_str()));
            assert!(seen.insert(task.id), "task {} claimed twice", task.id);
        }
    }
    let mut of_queue = std::collections::HashMap::<String, usize>::new();
    for (n, claimed) in limited.into_iter().enumerate() {
        let claimed = claimed.expect("a claim");
        assert!(
            claimed.len() <= 1,
            "claim {} took {}",
            100 + n,
            claimed.len()
        );
        for task in claimed {
            assert_eq!(task.worker_id, Some(format!("w{}", 100 + n)));
            assert!(seen.insert(task.id), "task {} claimed twice", task.id);
            *of_queue.entry(task.queue).or_default() += 1;
        }
    }
    assert_eq!(of_queue["limited-a"], 15, "the queue's limit, and no more");
    assert_eq!(of_queue["limited-b"], 15, "the queue's limit, and no more");

    let mut conn = connection_in(&url, &schema).await;
    let transactions = |queue: &'static str| {
        sqlx::query_scalar::<_, String>(
            "SELECT DISTINCT xmin::text FROM offload_tasks WHERE queue = $1 AND state = $2",
        )
        .bind(queue)
        .bind(State::Running.code() as i16)
    };
    let free = transactions("free").fetch_all(&mut conn).await.unwrap();
    assert!(
        free.len() < 50,
        "100 claims made by {} transactions",
        free.len()
    );
    let a = transactions("limited-a")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let b = transactions("limited-b")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let both: Vec<_> = a.iter().filter(|x| b.contains(x)).collect();
    assert!(
        both.is_empty(),
        "transactions {both:?} took turns on both limited queues"
    );
}

/// A batch of tasks with no unique key and no dependencies is written by
/// one statement: in the batch's order, each id carrying its row's seq,
/// with the queue and the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_batch_is_written_in_its_order_by_one_transaction() {
    if !available() {
        return;
    }
    let url = database_url().expect("checked");
    let schema = fresh_schema();
    let store = node(&schema).await;
    let specs: Vec<_> = (0..400)
        .map(|n| {
            let task = NewTask::new("t")
                .queue("fresh")
                .payload(&serde_json::json!({ "n": n }))
                .unwrap();
            let task = if n == 7 {
                task.delay(Duration::from_secs(3600))
            } else {
                task
            };
            task.validate(&Limits::default(), Position::Alone).unwrap()
        })
        .collect();
    let created = store.enqueue(specs).await.unwrap();
    assert_eq!(created.len(), 400);
    assert_eq!(created[7].0.state, State::Scheduled);

    let mut conn = connection_in(&url, &schema).await;
    let rows: Vec<(i64, Uuid, String, i16)> =
        sqlx::query_as("SELECT seq, id, payload, state FROM offload_tasks ORDER BY seq")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows.len(), 400);
    for (n, ((seq, id, payload, state), (task, made))) in rows.iter().zip(&created).enumerate() {
        assert!(made);
        assert_eq!(
            *payload,
            format!(r#"{{"n":{n}}}"#),
            "row {n} in the batch's order"
        );
        assert_eq!(*id, task.id, "task {n} answered with its row's id");
        assert_eq!(
            offload_core::seq_carried_by(*id),
            Some(*seq),
            "the id carries its seq"
        );
        assert_eq!(*state, task.state.code() as i16);
    }
    let transactions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM offload_tasks")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(transactions, 1);
    store.verify_bookkeeping().await.unwrap();
    let counts = store.stats().await.unwrap().types["t"];
    assert_eq!((counts.pending, counts.scheduled), (399, 1));
    let queues = store.queues().await.unwrap();
    assert!(queues.iter().any(|q| q.name == "fresh"), "{queues:?}");
}

/// A single enqueue written alone whose caller goes away midway leaves
/// those that came meanwhile to a writer of their own: they are written
/// once the table it waited on is free, and so is the one whose caller
/// went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueues_waiting_behind_one_dropped_midway_are_written() {
    if !available() {
        return;
    }
    let url = database_url().expect("checked");
    let schema = fresh_schema();
    let store = node(&schema).await;
    let mut locker = connection_in(&url, &schema).await;
    sqlx::raw_sql("BEGIN; LOCK TABLE offload_tasks IN ACCESS EXCLUSIVE MODE;")
        .execute(&mut locker)
        .await
        .unwrap();
    let enqueue = || {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.enqueue(one_task()).await })
    };
    let alone = enqueue();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let behind: Vec<_> = (0..3).map(|_| enqueue()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!alone.is_finished(), "held by the lock");
    alone.abort();
    assert!(alone.await.unwrap_err().is_cancelled());
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();
    for waiting in behind {
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("answered once the table is free")
            .unwrap()
            .expect("written");
    }
    // The dropped one is written too, its statement on a task of its own
    // (`enqueue_plain`), though maybe after the three.
    let mut pending = 0;
    for _ in 0..100 {
        pending = store.stats().await.unwrap().total.pending;
        if pending >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending, 4);
}

/// Acks sent one a request by several workers at once share
/// transactions, each answered apart: one of a task its worker does not
/// hold is refused alone. A transaction that fails is the call's error,
/// which a worker sends again, not a refusal of its ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_acks_from_several_workers_share_transactions_each_answered_apart() {
    if !available() {
        return;
    }
    let url = database_url().expect("checked");
    let schema = fresh_schema();
    let store = node(&schema).await;
    store.enqueue(tasks_of_type_t(100)).await.unwrap();
    let mut acks = Vec::new();
    for w in 0..50 {
        let worker = format!("w{w}");
        let held = store.claim(&claim_by(&worker, 2)).await.unwrap();
        let result = serde_json::value::to_raw_value(&w).unwrap();
        acks.push((
            worker.clone(),
            Ack::Complete {
                id: held[0].id,
                result: Some(result),
            },
        ));
        let failure = offload_core::Failure {
            message: format!("{worker} gave up"),
            kind: offload_core::FailureKind::Error,
            retry: Some(false),
            retry_in: None,
        };
        acks.push((
            worker,
            Ack::Fail {
                id: held[1].id,
                failure,
            },
        ));
    }
    // w0 acks a task that w1 holds.
    let stale = acks[2].1.id();
    acks.insert(
        1,
        (
            "w0".into(),
            Ack::Complete {
                id: stale,
                result: None,
            },
        ),
    );
    let sent = acks.iter().map(|(worker, ack)| {
        let store = Arc::clone(&store);
        let (worker, ack) = (worker.clone(), ack.clone());
        async move { store.ack(&worker, vec![ack]).await }
    });
    let answers = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(sent))
        .await
        .expect("every ack answered");

    for ((worker, ack), answer) in acks.iter().zip(answers) {
        let [outcome] = &answer.expect("no transaction failed")[..] else {
            panic!("one outcome for one ack");
        };
        match ack {
            Ack::Complete { id, .. } if *id == stale && worker == "w0" => {
                let refused = outcome.as_ref().expect_err("w0 does not hold it");
                assert!(
                    matches!(refused, offload_core::Error::Conflict(_)),
                    "{refused}"
                );
            }
            Ack::Complete { id, result } => {
                let task = outcome.as_ref().expect("completed");
                assert_eq!((task.id, task.state), (*id, State::Completed));
                assert_eq!(
                    task.result.as_ref().map(|r| r.get()),
                    result.as_ref().map(|r| r.get())
                );
            }
            Ack::Fail { id, .. } => {
                let task = outcome.as_ref().expect("failed");
                assert_eq!((task.id, task.state), (*id, State::Failed));
                assert_eq!(task.errors[0].message, format!("{worker} gave up"));
            }
        }
    }
    let mut conn = connection_in(&url, &schema).await;
    let transactions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM offload_tasks")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(
        transactions < 50,
        "100 acks written by {transactions} transactions"
    );

    // Every count the commit writes refused, as on a full disk.
    store.enqueue(one_task()).await.unwrap();
    let held = store.claim(&claim_by("w0", 1)).await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION {schema}.full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; \
         END $$; \
         CREATE TRIGGER full_disk BEFORE INSERT ON {schema}.offload_counts \
           FOR EACH STATEMENT EXECUTE FUNCTION {schema}.full_disk();"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let ack = Ack::Complete {
        id: held[0].id,
        result: None,
    };
    match store.ack("w0", vec![ack]).await {
        Err(offload_core::Error::Unavailable(message)) => {
            assert!(message.contains("No space left on device"), "{message}");
        }
        other => panic!("expected the call to fail, to be sent again: {other:?}"),
    }
}

/// A connection of its own to the tables of `schema`.
async fn connection_in(url: &str, schema: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query(&format!("SET search_path = {schema}"))
        .execute(&mut conn)
        .await
        .expect("search_path");
    conn
}

/// A task of type `t` in each of `queues`, enqueued in one batch; their
/// ids, in order.
async fn enqueue_in(store: &PgStore, queues: impl Iterator<Item = String>) -> Vec<Uuid> {
    let specs = queues
        .map(|queue| {
            NewTask::new("t")
                .queue(queue)
                .validate(&Limits::default(), Position::Alone)
                .unwrap()
        })
        .collect();
    store
        .enqueue(specs)
        .await
        .unwrap()
        .into_iter()
        .map(|(task, _)| task.id)
        .collect()
}

/// Locks the rows of the first three tasks stored, as a claim under way
/// on another node would, until `holding` ends.
async fn hold_the_first_three(holding: &mut sqlx::PgConnection) {
    sqlx::query("SELECT 1 FROM offload_tasks ORDER BY seq LIMIT 3 FOR UPDATE")
        .execute(holding)
        .await
        .expect("lock the first three");
}

/// A claim takes the first tasks no other claim holds, in claim order,
/// past those another transaction has locked: from all queues, the window
/// of the first pending tasks it reads holds the locked ones too; naming
/// its queues, so do the first of each pair it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_takes_the_first_tasks_no_other_claim_holds() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let store = node(&schema).await;
    let ids = enqueue_in(&store, (0..10).map(|i| format!("q{i}"))).await;
    let mut other = connection_in(&url, &schema).await;
    let mut holding = other.begin().await.expect("begin");
    hold_the_first_three(&mut holding).await;
    let claim = |limit| {
        let store = Arc::clone(&store);
        async move {
            let claimed = store.claim(&claim_by("w", limit)).await.unwrap();
            claimed.into_iter().map(|t| t.id).collect::<Vec<Uuid>>()
        }
    };
    assert_eq!(claim(2).await, ids[3..5], "the two after the held three");
    assert_eq!(claim(4).await, ids[5..9]);
    // Naming the queues, the claim meets the held three among the first
    // of its pairs, and locks each pair's first it may take instead.
    let naming_queues = ClaimRequest {
        queues: (0..10).map(|i| format!("q{i}")).collect(),
        ..claim_by("w", 5)
    };
    let claimed = store.claim(&naming_queues).await.unwrap();
    assert_eq!(
        claimed.into_iter().map(|t| t.id).collect::<Vec<Uuid>>(),
        ids[9..],
        "naming the queues, the last past the held three"
    );
    holding.rollback().await.expect("rollback");
    assert_eq!(claim(10).await, ids[0..3], "the three let go");
}

/// A claim of several (queue, type) pairs whose first tasks another
/// transaction holds locks only the tasks it takes: locking as many of
/// each pair as it asks for, four fetchers each claiming 1,000 from the
/// same 1,000 queues locked every pending task, and kept each other's
/// claims and acks waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_several_pairs_past_held_tasks_locks_only_what_it_takes() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let store = node(&schema).await;
    let ids = enqueue_in(&store, (0..20).map(|i| format!("q{}", i % 2))).await;
    let mut holder = connection_in(&url, &schema).await;
    let mut blocker = connection_in(&url, &schema).await;
    let mut looker = connection_in(&url, &schema).await;
    let mut holding = holder.begin().await.expect("begin");
    hold_the_first_three(&mut holding).await;
    // The claim's last statement, its counts, waits for this table lock:
    // until then it holds every row it locked.
    let mut blocking = blocker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE offload_counts IN EXCLUSIVE MODE")
        .execute(&mut *blocking)
        .await
        .expect("lock the counts");
    let naming_queues = ClaimRequest {
        queues: vec!["q0".into(), "q1".into()],
        ..claim_by("w", 2)
    };
    let claiming = tokio::spawn({
        let store = Arc::clone(&store);
        async move { store.claim(&naming_queues).await.unwrap() }
    });
    let waiting =
        "SELECT count(*) FROM pg_locks WHERE relation = 'offload_counts'::regclass AND NOT granted";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sqlx::query_scalar::<_, i64>(waiting)
        .fetch_one(&mut looker)
        .await
        .expect("pg_stat_activity")
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the claim never reached its counts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut looking = looker.begin().await.expect("begin");
    let free: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM offload_tasks WHERE state = 2 \
         FOR UPDATE SKIP LOCKED) free",
    )
    .fetch_one(&mut *looking)
    .await
    .expect("count the rows no one holds");
    looking.rollback().await.expect("rollback");
    assert_eq!(
        free,
        20 - 3 - 2,
        "the claim holds more rows than the two it takes"
    );
    blocking.rollback().await.expect("rollback");
    let claimed: Vec<Uuid> = claiming.await.unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(claimed, ids[3..5], "the two after the held three");
    holding.rollback().await.expect("rollback");
}

/// A store that counts the claims made of it, and passes every call on.
#[derive(Debug)]
struct CountingClaims {
    inner: Arc<PgStore>,
    claims: std::sync::atomic::AtomicUsize,
    /// How many of the next claims fail, as one that lost its connection.
    failing: std::sync::atomic::AtomicUsize,
}

impl CountingClaims {
    /// Counts a claim, failing it if it is one of the next `failing`.
    fn count_claim(&self) -> offload_core::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.claims.fetch_add(1, SeqCst);
        if self
            .failing
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(offload_core::Error::Storage("connection lost".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for CountingClaims {
    async fn enqueue(
        &self,
        tasks: Vec<TaskSpec>,
    ) -> offload_core::Result<Vec<(offload_core::Task, bool)>> {
        self.inner.enqueue(tasks).await
    }
    async fn claim(&self, request: &ClaimRequest) -> offload_core::Result<Vec<offload_core::Task>> {
        self.count_claim()?;
        self.inner.claim(request).await
    }
    async fn claim_or_park(
        &self,
        request: &ClaimRequest,
    ) -> offload_core::Result<offload_core::Claim> {
        self.count_claim()?;
        self.inner.claim_or_park(request).await
    }
    async fn heartbeat(
        &self,
        request: offload_core::HeartbeatRequest,
    ) -> offload_core::Result<offload_core::HeartbeatAck> {
        self.inner.heartbeat(request).await
    }
    async fn ack(
        &self,
        worker_id: &str,
        acks: Vec<Ack>,
    ) -> offload_core::Result<Vec<offload_core::AckOutcome>> {
        self.inner.ack(worker_id, acks).await
    }
    async fn cancel(&self, id: Uuid) -> offload_core::Result<offload_core::Task> {
        self.inner.cancel(id).await
    }
    async fn retry(&self, id: Uuid) -> offload_core::Result<offload_core::Task> {
        self.inner.retry(id).await
    }
    async fn get(&self, id: Uuid) -> offload_core::Result<Option<offload_core::Task>> {
        self.inner.get(id).await
    }
    async fn list(
        &self,
        query: &offload_core::ListQuery,
    ) -> offload_core::Result<offload_core::TaskPage> {
        self.inner.list(query).await
    }
    async fn stats(&self) -> offload_core::Result<offload_core::Stats> {
        self.inner.stats().await
    }
    async fn delete(&self, id: Uuid) -> offload_core::Result<()> {
        self.inner.delete(id).await
    }
    async fn clear(&self, request: &offload_core::ClearRequest) -> offload_core::Result<u64> {
        self.inner.clear(request).await
    }
    async fn queues(&self) -> offload_core::Result<Vec<offload_core::QueueInfo>> {
        self.inner.queues().await
    }
    async fn update_queue(
        &self,
        name: &str,
        patch: QueuePatch,
    ) -> offload_core::Result<offload_core::QueueInfo> {
        self.inner.update_queue(name, patch).await
    }
    async fn promote_due(&self) -> offload_core::Result<offload_core::PromoteReport> {
        self.inner.promote_due().await
    }
    async fn recover_expired(&self) -> offload_core::Result<Vec<offload_core::Task>> {
        self.inner.recover_expired().await
    }
    fn take_finished(&self) -> Vec<(String, String, offload_core::Finished)> {
        self.inner.take_finished()
    }
    async fn purge_finished(
        &self,
        retention: &offload_core::Retention,
        batch: usize,
    ) -> offload_core::Result<u64> {
        self.inner.purge_finished(retention, batch).await
    }
    async fn count_stuck(&self, expired_for: Duration) -> offload_core::Result<u64> {
        self.inner.count_stuck(expired_for).await
    }
    fn is_leader(&self) -> bool {
        self.inner.is_leader()
    }
    fn hub(&self) -> &offload_core::Hub {
        self.inner.hub()
    }
}

/// A fetch under way in an engine: the tasks it will answer with.
type Fetch = tokio::task::JoinHandle<offload_core::Result<Vec<offload_core::Task>>>;

/// An engine on PostgreSQL, which does not park claims, with `n` fetches
/// of one task each (of `types`, or any) waiting in it: the first has
/// claimed and found nothing, the others came when it waited. No look at
/// the store comes but the one a ready signal brings.
async fn waiting_fetches(
    n: usize,
    types: &[&str],
) -> (
    Arc<CountingClaims>,
    Arc<offload_engine::Engine>,
    tokio_util::sync::CancellationToken,
    Vec<Fetch>,
) {
    let store = Arc::new(CountingClaims {
        inner: node(&fresh_schema()).await,
        claims: Default::default(),
        failing: Default::default(),
    });
    let config = offload_engine::EngineConfig {
        fetch_fallback_poll: Duration::from_secs(600),
        ..Default::default()
    };
    let engine = offload_engine::Engine::start(Arc::clone(&store) as Arc<dyn Store>, config);
    let stop = tokio_util::sync::CancellationToken::new();
    let fetch = |i: usize| {
        let (engine, stop) = (Arc::clone(&engine), stop.clone());
        let request = ClaimRequest {
            types: types.iter().map(|t| t.to_string()).collect(),
            ..claim_by(&format!("w{i}"), 1)
        };
        tokio::spawn(async move {
            engine
                .fetch(&request, Duration::from_secs(600), &stop)
                .await
        })
    };
    let mut fetches = vec![fetch(0)];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.claims.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first fetch never claimed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Time for it to take its place and wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fetches.extend((1..n).map(fetch));
    // Let the others settle into their waits (one still on its way there
    // when a task comes looks again, a claim more than the relay's).
    tokio::time::sleep(Duration::from_secs(1)).await;
    (store, engine, stop, fetches)
}

/// A fetch that comes while others of its group wait takes its place
/// behind them without a look of its own: they have looked, and each task
/// made ready since brought one of them a turn. With fetches given a task
/// at a time, each fetch's look on its return found nothing: 0.9 claims a
/// task that locked nothing (bench/HISTORY.md, round 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_joining_waiting_fetches_waits_its_turn_before_it_looks() {
    if !available() {
        return;
    }
    let (store, engine, stop, fetches) = waiting_fetches(10, &["t"]).await;
    let claims = || store.claims.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        claims(),
        1,
        "nine fetches joining one that waits made {} claims",
        claims() - 1
    );
    engine.enqueue(NewTask::new("t")).await.unwrap();
    until_ended(&fetches, 1, "the task").await;
    assert_eq!(tasks_fetched(&stop, fetches).await, 1);
    assert_eq!(claims(), 2, "the task cost one claim");
    engine.shutdown().await;
}

/// Fetches waiting on PostgreSQL, which does not park claims, are woken a
/// few at a time: a task enqueued while 50 wait costs one claim, not one
/// for each (which took a client enqueueing one task at a time, with 200
/// fetches waiting, from 633 tasks a second to 32), nor the two more that
/// a claim taking all it asked for woke, as more might be ready, before
/// the store told whether it left any. Both ways a claim reads pending
/// tasks: in claim order (a fetch of any type) and by (queue, type).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_made_ready_costs_waiting_fetches_one_claim_not_one_each() {
    if !available() {
        return;
    }
    for types in [&[][..], &["t"]] {
        a_task_made_ready_costs_one_claim_of(types).await;
    }
}

async fn a_task_made_ready_costs_one_claim_of(types: &[&str]) {
    let (store, engine, stop, fetches) = waiting_fetches(50, types).await;
    let claims = || store.claims.load(std::sync::atomic::Ordering::SeqCst);
    let before = claims();
    engine.enqueue(NewTask::new("t")).await.unwrap();
    until_ended(&fetches, 1, "the task").await;
    // Time for any other fetch woken to claim too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let made = claims() - before;
    assert_eq!(
        made, 1,
        "one task made {made} claims of 50 waiting fetches of {types:?}"
    );
    assert_eq!(
        tasks_fetched(&stop, fetches).await,
        1,
        "one fetch got the task"
    );
    engine.shutdown().await;
}

/// A task made ready wakes only the waiting fetches that ask for its
/// type: with ten workers each waiting for a type of its own besides, every
/// task enqueued one at a time cost ten more claims that found nothing
/// (`bench/waiting-fetches.py`, `OTHER_TYPES=10`: 17 transactions a task
/// where 6.5 went without them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_made_ready_wakes_only_the_fetches_that_ask_for_its_type() {
    if !available() {
        return;
    }
    let (store, engine, stop, mut fetches) = waiting_fetches(1, &["t"]).await;
    for i in 0..10 {
        let (engine, stop) = (Arc::clone(&engine), stop.clone());
        let request = ClaimRequest {
            types: vec![format!("other-{i}")],
            ..claim_by(&format!("o{i}"), 1)
        };
        fetches.push(tokio::spawn(async move {
            engine
                .fetch(&request, Duration::from_secs(600), &stop)
                .await
        }));
    }
    // Time for the others to look once and settle into their waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let claims = || store.claims.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(claims(), 11, "each fetch looked once");
    engine.enqueue(NewTask::new("t")).await.unwrap();
    until_ended(&fetches, 1, "the task").await;
    // Time for any other fetch woken to claim too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let made = claims() - 11;
    assert_eq!(
        made, 1,
        "a task of type t made {made} claims of fetches waiting for t and ten other types"
    );
    assert_eq!(tasks_fetched(&stop, fetches).await, 1);
    engine.shutdown().await;
}

/// Another node hears which (queue, type) pairs a commit made ready, so
/// that its own waiting fetches of other types sleep on too.
#[tokio::test]
async fn another_node_hears_the_pairs_a_commit_made_ready() {
    if !available() {
        return;
    }
    let (a, b) = two_nodes().await;
    let mut there = b.hub().watch_ready();
    let seen = *there.borrow_and_update();
    let spec = |queue: &str, task_type: &str| {
        NewTask::new(task_type)
            .queue(queue)
            .validate(&Limits::default(), Position::Alone)
            .unwrap()
    };
    a.enqueue(vec![spec("mail", "send"), spec("default", "report")])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), there.changed())
        .await
        .expect("node b heard no ready signal")
        .unwrap();
    let pair = |queue: &str, task_type: &str| (queue.to_owned(), task_type.to_owned());
    assert_eq!(
        b.hub().ready_log().since(seen).1,
        Readiness::Of([pair("mail", "send"), pair("default", "report")].into()),
        "node b's signal names what node a made ready"
    );
}

/// Waits until `n` of the waiting `fetches` have ended, as each given a
/// task does, for at most 20 s.
async fn until_ended(fetches: &[Fetch], n: usize, given: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ended = fetches.iter().filter(|f| f.is_finished()).count();
        if ended >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "of {} waiting fetches given {given}, {ended} ended, not {n}",
            fetches.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops the waiting `fetches` and counts the tasks they got.
async fn tasks_fetched(stop: &tokio_util::sync::CancellationToken, fetches: Vec<Fetch>) -> usize {
    stop.cancel();
    let mut got = 0;
    for fetch in fetches {
        got += fetch.await.unwrap().unwrap().len();
    }
    got
}

/// A burst of tasks made ready at once reaches as many waiting fetches,
/// each claim that leaves tasks behind waking two more, with no look in
/// case a signal was lost to help (it would come in 600 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_made_ready_reaches_as_many_waiting_fetches() {
    if !available() {
        return;
    }
    for types in [&[][..], &["t"]] {
        let (_store, engine, stop, fetches) = waiting_fetches(20, types).await;
        let burst = (0..10).map(|_| NewTask::new("t")).collect();
        engine.enqueue_batch(burst).await.unwrap();
        until_ended(&fetches, 10, &format!("10 tasks for fetches of {types:?}")).await;
        assert_eq!(
            tasks_fetched(&stop, fetches).await,
            10,
            "each task claimed once"
        );
        engine.shutdown().await;
    }
}

/// A waiting fetch whose claim fails when its turn comes hands the turn
/// on: another of its group claims the task at once, where it waited for
/// the next ready signal or the look in case one was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_fetch_whose_claim_fails_hands_its_turn_on() {
    if !available() {
        return;
    }
    let (store, engine, stop, mut fetches) = waiting_fetches(2, &[]).await;
    store.failing.store(1, std::sync::atomic::Ordering::SeqCst);
    engine.enqueue(NewTask::new("t")).await.unwrap();
    let (first, _, rest) = futures::future::select_all(fetches.drain(..)).await;
    assert!(first.unwrap().is_err(), "the fetch given the turn failed");
    let second = tokio::time::timeout(Duration::from_secs(10), rest.into_iter().next().unwrap())
        .await
        .expect("the other fetch never got the turn");
    assert_eq!(
        second.unwrap().unwrap().len(),
        1,
        "the other fetch got the task"
    );
    stop.cancel();
    engine.shutdown().await;
}

/// A running task's end wakes waiting fetches (here and on other nodes)
/// only where its queue has a concurrency limit, whose slot it frees:
/// elsewhere it makes nothing ready, and the signal cost each task a
/// claim of a waiting fetch that found nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_ending_signals_ready_only_where_its_queue_has_a_limit() {
    if !available() {
        return;
    }
    let (a, b) = two_nodes().await;
    let in_queue = |queue: &str| {
        NewTask::new("t")
            .queue(queue)
            .validate(&Limits::default(), Position::Alone)
            .unwrap()
    };
    let specs = vec![in_queue("free"), in_queue("limited"), in_queue("limited")];
    a.enqueue(specs).await.unwrap();
    let limit_one = QueuePatch {
        concurrency: Some(Some(1)),
        ..Default::default()
    };
    a.update_queue("limited", limit_one).await.unwrap();
    let claim_from = |queue: &str| ClaimRequest {
        queues: vec![queue.into()],
        ..claim_by("w", 10)
    };
    let free = a.claim(&claim_from("free")).await.unwrap().remove(0);
    let limited = a.claim(&claim_from("limited")).await.unwrap();
    assert_eq!(limited.len(), 1, "the limited queue's one slot");
    let (mut here, mut there) = (a.hub().watch_ready(), b.hub().watch_ready());
    here.borrow_and_update();
    there.borrow_and_update();
    let mut heard_there = b.hub().watch(Interest::Every).await;
    let complete = |id| vec![Ack::Complete { id, result: None }];
    a.ack("w", complete(free.id)).await.unwrap();
    assert!(
        !here.has_changed().unwrap(),
        "a task of a queue without a limit ended, and this node signalled ready"
    );
    // Node b hears a commit's notifications in the order sent, the ready
    // signal before the changes: once it has the change, a signal sent
    // with it has come. (The claims' changes may come before it.)
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = heard_there.recv().await.unwrap();
            if (event.task.id, event.task.state) == (free.id, State::Completed) {
                break;
            }
        }
    })
    .await
    .expect("node b heard the completion");
    assert!(
        !there.has_changed().unwrap(),
        "a task of a queue without a limit ended, and another node signalled ready"
    );
    a.ack("w", complete(limited[0].id)).await.unwrap();
    assert!(
        here.has_changed().unwrap(),
        "a limited queue's slot came free, and this node did not signal ready"
    );
    tokio::time::timeout(Duration::from_secs(10), there.changed())
        .await
        .expect("a limited queue's slot came free, and node b heard no ready signal")
        .unwrap();
    assert_eq!(b.claim(&claim_from("limited")).await.unwrap().len(), 1);
}

/// Three nodes sharing a schema of their own.
async fn three_nodes() -> [Arc<PgStore>; 3] {
    let schema = fresh_schema();
    [
        node(&schema).await,
        node(&schema).await,
        node(&schema).await,
    ]
}

/// Three claimers on each of `nodes` at once, each taking up to `limit` a
/// claim, `rounds` times or, without, until a claim comes back empty:
/// every task they claimed.
async fn claim_on_every_node(
    nodes: &[Arc<PgStore>],
    limit: usize,
    rounds: Option<usize>,
) -> Vec<offload_core::Task> {
    let mut handles = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for w in 0..3 {
            let store = Arc::clone(n);
            handles.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..rounds.unwrap_or(usize::MAX) {
                    let claimed = store
                        .claim(&claim_by(&format!("n{i}w{w}"), limit))
                        .await
                        .unwrap();
                    if claimed.is_empty() && rounds.is_none() {
                        break;
                    }
                    got.extend(claimed);
                }
                got
            }));
        }
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all
}

/// Claims from three nodes at once, over many queues limited to one task
/// running each, never run two of a queue's tasks at once: the queues'
/// rows, locked together for a claim, make the claims take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_from_several_nodes_keep_each_queues_limit() {
    if !available() {
        return;
    }
    let nodes = three_nodes().await;
    let specs = (0..200)
        .map(|i| {
            NewTask::new("t")
                .queue(format!("q{}", i % 40))
                .validate(&Limits::default(), Position::Alone)
                .unwrap()
        })
        .collect();
    nodes[0].enqueue(specs).await.unwrap();
    for q in 0..40 {
        nodes[0]
            .update_queue(
                &format!("q{q}"),
                QueuePatch {
                    concurrency: Some(Some(1)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let mut by_queue: std::collections::HashMap<String, usize> = Default::default();
    for task in claim_on_every_node(&nodes, 9, Some(4)).await {
        *by_queue.entry(task.queue).or_default() += 1;
    }
    assert_eq!(by_queue.len(), 40, "each queue gave a task: {by_queue:?}");
    let over: Vec<_> = by_queue.iter().filter(|(_, n)| **n > 1).collect();
    assert!(over.is_empty(), "queues running past their limit: {over:?}");
}

/// The plans of `statement` (parameters of `types`, run with `args`) under a
/// generic plan (what a prepared statement gets after a few runs, and what
/// the store asks for) with sequential scans priced out, in a schema of
/// Offload's tables, one for each of [`Held::EVERY_TEST`], each headed by
/// it. A session keeps the plan it made at its first run, and a table
/// PostgreSQL knows to be tiny, or to hold nothing pending, invites plans
/// that an empty one, which it assumes to be of some pages, does not. A
/// plan that cannot use the index meant for it shows as a scan without
/// that index's condition.
async fn generic_plans(url: &str, types: &str, statement: &str, args: &str) -> Vec<String> {
    let mut plans = Vec::new();
    for held in Held::EVERY_TEST {
        plans.push(generic_plan_beside(url, held, types, statement, args).await);
    }
    plans
}

/// What a plan test's table holds when its statement is planned, counted
/// by the table's statistics (`ANALYZE`d, as autovacuum does early in a
/// table's life and a migration's `CREATE INDEX` does).
#[derive(Clone, Copy, Debug)]
enum Held {
    /// A new table, never analyzed, which PostgreSQL takes to be of a few
    /// pages.
    Nothing,
    /// A table PostgreSQL knows to be tiny.
    ThreePending,
    /// 300 tasks scheduled over three queues and three types, none
    /// pending: a quiet application's table.
    ScheduledOnly,
    /// 300 pending tasks and 600 scheduled, over three queues and three
    /// types: pending tasks a third of the table.
    ThirdPending,
}

impl Held {
    /// What every plan test plans beside. Not [`Held::ThirdPending`]: a
    /// list of a state that makes up much of the table, planned so, walks
    /// the primary key newest first and filters by state, which is left
    /// as it is (a list is no claim or ack, and the next `ANALYZE`
    /// replans it).
    const EVERY_TEST: [Held; 3] = [Held::Nothing, Held::ThreePending, Held::ScheduledOnly];

    /// Stores what `self` says with `store` and analyzes the table over
    /// `conn`; leaves a new table as it is.
    async fn store_in(self, store: &PgStore, conn: &mut sqlx::PgConnection) {
        let (pending, scheduled) = match self {
            Held::Nothing => return,
            Held::ThreePending => (3, 0),
            Held::ScheduledOnly => (0, 300),
            Held::ThirdPending => (300, 600),
        };
        let hour = Duration::from_secs(3600);
        let tasks = (0..pending + scheduled)
            .map(|i| {
                let task = NewTask::new(format!("t{}", i % 3)).queue(format!("q{}", i / 3 % 3));
                let task = if i < pending { task } else { task.delay(hour) };
                task.validate(&Limits::default(), Position::Alone).unwrap()
            })
            .collect::<Vec<_>>();
        store.enqueue(tasks).await.expect("enqueue");
        sqlx::raw_sql("ANALYZE offload_tasks")
            .execute(conn)
            .await
            .expect("analyze");
    }
}

/// One of [`generic_plans`], beside what `held` says, headed by it.
async fn generic_plan_beside(
    url: &str,
    held: Held,
    types: &str,
    statement: &str,
    args: &str,
) -> String {
    let schema = fresh_schema();
    let store = node(&schema).await;
    let mut conn = connection_in(url, &schema).await;
    held.store_in(&store, &mut conn).await;
    for setting in [
        offload_postgres::sql::PLANNER_SETTINGS.to_owned(),
        format!("PREPARE statement ({types}) AS {statement}"),
    ] {
        // By the simple protocol, which takes several statements.
        sqlx::raw_sql(&setting)
            .execute(&mut conn)
            .await
            .expect(&setting);
    }
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE statement ({args})"))
        .fetch_all(&mut conn)
        .await
        .expect("explain");
    format!("(planned beside {held:?})\n{}", plan.join("\n"))
}

/// A node whose clock runs an hour ahead reads time as the database's, as
/// every other node does: its tasks fall due, and its leases and timeouts
/// end, when the others think so too.
#[tokio::test]
async fn a_node_whose_clock_is_off_reads_time_as_the_databases() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let hour = Duration::from_secs(3600);
    let open = |follow_database_clock| {
        let options = PgOptions {
            schema: schema.clone(),
            max_connections: 2,
            clock: Arc::new(ManualClock::new(SystemClock.now().saturating_add(hour))),
            follow_database_clock,
            ..PgOptions::default()
        };
        PgStore::open(&url, options)
    };
    let on_its_own = open(false).await.expect("open");
    let following = open(true).await.expect("open");
    let spec = || {
        NewTask::new("t")
            .validate(&Limits::default(), Position::Alone)
            .unwrap()
    };
    let run_at = |store: Arc<PgStore>| async move {
        let (task, _) = store
            .enqueue(vec![spec()])
            .await
            .expect("enqueue")
            .remove(0);
        task.run_at
    };
    let real = SystemClock.now();
    let off = run_at(on_its_own).await;
    assert!(
        off >= real.saturating_add(hour - Duration::from_secs(60)),
        "the clock given is an hour ahead: {off:?} against {real:?}"
    );
    let followed = run_at(following).await;
    let apart = followed.as_millis().abs_diff(real.as_millis());
    assert!(
        apart < 10_000,
        "a node following the database's clock set run_at {apart} ms from the database's time"
    );
}

/// The retention pass must reach finished tasks through a partial index on
/// their state.
#[tokio::test]
async fn retention_finds_finished_tasks_by_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    for plan in generic_plans(
        &url,
        "smallint, bigint, bigint",
        offload_postgres::sql::DELETE_FINISHED,
        "4, 0, 1000",
    )
    .await
    {
        let bounded_by_state = plan
            .lines()
            .any(|line| line.contains("Index Cond") && line.contains("state"));
        assert!(
            bounded_by_state && !plan.contains("Seq Scan on offload_tasks"),
            "the retention pass does not reach finished tasks through a state index:\n{plan}"
        );
    }
}

/// A list of one state or of several reaches each state's tasks newest
/// first through `offload_tasks_by_state`, not by walking the primary key
/// past every newer task of the other states.
#[tokio::test]
async fn lists_of_states_read_the_state_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    for states in [
        vec![State::Completed],
        vec![State::Failed, State::Completed],
        vec![State::Cancelled, State::Pending, State::Cancelled],
    ] {
        let query = offload_core::ListQuery {
            states: states.clone(),
            limit: 50,
            ..Default::default()
        };
        let list = offload_postgres::sql::list_tasks(&query, Some(1_000_000), 51, false);
        let statement = list.sql().to_owned();
        // Every parameter of a list of states alone is a seq or a row count.
        let parameters = statement.matches('$').count();
        let types = vec!["bigint"; parameters].join(", ");
        let args = vec!["51"; parameters].join(", ");
        for plan in generic_plans(&url, &types, &statement, &args).await {
            assert!(
                plan.contains("offload_tasks_by_state") && !plan.contains("offload_tasks_pkey"),
                "a list of {states:?} does not read offload_tasks_by_state:\n{plan}"
            );
        }
    }
}

/// A list of one owner's tasks in some states, read owner first, walks
/// `offload_tasks_by_owner` newest first and no index of states.
#[tokio::test]
async fn an_owners_list_read_owner_first_reads_the_owner_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    let query = offload_core::ListQuery {
        states: vec![State::Failed, State::Completed],
        owner: Some("alice".into()),
        limit: 50,
        ..Default::default()
    };
    let list = offload_postgres::sql::list_tasks(&query, Some(1_000_000), 51, true);
    let statement = list.sql().to_owned();
    // A seq, the states, the owner, the row count.
    for plan in generic_plans(
        &url,
        "bigint, smallint[], text, bigint",
        &statement,
        "1000000, '{4,5}', 'alice', 51",
    )
    .await
    {
        assert!(
            plan.contains("Index Scan Backward using offload_tasks_by_owner")
                && !plan.contains("offload_tasks_by_state")
                && !plan.contains("offload_tasks_finished"),
            "an owner's list does not walk offload_tasks_by_owner:\n{plan}"
        );
    }
}

/// A claim from all of many queues reads the first pending tasks through
/// the index that holds them in claim order, not by sorting them all.
#[tokio::test]
async fn a_claim_reads_the_first_pending_tasks_by_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    assert_walks_index_in_order(
        &url,
        ("bigint", offload_postgres::sql::CLAIM_ORDER_WINDOW, "1001"),
        "offload_tasks_claim_order",
    )
    .await;
}

/// A claim of one (queue, type), and of several, planned as a node's
/// sessions plan it on a new schema ([`generic_plans`], and where a third
/// of the tasks are pending), searches the pending tasks of its pairs by
/// queue and type, in claim order: walking the claim order of every pending
/// task instead, it filtered its way past every other pair's (74 ms a
/// claim behind 100,000 pending tasks of another type); and a count of the
/// pair's first pending tasks planned as a bitmap read all of the pair's
/// entries (12 ms a claim behind 100,000 of its own).
#[tokio::test]
async fn a_claim_of_pairs_searches_them_by_queue_and_type_though_planned_on_a_new_table() {
    let Some(url) = database_url() else {
        return;
    };
    for (types, statement, args) in [
        (
            "text, text, bigint, bigint",
            offload_postgres::sql::first_pending_of_pair(),
            "'default', 't', 500, 17",
        ),
        (
            "text[], text[], int8[]",
            offload_postgres::sql::PENDING_OF_PAIRS.to_owned(),
            "'{default,mail}', '{t,u}', '{10,10}'",
        ),
    ] {
        let mut plans = generic_plans(&url, types, &statement, args).await;
        let beside_pending = generic_plan_beside(&url, Held::ThirdPending, types, &statement, args);
        plans.push(beside_pending.await);
        for plan in plans {
            assert!(
                reads_tasks_only_through(&plan, "offload_tasks_ready_by_type"),
                "a claim of pairs does not search them by queue and type:\n{plan}"
            );
            assert!(!plan.contains("Sort"), "{plan}");
        }
    }
}

/// A claim naming many queues reads the types pending in each by walking
/// the index of pending tasks by queue and type, not by sorting them.
#[tokio::test]
async fn a_claim_reads_the_types_pending_in_named_queues_by_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    assert_walks_index_in_order(
        &url,
        (
            "text[]",
            offload_postgres::sql::PENDING_TYPES_OF_QUEUES,
            "ARRAY['a', 'b']",
        ),
        "offload_tasks_ready_by_type",
    )
    .await;
}

/// A claim from all queues, while few (queue, type) pairs hold pending
/// tasks, walks them through the index of pending tasks by queue and
/// type, reading no other index of tasks: planned beside a table
/// analyzed with nothing pending, it read every pending task through
/// `offload_tasks_by_state` and sorted them, at each claim (migration 7).
/// The plan sorts the pairs it found, which are few, and nothing else.
#[tokio::test]
async fn a_claim_walks_the_pending_pairs_by_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    for plan in generic_plans(&url, "bigint", offload_postgres::sql::PENDING_PAIRS, "257").await {
        assert!(
            reads_tasks_only_through(&plan, "offload_tasks_ready_by_type"),
            "the pending pairs are not walked through offload_tasks_ready_by_type:\n{plan}"
        );
    }
}

/// Whether `plan` (EXPLAIN's text) reads the tasks' table, and only
/// through `index`.
fn reads_tasks_only_through(plan: &str, index: &str) -> bool {
    let mut scans = plan
        .lines()
        .filter(|line| line.contains(" on offload_tasks"))
        .peekable();
    scans.peek().is_some() && scans.all(|scan| scan.contains(index))
}

/// That `statement` (its parameters' types, itself, the arguments it is
/// run with), under a generic plan, reads through `index` in the index's
/// order, sorting nothing.
async fn assert_walks_index_in_order(
    url: &str,
    (types, statement, args): (&str, &str, &str),
    index: &str,
) {
    for plan in generic_plans(url, types, statement, args).await {
        assert!(
            plan.contains(index) && !plan.contains("Sort"),
            "not read through {index} in its order:\n{plan}"
        );
    }
}

/// The statements that look tasks up by seq (an ack's and a read's, a
/// claim's lock of the tasks it picked, every write of tasks' rows, the
/// check of dependents' unmet dependencies), planned as a node's sessions
/// plan them on a new schema ([`generic_plans`]), read no task but through
/// the primary key, each read a search.
/// A plan made while the table is small is kept: one that read the whole
/// table, or the whole index of pending tasks, did so at every ack or claim
/// once thousands were stored.
#[tokio::test]
async fn lookups_by_seq_read_the_primary_key_though_planned_on_a_new_table() {
    let Some(url) = database_url() else {
        return;
    };
    use offload_postgres::sql::{
        BLOCKED_DEPENDENTS_OF, BY_SEQ, PENDING_BY_SEQ, WAITING_FOR_MORE, WRITE_TASK_ROWS,
        WRITE_TASK_ROWS_RECORDING_CHANGES,
    };
    let write_types = "bigint[], smallint[], int[], int[], bigint[], text[], text[], text[], \
                       text[], bool[], bigint[], bigint[], bigint[], bigint[], bigint[], text[]";
    let statements = [
        (
            "bigint[]",
            format!("SELECT seq FROM offload_tasks WHERE {BY_SEQ} FOR UPDATE"),
            "'{1,2}'".to_owned(),
        ),
        (
            "bigint[], smallint",
            format!("SELECT seq FROM offload_tasks WHERE {PENDING_BY_SEQ} FOR UPDATE SKIP LOCKED"),
            "'{1,2}', 2".to_owned(),
        ),
        (
            write_types,
            WRITE_TASK_ROWS.to_owned(),
            vec!["NULL"; 16].join(", "),
        ),
        (
            &format!(
                "{write_types}, uuid[], text[], text[], smallint[], bigint[], text, text[], \
                 text[], text"
            ),
            WRITE_TASK_ROWS_RECORDING_CHANGES.to_owned(),
            vec!["NULL"; 25].join(", "),
        ),
        (
            "bigint[]",
            WAITING_FOR_MORE.to_owned(),
            "'{1,2}'".to_owned(),
        ),
        (
            "uuid[], smallint",
            format!("SELECT seq FROM offload_tasks WHERE {BLOCKED_DEPENDENTS_OF} FOR UPDATE"),
            format!("'{{{}}}', 0", Uuid::now_v7()),
        ),
    ];
    for (types, statement, args) in statements {
        for plan in generic_plans(&url, types, &statement, &args).await {
            let indexes_read = plan.matches("offload_tasks_").count();
            let primary_key_read = plan.matches("offload_tasks_pkey").count();
            assert!(
                primary_key_read > 0
                    && indexes_read == primary_key_read
                    && !plan.contains("Seq Scan")
                    && every_primary_key_read_is_a_search(&plan),
                "{statement}\nreads more than the primary key's entries:\n{plan}"
            );
        }
    }
}

/// Whether each read of `offload_tasks_pkey` in `plan` (EXPLAIN's text)
/// searches it by a condition: an index scan without one walks every task
/// in seq order, as the ack's look for blocked dependents did under a
/// generic plan made on a table of blocked tasks.
fn every_primary_key_read_is_a_search(plan: &str) -> bool {
    let lines: Vec<&str> = plan.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    lines.iter().enumerate().all(|(i, line)| {
        if !line.contains("using offload_tasks_pkey") {
            return true;
        }
        // The node's own details are the lines below it, indented further,
        // up to its first child node or the next node.
        lines[i + 1..]
            .iter()
            .take_while(|detail| indent(detail) > indent(line) && !detail.contains("->"))
            .any(|detail| detail.trim_start().starts_with("Index Cond:"))
    })
}

/// A list with label filters past its walk of the newest tasks finds the
/// labels' tasks through `offload_tasks_labels`, not by walking the
/// primary key past every task without them; and it reads the rows of
/// those tasks by primary key, with every filter a list may have.
#[tokio::test]
async fn a_labels_tasks_are_found_through_the_labels_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    let labels = vec![
        ("project".to_owned(), "p1".to_owned()),
        ("team".to_owned(), "t".to_owned()),
    ];
    let found = offload_postgres::sql::labelled_below(&labels, Some(1_000_000), 1_000);
    for plan in generic_plans(
        &url,
        "jsonb, jsonb, bigint, bigint",
        found.sql(),
        r#"'{"project": "p1"}', '{"team": "t"}', 1000000, 1000"#,
    )
    .await
    {
        assert!(
            plan.contains("offload_tasks_labels") && !plan.contains("offload_tasks_pkey"),
            "a label's tasks are not found through offload_tasks_labels:\n{plan}"
        );
    }
    let query = offload_core::ListQuery {
        states: vec![State::Completed, State::Pending],
        task_type: Some("t".into()),
        queue: Some("q".into()),
        owner: Some("o".into()),
        labels,
        created_after: Some(offload_core::Timestamp::from_millis(0)),
        created_before: Some(offload_core::Timestamp::from_millis(1)),
        limit: 50,
        ..Default::default()
    };
    let rows = offload_postgres::sql::listed_among(&query, vec![1, 2]);
    for plan in generic_plans(
        &url,
        "bigint[], smallint[], text, text, text, bigint, bigint, jsonb, jsonb",
        rows.sql(),
        r#"'{1,2}', '{4,2}', 't', 'q', 'o', 0, 1, '{"project": "p1"}', '{"team": "t"}'"#,
    )
    .await
    {
        assert!(
            plan.matches("offload_tasks_").count() == plan.matches("offload_tasks_pkey").count()
                && plan.contains("offload_tasks_pkey"),
            "the listed tasks' rows are not read by primary key alone:\n{plan}"
        );
    }
}

/// The holders of the unique keys a batch names are found through the
/// index of held keys, whatever the table's size when planned.
#[tokio::test]
async fn held_unique_keys_are_found_by_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    for plan in generic_plans(
        &url,
        "text[], text[], smallint",
        &format!(
            "SELECT seq FROM offload_tasks WHERE {} ORDER BY seq FOR UPDATE",
            offload_postgres::sql::HOLDING_UNIQUE_KEYS
        ),
        "'{default}', '{k}', 3",
    )
    .await
    {
        // Each scan of the index searches it by queue and key: one whose
        // condition is only the index's own reads every active keyed task.
        let scans: Vec<&str> = plan
            .lines()
            .enumerate()
            .filter(|(_, line)| line.contains("offload_tasks_unique_key"))
            .map(|(at, _)| plan.lines().nth(at + 1).unwrap_or(""))
            .collect();
        assert!(
            !scans.is_empty()
                && scans
                    .iter()
                    .all(|cond| cond.contains("queue =") && cond.contains("unique_key =")),
            "held keys are not looked up by key:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }
}

/// An id that carries no seq (stored before schema version 3) is found
/// through the index of such ids, not by a scan of every task.
#[tokio::test]
async fn ids_that_carry_no_seq_are_found_by_index_under_a_generic_plan() {
    let Some(url) = database_url() else {
        return;
    };
    for plan in generic_plans(
        &url,
        "uuid[]",
        &format!(
            "SELECT seq FROM offload_tasks WHERE {}",
            offload_postgres::sql::BY_ID_NOT_CARRYING_SEQ
        ),
        &format!("'{{{}}}'", uuid::Uuid::now_v7()),
    )
    .await
    {
        assert!(
            plan.contains("offload_tasks_id_not_carrying_seq") && !plan.contains("Seq Scan"),
            "ids without a seq are not looked up by index:\n{plan}"
        );
    }
}

/// Tasks stored under schema version 2, whose ids carry no seq, are found
/// by id after the upgrade: read, claimed and acked, depended on by new
/// tasks, and their own dependencies still resolve.
#[tokio::test]
async fn tasks_stored_before_ids_carried_their_seq_are_still_found_by_id() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let old = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
    {
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let mut setup = vec![
            format!("CREATE SCHEMA {schema}"),
            format!("SET search_path = {schema}"),
            include_str!("../migrations/0001_init.sql").to_owned(),
            include_str!("../migrations/0002_fewer_index_writes.sql").to_owned(),
            "CREATE TABLE offload_schema_migrations (version integer PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now()); \
             INSERT INTO offload_schema_migrations (version) VALUES (1), (2); \
             INSERT INTO offload_queues (name, created_at) VALUES ('default', 1795000000000); \
             INSERT INTO offload_counts VALUES ('default', 'old', 2, 2), ('default', 'old', 0, 1);"
                .to_owned(),
        ];
        // Two pending tasks, and a blocked one waiting for the second.
        for (i, id) in old.iter().enumerate() {
            let state = if i == 2 { 0 } else { 2 };
            setup.push(format!(
                "INSERT INTO offload_tasks (id, type, queue, payload, priority, state, attempt, \
                 max_attempts, timeout_secs, run_at, created_at, updated_at) \
                 VALUES ('{id}', 'old', 'default', '{{}}', 0, {state}, 0, 3, 60, 1795000000000, \
                 1795000000000, 1795000000000)"
            ));
        }
        setup.push(format!(
            "INSERT INTO offload_task_deps (dep_id, task_seq) \
             SELECT '{}', seq FROM offload_tasks WHERE id = '{}'",
            old[1], old[2]
        ));
        for sql in &setup {
            sqlx::raw_sql(sql).execute(&mut conn).await.expect(sql);
        }
    }
    let store = node(&schema).await;
    assert_eq!(store.get(old[0]).await.unwrap().unwrap().id, old[0]);
    let claim = claim_by("w", 10);
    let claimed: Vec<Uuid> = store
        .claim(&claim)
        .await
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(claimed, old[..2], "claimed in their old order");
    let spec = NewTask::new("new")
        .depends_on(old[0])
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let (new, _) = store.enqueue(vec![spec]).await.unwrap().remove(0);
    assert_eq!(new.state, State::Blocked);
    assert!(
        offload_core::seq_carried_by(new.id).is_some(),
        "a new task's id carries its seq: {}",
        new.id
    );
    let completed = |id| Ack::Complete { id, result: None };
    let outcomes = store
        .ack("w", vec![completed(old[0]), completed(old[1])])
        .await
        .unwrap();
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(
        store.get(new.id).await.unwrap().unwrap().state,
        State::Pending,
        "unblocked by its old dependency"
    );
    assert_eq!(
        store.get(old[2]).await.unwrap().unwrap().state,
        State::Pending,
        "an old blocked task unblocked by its old dependency"
    );
    store.close();
}

/// How long a dropped operation's connection may take to leave its
/// transaction: far more than its rollback takes on any machine, far less
/// than forever.
const ROLLBACK_PATIENCE: Duration = Duration::from_secs(10);

/// A caller may go away at any point of an operation (a worker's connection
/// drops during a claim, a timeout fires). Whatever the point, the
/// connection must go back to the pool outside any transaction: one left
/// inside would run the next operation in a stale transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_dropped_midway_leave_no_transaction_open() {
    let Some(url) = database_url() else {
        return;
    };
    let app = format!("offload_dropped_{}", uuid::Uuid::now_v7().simple());
    let separator = if url.contains('?') { '&' } else { '?' };
    let tagged = format!("{url}{separator}application_name={app}");
    let options = PgOptions {
        schema: fresh_schema(),
        max_connections: 2,
        ..PgOptions::default()
    };
    let store = PgStore::open(&tagged, options).await.expect("open");
    let spec = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let checker = sqlx::PgPool::connect(&url).await.expect("connect");
    let open_transactions = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
        )
        .bind(&app)
        .fetch_one(&checker)
        .await
        .expect("query pg_stat_activity")
    };
    let connected: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&app)
            .fetch_one(&checker)
            .await
            .expect("query pg_stat_activity");
    assert!(
        connected > 0,
        "the store's connections carry application_name {app}"
    );
    let mut dropped = 0;
    for i in 0..300u64 {
        // Deadlines from 10 µs to 1 ms: some fall inside BEGIN's round
        // trip, some inside the body, some inside COMMIT.
        let deadline = Duration::from_micros(10 + (i % 50) * 20);
        // tokio's timers tick in milliseconds; this deadline is exact.
        let expired = async {
            let until = std::time::Instant::now() + deadline;
            while std::time::Instant::now() < until {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            _ = store.enqueue(vec![spec.clone()]) => continue,
            () = expired => {}
        }
        dropped += 1;
        // A dropped transaction's rollback goes out when sqlx returns its
        // connection to the pool, on a task of its own, once the statement
        // in flight has finished: on a loaded machine that has taken more
        // than 20 ms. A connection left inside a transaction with no
        // rollback on its way stays so until another operation takes it,
        // and no other operation runs while this waits.
        let dropped_at = std::time::Instant::now();
        while open_transactions().await > 0 {
            assert!(
                dropped_at.elapsed() < ROLLBACK_PATIENCE,
                "a connection was still inside a transaction {ROLLBACK_PATIENCE:?} after drop \
                 {dropped} (attempt {i})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(
        dropped > 0,
        "no operation was dropped midway; the test proved nothing"
    );
    for _ in 0..4 {
        store.enqueue(vec![spec.clone()]).await.expect("enqueue");
    }
}

/// An id made up to carry a stored task's seq names no task, and does not
/// hide that task when both are asked for at once.
#[tokio::test]
async fn a_made_up_id_with_a_stored_seq_finds_nothing() {
    if !available() {
        return;
    }
    let store = node(&fresh_schema()).await;
    let spec = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    let (task, _) = store.enqueue(vec![spec]).await.unwrap().remove(0);
    let seq = offload_core::seq_carried_by(task.id).expect("a new id carries its seq");
    let made_up = offload_core::id_carrying_seq(offload_core::Timestamp::from_millis(1), seq);
    assert!(store.get(made_up).await.unwrap().is_none());
    let claim = claim_by("w", 1);
    assert_eq!(store.claim(&claim).await.unwrap()[0].id, task.id);
    let completed = |id| Ack::Complete { id, result: None };
    let outcomes = store
        .ack("w", vec![completed(task.id), completed(made_up)])
        .await
        .unwrap();
    assert_eq!(outcomes[0].as_ref().unwrap().state, State::Completed);
    assert!(outcomes[1].is_err(), "{outcomes:?}");
    store.close();
}

/// `drop_schema` removes an installation, tasks and all, while the node
/// that made it is still connected; it never drops `public` or a name it
/// would have to quote.
#[tokio::test]
async fn drop_schema_removes_an_installation_and_refuses_public() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let store = node(&schema).await;
    store
        .enqueue(vec![
            NewTask::new("t")
                .validate(&Limits::default(), Position::Alone)
                .expect("valid"),
        ])
        .await
        .expect("enqueue");
    let schemas_named = |name: String| {
        let url = url.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_namespace WHERE nspname = $1")
                .bind(name)
                .fetch_one(&mut conn)
                .await
                .expect("count schemas")
        }
    };
    assert_eq!(schemas_named(schema.clone()).await, 1);

    offload_postgres::drop_schema(&url, &schema)
        .await
        .expect("drop");
    assert_eq!(schemas_named(schema.clone()).await, 0);
    // Dropping what is gone is not an error: a cleanup may run twice.
    offload_postgres::drop_schema(&url, &schema)
        .await
        .expect("drop again");

    for refused in ["public", "", "Bad", "x; DROP TABLE y"] {
        let err = offload_postgres::drop_schema(&url, refused)
            .await
            .expect_err(refused);
        assert!(err.to_string().contains("schema"), "{refused:?}: {err}");
    }
    assert_eq!(schemas_named("public".into()).await, 1);
    store.close();
}

/// A node whose notification connection went silent (a NAT or firewall
/// that forgot it while it was quiet, a database host gone without a word)
/// notices that not even its own keep-alives arrive and listens again on a
/// new connection; it heard no other node again, for good. The silent
/// listener, and the keep-alives sent on connections gone silent, leave
/// the store's pool all its places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listens_again_when_its_notification_connection_goes_silent() {
    let Some(url) = database_url() else { return };
    let (relayed_url, silence) = through_relay(&url).await;
    let schema = fresh_schema();
    let direct = node(&schema).await;
    let relayed = PgStore::open(
        &relayed_url,
        PgOptions {
            schema: schema.clone(),
            max_connections: 2,
            listener_keepalive: Duration::from_millis(300),
            ..PgOptions::default()
        },
    )
    .await
    .expect("open through the relay");
    let mut events = relayed.hub().watch(Interest::Every).await;
    silence();
    let spec = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    // Changes made while it cannot hear are lost to it (notifications are
    // hints); one made after it listens again reaches it.
    let heard = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let task = direct
                .enqueue(vec![spec.clone()])
                .await
                .unwrap()
                .remove(0)
                .0;
            let wait = tokio::time::sleep(Duration::from_millis(500));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    event = events.recv() => {
                        if event.is_ok_and(|event| event.task.id == task.id) {
                            return;
                        }
                    }
                    () = &mut wait => break,
                }
            }
        }
    })
    .await;
    assert!(
        heard.is_ok(),
        "the relayed node never heard the other again"
    );
    // Its idle connections went silent too: the pool's test of each on
    // taking it out fails at the pool's timeout and drops it.
    let served = enqueue_until_served(&relayed, &spec, Duration::from_secs(30)).await;
    assert!(
        served.is_ok(),
        "the relayed node's pool had no place for a new connection: {served:?}"
    );
}

/// Operations whose connections go silent while their statements are in
/// flight fail within the operation time limit, and their connections are
/// closed rather than handed back to the pool. Handed back, each was first
/// tested by the pool with a round trip of no limit of its own, which held
/// its place until the kernel gave up on the connection (a quarter of an
/// hour), and a node whose every place was so held failed every operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_connections_gone_silent_fail_in_time_and_free_their_places() {
    let Some(url) = database_url() else { return };
    let (relayed_url, silence) = through_relay(&url).await;
    let schema = fresh_schema();
    let _leader = node(&schema).await;
    let limit = Duration::from_secs(2);
    let relayed = PgStore::open(
        &relayed_url,
        PgOptions {
            schema: schema.clone(),
            max_connections: 2,
            operation_timeout: limit,
            ..PgOptions::default()
        },
    )
    .await
    .expect("open through the relay");
    let spec = NewTask::new("t")
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
    // Enqueues wait on the server for this lock: in flight, on both of
    // the pool's connections, when they go silent.
    let mut locker = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; LOCK TABLE {schema}.offload_tasks IN SHARE MODE"
    ))
    .execute(&mut locker)
    .await
    .unwrap();
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let (relayed, spec) = (Arc::clone(&relayed), spec.clone());
            tokio::spawn(async move { relayed.enqueue(vec![spec]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    silence();
    for enqueue in in_flight {
        let outcome = tokio::time::timeout(Duration::from_secs(20), enqueue)
            .await
            .expect("an enqueue on a silent connection answers within its limit")
            .unwrap();
        match outcome {
            Err(offload_core::Error::Unavailable(message)) => {
                assert!(message.contains("did not answer"), "{message}");
            }
            other => panic!("expected the database to count as out of reach: {other:?}"),
        }
    }
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();
    // The given-up enqueues go on in their sessions once the lock is
    // free, and hold what they inserted until the server ends them, idle
    // in their transactions for the limit; the relay keeps their
    // connections up, as a NAT that has not yet forgotten them would.
    let served = enqueue_until_served(&relayed, &spec, Duration::from_secs(20)).await;
    assert!(
        served.is_ok(),
        "the node never served again; the pool had no place for a new connection: {served:?}"
    );
}

/// Enqueues `spec` on `store` until an enqueue succeeds, for up to
/// `patience`; past it, the last error, if any came.
async fn enqueue_until_served(
    store: &PgStore,
    spec: &TaskSpec,
    patience: Duration,
) -> Result<(), Option<offload_core::Error>> {
    let mut last = None;
    let served = tokio::time::timeout(patience, async {
        loop {
            match store.enqueue(vec![spec.clone()]).await {
                Ok(_) => return,
                Err(e) => last = Some(e),
            }
        }
    })
    .await;
    served.map_err(|_| last)
}

/// A relay in front of the PostgreSQL server `url` names (see
/// `silencing_relay`): the URL through it, and what silences its
/// connections open at the moment it is called.
async fn through_relay(url: &str) -> (String, impl Fn()) {
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("a PostgreSQL URL");
    let host = match options.get_host() {
        "localhost" => "127.0.0.1",
        host => host,
    };
    let server = format!("{host}:{}", options.get_port())
        .parse()
        .expect("a numeric host, or localhost, in OFFLOAD_TEST_PG_URL");
    let (relay, silence) = offload_storetest::relay::silencing_relay(server).await;
    let port = format!(":{}/", options.get_port());
    assert!(
        url.contains(&port),
        "OFFLOAD_TEST_PG_URL names its port, as in postgres://u@127.0.0.1:5432/db"
    );
    let relayed = url
        .replacen(&port, &format!(":{}/", relay.port()), 1)
        .replacen("localhost", "127.0.0.1", 1);
    (relayed, silence)
}

/// `url` with the query parameters `params` (`key=value&…`) added.
fn with_params(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

/// A node of two connections at `url`, in `schema`.
async fn small_node(url: &str, schema: &str) -> offload_core::Result<Arc<PgStore>> {
    let options = PgOptions {
        schema: schema.to_owned(),
        max_connections: 2,
        ..PgOptions::default()
    };
    PgStore::open(url, options).await
}

/// An enqueue of one task named `t`.
fn one_task() -> Vec<TaskSpec> {
    tasks_of_type_t(1)
}

/// `n` tasks of type `t` with nothing else set, ready to enqueue.
fn tasks_of_type_t(n: usize) -> Vec<TaskSpec> {
    (0..n)
        .map(|_| {
            NewTask::new("t")
                .validate(&Limits::default(), Position::Alone)
                .unwrap()
        })
        .collect()
}

/// A database whose disk is full answers writes with an error of its own
/// (`disk_full`, SQLSTATE 53100) and reads as before. That is the database
/// out of service for writes, as one out of reach is (HTTP 503, try
/// again), not a fault of Offload's (500, which it was); and `/health`
/// (`count_stuck`) says so until a write goes through again, where it
/// only read and said ok.
#[tokio::test]
async fn a_full_disk_is_out_of_service_and_health_says_so_until_writes_go_through() {
    let Some(url) = database_url() else { return };
    let schema = fresh_schema();
    let store = node(&schema).await;
    store.enqueue(one_task()).await.expect("writes go through");
    assert!(store.count_stuck(Duration::from_secs(5)).await.is_ok());
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    // What PostgreSQL answers when a table's file cannot grow, for every
    // table, as on a full disk.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION {schema}.full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; \
         END $$; \
         CREATE TRIGGER full_disk BEFORE INSERT ON {schema}.offload_tasks \
           FOR EACH STATEMENT EXECUTE FUNCTION {schema}.full_disk(); \
         CREATE TRIGGER full_disk BEFORE INSERT ON {schema}.offload_counts \
           FOR EACH STATEMENT EXECUTE FUNCTION {schema}.full_disk();"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    match store.enqueue(one_task()).await {
        Err(offload_core::Error::Unavailable(message)) => {
            assert!(message.contains("No space left on device"), "{message}");
        }
        other => panic!("expected the database to be out of service: {other:?}"),
    }
    match store.count_stuck(Duration::from_secs(5)).await {
        Err(offload_core::Error::Unavailable(message)) => {
            assert!(message.starts_with("writes fail:"), "{message}");
            assert!(message.contains("No space left on device"), "{message}");
        }
        other => panic!("expected /health to say that writes fail: {other:?}"),
    }
    assert_eq!(store.stats().await.unwrap().total.pending, 1, "reads go on");
    sqlx::raw_sql(&format!(
        "DROP TRIGGER full_disk ON {schema}.offload_tasks; \
         DROP TRIGGER full_disk ON {schema}.offload_counts;"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    assert!(
        store.count_stuck(Duration::from_secs(5)).await.is_ok(),
        "/health finds with a write of its own that writes go through again"
    );
    store.enqueue(one_task()).await.expect("writes go through");
    assert_eq!(store.stats().await.unwrap().total.pending, 2);
}

/// A database that has turned read-only under a running node (a primary
/// demoted to a standby in a failover, or `default_transaction_read_only`
/// switched on) ends the node's sessions and takes new ones read-only:
/// its writes are out of service (503), not faults (500), and `/health`
/// says so before any write has failed.
#[tokio::test]
async fn a_database_turned_read_only_is_out_of_service_and_health_says_so() {
    let Some(url) = database_url() else { return };
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let role = format!("offload_{}", Uuid::now_v7().simple());
    sqlx::raw_sql(&format!("CREATE ROLE {role} LOGIN SUPERUSER"))
        .execute(&mut admin)
        .await
        .unwrap();
    let store = small_node(&with_params(&url, &format!("user={role}")), &fresh_schema())
        .await
        .expect("open as the role");
    store.enqueue(one_task()).await.expect("writes go through");
    // The failover: the role's sessions end, and those that the node
    // opens again are read-only.
    sqlx::raw_sql(&format!(
        "ALTER ROLE {role} SET default_transaction_read_only = on; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
           WHERE usename = '{role}' AND pid <> pg_backend_pid();"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let health = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match store.count_stuck(Duration::from_secs(5)).await {
                Err(offload_core::Error::Unavailable(message)) if message.contains("read-only") => {
                    return message;
                }
                // A session the failover ended, met before the pool opens
                // another.
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("/health says that the database is read-only");
    assert!(health.starts_with("writes fail:"), "{health}");
    let enqueued = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match store.enqueue(one_task()).await {
                Err(offload_core::Error::Unavailable(message))
                    if message.contains("read-only transaction") =>
                {
                    return Ok(message);
                }
                Err(offload_core::Error::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return Err(format!("{other:?}")),
            }
        }
    })
    .await
    .expect("an enqueue answers");
    assert!(
        enqueued.is_ok(),
        "expected the database to be out of service for writes: {enqueued:?}"
    );
    store.close();
    drop(store);
    remove_role(&url, &role).await;
}

/// Managed PostgreSQL services take connections over TLS only, and a URL
/// says so with `sslmode=require` (or `verify-ca`, `verify-full` with
/// `sslrootcert`): each of the node's connections (the pool's, the
/// listener's, the leader's) is then encrypted. A server without TLS
/// refuses such a URL with the reason.
#[tokio::test]
async fn a_url_that_asks_for_tls_gets_only_encrypted_connections() {
    let Some(url) = database_url() else { return };
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let server_tls: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let name = format!("offload_tls_{}", Uuid::now_v7().simple());
    let opened = small_node(
        &with_params(&url, &format!("sslmode=require&application_name={name}")),
        &fresh_schema(),
    )
    .await;
    if server_tls != "on" {
        let refused = opened.expect_err("a server without TLS refuses a URL that requires it");
        assert!(refused.to_string().contains("TLS"), "{refused}");
        eprintln!(
            "this PostgreSQL has ssl = {server_tls}: checked only that a URL requiring TLS is refused with the reason"
        );
        return;
    }
    let store = opened.expect("open over TLS");
    store
        .enqueue(one_task())
        .await
        .expect("an enqueue over TLS");
    assert_eq!(store.stats().await.unwrap().total.pending, 1);
    let (connections, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
    )
    .bind(&name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        connections >= 2,
        "the pool's and the listener's: {connections}"
    );
    assert_eq!(encrypted, connections, "every connection is encrypted");
}

/// The startup parameters PgBouncer takes from a client; it refuses a
/// connection that carries any other, unless told to ignore it.
const POOLER_TAKES: &[&str] = &[
    "user",
    "database",
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// A relay to the PostgreSQL server `url` names that does at a
/// connection's start what PgBouncer does: it declines TLS, and refuses a
/// startup message with a parameter outside [`POOLER_TAKES`], with
/// PgBouncer's error. The URL through it, and the parameters it refused.
async fn through_pooler(url: &str) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SSL_REQUEST: u32 = 80_877_103;
    let (server, listener, relayed) = relay_listener(url).await;
    let refused = Arc::new(std::sync::Mutex::new(Vec::new()));
    let refusing = Arc::clone(&refused);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (server, refusing) = (server.clone(), Arc::clone(&refusing));
            tokio::spawn(async move {
                let message = loop {
                    let length = client.read_u32().await.unwrap() as usize;
                    let mut body = vec![0; length - 4];
                    client.read_exact(&mut body).await.unwrap();
                    if body[..4] == SSL_REQUEST.to_be_bytes() {
                        client.write_all(b"N").await.unwrap();
                        continue;
                    }
                    let mut message = (length as u32).to_be_bytes().to_vec();
                    message.extend_from_slice(&body);
                    break message;
                };
                let fields: Vec<&[u8]> = message[8..].split(|b| *b == 0).collect();
                let unsupported = fields
                    .chunks(2)
                    .map(|pair| String::from_utf8_lossy(pair[0]).into_owned())
                    .find(|key| !key.is_empty() && !POOLER_TAKES.contains(&key.as_str()));
                if let Some(key) = unsupported {
                    let mut error = b"SFATAL\0C08P01\0M".to_vec();
                    error.extend_from_slice(
                        format!("unsupported startup parameter: {key}\0\0").as_bytes(),
                    );
                    let mut answer = vec![b'E'];
                    answer.extend_from_slice(&(error.len() as u32 + 4).to_be_bytes());
                    answer.extend_from_slice(&error);
                    let _ = client.write_all(&answer).await;
                    refusing.lock().unwrap().push(key);
                    return;
                }
                let mut upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                upstream.write_all(&message).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (relayed, refused)
}

/// A listener for a relay to the PostgreSQL server `url` names: the
/// server's address, the listener, and the URL through it.
async fn relay_listener(url: &str) -> (String, tokio::net::TcpListener, String) {
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("a PostgreSQL URL");
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let relayed = url.replacen(
        &format!(":{}/", options.get_port()),
        &format!(":{port}/"),
        1,
    );
    assert_ne!(relayed, url, "OFFLOAD_TEST_PG_URL names its port");
    (
        server,
        listener,
        relayed.replacen("localhost", "127.0.0.1", 1),
    )
}

/// A connection pooler before PostgreSQL, PgBouncer in session mode, takes
/// a handful of startup parameters and refuses any other: it refused
/// every node (`unsupported startup parameter: extra_float_digits`, then
/// `options`, which carried the node's session settings). The settings
/// are SET once a connection is open, and they hold: the node works in
/// its own schema, and hears another node's enqueue over its LISTEN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_works_through_a_pooler_that_takes_only_the_usual_startup_parameters() {
    let Some(url) = database_url() else { return };
    let (pooled_url, refused) = through_pooler(&url).await;
    let schema = fresh_schema();
    let pooled = small_node(&pooled_url, &schema).await;
    assert_eq!(*refused.lock().unwrap(), Vec::<String>::new());
    let pooled = pooled.expect("open through the pooler");
    let direct = node(&schema).await;
    let mut ready = pooled.hub().watch_ready();
    ready.borrow_and_update();
    let task = direct.enqueue(one_task()).await.unwrap().remove(0).0;
    tokio::time::timeout(Duration::from_secs(10), ready.changed())
        .await
        .expect("the node behind the pooler heard of the task")
        .unwrap();
    let claimed = pooled.claim(&claim_by("w", 10)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, task.id);
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let stored: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM {schema}.offload_tasks WHERE state = 3"
    ))
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(stored, 1, "the node works in its own schema");
    assert_eq!(*refused.lock().unwrap(), Vec::<String>::new());
}

/// A database's owner gives an application a schema of its own and no
/// right to create anything else, as managed databases are run: a node
/// whose role owns its schema starts, migrates it and works. It refused to
/// start (`permission denied for database`): `CREATE SCHEMA IF NOT
/// EXISTS` asks for the right to create schemas even when the schema is
/// there.
#[tokio::test]
async fn a_role_that_owns_only_its_schema_starts_a_node_in_it() {
    let Some(url) = database_url() else { return };
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let role = format!("offload_{}", Uuid::now_v7().simple());
    let schema = fresh_schema();
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN; CREATE SCHEMA {schema} AUTHORIZATION {role};"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let may_create: bool = sqlx::query_scalar(&format!(
        "SELECT has_database_privilege('{role}', current_database(), 'CREATE')"
    ))
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(!may_create, "the role may not create schemas");
    let opened = small_node(&with_params(&url, &format!("user={role}")), &schema).await;
    let store = opened.expect("a node starts in the schema its role owns");
    store.enqueue(one_task()).await.expect("an enqueue");
    assert_eq!(store.claim(&claim_by("w", 1)).await.unwrap().len(), 1);
    store.close();
    drop(store);
    remove_role(&url, &role).await;
}

/// Nodes started together on a schema that does not exist yet (a first
/// deployment of several nodes, or its restart after the schema was
/// dropped) all start: one creates the schema and migrates it, the others
/// wait for it and find it done. Each found the schema missing and all but
/// one failed to create it ("duplicate key value violates unique
/// constraint pg_namespace_nspname_index") before the migration's lock
/// came first.
#[tokio::test]
async fn nodes_started_together_on_a_new_schema_all_start() {
    let Some(url) = database_url() else { return };
    for _ in 0..3 {
        let schema = fresh_schema();
        let opened = futures::future::join_all((0..6).map(|_| small_node(&url, &schema))).await;
        for node in &opened {
            if let Err(e) = node {
                panic!("a node did not start on the new schema {schema}: {e}");
            }
        }
        let node = opened.into_iter().next().unwrap().unwrap();
        node.enqueue(one_task())
            .await
            .expect("enqueue on the new schema");
        offload_postgres::drop_schema(&url, &schema).await.unwrap();
    }
}

/// A node whose role PostgreSQL lets open five connections: its listener,
/// its leader's and three in its pool, which may open eight. In a schema
/// and as a role of its own, both removed by [`LimitedNode::remove`].
struct LimitedNode {
    store: Arc<PgStore>,
    role: String,
    schema: String,
}

impl LimitedNode {
    async fn open(url: &str) -> Self {
        let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
        let role = format!("offload_{}", Uuid::now_v7().simple());
        let schema = fresh_schema();
        sqlx::raw_sql(&format!(
            "CREATE ROLE {role} LOGIN CONNECTION LIMIT 5; \
             CREATE SCHEMA {schema} AUTHORIZATION {role};"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let options = PgOptions {
            schema: schema.clone(),
            max_connections: 8,
            ..PgOptions::default()
        };
        let store = PgStore::open(&with_params(url, &format!("user={role}")), options)
            .await
            .expect("open as the role");
        store.enqueue(one_task()).await.expect("an enqueue");
        Self {
            store,
            role,
            schema,
        }
    }

    /// A connection of the test's own holding a lock on the node's tasks
    /// until it rolls back: every enqueue waits on it, holding its
    /// connection.
    async fn lock_tasks(&self, url: &str) -> sqlx::PgConnection {
        let mut locker = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(&format!(
            "BEGIN; LOCK TABLE {}.offload_tasks IN ACCESS EXCLUSIVE MODE;",
            self.schema
        ))
        .execute(&mut locker)
        .await
        .unwrap();
        locker
    }

    /// `n` enqueues of a batch of two tasks each, started together, each
    /// task with a unique key of its own: so each takes a transaction, and
    /// a connection, of its own, where tasks without one, and single tasks
    /// with one, share them.
    fn enqueues_at_once(&self, n: usize) -> Vec<tokio::task::JoinHandle<offload_core::Result<()>>> {
        (0..n)
            .map(|i| {
                let store = Arc::clone(&self.store);
                let batch = (0..2)
                    .map(|j| {
                        NewTask::new("t")
                            .unique_key(format!("k{i}-{j}"), OnConflict::Keep)
                            .validate(&Limits::default(), Position::InBatch(j))
                            .unwrap()
                    })
                    .collect();
                tokio::spawn(async move { store.enqueue(batch).await.map(drop) })
            })
            .collect()
    }

    async fn remove(self, url: &str) {
        self.store.close();
        drop(self.store);
        remove_role(url, &self.role).await;
    }
}

/// Rolls back `locker`'s transaction, letting the enqueues it held go on,
/// and collects what each of `waiting` answered.
async fn unlock_and_collect(
    mut locker: sqlx::PgConnection,
    waiting: Vec<tokio::task::JoinHandle<offload_core::Result<()>>>,
) -> Vec<offload_core::Result<()>> {
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();
    let outcomes = futures::future::join_all(waiting).await;
    outcomes.into_iter().map(Result::unwrap).collect()
}

/// Ends a test's role's sessions and drops the role with all it owns (its
/// schema, and the node's tables in it).
async fn remove_role(url: &str, role: &str) {
    let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'; \
         DROP OWNED BY {role}; DROP ROLE {role};"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
}

/// When PostgreSQL refuses the node another connection (its
/// `max_connections`, or here the role's connection limit, which nodes'
/// pools together outgrow), a request that waited for one in vain is told
/// why, where it was told only that the pool timed out.
#[tokio::test]
async fn a_request_left_without_a_connection_says_that_postgresql_refuses_more() {
    let Some(url) = database_url() else { return };
    let limited = LimitedNode::open(&url).await;
    // Enqueues wait on a lock, each holding its connection, until the
    // pool has opened all the role may and the next finds none.
    let locker = limited.lock_tasks(&url).await;
    let waiting = limited.enqueues_at_once(6);
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(done) = waiting.iter().position(|w| w.is_finished()) {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("an enqueue left without a connection is answered");
    let outcomes = unlock_and_collect(locker, waiting).await;
    match &outcomes[refused] {
        Err(offload_core::Error::Unavailable(message)) => assert!(
            message.contains("PostgreSQL refuses more")
                && message.contains("too many connections for role"),
            "{message}"
        ),
        other => panic!("expected the enqueue to be out of service: {other:?}"),
    }
    // The ones that had a connection went through once the lock went.
    assert!(
        outcomes.iter().filter(|o| o.is_ok()).count() >= 3,
        "{outcomes:?}"
    );
    limited.remove(&url).await;
}

/// When PostgreSQL refuses the node more connections, an operation that
/// finds none free takes one that another operation frees, where it waited
/// for the pool to open one, refusal after refusal, and failed after 5 s
/// though the node's connections had come free meanwhile.
#[tokio::test]
async fn when_postgresql_refuses_more_connections_requests_take_the_ones_freed() {
    let Some(url) = database_url() else { return };
    let limited = LimitedNode::open(&url).await;
    // Three enqueues wait on a lock, each holding a connection, and three
    // more find none; the lock goes a second later.
    let locker = limited.lock_tasks(&url).await;
    let started = std::time::Instant::now();
    let waiting = limited.enqueues_at_once(6);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcomes = unlock_and_collect(locker, waiting).await;
    let failed: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "enqueues failed after {:?} though connections came free after 1 s: {failed:?}",
        started.elapsed()
    );
    assert_eq!(
        limited.store.stats().await.unwrap().total.pending,
        1 + 6 * 2
    );
    limited.remove(&url).await;
}

/// The leader's fold of the counts ledger writes only the totals of the
/// pairs that changed since its last pass (it rewrote every pair's rows
/// each second: with 100,000 pairs holding finished tasks, a fifth of a
/// core of an idle node's PostgreSQL), and a count that falls to nothing
/// leaves no row behind.
#[tokio::test]
async fn folding_the_counts_writes_only_the_pairs_that_changed() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let store = node(&schema).await;
    let mut conn = connection_in(&url, &schema).await;
    let enqueue = |queue: &str| {
        let spec = NewTask::new("t")
            .queue(queue)
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        let store = Arc::clone(&store);
        async move { store.enqueue(vec![spec]).await.unwrap().remove(0).0 }
    };
    let retention = offload_core::Retention::default();
    let fold = || store.purge_finished(&retention, 1000);
    enqueue("q1").await;
    enqueue("q2").await;
    let leaving = enqueue("q3").await;
    fold().await.unwrap();
    let before = count_totals(&mut conn).await;
    let pending = State::Pending.code() as i16;
    let cancelled = State::Cancelled.code() as i16;
    assert_eq!(
        before
            .iter()
            .map(|(q, s, n, _)| (q.as_str(), *s, *n))
            .collect::<Vec<_>>(),
        [("q1", pending, 1), ("q2", pending, 1), ("q3", pending, 1)]
    );

    enqueue("q1").await;
    store.cancel(leaving.id).await.unwrap();
    fold().await.unwrap();
    let after = count_totals(&mut conn).await;
    assert_eq!(
        after
            .iter()
            .map(|(q, s, n, _)| (q.as_str(), *s, *n))
            .collect::<Vec<_>>(),
        [("q1", pending, 2), ("q2", pending, 1), ("q3", cancelled, 1)],
        "q3's pending count fell to nothing and its row went"
    );
    assert_eq!(
        after[1].3, before[1].3,
        "q2's row, unchanged, was not written"
    );
    let ledger: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM offload_counts")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(ledger, 0, "the ledger was folded");
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.queues["q1"].pending, 2);
    assert_eq!(stats.queues["q3"].cancelled, 1);
    assert_eq!(store.totals().await.unwrap().pending, 3);
}

/// The folded counts as (queue, state, n, where the row version lies).
async fn count_totals(conn: &mut sqlx::PgConnection) -> Vec<(String, i16, i64, String)> {
    sqlx::query_as(
        "SELECT queue, state, n, ctid::text FROM offload_count_totals ORDER BY queue, state",
    )
    .fetch_all(conn)
    .await
    .expect("the folded counts")
}

/// A task's error history is written when it grows, and else left in
/// place: after three failed attempts, its next claim, heartbeats and
/// completion store no copy of it (PostgreSQL stored one at each when the
/// write-back gave the history again, `TOAST` rows that only grow).
#[tokio::test]
async fn a_tasks_error_history_is_stored_again_only_when_it_grows() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let store = node(&schema).await;
    let spec = NewTask::new("flaky")
        .validate(&Limits::default(), Position::Alone)
        .expect("a valid task");
    let id = store.enqueue(vec![spec]).await.unwrap()[0].0.id;
    // Hardly compressible, so that each history takes many TOAST pages.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut noise = || {
        (0..offload_core::MAX_MESSAGE_CHARS)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'!' + (state % 90) as u8)
            })
            .collect::<String>()
    };
    for _ in 0..3 {
        assert_eq!(store.claim(&claim_by("w", 1)).await.unwrap()[0].id, id);
        let failure = offload_core::Failure {
            message: noise(),
            kind: offload_core::FailureKind::Error,
            retry: Some(false),
            retry_in: None,
        };
        store
            .ack("w", vec![Ack::Fail { id, failure }])
            .await
            .unwrap()
            .remove(0)
            .expect("the worker held the task");
        store.retry(id).await.expect("a manual retry");
    }
    let mut conn = connection_in(&url, &schema).await;
    let toast_bytes = "SELECT pg_relation_size(reltoastrelid) FROM pg_class \
                       WHERE oid = 'offload_tasks'::regclass";
    let (before,): (i64,) = sqlx::query_as(toast_bytes)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let (history,): (i32,) = sqlx::query_as("SELECT pg_column_size(errors) FROM offload_tasks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(
        history > 30_000,
        "a history of {history} bytes is too small to tell"
    );
    let claimed = store.claim(&claim_by("w", 1)).await.unwrap();
    assert_eq!(claimed[0].errors.len(), 3);
    for _ in 0..5 {
        store
            .heartbeat(offload_core::HeartbeatRequest {
                id,
                worker_id: "w".into(),
                progress: None,
                lease: Duration::from_secs(30),
            })
            .await
            .expect("heartbeat");
    }
    let completed = offload_storetest::complete(&*store, "w", id).await;
    assert_eq!(completed.errors.len(), 3, "the history is kept");
    let (after,): (i64,) = sqlx::query_as(toast_bytes)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(
        after - before < i64::from(history),
        "TOAST grew {} bytes, a history is {history}",
        after - before
    );
    assert_eq!(
        store.get(id).await.unwrap().unwrap().errors,
        completed.errors,
        "the history read back is the one answered"
    );
}

/// A relay to the PostgreSQL server `url` names that counts the
/// statements every connection through it runs: simple queries (`Query`)
/// and prepared statements run (`Execute`), each a round trip of the
/// node's, where the pool's checks of a connection send neither. The URL
/// through it, and the count.
async fn through_counting_relay(url: &str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, listener, relayed) = relay_listener(url).await;
    let statements = Arc::new(AtomicUsize::new(0));
    let counting = Arc::clone(&statements);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = tokio::net::TcpStream::connect(&server).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = upstream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            let counting = Arc::clone(&counting);
            tokio::spawn(async move {
                // With `sslmode=disable` the client opens with its startup
                // message (a length that counts itself, no type), then
                // sends messages of a type byte and such a length.
                let mut typed = false;
                loop {
                    let kind = if typed {
                        let Ok(kind) = client_read.read_u8().await else {
                            return;
                        };
                        Some(kind)
                    } else {
                        None
                    };
                    typed = true;
                    let Ok(length) = client_read.read_u32().await else {
                        return;
                    };
                    let mut body = vec![0; length as usize - 4];
                    if client_read.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if matches!(kind, Some(b'Q' | b'E')) {
                        counting.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut message: Vec<u8> = kind.into_iter().collect();
                    message.extend_from_slice(&length.to_be_bytes());
                    message.extend_from_slice(&body);
                    if server_write.write_all(&message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (relayed, statements)
}

/// A transaction that ends with its write records its counts and
/// notifications in that write, so its commit is the statement after it:
/// a claim of a type is five statements (BEGIN, the queues' settings, the
/// locking read, the write, COMMIT), an ack four (BEGIN, the locking read,
/// the write, COMMIT), an enqueue with a unique key five (BEGIN, the key's
/// lock with the seqs, the key's holder, the insert, COMMIT). Each is the
/// fewest of several tries, since a node's own background work (its
/// leader's passes, its keep-alive) may add some. Another node hears the
/// changes and reads the counts as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_send_their_counts_and_notifications_with_their_last_statement() {
    use std::sync::atomic::Ordering;
    let Some(url) = database_url() else { return };
    if url.contains("sslmode=require") || !url.contains("sslmode=disable") {
        eprintln!("skipped: counting round trips needs OFFLOAD_TEST_PG_URL with sslmode=disable");
        return;
    }
    let (counted_url, statements) = through_counting_relay(&url).await;
    let schema = fresh_schema();
    let options = PgOptions {
        schema: schema.clone(),
        max_connections: 2,
        ..PgOptions::default()
    };
    let store = PgStore::open(&counted_url, options).await.expect("open");
    let other = node(&schema).await;
    let mut events = other.hub().watch(Interest::Every).await;
    store.enqueue(tasks_of_type_t(40)).await.unwrap();
    let (mut fewest_claim, mut fewest_ack, mut fewest_keyed) = (usize::MAX, usize::MAX, usize::MAX);
    for n in 0..20 {
        let keyed = NewTask::new("keyed")
            .unique_key(format!("k{n}"), OnConflict::Keep)
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        let before = statements.load(Ordering::SeqCst);
        assert!(store.enqueue(vec![keyed]).await.unwrap()[0].1, "created");
        let enqueued = statements.load(Ordering::SeqCst);
        fewest_keyed = fewest_keyed.min(enqueued - before);
        let before = statements.load(Ordering::SeqCst);
        let mut by_type = claim_by("w", 1);
        by_type.types = vec!["t".into()];
        let claimed = store.claim(&by_type).await.unwrap();
        let between = statements.load(Ordering::SeqCst);
        let acked = store
            .ack(
                "w",
                vec![Ack::Complete {
                    id: claimed[0].id,
                    result: None,
                }],
            )
            .await
            .unwrap();
        assert!(acked[0].is_ok(), "{acked:?}");
        let after = statements.load(Ordering::SeqCst);
        fewest_claim = fewest_claim.min(between - before);
        fewest_ack = fewest_ack.min(after - between);
    }
    assert_eq!(
        (fewest_claim, fewest_ack, fewest_keyed),
        (5, 4, 5),
        "statements of a claim, of an ack, of an enqueue with a unique key"
    );
    store.verify_bookkeeping().await.unwrap();
    let types = other.stats().await.unwrap().types;
    assert_eq!((types["t"].pending, types["t"].completed), (20, 20));
    assert_eq!(types["keyed"].pending, 20);
    // The other node hears each task enqueued, claimed and completed.
    let mut heard = 0;
    while heard < 100 {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap_or_else(|_| panic!("the other node heard {heard} changes of 100"))
            .unwrap();
        heard += 1;
    }
}

/// An ack whose transaction writes in passes (what it finishes, then the
/// dependents that unblocks) records each pass's changes with its write:
/// another node hears every pair made ready, the first pass's and the
/// second's, and every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_hears_what_each_pass_of_an_ack_made_ready() {
    if !available() {
        return;
    }
    let (a, b) = two_nodes().await;
    let spec = |task: NewTask| task.validate(&Limits::default(), Position::Alone).unwrap();
    let first = a.enqueue(vec![spec(NewTask::new("first"))]).await.unwrap()[0]
        .0
        .clone();
    let again = a
        .enqueue(vec![spec(NewTask::new("again").max_attempts(2))])
        .await
        .unwrap()[0]
        .0
        .clone();
    let dependent = a
        .enqueue(vec![spec(NewTask::new("after").depends_on(first.id))])
        .await
        .unwrap()[0]
        .0
        .clone();
    assert_eq!(dependent.state, State::Blocked);
    assert_eq!(a.claim(&claim_by("w", 10)).await.unwrap().len(), 2);
    let mut there = b.hub().watch_ready();
    let seen = *there.borrow_and_update();
    let mut events = b.hub().watch(Interest::Every).await;
    let failure = offload_core::Failure {
        message: "once more".into(),
        kind: offload_core::FailureKind::Error,
        retry: Some(true),
        retry_in: Some(Duration::ZERO),
    };
    let acked = a
        .ack(
            "w",
            vec![
                Ack::Fail {
                    id: again.id,
                    failure,
                },
                Ack::Complete {
                    id: first.id,
                    result: None,
                },
            ],
        )
        .await
        .unwrap();
    assert!(acked.iter().all(Result::is_ok), "{acked:?}");
    let pair = |task_type: &str| ("default".to_owned(), task_type.to_owned());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let heard = b.hub().ready_log().since(seen).1;
        if heard == Readiness::Of([pair("again"), pair("after")].into()) {
            break;
        }
        assert!(
            tokio::time::timeout_at(deadline, there.changed())
                .await
                .is_ok(),
            "node b heard {heard:?}, not both pairs made ready"
        );
    }
    let mut changed = std::collections::HashSet::new();
    while changed.len() < 3 {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("node b heard changes of {changed:?} alone"))
            .unwrap();
        changed.insert(event.task.id);
    }
    assert_eq!(
        changed,
        [first.id, again.id, dependent.id].into(),
        "node b streams the ack's changes"
    );
    a.verify_bookkeeping().await.unwrap();
    let types = b.stats().await.unwrap().types;
    assert_eq!(
        (
            types["again"].pending,
            types["after"].pending,
            types["first"].completed
        ),
        (1, 1, 1)
    );
}
