//! The OpenAPI 3.1 description, generated from the handlers' annotations and
//! the types' derived schemas, then given the rules those cannot carry.

use std::sync::OnceLock;

use offload_core::{
    HIGHEST_MAX_ATTEMPTS, Limits, MAX_DELAY_SECS, MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS,
    MAX_LEASE_SECS, MAX_LIST_LIMIT, MAX_OWNER_CHARS, MAX_QUEUE_NAME_CHARS, MAX_TASK_TYPE_CHARS,
    MAX_TIMEOUT_SECS, MAX_UNIQUE_KEY_CHARS, MAX_WORKER_ID_CHARS, QUEUE_NAME_CHARS, State,
    TASK_TYPE_CHARS,
};
use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use crate::queues::MAX_CONCURRENCY;
use crate::worker::{MAX_FETCH, MAX_FETCH_NAMES, MAX_RETRY_IN_SECS, MAX_WAIT_MS};

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
        let rendered = serde_json::to_value(ApiDoc::openapi()).and_then(|mut doc| {
            state_rules(&mut doc);
            state_shared_answers(&mut doc);
            serde_json::to_string_pretty(&doc)
        });
        rendered.unwrap_or_else(|e| {
            format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}")
        })
    })
}

/// A string of 1 to `max` characters of the class `chars`.
fn name_rule(chars: &str, max: usize) -> Value {
    json!({"minLength": 1, "maxLength": max, "pattern": format!("^{chars}{{1,{max}}}$")})
}

/// Text chosen freely: 1 to `max` characters, none of them U+0000.
fn free_text_rule(max: usize) -> Value {
    json!({"minLength": 1, "maxLength": max, "pattern": "^[^\\u0000]*$"})
}

fn range(min: i64, max: i64) -> Value {
    json!({"minimum": min, "maximum": max})
}

/// Each request field's rule: (schema, field, rule).
fn field_rules() -> Vec<(&'static str, &'static str, Value)> {
    let limits = Limits::default();
    let task_type = name_rule(TASK_TYPE_CHARS, MAX_TASK_TYPE_CHARS);
    let queue = name_rule(QUEUE_NAME_CHARS, MAX_QUEUE_NAME_CHARS);
    let worker_id = free_text_rule(MAX_WORKER_ID_CHARS);
    let owner = free_text_rule(MAX_OWNER_CHARS);
    let task_id = json!({"format": "uuid"});
    let label_key = json!({
        "minLength": 1,
        "maxLength": MAX_LABEL_KEY_CHARS,
        "pattern": "^[^:\\u0000]*$",
    });
    let retry_in_secs = range(0, MAX_RETRY_IN_SECS);
    vec![
        ("NewTask", "type", task_type.clone()),
        ("NewTask", "queue", queue.clone()),
        ("NewTask", "run_at", json!({"format": "date-time"})),
        ("NewTask", "delay_secs", range(0, MAX_DELAY_SECS)),
        ("NewTask", "max_attempts", range(1, HIGHEST_MAX_ATTEMPTS)),
        ("NewTask", "timeout_secs", range(1, MAX_TIMEOUT_SECS)),
        (
            "NewTask",
            "unique_key",
            free_text_rule(MAX_UNIQUE_KEY_CHARS),
        ),
        (
            "NewTask",
            "labels",
            json!({
                "maxProperties": limits.max_labels,
                "propertyNames": label_key,
                "additionalProperties": {
                    "maxLength": MAX_LABEL_VALUE_CHARS,
                    "pattern": "^[^\\u0000]*$",
                },
            }),
        ),
        (
            "NewTask",
            "depends_on",
            json!({"maxItems": limits.max_depends_on, "items": task_id}),
        ),
        ("NewTask", "owner", owner.clone()),
        (
            "BatchEnqueue",
            "tasks",
            json!({"minItems": 1, "maxItems": limits.max_batch}),
        ),
        ("FetchRequest", "worker_id", worker_id.clone()),
        (
            "FetchRequest",
            "types",
            json!({"maxItems": MAX_FETCH_NAMES, "items": task_type}),
        ),
        (
            "FetchRequest",
            "queues",
            json!({"maxItems": MAX_FETCH_NAMES, "items": queue}),
        ),
        ("FetchRequest", "limit", range(1, MAX_FETCH)),
        ("FetchRequest", "wait_ms", range(0, MAX_WAIT_MS)),
        (
            "FetchRequest",
            "lease_secs",
            range(1, MAX_LEASE_SECS as i64),
        ),
        ("HeartbeatBody", "worker_id", worker_id.clone()),
        (
            "HeartbeatBody",
            "lease_secs",
            range(1, MAX_LEASE_SECS as i64),
        ),
        ("ProgressUpdate", "percent", range(0, 100)),
        ("CompleteBody", "worker_id", worker_id.clone()),
        ("FailBody", "worker_id", worker_id.clone()),
        ("FailBody", "retry_in_secs", retry_in_secs.clone()),
        ("AckBody", "worker_id", worker_id),
        (
            "AckBody",
            "completed",
            json!({"maxItems": limits.max_batch}),
        ),
        ("AckBody", "failed", json!({"maxItems": limits.max_batch})),
        ("AckCompleted", "id", task_id.clone()),
        ("AckFailed", "id", task_id.clone()),
        ("AckFailed", "retry_in_secs", retry_in_secs),
        ("QueueUpdate", "concurrency", range(1, MAX_CONCURRENCY)),
    ]
}

