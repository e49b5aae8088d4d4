//! Money the dashboard asks for (docs/contract.md §12): a change to a paid plan and a top-up
//! are **requests**. A [`PaymentStep`] decides what happens to each: without a payment
//! provider ([`ManualApproval`]) it waits in the operator's Pending list, and the operator
//! approves it (applied with its ledger row: a plan change or a top-up) or declines it. The
//! requests live in a [`BillingRequests`] store, in memory or PostgreSQL.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use uuid::Uuid;

use tollgate_core::{BackendError, BoxFuture, OrgId, Plan};
use tollgate_postgres::deadpool_postgres::Pool;
use tollgate_postgres::refinery::{Migration, Runner};
use tollgate_postgres::tokio_postgres::Row;
use tollgate_postgres::{run_migrations, to_backend_error};

/// What is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ask {
    /// A change to this (paid) plan.
    PlanChange {
        /// The plan asked for.
        plan: Plan,
    },
    /// Top-up credits.
    TopUp {
        /// How many.
        amount: u64,
    },
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for the operator (or the payment provider).
    Pending,
    /// Applied.
    Approved,
    /// Declined: nothing changed.
    Declined,
}

impl RequestState {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Declined => "declined",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Pending, Self::Approved, Self::Declined]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// A request for money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingRequest {
    /// Its id.
    pub id: Uuid,
    /// The org asking.
    pub org: OrgId,
    /// What it asks for.
    pub ask: Ask,
    /// Who asked (a dashboard user's email).
    pub by: String,
    /// Where it stands.
    pub state: RequestState,
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
    /// When it was decided.
    pub decided_ms: Option<u64>,
}

/// Where requests live. Deciding is atomic: of two concurrent decisions of one request, one
/// wins, so an approval is applied once.
pub trait BillingRequests: Send + Sync + 'static {
    /// Records a pending request.
    fn create(&self, request: BillingRequest) -> BoxFuture<Result<(), BackendError>>;
    /// Every pending request, oldest first (the operator's list).
    fn pending(&self) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>>;
    /// The org's requests, newest first (at most `limit`).
    fn of_org(
        &self,
        org: OrgId,
        limit: usize,
    ) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>>;
    /// Moves a pending request to `to`; the request as it was if it was pending, `None`
    /// otherwise (decided already, or unknown).
    fn decide(
        &self,
        id: Uuid,
        to: RequestState,
        at_ms: u64,
    ) -> BoxFuture<Result<Option<BillingRequest>, BackendError>>;
    /// Puts a request taken by [`decide`](Self::decide) back to pending (its application
    /// failed).
    fn reopen(&self, id: Uuid) -> BoxFuture<Result<(), BackendError>>;
    /// Records that an approved request was applied.
    fn mark_applied(&self, id: Uuid, at_ms: u64) -> BoxFuture<Result<(), BackendError>>;
    /// Approved top-ups not known to be applied (a replica stopped between the approval and
    /// the ledger, or the ledger failed and so did the reopen), oldest first, at most `limit`.
    fn unapplied_top_ups(
        &self,
        limit: usize,
    ) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>>;
}

/// What the payment step says of a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payment {
    /// Paid: apply it now.
    Paid,
    /// Waits for the operator's approval.
    AwaitingApproval,
}

/// The step between a request and its application: a card processor would charge here.
pub trait PaymentStep: Send + Sync + 'static {
    /// Starts paying for `request`.
    fn begin(&self, request: &BillingRequest) -> BoxFuture<Result<Payment, BackendError>>;
}

/// No payment provider: every request waits for the operator.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManualApproval;

impl PaymentStep for ManualApproval {
    fn begin(&self, _: &BillingRequest) -> BoxFuture<Result<Payment, BackendError>> {
        Box::pin(std::future::ready(Ok(Payment::AwaitingApproval)))
    }
}

/// Requests in memory. Cloning shares them.
#[derive(Debug, Default, Clone)]
pub struct MemoryBillingRequests {
    inner: Arc<Mutex<HashMap<Uuid, BillingRequest>>>,
    /// Approved requests known to be applied.
    applied: Arc<Mutex<std::collections::HashSet<Uuid>>>,
}

impl MemoryBillingRequests {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<Uuid, BillingRequest>) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<Result<T, BackendError>> {
    Box::pin(std::future::ready(Ok(value)))
}

