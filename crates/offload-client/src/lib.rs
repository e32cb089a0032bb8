//! A Rust client for Offload's HTTP API (SPEC §4), and
//! [`offload_worker::TaskSource`] for running the worker runtime against a
//! remote server:
//!
//! ```no_run
//! # async fn example() -> Result<(), offload_client::ClientError> {
//! use offload_client::Client;
//! use offload_core::NewTask;
//!
//! let client = Client::new("http://127.0.0.1:6490");
//! let (task, _created) = client.enqueue(&NewTask::new("email.send")).await?;
//! let finished = client.wait(task.id).await?;
//! println!("{} ended {}", finished.id, finished.state);
//! # Ok(()) }
//! ```

mod events;
mod plain;
mod source;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offload_api::{
    AckBody, AckResults, BatchIds, CompleteBody, Deleted, ErrorBody, FailBody, FetchRequest,
    Health, HeartbeatBody, QueueList, QueueUpdate, TaskList,
};
use offload_core::{
    HeartbeatAck, Json, NewTask, QueueInfo, State, Stats, Task, TaskPage, Timestamp, TimestampMemo,
};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

pub use events::{TaskEvent, TaskEvents};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached at all.
    #[error("cannot reach the Offload server at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The server answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The client's URL cannot name a server (`127.0.0.1:6490` without its
    /// scheme, say): no request was sent.
    #[error(
        "{url:?} is not an Offload server's URL: it must be http:// or https:// and a host, as in http://127.0.0.1:6490 ({message})"
    )]
    InvalidUrl { url: String, message: String },
    /// A name no request's URL can carry (a queue named `.` or `..`: a
    /// URL's path folds such a segment away, percent-encoded or not, and
    /// the request would reach another route): no request was sent.
    #[error("{field}: {rule}")]
    Unaddressable { field: &'static str, rule: String },
    /// The server's answer made no sense to this client.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether asking again later may succeed: the server could not be
    /// reached (a restart, a deploy) or said it is unavailable.
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. }) || self.status() == Some(503)
    }
}

/// How long a request may take, from sending it to the last byte of its
/// answer, unless [`Client::timeout`] says otherwise; a long poll's fetch
/// gets its wait on top, a batch enqueue [`BATCH_TIME_PER_MIB`], and a
/// clear, which takes as long as what it finds to delete, has no limit of
/// its own. Without one, a request on a connection that went silent (the
/// server's host gone without a word, a firewall or NAT that forgot the
/// connection, a hung server) waited as long as the kernel kept
/// retransmitting, about a quarter of an hour, and a worker's heartbeats,
/// fetches and acknowledgements with it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the server sends an event stream a keep-alive (SPEC §4.2). A
/// stream silent for this long and the client's timeout is taken for a
/// connection that died.
const STREAM_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How much longer than the client's timeout a batch enqueue may take for
/// each MiB it carries: its upload at 1 MiB/s, or the server's work on it.
/// A batch of 10,000 tasks of 25 KiB (250 MB) was answered in 7 to 11 s
/// by a node on PostgreSQL on one machine, upload included.
pub const BATCH_TIME_PER_MIB: Duration = Duration::from_secs(1);

/// What a request that ran out of time is said to have met.
const NO_ANSWER_IN_TIME: &str = "no answer before the request's timeout";

/// How long [`Client::wait`] keeps asking a server that went away after it
/// answered once, before it gives up with the last error.
pub const WAIT_THROUGH_OUTAGE: Duration = Duration::from_secs(60);

pub type ClientResult<T> = Result<T, ClientError>;

/// Filters for [`Client::list`].
#[derive(Clone, Debug, Default)]
pub struct ListParams {
    pub states: Vec<State>,
    pub task_type: Option<String>,
    pub queue: Option<String>,
    pub owner: Option<String>,
    pub labels: Vec<(String, String)>,
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// A handle on one Offload server; cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// Requests to an `http://` server other than event streams go
    /// through this client's own HTTP/1.1 (`plain.rs`).
    plain: Option<Arc<plain::Plain>>,
    base: String,
    /// `base` parsed once: parsing each request's whole URL was a quarter
    /// of this client's instructions for a single enqueue (callgrind).
    base_url: Option<reqwest::Url>,
    token: Option<String>,
    timeout: Duration,
    buffers: Arc<Buffers>,
}

/// Answer bodies at most kept for reuse, and the largest kept.
const KEPT_BUFFERS: usize = 4;
const KEPT_BUFFER_BYTES: usize = 2 << 20;