/// Each query parameter's rule: (path, method, parameter, rule).
fn parameter_rules() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    let owner = free_text_rule(MAX_OWNER_CHARS);
    let any_states = State::ALL.map(|s| s.as_str()).join("|");
    let finished_states = State::FINISHED.map(|s| s.as_str()).join("|");
    let states = |names: &str| json!({"pattern": format!("^({names})(,({names}))*$")});
    let label_filter = json!({
        "pattern": format!(
            "^[^:\\u0000]{{1,{MAX_LABEL_KEY_CHARS}}}:[^\\u0000]{{0,{MAX_LABEL_VALUE_CHARS}}}$"
        )
    });
    vec![
        ("/v1/tasks", "get", "state", states(&any_states)),
        (
            "/v1/tasks",
            "get",
            "type",
            name_rule(TASK_TYPE_CHARS, MAX_TASK_TYPE_CHARS),
        ),
        (
            "/v1/tasks",
            "get",
            "queue",
            name_rule(QUEUE_NAME_CHARS, MAX_QUEUE_NAME_CHARS),
        ),
        ("/v1/tasks", "get", "owner", owner.clone()),
        ("/v1/tasks", "get", "label", label_filter),
        (
            "/v1/tasks",
            "get",
            "created_after",
            json!({"format": "date-time"}),
        ),
        (
            "/v1/tasks",
            "get",
            "created_before",
            json!({"format": "date-time"}),
        ),
        ("/v1/tasks", "get", "limit", range(1, MAX_LIST_LIMIT as i64)),
        // `c` and a position (`offload_core::encode_cursor`).
        (
            "/v1/tasks",
            "get",
            "cursor",
            json!({"pattern": "^c-?[0-9]{1,18}$"}),
        ),
        ("/v1/tasks", "delete", "state", states(&finished_states)),
        (
            "/v1/events",
            "get",
            "type",
            name_rule(TASK_TYPE_CHARS, MAX_TASK_TYPE_CHARS),
        ),
        (
            "/v1/events",
            "get",
            "queue",
            name_rule(QUEUE_NAME_CHARS, MAX_QUEUE_NAME_CHARS),
        ),
        ("/v1/events", "get", "owner", owner),
    ]
}

/// Each field's rule as the handlers and `offload_core`'s validation
/// enforce it, written from the constants they enforce it with: the
/// derived schemas give only types, so a client generated from this
/// document, or a tool that fuzzes from it, would send what is refused.
/// Rules between fields are stated in JSON Schema's own terms (`not`,
/// `if`/`then`); a field given as `null` counts as absent, as in the
/// handlers.
fn state_rules(doc: &mut Value) {
    let limits = Limits::default();
    let attempt_failure_rule = json!({
        "not": {
            "description": "retry_in_secs is not given with retry: false, which fails the task at once",
            "properties": {"retry": {"const": false}, "retry_in_secs": {"type": "integer"}},
            "required": ["retry", "retry_in_secs"],
        }
    });
    let schemas = &mut doc["components"]["schemas"];
    for (schema, field, rule) in field_rules() {
        if let Some(property) = schemas[schema]["properties"].get_mut(field) {
            merge(property, rule);
        }
    }
    merge(
        &mut schemas["NewTask"],
        json!({
            "not": {
                "description": "run_at and delay_secs are not given together",
                "properties": {"run_at": {"type": "string"}, "delay_secs": {"type": "integer"}},
                "required": ["run_at", "delay_secs"],
            },
            "if": {"properties": {"on_conflict": {"type": "string"}}, "required": ["on_conflict"]},
            "then": {
                "description": "on_conflict is only allowed with unique_key",
                "properties": {"unique_key": {"type": "string"}},
                "required": ["unique_key"],
            },
        }),
    );
    merge(&mut schemas["FailBody"], attempt_failure_rule.clone());
    merge(&mut schemas["AckFailed"], attempt_failure_rule);
    merge(
        &mut schemas["AckBody"],
        json!({"description": format!(
            "`completed` and `failed` together hold at most {} acknowledgements.",
            limits.max_batch
        )}),
    );
    schemas["PriorityInput"] = json!({
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 10},
            {"type": "string", "enum": ["low", "normal", "high"]},
        ]
    });

    for (path, method, name, rule) in parameter_rules() {
        if let Some(schema) = parameter_schema(doc, path, method, name) {
            merge(schema, rule);
        }
    }
    // Path parameters mean the same on every route that has them.
    for operation in operations(doc) {
        for parameter in parameters_of(operation) {
            let rule = match (parameter["in"].as_str(), parameter["name"].as_str()) {
                (Some("path"), Some("id")) => json!({"format": "uuid"}),
                (Some("path"), Some("name")) => name_rule(QUEUE_NAME_CHARS, MAX_QUEUE_NAME_CHARS),
                _ => continue,
            };
            merge(&mut parameter["schema"], rule);
        }
    }
}

