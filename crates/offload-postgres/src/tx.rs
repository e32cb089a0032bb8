//! One store operation's transaction, and what it changes besides rows.
//!
//! As in the SQLite store, an operation loads tasks, applies the core's
//! state machine and writes back what changed; counts, events and wake-ups
//! are gathered here and take effect only with the commit. Writes go out in
//! bulk (`UPDATE … FROM UNNEST(…)`): one round trip for a whole batch.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use offload_core::{Error, EventKind, Hub, Readiness, State, Task, TaskEvent, Unheard};
use sqlx::postgres::{PgPool, PgRow};
use uuid::Uuid;

use crate::Node;
use crate::ids::Lock;
use crate::rows::{
    PgError, PgResult, StoredTask, TASK_COLUMNS, decode, encode_json, unless_stored,
};
use crate::session::{self, Session};

/// PostgreSQL's limit on a NOTIFY payload is 8000 bytes; stay well below.
const NOTIFY_CHUNK: usize = 7000;

/// What a transaction announces in this process once it has committed.
#[derive(Default)]
struct Effects {
    events: Vec<TaskEvent>,
    /// Held from a change whose event was not built, as nobody watched,
    /// until the transaction's effects are published (see `Hub::unheard`).
    unheard: Option<Unheard>,
    cancels: Vec<Uuid>,
    /// What the transaction made claimable: tasks of the pairs that became
    /// pending, or anything (a queue resumed, a limit raised, a limited
    /// queue's slot freed).
    ready: Readiness,
    /// Queues a running task left: where one has a concurrency limit, the
    /// slot it freed may let a pending task be claimed. Elsewhere the end
    /// of a task makes nothing ready, and waking waiting fetches for it
    /// cost each task acked a claim that found nothing.
    freed: HashSet<String>,
    scheduled: bool,
}

/// A ready notification names its pairs while it stays this short;
/// longer, it says anything may be ready.
const READY_PAIRS_BYTES: usize = 2000;

/// What a write changes besides rows: counts, events and wake-ups,
/// announced to the other nodes by its commit and in this process after it.
#[derive(Default)]
pub(crate) struct Changes {
    deltas: HashMap<(String, String, i16), i64>,
    /// Tasks that entered a finished state, apart from the net `deltas`:
    /// a transaction may both finish a task of a pair and delete another.
    finished: HashMap<(String, String, State), u64>,
    effects: Effects,
    /// (kind, id) of changed tasks, announced to the other nodes.
    changed: Vec<(char, Uuid)>,
    sent: Sent,
}

/// What of a transaction's notifications an earlier statement of it sent
/// ([`Changes::take_unrecorded`]), so that a later one sends only the rest.
#[derive(Default)]
struct Sent {
    ready: Readiness,
    scheduled: bool,
    cancels: usize,
    changed: usize,
}

/// A statement with its parameters bound.
pub(crate) type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// What a transaction changed besides rows and no statement of it has
/// recorded yet, as the parameters of `sql::COUNT_AND_NOTIFY`.
pub(crate) struct Unrecorded {
    queues: Vec<String>,
    types: Vec<String>,
    states: Vec<i16>,
    deltas: Vec<i64>,
    notifications: Vec<String>,
    /// Queues a running task left, asked whether one has a concurrency
    /// limit (then a ready notification goes too).
    freed: Vec<String>,
}

impl Unrecorded {
    fn is_empty(&self) -> bool {
        self.queues.is_empty() && self.notifications.is_empty() && self.freed.is_empty()
    }

    /// Binds the parameters of `sql::record_changes!` in their order.
    fn bind<'q>(self, query: PgQuery<'q>, node: &Node) -> PgQuery<'q> {
        query
            .bind(self.queues)
            .bind(self.types)
            .bind(self.states)
            .bind(self.deltas)
            .bind(node.channel.clone())
            .bind(self.notifications)
            .bind(self.freed)
            .bind(Changes::ready_notification(&node.id))
    }
}

