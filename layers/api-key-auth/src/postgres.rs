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
//! Unknown hashes are cached for 2 s only (a key's hash cannot have been looked up before
//! the key existed, so this never delays a new key; it only bounds the cost of repeated
//! bogus keys).
//!
//! # Last used
//!
//! [`record_use`](KeyStore::record_use) only updates an in-memory buffer; a background task
//! writes the buffer every second in one statement (`UPDATE … FROM unnest(…)`), never moving
//! a time backwards. [`list_keys`](KeyStore::list_keys) and [`key_info`](KeyStore::key_info)
//! include the times still in the buffer. [`PostgresKeyStore::flush_last_used`] writes it at
//! once (graceful shutdown); dropping the last handle flushes it in the background too.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use tollgate_core::{
    BackendError, BoxFuture, KeyId, ModelId, OrgId, Plan, SharedClock, SystemClock,
};
use tollgate_postgres::deadpool_postgres::{Object, Pool};
use tollgate_postgres::{
    pg_config, run_migrations, to_backend_error, InvalidatingCache, Listener, ListenerOptions,
    NotificationHandler, PoolOptions,
};
use uuid::Uuid;

use crate::key::{generate_key, KeyHash};
use crate::store::{KeyGrant, KeyInfo, KeyStatus, KeyStore, NewKey};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The notification channel of key, subscription and model-ownership changes.
pub const KEYS_CHANNEL: &str = "tollgate_keys";

/// The name of this crate's migration set (history table `tollgate_api_key_auth_migrations`).
pub const MIGRATION_SET: &str = "api_key_auth";

const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(2);
const DEFAULT_LAST_USED_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_CACHE_CAPACITY: usize = 100_000;
/// Keys per last-used statement.
const LAST_USED_CHUNK: usize = 5_000;

const LOOKUP_SQL: &str = "SELECT k.id, k.org_id, k.key_hash, k.status, p.plan \
     FROM tollgate_api_keys k LEFT JOIN tollgate_org_plans p ON p.org_id = k.org_id \
     WHERE k.key_hash = $1";
const PLAN_SQL: &str = "SELECT plan FROM tollgate_org_plans WHERE org_id = $1";
const OWNER_SQL: &str = "SELECT org_id FROM tollgate_model_owners WHERE model_id = $1";
const KEY_COLUMNS: &str = "id, org_id, name, prefix, status, created_at, last_used_at";
const LAST_USED_SQL: &str = "UPDATE tollgate_api_keys AS k \
     SET last_used_at = GREATEST(k.last_used_at, u.used_at) \
     FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, used_at) \
     WHERE k.id = u.id";

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

    /// The most entries each cache map holds (default 100,000).
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
        let cache = Arc::new(KeyCache {
            keys: InvalidatingCache::new(self.cache_capacity),
            plans: InvalidatingCache::new(self.cache_capacity),
            owners: InvalidatingCache::new(self.cache_capacity),
            ttl: self.cache_ttl,
            negative_ttl: self.negative_ttl,
        });
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
        Ok(PostgresKeyStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                clock: self.clock,
                cache,
                listener,
                last_used,
                shutdown,
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

// ---------------------------------------------------------------------------------------
// The cache.

/// A key as cached: `None` for a hash with no active key.
type CachedKey = Option<(KeyId, OrgId)>;

struct KeyCache {
    keys: InvalidatingCache<KeyHash, CachedKey>,
    plans: InvalidatingCache<OrgId, Option<Plan>>,
    owners: InvalidatingCache<ModelId, Option<OrgId>>,
    ttl: Duration,
    negative_ttl: Duration,
}

/// What a notification on [`KEYS_CHANNEL`] says changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Key(KeyId),
    Org(OrgId),
    Model(ModelId),
}

impl Change {
    fn payload(self) -> String {
        match self {
            Change::Key(id) => format!("key:{id}"),
            Change::Org(id) => format!("org:{id}"),
            Change::Model(id) => format!("model:{id}"),
        }
    }

    fn parse(payload: &str) -> Option<Change> {
        let (kind, id) = payload.split_once(':')?;
        match kind {
            "key" => id.parse().ok().map(Change::Key),
            "org" => id.parse().ok().map(Change::Org),
            "model" => id.parse().ok().map(Change::Model),
            _ => None,
        }
    }
}

