//! The patch journal: an append-only file of records per target
//! incarnation (`targets/<pid>-<start>/journal`), each line fsync'd before
//! the step it announces touches the target. Replaying it gives the active
//! patches and, after a crash, the one transaction left incomplete, with
//! every address, original byte and new byte needed to finish or undo it.
//!
//! A line is `<checksum> <json>\n`: the checksum (the first 8 bytes of the
//! BLAKE3 of the JSON, in hex) makes every record check itself, so a write
//! cut short or a damaged byte is found, never acted on. Lines written
//! before checksums existed (plain `{...}` JSON) are still read, until the
//! first checksummed line: after it an unchecked line is damage.
//!
//! Damage is told apart by where it is. The last record, torn (no newline)
//! or failing its checksum, is what a crash leaves: replay ignores it, and
//! the next writer (under the target lock) copies it to
//! `journal.torn-<unix ms>` for inspection and truncates the journal to its
//! last intact record before appending anything. Damage before the last
//! record is not a crash's doing: replay refuses it, naming file and line.

use crate::trampoline::FunctionSite;
use crate::PatchError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Hex digits of a line's checksum.
const CHECKSUM_HEX_LEN: usize = 16;

/// One trampoline write: what was there, what we put there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Write5 {
    pub address: u64,
    #[serde(with = "hex_bytes")]
    pub original: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub new: Vec<u8>,
}

/// A replaced function within an applied patch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PatchedFunction {
    pub site: FunctionSite,
    /// The function in the patch object that now runs instead.
    pub with: String,
    pub new_address: u64,
    pub write: Write5,
    /// Registers a thunk preserves around the new function, when the new
    /// function changes registers the original left alone (see `clobber`).
    #[serde(default)]
    pub preserved: Option<String>,
    /// While watched (`apply --watch`): the entry stub the trampoline goes
    /// through, and where it will jump straight to after a keep verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_stub: Option<WatchStubSite>,
}

/// A watched function's entry stub (`watchstub.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchStubSite {
    pub stub: u64,
    /// The new function, or its thunk: the direct jump's destination.
    pub direct: u64,
    /// The stub's call counter (8 bytes, in the patch's writable page);
    /// absent in records written before stubs counted calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<u64>,
}

/// Everything known about an applied patch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PatchRecord {
    pub id: String,
    pub generation: u32,
    pub manifest: PathBuf,
    pub object: PathBuf,
    pub module: String,
    pub build_id: String,
    pub mapping_address: u64,
    pub mapping_len: u64,
    pub functions: Vec<PatchedFunction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnKind {
    Apply,
    Rollback,
    /// Mirrored bytes written back over tampered immutable bytes.
    Heal,
    /// Temporary breakpoints (simulation capture); always undone.
    Probe,
    /// An active patch's entry bytes changed (e.g. watch-window stub →
    /// direct jump); the patch stays active.
    Repoint,
}

impl TxnKind {
    /// Whether this kind carries a `Writes` record (rather than a patch plan).
    pub fn is_plain_writes(self) -> bool {
        matches!(self, TxnKind::Heal | TxnKind::Probe | TxnKind::Repoint)
    }

    /// What `recover` does with an interrupted transaction of this kind once
    /// its writes were announced: finish it (heal, repoint: the new bytes are
    /// the correct ones) or undo it (probe: breakpoints never stay).
    pub fn completes_on_recover(self) -> bool {
        matches!(self, TxnKind::Heal | TxnKind::Repoint)
    }
}

