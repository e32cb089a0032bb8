//! The JSON bodies of Offload's HTTP API (SPEC §4) that are not the task
//! model itself: requests of the worker protocol, batch envelopes, error
//! bodies. The server parses and the client sends exactly these types, so
//! the two cannot drift apart; each derives its OpenAPI schema.
//!
//! Request types reject unknown fields, as SPEC §4 requires.

use offload_core::{Counts, FailureKind, Json, NewTask, ProgressUpdate, QueueInfo, Task};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// One of `invalid_json`, `invalid_argument`, `unauthenticated`,
    /// `forbidden`, `not_found`, `conflict`, `request_timeout` (a body that
    /// stopped arriving), `payload_too_large`, `rate_limited`, `unavailable`,
    /// `internal`.
    pub code: String,
    pub message: String,
}

/// `POST /v1/tasks/batch`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchEnqueue {
    pub tasks: Vec<NewTask>,
}

/// The tasks of a batch enqueue, in request order.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<Task>,
}

/// The ids of a batch enqueue's tasks, in request order: its answer when
/// the request says `Prefer: return=minimal`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchIds {
    pub ids: Vec<Uuid>,
}

/// `DELETE /v1/tasks`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub deleted: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueInfo>,
}

/// `PATCH /v1/queues/{name}`. `concurrency: null` removes the limit; an
/// absent field leaves it as it is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueUpdate {
    #[serde(
        default,
        deserialize_with = "offload_core::whole_number::present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<u32>)]
    pub concurrency: Option<Option<i64>>,
}

/// `POST /v1/fetch`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    pub worker_id: String,
    /// Task types the worker handles, at most 1000; absent or empty means
    /// any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    /// Queues served, at most 1000; absent or empty means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<String>>,
    /// 1–1000, default 1. A claim also ends after the task that brings its
    /// tasks' payloads to 8 MiB (at least one task), so an answer may hold
    /// fewer while more are ready.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "offload_core::whole_number::option"
    )]
    pub limit: Option<i64>,
    /// 0–60000, default 0: how long to wait for a task if none is ready.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "offload_core::whole_number::option"
    )]
    pub wait_ms: Option<i64>,
    /// 1–3600, default 60.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "offload_core::whole_number::option"
    )]
    pub lease_secs: Option<i64>,
}

/// `POST /v1/tasks/{id}/heartbeat`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    pub worker_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressUpdate>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "offload_core::whole_number::option"
    )]
    pub lease_secs: Option<i64>,
}

/// `POST /v1/tasks/{id}/complete`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    pub worker_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    pub result: Option<Json>,
}

/// What went wrong in an attempt.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "an object {message, kind?}")]
pub struct AttemptErrorBody {
    pub message: String,
    /// `error` (default) or `timeout` when the worker stopped the attempt
    /// because it ran past `timeout_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FailureKind>,
}

/// `POST /v1/tasks/{id}/fail`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailBody {
    pub worker_id: String,
    pub error: AttemptErrorBody,
    /// `false` fails the task at once, whatever attempts are left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<bool>,
    /// Retry after this many seconds instead of the backoff.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "offload_core::whole_number::option"
    )]
    pub retry_in_secs: Option<i64>,
}

/// `POST /v1/ack`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    pub worker_id: String,
    #[serde(default)]
    pub completed: Vec<AckCompleted>,
    #[serde(default)]
    pub failed: Vec<AckFailed>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "an object {id, result?}")]
pub struct AckCompleted {
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    pub result: Option<Json>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "an object {id, error: {message}, retry?, retry_in_secs?}"
)]
pub struct AckFailed {
    pub id: Uuid,
    pub error: AttemptErrorBody,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<bool>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "offload_core::whole_number::option"
    )]
    pub retry_in_secs: Option<i64>,
}

/// One answer per acknowledgement: completed ones first, then failed ones,
/// each in request order.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AckResults {
    pub results: Vec<AckResult>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AckResult {
    pub id: Uuid,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// `GET /health`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` when the database cannot be reached.
    pub status: String,
    pub database: String,
    /// `durable` or `relaxed` (SPEC §1.6).
    pub durability: String,
    pub counts: Counts,
    /// Running tasks whose lease ran out over a few seconds ago and that
    /// recovery has not yet retried; above zero only if something is wrong.
    pub stuck: u64,
}

// ---- the acks' JSON, written by hand --------------------------------------
//
// A busy worker acks every task it runs, and the server answers each: serde
// wrote a task's `{"id":"…"}` through its string escaping one byte at a time
// (~750 instructions a task on each side, callgrind). These write the same
// bytes as `serde_json::to_writer`; the tests hold the two together, so a
// field added above must be added here.

