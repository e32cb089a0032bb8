//! The single writer and its group commit.
//!
//! One thread owns the only write connection. Callers send it operations
//! (closures) over a channel; it takes every operation waiting, runs each in
//! its own savepoint inside one transaction, commits once (one fsync for the
//! whole group), and only then answers each caller. An operation that fails
//! rolls back its savepoint alone; a commit that fails answers every caller of
//! the group with the error. Effects (count changes, events, wake-ups) are
//! collected during the transaction and published only after the commit, so
//! nobody ever observes a change that might still roll back. The one caller
//! told earlier is one that asked for it ([`Writer::submit_tentative`]): it
//! gets its operation's outcome as soon as the operation has run, to prepare
//! an answer with, and a future that says when the commit is durable.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use offload_core::{
    Backoff, ClaimRequest, Clock, Counts, Durable, Error, EventKind, FinishedTally, Hub, Limits,
    LogThrottle, ParkedClaim, Result, State, TakenClaim, Task, TaskEvent, Tentative, Timestamp,
    Unheard, WriteFailure,
};
use rusqlite::{Connection, Statement};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::checkpoint::Checkpoints;
use crate::claims::{Claims, UnwrittenSeqs};
use crate::ids::SeqIds;
use crate::pair_names::PairNames;
use crate::pending_rows::PendingRows;
use crate::queue_rules::QueueRules;
use crate::ready::{PendingSeqs, ReadyIndex};
use crate::row_writes::{RowWrite, RowWrites};
use crate::rows::{StoredTask, storage_error};
use crate::running::RunningSet;
use crate::seq_map::SeqMap;
use crate::shaped::ShapedStatements;
use crate::sql;
use crate::wal_sync::{Syncer, WalSync, same_file};

/// Operations committed together at most; bounds the latency of a group.
const MAX_GROUP: usize = 512;
/// How often, at most, the writer looks whether the database file it writes
/// is still the one its path names: a `stat` a second, off the path of
/// every group but one.
const DATABASE_FILE_CHECK: Duration = Duration::from_secs(1);

/// Called with the commit's outcome once the group's transaction ended.
type Reply = Box<dyn FnOnce(Result<()>) + Send>;
type Job = Box<dyn FnOnce(&mut WriteCtx<'_, '_>) -> Reply + Send>;

/// Task counts by (queue, type), kept in memory and changed only after a
/// commit. Stats and the claim pre-check read them without touching SQLite.
pub(crate) type CountsMap = HashMap<(String, String), Counts>;

/// What the writer shares with the rest of the store.
#[derive(Debug)]
pub(crate) struct Shared {
    pub clock: Arc<dyn Clock>,
    pub hub: Hub,
    pub counts: Mutex<CountsMap>,
    pub backoff: Backoff,
    pub limits: Limits,
    /// Claims of waiting workers, run at the end of the next group that
    /// makes tasks ready, inside its transaction.
    pub parked: Mutex<Vec<ParkedClaim>>,
    /// The pending tasks' seqs, kept by the writer's [`ReadyIndex`].
    pub pending: Arc<PendingSeqs>,
    /// The running tasks, changed by the writer as it writes their rows.
    pub running: RunningSet,
    /// Claimed tasks whose rows still say pending (`claims.rs`).
    pub unwritten: Arc<UnwrittenSeqs>,
    /// Why the store stopped writing, for good until a restart: an fsync
    /// of the WAL failed (`wal_sync.rs`), or the database file was removed
    /// or replaced under it ([`Shared::check_database_file`]).
    pub writes_stopped: OnceLock<String>,
    /// Why the last commit failed (a full disk), until one goes through.
    pub write_failure: WriteFailure,
    /// The database file as this store opened it, and its path.
    pub database_file: std::fs::File,
    pub database_path: std::path::PathBuf,
    /// Syncs of the WAL made for durable mode's answers.
    pub wal_syncs: AtomicU64,
    /// Tasks this store's commits finished, for the metrics.
    pub finished: FinishedTally,
}

impl Shared {
    /// Leaves a claim for the writer to run when tasks become ready.
    pub fn park(&self, claim: ParkedClaim) {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        parked.retain(|p| !p.is_withdrawn());
        parked.push(claim);
    }

