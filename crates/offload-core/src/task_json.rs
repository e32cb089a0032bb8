//! A task written as JSON without serde, for the answers that carry many
//! tasks (fetch, batch enqueue). serde_json writes every key and string
//! value through its escaping loop, one byte at a time: 29% of the server's
//! request thread in a burn-down (callgrind). Here keys are constants,
//! timestamps and ids are written as they are (they never need escaping)
//! and other strings are copied whole when they hold nothing to escape.
//!
//! The bytes are exactly those of `serde_json::to_writer(&task)`; the tests
//! hold the two together, so a field added to [`Task`] must be added here.
//!
//! [`Task::read_json_at`] reads that form back, for the client: a worker
//! reads every task it fetches and a producer every task it enqueues, and
//! serde_json's derive took ~13,000 instructions a task (callgrind). It reads
//! only the canonical form, keys in this order; anything else (an older or
//! newer server, a proxy that rewrote the body) makes it return `None` and
//! the caller parses with serde_json instead.

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::{Json, State, Task, Timestamp};

/// The last timestamp written or read, with its text, for the next one
/// that is equal. The tasks of one answer mostly share their timestamps (a
/// batch's tasks are created in the same millisecond, with `run_at` and
/// `updated_at` equal to `created_at`; a fetch's tasks were claimed
/// together): formatting timestamps was ~12% of the request thread
/// answering a batch, parsing them ~15% of a client reading one
/// (callgrind).
#[derive(Debug, Default)]
pub struct TimestampMemo {
    /// The last few distinct timestamps met, with their text: a claimed
    /// task's own (`created_at`, `started_at`, `lease_expires_at`) differ
    /// from each other, but each repeats in the next task.
    recent: [Option<(Timestamp, [u8; 24])>; MEMO_SLOTS],
    /// Where the next new one goes.
    next: usize,
}

const MEMO_SLOTS: usize = 4;

impl TimestampMemo {
    fn remember(&mut self, at: Timestamp, text: [u8; 24]) {
        self.recent[self.next] = Some((at, text));
        self.next = (self.next + 1) % MEMO_SLOTS;
    }

    fn write(&mut self, out: &mut Vec<u8>, at: Timestamp) -> serde_json::Result<()> {
        let known = self.recent.iter().flatten().find(|(seen, _)| *seen == at);
        let text = match known {
            Some((_, text)) => *text,
            None => match at.rfc3339() {
                Some(text) => {
                    self.remember(at, text);
                    text
                }
                None => return serde_json::to_writer(out, &at),
            },
        };
        out.push(b'"');
        out.extend_from_slice(&text);
        out.push(b'"');
        Ok(())
    }

    /// The timestamp whose RFC 3339 text is `text`, if it is one.
    fn read(&mut self, text: &[u8]) -> Option<Timestamp> {
        let known = self
            .recent
            .iter()
            .flatten()
            .find(|(_, seen)| seen.as_slice() == text);
        if let Some((at, _)) = known {
            return Some(*at);
        }
        let at = Timestamp::parse_rfc3339_millis(text)?;
        self.remember(at, text.try_into().ok()?);
        Some(at)
    }

    fn write_opt(&mut self, out: &mut Vec<u8>, at: Option<Timestamp>) -> serde_json::Result<()> {
        match at {
            Some(at) => self.write(out, at),
            None => {
                out.extend_from_slice(b"null");
                Ok(())
            }
        }
    }
}

impl Task {
    /// Appends the task's JSON to `out`: the same bytes as
    /// `serde_json::to_writer(out, self)`.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        self.write_json_with(out, &mut TimestampMemo::default())
    }

    /// [`Task::write_json`] for one of many tasks written together, which
    /// share `memo`.
    pub fn write_json_with(
        &self,
        out: &mut Vec<u8>,
        memo: &mut TimestampMemo,
    ) -> serde_json::Result<()> {
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
        memo.write(out, self.run_at)?;
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
        memo.write(out, self.created_at)?;
        out.extend_from_slice(b",\"updated_at\":");
        memo.write(out, self.updated_at)?;
        out.extend_from_slice(b",\"started_at\":");
        memo.write_opt(out, self.started_at)?;
        out.extend_from_slice(b",\"finished_at\":");
        memo.write_opt(out, self.finished_at)?;
        out.extend_from_slice(b",\"lease_expires_at\":");
        memo.write_opt(out, self.lease_expires_at)?;
        out.extend_from_slice(b",\"worker_id\":");
        write_opt_str(out, self.worker_id.as_deref())?;
        out.push(b'}');
        Ok(())
    }
}

