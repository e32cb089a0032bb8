//! Task rows written back many to a statement.
//!
//! SQLite spends most of a one-row UPDATE of `tasks` on the statement, not
//! the row: every index's condition names `state`, so each statement opens
//! a cursor on the table and on six indexes and seeks each from its root.
//! One UPDATE for 64 rows costs less than half as much per row as 64
//! UPDATEs (bench/HISTORY.md). So the writer buffers the rows an operation
//! writes back and applies them together: before anything else touches the
//! connection (a read must see them, an insert must meet the unique index as
//! they left it), and once the operation is over (`WriteCtx::in_savepoint`).
//!
//! A row written twice before a flush is written once, with its latest
//! values: a write carries every column the state machine may change.
//!
//! Rows that cannot break a constraint (below) go in sorted by seq, and a
//! run of consecutive seqs as one statement over their range, which spares
//! SQLite the temporary index an `IN` list costs: the completions of tasks
//! claimed together are mostly such runs.
//!
//! Only the unique index (`tasks_unique_key`) can refuse a row write: every
//! NOT NULL column is always given a value, and no other index is unique.
//! A row that is not in that index once written cannot break it, so a
//! statement of such rows alone is an `UPDATE OR FAIL`. SQLite then keeps
//! no journal to undo the statement half-way, which otherwise copies every
//! page the statement touches. Such rows also go in outside their
//! operation's savepoint, whose journal does the same
//! (`WriteCtx::in_savepoint`); the two journals were 6.8% of the writer's
//! instructions for a claim and a completion (bench/HISTORY.md). Rows
//! that hold a key go in through a plain UPDATE, which a conflict undoes
//! whole, and inside their operation's savepoint, so that a conflict fails
//! that operation alone.

use std::collections::hash_map::Entry;

use rusqlite::types::Value;
use rusqlite::{ErrorCode, Statement};

use offload_core::{Result, State, Task};

use crate::seq_map::SeqMap;
use crate::shaped::{Shape, ShapedStatements};

/// The columns a row write sets, in the order of [`crate::sql::WRITE_ROW`]'s
/// parameters (`seq` follows them there).
pub(crate) const COLUMNS: [&str; 15] = [
    "state",
    "attempt",
    "max_attempts",
    "run_at",
    "progress",
    "result",
    "error",
    "errors",
    "cancel_requested",
    "updated_at",
    "started_at",
    "finished_at",
    "lease_expires_at",
    "deadline_at",
    "worker_id",
];

/// Fewer rows than this are written one statement each. A statement's row
/// count is rounded up to a multiple of this (by repeating its last row), so
/// few distinct statements reach the statement cache.
const ROUNDING: usize = 8;
/// Rows in one statement at most; each differing column adds a `CASE` of
/// this many branches, evaluated for every row.
const MAX_ROWS: usize = 64;

/// One task row as the state machine left it.
pub(crate) struct RowWrite {
    pub seq: i64,
    pub values: [Value; COLUMNS.len()],
    /// The row, once written, is in `tasks_unique_key`.
    pub holds_key: bool,
}

impl RowWrite {
    pub fn of(seq: i64, task: &Task) -> Result<Self> {
        Ok(Self {
            seq,
            values: crate::ops::row_values(task)?,
            holds_key: holds_unique_key(task),
        })
    }
}

/// Whether `task`'s row is in `tasks_unique_key`: the index's own condition
/// (`migrations/0004_ids_carry_seq.sql`), SPEC §1.2's active holder.
pub(crate) fn holds_unique_key(task: &Task) -> bool {
    in_unique_index(task.unique_key.is_some(), task.state, task.cancel_requested)
}

fn in_unique_index(has_key: bool, state: State, cancel_requested: bool) -> bool {
    has_key && state.code() <= State::Running.code() && !cancel_requested
}

/// The rows written back and not yet applied.
#[derive(Default)]
pub(crate) struct RowWrites {
    rows: Vec<RowWrite>,
    /// Where each buffered seq sits in `rows`.
    position: SeqMap<usize>,
    /// Some row pushed since the last flush holds a unique key (perhaps
    /// one since replaced by a later write of its seq).
    holds_key: bool,
}

