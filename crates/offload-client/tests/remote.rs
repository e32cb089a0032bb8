//! The client and the worker runtime against a real server on a real port,
//! started in this process.

use std::sync::Arc;
use std::time::Duration;

use offload_client::{Client, ClientError, ListParams};
use offload_core::{NewTask, State};
use offload_server::Config;
use offload_storetest::relay::silencing_relay;
use offload_worker::{CancelReason, TaskContext, TaskFailure, Worker};
use tokio_util::sync::CancellationToken;

struct Running {
    client: Client,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn server() -> Running {
    server_with(|_| {}).await
}

/// A server whose configuration `adjust` changes first.
async fn server_with(adjust: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: format!("sqlite://{}", dir.path().join("remote.db").display()),
        ..Config::default()
    };
    adjust(&mut config);
    let stop = CancellationToken::new();
    let (address_tx, address_rx) = tokio::sync::oneshot::channel();
    let stopping = stop.clone();
    tokio::spawn(async move {
        offload_server::serve(
            config,
            async move { stopping.cancelled().await },
            |address| {
                let _ = address_tx.send(address);
            },
        )
        .await
        .unwrap();
    });
    let address = address_rx.await.unwrap();
    Running {
        client: Client::new(format!("http://{address}")),
        stop,
        _dir: dir,
    }
}

/// Serves `db` on `listen` until `stop`; the bound address, and the task
/// that ends when the server has.
async fn serve_until(
    listen: std::net::SocketAddr,
    db: String,
    stop: CancellationToken,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let (address_tx, address_rx) = tokio::sync::oneshot::channel();
    let config = Config {
        listen,
        db,
        ..Config::default()
    };
    let serving = tokio::spawn(async move {
        offload_server::serve(config, async move { stop.cancelled().await }, |address| {
            let _ = address_tx.send(address);
        })
        .await
        .unwrap();
    });
    (address_rx.await.unwrap(), serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_rides_out_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("restart.db").display());
    let first = CancellationToken::new();
    let (address, serving) =
        serve_until("127.0.0.1:0".parse().unwrap(), db.clone(), first.clone()).await;
    let client = Client::new(format!("http://{address}"));
    let (task, _) = client.enqueue(&NewTask::new("t")).await.unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.wait(task.id).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.cancel();
    serving.await.unwrap();
    // The waiter finds no server for a while.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "wait gave up while the server was away"
    );
    let second = CancellationToken::new();
    let (_, serving) = serve_until(address, db, second.clone()).await;
    client.cancel(task.id).await.unwrap();
    let ended = waiting.await.unwrap().unwrap();
    assert_eq!(ended.state, State::Cancelled);
    second.cancel();
    serving.await.unwrap();
}

/// `client.wait` of some task, which must give up rather than ask on.
async fn wait_giving_up(client: &Client) -> offload_client::ClientResult<offload_core::Task> {
    tokio::time::timeout(Duration::from_secs(10), client.wait(uuid::Uuid::now_v7()))
        .await
        .expect("wait to give up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_fails_at_once_where_no_server_ever_answered() {
    let outcome = wait_giving_up(&Client::new("http://127.0.0.1:1")).await;
    assert!(
        matches!(outcome, Err(ClientError::Unreachable { .. })),
        "{outcome:?}"
    );
}

/// A URL without its scheme names no server: said so, and not asked again
/// as a server that is down would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_names_no_server_is_said_to_be_one() {
    let client = Client::new("127.0.0.1:6490");
    let outcome = client.stats().await;
    let Err(e @ ClientError::InvalidUrl { .. }) = outcome else {
        panic!("{outcome:?}");
    };
    assert!(!e.is_transient());
    assert!(e.to_string().contains("must be http:// or https://"), "{e}");
    let waited = wait_giving_up(&client).await;
    assert!(
        matches!(waited, Err(ClientError::InvalidUrl { .. })),
        "{waited:?}"
    );
}