    fn take_parked(&self) -> Vec<ParkedClaim> {
        std::mem::take(&mut *self.parked.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Stops writes once the database's path no longer names the file this
    /// store opened (removed, or replaced by a copy): in WAL mode SQLite
    /// goes on committing to the unlinked file, and every write answered
    /// after that would be gone at the next start. A `stat` that fails for
    /// another reason stops nothing.
    pub fn check_database_file(&self) {
        if self.writes_stopped.get().is_some()
            || same_file(&self.database_file, &self.database_path) != Some(false)
        {
            return;
        }
        let reason = format!(
            "the database file {} was removed or replaced while this node ran; the store stops writing: restart the node",
            self.database_path.display()
        );
        tracing::error!(database = %self.database_path.display(), "the database file was removed or replaced; the store stops writing");
        self.stop_writes(reason);
    }

    /// Stops the store's writes for good, for `reason` unless they stopped
    /// already; returns the reason that stands, the first.
    pub fn stop_writes(&self, reason: String) -> String {
        self.writes_stopped.get_or_init(|| reason).clone()
    }

    pub fn counts(&self) -> std::sync::MutexGuard<'_, CountsMap> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Effects of a group's operations, published after its commit.
#[derive(Default)]
pub(crate) struct Effects {
    /// The (queue, type) pairs this group touched; `deltas` points into it,
    /// so a group of thousands of changes to one pair allocates its names
    /// once instead of per change.
    pairs: PairNames,
    deltas: Vec<Delta>,
    events: Vec<TaskEvent>,
    /// Held from a change whose event was not built, as nobody watched,
    /// until the group is published (see `Hub::unheard`).
    unheard: Option<Unheard>,
    cancels: Vec<Uuid>,
    ready: bool,
    /// A change that may make any claim succeed (a queue resumed or its
    /// concurrency raised), beyond what the count changes tell.
    woke_all: bool,
    scheduled: bool,
    /// Whether task_deps may hold rows, looked up once per group: most
    /// groups have no blocked tasks, and then a finished task has no
    /// dependents to look for. Only ever turns from false to true within a
    /// group, so a rolled-back savepoint cannot make it wrong, only careful.
    pub(crate) dependencies_stored: Option<bool>,
}

/// One task entering (+1) or leaving (-1) `state` in `pairs[pair]`.
#[derive(Clone, Copy)]
struct Delta {
    pair: usize,
    state: State,
    change: i64,
}

/// What a group's changes to one (queue, type) pair opened up for claims.
#[derive(Clone, Copy, Default)]
struct Opening {
    became_pending: bool,
    running_ended: bool,
}

#[derive(Clone, Copy)]
struct Mark {
    pairs: usize,
    deltas: usize,
    events: usize,
    cancels: usize,
    ready: bool,
    woke_all: bool,
    scheduled: bool,
}

impl Effects {
    /// For each (queue, type) pair this group touched: whether a task of it
    /// became pending, and whether a running one ended (freeing a slot of a
    /// limited queue). Summed up once per group, so checking each parked
    /// claim costs the pairs touched, not every change.
    fn openings(&self) -> Vec<Opening> {
        let mut openings = vec![Opening::default(); self.pairs.len()];
        for delta in &self.deltas {
            match (delta.state, delta.change) {
                (State::Pending, 1) => openings[delta.pair].became_pending = true,
                (State::Running, -1) => openings[delta.pair].running_ended = true,
                _ => {}
            }
        }
        openings
    }

    /// Whether this group's changes, summed up in `openings`, may let
    /// `request` claim something.
    fn may_satisfy(&self, openings: &[Opening], request: &ClaimRequest) -> bool {
        self.woke_all
            || self
                .pairs
                .iter()
                .zip(openings)
                .any(|((queue, task_type), opening)| {
                    let queue_served = request.queues.is_empty() || request.queues.contains(queue);
                    let type_served = request.types.is_empty() || request.types.contains(task_type);
                    queue_served
                        && (opening.running_ended || (opening.became_pending && type_served))
                })
    }

    fn mark(&self) -> Mark {
        Mark {
            pairs: self.pairs.len(),
            deltas: self.deltas.len(),
            events: self.events.len(),
            cancels: self.cancels.len(),
            ready: self.ready,
            woke_all: self.woke_all,
            scheduled: self.scheduled,
        }
    }

    fn reset(&mut self, mark: Mark) {
        self.pairs.truncate(mark.pairs);
        self.deltas.truncate(mark.deltas);
        self.events.truncate(mark.events);
        self.cancels.truncate(mark.cancels);
        self.ready = mark.ready;
        self.woke_all = mark.woke_all;
        self.scheduled = mark.scheduled;
    }

    /// Makes the committed group's counts and events visible. Returns
    /// whether tasks may have become claimable: the caller sends that
    /// signal once the parked claims are answered (see `run_writer`).
    #[must_use]
    fn publish(self, shared: &Shared) -> bool {
        if !self.deltas.is_empty() {
            let mut by_pair = vec![[0i64; State::ALL.len()]; self.pairs.len()];
            // Entries alone, apart from the net change: a group may both
            // finish a task of a pair and delete another finished one.
            let mut entered = vec![[0u64; State::ALL.len()]; self.pairs.len()];
            for delta in &self.deltas {
                by_pair[delta.pair][delta.state as usize] += delta.change;
                if delta.change > 0 {
                    entered[delta.pair][delta.state as usize] += 1;
                }
            }
            shared
                .finished
                .record(self.pairs.iter().zip(&entered).flat_map(
                    |((queue, task_type), entered)| {
                        State::ALL
                            .into_iter()
                            .filter(|state| state.is_finished() && entered[*state as usize] > 0)
                            .map(|state| {
                                (
                                    queue.as_str(),
                                    task_type.as_str(),
                                    state,
                                    entered[state as usize],
                                )
                            })
                    },
                ));
            let mut counts = shared.counts();
            for (pair, changes) in self.pairs.into_pairs().into_iter().zip(by_pair) {
                let apply = |entry: &mut Counts| {
                    for state in State::ALL {
                        let slot = entry.slot(state);
                        *slot = slot.saturating_add_signed(changes[state as usize]);
                    }
                };
                // Only the pairs this group touched: a pass over every pair
                // took each commit 19 ms with a million of them.
                match counts.entry(pair) {
                    Entry::Occupied(mut entry) => {
                        apply(entry.get_mut());
                        if entry.get().total() == 0 {
                            entry.remove();
                        }
                    }
                    Entry::Vacant(entry) => {
                        let mut fresh = Counts::default();
                        apply(&mut fresh);
                        if fresh.total() > 0 {
                            entry.insert(fresh);
                        }
                    }
                }
            }
        }
        for event in self.events {
            shared.hub.publish(event);
        }
        for id in self.cancels {
            shared.hub.notify_cancel(id);
        }
        if self.scheduled {
            shared.hub.notify_scheduled();
        }
        self.ready
    }
}

/// What a committed group may tell once its commit is durable: its
/// effects, its parked claims' answers and its callers' replies.
pub(crate) struct Settled {
    effects: Effects,
    parked_claims: Vec<(TakenClaim, Result<Vec<Task>>)>,
    replies: Vec<Reply>,
}

impl Settled {
    /// Tells everyone the group's `outcome`: its commit's, and in durable
    /// mode its fsync's.
    pub(crate) fn announce(self, shared: &Shared, outcome: Result<()>) {
        let made_ready = outcome.is_ok() && self.effects.publish(shared);
        // Waiting workers first: their answer is the pickup latency.
        for (claim, claimed) in self.parked_claims {
            claim.answer(outcome.clone().and(claimed));
        }
        // After those answers: a parked waiter also watches this signal, and
        // woken by it before its answer it would run once for nothing. Before
        // the replies: whoever hears that a write made tasks ready finds the
        // signal already given.
        if made_ready {
            shared.hub.notify_ready();
        }
        for reply in self.replies {
            reply(outcome.clone());
        }
    }
}

/// Running tasks at most kept in [`ClaimedRows`].
const MAX_CLAIMED_ROWS: usize = 100_000;

/// The rows of tasks this writer claimed and that are still running as it
/// left them, so that completing one need not read it back. Every write of
/// a task row passes through the writer, which reads a row before it
/// changes it: `WriteCtx::load` takes a kept row out, any other read of a
/// running row to change it forgets it (`WriteCtx::forget_kept`), and a
/// rolled-back savepoint or commit forgets them all.
#[derive(Default)]
pub(crate) struct ClaimedRows {
    /// By seq, in seq order (`seq_map.rs`): a task's id carries its seq.
    rows: SeqMap<StoredTask>,
}

impl ClaimedRows {
    /// The kept row of the task `id`. An id that does not carry its row's
    /// seq (one of an older schema) finds none, and its row is read.
    pub fn take(&mut self, id: Uuid) -> Option<StoredTask> {
        let seq = offload_core::seq_carried_by(id)?;
        match self.rows.entry(seq) {
            Entry::Occupied(kept) if kept.get().task.id == id => Some(kept.remove()),
            _ => None,
        }
    }

    /// Keeps a task just claimed and written.
    pub fn keep(&mut self, stored: StoredTask) {
        if stored.task.state == State::Running && self.rows.len() < MAX_CLAIMED_ROWS {
            self.rows.insert(stored.seq, stored);
        }
    }

    pub fn forget(&mut self, seq: i64) {
        self.rows.remove(&seq);
    }

    /// Every kept row, for `WriteCtx::verify_bookkeeping`.
    pub fn iter(&self) -> impl Iterator<Item = &StoredTask> {
        self.rows.values()
    }

    fn forget_all(&mut self) {
        self.rows.clear();
    }
}

/// The statements run once or twice for every task, prepared once for the
/// writer's life. `prepare_cached` finds a statement by hashing its whole
/// text, twice per use (taking it out of the cache and putting it back):
/// ~2,000 instructions for these, a tenth of an insert (callgrind).
pub(crate) struct HotStatements<'conn> {
    pub insert_task: Statement<'conn>,
    pub write_row: Statement<'conn>,
    /// Those that take many rows, by row count and columns.
    pub shaped: ShapedStatements<'conn>,
}

impl<'conn> HotStatements<'conn> {
    pub fn prepare(conn: &'conn Connection) -> Result<Self> {
        Ok(Self {
            insert_task: conn.prepare(sql::INSERT_TASK).map_err(storage_error)?,
            write_row: conn.prepare(sql::WRITE_ROW).map_err(storage_error)?,
            shaped: ShapedStatements::new(conn),
        })
    }
}

/// What an operation sees: the open transaction, the time it runs at, and
/// the effects it accumulates.
pub(crate) struct WriteCtx<'c, 's> {
    /// Reached through [`WriteCtx::conn`], which applies buffered row
    /// writes first.
    db: &'c Connection,
    pub hot: &'c mut HotStatements<'s>,
    pub now: Timestamp,
    pub shared: &'c Shared,
    pub claimed_rows: &'c mut ClaimedRows,
    pub claims: &'c mut Claims,
    pub pending_rows: &'c mut PendingRows,
    pub ready: &'c mut ReadyIndex,
    pub queue_rules: &'c mut QueueRules,
    pub ids: &'c mut SeqIds,
    rows: &'c mut RowWrites,
    /// Why the group's transaction must roll back whole (`settle_rows`).
    group_failure: &'c mut Option<Error>,
    effects: &'c mut Effects,
}

impl<'c> WriteCtx<'c, '_> {
    /// The connection, once every buffered row write is applied, so that
    /// whatever runs on it next sees them.
    pub fn conn(&mut self) -> Result<&'c Connection> {
        self.flush_rows()?;
        Ok(self.db)
    }

