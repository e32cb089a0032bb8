//! The write operations, each inside one transaction ([`Tx`]), but for
//! [`enqueue_plain`], whose one statement is its transaction. They follow
//! the SQLite store's operations step for step; the conformance suite holds
//! the two to the same behaviour.

use std::collections::{HashMap, HashSet};

use offload_core::{
    Ack, AckOutcome, CancelEffect, Candidate, ClaimRequest, Error, EventKind, HeartbeatAck,
    HeartbeatRequest, OnConflict, PageFill, PromoteReport, QueueInfo, QueuePatch, State, Task,
    TaskSpec, Timestamp, admit, check_json, id_carrying_seq,
};
use sqlx::Row;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

use crate::Node;
use crate::ids::{self, Lock};
use crate::rows::{
    CANDIDATE_COLUMNS, CANDIDATE_PAYLOAD_BYTES, PgError, PgResult, StoredTask, StoredTexts,
    TASK_COLUMNS, decode, encode_json, payload,
};
use crate::tx::{Changes, PgQuery, Tx, changed_prefix};

/// Types a claim may name and still read candidates for each named one;
/// past this it reads them for the named ones pending in the queue.
const FEW_TYPES: usize = 8;
/// Queues a claim from all of them may ask one by one for the few types
/// it names; past this it walks the pending (queue, type) pairs instead.
const FEW_QUEUES: usize = 64;
/// Pending (queue, type) pairs a claim from all queues, its first window
/// held back by paused or full queues, claims from one by one rather than
/// read larger windows (`bench/held-back.py`): a walk of the pairs costs
/// a few µs a pair, wasted where there are more.
const FEW_PENDING_PAIRS: i64 = 256;
/// Rows a duty handles per transaction.
const DUTY_BATCH: i64 = 1000;
/// Advisory locks that writes naming a unique key take turns on.
pub(crate) const UNIQUE_KEY_LOCKS: u64 = 64;

async fn load_one(tx: &mut Tx, id: Uuid) -> PgResult<StoredTask> {
    tx.load_for_update(&[id])
        .await?
        .remove(&id)
        .ok_or_else(|| Error::task_not_found(id).into())
}

/// Locks each (queue, unique key) until the transaction ends, so that
/// writes naming one key take turns: each then sees the last one's task.
/// Without it, concurrent enqueues with `on_conflict: replace` each
/// cancelled the task they found and raced to the unique index, where all
/// but one failed and started over; 32 at once left a third of them with
/// a 503 after five tries.
///
/// A key locks one of [`UNIQUE_KEY_LOCKS`] advisory locks, not one of its
/// own: every advisory lock held takes a slot of PostgreSQL's shared lock
/// table (64 a transaction by default), and a batch may name 10,000 keys.
/// Two keys that share a lock only take turns. Taken in one sorted order,
/// so two batches never wait on each other.
async fn lock_unique_keys<'k>(
    tx: &mut Tx,
    keys: impl IntoIterator<Item = (&'k str, &'k str)>,
) -> PgResult<()> {
    let locks = unique_key_locks(&tx.node, keys);
    if locks.is_empty() {
        return Ok(());
    }
    sqlx::query(crate::sql::LOCK_IN_ORDER)
        .bind(&locks)
        .execute(&mut *tx.conn)
        .await?;
    Ok(())
}

/// The advisory locks of [`lock_unique_keys`] that `keys` take, in the
/// order they are taken.
fn unique_key_locks<'k>(
    node: &Node,
    keys: impl IntoIterator<Item = (&'k str, &'k str)>,
) -> Vec<i64> {
    let mut slots: Vec<u64> = keys
        .into_iter()
        .map(|(queue, key)| crate::lock_key(&format!("{queue}\0{key}")) as u64 % UNIQUE_KEY_LOCKS)
        .collect();
    slots.sort_unstable();
    slots.dedup();
    slots
        .into_iter()
        .map(|slot| crate::lock_key(&format!("offload-unique:{}:{slot}", node.channel)))
        .collect()
}

/// The active tasks holding the unique keys `keys` (queue, key), locked,
/// by key: one statement for a batch's keys, where one a key made a batch
/// of 1,000 keyed tasks 1,000 round trips.
async fn unique_key_holders(
    tx: &mut Tx,
    keys: &[(&str, &str)],
) -> PgResult<HashMap<(String, String), StoredTask>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (queues, names): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE {} ORDER BY seq FOR UPDATE",
        crate::sql::HOLDING_UNIQUE_KEYS
    ))
    .bind(&queues)
    .bind(&names)
    .bind(State::Running.code() as i16)
    .fetch_all(&mut *tx.conn)
    .await?;
    let mut holders = HashMap::with_capacity(rows.len());
    for row in &rows {
        let stored = decode(row)?;
        if let Some(key) = stored.task.unique_key.clone() {
            holders.insert((stored.task.queue.clone(), key), stored);
        }
    }
    Ok(holders)
}

// ---- enqueue ---------------------------------------------------------------

enum Answer {
    Existing(Task),
    Fresh(usize, bool),
}

struct Fresh {
    seq: i64,
    task: Task,
    /// Dependencies not yet completed: id and seq.
    unmet: Vec<(Uuid, i64)>,
    broken: Option<(Uuid, State)>,
}

/// The (queue, unique key) of `spec`, where it names one.
fn queue_and_key(spec: &TaskSpec) -> Option<(&str, &str)> {
    Some((spec.queue.as_str(), spec.unique_key.as_deref()?))
}

/// Enqueues `specs` as one batch: a task that meets a key taken earlier in
/// the batch meets that task (SPEC §1.2).
pub(crate) async fn enqueue(tx: &mut Tx, specs: Vec<TaskSpec>) -> PgResult<Vec<(Task, bool)>> {
    let locks = unique_key_locks(&tx.node, specs.iter().filter_map(queue_and_key));
    enqueue_holding(tx, specs, &locks).await
}

/// Enqueues `specs`, each as if it came in a request of its own, one after
/// another, in one transaction: the single enqueues of several callers
/// gathered ([`crate::gather::CheckedEnqueues`]), one answer each.
///
/// A task whose dependency is not there is refused alone, before anything
/// is written: its refusal would otherwise end the others' transaction
/// (one written alone ends its transaction with it, as in [`enqueue`]).
/// That look takes no locks (the writes after it lock the dependencies
/// they read, keys first, in the order every enqueue takes them); a
/// dependency deleted between the two runs the transaction again.
///
/// Where a key comes again, the tasks from there on go in a later batch
/// of the transaction, which meets the earlier one's task as a later
/// request would: in one batch a replace would cancel the task the earlier
/// caller is answered with before that caller learned of it. Every key's
/// lock is taken with the first batch, in the one sorted order every
/// enqueue takes them in: taken batch by batch, two transactions could
/// each hold a lock the other waits for.
pub(crate) async fn enqueue_apart(
    tx: &mut Tx,
    specs: &[TaskSpec],
) -> PgResult<Vec<Result<(Task, bool), Error>>> {
    // One written alone is refused by its transaction's end, with no one
    // else's task in it, and spares the look's round trip.
    let alone = specs.len() == 1;
    let mut refused: Vec<Option<Error>> = vec![None; specs.len()];
    let mut named: Vec<Uuid> = if alone {
        Vec::new()
    } else {
        specs
            .iter()
            .flat_map(|s| s.depends_on.iter().copied())
            .collect()
    };
    if !named.is_empty() {
        named.sort_unstable();
        named.dedup();
        let there = ids::find(&mut tx.conn, &named, Lock::None).await?;
        for (spec, refusal) in specs.iter().zip(&mut refused) {
            *refusal = dependencies(spec, &there).err().map(PgError::into_core);
        }
    }
    let accepted: Vec<&TaskSpec> = specs
        .iter()
        .zip(&refused)
        .filter(|(_, refusal)| refusal.is_none())
        .map(|(spec, _)| spec)
        .collect();

    let mut locks = unique_key_locks(&tx.node, accepted.iter().filter_map(|s| queue_and_key(s)));
    let mut made = Vec::with_capacity(accepted.len());
    let mut rest = &accepted[..];
    while !rest.is_empty() {
        let mut keys = HashSet::new();
        let apart = rest
            .iter()
            .position(|spec| queue_and_key(spec).is_some_and(|key| !keys.insert(key)))
            .unwrap_or(rest.len());
        let (batch, later) = rest.split_at(apart);
        let batch = batch.iter().map(|spec| (*spec).clone()).collect();
        // Locks held already are not taken again.
        match enqueue_holding(tx, batch, &std::mem::take(&mut locks)).await {
            Ok(answers) => made.extend(answers),
            // Its one refusal: a dependency not there, which was there
            // at the look.
            Err(PgError::Core(Error::InvalidArgument { field, rule })) if !alone => {
                return Err(PgError::Retry(format!(
                    "a dependency went while its dependent was enqueued: {field}: {rule}"
                )));
            }
            Err(e) => return Err(e),
        }
        rest = later;
    }
    let mut made = made.into_iter();
    refused
        .iter_mut()
        .map(|refusal| match refusal.take() {
            Some(refusal) => Ok(Err(refusal)),
            None => made
                .next()
                .map(Ok)
                .ok_or_else(|| Error::Storage("fewer tasks enqueued than accepted".into()).into()),
        })
        .collect()
}

