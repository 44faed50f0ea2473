//! Making the state files durable, and the rule that ties their
//! durability to the target: nothing is written into a target before the
//! journal record that can undo it is on disk.
//!
//! Alone, each `sync_*` here is the file's own fsync, made at once. Inside
//! a batch ([`GroupSync::enter`]: a host-wide set's worker threads), a sync
//! of a file on the batch's file system is deferred: the thread only notes
//! that it has unsynced state, and its next stop of a target
//! (`Attached::stop`) or write into one (`TargetMemory::write`) first
//! makes it durable with one `syncfs` of the file system. Threads that need
//! one at about the same time share it (group commit): a `syncfs` covers
//! everything written to the file system before it started, so one call
//! stands for every member's appends made meanwhile. Code that must order
//! files among themselves (a generation published only after its commit
//! is durable) calls [`flush`] itself.

use nix::errno::Errno;
use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One `syncfs` at a time for the threads of a batch, shared by every
/// thread waiting when it starts.
#[derive(Debug)]
pub struct GroupSync {
    /// A directory on the batch's file system (what `syncfs` is given).
    anchor: File,
    device: u64,
    state: Mutex<GroupState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// Syncs started and finished (numbered from 1).
    started: u64,
    finished: u64,
    running: bool,
    /// Syncs that failed, with their errno.
    failed: Vec<(u64, Errno)>,
    /// How many `syncfs` calls ran (for the bench and tests).
    calls: u64,
    /// Threads in the batch now, and how many of them wait for a sync.
    inside: usize,
    waiting: usize,
    /// When the first thread began waiting for the next sync.
    gathering_since: Option<Instant>,
}

/// How long a sync waits for the batch's other threads to need one too.
/// Waiting costs little while they work (the processor stays busy), and
/// every thread that joins is one `syncfs` less: on a file system where a
/// `syncfs` takes 10 ms, 240 of them in a row were most of a 300-member
/// apply. But each member waits for two syncs, and with 10 ms of
/// gathering the processors idled a tenth of a 1,000-member apply: 3 ms
/// took 0.86–0.91 of its time (1,082–1,119 ms against 1,207–1,279 ms,
/// alternated in one session), 1 ms 0.92–0.98 and none 1.16 (a `syncfs`
/// per member or two).
const GATHER: Duration = Duration::from_millis(3);

thread_local! {
    /// The batch this thread works in, and whether it has deferred syncs.
    static CURRENT: RefCell<Option<(Arc<GroupSync>, bool)>> = const { RefCell::new(None) };
}

impl GroupSync {
    /// A group for files on the file system holding `directory`.
    pub fn new(directory: &Path) -> std::io::Result<Arc<Self>> {
        let anchor = File::open(directory)?;
        let device = anchor.metadata()?.dev();
        Ok(Arc::new(GroupSync {
            anchor,
            device,
            state: Mutex::new(GroupState::default()),
            done: Condvar::new(),
        }))
    }

    /// Work in this batch on the calling thread until the guard drops.
    pub fn enter(self: &Arc<Self>) -> BatchGuard {
        self.lock().inside += 1;
        let previous = CURRENT.with(|current| current.borrow_mut().replace((self.clone(), false)));
        BatchGuard {
            group: self.clone(),
            previous,
        }
    }

