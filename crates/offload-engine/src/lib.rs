//! Offload's engine: what turns a [`Store`] into a running system.
//!
//! It runs the background duties (promoting due tasks the moment they are
//! due, recovering expired leases and timed-out attempts, deleting finished
//! tasks past retention) while its store says this node leads, and offers long-poll claiming: [`Engine::fetch`]
//! waits for the store's ready signal instead of polling, so a task enqueued
//! while workers idle starts at once. The server and the in-process worker
//! both go through it; it knows no HTTP and no database.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use offload_core::{
    Claim, ClaimRequest, Limits, NewTask, Position, Result, Retention, Store, Task, TaskSpec,
    Tentative,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod relay;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub limits: Limits,
    pub retention: Retention,
    /// How often expired leases and timeouts are looked for; SPEC §1.3 asks
    /// for action within a second.
    pub recovery_interval: Duration,
    /// How often finished tasks past retention are deleted.
    pub purge_interval: Duration,
    /// Rows deleted per retention transaction.
    pub purge_batch: usize,
    /// Longest a waiting fetch goes without looking at the store, in case a
    /// wake-up was lost (a backend whose notifications can drop).
    pub fetch_fallback_poll: Duration,
    /// Told of the attempts the duties end; `None` tells no one.
    pub observer: Option<Arc<dyn DutyObserver>>,
}

/// What the engine's duties did to tasks, for whatever counts it (the
/// server's metrics): attempts no worker reported the end of.
pub trait DutyObserver: Send + Sync + std::fmt::Debug {
    /// Attempts ended because their lease or timeout ran out, each task as
    /// the recovery left it (`scheduled`, `failed` or `cancelled`).
    fn attempts_expired(&self, tasks: &[Task]);
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            retention: Retention::default(),
            recovery_interval: Duration::from_millis(250),
            purge_interval: Duration::from_secs(1),
            purge_batch: 1000,
            fetch_fallback_poll: Duration::from_secs(1),
            observer: None,
        }
    }
}

/// Longest the promoter sleeps when nothing is scheduled.
const PROMOTER_IDLE: Duration = Duration::from_secs(1);
/// How often a node that does not lead checks whether it has become leader.
const FOLLOWER_PAUSE: Duration = Duration::from_millis(250);
/// Pause after a failed duty before trying again.
const DUTY_ERROR_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Engine {
    store: Arc<dyn Store>,
    config: EngineConfig,
    stop: CancellationToken,
    duties: Mutex<Vec<JoinHandle<()>>>,
    /// Fetches waiting on a store that does not park claims.
    relay: Arc<relay::Relay>,
}

/// Tasks handed to the store per chunk of a streamed batch: one of the
/// SQLite store's multi-row inserts.
const STREAM_CHUNK: usize = 64;

/// Where [`Engine::enqueue_batch_streamed`]'s reader puts the tasks it
/// reads: each is checked, then sent to the store with its chunk.
#[derive(Debug)]
pub struct BatchSink<'a> {
    limits: &'a Limits,
    /// `None` once the batch is abandoned.
    sender: Option<offload_core::BatchSender>,
    chunk: Vec<TaskSpec>,
    count: usize,
}

impl BatchSink<'_> {
    /// Takes the next task; `false` when the batch is abandoned (this task
    /// is invalid, or one too many): the reader should stop.
    pub fn push(&mut self, task: NewTask) -> bool {
        let Some(sender) = &self.sender else {
            return false;
        };
        let checked = if self.count < self.limits.max_batch {
            task.validate(self.limits, Position::InBatch(self.count))
                .ok()
        } else {
            None
        };
        let Some(spec) = checked else {
            self.sender = None;
            return false;
        };
        self.count += 1;
        self.chunk.push(spec);
        if self.chunk.len() == STREAM_CHUNK {
            sender.send(std::mem::replace(
                &mut self.chunk,
                Vec::with_capacity(STREAM_CHUNK),
            ));
        }
        true
    }

    /// Ends a batch of at least one task; `false` if it was abandoned.
    fn finish(&mut self) -> bool {
        match self.sender.take() {
            Some(sender) if self.count > 0 => {
                if !self.chunk.is_empty() {
                    sender.send(std::mem::take(&mut self.chunk));
                }
                sender.finish();
                true
            }
            _ => false,
        }
    }
}

