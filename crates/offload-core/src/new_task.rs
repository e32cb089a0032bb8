//! Enqueue requests and their validation. A [`NewTask`] is what callers send;
//! a [`TaskSpec`] is one that passed every rule of SPEC §1, and is the only
//! form a store accepts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Error, Json, Result, Timestamp, json_null};

/// Explicit bounds on what callers may send.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest serialized payload, result or progress data, in bytes.
    pub max_payload_bytes: usize,
    /// Deepest nesting of arrays and objects in a payload, result or
    /// progress data. What is stored goes out to every reader of the task,
    /// inside an answer a few levels deep; a value too deep for a reader's
    /// parser breaks that reader's whole answer, not just the task. At 64
    /// an answer stays within the nesting common parsers take by default
    /// (Ruby's 100, serde_json's 128, Python's about 1,000).
    pub max_json_depth: usize,
    pub max_labels: usize,
    pub max_depends_on: usize,
    /// Largest batch accepted by enqueue and ack.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1 << 20,
            max_json_depth: 64,
            max_labels: 16,
            max_depends_on: 100,
            max_batch: 10_000,
        }
    }
}

impl Limits {
    /// A batch (enqueue, ack) holds at most `max_batch` items.
    pub fn check_batch(&self, field: &str, len: usize) -> Result<()> {
        if len > self.max_batch {
            return Err(Error::invalid(
                field,
                format!("at most {} per batch; got {len}", self.max_batch),
            ));
        }
        Ok(())
    }
}

pub const DEFAULT_QUEUE: &str = "default";
pub const DEFAULT_PRIORITY: u8 = 5;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
pub const DEFAULT_TIMEOUT_SECS: u32 = 1800;
/// The longest `timeout_secs` a task may have: a week.
pub const MAX_TIMEOUT_SECS: i64 = 7 * 24 * 3600;
/// The most attempts a task may be given (`max_attempts`).
pub const HIGHEST_MAX_ATTEMPTS: i64 = 1000;

/// The longest lease a worker may hold or ask for, in seconds (SPEC §1.3:
/// 1 to 3600); the server, its configuration, the worker runtime and
/// `offload work` all bound it by this.
pub const MAX_LEASE_SECS: u64 = 3600;
/// The longest `delay_secs`: ten years.
pub const MAX_DELAY_SECS: i64 = 10 * 366 * 24 * 3600;

/// The characters of a task type, as a regular expression's class.
pub const TASK_TYPE_CHARS: &str = "[A-Za-z0-9_.:-]";
pub const MAX_TASK_TYPE_CHARS: usize = 128;
/// The characters of a queue's name, as a regular expression's class.
pub const QUEUE_NAME_CHARS: &str = "[A-Za-z0-9_.-]";
pub const MAX_QUEUE_NAME_CHARS: usize = 64;
pub const MAX_OWNER_CHARS: usize = 128;
pub const MAX_UNIQUE_KEY_CHARS: usize = 256;
pub const MAX_WORKER_ID_CHARS: usize = 128;
pub const MAX_LABEL_KEY_CHARS: usize = 64;

/// `priority` as callers may give it: a number or a name.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PriorityInput {
    Number(i64),
    Name(String),
}

