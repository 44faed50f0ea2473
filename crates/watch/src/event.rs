//! What a watcher reports: one `WatchEvent` per thing that happened, with
//! its JSON form (one object per line on `--json`) and its row in the event
//! history.

use serde::Serialize;
use shadowpatch_store::{EventKind, NewEvent};
pub use shadowpatch_symbols::Location;

/// What was tampered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Executable memory (module text, the vDSO, patch code).
    Code,
    /// Read-only data of a module (.rodata, RELRO) or of a patch.
    ReadOnlyData,
    /// A critical variable declared `guarded`.
    GuardedVariable,
}

/// An integrity alert: live immutable bytes differ from the mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    pub unix_ms: u64,
    pub pid: i32,
    pub start_time: u64,
    /// The mirror generation the bytes were compared with.
    pub generation: u32,
    pub scope: Scope,
    pub address: u64,
    pub address_hex: String,
    /// Length of the differing run (bytes shown are cut at 64).
    pub len: u64,
    #[serde(flatten)]
    pub location: Location,
    /// The guarded variable concerned, if any.
    pub variable: Option<String>,
    /// Mirrored bytes (hex).
    pub expected: String,
    /// Live bytes (hex).
    pub live: String,
    /// Now minus the last time this page was verified clean.
    pub latency_us: u64,
}

/// A heal: mirrored bytes written back over tampered ones in one stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heal {
    pub unix_ms: u64,
    pub pid: i32,
    pub start_time: u64,
    pub generation: u32,
    pub ok: bool,
    /// The runs written back (address, length).
    pub runs: Vec<(u64, u64)>,
    pub bytes: u64,
    /// Pause of the target's threads during the write.
    pub pause_us: u64,
    /// The journal transaction that announced the writes.
    pub txn: Option<u64>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// How a watcher's start classified the target's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Classification {
    /// Verified against the mirror: code, read-only data, guarded variables.
    pub immutable: Vec<ClassRow>,
    /// Changes legitimately: never compared, never healed.
    pub mutable: Vec<ClassRow>,
    /// Neither mirrored nor writable (data files, kernel pages): not verified.
    pub unverified: Vec<ClassRow>,
}

/// One reason and how much memory it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassRow {
    pub reason: String,
    pub regions: usize,
    pub bytes: u64,
}

impl Classification {
    pub fn total(rows: &[ClassRow]) -> (usize, u64) {
        rows.iter().fold((0, 0), |(r, b), row| (r + row.regions, b + row.bytes))
    }
}

/// Everything a watcher reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WatchEvent {
    /// The watcher is ready: what it verifies, and how.
    Started {
        unix_ms: u64,
        pid: i32,
        start_time: u64,
        generation: u32,
        /// Generation 0 had to be captured first (no mirror existed).
        baseline_taken: bool,
        regions: usize,
        pages: u64,
        bytes: u64,
        guarded_variables: Vec<String>,
        guarded_bytes: u64,
        /// Mirrored variables (copied each pass, with a history).
        mirrored_variables: Vec<String>,
        mirrored_bytes: u64,
        /// How their written pages are found (None: no mirrored variable).
        dirty_method: Option<shadowpatch_mirror::DirtyMethod>,
        /// More preferred methods that are unavailable, each with why.
        dirty_skipped: Vec<String>,
        /// Snapshots kept per mirrored variable.
        history: usize,
        classification: Classification,
        interval_ms: u64,
        cpu_budget_percent: f64,
        heal: bool,
        /// The per-run key was derived and every stored page re-hashed with it.
        rehash_us: u64,
    },
    Alert(Alert),
    /// Mirrored bytes were written back (or the attempt failed).
    Heal(Heal),
    /// A previously alerted page holds its mirrored bytes again.
    Cleared {
        unix_ms: u64,
        address: u64,
        address_hex: String,
        #[serde(flatten)]
        location: Location,
    },
    /// A mirrored region's permissions changed (e.g. code made writable):
    /// suspicious, and its bytes stay verified.
    PermissionsChanged {
        unix_ms: u64,
        start: u64,
        end: u64,
        module: String,
        mirrored: String,
        live: String,
    },
    /// Executable memory that is in no mirror generation and that no
    /// journaled transaction mapped (dlopen, JIT, injected code).
    NewExecutableMapping {
        unix_ms: u64,
        start: u64,
        end: u64,
        perms: String,
        name: String,
    },
    /// A mirrored region is no longer mapped (dlclose, or unmapped by
    /// someone else): no longer verified.
    RegionUnmapped {
        unix_ms: u64,
        start: u64,
        end: u64,
        module: String,
    },
    /// An authorised change (apply, rollback) published a new generation;
    /// the watcher now verifies against it.
    GenerationSwitched {
        unix_ms: u64,
        from: u32,
        to: u32,
        regions: usize,
        bytes: u64,
        rehash_us: u64,
    },
    /// One full pass over everything watched (for status lines; not stored).
    Pass {
        pass: u64,
        generation: u32,
        bytes: u64,
        pass_us: u64,
        /// Watcher thread CPU time / wall time since the start, in percent.
        cpu_percent: f64,
        alerts: u64,
        heals: u64,
    },
    /// Something the user should know that does not stop the watch
    /// (history unwritable, a hook failed or timed out, a heal skipped).
    Warning {
        unix_ms: u64,
        message: String,
    },
    /// The target exited (or its pid now names another process).
    TargetExited {
        unix_ms: u64,
        pid: i32,
        reason: String,
    },
    /// The watcher stopped.
    /// A mirrored variable's bytes changed: a new snapshot was kept.
    Snapshot {
        unix_ms: u64,
        variable: String,
        address: u64,
        size: u64,
        hash: String,
        /// The value, for variables of at most 8 bytes (little-endian).
        value: Option<u64>,
    },
    Stopped {
        unix_ms: u64,
        reason: String,
        /// The dirty-tracking method was undone in the target (None: none ran).
        dirty_method_undone: Option<bool>,
        passes: u64,
        alerts: u64,
        heals: u64,
        cpu_percent: f64,
    },
}

