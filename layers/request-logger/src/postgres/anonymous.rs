//! The daily quota of rows without an organization.

use std::collections::BTreeMap;

use deadpool_postgres::Pool;
use tollgate_core::BackendError;
use tollgate_postgres::to_backend_error;

use super::{col, day_of, to_sql};
use crate::record::LogRecord;

/// Takes `n` more anonymous rows of `day` from the quota; returns how many were taken
/// before (the counter's old value).
const TAKE: &str = "\
    INSERT INTO tollgate_request_log_anonymous_days AS d (day, rows) VALUES ($1, $2) \
    ON CONFLICT (day) DO UPDATE SET rows = d.rows + EXCLUDED.rows \
    RETURNING rows - $2";

/// Removes from `records` the anonymous rows over each day's `cap`, keeping a day's first
/// ones; returns how many were removed. One statement per day that has anonymous rows in
/// the batch (a batch rarely spans more than one), never a count of the table.
///
/// The counter is taken in its own statement, not in the insert's transaction, so replicas
/// do not queue on the day's counter row for the length of an insert; a batch whose insert
/// then fails has used its share of the quota (the cap errs towards fewer rows).
pub(super) async fn admit(
    pool: &Pool,
    records: &mut Vec<LogRecord>,
    cap: u64,
) -> Result<u64, BackendError> {
    let mut offered: BTreeMap<i64, u64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.org_id.is_none()) {
        *offered.entry(day_of(to_sql(r.time_ms))).or_default() += 1;
    }
    if offered.is_empty() {
        return Ok(0);
    }
    let client = pool.get().await.map_err(to_backend_error)?;
    let stmt = client
        .prepare_cached(TAKE)
        .await
        .map_err(to_backend_error)?;
    // Room left per day, in this batch.
    let mut room: BTreeMap<i64, u64> = BTreeMap::new();
    for (day, n) in offered {
        let before: i64 = col(
            &client
                .query_one(&stmt, &[&day, &to_sql(n)])
                .await
                .map_err(to_backend_error)?,
            0,
        )?;
        let before = u64::try_from(before).unwrap_or(0);
        room.insert(day, cap.saturating_sub(before).min(n));
    }
    let before = records.len();
    records.retain(|r| {
        if r.org_id.is_some() {
            return true;
        }
        match room.get_mut(&day_of(to_sql(r.time_ms))) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    });
    Ok((before - records.len()) as u64)
}
