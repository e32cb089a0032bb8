//! Requests made at random: bodies with the fields of SPEC §4 and unknown
//! ones, values of every JSON shape, and list, clear and event-stream
//! queries with any parameters and values. Each is taken or refused in the error shape of SPEC §4,
//! never a 500, and a refused field or parameter is named. And `offload
//! enqueue` with any flags: an id printed, or a refusal in words.

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{Value, json};

use crate::support::{Http, Server};

/// Values of every JSON shape, with the edges validators meet: numbers
/// past every integer type, timestamps and ids that parse and that do not,
/// empty and control-character strings.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(-1i64), Just(0), Just(1), Just(5), Just(11), Just(1001)]
            .prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z0-9_.:-]{0,12}".prop_map(Value::from),
        "\\PC{0,6}".prop_map(Value::from),
        prop_oneof![
            Just("2026-01-15T10:30:05.123Z"),
            Just("9999-12-31T23:59:59Z"),
            Just("0000-01-01T00:00:00Z"),
            Just("01a2041e-d5a1-730d-971c-a89e0eec346a"),
            Just("not-a-uuid"),
            Just("replace"),
            Just("high"),
            Just("\u{0}"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z:]{0,4}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object of up to four of `fields` (and sometimes one nobody knows),
/// each with any value.
fn any_body(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        9 => proptest::sample::select(fields),
        1 => Just("colour"),
    ];
    proptest::collection::vec((field, any_value()), 0..5).prop_map(|pairs| {
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    })
}

const ENQUEUE_FIELDS: &[&str] = &[
    "type",
    "payload",
    "queue",
    "priority",
    "run_at",
    "delay_secs",
    "max_attempts",
    "timeout_secs",
    "unique_key",
    "on_conflict",
    "labels",
    "depends_on",
    "owner",
];

/// A body for `POST /v1/tasks`: usually with a valid type, so that the
/// other fields are what is judged.
fn enqueue_body() -> impl Strategy<Value = Value> {
    (any_body(ENQUEUE_FIELDS), any::<bool>()).prop_map(|(mut body, typed)| {
        if let (Value::Object(fields), true) = (&mut body, typed) {
            fields.entry("type").or_insert_with(|| json!("any.input"));
        }
        body
    })
}

/// The statuses `/openapi.json` lists for each route, which a client
/// generated from it expects and no other.
struct Documented(Value);

impl Documented {
    fn read(http: &Http) -> Self {
        let (status, doc) = http.get("/openapi.json");
        assert_eq!(status, 200, "/openapi.json: {doc}");
        Self(doc)
    }

    fn statuses(&self, method: &str, route: &str) -> Vec<u16> {
        let responses = self.0["paths"][route][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("/openapi.json has no {method} {route}"));
        responses
            .keys()
            .map(|status| status.parse().expect("a status"))
            .collect()
    }
}

/// Checks one answer to `request`: among the statuses `documented` for its
/// route, and taken with one of `taken`, or refused with a 4xx in the error
/// shape, an `invalid_argument` naming a field of the route (`known`) or
/// one the request `asked` with.
fn judge(
    answer: (u16, Value),
    documented: &[u16],
    taken: &[u16],
    known: &[&str],
    asked: &[&str],
    request: &dyn std::fmt::Display,
) -> Result<(), TestCaseError> {
    let (status, answer) = answer;
    prop_assert!(
        documented.contains(&status),
        "status {status} for {request}, which /openapi.json does not list for its route \
         ({documented:?}): {answer}"
    );
    if taken.contains(&status) {
        return Ok(());
    }
    prop_assert!(
        (400..500).contains(&status),
        "status {status} for {request}: {answer}"
    );
    let code = answer["error"]["code"].as_str().unwrap_or_default();
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    prop_assert!(
        [
            "invalid_argument",
            "invalid_json",
            "payload_too_large",
            "not_found",
            "conflict"
        ]
        .contains(&code),
        "code {code:?} for {request}: {answer}"
    );
    prop_assert!(!message.is_empty(), "no message for {request}: {answer}");
    if code == "invalid_argument" {
        let named = message
            .split([':', '.', '['])
            .next()
            .unwrap_or_default()
            .trim();
        prop_assert!(
            asked.contains(&named) || known.contains(&named),
            "{message:?} names no field of {request}"
        );
    }
    Ok(())
}

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

