//! How nodes hear of each other: one LISTEN connection per node, and the
//! leader lease for the background duties.
//!
//! Notifications are hints. A lost one costs at most the engine's fallback
//! poll (one second); nothing waits on a notification alone.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use offload_core::{EventKind, State, Task, TaskEvent, Timestamp};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::connect::Connector;
use crate::session::on_session;
use crate::{Node, PgStore, ids};

/// Pause before listening again after the connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// How often a follower tries to become leader, and a leader checks that its
/// lock connection is alive.
const LEADER_CHECK: Duration = Duration::from_secs(1);
/// How long connecting and saying LISTEN may take.
const LISTEN_CONNECT: Duration = Duration::from_secs(5);

/// Turns notifications into signals on this node's hub. Every `keepalive`
/// the node notifies itself, so that its connection is never quiet for
/// long; one that carries nothing for three of them is taken for dead
/// (`PgOptions::listener_keepalive`) and replaced.
pub(crate) async fn listen(
    node: Arc<Node>,
    store: Weak<PgStore>,
    pool: PgPool,
    connector: Connector,
    keepalive: Duration,
    stop: CancellationToken,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    let mut listening = Some(listening);
    let mut streamed = Streamed::default();
    tokio::spawn(send_keepalives(
        Arc::clone(&node),
        pool,
        keepalive,
        stop.clone(),
    ));
    let silence = keepalive * 3;
    loop {
        // Each listener has a pool of its own, of one connection: a
        // listener dropped says UNLISTEN and waits for the answer before it
        // lets go of its connection, and on a connection gone silent that
        // is until the kernel gives up on it, a quarter of an hour. From
        // the store's pool, each such wait would hold one of the
        // operations' places.
        let own = connector
            .pool()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(LISTEN_CONNECT)
            .connect_lazy_with(connector.options.clone());
        let started = async {
            let mut listener = PgListener::connect_with(&own).await?;
            listener.ignore_pool_close_event(true);
            listener.listen(&node.channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match tokio::time::timeout(LISTEN_CONNECT, started).await {
            Ok(Ok(listener)) => listener,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {LISTEN_CONNECT:?}"),
                };
                tracing::warn!(%error, "cannot listen for notifications; trying again");
                if pause(&stop).await {
                    return;
                }
                continue;
            }
        };
        // Anything may have happened while nobody listened.
        node.hub.notify_ready();
        node.hub.notify_scheduled();
        if let Some(listening) = listening.take() {
            let _ = listening.send(());
        }
        loop {
            let notification = tokio::select! {
                n = tokio::time::timeout(silence, listener.try_recv()) => n,
                _ = stop.cancelled() => return,
            };
            let Ok(notification) = notification else {
                tracing::warn!(
                    ?silence,
                    "the notification connection carried nothing, not even this node's keep-alives; connecting again"
                );
                break;
            };
            match notification {
                Ok(Some(n)) => {
                    // The store is gone: so is the reason to listen.
                    let Some(store) = store.upgrade() else { return };
                    handle(&node, &store, &mut streamed, n.payload()).await;
                }
                // The connection dropped; try_recv reconnects next time, and
                // what was missed is covered by waking everyone.
                Ok(None) => {
                    node.hub.notify_ready();
                    node.hub.notify_scheduled();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the notification connection");
                    break;
                }
            }
        }
        if pause(&stop).await {
            return;
        }
    }
}

/// Notifies this node's channel every `keepalive`; see [`listen`]. Sent
/// through the pool and not awaited by the listener, which must not stop
/// reading while a send waits.
async fn send_keepalives(
    node: Arc<Node>,
    pool: PgPool,
    keepalive: Duration,
    stop: CancellationToken,
) {
    let payload = format!("k{}", node.id);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(keepalive) => {}
            _ = stop.cancelled() => return,
        }
        let sent = on_session!(&pool, keepalive, |conn| sqlx::query(
            crate::sql::NOTIFY_KEEPALIVE
        )
        .bind(&node.channel)
        .bind(&payload)
        .execute(conn)
        .await?);
        // A send that fails or hangs is the listener's to notice: nothing
        // arrives.
        if let Err(e) = sent {
            tracing::debug!(error = %e, "sending a keep-alive notification failed");
        }
    }
}

async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(RECONNECT_PAUSE) => false,
        _ = stop.cancelled() => true,
    }
}

/// A ready notification, `<node>` or `<node>|<queue> <type>,…`: passed
/// on when another node's, or unsigned (sent by a node older than the
/// signature); this node's own were announced at its commit. One whose
/// pairs do not read as such (sent by a later version) says anything.
fn ready(node: &Node, signed: &str) {
    let (origin, pairs) = match signed.split_once('|') {
        Some((origin, pairs)) => (origin, Some(pairs)),
        None => (signed, None),
    };
    if origin == node.id {
        return;
    }
    let pairs: Option<Vec<(&str, &str)>> =
        pairs.and_then(|pairs| pairs.split(',').map(|pair| pair.split_once(' ')).collect());
    match pairs {
        Some(pairs) if !pairs.is_empty() => node.hub.notify_ready_in(pairs),
        _ => node.hub.notify_ready(),
    }
}

