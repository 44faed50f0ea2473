//! `shadowpatch build --debian`: the same build for a binary of an
//! installed Debian package, with the source fetched, the build
//! dependencies checked and the reference built by the package's own rules
//! (`shadowpatch_ops::build_debian`); prints how the source and the
//! reference were found, then what `build` prints.

use super::build::{print_outcome, request, BuildArgs};
use super::Context;
use crate::output::print_json;
use shadowpatch_build::debian::{DebianRequest, DebianSource};
use shadowpatch_ops::DEBIAN_BUILD_STAGES;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct DebianArgs {
    /// The target is from an installed Debian package: find its package and version, fetch that
    /// source (cached), check its build dependencies and build the reference with its own rules.
    #[arg(long, conflicts_with_all = ["build_cmd", "reference_tree"])]
    pub debian: bool,
    /// Cache of Debian sources, header overlays and reference builds (default: ~/.cache/shadowpatch/debsrc).
    #[arg(long, value_name = "DIR", env = "SHADOWPATCH_DEBSRC_CACHE", requires = "debian")]
    pub debsrc_cache: Option<PathBuf>,
    /// Rebuilds with archive headers to try when the plain rebuild's build-id is not the target's.
    #[arg(long, value_name = "N", default_value_t = 3, requires = "debian")]
    pub max_overlay_builds: usize,
}

pub fn run(context: &Context, args: &BuildArgs) -> anyhow::Result<i32> {
    let debian = DebianRequest {
        target: args.target.clone(),
        module: args.module.clone(),
        source: args.source.clone(),
        cache: args
            .debian
            .debsrc_cache
            .clone()
            .unwrap_or_else(shadowpatch_build::debian::default_cache),
        max_overlay_builds: args.debian.max_overlay_builds,
    };
    let total = DEBIAN_BUILD_STAGES as u64;
    let mut bar = crate::progress::Progress::count("building", !context.json && std::io::stderr().is_terminal());
    let outcome =
        shadowpatch_ops::build_debian(&context.state_dir, &debian, &request(args), &mut |stage, name, note| {
            if note.is_empty() {
                bar.note(name);
            } else {
                bar.note(&format!("{name}: {note}"));
            }
            bar.update(stage as u64, total);
        })?;
    bar.update(total, total);
    drop(bar);
    if context.json {
        print_json(&outcome);
    } else {
        print_debian(&outcome.debian);
        print_outcome(&outcome.outcome, &args.target);
    }
    Ok(0)
}

fn print_debian(debian: &DebianSource) {
    println!(
        "{} is from {} {} (source {} {})",
        debian.binary.display(),
        debian.package,
        debian.version,
        debian.source_package,
        debian.source_version
    );
    println!(
        "  source: {} ({})",
        debian.tree.display(),
        if debian.source_cached {
            "cached".to_string()
        } else {
            format!("fetched in {:.1} s", debian.fetch_seconds)
        }
    );
    for attempt in &debian.tries {
        let headers = match &attempt.overlay {
            Some(overlay) => format!("with the headers of {overlay}"),
            None => "plain".to_string(),
        };
        let how = serde_json::to_value(attempt.how)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        // A reference build found done in the cache took no time.
        let took = if attempt.build_seconds > 0.0 {
            format!("{:.0} s", attempt.build_seconds)
        } else {
            "reused".to_string()
        };
        println!(
            "  reference build, {headers}: build-id {} ({how}), {took}",
            attempt.build_id.as_deref().unwrap_or("(none)"),
        );
    }
    if !debian.overlays_not_tried.is_empty() {
        println!(
            "  header overlays not tried: {} (the target's binary reads none of their headers)",
            debian.overlays_not_tried.join(", ")
        );
    }
    println!(
        "  reference: {}{}",
        debian.reference_tree.display(),
        if debian.reference_reused { " (reused)" } else { "" }
    );
}
