//! Target sets: one operation over many processes — a process tree
//! (`--tree`), a cgroup (`--cgroup`), a systemd unit's cgroup
//! (`--unit`) or every process on the host (`--all`). Every member that maps the manifest's module (by build-id)
//! gets its own journaled transaction; a member that fails undoes the
//! members already done (all or none across the set) unless `partial`.
//!
//! How each member is applied or rolled back is the caller's: the CLI
//! passes the same per-process path it uses for one pid (through the agent
//! when one runs, else `ops::apply` directly), so a set inherits the trust
//! policy, the analysis gate and the history of a single apply.

use crate::apply::{ApplyRequest, ApplyResult};
use crate::rollback::{RollbackRequest, RolledBack};
use crate::{bad_input, OpsError};
use shadowpatch_failure::{Classify, FailureClass};
use shadowpatch_patch::PatchInput;
use shadowpatch_process::ProcessIdentity;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which processes a set holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// The pid and all its descendants.
    Tree(i32),
    /// Every process in the cgroup and its descendant cgroups (a path in
    /// a mounted cgroup hierarchy, absolute or relative to one).
    Cgroup(PathBuf),
    /// A systemd unit's cgroup (NAME or NAME.service), found in the cgroup
    /// v2 or `name=systemd` hierarchy.
    Unit(String),
    /// Every process on the host (but ourselves): for an apply, those that
    /// map the manifest's module; for the others, those with state.
    All,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Tree(pid) => write!(f, "the process tree of pid {pid}"),
            Selector::Cgroup(path) => write!(f, "cgroup {}", path.display()),
            Selector::Unit(name) => write!(f, "unit {name}"),
            Selector::All => write!(f, "the host"),
        }
    }
}

/// One process of a set, as found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub pid: i32,
    pub comm: String,
    /// Its parent (0 when unknown).
    pub ppid: i32,
}

/// A set's processes: those that map the module, and the others.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Members {
    pub selector: Selector,
    /// Those that map the module with the manifest's build-id, children
    /// before their parents (a parent patched first could fork a child
    /// that carries the patch before the child's own transaction).
    pub targets: Vec<Member>,
    /// Members that do not map the module (or vanished while looked at).
    pub skipped: Vec<(Member, String)>,
    /// Host-wide (`--all`), the processes passed over, counted by reason
    /// instead of listed in `skipped`.
    #[serde(default)]
    pub passed_over: BTreeMap<String, usize>,
    /// Every process's parent (pid → ppid) in the table the set was
    /// resolved from: a set's members' ancestors, without reading /proc
    /// again for each.
    #[serde(skip)]
    pub parents: BTreeMap<i32, i32>,
}

/// The processes `selector` names, sorted children first. An empty set,
/// or a cgroup or unit that does not exist, is bad input.
pub fn resolve(selector: &Selector) -> Result<Vec<Member>, OpsError> {
    resolve_in(selector, &process_table())
}

fn resolve_in(selector: &Selector, table: &BTreeMap<i32, Member>) -> Result<Vec<Member>, OpsError> {
    let pids: BTreeSet<i32> = match selector {
        Selector::Tree(root) => {
            ProcessIdentity::of(*root)?;
            let mut found = BTreeSet::from([*root]);
            let mut frontier = vec![*root];
            while let Some(parent) = frontier.pop() {
                for member in table.values().filter(|m| m.ppid == parent) {
                    if found.insert(member.pid) {
                        frontier.push(member.pid);
                    }
                }
            }
            found
        }
        Selector::Cgroup(path) => cgroup_pids(&cgroup_dir(path)?)?,
        Selector::Unit(name) => cgroup_pids(&unit_dir(name)?)?,
        Selector::All => {
            let me = std::process::id() as i32;
            table.keys().copied().filter(|pid| *pid != me).collect()
        }
    };
    let mut members: Vec<Member> = pids.into_iter().filter_map(|pid| table.get(&pid).cloned()).collect();
    if members.is_empty() {
        return Err(bad_input(format!("{selector} holds no process")));
    }
    // Children first: deeper members before their ancestors.
    let depth = |pid: i32| {
        let mut depth = 0;
        let mut at = pid;
        while let Some(member) = table.get(&at) {
            if member.ppid <= 1 || depth > 64 {
                break;
            }
            at = member.ppid;
            depth += 1;
        }
        depth
    };
    members.sort_by_key(|m| (std::cmp::Reverse(depth(m.pid)), m.pid));
    Ok(members)
}

