//! Small writes gathered into shared transactions. Workers heartbeat one
//! task at a time, web applications enqueue one task a request from many
//! handlers at once, and workers that fetch a task for each free slot, or
//! report each task on its own, claim and ack one at a time. Each in a
//! transaction of its own took its statements and a commit alone: eight
//! clients heartbeating running tasks got 1,464 a second, sixteen
//! enqueueing one task a request 1,691, sixteen completing one 1,513,
//! sixteen fetching one task and completing it 774–898, where a SQLite
//! node, whose writer gathers every write, got 4,407, 15,551, 10,667 and
//! 7,367 (`bench/heartbeats.py`, `bench/concurrent-writes.py`).
//! Writes of one kind that come while a transaction of them runs go
//! together in the next, each answered apart; one that comes alone runs
//! at once, as before.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use offload_core::{
    Ack, AckOutcome, ClaimRequest, Error, HeartbeatAck, HeartbeatRequest, Result, Task, TaskSpec,
};
use sqlx::postgres::PgPool;
use tokio::sync::oneshot;

use crate::rows::PgError;
use crate::tx::Tx;
use crate::{MAX_TRIES, Node, ops};

/// One kind of write that may share a transaction with others of its kind.
pub(crate) trait Gathered: Send + Sync + 'static {
    type Request: Send + 'static;
    type Answer: Send + 'static;
    /// What is written, for the error its callers get if the writer stops.
    const WHAT: &'static str;
    /// The most requests one transaction takes; the rest wait for the next.
    const MOST_IN_ONE: usize;
    /// Whether a request whose caller stopped waiting before its
    /// transaction came is left out, where it would be written all the
    /// same: a claim for a fetch whose client left held its tasks running,
    /// for no one, until their lease ran out.
    const FOR_ITS_CALLER_ALONE: bool = false;

    /// One transaction of `requests`: one answer each, in their order, or
    /// the error that ended the transaction.
    fn write(
        &self,
        requests: &[Self::Request],
    ) -> impl Future<Output = Result<Vec<Result<Self::Answer>>>> + Send;
}

/// The writes of one kind waiting for a transaction, and whether one runs.
pub(crate) struct Gather<W: Gathered> {
    waiting: Mutex<Waiting<W>>,
    writes: W,
}

/// A request, and where its answer goes.
type Asked<W> = (
    <W as Gathered>::Request,
    oneshot::Sender<Result<<W as Gathered>::Answer>>,
);

struct Waiting<W: Gathered> {
    requests: Vec<Asked<W>>,
    /// A writer task runs, and takes every request that waits before it
    /// ends.
    writing: bool,
}

impl<W: Gathered> fmt::Debug for Gather<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gather")
            .field("of", &W::WHAT)
            .finish_non_exhaustive()
    }
}

impl<W: Gathered> Gather<W> {
    pub(crate) fn new(writes: W) -> Self {
        Self {
            waiting: Mutex::new(Waiting {
                requests: Vec::new(),
                writing: false,
            }),
            writes,
        }
    }

    /// Writes `request` with whatever others wait beside it, and answers
    /// once their transaction commits.
    pub(crate) async fn send(self: &Arc<Self>, request: W::Request) -> Result<W::Answer> {
        let alone = {
            let mut waiting = self.lock();
            let alone = !waiting.writing && waiting.requests.is_empty();
            waiting.writing |= alone;
            alone
        };
        if alone {
            // Written in the caller's own task: handed to a writer task and
            // answered back, it woke another thread twice, which put a
            // PostgreSQL node's pickup p50 at 2.21-2.55 ms against 2.08-2.16.
            let _ends = AloneEnds { gather: self };
            let outcome = self.writes.write(std::slice::from_ref(&request)).await;
            return outcome?.pop().unwrap_or_else(|| {
                Err(Error::Storage(format!(
                    "the transaction of {} answered nothing",
                    W::WHAT
                )))
            });
        }
        let (answer, answered) = oneshot::channel();
        let start_writer = {
            let mut waiting = self.lock();
            waiting.requests.push((request, answer));
            !std::mem::replace(&mut waiting.writing, true)
        };
        if start_writer {
            // A task of its own: a request dropped when its client goes
            // away must not take the others' transaction with it.
            tokio::spawn(Arc::clone(self).write_waiting());
        }
        answered.await.unwrap_or_else(|_| {
            Err(Error::Storage(format!(
                "the {}' transaction ended unanswered",
                W::WHAT
            )))
        })
    }

