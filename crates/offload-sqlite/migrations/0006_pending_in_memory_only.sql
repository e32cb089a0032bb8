-- Offload's SQLite schema, version 6: no index holds the pending tasks.
-- The writer has kept them in memory since version 3 (src/ready.rs), and
-- now readers list them from there too; version 5 did the same for the
-- running tasks.
--
-- tasks_by_state's entry for a pending task was written on enqueue and
-- deleted on claim. It sorts before the finished tasks' entries, so each
-- was inserted into the middle of the index, SQLite's dearest insert:
-- 12,300 instructions a row with it, 7,800 without (bench/analysis.md).
DROP INDEX tasks_by_state;
CREATE INDEX tasks_by_state ON tasks (state, seq) WHERE state NOT IN (2, 3);