impl Task {
    /// Reads a task written by [`Task::write_json`] starting at byte `at` of
    /// `text`; returns it with the position after it, or `None` when the
    /// text is not in that form (see the module's doc).
    pub fn read_json_at(text: &str, at: usize) -> Option<(Task, usize)> {
        Self::read_json_at_with(text, at, &mut TimestampMemo::default(), None)
    }

    /// [`Task::read_json_at`] for one of many tasks read together, which
    /// share `memo`. `sent_payload` is the payload the reader sent for this
    /// task, if it did (a batch enqueue's answer carries them back): when
    /// the text holds the same bytes, it is taken as it is instead of being
    /// checked again (~1,800 instructions for a small payload).
    pub fn read_json_at_with(
        text: &str,
        at: usize,
        memo: &mut TimestampMemo,
        sent_payload: Option<&Json>,
    ) -> Option<(Task, usize)> {
        let mut r = Reader { text, at, memo };
        r.literal("{\"id\":\"")?;
        let id = Uuid::try_parse_ascii(r.take(uuid::fmt::Hyphenated::LENGTH)?.as_bytes()).ok()?;
        r.literal("\",\"type\":")?;
        let task_type = r.string()?;
        r.literal(",\"queue\":")?;
        let queue = r.string()?;
        r.literal(",\"payload\":")?;
        let payload = match sent_payload {
            Some(sent) if r.skip_value(sent.get()) => sent.clone(),
            _ => r.value()?,
        };
        r.literal(",\"priority\":")?;
        let priority = u8::try_from(r.number()?).ok()?;
        r.literal(",\"state\":")?;
        let state = r.state()?;
        r.literal(",\"attempt\":")?;
        let attempt = r.number()?;
        r.literal(",\"max_attempts\":")?;
        let max_attempts = r.number()?;
        r.literal(",\"timeout_secs\":")?;
        let timeout_secs = r.number()?;
        r.literal(",\"run_at\":")?;
        let run_at = r.timestamp()?;
        r.literal(",\"owner\":")?;
        let owner = r.opt_string()?;
        r.literal(",\"labels\":")?;
        let labels = if r.skip("{}") {
            Default::default()
        } else {
            r.value()?
        };
        r.literal(",\"unique_key\":")?;
        let unique_key = r.opt_string()?;
        r.literal(",\"depends_on\":")?;
        let depends_on = if r.skip("[]") { Vec::new() } else { r.value()? };
        r.literal(",\"progress\":")?;
        let progress = r.opt_value()?;
        r.literal(",\"result\":")?;
        let result = r.opt_value()?;
        r.literal(",\"error\":")?;
        let error = r.opt_value()?;
        r.literal(",\"errors\":")?;
        let errors = if r.skip("[]") { Vec::new() } else { r.value()? };
        r.literal(",\"cancel_requested\":")?;
        let cancel_requested = if r.skip("true") {
            true
        } else {
            r.literal("false")?;
            false
        };
        r.literal(",\"created_at\":")?;
        let created_at = r.timestamp()?;
        r.literal(",\"updated_at\":")?;
        let updated_at = r.timestamp()?;
        r.literal(",\"started_at\":")?;
        let started_at = r.opt_timestamp()?;
        r.literal(",\"finished_at\":")?;
        let finished_at = r.opt_timestamp()?;
        r.literal(",\"lease_expires_at\":")?;
        let lease_expires_at = r.opt_timestamp()?;
        r.literal(",\"worker_id\":")?;
        let worker_id = r.opt_string()?;
        r.literal("}")?;
        let task = Task {
            id,
            task_type,
            queue,
            payload,
            priority,
            state,
            attempt,
            max_attempts,
            timeout_secs,
            run_at,
            owner,
            labels,
            unique_key,
            depends_on,
            progress,
            result,
            error,
            errors,
            cancel_requested,
            created_at,
            updated_at,
            started_at,
            finished_at,
            lease_expires_at,
            worker_id,
        };
        Some((task, r.at))
    }
}

/// A position in JSON text; every method returns `None` where the text is
/// not what it expects.
struct Reader<'t, 'm> {
    text: &'t str,
    at: usize,
    memo: &'m mut TimestampMemo,
}

