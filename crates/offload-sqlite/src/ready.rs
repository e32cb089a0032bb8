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

use rustc_hash::FxHashMap;

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

    /// Whether task `seq` is pending.
    pub fn contains(&self, seq: i64) -> bool {
        self.seqs().contains(&seq)
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
    /// Each lane's (queue, type); empty names for a free lane.
    lane_names: Vec<(String, String)>,
    /// Lanes emptied and forgotten at a commit, whose places new lanes
    /// take: an application that makes a queue per customer or per job
    /// would otherwise keep every (queue, type) it ever used, ~1.4 KB each
    /// across the writer's memory (400,000 such queues, all their tasks
    /// done and cleared: 583 MB resident; 13 MB after a restart).
    free: Vec<usize>,
    /// Lanes a rollback emptied: they are freed at the next commit if
    /// still empty, as those a claim emptied are.
    emptied_by_rollback: Vec<usize>,
    /// The first key of every lane that has one, with the lane, in claim
    /// order: a claim from all queues walks these, best first, and stops
    /// when it has enough ([`ReadyIndex::first_across_queues`]). It asked
    /// every queue for its first tasks and sorted them all, and with
    /// 10,000 queues with tasks each claim took the writer 7 ms.
    heads: BTreeSet<(ReadyKey, usize)>,
    /// Each lane's first key as `heads` holds it.
    head_of: Vec<Option<ReadyKey>>,
    /// Lanes changed since `heads` last followed them: it is brought up
    /// to date when a claim needs it, once for each lane however many of
    /// its tasks came and went.
    stale: Vec<usize>,
    is_stale: Vec<bool>,
    /// Changes since the last commit, oldest first.
    changes: Vec<Change>,
}

impl ReadyIndex {
    /// Adds a pending task read from the table when the store opens
    /// (`load_memory` in `lib.rs`); unlogged, as nothing rolls it back.
    pub fn load_pending(&mut self, queue: &str, task_type: &str, key: ReadyKey) {
        let lane = self.lane(queue, task_type);
        self.lanes[lane].insert(key);
        self.changed(lane);
    }

    /// Notes that `lane` changed, for `heads`.
    fn changed(&mut self, lane: usize) {
        if !self.is_stale[lane] {
            self.is_stale[lane] = true;
            self.stale.push(lane);
        }
    }

    /// Brings `heads` up to date with the lanes.
    fn refresh_heads(&mut self) {
        for lane in self.stale.drain(..) {
            self.is_stale[lane] = false;
            let first = self.lanes[lane].first().copied();
            if first == self.head_of[lane] {
                continue;
            }
            if let Some(old) = self.head_of[lane] {
                self.heads.remove(&(old, lane));
            }
            if let Some(new) = first {
                self.heads.insert((new, lane));
            }
            self.head_of[lane] = first;
        }
    }

