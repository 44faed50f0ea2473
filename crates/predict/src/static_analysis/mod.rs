//! Static analysis of a patch against the running target, without writing
//! to it: everything `apply` checks (through `shadowpatch_patch`'s survey,
//! every problem rather than the first), conflicts with the journal's
//! active patches, resolution of every imported symbol (`apply_checks`), the ABI
//! of each replacement (DWARF, else register use; `signature`), and the
//! structural risk flags that make hot patches fail in practice: changed
//! global layouts or widths, fresh state in the patch object, init-only
//! code, new system calls, new or unbalanced allocations, recursion and
//! added loops (`structural`). This file walks the replacements and sums
//! up the findings as features.

mod apply_checks;
mod signature;
mod structural;

use crate::callgraph::ModuleCallGraph;
use crate::code::{walk_functions, CodeSpaces, ModuleText, Space};
use crate::finding::{Finding, Severity, Source};
use crate::PredictError;
use apply_checks::{conflicts, read_journal, resolve_imports, survey_findings};
use serde_json::json;
use shadowpatch_patch::survey::{originals_of, survey, Survey};
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use shadowpatch_symbols::dwarf::{module_debug_info_named, DebugInfo, DebugSource};
use signature::signature_findings;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use structural::{global_types, patch_state, structural};

/// How deep the code walks follow calls.
pub const WALK_DEPTH: u32 = 6;
/// How deep the walks go that decide which target functions the original
/// and the replacement share: deeper than [`WALK_DEPTH`], so that a
/// function one side calls directly and the other reaches through a long
/// chain counts as shared, not as new.
pub const SHARED_DEPTH: u32 = 64;

/// Every finding code the static analysis can produce: each becomes a
/// feature `static.<code>` (its count), so the feature vector is stable.
pub const STATIC_CHECKS: &[&str] = &[
    "unsupported-object",
    "build-id-mismatch",
    "module-hint-mismatch",
    "unknown-symbol",
    "not-a-function",
    "ambiguous-symbol",
    "unknown-replacement",
    "entry-unknown-size",
    "entry-too-short",
    "entry-undecodable",
    "inbound-branch",
    "unresolved-symbol",
    "open-transaction",
    "duplicate-patch-id",
    "function-already-patched",
    "register-thunk",
    "calling-convention",
    "abi-parameter-count",
    "abi-parameter-class",
    "abi-parameter-size",
    "abi-return-type",
    "abi-type-renamed",
    "struct-layout-changed",
    "global-type-changed",
    "global-access-changed",
    "patch-global-state",
    "patch-data",
    "init-only-function",
    "calls-init-only",
    "new-syscall",
    "new-allocation",
    "allocation-unbalanced",
    "recursion",
    "recursion-through-patch",
    "added-loop",
];

/// What the static analysis found.
#[derive(Debug, Clone)]
pub struct StaticReport {
    pub patch_id: String,
    pub identity: ProcessIdentity,
    pub findings: Vec<Finding>,
    pub features: BTreeMap<String, f64>,
    pub unavailable: Vec<String>,
}

fn finding(code: &str, severity: Severity, message: impl Into<String>) -> Finding {
    Finding::new(code, severity, Source::Static, message)
}

/// Read the patch at `manifest_path` and survey it against process `pid`
/// as the journal in `state_dir` says its active patches rewrote it: the
/// [`Survey`] an analysis starts from, for callers that hold only a path
/// (the operations layer surveys the patch it read once itself).
pub fn survey_for_analysis(pid: i32, manifest_path: &Path, state_dir: &Path) -> Result<Survey, PredictError> {
    let identity = ProcessIdentity::of(pid)?;
    let journal = read_journal(state_dir, &identity, &mut Vec::new());
    Ok(survey(pid, manifest_path, &originals_of(&journal))?)
}

