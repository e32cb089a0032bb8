//! Offload's HTTP server: SPEC §4 (tasks, queues, the worker protocol,
//! server-sent events), `/health`, `/metrics` and `/openapi.json`, over the
//! engine and a store.
//!
//! This crate is where HTTP lives on the server side: handlers parse
//! requests into the core's types, call the engine or store, and map
//! errors in one place (`error.rs`). No rule of the task model is decided
//! here.

mod config;
mod connections;
mod error;
mod events;
mod extract;
mod json;
mod openapi;
mod queues;
mod system;
mod tasks;
mod telemetry;
mod unread;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use offload_core::{Error, Store};
use offload_engine::{Engine, EngineConfig};
use offload_postgres::{PgOptions, PgStore};
use offload_sqlite::{Durability, SqliteOptions, SqliteStore};
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConfigError, DEFAULT_DB, DEFAULT_LISTEN};
pub use openapi::openapi_json;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening the database: {0}")]
    Store(Error),
    #[error("applying [queues.{queue}]: {source}")]
    QueueSettings { queue: String, source: Error },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// Request-size limits the extractors enforce.
#[derive(Clone, Debug)]
pub(crate) struct BodyLimits {
    pub body_bytes: usize,
    pub batch_body_bytes: usize,
    /// How long a body may go without a byte arriving before the request
    /// is given up: hyper bounds the wait for a head, not for a body.
    pub stall: Duration,
}

/// What every handler can reach.
#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub limits: BodyLimits,
    pub default_lease: Duration,
    pub durability: &'static str,
    /// Fires when the server stops: waiting fetches and event streams end.
    pub stop: CancellationToken,
    pub metrics: telemetry::Metrics,
    pub unread: unread::UnreadAnswers,
}

impl AppState {
    pub fn store(&self) -> &Arc<dyn Store> {
        self.engine.store()
    }
}

/// Opens the store a `--db` URL names.
pub async fn open_store(url: &str, config: &Config) -> Result<Arc<dyn Store>, ServerError> {
    let Some(path) = sqlite_path(url)? else {
        let (url, schema) = split_schema(url);
        let options = PgOptions {
            schema: schema.unwrap_or_else(|| "public".into()),
            max_connections: config.db_pool_size,
            operation_timeout: Duration::from_secs(config.db_operation_timeout_secs.into()),
            limits: config.limits(),
            backoff: config.backoff(),
            ..PgOptions::default()
        };
        let store = PgStore::open(&url, options)
            .await
            .map_err(ServerError::Store)?;
        return Ok(store);
    };
    let durability = match config.durability.as_str() {
        "relaxed" => Durability::Relaxed,
        _ => Durability::Durable,
    };
    let options = SqliteOptions {
        durability,
        limits: config.limits(),
        backoff: config.backoff(),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(path, options).map_err(ServerError::Store)?;
    Ok(Arc::new(store))
}

/// The SQLite file a `--db` URL names (`sqlite://PATH` or a plain path), or
/// `None` for a PostgreSQL URL.
pub fn sqlite_path(url: &str) -> Result<Option<&str>, ConfigError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(None);
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    if path.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "db: {url:?} names no file; use sqlite://PATH"
        )));
    }
    Ok(Some(path))
}

/// Drops the PostgreSQL schema a `--db` URL names with its `schema`
/// parameter, and every table in it: for installations made to be thrown
/// away, such as `offload bench`'s. A URL without one names `public`,
/// which is never dropped.
pub async fn drop_postgres_schema(url: &str) -> Result<(), ServerError> {
    let (url, schema) = split_schema(url);
    offload_postgres::drop_schema(&url, schema.as_deref().unwrap_or("public"))
        .await
        .map_err(ServerError::Store)
}