/// The members of `selector` split by whether they map the module with
/// `build_id` (lower-case hex).
pub fn members(selector: &Selector, build_id: &str) -> Result<Members, OpsError> {
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    // Host-wide, most processes do not map the module: their maps are
    // matched by file (device, inode) against a cache of build-ids, each
    // file's read once, instead of parsing every module of every process.
    let mut by_file = BuildIdsByFile::default();
    let mut passed_over = BTreeMap::new();
    let table = process_table();
    for member in resolve_in(selector, &table)? {
        let maps = if *selector == Selector::All {
            by_file.maps_build_id(member.pid, build_id)
        } else {
            maps_build_id(member.pid, build_id)
        };
        if *selector == Selector::All && matches!(maps, Ok(false) | Err(_)) {
            *passed_over.entry(passed_over_reason(maps)).or_insert(0) += 1;
            continue;
        }
        match maps {
            Ok(true) => targets.push(member),
            Ok(false) => skipped.push((member, format!("does not map the module with build-id {build_id}"))),
            Err(reason) => skipped.push((member, reason)),
        }
    }
    if targets.is_empty() {
        return Err(bad_input(format!(
            "no process of {selector} maps the module with build-id {build_id} ({} looked at)",
            skipped.len() + passed_over.values().sum::<usize>()
        )));
    }
    Ok(Members {
        selector: selector.clone(),
        targets,
        skipped,
        passed_over,
        parents: table.values().map(|m| (m.pid, m.ppid)).collect(),
    })
}

/// Why a process was passed over host-wide (counted, not listed: a host
/// has hundreds of them).
fn passed_over_reason(maps: Result<bool, String>) -> String {
    match maps {
        Ok(_) => "do not map the module".to_string(),
        Err(error) if error.contains("ermission") => "could not be read (permission denied)".to_string(),
        Err(_) => "exited or could not be read".to_string(),
    }
}

/// Build-ids of mapped files, by (device, inode), each file read once.
#[derive(Default)]
struct BuildIdsByFile {
    known: BTreeMap<(String, u64), Option<String>>,
}

impl BuildIdsByFile {
    /// Whether `pid` maps a file whose build-id is `build_id`. The file is
    /// opened by the path its maps show and used only if its device and
    /// inode are the mapped ones (a replaced file falls back to reading
    /// the process's modules).
    fn maps_build_id(&mut self, pid: i32, build_id: &str) -> Result<bool, String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(_), Some(_), Some(offset), Some(device), Some(inode), Some(path)) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                continue;
            };
            let Ok(inode) = inode.parse::<u64>() else { continue };
            if inode == 0 || offset != "00000000" || !path.starts_with('/') {
                continue;
            }
            let key = (device.to_string(), inode);
            if !self.known.contains_key(&key) {
                let found = match file_build_id(Path::new(path), device, inode) {
                    Some(found) => found,
                    // Replaced or unreadable by path: ask the process.
                    None => return maps_build_id(pid, build_id),
                };
                self.known.insert(key.clone(), found);
            }
            if self.known[&key].as_deref() == Some(build_id) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The build-id of the ELF file at `path` if it is still the file mapped
/// as `device` (`MM:mm` in hex) and `inode`: `Some(None)` for a file
/// without one (or not ELF), `None` when the path names another file now.
fn file_build_id(path: &Path, device: &str, inode: u64) -> Option<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let (major, minor) = device.split_once(':')?;
    let (major, minor) = (
        u64::from_str_radix(major, 16).ok()?,
        u64::from_str_radix(minor, 16).ok()?,
    );
    let dev = meta.dev();
    // Linux's encoding of dev_t (glibc gnu_dev_major/minor).
    let live_major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let live_minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    if meta.ino() != inode || live_major != major || live_minor != minor {
        return None;
    }
    let build_id = shadowpatch_symbols::elf::file_build_id(path).ok().flatten();
    Some(build_id.as_deref().map(shadowpatch_symbols::hex))
}

pub(crate) fn maps_build_id(pid: i32, build_id: &str) -> Result<bool, String> {
    let maps = shadowpatch_process::maps::read_maps(pid).map_err(|e| e.to_string())?;
    let modules = shadowpatch_symbols::modules_of(pid, &maps).map_err(|e| e.to_string())?;
    Ok(modules.iter().any(|m| m.build_id_hex().as_deref() == Some(build_id)))
}

/// What became of one member.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MemberResult {
    pub pid: i32,
    pub comm: String,
    /// `applied`, `refused`, `failed`, `rolled_back`, `undone` (applied,
    /// then rolled back because another member failed), `not_attempted`.
    pub outcome: String,
    /// The activation (or rollback) pause, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A set operation's outcome.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SetOutcome {
    pub operation: String,
    pub selector: Selector,
    pub members: Vec<MemberResult>,
    pub skipped: Vec<(Member, String)>,
    /// The first failure's class (None: every member succeeded).
    pub failure: Option<FailureClass>,
    /// Members done before a failure were left as they are (`--partial`).
    pub partial: bool,
    /// Processes that joined the set while it was worked on: not covered.
    pub appeared: Vec<Member>,
    /// Host-wide, the processes passed over, counted by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub passed_over: BTreeMap<String, usize>,
}

