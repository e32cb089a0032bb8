-- Offload's SQLite schema, version 9: large payloads kept apart from
-- their tasks' rows.
--
-- SQLite writes a whole row at every update, so each write of a task's
-- state (a heartbeat, a progress report, its completion) copied its
-- payload again into the log and, at the checkpoint, into the database:
-- with 2,000-byte payloads a burn-down processed a fifth as many tasks a
-- second as with 49-byte ones (`offload bench --payload-bytes`,
-- bench/HISTORY.md). A payload longer than the writer's bound
-- (src/sql.rs, INLINE_PAYLOAD_BYTES) is now written once, here, and its
-- row's `payload` holds '' (never a JSON text); reads take it from here
-- (src/rows.rs, task_columns). Smaller payloads stay in the row, where
-- reading them costs no second lookup. Rows stored before this version
-- keep theirs.
CREATE TABLE task_payloads (
    task_seq INTEGER PRIMARY KEY,
    payload  TEXT NOT NULL
);

CREATE TRIGGER task_payloads_removed AFTER DELETE ON tasks WHEN old.payload = ''
BEGIN
    DELETE FROM task_payloads WHERE task_seq = old.seq;
END;
