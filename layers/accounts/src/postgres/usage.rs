//! [`PostgresUsageStore`]: table `tollgate_usage_hourly`.

use std::fmt;

use tokio_postgres::error::SqlState;
use tollgate_core::{BackendError, BoxFuture, ModelId, SharedClock};
use tollgate_postgres::deadpool_postgres::Pool;
use tollgate_postgres::{run_migrations, to_backend_error};
use uuid::Uuid;

use super::{embedded, ms, unsigned, USAGE_MIGRATION_SET};
use crate::usage::{
    UsageBatch, UsageBucket, UsageCounts, UsageQuery, UsageRow, UsageStore, USAGE_RETENTION,
};

/// Adds a whole batch in one statement; rows arrive sorted by key, so concurrent replicas
/// lock rows in the same order.
const ADD_SQL: &str = "INSERT INTO tollgate_usage_hourly AS u \
       (org_id, hour_ms, model_id, route, requests, ok, client_errors, server_errors, \
        rate_limited, credits) \
     SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::bigint[], \
                          $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[]) \
     ON CONFLICT (org_id, hour_ms, model_id, route) DO UPDATE SET \
       requests = u.requests + EXCLUDED.requests, \
       ok = u.ok + EXCLUDED.ok, \
       client_errors = u.client_errors + EXCLUDED.client_errors, \
       server_errors = u.server_errors + EXCLUDED.server_errors, \
       rate_limited = u.rate_limited + EXCLUDED.rate_limited, \
       credits = u.credits + EXCLUDED.credits";

/// A [`UsageStore`] in PostgreSQL. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresUsageStore {
    pool: Pool,
    clock: SharedClock,
}

impl fmt::Debug for PostgresUsageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresUsageStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresUsageStore {
    /// A store on `pool` after applying its migrations.
    pub async fn new(pool: Pool, clock: SharedClock) -> Result<Self, BackendError> {
        run_migrations(
            &pool,
            USAGE_MIGRATION_SET,
            embedded::usage::migrations::runner(),
        )
        .await?;
        Ok(PostgresUsageStore { pool, clock })
    }
}

#[derive(Default)]
struct Columns {
    orgs: Vec<Uuid>,
    hours: Vec<i64>,
    models: Vec<Uuid>,
    routes: Vec<String>,
    counts: [Vec<i64>; 6],
}

fn columns(rows: Vec<UsageRow>) -> Columns {
    // Merge duplicate keys first: one statement may not update a row twice.
    let mut batch = UsageBatch::default();
    for row in rows {
        batch.add(row.key, &row.counts);
    }
    let mut c = Columns::default();
    for UsageRow { key, counts } in batch.into_rows() {
        c.orgs.push(*key.org.as_uuid());
        c.hours.push(ms(key.hour_ms));
        c.models
            .push(key.model.map_or(Uuid::nil(), |m| *m.as_uuid()));
        c.routes.push(key.route.unwrap_or_default());
        for (column, value) in c.counts.iter_mut().zip([
            counts.requests,
            counts.ok,
            counts.client_errors,
            counts.server_errors,
            counts.rate_limited,
            counts.credits,
        ]) {
            column.push(ms(value));
        }
    }
    c
}

impl UsageStore for PostgresUsageStore {
    fn add(&self, rows: Vec<UsageRow>) -> BoxFuture<Result<(), BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            let c = columns(rows);
            let client = pool.get().await.map_err(to_backend_error)?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
                &c.orgs,
                &c.hours,
                &c.models,
                &c.routes,
                &c.counts[0],
                &c.counts[1],
                &c.counts[2],
                &c.counts[3],
                &c.counts[4],
                &c.counts[5],
            ];
            let mut retried = false;
            loop {
                match client.execute(ADD_SQL, &params).await {
                    Ok(_) => return Ok(()),
                    // Sorted rows make deadlocks unlikely, not impossible (a replica of
                    // another version): the statement is all-or-nothing, so run it again.
                    Err(e)
                        if !retried
                            && matches!(
                                e.code(),
                                Some(&SqlState::T_R_DEADLOCK_DETECTED)
                                    | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                            ) =>
                    {
                        retried = true;
                    }
                    Err(e) => return Err(to_backend_error(e)),
                }
            }
        })
    }

    fn query(&self, q: UsageQuery) -> BoxFuture<Result<Vec<UsageBucket>, BackendError>> {
        let pool = self.pool.clone();
        let horizon = self
            .clock
            .now_ms()
            .saturating_sub(USAGE_RETENTION.as_millis() as u64);
        Box::pin(async move {
            let from = q.from_ms.max(horizon);
            if from >= q.to_ms {
                return Ok(Vec::new());
            }
            // The four shapes are fixed text; nothing of the request goes into the SQL.
            let model = if q.group_by.model {
                "model_id"
            } else {
                "NULL::uuid"
            };
            let route = if q.group_by.route {
                "route"
            } else {
                "NULL::text"
            };
            let sql = format!(
                "SELECT (hour_ms / $4) * $4 AS start, {model} AS m, {route} AS r, \
                        sum(requests)::bigint, sum(ok)::bigint, sum(client_errors)::bigint, \
                        sum(server_errors)::bigint, sum(rate_limited)::bigint, \
                        sum(credits)::bigint \
                 FROM tollgate_usage_hourly \
                 WHERE org_id = $1 AND hour_ms >= $2 AND hour_ms < $3 \
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, {route} COLLATE \"C\""
            );
            let client = pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    &sql,
                    &[
                        q.org.as_uuid(),
                        &ms(from),
                        &ms(q.to_ms),
                        &ms(q.granularity.bucket_ms()),
                    ],
                )
                .await
                .map_err(to_backend_error)?;
            rows.iter()
                .map(|row| {
                    let get = |i: usize| -> Result<u64, BackendError> {
                        Ok(unsigned(
                            row.try_get::<_, i64>(i).map_err(to_backend_error)?,
                        ))
                    };
                    let model: Option<Uuid> = row.try_get(1).map_err(to_backend_error)?;
                    let route: Option<String> = row.try_get(2).map_err(to_backend_error)?;
                    Ok(UsageBucket {
                        start_ms: get(0)?,
                        model: model.filter(|m| !m.is_nil()).map(ModelId::from_uuid),
                        route: route.filter(|r| !r.is_empty()),
                        counts: UsageCounts {
                            requests: get(3)?,
                            ok: get(4)?,
                            client_errors: get(5)?,
                            server_errors: get(6)?,
                            rate_limited: get(7)?,
                            credits: get(8)?,
                        },
                    })
                })
                .collect()
        })
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "DELETE FROM tollgate_usage_hourly WHERE hour_ms < $1",
                    &[&ms(cutoff_ms)],
                )
                .await
                .map_err(to_backend_error)
        })
    }
}
