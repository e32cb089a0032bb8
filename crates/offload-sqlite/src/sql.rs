//! The statements whose query plans decide how the store scales: each must
//! reach `tasks` through an index, never by scanning the table. Public so
//! the test suite can check their plans (`EXPLAIN QUERY PLAN`) against the
//! real schema.
//!
//! SQLite uses a partial index only when a query's WHERE clause names the
//! index's own condition: `state = ?1` does not let it prove `state >= 4`,
//! however `?1` is bound, so statements that take the state as a parameter
//! repeat the index's condition literally.

use crate::rows::task_columns;

/// Finished tasks of one state (`?1`) finished by `?2`, at most `?3` of them,
/// deleted; through `tasks_finished`.
pub const DELETE_FINISHED: &str = "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks \
     WHERE state = ?1 AND state >= 4 AND finished_at <= ?2 LIMIT ?3) RETURNING queue, type";

/// Rows read or inserted by one statement at most ([`tasks_by_seq`],
/// [`insert_plain_rows`]).
pub const MANY_ROWS: usize = 64;
/// Those statements take a multiple of this many rows, so that few
/// distinct statements reach the statement cache.
pub const ROWS_ROUNDING: usize = 8;

/// How many of `left` rows the next of those statements takes: as many as
/// it may, rounded down to [`ROWS_ROUNDING`]; 0 where fewer than that
/// are left, for a statement of one row each.
pub fn rows_per_statement(left: usize) -> usize {
    left.min(MANY_ROWS) / ROWS_ROUNDING * ROWS_ROUNDING
}

/// Panics unless `rows` is a size those statements take.
fn check_rows(rows: usize) {
    assert!(
        rows > 0 && rows.is_multiple_of(ROWS_ROUNDING) && rows <= MANY_ROWS,
        "{rows} rows is not a statement's size"
    );
}

/// Tasks by seq, `rows` of them, for a claim: its candidates come from the
/// writer's memory (`ready.rs`). Built once per size: the writer keeps the
/// statement (`shaped.rs`).
pub fn tasks_by_seq(rows: usize) -> String {
    check_rows(rows);
    let list: Vec<String> = (1..=rows).map(|i| format!("?{i}")).collect();
    format!(
        "SELECT {} FROM tasks WHERE seq IN ({})",
        task_columns!(),
        list.join(", ")
    )
}

/// A claim's row (`claims.rs`): id, worker, claimed_at, lease_expires_at,
/// tasks.
pub const INSERT_CLAIM: &str = "INSERT INTO claims (id, worker_id, claimed_at, \
     lease_expires_at, tasks) VALUES (?1, ?2, ?3, ?4, ?5)";

/// A claim's row, once none of its tasks is left unwritten.
pub const DELETE_CLAIM: &str = "DELETE FROM claims WHERE id = ?1";

/// Every claim's row, to write its tasks when the store opens, or to check
/// the writer's record of them.
pub const CLAIMS: &str =
    "SELECT id, worker_id, claimed_at, lease_expires_at, tasks FROM claims ORDER BY id";

/// Scheduled tasks whose time has come, earliest first.
pub const DUE: &str = concat!(
    "SELECT ",
    task_columns!(),
    " FROM tasks WHERE state = 1 AND run_at <= ?1 ORDER BY run_at LIMIT ?2"
);

/// When the next scheduled task comes due.
pub const NEXT_DUE: &str = "SELECT MIN(run_at) FROM tasks WHERE state = 1";

/// The seqs among JSON array `?1` that are still rows, taken from the
/// writer's memory: no index holds the pending (`ready.rs`) or running
/// (`running.rs`) tasks. Listing appends its filters, then reads the rows
/// its page takes with [`TASK_IN_STATE`], which checks the state: the state
/// is stored after the payload, and checking it here would read every
/// candidate's payload from its overflow pages.
pub const SEQS_AMONG: &str = "SELECT seq FROM tasks WHERE seq IN (SELECT value FROM json_each(?1))";