impl RowWrites {
    pub fn push(&mut self, row: RowWrite) {
        self.holds_key |= row.holds_key;
        match self.position.entry(row.seq) {
            Entry::Occupied(at) => self.rows[*at.get()] = row,
            Entry::Vacant(at) => {
                at.insert(self.rows.len());
                self.rows.push(row);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether a buffered row could break the unique index.
    pub fn holds_key(&self) -> bool {
        self.holds_key
    }

    /// Forgets the buffered rows (their operation is rolling back).
    pub fn discard(&mut self) {
        self.rows.clear();
        self.position.clear();
        self.holds_key = false;
    }

    /// Applies every buffered row, in chunks; `single` is the one-row
    /// statement. On error the buffer is empty all the same: the caller
    /// rolls the operation back.
    pub fn flush(
        &mut self,
        shaped: &mut ShapedStatements<'_>,
        single: &mut Statement<'_>,
    ) -> rusqlite::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        self.position.clear();
        // Rows that hold a key go in the order they were written: a key
        // given up by one may be taken by the next.
        let by_seq = !std::mem::take(&mut self.holds_key);
        let mut rows = std::mem::take(&mut self.rows);
        if by_seq && !rows.is_sorted_by_key(|row| row.seq) {
            rows.sort_unstable_by_key(|row| row.seq);
        }
        let outcome = write_chunks(shaped, single, &rows, by_seq);
        // Keep the allocation for the next operation.
        self.rows = rows;
        self.rows.clear();
        outcome
    }
}

/// Writes `rows` a chunk at a time. With `by_seq` they are sorted by seq
/// and none holds a unique key, and a run of at least [`ROUNDING`]
/// consecutive seqs is a chunk of its own, written over its range.
fn write_chunks(
    shaped: &mut ShapedStatements<'_>,
    single: &mut Statement<'_>,
    rows: &[RowWrite],
    by_seq: bool,
) -> rusqlite::Result<()> {
    let mut at = 0;
    while at < rows.len() {
        let rest = &rows[at..];
        let run = if by_seq { consecutive(rest) } else { 0 };
        if run >= ROUNDING {
            write_many(shaped, single, &rest[..run], Select::Range)?;
            at += run;
            continue;
        }
        let listed = if by_seq {
            // Up to MAX_ROWS rows, ending where a run long enough for a
            // range begins.
            let mut end = run;
            while end < rest.len().min(MAX_ROWS) {
                let next = consecutive(&rest[end..]);
                if next >= ROUNDING {
                    break;
                }
                end += next;
            }
            end.min(MAX_ROWS)
        } else {
            rest.len().min(MAX_ROWS)
        };
        let chunk = &rest[..listed];
        if chunk.len() < ROUNDING {
            chunk.iter().try_for_each(|row| write_one(single, row))?;
        } else {
            write_many(shaped, single, chunk, Select::Listed)?;
        }
        at += chunk.len();
    }
    Ok(())
}

/// How many rows from the first have consecutive seqs, at most [`MAX_ROWS`].
fn consecutive(rows: &[RowWrite]) -> usize {
    1 + rows
        .windows(2)
        .take(MAX_ROWS - 1)
        .take_while(|pair| pair[1].seq - pair[0].seq == 1)
        .count()
}

/// Writes `row` through `stmt`, [`crate::sql::WRITE_ROW`] prepared.
pub(crate) fn write_one(stmt: &mut Statement<'_>, row: &RowWrite) -> rusqlite::Result<()> {
    for (i, value) in row.values.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, value)?;
    }
    stmt.raw_bind_parameter(COLUMNS.len() + 1, row.seq)?;
    stmt.raw_execute().map(drop)
}

/// How an UPDATE of many rows names them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Select {
    /// `seq IN (…)`, a parameter a row: SQLite first sorts them into a
    /// temporary index.
    Listed,
    /// `seq BETWEEN ? AND ?`, for rows whose seqs are every seq from the
    /// first to the last: SQLite walks the table from the first. For a
    /// completion it costs about a tenth less than the same rows listed
    /// (bench/HISTORY.md).
    Range,
}

