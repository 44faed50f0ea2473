//! `shadowpatch-predictor`: the fleet prediction service. `shadowpatch
//! predictor serve ARGS` runs `shadowpatch-predictor --state-dir STATE
//! serve ARGS`. Exit codes: 0 stopped by a signal, 1 failed while
//! running, 2 bad input (options, token file, model, a newer schema).

#![forbid(unsafe_code)]

use clap::Parser;
use shadowpatch_fleet::serve::{serve, ServeOptions};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "shadowpatch-predictor", version, about = "The fleet prediction service")]
struct Cli {
    /// The state directory (the default SQLite database lives here).
    #[arg(
        long,
        global = true,
        env = "SHADOWPATCH_STATE_DIR",
        default_value = "/var/lib/shadowpatch"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Serve verdicts and collect outcomes over HTTP (POST /v1/verdict, POST /v1/outcomes, GET /v1/model, GET /v1/health).
    Serve {
        /// Address and port to listen on, e.g. 127.0.0.1:7878 (port 0: any free port, printed on stdout).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// sqlite:PATH or postgres://USER@HOST/DB (default: sqlite:STATE_DIR/fleet-predictor.db).
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// A file holding the bearer token clients must send (mode 0600); required off loopback.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Start from this model file instead of the built-in one (a promoted model in the database wins).
        #[arg(long, value_name = "FILE")]
        model: Option<PathBuf>,
        /// Retrain from the stored outcomes every SECS.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        retrain_every: u64,
        /// Retrain sooner, after N new labelled outcomes.
        #[arg(long, value_name = "N", default_value_t = 50)]
        retrain_after: u64,
        /// An `applied` outcome counts as benign after SECS with no later outcome.
        #[arg(long, value_name = "SECS", default_value_t = 24 * 3600)]
        benign_after: u64,
        /// The built-in model's training samples (JSON lines of the trainer's samples), trained on with the outcomes.
        #[arg(long, value_name = "FILE")]
        corpus_samples: Option<PathBuf>,
        /// Seconds a request waits for the database before answering 503.
        #[arg(long, value_name = "SECS", default_value_t = 5)]
        database_timeout: u64,
    },
}

fn main() {
    let cli: Cli = shadowpatch_report::parse_args("shadowpatch-predictor");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHADOWPATCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let Command::Serve {
        listen,
        database,
        token_file,
        model,
        retrain_every,
        retrain_after,
        benign_after,
        corpus_samples,
        database_timeout,
    } = cli.command;
    let options = ServeOptions {
        listen,
        database,
        token_file,
        model,
        state_dir: cli.state_dir,
        retrain_every: Duration::from_secs(retrain_every.max(1)),
        retrain_after,
        benign_after: Duration::from_secs(benign_after),
        corpus_samples,
        database_timeout: Duration::from_secs(database_timeout.max(1)),
    };
    if let Err(error) = serve(options) {
        let line = error.to_string().lines().collect::<Vec<_>>().join(" ");
        eprintln!("shadowpatch-predictor: error: {line}");
        std::process::exit(error.exit_code());
    }
}