impl SetOutcome {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// Apply the manifest of `template` to every member of `selector` that
/// maps its module: `apply_one` applies to one pid (the template with that
/// pid), `rollback_one` undoes one. On the first member that fails or is
/// refused, the members already applied are rolled back (newest first)
/// unless `partial`.
pub fn apply_set(
    selector: &Selector,
    template: &ApplyRequest,
    partial: bool,
    apply_one: &ApplyOne<'_>,
    rollback_one: &RollbackOne<'_>,
) -> Result<SetOutcome, OpsError> {
    apply_set_with_progress(None, selector, template, partial, 1, apply_one, rollback_one, &|_| {})
}

/// Applies to one process (the CLI's: through the agent or `ops::apply`).
pub type ApplyOne<'a> = dyn Fn(&ApplyRequest) -> Result<ApplyResult, OpsError> + Sync + 'a;
/// Rolls back one process.
pub type RollbackOne<'a> = dyn Fn(&RollbackRequest) -> Result<RolledBack, OpsError> + Sync + 'a;
/// Told before each member.
pub type ProgressSink<'p> = dyn Fn(SetProgress<'_>) + Sync + 'p;

/// How far a set operation is: members started (applied, failed, undone...)
/// of the members it works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetProgress<'a> {
    pub done: usize,
    pub total: usize,
    /// What is being done now (`applying`, `undoing`, `rolling back`).
    pub phase: &'a str,
    pub pid: i32,
}

/// `apply_set`, telling `progress` before each member (a host-wide apply
/// is long work: the CLI draws a bar), with up to `workers` members worked
/// on at once. Each member is its own transaction under its own target
/// lock, so members are independent; each one's apply runs wholly on one
/// thread (ptrace belongs to the thread that attached). Members are taken
/// in order (children first); after a failure no new member is started.
/// Host-wide with `state_dir`, a process that already has the patch
/// active is passed over, not refused: `apply --all` run again patches
/// only newcomers.
#[allow(clippy::too_many_arguments)]
pub fn apply_set_with_progress(
    state_dir: Option<&Path>,
    selector: &Selector,
    template: &ApplyRequest,
    partial: bool,
    workers: usize,
    apply_one: &ApplyOne<'_>,
    rollback_one: &RollbackOne<'_>,
    progress: &ProgressSink<'_>,
) -> Result<SetOutcome, OpsError> {
    // The manifest is read here only for its build-id: each member's apply
    // reads, checks and surveys it as a single apply does.
    let input = PatchInput::read(&template.manifest)?;
    let build_id = input.manifest.build_id_lowercase();
    let mut found = members(selector, &build_id)?;
    // Members passed over because they already have the patch: known, not
    // newcomers.
    let mut already_patched = BTreeSet::new();
    // Host-wide only: a tree, cgroup or unit with a member already
    // patched is refused whole (all or none), as it always was.
    if let (Some(state_dir), Selector::All) = (state_dir, selector) {
        let id = &input.manifest.id;
        // Only a pid with a target directory can have the patch: one
        // listing of targets/ instead of identifying every member.
        let with_dirs: BTreeSet<i32> = with_state(state_dir, found.targets.clone())
            .0
            .iter()
            .map(|m| m.pid)
            .collect();
        let (already, to_do): (Vec<Member>, Vec<Member>) = std::mem::take(&mut found.targets)
            .into_iter()
            .partition(|m| with_dirs.contains(&m.pid) && active_patches(state_dir, m.pid).contains(id));
        found.targets = to_do;
        already_patched.extend(already.iter().map(|m| m.pid));
        if *selector == Selector::All {
            if !already.is_empty() {
                found
                    .passed_over
                    .insert(format!("already have patch {id} active"), already.len());
            }
        } else {
            found.skipped.extend(
                already
                    .into_iter()
                    .map(|m| (m, format!("already has patch {id} active"))),
            );
        }
        if found.targets.is_empty() {
            return Err(bad_input(format!(
                "every process of {selector} that maps the module already has patch {id} active"
            )));
        }
    }
    // Host-wide, a process never mirrored is mirrored for the patched
    // module only: the rest of its code is not what the patch changes, and
    // writing every process's own copy of glibc to disk cost more than the
    // rest of the apply (`shadowpatch mirror PID` mirrors all of it).
    let template = ApplyRequest {
        baseline_module_only: template.baseline_module_only || *selector == Selector::All,
        ..template.clone()
    };
    // Members none of whose ancestors has state: nothing to adopt (see
    // `ApplyRequest::no_ancestor_state`).
    let orphans = state_dir
        .map(|state_dir| without_ancestor_state(state_dir, &found))
        .unwrap_or_default();
    let total = found.targets.len();
    // Applied members, in the order their transactions committed.
    let done: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    if let (Some(state_dir), true) = (state_dir, workers.clamp(1, total.max(1)) > 1) {
        // Made once before the workers start: two first applies creating
        // it at once would each find the other's half-made directory.
        shadowpatch_mirror::StateDir::create(state_dir)?;
    }
    let group = batch_sync(state_dir, selector)?;
    let _history = history_group(state_dir, selector);
    let slots = in_parallel(total, workers, &|index| {
        let member = &found.targets[index];
        progress(SetProgress {
            done: index,
            total,
            phase: "applying",
            pid: member.pid,
        });
        let _batch = group.as_ref().map(|group| group.enter());
        let host_wide = *selector == Selector::All;
        let (member_result, failed) =
            apply_member(member, &template, orphans.contains(&member.pid), host_wide, apply_one);
        if member_result.outcome == "applied" {
            done.lock().unwrap_or_else(|p| p.into_inner()).push(member.pid);
        }
        let stop = failed.is_some();
        ((member_result, failed), stop)
    });
    let mut failure = None;
    let mut results: Vec<MemberResult> = Vec::new();
    for (member, slot) in found.targets.iter().zip(slots) {
        match slot {
            Some((member_result, failed)) => {
                // The first failure in set order names the outcome's class.
                if failure.is_none() {
                    failure = failed;
                }
                results.push(member_result);
            }
            None => results.push(result(member, "not_attempted", None, None)),
        }
    }
    finish_batch(state_dir, group.as_deref())?;
    let done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    if failure.is_some() && !partial {
        for (undone, pid) in done.iter().rev().enumerate() {
            progress(SetProgress {
                done: undone,
                total: done.len(),
                phase: "undoing",
                pid: *pid,
            });
            let request = RollbackRequest {
                pid: *pid,
                patch_id: Some(input.manifest.id.clone()),
                restore_state: false,
                cause: "set-undo".into(),
            };
            let entry = results.iter_mut().find(|r| r.pid == *pid).expect("a result per member");
            match rollback_one(&request) {
                Ok(rolled) => {
                    entry.outcome = "undone".into();
                    entry.pause_us = Some(rolled.rollback.pause_us);
                }
                Err(error) => {
                    entry.error = Some(format!("undoing it failed: {error}"));
                }
            }
        }
    }
    Ok(SetOutcome {
        operation: "apply".into(),
        appeared: appeared(selector, &found, &already_patched, &build_id),
        selector: selector.clone(),
        members: results,
        skipped: found.skipped,
        failure,
        partial,
        passed_over: found.passed_over,
    })
}

