//! `shadowpatch keygen NAME` and `shadowpatch sign MANIFEST --key FILE`:
//! the signer's side of signed patches (`apply` checks them against
//! `STATE/policy.toml`; see docs/signing.md).

use super::Context;
use crate::output::print_json;
use shadowpatch_patch::manifest::{read_input, MAX_MANIFEST_BYTES, MAX_OBJECT_BYTES};
use shadowpatch_patch::{Manifest, PatchError};
use shadowpatch_signing::{generate_key_pair, sign_patch, signature_path, write_signature};
use std::path::Path;

pub fn keygen(context: &Context, name: &str, dir: &Path) -> anyhow::Result<i32> {
    if name.is_empty() || name.contains('/') {
        return Err(crate::failure::BadInput(format!("key name {name:?}: give a plain file name, without '/'")).into());
    }
    let generated = generate_key_pair(dir, name)?;
    if context.json {
        print_json(&generated);
    } else {
        println!("key {} written", generated.key_id);
        println!(
            "  secret {} (mode 0600: keep it off the hosts you patch)",
            generated.secret_key_path.display()
        );
        println!(
            "  public {} (list it under [[trusted_key]] in STATE/policy.toml)",
            generated.public_key_path.display()
        );
    }
    Ok(0)
}

pub fn sign(context: &Context, manifest_path: &Path, key: &Path) -> anyhow::Result<i32> {
    let manifest_bytes = read_input(manifest_path, MAX_MANIFEST_BYTES).map_err(|message| PatchError::Manifest {
        path: manifest_path.to_path_buf(),
        message,
    })?;
    let (manifest, object_path) = Manifest::from_bytes(manifest_path, &manifest_bytes)?;
    let object_bytes = read_input(&object_path, MAX_OBJECT_BYTES).map_err(|message| PatchError::Object {
        path: object_path.clone(),
        message: format!("cannot read: {message}"),
    })?;
    let signature = sign_patch(key, &manifest_bytes, &object_bytes, &manifest.target.build_id)?;
    let path = signature_path(manifest_path);
    write_signature(&path, &signature)?;
    if context.json {
        print_json(&serde_json::json!({ "signature_file": path, "signature": signature }));
    } else {
        println!(
            "signed {} (object {}, build-id {}) with key {}: {}",
            manifest.id,
            object_path.display(),
            signature.build_id,
            signature.key_id,
            path.display()
        );
    }
    Ok(0)
}
