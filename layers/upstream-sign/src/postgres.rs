//! [`PostgresSessionStore`]: models and their sessions in PostgreSQL, the session material
//! encrypted at rest (cargo feature `postgres`).
//!
//! # Table
//!
//! `tollgate_models` (id, org, name, status, `session_ciphertext` bytea, `session_nonce`
//! bytea, `session_version` bigint, created/updated times), created by the migrations in
//! `migrations/` (history table `tollgate_upstream_sign_migrations`).
//!
//! `session_version` starts at 1 and `reconnect` adds 1 in the same statement that replaces
//! the session; `mark_disconnected` updates the row only while the version is still the one
//! the request read, so the check and the change are one atomic statement.
//!
//! # Encryption
//!
//! A session is serialized to JSON and sealed with XChaCha20-Poly1305 under the 32-byte key
//! given to the constructor (the gateway's `TOLLGATE_SESSION_KEY`), with a fresh random
//! 24-byte nonce for every write and the model id (its 16 bytes) as associated data, so a
//! ciphertext copied onto another model's row does not decrypt. Only
//! [`session`](SessionStore::session) decrypts; [`model`](SessionStore::model) and
//! [`list`](SessionStore::list) never touch the material, and nothing here logs it. A row
//! that does not decrypt (a different key, a tampered row) makes `session` fail with
//! [`BackendError::other`] (the request gets 500, the model stays as it is) until the model
//! is reconnected, which re-encrypts under the current key.
//!
//! # Cache
//!
//! With a listener ([`PostgresSessionStoreBuilder::with_listener`], which
//! [`PostgresSessionStore::connect`] sets up), sessions are cached in process so a proxied
//! request does not read the table; `reconnect` and `mark_disconnected` send `NOTIFY
//! tollgate_models` in their transaction and every replica evicts the model within a second,
//! failing closed to the table while its listener is down (see
//! [`tollgate_postgres::Listener`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use tokio_postgres::Row;
use tollgate_core::{BackendError, BoxFuture, ModelId, OrgId};
use tollgate_postgres::deadpool_postgres::{Object, Pool, Transaction};
use tollgate_postgres::{
    pg_config, run_migrations, to_backend_error, InvalidatingCache, Listener, ListenerOptions,
    NotificationHandler, PoolOptions,
};

use crate::session::{ModelRecord, ModelSession, ModelStatus, Session, SessionStore};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The notification channel of model status and session changes.
pub const MODELS_CHANNEL: &str = "tollgate_models";

/// The name of this crate's migration set (history table
/// `tollgate_upstream_sign_migrations`).
pub const MIGRATION_SET: &str = "upstream_sign";

/// Bytes of an XChaCha20-Poly1305 nonce.
const NONCE_LEN: usize = 24;
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
const DEFAULT_CACHE_CAPACITY: usize = 100_000;

const SESSION_SQL: &str = "SELECT status, session_ciphertext, session_nonce, session_version \
                           FROM tollgate_models WHERE id = $1";
// The check and the change in one statement: a reconnect committed meanwhile (a new
// version) makes it match nothing.
const DISCONNECT_SQL: &str = "UPDATE tollgate_models SET status = 'disconnected', \
                              updated_at = now(), disconnected_at_ms = \
                              (extract(epoch from clock_timestamp()) * 1000)::bigint \
                              WHERE id = $1 AND session_version = $2 \
                              AND status <> 'disconnected'";
const RECORD_COLUMNS: &str = "id, org_id, name, status, disconnected_at_ms";

/// A [`SessionStore`] in PostgreSQL with sessions encrypted at rest (see the
/// [module docs](self)).
///
/// Cloning is cheap and shares the pool, cache and listener.
///
/// ```no_run
/// # async fn start(session_key: [u8; 32]) -> Result<(), tollgate_core::BackendError> {
/// use tollgate_upstream_sign::{PostgresSessionStore, RulesSigner, sandbox_rules, UpstreamSignLayer};
///
/// let sessions =
///     PostgresSessionStore::connect("postgres://tollgate@127.0.0.1:5432/tollgate", session_key)
///         .await?;
/// let layer = UpstreamSignLayer::new(RulesSigner::new(sandbox_rules()), sessions.clone());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresSessionStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    cipher: XChaCha20Poly1305,
    cache: Arc<SessionCache>,
    listener: Option<Listener>,
    cache_ttl: Duration,
}

