//! A property test: random sequences of operations against a store, with the
//! invariants of SPEC §1–2 checked after every step.
//!
//! - no task is held by two workers: a claim only hands out tasks that were
//!   `pending`, and only the holder's acks are accepted;
//! - the counts (`stats`) match the tasks a full listing shows, and a
//!   listing by state shows that state's tasks and no others;
//! - every change of state is one SPEC §2 allows;
//! - finished tasks change only by manual retry (or go by delete/retention);
//! - attempts never exceed `max_attempts` (manual retry raises the latter);
//! - running tasks, and only they, carry a worker and a lease;
//! - at most one active task holds a (queue, unique key);
//! - what the store keeps beside its tables agrees with them
//!   (`Store::verify_bookkeeping`);
//! - the store's tally of finished tasks grows by exactly the tasks that
//!   entered a finished state (`Store::take_finished`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use offload_core::{
    Ack, ClaimRequest, ClearRequest, Counts, Error, Failure, FailureKind, Finished,
    HeartbeatRequest, Limits, ListQuery, ManualClock, NewTask, OnConflict, QueuePatch, Retention,
    State, Store, Task, transition_allowed,
};
use proptest::prelude::*;
use uuid::Uuid;

use crate::{EPOCH, StoreFactory};

#[derive(Clone, Debug)]
enum Op {
    Enqueue {
        queue: u8,
        priority: u8,
        delay_secs: u8,
        max_attempts: u8,
        unique: Option<u8>,
        replace: bool,
        depends_on: Option<usize>,
    },
    Claim {
        worker: u8,
        limit: u8,
        queue: Option<u8>,
    },
    Heartbeat {
        worker: u8,
        pick: usize,
    },
    Complete {
        worker: u8,
        pick: usize,
    },
    Fail {
        worker: u8,
        pick: usize,
        retry: Option<bool>,
        retry_in: Option<u8>,
    },
    Cancel {
        pick: usize,
    },
    Retry {
        pick: usize,
    },
    Delete {
        pick: usize,
    },
    Clear,
    Pause {
        queue: u8,
        paused: bool,
        concurrency: Option<u8>,
    },
    Advance {
        secs: u8,
    },
    Promote,
    Recover,
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2u8, 1..=10u8, prop_oneof![Just(0u8), 1..20u8], 1..4u8, proptest::option::of(0..3u8), any::<bool>(), proptest::option::weighted(0.3, any::<usize>()))
            .prop_map(|(queue, priority, delay_secs, max_attempts, unique, replace, depends_on)| Op::Enqueue {
                queue, priority, delay_secs, max_attempts, unique, replace, depends_on
            }),
        4 => (0..3u8, 1..4u8, proptest::option::of(0..2u8)).prop_map(|(worker, limit, queue)| Op::Claim { worker, limit, queue }),
        1 => (0..3u8, any::<usize>()).prop_map(|(worker, pick)| Op::Heartbeat { worker, pick }),
        3 => (0..3u8, any::<usize>()).prop_map(|(worker, pick)| Op::Complete { worker, pick }),
        3 => (0..3u8, any::<usize>(), proptest::option::of(any::<bool>()), proptest::option::of(0..5u8))
            .prop_map(|(worker, pick, retry, retry_in)| Op::Fail { worker, pick, retry, retry_in }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        1 => Just(Op::Clear),
        1 => (0..2u8, any::<bool>(), proptest::option::of(1..3u8))
            .prop_map(|(queue, paused, concurrency)| Op::Pause { queue, paused, concurrency }),
        2 => (0..40u8).prop_map(|secs| Op::Advance { secs }),
        2 => Just(Op::Promote),
        2 => Just(Op::Recover),
        1 => Just(Op::Purge),
    ]
}

/// Runs `cases` random sequences against fresh stores from `factory`.
pub fn check_invariants(factory: Arc<dyn StoreFactory>, cases: u32) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in proptest::collection::vec(op(), 1..80))| {
        runtime.block_on(run_sequence(&*factory, ops));
    });
}

fn queue_name(q: u8) -> String {
    format!("q{q}")
}