/// Buffers answers are read into, kept between requests. A batch's or a
/// fetch's answer is hundreds of KiB: read into fresh memory each time, it
/// cost this client ~150 page faults a 1,000-task batch, and copying it
/// from the connection's buffers into one more.
#[derive(Debug, Default)]
struct Buffers {
    kept: Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    fn take(self: &Arc<Self>) -> Body {
        let bytes = self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        Body {
            bytes,
            buffers: Arc::clone(self),
        }
    }
}

/// An answer's body; its buffer goes back to the client's when dropped.
struct Body {
    bytes: Vec<u8>,
    buffers: Arc<Buffers>,
}

impl std::ops::Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if self.bytes.capacity() > KEPT_BUFFER_BYTES {
            return;
        }
        let mut kept = self.buffers.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < KEPT_BUFFERS {
            let mut bytes = std::mem::take(&mut self.bytes);
            bytes.clear();
            kept.push(bytes);
        }
    }
}

impl Client {
    /// A client of the server at `url`, whose connections are kept open
    /// between requests; one whose far end stops acknowledging is closed
    /// within about half a minute (TCP keepalives, and on Linux
    /// `TCP_USER_TIMEOUT`), whatever request it carries.
    pub fn new(url: impl Into<String>) -> Self {
        let base = url.into().trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Below the server's `idle_timeout_secs` (75 s by default), so
            // that this side closes an idle connection first: a request
            // sent as the server closes one fails.
            .pool_idle_timeout(Duration::from_secs(50))
            // A connection whose far end stopped acknowledging anything (its
            // host gone, a partition) is closed by the kernel within about
            // half a minute, also under a request without a timeout of its
            // own: probed once idle, and nothing sent left unacknowledged
            // for longer.
            .tcp_keepalive(Duration::from_secs(15))
            .tcp_keepalive_interval(Duration::from_secs(5))
            // The system's roots (or SSL_CERT_FILE's), for a server behind
            // a TLS proxy that an organisation's own CA signed. Reading them
            // took 2.3 ms of each command line's 6.5; a plain `http://`
            // server needs none.
            .tls_built_in_native_certs(
                base.get(..8)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://")),
            );
        #[cfg(target_os = "linux")]
        let http = http.tcp_user_timeout(Duration::from_secs(30));
        let http = http.build().unwrap_or_default();
        let base_url = reqwest::Url::parse(&base)
            .ok()
            .filter(|url| !url.cannot_be_a_base() && url.query().is_none());
        let plain = base_url
            .as_ref()
            .and_then(plain::Plain::for_url)
            .map(Arc::new);
        Self {
            http,
            plain,
            base,
            base_url,
            token: None,
            timeout: DEFAULT_TIMEOUT,
            buffers: Arc::default(),
        }
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How long a request may take before it fails as
    /// [`ClientError::Unreachable`]; [`DEFAULT_TIMEOUT`] unless set. A
    /// fetch may take its long poll's wait longer; an event stream may stay
    /// silent this long past the server's keep-alives.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.untimed_request(method, path).timeout(self.timeout)
    }

    /// A request without a limit on its whole answer: an event stream's,
    /// which lasts as long as its task does, and a clear, whose work grows
    /// with what it finds (millions of tasks). A dead connection under them
    /// is the kernel's to end (see [`Client::new`]).
    fn untimed_request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = match &self.base_url {
            // A path with a query is parsed whole, as any other URL.
            Some(base) if !path.contains(['?', '#']) => {
                let mut url = base.clone();
                url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
                self.http.request(method, url)
            }
            _ => self.http.request(method, format!("{}{path}", self.base)),
        };
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends a request through reqwest; an answer other than a success is
    /// the error it says.
    async fn send(&self, builder: RequestBuilder) -> ClientResult<reqwest::Response> {
        let request = builder.build().map_err(|e| self.unreachable(&e))?;
        self.send_through_reqwest(request).await
    }

    async fn send_through_reqwest(
        &self,
        request: reqwest::Request,
    ) -> ClientResult<reqwest::Response> {
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| self.unreachable(&e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| self.unreachable(&e))?;
        Err(api_error(status, &body))
    }