impl KeyCache {
    fn apply(&self, change: Change) {
        match change {
            Change::Key(id) => self
                .keys
                .invalidate_where(|_, cached| cached.is_some_and(|(key, _)| key == id)),
            Change::Org(org) => self.plans.invalidate(&org),
            Change::Model(model) => self.owners.invalidate(&model),
        }
    }
}

impl NotificationHandler for KeyCache {
    fn notification(&self, payload: &str) {
        match Change::parse(payload) {
            Some(change) => self.apply(change),
            // From a newer version, or garbage: be safe.
            None => self.reset(),
        }
    }

    fn reset(&self) {
        self.keys.clear();
        self.plans.clear();
        self.owners.clear();
    }
}

impl Inner {
    fn cache_live(&self) -> bool {
        self.listener.as_ref().is_some_and(Listener::is_live)
    }

    async fn client(&self) -> Result<Object, BackendError> {
        self.pool.get().await.map_err(to_backend_error)
    }

    async fn lookup(&self, hash: KeyHash) -> Result<Option<KeyGrant>, BackendError> {
        let cache = &self.cache;
        let live = self.cache_live();
        if live {
            match cache.keys.get(&hash) {
                Some(None) => return Ok(None),
                Some(Some((key, org))) => {
                    let plan = match cache.plans.get(&org) {
                        Some(plan) => plan,
                        None => self.fetch_plan(org).await?,
                    };
                    return Ok(Some(KeyGrant { key, org, plan }));
                }
                None => {}
            }
        }
        let (key_epoch, plan_epoch) = (cache.keys.epoch(), cache.plans.epoch());
        let client = self.client().await?;
        let statement = client
            .prepare_cached(LOOKUP_SQL)
            .await
            .map_err(to_backend_error)?;
        let row = client
            .query_opt(&statement, &[&hash.as_bytes().as_slice()])
            .await
            .map_err(to_backend_error)?;
        drop(client);
        let Some(row) = row else {
            if live {
                cache
                    .keys
                    .insert_if_current(hash, None, key_epoch, cache.negative_ttl);
            }
            return Ok(None);
        };
        let stored: &[u8] = row.try_get(2).map_err(to_backend_error)?;
        // The index found the row; the decision is a constant-time comparison.
        if !bool::from(stored.ct_eq(hash.as_bytes().as_slice())) {
            return Ok(None);
        }
        let key = KeyId::from_uuid(row.try_get(0).map_err(to_backend_error)?);
        let org = OrgId::from_uuid(row.try_get(1).map_err(to_backend_error)?);
        let status = parse_status(row.try_get(3).map_err(to_backend_error)?)?;
        let plan = parse_plan(row.try_get(4).map_err(to_backend_error)?)?;
        let active = status == KeyStatus::Active;
        if live {
            let cached = active.then_some((key, org));
            cache
                .keys
                .insert_if_current(hash, cached, key_epoch, cache.ttl);
            cache
                .plans
                .insert_if_current(org, plan, plan_epoch, cache.ttl);
        }
        Ok(active.then_some(KeyGrant { key, org, plan }))
    }

    async fn fetch_plan(&self, org: OrgId) -> Result<Option<Plan>, BackendError> {
        let epoch = self.cache.plans.epoch();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(PLAN_SQL)
            .await
            .map_err(to_backend_error)?;
        let row = client
            .query_opt(&statement, &[org.as_uuid()])
            .await
            .map_err(to_backend_error)?;
        let plan = match row {
            Some(row) => parse_plan(row.try_get(0).map_err(to_backend_error)?)?,
            None => None,
        };
        if self.cache_live() {
            self.cache
                .plans
                .insert_if_current(org, plan, epoch, self.cache.ttl);
        }
        Ok(plan)
    }