async fn run_sequence(factory: &dyn StoreFactory, ops: Vec<Op>) {
    let clock = Arc::new(ManualClock::new(EPOCH));
    let store = factory.open(Arc::clone(&clock)).await;
    let mut known: Vec<Uuid> = Vec::new();
    let mut before: HashMap<Uuid, Task> = HashMap::new();
    let mut finished_before = finished_totals(&*store, BTreeMap::new());
    // Queue settings as the test set them: (paused, concurrency).
    let mut queues: HashMap<String, (bool, Option<u32>)> = HashMap::new();
    let pick = |known: &Vec<Uuid>, i: usize| (!known.is_empty()).then(|| known[i % known.len()]);

    for (step, op) in ops.into_iter().enumerate() {
        let context = format!("step {step}: {op:?}");
        // Tasks a retry or a deletion may legitimately change or remove.
        let mut may_change_finished: HashSet<Uuid> = HashSet::new();
        let mut may_remove_finished = false;
        // What a recovery answered, checked against the listing after it.
        let mut recovered = None;
        match op {
            Op::Enqueue {
                queue,
                priority,
                delay_secs,
                max_attempts,
                unique,
                replace,
                depends_on,
            } => {
                let mut task = NewTask::new("t")
                    .queue(queue_name(queue))
                    .priority(priority.into())
                    .delay(Duration::from_secs(delay_secs.into()))
                    .max_attempts(max_attempts.into());
                if let Some(key) = unique {
                    let mode = if replace {
                        OnConflict::Replace
                    } else {
                        OnConflict::Keep
                    };
                    task = task.unique_key(format!("k{key}"), mode);
                }
                if let Some(dep) = depends_on.and_then(|i| pick(&known, i)) {
                    task = task.depends_on(dep);
                }
                let spec = task
                    .validate(&Limits::default(), offload_core::Position::Alone)
                    .expect("generated tasks are valid");
                match store.enqueue(vec![spec]).await {
                    Ok(answers) => {
                        for (task, created) in answers {
                            if created {
                                known.push(task.id);
                            } else {
                                assert!(
                                    task.state.is_active(),
                                    "{context}: a finished task held a unique key"
                                );
                            }
                        }
                    }
                    // The dependency may have been deleted.
                    Err(Error::InvalidArgument { field, .. }) if field == "depends_on[0]" => {}
                    Err(e) => panic!("{context}: {e}"),
                }
            }
            Op::Claim {
                worker,
                limit,
                queue,
            } => {
                let request = ClaimRequest {
                    worker_id: format!("w{worker}"),
                    types: vec![],
                    queues: queue.map(queue_name).into_iter().collect(),
                    limit: limit.into(),
                    lease: Duration::from_secs(30),
                };
                let claimed = store.claim(&request).await.expect("claim");
                assert!(
                    claimed.len() <= limit.into(),
                    "{context}: claimed over the limit"
                );
                for (queue, (paused, concurrency)) in &queues {
                    let taken = claimed.iter().filter(|t| &t.queue == queue).count();
                    if *paused {
                        assert_eq!(taken, 0, "{context}: claimed from paused queue {queue}");
                    }
                    if let Some(limit) = concurrency {
                        let running = before
                            .values()
                            .filter(|t| &t.queue == queue && t.state == State::Running)
                            .count();
                        let room = (*limit as usize).saturating_sub(running);
                        assert!(
                            taken <= room,
                            "{context}: {taken} claimed from {queue} with room for {room}"
                        );
                    }
                }
                for task in &claimed {
                    let prior = before.get(&task.id).map(|t| t.state);
                    assert_eq!(
                        prior,
                        Some(State::Pending),
                        "{context}: claimed a task that was {prior:?}"
                    );
                    assert_eq!(task.worker_id.as_deref(), Some(request.worker_id.as_str()));
                }
            }
            Op::Heartbeat { worker, pick: i } => {
                if let Some(id) = pick(&known, i) {
                    let worker_id = format!("w{worker}");
                    let outcome = store
                        .heartbeat(HeartbeatRequest {
                            id,
                            worker_id: worker_id.clone(),
                            progress: None,
                            lease: Duration::from_secs(30),
                        })
                        .await;
                    check_holder(&before, id, &worker_id, outcome.is_ok(), &context);
                }
            }
            Op::Complete { worker, pick: i }
            | Op::Fail {
                worker, pick: i, ..
            } => {
                if let Some(id) = pick(&known, i) {
                    let worker_id = format!("w{worker}");
                    let ack = match op {
                        Op::Fail {
                            retry, retry_in, ..
                        } => Ack::Fail {
                            id,
                            failure: Failure {
                                message: "boom".into(),
                                kind: FailureKind::Error,
                                retry,
                                retry_in: retry_in.map(|s| Duration::from_secs(s.into())),
                            },
                        },
                        _ => Ack::Complete { id, result: None },
                    };
                    let mut outcomes = store.ack(&worker_id, vec![ack]).await.expect("ack");
                    let outcome = outcomes.pop().expect("one outcome");
                    check_holder(&before, id, &worker_id, outcome.is_ok(), &context);
                }
            }
            Op::Cancel { pick: i } => {
                if let Some(id) = pick(&known, i) {
                    let outcome = store.cancel(id).await;
                    let was = before.get(&id).map(|t| t.state);
                    let expect_ok = was.is_some_and(State::is_active);
                    assert_eq!(
                        outcome.is_ok(),
                        expect_ok,
                        "{context}: cancel of a {was:?} task gave {outcome:?}"
                    );
                }
            }
            Op::Retry { pick: i } => {
                if let Some(id) = pick(&known, i) {
                    let outcome = store.retry(id).await;
                    let was = before.get(&id).map(|t| t.state);
                    // Refused while another active task holds its unique key.
                    let key_taken = before
                        .get(&id)
                        .and_then(|t| t.unique_key.as_ref())
                        .is_some_and(|key| {
                            before.values().any(|other| {
                                other.id != id
                                    && other.state.is_active()
                                    && !other.cancel_requested
                                    && other.unique_key.as_ref() == Some(key)
                                    && other.queue == before[&id].queue
                            })
                        });
                    // Refused when a dependency ended without completing,
                    // or is gone and the task never ran (one that ran saw
                    // it complete): the task could never run.
                    let dependency_broken = before.get(&id).is_some_and(|t| {
                        t.depends_on.iter().any(|dep| match before.get(dep) {
                            Some(d) => matches!(d.state, State::Failed | State::Cancelled),
                            None => t.attempt == 0,
                        })
                    });
                    let expect_ok = matches!(was, Some(State::Failed | State::Cancelled))
                        && !key_taken
                        && !dependency_broken;
                    assert_eq!(
                        outcome.is_ok(),
                        expect_ok,
                        "{context}: retry of a {was:?} task gave {outcome:?}"
                    );
                    if key_taken {
                        assert!(
                            matches!(outcome, Err(Error::Conflict(_))),
                            "{context}: {outcome:?}"
                        );
                    }
                    may_change_finished.insert(id);
                }
            }
            Op::Delete { pick: i } => {
                if let Some(id) = pick(&known, i) {
                    let outcome = store.delete(id).await;
                    let was = before.get(&id).map(|t| t.state);
                    let expect_ok = was.is_some_and(State::is_finished);
                    assert_eq!(
                        outcome.is_ok(),
                        expect_ok,
                        "{context}: delete of a {was:?} task gave {outcome:?}"
                    );
                    may_remove_finished = true;
                }
            }
            Op::Clear => {
                store
                    .clear(&ClearRequest {
                        states: vec![State::Completed],
                        older_than: Some(Duration::from_secs(60)),
                    })
                    .await
                    .expect("clear");
                may_remove_finished = true;
            }
            Op::Pause {
                queue,
                paused,
                concurrency,
            } => {
                queues.insert(queue_name(queue), (paused, concurrency.map(u32::from)));
                store
                    .update_queue(
                        &queue_name(queue),
                        QueuePatch {
                            paused: Some(paused),
                            concurrency: Some(concurrency.map(u32::from)),
                        },
                    )
                    .await
                    .expect("update queue");
            }
            Op::Advance { secs } => clock.advance(Duration::from_secs(secs.into())),
            Op::Promote => {
                store.promote_due().await.expect("promote");
            }
            Op::Recover => {
                recovered = Some(store.recover_expired().await.expect("recover"));
            }
            Op::Purge => {
                let short = Retention {
                    completed: Duration::from_secs(30),
                    failed: Duration::from_secs(60),
                    cancelled: Duration::from_secs(60),
                };
                store.purge_finished(&short, 2).await.expect("purge");
                may_remove_finished = true;
            }
        }

        if let Err(e) = store.verify_bookkeeping().await {
            panic!("{context}: {e}");
        }
        let after = snapshot(&*store).await;
        if let Some(recovered) = recovered {
            check_recovered(&before, &after, &recovered, &context);
        }
        let finished_after = finished_totals(&*store, finished_before.clone());
        check_finished(&before, &after, &finished_before, &finished_after, &context);
        finished_before = finished_after;
        check_snapshot(
            &*store,
            &before,
            &after,
            &may_change_finished,
            may_remove_finished,
            &context,
        )
        .await;
        known.retain(|id| after.contains_key(id));
        before = after;
    }
}

