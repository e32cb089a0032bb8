//! Offload's worker runtime: register async handlers by task type and run
//! them with a concurrency limit, automatic heartbeats, progress reports, a
//! cancellation token per task, timeouts, batched acknowledgements and
//! graceful shutdown.
//!
//! A worker pulls from a [`TaskSource`]: the in-process [`Engine`] (no
//! server), or a remote Offload server over HTTP. Semantics are the same for
//! both; only the source differs.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn example(engine: Arc<offload_engine::Engine>) {
//! use offload_worker::{TaskContext, TaskFailure, Worker};
//!
//! let worker = Worker::new(engine)
//!     .concurrency(8)
//!     .handle("report.build", |ctx: TaskContext| async move {
//!         let input: serde_json::Value = ctx.payload()?;
//!         ctx.progress(50.0, "half way").await.ok();
//!         if ctx.is_cancelled() {
//!             return Err(TaskFailure::new("stopped on request"));
//!         }
//!         Ok(serde_json::json!({ "rows": input }))
//!     });
//! let stop = tokio_util::sync::CancellationToken::new();
//! worker.run(stop).await.unwrap();
//! # }
//! ```

mod context;
mod runner;
mod source;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use offload_core::{Error, Json, Result};
use rustc_hash::FxHashMap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use context::{CancelReason, TaskContext, TaskFailure};
pub use offload_engine::Engine;
pub use source::TaskSource;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Names this worker in leases; unique per running worker.
    pub worker_id: String,
    /// Handlers running at once, at most.
    pub concurrency: usize,
    /// Queues served; empty serves every queue.
    pub queues: Vec<String>,
    /// Lease taken on each claim and renewed by heartbeats. A handler whose
    /// lease no heartbeat renewed for this long (the server down or out of
    /// reach) is stopped, as one whose lease was refused: the server may
    /// have given its task to another worker. A heartbeat or a send of
    /// acknowledgements that has no answer after a third of it is given up
    /// and sent again.
    pub lease: Duration,
    /// How often running tasks' leases are renewed. A worker whose source
    /// cannot announce cancellations (a remote one) renews at least every
    /// 2 s, since the answer is how it learns of a cancel.
    pub heartbeat_interval: Duration,
    /// How long one fetch waits for work before asking again.
    pub poll_wait: Duration,
    /// On shutdown, how long in-flight tasks may run on before they are
    /// stopped and handed back for retry.
    pub shutdown_grace: Duration,
    /// After a task's token fires (cancel, timeout), how long its handler may
    /// take to wind down before it is aborted.
    pub cancel_grace: Duration,
    /// Acknowledgements sent in one call, at most.
    pub max_ack_batch: usize,
    /// Bytes of results and failure messages sent in one call, at most (one
    /// larger result goes alone). A server refuses a whole request over its
    /// `batch_body_limit_bytes`; a call refused so is split until its
    /// halves go through, and this keeps it from coming to that.
    pub max_ack_batch_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let lease = Duration::from_secs(60);
        Self {
            worker_id: default_worker_id(),
            concurrency: 10,
            queues: Vec::new(),
            lease,
            heartbeat_interval: (lease / 3).min(Duration::from_secs(10)),
            poll_wait: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            max_ack_batch: 1000,
            max_ack_batch_bytes: 8 << 20,
        }
    }
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let unique = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &unique[unique.len() - 6..]
    )
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Option<Json>, TaskFailure>> + Send>>;

/// A handler with its result type erased to JSON.
trait Handler: Send + Sync {
    fn call(&self, ctx: TaskContext) -> HandlerFuture;
}

struct FnHandler<F>(F);

impl<F, Fut, R> Handler for FnHandler<F>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, TaskFailure>> + Send + 'static,
    R: Serialize + 'static,
{
    fn call(&self, ctx: TaskContext) -> HandlerFuture {
        let running = (self.0)(ctx);
        Box::pin(async move {
            let value = running.await?;
            result_json(&value)
        })
    }
}

