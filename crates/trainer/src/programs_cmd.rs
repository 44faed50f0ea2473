//! `shadowpatch-train programs` (make the real-program corpus) and
//! `shadowpatch-train lopo` (leave-one-program-out evaluation), and how
//! each prints its result.

use crate::{print_json, BadInput, Context};
use anyhow::Context as _;
use shadowpatch_trainer::corpus::dataset::Sample;
use shadowpatch_trainer::programs::generate::{generate, GenerateOptions};
use shadowpatch_trainer::programs::mutate::Template;
use shadowpatch_trainer::programs::{
    harm_samples, parse_records, parse_spec, read_spec, ProgramRecord, EMBEDDED_PROGRAMS, EMBEDDED_SAMPLES,
};
use shadowpatch_trainer::training::lopo::{harm_labelled, leave_one_program_out, Lopo, ProgramRow, Refusals};
use shadowpatch_trainer::training::TrainOptions;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, clap::Args)]
pub struct ProgramsArgs {
    /// The programs file (default: the one built into the trainer, crates/trainer/programs/programs.toml).
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// The samples file to extend: variants already in it with the same diff are kept, not run again.
    #[arg(long, value_name = "FILE")]
    samples: PathBuf,
    /// Sources, reference builds, patches and instance folders (never committed).
    #[arg(long, value_name = "DIR")]
    work: PathBuf,
    /// Only this program of the file.
    #[arg(long, value_name = "NAME")]
    only: Option<String>,
    /// Only these templates (comma-separated; default all).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    templates: Vec<String>,
    /// Rounds of the program's requests while patched.
    #[arg(long, default_value_t = 40)]
    rounds: usize,
    /// Analyse the labelled variants already in the samples file again
    /// (their patches kept in --work), e.g. after the engine changed; their
    /// labels are kept.
    #[arg(long)]
    reanalyse: bool,
    /// With --reanalyse: build each kept variant's patch again from its
    /// diff first (same source, same compiler: the same code), e.g. after
    /// `shadowpatch build` learned to write more into the manifest.
    #[arg(long, requires = "reanalyse")]
    rebuild: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LopoArgs {
    /// The real-program samples (default: those built into the trainer).
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
    /// The fixture corpus's analysed samples (`train --samples-out FILE`), which always train.
    #[arg(long, value_name = "FILE")]
    fixture_samples: Option<PathBuf>,
}

fn read_records(path: &Path) -> anyhow::Result<Vec<ProgramRecord>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(parse_records(&text, &path.display().to_string()).map_err(|e| BadInput(e.to_string()))?)
}

fn write_records(path: &Path, records: &BTreeMap<String, ProgramRecord>) -> anyhow::Result<()> {
    let mut text = String::new();
    for record in records.values() {
        text.push_str(&serde_json::to_string(record)?);
        text.push('\n');
    }
    let temporary = path.with_extension("jsonl.tmp");
    std::fs::write(&temporary, text).with_context(|| temporary.display().to_string())?;
    std::fs::rename(&temporary, path).with_context(|| path.display().to_string())?;
    Ok(())
}

pub fn run_programs(context: &Context, args: &ProgramsArgs) -> anyhow::Result<i32> {
    let spec = match &args.spec {
        Some(path) => read_spec(path).map_err(|e| BadInput(e.to_string()))?,
        None => parse_spec(EMBEDDED_PROGRAMS, "(built in)")?,
    };
    if let Some(only) = &args.only {
        if !spec.program.iter().any(|p| &p.name == only) {
            return Err(BadInput(format!("--only {only}: no such program in the programs file")).into());
        }
    }
    let templates = if args.templates.is_empty() {
        Template::ALL.to_vec()
    } else {
        args.templates
            .iter()
            .map(|name| {
                Template::parse(name).ok_or_else(|| BadInput(format!("--templates: unknown template {name:?}")))
            })
            .collect::<Result<_, _>>()?
    };
    let existing = read_records(&args.samples)?;
    let shadowpatch = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("shadowpatch"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("no shadowpatch binary beside shadowpatch-train (cargo build --release)"))?;
    let options = GenerateOptions {
        work: args.work.clone(),
        shadowpatch,
        rounds: args.rounds,
        only: args.only.clone(),
        templates,
        reanalyse: args.reanalyse,
        rebuild: args.rebuild,
    };
    let mut records: BTreeMap<String, ProgramRecord> = existing.iter().map(|r| (r.id.clone(), r.clone())).collect();
    let mut made = Vec::new();
    generate(
        &spec,
        &options,
        &existing,
        &mut |record| {
            eprintln!(
                "  {:<60} {:<13} {}",
                record.id,
                record.outcome,
                record.verdict.as_deref().unwrap_or("-")
            );
            records.insert(record.id.clone(), record.clone());
            made.push(record.clone());
            write_records(&args.samples, &records).map_err(|e| shadowpatch_trainer::programs::ProgramsError::Io {
                path: args.samples.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })
        },
        &|step| {
            if !context.json {
                eprintln!("{step}");
            }
        },
    )?;
    if context.json {
        print_json(&made);
        return Ok(0);
    }
    let mut table: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for record in &made {
        *table
            .entry((record.program.as_str(), record.outcome.as_str()))
            .or_default() += 1;
    }
    println!("{} variants written to {}", made.len(), args.samples.display());
    for ((program, outcome), count) in table {
        println!("  {program:<12} {outcome:<14} {count}");
    }
    Ok(0)
}