    /// Sends a request and reads its whole answer: its status and body.
    /// An answer other than a success is the error it says.
    async fn exchange(&self, builder: RequestBuilder) -> ClientResult<(StatusCode, Body)> {
        let request = builder.build().map_err(|e| self.unreachable(&e))?;
        let plain = self
            .plain
            .as_ref()
            .filter(|_| request.url().scheme() == "http");
        let sent = match request.body() {
            None => Some(&[][..]),
            Some(body) => body.as_bytes(),
        };
        let (Some(plain), Some(sent)) = (plain, sent) else {
            return self.exchange_through_reqwest(request).await;
        };
        let url = request.url();
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let plain_request = plain::Request {
            method: request.method().as_str(),
            target: &target,
            headers: request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes()))
                .collect(),
            body: sent,
        };
        let mut body = self.buffers.take();
        let exchanged = plain.exchange(&plain_request, &mut body.bytes);
        let status = match request.timeout() {
            Some(limit) => tokio::time::timeout(*limit, exchanged).await.map_err(|_| {
                ClientError::Unreachable {
                    url: self.base.clone(),
                    message: NO_ANSWER_IN_TIME.to_owned(),
                }
            })?,
            None => exchanged.await,
        };
        let status = status.map_err(|failure| match failure {
            plain::Failure::Io(e) => ClientError::Unreachable {
                url: self.base.clone(),
                message: e.to_string(),
            },
            plain::Failure::Protocol(message) => ClientError::Protocol(message),
        })?;
        let status = StatusCode::from_u16(status)
            .map_err(|_| ClientError::Protocol(format!("an answer with status {status}")))?;
        if !status.is_success() {
            return Err(api_error(status.as_u16(), &body));
        }
        Ok((status, body))
    }

    /// [`Client::exchange`] for a request this client's own HTTP/1.1 does
    /// not carry: to an `https://` server, or with a streamed body.
    async fn exchange_through_reqwest(
        &self,
        request: reqwest::Request,
    ) -> ClientResult<(StatusCode, Body)> {
        let mut response = self.send_through_reqwest(request).await?;
        let mut body = self.buffers.take();
        // Room for what the server says it sends, up to what a kept buffer
        // may hold: a length larger than that is not taken on trust.
        if let Some(length) = response.content_length() {
            let length = usize::try_from(length).unwrap_or(usize::MAX);
            body.bytes.reserve(length.min(KEPT_BUFFER_BYTES));
        }
        while let Some(chunk) = response.chunk().await.map_err(|e| self.unreachable(&e))? {
            body.bytes.extend_from_slice(&chunk);
        }
        Ok((response.status(), body))
    }

    fn unreachable(&self, e: &reqwest::Error) -> ClientError {
        // Said as a server that is down, a bad URL would be asked again
        // and again by callers that wait out outages.
        if e.is_builder() {
            return ClientError::InvalidUrl {
                url: self.base.clone(),
                message: std::error::Error::source(e)
                    .map_or_else(|| e.to_string(), ToString::to_string),
            };
        }
        let mut message = if e.is_timeout() {
            NO_ANSWER_IN_TIME.to_owned()
        } else {
            e.to_string()
        };
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        ClientError::Unreachable {
            url: self.base.clone(),
            message,
        }
    }

    async fn answer(&self, builder: RequestBuilder) -> ClientResult<Body> {
        Ok(self.exchange(builder).await?.1)
    }

    async fn json<T: DeserializeOwned>(&self, builder: RequestBuilder) -> ClientResult<T> {
        parse(&self.answer(builder).await?)
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> ClientResult<T> {
        self.json(self.request(Method::POST, path).json(body)).await
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> ClientResult<T> {
        self.json(self.request(Method::GET, path)).await
    }

    /// Enqueues one task; `true` when created, `false` when an active task
    /// holding its unique key was returned.
    pub async fn enqueue(&self, task: &NewTask) -> ClientResult<(Task, bool)> {
        let (status, body) = self
            .exchange(self.request(Method::POST, "/v1/tasks").json(task))
            .await?;
        Ok((parse_task(&body)?, status == StatusCode::CREATED))
    }

    /// Enqueues up to 10,000 tasks, all or nothing; the answer is the
    /// tasks in the same order.
    pub async fn enqueue_batch(&self, tasks: &[NewTask]) -> ClientResult<Vec<Task>> {
        let bytes = self.answer(self.batch_request(tasks)?).await?;
        // The answer carries the payloads back; the ones sent need no
        // second check.
        let sent = |i: usize| tasks.get(i).and_then(|task| task.payload.as_ref());
        parse_or(&bytes, |text| read_task_list(text, sent)).map(|TaskList { tasks }| tasks)
    }

    /// A batch enqueue's request, its time limit grown by
    /// [`BATCH_TIME_PER_MIB`] for each MiB of its body.
    fn batch_request(&self, tasks: &[NewTask]) -> ClientResult<RequestBuilder> {
        let body = serde_json::to_vec(&BatchOf { tasks })
            .map_err(|e| ClientError::Protocol(format!("a batch is not JSON: {e}")))?;
        let mib = u32::try_from(body.len().div_ceil(1 << 20)).unwrap_or(u32::MAX);
        let limit = self
            .timeout
            .saturating_add(BATCH_TIME_PER_MIB.saturating_mul(mib));
        Ok(self
            .untimed_request(Method::POST, "/v1/tasks/batch")
            .timeout(limit)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body))
    }

    /// Enqueues a batch as [`Client::enqueue_batch`] does, all or nothing,
    /// and reads back only the tasks' ids, in the order sent: the server
    /// answers `Prefer: return=minimal` without the tasks themselves.
    pub async fn enqueue_batch_ids(&self, tasks: &[NewTask]) -> ClientResult<Vec<Uuid>> {
        let request = self
            .batch_request(tasks)?
            .header("prefer", "return=minimal");
        let BatchIds { ids } = parse(&self.answer(request).await?)?;
        if ids.len() != tasks.len() {
            return Err(ClientError::Protocol(format!(
                "{} tasks were sent and {} ids came back",
                tasks.len(),
                ids.len()
            )));
        }
        Ok(ids)
    }

    pub async fn get(&self, id: Uuid) -> ClientResult<Task> {
        let request = self.request(Method::GET, &format!("/v1/tasks/{id}"));
        parse_task(&self.answer(request).await?)
    }

    pub async fn list(&self, params: &ListParams) -> ClientResult<TaskPage> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if !params.states.is_empty() {
            let states: Vec<&str> = params.states.iter().map(|s| s.as_str()).collect();
            query.push(("state", states.join(",")));
        }
        let optional = [
            ("type", &params.task_type),
            ("queue", &params.queue),
            ("owner", &params.owner),
            ("cursor", &params.cursor),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                query.push((key, v.clone()));
            }
        }
        for (k, v) in &params.labels {
            query.push(("label", format!("{k}:{v}")));
        }
        if let Some(t) = params.created_after {
            query.push(("created_after", t.to_string()));
        }
        if let Some(t) = params.created_before {
            query.push(("created_before", t.to_string()));
        }
        if let Some(limit) = params.limit {
            query.push(("limit", limit.to_string()));
        }
        self.json(self.request(Method::GET, "/v1/tasks").query(&query))
            .await
    }

    pub async fn stats(&self) -> ClientResult<Stats> {
        self.get_json("/v1/stats").await
    }

    pub async fn cancel(&self, id: Uuid) -> ClientResult<Task> {
        self.json(self.request(Method::POST, &format!("/v1/tasks/{id}/cancel")))
            .await
    }

    pub async fn retry(&self, id: Uuid) -> ClientResult<Task> {
        self.json(self.request(Method::POST, &format!("/v1/tasks/{id}/retry")))
            .await
    }

    pub async fn delete(&self, id: Uuid) -> ClientResult<()> {
        self.exchange(self.request(Method::DELETE, &format!("/v1/tasks/{id}")))
            .await
            .map(drop)
    }

    /// Deletes finished tasks in `states` (all finished states if empty).
    pub async fn clear(&self, states: &[State], older_than: Option<Duration>) -> ClientResult<u64> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if !states.is_empty() {
            let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
            query.push(("state", states.join(",")));
        }
        if let Some(d) = older_than {
            query.push(("older_than_secs", d.as_secs().to_string()));
        }
        let deleted: Deleted = self
            .json(
                self.untimed_request(Method::DELETE, "/v1/tasks")
                    .query(&query),
            )
            .await?;
        Ok(deleted.deleted)
    }

    pub async fn queues(&self) -> ClientResult<Vec<QueueInfo>> {
        let list: QueueList = self.get_json("/v1/queues").await?;
        Ok(list.queues)
    }

    pub async fn pause(&self, queue: &str) -> ClientResult<QueueInfo> {
        self.json(self.request(Method::POST, &queue_path(queue, "/pause")?))
            .await
    }

    pub async fn resume(&self, queue: &str) -> ClientResult<QueueInfo> {
        self.json(self.request(Method::POST, &queue_path(queue, "/resume")?))
            .await
    }

    /// Limits how many of the queue's tasks run at once (`None`: no limit).
    pub async fn set_concurrency(
        &self,
        queue: &str,
        limit: Option<u32>,
    ) -> ClientResult<QueueInfo> {
        let body = QueueUpdate {
            concurrency: Some(limit.map(i64::from)),
        };
        self.json(
            self.request(Method::PATCH, &queue_path(queue, "")?)
                .json(&body),
        )
        .await
    }

    pub async fn health(&self) -> ClientResult<Health> {
        self.get_json("/health").await
    }

    // ---- the worker protocol ----------------------------------------------

    pub async fn fetch(&self, request: &FetchRequest) -> ClientResult<Vec<Task>> {
        let wait = Duration::from_millis(request.wait_ms.unwrap_or(0).max(0) as u64);
        let request = self
            .request(Method::POST, "/v1/fetch")
            .timeout(self.timeout + wait)
            .json(request);
        parse_tasks(&self.answer(request).await?)
    }

    pub async fn heartbeat(&self, id: Uuid, body: &HeartbeatBody) -> ClientResult<HeartbeatAck> {
        self.post(&format!("/v1/tasks/{id}/heartbeat"), body).await
    }

    pub async fn complete(&self, id: Uuid, body: &CompleteBody) -> ClientResult<Task> {
        self.post(&format!("/v1/tasks/{id}/complete"), body).await
    }

    pub async fn fail(&self, id: Uuid, body: &FailBody) -> ClientResult<Task> {
        self.post(&format!("/v1/tasks/{id}/fail"), body).await
    }

    pub async fn ack(&self, body: &AckBody) -> ClientResult<AckResults> {
        let mut json = Vec::with_capacity(64 + 48 * body.completed.len());
        body.write_json(&mut json)
            .map_err(|e| ClientError::Protocol(format!("an ack is not JSON: {e}")))?;
        let request = self
            .request(Method::POST, "/v1/ack")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json);
        parse_ack_results(&self.answer(request).await?)
    }

    // ---- following tasks ------------------------------------------------------

    /// The task's changes as server-sent events, starting with its current
    /// state; ends after its terminal event.
    pub async fn events(&self, id: Uuid) -> ClientResult<TaskEvents> {
        self.stream(self.untimed_request(Method::GET, &format!("/v1/tasks/{id}/events")))
            .await
    }

    /// Every task change (optionally only of one queue, type or owner) as
    /// server-sent events; runs until the server stops.
    pub async fn all_events(
        &self,
        queue: Option<&str>,
        task_type: Option<&str>,
        owner: Option<&str>,
    ) -> ClientResult<TaskEvents> {
        let query: Vec<(&str, &str)> = [("queue", queue), ("type", task_type), ("owner", owner)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        self.stream(
            self.untimed_request(Method::GET, "/v1/events")
                .query(&query),
        )
        .await
    }

    /// Opens an event stream: its first answer within the client's timeout,
    /// then no silence longer than the server's keep-alive interval and the
    /// timeout together.
    async fn stream(&self, builder: RequestBuilder) -> ClientResult<TaskEvents> {
        let response = tokio::time::timeout(self.timeout, self.send(builder))
            .await
            .map_err(|_| ClientError::Unreachable {
                url: self.base.clone(),
                message: NO_ANSWER_IN_TIME.to_owned(),
            })??;
        Ok(TaskEvents::new(response, STREAM_KEEP_ALIVE + self.timeout))
    }

    /// Waits until the task finishes and returns it, following it through
    /// restarts of the server ([`Client::follow`]).
    pub async fn wait(&self, id: Uuid) -> ClientResult<Task> {
        let mut following = self.follow(id);
        loop {
            let task = following.next().await?;
            if task.state.is_finished() {
                return Ok(task);
            }
        }
    }

    /// Task `id`'s states as they change, over its event stream, followed
    /// again when the stream drops: for up to [`WAIT_THROUGH_OUTAGE`] while
    /// a server that answered once cannot be reached or is unavailable (a
    /// restart, a deploy). A server that never answered fails the first
    /// [`Following::next`] at once.
    pub fn follow(&self, id: Uuid) -> Following<'_> {
        Following {
            client: self,
            id,
            events: None,
            reached: false,
            away_since: None,
        }
    }
}

