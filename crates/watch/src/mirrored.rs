//! Mirrored critical variables inside a watch: their pages are tracked by
//! a `DirtyTracker` (the best method this kernel offers, or the one asked
//! for) and copied into a `DataMirror` once per pass, re-reading only the
//! pages written since the previous pass; a variable whose bytes changed
//! gets a new snapshot (time, blake3 hash, bytes) in the target's bounded
//! `snapshots.json` (`mirror/src/snapshots.rs`). Snapshots are reported
//! at once but written to the file at most once per [`PERSIST_EVERY`]
//! (and on stop): a variable that changes every pass would otherwise cost
//! two fsyncs per pass.
//!
//! The target is attached only while the tracker starts (the userfaultfd
//! is created by a remote system call); collecting works from outside, so
//! the target's signals are never held between passes. `stop` undoes the
//! method (uffd ranges unregistered, the descriptor closed).

use crate::WatchError;
use shadowpatch_mirror::dirty::MethodStatus;
use shadowpatch_mirror::{
    CriticalVariable, DataMirror, DirtyError, DirtyMethod, DirtyTracker, Snapshot, SnapshotFile, TrackedRange,
    PAGE_SIZE,
};
use shadowpatch_process::{Attached, ProcessIdentity, TargetMemory};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest time a snapshot waits before it is written to `snapshots.json`.
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// A variable whose bytes changed in a refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub name: String,
    pub address: u64,
    pub snapshot: Snapshot,
}

/// The dirty-page mirror of a watch's mirrored variables.
#[derive(Debug)]
pub struct MirroredVariables {
    variables: Vec<CriticalVariable>,
    tracker: DirtyTracker,
    mirror: DataMirror,
    target_dir: PathBuf,
    pid: i32,
    start_time: u64,
    keep: usize,
    /// The newest snapshot's hash per variable (what a change is judged against).
    newest: Vec<Option<String>>,
    /// Snapshots not yet written to the file, oldest first.
    pending: Vec<(usize, Snapshot)>,
    last_persisted: Option<Instant>,
}

