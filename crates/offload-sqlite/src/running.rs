//! The running tasks, kept in memory instead of an index of `tasks`.
//!
//! An index of running tasks cost the writer an entry written when a task
//! was claimed and deleted when it ended: ~13% of SQLite's own work for a
//! task's claim and completion (`bench/sqlite-floor`). The writer is the
//! only connection that changes `tasks`, so it keeps the set itself, with
//! what recovery and the queues' concurrency limits ask of it: each running
//! task's queue, lease and deadline. It is built from `tasks` at open and
//! changed with every row the writer inserts or writes back.
//!
//! Changes are undone with the transaction that made them, as in
//! `ready.rs`. The set is shared, as the pending tasks' seqs are: readers
//! list running tasks and count stuck ones from it. They see the writer's changes
//! as it makes them, before its commit, and so take the set as a list of
//! candidates that their own snapshot of `tasks` confirms (a running task's
//! row says so); a task that ends while a list is being read may be left
//! out of it, as if it had ended just before.

use std::sync::{Mutex, MutexGuard};

use rustc_hash::FxHashMap;

use offload_core::{State, Task};

use crate::seq_map::SeqMap;

/// What the store asks of a running task without reading its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Running {
    queue: usize,
    /// Milliseconds; `i64::MAX` when there is none.
    lease_expires_at: i64,
    deadline_at: i64,
}

impl Running {
    fn expires_at(&self) -> i64 {
        self.lease_expires_at.min(self.deadline_at)
    }
}

/// One change: the seq and what it held before.
#[derive(Debug)]
struct Change {
    seq: i64,
    before: Option<Running>,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: SeqMap<Running>,
    /// Queue names by number, and the number of running tasks of each; an
    /// empty name for a free number.
    queues: Vec<String>,
    queue_numbers: FxHashMap<String, usize>,
    running_in_queue: Vec<usize>,
    /// Numbers of queues left with no running task at a commit, forgotten
    /// and given to the next new queue: a queue per customer or per job
    /// would otherwise be kept for as long as the node runs.
    free: Vec<usize>,
    /// Changes since the last commit, oldest first.
    changes: Vec<Change>,
    /// Queues a rollback left with fewer running tasks: freed at the next
    /// commit if left with none, as those a commit empties are.
    emptied_by_rollback: Vec<usize>,
}

impl Inner {
    fn queue_number(&mut self, queue: &str) -> usize {
        if let Some(&number) = self.queue_numbers.get(queue) {
            return number;
        }
        let number = if let Some(number) = self.free.pop() {
            queue.clone_into(&mut self.queues[number]);
            number
        } else {
            self.queues.push(queue.to_owned());
            self.running_in_queue.push(0);
            self.queues.len() - 1
        };
        self.queue_numbers.insert(queue.to_owned(), number);
        number
    }

    /// Forgets the queues among `numbers` that have no running task.
    fn free_idle(&mut self, numbers: impl IntoIterator<Item = usize>) {
        for number in numbers {
            // A name emptied when freed, so that a number is freed once.
            if self.running_in_queue[number] == 0 && !self.queues[number].is_empty() {
                let queue = std::mem::take(&mut self.queues[number]);
                self.queue_numbers.remove(&queue);
                self.free.push(number);
            }
        }
    }

    /// Sets what `seq` holds, without logging it.
    fn set(&mut self, seq: i64, running: Option<Running>) -> Option<Running> {
        let before = match running {
            Some(running) => {
                self.running_in_queue[running.queue] += 1;
                self.tasks.insert(seq, running)
            }
            None => self.tasks.remove(&seq),
        };
        if let Some(before) = before {
            self.running_in_queue[before.queue] -= 1;
        }
        before
    }
}

#[derive(Debug, Default)]
pub(crate) struct RunningSet {
    inner: Mutex<Inner>,
}

fn millis_or_never(at: Option<offload_core::Timestamp>) -> i64 {
    at.map_or(i64::MAX, |at| at.as_millis())
}

impl RunningSet {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a running task read from the table when the store opens
    /// (`load_memory` in `lib.rs`); unlogged, as nothing rolls it back.
    pub fn load_running(
        &self,
        seq: i64,
        queue: &str,
        lease_expires_at: Option<i64>,
        deadline_at: Option<i64>,
    ) {
        let mut inner = self.inner();
        let running = Running {
            queue: inner.queue_number(queue),
            lease_expires_at: lease_expires_at.unwrap_or(i64::MAX),
            deadline_at: deadline_at.unwrap_or(i64::MAX),
        };
        inner.set(seq, Some(running));
    }

    /// Records a task row as it now stands: in the set if running, out of
    /// it otherwise.
    pub fn note(&self, task: &Task, seq: i64) {
        let mut inner = self.inner();
        let running = (task.state == State::Running).then(|| Running {
            queue: inner.queue_number(&task.queue),
            lease_expires_at: millis_or_never(task.lease_expires_at),
            deadline_at: millis_or_never(task.deadline()),
        });
        // One lookup of the map whatever the task's state: every claim and
        // completion comes through here.
        let before = inner.set(seq, running);
        if before != running {
            inner.changes.push(Change { seq, before });
        }
    }

