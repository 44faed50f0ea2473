//! The fuzz harnesses: one function per parser of untrusted input, each
//! taking any bytes and driving the real parser (and what uses its result
//! next) the way the tool does. `fuzz_targets/*.rs` hand them to libFuzzer;
//! `tests/seeds.rs` runs them over the committed seeds in a plain
//! `cargo test`. A harness never judges an error: a parser may refuse
//! anything, it must not panic, hang or run out of memory.
//!
//! Inputs guarded by a digest (journal checksums, the generation file's
//! BLAKE3 digests) would stop every mutation at the first check; those
//! harnesses fill the digests in where the input says `@` so the fuzzer
//! reaches the code behind them too (see `journal` and `generation`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A scratch folder for the harnesses that need a file (SQLite, the
/// generation file, signing files), made once per process.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    // In memory where there is a tmpfs: the file harnesses write a file
    // per run. libFuzzer exits without dropping statics, so the folder
    // stays: its prefix says whose it is (docs/fuzzing.md removes them).
    let shm = Path::new("/dev/shm");
    let folder = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("shadowpatch-fuzz-")
            .tempdir_in(folder)
            .expect("a scratch folder")
    })
    .path()
}

fn write_scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("writing the scratch file");
    path
}

/// The patch manifest (`Manifest::from_bytes`, what `apply` and the agent read).
pub fn manifest(data: &[u8]) {
    let path = Path::new("/patches/fix/manifest.toml");
    if let Ok((manifest, object)) = shadowpatch_patch::Manifest::from_bytes(path, data) {
        let _ = manifest.build_id_lowercase();
        assert!(object.starts_with("/patches/fix") || manifest.object.is_absolute());
    }
}

/// The patch object: the ELF loader's parse and checks, then everything a
/// load computes from it without a target (initial image, page
/// protections, relocation against made-up symbol addresses).
pub fn object(data: &[u8]) {
    use shadowpatch_patch::load::relocate_with;
    use shadowpatch_patch::PatchObject;
    let Ok(object) = PatchObject::parse(Path::new("/patches/fix/fix.so"), data.to_vec()) else {
        return;
    };
    let _ = object.page_protections();
    for name in object.symbols.keys() {
        let _ = object.function(name);
    }
    // A load address as `choose_address` picks them: page-aligned, below
    // the user-space limit, near a module.
    for base in [0x5555_5555_4000_u64, 0x7f00_0000_0000] {
        let mut next = 0x7f12_3456_0000_u64;
        let _ = relocate_with(&object, base, |reference| {
            next += 0x40 + reference.name.len() as u64;
            Ok(next)
        });
    }
}

/// The journal: replaying its bytes (`replay_bytes`, what every command
/// does first). A line that starts with `@ ` gets its real checksum in
/// place of the `@`, so mutated records get past the checksum check.
pub fn journal(data: &[u8]) {
    let mut bytes = Vec::with_capacity(data.len() + 64);
    for piece in data.split_inclusive(|b| *b == b'\n') {
        match piece.strip_prefix(b"@ ") {
            Some(rest) => {
                let json = rest.strip_suffix(b"\n").unwrap_or(rest);
                bytes.extend_from_slice(shadowpatch_patch::journal::checksum(json).as_bytes());
                bytes.push(b' ');
                bytes.extend_from_slice(rest);
            }
            None => bytes.extend_from_slice(piece),
        }
    }
    let _ = shadowpatch_patch::journal::replay_bytes(Path::new("/state/journal"), &bytes);
}

/// The generation file (`MirrorFile::open`, what verify, rollback and
/// heal read), then reading back a few of its pages.
///
/// The first byte picks the form: even, the rest is the file as is; odd,
/// the rest is `PAGES+HASHES` `GENERATION_SPLIT` `HEADER JSON` and the harness lays out
/// the file around them with the real digests (the JSON's
/// `"hash_section_digest":"@"` is replaced by the real one), so the
/// fuzzer works on the header and regions behind the digest checks.
pub fn generation(data: &[u8]) {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let file = if form % 2 == 0 {
        rest.to_vec()
    } else {
        lay_out_generation(rest)
    };
    let path = write_scratch("gen-000000.mirror", &file);
    let Ok(mirror) = shadowpatch_mirror::MirrorFile::open(&path) else {
        return;
    };
    for (index, region) in mirror.header.regions.iter().enumerate().take(4) {
        for page in 0..region.pages.min(2) {
            let _ = mirror.read_page(index, page);
        }
        let _ = mirror.stored_bytes(region.spec.start.saturating_add(7), 100);
    }
}

