//! Offload's core: the task model, the state machine of SPEC §2, input
//! validation and the [`Store`] interface every storage backend implements.
//!
//! This crate performs no I/O. It knows nothing of SQL, HTTP or files; the
//! backends (`offload-sqlite`, later PostgreSQL) put its rules into effect, and
//! the engine and server drive them. Keeping every rule here means every
//! backend enforces the same contract, and the conformance suite in
//! `offload-storetest` checks exactly that.

mod batch_stream;
mod claim;
mod error;
mod finished;
mod hub;
mod log_throttle;
mod machine;
mod new_task;
mod park;
mod readiness;
mod store;
mod task;
mod task_id;
mod task_json;
mod time;
pub mod whole_number;
mod write_failure;

pub use batch_stream::{BatchReceiver, BatchSender, batch_stream};
pub use claim::{Candidate, admit};
pub use error::{Error, Result};
pub use finished::{Finished, FinishedTally};
pub use hub::{EventKind, Hub, Interest, TaskEvent, Unheard, Watch};
pub use log_throttle::{LOG_LINES_PER_SECOND, LogThrottle};
pub use machine::{AttemptFailure, Backoff, CancelEffect, MAX_RETRY_DELAY, transition_allowed};
pub use new_task::{
    HIGHEST_MAX_ATTEMPTS, Limits, MAX_DELAY_SECS, MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS,
    MAX_LEASE_SECS, MAX_OWNER_CHARS, MAX_QUEUE_NAME_CHARS, MAX_TASK_TYPE_CHARS, MAX_TIMEOUT_SECS,
    MAX_UNIQUE_KEY_CHARS, MAX_WORKER_ID_CHARS, NewTask, OnConflict, Position, PriorityInput,
    QUEUE_NAME_CHARS, Schedule, TASK_TYPE_CHARS, TaskSpec, check_json, no_nul, validate_label_key,
    validate_owner, validate_queue_name, validate_task_type, validate_worker_id,
};
pub use park::{ClaimTicket, ParkedClaim, TakenClaim, park};
pub use readiness::{PAIRS_PER_SIGNAL, Readiness, ReadyLog};
pub use store::{
    Ack, AckOutcome, Claim, ClaimRequest, ClearRequest, Counts, Durable, Enqueueing, Failure,
    FailureKind, HeartbeatAck, HeartbeatRequest, ListQuery, MAX_LIST_LIMIT, MAX_MESSAGE_CHARS,
    OWNER_LIST_STATE_WALK, PAGE_BYTES, PageFill, ProgressUpdate, PromoteReport, QueueInfo,
    QueuePatch, Retention, Stats, Store, TaskPage, Tentative, decode_cursor, encode_cursor,
    truncate_message,
};
pub use task::{AttemptError, ErrorKind, Json, Progress, State, Task, TaskError, json_null};
pub use task_id::{id_carrying_seq, seq_carried_by};
pub use task_json::TimestampMemo;
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use write_failure::WriteFailure;
