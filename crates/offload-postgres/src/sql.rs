//! Statements whose query plans decide how the store scales, public so the
//! test suite can check their plans against the real schema.
//!
//! PostgreSQL proves that a query may use a partial index only from what the
//! plan knows: a generic plan (used once a prepared statement has run a few
//! times) does not know the value of `$1`, so `state = $1` alone does not
//! prove `state >= 4`. Statements that take the state as a parameter repeat
//! the index's condition literally. An index meant for one statement has a
//! condition in words only that statement uses (`state + 0 = 2`), so that
//! no other can be planned onto it.
//!
//! A session plans each statement once, at its first run, and keeps the
//! plan while the connection lives (until an `ANALYZE` or `VACUUM` of the
//! table). A node's first runs often come while its tables are new or nearly
//! empty, and on a table PostgreSQL thinks small, reading all of it, or all
//! of a partial index, looks cheaper than looking rows up by key. Such
//! plans then read every task at each ack and every pending task at each
//! claim: a node that ran a few tasks before a burst of 50,000 burned it
//! down at 2.7–14k a second where it could at 21k, and 20,000 tasks falling
//! due at once waited 3–10 s for their workers, not one. Hence
//! [`PLANNER_SETTINGS`], and lookups by seq that take the state they want
//! as a parameter.

use offload_core::{ListQuery, State};
use sqlx::{Postgres, QueryBuilder};

use crate::rows::{CANDIDATE_COLUMNS, TASK_COLUMNS};

/// How every session of a node plans its statements: generically, each
/// statement once (see `connect`), and never by reading a whole table where
/// an index serves, whatever size the table had when the plan was made.
/// Without JIT: a scan priced out that way (the counts ledger has no index
/// to read instead) costs a statement more than PostgreSQL's threshold for
/// compiling it, tens of milliseconds each run for statements of a few.
pub const PLANNER_SETTINGS: &str =
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET jit = off;";

/// The condition that finds the tasks `$1` (an array of seqs) by primary
/// key.
pub const BY_SEQ: &str = "seq = ANY($1)";

/// The condition that finds the tasks `$1` (an array of seqs) still in
/// state `$2`, by primary key. The state is a parameter so that it proves
/// no partial index on one state: a walk of all of one would read every
/// task in that state.
pub const PENDING_BY_SEQ: &str = "seq = ANY($1) AND state = $2";

/// The text of [`WRITE_TASK_ROWS`], which
/// [`WRITE_TASK_ROWS_RECORDING_CHANGES`] takes in.
macro_rules! write_task_rows {
    () => {
        "UPDATE offload_tasks AS t SET state = u.state, \
         attempt = u.attempt, max_attempts = u.max_attempts, run_at = u.run_at, \
         progress = CASE WHEN u.progress = '' THEN t.progress ELSE u.progress END, \
         result = u.result, \
         error = CASE WHEN u.error = '' THEN t.error ELSE u.error END, \
         errors = CASE WHEN u.errors = '' THEN t.errors ELSE u.errors END, \
         cancel_requested = u.cancel_requested, updated_at = u.updated_at, \
         started_at = u.started_at, finished_at = u.finished_at, \
         lease_expires_at = u.lease_expires_at, deadline_at = u.deadline_at, worker_id = u.worker_id \
         FROM UNNEST($1::bigint[], $2::smallint[], $3::int[], $4::int[], $5::bigint[], $6::text[], \
           $7::text[], $8::text[], $9::text[], $10::bool[], $11::bigint[], $12::bigint[], \
           $13::bigint[], $14::bigint[], $15::bigint[], $16::text[]) \
         AS u(seq, state, attempt, max_attempts, run_at, progress, result, error, errors, \
           cancel_requested, updated_at, started_at, finished_at, lease_expires_at, deadline_at, \
           worker_id) \
         WHERE t.seq = u.seq AND t.seq = ANY($1)"
    };
}

