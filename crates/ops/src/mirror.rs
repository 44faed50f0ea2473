//! `mirror`: capture generation 0 (the baseline) of a process, and record
//! it in the history.

use crate::{bad_input, OpsError};
use shadowpatch_mirror::{capture, select_regions, CaptureOptions, GenerationHeader, MirrorError, StateDir};
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use shadowpatch_symbols::modules_of;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// What `mirror` captured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MirrorOutcome {
    pub pid: i32,
    pub start_time: u64,
    pub generation: u32,
    pub path: PathBuf,
    pub regions: usize,
    pub pages: u64,
    pub bytes: u64,
    pub capture_us: u64,
    pub modules: Vec<ModuleSummary>,
    pub notes: Vec<String>,
    /// Forked from a patched process: its state was adopted, not captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<crate::adopt::Adopted>,
}

/// One module of a mirror.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModuleSummary {
    pub name: String,
    pub build_id: Option<String>,
    pub regions: usize,
    pub bytes: u64,
}

/// Mirror `pid` into `state_dir` as generation 0 (only `module`, named as
/// `Module::matches_name` accepts, if given); `progress(done, total)`
/// follows the bytes read.
pub fn mirror(
    state_dir: &Path,
    pid: i32,
    module: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MirrorOutcome, OpsError> {
    let identity = ProcessIdentity::of(pid)?;
    // A child forked from a patched process holds patched code: its
    // baseline is its ancestor's state as of the fork, never a capture.
    if let Some(adopted) = crate::adopt::adopt_if_forked(state_dir, pid)? {
        let dir = StateDir::open(state_dir)?.target_dir(pid, identity.start_time);
        let path = StateDir::generation_path(&dir, adopted.generation);
        let file = shadowpatch_mirror::MirrorFile::open(&path)?;
        let mut outcome = outcome(&identity, path, &file.header);
        outcome.notes.insert(0, adopted.describe());
        outcome.capture_us = adopted.elapsed_us;
        outcome.adopted = Some(adopted);
        return Ok(outcome);
    }
    let maps = read_maps(pid)?;
    let modules = modules_of(pid, &maps).map_err(MirrorError::from)?;
    let regions = select_regions(pid, &maps, &modules, module)?;
    if regions.is_empty() {
        return Err(bad_input(format!(
            "pid {pid}: nothing to mirror (no readable code or read-only data)"
        )));
    }
    let state = StateDir::create(state_dir)?;
    let dir = state.target_dir(pid, identity.start_time);
    // A pid that exec'd starts over: the old program's state is a dead
    // target's, kept aside.
    let mut set_aside = None;
    if let Some(aside) = StateDir::set_aside_if_execd(&dir, &identity)? {
        set_aside = Some(format!(
            "pid {pid} exec'd a new program since it was mirrored: the old state was moved to {}",
            aside.display()
        ));
    }
    // Under the target's lock, with the generation files brought in line
    // with the journal (a rollback killed after its commit leaves a
    // generation that nothing backs any more).
    let _target = shadowpatch_patch::state::TargetState::open(&state, &identity)?;
    let later: Vec<u32> = StateDir::generations(&dir).into_iter().filter(|g| *g > 0).collect();
    if !later.is_empty() {
        return Err(bad_input(format!(
            "pid {pid} already has patch generations {later:?} in {}: a new baseline would orphan them; roll them back first",
            dir.display()
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| MirrorError::Io {
            path: dir.clone(),
            source,
        })?;
    let path = StateDir::generation_path(&dir, 0);
    let mut memory = TargetMemory::open(&identity)?;
    let header = capture(
        &mut memory,
        &identity,
        &regions,
        &path,
        &CaptureOptions { generation: 0 },
        progress,
    )?;
    // The process may have exited (and its pid been reused) while we read.
    identity.check_alive()?;
    let mut outcome = outcome(&identity, path, &header);
    outcome.notes.extend(set_aside);
    shadowpatch_store::record_best_effort(
        state_dir,
        &shadowpatch_store::NewEvent::new(shadowpatch_store::EventKind::Mirror)
            .target(outcome.pid, outcome.start_time)
            .outcome("ok")
            .duration_us(outcome.capture_us)
            .details(serde_json::json!({
                "summary": format!("generation {}, {} regions, {} bytes", outcome.generation, outcome.regions, outcome.bytes),
                "generation": outcome.generation,
                "regions": outcome.regions,
                "bytes": outcome.bytes,
                "module": module,
            })),
    );
    Ok(outcome)
}

fn outcome(identity: &ProcessIdentity, path: PathBuf, header: &GenerationHeader) -> MirrorOutcome {
    let mut modules: Vec<ModuleSummary> = Vec::new();
    for region in &header.regions {
        let bytes = region.pages * 4096;
        match modules.iter_mut().find(|m| m.name == region.spec.module) {
            Some(m) => {
                m.regions += 1;
                m.bytes += bytes;
            }
            None => modules.push(ModuleSummary {
                name: region.spec.module.clone(),
                build_id: region.spec.build_id.clone(),
                regions: 1,
                bytes,
            }),
        }
    }
    MirrorOutcome {
        pid: identity.pid,
        start_time: identity.start_time,
        generation: header.generation,
        path,
        regions: header.regions.len(),
        pages: header.regions.iter().map(|r| r.pages).sum(),
        bytes: header.total_bytes,
        capture_us: header.capture_us,
        modules,
        notes: header.notes.clone(),
        adopted: None,
    }
}
