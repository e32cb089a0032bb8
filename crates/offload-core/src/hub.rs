//! How a store tells the rest of the process that something changed: task
//! events for streams and webhooks, and two wake-up signals for waiters
//! (workers long-polling for ready tasks, the promoter waiting for the next
//! `run_at`).
//!
//! Signals are counters in `watch` channels rather than notifications, so a
//! waiter that marks the counter seen *before* looking at the store can never
//! miss a change made while it looked.
//!
//! A watcher of one task, or of one owner's, queue's or type's tasks, gets
//! a channel of that one's own (`watch`), not the stream of every change:
//! a thousand people each watching their task's page, on one stream
//! filtered a thousand times, took a node's batch enqueues from 400,000 a
//! second to 3,500.
//!
//! Where nobody watches, stores build no events at all; a store that
//! commits changes unheard holds an [`Unheard`] pass until it has
//! published, and a watch that begins meanwhile waits for every such pass
//! to go. A watcher that then reads a task reads it as those changes left
//! it: without the wait, a task's page opened as its last change
//! committed read it before that commit, heard no event of it, and stayed
//! open past the task's end.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use serde::Serialize;
use tokio::sync::{Notify, broadcast, watch};

use uuid::Uuid;

use crate::Task;
use crate::readiness::{PAIRS_PER_SIGNAL, Readiness, ReadyLog, SignalPairs};

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
    watchers: Arc<Watchers>,
    ready: watch::Sender<u64>,
    /// What each ready signal is about, under the counter's value it took.
    ready_log: ReadyLog,
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
            watchers: Arc::new(Watchers {
                every: broadcast::channel(EVERY_CAPACITY).0,
                channels: Mutex::default(),
                tasks: AtomicUsize::new(0),
                groups: AtomicUsize::new(0),
                gate: Arc::default(),
            }),
            ready: watch::channel(0).0,
            ready_log: ReadyLog::default(),
            scheduled: watch::channel(0).0,
            cancels: broadcast::channel(1024).0,
        }
    }

    /// Whether anyone watches, for a change already committed: one who
    /// begins to watch later reads the task as it left it. A store about
    /// to commit asks [`Hub::unheard`] instead.
    pub fn has_listeners(&self) -> bool {
        self.watchers.gate.listening()
    }

    /// Where nobody watches, a pass to build no events for the changes the
    /// caller is about to commit; `None` where anyone does, and the caller
    /// then builds every change's event, not only a watched task's (a
    /// watch that began during the change may read its task before the
    /// commit). The caller holds the pass until it has published what it
    /// committed, or given it up: a watch that begins meanwhile waits for
    /// it.
    pub fn unheard(&self) -> Option<Unheard> {
        self.watchers.gate.pass().then(|| Unheard {
            gate: Arc::clone(&self.watchers.gate),
        })
    }

    /// The event of a change the caller is about to commit, or `None`
    /// once `unheard` holds a pass: where nobody watches, it takes one
    /// (see [`Hub::unheard`]), which the caller keeps with the commit's
    /// effects and drops once they are published.
    pub fn event_of(
        &self,
        unheard: &mut Option<Unheard>,
        kind: EventKind,
        task: &Task,
    ) -> Option<TaskEvent> {
        if unheard.is_some() {
            return None;
        }
        *unheard = self.unheard();
        unheard
            .is_none()
            .then(|| TaskEvent::new(kind, task.clone()))
    }

    /// Whether anyone may listen for task `id`'s events: yes while anyone
    /// watches every task or an owner, a queue or a type, as the task is
    /// not read to tell. For changes already committed (another node's,
    /// told of by notification), whose events a watch that begins later
    /// needs not: it reads the task as they left it.
    pub fn wants(&self, id: Uuid) -> bool {
        self.watchers.may_want(id)
    }

    pub fn publish(&self, event: TaskEvent) {
        self.watchers.send(event);
    }

    /// The events of what `interest` names, from now on, on a channel of
    /// its own: other tasks' changes neither wake the watcher nor crowd its
    /// own out of its channel. Returns once every change committed
    /// unheard before it began is published (see [`Hub::unheard`]): what
    /// the watcher reads then, it reads as those changes left it, and
    /// every later change it hears.
    pub async fn watch(&self, interest: Interest) -> Watch {
        let changes = {
            let mut channels = self.watchers.lock();
            let changes = channels.join(&self.watchers.every, &interest);
            self.watchers.count(&channels);
            changes
        };
        let watch = Watch {
            interest,
            changes,
            watchers: Arc::clone(&self.watchers),
        };
        // Counted before the wait, so that no pass is given after it; a
        // watch dropped while it waits is uncounted by its drop.
        self.watchers.gate.watch_began();
        self.watchers.gate.unheard_published().await;
        watch
    }

    /// Tasks of any queue and type may have become claimable.
    pub fn notify_ready(&self) {
        self.signal_ready(None);
    }

    /// Tasks of these (queue, type) pairs may have become claimable, and
    /// no others: waiting fetches that ask for none of them sleep on
    /// (see [`Readiness`]). Beyond [`PAIRS_PER_SIGNAL`] pairs it
    /// says anything may have.
    pub fn notify_ready_in<'a>(&self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let pairs: Vec<(Box<str>, Box<str>)> = pairs
            .into_iter()
            .take(PAIRS_PER_SIGNAL + 1)
            .map(|(queue, task_type)| (queue.into(), task_type.into()))
            .collect();
        match pairs.len() {
            0 => {}
            n if n > PAIRS_PER_SIGNAL => self.signal_ready(None),
            _ => self.signal_ready(Some(pairs.into())),
        }
    }

    /// Signals what `ready` says became claimable, if anything.
    pub fn notify_readiness(&self, ready: &Readiness) {
        match ready {
            Readiness::Nothing => {}
            Readiness::Of(pairs) => {
                self.notify_ready_in(pairs.iter().map(|(q, t)| (q.as_str(), t.as_str())));
            }
            Readiness::Anything => self.notify_ready(),
        }
    }

    fn signal_ready(&self, pairs: Option<SignalPairs>) {
        // Recorded inside the counter's change, so that the log's entries
        // follow the counter's values in order.
        self.ready.send_modify(|n| {
            *n = n.wrapping_add(1);
            self.ready_log.record(*n, pairs);
        });
    }

    /// What the ready signals say became claimable, read after the values
    /// of [`Hub::watch_ready`]'s counter.
    pub fn ready_log(&self) -> ReadyLog {
        self.ready_log.clone()
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

/// Every task's events buffered for a watcher of them all.
const EVERY_CAPACITY: usize = 4096;
/// A task's own events buffered for a watcher that has not read them
/// yet; one that falls further behind hears that it lagged.
const TASK_CAPACITY: usize = 64;
/// The same for the events of an owner's, a queue's or a type's tasks.
/// A channel holds its places from the start, a few dozen bytes each: a
/// thousand owners watched take some 50 MB.
const GROUP_CAPACITY: usize = 1024;

/// What a watcher wants to hear of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Every task's events.
    Every,
    /// One task's events.
    Task(Uuid),
    /// The events of the tasks of one owner, …
    Owner(String),
    /// … of one queue, …
    Queue(String),
    /// … or of one type.
    Type(String),
}