impl Changes {
    /// Records that a task of (queue, type) left `from` and entered `to`.
    pub fn count(&mut self, queue: &str, task_type: &str, from: Option<State>, to: Option<State>) {
        for (state, delta) in [(from, -1), (to, 1)] {
            if let Some(state) = state {
                *self
                    .deltas
                    .entry((queue.to_owned(), task_type.to_owned(), state.code() as i16))
                    .or_default() += delta;
            }
        }
        match to {
            Some(State::Pending) => self.effects.ready.add_pair(queue, task_type),
            Some(State::Scheduled) => self.effects.scheduled = true,
            Some(state) if state.is_finished() => {
                *self
                    .finished
                    .entry((queue.to_owned(), task_type.to_owned(), state))
                    .or_default() += 1;
            }
            _ => {}
        }
        if from == Some(State::Running) && to != Some(State::Running) {
            self.effects.freed.insert(queue.to_owned());
        }
    }

    pub fn event(&mut self, hub: &Hub, kind: EventKind, task: &Task) {
        self.changed.push((
            if kind == EventKind::Progress {
                'p'
            } else {
                's'
            },
            task.id,
        ));
        let effects = &mut self.effects;
        if let Some(event) = hub.event_of(&mut effects.unheard, kind, task) {
            effects.events.push(event);
        }
    }

    /// The count changes, net of each other, as the columns of
    /// `offload_counts`' rows: queues, types, states, deltas.
    pub fn count_rows(&mut self) -> (Vec<String>, Vec<String>, Vec<i16>, Vec<i64>) {
        let (mut queues, mut types, mut states, mut values) = (vec![], vec![], vec![], vec![]);
        for ((queue, task_type, state), delta) in self.deltas.drain() {
            if delta != 0 {
                queues.push(queue);
                types.push(task_type);
                states.push(state);
                values.push(delta);
            }
        }
        (queues, types, states, values)
    }

    /// Announces the committed changes in this process.
    pub fn publish(self, node: &Node) {
        if !self.changed.is_empty() {
            // A commit that changed tasks went through: writes do.
            node.write_failure.note(None);
        }
        node.finished
            .record(self.finished.iter().map(|((queue, task_type, state), n)| {
                (queue.as_str(), task_type.as_str(), *state, *n)
            }));
        let hub = &node.hub;
        for event in self.effects.events {
            hub.publish(event);
        }
        for id in self.effects.cancels {
            hub.notify_cancel(id);
        }
        if self.effects.scheduled {
            hub.notify_scheduled();
        }
        hub.notify_readiness(&self.effects.ready);
    }

    /// `r<node>`: anything may be ready. See [`Changes::notifications`].
    fn ready_notification(node: &str) -> String {
        format!("r{node}")
    }

    /// `r<node>|<queue> <type>,…`, the pairs made ready, or
    /// [`Changes::ready_notification`] when they would not be short.
    /// Neither a queue's nor a type's name holds a space, a comma or a bar.
    fn ready_pairs_notification(node: &str, pairs: &BTreeSet<(String, String)>) -> String {
        let mut out = format!("r{node}|");
        for (queue, task_type) in pairs {
            if out.len() + queue.len() + task_type.len() + 2 > READY_PAIRS_BYTES {
                return Self::ready_notification(node);
            }
            if !out.ends_with('|') {
                out.push(',');
            }
            out.push_str(queue);
            out.push(' ');
            out.push_str(task_type);
        }
        out
    }

