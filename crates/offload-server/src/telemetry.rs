//! Prometheus metrics: what happens to tasks through this server, queue
//! depth, and HTTP latency.
//!
//! Tasks finished (completed, failed, cancelled) are counted by the store,
//! where each change is committed, however the task finished: a worker's
//! ack, a cancel, a lease or timeout that ran out, a dependency that
//! failed, a task `on_conflict: "replace"` displaced (on PostgreSQL each
//! node counts its own commits, so a cluster counts each task once).
//! The rest is recorded where this node sees it: tasks enqueued, pickup
//! delays, retried attempts and how long finished attempts ran, from
//! enqueue, fetch and ack requests and the attempts its engine ends when
//! their lease or timeout runs out. Queue depth is read from the store at
//! scrape time; the finished counts are taken from it then and every
//! [`FINISHED_TAKEN_EVERY`], and added to the counters here.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use offload_core::{Counts, Finished, State, Task};

use crate::AppState;

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 1800.0, 3600.0,
];

#[derive(Clone)]
pub struct Metrics {
    handle: Option<PrometheusHandle>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("installed", &self.handle.is_some())
            .finish()
    }
}

impl Metrics {
    /// Installs the process-wide recorder (once; later calls share it).
    pub fn install() -> Self {
        static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
        let handle = HANDLE.get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.install_recorder());
            match built {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics are off: cannot install the recorder");
                    None
                }
            }
        });
        Self {
            handle: handle.clone(),
        }
    }

    /// Counts tasks just created.
    pub fn enqueued<'t>(&self, tasks: impl IntoIterator<Item = &'t Task>) {
        for ((queue, task_type), group) in by_pair(tasks) {
            let (queue, task_type) = labels(queue, task_type);
            counter!("offload_tasks_enqueued_total", "queue" => queue.to_owned(), "type" => task_type.to_owned())
                .increment(group.len() as u64);
        }
    }

    /// Time from when each task could run to when a worker claimed it.
    pub fn claimed<'t>(&self, tasks: impl IntoIterator<Item = &'t Task>) {
        for ((queue, _), group) in by_pair(tasks) {
            let pickup =
                histogram!("offload_task_pickup_seconds", "queue" => queue_label(queue).to_owned());
            for task in group {
                if let Some(started) = task.started_at {
                    pickup.record(task.run_at.until(started).as_secs_f64());
                }
            }
        }
    }

    /// Counts the attempts that ended and are to be tried again, and
    /// records how long the finished ones ran (reported by their worker, or
    /// their lease or timeout ran out). The store counts the finished tasks
    /// themselves ([`offload_core::Store::take_finished`]).
    pub fn attempts_ended<'t>(&self, tasks: impl IntoIterator<Item = &'t Task>) {
        for ((queue, task_type), group) in by_pair(tasks) {
            let (queue, task_type) = labels(queue, task_type);
            let labels = [("queue", queue.to_owned()), ("type", task_type.to_owned())];
            let mut retried = 0;
            // Registered only once there is a duration to record.
            let mut duration = None;
            for task in group {
                if !task.state.is_finished() {
                    retried += 1;
                }
                if let (Some(started), Some(finished)) = (task.started_at, task.finished_at) {
                    duration
                        .get_or_insert_with(|| histogram!("offload_task_duration_seconds", &labels))
                        .record(started.until(finished).as_secs_f64());
                }
            }
            if retried > 0 {
                counter!("offload_attempts_retried_total", &labels).increment(retried);
            }
        }
    }

    pub async fn render(&self, state: &AppState) -> String {
        record_finished(state.store().take_finished());
        if let Ok(stats) = state.store().stats().await {
            // The queues past the budget share a label, so they are summed.
            let mut by_label: HashMap<&str, Counts> = HashMap::new();
            for (queue, counts) in &stats.queues {
                by_label.entry(queue_label(queue)).or_default().add(counts);
            }
            for (queue, counts) in by_label {
                for s in State::ALL {
                    gauge!("offload_queue_tasks", "queue" => queue.to_owned(), "state" => s.as_str())
                        .set(counts.get(s) as f64);
                }
            }
        }
        self.handle
            .as_ref()
            .map(PrometheusHandle::render)
            .unwrap_or_default()
    }
}