/// A task followed through its changes; see [`Client::follow`].
#[derive(Debug)]
pub struct Following<'c> {
    client: &'c Client,
    id: Uuid,
    events: Option<TaskEvents>,
    reached: bool,
    /// Since when the server has been out of reach, while it is.
    away_since: Option<Instant>,
}

impl Following<'_> {
    /// The task's next state; the caller stops at a finished one.
    pub async fn next(&mut self) -> ClientResult<Task> {
        loop {
            match self.step().await {
                Ok(Some(task)) => {
                    self.away_since = None;
                    return Ok(task);
                }
                // The stream ended with the task still active: follow again.
                Ok(None) => self.away_since = None,
                Err(e) if e.is_transient() && self.reached => {
                    let since = *self.away_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= WAIT_THROUGH_OUTAGE {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One event, or, where the stream dropped, one look at the task:
    /// `Some` if it finished meanwhile.
    async fn step(&mut self) -> ClientResult<Option<Task>> {
        let events = match &mut self.events {
            Some(events) => events,
            None => {
                let events = self.client.events(self.id).await?;
                self.reached = true;
                self.events.insert(events)
            }
        };
        match events.next().await {
            Ok(Some(event)) => return Ok(Some(event.task)),
            Err(e) if !e.is_transient() => return Err(e),
            Ok(None) | Err(_) => self.events = None,
        }
        let task = self.client.get(self.id).await?;
        Ok(task.state.is_finished().then_some(task))
    }
}

/// The error an answer other than a success says: the server's error body
/// where it sent one, its text otherwise.
fn api_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => ClientError::Api {
            status,
            code: error.code,
            message: error.message,
        },
        Err(_) => ClientError::Api {
            status,
            code: "http_error".into(),
            message: String::from_utf8_lossy(body).chars().take(300).collect(),
        },
    }
}

/// Parses an answer. Parsed from bytes, serde_json checks each string (each
/// field name too) for UTF-8 on its own: 12% of the instructions of
/// `offload bench`'s workers and producers (callgrind). One check of the
/// whole body costs little.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> ClientResult<T> {
    parse_or(bytes, |_| None)
}

/// Parses an answer, first with `read`, which reads the server's own form
/// of it faster than serde_json or gives up (`None`).
fn parse_or<T: DeserializeOwned>(
    bytes: &[u8],
    read: impl FnOnce(&str) -> Option<T>,
) -> ClientResult<T> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ClientError::Protocol(format!("the answer is not UTF-8: {e}")))?;
    match read(text) {
        Some(value) => Ok(value),
        None => serde_json::from_str(text).map_err(|e| ClientError::Protocol(e.to_string())),
    }
}