/// By hand, so that a value of the wrong kind is told what it must be
/// rather than that it matched no variant.
impl<'de> Deserialize<'de> for PriorityInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PriorityInput;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("1 to 10 or one of \"low\", \"normal\", \"high\"")
            }
            fn visit_i64<E: serde::de::Error>(
                self,
                n: i64,
            ) -> std::result::Result<PriorityInput, E> {
                Ok(PriorityInput::Number(n))
            }
            fn visit_u64<E: serde::de::Error>(
                self,
                n: u64,
            ) -> std::result::Result<PriorityInput, E> {
                Ok(PriorityInput::Number(i64::try_from(n).unwrap_or(i64::MAX)))
            }
            fn visit_f64<E: serde::de::Error>(
                self,
                n: f64,
            ) -> std::result::Result<PriorityInput, E> {
                if n.fract() != 0.0 {
                    return Err(E::invalid_type(serde::de::Unexpected::Float(n), &self));
                }
                crate::whole_number::from_f64(n).map(PriorityInput::Number)
            }
            fn visit_str<E: serde::de::Error>(
                self,
                s: &str,
            ) -> std::result::Result<PriorityInput, E> {
                Ok(PriorityInput::Name(s.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What to do when an active task already holds the unique key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OnConflict {
    /// Return the existing task (HTTP 200).
    #[default]
    Keep,
    /// Cancel the existing task and create the new one.
    Replace,
}

/// An enqueue request, field for field as SPEC §4 names them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a task: an object {type, payload?, …}"
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewTask {
    #[serde(rename = "type")]
    pub task_type: String,
    /// Any JSON value: at most `payload_limit_bytes` serialized (1 MiB
    /// unless configured) and nested at most 64 deep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Value>))]
    pub payload: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<PriorityInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole_number::option"
    )]
    pub delay_secs: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole_number::option"
    )]
    pub max_attempts: Option<i64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole_number::option"
    )]
    pub timeout_secs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_conflict: Option<OnConflict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl NewTask {
    pub fn new(task_type: impl Into<String>) -> Self {
        Self {
            task_type: task_type.into(),
            ..Self::default()
        }
    }

    /// Sets the payload from any serializable value.
    pub fn payload(mut self, payload: &impl Serialize) -> serde_json::Result<Self> {
        self.payload = Some(serde_json::value::to_raw_value(payload)?);
        Ok(self)
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    pub fn priority(mut self, priority: i64) -> Self {
        self.priority = Some(PriorityInput::Number(priority));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay_secs = Some(i64::try_from(delay.as_secs()).unwrap_or(i64::MAX));
        self
    }

    pub fn max_attempts(mut self, n: i64) -> Self {
        self.max_attempts = Some(n);
        self
    }

    pub fn timeout_secs(mut self, secs: i64) -> Self {
        self.timeout_secs = Some(secs);
        self
    }

    pub fn unique_key(mut self, key: impl Into<String>, on_conflict: OnConflict) -> Self {
        self.unique_key = Some(key.into());
        self.on_conflict = Some(on_conflict);
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn depends_on(mut self, id: Uuid) -> Self {
        self.depends_on
            .get_or_insert_with(Vec::new)
            .push(id.to_string());
        self
    }

    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Checks every rule of SPEC §1. `position` places the task in its
    /// request, so that errors in a batch read `tasks[3].queue`.
    pub fn validate(self, limits: &Limits, position: Position) -> Result<TaskSpec> {
        // Field names are spelled out only for an error: a batch of
        // thousands of valid tasks formats none.
        let field = |name: &'static str| FieldName { position, name };
        validate_task_type(field("type"), &self.task_type)?;
        let queue = self.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
        validate_queue_name(field("queue"), &queue)?;

        let priority = match self.priority {
            None => DEFAULT_PRIORITY,
            Some(PriorityInput::Number(n)) if (1..=10).contains(&n) => n as u8,
            Some(PriorityInput::Name(name)) => match name.as_str() {
                "low" => 2,
                "normal" => 5,
                "high" => 8,
                _ => {
                    return Err(Error::invalid(
                        field("priority"),
                        format!(
                            "must be 1 to 10 or one of \"low\", \"normal\", \"high\"; got {name:?}"
                        ),
                    ));
                }
            },
            Some(PriorityInput::Number(n)) => {
                return Err(Error::invalid(
                    field("priority"),
                    format!("must be 1 to 10 or one of \"low\", \"normal\", \"high\"; got {n}"),
                ));
            }
        };

        let schedule = match (self.run_at, self.delay_secs) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    field("run_at"),
                    "give either run_at or delay_secs, not both",
                ));
            }
            (Some(text), None) => Schedule::At(
                Timestamp::parse_given_not_before(&text)
                    .map_err(|rule| Error::invalid(field("run_at"), rule))?,
            ),
            (None, Some(secs)) if (0..=MAX_DELAY_SECS).contains(&secs) => {
                Schedule::After(Duration::from_secs(secs as u64))
            }
            (None, Some(secs)) => {
                return Err(Error::invalid(
                    field("delay_secs"),
                    format!("must be 0 to {MAX_DELAY_SECS}; got {secs}"),
                ));
            }
            (None, None) => Schedule::Now,
        };

        let max_attempts = bounded(
            field("max_attempts"),
            self.max_attempts,
            1,
            HIGHEST_MAX_ATTEMPTS,
        )?
        .unwrap_or(DEFAULT_MAX_ATTEMPTS);
        let timeout_secs = bounded(
            field("timeout_secs"),
            self.timeout_secs,
            1,
            MAX_TIMEOUT_SECS,
        )?
        .unwrap_or(DEFAULT_TIMEOUT_SECS);

        if let Some(key) = &self.unique_key {
            free_text(field("unique_key"), key, MAX_UNIQUE_KEY_CHARS)?;
        }
        if self.on_conflict.is_some() && self.unique_key.is_none() {
            return Err(Error::invalid(
                field("on_conflict"),
                "is only allowed with unique_key",
            ));
        }

        let labels = self.labels.unwrap_or_default();
        if labels.len() > limits.max_labels {
            return Err(Error::invalid(
                field("labels"),
                format!("at most {} labels; got {}", limits.max_labels, labels.len()),
            ));
        }
        for (key, value) in &labels {
            validate_label_key(field("labels"), key)?;
            no_nul(position.field(format_args!("labels.{key}")), value)?;
            if value.chars().count() > MAX_LABEL_VALUE_CHARS {
                return Err(Error::invalid(
                    position.field(format_args!("labels.{key}")),
                    format!("must be at most {MAX_LABEL_VALUE_CHARS} characters"),
                ));
            }
        }

        let raw_deps = self.depends_on.unwrap_or_default();
        if raw_deps.len() > limits.max_depends_on {
            return Err(Error::invalid(
                field("depends_on"),
                format!(
                    "at most {} task ids; got {}",
                    limits.max_depends_on,
                    raw_deps.len()
                ),
            ));
        }
        let mut depends_on = Vec::with_capacity(raw_deps.len());
        for (i, raw) in raw_deps.iter().enumerate() {
            let id = Uuid::parse_str(raw).map_err(|_| {
                Error::invalid(
                    position.field(format_args!("depends_on[{i}]")),
                    format!("must be a task id; got {raw:?}"),
                )
            })?;
            if !depends_on.contains(&id) {
                depends_on.push(id);
            }
        }

        if let Some(owner) = &self.owner {
            validate_owner(field("owner"), owner)?;
        }

        let payload = self.payload.unwrap_or_else(json_null);
        check_json(field("payload"), &payload, limits)?;

        Ok(TaskSpec {
            position,
            task_type: self.task_type,
            queue,
            payload,
            priority,
            schedule,
            max_attempts,
            timeout_secs,
            owner: self.owner,
            labels,
            unique_key: self.unique_key,
            on_conflict: self.on_conflict.unwrap_or_default(),
            depends_on,
        })
    }
}