/// A journal line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// A transaction starts.
    Begin {
        txn: u64,
        kind: TxnKind,
        patch_id: String,
        pid: i32,
        start_time: u64,
        unix_ms: u64,
        /// `CLOCK_BOOTTIME` in ns when the record was written (the clock of
        /// a process's start time in /proc/PID/stat): with the commit's,
        /// it brackets when the transaction's writes reached the target,
        /// which fork adoption compares with a child's start time. Absent
        /// in records written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_ns: Option<u64>,
    },
    /// About to map `len` bytes at `address` (written before the mmap).
    Map { txn: u64, address: u64, len: u64 },
    /// About to write these trampolines (written before the first write).
    Plan { txn: u64, patch: PatchRecord },
    /// About to make these writes (heal, probe, repoint), before the first.
    /// Inside an apply: writes held only while it runs (the safe-point
    /// request word), undone before its commit or abort. For a repoint, `patch_id` names the active patch whose entries get
    /// the new bytes at commit (their `original` stays the function's own).
    Writes {
        txn: u64,
        writes: Vec<Write5>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        patch_id: Option<String>,
    },
    /// The mapping at `address` was unmapped.
    Unmap { txn: u64, address: u64, len: u64 },
    /// The mapping was left in place (a thread might still use it).
    Retire {
        txn: u64,
        address: u64,
        len: u64,
        reason: String,
    },
    /// The transaction took full effect.
    Commit {
        txn: u64,
        pause_us: u64,
        /// `CLOCK_BOOTTIME` in ns when the commit was written (see `Begin`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_ns: Option<u64>,
    },
    /// The transaction was undone; the target is as before it.
    Abort { txn: u64, reason: String },
}

impl Record {
    pub fn txn(&self) -> u64 {
        match self {
            Record::Begin { txn, .. }
            | Record::Map { txn, .. }
            | Record::Plan { txn, .. }
            | Record::Writes { txn, .. }
            | Record::Unmap { txn, .. }
            | Record::Retire { txn, .. }
            | Record::Commit { txn, .. }
            | Record::Abort { txn, .. } => *txn,
        }
    }
}

/// A transaction that has begun but neither committed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTxn {
    pub txn: u64,
    pub kind: TxnKind,
    pub patch_id: String,
    pub mapping: Option<(u64, u64)>,
    pub plan: Option<PatchRecord>,
    /// The announced writes of a heal, probe or repoint, or the writes an
    /// apply holds while it runs.
    pub writes: Option<Vec<Write5>>,
    /// The patch a repoint changes.
    pub writes_patch: Option<String>,
}

impl OpenTxn {
    /// Every write this transaction announced (trampolines of a plan, or
    /// plain writes): what the target may hold besides the active state.
    pub fn announced_writes(&self) -> Vec<Write5> {
        let mut all: Vec<Write5> = self
            .plan
            .iter()
            .flat_map(|p| p.functions.iter().map(|f| f.write.clone()))
            .collect();
        all.extend(self.writes.iter().flatten().cloned());
        all
    }
}

/// The journal replayed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalState {
    /// Active patches, oldest first.
    pub active: Vec<PatchRecord>,
    pub open: Option<OpenTxn>,
    pub next_txn: u64,
    /// Mappings left in place by rollbacks.
    pub retired: Vec<(u64, u64)>,
    /// The last record, torn or damaged, that replay left out.
    pub torn_tail: Option<TornTail>,
}

/// The end of a journal that replay left out: a record cut short by a
/// crash (no newline) or a last record that fails its checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Length of the journal up to the end of its last intact record.
    pub intact_len: u64,
    /// Length of the whole journal as read.
    pub total_len: u64,
    /// The tail's line number (1-based).
    pub line: usize,
    pub why: String,
}

/// Why one line is not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineDamage {
    /// The checksum does not match the JSON after it.
    Checksum { stored: String, computed: String },
    /// No checksum where one is required (after a checksummed line).
    Unchecked,
    /// The checksum matches (or there is none) but the JSON is no record.
    NotARecord(String),
}

impl std::fmt::Display for LineDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineDamage::Checksum { stored, computed } => {
                write!(f, "checksum {stored} does not match its record (computed {computed})")
            }
            LineDamage::Unchecked => write!(f, "no checksum, though earlier records have one"),
            LineDamage::NotARecord(message) => write!(f, "not a record: {message}"),
        }
    }
}

/// The checksum of a record's JSON bytes, as written before it.
pub fn checksum(json: &[u8]) -> String {
    shadowpatch_symbols::hex(&blake3::hash(json).as_bytes()[..CHECKSUM_HEX_LEN / 2])
}

