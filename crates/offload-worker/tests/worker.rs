//! The worker runtime, in process, against a real SQLite store.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use offload_core::{
    Ack, ClaimRequest, ErrorKind, HeartbeatAck, HeartbeatRequest, NewTask, State, Store, Task,
};
use offload_engine::{Engine, EngineConfig};
use offload_sqlite::{Durability, SqliteOptions, SqliteStore};
use offload_worker::{CancelReason, TaskContext, TaskFailure, TaskSource, Worker};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Setup {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        durability: Durability::Relaxed,
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteStore::open(dir.path().join("w.db"), options).unwrap());
    let engine = Engine::start(store, EngineConfig::default());
    Setup { _dir: dir, engine }
}

impl Setup {
    fn store(&self) -> &Arc<dyn Store> {
        self.engine.store()
    }

    async fn enqueue(&self, task: NewTask) -> Task {
        self.engine.enqueue(task).await.unwrap().0
    }

    async fn get(&self, id: Uuid) -> Task {
        self.store().get(id).await.unwrap().unwrap()
    }

    /// Waits for `id` to satisfy `done`; a bound, not a timing assertion.
    async fn wait_for(&self, id: Uuid, what: &str, done: impl Fn(&Task) -> bool) -> Task {
        for _ in 0..3000 {
            let task = self.get(id).await;
            if done(&task) {
                return task;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("task {id} never became {what}: {:?}", self.get(id).await);
    }

    /// Waits for the counts to satisfy `done`; a bound, not a timing assertion.
    async fn wait_for_count(&self, what: &str, done: impl Fn(&offload_core::Stats) -> bool) {
        for _ in 0..3000 {
            if done(&self.store().stats().await.unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never {what}: {:?}", self.store().stats().await.unwrap());
    }

    /// Runs `worker` until `tasks` tasks are completed, then stops it.
    async fn run_until_completed(&self, worker: Worker, tasks: usize) {
        let (stop, handle) = self.spawn(worker);
        self.wait_for_count("all completed", |stats| {
            stats.total.completed == tasks as u64
        })
        .await;
        stop.cancel();
        handle.await.unwrap();
    }

    fn spawn(&self, worker: Worker) -> (CancellationToken, JoinHandle<()>) {
        let stop = CancellationToken::new();
        let handle = tokio::spawn({
            let stop = stop.clone();
            async move { worker.run(stop).await.unwrap() }
        });
        (stop, handle)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_handlers_and_stores_results() {
    let s = setup();
    let worker = Worker::new(Arc::clone(&s.engine))
        .concurrency(4)
        .handle("double", |ctx: TaskContext| async move {
            let n: u64 = ctx.payload()?;
            Ok(serde_json::json!({ "doubled": n * 2 }))
        })
        .handle("nothing", |_ctx: TaskContext| async move { Ok(()) });
    let (stop, handle) = s.spawn(worker);
    let mut ids = Vec::new();
    for n in 0..50u64 {
        ids.push((
            n,
            s.enqueue(NewTask::new("double").payload(&n).unwrap())
                .await
                .id,
        ));
    }
    let quiet = s.enqueue(NewTask::new("nothing")).await;
    for (n, id) in ids {
        let done = s
            .wait_for(id, "completed", |t| t.state == State::Completed)
            .await;
        assert_eq!(
            done.result.unwrap().get(),
            format!(r#"{{"doubled":{}}}"#, n * 2)
        );
        assert_eq!(done.attempt, 1);
    }
    let quiet = s
        .wait_for(quiet.id, "completed", |t| t.state == State::Completed)
        .await;
    assert!(quiet.result.is_none(), "a unit result stores none");
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payload_fails_without_retrying_and_errors_retry() {
    let s = setup();
    let tries = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&tries);
    let worker = Worker::new(Arc::clone(&s.engine))
        .handle("typed", |ctx: TaskContext| async move {
            let _n: u64 = ctx.payload()?;
            Ok(())
        })
        .handle("flaky", move |_ctx: TaskContext| {
            let tries = Arc::clone(&counted);
            async move {
                if tries.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(TaskFailure::new("first try fails").retry_in(Duration::ZERO));
                }
                Ok("second try works")
            }
        });
    let (stop, handle) = s.spawn(worker);
    let typed = s
        .enqueue(NewTask::new("typed").payload(&"not a number").unwrap())
        .await;
    let failed = s
        .wait_for(typed.id, "failed", |t| t.state == State::Failed)
        .await;
    assert_eq!(
        failed.attempt, 1,
        "a payload that does not decode is not retried"
    );
    assert!(failed.error.unwrap().message.contains("payload"));
    let flaky = s.enqueue(NewTask::new("flaky")).await;
    let done = s
        .wait_for(flaky.id, "completed", |t| t.state == State::Completed)
        .await;
    assert_eq!(done.attempt, 2);
    assert_eq!(done.errors[0].message, "first try fails");
    stop.cancel();
    handle.await.unwrap();
}

/// A completion the store refuses for its result fails the task with the
/// reason, once: the handler's work is done, and its lease is not left to
/// expire into another run of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_store_refuses_fails_the_task_once_saying_why() {
    let s = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let worker = Worker::new(Arc::clone(&s.engine))
        .handle("deep", move |_ctx: TaskContext| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let text = format!("{}{}", "[".repeat(65), "]".repeat(65));
                Ok(serde_json::from_str::<serde_json::Value>(&text).unwrap())
            }
        })
        .handle("huge", |_ctx: TaskContext| async move {
            Ok("x".repeat(2 << 20))
        });
    let (stop, handle) = s.spawn(worker);
    let deep = s.enqueue(NewTask::new("deep")).await;
    let huge = s.enqueue(NewTask::new("huge")).await;
    for (id, why) in [(deep.id, "at most 64 deep"), (huge.id, "over the limit")] {
        let failed = s.wait_for(id, "failed", |t| t.state == State::Failed).await;
        assert_eq!(failed.attempt, 1);
        let message = failed.error.unwrap().message;
        assert!(
            message.contains("result was refused") && message.contains(why),
            "{message}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_reaches_the_handler() {
    let s = setup();
    let seen: Arc<Mutex<Option<CancelReason>>> = Arc::default();
    let record = Arc::clone(&seen);
    let worker = Worker::new(Arc::clone(&s.engine)).handle("wait", move |ctx: TaskContext| {
        let record = Arc::clone(&record);
        async move {
            ctx.cancellation().cancelled().await;
            *record.lock().unwrap() = ctx.cancel_reason();
            Err::<(), _>(TaskFailure::new("stopped as asked"))
        }
    });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("wait")).await;
    s.wait_for(task.id, "running", |t| t.state == State::Running)
        .await;
    s.store().cancel(task.id).await.unwrap();
    let ended = s
        .wait_for(task.id, "cancelled", |t| t.state == State::Cancelled)
        .await;
    assert_eq!(ended.error.unwrap().kind, ErrorKind::Cancelled);
    assert_eq!(*seen.lock().unwrap(), Some(CancelReason::Cancelled));
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_fires_the_token_and_fails_the_attempt() {
    let s = setup();
    let seen: Arc<Mutex<Option<CancelReason>>> = Arc::default();
    let record = Arc::clone(&seen);
    let worker = Worker::new(Arc::clone(&s.engine)).handle("slow", move |ctx: TaskContext| {
        let record = Arc::clone(&record);
        async move {
            ctx.cancellation().cancelled().await;
            *record.lock().unwrap() = ctx.cancel_reason();
            Err::<(), _>(TaskFailure::new("gave up"))
        }
    });
    let (stop, handle) = s.spawn(worker);
    let task = s
        .enqueue(NewTask::new("slow").timeout_secs(1).max_attempts(1))
        .await;
    let failed = s
        .wait_for(task.id, "failed", |t| t.state == State::Failed)
        .await;
    assert_eq!(failed.error.unwrap().kind, ErrorKind::Timeout);
    assert_eq!(*seen.lock().unwrap(), Some(CancelReason::Timeout));
    stop.cancel();
    handle.await.unwrap();
}

/// A worker that lost its lease (here: its heartbeats come later than the
/// lease lasts, as for a worker paused or cut off) learns it at its next
/// heartbeat: the handler's token fires, and what the handler then answers
/// is dropped, since the store already failed that attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_lease_fires_the_token_and_drops_the_answer() {
    let s = setup();
    let seen: Arc<Mutex<Option<CancelReason>>> = Arc::default();
    let record = Arc::clone(&seen);
    let config = offload_worker::WorkerConfig {
        lease: Duration::from_secs(1),
        heartbeat_interval: Duration::from_secs(3),
        ..offload_worker::WorkerConfig::default()
    };
    let worker = Worker::new(Arc::clone(&s.engine))
        .with_config(config)
        .handle("held", move |ctx: TaskContext| {
            let record = Arc::clone(&record);
            async move {
                ctx.cancellation().cancelled().await;
                *record.lock().unwrap() = ctx.cancel_reason();
                Ok::<_, TaskFailure>("finished after all")
            }
        });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("held").max_attempts(1)).await;
    let failed = s
        .wait_for(task.id, "failed", |t| t.state == State::Failed)
        .await;
    assert_eq!(failed.error.as_ref().unwrap().kind, ErrorKind::LeaseExpired);
    for _ in 0..3000 {
        if seen.lock().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*seen.lock().unwrap(), Some(CancelReason::LeaseLost));
    stop.cancel();
    handle.await.unwrap();
    let after = s.get(task.id).await;
    assert_eq!(after.state, State::Failed);
    assert!(after.result.is_none(), "the late answer was dropped");
    assert_eq!(after.error.unwrap().kind, ErrorKind::LeaseExpired);
}

/// Settings no store would take are refused before the first fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_set_up_wrong_refuses_to_start_and_says_why() {
    let s = setup();
    let started = |worker: Worker| async move {
        tokio::time::timeout(
            Duration::from_secs(10),
            worker.run(CancellationToken::new()),
        )
        .await
        .expect("refused at once")
        .expect_err("refused")
        .to_string()
    };
    let no_handlers = Worker::new(Arc::clone(&s.engine));
    assert!(started(no_handlers).await.contains("handlers"));
    for lease in [Duration::from_millis(500), Duration::from_secs(7200)] {
        let worker = Worker::new(Arc::clone(&s.engine))
            .lease(lease)
            .handle("t", |_ctx: TaskContext| async move { Ok(()) });
        let message = started(worker).await;
        assert!(
            message.contains("lease: must be 1 s to 3600 s"),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_task_not_the_worker() {
    let s = setup();
    let worker =
        Worker::new(Arc::clone(&s.engine)).handle("maybe", |ctx: TaskContext| async move {
            // "now" panics at the handler's first poll, "later" after it
            // waited once: the runner meets each at a different point.
            let explode: String = ctx.payload()?;
            if explode == "later" {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if explode != "no" {
                panic!("the handler blew up");
            }
            Ok("fine")
        });
    let (stop, handle) = s.spawn(worker);
    for when in ["now", "later"] {
        let boom = s
            .enqueue(
                NewTask::new("maybe")
                    .payload(&when)
                    .unwrap()
                    .max_attempts(1),
            )
            .await;
        let failed = s
            .wait_for(boom.id, "failed", |t| t.state == State::Failed)
            .await;
        assert!(
            failed
                .error
                .unwrap()
                .message
                .contains("the handler blew up"),
            "{when}"
        );
    }
    for _ in 0..3 {
        let fine = s
            .enqueue(NewTask::new("maybe").payload(&"no").unwrap())
            .await;
        s.wait_for(fine.id, "completed", |t| t.state == State::Completed)
            .await;
    }
    assert!(!handle.is_finished(), "the worker keeps running");
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_recorded_while_running() {
    let s = setup();
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::clone(&release);
    let worker = Worker::new(Arc::clone(&s.engine)).handle("steps", move |ctx: TaskContext| {
        let gate = Arc::clone(&gate);
        async move {
            ctx.progress(50.0, "half way").await?;
            gate.notified().await;
            Ok(())
        }
    });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("steps")).await;
    let running = s
        .wait_for(task.id, "reporting progress", |t| t.progress.is_some())
        .await;
    let progress = running.progress.unwrap();
    assert_eq!(
        (progress.percent, progress.message.as_deref()),
        (Some(50.0), Some("half way"))
    );
    release.notify_one();
    s.wait_for(task.id, "completed", |t| t.state == State::Completed)
        .await;
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_tasks_finish() {
    let s = setup();
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&started);
    let worker = Worker::new(Arc::clone(&s.engine))
        .shutdown_grace(Duration::from_secs(20))
        .handle("short", move |_ctx: TaskContext| {
            let signal = Arc::clone(&signal);
            async move {
                signal.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok("finished")
            }
        });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("short")).await;
    started.notified().await;
    stop.cancel();
    handle.await.unwrap();
    // The worker returned only after the task completed and was acked.
    assert_eq!(s.get(task.id).await.state, State::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_grace_hands_tasks_back_for_retry() {
    let s = setup();
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&started);
    let worker = Worker::new(Arc::clone(&s.engine))
        .shutdown_grace(Duration::from_millis(200))
        .handle("stuck", move |_ctx: TaskContext| {
            let signal = Arc::clone(&signal);
            async move {
                signal.notify_one();
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("stuck")).await;
    started.notified().await;
    stop.cancel();
    handle.await.unwrap();
    let back = s.get(task.id).await;
    assert_eq!(
        back.state,
        State::Pending,
        "handed back at once for another worker"
    );
    assert!(back.error.unwrap().message.contains("shut down"));
    assert!(back.worker_id.is_none());
}

/// The engine as a task source, with a hook that sees each call of acks
/// before it is sent and may refuse it.
struct HookedSource {
    engine: Arc<Engine>,
    before_ack: AckHook,
}

type AckHook = Box<dyn Fn(&[Ack]) -> offload_core::Result<()> + Send + Sync>;

impl HookedSource {
    fn new(
        engine: &Arc<Engine>,
        before_ack: impl Fn(&[Ack]) -> offload_core::Result<()> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine: Arc::clone(engine),
            before_ack: Box::new(before_ack),
        })
    }
}

#[async_trait::async_trait]
impl TaskSource for HookedSource {
    async fn fetch(
        &self,
        request: &ClaimRequest,
        wait: Duration,
        stop: &CancellationToken,
    ) -> offload_core::Result<Vec<Task>> {
        TaskSource::fetch(&*self.engine, request, wait, stop).await
    }

    async fn heartbeat(&self, request: HeartbeatRequest) -> offload_core::Result<HeartbeatAck> {
        TaskSource::heartbeat(&*self.engine, request).await
    }

    async fn ack(
        &self,
        worker_id: &str,
        acks: Vec<Ack>,
    ) -> offload_core::Result<Vec<offload_core::Result<()>>> {
        (self.before_ack)(&acks)?;
        TaskSource::ack(&*self.engine, worker_id, acks).await
    }
}

/// A task that ends while its server restarts is reported once the server
/// is back, within its lease, instead of being given up after a few
/// seconds and run again when the lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_outlasts_a_restart_shorter_than_the_lease() {
    let s = setup();
    // Acks fail as unavailable for 5 s, as a restarting server answers them.
    let down_until = tokio::time::Instant::now() + Duration::from_secs(5);
    let refused = Arc::new(AtomicUsize::new(0));
    let counted_refusals = Arc::clone(&refused);
    let source = HookedSource::new(&s.engine, move |_| {
        if tokio::time::Instant::now() < down_until {
            counted_refusals.fetch_add(1, Ordering::SeqCst);
            return Err(offload_core::Error::Unavailable("restarting".into()));
        }
        Ok(())
    });
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let worker = Worker::from_source(source).handle("once", move |_ctx: TaskContext| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, TaskFailure>("done") }
    });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("once")).await;
    let done = s
        .wait_for(task.id, "completed", |t| t.state == State::Completed)
        .await;
    assert_eq!(done.attempt, 1, "it ran once");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(refused.load(Ordering::SeqCst) > 1, "the outage was met");
    stop.cancel();
    handle.await.unwrap();
}

/// The bytes of results and failure messages in one call of acks.
fn body_bytes(acks: &[Ack]) -> usize {
    acks.iter()
        .map(|ack| match ack {
            Ack::Complete { result, .. } => result.as_ref().map_or(0, |json| json.get().len()),
            Ack::Fail { failure, .. } => failure.message.len(),
        })
        .sum()
}

/// Runs `TASKS` tasks whose results together are over `LIMIT` bytes, all
/// ending at once, through a source that refuses as bad input any call of
/// acks over `LIMIT` (as a server refuses a body over its limit); answers
/// each call's (acks, bytes, refused) and the handlers' runs.
async fn complete_large_results(
    config: offload_worker::WorkerConfig,
) -> (Vec<(usize, usize, bool)>, usize) {
    const TASKS: usize = 12;
    const RESULT_CHARS: usize = 300_000;
    const LIMIT: usize = 1_000_000;
    let s = setup();
    let calls: Arc<Mutex<Vec<(usize, usize, bool)>>> = Arc::default();
    let noted = Arc::clone(&calls);
    let source = HookedSource::new(&s.engine, move |acks| {
        let bytes = body_bytes(acks);
        let first = noted.lock().unwrap().is_empty();
        noted
            .lock()
            .unwrap()
            .push((acks.len(), bytes, bytes > LIMIT));
        if first {
            // The first completion's call holds the acker while the others
            // queue, so that the next call carries them all.
            std::thread::sleep(Duration::from_millis(200));
        }
        if bytes > LIMIT {
            return Err(offload_core::Error::invalid(
                "request",
                format!("the request body is over the limit of {LIMIT} bytes"),
            ));
        }
        Ok(())
    });
    let runs = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Barrier::new(TASKS));
    let (counted, barrier) = (Arc::clone(&runs), Arc::clone(&all_done));
    let worker = Worker::new(source)
        .with_config(config)
        .concurrency(TASKS)
        .handle("report", move |_ctx: TaskContext| {
            let (counted, barrier) = (Arc::clone(&counted), Arc::clone(&barrier));
            async move {
                barrier.wait().await;
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, TaskFailure>("r".repeat(RESULT_CHARS))
            }
        });
    s.engine
        .enqueue_batch((0..TASKS).map(|_| NewTask::new("report")).collect())
        .await
        .unwrap();
    s.run_until_completed(worker, TASKS).await;
    let all = offload_core::ListQuery {
        limit: TASKS,
        ..Default::default()
    };
    for task in s.store().list(&all).await.unwrap().tasks {
        assert_eq!(task.attempt, 1, "ran once: {task:?}");
        assert_eq!(task.result.unwrap().get().len(), RESULT_CHARS + 2);
    }
    let calls = calls.lock().unwrap().clone();
    (calls, runs.load(Ordering::SeqCst))
}

/// A call of acks refused whole for its size is split until its halves go
/// through. Sent again as it was, it was given up after six tries, and its
/// tasks, done, ran again when their leases ran out, to be refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_refused_together_for_their_size_are_split_not_given_up() {
    let (calls, runs) = complete_large_results(offload_worker::WorkerConfig::default()).await;
    assert_eq!(runs, 12, "each handler ran once");
    assert!(
        calls.iter().any(|&(acks, _, refused)| refused && acks > 1),
        "a call over the limit was made and refused: {calls:?}"
    );
    let delivered: usize = calls
        .iter()
        .filter(|&&(_, _, refused)| !refused)
        .map(|&(acks, _, _)| acks)
        .sum();
    assert_eq!(delivered, 12, "each completion delivered once: {calls:?}");
}

