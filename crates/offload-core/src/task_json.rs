//! A task written as JSON without serde, for the answers that carry many
//! tasks (fetch, batch enqueue). serde_json writes every key and string
//! value through its escaping loop, one byte at a time: 29% of the server's
//! request thread in a burn-down (callgrind). Here keys are constants,
//! timestamps and ids are written as they are (they never need escaping)
//! and other strings are copied whole when they hold nothing to escape.
//!
//! The bytes are exactly those of `serde_json::to_writer(&task)`; the tests
//! hold the two together, so a field added to [`Task`] must be added here.

use serde::Serialize;

use crate::{Task, Timestamp};

impl Task {
    /// Appends the task's JSON to `out`: the same bytes as
    /// `serde_json::to_writer(out, self)`.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(self.id.hyphenated().encode_lower(&mut id).as_bytes());
        out.extend_from_slice(b"\",\"type\":");
        write_str(out, &self.task_type)?;
        out.extend_from_slice(b",\"queue\":");
        write_str(out, &self.queue)?;
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(self.payload.get().as_bytes());
        out.extend_from_slice(b",\"priority\":");
        write_u32(out, self.priority.into());
        out.extend_from_slice(b",\"state\":\"");
        out.extend_from_slice(self.state.as_str().as_bytes());
        out.extend_from_slice(b"\",\"attempt\":");
        write_u32(out, self.attempt);
        out.extend_from_slice(b",\"max_attempts\":");
        write_u32(out, self.max_attempts);
        out.extend_from_slice(b",\"timeout_secs\":");
        write_u32(out, self.timeout_secs);
        out.extend_from_slice(b",\"run_at\":");
        write_timestamp(out, self.run_at)?;
        out.extend_from_slice(b",\"owner\":");
        write_opt_str(out, self.owner.as_deref())?;
        out.extend_from_slice(b",\"labels\":");
        if self.labels.is_empty() {
            out.extend_from_slice(b"{}");
        } else {
            serde_json::to_writer(&mut *out, &self.labels)?;
        }
        out.extend_from_slice(b",\"unique_key\":");
        write_opt_str(out, self.unique_key.as_deref())?;
        out.extend_from_slice(b",\"depends_on\":");
        write_list(out, &self.depends_on)?;
        out.extend_from_slice(b",\"progress\":");
        write_opt(out, self.progress.as_ref())?;
        out.extend_from_slice(b",\"result\":");
        match &self.result {
            Some(result) => out.extend_from_slice(result.get().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"error\":");
        write_opt(out, self.error.as_ref())?;
        out.extend_from_slice(b",\"errors\":");
        write_list(out, &self.errors)?;
        out.extend_from_slice(if self.cancel_requested {
            b",\"cancel_requested\":true,\"created_at\":"
        } else {
            b",\"cancel_requested\":false,\"created_at\":"
        });
        write_timestamp(out, self.created_at)?;
        out.extend_from_slice(b",\"updated_at\":");
        write_timestamp(out, self.updated_at)?;
        out.extend_from_slice(b",\"started_at\":");
        write_opt_timestamp(out, self.started_at)?;
        out.extend_from_slice(b",\"finished_at\":");
        write_opt_timestamp(out, self.finished_at)?;
        out.extend_from_slice(b",\"lease_expires_at\":");
        write_opt_timestamp(out, self.lease_expires_at)?;
        out.extend_from_slice(b",\"worker_id\":");
        write_opt_str(out, self.worker_id.as_deref())?;
        out.push(b'}');
        Ok(())
    }
}

/// A JSON string: copied whole unless it holds a quote, a backslash or a
/// control character, which serde_json escapes as it always does.
fn write_str(out: &mut Vec<u8>, text: &str) -> serde_json::Result<()> {
    if text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        return serde_json::to_writer(out, text);
    }
    out.reserve(text.len() + 2);
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
    Ok(())
}