impl Engine {
    /// Starts the background duties on the current Tokio runtime.
    pub fn start(store: Arc<dyn Store>, config: EngineConfig) -> Arc<Self> {
        let engine = Arc::new(Self {
            store,
            config,
            stop: CancellationToken::new(),
            duties: Mutex::new(Vec::new()),
            relay: Arc::default(),
        });
        let duties = vec![
            tokio::spawn(promoter(Arc::clone(&engine))),
            tokio::spawn(recoverer(Arc::clone(&engine))),
            tokio::spawn(purger(Arc::clone(&engine))),
        ];
        *engine.duties.lock().unwrap_or_else(|p| p.into_inner()) = duties;
        engine
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Validates and enqueues one task; `true` when it was created, `false`
    /// when an active task holding its unique key was returned instead.
    pub async fn enqueue(&self, task: NewTask) -> Result<(Task, bool)> {
        let spec = task.validate(&self.config.limits, Position::Alone)?;
        let mut answers = self.store.enqueue(vec![spec]).await?;
        answers
            .pop()
            .ok_or_else(|| offload_core::Error::Storage("enqueue answered nothing".into()))
    }

    /// Validates and enqueues many tasks, all or nothing.
    pub async fn enqueue_batch(&self, tasks: Vec<NewTask>) -> Result<Vec<(Task, bool)>> {
        self.config.limits.check_batch("tasks", tasks.len())?;
        let specs = tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.validate(&self.config.limits, Position::InBatch(i)))
            .collect::<Result<Vec<_>>>()?;
        self.store.enqueue(specs).await
    }