/// The answers the extractors and the store give on any route, said once
/// here rather than on each handler: a route that takes a body or a
/// parameter refuses bad ones (400), a body may be too large (413) or too
/// slow (408), and whatever reaches the store may find it out of service
/// (503, with `Retry-After`).
fn state_shared_answers(doc: &mut Value) {
    let error = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
    let answer = |description: &str| {
        let mut answer = error.clone();
        answer["description"] = json!(description);
        answer
    };
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, methods) in paths.iter_mut() {
        let Some(methods) = methods.as_object_mut() else {
            continue;
        };
        for operation in methods.values_mut() {
            let takes_body = operation.get("requestBody").is_some();
            let takes_parameters = !parameters_of(operation).is_empty();
            let Some(responses) = operation["responses"].as_object_mut() else {
                continue;
            };
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status)
                    .or_insert_with(|| answer(description));
            };
            if takes_body || takes_parameters {
                add(
                    "400",
                    "The request is refused; the message names the field or parameter and its rule",
                );
            }
            if takes_body {
                add(
                    "408",
                    "The request body stopped arriving, or arrives too slowly",
                );
                add(
                    "413",
                    "The request body, or a JSON value in it, is over its limit",
                );
            }
            if path.starts_with("/v1/") {
                add(
                    "503",
                    "The store is out of service for now, or the node holds as many unread answers as it allows; retry after `Retry-After`",
                );
            }
        }
    }
}

fn operations(doc: &mut Value) -> impl Iterator<Item = &mut Value> {
    doc["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(Value::as_object_mut)
        .flat_map(|methods| methods.values_mut())
}

fn parameters_of(operation: &mut Value) -> &mut [Value] {
    match operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        Some(parameters) => parameters,
        None => &mut [],
    }
}

fn parameter_schema<'a>(
    doc: &'a mut Value,
    path: &str,
    method: &str,
    name: &str,
) -> Option<&'a mut Value> {
    let parameters = doc["paths"][path][method]["parameters"].as_array_mut()?;
    let parameter = parameters.iter_mut().find(|p| p["name"] == name)?;
    Some(&mut parameter["schema"])
}

/// Merges `rule`'s keys into `target`, object into object.
fn merge(target: &mut Value, rule: Value) {
    match (target, rule) {
        (Value::Object(target), Value::Object(rule)) => {
            for (key, value) in rule {
                merge(
                    target.entry(key).or_insert(Value::Object(Map::new())),
                    value,
                );
            }
        }
        (target, rule) => *target = rule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule for a name the derived document lacks would add a property
    /// or a schema of its own rather than fail.
    #[test]
    fn every_rule_names_what_the_derived_document_has() {
        let derived = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let schemas = &derived["components"]["schemas"];
        for (schema, field, _) in field_rules() {
            assert!(
                schemas[schema]["properties"].get(field).is_some(),
                "no {schema}.{field}"
            );
        }
        for schema in [
            "NewTask",
            "FailBody",
            "AckFailed",
            "AckBody",
            "PriorityInput",
        ] {
            assert!(schemas.get(schema).is_some(), "no {schema}");
        }
        for (path, method, name, _) in parameter_rules() {
            let parameters = derived["paths"][path][method]["parameters"]
                .as_array()
                .unwrap_or_else(|| panic!("no {method} {path} with parameters"));
            assert!(
                parameters.iter().any(|p| p["name"] == name),
                "no {name} on {method} {path}"
            );
        }
    }

    #[test]
    fn the_document_states_the_rules_and_the_shared_answers() {
        let doc: Value = serde_json::from_str(openapi_json()).unwrap();
        let new_task = &doc["components"]["schemas"]["NewTask"]["properties"];
        assert_eq!(new_task["max_attempts"]["maximum"], HIGHEST_MAX_ATTEMPTS);
        assert_eq!(
            new_task["queue"]["pattern"],
            format!("^{QUEUE_NAME_CHARS}{{1,{MAX_QUEUE_NAME_CHARS}}}$")
        );
        let heartbeat = &doc["paths"]["/v1/tasks/{id}/heartbeat"]["post"];
        for status in ["400", "408", "413", "503"] {
            assert!(heartbeat["responses"].get(status).is_some(), "{status}");
        }
        assert_eq!(heartbeat["parameters"][0]["schema"]["format"], "uuid");
        assert!(
            doc["paths"]["/health"]["get"]["responses"]
                .get("400")
                .is_none()
        );
    }
}