/// A handler's result as JSON; `None` when it is `null` (a handler that
/// returns `()`). Most results are: they are found so in four bytes on
/// the stack, where building the JSON value to compare it was ~800
/// instructions a task (callgrind).
fn result_json<R: Serialize>(value: &R) -> Result<Option<offload_core::Json>, TaskFailure> {
    let mut first_bytes = std::io::Cursor::new([0u8; 4]);
    let fits = serde_json::to_writer(&mut first_bytes, value).is_ok();
    if fits && first_bytes.position() == 4 && first_bytes.get_ref() == b"null" {
        return Ok(None);
    }
    let json = serde_json::value::to_raw_value(value)
        .map_err(|e| TaskFailure::permanent(format!("the handler's result is not JSON: {e}")))?;
    Ok((json.get() != "null").then_some(json))
}

/// A worker: handlers by task type, and how to run them.
pub struct Worker {
    source: Arc<dyn TaskSource>,
    /// Looked up for every task the worker runs; the keys are its own types.
    handlers: FxHashMap<String, Arc<dyn Handler>>,
    config: WorkerConfig,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("types", &self.handlers.keys().collect::<Vec<_>>())
            .field("config", &self.config)
            .finish()
    }
}

impl Worker {
    pub fn new(source: Arc<impl TaskSource>) -> Self {
        Self::from_source(source)
    }

    pub fn from_source(source: Arc<dyn TaskSource>) -> Self {
        Self {
            source,
            handlers: FxHashMap::default(),
            config: WorkerConfig::default(),
        }
    }

    /// Registers the handler for `task_type`. It returns any serializable
    /// result (stored as the task's `result`; `()` stores none) or a
    /// [`TaskFailure`]; any `std::error::Error` converts into one with `?`.
    pub fn handle<F, Fut, R>(mut self, task_type: impl Into<String>, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskFailure>> + Send + 'static,
        R: Serialize + 'static,
    {
        self.handlers
            .insert(task_type.into(), Arc::new(FnHandler(handler)));
        self
    }

    pub fn with_config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    pub fn queues(mut self, queues: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.config.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.config.worker_id = id.into();
        self
    }

    /// Sets the lease and a heartbeat interval of a third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self.config.heartbeat_interval = lease / 3;
        self
    }

    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.config.cancel_grace = grace;
        self
    }

    /// Runs until `shutdown` fires, then shuts down gracefully: no new
    /// claims, in-flight tasks get `shutdown_grace` to finish, the rest are
    /// stopped and failed back for retry, and every acknowledgement is sent
    /// before this returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        if self.handlers.is_empty() {
            return Err(Error::invalid(
                "handlers",
                "register at least one handler before running",
            ));
        }
        if self.config.concurrency == 0 {
            return Err(Error::invalid("concurrency", "must be at least 1"));
        }
        offload_core::validate_worker_id(&self.config.worker_id)?;
        // What every store and server takes (SPEC §1.3): a lease they would
        // refuse is said here, before the first fetch.
        if !(1..=offload_core::MAX_LEASE_SECS).contains(&self.config.lease.as_secs()) {
            return Err(Error::invalid(
                "lease",
                format!(
                    "must be 1 s to {} s; got {:?}",
                    offload_core::MAX_LEASE_SECS,
                    self.config.lease
                ),
            ));
        }
        runner::run(self.source, self.handlers, self.config, shutdown).await
    }
}

/// The README's Rust example, compiled as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExample;

#[cfg(test)]
mod tests {
    use super::result_json;

    fn text<T: serde::Serialize>(value: &T) -> Option<String> {
        result_json(value)
            .unwrap()
            .map(|json| json.get().to_owned())
    }

    #[test]
    fn a_null_result_is_none_and_any_other_is_its_json() {
        assert_eq!(text(&()), None);
        assert_eq!(text(&None::<u8>), None);
        assert_eq!(text(&1234).as_deref(), Some("1234"));
        assert_eq!(text(&true).as_deref(), Some("true"));
        assert_eq!(text(&1).as_deref(), Some("1"));
        assert_eq!(text(&"nul").as_deref(), Some("\"nul\""));
        assert_eq!(text(&vec![1, 2, 3]).as_deref(), Some("[1,2,3]"));
    }
}