/// Host-wide, the members' state files are made durable together: each
/// member keeps its own directory, lock and journal, but its records and
/// mirror files are synced by `syncfs` calls that its worker shares with
/// the others waiting at the same time, each made before the worker next
/// stops or writes a target (`process::durable`). So every member's
/// journal record is still on disk before the step it announces, and
/// recovery is unchanged; thousands of fsyncs become a few dozen syncs.
fn batch_sync(
    state_dir: Option<&Path>,
    selector: &Selector,
) -> Result<Option<std::sync::Arc<shadowpatch_process::durable::GroupSync>>, OpsError> {
    let (Some(state_dir), Selector::All) = (state_dir, selector) else {
        return Ok(None);
    };
    shadowpatch_mirror::StateDir::create(state_dir)?;
    shadowpatch_process::durable::GroupSync::new(state_dir)
        .map(Some)
        .map_err(|e| {
            OpsError::Patch(shadowpatch_patch::PatchError::Journal {
                path: state_dir.to_path_buf(),
                message: format!("opening it to sync the state files: {e}"),
            })
        })
}

/// Host-wide, the members' history events are written a group at a time
/// (`shadowpatch_store::HistoryGroup`), the last ones when the set ends.
fn history_group(state_dir: Option<&Path>, selector: &Selector) -> Option<shadowpatch_store::HistoryGroup> {
    match (state_dir, selector) {
        (Some(state_dir), Selector::All) => Some(shadowpatch_store::HistoryGroup::open(state_dir)),
        _ => None,
    }
}

/// The last members' publications (their generation files renamed or
/// removed after their commits) made durable before the set reports.
fn finish_batch(
    state_dir: Option<&Path>,
    group: Option<&shadowpatch_process::durable::GroupSync>,
) -> Result<(), OpsError> {
    match (state_dir, group) {
        (Some(state_dir), Some(group)) => group.sync().map_err(|errno| {
            OpsError::Patch(shadowpatch_patch::PatchError::Journal {
                path: state_dir.to_path_buf(),
                message: format!("syncing the state files (syncfs): {errno}"),
            })
        }),
        _ => Ok(()),
    }
}

/// A member's result, and its failure's class if it failed.
type MemberOutcome = (MemberResult, Option<FailureClass>);

