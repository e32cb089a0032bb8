//! The storage interface: one trait that every backend implements and the
//! conformance suite (`offload-storetest`) checks.
//!
//! It is shaped for batches: enqueue, claim and ack each take many tasks in
//! one call, so a backend can turn a burst of work into one transaction and
//! one fsync.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Error, Hub, Json, Limits, Result, State, Task, TaskSpec, Timestamp};

/// A request to claim ready tasks.
///
/// Claiming happens in two steps in every backend: the store gathers
/// candidates per queue (skipping paused queues, no more than a queue's
/// concurrency leaves room for), then [`crate::admit`] decides which to take.
/// Per-owner running limits, fair turns between owners and rate limits are
/// further admission rules and go there, which is why the request carries no
/// assumption that one query can answer it.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    pub worker_id: String,
    /// Task types the worker handles; empty means any.
    pub types: Vec<String>,
    /// Queues the worker serves; empty means all.
    pub queues: Vec<String>,
    pub limit: usize,
    pub lease: Duration,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object {percent?, message?, data?}"
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProgressUpdate {
    #[serde(default)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Value>))]
    pub data: Option<Json>,
}

#[derive(Clone, Debug)]
pub struct HeartbeatRequest {
    pub id: Uuid,
    pub worker_id: String,
    pub progress: Option<ProgressUpdate>,
    pub lease: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatAck {
    pub cancel_requested: bool,
    pub lease_expires_at: Timestamp,
}

/// What kind of failure a worker reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FailureKind {
    #[default]
    Error,
    /// The worker stopped the attempt because `timeout_secs` passed.
    Timeout,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub message: String,
    pub kind: FailureKind,
    pub retry: Option<bool>,
    pub retry_in: Option<Duration>,
}

/// Longest error or progress message kept; longer ones are cut.
pub const MAX_MESSAGE_CHARS: usize = 16 * 1024;

/// Cuts `message` to [`MAX_MESSAGE_CHARS`], marking the cut.
pub fn truncate_message(mut message: String) -> String {
    if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(cut);
        message.push('…');
    }
    message
}

impl Failure {
    /// The attempt failure this report stands for.
    pub fn into_attempt_failure(self) -> crate::AttemptFailure {
        crate::AttemptFailure {
            kind: match self.kind {
                FailureKind::Error => crate::ErrorKind::Error,
                FailureKind::Timeout => crate::ErrorKind::Timeout,
            },
            message: truncate_message(self.message),
            retry: self.retry,
            retry_in: self.retry_in,
        }
    }
}

impl ProgressUpdate {
    /// Checks the report (percent 0–100, data within the size limit) and
    /// returns it as the state machine takes it.
    pub fn checked(self, limits: &Limits) -> Result<(Option<f64>, Option<String>, Option<Json>)> {
        if let Some(percent) = self.percent
            && !(0.0..=100.0).contains(&percent)
        {
            return Err(Error::invalid(
                "progress.percent",
                format!("must be 0 to 100; got {percent}"),
            ));
        }
        if let Some(data) = &self.data {
            crate::check_json("progress.data", data, limits)?;
        }
        Ok((self.percent, self.message.map(truncate_message), self.data))
    }
}

/// One outcome a worker reports.
#[derive(Clone, Debug)]
pub enum Ack {
    Complete { id: Uuid, result: Option<Json> },
    Fail { id: Uuid, failure: Failure },
}

impl Ack {
    pub fn id(&self) -> Uuid {
        match self {
            Ack::Complete { id, .. } | Ack::Fail { id, .. } => *id,
        }
    }
}

/// The answer to one [`Ack`]: the task as it now is, or why the ack was
/// refused (typically [`Error::Conflict`]: the worker no longer holds it).
pub type AckOutcome = Result<Task>;

/// Filters for listing tasks, newest first.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub states: Vec<State>,
    pub task_type: Option<String>,
    pub queue: Option<String>,
    pub owner: Option<String>,
    pub labels: Vec<(String, String)>,
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
    pub limit: usize,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

pub const MAX_LIST_LIMIT: usize = 1000;

/// A list of one owner's tasks in some states walks the states' index,
/// passing over other owners' tasks, while those states hold at most this
/// many tasks in all, and the owner's index, passing over the owner's
/// tasks in other states, past that. Either walk alone has its bad case:
/// through the states' index a page of a small owner's completed tasks
/// read past 100,000 other owners' (22 ms on SQLite), through the owner's
/// a page of an owner's failed tasks, none failed, read past its 100,000
/// completed ones (20 ms on SQLite, 40 on PostgreSQL).
pub const OWNER_LIST_STATE_WALK: u64 = 10_000;

