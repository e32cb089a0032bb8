//! Waiting fetches woken a few at a time.
//!
//! A store that parks claims (SQLite) claims for waiting fetches itself.
//! One that does not (PostgreSQL) leaves each waiting fetch to claim again
//! when the hub says tasks may be ready; woken all at once, 200 idle
//! fetches made 200 claims for each task enqueued, and a client enqueueing
//! one task at a time went from 633 to 32 a second.
//!
//! So waiting fetches join a group of those that ask for the same types
//! and queues, and each ready signal wakes the longest waiting of each
//! group that asks for what the signal says became ready (the (queue,
//! type) pairs of [`offload_core::Readiness`]): woken for any signal, ten
//! workers each waiting for a type of its own made ten claims for each
//! task that became ready. A fetch whose claim leaves ready tasks behind (as the store
//! tells, [`offload_core::Claim::Now`]) wakes two more of its group; one
//! that took all there was wakes no one, as its group would find nothing
//! more; one whose claim fails gives its turn to the next. A burst of
//! tasks reaches idle fetches in a number of rounds that grows with the
//! logarithm of its size, and a lone task costs one claim, however many
//! wait, where the store can tell it took all there was. A fetch that
//! comes while others of its group wait for a turn takes its place behind
//! them without looking first: a worker given tasks one at a time came
//! back for the next and found nothing each time, as the task had gone to
//! a waiting fetch. The look a waiting fetch takes in case a signal was
//! lost goes the same way as a signal: one fetch of each group, every
//! `fallback`, rather than each fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use offload_core::{ClaimRequest, Readiness, ReadyLog};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What a waiting fetch asks for: its types and queues, sorted, each once.
type Filter = (Vec<String>, Vec<String>);

#[derive(Debug, Default)]
pub(crate) struct Relay {
    groups: Mutex<HashMap<Filter, Group>>,
    dispatcher: OnceLock<()>,
}

/// The fetches waiting for tasks of the same types and queues, and the
/// turns given them.
#[derive(Debug, Default)]
struct Group {
    turn: Arc<Notify>,
    /// Fetches with a place in the group.
    members: usize,
    /// Members waiting for a turn, not claiming.
    waiting: usize,
}

impl Relay {
    /// A place in the group of fetches asking what `request` asks for,
    /// until the place is dropped. The first place taken starts the task
    /// that passes each ready signal on (`started` receives its handle).
    pub(crate) fn join(
        self: &Arc<Self>,
        request: &ClaimRequest,
        ready: (&watch::Receiver<u64>, &ReadyLog),
        fallback: Duration,
        stop: &CancellationToken,
        started: impl FnOnce(JoinHandle<()>),
    ) -> Place {
        self.dispatcher.get_or_init(|| {
            started(tokio::spawn(dispatch(
                Arc::clone(self),
                (ready.0.clone(), ready.1.clone()),
                fallback,
                stop.clone(),
            )));
        });
        let filter = filter_of(request);
        let turn = {
            let mut groups = self.lock();
            let group = groups.entry(filter.clone()).or_default();
            group.members += 1;
            Arc::clone(&group.turn)
        };
        Place {
            relay: Arc::clone(self),
            filter,
            turn,
        }
    }

