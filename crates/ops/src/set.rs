//! Target sets: one operation over many processes — a process tree
//! (`--tree`), a cgroup (`--cgroup`) or a systemd unit's cgroup
//! (`--unit`). Every member that maps the manifest's module (by build-id)
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
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Tree(pid) => write!(f, "the process tree of pid {pid}"),
            Selector::Cgroup(path) => write!(f, "cgroup {}", path.display()),
            Selector::Unit(name) => write!(f, "unit {name}"),
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
}

/// The processes `selector` names, sorted children first. An empty set,
/// or a cgroup or unit that does not exist, is bad input.
pub fn resolve(selector: &Selector) -> Result<Vec<Member>, OpsError> {
    let table = process_table();
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
    for member in resolve(selector)? {
        match maps_build_id(member.pid, build_id) {
            Ok(true) => targets.push(member),
            Ok(false) => skipped.push((member, format!("does not map the module with build-id {build_id}"))),
            Err(reason) => skipped.push((member, reason)),
        }
    }
    if targets.is_empty() {
        return Err(bad_input(format!(
            "no process of {selector} maps the module with build-id {build_id} ({} looked at)",
            skipped.len()
        )));
    }
    Ok(Members {
        selector: selector.clone(),
        targets,
        skipped,
    })
}

fn maps_build_id(pid: i32, build_id: &str) -> Result<bool, String> {
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
    apply_one: &mut dyn FnMut(&ApplyRequest) -> Result<ApplyResult, OpsError>,
    rollback_one: &mut dyn FnMut(&RollbackRequest) -> Result<RolledBack, OpsError>,
) -> Result<SetOutcome, OpsError> {
    // The manifest is read here only for its build-id: each member's apply
    // reads, checks and surveys it as a single apply does.
    let input = PatchInput::read(&template.manifest)?;
    let build_id = input.manifest.build_id_lowercase();
    let found = members(selector, &build_id)?;
    let mut results: Vec<MemberResult> = Vec::new();
    let mut done: Vec<i32> = Vec::new();
    let mut failure = None;
    for member in &found.targets {
        if failure.is_some() {
            results.push(result(member, "not_attempted", None, None));
            continue;
        }
        let request = ApplyRequest {
            pid: member.pid,
            ..template.clone()
        };
        match apply_one(&request) {
            Ok(ApplyResult::Applied(applied)) if !applied.rolled_back_by_watch() => {
                done.push(member.pid);
                results.push(result(member, "applied", Some(applied.apply.pause_us), None));
            }
            Ok(ApplyResult::Applied(applied)) => {
                failure = Some(FailureClass::FailedMidway);
                let message = applied
                    .watch
                    .as_ref()
                    .map(|w| format!("rolled back by its watch window: {}", w.reason))
                    .unwrap_or_default();
                results.push(result(member, "rolled_back", None, Some(message)));
            }
            Ok(ApplyResult::Refused(refused)) => {
                failure = Some(refused.class);
                results.push(result(member, "refused", None, Some(refused.message.clone())));
            }
            Err(error) => {
                failure = Some(error.class());
                results.push(result(member, "failed", None, Some(error.to_string())));
            }
        }
    }
    if failure.is_some() && !partial {
        for pid in done.iter().rev() {
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
        appeared: appeared(selector, &found),
        selector: selector.clone(),
        members: results,
        skipped: found.skipped,
        failure,
        partial,
    })
}

/// Roll back `patch_id` (None: each member's latest patch) on every member
/// of `selector` that has a patch active. Every member is attempted; the
/// first failure's class is the outcome's.
pub fn rollback_set(
    state_dir: &Path,
    selector: &Selector,
    patch_id: Option<&str>,
    rollback_one: &mut dyn FnMut(&RollbackRequest) -> Result<RolledBack, OpsError>,
) -> Result<SetOutcome, OpsError> {
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    let mut failure = None;
    let all = resolve(selector)?;
    for member in &all {
        // A child forked after the apply carries the patch: adopted first
        // (children come before their ancestors, whose state they copy).
        if let Err(error) = crate::adopt::adopt_if_forked(state_dir, member.pid) {
            if !matches!(error, OpsError::Target(_)) {
                failure.get_or_insert(error.class());
                results.push(result(member, "failed", None, Some(error.to_string())));
                continue;
            }
        }
        let active = active_patches(state_dir, member.pid);
        let wanted = match patch_id {
            Some(id) => active.iter().any(|a| a == id),
            None => !active.is_empty(),
        };
        if !wanted {
            skipped.push((member.clone(), "has no such active patch".to_string()));
            continue;
        }
        let request = RollbackRequest {
            pid: member.pid,
            patch_id: patch_id.map(str::to_string),
            restore_state: false,
            cause: "command".into(),
        };
        match rollback_one(&request) {
            Ok(rolled) => results.push(result(member, "rolled_back", Some(rolled.rollback.pause_us), None)),
            Err(error) => {
                failure.get_or_insert(error.class());
                results.push(result(member, "failed", None, Some(error.to_string())));
            }
        }
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
    })
}

/// The ids of `pid`'s active patches, as its journal says (none when it
/// has no state).
fn active_patches(state_dir: &Path, pid: i32) -> Vec<String> {
    let Ok(identity) = ProcessIdentity::of(pid) else {
        return Vec::new();
    };
    crate::journal_if_any(state_dir, &identity)
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

/// Members of the set now that were not when it was resolved and that map
/// the module (a worker forked meanwhile): said, not silently missed.
fn appeared(selector: &Selector, before: &Members) -> Vec<Member> {
    let known: BTreeSet<i32> = before
        .targets
        .iter()
        .chain(before.skipped.iter().map(|(m, _)| m))
        .map(|m| m.pid)
        .collect();
    resolve(selector)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !known.contains(&m.pid))
        .collect()
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

/// comm and ppid from a /proc/PID/stat line (comm may hold spaces and
/// parentheses: it ends at the last ')').
fn parse_stat(pid: i32, stat: &str) -> Option<Member> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let ppid = rest.next()?.parse().ok()?;
    Some(Member { pid, comm, ppid })
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
        let member = parse_stat(42, "42 (a (b) c) S 7 42 42 0 -1").unwrap();
        assert_eq!(member.comm, "a (b) c");
        assert_eq!(member.ppid, 7);
        assert!(parse_stat(43, "43 (zombie) Z 1 43").is_none());
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
