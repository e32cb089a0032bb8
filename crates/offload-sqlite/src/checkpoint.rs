//! When and where SQLite's checkpoints run.
//!
//! A checkpoint copies the pages the WAL holds into the database file and
//! syncs it, so that the WAL can start over. Left to SQLite, the commit that
//! takes the WAL past `wal_autocheckpoint` frames runs one inline, inside
//! `COMMIT`, and that connection is the writer: through a burn-down the
//! writer, the one thread every task passes through, copied pages and synced
//! the database file while the other core sat a fifth idle, and the group
//! whose commit it was waited for its answer meanwhile (`bench/HISTORY.md`).
//!
//! So the writer's own `wal_autocheckpoint` is off, and after each commit,
//! its callers answered, the writer reads how far the WAL has grown from the
//! wal-index (the `-shm` file, whose header SQLite documents as a file
//! format: `mxFrame` at byte 16, the checkpoint's `nBackfill` at byte 96,
//! both in the machine's byte order) and decides:
//!
//! - [`FRAMES`] frames waiting after a group of several operations (the
//!   writer is busy): a checkpoint on the thread here, on the machine's
//!   other core, while the writer goes on. It runs `PASSIVE`, which takes no
//!   lock a writer or reader waits for.
//! - [`FRAMES`] frames waiting after a lone operation (requests one at a
//!   time: a single enqueue, a pickup, a sequential client's batches):
//!   inline, as before, once its caller is answered. Measured the other way,
//!   a checkpoint on the other thread put its writes to the database file in
//!   front of the next requests' WAL syncs at the disk, and a sequential
//!   client's batches took longer.
//! - a WAL past [`FRAMES`] with at most [`TAIL`] frames left uncopied, or
//!   past [`BACKSTOP_FRAMES`] with any: inline, so that the next write starts
//!   the WAL over (SQLite does so only when a checkpoint has copied every
//!   frame). A busy writer keeps adding frames while the thread copies, so
//!   without this the WAL would only grow.
//! - a WAL past [`FRAMES`] with more than [`TAIL`] frames left uncopied
//!   after a group: the thread again, to copy what the writer added while
//!   it copied, each pass shorter than the last, until the tail is the
//!   writer's to copy. Waiting for [`FRAMES`] new frames instead let the
//!   writer seldom find a short tail, and through a burn-down the WAL grew
//!   to the backstop (32 MiB) before it started over; chased, it stayed
//!   under 8 MiB, the writer's CPU a task level (`bench/HISTORY.md`).
//!
//! Durability is unchanged: both connections are at least `synchronous =
//! NORMAL`, so a checkpoint syncs the WAL before it copies frames into the
//! database and syncs the database after, whichever runs it (`wal_sync.rs`
//! relies on that).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use offload_core::LogThrottle;
use rusqlite::Connection;

/// Frames waiting in the WAL that call for a checkpoint: SQLite's default
/// `wal_autocheckpoint`.
const FRAMES: u32 = 1000;
/// Frames few enough for the writer to copy inline whenever the WAL is
/// long, so that it starts over.
const TAIL: u32 = 64;
/// The WAL's length past which the writer copies whatever is left inline,
/// so that it starts over: 32 MiB with 4 KiB pages.
const BACKSTOP_FRAMES: u32 = 8 * FRAMES;

/// The writer's side: the wal-index it reads and the thread it hands
/// checkpoints to.
#[derive(Debug)]
pub(crate) struct Checkpoints {
    index: WalIndex,
    thread: Option<Thread>,
}

impl Checkpoints {
    /// For the database at `database`, with a thread of its own when one can
    /// be started (else every checkpoint is inline).
    pub fn new(database: &Path) -> Self {
        let thread = Thread::start(database)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no checkpoint thread; the writer checkpoints the WAL itself");
            })
            .ok();
        Self {
            index: WalIndex::new(database),
            thread,
        }
    }

    /// Called by the writer after each commit, once its callers are
    /// answered, with whether the commit was of a group of several
    /// operations: runs or hands over the checkpoint the WAL calls for.
    pub fn after_commit(&mut self, conn: &Connection, grouped: bool) {
        let Some(frames) = self.index.frames() else {
            return;
        };
        let waiting = frames.written.saturating_sub(frames.copied);
        if waiting == 0 || self.thread.as_ref().is_some_and(Thread::is_busy) {
            return;
        }
        let inline = if frames.written >= BACKSTOP_FRAMES || waiting <= TAIL {
            frames.written >= FRAMES
        } else if frames.written >= FRAMES {
            // Here more than TAIL frames wait: after a group the thread
            // copies them (at FRAMES, or chasing the writer below that);
            // after a lone operation the writer does, at FRAMES.
            match &self.thread {
                Some(thread) if grouped => {
                    thread.request();
                    false
                }
                _ => waiting >= FRAMES,
            }
        } else {
            false
        };
        if inline && let Err(e) = checkpoint(conn) {
            log_failed_checkpoint(&e);
        }
    }

    /// Checkpoints the thread has run.
    #[cfg(test)]
    pub fn thread_checkpoints(&self) -> u64 {
        self.thread
            .as_ref()
            .map_or(0, |t| t.shared.done.load(Ordering::Acquire))
    }
}

fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

/// A full disk fails the checkpoint after every commit (the writer's and
/// the thread's alike), so the lines are throttled.
fn log_failed_checkpoint(e: &rusqlite::Error) {
    static FAILED: LogThrottle = LogThrottle::new();
    if let Some(not_logged) = FAILED.admit() {
        tracing::warn!(error = %e, not_logged, "checkpoint failed; a later one will try again");
    }
}

/// The checkpoint thread; stopped and joined when dropped.
#[derive(Debug)]
struct Thread {
    shared: Arc<ThreadShared>,
    handle: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct ThreadShared {
    /// A checkpoint asked for and not finished.
    busy: AtomicBool,
    /// `Some(true)`: a checkpoint is asked for; `Some(false)`: nothing is;
    /// `None`: the thread is to stop.
    asked: Mutex<Option<bool>>,
    wake: Condvar,
    done: AtomicU64,
}

impl Thread {
    fn start(database: &Path) -> std::io::Result<Self> {
        let conn = open(database).map_err(std::io::Error::other)?;
        let shared = Arc::new(ThreadShared {
            asked: Mutex::new(Some(false)),
            ..ThreadShared::default()
        });
        let handle = std::thread::Builder::new()
            .name("offload-sqlite-checkpoint".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    while shared.wait_for_request() {
                        if let Err(e) = checkpoint(&conn) {
                            log_failed_checkpoint(&e);
                        }
                        shared.done.fetch_add(1, Ordering::AcqRel);
                        shared.busy.store(false, Ordering::Release);
                    }
                }
            })?;
        Ok(Self {
            shared,
            handle: Some(handle),
        })
    }

    fn is_busy(&self) -> bool {
        self.shared.busy.load(Ordering::Acquire)
    }

    fn request(&self) {
        self.shared.busy.store(true, Ordering::Release);
        let mut asked = self.shared.asked.lock().unwrap_or_else(|p| p.into_inner());
        if asked.is_some() {
            *asked = Some(true);
        }
        self.shared.wake.notify_one();
    }
}

impl ThreadShared {
    /// Waits until a checkpoint is asked for (`true`) or the thread is to
    /// stop (`false`).
    fn wait_for_request(&self) -> bool {
        let asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
        let mut asked = self
            .wake
            .wait_while(asked, |asked| *asked == Some(false))
            .unwrap_or_else(|p| p.into_inner());
        match *asked {
            Some(true) => {
                *asked = Some(false);
                true
            }
            _ => false,
        }
    }
}

impl Drop for Thread {
    fn drop(&mut self) {
        *self.shared.asked.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.shared.wake.notify_one();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn open(database: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        database,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // NORMAL, never OFF: the checkpoint's syncs are what lets the WAL start
    // over without losing a commit.
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0;")?;
    Ok(conn)
}

/// Where the WAL stands, by the wal-index header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frames {
    /// Frames in the WAL (`mxFrame`).
    written: u32,
    /// Of those, how many a checkpoint has copied (`nBackfill`).
    copied: u32,
}

/// Reads of the wal-index header, through a handle of its own.
#[derive(Debug)]
struct WalIndex {
    path: PathBuf,
    file: Option<File>,
}

impl WalIndex {
    fn new(database: &Path) -> Self {
        let mut path = database.as_os_str().to_owned();
        path.push("-shm");
        Self {
            path: PathBuf::from(path),
            file: None,
        }
    }

    /// `None` while there is no wal-index, or when the header's two copies
    /// differ (a commit is changing it; the next look will do).
    fn frames(&mut self) -> Option<Frames> {
        let mut header = [0u8; 100];
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        if read_at(self.file.as_ref()?, &mut header).is_err() {
            self.file = None;
            return None;
        }
        let initialized = header[12] != 0;
        if !initialized || header[..48] != header[48..96] {
            return None;
        }
        let native = |at: usize| {
            u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        Some(Frames {
            written: native(16),
            copied: native(96),
        })
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8]) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, 0)
}

