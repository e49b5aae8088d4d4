//! Choosing the gateway's backends from its configuration: memory by default, PostgreSQL
//! with `DATABASE_URL`, Redis for the windows with `REDIS_URL`.

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{BoxError, SharedClock};

use super::config::Config;
use super::state::Backends;

/// Connections of the request-path pool of each replica.
pub const REQUEST_POOL_SIZE: usize = 32;
/// Connections of the pool of the admin API, the log writer and the periodic jobs.
pub const ADMIN_POOL_SIZE: usize = 8;
/// `statement_timeout` of the request-path pool: below the credit meter's settle timeout
/// (5 s), so a commit blocked on a locked account row is cancelled by the server, and its
/// outcome is known, before the meter gives up on it.
pub const REQUEST_STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The backends `config` asks for.
pub async fn from_config(config: &Config, clock: SharedClock) -> Result<Backends, BoxError> {
    let mut backends = match &config.database_url {
        None => super::memory_backends_with(clock.clone(), config.hold_ttl),
        Some(url) => {
            let key = config
                .session_key
                .ok_or("TOLLGATE_SESSION_KEY is required with DATABASE_URL")?;
            postgres(url, key, config, clock.clone()).await?
        }
    };
    if let Some(url) = &config.redis_url {
        backends.windows = redis(url, config, clock.clone()).await?;
        if config.database_url.is_none() {
            // Idempotency keys go to PostgreSQL when there is one, else to Redis.
            backends.idempotency = redis_idempotency(url)?;
            backends
                .upkeep
                .push(super::purge_idempotency_keys(backends.idempotency.clone()));
        }
    }
    Ok(backends)
}

#[cfg(feature = "postgres")]
async fn postgres(
    url: &str,
    session_key: [u8; 32],
    config: &Config,
    clock: SharedClock,
) -> Result<Backends, BoxError> {
    let hold_ttl = config.hold_ttl;
    use tollgate_api_key_auth::PostgresKeyStore;
    use tollgate_credit_meter::PostgresLedger;
    use tollgate_postgres::{pg_config, PoolOptions};
    use tollgate_request_logger::PostgresLogSink;
    use tollgate_upstream_sign::PostgresSessionStore;

    use super::postgres_orgs::PostgresOrgStore;

    // Two pools per replica: the request path (key lookups, sessions, holds and commits)
    // with a short statement timeout, so a statement stuck behind a locked row fails and is
    // rolled back well within the credit meter's settle timeout instead of holding a
    // connection; and everything else (admin API, log writes, renewals, the sweeper), so
    // neither can starve the other. Each store runs its own migrations (under an advisory
    // lock, so replicas starting together are safe).
    let request = PoolOptions::default()
        .with_max_size(config.database_pool_size)
        .with_statement_timeout(REQUEST_STATEMENT_TIMEOUT);
    let pool = tollgate_postgres::connect_with(url, &request)?;
    let admin = PoolOptions::default().with_max_size(ADMIN_POOL_SIZE);
    let admin_pool = tollgate_postgres::connect_with(url, &admin)?;
    let listen = pg_config(url, &admin)?;

    let keys = PostgresKeyStore::builder(pool.clone())
        .with_clock(clock.clone())
        .with_listener(listen.clone())
        .build()
        .await?;
    let sessions = PostgresSessionStore::builder(pool.clone(), session_key)
        .with_listener(listen)
        .build()
        .await?;
    PostgresLedger::migrate(&admin_pool).await?;
    let ledger = PostgresLedger::new(pool.clone(), clock.clone())
        .with_admin_pool(admin_pool.clone())
        .with_hold_ttl(hold_ttl);
    PostgresLogSink::migrate(&admin_pool).await?;
    let logs = PostgresLogSink::new(admin_pool.clone(), clock.clone());
    // Dashboard users and sessions (a few lookups per page view) and the usage rollups (written
    // by the log worker) are not on the API's request path.
    let accounts = super::accounts::Accounts::postgres(admin_pool.clone(), clock.clone()).await?;
    let orgs = PostgresOrgStore::new(admin_pool.clone()).await?;
    // Webhooks: off the request path (the outbox is written by spawned tasks and the log
    // worker); endpoint secrets sealed with the session key.
    let webhooks =
        super::webhooks::PostgresWebhookStore::new(admin_pool.clone(), session_key).await?;
    let billing = super::billing::PostgresBillingRequests::new(admin_pool.clone()).await?;
    tollgate_idempotency::PostgresIdempotencyStore::migrate(&admin_pool).await?;
    let idempotency: Arc<dyn tollgate_idempotency::IdempotencyStore> = Arc::new(
        tollgate_idempotency::PostgresIdempotencyStore::new(pool.clone(), clock.clone()),
    );

    let windows = Arc::new(tollgate_sliding_window::MemoryWindowStore::new(clock));
    let sweep = Arc::clone(&windows);
    let flush_keys = keys.clone();
    Ok(Backends {
        keys: Arc::new(keys),
        ledger: Arc::new(ledger),
        windows,
        sessions: Arc::new(sessions),
        logs: Arc::new(logs),
        orgs: Arc::new(orgs),
        accounts,
        webhooks: Arc::new(webhooks),
        billing: Arc::new(billing),
        upkeep: vec![
            Arc::new(move || {
                sweep.sweep_now();
                let keys = flush_keys.clone();
                Box::pin(async move {
                    if let Err(e) = keys.flush_last_used().await {
                        tracing::warn!(error = %e, "writing last-used times failed");
                    }
                })
            }),
            super::purge_idempotency_keys(idempotency.clone()),
        ],
        idempotency,
    })
}

