//! The service's database: verdict requests, outcomes and promoted
//! models, in SQLite (default) or PostgreSQL through one code path: sqlx's
//! `any` driver, the same SQL text for both (portable types only: TEXT,
//! BIGINT, DOUBLE PRECISION; `$N` parameters, which SQLite reads too), and
//! one list of migrations tracked in sqlx's `_sqlx_migrations` table.
//!
//! A database migrated by a newer binary (a version this one does not
//! know) is refused before anything is read or written: its tables may no
//! longer mean what this binary thinks.

use serde::{Deserialize, Serialize};
use shadowpatch_predict::remote::{ModelVersion, Outcome, OutcomeKind, VerdictRequest};
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use sqlx::AnyPool;
use sqlx::{Row, SqlSafeStr};
use std::collections::BTreeMap;
use std::time::Duration;

/// The schema, one migration per version, in order. Never edit a shipped
/// one (its checksum is recorded): add the next version.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "verdicts, outcomes and promoted models",
    "CREATE TABLE verdicts (
        analysis_id TEXT PRIMARY KEY,
        received_at_ms BIGINT NOT NULL,
        host TEXT NOT NULL,
        patch_id TEXT NOT NULL,
        build_id TEXT NOT NULL,
        program TEXT,
        features TEXT NOT NULL,
        risk DOUBLE PRECISION NOT NULL,
        verdict TEXT NOT NULL,
        model_version BIGINT NOT NULL
    );
    CREATE TABLE outcomes (
        id TEXT PRIMARY KEY,
        received_at_ms BIGINT NOT NULL,
        host TEXT NOT NULL,
        analysis_id TEXT,
        patch_id TEXT NOT NULL,
        build_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        cause TEXT,
        features TEXT NOT NULL,
        at_unix_ms BIGINT NOT NULL
    );
    CREATE INDEX outcomes_by_patch ON outcomes (patch_id, build_id);
    CREATE TABLE models (
        version BIGINT PRIMARY KEY,
        name TEXT NOT NULL,
        trained_on BIGINT NOT NULL,
        held_out_auc DOUBLE PRECISION,
        promoted_at_ms BIGINT NOT NULL,
        model_json TEXT NOT NULL
    );",
)];

/// The newest schema version this binary knows.
pub fn known_schema_version() -> i64 {
    MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0)
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database {database}: {source}")]
    Connect { database: String, source: sqlx::Error },
    #[error(
        "database {database}: schema version {found} is newer than this shadowpatch-predictor knows ({known}); \
         run the newer shadowpatch-predictor"
    )]
    NewerSchema { database: String, found: i64, known: i64 },
    #[error("database {database}: migrating the schema: {source}")]
    Migrate { database: String, source: MigrateError },
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
    #[error("database: stored {what} is not valid JSON: {source}")]
    Corrupt {
        what: &'static str,
        source: serde_json::Error,
    },
}

/// Outcomes of one patch on one build-id, per host and kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetHistory {
    /// host → kind → count.
    pub by_host: BTreeMap<String, BTreeMap<String, u64>>,
}

/// One stored outcome with the features to learn from (its own, else
/// those of the verdict request it names).
#[derive(Debug, Clone)]
pub struct LabelRow {
    pub host: String,
    pub patch_id: String,
    pub build_id: String,
    pub kind: OutcomeKind,
    pub at_unix_ms: u64,
    pub features: BTreeMap<String, f64>,
}

/// A promoted model as stored.
#[derive(Debug, Clone)]
pub struct StoredModel {
    pub version: ModelVersion,
    pub model_json: String,
}

/// The database, migrated.
#[derive(Debug, Clone)]
pub struct Storage {
    pool: AnyPool,
}

