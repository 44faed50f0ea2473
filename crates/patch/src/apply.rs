//! `apply`: stage → verify → activate, as one journaled transaction.
//!
//! 1. Validate everything that needs no target access (manifest, object,
//!    build-id, symbols, entry checks) before attaching.
//! 2. Journal `Begin` and `Map` (fsync'd), then in one short stop map the
//!    object near the module with a remote `mmap`, write the relocated image
//!    and set page protections.
//! 3. Stage: derive the next mirror generation (trampolines edited in, the
//!    patch's immutable pages added) and check the bytes now in the target's
//!    new mapping equal it.
//! 4. Journal `Plan` with every address, original and new byte, then switch
//!    all entries in one stop; journal `Commit`; publish the generation.
//!
//! Any failure before the commit undoes what was done (unmap, drop the
//! staged generation, journal `Abort`): the target ends as it began.

use crate::activate::{switch, Activation, Direction, DEFAULT_ATTEMPTS};
use crate::clobber::{clobbered, CodeSource, RegisterSet};
use crate::fault;
use crate::journal::{Journal, PatchRecord, Record, TxnKind, Write5};
use crate::load::{map_image, plan_load, LoadPlan, StoppedThread};
use crate::object::{DefinedSymbol, PatchObject};
use crate::state::{ensure_baseline, now_ms, staged_path, TargetState};
use crate::trampoline::{examine_site, EntryProblem, FunctionSite};
use crate::{Manifest, PatchError};
use shadowpatch_mirror::{derive, AddedRegion, Edit, MirrorFile, RegionKind, RegionSpec, StateDir, PAGE_SIZE};
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::{Attached, ProcessIdentity};
use shadowpatch_symbols::{modules_of, Module};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Stops to try before refusing because a thread sits in an entry.
    pub max_attempts: u32,
    /// Activate while a thread waits at the application's safe point
    /// (`safepoint.rs`); `None`: activate whenever the entries are free.
    pub safe_point: Option<crate::safepoint::SafePoint>,
    /// Route each trampoline through a watch-window entry stub
    /// (`watchstub.rs`), for `apply --watch`'s crash-proof window.
    pub watch_stubs: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_attempts: DEFAULT_ATTEMPTS,
            safe_point: None,
            watch_stubs: false,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FunctionOutcome {
    pub symbol: String,
    pub with: String,
    pub entry: u64,
    pub new_address: u64,
    /// Registers preserved by a thunk (None: a direct jump).
    pub preserved: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyOutcome {
    pub patch_id: String,
    pub pid: i32,
    pub generation: u32,
    pub functions: Vec<FunctionOutcome>,
    pub mapping_address: u64,
    pub mapping_len: u64,
    /// The activation stop: first thread stopped → last resumed.
    pub pause_us: u64,
    pub activation: Activation,
    /// The loading stop (remote mmap + write + mprotect).
    pub load_pause_us: u64,
    pub total_us: u64,
    /// With `--at-safe-point`: threads parked at activation and the wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safe_point: Option<crate::safepoint::Parked>,
}

/// The target module's functions, read live, with the entries that active
/// patches rewrote shown as they were originally (callers were compiled
/// against the original code, so that is what the analysis must see).
pub struct ModuleCode<'a> {
    pub module: &'a Module,
    pub memory: &'a mut shadowpatch_process::TargetMemory,
    pub originals: &'a [(u64, Vec<u8>)],
}

impl std::fmt::Debug for ModuleCode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleCode").field("module", &self.module.name).finish()
    }
}

impl CodeSource for ModuleCode<'_> {
    fn function_at(&mut self, address: u64) -> Option<(u64, Vec<u8>)> {
        let (symbol, _) = self.module.symbolize(address)?;
        if symbol.kind != shadowpatch_symbols::SymbolKind::Function || symbol.size == 0 || symbol.size > 1 << 20 {
            return None;
        }
        let start = symbol.address + self.module.bias;
        let mut bytes = self.memory.read_vec(start, symbol.size as usize).ok()?;
        overlay_originals(start, &mut bytes, self.originals);
        Some((start, bytes))
    }
}