/// Writes back the tasks `$1` (an array of seqs), found by primary key,
/// each with its state, attempts, times and outcome from `$2`–`$16`. A
/// `progress`, `error` or `errors` given as the empty text, which no JSON
/// is, is the row's own (`rows::KEEP_STORED`), left in place:
/// given again, PostgreSQL stored a task's error history anew (its TOAST
/// rows) at every claim, heartbeat and ack, the cost of each growing with
/// the attempts that failed. The seqs are also a condition on the table
/// itself, not only the join's: planned while the table's statistics said
/// it held a few tasks, the join was a hash join that read every task
/// through the primary key to find the few written (30 ms a write beside
/// 100,000 tasks, where it takes 0.1), at every claim and ack until the
/// next `ANALYZE`.
pub const WRITE_TASK_ROWS: &str = write_task_rows!();

/// The tasks in state `$2` (blocked) that depend on any of `$1` (an array
/// of ids), each once: through the dependencies' primary key and the
/// tasks'. The state is a parameter so that no plan walks every blocked
/// task through `offload_tasks_by_state` instead. The dependents' seqs are
/// gathered first, as an array the primary key is then searched for: as a
/// join (`seq IN (SELECT …)`), a generic plan made on a table of blocked
/// tasks walked the whole primary key and probed the dependencies for
/// each task, at every ack (2.1–2.6 ms an ack beside 1,000 blocked tasks,
/// `bench/chains.py`).
pub const BLOCKED_DEPENDENTS_OF: &str = "seq = ANY(ARRAY(SELECT task_seq FROM offload_task_deps \
     WHERE dep_id = ANY($1))) AND state = $2";

/// Of the blocked tasks `$1` (an array of seqs), those that still wait for
/// a dependency stored and not completed, each once: through the
/// dependencies' index by task and the primary key, stopping at a task's
/// first such dependency. A completed dependency's rows go when it
/// completes (`Tx::resolve_dependents`), so that is the task's first row
/// unless an earlier version left some.
pub const WAITING_FOR_MORE: &str = "SELECT w.seq FROM unnest($1::bigint[]) AS w(seq) \
     WHERE EXISTS (SELECT 1 FROM offload_task_deps d JOIN offload_tasks t ON t.seq = d.dep_seq \
       WHERE d.task_seq = w.seq AND t.state <> 4)";

/// The condition that finds the active tasks holding the unique keys of
/// queues `$1` and keys `$2` (arrays, pairwise), each looked up in
/// `offload_tasks_unique_key` by its queue and key, whose own condition the
/// lookup repeats; `$3` is the running state's code. The holders' seqs are
/// gathered first, as an array the primary key is then searched for, and
/// the state is checked again there as a parameter: the condition of the
/// index spelled out at that level let a generic plan walk all of the
/// index (every active task with a key) at each enqueue of a keyed task,
/// 27 ms an enqueue beside 100,000 of them (`bench/concurrent-writes.py`,
/// `STORED=100000 … keyed`). Checked again on the row a lock waited for,
/// so a holder cancelled meanwhile is not one.
pub const HOLDING_UNIQUE_KEYS: &str = "seq = ANY(ARRAY(\
       SELECT h.seq FROM unnest($1::text[], $2::text[]) AS k(queue, key) \
       CROSS JOIN LATERAL (SELECT t.seq FROM offload_tasks t \
         WHERE t.queue = k.queue AND t.unique_key = k.key \
           AND t.unique_key IS NOT NULL AND t.state <= 3 AND NOT t.cancel_requested \
         LIMIT 1) h)) \
     AND state <= $3 AND NOT cancel_requested";

/// Finished tasks of one state (`$1`) finished by `$2`, at most `$3` of them,
/// deleted; through `offload_tasks_finished`, whose condition it states in
/// that index's words, which no other statement uses (migration 7).
pub const DELETE_FINISHED: &str = "DELETE FROM offload_tasks WHERE seq IN (SELECT seq \
     FROM offload_tasks WHERE state = $1 AND state + 0 >= 4 AND finished_at <= $2 LIMIT $3 \
     FOR UPDATE SKIP LOCKED) RETURNING queue, type";

