//! The trust policy's part of `apply`: the manifest and the object are read
//! once, bounded, and checked against `STATE/policy.toml` (trusted keys,
//! `require_signature`) before anything else looks at the target; the
//! object the survey then loads must be the very bytes that were checked.
//!
//! The policy is the state directory's, so a request to the agent is judged
//! by the agent's policy, never by anything the requester sends.

use crate::OpsError;
use shadowpatch_patch::manifest::{read_input, MAX_MANIFEST_BYTES, MAX_OBJECT_BYTES};
use shadowpatch_patch::{Manifest, PatchError};
use shadowpatch_signing::{Policy, SignatureCheck};
use std::path::{Path, PathBuf};

/// The policy file of a state directory.
pub fn policy_path(state_dir: &Path) -> PathBuf {
    state_dir.join("policy.toml")
}

/// What was checked: the policy's verdict and the object's hash.
#[derive(Debug, Clone)]
pub struct CheckedPatch {
    pub check: SignatureCheck,
    object_hash: blake3::Hash,
}

impl CheckedPatch {
    /// Refuses when the object about to be loaded is not the one checked
    /// (the file was replaced in between).
    pub fn same_object(&self, object_path: &Path, bytes: &[u8]) -> Result<(), OpsError> {
        if blake3::hash(bytes) == self.object_hash {
            return Ok(());
        }
        Err(OpsError::Patch(PatchError::Object {
            path: object_path.to_path_buf(),
            message: "changed while the patch was being applied (the bytes loaded are not those checked); nothing was written".into(),
        }))
    }
}

/// Reads the manifest and its object (bounded), parses the manifest from
/// those bytes, and checks them against the state directory's policy.
pub fn read_and_check(state_dir: &Path, manifest_path: &Path) -> Result<(Manifest, PathBuf, CheckedPatch), OpsError> {
    let manifest_bytes = read_input(manifest_path, MAX_MANIFEST_BYTES).map_err(|message| PatchError::Manifest {
        path: manifest_path.to_path_buf(),
        message,
    })?;
    let (manifest, object_path) = Manifest::from_bytes(manifest_path, &manifest_bytes)?;
    let object_bytes = read_input(&object_path, MAX_OBJECT_BYTES).map_err(|message| PatchError::Object {
        path: object_path.clone(),
        message: format!("cannot read: {message}"),
    })?;
    let policy = Policy::load_if_present(&policy_path(state_dir))?;
    let check = policy.check(manifest_path, &manifest_bytes, &object_bytes, &manifest.target.build_id)?;
    let checked = CheckedPatch {
        check,
        object_hash: blake3::hash(&object_bytes),
    };
    Ok((manifest, object_path, checked))
}
