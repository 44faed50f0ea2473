//! Capturing a generation: read every region's live bytes, hash each page,
//! stream the bytes to the generation file and finish it atomically.

use crate::hash::{merkle_root, PageHasher, PAGE_SIZE};
use crate::region::RegionSpec;
use crate::store::{encode_secret, hex32, GenerationHeader, MirrorWriter, RegionRecord, TargetRecord, FORMAT_VERSION};
use crate::MirrorError;
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use std::path::Path;
use std::time::Instant;

/// Bytes read per `process_vm_readv` call: large reads run at ~8.5 GB/s,
/// page-sized ones at ~2 GB/s on this machine kind.
pub const READ_CHUNK: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub generation: u32,
}

/// Capture `regions` of the process into the generation file at `path`.
/// `progress(done, total)` is called as bytes are mirrored.
pub fn capture(
    memory: &mut TargetMemory,
    identity: &ProcessIdentity,
    regions: &[RegionSpec],
    path: &Path,
    options: &CaptureOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GenerationHeader, MirrorError> {
    let started = Instant::now();
    let hasher = PageHasher::random();
    let total: u64 = regions.iter().map(RegionSpec::len).sum();
    let mut writer = MirrorWriter::create(path)?;
    let mut hashes: Vec<u128> = Vec::with_capacity((total / PAGE_SIZE as u64) as usize);
    let mut records = Vec::with_capacity(regions.len());
    let mut notes = Vec::new();
    // No larger than the largest region (a module-only capture is a few
    // pages: a whole chunk per target was most of its allocations).
    let largest = regions.iter().map(RegionSpec::len).max().unwrap_or(0);
    let mut buffer = vec![0u8; (largest as usize).min(READ_CHUNK)];
    let mut done = 0u64;
    for spec in regions {
        let first_hash = hashes.len() as u64;
        let data_offset = writer.offset();
        let mut address = spec.start;
        while address < spec.end {
            let len = ((spec.end - address) as usize).min(READ_CHUNK);
            let read = match memory.read_partial(address, &mut buffer[..len]) {
                Ok(n) => n - n % PAGE_SIZE,
                Err(error) => {
                    writer.abandon();
                    return Err(error.into());
                }
            };
            for page in buffer[..read].chunks_exact(PAGE_SIZE) {
                hashes.push(hasher.hash(page));
            }
            if let Err(error) = writer.write_bytes(&buffer[..read]) {
                writer.abandon();
                return Err(error);
            }
            address += read as u64;
            done += read as u64;
            progress(done, total);
            if read < len {
                // A file mapping past the end of its file (or a guard page)
                // cannot be read: mirror the readable prefix and say so.
                notes.push(format!(
                    "{} {:#x}-{:#x}: unreadable from {address:#x}; mirrored the first {} bytes",
                    spec.module,
                    spec.start,
                    spec.end,
                    address - spec.start
                ));
                break;
            }
        }
        let pages = hashes.len() as u64 - first_hash;
        if pages == 0 {
            continue;
        }
        let mut spec = spec.clone();
        spec.end = spec.start + pages * PAGE_SIZE as u64;
        records.push(RegionRecord {
            merkle_root: hex32(&merkle_root(&hashes[first_hash as usize..])),
            spec,
            pages,
            data_offset,
            first_hash,
        });
    }
    progress(total, total);
    let header = GenerationHeader {
        format: FORMAT_VERSION,
        generation: options.generation,
        created_unix_ms: unix_ms(),
        target: TargetRecord::from(identity),
        hash_algorithm: "xxh3-128-keyed".into(),
        hash_secret: encode_secret(hasher.secret()),
        total_bytes: records.iter().map(|r| r.pages * PAGE_SIZE as u64).sum(),
        regions: records,
        hash_section_offset: 0,
        hash_section_digest: String::new(),
        capture_us: started.elapsed().as_micros() as u64,
        notes,
    };
    let header = writer.finish(header, &hashes)?;
    if options.generation == 0 {
        // A baseline starts the state of this program: record which exec it
        // is, so every later command can tell a program that exec'd.
        if let Some(dir) = path.parent() {
            crate::StateDir::record_program(dir, identity).map_err(|source| MirrorError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    Ok(header)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