/// Posts each body `strategy` makes to `path`, an instance of `route`.
fn post_all(
    http: &Http,
    (route, path): (&str, &str),
    strategy: impl Strategy<Value = Value>,
    taken: &[u16],
    known: &[&str],
) {
    let documented = Documented::read(http).statuses("post", route);
    runner()
        .run(&strategy, |body| {
            let asked: Vec<&str> = body
                .as_object()
                .map(|fields| fields.keys().map(String::as_str).collect())
                .unwrap_or_default();
            let answer = http.post(path, body.clone());
            judge(answer, &documented, taken, known, &asked, &body)
        })
        .unwrap_or_else(|failure| panic!("POST {path}: {failure}"));
}

#[test]
fn any_enqueue_body_is_taken_or_refused_naming_its_field() {
    let server = Server::start();
    let http = server.http();
    post_all(
        &http,
        ("/v1/tasks", "/v1/tasks"),
        enqueue_body(),
        &[200, 201],
        ENQUEUE_FIELDS,
    );
    post_all(
        &http,
        ("/v1/tasks/batch", "/v1/tasks/batch"),
        proptest::collection::vec(enqueue_body(), 0..4).prop_map(|tasks| json!({ "tasks": tasks })),
        &[201],
        &["tasks"],
    );
}

#[test]
fn any_worker_body_is_taken_or_refused_naming_its_field() {
    let server = Server::start();
    let http = server.http();
    let held = http.enqueue(json!({"type": "any.input"}));
    let id = held["id"].as_str().expect("id").to_owned();
    let with_worker = |fields: &'static [&'static str]| {
        any_body(fields).prop_map(|mut body| {
            if let Value::Object(fields) = &mut body {
                fields.entry("worker_id").or_insert_with(|| json!("w"));
            }
            body
        })
    };
    // `wait_ms` left out (0 by default): every fetch answers at once.
    const FETCH: &[&str] = &["worker_id", "types", "queues", "limit", "lease_secs"];
    post_all(
        &http,
        ("/v1/fetch", "/v1/fetch"),
        with_worker(FETCH),
        &[200],
        FETCH,
    );
    const ACK_ITEM: &[&str] = &["id", "result", "error", "retry", "retry_in_secs"];
    let ack = (
        proptest::collection::vec(any_body(ACK_ITEM), 0..3),
        proptest::collection::vec(any_body(ACK_ITEM), 0..3),
    )
        .prop_map(|(completed, failed)| json!({"worker_id": "w", "completed": completed, "failed": failed}));
    post_all(
        &http,
        ("/v1/ack", "/v1/ack"),
        ack,
        &[200],
        &["worker_id", "completed", "failed"],
    );
    for (action, fields) in [
        ("heartbeat", &["worker_id", "progress", "lease_secs"][..]),
        ("fail", &["worker_id", "error", "retry", "retry_in_secs"]),
        ("complete", &["worker_id", "result"]),
    ] {
        let route = format!("/v1/tasks/{{id}}/{action}");
        let path = format!("/v1/tasks/{id}/{action}");
        post_all(&http, (&route, &path), with_worker(fields), &[200], fields);
    }
}

/// A query string's value: the forms each parameter takes, their edges,
/// and any text.
fn any_query_value() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "",
                "pending",
                "completed,failed",
                "pending,,running",
                "sleeping",
                "0",
                "1",
                "50",
                "1000",
                "1001",
                "-1",
                "99999999999999999999",
                "a:b",
                "nocolon",
                ":",
                "2026-01-15T10:30:05.123Z",
                "yesterday",
                "q.1",
                "no spaces",
            ][..]
        )
        .prop_map(str::to_owned),
        "\\PC{0,8}",
    ]
}

