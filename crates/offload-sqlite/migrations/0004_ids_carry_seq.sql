-- Offload's SQLite schema, version 4: a task's id carries its seq
-- (src/ids.rs), so `tasks` no longer indexes ids.
--
-- The index of ids cost every insert a B-tree write and a uniqueness check,
-- ~2,900 of ~10,000 instructions (callgrind). Ids made from now on are
-- found by the seq they carry, which is unique as the table's key. Rows
-- stored before keep ids that do not carry their seq; task_ids_before_v4
-- maps those (and nothing else: it is empty in a database created since).
-- An entry whose task is deleted stays, harmless: a lookup checks the id
-- of the row it finds.
--
-- SQLite cannot drop a column's UNIQUE constraint, so the table is built
-- again, with the same columns in the same order, and its indexes with it.

CREATE TABLE tasks_v4 (
    seq              INTEGER PRIMARY KEY,  -- insertion order: list order and FIFO tie-break
    id               BLOB    NOT NULL,     -- carries seq (src/ids.rs)
    type             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    priority         INTEGER NOT NULL,
    state            INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    timeout_secs     INTEGER NOT NULL,
    run_at           INTEGER NOT NULL,
    owner            TEXT,
    labels           TEXT,
    unique_key       TEXT,
    depends_on       TEXT,
    progress         TEXT,
    result           TEXT,
    error            TEXT,
    errors           TEXT,
    cancel_requested INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    lease_expires_at INTEGER,
    deadline_at      INTEGER,
    worker_id        TEXT
);
INSERT INTO tasks_v4 SELECT * FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_v4 RENAME TO tasks;

CREATE TABLE task_ids_before_v4 (
    id  BLOB    PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO task_ids_before_v4 SELECT id, seq FROM tasks;

-- The indexes of version 3, unchanged (see 0001 to 0003 for why each is).
CREATE INDEX tasks_due ON tasks (run_at) WHERE state = 1;
CREATE INDEX tasks_running ON tasks (queue) WHERE state = 3;
CREATE INDEX tasks_finished ON tasks (state, finished_at) WHERE state >= 4;
CREATE INDEX tasks_by_state ON tasks (state, seq) WHERE state <> 3;
CREATE INDEX tasks_by_owner ON tasks (owner, seq) WHERE owner IS NOT NULL;
CREATE UNIQUE INDEX tasks_unique_key ON tasks (queue, unique_key)
    WHERE unique_key IS NOT NULL AND state <= 3 AND cancel_requested = 0;
