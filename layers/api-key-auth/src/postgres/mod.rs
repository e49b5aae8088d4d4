//! [`PostgresKeyStore`]: keys, subscriptions and model ownership in PostgreSQL, shared by any
//! number of gateway replicas (cargo feature `postgres`).
//!
//! # Tables
//!
//! `tollgate_api_keys` (id, org, name, display prefix, SHA-256 `key_hash` bytea UNIQUE,
//! status, created/last-used/revoked times), `tollgate_org_plans` (org → plan or NULL) and
//! `tollgate_model_owners` (model → org), created by the migrations in `migrations/`
//! (history table `tollgate_api_key_auth_migrations`). Secrets are never stored.
//!
//! # The cache, and why revocations are seen within a second
//!
//! Lookups are answered from an in-process cache (hash → key and org, org → plan,
//! model → owner), so most requests do not touch the database. Every change (revoke,
//! rotate, subscription change, model added) is written together with a `NOTIFY
//! tollgate_keys` naming what changed, in the same transaction; every replica `LISTEN`s on a
//! dedicated connection and evicts the entry ([`Listener`]). Entries also expire after a TTL
//! (30 s by default) as a backstop.
//!
//! The cache is only used while the listener is *live*: its connection answered a heartbeat
//! started less than a second ago (PostgreSQL delivers pending notifications before the
//! answer). When the listening connection is lost the store **fails closed**: nothing is
//! served from the cache, every lookup goes to the database (and gets 503
//! `SERVICE_UNAVAILABLE` if the database is down), and the whole cache is dropped when the
//! listener reconnects, because notifications may have been missed. So a revoked key is
//! refused by every replica within about one second, whatever fails.
//!
//! # Unknown keys
//!
//! The caches above hold only what exists (active keys, plans, owned models). Key hashes
//! with no active key, and model ids nobody owns, go to a separate negative cache per kind:
//! bounded by [`with_negative_capacity`](PostgresKeyStoreBuilder::with_negative_capacity)
//! (10,000 by default, oldest dropped first), each entry kept 2 s
//! ([`with_negative_ttl`](PostgresKeyStoreBuilder::with_negative_ttl)). So a spray of random
//! well-formed keys can never evict a valid key or empty the key cache, and takes a bounded
//! amount of memory.
//!
//! What a spray costs the database: each *distinct* unknown key is looked up once (a key
//! repeated within 2 s costs nothing), and lookups that miss the cache at the same moment
//! share one statement (`WHERE key_hash = ANY(…)`, up to 256 keys): nothing waits to fill a
//! batch, a lone lookup goes at once, and batches grow only while the database is busy. So
//! the spray takes one connection at a time, however wide it is, and the rest of the pool
//! stays free for everything else.
//!
//! A negative entry only ever refuses, so it is used even while the listener is down. It
//! cannot delay a new key: a key's hash cannot have been asked for before the key existed,
//! and creating a key drops any local entry for its hash. [`PostgresKeyStore::cache_stats`]
//! shows the cache sizes, how many key lookups reached the database and in how many
//! statements.
//!
//! # Last used
//!
//! [`record_use`](KeyStore::record_use) only updates an in-memory buffer; a background task
//! writes the buffer every second in one statement (`UPDATE … FROM unnest(…)`), never moving
//! a time backwards. [`list_keys`](KeyStore::list_keys) and [`key_info`](KeyStore::key_info)
//! include the times still in the buffer. [`PostgresKeyStore::flush_last_used`] writes it at
//! once (graceful shutdown); dropping the last handle flushes it in the background too.

mod admin;
mod batch;
mod cache;
mod last_used;
mod lookup;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tollgate_core::{
    BackendError, BoxFuture, KeyId, ModelId, OrgId, Plan, SharedClock, SystemClock,
};
use tollgate_postgres::deadpool_postgres::Pool;
use tollgate_postgres::{
    pg_config, run_migrations, to_backend_error, Listener, ListenerOptions, NotificationHandler,
    PoolOptions,
};

use self::batch::KeyLookups;
use self::cache::{Change, KeyCache};
use self::last_used::{flush_last_used, write_last_used, LastUsed};
use crate::key::KeyHash;
use crate::store::{KeyGrant, KeyInfo, KeyLimits, KeySpec, KeyStatus, KeyStore, NewKey, Scopes};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The notification channel of key, subscription and model-ownership changes.
pub const KEYS_CHANNEL: &str = "tollgate_keys";

