//! The HTTP service (axum): the four endpoints of
//! `shadowpatch_predict::remote`, the bearer-token check, the request
//! size limit, errors as a status and a one-line JSON `ErrorBody`, and
//! the retraining task that promotes better models while it serves.

use crate::retrain::{label, retrain, Retrained};
use crate::storage::{Storage, StorageError, StoredModel};
use crate::verdict::decide;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use shadowpatch_predict::remote::{ErrorBody, ModelVersion, Outcome, OutcomeAck, VerdictRequest, MAX_REQUEST_BYTES};
use shadowpatch_predict::ModelRisk;
use shadowpatch_trainer::corpus::dataset::Sample;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Beyond the limit, a body is still read (and dropped) up to this size so
/// the client gets its 413 instead of a reset connection; past it, the
/// connection is closed.
const DRAIN_LIMIT: usize = 8 * MAX_REQUEST_BYTES;

/// The model deciding now.
#[derive(Debug, Clone)]
pub struct CurrentModel {
    pub risk: ModelRisk,
    pub version: ModelVersion,
}

/// How the service retrains.
#[derive(Debug, Clone)]
pub struct RetrainOptions {
    pub every: Duration,
    /// How long an `applied` outcome must stand to count as benign.
    pub benign_after: Duration,
    /// The built-in model's training samples, when the operator has them.
    pub corpus: Arc<Vec<Sample>>,
}

/// What every request handler shares.
#[derive(Debug)]
pub struct AppState {
    storage: Storage,
    model: RwLock<Arc<CurrentModel>>,
    /// BLAKE3 of the bearer token (its comparison is constant-time).
    token: Option<blake3::Hash>,
    new_outcomes: AtomicU64,
    retrain_after: u64,
    retrain_now: Notify,
}

impl AppState {
    pub fn new(storage: Storage, model: CurrentModel, token: Option<String>, retrain_after: u64) -> AppState {
        AppState {
            storage,
            model: RwLock::new(Arc::new(model)),
            token: token.map(|t| blake3::hash(t.as_bytes())),
            new_outcomes: AtomicU64::new(0),
            retrain_after: retrain_after.max(1),
            retrain_now: Notify::new(),
        }
    }

    fn current(&self) -> Arc<CurrentModel> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An error answer: a status and one line.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        let message: String = message.into();
        ApiError {
            status,
            message: message.lines().collect::<Vec<_>>().join(" "),
        }
    }

    fn storage(error: StorageError) -> ApiError {
        tracing::error!(%error, "storage failed; answering 503");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("storage unavailable: {error}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.message })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The router with its state.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/verdict", post(verdict))
        .route("/v1/outcomes", post(outcomes))
        .route("/v1/model", get(model))
        .route("/v1/health", get(health))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint (see /v1/health)") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed") })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| blake3::hash(t.trim().as_bytes()));
        if given.as_ref() != Some(expected) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
        }
    }
    next.run(request).await
}

/// The body, at most [`MAX_REQUEST_BYTES`] (413 beyond).
async fn read_body(headers: &HeaderMap, mut body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_REQUEST_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(too_large());
    }
    let mut data = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        if let Ok(chunk) = frame.into_data() {
            total += chunk.len();
            if total > DRAIN_LIMIT {
                break;
            }
            if total <= MAX_REQUEST_BYTES {
                data.extend_from_slice(&chunk);
            }
        }
    }
    if total > MAX_REQUEST_BYTES {
        return Err(too_large());
    }
    Ok(Bytes::from(data))
}

fn parse<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed {what}: {e}")))
}

fn require(value: &str, field: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{field} is empty")));
    }
    Ok(())
}

async fn verdict(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&headers, body).await?;
    let request: VerdictRequest = parse(&bytes, "verdict request")?;
    require(&request.host, "host")?;
    require(&request.patch_id, "patch_id")?;
    let build_id = request.build_id.clone().unwrap_or_default();
    let history = state
        .storage
        .fleet_history(&request.patch_id, &build_id)
        .await
        .map_err(ApiError::storage)?;
    let current = state.current();
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let analysis_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let response = decide(analysis_id, &request, &current.risk, &current.version, &history);
    let verdict_name = serde_json::to_value(response.verdict)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    state
        .storage
        .insert_verdict(
            &response.analysis_id,
            now_ms(),
            &request,
            response.risk,
            &verdict_name,
            current.version.version,
        )
        .await
        .map_err(ApiError::storage)?;
    tracing::debug!(host = %request.host, patch = %request.patch_id, verdict = %verdict_name, "verdict");
    Ok(Json(response).into_response())
}