/// A page of a list, and the tasks one claim takes, end after the task
/// that brings the bytes of their payloads, results and progress data to
/// this or past it, even short of `limit`. A list's `next_cursor` then
/// goes on from there; a worker's next fetch claims the rest. Without it
/// an answer of 1,000 tasks of the largest payloads was a gigabyte, which
/// the node held in memory two or three times over while answering it.
pub const PAGE_BYTES: usize = 8 << 20;

impl ListQuery {
    /// `limit` must be 1 to [`MAX_LIST_LIMIT`].
    pub fn check_limit(&self) -> Result<()> {
        if self.limit == 0 || self.limit > MAX_LIST_LIMIT {
            return Err(Error::invalid(
                "limit",
                format!("must be 1 to {MAX_LIST_LIMIT}; got {}", self.limit),
            ));
        }
        Ok(())
    }
}

/// How full a page is, as a store reads it task by task (a list's, newest
/// first, or a claim's, in claim order): it holds `limit` tasks or
/// [`PAGE_BYTES`] at most, and one task at least.
#[derive(Debug)]
pub struct PageFill {
    limit: usize,
    tasks: usize,
    bytes: usize,
}

impl PageFill {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            tasks: 0,
            bytes: 0,
        }
    }

    /// Counts `task` in if the page has room for it; `false` when the page
    /// was full, so that `task` tells that another page follows.
    pub fn take(&mut self, task: &Task) -> bool {
        self.take_sized(task.bulk_bytes())
    }

    /// [`PageFill::take`] for a task whose [`Task::bulk_bytes`] the store
    /// knows without holding them all.
    pub fn take_sized(&mut self, bulk_bytes: usize) -> bool {
        if self.tasks >= self.limit || self.bytes >= PAGE_BYTES {
            return false;
        }
        self.tasks += 1;
        self.bytes = self.bytes.saturating_add(bulk_bytes);
        true
    }

    /// How many rows a store that reads in rounds should ask for next:
    /// twice what would fill the page at the sizes taken so far, and one
    /// more to tell whether another page follows, within what `limit`
    /// leaves. A first round knows no sizes and asks for up to
    /// 64 rows (`FIRST_ROUND`).
    pub fn rows_to_ask(&self) -> usize {
        let left = self.limit.saturating_sub(self.tasks) + 1;
        if self.tasks == 0 {
            return left.min(FIRST_ROUND);
        }
        let per_task = (self.bytes / self.tasks).max(1);
        let fit = PAGE_BYTES.saturating_sub(self.bytes) / per_task;
        left.min(fit.saturating_mul(2) + 1)
    }
}

/// The rows a first round of reading a page asks for: a whole default
/// list page of 50 (a claim of small tasks reads the rest in its second
/// round), and at most 64 of the largest payloads read past an 8 MiB page.
const FIRST_ROUND: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// Set while tasks are left to list, also after a page cut short by
    /// [`PAGE_BYTES`]; null on the last page.
    pub next_cursor: Option<String>,
}

