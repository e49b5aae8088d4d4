//! [`PostgresLogSink`]: request logs in PostgreSQL, shared by every gateway replica and kept
//! across restarts (feature `postgres`).
//!
//! Rows go to `tollgate_request_logs`, partitioned by request time into **daily partitions**
//! (`tollgate_request_logs_pYYYYMMDD`, UTC days), so the 14-day retention drops whole days
//! instead of deleting row by row:
//!
//! - [`write_batch`](LogSink::write_batch) inserts the whole batch with ONE multi-row
//!   statement (`INSERT … SELECT FROM unnest(…)`, one array per column), off the request path
//!   (the logger's background worker calls it). Partitions for the batch's days are created
//!   on demand; today's and the next days' are created ahead by the maintenance.
//! - [`purge_older_than`](LogSink::purge_older_than) drops every partition whose whole day is
//!   before the cutoff, then deletes the rows before the cutoff from the boundary day, so
//!   exactly the rows older than the cutoff go.
//! - [`query`](LogSink::query) pages by keyset on `(time_ms, id)` (`id` is the arrival
//!   order): the same filters, order and cursor semantics as
//!   [`MemoryLogSink`](crate::memory::MemoryLogSink), one org's rows only, and rows older than
//!   the retention are never returned even before they are purged.
//!
//! Rows without an organization (requests nobody was authenticated for: 401s, 404s) have a
//! daily quota ([`PostgresLogSink::with_anonymous_rows_per_day`], 10,000 by default, for
//! all replicas together): a counter per UTC day (`tollgate_request_log_anonymous_days`) is
//! bumped once per batch, and a day's anonymous rows past the quota are not stored. So
//! unauthenticated traffic takes at most quota × retention days of rows, costs no count of
//! the table, and never touches an organization's rows, which are kept whole for the
//! retention.
//!
//! **Maintenance** ([`PostgresLogSink::maintain`]: partitions ahead, retention purge) runs by
//! itself at most once an hour, in a background task started by a write, so a sink nobody
//! purges still keeps 14 days only; the gateway's purge job may call
//! [`purge_older_than`](LogSink::purge_older_than) as well. Replicas take turns (an advisory
//! lock), and DDL never waits long behind readers (a lock timeout; it retries next time).

mod anonymous;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::Row;
use tollgate_core::{
    BackendError, BoxFuture, Clock, ErrorCode, KeyId, ModelId, OrgId, SharedClock,
};
use tollgate_postgres::to_backend_error;

use crate::record::LogRecord;
use crate::sink::{InvalidCursor, LogCursor, LogPage, LogQuery, LogSink, RETENTION};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// One UTC day in milliseconds.
const DAY_MS: i64 = 24 * 60 * 60 * 1_000;

/// The prefix of every partition's name.
const PARTITION_PREFIX: &str = "tollgate_request_logs_p";

/// How often the sink runs its own maintenance.
const MAINTENANCE_EVERY_MS: u64 = 60 * 60 * 1_000;

/// Days after today whose partitions the maintenance creates ahead.
pub const DEFAULT_DAYS_AHEAD: u32 = 2;

/// Rows without an organization stored per UTC day by default.
pub const DEFAULT_ANONYMOUS_ROWS_PER_DAY: u64 = 10_000;

/// First key of the advisory lock a purge holds ("tglp"); the second is the schema's hash.
const PURGE_LOCK_KEY: i32 = 0x7467_6c70;

/// The last millisecond chrono can name (+262142-12-31): later request times cannot be put
/// in a dated partition and are refused.
const LAST_MS: i64 = 8_210_266_876_799_999;

const INSERT: &str = "\
    INSERT INTO tollgate_request_logs \
        (time_ms, request_id, org_id, key_id, model_id, method, route, status, code, credits, \
         latency_ms) \
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], \
                         $6::text[], $7::text[], $8::integer[], $9::text[], $10::bigint[], \
                         $11::bigint[])";
const ENSURE_PARTITION: &str = "SELECT tollgate_request_logs_ensure_partition($1, $2, $3)";
const COLUMNS: &str = "time_ms, id, request_id, org_id, key_id, model_id, method, route, \
                       status, code, credits, latency_ms";
