//! Request parsing with errors that name the field and the rule: JSON bodies
//! with a size limit, task ids in paths, and query strings that refuse
//! unknown parameters.

use std::time::Duration;

use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use http_body_util::BodyExt;
use offload_api::AckBody;
use offload_core::NewTask;
use offload_engine::BatchSink;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor,
};
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;

/// Past this many bytes an oversized body is no longer read; the
/// connection is closed instead.
const DRAIN_LIMIT: usize = 64 << 20;

/// The slowest a body may arrive, on average, once its first stall period
/// has passed. Without it a body that sent a byte just inside each stall
/// period held its handler and its socket for as long as its sender
/// liked: one byte every 74 s was never given up. A megabyte may take 17
/// minutes.
const MIN_BODY_BYTES_PER_SEC: u32 = 1024;

/// A JSON body of at most the single-request limit (payload limit plus room
/// for the other fields).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// An ack's body, of at most the batch limit: read first in the form
/// Offload's workers send ([`AckBody::read_json`]), then by serde_json.
#[derive(Debug)]
pub struct AckBatchBody(pub AckBody);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_limited(req, state.limits.body_bytes, state.limits.stall).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

impl FromRequest<AppState> for AckBatchBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_limited(req, state.limits.batch_body_bytes, state.limits.stall).await?;
        if let Some(body) = std::str::from_utf8(&bytes)
            .ok()
            .and_then(AckBody::read_json)
        {
            return Ok(AckBatchBody(body));
        }
        parse_json(&bytes).map(AckBatchBody)
    }
}

/// The body of a route that takes none (cancel, retry, delete, pause,
/// resume): empty, `null` or `{}`. Anything else is refused rather than
/// ignored, so that a field the caller meant to count (a reason, a force
/// flag) is not dropped without a word.
#[derive(Debug)]
pub struct NoBody;

impl FromRequest<AppState> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_limited(req, state.limits.body_bytes, state.limits.stall).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(NoBody);
        }
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Null) => Ok(NoBody),
            Ok(serde_json::Value::Object(fields)) => match fields.keys().next() {
                None => Ok(NoBody),
                Some(field) => Err(ApiError::invalid(
                    field,
                    "unknown field; this route takes no body",
                )),
            },
            Ok(_) => Err(ApiError::invalid_json(
                "this route takes no body; send none, {} or null",
            )),
            Err(e) => Err(ApiError::invalid_json(format!(
                "the request body is not JSON ({e}); this route takes no body"
            ))),
        }
    }
}

/// The bytes of a body of at most the batch limit, for a handler that reads
/// them itself.
#[derive(Debug)]
pub struct RawBatchBody(pub bytes::Bytes);

impl FromRequest<AppState> for RawBatchBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        read_limited(req, state.limits.batch_body_bytes, state.limits.stall)
            .await
            .map(RawBatchBody)
    }
}

/// Reads a batch enqueue's body, `{"tasks": [...]}`, handing each task to
/// `sink` as soon as it is read, so that the store writes the first ones
/// while the rest are read. `false` when the body is anything else or the
/// sink stopped taking tasks; the caller then reads it with [`parse_json`],
/// whose error names the field and the rule.
pub fn read_batch_streamed(bytes: &[u8], sink: &mut BatchSink<'_>) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    if text.trim_start().as_bytes().first() != Some(&b'{') {
        return false;
    }
    let mut de = serde_json::Deserializer::from_str(text);
    BatchSeed(sink).deserialize(&mut de).is_ok() && de.end().is_ok()
}

/// `{"tasks": [...]}` and no other field, as `BatchEnqueue` takes it.
struct BatchSeed<'s, 'a>(&'s mut BatchSink<'a>);

impl<'de> DeserializeSeed<'de> for BatchSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a batch of tasks")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let mut tasks_read = false;
        while let Some(key) = map.next_key::<&'de str>()? {
            if key != "tasks" || tasks_read {
                return Err(de::Error::custom("not the only field, `tasks`"));
            }
            map.next_value_seed(TasksSeed(&mut *self.0))?;
            tasks_read = true;
        }
        if tasks_read {
            Ok(())
        } else {
            Err(de::Error::missing_field("tasks"))
        }
    }
}

/// The array of tasks, each pushed into the sink as it is read.
struct TasksSeed<'s, 'a>(&'s mut BatchSink<'a>);

impl<'de> DeserializeSeed<'de> for TasksSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for TasksSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of tasks")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while let Some(task) = seq.next_element::<NewTask>()? {
            if !self.0.push(task) {
                return Err(de::Error::custom("the batch was abandoned"));
            }
        }
        Ok(())
    }
}