/// Writes `id` as a JSON string; a hyphenated UUID needs no escaping.
fn write_id(out: &mut Vec<u8>, id: &Uuid) {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.push(b'"');
    out.extend_from_slice(id.hyphenated().encode_lower(&mut text).as_bytes());
    out.push(b'"');
}

/// The items of a list `text` holds, each `{"id":"…"` and then `close`,
/// made by `make` from their ids in order; `None` if one is not in that
/// form or the list does not end where the last one does.
fn read_id_items<T>(mut text: &str, close: &str, make: impl Fn(Uuid) -> T) -> Option<Vec<T>> {
    const OPEN: &str = "{\"id\":\"";
    const ID_LEN: usize = uuid::fmt::Hyphenated::LENGTH;
    let item_len = OPEN.len() + ID_LEN + 1 + close.len() + 1;
    let mut items = Vec::with_capacity(text.len() / item_len + 1);
    while !text.is_empty() {
        if !items.is_empty() {
            text = text.strip_prefix(',')?;
        }
        let rest = text.strip_prefix(OPEN)?;
        let id = Uuid::try_parse_ascii(rest.as_bytes().get(..ID_LEN)?).ok()?;
        text = rest.get(ID_LEN..)?.strip_prefix('"')?.strip_prefix(close)?;
        items.push(make(id));
    }
    Some(items)
}

impl AckBody {
    /// The body as [`Self::write_json`] writes it for completions alone,
    /// none with a result: the form a worker's batch of acks mostly takes.
    /// `None` for any other, which serde_json reads. Read by serde_json, it
    /// cost the server's request thread ~830 instructions a task acked
    /// 500 at a time (callgrind, bench/HISTORY.md).
    pub fn read_json(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("{\"worker_id\":\"")?;
        let end = rest.find(|c: char| c == '"' || c == '\\' || c < ' ')?;
        let worker_id = rest[..end].to_owned();
        let listed = rest[end..]
            .strip_prefix("\",\"completed\":[")?
            .strip_suffix("],\"failed\":[]}")?;
        let completed = read_id_items(listed, "}", |id| AckCompleted { id, result: None })?;
        Some(Self {
            worker_id,
            completed,
            failed: Vec::new(),
        })
    }

    /// Appends the body's JSON to `out`: the bytes serde_json writes.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"worker_id\":");
        serde_json::to_writer(&mut *out, &self.worker_id)?;
        out.extend_from_slice(b",\"completed\":[");
        for (i, done) in self.completed.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"id\":");
            write_id(out, &done.id);
            if let Some(result) = &done.result {
                out.extend_from_slice(b",\"result\":");
                out.extend_from_slice(result.get().as_bytes());
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"],\"failed\":");
        serde_json::to_writer(&mut *out, &self.failed)?;
        out.push(b'}');
        Ok(())
    }
}

impl AckResults {
    /// The answer as [`Self::write_json`] writes it where every ack went
    /// through; `None` for any other, which serde_json reads. Read by
    /// serde_json, it cost a worker acking hundreds of tasks at a time
    /// ~1,000 instructions a task, 43% of its acker's (callgrind,
    /// bench/HISTORY.md).
    pub fn read_json(text: &str) -> Option<Self> {
        let listed = text.strip_prefix("{\"results\":[")?.strip_suffix("]}")?;
        let results = read_id_items(listed, ",\"ok\":true}", |id| AckResult {
            id,
            ok: true,
            error: None,
        })?;
        Some(Self { results })
    }