// Every partition-like table of ours in the schema, attached or left detached by an
// interrupted purge.
const LIST_PARTITIONS: &str = "\
    SELECT c.relname::text, \
           EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid) AS attached \
      FROM pg_class c \
     WHERE c.relnamespace = current_schema()::regnamespace \
       AND c.relkind = 'r' \
       AND starts_with(c.relname::text, 'tollgate_request_logs_p')";

/// Request logs in PostgreSQL. Share it with `Arc`; several instances (replicas) may write
/// and read the same database at once.
///
/// ```no_run
/// use std::sync::Arc;
///
/// use tollgate_core::SystemClock;
/// use tollgate_request_logger::{PostgresLogSink, RequestLoggerLayer};
///
/// # async fn demo() -> Result<(), tollgate_core::BackendError> {
/// // Connects, applies the migrations and creates the partitions of the next days.
/// let url = "postgres://tollgate@127.0.0.1/tollgate";
/// let sink = Arc::new(PostgresLogSink::connect(url, SystemClock).await?);
/// let logger = RequestLoggerLayer::new(sink.clone());
/// # let _ = logger;
/// # Ok(())
/// # }
/// ```
pub struct PostgresLogSink {
    pool: Pool,
    clock: SharedClock,
    retention_ms: u64,
    days_ahead: u32,
    auto_maintenance: bool,
    /// Days whose partition is known to exist.
    partitions: Arc<Mutex<BTreeSet<i64>>>,
    /// When the last maintenance started (clock ms); 0: never.
    last_maintenance_ms: Arc<AtomicU64>,
    maintaining: Arc<AtomicBool>,
    anonymous_per_day: u64,
    /// Anonymous rows not stored because their day's quota was used up.
    anonymous_refused: Arc<AtomicU64>,
}

/// What [`PostgresLogSink::maintain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Maintenance {
    /// Partitions created (or re-attached).
    pub partitions_created: usize,
    /// Partitions dropped by the retention.
    pub partitions_dropped: usize,
    /// Rows purged by the retention (dropped partitions and boundary-day rows).
    pub rows_purged: u64,
}

impl PostgresLogSink {
    /// The name of the sink's migration set: its history table is
    /// `tollgate_logs_migrations`.
    pub const MIGRATION_SET: &'static str = "logs";

