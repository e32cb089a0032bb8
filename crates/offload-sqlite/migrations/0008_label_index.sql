-- Offload's SQLite schema, version 8: tasks found by label.
--
-- A list filtered by a label read every task newest first and looked for
-- the label's text in each row: 4.3 ms a page for a label 100 tasks
-- carry behind 100,000 newer ones without it, 16.9 ms for the pending
-- ones (bench/label-lists.py). This table holds one entry for each label
-- of each task, `key:value` (a key holds no ':'), so that a list of a rare
-- label walks that label's tasks alone (src/read.rs). Tasks without
-- labels, as most are, cost no entry; labels never change once a task is
-- stored, so only its insert and its delete touch its entries. The writer
-- adds a task's entries as it inserts the task (src/ops.rs: a trigger on
-- insert cost every batch a fifth more, labels or not); the trigger below
-- deletes them with the task, whichever statement deletes it.
CREATE TABLE task_labels (
    label    TEXT    NOT NULL,
    task_seq INTEGER NOT NULL,
    PRIMARY KEY (label, task_seq)
) WITHOUT ROWID;

INSERT INTO task_labels (label, task_seq)
    SELECT key || ':' || value, tasks.seq FROM tasks, json_each(tasks.labels)
    WHERE tasks.labels IS NOT NULL;

CREATE TRIGGER task_labels_removed AFTER DELETE ON tasks WHEN old.labels IS NOT NULL
BEGIN
    DELETE FROM task_labels
    WHERE task_seq = old.seq AND label IN (SELECT key || ':' || value FROM json_each(old.labels));
END;