/// A worker runtime hears of a server it cannot reach as unavailable (so
/// it tries again), in words that name the server, not the storage.
#[tokio::test]
async fn an_unreachable_server_is_named_as_the_server() {
    let client = Client::new("http://127.0.0.1:1");
    let outcome = client.stats().await;
    let Err(e @ ClientError::Unreachable { .. }) = outcome else {
        panic!("{outcome:?}");
    };
    let heard = offload_core::Error::from(e);
    assert!(
        matches!(heard, offload_core::Error::Unavailable(_)),
        "{heard:?}"
    );
    assert!(
        heard
            .to_string()
            .starts_with("cannot reach the Offload server at http://127.0.0.1:1"),
        "{heard}"
    );
}

/// A worker whose every fetch the server refuses as bad input (here a
/// queue name the server does not take) stops and says why, where it
/// asked again forever, logging a warning each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_fetch_is_refused_stops_and_says_why() {
    // The error a worker of one no-op handler stops with, by itself.
    let stopped = |client: Client, queues: &[&str]| {
        let worker = Worker::new(Arc::new(client))
            .queues(queues.iter().copied())
            .handle("t", |_ctx: TaskContext| async move { Ok(()) });
        async move {
            tokio::time::timeout(
                Duration::from_secs(30),
                worker.run(CancellationToken::new()),
            )
            .await
            .expect("the worker to stop by itself")
            .expect_err("stopped by an error")
            .to_string()
        }
    };
    let server = server().await;
    let refused = stopped(server.client.clone(), &["no spaces allowed"]).await;
    assert!(refused.contains("queues[0]"), "{refused}");
    let unnamed = stopped(Client::new("127.0.0.1:6490"), &[]).await;
    assert!(unnamed.contains("not an Offload server's URL"), "{unnamed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runtime_runs_unchanged_against_a_remote_server() {
    let server = server().await;
    let client = server.client.clone();
    let worker = Worker::new(Arc::new(client.clone()))
        .concurrency(4)
        .handle("square", |ctx: TaskContext| async move {
            let n: u64 = ctx.payload()?;
            ctx.progress(50.0, "squaring").await?;
            Ok(n * n)
        })
        .handle("wait", |ctx: TaskContext| async move {
            ctx.cancellation().cancelled().await;
            assert_eq!(ctx.cancel_reason(), Some(CancelReason::Cancelled));
            Err::<(), _>(TaskFailure::new("stopped on request"))
        });
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));

    let mut ids = Vec::new();
    for n in 0..20u64 {
        let (task, created) = client
            .enqueue(&NewTask::new("square").payload(&n).unwrap())
            .await
            .unwrap();
        assert!(created);
        ids.push((n, task.id));
    }
    for (n, id) in ids {
        let done = client.wait(id).await.unwrap();
        assert_eq!(done.state, State::Completed);
        assert_eq!(done.result.unwrap().get(), (n * n).to_string());
        assert_eq!(done.progress.unwrap().message.as_deref(), Some("squaring"));
    }

    // Cancellation reaches a remote handler through its heartbeat.
    let (waiting, _) = client.enqueue(&NewTask::new("wait")).await.unwrap();
    for _ in 0..500 {
        if client.get(waiting.id).await.unwrap().state == State::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.cancel(waiting.id).await.unwrap();
    let cancelled = client.wait(waiting.id).await.unwrap();
    assert_eq!(cancelled.state, State::Cancelled);
    assert_eq!(cancelled.error.unwrap().message, "stopped on request");

    stop.cancel();
    running.await.unwrap().unwrap();
}