    /// [`Engine::enqueue_batch`] for a batch read while it is stored:
    /// `read` pushes each task into the sink as it reads it and says whether
    /// it read the batch to its end. The store writes the first tasks while
    /// the rest are read (`offload_core::batch_stream`).
    ///
    /// `None` when the batch was abandoned (`read` failed, a task was
    /// invalid, there were none or too many): nothing was stored, and the
    /// caller finds the reason by enqueueing the same batch the plain way,
    /// which fails the same way [`Engine::enqueue_batch`] always has.
    ///
    /// The tasks may come before their commit is durable: the caller
    /// prepares its answer, then awaits [`Tentative::durable`] before giving
    /// it.
    pub async fn enqueue_batch_streamed(
        &self,
        read: impl FnOnce(&mut BatchSink<'_>) -> bool,
    ) -> Option<Result<Tentative<Vec<(Task, bool)>>>> {
        let (sender, receiver) = offload_core::batch_stream();
        let stored = self.store.enqueue_streamed(receiver);
        let mut sink = BatchSink {
            limits: &self.config.limits,
            sender: Some(sender),
            chunk: Vec::with_capacity(STREAM_CHUNK),
            count: 0,
        };
        let read_whole = read(&mut sink);
        let finished = read_whole && sink.finish();
        // Unless finished, the sender goes here: the store, waiting for the
        // next chunk, learns at once that there is none.
        drop(sink);
        // Awaited even when abandoned, so that the store has let the batch
        // go before the caller enqueues it again.
        let outcome = stored.await;
        finished.then_some(outcome)
    }

    /// Claims ready tasks, waiting up to `wait` for some to become ready.
    ///
    /// When nothing is ready the claim is parked with the store, which then
    /// claims for it inside the commit that makes tasks ready (one durable
    /// commit from enqueue to pickup, not two).
    ///
    /// `stop` ends the wait early; it never interrupts a claim under way, so
    /// no claimed task is dropped: tasks claimed just as it stopped are
    /// returned.
    pub async fn fetch(
        &self,
        request: &ClaimRequest,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Task>> {
        if wait.is_zero() {
            // Nothing to wait for: a claim parked only to be withdrawn cost
            // an empty answer a timer's tick, which rounds up to the next
            // millisecond (1.26 ms where it takes 0.3).
            return self.store.claim(request).await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut ready = self.store.hub().watch_ready();
        let ready_log = self.store.hub().ready_log();
        // Where the store does not park the claim, this fetch's place among
        // the others waiting (`relay`), taken once it first finds nothing,
        // or at once behind others of its group that wait for a turn: it
        // then waits for its own before it looks (`Relay::behind_waiters`).
        // Its look cost each task given to fetches one at a time a claim
        // that found nothing.
        let mut place = self.relay.behind_waiters(request);
        let mut wait_first = place.is_some();
        loop {
            if std::mem::take(&mut wait_first)
                && let Some(place) = &place
            {
                tokio::select! {
                    () = place.turn() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = stop.cancelled() => return Ok(Vec::new()),
                    _ = self.stop.cancelled() => return Ok(Vec::new()),
                }
            }
            // Marked seen before looking, so a task made ready while we look
            // still wakes us.
            let seen = *ready.borrow_and_update();
            let claim = self.store.claim_or_park(request).await;
            if let (Err(_), Some(place)) = (&claim, &place) {
                // This fetch's turn ends with its error; the next of its
                // group takes it, where it would wait for another signal.
                place.hand_on();
            }
            let ticket = match claim? {
                Claim::Now {
                    tasks: claimed,
                    more,
                } => {
                    if !claimed.is_empty() || tokio::time::Instant::now() >= deadline {
                        if let Some(place) = place.as_ref().filter(|_| more) {
                            place.pass_on();
                        }
                        return Ok(claimed);
                    }
                    None
                }
                Claim::Parked(ticket) => Some(ticket),
            };
            let fallback = tokio::time::Instant::now() + self.config.fetch_fallback_poll;
            let Some(mut ticket) = ticket else {
                let place = place.get_or_insert_with(|| {
                    let fallback = self.config.fetch_fallback_poll;
                    self.relay.join(
                        request,
                        (&ready, &ready_log),
                        fallback,
                        &self.stop,
                        |dispatcher| {
                            self.duties
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(dispatcher);
                        },
                    )
                });
                // A signal that came while this fetch looked may have been
                // passed on before it took its place: it looks again at
                // once if one is about what it asks for. The relay's turns
                // include the look in case a signal was lost.
                let (_, since) = ready_log.since(seen);
                wait_first = !place.concerned_by(&since);
                continue;
            };
            let answered = tokio::select! {
                // An answer, when there is one, wins over the other wake-ups
                // that may have come with it.
                biased;
                answer = ticket.answered() => Some(answer),
                // The ready signal covers a task made ready just before the
                // claim was parked, which the store could not claim for it.
                _ = ready.changed() => None,
                _ = tokio::time::sleep_until(deadline.min(fallback)) => None,
                _ = stop.cancelled() => None,
                _ = self.stop.cancelled() => None,
            };
            // Withdrawing a claim the store already took waits for its
            // answer, so tasks claimed for it are returned, never dropped.
            let claimed = match answered {
                Some(answer) => answer?,
                None => ticket.withdraw().await?,
            };
            let stopping = stop.is_cancelled() || self.stop.is_cancelled();
            if !claimed.is_empty() || stopping || tokio::time::Instant::now() >= deadline {
                return Ok(claimed);
            }
        }
    }

    /// Stops the background duties and any waiting fetch.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let duties = std::mem::take(&mut *self.duties.lock().unwrap_or_else(|p| p.into_inner()));
        for duty in duties {
            let _ = duty.await;
        }
    }
}

/// Promotes scheduled tasks as they fall due, sleeping exactly until the
/// next `run_at` (or until a new scheduled task may be earlier).
async fn promoter(engine: Arc<Engine>) {
    let mut scheduled = engine.store.hub().watch_scheduled();
    while !engine.stop.is_cancelled() {
        scheduled.borrow_and_update();
        if !engine.store.is_leader() {
            tokio::select! {
                _ = tokio::time::sleep(FOLLOWER_PAUSE) => {}
                _ = engine.stop.cancelled() => {}
            }
            continue;
        }
        let pause = match engine.store.promote_due().await {
            // More may be due than one pass takes.
            Ok(report) if report.promoted > 0 => Duration::ZERO,
            Ok(report) => report
                .next_due_in
                .map_or(PROMOTER_IDLE, |wait| wait.min(PROMOTER_IDLE)),
            Err(e) => {
                tracing::warn!(error = %e, "promoting due tasks failed");
                DUTY_ERROR_PAUSE
            }
        };
        if pause.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = scheduled.changed() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = engine.stop.cancelled() => {}
        }
    }
}

async fn recoverer(engine: Arc<Engine>) {
    every(
        &engine,
        engine.config.recovery_interval,
        "recovering expired tasks",
        |e| async move {
            let expired = e.store.recover_expired().await?;
            if !expired.is_empty() {
                tracing::info!(
                    tasks = expired.len(),
                    "failed attempts whose lease or timeout ran out"
                );
                if let Some(observer) = &e.config.observer {
                    observer.attempts_expired(&expired);
                }
            }
            Ok(expired.len() as u64)
        },
    )
    .await;
}

async fn purger(engine: Arc<Engine>) {
    every(
        &engine,
        engine.config.purge_interval,
        "deleting finished tasks",
        |e| async move {
            e.store
                .purge_finished(&e.config.retention, e.config.purge_batch)
                .await
        },
    )
    .await;
}

/// Runs `duty` every `interval` until the engine stops; a pass that did a
/// full batch of work runs again at once.
async fn every<F, Fut>(engine: &Arc<Engine>, interval: Duration, what: &str, duty: F)
where
    F: Fn(Arc<Engine>) -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    while !engine.stop.is_cancelled() {
        if !engine.store.is_leader() {
            tokio::select! {
                _ = tokio::time::sleep(FOLLOWER_PAUSE) => {}
                _ = engine.stop.cancelled() => {}
            }
            continue;
        }
        let pause = match duty(Arc::clone(engine)).await {
            Ok(n) if n >= engine.config.purge_batch as u64 => Duration::ZERO,
            Ok(_) => interval,
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed");
                DUTY_ERROR_PAUSE
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = engine.stop.cancelled() => {}
        }
    }
}