const GENERATION_MAGIC: &[u8; 8] = b"SHPMIRR1";
const GENERATION_END: &[u8; 8] = b"SHPMEND1";

/// Between the pages and hashes and the header in the laid-out form.
pub const GENERATION_SPLIT: &[u8] = b"\xffHEADER\xff";

/// A generation file around `PAGES+HASHES` `GENERATION_SPLIT` `JSON` with
/// the digests filled in (see `generation`). The hash section is the last
/// 16 bytes per page the JSON's regions count; its digest covers them.
pub fn lay_out_generation(input: &[u8]) -> Vec<u8> {
    let split = input
        .windows(GENERATION_SPLIT.len())
        .position(|w| w == GENERATION_SPLIT);
    let (body, json) = match split {
        Some(at) => (&input[..at], &input[at + GENERATION_SPLIT.len()..]),
        None => (&input[..0], input),
    };
    let hashes = &body[body.len() - hash_section_len(json).min(body.len())..];
    let digest = blake3::hash(hashes).to_hex();
    let placeholder = br#""hash_section_digest":"@""#;
    let mut header = Vec::with_capacity(json.len() + 64);
    let mut at = 0;
    while at < json.len() {
        if json[at..].starts_with(placeholder) {
            header.extend_from_slice(br#""hash_section_digest":""#);
            header.extend_from_slice(digest.as_bytes());
            header.push(b'"');
            at += placeholder.len();
        } else {
            header.push(json[at]);
            at += 1;
        }
    }
    let mut file = GENERATION_MAGIC.to_vec();
    file.extend_from_slice(body);
    let header_offset = file.len() as u64;
    file.extend_from_slice(&header);
    file.extend_from_slice(blake3::hash(&header).as_bytes());
    file.extend_from_slice(&header_offset.to_le_bytes());
    file.extend_from_slice(GENERATION_END);
    file
}

/// 16 bytes per page of the regions in a header, if it reads as one.
fn hash_section_len(json: &[u8]) -> usize {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else {
        return 0;
    };
    let pages = value["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|region| region["pages"].as_u64().unwrap_or(0));
    pages
        .fold(0u64, u64::saturating_add)
        .saturating_mul(16)
        .min(usize::MAX as u64) as usize
}

/// The history database as a file of any bytes: opened read-only and read
/// (`history`), then opened for writing as every recording command does
/// (the foreign/newer check and the migration run on it).
pub fn history(data: &[u8]) {
    use shadowpatch_store::{EventFilter, Store, DATABASE_FILE};
    let dir = scratch().join("history");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch state folder");
    std::fs::write(dir.join(DATABASE_FILE), data).expect("writing the database");
    if let Ok(Some(store)) = Store::open_read_only(&dir) {
        let _ = store.count();
        let _ = store.events(&EventFilter::default());
        let _ = store.events(&EventFilter {
            limit: Some(3),
            patch_id: Some("fix".into()),
            ..EventFilter::default()
        });
    }
    if let Ok(store) = Store::open(&dir) {
        let _ = store.events(&EventFilter::default());
    }
}

/// The agent's control socket: the bytes a client sends, read line by
/// line and decoded as the server does; and the client reading replies.
pub fn agent_control(data: &[u8]) {
    use shadowpatch_agent::protocol::{decode_stream, ControlReply, ControlRequest, Decoded};
    for decoded in decode_stream::<ControlRequest>(data) {
        if let Decoded::Request(request) = decoded {
            let _ = (request.state_dir(), request.pid());
            let line = serde_json::to_string(&request).expect("requests serialize");
            let again: ControlRequest = serde_json::from_str(&line).expect("a request reads back");
            assert_eq!(again, request);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            if let Ok(reply) = serde_json::from_str::<ControlReply>(line) {
                let _ = reply.failure.and_then(|kind| kind.class());
            }
        }
    }
}

/// The agent's application socket (mode 0666: any local user), decoded as
/// the server does, with the variable a registration names checked the
/// way `--guard ADDR:SIZE` is.
pub fn agent_app(data: &[u8]) {
    use shadowpatch_agent::protocol::app::AppRequest;
    use shadowpatch_agent::protocol::{decode_stream, Decoded};
    for decoded in decode_stream::<AppRequest>(data) {
        if let Decoded::Request(AppRequest::RegisterVariable { address, size, .. }) = decoded {
            let text = format!("{address:#x}:{size}");
            let _ = shadowpatch_mirror::VariableRequest::parse(&text, shadowpatch_mirror::VariableMode::Guarded, "app");
        }
    }
}

/// The runtime library's hand-written reader of the agent's replies (it
/// runs inside the application).
pub fn runtime_reply(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            let _ = shadowpatch_runtime::AppReply::parse(line);
        }
    }
}