impl offload_engine::DutyObserver for Metrics {
    fn attempts_expired(&self, tasks: &[Task]) {
        self.attempts_ended(tasks);
    }
}

/// How often the finished counts are taken from the store between scrapes:
/// its tally holds each (queue, type) finished since the last take, and a
/// node nobody scrapes would otherwise keep every one it ever finished.
pub const FINISHED_TAKEN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Adds the finished tasks taken from the store to their counters, every
/// [`FINISHED_TAKEN_EVERY`], until dropped.
pub async fn take_finished_from(store: std::sync::Arc<dyn offload_core::Store>) {
    let mut every = tokio::time::interval(FINISHED_TAKEN_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        record_finished(store.take_finished());
    }
}

/// Adds finished tasks taken from the store to their counters. The queues
/// and pairs past the budgets share labels, so they are summed first.
fn record_finished(taken: Vec<(String, String, Finished)>) {
    let mut by_label: HashMap<(String, String), Finished> = HashMap::new();
    for (queue, task_type, finished) in &taken {
        let (queue, task_type) = labels(queue, task_type);
        by_label
            .entry((queue.to_owned(), task_type.to_owned()))
            .or_default()
            .add(finished);
    }
    for ((queue, task_type), finished) in by_label {
        for (name, n) in [
            ("offload_tasks_completed_total", finished.completed),
            ("offload_tasks_failed_total", finished.failed),
            ("offload_tasks_cancelled_total", finished.cancelled),
        ] {
            // A series appears with its first task, as an incremented
            // counter's would.
            if n > 0 {
                counter!(name, "queue" => queue.clone(), "type" => task_type.clone()).increment(n);
            }
        }
    }
}

/// Queues that get a `queue` label of their own, in the order first
/// counted. Queues are made on first use: an application that made one for
/// each of its users would add series without end (each queue's gauges and
/// pickup histogram are some thirty lines of every scrape: 9.5 MB and half
/// a second of the server's CPU with 20,000 queues), each kept as long as
/// the process runs.
const MAX_LABELLED_QUEUES: usize = 1000;

/// (queue, type) pairs that get a `type` label of their own, in the order
/// first counted. Types are the applications' names: one that put an id in
/// a type would add series without end, as such queues would.
const MAX_LABELLED_TYPES: usize = 1000;

/// The label of the queues past [`MAX_LABELLED_QUEUES`] and of the types
/// past [`MAX_LABELLED_TYPES`]: neither a valid queue nor a valid type
/// name, so never one of them.
const OTHER: &str = "(other)";

/// The `queue` and `type` labels of the tasks of `task_type` in `queue`:
/// their names, or [`OTHER`] for a queue once [`MAX_LABELLED_QUEUES`]
/// queues have labels, and for a type once [`MAX_LABELLED_TYPES`] (queue,
/// type) pairs have (counted under the queue's label).
fn labels<'t>(queue: &'t str, task_type: &'t str) -> (&'t str, &'t str) {
    let mut labelled = labelled();
    // Nearly always a labelled queue and type.
    if labelled
        .by_queue
        .get(queue)
        .is_some_and(|types| types.contains(task_type))
    {
        return (queue, task_type);
    }
    let queue = labelled.queue(queue);
    let types = labelled.by_queue.get(queue);
    if types.is_some_and(|types| types.contains(task_type)) {
        return (queue, task_type);
    }
    if labelled.pairs >= MAX_LABELLED_TYPES {
        return (queue, OTHER);
    }
    labelled.pairs += 1;
    labelled
        .by_queue
        .entry(queue.to_owned())
        .or_default()
        .insert(task_type.to_owned());
    (queue, task_type)
}

/// The `queue` label of `queue`, as [`labels`] gives it.
fn queue_label(queue: &str) -> &str {
    labelled().queue(queue)
}

/// The queues and (queue, type) pairs that have labels of their own.
#[derive(Default)]
struct Labelled {
    /// By queue label, the types labelled in it.
    by_queue: HashMap<String, HashSet<String>>,
    pairs: usize,
}

