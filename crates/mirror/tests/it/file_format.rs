//! The generation file parser against corrupted input: every truncation and
//! byte flip of a valid file is either refused as corrupt or, where the
//! change is in bytes no check covers, parsed into the same region table;
//! it never panics and never yields a page that fails its hash.

use proptest::prelude::*;
use shadowpatch_mirror::store::{encode_secret, hex32, MirrorWriter, FORMAT_VERSION};
use shadowpatch_mirror::{
    merkle_root, GenerationHeader, MirrorError, MirrorFile, PageHasher, RegionKind, RegionRecord, RegionSpec,
    TargetRecord, PAGE_SIZE,
};

fn valid_file(dir: &std::path::Path, pages: usize) -> std::path::PathBuf {
    file_with_header(dir, pages, |_| {})
}

/// A file of `pages` pages whose header `edit` changed before it was
/// written (the digests still match: only the parser's checks stand).
fn file_with_header(
    dir: &std::path::Path,
    pages: usize,
    edit: impl FnOnce(&mut GenerationHeader),
) -> std::path::PathBuf {
    let path = dir.join("gen-000000.mirror");
    let hasher = PageHasher::random();
    let mut writer = MirrorWriter::create(&path).unwrap();
    let data_offset = writer.offset();
    let mut hashes = Vec::new();
    for i in 0..pages {
        let page = vec![i as u8 ^ 0xa5; PAGE_SIZE];
        hashes.push(hasher.hash(&page));
        writer.write_bytes(&page).unwrap();
    }
    let start = 0x7f00_0000_0000;
    let mut header = GenerationHeader {
        format: FORMAT_VERSION,
        generation: 0,
        created_unix_ms: 1,
        target: TargetRecord {
            pid: 1234,
            start_time: 99,
            comm: "t".into(),
            exe: None,
            exec_id: None,
        },
        hash_algorithm: "xxh3-128-keyed".into(),
        hash_secret: encode_secret(hasher.secret()),
        regions: vec![RegionRecord {
            spec: RegionSpec {
                start,
                end: start + (pages * PAGE_SIZE) as u64,
                kind: RegionKind::Code,
                perms: "r-xp".into(),
                module: "[anon]".into(),
                path: None,
                build_id: None,
                file_offset: 0,
            },
            pages: pages as u64,
            data_offset,
            first_hash: 0,
            merkle_root: hex32(&merkle_root(&hashes)),
        }],
        hash_section_offset: 0,
        hash_section_digest: String::new(),
        total_bytes: (pages * PAGE_SIZE) as u64,
        capture_us: 1,
        notes: vec![],
    };
    edit(&mut header);
    writer.finish(header, &hashes).unwrap();
    path
}

fn corrupt_message(path: &std::path::Path) -> String {
    match MirrorFile::open(path) {
        Err(MirrorError::Corrupt { message, .. }) => message,
        other => panic!("expected a corrupt-file refusal, got {other:?}"),
    }
}

/// Header counts whose sums and products overflow are damage: they
/// panicked (debug) or wrapped into a match (release) before.
#[test]
fn header_counts_that_overflow_are_refused_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    // 2 + 2^60 pages: times 16 wraps to the 32 bytes of 2 real hashes.
    let path = file_with_header(dir.path(), 2, |header| {
        let mut extra = header.regions[0].clone();
        extra.pages = 1 << 60;
        header.regions.push(extra);
    });
    assert!(corrupt_message(&path).contains("hash section does not match"));
    let path = file_with_header(dir.path(), 2, |header| {
        header.regions[0].first_hash = u64::MAX;
    });
    assert!(corrupt_message(&path).contains("region hash range out of bounds"));
    let path = file_with_header(dir.path(), 2, |header| {
        header.regions[0].data_offset = u64::MAX - 10;
    });
    assert!(corrupt_message(&path).contains("out of bounds"));
}

/// A region the header places at the top of the address space: its end
/// overflowed (a panic in debug builds); a range past the address space
/// holds no stored bytes.
#[test]
fn stored_bytes_at_the_top_of_the_address_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = file_with_header(dir.path(), 1, |header| header.regions[0].spec.start = u64::MAX - 100);
    let file = MirrorFile::open(&path).unwrap();
    assert_eq!(file.stored_bytes(u64::MAX - 50, 10).unwrap().map(|b| b.len()), Some(10));
    assert_eq!(file.stored_bytes(u64::MAX - 5, 100).unwrap(), None);
}

#[test]
fn a_valid_file_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_file(dir.path(), 3);
    let file = MirrorFile::open(&path).unwrap();
    assert_eq!(file.header.regions.len(), 1);
    assert_eq!(file.hashes.len(), 3);
    assert_eq!(file.read_page(0, 2).unwrap(), vec![2 ^ 0xa5; PAGE_SIZE]);
}

#[test]
fn a_flipped_stored_page_is_caught_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_file(dir.path(), 2);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8 + PAGE_SIZE + 17] ^= 1; // inside page 1's stored bytes
    std::fs::write(&path, &bytes).unwrap();
    let file = MirrorFile::open(&path).unwrap();
    assert!(file.read_page(0, 0).is_ok());
    assert!(matches!(file.read_page(0, 1), Err(MirrorError::Corrupt { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn corrupted_files_are_refused_or_harmless(cut in 0usize..20_000, flip in 0usize..20_000, bit in 0u8..8) {
        let dir = tempfile::tempdir().unwrap();
        let path = valid_file(dir.path(), 3);
        let pristine = std::fs::read(&path).unwrap();
        let mut bytes = pristine.clone();
        let flip_at = flip % bytes.len();
        bytes[flip_at] ^= 1 << bit;
        bytes.truncate(bytes.len() - cut % 64);
        std::fs::write(&path, &bytes).unwrap();
        match MirrorFile::open(&path) {
            Err(MirrorError::Corrupt { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
            Ok(file) => {
                // Accepted: the flip hit page bytes (caught on read) or a
                // JSON byte that still parses to the same meaning.
                for page in 0..file.header.regions[0].pages {
                    if let Ok(bytes) = file.read_page(0, page) {
                        prop_assert_eq!(file.hasher.hash(&bytes), file.hashes[page as usize]);
                    }
                }
            }
        }
    }
}
