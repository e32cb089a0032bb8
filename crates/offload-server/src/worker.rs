//! The worker protocol of SPEC §4.1: long-poll fetch, heartbeat, complete,
//! fail and batched ack.

use std::time::Duration;

use axum::extract::State;
use offload_api::{
    AckBody, AckResult, AckResults, AttemptErrorBody, CompleteBody, ErrorBody, FailBody,
    FetchRequest, HeartbeatBody, TaskList,
};
use offload_core::{
    Ack, ClaimRequest, Failure, HeartbeatAck, HeartbeatRequest, Task, validate_queue_name,
    validate_task_type, validate_worker_id,
};
use uuid::Uuid;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{AckBatchBody, JsonBody, PathParam, task_id};
use crate::json::{AckResultsJson, Json, TaskJson, TaskListJson};

pub(crate) const MAX_FETCH: i64 = 1000;
/// Names a fetch's `types` or `queues` may list. A worker lists the types
/// it has handlers for; past this it is a mistake or an attack, and
/// PostgreSQL reads a claim's candidates a type at a time.
pub(crate) const MAX_FETCH_NAMES: usize = 1000;
pub(crate) const MAX_WAIT_MS: i64 = 60_000;
pub(crate) const MAX_RETRY_IN_SECS: i64 = offload_core::MAX_RETRY_DELAY.as_secs() as i64;

fn in_range(field: &str, value: Option<i64>, min: i64, max: i64, default: i64) -> ApiResult<i64> {
    match value {
        None => Ok(default),
        Some(v) if (min..=max).contains(&v) => Ok(v),
        Some(v) => Err(ApiError::invalid(
            field,
            format!("must be {min} to {max}; got {v}"),
        )),
    }
}

fn lease(state: &AppState, lease_secs: Option<i64>) -> ApiResult<Duration> {
    let default = state.default_lease.as_secs() as i64;
    let secs = in_range(
        "lease_secs",
        lease_secs,
        1,
        offload_core::MAX_LEASE_SECS as i64,
        default,
    )?;
    Ok(Duration::from_secs(secs as u64))
}

#[utoipa::path(post, path = "/v1/fetch", tag = "workers", request_body = FetchRequest,
    responses((status = 200, description = "Claimed tasks, each with its lease", body = TaskList), (status = 400, body = ErrorBody)))]
pub async fn fetch(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<FetchRequest>,
) -> ApiResult<TaskListJson> {
    validate_worker_id(&body.worker_id)?;
    let types = fetch_names("types", body.types, |at, name| validate_task_type(at, name))?;
    let queues = fetch_names("queues", body.queues, |at, name| {
        validate_queue_name(at, name)
    })?;
    let request = ClaimRequest {
        worker_id: body.worker_id,
        types,
        queues,
        limit: in_range("limit", body.limit, 1, MAX_FETCH, 1)? as usize,
        lease: lease(&state, body.lease_secs)?,
    };
    let wait = Duration::from_millis(in_range("wait_ms", body.wait_ms, 0, MAX_WAIT_MS, 0)? as u64);
    let tasks = state.engine.fetch(&request, wait, &state.stop).await?;
    state.metrics.claimed(&tasks);
    Ok(TaskListJson(tasks))
}

/// A fetch's `types` or `queues`, each name checked, each once.
fn fetch_names(
    field: &str,
    names: Option<Vec<String>>,
    validate: impl Fn(std::fmt::Arguments<'_>, &str) -> offload_core::Result<()>,
) -> ApiResult<Vec<String>> {
    let mut names = names.unwrap_or_default();
    if names.len() > MAX_FETCH_NAMES {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_FETCH_NAMES} names; got {}", names.len()),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        validate(format_args!("{field}[{i}]"), name)?;
    }
    names.sort_unstable();
    names.dedup();
    Ok(names)
}