async fn handle(node: &Node, store: &PgStore, streamed: &mut Streamed, payload: &str) {
    match payload.as_bytes().first() {
        Some(b'r') => ready(node, &payload[1..]),
        Some(b's') if payload[1..] != *node.id => node.hub.notify_scheduled(),
        Some(b'c') => {
            if let Ok(id) = Uuid::parse_str(&payload[1..]) {
                node.hub.notify_cancel(id);
            }
        }
        Some(b'e') => {
            let Some((origin, changes)) = payload[1..].split_once('|') else {
                return;
            };
            // This node announced its own changes when it committed them.
            if origin == node.id || !node.hub.has_listeners() {
                return;
            }
            let mut changed = changed_tasks(changes);
            // Read only what someone here watches: a task's page open on
            // this node does not make it read every task the others change.
            changed.retain(|(id, _)| node.hub.wants(*id));
            if !changed.is_empty() {
                stream_changes(node, store, streamed, changed).await;
            }
        }
        // A node's keep-alive (`k`): arriving is all it is for.
        _ => {}
    }
}

/// Each task a notification names once, in the order named, with the
/// kind of event it calls for: a state change if any of its changes was
/// one (that event carries the progress too).
fn changed_tasks(changes: &str) -> Vec<(Uuid, EventKind)> {
    let mut kinds: HashMap<Uuid, EventKind> = HashMap::new();
    let mut order = Vec::new();
    for change in changes.split(',') {
        let kind = if change.starts_with('p') {
            EventKind::Progress
        } else {
            EventKind::State
        };
        let Ok(id) = Uuid::parse_str(change.get(1..).unwrap_or("")) else {
            continue;
        };
        match kinds.get_mut(&id) {
            Some(known) => {
                if kind == EventKind::State {
                    *known = EventKind::State;
                }
            }
            None => {
                kinds.insert(id, kind);
                order.push(id);
            }
        }
    }
    order.into_iter().map(|id| (id, kinds[&id])).collect()
}

/// Tasks read per statement when streaming another node's changes: a
/// batch's notification names up to ~180, and each may carry a payload
/// of up to the payload limit.
const STREAM_READ_CHUNK: usize = 32;

/// Reads the tasks another node changed, as they are now, and streams
/// each that this node has not streamed as it is now already.
async fn stream_changes(
    node: &Node,
    store: &PgStore,
    streamed: &mut Streamed,
    changed: Vec<(Uuid, EventKind)>,
) {
    let read = on_session!(store, |conn| {
        for chunk in changed.chunks(STREAM_READ_CHUNK) {
            let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
            let mut found = ids::find(conn, &ids, ids::Lock::None).await?;
            for (id, kind) in chunk {
                let Some(stored) = found.remove(id) else {
                    continue;
                };
                if streamed.is_news(&stored.task, *kind) {
                    node.hub.publish(TaskEvent::new(*kind, stored.task));
                }
            }
        }
    });
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read other nodes' changes to stream them");
    }
}

/// The tasks this node streamed last, heard of from other nodes, as
/// they were when streamed. A task is read when its notification comes,
/// not when it changed: a task enqueued, claimed and completed before the
/// first of its three notifications reaches this node is read completed
/// three times, and would be streamed as completed three times.
#[derive(Default)]
struct Streamed {
    versions: HashMap<Uuid, Streaming>,
    /// The ids of `versions`, oldest first, to forget the oldest by.
    order: VecDeque<Uuid>,
}

struct Streaming {
    version: Version,
    /// Whether a state event carried this version. One that only a
    /// progress event carried is streamed again by the state event a
    /// later notification asks for.
    as_state: bool,
}

/// What tells one stored version of a task from another: every change
/// that is streamed moves one of them. `updated_at` alone is not enough,
/// as two changes may fall in one millisecond.
#[derive(PartialEq, Eq)]
struct Version {
    updated_at: Timestamp,
    state: State,
    attempt: u32,
    progress_at: Option<Timestamp>,
    cancel_requested: bool,
}

impl Version {
    fn of(task: &Task) -> Self {
        Version {
            updated_at: task.updated_at,
            state: task.state,
            attempt: task.attempt,
            progress_at: task.progress.as_ref().map(|p| p.updated_at),
            cancel_requested: task.cancel_requested,
        }
    }
}

/// Tasks [`Streamed`] remembers: a few hundred kilobytes; a task changed
/// again after ten thousand others is streamed again, at worst twice.
const STREAMED_REMEMBERED: usize = 10_000;

