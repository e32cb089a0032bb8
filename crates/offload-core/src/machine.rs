//! The state machine of SPEC §2 as methods on [`Task`].
//!
//! Backends load a task, call one of these methods and write back what
//! changed, so every rule (retries, backoff, cancellation, leases) is decided
//! here once. Each method checks its precondition and answers
//! [`Error::Conflict`] when the task is in the wrong state.
//!
//! ```text
//!             ┌───────── depends_on all completed ─────────┐
//!  enqueue ─► blocked                                      ▼
//!  enqueue ─► scheduled ── run_at reached ─────────────► pending ── claimed ──► running
//!                 ▲                                                            │
//!                 └──────────── attempt failed, attempts left ─────────────────┤
//!                                                                              ├─► completed
//!  blocked/scheduled/pending/running ── cancel ──► cancelled                   ├─► failed
//!  failed/cancelled ── manual retry ──► pending                                └─► cancelled
//! ```
//!
//! Two shortcuts of the drawing are allowed: a retry whose delay is zero goes
//! `running → pending` directly (it would pass through `scheduled` for no
//! time), and a `blocked` task whose `run_at` lies in the future goes to
//! `scheduled` when its dependencies complete. One arrow is added: a manual
//! retry of a task whose dependencies have not all completed goes back to
//! `blocked`, as the drawing's first arrow would have it, not to `pending`.

use std::time::Duration;

use rand::Rng;
use uuid::Uuid;

use crate::{
    AttemptError, Error, ErrorKind, Json, Progress, Result, State, Task, TaskError, TaskSpec,
    Timestamp,
};

/// Whether SPEC §2 allows a task to go from `from` to `to` in one step.
pub fn transition_allowed(from: State, to: State) -> bool {
    use State::*;
    matches!(
        (from, to),
        (Blocked, Pending | Scheduled | Cancelled)
            | (Scheduled, Pending | Cancelled)
            | (Pending, Running | Cancelled)
            | (
                Running,
                Scheduled | Pending | Completed | Failed | Cancelled
            )
            | (Failed | Cancelled, Pending | Blocked)
    )
}

/// The longest a failed attempt waits for its retry, whether a worker
/// names the delay (`retry_in_secs`) or the backoff makes it: a year. A
/// delay without bound would put `run_at` past the year 9999, which no
/// answer can write.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Retry delays: `min(2^attempt, max_secs)` seconds, ± `jitter`.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub max_secs: u64,
    /// Fraction of the delay added or removed at random, 0.0–1.0.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            max_secs: 3600,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let base = 2u64.saturating_pow(attempt).min(self.max_secs) as f64;
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = if jitter > 0.0 {
            1.0 + rng.random_range(-jitter..=jitter)
        } else {
            1.0
        };
        Duration::from_millis((base * factor * 1000.0) as u64)
    }
}

/// What a cancel did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelEffect {
    /// The task was not running and is now `cancelled`.
    Cancelled,
    /// The task is running; `cancel_requested` is set and its worker will stop.
    Requested,
}

impl Task {
    fn move_to(&mut self, to: State, now: Timestamp) {
        debug_assert!(
            transition_allowed(self.state, to),
            "illegal transition {} -> {}",
            self.state,
            to
        );
        self.state = to;
        self.updated_at = now;
        if to.is_finished() {
            self.finished_at = Some(now);
        }
        if to != State::Running {
            self.lease_expires_at = None;
            self.worker_id = None;
        }
    }

    fn wrong_state(&self, action: &str) -> Error {
        Error::Conflict(format!(
            "task {} is {}; cannot {action}",
            self.id, self.state
        ))
    }

    /// The state a task takes when it may run at `run_at`.
    fn ready_state(&self, now: Timestamp) -> State {
        if self.run_at > now {
            State::Scheduled
        } else {
            State::Pending
        }
    }

