//! Heartbeats gathered into shared transactions. A heartbeat is a small
//! write that workers send often, one task at a time; each in a
//! transaction of its own took four statements and a commit, and eight
//! clients heartbeating running tasks got 1,464 a second where a SQLite
//! node, whose writer gathers every write, got 4,407. Heartbeats that
//! come while one transaction of them runs go together in the next.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use offload_core::{Error, HeartbeatAck, HeartbeatRequest, Result};
use sqlx::postgres::PgPool;
use tokio::sync::oneshot;

use crate::rows::PgError;
use crate::tx::Tx;
use crate::{MAX_TRIES, Node, ops};

/// The most heartbeats one transaction takes; the rest wait for the next.
const MOST_IN_ONE: usize = 1_000;

/// The heartbeats waiting for a transaction, and whether one is running.
#[derive(Debug)]
pub(crate) struct Heartbeats {
    waiting: Mutex<Waiting>,
    pool: PgPool,
    node: Arc<Node>,
}

#[derive(Debug, Default)]
struct Waiting {
    beats: Vec<Beat>,
    /// A writer task runs, and takes every beat that waits before it ends.
    writing: bool,
}

#[derive(Debug)]
struct Beat {
    request: HeartbeatRequest,
    answer: oneshot::Sender<Result<HeartbeatAck>>,
}

impl Heartbeats {
    pub(crate) fn new(pool: PgPool, node: Arc<Node>) -> Self {
        Self {
            waiting: Mutex::default(),
            pool,
            node,
        }
    }

    /// Writes `request` with whatever other heartbeats wait beside it, and
    /// answers once their transaction commits.
    pub(crate) async fn send(self: &Arc<Self>, request: HeartbeatRequest) -> Result<HeartbeatAck> {
        let (answer, answered) = oneshot::channel();
        let start_writer = {
            let mut waiting = self.lock();
            waiting.beats.push(Beat { request, answer });
            !std::mem::replace(&mut waiting.writing, true)
        };
        if start_writer {
            // A task of its own: a request dropped when its client goes
            // away must not take the others' transaction with it.
            tokio::spawn(Arc::clone(self).write_waiting());
        }
        answered.await.unwrap_or_else(|_| {
            Err(Error::Storage(
                "the heartbeat's transaction ended unanswered".into(),
            ))
        })
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Heartbeats {
    /// Writes the waiting heartbeats, a transaction at a time, until none
    /// waits.
    async fn write_waiting(self: Arc<Self>) {
        let heartbeats = &*self;
        let mut ends = WriterEnds {
            heartbeats,
            finished: false,
        };
        loop {
            let beats = {
                let mut waiting = heartbeats.lock();
                if waiting.beats.is_empty() {
                    waiting.writing = false;
                    ends.finished = true;
                    return;
                }
                let taken = waiting.beats.len().min(MOST_IN_ONE);
                waiting.beats.drain(..taken).collect::<Vec<_>>()
            };
            let (requests, answers): (Vec<_>, Vec<_>) = beats
                .into_iter()
                .map(|beat| (beat.request, beat.answer))
                .unzip();
            match heartbeats.write(&requests).await {
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

    async fn begin(&self) -> Result<Tx, PgError> {
        Tx::begin(&self.pool, &self.node).await
    }

    /// One transaction of `requests`, retried as every operation is.
    async fn write(&self, requests: &[HeartbeatRequest]) -> Result<Vec<Result<HeartbeatAck>>> {
        in_tx!(self, |tx| ops::heartbeats(&mut tx, requests).await?)
    }
}

/// Where the writer ends otherwise than by finding nothing left (it
/// panicked, or its runtime shut down), the waiting heartbeats are
/// answered and the next one starts a writer again.
struct WriterEnds<'a> {
    heartbeats: &'a Heartbeats,
    finished: bool,
}

impl Drop for WriterEnds<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut waiting = self.heartbeats.lock();
        waiting.writing = false;
        for beat in waiting.beats.drain(..) {
            let _ = beat
                .answer
                .send(Err(Error::Storage("the heartbeats' writer stopped".into())));
        }
    }
}