    /// The connection without the buffered row writes applied, for a read
    /// of a table they do not touch (anything but `tasks`). Applied there,
    /// they would go in inside the current operation's savepoint, which
    /// journals every page they change (`in_savepoint`).
    pub fn conn_beside_tasks(&self) -> &'c Connection {
        self.db
    }

    /// The rowid of the row the last INSERT added.
    pub fn last_insert_rowid(&self) -> i64 {
        self.db.last_insert_rowid()
    }

    /// Buffers a task row; see [`RowWrites`].
    pub fn write_back(&mut self, row: RowWrite) {
        self.rows.push(row);
    }

    pub fn flush_rows(&mut self) -> Result<()> {
        self.rows
            .flush(&mut self.hot.shaped, &mut self.hot.write_row)
            .map_err(storage_error)?;
        if !self.claims.closed.is_empty() {
            let mut delete = self
                .db
                .prepare_cached(sql::DELETE_CLAIM)
                .map_err(storage_error)?;
            for id in self.claims.closed.drain(..) {
                delete.execute([id]).map_err(storage_error)?;
            }
        }
        Ok(())
    }

    /// Runs `op` in a savepoint of its own, which its failure rolls back.
    ///
    /// The rows it writes back and leaves buffered go in after its
    /// savepoint is released, at the start of the next operation or before
    /// the commit (`settle_rows`): SQLite copies every page first changed
    /// inside a savepoint to the savepoint's journal, and outside one it
    /// copies none. Those rows cannot break a constraint (`row_writes.rs`);
    /// rows that could go in here, inside the savepoint.
    fn in_savepoint<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.settle_rows()?;
        let mark = self.effects.mark();
        let ready_mark = self.ready.mark();
        let running_mark = self.shared.running.mark();
        let claims_mark = self.claims.mark();
        self.savepoint_exec("SAVEPOINT op")?;
        let mut outcome = op(self);
        if outcome.is_ok()
            && self.rows.holds_key()
            && let Err(e) = self.flush_rows()
        {
            outcome = Err(e);
        }
        if outcome.is_err() {
            self.rows.discard();
            // Before the rollback, which may itself fail: kept rows must
            // never outlive a change undone.
            self.claimed_rows.forget_all();
            self.pending_rows.forget_all();
            self.savepoint_exec("ROLLBACK TO op")?;
            self.effects.reset(mark);
            self.ready.roll_back_to(ready_mark);
            self.queue_rules.rolled_back();
            self.shared.running.roll_back_to(running_mark);
            self.claims.roll_back_to(claims_mark);
        }
        debug_assert!(
            self.claims.claiming.is_empty(),
            "an operation claimed tasks without recording its claim"
        );
        self.savepoint_exec("RELEASE op")?;
        outcome
    }

    /// Applies the rows the operations before left buffered. Their
    /// savepoints are released, so a failure here cannot be undone for one
    /// of them alone: it fails the whole group, whose transaction then
    /// rolls back, and every operation after it in the group.
    fn settle_rows(&mut self) -> Result<()> {
        if let Some(failure) = self.group_failure {
            return Err(failure.clone());
        }
        self.flush_rows().inspect_err(|e| {
            *self.group_failure = Some(e.clone());
        })
    }

    /// Runs a savepoint's statement without applying buffered rows first,
    /// as [`WriteCtx::conn`] would.
    fn savepoint_exec(&self, sql: &str) -> Result<()> {
        run_kept(self.db, sql).map_err(storage_error)
    }

    /// Records that a task of (queue, type) left `from` and entered `to`;
    /// `None` is outside the store (inserted or deleted).
    pub fn count(&mut self, queue: &str, task_type: &str, from: Option<State>, to: Option<State>) {
        let effects = &mut *self.effects;
        let pair = effects.pairs.place(queue, task_type);
        for (state, change) in [(from, -1), (to, 1)] {
            if let Some(state) = state {
                effects.deltas.push(Delta {
                    pair,
                    state,
                    change,
                });
            }
        }
        match to {
            Some(State::Pending) => self.effects.ready = true,
            Some(State::Scheduled) => self.effects.scheduled = true,
            _ => {}
        }
        // A running task that ends frees a slot of its queue's concurrency.
        if from == Some(State::Running) && to != Some(State::Running) {
            self.effects.ready = true;
        }
    }

    pub fn event(&mut self, kind: EventKind, task: &Task) {
        let effects = &mut *self.effects;
        if let Some(event) = self.shared.hub.event_of(&mut effects.unheard, kind, task) {
            effects.events.push(event);
        }
    }

    pub(crate) fn effects(&mut self) -> &mut Effects {
        self.effects
    }

    pub fn cancel_requested(&mut self, id: Uuid) {
        self.effects.cancels.push(id);
    }

    /// Wakes waiting workers after commit, e.g. when a queue resumes.
    pub fn wake_workers(&mut self) {
        self.effects.ready = true;
        self.effects.woke_all = true;
    }
}

