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

/// The condition that finds tasks by id (`$1`, an array) among those whose
/// ids do not carry their seq, through `offload_tasks_id_not_carrying_seq`,
/// whose own condition it repeats.
pub const BY_ID_NOT_CARRYING_SEQ: &str = "id = ANY($1) AND NOT offload_id_carries_seq(id, seq)";

/// A node's keep-alive to itself on its notification channel ($1); the
/// payload ($2) is `k` and the node's id, which every node ignores.
pub const NOTIFY_KEEPALIVE: &str = "SELECT pg_notify($1, $2)";

/// The first `$1` pending tasks in claim order, across queues: their queue,
/// type and place in that order; through `offload_tasks_claim_order`,
/// without a sort of every pending task.
pub const CLAIM_ORDER_WINDOW: &str = "SELECT queue, type, priority, run_at, seq \
     FROM offload_tasks WHERE state = 2 ORDER BY priority DESC, run_at, seq LIMIT $1";

/// The types with pending tasks in each of the queues `$1` (an array), as
/// (queue, type) rows in no order: per queue, one short walk of
/// `offload_tasks_ready_by_type` per type (a loose index scan) rather than
/// a visit of every pending task.
pub const PENDING_TYPES_OF_QUEUES: &str = "WITH RECURSIVE pending(queue, type) AS ( \
       SELECT q.name, f.type FROM unnest($1::text[]) AS q(name) CROSS JOIN LATERAL ( \
         SELECT t.type FROM offload_tasks t WHERE t.state = 2 AND t.queue = q.name \
         ORDER BY t.type LIMIT 1 \
       ) f \
       UNION ALL \
       SELECT p.queue, n.type FROM pending p CROSS JOIN LATERAL ( \
         SELECT t.type FROM offload_tasks t WHERE t.state = 2 AND t.queue = p.queue \
         AND t.type > p.type ORDER BY t.type LIMIT 1 \
       ) n \
     ) SELECT queue, type FROM pending";