/// One journal line (without its newline) for `record`.
pub fn encode_line(record: &Record) -> Vec<u8> {
    let json = serde_json::to_vec(record).expect("records serialize");
    let mut line = checksum(&json).into_bytes();
    line.push(b' ');
    line.extend_from_slice(&json);
    line
}

/// Read one journal line (without its newline): the record, and whether it
/// carried a checksum. `checked_before`: an earlier line had one, so this
/// one must too.
pub fn decode_line(line: &[u8], checked_before: bool) -> Result<(Record, bool), LineDamage> {
    let (json, checked) = if line.first() == Some(&b'{') {
        if checked_before {
            return Err(LineDamage::Unchecked);
        }
        (line, false)
    } else {
        let (stored, json) = match line.iter().position(|b| *b == b' ') {
            Some(space) => (&line[..space], &line[space + 1..]),
            None => (line, &line[line.len()..]),
        };
        let computed = checksum(json);
        if stored != computed.as_bytes() {
            return Err(LineDamage::Checksum {
                stored: String::from_utf8_lossy(stored)
                    .chars()
                    .take(CHECKSUM_HEX_LEN + 4)
                    .collect(),
                computed,
            });
        }
        (json, true)
    };
    let record = serde_json::from_slice(json).map_err(|e| LineDamage::NotARecord(e.to_string()))?;
    Ok((record, checked))
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Length of the journal: where the next record starts. A failed
    /// append truncates back to it, so no record follows torn bytes.
    len: u64,
}

impl Journal {
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("journal")
    }

    /// Open (creating) the journal in a target directory for appending,
    /// `replayed` being what `replay` just read of it. The caller holds the
    /// target lock (no other writer), so a torn tail is a crash's leftover:
    /// it is copied to `journal.torn-<unix ms>` and cut off first. Returns
    /// the journal and where the tail was kept.
    pub fn open(dir: &Path, replayed: &JournalState) -> Result<(Self, Option<PathBuf>), PatchError> {
        let path = Self::path_in(dir);
        let error = |e: std::io::Error| PatchError::Journal {
            path: path.clone(),
            message: e.to_string(),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&path)
            .map_err(error)?;
        let mut len = file.metadata().map_err(error)?.len();
        let mut kept = None;
        if let Some(tail) = &replayed.torn_tail {
            if len < tail.intact_len {
                return Err(PatchError::Journal {
                    path: path.clone(),
                    message: format!(
                        "shrank to {len} bytes since it was read ({} intact): another writer?",
                        tail.intact_len
                    ),
                });
            }
            let mut torn = vec![0u8; (len - tail.intact_len) as usize];
            file.read_exact_at(&mut torn, tail.intact_len).map_err(error)?;
            let aside = dir.join(format!("journal.torn-{}", crate::state::now_ms()));
            write_new_durably(&aside, &torn).map_err(|e| PatchError::Journal {
                path: aside.clone(),
                message: format!("keeping the torn end of the journal: {e}"),
            })?;
            file.set_len(tail.intact_len).map_err(error)?;
            file.sync_all().map_err(error)?;
            tracing::warn!(
                journal = %path.display(),
                line = tail.line,
                kept = %aside.display(),
                "journal: set aside a torn last record ({}) and truncated to the last intact one",
                tail.why
            );
            len = tail.intact_len;
            kept = Some(aside);
        }
        Ok((Journal { path, file, len }, kept))
    }

    /// Append one record and make it durable before returning (inside a
    /// batch: before the thread's next stop or write of a target).
    pub fn append(&mut self, record: &Record) -> Result<(), PatchError> {
        let mut line = encode_line(record);
        line.push(b'\n');
        let error = |e: std::io::Error| PatchError::Journal {
            path: self.path.clone(),
            message: e.to_string(),
        };
        // Durable now, or (inside a batch) before this thread next stops or
        // writes a target (`durable`).
        let written = self
            .file
            .write_all(&line)
            .and_then(|_| shadowpatch_process::durable::sync_data(&self.file));
        if let Err(e) = written {
            // Cut off whatever part of the line reached the file: the next
            // record must not follow torn bytes.
            let _ = self.file.set_len(self.len);
            let _ = self.file.sync_data();
            return Err(error(e));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Replay the journal at `dir` (an absent journal is an empty one).
    pub fn replay(dir: &Path) -> Result<JournalState, PatchError> {
        let path = Self::path_in(dir);
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(JournalState::default()),
            Err(e) => {
                return Err(PatchError::Journal {
                    path,
                    message: e.to_string(),
                })
            }
        };
        replay_bytes(&path, &text)
    }
}

