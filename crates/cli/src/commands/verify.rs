//! `shadowpatch verify PID`: one verification pass against the mirror.

use super::{Context, Location};
use crate::failure::BadInput;
use crate::output::{gb_per_s, hex_bytes, human_bytes, print_json};
use crate::progress::Progress;
use serde::Serialize;
use shadowpatch_mirror::{verify, DifferenceKind, MirrorError, MirrorFile, StateDir};
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use shadowpatch_symbols::{modules_of, Module};
use std::path::PathBuf;

#[derive(Debug, Serialize)]
pub struct VerifyOutcome {
    pub pid: i32,
    pub start_time: u64,
    pub generation: u32,
    pub mirror: PathBuf,
    pub clean: bool,
    pub regions: usize,
    pub pages: u64,
    pub bytes: u64,
    pub differing_pages: u64,
    pub elapsed_us: u64,
    pub differences: Vec<ReportedDifference>,
    pub truncated: bool,
    /// Forked from a patched process: its state was adopted first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopted: Option<shadowpatch_ops::Adopted>,
}

#[derive(Debug, Serialize)]
pub struct ReportedDifference {
    pub kind: DifferenceKind,
    pub address: u64,
    pub address_hex: String,
    pub len: u64,
    #[serde(flatten)]
    pub location: Location,
    pub location_text: String,
    pub expected: String,
    pub live: String,
}

/// Open the mirror of the live process `identity` (latest generation unless
/// one is named) and check it belongs to this incarnation and these modules.
pub fn open_mirror(
    state_dir: &std::path::Path,
    identity: &ProcessIdentity,
    generation: Option<u32>,
    modules: &[Module],
) -> anyhow::Result<MirrorFile> {
    let state = StateDir::open(state_dir)?;
    let dir = state.dir_for_live(identity)?;
    let generations = StateDir::generations(&dir);
    let chosen = match generation {
        Some(g) if generations.contains(&g) => g,
        Some(g) => {
            return Err(BadInput(format!(
                "pid {}: no generation {g} in {} (have {generations:?})",
                identity.pid,
                dir.display()
            ))
            .into())
        }
        None => {
            let latest = *generations.last().ok_or(MirrorError::NoMirror {
                pid: identity.pid,
                state_dir: state_dir.into(),
            })?;
            // The journal is the authority: a generation above its active
            // patch count is a committed rollback's leftover, which the
            // next recover (or apply) removes.
            match shadowpatch_patch::journal::Journal::replay(&dir) {
                Ok(journal) if journal.open.is_none() && generations.contains(&(journal.active.len() as u32)) => {
                    latest.min(journal.active.len() as u32)
                }
                _ => latest,
            }
        }
    };
    let mirror = MirrorFile::open(&StateDir::generation_path(&dir, chosen))?;
    mirror.check_belongs_to(identity, modules)?;
    Ok(mirror)
}

impl ReportedDifference {
    /// One line: address, location, length, expected and live bytes.
    pub fn describe(&self) -> String {
        match self.kind {
            DifferenceKind::Bytes => format!(
                "{} {} ({} byte{}): expected {} live {}",
                self.address_hex,
                self.location_text,
                self.len,
                if self.len == 1 { "" } else { "s" },
                self.expected,
                self.live
            ),
            DifferenceKind::Unreadable => {
                format!(
                    "{} {} ({} bytes): no longer readable",
                    self.address_hex, self.location_text, self.len
                )
            }
        }
    }
}

pub fn verify_process(
    state_dir: &std::path::Path,
    pid: i32,
    generation: Option<u32>,
    show_progress: bool,
) -> anyhow::Result<VerifyOutcome> {
    let identity = ProcessIdentity::of(pid)?;
    // A child forked from a patched process is verified against the
    // generation it inherited, never against none.
    let adopted = shadowpatch_ops::adopt_if_forked(state_dir, pid)?;
    let modules = modules_of(pid, &read_maps(pid)?)?;
    let mirror = open_mirror(state_dir, &identity, generation, &modules)?;
    let mut memory = TargetMemory::open(&identity)?;
    let mut progress = Progress::bytes("verifying", show_progress);
    let report = verify(&mut memory, &mirror, &mut |done, total| progress.update(done, total))?;
    progress.finish();
    identity.check_alive()?;
    let differences = report
        .differences
        .iter()
        .map(|d| {
            let location = Location::of(d.address, &modules);
            ReportedDifference {
                kind: d.kind,
                address: d.address,
                address_hex: format!("{:#x}", d.address),
                len: d.len,
                location_text: location.location.clone(),
                location,
                expected: hex_bytes(&d.expected),
                live: hex_bytes(&d.live),
            }
        })
        .collect();
    Ok(VerifyOutcome {
        pid,
        start_time: identity.start_time,
        generation: report.generation,
        mirror: mirror.path.clone(),
        clean: report.is_clean(),
        regions: report.regions,
        pages: report.pages,
        bytes: report.bytes,
        differing_pages: report.differing_pages,
        elapsed_us: report.elapsed_us,
        differences,
        truncated: report.truncated,
        adopted,
    })
}

pub fn run(context: &Context, pid: i32, generation: Option<u32>) -> anyhow::Result<i32> {
    let outcome = verify_process(&context.state_dir, pid, generation, !context.json)?;
    let code = if outcome.clean {
        crate::failure::Exit::Ok
    } else {
        crate::failure::Exit::Differences
    }
    .code();
    if context.json {
        print_json(&outcome);
        return Ok(code);
    }
    print_outcome(&outcome);
    Ok(code)
}

pub fn print_outcome(outcome: &VerifyOutcome) {
    if let Some(adopted) = &outcome.adopted {
        println!("{}", adopted.describe());
    }
    let verdict = if outcome.clean { "clean" } else { "DIFFERS" };
    println!(
        "verify pid {} generation {}: {verdict} — {} regions, {} in {:.1} ms ({:.2} GB/s), {} differing pages",
        outcome.pid,
        outcome.generation,
        outcome.regions,
        human_bytes(outcome.bytes),
        outcome.elapsed_us as f64 / 1000.0,
        gb_per_s(outcome.bytes, outcome.elapsed_us),
        outcome.differing_pages
    );
    for d in &outcome.differences {
        println!("  {}", d.describe());
    }
    if outcome.truncated {
        println!("  (more differences not shown)");
    }
}
