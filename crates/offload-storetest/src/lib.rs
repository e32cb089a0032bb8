//! The conformance suite every Offload store must pass, written once against
//! the [`Store`] interface: the rules of SPEC §1–2 as executable cases, plus
//! a property test that drives random sequences of operations and checks the
//! invariants after each.
//!
//! A backend runs it from its own integration tests:
//!
//! ```text
//! offload_storetest::conformance_tests!(crate::MyFactory::new());
//! ```
//!
//! Every case drives time with a [`ManualClock`], so backoff, leases, timeouts
//! and retention are checked exactly and without sleeping.
//!
//! Beside it, [`relay`]: a TCP relay whose connections can be silenced, for
//! the tests of what talks to a server or a database over the network.

pub mod cases;
pub mod property;
pub mod relay;

use std::sync::Arc;

use offload_core::{Ack, Limits, ManualClock, NewTask, Position, Store, Task, Timestamp};

/// Opens fresh, empty stores for the suite.
#[async_trait::async_trait]
pub trait StoreFactory: Send + Sync + 'static {
    /// A new empty store whose time comes from `clock`.
    async fn open(&self, clock: Arc<ManualClock>) -> Arc<dyn Store>;
}

/// Two tasks, `first` and `second`, and a `child` that depends on both,
/// enqueued on `store` in that order: for a backend's own tests of
/// dependencies, as for the suite's.
pub async fn a_child_of_two(store: &dyn Store) -> (Task, Task, Task) {
    let enqueue = |task: NewTask| async move {
        let spec = task
            .validate(&Limits::default(), Position::Alone)
            .expect("a valid task");
        let mut answers = store.enqueue(vec![spec]).await.expect("enqueue");
        answers.pop().expect("one answer per task").0
    };
    let first = enqueue(NewTask::new("first")).await;
    let second = enqueue(NewTask::new("second")).await;
    let child = enqueue(
        NewTask::new("child")
            .depends_on(first.id)
            .depends_on(second.id),
    )
    .await;
    (first, second, child)
}

/// Acks completing each of `tasks`, without a result.
pub fn completions(tasks: &[Task]) -> Vec<Ack> {
    tasks
        .iter()
        .map(|t| Ack::Complete {
            id: t.id,
            result: None,
        })
        .collect()
}

/// Completes task `id`, which `worker` holds, without a result.
pub async fn complete(store: &dyn Store, worker: &str, id: uuid::Uuid) -> Task {
    let mut outcomes = store
        .ack(worker, vec![Ack::Complete { id, result: None }])
        .await
        .expect("ack");
    outcomes.remove(0).expect("the worker held the task")
}

/// 2026-01-15T10:00:00Z, where every case's clock starts.
pub const EPOCH: Timestamp = Timestamp::from_millis(1_768_471_200_000);

/// Expands to one `#[tokio::test]` per conformance case, so each shows and
/// fails on its own. `$factory` is an expression yielding a [`StoreFactory`].
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!($factory, if true);
    };
    // `$available` is checked first in every test; a backend whose database
    // is not there skips (its test script says so, loudly, once).
    ($factory:expr, if $available:expr) => {
        $crate::conformance_tests!(@cases $factory, $available;
            enqueue_applies_defaults,
            enqueue_batch_is_all_or_nothing,
            a_large_mixed_batch_is_stored_in_request_order,
            a_batch_of_alike_tasks_is_stored_as_sent,
            a_failed_batch_leaves_nothing_to_claim,
            claim_orders_by_priority_then_run_at,
            claim_respects_limit_types_and_queues,
            claim_order_holds_across_types,
            claim_order_holds_when_one_type_holds_the_front,
            a_claim_naming_a_type_twice_takes_each_task_once,
            claimed_task_is_not_handed_out_again,
            parked_claim_is_answered_by_the_next_ready_task,
            scheduled_task_waits_for_run_at,
            complete_records_result_and_only_holder_may_ack,
            failure_retries_with_backoff_until_attempts_run_out,
            retry_false_and_retry_in_are_honoured,
            expired_lease_fails_the_attempt_and_fences_the_old_worker,
            heartbeat_extends_lease_and_records_progress,
            heartbeats_sent_at_once_are_answered_each_apart,
            timeout_fails_the_attempt,
            cancel_pending_and_running,
            finished_tasks_are_counted_every_way_a_task_finishes,
            cancel_requested_then_lease_expiry_cancels,
            manual_retry_grants_one_more_attempt,
            unique_key_keep_returns_existing,
            unique_key_replace_cancels_existing,
            a_batch_answers_the_task_its_own_replace_cancelled,
            a_batch_meets_held_keys_and_dependencies_as_tasks_one_at_a_time_would,
            concurrent_replaces_of_one_key_all_succeed,
            concurrent_keeps_of_one_key_meet_one_task,
            dependencies_block_until_completed,
            failed_dependency_cancels_dependents_transitively,
            a_retried_dependent_waits_for_its_dependencies_again,
            a_dependency_deleted_after_completing_does_not_hold_its_dependent,
            one_ack_finishing_several_dependencies_moves_each_dependent_by_all_it_depends_on,
            paused_queue_and_concurrency_limit,
            a_claim_fills_past_limited_queues_rooms_from_other_queues,
            a_claim_from_queues_of_which_one_holds_its_type_takes_them_in_order,
            claims_across_many_queues_come_in_claim_order,
            a_claim_from_all_queues_looks_past_tasks_it_may_not_take,
            list_filters_and_keyset_pagination,
            several_states_are_listed_together_newest_first,
            an_owners_list_of_states_is_the_same_through_either_index,
            a_label_filter_matches_whole_keys_and_values,
            a_labels_tasks_behind_many_without_it_are_listed_page_by_page,
            a_page_ends_where_its_bytes_reach_the_budget,
            a_claim_ends_where_its_bytes_reach_the_budget,
            pending_and_running_tasks_are_listed_page_by_page_newest_first,
            stats_and_queues_count_every_task,
            a_batch_makes_each_of_its_queues,
            delete_and_clear_only_finished_tasks,
            retention_deletes_old_finished_tasks_in_batches,
            unknown_ids_are_not_found,
            changes_are_published_as_events,
            each_watch_hears_the_changes_of_what_it_names,
            ack_batch_answers_each_item,
            batched_claims_and_acks_store_each_task_as_answered,
            an_operation_dropped_by_its_caller_publishes_what_it_committed,
        );
    };
    (@cases $factory:expr, $available:expr; $($case:ident),* $(,)?) => {
        mod conformance {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if !$available {
                        return;
                    }
                    let factory = $factory;
                    $crate::cases::$case(&factory).await;
                }
            )*
        }
    };
}
