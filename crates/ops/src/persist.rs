//! Patches that survive restarts: `apply … --persist` leaves a rule in
//! the state directory (`persist/<patch id>.json`) naming the patch, the
//! build-id it was made for and where to look: a systemd unit, a cgroup, or
//! a program path. The agent sweeps every rule about once a second
//! (`sweep`) and applies the patch, through `ops::apply` with the rule's
//! own settings (trust policy, analysis gate, history), to every process
//! there that started after the rule was made, maps the module with that
//! build-id and does not carry the patch yet: a service restarted, a worker
//! exec'd afresh. Processes already running when the rule was made are
//! left as they are: which of them to patch was the user's choice. A process there
//! whose program has another build-id (the package was upgraded) is not
//! patched; the agent records that once per process (`persist` event,
//! outcome `build_id_changed`) and counts it. `shadowpatch unpersist ID`
//! removes the rule; nothing is rolled back by it.
//!
//! Each rule is one small JSON file written atomically, so the CLI, the
//! agent and a restarted agent all read the same rules.

use crate::apply::{ApplyRequest, ApplyResult};
use crate::set::{resolve, Selector};
use crate::{bad_input, OpsError};
use shadowpatch_process::ProcessIdentity;
use shadowpatch_store::{record_best_effort, EventKind, NewEvent};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The folder of rules in a state directory.
pub const DIR: &str = "persist";

/// Where a rule looks for new processes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// A cgroup or a unit's cgroup (`--cgroup`, `--unit`).
    Set(Selector),
    /// Every process running this program (its `/proc/PID/exe`), absolute
    /// and with symlinks resolved.
    Program(PathBuf),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Set(selector) => selector.fmt(f),
            Scope::Program(path) => write!(f, "program {}", path.display()),
        }
    }
}

/// One persisted patch.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    /// The patch id (the manifest's `id`); one rule per patch.
    pub id: String,
    pub scope: Scope,
    /// The build-id (lower-case hex) of the module the patch was made for.
    pub build_id: String,
    /// The apply to repeat; `pid` is set per process.
    pub request: ApplyRequest,
    pub created_unix_ms: u64,
    /// When the rule was made, as the kernel dates processes: the boot
    /// (`/proc/sys/kernel/random/boot_id`) and the clock ticks since it.
    /// Only processes started since are new; the ones already running
    /// were the user's to patch (after a reboot every process is new).
    /// Stamped by `add`.
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub since_ticks: u64,
}

impl Rule {
    /// Whether a process that started at `start_time` (clock ticks since
    /// boot) appeared after the rule was made.
    pub fn is_new(&self, start_time: u64, boot_id: &str) -> bool {
        self.boot_id != boot_id || start_time >= self.since_ticks
    }
}

/// This boot's id and the clock ticks since it.
fn now_marks() -> (String, u64) {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (boot_id, (uptime * procfs::ticks_per_second() as f64) as u64)
}

/// Check and resolve a scope before anything is applied: a unit or cgroup
/// that does not exist, or a program path that is not a file, is bad input.
pub fn check_scope(scope: Scope) -> Result<Scope, OpsError> {
    match scope {
        Scope::Set(Selector::Tree(_)) => Err(bad_input(
            "--persist needs a unit, a cgroup or a program path: a process tree ends with its root",
        )),
        Scope::Set(selector) => {
            // Exists (an empty cgroup is fine: the service may be down).
            match resolve(&selector) {
                Ok(_) => Ok(Scope::Set(selector)),
                Err(OpsError::BadInput(message)) if message.ends_with("holds no process") => Ok(Scope::Set(selector)),
                Err(error) => Err(error),
            }
        }
        Scope::Program(path) => {
            let resolved = path
                .canonicalize()
                .map_err(|e| bad_input(format!("--persist program {}: {e}", path.display())))?;
            if !resolved.is_file() {
                return Err(bad_input(format!("--persist program {}: not a file", path.display())));
            }
            Ok(Scope::Program(resolved))
        }
    }
}

/// Record `rule` (replacing an earlier rule for the same patch id),
/// stamped with the time from which processes count as new.
pub fn add(state_dir: &Path, mut rule: Rule) -> Result<(Rule, PathBuf), OpsError> {
    (rule.boot_id, rule.since_ticks) = now_marks();
    let dir = state_dir.join(DIR);
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    let path = rule_path(state_dir, &rule.id)?;
    let bytes = serde_json::to_vec_pretty(&rule).expect("a rule serializes");
    shadowpatch_mirror::store::write_atomically(&path, &bytes).map_err(|e| io_error(&path, e))?;
    record_best_effort(
        state_dir,
        &NewEvent::new(EventKind::Persist)
            .patch(rule.id.clone())
            .outcome("added")
            .details(serde_json::json!({ "scope": rule.scope.to_string(), "build_id": rule.build_id })),
    );
    Ok((rule, path))
}

/// Remove the rule of patch `id`; the patch stays where it is applied.
pub fn remove(state_dir: &Path, id: &str) -> Result<Rule, OpsError> {
    let path = rule_path(state_dir, id)?;
    let rule = read_rule(&path)?.ok_or_else(|| {
        bad_input(format!(
            "no persisted patch {id:?} in {} (see `shadowpatch persisted`)",
            state_dir.join(DIR).display()
        ))
    })?;
    std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
    record_best_effort(
        state_dir,
        &NewEvent::new(EventKind::Persist)
            .patch(id.to_string())
            .outcome("removed")
            .details(serde_json::json!({ "scope": rule.scope.to_string() })),
    );
    Ok(rule)
}