    fn lock(&self) -> MutexGuard<'_, Waiting<W>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the waiting requests, a transaction at a time, until none
    /// waits.
    async fn write_waiting(self: Arc<Self>) {
        let mut ends = WriterEnds {
            gather: &self,
            finished: false,
        };
        loop {
            let taken = {
                let mut waiting = self.lock();
                if waiting.requests.is_empty() {
                    waiting.writing = false;
                    ends.finished = true;
                    return;
                }
                let taken = waiting.requests.len().min(W::MOST_IN_ONE);
                let mut taken = waiting.requests.drain(..taken).collect::<Vec<_>>();
                if W::FOR_ITS_CALLER_ALONE {
                    taken.retain(|(_, answer)| !answer.is_closed());
                }
                taken
            };
            if taken.is_empty() {
                continue;
            }
            let (requests, answers): (Vec<_>, Vec<_>) = taken.into_iter().unzip();
            match self.writes.write(&requests).await {
                Ok(outcomes) => {
                    for (answer, outcome) in answers.into_iter().zip(outcomes) {
                        let _ = answer.send(outcome);
                    }
                }
                Err(e) => {
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// Where a request written alone ends, answered or dropped: those that
/// came meanwhile get a writer of their own.
struct AloneEnds<'a, W: Gathered> {
    gather: &'a Arc<Gather<W>>,
}

impl<W: Gathered> Drop for AloneEnds<'_, W> {
    fn drop(&mut self) {
        let mut waiting = self.gather.lock();
        if waiting.requests.is_empty() {
            waiting.writing = false;
            return;
        }
        drop(waiting);
        // Still `writing`: what comes now joins these.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(Arc::clone(self.gather).write_waiting())),
            // The runtime is going away, and every request with it.
            Err(_) => {
                let mut waiting = self.gather.lock();
                waiting.writing = false;
                waiting.requests.clear();
            }
        }
    }
}

/// Where the writer ends otherwise than by finding nothing left (it
/// panicked, or its runtime shut down), the waiting requests are answered
/// and the next one starts a writer again.
struct WriterEnds<'a, W: Gathered> {
    gather: &'a Gather<W>,
    finished: bool,
}

impl<W: Gathered> Drop for WriterEnds<'_, W> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut waiting = self.gather.lock();
        waiting.writing = false;
        for (_, answer) in waiting.requests.drain(..) {
            let _ = answer.send(Err(Error::Storage(format!(
                "the {}' writer stopped",
                W::WHAT
            ))));
        }
    }
}

/// What a gathered transaction needs: the node's connections and the node.
#[derive(Debug)]
pub(crate) struct Writes {
    pool: PgPool,
    node: Arc<Node>,
}

impl Writes {
    pub(crate) fn new(pool: PgPool, node: Arc<Node>) -> Self {
        Self { pool, node }
    }

    async fn begin(&self) -> Result<Tx, PgError> {
        Tx::begin(&self.pool, &self.node).await
    }
}

/// Heartbeats, each answered apart: one refused (its task no longer
/// held) leaves the others to go through.
#[derive(Debug)]
pub(crate) struct Heartbeats(pub(crate) Writes);

impl Gathered for Heartbeats {
    type Request = HeartbeatRequest;
    type Answer = HeartbeatAck;
    const WHAT: &'static str = "heartbeats";
    const MOST_IN_ONE: usize = 1_000;

