//! Offload's embedded SQLite store, the default backend (`sqlite://PATH`).
//!
//! Shape: one writer thread owns the only write connection and group-commits
//! (see `writer.rs`); reads go to a small pool of read-only connections;
//! task counts live in memory, loaded once at open and changed after each
//! commit. A lock file keeps a second process from opening the same
//! database, which the single-writer design relies on.
//!
//! Durability (SPEC §1.6): the database runs in WAL mode, and in durable
//! mode each group's commit is fsynced before any of its callers is
//! answered: a lone operation with SQLite's own fsync, a group of several
//! by a thread of its own that syncs the WAL for every commit made since
//! its last, while the writer goes on (see `wal_sync.rs`).
//! [`Durability::Relaxed`] skips that fsync: a commit survives a crash of
//! the process but not a power cut.

mod append_set;
mod backup;
mod checkpoint;
mod claims;
mod ids;
mod ops;
mod pair_names;
mod pending_rows;
mod queue_rules;
mod read;
mod ready;
mod row_writes;
mod rows;
mod running;
mod seq_map;
mod shaped;
pub mod sql;
mod wal_sync;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use offload_core::{
    Ack, AckOutcome, Backoff, Claim, ClaimRequest, ClearRequest, Clock, Counts, Error,
    HeartbeatAck, HeartbeatRequest, Hub, Limits, ListQuery, PromoteReport, QueueInfo, QueuePatch,
    Result, Retention, State, Stats, Store, SystemClock, Task, TaskPage, TaskSpec, Tentative,
    validate_queue_name, validate_worker_id,
};
use rusqlite::{Connection, OptionalExtension};
use uuid::Uuid;

pub use crate::backup::{BackupError, BackupReport, backup};
use crate::read::Readers;
use crate::ready::ReadyIndex;
use crate::rows::storage_error;
use crate::running::RunningSet;
use crate::wal_sync::WalSync;
use crate::writer::{CountsMap, Shared, Writer};

/// The writer connection's page cache, in KiB (see where it is set).
const WRITER_CACHE_KIB: u32 = 8 * 1024;
/// Prepared statements the writer connection keeps.
const WRITER_STATEMENT_CACHE: usize = 128;

/// Versioned migrations; `PRAGMA user_version` records the last applied.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_fewer_index_writes.sql")),
    (3, include_str!("../migrations/0003_ready_in_memory.sql")),
    (4, include_str!("../migrations/0004_ids_carry_seq.sql")),
    (5, include_str!("../migrations/0005_running_in_memory.sql")),
    (
        6,
        include_str!("../migrations/0006_pending_in_memory_only.sql"),
    ),
    (7, include_str!("../migrations/0007_claims.sql")),
    (8, include_str!("../migrations/0008_label_index.sql")),
    (9, include_str!("../migrations/0009_payloads_apart.sql")),
];

/// Rows deleted per transaction by `clear`.
const CLEAR_BATCH: usize = 5000;

/// Whether a commit waits for fsync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// fsync before answering: survives a power cut.
    #[default]
    Durable,
    /// No fsync per commit: survives a crash of the process, not of the
    /// machine.
    Relaxed,
}

#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub durability: Durability,
    pub limits: Limits,
    pub backoff: Backoff,
    pub clock: Arc<dyn Clock>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Durable,
            limits: Limits::default(),
            backoff: Backoff::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