/// The worker keeps each call of acks under its byte budget, so a server
/// whose limit is the budget refuses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_sent_in_calls_under_the_byte_budget() {
    let config = offload_worker::WorkerConfig {
        max_ack_batch_bytes: 1_000_000,
        ..Default::default()
    };
    let (calls, runs) = complete_large_results(config).await;
    assert_eq!(runs, 12);
    assert!(
        calls.iter().all(|&(_, _, refused)| !refused),
        "no call was over the budget: {calls:?}"
    );
    assert!(
        calls.iter().any(|&(acks, _, _)| acks > 1),
        "completions still went together: {calls:?}"
    );
}

/// Sets its flag once dropped, after a while, as a handler's connection or
/// lock takes a moment to let go.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        std::thread::sleep(Duration::from_millis(50));
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_stopped_at_shutdown_is_dropped_before_its_task_is_handed_back() {
    let s = setup();
    let handler_dropped = Arc::new(AtomicBool::new(false));
    // Whether the handler's future had been dropped, noted at each ack.
    let dropped_at_ack: Arc<Mutex<Vec<bool>>> = Arc::default();
    let (noted, flag) = (Arc::clone(&dropped_at_ack), Arc::clone(&handler_dropped));
    let source = HookedSource::new(&s.engine, move |_| {
        noted.lock().unwrap().push(flag.load(Ordering::SeqCst));
        Ok(())
    });
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&started);
    let worker = Worker::new(Arc::clone(&source))
        .shutdown_grace(Duration::from_millis(100))
        .handle("holder", move |_ctx: TaskContext| {
            let signal = Arc::clone(&signal);
            let flag = Arc::clone(&handler_dropped);
            async move {
                let _held = SetOnDrop(flag);
                signal.notify_one();
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("holder")).await;
    started.notified().await;
    stop.cancel();
    handle.await.unwrap();
    assert_eq!(s.get(task.id).await.state, State::Pending);
    assert_eq!(*dropped_at_ack.lock().unwrap(), [true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_is_respected() {
    let s = setup();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (Arc::clone(&running), Arc::clone(&peak));
    let worker = Worker::new(Arc::clone(&s.engine)).concurrency(3).handle(
        "busy",
        move |_ctx: TaskContext| {
            let (running, peak) = (Arc::clone(&r), Arc::clone(&p));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        },
    );
    let (stop, handle) = s.spawn(worker);
    for _ in 0..30 {
        s.enqueue(NewTask::new("busy")).await;
    }
    s.wait_for_count("30 completed", |stats| stats.total.completed == 30)
        .await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "{peak} handlers ran at once with concurrency 3");
    assert!(peak >= 2, "the worker never ran tasks concurrently");
    stop.cancel();
    handle.await.unwrap();
}

/// The engine as a task source, recording how many tasks each fetch that
/// found some asked for.
struct RecordingSource {
    engine: Arc<Engine>,
    asked: Mutex<Vec<usize>>,
}

#[async_trait::async_trait]
impl offload_worker::TaskSource for RecordingSource {
    async fn fetch(
        &self,
        request: &offload_core::ClaimRequest,
        wait: Duration,
        stop: &CancellationToken,
    ) -> offload_core::Result<Vec<Task>> {
        let tasks = offload_worker::TaskSource::fetch(&*self.engine, request, wait, stop).await?;
        if !tasks.is_empty() {
            self.asked.lock().unwrap().push(request.limit);
        }
        Ok(tasks)
    }

    async fn heartbeat(
        &self,
        request: offload_core::HeartbeatRequest,
    ) -> offload_core::Result<offload_core::HeartbeatAck> {
        offload_worker::TaskSource::heartbeat(&*self.engine, request).await
    }

    async fn ack(
        &self,
        worker_id: &str,
        acks: Vec<offload_core::Ack>,
    ) -> offload_core::Result<Vec<offload_core::Result<()>>> {
        offload_worker::TaskSource::ack(&*self.engine, worker_id, acks).await
    }
}

/// Short tasks end in a burst; the next fetch asks for every slot the burst
/// freed, not for the first one back (which left the rest to another round
/// trip: a worker of 500 slots fetched 285 tasks a time on average).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_asks_for_every_slot_a_burst_of_short_tasks_freed() {
    const SLOTS: usize = 50;
    const TASKS: usize = 2000;
    let s = setup();
    s.engine
        .enqueue_batch((0..TASKS).map(|_| NewTask::new("short")).collect())
        .await
        .unwrap();
    let source = Arc::new(RecordingSource {
        engine: Arc::clone(&s.engine),
        asked: Mutex::new(Vec::new()),
    });
    let worker = Worker::new(Arc::clone(&source))
        .concurrency(SLOTS)
        .handle("short", |_ctx: TaskContext| async { Ok(()) });
    s.run_until_completed(worker, TASKS).await;
    let asked = source.asked.lock().unwrap().clone();
    let partial = asked.iter().filter(|&&n| n < SLOTS / 2).count();
    assert!(
        partial * 10 <= asked.len(),
        "{partial} of {} fetches asked for fewer than half the slots: {asked:?}",
        asked.len()
    );
}

/// The engine as a task source whose first few heartbeats and sends of
/// acknowledgements never get an answer, as requests sent on a connection
/// whose far end died unannounced.
struct StallingSource {
    engine: Arc<Engine>,
    heartbeats_to_stall: AtomicUsize,
    acks_to_stall: AtomicUsize,
}

impl StallingSource {
    fn new(engine: &Arc<Engine>, heartbeats: usize, acks: usize) -> Arc<Self> {
        Arc::new(Self {
            engine: Arc::clone(engine),
            heartbeats_to_stall: AtomicUsize::new(heartbeats),
            acks_to_stall: AtomicUsize::new(acks),
        })
    }
}

/// Takes one from `count` if any is left.
fn take_one(count: &AtomicUsize) -> bool {
    count
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait::async_trait]
impl TaskSource for StallingSource {
    async fn fetch(
        &self,
        request: &ClaimRequest,
        wait: Duration,
        stop: &CancellationToken,
    ) -> offload_core::Result<Vec<Task>> {
        TaskSource::fetch(&*self.engine, request, wait, stop).await
    }

    async fn heartbeat(&self, request: HeartbeatRequest) -> offload_core::Result<HeartbeatAck> {
        if take_one(&self.heartbeats_to_stall) {
            std::future::pending::<()>().await;
        }
        TaskSource::heartbeat(&*self.engine, request).await
    }

    async fn ack(
        &self,
        worker_id: &str,
        acks: Vec<Ack>,
    ) -> offload_core::Result<Vec<offload_core::Result<()>>> {
        if take_one(&self.acks_to_stall) {
            std::future::pending::<()>().await;
        }
        TaskSource::ack(&*self.engine, worker_id, acks).await
    }
}

/// A heartbeat that never gets an answer holds up the later ones only for
/// a third of the lease: they renew it in time, and the handler runs to its
/// end. It held them up for good, and the handler was stopped when the
/// lease it last renewed ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_that_hangs_holds_up_the_next_ones_only_briefly() {
    let s = setup();
    // Heartbeats every 2 s; the first hangs, the second renews the lease
    // 2 s before it ends.
    let worker = Worker::from_source(StallingSource::new(&s.engine, 1, 0))
        .lease(Duration::from_secs(6))
        .handle("long", |ctx: TaskContext| async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(8)) => Ok("done"),
                () = ctx.cancellation().cancelled() => Err(TaskFailure::new(format!(
                    "stopped: {:?}",
                    ctx.cancel_reason()
                ))),
            }
        });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("long")).await;
    let done = s
        .wait_for(task.id, "finished", |t| t.state.is_finished())
        .await;
    assert_eq!(
        (done.state, done.attempt, done.errors.len()),
        (State::Completed, 1, 0),
        "{:?}",
        done.errors
    );
    stop.cancel();
    handle.await.unwrap();
}

/// A send of acknowledgements that never gets an answer is given up after
/// a third of the lease and sent again. It waited for good, and the task
/// ran again once its lease ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_that_hangs_is_sent_again() {
    let s = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let worker = Worker::from_source(StallingSource::new(&s.engine, 0, 1))
        .lease(Duration::from_secs(3))
        .handle("once", move |_ctx: TaskContext| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, TaskFailure>("done") }
        });
    let (stop, handle) = s.spawn(worker);
    let task = s.enqueue(NewTask::new("once")).await;
    let done = s
        .wait_for(task.id, "completed", |t| t.state == State::Completed)
        .await;
    assert_eq!((done.attempt, runs.load(Ordering::SeqCst)), (1, 1));
    stop.cancel();
    handle.await.unwrap();
}
