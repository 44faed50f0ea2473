//! `shadowpatch mirror PID`: capture generation 0 of a process (the
//! operation is `shadowpatch_ops::mirror`).

use super::Context;
use crate::output::{gb_per_s, human_bytes, print_json};
use crate::progress::Progress;
use shadowpatch_ops::MirrorOutcome;

/// Mirror `pid` as generation 0 through the operations layer, with a
/// progress bar when asked.
pub fn mirror_process(
    state_dir: &std::path::Path,
    pid: i32,
    module: Option<&str>,
    show_progress: bool,
) -> anyhow::Result<MirrorOutcome> {
    let mut progress = Progress::bytes("mirroring", show_progress);
    let outcome = shadowpatch_ops::mirror(state_dir, pid, module, &mut |done, total| progress.update(done, total))?;
    progress.finish();
    Ok(outcome)
}

pub fn run(context: &Context, pid: i32, module: Option<&str>) -> anyhow::Result<i32> {
    let outcome = mirror_process(&context.state_dir, pid, module, !context.json)?;
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
