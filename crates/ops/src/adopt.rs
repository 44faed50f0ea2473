//! Fork adoption: a process forked from a patched one carries its
//! ancestor's patches in memory, so it takes over the ancestor's state as of
//! the fork (generations, active patches, journal) under its own identity,
//! instead of a baseline that would call patched bytes clean.
//!
//! Every command on a pid calls [`adopt_if_forked`] first; it does nothing
//! unless the process has no state of its own and an ancestor (by the PPid
//! chain, each one alive) has state describing that ancestor (pid + start
//! time + exec id) and the same program image (the child's exec id is the
//! ancestor's: `AT_RANDOM` is inherited by fork and renewed by exec, so a
//! child that exec'd is a new image, never adopted).
//!
//! Which state the child got: the journal stamps each transaction's
//! `Begin` and `Commit` with `CLOCK_BOOTTIME`, the clock of a process's
//! start time (/proc/PID/stat, in clock ticks). A transaction's writes land
//! in one stop of all threads between the two stamps, and a thread in the
//! middle of `fork` cannot be stopped, so the child holds every transaction
//! committed before its start tick and none begun after the end of that
//! tick. The transactions inside the tick are told apart by the child's
//! live bytes at every entry any of them wrote; the state chosen is then
//! verified whole (its generation against the child's memory) before it is
//! trusted. A mismatch anywhere refuses, naming the address: adoption never
//! guesses.
//!
//! Crash safety: nothing is written into the child. The new files go in
//! under the child's lock: an `adopting` marker first, then the
//! generations, then the journal (the deciding file, renamed into place),
//! then the marker is removed. A crash before the journal leaves the
//! marker, and the next command starts the adoption over.

use crate::OpsError;
use shadowpatch_mirror::{copy_for_target, verify, MirrorFile, StateDir, TargetRecord};
use shadowpatch_patch::journal::{encode_line, Checkpoint, Journal, PatchRecord, Record, TxnKind};
use shadowpatch_patch::state::{SharedTargetLock, TargetLock};
use shadowpatch_process::identity::{parent_and_start_time, ticks_per_second};
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// In a target directory: an adoption in progress (removed when done).
const ADOPTING_MARKER: &str = "adopting";
/// In a target directory: where an adopted state came from.
pub const ADOPTED_FILE: &str = "adopted.json";
/// How far up the PPid chain an ancestor is looked for.
const MAX_DEPTH: usize = 64;

/// A process that took over its ancestor's patch state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Adopted {
    pub pid: i32,
    pub start_time: u64,
    /// The ancestor whose state it took.
    pub ancestor_pid: i32,
    pub ancestor_start_time: u64,
    /// Processes between the two (nearest the child first), without state
    /// of their own.
    pub between: Vec<i32>,
    /// When the fork from the ancestor happened (clock ticks since boot:
    /// the start time of the ancestor's child on the chain).
    pub fork_start_time: u64,
    /// The generation adopted (= the number of active patches).
    pub generation: u32,
    /// The active patches adopted, oldest first.
    pub patches: Vec<String>,
    /// Ancestor states the fork time allowed before the live bytes chose.
    pub candidates: usize,
    /// Bytes of the generation verified against the child's memory.
    pub verified_bytes: u64,
    pub elapsed_us: u64,
}

impl Adopted {
    /// One line for the operator.
    pub fn describe(&self) -> String {
        format!(
            "pid {} was forked from pid {} (start {}) with patch{} {} active: adopted its generation {} ({} bytes verified against pid {}'s memory)",
            self.pid,
            self.ancestor_pid,
            self.ancestor_start_time,
            if self.patches.len() == 1 { "" } else { "es" },
            self.patches.join(", "),
            self.generation,
            self.verified_bytes,
            self.pid
        )
    }
}

/// An ancestor with state, as found on the PPid chain.
#[derive(Debug)]
struct Ancestor {
    identity: ProcessIdentity,
    dir: PathBuf,
    fork_start_time: u64,
    between: Vec<i32>,
}

