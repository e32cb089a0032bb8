-- Offload's SQLite schema, version 7: a claim writes one row for all the
-- tasks it takes, instead of rewriting each task's row.
--
-- A claim changed only columns it can derive (state, attempt, started_at,
-- lease_expires_at, worker_id, updated_at, progress) from the pending row
-- and four facts shared by the whole claim: who, when, until when, and
-- which tasks at which attempt. Rewriting each task's row cost SQLite
-- ~9,000 instructions a task; this row costs it a few hundred
-- (bench/analysis.md). A claimed task's row keeps saying pending until
-- its next write (a heartbeat, a completion, a failure, a cancellation),
-- which writes it whole; the claim's row is deleted once none of its tasks
-- is left unwritten (src/claims.rs). Opening the store writes every task
-- still unwritten and empties this table.
CREATE TABLE claims (
    id               INTEGER PRIMARY KEY,
    worker_id        TEXT    NOT NULL,
    claimed_at       INTEGER NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    tasks            BLOB    NOT NULL  -- (seq, attempt), 12 bytes each, little-endian i64 and u32
);