/// An ack's answer: see [`AckResults::read_json`].
fn parse_ack_results(bytes: &[u8]) -> ClientResult<AckResults> {
    parse_or(bytes, AckResults::read_json)
}

/// One task: see [`Task::read_json_at`].
fn parse_task(bytes: &[u8]) -> ClientResult<Task> {
    parse_or(bytes, |text| {
        Task::read_json_at(text, 0)
            .filter(|(_, end)| *end == text.len())
            .map(|(task, _)| task)
    })
}

/// The path of `queue`'s route, then `rest`, the name written as one
/// percent-encoded segment: a name the server would refuse (`a/b`, `q?x`)
/// reaches it as that name, to be told why, instead of naming another
/// route or another queue. `.` and `..` (which SPEC §1 allows) no URL can
/// carry: they are refused here, where the server's answer would have
/// been another route's 404 or 405.
fn queue_path(queue: &str, rest: &str) -> ClientResult<String> {
    if queue == "." || queue == ".." {
        return Err(ClientError::Unaddressable {
            field: "queue",
            rule: format!(
                "a queue named {queue:?} cannot be named in a URL's path, which folds . and .. away; its tasks still run, and the queue list shows it"
            ),
        });
    }
    let mut path = String::from("/v1/queues/");
    for byte in queue.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            path.push(char::from(byte));
        } else {
            let _ = write!(path, "%{byte:02X}");
        }
    }
    path.push_str(rest);
    Ok(path)
}

