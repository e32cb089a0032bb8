//! Claim admission: which of the candidates a store gathered a claim takes.
//!
//! A store gathers candidates per queue (each queue's best ready tasks, in
//! priority order, no more than the queue has room for) and hands them here;
//! this decides the order across queues and admits each against its queue's
//! remaining room and the request's limit. Further admission rules — per-owner
//! running limits, fair turns between owners of equal priority, rate limits —
//! belong here too, so that every store applies them alike.

use crate::Timestamp;

/// One ready task a store could claim.
#[derive(Debug)]
pub struct Candidate<T> {
    /// Whatever the store needs to claim it (typically the task and its row).
    pub item: T,
    /// Index into the room per queue given to [`admit`].
    pub queue: usize,
    pub priority: u8,
    pub run_at: Timestamp,
    /// Insertion order: the FIFO tie-break, and the task's identity: a task
    /// named twice among the candidates is admitted once.
    pub position: i64,
}

/// The candidates to claim, in claim order: highest priority first, then
/// oldest `run_at`, then first enqueued; never more than `limit`, nor more
/// from a queue than `room[queue]`, nor a task twice (a request that names
/// its type or queue twice gathers it twice).
pub fn admit<T>(mut candidates: Vec<Candidate<T>>, mut room: Vec<usize>, limit: usize) -> Vec<T> {
    candidates.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.run_at.cmp(&b.run_at))
            .then(a.position.cmp(&b.position))
    });
    let mut admitted = Vec::with_capacity(limit.min(candidates.len()));
    let mut last_position = None;
    for candidate in candidates {
        if admitted.len() == limit {
            break;
        }
        // Sorted, so a task's copies are neighbours.
        if last_position.replace(candidate.position) == Some(candidate.position) {
            continue;
        }
        let Some(left) = room.get_mut(candidate.queue) else {
            continue;
        };
        if *left == 0 {
            continue;
        }
        *left -= 1;
        admitted.push(candidate.item);
    }
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(
        name: &'static str,
        queue: usize,
        priority: u8,
        run_at: i64,
        position: i64,
    ) -> Candidate<&'static str> {
        Candidate {
            item: name,
            queue,
            priority,
            run_at: Timestamp::from_millis(run_at),
            position,
        }
    }

    #[test]
    fn priority_then_run_at_then_insertion_order_within_each_queues_room() {
        let candidates = vec![
            candidate("low", 0, 2, 0, 1),
            candidate("late", 0, 5, 20, 2),
            candidate("early", 1, 5, 10, 3),
            candidate("tie-second", 1, 5, 20, 4),
            candidate("high", 1, 9, 30, 5),
        ];
        assert_eq!(
            admit(candidates, vec![10, 10], 10),
            vec!["high", "early", "late", "tie-second", "low"]
        );
        let candidates = vec![
            candidate("a", 0, 5, 0, 1),
            candidate("b", 0, 5, 1, 2),
            candidate("c", 1, 1, 0, 3),
        ];
        assert_eq!(
            admit(candidates, vec![1, 5], 10),
            vec!["a", "c"],
            "queue 0 has room for one"
        );
        let candidates = vec![candidate("a", 0, 5, 0, 1), candidate("b", 0, 5, 1, 2)];
        assert_eq!(
            admit(candidates, vec![5], 1),
            vec!["a"],
            "the request's limit"
        );
    }

    #[test]
    fn a_task_among_the_candidates_twice_is_admitted_once() {
        let candidates = vec![
            candidate("a", 0, 5, 0, 1),
            candidate("b", 0, 5, 1, 2),
            candidate("a again", 0, 5, 0, 1),
            candidate("b again", 0, 5, 1, 2),
        ];
        assert_eq!(admit(candidates, vec![10], 10), vec!["a", "b"]);
    }
}
