//! The event history: every attach, mirror, alert, heal, analysis, apply,
//! rollback (with its cause) and watch verdict, with timings, in an embedded
//! SQLite database (`STATE/history.db`).
//!
//! Several shadowpatch processes write it at once (a watcher, the agent, a
//! CLI apply), so the database runs in WAL mode with a busy timeout, and
//! every write is one short transaction. The schema evolves by numbered
//! migrations (`migrate.rs`) recorded in SQLite's `user_version`; a database
//! written by a newer shadowpatch is refused rather than misread.

#![forbid(unsafe_code)]

mod event;
mod migrate;

pub use event::{Event, EventFilter, EventKind, NewEvent};
pub use migrate::SCHEMA_VERSION;

use rusqlite::{params, Connection, OpenFlags};
use shadowpatch_sys::stamp::FileStamp;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File name of the database inside the state directory.
pub const DATABASE_FILE: &str = "history.db";

/// How long a writer waits for another process's transaction to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("event history {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error(
        "event history {path} has schema version {found}, newer than this shadowpatch understands ({supported}); \
         use the newer shadowpatch or move the file away"
    )]
    FutureVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("event history {path} is not a shadowpatch database or is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("event history {path}: stored event {id} is unreadable: {message}")]
    BadRow { path: PathBuf, id: i64, message: String },
}

impl StoreError {
    /// Errors the user must fix (a foreign, corrupt or future database)
    /// rather than a failure midway.
    pub fn is_bad_input(&self) -> bool {
        shadowpatch_failure::Classify::is_bad_input(self)
    }
}

impl shadowpatch_failure::Classify for StoreError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        match self {
            StoreError::Sqlite { .. } => shadowpatch_failure::FailureClass::FailedMidway,
            _ => shadowpatch_failure::FailureClass::BadInput,
        }
    }
}

/// An open event history.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    connection: Connection,
}

impl Store {
    /// Open (creating and migrating) the history in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Self::open_file(&state_dir.join(DATABASE_FILE))
    }

    /// Open (creating and migrating) the database at `path`.
    pub fn open_file(path: &Path) -> Result<Store, StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let connection = Connection::open(path).map_err(sqlite)?;
        restrict_permissions(path);
        let mut store = Store {
            path: path.to_path_buf(),
            connection,
        };
        store
            .connection
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| store.sqlite(e))?;
        // Refuse a foreign or newer database before changing anything in it
        // (switching to WAL rewrites the header).
        migrate::check_writable(&store.connection, path)?;
        store.configure()?;
        migrate::run(&mut store.connection, path)?;
        Ok(store)
    }

    /// Open an existing history for reading only; `None` when there is none.
    pub fn open_read_only(state_dir: &Path) -> Result<Option<Store>, StoreError> {
        let path = state_dir.join(DATABASE_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let connection = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
            StoreError::Sqlite {
                path: path.clone(),
                source,
            }
        })?;
        let store = Store { path, connection };
        store
            .connection
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|source| store.sqlite(source))?;
        migrate::check_readable(&store.connection, &store.path)?;
        Ok(Some(store))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sqlite(&self, source: rusqlite::Error) -> StoreError {
        classify(&self.path, source)
    }

    fn configure(&mut self) -> Result<(), StoreError> {
        // WAL: readers never block the writer, and several processes
        // (watcher, agent, CLI) append concurrently. NORMAL sync is durable
        // across a process crash, which is what the history must survive; the
        // journal, not this database, is what makes the target safe.
        self.connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| self.sqlite(e))?;
        self.connection
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| self.sqlite(e))?;
        Ok(())
    }

    /// Append `events` in one transaction (all or none); returns their
    /// ids, in order.
    pub fn record_all(&self, events: &[&NewEvent]) -> Result<Vec<i64>, StoreError> {
        let now = now_ms();
        self.insert_all(&events.iter().map(|event| Row::of(event, now)).collect::<Vec<_>>())
    }

    /// Append one event; returns its id.
    pub fn record(&self, event: &NewEvent) -> Result<i64, StoreError> {
        self.insert(&Row::of(event, now_ms()))
    }

    fn insert_all(&self, rows: &[Row]) -> Result<Vec<i64>, StoreError> {
        let transaction = self.connection.unchecked_transaction().map_err(|e| self.sqlite(e))?;
        let ids = rows.iter().map(|row| self.insert(row)).collect::<Result<Vec<_>, _>>()?;
        transaction.commit().map_err(|e| self.sqlite(e))?;
        Ok(ids)
    }

    fn insert(&self, row: &Row) -> Result<i64, StoreError> {
        // Cached: a connection kept open (`OpenHistories`) records two
        // events per member of a host-wide apply, and parsing the
        // statement each time was a sixth of the insert.
        self.connection
            .prepare_cached(
                "INSERT INTO events (unix_ms, kind, pid, start_time, patch_id, cause, outcome, duration_us, details)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut insert| {
                insert.execute(params![
                    row.unix_ms as i64,
                    row.kind.as_str(),
                    row.pid,
                    row.start_time.map(|t| t as i64),
                    row.patch_id,
                    row.cause,
                    row.outcome,
                    row.duration_us.map(|d| d as i64),
                    row.details,
                ])
            })
            .map_err(|e| self.sqlite(e))?;
        Ok(self.connection.last_insert_rowid())
    }

    /// Events matching `filter`, oldest first (the newest `limit` of them
    /// when a limit is set).
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let mut sql = String::from(
            "SELECT id, unix_ms, kind, pid, start_time, patch_id, cause, outcome, duration_us, details
             FROM events WHERE 1 = 1",
        );
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(pid) = filter.pid {
            sql.push_str(" AND pid = ?");
            values.push(i64::from(pid).into());
        }
        if let Some(start_time) = filter.start_time {
            sql.push_str(" AND start_time = ?");
            values.push((start_time as i64).into());
        }
        if let Some(since) = filter.since_unix_ms {
            sql.push_str(" AND unix_ms >= ?");
            values.push((since as i64).into());
        }
        if !filter.kinds.is_empty() {
            sql.push_str(" AND kind IN (");
            for (i, kind) in filter.kinds.iter().enumerate() {
                sql.push_str(if i == 0 { "?" } else { ", ?" });
                values.push(kind.as_str().to_string().into());
            }
            sql.push(')');
        }
        if let Some(patch_id) = &filter.patch_id {
            sql.push_str(" AND patch_id = ?");
            values.push(patch_id.clone().into());
        }
        sql.push_str(" ORDER BY unix_ms DESC, id DESC");
        if let Some(limit) = filter.limit {
            sql.push_str(" LIMIT ?");
            values.push((limit as i64).into());
        }
        let mut statement = self.connection.prepare(&sql).map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(values), event::RawRow::from_row)
            .map_err(|e| self.sqlite(e))?;
        let mut events = Vec::new();
        for row in rows {
            let raw = row.map_err(|e| self.sqlite(e))?;
            events.push(raw.into_event(&self.path)?);
        }
        events.reverse();
        Ok(events)
    }

    /// How many events are stored.
    pub fn count(&self) -> Result<u64, StoreError> {
        self.connection
            .query_row("SELECT COUNT(*) FROM events", [], |row| row.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.sqlite(e))
    }
}

