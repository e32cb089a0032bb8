-- Offload's SQLite schema, version 3: pending tasks in claim order live in
-- the writer's memory (src/ready.rs), built from tasks_by_state at open.
--
-- tasks_ready_by_type cost every claim a seek and a delete in it, on the
-- writer thread that bounds throughput; the writer, the only connection that
-- changes tasks, keeps the same order itself.
DROP INDEX tasks_ready_by_type;
