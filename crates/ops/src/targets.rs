//! `list` and `gc`: the targets that have state in the state directory,
//! alive or not, and the removal of the state of dead ones. `list` only
//! reads (no target is attached or stopped, no lock is taken); `gc` records
//! each target it removes in the history first (which it keeps), under the
//! target's lock, and never touches the state of a live process.
//!
//! What a user could lose with a dead target's state, and so what `gc`
//! refuses to remove: the state a live process forked from the dead one
//! still needs (it carries the dead target's patches in memory, and only
//! that state says which bytes are whose: its `AT_RANDOM` bytes, the exec
//! id, are the dead target's), and a journal with an uncommitted
//! transaction or damage (a child forked mid-transaction carries half of
//! it, and `recover` is the only thing that knows the writes; we cannot
//! prove no such child runs when its exec id is unreadable). The first is
//! always kept; the second only until the user says `interrupted`.

use crate::{bad_input, OpsError};
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::journal::Journal;
use shadowpatch_process::ProcessIdentity;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Whether the process a target directory describes still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// Same pid, start time and program.
    Alive,
    /// No process with that pid and start time.
    Dead,
    /// The process runs another program now (it exec'd): the state is of
    /// the program it ran before, which is gone. Directories set aside by
    /// `mirror` (`<dir>.exec-<ms>`) are always this.
    Execd,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Dead => "dead",
            Liveness::Execd => "exec'd",
        }
    }
}

/// One target directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TargetEntry {
    pub dir: PathBuf,
    pub pid: i32,
    pub start_time: u64,
    pub liveness: Liveness,
    /// Of the process now running with that pid and start time (alive, or
    /// exec'd into another program).
    pub comm: Option<String>,
    pub exe: Option<PathBuf>,
    pub generations: Vec<u32>,
    /// Active patch ids, oldest first, as the journal says.
    pub active_patches: Vec<String>,
    /// A post-activation watch window is recorded as open.
    pub watch_window: bool,
    /// In the agent's persisted watched-target list.
    pub watched: bool,
    /// The journal's open transaction: "<kind> <patch id> (txn N)".
    pub interrupted: Option<String>,
    /// The journal could not be replayed (damage), named.
    pub journal_error: Option<String>,
    /// Bytes of every file in the directory.
    pub bytes: u64,
}

/// Every target directory of a state directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TargetList {
    pub state_dir: PathBuf,
    pub targets: Vec<TargetEntry>,
}

/// What `gc` is asked to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcRequest {
    /// Say what would go; remove and record nothing, take no lock.
    pub dry_run: bool,
    /// Also remove dead targets whose journal has an uncommitted
    /// transaction or is damaged (recorded in the history first).
    pub interrupted: bool,
}

/// A dead target's state `gc` kept for safety, and why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GcRefusal {
    pub target: TargetEntry,
    pub reason: String,
}

/// What `gc` removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GcOutcome {
    pub dry_run: bool,
    pub removed: Vec<TargetEntry>,
    /// Live targets whose state was kept.
    pub kept: usize,
    /// Targets not alive whose state was kept for safety, each with why.
    #[serde(default)]
    pub refused: Vec<GcRefusal>,
    pub bytes_freed: u64,
    /// Directories that could not be removed, each with why.
    pub failed: Vec<String>,
}

/// List the targets with state under `state_dir` (a missing or empty
/// directory has none; a directory that is not a shadowpatch state
/// directory is refused).
pub fn list(state_dir: &Path) -> Result<TargetList, OpsError> {
    let mut targets = Vec::new();
    if let Some(state) = StateDir::open_if_present(state_dir)? {
        let watched = watched_by_agent(state_dir);
        let root = state.root().join("targets");
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(bad_input(format!("{}: cannot read it: {e}", root.display()))),
        };
        for dir in entries {
            if let Some(entry) = describe(&dir, &watched) {
                targets.push(entry);
            }
        }
    }
    targets.sort_by(|a, b| (a.pid, a.start_time, &a.dir).cmp(&(b.pid, b.start_time, &b.dir)));
    Ok(TargetList {
        state_dir: state_dir.to_path_buf(),
        targets,
    })
}

