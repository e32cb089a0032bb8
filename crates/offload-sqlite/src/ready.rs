//! The pending tasks in claim order, kept in the writer's memory instead of
//! an index of `tasks`.
//!
//! An index of pending tasks costs the writer an entry written when a task
//! is enqueued and a seek and a delete when it is claimed; the delete made a
//! claim's row write ~40% dearer (bench/HISTORY.md). The writer is the only
//! connection that changes `tasks`, so it can keep the same order in memory:
//! per (queue, type), the pending tasks by priority (highest first), then
//! `run_at`, then seq. It is built from `tasks` at open and changed with
//! every row the writer inserts or writes back.
//!
//! Changes are undone with the transaction that made them: every change is
//! logged until the group commits, and a savepoint or transaction rolled
//! back undoes the changes made after its mark.
//!
//! Since schema version 6 no index of `tasks` holds the pending tasks at
//! all: the index by state cost every enqueue an entry inserted among the
//! finished tasks' (SQLite's dearest kind of insert: 12,300 instructions a
//! row against 7,800 without it, `bench/HISTORY.md`) and every claim its
//! delete. Readers list pending tasks from [`PendingSeqs`], which the index
//! keeps beside its lanes. Like the running set (`running.rs`) it shows the
//! writer's changes before they commit, so a reader takes it for candidates
//! that its own snapshot confirms.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::sync::{Arc, Mutex};

use rustc_hash::{FxHashMap, FxHashSet};

use offload_core::{State, Task, Timestamp};

use crate::append_set::AppendSet;

/// A pending task's place in claim order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ReadyKey {
    pub priority: Reverse<u8>,
    pub run_at: i64,
    pub seq: i64,
}

impl ReadyKey {
    pub fn of(task: &Task, seq: i64) -> Self {
        Self {
            priority: Reverse(task.priority),
            run_at: task.run_at.as_millis(),
            seq,
        }
    }

    pub fn run_at(&self) -> Timestamp {
        Timestamp::from_millis(self.run_at)
    }
}

#[derive(Debug)]
enum Change {
    Added(usize, ReadyKey),
    Removed(usize, ReadyKey),
}

/// The pending tasks' seqs, for readers to list them newest first.
#[derive(Debug, Default)]
pub(crate) struct PendingSeqs {
    seqs: Mutex<AppendSet<i64>>,
}

