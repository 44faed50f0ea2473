//! The CI smoke run: every harness over its committed seeds (and the
//! inputs of fixed findings kept beside them) in a plain `cargo test`, on
//! stable, without libFuzzer. The long runs are `cargo fuzz run` (see
//! docs/fuzzing.md).

use std::path::Path;

#[test]
fn every_harness_takes_every_committed_seed() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut total = 0;
    for (name, harness) in shadowpatch_fuzz::HARNESSES {
        let folder = seeds.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&folder)
            .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
            .map(|entry| entry.expect("a seed entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name} has no seed in {}", folder.display());
        for file in &files {
            let bytes = std::fs::read(file).expect("reading a seed");
            harness(&bytes);
        }
        println!("{name}: {} seeds", files.len());
        total += files.len();
    }
    println!("{total} seeds in all");
}

#[test]
fn every_fuzz_target_has_a_harness() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(targets)
        .expect("fuzz_targets")
        .map(|entry| entry.expect("an entry").path())
        .filter_map(|path| Some(path.file_stem()?.to_str()?.to_string()))
        .collect();
    names.sort();
    let mut harnesses: Vec<String> = shadowpatch_fuzz::HARNESSES
        .iter()
        .map(|(name, _)| name.to_string())
        .collect();
    harnesses.sort();
    assert_eq!(names, harnesses);
}

/// Writes the seeds that are made with the real writers rather than by
/// hand (a journal, a generation file, a history database, signing
/// files). Run once when a format changes:
/// `cargo test --test seeds -- --ignored generate_seeds`.
#[test]
#[ignore = "writes the generated seeds into fuzz/seeds"]
fn generate_seeds() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    generated::journal(&seeds.join("journal"));
    generated::generation(&seeds.join("generation"));
    generated::history(&seeds.join("history"));
    generated::signing(&seeds.join("signing"));
}

mod generated {
    use shadowpatch_patch::journal::{encode_line, PatchRecord, PatchedFunction, Record, TxnKind, Write5};
    use shadowpatch_patch::trampoline::FunctionSite;
    use std::path::Path;

    fn begin(txn: u64, kind: TxnKind) -> Record {
        Record::Begin {
            txn,
            kind,
            patch_id: "ping-fix".into(),
            pid: 4242,
            start_time: 123_456,
            unix_ms: 1_700_000_000_000,
            boot_ns: None,
        }
    }

    /// An apply, a heal and a rollback; written with real checksums, and
    /// again with `@` in their place (the harness fills them in).
    pub fn journal(dir: &Path) {
        let write = Write5 {
            address: 0x5555_5555_5149,
            original: vec![0xf3, 0x0f, 0x1e, 0xfa, 0x55],
            new: vec![0xe9, 0x10, 0x20, 0x30, 0x40],
        };
        let patch = PatchRecord {
            id: "ping-fix".into(),
            generation: 1,
            manifest: "/patches/ping/manifest.toml".into(),
            object: "/patches/ping/ping_fix.so".into(),
            module: "redis-server".into(),
            build_id: "a50d6825e7aa".into(),
            mapping_address: 0x5555_5560_0000,
            mapping_len: 0x4000,
            functions: vec![PatchedFunction {
                site: FunctionSite {
                    symbol: "pingCommand".into(),
                    entry: 0x5555_5555_5149,
                    size: 64,
                    patch_at: 0x5555_5555_514d,
                },
                with: "pingCommand_fixed".into(),
                new_address: 0x5555_5560_1000,
                write: write.clone(),
                preserved: None,
                watch_stub: None,
            }],
        };
        let records = vec![
            begin(0, TxnKind::Apply),
            Record::Map {
                txn: 0,
                address: 0x5555_5560_0000,
                len: 0x4000,
            },
            Record::Plan { txn: 0, patch },
            Record::Commit { txn: 0, pause_us: 120, boot_ns: None },
            begin(1, TxnKind::Heal),
            Record::Writes {
                txn: 1,
                writes: vec![write],
                patch_id: None,
            },
            Record::Commit { txn: 1, pause_us: 40, boot_ns: None },
            begin(2, TxnKind::Rollback),
            Record::Unmap {
                txn: 2,
                address: 0x5555_5560_0000,
                len: 0x4000,
            },
            Record::Commit { txn: 2, pause_us: 90, boot_ns: None },
            begin(3, TxnKind::Probe),
            Record::Abort {
                txn: 3,
                reason: "target exited".into(),
            },
        ];
        let mut checked = Vec::new();
        let mut placeholders = Vec::new();
        for record in &records {
            checked.extend_from_slice(&encode_line(record));
            checked.push(b'\n');
            placeholders.extend_from_slice(b"@ ");
            placeholders.extend_from_slice(&serde_json::to_vec(record).unwrap());
            placeholders.push(b'\n');
        }
        std::fs::write(dir.join("apply-heal-rollback"), &checked).unwrap();
        std::fs::write(dir.join("apply-heal-rollback-placeholders"), &placeholders).unwrap();
    }

