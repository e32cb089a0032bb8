//! `/v1/tasks…` and `/v1/stats`: enqueue, read, act on and clear tasks.

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use offload_api::{BatchEnqueue, BatchIds, Deleted, ErrorBody, TaskList};
use offload_core::{
    ClearRequest, ListQuery, MAX_LIST_LIMIT, NewTask, Stats, Task, TaskPage, Tentative, Timestamp,
};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{
    JsonBody, NoBody, PathParam, RawBatchBody, int_param, name_filter, owner_filter, parse_json,
    query_pairs, read_batch_streamed, task_id,
};
use crate::json::{Json, TaskJson, json_bytes, task_bytes, task_list_json};

#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", request_body = NewTask,
    responses(
        (status = 201, description = "Created", body = Task),
        (status = 200, description = "An active task already holds the unique key", body = Task),
        (status = 400, description = "Refused: a field breaks its rule (named in the message), or `depends_on` names no task", body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn enqueue(
    State(state): State<AppState>,
    JsonBody(task): JsonBody<NewTask>,
) -> ApiResult<(StatusCode, TaskJson)> {
    let (task, created) = state.engine.enqueue(task).await?;
    if created {
        state.metrics.enqueued([&task]);
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, TaskJson(task)))
}

#[utoipa::path(post, path = "/v1/tasks/batch", tag = "tasks", request_body = BatchEnqueue,
    params(("Prefer" = Option<String>, Header, description = "`return=minimal`: answer with the tasks' ids only")),
    responses((status = 201, description = "The tasks, or with `Prefer: return=minimal` their ids (`BatchIds`)", body = TaskList),
        (status = 400, description = "Refused: a field breaks its rule (named in the message), or `depends_on` names no task", body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn enqueue_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBatchBody(body): RawBatchBody,
) -> ApiResult<Response> {
    let streamed = state
        .engine
        .enqueue_batch_streamed(|sink| read_batch_streamed(&body, sink))
        .await;
    let Tentative {
        value: answers,
        durable,
    } = match streamed {
        Some(answers) => answers?,
        // Nothing was stored; the plain way finds what is wrong and says so.
        None => {
            let batch: BatchEnqueue = parse_json(&body)?;
            if batch.tasks.is_empty() {
                return Err(ApiError::invalid(
                    "tasks",
                    "must hold 1 to 10000 tasks; got none",
                ));
            }
            Tentative::settled(state.engine.enqueue_batch(batch.tasks).await?)
        }
    };
    // Written while the store makes the batch durable (~560 bytes a task),
    // and given only once it is.
    let response = if prefers_minimal_return(&headers) {
        let ids = answers.iter().map(|(task, _)| task.id).collect();
        (
            StatusCode::CREATED,
            [(PREFERENCE_APPLIED, "return=minimal")],
            Json(BatchIds { ids }),
        )
            .into_response()
    } else {
        (
            StatusCode::CREATED,
            task_list_json(answers.iter().map(|(task, _)| task)),
        )
            .into_response()
    };
    durable.await?;
    state.metrics.enqueued(
        answers
            .iter()
            .filter(|(_, created)| *created)
            .map(|(task, _)| task),
    );
    Ok(response)
}

const PREFER: HeaderName = HeaderName::from_static("prefer");
const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// Whether a `Prefer` header (RFC 7240) asks for `return=minimal`: a
/// bulk loader seldom wants its payloads sent back, ~560 bytes a task.
fn prefers_minimal_return(headers: &HeaderMap) -> bool {
    headers
        .get_all(PREFER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|preference| preference.split(';').next())
        .filter_map(|token| token.split_once('='))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("return")
                && value
                    .trim()
                    .trim_matches('"')
                    .eq_ignore_ascii_case("minimal")
        })
}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path, description = "Task id")),
    responses((status = 200, body = Task), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, description = "The node holds as many unread answers as it allows (unread_answers_limit_bytes); retry", body = ErrorBody)))]
pub async fn get(State(state): State<AppState>, PathParam(id): PathParam) -> ApiResult<Response> {
    let id = task_id(&id)?;
    match state.store().get(id).await? {
        Some(task) => state.unread.answer(task_bytes(&task)?),
        None => Err(ApiError::not_found(format!("task {id} not found"))),
    }
}

/// Room a page of a list takes before it is read, at most: its tasks'
/// payloads, results and progress data ([`offload_core::PAGE_BYTES`]) and
/// the rest of their fields. A page past what it reserved (one of large
/// tasks) takes what more it needs once it is written.
const PAGE_ANSWER_BYTES: usize = offload_core::PAGE_BYTES + (1 << 20);
/// Room reserved for each task a page may hold, up to [`PAGE_ANSWER_BYTES`]:
/// a short page of small tasks reserves little, and goes out while larger
/// pages wait to be read.
const TASK_ANSWER_BYTES: usize = 16 << 10;

const LIST_PARAMS: &[&str] = &[
    "state",
    "type",
    "queue",
    "owner",
    "label",
    "created_after",
    "created_before",
    "limit",
    "cursor",
];

