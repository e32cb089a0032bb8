//! The machinery behind [`crate::Worker::run`]: the fetch loop, one runner
//! per task, the heartbeater, the lease watcher, the cancellation listener
//! and the acker.
//!
//! Concurrency is a semaphore: the fetch loop asks for as many tasks as
//! there are free permits, and each task keeps its permit until its handler
//! is done. Acknowledgements go through one channel to the acker, which
//! sends whatever has accumulated in one call, so a busy worker acks in
//! batches without waiting to fill them.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures::FutureExt;
use offload_core::{
    Ack, ClaimRequest, Error, Failure, FailureKind, HeartbeatAck, HeartbeatRequest, LogThrottle,
    Result, Task,
};
use rustc_hash::FxHashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::context::{CancelReason, Cancellation, TaskContext};
use crate::{Handler, TaskSource, WorkerConfig};

/// Tasks asked for in one fetch, at most.
const MAX_FETCH: usize = 1000;
/// Turns of the scheduler a fetch waits, at most, for runners still
/// handing back their permits (`gather_released_permits`).
const GATHER_TURNS: usize = 16;
/// Pause after a failed fetch.
const FETCH_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Tries to deliver one batch of acks the source refused for a reason of
/// its own, before leaving it to lease expiry.
const ACK_TRIES: u32 = 6;
/// Longest pause between two offers of a batch of acks.
const ACK_PAUSE_MAX: Duration = Duration::from_secs(2);
/// Longest a worker without a cancellation feed (a remote one) goes without
/// a heartbeat, since heartbeats are how it learns of a cancel.
const CANCEL_CHECK: Duration = Duration::from_secs(2);

pub(crate) struct Shared {
    pub source: Arc<dyn TaskSource>,
    pub config: WorkerConfig,
    /// Keyed by ids the server chose, so a fast hash: SipHash's defence
    /// against chosen keys was 2% of a busy worker's instructions.
    in_flight: Mutex<FxHashMap<Uuid, Running>>,
    acks: mpsc::UnboundedSender<Ack>,
    /// Fired when the shutdown grace runs out: every runner stops its
    /// handler. Kept here, not cloned into each runner, whose clone and
    /// drop would lock the token's node, shared by all of them.
    hard_stop: CancellationToken,
}

/// A task whose handler runs, as the worker's helpers see it.
struct Running {
    cancellation: Cancellation,
    /// The server holds this worker's lease at least this long: a lease
    /// counted from when the fetch answered or when a heartbeat the server
    /// took was sent, both no earlier than the server's own count began.
    leased_until: Instant,
}

impl Shared {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, FxHashMap<Uuid, Running>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cancel(&self, id: Uuid, reason: CancelReason) {
        if let Some(running) = self.in_flight().get(&id) {
            running.cancellation.cancel(reason);
        }
    }

    /// The server took a heartbeat of `id` sent at `sent`.
    pub(crate) fn renew(&self, id: Uuid, sent: Instant) {
        if let Some(running) = self.in_flight().get_mut(&id) {
            running.leased_until = running.leased_until.max(sent + self.config.lease);
        }
    }

    /// How long a heartbeat or a send of acknowledgements may go
    /// unanswered before it is given up as unavailable. One that hung (sent
    /// on a connection that died unannounced) held up every heartbeat
    /// round after it, or every acknowledgement, and the leases ran out,
    /// renewed by nothing, while the server answered other requests; a
    /// third of a lease leaves time to send again before the lease ends.
    fn patience(&self) -> Duration {
        self.config.lease / 3
    }

    pub(crate) async fn heartbeat(&self, request: HeartbeatRequest) -> Result<HeartbeatAck> {
        let patience = self.patience();
        tokio::time::timeout(patience, self.source.heartbeat(request))
            .await
            .unwrap_or_else(|_| Err(unanswered("a heartbeat", patience)))
    }

    async fn ack(&self, batch: Vec<Ack>) -> Result<Vec<Result<()>>> {
        let patience = self.patience();
        tokio::time::timeout(patience, self.source.ack(&self.config.worker_id, batch))
            .await
            .unwrap_or_else(|_| Err(unanswered("acknowledgements", patience)))
    }
}

fn unanswered(what: &str, patience: Duration) -> Error {
    Error::Unavailable(format!("no answer to {what} within {patience:?}"))
}

