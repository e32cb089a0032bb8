//! Mapping between `tasks` rows and [`Task`]s.

use std::collections::BTreeMap;

use offload_core::{Error, Json, Result, State, Task, Timestamp};
use rusqlite::types::{FromSql, FromSqlError, ToSqlOutput, ValueRef};
use rusqlite::{Row, ToSql};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// Every column a [`Task`] is read from, in the order [`decode`] expects; a
/// macro so that statements are whole `&'static str`s made at compile time
/// (`concat!`), not strings built and hashed on every call. A payload kept
/// apart (schema version 9, [`crate::sql::INLINE_PAYLOAD_BYTES`]) is read
/// from `task_payloads`, by the seq of a row whose own `payload` is ''.
macro_rules! task_columns {
    () => {
        "seq, id, type, queue, \
         coalesce(nullif(payload, ''), \
             (SELECT payload FROM task_payloads WHERE task_payloads.task_seq = tasks.seq)), \
         priority, state, attempt, max_attempts, timeout_secs, \
         run_at, owner, labels, unique_key, depends_on, progress, result, error, errors, \
         cancel_requested, created_at, updated_at, started_at, finished_at, lease_expires_at, \
         worker_id"
    };
}
pub(crate) use task_columns;

pub(crate) const TASK_COLUMNS: &str = task_columns!();

/// A task with its row position, which orders lists and breaks FIFO ties.
///
/// Boxed: a [`Task`] is 432 bytes, and the writer moves each one it claims
/// through several collections (read or taken from the kept rows, claimed,
/// kept again, taken back by its completion). Those copies were a tenth of
/// the writer's samples through a burn-down (perf, `bench/HISTORY.md`).
#[derive(Debug)]
pub(crate) struct StoredTask {
    pub seq: i64,
    pub task: Box<Task>,
}

pub(crate) fn decode(row: &Row<'_>) -> rusqlite::Result<StoredTask> {
    let state_code: i64 = row.get(6)?;
    let state = State::from_code(state_code)
        .ok_or_else(|| bad_column(6, format!("unknown state code {state_code}")))?;
    Ok(StoredTask {
        seq: row.get(0)?,
        task: Box::new(Task {
            id: row.get::<_, Id>(1)?.0,
            task_type: row.get(2)?,
            queue: row.get(3)?,
            payload: raw_json(row, 4)?.ok_or_else(|| bad_column(4, "payload is NULL".into()))?,
            priority: row.get(5)?,
            state,
            attempt: row.get(7)?,
            max_attempts: row.get(8)?,
            timeout_secs: row.get(9)?,
            run_at: ts(row, 10)?,
            owner: row.get(11)?,
            labels: json_column::<BTreeMap<String, String>>(row, 12)?.unwrap_or_default(),
            unique_key: row.get(13)?,
            depends_on: json_column(row, 14)?.unwrap_or_default(),
            progress: json_column(row, 15)?,
            result: raw_json(row, 16)?,
            error: json_column(row, 17)?,
            errors: json_column(row, 18)?.unwrap_or_default(),
            cancel_requested: row.get(19)?,
            created_at: ts(row, 20)?,
            updated_at: ts(row, 21)?,
            started_at: opt_ts(row, 22)?,
            finished_at: opt_ts(row, 23)?,
            lease_expires_at: opt_ts(row, 24)?,
            worker_id: row.get(25)?,
        }),
    })
}

fn bad_column(index: usize, message: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, message.into())
}

fn ts(row: &Row<'_>, index: usize) -> rusqlite::Result<Timestamp> {
    Ok(Timestamp::from_millis(row.get(index)?))
}

fn opt_ts(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<Timestamp>> {
    Ok(row
        .get::<_, Option<i64>>(index)?
        .map(Timestamp::from_millis))
}

fn raw_json(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<Json>> {
    match row.get::<_, Option<String>>(index)? {
        None => Ok(None),
        Some(text) => serde_json::value::RawValue::from_string(text)
            .map(Some)
            .map_err(|e| bad_column(index, e.to_string())),
    }
}

fn json_column<T: DeserializeOwned>(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<T>> {
    match row.get_ref(index)? {
        ValueRef::Null => Ok(None),
        ValueRef::Text(bytes) => serde_json::from_slice(bytes)
            .map(Some)
            .map_err(|e| bad_column(index, e.to_string())),
        _ => Err(bad_column(index, "expected JSON text".into())),
    }
}

/// JSON text for a column that is NULL when the value is empty or absent.
pub(crate) fn json_text<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Storage(format!("encoding JSON: {e}")))
}

pub(crate) fn opt_json_text<T: Serialize>(value: Option<&T>) -> Result<Option<String>> {
    value.map(json_text).transpose()
}

/// A task id stored as its 16 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Id(pub Uuid);

impl ToSql for Id {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Blob(self.0.as_bytes())))
    }
}

impl FromSql for Id {
    fn column_result(value: ValueRef<'_>) -> Result<Self, FromSqlError> {
        let bytes = value.as_blob()?;
        Uuid::from_slice(bytes)
            .map(Id)
            .map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

/// Maps SQLite's errors onto the store's: a busy or unreachable database is
/// worth retrying, anything else is a storage fault.
pub(crate) fn storage_error(e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | DiskFull | CannotOpen | SystemIoFailure) => {
            Error::storage_unavailable(&e)
        }
        _ => Error::Storage(e.to_string()),
    }
}
