//! The finding log: associations, series decisions, jobs, findings and the outbox, in PostgreSQL
//! (production, several agents sharing one database) or an embedded SQLite file (the default).
//!
//! One set of queries serves both backends through sqlx's `Any` driver: numbered placeholders,
//! times as ISO 8601 UTC text, JSON as text. Where the backends must differ (claiming a job) the
//! code says so. Migrations are embedded per backend (`migrations/postgres`, `migrations/sqlite`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::{AnyPoolOptions, AnyRow};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL must start with sqlite:, postgres: or postgresql:")]
    UnknownScheme,
    #[error("cannot connect to the database ({url}): {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("invalid filter: {0}")]
    Filter(String),
    #[error("no finding {0} in the log")]
    NoSuchFinding(i64),
    #[error("invalid review: {0}")]
    Review(String),
}

impl DbError {
    /// Whether the database answered and refused this one statement for its data (SQLSTATE
    /// class 22, data exception, or 23, integrity constraint; SQLite's constraint errors), as
    /// opposed to being unreachable: retrying such a record can never succeed.
    pub fn is_refusal_of_the_data(&self) -> bool {
        match self {
            DbError::Query(sqlx::Error::Database(e)) => {
                let code = e.code().map(|c| c.into_owned()).unwrap_or_default();
                code.starts_with("22")
                    || code.starts_with("23")
                    || matches!(
                        e.kind(),
                        sqlx::error::ErrorKind::UniqueViolation
                            | sqlx::error::ErrorKind::ForeignKeyViolation
                            | sqlx::error::ErrorKind::NotNullViolation
                            | sqlx::error::ErrorKind::CheckViolation
                    )
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A connection pool to the finding log.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// An association as the SCP saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssociationRow {
    pub association_key: String,
    pub agent: String,
    pub peer: String,
    pub calling_ae: String,
    pub called_ae: String,
    pub started_at: String,
    pub ended_at: String,
    pub instances: i64,
    pub bytes: i64,
    pub discarded: i64,
    pub failed: i64,
    /// released, aborted or rejected.
    pub outcome: String,
    pub detail: Option<String>,
}

/// The tracker's decision on a series, with the identifiers a person searches by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesRow {
    pub series_uid: String,
    pub study_uid: String,
    pub patient_id: Option<String>,
    pub accession: Option<String>,
    /// YYYY-MM-DD.
    pub study_date: Option<String>,
    pub body_part: Option<String>,
    pub modality: Option<String>,
    pub instances: i64,
    pub slices: i64,
    /// complete or skipped.
    pub state: String,
    pub skip_reason: Option<String>,
    pub trigger_reason: String,
    pub revision: i64,
    pub decided_at: String,
}

/// The decisions a series can have.
pub const SERIES_STATES: [&str; 2] = ["complete", "skipped"];

/// What became of a series, for the person asking why a study has no results: the tracker's
/// decision (a skipped series says why) and the latest analysis job of a complete one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesLogRow {
    #[serde(flatten)]
    pub series: SeriesRow,
    /// When retention removed its instances and objects.
    pub purged_at: Option<String>,
    /// The latest job, for a complete series: its id, state (queued, running, done, failed)
    /// and the error of a failed one.
    pub job_id: Option<i64>,
    pub job_state: Option<String>,
    pub job_error: Option<String>,
}

/// Which series [`Db::series_log`] lists; every field given must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesFilter {
    /// complete or skipped.
    pub state: Option<String>,
    pub patient: Option<String>,
    pub accession: Option<String>,
    pub study: Option<String>,
}

/// A claimed analysis job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: i64,
    pub series_uid: String,
    pub revision: i64,
    pub attempts: i64,
}

/// The states of a job, in the order a job passes through them.
pub const JOB_STATES: [&str; 4] = ["queued", "running", "done", "failed"];

/// A job as `idaics jobs` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub series_uid: String,
    pub revision: i64,
    /// queued, running, done or failed.
    pub state: String,
    pub attempts: i64,
    /// `host:state_dir|agent id` of the agent running it, or that ran it last.
    pub claimed_by: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    /// When its agent last renewed the claim.
    pub heartbeat_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub weights_sha256: Option<String>,
}

/// One disc level's finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindingRow {
    /// The finding's number in the log, which a review names; `None` before it is written.
    pub id: Option<i64>,
    pub job_id: i64,
    pub series_uid: String,
    pub study_uid: String,
    pub patient_id: Option<String>,
    pub accession: Option<String>,
    pub study_date: Option<String>,
    pub level: String,
    /// Whether the level's name was counted from an anatomical landmark (see
    /// [`crate::analysis::spine::DiscLevel::name_certain`]); `None` for findings logged before the agent
    /// said.
    pub level_certain: Option<bool>,
    pub class: String,
    pub confidence: f64,
    pub views: Vec<String>,
    pub r#box: Option<[f64; 4]>,
    pub mask_area_mm2: Option<f64>,
    pub model_version: String,
    pub created_at: String,
}

/// A reader's review of a finding, as given.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewReview {
    pub reviewer: String,
    /// The class the reader gives; `None` with `confirm`: the agent's class.
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub confirm: bool,
    #[serde(default)]
    pub comment: Option<String>,
}

/// A review in the log, with the finding it is about.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewRow {
    pub id: i64,
    pub finding_id: i64,
    pub reviewer: String,
    pub class: String,
    /// The agent's class for the finding.
    pub agent_class: String,
    pub confirmed: bool,
    pub comment: Option<String>,
    pub reviewed_at: String,
    pub series_uid: String,
    pub level: String,
}

/// Filters of `idaics findings` and `/api/v1/findings`; all optional, combined with AND.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindingFilter {
    pub patient: Option<String>,
    pub accession: Option<String>,
    pub study: Option<String>,
    pub level: Option<String>,
    pub class: Option<String>,
    /// Study date from (YYYY-MM-DD, inclusive).
    pub since: Option<String>,
    /// Study date until (YYYY-MM-DD, inclusive).
    pub until: Option<String>,
    pub min_confidence: Option<f64>,
}

/// Which rows of a listing to return, in the listing's own order: at most `limit` (every one
/// when `None`) after skipping the first `offset`. The orders end on a unique column, so pages
/// do not overlap while nothing is added. The HTTP API always pages: a year of findings in one
/// response took the agent from 46 MB to a peak of 1 GB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Page {
    pub limit: Option<u64>,
    pub offset: u64,
}

impl Page {
    /// Every row: what the CLI's listings print.
    pub const ALL: Page = Page { limit: None, offset: 0 };

    /// The SQL that ends a listing's query; empty for [`Page::ALL`]. Numbers, not binds: each
    /// listing has its own count of placeholders, and a `u64` formats as nothing but digits.
    fn sql(self) -> String {
        match (self.limit, self.offset) {
            (None, 0) => String::new(),
            // Both backends take LIMIT before OFFSET; the largest BIGINT stands for "no limit".
            (limit, offset) => {
                let limit = limit.map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX));
                let offset = i64::try_from(offset).unwrap_or(i64::MAX);
                format!(" LIMIT {limit} OFFSET {offset}")
            }
        }
    }
}

/// How a level's finding compares with the same level in the patient's prior study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// No prior study with this level.
    First,
    /// Abnormal now, normal (or not seen) before.
    New,
    Unchanged,
    /// Normal now, abnormal before.
    Resolved,
    /// Another abnormal class (or undetermined) than before.
    ChangedClass,
}