/// The handle through which the store submits operations.
#[derive(Debug)]
pub(crate) struct Writer {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    /// Starts the writer thread on `conn`. `lock` is held until the thread
    /// ends, so no other process opens the database while this one writes.
    /// With `wal_sync` (durable mode; `conn` commits without syncing) every
    /// answer waits for it, on a thread of its own (`wal_sync.rs`).
    pub fn start(
        conn: Connection,
        lock: std::fs::File,
        database: &std::path::Path,
        shared: Arc<Shared>,
        ready: ReadyIndex,
        wal_sync: Option<WalSync>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let syncer = wal_sync
            .map(|sync| Syncer::start(Arc::clone(&shared), sync))
            .transpose()?;
        let mut checkpoints = Checkpoints::new(database);
        let thread = std::thread::Builder::new()
            .name("offload-sqlite-writer".into())
            .spawn(move || {
                run_writer(
                    &conn,
                    &rx,
                    &shared,
                    ready,
                    syncer.as_ref(),
                    &mut checkpoints,
                );
                // Whatever the syncer holds is answered before the database
                // closes.
                if let Some(syncer) = syncer {
                    syncer.stop();
                }
                drop(checkpoints);
                drop(conn);
                drop(lock);
            })?;
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `op` in the next group and answers once its commit is durable.
    pub async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.submit(op).await
    }

    /// Runs `op` in the next group, as [`Writer::run`] does, unless its
    /// caller has gone away when the group comes to it: then nothing of it
    /// runs. For a claim: one made for a fetch whose client left while it
    /// waited its turn held its tasks running, for no one, until their
    /// lease ran out.
    pub async fn run_for_caller<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.queue(op, CallerGone::Skip).await
    }

    /// Queues `op` for the next group now; the future answers once its
    /// commit is durable.
    pub fn submit<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static {
        self.queue(op, CallerGone::Run)
    }

    fn queue<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send + 'static,
        caller_gone: CallerGone,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static {
        let (reply_tx, reply_rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx: &mut WriteCtx<'_, '_>| -> Reply {
            if caller_gone == CallerGone::Skip && reply_tx.is_closed() {
                return Box::new(|_| {});
            }
            let outcome = ctx.in_savepoint(op);
            Box::new(move |committed: Result<()>| {
                let _ = reply_tx.send(committed.and(outcome));
            })
        });
        let sent = self.send(job);
        async move {
            if !sent {
                return Err(closed());
            }
            reply_rx.await.map_err(|_| not_run())?
        }
    }

    /// Queues `op` for the next group now, like [`Writer::submit`], but
    /// answers as soon as `op` has run: its outcome is [`Tentative`] until
    /// the group's commit is durable. The caller prepares its answer while
    /// the writer commits and the disk syncs, on another core.
    ///
    /// An `op` that fails answers with its error at once: its savepoint is
    /// rolled back, so the commit holds nothing of it either way.
    pub fn submit_tentative<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<Tentative<T>>> + Send + 'static {
        let (ran_tx, ran_rx) = oneshot::channel();
        let (durable_tx, durable_rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx: &mut WriteCtx<'_, '_>| -> Reply {
            let _ = ran_tx.send(ctx.in_savepoint(op));
            Box::new(move |committed: Result<()>| {
                let _ = durable_tx.send(committed);
            })
        });
        let sent = self.send(job);
        async move {
            if !sent {
                return Err(closed());
            }
            let value = ran_rx.await.map_err(|_| not_run())??;
            let durable: Durable = Box::pin(async move {
                durable_rx.await.map_err(|_| {
                    Error::Storage(
                        "the SQLite writer stopped before its commit; see the server log".into(),
                    )
                })?
            });
            Ok(Tentative { value, durable })
        }
    }

    fn send(&self, job: Job) -> bool {
        match &*self.jobs.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(jobs) => jobs.send(job).is_ok(),
            None => false,
        }
    }

    /// Lets queued operations finish, then stops the thread and closes the
    /// database.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.close();
    }
}