/// [`enqueue`], taking the advisory locks `locks` first (none where the
/// transaction holds its keys' locks already).
async fn enqueue_holding(
    tx: &mut Tx,
    specs: Vec<TaskSpec>,
    locks: &[i64],
) -> PgResult<Vec<(Task, bool)>> {
    let mut queue_names: Vec<String> = specs.iter().map(|s| s.queue.clone()).collect();
    queue_names.sort();
    queue_names.dedup();
    // The seqs, one a task (a task that finds its unique key taken leaves
    // a gap), are taken first: each task's id carries its seq. With them
    // the keys' locks, before the keys' holders are read.
    let mut seqs = sqlx::query_scalar::<_, i64>(crate::sql::LOCK_AND_TAKE_SEQS)
        .bind(&queue_names)
        .bind(tx.now.as_millis())
        .bind(specs.len() as i64)
        .bind(locks)
        .fetch_all(&mut *tx.conn)
        .await?
        .into_iter();

    let keys: Vec<(&str, &str)> = specs.iter().filter_map(queue_and_key).collect();
    let mut holders = unique_key_holders(tx, &keys).await?;
    // The tasks to create, each cancelled (replaced by a later one of the
    // batch) or not.
    let mut planned: Vec<(TaskSpec, bool)> = Vec::with_capacity(specs.len());
    let mut answers = Vec::with_capacity(specs.len());
    // Keys taken by tasks earlier in this batch.
    let mut batch_keys: HashMap<(String, String), usize> = HashMap::new();
    // Held tasks the batch replaces, cancelled and written back together:
    // one at a time, a batch of 1,000 replaces made 3,000 round trips.
    let mut replaced_holders = Vec::new();
    for spec in specs {
        if let Some(key) = &spec.unique_key {
            let slot = (spec.queue.clone(), key.clone());
            if let Some(&i) = batch_keys.get(&slot) {
                match spec.on_conflict {
                    OnConflict::Keep => {
                        answers.push(Answer::Fresh(i, false));
                        continue;
                    }
                    OnConflict::Replace => planned[i].1 = true,
                }
            } else if let Some(holder) = holders.get(&slot) {
                if spec.on_conflict == OnConflict::Keep {
                    // Kept for the batch's later tasks of this key too.
                    answers.push(Answer::Existing(holder.task.clone()));
                    continue;
                }
                // Replaced once: the batch's later tasks of this key meet
                // this one's task.
                if let Some(mut holder) = holders.remove(&slot) {
                    let before = holder.task.state;
                    if holder.task.cancel(tx.now)? == CancelEffect::Requested {
                        tx.cancel_requested(holder.task.id);
                    }
                    replaced_holders.push((holder, before));
                }
            }
            batch_keys.insert(slot, planned.len());
        }
        answers.push(Answer::Fresh(planned.len(), true));
        planned.push((spec, false));
    }

    tx.save(replaced_holders).await?;
    // Read after the replaces above, which a task of the batch may depend
    // on.
    let found = dependencies_of(tx, planned.iter().map(|(spec, _)| spec)).await?;
    let mut fresh: Vec<Fresh> = Vec::with_capacity(planned.len());
    for (spec, replaced) in planned {
        let Standing { unmet, broken } = dependencies(&spec, &found)?;
        let blocked = !unmet.is_empty() || broken.is_some();
        let seq = seqs
            .next()
            .ok_or_else(|| Error::Storage("fewer seqs than tasks".into()))?;
        let mut task = Task::new_from_spec(id_carrying_seq(tx.now, seq), spec, tx.now, blocked);
        if replaced {
            task.cancel(tx.now)?;
        }
        fresh.push(Fresh {
            seq,
            task,
            unmet,
            broken,
        });
    }

    for item in &fresh {
        tx.count(
            &item.task.queue,
            &item.task.task_type,
            None,
            Some(item.task.state),
        );
        tx.event(EventKind::State, &item.task);
    }
    // Records the counts and notifications above with the rows.
    insert(tx, &fresh).await?;
    let mut deps_dep = Vec::new();
    let mut deps_dep_seq = Vec::new();
    let mut deps_task = Vec::new();
    let mut broken = Vec::new();
    // Where each of `broken` is in `fresh`.
    let mut broken_at = Vec::new();
    for (at, item) in fresh.iter().enumerate() {
        for (dep, dep_seq) in &item.unmet {
            deps_dep.push(*dep);
            deps_dep_seq.push(*dep_seq);
            deps_task.push(item.seq);
        }
        if let Some((dep, dep_state)) = item.broken {
            // Inserted with no progress, error or history to leave.
            let mut stored = StoredTask {
                seq: item.seq,
                task: item.task.clone(),
                as_stored: StoredTexts::default(),
            };
            stored.task.fail_dependency(dep, dep_state, tx.now)?;
            broken.push((stored, State::Blocked));
            broken_at.push(at);
        }
    }
    wait_for(tx, &deps_dep, &deps_dep_seq, &deps_task).await?;
    for ((stored, _), at) in broken.iter().zip(broken_at) {
        fresh[at].task = stored.task.clone();
    }
    tx.save(broken).await?;
    Ok(answers
        .into_iter()
        .map(|answer| match answer {
            Answer::Existing(task) => (task, false),
            Answer::Fresh(i, created) => (fresh[i].task.clone(), created),
        })
        .collect())
}

/// Whether `spec` may be enqueued by [`enqueue_plain`]: a task with a
/// unique key meets its key's holder, one with dependencies reads them.
pub(crate) fn is_plain(spec: &TaskSpec) -> bool {
    spec.unique_key.is_none() && spec.depends_on.is_empty()
}

/// Enqueues tasks that are all [`is_plain`] in one statement
/// ([`crate::sql::ENQUEUE_PLAIN`]), outside any transaction: the
/// statement is one. Answers the tasks and what they change besides their
/// rows, to announce in this process once the statement has answered.
pub(crate) async fn enqueue_plain(
    conn: &mut PgConnection,
    node: &Node,
    specs: &[TaskSpec],
) -> PgResult<(Vec<(Task, bool)>, Changes)> {
    let now = node.clock.now();
    let mut changes = Changes::default();
    let n = specs.len();
    let mut tasks = Vec::with_capacity(n);
    let mut queue_names = Vec::with_capacity(n);
    let mut columns = NewTaskColumns::with_capacity(n);
    for spec in specs {
        debug_assert!(is_plain(spec));
        // The id is the statement's to make, from the seq it takes.
        let task = Task::new_from_spec(Uuid::nil(), spec.clone(), now, false);
        if !matches!(task.state, State::Pending | State::Scheduled) {
            return Err(Error::Storage(format!(
                "a new task without dependencies is pending or scheduled, not {}",
                task.state
            ))
            .into());
        }
        changes.count(&task.queue, &task.task_type, None, Some(task.state));
        queue_names.push(task.queue.clone());
        columns.push(&task)?;
        tasks.push(task);
    }
    queue_names.sort();
    queue_names.dedup();
    // Taken before the tasks' events, which the statement announces to
    // the other nodes itself, by the ids it makes.
    let notifications = changes.take_notifications(&node.id);
    let (count_queues, count_types, count_states, count_deltas) = changes.count_rows();
    let statement = sqlx::query(crate::sql::ENQUEUE_PLAIN)
        .bind(queue_names)
        .bind(now.as_millis());
    let answer = columns
        .bind(statement)
        .bind(count_queues)
        .bind(count_types)
        .bind(count_states)
        .bind(count_deltas)
        .bind(&node.channel)
        .bind(notifications)
        .bind(changed_prefix(&node.id))
        .bind(crate::sql::CHANGED_PER_NOTIFICATION)
        .fetch_one(&mut *conn)
        .await?;
    let seqs: Vec<i64> = answer.try_get(0)?;
    if seqs.len() != tasks.len() {
        return Err(Error::Storage(format!(
            "{} tasks enqueued answered with {} seqs",
            tasks.len(),
            seqs.len()
        ))
        .into());
    }
    for (task, seq) in tasks.iter_mut().zip(seqs) {
        task.id = id_carrying_seq(now, seq);
        changes.event(&node.hub, EventKind::State, task);
    }
    Ok((
        tasks.into_iter().map(|task| (task, true)).collect(),
        changes,
    ))
}