/// `CLOCK_BOOTTIME` now, in ns: the clock of process start times
/// (/proc/PID/stat field 22, in clock ticks), stamped on `Begin` and
/// `Commit` so a child's fork can be placed among transactions.
pub fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The patch state after one settled transaction (or at the start), with
/// when that transaction ran: what a process forked from the target at
/// some instant may hold (see `ops::adopt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The transaction that led here (`None`: the journal's start).
    pub txn: Option<u64>,
    /// `Begin`'s and `Commit`'s `boot_ns`, when recorded.
    pub begin_boot_ns: Option<u64>,
    pub commit_boot_ns: Option<u64>,
    /// Active patches after it, oldest first.
    pub active: Vec<PatchRecord>,
    /// Mappings left in place by rollbacks, after it.
    pub retired: Vec<(u64, u64)>,
}

impl Journal {
    /// The state at the journal's start and after each committed
    /// transaction, in order, with the final state (whose `open` tells
    /// whether a transaction is in flight or was interrupted).
    pub fn checkpoints(dir: &Path) -> Result<(Vec<Checkpoint>, JournalState), PatchError> {
        let path = Self::path_in(dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(PatchError::Journal {
                    path,
                    message: e.to_string(),
                })
            }
        };
        let mut checkpoints = vec![Checkpoint {
            txn: None,
            begin_boot_ns: None,
            commit_boot_ns: None,
            active: Vec::new(),
            retired: Vec::new(),
        }];
        let mut begun: Option<(u64, Option<u64>)> = None;
        let state = replay_bytes_with(&path, &bytes, &mut |record, state| match record {
            Record::Begin { txn, boot_ns, .. } => begun = Some((*txn, *boot_ns)),
            Record::Commit { txn, boot_ns, .. } => checkpoints.push(Checkpoint {
                txn: Some(*txn),
                begin_boot_ns: begun.filter(|(t, _)| t == txn).and_then(|(_, b)| b),
                commit_boot_ns: *boot_ns,
                active: state.active.clone(),
                retired: state.retired.clone(),
            }),
            _ => {}
        })?;
        Ok((checkpoints, state))
    }
}

/// Replay journal bytes. The last record, torn or failing its checksum, is
/// left out and described in `torn_tail` (its step never started, or its
/// record cannot be trusted: what the target holds decides, see
/// `recover`). Damage anywhere else is refused, naming the line.
pub fn replay_bytes(path: &Path, bytes: &[u8]) -> Result<JournalState, PatchError> {
    replay_bytes_with(path, bytes, &mut |_, _| {})
}

/// `replay_bytes`, calling `each` with every intact record and the state
/// right after it.
fn replay_bytes_with(
    path: &Path,
    bytes: &[u8],
    each: &mut dyn FnMut(&Record, &JournalState),
) -> Result<JournalState, PatchError> {
    let mut state = JournalState::default();
    // (line number, start offset, bytes without the newline, has newline)
    let mut lines: Vec<(usize, usize, &[u8], bool)> = Vec::new();
    let mut start = 0;
    for (index, piece) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
        let complete = piece.last() == Some(&b'\n');
        let body = if complete { &piece[..piece.len() - 1] } else { piece };
        lines.push((index + 1, start, body, complete));
        start += piece.len();
    }
    let total_lines = lines.len();
    let mut checked_before = false;
    for (position, (number, offset, line, complete)) in lines.iter().copied().enumerate() {
        let is_last = position + 1 == total_lines;
        let tail = |why: String| TornTail {
            intact_len: offset as u64,
            total_len: bytes.len() as u64,
            line: number,
            why,
        };
        if !complete {
            state.torn_tail = Some(tail("cut short: no newline".into()));
            break;
        }
        if line.is_empty() {
            continue;
        }
        let record = match decode_line(line, checked_before) {
            Ok((record, checked)) => {
                checked_before |= checked;
                record
            }
            Err(damage) if is_last => {
                state.torn_tail = Some(tail(damage.to_string()));
                break;
            }
            Err(damage) => {
                return Err(PatchError::Journal {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {number} of {total_lines} is damaged ({damage}); the records after it cannot be \
                         trusted, so nothing was done: restore the journal from a copy, or repair or remove \
                         that line by hand (see docs/recovery.md)"
                    ),
                });
            }
        };
        apply_record(&mut state, path, number, record.clone())?;
        each(&record, &state);
    }
    Ok(state)
}