#[derive(Debug)]
pub struct SqliteStore {
    shared: Arc<Shared>,
    writer: Writer,
    readers: Arc<Readers>,
    durability: Durability,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let wal_sync = match options.durability {
            Durability::Durable => Some(wal_sync::wal_file_sync(path.clone())),
            Durability::Relaxed => None,
        };
        Self::open_with_wal_sync(path, options, wal_sync)
    }

    /// [`SqliteStore::open`] with the fsync that durable mode's answers wait
    /// for given (`wal_sync.rs`); tests give one they control.
    pub(crate) fn open_with_wal_sync(
        path: PathBuf,
        options: SqliteOptions,
        wal_sync: Option<WalSync>,
    ) -> Result<Self> {
        let lock = lock_database(&path)?;
        // Only the writer thread ever uses this connection, so SQLite's own
        // per-call locking is pure cost.
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(storage_error)?;
        // Durable mode migrates with SQLite's own fsync at each commit; after
        // that the connection starts without one, and the writer chooses
        // per group how its commit is synced (`wal_sync.rs`).
        let synchronous = match options.durability {
            Durability::Durable => "FULL",
            Durability::Relaxed => "NORMAL",
        };
        debug_assert_eq!(
            wal_sync.is_some(),
            options.durability == Durability::Durable,
            "durable mode, and only it, syncs the WAL before answering"
        );
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(storage_error)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Storage(format!(
                "{} cannot use WAL mode (got {mode})",
                path.display()
            )));
        }
        // The writer's page cache is kept small on purpose. When a B-tree
        // page splits, SQLite parks a page under the lock-byte page number
        // (262,145) for a moment, and the commit that follows then walks the
        // whole cache to drop pages past the end of the database: the cost
        // of every such commit grows with the cache. With 64 MiB (16k pages)
        // that walk took 0.4–1 ms per commit once a million tasks were
        // stored; 8 MiB keeps it small, and pages it misses come from the OS
        // page cache (bench/HISTORY.md).
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA busy_timeout = 5000; \
             PRAGMA cache_size = -{WRITER_CACHE_KIB}; PRAGMA temp_store = MEMORY;"
        ))
        .map_err(storage_error)?;
        migrate(&conn)?;
        // The writer decides where its checkpoints run (`checkpoint.rs`).
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0;")
            .map_err(storage_error)?;
        // Room for the writer's own statements and the batched row writes'
        // shapes (row_writes.rs), so that none is prepared again and again.
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
        // The writer prepares these again on its thread; a failure here has
        // a caller to answer.
        drop(writer::HotStatements::prepare(&conn)?);
        write_unwritten_claims(&conn)?;
        let (counts, ready, running) = load_memory(&conn)?;
        let shared = Arc::new(Shared {
            clock: options.clock,
            hub: Hub::new(),
            counts: Mutex::new(counts),
            backoff: options.backoff,
            limits: options.limits,
            parked: Mutex::new(Vec::new()),
            pending: ready.pending_seqs(),
            running,
            unwritten: Arc::default(),
            writes_stopped: std::sync::OnceLock::new(),
            write_failure: offload_core::WriteFailure::default(),
            database_file: std::fs::File::open(&path)
                .map_err(|e| Error::Storage(format!("cannot open {}: {e}", path.display())))?,
            database_path: path.clone(),
            wal_syncs: std::sync::atomic::AtomicU64::new(0),
            finished: offload_core::FinishedTally::default(),
        });
        let writer = Writer::start(conn, lock, &path, Arc::clone(&shared), ready, wal_sync)
            .map_err(|e| Error::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            shared,
            writer,
            readers: Readers::new(path),
            durability: options.durability,
        })
    }

    /// How many tasks the node holds in `states`, from the counts it keeps.
    fn tasks_in(&self, states: &[State]) -> u64 {
        self.shared
            .counts()
            .values()
            .map(|counts| counts.in_states(states))
            .sum()
    }

    /// Why this store no longer writes, if it does not: its WAL could not
    /// be synced, or the database's path no longer names the file it opened
    /// (looked at now, not only by the writer's check once a second).
    /// Neither mends itself before a restart, so `/health` reports them
    /// (through [`Store::count_stuck`]).
    fn check_writable(&self) -> Result<()> {
        self.shared.check_database_file();
        match self.shared.writes_stopped.get() {
            Some(reason) => Err(Error::Storage(reason.clone())),
            None => Ok(()),
        }
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Has the writer write the rows a read could find claimed and still
    /// saying pending (`claims.rs`): the task's at `seq` for
    /// `Some(Some(seq))`, every one otherwise. The read that follows sees
    /// them written, or claimed after this looked, when the task was
    /// pending.
    async fn write_claims_before_read(&self, seq: Option<Option<i64>>) -> Result<()> {
        let unwritten = &self.shared.unwritten;
        if unwritten.is_empty() {
            return Ok(());
        }
        let seqs = match seq {
            Some(Some(seq)) if !unwritten.contains(seq) => return Ok(()),
            Some(Some(seq)) => Some(vec![seq]),
            _ => None,
        };
        self.writer.run(move |ctx| ctx.write_claimed(seqs)).await
    }

    /// The writer connection's `PRAGMA synchronous`, read through the writer
    /// itself: relaxed, 1 (NORMAL); durable, 2 (FULL) while the writer
    /// commits operations one at a time and 1 while it groups them, the store
    /// then syncing the WAL itself ([`SqliteStore::wal_syncs`]).
    pub async fn synchronous_mode(&self) -> Result<i64> {
        self.writer
            .run(|ctx| {
                ctx.conn()?
                    .query_row("PRAGMA synchronous", [], |r| r.get(0))
                    .map_err(storage_error)
            })
            .await
    }

    /// How many times durable mode synced the WAL for grouped commits before
    /// answering them (a commit alone is synced by SQLite itself); one sync
    /// answers every commit made since the last. Always 0 when relaxed.
    pub fn wal_syncs(&self) -> u64 {
        self.shared
            .wal_syncs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for queued writes, then closes the database and releases its
    /// lock. Dropping the store does the same.
    pub fn close(&self) {
        self.writer.close();
    }

    /// Whether a claim could find anything, by the in-memory counts. Saves a
    /// trip through the writer for every idle poll.
    fn may_have_ready(&self, req: &ClaimRequest) -> bool {
        self.shared
            .counts()
            .iter()
            .any(|((queue, task_type), counts)| {
                counts.pending > 0
                    && (req.queues.is_empty() || req.queues.contains(queue))
                    && (req.types.is_empty() || req.types.contains(task_type))
            })
    }
}

fn validate_claim(request: &ClaimRequest) -> Result<()> {
    validate_worker_id(&request.worker_id)?;
    for (i, queue) in request.queues.iter().enumerate() {
        validate_queue_name(format_args!("queues[{i}]"), queue)?;
    }
    Ok(())
}

fn lock_database(path: &Path) -> Result<std::fs::File> {
    let mut lock_path: PathBuf = path.to_path_buf();
    lock_path.as_mut_os_string().push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", lock_path.display())))?;
    file.try_lock().map_err(|_| {
        Error::Unavailable(format!(
            "{} is in use by another Offload process (it holds {})",
            path.display(),
            lock_path.display()
        ))
    })?;
    Ok(file)
}

fn migrate(conn: &Connection) -> Result<()> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(storage_error)?;
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > latest {
        return Err(Error::Storage(format!(
            "the database has schema version {current}, newer than this Offload knows ({latest})"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}\nPRAGMA user_version = {version}; COMMIT;"
        ))
        .map_err(|e| Error::Storage(format!("migration {version} failed: {e}")))?;
    }
    Ok(())
}

