//! [`PostgresLedger`]: the [`Ledger`] in PostgreSQL, shared by any number of gateway replicas
//! and kept across restarts (feature `postgres`).
//!
//! Three tables (`migrations/`, applied by [`PostgresLedger::migrate`] or
//! [`PostgresLedger::connect`]): `tollgate_credit_accounts` (one row per org: plan, the two
//! pots, `held`, the period), `tollgate_credit_holds` (open holds with their expiry) and the
//! append-only `tollgate_credit_ledger`.
//!
//! **One statement per operation — or per batch of them.** Every operation sends exactly one
//! statement — one round trip on a pooled connection, prepared once per connection — and that
//! statement is atomic: either plain SQL (sweep, extensions) or a call of a function the
//! migrations create. The hot path — holds, commits and releases — is *group-committed*:
//! concurrent calls of one kind (of any number of orgs) are sent together in one statement
//! per batch, which decides each of them in arrival order and gives each its own answer (its
//! hold, its receipt and balance after its charge); a batch runs while the next one gathers,
//! so a lone request is sent at once and a busy ledger sends one statement, and shares one WAL
//! flush, for everything that arrived meanwhile (see `batch.rs` and
//! `migrations/V3__group_commit.sql`); a batch locks its orgs' account rows in one pass, and
//! its functions plan every lookup as an index probe (`migrations/V5__index_probes.sql`). A billed request therefore costs at most two round
//! trips, and under load a small fraction of one.
//!
//! - `hold` renews the period if it is over, then takes the credits with one conditional
//!   `UPDATE … SET held = held + amount WHERE balance − held >= amount`: two holds racing for
//!   the last credits (from any number of replicas) cannot both pass it.
//! - `commit` deletes the hold row and charges it (plan credits first, then top-ups) under
//!   the account row's lock, appending the charge row, and returns the balance after.
//! - `release` deletes the hold row and gives its amount back.
//! - `extend_holds` pushes the expiry of the open holds of requests still in flight (one
//!   statement for any number of holds).
//!
//! Operations of one org are ordered by the lock on its account row, exactly like the
//! per-org mutex of [`MemoryLedger`](crate::MemoryLedger); a batch locks its orgs' rows in one
//! global order, so batches of different replicas never deadlock.
//!
//! **One slow tenant cannot starve the others.** While an org's account row is locked (a
//! long transaction, a struggling server), a shared batch waits for it at most
//! [`with_batch_lock_timeout`](PostgresLedger::with_batch_lock_timeout) (default
//! [`DEFAULT_BATCH_LOCK_TIMEOUT`]) and goes ahead with the other orgs; that org's operations
//! then run in batches of their own, at most
//! [`with_org_concurrency`](PostgresLedger::with_org_concurrency) (default
//! [`DEFAULT_ORG_CONCURRENCY`]) of each kind at a time, until one of them gets its row. Give
//! the request path a pool of its own with a short `statement_timeout`
//! ([`PoolOptions::with_statement_timeout`](tollgate_postgres::PoolOptions)) so a blocked
//! statement fails (and is rolled back) instead of waiting, and put the administrative
//! operations and the periodic jobs on another ([`with_admin_pool`](PostgresLedger::with_admin_pool)).
//!
//! The
//! two ledgers behave the same (one behaviour suite runs against both), including the
//! handling of expired holds: a hold older than the TTL is released by
//! [`sweep_expired_holds`](Ledger::sweep_expired_holds) (holds of a crashed replica), and a
//! late commit of it is charged only if `balance − held` still covers it, once.
//!
//! **Time** comes from the [`Clock`] given to the ledger (the replicas' clocks), so tests can
//! drive renewals and expiry; all replicas should run NTP.
//!
//! [`release_detached`](Ledger::release_detached) (called from `Drop`) never waits: it
//! queues the release for a background task over a bounded channel, which retries a failed
//! release with back-off; when the queue is full the hold is left to the sweeper and counted
//! ([`PostgresLedger::detached_releases_dropped`]).
//! [`open_holds`](Ledger::open_holds) is a cached gauge: the number of open holds in the
//! database as of the last sweep (or [`refresh_open_holds`](PostgresLedger::refresh_open_holds)),
//! adjusted by this instance's own holds since.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tollgate_core::{BackendError, BoxFuture, Clock, KeyId, OrgId, Plan, RequestId, SharedClock};
use tollgate_postgres::to_backend_error;