/// One level in one study of a patient's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub level: String,
    pub study_uid: String,
    pub study_date: Option<String>,
    pub accession: Option<String>,
    pub class: String,
    pub confidence: f64,
    pub prior_class: Option<String>,
    pub change: Change,
}

pub const CLASSES: [&str; 5] = ["normal", "schmorl", "bulge", "protrusion", "undetermined"];

/// Now, as the ISO 8601 UTC text the tables hold.
pub fn now() -> String {
    crate::common::now_rfc3339()
}

/// DICOM DA (YYYYMMDD) to YYYY-MM-DD; anything else, a day the calendar lacks included, is
/// dropped rather than stored wrong.
pub fn dicom_date(da: &str) -> Option<String> {
    let d = da.trim();
    if d.len() != 8 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    chrono::NaiveDate::parse_from_str(d, "%Y%m%d").ok().map(|date| date.format("%Y-%m-%d").to_string())
}

/// A calendar date written YYYY-MM-DD (`2026-02-31` is not one).
pub fn valid_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
        && chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok()
}

/// The files of `migrations/`, as (version, description, PostgreSQL, SQLite), described as sqlx
/// describes a file from its name so that the checksums existing databases recorded still match
/// (a test compares them with sqlx's own reading of the folders).
const MIGRATIONS: [(i64, &str, &str, &str); 6] = [
    (
        1,
        "finding log",
        include_str!("../../migrations/postgres/0001_finding_log.sql"),
        include_str!("../../migrations/sqlite/0001_finding_log.sql"),
    ),
    (
        2,
        "job heartbeat",
        include_str!("../../migrations/postgres/0002_job_heartbeat.sql"),
        include_str!("../../migrations/sqlite/0002_job_heartbeat.sql"),
    ),
    (
        3,
        "series retention",
        include_str!("../../migrations/postgres/0003_series_retention.sql"),
        include_str!("../../migrations/sqlite/0003_series_retention.sql"),
    ),
    (
        4,
        "level certainty",
        include_str!("../../migrations/postgres/0004_level_certainty.sql"),
        include_str!("../../migrations/sqlite/0004_level_certainty.sql"),
    ),
    (
        5,
        "reviews",
        include_str!("../../migrations/postgres/0005_reviews.sql"),
        include_str!("../../migrations/sqlite/0005_reviews.sql"),
    ),
    (
        6,
        "audit events",
        include_str!("../../migrations/postgres/0006_audit_events.sql"),
        include_str!("../../migrations/sqlite/0006_audit_events.sql"),
    ),
];

/// One backend's migrations, embedded in the binary. `sqlx::migrate!` would embed them too, but
/// it needs sqlx's macro crate, which builds both database drivers a second time for the
/// compiler: over a minute of every clean build on the 2-core CI machine.
#[derive(Debug)]
struct EmbeddedMigrations(Backend);

type MigrationsFuture<'s> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>> + Send + 's>,
>;

impl<'s> sqlx::migrate::MigrationSource<'s> for EmbeddedMigrations {
    fn resolve(self) -> MigrationsFuture<'s> {
        let migrations = MIGRATIONS
            .iter()
            .map(|&(version, description, postgres, sqlite)| {
                let sql = match self.0 {
                    Backend::Postgres => postgres,
                    Backend::Sqlite => sqlite,
                };
                sqlx::migrate::Migration::new(
                    version,
                    description.into(),
                    sqlx::migrate::MigrationType::Simple,
                    sql.into(),
                    false,
                )
            })
            .collect();
        Box::pin(std::future::ready(Ok(migrations)))
    }
}