/// `POST /v1/tasks/batch`'s body, borrowed: the same JSON as
/// `BatchEnqueue`'s.
#[derive(Serialize)]
struct BatchOf<'a> {
    tasks: &'a [NewTask],
}

/// `{"tasks": [...]}`, as fetch and batch enqueue answer.
fn parse_tasks(bytes: &[u8]) -> ClientResult<Vec<Task>> {
    parse_or(bytes, |text| read_task_list(text, |_| None)).map(|TaskList { tasks }| tasks)
}

/// Fewer bytes than any task takes in the server's form, which writes every
/// field, `null` or empty as it may be (the smallest task: ~500 bytes).
const SMALLEST_TASK_JSON: usize = 400;
/// Tasks reserved for at most before reading: a fetch's or a batch's limit.
const MAX_PRESIZED: usize = 1000;

/// A task list in the server's own form, or `None`; `sent(i)` is the
/// payload the caller sent for the `i`th task, if it sent one.
fn read_task_list<'p>(text: &str, sent: impl Fn(usize) -> Option<&'p Json>) -> Option<TaskList> {
    let listed = text.strip_prefix("{\"tasks\":[")?.strip_suffix("]}")?;
    // Sized once from the text: grown by doubling, the list copied each
    // task once more on average (`offload bench`'s load generator: -2.4 to
    // -2.9% of its instructions with this and the ack batches sized).
    let mut tasks = Vec::with_capacity((listed.len() / SMALLEST_TASK_JSON + 1).min(MAX_PRESIZED));
    let mut memo = TimestampMemo::default();
    let mut at = 0;
    while at < listed.len() {
        if !tasks.is_empty() {
            (listed.as_bytes()[at] == b',').then_some(())?;
            at += 1;
        }
        let (task, end) = Task::read_json_at_with(listed, at, &mut memo, sent(tasks.len()))?;
        tasks.push(task);
        at = end;
    }
    Some(TaskList { tasks })
}