/// The condition that finds tasks by id (`$1`, an array) among those whose
/// ids do not carry their seq, through `offload_tasks_id_not_carrying_seq`,
/// whose own condition it repeats.
pub const BY_ID_NOT_CARRYING_SEQ: &str = "id = ANY($1) AND NOT offload_id_carries_seq(id, seq)";

/// A node's keep-alive to itself on its notification channel ($1); the
/// payload ($2) is `k` and the node's id, which every node ignores.
pub const NOTIFY_KEEPALIVE: &str = "SELECT pg_notify($1, $2)";

/// The first `$1` pending tasks in claim order, across queues: their queue,
/// type and place in that order; through `offload_tasks_claim_order`,
/// without a sort of every pending task. `state + 0 = 2` is that index's
/// condition, in its words: no other statement states it, so no claim of
/// one (queue, type) walks this index for its pair's tasks (migration 6),
/// and this statement cannot read the pending tasks through
/// `offload_tasks_by_state` and sort them.
pub const CLAIM_ORDER_WINDOW: &str = "SELECT queue, type, priority, run_at, seq \
     FROM offload_tasks WHERE state + 0 = 2 ORDER BY priority DESC, run_at, seq LIMIT $1";

/// The rows of the first `$3` pending tasks of queue `$1` and type `$2` in
/// claim order that no other claim holds, locked, through
/// `offload_tasks_ready_by_type`; and in `pending_seen` how many of the
/// pair's first `$4` pending tasks there are, held or not. The count walks
/// them in claim order too: unordered, a plan made where pending tasks were
/// a third of the table counted them through a bitmap of every pending
/// task of the pair (12 ms a claim behind 100,000 of them).
pub fn first_pending_of_pair() -> String {
    format!(
        "SELECT {CANDIDATE_COLUMNS}, (SELECT count(*) FROM (SELECT 1 FROM offload_tasks \
           WHERE state = 2 AND queue = $1 AND type = $2 ORDER BY priority DESC, run_at, seq \
           LIMIT $4) AS pending) AS pending_seen \
         FROM offload_tasks WHERE state = 2 AND queue = $1 AND type = $2 \
         ORDER BY priority DESC, run_at, seq LIMIT $3 FOR UPDATE SKIP LOCKED"
    )
}

/// Up to `$3[i]` pending tasks of queue `$1[i]` of type `$2[i]` in claim
/// order, each with the `nth` (from 1) of the pair it is of; through
/// `offload_tasks_ready_by_type`.
pub const PENDING_OF_PAIRS: &str = "SELECT p.nth, c.seq, c.priority, c.run_at \
     FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS p(queue, type, walk, nth) \
     CROSS JOIN LATERAL ( \
       SELECT seq, priority, run_at FROM offload_tasks \
       WHERE state = 2 AND queue = p.queue AND type = p.type \
       ORDER BY priority DESC, run_at, seq LIMIT p.walk \
     ) c";

/// Every (queue, type) with pending tasks, in order, with its queue's
/// settings, up to `$1 + 1` of them: one short walk of
/// offload_tasks_ready_by_type per pair (a loose index scan) rather than a
/// visit of every pending task. Past `$1 + 1` pairs a claim reads a
/// window of the claim order instead ([`CLAIM_ORDER_WINDOW`]).
pub const PENDING_PAIRS: &str = "WITH RECURSIVE pending(queue, type, walked) AS ( \
       (SELECT queue, type, 1::bigint FROM offload_tasks WHERE state = 2 ORDER BY queue, type LIMIT 1) \
       UNION ALL \
       SELECT n.queue, n.type, p.walked + 1 FROM pending p CROSS JOIN LATERAL ( \
         SELECT t.queue, t.type FROM offload_tasks t \
         WHERE t.state = 2 AND (t.queue, t.type) > (p.queue, p.type) \
         ORDER BY t.queue, t.type LIMIT 1 \
       ) n WHERE p.walked <= $1 \
     ) SELECT p.queue, p.type, COALESCE(q.paused, false) AS paused, q.concurrency \
     FROM pending p LEFT JOIN offload_queues q ON q.name = p.queue \
     ORDER BY p.queue, p.type";

