-- Offload's SQLite schema, version 2: fewer index writes per task.
--
-- Every task passes through pending and running, so each index entry those
-- states carry is written and deleted once per task, on the writer thread
-- that bounds throughput.
--
-- tasks_ready (queue, priority, run_at, seq) duplicated tasks_ready_by_type:
-- a claim for any type now visits the queue's pending types through
-- tasks_ready_by_type (few types, each a short index walk) and merges them.
DROP INDEX tasks_ready;

-- Listing by state no longer indexes running tasks: their number is bounded
-- by the workers' concurrency, and tasks_running finds them all.
DROP INDEX tasks_by_state;
CREATE INDEX tasks_by_state ON tasks (state, seq) WHERE state <> 3;
