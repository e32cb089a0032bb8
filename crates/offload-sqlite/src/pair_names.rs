//! (queue, type) pairs, each kept once and known by its place: what a
//! writer's group counts changes under, and what the kept pending rows name
//! their pair by. Tasks come in runs of one pair (a batch), and most groups
//! touch a few pairs; a batch of 10,000 tasks of as many types searched a
//! list once a task, and took 0.5 s where one of a single type took 0.02.

use std::collections::HashMap;

/// Pairs searched one by one before they are indexed.
const INDEXED_FROM: usize = 16;

#[derive(Debug, Default)]
pub(crate) struct PairNames {
    pairs: Vec<(String, String)>,
    /// Where each pair is in `pairs`, queue then type (SipHash: the names
    /// are the callers'), once there are [`INDEXED_FROM`] of them.
    index: HashMap<String, HashMap<String, usize>>,
    /// The pair found or added last, tried first.
    last: Option<usize>,
}

impl PairNames {
    /// The place of (queue, type), added if new.
    pub fn place(&mut self, queue: &str, task_type: &str) -> usize {
        if let Some(last) = self.last
            && self.pairs[last].0 == queue
            && self.pairs[last].1 == task_type
        {
            return last;
        }
        let found = if self.pairs.len() < INDEXED_FROM {
            self.pairs
                .iter()
                .rposition(|(q, t)| q == queue && t == task_type)
        } else {
            if self.index.is_empty() {
                for (at, (q, t)) in self.pairs.iter().enumerate() {
                    self.index
                        .entry(q.clone())
                        .or_default()
                        .insert(t.clone(), at);
                }
            }
            self.index
                .get(queue)
                .and_then(|types| types.get(task_type))
                .copied()
        };
        let at = found.unwrap_or_else(|| {
            let at = self.pairs.len();
            if !self.index.is_empty() {
                self.index
                    .entry(queue.to_owned())
                    .or_default()
                    .insert(task_type.to_owned(), at);
            }
            self.pairs.push((queue.to_owned(), task_type.to_owned()));
            at
        });
        self.last = Some(at);
        at
    }

    pub fn get(&self, at: usize) -> &(String, String) {
        &self.pairs[at]
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, (String, String)> {
        self.pairs.iter()
    }

    pub fn into_pairs(self) -> Vec<(String, String)> {
        self.pairs
    }

    /// Forgets the pairs from `len` on, as a rolled-back savepoint does.
    pub fn truncate(&mut self, len: usize) {
        if len < INDEXED_FROM {
            self.index.clear();
        } else {
            for (q, t) in &self.pairs[len.min(self.pairs.len())..] {
                if let Some(types) = self.index.get_mut(q) {
                    types.remove(t);
                }
            }
        }
        self.pairs.truncate(len);
        if self.last.is_some_and(|last| last >= len) {
            self.last = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PairNames;

    #[test]
    fn each_pair_is_found_at_its_place_through_truncations() {
        let names = |i: usize| (format!("q{}", i % 7), format!("t{i}"));
        // Cut before the index was made, and after.
        for cut in [10, 25] {
            let mut pairs = PairNames::default();
            for i in 0..40 {
                let (q, t) = names(i);
                assert_eq!(pairs.place(&q, &t), i);
                assert_eq!(pairs.place(&q, &t), i, "found again");
            }
            let (q, t) = names(3);
            assert_eq!(pairs.place(&q, &t), 3, "an earlier one found");
            pairs.truncate(cut);
            for i in 0..cut {
                let (q, t) = names(i);
                assert_eq!(pairs.place(&q, &t), i, "pair {i} kept");
            }
            // The pairs cut off are new again, in a new order.
            for (at, i) in (cut..40).rev().enumerate() {
                let (q, t) = names(i);
                assert_eq!(pairs.place(&q, &t), cut + at, "pair {i} added again");
                assert_eq!(pairs.len(), cut + at + 1);
                assert_eq!(pairs.get(cut + at), &(q, t));
            }
        }
    }
}
