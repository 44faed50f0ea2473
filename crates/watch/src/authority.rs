//! Telling authorised change from tampering: what the patch journal and
//! the published mirror generations say the target may hold right now.
//!
//! Every write shadowpatch makes into a target is announced in the journal
//! (fsync'd) before it is made, and a generation is published only after
//! its transaction commits (`patch/src/apply.rs`, `rollback.rs`). So when
//! the verifier sees a difference at time t, re-reading the journal after t
//! shows every record that could explain it. The rules:
//!
//! - bytes inside a write announced by the open transaction (a patch plan,
//!   a rollback of a patch's entries, heal/probe/repoint writes) that hold
//!   that write's old or new bytes are authorised (a heal's old bytes are
//!   the tampered ones: only its new bytes count);
//! - the same for writes announced by records that appeared in the journal
//!   within the last `grace` (a transaction that began *and* ended between
//!   two looks);
//! - bytes at an active patch's entry equal to what its committed
//!   transactions left there (`write.new` after replay, e.g. a kept watch
//!   window's direct jump) are authorised: a heal never writes over them;
//! - a journal whose active patch count differs from the latest published
//!   generation, or with a transaction open, is *unsettled*: the verifier
//!   waits (up to `settle_timeout`) before reporting anything but bytes no
//!   announced write explains;
//! - when settled on a generation other than the one being verified, the
//!   verifier switches to it and re-verifies before reporting.
//!
//! Mappings follow the same rules: a patch's mapping (journal `Map`, or the
//! mapping of a patch being rolled back) and retired mappings are authorised,
//! and the bytes of a mapping being loaded or unloaded are in flux.

use crate::WatchError;
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::journal::{decode_line, replay_bytes, Journal, JournalState, Record, TxnKind, Write5};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A write someone announced: its range and the byte states it may leave.
#[derive(Debug, Clone)]
struct AnnouncedWrite {
    address: u64,
    /// Byte states the range may hold (old and/or new).
    allowed: Vec<Vec<u8>>,
}

impl AnnouncedWrite {
    fn from_write(write: &Write5, kind: TxnKind) -> Self {
        let mut allowed = vec![write.new.clone()];
        // A heal's `original` is the tampered bytes: never authorised.
        if kind != TxnKind::Heal {
            allowed.push(write.original.clone());
        }
        AnnouncedWrite {
            address: write.address,
            allowed,
        }
    }

    fn end(&self) -> u64 {
        self.address + self.allowed.first().map_or(0, |b| b.len() as u64)
    }
}

/// What a patch id's plan announced (kept to explain its rollback).
#[derive(Debug, Clone, Default)]
struct PlanRanges {
    writes: Vec<Write5>,
    mapping: (u64, u64),
}

/// The journal and generations of one target, as last read.
#[derive(Debug)]
pub struct Authority {
    dir: PathBuf,
    journal_path: PathBuf,
    bytes: Vec<u8>,
    /// Bytes of `bytes` already parsed into `recent` (up to a newline).
    parsed: usize,
    journal_inode: u64,
    pub state: JournalState,
    plans: HashMap<String, PlanRanges>,
    /// Writes and mappings announced recently, with when we first saw them.
    recent_writes: Vec<(Instant, AnnouncedWrite)>,
    recent_mappings: Vec<(Instant, (u64, u64))>,
    generations: Vec<u32>,
    /// (inode, mtime) of the latest generation file: a re-mirrored
    /// generation 0 replaces the file under the same name.
    latest_file: Option<(u64, i64, i64)>,
    dir_mtime: (i64, i64),
    unsettled_since: Option<Instant>,
}

impl Authority {
    pub fn open(dir: &Path) -> Result<Self, WatchError> {
        let mut authority = Authority {
            dir: dir.to_path_buf(),
            journal_path: Journal::path_in(dir),
            bytes: Vec::new(),
            parsed: 0,
            journal_inode: 0,
            state: JournalState::default(),
            plans: HashMap::new(),
            recent_writes: Vec::new(),
            recent_mappings: Vec::new(),
            generations: Vec::new(),
            latest_file: None,
            dir_mtime: (0, 0),
            unsettled_since: None,
        };
        authority.refresh(Duration::ZERO)?;
        // What was announced before we started is history, not "recent".
        authority.recent_writes.clear();
        authority.recent_mappings.clear();
        Ok(authority)
    }

