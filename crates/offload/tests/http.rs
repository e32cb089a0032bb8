//! The HTTP API of SPEC §4, route by route, with its errors.

use serde_json::{Value, json};

use crate::support::{Server, assert_error};

#[test]
fn enqueue_answers_the_task_with_spec_defaults() {
    let server = Server::start();
    let http = server.http();
    let task = http.enqueue(
        json!({"type": "email.send", "payload": {"to": "a@b.c"}, "labels": {"project_id": "p1"}}),
    );
    for field in [
        "id",
        "type",
        "queue",
        "payload",
        "priority",
        "state",
        "attempt",
        "max_attempts",
        "timeout_secs",
        "run_at",
        "owner",
        "labels",
        "unique_key",
        "depends_on",
        "progress",
        "result",
        "error",
        "errors",
        "cancel_requested",
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
        "lease_expires_at",
        "worker_id",
    ] {
        assert!(
            task.get(field).is_some(),
            "field {field} missing from {task}"
        );
    }
    assert_eq!(task["queue"], "default");
    assert_eq!(task["priority"], 5);
    assert_eq!(task["state"], "pending");
    assert_eq!(task["max_attempts"], 4);
    assert_eq!(task["timeout_secs"], 1800);
    assert_eq!(task["payload"], json!({"to": "a@b.c"}));
    let created = task["created_at"].as_str().unwrap();
    assert!(
        created.ends_with('Z') && created.len() == 24,
        "RFC 3339 UTC with milliseconds: {created}"
    );
    assert_eq!(http.task(task["id"].as_str().unwrap()), task);

    let named = http.enqueue(json!({"type": "t", "priority": "high", "delay_secs": 60}));
    assert_eq!(
        (named["priority"].clone(), named["state"].clone()),
        (json!(8), json!("scheduled"))
    );
}

