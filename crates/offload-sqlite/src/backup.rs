//! A consistent copy of a store's database, taken while a node serves it
//! (`offload backup`).
//!
//! Copying the database file is no backup: in WAL mode the latest commits
//! live in `PATH-wal` until a checkpoint moves them into the file, and a
//! copy made while a checkpoint writes holds part of it. Here a connection
//! of its own reads one snapshot (a read transaction, beside which the
//! node's writer goes on committing) and SQLite writes it out compacted
//! (`VACUUM INTO`) to a file beside the destination. SQLite does not sync
//! that file, so it is synced here and only then renamed into place: the
//! destination either does not exist or holds the whole copy, on disk.
//!
//! Every write answered before the copy began is in it. Claims the node
//! has not yet written into their tasks' rows travel in their own table
//! (`claims.rs`); the node that opens the copy writes them, as it does
//! after a crash, and their tasks run again once their leases end.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

/// Whether the database has Offload's `tasks` table.
const HAS_TASKS_TABLE: &str =
    "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'tasks')";
/// One snapshot of the database, compacted, to the file named by `?1`.
const VACUUM_INTO: &str = "VACUUM INTO ?1";
const COUNT_TASKS: &str = "SELECT count(*) FROM tasks";

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// Tasks in the copy.
    pub tasks: u64,
    /// The copy's size on disk.
    pub bytes: u64,
    /// The copy's schema version (`PRAGMA user_version`).
    pub schema_version: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("there is no database at {0}")]
    NoSource(PathBuf),
    #[error("{0} is not an Offload database (it has no tasks table)")]
    NotOffload(PathBuf),
    #[error("{0} exists; a backup never replaces a file")]
    DestinationExists(PathBuf),
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Copies the Offload database at `source` to `destination`, which must
/// not exist yet. A node may be serving `source` meanwhile.
pub fn backup(source: &Path, destination: &Path) -> Result<BackupReport, BackupError> {
    if !source.is_file() {
        return Err(BackupError::NoSource(source.to_owned()));
    }
    if destination.exists() {
        return Err(BackupError::DestinationExists(destination.to_owned()));
    }
    let write_error = |path: &Path, reason: String| BackupError::Write {
        path: path.to_owned(),
        reason,
    };
    let destination_text = destination
        .to_str()
        .ok_or_else(|| write_error(destination, "the path is not valid UTF-8".into()))?;
    let partial = PathBuf::from(format!("{destination_text}.partial"));

    let read_error = |e: rusqlite::Error| BackupError::Read {
        path: source.to_owned(),
        reason: e.to_string(),
    };
    // Read-write, never creating: a read-only connection to a database in
    // WAL mode cannot always take the shared-memory locks it needs. It
    // writes nothing.
    let conn = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(read_error)?;
    // The node's writer holds the WAL's locks only for moments.
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(read_error)?;
    let is_offload: bool = conn
        .query_row(HAS_TASKS_TABLE, [], |r| r.get(0))
        .map_err(read_error)?;
    if !is_offload {
        return Err(BackupError::NotOffload(source.to_owned()));
    }

    // A partial copy left by a backup that was stopped is ours to replace.
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_error(&partial, e.to_string())),
    }
    let copied = conn
        .execute(VACUUM_INTO, [partial.to_string_lossy()])
        .map(|_| ())
        .map_err(|e| match e.sqlite_error_code() {
            // SQLite names no file in these; the partial copy is the one
            // it could not open or write.
            Some(
                rusqlite::ErrorCode::CannotOpen
                | rusqlite::ErrorCode::DiskFull
                | rusqlite::ErrorCode::ReadOnly
                | rusqlite::ErrorCode::PermissionDenied,
            ) => write_error(&partial, e.to_string()),
            _ => read_error(e),
        })
        .and_then(|()| sync_file(&partial).map_err(|e| write_error(&partial, e.to_string())));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    drop(conn);

    if destination.exists() {
        let _ = std::fs::remove_file(&partial);
        return Err(BackupError::DestinationExists(destination.to_owned()));
    }
    std::fs::rename(&partial, destination).map_err(|e| write_error(destination, e.to_string()))?;
    // The rename is the copy's name: on disk only once its directory is.
    let directory = match destination.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    sync_file(directory).map_err(|e| write_error(directory, e.to_string()))?;

    let report_error = |e: rusqlite::Error| write_error(destination, e.to_string());
    let copy = Connection::open_with_flags(destination, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(report_error)?;
    let schema_version: i64 = copy
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(report_error)?;
    let tasks: i64 = copy
        .query_row(COUNT_TASKS, [], |r| r.get(0))
        .map_err(report_error)?;
    let bytes = std::fs::metadata(destination)
        .map_err(|e| write_error(destination, e.to_string()))?
        .len();
    Ok(BackupReport {
        tasks: u64::try_from(tasks).unwrap_or(0),
        bytes,
        schema_version,
    })
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}