impl Db {
    /// Connects (creating the SQLite file if needed). Does not migrate.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        let db = Self::open(url)?;
        db.ping_or_error().await.map_err(|source| DbError::Connect { url: crate::common::redact_url(url), source })?;
        Ok(db)
    }

    /// A pool that connects on first use: the agent starts (and keeps receiving) while the
    /// database is down.
    pub fn open(url: &str) -> Result<Db, DbError> {
        Self::pool(url, Access::ReadWrite)
    }

    /// A pool of its own for the HTTP API's listings: they never wait for the one SQLite
    /// connection the writer and the job worker share, and cannot write (`query_only`; on
    /// PostgreSQL a read-only session), whatever a handler asks.
    pub fn open_reader(url: &str) -> Result<Db, DbError> {
        Self::pool(url, Access::ReadOnly)
    }

    fn pool(url: &str, access: Access) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(DbError::UnknownScheme);
        };
        let mut connect_url = url.to_string();
        if backend == Backend::Sqlite && !connect_url.contains("mode=") {
            // A reader never creates the file: the writer's pool does, at start.
            let mode = if access == Access::ReadOnly { "mode=rw" } else { "mode=rwc" };
            connect_url.push_str(if connect_url.contains('?') { "&" } else { "?" });
            connect_url.push_str(mode);
        }
        let sqlite = backend == Backend::Sqlite;
        let read_only = access == Access::ReadOnly;
        let options = AnyPoolOptions::new()
            // SQLite has one writer; more connections only wait on its lock. Readers of its
            // write-ahead log do not wait for the writer.
            .max_connections(match (sqlite, read_only) {
                (true, false) => 1,
                (_, true) => 4,
                (false, false) => 8,
            })
            // Fail fast during an outage: the writer keeps what it could not write.
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                        if read_only {
                            sqlx::query("PRAGMA query_only = ON").execute(&mut *conn).await?;
                        }
                    } else if read_only {
                        sqlx::query("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            });
        let pool = options
            .connect_lazy(&connect_url)
            .map_err(|source| DbError::Connect { url: crate::common::redact_url(url), source })?;
        Ok(Db { pool, backend })
    }

    async fn ping_or_error(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the embedded migrations of this backend that are not applied yet.
    pub async fn migrate(&self) -> Result<(), DbError> {
        sqlx::migrate::Migrator::new(EmbeddedMigrations(self.backend)).await?.run(&self.pool).await?;
        Ok(())
    }

    /// True when a trivial query succeeds: what `/readyz` asks.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub async fn record_audit(&self, a: &AuditRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO audit_events (event_key, at, agent, event, peer, calling_ae, called_ae, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_key) DO NOTHING",
        )
        .bind(&a.event_key)
        .bind(&a.at)
        .bind(&a.agent)
        .bind(&a.event)
        .bind(&a.peer)
        .bind(&a.calling_ae)
        .bind(&a.called_ae)
        .bind(&a.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The audit trail, oldest first, from `since` (RFC 3339) on.
    pub async fn audit_events(&self, since: &str) -> Result<Vec<AuditRow>, DbError> {
        let rows = sqlx::query(
            "SELECT event_key, at, agent, event, peer, calling_ae, called_ae, detail FROM audit_events \
             WHERE at >= $1 ORDER BY id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditRow {
                    event_key: row.try_get(0)?,
                    at: row.try_get(1)?,
                    agent: row.try_get(2)?,
                    event: row.try_get(3)?,
                    peer: row.try_get(4)?,
                    calling_ae: row.try_get(5)?,
                    called_ae: row.try_get(6)?,
                    detail: row.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    pub async fn record_association(&self, a: &AssociationRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO associations (association_key, agent, peer, calling_ae, called_ae, started_at, ended_at, \
             instances, bytes, discarded, failed, outcome, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (association_key) DO NOTHING",
        )
        .bind(&a.association_key)
        .bind(&a.agent)
        .bind(&a.peer)
        .bind(&a.calling_ae)
        .bind(&a.called_ae)
        .bind(&a.started_at)
        .bind(&a.ended_at)
        .bind(a.instances)
        .bind(a.bytes)
        .bind(a.discarded)
        .bind(a.failed)
        .bind(&a.outcome)
        .bind(&a.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a series decision and, for a complete series, queues its analysis job (once per
    /// revision, whichever agent records it first). Returns the job's id when one was queued.
    pub async fn record_series(&self, s: &SeriesRow) -> Result<Option<i64>, DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO series (series_uid, study_uid, patient_id, accession, study_date, body_part, modality, \
             instances, slices, state, skip_reason, trigger_reason, revision, decided_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (series_uid) DO UPDATE SET study_uid = excluded.study_uid, \
             patient_id = excluded.patient_id, accession = excluded.accession, study_date = excluded.study_date, \
             body_part = excluded.body_part, modality = excluded.modality, instances = excluded.instances, \
             slices = excluded.slices, state = excluded.state, skip_reason = excluded.skip_reason, \
             trigger_reason = excluded.trigger_reason, revision = excluded.revision, decided_at = excluded.decided_at, \
             purged_at = NULL WHERE series.revision <= excluded.revision",
        )
        .bind(&s.series_uid)
        .bind(&s.study_uid)
        .bind(&s.patient_id)
        .bind(&s.accession)
        .bind(&s.study_date)
        .bind(&s.body_part)
        .bind(&s.modality)
        .bind(s.instances)
        .bind(s.slices)
        .bind(&s.state)
        .bind(&s.skip_reason)
        .bind(&s.trigger_reason)
        .bind(s.revision)
        .bind(&s.decided_at)
        .execute(&mut *tx)
        .await?;
        let mut job = None;
        if s.state == "complete" {
            let row = sqlx::query(
                "INSERT INTO jobs (series_uid, revision, state, created_at) VALUES ($1, $2, 'queued', $3) \
                 ON CONFLICT (series_uid, revision) DO NOTHING RETURNING id",
            )
            .bind(&s.series_uid)
            .bind(s.revision)
            .bind(now())
            .fetch_optional(&mut *tx)
            .await?;
            job = row.map(|r| r.try_get::<i64, _>("id")).transpose()?;
        }
        tx.commit().await?;
        Ok(job)
    }

    /// Claims the oldest queued job for `worker`. On PostgreSQL the row is locked with
    /// `FOR UPDATE SKIP LOCKED`, so agents sharing the database never claim the same job; SQLite
    /// runs the statement under its single writer lock, which gives the same guarantee.
    pub async fn claim_job(&self, worker: &str) -> Result<Option<Job>, DbError> {
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, claimed_by = $1, started_at = $2, \
             heartbeat_at = $2 WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1{lock}) \
             RETURNING id, series_uid, revision, attempts"
        );
        let row = sqlx::query(&sql).bind(worker).bind(now()).fetch_optional(&self.pool).await?;
        row.map(|r| {
            Ok(Job {
                id: r.try_get("id")?,
                series_uid: r.try_get("series_uid")?,
                revision: r.try_get("revision")?,
                attempts: r.try_get("attempts")?,
            })
        })
        .transpose()
    }

    /// Puts back in the queue the jobs that claimants starting with `claimant_prefix` were running
    /// when their agent stopped (crash, kill, power cut, a shutdown that outlived its grace), so
    /// the series still gets analysed. A job already tried `max_attempts` times fails instead: a
    /// series that brings the agent down must not do so on every start. Returns (queued, failed).
    pub async fn recover_interrupted_jobs(
        &self,
        claimant_prefix: &str,
        max_attempts: i64,
    ) -> Result<(u64, u64), DbError> {
        let interrupted = "state = 'running' AND substr(claimed_by, 1, length($1)) = $1";
        let failed = sqlx::query(&format!(
            "UPDATE jobs SET state = 'failed', error = $2, finished_at = $3 WHERE {interrupted} AND attempts >= $4"
        ))
        .bind(claimant_prefix)
        .bind(format!("the agent stopped during each of {max_attempts} attempts at this job; not tried again"))
        .bind(now())
        .bind(max_attempts)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let queued = sqlx::query(&format!(
            "UPDATE jobs SET state = 'queued', claimed_by = NULL, started_at = NULL WHERE {interrupted}"
        ))
        .bind(claimant_prefix)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok((queued, failed))
    }

    /// Renews `claimant`'s claim on a running job, so no other agent takes it over. False when
    /// the claim is gone: the job was taken over after the lease ran out.
    pub async fn renew_job(&self, id: i64, claimant: &str) -> Result<bool, DbError> {
        let renewed =
            sqlx::query("UPDATE jobs SET heartbeat_at = $1 WHERE id = $2 AND claimed_by = $3 AND state = 'running'")
                .bind(now())
                .bind(id)
                .bind(claimant)
                .execute(&self.pool)
                .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Puts back in the queue running jobs whose claim nobody has renewed since `stale_before`
    /// (ISO 8601 UTC): the agent that claimed them is gone (its host down, cut off from the
    /// database) and no restart of it is coming to take them up. As at a restart, a job already
    /// tried `max_attempts` times fails instead. Returns (queued, failed).
    pub async fn take_over_stale_jobs(&self, stale_before: &str, max_attempts: i64) -> Result<(u64, u64), DbError> {
        let stale = "state = 'running' AND COALESCE(heartbeat_at, started_at) < $1";
        let mut tx = self.pool.begin().await?;
        let failed = sqlx::query(&format!(
            "UPDATE jobs SET state = 'failed', error = $2, finished_at = $3 WHERE {stale} AND attempts >= $4"
        ))
        .bind(stale_before)
        .bind(format!("its agent stopped renewing its claim during each of {max_attempts} attempts; not tried again"))
        .bind(now())
        .bind(max_attempts)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let queued = sqlx::query(&format!(
            "UPDATE jobs SET state = 'queued', claimed_by = NULL, started_at = NULL, heartbeat_at = NULL WHERE {stale}"
        ))
        .bind(stale_before)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((queued, failed))
    }

    /// Ends a job `claimant` still holds, in one transaction: done with its findings and the
    /// objects it queues, or failed with what went wrong. All or nothing, so a crash half way
    /// cannot leave findings that a second attempt would log twice. Returns false, and records
    /// nothing, when the claim is gone: another agent took the job over after the lease ran out
    /// and records its own results.
    pub async fn finish_job(&self, id: i64, claimant: &str, outcome: JobOutcome<'_>) -> Result<bool, DbError> {
        let (state, error, weights) = match &outcome {
            JobOutcome::Done { weights_sha256, .. } => ("done", None, *weights_sha256),
            JobOutcome::Failed(error) => ("failed", Some(*error), None),
        };
        let mut tx = self.pool.begin().await?;
        // First, so the row is locked (PostgreSQL) or the writer lock held (SQLite) while the
        // results go in: a takeover cannot slip in between.
        let ended = sqlx::query(
            "UPDATE jobs SET state = $1, error = $2, weights_sha256 = $3, finished_at = $4 \
             WHERE id = $5 AND claimed_by = $6 AND state = 'running'",
        )
        .bind(state)
        .bind(error)
        .bind(weights)
        .bind(now())
        .bind(id)
        .bind(claimant)
        .execute(&mut *tx)
        .await?;
        if ended.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        if let JobOutcome::Done { findings, outbox, .. } = outcome {
            insert_findings(&mut tx, findings).await?;
            for entry in outbox {
                enqueue_outbox(&mut tx, id, entry).await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Findings matching the filter, by patient, study date, study, then level.
    pub async fn findings(&self, filter: &FindingFilter, page: Page) -> Result<Vec<FindingRow>, DbError> {
        let mut rows = Vec::new();
        self.each_finding(filter, page, gather(&mut rows)).await?;
        Ok(rows)
    }

    /// [`Db::findings`], each handed to `each` as it arrives.
    pub async fn each_finding<'a, E: From<DbError>>(
        &self,
        filter: &'a FindingFilter,
        page: Page,
        each: impl FnMut(FindingRow) -> Result<(), E>,
    ) -> Result<(), E> {
        enum Value<'a> {
            Text(&'a str),
            Float(f64),
        }
        let mut clauses: Vec<String> = Vec::new();
        let mut values: Vec<Value<'_>> = Vec::new();
        let mut add = |column: &str, op: &str, value: Value<'a>| {
            values.push(value);
            clauses.push(format!("{column} {op} ${}", values.len()));
        };
        for (column, value) in [
            ("patient_id", &filter.patient),
            ("accession", &filter.accession),
            ("study_uid", &filter.study),
            ("level", &filter.level),
            ("class", &filter.class),
        ] {
            if let Some(v) = value {
                add(column, "=", Value::Text(v));
            }
        }
        if let Some(class) = &filter.class
            && !CLASSES.contains(&class.as_str())
        {
            return Err(DbError::Filter(format!("class {class:?} is not one of {}", CLASSES.join(", "))).into());
        }
        for (op, date) in [(">=", &filter.since), ("<=", &filter.until)] {
            if let Some(d) = date {
                if !valid_date(d) {
                    return Err(DbError::Filter(format!("date {d:?} is not YYYY-MM-DD")).into());
                }
                add("study_date", op, Value::Text(d));
            }
        }
        if let Some(p) = filter.min_confidence {
            if !(0.0..=1.0).contains(&p) {
                return Err(DbError::Filter(format!("minimum confidence {p} is not between 0 and 1")).into());
            }
            add("confidence", ">=", Value::Float(p));
        }
        let mut sql = "SELECT id, job_id, series_uid, study_uid, patient_id, accession, study_date, level, \
                       level_certain, class, confidence, views, box, mask_area_mm2, model_version, created_at FROM findings"
            .to_string();
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY patient_id, study_date, study_uid, level, id");
        sql.push_str(&page.sql());
        let mut query = sqlx::query(&sql);
        for v in values {
            query = match v {
                Value::Text(t) => query.bind(t),
                Value::Float(x) => query.bind(x),
            };
        }
        each_row(query.fetch(&self.pool), finding_from_row, each).await
    }

    /// Each level's history across a patient's studies, oldest first, with the change since the
    /// prior study. Where a study was analysed more than once, its latest job counts.
    pub async fn history(&self, patient_id: &str) -> Result<Vec<HistoryEntry>, DbError> {
        let rows =
            self.findings(&FindingFilter { patient: Some(patient_id.into()), ..Default::default() }, Page::ALL).await?;
        // (level, (study date, study uid)) -> latest finding
        let mut latest: BTreeMap<(String, (Option<String>, String)), FindingRow> = BTreeMap::new();
        for f in rows {
            let key = (f.level.clone(), (f.study_date.clone(), f.study_uid.clone()));
            match latest.get(&key) {
                Some(existing) if existing.job_id > f.job_id => {}
                _ => {
                    latest.insert(key, f);
                }
            }
        }
        let mut entries = Vec::new();
        let mut prior: Option<(String, String)> = None; // (level, class)
        for ((level, _), f) in latest {
            let before = prior.as_ref().filter(|(l, _)| *l == level).map(|(_, c)| c.clone());
            let change = match before.as_deref() {
                None => Change::First,
                Some(p) if p == f.class => Change::Unchanged,
                Some("normal") => Change::New,
                Some(_) if f.class == "normal" => Change::Resolved,
                Some(_) => Change::ChangedClass,
            };
            entries.push(HistoryEntry {
                level: level.clone(),
                study_uid: f.study_uid.clone(),
                study_date: f.study_date.clone(),
                accession: f.accession.clone(),
                class: f.class.clone(),
                confidence: f.confidence,
                prior_class: before,
                change,
            });
            prior = Some((level, f.class));
        }
        Ok(entries)
    }

    /// Records a reader's review of a finding: a confirmation of the agent's class or a
    /// correction. Refused for a finding not in the log, a class not one of the four, a review
    /// that both confirms and corrects to another class, or one without a reviewer.
    pub async fn record_review(&self, finding_id: i64, review: &NewReview) -> Result<ReviewRow, DbError> {
        let reviewer = review.reviewer.trim();
        if reviewer.is_empty() || reviewer.contains('\0') {
            return Err(DbError::Review("a review names its reviewer".into()));
        }
        let agent_class: String = sqlx::query("SELECT class FROM findings WHERE id = $1")
            .bind(finding_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NoSuchFinding(finding_id))?
            .try_get("class")?;
        let class = match (&review.class, review.confirm) {
            (None, false) => return Err(DbError::Review("give a class, or confirm the agent's".into())),
            (None, true) if agent_class == "undetermined" => {
                return Err(DbError::Review("the agent gave no class to confirm (undetermined): give one".into()));
            }
            (None, true) => agent_class.clone(),
            (Some(c), true) if *c != agent_class => {
                return Err(DbError::Review(format!("confirming the agent's {agent_class} and giving {c} at once")));
            }
            (Some(c), _) => c.clone(),
        };
        if !CLASSES[..4].contains(&class.as_str()) {
            return Err(DbError::Review(format!("class {class:?} is not one of {}", CLASSES[..4].join(", "))));
        }
        let reviewed_at = now();
        let id: i64 = sqlx::query(
            "INSERT INTO reviews (finding_id, reviewer, class, confirmed, comment, reviewed_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(finding_id)
        .bind(reviewer)
        .bind(&class)
        .bind(i64::from(class == agent_class))
        .bind(review.comment.as_deref().map(|c| c.replace('\0', "")))
        .bind(&reviewed_at)
        .fetch_one(&self.pool)
        .await?
        .try_get("id")?;
        Ok(self.reviews().await?.into_iter().find(|r| r.id == id).expect("the review just written"))
    }

    /// Every review, oldest first, with the finding's class, series and level.
    pub async fn reviews(&self) -> Result<Vec<ReviewRow>, DbError> {
        let rows = sqlx::query(
            "SELECT r.id, r.finding_id, r.reviewer, r.class, f.class AS agent_class, r.confirmed, r.comment, \
             r.reviewed_at, f.series_uid, f.level FROM reviews r JOIN findings f ON f.id = r.finding_id ORDER BY r.id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReviewRow {
                    id: r.try_get("id")?,
                    finding_id: r.try_get("finding_id")?,
                    reviewer: r.try_get("reviewer")?,
                    class: r.try_get("class")?,
                    agent_class: r.try_get("agent_class")?,
                    confirmed: r.try_get::<i64, _>("confirmed")? != 0,
                    comment: r.try_get("comment")?,
                    reviewed_at: r.try_get("reviewed_at")?,
                    series_uid: r.try_get("series_uid")?,
                    level: r.try_get("level")?,
                })
            })
            .collect()
    }

    /// The agent against its readers: per reviewed finding (its latest review), the agent's
    /// class against the reader's (the reader's in the rows, as truth; the agent's in the columns).
    /// Findings the agent left undetermined are not counted: there is nothing to agree with.
    pub async fn review_agreement(&self) -> Result<crate::agreement::ConfusionMatrix, DbError> {
        let mut latest: BTreeMap<i64, ReviewRow> = BTreeMap::new();
        for review in self.reviews().await? {
            latest.insert(review.finding_id, review);
        }
        let mut matrix = crate::agreement::ConfusionMatrix::new(CLASSES[..4].iter().copied());
        for review in latest.values().filter(|r| r.agent_class != "undetermined") {
            // The reader is the truth (rows); the agent the prediction (columns).
            matrix.add(&review.class, &review.agent_class).map_err(|e| DbError::Review(e.to_string()))?;
        }
        Ok(matrix)
    }

    /// Counts of rows, for `/metrics` and tests.
    pub async fn count(&self, table: Table) -> Result<i64, DbError> {
        let sql = format!("SELECT COUNT(*) AS n FROM {}", table.name());
        Ok(sqlx::query(&sql).fetch_one(&self.pool).await?.try_get("n")?)
    }

    /// Pending objects of a destination whose next attempt is due, oldest first.
    pub async fn due_outbox(&self, destination: &str, limit: i64) -> Result<Vec<OutboxItem>, DbError> {
        let rows = sqlx::query(
            "SELECT id, job_id, object_path, sop_instance_uid, attempts FROM outbox \
             WHERE destination = $1 AND state = 'pending' AND next_attempt_at <= $2 ORDER BY id LIMIT $3",
        )
        .bind(destination)
        .bind(now())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxItem {
                    id: r.try_get("id")?,
                    job_id: r.try_get("job_id")?,
                    object_path: r.try_get("object_path")?,
                    sop_instance_uid: r.try_get("sop_instance_uid")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect()
    }

    pub async fn outbox_sent(&self, id: i64, status: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE outbox SET state = 'sent', attempts = attempts + 1, sent_at = $1, last_status = $2, last_error = NULL WHERE id = $3")
            .bind(now())
            .bind(status)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a failed attempt; the object stays pending until `next_attempt_at`.
    pub async fn outbox_failed(
        &self,
        id: i64,
        next_attempt_at: &str,
        status: Option<&str>,
        error: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_status = $2, last_error = $3 WHERE id = $4",
        )
        .bind(next_attempt_at)
        .bind(status)
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes every pending object due now: at start, a restart is a natural moment to retry.
    pub async fn outbox_retry_now(&self) -> Result<u64, DbError> {
        let done = sqlx::query("UPDATE outbox SET next_attempt_at = $1 WHERE state = 'pending'")
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deliveries, newest first, optionally of one state or of one series' jobs.
    pub async fn outbox(
        &self,
        state: Option<&str>,
        series_uid: Option<&str>,
        page: Page,
    ) -> Result<Vec<OutboxRow>, DbError> {
        let mut rows = Vec::new();
        self.each_outbox(state, series_uid, page, gather(&mut rows)).await?;
        Ok(rows)
    }

    /// [`Db::outbox`], each handed to `each` as it arrives.
    pub async fn each_outbox<E: From<DbError>>(
        &self,
        state: Option<&str>,
        series_uid: Option<&str>,
        page: Page,
        each: impl FnMut(OutboxRow) -> Result<(), E>,
    ) -> Result<(), E> {
        let sql = format!(
            "SELECT o.id, o.destination, j.series_uid, o.sop_class_uid, o.sop_instance_uid, o.state, o.attempts, \
             o.next_attempt_at, o.last_status, o.last_error, o.created_at, o.sent_at \
             FROM outbox o LEFT JOIN jobs j ON o.job_id = j.id \
             WHERE ($1 IS NULL OR o.state = $1) AND ($2 IS NULL OR j.series_uid = $2) ORDER BY o.id DESC{}",
            page.sql()
        );
        let query = sqlx::query(&sql).bind(state).bind(series_uid);
        each_row(query.fetch(&self.pool), outbox_from_row, each).await
    }

    /// Gives up a pending object: it is no longer retried, and no longer holds its series back
    /// from retention. For an object its destination will never take (a SOP class it does not
    /// store, a destination removed). False when `id` is not pending.
    pub async fn cancel_outbox(&self, id: i64) -> Result<bool, DbError> {
        let cancelled = sqlx::query("UPDATE outbox SET state = 'cancelled' WHERE id = $1 AND state = 'pending'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(cancelled.rows_affected() == 1)
    }

    /// Makes a pending or cancelled object due now; a running agent sends it within seconds.
    /// False when `id` is neither (a sent object stays sent).
    pub async fn retry_outbox(&self, id: i64) -> Result<bool, DbError> {
        let retried = sqlx::query(
            "UPDATE outbox SET state = 'pending', next_attempt_at = $1 WHERE id = $2 AND state IN ('pending', 'cancelled')",
        )
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(retried.rows_affected() == 1)
    }

    /// Outbox rows of a destination by state, for tests and the CLI.
    pub async fn outbox_states(&self, destination: &str) -> Result<Vec<(String, String, i64)>, DbError> {
        let rows =
            sqlx::query("SELECT sop_instance_uid, state, attempts FROM outbox WHERE destination = $1 ORDER BY id")
                .bind(destination)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| Ok((r.try_get("sop_instance_uid")?, r.try_get("state")?, r.try_get("attempts")?))).collect()
    }

    /// The recorded revision of every series.
    pub async fn series_revisions(&self) -> Result<std::collections::HashMap<String, i64>, DbError> {
        let rows = sqlx::query("SELECT series_uid, revision FROM series").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((r.try_get("series_uid")?, r.try_get("revision")?))).collect()
    }

    /// Where a series is spooled and how its findings are filed: study UID, patient ID,
    /// accession and study date.
    pub async fn series_identity(&self, series_uid: &str) -> Result<Option<SeriesIdentity>, DbError> {
        let row = sqlx::query("SELECT study_uid, patient_id, accession, study_date FROM series WHERE series_uid = $1")
            .bind(series_uid)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(SeriesIdentity {
                study_uid: r.try_get("study_uid")?,
                patient_id: r.try_get("patient_id")?,
                accession: r.try_get("accession")?,
                study_date: r.try_get("study_date")?,
            })
        })
        .transpose()
    }

    /// Objects not yet accepted by their destination.
    pub async fn outbox_depth(&self) -> Result<i64, DbError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'pending'")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Series whose retention period is over: decided before `decided_before` (ISO 8601 UTC),
    /// skipped or analysed (done or failed) at their latest revision, no job of theirs queued or
    /// running, every object of theirs delivered, and not purged yet. Oldest first.
    pub async fn series_past_retention(&self, decided_before: &str) -> Result<Vec<SeriesToPurge>, DbError> {
        let rows = sqlx::query(
            "SELECT s.study_uid, s.series_uid, s.revision FROM series s WHERE s.decided_at < $1 AND s.purged_at IS NULL \
             AND (s.state = 'skipped' OR EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid \
                  AND j.revision = s.revision AND j.state IN ('done', 'failed'))) \
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state IN ('queued', 'running')) \
             AND NOT EXISTS (SELECT 1 FROM outbox o JOIN jobs j ON o.job_id = j.id \
                  WHERE j.series_uid = s.series_uid AND o.state = 'pending') \
             ORDER BY s.decided_at",
        )
        .bind(decided_before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SeriesToPurge {
                    study_uid: r.try_get("study_uid")?,
                    series_uid: r.try_get("series_uid")?,
                    revision: r.try_get("revision")?,
                })
            })
            .collect()
    }

    /// Records that retention removed a series at `revision`; a later decision clears it.
    pub async fn mark_series_purged(&self, series: &SeriesToPurge) -> Result<(), DbError> {
        sqlx::query("UPDATE series SET purged_at = $1 WHERE series_uid = $2 AND revision = $3")
            .bind(now())
            .bind(&series.series_uid)
            .bind(series.revision)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Jobs, newest first, optionally only those in `state` or of `series_uid`.
    pub async fn jobs(
        &self,
        state: Option<&str>,
        series_uid: Option<&str>,
        page: Page,
    ) -> Result<Vec<JobRow>, DbError> {
        let mut rows = Vec::new();
        self.each_job(state, series_uid, page, gather(&mut rows)).await?;
        Ok(rows)
    }

    /// [`Db::jobs`], each handed to `each` as it arrives.
    pub async fn each_job<E: From<DbError>>(
        &self,
        state: Option<&str>,
        series_uid: Option<&str>,
        page: Page,
        each: impl FnMut(JobRow) -> Result<(), E>,
    ) -> Result<(), E> {
        let sql = format!(
            "SELECT id, series_uid, revision, state, attempts, claimed_by, created_at, started_at, heartbeat_at, \
             finished_at, error, weights_sha256 FROM jobs \
             WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR series_uid = $2) ORDER BY id DESC{}",
            page.sql()
        );
        let query = sqlx::query(&sql).bind(state).bind(series_uid);
        each_row(query.fetch(&self.pool), job_from_row, each).await
    }

    /// Queues a failed job again with a fresh count of attempts, once its cause is dealt with
    /// (a limit raised, a series that brought the agent down replaced...). Only failed jobs: a
    /// done job's findings are logged, and a second run would log them twice. False when `id` is
    /// not a failed job.
    pub async fn retry_failed_job(&self, id: i64) -> Result<bool, DbError> {
        let retried = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = 0, claimed_by = NULL, started_at = NULL, \
             heartbeat_at = NULL, finished_at = NULL, error = NULL WHERE id = $1 AND state = 'failed'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(retried.rows_affected() == 1)
    }

    /// The state of a series' latest job (queued, running, done, failed) and its error.
    pub async fn latest_job(&self, series_uid: &str) -> Result<Option<(String, Option<String>)>, DbError> {
        let row = sqlx::query("SELECT state, error FROM jobs WHERE series_uid = $1 ORDER BY id DESC LIMIT 1")
            .bind(series_uid)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("state")?, r.try_get("error")?))).transpose()
    }

    /// Decided series, the latest decided first, each with its latest job.
    pub async fn series_log(&self, filter: &SeriesFilter, page: Page) -> Result<Vec<SeriesLogRow>, DbError> {
        if let Some(state) = &filter.state
            && !SERIES_STATES.contains(&state.as_str())
        {
            return Err(DbError::Filter(format!("state must be one of {}", SERIES_STATES.join(", "))));
        }
        let sql = format!(
            "SELECT s.series_uid, s.study_uid, s.patient_id, s.accession, s.study_date, s.body_part, s.modality, \
             s.instances, s.slices, s.state, s.skip_reason, s.trigger_reason, s.revision, s.decided_at, s.purged_at, \
             j.id AS job_id, j.state AS job_state, j.error AS job_error \
             FROM series s LEFT JOIN jobs j ON j.id = (SELECT MAX(id) FROM jobs WHERE jobs.series_uid = s.series_uid) \
             WHERE ($1 IS NULL OR s.state = $1) AND ($2 IS NULL OR s.patient_id = $2) \
             AND ($3 IS NULL OR s.accession = $3) AND ($4 IS NULL OR s.study_uid = $4) \
             ORDER BY s.decided_at DESC, s.series_uid{}",
            page.sql()
        );
        let rows = sqlx::query(&sql)
            .bind(&filter.state)
            .bind(&filter.patient)
            .bind(&filter.accession)
            .bind(&filter.study)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(SeriesLogRow {
                    series: SeriesRow {
                        series_uid: r.try_get("series_uid")?,
                        study_uid: r.try_get("study_uid")?,
                        patient_id: r.try_get("patient_id")?,
                        accession: r.try_get("accession")?,
                        study_date: r.try_get("study_date")?,
                        body_part: r.try_get("body_part")?,
                        modality: r.try_get("modality")?,
                        instances: r.try_get("instances")?,
                        slices: r.try_get("slices")?,
                        state: r.try_get("state")?,
                        skip_reason: r.try_get("skip_reason")?,
                        trigger_reason: r.try_get("trigger_reason")?,
                        revision: r.try_get("revision")?,
                        decided_at: r.try_get("decided_at")?,
                    },
                    purged_at: r.try_get("purged_at")?,
                    job_id: r.try_get("job_id")?,
                    job_state: r.try_get("job_state")?,
                    job_error: r.try_get("job_error")?,
                })
            })
            .collect()
    }

    /// A series' recorded state and revision.
    pub async fn series_state(&self, series_uid: &str) -> Result<Option<(String, i64)>, DbError> {
        let row = sqlx::query("SELECT state, revision FROM series WHERE series_uid = $1")
            .bind(series_uid)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("state")?, r.try_get("revision")?))).transpose()
    }
}

