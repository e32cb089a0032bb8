//! Task ids that carry their row's seq ([`offload_core::id_carrying_seq`]):
//! finding a task by id is a seek in the table's own B-tree, and inserting
//! one writes no index of ids: that index was ~2,900 of ~10,000
//! instructions SQLite spent inserting a row (callgrind, schema version 3).
//!
//! The writer, the only connection that inserts, hands seqs out in
//! increasing order, never the same twice in a process (after a restart,
//! the seq of a deleted newest row may come back, with a later millisecond
//! in front of it: a different id), so they keep
//! meaning insertion order (FIFO among equal priorities, the listing's
//! newest first). A row whose seq is one more than the largest stored is
//! inserted with a NULL seq, which SQLite fills with exactly that: a given
//! seq costs SQLite a uniqueness seek (~800 instructions a row) that it
//! skips for its own.
//!
//! Rows inserted before schema version 4 have ids that do not carry their
//! seq; the table `task_ids_before_v4` maps those, and a lookup that misses
//! by seq tries it (it is empty in a database created since).

use offload_core::{Timestamp, id_carrying_seq, seq_carried_by};
use rusqlite::{Connection, OptionalExtension, Row};
use uuid::Uuid;

use crate::rows::Id;

/// Hands out ids and seqs, increasing.
#[derive(Debug)]
pub(crate) struct SeqIds {
    /// The largest seq given out or seen stored.
    high: i64,
    /// The largest seq stored, as of the last [`SeqIds::sync`] and the
    /// inserts since.
    stored: i64,
}

impl SeqIds {
    /// Continues after `stored`, the largest seq stored.
    pub fn after(stored: i64) -> Self {
        Self {
            high: stored,
            stored,
        }
    }

    /// Learns the largest seq stored now: rows may have been deleted or
    /// rolled back since the last inserts.
    pub fn sync(&mut self, stored: i64) {
        self.stored = stored;
        self.high = self.high.max(stored);
    }

    /// The next task's id and seq, made at `now`.
    pub fn next(&mut self, now: Timestamp) -> (Uuid, i64) {
        self.high += 1;
        (id_carrying_seq(now, self.high), self.high)
    }

    /// The value to insert as the seq of a row that gets `seq`, rows being
    /// inserted in the order their seqs were given: NULL when SQLite's own
    /// choice, one more than the largest stored, is `seq`.
    pub fn insert_as(&mut self, seq: i64) -> Option<i64> {
        let own = self.stored + 1 == seq;
        self.stored = self.stored.max(seq);
        (!own).then_some(seq)
    }
}

/// The row of task `id`: `by_seq` (parameters: the id, the seq it
/// carries) finds it if it was stored since version 4, else `before_v4`
/// (parameter: the id) if it was stored before.
pub(crate) fn find<T>(
    conn: &Connection,
    id: Uuid,
    by_seq: &str,
    before_v4: &str,
    mut read: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    if let Some(seq) = seq_carried_by(id) {
        let found = conn
            .prepare_cached(by_seq)?
            .query_row((Id(id), seq), &mut read)
            .optional()?;
        if found.is_some() {
            return Ok(found);
        }
    }
    conn.prepare_cached(before_v4)?
        .query_row([Id(id)], read)
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_795_000_000_123);

    #[test]
    fn a_seq_is_never_given_twice_even_when_stored_rows_go() {
        let mut ids = SeqIds::after(10);
        assert_eq!(ids.next(NOW).1, 11);
        assert_eq!(ids.insert_as(11), None, "SQLite's own choice");
        // The row with seq 11 was deleted (or rolled back).
        ids.sync(10);
        let (_, seq) = ids.next(NOW);
        assert_eq!(seq, 12);
        assert_eq!(
            ids.insert_as(seq),
            Some(12),
            "given: SQLite would choose 11"
        );
        assert_eq!(ids.next(NOW).1, 13);
        assert_eq!(ids.insert_as(13), None);
        // Another process's rows, or rows of an older schema.
        ids.sync(100);
        assert_eq!(ids.next(NOW).1, 101);
    }
}
