//! The apply transaction: stage → verify → activate, journaled.
//!
//! 1. Act on a [`Prepared`] survey (`survey.rs`: every check that needs no
//!    write), re-surveyed only if the active patches changed since.
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
use crate::fault;
use crate::journal::{Journal, PatchRecord, Record, TxnKind, Write5};
use crate::load::{map_image, plan_load, LoadPlan, StoppedThread};
use crate::state::{ensure_baseline, now_ms, staged_path, TargetState};
use crate::survey::{originals_of, prepare, prepare_survey, survey_prepared, Prepared};
use crate::PatchError;
use shadowpatch_mirror::{derive, AddedRegion, Edit, MirrorFile, RegionKind, RegionSpec, StateDir, PAGE_SIZE};
use shadowpatch_process::{Attached, ProcessIdentity};
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
    /// A target without a mirror yet gets generation 0 of the patched
    /// module only (as `mirror --module` makes), not of every module it
    /// maps: host-wide applies, where writing each process's own copy of
    /// glibc and the rest to disk cost more than everything else.
    pub baseline_module_only: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_attempts: DEFAULT_ATTEMPTS,
            safe_point: None,
            watch_stubs: false,
            baseline_module_only: false,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FunctionOutcome {
    pub symbol: String,
    pub with: String,
    pub entry: u64,
    pub new_address: u64,
    /// Registers preserved by a thunk (None: a direct jump).
    pub preserved: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

/// Apply the patch described by `manifest_path` to process `pid`, and
/// record the outcome in the event history.
pub fn apply(
    state_dir: &Path,
    pid: i32,
    manifest_path: &Path,
    options: &ApplyOptions,
) -> Result<ApplyOutcome, PatchError> {
    let result =
        apply_transaction(state_dir, pid, Source::Path(manifest_path), options, false).map(|(outcome, _)| outcome);
    crate::history::record_apply(state_dir, pid, manifest_path, &result);
    result
}

/// What the transaction acts on: a manifest to survey under the target's
/// lock, or a survey already made (the operations layer's, made once).
#[derive(Debug)]
pub enum Source<'a> {
    Path(&'a Path),
    Prepared(Box<Prepared>),
}

/// Apply a patch surveyed already (`survey::prepare_survey`); the
/// caller records the outcome in the history. The survey is re-made from
/// its parsed manifest only if the active patches changed since it was
/// made (what it read of their entries would be stale).
pub fn apply_prepared(
    state_dir: &Path,
    prepared: Prepared,
    options: &ApplyOptions,
) -> Result<ApplyOutcome, PatchError> {
    let pid = prepared.identity.pid;
    apply_transaction(state_dir, pid, Source::Prepared(Box::new(prepared)), options, false).map(|(outcome, _)| outcome)
}

/// [`apply_watched`] of a patch surveyed already; the caller records the
/// outcome in the history.
pub fn apply_prepared_watched(
    state_dir: &Path,
    prepared: Prepared,
    options: &ApplyOptions,
) -> Result<(ApplyOutcome, crate::watchwindow::WatchWindow), PatchError> {
    let pid = prepared.identity.pid;
    let options = ApplyOptions {
        watch_stubs: true,
        ..options.clone()
    };
    let (outcome, attached) = apply_transaction(state_dir, pid, Source::Prepared(Box::new(prepared)), &options, true)?;
    let attached = attached.expect("kept seized");
    let window = crate::watchwindow::WatchWindow::from_seized(state_dir, attached, &outcome.patch_id)?;
    Ok((outcome, window))
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
    let result = apply_transaction(state_dir, pid, Source::Path(manifest_path), &options, true);
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
    source: Source,
    options: &ApplyOptions,
    keep_seized: bool,
) -> Result<(ApplyOutcome, Option<Attached>), PatchError> {
    let started = Instant::now();
    // Who the target is now, before its lock: a surveyed patch's identity
    // is checked (still this process, same program), not read afresh, so
    // its probe goes on.
    let identity = match &source {
        Source::Prepared(prepared) => {
            prepared.identity.check_alive()?;
            prepared.identity.clone()
        }
        Source::Path(_) => ProcessIdentity::of_probed(pid)?,
    };
    let state = StateDir::create(state_dir)?;
    let mut target = TargetState::open(&state, &identity)?;
    // Entries rewritten by active patches, as they were before the first.
    let originals = originals_of(&target.journal_state);
    let prepared = match source {
        Source::Path(manifest_path) => prepare(pid, manifest_path, &originals)?,
        Source::Prepared(prepared) if prepared.originals == originals => *prepared,
        // Another patch came or went since the survey: survey again, from
        // the manifest already parsed.
        Source::Prepared(stale) => prepare_survey(survey_prepared(*stale, &originals)?)?,
    };
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
    let previous_generation = ensure_baseline(
        &state,
        &target,
        &prepared.identity,
        &prepared.maps,
        &prepared.modules,
        options.baseline_module_only.then_some(prepared.module.name.as_str()),
    )?;
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
        boot_ns: Some(crate::journal::boot_ns()),
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
        // The next generation is derived from the image and the plan
        // journaled before the load, so that the load's stop makes them
        // durable with the Begin and Map records (one sync, not two, per
        // member of a host-wide batch). Recovery of a Plan whose
        // trampolines were never written undoes the mapping if it was
        // made, as it does before a Plan.
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
        let load_pause_us = load(&mut attached, &prepared.maps, &protections, address, &image)?;
        mapped = true;
        fault::point("loaded");
        fault::target_point("loaded", pid);
        check_loaded(&mut attached, &record, &image)?;
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
        // Not kept for a watch window: the activation's stop is the last,
        // and it lets go of the target instead of resuming it.
        attached.release_at_next_resume(!keep_seized);
        let activation = switch(
            &mut attached,
            &writes,
            Direction::Forward,
            options.max_attempts,
            "",
            &mut |stopped| crate::safepoint::release_in_stop(stopped, &held),
        );
        // Still set if the activation failed: undoing it needs the target.
        attached.release_at_next_resume(false);
        let activation = activation?;
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
        boot_ns: Some(crate::journal::boot_ns()),
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
    maps: &[shadowpatch_process::Mapping],
    protections: &[(u64, u64, i32)],
    address: u64,
    image: &[u8],
) -> Result<u64, PatchError> {
    // The instructions the remote calls borrow are found before the stop
    // (a search of the target's libc), not in its pause; in the survey's
    // maps, which placed the patch too.
    attached.prepare_remote_calls_from(maps)?;
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

/// Derive the next generation from the image about to be loaded, and
/// check that it describes exactly that image (and the target's other
/// patches as they are in it).
fn stage(
    attached: &mut Attached,
    target: &TargetState,
    protections: &[(u64, u64, i32)],
    record: &PatchRecord,
    previous_generation: u32,
    image: &[u8],
    staged: &Path,
) -> Result<(), PatchError> {
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
    // The staged generation must describe exactly the image (which
    // `check_loaded` then finds in the target) and the patches already in
    // the target.
    let generation = MirrorFile::open(staged)?;
    for (index, region) in generation
        .header
        .regions
        .iter()
        .enumerate()
        .filter(|(_, r)| r.spec.module.starts_with("patch:"))
    {
        // This patch's pages are in the image (by address: an older mapping
        // of a patch with the same id may have been retired, not unmapped).
        let in_image = region
            .spec
            .start
            .checked_sub(record.mapping_address)
            .and_then(|offset| image.get(offset as usize..offset as usize + region.spec.len() as usize));
        let bytes = if let Some(bytes) = in_image {
            bytes.to_vec()
        } else {
            attached
                .memory()
                .read_vec(region.spec.start, region.spec.len() as usize)?
        };
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

/// The loaded image read back: what the staged generation describes.
fn check_loaded(attached: &mut Attached, record: &PatchRecord, image: &[u8]) -> Result<(), PatchError> {
    let live = attached.memory().read_vec(record.mapping_address, image.len())?;
    if live != image {
        let offset = live.iter().zip(image).position(|(a, b)| a != b).unwrap_or(0);
        return Err(PatchError::StagingMismatch {
            address: record.mapping_address + offset as u64,
        });
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

/// Move a staged generation into place, once the commit that decides it
/// is durable (inside a batch, its sync may still be pending: made now).
pub(crate) fn publish(staged: &Path, dir: &Path, generation: u32) -> Result<(), PatchError> {
    let final_path = StateDir::generation_path(dir, generation);
    shadowpatch_process::durable::flush()
        .map_err(std::io::Error::from)
        .and_then(|_| std::fs::rename(staged, &final_path))
        .and_then(|_| shadowpatch_process::durable::sync_dir(dir))
        .map_err(|e| PatchError::Journal {
            path: final_path,
            message: format!("publishing generation: {e}"),
        })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