    /// A sink on `pool` reading the time from `clock` (for the retention and the days of the
    /// partitions), keeping [`RETENTION`] (14 days). No I/O: the schema must exist
    /// ([`PostgresLogSink::migrate`]).
    pub fn new(pool: Pool, clock: impl Clock) -> Self {
        PostgresLogSink {
            pool,
            clock: Arc::new(clock),
            retention_ms: u64::try_from(RETENTION.as_millis()).unwrap_or(u64::MAX),
            days_ahead: DEFAULT_DAYS_AHEAD,
            auto_maintenance: true,
            partitions: Arc::new(Mutex::new(BTreeSet::new())),
            last_maintenance_ms: Arc::new(AtomicU64::new(0)),
            maintaining: Arc::new(AtomicBool::new(false)),
            anonymous_per_day: DEFAULT_ANONYMOUS_ROWS_PER_DAY,
            anonymous_refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Connects to `url` ([`tollgate_postgres::connect`]), applies the migrations and runs
    /// the [maintenance](PostgresLogSink::maintain) once.
    pub async fn connect(url: &str, clock: impl Clock) -> Result<Self, BackendError> {
        let pool = tollgate_postgres::connect(url)?;
        Self::migrate(&pool).await?;
        let sink = PostgresLogSink::new(pool, clock);
        sink.maintain().await?;
        Ok(sink)
    }

    /// Creates or upgrades the log table (migration set
    /// [`MIGRATION_SET`](Self::MIGRATION_SET), under an advisory lock: safe when replicas
    /// start at once).
    pub async fn migrate(pool: &Pool) -> Result<(), BackendError> {
        tollgate_postgres::run_migrations(pool, Self::MIGRATION_SET, embedded::migrations::runner())
            .await
    }

    /// How long rows are kept (default [`RETENTION`], 14 days). Every replica should use the
    /// same value.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Days after today whose partitions the maintenance creates ahead (default
    /// [`DEFAULT_DAYS_AHEAD`]).
    pub fn with_days_ahead(mut self, days: u32) -> Self {
        self.days_ahead = days;
        self
    }

    /// Whether writes start the hourly [maintenance](PostgresLogSink::maintain) in the
    /// background (default `true`). Turn it off when a job of your own calls `maintain`.
    pub fn with_auto_maintenance(mut self, enabled: bool) -> Self {
        self.auto_maintenance = enabled;
        self
    }

    /// How many rows without an organization are stored per UTC day, all replicas together
    /// (default [`DEFAULT_ANONYMOUS_ROWS_PER_DAY`]); a day's first ones are kept. Every
    /// replica should use the same value.
    pub fn with_anonymous_rows_per_day(mut self, rows: u64) -> Self {
        self.anonymous_per_day = rows;
        self
    }

    /// Rows without an organization this instance did not store because their day's quota
    /// was used up.
    pub fn anonymous_rows_refused(&self) -> u64 {
        self.anonymous_refused.load(Ordering::Relaxed)
    }

    /// The pool the sink uses.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Creates the partitions of today and the next days, and purges rows older than the
    /// retention (dropping whole days). Runs by itself about once an hour; call it at start
    /// or from a job to control when the DDL happens.
    pub async fn maintain(&self) -> Result<Maintenance, BackendError> {
        let now = self.clock.now_ms();
        self.last_maintenance_ms
            .store(now.max(1), Ordering::Relaxed);
        maintain(
            &self.pool,
            &self.partitions,
            now,
            self.retention_ms,
            self.days_ahead,
        )
        .await
    }

    fn cutoff_ms(&self) -> u64 {
        self.clock.now_ms().saturating_sub(self.retention_ms)
    }

    /// Starts the hourly maintenance in the background when it is due (never blocks a
    /// write; errors are logged and retried an hour later).
    fn maintain_if_due(&self) {
        if !self.auto_maintenance {
            return;
        }
        let now = self.clock.now_ms();
        let last = self.last_maintenance_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < MAINTENANCE_EVERY_MS {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.maintaining.swap(true, Ordering::AcqRel) {
            return;
        }
        self.last_maintenance_ms
            .store(now.max(1), Ordering::Relaxed);
        let pool = self.pool.clone();
        let partitions = Arc::clone(&self.partitions);
        let maintaining = Arc::clone(&self.maintaining);
        let (retention_ms, days_ahead) = (self.retention_ms, self.days_ahead);
        runtime.spawn(async move {
            match maintain(&pool, &partitions, now, retention_ms, days_ahead).await {
                Ok(done) if done.rows_purged > 0 || done.partitions_dropped > 0 => {
                    tracing::info!(
                        rows = done.rows_purged,
                        partitions = done.partitions_dropped,
                        "purged request logs past the retention"
                    )
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "request log maintenance failed"),
            }
            maintaining.store(false, Ordering::Release);
        });
    }
}

/// The UTC day of a time.
fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// The partition of a day: its name and [from, to) bounds.
fn partition(day: i64) -> Option<(String, i64, i64)> {
    let date = chrono::DateTime::from_timestamp(day.checked_mul(86_400)?, 0)?.date_naive();
    let name = format!(
        "{PARTITION_PREFIX}{:04}{:02}{:02}",
        date.year(),
        date.month(),
        date.day()
    );
    Some((name, day * DAY_MS, (day + 1) * DAY_MS))
}

/// The day of a partition's name; `None` for other tables.
fn partition_day(name: &str) -> Option<i64> {
    let digits = name.strip_prefix(PARTITION_PREFIX)?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, md) = digits.split_at(digits.len() - 4);
    let date = NaiveDate::from_ymd_opt(
        year.parse().ok()?,
        md[..2].parse().ok()?,
        md[2..].parse().ok()?,
    )?;
    let midnight = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp();
    Some(midnight.div_euclid(86_400))
}

fn lock(set: &Mutex<BTreeSet<i64>>) -> MutexGuard<'_, BTreeSet<i64>> {
    // A set of known days cannot be left inconsistent by a panic.
    set.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes sure the partitions of `days` exist (one statement per day not yet known).
async fn ensure_partitions(
    pool: &Pool,
    known: &Mutex<BTreeSet<i64>>,
    days: impl IntoIterator<Item = i64>,
) -> Result<usize, BackendError> {
    let missing: Vec<i64> = {
        let known = lock(known);
        days.into_iter().filter(|d| !known.contains(d)).collect()
    };
    if missing.is_empty() {
        return Ok(0);
    }
    let client = pool.get().await.map_err(to_backend_error)?;
    let stmt = client
        .prepare_cached(ENSURE_PARTITION)
        .await
        .map_err(to_backend_error)?;
    let mut created = 0;
    for day in missing {
        let Some((name, from, to)) = partition(day) else {
            continue;
        };
        let row = client
            .query_one(&stmt, &[&name, &from, &to])
            .await
            .map_err(to_backend_error)?;
        if col::<bool>(&row, 0)? {
            tracing::debug!(partition = %name, "created request log partition");
            created += 1;
        }
        lock(known).insert(day);
    }
    Ok(created)
}

async fn maintain(
    pool: &Pool,
    known: &Mutex<BTreeSet<i64>>,
    now_ms: u64,
    retention_ms: u64,
    days_ahead: u32,
) -> Result<Maintenance, BackendError> {
    let today = day_of(to_sql(now_ms).min(LAST_MS));
    let partitions_created =
        ensure_partitions(pool, known, (0..=i64::from(days_ahead)).map(|d| today + d)).await?;
    let (rows_purged, partitions_dropped) =
        purge(pool, known, now_ms.saturating_sub(retention_ms)).await?;
    Ok(Maintenance {
        partitions_created,
        partitions_dropped,
        rows_purged,
    })
}

/// Deletes every row before `cutoff_ms`: whole days by dropping their partitions, then the
/// boundary day's early rows. Returns (rows, partitions dropped).
///
/// Runs on a connection of its own (closed afterwards) holding a session advisory lock, so
/// two replicas never purge at once and an abandoned purge cannot leave the lock behind.
async fn purge(
    pool: &Pool,
    known: &Mutex<BTreeSet<i64>>,
    cutoff_ms: u64,
) -> Result<(u64, usize), BackendError> {
    let object = pool.get().await.map_err(to_backend_error)?;
    let client = Object::take(object);
    // Replicas purge one after the other; the later one finds little left to do.
    client
        .execute(
            "SELECT pg_advisory_lock($1, hashtext(coalesce(current_schema(), '')))",
            &[&PURGE_LOCK_KEY],
        )
        .await
        .map_err(to_backend_error)?;
    let purged = purge_locked(&client, known, to_sql(cutoff_ms)).await;
    // Best effort: closing the connection (dropping it) releases the lock anyway.
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock($1, hashtext(coalesce(current_schema(), '')))",
            &[&PURGE_LOCK_KEY],
        )
        .await;
    purged
}

async fn purge_locked(
    client: &tokio_postgres::Client,
    known: &Mutex<BTreeSet<i64>>,
    cutoff: i64,
) -> Result<(u64, usize), BackendError> {
    let tables = client
        .query(LIST_PARTITIONS, &[])
        .await
        .map_err(to_backend_error)?;
    let mut expired: Vec<(i64, String, bool)> = tables
        .iter()
        .filter_map(|row| {
            let name: String = row.try_get(0).ok()?;
            let attached: bool = row.try_get(1).ok()?;
            let day = partition_day(&name)?;
            // Only days that end at or before the cutoff go whole.
            ((day + 1).checked_mul(DAY_MS)? <= cutoff).then_some((day, name, attached))
        })
        .collect();
    expired.sort();

    let mut rows = 0u64;
    let mut dropped = 0usize;
    for (day, name, attached) in expired {
        let ident = quote_ident(&name);
        lock(known).remove(&day);
        if attached {
            // Detaching takes the parent's lock only briefly (no scan); the rows are then
            // counted and dropped without holding up writers and readers of other days. An
            // interrupted purge leaves a detached table, found and dropped next time.
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL lock_timeout = '5s'; \
                     ALTER TABLE tollgate_request_logs DETACH PARTITION {ident}; COMMIT"
                ))
                .await
                .map_err(to_backend_error)?;
        }
        let count: i64 = col(
            &client
                .query_one(&format!("SELECT count(*) FROM {ident}"), &[])
                .await
                .map_err(to_backend_error)?,
            0,
        )?;
        client
            .batch_execute(&format!("DROP TABLE {ident}"))
            .await
            .map_err(to_backend_error)?;
        rows += u64::try_from(count).unwrap_or(0);
        dropped += 1;
    }

    // The anonymous quota's counters of the days gone.
    client
        .execute(
            "DELETE FROM tollgate_request_log_anonymous_days WHERE day < $1",
            &[&day_of(cutoff)],
        )
        .await
        .map_err(to_backend_error)?;

    // The boundary day (and any partition whose drop was not possible): row by row.
    rows += client
        .execute(
            "DELETE FROM tollgate_request_logs WHERE time_ms < $1",
            &[&cutoff],
        )
        .await
        .map_err(to_backend_error)?;
    Ok((rows, dropped))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A `u64` time or amount as a `bigint`, saturating.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn col<'a, T: FromSql<'a>>(
    row: &'a Row,
    idx: impl tokio_postgres::row::RowIndex + fmt::Display,
) -> Result<T, BackendError> {
    row.try_get(idx).map_err(BackendError::other)
}