/// What the writer does with an operation whose caller stopped waiting for
/// its answer before its group came to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CallerGone {
    /// Runs it all the same: what it writes stands whether or not anyone
    /// hears of it.
    Run,
    /// Leaves it out.
    Skip,
}

fn closed() -> Error {
    Error::Unavailable("the store is closed".into())
}

/// A job dropped unrun: the writer could not begin its group.
fn not_run() -> Error {
    Error::Storage("the SQLite writer could not run the operation; see the server log".into())
}

/// What the writer thread keeps between operations.
struct WriterState<'conn> {
    hot: HotStatements<'conn>,
    claimed_rows: ClaimedRows,
    claims: Claims,
    pending_rows: PendingRows,
    ready: ReadyIndex,
    queue_rules: QueueRules,
    ids: SeqIds,
    rows: RowWrites,
    group_failure: Option<Error>,
}

impl<'conn> WriterState<'conn> {
    /// The context of one operation, run at the clock's current time.
    fn ctx<'c>(
        &'c mut self,
        db: &'c Connection,
        shared: &'c Shared,
        effects: &'c mut Effects,
    ) -> WriteCtx<'c, 'conn> {
        WriteCtx {
            db,
            hot: &mut self.hot,
            now: shared.clock.now(),
            shared,
            claimed_rows: &mut self.claimed_rows,
            claims: &mut self.claims,
            pending_rows: &mut self.pending_rows,
            ready: &mut self.ready,
            queue_rules: &mut self.queue_rules,
            ids: &mut self.ids,
            rows: &mut self.rows,
            group_failure: &mut self.group_failure,
            effects,
        }
    }
}

fn run_writer(
    conn: &Connection,
    jobs: &mpsc::Receiver<Job>,
    shared: &Shared,
    ready: ReadyIndex,
    syncer: Option<&Syncer>,
    checkpoints: &mut Checkpoints,
) {
    // `SqliteStore::open` prepared these once already, so this fails only if
    // the database changed under it; every caller then hears the store is
    // closed.
    let hot = match HotStatements::prepare(conn) {
        Ok(hot) => hot,
        Err(e) => {
            tracing::error!(error = %e, "the SQLite writer cannot prepare its statements");
            return;
        }
    };
    let mut state = WriterState {
        hot,
        claimed_rows: ClaimedRows::default(),
        claims: Claims::new(Arc::clone(&shared.unwritten)),
        pending_rows: PendingRows::default(),
        ready,
        queue_rules: QueueRules::default(),
        // Every enqueue reads the largest seq stored before it hands out
        // ids (`ops.rs`).
        ids: SeqIds::after(0),
        rows: RowWrites::default(),
        group_failure: None,
    };
    // Durable mode: whether the connection's commits sync themselves
    // (`synchronous = FULL`) or leave it to the syncer; `open` leaves it
    // with NORMAL.
    let mut commits_sync = false;
    let mut database_checked = Instant::now();
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if database_checked.elapsed() >= DATABASE_FILE_CHECK {
            database_checked = Instant::now();
            shared.check_database_file();
        }
        if shared.writes_stopped.get().is_some() {
            // The cause was logged when the writes stopped.
            drop(group);
            continue;
        }
        if let Some(syncer) = syncer {
            // A lone operation with nothing waiting to be synced before it
            // commits with SQLite's own fsync, as it did before there was a
            // syncer: a single request or a pickup gains nothing from a
            // hand-over to another thread, and such a path measured slower.
            let lone = group.len() == 1 && syncer.is_idle();
            if lone != commits_sync {
                let pragma = if lone {
                    "PRAGMA synchronous = FULL"
                } else {
                    "PRAGMA synchronous = NORMAL"
                };
                // On failure the flag keeps saying what the connection does.
                // Not from the cache: SQLite applies `synchronous` while
                // it prepares the PRAGMA, and prepares a kept one again
                // each time it runs.
                match conn.execute_batch(pragma) {
                    Ok(()) => commits_sync = lone,
                    Err(e) => {
                        tracing::warn!(error = %storage_error(e), pragma, "cannot switch how commits sync")
                    }
                }
            }
        }
        if let Err(e) = run_kept(conn, "BEGIN IMMEDIATE") {
            shared.write_failure.note(Some(&e));
            // Dropping the group answers each caller that its operation did
            // not run; the cause goes to the log.
            static BEGIN_FAILED: LogThrottle = LogThrottle::new();
            if let Some(not_logged) = BEGIN_FAILED.admit() {
                tracing::error!(error = %storage_error(e), not_logged, "cannot begin a write transaction");
            }
            drop(group);
            continue;
        }
        let mut effects = Effects::default();
        let grouped = group.len() > 1;
        let mut replies = Vec::with_capacity(group.len());
        for job in group {
            replies.push(job(&mut state.ctx(conn, shared, &mut effects)));
        }
        let parked_claims = claim_for_parked(conn, shared, &mut state, &mut effects);
        let committed = state
            .ctx(conn, shared, &mut effects)
            .settle_rows()
            .and_then(|()| run_kept(conn, "COMMIT").map_err(storage_error));
        state.group_failure = None;
        shared
            .write_failure
            .note(committed.as_ref().err().map(|e| e as _));
        match &committed {
            Ok(()) => {
                debug_assert!(state.rows.is_empty(), "a row write outlived its commit");
                state.ready.commit();
                state.queue_rules.committed();
                shared.running.commit();
                state.claims.commit();
            }
            Err(err) => {
                // Throttled: a full disk fails every commit alike.
                static COMMIT_FAILED: LogThrottle = LogThrottle::new();
                if let Some(not_logged) = COMMIT_FAILED.admit() {
                    tracing::error!(error = %err, not_logged, "group commit failed; its operations are rolled back");
                }
                let _ = run_kept(conn, "ROLLBACK");
                state.rows.discard();
                state.claimed_rows.forget_all();
                state.pending_rows.forget_all();
                state.ready.roll_back_to(0);
                state.queue_rules.transaction_rolled_back();
                shared.running.roll_back_to(0);
                state.claims.roll_back_to(0);
            }
        }
        let settled = Settled {
            effects,
            parked_claims,
            replies,
        };
        let wrote = committed.is_ok();
        match (syncer, committed) {
            (Some(syncer), Ok(())) if !commits_sync => syncer.hand_over(settled, shared),
            (_, committed) => settled.announce(shared, committed),
        }
        if wrote {
            checkpoints.after_commit(conn, grouped);
        }
    }
}