    /// Ends the load: the pending seqs readers list follow the lanes, and
    /// the lanes' first tasks are in order before the first claim needs
    /// them (with a million lanes, 0.22 s that claim waited).
    pub fn loaded(mut self) -> Self {
        self.refresh_heads();
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
        let names = (queue.to_owned(), task_type.to_owned());
        let lane = if let Some(lane) = self.free.pop() {
            self.lane_names[lane] = names;
            lane
        } else {
            self.lanes.push(AppendSet::default());
            self.lane_names.push(names);
            self.head_of.push(None);
            self.is_stale.push(false);
            self.lanes.len() - 1
        };
        self.lane_of
            .entry(queue.to_owned())
            .or_default()
            .insert(task_type.to_owned(), lane);
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
                self.changed(lane);
                self.pending_seqs.set(seq, true);
                self.changes.push(Change::Added(lane, key));
            }
        } else if let Some(&lane) = self
            .lane_of
            .get(&task.queue)
            .and_then(|types| types.get(&task.task_type))
            && self.lanes[lane].remove(&key)
        {
            self.changed(lane);
            self.pending_seqs.set(seq, false);
            self.changes.push(Change::Removed(lane, key));
        }
    }

    /// Takes a key out wherever it is listed (see `WriteCtx::tasks_by_seq`).
    pub fn drop_key(&mut self, key: &ReadyKey) {
        for lane in 0..self.lanes.len() {
            if self.lanes[lane].remove(key) {
                self.changed(lane);
                self.pending_seqs.set(key.seq, false);
                self.changes.push(Change::Removed(lane, *key));
            }
        }
    }

    /// The first `limit` pending tasks of all queues in claim order, of
    /// the given types (any when empty), with each one's queue; no more of
    /// a queue than `room_in` it (asked once for each queue met).
    ///
    /// A merge that starts from the lanes' first tasks (`heads`) and opens
    /// a lane when its first is the best left: it looks at the lanes that
    /// give tasks and those it passes over (of other types, of queues
    /// paused or full), never at all of them.
    pub fn first_across_queues(
        &mut self,
        types: &[String],
        limit: usize,
        mut room_in: impl FnMut(&str) -> usize,
    ) -> Vec<(ReadyKey, &str)> {
        self.refresh_heads();
        let lanes = &self.lanes;
        let names = &self.lane_names;
        let mut room: FxHashMap<&str, usize> = FxHashMap::default();
        let mut heads = self.heads.iter().peekable();
        // Opened lanes: their keys after those taken, and the next of each.
        let mut opened: Vec<(usize, std::iter::Skip<_>)> = Vec::new();
        let mut next: BinaryHeap<Reverse<(ReadyKey, usize)>> = BinaryHeap::new();
        let mut first = Vec::with_capacity(limit.min(1024));
        while first.len() < limit {
            let next_opened = next.peek().map(|Reverse((key, _))| *key);
            let next_head = heads.peek().map(|(key, _)| *key);
            let (key, lane, at) = match (next_opened, next_head) {
                (None, None) => break,
                (Some(opened_key), head) if head.is_none_or(|head| opened_key < head) => {
                    let Some(Reverse((key, at))) = next.pop() else {
                        break;
                    };
                    (key, opened[at].0, Some(at))
                }
                _ => {
                    let Some(&(key, lane)) = heads.next() else {
                        break;
                    };
                    let (_, task_type) = &names[lane];
                    if !types.is_empty() && !types.contains(task_type) {
                        continue;
                    }
                    (key, lane, None)
                }
            };
            let queue = names[lane].0.as_str();
            let left = room.entry(queue).or_insert_with(|| room_in(queue));
            if *left == 0 {
                // The queue is full: its lanes give nothing more.
                continue;
            }
            *left -= 1;
            first.push((key, queue));
            let at = at.unwrap_or_else(|| {
                opened.push((lane, lanes[lane].iter().skip(1)));
                opened.len() - 1
            });
            if let Some(after) = opened[at].1.next() {
                next.push(Reverse((*after, at)));
            }
        }
        first
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
        for (lane, ready) in self.lanes.iter().enumerate() {
            let held = self.head_of[lane];
            let in_heads = held.is_some_and(|head| self.heads.contains(&(head, lane)));
            if held.is_some() != in_heads
                || (!self.is_stale[lane] && held.as_ref() != ready.first())
            {
                return Some(format!(
                    "lane {lane}'s first task is {:?}, the heads hold {held:?}",
                    ready.first()
                ));
            }
        }
        let mut named = 0;
        for (queue, types) in &self.lane_of {
            for (task_type, &lane) in types {
                named += 1;
                if self.lane_names[lane] != (queue.clone(), task_type.clone()) {
                    return Some(format!(
                        "lane {lane} of ({queue}, {task_type}) is named {:?}",
                        self.lane_names[lane]
                    ));
                }
            }
        }
        let listed_free: rustc_hash::FxHashSet<usize> = self.free.iter().copied().collect();
        if listed_free.len() != self.free.len() {
            return Some("a lane is listed free twice".to_owned());
        }
        for (lane, (queue, _)) in self.lane_names.iter().enumerate() {
            let free = queue.is_empty();
            if free && (!self.lanes[lane].is_empty() || !listed_free.contains(&lane)) {
                return Some(format!(
                    "free lane {lane} holds tasks or is not listed free"
                ));
            }
            // Only what a rollback emptied waits for a commit to be freed.
            if !free && self.lanes[lane].is_empty() && !self.emptied_by_rollback.contains(&lane) {
                return Some(format!("lane {lane} of {queue} is empty and kept"));
            }
        }
        if named + self.free.len() != self.lanes.len() {
            return Some(format!(
                "{named} lanes named and {} free of {}",
                self.free.len(),
                self.lanes.len()
            ));
        }
        if self.heads.len() != self.head_of.iter().flatten().count() {
            return Some("the heads hold a lane twice".to_owned());
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
                    self.lanes[lane].remove(&key);
                    self.changed(lane);
                    self.pending_seqs.set(key.seq, false);
                    self.emptied_by_rollback.push(lane);
                }
                Some(Change::Removed(lane, key)) => {
                    self.lanes[lane].insert(key);
                    self.changed(lane);
                    self.pending_seqs.set(key.seq, true);
                }
                None => break,
            }
        }
    }

    /// The transaction committed: its changes stay, and the lanes it
    /// emptied are forgotten. Only here: until the commit, the log names
    /// lanes by their places, and a rollback may fill them again.
    pub fn commit(&mut self) {
        let mut changes = std::mem::take(&mut self.changes);
        let emptied = changes
            .drain(..)
            .filter_map(|change| match change {
                Change::Removed(lane, _) => Some(lane),
                Change::Added(..) => None,
            })
            .chain(std::mem::take(&mut self.emptied_by_rollback));
        let mut freed = Vec::new();
        for lane in emptied {
            if self.lanes[lane].is_empty() && !self.lane_names[lane].0.is_empty() {
                freed.push(lane);
                // Names emptied now, so that a lane emptied twice is freed once.
                let (queue, task_type) = std::mem::take(&mut self.lane_names[lane]);
                if let Some(types) = self.lane_of.get_mut(&queue) {
                    types.remove(&task_type);
                    if types.is_empty() {
                        self.lane_of.remove(&queue);
                    }
                }
                if let Some(head) = self.head_of[lane].take() {
                    self.heads.remove(&(head, lane));
                }
            }
        }
        self.free.extend(freed);
        // The log's allocation is kept for the next transaction.
        self.changes = changes;
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

    fn across(index: &mut ReadyIndex, types: &[&str], limit: usize, full: &[&str]) -> Vec<i64> {
        let types: Vec<String> = types.iter().map(|t| t.to_string()).collect();
        let mut asked = Vec::new();
        let first = index
            .first_across_queues(&types, limit, |queue| {
                asked.push(queue.to_owned());
                if full.contains(&queue) { 0 } else { 2 }
            })
            .into_iter()
            .map(|(key, _)| key.seq)
            .collect();
        asked.sort();
        let before = asked.len();
        asked.dedup();
        assert_eq!(before, asked.len(), "a queue's room asked twice");
        first
    }

    #[test]
    fn the_first_across_queues_come_in_claim_order_within_each_queues_room() {
        let mut index = ReadyIndex::default();
        index.note(&task("q1", "a", 5, 10), 1);
        index.note(&task("q1", "a", 9, 20), 2);
        index.note(&task("q1", "b", 5, 5), 3);
        index.note(&task("q2", "a", 5, 5), 4);
        index.note(&task("q2", "a", 5, 1), 5);
        index.note(&task("q3", "b", 1, 0), 6);
        index.note(&task("q3", "a", 9, 30), 7);
        // Room of two a queue: q1 gives 2 and 3, not 1.
        assert_eq!(across(&mut index, &[], 10, &[]), [2, 7, 5, 3, 4, 6]);
        assert_eq!(across(&mut index, &[], 3, &[]), [2, 7, 5]);
        assert_eq!(across(&mut index, &["a"], 10, &[]), [2, 7, 5, 4, 1]);
        assert_eq!(across(&mut index, &["b", "c"], 10, &[]), [3, 6]);
        assert_eq!(across(&mut index, &[], 10, &["q1", "q3"]), [5, 4]);
        assert!(across(&mut index, &["c"], 10, &[]).is_empty());

        // The heads follow claims, enqueues and rollbacks.
        index.commit();
        let mark = index.mark();
        let mut claimed = task("q1", "a", 9, 20);
        claimed.state = State::Running;
        index.note(&claimed, 2);
        index.note(&task("q4", "a", 10, 50), 8);
        assert_eq!(across(&mut index, &[], 3, &[]), [8, 7, 5]);
        index.roll_back_to(mark);
        assert_eq!(across(&mut index, &[], 3, &[]), [2, 7, 5]);
        assert_eq!(index.disagreement(&[1, 2, 3, 4, 5, 6, 7].into()), None);
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
    fn a_lane_emptied_is_forgotten_at_the_commit_and_its_place_taken_by_the_next() {
        let mut index = ReadyIndex::default();
        let mut only = task("q1", "a", 5, 0);
        index.note(&only, 1);
        index.note(&task("q2", "a", 5, 0), 2);
        index.commit();
        only.state = State::Running;
        index.note(&only, 1);
        // Until the commit the lane is named: a rollback may fill it again.
        assert_eq!(index.lane_of.len(), 2);
        let mark = index.mark();
        index.roll_back_to(mark);
        index.commit();
        assert_eq!(index.lane_of.len(), 1, "q1's lane forgotten");
        assert!(seqs(&index, "q1", &[], 10).is_empty());
        assert_eq!(index.disagreement(&[2].into()), None);

        // A claim rolled back leaves its lane as it was.
        let mark = index.mark();
        let mut second = task("q2", "a", 5, 0);
        second.state = State::Running;
        index.note(&second, 2);
        index.roll_back_to(mark);
        index.commit();
        assert_eq!(seqs(&index, "q2", &[], 10), [2]);

        // A new pair takes the free place; one a rollback emptied is freed.
        index.note(&task("q3", "b", 5, 0), 3);
        assert_eq!(index.lanes.len(), 2, "the free place taken");
        index.commit();
        let mark = index.mark();
        index.note(&task("q4", "c", 5, 0), 4);
        index.roll_back_to(mark);
        assert_eq!(index.disagreement(&[2, 3].into()), None);
        index.commit();
        assert_eq!(index.lane_of.len(), 2);
        assert_eq!(index.free.len(), 1);
        assert_eq!(index.disagreement(&[2, 3].into()), None);
        assert_eq!(across(&mut index, &[], 10, &[]), [2, 3]);
        assert_eq!(seqs(&index, "q3", &["b"], 10), [3]);
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
