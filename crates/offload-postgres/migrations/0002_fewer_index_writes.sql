-- Offload's PostgreSQL schema, version 2: fewer index entries per task.
--
-- Every task passes through pending and running. An update that changes an
-- indexed column (state does, for every index here) adds an entry to each
-- index whose condition the new row meets, and vacuum removes the old ones
-- later: each index a hot state appears in costs every task an entry and
-- its cleanup.
--
-- offload_tasks_ready (queue, priority, run_at, seq) duplicated
-- offload_tasks_ready_by_type: a claim for any type now visits the queue's
-- pending types through the latter (few types, each a short index walk).
DROP INDEX offload_tasks_ready;

-- Listing by state no longer indexes running tasks: their number is bounded
-- by the workers' concurrency, and offload_tasks_running finds them all.
DROP INDEX offload_tasks_by_state;
CREATE INDEX offload_tasks_by_state ON offload_tasks (state, seq) WHERE state <> 3;
