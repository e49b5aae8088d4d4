//! Choosing the gateway's backends from its configuration: memory by default, PostgreSQL
//! with `DATABASE_URL`, Redis for the windows with `REDIS_URL`.

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{BoxError, SharedClock};

use super::config::Config;
use super::state::Backends;

/// The backends `config` asks for.
pub async fn from_config(config: &Config, clock: SharedClock) -> Result<Backends, BoxError> {
    let mut backends = match &config.database_url {
        None => super::memory_backends_with(clock.clone(), config.hold_ttl),
        Some(url) => {
            let key = config
                .session_key
                .ok_or("TOLLGATE_SESSION_KEY is required with DATABASE_URL")?;
            postgres(url, key, config.hold_ttl, clock.clone()).await?
        }
    };
    if let Some(url) = &config.redis_url {
        backends.windows = redis(url, config, clock).await?;
    }
    Ok(backends)
}

#[cfg(feature = "postgres")]
async fn postgres(
    url: &str,
    session_key: [u8; 32],
    hold_ttl: std::time::Duration,
    clock: SharedClock,
) -> Result<Backends, BoxError> {
    use tollgate_api_key_auth::PostgresKeyStore;
    use tollgate_credit_meter::PostgresLedger;
    use tollgate_postgres::{pg_config, PoolOptions};
    use tollgate_request_logger::PostgresLogSink;
    use tollgate_upstream_sign::PostgresSessionStore;

    use super::postgres_orgs::PostgresOrgStore;

    // One pool for every store of this replica; each store runs its own migrations (under an
    // advisory lock, so replicas starting together are safe).
    let options = PoolOptions::default().with_max_size(32);
    let pool = tollgate_postgres::connect_with(url, &options)?;
    let listen = pg_config(url, &options)?;

    let keys = PostgresKeyStore::builder(pool.clone())
        .with_clock(clock.clone())
        .with_listener(listen.clone())
        .build()
        .await?;
    let sessions = PostgresSessionStore::builder(pool.clone(), session_key)
        .with_listener(listen)
        .build()
        .await?;
    PostgresLedger::migrate(&pool).await?;
    let ledger = PostgresLedger::new(pool.clone(), clock.clone()).with_hold_ttl(hold_ttl);
    PostgresLogSink::migrate(&pool).await?;
    let logs = PostgresLogSink::new(pool.clone(), clock.clone());
    let accounts = super::accounts::Accounts::postgres(pool.clone(), clock.clone()).await?;
    let orgs = PostgresOrgStore::new(pool).await?;

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
        upkeep: vec![Arc::new(move || {
            sweep.sweep_now();
            let keys = flush_keys.clone();
            Box::pin(async move {
                if let Err(e) = keys.flush_last_used().await {
                    tracing::warn!(error = %e, "writing last-used times failed");
                }
            })
        })],
    })
}

#[cfg(not(feature = "postgres"))]
async fn postgres(
    _: &str,
    _: [u8; 32],
    _: std::time::Duration,
    _: SharedClock,
) -> Result<Backends, BoxError> {
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
    // The failover bounds each call itself (one 250 ms timeout while Redis answers nobody,
    // up to MAX_QUEUED_WAIT while it answers others), so the store's own bound must not cut
    // a queued call short first.
    let redis = RedisWindowStore::open(url)?
        .with_timeout(tollgate_sliding_window::MAX_QUEUED_WAIT + Duration::from_millis(100));
    if let Err(e) = redis.ping().await {
        tracing::warn!(error = %e, mode = ?mode, "Redis is not reachable at start; rate limits fail {}", match mode { FailureMode::Open => "open to the local limiter", FailureMode::Closed => "closed (503)" });
    }
    // While Redis is down and the mode is open, this replica decides alone.
    let local = tollgate_sliding_window::MemoryWindowStore::new(clock);
    Ok(Arc::new(
        FailoverWindowStore::new(redis, mode).with_local(local),
    ))
}

#[cfg(not(feature = "redis"))]
async fn redis(
    _: &str,
    _: &Config,
    _: SharedClock,
) -> Result<Arc<dyn tollgate_sliding_window::WindowStore>, BoxError> {
    Err("REDIS_URL is set, but this build has no Redis support (feature `redis`)".into())
}
