//! [`PostgresIdempotencyStore`]: the keys in PostgreSQL, shared by every replica and kept
//! across restarts (feature `postgres`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::Pool;
use tollgate_core::{BackendError, BoxFuture, Clock, SharedClock};
use tollgate_postgres::to_backend_error;

use crate::store::{
    millis, Begin, Fingerprint, IdempotencyStore, Lease, LeaseToken, StoredResponse,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

const BEGIN: &str = "SELECT outcome, replay_status, replay_headers, replay_body \
     FROM tollgate_idempotency_begin($1, $2, $3, $4, $5, $6)";
const COMPLETE: &str = "UPDATE tollgate_idempotency_keys \
     SET lease = NULL, status = $4, headers = $5, body = $6, expires_ms = $7 \
     WHERE scope = $1 AND key = $2 AND lease = $3";
const RELEASE: &str =
    "DELETE FROM tollgate_idempotency_keys WHERE scope = $1 AND key = $2 AND lease = $3";
const PURGE: &str = "DELETE FROM tollgate_idempotency_keys WHERE expires_ms <= $1";

/// An [`IdempotencyStore`] in PostgreSQL: any number of gateway replicas on one database
/// share the keys, so a retry that lands on another replica replays (or waits) all the same.
///
/// One table, `tollgate_idempotency_keys` (migration set
/// [`MIGRATION_SET`](Self::MIGRATION_SET), applied by [`migrate`](Self::migrate) or
/// [`connect`](Self::connect)). Each operation is one statement: `begin` calls a function
/// that inserts the key or locks its row and decides (so two replicas racing for a key get
/// one `Started`); `complete` and `release` only touch the row while it still holds their
/// lease token. Time comes from the given [`Clock`] (the replicas' clocks: run NTP). Expired
/// rows are ignored at once and deleted by [`purge_expired`](IdempotencyStore::purge_expired),
/// which the gateway runs periodically.
///
/// ```no_run
/// use tollgate_core::SystemClock;
/// use tollgate_idempotency::{IdempotencyLayer, PostgresIdempotencyStore};
///
/// # async fn demo() -> Result<(), tollgate_core::BackendError> {
/// let store = PostgresIdempotencyStore::connect("postgres://tollgate@127.0.0.1/tollgate", SystemClock).await?;
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresIdempotencyStore {
    pool: Pool,
    clock: SharedClock,
}

impl PostgresIdempotencyStore {
    /// The name of the store's migration set: its history table is
    /// `tollgate_idempotency_migrations`.
    pub const MIGRATION_SET: &'static str = "idempotency";

    /// A store on `pool` reading time from `clock`. No I/O: the table must exist
    /// ([`migrate`](Self::migrate)).
    pub fn new(pool: Pool, clock: impl Clock) -> Self {
        PostgresIdempotencyStore {
            pool,
            clock: Arc::new(clock),
        }
    }

    /// Connects to `url` ([`tollgate_postgres::connect`]) and applies the migrations.
    pub async fn connect(url: &str, clock: impl Clock) -> Result<Self, BackendError> {
        let pool = tollgate_postgres::connect(url)?;
        Self::migrate(&pool).await?;
        Ok(Self::new(pool, clock))
    }

    /// Creates or upgrades the table (under an advisory lock: safe when replicas start at
    /// once).
    pub async fn migrate(pool: &Pool) -> Result<(), BackendError> {
        tollgate_postgres::run_migrations(pool, Self::MIGRATION_SET, embedded::migrations::runner())
            .await
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn now(&self) -> i64 {
        i64::try_from(self.clock.now_ms()).unwrap_or(i64::MAX)
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(millis(d)).unwrap_or(i64::MAX)
}

impl IdempotencyStore for PostgresIdempotencyStore {
    fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> BoxFuture<Result<Begin, BackendError>> {
        let pool = self.pool.clone();
        let now = self.now();
        let (scope, key) = (scope.to_owned(), key.to_owned());
        Box::pin(async move {
            let token = LeaseToken::generate();
            let client = pool.get().await.map_err(to_backend_error)?;
            let statement = client
                .prepare_cached(BEGIN)
                .await
                .map_err(to_backend_error)?;
            let row = client
                .query_one(
                    &statement,
                    &[
                        &scope,
                        &key,
                        &fingerprint.as_bytes().as_slice(),
                        &token.as_uuid(),
                        &now,
                        &ms(lease_ttl),
                    ],
                )
                .await
                .map_err(to_backend_error)?;
            let outcome: &str = row.get(0);
            Ok(match outcome {
                "started" => Begin::Started(Lease::new(&scope, &key, token)),
                "in_flight" => Begin::InFlight,
                "mismatch" => Begin::Mismatch,
                "replay" => {
                    let status: i16 = row.get(1);
                    let headers: &str = row.get(2);
                    let body: Vec<u8> = row.get(3);
                    let status = u16::try_from(status).unwrap_or(0);
                    Begin::Replay(StoredResponse::from_stored(
                        status,
                        headers,
                        Bytes::from(body),
                    )?)
                }
                other => {
                    return Err(BackendError::other(format!(
                        "unexpected idempotency outcome {other:?}"
                    )))
                }
            })
        })
    }

    fn complete(
        &self,
        lease: &Lease,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let pool = self.pool.clone();
        let expires = self.now().saturating_add(ms(ttl));
        let lease = lease.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let statement = client
                .prepare_cached(COMPLETE)
                .await
                .map_err(to_backend_error)?;
            let status = i16::try_from(response.status.as_u16()).unwrap_or(500);
            let n = client
                .execute(
                    &statement,
                    &[
                        &lease.scope(),
                        &lease.key(),
                        &lease.token().as_uuid(),
                        &status,
                        &response.headers_json(),
                        &response.body.as_ref(),
                        &expires,
                    ],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(n == 1)
        })
    }

    fn release(&self, lease: &Lease) -> BoxFuture<Result<bool, BackendError>> {
        let pool = self.pool.clone();
        let lease = lease.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let statement = client
                .prepare_cached(RELEASE)
                .await
                .map_err(to_backend_error)?;
            let n = client
                .execute(
                    &statement,
                    &[&lease.scope(), &lease.key(), &lease.token().as_uuid()],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(n == 1)
        })
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        let pool = self.pool.clone();
        let now = self.now();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(PURGE, &[&now])
                .await
                .map_err(to_backend_error)
        })
    }
}

impl fmt::Debug for PostgresIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresIdempotencyStore")
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}
