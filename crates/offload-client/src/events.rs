//! A reader of `text/event-stream` answers.

use std::time::Duration;

use offload_core::{EventKind, Task};

use crate::{ClientError, ClientResult};

/// One event of a task's stream.
#[derive(Clone, Debug)]
pub struct TaskEvent {
    pub kind: EventKind,
    pub task: Task,
}

/// The events of one stream, read as they arrive.
#[derive(Debug)]
pub struct TaskEvents {
    response: reqwest::Response,
    buffer: Vec<u8>,
    /// How much of `buffer` has been searched for the end of an event
    /// without finding one: a large event arrives in many chunks, and
    /// searching it again from its start at each was quadratic.
    searched: usize,
    /// Longest silence taken for a live stream: the server sends
    /// keep-alives, so a longer one is a connection that died unannounced.
    silence: Duration,
}

impl TaskEvents {
    pub(crate) fn new(response: reqwest::Response, silence: Duration) -> Self {
        Self {
            response,
            buffer: Vec::new(),
            searched: 0,
            silence,
        }
    }

    /// The next event, or `None` when the stream ends.
    pub async fn next(&mut self) -> ClientResult<Option<TaskEvent>> {
        loop {
            if let Some(end) = find_blank_line(&self.buffer, self.searched) {
                self.searched = 0;
                let block: Vec<u8> = self.buffer.drain(..end.1).collect();
                if let Some(event) = parse_block(&block[..end.0])? {
                    return Ok(Some(event));
                }
                continue;
            }
            self.searched = self.buffer.len();
            let Ok(read) = tokio::time::timeout(self.silence, self.response.chunk()).await else {
                return Err(ClientError::Unreachable {
                    url: self.response.url().to_string(),
                    message: format!(
                        "the event stream sent nothing, not even a keep-alive, for {}s",
                        self.silence.as_secs()
                    ),
                });
            };
            match read {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(ClientError::Unreachable {
                        url: self.response.url().to_string(),
                        message: format!("the event stream broke: {e}"),
                    });
                }
            }
        }
    }
}

/// Where the first event block ends: (end of its text, end including the
/// blank line). The first `searched` bytes are known to hold no blank line
/// (though one may begin in their last three).
fn find_blank_line(buffer: &[u8], searched: usize) -> Option<(usize, usize)> {
    (searched.saturating_sub(3)..buffer.len()).find_map(|i| {
        let rest = &buffer[i..];
        if rest.starts_with(b"\n\n") {
            Some((i, i + 2))
        } else if rest.starts_with(b"\r\n\r\n") {
            Some((i, i + 4))
        } else {
            None
        }
    })
}

fn parse_block(block: &[u8]) -> ClientResult<Option<TaskEvent>> {
    let text = String::from_utf8_lossy(block);
    let mut name = None;
    let mut data = String::new();
    // The event-stream format ends a line at CRLF, LF or a lone CR.
    for line in text.split(['\r', '\n']) {
        if let Some(value) = line.strip_prefix("event:") {
            name = Some(value.trim().to_owned());
        } else if let Some(value) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
        // Comments (keep-alives) and other fields are skipped.
    }
    let kind = match name.as_deref() {
        Some("task.state") => EventKind::State,
        Some("task.progress") => EventKind::Progress,
        _ => return Ok(None),
    };
    let task = serde_json::from_str(&data)
        .map_err(|e| ClientError::Protocol(format!("bad event data: {e}")))?;
    Ok(Some(TaskEvent { kind, task }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_field_over_lines_ended_by_cr_lf_or_crlf_is_read_whole() {
        let spec = offload_core::NewTask::new("t")
            .validate(
                &offload_core::Limits::default(),
                offload_core::Position::Alone,
            )
            .unwrap();
        let task = Task::new_from_spec(
            uuid::Uuid::now_v7(),
            spec,
            offload_core::Timestamp::from_millis(5),
            false,
        );
        let json = serde_json::to_string(&task).unwrap();
        // Cut after a comma: the line break that joins the pieces again is
        // whitespace between tokens.
        let cut = json.find(',').unwrap() + 1;
        let (head, tail) = json.split_at(cut);
        for end in ["\n", "\r", "\r\n"] {
            let block = format!("event: task.state{end}data: {head}{end}data: {tail}");
            let event = parse_block(block.as_bytes()).unwrap().expect("an event");
            assert_eq!(event.task.id, task.id, "lines ended by {end:?}");
        }
    }

    #[test]
    fn an_event_split_anywhere_across_chunks_ends_where_it_ends_whole() {
        for (stream, end) in [
            (&b"event: task.state\ndata: {}\n\nevent: next"[..], (26, 28)),
            (
                &b"event: task.state\r\ndata: {}\r\n\r\n: keep-alive"[..],
                (27, 31),
            ),
        ] {
            assert_eq!(find_blank_line(stream, 0), Some(end));
            for arrived in 0..=stream.len() {
                let found_early = find_blank_line(&stream[..arrived], 0);
                let searched = if found_early.is_some() { 0 } else { arrived };
                assert_eq!(
                    found_early.or_else(|| find_blank_line(stream, searched)),
                    Some(end),
                    "the first {arrived} bytes arrived alone"
                );
            }
        }
    }
}