/// Records that each task of `task_seqs` waits for the dependency beside
/// it, not yet completed, so that its completion unblocks the task.
async fn wait_for(
    tx: &mut Tx,
    dep_ids: &[Uuid],
    dep_seqs: &[i64],
    task_seqs: &[i64],
) -> PgResult<()> {
    if dep_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO offload_task_deps (dep_id, dep_seq, task_seq) \
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) ON CONFLICT DO NOTHING",
    )
    .bind(dep_ids)
    .bind(dep_seqs)
    .bind(task_seqs)
    .execute(&mut *tx.conn)
    .await?;
    Ok(())
}

/// The dependencies `specs` name, by id, locked so that none can finish
/// unseen while the enqueue records that tasks wait for them: one
/// statement for a batch, where one a task made a batch of 1,000
/// dependents 1,000 round trips.
async fn dependencies_of<'s>(
    tx: &mut Tx,
    specs: impl Iterator<Item = &'s TaskSpec>,
) -> PgResult<HashMap<Uuid, StoredTask>> {
    let mut named: Vec<Uuid> = specs.flat_map(|s| s.depends_on.iter().copied()).collect();
    if named.is_empty() {
        return Ok(HashMap::new());
    }
    named.sort_unstable();
    named.dedup();
    ids::find(&mut tx.conn, &named, Lock::Share).await
}

/// Where a new task's dependencies leave it.
struct Standing {
    /// Dependencies not yet completed: id and seq.
    unmet: Vec<(Uuid, i64)>,
    /// One that already failed or was cancelled, if any.
    broken: Option<(Uuid, State)>,
}

/// Where the dependencies of `spec` among those `found` leave it.
fn dependencies(spec: &TaskSpec, found: &HashMap<Uuid, StoredTask>) -> PgResult<Standing> {
    let mut unmet = Vec::new();
    let mut broken = None;
    for (i, dep) in spec.depends_on.iter().enumerate() {
        let Some(stored) = found.get(dep) else {
            return Err(Error::invalid(
                spec.position.field(format_args!("depends_on[{i}]")),
                format!("no task with id {dep}"),
            )
            .into());
        };
        match stored.task.state {
            State::Completed => {}
            s @ (State::Failed | State::Cancelled) => broken = Some((*dep, s)),
            _ => unmet.push((*dep, stored.seq)),
        }
    }
    Ok(Standing { unmet, broken })
}

/// The columns a new task's row takes from the task alone, an array each
/// as `UNNEST` takes them: `$3`–`$12` of both statements that insert
/// tasks ([`insert`], [`crate::sql::ENQUEUE_PLAIN`]).
struct NewTaskColumns {
    task_type: Vec<String>,
    queue: Vec<String>,
    payload: Vec<String>,
    priority: Vec<i16>,
    state: Vec<i16>,
    max_attempts: Vec<i32>,
    timeout_secs: Vec<i32>,
    run_at: Vec<i64>,
    owner: Vec<Option<String>>,
    labels: Vec<Option<String>>,
}

impl NewTaskColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            task_type: Vec::with_capacity(n),
            queue: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            priority: Vec::with_capacity(n),
            state: Vec::with_capacity(n),
            max_attempts: Vec::with_capacity(n),
            timeout_secs: Vec::with_capacity(n),
            run_at: Vec::with_capacity(n),
            owner: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, task: &Task) -> PgResult<()> {
        self.task_type.push(task.task_type.clone());
        self.queue.push(task.queue.clone());
        self.payload.push(task.payload.get().to_owned());
        self.priority.push(task.priority as i16);
        self.state.push(task.state.code() as i16);
        self.max_attempts.push(task.max_attempts as i32);
        self.timeout_secs.push(task.timeout_secs as i32);
        self.run_at.push(task.run_at.as_millis());
        self.owner.push(task.owner.clone());
        self.labels.push(if task.labels.is_empty() {
            None
        } else {
            Some(encode_json(&task.labels)?)
        });
        Ok(())
    }

    /// `statement` with the columns bound next, in their order.
    fn bind(self, statement: PgQuery<'_>) -> PgQuery<'_> {
        statement
            .bind(self.task_type)
            .bind(self.queue)
            .bind(self.payload)
            .bind(self.priority)
            .bind(self.state)
            .bind(self.max_attempts)
            .bind(self.timeout_secs)
            .bind(self.run_at)
            .bind(self.owner)
            .bind(self.labels)
    }
}

async fn insert(tx: &mut Tx, fresh: &[Fresh]) -> PgResult<()> {
    if fresh.is_empty() {
        return Ok(());
    }
    let n = fresh.len();
    let mut seq = Vec::with_capacity(n);
    let mut id = Vec::with_capacity(n);
    let mut columns = NewTaskColumns::with_capacity(n);
    let mut unique_key = Vec::with_capacity(n);
    let mut depends_on = Vec::with_capacity(n);
    let mut error = Vec::with_capacity(n);
    let mut finished_at = Vec::with_capacity(n);
    for item in fresh {
        let t = &item.task;
        seq.push(item.seq);
        id.push(t.id);
        columns.push(t)?;
        unique_key.push(t.unique_key.clone());
        // Arrays of arrays do not unnest; the ids go as JSON text.
        depends_on.push(if t.depends_on.is_empty() {
            None
        } else {
            Some(encode_json(&t.depends_on)?)
        });
        error.push(t.error.as_ref().map(encode_json).transpose()?);
        finished_at.push(t.finished_at.map(|f| f.as_millis()));
    }
    let statement = sqlx::query(crate::sql::INSERT_TASKS_RECORDING_CHANGES)
        .bind(seq)
        .bind(id);
    let statement = columns
        .bind(statement)
        .bind(unique_key)
        .bind(depends_on)
        .bind(error)
        .bind(finished_at)
        .bind(tx.now.as_millis());
    tx.fetch_recording(statement).await?;
    Ok(())
}

// ---- claiming ---------------------------------------------------------------

/// A claim's tasks, and whether ready tasks it did not take may remain
/// (as [`offload_core::Claim::Now`] tells waiting fetches).
pub(crate) struct Claimed {
    pub tasks: Vec<Task>,
    pub more: bool,
}

/// Candidates a claim admitted, each with its payload's size, and whether
/// it saw ready tasks past them (or cannot tell).
type Admitted = (Vec<(StoredTask, i32)>, bool);

/// Whether a claim may take its turn on limited queues' rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QueueTurn {
    /// It may: the transaction's first claim.
    Now,
    /// Not after another claim of the transaction took one: a later one
    /// would lock its queues' rows out of the name order every claim takes
    /// them in, and could wait on another node's claim that waits on it.
    NotAfterAnother,
}

pub(crate) async fn claim(tx: &mut Tx, req: &ClaimRequest) -> PgResult<Claimed> {
    claim_together(tx, std::slice::from_ref(req), QueueTurn::Now)
        .await?
        .and_then(|mut claimed| claimed.pop())
        .ok_or_else(|| Error::Storage("a first claim put off".into()).into())
}

