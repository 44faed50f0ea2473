//! The subcommands of `shadowpatch-train`: label the corpus, train,
//! evaluate and show a model, and how each prints its result.

use crate::progress::Progress;
use crate::{print_json, BadInput, Context};
use anyhow::Context as _;
use shadowpatch_predict::model::{ModelFile, EMBEDDED_MODEL};
use shadowpatch_trainer::corpus::dataset::{extract, section_names, Sample};
use shadowpatch_trainer::corpus::history::read_history;
use shadowpatch_trainer::corpus::label::{
    label_all, parse_labels, read_labels, write_labels, LabelOptions, LabelRecord,
};
use shadowpatch_trainer::corpus::template::Templates;
use shadowpatch_trainer::corpus::variants::{generate, limit, Variant};
use shadowpatch_trainer::corpus::{corpus_hash, VariantKind, EMBEDDED_LABELS};
use shadowpatch_trainer::training::{evaluate, split_by_groups, train, Evaluation, TrainOptions, DEFAULT_SEED};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The subcommands (`shadowpatch predictor ...` before the trainer had a binary of its own).
#[derive(Debug, clap::Subcommand)]
pub enum PredictorCommand {
    /// Generate the corpus's patch variants and label each by running it on a live corpus target.
    Corpus {
        #[command(flatten)]
        corpus: CorpusArgs,
        /// Corpus targets labelling in parallel.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Run every variant again, even those the labels file already has, and report changed labels.
        #[arg(long)]
        relabel: bool,
        /// Worker threads of each corpus target.
        #[arg(long, default_value_t = 1)]
        threads: u32,
    },
    /// Analyse the labelled corpus, choose and fit the model, calibrate, evaluate, write the model file.
    Train {
        #[command(flatten)]
        corpus: CorpusArgs,
        /// Where to write the model (default: STATE/risk-model.json, which analyze and apply then use).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Leave out the samples from the local event history.
        #[arg(long)]
        no_history: bool,
        /// How long an applied patch must stay to count as benign in the history (e.g. 24h).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        benign_after: String,
        /// Also write the corpus's analysed samples here, one JSON line each (the fleet
        /// predictor's `--corpus-samples` trains on them with the fleet's outcomes).
        #[arg(long, value_name = "FILE")]
        samples_out: Option<PathBuf>,
    },
    /// Evaluate a model (default: the one analyze uses) on its held-out split.
    Evaluate {
        #[command(flatten)]
        corpus: CorpusArgs,
        /// The model file (default: STATE/risk-model.json if present, else the built-in model).
        #[arg(long, value_name = "FILE")]
        model: Option<PathBuf>,
    },
    /// Make, build, label and analyse the real-program corpus: Debian programs as installed,
    /// patched from their own Debian source (`shadowpatch build --debian`), labelled on live instances.
    Programs {
        #[command(flatten)]
        args: crate::programs_cmd::ProgramsArgs,
    },
    /// Leave-one-program-out evaluation on the real-program samples (and the fixture corpus's).
    Lopo {
        #[command(flatten)]
        args: crate::programs_cmd::LopoArgs,
    },
    /// Show a model's metadata: estimator, features, calibration, training corpus and evaluation.
    Show {
        /// The model file (default: STATE/risk-model.json if present, else the built-in model).
        #[arg(long, value_name = "FILE")]
        model: Option<PathBuf>,
    },
}

/// Where the corpus is.
#[derive(Debug, Clone, clap::Args)]
pub struct CorpusArgs {
    /// The labels file (JSON lines). Default: STATE/corpus/labels.jsonl if present, else the labels built into the trainer.
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Where variants are compiled (never committed). Default: a folder under the fixture cache.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Only this many variants (a seeded pick across functions and kinds).
    #[arg(long)]
    limit: Option<usize>,
    /// Seed of the variant choices, the split and the cross-validation.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
}

impl CorpusArgs {
    fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| shadowpatch_fixtures::cache_dir().join("corpus"))
    }

    fn variants(&self) -> Vec<Variant> {
        limit(generate(&Templates::corpus_target(), self.seed), self.limit, self.seed)
    }

    /// The labels to train on and where they came from.
    fn read(&self, context: &Context) -> anyhow::Result<(Vec<LabelRecord>, String)> {
        let path = match &self.labels {
            Some(path) => Some(path.clone()),
            None => Some(default_labels(context)).filter(|p| p.exists()),
        };
        match path {
            Some(path) => {
                if !path.exists() {
                    return Err(BadInput(format!("labels file {}: no such file", path.display())).into());
                }
                let records = read_labels(&path).map_err(|e| BadInput(e.to_string()))?;
                Ok((records, path.display().to_string()))
            }
            None => Ok((
                parse_labels(EMBEDDED_LABELS, Path::new("(built in)")).map_err(|e| BadInput(e.to_string()))?,
                "(built in)".to_string(),
            )),
        }
    }
}

