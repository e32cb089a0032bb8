//! The conformance cases. Each opens a fresh store and checks one rule.

use std::sync::Arc;
use std::time::Duration;

use offload_core::{
    Ack, Claim, ClaimRequest, ClearRequest, Error, ErrorKind, EventKind, Failure, FailureKind,
    Finished, HeartbeatAck, HeartbeatRequest, Interest, Limits, ListQuery, ManualClock, NewTask,
    OnConflict, PAGE_BYTES, Position, ProgressUpdate, QueuePatch, Retention, State, Store, Task,
    TaskPage, Timestamp,
};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::{EPOCH, StoreFactory};

// ---- helpers -------------------------------------------------------------

struct Fixture {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
}

async fn fixture(factory: &dyn StoreFactory) -> Fixture {
    let clock = Arc::new(ManualClock::new(EPOCH));
    let store = factory.open(Arc::clone(&clock)).await;
    Fixture { store, clock }
}

/// A queue's settings, both given: paused or not, and its limit of
/// running tasks (`None`: no limit).
fn queue_settings(paused: bool, concurrency: Option<u32>) -> QueuePatch {
    QueuePatch {
        paused: Some(paused),
        concurrency: Some(concurrency),
    }
}

impl Fixture {
    fn now(&self) -> Timestamp {
        offload_core::Clock::now(&*self.clock)
    }

    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    async fn try_enqueue(&self, task: NewTask) -> Result<(Task, bool), Error> {
        let spec = task.validate(&Limits::default(), Position::Alone)?;
        let mut answers = self.store.enqueue(vec![spec]).await?;
        Ok(answers.pop().expect("one answer per task"))
    }

    /// Two tasks, `first` and `second`, and a `child` that depends on both.
    async fn a_child_of_two(&self) -> (Task, Task, Task) {
        crate::a_child_of_two(&*self.store).await
    }

    async fn enqueue(&self, task: NewTask) -> Task {
        self.try_enqueue(task).await.expect("enqueue").0
    }

    /// `tasks` enqueued in one batch; their ids, in order.
    async fn enqueue_all(&self, tasks: Vec<NewTask>) -> Vec<Uuid> {
        let limits = Limits::default();
        let specs = tasks
            .into_iter()
            .enumerate()
            .map(|(i, task)| task.validate(&limits, Position::InBatch(i)).unwrap())
            .collect();
        let answers = self.store.enqueue(specs).await.expect("enqueue");
        answers.into_iter().map(|(task, _)| task.id).collect()
    }

    /// Completes `tasks`, which `worker` holds, in one ack.
    async fn complete_all(&self, worker: &str, tasks: &[Task]) {
        let acks = crate::completions(tasks);
        for outcome in self.store.ack(worker, acks).await.expect("ack") {
            outcome.expect("the worker held the task");
        }
    }

    async fn claim_from(
        &self,
        worker: &str,
        limit: usize,
        types: &[&str],
        queues: &[&str],
    ) -> Vec<Task> {
        self.store
            .claim(&ClaimRequest {
                worker_id: worker.into(),
                types: types.iter().map(|s| s.to_string()).collect(),
                queues: queues.iter().map(|s| s.to_string()).collect(),
                limit,
                lease: Duration::from_secs(30),
            })
            .await
            .expect("claim")
    }

    async fn claim(&self, worker: &str, limit: usize) -> Vec<Task> {
        self.claim_from(worker, limit, &[], &[]).await
    }

    async fn claim_one(&self, worker: &str) -> Task {
        let mut claimed = self.claim(worker, 1).await;
        assert_eq!(claimed.len(), 1, "expected one claimable task");
        claimed.remove(0)
    }

    /// A heartbeat without progress, extending the lease by 30 s.
    async fn beat(&self, worker: &str, id: Uuid) -> Result<HeartbeatAck, Error> {
        self.store
            .heartbeat(HeartbeatRequest {
                id,
                worker_id: worker.into(),
                progress: None,
                lease: Duration::from_secs(30),
            })
            .await
    }

    async fn ack_one(&self, worker: &str, ack: Ack) -> Result<Task, Error> {
        let mut outcomes = self.store.ack(worker, vec![ack]).await.expect("ack call");
        outcomes.remove(0)
    }

    async fn complete(&self, worker: &str, id: Uuid, result: Option<&str>) -> Result<Task, Error> {
        let result = result.map(|r| RawValue::from_string(r.to_owned()).expect("valid JSON"));
        self.ack_one(worker, Ack::Complete { id, result }).await
    }

    async fn fail(
        &self,
        worker: &str,
        id: Uuid,
        retry: Option<bool>,
        retry_in: Option<u64>,
    ) -> Result<Task, Error> {
        let failure = it_broke(retry, retry_in);
        self.ack_one(worker, Ack::Fail { id, failure }).await
    }

    async fn get(&self, id: Uuid) -> Task {
        self.store.get(id).await.expect("get").expect("task exists")
    }

    async fn state(&self, id: Uuid) -> State {
        self.get(id).await.state
    }
}

/// A worker's report that an attempt failed with an error, retried as
/// `retry` and `retry_in` (seconds) say.
fn it_broke(retry: Option<bool>, retry_in: Option<u64>) -> Failure {
    Failure {
        message: "it broke".into(),
        kind: FailureKind::Error,
        retry,
        retry_in: retry_in.map(Duration::from_secs),
    }
}

fn assert_conflict<T: std::fmt::Debug>(outcome: Result<T, Error>) {
    assert!(
        matches!(outcome, Err(Error::Conflict(_))),
        "expected a conflict, got {outcome:?}"
    );
}

fn assert_invalid<T: std::fmt::Debug>(outcome: Result<T, Error>, expected_field: &str) {
    match outcome {
        Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, expected_field),
        other => panic!("expected invalid_argument on {expected_field}, got {other:?}"),
    }
}

/// Every field alike, as a client would see them.
pub(crate) fn assert_same(stored: &Task, answered: &Task, what: &str) {
    let json = |t: &Task| serde_json::to_value(t).expect("a task serializes");
    assert_eq!(json(stored), json(answered), "{what}");
}

fn ids(tasks: &[Task]) -> Vec<Uuid> {
    tasks.iter().map(|t| t.id).collect()
}

fn ids_and_states(tasks: &[Task]) -> Vec<(Uuid, State)> {
    tasks.iter().map(|t| (t.id, t.state)).collect()
}

/// Every page `query` lists, following `next_cursor` from its first.
async fn every_page(store: &dyn Store, mut query: ListQuery) -> Vec<TaskPage> {
    let mut pages = Vec::new();
    loop {
        let page = store.list(&query).await.expect("list");
        query.cursor = page.next_cursor.clone();
        pages.push(page);
        if query.cursor.is_none() {
            return pages;
        }
    }
}

// ---- enqueue ---------------------------------------------------------------