/// Claims for `requests` in one transaction: the claims of several
/// fetches gathered ([`crate::gather::Claims`]). Those that come one after
/// another asking for the same types and queues are made as one claim
/// ([`claim_together`]). Stops before the first after the first claim that
/// would take a turn on limited queues' rows ([`QueueTurn`]), before it
/// wrote anything; answers the claims it made, for the requests from the
/// first on, at least one.
pub(crate) async fn claims(tx: &mut Tx, requests: &[ClaimRequest]) -> PgResult<Vec<Claimed>> {
    let mut claimed = Vec::with_capacity(requests.len());
    let mut rest = requests;
    while let Some(first) = rest.first() {
        let alike = rest
            .iter()
            .take_while(|req| req.types == first.types && req.queues == first.queues)
            .count();
        let turn = if claimed.is_empty() {
            QueueTurn::Now
        } else {
            QueueTurn::NotAfterAnother
        };
        match claim_together(tx, &rest[..alike], turn).await? {
            Some(made) => claimed.extend(made),
            None => break,
        }
        rest = &rest[alike..];
    }
    Ok(claimed)
}

/// Claims for `requests`, which ask for the same types and queues, as one
/// claim of all they ask for: one walk of the pending tasks and one write
/// for them all, where a claim each took a round of statements each. The
/// tasks are dealt out in claim order, each request taking what its limit
/// and its page hold, so that each gets what it would have got claiming
/// alone, one after another. Or None where the claim would take a turn on
/// limited queues' rows it may not take (`turn`), before it wrote
/// anything.
async fn claim_together(
    tx: &mut Tx,
    requests: &[ClaimRequest],
    turn: QueueTurn,
) -> PgResult<Option<Vec<Claimed>>> {
    let asked: usize = requests.iter().map(|req| req.limit).sum();
    let Some(first) = requests.first().filter(|_| asked > 0) else {
        return Ok(Some(
            requests
                .iter()
                .map(|_| Claimed {
                    tasks: Vec::new(),
                    more: false,
                })
                .collect(),
        ));
    };
    let together = ClaimRequest {
        limit: asked,
        ..first.clone()
    };
    let admitted = match pending_pairs(tx, &together).await? {
        Some(pairs) => admit_from_pairs(tx, &together, pairs, turn).await?,
        None => admit_in_claim_order(tx, &together, turn).await?,
    };
    let Some((admitted, more)) = admitted else {
        return Ok(None);
    };
    let mut admitted = admitted.into_iter().peekable();
    let mut claimed = Vec::new();
    let mut unread_payloads = HashMap::new();
    // How many tasks each request took, and whether its page was full.
    let mut dealt = Vec::with_capacity(requests.len());
    for req in requests {
        let mut page = PageFill::new(req.limit);
        let mut took = 0;
        while let Some((mut stored, payload_bytes)) = admitted.next_if(|(stored, payload_bytes)| {
            let read = stored.task.payload.get().len();
            page.take_sized(stored.task.bulk_bytes() - read + *payload_bytes as usize)
        }) {
            if payload_bytes > CANDIDATE_PAYLOAD_BYTES {
                unread_payloads.insert(stored.seq, claimed.len());
            }
            stored.task.claim(&req.worker_id, req.lease, tx.now)?;
            claimed.push((stored, State::Pending));
            took += 1;
        }
        // Stopped with tasks left: the page refused the next.
        let full = admitted.peek().is_some();
        dealt.push((took, full));
    }
    if !unread_payloads.is_empty() {
        let seqs: Vec<i64> = unread_payloads.keys().copied().collect();
        let rows = sqlx::query("SELECT seq, payload FROM offload_tasks WHERE seq = ANY($1)")
            .bind(&seqs)
            .fetch_all(&mut *tx.conn)
            .await?;
        for row in rows {
            let at = unread_payloads[&row.try_get::<i64, _>("seq")?];
            claimed[at].0.task.payload = payload(&row)?;
        }
    }
    let tasks: Vec<Task> = claimed.iter().map(|(s, _)| s.task.clone()).collect();
    let mut tasks = tasks.into_iter();
    tx.save(claimed).await?;
    let mut answers = Vec::with_capacity(dealt.len());
    for (at, &(took, full)) in dealt.iter().enumerate() {
        // Tasks a later request took were ready past this one's.
        let taken_later = dealt[at + 1..].iter().any(|&(later, _)| later > 0);
        answers.push(Claimed {
            tasks: tasks.by_ref().take(took).collect(),
            more: more || full || taken_later,
        });
    }
    Ok(Some(answers))
}

/// A claim's first tasks in claim order, each with its payload's size,
/// among the pending tasks of `pairs` (sorted by queue): the free queues'
/// and each limited queue's within its room, in one walk across them.
async fn admit_from_pairs(
    tx: &mut Tx,
    req: &ClaimRequest,
    pairs: Vec<PendingPair>,
    turn: QueueTurn,
) -> PgResult<Option<Admitted>> {
    let mut free: Vec<(String, String)> = Vec::new();
    let mut limited: Vec<(String, i32, Vec<String>)> = Vec::new();
    for pair in pairs {
        match pair.concurrency {
            _ if pair.paused => {}
            Some(limit) => match limited.last_mut() {
                Some((last, _, types)) if *last == pair.queue => types.push(pair.task_type),
                _ => limited.push((pair.queue, limit, vec![pair.task_type])),
            },
            None => free.push((pair.queue, pair.task_type)),
        }
    }
    // The pairs to claim from, each in a group with room of its own: the
    // free queues' in the first, whose room is the claim's, each limited
    // queue's in one of its own.
    let mut claimed: Vec<(String, String)> = Vec::new();
    let mut group_of: Vec<usize> = Vec::new();
    let mut rooms: Vec<usize> = Vec::new();
    if !free.is_empty() {
        rooms.push(req.limit);
        for (queue, task_type) in free {
            claimed.push((queue, task_type));
            group_of.push(0);
        }
    }
    // Claims on a limited queue take turns on its row, so that two nodes
    // cannot both see its last free slot; the rows are locked, and the
    // running tasks counted, for all of them at once (two statements a
    // queue took a claim among 1,000 full queues 93 ms), the rows in name
    // order as every claim takes them.
    if !limited.is_empty() {
        if turn == QueueTurn::NotAfterAnother {
            return Ok(None);
        }
        let names: Vec<&str> = limited.iter().map(|(name, _, _)| name.as_str()).collect();
        sqlx::query("SELECT 1 FROM offload_queues WHERE name = ANY($1) ORDER BY name FOR UPDATE")
            .bind(&names)
            .execute(&mut *tx.conn)
            .await?;
        let running = running_in_queues(tx, &names).await?;
        for (name, limit, types) in limited {
            let running = running.get(&name).copied().unwrap_or(0);
            let room = usize::try_from(i64::from(limit) - running)
                .unwrap_or(0)
                .min(req.limit);
            if room == 0 {
                continue;
            }
            let group = rooms.len();
            rooms.push(room);
            for task_type in types {
                claimed.push((name.clone(), task_type));
                group_of.push(group);
            }
        }
    }
    if claimed.is_empty() {
        return Ok(Some((Vec::new(), false)));
    }
    let (rows, more) = candidates_of_pairs(tx, &claimed, &group_of, &rooms, req.limit).await?;
    let candidates: Vec<_> = rows
        .iter()
        .map(|(row, group)| candidate(row, *group))
        .collect::<PgResult<_>>()?;
    let locked = candidates.len();
    let admitted = admit(candidates, rooms, req.limit);
    let more = more || admitted.len() < locked;
    Ok(Some((admitted, more)))
}

/// A pending task's row read with [`CANDIDATE_COLUMNS`], as a candidate of
/// the claim's `queue`th queue, with its payload's size.
fn candidate(row: &sqlx::postgres::PgRow, queue: usize) -> PgResult<Candidate<(StoredTask, i32)>> {
    let stored = decode(row)?;
    let payload_bytes: i32 = row.try_get("payload_bytes")?;
    Ok(Candidate {
        queue,
        priority: stored.task.priority,
        run_at: stored.task.run_at,
        position: stored.seq,
        item: (stored, payload_bytes),
    })
}

/// The rows of the tasks `seqs` still pending, locked, but for those
/// another claim holds.
async fn lock_pending(tx: &mut Tx, seqs: &[i64]) -> PgResult<Vec<sqlx::postgres::PgRow>> {
    Ok(sqlx::query(&format!(
        "SELECT {CANDIDATE_COLUMNS} FROM offload_tasks WHERE {} FOR UPDATE SKIP LOCKED",
        crate::sql::PENDING_BY_SEQ
    ))
    .bind(seqs)
    .bind(State::Pending.code() as i16)
    .fetch_all(&mut *tx.conn)
    .await?)
}