impl BillingRequests for MemoryBillingRequests {
    fn create(&self, request: BillingRequest) -> BoxFuture<Result<(), BackendError>> {
        self.with(|m| m.insert(request.id, request));
        ready(())
    }

    fn pending(&self) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>> {
        let mut list: Vec<_> = self.with(|m| {
            m.values()
                .filter(|r| r.state == RequestState::Pending)
                .cloned()
                .collect()
        });
        list.sort_by_key(|r| (r.created_ms, r.id));
        ready(list)
    }

    fn of_org(
        &self,
        org: OrgId,
        limit: usize,
    ) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>> {
        let mut list: Vec<_> =
            self.with(|m| m.values().filter(|r| r.org == org).cloned().collect());
        list.sort_by_key(|r| std::cmp::Reverse((r.created_ms, r.id)));
        list.truncate(limit);
        ready(list)
    }

    fn decide(
        &self,
        id: Uuid,
        to: RequestState,
        at_ms: u64,
    ) -> BoxFuture<Result<Option<BillingRequest>, BackendError>> {
        ready(self.with(|m| match m.get_mut(&id) {
            Some(r) if r.state == RequestState::Pending => {
                let before = r.clone();
                r.state = to;
                r.decided_ms = Some(at_ms);
                Some(before)
            }
            _ => None,
        }))
    }

    fn reopen(&self, id: Uuid) -> BoxFuture<Result<(), BackendError>> {
        self.with(|m| {
            if let Some(r) = m.get_mut(&id) {
                r.state = RequestState::Pending;
                r.decided_ms = None;
            }
        });
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        ready(())
    }

    fn mark_applied(&self, id: Uuid, _at_ms: u64) -> BoxFuture<Result<(), BackendError>> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
        ready(())
    }

    fn unapplied_top_ups(
        &self,
        limit: usize,
    ) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>> {
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut list: Vec<_> = self.with(|m| {
            m.values()
                .filter(|r| {
                    r.state == RequestState::Approved
                        && matches!(r.ask, Ask::TopUp { .. })
                        && !applied.contains(&r.id)
                })
                .cloned()
                .collect()
        });
        list.sort_by_key(|r| (r.decided_ms, r.id));
        list.truncate(limit);
        ready(list)
    }
}

/// The migration set of the billing requests (history `tollgate_gateway_billing_migrations`).
pub const MIGRATION_SET: &str = "gateway_billing";

const MIGRATIONS: &[(&str, &str)] = &[
    (
        "V1__billing_requests",
    "CREATE TABLE tollgate_billing_requests (
         id            uuid PRIMARY KEY,
         org_id        uuid NOT NULL,
         kind          text NOT NULL,
         plan          text,
         amount        bigint,
         requested_by  text NOT NULL,
         state         text NOT NULL,
         created_at_ms bigint NOT NULL,
         decided_at_ms bigint
     );
     CREATE INDEX tollgate_billing_requests_pending ON tollgate_billing_requests (created_at_ms)
         WHERE state = 'pending';
     CREATE INDEX tollgate_billing_requests_org ON tollgate_billing_requests (org_id, created_at_ms);",
    ),
    (
        // When an approved request was applied: an approved top-up without it is applied (once,
        // by its reference in the ledger) by the reconciliation. Requests approved before this
        // version were applied by it before their approval was answered.
        "V2__applied",
        "ALTER TABLE tollgate_billing_requests ADD COLUMN applied_at_ms bigint;
     UPDATE tollgate_billing_requests SET applied_at_ms = decided_at_ms WHERE state = 'approved';
     CREATE INDEX tollgate_billing_requests_unapplied ON tollgate_billing_requests (decided_at_ms)
         WHERE state = 'approved' AND applied_at_ms IS NULL;",
    ),
];

/// Requests in PostgreSQL, shared by every replica. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresBillingRequests {
    pool: Pool,
}

impl fmt::Debug for PostgresBillingRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBillingRequests")
            .finish_non_exhaustive()
    }
}

impl PostgresBillingRequests {
    /// A store on `pool`, after applying its migrations.
    pub async fn new(pool: Pool) -> Result<Self, BackendError> {
        let migrations = MIGRATIONS
            .iter()
            .map(|(name, sql)| Migration::unapplied(name, sql).map_err(to_backend_error))
            .collect::<Result<Vec<_>, _>>()?;
        run_migrations(&pool, MIGRATION_SET, Runner::new(&migrations)).await?;
        Ok(PostgresBillingRequests { pool })
    }
}

