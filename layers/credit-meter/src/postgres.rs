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
//!
//! Operations of one org are ordered by the lock on its account row, exactly like the
//! per-org mutex of [`MemoryLedger`](crate::MemoryLedger); different orgs never contend. The
//! two ledgers behave the same (one behaviour suite runs against both), including the
//! handling of expired holds: a hold older than the TTL is released by
//! [`sweep_expired_holds`](Ledger::sweep_expired_holds) (holds of a crashed replica), and a
//! late commit of it is charged only if `balance − held` still covers it, once.
//!
//! **Time** comes from the [`Clock`] given to the ledger (the replicas' clocks), so tests can
//! drive renewals and expiry; all replicas should run NTP.
//!
//! [`release_detached`](Ledger::release_detached) (called from `Drop`) never waits: it
//! queues the release for a background task over a bounded channel; when the queue is full the
//! hold is left to the sweeper and counted ([`PostgresLedger::detached_releases_dropped`]).
//! [`open_holds`](Ledger::open_holds) is a cached gauge: the number of open holds in the
//! database as of the last sweep (or [`refresh_open_holds`](PostgresLedger::refresh_open_holds)),
//! adjusted by this instance's own holds since.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_postgres::types::FromSql;
use tokio_postgres::Row;
use tollgate_core::{BackendError, BoxFuture, Clock, OrgId, Plan, RequestId, SharedClock};
use tollgate_postgres::to_backend_error;

use crate::ledger::{
    Account, EntryKind, Hold, HoldId, HoldOutcome, Ledger, LedgerEntry, MAX_CREDITS,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The default hold TTL: 5 minutes (as the memory ledger's), well above the default upstream
/// timeout (30 s).
const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);

/// Releases queued by [`Ledger::release_detached`] before further ones are left to the
/// sweeper.
pub const DEFAULT_RELEASE_QUEUE: usize = 1_024;

/// Expired holds released per sweep statement (a sweep runs statements until done).
const SWEEP_BATCH: i64 = 10_000;

/// First key of the advisory lock a sweep holds ("tgsw"), so replicas sweep one at a time.
/// The second key is the schema's hash.
const SWEEP_LOCK_KEY: i32 = 0x7467_7377;

/// A period end meaning "no next period" (the end of the calendar); `u64::MAX` in Rust.
const NO_NEXT_PERIOD: i64 = i64::MAX;

const HOLD: &str = "SELECT outcome, hold_id, available \
                    FROM tollgate_credit_hold($1, $2, $3, $4, $5)";
const COMMIT: &str = "SELECT outcome, balance, note FROM tollgate_credit_commit($1, $2, $3)";
const RELEASE: &str = "\
    WITH released AS ( \
        DELETE FROM tollgate_credit_holds WHERE id = $1 AND org = $2 \
        RETURNING org, amount, forget_at_ms \
    ) \
    UPDATE tollgate_credit_accounts a \
       SET held = greatest(a.held - r.amount, 0) \
      FROM released r \
     WHERE a.org = r.org AND r.forget_at_ms IS NULL \
    RETURNING a.org";
const SUBSCRIBE: &str = "SELECT * FROM tollgate_credit_subscribe($1, $2, $3, $4)";
const CANCEL: &str = "SELECT tollgate_credit_cancel($1, $2)";
const TOP_UP: &str = "SELECT * FROM tollgate_credit_top_up($1, $2, $3)";
const SET_BALANCE: &str = "SELECT * FROM tollgate_credit_set_balance($1, $2, $3)";
const ACCOUNT: &str = "SELECT * FROM tollgate_credit_account($1, $2)";
const ENTRIES: &str = "\
    SELECT at_ms, kind, delta_plan, delta_topup, balance_after, request_id \
      FROM tollgate_credit_ledger WHERE org = $1 ORDER BY id";
const DUE: &str = "\
    SELECT org FROM tollgate_credit_accounts \
     WHERE plan IS NOT NULL AND period_end_ms <= $1 AND period_end_ms <> $2 \
     ORDER BY org LIMIT $3";
const RENEW: &str = "SELECT tollgate_credit_renew($1, $2)";
// One sweeper at a time (an advisory lock for the statement's transaction): two sweeps
// updating the same accounts in different orders could deadlock. Holds being settled right
// now are skipped (they are not stuck). `open` is counted in the statement's snapshot, before
// the sweep.
const SWEEP: &str = "\
    WITH sweeper AS ( \
        SELECT pg_try_advisory_xact_lock($3, hashtext(coalesce(current_schema(), ''))) AS got \
    ), expired AS ( \
        SELECT id FROM tollgate_credit_holds \
         WHERE forget_at_ms IS NULL AND expires_at_ms <= $1 AND (SELECT got FROM sweeper) \
         ORDER BY id LIMIT $4 \
         FOR UPDATE SKIP LOCKED \
    ), swept AS ( \
        UPDATE tollgate_credit_holds h SET forget_at_ms = $2 \
          FROM expired e WHERE h.id = e.id \
        RETURNING h.org, h.amount \
    ), per_org AS ( \
        SELECT org, sum(amount) AS amount FROM swept GROUP BY org \
    ), released AS ( \
        UPDATE tollgate_credit_accounts a \
           SET held = greatest(a.held - p.amount, 0) \
          FROM per_org p WHERE a.org = p.org \
    ), forgotten AS ( \
        DELETE FROM tollgate_credit_holds \
         WHERE forget_at_ms IS NOT NULL AND forget_at_ms <= $1 AND (SELECT got FROM sweeper) \
    ) \
    SELECT (SELECT count(*) FROM swept) AS swept, \
           (SELECT count(*) FROM tollgate_credit_holds WHERE forget_at_ms IS NULL) AS open";
const OPEN_HOLDS: &str = "SELECT count(*) FROM tollgate_credit_holds WHERE forget_at_ms IS NULL";

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
    pool: Pool,
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
            pool,
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

    /// How long a hold may stay open before the sweeper releases it. Keep it longer than the
    /// slowest response (upstream timeout plus body) so live requests are never swept. Every
    /// replica should use the same value.
    pub fn with_hold_ttl(mut self, ttl: Duration) -> Self {
        self.hold_ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
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

    /// The pool the ledger uses.
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
        let client = self.pool.get().await.map_err(to_backend_error)?;
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
            runtime.spawn(release_worker(
                self.pool.clone(),
                Arc::clone(&self.open_holds),
                rx,
            ));
            tx
        }))
    }
}