/// The rows of the first `room` pending tasks in claim order among those
/// of the (queue, type) `pairs` that no other claim holds, at most
/// `rooms[g]` of the pairs of group `g` (`group_of` each pair), locked,
/// each with its group.
///
/// Of several types, locking `room` rows of each was most of a claim's
/// cost: a burn-down of 20,000 tasks of 20 types, fetched 500 at a time,
/// ran at 6.9k tasks a second where one type ran at 17.9k. So it picks the
/// first in claim order among them all, unlocked and without their rows,
/// and locks those; where another claim holds some, it picks as many more
/// past every task it tried, until it has `room` or none is left. Locking
/// `room` of each pair instead, when four fetchers each claimed 1,000 from
/// the same 1,000 queues, locked every pending task of them (66 ms a
/// claim) and kept the others' claims and acks waiting; and a statement a
/// limited queue took a claim among 1,000 of them 148 ms.
async fn candidates_of_pairs(
    tx: &mut Tx,
    pairs: &[(String, String)],
    group_of: &[usize],
    rooms: &[usize],
    room: usize,
) -> PgResult<(Vec<(sqlx::postgres::PgRow, usize)>, bool)> {
    let of_group = |(rows, more): (Vec<_>, bool), group| {
        (rows.into_iter().map(|row| (row, group)).collect(), more)
    };
    if let [(queue, task_type)] = pairs {
        let first = first_pending_of_pair(tx, queue, task_type, room.min(rooms[group_of[0]]));
        return Ok(of_group(first.await?, group_of[0]));
    }
    let mut taken = Vec::new();
    let mut left = rooms.to_vec();
    let mut tried = Tried {
        seqs: HashSet::new(),
        of_pair: vec![0; pairs.len()],
    };
    while taken.len() < room {
        let first =
            match first_pending_of_pairs(tx, pairs, group_of, &left, room - taken.len(), &tried)
                .await?
            {
                FirstPending::Picked(first) => first,
                FirstPending::OnlyOf(t) => {
                    let (queue, task_type) = &pairs[t];
                    let each = room.min(rooms[group_of[t]]);
                    let first = first_pending_of_pair(tx, queue, task_type, each).await?;
                    return Ok(of_group(first, group_of[t]));
                }
            };
        if first.is_empty() {
            break;
        }
        let seqs: Vec<i64> = first.iter().map(|(seq, _)| *seq).collect();
        let pair_of: HashMap<i64, usize> = first.iter().copied().collect();
        for (seq, pair) in first {
            tried.seqs.insert(seq);
            tried.of_pair[pair] += 1;
        }
        for row in lock_pending(tx, &seqs).await? {
            let group = group_of[pair_of[&row.try_get::<i64, _>("seq")?]];
            left[group] -= 1;
            taken.push((row, group));
        }
    }
    // Across pairs it cannot tell cheaply.
    let more = taken.len() >= room;
    Ok((taken, more))
}

/// The rows of the first `room` pending tasks of `queue` and `task_type`
/// in claim order that no other claim holds, locked; and whether the pair
/// has pending tasks past them (those other claims hold count), looked
/// for among its first [`LEFT_BEHIND_LOOK`] and one.
async fn first_pending_of_pair(
    tx: &mut Tx,
    queue: &str,
    task_type: &str,
    room: usize,
) -> PgResult<(Vec<sqlx::postgres::PgRow>, bool)> {
    let look = room.min(LEFT_BEHIND_LOOK) + 1;
    let rows = sqlx::query(&crate::sql::first_pending_of_pair())
        .bind(queue)
        .bind(task_type)
        .bind(room as i64)
        .bind(look as i64)
        .fetch_all(&mut *tx.conn)
        .await?;
    let more = match rows.first() {
        None => false,
        Some(_) if rows.len() >= LEFT_BEHIND_LOOK => true,
        Some(first) => first.try_get::<i64, _>("pending_seen")? > rows.len() as i64,
    };
    Ok((rows, more))
}

/// How far past the tasks it locked a claim of one pair looks to tell
/// whether it left ready tasks behind, and so whether to wake other
/// fetches waiting; one that locked this many is taken to have. Small:
/// what it saves is the waste of claims that each take a task or a few.
const LEFT_BEHIND_LOOK: usize = 16;

/// What a claim's read of its pairs' first pending tasks, unlocked, found.
enum FirstPending {
    /// The seqs of the first in claim order, each with its pair.
    Picked(Vec<(i64, usize)>),
    /// One pair alone has pending tasks: the claim locks its first, as one
    /// of that pair alone would, stepping over other claims' as it goes.
    /// Picked unlocked, two workers fetching the same tasks of one type
    /// over two queues, one of them empty, picked the same tasks, and the
    /// one that lost to the other's locks read and picked again: 24.7–38.5k
    /// tasks a second where one queue ran at 41.7–54.7k.
    OnlyOf(usize),
}

/// The tasks a claim tried to lock, which it passes over when it reads
/// more: their seqs, and how many are of each pair.
struct Tried {
    seqs: HashSet<i64>,
    of_pair: Vec<usize>,
}

/// The seqs of the first `room` pending tasks in claim order among those
/// of the (queue, type) `pairs` not `tried`, at most `rooms[g]` of the
/// pairs of group `g`, each with the index of its pair, unlocked: a walk
/// of offload_tasks_ready_by_type for each pair, merged. Or, when nothing
/// has been tried yet and its first read finds one pair alone with
/// pending tasks, that pair.
///
/// A walk of `room` entries of each type would always be enough, and was
/// most of a claim's cost over many types: 50,000 tasks of 200 types,
/// fetched 500 at a time, ran at 10.1k tasks a second where one type ran
/// at 21.5k. So each walk first reads a fair share of `room` (at most its
/// group's room) and one entry more, past the pair's tasks tried. A type
/// whose last entry read is not among those picked has nothing more that
/// would be (its others come after it); one whose last entry is among
/// them is read again, four times as far.
async fn first_pending_of_pairs(
    tx: &mut Tx,
    pairs: &[(String, String)],
    group_of: &[usize],
    rooms: &[usize],
    room: usize,
    tried: &Tried,
) -> PgResult<FirstPending> {
    #[derive(Clone, Copy)]
    struct Entry {
        priority: i16,
        run_at: i64,
        seq: i64,
    }
    let share = room.div_ceil(pairs.len());
    // The most a pair's walk reads: past that many entries not tried, the
    // last comes after the first the pair or its group may give, so it is
    // never picked.
    let most = |t: usize| room.min(rooms[group_of[t]]) + 1 + tried.of_pair[t];
    let mut walks: Vec<usize> = (0..pairs.len())
        .map(|t| share.min(rooms[group_of[t]]) + 1 + tried.of_pair[t])
        .collect();
    // Entries not tried, and how many the walk read, of each pair.
    let mut read: Vec<Vec<Entry>> = vec![Vec::new(); pairs.len()];
    let mut walked = vec![0; pairs.len()];
    let mut to_read: Vec<usize> = (0..pairs.len())
        .filter(|&t| rooms[group_of[t]] > 0)
        .collect();
    let mut first_read = true;
    loop {
        if !to_read.is_empty() {
            let queues: Vec<&str> = to_read.iter().map(|&t| pairs[t].0.as_str()).collect();
            let types: Vec<&str> = to_read.iter().map(|&t| pairs[t].1.as_str()).collect();
            let limits: Vec<i64> = to_read.iter().map(|&t| walks[t] as i64).collect();
            let rows = sqlx::query(crate::sql::PENDING_OF_PAIRS)
                .bind(&queues)
                .bind(&types)
                .bind(&limits)
                .fetch_all(&mut *tx.conn)
                .await?;
            for &t in &to_read {
                read[t].clear();
                walked[t] = 0;
            }
            for row in &rows {
                let nth: i64 = row.try_get("nth")?;
                let t = to_read[nth as usize - 1];
                walked[t] += 1;
                let seq = row.try_get("seq")?;
                if !tried.seqs.contains(&seq) {
                    read[t].push(Entry {
                        priority: row.try_get("priority")?,
                        run_at: row.try_get("run_at")?,
                        seq,
                    });
                }
            }
        }
        // Every pair with room was read: one that gave nothing has nothing.
        if first_read && tried.seqs.is_empty() {
            let mut with_tasks = (0..pairs.len()).filter(|&t| walked[t] > 0);
            if let (Some(t), None) = (with_tasks.next(), with_tasks.next()) {
                return Ok(FirstPending::OnlyOf(t));
            }
        }
        first_read = false;
        let mut all: Vec<(Entry, usize)> = read
            .iter()
            .enumerate()
            .flat_map(|(t, entries)| entries.iter().map(move |e| (*e, t)))
            .collect();
        all.sort_unstable_by_key(|(e, _)| (std::cmp::Reverse(e.priority), e.run_at, e.seq));
        let mut picked = Vec::with_capacity(room);
        let mut kept = vec![0; pairs.len()];
        let mut left = rooms.to_vec();
        for (entry, t) in all {
            if picked.len() == room {
                break;
            }
            if left[group_of[t]] > 0 {
                left[group_of[t]] -= 1;
                kept[t] += 1;
                picked.push((entry.seq, t));
            }
        }
        // At its most, a pair's walk has read an entry it does not pick.
        to_read = (0..pairs.len())
            .filter(|&t| walked[t] == walks[t] && kept[t] == read[t].len() && walks[t] < most(t))
            .collect();
        if to_read.is_empty() {
            return Ok(FirstPending::Picked(picked));
        }
        for &t in &to_read {
            walks[t] = (walks[t] * 4).min(most(t));
        }
    }
}