pub(crate) async fn run(
    source: Arc<dyn TaskSource>,
    handlers: FxHashMap<String, Arc<dyn Handler>>,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let (acks, ack_queue) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        source,
        config,
        in_flight: Mutex::new(FxHashMap::default()),
        acks,
        hard_stop: CancellationToken::new(),
    });
    let helpers_stop = CancellationToken::new();
    let acker = tokio::spawn(acker(Arc::clone(&shared), ack_queue, helpers_stop.clone()));
    let heartbeats = tokio::spawn(heartbeater(Arc::clone(&shared), helpers_stop.clone()));
    let lease_watch = tokio::spawn(lease_watch(Arc::clone(&shared), helpers_stop.clone()));
    let listener = tokio::spawn(cancellation_listener(
        Arc::clone(&shared),
        helpers_stop.clone(),
    ));

    let permits = Arc::new(Semaphore::new(shared.config.concurrency));
    let mut types: Vec<String> = handlers.keys().cloned().collect();
    types.sort();
    // A fetch refused as bad input (a type or queue name the server does
    // not take, a URL that names no server) is refused the same way every
    // time: the worker stops and says why rather than asking forever.
    let mut refused = None;

    loop {
        let first = tokio::select! {
            // Once stopping, no new fetch, even with permits free.
            biased;
            _ = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let mut free = vec![first];
        gather_released_permits(&permits).await;
        while free.len() < MAX_FETCH {
            match Arc::clone(&permits).try_acquire_owned() {
                Ok(p) => free.push(p),
                Err(_) => break,
            }
        }
        let request = ClaimRequest {
            worker_id: shared.config.worker_id.clone(),
            types: types.clone(),
            queues: shared.config.queues.clone(),
            limit: free.len(),
            lease: shared.config.lease,
        };
        let tasks = match shared
            .source
            .fetch(&request, shared.config.poll_wait, &shutdown)
            .await
        {
            Ok(tasks) => tasks,
            Err(e @ Error::InvalidArgument { .. }) => {
                tracing::error!(error = %e, "the fetch was refused; stopping");
                refused = Some(e);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "fetching tasks failed");
                tokio::select! {
                    _ = tokio::time::sleep(FETCH_ERROR_PAUSE) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
        };
        // The server claimed them as it answered.
        let leased_until = Instant::now() + shared.config.lease;
        // Permits left over return to the semaphore when `free` drops.
        for (task, permit) in tasks.into_iter().zip(free) {
            match handlers.get(&task.task_type) {
                Some(handler) => {
                    // Not joined: a runner holds its permit to its end, so
                    // taking every permit back is waiting for them all. A
                    // set of join handles cost ~1,400 instructions a task.
                    // Boxed: tokio copies a task's whole future as it
                    // spawns, runs and finishes it, and this one, which
                    // holds the task, is large.
                    tokio::spawn(Box::pin(run_task(
                        Arc::clone(&shared),
                        Arc::clone(handler),
                        task,
                        leased_until,
                        permit,
                    )));
                }
                None => {
                    let message =
                        format!("this worker has no handler for type {:?}", task.task_type);
                    let _ = shared.acks.send(fail(
                        task.id,
                        message,
                        FailureKind::Error,
                        None,
                        Some(Duration::ZERO),
                    ));
                }
            }
        }
    }

    // Graceful shutdown: let in-flight tasks finish, then stop the rest.
    // Every permit back means every runner has ended.
    let all = u32::try_from(shared.config.concurrency).unwrap_or(u32::MAX);
    let drained =
        tokio::time::timeout(shared.config.shutdown_grace, permits.acquire_many(all)).await;
    if drained.is_err() {
        tracing::info!(
            tasks = shared.config.concurrency - permits.available_permits(),
            "shutdown grace ran out; handing tasks back for retry"
        );
        shared.hard_stop.cancel();
        let _ = permits.acquire_many(all).await;
    }
    // Every runner has queued its ack; the acker sends them all, then stops.
    helpers_stop.cancel();
    let _ = heartbeats.await;
    let _ = lease_watch.await;
    let _ = listener.await;
    let _ = acker.await;
    refused.map_or(Ok(()), Err)
}

/// Waits while runners are still handing their permits back, so that a
/// fetch asks for every slot freed in one burst instead of going out with
/// the first and leaving the rest to a second round trip. Short tasks
/// finish in bursts (a fetched batch ends together); without this a worker
/// of 500 slots fetched 285 tasks a time on average, many fetches asking
/// for one. Each check is one turn of the scheduler, so a worker whose
/// tasks end one by one pays a single yield.
async fn gather_released_permits(permits: &Semaphore) {
    for _ in 0..GATHER_TURNS {
        let before = permits.available_permits();
        tokio::task::yield_now().await;
        if permits.available_permits() == before {
            break;
        }
    }
}

fn fail(
    id: Uuid,
    message: String,
    kind: FailureKind,
    retry: Option<bool>,
    retry_in: Option<Duration>,
) -> Ack {
    Ack::Fail {
        id,
        failure: Failure {
            message,
            kind,
            retry,
            retry_in,
        },
    }
}

async fn run_task(
    shared: Arc<Shared>,
    handler: Arc<dyn Handler>,
    task: Task,
    leased_until: Instant,
    _permit: OwnedSemaphorePermit,
) {
    let id = task.id;
    let timeout = Duration::from_secs(task.timeout_secs.into());
    let deadline = Instant::now() + timeout;
    let cancellation = Cancellation::default();
    shared.in_flight().insert(
        id,
        Running {
            cancellation: cancellation.clone(),
            leased_until,
        },
    );
    if task.cancel_requested {
        cancellation.cancel(CancelReason::Cancelled);
    }
    let ctx = TaskContext::new(task, cancellation.clone(), Arc::clone(&shared));
    // Polled inside this runner's task, a panic caught so that it fails
    // this task only. A handler that finishes at its first poll (most short
    // tasks) costs no timer and no select: a task and a timer of their own
    // for every handler were ~1/4 of a busy worker's work (callgrind).
    // In a block of its own, so that a handler stopped without an answer is
    // dropped (and what it held let go) before its task is reported.
    let outcome = {
        let mut handling = std::pin::pin!(AssertUnwindSafe(handler.call(ctx)).catch_unwind());
        let first = std::future::poll_fn(|cx| Poll::Ready(handling.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(outcome) => outcome.map_err(Interrupted::Panicked),
            Poll::Pending => {
                let finished = tokio::select! {
                    outcome = &mut handling => Some(outcome.map_err(Interrupted::Panicked)),
                    _ = tokio::time::sleep_until(deadline) => {
                        cancellation.cancel(CancelReason::Timeout);
                        None
                    }
                    _ = cancellation.token().cancelled() => None,
                    _ = shared.hard_stop.cancelled() => {
                        cancellation.cancel(CancelReason::Shutdown);
                        None
                    }
                };
                match finished {
                    Some(outcome) => outcome,
                    None => {
                        // The token fired: give the handler time to wind down,
                        // except when the worker is past its shutdown grace.
                        // Dropping the handler's future is what stops it.
                        let grace = if shared.hard_stop.is_cancelled() {
                            Duration::ZERO
                        } else {
                            shared.config.cancel_grace
                        };
                        tokio::select! {
                            outcome = &mut handling => outcome.map_err(Interrupted::Panicked),
                            _ = tokio::time::sleep(grace) => Err(Interrupted::Aborted),
                            _ = shared.hard_stop.cancelled() => {
                                cancellation.cancel(CancelReason::Shutdown);
                                Err(Interrupted::Aborted)
                            }
                        }
                    }
                }
            }
        }
    };
    shared.in_flight().remove(&id);
    if let Some(ack) = acknowledgement(id, outcome, cancellation.reason(), timeout) {
        let _ = shared.acks.send(ack);
    }
}

/// Why a handler gave no answer of its own.
enum Interrupted {
    /// It panicked, with this payload.
    Panicked(Box<dyn std::any::Any + Send>),
    /// It was stopped (its future dropped) after its cancel grace.
    Aborted,
}

/// What to report for a finished handler.
fn acknowledgement(
    id: Uuid,
    outcome: Result<Result<Option<offload_core::Json>, crate::TaskFailure>, Interrupted>,
    reason: Option<CancelReason>,
    timeout: Duration,
) -> Option<Ack> {
    // Spelled out only for the failures that report them: most tasks
    // complete.
    let shutdown_message = || "the worker shut down before the task finished".to_owned();
    let timeout_message = || {
        format!(
            "the attempt ran longer than its timeout of {}s",
            timeout.as_secs()
        )
    };
    Some(match (outcome, reason) {
        // Someone else may hold the task now; the newer attempt wins.
        (_, Some(CancelReason::LeaseLost)) => return None,
        // Work that finished counts, even if a stop was asked meanwhile.
        (Ok(Ok(result)), _) => Ack::Complete { id, result },
        (Ok(Err(failure)), Some(CancelReason::Timeout)) => fail(
            id,
            format!("{}: {}", timeout_message(), failure.message),
            FailureKind::Timeout,
            None,
            None,
        ),
        (Ok(Err(_)) | Err(_), Some(CancelReason::Shutdown)) => fail(
            id,
            shutdown_message(),
            FailureKind::Error,
            None,
            Some(Duration::ZERO),
        ),
        (Ok(Err(failure)), _) => fail(
            id,
            failure.message,
            FailureKind::Error,
            failure.retry,
            failure.retry_in,
        ),
        (Err(Interrupted::Panicked(payload)), _) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text panic".into());
            fail(
                id,
                format!("the handler panicked: {text}"),
                FailureKind::Error,
                None,
                None,
            )
        }
        (Err(_), Some(CancelReason::Timeout)) => fail(
            id,
            format!(
                "{}; the handler did not stop and was aborted",
                timeout_message()
            ),
            FailureKind::Timeout,
            None,
            None,
        ),
        (Err(_), _) => fail(
            id,
            "cancelled; the handler did not stop in time and was aborted".into(),
            FailureKind::Error,
            None,
            None,
        ),
    })
}

/// Sends queued acks in batches until `stop`, then sends what is left.
async fn acker(
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<Ack>,
    stop: CancellationToken,
) {
    // The ack that would have taken the last batch past its bytes.
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(ack) => ack,
            None => tokio::select! {
                ack = queue.recv() => match ack {
                    Some(ack) => ack,
                    None => return,
                },
                _ = stop.cancelled() => match queue.try_recv() {
                    Ok(ack) => ack,
                    Err(_) => return,
                },
            },
        };
        let mut bytes = ack_bytes(&first);
        let mut batch = Vec::with_capacity((queue.len() + 1).min(shared.config.max_ack_batch));
        batch.push(first);
        while batch.len() < shared.config.max_ack_batch {
            match queue.try_recv() {
                Ok(ack) => {
                    let size = ack_bytes(&ack);
                    if bytes + size > shared.config.max_ack_batch_bytes {
                        carried = Some(ack);
                        break;
                    }
                    bytes += size;
                    batch.push(ack);
                }
                Err(_) => break,
            }
        }
        send_acks(&shared, batch).await;
    }
}