/// Releases queued holds one by one until the ledger is dropped and the queue is drained.
async fn release_worker(pool: Pool, open_holds: Arc<AtomicI64>, mut rx: mpsc::Receiver<Hold>) {
    while let Some(hold) = rx.recv().await {
        match release(&pool, &hold).await {
            Ok(true) => {
                open_holds.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(
                org = %hold.org,
                hold = %hold.id,
                error = %err,
                "could not release a credit hold; the sweeper will release it after its TTL"
            ),
        }
    }
}

/// Releases one hold; `true` when it was open (not yet settled or swept).
async fn release(pool: &Pool, hold: &Hold) -> Result<bool, BackendError> {
    let Ok(id) = i64::try_from(hold.id.0) else {
        return Ok(false); // never issued by this ledger
    };
    let client = pool.get().await.map_err(to_backend_error)?;
    let stmt = client
        .prepare_cached(RELEASE)
        .await
        .map_err(to_backend_error)?;
    let rows = client
        .query(&stmt, &[&id, hold.org.as_uuid()])
        .await
        .map_err(to_backend_error)?;
    Ok(!rows.is_empty())
}

/// A `u64` time or amount as a PostgreSQL `bigint`, saturating.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A non-negative `bigint` column as `u64`.
fn from_sql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn col<'a, T: FromSql<'a>>(
    row: &'a Row,
    idx: impl tokio_postgres::row::RowIndex + fmt::Display,
) -> Result<T, BackendError> {
    row.try_get(idx).map_err(BackendError::other)
}

fn account_from_row(row: &Row) -> Result<Account, BackendError> {
    let plan: Option<String> = col(row, "plan")?;
    let plan = plan
        .map(|name| name.parse::<Plan>())
        .transpose()
        .map_err(BackendError::other)?;
    let period_end: i64 = col(row, "period_end_ms")?;
    Ok(Account {
        org: OrgId::from_uuid(col(row, "org")?),
        plan,
        plan_credits: from_sql(col(row, "plan_credits")?),
        topup_credits: from_sql(col(row, "topup_credits")?),
        held: from_sql(col(row, "held")?),
        period_start_ms: from_sql(col(row, "period_start_ms")?),
        period_end_ms: if period_end == NO_NEXT_PERIOD {
            u64::MAX
        } else {
            from_sql(period_end)
        },
    })
}

fn entry_kind(kind: &str) -> Result<EntryKind, BackendError> {
    Ok(match kind {
        "charge" => EntryKind::Charge,
        "top_up" => EntryKind::TopUp,
        "renewal" => EntryKind::Renewal,
        "plan_change" => EntryKind::PlanChange,
        "adjustment" => EntryKind::Adjustment,
        "cancel" => EntryKind::Cancel,
        other => {
            return Err(BackendError::other(format!(
                "unknown ledger row kind {other:?}"
            )))
        }
    })
}

fn out_of_range(what: &str, value: u64) -> BackendError {
    BackendError::other(format!(
        "{what} {value} is out of range: balances are limited to {MAX_CREDITS} credits"
    ))
}

/// Runs one statement returning at most one row.
async fn query_opt(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Row>, BackendError> {
    let client = pool.get().await.map_err(to_backend_error)?;
    let stmt = client.prepare_cached(sql).await.map_err(to_backend_error)?;
    client
        .query_opt(&stmt, params)
        .await
        .map_err(to_backend_error)
}

/// Runs one statement returning exactly one row.
async fn query_one(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Row, BackendError> {
    query_opt(pool, sql, params)
        .await?
        .ok_or_else(|| BackendError::other("the ledger statement returned no row"))
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
        let now = self.now();
        let expires_at = to_sql(self.clock.now_ms().saturating_add(self.hold_ttl_ms));
        let open_holds = Arc::clone(&self.open_holds);
        Box::pin(async move {
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

    fn commit(&self, hold: Hold) -> BoxFuture<Result<Option<u64>, BackendError>> {
        let pool = self.pool.clone();
        let now = self.now();
        let open_holds = Arc::clone(&self.open_holds);
        Box::pin(async move {
            let unknown = || {
                BackendError::other(format!(
                    "hold {} of org {} is unknown or already settled; nothing was charged",
                    hold.id, hold.org
                ))
            };
            let Ok(id) = i64::try_from(hold.id.0) else {
                return Err(unknown());
            };
            let row = query_one(&pool, COMMIT, &[hold.org.as_uuid(), &id, &now]).await?;
            let outcome: &str = col(&row, 0)?;
            let note: Option<&str> = col(&row, 2)?;
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
                    Ok(Some(from_sql(balance)))
                }
                "unlimited" => Ok(None),
                "expired" => Err(BackendError::other(format!(
                    "hold {} of org {} expired and was released, and the {} credits it held \
                     are no longer available; nothing was charged",
                    hold.id, hold.org, hold.amount
                ))),
                "unknown" => Err(unknown()),
                other => Err(BackendError::other(format!(
                    "unexpected commit outcome {other:?}"
                ))),
            }
        })
    }

    fn release(&self, hold: Hold) -> BoxFuture<Result<(), BackendError>> {
        let pool = self.pool.clone();
        let open_holds = Arc::clone(&self.open_holds);
        Box::pin(async move {
            if release(&pool, &hold).await? {
                open_holds.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(())
        })
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
        let pool = self.pool.clone();
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
        let pool = self.pool.clone();
        let now = self.now();
        Box::pin(async move {
            let row = query_one(&pool, CANCEL, &[org.as_uuid(), &now]).await?;
            col(&row, 0)
        })
    }

    fn top_up(&self, org: OrgId, amount: u64) -> BoxFuture<Result<Option<Account>, BackendError>> {
        let pool = self.pool.clone();
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
        let pool = self.pool.clone();
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
        let pool = self.pool.clone();
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
        let pool = self.pool.clone();
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
        let pool = self.pool.clone();
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

fn is_out_of_range(err: &BackendError) -> bool {
    use std::error::Error as _;
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(db) = e
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::as_db_error)
        {
            return *db.code() == tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE;
        }
        source = e.source();
    }
    false
}
