//! Offload's HTTP server: SPEC §4 (tasks, queues, the worker protocol,
//! server-sent events), `/health`, `/metrics` and `/openapi.json`, over the
//! engine and a store.
//!
//! This crate is where HTTP lives on the server side: handlers parse
//! requests into the core's types, call the engine or store, and map
//! errors in one place ([`error`]). No rule of the task model is decided
//! here.

mod config;
mod error;
mod events;
mod extract;
mod openapi;
mod queues;
mod system;
mod tasks;
mod telemetry;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use offload_core::{Error, Store};
use offload_engine::{Engine, EngineConfig};
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
    #[error("cannot listen on {addr}: {source}")]
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
}

impl AppState {
    pub fn store(&self) -> &Arc<dyn Store> {
        self.engine.store()
    }
}

/// Opens the store a `--db` URL names.
pub fn open_store(url: &str, config: &Config) -> Result<Arc<dyn Store>, ServerError> {
    let durability = match config.durability.as_str() {
        "relaxed" => Durability::Relaxed,
        _ => Durability::Durable,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Err(ServerError::Config(ConfigError::Invalid(
            "PostgreSQL is not supported by this build yet; use sqlite://PATH".into(),
        )));
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    if path.is_empty() {
        return Err(ServerError::Config(ConfigError::Invalid(format!(
            "db: {url:?} names no file; use sqlite://PATH"
        ))));
    }
    let options = SqliteOptions {
        durability,
        limits: config.limits(),
        backoff: config.backoff(),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(path, options).map_err(ServerError::Store)?;
    Ok(Arc::new(store))
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
    let store = open_store(&config.db, &config)?;
    let engine = Engine::start(
        store,
        EngineConfig {
            limits: config.limits(),
            retention: config.retention(),
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
            .map_err(ServerError::Store)?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(ServerError::Serve)?;
    let stop = CancellationToken::new();
    let state = AppState {
        engine: Arc::clone(&engine),
        limits: BodyLimits {
            body_bytes: config.payload_limit_bytes + (64 << 10),
            batch_body_bytes: config.batch_body_limit_bytes,
        },
        default_lease: Duration::from_secs(config.default_lease_secs.into()),
        durability: if config.durability == "relaxed" {
            "relaxed"
        } else {
            "durable"
        },
        stop: stop.clone(),
        metrics: telemetry::Metrics::install(),
    };
    tracing::info!(address = %local, db = %config.db, durability = state.durability, "offload is serving");
    on_listening(local);
    let stopping = stop.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            stopping.cancel();
        })
        .await
        .map_err(ServerError::Serve)?;
    engine.shutdown().await;
    Ok(())
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