fn error_code(text: &str) -> Option<ErrorCode> {
    // A code this version does not know (written by a newer replica) is left out rather
    // than failing the whole page.
    ErrorCode::ALL.into_iter().find(|c| c.as_str() == text)
}

fn record_from_row(row: &Row) -> Result<(LogRecord, i64), BackendError> {
    let time_ms: i64 = col(row, "time_ms")?;
    let id: i64 = col(row, "id")?;
    let status: i32 = col(row, "status")?;
    let code: Option<&str> = col(row, "code")?;
    let credits: i64 = col(row, "credits")?;
    let latency_ms: i64 = col(row, "latency_ms")?;
    let record = LogRecord {
        time_ms: from_sql(time_ms),
        request_id: col(row, "request_id")?,
        org_id: col::<Option<_>>(row, "org_id")?.map(OrgId::from_uuid),
        key_id: col::<Option<_>>(row, "key_id")?.map(KeyId::from_uuid),
        model_id: col::<Option<_>>(row, "model_id")?.map(ModelId::from_uuid),
        method: col(row, "method")?,
        route: col(row, "route")?,
        status: u16::try_from(status).map_err(BackendError::other)?,
        code: code.and_then(error_code),
        credits: from_sql(credits),
        latency_ms: from_sql(latency_ms),
    };
    Ok((record, id))
}