/// How `task_labels` names the label `key`: `value` (a key holds no ':'),
/// as schema version 8's backfill and trigger spell it in SQL.
pub fn label_entry(key: &str, value: &str) -> String {
    format!("{key}:{value}")
}

/// The longest payload kept in its task's row; a longer one is written to
/// `task_payloads` once (schema version 9), so that the writes of the
/// task's state do not copy it again. Kept apart from 512 bytes, payloads
/// of 600 and 1,000 cost batch enqueues 13–39% of their rate, about what
/// their processing gained (bench/HISTORY.md, round 68).
pub const INLINE_PAYLOAD_BYTES: usize = 1024;

/// What a row's `payload` holds: the payload, or '' where it is kept apart.
pub fn row_payload(payload: &str) -> &str {
    if payload.len() > INLINE_PAYLOAD_BYTES {
        ""
    } else {
        payload
    }
}

/// `rows` payloads kept apart, each a seq and its payload, in one
/// statement, as a batch's rows are ([`insert_plain_rows`]). `rows` is 1
/// or a multiple of [`ROWS_ROUNDING`] up to [`MANY_ROWS`], so that few
/// shapes reach the statement cache.
pub fn add_payloads_apart(rows: usize) -> String {
    debug_assert!(rows == 1 || (rows.is_multiple_of(ROWS_ROUNDING) && rows <= MANY_ROWS));
    let mut sql = String::from("INSERT INTO task_payloads (task_seq, payload) VALUES ");
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(?{}, ?{})", 2 * row + 1, 2 * row + 2));
    }
    sql
}

/// Task `?2`'s entry for its label `?1` ([`label_entry`]).
pub const ADD_LABEL_ENTRY: &str = "INSERT INTO task_labels (label, task_seq) VALUES (?1, ?2)";

/// How many tasks carry label `?1` (`key:value`), counted up to `?2`:
/// through `task_labels`, whose entries for one label are adjacent.
pub const LABEL_TASKS_UP_TO: &str =
    "SELECT count(*) FROM (SELECT 1 FROM task_labels WHERE label = ?1 LIMIT ?2)";

/// Up to `?3` seqs of the tasks of label `?1` below `?2`, newest first.
pub const LABEL_SEQS_BELOW: &str = "SELECT task_seq FROM task_labels \
     WHERE label = ?1 AND task_seq < ?2 ORDER BY task_seq DESC LIMIT ?3";

/// The opening of a list that walks the tasks of label `?1` through
/// `task_labels`, newest first, each task's row read by its seq: `CROSS
/// JOIN` keeps SQLite from reaching the tasks another way first.
pub const LIST_BY_LABEL: &str = concat!(
    "SELECT ",
    task_columns!(),
    " FROM task_labels CROSS JOIN tasks ON tasks.seq = task_labels.task_seq \
     WHERE task_labels.label = ?1"
);

/// The task of seq `?1` if it is still in state `?2`.
pub const TASK_IN_STATE: &str = concat!(
    "SELECT ",
    task_columns!(),
    " FROM tasks WHERE seq = ?1 AND state = ?2"
);

/// A task by id `?1`, through the seq `?2` its id carries (`ids.rs`).
pub const TASK_BY_ID: &str = concat!(
    "SELECT ",
    task_columns!(),
    " FROM tasks WHERE seq = ?2 AND id = ?1"
);

/// A task by id `?1` among the rows stored before schema version 4, whose
/// ids do not carry their seq (`ids.rs`).
pub const TASK_BY_ID_BEFORE_V4: &str = concat!(
    "SELECT ",
    task_columns!(),
    " FROM tasks WHERE seq = (SELECT seq FROM task_ids_before_v4 WHERE id = ?1) AND id = ?1"
);

/// [`TASK_BY_ID`]'s state only.
pub const STATE_BY_ID: &str = "SELECT state FROM tasks WHERE seq = ?2 AND id = ?1";

