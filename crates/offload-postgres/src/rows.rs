//! Mapping between `offload_tasks` rows and [`Task`]s, and between
//! PostgreSQL's errors and the store's.

use offload_core::{Error, Json, State, Task, Timestamp};
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

/// Every column a task is read from, with `payload` read as given.
macro_rules! task_columns {
    ($payload:literal) => {
        concat!(
            "seq, id, type, queue, ",
            $payload,
            ", priority, state, attempt, max_attempts, timeout_secs, run_at, owner, labels, \
             unique_key, depends_on, progress, result, error, errors, cancel_requested, \
             created_at, updated_at, started_at, finished_at, lease_expires_at, worker_id"
        )
    };
}

/// Every column a task is read from.
pub(crate) const TASK_COLUMNS: &str = task_columns!("payload");

/// Payloads a claim's candidates carry as they are read; a larger one is
/// read once its task is taken. A claim reads up to `limit` candidates a
/// type and keeps at most `limit` in all, and those of the largest payloads
/// only up to [`offload_core::PAGE_BYTES`]: read whole, 300 candidates of
/// 1 MB took the node to 839 MB.
pub(crate) const CANDIDATE_PAYLOAD_BYTES: i32 = 8 << 10;

/// [`TASK_COLUMNS`] for a claim's candidates: a payload larger than
/// [`CANDIDATE_PAYLOAD_BYTES`] reads as JSON null, and `payload_bytes`
/// tells its size (PostgreSQL knows it without reading the value).
pub(crate) const CANDIDATE_COLUMNS: &str = task_columns!(
    "CASE WHEN octet_length(payload) <= 8192 THEN payload ELSE 'null' END AS payload, \
     octet_length(payload) AS payload_bytes"
);

/// A task with its row position, which orders lists and breaks FIFO ties.
#[derive(Debug, Clone)]
pub(crate) struct StoredTask {
    pub seq: i64,
    pub task: Task,
    /// Its row's texts of the columns that may grow large, as read.
    pub as_stored: StoredTexts,
}

/// The texts of a row's `progress`, `error` and `errors` as read: a
/// write-back leaves each column the task's own text still matches in
/// place (see [`crate::sql::WRITE_TASK_ROWS`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct StoredTexts {
    pub progress: Option<String>,
    pub error: Option<String>,
    pub errors: Option<String>,
}

/// What a write-back gives for a column whose text is `new`, read as
/// `stored`: the mark that leaves the column in place when they are the
/// same text, `new` otherwise.
pub(crate) fn unless_stored(new: Option<String>, stored: &Option<String>) -> Option<String> {
    match (&new, stored) {
        (Some(new), Some(stored)) if new == stored => Some(KEEP_STORED.to_owned()),
        _ => new,
    }
}

/// Never JSON, so never a column's text: the mark of a column left as it
/// is stored.
pub(crate) const KEEP_STORED: &str = "";

/// Errors inside the store: those worth a fresh transaction, and the rest.
#[derive(Debug)]
pub(crate) enum PgError {
    /// A serialization failure, deadlock or unique-key race: running the
    /// operation again in a new transaction will see the winner's commit.
    Retry(String),
    Core(Error),
}

impl PgError {
    /// The store's error, for a caller that will not run the operation again.
    pub(crate) fn into_core(self) -> Error {
        match self {
            PgError::Retry(reason) => {
                Error::storage_unavailable(format!("too much contention, try again: {reason}"))
            }
            PgError::Core(e) => e,
        }
    }
}

impl From<Error> for PgError {
    fn from(e: Error) -> Self {
        PgError::Core(e)
    }
}

impl From<sqlx::Error> for PgError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && let Some(code) = db.code()
            && matches!(code.as_ref(), "40001" | "40P01" | "23505")
        {
            return PgError::Retry(e.to_string());
        }
        PgError::Core(storage_error(e))
    }
}

pub(crate) type PgResult<T> = Result<T, PgError>;

/// A database that cannot be reached now is `Unavailable` (HTTP 503, worth
/// retrying); anything else is a storage fault.
pub(crate) fn storage_error(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => Error::storage_unavailable(&e),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if is_unavailable(&code) {
                Error::storage_unavailable(&e)
            } else {
                Error::Storage(e.to_string())
            }
        }
        _ => Error::Storage(e.to_string()),
    }
}

