//! `build --debian`: a patch for a binary of an installed Debian package
//! with nothing prepared by the user. `shadowpatch_build::debian::prepare`
//! finds the package of the target, fetches and caches its source, checks
//! its build dependencies and makes the reference with the package's own
//! rules (and, when needed, the archive's headers it was built with); then
//! the ordinary [`crate::build`] runs with that tree, that reference and a
//! build command using the same rules and headers.

use crate::build::BuildOutcome;
use crate::OpsError;
use shadowpatch_build::debian::{prepare, DebianRequest, DebianSource, DEBIAN_STEPS};
use shadowpatch_build::{BuildRequest, STEPS};
use std::path::Path;

/// What a Debian build made: the build's outcome and how its source and
/// reference were found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DebianBuildOutcome {
    #[serde(flatten)]
    pub outcome: BuildOutcome,
    pub debian: DebianSource,
}

/// The number of progress stages: [`DEBIAN_STEPS`], then the build's [`STEPS`].
pub const DEBIAN_BUILD_STAGES: usize = DEBIAN_STEPS.len() + STEPS.len();

/// Build the patch `request` describes (its `source`, `reference_tree` and
/// `build_command` are replaced by what `debian` prepares).
/// `progress(stage, name, note)`: `stage` below [`DEBIAN_BUILD_STAGES`].
pub fn build_debian(
    state_dir: &Path,
    debian: &DebianRequest,
    request: &BuildRequest,
    progress: &mut dyn FnMut(usize, &str, &str),
) -> Result<DebianBuildOutcome, OpsError> {
    let source = prepare(debian, &request.diffs, &mut |stage, note| {
        progress(stage, DEBIAN_STEPS[stage], note)
    })?;
    let mut request = request.clone();
    source.fill(&mut request);
    let outcome = crate::build::build(state_dir, &request, &mut |step, name| {
        progress(DEBIAN_STEPS.len() + step, name, "")
    })?;
    Ok(DebianBuildOutcome {
        outcome,
        debian: source,
    })
}
