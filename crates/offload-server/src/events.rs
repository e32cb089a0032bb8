//! Server-sent events (SPEC §4.2): one task's changes, or every change.
//!
//! A stream watches before it reads the task's current state, so no
//! change can fall between the two: the watch begins once every change
//! committed unheard is published (`Hub::watch`), and every later change
//! is heard. A per-task stream ends after the task's
//! terminal event; every stream ends when the server stops, so that a
//! graceful shutdown never waits on one.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use futures::StreamExt;
use offload_core::{EventKind, Interest, TaskEvent};
use tokio::sync::broadcast::error::RecvError;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{PathParam, name_filter, owner_filter, query_pairs, task_id};

const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The SSE event for a change: one `data:` line, written once for every
/// stream that sends it (the first one writes it).
fn event(change: &TaskEvent) -> Event {
    let name = match change.kind {
        EventKind::State => "task.state",
        EventKind::Progress => "task.progress",
    };
    match change.json_line() {
        Ok(json) => Event::default().event(name).data(json),
        Err(e) => Event::default().comment(format!("could not encode the task: {e}")),
    }
}

fn is_terminal(change: &TaskEvent) -> bool {
    change.kind == EventKind::State && change.task.state.is_finished()
}

#[utoipa::path(get, path = "/v1/tasks/{id}/events", tag = "events", params(("id" = String, Path)),
    responses((status = 200, description = "text/event-stream of `task.state` and `task.progress` events, each carrying the task; ends after the terminal event", content_type = "text/event-stream"),
              (status = 404, body = offload_api::ErrorBody)))]
pub async fn task_events(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let id = task_id(&id)?;
    let mut changes = state.store().hub().watch(Interest::Task(id)).await;
    let current = state
        .store()
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("task {id} not found")))?;
    let store = state.store().clone();
    let stream = async_stream(move |tx| async move {
        let current = TaskEvent::new(EventKind::State, current);
        if tx.send(event(&current)).await.is_err() || is_terminal(&current) {
            return;
        }
        loop {
            let received = tokio::select! {
                received = changes.recv() => received,
                // The client left: stop now, not at the next change.
                _ = tx.closed() => return,
            };
            let change = match received {
                Ok(change) => change,
                // Missed events: the task as it is now stands in for them.
                Err(RecvError::Lagged(_)) => match store.get(id).await {
                    Ok(Some(task)) => TaskEvent::new(EventKind::State, task),
                    _ => return,
                },
                Err(RecvError::Closed) => return,
            };
            if tx.send(event(&change)).await.is_err() || is_terminal(&change) {
                return;
            }
        }
    });
    Ok(sse(stream, state.stop.clone()))
}

#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(("queue" = Option<String>, Query), ("type" = Option<String>, Query), ("owner" = Option<String>, Query)),
    responses((status = 200, description = "text/event-stream of every task change", content_type = "text/event-stream")))]
pub async fn all_events(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let (mut queue, mut task_type, mut owner) = (None, None, None);
    for (key, value) in query_pairs(raw.as_deref(), &["queue", "type", "owner"])? {
        match key.as_str() {
            "queue" => queue = Some(name_filter(&key, value)?),
            "type" => task_type = Some(name_filter(&key, value)?),
            _ => owner = Some(owner_filter(value)?),
        }
    }
    // A stream filtered by owner, type or queue is woken by that one's
    // changes alone; the rest of its filter is checked here.
    let hub = state.store().hub();
    let interest = match (&owner, &task_type, &queue) {
        (Some(owner), _, _) => Interest::Owner(owner.clone()),
        (None, Some(task_type), _) => Interest::Type(task_type.clone()),
        (None, None, Some(queue)) => Interest::Queue(queue.clone()),
        (None, None, None) => Interest::Every,
    };
    let mut changes = hub.watch(interest).await;
    let stream = async_stream(move |tx| async move {
        loop {
            let received = tokio::select! {
                received = changes.recv() => received,
                _ = tx.closed() => return,
            };
            let next = match received {
                Ok(change) => {
                    let task = &change.task;
                    let wanted = queue.as_ref().is_none_or(|q| *q == task.queue)
                        && task_type.as_ref().is_none_or(|t| *t == task.task_type)
                        && owner
                            .as_ref()
                            .is_none_or(|o| task.owner.as_ref() == Some(o));
                    if !wanted {
                        continue;
                    }
                    event(&change)
                }
                Err(RecvError::Lagged(n)) => {
                    Event::default().comment(format!("{n} events were missed"))
                }
                Err(RecvError::Closed) => return,
            };
            if tx.send(next).await.is_err() {
                return;
            }
        }
    });
    Ok(sse(stream, state.stop.clone()))
}

fn sse(
    stream: impl Stream<Item = Event> + Send + 'static,
    stop: tokio_util::sync::CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = stream
        .take_until(async move { stop.cancelled().await })
        .map(Ok::<_, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// A stream fed by a producer task through a small channel; the producer
/// stops when the client goes away (its sends fail).
fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Event> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