#[test]
fn unique_key_returns_the_existing_task_with_200() {
    let server = Server::start();
    let http = server.http();
    let first = http.enqueue(json!({"type": "t", "unique_key": "k"}));
    let (status, again) = http.post("/v1/tasks", json!({"type": "t", "unique_key": "k"}));
    assert_eq!(status, 200);
    assert_eq!(again["id"], first["id"]);
    let (status, replaced) = http.post(
        "/v1/tasks",
        json!({"type": "t", "unique_key": "k", "on_conflict": "replace"}),
    );
    assert_eq!(status, 201);
    assert_ne!(replaced["id"], first["id"]);
    assert_eq!(
        http.task(first["id"].as_str().unwrap())["state"],
        "cancelled"
    );
    // Within one batch: the answer says what holds when the batch is
    // answered, for the task a later one replaced and for the keep that
    // returned it before.
    let (status, batch) = http.post(
        "/v1/tasks/batch",
        json!({"tasks": [
            {"type": "t", "unique_key": "b"},
            {"type": "t", "unique_key": "b"},
            {"type": "t", "unique_key": "b", "on_conflict": "replace"},
        ]}),
    );
    assert_eq!(status, 201, "{batch}");
    let states: Vec<&str> = batch["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["cancelled", "cancelled", "pending"], "{batch}");
}

/// `Prefer: return=minimal` (RFC 7240, among other preferences) answers a
/// batch with its ids in the order sent; any other preference, the tasks.
#[test]
fn a_batch_asked_for_a_minimal_return_answers_its_ids_in_order() {
    let server = Server::start();
    let http = server.http();
    let post_preferring = |prefer: &str, batch: &Value| {
        http.client
            .post(format!("{}/v1/tasks/batch", http.base))
            .header("prefer", prefer)
            .json(batch)
            .send()
            .expect("POST")
    };
    let batch = json!({"tasks": [{"type": "a"}, {"type": "b"}, {"type": "c"}]});
    for prefer in ["return=minimal", "respond-async, RETURN=\"minimal\"; x=y"] {
        let response = post_preferring(prefer, &batch);
        assert_eq!(response.status().as_u16(), 201, "{prefer}");
        assert_eq!(
            response.headers()["preference-applied"],
            "return=minimal",
            "{prefer}"
        );
        let answer: Value = response.json().expect("JSON");
        let ids = answer["ids"].as_array().expect("ids");
        assert_eq!(answer.as_object().unwrap().len(), 1, "ids alone: {answer}");
        let types: Vec<Value> = ids
            .iter()
            .map(|id| http.task(id.as_str().expect("an id"))["type"].clone())
            .collect();
        assert_eq!(types, [json!("a"), json!("b"), json!("c")], "{prefer}");
    }
    let response = post_preferring("return=representation", &batch);
    assert!(response.headers().get("preference-applied").is_none());
    let answer: Value = response.json().expect("JSON");
    assert_eq!(answer["tasks"][2]["type"], "c", "{answer}");
    // A refused batch says why whatever it asked for.
    let refused = post_preferring(
        "return=minimal",
        &json!({"tasks": [{"type": "ok"}, {"type": "bad name"}]}),
    );
    assert_eq!(refused.status().as_u16(), 400);
    let message = refused.text().expect("body");
    assert!(message.contains("tasks[1].type"), "{message}");
    // And the Rust client's way of asking for it.
    let client = offload_client::Client::new(http.base.clone());
    let tasks = [
        offload_core::NewTask::new("d"),
        offload_core::NewTask::new("e"),
    ];
    let ids = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(client.enqueue_batch_ids(&tasks))
        .expect("enqueued");
    assert_eq!(http.task(&ids[1].to_string())["type"], "e");
}

#[test]
fn batch_enqueue_is_all_or_nothing() {
    let server = Server::start();
    let http = server.http();
    let (status, answer) = http.post(
        "/v1/tasks/batch",
        json!({"tasks": [{"type": "a"}, {"type": "b", "priority": 3}]}),
    );
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["tasks"].as_array().unwrap().len(), 2);
    assert_eq!(answer["tasks"][1]["priority"], 3);
    assert_error(
        http.post(
            "/v1/tasks/batch",
            json!({"tasks": [{"type": "ok"}, {"type": "bad name"}]}),
        ),
        400,
        "invalid_argument",
        "tasks[1].type",
    );
    let (_, stats) = http.get("/v1/stats");
    assert_eq!(
        stats["total"]["pending"], 2,
        "the refused batch left nothing: {stats}"
    );
    // Refused after the store began writing it: the server hands a batch
    // to the store in chunks while it still reads the rest.
    let mut late_bad: Vec<Value> = (0..300).map(|_| json!({"type": "t"})).collect();
    late_bad[250] = json!({"type": "t", "priority": 11});
    assert_error(
        http.post("/v1/tasks/batch", json!({ "tasks": late_bad })),
        400,
        "invalid_argument",
        "tasks[250].priority",
    );
    let valid: Vec<Value> = (0..300).map(|_| json!({"type": "t"})).collect();
    let body = json!({ "tasks": valid }).to_string();
    assert_error(
        http.post_raw(
            "/v1/tasks/batch",
            format!("{}, \"extra\": 1}}", &body[..body.len() - 1]),
        ),
        400,
        "invalid_argument",
        "extra",
    );
    assert_error(
        http.post_raw("/v1/tasks/batch", format!("{body} trailing")),
        400,
        "invalid_json",
        "",
    );
    let (_, stats) = http.get("/v1/stats");
    assert_eq!(
        stats["total"]["pending"], 2,
        "batches refused part way left nothing: {stats}"
    );
    let too_many: Vec<Value> = (0..10_001).map(|_| json!({"type": "t"})).collect();
    assert_error(
        http.post("/v1/tasks/batch", json!({ "tasks": too_many })),
        400,
        "invalid_argument",
        "10000",
    );
    assert_error(
        http.post("/v1/tasks/batch", json!({"tasks": []})),
        400,
        "invalid_argument",
        "tasks",
    );
}