type Param = Box<dyn ToSql + Sync + Send>;

/// The page query for `query`, or `None` when nothing can match.
fn page_statement(
    query: &LogQuery,
    cutoff_ms: u64,
) -> Result<Option<(String, Vec<Param>)>, BackendError> {
    let cursor = match query.cursor.as_deref() {
        Some(text) => {
            Some(LogCursor::decode(text).ok_or_else(|| BackendError::other(InvalidCursor))?)
        }
        None => None,
    };
    let from = query.from_ms.unwrap_or(0).max(cutoff_ms);
    if from > LAST_MS as u64 {
        return Ok(None);
    }
    let mut sql =
        format!("SELECT {COLUMNS} FROM tollgate_request_logs WHERE org_id = $1 AND time_ms >= $2");
    let mut params: Vec<Param> = vec![Box::new(*query.org.as_uuid()), Box::new(to_sql(from))];
    fn bind(sql: &mut String, clause: &str, value: Param, params: &mut Vec<Param>) {
        params.push(value);
        sql.push_str(&clause.replace('?', &format!("${}", params.len())));
    }
    if let Some(to) = query.to_ms {
        if to <= from {
            return Ok(None);
        }
        bind(
            &mut sql,
            " AND time_ms < ?",
            Box::new(to_sql(to)),
            &mut params,
        );
    }
    if let Some(c) = cursor {
        if c.time_ms > LAST_MS as u64 {
            return Ok(None); // after every storable time
        }
        // Ids are bigints: a larger tiebreak is after every row of that millisecond.
        bind(
            &mut sql,
            " AND (time_ms, id) > (?",
            Box::new(to_sql(c.time_ms)),
            &mut params,
        );
        bind(&mut sql, ", ?)", Box::new(to_sql(c.tiebreak)), &mut params);
    }
    if let Some(model) = query.model {
        bind(
            &mut sql,
            " AND model_id = ?",
            Box::new(*model.as_uuid()),
            &mut params,
        );
    }
    if let Some(status) = query.status {
        bind(
            &mut sql,
            " AND status = ?",
            Box::new(i32::from(status)),
            &mut params,
        );
    }
    // One more than a page: whether there is a next page.
    let limit = i64::try_from(query.effective_limit() + 1).unwrap_or(i64::MAX);
    bind(
        &mut sql,
        " ORDER BY time_ms, id LIMIT ?",
        Box::new(limit),
        &mut params,
    );
    Ok(Some((sql, params)))
}