fn write_opt_str(out: &mut Vec<u8>, text: Option<&str>) -> serde_json::Result<()> {
    match text {
        Some(text) => write_str(out, text),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn write_timestamp(out: &mut Vec<u8>, at: Timestamp) -> serde_json::Result<()> {
    match at.rfc3339() {
        Some(text) => {
            out.push(b'"');
            out.extend_from_slice(&text);
            out.push(b'"');
            Ok(())
        }
        None => serde_json::to_writer(out, &at),
    }
}

fn write_opt_timestamp(out: &mut Vec<u8>, at: Option<Timestamp>) -> serde_json::Result<()> {
    match at {
        Some(at) => write_timestamp(out, at),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn write_opt<T: Serialize>(out: &mut Vec<u8>, value: Option<&T>) -> serde_json::Result<()> {
    match value {
        Some(value) => serde_json::to_writer(out, value),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn write_list<T: Serialize>(out: &mut Vec<u8>, items: &[T]) -> serde_json::Result<()> {
    if items.is_empty() {
        out.extend_from_slice(b"[]");
        Ok(())
    } else {
        serde_json::to_writer(out, items)
    }
}

fn write_u32(out: &mut Vec<u8>, value: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::value::RawValue;
    use uuid::Uuid;

    use crate::{AttemptError, ErrorKind, Progress, State, Task, TaskError, Timestamp};

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).expect("valid JSON")
    }

    fn plain() -> Task {
        let at = Timestamp::from_millis(1_795_000_000_123);
        Task {
            id: Uuid::now_v7(),
            task_type: "email.send".into(),
            queue: "default".into(),
            payload: raw(r#"{"user_id":42,"template":"welcome"}"#),
            priority: 5,
            state: State::Pending,
            attempt: 0,
            max_attempts: 4,
            timeout_secs: 1800,
            run_at: at,
            owner: None,
            labels: BTreeMap::new(),
            unique_key: None,
            depends_on: Vec::new(),
            progress: None,
            result: None,
            error: None,
            errors: Vec::new(),
            cancel_requested: false,
            created_at: at,
            updated_at: at,
            started_at: None,
            finished_at: None,
            lease_expires_at: None,
            worker_id: None,
        }
    }

    /// Every optional field set, strings that need escaping, extreme numbers
    /// and timestamps outside RFC 3339's four-digit years.
    fn full() -> Task {
        let at = Timestamp::from_millis(0);
        Task {
            task_type: "a\"quoted\\type\n".into(),
            queue: "q\u{1}é漢".into(),
            payload: raw(r#"[1, "two" , {"three":3}]"#),
            priority: u8::MAX,
            state: State::Failed,
            attempt: u32::MAX,
            max_attempts: 10,
            timeout_secs: 0,
            run_at: Timestamp::from_millis(-1),
            owner: Some("user-\u{7f}".into()),
            labels: BTreeMap::from([("k\"ey".into(), "va\tlue".into()), ("b".into(), "".into())]),
            unique_key: Some("".into()),
            depends_on: vec![Uuid::now_v7(), Uuid::nil()],
            progress: Some(Progress {
                percent: Some(12.5),
                message: Some("half \"way\"".into()),
                data: Some(raw(r#"{"x":null}"#)),
                updated_at: at,
            }),
            result: Some(raw("null")),
            error: Some(TaskError {
                kind: ErrorKind::DependencyFailed,
                message: "line\r\nbreak".into(),
                at,
            }),
            errors: vec![AttemptError {
                attempt: 1,
                kind: ErrorKind::Timeout,
                message: "slow".into(),
                at: Timestamp::from_millis(300_000_000_000_000),
            }],
            cancel_requested: true,
            created_at: at,
            updated_at: Timestamp::from_millis(i64::MAX),
            started_at: Some(at),
            finished_at: Some(Timestamp::from_millis(i64::MIN)),
            lease_expires_at: Some(at),
            worker_id: Some("w\\1".into()),
            ..plain()
        }
    }

    fn assert_same_as_serde(task: &Task) {
        let mut written = Vec::new();
        task.write_json(&mut written).expect("writes");
        let serde = serde_json::to_vec(task).expect("serializes");
        assert_eq!(
            String::from_utf8_lossy(&written),
            String::from_utf8_lossy(&serde)
        );
    }

    #[test]
    fn a_plain_task_is_written_as_serde_writes_it() {
        assert_same_as_serde(&plain());
    }

    #[test]
    fn every_field_set_and_escaped_is_written_as_serde_writes_it() {
        assert_same_as_serde(&full());
    }

    #[test]
    fn each_state_and_small_numbers_are_written_as_serde_writes_them() {
        for (i, state) in State::ALL.into_iter().enumerate() {
            let task = Task {
                state,
                priority: i as u8,
                attempt: 10u32.pow(i as u32 % 10),
                max_attempts: 9,
                timeout_secs: 99_999,
                ..plain()
            };
            assert_same_as_serde(&task);
        }
    }
}