    /// A new task as enqueue creates it from a validated spec: `blocked`
    /// while dependencies are unmet, else `scheduled` or `pending` by
    /// `run_at`.
    pub fn new_from_spec(id: Uuid, spec: TaskSpec, now: Timestamp, blocked: bool) -> Task {
        let run_at = spec.schedule.run_at(now);
        let state = if blocked {
            State::Blocked
        } else if run_at > now {
            State::Scheduled
        } else {
            State::Pending
        };
        Task {
            id,
            task_type: spec.task_type,
            queue: spec.queue,
            payload: spec.payload,
            priority: spec.priority,
            state,
            attempt: 0,
            max_attempts: spec.max_attempts,
            timeout_secs: spec.timeout_secs,
            run_at,
            owner: spec.owner,
            labels: spec.labels,
            unique_key: spec.unique_key,
            depends_on: spec.depends_on,
            progress: None,
            result: None,
            error: None,
            errors: Vec::new(),
            cancel_requested: false,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            lease_expires_at: None,
            worker_id: None,
        }
    }

    /// Whether `worker_id` holds this task's lease.
    pub fn held_by(&self, worker_id: &str) -> bool {
        self.state == State::Running && self.worker_id.as_deref() == Some(worker_id)
    }

    fn ensure_held(&self, worker_id: &str) -> Result<()> {
        if self.held_by(worker_id) {
            Ok(())
        } else {
            Err(Error::Conflict(format!(
                "worker {worker_id:?} does not hold task {} (it is {}{})",
                self.id,
                self.state,
                match (&self.worker_id, self.state) {
                    (Some(w), State::Running) => format!(", held by {w:?}"),
                    _ => String::new(),
                }
            )))
        }
    }

    /// `scheduled → pending` once `run_at` has come.
    pub fn promote(&mut self, now: Timestamp) -> Result<()> {
        if self.state != State::Scheduled {
            return Err(self.wrong_state("promote"));
        }
        self.move_to(State::Pending, now);
        Ok(())
    }

    /// `pending → running`: a new attempt starts under `worker_id`'s lease.
    pub fn claim(&mut self, worker_id: &str, lease: Duration, now: Timestamp) -> Result<()> {
        if self.state != State::Pending {
            return Err(self.wrong_state("claim"));
        }
        self.move_to(State::Running, now);
        self.attempt += 1;
        self.started_at = Some(now);
        self.lease_expires_at = Some(now.saturating_add(lease));
        self.worker_id = Some(worker_id.to_owned());
        self.progress = None;
        Ok(())
    }