use crate::ledger::{
    Account, CommitOutcome, Hold, HoldOutcome, KeyBudget, Ledger, LedgerEntry, ReleaseOutcome,
    MAX_CREDITS,
};

mod batch;
mod ops;
mod releaser;
mod sql;

use batch::{BatchConfig, Batcher, Isolated};
use ops::{CommitItem, CommitOp, HoldItem, HoldOp, ReleaseItem, ReleaseOp};
use releaser::Detached;
use sql::*;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The default hold TTL: 5 minutes (as the memory ledger's). Holds of requests in flight are
/// extended by the meter, so the TTL only bounds how long the holds of a crashed replica keep
/// their credits.
const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);

/// Releases queued by [`Ledger::release_detached`] before further ones are left to the
/// sweeper.
pub const DEFAULT_RELEASE_QUEUE: usize = 1_024;

/// Batches of each kind (holds, commits, releases) of one org whose account row was found
/// locked that may run at once (see [`PostgresLedger::with_org_concurrency`]).
pub const DEFAULT_ORG_CONCURRENCY: usize = 1;

/// How long a shared batch waits for one org's account row before leaving that org's
/// operations to batches of their own (see [`PostgresLedger::with_batch_lock_timeout`]).
pub const DEFAULT_BATCH_LOCK_TIMEOUT: Duration = Duration::from_millis(500);

/// Most operations in one batch (see [`PostgresLedger::with_batching`]).
pub const DEFAULT_BATCH_SIZE: usize = 512;

/// Shared batches of each kind in flight at once (see [`PostgresLedger::with_batching`]).
pub const DEFAULT_BATCHES_IN_FLIGHT: usize = 1;

/// The batchers of the hot path, made on first use (after the builder methods).
struct Batchers {
    holds: Arc<Batcher<HoldOp>>,
    commits: Arc<Batcher<CommitOp>>,
    releases: Arc<Batcher<ReleaseOp>>,
}

/// The [`Ledger`] in PostgreSQL. Cheap to share with `Arc`; several instances (replicas,
/// each with its own pool) may use the same database at once.
///
/// ```no_run
/// use std::sync::Arc;
///
/// use tollgate_core::{OrgId, Plan, SystemClock};
/// use tollgate_credit_meter::{CreditMeterLayer, Ledger, PostgresLedger};
///
/// # async fn demo() -> Result<(), tollgate_core::BackendError> {
/// // Connects and applies the migrations (safe when several replicas start at once).
/// let url = "postgres://tollgate@127.0.0.1/tollgate";
/// let ledger = Arc::new(PostgresLedger::connect(url, SystemClock).await?);
/// ledger.subscribe(OrgId::new(), Plan::Basic).await?;
/// let layer = CreditMeterLayer::new(ledger.clone());
/// let every = std::time::Duration::from_secs(30);
/// tokio::spawn(tollgate_credit_meter::run_ledger_jobs(ledger, every));
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
pub struct PostgresLedger {
    /// The request path: holds, commits, releases, extensions, account reads.
    pool: Pool,
    /// Administration and the periodic jobs (the request pool unless given another).
    admin_pool: Pool,
    batch: BatchConfig,
    batchers: OnceLock<Batchers>,
    clock: SharedClock,
    hold_ttl_ms: u64,
    release_queue: usize,
    /// Open holds as last counted in the database, plus this instance's changes since.
    open_holds: Arc<AtomicI64>,
    /// Detached releases, made on first use (after the builder methods).
    detached: OnceLock<Arc<Detached>>,
    dropped_releases: Arc<AtomicU64>,
}

impl PostgresLedger {
    /// The name of the ledger's migration set: its history table is
    /// `tollgate_credits_migrations`.
    pub const MIGRATION_SET: &'static str = "credits";

