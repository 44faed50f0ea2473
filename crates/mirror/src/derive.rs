//! Deriving the next generation from the active one: the same pages with a
//! patch's trampoline bytes edited in, plus the patch's own immutable pages.
//! The key (hash secret) is kept, so unchanged pages keep their hashes and
//! only edited or added pages are hashed again.

use crate::hash::{merkle_root, PAGE_SIZE};
use crate::region::RegionSpec;
use crate::store::{hex32, GenerationHeader, MirrorFile, MirrorWriter, RegionRecord, TargetRecord};
use crate::MirrorError;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

/// Bytes to change in a mirrored region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub address: u64,
    pub bytes: Vec<u8>,
}

/// A region to add, with its full contents (a whole number of pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedRegion {
    pub spec: RegionSpec,
    pub bytes: Vec<u8>,
}

/// Write generation `generation` to `path`: `previous` with `edits` applied
/// and `added` appended. Edits outside every mirrored region are listed in
/// the header's notes (they are not covered by verification).
pub fn derive(
    previous: &MirrorFile,
    generation: u32,
    edits: &[Edit],
    added: &[AddedRegion],
    path: &Path,
) -> Result<GenerationHeader, MirrorError> {
    derive_inner(previous, generation, edits, added, None, path)
}

/// Copy generation `previous` to `path` as the generation of another
/// process, `target`: a child forked from the mirrored process holds the
/// same memory (fork adoption). Bytes, hashes and key are kept; only the
/// header names the new owner.
pub fn copy_for_target(
    previous: &MirrorFile,
    target: &TargetRecord,
    path: &Path,
) -> Result<GenerationHeader, MirrorError> {
    derive_inner(previous, previous.header.generation, &[], &[], Some(target), path)
}

fn derive_inner(
    previous: &MirrorFile,
    generation: u32,
    edits: &[Edit],
    added: &[AddedRegion],
    target: Option<&TargetRecord>,
    path: &Path,
) -> Result<GenerationHeader, MirrorError> {
    let started = Instant::now();
    let mut writer = MirrorWriter::create(path)?;
    let mut hashes: Vec<u128> = Vec::with_capacity(previous.hashes.len());
    let mut records = Vec::new();
    let mut notes = previous.header.notes.clone();
    let mut covered = vec![false; edits.len()];
    // No larger than the largest region (see `capture`).
    let largest = previous.header.regions.iter().map(|r| r.pages).max().unwrap_or(0);
    let mut chunk = vec![0u8; (largest.min(256) as usize) * PAGE_SIZE];
    let result = (|| {
        for (index, region) in previous.header.regions.iter().enumerate() {
            let first_hash = hashes.len() as u64;
            let data_offset = writer.offset();
            let old_hashes = previous.region_hashes(index);
            let mut page = 0u64;
            while page < region.pages {
                let count = (region.pages - page).min(256);
                let bytes = &mut chunk[..(count as usize) * PAGE_SIZE];
                previous
                    .raw_file()
                    .read_exact_at(bytes, region.data_offset + page * PAGE_SIZE as u64)
                    .map_err(|source| MirrorError::Io {
                        path: previous.path.clone(),
                        source,
                    })?;
                let chunk_start = region.spec.start + page * PAGE_SIZE as u64;
                let chunk_end = chunk_start + bytes.len() as u64;
                let mut edited_pages = vec![false; count as usize];
                for (i, edit) in edits.iter().enumerate() {
                    for (k, byte) in edit.bytes.iter().enumerate() {
                        let address = edit.address + k as u64;
                        if (chunk_start..chunk_end).contains(&address) {
                            let offset = (address - chunk_start) as usize;
                            bytes[offset] = *byte;
                            edited_pages[offset / PAGE_SIZE] = true;
                            covered[i] = true;
                        }
                    }
                }
                for (p, page_bytes) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                    let old = old_hashes[(page as usize) + p];
                    hashes.push(if edited_pages[p] {
                        previous.hasher.hash(page_bytes)
                    } else {
                        old
                    });
                }
                writer.write_bytes(bytes)?;
                page += count;
            }
            records.push(RegionRecord {
                spec: region.spec.clone(),
                pages: region.pages,
                data_offset,
                first_hash,
                merkle_root: hex32(&merkle_root(&hashes[first_hash as usize..])),
            });
        }
        for region in added {
            assert_eq!(region.bytes.len() % PAGE_SIZE, 0, "added regions are whole pages");
            let first_hash = hashes.len() as u64;
            let data_offset = writer.offset();
            for page_bytes in region.bytes.chunks_exact(PAGE_SIZE) {
                hashes.push(previous.hasher.hash(page_bytes));
            }
            writer.write_bytes(&region.bytes)?;
            let mut spec = region.spec.clone();
            spec.end = spec.start + region.bytes.len() as u64;
            records.push(RegionRecord {
                spec,
                pages: (region.bytes.len() / PAGE_SIZE) as u64,
                data_offset,
                first_hash,
                merkle_root: hex32(&merkle_root(&hashes[first_hash as usize..])),
            });
        }
        Ok::<(), MirrorError>(())
    })();
    if let Err(error) = result {
        writer.abandon();
        return Err(error);
    }
    for (edit, covered) in edits.iter().zip(covered) {
        if !covered {
            notes.push(format!(
                "generation {generation}: bytes written at {:#x} lie outside the mirror",
                edit.address
            ));
        }
    }
    let header = GenerationHeader {
        generation,
        created_unix_ms: crate::capture::unix_ms(),
        total_bytes: records.iter().map(|r| r.pages * PAGE_SIZE as u64).sum(),
        regions: records,
        hash_section_offset: 0,
        hash_section_digest: String::new(),
        capture_us: started.elapsed().as_micros() as u64,
        notes,
        target: target.cloned().unwrap_or_else(|| previous.header.target.clone()),
        ..previous.header.clone()
    };
    writer.finish(header, &hashes)
}
