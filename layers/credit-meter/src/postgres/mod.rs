//! [`PostgresLedger`]: the [`Ledger`] in PostgreSQL, shared by any number of gateway replicas
//! and kept across restarts (feature `postgres`).
//!
//! Three tables (`migrations/`, applied by [`PostgresLedger::migrate`] or
//! [`PostgresLedger::connect`]): `tollgate_credit_accounts` (one row per org: plan, the two
//! pots, `held`, the period), `tollgate_credit_holds` (open holds with their expiry) and the
//! append-only `tollgate_credit_ledger`.
//!
//! **One statement per operation.** Every operation sends exactly one statement — one round
//! trip on a pooled connection, prepared once per connection — and that statement is atomic:
//! either plain SQL (release, sweep) or a call of a function the migrations create. A billed
//! request therefore costs two round trips: the hold and the commit.
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
//! per-org mutex of [`MemoryLedger`](crate::MemoryLedger); different orgs never contend.
//!
//! **One slow tenant cannot starve the others.** While an org's account row is locked (a
//! long transaction, a struggling server), its statements wait on that lock. At most
//! [`with_org_concurrency`](PostgresLedger::with_org_concurrency) holds and as many
//! settlements of one org (default [`DEFAULT_ORG_CONCURRENCY`] each) take pooled connections
//! at a time; the rest wait without a connection and give up as unavailable after a while. Give the
//! request path a pool of its own with a short `statement_timeout`
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

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tollgate_core::{BackendError, BoxFuture, Clock, OrgId, Plan, RequestId, SharedClock};
use tollgate_postgres::to_backend_error;

use crate::ledger::{
    Account, CommitOutcome, Hold, HoldId, HoldOutcome, Ledger, LedgerEntry, ReleaseOutcome,
    MAX_CREDITS,
};

mod gate;
mod releaser;
mod sql;

use gate::{Lane, OrgGate};
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

/// Holds, and separately settlements (commits and releases), of one org that may hold pooled
/// connections at once (see [`PostgresLedger::with_org_concurrency`]).
pub const DEFAULT_ORG_CONCURRENCY: usize = 4;