fn default_labels(context: &Context) -> PathBuf {
    context.state_dir.join("corpus").join("labels.jsonl")
}

fn default_model(context: &Context) -> PathBuf {
    context.state_dir.join("risk-model.json")
}

/// The model `analyze` and `apply` use: `explicit`, else the state
/// directory's trained model, else none (the built-in one). A file that
/// cannot be used is bad input.
fn model_path(context: &Context, explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| Some(default_model(context)).filter(|p| p.exists()))
}

fn read_model(context: &Context, explicit: Option<&Path>) -> anyhow::Result<(ModelFile, String)> {
    match model_path(context, explicit) {
        Some(path) => {
            let model = ModelFile::read(&path).map_err(|e| BadInput(e.to_string()))?;
            Ok((model, path.display().to_string()))
        }
        None => Ok((
            ModelFile::parse(EMBEDDED_MODEL, "(built in)").map_err(|e| BadInput(e.to_string()))?,
            "(built in)".to_string(),
        )),
    }
}

pub fn run(context: &Context, command: &PredictorCommand) -> anyhow::Result<i32> {
    match command {
        PredictorCommand::Corpus {
            corpus,
            jobs,
            relabel,
            threads,
        } => run_corpus(context, corpus, *jobs, *relabel, *threads),
        PredictorCommand::Train {
            corpus,
            output,
            no_history,
            benign_after,
            samples_out,
        } => run_train(
            context,
            corpus,
            output.as_deref(),
            *no_history,
            benign_after,
            samples_out.as_deref(),
        ),
        PredictorCommand::Evaluate { corpus, model } => run_evaluate(context, corpus, model.as_deref()),
        PredictorCommand::Show { model } => run_show(context, model.as_deref()),
        PredictorCommand::Programs { args } => crate::programs_cmd::run_programs(context, args),
        PredictorCommand::Lopo { args } => crate::programs_cmd::run_lopo(context, args),
    }
}

fn progress_enabled(context: &Context) -> bool {
    !context.json && std::io::stderr().is_terminal()
}

fn run_corpus(context: &Context, args: &CorpusArgs, jobs: usize, relabel: bool, threads: u32) -> anyhow::Result<i32> {
    if jobs == 0 || threads == 0 {
        return Err(BadInput("--jobs and --threads must be at least 1".into()).into());
    }
    let path = args.labels.clone().unwrap_or_else(|| default_labels(context));
    let mut existing = read_labels(&path).map_err(|e| BadInput(e.to_string()))?;
    if existing.is_empty() && args.labels.is_none() {
        // Start from the labels shipped with shadowpatch: only what changed runs.
        existing = parse_labels(EMBEDDED_LABELS, Path::new("(built in)")).map_err(|e| BadInput(e.to_string()))?;
    }
    let variants = args.variants();
    let cache_dir = args.cache_dir();
    let progress = Mutex::new(Progress::count("labelling", progress_enabled(context)));
    let options = LabelOptions {
        threads,
        ..LabelOptions::default()
    };
    let run = label_all(
        &variants,
        &existing,
        &cache_dir,
        jobs,
        relabel,
        &options,
        &|done, total, record| {
            let mut bar = progress.lock().expect("progress");
            bar.note(&format!("{} {}", record.id, record.outcome.as_str()));
            bar.update(done as u64, total as u64);
        },
    )
    .context("labelling the corpus")?;
    progress.into_inner().expect("progress").finish();
    write_labels(&path, &run.records)?;
    let composition = composition(&run.records);
    if context.json {
        print_json(&serde_json::json!({
            "labels": path,
            "variants": variants.len(),
            "labelled": run.labelled,
            "reused": run.reused,
            "targets_started": run.targets_started,
            "composition": composition,
            "differences": run.differences,
        }));
    } else {
        println!(
            "corpus: {} variants, {} labelled now, {} reused from the labels file, {} corpus targets started",
            variants.len(),
            run.labelled,
            run.reused,
            run.targets_started
        );
        print_composition(&run.records);
        if !run.differences.is_empty() {
            println!("{} labels differ from the labels file:", run.differences.len());
            for d in &run.differences {
                println!(
                    "  {}: was {} ({}), now {} ({})",
                    d.id,
                    d.before.as_str(),
                    d.before_reason,
                    d.now.as_str(),
                    d.now_reason
                );
            }
        }
        println!("labels written to {}", path.display());
    }
    Ok(if run.differences.is_empty() { 0 } else { 1 })
}

/// Counts per variant kind and outcome.
fn composition(records: &[LabelRecord]) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut table: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for record in records {
        *table
            .entry(record.kind.as_str().to_string())
            .or_default()
            .entry(record.outcome.as_str().to_string())
            .or_default() += 1;
    }
    table
}