/// How a job ended.
pub enum JobOutcome<'a> {
    Done { weights_sha256: Option<&'a str>, findings: &'a [FindingRow], outbox: &'a [OutboxEntry] },
    Failed(&'a str),
}

/// A written object that a finished job queues for a destination.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub destination: String,
    pub object_path: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
}

async fn insert_findings(tx: &mut sqlx::Transaction<'_, sqlx::Any>, findings: &[FindingRow]) -> Result<(), DbError> {
    for f in findings {
        sqlx::query(
            "INSERT INTO findings (job_id, series_uid, study_uid, patient_id, accession, study_date, level, class, \
             confidence, views, box, mask_area_mm2, model_version, created_at, level_certain) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(f.job_id)
        .bind(&f.series_uid)
        .bind(&f.study_uid)
        .bind(&f.patient_id)
        .bind(&f.accession)
        .bind(&f.study_date)
        .bind(&f.level)
        .bind(&f.class)
        .bind(f.confidence)
        .bind(serde_json::to_string(&f.views).expect("strings serialise"))
        .bind(f.r#box.map(|b| serde_json::to_string(&b).expect("floats serialise")))
        .bind(f.mask_area_mm2)
        .bind(&f.model_version)
        .bind(&f.created_at)
        .bind(f.level_certain.map(i64::from))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Queues an object for a destination; queuing it again (a new revision of the series, whose
/// objects keep their UIDs) makes it pending again.
async fn enqueue_outbox(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job_id: i64,
    entry: &OutboxEntry,
) -> Result<(), DbError> {
    let now = now();
    sqlx::query(
        "INSERT INTO outbox (destination, job_id, object_path, sop_class_uid, sop_instance_uid, state, attempts, \
         next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $7) \
         ON CONFLICT (destination, sop_instance_uid) DO UPDATE SET object_path = excluded.object_path, \
         state = 'pending', next_attempt_at = excluded.next_attempt_at",
    )
    .bind(&entry.destination)
    .bind(job_id)
    .bind(&entry.object_path)
    .bind(&entry.sop_class_uid)
    .bind(&entry.sop_instance_uid)
    .bind(&now)
    .bind(&now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A series whose retention period is over.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesToPurge {
    pub study_uid: String,
    pub series_uid: String,
    pub revision: i64,
}

/// The identifiers of a recorded series.
#[derive(Debug, Clone)]
pub struct SeriesIdentity {
    pub study_uid: String,
    pub patient_id: Option<String>,
    pub accession: Option<String>,
    pub study_date: Option<String>,
}

/// The states of an outbox object: waiting (and retried until its destination accepts it),
/// accepted, or given up by an operator.
pub const OUTBOX_STATES: [&str; 3] = ["pending", "sent", "cancelled"];

/// A delivery as `idaics outbox` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub destination: String,
    /// The analysed series the object reports on.
    pub series_uid: Option<String>,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// pending, sent or cancelled.
    pub state: String,
    pub attempts: i64,
    /// When a pending object is tried next (ISO 8601 UTC); none for the others.
    pub next_attempt_at: Option<String>,
    /// The last DIMSE status, and why the last attempt failed.
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub sent_at: Option<String>,
}

/// An object waiting in the outbox.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub id: i64,
    /// The job whose results it is: its objects go to a DICOM destination together.
    pub job_id: Option<i64>,
    pub object_path: String,
    pub sop_instance_uid: String,
    pub attempts: i64,
}

/// The tables, for counting.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Associations,
    Series,
    Jobs,
    Findings,
    Outbox,
    Reviews,
    AuditEvents,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Associations => "associations",
            Table::Series => "series",
            Table::Jobs => "jobs",
            Table::Findings => "findings",
            Table::Outbox => "outbox",
            Table::Reviews => "reviews",
            Table::AuditEvents => "audit_events",
        }
    }
}

/// An `each` for the `each_*` listings that keeps every row: the `Vec` form of a listing.
fn gather<T>(rows: &mut Vec<T>) -> impl FnMut(T) -> Result<(), DbError> + '_ {
    move |row| {
        rows.push(row);
        Ok(())
    }
}

/// Hands each row of a listing's result to `each` as the database sends it, so that a listing
/// costs the memory of a row, not of the whole: `idaics findings` held a year of findings
/// (216 000 rows) whole at a peak of 0.9 to 1.5 GB.
async fn each_row<T, E: From<DbError>>(
    mut rows: impl futures_util::Stream<Item = Result<AnyRow, sqlx::Error>> + Unpin,
    convert: fn(&AnyRow) -> Result<T, DbError>,
    mut each: impl FnMut(T) -> Result<(), E>,
) -> Result<(), E> {
    while let Some(row) = rows.try_next().await.map_err(DbError::from)? {
        each(convert(&row)?)?;
    }
    Ok(())
}

fn job_from_row(r: &AnyRow) -> Result<JobRow, DbError> {
    Ok(JobRow {
        id: r.try_get("id")?,
        series_uid: r.try_get("series_uid")?,
        revision: r.try_get("revision")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
        claimed_by: r.try_get("claimed_by")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        heartbeat_at: r.try_get("heartbeat_at")?,
        finished_at: r.try_get("finished_at")?,
        error: r.try_get("error")?,
        weights_sha256: r.try_get("weights_sha256")?,
    })
}

fn outbox_from_row(r: &AnyRow) -> Result<OutboxRow, DbError> {
    let state: String = r.try_get("state")?;
    Ok(OutboxRow {
        id: r.try_get("id")?,
        destination: r.try_get("destination")?,
        series_uid: r.try_get("series_uid")?,
        sop_class_uid: r.try_get("sop_class_uid")?,
        sop_instance_uid: r.try_get("sop_instance_uid")?,
        next_attempt_at: if state == "pending" { Some(r.try_get("next_attempt_at")?) } else { None },
        state,
        attempts: r.try_get("attempts")?,
        last_status: r.try_get("last_status")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        sent_at: r.try_get("sent_at")?,
    })
}

fn finding_from_row(r: &AnyRow) -> Result<FindingRow, DbError> {
    let views: String = r.try_get("views")?;
    let bbox: Option<String> = r.try_get("box")?;
    Ok(FindingRow {
        id: Some(r.try_get("id")?),
        job_id: r.try_get("job_id")?,
        series_uid: r.try_get("series_uid")?,
        study_uid: r.try_get("study_uid")?,
        patient_id: r.try_get("patient_id")?,
        accession: r.try_get("accession")?,
        study_date: r.try_get("study_date")?,
        level: r.try_get("level")?,
        level_certain: r.try_get::<Option<i64>, _>("level_certain")?.map(|v| v != 0),
        class: r.try_get("class")?,
        confidence: r.try_get("confidence")?,
        views: serde_json::from_str(&views).unwrap_or_default(),
        r#box: bbox.and_then(|b| serde_json::from_str(&b).ok()),
        mask_area_mm2: r.try_get("mask_area_mm2")?,
        model_version: r.try_get("model_version")?,
        created_at: r.try_get("created_at")?,
    })
}

/// What the agent logs while it runs; each kind is written by [`Writer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Association(AssociationRow),
    Series(SeriesRow),
    Audit(AuditRow),
}