/// Adopt `pid`'s ancestor's patch state if `pid` has none and was forked
/// from a process that had patches (see the module comment). `Ok(None)`:
/// nothing to adopt (state of its own, no patched ancestor, exec'd since,
/// or forked when its ancestor had no patch active).
pub fn adopt_if_forked(state_dir: &Path, pid: i32) -> Result<Option<Adopted>, OpsError> {
    // A folder that is not (yet) a state directory holds no ancestor: the
    // command itself says what is wrong with it, or makes it one (`mirror`
    // of a folder where only a refused command's history was written).
    let Ok(Some(state)) = StateDir::open_if_present(state_dir) else {
        return Ok(None);
    };
    adopt_in(&state, &ProcessIdentity::of(pid)?)
}

/// [`adopt_if_forked`] of a process whose identity the caller has just
/// read (an apply reads it once and passes it down).
pub fn adopt_if_forked_of(state_dir: &Path, identity: &ProcessIdentity) -> Result<Option<Adopted>, OpsError> {
    let Ok(Some(state)) = StateDir::open_if_present(state_dir) else {
        return Ok(None);
    };
    adopt_in(&state, identity)
}

fn adopt_in(state: &StateDir, identity: &ProcessIdentity) -> Result<Option<Adopted>, OpsError> {
    let (pid, identity) = (identity.pid, identity.clone());
    let dir = state.target_dir(pid, identity.start_time);
    if has_own_state(&dir) {
        return Ok(None);
    }
    let Some(ancestor) = find_ancestor(state, &identity) else {
        return Ok(None);
    };
    let started = Instant::now();
    // Writers of the ancestor finish first: under a shared hold, an open
    // transaction is an interrupted one.
    let ancestor_lock = SharedTargetLock::acquire(&ancestor.dir)?;
    let (checkpoints, now) = Journal::checkpoints(&ancestor.dir)?;
    let (a_pid, c_pid) = (ancestor.identity.pid, pid);
    if let Some(open) = &now.open {
        return Err(refused(format!(
            "pid {c_pid} was forked from pid {a_pid}, whose transaction {} ({:?} of {}) is unfinished: run `shadowpatch recover {a_pid}` first",
            open.txn, open.kind, open.patch_id
        )));
    }
    let candidates = candidates_at_fork(&checkpoints, ancestor.fork_start_time);
    if candidates.iter().all(|c| c.active.is_empty()) {
        // Forked before any patch (or after every one was rolled back):
        // its code is the ancestor's own, and a baseline of it is right.
        return Ok(None);
    }
    let mut memory = TargetMemory::open(&identity)?;
    let chosen = choose_by_live_bytes(&mut memory, &checkpoints, &candidates, c_pid, a_pid)?;
    if chosen.active.is_empty() {
        return Ok(None);
    }
    let generation = chosen.active.len() as u32;
    // The ancestor's generations 0..=N describe the chosen state only if
    // its active patches still begin with the chosen ones.
    let kept = now
        .active
        .iter()
        .zip(&chosen.active)
        .take_while(|(now, then)| now.id == then.id)
        .count();
    if kept < chosen.active.len() {
        return Err(refused(format!(
            "pid {c_pid} was forked from pid {a_pid} with patches [{}] active, but pid {a_pid} has rolled back since \
             (now [{}]): the generations that describe pid {c_pid} are gone, so its state cannot be derived; \
             nothing was done",
            ids(&chosen.active),
            ids(&now.active)
        )));
    }
    let ancestor_generations = StateDir::generations(&ancestor.dir);
    if let Some(missing) = (0..=generation).find(|g| !ancestor_generations.contains(g)) {
        return Err(refused(format!(
            "pid {c_pid} was forked from pid {a_pid}, whose mirror generation {missing} is missing from {}: run \
             `shadowpatch recover {a_pid}` first",
            ancestor.dir.display()
        )));
    }
    let mirror = MirrorFile::open(&StateDir::generation_path(&ancestor.dir, generation))?;
    let report = verify(&mut memory, &mirror, &mut |_, _| {})?;
    if let Some(first) = report.differences.first() {
        return Err(refused(format!(
            "pid {c_pid} was forked from pid {a_pid} with patches [{}] active, but its memory differs from that \
             generation ({} page{} differ, first at {:#x}): not adopted, nothing was done",
            ids(&chosen.active),
            report.differing_pages,
            if report.differing_pages == 1 { "" } else { "s" },
            first.address
        )));
    }
    identity.check_alive()?;

    // Write the child's state under its lock.
    if let Some(aside) = StateDir::set_aside_if_execd(&dir, &identity)? {
        tracing::warn!(pid, "the old program's state was moved to {}", aside.display());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io(&dir, e))?;
    let _child_lock = TargetLock::acquire(&dir)?;
    if has_own_state(&dir) {
        // Another command adopted (or mirrored) it meanwhile.
        return Ok(None);
    }
    let tick_ns = 1_000_000_000 / ticks_per_second().max(1);
    let adopted = Adopted {
        pid,
        start_time: identity.start_time,
        ancestor_pid: a_pid,
        ancestor_start_time: ancestor.identity.start_time,
        between: ancestor.between.clone(),
        fork_start_time: ancestor.fork_start_time,
        generation,
        patches: chosen.active.iter().map(|p| p.id.clone()).collect(),
        candidates: candidates.len(),
        verified_bytes: report.bytes,
        elapsed_us: 0,
    };
    write_file(
        &dir.join(ADOPTING_MARKER),
        format!("{a_pid}-{}\n", ancestor.identity.start_time).as_bytes(),
    )?;
    for leftover in StateDir::generations(&dir) {
        let path = StateDir::generation_path(&dir, leftover);
        std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
    }
    let record = TargetRecord::from(&identity);
    for g in 0..=generation {
        let source = MirrorFile::open(&StateDir::generation_path(&ancestor.dir, g))?;
        copy_for_target(&source, &record, &StateDir::generation_path(&dir, g))?;
    }
    drop(ancestor_lock);
    // The child's own journal: one committed apply per adopted patch,
    // stamped with the child's start (the state held since then), so a
    // process forked from the child later is placed correctly.
    let born_ns = identity.start_time * tick_ns;
    let mut journal = Vec::new();
    for (txn, patch) in chosen.active.iter().enumerate() {
        let txn = txn as u64;
        let mut records = vec![
            Record::Begin {
                txn,
                kind: TxnKind::Apply,
                patch_id: patch.id.clone(),
                pid,
                start_time: identity.start_time,
                unix_ms: shadowpatch_patch::state::now_ms(),
                boot_ns: Some(born_ns),
            },
            Record::Plan {
                txn,
                patch: patch.clone(),
            },
        ];
        if txn == 0 {
            records.extend(chosen.retired.iter().map(|&(address, len)| Record::Retire {
                txn,
                address,
                len,
                reason: format!("retired in pid {a_pid} before pid {pid} was forked"),
            }));
        }
        records.push(Record::Commit {
            txn,
            pause_us: 0,
            boot_ns: Some(born_ns),
        });
        for record in records {
            journal.extend(encode_line(&record));
            journal.push(b'\n');
        }
    }
    StateDir::record_program(&dir, &identity).map_err(|e| io(&dir, e))?;
    let adopted = Adopted {
        elapsed_us: started.elapsed().as_micros() as u64,
        ..adopted
    };
    write_file(
        &dir.join(ADOPTED_FILE),
        &serde_json::to_vec_pretty(&adopted).expect("serializes"),
    )?;
    write_file(&Journal::path_in(&dir), &journal)?;
    let marker = dir.join(ADOPTING_MARKER);
    std::fs::remove_file(&marker).map_err(|e| io(&marker, e))?;
    shadowpatch_store::record_best_effort(
        state.root(),
        &shadowpatch_store::NewEvent::new(shadowpatch_store::EventKind::Adopt)
            .target(pid, identity.start_time)
            .outcome("ok")
            .duration_us(adopted.elapsed_us)
            .details(serde_json::json!({
                "summary": adopted.describe(),
                "ancestor_pid": adopted.ancestor_pid,
                "ancestor_start_time": adopted.ancestor_start_time,
                "fork_start_time": adopted.fork_start_time,
                "generation": adopted.generation,
                "patches": adopted.patches,
                "candidates": adopted.candidates,
            })),
    );
    tracing::info!(pid, "{}", adopted.describe());
    Ok(Some(adopted))
}

