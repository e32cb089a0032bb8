//! A batch of tasks handed to a store in chunks, so that the store writes
//! the first ones while the caller still reads and checks the rest.
//!
//! A batch enqueue over HTTP was one step after another: the server read
//! and checked the whole body (~3,300 instructions a task), then the store
//! wrote it (~12,800 on SQLite's writer thread). With the batch streamed,
//! reading overlaps writing on a second core. The batch stays all or
//! nothing: a store writes the chunks inside one transaction and keeps them
//! only when the sender [finishes](BatchSender::finish); a sender dropped
//! before that abandons the batch, and the store rolls back whatever it
//! wrote of it.

use std::sync::mpsc;
use std::time::Duration;

use crate::{Error, Result, TaskSpec};

enum Chunk {
    Specs(Vec<TaskSpec>),
    End,
}

/// A new batch's two ends.
pub fn batch_stream() -> (BatchSender, BatchReceiver) {
    let (tx, rx) = mpsc::channel();
    (BatchSender { tx }, BatchReceiver { rx })
}

/// The caller's end. Sending never blocks.
#[derive(Debug)]
pub struct BatchSender {
    tx: mpsc::Sender<Chunk>,
}

impl BatchSender {
    /// Sends the next tasks of the batch, in order.
    pub fn send(&self, specs: Vec<TaskSpec>) {
        // A store that stopped listening answers with its error when
        // awaited.
        let _ = self.tx.send(Chunk::Specs(specs));
    }

    /// Ends the batch: the store may commit it.
    pub fn finish(self) {
        let _ = self.tx.send(Chunk::End);
    }
}

/// The store's end.
#[derive(Debug)]
pub struct BatchReceiver {
    rx: mpsc::Receiver<Chunk>,
}

impl BatchReceiver {
    /// The next chunk, waiting for it (blocking the thread) at most
    /// `patience`; `None` once the batch is finished. An error when the
    /// sender abandoned the batch or went silent for longer than
    /// `patience`: the store must then keep none of it.
    pub fn next_blocking(&self, patience: Duration) -> Result<Option<Vec<TaskSpec>>> {
        match self.rx.recv_timeout(patience) {
            Ok(Chunk::Specs(specs)) => Ok(Some(specs)),
            Ok(Chunk::End) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(abandoned()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Unavailable(format!(
                "a streamed batch sent nothing for {patience:?}; abandoned"
            ))),
        }
    }

    /// The whole batch, for a store that writes it in one go; call it once
    /// the sender is done with it (finished or dropped), as
    /// [`crate::Store::enqueue_streamed`]'s future is awaited only then.
    pub fn into_finished(self) -> Result<Vec<TaskSpec>> {
        let mut all = Vec::new();
        for chunk in self.rx.try_iter() {
            match chunk {
                Chunk::Specs(specs) => all.extend(specs),
                Chunk::End => return Ok(all),
            }
        }
        Err(abandoned())
    }
}

fn abandoned() -> Error {
    Error::Unavailable("the batch was abandoned before its end".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, NewTask, Position};

    fn specs(n: usize) -> Vec<TaskSpec> {
        (0..n)
            .map(|_| {
                NewTask::new("t")
                    .validate(&Limits::default(), Position::Alone)
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_finished_batch_arrives_whole_and_in_order() {
        let (tx, rx) = batch_stream();
        tx.send(specs(2));
        tx.send(specs(3));
        tx.finish();
        let patience = Duration::from_secs(1);
        assert_eq!(rx.next_blocking(patience).unwrap().unwrap().len(), 2);
        assert_eq!(rx.next_blocking(patience).unwrap().unwrap().len(), 3);
        assert!(rx.next_blocking(patience).unwrap().is_none());
    }

    #[test]
    fn a_batch_dropped_before_its_end_is_abandoned() {
        let (tx, rx) = batch_stream();
        tx.send(specs(2));
        drop(tx);
        let patience = Duration::from_secs(1);
        assert!(rx.next_blocking(patience).unwrap().is_some());
        assert!(rx.next_blocking(patience).is_err());

        let (tx, rx) = batch_stream();
        tx.send(specs(2));
        drop(tx);
        assert!(rx.into_finished().is_err());
    }

    #[test]
    fn a_silent_sender_is_given_up_on() {
        let (tx, rx) = batch_stream();
        assert!(rx.next_blocking(Duration::from_millis(10)).is_err());
        drop(tx);
    }

    #[test]
    fn the_whole_batch_is_collected_once_finished() {
        let (tx, rx) = batch_stream();
        tx.send(specs(2));
        tx.send(specs(1));
        tx.finish();
        assert_eq!(rx.into_finished().unwrap().len(), 3);
    }
}