/// The name of this crate's migration set (history table `tollgate_api_key_auth_migrations`).
pub const MIGRATION_SET: &str = "api_key_auth";

const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(2);
const DEFAULT_NEGATIVE_CAPACITY: u64 = 10_000;
const DEFAULT_LAST_USED_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_CACHE_CAPACITY: usize = 100_000;

/// A [`KeyStore`] in PostgreSQL with an in-process cache kept exact by `LISTEN`/`NOTIFY`
/// (see the [module docs](self)).
///
/// Cloning is cheap and shares the pool, cache and background tasks, which stop when the
/// last clone is dropped.
///
/// ```no_run
/// # async fn start() -> Result<(), tollgate_core::BackendError> {
/// use tollgate_api_key_auth::{ApiKeyAuthLayer, PostgresKeyStore};
///
/// let store = PostgresKeyStore::connect("postgres://tollgate@127.0.0.1:5432/tollgate").await?;
/// let layer = ApiKeyAuthLayer::new(store.clone());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresKeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    clock: SharedClock,
    cache: Arc<KeyCache>,
    listener: Option<Listener>,
    last_used: Arc<LastUsed>,
    shutdown: Arc<Notify>,
    /// Cache misses of key lookups, batched to the database.
    key_lookups: KeyLookups,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer task flushes what is buffered, then ends.
        self.shutdown.notify_one();
    }
}

/// Options of a [`PostgresKeyStore`]; from [`PostgresKeyStore::builder`].
pub struct PostgresKeyStoreBuilder {
    pool: Pool,
    listen: Option<tokio_postgres::Config>,
    listener_options: ListenerOptions,
    clock: SharedClock,
    cache_ttl: Duration,
    negative_ttl: Duration,
    negative_capacity: u64,
    cache_capacity: usize,
    last_used_interval: Duration,
    migrate: bool,
}

impl fmt::Debug for PostgresKeyStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresKeyStoreBuilder")
            .field("listener", &self.listen.is_some())
            .field("cache_ttl", &self.cache_ttl)
            .field("last_used_interval", &self.last_used_interval)
            .field("migrate", &self.migrate)
            .finish_non_exhaustive()
    }
}

impl PostgresKeyStoreBuilder {
    /// Listens for changes on a dedicated connection with this configuration, which turns
    /// the cache on. Without a listener every lookup reads the database.
    pub fn with_listener(mut self, config: tokio_postgres::Config) -> Self {
        self.listen = Some(config);
        self
    }

    /// Heartbeat and trust timing of the listener.
    pub fn with_listener_options(mut self, options: ListenerOptions) -> Self {
        self.listener_options = options;
        self
    }

    /// The clock stamping key creation and revocation times (default: the system clock).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// How long a cached key, plan or owner is trusted without a notification (default 30 s).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// How long an unknown key hash or model is remembered as unknown (default 2 s).
    pub fn with_negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// The most unknown key hashes (and, separately, unknown model ids) remembered
    /// (default 10,000). This bound is apart from [`with_cache_capacity`](Self::with_cache_capacity):
    /// unknown keys never take the place of known ones.
    pub fn with_negative_capacity(mut self, capacity: u64) -> Self {
        self.negative_capacity = capacity;
        self
    }