/// A recovery answers exactly the tasks that left `running` through it,
/// each as the store now holds it.
fn check_recovered(
    before: &HashMap<Uuid, Task>,
    after: &HashMap<Uuid, Task>,
    recovered: &[Task],
    context: &str,
) {
    let left_running: HashSet<Uuid> = before
        .values()
        .filter(|t| t.state == State::Running)
        .filter(|t| {
            after
                .get(&t.id)
                .is_none_or(|now| now.state != State::Running)
        })
        .map(|t| t.id)
        .collect();
    let answered: HashSet<Uuid> = recovered.iter().map(|t| t.id).collect();
    assert_eq!(
        answered, left_running,
        "{context}: recovery answered other tasks than those it ended"
    );
    for task in recovered {
        let now = after.get(&task.id).unwrap_or_else(|| {
            panic!("{context}: recovery answered task {} that is gone", task.id)
        });
        crate::cases::assert_same(
            now,
            task,
            &format!("{context}: recovery answered a task other than as it left it"),
        );
    }
}

/// `totals` with what the store finished since it was last taken added.
fn finished_totals(
    store: &dyn Store,
    mut totals: BTreeMap<(String, String), Finished>,
) -> BTreeMap<(String, String), Finished> {
    for (queue, task_type, finished) in store.take_finished() {
        totals.entry((queue, task_type)).or_default().add(&finished);
    }
    totals
}

