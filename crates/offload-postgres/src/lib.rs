//! Offload's PostgreSQL store (`postgres://…`): several `offload serve`
//! nodes share one database, and any node serves any request.
//!
//! - Operations are transactions over a connection pool; claims take rows
//!   with `FOR UPDATE SKIP LOCKED`, so nodes never wait on each other's
//!   claims, and batches are read and written in one statement each. An
//!   enqueue of tasks with no unique key and no dependencies is a single
//!   statement, outside any transaction.
//! - Each node LISTENs on one channel: commits that make tasks ready, that
//!   schedule, cancel or change tasks NOTIFY it, so a long poll on one node
//!   wakes for a task enqueued on another.
//! - One node at a time holds a session advisory lock and is the leader,
//!   which runs the background duties; when it dies its session ends, the
//!   lock with it, and another node takes over within a second.
//! - Every operation runs within a time limit, and a connection given up
//!   on is closed, never handed back to the pool (`session.rs`).
//!
//! The schema and the reasons for its shape are in `migrations/`.

mod clock;
mod connect;
mod ids;
mod lists;
mod notify;
mod ops;
mod rows;
mod session;
pub mod sql;
mod tx;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use offload_core::{
    Ack, AckOutcome, Backoff, Claim, ClaimRequest, ClearRequest, Clock, Counts, Error,
    HeartbeatAck, HeartbeatRequest, Hub, Limits, ListQuery, PromoteReport, QueueInfo, QueuePatch,
    Result, Retention, State, Stats, Store, SystemClock, Task, TaskPage, TaskSpec, decode_cursor,
    encode_cursor, validate_queue_name, validate_worker_id,
};
use sqlx::postgres::PgPool;
use sqlx::{Connection, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::connect::{Connector, connect_options};
use crate::rows::{PgError, storage_error};
use crate::session::on_session;
use crate::tx::Tx;

/// Versioned migrations, recorded in `offload_schema_migrations`.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_fewer_index_writes.sql")),
    (3, include_str!("../migrations/0003_ids_carry_seq.sql")),
    (4, include_str!("../migrations/0004_count_totals.sql")),
    (5, include_str!("../migrations/0005_claim_order.sql")),
    (6, include_str!("../migrations/0006_claim_order_apart.sql")),
    (
        7,
        include_str!("../migrations/0007_state_indexes_apart.sql"),
    ),
];
/// Running tasks whose leases expired by `$1`, and whether the database
/// takes writes, for `/health`.
const STUCK_AND_READ_ONLY: &str = "SELECT COUNT(*), current_setting('transaction_read_only') = 'on' \
     FROM offload_tasks WHERE state = 3 AND lease_expires_at <= $1";
/// A write that changes nothing: a row of the counts ledger that counts
/// nothing (`stats` skips it, and the leader's folding drops it).
const PROBE_WRITE: &str =
    "INSERT INTO offload_counts (queue, type, state, delta) VALUES ('', '', 1, 0)";
/// Every count as rows of (queue, type, state, n): the folded totals and
/// the ledger's rows appended since the leader last folded it.
const COUNT_ROWS: &str = "SELECT queue, type, state, n FROM offload_count_totals \
     UNION ALL SELECT queue, type, state, delta FROM offload_counts";
/// Moves the ledger's rows into the totals, one row per (queue, type,
/// state), touching only the totals of the pairs the ledger names. Rows
/// committed meanwhile are not in this statement's snapshot and stay for
/// the next pass.
const FOLD_COUNTS: &str = "WITH moved AS (DELETE FROM offload_counts RETURNING queue, type, state, delta) \
     INSERT INTO offload_count_totals AS totals (queue, type, state, n) \
     SELECT queue, type, state, SUM(delta) FROM moved \
     GROUP BY queue, type, state HAVING SUM(delta) <> 0 \
     ON CONFLICT (queue, type, state) DO UPDATE SET n = totals.n + EXCLUDED.n";
