//! Claims recorded one row each (`claims`, schema version 7), their tasks'
//! rows left saying pending until their next write.
//!
//! A claim's change to each task follows from the pending row and what the
//! whole claim shares: the worker, the time, the lease's end, and each
//! task's new attempt. Rewriting every claimed task's row was about a third
//! of SQLite's work for a task's claim and completion (bench/HISTORY.md);
//! one row for the claim costs it a few hundred instructions a task. The
//! task's next write (a heartbeat, a completion, a failure, a cancellation,
//! or a reader asking, below) writes its row whole, as before, and the
//! claim's row goes once none of its tasks is left unwritten.
//!
//! Who sees what:
//! - The writer applies the claim to every row it reads that is still
//!   unwritten ([`Claims::overlay`]), so its view is always the claimed one.
//! - Readers never see an unwritten row as pending: a read that could meet
//!   one first has the writer write the rows it asks about (or all), and
//!   only then reads ([`UnwrittenSeqs`]). A seq enters that set before its
//!   claim commits and leaves it only after the write that ends it has
//!   committed, so a reader that finds a seq absent and then reads sees a
//!   row that either was never claimed unwritten or has been written.
//! - Opening the store writes every task still unwritten and empties the
//!   table (`lib.rs`), so a crash loses no claim and nothing else in the
//!   store needs to know of them across a restart.
//!
//! Changes are undone with the savepoint or transaction that made them, as
//! in `ready.rs` and `running.rs`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use offload_core::{Error, Result, State, Timestamp};
use rusqlite::Connection;

use crate::rows::{StoredTask, storage_error};
use crate::seq_map::{SeqMap, SeqSet};
use crate::sql;

/// Bytes of one task in a claim's `tasks` blob: its seq (i64) and new
/// attempt (u32), little-endian.
const TASK_BYTES: usize = 12;

/// The seqs of claimed tasks whose rows still say pending, for readers.
#[derive(Debug, Default)]
pub(crate) struct UnwrittenSeqs {
    seqs: Mutex<SeqSet>,
    /// `seqs.len()`, read without the lock by every read of tasks.
    len: AtomicUsize,
}

impl UnwrittenSeqs {
    fn seqs(&self) -> std::sync::MutexGuard<'_, SeqSet> {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    pub fn contains(&self, seq: i64) -> bool {
        !self.is_empty() && self.seqs().contains(&seq)
    }

    fn insert_all(&self, new: impl Iterator<Item = i64>) {
        let mut seqs = self.seqs();
        seqs.extend(new);
        self.len.store(seqs.len(), Ordering::Release);
    }

    fn remove_all(&self, gone: impl Iterator<Item = i64>) {
        let mut seqs = self.seqs();
        for seq in gone {
            seqs.remove(&seq);
        }
        self.len.store(seqs.len(), Ordering::Release);
    }
}

/// What one claim's row records besides its tasks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ClaimRow {
    pub worker_id: String,
    pub claimed_at: Timestamp,
    pub lease_expires_at: Timestamp,
    /// Its tasks still unwritten; the row goes when none is left.
    unwritten: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Unwritten {
    claim: i64,
    attempt: u32,
}

#[derive(Debug)]
enum Change {
    Claimed { seq: i64 },
    Written { seq: i64, was: Unwritten },
    Opened { id: i64 },
    Closed { id: i64, row: ClaimRow },
}

/// The writer's record of the claims whose tasks are not all written.
#[derive(Debug)]
pub(crate) struct Claims {
    unwritten: SeqMap<Unwritten>,
    /// By claim id, which counts up as seqs do.
    rows: SeqMap<ClaimRow>,
    next_id: i64,
    /// Changes since the last commit, oldest first.
    changes: Vec<Change>,
    /// Seqs written since the last commit: they leave the readers' set once
    /// it commits.
    written: Vec<i64>,
    readers: std::sync::Arc<UnwrittenSeqs>,
    /// The running operation's claimed tasks (seq, new attempt), recorded
    /// together when it ends its claim ([`Claims::open`]).
    pub claiming: Vec<(i64, u32)>,
    /// Claims whose last unwritten task the running operation wrote: their
    /// rows are deleted with its row writes.
    pub closed: Vec<i64>,
}