/// When a new task may first run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Now,
    After(Duration),
    At(Timestamp),
}

impl Schedule {
    pub fn run_at(self, now: Timestamp) -> Timestamp {
        match self {
            Schedule::Now => now,
            Schedule::After(d) => now.saturating_add(d),
            Schedule::At(t) => t,
        }
    }
}

/// A validated enqueue request.
#[derive(Clone, Debug)]
pub struct TaskSpec {
    /// Where the task sat in its request, for errors the store finds.
    pub position: Position,
    pub task_type: String,
    pub queue: String,
    pub payload: Json,
    pub priority: u8,
    pub schedule: Schedule,
    pub max_attempts: u32,
    pub timeout_secs: u32,
    pub owner: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub unique_key: Option<String>,
    pub on_conflict: OnConflict,
    pub depends_on: Vec<Uuid>,
}

/// Where a task sits in its request, which names its fields in errors:
/// `queue` for a task enqueued alone, `tasks[3].queue` for the fourth of a
/// batch. Displayed, it is the prefix of those names. Kept as a number, not
/// a prefix written out: a batch of thousands of valid tasks then formats
/// and frees no string a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Alone,
    /// The index in the batch's `tasks`.
    InBatch(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Alone => Ok(()),
            Position::InBatch(index) => write!(f, "tasks[{index}]."),
        }
    }
}

impl Position {
    /// The name in errors of the field `name` of the task at this position
    /// (`tasks[3].depends_on[0]`).
    pub fn field(self, name: impl fmt::Display) -> String {
        format!("{self}{name}")
    }
}

