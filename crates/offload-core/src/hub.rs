//! How a store tells the rest of the process that something changed: task
//! events for streams and webhooks, and two wake-up signals for waiters
//! (workers long-polling for ready tasks, the promoter waiting for the next
//! `run_at`).
//!
//! Signals are counters in `watch` channels rather than notifications, so a
//! waiter that marks the counter seen *before* looking at the store can never
//! miss a change made while it looked.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use uuid::Uuid;

use crate::Task;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EventKind {
    /// The task changed state (or was created).
    #[serde(rename = "task.state")]
    State,
    /// The worker reported progress.
    #[serde(rename = "task.progress")]
    Progress,
}

#[derive(Clone, Debug)]
pub struct TaskEvent {
    pub kind: EventKind,
    pub task: Arc<Task>,
}

#[derive(Debug)]
pub struct Hub {
    events: broadcast::Sender<TaskEvent>,
    ready: watch::Sender<u64>,
    scheduled: watch::Sender<u64>,
    cancels: broadcast::Sender<Uuid>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            events: broadcast::channel(4096).0,
            ready: watch::channel(0).0,
            scheduled: watch::channel(0).0,
            cancels: broadcast::channel(1024).0,
        }
    }

    /// Whether anyone listens for events; stores skip building them if not.
    pub fn has_listeners(&self) -> bool {
        self.events.receiver_count() > 0
    }

    pub fn publish(&self, event: TaskEvent) {
        // No receiver is not an error: events are for whoever listens now.
        let _ = self.events.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    /// Tasks may have become claimable.
    pub fn notify_ready(&self) {
        self.ready.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn watch_ready(&self) -> watch::Receiver<u64> {
        self.ready.subscribe()
    }

    /// A task entered `scheduled`; the promoter may need to wake earlier.
    pub fn notify_scheduled(&self) {
        self.scheduled.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn watch_scheduled(&self) -> watch::Receiver<u64> {
        self.scheduled.subscribe()
    }

    /// Cancellation was requested for a running task. In-process workers
    /// listen here so that a handler learns of it at once; remote workers
    /// learn it from their next heartbeat.
    pub fn notify_cancel(&self, id: Uuid) {
        let _ = self.cancels.send(id);
    }

    pub fn subscribe_cancels(&self) -> broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
    }
}