/// Options of a [`PostgresSessionStore`]; from [`PostgresSessionStore::builder`].
pub struct PostgresSessionStoreBuilder {
    pool: Pool,
    key: [u8; 32],
    listen: Option<tokio_postgres::Config>,
    listener_options: ListenerOptions,
    cache_ttl: Duration,
    cache_capacity: usize,
    migrate: bool,
}

impl fmt::Debug for PostgresSessionStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("PostgresSessionStoreBuilder")
            .field("listener", &self.listen.is_some())
            .field("cache_ttl", &self.cache_ttl)
            .field("migrate", &self.migrate)
            .finish_non_exhaustive()
    }
}

impl PostgresSessionStoreBuilder {
    /// Listens for changes on a dedicated connection with this configuration, which turns
    /// the session cache on. Without a listener every `session` call reads the table.
    pub fn with_listener(mut self, config: tokio_postgres::Config) -> Self {
        self.listen = Some(config);
        self
    }

    /// Heartbeat and trust timing of the listener.
    pub fn with_listener_options(mut self, options: ListenerOptions) -> Self {
        self.listener_options = options;
        self
    }

    /// How long a cached session is trusted without a notification (default 30 s).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// The most sessions cached (default 100,000).
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// Whether `build` applies the migrations (default true).
    pub fn with_migrations(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Applies the migrations and starts the listener (waiting up to 2 s for it). Must run
    /// within a tokio runtime.
    pub async fn build(self) -> Result<PostgresSessionStore, BackendError> {
        if self.migrate {
            run_migrations(&self.pool, MIGRATION_SET, embedded::migrations::runner()).await?;
        }
        let cache = Arc::new(SessionCache {
            sessions: InvalidatingCache::new(self.cache_capacity),
        });
        let listener = match self.listen {
            Some(config) => {
                let handler: Arc<dyn NotificationHandler> = cache.clone();
                Some(
                    Listener::start(
                        config,
                        MODELS_CHANNEL,
                        handler,
                        self.listener_options,
                        "session store",
                    )
                    .await?,
                )
            }
            None => None,
        };
        Ok(PostgresSessionStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                cipher: XChaCha20Poly1305::new(&self.key.into()),
                cache,
                listener,
                cache_ttl: self.cache_ttl,
            }),
        })
    }
}

impl PostgresSessionStore {
    /// A store on `pool` encrypting sessions with `key`, after applying the migrations.
    /// Without a listener there is no cache: every `session` call reads the table (use
    /// [`connect`](Self::connect) or [`builder`](Self::builder) for the cache).
    pub async fn new(pool: Pool, key: [u8; 32]) -> Result<Self, BackendError> {
        Self::builder(pool, key).build().await
    }

    /// Connects to `url` (a pool with [`PoolOptions::default`] plus a listening connection
    /// for the cache) and applies the migrations: what a gateway calls at start.
    pub async fn connect(url: &str, key: [u8; 32]) -> Result<Self, BackendError> {
        Self::connect_with(url, &PoolOptions::default(), key).await
    }

    /// Like [`connect`](Self::connect), with explicit pool options (size, timeouts, schema).
    pub async fn connect_with(
        url: &str,
        options: &PoolOptions,
        key: [u8; 32],
    ) -> Result<Self, BackendError> {
        let pool = tollgate_postgres::connect_with(url, options)?;
        let listen = pg_config(url, options)?;
        Self::builder(pool, key).with_listener(listen).build().await
    }

    /// A store on an existing pool, with options.
    pub fn builder(pool: Pool, key: [u8; 32]) -> PostgresSessionStoreBuilder {
        PostgresSessionStoreBuilder {
            pool,
            key,
            listen: None,
            listener_options: ListenerOptions::default(),
            cache_ttl: DEFAULT_CACHE_TTL,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            migrate: true,
        }
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Whether sessions may currently be served from the cache (the listener is live).
    pub fn cache_is_live(&self) -> bool {
        self.inner.cache_live()
    }
}

impl fmt::Debug for PostgresSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key or a session.
        f.debug_struct("PostgresSessionStore")
            .field("pool", &self.inner.pool.status())
            .field("listener", &self.inner.listener)
            .field("cached_sessions", &self.inner.cache.sessions.len())
            .finish()
    }
}

struct SessionCache {
    sessions: InvalidatingCache<ModelId, ModelSession>,
}