/// Turn SQLite's "not a database" and corruption codes into `Corrupt`.
fn classify(path: &Path, source: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            message: source.to_string(),
        },
        _ => StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// The history holds pids, patch ids and alert bytes: root's only, like the
/// rest of the state directory (0700). Best effort: a failure here leaves
/// the directory's own permissions as the guard.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Record `event` in the history of `state_dir`, logging (never returning)
/// a failure: the history must not make an operation on a target fail.
pub fn record_best_effort(state_dir: &Path, event: &NewEvent) {
    record_all_best_effort(state_dir, &[event]);
}

/// [`record_best_effort`] of several events, in one transaction: an apply
/// records its analysis and its outcome together (one commit of the
/// shared history per member of a host-wide apply, not two).
pub fn record_all_best_effort(state_dir: &Path, events: &[&NewEvent]) {
    // Rendered (details as JSON text) before any lock is taken.
    let now = now_ms();
    let rows: Vec<Row> = events.iter().map(|event| Row::of(event, now)).collect();
    if let Some(rows) = HELD.hold(state_dir, rows) {
        write_best_effort(state_dir, &rows);
    }
}

fn write_best_effort(state_dir: &Path, rows: &[Row]) {
    use std::os::unix::fs::DirBuilderExt;
    // The state directory is root's only (0700), as `mirror` creates it.
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir);
    if let Err(error) = OPEN.record(state_dir, rows) {
        let kinds: Vec<&str> = rows.iter().map(|row| row.kind.as_str()).collect();
        tracing::warn!(%error, kinds = %kinds.join(", "), "could not record the events in the history");
    }
}

/// An event as the row it is inserted as: its time decided, its details
/// JSON text. Events are rendered before any lock is taken: the details
/// of an analysis are a large tree, and cloning or serializing it under
/// the history's lock made a host-wide set's workers queue there.
#[derive(Debug)]
struct Row {
    unix_ms: u64,
    kind: EventKind,
    pid: Option<i32>,
    start_time: Option<u64>,
    patch_id: Option<String>,
    cause: Option<String>,
    outcome: Option<String>,
    duration_us: Option<u64>,
    details: String,
}

impl Row {
    /// `event`, at `now` unless it says when it happened.
    fn of(event: &NewEvent, now: u64) -> Row {
        Row {
            unix_ms: event.unix_ms.unwrap_or(now),
            kind: event.kind,
            pid: event.pid,
            start_time: event.start_time,
            patch_id: event.patch_id.clone(),
            cause: event.cause.clone(),
            outcome: event.outcome.clone(),
            duration_us: event.duration_us,
            details: serde_json::to_string(&event.details).expect("JSON values serialize"),
        }
    }
}

