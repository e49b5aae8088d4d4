//! [`PostgresDashboardSessionStore`]: table `tollgate_dashboard_sessions`.

use std::fmt;

use tokio_postgres::Row;
use tollgate_core::{BackendError, BoxFuture, SharedClock};
use tollgate_postgres::deadpool_postgres::Pool;
use tollgate_postgres::{run_migrations, to_backend_error};
use uuid::Uuid;

use super::{embedded, ms, unsigned, SESSIONS_MIGRATION_SET};
use crate::sessions::{
    DashboardSession, DashboardSessionStore, SessionSubject, ABSOLUTE_TIMEOUT, IDLE_TIMEOUT,
};
use crate::token::TokenHash;
use crate::user::UserId;

const IDLE_MS: i64 = IDLE_TIMEOUT.as_millis() as i64;
const ABSOLUTE_MS: i64 = ABSOLUTE_TIMEOUT.as_millis() as i64;

/// A [`DashboardSessionStore`] in PostgreSQL. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresDashboardSessionStore {
    pool: Pool,
    clock: SharedClock,
}

impl fmt::Debug for PostgresDashboardSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresDashboardSessionStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresDashboardSessionStore {
    /// A store on `pool` after applying its migrations.
    pub async fn new(pool: Pool, clock: SharedClock) -> Result<Self, BackendError> {
        run_migrations(
            &pool,
            SESSIONS_MIGRATION_SET,
            embedded::sessions::migrations::runner(),
        )
        .await?;
        Ok(PostgresDashboardSessionStore { pool, clock })
    }
}

fn session_from(row: &Row) -> Result<DashboardSession, BackendError> {
    let user: Option<Uuid> = row.try_get(0).map_err(to_backend_error)?;
    Ok(DashboardSession {
        subject: user.map_or(SessionSubject::Operator, |u| {
            SessionSubject::User(UserId::from_uuid(u))
        }),
        created_at_ms: unsigned(row.try_get(1).map_err(to_backend_error)?),
        last_seen_ms: unsigned(row.try_get(2).map_err(to_backend_error)?),
    })
}

impl DashboardSessionStore for PostgresDashboardSessionStore {
    fn create(
        &self,
        token: TokenHash,
        subject: SessionSubject,
    ) -> BoxFuture<Result<DashboardSession, BackendError>> {
        let (pool, now) = (self.pool.clone(), ms(self.clock.now_ms()));
        Box::pin(async move {
            let user = match subject {
                SessionSubject::User(id) => Some(*id.as_uuid()),
                SessionSubject::Operator => None,
            };
            let client = pool.get().await.map_err(to_backend_error)?;
            let row = client
                .query_one(
                    "INSERT INTO tollgate_dashboard_sessions \
                       (token_hash, user_id, created_ms, last_seen_ms) VALUES ($1, $2, $3, $3) \
                     RETURNING user_id, created_ms, last_seen_ms",
                    &[&token.as_bytes().as_slice(), &user, &now],
                )
                .await
                .map_err(to_backend_error)?;
            session_from(&row)
        })
    }

    fn touch(&self, token: TokenHash) -> BoxFuture<Result<Option<DashboardSession>, BackendError>> {
        let (pool, now) = (self.pool.clone(), ms(self.clock.now_ms()));
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            // Checks both expiries and records the use in one round trip.
            let row = client
                .query_opt(
                    "UPDATE tollgate_dashboard_sessions \
                     SET last_seen_ms = GREATEST(last_seen_ms, $2) \
                     WHERE token_hash = $1 AND last_seen_ms > $2::bigint - $3::bigint AND created_ms > $2::bigint - $4::bigint \
                     RETURNING user_id, created_ms, last_seen_ms",
                    &[&token.as_bytes().as_slice(), &now, &IDLE_MS, &ABSOLUTE_MS],
                )
                .await
                .map_err(to_backend_error)?;
            row.as_ref().map(session_from).transpose()
        })
    }

    fn revoke(&self, token: TokenHash) -> BoxFuture<Result<bool, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let n = client
                .execute(
                    "DELETE FROM tollgate_dashboard_sessions WHERE token_hash = $1",
                    &[&token.as_bytes().as_slice()],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(n > 0)
        })
    }

    fn revoke_user(&self, user: UserId) -> BoxFuture<Result<u64, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "DELETE FROM tollgate_dashboard_sessions WHERE user_id = $1",
                    &[user.as_uuid()],
                )
                .await
                .map_err(to_backend_error)
        })
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        let (pool, now) = (self.pool.clone(), ms(self.clock.now_ms()));
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "DELETE FROM tollgate_dashboard_sessions \
                     WHERE last_seen_ms <= $1::bigint - $2::bigint OR created_ms <= $1::bigint - $3::bigint",
                    &[&now, &IDLE_MS, &ABSOLUTE_MS],
                )
                .await
                .map_err(to_backend_error)
        })
    }
}