/// What one pass of [`adopt_descendants`] did.
#[derive(Debug, Default)]
pub struct Followed {
    pub adopted: Vec<Adopted>,
    /// Processes whose adoption was refused (each tried once), with why.
    pub refused: Vec<(i32, String)>,
}

/// Adopt every process forked from a patched target that has no state of
/// its own yet: the agent's fork follower calls this every
/// `--follow-interval`, so a worker a master forks after an apply (a
/// reload, a respawn after a crash) is known while its ancestor is
/// alive: `rollback --tree` reaches it, and it stays adoptable after its
/// parent exits (an orphan's PPid chain no longer leads to the state).
///
/// Polling, not the netlink proc connector: the connector needs
/// `CAP_NET_ADMIN` and a socket of its own per agent, reports every fork
/// on the host, and drops events under load (`ENOBUFS`), after which a
/// scan like this one is needed anyway. A pass reads the process table
/// once and looks only at descendants of patched targets. `tried` holds
/// the (pid, start time) of processes refused before: a refusal is
/// recorded once, not every pass.
pub fn adopt_descendants(state_dir: &Path, tried: &mut std::collections::BTreeSet<(i32, u64)>) -> Followed {
    let mut followed = Followed::default();
    let Ok(listed) = crate::targets::list(state_dir) else {
        return followed;
    };
    let roots: std::collections::BTreeSet<i32> = listed
        .targets
        .iter()
        .filter(|t| t.liveness == crate::targets::Liveness::Alive && !t.active_patches.is_empty())
        .map(|t| t.pid)
        .collect();
    if roots.is_empty() {
        return followed;
    }
    let with_state: std::collections::BTreeSet<(i32, u64)> =
        listed.targets.iter().map(|t| (t.pid, t.start_time)).collect();
    for member in crate::set::descendants(&roots) {
        let Ok(identity) = ProcessIdentity::of(member.pid) else {
            continue;
        };
        let key = (member.pid, identity.start_time);
        if with_state.contains(&key) || tried.contains(&key) {
            continue;
        }
        match adopt_if_forked(state_dir, member.pid) {
            Ok(Some(adopted)) => followed.adopted.push(adopted),
            // Forked before any patch, or exec'd: its own code; look again
            // only if it ever gets a new start time.
            Ok(None) => {
                tried.insert(key);
            }
            Err(error) => {
                tried.insert(key);
                followed.refused.push((member.pid, error.to_string()));
            }
        }
    }
    tried.retain(|(pid, start)| ProcessIdentity::of(*pid).is_ok_and(|identity| identity.start_time == *start));
    followed
}

