//! Where a worker gets its tasks from.

use std::time::Duration;

use offload_core::{Ack, ClaimRequest, HeartbeatAck, HeartbeatRequest, Result, Task};
use offload_engine::Engine;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The worker protocol of SPEC §4.1, as the worker runtime needs it.
#[async_trait::async_trait]
pub trait TaskSource: Send + Sync + 'static {
    /// Claims up to `request.limit` tasks, waiting up to `wait` for some.
    /// `stop` may end the wait early but must never drop claimed tasks.
    async fn fetch(
        &self,
        request: &ClaimRequest,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Task>>;

    async fn heartbeat(&self, request: HeartbeatRequest) -> Result<HeartbeatAck>;

    /// Reports outcomes; one answer per ack, in order: taken, or why not
    /// (typically a conflict: the worker no longer holds the task).
    async fn ack(&self, worker_id: &str, acks: Vec<Ack>) -> Result<Vec<Result<()>>>;

    /// Ids of running tasks whose cancellation was just requested, where the
    /// source can tell at once; otherwise heartbeats tell.
    fn cancellations(&self) -> Option<broadcast::Receiver<Uuid>> {
        None
    }
}

/// In process: the worker and the store share one process, no HTTP.
#[async_trait::async_trait]
impl TaskSource for Engine {
    async fn fetch(
        &self,
        request: &ClaimRequest,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Task>> {
        Engine::fetch(self, request, wait, stop).await
    }

    async fn heartbeat(&self, request: HeartbeatRequest) -> Result<HeartbeatAck> {
        self.store().heartbeat(request).await
    }

    async fn ack(&self, worker_id: &str, acks: Vec<Ack>) -> Result<Vec<Result<()>>> {
        let outcomes = self.store().ack(worker_id, acks).await?;
        Ok(outcomes.into_iter().map(|o| o.map(drop)).collect())
    }

    fn cancellations(&self) -> Option<broadcast::Receiver<Uuid>> {
        Some(self.store().hub().subscribe_cancels())
    }
}