/// The types with pending tasks in each of the queues `$1` (an array), as
/// (queue, type) rows in no order: per queue, one short walk of
/// `offload_tasks_ready_by_type` per type (a loose index scan) rather than
/// a visit of every pending task.
pub const PENDING_TYPES_OF_QUEUES: &str = "WITH RECURSIVE pending(queue, type) AS ( \
       SELECT q.name, f.type FROM unnest($1::text[]) AS q(name) CROSS JOIN LATERAL ( \
         SELECT t.type FROM offload_tasks t WHERE t.state = 2 AND t.queue = q.name \
         ORDER BY t.type LIMIT 1 \
       ) f \
       UNION ALL \
       SELECT p.queue, n.type FROM pending p CROSS JOIN LATERAL ( \
         SELECT t.type FROM offload_tasks t WHERE t.state = 2 AND t.queue = p.queue \
         AND t.type > p.type ORDER BY t.type LIMIT 1 \
       ) n \
     ) SELECT queue, type FROM pending";

/// Takes the advisory locks `$1` in the array's order (a function scan
/// hands out its elements in order), until the transaction ends.
pub const LOCK_IN_ORDER: &str = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k";

/// An enqueue's first statement in a transaction: takes the advisory
/// locks `$4` as [`LOCK_IN_ORDER`] does, adds the queues `$1` not yet
/// known (created at `$2`), and answers `$3` new seqs. The locks come
/// first (an `InitPlan` runs before the rows it filters, and a write in a
/// `WITH` that nothing reads runs after the rest), as when they were a
/// statement of their own; the keys' holders are read by the next
/// statement, whose snapshot sees what the locks' last holder committed.
pub const LOCK_AND_TAKE_SEQS: &str = "WITH locked AS (\
       SELECT bool_and(pg_advisory_xact_lock(k) IS NOT NULL) FROM unnest($4::bigint[]) AS k), \
     queues AS (INSERT INTO offload_queues (name, created_at) \
       SELECT unnest($1::text[]), $2 ON CONFLICT DO NOTHING) \
   SELECT nextval('offload_tasks_seq_seq') FROM generate_series(1, $3) \
   WHERE (SELECT * FROM locked) IS NOT FALSE";

/// Tasks changed that one notification names at most: 180 of `s<id>,`
/// (38 bytes each) after `e<node>|` (14) stay under the 7,000 bytes a
/// notification is kept to (`tx::NOTIFY_CHUNK`).
pub const CHANGED_PER_NOTIFICATION: i64 = 180;

/// Enqueues tasks with no unique key and no dependencies, in one
/// statement and so one transaction of PostgreSQL's own, where an
/// enqueue in a transaction took five round trips (BEGIN, the seqs, the
/// rows, the counts and notifications, COMMIT): nothing is read first
/// (no key's holder, no dependency), so the seqs, the ids that carry them,
/// the rows, the counts and the notifications all fit in the statement.
///
/// `$1` the queues named, `$2` the time (ms), `$3`–`$12` the tasks'
/// columns in their order, `$13`–`$16` the count deltas, `$17` the
/// channel, `$18` the notifications known before the ids, `$19` the
/// prefix of those that name the new tasks, `$20` how many each names
/// ([`CHANGED_PER_NOTIFICATION`]). Answers the seqs, in the
/// tasks' order. Each id is [`offload_core::id_carrying_seq`] of the time
/// and the seq: the time's 48 bits, version 7, then the seq under the
/// variant's bits. The subquery that takes the seqs is not merged into
/// its callers (a volatile function stops that), so each task takes one.
pub const ENQUEUE_PLAIN: &str = "WITH queues AS (\
       INSERT INTO offload_queues (name, created_at) \
       SELECT unnest($1::text[]), $2::bigint ON CONFLICT DO NOTHING), \
     fresh AS (SELECT s.*, (lpad(to_hex($2::bigint), 12, '0') || '7000' || \
         lpad(to_hex(s.seq | (1::bigint << 63)), 16, '0'))::uuid AS id \
       FROM (SELECT nextval('offload_tasks_seq_seq') AS seq, u.* FROM (\
         SELECT * FROM UNNEST($3::text[], $4::text[], $5::text[], $6::smallint[], $7::smallint[], \
                              $8::int[], $9::int[], $10::bigint[], $11::text[], $12::text[]) \
           WITH ORDINALITY AS u(type, queue, payload, priority, state, max_attempts, timeout_secs, \
                                run_at, owner, labels, ord) \
         ORDER BY ord) u) s), \
     inserted AS (\
       INSERT INTO offload_tasks (seq, id, type, queue, payload, priority, state, attempt, \
         max_attempts, timeout_secs, run_at, owner, labels, depends_on, created_at, updated_at) \
       OVERRIDING SYSTEM VALUE \
       SELECT seq, id, type, queue, payload, priority, state, 0, max_attempts, timeout_secs, \
              run_at, owner, labels::jsonb, '{}', $2, $2 FROM fresh), \
     counted AS (\
       INSERT INTO offload_counts (queue, type, state, delta) \
       SELECT * FROM UNNEST($13::text[], $14::text[], $15::smallint[], $16::bigint[])), \
     sent AS (SELECT pg_notify($17, payload) FROM UNNEST($18::text[]) AS payload \
       UNION ALL \
       SELECT pg_notify($17, $19 || string_agg('s' || id::text, ',' ORDER BY ord)) \
       FROM fresh GROUP BY (ord - 1) / $20) \
   SELECT array_agg(seq ORDER BY ord), (SELECT count(*) FROM sent) FROM fresh";