type Channel = broadcast::Sender<TaskEvent>;

/// The channels of what someone watches.
#[derive(Debug)]
struct Watchers {
    /// Every task's events.
    every: Channel,
    channels: Mutex<Channels>,
    /// How many tasks are watched, and how many owners, queues and types,
    /// read without the lock: where nobody watches, publishing takes none.
    tasks: AtomicUsize,
    groups: AtomicUsize,
    gate: Arc<Gate>,
}

/// How many watch, and how many changes are on their way unheard, in one
/// word: a pass is given only while nobody watches, and a watch counted
/// waits for the passes given before it.
#[derive(Debug, Default)]
struct Gate {
    /// Watches in the high 32 bits, passes held in the low 32.
    state: AtomicU64,
    /// Told when the last pass goes while anyone watches.
    published: Notify,
}

const ONE_WATCH: u64 = 1 << 32;
const PASSES: u64 = ONE_WATCH - 1;

impl Gate {
    fn listening(&self) -> bool {
        self.state.load(Ordering::Acquire) >= ONE_WATCH
    }

    /// Takes a pass if nobody watches.
    fn pass(&self) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                (state < ONE_WATCH).then_some(state + 1)
            })
            .is_ok()
    }

    fn pass_returned(&self) {
        let before = self.state.fetch_sub(1, Ordering::AcqRel);
        if before & PASSES == 1 && before >= ONE_WATCH {
            self.published.notify_waiters();
        }
    }

    fn watch_began(&self) {
        self.state.fetch_add(ONE_WATCH, Ordering::AcqRel);
    }

    fn watch_ended(&self) {
        self.state.fetch_sub(ONE_WATCH, Ordering::AcqRel);
    }

    /// Returns once no pass is held.
    async fn unheard_published(&self) {
        loop {
            let published = self.published.notified();
            tokio::pin!(published);
            // Registered before the look, so a pass returned between the
            // two still wakes it.
            published.as_mut().enable();
            if self.state.load(Ordering::Acquire) & PASSES == 0 {
                return;
            }
            published.await;
        }
    }
}