#[cfg(test)]
mod tests {
    use offload_core::{Limits, NewTask, Task, Timestamp};
    use uuid::Uuid;

    use std::sync::Arc;

    use offload_api::{AckResult, AckResults, ErrorDetail};

    use super::{
        Buffers, Client, KEPT_BUFFER_BYTES, KEPT_BUFFERS, parse_ack_results, parse_task,
        parse_tasks, queue_path, read_task_list,
    };

    #[test]
    fn a_queue_no_url_can_name_is_refused_before_sending() {
        for name in [".", ".."] {
            let refused = queue_path(name, "/pause").unwrap_err();
            assert!(
                refused.to_string().starts_with("queue: a queue named"),
                "{refused}"
            );
        }
        assert!(queue_path("...", "/pause").is_ok(), "not a dot segment");
    }

    /// A request's URL is the base's, its path joined to the base's own
    /// path, whether the base was parsed once or the URL is parsed whole.
    #[test]
    fn request_urls_join_the_base_and_the_path() {
        let cases = [
            (
                "http://127.0.0.1:6490",
                "/v1/tasks",
                "http://127.0.0.1:6490/v1/tasks",
            ),
            (
                "http://127.0.0.1:6490/",
                "/v1/fetch",
                "http://127.0.0.1:6490/v1/fetch",
            ),
            (
                "http://example.com/offload/",
                "/v1/tasks/abc/cancel",
                "http://example.com/offload/v1/tasks/abc/cancel",
            ),
            (
                "https://example.com:8443/a/b",
                &queue_path("emails/eu", "/pause").unwrap(),
                "https://example.com:8443/a/b/v1/queues/emails%2Feu/pause",
            ),
            (
                "http://127.0.0.1:6490",
                "/v1/tasks?state=pending",
                "http://127.0.0.1:6490/v1/tasks?state=pending",
            ),
        ];
        for (base, path, url) in cases {
            let client = Client::new(base);
            let request = client.request(reqwest::Method::POST, path).build().unwrap();
            assert_eq!(request.url().as_str(), url, "{base} + {path}");
        }
    }

    #[test]
    fn answer_buffers_are_reused_up_to_a_few_of_bounded_size() {
        let buffers = Arc::new(Buffers::default());
        let mut body = buffers.take();
        body.bytes.extend_from_slice(&[7; 1000]);
        let first = body.bytes.as_ptr();
        drop(body);
        let again = buffers.take();
        assert!(again.is_empty(), "handed back empty");
        assert!(again.bytes.capacity() >= 1000);
        assert_eq!(again.bytes.as_ptr(), first, "the same memory");
        drop(again);

        let mut huge = buffers.take();
        huge.bytes.reserve(KEPT_BUFFER_BYTES + 1);
        drop(huge);
        assert_eq!(buffers.kept.lock().unwrap().len(), 0, "too large to keep");

        let many: Vec<_> = (0..KEPT_BUFFERS + 2).map(|_| buffers.take()).collect();
        drop(many);
        assert_eq!(buffers.kept.lock().unwrap().len(), KEPT_BUFFERS);
    }

    fn task(n: u32) -> Task {
        let spec = NewTask::new("report.build")
            .payload(&serde_json::json!({ "n": n, "text": "a \"quoted\" word" }))
            .expect("a JSON payload")
            .validate(&Limits::default(), offload_core::Position::Alone)
            .expect("a valid task");
        Task::new_from_spec(
            Uuid::now_v7(),
            spec,
            Timestamp::from_millis(1_795_000_000_000),
            false,
        )
    }

    /// The server's form: fields in their declared order.
    fn json(tasks: &[Task]) -> String {
        let each: Vec<String> = tasks
            .iter()
            .map(|t| serde_json::to_string(t).expect("serializes"))
            .collect();
        format!("{{\"tasks\":[{}]}}", each.join(","))
    }

    /// The borrowed batch body is the one `offload_api` describes.
    #[test]
    fn a_batch_is_sent_as_batch_enqueue_writes_it() {
        let tasks = vec![
            NewTask::new("a"),
            NewTask::new("b")
                .queue("q")
                .payload(&serde_json::json!({"n": 1}))
                .expect("a JSON payload"),
        ];
        assert_eq!(
            serde_json::to_string(&super::BatchOf { tasks: &tasks }).unwrap(),
            serde_json::to_string(&offload_api::BatchEnqueue { tasks }).unwrap()
        );
    }

