//! The ledger's SQL statements and the conversions between its rows and Rust values.

use std::fmt;

use deadpool_postgres::Pool;
use tokio_postgres::types::FromSql;
use tokio_postgres::Row;
use tollgate_core::{BackendError, OrgId, Plan};
use tollgate_postgres::to_backend_error;

use crate::ledger::{Account, EntryKind, MAX_CREDITS};

/// A period end meaning "no next period" (the end of the calendar); `u64::MAX` in Rust.
pub(super) const NO_NEXT_PERIOD: i64 = i64::MAX;

/// Expired holds released per sweep statement (a sweep runs statements until done).
pub(super) const SWEEP_BATCH: i64 = 10_000;

/// First key of the advisory lock a sweep holds ("tgsw"), so replicas sweep one at a time.
/// The second key is the schema's hash.
pub(super) const SWEEP_LOCK_KEY: i32 = 0x7467_7377;

// Holds, commits and releases of the request path are batched: `ops.rs`.
// Releases (or, with $3, voids: refunds a committed hold) one hold; says what it was.
pub(super) const RELEASE: &str =
    "SELECT outcome, charged FROM tollgate_credit_release($1, $2, $3, $4)";
// Keeps open holds of requests still in flight from expiring. Locks them in id order, as
// the batches of commits and releases do, so neither can deadlock the other.
pub(super) const EXTEND: &str = "\
    UPDATE tollgate_credit_holds h SET expires_at_ms = greatest(h.expires_at_ms, $1) \
      FROM (SELECT id FROM tollgate_credit_holds \
             WHERE id = ANY($2) AND forget_at_ms IS NULL ORDER BY id FOR UPDATE) l \
     WHERE h.id = l.id";
pub(super) const SUBSCRIBE: &str = "SELECT * FROM tollgate_credit_subscribe($1, $2, $3, $4)";
pub(super) const CANCEL: &str = "SELECT tollgate_credit_cancel($1, $2)";
pub(super) const TOP_UP: &str = "SELECT * FROM tollgate_credit_top_up($1, $2, $3)";
pub(super) const TOP_UP_ONCE: &str = "SELECT * FROM tollgate_credit_top_up_once($1, $2, $3, $4)";
pub(super) const SET_BALANCE: &str = "SELECT * FROM tollgate_credit_set_balance($1, $2, $3)";
pub(super) const ACCOUNT: &str = "SELECT * FROM tollgate_credit_account($1, $2)";
pub(super) const ENTRIES: &str = "\
    SELECT at_ms, kind, delta_plan, delta_topup, balance_after, request_id \
      FROM tollgate_credit_ledger WHERE org = $1 ORDER BY id";
pub(super) const DUE: &str = "\
    SELECT org FROM tollgate_credit_accounts \
     WHERE plan IS NOT NULL AND period_end_ms <= $1 AND period_end_ms <> $2 \
     ORDER BY org LIMIT $3";
pub(super) const RENEW: &str = "SELECT tollgate_credit_renew($1, $2)";
// What keys of an org spent in its current period (after RENEW).
pub(super) const KEY_SPEND: &str = "\
    SELECT s.key_id, s.spent FROM tollgate_credit_key_spend s \
      JOIN tollgate_credit_accounts a ON a.org = s.org \
     WHERE s.org = $1 AND s.key_id = ANY($2) AND s.period_start_ms = a.period_start_ms \
       AND s.spent > 0";