#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    params(
        ("state" = Option<String>, Query, description = "Comma-separated states"),
        ("type" = Option<String>, Query), ("queue" = Option<String>, Query), ("owner" = Option<String>, Query),
        ("label" = Option<String>, Query, description = "key:value; may repeat"),
        ("created_after" = Option<String>, Query, description = "RFC 3339"),
        ("created_before" = Option<String>, Query, description = "RFC 3339"),
        ("limit" = Option<u32>, Query, description = "1–1000, default 50. A page also ends after the task that brings its tasks' payloads, results and progress data to 8 MiB (at least one task a page), with next_cursor set"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page")),
    responses((status = 200, body = TaskPage), (status = 400, body = ErrorBody), (status = 503, description = "The node holds as many unread answers as it allows (unread_answers_limit_bytes); retry", body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    let mut query = ListQuery {
        limit: 50,
        ..ListQuery::default()
    };
    for (key, value) in query_pairs(raw.as_deref(), LIST_PARAMS)? {
        match key.as_str() {
            "state" => query.states.extend(parse_states("state", &value)?),
            "type" => query.task_type = Some(name_filter(&key, value)?),
            "queue" => query.queue = Some(name_filter(&key, value)?),
            "owner" => query.owner = Some(owner_filter(value)?),
            "label" => {
                let (k, v) = value.split_once(':').ok_or_else(|| {
                    ApiError::invalid("label", format!("must be key:value; got {value:?}"))
                })?;
                // What no task's labels can hold, no filter can match.
                offload_core::validate_label_key("label", k)?;
                offload_core::no_nul("label", v)?;
                if v.chars().count() > offload_core::MAX_LABEL_VALUE_CHARS {
                    return Err(ApiError::invalid(
                        "label",
                        format!(
                            "values must be at most {} characters",
                            offload_core::MAX_LABEL_VALUE_CHARS
                        ),
                    ));
                }
                query.labels.push((k.to_owned(), v.to_owned()));
            }
            "created_after" => query.created_after = Some(parse_time("created_after", &value)?),
            "created_before" => query.created_before = Some(parse_time("created_before", &value)?),
            "limit" => query.limit = int_param("limit", &value, 1, MAX_LIST_LIMIT as i64)? as usize,
            "cursor" => query.cursor = Some(value),
            _ => unreachable!("query_pairs admits only LIST_PARAMS"),
        }
    }
    let room = state
        .unread
        .reserve((query.limit * TASK_ANSWER_BYTES).min(PAGE_ANSWER_BYTES))?;
    let page = state.store().list(&query).await?;
    room.answer(json_bytes(&page)?)
}

fn parse_states(field: &str, value: &str) -> ApiResult<Vec<offload_core::State>> {
    // An empty piece is an error, not skipped: `state=` from a script's
    // unset variable would otherwise list, or clear, every state.
    value
        .split(',')
        .map(|s| s.parse().map_err(|e: String| ApiError::invalid(field, e)))
        .collect()
}

fn parse_time(field: &str, value: &str) -> ApiResult<Timestamp> {
    Timestamp::parse_given(value).map_err(|rule| ApiError::invalid(field, rule))
}

#[utoipa::path(get, path = "/v1/stats", tag = "tasks", responses((status = 200, body = Stats)))]
pub async fn stats(State(state): State<AppState>) -> ApiResult<Json<Stats>> {
    Ok(Json(state.store().stats().await?))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = Task), (status = 404, body = ErrorBody), (status = 409, description = "Already finished", body = ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    _: NoBody,
) -> ApiResult<TaskJson> {
    let task = state.store().cancel(task_id(&id)?).await?;
    Ok(TaskJson(task))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/retry", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = Task), (status = 404, body = ErrorBody), (status = 409, description = "Not failed or cancelled, or a dependency failed or was cancelled, or is gone from a task that never ran; a task whose dependencies are still active goes back to blocked", body = ErrorBody)))]
pub async fn retry(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    _: NoBody,
) -> ApiResult<TaskJson> {
    Ok(TaskJson(state.store().retry(task_id(&id)?).await?))
}

#[utoipa::path(delete, path = "/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody), (status = 409, description = "Still active", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    _: NoBody,
) -> ApiResult<StatusCode> {
    state.store().delete(task_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/tasks", tag = "tasks",
    params(
        ("state" = Option<String>, Query, description = "Comma-separated finished states; default all three"),
        ("older_than_secs" = Option<u64>, Query, description = "Only tasks finished at least this long ago")),
    responses((status = 200, body = Deleted), (status = 400, body = ErrorBody)))]
pub async fn clear(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Deleted>> {
    let mut request = ClearRequest {
        states: Vec::new(),
        older_than: None,
    };
    for (key, value) in query_pairs(raw.as_deref(), &["state", "older_than_secs"])? {
        match key.as_str() {
            "state" => request.states.extend(parse_states("state", &value)?),
            _ => {
                let secs = int_param("older_than_secs", &value, 0, i64::MAX)?;
                request.older_than = Some(Duration::from_secs(secs as u64));
            }
        }
    }
    if request.states.is_empty() {
        request.states = offload_core::State::FINISHED.to_vec();
    }
    let deleted = state.store().clear(&request).await?;
    Ok(Json(Deleted { deleted }))
}