    async fn write(&self, requests: &[HeartbeatRequest]) -> Result<Vec<Result<HeartbeatAck>>> {
        let writes = &self.0;
        in_tx!(writes, |tx| ops::heartbeats(&mut tx, requests).await?)
    }
}

/// Tasks enqueued one a request that can only fail together: with no
/// unique key and no dependencies ([`ops::is_plain`]), nothing one caller
/// sends can fail another's task (what a task may hold was checked before
/// it reached the store), and a statement of them goes through or fails
/// whole, as a batch does.
#[derive(Debug)]
pub(crate) struct Enqueues(pub(crate) Writes);

impl Gathered for Enqueues {
    type Request = TaskSpec;
    type Answer = (Task, bool);
    const WHAT: &'static str = "enqueues";
    /// As many as a batch of the benchmark's: a statement of them takes
    /// a few milliseconds, which the first caller of the next waits.
    const MOST_IN_ONE: usize = 1_000;

    async fn write(&self, specs: &[TaskSpec]) -> Result<Vec<Result<(Task, bool)>>> {
        let Writes { pool, node } = &self.0;
        let created = crate::enqueue_plain(pool, node, specs.to_vec()).await?;
        Ok(created.into_iter().map(Ok).collect())
    }
}

/// Tasks enqueued one a request that are checked against what is stored
/// before they are written: with a unique key (applications that give
/// every task an idempotency key) or dependencies (a request handler that
/// enqueues the next step of a flow). Each is written as if it came alone
/// ([`ops::enqueue_apart`]); one naming a dependency that is not there is
/// refused alone. A transaction each, sixteen clients enqueueing keyed
/// tasks got a third of what plain ones got.
#[derive(Debug)]
pub(crate) struct CheckedEnqueues(pub(crate) Writes);

impl Gathered for CheckedEnqueues {
    type Request = TaskSpec;
    type Answer = (Task, bool);
    const WHAT: &'static str = "checked enqueues";
    /// As [`Enqueues`]; the keys' locks are at most
    /// [`ops::UNIQUE_KEY_LOCKS`] whatever their number.
    const MOST_IN_ONE: usize = 1_000;

    async fn write(&self, specs: &[TaskSpec]) -> Result<Vec<Result<(Task, bool)>>> {
        let writes = &self.0;
        in_tx!(writes, |tx| ops::enqueue_apart(&mut tx, specs).await?)
    }
}

/// Claims of a few tasks each ([`Claims::FEW_TASKS`] at most), from
/// fetches that come at once: workers that fetch a task for each free
/// slot, a process each, whose claims' commits each waited its turn behind
/// every other notifying commit, and its WAL flush.
/// Each claim answered apart, in the order they came, and those that ask
/// for the same types and queues made as one ([`ops::claims`]); a claim of
/// many tasks already spreads its transaction over them and runs alone.
#[derive(Debug)]
pub(crate) struct Claims(pub(crate) Writes);

impl Claims {
    /// The most tasks a claim may ask for and be gathered.
    pub(crate) const FEW_TASKS: usize = 32;
}

impl Gathered for Claims {
    type Request = ClaimRequest;
    type Answer = ops::Claimed;
    const WHAT: &'static str = "claims";
    /// At most 1,024 tasks a transaction, as a batch of the benchmark's.
    const MOST_IN_ONE: usize = 32;
    const FOR_ITS_CALLER_ALONE: bool = true;

    /// A transaction takes the claims in turn up to one that would take
    /// a second turn on limited queues' rows ([`ops::claims`]); the next
    /// starts from there.
    async fn write(&self, requests: &[ClaimRequest]) -> Result<Vec<Result<ops::Claimed>>> {
        let writes = &self.0;
        let mut answers = Vec::with_capacity(requests.len());
        while answers.len() < requests.len() {
            let rest = &requests[answers.len()..];
            match in_tx!(writes, |tx| ops::claims(&mut tx, rest).await?) {
                Ok(claimed) if claimed.is_empty() => {
                    return Err(Error::Storage(format!(
                        "a transaction of {} claims made none",
                        rest.len()
                    )));
                }
                Ok(claimed) => answers.extend(claimed.into_iter().map(Ok)),
                // The claims made before stand, and are answered.
                Err(e) => answers.extend(rest.iter().map(|_| Err(e.clone()))),
            }
        }
        Ok(answers)
    }
}

