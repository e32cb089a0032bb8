//! The worker runtime over HTTP: [`Client`] as a [`TaskSource`].

use std::time::Duration;

use offload_api::{
    AckBody, AckCompleted, AckFailed, AttemptErrorBody, FetchRequest, HeartbeatBody,
};
use offload_core::{
    Ack, ClaimRequest, Error, HeartbeatAck, HeartbeatRequest, ProgressUpdate, Result, Task,
};
use offload_worker::TaskSource;
use tokio_util::sync::CancellationToken;

use crate::{Client, ClientError};

/// Longest long poll the server accepts.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// How long a fetch's answer may still take once its worker stops. The
/// server answers a claim within milliseconds; dropping the request sooner
/// left a busy worker's last batch claimed and unseen until its lease ran
/// out (an attempt counted), on every stop. A long poll with nothing to
/// claim delays the stop by this much, then the server sees the request
/// dropped and withdraws it.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Maps the client's errors onto the store's, so the worker runtime reacts
/// to a remote 409 exactly as to a local conflict.
impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Unreachable { .. } => Error::Unavailable(e.to_string()),
            ClientError::InvalidUrl { .. } => Error::invalid("url", e.to_string()),
            ClientError::Unaddressable { field, rule } => Error::invalid(field, rule),
            ClientError::Api {
                status: 404,
                message,
                ..
            } => Error::NotFound(message),
            ClientError::Api {
                status: 409,
                message,
                ..
            } => Error::Conflict(message),
            // A body over the server's limit is refused the same every
            // time, as bad input is: the worker splits it, not repeats it.
            ClientError::Api {
                status: 400 | 413,
                message,
                ..
            } => Error::invalid("request", message),
            ClientError::Api {
                status: 503,
                message,
                ..
            } => Error::Unavailable(message),
            other => Error::Storage(other.to_string()),
        }
    }
}

#[async_trait::async_trait]
impl TaskSource for Client {
    /// A long poll. When `stop` fires, an answer already on its way still
    /// gets half a second (`STOP_GRACE`) to arrive, and the worker runs what it brings;
    /// after that the request is abandoned, and should the server claim a
    /// task in that very instant, its lease expires and it runs again
    /// (delivery is at-least-once). Once stopped, it asks for nothing.
    async fn fetch(
        &self,
        request: &ClaimRequest,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Task>> {
        if stop.is_cancelled() {
            return Ok(Vec::new());
        }
        let body = FetchRequest {
            worker_id: request.worker_id.clone(),
            types: Some(request.types.clone()),
            queues: Some(request.queues.clone()),
            limit: Some(request.limit as i64),
            wait_ms: Some(wait.min(MAX_WAIT).as_millis() as i64),
            lease_secs: Some(request.lease.as_secs().max(1) as i64),
        };
        let answer = Client::fetch(self, &body);
        tokio::pin!(answer);
        tokio::select! {
            tasks = &mut answer => Ok(tasks?),
            _ = stop.cancelled() => match tokio::time::timeout(STOP_GRACE, answer).await {
                Ok(Ok(tasks)) => Ok(tasks),
                // Nothing came, or an error did: nothing was claimed that
                // this worker could still run.
                Ok(Err(_)) | Err(_) => Ok(Vec::new()),
            },
        }
    }

    async fn heartbeat(&self, request: HeartbeatRequest) -> Result<HeartbeatAck> {
        let body = HeartbeatBody {
            worker_id: request.worker_id,
            // Its message cut to what the store keeps, as a failure's below.
            progress: request.progress.map(|progress| ProgressUpdate {
                message: progress.message.map(offload_core::truncate_message),
                ..progress
            }),
            lease_secs: Some(request.lease.as_secs().max(1) as i64),
        };
        Ok(Client::heartbeat(self, request.id, &body).await?)
    }

    async fn ack(&self, worker_id: &str, acks: Vec<Ack>) -> Result<Vec<Result<()>>> {
        // The server answers completed ones first, then failed ones; keep
        // where each came from to answer in the caller's order.
        let mut body = AckBody {
            worker_id: worker_id.to_owned(),
            completed: Vec::with_capacity(acks.len()),
            ..AckBody::default()
        };
        let mut order = Vec::with_capacity(acks.len());
        for ack in acks {
            match ack {
                Ack::Complete { id, result } => {
                    order.push((true, body.completed.len()));
                    body.completed.push(AckCompleted { id, result });
                }
                Ack::Fail { id, failure } => {
                    order.push((false, body.failed.len()));
                    body.failed.push(AckFailed {
                        id,
                        error: AttemptErrorBody {
                            // What the store keeps: a handler's error of
                            // megabytes would travel whole, to be cut there.
                            message: offload_core::truncate_message(failure.message),
                            kind: Some(failure.kind),
                        },
                        retry: failure.retry,
                        retry_in_secs: failure.retry_in.map(|d| d.as_secs() as i64),
                    });
                }
            }
        }
        let completed = body.completed.len();
        let results = Client::ack(self, &body).await?.results;
        if results.len() != order.len() {
            return Err(Error::Storage(format!(
                "the server answered {} of {} acknowledgements",
                results.len(),
                order.len()
            )));
        }
        let outcome = |i: usize| -> Result<()> {
            match &results[i].error {
                None => Ok(()),
                Some(detail) => Err(match detail.code.as_str() {
                    "conflict" => Error::Conflict(detail.message.clone()),
                    "not_found" => Error::NotFound(detail.message.clone()),
                    // The server words these "field: rule".
                    "invalid_argument" | "payload_too_large" => {
                        match detail.message.split_once(": ") {
                            Some((field, rule)) => Error::invalid(field, rule),
                            None => Error::invalid("ack", detail.message.clone()),
                        }
                    }
                    "unavailable" => Error::Unavailable(detail.message.clone()),
                    _ => Error::Storage(detail.message.clone()),
                }),
            }
        };
        Ok(order
            .into_iter()
            .map(|(done, i)| outcome(if done { i } else { completed + i }))
            .collect())
    }
}
