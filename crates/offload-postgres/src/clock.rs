//! The database's clock, followed through this node's.
//!
//! Nodes judge time for each other: one claims a task and sets its lease's
//! end, another (the leader) decides that the lease ran out; one enqueues a
//! task for `run_at`, another promotes it. On their own clocks, a node whose
//! clock ran 30 s ahead failed a task of `timeout_secs = 10` the moment
//! another node handed it out, and promoted tasks 30 s early. So every node
//! reads the time as the database's: its own clock plus the offset last
//! measured against `clock_timestamp()`, a round trip every
//! [`FOLLOW_INTERVAL`], off every request's path.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use offload_core::{Clock, Timestamp};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::session::on_session;

/// How often the offset is measured again: clocks drift by milliseconds a
/// day, and one that an operator sets is caught within this.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(30);
/// Samples per measurement; the one with the shortest round trip counts,
/// since its midpoint is nearest to when the database read its clock.
const SAMPLES: usize = 3;
/// A sample whose round trip took longer than this says too little about
/// when the database read its clock; a measurement without a better one
/// keeps the offset it had.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(50);
/// A measurement gets no answer for longer than this (a session acquired,
/// three samples) only from a database out of reach; it is given up, its
/// connection closed (see `session.rs`).
const MEASURE_LIMIT: Duration = Duration::from_secs(10);
/// Changes smaller than this are measurement noise: applying them would
/// only move this node's time back and forth.
const DEADBAND_MS: i64 = 10;
/// An offset past this is worth the operator's attention: the node's clock
/// is wrong for everything else it does.
const WARN_MS: i64 = 1000;

/// This node's clock plus the database's offset from it.
#[derive(Debug)]
pub(crate) struct NodeClock {
    clock: Arc<dyn Clock>,
    offset_ms: AtomicI64,
}

impl NodeClock {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            offset_ms: AtomicI64::new(0),
        }
    }

    pub fn now(&self) -> Timestamp {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        Timestamp::from_millis(self.clock.now().as_millis().saturating_add(offset))
    }

    /// Takes a measured offset, unless it differs from the current one by
    /// noise; `true` if it was taken.
    fn adopt(&self, measured: i64) -> bool {
        let current = self.offset_ms.load(Ordering::Relaxed);
        if (measured - current).abs() < DEADBAND_MS {
            return false;
        }
        self.offset_ms.store(measured, Ordering::Relaxed);
        true
    }
}

/// Measures the offset and takes it; says so when the node's clock is far
/// off. An error or a measurement without a usable sample keeps the
/// offset as it was.
pub(crate) async fn follow_once(clock: &NodeClock, pool: &PgPool) {
    match measure(&*clock.clock, pool).await {
        Ok(Some(offset)) => {
            if clock.adopt(offset) && offset.abs() >= WARN_MS {
                let (by, way) = (offset.abs(), if offset > 0 { "behind" } else { "ahead of" });
                tracing::warn!(
                    offset_ms = offset,
                    "this node's clock is {by} ms {way} the database's; Offload reads time \
                     as the database's, but the node's logs and the rest of the machine do not"
                );
            }
        }
        Ok(None) => tracing::debug!("no sample of the database's clock came back quickly enough"),
        Err(e) => tracing::debug!(error = %e, "cannot read the database's clock"),
    }
}

/// Follows the database's clock until `stop`.
pub(crate) async fn follow(clock: Arc<NodeClock>, pool: PgPool, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
        follow_once(&clock, &pool).await;
    }
}

/// The database's clock minus `clock`, in milliseconds, from the sample
/// with the shortest round trip; `None` if every one took too long.
async fn measure(clock: &dyn Clock, pool: &PgPool) -> offload_core::Result<Option<i64>> {
    const DATABASE_MILLIS: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint";
    on_session!(pool, MEASURE_LIMIT, |conn| {
        let mut best: Option<(Duration, i64)> = None;
        for _ in 0..SAMPLES {
            let sent = Instant::now();
            let before = clock.now().as_millis();
            let database: i64 = sqlx::query_scalar(DATABASE_MILLIS)
                .fetch_one(&mut *conn)
                .await?;
            let after = clock.now().as_millis();
            let round_trip = sent.elapsed();
            let offset = database - (before + (after - before) / 2);
            if round_trip <= MAX_ROUND_TRIP && best.is_none_or(|(fastest, _)| round_trip < fastest)
            {
                best = Some((round_trip, offset));
            }
        }
        best.map(|(_, offset)| offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_core::ManualClock;

    #[test]
    fn time_is_the_clocks_plus_the_offset_taken_past_the_noise() {
        let manual = Arc::new(ManualClock::new(Timestamp::from_millis(1_000_000)));
        let clock = NodeClock::new(manual);
        assert_eq!(clock.now().as_millis(), 1_000_000);
        assert!(!clock.adopt(DEADBAND_MS - 1), "noise is not taken");
        assert_eq!(clock.now().as_millis(), 1_000_000);
        assert!(clock.adopt(-30_000));
        assert_eq!(clock.now().as_millis(), 970_000);
        assert!(!clock.adopt(-30_000 + DEADBAND_MS - 1));
        assert!(clock.adopt(0));
        assert_eq!(clock.now().as_millis(), 1_000_000);
    }
}
