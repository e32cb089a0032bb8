//! The worker protocol of SPEC §4.1 and the events of §4.2, over real HTTP.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, assert_error};

#[test]
fn fetch_heartbeat_complete_and_fail() {
    let server = Server::start();
    let http = server.http();
    let low = http.enqueue(json!({"type": "t", "priority": 2}));
    let high = http.enqueue(json!({"type": "t", "priority": 9}));
    let claimed = http.fetch("w1", json!({"limit": 1, "lease_secs": 30}));
    assert_eq!(claimed[0]["id"], high["id"], "highest priority first");
    assert_eq!(claimed[0]["state"], "running");
    assert_eq!(claimed[0]["worker_id"], "w1");
    assert!(claimed[0]["lease_expires_at"].is_string());
    let id = high["id"].as_str().unwrap();

    let (status, beat) = http.post(
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"worker_id": "w1", "progress": {"percent": 40, "message": "rows", "data": {"done": 4}}}),
    );
    assert_eq!(status, 200, "{beat}");
    assert_eq!(beat["cancel_requested"], false);
    assert!(beat["lease_expires_at"].is_string());
    assert_eq!(http.task(id)["progress"]["percent"], 40.0);
    assert_error(
        http.post(
            &format!("/v1/tasks/{id}/heartbeat"),
            json!({"worker_id": "intruder"}),
        ),
        409,
        "conflict",
        "does not hold",
    );
    assert_error(
        http.post(
            &format!("/v1/tasks/{id}/heartbeat"),
            json!({"worker_id": "w1", "progress": {"percent": 150}}),
        ),
        400,
        "invalid_argument",
        "progress.percent",
    );
    let (status, done) = http.post(
        &format!("/v1/tasks/{id}/complete"),
        json!({"worker_id": "w1", "result": {"rows": 10}}),
    );
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        (done["state"].clone(), done["result"].clone()),
        (json!("completed"), json!({"rows": 10}))
    );
    assert_error(
        http.post(
            &format!("/v1/tasks/{id}/complete"),
            json!({"worker_id": "w1"}),
        ),
        409,
        "conflict",
        "completed",
    );

    let other = low["id"].as_str().unwrap();
    http.fetch("w2", json!({}));
    assert_error(
        http.post(
            &format!("/v1/tasks/{other}/fail"),
            json!({"worker_id": "w2", "error": {"message": "no"}, "retry": false, "retry_in_secs": 5}),
        ),
        400,
        "invalid_argument",
        "retry_in_secs: must not be given with retry: false",
    );
    assert_error(
        http.post(
            "/v1/ack",
            json!({"worker_id": "w2", "failed": [{"id": other, "error": {"message": "no"}, "retry": false, "retry_in_secs": 0}]}),
        ),
        400,
        "invalid_argument",
        "failed[0].retry_in_secs: must not be given with retry: false",
    );
    let (status, failed) = http.post(
        &format!("/v1/tasks/{other}/fail"),
        json!({"worker_id": "w2", "error": {"message": "disk full"}, "retry_in_secs": 120}),
    );
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["state"], "scheduled");
    assert_eq!(failed["errors"][0]["message"], "disk full");
    assert_eq!(failed["error"]["kind"], "error");
}

