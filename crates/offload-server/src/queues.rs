//! `/v1/queues…`: list queues, pause and resume them, limit their
//! concurrency.

use axum::extract::State;
use offload_api::{ErrorBody, QueueList, QueueUpdate};
use offload_core::{QueueInfo, QueuePatch};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, NoBody, PathParam};
use crate::json::Json;

pub(crate) const MAX_CONCURRENCY: i64 = crate::config::MAX_QUEUE_CONCURRENCY as i64;

#[utoipa::path(get, path = "/v1/queues", tag = "queues", responses((status = 200, body = QueueList)))]
pub async fn list(State(state): State<AppState>) -> ApiResult<Json<QueueList>> {
    Ok(Json(QueueList {
        queues: state.store().queues().await?,
    }))
}

#[utoipa::path(post, path = "/v1/queues/{name}/pause", tag = "queues", params(("name" = String, Path)),
    responses((status = 200, body = QueueInfo), (status = 400, body = ErrorBody)))]
pub async fn pause(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    _: NoBody,
) -> ApiResult<Json<QueueInfo>> {
    let patch = QueuePatch {
        paused: Some(true),
        ..QueuePatch::default()
    };
    Ok(Json(state.store().update_queue(&name, patch).await?))
}

#[utoipa::path(post, path = "/v1/queues/{name}/resume", tag = "queues", params(("name" = String, Path)),
    responses((status = 200, body = QueueInfo), (status = 400, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    _: NoBody,
) -> ApiResult<Json<QueueInfo>> {
    let patch = QueuePatch {
        paused: Some(false),
        ..QueuePatch::default()
    };
    Ok(Json(state.store().update_queue(&name, patch).await?))
}

#[utoipa::path(patch, path = "/v1/queues/{name}", tag = "queues", params(("name" = String, Path)), request_body = QueueUpdate,
    responses((status = 200, body = QueueInfo), (status = 400, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    JsonBody(update): JsonBody<QueueUpdate>,
) -> ApiResult<Json<QueueInfo>> {
    let concurrency = match update.concurrency {
        None => None,
        Some(None) => Some(None),
        Some(Some(n)) if (1..=MAX_CONCURRENCY).contains(&n) => Some(Some(n as u32)),
        Some(Some(n)) => {
            return Err(ApiError::invalid(
                "concurrency",
                format!("must be 1 to {MAX_CONCURRENCY}, or null for no limit; got {n}"),
            ));
        }
    };
    let patch = QueuePatch {
        paused: None,
        concurrency,
    };
    Ok(Json(state.store().update_queue(&name, patch).await?))
}
