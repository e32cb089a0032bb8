//! Server configuration: the optional `offload.toml`, onto which the binary
//! lays `OFFLOAD_*` variables and flags (SPEC §3).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use offload_core::{Backoff, Limits, Retention};
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6490";
pub const DEFAULT_DB: &str = "sqlite://offload.db";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Everything `offload serve` can be told. Every field has a default; the
/// TOML file uses the same names.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    /// `sqlite://PATH` (or a plain path) or `postgres://…`; a PostgreSQL URL
    /// may name the schema to use with `?schema=NAME` (default `public`).
    pub db: String,
    /// Connections each node keeps to PostgreSQL, at most.
    pub db_pool_size: u32,
    /// Seconds one PostgreSQL operation may wait for the database before it
    /// fails as unavailable (503) and its connection is closed: without
    /// it, an answer lost on a connection gone silent is waited for until
    /// the system gives up, a quarter of an hour. Long enough for the
    /// largest batch to be written.
    pub db_operation_timeout_secs: u32,
    /// `durable` (fsync before answering) or `relaxed`.
    pub durability: String,
    /// Largest payload, result or progress data, in bytes.
    pub payload_limit_bytes: usize,
    /// Largest request body of a batch enqueue or ack, in bytes.
    pub batch_body_limit_bytes: usize,
    /// Lease given when a fetch or heartbeat names none.
    pub default_lease_secs: u32,
    /// After SIGINT/SIGTERM, seconds in-flight requests get to finish; the
    /// connections still open then are closed. Without a bound, a client
    /// that stopped reading its event stream would hold the node open.
    pub shutdown_grace_secs: u32,
    /// Seconds a connection may wait for a request's head, before its
    /// first request and between requests, and a request's body may go
    /// without a byte, before the node closes it. Longer than the idle
    /// time of the connection pools in front (Offload's client keeps an
    /// idle connection 50 s; load balancers often 60 s), so that the
    /// client, not the node, closes an idle one.
    pub idle_timeout_secs: u32,
    /// Bytes of large answers to reads (pages of tasks, a task) the node
    /// holds while their clients have not read them; past it such reads
    /// are answered 503 until some are read (`unread.rs`).
    pub unread_answers_limit_bytes: usize,
    pub retention: RetentionConfig,
    pub backoff: BackoffConfig,
    /// Settings applied to queues at start, by queue name.
    pub queues: BTreeMap<String, QueueConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("a valid default address"),
            db: DEFAULT_DB.into(),
            db_pool_size: 16,
            db_operation_timeout_secs: 60,
            durability: "durable".into(),
            payload_limit_bytes: Limits::default().max_payload_bytes,
            batch_body_limit_bytes: 256 << 20,
            default_lease_secs: 60,
            shutdown_grace_secs: 10,
            idle_timeout_secs: 75,
            unread_answers_limit_bytes: 256 << 20,
            retention: RetentionConfig::default(),
            backoff: BackoffConfig::default(),
            queues: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub completed_secs: u64,
    pub failed_secs: u64,
    pub cancelled_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let r = Retention::default();
        Self {
            completed_secs: r.completed.as_secs(),
            failed_secs: r.failed.as_secs(),
            cancelled_secs: r.cancelled.as_secs(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    pub max_secs: u64,
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        let b = Backoff::default();
        Self {
            max_secs: b.max_secs,
            jitter: b.jitter,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub concurrency: Option<u32>,
    pub paused: Option<bool>,
}

/// The largest `payload_limit_bytes`. A task's payload, its result and its
/// progress data each become one value in the store, and SQLite and
/// PostgreSQL each refuse a value past about 1 GB: with a higher limit a
/// payload the server accepted failed in the store ("string or blob too
/// big") as a 500.
pub const MAX_PAYLOAD_LIMIT_BYTES: usize = 256 << 20;
/// Two of the largest pages of a list.
const MIN_UNREAD_ANSWERS_LIMIT_BYTES: usize = 16 << 20;
/// 1 TiB: counted in KiB, the budget's permits fit a `u32`.
const MAX_UNREAD_ANSWERS_LIMIT_BYTES: usize = 1 << 40;

/// The most tasks of one queue that may run at once, where a limit is set.
pub const MAX_QUEUE_CONCURRENCY: u32 = 1_000_000;

impl Config {
    pub fn from_toml_file(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: one_line(&text, &e),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        // A plain path is a SQLite file; anything else with a scheme would
        // become one named after the URL.
        if let Some((scheme, _)) = self.db.split_once("://")
            && !matches!(scheme, "sqlite" | "postgres" | "postgresql")
        {
            return invalid(format!(
                "db must be sqlite://PATH, postgres://… or a file path; got {:?}",
                self.db
            ));
        }
        if !matches!(self.durability.as_str(), "durable" | "relaxed") {
            return invalid(format!(
                "durability must be \"durable\" or \"relaxed\"; got {:?}",
                self.durability
            ));
        }
        if !(1..=offload_core::MAX_LEASE_SECS).contains(&u64::from(self.default_lease_secs)) {
            return invalid(format!(
                "default_lease_secs must be 1 to {}; got {}",
                offload_core::MAX_LEASE_SECS,
                self.default_lease_secs
            ));
        }
        if self.shutdown_grace_secs > 3600 {
            return invalid(format!(
                "shutdown_grace_secs must be 0 to 3600; got {}",
                self.shutdown_grace_secs
            ));
        }
        if !(1..=3600).contains(&self.idle_timeout_secs) {
            return invalid(format!(
                "idle_timeout_secs must be 1 to 3600; got {}",
                self.idle_timeout_secs
            ));
        }
        if !(MIN_UNREAD_ANSWERS_LIMIT_BYTES..=MAX_UNREAD_ANSWERS_LIMIT_BYTES)
            .contains(&self.unread_answers_limit_bytes)
        {
            return invalid(format!(
                "unread_answers_limit_bytes must be {MIN_UNREAD_ANSWERS_LIMIT_BYTES} (two of the \
                 largest pages of a list) to {MAX_UNREAD_ANSWERS_LIMIT_BYTES}; got {}",
                self.unread_answers_limit_bytes
            ));
        }
        if !(2..=1000).contains(&self.db_pool_size) {
            return invalid(format!(
                "db_pool_size must be 2 to 1000; got {}",
                self.db_pool_size
            ));
        }
        if !(1..=3600).contains(&self.db_operation_timeout_secs) {
            return invalid(format!(
                "db_operation_timeout_secs must be 1 to 3600; got {}",
                self.db_operation_timeout_secs
            ));
        }
        if !(1..=MAX_PAYLOAD_LIMIT_BYTES).contains(&self.payload_limit_bytes) {
            return invalid(format!(
                "payload_limit_bytes must be 1 to {MAX_PAYLOAD_LIMIT_BYTES}; got {}",
                self.payload_limit_bytes
            ));
        }
        if self.batch_body_limit_bytes < self.payload_limit_bytes {
            return invalid(format!(
                "batch_body_limit_bytes must be at least payload_limit_bytes ({}), so that \
                 a batch or an ack can carry one task of the largest payload or result; got {}",
                self.payload_limit_bytes, self.batch_body_limit_bytes
            ));
        }
        let max_retry_delay_secs = offload_core::MAX_RETRY_DELAY.as_secs();
        if self.backoff.max_secs > max_retry_delay_secs {
            return invalid(format!(
                "backoff.max_secs must be 0 to {max_retry_delay_secs} (a year); got {}",
                self.backoff.max_secs
            ));
        }
        if !(0.0..=1.0).contains(&self.backoff.jitter) {
            return invalid(format!(
                "backoff.jitter must be 0 to 1; got {}",
                self.backoff.jitter
            ));
        }
        for (name, settings) in &self.queues {
            offload_core::validate_queue_name("queues", name)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            // 0 would be a queue that never runs a task, said nowhere but
            // in its stalled counts; PATCH /v1/queues refuses it too.
            if let Some(n) = settings.concurrency
                && !(1..=MAX_QUEUE_CONCURRENCY).contains(&n)
            {
                return invalid(format!(
                    "queues.{name}.concurrency must be 1 to {MAX_QUEUE_CONCURRENCY}, or left out \
                     for no limit; got {n}"
                ));
            }
        }
        Ok(())
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_payload_bytes: self.payload_limit_bytes,
            ..Limits::default()
        }
    }

    pub fn retention(&self) -> Retention {
        Retention {
            completed: Duration::from_secs(self.retention.completed_secs),
            failed: Duration::from_secs(self.retention.failed_secs),
            cancelled: Duration::from_secs(self.retention.cancelled_secs),
        }
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            max_secs: self.backoff.max_secs,
            jitter: self.backoff.jitter,
        }
    }
}