    /// Extends the lease and records progress.
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        lease: Duration,
        progress: Option<(Option<f64>, Option<String>, Option<Json>)>,
        now: Timestamp,
    ) -> Result<()> {
        self.ensure_held(worker_id)?;
        self.lease_expires_at = Some(now.saturating_add(lease));
        if let Some((percent, message, data)) = progress {
            self.progress = Some(Progress {
                percent,
                message,
                data,
                updated_at: now,
            });
        }
        self.updated_at = now;
        Ok(())
    }

    /// `running → completed`. Completes even when cancellation was requested:
    /// the work is done.
    pub fn complete(
        &mut self,
        worker_id: &str,
        result: Option<Json>,
        now: Timestamp,
    ) -> Result<()> {
        self.ensure_held(worker_id)?;
        self.result = result;
        self.move_to(State::Completed, now);
        Ok(())
    }

    /// A worker reports that its attempt failed.
    pub fn fail(
        &mut self,
        worker_id: &str,
        failure: AttemptFailure,
        backoff: &Backoff,
        now: Timestamp,
    ) -> Result<()> {
        self.ensure_held(worker_id)?;
        self.end_attempt(failure, backoff, now);
        Ok(())
    }

    /// Why a running attempt must end now, if it must: its lease ran out
    /// (checked first: a silent worker is presumed gone) or its
    /// `timeout_secs` passed.
    pub fn expired(&self, now: Timestamp) -> Option<ErrorKind> {
        if self.state != State::Running {
            return None;
        }
        if self.lease_expires_at.is_some_and(|lease| lease <= now) {
            Some(ErrorKind::LeaseExpired)
        } else if self.deadline().is_some_and(|deadline| deadline <= now) {
            Some(ErrorKind::Timeout)
        } else {
            None
        }
    }

    /// The server ends an attempt whose lease ran out or whose
    /// `timeout_secs` passed; the worker is presumed gone.
    pub fn expire(&mut self, kind: ErrorKind, backoff: &Backoff, now: Timestamp) -> Result<()> {
        if self.state != State::Running {
            return Err(self.wrong_state("expire"));
        }
        let message = match kind {
            ErrorKind::Timeout => format!(
                "attempt ran longer than timeout_secs ({})",
                self.timeout_secs
            ),
            _ => format!(
                "lease of worker {:?} expired without a heartbeat",
                self.worker_id.as_deref().unwrap_or("?")
            ),
        };
        self.end_attempt(
            AttemptFailure {
                kind,
                message,
                retry: None,
                retry_in: None,
            },
            backoff,
            now,
        );
        Ok(())
    }

    fn end_attempt(&mut self, failure: AttemptFailure, backoff: &Backoff, now: Timestamp) {
        let kind = if self.cancel_requested {
            ErrorKind::Cancelled
        } else {
            failure.kind
        };
        self.errors.push(AttemptError {
            attempt: self.attempt,
            kind,
            message: failure.message.clone(),
            at: now,
        });
        self.error = Some(TaskError {
            kind,
            message: failure.message,
            at: now,
        });
        if self.cancel_requested {
            self.move_to(State::Cancelled, now);
        } else if failure.retry == Some(false) || self.attempt >= self.max_attempts {
            self.move_to(State::Failed, now);
        } else {
            let delay = failure
                .retry_in
                .unwrap_or_else(|| backoff.delay(self.attempt, &mut rand::rng()))
                .min(MAX_RETRY_DELAY);
            self.run_at = now.saturating_add(delay);
            let next = self.ready_state(now);
            self.move_to(next, now);
        }
    }

    /// SPEC §1.4: cancels at once unless running, where it only asks.
    pub fn cancel(&mut self, now: Timestamp) -> Result<CancelEffect> {
        match self.state {
            State::Running => {
                self.cancel_requested = true;
                self.updated_at = now;
                Ok(CancelEffect::Requested)
            }
            State::Blocked | State::Scheduled | State::Pending => {
                self.error = Some(TaskError {
                    kind: ErrorKind::Cancelled,
                    message: format!("cancelled while {}", self.state),
                    at: now,
                });
                self.move_to(State::Cancelled, now);
                Ok(CancelEffect::Cancelled)
            }
            _ => Err(self.wrong_state("cancel")),
        }
    }

    /// SPEC §1.1 manual retry: back to `pending` with one more attempt, or
    /// to `blocked` while a dependency is still active, so that a retried
    /// task never runs before what it depends on completes (SPEC §1:
    /// "stays blocked until all of them complete"). `dependencies` are the
    /// states of [`Task::depends_on`], `None` for one no longer stored; one
    /// that ended without completing refuses the retry, since the task
    /// could never run.
    ///
    /// One no longer stored counts as completed once the task has run: it
    /// ran only after every dependency completed, and a completed task
    /// leaves `completed` only by being deleted, which retention does a
    /// day after completion by default, long before it deletes a failed
    /// dependent. A task that never ran cannot tell a dependency that
    /// completed from one that failed before both were deleted, and is
    /// refused.
    pub fn manual_retry(
        &mut self,
        dependencies: &[(Uuid, Option<State>)],
        now: Timestamp,
    ) -> Result<()> {
        if !matches!(self.state, State::Failed | State::Cancelled) {
            return Err(self.wrong_state("retry (only failed or cancelled tasks can be retried)"));
        }
        let ran = self.attempt > 0;
        let mut waits = false;
        for (dep, state) in dependencies {
            match state {
                Some(State::Completed) => {}
                Some(s @ (State::Failed | State::Cancelled)) => {
                    return Err(Error::Conflict(format!(
                        "task {} depends on task {dep}, which ended {s}; retry that one first",
                        self.id
                    )));
                }
                Some(_) => waits = true,
                None if ran => {}
                None => {
                    return Err(Error::Conflict(format!(
                        "task {} depends on task {dep}, which no longer exists; it can never run",
                        self.id
                    )));
                }
            }
        }
        self.max_attempts = self.max_attempts.max(self.attempt + 1);
        self.cancel_requested = false;
        self.run_at = now;
        self.finished_at = None;
        self.move_to(
            if waits {
                State::Blocked
            } else {
                State::Pending
            },
            now,
        );
        Ok(())
    }

    /// `blocked → pending/scheduled` once every dependency completed.
    pub fn unblock(&mut self, now: Timestamp) -> Result<()> {
        if self.state != State::Blocked {
            return Err(self.wrong_state("unblock"));
        }
        let next = self.ready_state(now);
        self.move_to(next, now);
        Ok(())
    }

    /// `blocked → cancelled` because a dependency ended without completing.
    pub fn fail_dependency(
        &mut self,
        dependency: Uuid,
        its_state: State,
        now: Timestamp,
    ) -> Result<()> {
        if self.state != State::Blocked {
            return Err(self.wrong_state("fail a dependency"));
        }
        self.error = Some(TaskError {
            kind: ErrorKind::DependencyFailed,
            message: format!("dependency {dependency} ended {its_state}"),
            at: now,
        });
        self.move_to(State::Cancelled, now);
        Ok(())
    }
}

