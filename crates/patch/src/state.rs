//! Per-target state shared by apply, rollback and recover: the target's
//! directory, its journal, the lock that lets one shadowpatch process at a
//! time change the target, and the mirror generations that follow patches.

use crate::journal::{Journal, JournalState};
use crate::PatchError;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use shadowpatch_mirror::{capture, select_regions, CaptureOptions, StateDir};
use shadowpatch_process::{Attached, Mapping, ProcessIdentity, TargetMemory};
use shadowpatch_symbols::Module;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long an operation waits for another shadowpatch process working on
/// the same target (a heal takes milliseconds; a capture can take seconds).
/// `SHADOWPATCH_LOCK_WAIT_MS` overrides it (tests use a short wait).
fn lock_wait() -> Duration {
    std::env::var("SHADOWPATCH_LOCK_WAIT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(10))
}

/// Exclusive right to change one target: an advisory `flock` on
/// `targets/<pid>-<start>/lock`, released by the kernel when the holder
/// exits however it exits. So a transaction found open in the journal by a
/// process holding the lock is an interrupted one, never one in progress.
#[derive(Debug)]
pub struct TargetLock {
    _lock: Flock<File>,
}

impl TargetLock {
    /// Take the lock of the target directory `dir`, waiting up to
    /// `lock_wait()` for another holder.
    pub fn acquire(dir: &Path) -> Result<Self, PatchError> {
        let path = dir.join("lock");
        let journal_error = |message: String| PatchError::Journal {
            path: path.clone(),
            message,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| journal_error(e.to_string()))?;
        let wait = lock_wait();
        let deadline = Instant::now() + wait;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    // Say who holds it, for the next one's error message.
                    let _ = lock.set_len(0);
                    let _ = lock.rewind();
                    let _ = write!(lock, "{}", std::process::id());
                    return Ok(TargetLock { _lock: lock });
                }
                Err((returned, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = returned;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((mut returned, Errno::EWOULDBLOCK)) => {
                    let mut holder = String::new();
                    let _ = returned.rewind();
                    let _ = returned.read_to_string(&mut holder);
                    return Err(PatchError::Locked {
                        dir: dir.to_path_buf(),
                        holder: holder.trim().to_string(),
                        waited_ms: wait.as_millis() as u64,
                    });
                }
                Err((_, errno)) => return Err(journal_error(format!("locking: {errno}"))),
            }
        }
    }
}

#[derive(Debug)]
pub struct TargetState {
    pub dir: PathBuf,
    pub journal: Journal,
    pub journal_state: JournalState,
    _lock: TargetLock,
}

impl TargetState {
    /// Open (creating) the state of the live process `identity`.
    pub fn open(state: &StateDir, identity: &ProcessIdentity) -> Result<Self, PatchError> {
        let dir = state.target_dir(identity.pid, identity.start_time);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| PatchError::Journal {
                path: dir.clone(),
                message: e.to_string(),
            })?;
        Self::at(dir)
    }

    /// Open the existing state of `identity` (refusing another incarnation's).
    pub fn open_existing(state: &StateDir, identity: &ProcessIdentity) -> Result<Self, PatchError> {
        Self::at(state.dir_for_live(identity)?)
    }

    /// Lock, then replay and open the journal of the target directory `dir`.
    fn at(dir: PathBuf) -> Result<Self, PatchError> {
        let lock = TargetLock::acquire(&dir)?;
        let journal_state = Journal::replay(&dir)?;
        let journal = Journal::open(&dir)?;
        Ok(TargetState {
            dir,
            journal,
            journal_state,
            _lock: lock,
        })
    }
}

/// The latest generation number, capturing generation 0 (every module)
/// first if the process was never mirrored. Checks the generations on disk
/// agree with the journal's active patches.
pub fn ensure_baseline(
    state: &StateDir,
    target: &TargetState,
    identity: &ProcessIdentity,
    maps: &[Mapping],
    modules: &[Module],
) -> Result<u32, PatchError> {
    let _ = state;
    let generations = StateDir::generations(&target.dir);
    if generations.is_empty() {
        let regions = select_regions(identity.pid, maps, modules, None)?;
        let mut memory = TargetMemory::open(identity)?;
        capture(
            &mut memory,
            identity,
            &regions,
            &StateDir::generation_path(&target.dir, 0),
            &CaptureOptions { generation: 0 },
            &mut |_, _| {},
        )?;
        return Ok(0);
    }
    let latest = *generations.last().expect("not empty");
    let expected = target.journal_state.active.len() as u32;
    if latest != expected {
        return Err(PatchError::Journal {
            path: target.dir.clone(),
            message: format!("latest mirror generation is {latest} but {expected} patches are active"),
        });
    }
    Ok(latest)
}

/// Copies of the target a simulation made (their pids in the target, one
/// per line), kept until they are reaped: after a killed simulation,
/// `recover` reaps the zombies listed here.
pub fn copies_log_path(dir: &Path) -> PathBuf {
    dir.join("simulation-copies")
}

pub fn staged_path(dir: &Path, generation: u32) -> PathBuf {
    dir.join(format!("gen-{generation:06}.mirror.staged"))
}

pub fn now_ms() -> u64 {
    shadowpatch_mirror::capture::unix_ms()
}

/// Unmap `len` bytes at `address` in the target, in one short stop.
pub fn unmap(attached: &mut Attached, address: u64, len: u64) -> Result<(), PatchError> {
    let mut stopped = attached.stop()?;
    let tid = stopped.borrowable_thread();
    stopped.remote_munmap(tid, address, len)?;
    stopped.resume()?;
    Ok(())
}

/// Whether anything of `[address, address + len)` is mapped in the target.
pub fn is_mapped(maps: &[Mapping], address: u64, len: u64) -> bool {
    maps.iter().any(|m| m.start < address + len && address < m.end)
}
