//! The task as SPEC §1 describes it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::Timestamp;

/// A JSON document kept as its text: payloads and results pass through
/// Offload without being parsed into a tree and printed again.
pub type Json = Box<RawValue>;

/// The JSON `null`.
pub fn json_null() -> Json {
    RawValue::NULL.to_owned()
}

/// SPEC §2. The discriminants are the stable codes backends store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum State {
    Blocked = 0,
    Scheduled = 1,
    Pending = 2,
    Running = 3,
    Completed = 4,
    Failed = 5,
    Cancelled = 6,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Blocked,
        State::Scheduled,
        State::Pending,
        State::Running,
        State::Completed,
        State::Failed,
        State::Cancelled,
    ];
    pub const FINISHED: [State; 3] = [State::Completed, State::Failed, State::Cancelled];

    pub fn is_active(self) -> bool {
        !self.is_finished()
    }

    pub fn is_finished(self) -> bool {
        matches!(self, State::Completed | State::Failed | State::Cancelled)
    }

    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Blocked => "blocked",
            State::Scheduled => "scheduled",
            State::Pending => "pending",
            State::Running => "running",
            State::Completed => "completed",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!("must be one of blocked, scheduled, pending, running, completed, failed, cancelled; got {s:?}")
            })
    }
}

/// Why an attempt or a task ended badly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ErrorKind {
    Error,
    Timeout,
    LeaseExpired,
    Cancelled,
    DependencyFailed,
}

impl ErrorKind {
    /// The name the API gives it (SPEC §1).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Error => "error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::LeaseExpired => "lease_expired",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::DependencyFailed => "dependency_failed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last error of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskError {
    pub kind: ErrorKind,
    pub message: String,
    pub at: Timestamp,
}

/// One entry of a task's error history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttemptError {
    pub attempt: u32,
    pub kind: ErrorKind,
    pub message: String,
    pub at: Timestamp,
}

/// Progress as the worker last reported it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    pub percent: Option<f64>,
    pub message: Option<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Value>))]
    pub data: Option<Json>,
    pub updated_at: Timestamp,
}

/// A task, as stored and as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Task {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub task_type: String,
    pub queue: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Value))]
    pub payload: Json,
    pub priority: u8,
    pub state: State,
    pub attempt: u32,
    pub max_attempts: u32,
    pub timeout_secs: u32,
    pub run_at: Timestamp,
    pub owner: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub unique_key: Option<String>,
    pub depends_on: Vec<Uuid>,
    pub progress: Option<Progress>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Value>))]
    pub result: Option<Json>,
    pub error: Option<TaskError>,
    pub errors: Vec<AttemptError>,
    pub cancel_requested: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub lease_expires_at: Option<Timestamp>,
    pub worker_id: Option<String>,
}

impl Task {
    /// Decodes the payload into the type a handler expects.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self.payload.get())
    }

    /// The bytes of the parts of the task a user sizes: its payload, result
    /// and progress data, each up to the payload limit. The rest is bounded
    /// by small limits of its own.
    pub fn bulk_bytes(&self) -> usize {
        let progress_data = self.progress.as_ref().and_then(|p| p.data.as_ref());
        [Some(&self.payload), self.result.as_ref(), progress_data]
            .into_iter()
            .flatten()
            .map(|json| json.get().len())
            .sum()
    }

    /// When the running attempt must end, per `timeout_secs`.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.started_at
            .filter(|_| self.state == State::Running)
            .map(|t| t.saturating_add(std::time::Duration::from_secs(self.timeout_secs.into())))
    }
}