/// A handler's error and progress message of 2 MiB reach a server whose
/// bodies may hold 1 MiB: they travel cut to what the store keeps. Sent
/// whole, the failure was refused, and the task ran again once its lease
/// ran out, to fail the same way; the progress report failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_messages_travel_cut_to_what_the_store_keeps() {
    let server =
        server_with(|config| config.batch_body_limit_bytes = config.payload_limit_bytes).await;
    let client = server.client.clone();
    let long = "e".repeat(2 << 20);
    let worker =
        Worker::new(Arc::new(client.clone())).handle("verbose", move |ctx: TaskContext| {
            let long = long.clone();
            async move {
                ctx.progress(None, long.as_str()).await?;
                Err::<(), _>(TaskFailure::permanent(long))
            }
        });
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let (task, _) = client.enqueue(&NewTask::new("verbose")).await.unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(30), client.wait(task.id))
        .await
        .expect("the failure reached the server")
        .unwrap();
    assert_eq!((failed.state, failed.attempt), (State::Failed, 1));
    let kept = failed.error.unwrap().message;
    assert_eq!(kept.chars().count(), offload_core::MAX_MESSAGE_CHARS + 1);
    let progress = failed.progress.expect("the progress report went through");
    assert_eq!(
        progress.message.map(|m| m.chars().count()),
        Some(offload_core::MAX_MESSAGE_CHARS + 1)
    );
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_covers_the_routes_and_reports_errors() {
    let server = server().await;
    let client = &server.client;
    let mut feed = client.all_events(Some("other"), None, None).await.unwrap();
    let tasks = client
        .enqueue_batch(&[NewTask::new("a"), NewTask::new("b").queue("other")])
        .await
        .unwrap();
    assert_eq!(tasks.len(), 2);
    let first = feed.next().await.unwrap().unwrap();
    assert_eq!(
        first.task.id, tasks[1].id,
        "only the other queue's task is streamed"
    );
    let page = client
        .list(&ListParams {
            queue: Some("other".into()),
            ..ListParams::default()
        })
        .await
        .unwrap();
    assert_eq!(page.tasks[0].id, tasks[1].id);
    assert_eq!(client.stats().await.unwrap().total.pending, 2);
    assert!(client.pause("other").await.unwrap().paused);
    assert_eq!(
        client
            .set_concurrency("other", Some(3))
            .await
            .unwrap()
            .concurrency,
        Some(3)
    );
    assert!(!client.resume("other").await.unwrap().paused);
    match client.set_concurrency("other/x", None).await {
        Err(ClientError::Api {
            status: 400,
            message,
            ..
        }) => assert!(message.contains("name: must be 1 to 64"), "{message}"),
        other => panic!("expected the name refused, got {other:?}"),
    }
    assert_eq!(client.queues().await.unwrap().len(), 2);
    assert_eq!(
        client.cancel(tasks[0].id).await.unwrap().state,
        State::Cancelled
    );
    assert_eq!(
        client.retry(tasks[0].id).await.unwrap().state,
        State::Pending
    );
    client.cancel(tasks[0].id).await.unwrap();
    client.delete(tasks[0].id).await.unwrap();
    client.cancel(tasks[1].id).await.unwrap();
    assert_eq!(client.clear(&[], None).await.unwrap(), 1);
    assert_eq!(client.health().await.unwrap().status, "ok");

    match client.get(tasks[0].id).await {
        Err(ClientError::Api {
            status: 404, code, ..
        }) => assert_eq!(code, "not_found"),
        other => panic!("expected a 404, got {other:?}"),
    }
    match client.enqueue(&NewTask::new("bad type")).await {
        Err(ClientError::Api {
            status: 400,
            code,
            message,
        }) => {
            assert_eq!(code, "invalid_argument");
            assert!(message.starts_with("type:"), "{message}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    let nowhere = Client::new("http://127.0.0.1:1");
    assert!(matches!(
        nowhere.stats().await,
        Err(ClientError::Unreachable { .. })
    ));
}

/// A busy remote worker always has a fetch on its way. Stopped, it takes
/// that fetch's answer and runs what it brings, rather than leave those
/// tasks claimed by nobody until their lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_stream_leaves_no_task_claimed_and_unseen() {
    let server = server().await;
    let client = server.client.clone();
    let tasks: Vec<NewTask> = (0..1000).map(|_| NewTask::new("noop")).collect();
    for _ in 0..20 {
        client.enqueue_batch_ids(&tasks).await.unwrap();
    }
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&ran);
    let worker = Worker::new(Arc::new(client.clone()))
        .concurrency(500)
        .handle("noop", move |_ctx: TaskContext| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { Ok::<(), TaskFailure>(()) }
        });
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    while ran.load(std::sync::atomic::Ordering::Relaxed) < 5000 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.cancel();
    running.await.unwrap().unwrap();

    let total = client.stats().await.unwrap().total;
    assert_eq!(total.running, 0, "tasks left claimed: {total:?}");
    let ran = ran.load(std::sync::atomic::Ordering::Relaxed) as u64;
    assert_eq!(total.completed, ran);
    assert_eq!(total.pending, 20_000 - ran);
}