/// Whether `dir` holds a target's own state: a generation or a journal
/// record, and no adoption left half-done.
fn has_own_state(dir: &Path) -> bool {
    if dir.join(ADOPTING_MARKER).exists() {
        return false;
    }
    !StateDir::generations(dir).is_empty() || std::fs::metadata(Journal::path_in(dir)).is_ok_and(|m| m.len() > 0)
}

/// The nearest ancestor of `child` with state of its own that describes it
/// and runs the same program image as `child`.
fn find_ancestor(state: &StateDir, child: &ProcessIdentity) -> Option<Ancestor> {
    // The start time of the process below the one looked at.
    let mut below_start = child.start_time;
    let (mut parent_pid, _) = parent_and_start_time(child.pid)?;
    let mut between = Vec::new();
    for _ in 0..MAX_DEPTH {
        if parent_pid <= 0 {
            return None;
        }
        // The parent's start time alone names its state directory: its
        // whole identity (status, auxv, AT_RANDOM) is read only when it
        // has state (most parents, e.g. pid 1, have none).
        let (grandparent_pid, parent_start) = parent_and_start_time(parent_pid)?;
        if parent_start > below_start {
            return None;
        }
        let dir = state.target_dir(parent_pid, parent_start);
        if !StateDir::generations(&dir).is_empty() {
            let parent = ProcessIdentity::of(parent_pid).ok()?;
            if parent.start_time != parent_start {
                // The pid was recycled between the two reads.
                return None;
            }
            if !StateDir::describes_live(&dir, parent.pid, parent.start_time) {
                tracing::debug!(
                    pid = parent.pid,
                    "the ancestor's state is of the program it ran before an exec"
                );
                return None;
            }
            // Same image: the exec id is inherited by fork and renewed by
            // exec. Unreadable ids cannot prove it, so nothing is adopted.
            match (&child.exec_id, &parent.exec_id) {
                (Some(ours), Some(theirs)) if ours == theirs => {}
                _ => return None,
            }
            return Some(Ancestor {
                identity: parent,
                dir,
                fork_start_time: below_start,
                between,
            });
        }
        between.push(parent_pid);
        below_start = parent_start;
        parent_pid = grandparent_pid;
    }
    None
}

