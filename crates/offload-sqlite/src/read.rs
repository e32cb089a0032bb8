//! Reads on their own connections, so that lists and lookups never wait for
//! the writer (WAL lets readers see the last commit while a write goes on).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use offload_core::{Error, ListQuery, Result, State, TaskPage, decode_cursor, encode_cursor};
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
}

pub(crate) fn list(
    conn: &Connection,
    query: &ListQuery,
    memory: &InMemory<'_>,
) -> Result<TaskPage> {
    query.check_limit()?;
    let below = query.cursor.as_deref().map(decode_cursor).transpose()?;
    // A state no index holds comes from the writer's memory, and this
    // snapshot's rows confirm each task listed there (see `running.rs`).
    let from_memory = match query.states.as_slice() {
        [state @ (State::Pending | State::Running)] => Some(*state),
        _ => None,
    };
    let (mut sql, mut args) = match from_memory {
        // `?1` is bound below, one slice of the seqs at a time.
        Some(state) => (
            sql::IN_STATE_AMONG.to_owned(),
            vec![Value::Null, Value::Integer(state.code())],
        ),
        None => (
            format!("SELECT {TASK_COLUMNS} FROM tasks WHERE 1 = 1"),
            Vec::new(),
        ),
    };
    let mut bind = |sql: &mut String, clause: &str, value: Value| {
        args.push(value);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if from_memory.is_none() {
        if let Some(below) = below {
            bind(&mut sql, " AND seq < ?", Value::Integer(below));
        }
        match query.states.as_slice() {
            [] => {}
            states => {
                let codes: Vec<String> = states.iter().map(|s| s.code().to_string()).collect();
                sql.push_str(&format!(" AND state IN ({})", codes.join(",")));
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
        bind(&mut sql, " AND owner = ?", Value::Text(o.clone()));
    }
    for (key, value) in &query.labels {
        args.push(Value::Text(key.clone()));
        args.push(Value::Text(value.clone()));
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM json_each(tasks.labels) WHERE key = ?{} AND value = ?{})",
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
    let read = |sql: &str, args: &[Value]| -> Result<Vec<StoredTask>> {
        conn.prepare_cached(sql)
            .and_then(|mut stmt| {
                stmt.query_map(rusqlite::params_from_iter(args), decode)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(storage_error)
    };
    // One row more than asked tells whether another page follows.
    let mut rows = match from_memory {
        // Without ORDER BY, so that SQLite looks the seqs up rather than
        // walk the table in seq order; each slice is sorted here.
        Some(state) => {
            let mut rows = Vec::new();
            let mut below = below;
            while rows.len() <= query.limit {
                let seqs = memory.newest_first(state, below, SEQS_PER_READ);
                let Some(&oldest) = seqs.last() else {
                    break;
                };
                below = Some(oldest);
                let seqs_json = serde_json::to_string(&seqs)
                    .map_err(|e| Error::Storage(format!("cannot list seqs as JSON: {e}")))?;
                args[0] = Value::Text(seqs_json);
                let mut found = read(&sql, &args)?;
                found.sort_unstable_by_key(|row| std::cmp::Reverse(row.seq));
                rows.extend(found);
            }
            rows
        }
        None => {
            sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", query.limit + 1));
            read(&sql, &args)?
        }
    };
    let next_cursor = if rows.len() > query.limit {
        rows.truncate(query.limit);
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
