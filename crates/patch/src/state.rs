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
use std::os::unix::fs::DirBuilderExt;
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

/// Exclusive right to change one target: an advisory `flock` on the
/// target's directory `targets/<pid>-<start>` itself (no lock file: a
/// host-wide apply creates a thousand target directories, and every file
/// created is an inode to allocate), released by the kernel when the
/// holder exits however it exits. So a transaction found open in the
/// journal by a process holding the lock is an interrupted one, never one
/// in progress.
#[derive(Debug)]
pub struct TargetLock {
    _lock: Flock<File>,
}

impl TargetLock {
    /// Take the lock of the target directory `dir`, waiting up to
    /// `lock_wait()` for another holder.
    pub fn acquire(dir: &Path) -> Result<Self, PatchError> {
        let journal_error = |message: String| PatchError::Journal {
            path: dir.to_path_buf(),
            message,
        };
        let file = File::open(dir).map_err(|e| not_writable_or(dir, e, journal_error))?;
        Ok(TargetLock {
            _lock: flock_waiting(dir, file, FlockArg::LockExclusiveNonblock)?,
        })
    }
}

/// `flock` `file` (the directory `dir`) as `how` (non-blocking), trying
/// again for up to `lock_wait()` while another holder has it.
fn flock_waiting(dir: &Path, mut file: File, how: FlockArg) -> Result<Flock<File>, PatchError> {
    let wait = lock_wait();
    let deadline = Instant::now() + wait;
    loop {
        match Flock::lock(file, how) {
            Ok(lock) => return Ok(lock),
            Err((returned, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = returned;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((returned, Errno::EWOULDBLOCK)) => {
                return Err(PatchError::Locked {
                    dir: dir.to_path_buf(),
                    holder: lock_holder(&returned),
                    waited_ms: wait.as_millis() as u64,
                });
            }
            Err((_, errno)) => {
                return Err(PatchError::Journal {
                    path: dir.to_path_buf(),
                    message: format!("locking: {errno}"),
                })
            }
        }
    }
}

/// Who holds the `flock` on `file`, for the waiter's error message: the
/// pid /proc/locks gives for its device and inode (empty if not found).
fn lock_holder(file: &File) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return String::new();
    };
    let (major, minor) = (nix::sys::stat::major(meta.dev()), nix::sys::stat::minor(meta.dev()));
    let key = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    holder_in(&locks, &key).unwrap_or_default()
}

/// The pid of the first granted `FLOCK` on `key` (`MM:mm:inode`) in the
/// text of /proc/locks (waiters' lines, marked `->`, are skipped).
fn holder_in(locks: &str, key: &str) -> Option<String> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let at = fields.iter().position(|field| *field == key)?;
        Some(fields.get(at.checked_sub(1)?)?.to_string())
    })
}

/// A state directory that cannot take a write is the operator's to fix
/// (exit 2), not a failure midway: nothing was touched yet.
fn not_writable_or(path: &Path, error: std::io::Error, otherwise: impl FnOnce(String) -> PatchError) -> PatchError {
    match error.raw_os_error() {
        Some(libc::EROFS | libc::EACCES | libc::EPERM | libc::ENOSPC | libc::EDQUOT) => PatchError::StateNotWritable {
            path: path.to_path_buf(),
            message: error.to_string(),
        },
        _ => otherwise(error.to_string()),
    }
}

/// What opening a target's state repaired. The journal is the authority:
/// a torn last record is set aside, generation files the journal does not
/// back (a rollback killed after its commit, before it removed its
/// generation) are removed, and a generation a committed apply had staged
/// but not yet published (killed between the two) is published.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Repairs {
    /// Where the torn end of the journal was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torn_tail_kept: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generations_retired: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generations_published: Vec<u32>,
}

impl Repairs {
    pub fn is_empty(&self) -> bool {
        self == &Repairs::default()
    }

