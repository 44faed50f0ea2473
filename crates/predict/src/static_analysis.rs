//! Static analysis of a patch against the running target, without writing
//! to it: everything `apply` checks (through `shadowpatch_patch`'s survey,
//! every problem rather than the first), conflicts with the journal's
//! active patches, resolution of every imported symbol, the ABI of each
//! replacement (DWARF, else register use), and the structural risk flags
//! that make hot patches fail in practice: changed global layouts or
//! widths, fresh state in the patch object, init-only code, new system
//! calls, new or unbalanced allocations, recursion and added loops.

use crate::abi::{self, arguments_read, compare_register_use, compare_signatures, expected_arguments};
use crate::callgraph::ModuleCallGraph;
use crate::code::{walk, CodeFacts, CodeSpaces, ModuleText, Space};
use crate::finding::{Finding, Severity, Source};
use crate::PredictError;
use serde_json::json;
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::apply::{originals_of, survey, Survey};
use shadowpatch_patch::journal::{Journal, JournalState};
use shadowpatch_patch::resolve::resolve_symbol;
use shadowpatch_patch::{ErrorClass, PatchError};
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use shadowpatch_symbols::dwarf::{module_debug_info, DebugInfo, DebugSource};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

/// How deep the code walks follow calls.
pub const WALK_DEPTH: u32 = 6;

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

