//! An ordered set for keys that mostly arrive in ascending order and leave
//! from the front, as pending tasks do: claim order's lanes and the pending
//! seqs readers list (`ready.rs`).
//!
//! A batch enqueue put each of its tasks into two B-trees, ~1,400
//! instructions a task together, 12–15% of the writer's work for a batch
//! (callgrind), though a new task's key is nearly always the largest of its
//! lane's and of all pending seqs. Here a key greater than every key held
//! is appended to a deque, and the smallest is taken from its front, each in
//! constant time; only a key that lands among the appended ones, or leaves
//! from among them other than at either end, moves them into the B-tree
//! first, so each key is put into the B-tree at most once.

use std::collections::{BTreeSet, VecDeque};

#[derive(Debug)]
pub(crate) struct AppendSet<K> {
    tree: BTreeSet<K>,
    /// Ascending, and every key here is greater than every key in `tree`.
    tail: VecDeque<K>,
}

impl<K> Default for AppendSet<K> {
    fn default() -> Self {
        Self {
            tree: BTreeSet::new(),
            tail: VecDeque::new(),
        }
    }
}

impl<K: Ord + Copy> AppendSet<K> {
    /// Adds `key`; false if it was there already.
    pub fn insert(&mut self, key: K) -> bool {
        let largest = self.tail.back().or_else(|| self.tree.last());
        if largest.is_none_or(|largest| key > *largest) {
            self.tail.push_back(key);
            return true;
        }
        if self.tail.front().is_some_and(|front| key >= *front) {
            if self.tail.binary_search(&key).is_ok() {
                return false;
            }
            self.spill();
        }
        self.tree.insert(key)
    }

    /// Whether `key` is held.
    pub fn contains(&self, key: &K) -> bool {
        if self.tail.front().is_some_and(|front| key >= front) {
            self.tail.binary_search(key).is_ok()
        } else {
            self.tree.contains(key)
        }
    }

    /// Takes `key` out; false if it was not there.
    pub fn remove(&mut self, key: &K) -> bool {
        match self.tail.front() {
            Some(front) if key >= front => {
                if key == front {
                    self.tail.pop_front();
                    return true;
                }
                if self.tail.back() == Some(key) {
                    self.tail.pop_back();
                    return true;
                }
                if self.tail.binary_search(key).is_err() {
                    return false;
                }
                self.spill();
                self.tree.remove(key)
            }
            _ => self.tree.remove(key),
        }
    }

    /// The smallest key.
    pub fn is_empty(&self) -> bool {
        self.tail.is_empty() && self.tree.is_empty()
    }

    pub fn first(&self) -> Option<&K> {
        self.tree.first().or_else(|| self.tail.front())
    }

    /// Every key, ascending.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &K> {
        self.tree.iter().chain(self.tail.iter())
    }

    /// The keys below `bound`, largest first.
    pub fn below(&self, bound: K) -> impl Iterator<Item = &K> {
        let in_tail = self.tail.partition_point(|key| *key < bound);
        self.tail
            .range(..in_tail)
            .rev()
            .chain(self.tree.range(..bound).rev())
    }

    /// Moves the appended keys into the B-tree, where any key may come and
    /// go in logarithmic time. Many of them are built into it in one pass
    /// (they are in order, and above every key it holds): a cancellation
    /// among a million appended tasks stalls the writer once, for ~45 ms
    /// here, a third of inserting them one by one. A few are inserted one
    /// by one, so that a short tail never costs a pass over a large tree.
    fn spill(&mut self) {
        if self.tail.len().saturating_mul(8) >= self.tree.len() {
            let mut appended: BTreeSet<K> = self.tail.drain(..).collect();
            self.tree.append(&mut appended);
        } else {
            self.tree.extend(self.tail.drain(..));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::AppendSet;

    proptest! {
        /// Any mix of inserts and removes leaves the same keys, answers and
        /// order as a B-tree alone. Keys come mostly ascending, as pending
        /// tasks do, with older ones among them, and leave from the front
        /// (a claim) or from anywhere (a cancellation).
        #[test]
        fn behaves_as_a_btree_set(
            ops in prop::collection::vec((0u8..4, 0u16..12), 0..400),
            bound in 0u16..300,
        ) {
            let mut set = AppendSet::default();
            let mut model = BTreeSet::new();
            let mut newest = 0u16;
            for (op, back) in ops {
                let key = newest.saturating_sub(back);
                match op {
                    0 | 1 => {
                        prop_assert_eq!(set.insert(key), model.insert(key));
                        newest += 1;
                    }
                    2 => prop_assert_eq!(set.remove(&key), model.remove(&key)),
                    _ => {
                        let first = model.first().copied().unwrap_or(0);
                        prop_assert_eq!(set.remove(&first), model.remove(&first));
                    }
                }
                prop_assert!(set.iter().copied().eq(model.iter().copied()));
                prop_assert_eq!(set.contains(&key), model.contains(&key));
            }
            prop_assert!(set.iter().rev().copied().eq(model.iter().rev().copied()));
            prop_assert!(set.below(bound).copied().eq(model.range(..bound).rev().copied()));
        }
    }

    #[test]
    fn ascending_keys_stay_appended_and_leave_from_the_front() {
        let mut set = AppendSet::default();
        for key in 0..100 {
            assert!(set.insert(key));
        }
        assert!(set.tree.is_empty());
        assert!(!set.insert(50), "already there");
        assert!(set.tree.is_empty(), "a key already appended is not moved");
        for key in 0..10 {
            assert!(set.remove(&key));
        }
        assert!(set.remove(&99));
        assert!(set.tree.is_empty());
        assert!(set.remove(&50), "from among the appended ones");
        assert_eq!(set.tail.len(), 0);
        assert_eq!(set.tree.len(), 88);
    }
}
