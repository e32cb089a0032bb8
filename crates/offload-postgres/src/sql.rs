//! Statements whose query plans decide how the store scales, public so the
//! test suite can check their plans against the real schema.
//!
//! PostgreSQL proves that a query may use a partial index only from what the
//! plan knows: a generic plan (used once a prepared statement has run a few
//! times) does not know the value of `$1`, so `state = $1` alone does not
//! prove `state >= 4`. Statements that take the state as a parameter repeat
//! the index's condition literally.

/// Finished tasks of one state (`$1`) finished by `$2`, at most `$3` of them,
/// deleted; through `offload_tasks_finished`.
pub const DELETE_FINISHED: &str = "DELETE FROM offload_tasks WHERE seq IN (SELECT seq \
     FROM offload_tasks WHERE state = $1 AND state >= 4 AND finished_at <= $2 LIMIT $3 \
     FOR UPDATE SKIP LOCKED) RETURNING queue, type";