/// Replay one intact record into `state`.
fn apply_record(state: &mut JournalState, path: &Path, number: usize, record: Record) -> Result<(), PatchError> {
    let corrupt = |what: &str| PatchError::Journal {
        path: path.to_path_buf(),
        message: format!("line {number}: {what}"),
    };
    // The next transaction's number must exist: u64::MAX + 1 panicked
    // (debug) or wrapped to 0 (release).
    let next_txn = record
        .txn()
        .checked_add(1)
        .ok_or_else(|| corrupt("transaction number out of range"))?;
    state.next_txn = state.next_txn.max(next_txn);
    match record {
        Record::Begin {
            txn, kind, patch_id, ..
        } => {
            if state.open.is_some() {
                return Err(corrupt("a transaction begins while another is open"));
            }
            state.open = Some(OpenTxn {
                txn,
                kind,
                patch_id,
                mapping: None,
                plan: None,
                writes: None,
                writes_patch: None,
            });
        }
        Record::Map { txn, address, len } => open_txn(state, txn, &corrupt)?.mapping = Some((address, len)),
        Record::Plan { txn, patch } => open_txn(state, txn, &corrupt)?.plan = Some(patch),
        Record::Writes { txn, writes, patch_id } => {
            let open = open_txn(state, txn, &corrupt)?;
            // An apply may hold writes for its duration (the safe-point
            // request, `safepoint.rs`); a rollback never writes any.
            if !open.kind.is_plain_writes() && open.kind != TxnKind::Apply {
                return Err(corrupt("plain writes in a rollback transaction"));
            }
            open.writes = Some(writes);
            open.writes_patch = patch_id;
        }
        // Unmapping a retired mapping is housekeeping that may also
        // happen outside any transaction (see `recover`).
        Record::Unmap { address, .. } => state.retired.retain(|(a, _)| *a != address),
        Record::Retire { txn, address, len, .. } => {
            open_txn(state, txn, &corrupt)?;
            state.retired.push((address, len));
        }
        Record::Commit { txn, .. } => {
            let open = open_txn(state, txn, &corrupt)?.clone();
            state.open = None;
            match open.kind {
                TxnKind::Apply => state
                    .active
                    .push(open.plan.ok_or_else(|| corrupt("apply committed without a plan"))?),
                TxnKind::Rollback => state.active.retain(|p| p.id != open.patch_id),
                TxnKind::Repoint => {
                    let writes = open.writes.ok_or_else(|| corrupt("repoint committed without writes"))?;
                    let id = open.writes_patch.ok_or_else(|| corrupt("repoint names no patch"))?;
                    let patch = state
                        .active
                        .iter_mut()
                        .find(|p| p.id == id)
                        .ok_or_else(|| corrupt("repoint of a patch that is not active"))?;
                    for write in writes {
                        let function = patch
                            .functions
                            .iter_mut()
                            .find(|f| f.write.address == write.address)
                            .ok_or_else(|| corrupt("repoint of an address the patch did not write"))?;
                        function.write.new = write.new;
                    }
                }
                // Heals and probes leave the patch state as it was.
                TxnKind::Heal | TxnKind::Probe => {}
            }
        }
        Record::Abort { txn, .. } => {
            open_txn(state, txn, &corrupt)?;
            state.open = None;
        }
    }
    Ok(())
}