#[utoipa::path(post, path = "/v1/tasks/{id}/heartbeat", tag = "workers", params(("id" = String, Path)), request_body = HeartbeatBody,
    responses((status = 200, body = HeartbeatAck), (status = 404, body = ErrorBody), (status = 409, description = "The worker no longer holds the task", body = ErrorBody)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    JsonBody(body): JsonBody<HeartbeatBody>,
) -> ApiResult<Json<HeartbeatAck>> {
    validate_worker_id(&body.worker_id)?;
    let request = HeartbeatRequest {
        id: task_id(&id)?,
        worker_id: body.worker_id,
        progress: body.progress,
        lease: lease(&state, body.lease_secs)?,
    };
    Ok(Json(state.store().heartbeat(request).await?))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/complete", tag = "workers", params(("id" = String, Path)), request_body = CompleteBody,
    responses((status = 200, body = Task), (status = 404, body = ErrorBody), (status = 409, description = "The worker no longer holds the task", body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn complete(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    JsonBody(body): JsonBody<CompleteBody>,
) -> ApiResult<TaskJson> {
    let ack = Ack::Complete {
        id: task_id(&id)?,
        result: body.result,
    };
    single_ack(&state, &body.worker_id, ack).await.map(TaskJson)
}

#[utoipa::path(post, path = "/v1/tasks/{id}/fail", tag = "workers", params(("id" = String, Path)), request_body = FailBody,
    responses((status = 200, body = Task), (status = 404, body = ErrorBody), (status = 409, description = "The worker no longer holds the task", body = ErrorBody)))]
pub async fn fail(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    JsonBody(body): JsonBody<FailBody>,
) -> ApiResult<TaskJson> {
    let failure = failure("", body.error, body.retry, body.retry_in_secs)?;
    let ack = Ack::Fail {
        id: task_id(&id)?,
        failure,
    };
    single_ack(&state, &body.worker_id, ack).await.map(TaskJson)
}

async fn single_ack(state: &AppState, worker_id: &str, ack: Ack) -> ApiResult<Task> {
    validate_worker_id(worker_id)?;
    let mut outcomes = state.store().ack(worker_id, vec![ack]).await?;
    let task = outcomes.pop().ok_or_else(|| {
        ApiError::from(offload_core::Error::Storage("ack answered nothing".into()))
    })??;
    state.metrics.attempts_ended([&task]);
    Ok(task)
}

fn failure(
    prefix: &str,
    error: AttemptErrorBody,
    retry: Option<bool>,
    retry_in_secs: Option<i64>,
) -> ApiResult<Failure> {
    let retry_in = match retry_in_secs {
        None => None,
        Some(s) if (0..=MAX_RETRY_IN_SECS).contains(&s) => Some(Duration::from_secs(s as u64)),
        Some(s) => {
            return Err(ApiError::invalid(
                &format!("{prefix}retry_in_secs"),
                format!("must be 0 to {MAX_RETRY_IN_SECS}; got {s}"),
            ));
        }
    };
    if retry == Some(false) && retry_in.is_some() {
        return Err(ApiError::invalid(
            &format!("{prefix}retry_in_secs"),
            "must not be given with retry: false, which fails the task at once".to_owned(),
        ));
    }
    Ok(Failure {
        message: error.message,
        kind: error.kind.unwrap_or_default(),
        retry,
        retry_in,
    })
}

#[utoipa::path(post, path = "/v1/ack", tag = "workers", request_body = AckBody,
    responses((status = 200, description = "One result per ack: completed ones, then failed ones", body = AckResults), (status = 400, body = ErrorBody)))]
pub async fn ack(
    State(state): State<AppState>,
    AckBatchBody(body): AckBatchBody,
) -> ApiResult<AckResultsJson> {
    validate_worker_id(&body.worker_id)?;
    let mut acks = Vec::with_capacity(body.completed.len() + body.failed.len());
    for done in body.completed {
        acks.push(Ack::Complete {
            id: done.id,
            result: done.result,
        });
    }
    for (i, failed) in body.failed.into_iter().enumerate() {
        let failure = failure(
            &format!("failed[{i}]."),
            failed.error,
            failed.retry,
            failed.retry_in_secs,
        )?;
        acks.push(Ack::Fail {
            id: failed.id,
            failure,
        });
    }
    let ids: Vec<Uuid> = acks.iter().map(Ack::id).collect();
    let outcomes = state.store().ack(&body.worker_id, acks).await?;
    state
        .metrics
        .attempts_ended(outcomes.iter().filter_map(|outcome| outcome.as_ref().ok()));
    let results = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, outcome)| match outcome {
            Ok(_) => AckResult {
                id,
                ok: true,
                error: None,
            },
            Err(e) => AckResult {
                id,
                ok: false,
                error: Some(ApiError::from(e).detail()),
            },
        })
        .collect();
    Ok(AckResultsJson(AckResults { results }))
}