const COLUMNS: &str =
    "id, org_id, kind, plan, amount, requested_by, state, created_at_ms, decided_at_ms";

fn from_row(row: &Row) -> Result<BillingRequest, BackendError> {
    let bad = || BackendError::other("a billing request row this version cannot read");
    let kind: String = row.get(2);
    let ask = match kind.as_str() {
        "plan_change" => Ask::PlanChange {
            plan: row
                .get::<_, Option<String>>(3)
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
        },
        "top_up" => Ask::TopUp {
            amount: row
                .get::<_, Option<i64>>(4)
                .and_then(|a| u64::try_from(a).ok())
                .ok_or_else(bad)?,
        },
        _ => return Err(bad()),
    };
    Ok(BillingRequest {
        id: row.get(0),
        org: OrgId::from_uuid(row.get(1)),
        ask,
        by: row.get(5),
        state: RequestState::parse(row.get(6)).ok_or_else(bad)?,
        created_ms: u64::try_from(row.get::<_, i64>(7)).unwrap_or(0),
        decided_ms: row
            .get::<_, Option<i64>>(8)
            .map(|v| u64::try_from(v).unwrap_or(0)),
    })
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl BillingRequests for PostgresBillingRequests {
    fn create(&self, r: BillingRequest) -> BoxFuture<Result<(), BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let (kind, plan, amount) = match r.ask {
                Ask::PlanChange { plan } => ("plan_change", Some(plan.name()), None),
                Ask::TopUp { amount } => ("top_up", None, Some(ms(amount))),
            };
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "INSERT INTO tollgate_billing_requests
                         (id, org_id, kind, plan, amount, requested_by, state, created_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &r.id,
                        r.org.as_uuid(),
                        &kind,
                        &plan,
                        &amount,
                        &r.by,
                        &r.state.as_str(),
                        &ms(r.created_ms),
                    ],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(())
        })
    }

    fn pending(&self) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM tollgate_billing_requests
                         WHERE state = 'pending' ORDER BY created_at_ms, id"
                    ),
                    &[],
                )
                .await
                .map_err(to_backend_error)?;
            rows.iter().map(from_row).collect()
        })
    }

    fn of_org(
        &self,
        org: OrgId,
        limit: usize,
    ) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM tollgate_billing_requests
                         WHERE org_id = $1 ORDER BY created_at_ms DESC, id DESC LIMIT $2"
                    ),
                    &[org.as_uuid(), &(limit as i64)],
                )
                .await
                .map_err(to_backend_error)?;
            rows.iter().map(from_row).collect()
        })
    }

    fn decide(
        &self,
        id: Uuid,
        to: RequestState,
        at_ms: u64,
    ) -> BoxFuture<Result<Option<BillingRequest>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            // The row as it was: the update only matches a pending one, so one decision wins.
            let row = client
                .query_opt(
                    &format!(
                        "UPDATE tollgate_billing_requests SET state = $2, decided_at_ms = $3
                         WHERE id = $1 AND state = 'pending'
                         RETURNING {COLUMNS}"
                    ),
                    &[&id, &to.as_str(), &ms(at_ms)],
                )
                .await
                .map_err(to_backend_error)?;
            row.as_ref()
                .map(|r| {
                    from_row(r).map(|mut before| {
                        before.state = RequestState::Pending;
                        before.decided_ms = None;
                        before
                    })
                })
                .transpose()
        })
    }

    fn reopen(&self, id: Uuid) -> BoxFuture<Result<(), BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "UPDATE tollgate_billing_requests
                        SET state = 'pending', decided_at_ms = NULL, applied_at_ms = NULL
                      WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(())
        })
    }

    fn mark_applied(&self, id: Uuid, at_ms: u64) -> BoxFuture<Result<(), BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            client
                .execute(
                    "UPDATE tollgate_billing_requests SET applied_at_ms = $2
                      WHERE id = $1 AND state = 'approved'",
                    &[&id, &ms(at_ms)],
                )
                .await
                .map_err(to_backend_error)?;
            Ok(())
        })
    }

    fn unapplied_top_ups(
        &self,
        limit: usize,
    ) -> BoxFuture<Result<Vec<BillingRequest>, BackendError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(to_backend_error)?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM tollgate_billing_requests
                          WHERE state = 'approved' AND applied_at_ms IS NULL AND kind = 'top_up'
                          ORDER BY decided_at_ms, id LIMIT $1"
                    ),
                    &[&(limit as i64)],
                )
                .await
                .map_err(to_backend_error)?;
            rows.iter().map(from_row).collect()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Asking and deciding, for the dashboard.