/// A field's name in an error: `name` behind its task's position.
#[derive(Clone, Copy)]
struct FieldName<'a> {
    position: Position,
    name: &'a str,
}

impl fmt::Display for FieldName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.position, self.name)
    }
}

impl From<FieldName<'_>> for String {
    fn from(field: FieldName<'_>) -> String {
        field.to_string()
    }
}

fn bounded(
    field: impl fmt::Display,
    value: Option<i64>,
    min: i64,
    max: i64,
) -> Result<Option<u32>> {
    match value {
        None => Ok(None),
        Some(v) if (min..=max).contains(&v) => Ok(Some(v as u32)),
        Some(v) => Err(Error::invalid(
            field.to_string(),
            format!("must be {min} to {max}; got {v}"),
        )),
    }
}

/// Names of task types and queues: 1–`max` characters of
/// [`QUEUE_NAME_CHARS`], or of [`TASK_TYPE_CHARS`] (`:` too) where
/// `allow_colon`.
fn validate_name(
    field: impl fmt::Display,
    value: &str,
    max: usize,
    allow_colon: bool,
) -> Result<()> {
    let ok_char = |c: char| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') || (allow_colon && c == ':')
    };
    if value.is_empty() || value.len() > max || !value.chars().all(ok_char) {
        let set = if allow_colon {
            TASK_TYPE_CHARS
        } else {
            QUEUE_NAME_CHARS
        };
        return Err(Error::invalid(
            field.to_string(),
            format!("must be 1 to {max} characters of {set}; got {value:?}"),
        ));
    }
    Ok(())
}

pub fn validate_queue_name(field: impl fmt::Display, value: &str) -> Result<()> {
    validate_name(field, value, MAX_QUEUE_NAME_CHARS, false)
}

pub fn validate_task_type(field: impl fmt::Display, value: &str) -> Result<()> {
    validate_name(field, value, MAX_TASK_TYPE_CHARS, true)
}

/// An owner as a task carries it, and so as a filter can match it: a
/// filter no task could ever match is a mistake in the call, said as one.
pub fn validate_owner(field: impl fmt::Display, value: &str) -> Result<()> {
    free_text(field, value, MAX_OWNER_CHARS)
}

/// Text the caller chooses freely (an owner, a unique key, a worker id): 1
/// to `max_chars` characters, none of them U+0000.
fn free_text(field: impl fmt::Display, value: &str, max_chars: usize) -> Result<()> {
    if value.is_empty() || value.chars().count() > max_chars {
        return Err(Error::invalid(
            field.to_string(),
            format!("must be 1 to {max_chars} characters"),
        ));
    }
    no_nul(field, value)
}

/// Refuses U+0000 in a string a store keeps as text of its own (owner,
/// unique key, labels, worker id). PostgreSQL's `text` and `jsonb` cannot
/// hold it, so it failed there as a 500 while SQLite kept it: one rule for
/// every backend. Payloads, results, messages and progress are JSON text,
/// where it travels escaped, and may carry it.
pub fn no_nul(field: impl fmt::Display, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(Error::invalid(
            field.to_string(),
            "must not contain the character U+0000 (NUL)",
        ));
    }
    Ok(())
}

/// The longest value a label may have.
pub const MAX_LABEL_VALUE_CHARS: usize = 256;

/// A label's key, on a task and in a `key:value` filter alike.
pub fn validate_label_key(field: impl fmt::Display, key: &str) -> Result<()> {
    if key.is_empty() || key.chars().count() > MAX_LABEL_KEY_CHARS || key.contains([':', '\0']) {
        return Err(Error::invalid(
            field.to_string(),
            format!(
                "keys must be 1 to {MAX_LABEL_KEY_CHARS} characters without ':' or U+0000; got {key:?}"
            ),
        ));
    }
    Ok(())
}

pub fn validate_worker_id(value: &str) -> Result<()> {
    free_text("worker_id", value, MAX_WORKER_ID_CHARS)
}