/// The store's tally of finished tasks grew by exactly the tasks that
/// entered a finished state in this step.
fn check_finished(
    before: &HashMap<Uuid, Task>,
    after: &HashMap<Uuid, Task>,
    totals_before: &BTreeMap<(String, String), Finished>,
    totals_after: &BTreeMap<(String, String), Finished>,
    context: &str,
) {
    let mut expected = totals_before.clone();
    for task in after.values() {
        let entered = task.state.is_finished()
            && before
                .get(&task.id)
                .is_none_or(|prior| prior.state != task.state);
        if entered {
            let pair = (task.queue.clone(), task.task_type.clone());
            if let Some(count) = expected.entry(pair).or_default().slot(task.state) {
                *count += 1;
            }
        }
    }
    assert_eq!(
        totals_after, &expected,
        "{context}: the finished tasks counted"
    );
}

/// An ack or heartbeat succeeds exactly when the worker held the task.
fn check_holder(
    before: &HashMap<Uuid, Task>,
    id: Uuid,
    worker_id: &str,
    accepted: bool,
    context: &str,
) {
    let held = before.get(&id).is_some_and(|t| t.held_by(worker_id));
    assert_eq!(
        accepted, held,
        "{context}: accepted={accepted} but held={held}"
    );
}

async fn snapshot(store: &dyn Store) -> HashMap<Uuid, Task> {
    listed(store, Vec::new()).await
}