/// Members worked on at once host-wide when not told (`--jobs`): a
/// member spends most of its time waiting, for the `syncfs` rounds its
/// worker shares with the others (`durable::GroupSync`, two per member)
/// and for its target to stop, not computing. The more members wait at
/// each round, the fewer rounds: on 2 CPUs, 1,000 members took 1.8 s with
/// 16 workers, 1.7 s with 32 and 1.4 s with 64 (`apply --all`, CLI,
/// workers at nice 10 so that their targets stop as soon as asked). 32 per
/// CPU, 8 to 64 (the most `--jobs` takes).
pub fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 32).clamp(8, 64)
}

/// The nice value of a set's worker threads.
const WORKER_NICE: i32 = 10;

/// Run `one(index)` for every index below `total` on up to `workers`
/// threads, in index order of start; `one` returns its result and whether
/// no further index should start (a failure of an all-or-none set).
/// Each index runs wholly on one thread (ptrace belongs to the thread
/// that attached). `None`: not started.
fn in_parallel<T: Send>(total: usize, workers: usize, one: &(dyn Fn(usize) -> (T, bool) + Sync)) -> Vec<Option<T>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let slots: std::sync::Mutex<Vec<Option<T>>> = std::sync::Mutex::new((0..total).map(|_| None).collect());
    let work = || loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let index = next.fetch_add(1, Ordering::SeqCst);
        if index >= total {
            break;
        }
        let (outcome, stop_after) = one(index);
        if stop_after {
            stop.store(true, Ordering::SeqCst);
        }
        slots.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(outcome);
    };
    let workers = workers.clamp(1, total.max(1));
    if workers == 1 {
        work();
    } else {
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    // Below the services being patched (see
                    // `set_thread_nice`); refused, the worker runs as is.
                    let _ = shadowpatch_sys::sched::set_thread_nice(WORKER_NICE);
                    work()
                });
            }
        });
    }
    slots.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// One member's apply.
/// Host-wide (`host_wide`), a member found to carry the patch already
/// (forked from a process that had it: adopting its ancestor's state
/// showed the patch active) is passed over as `already_active`, as a
/// member known to have it is before the set starts.
fn apply_member(
    member: &Member,
    template: &ApplyRequest,
    no_ancestor_state: bool,
    host_wide: bool,
    apply_one: &ApplyOne<'_>,
) -> MemberOutcome {
    let request = ApplyRequest {
        pid: member.pid,
        no_ancestor_state,
        ..template.clone()
    };
    match apply_one(&request) {
        Ok(ApplyResult::Applied(applied)) if !applied.rolled_back_by_watch() => {
            (result(member, "applied", Some(applied.apply.pause_us), None), None)
        }
        Ok(ApplyResult::Applied(applied)) => {
            let message = applied
                .watch
                .as_ref()
                .map(|w| format!("rolled back by its watch window: {}", w.reason))
                .unwrap_or_default();
            (
                result(member, "rolled_back", None, Some(message)),
                Some(FailureClass::FailedMidway),
            )
        }
        Ok(ApplyResult::Refused(refused))
            if host_wide
                && refused
                    .analysis
                    .analysis
                    .findings
                    .iter()
                    .any(|f| f.code == DUPLICATE_PATCH_ID) =>
        {
            (result(member, "already_active", None, None), None)
        }
        // Forced past the analysis, the transaction says so.
        Err(OpsError::Patch(shadowpatch_patch::PatchError::DuplicateId { .. })) if host_wide => {
            (result(member, "already_active", None, None), None)
        }
        Ok(ApplyResult::Refused(refused)) => (
            result(member, "refused", None, Some(refused.message.clone())),
            Some(refused.class),
        ),
        Err(error) => (
            result(member, "failed", None, Some(error.to_string())),
            Some(error.class()),
        ),
    }
}

/// Roll back `patch_id` (None: each member's latest patch) on every member
/// of `selector` that has a patch active. Every member is attempted; the
/// first failure's class is the outcome's.
pub fn rollback_set(
    state_dir: &Path,
    selector: &Selector,
    patch_id: Option<&str>,
    rollback_one: &RollbackOne<'_>,
) -> Result<SetOutcome, OpsError> {
    rollback_set_with_progress(state_dir, selector, patch_id, 1, rollback_one, &|_| {})
}

