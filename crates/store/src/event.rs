//! What an event is: its kind, the target it concerns, and free-form JSON
//! details (evidence, bytes, timings) that each kind fills as it needs.

use crate::StoreError;
use std::path::Path;

/// What happened. Stored as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Attach,
    Mirror,
    Verify,
    /// An integrity alert: live immutable memory differs from the mirror.
    Alert,
    /// Mirrored bytes written back over tampered ones.
    Heal,
    /// A prediction-engine analysis and its verdict.
    Analysis,
    Apply,
    /// A rollback; `cause` says why (command, crash, health, request...).
    Rollback,
    Recover,
    /// A watcher started or stopped on a target.
    WatchStart,
    WatchStop,
    /// The judgement at the end of a post-activation watch window.
    WatchVerdict,
    /// Critical variables copied.
    Snapshot,
    /// An application asked for a rollback.
    RollbackRequest,
    /// The agent started, stopped or recovered.
    Agent,
    /// `gc` removed the state of a dead target (what it held is in the
    /// details; the history itself is kept).
    Gc,
    /// A persisted patch: its rule added or removed, or a process of its
    /// scope left unpatched because its build-id changed.
    Persist,
    /// A process forked from a patched one took over its ancestor's patch
    /// state as of the fork (fork adoption).
    Adopt,
}

impl EventKind {
    pub const ALL: [EventKind; 18] = [
        EventKind::Attach,
        EventKind::Mirror,
        EventKind::Verify,
        EventKind::Alert,
        EventKind::Heal,
        EventKind::Analysis,
        EventKind::Apply,
        EventKind::Rollback,
        EventKind::Recover,
        EventKind::WatchStart,
        EventKind::WatchStop,
        EventKind::WatchVerdict,
        EventKind::Snapshot,
        EventKind::RollbackRequest,
        EventKind::Agent,
        EventKind::Gc,
        EventKind::Persist,
        EventKind::Adopt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Attach => "attach",
            EventKind::Mirror => "mirror",
            EventKind::Verify => "verify",
            EventKind::Alert => "alert",
            EventKind::Heal => "heal",
            EventKind::Analysis => "analysis",
            EventKind::Apply => "apply",
            EventKind::Rollback => "rollback",
            EventKind::Recover => "recover",
            EventKind::WatchStart => "watch_start",
            EventKind::WatchStop => "watch_stop",
            EventKind::WatchVerdict => "watch_verdict",
            EventKind::Snapshot => "snapshot",
            EventKind::RollbackRequest => "rollback_request",
            EventKind::Agent => "agent",
            EventKind::Gc => "gc",
            EventKind::Persist => "persist",
            EventKind::Adopt => "adopt",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event to record. Build with [`NewEvent::new`] and the setters.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NewEvent {
    pub kind: EventKind,
    /// When it happened (defaults to now).
    pub unix_ms: Option<u64>,
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
    pub patch_id: Option<String>,
    pub cause: Option<String>,
    /// ok, refused, failed, clean, differs, keep, rollback, ...
    pub outcome: Option<String>,
    pub duration_us: Option<u64>,
    pub details: serde_json::Value,
}

impl NewEvent {
    pub fn new(kind: EventKind) -> Self {
        NewEvent {
            kind,
            unix_ms: None,
            pid: None,
            start_time: None,
            patch_id: None,
            cause: None,
            outcome: None,
            duration_us: None,
            details: serde_json::Value::Object(Default::default()),
        }
    }

    /// The target, named as everywhere else by pid and start time.
    pub fn target(mut self, pid: i32, start_time: u64) -> Self {
        self.pid = Some(pid);
        self.start_time = Some(start_time);
        self
    }

    pub fn at(mut self, unix_ms: u64) -> Self {
        self.unix_ms = Some(unix_ms);
        self
    }

    pub fn patch(mut self, patch_id: impl Into<String>) -> Self {
        self.patch_id = Some(patch_id.into());
        self
    }

    pub fn cause(mut self, cause: impl Into<String>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn outcome(mut self, outcome: impl Into<String>) -> Self {
        self.outcome = Some(outcome.into());
        self
    }

    pub fn duration_us(mut self, duration_us: u64) -> Self {
        self.duration_us = Some(duration_us);
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    pub id: i64,
    pub unix_ms: u64,
    pub kind: EventKind,
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
    pub patch_id: Option<String>,
    pub cause: Option<String>,
    pub outcome: Option<String>,
    pub duration_us: Option<u64>,
    pub details: serde_json::Value,
}

/// Which events to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
    pub since_unix_ms: Option<u64>,
    /// Empty: every kind.
    pub kinds: Vec<EventKind>,
    pub patch_id: Option<String>,
    /// Only the newest N.
    pub limit: Option<u64>,
}

/// A row as SQLite returns it, before its text columns are parsed.
pub(crate) struct RawRow {
    id: i64,
    unix_ms: i64,
    kind: String,
    pid: Option<i32>,
    start_time: Option<i64>,
    patch_id: Option<String>,
    cause: Option<String>,
    outcome: Option<String>,
    duration_us: Option<i64>,
    details: String,
}

impl RawRow {
    pub(crate) fn from_row(row: &rusqlite::Row) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            id: row.get(0)?,
            unix_ms: row.get(1)?,
            kind: row.get(2)?,
            pid: row.get(3)?,
            start_time: row.get(4)?,
            patch_id: row.get(5)?,
            cause: row.get(6)?,
            outcome: row.get(7)?,
            duration_us: row.get(8)?,
            details: row.get(9)?,
        })
    }

    pub(crate) fn into_event(self, path: &Path) -> Result<Event, StoreError> {
        let bad = |message: String| StoreError::BadRow {
            path: path.to_path_buf(),
            id: self.id,
            message,
        };
        let kind = EventKind::parse(&self.kind).ok_or_else(|| bad(format!("unknown kind {:?}", self.kind)))?;
        let details = serde_json::from_str(&self.details).map_err(|e| bad(format!("details are not JSON: {e}")))?;
        Ok(Event {
            id: self.id,
            unix_ms: self.unix_ms as u64,
            kind,
            pid: self.pid,
            start_time: self.start_time.map(|t| t as u64),
            patch_id: self.patch_id,
            cause: self.cause,
            outcome: self.outcome,
            duration_us: self.duration_us.map(|d| d as u64),
            details,
        })
    }
}
