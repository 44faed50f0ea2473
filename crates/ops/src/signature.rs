//! The trust policy's part of `apply`: the manifest and the object are read
//! once, bounded, and checked against `STATE/policy.toml` (trusted keys,
//! `require_signature`) before anything else looks at the target. The
//! bytes checked are the [`PatchInput`] that the analysis, the survey and
//! the transaction then use: no file is opened again.
//!
//! The policy is the state directory's, so a request to the agent is judged
//! by the agent's policy, never by anything the requester sends.

use crate::OpsError;
use shadowpatch_patch::PatchInput;
use shadowpatch_signing::{Policy, SignatureCheck};
use std::path::{Path, PathBuf};

/// The policy file of a state directory.
pub fn policy_path(state_dir: &Path) -> PathBuf {
    state_dir.join("policy.toml")
}

/// Reads the manifest and its object once (bounded) as the
/// [`PatchInput`] everything after works on, and checks those bytes
/// against the state directory's policy.
pub fn read_and_check(state_dir: &Path, manifest_path: &Path) -> Result<(PatchInput, SignatureCheck), OpsError> {
    let input = PatchInput::read(manifest_path)?;
    let policy = Policy::load_if_present(&policy_path(state_dir))?;
    let check = policy.check(
        manifest_path,
        &input.manifest_bytes,
        &input.object_bytes,
        &input.manifest.target.build_id,
    )?;
    Ok((input, check))
}