#[cfg(not(feature = "postgres"))]
async fn postgres(_: &str, _: [u8; 32], _: &Config, _: SharedClock) -> Result<Backends, BoxError> {
    Err("DATABASE_URL is set, but this build has no PostgreSQL support (feature `postgres`)".into())
}

#[cfg(feature = "redis")]
async fn redis(
    url: &str,
    config: &Config,
    clock: SharedClock,
) -> Result<Arc<dyn tollgate_sliding_window::WindowStore>, BoxError> {
    use tollgate_sliding_window::{FailoverWindowStore, FailureMode, RedisWindowStore};

    let mode = match config.rate_limit_failure {
        super::config::RateLimitFailure::Open => FailureMode::Open,
        super::config::RateLimitFailure::Closed => FailureMode::Closed,
    };
    // Start even while Redis is down: the failover store decides locally (or answers 503)
    // until it is back.
    // The failover bounds each call itself (one DEFAULT_FAILOVER_TIMEOUT while Redis answers nobody,
    // up to MAX_QUEUED_WAIT while it answers others), so the store's own bound must not cut
    // a queued call short first.
    let redis = RedisWindowStore::open(url)?
        .with_timeout(tollgate_sliding_window::MAX_QUEUED_WAIT + Duration::from_millis(100));
    if let Err(e) = redis.warm_up().await {
        tracing::warn!(error = %e, mode = ?mode, "Redis is not reachable at start; rate limits fail {}", match mode { FailureMode::Open => "open to the local limiter", FailureMode::Closed => "closed (503)" });
    }
    // While Redis is down and the mode is open, this replica decides alone.
    let local = tollgate_sliding_window::MemoryWindowStore::new(clock);
    Ok(Arc::new(
        FailoverWindowStore::new(redis, mode).with_local(local),
    ))
}

#[cfg(feature = "redis")]
fn redis_idempotency(
    url: &str,
) -> Result<Arc<dyn tollgate_idempotency::IdempotencyStore>, BoxError> {
    // Connects on first use: a Redis that is down answers 503 to keyed requests only.
    Ok(Arc::new(tollgate_idempotency::RedisIdempotencyStore::open(
        url,
    )?))
}

#[cfg(not(feature = "redis"))]
fn redis_idempotency(_: &str) -> Result<Arc<dyn tollgate_idempotency::IdempotencyStore>, BoxError> {
    Err("REDIS_URL is set, but this build has no Redis support (feature `redis`)".into())
}

#[cfg(not(feature = "redis"))]
async fn redis(
    _: &str,
    _: &Config,
    _: SharedClock,
) -> Result<Arc<dyn tollgate_sliding_window::WindowStore>, BoxError> {
    Err("REDIS_URL is set, but this build has no Redis support (feature `redis`)".into())
}
