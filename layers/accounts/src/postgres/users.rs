//! [`PostgresUserStore`]: tables `tollgate_users`, `tollgate_user_invites`,
//! `tollgate_sign_in_attempts`.

use std::fmt;

use tokio_postgres::Row;
use tollgate_core::{BackendError, BoxFuture, OrgId, SharedClock};
use tollgate_postgres::deadpool_postgres::Pool;
use tollgate_postgres::{run_migrations, to_backend_error};

use super::{bad_row, embedded, ms, unsigned, USERS_MIGRATION_SET};
use crate::token::TokenHash;
use crate::user::{Role, User, UserId};
use crate::users::{
    Credentials, InviteOutcome, NewInvite, SignInGate, UserStore, INVITE_TTL, MAX_SIGN_IN_FAILURES,
    SIGN_IN_WINDOW,
};

const USER_COLUMNS: &str = "id, org_id, email, role, created_ms, password_hash IS NOT NULL";

/// A [`UserStore`] in PostgreSQL. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresUserStore {
    pool: Pool,
    clock: SharedClock,
}

impl fmt::Debug for PostgresUserStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresUserStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PostgresUserStore {
    /// A store on `pool` after applying its migrations.
    pub async fn new(pool: Pool, clock: SharedClock) -> Result<Self, BackendError> {
        run_migrations(
            &pool,
            USERS_MIGRATION_SET,
            embedded::users::migrations::runner(),
        )
        .await?;
        Ok(PostgresUserStore { pool, clock })
    }

    fn now(&self) -> i64 {
        ms(self.clock.now_ms())
    }
}

fn user_from(row: &Row) -> Result<User, BackendError> {
    let role: String = row.try_get(3).map_err(to_backend_error)?;
    Ok(User {
        id: UserId::from_uuid(row.try_get(0).map_err(to_backend_error)?),
        org: OrgId::from_uuid(row.try_get(1).map_err(to_backend_error)?),
        email: row.try_get(2).map_err(to_backend_error)?,
        role: role.parse::<Role>().map_err(|_| bad_row("role"))?,
        created_at_ms: unsigned(row.try_get(4).map_err(to_backend_error)?),
        active: row.try_get(5).map_err(to_backend_error)?,
    })
}

const WINDOW_MS: i64 = SIGN_IN_WINDOW.as_millis() as i64;

impl UserStore for PostgresUserStore {
    fn invite(&self, invite: NewInvite) -> BoxFuture<Result<InviteOutcome, BackendError>> {
        let (pool, now) = (self.pool.clone(), self.now());
        Box::pin(async move {
            let mut client = pool.get().await.map_err(to_backend_error)?;
            let tx = client.transaction().await.map_err(to_backend_error)?;
            let id = UserId::new();
            let inserted = tx
                .query_opt(
                    &format!(
                        "INSERT INTO tollgate_users (id, org_id, email, role, created_ms) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (email) DO NOTHING \
                         RETURNING {USER_COLUMNS}"
                    ),
                    &[
                        id.as_uuid(),
                        invite.org.as_uuid(),
                        &invite.email,
                        &invite.role.as_str(),
                        &now,
                    ],
                )
                .await
                .map_err(to_backend_error)?;
            let Some(row) = inserted else {
                return Ok(InviteOutcome::EmailTaken);
            };
            let user = user_from(&row)?;
            tx.execute(
                "INSERT INTO tollgate_user_invites (token_hash, user_id, expires_ms) \
                 VALUES ($1, $2, $3)",
                &[
                    &invite.token.as_bytes().as_slice(),
                    id.as_uuid(),
                    &(now + INVITE_TTL.as_millis() as i64),
                ],
            )
            .await
            .map_err(to_backend_error)?;
            tx.commit().await.map_err(to_backend_error)?;
            Ok(InviteOutcome::Invited(user))
        })
    }

