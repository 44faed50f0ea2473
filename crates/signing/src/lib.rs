//! Signed patches: ed25519 key pairs, detached signatures over a patch
//! (manifest bytes, object bytes and the target's build-id), and the trust
//! policy that says which keys are trusted and whether unsigned patches are
//! refused.
//!
//! A signature binds the three things that decide what a patch does to a
//! process: the manifest (which functions are replaced, by what), the
//! object (the code), and the build-id of the module it is for. Changing any
//! of them, or moving a signed patch to another build, breaks it. The
//! signed message is a fixed domain string followed by the BLAKE3 hashes of
//! the manifest and the object and the build-id in lowercase hex, so a
//! signature can never be confused with one over other data.
//!
//! The cryptography is `ed25519-dalek` (`verify_strict`: no malleable or
//! small-order signatures); this crate only frames the message and reads
//! the small TOML files around it, each bounded in size and refused when it
//! is not a regular file (a FIFO would block a reader for ever).

#![forbid(unsafe_code)]

mod files;
mod policy;

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

pub use files::read_bounded;
pub use policy::{Policy, SignatureCheck, TrustedKey};

/// The largest key, signature or policy file read (they are a few hundred bytes).
pub const MAX_SMALL_FILE: u64 = 64 * 1024;
const KEY_FORMAT: &str = "shadowpatch-key-v1";
const PUBLIC_FORMAT: &str = "shadowpatch-public-key-v1";
const SIGNATURE_FORMAT: &str = "shadowpatch-signature-v1";
const DOMAIN: &[u8] = b"shadowpatch patch signature v1\0";

/// Everything that can go wrong with keys, signatures and the policy.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: is not a regular file ({kind}); refusing to read it")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: is {size} bytes, more than the {limit} bytes allowed")]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("{path} exists already; refusing to overwrite a key")]
    KeyExists { path: PathBuf },
    #[error("patch {manifest} is not signed ({signature} is missing) and the policy {policy} requires a signature")]
    Unsigned {
        manifest: PathBuf,
        signature: PathBuf,
        policy: PathBuf,
    },
    #[error("{signature}: signed by key {key_id}, which the policy {policy} does not trust")]
    UntrustedKey {
        signature: PathBuf,
        key_id: String,
        policy: PathBuf,
    },
    #[error("{signature}: the signature does not match this patch ({what})")]
    BadSignature { signature: PathBuf, what: String },
}

impl shadowpatch_failure::Classify for SigningError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        if self.is_refusal() {
            shadowpatch_failure::FailureClass::RefusedForSafety
        } else {
            shadowpatch_failure::FailureClass::BadInput
        }
    }
}

impl SigningError {
    /// A refusal on trust grounds (unsigned, untrusted, forged), as opposed
    /// to a file that cannot be read or parsed (bad input).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            SigningError::Unsigned { .. } | SigningError::UntrustedKey { .. } | SigningError::BadSignature { .. }
        )
    }
}

/// A key's short name: the first 8 bytes of BLAKE3 over its public key, hex.
pub fn key_id(public_key: &VerifyingKey) -> String {
    hex(&blake3::hash(public_key.as_bytes()).as_bytes()[..8])
}

/// A public key as stored in `NAME.pub` and in a policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    pub format: String,
    pub key_id: String,
    pub public_key: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretKeyFile {
    format: String,
    key_id: String,
    secret_key: String,
}

/// What `generate_key_pair` wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratedKey {
    pub key_id: String,
    pub secret_key_path: PathBuf,
    pub public_key_path: PathBuf,
}

/// Makes a new key pair `DIR/NAME.key` (secret, mode 0600, never
/// overwritten) and `DIR/NAME.pub`.
pub fn generate_key_pair(dir: &Path, name: &str) -> Result<GeneratedKey, SigningError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("the kernel's random source is available");
    let signing_key = SigningKey::from_bytes(&secret);
    let verifying_key = signing_key.verifying_key();
    let key_id = key_id(&verifying_key);
    let secret_key_path = dir.join(format!("{name}.key"));
    let public_key_path = dir.join(format!("{name}.pub"));
    let secret_text = toml::to_string(&SecretKeyFile {
        format: KEY_FORMAT.into(),
        key_id: key_id.clone(),
        secret_key: hex(&secret),
    })
    .expect("a key file serializes");
    let public_text = toml::to_string(&PublicKeyFile {
        format: PUBLIC_FORMAT.into(),
        key_id: key_id.clone(),
        public_key: hex(verifying_key.as_bytes()),
    })
    .expect("a key file serializes");
    files::write_new(&secret_key_path, secret_text.as_bytes(), 0o600)?;
    files::write_new(&public_key_path, public_text.as_bytes(), 0o644)?;
    Ok(GeneratedKey {
        key_id,
        secret_key_path,
        public_key_path,
    })
}

/// A detached signature, stored beside the manifest as `MANIFEST.sig`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PatchSignature {
    pub format: String,
    pub key_id: String,
    /// The build-id the patch is for, as signed.
    pub build_id: String,
    pub manifest_blake3: String,
    pub object_blake3: String,
    pub signature: String,
}