/// The totals a fold brought to nothing.
const DROP_EMPTIED_TOTALS: &str = "DELETE FROM offload_count_totals WHERE n = 0";
/// Attempts at an operation that keeps meeting serialization failures.
const MAX_TRIES: u32 = 5;
/// Rows deleted per transaction by `clear`.
const CLEAR_BATCH: i64 = 5000;
/// How long `open` waits for the node's LISTEN.
const LISTEN_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct PgOptions {
    /// The schema Offload's tables live in; several Offload installations
    /// may share a database in different schemas.
    pub schema: String,
    pub max_connections: u32,
    pub limits: Limits,
    pub backoff: Backoff,
    /// The node's clock.
    pub clock: Arc<dyn Clock>,
    /// Reads time as the database's, through `clock` and an offset measured
    /// every 30 s, so nodes whose clocks disagree still agree on leases,
    /// timeouts and `run_at` (`clock.rs`). Tests that drive `clock` turn
    /// it off.
    pub follow_database_clock: bool,
    /// How often the node sends a notification to itself over the
    /// database. Its notification connection is otherwise quiet for as long
    /// as nothing happens, and a NAT or firewall that forgets a quiet
    /// connection, or a database host gone without a word, leaves it open
    /// and silent for good: the node would hear no other node again. One
    /// that carries nothing, not even these, for three of them is replaced.
    pub listener_keepalive: Duration,
    /// How long one operation (a transaction, or a read) may wait for
    /// PostgreSQL before it fails as out of reach (HTTP 503) and its
    /// connection is closed; see `session.rs`. An operation given up while
    /// its COMMIT was on the way may still have taken effect, as after any
    /// lost connection. Long enough for the largest batch to be written.
    pub operation_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            schema: "public".into(),
            max_connections: 16,
            limits: Limits::default(),
            backoff: Backoff::default(),
            clock: Arc::new(SystemClock),
            follow_database_clock: true,
            listener_keepalive: Duration::from_secs(15),
            operation_timeout: Duration::from_secs(60),
        }
    }
}

/// What the store's parts share.
#[derive(Debug)]
pub(crate) struct Node {
    /// Tells this node's notifications from the others'.
    pub id: String,
    pub channel: String,
    pub lock_key: i64,
    pub clock: Arc<clock::NodeClock>,
    pub hub: Hub,
    pub limits: Limits,
    pub backoff: Backoff,
    pub leader: AtomicBool,
    /// `PgOptions::operation_timeout`.
    pub operation_timeout: Duration,
    /// Tasks this node's commits finished, for the metrics.
    pub finished: offload_core::FinishedTally,
    /// Why this node's last write failed, until one that changes tasks
    /// goes through (see `count_stuck`).
    pub write_failure: offload_core::WriteFailure,
}

#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    node: Arc<Node>,
    stop: CancellationToken,
    heartbeats: Arc<Gather<Heartbeats>>,
    enqueues: Arc<Gather<Enqueues>>,
    checked_enqueues: Arc<Gather<CheckedEnqueues>>,
    claims: Arc<Gather<Claims>>,
    acks: Arc<Gather<Acks>>,
}

/// How long an operation waits for a connection of the pool's.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A stable 64-bit key for advisory locks, from a name.
pub(crate) fn lock_key(name: &str) -> i64 {
    // FNV-1a: stable across builds, unlike the std hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash as i64
}

