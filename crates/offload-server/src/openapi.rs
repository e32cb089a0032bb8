//! The OpenAPI 3.1 description, generated from the handlers' annotations and
//! the types' derived schemas.

use std::sync::OnceLock;

use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Offload", description = "Background tasks: enqueue, run in workers, follow to the end."),
    paths(
        crate::tasks::enqueue, crate::tasks::enqueue_batch, crate::tasks::get, crate::tasks::list,
        crate::tasks::stats, crate::tasks::cancel, crate::tasks::retry, crate::tasks::delete, crate::tasks::clear,
        crate::worker::fetch, crate::worker::heartbeat, crate::worker::complete, crate::worker::fail, crate::worker::ack,
        crate::queues::list, crate::queues::pause, crate::queues::resume, crate::queues::update,
        crate::events::task_events, crate::events::all_events,
        crate::system::health, crate::system::metrics, crate::system::openapi,
    ),
    components(schemas(offload_api::BatchIds, offload_core::State, offload_core::ErrorKind, offload_core::PriorityInput, offload_core::OnConflict)),
    tags(
        (name = "tasks", description = "Enqueue, read and act on tasks"),
        (name = "workers", description = "The worker protocol"),
        (name = "queues", description = "Queue settings"),
        (name = "events", description = "Server-sent events"),
        (name = "system", description = "Health, metrics, this document"),
    )
)]
struct ApiDoc;

/// The document, rendered once.
pub fn openapi_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| {
            format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}")
        })
    })
}