use tollgate_core::{Clock as _, ErrorCode, Rejection, RequestId, SystemClock};

use super::admin::{apply_plan, apply_top_up_once};
use super::state::AppState;

fn backend(e: BackendError) -> Rejection {
    e.rejection()
}

/// Records `ask` of `org` (by `by`) and sends it through the payment step: applied at once
/// when paid, else pending for the operator.
pub async fn ask(
    state: &AppState,
    org: OrgId,
    ask: Ask,
    by: String,
) -> Result<BillingRequest, Rejection> {
    // One pending request of a kind at a time: a second click, or a second tab, asks nothing
    // more.
    let pending = state.billing.of_org(org, 50).await.map_err(backend)?;
    if let Some(same) = pending
        .iter()
        .find(|r| r.state == RequestState::Pending && r.ask == ask)
    {
        return Ok(same.clone());
    }
    let request = BillingRequest {
        id: Uuid::new_v4(),
        org,
        ask,
        by,
        state: RequestState::Pending,
        created_ms: SystemClock.now_ms(),
        decided_ms: None,
    };
    state
        .billing
        .create(request.clone())
        .await
        .map_err(backend)?;
    match state.payments.begin(&request).await.map_err(backend)? {
        Payment::AwaitingApproval => Ok(request),
        Payment::Paid => decide(state, request.id, true).await,
    }
}

/// Approves (applies, with its ledger row) or declines a pending request; 404 when there is
/// no such pending request.
pub async fn decide(
    state: &AppState,
    id: Uuid,
    approve: bool,
) -> Result<BillingRequest, Rejection> {
    let to = if approve {
        RequestState::Approved
    } else {
        RequestState::Declined
    };
    let now = SystemClock.now_ms();
    let Some(mut request) = state.billing.decide(id, to, now).await.map_err(backend)? else {
        return Err(Rejection::new(ErrorCode::NotFound)
            .with_message("No such pending request: it was decided already."));
    };
    if approve {
        let applied = match request.ask {
            Ask::PlanChange { plan } => apply_plan(state, request.org, plan).await,
            // Once per request: an approval whose first application failed after the ledger
            // had applied it (its answer lost) reopens the request, and approving it again
            // must not add the credits a second time.
            Ask::TopUp { amount } => apply_top_up_once(state, request.org, amount, id)
                .await
                .map(drop),
        };
        if let Err(rejection) = applied {
            // Not applied: back in the list, to be approved again or declined.
            if let Err(e) = state.billing.reopen(id).await {
                tracing::error!(request = %id, error = %e, "a billing request could not be reopened");
            }
            return Err(rejection);
        }
        if let Err(e) = state.billing.mark_applied(id, SystemClock.now_ms()).await {
            // Applied all the same; a top-up is applied again (once) by the reconciliation.
            tracing::warn!(request = %id, error = %e, "an applied billing request could not be marked applied");
        }
    }
    request.state = to;
    request.decided_ms = Some(now);
    Ok(request)
}

/// The ledger reference of billing request `id` (a UUID is a valid request id).
pub(crate) fn reference(id: Uuid) -> RequestId {
    RequestId::parse(&id.to_string()).unwrap_or_else(RequestId::generate)
}

/// Applies the approved top-ups that are not known to be applied (see
/// [`BillingRequests::unapplied_top_ups`]): each once, by its reference in the ledger, so a
/// top-up that was applied after all adds nothing. Returns how many it saw through.
pub async fn reconcile_top_ups(state: &AppState) -> Result<usize, BackendError> {
    let mut applied = 0;
    for request in state.billing.unapplied_top_ups(100).await? {
        let Ask::TopUp { amount } = request.ask else {
            continue;
        };
        match state
            .ledger
            .top_up_once(request.org, amount, reference(request.id))
            .await?
        {
            Some(_) => {
                tracing::warn!(
                    request = %request.id,
                    org = %request.org,
                    amount,
                    "an approved top-up not marked applied is applied now (the ledger applies \
                     each request once)"
                );
                applied += 1;
            }
            None => {
                tracing::error!(
                    request = %request.id,
                    org = %request.org,
                    "an approved top-up's organization has no credit account; left unapplied"
                );
                continue;
            }
        }
        state
            .billing
            .mark_applied(request.id, SystemClock.now_ms())
            .await?;
    }
    Ok(applied)
}