// One sweeper at a time (an advisory lock for the statement's transaction): two sweeps
// updating the same accounts in different orders could deadlock. Holds being settled right
// now are skipped (they are not stuck). `open` is counted in the statement's snapshot, before
// the sweep.
pub(super) const SWEEP: &str = "\
    WITH sweeper AS ( \
        SELECT pg_try_advisory_xact_lock($3, hashtext(coalesce(current_schema(), ''))) AS got \
    ), expired AS ( \
        SELECT id FROM tollgate_credit_holds \
         WHERE forget_at_ms IS NULL AND expires_at_ms <= $1 AND (SELECT got FROM sweeper) \
         ORDER BY id LIMIT $4 \
         FOR UPDATE SKIP LOCKED \
    ), swept AS ( \
        UPDATE tollgate_credit_holds h SET forget_at_ms = $2 \
          FROM expired e WHERE h.id = e.id \
        RETURNING h.org, h.amount \
    ), per_org AS ( \
        SELECT org, sum(amount) AS amount FROM swept GROUP BY org \
    ), released AS ( \
        UPDATE tollgate_credit_accounts a \
           SET held = greatest(a.held - p.amount, 0) \
          FROM per_org p WHERE a.org = p.org \
    ), forgotten AS ( \
        DELETE FROM tollgate_credit_holds \
         WHERE forget_at_ms IS NOT NULL AND forget_at_ms <= $1 AND (SELECT got FROM sweeper) \
    ) \
    SELECT (SELECT count(*) FROM swept) AS swept, \
           (SELECT count(*) FROM tollgate_credit_holds WHERE forget_at_ms IS NULL) AS open";
pub(super) const OPEN_HOLDS: &str =
    "SELECT count(*) FROM tollgate_credit_holds WHERE forget_at_ms IS NULL";

/// A `u64` time or amount as a PostgreSQL `bigint`, saturating.
pub(super) fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A non-negative `bigint` column as `u64`.
pub(super) fn from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) fn col<'a, T: FromSql<'a>>(
    row: &'a Row,
    idx: impl tokio_postgres::row::RowIndex + fmt::Display,
) -> Result<T, BackendError> {
    row.try_get(idx).map_err(BackendError::other)
}

pub(super) fn account_from_row(row: &Row) -> Result<Account, BackendError> {
    let plan: Option<String> = col(row, "plan")?;
    let plan = plan
        .map(|name| name.parse::<Plan>())
        .transpose()
        .map_err(BackendError::other)?;
    let period_end: i64 = col(row, "period_end_ms")?;
    Ok(Account {
        org: OrgId::from_uuid(col(row, "org")?),
        plan,
        plan_credits: from_sql(col(row, "plan_credits")?),
        topup_credits: from_sql(col(row, "topup_credits")?),
        held: from_sql(col(row, "held")?),
        period_start_ms: from_sql(col(row, "period_start_ms")?),
        period_end_ms: if period_end == NO_NEXT_PERIOD {
            u64::MAX
        } else {
            from_sql(period_end)
        },
    })
}

pub(super) fn entry_kind(kind: &str) -> Result<EntryKind, BackendError> {
    Ok(match kind {
        "charge" => EntryKind::Charge,
        "top_up" => EntryKind::TopUp,
        "renewal" => EntryKind::Renewal,
        "plan_change" => EntryKind::PlanChange,
        "adjustment" => EntryKind::Adjustment,
        "cancel" => EntryKind::Cancel,
        "refund" => EntryKind::Refund,
        other => {
            return Err(BackendError::other(format!(
                "unknown ledger row kind {other:?}"
            )))
        }
    })
}

pub(super) fn out_of_range(what: &str, value: u64) -> BackendError {
    BackendError::other(format!(
        "{what} {value} is out of range: balances are limited to {MAX_CREDITS} credits"
    ))
}

/// Runs one statement returning at most one row.
pub(super) async fn query_opt(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Row>, BackendError> {
    let client = pool.get().await.map_err(to_backend_error)?;
    let stmt = client.prepare_cached(sql).await.map_err(to_backend_error)?;
    client
        .query_opt(&stmt, params)
        .await
        .map_err(to_backend_error)
}

/// Runs one statement returning exactly one row.
pub(super) async fn query_one(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Row, BackendError> {
    query_opt(pool, sql, params)
        .await?
        .ok_or_else(|| BackendError::other("the ledger statement returned no row"))
}

pub(super) fn is_out_of_range(err: &BackendError) -> bool {
    use std::error::Error as _;
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(db) = e
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::as_db_error)
        {
            return *db.code() == tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE;
        }
        source = e.source();
    }
    false
}