/// The checkpoints the child may hold, given when it was forked (its start
/// tick): at or after the last transaction committed before the tick, before
/// the first begun after it. Equal states appear once.
fn candidates_at_fork(checkpoints: &[Checkpoint], fork_start_time: u64) -> Vec<Checkpoint> {
    let tick_ns = 1_000_000_000 / ticks_per_second().max(1);
    let fork_from = fork_start_time * tick_ns;
    let fork_until = fork_from + tick_ns;
    candidates_between(checkpoints, fork_from, fork_until)
}

fn candidates_between(checkpoints: &[Checkpoint], fork_from: u64, fork_until: u64) -> Vec<Checkpoint> {
    let first = checkpoints
        .iter()
        .rposition(|c| c.commit_boot_ns.is_some_and(|t| t <= fork_from))
        .unwrap_or(0);
    let end = checkpoints
        .iter()
        .enumerate()
        .skip(first + 1)
        .find(|(_, c)| c.begin_boot_ns.is_some_and(|t| t >= fork_until))
        .map(|(i, _)| i)
        .unwrap_or(checkpoints.len());
    let mut out: Vec<Checkpoint> = Vec::new();
    for checkpoint in &checkpoints[first..end] {
        if let Some(same) = out.iter_mut().find(|c| c.active == checkpoint.active) {
            *same = checkpoint.clone();
        } else {
            out.push(checkpoint.clone());
        }
    }
    out
}

/// The candidate whose entry bytes are the child's live bytes at every
/// address any patch of the journal wrote; refuses none or several.
fn choose_by_live_bytes(
    memory: &mut TargetMemory,
    all: &[Checkpoint],
    candidates: &[Checkpoint],
    pid: i32,
    ancestor: i32,
) -> Result<Checkpoint, OpsError> {
    // Every entry address, with its pristine bytes (the first record to
    // write it saw them).
    let mut pristine: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for patch in all.iter().flat_map(|c| &c.active) {
        for function in &patch.functions {
            pristine
                .entry(function.write.address)
                .or_insert_with(|| function.write.original.clone());
        }
    }
    let mut live: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (&address, bytes) in &pristine {
        let mut buffer = vec![0u8; bytes.len()];
        memory.read_exact(address, &mut buffer)?;
        live.insert(address, buffer);
    }
    let expected = |candidate: &Checkpoint, address: u64| -> Vec<u8> {
        candidate
            .active
            .iter()
            .rev()
            .flat_map(|p| &p.functions)
            .find(|f| f.write.address == address)
            .map(|f| f.write.new.clone())
            .unwrap_or_else(|| pristine[&address].clone())
    };
    let matching: Vec<&Checkpoint> = candidates
        .iter()
        .filter(|c| live.iter().all(|(address, bytes)| expected(c, *address) == *bytes))
        .collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let latest = candidates.last().expect("at least one candidate");
            let (address, bytes) = live
                .iter()
                .find(|(address, bytes)| expected(latest, **address) != **bytes)
                .expect("the latest candidate did not match");
            Err(refused(format!(
                "pid {pid} was forked from pid {ancestor}, but its entry bytes at {address:#x} ({}) match no patch \
                 state pid {ancestor} had when it forked (patches [{}] expect {}): not adopted, nothing was done",
                shadowpatch_symbols::hex(bytes),
                ids(&latest.active),
                shadowpatch_symbols::hex(&expected(latest, *address))
            )))
        }
        several => {
            Err(refused(format!(
            "pid {pid} was forked from pid {ancestor}, and its entry bytes match {} of pid {ancestor}'s patch states \
             at that time ([{}]): not adopted, nothing was done",
            several.len(),
            several.iter().map(|c| format!("[{}]", ids(&c.active))).collect::<Vec<_>>().join(", ")
        )))
        }
    }
}

