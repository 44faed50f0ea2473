//! `build`: a patch from a source diff (`shadowpatch_build`), then, when
//! the target is a running process, the static analysis `apply` would run
//! on the result. Nothing of any process is changed: the analysis only
//! reads.

use crate::analysis::{analyze, AnalysisReport, AnalysisSettings};
use crate::OpsError;
use shadowpatch_build::{BuildRequest, Built};
use std::path::Path;

/// What a build made, and the analysis of it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuildOutcome {
    #[serde(flatten)]
    pub built: Built,
    /// The static analysis against the running target (`None` for a file
    /// target, or when it could not run: see `analysis_error`).
    pub analysis: Option<AnalysisReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_error: Option<String>,
}

/// Build the patch `request` describes; `step(i, name)` as each of
/// `shadowpatch_build::STEPS` starts.
pub fn build(
    state_dir: &Path,
    request: &BuildRequest,
    step: &mut dyn FnMut(usize, &str),
) -> Result<BuildOutcome, OpsError> {
    let built = shadowpatch_build::build(request, step)?;
    let (analysis, analysis_error) = match request.target.parse::<i32>() {
        Ok(pid) => {
            let settings = AnalysisSettings {
                context_secs: 0.0,
                ..AnalysisSettings::default()
            };
            // The patch is complete and written whatever the analysis says;
            // `apply` runs it again (and gates on it).
            match analyze(state_dir, pid, &built.manifest_path, &settings, "build", None) {
                Ok(report) => (Some(report), None),
                Err(error) => (None, Some(error.to_string())),
            }
        }
        Err(_) => (None, None),
    };
    Ok(BuildOutcome {
        built,
        analysis,
        analysis_error,
    })
}
