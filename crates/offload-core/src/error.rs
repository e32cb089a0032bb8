//! The one error type of the storage interface. The server maps each variant
//! to an HTTP status in exactly one place; nothing else decides statuses.

/// What can go wrong in a store operation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Bad input; `field` names the offending field, `rule` says what it must be.
    #[error("{field}: {rule}")]
    InvalidArgument { field: String, rule: String },
    /// A JSON value (payload, result, progress data) over its size limit.
    #[error("{field}: {size} bytes is over the limit of {limit} bytes")]
    PayloadTooLarge {
        field: String,
        size: usize,
        limit: usize,
    },
    #[error("{0} not found")]
    NotFound(String),
    /// The task is in the wrong state for the action, or the caller no longer
    /// holds it.
    #[error("{0}")]
    Conflict(String),
    /// The database, or the server behind a remote source, cannot be
    /// reached now; the caller may try again. The message says which: a
    /// worker whose server was down logged "storage unavailable: cannot
    /// reach the Offload server", which sent its reader to the database.
    #[error("{0}")]
    Unavailable(String),
    /// A fault inside the storage layer (corruption, a bug); not the caller's.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl Error {
    /// The database cannot be reached now, in the stores' words: an
    /// [`Error::Unavailable`] names what is unavailable, and a store's is
    /// the storage.
    pub fn storage_unavailable(reason: impl std::fmt::Display) -> Self {
        Self::Unavailable(format!("storage unavailable: {reason}"))
    }

    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            rule: rule.into(),
        }
    }

    pub fn task_not_found(id: uuid::Uuid) -> Self {
        Self::NotFound(format!("task {id}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