/// Enforces the size and nesting limits on a JSON value the caller sent.
pub fn check_json(field: impl fmt::Display, value: &Json, limits: &Limits) -> Result<()> {
    let text = value.get();
    if text.len() > limits.max_payload_bytes {
        return Err(Error::PayloadTooLarge {
            field: field.to_string(),
            size: text.len(),
            limit: limits.max_payload_bytes,
        });
    }
    // Each level opens and closes with a byte of its own: a short value
    // cannot nest past the limit, and most payloads are short.
    if text.len() > 2 * limits.max_json_depth
        && nesting_exceeds(text.as_bytes(), limits.max_json_depth)
    {
        return Err(Error::invalid(
            field.to_string(),
            format!(
                "arrays and objects may be nested at most {} deep",
                limits.max_json_depth
            ),
        ));
    }
    Ok(())
}

/// Whether valid JSON nests arrays and objects deeper than `limit`. One
/// pass over the bytes, skipping strings, whose brackets are text: to
/// their closing quote at once (`memchr`), where a byte at a time took a
/// tenth of a server's samples through batches of 10,000-byte payloads
/// (bench/HISTORY.md, round 68).
fn nesting_exceeds(json: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut at = 0;
    while let Some(&byte) = json.get(at) {
        at += 1;
        match byte {
            b'"' => loop {
                let Some(rest) = json.get(at..) else {
                    return false;
                };
                match memchr::memchr2(b'"', b'\\', rest) {
                    // An escape and the byte it escapes.
                    Some(found) if rest[found] == b'\\' => at += found + 2,
                    Some(found) => {
                        at += found + 1;
                        break;
                    }
                    None => return false,
                }
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;

    fn check(task: NewTask) -> Result<TaskSpec> {
        task.validate(&Limits::default(), Position::Alone)
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            Error::PayloadTooLarge { field, .. } => field,
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_spec() {
        let spec = check(NewTask::new("email.send")).unwrap();
        assert_eq!(spec.queue, "default");
        assert_eq!(spec.priority, 5);
        assert_eq!(spec.max_attempts, 4);
        assert_eq!(spec.timeout_secs, 1800);
        assert_eq!(spec.payload.get(), "null");
        assert_eq!(spec.schedule, Schedule::Now);
    }

    #[test]
    fn a_run_at_finer_than_a_millisecond_is_never_early() {
        let spec = check(NewTask {
            run_at: Some("2026-01-15T10:30:05.123456Z".into()),
            ..NewTask::new("t")
        })
        .unwrap();
        let due = Timestamp::parse("2026-01-15T10:30:05.124Z").unwrap();
        assert_eq!(spec.schedule, Schedule::At(due));
    }

    #[test]
    fn named_priorities_map_to_numbers() {
        for (name, n) in [("low", 2), ("normal", 5), ("high", 8)] {
            let mut t = NewTask::new("t");
            t.priority = Some(PriorityInput::Name(name.into()));
            assert_eq!(check(t).unwrap().priority, n);
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(NewTask, &str)> = vec![
            (NewTask::new(""), "type"),
            (NewTask::new("a b"), "type"),
            (NewTask::new("x".repeat(129)), "type"),
            (NewTask::new("t").queue("a:b"), "queue"),
            (NewTask::new("t").priority(11), "priority"),
            (NewTask::new("t").priority(0), "priority"),
            (NewTask::new("t").max_attempts(0), "max_attempts"),
            (NewTask::new("t").max_attempts(1001), "max_attempts"),
            (NewTask::new("t").timeout_secs(0), "timeout_secs"),
            (
                NewTask {
                    run_at: Some("soon".into()),
                    ..NewTask::new("t")
                },
                "run_at",
            ),
            (
                NewTask {
                    delay_secs: Some(-1),
                    ..NewTask::new("t")
                },
                "delay_secs",
            ),
            (
                NewTask {
                    depends_on: Some(vec!["nope".into()]),
                    ..NewTask::new("t")
                },
                "depends_on[0]",
            ),
            (
                NewTask {
                    on_conflict: Some(OnConflict::Replace),
                    ..NewTask::new("t")
                },
                "on_conflict",
            ),
        ];
        for (task, field) in cases {
            assert_eq!(field_of(check(task).unwrap_err()), field);
        }
        let many_labels = (0..17).fold(NewTask::new("t"), |t, i| t.label(format!("k{i}"), "v"));
        assert_eq!(field_of(check(many_labels).unwrap_err()), "labels");
    }

    #[test]
    fn a_priority_of_the_wrong_kind_says_what_it_must_be() {
        let err = serde_json::from_str::<NewTask>(r#"{"type": "t", "priority": 2.5}"#).unwrap_err();
        assert!(err.to_string().contains("1 to 10"), "{err}");
        let named: NewTask = serde_json::from_str(r#"{"type": "t", "priority": "high"}"#).unwrap();
        assert_eq!(named.priority, Some(PriorityInput::Name("high".into())));
        let number: NewTask = serde_json::from_str(r#"{"type": "t", "priority": 7}"#).unwrap();
        assert_eq!(number.priority, Some(PriorityInput::Number(7)));
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn payload_nested_past_the_limit_is_refused() {
        let at_limit = RawValue::from_string(nested(64)).unwrap();
        let task = NewTask {
            payload: Some(at_limit),
            ..NewTask::new("t")
        };
        assert!(check(task).is_ok());
        // As deep, and long enough to be read through.
        let padded = format!(r#"{{"a": {}, "pad": "{}"}}"#, nested(63), "x".repeat(200));
        let task = NewTask {
            payload: Some(RawValue::from_string(padded).unwrap()),
            ..NewTask::new("t")
        };
        assert!(check(task).is_ok());
        let past = RawValue::from_string(format!(r#"{{"a": {}}}"#, nested(64))).unwrap();
        let task = NewTask {
            payload: Some(past),
            ..NewTask::new("t")
        };
        let err = check(task).unwrap_err();
        assert_eq!(field_of(err.clone()), "payload", "{err}");
        assert!(err.to_string().contains("at most 64 deep"), "{err}");
    }

    #[test]
    fn brackets_inside_strings_are_not_nesting() {
        let text = format!(
            r#"["{}", "\"{}", {{"k\\": "]"}}]"#,
            "[".repeat(500),
            "{".repeat(500)
        );
        assert!(serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok());
        assert!(!nesting_exceeds(text.as_bytes(), 2));
        assert!(nesting_exceeds(text.as_bytes(), 1));
    }

    #[test]
    fn an_escaped_backslash_ends_before_its_strings_quote() {
        // Read as an escaped quote, the first string would run on to the
        // second's opening quote and leave its brackets outside.
        let text = r#"["\\", "[[[[", "\"[[[["]"#;
        assert!(serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
        assert!(!nesting_exceeds(text.as_bytes(), 1));
        assert!(nesting_exceeds(text.as_bytes(), 0));
    }

    /// The byte-at-a-time reading the skip over strings replaced.
    fn nesting_exceeds_bytewise(json: &[u8], limit: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &byte in json {
            if in_string {
                if escaped {
                    escaped = false;
                } else if byte == b'\\' {
                    escaped = true;
                } else if byte == b'"' {
                    in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    #[test]
    fn strings_skipped_at_once_nest_as_read_byte_by_byte() {
        // Documents of nested arrays and objects whose strings and keys
        // are made of brackets, quotes and backslashes, from a fixed seed.
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        fn text(next: &mut dyn FnMut(u64) -> u64) -> String {
            (0..next(6))
                .map(|_| ['[', ']', '{', '}', '"', '\\', 'a'][next(7) as usize])
                .collect()
        }
        fn value(next: &mut dyn FnMut(u64) -> u64, depth: u32) -> serde_json::Value {
            match if depth == 0 { 0 } else { next(3) } {
                0 => serde_json::Value::String(text(next)),
                1 => (0..next(4)).map(|_| value(next, depth - 1)).collect(),
                _ => (0..next(4))
                    .map(|_| (text(next), value(next, depth - 1)))
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            }
        }
        for _ in 0..2000 {
            let json = value(&mut next, 6).to_string();
            for limit in 0..8 {
                assert_eq!(
                    nesting_exceeds(json.as_bytes(), limit),
                    nesting_exceeds_bytewise(json.as_bytes(), limit),
                    "{json} at {limit}"
                );
            }
        }
    }

    #[test]
    fn payload_over_the_limit_is_refused() {
        let limits = Limits {
            max_payload_bytes: 10,
            ..Limits::default()
        };
        let task = NewTask::new("t")
            .payload(&"a string of more than ten bytes")
            .unwrap();
        let err = task.validate(&limits, Position::InBatch(2)).unwrap_err();
        assert!(
            matches!(err, Error::PayloadTooLarge { ref field, .. } if field == "tasks[2].payload")
        );
    }
}
