//! The host's side of the fleet predictor (`remote.rs` holds the wire
//! protocol both sides share): [`Predictor`], a checked service address
//! with its token file, timeout and this host's name; [`RemoteScorer`], a
//! [`RiskScorer`] that asks the service once per analysis and falls back
//! to the local model on any failure; and [`DecidedBy`], what an analysis
//! reports about who scored it.

use crate::engine::{evidence_of, RiskScorer};
use crate::finding::{Explanation, Finding, VerdictPolicy};
use crate::remote::{ErrorBody, ModelVersion, Outcome, OutcomeAck, VerdictRequest, VerdictResponse, MAX_REQUEST_BYTES};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// How long a verdict may take unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest an outcome report waits: it never holds up an operation.
pub const OUTCOME_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;

/// Where the fleet predictor is and how to talk to it, as the user gave
/// it (`--predictor`, `--predictor-token`, `--predictor-timeout`,
/// `--predictor-host`); persisted with applied patches so that a later
/// rollback reports to the same service. The token itself is never
/// stored: the file is read at each contact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictorSettings {
    /// `http://HOST:PORT` (a path prefix is kept).
    pub url: String,
    /// A file holding the bearer token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Seconds a verdict may take (default 2).
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// This host's name for the fleet (default: the kernel's hostname).
    #[serde(default)]
    pub host: Option<String>,
}

fn default_timeout_secs() -> f64 {
    DEFAULT_TIMEOUT.as_secs_f64()
}

/// Why a predictor setting is unusable (bad input: nothing was done).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PredictorSettingError(pub String);

/// A checked predictor address.
#[derive(Debug, Clone)]
pub struct Predictor {
    /// The base URL, without a trailing `/`.
    pub url: String,
    pub token_file: Option<PathBuf>,
    pub timeout: Duration,
    /// This host's name in every request and outcome.
    pub host: String,
}

impl PredictorSettings {
    /// Check every field: a URL that is not `http://HOST[:PORT]`, a
    /// timeout out of (0, 600] s, an unreadable or empty token file.
    pub fn check(&self) -> Result<Predictor, PredictorSettingError> {
        let bad = |why: String| PredictorSettingError(format!("--predictor {}: {why}", self.url));
        let uri: ureq::http::Uri = self
            .url
            .parse()
            .map_err(|e: ureq::http::uri::InvalidUri| bad(format!("not a URL ({e})")))?;
        match uri.scheme_str() {
            Some("http") => {}
            // Built without TLS (as for --metrics-url): run the service
            // behind a TLS-terminating proxy on the host, or on a private network.
            Some("https") => return Err(bad("https:// is not supported (built without TLS): use http://".into())),
            _ => return Err(bad("not an http:// URL".into())),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("has no host".into()));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed".into()));
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0 && self.timeout_secs <= 600.0) {
            return Err(PredictorSettingError(format!(
                "--predictor-timeout {}: must be more than 0 and at most 600 seconds",
                self.timeout_secs
            )));
        }
        if let Some(file) = &self.token_file {
            read_token(file).map_err(PredictorSettingError)?;
        }
        let host = match &self.host {
            Some(host) if host.trim().is_empty() || host.len() > 255 => {
                return Err(PredictorSettingError(format!(
                    "--predictor-host {host:?}: want 1 to 255 characters"
                )))
            }
            Some(host) => host.clone(),
            None => local_host_name(),
        };
        Ok(Predictor {
            url: self.url.trim_end_matches('/').to_string(),
            token_file: self.token_file.clone(),
            timeout: Duration::from_secs_f64(self.timeout_secs),
            host,
        })
    }
}

/// The kernel's hostname (`localhost` when it cannot be read).
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The token in `file`: one line, bounded, not empty.
fn read_token(file: &Path) -> Result<String, String> {
    use std::io::Read;
    let bad = |why: String| format!("--predictor-token {}: {why}", file.display());
    let opened = std::fs::File::open(file).map_err(|e| bad(e.to_string()))?;
    let metadata = opened.metadata().map_err(|e| bad(e.to_string()))?;
    if !metadata.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mut text = String::new();
    opened
        .take(MAX_TOKEN_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(bad(format!("larger than {MAX_TOKEN_BYTES} bytes")));
    }
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(bad("want one token on one line".into()));
    }
    Ok(token.to_string())
}

impl Predictor {
    /// Ask for a verdict, waiting at most the configured timeout.
    pub fn verdict(&self, request: &VerdictRequest) -> Result<VerdictResponse, String> {
        let response: VerdictResponse = self.post("/v1/verdict", request, self.timeout)?;
        if !(response.risk.is_finite() && (0.0..=1.0).contains(&response.risk)) {
            return Err(format!(
                "predictor service {}: answered a risk of {} (want 0 to 1)",
                self.url, response.risk
            ));
        }
        Ok(response)
    }

    /// Report outcomes, waiting at most `timeout`.
    pub fn outcomes(&self, outcomes: &[Outcome], timeout: Duration) -> Result<OutcomeAck, String> {
        self.post("/v1/outcomes", &outcomes, timeout)
    }