    /// Notifications for every node of what no statement has sent yet,
    /// now taken as sent (the sending node ignores its own, whose effects
    /// it announces directly): `r<node>` anything ready, `r<node>|<queue>
    /// <type>,…` tasks of those pairs ready, `s<node>` scheduled, `c<id>`
    /// cancel, `e<node>|<kind><id>,…` changed tasks. Readiness that grew
    /// since it was sent is sent whole again.
    pub fn take_notifications(&mut self, node: &str) -> Vec<String> {
        let mut out = Vec::new();
        let sent = &mut self.sent;
        // Ready and scheduled are signed with the node's id: unsigned, the
        // node took its own back as a second signal, which woke its waiting
        // fetches twice.
        if self.effects.ready != sent.ready {
            match &self.effects.ready {
                Readiness::Nothing => {}
                Readiness::Of(pairs) => out.push(Self::ready_pairs_notification(node, pairs)),
                Readiness::Anything => out.push(Self::ready_notification(node)),
            }
            sent.ready = self.effects.ready.clone();
        }
        if self.effects.scheduled && !sent.scheduled {
            out.push(format!("s{node}"));
            sent.scheduled = true;
        }
        for id in &self.effects.cancels[sent.cancels..] {
            out.push(format!("c{id}"));
        }
        sent.cancels = self.effects.cancels.len();
        let prefix = changed_prefix(node);
        let mut current = prefix.clone();
        let unsent = &self.changed[sent.changed..];
        sent.changed = self.changed.len();
        for (kind, id) in unsent {
            if current.len() + 38 > NOTIFY_CHUNK {
                out.push(std::mem::replace(&mut current, prefix.clone()));
            }
            if current.len() > prefix.len() {
                current.push(',');
            }
            current.push(*kind);
            current.push_str(&id.to_string());
        }
        if current.len() > prefix.len() {
            out.push(current);
        }
        out
    }

    /// What no statement has recorded yet (count deltas, notifications,
    /// slots freed), now taken as recorded: the statement that binds it
    /// records it.
    pub fn take_unrecorded(&mut self, node: &str) -> Unrecorded {
        let notifications = self.take_notifications(node);
        // Asked only when the commit does not wake every fetch anyway.
        let freed: Vec<String> = if self.effects.ready == Readiness::Anything {
            Vec::new()
        } else {
            self.effects.freed.drain().collect()
        };
        let (queues, types, states, deltas) = self.count_rows();
        Unrecorded {
            queues,
            types,
            states,
            deltas,
            notifications,
            freed,
        }
    }

    /// Takes the answer of a statement that recorded changes: whether a
    /// slot it freed was a limited queue's, which the statement then
    /// announced to the other nodes as anything ready.
    fn recorded(&mut self, room_freed: bool) {
        if room_freed {
            self.effects.ready = Readiness::Anything;
            self.sent.ready = Readiness::Anything;
        }
    }
}

/// What a notification of changed tasks sent by `node` starts with.
pub(crate) fn changed_prefix(node: &str) -> String {
    format!("e{node}|")
}

pub(crate) struct Tx {
    /// In a transaction from `new` until `commit` or `rollback` ends it.
    pub conn: Session,
    pub now: offload_core::Timestamp,
    pub node: Arc<Node>,
    changes: Changes,
}

impl Tx {
    /// A transaction on a connection of `pool`'s.
    pub async fn begin(pool: &PgPool, node: &Arc<Node>) -> PgResult<Self> {
        let session = session::begin(pool).await?;
        Ok(Self::new(session, Arc::clone(node)))
    }

    fn new(conn: Session, node: Arc<Node>) -> Self {
        Self {
            conn,
            now: node.clock.now(),
            node,
            changes: Changes::default(),
        }
    }

    /// Records that a task of (queue, type) left `from` and entered `to`.
    pub fn count(&mut self, queue: &str, task_type: &str, from: Option<State>, to: Option<State>) {
        self.changes.count(queue, task_type, from, to);
    }

    pub fn event(&mut self, kind: EventKind, task: &Task) {
        self.changes.event(&self.node.hub, kind, task);
    }

    pub fn cancel_requested(&mut self, id: Uuid) {
        self.changes.effects.cancels.push(id);
    }

    pub fn wake_workers(&mut self) {
        self.changes.effects.ready = Readiness::Anything;
    }

    /// Loads tasks by id, locked for update, in no particular order.
    pub async fn load_for_update(&mut self, ids: &[Uuid]) -> PgResult<HashMap<Uuid, StoredTask>> {
        crate::ids::find(&mut self.conn, ids, Lock::Update).await
    }

    /// Writes back every column the state machine may change, for all of
    /// `tasks` in one statement, which records what the transaction changed
    /// so far besides rows too.
    pub async fn write_rows(&mut self, tasks: &[&StoredTask]) -> PgResult<()> {
        self.write_rows_finding_dependents(tasks, &[])
            .await
            .map(drop)
    }