    /// Running tasks of `queue`, for its concurrency limit.
    pub fn in_queue(&self, queue: &str) -> usize {
        let inner = self.inner();
        inner
            .queue_numbers
            .get(queue)
            .map_or(0, |&number| inner.running_in_queue[number])
    }

    /// Up to `limit` running tasks whose lease or deadline is at or before
    /// `now` (milliseconds), oldest seq first.
    pub fn expired(&self, now: i64, limit: usize) -> Vec<i64> {
        let mut seqs: Vec<i64> = self
            .inner()
            .tasks
            .iter()
            .filter(|(_, running)| running.expires_at() <= now)
            .map(|(&seq, _)| seq)
            .collect();
        seqs.sort_unstable();
        seqs.truncate(limit);
        seqs
    }

    /// Running tasks whose lease ran out at or before `cutoff`
    /// (milliseconds).
    pub fn lease_expired_by(&self, cutoff: i64) -> u64 {
        let inner = self.inner();
        inner
            .tasks
            .values()
            .filter(|running| running.lease_expires_at <= cutoff)
            .count() as u64
    }

    /// Whether task `seq` is running.
    pub fn contains(&self, seq: i64) -> bool {
        self.inner().tasks.contains_key(&seq)
    }

    /// Up to `limit` running tasks' seqs below `below` (from the newest
    /// when `None`), newest first: the order tasks are listed in.
    pub fn newest_first(&self, below: Option<i64>, limit: usize) -> Vec<i64> {
        let below = below.unwrap_or(i64::MAX);
        let mut seqs: Vec<i64> = self
            .inner()
            .tasks
            .keys()
            .copied()
            .filter(|&seq| seq < below)
            .collect();
        seqs.sort_unstable_by_key(|&seq| std::cmp::Reverse(seq));
        seqs.truncate(limit);
        seqs
    }

    /// How the set disagrees with `rows`, the table's running tasks as
    /// (seq, queue, lease_expires_at, deadline_at), if it does
    /// (`Store::verify_bookkeeping`).
    pub fn disagreement(&self, rows: &[(i64, String, Option<i64>, Option<i64>)]) -> Option<String> {
        let inner = self.inner();
        if inner.tasks.len() != rows.len() {
            return Some(format!(
                "{} running tasks in memory, {} in the table",
                inner.tasks.len(),
                rows.len()
            ));
        }
        let mut in_queue = vec![0; inner.queues.len()];
        for (seq, queue, lease, deadline) in rows {
            let Some(running) = inner.tasks.get(seq) else {
                return Some(format!("running task {seq} is not in memory"));
            };
            let remembered = (
                inner.queues[running.queue].as_str(),
                running.lease_expires_at,
                running.deadline_at,
            );
            let stored = (
                queue.as_str(),
                lease.unwrap_or(i64::MAX),
                deadline.unwrap_or(i64::MAX),
            );
            if remembered != stored {
                return Some(format!(
                    "running task {seq}: {remembered:?} in memory, {stored:?} in the table"
                ));
            }
            in_queue[running.queue] += 1;
        }
        for (number, queue) in inner.queues.iter().enumerate() {
            let free = queue.is_empty();
            if free == inner.queue_numbers.get(queue).is_some_and(|&n| n == number) {
                return Some(format!("queue number {number} ({queue:?}) is misnumbered"));
            }
            // Only what a rollback emptied waits for a commit to be freed.
            if !free && in_queue[number] == 0 && !inner.emptied_by_rollback.contains(&number) {
                return Some(format!("queue {queue} has no running task and is kept"));
            }
        }
        if inner.queue_numbers.len() + inner.free.len() != inner.queues.len() {
            return Some(format!(
                "{} queues numbered and {} free of {}",
                inner.queue_numbers.len(),
                inner.free.len(),
                inner.queues.len()
            ));
        }
        (in_queue != inner.running_in_queue).then(|| {
            format!(
                "running tasks by queue {:?} in memory, {in_queue:?} in the table",
                inner.running_in_queue
            )
        })
    }

    /// Takes `seq` out of the set: its row is not running (see
    /// `WriteCtx::recover_expired`).
    pub fn drop_seq(&self, seq: i64) {
        let mut inner = self.inner();
        if inner.tasks.contains_key(&seq) {
            let before = inner.set(seq, None);
            inner.changes.push(Change { seq, before });
        }
    }

    /// Where the log stands; see [`RunningSet::roll_back_to`].
    pub fn mark(&self) -> usize {
        self.inner().changes.len()
    }