/// A (queue, type) with pending tasks, and its queue's settings.
struct PendingPair {
    queue: String,
    task_type: String,
    paused: bool,
    concurrency: Option<i32>,
}

/// A row of `offload_queues`: its name, `paused` and `concurrency`.
type QueueSettings = (String, bool, Option<i32>);

impl PendingPair {
    /// The pairs of `queue` and each of `types`, with the queue's settings.
    fn of_queue(
        (queue, paused, concurrency): QueueSettings,
        types: Vec<String>,
    ) -> impl Iterator<Item = PendingPair> {
        types.into_iter().map(move |task_type| PendingPair {
            queue: queue.clone(),
            task_type,
            paused,
            concurrency,
        })
    }
}

/// The (queue, type) pairs with pending tasks that a claim asks for, by
/// queue: of the queues it names, or of few; `None` for a claim from all
/// of many queues, which [`admit_in_claim_order`] serves.
async fn pending_pairs(tx: &mut Tx, req: &ClaimRequest) -> PgResult<Option<Vec<PendingPair>>> {
    let wanted: HashSet<&str> = req.types.iter().map(String::as_str).collect();
    let mut types_named: Vec<String> = req.types.clone();
    types_named.sort_unstable();
    types_named.dedup();
    if req.queues.is_empty() && (1..=FEW_TYPES).contains(&types_named.len()) {
        // Among few queues, the types named are asked for in each: the
        // walk of the pending pairs cost a burn-down over one queue 8% of
        // its rate, stepping over the entries of the tasks just claimed.
        let queues: Vec<QueueSettings> = sqlx::query_as(
            "SELECT name, paused, concurrency FROM offload_queues ORDER BY name LIMIT $1",
        )
        .bind(FEW_QUEUES as i64 + 1)
        .fetch_all(&mut *tx.conn)
        .await?;
        if queues.len() <= FEW_QUEUES {
            return Ok(Some(
                queues
                    .into_iter()
                    .flat_map(|queue| PendingPair::of_queue(queue, types_named.clone()))
                    .collect(),
            ));
        }
    }
    if req.queues.is_empty() {
        return Ok(None);
    }
    let mut named: Vec<&String> = req.queues.iter().collect();
    named.sort_unstable();
    named.dedup();
    let settings = queue_settings(tx, &named).await?;
    // One walk of the types pending in the queues rather than a statement
    // for each type named (a fetch naming 50,000 types took 4 s), and one
    // statement for every queue rather than one a queue (a fetch naming
    // 1,000 queues took 88 ms).
    let walked = req.types.is_empty() || req.types.len() > FEW_TYPES;
    let mut pending = if walked {
        let unpaused: Vec<&str> = settings
            .iter()
            .filter(|(_, paused, _)| !paused)
            .map(|(queue, ..)| queue.as_str())
            .collect();
        pending_types(tx, &unpaused).await?
    } else {
        HashMap::new()
    };
    let mut pairs = Vec::new();
    for settings in settings {
        let (queue, paused, _) = &settings;
        let types = if *paused {
            Vec::new()
        } else if walked {
            let mut types = pending.remove(queue).unwrap_or_default();
            if !wanted.is_empty() {
                types.retain(|t| wanted.contains(t.as_str()));
            }
            types
        } else {
            types_named.clone()
        };
        pairs.extend(PendingPair::of_queue(settings, types));
    }
    Ok(Some(pairs))
}

/// Every (queue, type) with pending tasks of a type `req` asks for, with
/// its queue's settings, sorted by queue: a walk that visits every pair.
async fn all_pending_pairs(tx: &mut Tx, req: &ClaimRequest) -> PgResult<Vec<PendingPair>> {
    Ok(pending_pairs_up_to(tx, req, i64::MAX)
        .await?
        .unwrap_or_default())
}

/// As [`all_pending_pairs`], while there are at most `most` pending pairs
/// of any type; `None` past that, having walked `most + 1` of them.
async fn pending_pairs_up_to(
    tx: &mut Tx,
    req: &ClaimRequest,
    most: i64,
) -> PgResult<Option<Vec<PendingPair>>> {
    let wanted: HashSet<&str> = req.types.iter().map(String::as_str).collect();
    let pairs: Vec<(String, String, bool, Option<i32>)> = sqlx::query_as(crate::sql::PENDING_PAIRS)
        .bind(most)
        .fetch_all(&mut *tx.conn)
        .await?;
    if i64::try_from(pairs.len()).is_ok_and(|walked| walked > most) {
        return Ok(None);
    }
    Ok(Some(
        pairs
            .into_iter()
            .filter(|(_, t, _, _)| wanted.is_empty() || wanted.contains(t.as_str()))
            .map(|(queue, task_type, paused, concurrency)| PendingPair {
                queue,
                task_type,
                paused,
                concurrency,
            })
            .collect(),
    ))
}