    /// The most keys, plans and model owners each cached (default 100,000).
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// How often buffered last-used times are written (default 1 s).
    pub fn with_last_used_interval(mut self, interval: Duration) -> Self {
        self.last_used_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Whether `build` applies the migrations (default true; turn off when a separate job
    /// migrates).
    pub fn with_migrations(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Applies the migrations, starts the listener (waiting up to 2 s for it) and the
    /// last-used writer. Must run within a tokio runtime.
    pub async fn build(self) -> Result<PostgresKeyStore, BackendError> {
        if self.migrate {
            run_migrations(&self.pool, MIGRATION_SET, embedded::migrations::runner()).await?;
        }
        let cache = Arc::new(KeyCache::new(
            self.cache_capacity,
            self.cache_ttl,
            (self.negative_capacity, self.negative_ttl),
        ));
        let listener = match self.listen {
            Some(config) => {
                let handler: Arc<dyn NotificationHandler> = cache.clone();
                Some(
                    Listener::start(
                        config,
                        KEYS_CHANNEL,
                        handler,
                        self.listener_options,
                        "key store",
                    )
                    .await?,
                )
            }
            None => None,
        };
        let last_used = Arc::new(LastUsed::default());
        let shutdown = Arc::new(Notify::new());
        tokio::spawn(write_last_used(
            self.pool.clone(),
            Arc::clone(&last_used),
            self.last_used_interval,
            Arc::clone(&shutdown),
        ));
        let key_lookups = KeyLookups::start(self.pool.clone());
        Ok(PostgresKeyStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                clock: self.clock,
                cache,
                listener,
                last_used,
                shutdown,
                key_lookups,
            }),
        })
    }
}

impl PostgresKeyStore {
    /// Connects to `url` (a pool with [`PoolOptions::default`] plus a listening connection),
    /// applies the migrations and starts the cache: what a gateway calls at start.
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        Self::connect_with(url, &PoolOptions::default()).await
    }

    /// Like [`connect`](Self::connect), with explicit pool options (size, timeouts, schema).
    pub async fn connect_with(url: &str, options: &PoolOptions) -> Result<Self, BackendError> {
        let pool = tollgate_postgres::connect_with(url, options)?;
        let listen = pg_config(url, options)?;
        Self::builder(pool).with_listener(listen).build().await
    }

    /// A store on an existing pool (e.g. shared with other backends); add
    /// [`with_listener`](PostgresKeyStoreBuilder::with_listener) to enable the cache.
    pub fn builder(pool: Pool) -> PostgresKeyStoreBuilder {
        PostgresKeyStoreBuilder {
            pool,
            listen: None,
            listener_options: ListenerOptions::default(),
            clock: SystemClock::shared(),
            cache_ttl: DEFAULT_CACHE_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            negative_capacity: DEFAULT_NEGATIVE_CAPACITY,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            last_used_interval: DEFAULT_LAST_USED_INTERVAL,
            migrate: true,
        }
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Whether lookups may currently be answered from the cache (the listener is live).
    pub fn cache_is_live(&self) -> bool {
        self.inner.cache_live()
    }

    /// What the caches hold and how many key lookups reached the database (for metrics and
    /// tests; counting the unknown keys applies pending evictions, so keep it off the hot
    /// path).
    pub fn cache_stats(&self) -> KeyCacheStats {
        let cache = &self.inner.cache;
        let (lookup_statements, key_lookups) = self.inner.key_lookups.counts();
        KeyCacheStats {
            cached_keys: cache.keys.len(),
            unknown_keys: cache.unknown_keys.len(),
            key_lookups,
            lookup_statements,
        }
    }

    /// Writes the buffered last-used times now (e.g. at graceful shutdown).
    pub async fn flush_last_used(&self) -> Result<(), BackendError> {
        flush_last_used(&self.inner.pool, &self.inner.last_used).await
    }
}

impl fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresKeyStore")
            .field("pool", &self.inner.pool.status())
            .field("listener", &self.inner.listener)
            .field("cached_keys", &self.inner.cache.keys.len())
            .finish()
    }
}

/// A snapshot of a [`PostgresKeyStore`]'s caches, from [`PostgresKeyStore::cache_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyCacheStats {
    /// Active keys cached (expired entries included until replaced).
    pub cached_keys: usize,
    /// Key hashes remembered as having no active key (at most the negative capacity).
    pub unknown_keys: u64,
    /// Keys looked up in the database since the store was built (cache misses).
    pub key_lookups: u64,
    /// Statements those lookups took: concurrent misses share one.
    pub lookup_statements: u64,
}

async fn notify(
    tx: &tollgate_postgres::deadpool_postgres::Transaction<'_>,
    change: Change,
) -> Result<(), BackendError> {
    // Sent when the transaction commits, to every listening replica (this one included).
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&KEYS_CHANNEL, &change.payload()],
    )
    .await
    .map(drop)
    .map_err(to_backend_error)
}