/// The common table expressions that record what a transaction changes
/// besides rows: add the count deltas (the parameters numbered `$queues`,
/// `$types`, `$states`, `$deltas`) to the ledger, send the notifications
/// `$notes` on channel `$channel`, and find whether a running task that
/// ended was of a queue with a concurrency limit among `$freed`, sending
/// the ready notification `$ready` too if so. Named `counted`, `room` and
/// `sent`; a statement that takes them in answers `recorded!`, which
/// reads `room` and counts `sent`, and so has the notifications sent (a
/// CTE that nothing reads is not run). `tx::Unrecorded` binds the eight.
macro_rules! record_changes {
    ($queues:literal, $types:literal, $states:literal, $deltas:literal,
     $channel:literal, $notes:literal, $freed:literal, $ready:literal) => {
        concat!(
            "counted AS (INSERT INTO offload_counts (queue, type, state, delta) \
               SELECT * FROM UNNEST($",
            $queues,
            "::text[], $",
            $types,
            "::text[], $",
            $states,
            "::smallint[], $",
            $deltas,
            "::bigint[])), \
             room AS (SELECT EXISTS (SELECT 1 FROM offload_queues \
               WHERE name = ANY($",
            $freed,
            "::text[]) AND concurrency IS NOT NULL) AS freed), \
             sent AS (SELECT pg_notify($",
            $channel,
            ", payload) FROM UNNEST($",
            $notes,
            "::text[]) AS payload \
               UNION ALL SELECT pg_notify($",
            $channel,
            ", $",
            $ready,
            ") FROM room WHERE freed)"
        )
    };
}

/// The columns a statement that takes in [`record_changes!`] answers:
/// `freed`, whether a running task it ended was of a limited queue, and
/// `sent`, the notifications it sent.
macro_rules! recorded {
    () => {
        "(SELECT freed FROM room) AS freed, (SELECT count(*) FROM sent) AS sent"
    };
}

/// A commit's last statement, for what no write of the transaction
/// recorded ([`WRITE_TASK_ROWS_RECORDING_CHANGES`]): adds its count deltas
/// (`$1`–`$4`) to the ledger, sends its notifications (`$6`) on channel
/// `$5`, and answers whether a running task it ended was of a queue with a
/// concurrency limit among `$7`, sending the ready notification `$8` too
/// if so.
pub const COUNT_AND_NOTIFY: &str = concat!(
    "WITH ",
    record_changes!(1, 2, 3, 4, 5, 6, 7, 8),
    " SELECT ",
    recorded!()
);