impl WatchEvent {
    /// The event-history row for this event (`None`: not stored).
    pub fn history_row(&self, pid: i32, start_time: u64) -> Option<NewEvent> {
        let details = serde_json::to_value(self).expect("events serialize");
        let row = |kind| NewEvent::new(kind).target(pid, start_time).details(details.clone());
        Some(match self {
            WatchEvent::Started { unix_ms, .. } => row(EventKind::WatchStart).at(*unix_ms).outcome("watching"),
            WatchEvent::Alert(alert) => row(EventKind::Alert)
                .at(alert.unix_ms)
                .cause("tampered")
                .outcome("differs")
                .duration_us(alert.latency_us),
            WatchEvent::Heal(heal) => row(EventKind::Heal)
                .at(heal.unix_ms)
                .cause("tampered")
                .outcome(if heal.ok { "ok" } else { "failed" })
                .duration_us(heal.pause_us),
            WatchEvent::PermissionsChanged { unix_ms, .. } => {
                row(EventKind::Alert).at(*unix_ms).cause("permissions_changed")
            }
            WatchEvent::NewExecutableMapping { unix_ms, .. } => {
                row(EventKind::Alert).at(*unix_ms).cause("new_executable_mapping")
            }
            WatchEvent::RegionUnmapped { unix_ms, .. } => row(EventKind::Alert).at(*unix_ms).cause("region_unmapped"),
            WatchEvent::Cleared { unix_ms, .. } => {
                row(EventKind::Verify).at(*unix_ms).cause("cleared").outcome("clean")
            }
            WatchEvent::TargetExited { unix_ms, .. } => row(EventKind::WatchStop)
                .at(*unix_ms)
                .cause("target_exited")
                .outcome("stopped"),
            WatchEvent::Stopped { unix_ms, reason, .. } => row(EventKind::WatchStop)
                .at(*unix_ms)
                .cause(reason.clone())
                .outcome("stopped"),
            // Snapshots are kept in the target's snapshots.json, bounded;
            // a row each would grow the history without bound.
            WatchEvent::GenerationSwitched { .. }
            | WatchEvent::Pass { .. }
            | WatchEvent::Warning { .. }
            | WatchEvent::Snapshot { .. } => return None,
        })
    }

    /// The event's name, as in its JSON `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            WatchEvent::Started { .. } => "started",
            WatchEvent::Alert(_) => "alert",
            WatchEvent::Heal(_) => "heal",
            WatchEvent::Cleared { .. } => "cleared",
            WatchEvent::PermissionsChanged { .. } => "permissions_changed",
            WatchEvent::NewExecutableMapping { .. } => "new_executable_mapping",
            WatchEvent::RegionUnmapped { .. } => "region_unmapped",
            WatchEvent::GenerationSwitched { .. } => "generation_switched",
            WatchEvent::Pass { .. } => "pass",
            WatchEvent::Warning { .. } => "warning",
            WatchEvent::TargetExited { .. } => "target_exited",
            WatchEvent::Snapshot { .. } => "snapshot",
            WatchEvent::Stopped { .. } => "stopped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_the_event_and_flattens_the_location() {
        let alert = WatchEvent::Alert(Alert {
            unix_ms: 1,
            pid: 2,
            start_time: 3,
            generation: 0,
            scope: Scope::Code,
            address: 0x10,
            address_hex: "0x10".into(),
            len: 1,
            location: Location {
                module: Some("busy".into()),
                symbol: Some("cold_path".into()),
                offset: Some(3),
                location: "busy!cold_path+0x3".into(),
            },
            variable: None,
            expected: "aa".into(),
            live: "bb".into(),
            latency_us: 5,
        });
        let json = serde_json::to_value(&alert).unwrap();
        assert_eq!(json["event"], "alert");
        assert_eq!(json["symbol"], "cold_path");
        assert_eq!(json["scope"], "code");
        assert_eq!(alert.name(), "alert");
        let row = alert.history_row(2, 3).unwrap();
        assert_eq!(row.kind, EventKind::Alert);
        assert_eq!(row.duration_us, Some(5));
    }
}