/// One UPDATE for `chunk`: a column with one value in every row is set to
/// it, any other to `CASE seq WHEN … THEN … END`.
fn write_many(
    shaped: &mut ShapedStatements<'_>,
    single: &mut Statement<'_>,
    chunk: &[RowWrite],
    select: Select,
) -> rusqlite::Result<()> {
    let varies: [bool; COLUMNS.len()] =
        std::array::from_fn(|c| chunk[1..].iter().any(|r| r.values[c] != chunk[0].values[c]));
    // A range with no CASE has one shape whatever its length.
    let rounded = if select == Select::Range && !varies.contains(&true) {
        0
    } else {
        chunk.len().div_ceil(ROUNDING) * ROUNDING
    };
    // Rows past the end repeat the last one: the same seq with the same
    // values changes nothing more.
    let row = |i: usize| &chunk[i.min(chunk.len() - 1)];
    let or_fail = !chunk.iter().any(|r| r.holds_key);
    let shape = Shape::WriteRows {
        rows: rounded,
        varies: varies
            .iter()
            .enumerate()
            .fold(0, |mask, (c, &v)| mask | (u16::from(v) << c)),
        or_fail,
        select,
    };
    let stmt = shaped.get(shape, || write_many_text(rounded, &varies, or_fail, select))?;
    let mut at = 1;
    for (c, &differs) in varies.iter().enumerate() {
        if differs {
            for i in 0..rounded {
                stmt.raw_bind_parameter(at, row(i).seq)?;
                stmt.raw_bind_parameter(at + 1, &row(i).values[c])?;
                at += 2;
            }
        } else {
            stmt.raw_bind_parameter(at, &chunk[0].values[c])?;
            at += 1;
        }
    }
    match select {
        Select::Listed => {
            for i in 0..rounded {
                stmt.raw_bind_parameter(at, row(i).seq)?;
                at += 1;
            }
        }
        Select::Range => {
            stmt.raw_bind_parameter(at, chunk[0].seq)?;
            stmt.raw_bind_parameter(at + 1, chunk[chunk.len() - 1].seq)?;
        }
    }
    match stmt.raw_execute() {
        Ok(_) => Ok(()),
        // SQLite updates the rows in seq order, not the order they were
        // written in, and a unique key may be free in one order and not in
        // the other. The failed statement changed nothing; writing the rows
        // one at a time, in order, gives the answer the operation would
        // have had unbatched.
        // (An `OR FAIL` statement cannot meet a conflict, and would leave
        // the rows before it written: its error goes up like any other.)
        Err(e) if !or_fail && e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
            chunk.iter().try_for_each(|row| write_one(single, row))
        }
        Err(e) => Err(e),
    }
}