fn ids(patches: &[PatchRecord]) -> String {
    patches.iter().map(|p| p.id.as_str()).collect::<Vec<_>>().join(", ")
}

fn refused(message: String) -> OpsError {
    OpsError::AdoptionRefused(message)
}

fn io(path: &Path, source: std::io::Error) -> OpsError {
    OpsError::Mirror(shadowpatch_mirror::MirrorError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Write a file whole (temporary name, fsync, rename, directory fsync).
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), OpsError> {
    shadowpatch_mirror::store::write_atomically(path, bytes).map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(ids: &[&str], begin: Option<u64>, commit: Option<u64>) -> Checkpoint {
        Checkpoint {
            txn: Some(0),
            begin_boot_ns: begin,
            commit_boot_ns: commit,
            active: ids
                .iter()
                .map(|id| PatchRecord {
                    id: id.to_string(),
                    generation: 1,
                    manifest: "m".into(),
                    object: "o".into(),
                    module: "x".into(),
                    build_id: "ab".into(),
                    mapping_address: 0,
                    mapping_len: 0,
                    functions: Vec::new(),
                })
                .collect(),
            retired: Vec::new(),
        }
    }

    fn ids_of(candidates: &[Checkpoint]) -> Vec<Vec<String>> {
        candidates
            .iter()
            .map(|c| c.active.iter().map(|p| p.id.clone()).collect())
            .collect()
    }

    #[test]
    fn the_fork_tick_bounds_the_states_a_child_may_hold() {
        let start = Checkpoint {
            txn: None,
            ..checkpoint(&[], None, None)
        };
        // apply a during [100, 110], apply b during [300, 310], rollback b
        // during [500, 510].
        let all = vec![
            start,
            checkpoint(&["a"], Some(100), Some(110)),
            checkpoint(&["a", "b"], Some(300), Some(310)),
            checkpoint(&["a"], Some(500), Some(510)),
        ];
        // Forked in [200, 250): after a, before b.
        assert_eq!(ids_of(&candidates_between(&all, 200, 250)), vec![vec!["a"]]);
        // Forked in [50, 90): before anything.
        assert_eq!(ids_of(&candidates_between(&all, 50, 90)), vec![Vec::<String>::new()]);
        // A tick that overlaps b's transaction: both states are possible.
        assert_eq!(
            ids_of(&candidates_between(&all, 305, 355)),
            vec![vec!["a".to_string()], vec!["a".to_string(), "b".to_string()]]
        );
        // After everything.
        assert_eq!(ids_of(&candidates_between(&all, 600, 650)), vec![vec!["a"]]);
        // Records without stamps bound nothing: every state stays possible
        // (equal states once).
        let unstamped = vec![
            checkpoint(&[], None, None),
            checkpoint(&["a"], None, None),
            checkpoint(&[], None, None),
        ];
        assert_eq!(ids_of(&candidates_between(&unstamped, 10, 20)).len(), 2);
    }
}