impl PgStore {
    /// Connects, migrates the schema (one node at a time) and starts
    /// listening and competing for leadership.
    pub async fn open(url: &str, options: PgOptions) -> Result<Arc<Self>> {
        let schema = options.schema.clone();
        check_schema_name(&schema)?;
        let connector = Connector::new(url, &schema, options.operation_timeout)?;
        let most_connections = options.max_connections.max(2);
        let pool = match connector
            .pool()
            .max_connections(most_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(connector.options.clone())
            .await
        {
            Ok(pool) => pool,
            // The pool retries a refused connection until its timeout and
            // then says only that it timed out; one connection of its own
            // says why.
            Err(sqlx::Error::PoolTimedOut) => {
                let why = match connect::probe(&connector.options, Duration::from_secs(5)).await {
                    connect::Probe::Refused(e) => e.to_string(),
                    connect::Probe::Opened => "it answered only after 5 s".to_owned(),
                    connect::Probe::Silent => "no answer".to_owned(),
                };
                return Err(Error::storage_unavailable(format_args!(
                    "cannot connect to PostgreSQL at {}:{} for 5 s: {why}",
                    connector.options.get_host(),
                    connector.options.get_port()
                )));
            }
            Err(e) => return Err(storage_error(e)),
        };
        migrate(pool.clone(), schema.clone()).await?;
        warn_without_autovacuum(&pool).await;
        warn_when_connections_may_run_out(&pool, most_connections).await;
        let follows_database = options.follow_database_clock;
        let clock = Arc::new(clock::NodeClock::new(options.clock));
        if follows_database {
            clock::follow_once(&clock, &pool).await;
        }
        let unique = Uuid::now_v7().simple().to_string();
        let node = Arc::new(Node {
            id: unique[unique.len() - 12..].to_owned(),
            channel: format!("offload_{schema}"),
            lock_key: lock_key(&format!("offload-leader:{schema}")),
            clock: Arc::clone(&clock),
            hub: Hub::new(),
            limits: options.limits,
            backoff: options.backoff,
            leader: AtomicBool::new(false),
            operation_timeout: options.operation_timeout,
            finished: offload_core::FinishedTally::default(),
            write_failure: offload_core::WriteFailure::default(),
        });
        let stop = CancellationToken::new();
        let writes = || Writes::new(pool.clone(), Arc::clone(&node));
        let store = Arc::new(Self {
            pool: pool.clone(),
            node: Arc::clone(&node),
            stop: stop.clone(),
            heartbeats: Arc::new(Gather::new(Heartbeats(writes()))),
            enqueues: Arc::new(Gather::new(Enqueues(writes()))),
            checked_enqueues: Arc::new(Gather::new(CheckedEnqueues(writes()))),
            claims: Arc::new(Gather::new(Claims(writes()))),
            acks: Arc::new(Gather::new(Acks(writes()))),
        });
        if follows_database {
            tokio::spawn(clock::follow(clock, pool.clone(), stop.clone()));
        }
        let (listening, listens) = tokio::sync::oneshot::channel();
        tokio::spawn(notify::listen(
            Arc::clone(&node),
            Arc::downgrade(&store),
            pool,
            connector.clone(),
            options.listener_keepalive,
            stop.clone(),
            listening,
        ));
        tokio::spawn(notify::lead(node, connector, stop));
        // A node that has opened hears what other nodes do from then on.
        // Without a LISTEN within the bound it works all the same, on the
        // engine's fallback poll, and keeps trying to listen.
        if tokio::time::timeout(LISTEN_WAIT, listens).await.is_err() {
            tracing::warn!("not listening for other nodes' notifications yet; going on");
        }
        Ok(store)
    }

    async fn begin(&self) -> Result<Tx, PgError> {
        Tx::begin(&self.pool, &self.node).await
    }

    /// Stops listening and leading; the pool closes when the store drops.
    pub fn close(&self) {
        self.stop.cancel();
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Every claim and completion leaves a dead version of its task's row, and
/// every finished task retention deletes leaves its row dead: only vacuum
/// reclaims them. Without autovacuum the tables and the claims' index walks
/// grow for as long as the server runs, so the operator hears it once, at
/// start. A server whose setting cannot be read says nothing.
async fn warn_without_autovacuum(pool: &PgPool) {
    const AUTOVACUUM: &str = "SELECT current_setting('autovacuum')";
    if let Ok(setting) = sqlx::query_scalar::<_, String>(AUTOVACUUM)
        .fetch_one(pool)
        .await
        && setting == "off"
    {
        tracing::warn!(
            "PostgreSQL's autovacuum is off: the dead row versions that claims, completions \
             and retention leave are never reclaimed unless VACUUM runs some other way, and \
             Offload's tables and queries slow as they grow; set autovacuum = on"
        );
    }
}

/// Connections left for the node: under `max_connections`, less the
/// slots kept for superusers where the role is not one, and under the
/// role's own connection limit, less what is open. A server whose figures
/// cannot be read answers nothing.
const CONNECTION_ROOM: &str = "\
    WITH role AS (SELECT rolsuper, rolconnlimit FROM pg_roles WHERE rolname = current_user), \
         open AS (SELECT count(*) FILTER (WHERE backend_type = 'client backend') AS all_roles, \
                         count(*) FILTER (WHERE usename = current_user) AS this_role \
                  FROM pg_stat_activity) \
    SELECT least( \
        current_setting('max_connections')::int - open.all_roles::int \
          - CASE WHEN role.rolsuper THEN 0 ELSE \
              current_setting('superuser_reserved_connections')::int \
              + coalesce(current_setting('reserved_connections', true)::int, 0) END, \
        CASE WHEN role.rolconnlimit < 0 THEN 2147483647 \
             ELSE role.rolconnlimit - open.this_role::int END), \
      current_setting('max_connections')::int \
    FROM role, open";

/// Each node may open its pool's connections and two more (its listener
/// and its leader's). When PostgreSQL has less room than that, the nodes'
/// pools together outgrow it: a node then works with the connections it
/// got, its requests waiting for one another frees, and failing 503 when
/// none comes free in time. The operator hears it once, at start, with the
/// figures to size by.
async fn warn_when_connections_may_run_out(pool: &PgPool, most: u32) {
    let Ok((room, max)) = sqlx::query_as::<_, (i32, i32)>(CONNECTION_ROOM)
        .fetch_one(pool)
        .await
    else {
        return;
    };
    let more = i64::from(most + 2) - i64::from(pool.size());
    if i64::from(room) < more {
        tracing::warn!(
            room,
            max_connections = max,
            db_pool_size = most,
            "PostgreSQL has room for {room} more connections and this node may open {more} \
             more (db_pool_size {most}, its listener and its leader's): past the room, requests \
             wait for a connection another frees and fail 503 when none comes free within {}s; \
             lower db_pool_size (each node's) or raise max_connections",
            ACQUIRE_TIMEOUT.as_secs()
        );
    }
}

/// Schema names go into statements as they are, so only plain ones pass.
fn check_schema_name(schema: &str) -> Result<()> {
    if schema.is_empty()
        || !schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(Error::invalid(
            "schema",
            "must be lowercase letters, digits and _",
        ));
    }
    Ok(())
}

/// How long [`drop_schema`] waits for a table lock before it gives up.
const DROP_LOCK_WAIT: &str = "10s";

/// Drops `schema` with every table in it: for installations made to be
/// thrown away, such as `offload bench`'s. `public`, where an installation
/// without a schema of its own lives, is refused.
pub async fn drop_schema(url: &str, schema: &str) -> Result<()> {
    check_schema_name(schema)?;
    if schema == "public" {
        return Err(Error::invalid("schema", "public is never dropped"));
    }
    // A node that was just killed may still hold locks until its backend
    // notices; waiting forever for one would hang the caller.
    let mut conn = sqlx::PgConnection::connect_with(&connect_options(url)?)
        .await
        .map_err(storage_error)?;
    sqlx::raw_sql(&format!(
        "SET lock_timeout = '{DROP_LOCK_WAIT}'; DROP SCHEMA IF EXISTS {schema} CASCADE"
    ))
    .execute(&mut conn)
    .await
    .map_err(storage_error)?;
    conn.close().await.map_err(storage_error)
}

async fn migrate(pool: PgPool, schema: String) -> Result<()> {
    let fail = |e: sqlx::Error| Error::Storage(format!("migrating the PostgreSQL schema: {e}"));
    let mut lock = pool.acquire().await.map_err(storage_error)?;
    let key = lock_key(&format!("offload-migrate:{schema}"));
    // One node migrates at a time; the others wait, then find it done. The
    // lock comes before the schema too: nodes started together on a new
    // one would each find it missing, and all but one fail to create it
    // (CREATE SCHEMA IF NOT EXISTS is no guard against a concurrent one).
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *lock)
        .await
        .map_err(fail)?;
    let outcome = async {
        create_schema(&mut lock, &schema).await?;
        apply_migrations(pool.clone()).await
    }
    .await
    .map_err(fail);
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *lock)
        .await;
    let current = outcome?;
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > latest {
        return Err(Error::Storage(format!(
            "the database has schema version {current}, newer than this Offload knows ({latest})"
        )));
    }
    Ok(())
}