impl PostgresLogSink {
    async fn insert(&self, records: &[LogRecord]) -> Result<(), BackendError> {
        let client = self.pool.get().await.map_err(to_backend_error)?;
        let stmt = client
            .prepare_cached(INSERT)
            .await
            .map_err(to_backend_error)?;
        let n = records.len();
        let mut time = Vec::with_capacity(n);
        let mut request_id = Vec::with_capacity(n);
        let mut org = Vec::with_capacity(n);
        let mut key = Vec::with_capacity(n);
        let mut model = Vec::with_capacity(n);
        let mut method = Vec::with_capacity(n);
        let mut route = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut code = Vec::with_capacity(n);
        let mut credits = Vec::with_capacity(n);
        let mut latency = Vec::with_capacity(n);
        for r in records {
            time.push(to_sql(r.time_ms));
            request_id.push(r.request_id.as_str());
            org.push(r.org_id.map(|id| *id.as_uuid()));
            key.push(r.key_id.map(|id| *id.as_uuid()));
            model.push(r.model_id.map(|id| *id.as_uuid()));
            method.push(r.method.as_str());
            route.push(r.route.as_deref());
            status.push(i32::from(r.status));
            code.push(r.code.map(ErrorCode::as_str));
            credits.push(to_sql(r.credits));
            latency.push(to_sql(r.latency_ms));
        }
        client
            .execute(
                &stmt,
                &[
                    &time,
                    &request_id,
                    &org,
                    &key,
                    &model,
                    &method,
                    &route,
                    &status,
                    &code,
                    &credits,
                    &latency,
                ],
            )
            .await
            .map_err(to_backend_error)?;
        Ok(())
    }

    async fn write(&self, mut records: Vec<LogRecord>) -> Result<(), BackendError> {
        let cutoff = self.cutoff_ms();
        let before = records.len();
        // Already past the retention: never stored (as the memory sink does).
        records.retain(|r| r.time_ms >= cutoff && r.time_ms <= LAST_MS as u64);
        if records.len() < before {
            tracing::debug!(
                rows = before - records.len(),
                "request log rows outside the retention were not stored"
            );
        }
        self.maintain_if_due();
        let refused = anonymous::admit(&self.pool, &mut records, self.anonymous_per_day).await?;
        if refused > 0 {
            self.anonymous_refused.fetch_add(refused, Ordering::Relaxed);
            tracing::debug!(
                rows = refused,
                "request log rows without an org over the day's quota were not stored"
            );
        }
        if records.is_empty() {
            return Ok(());
        }
        let days: BTreeSet<i64> = records.iter().map(|r| day_of(to_sql(r.time_ms))).collect();
        ensure_partitions(&self.pool, &self.partitions, days.iter().copied()).await?;
        match self.insert(&records).await {
            Err(err) if is_missing_partition(&err) => {
                // A partition we thought existed was dropped (another replica's purge with
                // a clock ahead of ours): create it again and retry once.
                {
                    let mut known = lock(&self.partitions);
                    for day in &days {
                        known.remove(day);
                    }
                }
                ensure_partitions(&self.pool, &self.partitions, days.iter().copied()).await?;
                self.insert(&records).await
            }
            other => other,
        }
    }

    async fn page(&self, query: LogQuery) -> Result<LogPage, BackendError> {
        let Some((sql, params)) = page_statement(&query, self.cutoff_ms())? else {
            return Ok(LogPage::default());
        };
        let client = self.pool.get().await.map_err(to_backend_error)?;
        let stmt = client
            .prepare_cached(&sql)
            .await
            .map_err(to_backend_error)?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
        let rows = client.query(&stmt, &refs).await.map_err(to_backend_error)?;
        let limit = query.effective_limit();
        let more = rows.len() > limit;
        let mut records = Vec::with_capacity(rows.len().min(limit));
        let mut last = None;
        for row in rows.iter().take(limit) {
            let (record, id) = record_from_row(row)?;
            last = Some(LogCursor {
                time_ms: record.time_ms,
                tiebreak: from_sql(id),
            });
            records.push(record);
        }
        Ok(LogPage {
            records,
            next_cursor: last.filter(|_| more).map(|c| c.encode()),
        })
    }
}

fn is_missing_partition(err: &BackendError) -> bool {
    use std::error::Error as _;
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(db) = e
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::as_db_error)
        {
            // "no partition of relation … found for row"
            return *db.code() == tokio_postgres::error::SqlState::CHECK_VIOLATION
                && db.message().starts_with("no partition");
        }
        source = e.source();
    }
    false
}