/// `url` without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn sql(text: &'static str) -> sqlx::SqlStr {
    text.into_sql_str()
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn kind_name(kind: OutcomeKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn kind_of(name: &str) -> Option<OutcomeKind> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

impl Storage {
    /// Connect to `url` (`sqlite:PATH` or `postgres://...`), refuse a
    /// newer schema, and migrate an older one. `acquire_timeout` bounds
    /// how long a request waits for a database that is down.
    pub async fn open(url: &str, acquire_timeout: Duration) -> Result<Storage, StorageError> {
        sqlx::any::install_default_drivers();
        let database = redact(url);
        let url = if url.starts_with("sqlite:") && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(acquire_timeout)
            .connect(&url)
            .await
            .map_err(|source| StorageError::Connect {
                database: database.clone(),
                source,
            })?;
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, text)| {
                Migration::new(*version, (*description).into(), MigrationType::Simple, sql(text), false)
            })
            .collect();
        let migrator = Migrator::with_migrations(migrations);
        match migrator.run(&pool).await {
            Ok(()) => Ok(Storage { pool }),
            // An applied version this binary does not list: a newer one
            // migrated the database.
            Err(MigrateError::VersionMissing(found)) if found > known_schema_version() => {
                Err(StorageError::NewerSchema {
                    database,
                    found,
                    known: known_schema_version(),
                })
            }
            Err(source) => Err(StorageError::Migrate { database, source }),
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StorageError> {
        sqlx::query(sql("SELECT 1")).execute(&self.pool).await?;
        Ok(())
    }

    /// Record a verdict request and the service's answer.
    pub async fn insert_verdict(
        &self,
        analysis_id: &str,
        received_at_ms: u64,
        request: &VerdictRequest,
        risk: f64,
        verdict: &str,
        model_version: u64,
    ) -> Result<(), StorageError> {
        sqlx::query(sql(
            "INSERT INTO verdicts (analysis_id, received_at_ms, host, patch_id, build_id, program, features, \
             risk, verdict, model_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        ))
        .bind(analysis_id.to_string())
        .bind(to_i64(received_at_ms))
        .bind(request.host.clone())
        .bind(request.patch_id.clone())
        .bind(request.build_id.clone().unwrap_or_default())
        .bind(request.program.clone())
        .bind(serde_json::to_string(&request.features).expect("features serialize"))
        .bind(risk)
        .bind(verdict.to_string())
        .bind(to_i64(model_version))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Store `outcomes` in one transaction, committed (and so durable)
    /// before this returns. An outcome already stored (same host, patch,
    /// build-id, kind and time: a host resending after a lost answer) is
    /// kept once. Returns how many of `outcomes` are now stored.
    pub async fn insert_outcomes(&self, outcomes: &[Outcome], received_at_ms: u64) -> Result<u64, StorageError> {
        let mut transaction = self.pool.begin().await?;
        for outcome in outcomes {
            let build_id = outcome.build_id.clone().unwrap_or_default();
            let kind = kind_name(outcome.kind);
            let id = blake3::hash(
                serde_json::to_string(&(&outcome.host, &outcome.patch_id, &build_id, &kind, outcome.at_unix_ms))
                    .expect("a key serializes")
                    .as_bytes(),
            )
            .to_hex()
            .to_string();
            sqlx::query(sql(
                "INSERT INTO outcomes (id, received_at_ms, host, analysis_id, patch_id, build_id, kind, cause, \
                 features, at_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING",
            ))
            .bind(id)
            .bind(to_i64(received_at_ms))
            .bind(outcome.host.clone())
            .bind(outcome.analysis_id.clone())
            .bind(outcome.patch_id.clone())
            .bind(build_id)
            .bind(kind)
            .bind(outcome.cause.clone())
            .bind(serde_json::to_string(&outcome.features).expect("features serialize"))
            .bind(to_i64(outcome.at_unix_ms))
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(outcomes.len() as u64)
    }

    /// Every host's outcomes of `patch_id` on `build_id`.
    pub async fn fleet_history(&self, patch_id: &str, build_id: &str) -> Result<FleetHistory, StorageError> {
        let rows = sqlx::query(sql(
            "SELECT host, kind, COUNT(*) AS n FROM outcomes WHERE patch_id = $1 AND build_id = $2 \
             GROUP BY host, kind ORDER BY host, kind",
        ))
        .bind(patch_id.to_string())
        .bind(build_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut history = FleetHistory::default();
        for row in rows {
            let host: String = row.try_get("host")?;
            let kind: String = row.try_get("kind")?;
            let count: i64 = row.try_get("n")?;
            history
                .by_host
                .entry(host)
                .or_default()
                .insert(kind, u64::try_from(count).unwrap_or(0));
        }
        Ok(history)
    }

    /// Every stored outcome with features to learn from, oldest first.
    pub async fn label_rows(&self) -> Result<Vec<LabelRow>, StorageError> {
        let rows = sqlx::query(sql(
            "SELECT o.host, o.patch_id, o.build_id, o.kind, o.at_unix_ms, o.features, v.features AS asked \
             FROM outcomes o LEFT JOIN verdicts v ON v.analysis_id = o.analysis_id \
             ORDER BY o.at_unix_ms, o.id",
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut labelled = Vec::with_capacity(rows.len());
        for row in rows {
            let kind: String = row.try_get("kind")?;
            let Some(kind) = kind_of(&kind) else { continue };
            let own: String = row.try_get("features")?;
            let asked: Option<String> = row.try_get("asked")?;
            let mut features: BTreeMap<String, f64> =
                serde_json::from_str(&own).map_err(|source| StorageError::Corrupt {
                    what: "outcome features",
                    source,
                })?;
            if features.is_empty() {
                if let Some(asked) = asked.as_deref() {
                    features = serde_json::from_str(asked).map_err(|source| StorageError::Corrupt {
                        what: "verdict features",
                        source,
                    })?;
                }
            }
            let at: i64 = row.try_get("at_unix_ms")?;
            labelled.push(LabelRow {
                host: row.try_get("host")?,
                patch_id: row.try_get("patch_id")?,
                build_id: row.try_get("build_id")?,
                kind,
                at_unix_ms: u64::try_from(at).unwrap_or(0),
                features,
            });
        }
        Ok(labelled)
    }

    /// The last promoted model, if any.
    pub async fn latest_model(&self) -> Result<Option<StoredModel>, StorageError> {
        let row = sqlx::query(sql(
            "SELECT version, name, trained_on, held_out_auc, model_json FROM models ORDER BY version DESC LIMIT 1",
        ))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let version: i64 = row.try_get("version")?;
        let trained_on: i64 = row.try_get("trained_on")?;
        Ok(Some(StoredModel {
            version: ModelVersion {
                version: u64::try_from(version).unwrap_or(0),
                name: row.try_get("name")?,
                trained_on: u64::try_from(trained_on).unwrap_or(0),
                held_out_auc: row.try_get("held_out_auc")?,
            },
            model_json: row.try_get("model_json")?,
        }))
    }

    /// Record a promotion.
    pub async fn insert_model(&self, model: &StoredModel, promoted_at_ms: u64) -> Result<(), StorageError> {
        sqlx::query(sql(
            "INSERT INTO models (version, name, trained_on, held_out_auc, promoted_at_ms, model_json) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        ))
        .bind(to_i64(model.version.version))
        .bind(model.version.name.clone())
        .bind(to_i64(model.version.trained_on))
        .bind(model.version.held_out_auc)
        .bind(to_i64(promoted_at_ms))
        .bind(model.model_json.clone())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