/// The watch config file (`watch --config`), then the options it sets
/// checked as the CLI checks them.
pub fn watch_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = shadowpatch_watch::parse_duration(text, "--interval");
    if let Ok(config) = shadowpatch_watch::WatchConfig::parse(Path::new("/etc/watch.toml"), text) {
        let mut options = shadowpatch_watch::WatchOptions::default();
        if let Some(interval) = config.interval {
            options.interval = interval;
        }
        if let Some(budget) = config.cpu_budget_percent {
            options.cpu_budget_percent = budget;
        }
        let _ = options.validate();
    }
}

/// A vectors file of calls for `simulate`/`predict --vectors`.
pub fn vectors(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = shadowpatch_simulate::call::parse_vectors_text("vectors.txt", text);
    }
}

/// One `--call` expression, and the `--guard` variable syntax.
pub fn call(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = shadowpatch_simulate::parse_call(text);
        let _ = shadowpatch_mirror::VariableRequest::parse(text, shadowpatch_mirror::VariableMode::Mirrored, "--guard");
    }
}

/// The signing files: a signature file (`MANIFEST.sig`) and a trust
/// policy, then a patch checked against them. The input is the signature
/// file, a line `---`, the policy.
pub fn signing(data: &[u8]) {
    let (signature, policy) = match data.windows(4).position(|w| w == b"\n---") {
        Some(at) => (
            &data[..at + 1],
            data[at + 4..].strip_prefix(b"\n").unwrap_or(&data[at + 4..]),
        ),
        None => (data, &data[..0]),
    };
    let manifest = write_scratch("fix.toml", b"id = \"fix\"\n");
    let signature_file = write_scratch("fix.toml.sig", signature);
    let policy_file = write_scratch("policy.toml", policy);
    let _ = shadowpatch_signing::read_signature(&signature_file);
    if let Ok(policy) = shadowpatch_signing::Policy::load(&policy_file) {
        let _ = policy.check(&manifest, b"id = \"fix\"\n", b"\x7fELF", "0123456789abcdef");
    }
}

/// A risk model file (`analyze --model`, and the model an agent request
/// names), then a prediction with it.
pub fn model(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(model) = shadowpatch_predict::ModelFile::parse(text, "model.json") {
        let features = model.features.iter().map(|name| (name.clone(), 1.0)).collect();
        let _ = model.probability(&features);
        let _ = model.describe();
    }
}

/// A harness: any bytes in, nothing out but a panic on a finding.
pub type Harness = fn(&[u8]);

/// Every harness, by its target's name.
pub const HARNESSES: &[(&str, Harness)] = &[
    ("manifest", manifest),
    ("object", object),
    ("journal", journal),
    ("generation", generation),
    ("history", history),
    ("agent_control", agent_control),
    ("agent_app", agent_app),
    ("runtime_reply", runtime_reply),
    ("watch_config", watch_config),
    ("vectors", vectors),
    ("call", call),
    ("signing", signing),
    ("model", model),
];