/// Runs a statement without parameters that the writer runs for every
/// group or operation (BEGIN, COMMIT, a savepoint's) from the connection's
/// cache. `execute_batch` parsed BEGIN and COMMIT again each time: ~3,000
/// of the writer's ~50,000 instructions for a single enqueue (callgrind).
fn run_kept(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// When the group made tasks ready, claims for the parked claims of waiting
/// workers inside the same transaction, so their tasks reach them with this
/// commit instead of after a second one. Each taken claim is answered after
/// the commit, with nothing if it found nothing (its waiter parks again).
fn claim_for_parked(
    conn: &Connection,
    shared: &Shared,
    state: &mut WriterState<'_>,
    effects: &mut Effects,
) -> Vec<(TakenClaim, Result<Vec<Task>>)> {
    if !effects.ready {
        return Vec::new();
    }
    let mut outcomes = Vec::new();
    let mut untouched = Vec::new();
    // The claims below only move tasks from pending to running, which opens
    // nothing: the summary taken now stays true for the whole loop.
    let openings = effects.openings();
    for parked in shared.take_parked() {
        // Left parked, without a wake-up, when nothing here concerns it.
        if !parked.is_withdrawn() && !effects.may_satisfy(&openings, &parked.request) {
            untouched.push(parked);
            continue;
        }
        let Some(claim) = parked.take() else {
            continue;
        };
        let mut ctx = state.ctx(conn, shared, effects);
        let outcome = ctx.in_savepoint(|ctx| ctx.claim(&claim.request));
        outcomes.push((claim, outcome));
    }
    if !untouched.is_empty() {
        let mut parked = shared.parked.lock().unwrap_or_else(|p| p.into_inner());
        parked.extend(untouched);
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::{SqliteOptions, SqliteStore};

    #[test]
    fn a_kept_claimed_row_is_found_by_its_id_alone() {
        let now = offload_core::Timestamp::from_millis(1_795_000_000_000);
        let spec = offload_core::NewTask::new("t")
            .validate(
                &offload_core::Limits::default(),
                offload_core::Position::Alone,
            )
            .unwrap();
        let id = offload_core::id_carrying_seq(now, 7);
        let mut task = Task::new_from_spec(id, spec, now, false);
        task.state = State::Running;
        let mut kept = ClaimedRows::default();
        kept.keep(StoredTask {
            seq: 7,
            task: Box::new(task),
        });
        // Same seq, another id: a task of an older schema, or another
        // moment's id.
        let later = offload_core::Timestamp::from_millis(now.as_millis() + 1);
        assert!(kept.take(offload_core::id_carrying_seq(later, 7)).is_none());
        assert!(kept.take(Uuid::now_v7()).is_none());
        assert_eq!(kept.take(id).map(|s| (s.seq, s.task.id)), Some((7, id)));
        assert!(kept.take(id).is_none(), "taken once");
    }

    async fn count_children(store: &SqliteStore) -> i64 {
        store
            .writer
            .run(|ctx| {
                ctx.conn()?
                    .query_row("SELECT COUNT(*) FROM child", [], |r| r.get(0))
                    .map_err(storage_error)
            })
            .await
            .unwrap()
    }

    /// A tentative write's value comes before its group commits; when the
    /// commit fails, `durable` says so and nothing of the write is kept.
    #[tokio::test]
    async fn a_tentative_write_is_undone_by_a_failed_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db"), SqliteOptions::default()).unwrap();
        store
            .writer
            .run(|ctx| {
                ctx.conn()?
                    .execute_batch(
                        "CREATE TABLE parent (id INTEGER PRIMARY KEY); \
                         CREATE TABLE child (parent INTEGER REFERENCES parent (id) \
                           DEFERRABLE INITIALLY DEFERRED);",
                    )
                    .map_err(storage_error)
            })
            .await
            .unwrap();
        let insert = |parent: i64| {
            move |ctx: &mut WriteCtx<'_, '_>| {
                ctx.conn()?
                    .execute("INSERT INTO child VALUES (?1)", [parent])
                    .map_err(storage_error)?;
                Ok(parent)
            }
        };

        // Its savepoint releases; the deferred key fails the commit.
        let orphan = store.writer.submit_tentative(insert(7)).await.unwrap();
        assert_eq!(orphan.value, 7);
        let err = orphan.durable.await.unwrap_err();
        assert!(
            err.to_string().contains("FOREIGN KEY"),
            "the commit's own error: {err}"
        );
        assert_eq!(count_children(&store).await, 0);

        // One that commits is confirmed, and kept.
        store
            .writer
            .run(|ctx| {
                ctx.conn()?
                    .execute("INSERT INTO parent VALUES (8)", [])
                    .map_err(storage_error)
            })
            .await
            .unwrap();
        let kept = store.writer.submit_tentative(insert(8)).await.unwrap();
        assert_eq!(kept.confirmed().await.unwrap(), 8);
        assert_eq!(count_children(&store).await, 1);
    }

    /// A store in `dir` holding one pending task of type `t`, and a claim
    /// of one task of any type.
    async fn store_with_one_task(dir: &std::path::Path) -> (SqliteStore, Task, ClaimRequest) {
        use offload_core::{Limits, NewTask, Position, Store};

        let store = SqliteStore::open(dir.join("t.db"), SqliteOptions::default()).unwrap();
        let spec = NewTask::new("t")
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        let (task, _) = store.enqueue(vec![spec]).await.unwrap().remove(0);
        let request = ClaimRequest {
            worker_id: "w".into(),
            types: Vec::new(),
            queues: Vec::new(),
            limit: 1,
            lease: std::time::Duration::from_secs(60),
        };
        (store, task, request)
    }

    /// A completion's row goes in after its operation's savepoint is
    /// released. Refused there, it cannot be undone for that operation
    /// alone: the whole group rolls back, every operation in it hears the
    /// error, and the store goes on as it was before the group.
    #[tokio::test]
    async fn a_row_write_refused_after_its_savepoint_fails_the_whole_group() {
        use std::time::Duration;

        use offload_core::{Ack, Store};

        let dir = tempfile::tempdir().unwrap();
        let (store, _, request) = store_with_one_task(dir.path()).await;
        let task = store.claim(&request).await.unwrap().remove(0);
        let completion = move || {
            vec![Ack::Complete {
                id: task.id,
                result: None,
            }]
        };
        store
            .writer
            .run(|ctx| {
                ctx.conn()?
                    .execute_batch(
                        "CREATE TABLE child (n INTEGER); \
                         CREATE TRIGGER refuse_completion BEFORE UPDATE OF state ON tasks \
                           WHEN NEW.state = 4 BEGIN SELECT RAISE(FAIL, 'completion refused'); END;",
                    )
                    .map_err(storage_error)
            })
            .await
            .unwrap();

        // The writer is held inside one operation, so that the two below
        // are waiting together and make the next group.
        let (release_tx, held) = hold_writer(&store).await;
        let store = Arc::new(store);
        let completing = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.ack("w", completion()).await }
        });
        let inserting = store.writer.submit(|ctx| {
            ctx.conn()?
                .execute("INSERT INTO child VALUES (1)", [])
                .map_err(storage_error)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        release_tx.send(()).unwrap();
        held.await.unwrap().unwrap();

        let err = completing.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("completion refused"), "{err}");
        let err = inserting.await.unwrap_err();
        assert!(err.to_string().contains("completion refused"), "{err}");
        assert_eq!(count_children(&store).await, 0);
        let running = store.get(task.id).await.unwrap().unwrap();
        assert_eq!(running.state, State::Running);
        store.verify_bookkeeping().await.unwrap();

        // Without the trigger the same completion goes through.
        store
            .writer
            .run(|ctx| {
                ctx.conn()?
                    .execute_batch("DROP TRIGGER refuse_completion")
                    .map_err(storage_error)
            })
            .await
            .unwrap();
        let outcomes = store.ack("w", completion()).await.unwrap();
        assert!(outcomes[0].is_ok(), "{outcomes:?}");
        let completed = store.get(task.id).await.unwrap().unwrap();
        assert_eq!(completed.state, State::Completed);
        store.verify_bookkeeping().await.unwrap();
    }

    /// The value comes while the group is still running, and `durable` only
    /// once it has committed.
    #[tokio::test]
    async fn a_tentative_write_answers_before_its_group_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db"), SqliteOptions::default()).unwrap();
        let wait_for = |gate: mpsc::Receiver<()>| {
            move |_ctx: &mut WriteCtx<'_, '_>| -> Result<()> {
                gate.recv_timeout(std::time::Duration::from_secs(10))
                    .map_err(|e| Error::Storage(format!("the test's gate: {e}")))
            }
        };
        // Holds the writer, once it runs, while the next two queue up as
        // one group.
        let (open_first, first_gate) = mpsc::channel();
        let (started_tx, started) = oneshot::channel();
        let hold = wait_for(first_gate);
        let first = store.writer.submit(move |ctx| {
            let _ = started_tx.send(());
            hold(ctx)
        });
        started.await.unwrap();
        let tentative = store.writer.submit_tentative(|_ctx| Ok("ran"));
        let (open_last, last_gate) = mpsc::channel();
        let last = store.writer.submit(wait_for(last_gate));
        open_first.send(()).unwrap();
        first.await.unwrap();

        // The last operation of the group waits on its gate, so the group
        // has not committed.
        let tentative = tokio::time::timeout(std::time::Duration::from_secs(5), tentative)
            .await
            .expect("the value comes before the group commits")
            .unwrap();
        assert_eq!(tentative.value, "ran");
        let mut durable = tentative.durable;
        assert!(
            (&mut durable).now_or_never().is_none(),
            "durable before the commit"
        );
        open_last.send(()).unwrap();
        last.await.unwrap();
        durable.await.unwrap();
    }

    /// A sync that waits until the test lets it through, once per `()`
    /// sent, and counts the syncs made.
    fn gated_sync() -> (WalSync, mpsc::Sender<()>, Arc<AtomicU64>) {
        let (open, gate) = mpsc::channel::<()>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&syncs);
        let sync: WalSync = Box::new(move || {
            // Bounded, so that a failing test ends instead of waiting here
            // forever while the store it holds is dropped.
            gate.recv_timeout(std::time::Duration::from_secs(10))
                .map_err(|e| std::io::Error::other(format!("the test's sync gate: {e}")))?;
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        });
        (sync, open, syncs)
    }

    /// A durable store in `dir` whose WAL syncs are `sync`'s.
    fn durable_store(dir: &tempfile::TempDir, sync: WalSync) -> SqliteStore {
        SqliteStore::open_with_wal_sync(
            dir.path().join("t.db"),
            SqliteOptions::default(),
            Some(sync),
        )
        .unwrap()
    }

    /// Holds the writer inside an operation of its own until the returned
    /// sender is used, so that what is submitted meanwhile forms one group.
    async fn hold_writer(
        store: &SqliteStore,
    ) -> (mpsc::Sender<()>, tokio::task::JoinHandle<Result<i64>>) {
        let (release, held) = mpsc::channel::<()>();
        let (started_tx, started) = oneshot::channel();
        let holder = tokio::spawn(store.writer.submit(move |ctx| {
            let _ = started_tx.send(());
            held.recv_timeout(std::time::Duration::from_secs(10))
                .map_err(|e| Error::Storage(format!("the test's gate: {e}")))?;
            synchronous(ctx)
        }));
        started.await.unwrap();
        (release, holder)
    }

    fn synchronous(ctx: &mut WriteCtx<'_, '_>) -> Result<i64> {
        ctx.conn()?
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .map_err(storage_error)
    }

    /// A group of several operations commits without SQLite's fsync and is
    /// answered only after the syncer's, while the writer goes on with the
    /// next group; a lone operation commits with SQLite's own fsync, unless
    /// a group before it still waits for the syncer (answers keep commit
    /// order).
    #[tokio::test]
    async fn grouped_writes_are_answered_after_the_wal_sync_while_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (sync, open_sync, syncs) = gated_sync();
        let store = durable_store(&dir, sync);
        let (release, holder) = hold_writer(&store).await;
        let grouped = tokio::spawn(store.writer.submit(synchronous));
        let tentative = store.writer.submit_tentative(synchronous);
        release.send(()).unwrap();

        // The holder was alone: SQLite synced its commit, no syncer needed.
        assert_eq!(holder.await.unwrap().unwrap(), 2, "synchronous = FULL");
        assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), 0);
        // The next group ran, and waits for the syncer.
        let tentative = tokio::time::timeout(std::time::Duration::from_secs(10), tentative)
            .await
            .expect("the writer ran the group")
            .unwrap();
        assert_eq!(tentative.value, 1, "synchronous = NORMAL");
        let mut durable = tentative.durable;
        // A lone write behind a group still waiting is handed over too.
        let behind = store.writer.submit_tentative(synchronous).await.unwrap();
        assert_eq!(behind.value, 1, "synchronous = NORMAL");
        let mut behind_durable = behind.durable;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!grouped.is_finished(), "answered before the WAL sync");
        assert!(
            (&mut durable).now_or_never().is_none(),
            "durable before the WAL sync"
        );
        assert!(
            (&mut behind_durable).now_or_never().is_none(),
            "durable before the WAL sync"
        );

        for _ in 0..3 {
            let _ = open_sync.send(());
        }
        assert_eq!(grouped.await.unwrap().unwrap(), 1);
        durable.await.unwrap();
        behind_durable.await.unwrap();
        assert!(syncs.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }

    /// After a failed fsync nothing says what reached the disk: the callers
    /// waiting on it hear so, and every write after it is refused.
    #[tokio::test]
    async fn a_failed_wal_sync_fails_its_callers_and_every_write_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = durable_store(
            &dir,
            Box::new(|| Err(std::io::Error::other("the disk is gone"))),
        );
        let (release, holder) = hold_writer(&store).await;
        let grouped = [
            tokio::spawn(store.writer.submit(|_ctx| Ok(()))),
            tokio::spawn(store.writer.submit(|_ctx| Ok(()))),
        ];
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        for write in grouped {
            let err = write.await.unwrap().unwrap_err();
            assert!(
                matches!(&err, Error::Storage(m) if m.contains("could not be synced") && m.contains("the disk is gone")),
                "{err}"
            );
        }
        for _ in 0..3 {
            let refused = store.writer.run(|_ctx| Ok(())).await;
            assert!(matches!(refused, Err(Error::Storage(_))), "{refused:?}");
        }
        assert_eq!(store.wal_syncs(), 0);
        // `/health` says so, with the cause, until a restart.
        let health = offload_core::Store::count_stuck(&store, std::time::Duration::ZERO).await;
        assert!(
            matches!(&health, Err(Error::Storage(m)) if m.contains("could not be synced") && m.contains("the disk is gone")),
            "{health:?}"
        );
    }

    /// An operation that fails answers with its own error, not tentatively.
    #[tokio::test]
    async fn a_failed_tentative_write_answers_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db"), SqliteOptions::default()).unwrap();
        let failed = store
            .writer
            .submit_tentative(|_ctx| -> Result<()> { Err(Error::invalid("field", "rule")) })
            .await;
        assert_eq!(failed.unwrap_err(), Error::invalid("field", "rule"));
    }

    /// A claim whose caller went away while it waited for the writer is
    /// left out: its task stays pending for the next fetch, where it was
    /// claimed for no one and held running until its lease ran out.
    #[tokio::test]
    async fn a_claim_whose_caller_left_before_its_turn_takes_nothing() {
        use offload_core::Store;

        let dir = tempfile::tempdir().unwrap();
        let (store, task, request) = store_with_one_task(dir.path()).await;

        // The writer is held inside one operation while the claim is
        // queued behind it and its caller goes away.
        let (release_tx, held) = hold_writer(&store).await;
        assert!(
            store.claim(&request).now_or_never().is_none(),
            "the claim waits for the writer"
        );
        assert!(
            store.claim_or_park(&request).now_or_never().is_none(),
            "so does a claim that may park"
        );
        release_tx.send(()).unwrap();
        held.await.unwrap().unwrap();
        // The writer takes its operations in order: past this one, it has
        // come to the two claims.
        store.writer.run(|_ctx| Ok(())).await.unwrap();

        let stored = store.get(task.id).await.unwrap().unwrap();
        assert_eq!(stored.state, State::Pending, "claimed for no one");
        let claimed = store.claim(&request).await.unwrap();
        assert_eq!(claimed.iter().map(|t| t.id).collect::<Vec<_>>(), [task.id]);
    }
}