/// `rollback_set`, telling `progress` before each member, with up to
/// `workers` members rolled back at once (each its own transaction under
/// its own lock, as for an apply).
pub fn rollback_set_with_progress(
    state_dir: &Path,
    selector: &Selector,
    patch_id: Option<&str>,
    workers: usize,
    rollback_one: &RollbackOne<'_>,
    progress: &ProgressSink<'_>,
) -> Result<SetOutcome, OpsError> {
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    let mut passed_over = BTreeMap::new();
    let mut failure = None;
    let all = resolve(selector)?;
    let all = if *selector == Selector::All {
        // Those with state, and those forked from one (a worker a patched
        // master forked after the apply carries the patch with no state of
        // its own): adopted below, before their ancestors roll back and
        // the generations that describe them are gone.
        let with_state = pids_with_state(state_dir);
        let parents: BTreeMap<i32, i32> = all.iter().map(|m| (m.pid, m.ppid)).collect();
        let total = all.len();
        let kept: Vec<Member> = all
            .into_iter()
            .filter(|m| with_state.contains(&m.pid) || ancestor_in(m.ppid, &parents, &with_state) == Some(true))
            .collect();
        passed_over.insert("have no state here".to_string(), total - kept.len());
        kept
    } else {
        all
    };
    let mut wanted_members = Vec::new();
    for member in &all {
        // Identified once for the adoption check and the journal lookup (a
        // member gone meanwhile has no active patch).
        let identity = ProcessIdentity::of(member.pid).ok();
        // A child forked after the apply carries the patch: adopted first
        // (children come before their ancestors, whose state they copy).
        if let Some(identity) = &identity {
            if let Err(error) = crate::adopt::adopt_if_forked_of(state_dir, identity) {
                if !matches!(error, OpsError::Target(_)) {
                    failure.get_or_insert(error.class());
                    results.push(result(member, "failed", None, Some(error.to_string())));
                    continue;
                }
            }
        }
        let active = identity
            .as_ref()
            .map(|identity| active_patches_of(state_dir, identity))
            .unwrap_or_default();
        let wanted = match patch_id {
            Some(id) => active.iter().any(|a| a == id),
            None => !active.is_empty(),
        };
        if !wanted {
            if *selector == Selector::All {
                *passed_over.entry("have no such active patch".to_string()).or_insert(0) += 1;
            } else {
                skipped.push((member.clone(), "has no such active patch".to_string()));
            }
            continue;
        }
        wanted_members.push(member);
    }
    let total = wanted_members.len();
    let group = batch_sync(Some(state_dir), selector)?;
    let _history = history_group(Some(state_dir), selector);
    // Every member is attempted, whatever the others did.
    let rolled = in_parallel(total, workers, &|index| {
        let member = wanted_members[index];
        let _batch = group.as_ref().map(|group| group.enter());
        progress(SetProgress {
            done: index,
            total,
            phase: "rolling back",
            pid: member.pid,
        });
        let request = RollbackRequest {
            pid: member.pid,
            patch_id: patch_id.map(str::to_string),
            restore_state: false,
            cause: "command".into(),
        };
        let outcome = match rollback_one(&request) {
            Ok(rolled) => (
                result(member, "rolled_back", Some(rolled.rollback.pause_us), None),
                None,
            ),
            Err(error) => (
                result(member, "failed", None, Some(error.to_string())),
                Some(error.class()),
            ),
        };
        (outcome, false)
    });
    finish_batch(Some(state_dir), group.as_deref())?;
    for (member_result, failed) in rolled.into_iter().flatten() {
        if let Some(class) = failed {
            failure.get_or_insert(class);
        }
        results.push(member_result);
    }
    if results.is_empty() {
        return Err(bad_input(format!(
            "no process of {selector} has {} active",
            patch_id.map_or("a patch".to_string(), |id| format!("patch {id}"))
        )));
    }
    Ok(SetOutcome {
        operation: "rollback".into(),
        selector: selector.clone(),
        members: results,
        skipped,
        failure,
        partial: true,
        appeared: Vec::new(),
        passed_over,
    })
}

/// The ids of `pid`'s active patches, as its journal says (none when it
/// has no state).
fn active_patches(state_dir: &Path, pid: i32) -> Vec<String> {
    let Ok(identity) = ProcessIdentity::of(pid) else {
        return Vec::new();
    };
    active_patches_of(state_dir, &identity)
}

/// [`active_patches`] of a process whose identity the caller has read.
fn active_patches_of(state_dir: &Path, identity: &ProcessIdentity) -> Vec<String> {
    crate::journal_if_any(state_dir, identity)
        .ok()
        .flatten()
        .map(|journal| journal.active.iter().map(|p| p.id.clone()).collect())
        .unwrap_or_default()
}

fn result(member: &Member, outcome: &str, pause_us: Option<u64>, error: Option<String>) -> MemberResult {
    MemberResult {
        pid: member.pid,
        comm: member.comm.clone(),
        outcome: outcome.into(),
        pause_us,
        error,
    }
}

/// Members of the set now that were not when it was resolved (a worker
/// forked meanwhile): said, not silently missed. Host-wide, only those
/// that map the module (the host starts processes all the time).
fn appeared(selector: &Selector, before: &Members, also_known: &BTreeSet<i32>, build_id: &str) -> Vec<Member> {
    let mut known: BTreeSet<i32> = before
        .targets
        .iter()
        .chain(before.skipped.iter().map(|(m, _)| m))
        .map(|m| m.pid)
        .collect();
    known.extend(also_known);
    let mut by_file = BuildIdsByFile::default();
    resolve(selector)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !known.contains(&m.pid))
        .filter(|m| *selector != Selector::All || by_file.maps_build_id(m.pid, build_id) == Ok(true))
        .collect()
}