/// A claim from all of many queues: its first tasks in claim order, each
/// with its payload's size.
///
/// Walking every pending (queue, type) took a claim of 1,000 among 100,000
/// queues, each with a task pending, 0.5–1.1 s. Instead it reads the first
/// pending tasks in claim order (`offload_tasks_claim_order`), a window of
/// them. Of free queues only, it locks the first it may take that no other
/// claim holds, as `SKIP LOCKED` would. Past the first task of a limited
/// queue, it claims from the pairs the window holds as from named pairs:
/// the claim from all pairs when the window holds as many tasks as it asks
/// for, each limited queue's counted up to its room, or every pending task
/// (a pair outside the window has nothing before the window's end). While
/// it does not (tasks of other types, paused queues, limited queues without
/// room, or tasks other claims hold fill it), the window grows fourfold, up
/// to [`CLAIM_WINDOW_MOST`] tasks, past which the claim walks every pair;
/// but when its first window is short of tasks it may take, paused or full
/// queues' among them, and at most [`FEW_PENDING_PAIRS`] pairs hold
/// pending tasks, it claims from those.
async fn admit_in_claim_order(
    tx: &mut Tx,
    req: &ClaimRequest,
    turn: QueueTurn,
) -> PgResult<Option<Admitted>> {
    let wanted: HashSet<&str> = req.types.iter().map(String::as_str).collect();
    let mut window = req.limit + 1;
    // The rows of free queues' tasks this claim locked, and every task it
    // tried to lock, across windows.
    let mut taken: Vec<sqlx::postgres::PgRow> = Vec::new();
    let mut tried: HashSet<i64> = HashSet::new();
    let mut pairs_counted = false;
    loop {
        let last_window = window >= CLAIM_WINDOW_MOST;
        let entries: Vec<(String, String, i16, i64, i64)> =
            sqlx::query_as(crate::sql::CLAIM_ORDER_WINDOW)
                .bind(window as i64)
                .fetch_all(&mut *tx.conn)
                .await?;
        let whole = entries.len() < window;
        if entries.is_empty() {
            return Ok(Some((Vec::new(), false)));
        }
        let mut queues: Vec<&str> = entries.iter().map(|(queue, ..)| queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        let settings: HashMap<String, (bool, Option<i32>)> = queue_settings(tx, &queues)
            .await?
            .into_iter()
            .map(|(name, paused, concurrency)| (name, (paused, concurrency)))
            .collect();
        let settings_of = |queue: &str| settings.get(queue).copied().unwrap_or((false, None));
        // The room of each limited queue in the window, read without
        // taking turns on the queues' rows: a claim takes its turn on them
        // once (`admit_from_pairs`), as one that locked some and then more
        // could deadlock with another doing the same.
        let limited: Vec<&str> = queues
            .iter()
            .copied()
            .filter(|queue| matches!(settings_of(queue), (false, Some(_))))
            .collect();
        let running = if limited.is_empty() {
            HashMap::new()
        } else {
            running_in_queues(tx, &limited).await?
        };
        // Tasks the window holds that the claim could take, each limited
        // queue's up to its room: while fewer than the claim asks for, the
        // window is too short.
        let mut takeable = 0;
        let mut counted: HashMap<&str, i64> = HashMap::new();
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        // The takeable tasks before the first of a limited queue, not yet
        // tried.
        let mut free_run: Vec<i64> = Vec::new();
        let mut limited_seen = false;
        // Whether tasks of a paused queue, or of a limited one past its
        // room, are in the window.
        let mut held_back = false;
        for (queue, task_type, _, _, seq) in &entries {
            if !wanted.is_empty() && !wanted.contains(task_type.as_str()) {
                continue;
            }
            let (paused, concurrency) = settings_of(queue);
            if paused {
                held_back = true;
                continue;
            }
            pairs.push((queue, task_type));
            let count = counted.entry(queue).or_default();
            let room = |limit: i32| i64::from(limit) - running.get(queue).copied().unwrap_or(0);
            if concurrency.is_none_or(|limit| *count < room(limit)) {
                *count += 1;
                takeable += 1;
                limited_seen |= concurrency.is_some();
                if !limited_seen && !tried.contains(seq) {
                    free_run.push(*seq);
                }
            } else {
                held_back = true;
            }
        }
        if !whole && takeable < req.limit {
            if last_window {
                let pairs = all_pending_pairs(tx, req).await?;
                return admit_from_pairs(tx, req, pairs, turn).await;
            }
            // A paused queue's backlog, or a full limited queue's, fills
            // the window's front: every claim would read it again in ever
            // larger windows, 13.5 ms a claim behind 100,000 of a paused
            // queue's. Among few pairs, it claims from each pair's own
            // first tasks instead. (Not for other types' tasks alone,
            // which a larger window passes sooner than a walk of pairs.)
            if held_back && taken.is_empty() && !pairs_counted {
                pairs_counted = true;
                if let Some(pairs) = pending_pairs_up_to(tx, req, FEW_PENDING_PAIRS).await? {
                    return admit_from_pairs(tx, req, pairs, turn).await;
                }
            }
            window = (window * 4).min(CLAIM_WINDOW_MOST);
            continue;
        }
        let mut next = 0;
        while taken.len() < req.limit && next < free_run.len() {
            let upto = (next + req.limit - taken.len()).min(free_run.len());
            tried.extend(&free_run[next..upto]);
            taken.extend(lock_pending(tx, &free_run[next..upto]).await?);
            next = upto;
        }
        if taken.len() == req.limit || (whole && !limited_seen) {
            let candidates = taken
                .iter()
                .map(|row| candidate(row, 0))
                .collect::<PgResult<_>>()?;
            // The window holds one task more than the claim asks for:
            // what it could take past what it took, other claims' among
            // them, is left behind.
            let more = takeable > taken.len();
            return Ok(Some((admit(candidates, vec![req.limit], req.limit), more)));
        }
        if limited_seen {
            pairs.sort_unstable();
            pairs.dedup();
            let pairs = pairs
                .into_iter()
                .map(|(queue, task_type)| {
                    let (paused, concurrency) = settings_of(queue);
                    PendingPair {
                        queue: queue.to_owned(),
                        task_type: task_type.to_owned(),
                        paused,
                        concurrency,
                    }
                })
                .collect();
            // The claim's one turn on the limited queues' rows: what it
            // admits is the claim from all pairs unless another claim took
            // some of their room since it was read, when it takes fewer, or
            // later ones of the window's pairs, rather than take a second
            // turn.
            return admit_from_pairs(tx, req, pairs, turn).await;
        }
        if last_window {
            let pairs = all_pending_pairs(tx, req).await?;
            return admit_from_pairs(tx, req, pairs, turn).await;
        }
        window = (window * 4).min(CLAIM_WINDOW_MOST);
    }
}

/// The number of running tasks of each of `queues` that has any.
async fn running_in_queues(tx: &mut Tx, queues: &[&str]) -> PgResult<HashMap<String, i64>> {
    Ok(sqlx::query_as(
        "SELECT queue, COUNT(*) FROM offload_tasks WHERE state = 3 AND queue = ANY($1) \
         GROUP BY queue",
    )
    .bind(queues)
    .fetch_all(&mut *tx.conn)
    .await?
    .into_iter()
    .collect())
}

/// The settings of those of `names` that have a row, in name order.
async fn queue_settings<S: AsRef<str>>(tx: &mut Tx, names: &[S]) -> PgResult<Vec<QueueSettings>> {
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    Ok(sqlx::query_as(
        "SELECT name, paused, concurrency FROM offload_queues WHERE name = ANY($1) ORDER BY name",
    )
    .bind(&names)
    .fetch_all(&mut *tx.conn)
    .await?)
}

/// The largest window of pending tasks a claim from all of many queues
/// reads in claim order before it walks every pending pair instead.
const CLAIM_WINDOW_MOST: usize = 16_384;

/// The types with pending tasks in each of `queues`, sorted, by queue.
async fn pending_types(tx: &mut Tx, queues: &[&str]) -> PgResult<HashMap<String, Vec<String>>> {
    let mut types: Vec<(String, String)> = sqlx::query_as(crate::sql::PENDING_TYPES_OF_QUEUES)
        .bind(queues)
        .fetch_all(&mut *tx.conn)
        .await?;
    types.sort_unstable();
    let mut by_queue: HashMap<String, Vec<String>> = HashMap::new();
    for (queue, task_type) in types {
        by_queue.entry(queue).or_default().push(task_type);
    }
    Ok(by_queue)
}

// ---- the worker's reports ---------------------------------------------------

/// Heartbeats of one transaction, each answered apart: one refused (its
/// worker no longer holds the task, its progress too large) leaves the
/// others as they are. A task heartbeated twice takes both, in order.
pub(crate) async fn heartbeats(
    tx: &mut Tx,
    requests: &[HeartbeatRequest],
) -> PgResult<Vec<offload_core::Result<HeartbeatAck>>> {
    let ids: Vec<Uuid> = requests.iter().map(|req| req.id).collect();
    let mut loaded = tx.load_for_update(&ids).await?;
    let mut changed = HashSet::new();
    let mut outcomes = Vec::with_capacity(requests.len());
    for req in requests {
        let Some(stored) = loaded.get_mut(&req.id) else {
            outcomes.push(Err(Error::task_not_found(req.id)));
            continue;
        };
        let beat = req
            .progress
            .clone()
            .map(|p| p.checked(&tx.node.limits))
            .transpose()
            .and_then(|progress| {
                let reported = progress.is_some();
                stored
                    .task
                    .heartbeat(&req.worker_id, req.lease, progress, tx.now)?;
                Ok(reported)
            });
        outcomes.push(beat.map(|reported| {
            if reported {
                tx.event(EventKind::Progress, &stored.task);
            }
            changed.insert(req.id);
            HeartbeatAck {
                cancel_requested: stored.task.cancel_requested,
                lease_expires_at: stored.task.lease_expires_at.unwrap_or(tx.now),
            }
        }));
    }
    let written: Vec<&StoredTask> = loaded
        .values()
        .filter(|stored| changed.contains(&stored.task.id))
        .collect();
    tx.write_rows(&written).await?;
    Ok(outcomes)
}

pub(crate) async fn ack(tx: &mut Tx, worker_id: &str, acks: Vec<Ack>) -> PgResult<Vec<AckOutcome>> {
    ack_from(tx, acks.into_iter().map(|ack| (worker_id, ack)).collect()).await
}

/// [`ack`] of acks each sent by the worker beside it, applied in their
/// order: of two acks of one task, the second meets what the first left.
pub(crate) async fn ack_from(tx: &mut Tx, acks: Vec<(&str, Ack)>) -> PgResult<Vec<AckOutcome>> {
    let ids: Vec<Uuid> = acks.iter().map(|(_, ack)| ack.id()).collect();
    let mut loaded = tx.load_for_update(&ids).await?;
    let mut outcomes = Vec::with_capacity(acks.len());
    let mut changed: Vec<Uuid> = Vec::new();
    let mut before: HashMap<Uuid, State> = HashMap::new();
    for (worker_id, ack) in acks {
        let id = ack.id();
        let Some(stored) = loaded.get_mut(&id) else {
            outcomes.push(Err(Error::task_not_found(id)));
            continue;
        };
        let state = stored.task.state;
        let outcome = match ack {
            Ack::Complete { result, .. } => result
                .as_ref()
                .map_or(Ok(()), |r| check_json("result", r, &tx.node.limits))
                .and_then(|()| stored.task.complete(worker_id, result, tx.now)),
            Ack::Fail { failure, .. } => {
                let failure = failure.into_attempt_failure();
                stored
                    .task
                    .fail(worker_id, failure, &tx.node.backoff, tx.now)
            }
        };
        match outcome {
            Ok(()) => {
                // The first ack of an id in the batch records where it came from.
                if let std::collections::hash_map::Entry::Vacant(first) = before.entry(id) {
                    first.insert(state);
                    changed.push(id);
                }
                outcomes.push(Ok(stored.task.clone()));
            }
            Err(e) => outcomes.push(Err(e)),
        }
    }
    let to_save = changed
        .into_iter()
        .filter_map(|id| loaded.remove(&id).map(|s| (s, before[&id])))
        .collect();
    tx.save(to_save).await?;
    Ok(outcomes)
}

// ---- actions on one task -----------------------------------------------------

pub(crate) async fn cancel(tx: &mut Tx, id: Uuid) -> PgResult<Task> {
    let mut stored = load_one(tx, id).await?;
    let before = stored.task.state;
    if stored.task.cancel(tx.now)? == CancelEffect::Requested {
        tx.cancel_requested(id);
    }
    let task = stored.task.clone();
    tx.save(vec![(stored, before)]).await?;
    Ok(task)
}

pub(crate) async fn retry(tx: &mut Tx, id: Uuid) -> PgResult<Task> {
    let mut stored = load_one(tx, id).await?;
    let before = stored.task.state;
    // Locked as an enqueue locks them: none finishes unseen while the
    // retry records that it waits for them.
    let found = ids::find(&mut tx.conn, &stored.task.depends_on, Lock::Share).await?;
    let dependencies: Vec<(Uuid, Option<State>)> = stored
        .task
        .depends_on
        .iter()
        .map(|dep| (*dep, found.get(dep).map(|d| d.task.state)))
        .collect();
    stored.task.manual_retry(&dependencies, tx.now)?;
    if let Some(key) = stored.task.unique_key.clone() {
        let queue = stored.task.queue.as_str();
        lock_unique_keys(tx, [(queue, key.as_str())]).await?;
        if let Some(holder) = unique_key_holders(tx, &[(queue, key.as_str())])
            .await?
            .into_values()
            .next()
        {
            return Err(Error::Conflict(format!(
                "task {} in queue {queue:?} already holds unique_key {key:?}; retry is refused while it is active",
                holder.task.id
            ))
            .into());
        }
    }
    if stored.task.state == State::Blocked {
        let unmet: Vec<&StoredTask> = found
            .values()
            .filter(|d| d.task.state != State::Completed)
            .collect();
        let dep_ids: Vec<Uuid> = unmet.iter().map(|d| d.task.id).collect();
        let dep_seqs: Vec<i64> = unmet.iter().map(|d| d.seq).collect();
        wait_for(tx, &dep_ids, &dep_seqs, &vec![stored.seq; unmet.len()]).await?;
    }
    let task = stored.task.clone();
    tx.save(vec![(stored, before)]).await?;
    Ok(task)
}

pub(crate) async fn delete(tx: &mut Tx, id: Uuid) -> PgResult<()> {
    let stored = load_one(tx, id).await?;
    if stored.task.state.is_active() {
        return Err(Error::Conflict(format!(
            "task {id} is {}; only finished tasks can be deleted (cancel it first)",
            stored.task.state
        ))
        .into());
    }
    sqlx::query("DELETE FROM offload_tasks WHERE seq = $1")
        .bind(stored.seq)
        .execute(&mut *tx.conn)
        .await?;
    tx.count(
        &stored.task.queue,
        &stored.task.task_type,
        Some(stored.task.state),
        None,
    );
    Ok(())
}

/// Deletes up to `batch` tasks in finished `state` that finished at or
/// before `cutoff`.
pub(crate) async fn delete_finished(
    tx: &mut Tx,
    state: State,
    cutoff: Timestamp,
    batch: i64,
) -> PgResult<u64> {
    let rows = sqlx::query(crate::sql::DELETE_FINISHED)
        .bind(state.code() as i16)
        .bind(cutoff.as_millis())
        .bind(batch)
        .fetch_all(&mut *tx.conn)
        .await?;
    for row in &rows {
        let queue: String = row.try_get("queue")?;
        let task_type: String = row.try_get("type")?;
        tx.count(&queue, &task_type, Some(state), None);
    }
    Ok(rows.len() as u64)
}

// ---- queues -------------------------------------------------------------------

pub(crate) async fn update_queue(
    tx: &mut Tx,
    name: &str,
    patch: QueuePatch,
) -> PgResult<QueueInfo> {
    sqlx::query(
        "INSERT INTO offload_queues (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(tx.now.as_millis())
    .execute(&mut *tx.conn)
    .await?;
    if let Some(paused) = patch.paused {
        sqlx::query("UPDATE offload_queues SET paused = $1 WHERE name = $2")
            .bind(paused)
            .bind(name)
            .execute(&mut *tx.conn)
            .await?;
    }
    if let Some(concurrency) = patch.concurrency {
        sqlx::query("UPDATE offload_queues SET concurrency = $1 WHERE name = $2")
            .bind(concurrency.map(|c| c as i32))
            .bind(name)
            .execute(&mut *tx.conn)
            .await?;
    }
    tx.wake_workers();
    let row = sqlx::query("SELECT paused, concurrency FROM offload_queues WHERE name = $1")
        .bind(name)
        .fetch_one(&mut *tx.conn)
        .await?;
    let concurrency: Option<i32> = row.try_get("concurrency")?;
    Ok(QueueInfo {
        name: name.to_owned(),
        paused: row.try_get("paused")?,
        concurrency: concurrency.map(|c| c as u32),
        counts: Default::default(),
    })
}

// ---- background duties ------------------------------------------------------------

pub(crate) async fn promote_due(tx: &mut Tx) -> PgResult<PromoteReport> {
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE state = 1 AND run_at <= $1 \
         ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(tx.now.as_millis())
    .bind(DUTY_BATCH)
    .fetch_all(&mut *tx.conn)
    .await?;
    let mut due = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut stored = decode(row)?;
        stored.task.promote(tx.now)?;
        due.push((stored, State::Scheduled));
    }
    let promoted = due.len() as u64;
    tx.save(due).await?;
    let next_due: Option<i64> =
        sqlx::query_scalar("SELECT MIN(run_at) FROM offload_tasks WHERE state = 1")
            .fetch_one(&mut *tx.conn)
            .await?;
    Ok(PromoteReport {
        promoted,
        next_due_in: next_due.map(|due| tx.now.until(Timestamp::from_millis(due))),
    })
}

pub(crate) async fn recover_expired(tx: &mut Tx) -> PgResult<Vec<Task>> {
    let now = tx.now.as_millis();
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE state = 3 \
         AND (lease_expires_at <= $1 OR deadline_at <= $1) LIMIT $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(now)
    .bind(DUTY_BATCH)
    .fetch_all(&mut *tx.conn)
    .await?;
    let mut expired = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut stored = decode(row)?;
        let Some(kind) = stored.task.expired(tx.now) else {
            continue;
        };
        stored.task.expire(kind, &tx.node.backoff, tx.now)?;
        expired.push((stored, State::Running));
    }
    let recovered = expired.iter().map(|(s, _)| s.task.clone()).collect();
    tx.save(expired).await?;
    Ok(recovered)
}
