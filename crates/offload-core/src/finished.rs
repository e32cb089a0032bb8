//! The tasks a store's own commits finished: what the metrics' counters of
//! completed, failed and cancelled tasks count.
//!
//! Counted where the change is committed, not where an answer is given:
//! a task also finishes inside another operation (a dependent cancelled
//! because its dependency failed, a task that `on_conflict: "replace"`
//! displaced), and no answer names it. Each change is committed by exactly
//! one node, so the nodes of a cluster together count each task once.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::State;

/// Tasks that entered each finished state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Finished {
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl Finished {
    /// The count of `state`; `None` for a state that is not finished.
    pub fn slot(&mut self, state: State) -> Option<&mut u64> {
        match state {
            State::Completed => Some(&mut self.completed),
            State::Failed => Some(&mut self.failed),
            State::Cancelled => Some(&mut self.cancelled),
            State::Blocked | State::Scheduled | State::Pending | State::Running => None,
        }
    }

    pub fn add(&mut self, other: &Finished) {
        self.completed += other.completed;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
    }
}

/// A store's tally of [`Finished`] tasks by (queue, type), since it was
/// last taken. Whoever takes it keeps the totals (the server's metrics add
/// it to their counters): kept here, the totals held every (queue, type)
/// the node ever finished a task of, and with a queue per customer or per
/// job they grew for as long as it ran.
#[derive(Debug, Default)]
pub struct FinishedTally {
    by_queue: Mutex<HashMap<String, HashMap<String, Finished>>>,
}

impl FinishedTally {
    /// Adds, for a commit that held, `n` tasks of (queue, type) that
    /// entered `state`; a state that is not finished is not counted.
    pub fn record<'a>(&self, entered: impl IntoIterator<Item = (&'a str, &'a str, State, u64)>) {
        let mut entered = entered.into_iter().peekable();
        if entered.peek().is_none() {
            return;
        }
        let mut by_queue = self.by_queue.lock().unwrap_or_else(|p| p.into_inner());
        for (queue, task_type, state, n) in entered {
            if !state.is_finished() {
                continue;
            }
            // Looked up by &str first: names are allocated once per pair,
            // not once per commit.
            if !by_queue.contains_key(queue) {
                by_queue.insert(queue.to_owned(), HashMap::new());
            }
            let Some(types) = by_queue.get_mut(queue) else {
                continue;
            };
            if !types.contains_key(task_type) {
                types.insert(task_type.to_owned(), Finished::default());
            }
            if let Some(count) = types.get_mut(task_type).and_then(|f| f.slot(state)) {
                *count += n;
            }
        }
    }

    /// Every (queue, type) counted since the last take, with its tally;
    /// the tally starts again from nothing.
    pub fn take(&self) -> Vec<(String, String, Finished)> {
        let by_queue =
            std::mem::take(&mut *self.by_queue.lock().unwrap_or_else(|p| p.into_inner()));
        by_queue
            .into_iter()
            .flat_map(|(queue, types)| {
                types
                    .into_iter()
                    .map(move |(task_type, finished)| (queue.clone(), task_type, finished))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_adds_finished_states_by_pair_and_ignores_the_others() {
        let tally = FinishedTally::default();
        tally.record([
            ("mail", "send", State::Completed, 3),
            ("mail", "send", State::Failed, 1),
            ("mail", "send", State::Pending, 7),
            ("mail", "digest", State::Cancelled, 2),
        ]);
        tally.record([("mail", "send", State::Completed, 1)]);
        let mut taken = tally.take();
        taken.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        assert_eq!(
            taken,
            vec![
                (
                    "mail".to_owned(),
                    "digest".to_owned(),
                    Finished {
                        cancelled: 2,
                        ..Finished::default()
                    }
                ),
                (
                    "mail".to_owned(),
                    "send".to_owned(),
                    Finished {
                        completed: 4,
                        failed: 1,
                        cancelled: 0
                    }
                ),
            ]
        );
        assert_eq!(tally.take(), [], "taken once");
        tally.record([("mail", "send", State::Failed, 2)]);
        assert_eq!(
            tally.take(),
            [(
                "mail".to_owned(),
                "send".to_owned(),
                Finished {
                    failed: 2,
                    ..Finished::default()
                }
            )]
        );
    }
}
