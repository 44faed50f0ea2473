//! The state directory and the on-disk form of a mirror generation.
//!
//! Layout: `STATE/SHADOWPATCH_STATE` (format marker), then
//! `STATE/targets/<pid>-<start_time>/gen-<N>.mirror`, one file per generation:
//!
//! ```text
//! "SHPMIRR1" | page bytes of every region | page hashes (16 B LE each)
//!            | header (JSON) | BLAKE3 of the header (32 B)
//!            | header offset (u64 LE) | "SHPMEND1"
//! ```
//!
//! Bytes come first so capture can stream them; the header, written last,
//! carries the region table, Merkle roots and a BLAKE3 digest of the hash
//! section. Files are written to a temporary name, fsync'd, renamed into
//! place and the directory fsync'd: a crash leaves the old file or the new,
//! never half of one.

use crate::hash::{merkle_root, PageHasher, PAGE_SIZE, SECRET_LEN};
use crate::region::RegionSpec;
use crate::MirrorError;
use shadowpatch_process::ProcessIdentity;
use shadowpatch_symbols::Module;
use shadowpatch_sys::stamp::FileStamp;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MARKER_FILE: &str = "SHADOWPATCH_STATE";
/// The per-exec value of the program a target directory's state
/// describes (`ProcessIdentity::exec_id`): an extended attribute of the
/// directory itself (no file: a host-wide apply creates a thousand target
/// directories, and every file created is an inode to allocate), or, where
/// the file system takes no user attributes (and in state written before
/// the attribute was used), the file `exec-id` in it.
const EXEC_ID_ATTRIBUTE: &str = "user.shadowpatch.exec-id";
const EXEC_ID_FILE: &str = "exec-id";
const MARKER_TEXT: &str = "shadowpatch state directory, format 1\n";
const MAGIC: &[u8; 8] = b"SHPMIRR1";
const END_MAGIC: &[u8; 8] = b"SHPMEND1";
pub const FORMAT_VERSION: u32 = 1;
/// BLAKE3 of the header, header offset, end magic.
const TRAILER_LEN: u64 = 32 + 8 + 8;
/// A header larger than this is corruption, not a real mirror.
const MAX_HEADER_LEN: u64 = 256 << 20;

/// State directories whose marker this process read and found good, with
/// the marker's stamp then (a few: a process uses one state directory, a
/// test run a handful at a time).
struct GoodMarkers(std::sync::Mutex<Vec<(PathBuf, FileStamp)>>);

static GOOD_MARKERS: GoodMarkers = GoodMarkers(std::sync::Mutex::new(Vec::new()));

impl GoodMarkers {
    const CAPACITY: usize = 16;

    fn holds(&self, root: &Path, stamp: FileStamp) -> bool {
        let known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        known.iter().any(|(path, kept)| path == root && *kept == stamp)
    }

    fn keep(&self, root: &Path, stamp: FileStamp) {
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        known.retain(|(path, _)| path != root);
        if known.len() >= Self::CAPACITY {
            known.remove(0);
        }
        known.push((root.to_path_buf(), stamp));
    }
}