/// Creates `schema` if it is missing. CREATE SCHEMA asks for the right to
/// create in the database even when the schema is there, IF NOT EXISTS or
/// not: a role that was given a schema of its own (or `public`) and
/// nothing more could not start. So only a missing schema is created.
async fn create_schema(conn: &mut sqlx::PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Applies the migrations the database lacks, each in its own transaction;
/// answers the version found before.
async fn apply_migrations(pool: PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS offload_schema_migrations \
         (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    let current: Option<i32> =
        sqlx::query_scalar("SELECT MAX(version) FROM offload_schema_migrations")
            .fetch_one(&pool)
            .await?;
    let current = current.unwrap_or(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let mut tx = pool.begin().await?;
        // Several statements: the simple query protocol runs them all.
        sqlx::Executor::execute(&mut *tx, *sql).await?;
        sqlx::query("INSERT INTO offload_schema_migrations (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(current)
}

/// The error of a write given up on; one that found the database out of
/// reach is noted as the node's write failure, which `/health` reports.
fn given_up(node: &Node, e: PgError) -> Error {
    let e = e.into_core();
    if matches!(e, Error::Unavailable(_)) {
        node.write_failure.note(Some(&e));
    }
    e
}

/// Runs `$body` (which uses `$tx`) in a transaction, commits, announces the
/// effects, and runs it again in a fresh transaction when it met a
/// serialization failure, a deadlock or a unique-key race.
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut tries = 0;
        loop {
            tries += 1;
            let outcome = crate::session::within($store.node.operation_timeout, async {
                let mut $tx = $store.begin().await?;
                let done = async { Ok::<_, PgError>($body) }.await;
                match done {
                    Ok(value) => {
                        $tx.commit().await?;
                        Ok::<_, PgError>(value)
                    }
                    Err(e) => {
                        // Dropped, the transaction would end with its
                        // connection's close, which the server may read
                        // only after this answer: a claim right after
                        // would skip the rows it locked.
                        $tx.rollback().await;
                        Err(e)
                    }
                }
            })
            .await;
            match outcome {
                Ok(value) => break Ok(value),
                Err(PgError::Retry(_)) if tries < MAX_TRIES => continue,
                Err(e) => break Err(crate::given_up(&$store.node, e)),
            }
        }
    }};
}

/// Enqueues `specs`, each [`ops::is_plain`], in the one statement of
/// [`ops::enqueue_plain`], and announces them once it has answered; again
/// when it met a serialization failure or a deadlock, as [`in_tx!`] does.
/// On a task of its own, as a commit is ([`Tx::commit`]): a caller gone
/// while the statement's answer is on its way would leave tasks written
/// and never announced, and a worker waiting for them asleep.
pub(crate) async fn enqueue_plain(
    pool: &PgPool,
    node: &Arc<Node>,
    specs: Vec<TaskSpec>,
) -> Result<Vec<(Task, bool)>> {
    let specs = Arc::new(specs);
    let mut tries = 0;
    loop {
        tries += 1;
        let (pool, writer, specs) = (pool.clone(), Arc::clone(node), Arc::clone(&specs));
        let written = tokio::spawn(session::within(node.operation_timeout, async move {
            let mut session = session::Session::acquire(&pool)
                .await
                .map_err(PgError::Core)?;
            let (created, changes) = ops::enqueue_plain(&mut session, &writer, &specs).await?;
            session.settle();
            changes.publish(&writer);
            Ok(created)
        }))
        .await
        .map_err(|e| Error::Storage(format!("enqueueing: {e}")))?;
        match written {
            Ok(created) => return Ok(created),
            Err(PgError::Retry(_)) if tries < MAX_TRIES => {}
            Err(e) => return Err(given_up(node, e)),
        }
    }
}

// After `in_tx!`, which it uses.
mod gather;
use gather::{Acks, CheckedEnqueues, Claims, Enqueues, Gather, Heartbeats, Writes};

#[async_trait::async_trait]
impl Store for PgStore {
    async fn enqueue(&self, mut tasks: Vec<TaskSpec>) -> Result<Vec<(Task, bool)>> {
        self.node.limits.check_batch("tasks", tasks.len())?;
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        if tasks.iter().all(ops::is_plain) {
            if let [_] = &tasks[..]
                && let Some(alone) = tasks.pop()
            {
                return Ok(vec![self.enqueues.send(alone).await?]);
            }
            return enqueue_plain(&self.pool, &self.node, tasks).await;
        }
        if let [_] = &tasks[..]
            && let Some(alone) = tasks.pop()
        {
            return Ok(vec![self.checked_enqueues.send(alone).await?]);
        }
        in_tx!(self, |tx| ops::enqueue(&mut tx, tasks.clone()).await?)
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Task>> {
        Ok(self.claim_telling_more(request).await?.tasks)
    }

    /// Claims at once, never parked, telling waiting fetches whether the
    /// claim left ready tasks behind.
    async fn claim_or_park(&self, request: &ClaimRequest) -> Result<Claim> {
        let ops::Claimed { tasks, more } = self.claim_telling_more(request).await?;
        Ok(Claim::Now { tasks, more })
    }

    async fn heartbeat(&self, request: HeartbeatRequest) -> Result<HeartbeatAck> {
        validate_worker_id(&request.worker_id)?;
        self.heartbeats.send(request).await
    }

    async fn ack(&self, worker_id: &str, mut acks: Vec<Ack>) -> Result<Vec<AckOutcome>> {
        validate_worker_id(worker_id)?;
        self.node.limits.check_batch("acks", acks.len())?;
        if acks.len() == 1
            && let Some(alone) = acks.pop()
        {
            let outcome = self.acks.send((worker_id.to_owned(), alone)).await?;
            return Ok(vec![outcome]);
        }
        in_tx!(self, |tx| ops::ack(&mut tx, worker_id, acks.clone())
            .await?)
    }

    async fn cancel(&self, id: Uuid) -> Result<Task> {
        in_tx!(self, |tx| ops::cancel(&mut tx, id).await?)
    }

    async fn retry(&self, id: Uuid) -> Result<Task> {
        in_tx!(self, |tx| ops::retry(&mut tx, id).await?)
    }

    async fn get(&self, id: Uuid) -> Result<Option<Task>> {
        let mut found = on_session!(self, |conn| ids::find(conn, &[id], ids::Lock::None).await?)?;
        Ok(found.remove(&id).map(|s| s.task))
    }

    async fn list(&self, query: &ListQuery) -> Result<TaskPage> {
        query.check_limit()?;
        let below = query.cursor.as_deref().map(decode_cursor).transpose()?;
        let owner_first = query.owner.is_some()
            && !query.states.is_empty()
            && self.tasks_in(&query.states).await? > offload_core::OWNER_LIST_STATE_WALK;
        let (tasks, more) = on_session!(self, |conn| {
            if query.labels.is_empty() {
                lists::page(conn, query, below, owner_first).await?
            } else {
                lists::labelled_page(conn, query, below, owner_first).await?
            }
        })?;
        Ok(page_of(tasks, more))
    }

    async fn stats(&self) -> Result<Stats> {
        let rows = on_session!(self, |conn| sqlx::query(&format!(
            "SELECT queue, type, state, SUM(n)::bigint AS n FROM ({COUNT_ROWS}) AS counts \
             GROUP BY queue, type, state HAVING SUM(n) <> 0"
        ))
        .fetch_all(conn)
        .await?)?;
        let mut stats = Stats::default();
        for row in &rows {
            let queue: String = row.try_get("queue").map_err(storage_error)?;
            let task_type: String = row.try_get("type").map_err(storage_error)?;
            let (state, n) = state_count(row)?;
            *stats.total.slot(state) += n;
            *stats.queues.entry(queue).or_default().slot(state) += n;
            *stats.types.entry(task_type).or_default().slot(state) += n;
        }
        Ok(stats)
    }

    async fn totals(&self) -> Result<Counts> {
        let rows = on_session!(self, |conn| sqlx::query(&format!(
            "SELECT state, SUM(n)::bigint AS n FROM ({COUNT_ROWS}) AS counts GROUP BY state"
        ))
        .fetch_all(conn)
        .await?)?;
        let mut total = Counts::default();
        for row in &rows {
            let (state, n) = state_count(row)?;
            *total.slot(state) += n;
        }
        Ok(total)
    }

    async fn delete(&self, id: Uuid) -> Result<()> {
        in_tx!(self, |tx| ops::delete(&mut tx, id).await?)
    }

    async fn clear(&self, request: &ClearRequest) -> Result<u64> {
        request.check_states()?;
        let cutoff = {
            let now = self.node.clock.now();
            request.older_than.map_or(now, |d| now.saturating_sub(d))
        };
        let mut total = 0;
        for state in &request.states {
            loop {
                let deleted = in_tx!(self, |tx| ops::delete_finished(
                    &mut tx,
                    *state,
                    cutoff,
                    CLEAR_BATCH
                )
                .await?)?;
                total += deleted;
                if deleted < CLEAR_BATCH as u64 {
                    break;
                }
            }
        }
        Ok(total)
    }

    async fn queues(&self) -> Result<Vec<QueueInfo>> {
        let rows = on_session!(self, |conn| sqlx::query(
            "SELECT name, paused, concurrency FROM offload_queues ORDER BY name"
        )
        .fetch_all(conn)
        .await?)?;
        let stats = self.stats().await?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get("name").map_err(storage_error)?;
                let concurrency: Option<i32> = row.try_get("concurrency").map_err(storage_error)?;
                Ok(QueueInfo {
                    counts: stats.queues.get(&name).copied().unwrap_or_default(),
                    paused: row.try_get("paused").map_err(storage_error)?,
                    concurrency: concurrency.map(|c| c as u32),
                    name,
                })
            })
            .collect()
    }

    async fn update_queue(&self, name: &str, patch: QueuePatch) -> Result<QueueInfo> {
        validate_queue_name("name", name)?;
        let mut info = in_tx!(self, |tx| ops::update_queue(&mut tx, name, patch.clone())
            .await?)?;
        info.counts = self
            .stats()
            .await?
            .queues
            .get(name)
            .copied()
            .unwrap_or_default();
        Ok(info)
    }

    async fn promote_due(&self) -> Result<PromoteReport> {
        in_tx!(self, |tx| ops::promote_due(&mut tx).await?)
    }

    async fn recover_expired(&self) -> Result<Vec<Task>> {
        in_tx!(self, |tx| ops::recover_expired(&mut tx).await?)
    }

    async fn purge_finished(&self, retention: &Retention, batch: usize) -> Result<u64> {
        let mut purged = 0;
        for state in State::FINISHED {
            let Some(keep) = retention.for_state(state) else {
                continue;
            };
            let cutoff = self.node.clock.now().saturating_sub(keep);
            purged += in_tx!(self, |tx| ops::delete_finished(
                &mut tx,
                state,
                cutoff,
                batch as i64
            )
            .await?)?;
        }
        self.compact_counts().await?;
        Ok(purged)
    }

    fn take_finished(&self) -> Vec<(String, String, offload_core::Finished)> {
        self.node.finished.take()
    }

    async fn count_stuck(&self, expired_for: Duration) -> Result<u64> {
        if self.node.write_failure.current().is_some() {
            // Only a write tells whether writes go through again (a disk
            // that had filled may have room now): a row of the counts
            // ledger that counts nothing, committed as an enqueue's are.
            on_session!(self, |conn| sqlx::query(PROBE_WRITE).execute(conn).await?)
                .map_err(|e| Error::Unavailable(format!("writes fail: {e}")))?;
            self.node.write_failure.note(None);
        }
        let cutoff = self
            .node
            .clock
            .now()
            .saturating_sub(expired_for)
            .as_millis();
        // A database that has turned read-only (a primary demoted to a
        // standby, default_transaction_read_only switched on) answers
        // reads; it says so before a write fails.
        let (stuck, read_only): (i64, bool) =
            on_session!(self, |conn| sqlx::query_as(STUCK_AND_READ_ONLY)
                .bind(cutoff)
                .fetch_one(conn)
                .await?)?;
        if read_only {
            return Err(Error::Unavailable(
                "writes fail: the database is read-only (a standby, or default_transaction_read_only is on)".into(),
            ));
        }
        Ok(stuck as u64)
    }

    fn is_leader(&self) -> bool {
        self.node.leader.load(Ordering::SeqCst)
    }

    fn hub(&self) -> &Hub {
        &self.node.hub
    }
}