/// The whole pages covering `variables`, overlapping ones merged (two
/// variables may share a page; the tracker refuses overlapping ranges).
pub fn covering_ranges(variables: &[CriticalVariable]) -> Vec<TrackedRange> {
    let mut ranges: Vec<TrackedRange> = variables
        .iter()
        .map(|v| TrackedRange::covering(v.address, v.size))
        .collect();
    ranges.sort();
    let mut merged: Vec<TrackedRange> = Vec::new();
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start < last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

impl MirroredVariables {
    /// Start tracking `variables` (at least one) and take their first
    /// snapshots. Attaches for the start only.
    pub fn start(
        identity: &ProcessIdentity,
        memory: &mut TargetMemory,
        variables: Vec<CriticalVariable>,
        method: Option<DirtyMethod>,
        target_dir: &Path,
        keep: usize,
    ) -> Result<(MirroredVariables, Vec<Changed>), WatchError> {
        let ranges = covering_ranges(&variables);
        let mut attached = Attached::seize(identity)?;
        let started = DirtyTracker::start(&mut attached, &ranges, method);
        let detached = attached.detach();
        let tracker = started?;
        detached?;
        let mirror = DataMirror::capture(&tracker, memory)?;
        let mut mirrored = MirroredVariables {
            variables,
            tracker,
            mirror,
            target_dir: target_dir.to_path_buf(),
            pid: identity.pid,
            start_time: identity.start_time,
            keep,
            newest: Vec::new(),
            pending: Vec::new(),
            last_persisted: None,
        };
        mirrored.newest = vec![None; mirrored.variables.len()];
        let all: Vec<usize> = (0..mirrored.variables.len()).collect();
        let changed = mirrored.record(&all, "watch")?;
        Ok((mirrored, changed))
    }

    pub fn method(&self) -> DirtyMethod {
        self.tracker.method()
    }

    /// The more preferred methods that were unavailable, each with why.
    pub fn skipped(&self) -> &[MethodStatus] {
        self.tracker.skipped()
    }

    pub fn names(&self) -> Vec<String> {
        self.variables.iter().map(|v| v.name.clone()).collect()
    }

    pub fn bytes(&self) -> u64 {
        self.variables.iter().map(|v| v.size).sum()
    }

    /// Copy the pages written since the last refresh and snapshot every
    /// variable whose bytes changed. Returns those variables and how many
    /// pages were copied.
    pub fn refresh(&mut self, memory: &mut TargetMemory) -> Result<(Vec<Changed>, u64), WatchError> {
        let report = self.mirror.refresh(&mut self.tracker, memory)?;
        if report.changed.is_empty() {
            return Ok((Vec::new(), report.pages_copied));
        }
        let page = PAGE_SIZE as u64;
        let touched: Vec<usize> = self
            .variables
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                report
                    .changed
                    .iter()
                    .any(|&p| p < v.address + v.size && v.address < p + page)
            })
            .map(|(index, _)| index)
            .collect();
        Ok((self.record(&touched, "watch")?, report.pages_copied))
    }

    /// Snapshot the variables `indexes` from the mirror copy; returns
    /// those whose hash differs from their newest snapshot (queued for the
    /// file, written when [`PERSIST_EVERY`] has passed since the last write).
    fn record(&mut self, indexes: &[usize], cause: &str) -> Result<Vec<Changed>, WatchError> {
        let now = shadowpatch_store::now_ms();
        let mut changed = Vec::new();
        for &index in indexes {
            let variable = &self.variables[index];
            let bytes = self
                .mirror
                .read(variable.address, variable.size as usize)
                .expect("a mirrored variable lies in the tracked pages");
            let snapshot = Snapshot::of(bytes, now, cause, None);
            if self.newest[index].as_deref() == Some(snapshot.hash.as_str()) {
                continue;
            }
            self.newest[index] = Some(snapshot.hash.clone());
            changed.push(Changed {
                name: variable.name.clone(),
                address: variable.address,
                snapshot: snapshot.clone(),
            });
            self.pending.push((index, snapshot));
        }
        // Never more queued than the file would keep.
        let due = self.last_persisted.is_none_or(|at| at.elapsed() >= PERSIST_EVERY);
        if due || self.pending.len() > self.keep * self.variables.len() {
            self.persist()?;
        }
        Ok(changed)
    }

    /// Write the queued snapshots to `snapshots.json`.
    pub fn persist(&mut self) -> Result<(), WatchError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let keep = self.keep;
        let variables = &self.variables;
        SnapshotFile::update(&self.target_dir, self.pid, self.start_time, |file| {
            file.set_keep(keep);
            for (index, snapshot) in pending {
                file.record(&variables[index], snapshot, true);
            }
        })?;
        self.last_persisted = Some(Instant::now());
        Ok(())
    }

    /// Undo the tracking method in the target (call `persist` first).
    pub fn stop(self) -> Result<(), DirtyError> {
        self.tracker.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowpatch_mirror::VariableMode;

    #[test]
    fn variables_sharing_a_page_get_one_range() {
        let variable = |address: u64, size: u64| CriticalVariable {
            name: format!("{address:#x}"),
            module: None,
            symbol: None,
            address,
            size,
            mode: VariableMode::Mirrored,
            build_id: None,
            registered_unix_ms: 0,
            origin: "test".into(),
            guarded_bytes: None,
        };
        let ranges = covering_ranges(&[variable(0x1010, 8), variable(0x3000, 0x1001), variable(0x1ff0, 0x20)]);
        assert_eq!(
            ranges,
            [
                TrackedRange {
                    start: 0x1000,
                    end: 0x3000
                },
                TrackedRange {
                    start: 0x3000,
                    end: 0x5000
                }
            ]
        );
    }
}