    /// Writes back `tasks` as [`Tx::write_rows`] does, with what the
    /// transaction changed so far besides rows, and answers whether any
    /// task depends on one of `finishing` (ids among them), in one round
    /// trip (`sql::WRITE_TASK_ROWS_RECORDING_CHANGES`): most transactions
    /// end with it, and their commit then has nothing to send first.
    async fn write_rows_finding_dependents(
        &mut self,
        tasks: &[&StoredTask],
        finishing: &[Uuid],
    ) -> PgResult<bool> {
        if tasks.is_empty() {
            return Ok(false);
        }
        let n = tasks.len();
        let mut seq = Vec::with_capacity(n);
        let mut state = Vec::with_capacity(n);
        let mut attempt = Vec::with_capacity(n);
        let mut max_attempts = Vec::with_capacity(n);
        let mut run_at = Vec::with_capacity(n);
        let mut progress = Vec::with_capacity(n);
        let mut result = Vec::with_capacity(n);
        let mut error = Vec::with_capacity(n);
        let mut errors = Vec::with_capacity(n);
        let mut cancel_requested = Vec::with_capacity(n);
        let mut updated_at = Vec::with_capacity(n);
        let mut started_at = Vec::with_capacity(n);
        let mut finished_at = Vec::with_capacity(n);
        let mut lease_expires_at = Vec::with_capacity(n);
        let mut deadline_at = Vec::with_capacity(n);
        let mut worker_id = Vec::with_capacity(n);
        for stored in tasks {
            let t = &stored.task;
            seq.push(stored.seq);
            state.push(t.state.code() as i16);
            attempt.push(t.attempt as i32);
            max_attempts.push(t.max_attempts as i32);
            run_at.push(t.run_at.as_millis());
            let read = &stored.as_stored;
            progress.push(unless_stored(
                t.progress.as_ref().map(encode_json).transpose()?,
                &read.progress,
            ));
            result.push(t.result.as_ref().map(|r| r.get().to_owned()));
            error.push(unless_stored(
                t.error.as_ref().map(encode_json).transpose()?,
                &read.error,
            ));
            let history = if t.errors.is_empty() {
                None
            } else {
                Some(encode_json(&t.errors)?)
            };
            errors.push(unless_stored(history, &read.errors));
            cancel_requested.push(t.cancel_requested);
            updated_at.push(t.updated_at.as_millis());
            started_at.push(t.started_at.map(|x| x.as_millis()));
            finished_at.push(t.finished_at.map(|x| x.as_millis()));
            lease_expires_at.push(t.lease_expires_at.map(|x| x.as_millis()));
            deadline_at.push(t.deadline().map(|x| x.as_millis()));
            worker_id.push(t.worker_id.clone());
        }
        let unrecorded = self.changes.take_unrecorded(&self.node.id);
        // A write with nothing else to record or ask (a heartbeat that
        // reported nothing) is the bare update.
        let bare = unrecorded.is_empty() && finishing.is_empty();
        let statement = if bare {
            crate::sql::WRITE_TASK_ROWS
        } else {
            crate::sql::WRITE_TASK_ROWS_RECORDING_CHANGES
        };
        let write = sqlx::query(statement)
            .bind(seq)
            .bind(state)
            .bind(attempt)
            .bind(max_attempts)
            .bind(run_at)
            .bind(progress)
            .bind(result)
            .bind(error)
            .bind(errors)
            .bind(cancel_requested)
            .bind(updated_at)
            .bind(started_at)
            .bind(finished_at)
            .bind(lease_expires_at)
            .bind(deadline_at)
            .bind(worker_id);
        if bare {
            write.execute(&mut *self.conn).await?;
            return Ok(false);
        }
        let row = self.fetch_with(write.bind(finishing), unrecorded).await?;
        Ok(sqlx::Row::try_get(&row, 0)?)
    }