/// How long a statement waits for one of its org's permits before giving up as unavailable:
/// long enough for a legitimate burst of one org to drain through its permits.
const DEFAULT_ORG_WAIT: Duration = Duration::from_secs(10);

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
    gate: Arc<OrgGate>,
    clock: SharedClock,
    hold_ttl_ms: u64,
    release_queue: usize,
    /// Open holds as last counted in the database, plus this instance's changes since.
    open_holds: Arc<AtomicI64>,
    /// The background releaser's queue, started by the first detached release.
    releases: OnceLock<mpsc::Sender<Hold>>,
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
            gate: Arc::new(OrgGate::new(DEFAULT_ORG_CONCURRENCY, DEFAULT_ORG_WAIT)),
            clock: Arc::new(clock),
            hold_ttl_ms: u64::try_from(DEFAULT_TTL.as_millis()).unwrap_or(u64::MAX),
            release_queue: DEFAULT_RELEASE_QUEUE,
            open_holds: Arc::new(AtomicI64::new(0)),
            releases: OnceLock::new(),
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

    /// At most `permits` holds, and separately `permits` settlements (commits and releases),
    /// of one org use pooled connections at once (default [`DEFAULT_ORG_CONCURRENCY`], at
    /// least 1; the default wait is 10 s); more wait without a connection, for up to `wait`,
    /// then fail as unavailable. An org whose account row is slow then keeps at most
    /// `2 × permits` connections busy, however many requests it sends; settlements never
    /// queue behind new holds.
    pub fn with_org_concurrency(mut self, permits: usize, wait: Duration) -> Self {
        self.gate = Arc::new(OrgGate::new(permits, wait));
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

    /// The queue of the background releaser, started on first use inside a tokio runtime.
    fn release_sender(&self) -> Option<&mpsc::Sender<Hold>> {
        if let Some(tx) = self.releases.get() {
            return Some(tx);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(self.releases.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.release_queue);
            runtime.spawn(releaser::release_worker(
                self.pool.clone(),
                Arc::clone(&self.clock),
                Arc::clone(&self.open_holds),
                self.hold_ttl(),
                rx,
            ));
            tx
        }))
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
    fn hold(
        &self,
        org: OrgId,
        amount: u64,
        request_id: Option<RequestId>,
    ) -> BoxFuture<Result<HoldOutcome, BackendError>> {
        let pool = self.pool.clone();
        let gate = Arc::clone(&self.gate);
        let now = self.now();
        let expires_at = to_sql(self.clock.now_ms().saturating_add(self.hold_ttl_ms));
        let open_holds = Arc::clone(&self.open_holds);
        Box::pin(async move {
            let _permit = gate.enter(org, Lane::Hold).await?;
            if amount > MAX_CREDITS {
                // More than any balance can hold: only the reason for refusing is needed.
                let Some(row) = query_opt(&pool, ACCOUNT, &[org.as_uuid(), &now]).await? else {
                    return Ok(HoldOutcome::NoSubscription);
                };
                let account = account_from_row(&row)?;
                return Ok(match (account.plan, account.available()) {
                    (None, _) => HoldOutcome::NoSubscription,
                    (Some(_), None) => HoldOutcome::Unlimited,
                    (Some(_), Some(available)) => HoldOutcome::Insufficient { available },
                });
            }
            let amount_sql = to_sql(amount);
            let request_id = request_id.as_ref().map(RequestId::as_str);
            let row = query_one(
                &pool,
                HOLD,
                &[org.as_uuid(), &amount_sql, &request_id, &now, &expires_at],
            )
            .await?;
            let outcome: &str = col(&row, 0)?;
            match outcome {
                "held" => {
                    let id: i64 = col(&row, 1)?;
                    open_holds.fetch_add(1, Ordering::Relaxed);
                    Ok(HoldOutcome::Held(Hold {
                        id: HoldId(from_sql(id)),
                        org,
                        amount,
                    }))
                }
                "unlimited" => Ok(HoldOutcome::Unlimited),
                "no_subscription" => Ok(HoldOutcome::NoSubscription),
                "insufficient" => {
                    let available: i64 = col(&row, 2)?;
                    Ok(HoldOutcome::Insufficient {
                        available: from_sql(available),
                    })
                }
                other => Err(BackendError::other(format!(
                    "unexpected hold outcome {other:?}"
                ))),
            }
        })
    }

    fn commit(&self, hold: Hold) -> BoxFuture<Result<CommitOutcome, BackendError>> {
        let pool = self.pool.clone();
        let gate = Arc::clone(&self.gate);
        let now = self.now();
        // A committed hold is remembered for one TTL, so a lost answer can be resolved.
        let forget_at = to_sql(self.clock.now_ms().saturating_add(self.hold_ttl_ms));
        let open_holds = Arc::clone(&self.open_holds);
        Box::pin(async move {
            let Ok(id) = i64::try_from(hold.id.0) else {
                return Ok(CommitOutcome::Unknown); // never issued by this ledger
            };
            let _permit = gate.enter(hold.org, Lane::Settle).await?;
            let row =
                query_one(&pool, COMMIT, &[hold.org.as_uuid(), &id, &now, &forget_at]).await?;
            let outcome: &str = col(&row, 0)?;
            let note: Option<&str> = col(&row, 2)?;
            let charged: i64 = col(&row, 3)?;
            // An open hold was settled here (a swept one left the gauge when it was swept).
            if matches!(outcome, "charged" | "unlimited") && note != Some("swept") {
                open_holds.fetch_sub(1, Ordering::Relaxed);
            }
            match outcome {
                "charged" => {
                    let balance: i64 = col(&row, 1)?;
                    match note {
                        Some("lowered") => tracing::warn!(
                            org = %hold.org,
                            hold = %hold.id,
                            amount = hold.amount,
                            charged,
                            balance,
                            "the balance was lowered while the hold was open; charged what was left"
                        ),
                        Some("swept") => tracing::warn!(
                            org = %hold.org,
                            hold = %hold.id,
                            "committing a hold that had expired and was released; charged after re-checking the balance"
                        ),
                        _ => {}
                    }
                    Ok(CommitOutcome::Charged {
                        charged: from_sql(charged),
                        balance: Some(from_sql(balance)),
                    })
                }
                "unlimited" => Ok(CommitOutcome::Charged {
                    charged: 0,
                    balance: None,
                }),
                "expired" => Ok(CommitOutcome::Expired),
                "unknown" => Ok(CommitOutcome::Unknown),
                other => Err(BackendError::other(format!(
                    "unexpected commit outcome {other:?}"
                ))),
            }
        })
    }

    fn release(&self, hold: Hold) -> BoxFuture<Result<ReleaseOutcome, BackendError>> {
        let pool = self.pool.clone();
        let gate = Arc::clone(&self.gate);
        let open_holds = Arc::clone(&self.open_holds);
        let now = self.now();
        Box::pin(async move {
            let _permit = gate.enter(hold.org, Lane::Settle).await?;
            let outcome = releaser::release(&pool, &hold, false, now).await?;
            if outcome == ReleaseOutcome::Released {
                open_holds.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(outcome)
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
        let queued = match self.release_sender() {
            Some(tx) => tx.try_send(hold).map_err(|err| match err {
                mpsc::error::TrySendError::Full(hold) | mpsc::error::TrySendError::Closed(hold) => {
                    hold
                }
            }),
            None => Err(hold),
        };
        if let Err(hold) = queued {
            self.dropped_releases.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                org = %hold.org,
                hold = %hold.id,
                "release queue full; the sweeper will release the hold after its TTL"
            );
        }
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
        let pool = self.admin_pool.clone();
        let now = self.now();
        Box::pin(async move {
            if amount > MAX_CREDITS {
                return Err(out_of_range("top-up of", amount));
            }
            let amount_sql = to_sql(amount);
            match query_opt(&pool, TOP_UP, &[org.as_uuid(), &amount_sql, &now]).await {
                Ok(row) => row.as_ref().map(account_from_row).transpose(),
                Err(err) if is_out_of_range(&err) => Err(out_of_range("top-up of", amount)),
                Err(err) => Err(err),
            }
        })
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