/// The state directory: created on first use with a format marker; a
/// non-empty directory without the marker is someone else's and refused.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> MirrorError + '_ {
    move |source| MirrorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl StateDir {
    /// Open for writing, creating the directory (mode 0700) if needed.
    pub fn create(root: &Path) -> Result<Self, MirrorError> {
        // Made already (the common case: a host-wide apply asks twice per
        // member): its marker read alone, not two existence checks first.
        if let Ok(opened) = Self::open(root) {
            return Ok(opened);
        }
        let state = |message: String| MirrorError::StateDir {
            path: root.to_path_buf(),
            message,
        };
        if !root.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|e| state(format!("cannot create it: {e}")))?;
        }
        let marker = root.join(MARKER_FILE);
        if !marker.exists() {
            // The event history may be written before anything else (an
            // analysis, a refused apply): its files do not make the
            // directory someone else's.
            let empty = std::fs::read_dir(root)
                .map_err(|e| state(format!("cannot read it: {e}")))?
                .filter_map(Result::ok)
                .all(|entry| entry.file_name().to_string_lossy().starts_with("history.db"));
            if !empty {
                return Err(state(format!(
                    "not a shadowpatch state directory (it has files but no {MARKER_FILE}); choose an empty or new directory"
                )));
            }
            write_atomically(&marker, MARKER_TEXT.as_bytes())
                .map_err(|e| state(format!("cannot write {MARKER_FILE}: {e}")))?;
        }
        Self::open(root)
    }

    /// Open an existing state directory for reading.
    pub fn open(root: &Path) -> Result<Self, MirrorError> {
        let state = |message: String| MirrorError::StateDir {
            path: root.to_path_buf(),
            message,
        };
        let marker = root.join(MARKER_FILE);
        // A marker read good before and not replaced or rewritten since
        // (same file, size and mtime): its stat alone, not an open and a
        // read (a host-wide apply opens the state directory four times
        // per member). The marker tells a state directory from a mistaken
        // one, which never had it; a same-size rewrite in place within the
        // file system's timestamp granularity is not what it guards.
        let stamp = FileStamp::of(&marker);
        if stamp.is_some_and(|stamp| GOOD_MARKERS.holds(root, stamp)) {
            return Ok(StateDir {
                root: root.to_path_buf(),
            });
        }
        match std::fs::read_to_string(&marker) {
            Ok(text) if text == MARKER_TEXT => {
                // The stamp taken before the read: a marker changed since
                // no longer matches it, and is read again next time.
                if let Some(stamp) = stamp {
                    GOOD_MARKERS.keep(root, stamp);
                }
                Ok(StateDir {
                    root: root.to_path_buf(),
                })
            }
            Ok(_) => Err(state(format!(
                "{MARKER_FILE} names an unknown format; written by another version?"
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !root.exists() => {
                Err(state("does not exist (nothing has been mirrored here yet)".into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(state(format!("not a shadowpatch state directory (no {MARKER_FILE})")))
            }
            Err(e) => Err(state(format!("cannot read {MARKER_FILE}: {e}"))),
        }
    }

    /// Open for reading if anything was ever stored there: `None` for a
    /// missing or empty directory, an error for a foreign or corrupt one.
    pub fn open_if_present(root: &Path) -> Result<Option<Self>, MirrorError> {
        // Its marker first: a state directory in use is read once, not
        // stat'ed and listed before (a host-wide apply asks about five
        // times per member). Only without a good marker does it matter
        // whether the directory is missing or empty.
        match Self::open(root) {
            Ok(opened) => Ok(Some(opened)),
            Err(_) if !root.exists() || is_empty_dir(root) => Ok(None),
            Err(error) => Err(error),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of one process incarnation.
    pub fn target_dir(&self, pid: i32, start_time: u64) -> PathBuf {
        self.root.join("targets").join(format!("{pid}-{start_time}"))
    }

    /// Every incarnation of `pid` with state here, as (start time, dir).
    pub fn incarnations(&self, pid: i32) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("targets")) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .filter_map(|e| {
                let entry = e.ok()?;
                let name = entry.file_name().into_string().ok()?;
                let (p, start) = name.split_once('-')?;
                (p.parse::<i32>().ok()? == pid).then_some((start.parse().ok()?, entry.path()))
            })
            .collect();
        found.sort();
        found
    }

    /// Generation numbers present in a target directory, ascending.
    pub fn generations(dir: &Path) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut numbers: Vec<u32> = entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix("gen-")?.strip_suffix(".mirror")?.parse().ok()
            })
            .collect();
        numbers.sort();
        numbers
    }

    /// Refuse the state in target directory `dir` when the live process
    /// `identity` has exec'd since it was recorded: pid and start time
    /// stay across `exec`, the program does not. State written before the
    /// per-exec value existed gets the live value recorded on first use.
    pub fn check_same_program(dir: &Path, identity: &ProcessIdentity) -> Result<(), MirrorError> {
        let Some(live) = &identity.exec_id else {
            return Ok(());
        };
        match Self::recorded_program(dir) {
            Ok(Some(recorded)) if recorded == *live => Ok(()),
            Ok(Some(_)) => Err(MirrorError::Target(shadowpatch_process::TargetError::Execd {
                pid: identity.pid,
                since: format!("its state in {} was recorded", dir.display()),
            })),
            Ok(None) => {
                // Best effort: a read-only state directory is still readable.
                let _ = Self::record_program(dir, identity);
                Ok(())
            }
            Err(e) => Err(MirrorError::Io {
                path: dir.join(EXEC_ID_FILE),
                source: e,
            }),
        }
    }

    /// The exec id the state in target directory `dir` records: its
    /// attribute, else its `exec-id` file (`None`: neither, or no such
    /// directory).
    pub fn recorded_program(dir: &Path) -> std::io::Result<Option<String>> {
        let mut value = [0u8; 128];
        match rustix::fs::getxattr(dir, EXEC_ID_ATTRIBUTE, &mut value[..]) {
            Ok(len) => return Ok(Some(String::from_utf8_lossy(&value[..len]).trim().to_string())),
            // No attribute (a file, or nothing, recorded it), or a file
            // system without user attributes.
            Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => {}
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(errno) => return Err(errno.into()),
        }
        match std::fs::read_to_string(dir.join(EXEC_ID_FILE)) {
            Ok(recorded) => Ok(Some(recorded.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Before starting state for the live process `identity` in `dir`: if
    /// the state there is of the program it ran before an `exec`, move it
    /// aside (`<dir>.exec-<unix ms>`, which no lookup matches: kept for
    /// inspection, like a dead target's) and return where it went.
    pub fn set_aside_if_execd(dir: &Path, identity: &ProcessIdentity) -> Result<Option<PathBuf>, MirrorError> {
        match Self::check_same_program(dir, identity) {
            Err(MirrorError::Target(shadowpatch_process::TargetError::Execd { .. })) => {
                let mut name = dir.file_name().unwrap_or_default().to_os_string();
                name.push(format!(".exec-{}", crate::capture::unix_ms()));
                let aside = dir.with_file_name(name);
                std::fs::rename(dir, &aside)
                    .and_then(|_| sync_parent(dir))
                    .map_err(io_error(dir))?;
                Ok(Some(aside))
            }
            other => other.map(|_| None),
        }
    }

    /// Record which program (exec) the state in `dir` describes: as the
    /// directory's attribute, made durable as a directory entry is (the
    /// directory's fsync, or the batch's sync), or as the `exec-id` file
    /// where the file system takes no user attributes.
    pub fn record_program(dir: &Path, identity: &ProcessIdentity) -> std::io::Result<()> {
        let Some(id) = &identity.exec_id else {
            return Ok(());
        };
        if !dir.is_dir() {
            return Ok(());
        }
        // Recorded already (opening the target directory does it before a
        // first capture): not rewritten, fsyncs and all.
        if Self::recorded_program(dir)?.as_deref() == Some(id.as_str()) {
            return Ok(());
        }
        Self::write_program_record(dir, id, true)
    }

    /// Write exec id `id` as `dir`'s attribute (an `exec-id` file left by
    /// an earlier version removed when `old_file_possible`), or as the file
    /// where the file system takes no user attributes.
    fn write_program_record(dir: &Path, id: &str, old_file_possible: bool) -> std::io::Result<()> {
        match rustix::fs::setxattr(dir, EXEC_ID_ATTRIBUTE, id.as_bytes(), rustix::fs::XattrFlags::empty()) {
            Ok(()) => {
                // A file left by an earlier version would be read after a
                // lost attribute only: removed, so no reader can see it.
                if old_file_possible {
                    match std::fs::remove_file(dir.join(EXEC_ID_FILE)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                shadowpatch_process::durable::sync_dir(dir)
            }
            // A file system that refuses the attribute (EOPNOTSUPP, or
            // EPERM, ENOSPC... from one that limits user attributes) still
            // takes the file, as before the attribute existed.
            Err(_) => write_atomically(&dir.join(EXEC_ID_FILE), format!("{id}\n").as_bytes()),
        }
    }

    /// [`Self::record_program`] for a target directory just made (empty:
    /// nothing recorded there to read first or file to remove).
    pub fn record_program_in_new(dir: &Path, identity: &ProcessIdentity) -> std::io::Result<()> {
        match &identity.exec_id {
            Some(id) => Self::write_program_record(dir, id, false),
            None => Ok(()),
        }
    }

    /// Whether the state in `dir` (named `<pid>-<start_time>`) describes a
    /// process alive now: same pid, start time and program.
    pub fn describes_live(dir: &Path, pid: i32, start_time: u64) -> bool {
        ProcessIdentity::of(pid).is_ok_and(|identity| {
            identity.start_time == start_time
                && match (&identity.exec_id, Self::recorded_program(dir)) {
                    (Some(live), Ok(Some(recorded))) => recorded == *live,
                    _ => true,
                }
        })
    }

    pub fn generation_path(dir: &Path, generation: u32) -> PathBuf {
        dir.join(format!("gen-{generation:06}.mirror"))
    }

    /// The mirror directory of the live process `identity`, refusing state
    /// that belongs to another incarnation of the same pid, or to the
    /// program it ran before an `exec`.
    pub fn dir_for_live(&self, identity: &ProcessIdentity) -> Result<PathBuf, MirrorError> {
        // This incarnation's own directory, looked up by name: listing
        // `targets/` (thousands of entries after a host-wide apply) is
        // only for naming another incarnation or none.
        let dir = self.target_dir(identity.pid, identity.start_time);
        if dir.is_dir() {
            Self::check_same_program(&dir, identity)?;
            return Ok(dir);
        }
        let incarnations = self.incarnations(identity.pid);
        if let Some((_, dir)) = incarnations.iter().find(|(start, _)| *start == identity.start_time) {
            Self::check_same_program(dir, identity)?;
            return Ok(dir.clone());
        }
        match incarnations.last() {
            Some((start, dir)) => Err(MirrorError::OtherIncarnation {
                path: dir.clone(),
                pid: identity.pid,
                mirrored_start_time: *start,
                live_start_time: identity.start_time,
            }),
            None => Err(MirrorError::NoMirror {
                pid: identity.pid,
                state_dir: self.root.clone(),
            }),
        }
    }
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

/// Write `bytes` to `path` atomically: temporary file, fsync, rename, fsync dir.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = temporary_name(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    let result = file
        .write_all(bytes)
        .and_then(|_| shadowpatch_process::durable::sync_file(&file));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    std::fs::rename(&temporary, path)?;
    sync_parent(path)
}

fn temporary_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => shadowpatch_process::durable::sync_dir(parent),
        None => Ok(()),
    }
}

/// Who was mirrored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TargetRecord {
    pub pid: i32,
    pub start_time: u64,
    pub comm: String,
    pub exe: Option<PathBuf>,
    /// The program's per-exec value (absent in files written before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<String>,
}

impl From<&ProcessIdentity> for TargetRecord {
    fn from(identity: &ProcessIdentity) -> Self {
        TargetRecord {
            pid: identity.pid,
            start_time: identity.start_time,
            comm: identity.comm.clone(),
            exe: identity.exe.clone(),
            exec_id: identity.exec_id.clone(),
        }
    }
}

/// One region of a generation on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionRecord {
    #[serde(flatten)]
    pub spec: RegionSpec,
    pub pages: u64,
    /// File offset of the region's first page of bytes.
    pub data_offset: u64,
    /// Index of the region's first page hash in the hash section.
    pub first_hash: u64,
    pub merkle_root: String,
}

/// The JSON header of a generation file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerationHeader {
    pub format: u32,
    pub generation: u32,
    pub created_unix_ms: u64,
    pub target: TargetRecord,
    pub hash_algorithm: String,
    /// Hex of the XXH3 secret; the file is mode 0600 in a 0700 directory.
    pub hash_secret: String,
    pub regions: Vec<RegionRecord>,
    pub hash_section_offset: u64,
    pub hash_section_digest: String,
    pub total_bytes: u64,
    pub capture_us: u64,
    /// Mappings passed over at capture time, with why.
    pub notes: Vec<String>,
}

/// Streams a generation file: bytes region by region, then the finish.
#[derive(Debug)]
pub struct MirrorWriter {
    path: PathBuf,
    temporary: PathBuf,
    out: BufWriter<File>,
    offset: u64,
}

impl MirrorWriter {
    pub fn create(path: &Path) -> Result<Self, MirrorError> {
        let temporary = temporary_name(path);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_error(path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC).map_err(io_error(&temporary))?;
        Ok(MirrorWriter {
            path: path.to_path_buf(),
            temporary,
            out,
            offset: MAGIC.len() as u64,
        })
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), MirrorError> {
        self.out.write_all(bytes).map_err(io_error(&self.temporary))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Write hashes and header, fsync, and rename into place.
    pub fn finish(mut self, mut header: GenerationHeader, hashes: &[u128]) -> Result<GenerationHeader, MirrorError> {
        let mut hash_bytes = Vec::with_capacity(hashes.len() * 16);
        for hash in hashes {
            hash_bytes.extend_from_slice(&hash.to_le_bytes());
        }
        header.hash_section_offset = self.offset;
        header.hash_section_digest = blake3::hash(&hash_bytes).to_hex().to_string();
        let json = serde_json::to_vec(&header).expect("header serializes");
        let header_offset = self.offset + hash_bytes.len() as u64;
        let result = (|| {
            self.out.write_all(&hash_bytes)?;
            self.out.write_all(&json)?;
            self.out.write_all(blake3::hash(&json).as_bytes())?;
            self.out.write_all(&header_offset.to_le_bytes())?;
            self.out.write_all(END_MAGIC)?;
            self.out.flush()?;
            shadowpatch_process::durable::sync_file(self.out.get_ref())
        })();
        if let Err(source) = result {
            let _ = std::fs::remove_file(&self.temporary);
            return Err(MirrorError::Io {
                path: self.temporary.clone(),
                source,
            });
        }
        std::fs::rename(&self.temporary, &self.path).map_err(io_error(&self.path))?;
        sync_parent(&self.path).map_err(io_error(&self.path))?;
        Ok(header)
    }

    /// Drop the temporary file (capture failed).
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.temporary);
    }
}

/// A generation file opened for verification: header and hashes in memory,
/// page bytes read on demand.
#[derive(Debug)]
pub struct MirrorFile {
    pub path: PathBuf,
    file: File,
    pub header: GenerationHeader,
    /// All page hashes, regions back to back (see `RegionRecord::first_hash`).
    pub hashes: Vec<u128>,
    pub hasher: PageHasher,
}

impl MirrorFile {
    pub fn open(path: &Path) -> Result<Self, MirrorError> {
        let corrupt = |message: String| MirrorError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let mut file = File::open(path).map_err(io_error(path))?;
        let len = file.metadata().map_err(io_error(path))?.len();
        if len < 8 + TRAILER_LEN {
            return Err(corrupt(format!("{len} bytes is too short for a mirror")));
        }
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic).map_err(io_error(path))?;
        if &magic != MAGIC {
            return Err(corrupt("bad magic (not a shadowpatch mirror)".into()));
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        file.read_exact_at(&mut trailer, len - TRAILER_LEN)
            .map_err(io_error(path))?;
        if &trailer[40..] != END_MAGIC {
            return Err(corrupt("bad end marker (truncated?)".into()));
        }
        let header_offset = u64::from_le_bytes(trailer[32..40].try_into().expect("8 bytes"));
        let header_end = len - TRAILER_LEN;
        if header_offset < 8 || header_offset > header_end || header_end - header_offset > MAX_HEADER_LEN {
            return Err(corrupt(format!("header offset {header_offset} out of range")));
        }
        let mut json = vec![0u8; (header_end - header_offset) as usize];
        file.read_exact_at(&mut json, header_offset).map_err(io_error(path))?;
        if blake3::hash(&json).as_bytes() != &trailer[..32] {
            return Err(corrupt("header does not match its digest".into()));
        }
        let header: GenerationHeader =
            serde_json::from_slice(&json).map_err(|e| corrupt(format!("header is not valid: {e}")))?;
        if header.format != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format {} is not supported (expected {FORMAT_VERSION})",
                header.format
            )));
        }
        // Checked sums: the counts are the file's word, and an overflow
        // must read as damage, not panic or wrap into a match.
        let hash_section_len = header
            .regions
            .iter()
            .try_fold(0u64, |pages, region| pages.checked_add(region.pages))
            .and_then(|pages| pages.checked_mul(16));
        if hash_section_len.and_then(|len| header.hash_section_offset.checked_add(len)) != Some(header_offset) {
            return Err(corrupt("hash section does not match the region table".into()));
        }
        let mut hash_bytes = vec![0u8; (header_offset - header.hash_section_offset) as usize];
        file.seek(SeekFrom::Start(header.hash_section_offset))
            .map_err(io_error(path))?;
        file.read_exact(&mut hash_bytes).map_err(io_error(path))?;
        if blake3::hash(&hash_bytes).to_hex().as_str() != header.hash_section_digest {
            return Err(corrupt("page hashes do not match their digest".into()));
        }
        let hashes: Vec<u128> = hash_bytes
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
            .collect();
        for region in &header.regions {
            let pages = region
                .first_hash
                .checked_add(region.pages)
                .and_then(|end| hashes.get(usize::try_from(region.first_hash).ok()?..usize::try_from(end).ok()?))
                .ok_or_else(|| corrupt("region hash range out of bounds".into()))?;
            if hex32(&merkle_root(pages)) != region.merkle_root {
                return Err(corrupt(format!(
                    "Merkle root of region {:#x} does not match",
                    region.spec.start
                )));
            }
            let data_end = region
                .pages
                .checked_mul(PAGE_SIZE as u64)
                .and_then(|len| region.data_offset.checked_add(len));
            if data_end.is_none_or(|end| end > header.hash_section_offset) {
                return Err(corrupt(format!(
                    "bytes of region {:#x} out of bounds",
                    region.spec.start
                )));
            }
        }
        let secret = decode_secret(&header.hash_secret).ok_or_else(|| corrupt("hash secret is not valid".into()))?;
        Ok(MirrorFile {
            path: path.to_path_buf(),
            file,
            header,
            hashes,
            hasher: PageHasher::from_secret(secret),
        })
    }

    /// Refuse a mirror of another incarnation of the pid (recycled) or of
    /// modules whose build-id changed since it was taken.
    pub fn check_belongs_to(&self, identity: &ProcessIdentity, modules: &[Module]) -> Result<(), MirrorError> {
        let recorded = &self.header.target;
        if recorded.pid != identity.pid || recorded.start_time != identity.start_time {
            return Err(MirrorError::OtherIncarnation {
                path: self.path.clone(),
                pid: identity.pid,
                mirrored_start_time: recorded.start_time,
                live_start_time: identity.start_time,
            });
        }
        if let (Some(mirrored), Some(live)) = (&recorded.exec_id, &identity.exec_id) {
            if mirrored != live {
                return Err(MirrorError::Target(shadowpatch_process::TargetError::Execd {
                    pid: identity.pid,
                    since: format!("mirror {} was taken", self.path.display()),
                }));
            }
        }
        for region in &self.header.regions {
            let (Some(path), Some(mirrored)) = (&region.spec.path, &region.spec.build_id) else {
                continue;
            };
            if let Some(live) = modules
                .iter()
                .find(|m| &m.path == path && m.contains(region.spec.start))
            {
                let live_id = live.build_id_hex().unwrap_or_else(|| "none".into());
                if &live_id != mirrored {
                    return Err(MirrorError::ModuleChanged {
                        path: self.path.clone(),
                        module: live.name.clone(),
                        mirrored: mirrored.clone(),
                        live: live_id,
                    });
                }
            }
        }
        Ok(())
    }

    /// The stored bytes of one page, checked against its hash.
    pub fn read_page(&self, region_index: usize, page_index: u64) -> Result<Vec<u8>, MirrorError> {
        let region = &self.header.regions[region_index];
        let mut page = vec![0u8; PAGE_SIZE];
        self.file
            .read_exact_at(&mut page, region.data_offset + page_index * PAGE_SIZE as u64)
            .map_err(io_error(&self.path))?;
        if self.hasher.hash(&page) != self.hashes[(region.first_hash + page_index) as usize] {
            return Err(MirrorError::Corrupt {
                path: self.path.clone(),
                message: format!(
                    "stored page at {:#x} does not match its hash",
                    region.spec.start.wrapping_add(page_index * 4096)
                ),
            });
        }
        Ok(page)
    }

    /// The stored bytes of `[address, address + len)`, each page they touch
    /// checked against its hash; `None` when no one region holds them all.
    pub fn stored_bytes(&self, address: u64, len: usize) -> Result<Option<Vec<u8>>, MirrorError> {
        let Some(end) = address.checked_add(len as u64) else {
            return Ok(None);
        };
        // A region's end as the header says, saturated: the header is the
        // file's word (its offsets were checked on open, not its addresses).
        let region_end = |r: &RegionRecord| r.spec.start.saturating_add(r.pages.saturating_mul(PAGE_SIZE as u64));
        let Some(index) = self
            .header
            .regions
            .iter()
            .position(|r| r.spec.start <= address && end <= region_end(r))
        else {
            return Ok(None);
        };
        let start = self.header.regions[index].spec.start;
        let mut bytes = Vec::with_capacity(len);
        let mut at = address;
        while at < end {
            let page_index = (at - start) / PAGE_SIZE as u64;
            let page = self.read_page(index, page_index)?;
            let page_start = start + page_index * PAGE_SIZE as u64;
            let from = (at - page_start) as usize;
            let to = ((end - page_start) as usize).min(PAGE_SIZE);
            bytes.extend_from_slice(&page[from..to]);
            at = page_start + to as u64;
        }
        Ok(Some(bytes))
    }

    /// The open file, for bulk reads of stored pages.
    pub fn raw_file(&self) -> &File {
        &self.file
    }

    /// Page hashes of region `index`.
    pub fn region_hashes(&self, index: usize) -> &[u128] {
        let region = &self.header.regions[index];
        &self.hashes[region.first_hash as usize..(region.first_hash + region.pages) as usize]
    }
}