/// Task counts by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Counts {
    pub blocked: u64,
    pub scheduled: u64,
    pub pending: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl Counts {
    pub fn get(&self, state: State) -> u64 {
        match state {
            State::Blocked => self.blocked,
            State::Scheduled => self.scheduled,
            State::Pending => self.pending,
            State::Running => self.running,
            State::Completed => self.completed,
            State::Failed => self.failed,
            State::Cancelled => self.cancelled,
        }
    }

    /// The tasks in `states`, each state counted once however often named.
    pub fn in_states(&self, states: &[State]) -> u64 {
        let mut seen = 0_u8;
        let mut n = 0;
        for state in states {
            let bit = 1 << state.code();
            if seen & bit == 0 {
                seen |= bit;
                n += self.get(*state);
            }
        }
        n
    }

    pub fn slot(&mut self, state: State) -> &mut u64 {
        match state {
            State::Blocked => &mut self.blocked,
            State::Scheduled => &mut self.scheduled,
            State::Pending => &mut self.pending,
            State::Running => &mut self.running,
            State::Completed => &mut self.completed,
            State::Failed => &mut self.failed,
            State::Cancelled => &mut self.cancelled,
        }
    }

    pub fn total(&self) -> u64 {
        State::ALL.iter().map(|s| self.get(*s)).sum()
    }

    pub fn add(&mut self, other: &Counts) {
        for s in State::ALL {
            *self.slot(s) += other.get(s);
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stats {
    pub total: Counts,
    pub queues: BTreeMap<String, Counts>,
    pub types: BTreeMap<String, Counts>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueInfo {
    pub name: String,
    pub paused: bool,
    pub concurrency: Option<u32>,
    pub counts: Counts,
}

/// A change to a queue's settings; `None` leaves a setting as it is.
#[derive(Clone, Debug, Default)]
pub struct QueuePatch {
    pub paused: Option<bool>,
    /// `Some(None)` removes the limit.
    pub concurrency: Option<Option<u32>>,
}

#[derive(Clone, Debug)]
pub struct ClearRequest {
    /// Finished states to clear; anything else is refused.
    pub states: Vec<State>,
    /// Only tasks finished at least this long ago.
    pub older_than: Option<Duration>,
}

impl ClearRequest {
    /// At least one state, and only finished ones.
    pub fn check_states(&self) -> Result<()> {
        if self.states.is_empty() {
            return Err(Error::invalid(
                "state",
                "name at least one of completed, failed, cancelled",
            ));
        }
        if let Some(active) = self.states.iter().find(|s| s.is_active()) {
            return Err(Error::invalid(
                "state",
                format!(
                    "only finished states (completed, failed, cancelled) can be cleared; got {active}"
                ),
            ));
        }
        Ok(())
    }
}

/// How long finished tasks are kept (SPEC §1.5).
#[derive(Clone, Debug)]
pub struct Retention {
    pub completed: Duration,
    pub failed: Duration,
    pub cancelled: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            completed: Duration::from_secs(24 * 3600),
            failed: Duration::from_secs(7 * 24 * 3600),
            cancelled: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Retention {
    pub fn for_state(&self, state: State) -> Option<Duration> {
        match state {
            State::Completed => Some(self.completed),
            State::Failed => Some(self.failed),
            State::Cancelled => Some(self.cancelled),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromoteReport {
    pub promoted: u64,
    /// How long until the earliest `run_at` still waiting, if any, by the
    /// store's own time (which may be its database's, not this machine's).
    pub next_due_in: Option<Duration>,
}

/// The answer of [`Store::enqueue_streamed`], to come.
pub type Enqueueing<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Tentative<Vec<(Task, bool)>>>> + Send + 'a>,
>;

/// Resolves once a write is durable, or with the error that undid it.
pub type Durable = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// What a write did, known before its commit is durable.
///
/// A store that makes a write durable after running it (the SQLite writer
/// runs a group, then commits and fsyncs it) hands the outcome over as soon
/// as the write has run, so that the caller can prepare its answer while
/// the commit reaches the disk. Until `durable` resolves with `Ok` the write
/// may still be undone: nothing of `value` may be answered, announced or
/// acted on before then.
pub struct Tentative<T> {
    pub value: T,
    pub durable: Durable,
}

impl<T> Tentative<T> {
    /// The outcome of a write that is durable already.
    pub fn settled(value: T) -> Self {
        Self {
            value,
            durable: Box::pin(std::future::ready(Ok(()))),
        }
    }

    /// The outcome, once durable.
    pub async fn confirmed(self) -> Result<T> {
        self.durable.await?;
        Ok(self.value)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Tentative<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tentative")
            .field("value", &self.value)
            .finish_non_exhaustive()
    }
}

/// What [`Store::claim_or_park`] did.
#[derive(Debug)]
pub enum Claim {
    /// Claimed these tasks (perhaps none) at once.
    Now {
        tasks: Vec<Task>,
        /// Whether ready tasks the claim did not take may remain: then
        /// other fetches waiting for them are woken (a store that cannot
        /// tell says so when the claim took all it asked for). A lone task
        /// taken by a fetch of one woke two more, whose claims found
        /// nothing.
        more: bool,
    },
    /// Found nothing and parked the claim; the ticket brings the answer.
    Parked(crate::ClaimTicket),
}

impl Claim {
    /// Tasks claimed at once for `request` by a store that cannot tell
    /// whether it left ready tasks behind: it may have when it took all it
    /// asked for.
    pub fn took(tasks: Vec<Task>, request: &ClaimRequest) -> Self {
        let more = tasks.len() == request.limit;
        Claim::Now { tasks, more }
    }
}

/// A task store. Every method is one durable transaction, which a store
/// may share with other callers' writes: when it returns `Ok`, the change
/// survives a crash (unless the backend runs relaxed).
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Enqueues all or nothing. Each answer says whether the task was created
    /// (`true`) or an active task holding the unique key was returned.
    async fn enqueue(&self, tasks: Vec<TaskSpec>) -> Result<Vec<(Task, bool)>>;

    /// Enqueues, all or nothing, a batch whose tasks arrive through `batch`
    /// (see [`crate::batch_stream`]) while the caller still reads them.
    /// The batch is submitted when this is called, before the future is
    /// first polled: the caller sends the chunks, then awaits. A store that
    /// cannot write a batch piecemeal takes it whole once it is finished.
    ///
    /// The answer may come before the commit is durable ([`Tentative`]).
    fn enqueue_streamed(&self, batch: crate::BatchReceiver) -> Enqueueing<'_> {
        Box::pin(async move {
            self.enqueue(batch.into_finished()?)
                .await
                .map(Tentative::settled)
        })
    }

    /// Claims up to `limit` ready tasks, highest priority first, then oldest
    /// `run_at`.
    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Task>>;

    /// Claims like [`Store::claim`]; when nothing can be claimed, a store
    /// that supports it parks the request (see [`crate::park`]) so that the
    /// write which next makes tasks ready claims for it in the same commit.
    /// Stores without parking answer at once; the caller then waits for the
    /// hub's ready signal.
    async fn claim_or_park(&self, request: &ClaimRequest) -> Result<Claim> {
        Ok(Claim::took(self.claim(request).await?, request))
    }

    async fn heartbeat(&self, request: HeartbeatRequest) -> Result<HeartbeatAck>;

    /// Completes and fails many tasks in one transaction; one answer per ack,
    /// in order. A refused ack does not affect the others.
    async fn ack(&self, worker_id: &str, acks: Vec<Ack>) -> Result<Vec<AckOutcome>>;

    async fn cancel(&self, id: Uuid) -> Result<Task>;

    async fn retry(&self, id: Uuid) -> Result<Task>;

    async fn get(&self, id: Uuid) -> Result<Option<Task>>;

    async fn list(&self, query: &ListQuery) -> Result<TaskPage>;

    async fn stats(&self) -> Result<Stats>;

    /// The counts by state of all tasks: `stats().total` without the
    /// breakdown by queue and type, which `/health` has no use for and
    /// which grows with every queue and type ever used.
    async fn totals(&self) -> Result<Counts> {
        Ok(self.stats().await?.total)
    }

    /// Deletes a finished task; an active one is a conflict.
    async fn delete(&self, id: Uuid) -> Result<()>;

    async fn clear(&self, request: &ClearRequest) -> Result<u64>;

    async fn queues(&self) -> Result<Vec<QueueInfo>>;

    /// Changes a queue's settings, creating the queue if it was never used.
    async fn update_queue(&self, name: &str, patch: QueuePatch) -> Result<QueueInfo>;

    /// Moves due `scheduled` tasks to `pending`.
    async fn promote_due(&self) -> Result<PromoteReport>;

    /// Fails running attempts whose lease expired or whose `timeout_secs`
    /// passed, retrying them per SPEC §1.1; answers those tasks as it left
    /// them (`scheduled`, `failed` or `cancelled`).
    async fn recover_expired(&self) -> Result<Vec<Task>>;

    /// The tasks this store's own commits moved into a finished state since
    /// the last call, by (queue, type): every way a task finishes, counted
    /// once, by the node that committed it. The caller keeps the totals
    /// (see [`crate::FinishedTally`]).
    fn take_finished(&self) -> Vec<(String, String, crate::Finished)>;

    /// Deletes up to `batch` finished tasks past their retention.
    async fn purge_finished(&self, retention: &Retention, batch: usize) -> Result<u64>;

    /// Running tasks whose lease expired at least `expired_for` ago: ones
    /// recovery should already have retried. Also `/health`'s check of the
    /// database: an error when the store cannot serve (a database it cannot
    /// reach, or one it can no longer write to until a restart).
    async fn count_stuck(&self, expired_for: Duration) -> Result<u64>;

    /// Checks what the store keeps beside its tables (in memory, say)
    /// against the tables themselves, and says where they disagree; the
    /// property test calls it after every step. A store that keeps nothing
    /// beside its tables has nothing to check.
    async fn verify_bookkeeping(&self) -> Result<()> {
        Ok(())
    }

    /// Whether this node should run the background duties (promotion,
    /// recovery, retention). A store shared by several nodes elects one; a
    /// store only one process can open always leads.
    fn is_leader(&self) -> bool {
        true
    }

    /// Change notifications for this store's tasks.
    fn hub(&self) -> &Hub;
}

/// Parses the `cursor` of a [`ListQuery`] as the position it encodes.
pub fn decode_cursor(cursor: &str) -> Result<i64> {
    cursor
        .strip_prefix('c')
        .and_then(|n| n.parse::<i64>().ok())
        .ok_or_else(|| {
            Error::invalid(
                "cursor",
                "must be a next_cursor returned by a previous page",
            )
        })
}

pub fn encode_cursor(position: i64) -> String {
    format!("c{position}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_named_twice_is_counted_once() {
        let counts = Counts {
            completed: 7,
            failed: 3,
            pending: 100,
            ..Counts::default()
        };
        assert_eq!(
            counts.in_states(&[State::Completed, State::Failed, State::Completed]),
            10
        );
        assert_eq!(counts.in_states(&[]), 0);
        assert_eq!(counts.in_states(&[State::Pending]), 100);
    }
}