/// Put back, in `bytes` read at `start`, the original bytes of entries
/// that active patches rewrote.
pub fn overlay_originals(start: u64, bytes: &mut [u8], originals: &[(u64, Vec<u8>)]) {
    for (at, original) in originals {
        if *at >= start && at + (original.len() as u64) <= start + bytes.len() as u64 {
            let offset = (at - start) as usize;
            bytes[offset..offset + original.len()].copy_from_slice(original);
        }
    }
}

/// Entries rewritten by the active patches, as they were before the first
/// patch: `(address, original bytes)`.
pub fn originals_of(journal_state: &crate::journal::JournalState) -> Vec<(u64, Vec<u8>)> {
    let mut originals: Vec<(u64, Vec<u8>)> = Vec::new();
    for patch in &journal_state.active {
        for f in &patch.functions {
            if !originals.iter().any(|(at, _)| *at == f.write.address) {
                originals.push((f.write.address, f.write.original.clone()));
            }
        }
    }
    originals
}

/// The patch object's own functions (object addresses, before relocation:
/// only direct, PC-relative branches are followed, which need none).
#[derive(Debug)]
pub struct ObjectCode<'a> {
    pub object: &'a PatchObject,
    pub image: Vec<u8>,
}

impl<'a> ObjectCode<'a> {
    pub fn new(object: &'a PatchObject) -> Self {
        ObjectCode {
            object,
            image: object.initial_image(),
        }
    }
}

impl CodeSource for ObjectCode<'_> {
    fn function_at(&mut self, address: u64) -> Option<(u64, Vec<u8>)> {
        let symbol = self
            .object
            .symbols
            .values()
            .find(|s| s.function && s.size > 0 && (s.address..s.address + s.size).contains(&address))?;
        let bytes = self
            .image
            .get(symbol.address as usize..(symbol.address + symbol.size) as usize)?;
        Some((symbol.address, bytes.to_vec()))
    }
}

/// How deep the register analysis follows calls.
pub const CLOBBER_DEPTH: u32 = 8;

/// What was checked before touching the target: every fact apply acts on.
#[derive(Debug)]
pub struct Prepared {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub object: PatchObject,
    pub identity: ProcessIdentity,
    pub module: Module,
    pub modules: Vec<Module>,
    pub maps: Vec<shadowpatch_process::Mapping>,
    /// Per replacement: where the jump goes, and the new function's name.
    pub sites: Vec<(FunctionSite, String)>,
    /// Per replacement: registers the new function changes that the
    /// original did not (empty: jump straight to the new function).
    pub extra: Vec<RegisterSet>,
}

/// One `[[replace]]` entry as the survey found it.
#[derive(Debug, Clone)]
pub struct SurveyedReplacement {
    pub symbol: String,
    pub with: String,
    /// The target function, when it was found (even if unpatchable).
    pub site: Option<FunctionSite>,
    /// Why a jump cannot be written at its entry (empty: it can).
    pub entry_problems: Vec<EntryProblem>,
    /// The new function in the patch object, when it exists.
    pub new_function: Option<DefinedSymbol>,
    /// Registers the new function changes that the original did not;
    /// `None` when either side is unknown.
    pub extra: Option<RegisterSet>,
}

/// Everything apply checks without writing to the target, gathered without
/// stopping at the first problem: `prepare` turns the first problem into
/// apply's error, the prediction engine reports them all.
#[derive(Debug)]
pub struct Survey {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub identity: ProcessIdentity,
    pub maps: Vec<shadowpatch_process::Mapping>,
    pub modules: Vec<Module>,
    /// `None` when the object uses an unsupported feature (see `problems`).
    pub object: Option<PatchObject>,
    /// The module whose build-id the manifest names, if loaded.
    pub module: Option<Module>,
    pub replacements: Vec<SurveyedReplacement>,
    /// Every problem, in the order apply meets them.
    pub problems: Vec<PatchError>,
}