#[cfg(not(unix))]
fn read_at(file: &File, buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection on a fresh WAL database that never checkpoints by
    /// itself, and a table whose rows each fill a page.
    fn database(dir: &tempfile::TempDir) -> (PathBuf, Connection) {
        let path = dir.path().join("wal.db");
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch(
            "PRAGMA wal_autocheckpoint = 0; PRAGMA synchronous = NORMAL; \
             CREATE TABLE pages (body BLOB NOT NULL);",
        )
        .unwrap();
        (path, conn)
    }

    /// Writes `pages` new pages in one transaction: as many WAL frames and a
    /// few more.
    fn write_pages(conn: &Connection, pages: usize) {
        conn.execute_batch("BEGIN").unwrap();
        let mut insert = conn
            .prepare("INSERT INTO pages (body) VALUES (zeroblob(3500))")
            .unwrap();
        for _ in 0..pages {
            insert.execute([]).unwrap();
        }
        drop(insert);
        conn.execute_batch("COMMIT").unwrap();
    }

    #[test]
    fn the_wal_index_header_counts_frames_as_sqlite_does() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = database(&dir);
        let mut index = WalIndex::new(&path);
        write_pages(&conn, 300);
        let before = index.frames().unwrap();
        assert!(before.written > 300, "{before:?}");
        assert_eq!(before.copied, 0);
        // (busy, frames in the WAL, frames copied)
        let (busy, log, copied): (i64, u32, u32) = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((busy, log, copied), (0, before.written, before.written));
        assert_eq!(
            index.frames().unwrap(),
            Frames {
                written: before.written,
                copied: before.written
            }
        );
    }

    #[test]
    fn a_busy_writers_checkpoint_runs_on_the_thread_and_a_lone_ones_inline() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = database(&dir);
        let mut checkpoints = Checkpoints::new(&path);
        let mut index = WalIndex::new(&path);

        write_pages(&conn, FRAMES as usize);
        checkpoints.after_commit(&conn, true);
        wait_for_thread(&checkpoints);
        let after_thread = index.frames().unwrap();
        assert!(after_thread.written > FRAMES, "{after_thread:?}");
        assert_eq!(after_thread.copied, after_thread.written);

        // Every frame was copied, so this write starts the WAL over.
        write_pages(&conn, FRAMES as usize);
        let restarted = index.frames().unwrap();
        assert!(
            restarted.written < after_thread.written + 10,
            "{restarted:?}"
        );
        assert_eq!(restarted.copied, 0);
        checkpoints.after_commit(&conn, false);
        let after_inline = index.frames().unwrap();
        assert_eq!(
            after_inline.copied, after_inline.written,
            "copied before returning"
        );
        assert_eq!(checkpoints.thread_checkpoints(), 1);
    }

    /// Waits until the thread has run a checkpoint.
    fn wait_for_thread(checkpoints: &Checkpoints) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while checkpoints.thread_checkpoints() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread never checkpointed"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn frames_written_behind_a_checkpoint_are_chased_by_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = database(&dir);
        let mut checkpoints = Checkpoints::new(&path);
        let mut index = WalIndex::new(&path);
        write_pages(&conn, FRAMES as usize);
        // A reader on that snapshot keeps the next write from starting the
        // WAL over once it is copied, as a busy writer's next commits do
        // while the thread copies.
        let reader = Connection::open(&path).unwrap();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM pages;")
            .unwrap();
        checkpoint(&conn).unwrap();
        write_pages(&conn, 4 * TAIL as usize);
        reader.execute_batch("COMMIT").unwrap();
        let behind = index.frames().unwrap();
        assert!(behind.written > FRAMES, "{behind:?}");
        let waiting = behind.written - behind.copied;
        assert!(waiting > TAIL && waiting < FRAMES, "{behind:?}");

        // A lone operation leaves fewer than FRAMES waiting frames alone...
        checkpoints.after_commit(&conn, false);
        assert_eq!(index.frames().unwrap(), behind);
        // ... and after a group the thread copies them, so that the next
        // write starts the WAL over.
        checkpoints.after_commit(&conn, true);
        wait_for_thread(&checkpoints);
        let caught_up = index.frames().unwrap();
        assert_eq!(caught_up.copied, caught_up.written, "{caught_up:?}");
        write_pages(&conn, 1);
        assert!(index.frames().unwrap().written < 10);
    }

    #[test]
    fn a_short_wal_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = database(&dir);
        let mut checkpoints = Checkpoints::new(&path);
        let mut index = WalIndex::new(&path);
        write_pages(&conn, 100);
        checkpoints.after_commit(&conn, true);
        checkpoints.after_commit(&conn, false);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let frames = index.frames().unwrap();
        assert_eq!(frames.copied, 0, "{frames:?}");
        assert_eq!(checkpoints.thread_checkpoints(), 0);
    }
}