    pub fn merge(&mut self, other: Repairs) {
        if other.torn_tail_kept.is_some() {
            self.torn_tail_kept = other.torn_tail_kept;
        }
        self.generations_retired.extend(other.generations_retired);
        self.generations_published.extend(other.generations_published);
    }

    /// One line for the operator, `None` when nothing was repaired.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(kept) = &self.torn_tail_kept {
            parts.push(format!("torn last journal record set aside in {}", kept.display()));
        }
        if !self.generations_retired.is_empty() {
            parts.push(format!(
                "stale mirror generation{} {:?} removed (the journal had rolled back)",
                if self.generations_retired.len() == 1 { "" } else { "s" },
                self.generations_retired
            ));
        }
        if !self.generations_published.is_empty() {
            parts.push(format!(
                "committed mirror generation {:?} published",
                self.generations_published
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// A shared hold on a target's lock, for readers that must not see a
/// transaction in flight as an interrupted one (the prediction engine's
/// journal check): writers hold the lock exclusively for a whole
/// transaction, so under a shared hold an open transaction in the journal
/// is one whose process died.
#[derive(Debug)]
pub struct SharedTargetLock {
    _lock: Flock<File>,
}

impl SharedTargetLock {
    /// Wait up to `lock_wait()` for writers of `dir` to finish. `None`:
    /// the target has no directory, so never had a writer.
    pub fn acquire(dir: &Path) -> Result<Option<Self>, PatchError> {
        let file = match File::open(dir) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(PatchError::Journal {
                    path: dir.to_path_buf(),
                    message: e.to_string(),
                })
            }
        };
        Ok(Some(SharedTargetLock {
            _lock: flock_waiting(dir, file, FlockArg::LockSharedNonblock)?,
        }))
    }
}

#[derive(Debug)]
pub struct TargetState {
    pub dir: PathBuf,
    pub journal: Journal,
    pub journal_state: JournalState,
    /// What opening the state repaired (see `Repairs`).
    pub repairs: Repairs,
    _lock: TargetLock,
}

impl TargetState {
    /// Open (creating) the state of the live process `identity`.
    pub fn open(state: &StateDir, identity: &ProcessIdentity) -> Result<Self, PatchError> {
        let dir = state.target_dir(identity.pid, identity.start_time);
        // A directory made here is new: no earlier program's state to set
        // aside, no record to compare, no generation to reconcile (a
        // host-wide apply makes one per member; the checks of an existing
        // one were a dozen system calls there).
        if Self::make_dir(&dir)? {
            // Best effort, as for an existing directory without a record.
            let _ = StateDir::record_program_in_new(&dir, identity);
            return Self::at_with(dir, true);
        }
        if let Some(aside) = StateDir::set_aside_if_execd(&dir, identity)? {
            tracing::warn!(
                pid = identity.pid,
                "pid {} exec'd a new program: the old program's state (a dead target's) was moved to {}",
                identity.pid,
                aside.display()
            );
            Self::make_dir(&dir)?;
        }
        StateDir::check_same_program(&dir, identity)?;
        Self::at(dir)
    }

    /// Make target directory `dir` (mode 0700, its parents as needed):
    /// true when it was made, false when it existed.
    fn make_dir(dir: &Path) -> Result<bool, PatchError> {
        let error = |e: std::io::Error| {
            not_writable_or(dir, e, |message| PatchError::Journal {
                path: dir.to_path_buf(),
                message,
            })
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        match builder.create(dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
            // The first target of a new state directory: `targets` too.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                builder.recursive(true).create(dir).map_err(error)?;
                Ok(true)
            }
            Err(e) => Err(error(e)),
        }
    }

    /// Open the existing state of `identity` (refusing another incarnation's).
    pub fn open_existing(state: &StateDir, identity: &ProcessIdentity) -> Result<Self, PatchError> {
        Self::at(state.dir_for_live(identity)?)
    }

    /// Lock, then replay and open the journal of the target directory
    /// `dir`, repairing what a crash left (see `Repairs`).
    fn at(dir: PathBuf) -> Result<Self, PatchError> {
        Self::at_with(dir, false)
    }

    /// [`Self::at`]; `new`: a directory just made, whose only entry can be
    /// the program record, has no generation files to reconcile.
    fn at_with(dir: PathBuf, new: bool) -> Result<Self, PatchError> {
        let lock = TargetLock::acquire(&dir)?;
        let mut journal_state = Journal::replay(&dir)?;
        let (journal, torn_tail_kept) = Journal::open(&dir, &journal_state)?;
        journal_state.torn_tail = None;
        let mut repairs = if new {
            Repairs::default()
        } else {
            reconcile_generations(&dir, &journal_state)?
        };
        repairs.torn_tail_kept = torn_tail_kept;
        if let Some(line) = repairs.describe() {
            tracing::warn!(dir = %dir.display(), "repaired the target's state: {line}");
        }
        Ok(TargetState {
            dir,
            journal,
            journal_state,
            repairs,
            _lock: lock,
        })
    }

    /// Re-read the journal (after appending) and bring the generation
    /// files in line with it; returns what that repaired.
    pub fn settle(&mut self) -> Result<Repairs, PatchError> {
        self.journal_state = Journal::replay(&self.dir)?;
        reconcile_generations(&self.dir, &self.journal_state)
    }
}

/// Make the generation files agree with the journal, which is the
/// authority: with no transaction open, `active.len()` patches means
/// generations 0..=active.len() and nothing above. Generation files are
/// changed only after the journal record that decides them is durable
/// (apply: commit, then publish; rollback: commit, then remove), so a crash
/// between the two leaves exactly what this finishes. With a transaction
/// open, `recover` decides first.
pub fn reconcile_generations(dir: &Path, journal_state: &JournalState) -> Result<Repairs, PatchError> {
    let mut repairs = Repairs::default();
    if journal_state.open.is_some() {
        return Ok(repairs);
    }
    let generations = StateDir::generations(dir);
    if generations.is_empty() {
        return Ok(repairs);
    }
    let expected = journal_state.active.len() as u32;
    let io = |path: &Path, e: std::io::Error| PatchError::Journal {
        path: path.to_path_buf(),
        message: format!("reconciling mirror generations with the journal: {e}"),
    };
    for &stale in generations.iter().rev().filter(|g| **g > expected) {
        let path = StateDir::generation_path(dir, stale);
        match std::fs::remove_file(&path) {
            Ok(()) => repairs.generations_retired.push(stale),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path, e)),
        }
    }
    let staged = staged_path(dir, expected);
    if !generations.contains(&expected) && staged.exists() {
        crate::transaction::publish(&staged, dir, expected)?;
        repairs.generations_published.push(expected);
    }
    // Any other staged generation belongs to an apply that never committed.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("gen-") && name.ends_with(".mirror.staged") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if !repairs.generations_retired.is_empty() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
    }
    Ok(repairs)
}

/// The latest generation number, capturing generation 0 (every module, or
/// `only_module`) first if the process was never mirrored. Checks the generations on disk
/// agree with the journal's active patches.
pub fn ensure_baseline(
    state: &StateDir,
    target: &TargetState,
    identity: &ProcessIdentity,
    maps: &[Mapping],
    modules: &[Module],
    only_module: Option<&str>,
) -> Result<u32, PatchError> {
    let _ = state;
    let generations = StateDir::generations(&target.dir);
    if generations.is_empty() {
        let regions = select_regions(identity.pid, maps, modules, only_module)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_flock_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 17 fe:00:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 fe:00:5924005 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 77 fe:00:5924005 0 EOF\n";
        assert_eq!(holder_in(locks, "fe:00:5924005").as_deref(), Some("4242"));
        assert_eq!(holder_in(locks, "fe:00:99"), None, "a POSIX lock is not a flock");
        assert_eq!(holder_in(locks, "fe:00:1"), None);
    }
}