#[test]
fn bad_input_is_a_clear_400_never_a_500() {
    let server = Server::start();
    let http = server.http();
    assert_error(
        http.post_raw("/v1/tasks", "{\"type\":"),
        400,
        "invalid_json",
        "JSON",
    );
    assert_error(http.post_raw("/v1/tasks", ""), 400, "invalid_json", "empty");
    assert_error(
        http.post_raw("/v1/tasks", "[1,2]"),
        400,
        "invalid_argument",
        "body",
    );
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "bogus": 1})),
        400,
        "invalid_argument",
        "bogus",
    );
    assert_error(
        http.post("/v1/tasks", json!({"payload": 1})),
        400,
        "invalid_argument",
        "type",
    );
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "priority": 11})),
        400,
        "invalid_argument",
        "priority",
    );
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "priority": "urgent"})),
        400,
        "invalid_argument",
        "priority",
    );
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "max_attempts": 0})),
        400,
        "invalid_argument",
        "max_attempts",
    );
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "max_attempts": "x"})),
        400,
        "invalid_argument",
        "max_attempts",
    );
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "queue": "no/slash"})),
        400,
        "invalid_argument",
        "queue",
    );
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "run_at": "tomorrow"})),
        400,
        "invalid_argument",
        "run_at",
    );
    // Well formed, but a year that no answer could write in four digits:
    // taken, such a task broke every page and fetch that held it.
    assert_error(
        http.post(
            "/v1/tasks",
            json!({"type": "t", "run_at": "-000001-06-01T00:00:00Z"}),
        ),
        400,
        "invalid_argument",
        "run_at: must be from 0000-01-01T00:00:00Z to 9999-12-30T22:00:00Z",
    );
    assert_error(
        http.post(
            "/v1/tasks",
            json!({"type": "t", "run_at": "2030-01-01T00:00:00Z", "delay_secs": 5}),
        ),
        400,
        "invalid_argument",
        "run_at",
    );
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "depends_on": ["x"]})),
        400,
        "invalid_argument",
        "depends_on[0]",
    );
    assert_error(
        http.post(
            "/v1/tasks",
            json!({"type": "t", "depends_on": ["01a2041e-d5a1-730d-971c-a89e0eec346a"]}),
        ),
        400,
        "invalid_argument",
        "depends_on[0]",
    );
    assert_error(
        http.get("/v1/tasks/not-a-uuid"),
        400,
        "invalid_argument",
        "id",
    );
    // A missing field is named with its path, not as the object lacking it.
    assert_error(
        http.post("/v1/tasks", json!({})),
        400,
        "invalid_argument",
        "type: required",
    );
    assert_error(
        http.post("/v1/tasks/batch", json!({"tasks": [{"type": "t"}, {}]})),
        400,
        "invalid_argument",
        "tasks[1].type: required",
    );
    assert_error(
        http.post("/v1/ack", json!({"worker_id": "w", "completed": [{}]})),
        400,
        "invalid_argument",
        "completed[0].id: required",
    );
    // Not UTF-8 once percent-decoded: refused in the error shape too,
    // naming the path's parameter.
    assert_error(
        http.get("/v1/tasks/%FF"),
        400,
        "invalid_argument",
        "id: must be UTF-8",
    );
    assert_error(
        http.post("/v1/tasks/%FF/cancel", json!({})),
        400,
        "invalid_argument",
        "id: must be UTF-8",
    );
    assert_error(
        http.post("/v1/queues/%FF/pause", json!({})),
        400,
        "invalid_argument",
        "name: must be UTF-8",
    );
    assert_error(
        http.get("/v1/tasks/01a2041e-d5a1-730d-971c-a89e0eec346a"),
        404,
        "not_found",
        "not found",
    );
    assert_error(
        http.get("/v1/tasks?limit=1001"),
        400,
        "invalid_argument",
        "limit",
    );
    assert_error(
        http.get("/v1/tasks?limit=0"),
        400,
        "invalid_argument",
        "limit",
    );
    assert_error(
        http.get("/v1/tasks?colour=red"),
        400,
        "invalid_argument",
        "colour",
    );
    assert_error(
        http.get("/v1/tasks?state=sleeping"),
        400,
        "invalid_argument",
        "state",
    );
    assert_error(
        http.get("/v1/tasks?state="),
        400,
        "invalid_argument",
        "state: must be one of",
    );
    assert_error(
        http.get("/v1/tasks?cursor=zzz"),
        400,
        "invalid_argument",
        "cursor",
    );
    assert_error(
        http.get("/v1/tasks?created_after=nope"),
        400,
        "invalid_argument",
        "created_after",
    );
    assert_error(http.get("/v1/nowhere"), 404, "not_found", "route");
    assert_error(
        http.post("/v1/fetch", json!({"worker_id": "w", "limit": 1001})),
        400,
        "invalid_argument",
        "limit",
    );
    assert_error(
        http.post("/v1/fetch", json!({"worker_id": "w", "wait_ms": 60001})),
        400,
        "invalid_argument",
        "wait_ms",
    );
    assert_error(
        http.post("/v1/fetch", json!({"worker_id": "w", "lease_secs": 0})),
        400,
        "invalid_argument",
        "lease_secs",
    );
    let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
    for field in ["types", "queues"] {
        assert_error(
            http.post("/v1/fetch", json!({"worker_id": "w", field: many})),
            400,
            "invalid_argument",
            &format!("{field}: at most 1000 names; got 1001"),
        );
    }
    assert_error(
        http.post("/v1/fetch", json!({"worker_id": ""})),
        400,
        "invalid_argument",
        "worker_id",
    );
    assert_error(
        http.patch("/v1/queues/q", json!({"concurrency": 0})),
        400,
        "invalid_argument",
        "concurrency",
    );
    assert_error(
        http.patch("/v1/queues/q", json!({"paused": true})),
        400,
        "invalid_argument",
        "paused",
    );
    assert_error(
        http.delete("/v1/tasks?state=pending"),
        400,
        "invalid_argument",
        "state",
    );
    // A nested object of the wrong kind is described, not named by its
    // Rust type.
    assert_error(
        http.post(
            "/v1/ack",
            json!({"worker_id": "w", "failed": [
                {"id": "01a2041e-d5a1-730d-971c-a89e0eec346a", "error": "x"},
            ]}),
        ),
        400,
        "invalid_argument",
        "failed[0].error: invalid type: string \"x\", expected an object {message, kind?}",
    );
    // A filter no task can match is a mistake to point out.
    assert_error(
        http.get("/v1/tasks?queue=emails%20"),
        400,
        "invalid_argument",
        "queue: must be 1 to 64 characters of [A-Za-z0-9_.-]; got \"emails \"",
    );
    assert_error(
        http.get("/v1/events?type=report%20build"),
        400,
        "invalid_argument",
        "type: must be 1 to 128 characters",
    );
    // A compressed body is refused by name, not as JSON that does not parse.
    let gzipped = http
        .client
        .post(format!("{}/v1/tasks", http.base))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 0x08, 0x00])
        .send()
        .unwrap();
    assert_eq!(gzipped.status().as_u16(), 400);
    let body: Value = gzipped.json().unwrap();
    assert_eq!(
        body["error"]["message"],
        "content-encoding: \"gzip\" is not accepted; send the body uncompressed"
    );
    // An owner or a label no task can carry is no filter either.
    assert_error(
        http.get("/v1/tasks?owner="),
        400,
        "invalid_argument",
        "owner: must be 1 to 128 characters",
    );
    assert_error(
        http.get("/v1/events?owner="),
        400,
        "invalid_argument",
        "owner: must be 1 to 128 characters",
    );
    assert_error(
        http.get("/v1/tasks?label=:v"),
        400,
        "invalid_argument",
        "label: keys must be 1 to 64 characters without ':' or U+0000; got \"\"",
    );
    assert_error(
        http.get(&format!("/v1/tasks?label=k:{}", "v".repeat(257))),
        400,
        "invalid_argument",
        "label: values must be at most 256 characters",
    );
    assert_eq!(http.get("/v1/tasks?owner=u1&label=k:v").0, 200);
    // U+0000, which PostgreSQL's text cannot hold, is refused by every
    // backend wherever it would be kept as text; in JSON it travels escaped.
    for (body, field) in [
        (json!({"type": "t", "owner": "a\u{0}b"}), "owner"),
        (json!({"type": "t", "unique_key": "a\u{0}b"}), "unique_key"),
        (json!({"type": "t", "labels": {"k": "a\u{0}b"}}), "labels.k"),
        (json!({"type": "t", "labels": {"k\u{0}": "v"}}), "labels"),
    ] {
        assert_error(
            http.post("/v1/tasks", body),
            400,
            "invalid_argument",
            &format!("{field}: "),
        );
    }
    assert_error(
        http.post("/v1/fetch", json!({"worker_id": "w\u{0}"})),
        400,
        "invalid_argument",
        "worker_id: must not contain the character U+0000 (NUL)",
    );
    assert_error(
        http.post(
            "/v1/tasks/01a2041e-d5a1-730d-971c-a89e0eec346a/heartbeat",
            json!({"worker_id": "w\u{0}"}),
        ),
        400,
        "invalid_argument",
        "worker_id: must not contain",
    );
    assert_error(
        http.get("/v1/tasks?owner=a%00b"),
        400,
        "invalid_argument",
        "owner: must not contain",
    );
    assert_eq!(
        http.post(
            "/v1/tasks",
            json!({"type": "t", "payload": {"text": "a\u{0}b"}})
        )
        .0,
        201
    );
    // `type=a&type=b` is not "a or b": one value, or a 400.
    assert_error(
        http.get("/v1/tasks?type=a&type=b"),
        400,
        "invalid_argument",
        "type: given more than once",
    );
    assert_eq!(http.get("/v1/tasks?state=pending&state=failed").0, 200);
    assert_eq!(http.get("/v1/tasks?label=a:1&label=b:2").0, 200);
    // A route that takes no body refuses one with fields rather than drop them.
    let id = http.enqueue(json!({"type": "t"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_error(
        http.post(&format!("/v1/tasks/{id}/cancel"), json!({"reason": "dup"})),
        400,
        "invalid_argument",
        "reason: unknown field; this route takes no body",
    );
    assert_error(
        http.post_raw("/v1/queues/default/pause", "[1]"),
        400,
        "invalid_json",
        "takes no body",
    );
    assert_eq!(http.post("/v1/queues/default/pause", json!({})).0, 200);
    assert_eq!(http.post_raw("/v1/queues/default/resume", "").0, 200);
    assert_eq!(
        http.post(&format!("/v1/tasks/{id}/cancel"), json!(null)).0,
        200
    );
    assert_error(
        http.post("/v1/tasks/batch", json!({"tasks": [1]})),
        400,
        "invalid_argument",
        "tasks[0]: invalid type: integer `1`, expected a task: an object {type",
    );
}

/// Stored JSON goes out to every reader of its task, inside answers that
/// their parsers read whole: nested past 64, it is refused where it comes
/// in, payload, result and progress data alike.
#[test]
fn json_nested_past_64_is_refused_where_it_comes_in() {
    let server = Server::start();
    let http = server.http();
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let task_with = |payload: &str| format!(r#"{{"type": "deep", "payload": {payload}}}"#);
    assert_error(
        http.post_raw("/v1/tasks", task_with(&nested(65))),
        400,
        "invalid_argument",
        "payload: arrays and objects may be nested at most 64 deep",
    );
    assert_error(
        http.post_raw(
            "/v1/tasks/batch",
            format!(
                r#"{{"tasks": [{}, {}]}}"#,
                task_with("1"),
                task_with(&nested(100_000))
            ),
        ),
        400,
        "invalid_argument",
        "tasks[1].payload",
    );
    // Not an object, and too deep for any parser to say more.
    assert_error(
        http.post_raw("/v1/tasks", "[".repeat(100_000)),
        400,
        "invalid_json",
        "JSON",
    );

    let (status, _) = http.post_raw("/v1/tasks", task_with(&nested(64)));
    assert_eq!(status, 201);
    let id = http.fetch("w", json!({"types": ["deep"]}))[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deep_data = format!(
        r#"{{"worker_id": "w", "progress": {{"data": {}}}}}"#,
        nested(65)
    );
    assert_error(
        http.post_raw(&format!("/v1/tasks/{id}/heartbeat"), deep_data),
        400,
        "invalid_argument",
        "progress.data",
    );
    let deep_result = format!(r#"{{"worker_id": "w", "result": {}}}"#, nested(65));
    assert_error(
        http.post_raw(&format!("/v1/tasks/{id}/complete"), deep_result),
        400,
        "invalid_argument",
        "result",
    );
    let (status, task) = http.post(
        &format!("/v1/tasks/{id}/complete"),
        json!({"worker_id": "w", "result": [[1]]}),
    );
    assert_eq!(
        (status, task["state"].as_str()),
        (200, Some("completed")),
        "{task}"
    );
}

#[test]
fn a_payload_over_the_limit_is_413() {
    let server = Server::start_configured("payload_limit_bytes = 1000\n");
    let http = server.http();
    let big = "x".repeat(2000);
    assert_error(
        http.post("/v1/tasks", json!({"type": "t", "payload": big})),
        413,
        "payload_too_large",
        "payload",
    );
    // A body far over the limit is refused before it is parsed.
    let huge = format!(
        "{{\"type\": \"t\", \"payload\": \"{}\"}}",
        "y".repeat(200_000)
    );
    assert_error(
        http.post_raw("/v1/tasks", huge),
        413,
        "payload_too_large",
        "limit",
    );
    http.enqueue(json!({"type": "t", "payload": "small"}));
}

#[test]
fn list_filters_paginates_and_counts() {
    let server = Server::start();
    let http = server.http();
    let mut ids = Vec::new();
    for i in 0..7 {
        let task = http.enqueue(json!({
            "type": if i % 2 == 0 { "even" } else { "odd" },
            "queue": if i < 3 { "first" } else { "second" },
            "labels": {"project_id": format!("p{}", i % 2)},
        }));
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    let mut path = "/v1/tasks?limit=3".to_owned();
    loop {
        let (status, page) = http.get(&path);
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/tasks?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");
    let count = |query: &str| {
        http.get(&format!("/v1/tasks?{query}")).1["tasks"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(count("type=even"), 4);
    assert_eq!(count("queue=first"), 3);
    assert_eq!(count("label=project_id:p1"), 3);
    assert_eq!(count("state=pending,running"), 7);
    assert_eq!(count("state=completed"), 0);
    let (_, stats) = http.get("/v1/stats");
    assert_eq!(stats["total"]["pending"], 7);
    assert_eq!(stats["queues"]["second"]["pending"], 4);
    assert_eq!(stats["types"]["odd"]["pending"], 3);
    for state in [
        "blocked",
        "scheduled",
        "running",
        "completed",
        "failed",
        "cancelled",
    ] {
        assert_eq!(stats["total"][state], 0, "every state is counted: {stats}");
    }
}

#[test]
fn cancel_retry_delete_and_clear() {
    let server = Server::start();
    let http = server.http();
    let id = http.enqueue(json!({"type": "t"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_error(
        http.delete(&format!("/v1/tasks/{id}")),
        409,
        "conflict",
        "finished",
    );
    assert_error(
        http.post(&format!("/v1/tasks/{id}/retry"), json!(null)),
        409,
        "conflict",
        "retr",
    );
    let (status, cancelled) = http.post(&format!("/v1/tasks/{id}/cancel"), json!(null));
    assert_eq!(
        (status, cancelled["state"].clone()),
        (200, json!("cancelled"))
    );
    assert_error(
        http.post(&format!("/v1/tasks/{id}/cancel"), json!(null)),
        409,
        "conflict",
        "cancelled",
    );
    let (status, retried) = http.post(&format!("/v1/tasks/{id}/retry"), json!(null));
    assert_eq!((status, retried["state"].clone()), (200, json!("pending")));
    http.post(&format!("/v1/tasks/{id}/cancel"), json!(null));
    let (status, body) = http.delete(&format!("/v1/tasks/{id}"));
    assert_eq!((status, body), (204, Value::Null));
    assert_error(http.get(&format!("/v1/tasks/{id}")), 404, "not_found", &id);
    for _ in 0..3 {
        let other = http.enqueue(json!({"type": "t"}))["id"]
            .as_str()
            .unwrap()
            .to_owned();
        http.post(&format!("/v1/tasks/{other}/cancel"), json!(null));
    }
    // An empty state, such as a script's unset variable writes, is not
    // taken for every finished state: a clear names what it deletes.
    for empty in ["state=", "state=cancelled,", "state=,"] {
        assert_error(
            http.delete(&format!("/v1/tasks?{empty}")),
            400,
            "invalid_argument",
            "state: must be one of",
        );
    }
    let (status, cleared) = http.delete("/v1/tasks?state=completed,cancelled&older_than_secs=0");
    assert_eq!((status, cleared), (200, json!({"deleted": 3})));
}

#[test]
fn queues_pause_resume_and_limit_concurrency() {
    let server = Server::start();
    let http = server.http();
    for _ in 0..4 {
        http.enqueue(json!({"type": "t", "queue": "mail"}));
    }
    let (status, paused) = http.post("/v1/queues/mail/pause", json!(null));
    assert_eq!(status, 200);
    assert_eq!(
        (paused["name"].clone(), paused["paused"].clone()),
        (json!("mail"), json!(true))
    );
    assert!(
        http.fetch("w", json!({"limit": 10})).is_empty(),
        "a paused queue hands out nothing"
    );
    let (_, queues) = http.get("/v1/queues");
    let mail = &queues["queues"][0];
    assert_eq!(
        (
            mail["name"].clone(),
            mail["paused"].clone(),
            mail["counts"]["pending"].clone()
        ),
        (json!("mail"), json!(true), json!(4))
    );
    http.post("/v1/queues/mail/resume", json!(null));
    let (status, limited) = http.patch("/v1/queues/mail", json!({"concurrency": 1}));
    assert_eq!((status, limited["concurrency"].clone()), (200, json!(1)));
    assert_eq!(http.fetch("w", json!({"limit": 10})).len(), 1);
    assert!(http.fetch("w", json!({"limit": 10})).is_empty());
    let (_, unlimited) = http.patch("/v1/queues/mail", json!({"concurrency": null}));
    assert_eq!(unlimited["concurrency"], Value::Null);
    assert_eq!(http.fetch("w", json!({"limit": 10})).len(), 3);
}

/// The node's `/metrics` text.
fn metrics_text(server: &Server) -> String {
    reqwest::blocking::get(format!("{}/metrics", server.url))
        .unwrap()
        .text()
        .unwrap()
}

/// Enqueues 1,005 tasks in one batch, the `i`th made by `task`, then
/// `again`; answers the metrics that follow.
fn metrics_after_a_thousand_and_five(
    server: &Server,
    task: impl Fn(usize) -> Value,
    again: Value,
) -> String {
    let http = server.http();
    let tasks: Vec<Value> = (0..1005).map(task).collect();
    let (status, body) = http.post("/v1/tasks/batch", json!({ "tasks": tasks }));
    assert_eq!(status, 201, "{body}");
    http.enqueue(again);
    metrics_text(server)
}

/// Task types are the application's names: past 1,000 (queue, type)
/// pairs, tasks are counted under `type="(other)"`, so that types made of
/// ids do not add series without end.
#[test]
fn metrics_label_at_most_a_thousand_task_types() {
    let server = Server::start();
    // A labelled type keeps its label after the budget is spent.
    let metrics = metrics_after_a_thousand_and_five(
        &server,
        |i| json!({"type": format!("t{i}"), "queue": "q"}),
        json!({"type": "t0", "queue": "q"}),
    );
    let enqueued: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("offload_tasks_enqueued_total{"))
        .collect();
    assert_eq!(enqueued.len(), 1001, "{enqueued:?}");
    for needle in [
        "offload_tasks_enqueued_total{queue=\"q\",type=\"(other)\"} 5",
        "offload_tasks_enqueued_total{queue=\"q\",type=\"t0\"} 2",
        "offload_tasks_enqueued_total{queue=\"q\",type=\"t999\"} 1",
    ] {
        assert!(enqueued.contains(&needle), "no {needle} in {enqueued:?}");
    }
}

/// Queues are made on first use: past 1,000 of them, their tasks are
/// counted under `queue="(other)"`, so that a queue for each of an
/// application's users does not add series without end. The API still
/// answers every queue.
#[test]
fn metrics_label_at_most_a_thousand_queues() {
    let server = Server::start();
    // A labelled queue keeps its label after the budget is spent.
    let metrics = metrics_after_a_thousand_and_five(
        &server,
        |i| json!({"type": "t", "queue": format!("q{i}")}),
        json!({"type": "t", "queue": "q0"}),
    );
    let pending: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("offload_queue_tasks{") && l.contains("state=\"pending\""))
        .collect();
    assert_eq!(pending.len(), 1001, "{pending:?}");
    for needle in [
        "offload_queue_tasks{queue=\"(other)\",state=\"pending\"} 5",
        "offload_queue_tasks{queue=\"q0\",state=\"pending\"} 2",
        "offload_queue_tasks{queue=\"q999\",state=\"pending\"} 1",
    ] {
        assert!(pending.contains(&needle), "no {needle} in {pending:?}");
    }
    // The counters share it; the thousand labelled queues also spent the
    // budget of (queue, type) pairs.
    assert!(
        metrics.contains("offload_tasks_enqueued_total{queue=\"(other)\",type=\"(other)\"} 5"),
        "{metrics}"
    );
    let (_, queues) = server.http().get("/v1/queues");
    assert_eq!(queues["queues"].as_array().unwrap().len(), 1005);
}

#[test]
fn health_metrics_and_openapi() {
    let server = Server::start();
    let http = server.http();
    let task = http.enqueue(json!({"type": "report.build", "queue": "reports"}));
    let claimed = http.fetch("w", json!({}));
    assert_eq!(claimed.len(), 1);
    let (status, _) = http.post(
        &format!("/v1/tasks/{}/complete", task["id"].as_str().unwrap()),
        json!({"worker_id": "w"}),
    );
    assert_eq!(status, 200);
    // A batch and a batched ack across two (queue, type) pairs: the
    // counters add up per pair, not per request.
    let (status, _) = http.post(
        "/v1/tasks/batch",
        json!({"tasks": [
            {"type": "report.build", "queue": "reports"},
            {"type": "mail.send", "queue": "mail"},
            {"type": "report.build", "queue": "reports"},
        ]}),
    );
    assert_eq!(status, 201);
    let claimed = http.fetch("w", json!({"limit": 10}));
    assert_eq!(claimed.len(), 3);
    let id_of = |t: &Value| t["id"].clone();
    let (reports, mail): (Vec<&Value>, Vec<&Value>) =
        claimed.iter().partition(|t| t["queue"] == "reports");
    // Cancelled when the mail it waits for fails: no answer names it.
    let followup = http
        .enqueue(json!({"type": "mail.followup", "queue": "mail", "depends_on": [id_of(mail[0])]}));
    assert_eq!(followup["state"], "blocked");
    let (status, acked) = http.post(
        "/v1/ack",
        json!({
            "worker_id": "w",
            "completed": reports.iter().map(|t| json!({"id": id_of(t)})).collect::<Vec<_>>(),
            "failed": [{"id": id_of(mail[0]), "error": {"message": "bounced"}, "retry": false}],
        }),
    );
    assert_eq!(status, 200, "{acked}");
    // Attempts no worker reports the end of count too: one whose timeout
    // ran out, and a task cancelled before it ran.
    let slow = http.enqueue(
        json!({"type": "slow.job", "queue": "mail", "max_attempts": 1, "timeout_secs": 1}),
    );
    let slow = slow["id"].as_str().unwrap();
    assert_eq!(http.fetch("w", json!({"types": ["slow.job"]})).len(), 1);
    let unwanted = http.enqueue(json!({"type": "mail.send", "queue": "mail"}));
    let (status, _) = http.post(
        &format!("/v1/tasks/{}/cancel", unwanted["id"].as_str().unwrap()),
        json!(null),
    );
    assert_eq!(status, 200);
    http.wait_for(slow, "its timeout to fail it", |t| t["state"] == "failed");
    // Displaced by a replace: the answer names the new task, not the old.
    for _ in 0..2 {
        http.enqueue(json!({"type": "mail.digest", "queue": "mail", "unique_key": "daily", "on_conflict": "replace"}));
    }

    let (status, health) = http.get("/health");
    assert_eq!(status, 200);
    assert_eq!(
        (
            health["status"].clone(),
            health["database"].clone(),
            health["stuck"].clone()
        ),
        (json!("ok"), json!("ok"), json!(0))
    );
    assert_eq!(health["durability"], "durable");
    assert_eq!(health["counts"]["completed"], 3);

    let metrics = metrics_text(&server);
    for needle in [
        "offload_tasks_enqueued_total{queue=\"reports\",type=\"report.build\"} 3",
        "offload_tasks_enqueued_total{queue=\"mail\",type=\"mail.send\"} 2",
        "offload_tasks_completed_total{queue=\"reports\",type=\"report.build\"} 3",
        "offload_tasks_failed_total{queue=\"mail\",type=\"mail.send\"} 1",
        "offload_tasks_failed_total{queue=\"mail\",type=\"slow.job\"} 1",
        "offload_tasks_cancelled_total{queue=\"mail\",type=\"mail.send\"} 1",
        "offload_tasks_cancelled_total{queue=\"mail\",type=\"mail.followup\"} 1",
        "offload_tasks_cancelled_total{queue=\"mail\",type=\"mail.digest\"} 1",
        "offload_task_duration_seconds_count{queue=\"reports\",type=\"report.build\"} 3",
        "offload_task_pickup_seconds_count{queue=\"reports\"} 3",
        "offload_task_pickup_seconds_count{queue=\"mail\"} 2",
        "offload_http_request_duration_seconds_bucket",
        "offload_queue_tasks{queue=\"reports\",state=\"completed\"} 3",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    // The store's tally is taken at each scrape: the counters keep what
    // earlier scrapes took and add what finished since.
    let another = http.enqueue(json!({"type": "report.build", "queue": "reports"}));
    assert_eq!(http.fetch("w", json!({"types": ["report.build"]})).len(), 1);
    let (status, _) = http.post(
        &format!("/v1/tasks/{}/complete", another["id"].as_str().unwrap()),
        json!({"worker_id": "w"}),
    );
    assert_eq!(status, 200);
    let metrics = metrics_text(&server);
    for needle in [
        "offload_tasks_completed_total{queue=\"reports\",type=\"report.build\"} 4",
        "offload_tasks_failed_total{queue=\"mail\",type=\"mail.send\"} 1",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle} at the second scrape:\n{metrics}"
        );
    }

    let (status, doc) = http.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/tasks",
        "/v1/tasks/batch",
        "/v1/tasks/{id}",
        "/v1/tasks/{id}/cancel",
        "/v1/tasks/{id}/retry",
        "/v1/tasks/{id}/heartbeat",
        "/v1/tasks/{id}/complete",
        "/v1/tasks/{id}/fail",
        "/v1/tasks/{id}/events",
        "/v1/events",
        "/v1/stats",
        "/v1/fetch",
        "/v1/ack",
        "/v1/queues",
        "/v1/queues/{name}",
        "/v1/queues/{name}/pause",
        "/v1/queues/{name}/resume",
        "/health",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(path), "/openapi.json lacks {path}");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "Task",
        "NewTask",
        "ErrorBody",
        "FetchRequest",
        "AckBody",
        "Stats",
        "QueueInfo",
    ] {
        assert!(
            schemas.contains_key(schema),
            "/openapi.json lacks the {schema} schema"
        );
    }
}