impl Claims {
    /// Starts empty: opening the store emptied `claims`.
    pub fn new(readers: std::sync::Arc<UnwrittenSeqs>) -> Self {
        Self {
            unwritten: SeqMap::default(),
            rows: SeqMap::default(),
            next_id: 1,
            changes: Vec::new(),
            written: Vec::new(),
            readers,
            claiming: Vec::new(),
            closed: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.unwritten.is_empty()
    }

    /// Records a claim of `tasks` (seq, new attempt); returns its row's id
    /// and `tasks` blob, for the caller to insert.
    pub fn open(
        &mut self,
        worker_id: &str,
        claimed_at: Timestamp,
        lease_expires_at: Timestamp,
        tasks: &[(i64, u32)],
    ) -> (i64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut blob = Vec::with_capacity(tasks.len() * TASK_BYTES);
        for &(seq, attempt) in tasks {
            blob.extend_from_slice(&seq.to_le_bytes());
            blob.extend_from_slice(&attempt.to_le_bytes());
            let before = self.unwritten.insert(seq, Unwritten { claim: id, attempt });
            debug_assert!(before.is_none(), "task {seq} claimed twice unwritten");
            self.changes.push(Change::Claimed { seq });
        }
        self.readers.insert_all(tasks.iter().map(|&(seq, _)| seq));
        self.rows.insert(
            id,
            ClaimRow {
                worker_id: worker_id.to_owned(),
                claimed_at,
                lease_expires_at,
                unwritten: tasks.len(),
            },
        );
        self.changes.push(Change::Opened { id });
        (id, blob)
    }

    pub fn is_unwritten(&self, seq: i64) -> bool {
        self.unwritten.contains_key(&seq)
    }

    /// Every unwritten seq, in seq order, for a reader that asked for them
    /// all.
    pub fn unwritten_seqs(&self) -> Vec<i64> {
        let mut seqs: Vec<i64> = self.unwritten.keys().copied().collect();
        seqs.sort_unstable();
        seqs
    }

    /// Notes that `seq`'s row is being written whole. Returns the id of its
    /// claim's row when that was its last unwritten task: the caller
    /// deletes the row.
    pub fn written(&mut self, seq: i64) -> Option<i64> {
        let was = self.unwritten.remove(&seq)?;
        self.changes.push(Change::Written { seq, was });
        self.written.push(seq);
        let row = self.rows.get_mut(&was.claim)?;
        row.unwritten -= 1;
        if row.unwritten > 0 {
            return None;
        }
        let row = self.rows.remove(&was.claim)?;
        self.changes.push(Change::Closed { id: was.claim, row });
        Some(was.claim)
    }

    /// Turns a row read from `tasks` into the task it is: claimed, if its
    /// claim is unwritten.
    pub fn overlay(&self, stored: &mut StoredTask) -> Result<()> {
        let Some(unwritten) = self.unwritten.get(&stored.seq) else {
            return Ok(());
        };
        let claim = self.rows.get(&unwritten.claim);
        match claim {
            Some(claim)
                if still_unwritten(stored.task.state, stored.task.attempt, unwritten.attempt) =>
            {
                apply(stored, claim)
            }
            _ => Err(Error::Storage(format!(
                "task {} is recorded as claimed at attempt {} and its row is {} at attempt {}",
                stored.task.id, unwritten.attempt, stored.task.state, stored.task.attempt
            ))),
        }
    }

    pub fn mark(&self) -> usize {
        self.changes.len()
    }

    /// Undoes the changes made since `mark`, newest first, and forgets
    /// what the running operation had collected.
    pub fn roll_back_to(&mut self, mark: usize) {
        self.claiming.clear();
        self.closed.clear();
        let mut dropped = Vec::new();
        while self.changes.len() > mark {
            match self.changes.pop() {
                Some(Change::Claimed { seq }) => {
                    self.unwritten.remove(&seq);
                    dropped.push(seq);
                }
                Some(Change::Written { seq, was }) => {
                    self.unwritten.insert(seq, was);
                    if let Some(row) = self.rows.get_mut(&was.claim) {
                        row.unwritten += 1;
                    }
                }
                Some(Change::Opened { id }) => {
                    self.rows.remove(&id);
                }
                Some(Change::Closed { id, row }) => {
                    self.rows.insert(id, row);
                }
                None => break,
            }
        }
        // A seq written and then its write undone is unwritten again.
        self.written.retain(|seq| !self.unwritten.contains_key(seq));
        self.readers.remove_all(dropped.into_iter());
    }

    /// The transaction committed: what it wrote leaves the readers' set.
    pub fn commit(&mut self) {
        self.changes.clear();
        let unwritten = &self.unwritten;
        // A seq written and claimed again in the same transaction stays.
        let gone: Vec<i64> = self
            .written
            .drain(..)
            .filter(|seq| !unwritten.contains_key(seq))
            .collect();
        if !gone.is_empty() {
            self.readers.remove_all(gone.into_iter());
        }
    }

    /// How this record disagrees with the `claims` table, given with, for
    /// each of a claim's tasks, whether its row is still unwritten (pending
    /// at the attempt before the claim's).
    pub fn disagreement(&self, table: &[(StoredClaim, Vec<bool>)]) -> Option<String> {
        if table.len() != self.rows.len() {
            return Some(format!(
                "{} claims recorded in memory, {} in the table",
                self.rows.len(),
                table.len()
            ));
        }
        let mut unwritten_in_table = 0;
        for (claim, unwritten) in table {
            let id = claim.id;
            let Some(kept) = self.rows.get(&id) else {
                return Some(format!("claim {id} is in the table and not in memory"));
            };
            let still: Vec<(i64, u32)> = claim
                .tasks
                .iter()
                .zip(unwritten)
                .filter(|(_, unwritten)| **unwritten)
                .map(|(task, _)| *task)
                .collect();
            if kept.worker_id != claim.row.worker_id
                || kept.claimed_at != claim.row.claimed_at
                || kept.lease_expires_at != claim.row.lease_expires_at
                || kept.unwritten != still.len()
            {
                return Some(format!(
                    "claim {id} is {kept:?} in memory, with {} unwritten in the table",
                    still.len()
                ));
            }
            for (seq, attempt) in still {
                if self.unwritten.get(&seq) != Some(&Unwritten { claim: id, attempt }) {
                    return Some(format!(
                        "task {seq} is unwritten in claim {id} and recorded as {:?}",
                        self.unwritten.get(&seq)
                    ));
                }
                if !self.readers.contains(seq) {
                    return Some(format!("unwritten task {seq} is not in the readers' set"));
                }
                unwritten_in_table += 1;
            }
        }
        if unwritten_in_table != self.unwritten.len() {
            return Some(format!(
                "{} tasks unwritten in memory, {unwritten_in_table} in the table",
                self.unwritten.len()
            ));
        }
        None
    }
}

/// Whether a row in `state` at `attempt` is the one a claim that gave its
/// task `claimed_attempt` left unwritten: a write since would have changed
/// the state or the attempt.
pub(crate) fn still_unwritten(state: State, attempt: u32, claimed_attempt: u32) -> bool {
    state == State::Pending && attempt.checked_add(1) == Some(claimed_attempt)
}

/// What a claim did to a pending row, done again from its record.
pub(crate) fn apply(stored: &mut StoredTask, claim: &ClaimRow) -> Result<()> {
    stored.task.claim(
        &claim.worker_id,
        std::time::Duration::ZERO,
        claim.claimed_at,
    )?;
    stored.task.lease_expires_at = Some(claim.lease_expires_at);
    Ok(())
}

/// A row of `claims`.
pub(crate) struct StoredClaim {
    pub id: i64,
    pub row: ClaimRow,
    /// (seq, attempt) of each task it claimed.
    pub tasks: Vec<(i64, u32)>,
}

/// Every row of `claims`, oldest first: to write their tasks when the
/// store opens, or to check the writer's record of them.
pub(crate) fn read_claims(conn: &Connection) -> Result<Vec<StoredClaim>> {
    let mut stmt = conn.prepare_cached(sql::CLAIMS).map_err(storage_error)?;
    let mut rows = stmt.query([]).map_err(storage_error)?;
    let mut claims = Vec::new();
    while let Some(row) = rows.next().map_err(storage_error)? {
        let read = || -> rusqlite::Result<(StoredClaim, Vec<u8>)> {
            let claim = StoredClaim {
                id: row.get(0)?,
                row: ClaimRow {
                    worker_id: row.get(1)?,
                    claimed_at: Timestamp::from_millis(row.get(2)?),
                    lease_expires_at: Timestamp::from_millis(row.get(3)?),
                    unwritten: 0,
                },
                tasks: Vec::new(),
            };
            Ok((claim, row.get(4)?))
        };
        let (mut claim, blob) = read().map_err(storage_error)?;
        claim.tasks = decode_tasks(&blob)?;
        claims.push(claim);
    }
    Ok(claims)
}

/// The (seq, attempt) pairs of a `tasks` blob.
fn decode_tasks(blob: &[u8]) -> Result<Vec<(i64, u32)>> {
    if !blob.len().is_multiple_of(TASK_BYTES) {
        return Err(Error::Storage(format!(
            "a claim's tasks are {} bytes, not a multiple of {TASK_BYTES}",
            blob.len()
        )));
    }
    Ok(blob
        .chunks_exact(TASK_BYTES)
        .map(|task| {
            let (seq, attempt) = task.split_at(8);
            (
                i64::from_le_bytes(seq.try_into().unwrap_or_default()),
                u32::from_le_bytes(attempt.try_into().unwrap_or_default()),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const AT: Timestamp = Timestamp::from_millis(1_795_000_000_000);
    const UNTIL: Timestamp = Timestamp::from_millis(1_795_000_030_000);

    fn claims() -> (Claims, Arc<UnwrittenSeqs>) {
        let readers = Arc::new(UnwrittenSeqs::default());
        (Claims::new(Arc::clone(&readers)), readers)
    }

    #[test]
    fn a_seq_leaves_the_readers_set_only_once_its_write_commits() {
        let (mut claims, readers) = claims();
        let (id, blob) = claims.open("w", AT, UNTIL, &[(1, 1), (2, 1)]);
        assert_eq!(decode_tasks(&blob).unwrap(), [(1, 1), (2, 1)]);
        assert!(
            readers.contains(1) && readers.contains(2),
            "before the commit"
        );
        claims.commit();
        assert_eq!(claims.written(1), None, "task 2 is still unwritten");
        assert!(readers.contains(1), "the write has not committed");
        claims.commit();
        assert!(!readers.contains(1) && readers.contains(2));
        assert_eq!(claims.written(2), Some(id), "the claim's last task");
        claims.commit();
        assert!(readers.is_empty());
        assert!(claims.is_empty());
    }

    #[test]
    fn a_rolled_back_claim_or_write_leaves_no_trace() {
        let (mut claims, readers) = claims();
        let mark = claims.mark();
        claims.open("w", AT, UNTIL, &[(1, 1)]);
        claims.claiming.push((9, 1));
        claims.roll_back_to(mark);
        assert!(claims.is_empty() && readers.is_empty() && claims.claiming.is_empty());

        let (id, _) = claims.open("w", AT, UNTIL, &[(3, 1)]);
        claims.commit();
        let mark = claims.mark();
        assert_eq!(claims.written(3), Some(id));
        claims.closed.push(id);
        claims.roll_back_to(mark);
        assert!(claims.is_unwritten(3) && claims.closed.is_empty());
        claims.commit();
        assert!(readers.contains(3), "its write was undone");
        assert_eq!(claims.written(3), Some(id), "the claim's row is back");
    }

    #[test]
    fn a_task_written_and_claimed_again_before_the_commit_stays_unwritten() {
        let (mut claims, readers) = claims();
        claims.open("w", AT, UNTIL, &[(1, 1)]);
        claims.commit();
        assert!(claims.written(1).is_some());
        claims.open("v", AT, UNTIL, &[(1, 2)]);
        claims.commit();
        assert!(readers.contains(1) && claims.is_unwritten(1));
    }

    #[test]
    fn a_blob_of_the_wrong_length_is_an_error_not_a_panic() {
        assert!(decode_tasks(&[0; 13]).is_err());
        assert_eq!(decode_tasks(&[]).unwrap(), []);
    }
}