    /// Appends the answer's JSON to `out`: the bytes serde_json writes.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        out.extend_from_slice(b"{\"results\":[");
        for (i, result) in self.results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"id\":");
            write_id(out, &result.id);
            out.extend_from_slice(if result.ok {
                b",\"ok\":true"
            } else {
                b",\"ok\":false"
            });
            if let Some(error) = &result.error {
                out.extend_from_slice(b",\"error\":");
                serde_json::to_writer(&mut *out, error)?;
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_as_serde<T: Serialize>(value: &T, write: impl Fn(&T, &mut Vec<u8>)) {
        let mut ours = Vec::new();
        write(value, &mut ours);
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            serde_json::to_string(value).unwrap()
        );
    }

    #[test]
    fn acks_are_written_as_serde_writes_them() {
        let result = serde_json::value::RawValue::from_string(r#"{"n": [1, "two"]}"#.into());
        let body = AckBody {
            worker_id: "w \"1\"\n".into(),
            completed: vec![
                AckCompleted {
                    id: Uuid::now_v7(),
                    result: None,
                },
                AckCompleted {
                    id: Uuid::max(),
                    result: Some(result.unwrap()),
                },
            ],
            failed: vec![AckFailed {
                id: Uuid::nil(),
                error: serde_json::from_str(r#"{"message": "no \"luck\""}"#).unwrap(),
                retry: Some(false),
                retry_in_secs: None,
            }],
        };
        same_as_serde(&body, |b, out| b.write_json(out).unwrap());
        same_as_serde(&AckBody::default(), |b, out| b.write_json(out).unwrap());

        let results = AckResults {
            results: vec![
                AckResult {
                    id: Uuid::now_v7(),
                    ok: true,
                    error: None,
                },
                AckResult {
                    id: Uuid::nil(),
                    ok: false,
                    error: Some(
                        serde_json::from_str(r#"{"code": "conflict", "message": "not \"held\""}"#)
                            .unwrap(),
                    ),
                },
            ],
        };
        same_as_serde(&results, |r, out| r.write_json(out).unwrap());
        same_as_serde(&AckResults { results: vec![] }, |r, out| {
            r.write_json(out).unwrap()
        });
    }

    fn written<T>(value: &T, write: impl Fn(&T, &mut Vec<u8>) -> serde_json::Result<()>) -> String {
        let mut out = Vec::new();
        write(value, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn completions(worker_id: &str, n: u128) -> AckBody {
        AckBody {
            worker_id: worker_id.into(),
            completed: (1..=n)
                .map(|i| AckCompleted {
                    id: Uuid::from_u128(i << 64 | i),
                    result: None,
                })
                .collect(),
            failed: Vec::new(),
        }
    }

    /// An ack body as the server took it: worker, ids, results, failures.
    fn summary(body: &AckBody) -> String {
        serde_json::to_string(body).unwrap()
    }

    #[test]
    fn completions_alone_are_read_in_the_form_written_and_nothing_else() {
        for body in [
            completions("w", 0),
            completions("w-1", 1),
            completions("bench-http-0-7", 3),
        ] {
            let text = written(&body, AckBody::write_json);
            let read = AckBody::read_json(&text).expect("the written form is read");
            assert_eq!(summary(&read), summary(&body));
            let by_serde: AckBody = serde_json::from_str(&text).unwrap();
            assert_eq!(summary(&read), summary(&by_serde));
        }
        let text = written(&completions("w", 2), AckBody::write_json);
        let mut with_result = completions("w", 2);
        with_result.completed[1].result =
            Some(serde_json::value::RawValue::from_string("1".into()).unwrap());
        let mut failed = completions("w", 1);
        failed.failed.push(AckFailed {
            id: Uuid::nil(),
            error: serde_json::from_str(r#"{"message": "no"}"#).unwrap(),
            retry: None,
            retry_in_secs: None,
        });
        let others = [
            written(&with_result, AckBody::write_json),
            written(&failed, AckBody::write_json),
            written(&completions("w \"1\"", 1), AckBody::write_json),
            written(&completions("w\\1", 1), AckBody::write_json),
            text.replacen("},{", "},,{", 1),
            text.replacen("},{", "}{", 1),
            text.replacen("\"}", "\",\"extra\":1}", 1),
            text.replacen(":[{", ": [{", 1),
            text.replacen("-", "", 1),
            format!("{text} "),
            text[..text.len() - 1].to_owned(),
        ];
        for other in others {
            assert!(AckBody::read_json(&other).is_none(), "read {other}");
        }
    }

    #[test]
    fn answers_where_every_ack_went_through_are_read_in_the_form_written_alone() {
        let ok = |i: u128| AckResult {
            id: Uuid::from_u128(i),
            ok: true,
            error: None,
        };
        for results in [vec![], vec![ok(1)], vec![ok(1), ok(2), ok(3)]] {
            let answer = AckResults { results };
            let text = written(&answer, AckResults::write_json);
            let read = AckResults::read_json(&text).expect("the written form is read");
            assert_eq!(
                serde_json::to_string(&read).unwrap(),
                serde_json::to_string(&answer).unwrap()
            );
        }
        let refused = AckResults {
            results: vec![
                ok(1),
                AckResult {
                    id: Uuid::nil(),
                    ok: false,
                    error: Some(ErrorDetail {
                        code: "not_found".into(),
                        message: "gone".into(),
                    }),
                },
            ],
        };
        let text = written(
            &AckResults {
                results: vec![ok(1), ok(2)],
            },
            AckResults::write_json,
        );
        let others = [
            written(&refused, AckResults::write_json),
            text.replacen("},{", "},,{", 1),
            text.replacen("true", "false", 1),
            text.replacen("]}", ",]}", 1),
            text[..text.len() - 1].to_owned(),
        ];
        for other in others {
            assert!(AckResults::read_json(&other).is_none(), "read {other}");
        }
    }
}
