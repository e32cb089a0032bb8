"""SQLite's own work for a task's claim and completion, without Offload.

    python3 floor.py fill DB            # Offload's migrations, 120,000 pending tasks
    python3 floor.py setup SCHEMA DB    # the schema's changes (not counted)
    python3 floor.py burn SCHEMA DB     # claim and complete 100,000 of them
    python3 floor.py burned             # how many a burn claims: 100000

Each batch of 500 is claimed in one transaction (the rows updated, then read
back as a claim's answer is) and completed in another. SCHEMA is one of:

    offload      Offload's schema as its migrations leave it (since version 5
                 no index holds the running tasks: the writer keeps them),
                 claimed as up to version 6: each task's row rewritten
    running-ix   with schema version 4's index of running tasks
                 (tasks_running), which version 5 dropped
    leases       a claim inserts a row into a small table of leases and
                 leaves the task's row alone; the completion deletes the
                 lease and writes the task's row once
    claim-log    a claim inserts one row for its whole batch (its seqs in a
                 blob) and leaves the tasks' rows alone; the completion
                 deletes that row and writes each task's row once: what
                 Offload does since version 7 (src/claims.rs)
    split        the columns a task's life changes copied to a narrow table
                 of their own (task_states, with the indexes that name
                 them), which the claim and the completion write; `tasks`
                 stays as the enqueue wrote it

`run` counts the instructions of sqlite3_step under callgrind, which
repeats exactly from run to run, unlike time on a shared machine.
"""

import pathlib
import sqlite3
import sys

MIGRATIONS = pathlib.Path(__file__).resolve().parents[2] / "crates/offload-sqlite/migrations"
STORED = 120_000
BURNED = 100_000
BATCH = 500
NOW = 1_796_060_000_000
SCHEMAS = ("offload", "running-ix", "leases", "claim-log", "split")
PAYLOAD = '{"user_id":42,"template":"welcome","locale":"en"}'
WORKER = "bench-http-0-12345"


