//! Parked claims: a worker's claim that found nothing, left with the store
//! so that the write which next makes tasks ready claims for it inside the
//! same transaction.
//!
//! Without parking, a task enqueued while a worker waits costs two durable
//! commits before the worker sees it (the enqueue, then the claim that the
//! ready signal triggers). With parking it costs one: the claim rides along
//! in the enqueue's commit, and the worker is answered as soon as that
//! commit is durable.
//!
//! Each parked claim is answered at most once. The store takes it (so the
//! waiter can no longer withdraw it), claims, and after its commit answers
//! with what it claimed, possibly nothing. The waiter may withdraw it while
//! it is still untaken; once taken, the waiter must wait for the answer, so a
//! task claimed on its behalf is never dropped on the floor.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::oneshot;

use crate::{ClaimRequest, Error, Result, Task};

const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

type Answer = Result<Vec<Task>>;

/// Creates a parked claim: the store keeps the [`ParkedClaim`], the waiter
/// the [`ClaimTicket`].
pub fn park(request: ClaimRequest) -> (ParkedClaim, ClaimTicket) {
    let (answer, answered) = oneshot::channel();
    let state = Arc::new(AtomicU8::new(WAITING));
    (
        ParkedClaim {
            request,
            state: Arc::clone(&state),
            answer,
        },
        ClaimTicket {
            state,
            answered,
            spent: false,
        },
    )
}

/// The store's side of a parked claim.
#[derive(Debug)]
pub struct ParkedClaim {
    pub request: ClaimRequest,
    state: Arc<AtomicU8>,
    answer: oneshot::Sender<Answer>,
}

impl ParkedClaim {
    /// Takes the claim to run it; `None` when its waiter withdrew it.
    pub fn take(self) -> Option<TakenClaim> {
        self.state
            .compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| TakenClaim {
                request: self.request,
                answer: self.answer,
            })
    }

    /// Whether its waiter withdrew it (or went away): it can be dropped.
    pub fn is_withdrawn(&self) -> bool {
        self.state.load(Ordering::Acquire) == WITHDRAWN || self.answer.is_closed()
    }
}

/// A parked claim the store took; it must be answered.
#[derive(Debug)]
pub struct TakenClaim {
    pub request: ClaimRequest,
    answer: oneshot::Sender<Answer>,
}

impl TakenClaim {
    /// Answers the waiter. Call only once the claim's commit is durable.
    pub fn answer(self, outcome: Answer) {
        // A waiter that went away without withdrawing (its connection
        // dropped) leaves what was claimed to lease expiry, as with any
        // claim whose answer is lost.
        let _ = self.answer.send(outcome);
    }
}

/// The waiter's side of a parked claim.
#[derive(Debug)]
pub struct ClaimTicket {
    state: Arc<AtomicU8>,
    answered: oneshot::Receiver<Answer>,
    /// The answer was received; the ticket holds nothing more.
    spent: bool,
}

impl ClaimTicket {
    /// Waits for the store's answer: claimed tasks, or none when the store
    /// tried and found nothing it could claim after all.
    /// Once answered, the ticket is spent and answers nothing more.
    pub async fn answered(&mut self) -> Answer {
        if self.spent {
            return Ok(Vec::new());
        }
        let answer = (&mut self.answered)
            .await
            .unwrap_or_else(|_| Err(Error::Unavailable("the store is closed".into())));
        self.spent = true;
        answer
    }

    /// Withdraws the claim: nothing is claimed for it from now on. If the
    /// store has already taken it, this waits for its answer and returns the
    /// tasks claimed, which the caller then owns.
    pub async fn withdraw(mut self) -> Answer {
        match self
            .state
            .compare_exchange(WAITING, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(Vec::new()),
            Err(_) => self.answered().await,
        }
    }
}

impl Drop for ClaimTicket {
    fn drop(&mut self) {
        let _ =
            self.state
                .compare_exchange(WAITING, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request() -> ClaimRequest {
        ClaimRequest {
            worker_id: "w".into(),
            types: Vec::new(),
            queues: Vec::new(),
            limit: 1,
            lease: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn a_withdrawn_claim_cannot_be_taken() {
        let (parked, ticket) = park(request());
        assert!(ticket.withdraw().await.unwrap().is_empty());
        assert!(parked.is_withdrawn());
        assert!(parked.take().is_none());
    }

    #[tokio::test]
    async fn a_taken_claim_is_answered_even_when_withdrawn() {
        let (parked, ticket) = park(request());
        let taken = parked.take().expect("not withdrawn");
        let withdrawing = tokio::spawn(ticket.withdraw());
        tokio::task::yield_now().await;
        // An answer no withdrawal could produce on its own.
        taken.answer(Err(Error::Conflict("answered".into())));
        assert!(matches!(
            withdrawing.await.unwrap(),
            Err(Error::Conflict(m)) if m == "answered"
        ));
    }

    #[tokio::test]
    async fn a_spent_ticket_answers_nothing_more() {
        let (parked, mut ticket) = park(request());
        parked
            .take()
            .expect("not withdrawn")
            .answer(Err(Error::Conflict("answered".into())));
        assert!(ticket.answered().await.is_err());
        assert!(ticket.answered().await.unwrap().is_empty());
        assert!(ticket.withdraw().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_dropped_ticket_withdraws() {
        let (parked, ticket) = park(request());
        drop(ticket);
        assert!(parked.is_withdrawn());
        assert!(parked.take().is_none());
    }

    #[tokio::test]
    async fn a_closed_store_answers_unavailable() {
        let (parked, mut ticket) = park(request());
        drop(parked);
        assert!(matches!(
            ticket.answered().await,
            Err(Error::Unavailable(_))
        ));
    }
}
