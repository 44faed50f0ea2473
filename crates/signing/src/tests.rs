//! Unit tests: signing round trips, every refusal, and the file guards.

use std::path::Path;

use proptest::prelude::*;

use super::*;

const BUILD_ID: &str = "d3ac32b357a8e837574cda3c726bf4b7d379d331";

struct Patch {
    dir: tempfile::TempDir,
    manifest: PathBuf,
}

fn patch() -> Patch {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("fix.toml");
    std::fs::write(&manifest, b"id = \"fix\"\n").unwrap();
    Patch { dir, manifest }
}

fn policy_trusting(dir: &Path, require: bool, key: &GeneratedKey) -> Policy {
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        format!(
            "require_signature = {require}\n[[trusted_key]]\npath = {:?}\n",
            key.public_key_path.file_name().unwrap()
        ),
    )
    .unwrap();
    Policy::load(&path).unwrap()
}

fn sign(patch: &Patch, key: &GeneratedKey, manifest: &[u8], object: &[u8], build_id: &str) {
    let signature = sign_patch(&key.secret_key_path, manifest, object, build_id).unwrap();
    write_signature(&signature_path(&patch.manifest), &signature).unwrap();
}

#[test]
fn a_signed_patch_verifies_against_a_trusting_policy() {
    let patch = patch();
    let key = generate_key_pair(patch.dir.path(), "release").unwrap();
    sign(&patch, &key, b"manifest", b"object", BUILD_ID);
    let policy = policy_trusting(patch.dir.path(), true, &key);
    let check = policy.check(&patch.manifest, b"manifest", b"object", BUILD_ID).unwrap();
    assert_eq!(
        check,
        SignatureCheck::Verified {
            key_id: key.key_id.clone()
        }
    );
    assert_eq!(check.key_id(), Some(key.key_id.as_str()));
    // Build-ids compare without regard to case.
    policy
        .check(&patch.manifest, b"manifest", b"object", &BUILD_ID.to_uppercase())
        .unwrap();
}

#[test]
fn any_change_to_manifest_object_or_build_id_breaks_the_signature() {
    let patch = patch();
    let key = generate_key_pair(patch.dir.path(), "release").unwrap();
    sign(&patch, &key, b"manifest", b"object", BUILD_ID);
    let policy = policy_trusting(patch.dir.path(), false, &key);
    for (manifest, object, build_id, what) in [
        (&b"manifesT"[..], &b"object"[..], BUILD_ID, "manifest changed"),
        (b"manifest", b"objecT", BUILD_ID, "patch object changed"),
        (
            b"manifest",
            b"object",
            "00ac32b357a8e837574cda3c726bf4b7d379d331",
            "signed for build-id",
        ),
    ] {
        let error = policy.check(&patch.manifest, manifest, object, build_id).unwrap_err();
        assert!(error.is_refusal(), "{error}");
        assert!(error.to_string().contains(what), "{error}");
    }
}

#[test]
fn a_forged_signature_with_matching_hashes_is_refused() {
    let patch = patch();
    let key = generate_key_pair(patch.dir.path(), "release").unwrap();
    sign(&patch, &key, b"manifest", b"object", BUILD_ID);
    let path = signature_path(&patch.manifest);
    let mut signature = read_signature(&path).unwrap().unwrap();
    let flipped = if signature.signature.starts_with('0') { "1" } else { "0" };
    signature.signature.replace_range(0..1, flipped);
    write_signature(&path, &signature).unwrap();
    let error = policy_trusting(patch.dir.path(), true, &key)
        .check(&patch.manifest, b"manifest", b"object", BUILD_ID)
        .unwrap_err();
    assert!(error.to_string().contains("ed25519 signature is invalid"), "{error}");
}

#[test]
fn unsigned_and_untrusted_patches_follow_the_policy() {
    let patch = patch();
    let trusted = generate_key_pair(patch.dir.path(), "trusted").unwrap();
    let other = generate_key_pair(patch.dir.path(), "other").unwrap();
    let lenient = policy_trusting(patch.dir.path(), false, &trusted);
    let strict = policy_trusting(patch.dir.path(), true, &trusted);

    assert_eq!(
        lenient.check(&patch.manifest, b"m", b"o", BUILD_ID).unwrap(),
        SignatureCheck::Unsigned
    );
    let error = strict.check(&patch.manifest, b"m", b"o", BUILD_ID).unwrap_err();
    assert!(matches!(error, SigningError::Unsigned { .. }), "{error}");
    assert!(error.to_string().contains("requires a signature"), "{error}");

    sign(&patch, &other, b"m", b"o", BUILD_ID);
    assert_eq!(
        lenient.check(&patch.manifest, b"m", b"o", BUILD_ID).unwrap(),
        SignatureCheck::UntrustedKey {
            key_id: other.key_id.clone()
        }
    );
    let error = strict.check(&patch.manifest, b"m", b"o", BUILD_ID).unwrap_err();
    assert!(matches!(error, SigningError::UntrustedKey { .. }), "{error}");
    assert!(error.to_string().contains(&other.key_id), "{error}");
    // No policy file at all: unsigned patches pass, signatures are not trusted.
    let default = Policy::load_if_present(&patch.dir.path().join("absent.toml")).unwrap();
    assert!(!default.require_signature);
}

#[test]
fn a_key_is_never_overwritten_and_the_secret_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = generate_key_pair(dir.path(), "k").unwrap();
    let mode = std::fs::metadata(&key.secret_key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let error = generate_key_pair(dir.path(), "k").unwrap_err();
    assert!(matches!(error, SigningError::KeyExists { .. }), "{error}");
}

#[test]
fn policy_errors_name_the_file_and_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    for (text, expected) in [
        ("require_signature = \"yes\"", "invalid type"),
        ("[[trusted_key]]\n", "trusted_key[0]: give either"),
        (
            "[[trusted_key]]\npublic_key = \"zz\"\n",
            "public_key is not 32 bytes of hex",
        ),
        ("unknown = 1\n", "unknown field"),
    ] {
        std::fs::write(&path, text).unwrap();
        let error = Policy::load(&path).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("policy.toml"), "{message}");
        assert!(message.contains(expected), "{text:?}: {message}");
        assert!(!error.is_refusal());
    }
    let key = generate_key_pair(dir.path(), "k").unwrap();
    let public = std::fs::read_to_string(&key.public_key_path).unwrap();
    let hex_key = public.lines().find(|l| l.starts_with("public_key")).unwrap();
    std::fs::write(
        &path,
        format!("[[trusted_key]]\nkey_id = \"0000000000000000\"\n{hex_key}\n"),
    )
    .unwrap();
    let error = Policy::load(&path).unwrap_err();
    assert!(error.to_string().contains("does not match its public key"), "{error}");
}

#[test]
fn fifos_devices_and_oversized_files_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix_mkfifo(&fifo);
    let error = read_bounded(&fifo, 10).unwrap_err();
    assert!(error.to_string().contains("a FIFO"), "{error}");
    let error = read_bounded(Path::new("/dev/zero"), 10).unwrap_err();
    assert!(error.to_string().contains("a device"), "{error}");
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 11]).unwrap();
    let error = read_bounded(&big, 10).unwrap_err();
    assert!(error.to_string().contains("11 bytes, more than the 10"), "{error}");
}

fn nix_mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Arbitrary bytes as a policy or a signature file are an error or a
    /// value, never a panic.
    #[test]
    fn arbitrary_policy_and_signature_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.toml");
        std::fs::write(&path, &bytes).unwrap();
        let _ = Policy::load(&path);
        let _ = read_signature(&path);
    }
}