impl Labelled {
    fn queue<'q>(&mut self, queue: &'q str) -> &'q str {
        if self.by_queue.contains_key(queue) {
            return queue;
        }
        // `OTHER`'s own entry, made once the budget is spent, is not a queue.
        let queues = self.by_queue.len() - usize::from(self.by_queue.contains_key(OTHER));
        if queues >= MAX_LABELLED_QUEUES {
            self.by_queue.entry(OTHER.to_owned()).or_default();
            return OTHER;
        }
        self.by_queue.insert(queue.to_owned(), HashSet::new());
        queue
    }
}

fn labelled() -> std::sync::MutexGuard<'static, Labelled> {
    static LABELLED: OnceLock<Mutex<Labelled>> = OnceLock::new();
    LABELLED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Tasks grouped by (queue, type), in the order first seen. A metric
/// handle is a registry lookup (hashing the name and labels, cloning the
/// label values): a batch of a thousand tasks of one type pays it once, not
/// a thousand times.
fn by_pair<'t>(
    tasks: impl IntoIterator<Item = &'t Task>,
) -> Vec<((&'t str, &'t str), Vec<&'t Task>)> {
    let mut groups: Vec<((&str, &str), Vec<&Task>)> = Vec::new();
    // Where each pair is in `groups`, once there are more than a few: a
    // batch of 10,000 tasks of as many types searched the groups for each
    // task.
    let mut index: Option<HashMap<(&str, &str), usize>> = None;
    for task in tasks {
        let pair = (task.queue.as_str(), task.task_type.as_str());
        // Tasks come in runs of one pair.
        if let Some((last, group)) = groups.last_mut()
            && *last == pair
        {
            group.push(task);
            continue;
        }
        let found = if groups.len() < INDEXED_GROUPS {
            groups.iter().rposition(|(p, _)| *p == pair)
        } else {
            let index = index.get_or_insert_with(|| {
                groups
                    .iter()
                    .enumerate()
                    .map(|(at, (p, _))| (*p, at))
                    .collect()
            });
            index.get(&pair).copied()
        };
        match found {
            Some(at) => groups[at].1.push(task),
            None => {
                if let Some(index) = &mut index {
                    index.insert(pair, groups.len());
                }
                groups.push((pair, vec![task]));
            }
        }
    }
    groups
}

/// Groups [`by_pair`] searches one by one before it indexes them.
const INDEXED_GROUPS: usize = 16;

/// Records every routed request's latency by method, route and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    histogram!(
        "offload_http_request_duration_seconds",
        "method" => method,
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use offload_core::{NewTask, Task};

    use super::by_pair;

    fn task(queue: &str, task_type: &str) -> Task {
        crate::test_task(NewTask::new(task_type).queue(queue))
    }

    /// Past the pairs it searches one by one, the groups are indexed; both
    /// ways group every task with its pair, in the order first seen.
    #[test]
    fn tasks_are_grouped_by_pair_in_the_order_first_seen() {
        for pairs in [3, 40] {
            let tasks: Vec<Task> = (0..pairs * 5)
                .map(|i| task(&format!("q{}", i % 2), &format!("t{}", (i * 7) % pairs)))
                .collect();
            let groups = by_pair(&tasks);
            let mut first_seen: Vec<(&str, &str)> = Vec::new();
            for t in &tasks {
                let pair = (t.queue.as_str(), t.task_type.as_str());
                if !first_seen.contains(&pair) {
                    first_seen.push(pair);
                }
            }
            let grouped: Vec<(&str, &str)> = groups.iter().map(|(pair, _)| *pair).collect();
            assert_eq!(grouped, first_seen, "{pairs} pairs");
            for (pair, group) in &groups {
                let of_pair: Vec<&Task> = tasks
                    .iter()
                    .filter(|t| (t.queue.as_str(), t.task_type.as_str()) == *pair)
                    .collect();
                let same = of_pair.len() == group.len()
                    && of_pair.iter().zip(group).all(|(a, b)| a.id == b.id);
                assert!(same, "{pair:?} of {pairs} pairs");
            }
        }
    }
}