/// [`WRITE_TASK_ROWS`] (`$1`–`$16`), with what the transaction changed so
/// far besides rows recorded as [`COUNT_AND_NOTIFY`] records it
/// (`$18`–`$25`, in its order), in the write's round trip: a transaction
/// that ends with its write (a claim, an ack, a cancel) leaves its commit
/// nothing to send first. Answers whether any task depends on the tasks
/// `$17` (an array of ids, maybe empty) that the write finishes, then
/// `recorded!`: an ack's look for blocked dependents
/// ([`BLOCKED_DEPENDENTS_OF`]) in the same round trip, where most acks
/// find none. Read after the ack locked what it finishes, as a statement
/// of its own would read it: an enqueue of a dependent locks its
/// dependencies too, so one that committed first is seen here and one
/// that comes after sees them finished.
pub const WRITE_TASK_ROWS_RECORDING_CHANGES: &str = concat!(
    "WITH written AS (",
    write_task_rows!(),
    "), ",
    record_changes!(18, 19, 20, 21, 22, 23, 24, 25),
    " SELECT EXISTS (SELECT 1 FROM offload_task_deps WHERE dep_id = ANY($17)), ",
    recorded!()
);

/// Inserts the tasks `$1` (seqs) with ids `$2` and the columns `$3`–`$12`
/// of `ops::NewTaskColumns`, unique keys `$13`, dependencies `$14` (each
/// a JSON array of ids: arrays of arrays do not unnest), errors `$15` and
/// finish times `$16`, created at `$17`; with what the transaction changed
/// so far besides rows recorded as [`COUNT_AND_NOTIFY`] records it
/// (`$18`–`$25`). Answers `recorded!`.
pub const INSERT_TASKS_RECORDING_CHANGES: &str = concat!(
    "WITH inserted AS (\
       INSERT INTO offload_tasks (seq, id, type, queue, payload, priority, state, attempt, \
         max_attempts, timeout_secs, run_at, owner, labels, unique_key, depends_on, error, \
         finished_at, created_at, updated_at) \
       OVERRIDING SYSTEM VALUE \
       SELECT u.seq, u.id, u.type, u.queue, u.payload, u.priority, u.state, 0, u.max_attempts, \
              u.timeout_secs, u.run_at, u.owner, u.labels::jsonb, u.unique_key, \
              ARRAY(SELECT jsonb_array_elements_text(u.depends_on::jsonb)::uuid), u.error, \
              u.finished_at, $17, $17 \
       FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::smallint[], \
                   $7::smallint[], $8::int[], $9::int[], $10::bigint[], $11::text[], $12::text[], \
                   $13::text[], $14::text[], $15::text[], $16::bigint[]) \
         AS u(seq, id, type, queue, payload, priority, state, max_attempts, timeout_secs, run_at, \
              owner, labels, unique_key, depends_on, error, finished_at)), ",
    record_changes!(18, 19, 20, 21, 22, 23, 24, 25),
    " SELECT ",
    recorded!()
);

/// The tasks `query` lists below seq `below`, newest first, `rows` of them
/// at most.
///
/// Each state asked for is read by a branch of its own that names it
/// literally, and the branches are merged by seq: a branch then walks
/// `offload_tasks_by_state` newest first (running tasks, which that index
/// leaves out, are few, and `offload_tasks_running` finds them). Under a
/// generic plan `state = ANY($1)` proves no partial index and gives no
/// order, so a list of finished tasks walked the primary key past every
/// newer task of another state: 15–22 ms a page behind 100,000 pending
/// tasks (`bench/lists.py`).
///
/// With `owner_first`, a list of one owner's tasks walks
/// `offload_tasks_by_owner` newest first instead, its states checked as
/// they come ([`offload_core::OWNER_LIST_STATE_WALK`]); with the states'
/// indexes at hand the plan read every task of the states and every one
/// of the owner's, 46 ms a page for an owner of 100,000 completed tasks.
pub fn list_tasks(
    query: &ListQuery,
    below: Option<i64>,
    rows: usize,
    owner_first: bool,
) -> QueryBuilder<'static, Postgres> {
    let mut sql = QueryBuilder::new("");
    push_list(&mut sql, query, below, rows, owner_first, Listing::Rows);
    sql
}