async fn outcomes(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&headers, body).await?;
    // One outcome or an array: told by the first character, so a
    // malformed one gets the error of what it tried to be.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let outcomes: Vec<Outcome> = if first == Some(&b'[') {
        parse(&bytes, "outcome array")?
    } else {
        vec![parse(&bytes, "outcome")?]
    };
    for outcome in &outcomes {
        require(&outcome.host, "host")?;
        require(&outcome.patch_id, "patch_id")?;
    }
    let stored = state
        .storage
        .insert_outcomes(&outcomes, now_ms())
        .await
        .map_err(ApiError::storage)?;
    let labelled = outcomes
        .iter()
        .filter(|o| o.kind.is_harm() || matches!(o.kind, shadowpatch_predict::remote::OutcomeKind::Kept))
        .count() as u64;
    if state.new_outcomes.fetch_add(labelled, Ordering::SeqCst) + labelled >= state.retrain_after {
        state.retrain_now.notify_one();
    }
    Ok(Json(OutcomeAck { stored }).into_response())
}

async fn model(State(state): State<Arc<AppState>>) -> Json<ModelVersion> {
    Json(state.current().version.clone())
}

async fn health(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    state.storage.ping().await.map_err(ApiError::storage)?;
    Ok(Json(serde_json::json!({ "status": "ok", "model": state.current().version })).into_response())
}

/// Retrain every `options.every`, or sooner after enough new labelled
/// outcomes; promote a candidate that does not do worse.
pub async fn retrain_loop(state: Arc<AppState>, options: RetrainOptions) {
    let mut last_samples = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(options.every) => {}
            _ = state.retrain_now.notified() => {}
        }
        state.new_outcomes.store(0, Ordering::SeqCst);
        let rows = match state.storage.label_rows().await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "retraining skipped: reading the outcomes failed");
                continue;
            }
        };
        let benign_after_ms = options.benign_after.as_millis() as u64;
        let samples = label(&rows, now_ms(), benign_after_ms);
        // Nothing new since the last round: the same data, the same answer.
        let key = (samples.len(), samples.iter().filter(|s| s.harmful).count());
        if samples.is_empty() || last_samples == Some(key) {
            continue;
        }
        last_samples = Some(key);
        let current = state.current();
        let corpus = options.corpus.clone();
        let model = current.risk.model.clone();
        let version = current.version.clone();
        let outcome = tokio::task::spawn_blocking(move || retrain(&samples, &corpus, &model, &version)).await;
        match outcome {
            Ok(Retrained::Promote {
                model,
                version,
                current_auc,
            }) => {
                let stored = StoredModel {
                    version: version.clone(),
                    model_json: model.to_json(),
                };
                if let Err(error) = state.storage.insert_model(&stored, now_ms()).await {
                    tracing::warn!(%error, model = %version.name, "promotion not stored; the current model stays");
                    continue;
                }
                let risk = ModelRisk {
                    model: Arc::new(*model),
                    origin: format!("fleet database ({})", version.name),
                };
                // Served first, then said: whoever reads the log line and
                // asks for the model gets the one it names.
                *state.model.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(CurrentModel {
                    risk,
                    version: version.clone(),
                });
                tracing::info!(
                    model = %version.name,
                    held_out_auc = ?version.held_out_auc,
                    previous = %current.version.name,
                    previous_auc = ?current_auc,
                    trained_on = version.trained_on,
                    "promoted a retrained model"
                );
            }
            Ok(Retrained::Refuse { reason }) => {
                tracing::info!(model = %current.version.name, %reason, "retraining kept the current model");
            }
            Err(error) => tracing::warn!(%error, "retraining panicked; the current model stays"),
        }
    }
}