/// Writes the row of every task a claim left unwritten (`claims.rs`) and
/// empties `claims`, in one transaction, so that the rest of the store
/// starts from rows that say what each task is.
fn write_unwritten_claims(conn: &Connection) -> Result<()> {
    let stored = claims::read_claims(conn)?;
    if stored.is_empty() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(storage_error)?;
    let written = (|| -> Result<usize> {
        let mut written = 0;
        let mut by_seq = conn
            .prepare(concat!(
                "SELECT ",
                rows::task_columns!(),
                " FROM tasks WHERE seq = ?1"
            ))
            .map_err(storage_error)?;
        let mut write = conn.prepare(sql::WRITE_ROW).map_err(storage_error)?;
        for claim in stored {
            for (seq, attempt) in claim.tasks {
                let Some(mut task) = by_seq
                    .query_row([seq], rows::decode)
                    .optional()
                    .map_err(storage_error)?
                else {
                    continue;
                };
                // A task written after its claim (or deleted) says so itself.
                if !claims::still_unwritten(task.task.state, task.task.attempt, attempt) {
                    continue;
                }
                claims::apply(&mut task, &claim.row)?;
                let row = row_writes::RowWrite::of(seq, &task.task)?;
                row_writes::write_one(&mut write, &row).map_err(storage_error)?;
                written += 1;
            }
        }
        conn.execute("DELETE FROM claims", [])
            .map_err(storage_error)?;
        Ok(written)
    })();
    match written {
        Ok(written) => {
            conn.execute_batch("COMMIT").map_err(storage_error)?;
            tracing::info!(
                tasks = written,
                "wrote the rows of tasks claimed before the store closed"
            );
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// What the store keeps in memory, from one walk of `tasks` at open: the
/// counts by (queue, type) and state, the pending tasks in claim order
/// (`ready.rs`) and the running ones (`running.rs`). No index holds the
/// pending or running tasks, so each would need a walk anyway; counting
/// here spares SQLite a GROUP BY, which sorted every row (0.4 s of 0.7 for
/// a million).
fn load_memory(conn: &Connection) -> Result<(CountsMap, ReadyIndex, RunningSet)> {
    let mut counts: rustc_hash::FxHashMap<String, rustc_hash::FxHashMap<String, Counts>> =
        Default::default();
    let mut ready = ReadyIndex::default();
    let running = RunningSet::default();
    let mut walk = || -> rusqlite::Result<Result<()>> {
        let mut stmt = conn.prepare(
            "SELECT seq, queue, type, state, priority, run_at, lease_expires_at, deadline_at \
             FROM tasks",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let queue = row.get_ref(1)?.as_str()?;
            let task_type = row.get_ref(2)?.as_str()?;
            let code: i64 = row.get(3)?;
            let Some(state) = State::from_code(code) else {
                return Ok(Err(Error::Storage(format!(
                    "task {seq} has unknown state code {code}"
                ))));
            };
            let by_type = match counts.get_mut(queue) {
                Some(by_type) => by_type,
                None => counts.entry(queue.to_owned()).or_default(),
            };
            let pair = match by_type.get_mut(task_type) {
                Some(pair) => pair,
                None => by_type.entry(task_type.to_owned()).or_default(),
            };
            *pair.slot(state) += 1;
            match state {
                State::Pending => {
                    let key = ready::ReadyKey {
                        priority: std::cmp::Reverse(row.get(4)?),
                        run_at: row.get(5)?,
                        seq,
                    };
                    ready.load_pending(queue, task_type, key);
                }
                State::Running => running.load_running(seq, queue, row.get(6)?, row.get(7)?),
                _ => {}
            }
        }
        Ok(Ok(()))
    };
    walk().map_err(storage_error)??;
    let counts = counts
        .into_iter()
        .flat_map(|(queue, by_type)| {
            by_type
                .into_iter()
                .map(move |(task_type, c)| ((queue.clone(), task_type), c))
        })
        .collect();
    Ok((counts, ready.loaded(), running))
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn enqueue(&self, tasks: Vec<TaskSpec>) -> Result<Vec<(Task, bool)>> {
        self.shared.limits.check_batch("tasks", tasks.len())?;
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        self.writer.run(move |ctx| ctx.enqueue(tasks)).await
    }

    fn enqueue_streamed(&self, batch: offload_core::BatchReceiver) -> offload_core::Enqueueing<'_> {
        let chunks = self
            .writer
            .submit_tentative(move |ctx| ctx.enqueue_streamed(&batch));
        Box::pin(async move {
            let chunks = chunks.await?;
            Ok(Tentative {
                value: chunks.value.into_iter().flatten().collect(),
                durable: chunks.durable,
            })
        })
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Vec<Task>> {
        validate_claim(request)?;
        if !self.may_have_ready(request) {
            return Ok(Vec::new());
        }
        let request = request.clone();
        self.writer
            .run_for_caller(move |ctx| ctx.claim(&request))
            .await
    }

    async fn claim_or_park(&self, request: &ClaimRequest) -> Result<Claim> {
        validate_claim(request)?;
        if request.limit == 0 {
            return Ok(Claim::Now {
                tasks: Vec::new(),
                more: false,
            });
        }
        if !self.may_have_ready(request) {
            // Parked without a trip to the writer. A group that made tasks
            // ready but has not yet published its counts may miss this
            // claim; its ready signal, published after, wakes the waiter.
            let (parked, ticket) = offload_core::park(request.clone());
            self.shared.park(parked);
            return Ok(Claim::Parked(ticket));
        }
        let request = request.clone();
        self.writer
            .run_for_caller(move |ctx| {
                let claimed = ctx.claim(&request)?;
                if !claimed.is_empty() {
                    return Ok(Claim::took(claimed, &request));
                }
                let (parked, ticket) = offload_core::park(request);
                ctx.shared.park(parked);
                Ok(Claim::Parked(ticket))
            })
            .await
    }

    async fn heartbeat(&self, request: HeartbeatRequest) -> Result<HeartbeatAck> {
        validate_worker_id(&request.worker_id)?;
        self.writer.run(move |ctx| ctx.heartbeat(request)).await
    }

    async fn ack(&self, worker_id: &str, acks: Vec<Ack>) -> Result<Vec<AckOutcome>> {
        validate_worker_id(worker_id)?;
        self.shared.limits.check_batch("acks", acks.len())?;
        let worker_id = worker_id.to_owned();
        self.writer.run(move |ctx| ctx.ack(&worker_id, acks)).await
    }

    async fn cancel(&self, id: Uuid) -> Result<Task> {
        self.writer.run(move |ctx| ctx.cancel(id)).await
    }

    async fn retry(&self, id: Uuid) -> Result<Task> {
        self.writer.run(move |ctx| ctx.retry(id)).await
    }

    async fn get(&self, id: Uuid) -> Result<Option<Task>> {
        let carried = offload_core::seq_carried_by(id);
        self.write_claims_before_read(Some(carried)).await?;
        let found = self.readers.run(move |conn| read::get(conn, id)).await?;
        match found {
            // A task stored before schema version 4, whose id carries no
            // seq or not its own: its claim, if any, is written now.
            Some(stored)
                if Some(stored.seq) != carried
                    && stored.task.state == State::Pending
                    && !self.shared.unwritten.is_empty() =>
            {
                self.write_claims_before_read(None).await?;
                let found = self.readers.run(move |conn| read::get(conn, id)).await?;
                Ok(found.map(|stored| *stored.task))
            }
            found => Ok(found.map(|stored| *stored.task)),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<TaskPage> {
        // Only pending and running tasks can be claimed and unwritten.
        if query.states.is_empty()
            || query
                .states
                .iter()
                .any(|s| matches!(s, State::Pending | State::Running))
        {
            self.write_claims_before_read(None).await?;
        }
        let owner_first = query.owner.is_some()
            && !query.states.is_empty()
            && self.tasks_in(&query.states) > offload_core::OWNER_LIST_STATE_WALK;
        let query = query.clone();
        let shared = Arc::clone(&self.shared);
        self.readers
            .run(move |conn| {
                let memory = read::InMemory {
                    pending: &shared.pending,
                    running: &shared.running,
                };
                read::list(conn, &query, &memory, owner_first)
            })
            .await
    }

    async fn stats(&self) -> Result<Stats> {
        // Copied out first: the writer publishes each commit's counts under
        // this lock, and building the answer's maps under it held every
        // write up for seconds with a million (queue, type) pairs.
        let counts: Vec<((String, String), Counts)> = self
            .shared
            .counts()
            .iter()
            .map(|(pair, counts)| (pair.clone(), *counts))
            .collect();
        let mut stats = Stats::default();
        for ((queue, task_type), counts) in &counts {
            stats.total.add(counts);
            stats.queues.entry(queue.clone()).or_default().add(counts);
            stats
                .types
                .entry(task_type.clone())
                .or_default()
                .add(counts);
        }
        Ok(stats)
    }

    async fn totals(&self) -> Result<Counts> {
        let mut total = Counts::default();
        for counts in self.shared.counts().values() {
            total.add(counts);
        }
        Ok(total)
    }

    async fn delete(&self, id: Uuid) -> Result<()> {
        self.writer.run(move |ctx| ctx.delete(id)).await
    }

    async fn clear(&self, request: &ClearRequest) -> Result<u64> {
        request.check_states()?;
        // Batches of their own transactions, so a large clear never holds
        // the writer for long.
        let mut total = 0;
        loop {
            let request = request.clone();
            let deleted = self
                .writer
                .run(move |ctx| ctx.clear(&request, CLEAR_BATCH))
                .await?;
            total += deleted;
            if deleted == 0 {
                return Ok(total);
            }
        }
    }

    async fn queues(&self) -> Result<Vec<QueueInfo>> {
        let settings = self.readers.run(read::queue_settings).await?;
        let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
        for ((queue, _), c) in self.shared.counts().iter() {
            counts.entry(queue.clone()).or_default().add(c);
        }
        Ok(settings
            .into_iter()
            .map(|(name, paused, concurrency)| QueueInfo {
                counts: counts.get(&name).copied().unwrap_or_default(),
                name,
                paused,
                concurrency,
            })
            .collect())
    }

    async fn update_queue(&self, name: &str, patch: QueuePatch) -> Result<QueueInfo> {
        validate_queue_name("name", name)?;
        let owned = name.to_owned();
        let mut info = self
            .writer
            .run(move |ctx| ctx.update_queue(&owned, patch))
            .await?;
        for ((queue, _), c) in self.shared.counts().iter() {
            if queue == name {
                info.counts.add(c);
            }
        }
        Ok(info)
    }

    async fn promote_due(&self) -> Result<PromoteReport> {
        self.writer.run(|ctx| ctx.promote_due()).await
    }

    async fn recover_expired(&self) -> Result<Vec<Task>> {
        self.writer.run(|ctx| ctx.recover_expired()).await
    }

    async fn purge_finished(&self, retention: &Retention, batch: usize) -> Result<u64> {
        let retention = retention.clone();
        self.writer
            .run(move |ctx| ctx.purge_finished(&retention, batch))
            .await
    }

    fn take_finished(&self) -> Vec<(String, String, offload_core::Finished)> {
        self.shared.finished.take()
    }

    async fn count_stuck(&self, expired_for: std::time::Duration) -> Result<u64> {
        // The counts are in memory: what stands for the database's ping is
        // whether the store can still write.
        self.check_writable()?;
        if self.shared.write_failure.current().is_some() {
            // Only a write tells whether writes go through again (a disk
            // that had filled may have room now): one that changes nothing
            // but is committed as any other. It clears the failure when it
            // goes through.
            let (version, _) = MIGRATIONS[MIGRATIONS.len() - 1];
            self.writer
                .run(move |ctx| {
                    ctx.conn()?
                        .execute_batch(&format!("PRAGMA user_version = {version}"))
                        .map_err(storage_error)
                })
                .await
                .map_err(|e| Error::Unavailable(format!("writes fail: {e}")))?;
        }
        let cutoff = self
            .shared
            .clock
            .now()
            .saturating_sub(expired_for)
            .as_millis();
        Ok(self.shared.running.lease_expired_by(cutoff))
    }

    async fn verify_bookkeeping(&self) -> Result<()> {
        self.writer.run(|ctx| ctx.verify_bookkeeping()).await
    }

    fn hub(&self) -> &Hub {
        &self.shared.hub
    }
}
