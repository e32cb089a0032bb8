-- Offload's PostgreSQL schema, version 1. Applied inside the schema the
-- store was opened with (search_path).
--
-- State codes: 0 blocked, 1 scheduled, 2 pending, 3 running,
--              4 completed, 5 failed, 6 cancelled.
-- Times are milliseconds since the Unix epoch, UTC, from the nodes' clocks.
--
-- Bloat is the known failure of queues on PostgreSQL; the choices here:
-- * Every hot-path index is partial on one state, so it holds only the
--   tasks in that state and stays small whatever is stored.
-- * Heartbeats change only columns no index covers (lease_expires_at,
--   progress, updated_at), so with fillfactor 80 they are HOT updates: no
--   new index entries, and the old version is pruned in the page.
-- * The payload is the last column and TOASTed when large; an update that
--   does not change it does not copy it.
-- * Autovacuum runs on this table far sooner than the default 20% of dead
--   rows, and retention deletes finished tasks in small batches.

CREATE TABLE offload_tasks (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               uuid     NOT NULL UNIQUE,
    run_at           bigint   NOT NULL,
    created_at       bigint   NOT NULL,
    updated_at       bigint   NOT NULL,
    started_at       bigint,
    finished_at      bigint,
    lease_expires_at bigint,
    deadline_at      bigint,
    attempt          integer  NOT NULL,
    max_attempts     integer  NOT NULL,
    timeout_secs     integer  NOT NULL,
    state            smallint NOT NULL,
    priority         smallint NOT NULL,
    cancel_requested boolean  NOT NULL DEFAULT false,
    type             text     NOT NULL,
    queue            text     NOT NULL,
    owner            text,
    unique_key       text,
    worker_id        text,
    labels           jsonb,
    depends_on       uuid[],
    progress         text,
    result           text,
    error            text,
    errors           text,
    payload          text     NOT NULL
) WITH (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 1
);

-- Claiming, per queue and per (queue, type), in priority then run_at order.
CREATE INDEX offload_tasks_ready ON offload_tasks (queue, priority DESC, run_at, seq) WHERE state = 2;
CREATE INDEX offload_tasks_ready_by_type ON offload_tasks (queue, type, priority DESC, run_at, seq) WHERE state = 2;
-- Promotion of due scheduled tasks.
CREATE INDEX offload_tasks_due ON offload_tasks (run_at) WHERE state = 1;
-- Running tasks: recovery and queue concurrency. Deliberately not on
-- lease_expires_at, which heartbeats change.
CREATE INDEX offload_tasks_running ON offload_tasks (queue) WHERE state = 3;
-- Retention and clearing.
CREATE INDEX offload_tasks_finished ON offload_tasks (state, finished_at) WHERE state >= 4;
-- Listing.
CREATE INDEX offload_tasks_by_state ON offload_tasks (state, seq);
CREATE INDEX offload_tasks_by_owner ON offload_tasks (owner, seq) WHERE owner IS NOT NULL;
CREATE INDEX offload_tasks_labels ON offload_tasks USING gin (labels jsonb_path_ops) WHERE labels IS NOT NULL;
-- SPEC §1.2: one active holder per (queue, unique_key).
CREATE UNIQUE INDEX offload_tasks_unique_key ON offload_tasks (queue, unique_key)
    WHERE unique_key IS NOT NULL AND state <= 3 AND NOT cancel_requested;

-- Unmet dependencies of blocked tasks, found from the dependency's side.
CREATE TABLE offload_task_deps (
    dep_id   uuid   NOT NULL,
    task_seq bigint NOT NULL,
    PRIMARY KEY (dep_id, task_seq)
);
CREATE INDEX offload_task_deps_by_task ON offload_task_deps (task_seq);

CREATE TABLE offload_queues (
    name        text    PRIMARY KEY,
    paused      boolean NOT NULL DEFAULT false,
    concurrency integer,
    created_at  bigint  NOT NULL
);

-- Task counts as an insert-only ledger: each transaction appends its
-- changes, the leader folds the rows together now and then. Counting never
-- scans the tasks, and no two transactions contend for one counter row.
CREATE TABLE offload_counts (
    queue text     NOT NULL,
    type  text     NOT NULL,
    state smallint NOT NULL,
    delta bigint   NOT NULL
);
