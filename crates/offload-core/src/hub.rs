//! How a store tells the rest of the process that something changed: task
//! events for streams and webhooks, and two wake-up signals for waiters
//! (workers long-polling for ready tasks, the promoter waiting for the next
//! `run_at`).
//!
//! Signals are counters in `watch` channels rather than notifications, so a
//! waiter that marks the counter seen *before* looking at the store can never
//! miss a change made while it looked.

use std::sync::{Arc, OnceLock};

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
    /// The task's JSON line, written by the first stream that sends the event
    /// and shared by every other: each stream writing it for itself made
    /// the server's CPU grow by ~2 µs an event for each open stream.
    json: Arc<OnceLock<Result<Box<str>, Box<str>>>>,
}

impl TaskEvent {
    pub fn new(kind: EventKind, task: Task) -> Self {
        Self {
            kind,
            task: Arc::new(task),
            json: Arc::default(),
        }
    }

    /// The task as JSON on one line, as an event stream's `data:` field
    /// takes it; or why it could not be written. A payload, result or
    /// progress data is kept as its sender wrote it, line breaks included;
    /// JSON allows a raw line break only as whitespace between tokens (in a
    /// string it must be escaped), so each becomes a space and no value
    /// changes. Split across `data:` lines instead, a bare CR ended a line
    /// only for readers that follow the event-stream rules to the letter.
    pub fn json_line(&self) -> Result<&str, &str> {
        let written = self.json.get_or_init(|| {
            let mut out = Vec::with_capacity(512);
            self.task
                .write_json(&mut out)
                .map(|()| {
                    for byte in &mut out {
                        if matches!(*byte, b'\r' | b'\n') {
                            *byte = b' ';
                        }
                    }
                })
                .map_err(|e| e.to_string())
                .and_then(|()| String::from_utf8(out).map_err(|e| e.to_string()))
                .map(String::into_boxed_str)
                .map_err(String::into_boxed_str)
        });
        written.as_deref().map_err(|e| &**e)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, NewTask, Position, Timestamp};

    #[test]
    fn an_event_is_written_as_json_once_for_every_receiver() {
        let spec = NewTask::new("report")
            .payload(&serde_json::json!({"rows": [1, 2], "note": "a\nb"}))
            .unwrap()
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        let task = Task::new_from_spec(Uuid::now_v7(), spec, Timestamp::from_millis(5), false);
        let hub = Hub::new();
        let (mut first, mut second) = (hub.subscribe(), hub.subscribe());
        hub.publish(TaskEvent::new(EventKind::State, task.clone()));
        let (a, b) = (first.try_recv().unwrap(), second.try_recv().unwrap());
        let written = a.json_line().unwrap();
        assert_eq!(written, serde_json::to_string(&task).unwrap());
        assert!(
            std::ptr::eq(written, b.json_line().unwrap()),
            "the second receiver reads the text the first one wrote"
        );
    }

    #[test]
    fn an_event_of_a_payload_written_over_lines_is_one_line_of_the_same_json() {
        let pretty = "{\r\n  \"note\": \"a\\r\\nb\",\n  \"rows\": [1,\r2]\n}";
        let spec = NewTask {
            payload: Some(serde_json::value::RawValue::from_string(pretty.into()).unwrap()),
            ..NewTask::new("report")
        }
        .validate(&Limits::default(), Position::Alone)
        .unwrap();
        let task = Task::new_from_spec(Uuid::now_v7(), spec, Timestamp::from_millis(5), false);
        let event = TaskEvent::new(EventKind::State, task);
        let line = event.json_line().unwrap();
        assert!(!line.contains(['\r', '\n']), "{line:?}");
        let read: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            read["payload"],
            serde_json::json!({"note": "a\r\nb", "rows": [1, 2]})
        );
    }
}
