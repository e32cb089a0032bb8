//! The write operations. Each runs on the writer thread inside a savepoint of
//! the current group's transaction, reads the rows it needs, applies the
//! state machine of `offload-core` and writes back what changed.

use offload_core::{
    Ack, AckOutcome, CancelEffect, Candidate, ClaimRequest, ClearRequest, Error, EventKind,
    HeartbeatAck, HeartbeatRequest, PageFill, PromoteReport, QueueInfo, QueuePatch, Result,
    Retention, State, Task, TaskSpec, admit, check_json,
};
use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{OptionalExtension, params};
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use uuid::Uuid;

use crate::ids;
use crate::ready::ReadyKey;
use crate::row_writes::RowWrite;
use crate::rows::{Id, StoredTask, decode, json_text, opt_json_text, storage_error, task_columns};
use crate::seq_map::SeqMap;
use crate::shaped::{Shape, ShapedStatements};
use crate::sql;
use crate::writer::WriteCtx;

/// Rows read per duty pass; bounds how long one pass holds the writer.
const DUTY_BATCH: usize = 1000;

/// How long a streamed batch may leave the writer waiting for its next
/// chunk before it is abandoned: far more than reading one takes, but a
/// bound on how long a stalled sender can hold every other write back.
const STREAM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

type Sql<T> = rusqlite::Result<T>;

/// An operation's answer for a task that a later task of the same
/// operation replaced (`on_conflict: "replace"`, SPEC §1.2), or for the
/// holder a `keep` returned before that, was taken before the replacement:
/// it must say what holds when the operation answers, as the task is
/// cancelled by then.
fn restate_replaced(answers: &mut [(Task, bool)], replaced: &[Task]) {
    if replaced.is_empty() {
        return;
    }
    let by_id: HashMap<Uuid, &Task> = replaced.iter().map(|task| (task.id, task)).collect();
    for (task, _) in answers {
        if let Some(now) = by_id.get(&task.id) {
            *task = (*now).clone();
        }
    }
}

/// The queues an enqueue already made sure exist. A batch's tasks mostly
/// share a queue, so a task's is compared with the last one before the set
/// is asked: hashing every task's queue was ~2% of the writer's work for a
/// batch (perf). The set keeps SipHash, as the names are the caller's.
/// `last` starts empty, which no queue's name is.
#[derive(Default)]
struct KnownQueues {
    last: String,
    all: std::collections::HashSet<String>,
}

impl KnownQueues {
    /// Whether `queue` was seen before; it is known from now on.
    fn see(&mut self, queue: &str) -> bool {
        if self.last == queue {
            return true;
        }
        queue.clone_into(&mut self.last);
        !self.all.insert(queue.to_owned())
    }
}

impl WriteCtx<'_, '_> {
    // ---- reading and writing rows -------------------------------------

    /// Every row the writer reads passes through `Claims::overlay`, here,
    /// in `load_many`, `load` and `rows_by_seq`: a claimed task's row may
    /// still say pending (`claims.rs`).
    fn load_one(&mut self, sql: &str, params: impl rusqlite::Params) -> Result<Option<StoredTask>> {
        let mut found = self
            .conn()?
            .prepare_cached(sql)
            .and_then(|mut stmt| stmt.query_row(params, decode).optional())
            .map_err(storage_error)?;
        if let Some(stored) = &mut found {
            self.claims.overlay(stored)?;
        }
        Ok(found)
    }