/// A relay in front of `server` (see `silencing_relay`): its URL, and
/// what silences its connections open at the moment it is called.
async fn relayed(server: &Running) -> (String, impl Fn()) {
    let address = server
        .client
        .url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (relay, silence) = silencing_relay(address).await;
    (format!("http://{relay}"), silence)
}

/// A request on a connection that went silent fails once the client's
/// timeout runs out, as a server out of reach; it waited as long as the
/// kernel retransmitted, and a batch enqueue, which had no limit at all,
/// for good where the kernel still answered for the far end (a server
/// stopped, or this relay). The next request takes a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_silent_connection_fails_in_time() {
    fn assert_ran_out_of_time<T: std::fmt::Debug>(outcome: Result<T, ClientError>) {
        let Err(e @ ClientError::Unreachable { .. }) = outcome else {
            panic!("{outcome:?}");
        };
        assert!(e.is_transient());
        assert!(
            e.to_string()
                .contains("no answer before the request's timeout"),
            "{e}"
        );
    }
    let server = server().await;
    let (url, silence) = relayed(&server).await;
    let client = Client::new(url).timeout(Duration::from_millis(500));
    client.stats().await.unwrap();
    silence();
    let outcome = tokio::time::timeout(Duration::from_secs(20), client.stats())
        .await
        .expect("the request to end at its timeout");
    assert_ran_out_of_time(outcome);
    client.stats().await.unwrap();

    // A batch's limit is the timeout and a second for each MiB it carries.
    let batch = [NewTask::new("quiet"), NewTask::new("quiet")];
    silence();
    let outcome = tokio::time::timeout(Duration::from_secs(20), client.enqueue_batch(&batch))
        .await
        .expect("the batch to end at its limit");
    assert_ran_out_of_time(outcome);
    assert_eq!(client.enqueue_batch_ids(&batch).await.unwrap().len(), 2);
}

/// An event stream that went silent, not even sending its keep-alives,
/// ends as a server out of reach, and `wait` follows the task again on a
/// new connection; it waited on the silent one for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_again_past_a_silent_event_stream() {
    let server = server().await;
    let (url, silence) = relayed(&server).await;
    let client = Client::new(url).timeout(Duration::from_millis(500));
    let (task, _) = server.client.enqueue(&NewTask::new("quiet")).await.unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.wait(task.id).await }
    });
    // Long enough for the stream to be open and the pending task streamed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    silence();
    server.client.cancel(task.id).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(40), waiting)
        .await
        .expect("wait to see the task's end on a new stream")
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, State::Cancelled);
}

/// The worker runtime renews its leases past a connection that went silent
/// in the middle of a heartbeat: a later heartbeat goes out, on a new
/// connection, before the lease ends. A hung heartbeat held up every later
/// round, and the handler was stopped as one whose lease was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_go_on_past_a_connection_that_went_silent() {
    let server = server().await;
    let (url, silence) = relayed(&server).await;
    let worker = Worker::new(Arc::new(Client::new(url)))
        .lease(Duration::from_secs(6))
        .handle("slow", |ctx: TaskContext| async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(9)) => Ok("finished"),
                () = ctx.cancellation().cancelled() => Err(TaskFailure::new(format!(
                    "stopped: {:?}",
                    ctx.cancel_reason()
                ))),
            }
        });
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let client = &server.client;
    let (task, _) = client.enqueue(&NewTask::new("slow")).await.unwrap();
    while client.get(task.id).await.unwrap().state != State::Running {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Heartbeats go every 2 s: silenced after the first, whose connection
    // the second takes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    silence();
    let done = tokio::time::timeout(Duration::from_secs(60), client.wait(task.id))
        .await
        .expect("the task to end")
        .unwrap();
    assert_eq!(
        (done.state, done.attempt, done.error.map(|e| e.message)),
        (State::Completed, 1, None)
    );
    stop.cancel();
    running.await.unwrap().unwrap();
}