/// Library functions that enter the kernel (directly or through stdio).
const SYSCALL_WRAPPERS: &[&str] = &[
    "read",
    "write",
    "pread",
    "pread64",
    "pwrite",
    "pwrite64",
    "readv",
    "writev",
    "open",
    "open64",
    "openat",
    "openat64",
    "creat",
    "close",
    "socket",
    "connect",
    "accept",
    "accept4",
    "bind",
    "listen",
    "send",
    "sendto",
    "sendmsg",
    "sendfile",
    "recv",
    "recvfrom",
    "recvmsg",
    "shutdown",
    "mmap",
    "mmap64",
    "munmap",
    "mprotect",
    "madvise",
    "brk",
    "sbrk",
    "fork",
    "vfork",
    "clone",
    "execve",
    "execvp",
    "system",
    "popen",
    "kill",
    "raise",
    "ioctl",
    "fcntl",
    "fsync",
    "fdatasync",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "mkdir",
    "rmdir",
    "stat",
    "fstat",
    "lstat",
    "fstatat",
    "statx",
    "poll",
    "ppoll",
    "select",
    "pselect",
    "epoll_wait",
    "epoll_ctl",
    "epoll_create",
    "epoll_create1",
    "nanosleep",
    "clock_nanosleep",
    "usleep",
    "sleep",
    "exit",
    "_exit",
    "abort",
    "syscall",
    "dup",
    "dup2",
    "dup3",
    "pipe",
    "pipe2",
    "chdir",
    "chmod",
    "chown",
    "truncate",
    "ftruncate",
    "lseek",
    "getdents64",
    "setsockopt",
    "getsockopt",
    "fopen",
    "fclose",
    "fread",
    "fwrite",
    "fflush",
    "fprintf",
    "printf",
    "vprintf",
    "vfprintf",
    "puts",
    "fputs",
    "fputc",
    "putchar",
    "perror",
    "syslog",
    "getrandom",
    "pthread_create",
    "signal",
    "sigaction",
    "prctl",
    "ptrace",
];
const ALLOCATORS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "aligned_alloc",
    "posix_memalign",
    "memalign",
    "valloc",
    "pvalloc",
    "strdup",
    "strndup",
    "asprintf",
    "_Znwm",
    "_Znam",
    "_ZnwmRKSt9nothrow_t",
    "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t",
];
const DEALLOCATORS: &[&str] = &[
    "free",
    "_ZdlPv",
    "_ZdaPv",
    "_ZdlPvm",
    "_ZdaPvm",
    "_ZdlPvSt11align_val_t",
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

/// The journal of the target, read without locking or creating anything:
/// `None` plus a note when it cannot be read.
fn read_journal(state_dir: &Path, identity: &ProcessIdentity, unavailable: &mut Vec<String>) -> JournalState {
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

fn finding(code: &str, severity: Severity, message: impl Into<String>) -> Finding {
    Finding::new(code, severity, Source::Static, message)
}

/// A finding for a problem `apply` itself would stop at: the evidence says
/// how apply classes it (`bad_input`: exit 2; `refused`: exit 1).
fn apply_problem(code: &str, error: &PatchError, evidence: serde_json::Value) -> Finding {
    let class = match error.class() {
        ErrorClass::BadInput => "bad_input",
        ErrorClass::Refused => "refused",
        ErrorClass::Failed => "failed",
    };
    let mut evidence = match evidence {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    evidence.insert("apply_error".into(), class.into());
    finding(code, Severity::Blocking, error.to_string()).evidence(serde_json::Value::Object(evidence))
}

/// Analyse the patch `manifest_path` against process `pid`. `state_dir`
/// holds the journal of active patches (read only).
pub fn analyze_static(pid: i32, manifest_path: &Path, state_dir: &Path) -> Result<StaticReport, PredictError> {
    let identity = ProcessIdentity::of(pid)?;
    let mut unavailable = Vec::new();
    let journal = read_journal(state_dir, &identity, &mut unavailable);
    let originals = originals_of(&journal);
    let survey = survey(pid, manifest_path, &originals)?;
    survey.identity.check_same(&identity)?;
    let mut findings = survey_findings(&survey);
    findings.extend(conflicts(&survey, &journal));
    let mut features = BTreeMap::new();
    if let (Some(object), Some(module)) = (&survey.object, &survey.module) {
        let mut memory = TargetMemory::open(&identity)?;
        let (resolved, unresolved) = resolve_imports(&survey, &mut memory);
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
        let target_names: HashSet<String> = survey
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
        let target_dwarf = match module_debug_info(pid, module, &|name| target_names.contains(name)) {
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
            let old_facts = walk(&spaces, Space::Target, site.entry, WALK_DEPTH);
            let new_facts = walk(&spaces, Space::Patch, new.address, WALK_DEPTH);
            used_globals.extend(new_facts.imported_data.iter().cloned());
            used_globals.extend(new_facts.globals.keys().cloned());
            for (name, accesses) in &new_facts.own_data {
                *own_data.entry(name.clone()).or_default() |= accesses.iter().any(|a| a.write);
            }
            let old_info = target_dwarf
                .as_ref()
                .and_then(|(info, _)| info.function(symbol, Some(site.entry.wrapping_sub(module.bias))));
            let new_info = patch_dwarf
                .as_ref()
                .and_then(|(info, _)| info.function(&replacement.with, Some(new.address)));
            let old_reads = arguments_read(&spaces, Space::Target, site.entry, WALK_DEPTH);
            let new_reads = arguments_read(&spaces, Space::Patch, new.address, WALK_DEPTH);
            let mut differences = match (old_info, new_info) {
                (Some(old), Some(new_signature)) => {
                    totals.dwarf_compared += 1;
                    let mut found = compare_signatures(old, new_signature);
                    // The code must read its arguments where its declared
                    // signature says they arrive (an ms_abi function does not).
                    if let Some(expected) = expected_arguments(new_signature) {
                        let stray = new_reads.minus(expected);
                        if !stray.is_empty() && !found.iter().any(|d| d.code == "calling-convention") {
                            found.push(abi::AbiDifference {
                                code: "calling-convention",
                                severity: Severity::Blocking,
                                message: format!(
                                    "{} reads {} as arguments, where none of its declared parameters arrive under the SysV ABI: it uses another calling convention",
                                    replacement.with,
                                    stray.names().join(", ")
                                ),
                                evidence: json!({
                                    "method": format!("{} + {}", abi::METHOD_DWARF, abi::METHOD_REGISTERS),
                                    "expected": expected.names(),
                                    "reads": new_reads.names(),
                                }),
                            });
                        }
                    }
                    found
                }
                _ => {
                    totals.heuristic_compared += 1;
                    compare_register_use(old_reads, new_reads)
                }
            };
            for difference in differences.drain(..) {
                let mut evidence = difference.evidence;
                if let Some(map) = evidence.as_object_mut() {
                    if let Some((_, source)) = &target_dwarf {
                        map.insert("target_dwarf".into(), source.describe().into());
                    }
                    if let Some((_, source)) = &patch_dwarf {
                        map.insert("patch_dwarf".into(), source.describe().into());
                    }
                }
                findings.push(
                    finding(
                        difference.code,
                        difference.severity,
                        format!("{symbol}: {}", difference.message),
                    )
                    .symbol(symbol)
                    .evidence(evidence),
                );
            }
            findings.extend(structural(
                &spaces,
                &graph,
                symbol,
                &replacement.with,
                site.entry,
                &old_facts,
                &new_facts,
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
struct Totals {
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

/// The survey's problems as findings, each with apply's classification.
fn survey_findings(survey: &Survey) -> Vec<Finding> {
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
fn conflicts(survey: &Survey, journal: &JournalState) -> Vec<Finding> {
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
fn resolve_imports(survey: &Survey, memory: &mut TargetMemory) -> (HashMap<String, u64>, Vec<Finding>) {
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

/// Structural risk flags of one replacement.
#[allow(clippy::too_many_arguments)]
fn structural(
    spaces: &CodeSpaces,
    graph: &ModuleCallGraph,
    symbol: &str,
    with: &str,
    entry: u64,
    old: &CodeFacts,
    new: &CodeFacts,
    totals: &mut Totals,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let flag = |code: &str, severity: Severity, message: String, evidence: serde_json::Value| {
        finding(code, severity, message).symbol(symbol).evidence(evidence)
    };
    totals.new_bytes += new.bytes;

    // Init-only code.
    if let Some(constructors) = graph.init_only.get(&entry) {
        findings.push(flag(
            "init-only-function",
            Severity::Warning,
            format!(
                "{symbol} is only reached from constructors ({}), which already ran: the patch would never run",
                constructors.join(", ")
            ),
            json!({ "constructors": constructors }),
        ));
    }
    let init_called: Vec<(&String, &Vec<String>)> = new
        .target_functions
        .iter()
        .filter_map(|(address, name)| graph.init_only.get(address).map(|c| (name, c)))
        .collect();
    if !init_called.is_empty() {
        let names: Vec<&str> = init_called.iter().map(|(n, _)| n.as_str()).collect();
        findings.push(flag(
            "calls-init-only",
            Severity::Warning,
            format!(
                "{with} calls {}, which only constructors call: it re-runs initialisation on live state",
                names.join(", ")
            ),
            json!({ "functions": names, "constructors": init_called.iter().map(|(_, c)| c).collect::<Vec<_>>() }),
        ));
    }

    // System calls.
    let syscalls = |facts: &CodeFacts| -> BTreeSet<String> {
        facts
            .imports
            .iter()
            .filter(|name| SYSCALL_WRAPPERS.contains(&name.as_str()))
            .cloned()
            .collect()
    };
    let (old_syscalls, new_syscalls) = (syscalls(old), syscalls(new));
    let added: Vec<&String> = new_syscalls.difference(&old_syscalls).collect();
    let raw_added = new.syscall_instructions.saturating_sub(old.syscall_instructions);
    if !added.is_empty() || raw_added > 0 {
        totals.syscalls_added += added.len() + raw_added as usize;
        let mut what = Vec::new();
        if !added.is_empty() {
            what.push(format!(
                "calls {}",
                added.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        if raw_added > 0 {
            what.push(format!(
                "has {raw_added} direct syscall instruction{}",
                if raw_added == 1 { "" } else { "s" }
            ));
        }
        findings.push(flag(
            "new-syscall",
            Severity::Warning,
            format!(
                "{with} {} that {symbol} did not: new interactions with the kernel (files, sockets, signals) the service was not tested with",
                what.join(" and ")
            ),
            json!({
                "added_wrappers": added,
                "old_wrappers": old_syscalls,
                "new_syscall_instructions": new.syscall_instructions,
                "old_syscall_instructions": old.syscall_instructions,
            }),
        ));
    }

    // Allocation.
    let named = |facts: &CodeFacts, list: &[&str]| -> BTreeSet<String> {
        facts
            .imports
            .iter()
            .filter(|name| list.contains(&name.as_str()))
            .cloned()
            .collect()
    };
    let (old_alloc, new_alloc) = (named(old, ALLOCATORS), named(new, ALLOCATORS));
    let (old_free, new_free) = (named(old, DEALLOCATORS), named(new, DEALLOCATORS));
    let evidence = json!({
        "old_allocates": old_alloc, "old_frees": old_free,
        "new_allocates": new_alloc, "new_frees": new_free,
    });
    if !new_alloc.is_subset(&old_alloc) || !new_free.is_subset(&old_free) {
        findings.push(flag(
            "new-allocation",
            Severity::Warning,
            format!("{with} allocates or frees heap memory in ways {symbol} did not"),
            evidence.clone(),
        ));
    }
    let balanced = |alloc: &BTreeSet<String>, free: &BTreeSet<String>| alloc.is_empty() == free.is_empty();
    if balanced(&old_alloc, &old_free) && !balanced(&new_alloc, &new_free) {
        let message = if new_free.is_empty() {
            format!("{with} allocates memory and never frees it: a leak on every call, unless ownership passes on")
        } else {
            format!("{with} frees memory it did not allocate: a double free unless the caller gave it up")
        };
        findings.push(flag("allocation-unbalanced", Severity::Warning, message, evidence));
    }

    // Recursion.
    if new.calls_replaced.contains(symbol) && !old.reaches_entry {
        findings.push(flag(
            "recursion-through-patch",
            Severity::Blocking,
            format!(
                "{with} calls {symbol}, which this patch redirects to {with}: unbounded recursion (call the old code through a copy, not through its patched entry)"
            ),
            json!({ "calls": new.calls_replaced }),
        ));
    }
    if new.reaches_entry && !old.reaches_entry {
        findings.push(flag(
            "recursion",
            Severity::Warning,
            format!("{with} is recursive and {symbol} was not: stack depth now depends on the input"),
            json!({ "old_recursive": old.reaches_entry, "new_recursive": new.reaches_entry }),
        ));
    }

    // Loops.
    if new.backward_branches > old.backward_branches {
        totals.loops_added += new.backward_branches - old.backward_branches;
        findings.push(flag(
            "added-loop",
            Severity::Warning,
            format!(
                "{with} has {} backward branch{} (loops) where {symbol} has {}: its running time may now depend on the input",
                new.backward_branches,
                if new.backward_branches == 1 { "" } else { "es" },
                old.backward_branches
            ),
            json!({
                "old_backward_branches": old.backward_branches,
                "new_backward_branches": new.backward_branches,
                "old_functions": old.functions,
                "new_functions": new.functions,
            }),
        ));
    }

    // Globals accessed with another width or offset pattern.
    for (name, accesses) in &new.globals {
        let size = spaces
            .module
            .symbol_addresses(name)
            .into_iter()
            .map(|(_, s)| s.size)
            .find(|s| *s > 0);
        let out_of_bounds: Vec<_> = accesses
            .iter()
            .filter(|a| size.is_some_and(|size| a.offset < 0 || (a.offset as u64 + a.width as u64) > size))
            .collect();
        let old_accesses = old.globals.get(name);
        if !out_of_bounds.is_empty() {
            findings.push(flag(
                "global-access-changed",
                Severity::Blocking,
                format!(
                    "{with} accesses {name} at offset {} ({} bytes), past its {} bytes in the target: the patch assumes another layout",
                    out_of_bounds[0].offset,
                    out_of_bounds[0].width,
                    size.unwrap_or(0)
                ),
                json!({ "global": name, "size": size, "new_accesses": accesses, "old_accesses": old_accesses }),
            ));
            continue;
        }
        let Some(old_accesses) = old_accesses else { continue };
        let conflicting: Vec<_> = accesses
            .iter()
            .filter(|a| {
                old_accesses.iter().any(|o| {
                    let overlap = a.offset < o.offset + o.width as i64 && o.offset < a.offset + a.width as i64;
                    overlap && (a.offset, a.width) != (o.offset, o.width)
                })
            })
            .collect();
        if !conflicting.is_empty() {
            findings.push(flag(
                "global-access-changed",
                Severity::Warning,
                format!(
                    "{with} accesses {name} as {} bytes at offset {} where {symbol} uses {}: a changed width or layout",
                    conflicting[0].width,
                    conflicting[0].offset,
                    old_accesses
                        .iter()
                        .map(|o| format!("{} bytes at offset {}", o.width, o.offset))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                json!({ "global": name, "size": size, "new_accesses": accesses, "old_accesses": old_accesses, "method": "access pattern" }),
            ));
        }
    }
    findings
}

/// Globals the patch declares `extern` with another type than the target's.
fn global_types(
    spaces: &CodeSpaces,
    target: &Option<(DebugInfo, DebugSource)>,
    patch: &Option<(DebugInfo, DebugSource)>,
    used: &HashSet<String>,
) -> Vec<Finding> {
    let (Some((target, target_source)), Some((patch, patch_source))) = (target, patch) else {
        return Vec::new();
    };
    let mut findings = Vec::new();
    let mut names: Vec<&String> = used.iter().collect();
    names.sort();
    for name in names {
        let Some(&address) = spaces.resolved.get(name) else {
            continue;
        };
        if !spaces.module.contains(address) {
            continue;
        }
        let Some(declared) = patch.variable(name, None) else {
            continue;
        };
        let Some(defined) = target.variable(name, Some(address.wrapping_sub(spaces.module.bias))) else {
            continue;
        };
        let (old, new) = (&defined.type_shape, &declared.type_shape);
        let evidence = json!({
            "method": abi::METHOD_DWARF,
            "global": name,
            "target_type": old,
            "patch_type": new,
            "target_dwarf": target_source.describe(),
            "patch_dwarf": patch_source.describe(),
        });
        let severity_and_message = if old.size.is_some() && new.size.is_some() && old.size != new.size {
            Some((
                Severity::Blocking,
                format!(
                    "the patch declares {name} as {} ({} bytes); in the target it is {} ({} bytes)",
                    new.name,
                    new.size.unwrap_or(0),
                    old.name,
                    old.size.unwrap_or(0)
                ),
            ))
        } else if old.class != new.class
            || (!old.members.is_empty() && !new.members.is_empty() && old.members != new.members)
        {
            Some((
                Severity::Blocking,
                format!(
                    "the patch declares {name} as {} with another layout or meaning than the target's {}",
                    new.name, old.name
                ),
            ))
        } else if old.name != new.name {
            Some((
                Severity::Warning,
                format!(
                    "the patch declares {name} as {}, the target defines it as {} (same size: check the meaning)",
                    new.name, old.name
                ),
            ))
        } else {
            None
        };
        if let Some((severity, message)) = severity_and_message {
            findings.push(finding("global-type-changed", severity, message).evidence(evidence));
        }
    }
    findings
}

/// Writable data of the patch object that the replacements use (name →
/// written): state that starts fresh.
fn patch_state(spaces: &CodeSpaces, used: &BTreeMap<String, bool>) -> Vec<Finding> {
    if used.is_empty() {
        return Vec::new();
    }
    let data: Vec<serde_json::Value> = spaces
        .object_data()
        .iter()
        .filter(|(_, _, name)| used.contains_key(name))
        .map(|(address, size, name)| json!({ "name": name, "address": address, "size": size }))
        .collect();
    let written: Vec<&str> = used.iter().filter(|(_, w)| **w).map(|(n, _)| n.as_str()).collect();
    if written.is_empty() {
        let names: Vec<&str> = used.keys().map(String::as_str).collect();
        return vec![finding(
            "patch-data",
            Severity::Info,
            format!(
                "the replacements read the patch object's own data ({}): initialised from the object, not from the process",
                names.join(", ")
            ),
        )
        .evidence(json!({ "data": data }))];
    }
    // Static locals, counters, caches: their state starts from the
    // object's initial value, not from the process's history.
    vec![finding(
        "patch-global-state",
        Severity::Warning,
        format!(
            "the patch keeps its own state in {} (static locals or globals of the object): it starts fresh at apply, not from the live process, and is lost at rollback",
            written.join(", ")
        ),
    )
    .evidence(json!({ "written": written, "data": data }))]
}
