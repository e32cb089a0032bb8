//! A bound on the memory that answers waiting for their clients hold.
//!
//! An answer is written as fast as its client reads it; until then it sits
//! in the node's memory. A page of a list is up to 8 MiB, and 200 clients
//! that asked for one each and read nothing took the node to 3.2 GB until
//! the idle timeout closed them (`connections.rs`); a thousand would take
//! more than a small machine has. So large answers to
//! reads (a page of tasks, one task) take their size from a budget
//! (`unread_answers_limit_bytes`) and give it back when the last of their
//! bytes has gone to the socket; one that does not fit is a 503 the client
//! may retry, rather than memory the node does not have. Answers to
//! writes are never refused here: what they answer has been done.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::json::json_response;

/// Answers smaller than this go out without the budget: most answers are,
/// and the kernel's socket buffers take them whole.
const SMALL_ANSWER_BYTES: usize = 64 << 10;

/// The budget, counted in KiB so that a semaphore's permits can hold it.
#[derive(Clone, Debug)]
pub struct UnreadAnswers {
    kib: Arc<Semaphore>,
    limit_bytes: usize,
}

impl UnreadAnswers {
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            kib: Arc::new(Semaphore::new(kib(limit_bytes))),
            limit_bytes,
        }
    }

    /// Room for an answer of up to `bytes`, taken before the answer is
    /// built: a page's tasks and its JSON take memory while they are put
    /// together, which a node already full of unread answers should not
    /// spend on an answer it would refuse.
    pub fn reserve(&self, bytes: usize) -> Result<Reserved, ApiError> {
        let permit = self.take(kib(bytes), bytes)?;
        Ok(Reserved {
            budget: self.clone(),
            permit: Some(permit),
        })
    }

    /// `body` as a JSON answer whose bytes hold their share of the budget
    /// until they are all written (or the connection drops them).
    pub fn answer(&self, body: Vec<u8>) -> Result<Response, ApiError> {
        Reserved {
            budget: self.clone(),
            permit: None,
        }
        .answer(body)
    }

    /// `needed` KiB, or all of the budget for an answer larger than it (a
    /// task near a large `payload_limit_bytes`), which then goes out alone.
    fn take(&self, needed: usize, bytes: usize) -> Result<OwnedSemaphorePermit, ApiError> {
        let needed = needed.min(kib(self.limit_bytes)) as u32;
        Arc::clone(&self.kib)
            .try_acquire_many_owned(needed)
            .map_err(|_| self.exhausted(bytes))
    }

    fn exhausted(&self, wanted: usize) -> ApiError {
        let mib = |kib: usize| kib as f64 / 1024.0;
        let held = kib(self.limit_bytes) - self.kib.available_permits();
        ApiError::unavailable(format!(
            "this node holds {:.1} MiB of answers its clients have not read yet, of the \
             {:.1} MiB it allows (unread_answers_limit_bytes), and this answer needs room \
             for up to {:.1} MiB: try again shortly",
            mib(held),
            mib(kib(self.limit_bytes)),
            mib(kib(wanted))
        ))
    }
}

/// Room taken ahead of an answer by [`UnreadAnswers::reserve`].
#[derive(Debug)]
pub struct Reserved {
    budget: UnreadAnswers,
    permit: Option<OwnedSemaphorePermit>,
}

impl Reserved {
    /// Answers `body`, keeping as much of the room as it needs (taking
    /// more if it needs more) and giving the rest back.
    pub fn answer(mut self, mut body: Vec<u8>) -> Result<Response, ApiError> {
        let body = if body.len() < SMALL_ANSWER_BYTES {
            Body::from(body)
        } else {
            // Grown by doubling, a page's buffer may be twice its length;
            // what is held for the client is then its length.
            body.shrink_to_fit();
            let needed = kib(body.len()).min(kib(self.budget.limit_bytes));
            let reserved = self
                .permit
                .as_ref()
                .map_or(0, OwnedSemaphorePermit::num_permits);
            let permit = match self.permit.take() {
                Some(mut permit) if reserved >= needed => {
                    drop(permit.split(reserved - needed));
                    permit
                }
                held => {
                    let mut more = self.budget.take(needed - reserved, body.len())?;
                    if let Some(held) = held {
                        more.merge(held);
                    }
                    more
                }
            };
            Body::from(Bytes::from_owner(Held {
                _permit: permit,
                body,
            }))
        };
        Ok(json_response(body))
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// An answer's bytes with their share of the budget: dropped with the last
/// of the bytes, which hyper keeps until it has written them.
struct Held {
    _permit: OwnedSemaphorePermit,
    body: Vec<u8>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_answers_hold_their_size_until_their_bytes_are_dropped() {
        let budget = UnreadAnswers::new(1 << 20);
        let small = budget.answer(vec![b'x'; 1000]).expect("small answers pass");
        assert_eq!(budget.kib.available_permits(), 1024);
        let first = budget.answer(vec![b'x'; 600 << 10]).expect("fits");
        assert_eq!(budget.kib.available_permits(), 424);
        let refused = budget
            .answer(vec![b'x'; 600 << 10])
            .expect_err("over the budget");
        let message = refused.detail().message;
        assert!(
            message.contains("holds 0.6 MiB of answers") && message.contains("of the 1.0 MiB"),
            "{message}"
        );
        drop(first);
        assert_eq!(budget.kib.available_permits(), 1024);
        let again = budget.answer(vec![b'x'; 600 << 10]).expect("fits again");
        budget
            .answer(vec![b'x'; 2 << 20])
            .expect_err("larger than the budget, while another is held");
        drop(again);
        let alone = budget
            .answer(vec![b'x'; 2 << 20])
            .expect("larger than the budget, alone");
        assert_eq!(budget.kib.available_permits(), 0);
        drop(alone);
        drop(small);
        assert_eq!(budget.kib.available_permits(), 1024);
    }

    #[test]
    fn room_reserved_ahead_is_trimmed_or_topped_up_to_the_answer() {
        let budget = UnreadAnswers::new(1 << 20);
        let reserved = budget.reserve(900 << 10).expect("room");
        assert_eq!(budget.kib.available_permits(), 124);
        budget
            .reserve(200 << 10)
            .expect_err("no room for another, before it is built");
        let trimmed = reserved.answer(vec![b'x'; 100 << 10]).expect("fits");
        assert_eq!(budget.kib.available_permits(), 924, "keeps what it needs");
        let small = budget.reserve(900 << 10).expect("room").answer(vec![1; 10]);
        assert_eq!(
            budget.kib.available_permits(),
            924,
            "a small answer keeps none"
        );
        let topped = budget
            .reserve(100 << 10)
            .expect("room")
            .answer(vec![b'x'; 600 << 10])
            .expect("takes more");
        assert_eq!(budget.kib.available_permits(), 324);
        budget
            .reserve(100 << 10)
            .expect("room")
            .answer(vec![b'x'; 600 << 10])
            .expect_err("no more to take: the room goes back");
        assert_eq!(budget.kib.available_permits(), 324);
        drop((trimmed, small, topped));
        assert_eq!(budget.kib.available_permits(), 1024);
    }
}