/// Remove the state of every target that is not alive, recording each in
/// the history before its directory goes. Refused (kept, with why): the
/// state of a target a live process was forked from, and, unless
/// `request.interrupted`, one whose journal has an uncommitted transaction
/// or is damaged.
pub fn gc(state_dir: &Path, request: &GcRequest) -> Result<GcOutcome, OpsError> {
    let dry_run = request.dry_run;
    let listed = list(state_dir)?;
    let mut outcome = GcOutcome {
        dry_run,
        removed: Vec::new(),
        kept: 0,
        refused: Vec::new(),
        bytes_freed: 0,
        failed: Vec::new(),
    };
    // The exec ids of every process, read once and only when a dead target
    // has one recorded.
    let mut forks: Option<ProcessesByExecId> = None;
    for entry in listed.targets {
        if entry.liveness == Liveness::Alive {
            outcome.kept += 1;
            continue;
        }
        if let Some(reason) = refusal(&entry, request, &mut forks) {
            outcome.refused.push(GcRefusal { target: entry, reason });
            continue;
        }
        if dry_run {
            outcome.bytes_freed += entry.bytes;
            outcome.removed.push(entry);
            continue;
        }
        // Under the target's lock, so no writer is midway; then look again:
        // the state must still be a dead target's.
        let lock = match shadowpatch_patch::state::TargetLock::acquire(&entry.dir) {
            Ok(lock) => lock,
            Err(error) => {
                outcome.failed.push(format!("{}: {error}", entry.dir.display()));
                continue;
            }
        };
        let watched = watched_by_agent(state_dir);
        let Some(entry) = describe(&entry.dir, &watched) else {
            continue;
        };
        if entry.liveness == Liveness::Alive {
            outcome.kept += 1;
            continue;
        }
        if let Some(reason) = refusal(&entry, request, &mut forks) {
            drop(lock);
            outcome.refused.push(GcRefusal { target: entry, reason });
            continue;
        }
        // The history first: what the state held outlives it.
        let event = shadowpatch_store::NewEvent::new(shadowpatch_store::EventKind::Gc)
            .target(entry.pid, entry.start_time)
            .outcome("removed")
            .details(serde_json::json!({
                "summary": format!(
                    "state of {} pid {} removed: generations {:?}, active patches [{}], {} bytes{}",
                    entry.liveness.as_str(),
                    entry.pid,
                    entry.generations,
                    entry.active_patches.join(", "),
                    entry.bytes,
                    entry.interrupted.as_ref().map(|t| format!(", interrupted {t}")).unwrap_or_default(),
                ),
                "dir": entry.dir,
                "liveness": entry.liveness,
                "generations": entry.generations,
                "active_patches": entry.active_patches,
                "interrupted": entry.interrupted,
                "journal_error": entry.journal_error,
                "bytes": entry.bytes,
            }));
        shadowpatch_store::Store::open(state_dir)?.record(&event)?;
        let removed = std::fs::remove_dir_all(&entry.dir);
        drop(lock);
        match removed {
            Ok(()) => {
                outcome.bytes_freed += entry.bytes;
                outcome.removed.push(entry);
            }
            Err(error) => outcome
                .failed
                .push(format!("{}: cannot remove it: {error}", entry.dir.display())),
        }
    }
    if let Some(parent) = outcome.removed.first().and_then(|e| e.dir.parent()) {
        // Make the removals durable (best effort: they are done either way).
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(outcome)
}

/// Why the state of `entry` (not alive) must be kept, if it must.
fn refusal(entry: &TargetEntry, request: &GcRequest, forks: &mut Option<ProcessesByExecId>) -> Option<String> {
    let set_aside = entry.dir.to_string_lossy().contains(".exec-");
    let targets_root = entry.dir.parent().unwrap_or(Path::new("/"));
    if let Some(recorded) = recorded_exec_id(&entry.dir).filter(|_| !set_aside) {
        let table = &*forks.get_or_insert_with(exec_ids_of_every_process);
        let children: Vec<String> = table
            .get(&recorded)
            .into_iter()
            .flatten()
            // Same exec id, started after it, without state of its own (a
            // child with state has adopted what it needs), and not forked
            // from a live process of that exec id: a sibling forked from
            // the same live parent (a server's workers) shares the exec id
            // without descending from the dead one, whose own children
            // were reparented away from the lineage when it died.
            .filter(|process| {
                let (pid, start) = (process.pid, process.start_time);
                pid != entry.pid
                    && start >= entry.start_time
                    && !targets_root.join(format!("{pid}-{start}")).is_dir()
                    && !table
                        .get(&recorded)
                        .into_iter()
                        .flatten()
                        .any(|parent| parent.pid == process.ppid)
            })
            .map(|process| format!("{} ({})", process.pid, process.comm))
            .collect();
        if !children.is_empty() {
            return Some(format!(
                "pid {} is gone but process{} {} forked from it and carr{} its memory (same exec id): its state is theirs to adopt",
                entry.pid,
                if children.len() == 1 { "" } else { "es" },
                children.join(", "),
                if children.len() == 1 { "ies" } else { "y" },
            ));
        }
    }
    if request.interrupted {
        return None;
    }
    if let Some(txn) = &entry.interrupted {
        return Some(format!(
            "its journal has an uncommitted {txn}: a process forked during it would carry half of it and only this journal can undo it; `shadowpatch gc --interrupted` removes it (recorded in the history)"
        ));
    }
    if let Some(error) = &entry.journal_error {
        return Some(format!(
            "its journal is damaged ({error}): what was written cannot be told; `shadowpatch gc --interrupted` removes it (recorded in the history)"
        ));
    }
    None
}

/// The exec id a target directory records (`StateDir::record_program`),
/// if any.
fn recorded_exec_id(dir: &Path) -> Option<String> {
    StateDir::recorded_program(dir)
        .ok()
        .flatten()
        .filter(|id| !id.is_empty())
}

/// A live process as the fork check needs it.
#[derive(Debug, Clone)]
struct LiveProcess {
    pid: i32,
    ppid: i32,
    start_time: u64,
    comm: String,
}

/// exec id → the processes that carry it.
type ProcessesByExecId = BTreeMap<String, Vec<LiveProcess>>;

/// Every process whose exec id we can read, by exec id. A process of
/// another user is unreadable and left out.
fn exec_ids_of_every_process() -> ProcessesByExecId {
    let mut table = ProcessesByExecId::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
    {
        if let Ok(identity) = ProcessIdentity::of(pid) {
            if let Some(id) = identity.exec_id {
                table.entry(id).or_default().push(LiveProcess {
                    pid,
                    ppid: parent_of(pid).unwrap_or(0),
                    start_time: identity.start_time,
                    comm: identity.comm,
                });
            }
        }
    }
    table
}

/// The parent pid from /proc/PID/stat (after the comm's last ')').
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Describe one entry of `targets/`; `None` for anything that is not a
/// target directory (`<pid>-<start>` or `<pid>-<start>.exec-<ms>`).
fn describe(dir: &Path, watched: &BTreeSet<(i32, u64)>) -> Option<TargetEntry> {
    if !dir.is_dir() {
        return None;
    }
    let name = dir.file_name()?.to_str()?;
    let (base, set_aside) = match name.split_once(".exec-") {
        Some((base, ms)) => (base, ms.parse::<u64>().is_ok()),
        None => (name, false),
    };
    let (pid, start) = base.split_once('-')?;
    let pid: i32 = pid.parse().ok()?;
    let start_time: u64 = start.parse().ok()?;
    let (live, unknown) = match ProcessIdentity::of(pid) {
        Ok(identity) => (Some(identity).filter(|i| i.start_time == start_time), false),
        // Exited, or the pid now names a thread or kernel thread: the
        // process the state describes is gone.
        Err(
            shadowpatch_process::TargetError::Zombie { .. }
            | shadowpatch_process::TargetError::NotThreadGroupLeader { .. }
            | shadowpatch_process::TargetError::KernelThread { .. }
            | shadowpatch_process::TargetError::NoSuchProcess { .. },
        ) => (None, false),
        // A process we cannot read (a transient /proc error): its state is
        // kept, as a live one's, unless the pid is certainly gone.
        Err(_) => (None, Path::new(&format!("/proc/{pid}")).exists()),
    };
    let liveness = match &live {
        None if unknown => Liveness::Alive,
        None => Liveness::Dead,
        Some(_) if set_aside => Liveness::Execd,
        Some(_) if StateDir::describes_live(dir, pid, start_time) => Liveness::Alive,
        Some(_) => Liveness::Execd,
    };
    let (active_patches, interrupted, journal_error) = match Journal::replay(dir) {
        Ok(journal) => (
            journal.active.iter().map(|p| p.id.clone()).collect(),
            journal.open.map(|t| {
                format!(
                    "{} {} (txn {})",
                    format!("{:?}", t.kind).to_lowercase(),
                    t.patch_id,
                    t.txn
                )
            }),
            None,
        ),
        Err(error) => (Vec::new(), None, Some(error.to_string())),
    };
    Some(TargetEntry {
        dir: dir.to_path_buf(),
        pid,
        start_time,
        liveness,
        comm: live.as_ref().map(|i| i.comm.clone()),
        exe: live.and_then(|i| i.exe),
        generations: StateDir::generations(dir),
        active_patches,
        watch_window: dir.join("watch-window.json").exists(),
        watched: !set_aside && watched.contains(&(pid, start_time)),
        interrupted,
        journal_error,
        bytes: bytes_under(dir),
    })
}

/// The (pid, start time) pairs in the agent's persisted watched list
/// (`STATE/agent/watched.json`); empty when there is none or it is
/// unreadable (the agent says so in its log).
fn watched_by_agent(state_dir: &Path) -> BTreeSet<(i32, u64)> {
    #[derive(serde::Deserialize)]
    struct Entry {
        pid: i32,
        start_time: u64,
    }
    std::fs::read(state_dir.join("agent").join("watched.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<Entry>>(&bytes).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.pid, e.start_time))
        .collect()
}

/// Bytes of the files under `dir` (recursively; symlinks not followed).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => bytes_under(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}