/// A TOML error as one line: where it is and what is wrong, without the
/// excerpt of the file that its own display draws over several lines.
fn one_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(edit: impl FnOnce(&mut Config)) -> String {
        let mut config = Config::default();
        edit(&mut config);
        match config.validate() {
            Err(e) => e.to_string(),
            Ok(()) => panic!("accepted {config:?}"),
        }
    }

    #[test]
    fn the_defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn limits_the_stores_cannot_hold_are_refused() {
        let message = refused(|c| c.payload_limit_bytes = 2_000_000_000);
        assert!(
            message.contains("payload_limit_bytes must be 1 to 268435456; got 2000000000"),
            "{message}"
        );
        let message = refused(|c| c.payload_limit_bytes = 0);
        assert!(
            message.contains("payload_limit_bytes must be 1 to"),
            "{message}"
        );
        let message = refused(|c| c.batch_body_limit_bytes = 0);
        assert!(
            message
                .contains("batch_body_limit_bytes must be at least payload_limit_bytes (1048576)"),
            "{message}"
        );
    }

    #[test]
    fn a_backoff_past_a_year_is_refused() {
        // Past it, the attempts after the 38th would be due after the
        // year 9999.
        let message = refused(|c| c.backoff.max_secs = u64::MAX);
        assert!(
            message.contains("backoff.max_secs must be 0 to 31622400 (a year); got"),
            "{message}"
        );
    }

    #[test]
    fn an_idle_timeout_of_nothing_is_refused() {
        // 0 would close every connection before its first request.
        let message = refused(|c| c.idle_timeout_secs = 0);
        assert!(
            message.contains("idle_timeout_secs must be 1 to 3600; got 0"),
            "{message}"
        );
        // 0 would fail every PostgreSQL operation.
        let message = refused(|c| c.db_operation_timeout_secs = 0);
        assert!(
            message.contains("db_operation_timeout_secs must be 1 to 3600; got 0"),
            "{message}"
        );
    }

    #[test]
    fn a_queue_limited_to_no_task_at_all_is_refused() {
        let stalled = QueueConfig {
            concurrency: Some(0),
            paused: None,
        };
        let message = refused(|c| {
            c.queues.insert("emails".into(), stalled);
        });
        assert!(
            message.contains(
                "queues.emails.concurrency must be 1 to 1000000, or left out for no limit; got 0"
            ),
            "{message}"
        );
    }
}