#[test]
fn cancel_of_a_running_task_reaches_the_worker_through_heartbeat() {
    let server = Server::start();
    let http = server.http();
    let id = http.enqueue(json!({"type": "t"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    http.fetch("w", json!({}));
    let (status, asked) = http.post(&format!("/v1/tasks/{id}/cancel"), json!(null));
    assert_eq!(
        (
            status,
            asked["state"].clone(),
            asked["cancel_requested"].clone()
        ),
        (200, json!("running"), json!(true))
    );
    let (_, beat) = http.post(
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"worker_id": "w"}),
    );
    assert_eq!(beat["cancel_requested"], true);
    let (_, stopped) = http.post(
        &format!("/v1/tasks/{id}/fail"),
        json!({"worker_id": "w", "error": {"message": "stopping"}}),
    );
    assert_eq!(stopped["state"], "cancelled");
}

#[test]
fn ack_answers_each_item() {
    let server = Server::start();
    let http = server.http();
    for _ in 0..3 {
        http.enqueue(json!({"type": "t"}));
    }
    let claimed = http.fetch("w", json!({"limit": 3}));
    let ids: Vec<&str> = claimed.iter().map(|t| t["id"].as_str().unwrap()).collect();
    let (status, answer) = http.post(
        "/v1/ack",
        json!({
            "worker_id": "w",
            "completed": [{"id": ids[0], "result": 1}, {"id": "01a2041e-d5a1-730d-971c-a89e0eec346a"}],
            "failed": [{"id": ids[1], "error": {"message": "nope"}, "retry": false}],
        }),
    );
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(
        (results[0]["id"].as_str(), results[0]["ok"].clone()),
        (Some(ids[0]), json!(true))
    );
    assert_eq!(results[1]["ok"], false);
    assert_eq!(results[1]["error"]["code"], "not_found");
    assert_eq!(
        (results[2]["id"].as_str(), results[2]["ok"].clone()),
        (Some(ids[1]), json!(true))
    );
    assert_eq!(http.task(ids[0])["state"], "completed");
    assert_eq!(http.task(ids[1])["state"], "failed");
    assert_eq!(http.task(ids[2])["state"], "running");
}

#[test]
fn a_waiting_fetch_wakes_when_a_task_is_enqueued() {
    let server = Server::start();
    let http = server.http();
    let url = server.url.clone();
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        let answer: Value = reqwest::blocking::Client::new()
            .post(format!("{url}/v1/fetch"))
            .json(&json!({"worker_id": "w", "wait_ms": 20000}))
            .timeout(Duration::from_secs(60))
            .send()
            .unwrap()
            .json()
            .unwrap();
        (answer, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let task = http.enqueue(json!({"type": "t"}));
    let (answer, waited) = waiter.join().unwrap();
    assert_eq!(
        answer["tasks"][0]["id"], task["id"],
        "the waiting fetch got the task"
    );
    // It woke on the enqueue, not at the end of its 20 s wait.
    assert!(waited < Duration::from_secs(15), "waited {waited:?}");
}

#[test]
fn a_scheduled_task_reaches_a_waiting_worker_when_due() {
    let server = Server::start();
    let http = server.http();
    let task = http.enqueue(json!({"type": "t", "delay_secs": 1}));
    assert_eq!(task["state"], "scheduled");
    let claimed = http.fetch("w", json!({"wait_ms": 20000}));
    assert_eq!(claimed[0]["id"], task["id"]);
}

#[test]
fn a_silent_worker_loses_its_lease_and_the_task_runs_again() {
    let server = Server::start();
    let http = server.http();
    let id = http.enqueue(json!({"type": "t"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let claimed = http.fetch("silent", json!({"lease_secs": 1}));
    assert_eq!(claimed[0]["attempt"], 1);
    // No heartbeat: within about a second the attempt fails as lease_expired.
    let recovered = http.wait_for(&id, "recovered", |t| t["state"] != "running");
    assert_eq!(recovered["errors"][0]["kind"], "lease_expired");
    let again = http.fetch("alive", json!({"wait_ms": 20000}));
    assert_eq!(
        (again[0]["id"].as_str(), again[0]["attempt"].clone()),
        (Some(id.as_str()), json!(2))
    );
    assert_error(
        http.post(
            &format!("/v1/tasks/{id}/complete"),
            json!({"worker_id": "silent"}),
        ),
        409,
        "conflict",
        "does not hold",
    );
    let (status, _) = http.post(
        &format!("/v1/tasks/{id}/complete"),
        json!({"worker_id": "alive"}),
    );
    assert_eq!(status, 200);
}

/// Reads server-sent events until the stream ends: (event name, task).
fn read_events(url: String) -> Vec<(String, Value)> {
    let response = reqwest::blocking::Client::new()
        .get(url)
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = Vec::new();
    let mut name = String::new();
    for line in BufReader::new(response).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            events.push((name.clone(), serde_json::from_str(data).unwrap()));
        }
    }
    events
}

#[test]
fn task_events_stream_each_change_and_end_after_the_last() {
    let server = Server::start();
    let http = server.http();
    let id = http.enqueue(json!({"type": "t"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reader = std::thread::spawn({
        let url = format!("{}/v1/tasks/{id}/events", server.url);
        move || read_events(url)
    });
    // The stream opens with the current state; wait until it is open.
    std::thread::sleep(Duration::from_millis(300));
    http.fetch("w", json!({}));
    http.post(
        &format!("/v1/tasks/{id}/heartbeat"),
        json!({"worker_id": "w", "progress": {"percent": 50}}),
    );
    http.post(
        &format!("/v1/tasks/{id}/complete"),
        json!({"worker_id": "w"}),
    );
    let events = reader.join().unwrap();
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|(name, task)| (name.clone(), task["state"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [
        ("task.state", "pending"),
        ("task.state", "running"),
        ("task.progress", "running"),
        ("task.state", "completed"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(events[2].1["progress"]["percent"], 50.0);

    // A finished task's stream holds its one state and ends at once.
    let finished = read_events(format!("{}/v1/tasks/{id}/events", server.url));
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].1["state"], "completed");
}

#[test]
fn the_all_events_stream_filters_by_queue_and_owner() {
    let server = Server::start();
    let http = server.http();
    let stream = |query: &str| {
        let response = reqwest::blocking::Client::new()
            .get(format!("{}/v1/events?{query}", server.url))
            .timeout(Duration::from_secs(60))
            .send()
            .unwrap();
        BufReader::new(response).lines().map(|l| l.unwrap())
    };
    fn first_task(mut lines: impl Iterator<Item = String>) -> Value {
        let data = lines
            .find_map(|l| l.strip_prefix("data: ").map(str::to_owned))
            .unwrap();
        serde_json::from_str(&data).unwrap()
    }
    let by_queue = stream("queue=watched");
    // Woken by alice's tasks, it still checks their queue.
    let by_owner_and_queue = stream("owner=alice&queue=watched");
    http.enqueue(json!({"type": "t", "queue": "ignored"}));
    http.enqueue(json!({"type": "t", "queue": "ignored", "owner": "alice"}));
    let watched = http.enqueue(json!({"type": "t", "queue": "watched"}));
    let alices = http.enqueue(json!({"type": "t", "queue": "watched", "owner": "alice"}));
    assert_eq!(
        first_task(by_queue)["id"],
        watched["id"],
        "only the watched queue's task is streamed"
    );
    assert_eq!(
        first_task(by_owner_and_queue)["id"],
        alices["id"],
        "only alice's task in the watched queue is streamed"
    );
}