/// [`TASK_BY_ID_BEFORE_V4`]'s state only.
pub const STATE_BY_ID_BEFORE_V4: &str = "SELECT state FROM tasks \
     WHERE seq = (SELECT seq FROM task_ids_before_v4 WHERE id = ?1) AND id = ?1";

/// A new task's row. Its seq (`?15`) is the one its id carries, or NULL
/// when that is the one SQLite picks itself (`ids.rs`).
pub const INSERT_TASK: &str = "INSERT INTO tasks (id, type, queue, payload, priority, state, \
     attempt, max_attempts, timeout_secs, run_at, owner, labels, unique_key, depends_on, \
     cancel_requested, created_at, updated_at, seq) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 0, ?14, ?14, ?15)";

/// Parameters per row of [`insert_plain_rows`]: id, type, queue, payload,
/// priority, state, max_attempts, timeout_secs, run_at, owner, labels,
/// seq.
pub const INSERT_PLAIN_PARAMS: usize = 12;

/// The parameters of [`insert_plain_rows`]' rows that may be bound once for
/// all of them, by their place in a row (bit `i` for place `i`): type, queue,
/// priority, state, max_attempts, timeout_secs, run_at, owner and labels.
/// The tasks of a batch mostly share those; an id and a seq are each row's
/// own, and a payload nearly always is.
pub const INSERT_PLAIN_SHAREABLE: u16 = 0b0111_1111_0110;

/// New rows of tasks with neither a unique key nor dependencies, `rows` of
/// them, in the order of [`INSERT_TASK`]'s columns up to `owner` and
/// `labels`, then the seq. Each row has its own parameter for each place
/// but those in `shared` ([`INSERT_PLAIN_SHAREABLE`]), which come once,
/// after every row's, in the order of their places; the time comes last.
/// Binding a text makes SQLite copy it into memory of its own and free it
/// at the next binding, and every binding first clears the last one's
/// value: binding what a batch's tasks share once a statement instead of
/// once a row cut the writer's instructions for a batch enqueue by 11%
/// (callgrind, 11,000 → 9,800 a task). Built once per size and set of
/// shared places: the writer keeps the statement (`shaped.rs`).
pub fn insert_plain_rows(rows: usize, shared: u16) -> String {
    check_rows(rows);
    assert_eq!(shared & !INSERT_PLAIN_SHAREABLE, 0, "place not shareable");
    let own = INSERT_PLAIN_PARAMS - shared.count_ones() as usize;
    let first_shared = rows * own + 1;
    let time = first_shared + shared.count_ones() as usize;
    let shared_before = |place: usize| (shared & ((1 << place) - 1)).count_ones() as usize;
    let param = |row: usize, place: usize| {
        if shared & (1 << place) != 0 {
            first_shared + shared_before(place)
        } else {
            row * own + place - shared_before(place) + 1
        }
    };
    let mut sql = String::from(
        "INSERT INTO tasks (id, type, queue, payload, priority, state, attempt, \
         max_attempts, timeout_secs, run_at, owner, labels, unique_key, depends_on, \
         cancel_requested, created_at, updated_at, seq) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        let p = |place: usize| param(row, place);
        sql.push_str(&format!(
            "(?{}, ?{}, ?{}, ?{}, ?{}, ?{}, 0, ?{}, ?{}, ?{}, ?{}, ?{}, NULL, NULL, 0, \
             ?{time}, ?{time}, ?{})",
            p(0),
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            p(6),
            p(7),
            p(8),
            p(9),
            p(10),
            p(11),
        ));
    }
    sql
}

/// Every column the state machine may change, written back to task `?16`.
pub const WRITE_ROW: &str = "UPDATE tasks SET state = ?1, attempt = ?2, max_attempts = ?3, \
     run_at = ?4, progress = ?5, result = ?6, error = ?7, errors = ?8, cancel_requested = ?9, \
     updated_at = ?10, started_at = ?11, finished_at = ?12, lease_expires_at = ?13, \
     deadline_at = ?14, worker_id = ?15 WHERE seq = ?16";