impl<'t> Reader<'t, '_> {
    fn rest(&self) -> &'t [u8] {
        &self.text.as_bytes()[self.at..]
    }

    // Inlined so that each literal, known at its call site, is compared as
    // a constant rather than through a call per key: ~24 of them a task.
    #[inline(always)]
    fn skip(&mut self, expected: &str) -> bool {
        let found = self.rest().starts_with(expected.as_bytes());
        if found {
            self.at += expected.len();
        }
        found
    }

    #[inline(always)]
    fn literal(&mut self, expected: &str) -> Option<()> {
        self.skip(expected).then_some(())
    }

    fn take(&mut self, len: usize) -> Option<&'t str> {
        let taken = self.text.get(self.at..self.at + len)?;
        self.at += len;
        Some(taken)
    }

    /// A string with nothing escaped, as the writer copies most of them;
    /// an escaped one is read by serde_json.
    fn string(&mut self) -> Option<String> {
        let rest = self.rest();
        if rest.first() != Some(&b'"') {
            return None;
        }
        let len = rest[1..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[1 + len] != b'"' {
            return self.value();
        }
        let text = self.text.get(self.at + 1..self.at + 1 + len)?.to_owned();
        self.at += len + 2;
        Some(text)
    }

    /// A state, in quotes, without allocating its name.
    fn state(&mut self) -> Option<State> {
        let rest = self.rest();
        let state = State::ALL.into_iter().find(|state| {
            let name = state.as_str().as_bytes();
            rest.len() > name.len() + 1
                && rest[0] == b'"'
                && &rest[1..=name.len()] == name
                && rest[name.len() + 1] == b'"'
        })?;
        self.at += state.as_str().len() + 2;
        Some(state)
    }

    fn opt_string(&mut self) -> Option<Option<String>> {
        if self.skip("null") {
            return Some(None);
        }
        self.string().map(Some)
    }

    fn number(&mut self) -> Option<u32> {
        let digits = self
            .rest()
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        // JSON numbers have no leading zeros; u32 has at most ten digits.
        if digits == 0 || digits > 10 || (digits > 1 && self.rest()[0] == b'0') {
            return None;
        }
        let value = self.take(digits)?.parse().ok()?;
        Some(value)
    }

    fn timestamp(&mut self) -> Option<Timestamp> {
        self.literal("\"")?;
        let text = self.take(24)?;
        self.literal("\"")?;
        self.memo.read(text.as_bytes())
    }

    /// Skips `value` if the text holds exactly it, up to the comma after it.
    fn skip_value(&mut self, value: &str) -> bool {
        let rest = self.rest();
        let found = rest.starts_with(value.as_bytes()) && rest.get(value.len()) == Some(&b',');
        if found {
            self.at += value.len();
        }
        found
    }

    fn opt_timestamp(&mut self) -> Option<Option<Timestamp>> {
        if self.skip("null") {
            return Some(None);
        }
        self.timestamp().map(Some)
    }

    /// Any JSON value, read by serde_json, which tells where it ends: a
    /// scan for its end first cost a worker ~550 instructions a task of
    /// `offload bench`'s, a third of reading its payload (callgrind).
    fn value<T: DeserializeOwned>(&mut self) -> Option<T> {
        let mut values =
            serde_json::Deserializer::from_str(self.text.get(self.at..)?).into_iter::<T>();
        let value = values.next()?.ok()?;
        self.at += values.byte_offset();
        Some(value)
    }

    fn opt_value<T: DeserializeOwned>(&mut self) -> Option<Option<T>> {
        if self.skip("null") {
            return Some(None);
        }
        self.value().map(Some)
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

    /// Every optional field set, strings that need escaping, extreme
    /// numbers.
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
                at: Timestamp::from_millis(253_402_300_799_999),
            }],
            cancel_requested: true,
            created_at: at,
            started_at: Some(at),
            finished_at: Some(Timestamp::from_millis(253_402_300_799_999)),
            lease_expires_at: Some(at),
            worker_id: Some("w\\1".into()),
            ..plain()
        }
    }

    /// Timestamps RFC 3339's four-digit years cannot hold.
    fn far_timestamps() -> Task {
        Task {
            run_at: Timestamp::from_millis(-1),
            updated_at: Timestamp::from_millis(i64::MAX),
            finished_at: Some(Timestamp::from_millis(i64::MIN)),
            ..full()
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
        assert_same_as_serde(&far_timestamps());
    }

    /// Tasks whose timestamps differ, repeat and return, `extra` among
    /// them: more distinct ones than a memo holds, coming back in another
    /// order than they left.
    fn memo_workout(extra: Task) -> Vec<Task> {
        let later = Task {
            updated_at: Timestamp::from_millis(1_795_000_000_124),
            ..plain()
        };
        let cycling = (0..20).map(|i| Task {
            updated_at: Timestamp::from_millis(1_795_000_000_000 + (i * 7) % 6),
            started_at: Some(Timestamp::from_millis(1_795_000_000_100 + i % 3)),
            ..plain()
        });
        [plain(), later, plain(), full(), extra, plain()]
            .into_iter()
            .chain(cycling)
            .collect()
    }

    /// One memo across tasks whose timestamps differ, repeat and return,
    /// the far ones included, writes each task as serde does.
    #[test]
    fn tasks_sharing_a_timestamp_memo_are_each_written_as_serde_writes_them() {
        let tasks = memo_workout(far_timestamps());
        let mut memo = super::TimestampMemo::default();
        for task in &tasks {
            let mut written = Vec::new();
            task.write_json_with(&mut written, &mut memo)
                .expect("writes");
            let serde = serde_json::to_vec(task).expect("serializes");
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&serde)
            );
        }
    }

    fn written(task: &Task) -> String {
        let mut out = Vec::new();
        task.write_json(&mut out).expect("writes");
        String::from_utf8(out).expect("UTF-8")
    }

    /// Read back at an offset, the reader gives the task serde_json reads,
    /// and where it ends.
    fn assert_read_back(task: &Task) {
        let text = written(task);
        let framed = format!("[{text},1]");
        let (read, end) = Task::read_json_at(&framed, 1).expect("the canonical form is read");
        assert_eq!(end, 1 + text.len());
        let by_serde: Task = serde_json::from_str(&text).expect("serde reads it");
        assert_eq!(written(&read), written(&by_serde));
        assert_eq!(written(&read), text);
    }

    #[test]
    fn the_written_form_is_read_back() {
        assert_read_back(&plain());
        assert_read_back(&full());
        for state in State::ALL {
            assert_read_back(&Task { state, ..plain() });
        }
    }

    /// Tasks read one after another with one memo, their timestamps
    /// differing, repeating and returning, each read as serde reads it;
    /// a payload the reader sent is taken only where the bytes are the
    /// same, up to the comma after it.
    #[test]
    fn tasks_read_together_share_a_memo_and_take_only_the_payloads_sent() {
        let tasks = memo_workout(plain());
        let mut memo = super::TimestampMemo::default();
        for task in &tasks {
            let text = written(task);
            let (read, _) = Task::read_json_at_with(&text, 0, &mut memo, None).expect("reads");
            assert_eq!(written(&read), text);
        }
        let text = written(&plain());
        let sent = raw(r#"{"user_id":42,"template":"welcome"}"#);
        let (read, _) = Task::read_json_at_with(&text, 0, &mut memo, Some(&sent)).expect("reads");
        assert_eq!(read.payload.get(), sent.get());
        // A payload sent that is only the start of the text's, or another
        // one, is not taken.
        let twelve = written(&Task {
            payload: raw("12"),
            ..plain()
        });
        for sent in ["1", "[3]"] {
            let (read, _) =
                Task::read_json_at_with(&twelve, 0, &mut memo, Some(&raw(sent))).expect("reads");
            assert_eq!(read.payload.get(), "12");
        }
    }

    #[test]
    fn any_other_form_is_left_to_serde() {
        let text = written(&plain());
        let others = [
            text.replacen(",\"queue\"", ", \"queue\"", 1),
            text.replacen("{\"id\"", "{ \"id\"", 1),
            text.replacen("\"priority\":5", "\"priority\":05", 1),
            text.replacen("\"priority\":5", "\"priority\":5.0", 1),
            text.replacen("\"priority\":5", "\"priority\":256", 1),
            text.replacen("\"attempt\":0", "\"attempt\":4294967296", 1),
            text.replacen("\"state\":\"pending\"", "\"state\":\"waiting\"", 1),
            text.replacen("\"state\":\"pending\"", "\"state\":\"pendings\"", 1),
            text.replacen("\"state\":\"pending\"", "\"state\":xpending\"", 1),
            text.replacen("\"state\":\"pending\"", "\"state\":\"pend\\u0069ng\"", 1),
            text.replacen(".123Z", "+00:00", 1),
            text.replacen("\"owner\":null", "\"owner\":\"a\u{1}b\"", 1),
            text.replacen("\"payload\":{", "\"payload\":{{", 1),
            text[..text.len() - 1].to_owned(),
            written(&far_timestamps()),
        ];
        for other in others {
            assert!(
                Task::read_json_at(&other, 0).is_none(),
                "read a non-canonical form: {other}"
            );
        }
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
