//! `/health`, `/metrics`, `/openapi.json`, and the answers for unknown
//! routes.

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use offload_api::Health;

use crate::AppState;
use crate::error::ApiError;
use crate::json::Json;

/// A running task whose lease ran out this long ago should have been
/// recovered; if it was not, recovery is not keeping up.
const STUCK_AFTER: Duration = Duration::from_secs(5);

#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, body = Health), (status = 503, description = "The database cannot be reached", body = Health)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let counts = state.store().totals().await.unwrap_or_default();
    let (status, database, stuck) = match state.store().count_stuck(STUCK_AFTER).await {
        Ok(stuck) => (StatusCode::OK, "ok".to_owned(), stuck),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string(), 0),
    };
    let body = Health {
        status: if status == StatusCode::OK {
            "ok"
        } else {
            "unavailable"
        }
        .into(),
        database,
        durability: state.durability.into(),
        counts,
        stuck,
    };
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "This API's OpenAPI 3.1 description", content_type = "application/json")))]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi_json(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route; GET /openapi.json lists them all")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; GET /openapi.json lists them all",
    )
}