    fn users(&self, org: OrgId) -> BoxFuture<Result<Vec<User>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {USER_COLUMNS} FROM tollgate_users WHERE org_id = $1 \
                         ORDER BY created_ms, id"
                    ),
                    &[org.as_uuid()],
                )
                .await
                .map_err(to_backend_error)?;
            rows.iter().map(user_from).collect()
        })
    }

    fn user(&self, id: UserId) -> BoxFuture<Result<Option<User>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let row = client
                .query_opt(
                    &format!("SELECT {USER_COLUMNS} FROM tollgate_users WHERE id = $1"),
                    &[id.as_uuid()],
                )
                .await
                .map_err(to_backend_error)?;
            row.as_ref().map(user_from).transpose()
        })
    }

    fn delete_user(&self, id: UserId) -> BoxFuture<Result<Option<User>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            // Invites go with the user (ON DELETE CASCADE).
            let row = client
                .query_opt(
                    &format!("DELETE FROM tollgate_users WHERE id = $1 RETURNING {USER_COLUMNS}"),
                    &[id.as_uuid()],
                )
                .await
                .map_err(to_backend_error)?;
            row.as_ref().map(user_from).transpose()
        })
    }

    fn pending_invite(&self, token: TokenHash) -> BoxFuture<Result<Option<User>, BackendError>> {
        let (pool, now) = (self.pool.clone(), self.now());
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let row = client
                .query_opt(
                    "SELECT u.id, u.org_id, u.email, u.role, u.created_ms, \
                            u.password_hash IS NOT NULL \
                     FROM tollgate_user_invites i JOIN tollgate_users u ON u.id = i.user_id \
                     WHERE i.token_hash = $1 AND i.used_ms IS NULL AND i.expires_ms > $2",
                    &[&token.as_bytes().as_slice(), &now],
                )
                .await
                .map_err(to_backend_error)?;
            row.as_ref().map(user_from).transpose()
        })
    }

    fn accept_invite(
        &self,
        token: TokenHash,
        password_hash: String,
    ) -> BoxFuture<Result<Option<User>, BackendError>> {
        let (pool, now) = (self.pool.clone(), self.now());
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            // One statement: the invite's row lock orders concurrent uses, and the loser sees
            // `used_ms` set when its WHERE is re-checked.
            let row = client
                .query_opt(
                    "WITH used AS ( \
                         UPDATE tollgate_user_invites SET used_ms = $3 \
                         WHERE token_hash = $1 AND used_ms IS NULL AND expires_ms > $3 \
                         RETURNING user_id) \
                     UPDATE tollgate_users u SET password_hash = $2, password_set_ms = $3 \
                     FROM used WHERE u.id = used.user_id \
                     RETURNING u.id, u.org_id, u.email, u.role, u.created_ms, true",
                    &[&token.as_bytes().as_slice(), &password_hash, &now],
                )
                .await
                .map_err(to_backend_error)?;
            row.as_ref().map(user_from).transpose()
        })
    }

    fn credentials(&self, email: String) -> BoxFuture<Result<Option<Credentials>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let row = client
                .query_opt(
                    &format!(
                        "SELECT {USER_COLUMNS}, password_hash FROM tollgate_users WHERE email = $1"
                    ),
                    &[&email],
                )
                .await
                .map_err(to_backend_error)?;
            row.map(|row| {
                Ok(Credentials {
                    user: user_from(&row)?,
                    password_hash: row.try_get(6).map_err(to_backend_error)?,
                })
            })
            .transpose()
        })
    }

    fn set_password(
        &self,
        id: UserId,
        password_hash: String,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let (pool, now) = (self.pool.clone(), self.now());
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let n = client
                .execute(
                    "UPDATE tollgate_users SET password_hash = $2, password_set_ms = $3 \
                     WHERE id = $1",
                    &[id.as_uuid(), &password_hash, &now],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(n > 0)
        })
    }

    fn sign_in_attempt(&self, key: String) -> BoxFuture<Result<SignInGate, BackendError>> {
        let (pool, now) = (self.pool.clone(), self.now());
        let key = TokenHash::of(key.as_bytes());
        let max = MAX_SIGN_IN_FAILURES as i32;
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            // One atomic upsert: a new window when the old one ended, else one more attempt,
            // counted up to max + 1 (which means: refused).
            let row = client
                .query_one(
                    "INSERT INTO tollgate_sign_in_attempts AS a (key_hash, window_start_ms, attempts) \
                     VALUES ($1, $2, 1) \
                     ON CONFLICT (key_hash) DO UPDATE SET \
                       window_start_ms = CASE WHEN a.window_start_ms + $3 <= $2 THEN $2 \
                                              ELSE a.window_start_ms END, \
                       attempts = CASE WHEN a.window_start_ms + $3 <= $2 THEN 1 \
                                       ELSE LEAST(a.attempts + 1, $4 + 1) END \
                     RETURNING window_start_ms, attempts",
                    &[&key.as_bytes().as_slice(), &now, &WINDOW_MS, &max],
                )
                .await
                .map_err(to_backend_error)?;
            let start: i64 = row.try_get(0).map_err(to_backend_error)?;
            let attempts: i32 = row.try_get(1).map_err(to_backend_error)?;
            Ok(if attempts > max {
                SignInGate::Throttled {
                    until_ms: unsigned(start + WINDOW_MS),
                }
            } else {
                SignInGate::Allowed
            })
        })
    }

    fn sign_in_succeeded(&self, key: String) -> BoxFuture<Result<(), BackendError>> {
        let pool = self.pool.clone();
        let key = TokenHash::of(key.as_bytes());
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "DELETE FROM tollgate_sign_in_attempts WHERE key_hash = $1",
                    &[&key.as_bytes().as_slice()],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(())
        })
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        let (pool, now) = (self.pool.clone(), self.now());
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let invites = client
                .execute(
                    "DELETE FROM tollgate_user_invites WHERE used_ms IS NOT NULL OR expires_ms <= $1",
                    &[&now],
                )
                .await
                .map_err(to_backend_error)?;
            let attempts = client
                .execute(
                    "DELETE FROM tollgate_sign_in_attempts WHERE window_start_ms + $2 <= $1",
                    &[&now, &WINDOW_MS],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(invites + attempts)
        })
    }
}