/// Every task in `states` (any state when empty), page by page.
async fn listed(store: &dyn Store, states: Vec<State>) -> HashMap<Uuid, Task> {
    let mut all = HashMap::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&ListQuery {
                states: states.clone(),
                limit: 1000,
                cursor: cursor.clone(),
                ..Default::default()
            })
            .await
            .expect("list");
        all.extend(page.tasks.into_iter().map(|t| (t.id, t)));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return all,
        }
    }
}

async fn check_snapshot(
    store: &dyn Store,
    before: &HashMap<Uuid, Task>,
    after: &HashMap<Uuid, Task>,
    may_change_finished: &HashSet<Uuid>,
    may_remove_finished: bool,
    context: &str,
) {
    // Counts match what a listing shows.
    let mut total = Counts::default();
    let mut by_queue: BTreeMap<String, Counts> = BTreeMap::new();
    for task in after.values() {
        *total.slot(task.state) += 1;
        *by_queue
            .entry(task.queue.clone())
            .or_default()
            .slot(task.state) += 1;
    }
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        stats.total, total,
        "{context}: stats disagree with the listing"
    );
    assert_eq!(
        stats.queues, by_queue,
        "{context}: per-queue stats disagree with the listing"
    );
    assert_eq!(
        store.totals().await.expect("totals"),
        total,
        "{context}: totals disagree with the listing"
    );

    // Listing by one state finds that state's tasks, and only them (the
    // SQLite store lists pending and running tasks from its memory).
    for state in State::ALL {
        let mut found: Vec<Uuid> = listed(store, vec![state]).await.into_keys().collect();
        let mut expected: Vec<Uuid> = after
            .values()
            .filter(|t| t.state == state)
            .map(|t| t.id)
            .collect();
        found.sort();
        expected.sort();
        assert_eq!(found, expected, "{context}: the listing of {state} tasks");
    }

    let mut unique_holders = HashSet::new();
    for task in after.values() {
        assert!(
            task.attempt <= task.max_attempts,
            "{context}: attempt {} > max {}",
            task.attempt,
            task.max_attempts
        );
        let running = task.state == State::Running;
        assert_eq!(
            running,
            task.worker_id.is_some(),
            "{context}: worker_id on a {} task",
            task.state
        );
        assert_eq!(
            running,
            task.lease_expires_at.is_some(),
            "{context}: lease on a {} task",
            task.state
        );
        assert_eq!(
            task.state.is_finished(),
            task.finished_at.is_some(),
            "{context}: finished_at on a {} task",
            task.state
        );
        if let Some(key) = &task.unique_key
            && task.state.is_active()
            && !task.cancel_requested
        {
            assert!(
                unique_holders.insert((task.queue.clone(), key.clone())),
                "{context}: two active holders of {key}"
            );
        }
        if task.state == State::Blocked {
            let unmet = task
                .depends_on
                .iter()
                .filter(|d| after.get(d).is_some_and(|t| t.state != State::Completed))
                .count();
            assert!(
                unmet > 0,
                "{context}: task {} is blocked with every dependency completed",
                task.id
            );
        }
        match before.get(&task.id) {
            Some(prior) if prior.state != task.state => {
                assert!(
                    transition_allowed(prior.state, task.state),
                    "{context}: illegal transition {} -> {}",
                    prior.state,
                    task.state
                );
                if prior.state.is_finished() {
                    assert!(
                        may_change_finished.contains(&task.id),
                        "{context}: finished task {} changed",
                        task.id
                    );
                }
            }
            Some(prior) if prior.state.is_finished() && !may_change_finished.contains(&task.id) => {
                assert_eq!(
                    serde_json::to_value(prior).expect("json"),
                    serde_json::to_value(task).expect("json"),
                    "{context}: finished task {} changed",
                    task.id
                );
            }
            _ => {}
        }
    }
    for (id, prior) in before {
        if !after.contains_key(id) {
            assert!(
                prior.state.is_finished() && may_remove_finished,
                "{context}: task {id} ({}) disappeared",
                prior.state
            );
        }
    }
}
