-- Offload's SQLite schema, version 1.
--
-- State codes: 0 blocked, 1 scheduled, 2 pending, 3 running,
--              4 completed, 5 failed, 6 cancelled.
-- Times are milliseconds since the Unix epoch, UTC.
--
-- Every index that the hot path uses is partial on one state, so its size
-- follows the number of tasks in that state, not the number stored: claiming
-- among 1,000 pending tasks costs the same with a million finished ones.

CREATE TABLE tasks (
    seq              INTEGER PRIMARY KEY,  -- insertion order: list order and FIFO tie-break
    id               BLOB    NOT NULL UNIQUE,
    type             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    priority         INTEGER NOT NULL,
    state            INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    timeout_secs     INTEGER NOT NULL,
    run_at           INTEGER NOT NULL,
    owner            TEXT,
    labels           TEXT,                 -- JSON object, NULL when empty
    unique_key       TEXT,
    depends_on       TEXT,                 -- JSON array of ids, NULL when empty
    progress         TEXT,
    result           TEXT,
    error            TEXT,
    errors           TEXT,                 -- JSON array, NULL when empty
    cancel_requested INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    lease_expires_at INTEGER,
    deadline_at      INTEGER,              -- started_at + timeout_secs while running
    worker_id        TEXT
);

-- Claiming: candidates of one queue (and type) in priority, then run_at order.
CREATE INDEX tasks_ready ON tasks (queue, priority DESC, run_at, seq) WHERE state = 2;
CREATE INDEX tasks_ready_by_type ON tasks (queue, type, priority DESC, run_at, seq) WHERE state = 2;
-- Promotion of due scheduled tasks.
CREATE INDEX tasks_due ON tasks (run_at) WHERE state = 1;
-- Running tasks, for queue concurrency counts and for recovery, which looks
-- at every running task (their number is bounded by the workers'
-- concurrency). Deliberately not on lease_expires_at or deadline_at: an index
-- there would cost every claim, completion and heartbeat an index write.
CREATE INDEX tasks_running ON tasks (queue) WHERE state = 3;
-- Retention and clearing.
CREATE INDEX tasks_finished ON tasks (state, finished_at) WHERE state >= 4;
-- Listing by state, newest first.
CREATE INDEX tasks_by_state ON tasks (state, seq);
CREATE INDEX tasks_by_owner ON tasks (owner, seq) WHERE owner IS NOT NULL;
-- SPEC §1.2: one active holder per (queue, unique_key). A running task whose
-- cancellation was requested is on its way out and no longer holds its key.
CREATE UNIQUE INDEX tasks_unique_key ON tasks (queue, unique_key)
    WHERE unique_key IS NOT NULL AND state <= 3 AND cancel_requested = 0;

-- Unmet dependencies of blocked tasks, found from the dependency's side.
CREATE TABLE task_deps (
    dep_id   BLOB    NOT NULL,
    task_seq INTEGER NOT NULL,
    PRIMARY KEY (dep_id, task_seq)
) WITHOUT ROWID;
CREATE INDEX task_deps_by_task ON task_deps (task_seq);

CREATE TABLE queues (
    name        TEXT PRIMARY KEY,
    paused      INTEGER NOT NULL DEFAULT 0,
    concurrency INTEGER,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
