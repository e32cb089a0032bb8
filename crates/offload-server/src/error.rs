//! HTTP errors. [`ApiError`] is the only way a handler fails, and
//! `From<offload_core::Error>` below is the one place a store error becomes
//! an HTTP status: nothing else in the server chooses statuses for them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use offload_api::{ErrorBody, ErrorDetail};
use offload_core::LogThrottle;

use crate::json::Json;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    /// A bad field; the message reads `field: rule`.
    pub fn invalid(field: &str, rule: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("{field}: {rule}"),
        )
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code.to_owned(),
            message: self.message.clone(),
        }
    }
}

impl From<offload_core::Error> for ApiError {
    fn from(e: offload_core::Error) -> Self {
        use offload_core::Error::*;
        let (status, code) = match &e {
            InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "invalid_argument"),
            PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            log_failure(self.status, &self.message);
        }
        let retry_soon = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.detail(),
            }),
        )
            .into_response();
        if retry_soon {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Logs a request that failed on the node's side. A node that cannot write
/// fails every request alike, so such lines are throttled, 503s apart from
/// 500s so that a flood of the one does not hide the other; every failure
/// is still counted in `offload_http_request_duration_seconds` by status,
/// and `not_logged` says how many went unlogged since the line before.
fn log_failure(status: StatusCode, message: &str) {
    static UNAVAILABLE: LogThrottle = LogThrottle::new();
    static OTHER: LogThrottle = LogThrottle::new();
    let throttle = if status == StatusCode::SERVICE_UNAVAILABLE {
        &UNAVAILABLE
    } else {
        &OTHER
    };
    if let Some(not_logged) = throttle.admit() {
        tracing::error!(%status, message, not_logged, "request failed");
    }
}