impl PendingSeqs {
    fn seqs(&self) -> std::sync::MutexGuard<'_, AppendSet<i64>> {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `limit` pending tasks' seqs below `below` (from the newest
    /// when `None`), newest first.
    pub fn newest_first(&self, below: Option<i64>, limit: usize) -> Vec<i64> {
        let seqs = self.seqs();
        let below = below.unwrap_or(i64::MAX);
        seqs.below(below).take(limit).copied().collect()
    }

    fn set(&self, seq: i64, pending: bool) {
        let mut seqs = self.seqs();
        if pending {
            seqs.insert(seq);
        } else {
            seqs.remove(&seq);
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct ReadyIndex {
    /// The pending tasks of one (queue, type) each.
    lanes: Vec<AppendSet<ReadyKey>>,
    /// Their seqs, shared with readers.
    pending_seqs: Arc<PendingSeqs>,
    /// queue → type → lane.
    lane_of: FxHashMap<String, FxHashMap<String, usize>>,
    /// The queue of each lane, by its number in `queues`.
    lane_queue: Vec<usize>,
    /// Every queue a lane was made for, with its pending tasks.
    queues: Vec<QueuePending>,
    /// The numbers of the queues with pending tasks: a claim looks at
    /// those alone. It looked at every queue ever made, and with a million
    /// of them each claim took 0.8 s of the writer.
    busy: FxHashSet<usize>,
    /// Changes since the last commit, oldest first.
    changes: Vec<Change>,
}

#[derive(Debug)]
struct QueuePending {
    name: String,
    pending: usize,
}

impl ReadyIndex {
    /// Adds a pending task read from the table when the store opens
    /// (`load_memory` in `lib.rs`); unlogged, as nothing rolls it back.
    pub fn load_pending(&mut self, queue: &str, task_type: &str, key: ReadyKey) {
        let lane = self.lane(queue, task_type);
        if self.lanes[lane].insert(key) {
            self.entered(lane);
        }
    }

    /// Counts a task put in `lane`.
    fn entered(&mut self, lane: usize) {
        let queue = self.lane_queue[lane];
        let pending = &mut self.queues[queue].pending;
        *pending += 1;
        if *pending == 1 {
            self.busy.insert(queue);
        }
    }

    /// Counts a task taken out of `lane`.
    fn left(&mut self, lane: usize) {
        let queue = self.lane_queue[lane];
        let pending = &mut self.queues[queue].pending;
        *pending -= 1;
        if *pending == 0 {
            self.busy.remove(&queue);
        }
    }

    /// The queues with pending tasks, in no order.
    pub fn busy_queues(&self) -> impl Iterator<Item = &str> {
        self.busy
            .iter()
            .map(|&queue| self.queues[queue].name.as_str())
    }

    /// Whether `queue` has pending tasks.
    pub fn has_pending(&self, queue: &str) -> bool {
        self.lane_of
            .get(queue)
            .and_then(|types| types.values().next())
            .is_some_and(|&lane| self.queues[self.lane_queue[lane]].pending > 0)
    }

    /// Ends the load: the pending seqs readers list follow the lanes.
    pub fn loaded(self) -> Self {
        // In ascending order, so that every seq is appended.
        let mut seqs: Vec<i64> = self
            .lanes
            .iter()
            .flat_map(AppendSet::iter)
            .map(|key| key.seq)
            .collect();
        seqs.sort_unstable();
        let mut listed = self.pending_seqs.seqs();
        for seq in seqs {
            listed.insert(seq);
        }
        drop(listed);
        self
    }

    /// The seqs readers list pending tasks from.
    pub fn pending_seqs(&self) -> Arc<PendingSeqs> {
        Arc::clone(&self.pending_seqs)
    }

    fn lane(&mut self, queue: &str, task_type: &str) -> usize {
        if let Some(&lane) = self
            .lane_of
            .get(queue)
            .and_then(|types| types.get(task_type))
        {
            return lane;
        }
        let lane = self.lanes.len();
        self.lanes.push(AppendSet::default());
        let types = match self.lane_of.get_mut(queue) {
            Some(types) => types,
            None => self.lane_of.entry(queue.to_owned()).or_default(),
        };
        // A queue's lanes share its number: that of its first lane's.
        let number = match types.values().next() {
            Some(&first) => self.lane_queue[first],
            None => {
                self.queues.push(QueuePending {
                    name: queue.to_owned(),
                    pending: 0,
                });
                self.queues.len() - 1
            }
        };
        types.insert(task_type.to_owned(), lane);
        self.lane_queue.push(number);
        lane
    }

    /// Records a task row as it now stands: in the index if pending, out of
    /// it otherwise. A task leaving `pending` keeps its priority and
    /// `run_at` (the state machine changes `run_at` only on the way back
    /// in), so its key is found from the row as written.
    pub fn note(&mut self, task: &Task, seq: i64) {
        let key = ReadyKey::of(task, seq);
        if task.state == State::Pending {
            let lane = self.lane(&task.queue, &task.task_type);
            if self.lanes[lane].insert(key) {
                self.entered(lane);
                self.pending_seqs.set(seq, true);
                self.changes.push(Change::Added(lane, key));
            }
        } else if let Some(&lane) = self
            .lane_of
            .get(&task.queue)
            .and_then(|types| types.get(&task.task_type))
            && self.lanes[lane].remove(&key)
        {
            self.left(lane);
            self.pending_seqs.set(seq, false);
            self.changes.push(Change::Removed(lane, key));
        }
    }

    /// Takes a key out wherever it is listed (see `WriteCtx::tasks_by_seq`).
    pub fn drop_key(&mut self, key: &ReadyKey) {
        for lane in 0..self.lanes.len() {
            if self.lanes[lane].remove(key) {
                self.left(lane);
                self.pending_seqs.set(key.seq, false);
                self.changes.push(Change::Removed(lane, *key));
            }
        }
    }

    /// The first `room` pending tasks of `queue` in claim order, of the
    /// given types (any when empty).
    ///
    /// A merge of the types' lanes, not `room` of each: a claim over 200
    /// types took 500 of each and sorted 100,000 keys to keep 500.
    pub fn candidates(&self, queue: &str, types: &[String], room: usize) -> Vec<ReadyKey> {
        let mut chosen: Vec<usize> = match self.lane_of.get(queue) {
            None => Vec::new(),
            Some(lanes) if types.is_empty() => lanes.values().copied().collect(),
            Some(lanes) => types.iter().filter_map(|t| lanes.get(t).copied()).collect(),
        };
        // A type named twice is one lane, merged once.
        chosen.sort_unstable();
        chosen.dedup();
        if let [lane] = chosen[..] {
            return self.lanes[lane].iter().take(room).copied().collect();
        }
        let mut lanes: Vec<_> = chosen.iter().map(|&lane| self.lanes[lane].iter()).collect();
        let mut heads: BinaryHeap<Reverse<(ReadyKey, usize)>> = lanes
            .iter_mut()
            .enumerate()
            .filter_map(|(at, lane)| lane.next().map(|key| Reverse((*key, at))))
            .collect();
        let mut first = Vec::with_capacity(room.min(1024));
        while first.len() < room {
            let Some(Reverse((key, at))) = heads.pop() else {
                break;
            };
            first.push(key);
            if let Some(next) = lanes[at].next() {
                heads.push(Reverse((*next, at)));
            }
        }
        first
    }

    /// How the index disagrees with `pending`, the seqs of the table's
    /// pending tasks, if it does (`Store::verify_bookkeeping`).
    pub fn disagreement(&self, pending: &BTreeSet<i64>) -> Option<String> {
        let mut in_lanes = BTreeSet::new();
        for key in self.lanes.iter().flat_map(AppendSet::iter) {
            if !in_lanes.insert(key.seq) {
                return Some(format!("pending task {} is in two lanes", key.seq));
            }
        }
        if &in_lanes != pending {
            return Some(format!(
                "claim order holds {in_lanes:?}, the table's pending tasks are {pending:?}"
            ));
        }
        for (number, queue) in self.queues.iter().enumerate() {
            let in_lanes: usize = self.lane_of[&queue.name]
                .values()
                .map(|&lane| self.lanes[lane].len())
                .sum();
            if queue.pending != in_lanes || self.busy.contains(&number) != (in_lanes > 0) {
                return Some(format!(
                    "queue {} is counted with {} pending tasks (busy: {}), its lanes hold {in_lanes}",
                    queue.name,
                    queue.pending,
                    self.busy.contains(&number)
                ));
            }
        }
        let listed: BTreeSet<i64> = self.pending_seqs.seqs().iter().copied().collect();
        (&listed != pending)
            .then(|| format!("the listed pending seqs are {listed:?}, the table's {pending:?}"))
    }

    /// Where the log stands; see [`ReadyIndex::roll_back_to`].
    pub fn mark(&self) -> usize {
        self.changes.len()
    }

    /// Undoes the changes made since `mark`, newest first.
    pub fn roll_back_to(&mut self, mark: usize) {
        while self.changes.len() > mark {
            match self.changes.pop() {
                Some(Change::Added(lane, key)) => {
                    if self.lanes[lane].remove(&key) {
                        self.left(lane);
                    }
                    self.pending_seqs.set(key.seq, false);
                }
                Some(Change::Removed(lane, key)) => {
                    if self.lanes[lane].insert(key) {
                        self.entered(lane);
                    }
                    self.pending_seqs.set(key.seq, true);
                }
                None => break,
            }
        }
    }

    /// The transaction committed: its changes stay.
    pub fn commit(&mut self) {
        self.changes.clear();
    }
}

#[cfg(test)]
mod tests {
    use offload_core::{Limits, NewTask, State, Task, Timestamp};
    use uuid::Uuid;

    use super::{ReadyIndex, ReadyKey};

    fn task(queue: &str, task_type: &str, priority: i64, run_at: i64) -> Task {
        let spec = NewTask::new(task_type)
            .queue(queue)
            .priority(priority)
            .validate(&Limits::default(), offload_core::Position::Alone)
            .expect("a valid task");
        let mut task = Task::new_from_spec(Uuid::now_v7(), spec, Timestamp::from_millis(0), false);
        task.run_at = Timestamp::from_millis(run_at);
        task
    }

    fn seqs(index: &ReadyIndex, queue: &str, types: &[&str], room: usize) -> Vec<i64> {
        let types: Vec<String> = types.iter().map(|t| t.to_string()).collect();
        index
            .candidates(queue, &types, room)
            .into_iter()
            .map(|k| k.seq)
            .collect()
    }

    #[test]
    fn candidates_come_by_priority_then_run_at_then_seq_across_types() {
        let mut index = ReadyIndex::default();
        index.note(&task("q", "a", 5, 10), 1);
        index.note(&task("q", "a", 9, 20), 2);
        index.note(&task("q", "a", 5, 5), 3);
        index.note(&task("q", "a", 5, 5), 4);
        index.note(&task("q", "b", 1, 0), 5);
        index.note(&task("other", "a", 10, 0), 6);
        assert_eq!(seqs(&index, "q", &["a"], 10), [2, 3, 4, 1]);
        assert_eq!(seqs(&index, "q", &["a"], 2), [2, 3]);
        assert_eq!(seqs(&index, "q", &[], 10), [2, 3, 4, 1, 5]);
        assert_eq!(seqs(&index, "q", &["b", "c"], 10), [5]);
        // The first `room` of all the types, not `room` of each.
        assert_eq!(seqs(&index, "q", &[], 3), [2, 3, 4]);
        assert_eq!(seqs(&index, "q", &["b", "a"], 4), [2, 3, 4, 1]);
        assert_eq!(seqs(&index, "q", &["a", "a"], 10), [2, 3, 4, 1]);
        assert!(seqs(&index, "none", &[], 10).is_empty());
    }

    #[test]
    fn a_task_leaves_when_written_in_another_state_and_rollback_restores_it() {
        let mut index = ReadyIndex::default();
        let mut first = task("q", "a", 5, 0);
        index.note(&first, 1);
        index.note(&task("q", "a", 5, 0), 2);
        index.commit();
        let mark = index.mark();
        first.state = State::Running;
        index.note(&first, 1);
        index.note(&task("q", "a", 5, 0), 3);
        assert_eq!(seqs(&index, "q", &[], 10), [2, 3]);
        assert_eq!(index.pending_seqs().newest_first(None, 10), [3, 2]);
        index.roll_back_to(mark);
        assert_eq!(seqs(&index, "q", &[], 10), [1, 2]);
        assert_eq!(index.pending_seqs().newest_first(None, 10), [2, 1]);
        assert_eq!(index.pending_seqs().newest_first(Some(2), 10), [1]);
        // Written twice in one state, a task is listed once and a rollback
        // of the second write leaves it listed.
        let again = task("q", "a", 5, 0);
        index.note(&again, 2);
        index.roll_back_to(mark);
        assert_eq!(seqs(&index, "q", &[], 10), [1, 2]);
    }

    #[test]
    fn a_dropped_key_leaves_its_lane_until_rolled_back() {
        let mut index = ReadyIndex::default();
        let listed = task("q", "a", 5, 0);
        index.note(&listed, 1);
        index.note(&task("q", "b", 5, 0), 2);
        index.commit();
        let mark = index.mark();
        index.drop_key(&ReadyKey::of(&listed, 1));
        assert_eq!(seqs(&index, "q", &[], 10), [2]);
        assert_eq!(index.pending_seqs().newest_first(None, 10), [2]);
        index.roll_back_to(mark);
        assert_eq!(seqs(&index, "q", &[], 10), [1, 2]);
        assert_eq!(index.pending_seqs().newest_first(None, 1), [2]);
    }
}
