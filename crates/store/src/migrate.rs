//! Schema migrations. Each entry of `MIGRATIONS` takes the schema from
//! version `i` to `i + 1` and runs in one transaction with the
//! `user_version` bump, so a crash mid-migration leaves the old version.
//! Never edit a released migration: append a new one.

use crate::{classify, StoreError};
use rusqlite::Connection;
use std::path::Path;

const MIGRATIONS: &[&str] = &[
    // 1: the event log.
    "CREATE TABLE events (
         id          INTEGER PRIMARY KEY,
         unix_ms     INTEGER NOT NULL,
         kind        TEXT    NOT NULL,
         pid         INTEGER,
         start_time  INTEGER,
         patch_id    TEXT,
         cause       TEXT,
         outcome     TEXT,
         duration_us INTEGER,
         details     TEXT    NOT NULL DEFAULT '{}'
     );
     CREATE INDEX events_by_target ON events (pid, start_time, unix_ms);
     CREATE INDEX events_by_time ON events (unix_ms);
     CREATE INDEX events_by_kind ON events (kind, unix_ms);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

fn user_version(connection: &Connection, path: &Path) -> Result<u32, StoreError> {
    connection
        .query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))
        .map(|v| v as u32)
        .map_err(|e| classify(path, e))
}

/// Refuse a newer schema, and a database that has tables but no
/// shadowpatch schema version (someone else's file).
pub(crate) fn check_writable(connection: &Connection, path: &Path) -> Result<(), StoreError> {
    let found = user_version(connection, path)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::FutureVersion {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == 0 {
        let tables: i64 = connection
            .query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0))
            .map_err(|e| classify(path, e))?;
        if tables > 0 {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                message: format!("it has {tables} schema objects but no shadowpatch schema version"),
            });
        }
    }
    Ok(())
}

/// Bring the database to `SCHEMA_VERSION` (after `check_writable`).
pub(crate) fn run(connection: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found = user_version(connection, path)?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let next = index as u32 + 1;
        // IMMEDIATE: take the write lock before reading the version, so two
        // processes migrating at once queue instead of deadlocking.
        let transaction = connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| classify(path, e))?;
        // Another process may have migrated since we read the version.
        let now = user_version(&transaction, path)?;
        if now >= next {
            continue;
        }
        transaction.execute_batch(sql).map_err(|e| classify(path, e))?;
        transaction
            .pragma_update(None, "user_version", next)
            .map_err(|e| classify(path, e))?;
        transaction.commit().map_err(|e| classify(path, e))?;
    }
    Ok(())
}

/// For read-only opens: the version must be one this build can read.
pub(crate) fn check_readable(connection: &Connection, path: &Path) -> Result<(), StoreError> {
    let found = user_version(connection, path)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::FutureVersion {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == 0 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            message: "no shadowpatch schema".into(),
        });
    }
    Ok(())
}