/// Held by a store from a change it built no event for, as nobody
/// watched, until it has published what it committed (see
/// [`Hub::unheard`]).
#[derive(Debug)]
pub struct Unheard {
    gate: Arc<Gate>,
}

impl Drop for Unheard {
    fn drop(&mut self) {
        self.gate.pass_returned();
    }
}

#[derive(Debug, Default)]
struct Channels {
    tasks: HashMap<Uuid, Channel>,
    owners: HashMap<String, Channel>,
    queues: HashMap<String, Channel>,
    types: HashMap<String, Channel>,
}

impl Channels {
    /// A receiver of `interest`'s channel, which it opens if none is.
    fn join(&mut self, every: &Channel, interest: &Interest) -> broadcast::Receiver<TaskEvent> {
        match interest {
            Interest::Every => every.subscribe(),
            Interest::Task(id) => join(&mut self.tasks, *id, TASK_CAPACITY),
            Interest::Owner(name) => join(&mut self.owners, name.clone(), GROUP_CAPACITY),
            Interest::Queue(name) => join(&mut self.queues, name.clone(), GROUP_CAPACITY),
            Interest::Type(name) => join(&mut self.types, name.clone(), GROUP_CAPACITY),
        }
    }

    /// Closes `interest`'s channel if the receiver that leaves is its last.
    fn leave(&mut self, interest: &Interest) {
        match interest {
            Interest::Every => {}
            Interest::Task(id) => leave(&mut self.tasks, id),
            Interest::Owner(name) => leave(&mut self.owners, name.as_str()),
            Interest::Queue(name) => leave(&mut self.queues, name.as_str()),
            Interest::Type(name) => leave(&mut self.types, name.as_str()),
        }
    }
}

fn join<K: Hash + Eq>(
    map: &mut HashMap<K, Channel>,
    key: K,
    capacity: usize,
) -> broadcast::Receiver<TaskEvent> {
    map.entry(key)
        .or_insert_with(|| broadcast::channel(capacity).0)
        .subscribe()
}

fn leave<K: Hash + Eq + Borrow<Q>, Q: Hash + Eq + ?Sized>(map: &mut HashMap<K, Channel>, key: &Q) {
    // Under the lock no watcher can come or go; the one that leaves is
    // still counted.
    if map
        .get(key)
        .is_some_and(|channel| channel.receiver_count() <= 1)
    {
        map.remove(key);
    }
}

impl Watchers {
    fn lock(&self) -> MutexGuard<'_, Channels> {
        // The maps stay whole whatever panicked while they were held.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, channels: &Channels) {
        self.tasks.store(channels.tasks.len(), Ordering::Release);
        let groups = channels.owners.len() + channels.queues.len() + channels.types.len();
        self.groups.store(groups, Ordering::Release);
    }

    fn may_want(&self, id: Uuid) -> bool {
        self.every.receiver_count() > 0
            || self.groups.load(Ordering::Acquire) > 0
            || (self.tasks.load(Ordering::Acquire) > 0 && self.lock().tasks.contains_key(&id))
    }

    fn send(&self, event: TaskEvent) {
        let (tasks, groups) = (
            self.tasks.load(Ordering::Acquire),
            self.groups.load(Ordering::Acquire),
        );
        if tasks > 0 || groups > 0 {
            self.send_to_watchers(&event, tasks, groups);
        }
        // No receiver is not an error: events are for whoever listens now.
        let _ = self.every.send(event);
    }

    fn send_to_watchers(&self, event: &TaskEvent, tasks: usize, groups: usize) {
        let channels = self.lock();
        let task = &event.task;
        let mut heard_by = [None; 4];
        if tasks > 0 {
            heard_by[0] = channels.tasks.get(&task.id);
        }
        if groups > 0 {
            heard_by[1] = task
                .owner
                .as_ref()
                .and_then(|owner| channels.owners.get(owner));
            heard_by[2] = channels.queues.get(&task.queue);
            heard_by[3] = channels.types.get(&task.task_type);
        }
        for channel in heard_by.into_iter().flatten() {
            let _ = channel.send(event.clone());
        }
    }
}

/// The events of what a watcher asked for, for as long as this lives.
#[derive(Debug)]
pub struct Watch {
    interest: Interest,
    changes: broadcast::Receiver<TaskEvent>,
    watchers: Arc<Watchers>,
}

impl Watch {
    /// The next event; `Lagged` if the watcher fell behind by more than
    /// its channel holds.
    pub async fn recv(&mut self) -> Result<TaskEvent, broadcast::error::RecvError> {
        self.changes.recv().await
    }

