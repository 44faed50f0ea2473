//! `shadowpatch mirror PID`: capture generation 0 of a process.

use super::Context;
use crate::failure::BadInput;
use crate::output::{gb_per_s, human_bytes, print_json};
use crate::progress::Progress;
use anyhow::Context as _;
use serde::Serialize;
use shadowpatch_mirror::{capture, select_regions, CaptureOptions, GenerationHeader, StateDir};
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use shadowpatch_symbols::modules_of;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

#[derive(Debug, Serialize)]
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
}

#[derive(Debug, Serialize)]
pub struct ModuleSummary {
    pub name: String,
    pub build_id: Option<String>,
    pub regions: usize,
    pub bytes: u64,
}

/// Mirror `pid` into `state_dir` as generation 0.
pub fn mirror_process(
    state_dir: &std::path::Path,
    pid: i32,
    module: Option<&str>,
    show_progress: bool,
) -> anyhow::Result<MirrorOutcome> {
    let identity = ProcessIdentity::of(pid)?;
    let maps = read_maps(pid)?;
    let modules = modules_of(pid, &maps)?;
    let regions = select_regions(pid, &maps, &modules, module)?;
    if regions.is_empty() {
        return Err(BadInput(format!(
            "pid {pid}: nothing to mirror (no readable code or read-only data)"
        ))
        .into());
    }
    let state = StateDir::create(state_dir)?;
    let dir = state.target_dir(pid, identity.start_time);
    // A pid that exec'd starts over: the old program's state is a dead
    // target's, kept aside.
    if let Some(aside) = StateDir::set_aside_if_execd(&dir, &identity)? {
        eprintln!(
            "pid {pid} exec'd a new program since it was mirrored: the old state was moved to {}",
            aside.display()
        );
    }
    // Under the target's lock, with the generation files brought in line
    // with the journal (a rollback killed after its commit leaves a
    // generation that nothing backs any more).
    let _target = shadowpatch_patch::state::TargetState::open(&state, &identity)?;
    let later: Vec<u32> = StateDir::generations(&dir).into_iter().filter(|g| *g > 0).collect();
    if !later.is_empty() {
        return Err(BadInput(format!(
            "pid {pid} already has patch generations {later:?} in {}: a new baseline would orphan them; roll them back first",
            dir.display()
        ))
        .into());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = StateDir::generation_path(&dir, 0);
    let mut memory = TargetMemory::open(&identity)?;
    let mut progress = Progress::bytes("mirroring", show_progress);
    let header = capture(
        &mut memory,
        &identity,
        &regions,
        &path,
        &CaptureOptions { generation: 0 },
        &mut |done, total| progress.update(done, total),
    )?;
    progress.finish();
    // The process may have exited (and its pid been reused) while we read.
    identity.check_alive()?;
    Ok(outcome(&identity, path, &header))
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
    }
}

pub fn run(context: &Context, pid: i32, module: Option<&str>) -> anyhow::Result<i32> {
    let outcome = mirror_process(&context.state_dir, pid, module, !context.json)?;
    shadowpatch_store::record_best_effort(
        &context.state_dir,
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
    if context.json {
        print_json(&outcome);
        return Ok(0);
    }
    println!(
        "mirrored pid {} (start time {}): generation {}, {} regions, {} pages, {} in {:.1} ms ({:.2} GB/s)",
        outcome.pid,
        outcome.start_time,
        outcome.generation,
        outcome.regions,
        outcome.pages,
        human_bytes(outcome.bytes),
        outcome.capture_us as f64 / 1000.0,
        gb_per_s(outcome.bytes, outcome.capture_us)
    );
    for module in &outcome.modules {
        println!(
            "  {:<28} {:>3} regions {:>10}  build-id {}",
            module.name,
            module.regions,
            human_bytes(module.bytes),
            module.build_id.as_deref().unwrap_or("-")
        );
    }
    for note in &outcome.notes {
        println!("  note: {note}");
    }
    println!("  saved to {}", outcome.path.display());
    Ok(0)
}