pub async fn enqueue_applies_defaults(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let (task, created) = f
        .try_enqueue(
            NewTask::new("email.send")
                .payload(&serde_json::json!({"to": "a@b.c"}))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(created);
    assert_eq!(task.id.get_version_num(), 7, "ids are UUIDv7");
    assert_eq!(task.task_type, "email.send");
    assert_eq!(task.queue, "default");
    assert_eq!(task.priority, 5);
    assert_eq!(task.state, State::Pending);
    assert_eq!(
        (task.attempt, task.max_attempts, task.timeout_secs),
        (0, 4, 1800)
    );
    assert_eq!(task.run_at, f.now());
    assert_eq!((task.created_at, task.updated_at), (f.now(), f.now()));
    assert!(task.started_at.is_none() && task.finished_at.is_none() && task.worker_id.is_none());
    let stored = f.get(task.id).await;
    assert_eq!(
        serde_json::to_value(&stored).unwrap(),
        serde_json::to_value(&task).unwrap()
    );
    assert_eq!(stored.payload.get(), r#"{"to":"a@b.c"}"#);
}

pub async fn enqueue_batch_is_all_or_nothing(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let limits = Limits::default();
    let good = NewTask::new("a")
        .validate(&limits, Position::InBatch(0))
        .unwrap();
    let bad = NewTask::new("b")
        .depends_on(Uuid::now_v7())
        .validate(&limits, Position::InBatch(1))
        .unwrap();
    let outcome = f.store.enqueue(vec![good.clone(), bad]).await;
    assert_invalid(outcome, "tasks[1].depends_on[0]");
    assert_eq!(
        f.store.stats().await.unwrap().total.total(),
        0,
        "nothing of the batch stays"
    );
    let page = f
        .store
        .list(&ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(page.tasks.is_empty());
    let answers = f.store.enqueue(vec![good.clone(), good]).await.unwrap();
    assert_eq!(answers.len(), 2);
    assert_ne!(answers[0].0.id, answers[1].0.id);
}

/// A batch larger than any one statement, plain tasks around ones that
/// need checks (a unique key kept, a dependency): each stored as answered,
/// in the order of the request.
pub async fn a_large_mixed_batch_is_stored_in_request_order(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let dependency = f.enqueue(NewTask::new("dep")).await;
    let limits = Limits::default();
    const N: usize = 150;
    let specs = (0..N)
        .map(|i| {
            let mut task = NewTask::new(if i % 2 == 0 { "even" } else { "odd" })
                .queue(if i % 3 == 0 { "a" } else { "b" })
                .priority(1 + (i % 10) as i64)
                .payload(&serde_json::json!({ "i": i }))
                .expect("a JSON payload");
            if i % 4 == 1 {
                task = task
                    .label("n", i.to_string())
                    .owner(format!("user-{}", i % 5));
            }
            if i % 7 == 3 {
                task = task.delay(Duration::from_secs(60));
            }
            if i == 70 || i == 71 {
                task = task.unique_key("k", OnConflict::Keep);
            }
            if i == 100 {
                task = task.depends_on(dependency.id);
            }
            task.validate(&limits, Position::InBatch(i))
                .expect("a valid task")
        })
        .collect();
    let answers = f.store.enqueue(specs).await.expect("enqueue");
    assert_eq!(answers.len(), N);
    for (i, (task, created)) in answers.iter().enumerate() {
        assert_eq!(*created, i != 71, "task {i}");
        assert_eq!(
            task.payload_as::<serde_json::Value>().unwrap()["i"],
            if i == 71 { 70 } else { i }
        );
        assert_same(&f.get(task.id).await, task, "stored as answered");
    }
    assert_eq!(answers[71].0.id, answers[70].0.id, "the key's holder");
    assert_eq!(answers[100].0.state, State::Blocked);
    assert_eq!(answers[3].0.state, State::Scheduled);
    assert_eq!(answers[4].0.state, State::Pending);

    let mut created: Vec<Uuid> = vec![dependency.id];
    created.extend(
        answers
            .iter()
            .filter(|(_, created)| *created)
            .map(|(task, _)| task.id),
    );
    let page = f
        .store
        .list(&ListQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list");
    let mut listed = ids(&page.tasks);
    listed.reverse();
    assert_eq!(
        listed, created,
        "listed newest first, in the order enqueued"
    );
    let stats = f.store.stats().await.expect("stats");
    assert_eq!(stats.total.total(), N as u64);
    assert_eq!(stats.total.get(State::Blocked), 1);
    assert_eq!(
        stats.total.get(State::Scheduled),
        (0..N).filter(|i| i % 7 == 3).count() as u64
    );
}

/// A batch stored as sent, whether its tasks are alike or not: a store may
/// write what a run of tasks shares once for all of them. One run of 64
/// alike but for their payloads, then runs in which one field differs.
pub async fn a_batch_of_alike_tasks_is_stored_as_sent(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let limits = Limits::default();
    const RUN: usize = 64;
    const RUNS: usize = 9;
    // Within run `run`, field `run` takes three values; elsewhere one.
    let vary = |i: usize, field: usize| if i / RUN == field { i % 3 } else { 0 };
    let specs = (0..RUN * RUNS)
        .map(|i| {
            let mut task = NewTask::new(format!("type-{}", vary(i, 1)))
                .queue(format!("queue-{}", vary(i, 2)))
                .priority(1 + vary(i, 3) as i64)
                .max_attempts(3 + vary(i, 4) as i64)
                .timeout_secs(60 + vary(i, 5) as i64)
                .payload(&serde_json::json!({ "i": i }))
                .expect("a JSON payload");
            if vary(i, 6) == 1 {
                task = task.owner("someone");
            }
            if vary(i, 7) == 1 {
                task = task.label("n", i.to_string());
            }
            if vary(i, 8) == 1 {
                task = task.delay(Duration::from_secs(60));
            }
            task.validate(&limits, Position::InBatch(i))
                .expect("a valid task")
        })
        .collect();
    let answers = f.store.enqueue(specs).await.expect("enqueue");
    assert_eq!(answers.len(), RUN * RUNS);
    for (i, (task, created)) in answers.iter().enumerate() {
        assert!(created, "task {i}");
        let sent = (
            format!("type-{}", vary(i, 1)),
            format!("queue-{}", vary(i, 2)),
            1 + vary(i, 3) as u8,
            3 + vary(i, 4) as u32,
            60 + vary(i, 5) as u32,
            (vary(i, 6) == 1).then(|| "someone".to_string()),
            (vary(i, 7) == 1).then(|| i.to_string()),
            if vary(i, 8) == 1 {
                State::Scheduled
            } else {
                State::Pending
            },
        );
        let answered = (
            task.task_type.clone(),
            task.queue.clone(),
            task.priority,
            task.max_attempts,
            task.timeout_secs,
            task.owner.clone(),
            task.labels.get("n").cloned(),
            task.state,
        );
        assert_eq!(answered, sent, "task {i}");
        assert_eq!(
            task.payload_as::<serde_json::Value>().unwrap()["i"],
            i,
            "task {i}"
        );
        assert_same(&f.get(task.id).await, task, "stored as answered");
    }
}

/// Tasks of a batch that failed are not claimable, nor is anything the
/// failed batch touched: the next claim sees exactly what was committed.
pub async fn a_failed_batch_leaves_nothing_to_claim(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let limits = Limits::default();
    let mut specs: Vec<_> = (0..20)
        .map(|i| {
            NewTask::new("t")
                .priority(9)
                .validate(&limits, Position::InBatch(i))
                .unwrap()
        })
        .collect();
    specs.push(
        NewTask::new("t")
            .depends_on(Uuid::now_v7())
            .validate(&limits, Position::InBatch(20))
            .unwrap(),
    );
    assert_invalid(f.store.enqueue(specs).await, "tasks[20].depends_on[0]");
    let kept = f.enqueue(NewTask::new("t").priority(1)).await;
    let claimed = f.claim("w", 50).await;
    assert_eq!(ids(&claimed), [kept.id], "only the committed task, once");
    assert!(f.claim("w", 50).await.is_empty());
}

// ---- claiming --------------------------------------------------------------

pub async fn claim_orders_by_priority_then_run_at(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let a = f.enqueue(NewTask::new("t").priority(5)).await;
    f.advance(1);
    let b = f.enqueue(NewTask::new("t").priority(8)).await;
    f.advance(1);
    let c = f.enqueue(NewTask::new("t").priority(5)).await;
    // Same priority but an earlier run_at than `a`: runs before it.
    let d = f
        .enqueue(NewTask {
            run_at: Some(EPOCH.saturating_sub(Duration::from_secs(60)).to_string()),
            ..NewTask::new("t").priority(5)
        })
        .await;
    let e = f.enqueue(NewTask::new("t").priority(1)).await;
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(f.claim_one("w").await.id);
    }
    assert_eq!(order, vec![b.id, d.id, a.id, c.id, e.id]);
    // A batch claim returns the same order.
    let f = fixture(factory).await;
    let low = f.enqueue(NewTask::new("t").priority(2)).await;
    let high = f.enqueue(NewTask::new("t").priority(9)).await;
    let mid = f.enqueue(NewTask::new("t")).await;
    assert_eq!(ids(&f.claim("w", 10).await), vec![high.id, mid.id, low.id]);
}

/// Claim order holds across types: highest priority first, then first
/// enqueued, whichever type each task is, a few at a time.
pub async fn claim_order_holds_across_types(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut made = Vec::new();
    for i in 0..30 {
        let priority: i64 = 1 + (i * 7) % 10;
        let task = NewTask::new(["a", "b", "c"][(i % 3) as usize]).priority(priority);
        made.push((std::cmp::Reverse(priority), i, f.enqueue(task).await.id));
    }
    made.sort();
    let expected: Vec<Uuid> = made.into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(claim_all_in_turns(&f, 4, &["a", "b", "c"]).await, expected);
}

/// Claims `limit` at a time until none is left, naming `types` in one
/// claim and none in the next, and answers the ids in the order claimed.
async fn claim_all_in_turns(f: &Fixture, limit: usize, types: &[&str]) -> Vec<Uuid> {
    let mut claimed = Vec::new();
    for named in [true, false].into_iter().cycle() {
        let tasks = f
            .claim_from("w", limit, if named { types } else { &[] }, &[])
            .await;
        if tasks.is_empty() {
            break;
        }
        claimed.extend(ids(&tasks));
    }
    claimed
}

/// Claim order across types however the front is spread among them: one
/// type holding all of it, then another, then all of them evenly. A store
/// that reads a share of each type first must read further where the
/// front is.
pub async fn claim_order_holds_when_one_type_holds_the_front(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut made = Vec::new();
    let mut enqueue = async |task_type: &str, priority: i64| {
        let id = f
            .enqueue(NewTask::new(task_type).priority(priority))
            .await
            .id;
        made.push((std::cmp::Reverse(priority), made.len(), id));
    };
    for i in 0..45 {
        enqueue(["b", "c", "d"][i % 3], 5).await;
    }
    for _ in 0..40 {
        enqueue("a", 9).await;
    }
    for _ in 0..30 {
        enqueue("b", 9).await;
    }
    made.sort();
    let expected: Vec<Uuid> = made.into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(
        claim_all_in_turns(&f, 25, &["a", "b", "c", "d"]).await,
        expected
    );
}

pub async fn claim_respects_limit_types_and_queues(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    for _ in 0..3 {
        f.enqueue(NewTask::new("a")).await;
        f.enqueue(NewTask::new("b").queue("other")).await;
    }
    let c = f.enqueue(NewTask::new("c").queue("other")).await;
    assert_eq!(f.claim("w", 2).await.len(), 2);
    let only_b = f.claim_from("w", 10, &["b"], &[]).await;
    assert!(!only_b.is_empty() && only_b.iter().all(|t| t.task_type == "b"));
    let other = f.claim_from("w", 10, &[], &["other"]).await;
    assert!(other.iter().all(|t| t.queue == "other"));
    assert!(other.iter().any(|t| t.id == c.id));
    let rest = f.claim("w", 10).await;
    assert!(rest.iter().all(|t| t.task_type == "a"));
    assert!(f.claim("w", 10).await.is_empty());
    let claimed = f.get(c.id).await;
    assert_eq!(claimed.state, State::Running);
    assert_eq!(claimed.attempt, 1);
    assert_eq!(claimed.worker_id.as_deref(), Some("w"));
    assert_eq!(claimed.started_at, Some(f.now()));
    assert_eq!(
        claimed.lease_expires_at,
        Some(f.now().saturating_add(Duration::from_secs(30)))
    );
}

/// A claim that names a type or a queue twice takes each task once: it
/// had answered a task twice, counted running twice. Few names and many.
pub async fn a_claim_naming_a_type_twice_takes_each_task_once(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let (mut t, mut u) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        t.push(f.enqueue(NewTask::new("t")).await.id);
        u.push(f.enqueue(NewTask::new("u").queue("q")).await.id);
        f.enqueue(NewTask::new("v").queue("q")).await;
    }
    let mut claimed = ids(&f.claim_from("w", 10, &["t", "t"], &[]).await);
    claimed.sort();
    t.sort();
    assert_eq!(claimed, t, "each t once");
    // Enough names that PostgreSQL looks among the pending types for them.
    let many = ["u", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "u"];
    let mut claimed = ids(&f.claim_from("w", 10, &many, &["q", "q"]).await);
    claimed.sort();
    u.sort();
    assert_eq!(claimed, u, "each u once, and no v");
    let stats = f.store.stats().await.expect("stats");
    assert_eq!((stats.total.running, stats.total.pending), (6, 3));
    f.store
        .verify_bookkeeping()
        .await
        .expect("the store's bookkeeping agrees with its rows");
}

pub async fn claimed_task_is_not_handed_out_again(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    for _ in 0..20 {
        f.enqueue(NewTask::new("t")).await;
    }
    // Concurrent claimers never share a task.
    let mut handles = Vec::new();
    for w in 0..4 {
        let store = Arc::clone(&f.store);
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..10 {
                let claimed = store
                    .claim(&ClaimRequest {
                        worker_id: format!("w{w}"),
                        types: vec![],
                        queues: vec![],
                        limit: 2,
                        lease: Duration::from_secs(30),
                    })
                    .await
                    .unwrap();
                got.extend(claimed.into_iter().map(|t| t.id));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 20, "every task claimed");
    assert_eq!(unique.len(), 20, "no task claimed twice");
}

/// A claim parked while nothing is ready is answered by the write that makes
/// a task ready, with the task claimed in that same commit; a withdrawn claim
/// takes nothing. Stores that do not park answer at once, which the suite
/// accepts (their waiters use the hub's ready signal instead).
pub async fn parked_claim_is_answered_by_the_next_ready_task(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let request = |worker: &str, types: &[&str]| ClaimRequest {
        worker_id: worker.into(),
        types: types.iter().map(|s| s.to_string()).collect(),
        queues: vec![],
        limit: 5,
        lease: Duration::from_secs(30),
    };
    let Claim::Parked(mut waiting) = f.store.claim_or_park(&request("w1", &["t"])).await.unwrap()
    else {
        return;
    };
    // A task of another type is not claimed by it (the store may answer
    // the claim with nothing, or leave it parked).
    let other = f.enqueue(NewTask::new("other")).await;
    if let Ok(answer) = tokio::time::timeout(Duration::from_millis(50), waiting.answered()).await {
        assert!(answer.unwrap().is_empty());
    }
    assert_eq!(f.get(other.id).await.state, State::Pending);
    assert!(waiting.withdraw().await.unwrap().is_empty());

    let Claim::Parked(withdrawn) = f.store.claim_or_park(&request("w2", &["t"])).await.unwrap()
    else {
        panic!("a store that parked once parks again when nothing is ready");
    };
    assert!(withdrawn.withdraw().await.unwrap().is_empty());
    let Claim::Parked(mut waiting) = f.store.claim_or_park(&request("w1", &["t"])).await.unwrap()
    else {
        panic!("a store that parked once parks again when nothing is ready");
    };
    let task = f.enqueue(NewTask::new("t")).await;
    let claimed = tokio::time::timeout(Duration::from_secs(10), waiting.answered())
        .await
        .expect("a parked claim is answered once a task of its type is ready")
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, task.id);
    let stored = f.get(task.id).await;
    assert_eq!(stored.state, State::Running);
    assert_eq!(stored.worker_id.as_deref(), Some("w1"));
    assert_eq!(stored.attempt, 1);
    assert_eq!(f.store.stats().await.unwrap().total.running, 1);
    // With something ready, the claim is answered at once.
    let second = f.enqueue(NewTask::new("t")).await;
    match f.store.claim_or_park(&request("w2", &["t"])).await.unwrap() {
        Claim::Now { tasks, .. } => assert_eq!(tasks[0].id, second.id),
        Claim::Parked(_) => panic!("a ready task must be claimed at once"),
    }
}

pub async fn scheduled_task_waits_for_run_at(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let later = f
        .enqueue(NewTask::new("t").delay(Duration::from_secs(10)))
        .await;
    assert_eq!(later.state, State::Scheduled);
    assert_eq!(
        later.run_at,
        f.now().saturating_add(Duration::from_secs(10))
    );
    assert!(f.claim("w", 10).await.is_empty());
    let report = f.store.promote_due().await.unwrap();
    assert_eq!(report.promoted, 0);
    assert_eq!(report.next_due_in, Some(Duration::from_secs(10)));
    f.advance(10);
    let report = f.store.promote_due().await.unwrap();
    assert_eq!((report.promoted, report.next_due_in), (1, None));
    assert_eq!(f.state(later.id).await, State::Pending);
    assert_eq!(f.claim_one("w").await.id, later.id);
}

// ---- acks ------------------------------------------------------------------

pub async fn complete_records_result_and_only_holder_may_ack(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let task = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w1").await;
    assert_conflict(f.complete("w2", task.id, None).await);
    // A result nested past the limit is refused; the attempt goes on.
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    let refused = f.complete("w1", task.id, Some(&deep)).await;
    assert!(
        matches!(&refused, Err(Error::InvalidArgument { field, .. }) if field == "result"),
        "{refused:?}"
    );
    assert_eq!(f.state(task.id).await, State::Running);
    f.advance(3);
    let done = f
        .complete("w1", task.id, Some(r#"{"ok":true}"#))
        .await
        .unwrap();
    assert_eq!(done.state, State::Completed);
    assert_eq!(done.result.as_ref().unwrap().get(), r#"{"ok":true}"#);
    assert_eq!(done.finished_at, Some(f.now()));
    assert!(done.lease_expires_at.is_none() && done.worker_id.is_none());
    assert_conflict(f.complete("w1", task.id, None).await);
    assert_conflict(f.fail("w1", task.id, None, None).await);
    assert_eq!(f.get(task.id).await.result.unwrap().get(), r#"{"ok":true}"#);
}

pub async fn failure_retries_with_backoff_until_attempts_run_out(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let task = f.enqueue(NewTask::new("t").max_attempts(3)).await;
    for attempt in 1..=3u32 {
        let claimed = f.claim_one("w").await;
        assert_eq!(claimed.attempt, attempt);
        let failed = f.fail("w", task.id, None, None).await.unwrap();
        assert_eq!(failed.errors.len(), attempt as usize);
        assert_eq!(failed.errors.last().unwrap().attempt, attempt);
        assert_eq!(failed.error.as_ref().unwrap().kind, ErrorKind::Error);
        assert_eq!(failed.error.as_ref().unwrap().message, "it broke");
        if attempt < 3 {
            assert_eq!(failed.state, State::Scheduled);
            // min(2^attempt, 3600) seconds, ±20%.
            let base = 1000 * 2u128.pow(attempt);
            let delay = f.now().until(failed.run_at).as_millis();
            assert!(
                delay >= base * 8 / 10 && delay <= base * 12 / 10,
                "attempt {attempt}: delay {delay} ms"
            );
            f.clock.advance(f.now().until(failed.run_at));
            assert_eq!(f.store.promote_due().await.unwrap().promoted, 1);
        } else {
            assert_eq!(failed.state, State::Failed);
            assert_eq!(failed.finished_at, Some(f.now()));
        }
    }
    assert!(f.claim("w", 10).await.is_empty());
}

pub async fn retry_false_and_retry_in_are_honoured(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let a = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w").await;
    let failed = f.fail("w", a.id, Some(false), None).await.unwrap();
    assert_eq!(failed.state, State::Failed);
    assert_eq!(failed.attempt, 1);

    let b = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w").await;
    let later = f.fail("w", b.id, None, Some(100)).await.unwrap();
    assert_eq!(later.state, State::Scheduled);
    assert_eq!(
        later.run_at,
        f.now().saturating_add(Duration::from_secs(100))
    );

    let c = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w").await;
    let now = f.fail("w", c.id, None, Some(0)).await.unwrap();
    assert_eq!(now.state, State::Pending, "a zero delay is ready at once");
    assert_eq!(f.claim_one("w").await.id, c.id);
}

// ---- leases, heartbeats, timeouts -------------------------------------------

pub async fn expired_lease_fails_the_attempt_and_fences_the_old_worker(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let task = f.enqueue(NewTask::new("t")).await;
    f.claim_one("old").await;
    f.advance(29);
    assert_eq!(
        f.store.recover_expired().await.unwrap().len(),
        0,
        "lease still valid"
    );
    f.advance(1);
    assert_eq!(
        f.store.count_stuck(Duration::ZERO).await.unwrap(),
        1,
        "expired, not yet recovered"
    );
    assert_eq!(
        f.store.count_stuck(Duration::from_secs(5)).await.unwrap(),
        0
    );
    assert_eq!(
        ids_and_states(&f.store.recover_expired().await.unwrap()),
        [(task.id, State::Scheduled)],
        "answered as it was left"
    );
    assert_eq!(f.store.count_stuck(Duration::ZERO).await.unwrap(), 0);
    let recovered = f.get(task.id).await;
    assert_eq!(recovered.state, State::Scheduled);
    assert_eq!(
        recovered.error.as_ref().unwrap().kind,
        ErrorKind::LeaseExpired
    );
    assert_eq!(recovered.errors.len(), 1);
    // Fenced at once, before anyone claims the task again.
    assert_conflict(f.complete("old", task.id, None).await);
    assert_eq!(f.get(task.id).await.state, State::Scheduled);
    f.clock.advance(f.now().until(recovered.run_at));
    f.store.promote_due().await.unwrap();
    let again = f.claim_one("new").await;
    assert_eq!((again.id, again.attempt), (task.id, 2));
    assert_conflict(f.complete("old", task.id, None).await);
    assert_conflict(f.beat("old", task.id).await);
    f.complete("new", task.id, None).await.unwrap();
}

pub async fn heartbeat_extends_lease_and_records_progress(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let task = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w").await;
    f.advance(20);
    let ack = f
        .store
        .heartbeat(HeartbeatRequest {
            id: task.id,
            worker_id: "w".into(),
            progress: Some(ProgressUpdate {
                percent: Some(40.0),
                message: Some("halfway-ish".into()),
                data: Some(RawValue::from_string(r#"{"rows":4}"#.into()).unwrap()),
            }),
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap();
    assert!(!ack.cancel_requested);
    assert_eq!(
        ack.lease_expires_at,
        f.now().saturating_add(Duration::from_secs(30))
    );
    f.advance(20);
    assert_eq!(
        f.store.recover_expired().await.unwrap().len(),
        0,
        "the heartbeat extended the lease"
    );
    let running = f.get(task.id).await;
    let progress = running.progress.expect("progress recorded");
    assert_eq!(progress.percent, Some(40.0));
    assert_eq!(progress.message.as_deref(), Some("halfway-ish"));
    assert_eq!(progress.data.unwrap().get(), r#"{"rows":4}"#);
    let bad = f
        .store
        .heartbeat(HeartbeatRequest {
            id: task.id,
            worker_id: "w".into(),
            progress: Some(ProgressUpdate {
                percent: Some(101.0),
                ..Default::default()
            }),
            lease: Duration::from_secs(30),
        })
        .await;
    assert_invalid(bad, "progress.percent");
}

/// Heartbeats sent at once, which a store may write together, are
/// answered each as if sent alone: one refused leaves the others, and a
/// task heartbeated several times takes them in the order sent.
pub async fn heartbeats_sent_at_once_are_answered_each_apart(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    for _ in 0..4 {
        f.enqueue(NewTask::new("t")).await;
    }
    let tasks = f.claim("w", 4).await;
    let mut watch = f.store.hub().watch(Interest::Task(tasks[0].id)).await;
    f.advance(5);
    let beat = |id: Uuid, worker: &str, percent: f64| HeartbeatRequest {
        id,
        worker_id: worker.into(),
        progress: Some(ProgressUpdate {
            percent: Some(percent),
            ..Default::default()
        }),
        lease: Duration::from_secs(30),
    };
    let mut requests = Vec::new();
    for round in 0..3 {
        for (i, task) in tasks.iter().enumerate() {
            requests.push(beat(task.id, "w", (10 * i + round) as f64));
        }
    }
    let refused = requests.len();
    requests.push(beat(tasks[0].id, "other", 99.0));
    requests.push(beat(tasks[1].id, "w", 101.0));
    requests.push(beat(Uuid::now_v7(), "w", 1.0));
    let answers = futures::future::join_all(
        requests
            .into_iter()
            .map(|request| f.store.heartbeat(request)),
    )
    .await;
    let lease_end = f.now().saturating_add(Duration::from_secs(30));
    for answer in &answers[..refused] {
        let ack = answer
            .as_ref()
            .expect("each heartbeat of the holder is taken");
        assert_eq!(ack.lease_expires_at, lease_end);
    }
    let mut refusals = answers.into_iter().skip(refused);
    assert!(matches!(refusals.next(), Some(Err(Error::Conflict(_)))));
    assert_invalid(refusals.next().unwrap(), "progress.percent");
    assert!(matches!(refusals.next(), Some(Err(Error::NotFound(_)))));
    for (i, task) in tasks.iter().enumerate() {
        let stored = f.get(task.id).await;
        assert_eq!(stored.worker_id.as_deref(), Some("w"));
        assert_eq!(
            stored.progress.and_then(|p| p.percent),
            Some((10 * i + 2) as f64),
            "the last of task {i}'s heartbeats stands"
        );
    }
    let heard: Vec<_> = std::iter::from_fn(|| watch.try_recv().ok())
        .map(|event| {
            (
                event.kind,
                event.task.progress.as_ref().and_then(|p| p.percent),
            )
        })
        .collect();
    assert_eq!(
        heard,
        [0.0, 1.0, 2.0].map(|percent| (EventKind::Progress, Some(percent)))
    );
}

pub async fn timeout_fails_the_attempt(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let task = f
        .enqueue(NewTask::new("t").timeout_secs(5).max_attempts(1))
        .await;
    f.claim_one("w").await;
    f.advance(4);
    assert_eq!(f.store.recover_expired().await.unwrap().len(), 0);
    f.advance(1);
    assert_eq!(
        ids_and_states(&f.store.recover_expired().await.unwrap()),
        [(task.id, State::Failed)]
    );
    let timed_out = f.get(task.id).await;
    assert_eq!(timed_out.state, State::Failed);
    assert_eq!(timed_out.error.unwrap().kind, ErrorKind::Timeout);
    // A worker may also report the timeout itself.
    let task = f.enqueue(NewTask::new("t").max_attempts(1)).await;
    f.claim_one("w").await;
    let failure = Failure {
        message: "took too long".into(),
        kind: FailureKind::Timeout,
        retry: None,
        retry_in: None,
    };
    let reported = f
        .ack_one(
            "w",
            Ack::Fail {
                id: task.id,
                failure,
            },
        )
        .await
        .unwrap();
    assert_eq!(reported.error.unwrap().kind, ErrorKind::Timeout);
}

// ---- cancellation and manual retry -------------------------------------------

pub async fn cancel_pending_and_running(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let pending = f.enqueue(NewTask::new("t")).await;
    let scheduled = f
        .enqueue(NewTask::new("t").delay(Duration::from_secs(60)))
        .await;
    for id in [pending.id, scheduled.id] {
        let cancelled = f.store.cancel(id).await.unwrap();
        assert_eq!(cancelled.state, State::Cancelled);
        assert_eq!(cancelled.error.unwrap().kind, ErrorKind::Cancelled);
        assert_eq!(cancelled.finished_at, Some(f.now()));
    }
    assert_conflict(f.store.cancel(pending.id).await);
    assert!(f.claim("w", 10).await.is_empty());

    let running = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w").await;
    let asked = f.store.cancel(running.id).await.unwrap();
    assert_eq!(
        (asked.state, asked.cancel_requested),
        (State::Running, true)
    );
    assert!(f.beat("w", running.id).await.unwrap().cancel_requested);
    let stopped = f.fail("w", running.id, None, None).await.unwrap();
    assert_eq!(stopped.state, State::Cancelled);
    assert_eq!(stopped.error.unwrap().kind, ErrorKind::Cancelled);

    // A completion that arrives before the worker noticed still completes.
    let racing = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w").await;
    f.store.cancel(racing.id).await.unwrap();
    assert_eq!(
        f.complete("w", racing.id, None).await.unwrap().state,
        State::Completed
    );
    assert_conflict(f.store.cancel(racing.id).await);
}

pub async fn cancel_requested_then_lease_expiry_cancels(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let task = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w").await;
    f.store.cancel(task.id).await.unwrap();
    f.advance(31);
    assert_eq!(
        ids_and_states(&f.store.recover_expired().await.unwrap()),
        [(task.id, State::Cancelled)]
    );
    let ended = f.get(task.id).await;
    assert_eq!(ended.state, State::Cancelled);
    assert_eq!(ended.error.unwrap().kind, ErrorKind::Cancelled);
}

pub async fn manual_retry_grants_one_more_attempt(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let task = f.enqueue(NewTask::new("t").max_attempts(1)).await;
    assert_conflict(f.store.retry(task.id).await);
    f.claim_one("w").await;
    assert_conflict(f.store.retry(task.id).await);
    assert_eq!(
        f.fail("w", task.id, None, None).await.unwrap().state,
        State::Failed
    );
    f.advance(5);
    let retried = f.store.retry(task.id).await.unwrap();
    assert_eq!(retried.state, State::Pending);
    assert_eq!((retried.attempt, retried.max_attempts), (1, 2));
    assert_eq!(retried.errors.len(), 1, "history is kept");
    assert!(retried.finished_at.is_none());
    assert_eq!(retried.run_at, f.now());
    let again = f.claim_one("w").await;
    assert_eq!(again.attempt, 2);
    f.complete("w", task.id, None).await.unwrap();
    assert_conflict(f.store.retry(task.id).await);

    let cancelled = f.enqueue(NewTask::new("t")).await;
    f.store.cancel(cancelled.id).await.unwrap();
    assert_eq!(
        f.store.retry(cancelled.id).await.unwrap().state,
        State::Pending
    );
}

// ---- unique keys ----------------------------------------------------------------

pub async fn unique_key_keep_returns_existing(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let (first, created) = f
        .try_enqueue(NewTask::new("t").unique_key("k", OnConflict::Keep))
        .await
        .unwrap();
    assert!(created);
    let (again, created) = f
        .try_enqueue(NewTask::new("t").unique_key("k", OnConflict::Keep))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.id, first.id);
    let (elsewhere, created) = f
        .try_enqueue(
            NewTask::new("t")
                .queue("other")
                .unique_key("k", OnConflict::Keep),
        )
        .await
        .unwrap();
    assert!(created && elsewhere.id != first.id, "keys are per queue");
    // Running tasks hold their key too; finished ones do not.
    f.claim_from("w", 1, &[], &["default"]).await;
    let (held, created) = f
        .try_enqueue(NewTask::new("t").unique_key("k", OnConflict::Keep))
        .await
        .unwrap();
    assert!(!created && held.id == first.id);
    f.complete("w", first.id, None).await.unwrap();
    let (fresh, created) = f
        .try_enqueue(NewTask::new("t").unique_key("k", OnConflict::Keep))
        .await
        .unwrap();
    assert!(created && fresh.id != first.id);
}

pub async fn unique_key_replace_cancels_existing(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let old = f
        .enqueue(NewTask::new("t").unique_key("k", OnConflict::Keep))
        .await;
    let (new, created) = f
        .try_enqueue(NewTask::new("t").unique_key("k", OnConflict::Replace))
        .await
        .unwrap();
    assert!(created && new.id != old.id);
    assert_eq!(f.state(old.id).await, State::Cancelled);
    // A running holder is asked to stop and gives up its key at once.
    f.claim_one("w").await;
    let (newer, created) = f
        .try_enqueue(NewTask::new("t").unique_key("k", OnConflict::Replace))
        .await
        .unwrap();
    assert!(created);
    let running = f.get(new.id).await;
    assert_eq!(
        (running.state, running.cancel_requested),
        (State::Running, true)
    );
    // Its worker hears it at its next heartbeat, and the heartbeat's write
    // keeps it (a store that kept the row as claimed would lose it here).
    assert!(f.beat("w", new.id).await.unwrap().cancel_requested);
    assert!(f.get(new.id).await.cancel_requested);
    let (kept, created) = f
        .try_enqueue(NewTask::new("t").unique_key("k", OnConflict::Keep))
        .await
        .unwrap();
    assert!(!created && kept.id == newer.id);
    // The replaced task cannot come back while its key is held.
    assert_conflict(f.store.retry(old.id).await);
    f.store.cancel(newer.id).await.unwrap();
    assert_eq!(f.store.retry(old.id).await.unwrap().state, State::Pending);
}

/// A batch whose later task replaces an earlier one of the same batch
/// answers the earlier one as it is when the batch is answered: cancelled,
/// also where a `keep` between them returned it.
pub async fn a_batch_answers_the_task_its_own_replace_cancelled(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let limits = Limits::default();
    let specs = [OnConflict::Keep, OnConflict::Keep, OnConflict::Replace]
        .into_iter()
        .enumerate()
        .map(|(i, on_conflict)| {
            NewTask::new("t")
                .unique_key("k", on_conflict)
                .validate(&limits, Position::InBatch(i))
                .expect("a valid task")
        })
        .collect();
    let answers = f.store.enqueue(specs).await.expect("enqueue");
    let created: Vec<bool> = answers.iter().map(|(_, created)| *created).collect();
    assert_eq!(created, [true, false, true]);
    let (first, kept, replacement) = (&answers[0].0, &answers[1].0, &answers[2].0);
    assert_eq!(kept.id, first.id, "the keep returned the first task");
    for answered in [first, kept, replacement] {
        assert_same(&f.get(answered.id).await, answered, "answered as stored");
    }
    assert_eq!(first.state, State::Cancelled);
    assert_eq!(replacement.state, State::Pending);
}

/// A batch meets the keys stored tasks hold, each as often as it names
/// it, and its tasks' dependencies as they stand after its own replaces.
pub async fn a_batch_meets_held_keys_and_dependencies_as_tasks_one_at_a_time_would(
    factory: &dyn StoreFactory,
) {
    let f = fixture(factory).await;
    let keyed = |key: &str, on_conflict| NewTask::new("t").unique_key(key, on_conflict);
    let kept = f.enqueue(keyed("kept", OnConflict::Keep)).await;
    let running = f
        .enqueue(NewTask::new("r").unique_key("running", OnConflict::Keep))
        .await;
    assert_eq!(f.claim_from("w", 1, &["r"], &[]).await.len(), 1);
    let pending = f.enqueue(keyed("pending", OnConflict::Keep)).await;
    let batch = [
        keyed("kept", OnConflict::Keep),
        keyed("kept", OnConflict::Keep),
        keyed("running", OnConflict::Replace),
        keyed("running", OnConflict::Keep),
        keyed("new", OnConflict::Keep),
        keyed("pending", OnConflict::Replace),
        NewTask::new("after_kept").depends_on(kept.id),
        NewTask::new("after_replaced").depends_on(pending.id),
    ];
    let specs = batch
        .into_iter()
        .enumerate()
        .map(|(i, task)| {
            task.validate(&Limits::default(), Position::InBatch(i))
                .expect("a valid task")
        })
        .collect();
    let answers = f.store.enqueue(specs).await.expect("enqueue");
    let created: Vec<bool> = answers.iter().map(|(_, created)| *created).collect();
    assert_eq!(created, [false, false, true, false, true, true, true, true]);
    let answered = |i: usize| &answers[i].0;
    assert_eq!((answered(0).id, answered(1).id), (kept.id, kept.id));
    assert_eq!(
        answered(3).id,
        answered(2).id,
        "the batch's own replacement"
    );
    let running = f.get(running.id).await;
    assert!(running.cancel_requested && running.state == State::Running);
    assert_eq!(f.state(pending.id).await, State::Cancelled);
    assert_eq!(answered(6).state, State::Blocked);
    assert_eq!(
        answered(7).state,
        State::Cancelled,
        "depends on a task the batch replaced"
    );
    for (answer, _) in &answers {
        assert_same(&f.get(answer.id).await, answer, "answered as stored");
    }
}

/// Writers that name one key at once take turns: every replace succeeds,
/// and exactly one task holds the key after them.
pub async fn concurrent_replaces_of_one_key_all_succeed(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let writers: Vec<_> = (0..32)
        .map(|_| {
            let store = Arc::clone(&f.store);
            tokio::spawn(async move {
                let spec = NewTask::new("t")
                    .unique_key("k", OnConflict::Replace)
                    .validate(&Limits::default(), Position::Alone)
                    .expect("valid");
                store.enqueue(vec![spec]).await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for writer in writers {
        let mut answer = writer
            .await
            .expect("joined")
            .expect("every replace succeeds");
        let (task, created) = answer.pop().expect("one answer");
        assert!(created);
        // As made, before a later replace cancelled it: a writer is not
        // answered with what another did after it.
        assert_eq!(task.state, State::Pending, "answered as made");
        ids.push(task.id);
    }
    let mut states = Vec::new();
    for id in ids {
        states.push(f.state(id).await);
    }
    let active = states.iter().filter(|s| s.is_active()).count();
    let cancelled = states.iter().filter(|s| **s == State::Cancelled).count();
    assert_eq!((active, cancelled), (1, 31), "{states:?}");
}

/// Writers that keep one key, at once beside writers of keys of their
/// own: one task made for the shared key and every writer of it answered
/// with that task, each other writer with a task of its own.
pub async fn concurrent_keeps_of_one_key_meet_one_task(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let writers: Vec<_> = (0..64)
        .map(|n| {
            let store = Arc::clone(&f.store);
            let key = if n % 2 == 0 {
                "shared".to_owned()
            } else {
                format!("own-{n}")
            };
            tokio::spawn(async move {
                let spec = NewTask::new("t")
                    .unique_key(&key, OnConflict::Keep)
                    .validate(&Limits::default(), Position::Alone)
                    .expect("valid");
                (key, store.enqueue(vec![spec]).await)
            })
        })
        .collect();
    let mut shared = Vec::new();
    let mut own = std::collections::HashSet::new();
    for writer in writers {
        let (key, answer) = writer.await.expect("joined");
        let [(task, created)] = &answer.expect("every keep succeeds")[..] else {
            panic!("one answer for one task");
        };
        assert_eq!(task.unique_key.as_deref(), Some(key.as_str()));
        assert_eq!(task.state, State::Pending);
        if key == "shared" {
            shared.push((task.id, *created));
        } else {
            assert!(created, "{key} held by no other task");
            assert!(own.insert(task.id), "{key} answered with a task of its own");
        }
    }
    let made: Vec<_> = shared.iter().filter(|(_, created)| *created).collect();
    assert_eq!(made.len(), 1, "one task made for the shared key");
    assert!(
        shared.iter().all(|(id, _)| *id == made[0].0),
        "every keep of the shared key answered with its task"
    );
    assert_eq!(f.state(made[0].0).await, State::Pending);
}

// ---- dependencies ------------------------------------------------------------------

pub async fn dependencies_block_until_completed(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let a = f.enqueue(NewTask::new("a")).await;
    let b = f.enqueue(NewTask::new("b")).await;
    let child = f
        .enqueue(NewTask::new("child").depends_on(a.id).depends_on(b.id))
        .await;
    assert_eq!(child.state, State::Blocked);
    assert_eq!(child.depends_on, vec![a.id, b.id]);
    let claimed = f.claim("w", 10).await;
    assert_eq!(claimed.len(), 2, "a blocked task is not claimable");
    f.complete("w", a.id, None).await.unwrap();
    assert_eq!(f.state(child.id).await, State::Blocked);
    f.complete("w", b.id, None).await.unwrap();
    assert_eq!(f.state(child.id).await, State::Pending);
    assert_eq!(f.claim_one("w").await.id, child.id);
    // Depending on a task that already completed does not block.
    let free = f.enqueue(NewTask::new("free").depends_on(a.id)).await;
    assert_eq!(free.state, State::Pending);
    assert_invalid(
        f.try_enqueue(NewTask::new("x").depends_on(Uuid::now_v7()))
            .await,
        "depends_on[0]",
    );
}

pub async fn failed_dependency_cancels_dependents_transitively(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let root = f.enqueue(NewTask::new("root")).await;
    let mid = f.enqueue(NewTask::new("mid").depends_on(root.id)).await;
    let leaf = f.enqueue(NewTask::new("leaf").depends_on(mid.id)).await;
    f.claim_one("w").await;
    f.fail("w", root.id, Some(false), None).await.unwrap();
    for id in [mid.id, leaf.id] {
        let t = f.get(id).await;
        assert_eq!(t.state, State::Cancelled);
        assert_eq!(t.error.unwrap().kind, ErrorKind::DependencyFailed);
    }
    let late = f.enqueue(NewTask::new("late").depends_on(root.id)).await;
    assert_eq!(
        late.state,
        State::Cancelled,
        "a dependency that already failed cancels at once"
    );
    // Cancelling a dependency cancels its dependents too.
    let other = f.enqueue(NewTask::new("other")).await;
    let waiting = f
        .enqueue(NewTask::new("waiting").depends_on(other.id))
        .await;
    f.store.cancel(other.id).await.unwrap();
    assert_eq!(f.state(waiting.id).await, State::Cancelled);
}

/// The store counts every task it finishes, by (queue, type), however it
/// finishes: an ack, a lease that ran out, a cancel, a dependency that
/// failed, a replace. A manual retry takes nothing back; the task counts
/// again when it finishes again. What is taken is not given again.
pub async fn finished_tasks_are_counted_every_way_a_task_finishes(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    assert_eq!(f.store.take_finished(), []);
    let root = f.enqueue(NewTask::new("root")).await;
    let mid = f.enqueue(NewTask::new("mid").depends_on(root.id)).await;
    f.enqueue(NewTask::new("leaf").depends_on(mid.id)).await;
    f.claim_from("w", 1, &["root"], &[]).await;
    f.fail("w", root.id, Some(false), None).await.unwrap();
    let done = f.enqueue(NewTask::new("done").queue("other")).await;
    f.claim_from("w", 1, &["done"], &[]).await;
    f.complete("w", done.id, None).await.unwrap();
    f.enqueue(NewTask::new("keyed").unique_key("k", OnConflict::Keep))
        .await;
    f.enqueue(NewTask::new("keyed").unique_key("k", OnConflict::Replace))
        .await;
    let lapsed = f.enqueue(NewTask::new("lapsed").max_attempts(1)).await;
    f.claim_from("w", 1, &["lapsed"], &[]).await;
    f.advance(30);
    assert_eq!(ids(&f.store.recover_expired().await.unwrap()), [lapsed.id]);
    let unwanted = f.enqueue(NewTask::new("unwanted")).await;
    f.store.cancel(unwanted.id).await.unwrap();
    // Retried and failed again: counted twice.
    f.store.retry(root.id).await.unwrap();
    f.claim_from("w", 1, &["root"], &[]).await;
    f.fail("w", root.id, Some(false), None).await.unwrap();

    let mut totals = f.store.take_finished();
    totals.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let finished = |completed, failed, cancelled| Finished {
        completed,
        failed,
        cancelled,
    };
    let expected: Vec<(String, String, Finished)> = [
        ("default", "keyed", finished(0, 0, 1)),
        ("default", "lapsed", finished(0, 1, 0)),
        ("default", "leaf", finished(0, 0, 1)),
        ("default", "mid", finished(0, 0, 1)),
        ("default", "root", finished(0, 2, 0)),
        ("default", "unwanted", finished(0, 0, 1)),
        ("other", "done", finished(1, 0, 0)),
    ]
    .into_iter()
    .map(|(queue, task_type, counts)| (queue.to_owned(), task_type.to_owned(), counts))
    .collect();
    assert_eq!(totals, expected);
    assert_eq!(f.store.take_finished(), [], "taken once");
    f.store.cancel(mid.id).await.unwrap_err();
    let again = f.enqueue(NewTask::new("again").queue("other")).await;
    f.store.cancel(again.id).await.unwrap();
    assert_eq!(
        f.store.take_finished(),
        [("other".to_owned(), "again".to_owned(), finished(0, 0, 1))]
    );
}

/// One ack that completes one dependency and fails another moves each of
/// their dependents once, by all it depends on: one whose dependencies all
/// completed is pending, one with a failed dependency cancelled (however
/// many of its others completed), one still waiting for another stays
/// blocked.
pub async fn one_ack_finishing_several_dependencies_moves_each_dependent_by_all_it_depends_on(
    factory: &dyn StoreFactory,
) {
    let f = fixture(factory).await;
    let done = f.enqueue(NewTask::new("done")).await;
    let broken = f.enqueue(NewTask::new("broken")).await;
    let unfinished = f.enqueue(NewTask::new("unfinished")).await;
    let of = |name: &str, deps: &[Uuid]| {
        deps.iter()
            .fold(NewTask::new(name), |task, dep| task.depends_on(*dep))
    };
    let freed = f.enqueue(of("freed", &[done.id])).await;
    let freed_too = f.enqueue(of("freed_too", &[done.id])).await;
    let of_both = f.enqueue(of("of_both", &[done.id, broken.id])).await;
    let of_broken = f.enqueue(of("of_broken", &[broken.id])).await;
    let still_waiting = f
        .enqueue(of("still_waiting", &[done.id, unfinished.id]))
        .await;
    assert_eq!(
        f.claim_from("w", 2, &["done", "broken"], &[]).await.len(),
        2
    );
    let acks = vec![
        Ack::Complete {
            id: done.id,
            result: None,
        },
        Ack::Fail {
            id: broken.id,
            failure: it_broke(Some(false), None),
        },
    ];
    f.store.ack("w", acks).await.expect("ack");
    for (task, state) in [
        (&freed, State::Pending),
        (&freed_too, State::Pending),
        (&of_both, State::Cancelled),
        (&of_broken, State::Cancelled),
        (&still_waiting, State::Blocked),
    ] {
        assert_eq!(f.state(task.id).await, state, "{}", task.task_type);
    }
    assert_eq!(
        f.get(of_both.id).await.error.unwrap().kind,
        ErrorKind::DependencyFailed
    );
}

/// A dependency that completed and was then deleted (by retention, a day
/// after completion by default, or by hand) while another dependency was
/// still running does not hold its dependent back once the other completes.
pub async fn a_dependency_deleted_after_completing_does_not_hold_its_dependent(
    factory: &dyn StoreFactory,
) {
    let f = fixture(factory).await;
    let (quick, slow, child) = f.a_child_of_two().await;
    let claimed = f.claim("w", 2).await;
    assert_eq!(claimed.len(), 2);
    f.complete("w", quick.id, None).await.unwrap();
    f.store.delete(quick.id).await.unwrap();
    assert_eq!(f.state(child.id).await, State::Blocked);
    f.complete("w", slow.id, None).await.unwrap();
    assert_eq!(f.state(child.id).await, State::Pending);
}

pub async fn a_retried_dependent_waits_for_its_dependencies_again(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let (first, second, child) = f.a_child_of_two().await;
    f.store.cancel(first.id).await.unwrap();
    assert_eq!(f.state(child.id).await, State::Cancelled);
    // Its dependency ended without completing: the child could never run.
    assert_conflict(f.store.retry(child.id).await);
    assert_eq!(f.state(child.id).await, State::Cancelled);
    assert_eq!(f.store.retry(first.id).await.unwrap().state, State::Pending);
    let retried = f.store.retry(child.id).await.unwrap();
    assert_eq!(retried.state, State::Blocked, "it waits, it does not run");
    let claimed: Vec<Uuid> = f.claim("w", 10).await.iter().map(|t| t.id).collect();
    assert_eq!(claimed.len(), 2);
    assert!(
        !claimed.contains(&child.id),
        "a blocked task is not claimable"
    );
    f.complete("w", first.id, None).await.unwrap();
    assert_eq!(f.state(child.id).await, State::Blocked);
    f.complete("w", second.id, None).await.unwrap();
    assert_eq!(f.state(child.id).await, State::Pending);
    assert_eq!(f.claim_one("w").await.id, child.id);
    f.fail("w", child.id, Some(false), None).await.unwrap();
    // Every dependency completed: a retry goes straight to pending.
    assert_eq!(f.store.retry(child.id).await.unwrap().state, State::Pending);

    // A dependency deleted since, by retention a day after it completed
    // say: the child ran after it completed, so it may run again.
    assert_eq!(f.claim_one("w").await.id, child.id);
    f.fail("w", child.id, Some(false), None).await.unwrap();
    f.store.delete(first.id).await.unwrap();
    assert_eq!(f.store.retry(child.id).await.unwrap().state, State::Pending);

    // A dependency deleted before the task ever ran: refused, as nothing
    // tells whether it completed.
    let gone = f.enqueue(NewTask::new("gone")).await;
    let orphan = f.enqueue(NewTask::new("orphan").depends_on(gone.id)).await;
    f.store.cancel(gone.id).await.unwrap();
    f.store.delete(gone.id).await.unwrap();
    assert_conflict(f.store.retry(orphan.id).await);

    // Waiting again, it is cancelled again if a dependency ends badly.
    let dep = f.enqueue(NewTask::new("dep")).await;
    let dependent = f
        .enqueue(NewTask::new("dependent").depends_on(dep.id))
        .await;
    f.store.cancel(dep.id).await.unwrap();
    f.store.retry(dep.id).await.unwrap();
    let waiting = f.store.retry(dependent.id).await.unwrap();
    assert_eq!(waiting.state, State::Blocked);
    f.store.cancel(dep.id).await.unwrap();
    let cancelled = f.get(dependent.id).await;
    assert_eq!(cancelled.state, State::Cancelled);
    assert_eq!(cancelled.error.unwrap().kind, ErrorKind::DependencyFailed);
}

// ---- queues ------------------------------------------------------------------------

/// Claims from all queues across many queues and types come in claim
/// order, skip paused queues and keep within each limited queue's room,
/// whether a claim takes one task or many. The stores gather candidates
/// across queues without asking each queue (`ready.rs`, PostgreSQL's
/// `admit_in_claim_order`, past its 64 queues asked one by one); the
/// order must be that of asking each.
pub async fn claims_across_many_queues_come_in_claim_order(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut expected: Vec<(i64, i64, usize, Uuid)> = Vec::new();
    let mut enqueued = 0;
    for queue in 0..70 {
        for (t, task_type) in ["a", "b"].into_iter().enumerate() {
            for n in 0..3 {
                // Priorities and delays that interleave the queues.
                let priority = 1 + ((queue * 7 + t * 3 + n * 5) % 10) as i64;
                let task = f
                    .enqueue(
                        NewTask::new(task_type)
                            .queue(format!("q{queue}"))
                            .priority(priority),
                    )
                    .await;
                enqueued += 1;
                if queue != 5 && queue != 9 {
                    expected.push((-priority, task.run_at.as_millis(), enqueued, task.id));
                }
            }
        }
        f.advance(1);
    }
    f.store
        .update_queue("q5", queue_settings(true, None))
        .await
        .unwrap();
    // q9 runs one at a time: of its six tasks, one is claimed.
    f.store
        .update_queue("q9", queue_settings(false, Some(1)))
        .await
        .unwrap();
    let q9_first = f.claim_from("other", 1, &[], &["q9"]).await;
    assert_eq!(q9_first.len(), 1);
    expected.sort();
    let expected: Vec<Uuid> = expected.into_iter().map(|(_, _, _, id)| id).collect();

    let mut claimed: Vec<Uuid> = Vec::new();
    for limit in [1, 1, 3, 7, 1, 50, 1000] {
        claimed.extend(f.claim("w", limit).await.iter().map(|t| t.id));
    }
    assert_eq!(claimed.len(), expected.len(), "claimed {claimed:?}");
    assert_eq!(claimed, expected, "claim order across queues");
    assert!(f.claim("w", 10).await.is_empty(), "q5 is paused, q9 full");

    // Of one type, across the queues, the same order.
    f.store
        .update_queue("q5", queue_settings(false, None))
        .await
        .unwrap();
    let q5_b: Vec<Uuid> = f
        .claim_from("w", 2, &["b"], &[])
        .await
        .iter()
        .map(|t| t.id)
        .collect();
    let q5_a: Vec<Uuid> = f
        .claim_from("w", 10, &["a", "c"], &[])
        .await
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!((q5_b.len(), q5_a.len()), (2, 3), "q5 resumed");
}

/// A claim from all queues finds the first tasks it may take behind many
/// it may not: a paused queue's, a full limited queue's and other types'
/// tasks ahead of them in claim order. PostgreSQL reads a window of the
/// first pending tasks and grows it while they are not enough, past
/// 16,384 walking every pending (queue, type) instead; the answer must be
/// the same either way. Among at most 256 pending (queue, type) pairs it
/// claims from those once its first window is short; past that it reads
/// windows: the case runs with the `b` tasks in 300 queues and in 3.
pub async fn a_claim_from_all_queues_looks_past_tasks_it_may_not_take(factory: &dyn StoreFactory) {
    for b_queues in [300, 3] {
        let f = fixture(factory).await;
        // 251 so that a window of 256 ends with the free queue's tasks: it
        // holds three tasks a claim of three might take, one of which the full
        // queue's, and nothing of the queues after.
        let held = f
            .enqueue_all(
                (0..251)
                    .map(|_| NewTask::new("a").queue("held").priority(10))
                    .collect(),
            )
            .await;
        f.enqueue_all(
            (0..4)
                .map(|_| NewTask::new("a").queue("busy").priority(9))
                .collect(),
        )
        .await;
        let free_x = f
            .enqueue_all(
                (0..2)
                    .map(|_| NewTask::new("x").queue("free").priority(8))
                    .collect(),
            )
            .await;
        // In 300 queues, more than a claim naming its types asks one by
        // one, and more pending pairs than 256.
        let b = f
            .enqueue_all(
                (0..300)
                    .map(|n| {
                        NewTask::new("b")
                            .queue(format!("q{}", n % b_queues))
                            .priority(5)
                    })
                    .collect(),
            )
            .await;
        f.store
            .update_queue("held", queue_settings(true, None))
            .await
            .unwrap();
        f.store
            .update_queue("busy", queue_settings(false, Some(1)))
            .await
            .unwrap();
        assert_eq!(f.claim_from("other", 1, &[], &["busy"]).await.len(), 1);
        let ids = |tasks: Vec<Task>| tasks.into_iter().map(|t| t.id).collect::<Vec<Uuid>>();

        assert_eq!(
            ids(f.claim_from("w", 2, &["b"], &[]).await),
            b[0..2],
            "b in {b_queues} queues"
        );
        assert_eq!(
            ids(f.claim("w", 3).await),
            [free_x[0], free_x[1], b[2]],
            "past the paused queue, the full one, then the next in claim order (b in {b_queues} queues)"
        );
        // More tasks of the paused queue ahead than the largest window.
        for _ in 0..2 {
            f.enqueue_all(
                (0..8_500)
                    .map(|_| NewTask::new("a").queue("held").priority(10))
                    .collect(),
            )
            .await;
        }
        assert_eq!(
            ids(f.claim("w", 2).await),
            b[3..5],
            "behind 17,251 of the paused queue's (b in {b_queues} queues)"
        );
        assert_eq!(
            ids(f.claim_from("w", 1, &["b"], &[]).await),
            b[5..6],
            "b in {b_queues} queues"
        );
        f.store
            .update_queue("held", queue_settings(false, None))
            .await
            .unwrap();
        assert_eq!(
            ids(f.claim("w", 1).await),
            held[0..1],
            "resumed, first again (b in {b_queues} queues)"
        );
    }
}

pub async fn paused_queue_and_concurrency_limit(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    for _ in 0..3 {
        f.enqueue(NewTask::new("t").queue("q")).await;
    }
    let paused = f
        .store
        .update_queue(
            "q",
            QueuePatch {
                paused: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(paused.paused);
    assert_eq!(paused.counts.pending, 3);
    assert!(f.claim("w", 10).await.is_empty());
    f.store
        .update_queue(
            "q",
            QueuePatch {
                paused: Some(false),
                concurrency: Some(Some(2)),
            },
        )
        .await
        .unwrap();
    let first = f.claim("w", 10).await;
    assert_eq!(first.len(), 2, "concurrency 2 admits two");
    assert!(f.claim("w", 10).await.is_empty());
    f.complete("w", first[0].id, None).await.unwrap();
    assert_eq!(f.claim("w", 10).await.len(), 1);
    let info = f
        .store
        .update_queue(
            "q",
            QueuePatch {
                concurrency: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(info.concurrency, None);
    // A queue can be configured before its first task.
    let fresh = f
        .store
        .update_queue(
            "fresh",
            QueuePatch {
                paused: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(fresh.paused);
    assert!(
        f.store
            .queues()
            .await
            .unwrap()
            .iter()
            .any(|q| q.name == "fresh" && q.paused)
    );
    f.enqueue(NewTask::new("t").queue("fresh")).await;
    assert!(f.claim("w", 10).await.is_empty());
}

/// A claim takes each limited queue's tasks up to its room and fills the
/// rest from other queues, in claim order, whether it names the queues,
/// names the types, or names neither: the tasks a limited queue has beyond
/// its room do not take the places of others'.
/// A claim of a type over several queues, one of which alone holds tasks
/// of it, takes them in claim order within that queue's room, and a second
/// claim at the same time takes the next ones.
pub async fn a_claim_from_queues_of_which_one_holds_its_type_takes_them_in_order(
    factory: &dyn StoreFactory,
) {
    for limit in [None, Some(5)] {
        let f = fixture(factory).await;
        f.enqueue(NewTask::new("other").queue("empty-of-it")).await;
        let mut held = Vec::new();
        for priority in [1, 7, 4, 7, 9, 2] {
            let task = NewTask::new("t").queue("holds-it").priority(priority);
            held.push((priority, f.enqueue(task).await.id));
        }
        f.store
            .update_queue("holds-it", queue_settings(false, limit))
            .await
            .unwrap();
        // Highest priority first, the earliest first among equals.
        held.sort_by_key(|(priority, _)| std::cmp::Reverse(*priority));
        let in_order: Vec<Uuid> = held.into_iter().map(|(_, id)| id).collect();
        let ids = |tasks: Vec<Task>| tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
        let (first, second) = tokio::join!(
            f.claim_from("w1", 2, &["t"], &[]),
            f.claim_from("w2", 2, &["t"], &[]),
        );
        let position = |id: &Uuid| in_order.iter().position(|x| x == id);
        let mut both = Vec::new();
        for claimed in [ids(first), ids(second)] {
            assert!(
                claimed.is_sorted_by_key(position),
                "a claim takes its tasks in claim order ({limit:?})"
            );
            both.extend(claimed);
        }
        both.sort_by_key(position);
        assert_eq!(
            both,
            in_order[..4],
            "two claims of 2 at once take the first four ({limit:?})"
        );
        let third = ids(f.claim_from("w3", 10, &["t"], &[]).await);
        let room = limit.map_or(2, |limit| limit as usize - 4);
        assert_eq!(
            third,
            in_order[4..4 + room],
            "then what is left, within the queue's room ({limit:?})"
        );
    }
}

pub async fn a_claim_fills_past_limited_queues_rooms_from_other_queues(factory: &dyn StoreFactory) {
    for (types, queues) in [
        (&[][..], &["busy", "free", "tight"][..]),
        (&["a", "b", "c"][..], &[][..]),
        (&[][..], &[][..]),
    ] {
        let f = fixture(factory).await;
        let mut busy = Vec::new();
        for n in 0..6 {
            let task_type = if n % 2 == 0 { "a" } else { "b" };
            busy.push(
                f.enqueue(NewTask::new(task_type).queue("busy").priority(9))
                    .await
                    .id,
            );
        }
        let mut tight = Vec::new();
        for _ in 0..2 {
            tight.push(
                f.enqueue(NewTask::new("c").queue("tight").priority(5))
                    .await
                    .id,
            );
        }
        let mut free = Vec::new();
        for _ in 0..4 {
            free.push(f.enqueue(NewTask::new("a").queue("free")).await.id);
        }
        f.store
            .update_queue("busy", queue_settings(false, Some(2)))
            .await
            .unwrap();
        f.store
            .update_queue("tight", queue_settings(false, Some(1)))
            .await
            .unwrap();
        let claimed: Vec<Uuid> = f
            .claim_from("w", 6, types, queues)
            .await
            .iter()
            .map(|t| t.id)
            .collect();
        let expected: Vec<Uuid> = [&busy[..2], &tight[..1], &free[..3]].concat();
        assert_eq!(
            claimed, expected,
            "naming types {types:?} and queues {queues:?}: busy's room, tight's, then free's"
        );
    }
}

// ---- listing and counting --------------------------------------------------------

pub async fn list_filters_and_keyset_pagination(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut made = Vec::new();
    for i in 0..25 {
        let task = NewTask::new(if i % 2 == 0 { "even" } else { "odd" })
            .queue(if i < 10 { "first" } else { "second" })
            .label("project_id", format!("p{}", i % 3))
            .owner(if i % 5 == 0 { "alice" } else { "bob" });
        made.push(f.enqueue(task).await);
        f.clock.advance(Duration::from_millis(10));
    }
    let pages = every_page(
        &*f.store,
        ListQuery {
            limit: 10,
            ..Default::default()
        },
    )
    .await;
    let seen: Vec<Uuid> = pages.iter().flat_map(|page| ids(&page.tasks)).collect();
    let newest_first: Vec<Uuid> = made.iter().rev().map(|t| t.id).collect();
    assert_eq!(seen, newest_first, "every task once, newest first");

    let count = |q: ListQuery| {
        let store = Arc::clone(&f.store);
        async move {
            store
                .list(&ListQuery { limit: 100, ..q })
                .await
                .unwrap()
                .tasks
                .len()
        }
    };
    assert_eq!(
        count(ListQuery {
            task_type: Some("even".into()),
            ..Default::default()
        })
        .await,
        13
    );
    assert_eq!(
        count(ListQuery {
            queue: Some("first".into()),
            ..Default::default()
        })
        .await,
        10
    );
    assert_eq!(
        count(ListQuery {
            owner: Some("alice".into()),
            ..Default::default()
        })
        .await,
        5
    );
    assert_eq!(
        count(ListQuery {
            labels: vec![("project_id".into(), "p0".into())],
            ..Default::default()
        })
        .await,
        9
    );
    assert_eq!(
        count(ListQuery {
            created_after: Some(made[19].created_at),
            ..Default::default()
        })
        .await,
        5
    );
    assert_eq!(
        count(ListQuery {
            created_before: Some(made[3].created_at),
            ..Default::default()
        })
        .await,
        3
    );
    f.claim("w", 4).await;
    assert_eq!(
        count(ListQuery {
            states: vec![State::Running],
            ..Default::default()
        })
        .await,
        4
    );
    assert_eq!(
        count(ListQuery {
            states: vec![State::Running, State::Pending],
            ..Default::default()
        })
        .await,
        25
    );
    assert_invalid(
        f.store
            .list(&ListQuery {
                limit: 0,
                ..Default::default()
            })
            .await,
        "limit",
    );
    assert_invalid(
        f.store
            .list(&ListQuery {
                limit: 1001,
                ..Default::default()
            })
            .await,
        "limit",
    );
    assert_invalid(
        f.store
            .list(&ListQuery {
                limit: 10,
                cursor: Some("garbage".into()),
                ..Default::default()
            })
            .await,
        "cursor",
    );
}

/// A list of several states (named in any order, one of them twice) holds
/// each task of those states once, newest first across the states, page by
/// page, with its other filters applied to every state.
pub async fn several_states_are_listed_together_newest_first(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut made = Vec::new();
    for i in 0..14 {
        let task = NewTask::new(if i % 2 == 0 { "a" } else { "b" }).max_attempts(1);
        made.push(f.enqueue(task).await);
        f.clock.advance(Duration::from_millis(10));
    }
    let mut claimed = ids(&f.claim("w", 9).await);
    claimed.sort_unstable();
    let mut oldest: Vec<Uuid> = made[..9].iter().map(|t| t.id).collect();
    oldest.sort_unstable();
    assert_eq!(claimed, oldest, "a claim takes the oldest tasks");
    // Of the nine claimed: completed, failed, left running, in turn.
    for (i, task) in made[..9].iter().enumerate() {
        match i % 3 {
            0 => drop(f.complete("w", task.id, None).await.expect("complete")),
            1 => drop(f.fail("w", task.id, Some(false), None).await.expect("fail")),
            _ => {}
        }
    }
    f.store.cancel(made[13].id).await.expect("cancel");
    let mut now = Vec::new();
    for task in &made {
        now.push(f.get(task.id).await);
    }
    for states in [
        vec![State::Failed, State::Completed, State::Failed],
        vec![State::Completed, State::Running, State::Pending],
        vec![State::Cancelled, State::Failed, State::Running],
    ] {
        for task_type in [None, Some("a")] {
            let pages = every_page(
                &*f.store,
                ListQuery {
                    states: states.clone(),
                    task_type: task_type.map(str::to_owned),
                    limit: 2,
                    ..Default::default()
                },
            )
            .await;
            let seen: Vec<Uuid> = pages.iter().flat_map(|page| ids(&page.tasks)).collect();
            let expected: Vec<Uuid> = now
                .iter()
                .rev()
                .filter(|t| states.contains(&t.state))
                .filter(|t| task_type.is_none_or(|wanted| t.task_type == wanted))
                .map(|t| t.id)
                .collect();
            assert!(
                expected.len() >= 3,
                "the case lists a few tasks: {states:?}"
            );
            assert_eq!(
                seen, expected,
                "{states:?} of type {task_type:?}: each once, newest first"
            );
        }
    }
}

/// A list of one owner's tasks in some states holds the same tasks whether
/// the store reads them through the states' index or the owner's, which it
/// does once the states hold more than
/// [`offload_core::OWNER_LIST_STATE_WALK`] tasks: here the completed ones
/// do and the failed ones do not.
pub async fn an_owners_list_of_states_is_the_same_through_either_index(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let specs = |owner: &str, n: usize| -> Vec<_> {
        (0..n)
            .map(|i| {
                NewTask::new(if i % 2 == 0 { "a" } else { "b" })
                    .owner(owner)
                    .max_attempts(1)
                    .validate(&Limits::default(), Position::Alone)
                    .expect("a valid task")
            })
            .collect()
    };
    let mut small = Vec::new();
    for (task, _) in f.store.enqueue(specs("small", 40)).await.expect("enqueue") {
        small.push(task.id);
    }
    let big = offload_core::OWNER_LIST_STATE_WALK as usize + 1;
    for start in (0..big).step_by(5_000) {
        f.store
            .enqueue(specs("big", (big - start).min(5_000)))
            .await
            .expect("enqueue");
    }
    // Every fourth of small's fails; every other task completes.
    let failing: std::collections::HashSet<Uuid> = small.iter().copied().step_by(4).collect();
    loop {
        let claimed = f.claim("w", 1000).await;
        if claimed.is_empty() {
            break;
        }
        let acks = claimed
            .iter()
            .map(|task| {
                if failing.contains(&task.id) {
                    Ack::Fail {
                        id: task.id,
                        failure: it_broke(Some(false), None),
                    }
                } else {
                    Ack::Complete {
                        id: task.id,
                        result: None,
                    }
                }
            })
            .collect();
        for outcome in f.store.ack("w", acks).await.expect("ack") {
            outcome.expect("the worker held the task");
        }
    }
    let newest_first = |wanted: &dyn Fn(&Uuid) -> bool| -> Vec<Uuid> {
        small
            .iter()
            .rev()
            .copied()
            .filter(|id| wanted(id))
            .collect()
    };
    for (states, task_type, expected) in [
        (
            vec![State::Completed],
            None,
            newest_first(&|id| !failing.contains(id)),
        ),
        (
            vec![State::Failed, State::Completed],
            None,
            newest_first(&|_| true),
        ),
        (
            vec![State::Failed],
            None,
            newest_first(&|id| failing.contains(id)),
        ),
        (
            vec![State::Completed, State::Pending],
            Some("a"),
            small
                .iter()
                .enumerate()
                .rev()
                .filter(|(i, id)| i % 2 == 0 && !failing.contains(*id))
                .map(|(_, id)| *id)
                .collect(),
        ),
    ] {
        let pages = every_page(
            &*f.store,
            ListQuery {
                states: states.clone(),
                task_type: task_type.map(str::to_owned),
                owner: Some("small".into()),
                limit: 7,
                ..Default::default()
            },
        )
        .await;
        let seen: Vec<Uuid> = pages.iter().flat_map(|page| ids(&page.tasks)).collect();
        assert_eq!(seen, expected, "{states:?} of small's, type {task_type:?}");
    }
}

/// A label filter matches a whole key and a whole value, whatever they
/// hold (quotes, backslashes, text beyond ASCII, a colon, a value that
/// begins another), among a task's other labels, in every state's list.
/// A label borne by older tasks only, behind more newer tasks than a list
/// walks before it reads the labels' index on PostgreSQL, and by more of
/// them than one round of that index brings, is listed page by page,
/// newest first, each of its tasks once, with and without other filters;
/// so is a label borne by newer and older tasks alike.
pub async fn a_labels_tasks_behind_many_without_it_are_listed_page_by_page(
    factory: &dyn StoreFactory,
) {
    let f = fixture(factory).await;
    let alike = |n: usize, task_type: &str, p: Option<&str>| {
        (0..n)
            .map(|_| {
                let task = NewTask::new(task_type);
                match p {
                    Some(p) => task.label("p", p),
                    None => task,
                }
            })
            .collect::<Vec<_>>()
    };
    // Oldest first: 1,200 rare tasks of type `b`, the first 300 of them
    // completed; 1,000 rare ones of type `a`; 1,200 common ones of type
    // `a`; then 2,500 of type `b`, every other one common, the others
    // without labels.
    let rare_b = f.enqueue_all(alike(1_200, "b", Some("rare"))).await;
    let claimed = f.claim("w", 300).await;
    assert_eq!(ids(&claimed), rare_b[..300]);
    f.complete_all("w", &claimed).await;
    let rare_a = f.enqueue_all(alike(1_000, "a", Some("rare"))).await;
    let common_a = f.enqueue_all(alike(1_200, "a", Some("common"))).await;
    let mut common_b = Vec::new();
    for _ in 0..5 {
        common_b.extend(f.enqueue_all(alike(250, "b", Some("common"))).await);
        f.enqueue_all(alike(250, "b", None)).await;
    }
    // Then 5,100 of type `c` labelled `many`: more than SQLite walks a
    // label's own entries for, so its walk of every task finds them.
    let many = f.enqueue_all(alike(5_100, "c", Some("many"))).await;
    let newest_first = |groups: &[&[Uuid]]| {
        let mut ids: Vec<Uuid> = groups.concat();
        ids.reverse();
        ids
    };
    // A list of type `b` walks the newest 2,000 of the last 2,500 first;
    // then the first round of the labels' index brings the rare tasks of
    // type `a`, none of them listed.
    // The label's value, the states, the type, the page's limit, and the
    // tasks listed.
    type Case<'a> = (&'a str, Vec<State>, Option<&'a str>, usize, Vec<Uuid>);
    let cases: Vec<Case> = vec![
        ("rare", vec![], None, 50, newest_first(&[&rare_b, &rare_a])),
        ("rare", vec![], Some("b"), 100, newest_first(&[&rare_b])),
        (
            "rare",
            vec![State::Completed],
            None,
            40,
            newest_first(&[&rare_b[..300]]),
        ),
        (
            "rare",
            vec![State::Completed, State::Pending],
            Some("zzz"),
            50,
            vec![],
        ),
        (
            "rare",
            vec![State::Pending, State::Completed],
            Some("b"),
            70,
            newest_first(&[&rare_b]),
        ),
        (
            "common",
            vec![],
            None,
            500,
            newest_first(&[&common_a, &common_b]),
        ),
        // Pending tasks, which SQLite lists from its writer's memory.
        (
            "rare",
            vec![State::Pending],
            Some("b"),
            60,
            newest_first(&[&rare_b[300..]]),
        ),
        (
            "rare",
            vec![State::Pending],
            None,
            50,
            newest_first(&[&rare_b[300..], &rare_a]),
        ),
        ("many", vec![], None, 1_000, newest_first(&[&many])),
        (
            "many",
            vec![State::Pending],
            Some("c"),
            1_000,
            newest_first(&[&many]),
        ),
        ("many", vec![State::Completed], None, 50, vec![]),
    ];
    for case in cases {
        assert_label_listed(&*f.store, case).await;
    }
    // Claimed, a task is listed as running, not as pending: on SQLite its
    // row says pending until its next write, and the writer's memory tells.
    let claimed = f.claim("w", 10).await;
    assert_eq!(ids(&claimed), rare_b[300..310]);
    let cases: Vec<Case> = vec![
        (
            "rare",
            vec![State::Pending],
            Some("b"),
            100,
            newest_first(&[&rare_b[310..]]),
        ),
        (
            "rare",
            vec![State::Running],
            None,
            4,
            newest_first(&[&rare_b[300..310]]),
        ),
    ];
    for case in cases {
        assert_label_listed(&*f.store, case).await;
    }
}

/// Every page of the list of label `p` (with `states`, `task_type`, and
/// `limit` a page) holds `wanted`, each once, newest first, in full pages
/// but the last.
async fn assert_label_listed(
    store: &dyn Store,
    (p, states, task_type, limit, wanted): (&str, Vec<State>, Option<&str>, usize, Vec<Uuid>),
) {
    let query = ListQuery {
        labels: vec![("p".to_owned(), p.to_owned())],
        states: states.clone(),
        task_type: task_type.map(str::to_owned),
        limit,
        ..Default::default()
    };
    let pages = every_page(store, query).await;
    let listed: Vec<Uuid> = pages.iter().flat_map(|page| ids(&page.tasks)).collect();
    assert_eq!(
        listed.len(),
        wanted.len(),
        "p: {p}, states {states:?}, type {task_type:?}: how many"
    );
    assert!(
        listed == wanted,
        "p: {p}, states {states:?}, type {task_type:?}: each once, newest first"
    );
    assert!(
        pages.iter().all(|page| page.tasks.len() <= limit)
            && pages[..pages.len() - 1]
                .iter()
                .all(|page| page.tasks.len() == limit),
        "p: {p}, states {states:?}, type {task_type:?}: full pages but the last"
    );
}

pub async fn a_label_filter_matches_whole_keys_and_values(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    type Labels<'a> = &'a [(&'a str, &'a str)];
    let labelled: &[Labels] = &[
        &[("k", "p1")],
        &[("k", "p17")],
        &[("k2", "p1")],
        &[("a", "1"), ("k", "p1"), ("z", "x")],
        &[("k", "say \"hi\" \\ there")],
        &[("k", "café ✓")],
        &[("k", "p1:x")],
        &[("k", "line\nbreak\t")],
        &[("\"k\"", "p1")],
    ];
    let mut made = Vec::new();
    for labels in labelled {
        let task = labels.iter().fold(NewTask::new("t"), |task, (key, value)| {
            task.label(*key, *value)
        });
        made.push(f.enqueue(task).await.id);
    }
    let listed = |labels: Labels, states: Vec<State>| {
        let query = ListQuery {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            states,
            limit: 100,
            ..Default::default()
        };
        let store = Arc::clone(&f.store);
        async move {
            let mut found = ids(&store.list(&query).await.unwrap().tasks);
            found.sort();
            found
        }
    };
    let expect: &[(Labels, &[usize])] = &[
        (&[("k", "p1")], &[0, 3]),
        (&[("k", "p17")], &[1]),
        (&[("k2", "p1")], &[2]),
        (&[("a", "1"), ("k", "p1")], &[3]),
        (&[("a", "1"), ("k", "p17")], &[]),
        (&[("k", "say \"hi\" \\ there")], &[4]),
        (&[("k", "café ✓")], &[5]),
        (&[("k", "café")], &[]),
        (&[("k", "p1:x")], &[6]),
        (&[("k", "line\nbreak\t")], &[7]),
        (&[("\"k\"", "p1")], &[8]),
        (&[("k", "")], &[]),
        (&[("z", "x")], &[3]),
    ];
    for (labels, indexes) in expect {
        let mut wanted: Vec<Uuid> = indexes.iter().map(|&i| made[i]).collect();
        wanted.sort();
        for states in [
            vec![],
            vec![State::Pending],
            vec![State::Pending, State::Running],
        ] {
            assert_eq!(
                listed(labels, states.clone()).await,
                wanted,
                "labels {labels:?} in states {states:?}"
            );
        }
    }
}

/// A page ends where its tasks' payloads, results and progress data reach
/// [`PAGE_BYTES`], short of `limit`, and the next goes on from there:
/// through the rows (every state) and through the writer's memory (pending).
pub async fn a_page_ends_where_its_bytes_reach_the_budget(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let bulky = serde_json::json!({ "text": "x".repeat(900_000) });
    let mut made = Vec::new();
    for i in 0..24 {
        let task = NewTask::new("t");
        // A few small ones among them, to be carried along in a page.
        let task = if i % 6 == 0 {
            task
        } else {
            task.payload(&bulky).expect("a payload")
        };
        made.push(f.enqueue(task).await.id);
    }
    // Newer small tasks, more than a store reading in rounds asks for
    // first, so that the large ones come in a later round.
    for _ in 0..70 {
        made.push(f.enqueue(NewTask::new("t")).await.id);
    }
    made.reverse();
    for limit in [1000, 64, 7] {
        for states in [vec![], vec![State::Pending]] {
            let query = ListQuery {
                states: states.clone(),
                limit,
                ..Default::default()
            };
            let mut seen = Vec::new();
            for page in every_page(&*f.store, query).await {
                let sizes: Vec<usize> = page.tasks.iter().map(Task::bulk_bytes).collect();
                let (last, before_last) = sizes.split_last().expect("never an empty page");
                let bytes_before_last: usize = before_last.iter().sum();
                assert!(
                    bytes_before_last < PAGE_BYTES && sizes.len() <= limit,
                    "{limit} {states:?}: the page went on past its budget: {sizes:?}"
                );
                assert!(
                    page.next_cursor.is_none()
                        || sizes.len() == limit
                        || bytes_before_last + last >= PAGE_BYTES,
                    "{limit} {states:?}: a page with room left said another follows: {sizes:?}"
                );
                seen.extend(ids(&page.tasks));
            }
            assert_eq!(
                seen, made,
                "{limit} {states:?}: every task once, newest first"
            );
        }
    }
}

/// A claim ends where its tasks' payloads reach [`PAGE_BYTES`], short of
/// `limit`, and leaves the rest pending for the next, in claim order; every
/// task reaches a worker once, with its payload whole. More bulk than the
/// SQLite writer keeps in memory, so that some rows come from the table;
/// two types, which PostgreSQL reads candidates for one by one; payloads
/// either side of the size PostgreSQL's candidates carry.
pub async fn a_claim_ends_where_its_bytes_reach_the_budget(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut made = Vec::new();
    for i in 0..60 {
        let size = match i % 5 {
            0 => 10,
            1 => 8192 - 8,
            2 => 8192 - 7,
            _ => 1_000_000,
        };
        // `{"b":"…"}` is 8 bytes besides the text.
        let payload = serde_json::json!({ "b": "x".repeat(size) });
        let task = NewTask::new(if i % 2 == 0 { "a" } else { "b" })
            .payload(&payload)
            .expect("a payload");
        let task = f.enqueue(task).await;
        made.push((task.id, serde_json::to_string(&payload).expect("json")));
    }
    let mut claimed = Vec::new();
    loop {
        let tasks = f.claim("w", 1000).await;
        let Some((last, before_last)) = tasks.split_last() else {
            break;
        };
        let bytes_before_last: usize = before_last.iter().map(Task::bulk_bytes).sum();
        assert!(
            bytes_before_last < PAGE_BYTES,
            "the claim went on past its budget: {} tasks, {bytes_before_last} bytes before the last",
            tasks.len()
        );
        let left = made.len() - claimed.len() - tasks.len();
        assert!(
            left == 0 || bytes_before_last + last.bulk_bytes() >= PAGE_BYTES,
            "a claim with room left took {} tasks and left {left}",
            tasks.len()
        );
        claimed.extend(tasks);
        assert!(claimed.len() <= made.len(), "a task was claimed twice");
    }
    let got: Vec<(Uuid, String)> = claimed
        .iter()
        .map(|t| (t.id, t.payload.get().to_owned()))
        .collect();
    assert!(
        got == made,
        "every task once, in claim order, its payload whole"
    );
    for (id, payload) in made.iter().step_by(3) {
        let task = f.store.get(*id).await.expect("get").expect("stored");
        assert_eq!(task.state, State::Running);
        assert!(
            task.payload.get() == payload,
            "{id}: the stored payload changed"
        );
    }
}

/// Pending and running tasks listed by state alone, hundreds of each among
/// many more stored, page after page: each listed once, newest first, with
/// filters, and gone from the list once it leaves the state.
pub async fn pending_and_running_tasks_are_listed_page_by_page_newest_first(
    factory: &dyn StoreFactory,
) {
    let f = fixture(factory).await;
    let specs = |queue: &'static str, from: usize| {
        (from..from + 700)
            .map(move |i| {
                NewTask::new(if i % 3 == 0 { "third" } else { "other" })
                    .queue(queue)
                    .validate(&Limits::default(), Position::Alone)
                    .expect("a valid task")
            })
            .collect::<Vec<_>>()
    };
    let mut stored: Vec<Task> = Vec::new();
    for specs in [specs("a", 0), specs("b", 700)] {
        let answers = f.store.enqueue(specs).await.expect("enqueue");
        stored.extend(answers.into_iter().map(|(task, _)| task));
    }
    // Running: 600 of queue a, 200 of b; the other 600 stay pending.
    let mut running: Vec<Uuid> = ids(&f.claim_from("w", 600, &[], &["a"]).await);
    running.extend(ids(&f.claim_from("w", 200, &[], &["b"]).await));
    assert_eq!(running.len(), 800);
    let listed = |state: State, query: ListQuery| {
        let store = Arc::clone(&f.store);
        async move {
            let query = ListQuery {
                states: vec![state],
                limit: 130,
                ..query
            };
            let pages = every_page(&*store, query).await;
            assert!(
                pages
                    .iter()
                    .flat_map(|p| &p.tasks)
                    .all(|t| t.state == state)
            );
            pages
                .iter()
                .flat_map(|page| ids(&page.tasks))
                .collect::<Vec<_>>()
        }
    };
    // Listed in the order they were stored, newest first.
    let newest_first = |keep: &dyn Fn(&Task) -> bool| -> Vec<Uuid> {
        stored
            .iter()
            .rev()
            .filter(|t| keep(t))
            .map(|t| t.id)
            .collect()
    };
    let is_running = |t: &Task| running.contains(&t.id);
    assert_eq!(
        listed(State::Running, ListQuery::default()).await,
        newest_first(&|t| is_running(t)),
        "every running task once, newest first"
    );
    assert_eq!(
        listed(State::Pending, ListQuery::default()).await,
        newest_first(&|t| !is_running(t)),
        "every pending task once, newest first"
    );
    let third_of = |queue: &'static str| ListQuery {
        queue: Some(queue.into()),
        task_type: Some("third".into()),
        ..Default::default()
    };
    assert_eq!(
        listed(State::Running, third_of("a")).await,
        newest_first(&|t| is_running(t) && t.queue == "a" && t.task_type == "third"),
    );
    assert_eq!(
        listed(State::Pending, third_of("b")).await,
        newest_first(&|t| !is_running(t) && t.queue == "b" && t.task_type == "third"),
    );
    let ended: Vec<Uuid> = running.iter().step_by(2).copied().collect();
    let acks = ended
        .iter()
        .map(|&id| Ack::Complete { id, result: None })
        .collect();
    f.store.ack("w", acks).await.expect("ack");
    assert_eq!(
        listed(State::Running, ListQuery::default()).await,
        newest_first(&|t| is_running(t) && !ended.contains(&t.id)),
        "ended tasks leave the list"
    );
    let claimed = ids(&f.claim_from("w", 10, &[], &["b"]).await);
    assert_eq!(
        listed(State::Pending, ListQuery::default()).await,
        newest_first(&|t| !is_running(t) && !claimed.contains(&t.id)),
        "claimed tasks leave the list"
    );
}

pub async fn stats_and_queues_count_every_task(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    f.enqueue(NewTask::new("a")).await;
    f.enqueue(NewTask::new("a").queue("q2")).await;
    f.enqueue(NewTask::new("b").delay(Duration::from_secs(9)))
        .await;
    let done = f.enqueue(NewTask::new("b")).await;
    f.claim_from("w", 1, &["b"], &[]).await;
    f.complete("w", done.id, None).await.unwrap();
    f.claim_from("w", 1, &["a"], &["q2"]).await;
    let stats = f.store.stats().await.unwrap();
    assert_eq!(
        (
            stats.total.pending,
            stats.total.scheduled,
            stats.total.running,
            stats.total.completed
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(stats.total.total(), 4);
    assert_eq!(stats.types["a"].total(), 2);
    assert_eq!(stats.types["b"].completed, 1);
    assert_eq!(stats.queues["q2"].running, 1);
    assert_eq!(stats.queues["default"].total(), 3);
    assert_eq!(f.store.totals().await.unwrap(), stats.total);
    let queues = f.store.queues().await.unwrap();
    let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, vec!["default", "q2"]);
    assert_eq!(queues[0].counts, stats.queues["default"]);
}

/// A batch whose tasks go back and forth between queues makes each queue
/// once, and the queues list every one with its tasks.
pub async fn a_batch_makes_each_of_its_queues(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let specs = ["q1", "q2", "q1", "q2", "q3", "q1"]
        .iter()
        .enumerate()
        .map(|(i, queue)| {
            NewTask::new("t")
                .queue(*queue)
                .validate(&Limits::default(), Position::InBatch(i))
                .unwrap()
        })
        .collect();
    f.store.enqueue(specs).await.unwrap();
    let queues = f.store.queues().await.unwrap();
    let pending: Vec<(&str, u64)> = queues
        .iter()
        .map(|q| (q.name.as_str(), q.counts.pending))
        .collect();
    assert_eq!(pending, vec![("q1", 3), ("q2", 2), ("q3", 1)]);
}

pub async fn delete_and_clear_only_finished_tasks(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let active = f.enqueue(NewTask::new("t")).await;
    assert_conflict(f.store.delete(active.id).await);
    f.store.cancel(active.id).await.unwrap();
    f.store.delete(active.id).await.unwrap();
    assert!(f.store.get(active.id).await.unwrap().is_none());
    assert!(matches!(
        f.store.delete(active.id).await,
        Err(Error::NotFound(_))
    ));

    let old = f.enqueue(NewTask::new("t")).await;
    f.store.cancel(old.id).await.unwrap();
    f.advance(100);
    let recent = f.enqueue(NewTask::new("t")).await;
    f.store.cancel(recent.id).await.unwrap();
    let keep = f.enqueue(NewTask::new("t")).await;
    let cleared = f
        .store
        .clear(&ClearRequest {
            states: vec![State::Cancelled],
            older_than: Some(Duration::from_secs(50)),
        })
        .await
        .unwrap();
    assert_eq!(cleared, 1);
    assert!(f.store.get(old.id).await.unwrap().is_none());
    assert!(f.store.get(recent.id).await.unwrap().is_some());
    let cleared = f
        .store
        .clear(&ClearRequest {
            states: State::FINISHED.to_vec(),
            older_than: None,
        })
        .await
        .unwrap();
    assert_eq!(cleared, 1);
    assert_eq!(f.state(keep.id).await, State::Pending);
    assert_invalid(
        f.store
            .clear(&ClearRequest {
                states: vec![State::Pending],
                older_than: None,
            })
            .await,
        "state",
    );
    assert_eq!(f.store.stats().await.unwrap().total.total(), 1);
}

pub async fn retention_deletes_old_finished_tasks_in_batches(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut completed = Vec::new();
    for _ in 0..5 {
        let t = f.enqueue(NewTask::new("t")).await;
        f.claim_one("w").await;
        f.complete("w", t.id, None).await.unwrap();
        completed.push(t.id);
    }
    let failed = f.enqueue(NewTask::new("t")).await;
    f.claim_one("w").await;
    f.fail("w", failed.id, Some(false), None).await.unwrap();
    let retention = Retention::default();
    assert_eq!(f.store.purge_finished(&retention, 100).await.unwrap(), 0);
    f.advance(24 * 3600);
    assert_eq!(
        f.store.purge_finished(&retention, 2).await.unwrap(),
        2,
        "one batch at a time"
    );
    assert_eq!(f.store.purge_finished(&retention, 100).await.unwrap(), 3);
    assert_eq!(
        f.state(failed.id).await,
        State::Failed,
        "failed tasks are kept 7 days"
    );
    f.advance(6 * 24 * 3600);
    assert_eq!(f.store.purge_finished(&retention, 100).await.unwrap(), 1);
    assert_eq!(f.store.stats().await.unwrap().total.total(), 0);
    assert_eq!(f.store.totals().await.unwrap().total(), 0);
}

pub async fn unknown_ids_are_not_found(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let id = Uuid::now_v7();
    assert!(f.store.get(id).await.unwrap().is_none());
    assert!(matches!(f.store.cancel(id).await, Err(Error::NotFound(_))));
    assert!(matches!(f.store.retry(id).await, Err(Error::NotFound(_))));
    assert!(matches!(f.store.delete(id).await, Err(Error::NotFound(_))));
    assert!(matches!(
        f.complete("w", id, None).await,
        Err(Error::NotFound(_))
    ));
}

pub async fn changes_are_published_as_events(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut events = f.store.hub().watch(Interest::Every).await;
    let mut ready = f.store.hub().watch_ready();
    ready.borrow_and_update();
    let task = f.enqueue(NewTask::new("t")).await;
    assert!(
        ready.has_changed().unwrap(),
        "a pending task signals readiness"
    );
    let created = events.recv().await.unwrap();
    assert_eq!(
        (created.kind, created.task.id, created.task.state),
        (EventKind::State, task.id, State::Pending)
    );
    f.claim_one("w").await;
    assert_eq!(events.recv().await.unwrap().task.state, State::Running);
    f.store
        .heartbeat(HeartbeatRequest {
            id: task.id,
            worker_id: "w".into(),
            progress: Some(ProgressUpdate {
                percent: Some(10.0),
                ..Default::default()
            }),
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap();
    let progress = events.recv().await.unwrap();
    assert_eq!(progress.kind, EventKind::Progress);
    assert_eq!(progress.task.progress.as_ref().unwrap().percent, Some(10.0));
    let mut cancels = f.store.hub().subscribe_cancels();
    f.store.cancel(task.id).await.unwrap();
    assert_eq!(
        cancels.recv().await.unwrap(),
        task.id,
        "running tasks' cancellation is signalled"
    );
    // A failed operation publishes nothing.
    assert!(f.store.retry(task.id).await.is_err());
    let next = events.recv().await.unwrap();
    assert!(
        next.task.cancel_requested,
        "only the cancel request follows"
    );
    assert!(events.try_recv().is_err());
}

/// A watch of one task, owner, queue or type hears that one's changes
/// alone, and a store builds events for watches as for a stream of every
/// change.
pub async fn each_watch_hears_the_changes_of_what_it_names(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let watched = f.enqueue(NewTask::new("t")).await;
    let hub = f.store.hub();
    let mut watches = [
        hub.watch(Interest::Task(watched.id)).await,
        hub.watch(Interest::Owner("alice".into())).await,
        hub.watch(Interest::Queue("reports".into())).await,
        hub.watch(Interest::Type("mail".into())).await,
    ];
    assert!(hub.has_listeners());
    let alices = f.enqueue(NewTask::new("t").owner("alice")).await;
    let reports = f.enqueue(NewTask::new("t").queue("reports")).await;
    let mail = f.enqueue(NewTask::new("mail")).await;
    f.enqueue(NewTask::new("t").owner("bob")).await;
    f.store.cancel(watched.id).await.unwrap();
    let heard: Vec<Vec<(Uuid, State)>> = watches
        .iter_mut()
        .map(|watch| {
            std::iter::from_fn(|| watch.try_recv().ok())
                .map(|event| (event.task.id, event.task.state))
                .collect()
        })
        .collect();
    assert_eq!(
        heard,
        [
            vec![(watched.id, State::Cancelled)],
            vec![(alices.id, State::Pending)],
            vec![(reports.id, State::Pending)],
            vec![(mail.id, State::Pending)],
        ]
    );
    drop(watches);
    assert!(!hub.has_listeners(), "the last watch gone, nobody listens");
}

pub async fn ack_batch_answers_each_item(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(f.enqueue(NewTask::new("t")).await);
    }
    f.claim("w", 3).await;
    let failure = Failure {
        message: "no".into(),
        kind: FailureKind::Error,
        retry: Some(false),
        retry_in: None,
    };
    let outcomes = f
        .store
        .ack(
            "w",
            vec![
                Ack::Complete {
                    id: tasks[0].id,
                    result: None,
                },
                Ack::Fail {
                    id: tasks[1].id,
                    failure,
                },
                Ack::Complete {
                    id: tasks[3].id,
                    result: None,
                },
                Ack::Complete {
                    id: tasks[2].id,
                    result: None,
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[0].as_ref().unwrap().state, State::Completed);
    assert_eq!(outcomes[1].as_ref().unwrap().state, State::Failed);
    assert!(
        matches!(outcomes[2], Err(Error::Conflict(_))),
        "task 3 was never claimed"
    );
    assert_eq!(outcomes[3].as_ref().unwrap().state, State::Completed);
    assert_eq!(f.state(tasks[3].id).await, State::Pending);
}

/// Claims and acks of many tasks at once store each task exactly as its own
/// answer says, however the store batches the writes, and a task's change
/// is visible to what the same call does next (a dependent unblocked by two
/// dependencies acked together; a task acked twice in one call).
pub async fn batched_claims_and_acks_store_each_task_as_answered(factory: &dyn StoreFactory) {
    let f = fixture(factory).await;
    const N: usize = 70;
    let mut tasks = Vec::new();
    for i in 0..N {
        // Rows that differ in what a claim and an ack leave alone too.
        let task = NewTask::new("t")
            .timeout_secs(60 + i as i64)
            .max_attempts(2 + (i % 3) as i64);
        tasks.push(f.enqueue(task).await);
        if i % 10 == 9 {
            f.advance(1);
        }
    }
    let child = f
        .enqueue(
            NewTask::new("child")
                .depends_on(tasks[0].id)
                .depends_on(tasks[N - 2].id),
        )
        .await;
    f.advance(1);
    let claimed = f.claim("w", N).await;
    assert_eq!(claimed.len(), N);
    for task in &claimed {
        assert_same(&f.get(task.id).await, task, "stored as claimed");
    }

    f.advance(1);
    let mut acks = Vec::new();
    for (i, task) in claimed.iter().enumerate() {
        acks.push(if i % 5 == 4 {
            Ack::Fail {
                id: task.id,
                failure: Failure {
                    message: format!("broke {i}"),
                    kind: FailureKind::Error,
                    retry: Some(i % 10 == 4),
                    retry_in: None,
                },
            }
        } else {
            Ack::Complete {
                id: task.id,
                result: (i % 2 == 0)
                    .then(|| RawValue::from_string(format!("{{\"n\":{i}}}")).expect("JSON")),
            }
        });
    }
    // The first task again, after it completed in this same call.
    acks.push(Ack::Complete {
        id: claimed[0].id,
        result: None,
    });
    let mut outcomes = f.store.ack("w", acks).await.expect("ack call");
    assert_conflict(outcomes.pop().expect("an answer per ack"));
    assert_eq!(outcomes.len(), N);
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let answered = outcome.expect("held");
        let expected = match i {
            _ if i % 10 == 4 => State::Scheduled,
            _ if i % 5 == 4 => State::Failed,
            _ => State::Completed,
        };
        assert_eq!(answered.state, expected, "task {i}");
        assert_same(
            &f.get(answered.id).await,
            &answered,
            &format!("task {i} stored as answered"),
        );
    }
    assert_eq!(f.state(child.id).await, State::Pending);
}

/// Polls `op` at most `polls` times, then drops it: the caller going away
/// while the operation waits at its `polls`-th await point (the first
/// poll starts it; each later one follows a wake-up, an answer arriving).
async fn drop_after<F: std::future::Future>(polls: usize, op: F) -> Option<F::Output> {
    let mut op = std::pin::pin!(op);
    let mut left = polls;
    std::future::poll_fn(move |cx| {
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        left -= 1;
        op.as_mut().poll(cx).map(Some)
    })
    .await
}

/// A server drops a request's operation when its client goes away. Whatever
/// the operation committed by then must still be announced (to event
/// streams, to waiting workers): here an enqueue and a claim are dropped at
/// each of their await points in turn, and every task they left pending or
/// running must have had that change published.
pub async fn an_operation_dropped_by_its_caller_publishes_what_it_committed(
    factory: &dyn StoreFactory,
) {
    const MAX_POLLS: usize = 1000;
    let f = fixture(factory).await;
    let mut events = f.store.hub().watch(Interest::Every).await;
    for polls in 0.. {
        assert!(
            polls < MAX_POLLS,
            "an enqueue ends within {MAX_POLLS} polls"
        );
        let spec = NewTask::new("enqueued")
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        if drop_after(polls, f.store.enqueue(vec![spec]))
            .await
            .is_some()
        {
            break;
        }
    }
    let request = ClaimRequest {
        worker_id: "w".into(),
        types: vec!["claimed".into()],
        queues: Vec::new(),
        limit: 1,
        lease: Duration::from_secs(30),
    };
    for polls in 0.. {
        assert!(polls < MAX_POLLS, "a claim ends within {MAX_POLLS} polls");
        f.enqueue(NewTask::new("claimed")).await;
        if drop_after(polls, f.store.claim(&request)).await.is_some() {
            break;
        }
    }
    let stored = f
        .store
        .list(&ListQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .tasks;
    let mut unannounced: std::collections::HashSet<(Uuid, State)> =
        stored.iter().map(|task| (task.id, task.state)).collect();
    // What a dropped operation committed is announced once its commit
    // returns, which may be a moment after its caller went away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !unannounced.is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if event.kind == EventKind::State => {
                unannounced.remove(&(event.task.id, event.task.state));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("event stream: {e}"),
            Err(_) => break,
        }
    }
    assert!(
        unannounced.is_empty(),
        "{} of {} stored tasks' last change was committed but never published: {unannounced:?}",
        unannounced.len(),
        stored.len()
    );
}
