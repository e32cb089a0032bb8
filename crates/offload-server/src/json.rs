//! JSON answers. The same bytes and headers as `axum::Json`, written into a
//! `Vec`: serde_json writes a task as some 150 small pieces (each quote,
//! key and value apart), and a `Vec` takes each with an inlined copy where
//! axum's `BytesMut` writer goes through `BufMut` calls (a tenth of the
//! instructions spent answering a batch of tasks, measured with callgrind).
//! Tasks themselves are written by [`Task::write_json`], which skips
//! serde_json's escaping of every key (see `offload_core::task_json`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use offload_core::{Task, TimestampMemo};
use serde::Serialize;

use crate::error::ApiError;

/// A value answered as `application/json`.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(256);
        let written = serde_json::to_writer(&mut body, &self.0);
        answer(written.map(|()| body))
    }
}

/// The acks' answer, as `Json(results)` would answer it.
#[derive(Debug)]
pub struct AckResultsJson(pub offload_api::AckResults);

impl IntoResponse for AckResultsJson {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(16 + 64 * self.0.results.len());
        let written = self.0.write_json(&mut body);
        answer(written.map(|()| body))
    }
}

/// One task, answered as `Json(task)` would answer it.
#[derive(Debug)]
pub struct TaskJson(pub Task);

impl IntoResponse for TaskJson {
    fn into_response(self) -> Response {
        answer(task_json(&self.0))
    }
}

fn task_json(task: &Task) -> serde_json::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(640);
    task.write_json(&mut body)?;
    Ok(body)
}

/// `{"tasks": [...]}`, answered as `Json(TaskList { tasks })` would answer it.
#[derive(Debug)]
pub struct TaskListJson(pub Vec<Task>);

impl IntoResponse for TaskListJson {
    fn into_response(self) -> Response {
        task_list_json(&self.0)
    }
}

/// [`TaskListJson`]'s answer, written from borrowed tasks.
pub fn task_list_json<'t>(tasks: impl IntoIterator<Item = &'t Task>) -> Response {
    answer(task_list(tasks))
}

fn task_list<'t>(tasks: impl IntoIterator<Item = &'t Task>) -> serde_json::Result<Vec<u8>> {
    let tasks = tasks.into_iter();
    let mut body = Vec::with_capacity(16 + 640 * tasks.size_hint().0);
    body.extend_from_slice(b"{\"tasks\":[");
    let mut memo = TimestampMemo::default();
    for (i, task) in tasks.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        task.write_json_with(&mut body, &mut memo)?;
    }
    body.extend_from_slice(b"]}");
    Ok(body)
}

/// A value's JSON, for an answer that goes out through the budget of
/// unread answers (`unread.rs`).
pub fn json_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(not_written)
}

/// [`TaskJson`]'s bytes, for the same.
pub fn task_bytes(task: &Task) -> Result<Vec<u8>, ApiError> {
    task_json(task).map_err(not_written)
}

fn not_written(e: serde_json::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// `body`, JSON already written, as an `application/json` answer.
pub fn json_response(body: impl Into<axum::body::Body>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.into(),
    )
        .into_response()
}

/// `body` as an answer, or a plain-text 500 when its JSON could not be
/// written. Plain text, not an [`ApiError`]: an error's own answer is
/// written through here, so one whose JSON failed would come back here
/// again. (None fails: every type answered writes strings, numbers and
/// JSON already checked.)
fn answer(body: serde_json::Result<Vec<u8>>) -> Response {
    match body {
        Ok(body) => json_response(body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            e.to_string(),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use offload_api::TaskList;
    use offload_core::{NewTask, Task};

    use super::task_list;

    fn task(n: u32) -> Task {
        crate::test_task(
            NewTask::new("report.build")
                .payload(&serde_json::json!({ "n": n }))
                .expect("a JSON payload"),
        )
    }

    #[test]
    fn a_task_list_is_written_as_serde_writes_it() {
        for tasks in [vec![], vec![task(1)], vec![task(1), task(2), task(3)]] {
            let written = task_list(&tasks).expect("writes");
            let serde = serde_json::to_vec(&TaskList { tasks }).expect("serializes");
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&serde)
            );
        }
    }
}