    /// Runs `statement`, which takes in `sql::record_changes!` after its
    /// own parameters (bound) and answers `sql::recorded!`, with what the
    /// transaction changed so far besides rows.
    pub async fn fetch_recording(&mut self, statement: PgQuery<'_>) -> PgResult<PgRow> {
        let unrecorded = self.changes.take_unrecorded(&self.node.id);
        self.fetch_with(statement, unrecorded).await
    }

    async fn fetch_with(
        &mut self,
        statement: PgQuery<'_>,
        unrecorded: Unrecorded,
    ) -> PgResult<PgRow> {
        let row = unrecorded
            .bind(statement, &self.node)
            .fetch_one(&mut *self.conn)
            .await?;
        self.changes.recorded(sqlx::Row::try_get(&row, "freed")?);
        Ok(row)
    }

    /// Writes back tasks the state machine changed (each with the state it
    /// had before), and carries out what the changes imply: counts, events,
    /// unblocking or cancelling the tasks that depend on them.
    pub async fn save(&mut self, changed: Vec<(StoredTask, State)>) -> PgResult<()> {
        let mut pending = changed;
        while !pending.is_empty() {
            let finished: Vec<(Uuid, State)> = pending
                .iter()
                .filter(|(stored, before)| {
                    *before != stored.task.state && stored.task.state.is_finished()
                })
                .map(|(stored, _)| (stored.task.id, stored.task.state))
                .collect();
            let finishing: Vec<Uuid> = finished.iter().map(|(id, _)| *id).collect();
            // Counted before the write, which records the counts and
            // notifications with the rows.
            let mut left_blocked = Vec::new();
            for (stored, before) in &pending {
                let after = stored.task.state;
                if *before != after {
                    self.count(
                        &stored.task.queue,
                        &stored.task.task_type,
                        Some(*before),
                        Some(after),
                    );
                    if *before == State::Blocked {
                        left_blocked.push(stored.seq);
                    }
                }
                self.event(EventKind::State, &stored.task);
            }
            let rows: Vec<&StoredTask> = pending.iter().map(|(s, _)| s).collect();
            let dependents = self
                .write_rows_finding_dependents(&rows, &finishing)
                .await?;
            if !left_blocked.is_empty() {
                sqlx::query("DELETE FROM offload_task_deps WHERE task_seq = ANY($1)")
                    .bind(&left_blocked)
                    .execute(&mut *self.conn)
                    .await?;
            }
            pending = if dependents {
                self.resolve_dependents(&finished).await?
            } else {
                Vec::new()
            };
        }
        Ok(())
    }