/// The finding of a target that has the patch active already.
const DUPLICATE_PATCH_ID: &str = "duplicate-patch-id";

/// The members of `found` none of whose ancestors (in the process table
/// the set was resolved from) has a target directory in `state_dir`, any
/// incarnation of its pid, read now, before any member is worked on. A
/// member whose ancestry is not all in the table is not among them.
fn without_ancestor_state(state_dir: &Path, found: &Members) -> BTreeSet<i32> {
    let with_state = pids_with_state(state_dir);
    found
        .targets
        .iter()
        // An ancestry not all in the table may have state: walked.
        .filter(|member| ancestor_in(member.ppid, &found.parents, &with_state) == Some(false))
        .map(|member| member.pid)
        .collect()
}

/// Ancestors looked at above a member, at most (as `adopt` does).
const MAX_ANCESTORS: usize = 64;

/// Whether `parent` or one of its ancestors (by `parents`: pid → ppid) is
/// in `pids`: `None` when the walk leaves the table (or goes on past
/// [`MAX_ANCESTORS`]) before reaching the top.
fn ancestor_in(parent: i32, parents: &BTreeMap<i32, i32>, pids: &BTreeSet<i32>) -> Option<bool> {
    let mut at = parent;
    for _ in 0..MAX_ANCESTORS {
        if at <= 0 {
            return Some(false);
        }
        if pids.contains(&at) {
            return Some(true);
        }
        at = *parents.get(&at)?;
    }
    None
}

/// The pids that have a target directory in `state_dir`, from one listing.
fn pids_with_state(state_dir: &Path) -> BTreeSet<i32> {
    std::fs::read_dir(state_dir.join("targets"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name();
                    let name = name.to_str()?;
                    if name.contains(".exec-") {
                        return None;
                    }
                    name.split_once('-')?.0.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The members that have a target directory in `state_dir` (any
/// incarnation of their pid: the operation checks which), and how many
/// do not.
pub fn with_state(state_dir: &Path, members: Vec<Member>) -> (Vec<Member>, usize) {
    let pids = pids_with_state(state_dir);
    let total = members.len();
    let kept: Vec<Member> = members.into_iter().filter(|m| pids.contains(&m.pid)).collect();
    let without = total - kept.len();
    (kept, without)
}

/// Every live descendant of `roots` (not the roots), parents before
/// their children, from one read of the process table.
pub fn descendants(roots: &BTreeSet<i32>) -> Vec<Member> {
    let table = process_table();
    let mut found = Vec::new();
    let mut frontier: Vec<i32> = roots.iter().copied().collect();
    let mut seen = roots.clone();
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for member in table.values().filter(|m| frontier.contains(&m.ppid)) {
            if seen.insert(member.pid) {
                next.push(member.pid);
                found.push(member.clone());
            }
        }
        frontier = next;
    }
    found
}

/// Every process: pid → (comm, ppid), from /proc/PID/stat.
fn process_table() -> BTreeMap<i32, Member> {
    let mut table = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // A process can exit between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(member) = parse_stat(pid, &stat) {
            table.insert(pid, member);
        }
    }
    table
}

/// comm and ppid from a /proc/PID/stat line; `None` for a zombie.
fn parse_stat(pid: i32, stat: &str) -> Option<Member> {
    let fields = shadowpatch_process::identity::parse_stat(stat)?;
    if fields.state == 'Z' || fields.state == 'X' {
        return None;
    }
    Some(Member {
        pid,
        comm: fields.comm,
        ppid: fields.ppid,
    })
}

/// The mounted cgroup hierarchies, from /proc/self/mountinfo: cgroup v2
/// first, then the v1 `name=systemd` hierarchy (where units live on a
/// hybrid host), then the other v1 controllers. On a hybrid host
/// /sys/fs/cgroup itself is a tmpfs, not a cgroup: never trust a path for
/// being under it.
fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<(u8, PathBuf)> = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let rank = match (right.next(), right.nth(1)) {
            (Some("cgroup2"), _) => 0,
            (Some("cgroup"), Some(options)) if options.split(',').any(|o| o == "name=systemd") => 1,
            (Some("cgroup"), _) => 2,
            _ => continue,
        };
        // Octal escapes (a space is \040) are not expected in these paths.
        mounts.push((rank, PathBuf::from(point)));
    }
    mounts.sort();
    mounts.into_iter().map(|(_, path)| path).collect()
}