    /// The next event if one has come.
    pub fn try_recv(&mut self) -> Result<TaskEvent, broadcast::error::TryRecvError> {
        self.changes.try_recv()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut channels = self.watchers.lock();
        channels.leave(&self.interest);
        self.watchers.count(&channels);
        self.watchers.gate.watch_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, NewTask, Position, Timestamp};

    #[tokio::test]
    async fn an_event_is_written_as_json_once_for_every_receiver() {
        let spec = NewTask::new("report")
            .payload(&serde_json::json!({"rows": [1, 2], "note": "a\nb"}))
            .unwrap()
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        let task = Task::new_from_spec(Uuid::now_v7(), spec, Timestamp::from_millis(5), false);
        let hub = Hub::new();
        let (mut first, mut second) = (
            hub.watch(Interest::Every).await,
            hub.watch(Interest::Every).await,
        );
        hub.publish(TaskEvent::new(EventKind::State, task.clone()));
        let (a, b) = (first.try_recv().unwrap(), second.try_recv().unwrap());
        let written = a.json_line().unwrap();
        assert_eq!(written, serde_json::to_string(&task).unwrap());
        assert!(
            std::ptr::eq(written, b.json_line().unwrap()),
            "the second receiver reads the text the first one wrote"
        );
    }

    fn task_of(task_type: &str) -> Task {
        let spec = NewTask::new(task_type)
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        Task::new_from_spec(Uuid::now_v7(), spec, Timestamp::from_millis(5), false)
    }

    #[tokio::test]
    async fn a_task_watch_hears_its_task_alone_however_many_others_change() {
        let hub = Hub::new();
        let (watched, other) = (task_of("watched"), task_of("other"));
        let mut watch = hub.watch(Interest::Task(watched.id)).await;
        assert!(hub.wants(watched.id));
        assert!(!hub.wants(other.id), "nobody watches every task");
        // More changes than the stream of every change holds, and than
        // the watch's own channel does.
        for _ in 0..10_000 {
            hub.publish(TaskEvent::new(EventKind::State, other.clone()));
        }
        hub.publish(TaskEvent::new(EventKind::Progress, watched.clone()));
        let heard = watch
            .recv()
            .await
            .expect("no lag: other tasks' changes never reach it");
        assert_eq!(
            (heard.kind, heard.task.id),
            (EventKind::Progress, watched.id)
        );
    }

    #[tokio::test]
    async fn a_task_is_wanted_until_its_last_watch_goes() {
        let hub = Hub::new();
        let task = task_of("watched");
        let first = hub.watch(Interest::Task(task.id)).await;
        let second = hub.watch(Interest::Task(task.id)).await;
        drop(first);
        assert!(hub.wants(task.id), "the second watch still wants it");
        drop(second);
        assert!(!hub.wants(task.id));
        assert!(!hub.has_listeners());
        let third = hub.watch(Interest::Task(task.id)).await;
        assert!(hub.has_listeners(), "a task watched again is wanted again");
        drop(third);
        assert!(!hub.has_listeners());
        let _all = hub.watch(Interest::Every).await;
        assert!(hub.wants(task.id), "a stream of every change wants each");
    }

    #[tokio::test]
    async fn a_watch_begins_once_the_changes_committed_unheard_are_published() {
        let hub = Hub::new();
        let (first, second) = (hub.unheard(), hub.unheard());
        assert!(first.is_some() && second.is_some(), "nobody watches");
        let mut watch = std::pin::pin!(hub.watch(Interest::Task(task_of("t").id)));
        assert!(futures_poll_once(watch.as_mut()).is_none());
        assert!(hub.unheard().is_none(), "a watch waiting is a watch");
        drop(first);
        assert!(
            futures_poll_once(watch.as_mut()).is_none(),
            "a pass is still held"
        );
        drop(second);
        let watch = futures_poll_once(watch.as_mut()).expect("every pass returned");
        assert!(hub.unheard().is_none());
        drop(watch);
        assert!(hub.unheard().is_some(), "the watch gone, nobody listens");
    }

    #[tokio::test]
    async fn a_watch_dropped_while_it_waits_is_no_longer_counted() {
        let hub = Hub::new();
        let pass = hub.unheard();
        let mut watch = Box::pin(hub.watch(Interest::Owner("alice".into())));
        assert!(futures_poll_once(watch.as_mut()).is_none());
        drop(watch);
        drop(pass);
        assert!(!hub.has_listeners());
        assert!(hub.unheard().is_some());
    }

    /// Polls `future` once, as a runtime would when first woken.
    fn futures_poll_once<F: std::future::Future>(
        future: std::pin::Pin<&mut F>,
    ) -> Option<F::Output> {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.poll(&mut context) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
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
