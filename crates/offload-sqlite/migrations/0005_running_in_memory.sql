-- Offload's SQLite schema, version 5: the running tasks live in the
-- writer's memory (src/running.rs), found by a walk of `tasks` at open.
--
-- tasks_running cost every claim an index entry written and every
-- completion one deleted, on the writer thread that bounds throughput:
-- ~13% of SQLite's own work for a task's claim and completion
-- (bench/sqlite-floor). Recovery, the queues' concurrency limits, the stuck
-- count and the list of running tasks now read the writer's set.
DROP INDEX tasks_running;