pub fn run_lopo(context: &Context, args: &LopoArgs) -> anyhow::Result<i32> {
    let records = match &args.samples {
        Some(path) => {
            if !path.exists() {
                return Err(BadInput(format!("samples file {}: no such file", path.display())).into());
            }
            read_records(path)?
        }
        None => parse_records(EMBEDDED_SAMPLES, "(built in)")?,
    };
    let real = harm_samples(&records);
    if real.is_empty() {
        return Err(BadInput("no labelled real-program samples (run shadowpatch-train programs)".into()).into());
    }
    let fixture = match &args.fixture_samples {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
            let samples: Vec<Sample> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(n, l)| {
                    serde_json::from_str(l).map_err(|e| BadInput(format!("{}, line {}: {e}", path.display(), n + 1)))
                })
                .collect::<Result<_, _>>()?;
            harm_labelled(&samples, "fixture")
        }
        None => Vec::new(),
    };
    let lopo = leave_one_program_out(&real, &fixture, &TrainOptions::default())?;
    let recorded = recorded_verdicts(&records);
    if context.json {
        let recorded: Vec<serde_json::Value> = recorded
            .iter()
            .map(|((program, class), counts)| {
                serde_json::json!({ "program": program, "class": class, "verdicts": counts })
            })
            .collect();
        print_json(&serde_json::json!({ "lopo": lopo, "recorded_verdicts": recorded }));
        return Ok(0);
    }
    print_lopo(&lopo, real.len(), fixture.len());
    println!();
    println!("the engine's own verdicts when the samples were made (its embedded model, all its rules):");
    println!("| program | class | proceed | warn | refuse |");
    println!("|---|---|---|---|---|");
    for ((program, class), counts) in &recorded {
        println!(
            "| {program} | {class} | {} | {} | {} |",
            counts.get("proceed").unwrap_or(&0),
            counts.get("warn").unwrap_or(&0),
            counts.get("refuse").unwrap_or(&0)
        );
    }
    Ok(0)
}

/// The verdicts recorded with each labelled sample, counted per program
/// and class (harm, change, same).
type VerdictCounts = BTreeMap<(String, String), BTreeMap<String, usize>>;

fn recorded_verdicts(records: &[ProgramRecord]) -> VerdictCounts {
    let mut counts = VerdictCounts::new();
    for record in records {
        let (Some(harm), Some(verdict)) = (record.harm(), &record.verdict) else {
            continue;
        };
        let class = match (harm, record.outcome.as_str()) {
            (true, _) => "harm",
            (false, "wrong") => "change",
            _ => "same",
        };
        *counts
            .entry((record.program.clone(), class.to_string()))
            .or_default()
            .entry(verdict.clone())
            .or_default() += 1;
    }
    counts
}

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        "–".into()
    } else {
        format!("{part}/{whole} = {:.1} %", 100.0 * part as f64 / whole as f64)
    }
}

fn print_lopo(lopo: &Lopo, real: usize, fixture: usize) {
    println!(
        "leave-one-program-out: {real} real-program samples, {fixture} fixture samples always in training; refuse at risk ≥ {:.2} or a blocking finding",
        lopo.refuse_at
    );
    println!("| held out | samples (harm/change/same) | AUC | harm refused | crash+hang refused | false refusals (same) | changes refused | model |");
    println!("|---|---|---|---|---|---|---|---|");
    for row in &lopo.rows {
        println!(
            "| {} | {} ({}/{}/{}) | {} | {} | {} |",
            row.program,
            row.samples,
            row.harm,
            row.change,
            row.same,
            row.auc.map_or("–".into(), |a| format!("{a:.3}")),
            refusal_cells(row, &row.model),
            row.chosen
        );
    }
    println!(
        "pooled AUC {}",
        lopo.pooled_auc.map_or("–".into(), |a| format!("{a:.3}"))
    );
    println!();
    println!("by the engine's whole verdict rule (the held-out model's risk with each sample's findings and simulation evidence):");
    println!("| held out | harm refused | crash+hang refused | false refusals (same) | changes refused |");
    println!("|---|---|---|---|---|");
    for row in &lopo.rows {
        println!("| {} | {} |", row.program, refusal_cells(row, &row.verdict));
    }
    println!();
    println!("| risk | samples | mean risk | harm fraction |");
    println!("|---|---|---|---|");
    for bin in &lopo.calibration {
        println!(
            "| {:.1}–{:.1} | {} | {:.2} | {:.2} |",
            bin.from, bin.to, bin.count, bin.mean_risk, bin.harmful_fraction
        );
    }
    for row in &lopo.rows {
        for (by, refusals) in [("", &row.model), (" by the verdict", &row.verdict)] {
            for line in &refusals.missed {
                println!("missed harm{by}   {line}");
            }
            for line in &refusals.falsely_refused {
                println!("false refusal{by} {line}");
            }
        }
    }
}

/// A rule's four refusal cells of a row: harm, crash+hang, same, change.
fn refusal_cells(row: &ProgramRow, refusals: &Refusals) -> String {
    [
        percent(refusals.refused_harm, row.harm),
        percent(refusals.crash_or_hang_refused, row.crash_or_hang),
        percent(refusals.refused_same, row.same),
        percent(refusals.refused_change, row.change),
    ]
    .join(" | ")
}