/// Whether a pool may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    ReadOnly,
}

/// One line of the audit trail (see `crate::store::audit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    pub event_key: String,
    pub at: String,
    pub agent: String,
    pub event: String,
    pub peer: Option<String>,
    pub calling_ae: Option<String>,
    pub called_ae: Option<String>,
    pub detail: Option<String>,
}

impl Record {
    /// The record with every NUL byte in its text replaced by U+FFFD.
    pub fn without_nul(&self) -> Record {
        fn clean(value: &mut serde_json::Value) {
            match value {
                serde_json::Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{FFFD}"),
                serde_json::Value::Array(items) => items.iter_mut().for_each(clean),
                serde_json::Value::Object(fields) => fields.values_mut().for_each(clean),
                _ => {}
            }
        }
        let mut value = serde_json::to_value(self).expect("records serialise");
        clean(&mut value);
        serde_json::from_value(value).expect("a record with other text is still a record")
    }
}

/// Writes records to the database in order; while the database is unreachable it keeps them in
/// memory and in a journal file (`<state>/db-pending-<host>.jsonl`, fsync'd; one per host, since
/// agents on several hosts may share a state directory), retries with back-off, and
/// writes them once the database answers again, so an outage never stops ingest nor loses a row.
/// A journal left by a crash is replayed at start. Every write is idempotent, so a record
/// written just before a crash and replayed after it does no harm.
pub struct Writer {
    db: Db,
    journal: PathBuf,
    /// Records the database refused for their content, kept for a person to look at.
    refused: PathBuf,
    pending: std::collections::VecDeque<Record>,
    /// Whether every pending record is also in the journal (true from the first failure until
    /// everything is written).
    journalled: bool,
    /// Whether this writer has seen the migrations applied (a database down at start is migrated
    /// when it comes up).
    migrated: bool,
    heartbeat: Option<crate::systemd::Heartbeat>,
    jobs_queued: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl Writer {
    pub fn new(db: Db, state_dir: &Path, host: &str) -> Writer {
        let journal = state_dir.join(format!("db-pending-{host}.jsonl"));
        // Earlier builds kept one journal per state directory: its records move into this host's.
        let shared = state_dir.join("db-pending.jsonl");
        if let Ok(text) = std::fs::read_to_string(&shared) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if let Ok(record) = serde_json::from_str::<Record>(line) {
                    Self::append_line(&journal, &record);
                }
            }
            let _ = std::fs::remove_file(&shared);
        }
        let mut pending = std::collections::VecDeque::new();
        if let Ok(text) = std::fs::read_to_string(&journal) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match serde_json::from_str::<Record>(line) {
                    Ok(record) => pending.push_back(record),
                    Err(e) => tracing::error!(error = %e, "unreadable line in the database journal; skipped"),
                }
            }
            if !pending.is_empty() {
                tracing::info!(records = pending.len(), "replaying records kept while the database was unreachable");
            }
        }
        let journalled = !pending.is_empty();
        Writer {
            db,
            journal,
            refused: state_dir.join("db-refused.jsonl"),
            pending,
            journalled,
            migrated: false,
            heartbeat: None,
            jobs_queued: None,
        }
    }

    /// Notified when a written record may have queued a job (a complete series), so that the
    /// worker starts it now rather than at its next look.
    pub fn with_jobs_queued(mut self, jobs_queued: std::sync::Arc<tokio::sync::Notify>) -> Writer {
        self.jobs_queued = Some(jobs_queued);
        self
    }

    /// Reports to the watchdog at every turn, written, journalled or idle.
    pub fn with_heartbeat(mut self, heartbeat: crate::systemd::Heartbeat) -> Writer {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// Runs until the channel closes and everything is written or journalled.
    pub async fn run(mut self, mut records: tokio::sync::mpsc::UnboundedReceiver<Record>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if let Some(heartbeat) = &self.heartbeat {
                heartbeat.beat();
            }
            self.flush().await;
            // Idle, it still wakes to report that it is alive.
            let wait = if self.pending.is_empty() { Duration::from_secs(10) } else { backoff };
            tokio::select! {
                received = records.recv() => match received {
                    Some(record) => {
                        if self.journalled {
                            // Already failing: keep it durable until the database is back.
                            self.append_journal(&record);
                        }
                        self.pending.push_back(record);
                    }
                    None => {
                        self.flush().await;
                        return;
                    }
                },
                _ = tokio::time::sleep(wait) => {
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            if self.pending.is_empty() {
                backoff = Duration::from_millis(500);
            }
        }
    }

    /// Writes pending records in order, stopping at the first failure.
    async fn flush(&mut self) {
        if !self.migrated && !self.pending.is_empty() {
            match self.db.migrate().await {
                Ok(()) => self.migrated = true,
                Err(e) => {
                    self.journal_all_pending();
                    tracing::warn!(error = %e, pending = self.pending.len(), "database not ready; records kept for later");
                    return;
                }
            }
        }
        let mut wrote_any = false;
        while let Some(record) = self.pending.front() {
            // A NUL byte (in a calling AE title, a PatientID) is refused by PostgreSQL and cut
            // short by readers of SQLite: the record is written without it.
            let record = record.without_nul();
            let result = match &record {
                Record::Association(a) => self.db.record_association(a).await,
                Record::Series(s) => self.db.record_series(s).await.map(|_| ()),
                Record::Audit(a) => self.db.record_audit(a).await,
            };
            if result.is_ok()
                && matches!(record, Record::Series(_))
                && let Some(jobs_queued) = &self.jobs_queued
            {
                jobs_queued.notify_waiters();
            }
            match result {
                Ok(()) => {
                    self.pending.pop_front();
                    wrote_any = true;
                }
                // The database answered and will never take this record: keep it aside, say so,
                // and go on with the next, rather than retry it for ever and write nothing more.
                Err(e) if e.is_refusal_of_the_data() => {
                    tracing::error!(error = %e, path = %self.refused.display(), "the database refused a record for its content; kept aside, the next records go on");
                    Self::append_line(&self.refused, &record);
                    self.pending.pop_front();
                    wrote_any = true;
                }
                Err(e) => {
                    self.journal_all_pending();
                    tracing::warn!(error = %e, pending = self.pending.len(), "database unreachable; records kept for later");
                    return;
                }
            }
        }
        if self.journalled {
            if wrote_any {
                tracing::info!("database reachable again; kept records written");
            }
            let _ = std::fs::remove_file(&self.journal);
            self.journalled = false;
        }
    }

    /// On the first failure, everything still pending goes to the journal; later records are
    /// appended as they arrive.
    fn journal_all_pending(&mut self) {
        if !self.journalled {
            for r in self.pending.clone() {
                self.append_journal(&r);
            }
            self.journalled = true;
        }
    }

    fn append_journal(&self, record: &Record) {
        Self::append_line(&self.journal, record);
    }

    fn append_line(path: &Path, record: &Record) {
        use std::io::Write;
        let line = serde_json::to_string(record).expect("records serialise") + "\n";
        let result = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|()| f.sync_data()));
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "cannot write the database journal");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dates are calendar dates: days a month lacks are refused, leap days where they fall.
    #[test]
    fn dates_follow_the_calendar() {
        assert!(super::valid_date("2026-12-03"));
        assert!(super::valid_date("2024-02-29"));
        for not_a_date in ["2026-02-31", "2025-02-29", "2026-13-01", "2026-00-10", "2026-1-03", "20261203", ""] {
            assert!(!super::valid_date(not_a_date), "{not_a_date:?}");
        }
        assert_eq!(super::dicom_date("20240229").as_deref(), Some("2024-02-29"));
        assert_eq!(super::dicom_date(" 20261203 ").as_deref(), Some("2026-12-03"));
        assert_eq!(super::dicom_date("20260231"), None);
        assert_eq!(super::dicom_date("2026123"), None);
    }

    /// The embedded migrations are the folders' files as sqlx reads them: same versions,
    /// descriptions and checksums, so databases migrated by earlier builds stay valid.
    #[test]
    fn embedded_migrations_are_the_folders_as_sqlx_reads_them() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            for (backend, folder) in [(Backend::Postgres, "postgres"), (Backend::Sqlite, "sqlite")] {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(folder);
                let from_folder = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
                let embedded = sqlx::migrate::Migrator::new(EmbeddedMigrations(backend)).await.unwrap();
                let key = |m: &sqlx::migrate::Migration| {
                    (m.version, m.description.to_string(), m.checksum.to_vec(), m.migration_type, m.no_tx)
                };
                let folder_keys: Vec<_> = from_folder.iter().map(key).collect();
                assert_eq!(folder_keys.len(), MIGRATIONS.len(), "{folder}: a migration file is not embedded");
                assert_eq!(folder_keys, embedded.iter().map(key).collect::<Vec<_>>(), "{folder}");
            }
        });
    }
}
