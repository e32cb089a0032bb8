//! Pending tasks' rows as their enqueue wrote them, kept by the writer so
//! that claiming one need not read it back.
//!
//! A claim answers with whole tasks, and read them from `tasks` first: with
//! a client fetching and acking 500 at a time, that read and the decoding
//! of its rows were a fifth of the writer's time (bench/HISTORY.md). Most
//! tasks are claimed soon after their enqueue, by the same writer that
//! inserted them, so the writer keeps what it inserted.
//!
//! A row kept here is the row in `tasks` as this writer's transaction sees
//! it, which holds because every change of a task row passes through the
//! writer, which reads a row before it changes it: a claim takes its rows
//! out, any other read of a pending row to change it forgets the row
//! (`WriteCtx::forget_kept`), and a rolled-back savepoint or commit
//! forgets every row, as it may have undone inserts whose seqs later tasks
//! will take. Only pending rows are kept,
//! the ones a claim reads, within a bound on their memory; a row not kept
//! is read from `tasks` as before.

use std::collections::BTreeMap;

use offload_core::{Json, State, Task, Timestamp};
use uuid::Uuid;

use crate::pair_names::PairNames;
use crate::seq_map::SeqMap;

/// Bytes the kept rows may take, as [`PendingRows`] estimates them: about
/// 150,000 tasks with small payloads.
const MAX_BYTES: usize = 32 << 20;

pub(crate) struct PendingRows {
    /// In seq order: rows are kept and taken mostly in seq order (an
    /// enqueue's, then claim order); with a hash that scattered them,
    /// `remember` was 6% of the writer's samples through batch enqueues.
    rows: SeqMap<KeptRow>,
    /// The (queue, type) pairs of the rows kept so far, each once; as few
    /// as the lanes of claim order (`ready.rs`), which keep theirs too.
    names: PairNames,
    /// When `names` holds this many pairs, those no kept row names are
    /// dropped: with a queue per customer or per job, the pairs of rows
    /// long claimed would otherwise stay for as long as the node runs.
    compact_names_at: usize,
    bytes: usize,
}

/// The fewest pairs [`PendingRows::names`] is let hold before it drops
/// the unused ones.
const COMPACT_NAMES_FROM: usize = 1024;

/// A task row as its enqueue left it, without what every new task has
/// (no attempt yet, no worker, no result, ...): kept small, so that more
/// rows fit the bound and keeping one costs an enqueue little.
#[derive(Clone)]
struct KeptRow {
    id: Uuid,
    /// In [`PendingRows::names`].
    names: usize,
    payload: Json,
    priority: u8,
    max_attempts: u32,
    timeout_secs: u32,
    run_at: Timestamp,
    created_at: Timestamp,
    /// What few tasks carry.
    extra: Option<Box<Extra>>,
}

#[derive(Clone)]
struct Extra {
    owner: Option<String>,
    labels: BTreeMap<String, String>,
    unique_key: Option<String>,
    depends_on: Vec<Uuid>,
}

impl Default for PendingRows {
    fn default() -> Self {
        Self {
            rows: SeqMap::default(),
            names: PairNames::default(),
            compact_names_at: COMPACT_NAMES_FROM,
            bytes: 0,
        }
    }
}

impl PendingRows {
    /// Keeps a row just inserted, if it is a pending task as enqueued and
    /// there is room.
    pub fn remember(&mut self, seq: i64, task: &Task) {
        // Spelled out whole, so that a new field of `Task` must be placed
        // here: kept, or known to be as every new task has it.
        let Task {
            id,
            task_type,
            queue,
            payload,
            priority,
            state,
            attempt,
            max_attempts,
            timeout_secs,
            run_at,
            owner,
            labels,
            unique_key,
            depends_on,
            progress,
            result,
            error,
            errors,
            cancel_requested,
            created_at,
            updated_at,
            started_at,
            finished_at,
            lease_expires_at,
            worker_id,
        } = task;
        let as_enqueued = *state == State::Pending
            && *attempt == 0
            && progress.is_none()
            && result.is_none()
            && error.is_none()
            && errors.is_empty()
            && !cancel_requested
            && updated_at == created_at
            && started_at.is_none()
            && finished_at.is_none()
            && lease_expires_at.is_none()
            && worker_id.is_none();
        // Full, as with a backlog past the bound: not even the payload is
        // copied.
        if !as_enqueued || self.bytes + KeptRow::SMALLEST > MAX_BYTES {
            return;
        }
        if self.names.len() >= self.compact_names_at {
            self.drop_unused_names();
        }
        let plain =
            owner.is_none() && labels.is_empty() && unique_key.is_none() && depends_on.is_empty();
        let row = KeptRow {
            id: *id,
            names: self.names.place(queue, task_type),
            payload: payload.clone(),
            priority: *priority,
            max_attempts: *max_attempts,
            timeout_secs: *timeout_secs,
            run_at: *run_at,
            created_at: *created_at,
            extra: (!plain).then(|| {
                Box::new(Extra {
                    owner: owner.clone(),
                    labels: labels.clone(),
                    unique_key: unique_key.clone(),
                    depends_on: depends_on.clone(),
                })
            }),
        };
        let size = row.estimated_size();
        if self.bytes + size > MAX_BYTES {
            return;
        }
        if let Some(replaced) = self.rows.insert(seq, row) {
            self.bytes -= replaced.estimated_size();
        }
        self.bytes += size;
    }