    /// A batch's answer read with the payloads sent gives the same tasks.
    #[test]
    fn a_batch_answer_is_read_with_the_payloads_sent() {
        let tasks = vec![task(1), task(2), task(3)];
        let text = json(&tasks);
        let sent: Vec<_> = tasks.iter().map(|t| t.payload.clone()).collect();
        let read = read_task_list(&text, |i| sent.get(i)).expect("reads");
        assert_eq!(json(&read.tasks), text);
    }

    #[test]
    fn task_lists_are_read_in_the_servers_form_and_in_any_other() {
        for tasks in [vec![], vec![task(1)], vec![task(1), task(2), task(3)]] {
            let canonical = json(&tasks);
            let fast = read_task_list(&canonical, |_| None).expect("the server's form is read");
            assert_eq!(json(&fast.tasks), canonical);
            assert_eq!(
                json(&parse_tasks(canonical.as_bytes()).expect("reads")),
                canonical
            );
            // Reformatted, as a proxy might: serde_json reads it.
            let pretty = serde_json::to_string_pretty(&serde_json::json!({ "tasks": tasks }))
                .expect("serializes");
            assert!(read_task_list(&pretty, |_| None).is_none() || tasks.is_empty());
            let reread = parse_tasks(pretty.as_bytes()).expect("reads");
            let summary = |tasks: &[Task]| -> Vec<(Uuid, serde_json::Value)> {
                tasks
                    .iter()
                    .map(|t| (t.id, t.payload_as().expect("a JSON payload")))
                    .collect()
            };
            assert_eq!(summary(&reread), summary(&tasks));
        }
    }

    /// `{"…":[{…},{…}]}` broken where a reader that stops early would
    /// still find a shorter list: the items' comma doubled or dropped, a
    /// comma after the last, the closing brace cut.
    fn broken_lists(text: &str) -> Vec<String> {
        vec![
            text.replacen("},{", "},,{", 1),
            text.replacen("},{", "}{", 1),
            text.replacen("]}", ",]}", 1),
            text[..text.len() - 1].to_owned(),
        ]
    }

    #[test]
    fn a_broken_list_is_an_error_not_a_shorter_list() {
        for text in broken_lists(&json(&[task(1), task(2)])) {
            assert!(parse_tasks(text.as_bytes()).is_err(), "accepted {text}");
        }
        let one = task(1);
        let text = serde_json::to_string(&one).expect("serializes");
        assert_eq!(parse_task(text.as_bytes()).expect("reads").id, one.id);
        assert!(parse_task(format!("{text}x").as_bytes()).is_err());
    }

    fn ack_answer(results: &[AckResult]) -> String {
        let mut body = Vec::new();
        AckResults {
            results: results.to_vec(),
        }
        .write_json(&mut body)
        .expect("writes");
        String::from_utf8(body).expect("UTF-8")
    }

    fn ok(n: u128) -> AckResult {
        AckResult {
            id: Uuid::from_u128(n),
            ok: true,
            error: None,
        }
    }

    fn summary(answer: &AckResults) -> Vec<(Uuid, bool, Option<String>)> {
        answer
            .results
            .iter()
            .map(|r| (r.id, r.ok, r.error.as_ref().map(|e| e.code.clone())))
            .collect()
    }

    #[test]
    fn ack_answers_are_read_in_the_servers_form_and_in_any_other() {
        let refused = AckResult {
            id: Uuid::from_u128(7),
            ok: false,
            error: Some(ErrorDetail {
                code: "not_found".into(),
                message: "task not found".into(),
            }),
        };
        let cases = [
            vec![],
            vec![ok(1)],
            vec![ok(1), ok(2), ok(3)],
            vec![ok(1), refused.clone(), ok(3)],
        ];
        for results in cases {
            let text = ack_answer(&results);
            let expected = summary(&AckResults {
                results: results.clone(),
            });
            let all_ok = results.iter().all(|r| r.ok);
            assert_eq!(
                AckResults::read_json(&text).as_ref().map(summary),
                all_ok.then(|| expected.clone()),
                "{text}"
            );
            assert_eq!(
                summary(&parse_ack_results(text.as_bytes()).expect("reads")),
                expected
            );
            let pretty = serde_json::to_string_pretty(&AckResults { results }).expect("serializes");
            assert_eq!(
                summary(&parse_ack_results(pretty.as_bytes()).expect("reads")),
                expected
            );
        }
    }

    #[test]
    fn a_broken_ack_answer_is_an_error_not_fewer_results() {
        let text = ack_answer(&[ok(1), ok(2)]);
        let mut broken = broken_lists(&text);
        broken.push(text.replacen("-", "", 1));
        for text in broken {
            assert!(
                parse_ack_results(text.as_bytes()).is_err(),
                "accepted {text}"
            );
        }
    }
}