/// Survey a patch against process `pid`. Errors (rather than problems)
/// are what leaves nothing to survey: an unreadable or malformed manifest
/// or object, a process that is gone or cannot be read.
pub fn survey(pid: i32, manifest_path: &Path, originals: &[(u64, Vec<u8>)]) -> Result<Survey, PatchError> {
    let (manifest, object_path) = Manifest::load(manifest_path)?;
    let mut problems = Vec::new();
    let object = match PatchObject::load(&object_path) {
        Ok(object) => Some(object),
        Err(unsupported @ PatchError::Unsupported { .. }) => {
            problems.push(unsupported);
            None
        }
        Err(other) => return Err(other),
    };
    let mut replacements: Vec<SurveyedReplacement> = manifest
        .replacements
        .iter()
        .map(|r| SurveyedReplacement {
            symbol: r.symbol.clone(),
            with: r.with.clone(),
            site: None,
            entry_problems: Vec::new(),
            new_function: None,
            extra: None,
        })
        .collect();
    if let Some(object) = &object {
        for replacement in &mut replacements {
            match object.function(&replacement.with) {
                Ok(function) => replacement.new_function = Some(function.clone()),
                Err(problem) => problems.push(problem),
            }
        }
    }
    let identity = ProcessIdentity::of(pid)?;
    let maps = read_maps(pid)?;
    let modules = modules_of(pid, &maps)?;
    let module = match find_target_module(pid, &manifest, &modules) {
        Ok(module) => Some(module),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    if let Some(module) = &module {
        let mut memory = shadowpatch_process::TargetMemory::open(&identity)?;
        for replacement in &mut replacements {
            let mut read = |address: u64, len: usize| memory.read_vec(address, len).map_err(PatchError::from);
            match examine_site(module, &replacement.symbol, &mut read) {
                Ok(examined) => {
                    problems.extend(
                        examined
                            .problems
                            .iter()
                            .map(|p| p.clone().into_error(&replacement.symbol, examined.site.entry)),
                    );
                    replacement.site = Some(examined.site);
                    replacement.entry_problems = examined.problems;
                }
                Err(PatchError::Target(error)) => return Err(PatchError::Target(error)),
                Err(problem) => problems.push(problem),
            }
        }
        if let Some(object) = &object {
            let mut object_code = ObjectCode::new(object);
            for replacement in &mut replacements {
                let (Some(site), Some(new)) = (&replacement.site, &replacement.new_function) else {
                    continue;
                };
                let mut module_code = ModuleCode {
                    module,
                    memory: &mut memory,
                    originals,
                };
                let old = clobbered(&mut module_code, site.entry, CLOBBER_DEPTH);
                let new = clobbered(&mut object_code, new.address, CLOBBER_DEPTH);
                replacement.extra = Some(new.minus(old));
            }
        }
    }
    Ok(Survey {
        manifest,
        manifest_path: manifest_path.to_path_buf(),
        identity,
        maps,
        modules,
        object,
        module,
        replacements,
        problems,
    })
}

/// The loaded module with the manifest's build-id, checked against the
/// manifest's optional module-name hint.
pub fn find_target_module(pid: i32, manifest: &Manifest, modules: &[Module]) -> Result<Module, PatchError> {
    let wanted = manifest.build_id_lowercase();
    let module = modules
        .iter()
        .find(|m| m.build_id_hex().as_deref() == Some(wanted.as_str()))
        .cloned()
        .ok_or_else(|| PatchError::BuildIdMismatch {
            pid,
            wanted: wanted.clone(),
            available: modules
                .iter()
                .filter(|m| {
                    manifest
                        .target
                        .module
                        .as_deref()
                        .is_none_or(|hint| m.matches_name(hint))
                })
                .map(|m| format!("{} {}", m.name, m.build_id_hex().unwrap_or_else(|| "(none)".into())))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    if let Some(hint) = &manifest.target.module {
        if !module.matches_name(hint) {
            return Err(PatchError::ModuleHint {
                hint: hint.clone(),
                module: module.name.clone(),
            });
        }
    }
    Ok(module)
}

/// Everything apply checks without writing to the target, failing on the
/// first problem: used by `apply`, and as the floor the prediction
/// engine's static analysis is measured against.
pub fn prepare(pid: i32, manifest_path: &Path, originals: &[(u64, Vec<u8>)]) -> Result<Prepared, PatchError> {
    let survey = survey(pid, manifest_path, originals)?;
    if let Some(first) = survey.problems.into_iter().next() {
        return Err(first);
    }
    let (Some(object), Some(module)) = (survey.object, survey.module) else {
        unreachable!("a survey without problems has its object and module");
    };
    let mut sites = Vec::new();
    let mut extra = Vec::new();
    for replacement in survey.replacements {
        let (Some(site), Some(registers)) = (replacement.site, replacement.extra) else {
            unreachable!("a survey without problems planned every site");
        };
        sites.push((site, replacement.with));
        extra.push(registers);
    }
    Ok(Prepared {
        manifest: survey.manifest,
        manifest_path: survey.manifest_path,
        object,
        identity: survey.identity,
        module,
        modules: survey.modules,
        maps: survey.maps,
        sites,
        extra,
    })
}

/// Apply the patch described by `manifest_path` to process `pid`, and
/// record the outcome in the event history.
pub fn apply(
    state_dir: &Path,
    pid: i32,
    manifest_path: &Path,
    options: &ApplyOptions,
) -> Result<ApplyOutcome, PatchError> {
    let result = apply_transaction(state_dir, pid, manifest_path, options, false).map(|(outcome, _)| outcome);
    crate::history::record_apply(state_dir, pid, manifest_path, &result);
    result
}

/// Apply through watch stubs and keep the target seized for the watch
/// window from before activation, so a fault in the first call of the new
/// code is already caught (`watchwindow.rs`).
pub fn apply_watched(
    state_dir: &Path,
    pid: i32,
    manifest_path: &Path,
    options: &ApplyOptions,
) -> Result<(ApplyOutcome, crate::watchwindow::WatchWindow), PatchError> {
    let options = ApplyOptions {
        watch_stubs: true,
        ..options.clone()
    };
    let result = apply_transaction(state_dir, pid, manifest_path, &options, true);
    let (outcome, attached) = match result {
        Ok((outcome, attached)) => (Ok(outcome), attached),
        Err(error) => (Err(error), None),
    };
    crate::history::record_apply(state_dir, pid, manifest_path, &outcome);
    let outcome = outcome?;
    let attached = attached.expect("kept seized");
    let window = crate::watchwindow::WatchWindow::from_seized(state_dir, attached, &outcome.patch_id)?;
    Ok((outcome, window))
}

fn apply_transaction(
    state_dir: &Path,
    pid: i32,
    manifest_path: &Path,
    options: &ApplyOptions,
    keep_seized: bool,
) -> Result<(ApplyOutcome, Option<Attached>), PatchError> {
    let started = Instant::now();
    let identity = ProcessIdentity::of(pid)?;
    let state = StateDir::create(state_dir)?;
    let mut target = TargetState::open(&state, &identity)?;
    // Entries rewritten by active patches, as they were before the first.
    let originals = originals_of(&target.journal_state);
    let prepared = prepare(pid, manifest_path, &originals)?;
    prepared.identity.check_same(&identity)?;
    if let Some(open) = &target.journal_state.open {
        return Err(PatchError::OpenTransaction {
            pid,
            patch_id: open.patch_id.clone(),
        });
    }
    if target.journal_state.active.iter().any(|p| p.id == prepared.manifest.id) {
        return Err(PatchError::DuplicateId {
            pid,
            id: prepared.manifest.id.clone(),
        });
    }
    let previous_generation = ensure_baseline(&state, &target, &prepared.identity, &prepared.maps, &prepared.modules)?;
    let generation = previous_generation + 1;

    let mut attached = Attached::seize(&prepared.identity)?;
    let LoadPlan {
        address,
        span,
        image,
        protections,
        functions,
    } = plan_load(&prepared, attached.memory(), options.watch_stubs)?;
    let record = PatchRecord {
        id: prepared.manifest.id.clone(),
        generation,
        manifest: absolute(&prepared.manifest_path),
        object: absolute(&prepared.object.path),
        module: prepared.module.name.clone(),
        build_id: prepared.manifest.build_id_lowercase(),
        mapping_address: address,
        mapping_len: span,
        functions,
    };

    let txn = target.journal_state.next_txn;
    target.journal.append(&Record::Begin {
        txn,
        kind: TxnKind::Apply,
        patch_id: record.id.clone(),
        pid,
        start_time: prepared.identity.start_time,
        unix_ms: now_ms(),
    })?;
    fault::point("begin");
    crate::rollback::collect_retired(&mut attached, &mut target, txn);
    let staged = staged_path(&target.dir, generation);
    let mut mapped = false;
    let mut held: Vec<Write5> = Vec::new();
    let mut parked = None;
    let result = (|| {
        target.journal.append(&Record::Map {
            txn,
            address,
            len: span,
        })?;
        fault::point("map");
        let load_pause_us = load(&mut attached, &protections, address, &image)?;
        mapped = true;
        fault::point("loaded");
        fault::target_point("loaded", pid);
        stage(
            &mut attached,
            &target,
            &protections,
            &record,
            previous_generation,
            &image,
            &staged,
        )?;
        fault::point("staged");
        target.journal.append(&Record::Plan {
            txn,
            patch: record.clone(),
        })?;
        fault::point("planned");
        if let Some(safe_point) = &options.safe_point {
            // Announce the held write before making it (see safepoint.rs).
            held = vec![safe_point.pending_write()];
            target.journal.append(&Record::Writes {
                txn,
                writes: held.clone(),
                patch_id: None,
            })?;
            parked = Some(safe_point.hold(pid, attached.memory())?);
        }
        let writes: Vec<Write5> = record.functions.iter().map(|f| f.write.clone()).collect();
        if keep_seized {
            // From activation on, a fatal signal is held for the window.
            attached.watch_signals(&crate::watchwindow::FATAL_SIGNALS);
        }
        let activation = switch(
            &mut attached,
            &writes,
            Direction::Forward,
            options.max_attempts,
            "",
            &mut |stopped| crate::safepoint::release_in_stop(stopped, &held),
        )?;
        fault::point("activated");
        Ok::<_, PatchError>((load_pause_us, activation))
    })();
    let (load_pause_us, activation) = match result {
        Ok(done) => done,
        Err(error) => {
            for write in &held {
                if let Err(e) = crate::safepoint::release(attached.memory(), write) {
                    tracing::error!("could not clear the safe-point request at {:#x}: {e}", write.address);
                }
            }
            undo_apply(
                &mut attached,
                &mut target.journal,
                txn,
                mapped.then_some((address, span)),
                &staged,
                &error,
            );
            return Err(error);
        }
    };
    target.journal.append(&Record::Commit {
        txn,
        pause_us: activation.pause.pause_us,
    })?;
    fault::point("committed");
    publish(&staged, &target.dir, generation)?;
    let kept = if keep_seized {
        Some(attached)
    } else {
        attached.detach()?;
        None
    };
    let outcome = ApplyOutcome {
        patch_id: record.id.clone(),
        pid,
        generation,
        functions: record
            .functions
            .iter()
            .map(|f| FunctionOutcome {
                symbol: f.site.symbol.clone(),
                with: f.with.clone(),
                entry: f.site.entry,
                new_address: f.new_address,
                preserved: f.preserved.clone(),
            })
            .collect(),
        mapping_address: address,
        mapping_len: span,
        pause_us: activation.pause.pause_us,
        activation,
        load_pause_us,
        total_us: started.elapsed().as_micros() as u64,
        safe_point: parked,
    };
    Ok((outcome, kept))
}

/// Map, write and protect the image in one stop; returns the pause (µs).
fn load(
    attached: &mut Attached,
    protections: &[(u64, u64, i32)],
    address: u64,
    image: &[u8],
) -> Result<u64, PatchError> {
    let mut stopped = attached.stop()?;
    let tid = stopped.borrowable_thread();
    map_image(
        &mut StoppedThread {
            stopped: &mut stopped,
            tid,
        },
        protections,
        address,
        image,
    )?;
    Ok(stopped.resume()?.pause_us)
}

/// Derive the next generation and check the loaded bytes against it.
fn stage(
    attached: &mut Attached,
    target: &TargetState,
    protections: &[(u64, u64, i32)],
    record: &PatchRecord,
    previous_generation: u32,
    image: &[u8],
    staged: &Path,
) -> Result<(), PatchError> {
    let live = attached.memory().read_vec(record.mapping_address, image.len())?;
    if live != image {
        let offset = live.iter().zip(image).position(|(a, b)| a != b).unwrap_or(0);
        return Err(PatchError::StagingMismatch {
            address: record.mapping_address + offset as u64,
        });
    }
    let previous = MirrorFile::open(&StateDir::generation_path(&target.dir, previous_generation))?;
    let edits: Vec<Edit> = record
        .functions
        .iter()
        .map(|f| Edit {
            address: f.write.address,
            bytes: f.write.new.clone(),
        })
        .collect();
    let mut added = Vec::new();
    for &(start, end, protection) in protections {
        // Writable pages are the patch's mutable data: not mirrored.
        if protection & libc::PROT_WRITE != 0 || protection & libc::PROT_READ == 0 {
            continue;
        }
        let executable = protection & libc::PROT_EXEC != 0;
        added.push(AddedRegion {
            spec: RegionSpec {
                start: record.mapping_address + start,
                end: record.mapping_address + end,
                kind: if executable {
                    RegionKind::Code
                } else {
                    RegionKind::ReadOnlyData
                },
                perms: format!("r-{}p", if executable { 'x' } else { '-' }),
                module: format!("patch:{}", record.id),
                path: Some(record.object.clone()),
                build_id: None,
                file_offset: start,
            },
            bytes: image[start as usize..end as usize].to_vec(),
        });
    }
    derive(&previous, record.generation, &edits, &added, staged)?;
    // The staged generation must describe exactly what is in the target.
    let generation = MirrorFile::open(staged)?;
    for (index, region) in generation
        .header
        .regions
        .iter()
        .enumerate()
        .filter(|(_, r)| r.spec.module.starts_with("patch:"))
    {
        let bytes = attached
            .memory()
            .read_vec(region.spec.start, region.spec.len() as usize)?;
        for (page, page_bytes) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            if generation.hasher.hash(page_bytes) != generation.region_hashes(index)[page] {
                return Err(PatchError::StagingMismatch {
                    address: region.spec.start + (page * PAGE_SIZE) as u64,
                });
            }
        }
    }
    Ok(())
}

/// Undo a failed apply: unmap, drop the staged generation, journal Abort.
/// Best effort: each step's failure is logged and the next still runs, and
/// a leftover is visible to `recover` through the journal.
fn undo_apply(
    attached: &mut Attached,
    journal: &mut Journal,
    txn: u64,
    mapping: Option<(u64, u64)>,
    staged: &Path,
    error: &PatchError,
) {
    if matches!(
        error,
        PatchError::Target(shadowpatch_process::TargetError::Exited { .. })
    ) || shadowpatch_process::ProcessIdentity::of(attached.pid()).is_err()
    {
        // The target is gone: nothing left to undo in it.
        let _ = std::fs::remove_file(staged);
        let _ = journal.append(&Record::Abort {
            txn,
            reason: format!("target exited: {error}"),
        });
        return;
    }
    let mut unmapped = true;
    if let Some((address, len)) = mapping {
        unmapped = crate::state::unmap(attached, address, len).is_ok();
    }
    let _ = std::fs::remove_file(staged);
    if unmapped {
        if let Err(e) = journal.append(&Record::Abort {
            txn,
            reason: error.to_string(),
        }) {
            tracing::error!("could not journal the abort: {e}; run `shadowpatch recover`");
        }
    } else {
        tracing::error!("could not unmap the patch after: {error}; run `shadowpatch recover`");
    }
}

/// Move a staged generation into place.
pub(crate) fn publish(staged: &Path, dir: &Path, generation: u32) -> Result<(), PatchError> {
    let final_path = StateDir::generation_path(dir, generation);
    std::fs::rename(staged, &final_path)
        .and_then(|_| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| PatchError::Journal {
            path: final_path,
            message: format!("publishing generation: {e}"),
        })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
