//! How nodes hear of each other: one LISTEN connection per node, and the
//! leader lease for the background duties.
//!
//! Notifications are hints. A lost one costs at most the engine's fallback
//! poll (one second); nothing waits on a notification alone.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::sync::Weak;

use offload_core::{EventKind, Store, TaskEvent};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Node, PgStore};

/// Pause before listening again after the connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// How often a follower tries to become leader, and a leader checks that its
/// lock connection is alive.
const LEADER_CHECK: Duration = Duration::from_secs(1);

/// Turns notifications into signals on this node's hub.
pub(crate) async fn listen(
    node: Arc<Node>,
    store: Weak<PgStore>,
    pool: PgPool,
    stop: CancellationToken,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    let mut listening = Some(listening);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for notifications; trying again");
                if pause(&stop).await {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener.listen(&node.channel).await {
            tracing::warn!(error = %e, "LISTEN failed; trying again");
            if pause(&stop).await {
                return;
            }
            continue;
        }
        // Anything may have happened while nobody listened.
        node.hub.notify_ready();
        node.hub.notify_scheduled();
        if let Some(listening) = listening.take() {
            let _ = listening.send(());
        }
        loop {
            let notification = tokio::select! {
                n = listener.try_recv() => n,
                _ = stop.cancelled() => return,
            };
            match notification {
                Ok(Some(n)) => {
                    // The store is gone: so is the reason to listen.
                    let Some(store) = store.upgrade() else { return };
                    handle(&node, &*store, n.payload()).await;
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

async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(RECONNECT_PAUSE) => false,
        _ = stop.cancelled() => true,
    }
}

async fn handle(node: &Node, store: &dyn Store, payload: &str) {
    match payload.as_bytes().first() {
        Some(b'r') => node.hub.notify_ready(),
        Some(b's') => node.hub.notify_scheduled(),
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
            for change in changes.split(',') {
                let kind = if change.starts_with('p') {
                    EventKind::Progress
                } else {
                    EventKind::State
                };
                let Ok(id) = Uuid::parse_str(change.get(1..).unwrap_or("")) else {
                    continue;
                };
                if let Ok(Some(task)) = store.get(id).await {
                    node.hub.publish(TaskEvent {
                        kind,
                        task: Arc::new(task),
                    });
                }
            }
        }
        _ => {}
    }
}

/// Holds the leader lock (a session advisory lock) while this node can,
/// and tries to take it while it cannot. A leader whose connection dies
/// loses the lock with it, and another node takes over within a second.
pub(crate) async fn lead(node: Arc<Node>, options: PgConnectOptions, stop: CancellationToken) {
    let mut held: Option<PgConnection> = None;
    loop {
        match held.as_mut() {
            None => {
                if let Ok(mut conn) = PgConnection::connect_with(&options).await {
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