/// Analyse the surveyed patch against its process. `state_dir` holds the
/// journal of active patches (read only); when it shows other active
/// patches than the survey saw, the same parsed patch is surveyed again.
pub fn analyze_static(surveyed: &Survey, state_dir: &Path) -> Result<StaticReport, PredictError> {
    let pid = surveyed.identity.pid;
    // Still the process surveyed (checked, not identified again).
    let identity = surveyed.identity.clone();
    identity.check_alive()?;
    let mut unavailable = Vec::new();
    let journal = read_journal(state_dir, &identity, &mut unavailable);
    let originals = originals_of(&journal);
    let again;
    let survey = if surveyed.originals == originals {
        surveyed
    } else {
        again = surveyed.again(&originals)?;
        &again
    };
    survey.identity.check_same(&identity)?;
    let mut findings = survey_findings(survey);
    findings.extend(conflicts(survey, &journal));
    let mut features = BTreeMap::new();
    if let (Some(object), Some(module)) = (&survey.object, &survey.module) {
        let mut memory = TargetMemory::open(&identity)?;
        let (resolved, unresolved) = resolve_imports(survey, &mut memory);
        findings.extend(unresolved);
        let text = ModuleText::read(&mut memory, &survey.maps, module, &originals)?;
        let replaced: HashMap<u64, String> = survey
            .replacements
            .iter()
            .filter_map(|r| Some((r.site.as_ref()?.entry, r.symbol.clone())))
            .collect();
        let spaces = CodeSpaces::new(module, &text, object, resolved, replaced);
        let graph = ModuleCallGraph::build(module, &text);
        let imported: HashSet<String> = object
            .relocations
            .iter()
            .filter_map(|r| {
                r.symbol
                    .as_ref()
                    .filter(|s| s.defined_at.is_none())
                    .map(|s| s.name.clone())
            })
            .collect();
        // A set the DWARF cache can key by (one read per file host-wide).
        let target_names: std::collections::BTreeSet<String> = survey
            .replacements
            .iter()
            .map(|r| r.symbol.clone())
            .chain(imported.iter().cloned())
            .collect();
        let patch_names: HashSet<String> = survey
            .replacements
            .iter()
            .map(|r| r.with.clone())
            .chain(imported.iter().cloned())
            .collect();
        let target_dwarf = match module_debug_info_named(pid, module, &target_names) {
            Ok(found) => found,
            Err(error) => {
                unavailable.push(format!("DWARF of {}: {error}", module.name));
                None
            }
        };
        let patch_dwarf = match DebugInfo::parse(&object.path, &object.bytes, &|name| patch_names.contains(name)) {
            Ok(found) => found.map(|info| (info, DebugSource::Embedded(object.path.clone()))),
            Err(error) => {
                unavailable.push(format!("DWARF of {}: {error}", object.path.display()));
                None
            }
        };
        features.insert(
            "static.dwarf_target".into(),
            if target_dwarf.is_some() { 1.0 } else { 0.0 },
        );
        features.insert(
            "static.dwarf_patch".into(),
            if patch_dwarf.is_some() { 1.0 } else { 0.0 },
        );
        let mut totals = Totals::default();
        // Globals and own data the replacements' code uses.
        let mut used_globals: HashSet<String> = HashSet::new();
        let mut own_data: BTreeMap<String, bool> = BTreeMap::new();
        for replacement in &survey.replacements {
            let (Some(site), Some(new)) = (&replacement.site, &replacement.new_function) else {
                continue;
            };
            let symbol = replacement.symbol.as_str();
            for (source, target) in
                graph.branches_into(site.patch_at + 1, site.patch_at + 5, site.entry, site.entry + site.size)
            {
                findings.push(
                    finding(
                        "inbound-branch",
                        Severity::Blocking,
                        format!(
                            "cannot patch {symbol} at {:#x}: the instruction at {source:#x} ({}) branches to {target:#x}, inside the 5 bytes the jump overwrites",
                            site.entry,
                            describe(module, source)
                        ),
                    )
                    .symbol(symbol)
                    .evidence(json!({ "from": source, "to": target, "apply_error": "refused" })),
                );
            }
            if let Some(extra) = replacement.extra.filter(|e| e.0 != 0) {
                findings.push(
                    finding(
                        "register-thunk",
                        Severity::Info,
                        format!(
                            "{} changes registers {symbol} leaves alone ({}); callers compiled with -fipa-ra rely on them, so apply routes it through a register-preserving thunk",
                            replacement.with,
                            extra.names()
                        ),
                    )
                    .symbol(symbol)
                    .evidence(json!({ "registers": extra.names() })),
                );
                totals.thunks += 1;
            }
            if let (Some((_, old_bytes)), Some((_, new_bytes))) = (
                spaces.function_at(Space::Target, site.entry),
                spaces.function_at(Space::Patch, new.address),
            ) {
                totals.old_bytes += old_bytes.len() as u64;
                totals.bytes_changed += bytes_changed(old_bytes, new_bytes);
            }
            // Like with like: target code both the original and the
            // replacement reach (the replacement calls back into the
            // target's helpers) is not a change the patch makes; only the
            // replacement's own code and the target code it alone reaches
            // count, against the original's code the replacement does not
            // reach.
            let old_walk = walk_functions(&spaces, Space::Target, site.entry, WALK_DEPTH);
            let new_walk = walk_functions(&spaces, Space::Patch, new.address, WALK_DEPTH);
            // (The replaced function itself is never shared: reached from
            // the replacement, it is the patch again.)
            let shared: BTreeSet<u64> = walk_functions(&spaces, Space::Target, site.entry, SHARED_DEPTH)
                .target_functions()
                .intersection(&walk_functions(&spaces, Space::Patch, new.address, SHARED_DEPTH).target_functions())
                .copied()
                .filter(|start| *start != site.entry)
                .collect();
            let not_shared = |(space, start): &(Space, u64)| *space == Space::Patch || !shared.contains(start);
            let old_facts = old_walk.facts(not_shared);
            let new_facts = new_walk.facts(not_shared);
            let shared_names: Vec<String> = shared
                .iter()
                .filter_map(|start| Some(spaces.module.symbolize(*start)?.0.name.clone()))
                .collect();
            used_globals.extend(new_facts.imported_data.iter().cloned());
            used_globals.extend(new_facts.globals.keys().cloned());
            for (name, accesses) in &new_facts.own_data {
                *own_data.entry(name.clone()).or_default() |= accesses.iter().any(|a| a.write);
            }
            findings.extend(signature_findings(
                &spaces,
                module,
                symbol,
                &replacement.with,
                site.entry,
                new.address,
                (&target_dwarf, &patch_dwarf),
                &mut totals,
            ));
            findings.extend(structural(
                &spaces,
                &graph,
                symbol,
                &replacement.with,
                site.entry,
                &old_facts,
                &new_facts,
                &shared_names,
                &mut totals,
            ));
        }
        findings.extend(global_types(&spaces, &target_dwarf, &patch_dwarf, &used_globals));
        findings.extend(patch_state(&spaces, &own_data));
        features.insert("static.thunk_functions".into(), totals.thunks as f64);
        features.insert("static.abi_dwarf_compared".into(), totals.dwarf_compared as f64);
        features.insert("static.abi_heuristic_compared".into(), totals.heuristic_compared as f64);
        features.insert("static.new_code_bytes".into(), totals.new_bytes as f64);
        features.insert("static.old_code_bytes".into(), totals.old_bytes as f64);
        features.insert("static.bytes_changed".into(), totals.bytes_changed as f64);
        features.insert("static.backward_branches_added".into(), totals.loops_added as f64);
        features.insert("static.syscalls_added".into(), totals.syscalls_added as f64);
        features.insert("static.module_functions".into(), graph.functions as f64);
    }
    features.insert("static.replacements".into(), survey.replacements.len() as f64);
    features.insert("static.active_patches".into(), journal.active.len() as f64);
    for code in STATIC_CHECKS {
        let count = findings.iter().filter(|f| f.code == *code).count();
        features.insert(format!("static.{code}"), count as f64);
    }
    Ok(StaticReport {
        patch_id: survey.manifest.id.clone(),
        identity,
        findings,
        features,
        unavailable,
    })
}

#[derive(Debug, Default)]
pub(crate) struct Totals {
    thunks: usize,
    dwarf_compared: usize,
    heuristic_compared: usize,
    new_bytes: u64,
    old_bytes: u64,
    bytes_changed: u64,
    loops_added: u32,
    syscalls_added: usize,
}

/// Bytes changed between the old and the new function's code: the
/// positions (from the entry) where they differ, plus the difference in
/// length. Crude on purpose: it is the size-only baseline the model is
/// compared with.
pub fn bytes_changed(old: &[u8], new: &[u8]) -> u64 {
    let differing = old.iter().zip(new).filter(|(a, b)| a != b).count();
    (differing + old.len().abs_diff(new.len())) as u64
}

fn describe(module: &shadowpatch_symbols::Module, address: u64) -> String {
    match module.symbolize(address) {
        Some((symbol, offset)) => format!("{}+{offset:#x}", symbol.name),
        None => format!("{address:#x}"),
    }
}
