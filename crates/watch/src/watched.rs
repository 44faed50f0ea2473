//! What a watcher verifies, keyed with its per-run secret: the regions of
//! the active mirror generation (page hashes re-computed from the stored
//! pages with a key that exists only in the watcher's memory) and the
//! guarded variables (their mirrored bytes, hashed per 4 KiB chunk).
//!
//! Why re-key: the generation file holds its hash key, and the state
//! directory is on disk. A process that can write the target and read that
//! disk could forge a page matching the stored hash; one that can write the
//! target but cannot read the watcher's memory cannot match a per-run key.
//! Stored pages are checked against the file's own hashes while re-keying,
//! so a damaged mirror is refused rather than trusted.

use crate::WatchError;
use shadowpatch_mirror::{CriticalVariable, MirrorError, MirrorFile, PageHasher, RegionSpec, StateDir, PAGE_SIZE};
use shadowpatch_process::ProcessIdentity;
use shadowpatch_symbols::Module;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

/// Live runs already alerted on, per page: (address, live bytes).
pub type Alerted = HashMap<u64, Vec<(u64, Vec<u8>)>>;

/// One mirrored region being verified.
#[derive(Debug)]
pub struct WatchedRegion {
    pub spec: RegionSpec,
    /// Index of the region in the generation file.
    pub index: usize,
    /// Page hashes under the per-run key.
    pub hashes: Vec<u128>,
    /// When each page was last verified clean (ns since the watcher's epoch).
    pub last_clean: Vec<u64>,
    pub alerted: Alerted,
    /// Unmapped (reported once): no longer verified.
    pub gone: bool,
    /// Live permissions last reported as differing from the mirror's.
    pub perms_reported: Option<String>,
}

/// A guarded variable being verified.
#[derive(Debug)]
pub struct WatchedVariable {
    pub variable: CriticalVariable,
    pub expected: Vec<u8>,
    /// Hashes of each 4 KiB chunk (the last may be shorter) under the run key.
    pub hashes: Vec<u128>,
    pub last_clean: Vec<u64>,
    pub alerted: Alerted,
    /// Unreadable (reported once).
    pub unreadable_reported: bool,
}

/// The generation being verified against.
#[derive(Debug)]
pub struct ActiveGeneration {
    pub number: u32,
    pub mirror: MirrorFile,
    pub regions: Vec<WatchedRegion>,
    /// Time to re-hash every stored page with the run key.
    pub rehash_us: u64,
}

impl ActiveGeneration {
    /// Open generation `number` of the target directory `dir`, check it is
    /// of this process incarnation and its modules, and re-key its pages.
    pub fn open(
        dir: &Path,
        number: u32,
        identity: &ProcessIdentity,
        modules: &[Module],
        key: &PageHasher,
    ) -> Result<ActiveGeneration, WatchError> {
        let started = Instant::now();
        let mirror = MirrorFile::open(&StateDir::generation_path(dir, number))?;
        mirror.check_belongs_to(identity, modules)?;
        let mut regions = Vec::with_capacity(mirror.header.regions.len());
        let mut chunk = vec![0u8; 256 * PAGE_SIZE];
        for (index, record) in mirror.header.regions.iter().enumerate() {
            let stored_hashes = mirror.region_hashes(index);
            let mut hashes = Vec::with_capacity(record.pages as usize);
            let mut page = 0u64;
            while page < record.pages {
                let count = (record.pages - page).min(256) as usize;
                let bytes = &mut chunk[..count * PAGE_SIZE];
                mirror
                    .raw_file()
                    .read_exact_at(bytes, record.data_offset + page * PAGE_SIZE as u64)
                    .map_err(|source| MirrorError::Io {
                        path: mirror.path.clone(),
                        source,
                    })?;
                for (i, stored) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                    if mirror.hasher.hash(stored) != stored_hashes[page as usize + i] {
                        return Err(MirrorError::Corrupt {
                            path: mirror.path.clone(),
                            message: format!(
                                "stored page at {:#x} does not match its hash",
                                record.spec.start + (page as usize + i) as u64 * PAGE_SIZE as u64
                            ),
                        }
                        .into());
                    }
                    hashes.push(key.hash(stored));
                }
                page += count as u64;
            }
            regions.push(WatchedRegion {
                spec: record.spec.clone(),
                index,
                last_clean: vec![0; hashes.len()],
                hashes,
                alerted: Alerted::new(),
                gone: false,
                perms_reported: None,
            });
        }
        Ok(ActiveGeneration {
            number,
            mirror,
            regions,
            rehash_us: started.elapsed().as_micros() as u64,
        })
    }

    /// Carry what is known per page over from the previous generation,
    /// for regions that did not move (verification times, alerts).
    pub fn inherit(&mut self, previous: &mut ActiveGeneration) {
        for region in &mut self.regions {
            if let Some(old) = previous
                .regions
                .iter_mut()
                .find(|o| o.spec.start == region.spec.start && o.spec.end == region.spec.end)
            {
                region.last_clean = std::mem::take(&mut old.last_clean);
                region.alerted = std::mem::take(&mut old.alerted);
                region.gone = old.gone;
                region.perms_reported = old.perms_reported.take();
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.spec.len()).sum()
    }

    pub fn pages(&self) -> u64 {
        self.regions.iter().map(|r| r.hashes.len() as u64).sum()
    }
}

/// Chunk size of guarded variables' hashes.
pub const CHUNK: usize = PAGE_SIZE;

impl WatchedVariable {
    pub fn new(variable: CriticalVariable, key: &PageHasher) -> WatchedVariable {
        let expected = variable.guarded_bytes.clone().unwrap_or_default();
        let hashes: Vec<u128> = expected.chunks(CHUNK).map(|c| key.hash(c)).collect();
        WatchedVariable {
            last_clean: vec![0; hashes.len()],
            hashes,
            expected,
            variable,
            alerted: Alerted::new(),
            unreadable_reported: false,
        }
    }
}