/// A window of a list with label filters (`crate::lists`): of the newest
/// [`LABEL_WALK`] tasks below `below` that [`list_tasks`] would list but
/// for the labels, those that bear them, `rows` at most, newest first.
pub fn list_newest_for_labels(
    query: &ListQuery,
    below: Option<i64>,
    rows: usize,
    owner_first: bool,
) -> QueryBuilder<'static, Postgres> {
    let mut sql = QueryBuilder::new("SELECT * FROM (");
    push_list(
        &mut sql,
        query,
        below,
        LABEL_WALK,
        owner_first,
        Listing::Unlabelled,
    );
    sql.push(") AS newest WHERE true");
    push_labels(&mut sql, &query.labels);
    sql.push(" ORDER BY seq DESC LIMIT ").push_bind(rows as i64);
    sql
}

/// Tasks a window of a list with label filters walks newest first,
/// checking their labels (`crate::lists`): a label on one task in 40
/// fills a page of 50 within one window, as fast as a list without
/// labels; a window that brings less than an eighth of what the page asks
/// for sends the list to the labels' index.
pub const LABEL_WALK: usize = 2_000;

/// Seqs a round of [`labelled_below`] reads: the tasks of the label,
/// newest first, whose other filters are then checked by primary key.
pub const LABELLED_ROUND: usize = 1_000;

/// The seqs of the tasks below `below` that bear every label of
/// `labels`, newest first, `rows` of them at most: every such task found
/// through `offload_tasks_labels`, then sorted. The materialized step
/// keeps the planner from walking the primary key in order instead, as
/// the list of a label did under a generic plan, past every task without
/// it (16–18 ms a page for 100 tasks behind 100,000 others,
/// `bench/label-lists.py`).
pub fn labelled_below(
    labels: &[(String, String)],
    below: Option<i64>,
    rows: usize,
) -> QueryBuilder<'static, Postgres> {
    let mut sql = QueryBuilder::new(
        "WITH labelled AS MATERIALIZED (SELECT seq FROM offload_tasks WHERE true",
    );
    push_labels(&mut sql, labels);
    if let Some(below) = below {
        // Spelled off the primary key, which a plan made on a small table
        // read for the range, checking the labels of every task in it.
        sql.push(" AND seq + 0 < ").push_bind(below);
    }
    sql.push(") SELECT seq FROM labelled ORDER BY seq DESC LIMIT ")
        .push_bind(rows as i64);
    sql
}

/// Those of the tasks `seqs` that `query` lists, every filter checked on
/// each, in no order: found by primary key, the owner and the labels
/// spelled so that no plan reads their indexes instead (one made on an
/// empty table read the owner's).
pub fn listed_among(query: &ListQuery, seqs: Vec<i64>) -> QueryBuilder<'static, Postgres> {
    let mut sql = QueryBuilder::new(format!(
        "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE seq = ANY("
    ));
    sql.push_bind(seqs).push(")");
    if !query.states.is_empty() {
        let codes: Vec<i16> = query.states.iter().map(|s| s.code() as i16).collect();
        sql.push(" AND state = ANY(").push_bind(codes).push(")");
    }
    // Not `owner || ''`, which proves `owner IS NOT NULL` and so let a
    // plan read all of `offload_tasks_by_owner` for the seqs.
    push_filters(&mut sql, query, " AND coalesce(owner, '') = ");
    for (key, value) in &query.labels {
        let wanted = serde_json::json!({ key: value });
        sql.push(" AND coalesce(labels, '{}') @> ")
            .push_bind(wanted)
            .push("::jsonb");
    }
    sql
}

/// Which of the tasks a list statement reads.
#[derive(Clone, Copy)]
enum Listing {
    /// Those that pass every filter.
    Rows,
    /// Those that pass every filter but the labels.
    Unlabelled,
}