    /// A place behind the fetches of `request`'s group, when some of them
    /// wait for a turn. Each of those found nothing when it last looked,
    /// and the group has been given a turn for every ready signal since,
    /// so a look of a fetch joining them would find only what a turn
    /// already brings one of them: it waits behind them instead.
    pub(crate) fn behind_waiters(self: &Arc<Self>, request: &ClaimRequest) -> Option<Place> {
        let filter = filter_of(request);
        let turn = {
            let mut groups = self.lock();
            let group = groups.get_mut(&filter).filter(|g| g.waiting > 0)?;
            group.members += 1;
            Arc::clone(&group.turn)
        };
        Some(Place {
            relay: Arc::clone(self),
            filter,
            turn,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Filter, Group>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the longest waiting fetch (or the next to wait, when all are
    /// busy claiming) of each group that asks for what became `ready`.
    fn wake_groups(&self, ready: &Readiness) {
        for ((types, queues), group) in self.lock().iter() {
            if ready.concerns(types, queues) {
                group.turn.notify_one();
            }
        }
    }
}

fn filter_of(request: &ClaimRequest) -> Filter {
    let sorted = |names: &[String]| {
        let mut names = names.to_vec();
        names.sort_unstable();
        names.dedup();
        names
    };
    (sorted(&request.types), sorted(&request.queues))
}

/// Passes each ready signal on to the groups it concerns, and gives each
/// group a turn every `fallback` without one, until the engine stops.
async fn dispatch(
    relay: Arc<Relay>,
    (mut ready, log): (watch::Receiver<u64>, ReadyLog),
    fallback: Duration,
    stop: CancellationToken,
) {
    let mut seen = *ready.borrow_and_update();
    loop {
        let readiness = tokio::select! {
            changed = ready.changed() => {
                if changed.is_err() {
                    return;
                }
                // Signals sent since `changed` are read here too; the next
                // `changed` then finds nothing new and wakes no one.
                let (last, readiness) = log.since(seen);
                seen = last;
                readiness
            }
            () = tokio::time::sleep(fallback) => Readiness::Anything,
            () = stop.cancelled() => return,
        };
        relay.wake_groups(&readiness);
    }
}

/// A waiting fetch's place in its group.
#[derive(Debug)]
pub(crate) struct Place {
    relay: Arc<Relay>,
    filter: Filter,
    turn: Arc<Notify>,
}

impl Place {
    /// Resolves when it is this fetch's turn to claim. A turn dropped
    /// unused (the fetch's wait ended) goes to the next of the group.
    pub(crate) async fn turn(&self) {
        let _waiting = Waiting::new(self);
        self.turn.notified().await;
    }

    /// Whether `ready` is about tasks this fetch asks for.
    pub(crate) fn concerned_by(&self, ready: &Readiness) -> bool {
        ready.concerns(&self.filter.0, &self.filter.1)
    }

    /// Wakes two more of the group: this fetch's claim left tasks ready.
    pub(crate) fn pass_on(&self) {
        self.turn.notify_one();
        self.turn.notify_one();
    }

    /// Gives this fetch's turn to the next of its group: this fetch's claim
    /// failed, and the tasks that came with the turn are still there.
    pub(crate) fn hand_on(&self) {
        self.turn.notify_one();
    }

    fn change_waiting(&self, change: impl FnOnce(usize) -> usize) {
        if let Some(group) = self.relay.lock().get_mut(&self.filter) {
            group.waiting = change(group.waiting);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut groups = self.relay.lock();
        if let Some(group) = groups.get_mut(&self.filter) {
            group.members -= 1;
            if group.members == 0 {
                groups.remove(&self.filter);
            }
        }
    }
}

/// Counts a place among its group's waiting ones while its wait for a
/// turn lasts, however it ends.
struct Waiting<'a>(&'a Place);

impl<'a> Waiting<'a> {
    fn new(place: &'a Place) -> Self {
        place.change_waiting(|n| n + 1);
        Self(place)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.change_waiting(|n| n - 1);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use offload_core::Hub;

    use super::*;

    /// A fallback that never comes during a test.
    const LONG: Duration = Duration::from_secs(600);

    /// A relay, the hub whose ready signals it passes on, and the stop
    /// that ends its dispatcher when the test ends.
    struct Setup {
        relay: Arc<Relay>,
        hub: Hub,
        stop: CancellationToken,
    }

    impl Setup {
        fn new() -> Self {
            Self {
                relay: Arc::new(Relay::default()),
                hub: Hub::new(),
                stop: CancellationToken::new(),
            }
        }

        /// A place for a fetch of one task of `types`.
        fn join(&self, types: &[&str], fallback: Duration) -> Place {
            let ready = self.hub.watch_ready();
            self.relay.join(
                &request(types),
                (&ready, &self.hub.ready_log()),
                fallback,
                &self.stop,
                |_| {},
            )
        }

        /// A signal that anything may be ready.
        fn send_signal(&self) {
            self.hub.notify_ready();
        }

        /// Waiters of `types` counting their turns in `turns`; each passes
        /// its turn on, as a fetch whose claim left tasks ready does, when
        /// `passing`.
        fn waiters(
            &self,
            types: &[&str],
            n: usize,
            turns: &Arc<AtomicUsize>,
            passing: bool,
        ) -> Vec<JoinHandle<()>> {
            (0..n)
                .map(|_| {
                    let place = self.join(types, LONG);
                    let turns = Arc::clone(turns);
                    tokio::spawn(async move {
                        place.turn().await;
                        turns.fetch_add(1, Ordering::SeqCst);
                        if passing {
                            place.pass_on();
                        }
                    })
                })
                .collect()
        }
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    fn request(types: &[&str]) -> ClaimRequest {
        ClaimRequest {
            worker_id: "w".into(),
            types: types.iter().map(|t| t.to_string()).collect(),
            queues: vec![],
            limit: 1,
            lease: Duration::from_secs(30),
        }
    }

    /// Lets every woken task run to its next await.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_ready_signal_wakes_one_of_each_group_and_each_full_claim_two_more() {
        let setup = Setup::new();
        let a = Arc::new(AtomicUsize::new(0));
        let b = Arc::new(AtomicUsize::new(0));
        // The turns spread 1, 2, 4, ... through a group, never to more
        // than it holds.
        let _a = setup.waiters(&["a"], 7, &a, true);
        // The same types in another order are the same group.
        let _b = setup.waiters(&["c", "b", "c"], 1, &b, true);
        let _b2 = setup.waiters(&["b", "c"], 2, &b, true);
        settle().await;
        assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (0, 0));
        setup.send_signal();
        settle().await;
        assert_eq!(
            a.load(Ordering::SeqCst),
            7,
            "the turns reach every waiter of a"
        );
        assert_eq!(b.load(Ordering::SeqCst), 3, "and of b");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_signal_of_pairs_wakes_only_the_groups_that_ask_for_one_of_them() {
        let setup = Setup::new();
        let counters = || Arc::new(AtomicUsize::new(0));
        let (a, b, any) = (counters(), counters(), counters());
        let _a = setup.waiters(&["a"], 2, &a, false);
        let _b = setup.waiters(&["b"], 2, &b, false);
        let _any = setup.waiters(&[], 2, &any, false);
        let turns = || [&a, &b, &any].map(|n| n.load(Ordering::SeqCst));
        settle().await;
        setup.hub.notify_ready_in([("default", "a")]);
        settle().await;
        assert_eq!(turns(), [1, 0, 1], "a's group and the one of any type");
        setup
            .hub
            .notify_ready_in([("default", "b"), ("other", "b")]);
        settle().await;
        assert_eq!(turns(), [1, 1, 2], "one turn a group for the two pairs");
        setup.hub.notify_ready_in([("default", "c")]);
        settle().await;
        assert_eq!(
            turns(),
            [1, 1, 2],
            "no group asks for c but the one of any type, now empty"
        );
        setup.send_signal();
        settle().await;
        assert_eq!(turns(), [2, 2, 2], "anything wakes every group");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_that_claims_fewer_than_it_asked_wakes_no_one() {
        let setup = Setup::new();
        let turns = Arc::new(AtomicUsize::new(0));
        let _waiting = setup.waiters(&["a"], 5, &turns, false);
        settle().await;
        setup.send_signal();
        settle().await;
        assert_eq!(turns.load(Ordering::SeqCst), 1, "one claim for one signal");
        setup.send_signal();
        settle().await;
        assert_eq!(turns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_signal_while_a_group_claims_gives_its_next_waiter_a_turn_at_once() {
        let setup = Setup::new();
        let place = setup.join(&["a"], LONG);
        settle().await;
        // No one of the group waits: the turn is kept for the next.
        setup.send_signal();
        settle().await;
        tokio::time::timeout(Duration::from_secs(5), place.turn())
            .await
            .expect("the turn kept for the group");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_signals_each_group_gets_a_turn_every_fallback() {
        let setup = Setup::new();
        let place = setup.join(&["a"], Duration::from_millis(20));
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(5), place.turn())
                .await
                .expect("a turn in case a signal was lost");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_place_behind_is_given_only_while_some_of_the_group_wait() {
        let setup = Setup::new();
        let behind = |types: &[&str]| setup.relay.behind_waiters(&request(types)).is_some();
        assert!(!behind(&["a"]), "no group yet");
        let place = setup.join(&["a"], LONG);
        assert!(!behind(&["a"]), "its one member claims");
        // The place outlives its turn, kept in the task's output.
        let waiter = tokio::spawn(async move {
            place.turn().await;
            place
        });
        settle().await;
        assert!(behind(&["a"]), "its member waits");
        assert!(!behind(&["b"]), "another group");
        setup.send_signal();
        settle().await;
        assert!(waiter.is_finished(), "the signal gave the waiter its turn");
        assert!(!behind(&["a"]), "none waits once the turn came");
        drop(waiter.await);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_group_leaves_with_its_last_member() {
        let setup = Setup::new();
        let first = setup.join(&["a"], LONG);
        let second = setup.join(&["a"], LONG);
        let other = setup.join(&["b"], LONG);
        let groups = || setup.relay.groups.lock().unwrap().len();
        assert_eq!(groups(), 2);
        drop(first);
        assert_eq!(groups(), 2);
        drop((second, other));
        assert_eq!(groups(), 0);
    }
}