    /// POST `body` as JSON to `path`; every failure is one line naming the service.
    fn post<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<R, String> {
        let url = format!("{}{path}", self.url);
        let fail = |why: String| format!("predictor service {}: {why}", self.url);
        let body = serde_json::to_vec(body).map_err(|e| fail(e.to_string()))?;
        if body.len() > MAX_REQUEST_BYTES {
            return Err(fail(format!(
                "the request is {} bytes, more than the protocol's {MAX_REQUEST_BYTES}",
                body.len()
            )));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let mut request = agent.post(&url).header("Content-Type", "application/json");
        if let Some(file) = &self.token_file {
            let token = read_token(file).map_err(fail)?;
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = request.send(&body[..]).map_err(|error| match error {
            ureq::Error::Timeout(_) => fail(format!("no answer within {:.1} s", timeout.as_secs_f64())),
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                fail(format!("unreachable ({e})"))
            }
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => fail(format!("unreachable ({error})")),
            other => fail(other.to_string()),
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_REQUEST_BYTES as u64)
            .read_to_string()
            .map_err(|e| fail(format!("reading the answer: {e}")))?;
        if !status.is_success() {
            let said = serde_json::from_str::<ErrorBody>(&text)
                .map(|body| body.error)
                .unwrap_or_else(|_| text.chars().take(200).collect());
            return Err(fail(format!("HTTP {}: {said}", status.as_u16())));
        }
        serde_json::from_str(&text).map_err(|e| fail(format!("unreadable answer ({e})")))
    }
}

/// Who scored an analysis: the fleet's service, or this host's model
/// (with why, when a service was asked and failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DecidedBy {
    Service {
        url: String,
        model: ModelVersion,
        analysis_id: String,
    },
    Local {
        /// The local scorer ([`RiskScorer::describe`]).
        model: String,
        /// Why the service did not decide; `None`: none was configured.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        why: Option<String>,
    },
}

impl Default for DecidedBy {
    fn default() -> Self {
        DecidedBy::Local {
            model: String::new(),
            why: None,
        }
    }
}

impl DecidedBy {
    /// One line for the text report.
    pub fn line(&self) -> String {
        match self {
            DecidedBy::Service { url, model, .. } => format!(
                "fleet predictor {url}: model {} (version {}, trained on {} outcomes)",
                model.name, model.version, model.trained_on
            ),
            DecidedBy::Local { model, why: None } => model.clone(),
            DecidedBy::Local { model, why: Some(why) } => format!("{model}, locally: {why}"),
        }
    }

    /// The service's analysis id, when the service decided.
    pub fn analysis_id(&self) -> Option<&str> {
        match self {
            DecidedBy::Service { analysis_id, .. } => Some(analysis_id),
            DecidedBy::Local { .. } => None,
        }
    }
}

/// What the request says of the patch besides the analysis.
#[derive(Debug, Clone)]
pub struct AskedPatch {
    pub patch_id: String,
    pub build_id: Option<String>,
    pub program: Option<String>,
}

/// The fleet's model as a [`RiskScorer`]: the first `score` sends one
/// [`VerdictRequest`] and keeps the answer (or the failure) for the rest
/// of the analysis; on failure the `local` scorer decides.
#[derive(Debug)]
pub struct RemoteScorer {
    predictor: Predictor,
    patch: AskedPatch,
    policy: VerdictPolicy,
    local: Box<dyn RiskScorer>,
    answer: OnceLock<Result<VerdictResponse, String>>,
}

impl RemoteScorer {
    /// `policy` must be the analysis request's (the service decides with it).
    pub fn new(predictor: Predictor, patch: AskedPatch, policy: VerdictPolicy, local: Box<dyn RiskScorer>) -> Self {
        RemoteScorer {
            predictor,
            patch,
            policy,
            local,
            answer: OnceLock::new(),
        }
    }

    fn ask(&self, findings: &[Finding], features: &BTreeMap<String, f64>) -> &Result<VerdictResponse, String> {
        self.answer.get_or_init(|| {
            let request = VerdictRequest {
                host: self.predictor.host.clone(),
                patch_id: self.patch.patch_id.clone(),
                build_id: self.patch.build_id.clone(),
                program: self.patch.program.clone(),
                findings: findings.to_vec(),
                features: features.clone(),
                evidence: evidence_of(features),
                policy: self.policy,
            };
            self.predictor.verdict(&request)
        })
    }

    /// The service's answer, once asked and answered.
    pub fn answer(&self) -> Option<&VerdictResponse> {
        self.answer.get().and_then(|answer| answer.as_ref().ok())
    }
}

impl RiskScorer for RemoteScorer {
    fn score(&self, findings: &[Finding], features: &BTreeMap<String, f64>) -> f64 {
        match self.ask(findings, features) {
            Ok(answer) => answer.risk,
            Err(_) => self.local.score(findings, features),
        }
    }

    fn describe(&self) -> String {
        match self.answer() {
            Some(answer) => format!(
                "fleet predictor {} model {} (version {})",
                self.predictor.url, answer.model.name, answer.model.version
            ),
            None => self.local.describe(),
        }
    }

    fn explain(&self, findings: &[Finding], features: &BTreeMap<String, f64>) -> Explanation {
        match self.answer() {
            Some(answer) => answer.explanation.clone(),
            None => self.local.explain(findings, features),
        }
    }

    fn extra_findings(&self) -> Vec<Finding> {
        self.answer()
            .map(|answer| answer.fleet_findings.clone())
            .unwrap_or_default()
    }

    fn decided_by(&self) -> DecidedBy {
        match self.answer.get() {
            Some(Ok(answer)) => DecidedBy::Service {
                url: self.predictor.url.clone(),
                model: answer.model.clone(),
                analysis_id: answer.analysis_id.clone(),
            },
            Some(Err(why)) => DecidedBy::Local {
                model: self.local.describe(),
                why: Some(why.clone()),
            },
            None => DecidedBy::Local {
                model: self.local.describe(),
                why: Some(format!("predictor service {}: not asked", self.predictor.url)),
            },
        }
    }
}

#[cfg(test)]
mod tests;