fn print_composition(records: &[LabelRecord]) {
    let outcomes = ["ok", "crash", "hang", "wrong", "leak", "not-applied"];
    println!(
        "  {:<20} {:>6} {:>7} {:>7} {:>6} {:>6} {:>6} {:>12}",
        "kind", "total", "benign", "crash", "hang", "wrong", "leak", "not-applied"
    );
    let table = composition(records);
    for kind in VariantKind::ALL {
        let row = table.get(kind.as_str()).cloned().unwrap_or_default();
        let total: usize = row.values().sum();
        let cell = |outcome: &str| row.get(outcome).copied().unwrap_or(0);
        println!(
            "  {:<20} {:>6} {:>7} {:>7} {:>6} {:>6} {:>6} {:>12}",
            kind.as_str(),
            total,
            cell(outcomes[0]),
            cell(outcomes[1]),
            cell(outcomes[2]),
            cell(outcomes[3]),
            cell(outcomes[4]),
            cell(outcomes[5])
        );
    }
}

/// The corpus's samples: every labelled variant analysed on a live target.
fn samples(context: &Context, args: &CorpusArgs, records: &[LabelRecord]) -> anyhow::Result<Vec<Sample>> {
    let variants = args.variants();
    let wanted: std::collections::BTreeSet<&str> = variants.iter().map(|v| v.id.as_str()).collect();
    let records: Vec<LabelRecord> = records
        .iter()
        .filter(|r| wanted.contains(r.id.as_str()))
        .cloned()
        .collect();
    let progress = Mutex::new(Progress::count("analysing", progress_enabled(context)));
    let samples = extract(&records, &variants, &args.cache_dir(), &|done, total| {
        progress.lock().expect("progress").update(done as u64, total as u64);
    })
    .context("analysing the corpus")?;
    progress.into_inner().expect("progress").finish();
    Ok(samples)
}