/// Acks sent one a request (`POST /v1/tasks/{id}/complete` and `/fail`,
/// and a worker's batch of one), from any worker: each answered apart, as
/// the acks of one batch are, one refused leaving the others to go
/// through. The answer is the ack's outcome, so that a refusal (the task
/// no longer held) stays apart from a transaction that failed, which the
/// worker sends again.
#[derive(Debug)]
pub(crate) struct Acks(pub(crate) Writes);

impl Gathered for Acks {
    /// The worker that sends the ack, and the ack.
    type Request = (String, Ack);
    type Answer = AckOutcome;
    const WHAT: &'static str = "acks";
    const MOST_IN_ONE: usize = 1_000;

    async fn write(&self, acks: &[(String, Ack)]) -> Result<Vec<Result<AckOutcome>>> {
        let writes = &self.0;
        let outcomes = in_tx!(writes, |tx| ops::ack_from(
            &mut tx,
            acks.iter()
                .map(|(worker, ack)| (worker.as_str(), ack.clone()))
                .collect()
        )
        .await?)?;
        Ok(outcomes.into_iter().map(Ok).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::FutureExt;
    use tokio::sync::Notify;

    use super::*;

    /// Writes that keep what each transaction took, the first held until
    /// it is let go.
    struct Kept<const ALONE: bool> {
        transactions: Mutex<Vec<Vec<u32>>>,
        first_entered: Notify,
        let_first_go: Notify,
    }

    impl<const ALONE: bool> Gathered for Kept<ALONE> {
        type Request = u32;
        type Answer = u32;
        const WHAT: &'static str = "kept writes";
        const MOST_IN_ONE: usize = 10;
        const FOR_ITS_CALLER_ALONE: bool = ALONE;

        async fn write(&self, requests: &[u32]) -> Result<Vec<Result<u32>>> {
            let first = {
                let mut transactions = self.transactions.lock().unwrap();
                transactions.push(requests.to_vec());
                transactions.len() == 1
            };
            if first {
                self.first_entered.notify_one();
                self.let_first_go.notified().await;
            }
            Ok(requests.iter().map(|&r| Ok(r)).collect())
        }
    }

    /// Requests 2 and 3 wait while 1 is written; 2's caller goes away.
    async fn transactions<const ALONE: bool>() -> Vec<Vec<u32>> {
        let gather = Arc::new(Gather::new(Kept::<ALONE> {
            transactions: Mutex::new(Vec::new()),
            first_entered: Notify::new(),
            let_first_go: Notify::new(),
        }));
        let first = tokio::spawn({
            let gather = Arc::clone(&gather);
            async move { gather.send(1).await }
        });
        gather.writes.first_entered.notified().await;
        assert!(gather.send(2).now_or_never().is_none(), "2 waits");
        let third = tokio::spawn({
            let gather = Arc::clone(&gather);
            async move { gather.send(3).await }
        });
        while gather.lock().requests.len() < 2 {
            tokio::task::yield_now().await;
        }
        gather.writes.let_first_go.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(third.await.unwrap().unwrap(), 3);
        gather.writes.transactions.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_request_whose_caller_left_is_left_out_where_its_kind_asks() {
        assert_eq!(transactions::<true>().await, [vec![1], vec![3]]);
    }

    #[tokio::test]
    async fn a_request_whose_caller_left_is_written_all_the_same_otherwise() {
        assert_eq!(transactions::<false>().await, [vec![1], vec![2, 3]]);
    }
}
