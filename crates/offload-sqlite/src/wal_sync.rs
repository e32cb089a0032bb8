//! Durable mode's fsync, taken off the writer's path.
//!
//! In durable mode the writer commits with `synchronous = NORMAL`: a commit
//! writes its WAL frames and returns without waiting for the disk, and the
//! writer goes on with its next group. The syncer thread here makes the WAL
//! durable, one `fdatasync` for every commit that reached it since the last,
//! and only then tells each group's callers, publishes its counts and events
//! and wakes waiting workers. An answer still comes only once its change is
//! on disk, as with `synchronous = FULL`; the writer no longer stands still
//! while the disk syncs (a third of its time in a burn-down on a slow disk,
//! `bench/analysis.md`).
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
use std::sync::{Arc, Mutex, mpsc};

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
        if !file.as_ref().is_some_and(|f| same_file(f, &path)) {
            file = Some(std::fs::OpenOptions::new().write(true).open(&path)?);
        }
        file.as_ref().map_or(Ok(()), std::fs::File::sync_data)
    })
}

#[cfg(unix)]
fn same_file(file: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &std::fs::File, path: &std::path::Path) -> bool {
    path.exists()
}

/// The syncer thread and the way to it.
pub(crate) struct Syncer {
    sync: Arc<Mutex<WalSync>>,
    /// Groups handed to the thread and not yet announced.
    in_flight: Arc<AtomicUsize>,
    groups: mpsc::Sender<Settled>,
    thread: std::thread::JoinHandle<()>,
}

impl Syncer {
    pub fn start(shared: Arc<Shared>, sync: WalSync) -> std::io::Result<Self> {
        let sync = Arc::new(Mutex::new(sync));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (groups, received) = mpsc::channel::<Settled>();
        let thread = std::thread::Builder::new()
            .name("offload-sqlite-sync".into())
            .spawn({
                let sync = Arc::clone(&sync);
                let in_flight = Arc::clone(&in_flight);
                move || run_syncer(&received, &shared, &sync, &in_flight)
            })?;
        Ok(Self {
            sync,
            in_flight,
            groups,
            thread,
        })
    }

    /// Announces a committed group once the WAL holding it is synced. When
    /// the writer has nothing else to run and no earlier group is still
    /// waiting, the writer syncs it itself, as SQLite's own fsync would:
    /// handing it over would only add a thread's wake-up to a lone request's
    /// answer (and to a pickup). Otherwise the syncer takes it and the
    /// writer goes on. Either way groups are announced in commit order: the
    /// writer syncs only once every group handed over has been announced.
    pub fn settle(&self, settled: Settled, shared: &Shared, writer_has_work: bool) {
        if !writer_has_work && self.in_flight.load(Ordering::Acquire) == 0 {
            let outcome = sync_once(&self.sync, shared);
            settled.announce(shared, outcome);
            return;
        }
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
    sync: &Mutex<WalSync>,
    in_flight: &AtomicUsize,
) {
    while let Ok(first) = groups.recv() {
        // Every group committed before this point is in the WAL already:
        // one sync covers them all.
        let mut settled = vec![first];
        settled.extend(groups.try_iter());
        let outcome = sync_once(sync, shared);
        for group in settled {
            group.announce(shared, outcome.clone());
            in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn sync_once(sync: &Mutex<WalSync>, shared: &Shared) -> Result<()> {
    if let Some(reason) = shared.wal_failed.get() {
        return Err(Error::Storage(reason.clone()));
    }
    let mut sync = sync.lock().unwrap_or_else(|p| p.into_inner());
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
    let _ = shared.wal_failed.set(reason.clone());
    shared.wal_failed.get().cloned().unwrap_or(reason)
}