/// [`tasks_by_seq`]'s shape, for the plan check.
const TASKS_BY_SEQ_8: &str = concat!(
    "SELECT ",
    task_columns!(),
    " FROM tasks WHERE seq IN (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
);

/// Every statement above, named, for the plan check.
pub const PLANNED: &[(&str, &str)] = &[
    ("DELETE_FINISHED", DELETE_FINISHED),
    ("TASK_BY_ID", TASK_BY_ID),
    ("TASK_BY_ID_BEFORE_V4", TASK_BY_ID_BEFORE_V4),
    ("STATE_BY_ID", STATE_BY_ID),
    ("STATE_BY_ID_BEFORE_V4", STATE_BY_ID_BEFORE_V4),
    ("TASKS_BY_SEQ", TASKS_BY_SEQ_8),
    ("SEQS_AMONG", SEQS_AMONG),
    ("TASK_IN_STATE", TASK_IN_STATE),
    ("LABEL_TASKS_UP_TO", LABEL_TASKS_UP_TO),
    ("LIST_BY_LABEL", LIST_BY_LABEL),
    ("LABEL_SEQS_BELOW", LABEL_SEQS_BELOW),
    ("DUE", DUE),
    ("NEXT_DUE", NEXT_DUE),
    ("WRITE_ROW", WRITE_ROW),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row's parameter numbers by place, and the time's, as
    /// [`insert_plain_rows`] wrote them.
    fn numbers(sql: &str) -> (Vec<Vec<usize>>, usize) {
        let values = &sql[sql.find("VALUES ").expect("VALUES") + 7..];
        let mut rows = Vec::new();
        let mut time = 0;
        for tuple in values.split("),(") {
            let found: Vec<usize> = tuple
                .split('?')
                .skip(1)
                .map(|t| {
                    t.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .map(|n| n.parse().expect("a parameter number"))
                .collect();
            assert_eq!(found.len(), INSERT_PLAIN_PARAMS + 2, "{tuple}");
            time = found[INSERT_PLAIN_PARAMS - 1];
            let mut places = found[..INSERT_PLAIN_PARAMS - 1].to_vec();
            places.push(found[INSERT_PLAIN_PARAMS + 1]);
            rows.push(places);
        }
        (rows, time)
    }

    #[test]
    fn plain_rows_number_own_places_row_by_row_then_shared_ones_then_the_time() {
        let (rows, time) = numbers(&insert_plain_rows(8, 0));
        for (row, places) in rows.iter().enumerate() {
            let expected: Vec<usize> = (1..=INSERT_PLAIN_PARAMS)
                .map(|i| row * INSERT_PLAIN_PARAMS + i)
                .collect();
            assert_eq!(places, &expected);
        }
        assert_eq!(time, 8 * INSERT_PLAIN_PARAMS + 1);

        let subsets = (0..=INSERT_PLAIN_SHAREABLE).filter(|s| s & !INSERT_PLAIN_SHAREABLE == 0);
        for shared in subsets {
            for size in [8, 64] {
                let (rows, time) = numbers(&insert_plain_rows(size, shared));
                assert_eq!(rows.len(), size);
                let mut used: Vec<usize> = rows.iter().flatten().copied().collect();
                used.push(time);
                used.sort_unstable();
                used.dedup();
                assert_eq!(used, (1..=time).collect::<Vec<_>>(), "shared {shared:#b}");
                for place in 0..INSERT_PLAIN_PARAMS {
                    let mut at: Vec<usize> = rows.iter().map(|r| r[place]).collect();
                    at.dedup();
                    let expected = if shared & (1 << place) != 0 { 1 } else { size };
                    assert_eq!(at.len(), expected, "place {place}, shared {shared:#b}");
                }
            }
        }
    }
}