/// Roughly what an ack adds to the body it travels in: its result or
/// message, and its id and the names around them.
#[inline]
fn ack_bytes(ack: &Ack) -> usize {
    const FRAME: usize = 128;
    FRAME
        + match ack {
            Ack::Complete { result, .. } => result.as_ref().map_or(0, |json| json.get().len()),
            Ack::Fail { failure, .. } => failure.message.len(),
        }
}

/// Sends a batch, then the failures for the results the store refused.
///
/// A call refused whole as bad input (over the server's body limit, or one
/// ack in it the server takes from no one) is refused the same however
/// often it is sent: it is split in halves, each sent on its own, so that
/// the acks that can go through do, and one refused alone is answered as
/// an ack refused in a batch's answer. Sent again as it was, six times,
/// every completion in it was given up, and its task ran again once its
/// lease ran out, to be refused again.
async fn send_acks(shared: &Shared, batch: Vec<Ack>) {
    let mut to_send = vec![batch];
    while let Some(batch) = to_send.pop() {
        match send_ack_batch(shared, batch).await {
            Sent::Answered(failures) => {
                if !failures.is_empty() {
                    to_send.push(failures);
                }
            }
            Sent::Refused(mut batch, _) if batch.len() > 1 => {
                let second_half = batch.split_off(batch.len() / 2);
                to_send.push(second_half);
                to_send.push(batch);
            }
            Sent::Refused(batch, refusal) => {
                for ack in batch {
                    if let Ack::Complete { .. } = ack {
                        to_send.extend(refused_result(&ack, refusal.clone()).map(|f| vec![f]));
                    } else {
                        tracing::error!(task = %ack.id(), error = %refusal, "the server refused the failure report; the task's lease will expire and it will run again");
                    }
                }
            }
            Sent::GivenUp => {}
        }
    }
}

