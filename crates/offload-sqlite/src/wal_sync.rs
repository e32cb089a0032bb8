//! Durable mode's fsync, taken off the writer's path when the writer is
//! busy.
//!
//! A group of several operations (the writer is busy: more requests arrived
//! while it ran the last group) commits with `synchronous = NORMAL`: its
//! commit writes the WAL frames and returns without waiting for the disk,
//! the writer hands the group to the syncer thread here and goes on with
//! its next group. The syncer makes the WAL durable, one `fdatasync` for
//! every commit that reached it since its last, and only then tells each
//! group's callers, publishes its counts and events and wakes waiting
//! workers. In a burn-down the writer was busy nearly all the time, a third
//! of it committing, and about a third of each commit was the wait for the
//! disk's fsync (`bench/HISTORY.md`).
//!
//! A lone operation with no group still waiting for the syncer commits
//! with SQLite's own fsync (`synchronous = FULL`) and is answered by the
//! writer: a single request or a pickup gains nothing from a hand-over to
//! another thread. Groups are announced in commit order either way.
//!
//! Why a commit answered here survives a power cut: with `synchronous =
//! NORMAL` SQLite syncs the WAL before a checkpoint copies frames into the
//! database, and the database after, so a commit's frames are on disk, in
//! the WAL (synced here) or in the database (by the checkpoint that copied
//! them), before the WAL starts over and overwrites them. The WAL is written
//! in order and its frames carry a running checksum, so recovery after a
//! crash keeps a prefix of the commits; every commit answered is in it.
//!
//! What this gives up: a reader's connection sees a commit as soon as SQLite
//! returns from it, up to one fsync before the commit is on disk, so a read
//! may show a change a power cut would still take back. No answer to a
//! write, no event and no count change goes out before the sync.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use offload_core::{Error, Result};

use crate::writer::{Settled, Shared};

/// Makes every WAL frame written so far durable.
pub(crate) type WalSync = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// `fdatasync` of the database's WAL file, through a handle of its own.
pub(crate) fn wal_file_sync(database: PathBuf) -> WalSync {
    let mut wal = database.into_os_string();
    wal.push("-wal");
    let path = PathBuf::from(wal);
    let mut file: Option<std::fs::File> = None;
    Box::new(move || {
        // SQLite keeps its WAL file while any connection is open, so the
        // handle stays valid; checking that the path still names the same
        // file costs a `stat` a sync and covers a WAL removed and made anew.
        if file.as_ref().and_then(|f| same_file(f, &path)) != Some(true) {
            file = Some(std::fs::OpenOptions::new().write(true).open(&path)?);
        }
        file.as_ref().map_or(Ok(()), std::fs::File::sync_data)
    })
}

/// Whether `path` still names the file `file` was opened from; `None`
/// when that cannot be told (a `stat` failed, and not because the path is
/// gone).
#[cfg(unix)]
pub(crate) fn same_file(file: &std::fs::File, path: &std::path::Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let named = match std::fs::metadata(path) {
        Ok(named) => named,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
        Err(_) => return None,
    };
    let open = file.metadata().ok()?;
    Some(open.dev() == named.dev() && open.ino() == named.ino())
}

#[cfg(not(unix))]
pub(crate) fn same_file(_file: &std::fs::File, path: &std::path::Path) -> Option<bool> {
    match std::fs::metadata(path) {
        Ok(_) => Some(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(false),
        Err(_) => None,
    }
}

/// The syncer thread and the way to it.
pub(crate) struct Syncer {
    /// Groups handed to the thread and not yet announced.
    in_flight: Arc<AtomicUsize>,
    groups: mpsc::Sender<Settled>,
    thread: std::thread::JoinHandle<()>,
}

impl Syncer {
    pub fn start(shared: Arc<Shared>, sync: WalSync) -> std::io::Result<Self> {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (groups, received) = mpsc::channel::<Settled>();
        let thread = std::thread::Builder::new()
            .name("offload-sqlite-sync".into())
            .spawn({
                let in_flight = Arc::clone(&in_flight);
                move || run_syncer(&received, &shared, sync, &in_flight)
            })?;
        Ok(Self {
            in_flight,
            groups,
            thread,
        })
    }

    /// Whether every group handed over has been announced.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Announces a committed group, on the syncer thread, once the WAL
    /// holding it is synced. Groups are announced in commit order: the
    /// writer commits with SQLite's own fsync (and announces the group
    /// itself) only while [`Syncer::is_idle`].
    pub fn hand_over(&self, settled: Settled, shared: &Shared) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(settled)) = self.groups.send(settled) {
            // Only a panic ends the syncer early; its callers must not hear
            // of a success nobody synced.
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            settled.announce(
                shared,
                Err(Error::Storage("the SQLite WAL syncer stopped".into())),
            );
        }
    }

    /// Waits until everything handed over has been announced.
    pub fn stop(self) {
        drop(self.groups);
        let _ = self.thread.join();
    }
}

fn run_syncer(
    groups: &mpsc::Receiver<Settled>,
    shared: &Shared,
    mut sync: WalSync,
    in_flight: &AtomicUsize,
) {
    while let Ok(first) = groups.recv() {
        // Every group committed before this point is in the WAL already:
        // one sync covers them all.
        let mut settled = vec![first];
        settled.extend(groups.try_iter());
        let outcome = sync_once(&mut sync, shared);
        for group in settled {
            group.announce(shared, outcome.clone());
            in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn sync_once(sync: &mut WalSync, shared: &Shared) -> Result<()> {
    if let Some(reason) = shared.writes_stopped.get() {
        return Err(Error::Storage(reason.clone()));
    }
    match sync() {
        Ok(()) => {
            shared.wal_syncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(Error::Storage(stop_writing(shared, &e))),
    }
}

/// After a failed fsync the kernel may have dropped the pages it could not
/// write and marked them clean: nothing says what is on disk, so the store
/// stops writing until a restart recovers from the disk.
fn stop_writing(shared: &Shared, cause: &std::io::Error) -> String {
    let reason = format!(
        "the SQLite WAL could not be synced to disk ({cause}); the store stops writing: restart the server"
    );
    tracing::error!(error = %cause, "fsync of the SQLite WAL failed; the store stops writing");
    shared.stop_writes(reason)
}
