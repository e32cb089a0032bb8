-- A task table no index of which names a column a claim or a completion
-- changes, so that both can be HOT updates (fillfactor 50 leaves a page
-- room for them), and the per-state indexes moved to narrow tables.
CREATE TABLE offload_tasks (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id uuid NOT NULL UNIQUE,
    run_at bigint NOT NULL, created_at bigint NOT NULL, updated_at bigint NOT NULL,
    started_at bigint, finished_at bigint, lease_expires_at bigint, deadline_at bigint,
    attempt integer NOT NULL, max_attempts integer NOT NULL, timeout_secs integer NOT NULL,
    state smallint NOT NULL, priority smallint NOT NULL, cancel_requested boolean NOT NULL DEFAULT false,
    type text NOT NULL, queue text NOT NULL, owner text, unique_key text, worker_id text,
    labels jsonb, depends_on uuid[], progress text, result text, error text, errors text,
    payload text NOT NULL
) WITH (fillfactor = 50);
CREATE TABLE offload_ready (queue text NOT NULL, type text NOT NULL, priority smallint NOT NULL,
                            run_at bigint NOT NULL, seq bigint NOT NULL);
CREATE INDEX offload_ready_order ON offload_ready (queue, type, priority DESC, run_at, seq);
CREATE TABLE offload_running (seq bigint PRIMARY KEY, queue text NOT NULL);
CREATE TABLE offload_finished (state smallint NOT NULL, finished_at bigint NOT NULL, seq bigint NOT NULL);
CREATE INDEX offload_finished_order ON offload_finished (state, finished_at);