/// Every byte but the unreserved ones percent-encoded.
fn query_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn any_query_is_answered_or_refused_naming_its_parameter() {
    let server = Server::start();
    let http = server.http();
    http.enqueue(json!({"type": "any.input", "labels": {"a": "b"}}));
    const LIST: &[&str] = &[
        "state",
        "type",
        "queue",
        "owner",
        "label",
        "created_after",
        "created_before",
        "limit",
        "cursor",
    ];
    const CLEAR: &[&str] = &["state", "older_than_secs"];
    const EVENTS: &[&str] = &["queue", "type", "owner"];
    let param = |known: &'static [&'static str]| {
        prop_oneof![
            9 => proptest::sample::select(known),
            1 => Just("colour"),
        ]
    };
    let doc = Documented::read(&http);
    for (route, known) in [
        (Route::List, LIST),
        (Route::Clear, CLEAR),
        (Route::Events, EVENTS),
    ] {
        let documented = match route {
            Route::List => doc.statuses("get", "/v1/tasks"),
            Route::Clear => doc.statuses("delete", "/v1/tasks"),
            Route::Events => doc.statuses("get", "/v1/events"),
        };
        let pairs = proptest::collection::vec((param(known), any_query_value()), 0..4);
        runner()
            .run(&pairs, |pairs| {
                let query: Vec<String> = pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={}", query_encode(v)))
                    .collect();
                let query = query.join("&");
                let (answer, path) = match route {
                    Route::List => {
                        let path = format!("/v1/tasks?{query}");
                        (http.get(&path), path)
                    }
                    Route::Clear => {
                        let path = format!("/v1/tasks?{query}");
                        (http.delete(&path), path)
                    }
                    Route::Events => {
                        let path = format!("/v1/events?{query}");
                        (stream_opened(&http, &path), path)
                    }
                };
                let asked: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
                judge(answer, &documented, &[200], known, &asked, &path)
            })
            .unwrap_or_else(|failure| panic!("{route:?}: {failure}"));
    }
}

#[derive(Debug, Clone, Copy)]
enum Route {
    List,
    Clear,
    Events,
}

/// An event stream's answer: its status, and the body of a refusal. A
/// stream that opens is left at its headers (it lasts as long as the
/// server does) and closed as it is dropped.
fn stream_opened(http: &Http, path: &str) -> (u16, Value) {
    let response = http
        .client
        .get(format!("{}{path}", http.base))
        .send()
        .expect("GET");
    let status = response.status().as_u16();
    if status == 200 {
        return (status, Value::Null);
    }
    let text = response.text().expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A flag's value for the command line: the forms each flag takes, their
/// edges, and any text.
fn any_flag_value() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "",
                "0",
                "-1",
                "5",
                "11",
                "high",
                "99999999999999999999",
                "{}",
                "{\"a\":1}",
                "[1,",
                "@-",
                "@/nonexistent/file",
                "k=v",
                "=v",
                "k=",
                "noequals",
                "2026-01-15T10:30:05.123Z",
                "tomorrow",
                "01a2041e-d5a1-730d-971c-a89e0eec346a",
                "q.1",
                "no spaces",
            ][..]
        )
        .prop_map(str::to_owned),
        "\\PC{0,8}",
    ]
}