/// [`write_many`]'s statement for `rows` rows, `varies` telling which
/// columns differ between them; `or_fail` when no row holds a unique key.
fn write_many_text(
    rows: usize,
    varies: &[bool; COLUMNS.len()],
    or_fail: bool,
    select: Select,
) -> String {
    let mut sql = String::from(if or_fail {
        "UPDATE OR FAIL tasks SET "
    } else {
        "UPDATE tasks SET "
    });
    for (c, column) in COLUMNS.iter().enumerate() {
        if c > 0 {
            sql.push_str(", ");
        }
        sql.push_str(column);
        if varies[c] {
            sql.push_str(" = CASE seq");
            for _ in 0..rows {
                sql.push_str(" WHEN ? THEN ?");
            }
            sql.push_str(" END");
        } else {
            sql.push_str(" = ?");
        }
    }
    match select {
        Select::Listed => {
            sql.push_str(" WHERE seq IN (?");
            for _ in 1..rows {
                sql.push_str(",?");
            }
            sql.push(')');
        }
        Select::Range => sql.push_str(" WHERE seq BETWEEN ? AND ?"),
    }
    sql
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    /// A table with the written columns, and a unique index that a row can
    /// leave and another enter, as `tasks_unique_key` does.
    fn database(rows: i64) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        let columns: Vec<String> = COLUMNS.iter().map(|c| format!("{c} ANY")).collect();
        conn.execute_batch(&format!(
            "CREATE TABLE tasks (seq INTEGER PRIMARY KEY, unique_key TEXT, {});
             CREATE UNIQUE INDEX holder ON tasks (unique_key) WHERE state <= 3;",
            columns.join(", ")
        ))
        .unwrap();
        for seq in 1..=rows {
            conn.execute("INSERT INTO tasks (seq, state) VALUES (?1, 2)", [seq])
                .unwrap();
        }
        conn
    }

    fn row(seq: i64, state: i64, text: &str) -> RowWrite {
        let mut values: [Value; COLUMNS.len()] = std::array::from_fn(|_| Value::Null);
        values[0] = Value::Integer(state);
        values[1] = Value::Integer(seq * 10);
        values[5] = Value::Text(text.to_owned());
        // As if every row had a unique key: an active one holds it.
        RowWrite {
            seq,
            values,
            holds_key: state <= 3,
        }
    }

    fn stored(conn: &Connection, seq: i64) -> (i64, i64, String) {
        conn.query_row(
            "SELECT state, attempt, result FROM tasks WHERE seq = ?1",
            [seq],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    }

    fn state(conn: &Connection, seq: i64) -> i64 {
        conn.query_row("SELECT state FROM tasks WHERE seq = ?1", [seq], |r| {
            r.get(0)
        })
        .unwrap()
    }

    fn flush(conn: &Connection, writes: &mut RowWrites) -> rusqlite::Result<()> {
        let mut single = conn.prepare(crate::sql::WRITE_ROW).unwrap();
        writes.flush(&mut ShapedStatements::new(conn), &mut single)
    }

    /// A lone row goes through `WRITE_ROW`, bound in `COLUMNS`' order.
    #[test]
    fn the_one_row_statement_sets_the_columns_in_the_same_order() {
        for (i, column) in COLUMNS.iter().enumerate() {
            let set = format!("{column} = ?{},", i + 1);
            let last = format!("{column} = ?{} WHERE", i + 1);
            assert!(
                crate::sql::WRITE_ROW.contains(&set) || crate::sql::WRITE_ROW.contains(&last),
                "WRITE_ROW does not set {column} from parameter {}",
                i + 1
            );
        }
        assert!(crate::sql::WRITE_ROW.ends_with(&format!("WHERE seq = ?{}", COLUMNS.len() + 1)));
    }

    #[test]
    fn every_row_gets_its_own_values_in_chunks_of_any_size() {
        // 3 rows go one statement each; 85 as 64, then 21 rounded up to
        // 24; 88 as 64 and 24.
        for count in [3, 85, 88] {
            let conn = database(count);
            let mut writes = RowWrites::default();
            for seq in 1..=count {
                // Some columns equal in every row, others not.
                writes.push(row(seq, 3, &format!("r{seq}")));
            }
            flush(&conn, &mut writes).unwrap();
            assert!(writes.is_empty());
            for seq in 1..=count {
                assert_eq!(
                    stored(&conn, seq),
                    (3, seq * 10, format!("r{seq}")),
                    "{count} rows"
                );
            }
        }
    }

    /// Writes `writes` and answers how the statements named their rows.
    fn flush_selecting(conn: &Connection, writes: &mut RowWrites) -> Vec<Select> {
        let mut single = conn.prepare(crate::sql::WRITE_ROW).unwrap();
        let mut shaped = ShapedStatements::new(conn);
        writes.flush(&mut shaped, &mut single).unwrap();
        let mut selects: Vec<Select> = shaped
            .shapes()
            .map(|shape| match shape {
                Shape::WriteRows { select, .. } => *select,
                other => panic!("not a row write: {other:?}"),
            })
            .collect();
        selects.sort_by_key(|select| *select == Select::Range);
        selects.dedup();
        selects
    }

    /// A row written as finished: it holds no unique key.
    fn finished(seq: i64, text: &str) -> RowWrite {
        let written = row(seq, 4, text);
        assert!(!written.holds_key);
        written
    }

    #[test]
    fn a_run_of_consecutive_seqs_is_written_over_its_range_and_nothing_else() {
        let conn = database(41);
        let mut writes = RowWrites::default();
        // Out of order, around seq 21, which is not written.
        for seq in (22..=40).rev().chain((1..=20).rev()) {
            writes.push(finished(seq, &format!("r{seq}")));
        }
        assert_eq!(flush_selecting(&conn, &mut writes), [Select::Range]);
        for seq in (1..=20).chain(22..=40) {
            assert_eq!(stored(&conn, seq), (4, seq * 10, format!("r{seq}")));
        }
        for untouched in [21, 41] {
            assert_eq!(state(&conn, untouched), 2, "seq {untouched}");
        }
        // Rows alike but for their seq share one statement, any length.
        for seq in (1..=20).chain(22..=40) {
            let mut alike = finished(seq, "alike");
            alike.values[1] = Value::Integer(7);
            writes.push(alike);
        }
        assert_eq!(flush_selecting(&conn, &mut writes), [Select::Range]);
        for seq in (1..=20).chain(22..=40) {
            assert_eq!(stored(&conn, seq), (4, 7, "alike".to_owned()));
        }
        assert_eq!(state(&conn, 21), 2);
    }

    #[test]
    fn scattered_rows_are_listed_between_runs() {
        let conn = database(210);
        let odd: Vec<i64> = (1..=39).step_by(2).collect();
        let mut writes = RowWrites::default();
        for &seq in [204, 200, 202]
            .iter()
            .chain(&odd)
            .chain(&(100..=150).collect::<Vec<_>>())
        {
            writes.push(finished(seq, &format!("r{seq}")));
        }
        assert_eq!(
            flush_selecting(&conn, &mut writes),
            [Select::Listed, Select::Range]
        );
        let written: Vec<i64> = odd
            .iter()
            .copied()
            .chain(100..=150)
            .chain([200, 202, 204])
            .collect();
        for seq in 1..=210 {
            if written.contains(&seq) {
                assert_eq!(stored(&conn, seq), (4, seq * 10, format!("r{seq}")));
            } else {
                assert_eq!(state(&conn, seq), 2, "seq {seq} was not written");
            }
        }
    }

    /// `holds_unique_key` says what the index's own condition says, for
    /// every state, with and without a key and a cancel request.
    #[tokio::test]
    async fn holding_a_key_is_the_unique_index_condition() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::SqliteStore::open(dir.path().join("t.db"), crate::SqliteOptions::default())
                .unwrap();
        let cases: Vec<(bool, State, bool)> = [false, true]
            .into_iter()
            .flat_map(|key| {
                State::ALL
                    .into_iter()
                    .flat_map(move |state| [(key, state, false), (key, state, true)])
            })
            .collect();
        let asked = cases.clone();
        let in_index: Vec<bool> = store
            .writer
            .run(move |ctx| {
                let conn = ctx.conn()?;
                let index: String = conn
                    .query_row(
                        "SELECT sql FROM sqlite_master WHERE name = 'tasks_unique_key'",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(crate::rows::storage_error)?;
                let (_, condition) = index.split_once("WHERE").expect("a partial index");
                let query = format!(
                    "SELECT {condition} FROM (SELECT ?1 AS unique_key, ?2 AS state, \
                     ?3 AS cancel_requested)"
                );
                asked
                    .iter()
                    .map(|&(key, state, cancel)| {
                        conn.query_row(
                            &query,
                            rusqlite::params![key.then_some("k"), state.code(), cancel],
                            |r| r.get(0),
                        )
                        .map_err(crate::rows::storage_error)
                    })
                    .collect()
            })
            .await
            .unwrap();
        let mut seen = 0;
        for (&(key, state, cancel), &indexed) in cases.iter().zip(&in_index) {
            assert_eq!(
                in_unique_index(key, state, cancel),
                indexed,
                "key {key}, {state:?}, cancel requested {cancel}"
            );
            seen += usize::from(indexed);
        }
        // Blocked, scheduled, pending and running, with a key, not cancelled.
        assert_eq!(seen, 4);
    }

    #[test]
    fn the_latest_write_of_a_row_wins() {
        let conn = database(10);
        let mut writes = RowWrites::default();
        for seq in 1..=10 {
            writes.push(row(seq, 3, "first"));
        }
        writes.push(row(4, 4, "second"));
        flush(&conn, &mut writes).unwrap();
        assert_eq!(stored(&conn, 4), (4, 40, "second".to_owned()));
        assert_eq!(stored(&conn, 5), (3, 50, "first".to_owned()));
    }

    #[test]
    fn a_unique_key_passed_on_in_write_order_is_not_a_conflict() {
        let conn = database(10);
        conn.execute(
            "UPDATE tasks SET unique_key = 'k', state = 6 WHERE seq = 1",
            [],
        )
        .unwrap();
        conn.execute("UPDATE tasks SET unique_key = 'k' WHERE seq = 2", [])
            .unwrap();
        let mut writes = RowWrites::default();
        // Task 2 gives the key up before task 1 takes it; in seq order
        // task 1 would come first and find it held.
        writes.push(row(2, 6, "gave up"));
        writes.push(row(1, 2, "took"));
        for seq in 3..=10 {
            writes.push(row(seq, 3, "filler"));
        }
        flush(&conn, &mut writes).unwrap();
        assert_eq!(stored(&conn, 1).0, 2);
        assert_eq!(stored(&conn, 2).0, 6);
        // A real conflict is still one.
        writes.push(row(2, 2, "again"));
        for seq in 3..=10 {
            writes.push(row(seq, 3, "filler"));
        }
        let err = flush(&conn, &mut writes).unwrap_err();
        assert_eq!(
            err.sqlite_error_code(),
            Some(ErrorCode::ConstraintViolation)
        );
        assert!(writes.is_empty());
    }
}