    fn load_many(&mut self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<StoredTask>> {
        let conn = self.conn()?;
        let run = || -> Sql<Vec<StoredTask>> {
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(params, decode)?;
            rows.collect()
        };
        let mut found = run().map_err(storage_error)?;
        for stored in &mut found {
            self.claims.overlay(stored)?;
        }
        Ok(found)
    }

    /// A task read to be changed. A row read from the table may be one the
    /// writer keeps, and is forgotten there, as it is about to change.
    fn load(&mut self, id: Uuid) -> Result<StoredTask> {
        if let Some(stored) = self.claimed_rows.take(id) {
            return Ok(stored);
        }
        let mut stored = ids::find(
            self.conn()?,
            id,
            sql::TASK_BY_ID,
            sql::TASK_BY_ID_BEFORE_V4,
            decode,
        )
        .map_err(storage_error)?
        .ok_or_else(|| Error::task_not_found(id))?;
        self.claims.overlay(&mut stored)?;
        self.forget_kept(&stored);
        Ok(stored)
    }

    /// The writer keeps pending rows from their enqueue and running rows
    /// from their claim; a claim takes its pending rows out and `load` its
    /// running one, so a row read from the table any other way to be
    /// changed is forgotten here, where it is read, rather than on every
    /// write. Looking up rows the maps do not hold, once for each of a
    /// claim's and a completion's writes, was 5% of the writer's time
    /// through a burn-down (perf).
    fn forget_kept(&mut self, stored: &StoredTask) {
        match stored.task.state {
            State::Pending => self.pending_rows.forget(stored.seq),
            State::Running => self.claimed_rows.forget(stored.seq),
            _ => {}
        }
    }

    /// Writes back every column the state machine may change (buffered:
    /// see `row_writes`), for a row that was in state `before`. A claim
    /// leaves the row as it is and is recorded with its claim's others
    /// (`claims.rs`, [`Self::record_claim`]); any other write of a claimed
    /// task's row writes it whole and ends its claim's hold on it.
    fn write_row(&mut self, stored: &StoredTask, before: State) -> Result<()> {
        let t = &stored.task;
        if before == State::Pending && t.state == State::Running {
            self.claims.claiming.push((stored.seq, t.attempt));
        } else {
            self.write_back(RowWrite::of(stored.seq, t)?);
            if let Some(claim) = self.claims.written(stored.seq) {
                self.claims.closed.push(claim);
            }
        }
        // Claim order holds the pending rows and the running set the
        // running ones: a write that neither enters nor leaves a state
        // changes neither (a completion would look for a key it does not
        // hold).
        if before == State::Pending || t.state == State::Pending {
            self.ready.note(t, stored.seq);
        }
        if before == State::Running || t.state == State::Running {
            self.shared.running.note(t, stored.seq);
        }
        Ok(())
    }

    /// Writes back a task the state machine changed from `before`, and
    /// carries out what the change implies: counts, events, unblocking or
    /// cancelling the tasks that depend on it.
    ///
    /// A completed dependency is met for good, so its rows in `task_deps`
    /// go when it completes, and a dependent whose rows are all gone has
    /// none left unmet: each dependency's completion looks at each of its
    /// dependents' first row left, not at all of them. Looking at all of
    /// them made 10,000 tasks that each waited for the same 100 cost the
    /// ack of those 100 77 s of the writer's time (`bench/fan-out.py`).
    fn save(&mut self, stored: &StoredTask, before: State) -> Result<()> {
        let mut finished = Vec::new();
        self.save_one(stored, before, &mut finished)?;
        // Dependency cascades, breadth-first: a cancelled dependent may have
        // dependents of its own.
        while let Some((dep_id, dep_state)) = finished.pop() {
            if !self.dependencies_stored()? {
                break;
            }
            let dependents: Vec<i64> = {
                let mut stmt = self
                    .conn()?
                    .prepare_cached("SELECT task_seq FROM task_deps WHERE dep_id = ?1")
                    .map_err(storage_error)?;
                let rows = stmt
                    .query_map([Id(dep_id)], |r| r.get(0))
                    .map_err(storage_error)?;
                rows.collect::<Sql<_>>().map_err(storage_error)?
            };
            if dep_state == State::Completed && !dependents.is_empty() {
                self.conn()?
                    .prepare_cached("DELETE FROM task_deps WHERE dep_id = ?1")
                    .and_then(|mut stmt| stmt.execute([Id(dep_id)]))
                    .map_err(storage_error)?;
            }
            for seq in dependents {
                if dep_state == State::Completed && self.waits_for_more(seq)? {
                    continue;
                }
                let Some(mut dependent) = self.load_one(
                    concat!(
                        "SELECT ",
                        task_columns!(),
                        " FROM tasks WHERE seq = ?1 AND state = 0"
                    ),
                    [seq],
                )?
                else {
                    continue;
                };
                if dep_state == State::Completed {
                    dependent.task.unblock(self.now)?;
                } else {
                    dependent
                        .task
                        .fail_dependency(dep_id, dep_state, self.now)?;
                }
                self.save_one(&dependent, State::Blocked, &mut finished)?;
            }
        }
        Ok(())
    }

    fn save_one(
        &mut self,
        stored: &StoredTask,
        before: State,
        finished: &mut Vec<(Uuid, State)>,
    ) -> Result<()> {
        self.write_row(stored, before)?;
        let after = stored.task.state;
        if before != after {
            self.count(
                &stored.task.queue,
                &stored.task.task_type,
                Some(before),
                Some(after),
            );
            if before == State::Blocked {
                self.conn()?
                    .prepare_cached("DELETE FROM task_deps WHERE task_seq = ?1")
                    .and_then(|mut stmt| stmt.execute([stored.seq]))
                    .map_err(storage_error)?;
            }
            if after.is_finished() {
                finished.push((stored.task.id, after));
            }
        }
        self.event(EventKind::State, &stored.task);
        Ok(())
    }

    fn dependencies_stored(&mut self) -> Result<bool> {
        if let Some(known) = self.effects().dependencies_stored {
            return Ok(known);
        }
        // Asked by the first completion of every group, after its row is
        // buffered.
        let stored = self
            .conn_beside_tasks()
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM task_deps)")
            .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
            .map_err(storage_error)?;
        self.effects().dependencies_stored = Some(stored);
        Ok(stored)
    }

    /// Whether task `seq` still waits for a dependency: one of its rows in
    /// `task_deps` names a dependency that is stored and not completed.
    /// Rows of completed dependencies go when they complete (see
    /// [`WriteCtx::save`]); one of a dependency that completed before
    /// that was so (a database written by an earlier version) is deleted
    /// here when found, and so is one of a dependency no longer stored:
    /// only a finished task can be deleted, and one that failed or was
    /// cancelled would have cancelled the dependent already. Counted as
    /// unmet, a dependency deleted by retention while another ran on left
    /// its dependent blocked for good.
    fn waits_for_more(&mut self, seq: i64) -> Result<bool> {
        loop {
            let first: Option<Uuid> = self
                .conn()?
                .prepare_cached("SELECT dep_id FROM task_deps WHERE task_seq = ?1 LIMIT 1")
                .and_then(|mut stmt| {
                    stmt.query_row([seq], |r| r.get::<_, Id>(0).map(|id| id.0))
                        .optional()
                })
                .map_err(storage_error)?;
            let Some(dep) = first else {
                return Ok(false);
            };
            if !matches!(self.state_of(dep)?, Some(State::Completed) | None) {
                return Ok(true);
            }
            self.conn()?
                .prepare_cached("DELETE FROM task_deps WHERE dep_id = ?1 AND task_seq = ?2")
                .and_then(|mut stmt| stmt.execute(params![Id(dep), seq]))
                .map_err(storage_error)?;
        }
    }

    /// The state task `id`'s row holds, if it is stored. A claimed task's row may still say
    /// pending (`claims.rs`); callers tell only finished states apart.
    fn state_of(&mut self, id: Uuid) -> Result<Option<State>> {
        let code = ids::find(
            self.conn()?,
            id,
            sql::STATE_BY_ID,
            sql::STATE_BY_ID_BEFORE_V4,
            |r| r.get::<_, i64>(0),
        )
        .map_err(storage_error)?;
        Ok(code.and_then(State::from_code))
    }

    // ---- enqueue ------------------------------------------------------

    pub fn enqueue(&mut self, specs: Vec<TaskSpec>) -> Result<Vec<(Task, bool)>> {
        self.sync_ids()?;
        let mut replaced = Vec::new();
        let mut answers = self.enqueue_more(specs, &mut KnownQueues::default(), &mut replaced)?;
        restate_replaced(&mut answers, &replaced);
        Ok(answers)
    }

    /// Rows may have gone since the last insert (deleted, or rolled back
    /// with an operation): new ids must know where SQLite would put them.
    fn sync_ids(&mut self) -> Result<()> {
        let stored: i64 = self
            .conn()?
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM tasks")
            .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
            .map_err(storage_error)?;
        self.ids.sync(stored);
        Ok(())
    }

