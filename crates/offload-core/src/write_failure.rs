//! Why a store's last write failed, while that stands: what `/health` says
//! of a node whose reads go on while its writes fail (a full disk, a
//! database that turned read-only).
//!
//! A health check that only reads would call such a node healthy, and a
//! load balancer would go on sending it work it cannot keep. Each store
//! notes here how each of its commits went; the next one that goes through
//! clears the failure.

use std::fmt::Display;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct WriteFailure {
    /// Looked at after every commit: while no failure stands, noting a
    /// commit that went through costs one load and takes no lock.
    failing: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl WriteFailure {
    /// Notes how a commit went: `None` if it went through, else its error.
    pub fn note(&self, failed: Option<&dyn Display>) {
        if failed.is_none() && !self.failing.load(Ordering::Relaxed) {
            return;
        }
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        *reason = failed.map(ToString::to_string);
        self.failing.store(reason.is_some(), Ordering::Relaxed);
    }

    /// Why the last commit failed, if the last one did.
    pub fn current(&self) -> Option<String> {
        if !self.failing.load(Ordering::Relaxed) {
            return None;
        }
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_stands_until_a_commit_goes_through() {
        let writes = WriteFailure::default();
        assert_eq!(writes.current(), None);
        writes.note(None);
        assert_eq!(writes.current(), None);
        writes.note(Some(&"disk full"));
        assert_eq!(writes.current().as_deref(), Some("disk full"));
        writes.note(Some(&"read-only"));
        assert_eq!(writes.current().as_deref(), Some("read-only"));
        writes.note(None);
        assert_eq!(writes.current(), None);
    }
}
