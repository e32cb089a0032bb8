//! What a ready signal says became claimable.
//!
//! Where a store does not claim for waiting fetches itself (PostgreSQL),
//! each ready signal wakes a waiting fetch of every group that asks for the
//! same types and queues, and each claims again. Told only that something
//! may be ready, ten workers each waiting for tasks of a type of its own
//! made ten claims for every task that became ready, each finding nothing:
//! beside one worker of the tasks' type, 1,000 tasks enqueued one at a
//! time took 17.2 transactions a task where 6.5 did without the ten
//! (`bench/waiting-fetches.py`, `OTHER_TYPES=10`). So a signal records the
//! (queue, type) pairs it is about where its sender knows them, and a
//! waiting fetch is woken only for one it asks for.
//!
//! The record is a short log of the last signals, each under the value the
//! ready counter took with it (`Hub::watch_ready`): a reader that saw the
//! counter at `n` asks what came after `n`. One that fell so far behind
//! that the log no longer holds what came after it is told that anything
//! may be ready, as is one asking after a signal sent without pairs.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

/// Signals the log keeps; a reader further behind hears "anything".
const LOG_ENTRIES: usize = 256;
/// Pairs one signal names at most; a signal about more says "anything",
/// which wakes every waiting group once, rather than keep them all.
pub const PAIRS_PER_SIGNAL: usize = 64;

/// What became ready since a reader last looked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Readiness {
    /// No signal since.
    #[default]
    Nothing,
    /// Tasks of these (queue, type) pairs.
    Of(BTreeSet<(String, String)>),
    /// Anything may be: a signal that named no pairs, or one the log no
    /// longer holds.
    Anything,
}

impl Readiness {
    /// Whether a claim that asks for `types` and `queues` (each sorted;
    /// empty asks for any) may find what became ready.
    pub fn concerns(&self, types: &[String], queues: &[String]) -> bool {
        let asks_for =
            |names: &[String], name: &String| names.is_empty() || names.binary_search(name).is_ok();
        match self {
            Self::Nothing => false,
            Self::Anything => true,
            Self::Of(pairs) => pairs
                .iter()
                .any(|(queue, task_type)| asks_for(queues, queue) && asks_for(types, task_type)),
        }
    }

    /// Adds tasks of (`queue`, `task_type`) to what became ready.
    pub fn add_pair(&mut self, queue: &str, task_type: &str) {
        match self {
            Self::Anything => {}
            Self::Of(pairs) => {
                pairs.insert((queue.to_owned(), task_type.to_owned()));
            }
            Self::Nothing => {
                *self = Self::Of(BTreeSet::from([(queue.to_owned(), task_type.to_owned())]));
            }
        }
    }

    fn add(&mut self, pairs: Option<&[(Box<str>, Box<str>)]>) {
        match (pairs, &mut *self) {
            (_, Self::Anything) => {}
            (None, _) => *self = Self::Anything,
            (Some(pairs), Self::Of(known)) => known.extend(owned(pairs)),
            (Some(pairs), Self::Nothing) => *self = Self::Of(owned(pairs).collect()),
        }
    }
}

fn owned(pairs: &[(Box<str>, Box<str>)]) -> impl Iterator<Item = (String, String)> + '_ {
    pairs.iter().map(|(q, t)| (q.to_string(), t.to_string()))
}

/// The (queue, type) pairs one signal names.
pub(crate) type SignalPairs = Arc<[(Box<str>, Box<str>)]>;

/// One signal: the ready counter's value with it, and its pairs (`None`:
/// anything).
type Entry = (u64, Option<SignalPairs>);

/// The last ready signals, shared by the hub that records them and every
/// reader of them.
#[derive(Clone, Debug, Default)]
pub struct ReadyLog(Arc<Mutex<VecDeque<Entry>>>);

impl ReadyLog {
    /// Records the signal the counter's `value` stands for; `pairs` as
    /// [`crate::Hub::notify_ready_in`] gives them. Called with the
    /// counter's lock held, so that entries come in the counter's order.
    pub(crate) fn record(&self, value: u64, pairs: Option<SignalPairs>) {
        let mut entries = self.lock();
        if entries.len() == LOG_ENTRIES {
            entries.pop_front();
        }
        entries.push_back((value, pairs));
    }