    /// Re-read what changed in the journal and the generation list.
    /// Returns whether anything did.
    pub fn refresh(&mut self, grace: Duration) -> Result<bool, WatchError> {
        let now = Instant::now();
        self.recent_writes.retain(|(seen, _)| now.duration_since(*seen) < grace);
        self.recent_mappings
            .retain(|(seen, _)| now.duration_since(*seen) < grace);
        let journal_changed = self.read_journal(now)?;
        let generations_changed = self.read_generations();
        if self.is_settled() {
            self.unsettled_since = None;
        } else if self.unsettled_since.is_none() {
            self.unsettled_since = Some(now);
        }
        Ok(journal_changed || generations_changed)
    }

    fn read_journal(&mut self, now: Instant) -> Result<bool, WatchError> {
        let io = |e: std::io::Error| WatchError::Journal {
            path: self.journal_path.clone(),
            message: e.to_string(),
        };
        let mut file = match std::fs::File::open(&self.journal_path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(e)),
        };
        let metadata = file.metadata().map_err(io)?;
        if metadata.ino() != self.journal_inode || metadata.len() < self.bytes.len() as u64 {
            // A new journal (first look, or replaced): read it whole.
            self.journal_inode = metadata.ino();
            self.bytes.clear();
            self.parsed = 0;
        }
        if metadata.len() == self.bytes.len() as u64 {
            return Ok(false);
        }
        file.seek(SeekFrom::Start(self.bytes.len() as u64)).map_err(io)?;
        file.read_to_end(&mut self.bytes).map_err(io)?;
        let last_newline = self.bytes.iter().rposition(|b| *b == b'\n');
        // Keep only whole lines: bytes after the last newline are a record
        // being written, or a torn one the next writer cuts off and writes
        // over (`Journal::open`); they are read again next time.
        let Some(last_newline) = last_newline.filter(|at| *at >= self.parsed) else {
            self.bytes.truncate(self.parsed);
            return Ok(false);
        };
        self.bytes.truncate(last_newline + 1);
        let fresh = self.bytes[self.parsed..=last_newline].to_vec();
        self.parsed = last_newline + 1;
        let mut open_kind: Option<TxnKind> = self.state.open.as_ref().map(|o| o.kind);
        for line in fresh.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            // Damage is for `replay_bytes` below to report.
            let Ok((record, _)) = decode_line(line, false) else {
                continue;
            };
            self.note(record, now, &mut open_kind);
        }
        self.state = replay_bytes(&self.journal_path, &self.bytes[..self.parsed]).map_err(|e| WatchError::Journal {
            path: self.journal_path.clone(),
            message: e.to_string(),
        })?;
        if let Some(tail) = self.state.torn_tail.take() {
            // A damaged last record: the next writer replaces it, so read
            // from its start again next time.
            self.parsed = tail.intact_len as usize;
            self.bytes.truncate(self.parsed);
        }
        Ok(true)
    }

    /// Remember what one new record announces.
    fn note(&mut self, record: Record, now: Instant, open_kind: &mut Option<TxnKind>) {
        match record {
            Record::Begin { kind, patch_id, .. } => {
                *open_kind = Some(kind);
                if kind == TxnKind::Rollback {
                    if let Some(plan) = self.plans.get(&patch_id).cloned() {
                        for write in &plan.writes {
                            self.recent_writes.push((now, AnnouncedWrite::from_write(write, kind)));
                        }
                        self.recent_mappings.push((now, plan.mapping));
                    }
                }
            }
            Record::Map { address, len, .. } => self.recent_mappings.push((now, (address, len))),
            Record::Plan { patch, .. } => {
                let writes: Vec<Write5> = patch.functions.iter().map(|f| f.write.clone()).collect();
                for write in &writes {
                    self.recent_writes
                        .push((now, AnnouncedWrite::from_write(write, TxnKind::Apply)));
                }
                self.recent_mappings
                    .push((now, (patch.mapping_address, patch.mapping_len)));
                self.plans.insert(
                    patch.id.clone(),
                    PlanRanges {
                        writes,
                        mapping: (patch.mapping_address, patch.mapping_len),
                    },
                );
            }
            Record::Writes { writes, .. } => {
                let kind = open_kind.unwrap_or(TxnKind::Heal);
                for write in &writes {
                    self.recent_writes.push((now, AnnouncedWrite::from_write(write, kind)));
                }
            }
            Record::Unmap { address, len, .. } | Record::Retire { address, len, .. } => {
                self.recent_mappings.push((now, (address, len)))
            }
            Record::Commit { .. } | Record::Abort { .. } => *open_kind = None,
        }
    }

    fn read_generations(&mut self) -> bool {
        let dir_mtime = std::fs::metadata(&self.dir)
            .map(|m| (m.mtime(), m.mtime_nsec()))
            .unwrap_or((0, 0));
        let latest_file = self.generations.last().and_then(|g| {
            std::fs::metadata(StateDir::generation_path(&self.dir, *g))
                .ok()
                .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
        });
        if dir_mtime == self.dir_mtime && latest_file == self.latest_file && !self.generations.is_empty() {
            return false;
        }
        self.dir_mtime = dir_mtime;
        let generations = StateDir::generations(&self.dir);
        let latest_file = generations.last().and_then(|g| {
            std::fs::metadata(StateDir::generation_path(&self.dir, *g))
                .ok()
                .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
        });
        let changed = generations != self.generations || latest_file != self.latest_file;
        self.generations = generations;
        self.latest_file = latest_file;
        changed
    }

    /// Bytes of the journal read so far (a heal refuses to act on a
    /// judgement made before the journal grew).
    pub fn journal_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The generation to verify against (None: nothing mirrored). The
    /// journal is the authority: with no transaction open and the
    /// generation its active patches call for published, that one, even if
    /// a higher one is still on disk (a committed rollback's, being removed
    /// now, or left by a crash until the next `recover`); otherwise the
    /// latest published.
    pub fn latest_generation(&self) -> Option<u32> {
        let wanted = self.state.active.len() as u32;
        if self.state.open.is_none() && self.generations.contains(&wanted) {
            return Some(wanted);
        }
        self.generations.last().copied()
    }

    /// Identity of that generation's file, to notice a replaced one.
    pub fn latest_file_identity(&self) -> Option<(u64, i64, i64)> {
        match self.latest_generation() {
            Some(generation) if self.generations.last() != Some(&generation) => {
                std::fs::metadata(StateDir::generation_path(&self.dir, generation))
                    .ok()
                    .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
            }
            _ => self.latest_file,
        }
    }

    /// No transaction open, and the latest generation is the one the
    /// journal's active patches call for.
    pub fn is_settled(&self) -> bool {
        self.state.open.is_none() && self.latest_generation() == Some(self.state.active.len() as u32)
    }

    /// No transaction open, but the journal's active patch count is not
    /// the latest generation: a commit whose generation is being
    /// published (or removed) right now.
    pub fn awaiting_publication(&self) -> bool {
        self.state.open.is_none() && !self.is_settled()
    }

    /// Unsettled for longer than `timeout` (a crashed tool left it so):
    /// differences are reported anyway.
    pub fn unsettled_too_long(&self, timeout: Duration) -> bool {
        self.unsettled_since.is_some_and(|since| since.elapsed() >= timeout)
    }

    /// Why the bytes `live` at `address` are authorised, if they are: they
    /// lie in a write announced by the open transaction or recently, and
    /// hold one of the states that write may leave.
    pub fn explains_bytes(&self, address: u64, live: &[u8]) -> Option<&'static str> {
        let end = address + live.len() as u64;
        let matches = |write: &AnnouncedWrite| {
            if write.address >= end || address >= write.end() {
                return false;
            }
            // Compare the overlap of the run with each allowed state.
            let from = address.max(write.address);
            let to = end.min(write.end());
            let live_part = &live[(from - address) as usize..(to - address) as usize];
            write.allowed.iter().any(|state| {
                let state_part = &state[(from - write.address) as usize..(to - write.address) as usize];
                state_part == live_part
            })
        };
        let covered_by = |writes: &mut dyn Iterator<Item = AnnouncedWrite>| {
            // Every byte of the run must lie in some matching write.
            let writes: Vec<AnnouncedWrite> = writes.filter(|w| matches(w)).collect();
            (address..end).all(|byte| writes.iter().any(|w| (w.address..w.end()).contains(&byte)))
        };
        if let Some(open) = &self.state.open {
            let mut announced: Vec<AnnouncedWrite> = open
                .announced_writes()
                .iter()
                .map(|w| AnnouncedWrite::from_write(w, open.kind))
                .collect();
            if open.kind == TxnKind::Rollback {
                if let Some(patch) = self.state.active.iter().find(|p| p.id == open.patch_id) {
                    announced.extend(
                        patch
                            .functions
                            .iter()
                            .map(|f| AnnouncedWrite::from_write(&f.write, TxnKind::Rollback)),
                    );
                }
            }
            if covered_by(&mut announced.into_iter()) {
                return Some("written by the open transaction");
            }
        }
        if covered_by(&mut self.recent_writes.iter().map(|(_, w)| w.clone())) {
            return Some("written by a transaction that just ended");
        }
        // What committed transactions left at active patches' entries (a
        // kept watch window's direct jump before its generation is
        // published): ours, never an alert, never healed over.
        let mut committed = self
            .state
            .active
            .iter()
            .flat_map(|p| &p.functions)
            .map(|f| AnnouncedWrite {
                address: f.write.address,
                allowed: vec![f.write.new.clone()],
            });
        if covered_by(&mut committed) {
            return Some("an active patch's committed entry bytes");
        }
        None
    }

    /// Whether `[start, end)` overlaps a patch mapping the open
    /// transaction maps (`Map`, its plan) or unmaps (a rollback's patch).
    fn open_transaction_maps(&self, start: u64, end: u64) -> bool {
        let overlaps = |(address, len): (u64, u64)| address < end && start < address + len;
        let Some(open) = &self.state.open else {
            return false;
        };
        open.mapping.is_some_and(overlaps)
            || open
                .plan
                .as_ref()
                .is_some_and(|p| overlaps((p.mapping_address, p.mapping_len)))
            || (open.kind == TxnKind::Rollback
                && self
                    .state
                    .active
                    .iter()
                    .any(|p| p.id == open.patch_id && overlaps((p.mapping_address, p.mapping_len))))
    }

    /// Whether `[start, end)` lies in a patch mapping that a transaction is
    /// loading or unloading right now (the open one, or one that just
    /// ended): its bytes are in flux, not tampered with. Active patches'
    /// settled mappings are not in flux: a change there is an alert.
    pub fn in_flux(&self, start: u64, end: u64) -> bool {
        self.open_transaction_maps(start, end)
            || self
                .recent_mappings
                .iter()
                .any(|(_, (address, len))| *address < end && start < address + len)
    }

    /// Why the mapping range `[start, end)` may appear, disappear or change
    /// protection, if it may: a patch mapping of the open or a recent
    /// transaction, an active patch's mapping, or a retired one.
    pub fn explains_mapping(&self, start: u64, end: u64) -> Option<&'static str> {
        let overlaps = |(address, len): (u64, u64)| address < end && start < address + len;
        if self.open_transaction_maps(start, end) {
            return Some("mapped or unmapped by the open transaction");
        }
        if self
            .state
            .active
            .iter()
            .any(|p| overlaps((p.mapping_address, p.mapping_len)))
        {
            return Some("an active patch's mapping");
        }
        if self.state.retired.iter().any(|r| overlaps(*r)) {
            return Some("a retired patch mapping");
        }
        if self.recent_mappings.iter().any(|(_, r)| overlaps(*r)) {
            return Some("mapped or unmapped by a transaction that just ended");
        }
        None
    }
}