pub fn hex32(bytes: &[u8; 32]) -> String {
    shadowpatch_symbols::hex(bytes)
}

pub fn encode_secret(secret: &[u8; SECRET_LEN]) -> String {
    shadowpatch_symbols::hex(secret)
}

fn decode_secret(text: &str) -> Option<[u8; SECRET_LEN]> {
    if text.len() != SECRET_LEN * 2 {
        return None;
    }
    let mut secret = [0u8; SECRET_LEN];
    for (i, byte) in secret.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A marker read good is not read again while unchanged, but one
    /// rewritten (another format) or removed since is noticed at once.
    #[test]
    fn a_marker_changed_after_a_good_read_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        StateDir::create(&root).unwrap();
        StateDir::open(&root).unwrap();
        StateDir::open(&root).unwrap();
        let marker = root.join(MARKER_FILE);
        // Replaced as the tool writes it (a new file renamed over it).
        let other = root.join("marker.new");
        std::fs::write(&other, "shadowpatch state directory, format 9\n").unwrap();
        std::fs::rename(&other, &marker).unwrap();
        let error = StateDir::open(&root).unwrap_err().to_string();
        assert!(error.contains("unknown format"), "{error}");
        std::fs::remove_file(&marker).unwrap();
        let error = StateDir::open(&root).unwrap_err().to_string();
        assert!(error.contains("no SHADOWPATCH_STATE"), "{error}");
        std::fs::write(&marker, MARKER_TEXT).unwrap();
        StateDir::open(&root).unwrap();
    }

    /// Read marker first or not, the answers are those of a directory
    /// looked at before its marker: missing or empty is nothing stored,
    /// someone else's files or an unknown format are errors.
    #[test]
    fn open_if_present_and_create_tell_each_kind_of_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(StateDir::open_if_present(&missing).unwrap().is_none());
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(StateDir::open_if_present(&empty).unwrap().is_none());
        let foreign = dir.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
        assert!(StateDir::open_if_present(&foreign).is_err());
        assert!(StateDir::create(&foreign).is_err());
        assert!(!foreign.join(MARKER_FILE).exists(), "nothing written into it");
        let other_format = dir.path().join("other-format");
        std::fs::create_dir(&other_format).unwrap();
        std::fs::write(other_format.join(MARKER_FILE), "format 99\n").unwrap();
        assert!(StateDir::open_if_present(&other_format).is_err());
        assert!(StateDir::create(&other_format).is_err());

        let made = StateDir::create(&missing).unwrap();
        assert_eq!(made.root(), missing);
        assert!(StateDir::open_if_present(&missing).unwrap().is_some());
        assert!(StateDir::create(&missing).is_ok(), "made already");
        StateDir::create(&empty).unwrap();
        assert_eq!(std::fs::read_to_string(empty.join(MARKER_FILE)).unwrap(), MARKER_TEXT);
    }
}