    /// How many `syncfs` calls the batch made.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Return once a `syncfs` that started after this call has finished
    /// (its result), starting one when none is running, once every thread
    /// of the batch waits for one (or after `GATHER`).
    pub fn sync(&self) -> Result<(), Errno> {
        let mut state = self.lock();
        // A sync already running may have started before the caller's
        // writes: only the next one to start covers them.
        let needed = state.started + 1;
        state.waiting += 1;
        loop {
            if state.finished >= needed {
                state.waiting -= 1;
                return match state.failed.iter().find(|(number, _)| *number == needed) {
                    Some((_, errno)) => Err(*errno),
                    None => Ok(()),
                };
            }
            if state.running {
                state = self.done.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            let since = *state.gathering_since.get_or_insert_with(Instant::now);
            let left = GATHER.saturating_sub(since.elapsed());
            if state.waiting < state.inside && !left.is_zero() {
                state = self
                    .done
                    .wait_timeout(state, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
                continue;
            }
            state.gathering_since = None;
            state.running = true;
            state.started += 1;
            state.calls += 1;
            let number = state.started;
            drop(state);
            let result = nix::unistd::syncfs(&self.anchor);
            state = self.lock();
            state.running = false;
            state.finished = number;
            if let Err(errno) = result {
                state.failed.push((number, errno));
            }
            self.done.notify_all();
        }
    }
}

/// Leaves the batch (restoring what the thread was in before).
#[derive(Debug)]
pub struct BatchGuard {
    group: Arc<GroupSync>,
    previous: Option<(Arc<GroupSync>, bool)>,
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|current| *current.borrow_mut() = previous);
        // One thread fewer to wait for.
        self.group.lock().inside -= 1;
        self.group.done.notify_all();
    }
}

/// Whether the calling thread defers syncs of files on `file`'s file
/// system; if so, notes that it has one pending.
fn defer(file: &File) -> bool {
    defer_by(|| file.metadata())
}

/// [`defer`], the file system told by `metadata` (asked only in a batch).
fn defer_by(metadata: impl FnOnce() -> std::io::Result<std::fs::Metadata>) -> bool {
    CURRENT.with(|current| {
        let mut current = current.borrow_mut();
        match current.as_mut() {
            Some((group, pending)) if metadata().is_ok_and(|m| m.dev() == group.device) => {
                *pending = true;
                true
            }
            _ => false,
        }
    })
}

/// Make `file`'s data and metadata durable (`fsync`), or, inside a batch,
/// before the thread's next stop or write of a target.
pub fn sync_file(file: &File) -> std::io::Result<()> {
    if defer(file) {
        return Ok(());
    }
    file.sync_all()
}

/// Make `file`'s data durable (`fdatasync`), or, inside a batch, before the
/// thread's next stop or write of a target.
pub fn sync_data(file: &File) -> std::io::Result<()> {
    if defer(file) {
        return Ok(());
    }
    file.sync_data()
}

/// Make the entries of `directory` durable (fsync of the directory), or,
/// inside a batch, before the thread's next stop or write of a target.
pub fn sync_dir(directory: &Path) -> std::io::Result<()> {
    // In a batch, its file system from its path: opened only to be synced
    // (opening it to ask cost two system calls more per deferred sync).
    if defer_by(|| std::fs::metadata(directory)) {
        return Ok(());
    }
    File::open(directory)?.sync_all()
}

/// Make the calling thread's deferred syncs durable now (nothing to do
/// outside a batch, or with none pending). Called before every stop of a
/// target and every write into one, and before a generation file changes
/// after its deciding journal record.
pub fn flush() -> Result<(), Errno> {
    let group = CURRENT.with(|current| match current.borrow().as_ref() {
        Some((group, true)) => Some(group.clone()),
        _ => None,
    });
    let Some(group) = group else {
        return Ok(());
    };
    group.sync()?;
    CURRENT.with(|current| {
        if let Some((_, pending)) = current.borrow_mut().as_mut() {
            *pending = false;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_batch_syncs_are_immediate_and_nothing_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        sync_data(&file).unwrap();
        assert!(!defer(&file));
        flush().unwrap();
    }

    #[test]
    fn a_batch_defers_syncs_until_flush_and_threads_share_syncfs_calls() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupSync::new(dir.path()).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let group = group.clone();
                let path = dir.path().join(format!("f{i}"));
                std::thread::spawn(move || {
                    let _batch = group.enter();
                    let file = File::create(path).unwrap();
                    for _ in 0..5 {
                        sync_data(&file).unwrap();
                        flush().unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // 40 flushes, each needing a syncfs of its own or a shared one.
        assert!((1..=40).contains(&group.calls()), "{}", group.calls());
        // Left: nothing pending on this thread, which never entered.
        flush().unwrap();
    }
}
