//! `serve`: check the options (address, token file, database URL, model,
//! corpus samples) before anything starts, open and migrate the database,
//! load the model the database last promoted (else `--model`, else the
//! built-in one), bind, announce the address on stdout, and serve until
//! SIGINT or SIGTERM.

use crate::server::{retrain_loop, router, AppState, CurrentModel, RetrainOptions};
use crate::storage::{redact, Storage, StorageError};
use shadowpatch_predict::model::{ModelFile, ModelRisk};
use shadowpatch_predict::remote::ModelVersion;
use shadowpatch_trainer::corpus::dataset::Sample;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The file name of the default database under the state directory.
pub const DEFAULT_DATABASE: &str = "fleet-predictor.db";

/// What `serve` was asked.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: String,
    /// `sqlite:PATH` or `postgres://...`; `None`: SQLite under `state_dir`.
    pub database: Option<String>,
    pub token_file: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub retrain_every: Duration,
    pub retrain_after: u64,
    pub benign_after: Duration,
    pub corpus_samples: Option<PathBuf>,
    /// How long a request waits for the database before a 503.
    pub database_timeout: Duration,
}

/// Why `serve` stopped or never started.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The user's to fix (exit 2).
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Storage(StorageError),
    #[error("{0}")]
    Failed(String),
}

impl ServeError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::BadInput(_) | ServeError::Storage(StorageError::NewerSchema { .. }) => 2,
            _ => 1,
        }
    }
}

fn bad(message: String) -> ServeError {
    ServeError::BadInput(message)
}

/// `listen` resolved; every address must be loopback unless a token guards it.
fn listen_address(listen: &str, has_token: bool) -> Result<SocketAddr, ServeError> {
    let addresses: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| bad(format!("--listen {listen}: not an address and port ({e})")))?
        .collect();
    let Some(first) = addresses.first().copied() else {
        return Err(bad(format!("--listen {listen}: resolves to no address")));
    };
    if !has_token && !addresses.iter().all(|a| a.ip().is_loopback()) {
        return Err(bad(format!(
            "--listen {listen}: not a loopback address, so --token-file FILE is required (a bearer token, \
             mode 0600)"
        )));
    }
    Ok(first)
}

/// The bearer token in `path`: one line, the file not readable by group
/// or others.
fn read_token(path: &Path) -> Result<String, ServeError> {
    let metadata = std::fs::metadata(path).map_err(|e| bad(format!("--token-file {}: {e}", path.display())))?;
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "--token-file {}: mode {:04o} lets group or others read it; chmod 600 it",
            path.display(),
            mode & 0o7777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("--token-file {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(bad(format!(
            "--token-file {}: must hold one token (no spaces), and holds {}",
            path.display(),
            if token.is_empty() { "nothing" } else { "several words" }
        )));
    }
    Ok(token.to_string())
}

/// The database URL: given, or SQLite under the state directory.
pub fn database_url(database: Option<&str>, state_dir: &Path) -> Result<String, ServeError> {
    match database {
        Some(url)
            if url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://") =>
        {
            Ok(url.to_string())
        }
        Some(url) => Err(bad(format!(
            "--database {}: use sqlite:PATH or postgres://USER@HOST/DB",
            redact(url)
        ))),
        None => {
            std::fs::create_dir_all(state_dir)
                .map_err(|e| bad(format!("state directory {}: {e}", state_dir.display())))?;
            Ok(format!("sqlite:{}", state_dir.join(DEFAULT_DATABASE).display()))
        }
    }
}

/// Trainer samples, one JSON object a line (or one JSON array).
fn read_samples(path: &Path) -> Result<Vec<Sample>, ServeError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("--corpus-samples {}: {e}", path.display())))?;
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text).map_err(|e| bad(format!("--corpus-samples {}: {e}", path.display())));
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line)
                .map_err(|e| bad(format!("--corpus-samples {}:{}: {e}", path.display(), index + 1)))
        })
        .collect()
}

fn built_in_version() -> ModelVersion {
    ModelVersion {
        version: 0,
        name: "built-in".into(),
        trained_on: 0,
        held_out_auc: None,
    }
}

/// Check everything, then serve until a signal.
pub fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let token = options.token_file.as_deref().map(read_token).transpose()?;
    let address = listen_address(&options.listen, token.is_some())?;
    let url = database_url(options.database.as_deref(), &options.state_dir)?;
    let start_model = match &options.model {
        Some(path) => {
            let risk = ModelRisk::load(path).map_err(|e| bad(e.to_string()))?;
            let name = format!("file:{}", path.display());
            CurrentModel {
                risk,
                version: ModelVersion {
                    name,
                    ..built_in_version()
                },
            }
        }
        None => CurrentModel {
            risk: ModelRisk::embedded().map_err(ServeError::Failed)?,
            version: built_in_version(),
        },
    };
    let corpus = match &options.corpus_samples {
        Some(path) => read_samples(path)?,
        None => Vec::new(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError::Failed(format!("starting the runtime: {e}")))?;
    runtime.block_on(async move {
        let storage = Storage::open(&url, options.database_timeout)
            .await
            .map_err(ServeError::Storage)?;
        let current = match storage.latest_model().await.map_err(ServeError::Storage)? {
            Some(stored) => {
                let origin = format!("fleet database ({})", stored.version.name);
                let model = ModelFile::parse(&stored.model_json, &origin).map_err(|e| bad(e.to_string()))?;
                if options.model.is_some() {
                    tracing::info!(model = %stored.version.name, "the database's promoted model replaces --model");
                }
                CurrentModel {
                    risk: ModelRisk {
                        model: Arc::new(model),
                        origin,
                    },
                    version: stored.version,
                }
            }
            None => start_model,
        };
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| ServeError::Failed(format!("--listen {}: {e}", options.listen)))?;
        let bound = listener
            .local_addr()
            .map_err(|e| ServeError::Failed(format!("--listen {}: {e}", options.listen)))?;
        tracing::info!(
            address = %bound,
            database = %redact(&url),
            model = %current.version.name,
            token = token.is_some(),
            "serving"
        );
        let state = Arc::new(AppState::new(storage, current, token, options.retrain_after));
        let retraining = tokio::spawn(retrain_loop(
            state.clone(),
            RetrainOptions {
                every: options.retrain_every,
                benign_after: options.benign_after,
                corpus: Arc::new(corpus),
            },
        ));
        // The one line a supervisor (or a test) waits for.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on http://{bound}");
        let _ = stdout.flush();
        drop(stdout);
        let served = axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await;
        retraining.abort();
        served.map_err(|e| ServeError::Failed(format!("serving: {e}")))
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}