/// What became of one call of acks.
enum Sent {
    /// The source answered each ack; these are the failures to send for
    /// completions whose result it refused.
    Answered(Vec<Ack>),
    /// The source refused the whole call as bad input.
    Refused(Vec<Ack>, Error),
    /// No answer came in the time the answers still count.
    GivenUp,
}

/// Sends one batch.
///
/// While the source is unavailable (a server restarting, PostgreSQL
/// failing over) the batch is offered again for as long as a lease lasts:
/// until then the answers still count, and given up sooner, work that was
/// done would run again once the leases expired. Six tries over three
/// seconds, as it was, lost the answers of every task that ended during a
/// restart of a few seconds.
async fn send_ack_batch(shared: &Shared, batch: Vec<Ack>) -> Sent {
    let offered = Instant::now();
    let mut pause = Duration::from_millis(100);
    for attempt in 1.. {
        let error = match shared.ack(batch.clone()).await {
            Ok(outcomes) => {
                return Sent::Answered(
                    batch
                        .iter()
                        .zip(outcomes)
                        .filter_map(|(ack, outcome)| refused_result(ack, outcome.err()?))
                        .collect(),
                );
            }
            Err(e @ (Error::InvalidArgument { .. } | Error::PayloadTooLarge { .. })) => {
                tracing::warn!(error = %e, tasks = batch.len(), "the acknowledgements were refused as a whole");
                return Sent::Refused(batch, e);
            }
            Err(e) => e,
        };
        let again = match error {
            Error::Unavailable(_) => offered.elapsed() + pause < shared.config.lease,
            _ => attempt < ACK_TRIES,
        };
        if !again {
            tracing::error!(error = %error, tasks = batch.len(), "giving up on acknowledgements; their leases will expire and the tasks run again");
            break;
        }
        tracing::warn!(error = %error, attempt, "sending acknowledgements failed; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(ACK_PAUSE_MAX);
    }
    Sent::GivenUp
}

/// A completion refused for its result (over the size or nesting limit)
/// becomes a failure that says why, not a lease left to expire and a
/// handler run again for the same refusal. Not retried: the work itself
/// was done, and running it again would do it twice.
fn refused_result(ack: &Ack, refusal: Error) -> Option<Ack> {
    match (ack, &refusal) {
        (
            Ack::Complete { id, .. },
            Error::InvalidArgument { .. } | Error::PayloadTooLarge { .. },
        ) => {
            tracing::warn!(task = %id, error = %refusal, "the server refused the handler's result; failing the task");
            Some(fail(
                *id,
                format!("the handler's result was refused: {refusal}"),
                FailureKind::Error,
                Some(false),
                None,
            ))
        }
        _ => {
            // Typically a lease that expired: the newer attempt wins.
            tracing::debug!(task = %ack.id(), error = %refusal, "acknowledgement refused");
            None
        }
    }
}

/// Renews the lease of every running task, and learns of cancellations.
async fn heartbeater(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = if shared.source.cancellations().is_some() {
        shared.config.heartbeat_interval
    } else {
        shared.config.heartbeat_interval.min(CANCEL_CHECK)
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        let running: Vec<Uuid> = shared.in_flight().keys().copied().collect();
        // A round waits for its slowest heartbeat, which `Shared::heartbeat`
        // bounds.
        let beats = running.into_iter().map(|id| {
            let shared = Arc::clone(&shared);
            async move {
                let request = HeartbeatRequest {
                    id,
                    worker_id: shared.config.worker_id.clone(),
                    progress: None,
                    lease: shared.config.lease,
                };
                let sent = Instant::now();
                match shared.heartbeat(request).await {
                    Ok(ack) => {
                        shared.renew(id, sent);
                        if ack.cancel_requested {
                            shared.cancel(id, CancelReason::Cancelled);
                        }
                    }
                    Err(Error::Conflict(_) | Error::NotFound(_)) => {
                        shared.cancel(id, CancelReason::LeaseLost);
                    }
                    Err(e) => {
                        // A server out of reach fails every task's alike.
                        static FAILED: LogThrottle = LogThrottle::new();
                        if let Some(not_logged) = FAILED.admit() {
                            tracing::warn!(task = %id, error = %e, not_logged, "heartbeat failed");
                        }
                    }
                }
            }
        });
        futures::future::join_all(beats).await;
    }
}

/// Stops the handler of a task whose lease may have run out on the server:
/// no heartbeat reached it for a whole lease (it is down, or unreachable
/// from here). The server may then give the task to another worker, and
/// two runs of one task must not overlap; the task is left to its lease's
/// expiry, as one whose lease was refused.
async fn lease_watch(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let now = Instant::now();
        // A task fetched from now on is leased at least a lease from now,
        // and a renewal only moves a task's end later: the earliest end
        // known now is the next moment to look.
        let mut next = now + shared.config.lease;
        for (id, running) in shared.in_flight().iter() {
            if running.leased_until > now {
                next = next.min(running.leased_until);
            } else if !running.cancellation.is_cancelled() {
                tracing::warn!(
                    task = %id,
                    lease = ?shared.config.lease,
                    "no heartbeat reached the server for a whole lease: stopping the task, which the server may give to another worker"
                );
                running.cancellation.cancel(CancelReason::LeaseLost);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Fires the token of a running task the moment its cancellation is
/// requested, where the source can say so.
async fn cancellation_listener(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(mut cancels) = shared.source.cancellations() else {
        return;
    };
    loop {
        tokio::select! {
            id = cancels.recv() => match id {
                Ok(id) => shared.cancel(id, CancelReason::Cancelled),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = stop.cancelled() => return,
        }
    }
}
