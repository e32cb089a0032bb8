//! Reads on their own connections, so that lists and lookups never wait for
//! the writer (WAL lets readers see the last commit while a write goes on).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use offload_core::{
    Error, ListQuery, PageFill, Result, State, TaskPage, decode_cursor, encode_cursor,
};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};
use uuid::Uuid;

use crate::ids;
use crate::ready::PendingSeqs;
use crate::rows::{StoredTask, TASK_COLUMNS, decode, storage_error};
use crate::running::RunningSet;
use crate::sql;

/// Idle connections kept for reuse; more may be open during bursts.
const IDLE_READERS: usize = 8;

#[derive(Debug)]
pub(crate) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            path,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn open(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(storage_error)?;
        conn.execute_batch(
            "PRAGMA query_only = ON; PRAGMA busy_timeout = 5000; PRAGMA cache_size = -16384;",
        )
        .map_err(storage_error)?;
        Ok(conn)
    }

    /// Runs `read` on an idle connection, on the blocking pool.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let reused = this.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match reused {
                Some(conn) => conn,
                None => this.open()?,
            };
            let outcome = read(&conn);
            let mut idle = this.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
            outcome
        })
        .await
        .map_err(|e| Error::Storage(format!("reader task failed: {e}")))?
    }
}

pub(crate) fn get(conn: &Connection, id: Uuid) -> Result<Option<StoredTask>> {
    ids::find(conn, id, sql::TASK_BY_ID, sql::TASK_BY_ID_BEFORE_V4, decode).map_err(storage_error)
}

/// Pending and running tasks are listed from the writer's memory, this many
/// seqs to a statement.
const SEQS_PER_READ: usize = 500;

/// Where readers find the tasks of the states no index holds.
pub(crate) struct InMemory<'a> {
    pub pending: &'a PendingSeqs,
    pub running: &'a RunningSet,
}

impl InMemory<'_> {
    /// Up to `limit` seqs of `state` below `below`, newest first.
    fn newest_first(&self, state: State, below: Option<i64>, limit: usize) -> Vec<i64> {
        match state {
            State::Pending => self.pending.newest_first(below, limit),
            // Running: the only other state kept there.
            _ => self.running.newest_first(below, limit),
        }
    }

    /// Whether task `seq` is in `state` (pending or running).
    fn holds(&self, state: State, seq: i64) -> bool {
        match state {
            State::Pending => self.pending.contains(seq),
            _ => self.running.contains(seq),
        }
    }
}

/// Up to `limit` seqs of the tasks of `label` (as `task_labels` names it)
/// below `below`, newest first, whatever their state.
fn label_seqs(
    conn: &Connection,
    label: &str,
    below: Option<i64>,
    limit: usize,
) -> Result<Vec<i64>> {
    conn.prepare_cached(sql::LABEL_SEQS_BELOW)
        .and_then(|mut stmt| {
            stmt.query_map(
                rusqlite::params![label, below.unwrap_or(i64::MAX), limit as i64],
                |r| r.get(0),
            )?
            .collect()
        })
        .map_err(storage_error)
}

/// A label carried by fewer tasks than this is listed through
/// `task_labels` (schema version 8): its tasks alone are walked, at most
/// this many. One carried by more is met often enough walking every task
/// newest first, which keeps a list's other filters on their own indexes
/// (an owner's tasks, a state's).
const RARE_LABEL_TASKS: i64 = 5_000;

/// Of `labels`, the one fewest tasks carry, as `task_labels` names it,
/// when fewer than [`RARE_LABEL_TASKS`] do.
fn rarest_label(conn: &Connection, labels: &[(String, String)]) -> Result<Option<String>> {
    let mut rarest: Option<(i64, String)> = None;
    for (key, value) in labels {
        let label = sql::label_entry(key, value);
        let tasks: i64 = conn
            .prepare_cached(sql::LABEL_TASKS_UP_TO)
            .and_then(|mut stmt| {
                stmt.query_row(rusqlite::params![label, RARE_LABEL_TASKS], |r| r.get(0))
            })
            .map_err(storage_error)?;
        if tasks < RARE_LABEL_TASKS && rarest.as_ref().is_none_or(|(fewest, _)| tasks < *fewest) {
            rarest = Some((tasks, label));
        }
    }
    Ok(rarest.map(|(_, label)| label))
}