def fill(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for number, migration in enumerate(sorted(MIGRATIONS.glob("*.sql")), start=1):
        db.executescript(f"BEGIN; {migration.read_text()}\nPRAGMA user_version = {number}; COMMIT;")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO tasks (seq, id, type, queue, payload, priority, state, attempt,"
        " max_attempts, timeout_secs, run_at, cancel_requested, created_at, updated_at)"
        " VALUES (?1, randomblob(16), 'bench.noop', 'default', ?2, 5, 2, 0, 4, 1800, ?3, 0, ?3, ?3)",
        ((seq, PAYLOAD, NOW - STORED + seq) for seq in range(1, STORED + 1)),
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def setup_sql(schema):
    if schema == "running-ix":
        return "CREATE INDEX tasks_running ON tasks (queue) WHERE state = 3;"
    if schema == "leases":
        return (
            "CREATE TABLE leases (seq INTEGER PRIMARY KEY, attempt INTEGER NOT NULL,"
            " worker_id TEXT NOT NULL, started_at INTEGER NOT NULL,"
            " lease_expires_at INTEGER NOT NULL, deadline_at INTEGER);"
        )
    if schema == "claim-log":
        # Schema version 7 made this table; a database of an earlier one
        # gets it here.
        return (
            "CREATE TABLE IF NOT EXISTS claims (id INTEGER PRIMARY KEY, worker_id TEXT NOT NULL,"
            " claimed_at INTEGER NOT NULL, lease_expires_at INTEGER NOT NULL, tasks BLOB NOT NULL);"
        )
    if schema == "split":
        return (
            "CREATE TABLE task_states (seq INTEGER PRIMARY KEY, state INTEGER NOT NULL,"
            " attempt INTEGER NOT NULL, max_attempts INTEGER NOT NULL, run_at INTEGER NOT NULL,"
            " queue TEXT NOT NULL, unique_key TEXT, progress TEXT, result TEXT, error TEXT,"
            " errors TEXT, cancel_requested INTEGER NOT NULL, updated_at INTEGER NOT NULL,"
            " started_at INTEGER, finished_at INTEGER, lease_expires_at INTEGER,"
            " deadline_at INTEGER, worker_id TEXT);"
            "INSERT INTO task_states SELECT seq, state, attempt, max_attempts, run_at, queue,"
            " unique_key, progress, result, error, errors, cancel_requested, updated_at,"
            " started_at, finished_at, lease_expires_at, deadline_at, worker_id FROM tasks;"
            "DROP INDEX tasks_due; DROP INDEX tasks_finished; DROP INDEX tasks_by_state;"
            " DROP INDEX tasks_unique_key;"
            "CREATE INDEX task_states_due ON task_states (run_at) WHERE state = 1;"
            "CREATE INDEX task_states_finished ON task_states (state, finished_at) WHERE state >= 4;"
            "CREATE INDEX task_states_by_state ON task_states (state, seq) WHERE state NOT IN (2, 3);"
            "CREATE UNIQUE INDEX task_states_unique_key ON task_states (queue, unique_key)"
            " WHERE unique_key IS NOT NULL AND state <= 3 AND cancel_requested = 0;"
            "VACUUM;"
        )
    return ""


def claim(schema, first, last):
    read_back = f"SELECT payload, type, queue FROM tasks WHERE seq BETWEEN {first} AND {last};"
    if schema == "leases":
        return (
            f"INSERT INTO leases SELECT value, 1, '{WORKER}', {NOW}, {NOW + 30_000},"
            f" {NOW + 1_800_000} FROM series WHERE value BETWEEN {first} AND {last};" + read_back
        )
    if schema == "claim-log":
        return (
            f"INSERT INTO claims VALUES ({first}, '{WORKER}', {NOW}, {NOW + 30_000},"
            f" randomblob({(last - first + 1) * 12}));" + read_back
        )
    if schema == "split":
        return (
            f"UPDATE task_states SET state = 3, attempt = attempt + 1, started_at = {NOW},"
            f" updated_at = {NOW}, lease_expires_at = {NOW + 30_000},"
            f" deadline_at = {NOW + 1_800_000}, worker_id = '{WORKER}'"
            f" WHERE seq BETWEEN {first} AND {last};"
            f"SELECT t.payload, t.type, t.queue, s.state, s.attempt FROM tasks t"
            f" JOIN task_states s ON s.seq = t.seq WHERE t.seq BETWEEN {first} AND {last};"
        )
    return (
        f"UPDATE tasks SET state = 3, attempt = attempt + 1, started_at = {NOW},"
        f" updated_at = {NOW}, lease_expires_at = {NOW + 30_000},"
        f" deadline_at = {NOW + 1_800_000}, worker_id = '{WORKER}'"
        f" WHERE seq BETWEEN {first} AND {last};" + read_back
    )


def complete(schema, first, last):
    done = f"state = 4, result = 'null', finished_at = {NOW + 5}, updated_at = {NOW + 5}"
    # Where the claim left the rows alone, the completion writes what it
    # would have written as well.
    written_once = (
        f" UPDATE tasks SET {done}, attempt = attempt + 1, started_at = {NOW},"
        f" worker_id = '{WORKER}' WHERE seq BETWEEN {first} AND {last};"
    )
    if schema == "leases":
        return f"DELETE FROM leases WHERE seq BETWEEN {first} AND {last};" + written_once
    if schema == "claim-log":
        return f"DELETE FROM claims WHERE id = {first};" + written_once
    if schema == "split":
        return (
            f"UPDATE task_states SET {done}, lease_expires_at = NULL, deadline_at = NULL"
            f" WHERE seq BETWEEN {first} AND {last};"
        )
    return (
        f"UPDATE tasks SET {done}, lease_expires_at = NULL, deadline_at = NULL"
        f" WHERE seq BETWEEN {first} AND {last};"
    )


def setup(schema, path):
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(setup_sql(schema))
    db.close()


def rows_in_batches():
    for first in range(1, BURNED + 1, BATCH):
        yield first, first + BATCH - 1


def burn(schema, path):
    db = sqlite3.connect(path, isolation_level=None)
    # The seqs to insert leases for: generate_series is not in every SQLite.
    db.executescript(
        "PRAGMA synchronous = OFF; CREATE TEMP TABLE series (value INTEGER PRIMARY KEY);"
        f"INSERT INTO series SELECT value FROM (WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL"
        f" SELECT value + 1 FROM s WHERE value < {BURNED}) SELECT value FROM s);"
    )
    for first, last in rows_in_batches():
        for step in (claim(schema, first, last), complete(schema, first, last)):
            db.executescript(f"BEGIN; {step} COMMIT;")
    table = "task_states" if schema == "split" else "tasks"
    states = dict(db.execute(f"SELECT state, count(*) FROM {table} GROUP BY state"))
    assert states == {2: STORED - BURNED, 4: BURNED}, states
    db.close()


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["fill", path]:
            fill(path)
        case ["setup", schema, path] if schema in SCHEMAS:
            setup(schema, path)
        case ["burn", schema, path] if schema in SCHEMAS:
            burn(schema, path)
        case ["burned"]:
            print(BURNED)
        case _:
            sys.exit(__doc__)