impl NotificationHandler for SessionCache {
    fn notification(&self, payload: &str) {
        match payload.parse::<ModelId>() {
            Ok(model) => self.sessions.invalidate(&model),
            Err(_) => self.sessions.clear(),
        }
    }

    fn reset(&self) {
        self.sessions.clear();
    }
}

fn parse_status(text: &str) -> Result<ModelStatus, BackendError> {
    match text {
        "connected" => Ok(ModelStatus::Connected),
        "disconnected" => Ok(ModelStatus::Disconnected),
        other => Err(BackendError::other(format!(
            "unexpected model status {other:?} in tollgate_models"
        ))),
    }
}

fn version_from(stored: i64) -> Result<u64, BackendError> {
    u64::try_from(stored).map_err(|_| {
        BackendError::other(format!(
            "unexpected session version {stored} in tollgate_models"
        ))
    })
}

fn record_from(row: &Row) -> Result<ModelRecord, BackendError> {
    Ok(ModelRecord {
        id: ModelId::from_uuid(row.try_get(0).map_err(to_backend_error)?),
        org: OrgId::from_uuid(row.try_get(1).map_err(to_backend_error)?),
        name: row.try_get(2).map_err(to_backend_error)?,
        status: parse_status(row.try_get(3).map_err(to_backend_error)?)?,
        disconnected_at_ms: row
            .try_get::<_, Option<i64>>(4)
            .map_err(to_backend_error)?
            .map(|ms| u64::try_from(ms).unwrap_or(0)),
    })
}

async fn notify(tx: &Transaction<'_>, model: ModelId) -> Result<(), BackendError> {
    // Delivered at commit to every listening replica.
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&MODELS_CHANNEL, &model.to_string()],
    )
    .await
    .map(drop)
    .map_err(to_backend_error)
}

/// A sealed session: ciphertext (with its tag) and nonce.
struct Sealed {
    ciphertext: Vec<u8>,
    nonce: [u8; NONCE_LEN],
}

impl Inner {
    fn cache_live(&self) -> bool {
        self.listener.as_ref().is_some_and(Listener::is_live)
    }

    async fn client(&self) -> Result<Object, BackendError> {
        self.pool.get().await.map_err(to_backend_error)
    }