/// `offload enqueue` with any flags and values: it prints an id (exit 0)
/// or says what is wrong on stderr (exit 2, or 1 for what the server
/// refused), never a panic.
#[test]
fn any_enqueue_command_line_is_taken_or_refused_in_words() {
    let server = Server::start();
    const FLAGS: &[&str] = &[
        "--payload",
        "--queue",
        "--priority",
        "--delay",
        "--at",
        "--max-attempts",
        "--timeout",
        "--unique-key",
        "--label",
        "--after",
        "--owner",
    ];
    let flags =
        proptest::collection::vec((proptest::sample::select(FLAGS), any_flag_value()), 0..4);
    let mut runner = TestRunner::new(ProptestConfig {
        // A process each: fewer cases than the HTTP checks.
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&(flags, any::<bool>()), |(flags, replace)| {
            let mut args = vec!["enqueue".to_owned(), "any.input".to_owned()];
            for (flag, value) in &flags {
                // `--flag=value`, so that a value that looks like a flag
                // stays the value.
                args.push(format!("{flag}={value}"));
            }
            if replace {
                args.push("--replace".to_owned());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let output = server.cli(&args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let code = output.status.code();
            prop_assert!(
                matches!(code, Some(0..=2)),
                "exit {code:?} for {args:?}: {stderr}"
            );
            prop_assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            if code == Some(0) {
                let printed = String::from_utf8_lossy(&output.stdout);
                prop_assert!(
                    uuid::Uuid::parse_str(printed.trim()).is_ok(),
                    "{args:?} printed {printed:?}"
                );
            } else {
                prop_assert!(!stderr.trim().is_empty(), "{args:?} refused in silence");
            }
            Ok(())
        })
        .unwrap_or_else(|failure| panic!("{failure}"));
}

#[test]
fn any_queue_name_and_update_is_taken_or_refused_naming_its_field() {
    let server = Server::start();
    let http = server.http();
    // Not `.` or `..`: a URL's path folds those segments away (reqwest's
    // URLs as browsers' and curl's do, percent-encoded or not), so no
    // such request reaches the queue's route; a name SPEC §1 allows, which
    // no client can address (in the note on the issue).
    let name = prop_oneof![
        proptest::sample::select(&["q", "q.1", "a-b_c", "", "no spaces", "a/b", "é", "..."][..])
            .prop_map(str::to_owned),
        "\\PC{0,8}",
        "[a-z]{60,70}",
    ]
    .prop_filter("a dot segment", |name| name != "." && name != "..");
    let doc = Documented::read(&http);
    let (pause_statuses, resume_statuses, update_statuses) = (
        doc.statuses("post", "/v1/queues/{name}/pause"),
        doc.statuses("post", "/v1/queues/{name}/resume"),
        doc.statuses("patch", "/v1/queues/{name}"),
    );
    runner()
        .run(
            &(name, any_value(), any::<bool>()),
            |(name, concurrency, pause)| {
                let path = format!("/v1/queues/{}", query_encode(&name));
                let (action, documented) = if pause {
                    ("pause", &pause_statuses)
                } else {
                    ("resume", &resume_statuses)
                };
                // An empty name leaves `/v1/queues/`, a path no route has:
                // the answer is the server's "no such route".
                let update_documented: &[u16] = if name.is_empty() {
                    &[404]
                } else {
                    &update_statuses
                };
                let paused = http.post(&format!("{path}/{action}"), json!({}));
                judge(paused, documented, &[200], &["name"], &[], &path)?;
                let body = json!({ "concurrency": concurrency });
                let updated = http.patch(&path, body.clone());
                let known = ["name", "concurrency"];
                judge(updated, update_documented, &[200], &known, &[], &body)
            },
        )
        .unwrap_or_else(|failure| panic!("{failure}"));
}

/// The bounds `/openapi.json` states for the fields of a request are the
/// server's: a value at each bound is taken (as an integer and as JSON
/// Schema's other way of writing one, `1000.0`), one past it is refused
/// naming the field. Read from the document, so that a rule changed on one
/// side alone fails here.
#[test]
fn the_bounds_openapi_states_are_the_servers() {
    let server = Server::start();
    let http = server.http();
    let doc = Documented::read(&http);
    let requests = [
        ("NewTask", "/v1/tasks", json!({"type": "doc.bounds"})),
        (
            "FetchRequest",
            "/v1/fetch",
            json!({"worker_id": "w", "types": ["none.such"]}),
        ),
        ("QueueUpdate", "/v1/queues/doc.bounds", json!({})),
    ];
    for (schema, path, base) in requests {
        let properties = doc.0["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("/openapi.json has no {schema}"));
        let mut checked = 0;
        for (field, rule) in properties {
            let mut cases: Vec<(Value, bool)> = Vec::new();
            if let (Some(min), Some(max)) = (rule["minimum"].as_i64(), rule["maximum"].as_i64()) {
                cases.extend([
                    (json!(min), true),
                    (json!(max), true),
                    (json!(max as f64), true),
                    (json!(min - 1), false),
                    (json!(max + 1), false),
                ]);
            }
            if let Some(max) = rule["maxLength"].as_u64() {
                let at = "a".repeat(max as usize);
                cases.extend([(json!(at), true), (json!(format!("{at}a")), false)]);
            }
            if rule["minLength"].as_u64() == Some(1) {
                cases.push((json!(""), false));
            }
            if let Some(max) = rule["maxProperties"].as_u64() {
                let object =
                    |n: u64| -> Value { (0..n).map(|i| (format!("k{i}"), json!("v"))).collect() };
                cases.extend([(object(max), true), (object(max + 1), false)]);
            }
            for (value, taken) in cases {
                // A fetch that waits its longest would hold the test a minute.
                if (schema, field.as_str()) == ("FetchRequest", "wait_ms") && taken {
                    continue;
                }
                let mut body = base.clone();
                body[field.as_str()] = value.clone();
                let (status, answer) = if schema == "QueueUpdate" {
                    http.patch(path, body.clone())
                } else {
                    http.post(path, body.clone())
                };
                if taken {
                    assert!(
                        (200..300).contains(&status),
                        "{schema}.{field} = {value}, within /openapi.json's rule {rule}, was \
                         refused: {status} {answer}"
                    );
                } else {
                    let message = answer["error"]["message"].as_str().unwrap_or_default();
                    assert!(
                        status == 400 && message.starts_with(&format!("{field}:")),
                        "{schema}.{field} = {value}, past /openapi.json's rule {rule}, was not \
                         refused naming {field}: {status} {answer}"
                    );
                }
                checked += 1;
            }
        }
        assert!(checked > 0, "/openapi.json states no bound on {schema}");
    }
}