    /// A ledger on `pool`, reading time from `clock`, with the default hold TTL of 5 minutes
    /// (as the memory ledger's). No I/O: the schema must exist ([`PostgresLedger::migrate`]);
    /// an unreachable server shows up as [`BackendError::unavailable`] on use.
    pub fn new(pool: Pool, clock: impl Clock) -> Self {
        PostgresLedger {
            admin_pool: pool.clone(),
            pool,
            batch: BatchConfig {
                max: DEFAULT_BATCH_SIZE,
                shared_in_flight: DEFAULT_BATCHES_IN_FLIGHT,
                org_in_flight: DEFAULT_ORG_CONCURRENCY,
                lock_timeout: DEFAULT_BATCH_LOCK_TIMEOUT,
            },
            batchers: OnceLock::new(),
            clock: Arc::new(clock),
            hold_ttl_ms: u64::try_from(DEFAULT_TTL.as_millis()).unwrap_or(u64::MAX),
            release_queue: DEFAULT_RELEASE_QUEUE,
            open_holds: Arc::new(AtomicI64::new(0)),
            detached: OnceLock::new(),
            dropped_releases: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Connects to `url` ([`tollgate_postgres::connect`]), applies the migrations and counts
    /// the open holds for the gauge.
    pub async fn connect(url: &str, clock: impl Clock) -> Result<Self, BackendError> {
        let pool = tollgate_postgres::connect(url)?;
        Self::migrate(&pool).await?;
        let ledger = PostgresLedger::new(pool, clock);
        ledger.refresh_open_holds().await?;
        Ok(ledger)
    }

    /// Creates or upgrades the ledger's tables and functions (migration set
    /// [`MIGRATION_SET`](Self::MIGRATION_SET), under an advisory lock: safe when replicas
    /// start at once).
    pub async fn migrate(pool: &Pool) -> Result<(), BackendError> {
        tollgate_postgres::run_migrations(pool, Self::MIGRATION_SET, embedded::migrations::runner())
            .await
    }

    /// Applies the migrations up to and including `version` only: a database as an earlier
    /// release left it, for upgrade tests.
    #[doc(hidden)]
    pub async fn migrate_to_version(pool: &Pool, version: u32) -> Result<(), BackendError> {
        let runner = embedded::migrations::runner().set_target(refinery::Target::Version(version));
        tollgate_postgres::run_migrations(pool, Self::MIGRATION_SET, runner).await
    }

    /// How long a hold nobody [extends](Ledger::extend_holds) stays open before the sweeper
    /// releases it: how long the holds of a crashed replica keep their credits. Every replica
    /// should use the same value.
    pub fn with_hold_ttl(mut self, ttl: Duration) -> Self {
        self.hold_ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Runs the administrative operations (subscribe, cancel, top-up, adjustments, the
    /// ledger rows) and the periodic jobs (renewals, the sweeper) on `pool` instead of the
    /// request path's pool, so neither can take connections from the other. `pool` must reach
    /// the same database and schema.
    pub fn with_admin_pool(mut self, pool: Pool) -> Self {
        self.admin_pool = pool;
        self
    }

    /// At most `permits` batches of holds, and as many of commits and of releases, of an org
    /// whose account row was found locked run at once (default [`DEFAULT_ORG_CONCURRENCY`], at
    /// least 1): such an org keeps at most `3 × permits` connections busy, however many
    /// requests it sends, and its settlements never queue behind its new holds.
    pub fn with_org_concurrency(mut self, permits: usize) -> Self {
        self.batch.org_in_flight = permits.max(1);
        self
    }

    /// How long a batch shared by several orgs waits for one org's account row before it
    /// answers that org's operations in batches of their own (default
    /// [`DEFAULT_BATCH_LOCK_TIMEOUT`], at least 1 ms): the most one org's locked row delays the
    /// others.
    pub fn with_batch_lock_timeout(mut self, timeout: Duration) -> Self {
        self.batch.lock_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// At most `max` operations per batch (default [`DEFAULT_BATCH_SIZE`]) and `in_flight`
    /// shared batches of each kind at once (default [`DEFAULT_BATCHES_IN_FLIGHT`]); both at
    /// least 1. `with_batching(1, n)` sends every operation on its own, `n` at a time.
    pub fn with_batching(mut self, max: usize, in_flight: usize) -> Self {
        self.batch.max = max.max(1);
        self.batch.shared_in_flight = in_flight.max(1);
        self
    }

    /// Releases [`release_detached`](Ledger::release_detached) may queue (default
    /// [`DEFAULT_RELEASE_QUEUE`], at least 1) before further ones are left to the sweeper.
    pub fn with_release_queue(mut self, capacity: usize) -> Self {
        self.release_queue = capacity.max(1);
        self
    }

    /// The hold TTL.
    pub fn hold_ttl(&self) -> Duration {
        Duration::from_millis(self.hold_ttl_ms)
    }

    /// The pool of the request path.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Detached releases that could not be queued (queue full, or no tokio runtime) and were
    /// left to the sweeper, since this instance started.
    pub fn detached_releases_dropped(&self) -> u64 {
        self.dropped_releases.load(Ordering::Relaxed)
    }

    /// Counts the open holds in the database (of every replica) for the
    /// [`open_holds`](Ledger::open_holds) gauge. Sweeps refresh it too.
    pub async fn refresh_open_holds(&self) -> Result<u64, BackendError> {
        let client = self.admin_pool.get().await.map_err(to_backend_error)?;
        let stmt = client
            .prepare_cached(OPEN_HOLDS)
            .await
            .map_err(to_backend_error)?;
        let row = client
            .query_one(&stmt, &[])
            .await
            .map_err(to_backend_error)?;
        let open: i64 = col(&row, 0)?;
        self.open_holds.store(open, Ordering::Relaxed);
        Ok(u64::try_from(open).unwrap_or(0))
    }

    fn now(&self) -> i64 {
        to_sql(self.clock.now_ms())
    }

    fn batchers(&self) -> &Batchers {
        self.batchers.get_or_init(|| {
            let shared = ops::Shared {
                clock: Arc::clone(&self.clock),
                hold_ttl_ms: self.hold_ttl_ms,
                open_holds: Arc::clone(&self.open_holds),
            };
            let isolated = Arc::new(Isolated::default());
            Batchers {
                holds: Arc::new(Batcher::new(
                    HoldOp {
                        shared: shared.clone(),
                        orphans: Arc::clone(self.detached()),
                    },
                    self.pool.clone(),
                    self.batch,
                    Arc::clone(&isolated),
                )),
                commits: Arc::new(Batcher::new(
                    CommitOp(shared.clone()),
                    self.pool.clone(),
                    self.batch,
                    Arc::clone(&isolated),
                )),
                releases: Arc::new(Batcher::new(
                    ReleaseOp(shared),
                    self.pool.clone(),
                    self.batch,
                    Arc::clone(&isolated),
                )),
            }
        })
    }

    /// A top-up (`TOP_UP`), or with a reference one applied once per reference
    /// (`TOP_UP_ONCE`).
    fn top_up_with(
        &self,
        org: OrgId,
        amount: u64,
        reference: Option<RequestId>,
    ) -> BoxFuture<Result<Option<Account>, BackendError>> {
        let pool = self.admin_pool.clone();
        let now = self.now();
        Box::pin(async move {
            if amount > MAX_CREDITS {
                return Err(out_of_range("top-up of", amount));
            }
            let amount_sql = to_sql(amount);
            let answer = match &reference {
                None => query_opt(&pool, TOP_UP, &[org.as_uuid(), &amount_sql, &now]).await,
                Some(r) => {
                    let r = r.as_str();
                    query_opt(&pool, TOP_UP_ONCE, &[org.as_uuid(), &amount_sql, &now, &r]).await
                }
            };
            match answer {
                Ok(row) => row.as_ref().map(account_from_row).transpose(),
                Err(err) if is_out_of_range(&err) => Err(out_of_range("top-up of", amount)),
                Err(err) => Err(err),
            }
        })
    }

    /// Detached releases (their queue and background task start on first use).
    fn detached(&self) -> &Arc<Detached> {
        self.detached.get_or_init(|| {
            Arc::new(Detached {
                pool: self.pool.clone(),
                clock: Arc::clone(&self.clock),
                open_holds: Arc::clone(&self.open_holds),
                ttl: self.hold_ttl(),
                capacity: self.release_queue,
                dropped: Arc::clone(&self.dropped_releases),
                tx: OnceLock::new(),
            })
        })
    }
}

impl fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("pool", &self.pool.status())
            .field("hold_ttl_ms", &self.hold_ttl_ms)
            .field("open_holds", &self.open_holds())
            .field(
                "detached_releases_dropped",
                &self.detached_releases_dropped(),
            )
            .finish()
    }
}

impl Ledger for PostgresLedger {
    fn hold_for_key(
        &self,
        org: OrgId,
        amount: u64,
        request_id: Option<RequestId>,
        budget: Option<KeyBudget>,
    ) -> BoxFuture<Result<HoldOutcome, BackendError>> {
        if amount > MAX_CREDITS {
            // More than any balance can hold: only the reason for refusing is needed.
            let pool = self.pool.clone();
            let now = self.now();
            return Box::pin(async move {
                let Some(row) = query_opt(&pool, ACCOUNT, &[org.as_uuid(), &now]).await? else {
                    return Ok(HoldOutcome::NoSubscription);
                };
                let account = account_from_row(&row)?;
                Ok(match (account.plan, account.available()) {
                    (None, _) => HoldOutcome::NoSubscription,
                    (Some(_), None) => HoldOutcome::Unlimited,
                    (Some(_), Some(available)) => HoldOutcome::Insufficient { available },
                })
            });
        }
        let holds = Arc::clone(&self.batchers().holds);
        let item = HoldItem {
            org,
            amount,
            request_id: request_id.map(|id| id.as_str().to_owned()),
            key: budget.map(|b| b.key),
            // A limit past any balance is no limit.
            key_limit: budget.and_then(|b| b.limit).filter(|&l| l <= MAX_CREDITS),
        };
        Box::pin(async move { holds.submit(item).await })
    }

    fn key_spend(
        &self,
        org: OrgId,
        keys: Vec<KeyId>,
    ) -> BoxFuture<Result<HashMap<KeyId, u64>, BackendError>> {
        let pool = self.admin_pool.clone();
        let now = self.now();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let ids: Vec<uuid::Uuid> = keys.iter().map(|k| *k.as_uuid()).collect();
            // A period that is over starts first, so its spend reads as zero.
            client
                .execute(RENEW, &[org.as_uuid(), &now])
                .await
                .map_err(to_backend_error)?;
            let rows = client
                .query(KEY_SPEND, &[org.as_uuid(), &ids])
                .await
                .map_err(to_backend_error)?;
            rows.iter()
                .map(|row| {
                    let key: uuid::Uuid = col(row, "key_id")?;
                    let spent: i64 = col(row, "spent")?;
                    Ok((KeyId::from_uuid(key), from_sql(spent)))
                })
                .collect()
        })
    }

    fn commit(&self, hold: Hold) -> BoxFuture<Result<CommitOutcome, BackendError>> {
        if i64::try_from(hold.id.0).is_err() {
            return Box::pin(async { Ok(CommitOutcome::Unknown) }); // never issued here
        }
        let commits = Arc::clone(&self.batchers().commits);
        Box::pin(async move { commits.submit(CommitItem { hold }).await })
    }

    fn release(&self, hold: Hold) -> BoxFuture<Result<ReleaseOutcome, BackendError>> {
        if i64::try_from(hold.id.0).is_err() {
            return Box::pin(async { Ok(ReleaseOutcome::Gone) }); // never issued here
        }
        let releases = Arc::clone(&self.batchers().releases);
        Box::pin(async move {
            releases
                .submit(ReleaseItem {
                    hold,
                    refund: false,
                })
                .await
        })
    }

    fn extend_holds(&self, holds: Vec<Hold>) -> BoxFuture<Result<usize, BackendError>> {
        let pool = self.pool.clone();
        let expires_at = to_sql(self.clock.now_ms().saturating_add(self.hold_ttl_ms));
        Box::pin(async move {
            let ids: Vec<i64> = holds
                .iter()
                .filter_map(|h| i64::try_from(h.id.0).ok())
                .collect();
            if ids.is_empty() {
                return Ok(0);
            }
            let client = pool.get().await.map_err(to_backend_error)?;
            let stmt = client
                .prepare_cached(EXTEND)
                .await
                .map_err(to_backend_error)?;
            let n = client
                .execute(&stmt, &[&expires_at, &ids])
                .await
                .map_err(to_backend_error)?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn hold_ttl(&self) -> Duration {
        PostgresLedger::hold_ttl(self)
    }

    fn release_detached(&self, hold: Hold) {
        self.detached().release(hold);
    }

    fn subscribe(&self, org: OrgId, plan: Plan) -> BoxFuture<Result<Account, BackendError>> {
        let pool = self.admin_pool.clone();
        let now = self.now();
        Box::pin(async move {
            let monthly = plan.monthly_credits().map(to_sql);
            let row = query_one(
                &pool,
                SUBSCRIBE,
                &[org.as_uuid(), &plan.name(), &monthly, &now],
            )
            .await?;
            account_from_row(&row)
        })
    }

    fn cancel(&self, org: OrgId) -> BoxFuture<Result<bool, BackendError>> {
        let pool = self.admin_pool.clone();
        let now = self.now();
        Box::pin(async move {
            let row = query_one(&pool, CANCEL, &[org.as_uuid(), &now]).await?;
            col(&row, 0)
        })
    }

    fn top_up(&self, org: OrgId, amount: u64) -> BoxFuture<Result<Option<Account>, BackendError>> {
        self.top_up_with(org, amount, None)
    }

    fn top_up_once(
        &self,
        org: OrgId,
        amount: u64,
        reference: RequestId,
    ) -> BoxFuture<Result<Option<Account>, BackendError>> {
        self.top_up_with(org, amount, Some(reference))
    }

    fn set_balance(
        &self,
        org: OrgId,
        balance: u64,
    ) -> BoxFuture<Result<Option<Account>, BackendError>> {
        let pool = self.admin_pool.clone();
        let now = self.now();
        Box::pin(async move {
            if balance > MAX_CREDITS {
                return Err(out_of_range("balance", balance));
            }
            let balance = to_sql(balance);
            let row = query_opt(&pool, SET_BALANCE, &[org.as_uuid(), &balance, &now]).await?;
            row.as_ref().map(account_from_row).transpose()
        })
    }

    fn account(&self, org: OrgId) -> BoxFuture<Result<Option<Account>, BackendError>> {
        let pool = self.pool.clone();
        let now = self.now();
        Box::pin(async move {
            let row = query_opt(&pool, ACCOUNT, &[org.as_uuid(), &now]).await?;
            row.as_ref().map(account_from_row).transpose()
        })
    }

    fn entries(&self, org: OrgId) -> BoxFuture<Result<Vec<LedgerEntry>, BackendError>> {
        let pool = self.admin_pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let stmt = client
                .prepare_cached(ENTRIES)
                .await
                .map_err(to_backend_error)?;
            let rows = client
                .query(&stmt, &[org.as_uuid()])
                .await
                .map_err(to_backend_error)?;
            rows.iter()
                .map(|row| {
                    let kind: &str = col(row, "kind")?;
                    let balance_after: i64 = col(row, "balance_after")?;
                    let at_ms: i64 = col(row, "at_ms")?;
                    let request_id: Option<String> = col(row, "request_id")?;
                    Ok(LedgerEntry {
                        at_ms: from_sql(at_ms),
                        org,
                        kind: entry_kind(kind)?,
                        delta_plan: col(row, "delta_plan")?,
                        delta_topup: col(row, "delta_topup")?,
                        balance_after: from_sql(balance_after),
                        request_id,
                    })
                })
                .collect()
        })
    }

    fn renew_due(&self) -> BoxFuture<Result<usize, BackendError>> {
        let pool = self.admin_pool.clone();
        let now = self.now();
        Box::pin(async move {
            // Each account renews in its own statement (and transaction), so the job never
            // holds more than one account lock; an account another replica renewed first
            // counts there, not here.
            const CHUNK: i64 = 500;
            let client = pool.get().await.map_err(to_backend_error)?;
            let due = client.prepare_cached(DUE).await.map_err(to_backend_error)?;
            let renew = client
                .prepare_cached(RENEW)
                .await
                .map_err(to_backend_error)?;
            let mut renewed = 0;
            loop {
                let orgs = client
                    .query(&due, &[&now, &NO_NEXT_PERIOD, &CHUNK])
                    .await
                    .map_err(to_backend_error)?;
                if orgs.is_empty() {
                    return Ok(renewed);
                }
                for row in &orgs {
                    let org = OrgId::from_uuid(col(row, 0)?);
                    let periods: i32 = col(
                        &client
                            .query_one(&renew, &[org.as_uuid(), &now])
                            .await
                            .map_err(to_backend_error)?,
                        0,
                    )?;
                    if periods > 0 {
                        renewed += 1;
                    }
                }
            }
        })
    }

    fn sweep_expired_holds(&self) -> BoxFuture<Result<usize, BackendError>> {
        let pool = self.admin_pool.clone();
        let now_ms = self.clock.now_ms();
        let now = to_sql(now_ms);
        // Swept holds are remembered for one more TTL, so a late commit is charged at most
        // once and only after re-checking the balance.
        let forget_at = to_sql(now_ms.saturating_add(self.hold_ttl_ms));
        let open_holds = Arc::clone(&self.open_holds);
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let stmt = client
                .prepare_cached(SWEEP)
                .await
                .map_err(to_backend_error)?;
            let mut total = 0usize;
            loop {
                let row = client
                    .query_one(&stmt, &[&now, &forget_at, &SWEEP_LOCK_KEY, &SWEEP_BATCH])
                    .await
                    .map_err(to_backend_error)?;
                let swept: i64 = col(&row, "swept")?;
                let open: i64 = col(&row, "open")?;
                open_holds.store((open - swept).max(0), Ordering::Relaxed);
                total += usize::try_from(swept).unwrap_or(0);
                if swept < SWEEP_BATCH {
                    return Ok(total);
                }
            }
        })
    }

    fn open_holds(&self) -> u64 {
        u64::try_from(self.open_holds.load(Ordering::Relaxed)).unwrap_or(0)
    }
}