impl PgStore {
    /// How many tasks the database holds in `states`, from its counts.
    async fn tasks_in(&self, states: &[State]) -> Result<u64> {
        Ok(self.totals().await?.in_states(states))
    }

    /// Folds the counts ledger into the totals ([`FOLD_COUNTS`]), then
    /// deletes the totals it brought to nothing. Two statements, not one
    /// transaction: a pass cut between them leaves rows of nothing, which
    /// count nothing and the next pass deletes.
    async fn compact_counts(&self) -> Result<()> {
        on_session!(self, |conn| {
            sqlx::query(FOLD_COUNTS).execute(&mut *conn).await?;
            sqlx::query(DROP_EMPTIED_TOTALS).execute(conn).await?
        })?;
        Ok(())
    }

    async fn claim_telling_more(&self, request: &ClaimRequest) -> Result<ops::Claimed> {
        validate_worker_id(&request.worker_id)?;
        for (i, queue) in request.queues.iter().enumerate() {
            validate_queue_name(format_args!("queues[{i}]"), queue)?;
        }
        if request.limit <= Claims::FEW_TASKS {
            return self.claims.send(request.clone()).await;
        }
        in_tx!(self, |tx| ops::claim(&mut tx, request).await?)
    }
}

/// The page of `tasks`, newest first, with a cursor past the last when
/// `more` tells that another page follows.
fn page_of(tasks: Vec<rows::StoredTask>, more: bool) -> TaskPage {
    let next_cursor = if more {
        tasks.last().map(|last| encode_cursor(last.seq))
    } else {
        None
    };
    TaskPage {
        tasks: tasks.into_iter().map(|s| s.task).collect(),
        next_cursor,
    }
}

/// A row of the counts ([`COUNT_ROWS`]) summed by state: its `state` and its count
/// `n` (a sum of deltas, never below nothing).
fn state_count(row: &sqlx::postgres::PgRow) -> Result<(State, u64)> {
    let code: i16 = row.try_get("state").map_err(storage_error)?;
    let n: i64 = row.try_get("n").map_err(storage_error)?;
    let state = State::from_code(code.into())
        .ok_or_else(|| Error::Storage(format!("state code {code}")))?;
    Ok((state, n.max(0) as u64))
}