/// Where the signature of a manifest lives: `MANIFEST.sig`.
pub fn signature_path(manifest: &Path) -> PathBuf {
    let mut name = manifest.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// The bytes a patch signature covers.
fn signed_message(manifest_hash: &blake3::Hash, object_hash: &blake3::Hash, build_id: &str) -> Vec<u8> {
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(manifest_hash.as_bytes());
    message.extend_from_slice(object_hash.as_bytes());
    message.extend_from_slice(build_id.to_ascii_lowercase().as_bytes());
    message
}

/// Signs a patch with the secret key file and returns the signature (the
/// caller writes it with [`write_signature`]).
pub fn sign_patch(
    secret_key_path: &Path,
    manifest_bytes: &[u8],
    object_bytes: &[u8],
    build_id: &str,
) -> Result<PatchSignature, SigningError> {
    let text = read_bounded(secret_key_path, MAX_SMALL_FILE)?;
    let file: SecretKeyFile = parse_toml(secret_key_path, &text)?;
    if file.format != KEY_FORMAT {
        return Err(malformed(
            secret_key_path,
            format!("format {:?} is not {KEY_FORMAT:?}", file.format),
        ));
    }
    let secret: [u8; 32] = unhex_array(secret_key_path, "secret_key", &file.secret_key)?;
    let signing_key = SigningKey::from_bytes(&secret);
    let manifest_hash = blake3::hash(manifest_bytes);
    let object_hash = blake3::hash(object_bytes);
    let signature = signing_key.sign(&signed_message(&manifest_hash, &object_hash, build_id));
    Ok(PatchSignature {
        format: SIGNATURE_FORMAT.into(),
        key_id: key_id(&signing_key.verifying_key()),
        build_id: build_id.to_ascii_lowercase(),
        manifest_blake3: manifest_hash.to_hex().to_string(),
        object_blake3: object_hash.to_hex().to_string(),
        signature: hex(&signature.to_bytes()),
    })
}

/// Writes a signature file (replacing an older signature of the same patch).
pub fn write_signature(path: &Path, signature: &PatchSignature) -> Result<(), SigningError> {
    let text = toml::to_string(signature).expect("a signature serializes");
    files::write_replace(path, text.as_bytes())
}

/// Reads a signature file, or `None` when there is none.
pub fn read_signature(path: &Path) -> Result<Option<PatchSignature>, SigningError> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SigningError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => {}
    }
    let text = read_bounded(path, MAX_SMALL_FILE)?;
    let signature: PatchSignature = parse_toml(path, &text)?;
    if signature.format != SIGNATURE_FORMAT {
        return Err(malformed(
            path,
            format!("format {:?} is not {SIGNATURE_FORMAT:?}", signature.format),
        ));
    }
    Ok(Some(signature))
}

/// Checks one signature against the patch's bytes and a public key.
pub(crate) fn verify_signature(
    signature_file: &Path,
    signature: &PatchSignature,
    public_key: &VerifyingKey,
    manifest_bytes: &[u8],
    object_bytes: &[u8],
    build_id: &str,
) -> Result<(), SigningError> {
    let bad = |what: String| SigningError::BadSignature {
        signature: signature_file.to_path_buf(),
        what,
    };
    let manifest_hash = blake3::hash(manifest_bytes);
    let object_hash = blake3::hash(object_bytes);
    if signature.manifest_blake3 != manifest_hash.to_hex().as_str() {
        return Err(bad("the manifest changed since it was signed".into()));
    }
    if signature.object_blake3 != object_hash.to_hex().as_str() {
        return Err(bad("the patch object changed since it was signed".into()));
    }
    if !signature.build_id.eq_ignore_ascii_case(build_id) {
        return Err(bad(format!(
            "signed for build-id {}, the manifest is for {build_id}",
            signature.build_id
        )));
    }
    let bytes: [u8; 64] = unhex_array(signature_file, "signature", &signature.signature)?;
    let ed_signature = ed25519_dalek::Signature::from_bytes(&bytes);
    public_key
        .verify_strict(&signed_message(&manifest_hash, &object_hash, build_id), &ed_signature)
        .map_err(|_| bad("the ed25519 signature is invalid".into()))
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, SigningError> {
    let text = std::str::from_utf8(bytes).map_err(|_| malformed(path, "not UTF-8".into()))?;
    toml::from_str(text).map_err(|error| malformed(path, error.message().to_string()))
}

fn malformed(path: &Path, reason: String) -> SigningError {
    SigningError::Malformed {
        path: path.to_path_buf(),
        reason,
    }
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn unhex_array<const N: usize>(path: &Path, field: &str, text: &str) -> Result<[u8; N], SigningError> {
    let wrong = || malformed(path, format!("{field} is not {N} bytes of hex"));
    if text.len() != 2 * N || !text.is_ascii() {
        return Err(wrong());
    }
    let mut out = [0u8; N];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).map_err(|_| wrong())?;
    }
    Ok(out)
}

fn verifying_key_from_hex(path: &Path, text: &str) -> Result<VerifyingKey, SigningError> {
    let bytes: [u8; 32] = unhex_array(path, "public_key", text)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| malformed(path, "public_key is not a valid ed25519 point".into()))
}

#[cfg(test)]
mod tests;