impl LogSink for PostgresLogSink {
    fn write_batch(&self, records: Vec<LogRecord>) -> BoxFuture<Result<(), BackendError>> {
        let sink = self.clone_handle();
        Box::pin(async move { sink.write(records).await })
    }

    fn query(&self, query: LogQuery) -> BoxFuture<Result<LogPage, BackendError>> {
        let sink = self.clone_handle();
        Box::pin(async move { sink.page(query).await })
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        let pool = self.pool.clone();
        let partitions = Arc::clone(&self.partitions);
        Box::pin(async move {
            let (rows, _dropped) = purge(&pool, &partitions, cutoff_ms).await?;
            Ok(rows)
        })
    }
}

impl PostgresLogSink {
    /// A handle sharing everything with `self`, for the `'static` futures of the trait.
    fn clone_handle(&self) -> PostgresLogSink {
        PostgresLogSink {
            pool: self.pool.clone(),
            clock: Arc::clone(&self.clock),
            retention_ms: self.retention_ms,
            days_ahead: self.days_ahead,
            auto_maintenance: self.auto_maintenance,
            partitions: Arc::clone(&self.partitions),
            last_maintenance_ms: Arc::clone(&self.last_maintenance_ms),
            maintaining: Arc::clone(&self.maintaining),
            anonymous_per_day: self.anonymous_per_day,
            anonymous_refused: Arc::clone(&self.anonymous_refused),
        }
    }
}

impl fmt::Debug for PostgresLogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLogSink")
            .field("pool", &self.pool.status())
            .field("retention_ms", &self.retention_ms)
            .field("days_ahead", &self.days_ahead)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_by_utc_day_and_parsed_back() {
        let day = day_of(1_700_000_000_000); // 2023-11-14T22:13:20Z
        let (name, from, to) = partition(day).unwrap();
        assert_eq!(name, "tollgate_request_logs_p20231114");
        assert_eq!((from, to), (1_699_920_000_000, 1_700_006_400_000));
        assert_eq!(partition_day(&name), Some(day));
        assert_eq!(partition_day("tollgate_request_logs_p19700101"), Some(0));
        for other in [
            "tollgate_request_logs",
            "tollgate_request_logs_p2023111",
            "tollgate_request_logs_p20231340",
            "tollgate_request_logs_pabcdefgh",
            "tollgate_request_logs_p+0231114",
        ] {
            assert_eq!(partition_day(other), None, "{other}");
        }
        // Far future: a five-digit year still round-trips.
        let far = day_of(LAST_MS);
        let (name, _, _) = partition(far).unwrap();
        assert_eq!(name, "tollgate_request_logs_p2621421231");
        assert_eq!(partition_day(&name), Some(far));
    }

    #[test]
    fn page_statements_bind_only_the_filters_given() {
        let org = OrgId::new();
        let mut q = LogQuery::new(org);
        let (sql, params) = page_statement(&q, 5).unwrap().unwrap();
        assert!(
            sql.ends_with("WHERE org_id = $1 AND time_ms >= $2 ORDER BY time_ms, id LIMIT $3"),
            "{sql}"
        );
        assert_eq!(params.len(), 3);

        q.to_ms = Some(100);
        q.model = Some(ModelId::new());
        q.status = Some(429);
        q.cursor = Some(
            LogCursor {
                time_ms: 7,
                tiebreak: u64::MAX,
            }
            .encode(),
        );
        let (sql, params) = page_statement(&q, 5).unwrap().unwrap();
        assert!(sql.contains("AND time_ms < $3 AND (time_ms, id) > ($4, $5) AND model_id = $6 AND status = $7 ORDER BY time_ms, id LIMIT $8"), "{sql}");
        assert_eq!(params.len(), 8);

        // Nothing can match: no statement at all.
        q.to_ms = Some(5);
        assert!(page_statement(&q, 5).unwrap().is_none());
        q.to_ms = None;
        q.cursor = Some(
            LogCursor {
                time_ms: u64::MAX,
                tiebreak: 0,
            }
            .encode(),
        );
        assert!(page_statement(&q, 5).unwrap().is_none());
        q.cursor = Some("nope".into());
        assert_eq!(
            page_statement(&q, 5).unwrap_err().to_string(),
            "backend error: invalid log cursor"
        );
    }
}