    /// What the signals after the counter's value `seen` say became ready,
    /// and the value of the last of them (`seen` when there is none).
    pub fn since(&self, seen: u64) -> (u64, Readiness) {
        let entries = self.lock();
        let Some(&(last, _)) = entries.back() else {
            return (seen, Readiness::Nothing);
        };
        if last <= seen {
            return (seen, Readiness::Nothing);
        }
        if entries.front().is_some_and(|&(first, _)| first > seen + 1) {
            return (last, Readiness::Anything);
        }
        let mut readiness = Readiness::Nothing;
        for (_, pairs) in entries.iter().filter(|(value, _)| *value > seen) {
            readiness.add(pairs.as_deref());
        }
        (last, readiness)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(of: &[(&str, &str)]) -> Option<SignalPairs> {
        Some(of.iter().map(|&(q, t)| (q.into(), t.into())).collect())
    }

    fn set(of: &[(&str, &str)]) -> Readiness {
        Readiness::Of(
            of.iter()
                .map(|&(q, t)| (q.to_owned(), t.to_owned()))
                .collect(),
        )
    }

    fn names(of: &[&str]) -> Vec<String> {
        of.iter().map(|&n| n.to_owned()).collect()
    }

    #[test]
    fn a_reader_hears_the_pairs_of_every_signal_after_the_one_it_saw() {
        let log = ReadyLog::default();
        assert_eq!(log.since(0), (0, Readiness::Nothing));
        log.record(1, pairs(&[("default", "a")]));
        log.record(2, pairs(&[("default", "b"), ("q", "a")]));
        log.record(3, pairs(&[("default", "a")]));
        assert_eq!(
            log.since(0),
            (3, set(&[("default", "a"), ("default", "b"), ("q", "a")]))
        );
        assert_eq!(log.since(2), (3, set(&[("default", "a")])));
        assert_eq!(log.since(3), (3, Readiness::Nothing));
    }

    #[test]
    fn a_signal_without_pairs_or_one_no_longer_kept_says_anything() {
        let log = ReadyLog::default();
        log.record(1, pairs(&[("default", "a")]));
        log.record(2, None);
        log.record(3, pairs(&[("default", "b")]));
        assert_eq!(log.since(1), (3, Readiness::Anything));
        assert_eq!(log.since(2), (3, set(&[("default", "b")])));

        let log = ReadyLog::default();
        for value in 1..=(LOG_ENTRIES as u64 + 1) {
            log.record(value, pairs(&[("default", "a")]));
        }
        let last = LOG_ENTRIES as u64 + 1;
        // Signal 1 was dropped: a reader that saw none cannot know it.
        assert_eq!(log.since(0), (last, Readiness::Anything));
        assert_eq!(log.since(1), (last, set(&[("default", "a")])));
    }

    #[test]
    fn readiness_concerns_the_claims_that_ask_for_one_of_its_pairs() {
        let ready = set(&[("mail", "send"), ("default", "report")]);
        let asks = |types: &[&str], queues: &[&str]| ready.concerns(&names(types), &names(queues));
        assert!(asks(&[], &[]));
        assert!(asks(&["send"], &[]));
        assert!(asks(&["report", "send"], &["mail"]));
        assert!(asks(&[], &["default"]));
        assert!(!asks(&["send"], &["default"]));
        assert!(!asks(&["other"], &[]));
        assert!(!asks(&[], &["other"]));
        assert!(Readiness::Anything.concerns(&names(&["other"]), &[]));
        let mut added = Readiness::Nothing;
        added.add_pair("mail", "send");
        added.add_pair("default", "report");
        added.add_pair("mail", "send");
        assert_eq!(added, ready, "each pair once");
        added = Readiness::Anything;
        added.add_pair("mail", "send");
        assert_eq!(added, Readiness::Anything, "anything stays anything");
        assert!(!Readiness::Nothing.concerns(&[], &[]));
    }
}