    /// Enqueues the next tasks of an operation, after [`Self::sync_ids`];
    /// `known_queues` holds the queues it already made sure exist, and
    /// `replaced` gets each task an `on_conflict: "replace"` cancelled, for
    /// [`restate_replaced`].
    fn enqueue_more(
        &mut self,
        specs: Vec<TaskSpec>,
        known_queues: &mut KnownQueues,
        replaced: &mut Vec<Task>,
    ) -> Result<Vec<(Task, bool)>> {
        let mut answers = Vec::with_capacity(specs.len());
        // Tasks with neither a unique key nor dependencies, inserted many to
        // a statement once something else comes or the batch ends, so that
        // seq follows the order of the request.
        let mut plain = Vec::with_capacity(specs.len());
        for spec in specs {
            if !known_queues.see(&spec.queue) {
                self.ensure_queue(&spec.queue)?;
            }
            if spec.unique_key.is_none() && spec.depends_on.is_empty() {
                let (id, seq) = self.ids.next(self.now);
                plain.push((seq, Task::new_from_spec(id, spec, self.now, false)));
                continue;
            }
            self.insert_plain(std::mem::take(&mut plain), &mut answers)?;
            if let Some(key) = &spec.unique_key
                && let Some(mut holder) = self.unique_key_holder(&spec.queue, key)?
            {
                match spec.on_conflict {
                    offload_core::OnConflict::Keep => {
                        answers.push((*holder.task, false));
                        continue;
                    }
                    offload_core::OnConflict::Replace => {
                        self.forget_kept(&holder);
                        let before = holder.task.state;
                        if holder.task.cancel(self.now)? == CancelEffect::Requested {
                            self.cancel_requested(holder.task.id);
                        }
                        self.save(&holder, before)?;
                        replaced.push(*holder.task);
                    }
                }
            }
            answers.push((self.insert(spec)?, true));
        }
        self.insert_plain(plain, &mut answers)?;
        Ok(answers)
    }

    /// Enqueues a batch as its chunks arrive (`offload_core::batch_stream`),
    /// holding the writer meanwhile: the sender reads and checks tasks
    /// several times faster than they are written here, so the wait is for
    /// the first chunk. Anything but a finished batch within the batch
    /// limit fails the operation, which rolls back what it wrote.
    ///
    /// The answers come a chunk each, joined by the caller: moving each
    /// task once more here was ~5% of the writer's work for the batch.
    pub fn enqueue_streamed(
        &mut self,
        batch: &offload_core::BatchReceiver,
    ) -> Result<Vec<Vec<(Task, bool)>>> {
        self.sync_ids()?;
        let mut known_queues = KnownQueues::default();
        let mut replaced = Vec::new();
        let mut chunks = Vec::new();
        let mut count = 0;
        while let Some(specs) = batch.next_blocking(STREAM_PATIENCE)? {
            count += specs.len();
            self.shared.limits.check_batch("tasks", count)?;
            chunks.push(self.enqueue_more(specs, &mut known_queues, &mut replaced)?);
        }
        for answers in &mut chunks {
            restate_replaced(answers, &replaced);
        }
        Ok(chunks)
    }