/// Every rule, by patch id.
pub fn rules(state_dir: &Path) -> Result<Vec<Rule>, OpsError> {
    let dir = state_dir.join(DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&dir, e)),
    };
    let mut rules = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            if let Some(rule) = read_rule(&path)? {
                rules.push(rule);
            }
        }
    }
    rules.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(rules)
}

fn rule_path(state_dir: &Path, id: &str) -> Result<PathBuf, OpsError> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(bad_input(format!("patch id {id:?} cannot name a persisted patch")));
    }
    Ok(state_dir.join(DIR).join(format!("{id}.json")))
}

fn read_rule(path: &Path) -> Result<Option<Rule>, OpsError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| bad_input(format!("{}: not a persisted-patch rule: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, e)),
    }
}

fn io_error(path: &Path, error: std::io::Error) -> OpsError {
    OpsError::Mirror(shadowpatch_mirror::MirrorError::Io {
        path: path.to_path_buf(),
        source: error,
    })
}

/// The processes a scope holds now (none when a unit is down).
pub fn processes(scope: &Scope) -> Vec<i32> {
    match scope {
        Scope::Set(selector) => resolve(selector)
            .map(|members| members.into_iter().map(|m| m.pid).collect())
            .unwrap_or_default(),
        Scope::Program(program) => procfs::process::all_processes()
            .into_iter()
            .flatten()
            .flatten()
            .filter(|process| process.exe().is_ok_and(|exe| &exe == program))
            .map(|process| process.pid)
            .collect(),
    }
}

/// What one sweep of a rule did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sweep {
    /// Patched now.
    pub applied: Vec<i32>,
    /// Not patched: their program has another build-id.
    pub build_id_changed: Vec<i32>,
    /// The apply was refused or failed (recorded in the history by apply).
    pub failed: Vec<(i32, String)>,
}

/// Apply `rule` to the processes of its scope that started since the rule
/// was made and were not looked at yet. `seen` holds the processes (pid,
/// start time) already decided, so each is looked at once per agent run.
pub fn sweep(state_dir: &Path, rule: &Rule, seen: &mut BTreeSet<(i32, u64)>) -> Sweep {
    let mut done = Sweep::default();
    let (boot_id, _) = now_marks();
    for pid in processes(&rule.scope) {
        let Ok(identity) = ProcessIdentity::of(pid) else {
            continue;
        };
        if !seen.insert((pid, identity.start_time)) || !rule.is_new(identity.start_time, &boot_id) {
            continue;
        }
        match crate::set::maps_build_id(pid, &rule.build_id) {
            Ok(true) => {}
            // A program scope's processes run the program, so another
            // build-id means it was replaced; in a cgroup, only a process
            // running a program that once matched could say so, and the
            // others never mapped the module: skipped quietly.
            Ok(false) => {
                if matches!(rule.scope, Scope::Program(_)) {
                    record_best_effort(
                        state_dir,
                        &NewEvent::new(EventKind::Persist)
                            .target(pid, identity.start_time)
                            .patch(rule.id.clone())
                            .outcome("build_id_changed")
                            .details(serde_json::json!({
                                "scope": rule.scope.to_string(),
                                "build_id": rule.build_id,
                                "message": format!(
                                    "pid {pid} runs {} with another build-id than the persisted patch {} was made for ({}): not applied",
                                    rule.scope, rule.id, rule.build_id
                                ),
                            })),
                    );
                    done.build_id_changed.push(pid);
                }
                continue;
            }
            Err(_) => continue,
        }
        // A worker forked from a patched master carries the patch in
        // memory: it takes over its ancestor's state first (`adopt`), and
        // then carries it like the apply that made the rule.
        if let Err(error) = crate::adopt_if_forked(state_dir, pid) {
            done.failed.push((pid, error.to_string()));
            continue;
        }
        let active = crate::journal_if_any(state_dir, &identity)
            .ok()
            .flatten()
            .is_some_and(|journal| journal.active.iter().any(|p| p.id == rule.id));
        if active {
            continue;
        }
        let request = ApplyRequest {
            pid,
            requested_by: format!("agent persist {}", rule.id),
            ..rule.request.clone()
        };
        match crate::apply::apply(state_dir, &request, None, None) {
            Ok(ApplyResult::Applied(_)) => done.applied.push(pid),
            Ok(ApplyResult::Refused(refused)) => done.failed.push((pid, refused.message)),
            Err(error) => done.failed.push((pid, error.to_string())),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_processes_started_since_the_rule_or_after_a_reboot_are_new() {
        let request = ApplyRequest {
            pid: 0,
            manifest: PathBuf::from("/m.toml"),
            attempts: 1,
            force: false,
            analysis: Default::default(),
            requested_by: "cli".into(),
            baseline_module_only: false,
            no_ancestor_state: false,
        };
        let rule = Rule {
            id: "p".into(),
            scope: Scope::Program(PathBuf::from("/bin/true")),
            build_id: "ab".into(),
            request,
            created_unix_ms: 0,
            boot_id: "boot-a".into(),
            since_ticks: 1000,
        };
        assert!(!rule.is_new(999, "boot-a"));
        assert!(rule.is_new(1000, "boot-a"));
        assert!(rule.is_new(5, "boot-b"));
    }
}