/// Takes Offload's own `schema` parameter out of a PostgreSQL URL.
fn split_schema(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("schema=") {
            Some(name) => {
                schema = Some(name.to_owned());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, schema)
}

/// A `--db` URL fit for a log: a PostgreSQL password, given in the URL's
/// user part or as its `password` parameter, becomes `***`. Logs travel
/// further than the configuration they came from.
fn without_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            let authority = match authority.rsplit_once('@') {
                Some((user_info, host)) => match user_info.split_once(':') {
                    Some((user, _password)) => format!("{user}:***@{host}"),
                    None => authority.to_owned(),
                },
                None => authority.to_owned(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => base.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key == "password" => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Runs a node until `shutdown` completes, then stops taking work, lets
/// in-flight requests finish and returns. `on_listening` is told the bound
/// address (useful with port 0).
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServerError> {
    config.validate()?;
    let store = open_store(&config.db, &config).await?;
    let metrics = telemetry::Metrics::install();
    let engine = Engine::start(
        store,
        EngineConfig {
            limits: config.limits(),
            retention: config.retention(),
            observer: Some(Arc::new(metrics.clone())),
            ..EngineConfig::default()
        },
    );
    for (name, settings) in &config.queues {
        let patch = offload_core::QueuePatch {
            paused: settings.paused,
            concurrency: settings.concurrency.map(Some),
        };
        engine
            .store()
            .update_queue(name, patch)
            .await
            .map_err(|source| ServerError::QueueSettings {
                queue: name.clone(),
                source,
            })?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(ServerError::Serve)?;
    let stop = CancellationToken::new();
    let idle = Duration::from_secs(config.idle_timeout_secs.into());
    let state = AppState {
        engine: Arc::clone(&engine),
        limits: BodyLimits {
            body_bytes: config.payload_limit_bytes + (64 << 10),
            batch_body_bytes: config.batch_body_limit_bytes,
            stall: idle,
        },
        default_lease: Duration::from_secs(config.default_lease_secs.into()),
        durability: if config.durability == "relaxed" {
            "relaxed"
        } else {
            "durable"
        },
        stop: stop.clone(),
        metrics,
        unread: unread::UnreadAnswers::new(config.unread_answers_limit_bytes),
    };
    let taking_finished = AbortOnDrop(tokio::spawn(telemetry::take_finished_from(Arc::clone(
        engine.store(),
    ))));
    tracing::info!(address = %local, db = %without_password(&config.db), durability = state.durability, "offload is serving");
    on_listening(local);
    let serving = connections::serve_until_stopped(listener, router(state), idle, stop.clone());
    let stopping = stop.clone();
    let signalled = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        stopping.cancel();
    };
    let serving = async { tokio::join!(serving, signalled) };
    let grace = Duration::from_secs(config.shutdown_grace_secs.into());
    let grace_over = async {
        stop.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        _ = serving => {}
        () = grace_over => tracing::warn!(
            ?grace,
            "requests still open when the shutdown's grace ran out; closing them"
        ),
    }
    drop(taking_finished);
    engine.shutdown().await;
    Ok(())
}

/// Stops a spawned task when dropped, however `serve` returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/tasks",
            post(tasks::enqueue).get(tasks::list).delete(tasks::clear),
        )
        .route("/v1/tasks/batch", post(tasks::enqueue_batch))
        .route("/v1/tasks/{id}", get(tasks::get).delete(tasks::delete))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v1/tasks/{id}/retry", post(tasks::retry))
        .route("/v1/tasks/{id}/heartbeat", post(worker::heartbeat))
        .route("/v1/tasks/{id}/complete", post(worker::complete))
        .route("/v1/tasks/{id}/fail", post(worker::fail))
        .route("/v1/tasks/{id}/events", get(events::task_events))
        .route("/v1/events", get(events::all_events))
        .route("/v1/stats", get(tasks::stats))
        .route("/v1/fetch", post(worker::fetch))
        .route("/v1/ack", post(worker::ack))
        .route("/v1/queues", get(queues::list))
        .route("/v1/queues/{name}", axum::routing::patch(queues::update))
        .route("/v1/queues/{name}/pause", post(queues::pause))
        .route("/v1/queues/{name}/resume", post(queues::resume))
        .route("/health", get(system::health))
        .route("/metrics", get(system::metrics))
        .route("/openapi.json", get(system::openapi))
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .route_layer(axum::middleware::from_fn(telemetry::track_http))
        .with_state(state)
}

/// A task as a store makes it from `new`, at a fixed time: what the
/// modules' own tests write and group.
#[cfg(test)]
fn test_task(new: offload_core::NewTask) -> offload_core::Task {
    let spec = new
        .validate(
            &offload_core::Limits::default(),
            offload_core::Position::Alone,
        )
        .expect("a valid task");
    offload_core::Task::new_from_spec(
        uuid::Uuid::now_v7(),
        spec,
        offload_core::Timestamp::from_millis(1_795_000_000_000),
        false,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schema_parameter_is_offloads_own() {
        assert_eq!(
            super::split_schema("postgres://u@h/db?schema=s1&sslmode=disable"),
            (
                "postgres://u@h/db?sslmode=disable".to_owned(),
                Some("s1".to_owned())
            )
        );
        assert_eq!(
            super::split_schema("postgres://u@h/db"),
            ("postgres://u@h/db".to_owned(), None)
        );
        assert_eq!(
            super::split_schema("postgres://u@h/db?schema=x"),
            ("postgres://u@h/db".to_owned(), Some("x".to_owned()))
        );
    }

    #[test]
    fn a_database_url_is_logged_without_its_password() {
        for (url, logged) in [
            (
                "postgres://offload:s3cr:et@db.internal:5432/tasks?schema=a",
                "postgres://offload:***@db.internal:5432/tasks?schema=a",
            ),
            (
                "postgresql://u@h/db?sslmode=require&password=s3cret&schema=b",
                "postgresql://u@h/db?sslmode=require&password=***&schema=b",
            ),
            ("postgres://u:p@h", "postgres://u:***@h"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("sqlite://offload.db", "sqlite://offload.db"),
            (
                "sqlite:///var/lib/a@b:c/o.db",
                "sqlite:///var/lib/a@b:c/o.db",
            ),
        ] {
            assert_eq!(super::without_password(url), logged, "{url}");
        }
    }
}