/// [`list_tasks`] of the tasks `listing` says, pushed onto `sql`.
fn push_list(
    sql: &mut QueryBuilder<'static, Postgres>,
    query: &ListQuery,
    below: Option<i64>,
    rows: usize,
    owner_first: bool,
    listing: Listing,
) {
    let mut states: Vec<State> = query.states.clone();
    states.sort_unstable_by_key(|state| state.code());
    states.dedup();
    match states.as_slice() {
        [] => list_branch(sql, query, below, Listed::Every, rows, listing),
        states if owner_first => {
            list_branch(sql, query, below, Listed::Checked(states), rows, listing);
        }
        [state] => list_branch(sql, query, below, Listed::Indexed(*state), rows, listing),
        states => {
            sql.push("SELECT * FROM (");
            for (k, state) in states.iter().enumerate() {
                if k > 0 {
                    sql.push(" UNION ALL ");
                }
                sql.push("(");
                list_branch(sql, query, below, Listed::Indexed(*state), rows, listing);
                sql.push(")");
            }
            sql.push(") AS listed ORDER BY seq DESC LIMIT ")
                .push_bind(rows as i64);
        }
    }
}

/// The states a branch of a list reads.
enum Listed<'s> {
    Every,
    /// One state, through its index.
    Indexed(State),
    /// These states, checked on each task another index brings.
    Checked(&'s [State]),
}

/// The tasks of the states `listed` that `query` lists, newest first.
fn list_branch(
    sql: &mut QueryBuilder<'static, Postgres>,
    query: &ListQuery,
    below: Option<i64>,
    listed: Listed<'_>,
    rows: usize,
    listing: Listing,
) {
    sql.push(format!(
        "SELECT {TASK_COLUMNS} FROM offload_tasks WHERE true"
    ));
    if let Some(below) = below {
        sql.push(" AND seq < ").push_bind(below);
    }
    match listed {
        Listed::Every => {}
        Listed::Indexed(State::Running) => {
            sql.push(" AND state = 3");
        }
        // With offload_tasks_by_state's own condition spelled out, so the
        // planner sees that the partial index covers the branch: in words
        // no other statement uses, so that no other reads that index
        // (migration 7).
        Listed::Indexed(state) => {
            sql.push(format!(" AND state = {} AND state + 0 <> 3", state.code()));
        }
        // A parameter, which proves no partial index of states.
        Listed::Checked(states) => {
            let codes: Vec<i16> = states.iter().map(|s| s.code() as i16).collect();
            sql.push(" AND state = ANY(").push_bind(codes).push(")");
        }
    }
    // A state's branch checks the owner on each task its index brings:
    // spelled so that no plan reads offload_tasks_by_owner beside it.
    let owner = match listed {
        Listed::Indexed(_) => " AND (owner || '') = ",
        Listed::Every | Listed::Checked(_) => " AND owner = ",
    };
    push_filters(sql, query, owner);
    if let Listing::Rows = listing {
        push_labels(sql, &query.labels);
    }
    sql.push(" ORDER BY seq DESC LIMIT ").push_bind(rows as i64);
}

/// `query`'s filters of type, queue, owner (as `owner` spells it) and
/// creation time.
fn push_filters(sql: &mut QueryBuilder<'static, Postgres>, query: &ListQuery, owner: &str) {
    if let Some(t) = &query.task_type {
        sql.push(" AND type = ").push_bind(t.clone());
    }
    if let Some(q) = &query.queue {
        sql.push(" AND queue = ").push_bind(q.clone());
    }
    if let Some(o) = &query.owner {
        sql.push(owner).push_bind(o.clone());
    }
    if let Some(after) = query.created_after {
        sql.push(" AND created_at > ").push_bind(after.as_millis());
    }
    if let Some(before) = query.created_before {
        sql.push(" AND created_at < ").push_bind(before.as_millis());
    }
}

/// ` AND labels @> …` for each label of `labels`.
fn push_labels(sql: &mut QueryBuilder<'static, Postgres>, labels: &[(String, String)]) {
    for (key, value) in labels {
        let wanted = serde_json::json!({ key: value });
        sql.push(" AND labels @> ")
            .push_bind(wanted)
            .push("::jsonb");
    }
}
