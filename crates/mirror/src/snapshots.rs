//! Snapshots of critical variables: the last N copies of each registered
//! variable (time, blake3 hash, bytes, what took it), and the copies taken
//! just before each patch activation (what `rollback --restore-state`
//! writes back).
//!
//! Persisted per target incarnation in `targets/<pid>-<start>/snapshots.json`,
//! written atomically under an advisory lock (`snapshots.lock`) so the
//! watcher, `shadowpatch snapshot` and `apply` can add to it at the same
//! time without losing each other's entries. The file stays bounded: at
//! most `keep` snapshots per variable, [`MAX_PRE_APPLY`] pre-activation
//! sets, and a variable's bytes are kept only up to
//! [`MAX_KEPT_BYTES`] (larger ones keep their hash only).

use crate::store::write_atomically;
use crate::variables::{load_versioned_json, CriticalVariable};
use crate::MirrorError;
use std::path::{Path, PathBuf};

/// File name of the snapshot history inside a target directory.
pub const SNAPSHOTS_FILE: &str = "snapshots.json";
const LOCK_FILE: &str = "snapshots.lock";
/// Version of the file format; a change of layout bumps it.
pub const SNAPSHOTS_FORMAT: u32 = 1;
/// Snapshots kept per variable unless told otherwise.
pub const DEFAULT_KEEP: usize = 16;
/// Most snapshots kept per variable (bounds the file).
pub const MAX_KEEP: usize = 1024;
/// Pre-activation sets kept (the newest patches).
pub const MAX_PRE_APPLY: usize = 16;
/// Largest variable whose bytes a snapshot keeps; a larger one keeps its
/// hash only (history still shows when it changed) and cannot be restored.
pub const MAX_KEPT_BYTES: u64 = 64 << 10;

/// One copy of one variable.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub unix_ms: u64,
    /// blake3 of the bytes, hex.
    pub hash: String,
    pub size: u64,
    /// What took it: `watch`, `snapshot`, `apply`.
    pub cause: String,
    /// The patch about to be activated, for `apply` snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_id: Option<String>,
    /// The bytes (None when larger than [`MAX_KEPT_BYTES`]).
    #[serde(default, with = "crate::variables::optional_hex")]
    pub bytes: Option<Vec<u8>>,
}

impl Snapshot {
    pub fn of(bytes: &[u8], unix_ms: u64, cause: &str, patch_id: Option<&str>) -> Snapshot {
        Snapshot {
            unix_ms,
            hash: blake3::hash(bytes).to_hex().to_string(),
            size: bytes.len() as u64,
            cause: cause.to_string(),
            patch_id: patch_id.map(str::to_string),
            bytes: (bytes.len() as u64 <= MAX_KEPT_BYTES).then(|| bytes.to_vec()),
        }
    }

    /// The value as a little-endian unsigned integer, for variables of at most 8 bytes.
    pub fn integer(&self) -> Option<u64> {
        let bytes = self.bytes.as_ref().filter(|b| !b.is_empty() && b.len() <= 8)?;
        let mut word = [0u8; 8];
        word[..bytes.len()].copy_from_slice(bytes);
        Some(u64::from_le_bytes(word))
    }
}

/// The snapshots of one variable, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VariableHistory {
    pub name: String,
    pub address: u64,
    pub size: u64,
    pub snapshots: Vec<Snapshot>,
}

/// One variable as it was just before a patch was activated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedVariable {
    pub name: String,
    pub address: u64,
    pub snapshot: Snapshot,
}

/// The mirrored variables as they were just before `patch_id` was activated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreApply {
    pub patch_id: String,
    pub unix_ms: u64,
    pub variables: Vec<SavedVariable>,
}

/// Every snapshot of one target incarnation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotFile {
    pub format: u32,
    pub pid: i32,
    pub start_time: u64,
    /// Snapshots kept per variable.
    pub keep: usize,
    pub variables: Vec<VariableHistory>,
    pub pre_apply: Vec<PreApply>,
}

impl SnapshotFile {
    pub fn new(pid: i32, start_time: u64) -> Self {
        SnapshotFile {
            format: SNAPSHOTS_FORMAT,
            pid,
            start_time,
            keep: DEFAULT_KEEP,
            variables: Vec::new(),
            pre_apply: Vec::new(),
        }
    }

    pub fn path_in(target_dir: &Path) -> PathBuf {
        target_dir.join(SNAPSHOTS_FILE)
    }

    /// The snapshots of a target directory; `None` when none were taken.
    pub fn load(target_dir: &Path) -> Result<Option<Self>, MirrorError> {
        load_versioned_json(
            &Self::path_in(target_dir),
            "variable snapshot file",
            SNAPSHOTS_FORMAT,
            |file: &Self| file.format,
        )
    }