    fn seal(&self, model: ModelId, session: &Session) -> Result<Sealed, BackendError> {
        let plaintext = serde_json::to_vec(session).map_err(BackendError::other)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| {
            BackendError::other(format!("the system random number generator failed: {e}"))
        })?;
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: model.as_uuid().as_bytes(),
                },
            )
            .map_err(|_| BackendError::other("session encryption failed"))?;
        Ok(Sealed { ciphertext, nonce })
    }

    fn open(
        &self,
        model: ModelId,
        ciphertext: &[u8],
        nonce: &[u8],
    ) -> Result<Session, BackendError> {
        let undecryptable = || {
            BackendError::other(format!(
                "the session of model {model} cannot be decrypted (a different \
                 TOLLGATE_SESSION_KEY, or a tampered row); reconnect the model"
            ))
        };
        if nonce.len() != NONCE_LEN {
            return Err(undecryptable());
        }
        let plaintext = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: model.as_uuid().as_bytes(),
                },
            )
            .map_err(|_| undecryptable())?;
        // Authenticated, so written by us: a parse failure means a format we don't know.
        serde_json::from_slice(&plaintext).map_err(|_| {
            BackendError::other(format!(
                "the session of model {model} has an unknown format"
            ))
        })
    }

    async fn session(&self, model: ModelId) -> Result<Option<ModelSession>, BackendError> {
        let live = self.cache_live();
        if live {
            if let Some(found) = self.cache.sessions.get(&model) {
                return Ok(Some(found));
            }
        }
        let epoch = self.cache.sessions.epoch();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(SESSION_SQL)
            .await
            .map_err(to_backend_error)?;
        let Some(row) = client
            .query_opt(&statement, &[model.as_uuid()])
            .await
            .map_err(to_backend_error)?
        else {
            return Ok(None);
        };
        drop(client);
        let status = parse_status(row.try_get(0).map_err(to_backend_error)?)?;
        let ciphertext: &[u8] = row.try_get(1).map_err(to_backend_error)?;
        let nonce: &[u8] = row.try_get(2).map_err(to_backend_error)?;
        let version: i64 = row.try_get(3).map_err(to_backend_error)?;
        let found = ModelSession {
            session: self.open(model, ciphertext, nonce)?,
            status,
            version: version_from(version)?,
        };
        if live {
            self.cache
                .sessions
                .insert_if_current(model, found.clone(), epoch, self.cache_ttl);
        }
        Ok(Some(found))
    }

    async fn mark_disconnected(&self, model: ModelId, version: u64) -> Result<bool, BackendError> {
        // A version that does not fit the column was never handed out: nothing to disconnect.
        let Ok(version) = i64::try_from(version) else {
            return Ok(false);
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        let changed = tx
            .execute(DISCONNECT_SQL, &[model.as_uuid(), &version])
            .await
            .map_err(to_backend_error)?;
        if changed > 0 {
            notify(&tx, model).await?;
        }
        tx.commit().await.map_err(to_backend_error)?;
        // Also when nothing changed: a stale request means this replica may still cache the
        // old session (the reconnect's notification not yet here); read the table next time.
        self.cache.sessions.invalidate(&model);
        if changed > 0 {
            return Ok(true);
        }
        // Nothing changed: either already disconnected at this version (a concurrent request
        // got there first), or reconnected since (the request's session is not the current
        // one). Rare, so a second statement is fine.
        let row = client
            .query_opt(
                "SELECT 1 FROM tollgate_models WHERE id = $1 AND session_version = $2 \
                 AND status = 'disconnected'",
                &[model.as_uuid(), &version],
            )
            .await
            .map_err(to_backend_error)?;
        Ok(row.is_some())
    }

    async fn connect(
        &self,
        org: OrgId,
        name: String,
        session: Session,
    ) -> Result<ModelRecord, BackendError> {
        let id = ModelId::new();
        let sealed = self.seal(id, &session)?;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO tollgate_models \
                 (id, org_id, name, status, session_ciphertext, session_nonce) \
                 VALUES ($1, $2, $3, 'connected', $4, $5)",
                &[
                    id.as_uuid(),
                    org.as_uuid(),
                    &name,
                    &sealed.ciphertext,
                    &sealed.nonce.as_slice(),
                ],
            )
            .await
            .map_err(to_backend_error)?;
        Ok(ModelRecord {
            id,
            org,
            name,
            status: ModelStatus::Connected,
            disconnected_at_ms: None,
        })
    }

    async fn reconnect(
        &self,
        model: ModelId,
        session: Session,
    ) -> Result<Option<ModelRecord>, BackendError> {
        let sealed = self.seal(model, &session)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(to_backend_error)?;
        let row = tx
            .query_opt(
                &format!(
                    "UPDATE tollgate_models SET status = 'connected', session_ciphertext = $2, \
                     session_nonce = $3, session_version = session_version + 1, \
                     updated_at = now() WHERE id = $1 RETURNING {RECORD_COLUMNS}"
                ),
                &[
                    model.as_uuid(),
                    &sealed.ciphertext,
                    &sealed.nonce.as_slice(),
                ],
            )
            .await
            .map_err(to_backend_error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        notify(&tx, model).await?;
        tx.commit().await.map_err(to_backend_error)?;
        self.cache.sessions.invalidate(&model);
        record_from(&row).map(Some)
    }

    async fn model(&self, model: ModelId) -> Result<Option<ModelRecord>, BackendError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {RECORD_COLUMNS} FROM tollgate_models WHERE id = $1"),
                &[model.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
        row.as_ref().map(record_from).transpose()
    }

    async fn list(&self, org: OrgId) -> Result<Vec<ModelRecord>, BackendError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM tollgate_models WHERE org_id = $1 ORDER BY seq"
                ),
                &[org.as_uuid()],
            )
            .await
            .map_err(to_backend_error)?;
        rows.iter().map(record_from).collect()
    }
}

impl SessionStore for PostgresSessionStore {
    fn session(&self, model: ModelId) -> BoxFuture<Result<Option<ModelSession>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.session(model).await })
    }

    fn mark_disconnected(
        &self,
        model: ModelId,
        version: u64,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.mark_disconnected(model, version).await })
    }

    fn connect(
        &self,
        org: OrgId,
        name: String,
        session: Session,
    ) -> BoxFuture<Result<ModelRecord, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.connect(org, name, session).await })
    }

    fn reconnect(
        &self,
        model: ModelId,
        session: Session,
    ) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.reconnect(model, session).await })
    }

    fn model(&self, model: ModelId) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.model(model).await })
    }

    fn list(&self, org: OrgId) -> BoxFuture<Result<Vec<ModelRecord>, BackendError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.list(org).await })
    }
}