/// The body of `req`, refused past `limit` bytes. A longer one is read to
/// its end (up to [`DRAIN_LIMIT`]) and dropped before the 413 goes out: a
/// client still sending when the server closes would never see the answer.
/// A compressed body is refused by name: read as JSON it would fail as "not
/// valid JSON", which sends its sender looking in the wrong place. A body
/// that goes `stall` without a byte is given up (408), or a client that
/// stopped sending would hold its handler for good; so is one that, after
/// its first `stall`, has sent less than [`MIN_BODY_BYTES_PER_SEC`] a
/// second since.
async fn read_limited(
    req: Request,
    limit: usize,
    stall: Duration,
) -> Result<bytes::Bytes, ApiError> {
    if let Some(encoding) = req.headers().get(axum::http::header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(ApiError::invalid(
            "content-encoding",
            format!(
                "{:?} is not accepted; send the body uncompressed",
                String::from_utf8_lossy(encoding.as_bytes())
            ),
        ));
    }
    let mut body = req.into_body();
    let mut collected = bytes::BytesMut::new();
    let mut seen = 0usize;
    let started = tokio::time::Instant::now();
    loop {
        let due = started
            + stall
            + Duration::from_secs_f64(seen as f64 / f64::from(MIN_BODY_BYTES_PER_SEC));
        let wait = stall.min(due.saturating_duration_since(tokio::time::Instant::now()));
        let Ok(frame) = tokio::time::timeout(wait, body.frame()).await else {
            let message = if wait == stall {
                format!(
                    "the request body stopped arriving: no byte for {} s",
                    stall.as_secs()
                )
            } else {
                format!(
                    "the request body arrives too slowly: {seen} bytes in {:.0} s; after its \
                     first {} s a body must arrive at {MIN_BODY_BYTES_PER_SEC} bytes a second \
                     or faster",
                    started.elapsed().as_secs_f64(),
                    stall.as_secs()
                )
            };
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                message,
            ));
        };
        let Some(frame) = frame else {
            break;
        };
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
        Some(_) => {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                    Ok(_) => ApiError::invalid("body", "must be a JSON object"),
                    Err(e) => {
                        ApiError::invalid_json(format!("the request body is not valid JSON: {e}"))
                    }
                },
            );
        }
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
            serde_json::error::Category::Data => match missing_field(&inner) {
                // serde says which field is missing in its message, not in
                // the path, which names the object that lacks it.
                Some(name) if path == "." => {
                    ApiError::invalid(&name, "required; the body lacks it")
                }
                Some(name) => {
                    ApiError::invalid(&format!("{path}.{name}"), "required; the object lacks it")
                }
                None => {
                    let field = if path == "." { "body" } else { path.as_str() };
                    ApiError::invalid(field, inner)
                }
            },
            _ => ApiError::invalid_json(format!("the request body is not valid JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid_json(format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

/// The field serde found missing, from its message (``missing field `type` at
/// line 1 column 2``): serde_json's error carries it in no other form.
fn missing_field(error: &serde_json::Error) -> Option<String> {
    let message = error.to_string();
    let name = message.strip_prefix("missing field `")?;
    name.split_once('`').map(|(name, _)| name.to_owned())
}

/// A `type` or `queue` filter. A name no task can carry is a mistake (a
/// stray space, a wrong separator) to point out, not a filter that
/// quietly matches nothing.
pub fn name_filter(key: &str, value: String) -> Result<String, ApiError> {
    if key == "type" {
        offload_core::validate_task_type(key, &value)?;
    } else {
        offload_core::validate_queue_name(key, &value)?;
    }
    Ok(value)
}

pub fn owner_filter(value: String) -> Result<String, ApiError> {
    offload_core::validate_owner("owner", &value)?;
    Ok(value)
}

/// The one parameter of a route's path (a task's id, a queue's name),
/// percent-decoded. axum's own `Path<String>` refused a segment that is
/// not UTF-8 once decoded (`/v1/tasks/%FF`) in plain text, outside the
/// error shape every other refusal has.
#[derive(Debug)]
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(param)) => Ok(PathParam(param)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => match e.kind() {
                ErrorKind::InvalidUtf8InPathParam { key } => Err(ApiError::invalid(
                    key,
                    "must be UTF-8 text once percent-decoded",
                )),
                _ => Err(path_refused(e.status(), e.body_text())),
            },
            Err(e) => Err(path_refused(e.status(), e.body_text())),
        }
    }
}

/// Any other refusal of a path's parameters: a route whose pattern and
/// handler disagree, the server's own fault.
fn path_refused(status: StatusCode, text: String) -> ApiError {
    let code = if status.is_server_error() {
        "internal"
    } else {
        "invalid_argument"
    };
    ApiError::new(status, code, text)
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
    for (i, (key, _)) in pairs.iter().enumerate() {
        if !allowed.contains(&key.as_str()) {
            return Err(ApiError::invalid(
                key,
                format!("unknown query parameter; allowed: {}", allowed.join(", ")),
            ));
        }
        // `type=a&type=b` reads as "a or b" to a person; a filter that kept
        // only the last one would answer a different question.
        if !REPEATABLE_PARAMS.contains(&key.as_str()) && pairs[..i].iter().any(|(k, _)| k == key) {
            return Err(ApiError::invalid(
                key,
                "given more than once; it takes one value",
            ));
        }
    }
    Ok(pairs)
}

/// Query parameters that may come more than once: each `state` adds states
/// (as does `state=a,b`), each `label` one more label to match.
const REPEATABLE_PARAMS: &[&str] = &["state", "label"];

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