/// Create `path` (it must not exist) with `bytes`, durably: file and
/// directory entry fsync'd.
fn write_new_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    match path.parent() {
        Some(parent) => File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

fn open_txn<'a>(
    state: &'a mut JournalState,
    txn: u64,
    corrupt: &dyn Fn(&str) -> PatchError,
) -> Result<&'a mut OpenTxn, PatchError> {
    match state.open.as_mut() {
        Some(open) if open.txn == txn => Ok(open),
        _ => Err(corrupt("record for a transaction that is not open")),
    }
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&shadowpatch_symbols::hex(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(deserializer)?;
        shadowpatch_symbols::unhex(&text).ok_or_else(|| serde::de::Error::custom("not hex bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(id: &str) -> PatchRecord {
        PatchRecord {
            id: id.into(),
            generation: 1,
            manifest: "m.toml".into(),
            object: "p.so".into(),
            module: "busy".into(),
            build_id: "ab".into(),
            mapping_address: 0x1000,
            mapping_len: 0x2000,
            functions: vec![PatchedFunction {
                watch_stub: None,
                site: FunctionSite {
                    symbol: "f".into(),
                    entry: 0x10,
                    size: 16,
                    patch_at: 0x10,
                },
                with: "g".into(),
                new_address: 0x1100,
                preserved: None,
                write: Write5 {
                    address: 0x10,
                    original: vec![0x55, 1, 2, 3, 4],
                    new: vec![0xe9, 0, 0, 0, 0],
                },
            }],
        }
    }

    fn lines(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            out.extend(encode_line(r));
            out.push(b'\n');
        }
        out
    }

    fn begin(txn: u64, kind: TxnKind, id: &str) -> Record {
        Record::Begin {
            txn,
            kind,
            patch_id: id.into(),
            pid: 1,
            start_time: 2,
            unix_ms: 3,
            boot_ns: None,
        }
    }

    #[test]
    fn replay_tracks_active_patches_and_the_open_transaction() {
        let path = Path::new("journal");
        let records = vec![
            begin(0, TxnKind::Apply, "a"),
            Record::Map {
                txn: 0,
                address: 0x1000,
                len: 0x2000,
            },
            Record::Plan {
                txn: 0,
                patch: patch("a"),
            },
            Record::Commit {
                txn: 0,
                pause_us: 50,
                boot_ns: None,
            },
            begin(1, TxnKind::Apply, "b"),
            Record::Map {
                txn: 1,
                address: 0x5000,
                len: 0x1000,
            },
        ];
        let state = replay_bytes(path, &lines(&records)).unwrap();
        assert_eq!(state.active.len(), 1);
        assert_eq!(state.active[0].functions[0].write.original, vec![0x55, 1, 2, 3, 4]);
        let open = state.open.unwrap();
        assert_eq!(
            (open.txn, open.patch_id.as_str(), open.mapping),
            (1, "b", Some((0x5000, 0x1000)))
        );
        assert_eq!(state.next_txn, 2);

        let mut all = records.clone();
        all.push(Record::Abort {
            txn: 1,
            reason: "test".into(),
        });
        all.push(begin(2, TxnKind::Rollback, "a"));
        all.push(Record::Commit {
            txn: 2,
            pause_us: 40,
            boot_ns: None,
        });
        let state = replay_bytes(path, &lines(&all)).unwrap();
        assert!(state.active.is_empty() && state.open.is_none());
    }

    #[test]
    fn a_torn_or_damaged_last_record_is_left_out_and_damage_before_it_refused() {
        let path = Path::new("journal");
        let intact = lines(&[begin(0, TxnKind::Apply, "a")]);
        // Cut short (no newline).
        let mut bytes = intact.clone();
        bytes.extend_from_slice(
            &encode_line(&Record::Map {
                txn: 0,
                address: 1,
                len: 2,
            })[..20],
        );
        let state = replay_bytes(path, &bytes).unwrap();
        assert!(state.open.unwrap().mapping.is_none());
        let tail = state.torn_tail.unwrap();
        assert_eq!((tail.intact_len, tail.line), (intact.len() as u64, 2));
        // A whole last line whose checksum fails (one digit flipped).
        let mut bytes = lines(&[
            begin(0, TxnKind::Apply, "a"),
            Record::Plan {
                txn: 0,
                patch: patch("a"),
            },
        ]);
        let flip = bytes.len() - 30;
        bytes[flip] = if bytes[flip] == b'0' { b'1' } else { b'0' };
        let state = replay_bytes(path, &bytes).unwrap();
        assert!(state.open.unwrap().plan.is_none(), "the damaged plan is not acted on");
        assert!(state.torn_tail.unwrap().why.contains("checksum"));
        // The same damage before the last record is refused, naming the line.
        bytes.extend(lines(&[Record::Commit {
            txn: 0,
            pause_us: 1,
            boot_ns: None,
        }]));
        let error = replay_bytes(path, &bytes).unwrap_err().to_string();
        assert!(error.contains("line 2 of 3 is damaged"), "{error}");
        let mut bytes = intact.clone();
        bytes.extend_from_slice(b"garbage\n");
        bytes.extend(lines(&[Record::Commit {
            txn: 0,
            pause_us: 1,
            boot_ns: None,
        }]));
        assert!(replay_bytes(path, &bytes).is_err());
        let bytes = lines(&[Record::Commit {
            txn: 4,
            pause_us: 1,
            boot_ns: None,
        }]);
        assert!(replay_bytes(path, &bytes).is_err());
    }

    #[test]
    fn journals_without_checksums_are_read_until_a_checksummed_line() {
        let path = Path::new("journal");
        let legacy = |record: &Record| {
            let mut line = serde_json::to_vec(record).unwrap();
            line.push(b'\n');
            line
        };
        let mut bytes = legacy(&begin(0, TxnKind::Apply, "a"));
        bytes.extend(legacy(&Record::Plan {
            txn: 0,
            patch: patch("a"),
        }));
        bytes.extend(lines(&[Record::Commit {
            txn: 0,
            pause_us: 1,
            boot_ns: None,
        }]));
        let state = replay_bytes(path, &bytes).unwrap();
        assert_eq!(state.active.len(), 1);
        // After a checksummed line an unchecked one is damage.
        bytes.extend(legacy(&begin(1, TxnKind::Rollback, "a")));
        bytes.extend(lines(&[Record::Commit {
            txn: 1,
            pause_us: 1,
            boot_ns: None,
        }]));
        assert!(replay_bytes(path, &bytes)
            .unwrap_err()
            .to_string()
            .contains("no checksum"));
    }

    #[test]
    fn opening_for_append_sets_a_torn_tail_aside_and_appends_after_intact_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = Journal::path_in(dir.path());
        let mut bytes = lines(&[
            begin(0, TxnKind::Apply, "a"),
            Record::Abort {
                txn: 0,
                reason: "x".into(),
            },
        ]);
        let intact = bytes.len();
        bytes.extend_from_slice(b"0123456789abcdef {\"op\":\"commit\",\"txn\":0,\"pau");
        std::fs::write(&path, &bytes).unwrap();
        let replayed = Journal::replay(dir.path()).unwrap();
        let (mut journal, kept) = Journal::open(dir.path(), &replayed).unwrap();
        let kept = kept.expect("the torn tail was kept");
        assert_eq!(std::fs::read(&kept).unwrap(), bytes[intact..].to_vec());
        journal.append(&begin(1, TxnKind::Apply, "b")).unwrap();
        let state = Journal::replay(dir.path()).unwrap();
        assert!(state.torn_tail.is_none());
        assert_eq!(state.open.unwrap().patch_id, "b");
        assert_eq!(std::fs::read(&path).unwrap()[..intact], bytes[..intact]);
    }

    #[test]
    fn plain_write_transactions_replay_and_a_repoint_updates_the_patch() {
        let path = Path::new("journal");
        let stub_jump = Write5 {
            address: 0x10,
            original: vec![0xe9, 0, 0, 0, 0],
            new: vec![0xe9, 9, 9, 9, 9],
        };
        let records = vec![
            begin(0, TxnKind::Apply, "a"),
            Record::Plan {
                txn: 0,
                patch: patch("a"),
            },
            Record::Commit {
                txn: 0,
                pause_us: 1,
                boot_ns: None,
            },
            begin(1, TxnKind::Heal, "heal"),
            Record::Writes {
                txn: 1,
                writes: vec![stub_jump.clone()],
                patch_id: None,
            },
            Record::Commit {
                txn: 1,
                pause_us: 1,
                boot_ns: None,
            },
            begin(2, TxnKind::Repoint, "a"),
            Record::Writes {
                txn: 2,
                writes: vec![stub_jump.clone()],
                patch_id: Some("a".into()),
            },
        ];
        let open = replay_bytes(path, &lines(&records)).unwrap();
        let txn = open.open.as_ref().unwrap();
        assert_eq!(txn.kind, TxnKind::Repoint);
        assert_eq!(txn.announced_writes(), vec![stub_jump.clone()]);
        // Until the commit the patch keeps the bytes it had.
        assert_eq!(open.active[0].functions[0].write.new, vec![0xe9, 0, 0, 0, 0]);
        let mut committed = records.clone();
        committed.push(Record::Commit {
            txn: 2,
            pause_us: 1,
            boot_ns: None,
        });
        let state = replay_bytes(path, &lines(&committed)).unwrap();
        let write = &state.active[0].functions[0].write;
        assert_eq!(write.new, vec![0xe9, 9, 9, 9, 9]);
        assert_eq!(
            write.original,
            vec![0x55, 1, 2, 3, 4],
            "the function's own bytes are kept"
        );

        // Plain writes inside a rollback transaction are corruption.
        let bad = vec![
            begin(0, TxnKind::Rollback, "a"),
            Record::Writes {
                txn: 0,
                writes: vec![stub_jump],
                patch_id: None,
            },
        ];
        assert!(replay_bytes(path, &lines(&bad)).is_err());
    }

    /// Found by fuzzing: a non-ASCII character in a record's hex bytes
    /// was sliced through and panicked; it is a damaged record.
    #[test]
    fn a_non_ascii_character_in_hex_bytes_is_damage_not_a_panic() {
        let json = serde_json::to_string(&Record::Writes {
            txn: 0,
            writes: vec![Write5 {
                address: 0x10,
                original: vec![0x55, 1, 2, 3, 4],
                new: vec![0xe9, 0, 0, 0, 0],
            }],
            patch_id: None,
        })
        .unwrap()
        // Six bytes of text whose second character is two bytes long.
        .replace("5501020304", "5\\u00e9304");
        let line = format!("{} {json}", checksum(json.as_bytes()));
        assert!(matches!(
            decode_line(line.as_bytes(), true),
            Err(LineDamage::NotARecord(_))
        ));
        let mut bytes = lines(&[begin(0, TxnKind::Heal, "a")]);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        bytes.extend(lines(&[Record::Commit {
            txn: 0,
            pause_us: 1,
            boot_ns: None,
        }]));
        let error = replay_bytes(Path::new("journal"), &bytes).unwrap_err().to_string();
        assert!(error.contains("line 2 of 3 is damaged"), "{error}");
        assert_eq!(shadowpatch_symbols::unhex("e9AB"), Some(vec![0xe9, 0xab]));
        assert_eq!(shadowpatch_symbols::unhex("é0"), None);
        assert_eq!(shadowpatch_symbols::unhex("+f"), None);
    }

    /// A transaction numbered u64::MAX leaves no number for the next: the
    /// journal is refused as corrupt (it overflowed before).
    #[test]
    fn a_transaction_number_with_no_successor_is_refused() {
        let bytes = lines(&[begin(u64::MAX, TxnKind::Heal, "a")]);
        let error = replay_bytes(Path::new("journal"), &bytes).unwrap_err().to_string();
        assert!(error.contains("line 1: transaction number out of range"), "{error}");
    }
}
