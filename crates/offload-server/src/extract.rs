//! Request parsing with errors that name the field and the rule: JSON bodies
//! with a size limit, task ids in paths, and query strings that refuse
//! unknown parameters.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;

/// Past this many bytes an oversized body is no longer read; the
/// connection is closed instead.
const DRAIN_LIMIT: usize = 64 << 20;

/// A JSON body of at most the single-request limit (payload limit plus room
/// for the other fields).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// A JSON body of at most the batch limit (batch enqueue, ack).
#[derive(Debug)]
pub struct BatchBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_limited(req.into_body(), state.limits.body_bytes).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for BatchBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_limited(req.into_body(), state.limits.batch_body_bytes).await?;
        parse_json(&bytes).map(BatchBody)
    }
}

/// Reads a body of at most `limit` bytes. A longer one is read to its end
/// (up to [`DRAIN_LIMIT`]) and dropped before the 413 goes out: a client
/// still sending when the server closes would never see the answer.
async fn read_limited(mut body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let mut collected = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::invalid_json(format!("the request body could not be read: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            collected.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::too_large(format!(
            "the request body is over the limit of {limit} bytes"
        )));
    }
    Ok(collected.freeze())
}

/// Parses JSON, telling broken JSON (`invalid_json`) from JSON of the wrong
/// shape (`invalid_argument`, naming the field).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(ApiError::invalid_json(
                "the request body is empty; expected a JSON object",
            ));
        }
        // Every body of this API is an object; serde would also take an
        // array for a struct, and then name its fields by position.
        Some(b'{') => {}
        Some(_) if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() => {
            return Err(ApiError::invalid("body", "must be a JSON object"));
        }
        Some(_) => {}
    }
    // Tracking the path costs every field of every request; only a body
    // that fails needs it, so the path is found by parsing that one again.
    // Parsed from bytes, serde_json checks each string (each field name too)
    // for UTF-8 on its own; one check of the whole body is far cheaper.
    if let Ok(text) = std::str::from_utf8(bytes)
        && let Ok(value) = serde_json::from_str(text)
    {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = if path == "." { "body" } else { path.as_str() };
                ApiError::invalid(field, inner)
            }
            _ => ApiError::invalid_json(format!("the request body is not valid JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid_json(format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

pub fn task_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::invalid("id", format!("must be a task id (a UUID); got {raw:?}")))
}

/// A query string as pairs, refusing parameters outside `allowed`.
pub fn query_pairs(raw: Option<&str>, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    for (key, _) in &pairs {
        if !allowed.contains(&key.as_str()) {
            return Err(ApiError::invalid(
                key,
                format!("unknown query parameter; allowed: {}", allowed.join(", ")),
            ));
        }
    }
    Ok(pairs)
}

/// An integer query parameter within `min..=max`.
pub fn int_param(name: &str, value: &str, min: i64, max: i64) -> Result<i64, ApiError> {
    match value.parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(
            name,
            format!("must be an integer from {min} to {max}; got {value:?}"),
        )),
    }
}