fn parse_status(text: &str) -> Result<KeyStatus, BackendError> {
    match text {
        "active" => Ok(KeyStatus::Active),
        "revoked" => Ok(KeyStatus::Revoked),
        other => Err(BackendError::other(format!(
            "unexpected key status {other:?} in tollgate_api_keys"
        ))),
    }
}

/// The scopes stored in a `text[]` column.
fn parse_scopes(names: &[String]) -> Result<Scopes, BackendError> {
    Scopes::from_names(names.iter().map(String::as_str)).ok_or_else(|| {
        BackendError::other(format!(
            "unexpected key scopes {names:?} in tollgate_api_keys"
        ))
    })
}

/// Optional millisecond times, from `timestamptz` columns.
fn opt_millis(t: Option<DateTime<Utc>>) -> Option<u64> {
    t.map(millis)
}

/// What a key row says about its limits: `expires_at, revoked_at, scopes, models,
/// credit_limit` from column `first` on.
fn limits_from_row(row: &tokio_postgres::Row, first: usize) -> Result<KeyLimits, BackendError> {
    let (spec, revoked_at) = spec_from_row(row, first)?;
    let ends_at_ms = match (spec.expires_at_ms, revoked_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(KeyLimits {
        ends_at_ms,
        scopes: spec.scopes,
        models: spec.models.map(Arc::from),
        credit_limit: spec.credit_limit,
    })
}

/// The [`KeySpec`] and revocation time of a key row (columns as in [`limits_from_row`]).
fn spec_from_row(
    row: &tokio_postgres::Row,
    first: usize,
) -> Result<(KeySpec, Option<u64>), BackendError> {
    let get_err = to_backend_error;
    let expires_at: Option<DateTime<Utc>> = row.try_get(first).map_err(get_err)?;
    let revoked_at: Option<DateTime<Utc>> = row.try_get(first + 1).map_err(get_err)?;
    let scopes: Vec<String> = row.try_get(first + 2).map_err(get_err)?;
    let models: Option<Vec<uuid::Uuid>> = row.try_get(first + 3).map_err(get_err)?;
    let credit_limit: Option<i64> = row.try_get(first + 4).map_err(get_err)?;
    Ok((
        KeySpec {
            expires_at_ms: opt_millis(expires_at),
            scopes: parse_scopes(&scopes)?,
            models: models.map(|m| m.into_iter().map(ModelId::from_uuid).collect()),
            credit_limit: credit_limit.map(|c| u64::try_from(c).unwrap_or(0)),
        },
        opt_millis(revoked_at),
    ))
}

fn parse_plan(text: Option<&str>) -> Result<Option<Plan>, BackendError> {
    text.map(|t| t.parse::<Plan>().map_err(BackendError::other))
        .transpose()
}

fn timestamp(ms: u64) -> DateTime<Utc> {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn millis(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp_millis()).unwrap_or(0)
}

impl KeyStore for PostgresKeyStore {
    fn lookup(&self, hash: KeyHash) -> BoxFuture<Result<Option<KeyGrant>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.lookup(hash).await })
    }

    fn owns_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.owns_model(org, model).await })
    }

    fn record_use(&self, key: KeyId, at_ms: u64) {
        self.inner.last_used.record(key, at_ms);
    }

    fn set_subscription(
        &self,
        org: OrgId,
        plan: Option<Plan>,
    ) -> BoxFuture<Result<(), BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.set_subscription(org, plan).await })
    }

    fn add_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.add_model(org, model).await })
    }

    fn create_key_with(
        &self,
        org: OrgId,
        name: String,
        spec: KeySpec,
    ) -> BoxFuture<Result<NewKey, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.create_key(org, name, spec).await })
    }

    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.revoke_key(key).await })
    }

    fn rotate_key_with_grace(
        &self,
        key: KeyId,
        grace_ms: u64,
    ) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.rotate_key(key, grace_ms).await })
    }

    fn list_keys(&self, org: OrgId) -> BoxFuture<Result<Vec<KeyInfo>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.list_keys(org).await })
    }

    fn key_info(&self, key: KeyId) -> BoxFuture<Result<Option<KeyInfo>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.key_info(key).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_to_the_millisecond() {
        for ms in [0, 1_700_000_000_123, 1_675_150_502_748] {
            assert_eq!(millis(timestamp(ms)), ms);
        }
    }
}