/// Whether an error PostgreSQL answered with says that it cannot take the
/// operation now, not that the operation is wrong: a database that is full
/// or read-only is out of service for writes as one that cannot be reached
/// is, and a caller told 503 tries again later, where a 500 says Offload
/// is broken.
fn is_unavailable(code: &str) -> bool {
    // 08: connection exceptions. 53: insufficient resources (a full disk,
    // out of memory, too many connections). 57: operator intervention
    // (shutting down, starting, a statement cancelled by an operator or
    // by their statement_timeout). 58: system errors (an I/O error).
    // 25006: a read-only transaction, on a standby or with
    // default_transaction_read_only on. 55P03: a lock not had within the
    // operator's lock_timeout.
    ["08", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "25006"
        || code == "55P03"
}

fn column<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
    row: &'r PgRow,
    name: &str,
) -> Result<T, Error> {
    row.try_get(name)
        .map_err(|e| Error::Storage(format!("reading column {name}: {e}")))
}

fn raw_json(text: Option<String>, name: &str) -> Result<Option<Json>, Error> {
    text.map(|t| {
        serde_json::value::RawValue::from_string(t)
            .map_err(|e| Error::Storage(format!("column {name} is not JSON: {e}")))
    })
    .transpose()
}

fn json_text<T: DeserializeOwned>(text: Option<&str>, name: &str) -> Result<Option<T>, Error> {
    text.map(|t| {
        serde_json::from_str(t)
            .map_err(|e| Error::Storage(format!("column {name} is not valid: {e}")))
    })
    .transpose()
}

fn ts(ms: Option<i64>) -> Option<Timestamp> {
    ms.map(Timestamp::from_millis)
}

/// The `payload` column of `row`.
pub(crate) fn payload(row: &PgRow) -> Result<Json, Error> {
    Ok(raw_json(Some(column(row, "payload")?), "payload")?.unwrap_or_else(offload_core::json_null))
}

pub(crate) fn decode(row: &PgRow) -> Result<StoredTask, Error> {
    let state_code: i16 = column(row, "state")?;
    let state = State::from_code(state_code.into())
        .ok_or_else(|| Error::Storage(format!("unknown state code {state_code}")))?;
    let labels: Option<serde_json::Value> = column(row, "labels")?;
    let labels = match labels {
        None => Default::default(),
        Some(v) => serde_json::from_value(v).map_err(|e| Error::Storage(format!("labels: {e}")))?,
    };
    let attempt: i32 = column(row, "attempt")?;
    let max_attempts: i32 = column(row, "max_attempts")?;
    let timeout_secs: i32 = column(row, "timeout_secs")?;
    let priority: i16 = column(row, "priority")?;
    let as_stored = StoredTexts {
        progress: column(row, "progress")?,
        error: column(row, "error")?,
        errors: column(row, "errors")?,
    };
    Ok(StoredTask {
        seq: column(row, "seq")?,
        task: Task {
            id: column::<Uuid>(row, "id")?,
            task_type: column(row, "type")?,
            queue: column(row, "queue")?,
            payload: payload(row)?,
            priority: priority as u8,
            state,
            attempt: attempt as u32,
            max_attempts: max_attempts as u32,
            timeout_secs: timeout_secs as u32,
            run_at: Timestamp::from_millis(column(row, "run_at")?),
            owner: column(row, "owner")?,
            labels,
            unique_key: column(row, "unique_key")?,
            depends_on: column::<Option<Vec<Uuid>>>(row, "depends_on")?.unwrap_or_default(),
            progress: json_text(as_stored.progress.as_deref(), "progress")?,
            result: raw_json(column(row, "result")?, "result")?,
            error: json_text(as_stored.error.as_deref(), "error")?,
            errors: json_text(as_stored.errors.as_deref(), "errors")?.unwrap_or_default(),
            cancel_requested: column(row, "cancel_requested")?,
            created_at: Timestamp::from_millis(column(row, "created_at")?),
            updated_at: Timestamp::from_millis(column(row, "updated_at")?),
            started_at: ts(column(row, "started_at")?),
            finished_at: ts(column(row, "finished_at")?),
            lease_expires_at: ts(column(row, "lease_expires_at")?),
            worker_id: column(row, "worker_id")?,
        },
        as_stored,
    })
}

pub(crate) fn encode_json<T: serde::Serialize>(value: &T) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|e| Error::Storage(format!("encoding JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_read_every_column_of_a_task_and_bound_the_payload_by_its_constant() {
        let bound = format!("octet_length(payload) <= {CANDIDATE_PAYLOAD_BYTES} THEN");
        assert!(CANDIDATE_COLUMNS.contains(&bound), "{CANDIDATE_COLUMNS}");
        let names = |columns: &str| -> Vec<String> {
            columns
                .split(',')
                .map(|c| c.split_whitespace().last().unwrap_or_default().to_owned())
                .collect()
        };
        let mut expected = names(TASK_COLUMNS);
        let payload = expected.iter().position(|c| c == "payload").unwrap_or(0);
        expected.insert(payload + 1, "payload_bytes".to_owned());
        assert_eq!(names(CANDIDATE_COLUMNS), expected);
    }
}