    /// Read, change with `edit` and write back the file of `target_dir`,
    /// holding its lock throughout so concurrent writers lose nothing.
    pub fn update<T>(
        target_dir: &Path,
        pid: i32,
        start_time: u64,
        edit: impl FnOnce(&mut SnapshotFile) -> T,
    ) -> Result<T, MirrorError> {
        let lock_path = target_dir.join(LOCK_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MirrorError::Io { path, source }
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let mut file = Self::load(target_dir)?.unwrap_or_else(|| SnapshotFile::new(pid, start_time));
        let result = edit(&mut file);
        let path = Self::path_in(target_dir);
        let json = serde_json::to_vec(&file).expect("snapshots serialize");
        write_atomically(&path, &json).map_err(io(&path))?;
        // The lock is released when `lock` is closed.
        Ok(result)
    }

    /// Add `snapshot` of `variable`, dropping the oldest beyond `keep`.
    /// With `only_if_changed`, a snapshot whose hash equals the newest kept
    /// one is not added (the watcher records changes, not ticks). Returns
    /// whether it was added.
    pub fn record(&mut self, variable: &CriticalVariable, snapshot: Snapshot, only_if_changed: bool) -> bool {
        let keep = self.keep.clamp(1, MAX_KEEP);
        let position = self
            .variables
            .iter()
            .position(|h| h.address == variable.address && h.size == variable.size);
        let history = match position {
            Some(index) => &mut self.variables[index],
            None => {
                self.variables.push(VariableHistory {
                    name: variable.name.clone(),
                    address: variable.address,
                    size: variable.size,
                    snapshots: Vec::new(),
                });
                self.variables.last_mut().expect("just pushed")
            }
        };
        if only_if_changed && history.snapshots.last().is_some_and(|last| last.hash == snapshot.hash) {
            return false;
        }
        history.snapshots.push(snapshot);
        let excess = history.snapshots.len().saturating_sub(keep);
        history.snapshots.drain(..excess);
        true
    }

    /// Keep at most `keep` snapshots per variable from now on.
    pub fn set_keep(&mut self, keep: usize) {
        self.keep = keep.clamp(1, MAX_KEEP);
        for history in &mut self.variables {
            let excess = history.snapshots.len().saturating_sub(self.keep);
            history.snapshots.drain(..excess);
        }
    }

    /// The history of the variable named `name` (`module!symbol`, the bare
    /// symbol, or the `0xADDR:SIZE` name of an unnamed one).
    pub fn history(&self, name: &str) -> Option<&VariableHistory> {
        self.variables
            .iter()
            .find(|h| h.name == name)
            .or_else(|| self.variables.iter().find(|h| h.name.rsplit('!').next() == Some(name)))
    }

    /// Remember the variables as they were before `pre.patch_id` (replacing
    /// an older set of the same id), keeping the newest [`MAX_PRE_APPLY`].
    pub fn record_pre_apply(&mut self, pre: PreApply) {
        self.pre_apply.retain(|p| p.patch_id != pre.patch_id);
        self.pre_apply.push(pre);
        let excess = self.pre_apply.len().saturating_sub(MAX_PRE_APPLY);
        self.pre_apply.drain(..excess);
    }

    pub fn pre_apply(&self, patch_id: &str) -> Option<&PreApply> {
        self.pre_apply.iter().rev().find(|p| p.patch_id == patch_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variables::VariableMode;

    fn variable(address: u64, size: u64) -> CriticalVariable {
        CriticalVariable {
            name: format!("m!v{address:x}"),
            module: Some("m".into()),
            symbol: Some(format!("v{address:x}")),
            address,
            size,
            mode: VariableMode::Mirrored,
            build_id: None,
            registered_unix_ms: 0,
            origin: "test".into(),
            guarded_bytes: None,
        }
    }

    #[test]
    fn history_keeps_the_newest_n_and_records_changes_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let v = variable(0x1000, 8);
        SnapshotFile::update(dir.path(), 1, 2, |file| {
            file.set_keep(3);
            for value in 0u64..5 {
                assert!(file.record(&v, Snapshot::of(&value.to_le_bytes(), value, "watch", None), true));
                // The same value again is not a change.
                assert!(!file.record(&v, Snapshot::of(&value.to_le_bytes(), value, "watch", None), true));
            }
            assert!(file.record(&v, Snapshot::of(&4u64.to_le_bytes(), 9, "snapshot", None), false));
        })
        .unwrap();
        let file = SnapshotFile::load(dir.path()).unwrap().unwrap();
        let history = file.history("v1000").unwrap();
        let values: Vec<u64> = history.snapshots.iter().map(|s| s.integer().unwrap()).collect();
        assert_eq!(values, [3, 4, 4]);
        assert_eq!(
            history.snapshots[0].hash,
            blake3::hash(&3u64.to_le_bytes()).to_hex().to_string()
        );
        assert!(file.history("m!v1000").is_some());
        assert!(file.history("nothing").is_none());
    }

    #[test]
    fn large_variables_keep_their_hash_only_and_pre_apply_sets_are_bounded() {
        let big = vec![7u8; MAX_KEPT_BYTES as usize + 1];
        let snapshot = Snapshot::of(&big, 1, "watch", None);
        assert!(snapshot.bytes.is_none());
        assert_eq!(snapshot.size, big.len() as u64);
        let mut file = SnapshotFile::new(1, 2);
        for n in 0..MAX_PRE_APPLY + 3 {
            file.record_pre_apply(PreApply {
                patch_id: format!("p{n}"),
                unix_ms: n as u64,
                variables: Vec::new(),
            });
        }
        assert_eq!(file.pre_apply.len(), MAX_PRE_APPLY);
        assert!(file.pre_apply("p0").is_none());
        assert!(file.pre_apply(&format!("p{}", MAX_PRE_APPLY + 2)).is_some());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(SnapshotFile::path_in(dir.path()), b"[").unwrap();
        assert!(SnapshotFile::load(dir.path()).is_err());
    }
}
