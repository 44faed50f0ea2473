//! `shadowpatch-train`: the learned risk model's corpus (generate and
//! label patch variants on live corpus targets), training (features,
//! selection, calibration, evaluation, the model file), evaluation of a
//! model on the held-out split, and its metadata. A binary of its own so
//! that the shipped `shadowpatch` links neither the corpus (test fixtures,
//! gcc at run time) nor the fitting; `shadowpatch predictor ARGS` runs it.
//! Exit codes as `shadowpatch`'s: 0 success, 1 `corpus` found labels that
//! changed, 2 bad input, 3 failure.

#![forbid(unsafe_code)]

mod commands;
mod programs_cmd;
mod progress;

use clap::Parser;
use commands::PredictorCommand;
use std::path::PathBuf;

/// Exit code for input the user can fix.
const BAD_INPUT: i32 = 2;
/// Exit code for a step that failed.
const FAILED: i32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "shadowpatch-train",
    version,
    about = "Build the risk model's corpus, train, evaluate and show shadowpatch's risk model"
)]
struct Cli {
    /// Where the corpus labels, the trained model and the event history are kept.
    #[arg(
        long,
        global = true,
        env = "SHADOWPATCH_STATE_DIR",
        default_value = "/var/lib/shadowpatch"
    )]
    state_dir: PathBuf,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: PredictorCommand,
}

/// Options every subcommand receives.
#[derive(Debug, Clone)]
struct Context {
    state_dir: PathBuf,
    json: bool,
}

/// Marks an error as caused by the user's input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

fn exit_code(error: &anyhow::Error) -> i32 {
    for cause in error.chain() {
        if cause.downcast_ref::<BadInput>().is_some() {
            return BAD_INPUT;
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_trainer::corpus::CorpusError>() {
            if e.is_bad_input() {
                return BAD_INPUT;
            }
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_trainer::programs::ProgramsError>() {
            if e.is_bad_input() {
                return BAD_INPUT;
            }
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_predict::PredictError>() {
            return if e.is_bad_input() { BAD_INPUT } else { FAILED };
        }
    }
    FAILED
}

/// The error and its causes on one line.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}

fn main() {
    let cli: Cli = shadowpatch_report::parse_args("shadowpatch-train");
    let context = Context {
        state_dir: cli.state_dir,
        json: cli.json,
    };
    match commands::run(&context, &cli.command) {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            let code = exit_code(&error);
            let message = one_line(&error);
            if context.json {
                println!("{}", serde_json::json!({ "error": message, "exit_code": code }));
            }
            eprintln!("shadowpatch-train: error: {message}");
            std::process::exit(code);
        }
    }
}