impl Streamed {
    /// Whether an event of `kind` for `task` as it is now tells a
    /// subscriber anything it was not told, and if so remembers it.
    fn is_news(&mut self, task: &Task, kind: EventKind) -> bool {
        let version = Version::of(task);
        let as_state = kind == EventKind::State;
        if let Some(known) = self.versions.get_mut(&task.id) {
            if known.version == version && (known.as_state || !as_state) {
                return false;
            }
            *known = Streaming { version, as_state };
            return true;
        }
        if self.order.len() >= STREAMED_REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.versions.remove(&oldest);
        }
        self.order.push_back(task.id);
        self.versions
            .insert(task.id, Streaming { version, as_state });
        true
    }
}

/// Holds the leader lock (a session advisory lock) while this node can,
/// and tries to take it while it cannot. A leader whose connection dies
/// loses the lock with it, and another node takes over within a second.
pub(crate) async fn lead(node: Arc<Node>, connector: Connector, stop: CancellationToken) {
    let mut held: Option<PgConnection> = None;
    loop {
        match held.as_mut() {
            None => {
                if let Ok(mut conn) = connector.connect().await {
                    let won: Result<bool, _> =
                        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                            .bind(node.lock_key)
                            .fetch_one(&mut conn)
                            .await;
                    if let Ok(true) = won {
                        tracing::info!(node = %node.id, "this node now runs the background duties");
                        node.leader.store(true, Ordering::SeqCst);
                        held = Some(conn);
                    }
                }
            }
            Some(conn) => {
                if conn.ping().await.is_err() {
                    tracing::warn!(node = %node.id, "lost the leader lock's connection");
                    node.leader.store(false, Ordering::SeqCst);
                    held = None;
                    continue;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LEADER_CHECK) => {}
            _ = stop.cancelled() => {
                node.leader.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_core::{Limits, NewTask, Position};

    fn pending_task() -> Task {
        let spec = NewTask::new("t")
            .validate(&Limits::default(), Position::Alone)
            .unwrap();
        Task::new_from_spec(Uuid::now_v7(), spec, Timestamp::from_millis(1_000), false)
    }

    #[test]
    fn a_notification_names_each_task_once_and_a_state_change_wins() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let changes = format!("p{a},s{b},s{a},p{b},p{a},nonsense,s");
        assert_eq!(
            changed_tasks(&changes),
            vec![(a, EventKind::State), (b, EventKind::State)]
        );
        assert_eq!(
            changed_tasks(&format!("p{a}")),
            vec![(a, EventKind::Progress)]
        );
    }

    #[test]
    fn a_task_read_as_already_streamed_is_not_streamed_again() {
        let mut streamed = Streamed::default();
        let mut task = pending_task();
        assert!(streamed.is_news(&task, EventKind::State));
        // Three notifications of one task, each read after its last change.
        task.claim("w", Duration::from_secs(30), Timestamp::from_millis(2_000))
            .unwrap();
        task.complete("w", None, Timestamp::from_millis(3_000))
            .unwrap();
        assert!(streamed.is_news(&task, EventKind::State));
        assert!(!streamed.is_news(&task, EventKind::State));
        assert!(!streamed.is_news(&task, EventKind::Progress));
    }

    #[test]
    fn a_progress_event_is_followed_by_the_state_event_of_the_same_version() {
        let mut streamed = Streamed::default();
        let mut task = pending_task();
        task.claim("w", Duration::from_secs(30), Timestamp::from_millis(2_000))
            .unwrap();
        assert!(streamed.is_news(&task, EventKind::Progress));
        assert!(streamed.is_news(&task, EventKind::State));
        assert!(!streamed.is_news(&task, EventKind::State));
    }

    #[test]
    fn changes_within_one_millisecond_are_each_news() {
        let mut streamed = Streamed::default();
        let mut task = pending_task();
        let now = Timestamp::from_millis(2_000);
        task.claim("w", Duration::from_secs(30), now).unwrap();
        assert!(streamed.is_news(&task, EventKind::State));
        task.heartbeat(
            "w",
            Duration::from_secs(30),
            Some((Some(50.0), None, None)),
            now,
        )
        .unwrap();
        assert!(streamed.is_news(&task, EventKind::Progress));
        task.complete("w", None, now).unwrap();
        assert!(streamed.is_news(&task, EventKind::State));
    }

    #[test]
    fn the_oldest_task_streamed_is_forgotten_past_the_bound() {
        let mut streamed = Streamed::default();
        let first = pending_task();
        assert!(streamed.is_news(&first, EventKind::State));
        for _ in 0..STREAMED_REMEMBERED {
            assert!(streamed.is_news(&pending_task(), EventKind::State));
        }
        assert_eq!(streamed.versions.len(), STREAMED_REMEMBERED);
        assert_eq!(streamed.order.len(), STREAMED_REMEMBERED);
        assert!(streamed.is_news(&first, EventKind::State), "forgotten");
    }
}