    /// Inserts tasks that need no checks (no unique key, no dependencies),
    /// up to [`sql::MANY_ROWS`] to a statement: an INSERT of one row
    /// costs the writer as much in the statement as in the row
    /// (bench/HISTORY.md).
    fn insert_plain(
        &mut self,
        tasks: Vec<(i64, Task)>,
        answers: &mut Vec<(Task, bool)>,
    ) -> Result<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        self.flush_rows()?;
        let mut rest = tasks.as_slice();
        while !rest.is_empty() {
            let rows = sql::rows_per_statement(rest.len());
            let (chunk, after) = rest.split_at(rows.max(1));
            if rows == 0 {
                let (seq, task) = &chunk[0];
                self.insert_row(task, *seq)?;
            } else {
                let labels = chunk
                    .iter()
                    .map(|(_, task)| labels_text(task))
                    .collect::<Result<Vec<_>>>()?;
                let seqs: Vec<Option<i64>> = chunk
                    .iter()
                    .map(|(seq, _)| self.ids.insert_as(*seq))
                    .collect();
                insert_rows(&mut self.hot.shaped, chunk, &seqs, &labels, self.now)
                    .map_err(storage_error)?;
                check_inserted(self.last_insert_rowid(), chunk[chunk.len() - 1].0)?;
                self.add_payloads_apart(chunk.iter().map(|(seq, task)| (*seq, task)))?;
                for (seq, task) in chunk {
                    self.add_label_entries(*seq, task)?;
                    self.ready.note(task, *seq);
                    self.pending_rows.remember(*seq, task);
                }
            }
            rest = after;
        }
        for (_, task) in tasks {
            self.count(&task.queue, &task.task_type, None, Some(task.state));
            self.event(EventKind::State, &task);
            answers.push((task, true));
        }
        Ok(())
    }

    /// The active task holding (queue, unique_key), per SPEC §1.2.
    fn unique_key_holder(&mut self, queue: &str, key: &str) -> Result<Option<StoredTask>> {
        self.load_one(
            concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE queue = ?1 AND unique_key = ?2 AND state <= 3 AND cancel_requested = 0"
            ),
            params![queue, key],
        )
    }

    fn ensure_queue(&mut self, name: &str) -> Result<()> {
        self.conn()?
            .prepare_cached("INSERT OR IGNORE INTO queues (name, created_at) VALUES (?1, ?2)")
            .and_then(|mut stmt| stmt.execute(params![name, self.now.as_millis()]))
            .map(drop)
            .map_err(storage_error)
    }

    fn insert(&mut self, spec: TaskSpec) -> Result<Task> {
        let now = self.now;
        let mut unmet = Vec::new();
        let mut broken = None;
        for (i, dep) in spec.depends_on.iter().enumerate() {
            match self.state_of(*dep)? {
                None => {
                    return Err(Error::invalid(
                        spec.position.field(format_args!("depends_on[{i}]")),
                        format!("no task with id {dep}"),
                    ));
                }
                Some(State::Completed) => {}
                Some(s @ (State::Failed | State::Cancelled)) => broken = Some((*dep, s)),
                Some(_) => unmet.push(*dep),
            }
        }
        let blocked = !unmet.is_empty() || broken.is_some();
        let (id, seq) = self.ids.next(now);
        let task = Task::new_from_spec(id, spec, now, blocked);
        self.insert_row(&task, seq)?;
        self.wait_for(seq, unmet.iter().copied())?;
        self.count(&task.queue, &task.task_type, None, Some(task.state));
        self.event(EventKind::State, &task);
        let Some((dep, dep_state)) = broken else {
            return Ok(task);
        };
        let mut stored = StoredTask {
            seq,
            task: Box::new(task),
        };
        stored.task.fail_dependency(dep, dep_state, now)?;
        self.save(&stored, State::Blocked)?;
        Ok(*stored.task)
    }

    /// Inserts one task's row with the statement kept prepared; its seq.
    fn insert_row(&mut self, task: &Task, seq: i64) -> Result<()> {
        let labels = labels_text(task)?;
        let depends_on = opt_json_text(Some(&task.depends_on).filter(|d| !d.is_empty()))?;
        // The unique index must see the rows written back before this one
        // (a replaced holder leaves it).
        self.flush_rows()?;
        self.hot
            .insert_task
            .execute(params![
                Id(task.id),
                task.task_type,
                task.queue,
                sql::row_payload(task.payload.get()),
                task.priority,
                task.state.code(),
                task.max_attempts,
                task.timeout_secs,
                task.run_at.as_millis(),
                task.owner,
                labels,
                task.unique_key,
                depends_on,
                task.created_at.as_millis(),
                self.ids.insert_as(seq),
            ])
            .map_err(storage_error)?;
        check_inserted(self.last_insert_rowid(), seq)?;
        self.add_payloads_apart([(seq, task)])?;
        self.add_label_entries(seq, task)?;
        self.ready.note(task, seq);
        self.pending_rows.remember(seq, task);
        Ok(())
    }

    /// Writes the payloads of `tasks` (each with its seq) that their rows
    /// hold '' for ([`sql::row_payload`]) apart from the rows.
    fn add_payloads_apart<'t>(
        &mut self,
        tasks: impl IntoIterator<Item = (i64, &'t Task)>,
    ) -> Result<()> {
        let apart: Vec<(i64, &str)> = tasks
            .into_iter()
            .map(|(seq, task)| (seq, task.payload.get()))
            .filter(|(_, payload)| sql::row_payload(payload).is_empty())
            .collect();
        let conn = self.conn_beside_tasks();
        let mut rest = apart.as_slice();
        while !rest.is_empty() {
            let rows = sql::rows_per_statement(rest.len()).max(1);
            let (chunk, after) = rest.split_at(rows);
            let mut add = conn
                .prepare_cached(&sql::add_payloads_apart(rows))
                .map_err(storage_error)?;
            let values = chunk.iter().flat_map(|(seq, payload)| {
                [ValueRef::Integer(*seq), ValueRef::Text(payload.as_bytes())]
                    .map(ToSqlOutput::Borrowed)
            });
            add.execute(rusqlite::params_from_iter(values))
                .map_err(storage_error)?;
            rest = after;
        }
        Ok(())
    }

    /// The entries of `task_labels` (schema version 8) for the labels of
    /// task `seq`, just inserted. Written here rather than by a trigger on
    /// `tasks`: a trigger, even one whose condition no row met, took a
    /// batch of 1,000 tasks without labels from 1.45–1.49 ms to 1.74–1.78
    /// (`bench/batch-time.py`). The task's delete takes them with it (the
    /// migration's trigger).
    fn add_label_entries(&mut self, seq: i64, task: &Task) -> Result<()> {
        if task.labels.is_empty() {
            return Ok(());
        }
        let mut add = self
            .conn_beside_tasks()
            .prepare_cached(sql::ADD_LABEL_ENTRY)
            .map_err(storage_error)?;
        for (key, value) in &task.labels {
            add.execute(params![sql::label_entry(key, value), seq])
                .map_err(storage_error)?;
        }
        Ok(())
    }

    // ---- claiming -----------------------------------------------------

    pub fn claim(&mut self, req: &ClaimRequest) -> Result<Vec<Task>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let conn = self.conn_beside_tasks();
        let rules = self.queue_rules.restricted(conn)?;
        let running = &self.shared.running;
        let room_in = |queue: &str| {
            let rule = rules.get(queue).copied().unwrap_or_default();
            match rule.concurrency {
                _ if rule.paused => 0,
                None => req.limit,
                Some(limit) => {
                    let running = i64::try_from(running.in_queue(queue)).unwrap_or(i64::MAX);
                    usize::try_from(limit.saturating_sub(running))
                        .unwrap_or(0)
                        .min(req.limit)
                }
            }
        };
        let candidate = |queue: usize, key: ReadyKey| Candidate {
            queue,
            priority: key.priority.0,
            run_at: key.run_at(),
            position: key.seq,
            item: key,
        };
        let mut candidates = Vec::new();
        let mut capacity: Vec<usize> = Vec::new();
        if req.queues.is_empty() {
            // Already in claim order and within each queue's room.
            let mut index_of: FxHashMap<&str, usize> = FxHashMap::default();
            for (key, queue) in self
                .ready
                .first_across_queues(&req.types, req.limit, room_in)
            {
                let at = *index_of.entry(queue).or_insert_with(|| {
                    capacity.push(req.limit);
                    capacity.len() - 1
                });
                candidates.push(candidate(at, key));
            }
        } else {
            // Each queue named, once, with its first tasks in claim order.
            let mut named: Vec<&str> = req.queues.iter().map(String::as_str).collect();
            named.sort_unstable();
            named.dedup();
            for queue in named {
                let room = room_in(queue);
                if room == 0 {
                    continue;
                }
                let at = capacity.len();
                capacity.push(room);
                candidates.extend(
                    self.ready
                        .candidates(queue, &req.types, room)
                        .into_iter()
                        .map(|key| candidate(at, key)),
                );
            }
        }
        let chosen = admit(candidates, capacity, req.limit);
        // Read in rounds, as a list is (`PageFill`), so that a claim of
        // large tasks ends at `PAGE_BYTES` without reading every row it
        // was allowed. Rows read and left unclaimed stay pending; the
        // next claim reads them again.
        let mut page = PageFill::new(chosen.len());
        let mut claimed = Vec::with_capacity(chosen.len());
        let mut unread = chosen.as_slice();
        'rounds: while !unread.is_empty() {
            let (round, rest) = unread.split_at(page.rows_to_ask().min(unread.len()));
            unread = rest;
            for mut stored in self.tasks_by_seq(round)? {
                if !page.take(&stored.task) {
                    break 'rounds;
                }
                stored.task.claim(&req.worker_id, req.lease, self.now)?;
                self.save(&stored, State::Pending)?;
                claimed.push(Task::clone(&stored.task));
                self.claimed_rows.keep(stored);
            }
        }
        if let Some(first) = claimed.first() {
            let lease_expires_at = first.lease_expires_at.unwrap_or(self.now);
            self.record_claim(&req.worker_id, lease_expires_at)?;
        }
        Ok(claimed)
    }

    /// Inserts the row of the claim whose tasks `write_row` collected.
    fn record_claim(
        &mut self,
        worker_id: &str,
        lease_expires_at: offload_core::Timestamp,
    ) -> Result<()> {
        let tasks = std::mem::take(&mut self.claims.claiming);
        let (id, blob) = self
            .claims
            .open(worker_id, self.now, lease_expires_at, &tasks);
        let now = self.now.as_millis();
        self.conn()?
            .prepare_cached(sql::INSERT_CLAIM)
            .and_then(|mut stmt| {
                stmt.execute(params![
                    id,
                    worker_id,
                    now,
                    lease_expires_at.as_millis(),
                    blob
                ])
            })
            .map_err(storage_error)?;
        Ok(())
    }

    /// Writes the rows of claimed tasks still unwritten: `seqs` among them,
    /// or all. Readers ask for it before they read (`claims.rs`).
    pub fn write_claimed(&mut self, seqs: Option<Vec<i64>>) -> Result<()> {
        let mut seqs = match seqs {
            Some(seqs) => seqs,
            None => self.claims.unwritten_seqs(),
        };
        seqs.retain(|&seq| self.claims.is_unwritten(seq));
        let mut rows = self.rows_by_seq(&seqs)?;
        for seq in seqs {
            let Some(stored) = rows.remove(&seq) else {
                return Err(Error::Storage(format!(
                    "claimed task {seq} has no row to write"
                )));
            };
            self.write_row(&stored, State::Running)?;
        }
        Ok(())
    }

    /// The rows of the pending tasks at `keys`, in that order: those the
    /// writer kept from their enqueue (`pending_rows.rs`), the rest read.
    ///
    /// A key whose row is not pending would be a bug in keeping the order
    /// (`ready.rs`): it is logged and dropped rather than failing this and
    /// every later claim.
    fn tasks_by_seq(&mut self, keys: &[ReadyKey]) -> Result<Vec<StoredTask>> {
        let mut kept: Vec<Option<Box<Task>>> = keys
            .iter()
            .map(|key| self.pending_rows.take(key.seq))
            .collect();
        let unkept: Vec<i64> = keys
            .iter()
            .zip(&kept)
            .filter(|(_, task)| task.is_none())
            .map(|(key, _)| key.seq)
            .collect();
        let mut found = if unkept.is_empty() {
            SeqMap::default()
        } else {
            self.rows_by_seq(&unkept)?
        };
        let mut pending = Vec::with_capacity(keys.len());
        for (key, kept) in keys.iter().zip(&mut kept) {
            let row = match kept.take() {
                Some(task) => Some(StoredTask { seq: key.seq, task }),
                None => found.remove(&key.seq),
            };
            match row {
                Some(stored) if stored.task.state == State::Pending => pending.push(stored),
                other => {
                    let state = other.map(|s| s.task.state);
                    debug_assert!(false, "row {} listed as pending is {state:?}", key.seq);
                    tracing::error!(
                        seq = key.seq,
                        ?state,
                        "a task row listed as pending in the writer's memory is not; dropped from the list"
                    );
                    self.ready.drop_key(key);
                }
            }
        }
        Ok(pending)
    }

    /// The rows at `seqs`, read up to [`sql::MANY_ROWS`] to a statement.
    /// One statement reads its rows with one cursor, which steps to the
    /// next row where a statement a row would seek each from the table's
    /// root: with a million tasks stored, claims ran ~10% slower than with
    /// ten thousand that way.
    fn rows_by_seq(&mut self, seqs: &[i64]) -> Result<SeqMap<StoredTask>> {
        self.flush_rows()?;
        let mut found = SeqMap::with_capacity_and_hasher(seqs.len(), Default::default());
        for chunk in seqs.chunks(sql::MANY_ROWS) {
            let size = chunk.len().next_multiple_of(sql::ROWS_ROUNDING);
            let mut read = || -> Sql<()> {
                let stmt = self
                    .hot
                    .shaped
                    .get(Shape::TasksBySeq(size), || sql::tasks_by_seq(size))?;
                // Padded with the last seq: a list holds each value once.
                let padded = chunk
                    .iter()
                    .chain(std::iter::repeat(&chunk[chunk.len() - 1]));
                for (i, seq) in padded.take(size).enumerate() {
                    stmt.raw_bind_parameter(i + 1, *seq)?;
                }
                let mut rows = stmt.raw_query();
                while let Some(row) = rows.next()? {
                    let stored = decode(row)?;
                    found.insert(stored.seq, stored);
                }
                Ok(())
            };
            read().map_err(storage_error)?;
        }
        if !self.claims.is_empty() {
            for stored in found.values_mut() {
                self.claims.overlay(stored)?;
            }
        }
        Ok(found)
    }

    // ---- the worker's reports -----------------------------------------

    pub fn heartbeat(&mut self, req: HeartbeatRequest) -> Result<HeartbeatAck> {
        let mut stored = self.load(req.id)?;
        let progress = req
            .progress
            .map(|p| p.checked(&self.shared.limits))
            .transpose()?;
        let reported = progress.is_some();
        let before = stored.task.state;
        stored
            .task
            .heartbeat(&req.worker_id, req.lease, progress, self.now)?;
        self.write_row(&stored, before)?;
        if reported {
            self.event(EventKind::Progress, &stored.task);
        }
        Ok(HeartbeatAck {
            cancel_requested: stored.task.cancel_requested,
            lease_expires_at: stored.task.lease_expires_at.unwrap_or(self.now),
        })
    }

    pub fn ack(&mut self, worker_id: &str, acks: Vec<Ack>) -> Result<Vec<AckOutcome>> {
        let mut outcomes = Vec::with_capacity(acks.len());
        for ack in acks {
            outcomes.push(self.ack_one(worker_id, ack));
        }
        // A storage fault inside one ack poisons the transaction for all.
        if let Some(Err(e @ (Error::Storage(_) | Error::Unavailable(_)))) = outcomes
            .iter()
            .find(|o| matches!(o, Err(Error::Storage(_) | Error::Unavailable(_))))
        {
            return Err(e.clone());
        }
        Ok(outcomes)
    }

    fn ack_one(&mut self, worker_id: &str, ack: Ack) -> AckOutcome {
        let mut stored = self.load(ack.id())?;
        let before = stored.task.state;
        match ack {
            Ack::Complete { result, .. } => {
                if let Some(result) = &result {
                    check_json("result", result, &self.shared.limits)?;
                }
                stored.task.complete(worker_id, result, self.now)?;
            }
            Ack::Fail { failure, .. } => {
                let failure = failure.into_attempt_failure();
                stored
                    .task
                    .fail(worker_id, failure, &self.shared.backoff, self.now)?;
            }
        }
        self.save(&stored, before)?;
        Ok(*stored.task)
    }

    // ---- actions on one task ------------------------------------------

    pub fn cancel(&mut self, id: Uuid) -> Result<Task> {
        let mut stored = self.load(id)?;
        let before = stored.task.state;
        if stored.task.cancel(self.now)? == CancelEffect::Requested {
            self.cancel_requested(id);
        }
        self.save(&stored, before)?;
        Ok(*stored.task)
    }

    pub fn retry(&mut self, id: Uuid) -> Result<Task> {
        let mut stored = self.load(id)?;
        let before = stored.task.state;
        let dependencies = stored
            .task
            .depends_on
            .iter()
            .map(|dep| Ok((*dep, self.state_of(*dep)?)))
            .collect::<Result<Vec<_>>>()?;
        stored.task.manual_retry(&dependencies, self.now)?;
        // Back in an active state the task would hold its key again.
        if let Some(key) = &stored.task.unique_key
            && let Some(holder) = self.unique_key_holder(&stored.task.queue, key)?
        {
            return Err(Error::Conflict(format!(
                "task {} in queue {:?} already holds unique_key {key:?}; retry is refused while it is active",
                holder.task.id, stored.task.queue
            )));
        }
        if stored.task.state == State::Blocked {
            let unmet = dependencies
                .iter()
                .filter(|(_, state)| state.is_some_and(|s| !s.is_finished()))
                .map(|(dep, _)| *dep);
            self.wait_for(stored.seq, unmet)?;
        }
        self.save(&stored, before)?;
        Ok(*stored.task)
    }

    /// Records that the task at `seq` waits for `unmet`, dependencies not
    /// yet completed, so that their completion unblocks it.
    fn wait_for(&mut self, seq: i64, unmet: impl Iterator<Item = Uuid>) -> Result<()> {
        for dep in unmet {
            self.effects().dependencies_stored = Some(true);
            self.conn()?
                .prepare_cached(
                    "INSERT OR IGNORE INTO task_deps (dep_id, task_seq) VALUES (?1, ?2)",
                )
                .and_then(|mut stmt| stmt.execute(params![Id(dep), seq]))
                .map_err(storage_error)?;
        }
        Ok(())
    }

    pub fn delete(&mut self, id: Uuid) -> Result<()> {
        let stored = self.load(id)?;
        if stored.task.state.is_active() {
            return Err(Error::Conflict(format!(
                "task {id} is {}; only finished tasks can be deleted (cancel it first)",
                stored.task.state
            )));
        }
        self.conn()?
            .prepare_cached("DELETE FROM tasks WHERE seq = ?1")
            .and_then(|mut stmt| stmt.execute([stored.seq]))
            .map_err(storage_error)?;
        self.count(
            &stored.task.queue,
            &stored.task.task_type,
            Some(stored.task.state),
            None,
        );
        Ok(())
    }

    /// Deletes up to `batch` finished tasks in `state` that finished at or
    /// before `finished_by`.
    pub fn delete_finished(&mut self, state: State, finished_by: i64, batch: usize) -> Result<u64> {
        debug_assert!(state.is_finished());
        let removed: Vec<(String, String)> = {
            let mut stmt = self
                .conn()?
                .prepare_cached(sql::DELETE_FINISHED)
                .map_err(storage_error)?;
            let rows = stmt
                .query_map(params![state.code(), finished_by, batch as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(storage_error)?;
            rows.collect::<Sql<_>>().map_err(storage_error)?
        };
        for (queue, task_type) in &removed {
            self.count(queue, task_type, Some(state), None);
        }
        Ok(removed.len() as u64)
    }

    pub fn clear(&mut self, req: &ClearRequest, batch: usize) -> Result<u64> {
        let cutoff = req.older_than.map_or(self.now.as_millis(), |d| {
            self.now.saturating_sub(d).as_millis()
        });
        let mut total = 0;
        for state in &req.states {
            total += self.delete_finished(*state, cutoff, batch)?;
        }
        Ok(total)
    }

    // ---- queues -------------------------------------------------------

    pub fn update_queue(&mut self, name: &str, patch: QueuePatch) -> Result<QueueInfo> {
        self.ensure_queue(name)?;
        self.queue_rules.changing();
        if let Some(paused) = patch.paused {
            self.conn()?
                .prepare_cached("UPDATE queues SET paused = ?1 WHERE name = ?2")
                .and_then(|mut stmt| stmt.execute(params![paused, name]))
                .map_err(storage_error)?;
        }
        if let Some(concurrency) = patch.concurrency {
            self.conn()?
                .prepare_cached("UPDATE queues SET concurrency = ?1 WHERE name = ?2")
                .and_then(|mut stmt| stmt.execute(params![concurrency, name]))
                .map_err(storage_error)?;
        }
        // Resuming or raising a limit can make tasks claimable.
        self.wake_workers();
        let (paused, concurrency) = self
            .conn()?
            .prepare_cached("SELECT paused, concurrency FROM queues WHERE name = ?1")
            .and_then(|mut stmt| stmt.query_row([name], |r| Ok((r.get(0)?, r.get(1)?))))
            .map_err(storage_error)?;
        Ok(QueueInfo {
            name: name.to_owned(),
            paused,
            concurrency,
            counts: Default::default(),
        })
    }

    // ---- background duties --------------------------------------------

    pub fn promote_due(&mut self) -> Result<PromoteReport> {
        let due = self.load_many(sql::DUE, params![self.now.as_millis(), DUTY_BATCH as i64])?;
        let promoted = due.len() as u64;
        for mut stored in due {
            stored.task.promote(self.now)?;
            self.save(&stored, State::Scheduled)?;
        }
        let next_due: Option<i64> = self
            .conn()?
            .prepare_cached(sql::NEXT_DUE)
            .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
            .map_err(storage_error)?;
        Ok(PromoteReport {
            promoted,
            next_due_in: next_due
                .map(|due| self.now.until(offload_core::Timestamp::from_millis(due))),
        })
    }

    /// Ends the attempts whose lease or timeout ran out, found in the
    /// writer's set of running tasks (`running.rs`). A listed seq whose row
    /// is not running would be a bug in keeping that set: it is logged and
    /// dropped from it.
    pub fn recover_expired(&mut self) -> Result<Vec<Task>> {
        let now = self.now.as_millis();
        let seqs = self.shared.running.expired(now, DUTY_BATCH);
        let mut rows = self.rows_by_seq(&seqs)?;
        let mut recovered = Vec::new();
        for seq in seqs {
            let Some(mut stored) = rows.remove(&seq).filter(|s| s.task.state == State::Running)
            else {
                debug_assert!(false, "row {seq} listed as running is not");
                tracing::error!(
                    seq,
                    "a task row listed as running in the writer's memory is not; dropped from the list"
                );
                self.shared.running.drop_seq(seq);
                continue;
            };
            let Some(kind) = stored.task.expired(self.now) else {
                continue;
            };
            self.forget_kept(&stored);
            stored.task.expire(kind, &self.shared.backoff, self.now)?;
            self.save(&stored, State::Running)?;
            recovered.push(*stored.task);
        }
        Ok(recovered)
    }

    /// Compares what the writer keeps in memory with the table, by walks
    /// of the whole table: for tests (`Store::verify_bookkeeping`).
    pub fn verify_bookkeeping(&mut self) -> Result<()> {
        let conn = self.conn()?;
        let read = || -> Sql<_> {
            let pending: std::collections::BTreeSet<i64> = conn
                .prepare("SELECT seq FROM tasks WHERE state = 2")?
                .query_map([], |r| r.get(0))?
                .collect::<Sql<_>>()?;
            let running: Vec<(i64, String, Option<i64>, Option<i64>)> = conn
                .prepare(
                    "SELECT seq, queue, lease_expires_at, deadline_at FROM tasks WHERE state = 3",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Sql<_>>()?;
            Ok((pending, running))
        };
        let (mut pending, mut running) = read().map_err(storage_error)?;
        // A claimed task whose row is unwritten is running (`claims.rs`).
        pending.retain(|&seq| !self.claims.is_unwritten(seq));
        let unwritten = self.claims.unwritten_seqs();
        let mut claimed = self.rows_by_seq(&unwritten)?;
        for seq in unwritten {
            let Some(stored) = claimed.remove(&seq) else {
                return Err(Error::Storage(format!(
                    "the writer's memory disagrees with the tasks table: claimed task {seq} has no row"
                )));
            };
            let millis = |at: Option<offload_core::Timestamp>| at.map(|at| at.as_millis());
            running.push((
                seq,
                stored.task.queue.clone(),
                millis(stored.task.lease_expires_at),
                millis(stored.task.deadline()),
            ));
        }
        let claims = self.claims_disagreement()?;
        let kept_rows = self.kept_rows_disagreement()?;
        match self
            .ready
            .disagreement(&pending)
            .or_else(|| self.shared.running.disagreement(&running))
            .or(claims)
            .or(kept_rows)
        {
            None => Ok(()),
            Some(disagreement) => Err(Error::Storage(format!(
                "the writer's memory disagrees with the tasks table: {disagreement}"
            ))),
        }
    }

    /// How the writer's record of claims (`claims.rs`) differs from the
    /// `claims` table and the rows it names, if it does.
    fn claims_disagreement(&mut self) -> Result<Option<String>> {
        let mut table = Vec::new();
        for claim in crate::claims::read_claims(self.conn()?)? {
            let mut unwritten = Vec::with_capacity(claim.tasks.len());
            for &(seq, attempt) in &claim.tasks {
                let row: Option<(i64, u32)> = self
                    .conn()?
                    .prepare_cached("SELECT state, attempt FROM tasks WHERE seq = ?1")
                    .and_then(|mut stmt| {
                        stmt.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                    })
                    .map_err(storage_error)?;
                unwritten.push(row.is_some_and(|(state, at)| {
                    State::from_code(state)
                        .is_some_and(|state| crate::claims::still_unwritten(state, at, attempt))
                }));
            }
            table.push((claim, unwritten));
        }
        Ok(self.claims.disagreement(&table))
    }

    /// How a row the writer keeps (`pending_rows.rs`, `ClaimedRows`)
    /// differs from its row in `tasks`, if one does.
    fn kept_rows_disagreement(&mut self) -> Result<Option<String>> {
        let as_json = |task: &Task| json_text(task);
        let mut kept = Vec::new();
        for (seq, task) in self.pending_rows.tasks() {
            kept.push((seq, State::Pending, as_json(&task)?));
        }
        for stored in self.claimed_rows.iter() {
            kept.push((stored.seq, State::Running, as_json(&stored.task)?));
        }
        for (seq, state, json) in kept {
            let stored = self.load_one(
                concat!("SELECT ", task_columns!(), " FROM tasks WHERE seq = ?1"),
                [seq],
            )?;
            let disagreement = match stored {
                None => format!("kept row {seq} is not in the table"),
                Some(stored) if stored.task.state != state => format!(
                    "kept row {seq} is kept as {state} and is {} in the table",
                    stored.task.state
                ),
                Some(stored) => {
                    let table = as_json(&stored.task)?;
                    if table == json {
                        continue;
                    }
                    format!("kept row {seq} is {json}, the table's {table}")
                }
            };
            return Ok(Some(disagreement));
        }
        Ok(None)
    }

    pub fn purge_finished(&mut self, retention: &Retention, batch: usize) -> Result<u64> {
        let mut purged = 0;
        for state in State::FINISHED {
            let Some(keep) = retention.for_state(state) else {
                continue;
            };
            let cutoff = self.now.saturating_sub(keep).as_millis();
            purged += self.delete_finished(state, cutoff, batch)?;
        }
        Ok(purged)
    }
}

/// A task's values for the columns a row write sets, in the order of
/// `row_writes::COLUMNS`.
pub(crate) fn row_values(t: &Task) -> Result<[Value; crate::row_writes::COLUMNS.len()]> {
    let text = |s: Option<String>| s.map_or(Value::Null, Value::Text);
    let millis = |at: Option<offload_core::Timestamp>| {
        at.map_or(Value::Null, |at| Value::Integer(at.as_millis()))
    };
    let errors = if t.errors.is_empty() {
        None
    } else {
        Some(json_text(&t.errors)?)
    };
    Ok([
        Value::Integer(t.state.code()),
        Value::Integer(t.attempt.into()),
        Value::Integer(t.max_attempts.into()),
        Value::Integer(t.run_at.as_millis()),
        text(opt_json_text(t.progress.as_ref())?),
        text(t.result.as_ref().map(|r| r.get().to_owned())),
        text(opt_json_text(t.error.as_ref())?),
        text(errors),
        Value::Integer(t.cancel_requested.into()),
        Value::Integer(t.updated_at.as_millis()),
        millis(t.started_at),
        millis(t.finished_at),
        millis(t.lease_expires_at),
        millis(t.deadline()),
        text(t.worker_id.clone()),
    ])
}

/// The `labels` column: JSON, or NULL when there are none.
fn labels_text(task: &Task) -> Result<Option<String>> {
    opt_json_text(Some(&task.labels).filter(|l| !l.is_empty()))
}

/// Fails the operation if the row just inserted (`got`) did not get `seq`, which
/// its id carries: a fault in `ids.rs`'s bookkeeping must not store a task
/// that its id cannot find.
fn check_inserted(got: i64, seq: i64) -> Result<()> {
    if got == seq {
        Ok(())
    } else {
        Err(Error::Storage(format!(
            "a new task was stored with seq {got} where its id carries {seq}"
        )))
    }
}

/// Inserts `tasks`, which have neither a unique key nor dependencies, with
/// one statement of `tasks.len()` rows; `seqs` holds the value each row's
/// seq is inserted as ([`crate::ids::SeqIds::insert_as`]), `labels` their
/// [`labels_text`]. What every row holds alike is bound once
/// ([`sql::insert_plain_rows`]).
fn insert_rows(
    shaped: &mut ShapedStatements<'_>,
    tasks: &[(i64, Task)],
    seqs: &[Option<i64>],
    labels: &[Option<String>],
    now: offload_core::Timestamp,
) -> Sql<()> {
    debug_assert_eq!(tasks.len(), labels.len());
    let rows: Vec<[ValueRef<'_>; sql::INSERT_PLAIN_PARAMS]> = tasks
        .iter()
        .zip(seqs)
        .zip(labels)
        .map(|(((_, task), seq), labels)| plain_row(task, *seq, labels.as_deref()))
        .collect();
    let shared = (0..sql::INSERT_PLAIN_PARAMS)
        .filter(|place| sql::INSERT_PLAIN_SHAREABLE & (1 << place) != 0)
        .filter(|&place| rows[1..].iter().all(|row| row[place] == rows[0][place]))
        .fold(0u16, |mask, place| mask | (1 << place));
    let stmt = shaped.get(
        Shape::InsertRows {
            rows: rows.len(),
            shared,
        },
        || sql::insert_plain_rows(rows.len(), shared),
    )?;
    let mut at = 1;
    let mut bind = |value: ValueRef<'_>| {
        at += 1;
        stmt.raw_bind_parameter(at - 1, ToSqlOutput::Borrowed(value))
    };
    for row in &rows {
        for (place, value) in row.iter().enumerate() {
            if shared & (1 << place) == 0 {
                bind(*value)?;
            }
        }
    }
    for (place, value) in rows[0].iter().enumerate() {
        if shared & (1 << place) != 0 {
            bind(*value)?;
        }
    }
    bind(ValueRef::Integer(now.as_millis()))?;
    stmt.raw_execute().map(drop)
}

/// A plain task's row as [`sql::insert_plain_rows`] takes it.
fn plain_row<'a>(
    task: &'a Task,
    seq: Option<i64>,
    labels: Option<&'a str>,
) -> [ValueRef<'a>; sql::INSERT_PLAIN_PARAMS] {
    debug_assert!(task.unique_key.is_none() && task.depends_on.is_empty());
    let text =
        |text: Option<&'a str>| text.map_or(ValueRef::Null, |t| ValueRef::Text(t.as_bytes()));
    [
        ValueRef::Blob(task.id.as_bytes()),
        ValueRef::Text(task.task_type.as_bytes()),
        ValueRef::Text(task.queue.as_bytes()),
        ValueRef::Text(sql::row_payload(task.payload.get()).as_bytes()),
        ValueRef::Integer(task.priority.into()),
        ValueRef::Integer(task.state.code()),
        ValueRef::Integer(task.max_attempts.into()),
        ValueRef::Integer(task.timeout_secs.into()),
        ValueRef::Integer(task.run_at.as_millis()),
        text(task.owner.as_deref()),
        text(labels),
        seq.map_or(ValueRef::Null, ValueRef::Integer),
    ]
}