    /// The blocked dependents of tasks that just finished, moved on: unblocked
    /// when every dependency completed, cancelled when one did not.
    ///
    /// A completed dependency's rows in `offload_task_deps` go as it
    /// completes, so each completion looks at each of its dependents' first
    /// row left, not at all of them, and reads each dependent once: read
    /// row by row of the join, 10,000 tasks that each waited for the same
    /// 100 made the ack of those 100 read a million rows and take 21 s
    /// (`bench/fan-out.py`).
    async fn resolve_dependents(
        &mut self,
        finished: &[(Uuid, State)],
    ) -> PgResult<Vec<(StoredTask, State)>> {
        if finished.is_empty() {
            return Ok(Vec::new());
        }
        let dep_ids: Vec<Uuid> = finished.iter().map(|(id, _)| *id).collect();
        // Locked: a dependency of the same task finishing in another
        // transaction waits for this one, or this one for it, and the
        // second sees what the first did.
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE {} ORDER BY seq FOR UPDATE",
            crate::sql::BLOCKED_DEPENDENTS_OF
        ))
        .bind(&dep_ids)
        .bind(State::Blocked.code() as i16)
        .fetch_all(&mut *self.conn)
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut order = Vec::with_capacity(rows.len());
        let mut moved: HashMap<i64, StoredTask> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let stored = decode(row)?;
            order.push(stored.seq);
            moved.insert(stored.seq, stored);
        }
        let mut not_met: HashMap<Uuid, State> = HashMap::new();
        let mut completed = Vec::new();
        for (id, state) in finished {
            if *state == State::Completed {
                completed.push(*id);
            } else {
                not_met.entry(*id).or_insert(*state);
            }
        }
        if !not_met.is_empty() {
            let ids: Vec<Uuid> = not_met.keys().copied().collect();
            let edges: Vec<(Uuid, i64)> = sqlx::query_as(
                "SELECT dep_id, task_seq FROM offload_task_deps WHERE dep_id = ANY($1) \
                 ORDER BY task_seq, dep_id",
            )
            .bind(&ids)
            .fetch_all(&mut *self.conn)
            .await?;
            for (dep_id, seq) in edges {
                let dependent = moved
                    .get_mut(&seq)
                    .filter(|d| d.task.state == State::Blocked);
                if let (Some(dependent), Some(dep_state)) = (dependent, not_met.get(&dep_id)) {
                    dependent
                        .task
                        .fail_dependency(dep_id, *dep_state, self.now)?;
                }
            }
        }
        if !completed.is_empty() {
            sqlx::query("DELETE FROM offload_task_deps WHERE dep_id = ANY($1)")
                .bind(&completed)
                .execute(&mut *self.conn)
                .await?;
            let blocked: Vec<i64> = order
                .iter()
                .copied()
                .filter(|seq| {
                    moved
                        .get(seq)
                        .is_some_and(|d| d.task.state == State::Blocked)
                })
                .collect();
            let waiting: HashSet<i64> = sqlx::query_scalar(crate::sql::WAITING_FOR_MORE)
                .bind(&blocked)
                .fetch_all(&mut *self.conn)
                .await?
                .into_iter()
                .collect();
            for seq in blocked.iter().filter(|seq| !waiting.contains(seq)) {
                if let Some(dependent) = moved.get_mut(seq) {
                    dependent.task.unblock(self.now)?;
                }
            }
        }
        Ok(order
            .into_iter()
            .filter_map(|seq| moved.remove(&seq))
            .filter(|s| s.task.state != State::Blocked)
            .map(|s| (s, State::Blocked))
            .collect())
    }

    /// Ends the transaction without effect, now, on a task of its own as
    /// the commit, so that its row locks do not outlive the caller's
    /// answer. A rollback that fails or gets no answer in time closes the
    /// connection, which ends the transaction on the server's side too.
    pub async fn rollback(mut self) {
        let limit = self.node.operation_timeout;
        let ended = tokio::spawn(async move {
            session::within(limit, session::end(&mut self.conn, "ROLLBACK")).await
        });
        let error = match ended.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.into_core().to_string(),
            Err(e) => e.to_string(),
        };
        // Throttled: an unreachable database fails every rollback alike.
        static ROLLBACK_FAILED: offload_core::LogThrottle = offload_core::LogThrottle::new();
        if let Some(not_logged) = ROLLBACK_FAILED.admit() {
            tracing::warn!(%error, not_logged, "rollback failed");
        }
    }

    /// Records the counts and notifications, commits, and announces the
    /// effects in this process, on a task of its own: a server drops a
    /// request's operation when its client goes away, and a commit dropped
    /// while COMMIT's answer is on its way would never announce the claim
    /// or enqueue it made (a worker waiting for it would sleep on). The
    /// task has the operation's time limit of its own, since its caller's
    /// does not reach it.
    pub async fn commit(self) -> PgResult<()> {
        let limit = self.node.operation_timeout;
        tokio::spawn(session::within(limit, self.commit_and_publish()))
            .await
            .map_err(|e| PgError::Core(Error::Storage(format!("committing: {e}"))))?
    }

    async fn commit_and_publish(mut self) -> PgResult<()> {
        let unrecorded = self.changes.take_unrecorded(&self.node.id);
        if !unrecorded.is_empty() {
            // The counts, every notification and whether a freed slot
            // was a limited queue's (then signalled as ready too) in one
            // round trip: a single write's rate is bound by its round
            // trips.
            self.fetch_with(sqlx::query(crate::sql::COUNT_AND_NOTIFY), unrecorded)
                .await?;
        }
        session::end(&mut self.conn, "COMMIT").await?;
        self.changes.publish(&self.node);
        Ok(())
    }
}