/// While a host-wide set works (a [`HistoryGroup`] is open), the events
/// [`record_all_best_effort`] is given for its state directory are held
/// and written [`GROUP`] at a time, in one transaction, instead of one
/// commit per member: each commit rewrote the same table and index pages
/// into the write-ahead log. The cost: a tool killed in the middle of the
/// set loses the events it held (at most `GROUP - 1`); the members'
/// journals, which recovery reads, are unaffected, and recovery records
/// what it finds. Each event keeps the time it was given at.
#[derive(Debug)]
pub struct HistoryGroup {
    state_dir: PathBuf,
}

/// Held events are written once this many wait.
pub const GROUP: usize = 64;

impl HistoryGroup {
    /// Hold the events of `state_dir` until the group is dropped (groups
    /// may nest or overlap: events are held while one is open).
    pub fn open(state_dir: &Path) -> HistoryGroup {
        let mut held = HELD.lock();
        match held.iter_mut().find(|(dir, _, _)| dir == state_dir) {
            Some((_, open, _)) => *open += 1,
            None => held.push((state_dir.to_path_buf(), 1, Vec::new())),
        }
        HistoryGroup {
            state_dir: state_dir.to_path_buf(),
        }
    }
}

impl Drop for HistoryGroup {
    /// Writes what is held (best effort, as each event would have been).
    fn drop(&mut self) {
        let mut held = HELD.lock();
        let Some(at) = held.iter().position(|(dir, _, _)| *dir == self.state_dir) else {
            return;
        };
        let events = std::mem::take(&mut held[at].2);
        held[at].1 -= 1;
        if held[at].1 == 0 {
            held.remove(at);
        }
        // Written under the lock: held events reach the history in the
        // order they were given.
        if !events.is_empty() {
            write_best_effort(&self.state_dir, &events);
        }
    }
}

/// State directories with open groups: how many, and their held events.
struct HeldEvents(std::sync::Mutex<Vec<(PathBuf, usize, Vec<Row>)>>);

static HELD: HeldEvents = HeldEvents(std::sync::Mutex::new(Vec::new()));

impl HeldEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(PathBuf, usize, Vec<Row>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold `rows` if a group is open for `state_dir` (or give them
    /// back: write them yourself); the group's rows are written once it
    /// is full.
    fn hold(&self, state_dir: &Path, rows: Vec<Row>) -> Option<Vec<Row>> {
        let mut held = self.lock();
        let Some((_, _, waiting)) = held.iter_mut().find(|(dir, _, _)| dir == state_dir) else {
            return Some(rows);
        };
        waiting.extend(rows);
        if waiting.len() >= GROUP {
            // Under the lock, as a group's last events are: in order.
            let full = std::mem::take(waiting);
            write_best_effort(state_dir, &full);
        }
        None
    }
}

/// Record `event` in the history of `state_dir` (an existing directory),
/// through a connection kept open between calls (see [`OpenHistories`]);
/// returns the event's id.
pub fn record_in(state_dir: &Path, event: &NewEvent) -> Result<i64, StoreError> {
    Ok(OPEN.record(state_dir, &[Row::of(event, now_ms())])?[0])
}

/// Histories kept open between [`record_in`] calls: opening one
/// checks its schema, and closing the last connection checkpoints the WAL
/// with fsyncs, which cost more than the insert itself when a set
/// operation records two events per process. A connection is reused only
/// while the database file is the one it opened, unchanged since our last
/// write (same device, inode, size and mtime); anything else (the file
/// replaced, moved away, checkpointed or rewritten by another process)
/// opens it again, with the same checks as a first open.
struct OpenHistories {
    entries: std::sync::Mutex<Vec<(PathBuf, FileStamp, Store)>>,
}

static OPEN: OpenHistories = OpenHistories {
    entries: std::sync::Mutex::new(Vec::new()),
};

impl OpenHistories {
    /// At most this many state directories' histories stay open.
    const CAPACITY: usize = 4;

    fn record(&self, state_dir: &Path, rows: &[Row]) -> Result<Vec<i64>, StoreError> {
        let path = state_dir.join(DATABASE_FILE);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = FileStamp::of(&path);
        let at = entries.iter().position(|(p, _, _)| *p == path);
        let store = match at.map(|at| entries.remove(at)) {
            Some((_, kept, store)) if Some(kept) == stamp => store,
            _ => Store::open(state_dir)?,
        };
        let recorded = store.insert_all(rows);
        if recorded.is_ok() {
            if let Some(stamp) = FileStamp::of(&path) {
                if entries.len() >= Self::CAPACITY {
                    entries.remove(0);
                }
                entries.push((path, stamp, store));
            }
        }
        recorded
    }
}
