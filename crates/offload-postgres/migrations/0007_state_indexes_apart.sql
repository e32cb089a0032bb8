-- Offload's PostgreSQL schema, version 7: the indexes of tasks by state
-- apart from the statements they are not for.
--
-- offload_tasks_by_state holds every task but the running (WHERE state <>
-- 3), so any statement that names a state other than running could walk
-- it, and the claims name state = 2. A session plans each statement once;
-- planned while the table's statistics said nothing was pending (a few
-- hundred tasks of three queues and three types, all scheduled or
-- finished, as a quiet application's table is when autovacuum analyzes
-- it), the walks of the pending (queue, type) pairs (sql::PENDING_PAIRS,
-- sql::PENDING_TYPES_OF_QUEUES) kept plans that read every pending task
-- through this index and sorted them, at each claim. Likewise a list of
-- completed tasks, planned while none was, read every completed task
-- through offload_tasks_finished (WHERE state >= 4, for retention) and
-- sorted them, at each page. Each index's condition is now one that only
-- the statements it is for state, in the same words, as migration 6 did
-- for the claim order: the lists of states (sql::list_tasks) and
-- retention (sql::DELETE_FINISHED).
DROP INDEX offload_tasks_by_state;
CREATE INDEX offload_tasks_by_state ON offload_tasks (state, seq) WHERE state + 0 <> 3;
DROP INDEX offload_tasks_finished;
CREATE INDEX offload_tasks_finished ON offload_tasks (state, finished_at) WHERE state + 0 >= 4;