    /// Undoes the changes made since `mark`, newest first.
    pub fn roll_back_to(&self, mark: usize) {
        let mut inner = self.inner();
        while inner.changes.len() > mark {
            let Some(change) = inner.changes.pop() else {
                break;
            };
            if let Some(undone) = inner.set(change.seq, change.before) {
                inner.emptied_by_rollback.push(undone.queue);
            }
        }
    }

    /// The transaction committed: its changes stay, and the queues it left
    /// with no running task are forgotten. Only here: until the commit the
    /// log names queues by number, and a rollback may bring tasks back.
    pub fn commit(&self) {
        let mut inner = self.inner();
        let inner = &mut *inner;
        let mut changes = std::mem::take(&mut inner.changes);
        let rolled_back = std::mem::take(&mut inner.emptied_by_rollback);
        inner.free_idle(
            changes
                .drain(..)
                .filter_map(|change| change.before.map(|before| before.queue))
                .chain(rolled_back),
        );
        // The log's allocation is kept for the next transaction.
        inner.changes = changes;
    }
}

#[cfg(test)]
mod tests {
    use offload_core::{Limits, NewTask, State, Task, Timestamp};
    use uuid::Uuid;

    use super::RunningSet;

    fn running(queue: &str, started_at: i64, lease_expires_at: i64) -> Task {
        let spec = NewTask::new("t")
            .queue(queue)
            .timeout_secs(10)
            .validate(&Limits::default(), offload_core::Position::Alone)
            .expect("a valid task");
        let mut task = Task::new_from_spec(Uuid::now_v7(), spec, Timestamp::from_millis(0), false);
        task.state = State::Running;
        task.started_at = Some(Timestamp::from_millis(started_at));
        task.lease_expires_at = Some(Timestamp::from_millis(lease_expires_at));
        task
    }

    #[test]
    fn counts_by_queue_follow_tasks_in_and_out_and_a_rollback() {
        let set = RunningSet::default();
        let mut first = running("q", 0, 100);
        set.note(&first, 1);
        set.note(&running("q", 0, 100), 2);
        set.note(&running("other", 0, 100), 3);
        set.commit();
        assert_eq!((set.in_queue("q"), set.in_queue("other")), (2, 1));
        assert_eq!(set.in_queue("none"), 0);

        let mark = set.mark();
        first.state = State::Completed;
        set.note(&first, 1);
        set.note(&running("q", 0, 100), 4);
        // A heartbeat: the same task, a later lease.
        set.note(&running("other", 0, 900), 3);
        assert_eq!(set.in_queue("q"), 2);
        assert_eq!(set.newest_first(None, 10), [4, 3, 2]);
        assert_eq!(set.lease_expired_by(100), 2);
        set.roll_back_to(mark);
        assert_eq!(set.newest_first(None, 10), [3, 2, 1]);
        assert_eq!(set.lease_expired_by(100), 3);
        assert_eq!(set.in_queue("q"), 2);
        assert_eq!(set.newest_first(Some(3), 10), [2, 1]);
    }

    #[test]
    fn a_queue_left_with_no_running_task_is_forgotten_at_the_commit() {
        let set = RunningSet::default();
        let mut first = running("q", 0, 100);
        set.note(&first, 1);
        set.commit();
        first.state = State::Completed;
        set.note(&first, 1);
        assert_eq!(set.inner().queue_numbers.len(), 1, "kept until the commit");
        set.commit();
        assert!(set.inner().queue_numbers.is_empty());
        assert_eq!(set.in_queue("q"), 0);

        // A new queue takes the free number; one a rollback emptied is
        // freed at the next commit.
        set.note(&running("other", 0, 100), 2);
        set.commit();
        assert_eq!(set.inner().queues, ["other"]);
        let mark = set.mark();
        set.note(&running("third", 0, 100), 3);
        set.roll_back_to(mark);
        assert_eq!(
            set.disagreement(&[(2, "other".into(), Some(100), Some(10_000))]),
            None
        );
        set.commit();
        assert_eq!(set.inner().queues, ["other", ""]);
        assert_eq!(set.in_queue("other"), 1);
        assert_eq!(
            set.disagreement(&[(2, "other".into(), Some(100), Some(10_000))]),
            None
        );
    }

    #[test]
    fn expired_means_the_lease_or_the_deadline_passed() {
        let set = RunningSet::default();
        // Lease runs out at 500; deadline (timeout 10 s) at 10,000.
        set.note(&running("q", 0, 500), 7);
        // Lease far out; deadline at 1,000 + 10,000.
        set.note(&running("q", 1_000, 1_000_000), 3);
        assert!(set.expired(499, 10).is_empty());
        assert_eq!(set.expired(500, 10), [7]);
        assert_eq!(set.expired(11_000, 10), [3, 7]);
        assert_eq!(set.expired(11_000, 1), [3]);
        set.drop_seq(7);
        assert_eq!(set.expired(11_000, 10), [3]);
        set.roll_back_to(0);
        assert!(set.expired(11_000, 10).is_empty());
    }
}