    /// A generation of two one-page regions, in both forms the harness takes.
    pub fn generation(dir: &Path) {
        use shadowpatch_mirror::hash::{merkle_root, PageHasher};
        use shadowpatch_mirror::store::{encode_secret, hex32, MirrorWriter, FORMAT_VERSION};
        use shadowpatch_mirror::{GenerationHeader, RegionKind, RegionRecord, RegionSpec, TargetRecord};
        let hasher = PageHasher::from_secret([7u8; 192]);
        let pages: Vec<Vec<u8>> = (0..2u8)
            .map(|i| (0..4096u32).map(|b| (b as u8) ^ (i + 1)).collect())
            .collect();
        let hashes: Vec<u128> = pages.iter().map(|page| hasher.hash(page)).collect();
        let regions: Vec<RegionRecord> = (0..2u64)
            .map(|i| RegionRecord {
                spec: RegionSpec {
                    start: 0x5555_5555_4000 + i * 0x1000,
                    end: 0x5555_5555_5000 + i * 0x1000,
                    kind: if i == 0 {
                        RegionKind::Code
                    } else {
                        RegionKind::ReadOnlyData
                    },
                    perms: if i == 0 { "r-xp".into() } else { "r--p".into() },
                    module: "busy".into(),
                    path: Some("/usr/bin/busy".into()),
                    build_id: Some("a50d6825e7aa".into()),
                    file_offset: i * 0x1000,
                },
                pages: 1,
                data_offset: 8 + i * 4096,
                first_hash: i,
                merkle_root: hex32(&merkle_root(&hashes[i as usize..i as usize + 1])),
            })
            .collect();
        let header = GenerationHeader {
            format: FORMAT_VERSION,
            generation: 0,
            created_unix_ms: 1_700_000_000_000,
            target: TargetRecord {
                pid: 4242,
                start_time: 123_456,
                comm: "busy".into(),
                exe: Some("/usr/bin/busy".into()),
                exec_id: Some("7ffd1234".into()),
            },
            hash_algorithm: "xxh3-128-keyed".into(),
            hash_secret: encode_secret(&[7u8; 192]),
            regions,
            hash_section_offset: 0,
            hash_section_digest: String::new(),
            total_bytes: 8192,
            capture_us: 10,
            notes: vec!["[heap]: writable".into()],
        };
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch.path().join("gen-000000.mirror");
        let mut writer = MirrorWriter::create(&path).unwrap();
        for page in &pages {
            writer.write_bytes(page).unwrap();
        }
        let header = writer.finish(header, &hashes).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert!(shadowpatch_mirror::MirrorFile::open(&path).is_ok());
        let mut raw = vec![0u8];
        raw.extend_from_slice(&file);
        std::fs::write(dir.join("two-regions-raw"), &raw).unwrap();
        let mut laid_out = vec![1u8];
        for page in &pages {
            laid_out.extend_from_slice(page);
        }
        for hash in &hashes {
            laid_out.extend_from_slice(&hash.to_le_bytes());
        }
        laid_out.extend_from_slice(shadowpatch_fuzz::GENERATION_SPLIT);
        let json = serde_json::to_string(&GenerationHeader {
            hash_section_digest: "@".into(),
            ..header
        })
        .unwrap();
        laid_out.extend_from_slice(json.as_bytes());
        assert_eq!(
            shadowpatch_fuzz::lay_out_generation(&laid_out[1..]),
            file,
            "the laid-out form is the file"
        );
        std::fs::write(dir.join("two-regions-laid-out"), &laid_out).unwrap();
    }

    /// A history of a few events.
    pub fn history(dir: &Path) {
        use shadowpatch_store::{EventKind, NewEvent, Store, DATABASE_FILE};
        let scratch = tempfile::tempdir().unwrap();
        {
            let store = Store::open(scratch.path()).unwrap();
            store
                .record(
                    &NewEvent::new(EventKind::Agent)
                        .target(4242, 123_456)
                        .at(1_700_000_000_000)
                        .cause("request")
                        .outcome("rolled_back")
                        .details(serde_json::json!({"patch_id": "fix"})),
                )
                .unwrap();
            store
                .record(
                    &NewEvent::new(EventKind::Agent)
                        .patch("fix")
                        .at(1_700_000_000_500)
                        .duration_us(120),
                )
                .unwrap();
        }
        let bytes = std::fs::read(scratch.path().join(DATABASE_FILE)).unwrap();
        std::fs::write(dir.join("two-events.db"), bytes).unwrap();
    }

    /// A signature of the patch the harness checks, and a policy that
    /// trusts its key and requires signatures.
    pub fn signing(dir: &Path) {
        let scratch = tempfile::tempdir().unwrap();
        let key = shadowpatch_signing::generate_key_pair(scratch.path(), "fix").unwrap();
        let signature =
            shadowpatch_signing::sign_patch(&key.secret_key_path, b"id = \"fix\"\n", b"\x7fELF", "0123456789abcdef")
                .unwrap();
        let signature_file = scratch.path().join("fix.toml.sig");
        shadowpatch_signing::write_signature(&signature_file, &signature).unwrap();
        let public = std::fs::read_to_string(&key.public_key_path).unwrap();
        let public_hex = public
            .lines()
            .find_map(|line| {
                line.strip_prefix("public_key = \"")?
                    .strip_suffix('"')
                    .map(str::to_string)
            })
            .expect("the public key file names its key");
        let mut seed = std::fs::read(&signature_file).unwrap();
        seed.extend_from_slice(b"---\n");
        seed.extend_from_slice(
            format!(
                "require_signature = true\n\n[[trusted_key]]\npublic_key = \"{public_hex}\"\nkey_id = \"{}\"\n",
                key.key_id
            )
            .as_bytes(),
        );
        std::fs::write(dir.join("signed-and-trusted"), seed).unwrap();
    }
}