/// A cgroup path as given: absolute (under a mounted cgroup hierarchy) or
/// relative to one (the first hierarchy holding it), checked to exist.
fn cgroup_dir(path: &Path) -> Result<PathBuf, OpsError> {
    let mounts = cgroup_mounts();
    let shown = || {
        mounts
            .iter()
            .map(|m| m.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let candidates: Vec<PathBuf> = if path.is_absolute() {
        if !mounts.iter().any(|m| path.starts_with(m)) {
            return Err(bad_input(format!(
                "--cgroup {}: not in a mounted cgroup hierarchy ({})",
                path.display(),
                shown()
            )));
        }
        vec![path.to_path_buf()]
    } else {
        mounts.iter().map(|m| m.join(path)).collect()
    };
    candidates
        .into_iter()
        .find(|dir| dir.join("cgroup.procs").is_file())
        .ok_or_else(|| {
            bad_input(format!(
                "--cgroup {}: no such cgroup in the mounted hierarchies ({})",
                path.display(),
                shown()
            ))
        })
}

/// The cgroup of unit `name` (NAME, or NAME.service when NAME has no
/// suffix): the first directory of that name in the cgroup v2 and
/// `name=systemd` hierarchies.
fn unit_dir(name: &str) -> Result<PathBuf, OpsError> {
    if name.is_empty() || name.contains('/') {
        return Err(bad_input(format!("--unit {name:?}: a unit name has no '/'")));
    }
    let wanted: Vec<String> = if name.contains('.') {
        vec![name.to_string()]
    } else {
        vec![format!("{name}.service"), name.to_string()]
    };
    let mounts = cgroup_mounts();
    let roots: Vec<PathBuf> = mounts
        .iter()
        .filter(|m| {
            m.join("cgroup.controllers").exists() || m.file_name().is_some_and(|n| n == "systemd" || n == "unified")
        })
        .cloned()
        .collect();
    let mut queue: std::collections::VecDeque<(PathBuf, usize)> = roots.iter().map(|r| (r.clone(), 0)).collect();
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut children: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        children.sort();
        for child in children {
            if child
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| wanted.iter().any(|w| w == n))
                && child.join("cgroup.procs").is_file()
            {
                return Ok(child);
            }
            if depth < 8 {
                queue.push_back((child, depth + 1));
            }
        }
    }
    Err(bad_input(format!(
        "--unit {name}: no cgroup named {} in {} (is the unit running?)",
        wanted.join(" or "),
        if roots.is_empty() {
            "any mounted cgroup hierarchy".to_string()
        } else {
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    )))
}

/// The pids of a cgroup and its descendant cgroups.
fn cgroup_pids(dir: &Path) -> Result<BTreeSet<i32>, OpsError> {
    let mut pids = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
            .map_err(|e| bad_input(format!("reading {}: {e}", dir.join("cgroup.procs").display())))?;
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let rest = "42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 5000";
        let member = parse_stat(42, &format!("42 (a (b) c) S 7 {rest}")).unwrap();
        assert_eq!(member.comm, "a (b) c");
        assert_eq!(member.ppid, 7);
        assert!(parse_stat(43, &format!("43 (zombie) Z 1 {rest}")).is_none());
        assert!(parse_stat(44, "garbage").is_none());
    }

    #[test]
    fn cgroup_hierarchies_come_from_mountinfo() {
        // /sys/fs/cgroup may be a tmpfs holding v1 hierarchies (a hybrid
        // host): only real cgroup mounts count.
        for mount in cgroup_mounts() {
            assert!(mount.join("cgroup.procs").is_file(), "{}", mount.display());
        }
    }

    #[test]
    fn an_ancestor_is_found_the_top_reached_or_the_table_left() {
        // 1 ← 10 ← 20 ← 30, and 40 whose parent 99 is not in the table.
        let parents = BTreeMap::from([(1, 0), (10, 1), (20, 10), (30, 20), (40, 99)]);
        let with_state = BTreeSet::from([10]);
        assert_eq!(ancestor_in(20, &parents, &with_state), Some(true));
        assert_eq!(ancestor_in(10, &parents, &with_state), Some(true));
        assert_eq!(ancestor_in(1, &parents, &with_state), Some(false));
        assert_eq!(ancestor_in(99, &parents, &with_state), None);
        assert_eq!(ancestor_in(20, &parents, &BTreeSet::new()), Some(false));
    }

    #[test]
    fn a_missing_cgroup_or_unit_is_named() {
        let error = cgroup_dir(Path::new("no/such/group-xyz")).unwrap_err().to_string();
        assert!(error.contains("--cgroup no/such/group-xyz: no such cgroup"), "{error}");
        let error = cgroup_dir(Path::new("/tmp")).unwrap_err().to_string();
        assert!(error.contains("not in a mounted cgroup hierarchy"), "{error}");
        let error = unit_dir("no-such-unit-xyz").unwrap_err().to_string();
        assert!(error.contains("no-such-unit-xyz.service"), "{error}");
        assert!(unit_dir("a/b").is_err());
    }
}
