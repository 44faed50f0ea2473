//! `shadowpatch build`: a patch from a source diff for the binary that is
//! running (the operation is `shadowpatch_ops::build`), printed as what
//! changed, what was bound where, and the static analysis of the result.

use super::Context;
use crate::output::print_json;
use shadowpatch_build::{BuildRequest, BuiltFunction, STEPS};
use shadowpatch_ops::BuildOutcome;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// The source tree the running binary was built from (copied; never built in place).
    /// With --debian: an `apt-get source` tree of the installed version (default: fetched).
    #[arg(long, value_name = "DIR", required_unless_present = "debian")]
    pub source: Option<PathBuf>,
    /// A unified diff against the tree (repeatable; applied in order).
    #[arg(long = "diff", value_name = "FILE", required = true)]
    pub diffs: Vec<PathBuf>,
    /// A running process (PID) or a binary file.
    #[arg(long, value_name = "PID|PATH")]
    pub target: String,
    /// The module of the process to patch (default: the main executable).
    #[arg(long, value_name = "NAME")]
    pub module: Option<String>,
    /// The command that builds the tree (default: make for a Makefile, debian/rules build for a Debian source package).
    #[arg(long, value_name = "CMD")]
    pub build_cmd: Option<String>,
    /// A reference tree already built (e.g. a Debian package built with its own rules) instead of building one.
    #[arg(long, value_name = "DIR")]
    pub reference_tree: Option<PathBuf>,
    /// The patch id (default: the first diff's file name).
    #[arg(long)]
    pub id: Option<String>,
    /// Where manifest.toml and patch.so go (a new or empty folder; written only when complete).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Build even when the target was built by another compiler.
    #[arg(long)]
    pub allow_compiler_mismatch: bool,
    /// Cache of reference and original builds (default: ~/.cache/shadowpatch/build).
    #[arg(long, value_name = "DIR", env = "SHADOWPATCH_BUILD_CACHE")]
    pub cache: Option<PathBuf>,
    #[command(flatten)]
    pub debian: super::build_debian::DebianArgs,
}

pub fn run(context: &Context, args: &BuildArgs) -> anyhow::Result<i32> {
    if args.debian.debian {
        return super::build_debian::run(context, args);
    }
    let request = request(args);
    let mut bar = crate::progress::Progress::count("building", !context.json && std::io::stderr().is_terminal());
    let outcome = shadowpatch_ops::build(&context.state_dir, &request, &mut |index, name| {
        bar.note(name);
        bar.update(index as u64, STEPS.len() as u64);
    })?;
    bar.update(STEPS.len() as u64, STEPS.len() as u64);
    drop(bar);
    if context.json {
        print_json(&outcome);
    } else {
        print_outcome(&outcome, &args.target);
    }
    Ok(0)
}

/// The build request the options describe (`source` empty with --debian:
/// the Debian preparation fills it).
pub(super) fn request(args: &BuildArgs) -> BuildRequest {
    BuildRequest {
        source: args.source.clone().unwrap_or_default(),
        diffs: args.diffs.clone(),
        target: args.target.clone(),
        module: args.module.clone(),
        build_command: args.build_cmd.clone(),
        reference_tree: args.reference_tree.clone(),
        id: args.id.clone(),
        out: args.out.clone(),
        allow_compiler_mismatch: args.allow_compiler_mismatch,
        cache: args.cache.clone(),
    }
}

pub(super) fn print_outcome(outcome: &BuildOutcome, target: &str) {
    let built = &outcome.built;
    println!(
        "built patch {} for {} (build-id {}) in {:.1} s: {}",
        built.manifest.id,
        built.target_module,
        built.target_build_id,
        built.build_seconds,
        built.manifest_path.display()
    );
    let list = |label: &str, functions: &[BuiltFunction]| {
        for f in functions {
            println!(
                "  {label:<22} {} ({})",
                shadowpatch_build::cxx::demangle(&f.symbol),
                f.object.display()
            );
        }
    };
    list("changed", &built.functions_changed);
    list("new", &built.functions_new);
    list("included (inlining)", &built.functions_included_for_inlining);
    for name in &built.functions_line_only {
        println!("  {:<22} {name}", "ignored (line only)");
    }
    for name in &built.data_new {
        println!("  {:<22} {name}", "new variable");
    }
    let reference = match &built.reference_build_id {
        Some(id) if *id == built.target_build_id => "equal to the target's".to_string(),
        Some(id) => format!("{id}, not the target's"),
        None => "none found".to_string(),
    };
    println!(
        "  reference build: build-id {reference}{}",
        if built.reference_cached { " (cached)" } else { "" }
    );
    println!("  bindings to the running module ({}):", built.bindings.len());
    for binding in &built.bindings {
        println!(
            "    {:<28} {:#x} size {:<5} {}",
            shadowpatch_build::cxx::demangle(&binding.symbol),
            binding.address,
            binding.size,
            serde_json::to_value(binding.how)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        );
    }
    for note in &built.notes {
        println!("  note: {note}");
    }
    match (&outcome.analysis, &outcome.analysis_error) {
        (Some(report), _) => super::analyze::print_report(report),
        (None, Some(error)) => println!("  static analysis could not run: {error}"),
        (None, None) => {}
    }
    if target.parse::<i32>().is_ok() {
        println!(
            "apply with: shadowpatch apply {target} {}",
            built.manifest_path.display()
        );
    }
}
