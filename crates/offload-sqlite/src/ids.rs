//! Task ids that carry their row's seq.
//!
//! A task's id is a UUIDv7: its first 48 bits are the millisecond it was
//! made, and the 62 bits of `rand_b` are its row's seq (`rand_a` is zero).
//! Finding a task by id is then a seek in the table's own B-tree, and
//! inserting one writes no index of ids: that index was ~2,900 of ~10,000
//! instructions SQLite spent inserting a row (callgrind, schema version 3).
//! Ids sort as tasks were made, and say nothing more than a sequence number
//! would; they were never secrets (access is the tokens' business).
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

use offload_core::Timestamp;
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
        (id_for(now, self.high), self.high)
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

/// The id made at `now` for `seq`.
fn id_for(now: Timestamp, seq: i64) -> Uuid {
    let millis = now.as_millis().clamp(0, (1 << 48) - 1) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6] = 0x70;
    bytes[8..].copy_from_slice(&(seq as u64).to_be_bytes());
    // Variant 0b10 over seq's two top bits, which a seq never uses.
    bytes[8] = 0x80 | (bytes[8] & 0x3f);
    Uuid::from_bytes(bytes)
}

/// The seq that `id` carries, if it is a UUIDv7: where its row is, if it is
/// stored and was inserted since version 4 (the caller checks the id).
pub(crate) fn seq_of(id: Uuid) -> Option<i64> {
    let b = id.as_bytes();
    if b[6] >> 4 != 7 || b[8] >> 6 != 0b10 {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[8..]);
    seq[0] &= 0x3f;
    Some(i64::from_be_bytes(seq))
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
    if let Some(seq) = seq_of(id) {
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
    fn an_id_carries_its_seq_and_its_time_and_is_a_uuid_v7() {
        let mut ids = SeqIds::after(0);
        for expected in 1..100 {
            let (id, seq) = ids.next(NOW);
            assert_eq!(seq, expected);
            assert_eq!(seq_of(id), Some(seq));
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = id.get_timestamp().expect("v7 has a time").to_unix();
            assert_eq!(
                secs * 1000 + u64::from(nanos) / 1_000_000,
                1_795_000_000_123
            );
        }
        let largest = (1 << 62) - 1;
        assert_eq!(seq_of(id_for(NOW, largest)), Some(largest));
    }

    #[test]
    fn ids_sort_as_they_were_made() {
        let mut ids = SeqIds::after(41);
        let (a, _) = ids.next(NOW);
        let (b, _) = ids.next(NOW);
        let (c, _) = ids.next(Timestamp::from_millis(NOW.as_millis() + 1));
        assert!(a < b && b < c);
    }

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

    #[test]
    fn ids_not_v7_carry_no_seq() {
        assert_eq!(seq_of(Uuid::nil()), None);
        assert_eq!(
            seq_of(uuid::Builder::from_random_bytes([7; 16]).into_uuid()),
            None
        );
        assert_eq!(seq_of(Uuid::max()), None);
    }
}