    async fn owns_model(&self, org: OrgId, model: ModelId) -> Result<bool, BackendError> {
        let live = self.cache_live();
        if live {
            if let Some(owner) = self.cache.owners.get(&model) {
                return Ok(owner == Some(org));
            }
        }
        let epoch = self.cache.owners.epoch();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(OWNER_SQL)
            .await
            .map_err(to_backend_error)?;
        let row = client
            .query_opt(&statement, &[model.as_uuid()])
            .await
            .map_err(to_backend_error)?;
        let owner = match row {
            Some(row) => Some(OrgId::from_uuid(row.try_get(0).map_err(to_backend_error)?)),
            None => None,
        };
        if live {
            let ttl = if owner.is_some() {
                self.cache.ttl
            } else {
                self.cache.negative_ttl
            };
            self.cache
                .owners
                .insert_if_current(model, owner, epoch, ttl);
        }
        Ok(owner == Some(org))
    }

    async fn set_subscription(&self, org: OrgId, plan: Option<Plan>) -> Result<(), BackendError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        tx.execute(
            "INSERT INTO tollgate_org_plans (org_id, plan) VALUES ($1, $2) \
             ON CONFLICT (org_id) DO UPDATE SET plan = EXCLUDED.plan, updated_at = now()",
            &[org.as_uuid(), &plan.map(Plan::name)],
        )
        .await
        .map_err(to_backend_error)?;
        notify(&tx, Change::Org(org)).await?;
        tx.commit().await.map_err(to_backend_error)?;
        self.cache.apply(Change::Org(org));
        Ok(())
    }

    async fn add_model(&self, org: OrgId, model: ModelId) -> Result<bool, BackendError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        let inserted = tx
            .execute(
                "INSERT INTO tollgate_model_owners (model_id, org_id) VALUES ($1, $2) \
                 ON CONFLICT (model_id) DO NOTHING",
                &[model.as_uuid(), org.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
        if inserted == 1 {
            notify(&tx, Change::Model(model)).await?;
            tx.commit().await.map_err(to_backend_error)?;
            self.cache.apply(Change::Model(model));
            return Ok(true);
        }
        // Already owned. A statement after ON CONFLICT sees the committed owner even when
        // another transaction inserted it concurrently (READ COMMITTED: a new snapshot).
        let row = tx
            .query_opt(OWNER_SQL, &[model.as_uuid()])
            .await
            .map_err(to_backend_error)?;
        tx.commit().await.map_err(to_backend_error)?;
        match row {
            Some(row) => {
                let owner = OrgId::from_uuid(row.try_get(0).map_err(to_backend_error)?);
                Ok(owner == org)
            }
            None => Err(BackendError::other(
                "model ownership changed during add_model",
            )),
        }
    }

    async fn create_key(&self, org: OrgId, name: String) -> Result<NewKey, BackendError> {
        let client = self.client().await?;
        for _ in 0..2 {
            let key = generate_key()?;
            let id = KeyId::new();
            let now = timestamp(self.clock.now_ms());
            let result = client
                .execute(
                    "INSERT INTO tollgate_api_keys \
                     (id, org_id, name, prefix, key_hash, status, created_at) \
                     VALUES ($1, $2, $3, $4, $5, 'active', $6)",
                    &[
                        id.as_uuid(),
                        org.as_uuid(),
                        &name,
                        &key.prefix,
                        &key.hash.as_bytes().as_slice(),
                        &now,
                    ],
                )
                .await;
            match result {
                Ok(_) => {
                    // Nobody can have looked the hash up before, but a local negative entry
                    // costs nothing to drop.
                    self.cache.keys.invalidate(&key.hash);
                    return Ok(NewKey {
                        id,
                        secret: key.secret,
                        prefix: key.prefix,
                    });
                }
                Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => continue,
                Err(err) => return Err(to_backend_error(err)),
            }
        }
        Err(BackendError::other(
            "a newly generated key collided with an existing one twice",
        ))
    }

    async fn revoke_key(&self, key: KeyId) -> Result<bool, BackendError> {
        let now = timestamp(self.clock.now_ms());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        let found = tx
            .execute(
                "UPDATE tollgate_api_keys \
                 SET status = 'revoked', revoked_at = coalesce(revoked_at, $2) \
                 WHERE id = $1",
                &[key.as_uuid(), &now],
            )
            .await
            .map_err(to_backend_error)?;
        if found == 0 {
            return Ok(false);
        }
        notify(&tx, Change::Key(key)).await?;
        tx.commit().await.map_err(to_backend_error)?;
        self.cache.apply(Change::Key(key));
        Ok(true)
    }

    async fn rotate_key(&self, old: KeyId) -> Result<Option<NewKey>, BackendError> {
        let key = generate_key()?;
        let id = KeyId::new();
        let now = timestamp(self.clock.now_ms());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        let Some(row) = tx
            .query_opt(
                "SELECT org_id, name FROM tollgate_api_keys WHERE id = $1 FOR UPDATE",
                &[old.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?
        else {
            return Ok(None);
        };
        let org: Uuid = row.try_get(0).map_err(to_backend_error)?;
        let name: String = row.try_get(1).map_err(to_backend_error)?;
        tx.execute(
            "INSERT INTO tollgate_api_keys \
             (id, org_id, name, prefix, key_hash, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'active', $6)",
            &[
                id.as_uuid(),
                &org,
                &name,
                &key.prefix,
                &key.hash.as_bytes().as_slice(),
                &now,
            ],
        )
        .await
        .map_err(to_backend_error)?;
        tx.execute(
            "UPDATE tollgate_api_keys \
             SET status = 'revoked', revoked_at = coalesce(revoked_at, $2) WHERE id = $1",
            &[old.as_uuid(), &now],
        )
        .await
        .map_err(to_backend_error)?;
        notify(&tx, Change::Key(old)).await?;
        tx.commit().await.map_err(to_backend_error)?;
        self.cache.apply(Change::Key(old));
        self.cache.keys.invalidate(&key.hash);
        Ok(Some(NewKey {
            id,
            secret: key.secret,
            prefix: key.prefix,
        }))
    }

    async fn list_keys(&self, org: OrgId) -> Result<Vec<KeyInfo>, BackendError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM tollgate_api_keys WHERE org_id = $1 ORDER BY seq"
                ),
                &[org.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
        rows.iter().map(|row| self.key_info_from(row)).collect()
    }

    async fn key_info(&self, key: KeyId) -> Result<Option<KeyInfo>, BackendError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM tollgate_api_keys WHERE id = $1"),
                &[key.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
        row.map(|row| self.key_info_from(&row)).transpose()
    }

    fn key_info_from(&self, row: &Row) -> Result<KeyInfo, BackendError> {
        let id = KeyId::from_uuid(row.try_get(0).map_err(to_backend_error)?);
        let created: DateTime<Utc> = row.try_get(5).map_err(to_backend_error)?;
        let used: Option<DateTime<Utc>> = row.try_get(6).map_err(to_backend_error)?;
        // Times still in the buffer are newer than the table's.
        let last_used = match (used.map(millis), self.last_used.pending(id)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(KeyInfo {
            id,
            org: OrgId::from_uuid(row.try_get(1).map_err(to_backend_error)?),
            name: row.try_get(2).map_err(to_backend_error)?,
            prefix: row.try_get(3).map_err(to_backend_error)?,
            status: parse_status(row.try_get(4).map_err(to_backend_error)?)?,
            created_at_ms: millis(created),
            last_used_at_ms: last_used,
        })
    }
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

// ---------------------------------------------------------------------------------------
// Last used, buffered.

const LAST_USED_SHARDS: usize = 16;

/// The latest use of each key not yet written, sharded so concurrent requests rarely
/// contend on one lock.
#[derive(Default)]
struct LastUsed {
    shards: [Mutex<HashMap<KeyId, u64>>; LAST_USED_SHARDS],
}

impl LastUsed {
    fn shard(&self, key: KeyId) -> std::sync::MutexGuard<'_, HashMap<KeyId, u64>> {
        // Key ids are random UUIDs: any byte spreads them evenly.
        let index = usize::from(key.as_uuid().as_bytes()[15]) % LAST_USED_SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, key: KeyId, at_ms: u64) {
        let mut shard = self.shard(key);
        let latest = shard.entry(key).or_insert(at_ms);
        if *latest < at_ms {
            *latest = at_ms;
        }
    }

    fn pending(&self, key: KeyId) -> Option<u64> {
        self.shard(key).get(&key).copied()
    }

    fn snapshot(&self) -> Vec<(KeyId, u64)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            all.extend(shard.iter().map(|(k, t)| (*k, *t)));
        }
        all
    }

    /// Forgets what was written, unless a newer use arrived meanwhile.
    fn written(&self, batch: &[(KeyId, u64)]) {
        for (key, at) in batch {
            let mut shard = self.shard(*key);
            if shard.get(key) == Some(at) {
                shard.remove(key);
            }
        }
    }
}