    /// Takes out the row of `seq`, if kept, as the task it is.
    pub fn take(&mut self, seq: i64) -> Option<Box<Task>> {
        let row = self.rows.remove(&seq)?;
        self.bytes -= row.estimated_size();
        Some(self.task(row))
    }

    fn task(&self, row: KeptRow) -> Box<Task> {
        let (queue, task_type) = self.names.get(row.names);
        let extra = row.extra.map_or(
            Extra {
                owner: None,
                labels: BTreeMap::new(),
                unique_key: None,
                depends_on: Vec::new(),
            },
            |extra| *extra,
        );
        Box::new(Task {
            id: row.id,
            task_type: task_type.clone(),
            queue: queue.clone(),
            payload: row.payload,
            priority: row.priority,
            state: State::Pending,
            attempt: 0,
            max_attempts: row.max_attempts,
            timeout_secs: row.timeout_secs,
            run_at: row.run_at,
            owner: extra.owner,
            labels: extra.labels,
            unique_key: extra.unique_key,
            depends_on: extra.depends_on,
            progress: None,
            result: None,
            error: None,
            errors: Vec::new(),
            cancel_requested: false,
            created_at: row.created_at,
            updated_at: row.created_at,
            started_at: None,
            finished_at: None,
            lease_expires_at: None,
            worker_id: None,
        })
    }

    /// The row of `seq` is about to change: it will no longer be as kept.
    pub fn forget(&mut self, seq: i64) {
        if let Some(row) = self.rows.remove(&seq) {
            self.bytes -= row.estimated_size();
        }
    }

    pub fn forget_all(&mut self) {
        self.rows.clear();
        self.names = PairNames::default();
        self.compact_names_at = COMPACT_NAMES_FROM;
        self.bytes = 0;
    }

    /// Keeps only the pairs kept rows name: a pass over the rows, once
    /// the pairs have doubled since the last.
    fn drop_unused_names(&mut self) {
        let mut names = PairNames::default();
        for row in self.rows.values_mut() {
            let (queue, task_type) = self.names.get(row.names);
            row.names = names.place(queue, task_type);
        }
        self.names = names;
        self.compact_names_at = COMPACT_NAMES_FROM.max(2 * self.names.len());
    }

    /// Every kept row as the task it is, for `WriteCtx::verify_bookkeeping`.
    pub fn tasks(&self) -> Vec<(i64, Task)> {
        self.rows
            .iter()
            .map(|(seq, row)| (*seq, *self.task(row.clone())))
            .collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.rows.len()
    }
}

impl KeptRow {
    /// What a row with an empty payload and nothing extra costs.
    const SMALLEST: usize = 2 * (std::mem::size_of::<i64>() + std::mem::size_of::<Self>());

