//! What a handler gets (its [`TaskContext`]) and gives back on failure
//! ([`TaskFailure`]).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use offload_core::{Error, HeartbeatRequest, ProgressUpdate, Result, Task};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::runner::Shared;

/// Why a task's cancellation token fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// Someone cancelled the task.
    Cancelled,
    /// The worker no longer holds the task (a heartbeat was refused, or none
    /// reached the server for a whole lease, and it may be running
    /// elsewhere); its result will be dropped.
    LeaseLost,
    /// The attempt ran past the task's `timeout_secs`.
    Timeout,
    /// The worker is shutting down and the grace period ran out.
    Shutdown,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::Cancelled => "the task was cancelled",
            CancelReason::LeaseLost => "the worker lost the task's lease",
            CancelReason::Timeout => "the attempt ran past its timeout",
            CancelReason::Shutdown => "the worker is shutting down",
        })
    }
}

/// The cancellation state of one running task, shared by its context, the
/// heartbeater and the runner. Its holders share one allocation: cloning a
/// `CancellationToken` locks the token's node, and every task's state is
/// cloned into the in-flight map and the context and dropped again. The
/// token itself is made when first asked for: a short task's handler
/// finishes before anyone waits on it, and making and dropping a token was
/// ~340 instructions a task.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cancellation(Arc<CancelState>);

#[derive(Debug, Default)]
struct CancelState {
    token: OnceLock<CancellationToken>,
    reason: OnceLock<CancelReason>,
}

impl Cancellation {
    /// Fires the token, making it if no one has asked for it yet, so that
    /// whoever asks later gets it fired; the first reason given is kept.
    pub fn cancel(&self, reason: CancelReason) {
        let _ = self.0.reason.set(reason);
        self.token().cancel();
    }

    pub fn reason(&self) -> Option<CancelReason> {
        self.0.reason.get().copied()
    }

    pub fn token(&self) -> &CancellationToken {
        self.0.token.get_or_init(CancellationToken::new)
    }

    pub fn is_cancelled(&self) -> bool {
        self.0
            .token
            .get()
            .is_some_and(CancellationToken::is_cancelled)
    }
}

/// A running task as its handler sees it.
pub struct TaskContext {
    task: Task,
    cancellation: Cancellation,
    shared: Arc<Shared>,
    /// Held across a progress report so that reports arrive in order.
    reporting: tokio::sync::Mutex<()>,
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.task.id)
            .field("type", &self.task.task_type)
            .field("attempt", &self.task.attempt)
            .finish()
    }
}

impl TaskContext {
    pub(crate) fn new(task: Task, cancellation: Cancellation, shared: Arc<Shared>) -> Self {
        Self {
            task,
            cancellation,
            shared,
            reporting: tokio::sync::Mutex::new(()),
        }
    }

    /// The task as it was claimed.
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// The payload decoded as `T`. A payload that does not decode fails the
    /// task without retrying: it would not decode next time either.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, TaskFailure> {
        self.task.payload_as().map_err(|e| {
            TaskFailure::permanent(format!(
                "payload does not match what the handler expects: {e}"
            ))
        })
    }

    /// Fires when the task is cancelled, its lease is lost, its timeout
    /// passes, or the worker shuts down; see [`Self::cancel_reason`].
    pub fn cancellation(&self) -> &CancellationToken {
        self.cancellation.token()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancellation.is_cancelled()
    }

    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.cancellation.reason()
    }

    /// Reports progress (0–100 and a message) at once; the answer also
    /// tells whether cancellation was requested, which fires the token.
    pub async fn progress(
        &self,
        percent: impl Into<Option<f64>>,
        message: impl Into<Option<&str>>,
    ) -> Result<()> {
        self.report(ProgressUpdate {
            percent: percent.into(),
            message: message.into().map(str::to_owned),
            data: None,
        })
        .await
    }

    /// Reports progress with structured data. A message is kept up to
    /// [`offload_core::MAX_MESSAGE_CHARS`].
    pub async fn report(&self, progress: ProgressUpdate) -> Result<()> {
        let request = HeartbeatRequest {
            id: self.task.id,
            worker_id: self.shared.config.worker_id.clone(),
            progress: Some(progress),
            lease: self.shared.config.lease,
        };
        let (answer, sent) = {
            let _in_order = self.reporting.lock().await;
            let sent = tokio::time::Instant::now();
            (self.shared.heartbeat(request).await, sent)
        };
        match answer {
            Ok(ack) => {
                self.shared.renew(self.task.id, sent);
                if ack.cancel_requested {
                    self.cancellation.cancel(CancelReason::Cancelled);
                }
                Ok(())
            }
            Err(e @ (Error::Conflict(_) | Error::NotFound(_))) => {
                self.cancellation.cancel(CancelReason::LeaseLost);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

/// A failed attempt, as a handler reports it.
#[derive(Debug)]
pub struct TaskFailure {
    pub(crate) message: String,
    pub(crate) retry: Option<bool>,
    pub(crate) retry_in: Option<Duration>,
}

impl TaskFailure {
    /// A failure retried per the task's attempts and backoff.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: None,
            retry_in: None,
        }
    }

    /// A failure that fails the task at once, whatever attempts are left.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retry: Some(false),
            ..Self::new(message)
        }
    }

    /// Retries after `delay` instead of the backoff; a delay over
    /// [`offload_core::MAX_RETRY_DELAY`] (a year) is that long. A permanent
    /// failure is not retried, so it keeps no delay. The server refuses
    /// either kind of delay, and with it the whole batch of acks the
    /// failure travels in.
    #[must_use]
    pub fn retry_in(mut self, delay: Duration) -> Self {
        if self.retry != Some(false) {
            self.retry_in = Some(delay.min(offload_core::MAX_RETRY_DELAY));
        }
        self
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error converts, with its chain of causes in the message. (This is why
/// `TaskFailure` itself is not a `std::error::Error`.)
impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskFailure {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::new(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server refuses `retry: false` with `retry_in_secs`, and a
    /// `retry_in_secs` over a year; one such failure would fail the whole
    /// batch of acks it travels in.
    #[test]
    fn a_permanent_failure_keeps_no_retry_delay() {
        let permanent = TaskFailure::permanent("gone").retry_in(Duration::from_secs(5));
        assert_eq!((permanent.retry, permanent.retry_in), (Some(false), None));
        let later = TaskFailure::new("busy").retry_in(Duration::from_secs(5));
        assert_eq!(
            (later.retry, later.retry_in),
            (None, Some(Duration::from_secs(5)))
        );
        let much_later = TaskFailure::new("closed").retry_in(Duration::MAX);
        assert_eq!(much_later.retry_in, Some(offload_core::MAX_RETRY_DELAY));
    }

    /// The token is made lazily, so a cancel that comes before anyone asked
    /// for it must leave it fired for whoever asks later.
    #[test]
    fn a_cancel_before_the_token_is_asked_for_fires_it_for_later_askers() {
        let early = Cancellation::default();
        let holder = early.clone();
        assert!(!early.is_cancelled());
        early.cancel(CancelReason::Cancelled);
        early.cancel(CancelReason::Timeout);
        assert!(holder.is_cancelled());
        assert!(holder.token().is_cancelled());
        assert_eq!(holder.reason(), Some(CancelReason::Cancelled));

        let late = Cancellation::default();
        let token = late.token().clone();
        assert!(!token.is_cancelled());
        late.clone().cancel(CancelReason::LeaseLost);
        assert!(token.is_cancelled());
        assert_eq!(late.reason(), Some(CancelReason::LeaseLost));
    }
}