async fn flush_last_used(pool: &Pool, last_used: &LastUsed) -> Result<(), BackendError> {
    let mut batch = last_used.snapshot();
    if batch.is_empty() {
        return Ok(());
    }
    // One lock order for every replica, so two writers cannot deadlock on each other.
    batch.sort_unstable();
    let client = pool.get().await.map_err(to_backend_error)?;
    let statement = client
        .prepare_cached(LAST_USED_SQL)
        .await
        .map_err(to_backend_error)?;
    for chunk in batch.chunks(LAST_USED_CHUNK) {
        let ids: Vec<Uuid> = chunk.iter().map(|(k, _)| *k.as_uuid()).collect();
        let times: Vec<DateTime<Utc>> = chunk.iter().map(|(_, t)| timestamp(*t)).collect();
        client
            .execute(&statement, &[&ids, &times])
            .await
            .map_err(to_backend_error)?;
        last_used.written(chunk);
    }
    Ok(())
}

async fn write_last_used(
    pool: Pool,
    last_used: Arc<LastUsed>,
    interval: Duration,
    shutdown: Arc<Notify>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            _ = shutdown.notified() => true,
        };
        if let Err(err) = flush_last_used(&pool, &last_used).await {
            // Kept in the buffer: the next round retries.
            tracing::warn!(error = %err, "could not write key last-used times");
        }
        if stopping {
            return;
        }
    }
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

    fn create_key(&self, org: OrgId, name: String) -> BoxFuture<Result<NewKey, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.create_key(org, name).await })
    }

    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.revoke_key(key).await })
    }

    fn rotate_key(&self, key: KeyId) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.rotate_key(key).await })
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
    fn change_payloads_round_trip() {
        for change in [
            Change::Key(KeyId::new()),
            Change::Org(OrgId::new()),
            Change::Model(ModelId::new()),
        ] {
            assert_eq!(Change::parse(&change.payload()), Some(change));
        }
        assert_eq!(Change::parse("key:nope"), None);
        assert_eq!(Change::parse("what"), None);
    }

    #[test]
    fn unknown_notifications_drop_the_whole_cache() {
        let cache = KeyCache {
            keys: InvalidatingCache::new(10),
            plans: InvalidatingCache::new(10),
            owners: InvalidatingCache::new(10),
            ttl: DEFAULT_CACHE_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
        };
        let (key, org) = (KeyId::new(), OrgId::new());
        let hash = KeyHash::of("x");
        cache
            .keys
            .insert_if_current(hash, Some((key, org)), 0, DEFAULT_CACHE_TTL);
        cache
            .plans
            .insert_if_current(org, Some(Plan::Pro), 0, DEFAULT_CACHE_TTL);
        cache.notification(&Change::Key(KeyId::new()).payload());
        assert_eq!(cache.keys.get(&hash), Some(Some((key, org))));
        cache.notification(&Change::Key(key).payload());
        assert_eq!(cache.keys.get(&hash), None);
        assert_eq!(cache.plans.get(&org), Some(Some(Plan::Pro)));
        cache.notification("v2:something-new");
        assert_eq!(cache.plans.get(&org), None);
    }

    #[test]
    fn last_used_keeps_the_latest_and_forgets_only_what_was_written() {
        let buffer = LastUsed::default();
        let key = KeyId::new();
        buffer.record(key, 5_000);
        buffer.record(key, 3_000);
        assert_eq!(buffer.pending(key), Some(5_000));
        let batch = buffer.snapshot();
        buffer.record(key, 7_000);
        buffer.written(&batch);
        assert_eq!(buffer.pending(key), Some(7_000));
        let batch = buffer.snapshot();
        buffer.written(&batch);
        assert_eq!(buffer.pending(key), None);
    }

    #[test]
    fn timestamps_round_trip_to_the_millisecond() {
        for ms in [0, 1_700_000_000_123, 1_675_150_502_748] {
            assert_eq!(millis(timestamp(ms)), ms);
        }
    }
}
