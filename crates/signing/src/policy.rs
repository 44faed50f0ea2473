//! The trust policy: which public keys are trusted, and whether a patch
//! without a signature is refused.
//!
//! ```toml
//! require_signature = true
//! [[trusted_key]]
//! path = "/etc/shadowpatch/keys/release.pub"   # a file written by `shadowpatch keygen`
//! [[trusted_key]]
//! key_id = "3f0c9a12d4e5b6a7"                  # or the key inline
//! public_key = "…64 hex digits…"
//! ```
//!
//! The policy is the operator's: the CLI reads it from `--policy FILE` or
//! `STATE/policy.toml`, the agent from its own state directory, never from
//! a request.

use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::{
    key_id, malformed, parse_toml, read_bounded, read_signature, signature_path, verify_signature,
    verifying_key_from_hex, PublicKeyFile, SigningError, MAX_SMALL_FILE, PUBLIC_FORMAT,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    require_signature: bool,
    #[serde(default)]
    trusted_key: Vec<TrustedKeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustedKeyEntry {
    path: Option<PathBuf>,
    key_id: Option<String>,
    public_key: Option<String>,
}

/// One trusted public key.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub key_id: String,
    pub public_key: VerifyingKey,
}

/// A loaded trust policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Where it was read from (`None`: no policy file, the default policy).
    pub source: Option<PathBuf>,
    pub require_signature: bool,
    pub trusted: Vec<TrustedKey>,
}

/// What the policy made of a patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "signature", rename_all = "snake_case")]
pub enum SignatureCheck {
    /// Signed by this trusted key, and the signature matches.
    Verified { key_id: String },
    /// Not signed; the policy allows unsigned patches.
    Unsigned,
    /// Signed by a key the policy does not list; allowed only because the
    /// policy does not require signatures.
    UntrustedKey { key_id: String },
}

impl SignatureCheck {
    /// The signer's key id, when a trusted key signed the patch.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            SignatureCheck::Verified { key_id } => Some(key_id),
            _ => None,
        }
    }
}

impl Policy {
    /// Reads a policy file. Relative `path`s of trusted keys are taken from
    /// the policy file's folder.
    pub fn load(path: &Path) -> Result<Policy, SigningError> {
        let text = read_bounded(path, MAX_SMALL_FILE)?;
        let file: PolicyFile = parse_toml(path, &text)?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut trusted = Vec::new();
        for (index, entry) in file.trusted_key.into_iter().enumerate() {
            let where_ = format!("trusted_key[{index}]");
            let (public_hex, claimed_id, origin) = match (entry.path, entry.public_key) {
                (Some(key_path), None) => {
                    let key_path = folder.join(key_path);
                    let text = read_bounded(&key_path, MAX_SMALL_FILE)?;
                    let key: PublicKeyFile = parse_toml(&key_path, &text)?;
                    if key.format != PUBLIC_FORMAT {
                        return Err(malformed(
                            &key_path,
                            format!("format {:?} is not {PUBLIC_FORMAT:?}", key.format),
                        ));
                    }
                    (key.public_key, Some(key.key_id), key_path)
                }
                (None, Some(public_key)) => (public_key, entry.key_id, path.to_path_buf()),
                _ => {
                    return Err(malformed(
                        path,
                        format!("{where_}: give either `path` or `public_key`, not both or neither"),
                    ))
                }
            };
            let public_key = verifying_key_from_hex(&origin, &public_hex)?;
            let key_id = key_id(&public_key);
            if let Some(claimed) = claimed_id.filter(|claimed| *claimed != key_id) {
                return Err(malformed(
                    &origin,
                    format!("{where_}: key_id {claimed} does not match its public key ({key_id})"),
                ));
            }
            trusted.push(TrustedKey { key_id, public_key });
        }
        Ok(Policy {
            source: Some(path.to_path_buf()),
            require_signature: file.require_signature,
            trusted,
        })
    }

    /// The policy at `path` if that file exists, else the default policy
    /// (unsigned patches allowed, no trusted key).
    pub fn load_if_present(path: &Path) -> Result<Policy, SigningError> {
        match std::fs::symlink_metadata(path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Policy::default()),
            _ => Policy::load(path),
        }
    }

    /// Checks the patch whose manifest is at `manifest_path` (its signature
    /// is `MANIFEST.sig`) against this policy. The bytes are those the
    /// caller will load: sign-check and load read the same copy.
    pub fn check(
        &self,
        manifest_path: &Path,
        manifest_bytes: &[u8],
        object_bytes: &[u8],
        build_id: &str,
    ) -> Result<SignatureCheck, SigningError> {
        let signature_file = signature_path(manifest_path);
        let policy_name = || self.source.clone().unwrap_or_else(|| PathBuf::from("(default policy)"));
        let Some(signature) = read_signature(&signature_file)? else {
            if self.require_signature {
                return Err(SigningError::Unsigned {
                    manifest: manifest_path.to_path_buf(),
                    signature: signature_file,
                    policy: policy_name(),
                });
            }
            return Ok(SignatureCheck::Unsigned);
        };
        let Some(trusted) = self.trusted.iter().find(|key| key.key_id == signature.key_id) else {
            if self.require_signature {
                return Err(SigningError::UntrustedKey {
                    signature: signature_file,
                    key_id: signature.key_id,
                    policy: policy_name(),
                });
            }
            return Ok(SignatureCheck::UntrustedKey {
                key_id: signature.key_id,
            });
        };
        verify_signature(
            &signature_file,
            &signature,
            &trusted.public_key,
            manifest_bytes,
            object_bytes,
            build_id,
        )?;
        Ok(SignatureCheck::Verified {
            key_id: trusted.key_id.clone(),
        })
    }
}