fn run_train(
    context: &Context,
    args: &CorpusArgs,
    output: Option<&Path>,
    no_history: bool,
    benign_after: &str,
    samples_out: Option<&Path>,
) -> anyhow::Result<i32> {
    let benign_after_ms = humantime::parse_duration(benign_after)
        .map_err(|e| BadInput(format!("--benign-after {benign_after}: {e}")))?
        .as_millis() as u64;
    let (records, labels_origin) = args.read(context)?;
    let corpus = samples(context, args, &records)?;
    if let Some(path) = samples_out {
        let lines: String = corpus
            .iter()
            .map(|sample| serde_json::to_string(sample).expect("a sample serializes") + "\n")
            .collect();
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    let history = if no_history {
        Vec::new()
    } else {
        read_history(&context.state_dir, shadowpatch_store::now_ms(), benign_after_ms)
            .context("reading the event history")?
    };
    let used: Vec<LabelRecord> = records
        .iter()
        .filter(|r| corpus.iter().any(|s| s.id == r.id))
        .cloned()
        .collect();
    let options = TrainOptions {
        seed: args.seed,
        ..TrainOptions::default()
    };
    let trained = train(&corpus, &history, &corpus_hash(&used), section_names(), &options)
        .map_err(|e| BadInput(format!("training: {e}")))?;
    let output = output.map(Path::to_path_buf).unwrap_or_else(|| default_model(context));
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let text = trained.model.to_json() + "\n";
    std::fs::write(&output, &text).with_context(|| format!("writing {}", output.display()))?;
    if context.json {
        print_json(&serde_json::json!({
            "model": output,
            "bytes": text.len(),
            "labels": labels_origin,
            "corpus_hash": trained.model.training.corpus_hash,
            "samples": trained.model.training.samples,
            "test_functions": trained.model.training.test_functions,
            "features": trained.model.features,
            "selection": trained.model.training.selection,
            "chosen_because": trained.model.training.chosen_because,
            "calibration": trained.model.calibration,
            "composition": composition(&records),
            "evaluation": trained.evaluation,
        }));
        return Ok(0);
    }
    println!("labels: {labels_origin}");
    print_composition(&records);
    println!(
        "samples: {} train ({} from the event history), {} test; test functions: {}",
        trained.split.train.len(),
        history.len(),
        trained.split.test.len(),
        trained.split.test_groups.join(", ")
    );
    println!(
        "model selection (cross-validated AUC on the training split, folds grouped by function; Brier after Platt):"
    );
    for candidate in &trained.model.training.selection {
        println!(
            "  {:<48} AUC {:.3}  Brier {:.3}",
            candidate.name, candidate.cv_auc, candidate.cv_brier
        );
    }
    println!("chosen: {}", trained.model.training.chosen_because);
    println!(
        "{} features; calibration: Platt, p = 1 / (1 + exp(-({:.4} * score + {:.4})))",
        trained.model.features.len(),
        trained.model.calibration.a,
        trained.model.calibration.b
    );
    print_evaluation(&trained.evaluation);
    println!("model written to {} ({} bytes)", output.display(), text.len());
    Ok(0)
}

fn run_evaluate(context: &Context, args: &CorpusArgs, model: Option<&Path>) -> anyhow::Result<i32> {
    let (model, origin) = read_model(context, model)?;
    if model.training.test_functions.is_empty() {
        return Err(BadInput(format!(
            "risk model {origin}: records no held-out functions to evaluate on"
        ))
        .into());
    }
    let (records, labels_origin) = args.read(context)?;
    let corpus = samples(context, args, &records)?;
    let split = split_by_groups(&corpus, &[], &model.training.test_functions);
    let options = TrainOptions {
        seed: args.seed,
        ..TrainOptions::default()
    };
    let evaluation =
        evaluate(&model, &split.train, &split.test, &options).map_err(|e| BadInput(format!("evaluating: {e}")))?;
    if context.json {
        print_json(&serde_json::json!({
            "model": origin,
            "labels": labels_origin,
            "test_functions": model.training.test_functions,
            "evaluation": evaluation,
        }));
        return Ok(0);
    }
    println!("model: {origin}: {}", model.describe());
    println!(
        "labels: {labels_origin}; test functions: {}",
        model.training.test_functions.join(", ")
    );
    print_evaluation(&evaluation);
    Ok(0)
}

fn run_show(context: &Context, model: Option<&Path>) -> anyhow::Result<i32> {
    let (model, origin) = read_model(context, model)?;
    if context.json {
        let mut value = serde_json::to_value(&model)?;
        value["origin"] = origin.into();
        // The parameters are in the file; show says what the model is.
        if let Some(estimator) = value.get_mut("estimator") {
            if estimator["kind"] == "random_forest" {
                estimator["forest"] = serde_json::Value::String("(omitted)".into());
            }
        }
        print_json(&value);
        return Ok(0);
    }
    println!("model: {origin}");
    println!("  {}", model.describe());
    println!("  format version {}", model.format_version);
    println!(
        "  calibration: Platt, p = 1 / (1 + exp(-({:.4} * score + {:.4})))",
        model.calibration.a, model.calibration.b
    );
    let t = &model.training;
    println!(
        "  corpus hash {}, seed {}, compiler {}",
        t.corpus_hash, t.seed, t.compiler
    );
    println!(
        "  samples: {}",
        t.samples
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  test functions: {}", t.test_functions.join(", "));
    println!("  engine sections: {}", t.sections.join(", "));
    println!("  chosen: {}", t.chosen_because);
    println!("  features: {}", model.features.join(" "));
    if let Ok(evaluation) = serde_json::from_value::<Evaluation>(t.evaluation.clone()) {
        print_evaluation(&evaluation);
    }
    Ok(0)
}

fn percent(value: Option<f64>) -> String {
    value
        .map(|v| format!("{:.1} %", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn print_evaluation(evaluation: &Evaluation) {
    println!(
        "held-out test split: {} samples ({} benign, {} harmful), refuse at risk {:.2} or a blocking finding:",
        evaluation.test_samples, evaluation.test_benign, evaluation.test_harmful, evaluation.refuse_at
    );
    println!(
        "  {:<28} {:>7} {:>10} {:>8} {:>16} {:>7}",
        "system", "AUC", "precision", "recall", "false refusals", "Brier"
    );
    for system in &evaluation.systems {
        println!(
            "  {:<28} {:>7} {:>10} {:>8} {:>16} {:>7.3}",
            system.name,
            system.auc.map(|a| format!("{a:.3}")).unwrap_or_else(|| "-".into()),
            percent(system.precision),
            percent(system.recall),
            format!(
                "{}/{} {}",
                system.refused_benign,
                system.benign,
                percent(system.false_refusal_rate)
            ),
            system.brier
        );
    }
    println!("  calibration of the full engine's risk on the test split:");
    for bin in &evaluation.calibration {
        if bin.count > 0 {
            println!(
                "    risk {:.1}-{:.1}: {:>3} samples, mean risk {:.2}, harmful {:.2}",
                bin.from, bin.to, bin.count, bin.mean_risk, bin.harmful_fraction
            );
        }
    }
    if evaluation.simulation.available {
        println!(
            "  harmful patches that crashed or hung in simulation: {} of {} refused",
            evaluation.simulation.refused, evaluation.simulation.crashed_or_hung
        );
    } else {
        println!(
            "  harmful patches that crashed or hung in simulation refused: not available (no simulation features)"
        );
    }
    println!("  by kind (test split): kind, samples, harmful, refused by the full engine");
    for row in &evaluation.by_kind {
        println!(
            "    {:<20} {:>4} {:>4} {:>4}",
            row.kind, row.samples, row.harmful, row.refused
        );
    }
}