    /// What the row costs: its place in the map, twice for the map's spare
    /// room, and what it holds on the heap, each allocation rounded up.
    fn estimated_size(&self) -> usize {
        let heap = |len: usize| len.next_multiple_of(16);
        Self::SMALLEST
            + heap(self.payload.get().len())
            + self.extra.as_ref().map_or(0, |e| {
                heap(std::mem::size_of::<Extra>())
                    + e.owner.as_ref().map_or(0, |o| heap(o.len()))
                    + e.unique_key.as_ref().map_or(0, |k| heap(k.len()))
                    + e.labels
                        .iter()
                        .map(|(k, v)| 64 + heap(k.len()) + heap(v.len()))
                        .sum::<usize>()
                    + heap(e.depends_on.len() * 16)
            })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use offload_core::{
        Ack, ClaimRequest, Limits, NewTask, OnConflict, Position, Store, Timestamp,
    };
    use uuid::Uuid;

    use super::*;
    use crate::{SqliteOptions, SqliteStore};

    fn spec(task: NewTask) -> offload_core::TaskSpec {
        task.validate(&Limits::default(), Position::Alone).unwrap()
    }

    /// The seqs of the rows the store's writer keeps now.
    async fn kept(store: &SqliteStore) -> Vec<i64> {
        let mut seqs = store
            .writer
            .run(|ctx| {
                Ok(ctx
                    .pending_rows
                    .tasks()
                    .into_iter()
                    .map(|(seq, _)| seq)
                    .collect::<Vec<_>>())
            })
            .await
            .unwrap();
        seqs.sort_unstable();
        seqs
    }

    fn claim(limit: usize) -> ClaimRequest {
        ClaimRequest {
            worker_id: "w".into(),
            types: Vec::new(),
            queues: Vec::new(),
            limit,
            lease: std::time::Duration::from_secs(60),
        }
    }

    /// Every way a task is inserted keeps it as the table holds it, every
    /// write forgets it, and a claim answers with what a read of the table
    /// would have given (`verify_bookkeeping` compares each kept row with
    /// its row).
    #[tokio::test]
    async fn kept_rows_are_the_pending_rows_as_the_table_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db"), SqliteOptions::default()).unwrap();
        let labels = BTreeMap::from([("team".to_owned(), "ü ∑".to_owned())]);
        let (first, _) = store
            .enqueue(vec![spec(
                NewTask::new("one")
                    .queue("q1")
                    .priority(7)
                    .max_attempts(9)
                    .timeout_secs(11)
                    .owner("user-1")
                    .label("team", "ü ∑")
                    .payload(&serde_json::json!({"text": "a \"quoted\" ü", "n": [1, 2.5]}))
                    .unwrap(),
            )])
            .await
            .unwrap()
            .remove(0);
        // A batch inserts many rows to a statement.
        let batch: Vec<_> = (0..70)
            .map(|i| {
                spec(
                    NewTask::new("many")
                        .payload(&serde_json::json!({ "i": i }))
                        .unwrap(),
                )
            })
            .collect();
        store.enqueue(batch).await.unwrap();
        // A unique key and met dependencies go one row at a time; a
        // scheduled task and a blocked one are not pending.
        store
            .enqueue(vec![
                spec(NewTask::new("unique").unique_key("k", OnConflict::Keep)),
                spec(NewTask::new("later").delay(std::time::Duration::from_secs(60))),
                spec(NewTask::new("blocked").depends_on(first.id)),
            ])
            .await
            .unwrap();
        assert_eq!(kept(&store).await.len(), 72);
        store.verify_bookkeeping().await.unwrap();

        // A cancel writes a row back: it is no longer kept.
        let unique = store
            .list(&offload_core::ListQuery {
                task_type: Some("unique".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .tasks
            .remove(0);
        store.cancel(unique.id).await.unwrap();
        assert_eq!(kept(&store).await.len(), 71);
        store.verify_bookkeeping().await.unwrap();

        // Claimed from memory, the first task is what was enqueued, now
        // running.
        let claimed = store.claim(&claim(1)).await.unwrap().remove(0);
        assert_eq!(claimed.id, first.id);
        assert_eq!(claimed.labels, labels);
        assert_eq!(claimed.owner.as_deref(), Some("user-1"));
        assert_eq!(claimed.payload.get(), first.payload.get());
        assert_eq!(
            (claimed.priority, claimed.max_attempts, claimed.timeout_secs),
            (7, 9, 11)
        );
        assert_eq!(claimed.state, State::Running);
        store.verify_bookkeeping().await.unwrap();
        store
            .ack(
                "w",
                vec![Ack::Complete {
                    id: claimed.id,
                    result: None,
                }],
            )
            .await
            .unwrap();
        // Its dependent is pending now, written back, so read when claimed.
        let claimed: Vec<Task> = store.claim(&claim(100)).await.unwrap();
        assert_eq!(claimed.len(), 71);
        assert!(claimed.iter().any(|t| t.task_type == "blocked"));
        assert!(kept(&store).await.is_empty());
        store.verify_bookkeeping().await.unwrap();
    }

    /// An operation that fails after inserting rows rolls them back, and
    /// the writer forgets what it kept: the next tasks take those seqs.
    #[tokio::test]
    async fn a_rolled_back_enqueue_leaves_no_kept_row_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db"), SqliteOptions::default()).unwrap();
        let failing = vec![
            spec(NewTask::new("gone")),
            spec(NewTask::new("gone").depends_on(Uuid::now_v7())),
        ];
        store.enqueue(failing).await.unwrap_err();
        assert!(kept(&store).await.is_empty());
        store
            .enqueue(vec![spec(
                NewTask::new("taken").delay(std::time::Duration::from_secs(60)),
            )])
            .await
            .unwrap();
        store.verify_bookkeeping().await.unwrap();
        store
            .enqueue(vec![spec(NewTask::new("next"))])
            .await
            .unwrap();
        let claimed = store.claim(&claim(10)).await.unwrap();
        assert_eq!(
            claimed
                .iter()
                .map(|t| t.task_type.as_str())
                .collect::<Vec<_>>(),
            ["next"]
        );
        store.verify_bookkeeping().await.unwrap();
    }

    fn task(payload_bytes: usize) -> Task {
        let spec = NewTask::new("t")
            .payload(&serde_json::json!({ "data": "x".repeat(payload_bytes) }))
            .unwrap()
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        Task::new_from_spec(Uuid::now_v7(), spec, Timestamp::from_millis(0), false)
    }

    #[test]
    fn only_pending_rows_are_kept_and_a_take_or_forget_ends_it() {
        let mut rows = PendingRows::default();
        let mut running = task(10);
        running.state = State::Running;
        rows.remember(1, &running);
        assert!(rows.take(1).is_none());
        rows.remember(2, &task(10));
        rows.remember(3, &task(10));
        assert_eq!(rows.take(2).map(|t| t.state), Some(State::Pending));
        assert!(rows.take(2).is_none());
        rows.forget(3);
        assert!(rows.take(3).is_none());
        assert_eq!(rows.bytes, 0);
        // A pending task that ran before is not as enqueued.
        let mut retried = task(10);
        retried.attempt = 1;
        rows.remember(4, &retried);
        assert!(rows.take(4).is_none());
        // Each row comes back with its own queue and type.
        let mut other = task(10);
        other.task_type = "u".into();
        other.queue = "q2".into();
        rows.remember(5, &task(10));
        rows.remember(6, &other);
        rows.remember(7, &task(10));
        let names = |t: Box<Task>| (t.queue, t.task_type);
        assert_eq!(rows.take(6).map(names), Some(("q2".into(), "u".into())));
        assert_eq!(
            rows.take(7).map(names),
            Some(("default".into(), "t".into()))
        );
        assert_eq!(
            rows.take(5).map(names),
            Some(("default".into(), "t".into()))
        );
    }

    #[test]
    fn pairs_no_kept_row_names_are_dropped_as_new_ones_come() {
        let mut rows = PendingRows::default();
        let in_queue = |i: i64| {
            let mut task = task(10);
            task.queue = format!("q{i}");
            task
        };
        // Every tenth row stays kept; the others are claimed at once.
        for seq in 0..10 * COMPACT_NAMES_FROM as i64 {
            rows.remember(seq, &in_queue(seq));
            if seq % 10 != 0 {
                rows.take(seq).unwrap();
            }
        }
        assert!(
            rows.names.len() < COMPACT_NAMES_FROM * 2,
            "{} pairs held for {} rows",
            rows.names.len(),
            rows.len()
        );
        for seq in (0..10 * COMPACT_NAMES_FROM as i64).step_by(10) {
            assert_eq!(rows.take(seq).map(|t| t.queue), Some(format!("q{seq}")));
        }
        assert_eq!((rows.len(), rows.bytes), (0, 0));
    }

    #[test]
    fn rows_past_the_memory_bound_are_not_kept_until_room_is_made() {
        let mut rows = PendingRows::default();
        let big = task(1 << 19);
        rows.remember(-1, &big);
        let fit = MAX_BYTES / rows.bytes;
        rows.forget(-1);
        for seq in 0..fit + 5 {
            rows.remember(i64::try_from(seq).unwrap(), &big);
        }
        assert_eq!(rows.len(), fit);
        assert!(rows.bytes <= MAX_BYTES);
        let past = i64::try_from(fit).unwrap();
        assert!(rows.take(past).is_none());
        rows.take(0).unwrap();
        rows.remember(past, &big);
        assert!(rows.take(past).is_some());
        rows.forget_all();
        assert_eq!((rows.len(), rows.bytes), (0, 0));
    }
}
