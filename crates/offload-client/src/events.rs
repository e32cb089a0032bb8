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
    /// Longest silence taken for a live stream: the server sends
    /// keep-alives, so a longer one is a connection that died unannounced.
    silence: Duration,
}

impl TaskEvents {
    pub(crate) fn new(response: reqwest::Response, silence: Duration) -> Self {
        Self {
            response,
            buffer: Vec::new(),
            silence,
        }
    }

    /// The next event, or `None` when the stream ends.
    pub async fn next(&mut self) -> ClientResult<Option<TaskEvent>> {
        loop {
            if let Some(end) = find_blank_line(&self.buffer) {
                let block: Vec<u8> = self.buffer.drain(..end.1).collect();
                if let Some(event) = parse_block(&block[..end.0])? {
                    return Ok(Some(event));
                }
                continue;
            }
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
/// blank line).
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_block(block: &[u8]) -> ClientResult<Option<TaskEvent>> {
    let text = String::from_utf8_lossy(block);
    let mut name = None;
    let mut data = String::new();
    for line in text.lines() {
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