/// How one label reads in the `labels` column, which `ops.rs` writes with
/// serde_json.
fn label_text(key: &str, value: &str) -> String {
    let quoted = |text: &str| serde_json::Value::from(text).to_string();
    format!("{}:{}", quoted(key), quoted(value))
}

/// The page of tasks `query` asks for. `owner_first`: its owner's tasks are
/// read through `tasks_by_owner` and their states checked as they come,
/// rather than its states' tasks through `tasks_by_state` and their owner
/// checked ([`offload_core::OWNER_LIST_STATE_WALK`]).
pub(crate) fn list(
    conn: &Connection,
    query: &ListQuery,
    memory: &InMemory<'_>,
    owner_first: bool,
) -> Result<TaskPage> {
    query.check_limit()?;
    let below = query.cursor.as_deref().map(decode_cursor).transpose()?;
    // A state no index holds comes from the writer's memory, and this
    // snapshot's rows confirm each task listed there (see `running.rs`).
    let from_memory = match query.states.as_slice() {
        [state @ (State::Pending | State::Running)] => Some(*state),
        _ => None,
    };
    // A list with a label few tasks carry walks that label's tasks: of a
    // state kept in memory, those the writer's memory holds in it.
    let rare_label = if query.labels.is_empty() {
        None
    } else {
        rarest_label(conn, &query.labels)?
    };
    let (mut sql, mut args) = match (from_memory, &rare_label) {
        // `?1` is bound below, one slice of the seqs at a time.
        (Some(_), _) => (sql::SEQS_AMONG.to_owned(), vec![Value::Null]),
        (None, Some(label)) => (
            sql::LIST_BY_LABEL.to_owned(),
            vec![Value::Text(label.clone())],
        ),
        (None, None) => (
            format!("SELECT {TASK_COLUMNS} FROM tasks WHERE 1 = 1"),
            Vec::new(),
        ),
    };
    // The seq the list is ordered and paged by: the label's entries' own,
    // walked in order, where it walks a label.
    let seq_column = if rare_label.is_some() {
        "task_labels.task_seq"
    } else {
        "seq"
    };
    let mut bind = |sql: &mut String, clause: &str, value: Value| {
        args.push(value);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if from_memory.is_none() {
        if let Some(below) = below {
            bind(
                &mut sql,
                &format!(" AND {seq_column} < ?"),
                Value::Integer(below),
            );
        }
        let states = &query.states;
        if !states.is_empty() {
            let codes: Vec<String> = states.iter().map(|s| s.code().to_string()).collect();
            let codes = codes.join(",");
            if owner_first {
                // `+` keeps SQLite off the states' index.
                sql.push_str(&format!(" AND +state IN ({codes})"));
            } else {
                sql.push_str(&format!(" AND state IN ({codes})"));
                // Spelled as tasks_by_state's own condition, so SQLite sees
                // that the partial index covers the query.
                if !states.contains(&State::Pending) && !states.contains(&State::Running) {
                    sql.push_str(" AND state NOT IN (2, 3)");
                }
            }
        }
    }
    if let Some(t) = &query.task_type {
        bind(&mut sql, " AND type = ?", Value::Text(t.clone()));
    }
    if let Some(q) = &query.queue {
        bind(&mut sql, " AND queue = ?", Value::Text(q.clone()));
    }
    if let Some(o) = &query.owner {
        // States first (see `owner_first`): `+` keeps SQLite off the
        // owner's index, which it otherwise takes for two states and more.
        let clause = if owner_first || query.states.is_empty() || from_memory.is_some() {
            " AND owner = ?"
        } else {
            " AND +owner = ?"
        };
        bind(&mut sql, clause, Value::Text(o.clone()));
    }
    for (key, value) in &query.labels {
        // A row's labels are serde_json's compact text of its map, where a
        // label it holds reads `"key":"value"`: a row without that text is
        // passed over before SQLite parses its JSON (50 ms to 18 ms for a
        // label on 200,000 tasks). `json_each` still decides.
        args.push(Value::Text(label_text(key, value)));
        args.push(Value::Text(key.clone()));
        args.push(Value::Text(value.clone()));
        sql.push_str(&format!(
            " AND instr(tasks.labels, ?{}) > 0 \
             AND EXISTS (SELECT 1 FROM json_each(tasks.labels) WHERE key = ?{} AND value = ?{})",
            args.len() - 2,
            args.len() - 1,
            args.len()
        ));
    }
    if let Some(after) = query.created_after {
        args.push(Value::Integer(after.as_millis()));
        sql.push_str(&format!(" AND created_at > ?{}", args.len()));
    }
    if let Some(before) = query.created_before {
        args.push(Value::Integer(before.as_millis()));
        sql.push_str(&format!(" AND created_at < ?{}", args.len()));
    }
    // Rows are read one at a time, so that a page that fills up on bytes
    // stops reading there; the first row it has no room for tells that
    // another page follows.
    let mut page = PageFill::new(query.limit);
    let mut rows: Vec<StoredTask> = Vec::new();
    let mut more = false;
    match from_memory {
        // The seqs that match first, without the rows' bulk; then the rows
        // in order, each confirmed still in its state.
        Some(state) => {
            let mut seqs_matching = conn.prepare_cached(&sql).map_err(storage_error)?;
            let mut task_in_state = conn
                .prepare_cached(sql::TASK_IN_STATE)
                .map_err(storage_error)?;
            let mut below = below;
            let mut candidates = Vec::new().into_iter();
            loop {
                let Some(seq) = candidates.next() else {
                    let mut seqs = match &rare_label {
                        Some(label) => label_seqs(conn, label, below, SEQS_PER_READ)?,
                        None => memory.newest_first(state, below, SEQS_PER_READ),
                    };
                    let Some(&oldest) = seqs.last() else {
                        break;
                    };
                    below = Some(oldest);
                    if rare_label.is_some() {
                        seqs.retain(|&seq| memory.holds(state, seq));
                    }
                    let seqs_json = serde_json::to_string(&seqs)
                        .map_err(|e| Error::Storage(format!("cannot list seqs as JSON: {e}")))?;
                    args[0] = Value::Text(seqs_json);
                    // Without ORDER BY, so that SQLite looks the seqs up
                    // rather than walk the table in seq order.
                    let mut found = seqs_matching
                        .query_map(rusqlite::params_from_iter(&args), |row| {
                            row.get::<_, i64>(0)
                        })
                        .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
                        .map_err(storage_error)?;
                    found.sort_unstable_by_key(|&seq| std::cmp::Reverse(seq));
                    candidates = found.into_iter();
                    continue;
                };
                let mut found = task_in_state
                    .query_map(rusqlite::params![seq, state.code()], decode)
                    .map_err(storage_error)?;
                // Gone from the state since its seq was read: not listed.
                if let Some(row) = found.next() {
                    let row = row.map_err(storage_error)?;
                    if !page.take(&row.task) {
                        more = true;
                        break;
                    }
                    rows.push(row);
                }
            }
        }
        None => {
            sql.push_str(&format!(
                " ORDER BY {seq_column} DESC LIMIT {}",
                query.limit + 1
            ));
            let mut statement = conn.prepare_cached(&sql).map_err(storage_error)?;
            let found = statement
                .query_map(rusqlite::params_from_iter(&args), decode)
                .map_err(storage_error)?;
            for row in found {
                let row = row.map_err(storage_error)?;
                if !page.take(&row.task) {
                    more = true;
                    break;
                }
                rows.push(row);
            }
        }
    }
    let next_cursor = if more {
        rows.last().map(|last| encode_cursor(last.seq))
    } else {
        None
    };
    Ok(TaskPage {
        tasks: rows.into_iter().map(|s| *s.task).collect(),
        next_cursor,
    })
}

pub(crate) fn queue_settings(conn: &Connection) -> Result<Vec<(String, bool, Option<u32>)>> {
    conn.prepare_cached("SELECT name, paused, concurrency FROM queues ORDER BY name")
        .and_then(|mut stmt| {
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(storage_error)
}