/// How an attempt failed, as the worker or the server reports it.
#[derive(Clone, Debug)]
pub struct AttemptFailure {
    pub kind: ErrorKind,
    pub message: String,
    /// `Some(false)` fails the task at once.
    pub retry: Option<bool>,
    /// Overrides the backoff delay.
    pub retry_in: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: State) -> Task {
        let now = Timestamp::from_millis(1_000_000);
        let spec = crate::NewTask::new("t")
            .max_attempts(2)
            .validate(&crate::Limits::default(), crate::Position::Alone)
            .unwrap();
        let mut task = Task::new_from_spec(Uuid::now_v7(), spec, now, false);
        task.state = state;
        task
    }

    fn failure(retry: Option<bool>) -> AttemptFailure {
        AttemptFailure {
            kind: ErrorKind::Error,
            message: "boom".into(),
            retry,
            retry_in: None,
        }
    }

    #[test]
    fn finished_states_leave_only_by_manual_retry() {
        for from in State::FINISHED {
            for to in State::ALL {
                let manual_retry =
                    matches!(to, State::Pending | State::Blocked) && from != State::Completed;
                assert_eq!(transition_allowed(from, to), manual_retry, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn failing_retries_with_backoff_then_fails() {
        let now = Timestamp::from_millis(1_000_000);
        let mut t = task(State::Pending);
        t.claim("w", Duration::from_secs(30), now).unwrap();
        t.fail("w", failure(None), &Backoff::default(), now)
            .unwrap();
        assert_eq!(t.state, State::Scheduled);
        let delay = now.until(t.run_at).as_millis();
        assert!((1600..=2400).contains(&delay), "delay {delay}");
        t.promote(now).unwrap();
        t.claim("w", Duration::from_secs(30), now).unwrap();
        t.fail("w", failure(None), &Backoff::default(), now)
            .unwrap();
        assert_eq!(t.state, State::Failed);
        assert_eq!(t.errors.len(), 2);
        assert_eq!(t.finished_at, Some(now));
    }

    /// An embedded worker's delay and an operator's backoff reach the
    /// machine unchecked; neither may put `run_at` past what an answer can
    /// write.
    #[test]
    fn a_retry_waits_at_most_a_year() {
        let now = Timestamp::from_millis(1_000_000);
        let unbounded = Backoff {
            max_secs: u64::MAX,
            jitter: 0.0,
        };
        for (attempt, retry_in) in [(1, Some(Duration::MAX)), (60, None)] {
            let mut t = task(State::Pending);
            t.max_attempts = 100;
            t.attempt = attempt - 1;
            t.claim("w", Duration::from_secs(30), now).unwrap();
            let failure = AttemptFailure {
                retry_in,
                ..failure(None)
            };
            t.fail("w", failure, &unbounded, now).unwrap();
            assert_eq!(t.state, State::Scheduled);
            assert_eq!(now.until(t.run_at), MAX_RETRY_DELAY, "attempt {attempt}");
        }
    }

    #[test]
    fn retry_false_fails_at_once_and_manual_retry_adds_an_attempt() {
        let now = Timestamp::from_millis(1_000_000);
        let mut t = task(State::Pending);
        t.claim("w", Duration::from_secs(30), now).unwrap();
        t.fail("w", failure(Some(false)), &Backoff::default(), now)
            .unwrap();
        assert_eq!(t.state, State::Failed);
        t.manual_retry(&[], now).unwrap();
        assert_eq!((t.state, t.max_attempts), (State::Pending, 2));
        t.claim("w", Duration::from_secs(30), now).unwrap();
        t.fail("w", failure(None), &Backoff::default(), now)
            .unwrap();
        assert_eq!(t.state, State::Failed);
        t.manual_retry(&[], now).unwrap();
        assert_eq!(t.max_attempts, 3);
    }

    #[test]
    fn manual_retry_waits_for_active_dependencies_and_refuses_broken_ones() {
        let now = Timestamp::from_millis(1_000_000);
        let (done, active, failed, gone) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        let cancelled = || task(State::Cancelled);
        let mut t = cancelled();
        t.manual_retry(&[(done, Some(State::Completed))], now)
            .unwrap();
        assert_eq!(t.state, State::Pending);
        let mut t = cancelled();
        let deps = [
            (done, Some(State::Completed)),
            (active, Some(State::Running)),
        ];
        t.manual_retry(&deps, now).unwrap();
        assert_eq!(t.state, State::Blocked);
        for broken in [(failed, Some(State::Failed)), (gone, None)] {
            let mut t = cancelled();
            let refused = t.manual_retry(&[(active, Some(State::Pending)), broken], now);
            assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
            assert_eq!(t.state, State::Cancelled, "a refused retry changes nothing");
        }
        // A task that ran found its dependencies completed; one deleted
        // since (by retention) completed before it went.
        let mut ran = task(State::Failed);
        ran.attempt = 1;
        ran.manual_retry(&[(gone, None)], now).unwrap();
        assert_eq!(ran.state, State::Pending);
    }

    #[test]
    fn only_the_holder_may_report() {
        let now = Timestamp::from_millis(0);
        let mut t = task(State::Pending);
        t.claim("a", Duration::from_secs(30), now).unwrap();
        assert!(matches!(
            t.complete("b", None, now),
            Err(Error::Conflict(_))
        ));
        t.complete("a", None, now).unwrap();
        assert!(matches!(
            t.complete("a", None, now),
            Err(Error::Conflict(_))
        ));
    }

    #[test]
    fn cancel_of_running_task_asks_and_the_failure_report_cancels() {
        let now = Timestamp::from_millis(0);
        let mut t = task(State::Pending);
        t.claim("a", Duration::from_secs(30), now).unwrap();
        assert_eq!(t.cancel(now).unwrap(), CancelEffect::Requested);
        assert_eq!(t.state, State::Running);
        t.fail("a", failure(None), &Backoff::default(), now)
            .unwrap();
        assert_eq!(t.state, State::Cancelled);
        assert_eq!(t.error.as_ref().unwrap().kind, ErrorKind::Cancelled);
        assert!(matches!(t.cancel(now), Err(Error::Conflict(_))));
    }
}
