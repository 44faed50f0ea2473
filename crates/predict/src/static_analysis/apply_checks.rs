//! What `apply` itself would stop at, as findings: the survey's problems
//! (each with apply's classification), conflicts with the patches the
//! journal holds active, and imported symbols the target cannot resolve.

use super::finding;
use crate::finding::{Finding, Severity};
use serde_json::json;
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::journal::{Journal, JournalState};
use shadowpatch_patch::resolve::resolve_symbol;
use shadowpatch_patch::survey::Survey;
use shadowpatch_patch::{Classify, FailureClass, PatchError};
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The journal of the target, read without locking or creating anything:
/// `None` plus a note when it cannot be read.
pub(super) fn read_journal(
    state_dir: &Path,
    identity: &ProcessIdentity,
    unavailable: &mut Vec<String>,
) -> JournalState {
    let state = match StateDir::open_if_present(state_dir) {
        Ok(Some(state)) => state,
        Ok(None) => return JournalState::default(),
        Err(error) => {
            unavailable.push(format!("patch journal: {error}"));
            return JournalState::default();
        }
    };
    let dir = state.target_dir(identity.pid, identity.start_time);
    // Read under a shared hold of the target's lock: a transaction another
    // shadowpatch process has in flight (it holds the lock) is waited for,
    // not mistaken for an interrupted one.
    let (_hold, busy) = match shadowpatch_patch::state::SharedTargetLock::acquire(&dir) {
        Ok(hold) => (hold, None),
        Err(error) => (None, Some(error)),
    };
    match Journal::replay(&dir) {
        Ok(mut journal) => {
            if let Some(error) = busy {
                // Still busy after the wait: its transaction is in flight
                // (apply checks again under the lock).
                unavailable.push(format!("patch journal: busy, retry: {error}"));
                journal.open = None;
            }
            journal
        }
        Err(error) => {
            unavailable.push(format!("patch journal: {error}"));
            JournalState::default()
        }
    }
}

/// A finding for a problem `apply` itself would stop at: the evidence says
/// how apply classes it (`bad_input`: exit 2; `refused`: exit 1).
fn apply_problem(code: &str, error: &PatchError, evidence: serde_json::Value) -> Finding {
    let class = match error.class() {
        FailureClass::BadInput => "bad_input",
        FailureClass::RefusedForSafety => "refused",
        FailureClass::FailedMidway => "failed",
    };
    let mut evidence = match evidence {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    evidence.insert("apply_error".into(), class.into());
    finding(code, Severity::Blocking, error.to_string()).evidence(serde_json::Value::Object(evidence))
}

/// The survey's problems as findings, each with apply's classification.
pub(super) fn survey_findings(survey: &Survey) -> Vec<Finding> {
    let object_place = survey
        .object
        .as_ref()
        .map(|o| o.path.display().to_string())
        .unwrap_or_default();
    let mut findings = Vec::new();
    for problem in &survey.problems {
        let (code, symbol) = match problem {
            PatchError::Unsupported { .. } => ("unsupported-object", None),
            PatchError::BuildIdMismatch { .. } => ("build-id-mismatch", None),
            PatchError::ModuleHint { .. } => ("module-hint-mismatch", None),
            PatchError::UnknownSymbol { symbol, place } if *place == object_place => {
                ("unknown-replacement", Some(symbol))
            }
            PatchError::NotAFunction { symbol, place } if *place == object_place => {
                ("unknown-replacement", Some(symbol))
            }
            PatchError::UnknownSymbol { symbol, .. } => ("unknown-symbol", Some(symbol)),
            PatchError::NotAFunction { symbol, .. } => ("not-a-function", Some(symbol)),
            PatchError::Ambiguous { symbol, .. } => ("ambiguous-symbol", Some(symbol)),
            // Entry problems are reported from the typed list below.
            PatchError::Unpatchable { .. } => continue,
            _ => ("survey-problem", None),
        };
        let mut found = apply_problem(code, problem, json!({}));
        if let Some(symbol) = symbol {
            found = found.symbol(symbol.clone());
        }
        findings.push(found);
    }
    for replacement in &survey.replacements {
        let Some(site) = &replacement.site else { continue };
        for problem in &replacement.entry_problems {
            let error = problem.clone().into_error(&replacement.symbol, site.entry);
            findings.push(
                apply_problem(
                    problem.code(),
                    &error,
                    json!({ "entry": site.entry, "problem": problem }),
                )
                .symbol(replacement.symbol.clone()),
            );
        }
    }
    findings
}

/// Conflicts with the journal: an open transaction, the same patch id, the
/// same function already replaced.
pub(super) fn conflicts(survey: &Survey, journal: &JournalState) -> Vec<Finding> {
    let pid = survey.identity.pid;
    let mut findings = Vec::new();
    if let Some(open) = &journal.open {
        let error = PatchError::OpenTransaction {
            pid,
            patch_id: open.patch_id.clone(),
        };
        findings.push(apply_problem(
            "open-transaction",
            &error,
            json!({ "txn": open.txn, "kind": open.kind, "patch_id": open.patch_id }),
        ));
    }
    if journal.active.iter().any(|p| p.id == survey.manifest.id) {
        let error = PatchError::DuplicateId {
            pid,
            id: survey.manifest.id.clone(),
        };
        findings.push(apply_problem(
            "duplicate-patch-id",
            &error,
            json!({ "id": survey.manifest.id }),
        ));
    }
    for replacement in &survey.replacements {
        let Some(site) = &replacement.site else { continue };
        for patch in &journal.active {
            if let Some(function) = patch.functions.iter().find(|f| f.site.entry == site.entry) {
                findings.push(
                    finding(
                        "function-already-patched",
                        Severity::Warning,
                        format!(
                            "{} is already replaced by active patch {} (with {}): this patch stacks on it, and rolling back out of order is refused",
                            replacement.symbol, patch.id, function.with
                        ),
                    )
                    .symbol(replacement.symbol.clone())
                    .evidence(json!({ "patch": patch.id, "with": function.with, "generation": patch.generation })),
                );
            }
        }
    }
    findings
}

/// Resolve every symbol the object imports; unresolvable ones are findings.
pub(super) fn resolve_imports(survey: &Survey, memory: &mut TargetMemory) -> (HashMap<String, u64>, Vec<Finding>) {
    let (Some(object), Some(module)) = (&survey.object, &survey.module) else {
        return (HashMap::new(), Vec::new());
    };
    let mut wanted: BTreeMap<String, bool> = BTreeMap::new();
    for relocation in &object.relocations {
        if let Some(reference) = relocation.symbol.as_ref().filter(|s| s.defined_at.is_none()) {
            let weak = wanted.entry(reference.name.clone()).or_insert(true);
            *weak &= reference.weak;
        }
    }
    let mut resolved = HashMap::new();
    let mut findings = Vec::new();
    for (name, weak) in wanted {
        match resolve_symbol(&name, weak, module, &survey.modules, memory) {
            Ok(0) => {}
            Ok(address) => {
                resolved.insert(name, address);
            }
            Err(error) => {
                let code = match error {
                    PatchError::Ambiguous { .. } => "ambiguous-symbol",
                    _ => "unresolved-symbol",
                };
                findings.push(apply_problem(code, &error, json!({ "symbol": name })));
            }
        }
    }
    (resolved, findings)
}
