//! A quick in-process measurement of the engine on a durable SQLite store:
//! batched enqueue, raw claim+complete through the store, and the worker
//! runtime burning down no-op tasks.
//!
//! `cargo run --release -p offload-worker --example throughput -- [TASKS] [MEASURED]`
//!
//! With MEASURED below TASKS, the raw phase stops after MEASURED tasks: run
//! `1000000 50000` and `50000 50000` to compare claiming with a million
//! tasks stored against claiming with few.

use std::sync::Arc;
use std::time::{Duration, Instant};

use offload_core::{Ack, ClaimRequest, Limits, NewTask, Store, TaskSpec};
use offload_engine::{Engine, EngineConfig};
use offload_sqlite::{SqliteOptions, SqliteStore};
use offload_worker::{TaskContext, Worker};
use tokio_util::sync::CancellationToken;

fn specs(n: usize) -> Vec<TaskSpec> {
    let spec = NewTask::new("noop")
        .payload(&serde_json::json!({"user": 42, "kind": "welcome"}))
        .expect("payload")
        .validate(&Limits::default(), offload_core::Position::Alone)
        .expect("valid");
    vec![spec; n]
}

async fn enqueue_all(store: &Arc<dyn Store>, tasks: usize) -> f64 {
    let started = Instant::now();
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(1000) {
        store.enqueue(specs(chunk.len())).await.expect("enqueue");
    }
    tasks as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let tasks: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let measured: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(tasks)
        .min(tasks);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dir = tempfile::tempdir().expect("temp dir");

    // Raw store: claim batches of 100 and ack them, from 4 concurrent loops.
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("raw.db"), SqliteOptions::default()).expect("open"),
    );
    let enqueue_rate = enqueue_all(&store, tasks).await;
    let started = Instant::now();
    let mut loops = Vec::new();
    for w in 0..4 {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        loops.push(tokio::spawn(async move {
            let worker_id = format!("w{w}");
            while done.load(std::sync::atomic::Ordering::Relaxed) < measured {
                let claimed = store
                    .claim(&ClaimRequest {
                        worker_id: worker_id.clone(),
                        types: vec![],
                        queues: vec![],
                        limit: 100,
                        lease: Duration::from_secs(60),
                    })
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    return;
                }
                done.fetch_add(claimed.len(), std::sync::atomic::Ordering::Relaxed);
                let acks = claimed
                    .iter()
                    .map(|t| Ack::Complete {
                        id: t.id,
                        result: None,
                    })
                    .collect();
                store.ack(&worker_id, acks).await.expect("ack");
            }
        }));
    }
    for l in loops {
        l.await.expect("loop");
    }
    let raw_rate =
        done.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    if measured < tasks {
        println!(
            "stored: {tasks}; claim 100 + complete 100 over the first {measured}: {raw_rate:.0} tasks/s"
        );
        return;
    }

    // The worker runtime with a no-op handler.
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("worker.db"), SqliteOptions::default()).expect("open"),
    );
    enqueue_all(&store, tasks).await;
    let engine = Engine::start(Arc::clone(&store), EngineConfig::default());
    let stop = CancellationToken::new();
    let worker = Worker::new(Arc::clone(&engine))
        .concurrency(256)
        .handle("noop", |_ctx: TaskContext| async move { Ok(()) });
    let started = Instant::now();
    let running = tokio::spawn(worker.run(stop.clone()));
    loop {
        if store.stats().await.expect("stats").total.completed == tasks as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let worker_rate = tasks as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    running.await.expect("join").expect("worker");
    engine.shutdown().await;

    println!("tasks: {tasks} (durable SQLite, fsync per group commit)");
    println!("enqueue, batches of 1000:          {enqueue_rate:>10.0} tasks/s");
    println!("claim 100 + complete 100, 4 loops: {raw_rate:>10.0} tasks/s");
    println!("worker runtime, no-op handler:     {worker_rate:>10.0} tasks/s");
}
