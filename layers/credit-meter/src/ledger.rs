//! The [`Ledger`] trait: balances, holds and the append-only ledger of every balance change.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use std::collections::HashMap;
use tollgate_core::time::rfc3339_from_ms;

use tollgate_core::{BackendError, BoxFuture, KeyId, OrgId, Plan, RequestId};

/// The largest balance (and single amount) a ledger accepts: the range of a signed 64-bit
/// integer, so every balance change fits a ledger row's `i64` deltas (and a PostgreSQL
/// `bigint`).
pub const MAX_CREDITS: u64 = i64::MAX as u64;

/// The id of a credit hold, unique within a ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct HoldId(pub u64);

impl fmt::Display for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Credits set aside for one request in flight: they count against the org's available
/// balance until the hold is committed (charged) or released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The hold's id.
    pub id: HoldId,
    /// The org whose credits are held.
    pub org: OrgId,
    /// Credits held (the route's cost).
    pub amount: u64,
}

/// The API key a hold is for, and that key's own credit limit per billing period
/// (docs/contract.md §13). The ledger counts what each key spends in the org's current period
/// ([`Ledger::key_spend`]); a hold that would take a key past its limit — what the key spent
/// in the period plus its open holds plus this one — is refused with
/// [`HoldOutcome::KeyLimit`], atomically with the org's own balance check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyBudget {
    /// The key.
    pub key: KeyId,
    /// The most credits it may spend per period; `None`: no limit of its own.
    pub limit: Option<u64>,
}

/// The answer to [`Ledger::hold`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// The credits are held; commit or release the hold exactly once.
    Held(Hold),
    /// The org is on an unlimited plan: nothing is held and nothing will be charged.
    Unlimited,
    /// `balance − held` is below the amount asked for.
    Insufficient {
        /// Credits that could have been held (`balance − held`).
        available: u64,
    },
    /// The org was never subscribed or has cancelled.
    NoSubscription,
    /// The key's credit limit for the period leaves less than the amount asked for (checked
    /// before the org's balance; see [`Ledger::hold_for_key`]).
    KeyLimit {
        /// Credits the key could still have held (`limit − spent − held by the key`).
        available: u64,
    },
}

/// What [`Ledger::commit`] did with a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The hold was charged.
    Charged {
        /// Credits taken from the balance: the hold's amount, or what was left when support
        /// lowered the balance while the hold was open; 0 on an unlimited plan.
        charged: u64,
        /// The balance after the charge; `None` on an unlimited plan.
        balance: Option<u64>,
    },
    /// The hold had expired and been released by the sweeper, and the credits it held are no
    /// longer available: nothing was charged.
    Expired,
    /// No such hold (never made, or already settled): nothing was charged.
    Unknown,
}

/// What [`Ledger::release`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The hold was open: its credits are available again.
    Released,
    /// The hold had already expired and been released by the sweeper.
    Swept,
    /// The hold was committed (after a commit whose answer was lost, this says it was
    /// applied): nothing changed.
    Committed {
        /// Credits the commit took.
        charged: u64,
    },
    /// No such hold: released before, forgotten, or never made.
    Gone,
}

/// An org's credit account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    /// The org.
    pub org: OrgId,
    /// The active plan; `None` when the org cancelled.
    pub plan: Option<Plan>,
    /// Plan credits left in this period (reset to the plan's monthly credits at each renewal).
    pub plan_credits: u64,
    /// Top-up credits left (kept until spent).
    pub topup_credits: u64,
    /// Credits held by requests in flight.
    pub held: u64,
    /// Start of the current billing period (ms since the epoch).
    pub period_start_ms: u64,
    /// End of the current billing period (ms since the epoch): the next renewal.
    pub period_end_ms: u64,
}

impl Account {
    /// Whether the org's plan never runs out of credits.
    pub fn is_unlimited(&self) -> bool {
        self.plan.is_some_and(Plan::is_unlimited)
    }

    /// `plan_credits + topup_credits`; `None` on an unlimited plan.
    pub fn balance(&self) -> Option<u64> {
        (!self.is_unlimited()).then(|| self.plan_credits.saturating_add(self.topup_credits))
    }

    /// What a new hold may take: `balance − held`; `None` on an unlimited plan.
    pub fn available(&self) -> Option<u64> {
        self.balance().map(|b| b.saturating_sub(self.held))
    }

    /// The body of `GET /api/credits` (docs/contract.md §8).
    pub fn credits_view(&self) -> CreditsView {
        CreditsView {
            plan: self.plan,
            balance: self.balance(),
            plan_credits: self.plan_credits,
            topup_credits: self.topup_credits,
            period_end: self.plan.map(|_| rfc3339_from_ms(self.period_end_ms)),
        }
    }
}

/// `GET /api/credits`: `{plan, balance, plan_credits, topup_credits, period_end}`; `balance` is
/// null on an unlimited plan, `plan` and `period_end` are null when the org has cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreditsView {
    /// The active plan.
    pub plan: Option<Plan>,
    /// `plan_credits + topup_credits`; null on an unlimited plan.
    pub balance: Option<u64>,
    /// Plan credits left in this period.
    pub plan_credits: u64,
    /// Top-up credits left.
    pub topup_credits: u64,
    /// End of the current period, RFC 3339.
    pub period_end: Option<String>,
}

/// What changed an org's balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A committed hold: a 2xx response delivered whole.
    Charge,
    /// Credits bought (admin top-up).
    TopUp,
    /// A new billing period: plan credits reset to the plan's monthly credits.
    Renewal,
    /// Subscribed or changed plan: a new period starts with the plan's monthly credits.
    PlanChange,
    /// Support set the balance (plan credits = balance, top-ups = 0).
    Adjustment,
    /// The subscription was cancelled: plan credits are gone, top-ups stay.
    Cancel,
    /// A charge given back: its commit was applied, but the response was withheld from the
    /// client (the commit's answer was lost, or the client left while it was being made).
    Refund,
}

/// One row of the append-only ledger. Replaying `delta_plan` and `delta_topup` from zero gives
/// `balance_after` (= plan credits + top-up credits) after every row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    /// When the change happened (ms since the epoch; a renewal is dated at its period
    /// boundary).
    pub at_ms: u64,
    /// The org.
    pub org: OrgId,
    /// What changed the balance.
    pub kind: EntryKind,
    /// Change of the plan credits.
    pub delta_plan: i64,
    /// Change of the top-up credits.
    pub delta_topup: i64,
    /// Plan credits + top-up credits after the change.
    pub balance_after: u64,
    /// The request that was charged (charges) or refunded (refunds), or the reference of a
    /// [`top_up_once`](Ledger::top_up_once).
    pub request_id: Option<String>,
}

/// Where credits live: balances, holds and the ledger of every change.
///
/// Object-safe (`Arc<dyn Ledger>`); every async method returns a [`BoxFuture`]. Holds must be
/// atomic: two holds racing for the last credits cannot both succeed.
pub trait Ledger: Send + Sync + 'static {
    /// Holds `amount` credits of `org` for one request (renewing the period first if it is
    /// over). `request_id` is recorded on the charge row if the hold is committed. The hold
    /// is for no key in particular: see [`hold_for_key`](Ledger::hold_for_key).
    fn hold(
        &self,
        org: OrgId,
        amount: u64,
        request_id: Option<RequestId>,
    ) -> BoxFuture<Result<HoldOutcome, BackendError>> {
        self.hold_for_key(org, amount, request_id, None)
    }

    /// [`hold`](Ledger::hold) on behalf of a key: what a commit of the hold charges counts
    /// as spent by `budget.key` in the current period ([`key_spend`](Ledger::key_spend)),
    /// and with `budget.limit` the hold is refused with [`HoldOutcome::KeyLimit`] when the
    /// key's spend, its open holds and `amount` together would pass the limit. The key limit
    /// is checked first, then the org's balance, in one atomic step. A key limit counts
    /// credits charged, and an unlimited plan charges none: there it never binds.
    fn hold_for_key(
        &self,
        org: OrgId,
        amount: u64,
        request_id: Option<RequestId>,
        budget: Option<KeyBudget>,
    ) -> BoxFuture<Result<HoldOutcome, BackendError>>;

    /// Credits each of `keys` (keys of `org`) has been charged in the org's current billing
    /// period (renewed first if over), net of refunds; keys that spent nothing are absent.
    fn key_spend(
        &self,
        org: OrgId,
        keys: Vec<KeyId>,
    ) -> BoxFuture<Result<HashMap<KeyId, u64>, BackendError>>;

    /// Charges a hold (plan credits first, then top-ups) and says what was taken.
    /// Committing an unknown or already settled hold charges nothing
    /// ([`CommitOutcome::Unknown`]). An `Err` means the outcome is not known (the ledger
    /// failed or its answer was lost): [`release`](Ledger::release) the hold to settle it
    /// either way — it answers [`ReleaseOutcome::Committed`] if the commit was applied after
    /// all. A committed hold is remembered for one hold TTL.
    fn commit(&self, hold: Hold) -> BoxFuture<Result<CommitOutcome, BackendError>>;

    /// Gives a hold's credits back without charging, and says what had become of it. A
    /// committed hold stays charged. Releasing twice is harmless.
    fn release(&self, hold: Hold) -> BoxFuture<Result<ReleaseOutcome, BackendError>>;

    /// Gives a hold back without waiting, for a request whose response did not reach the
    /// client (called from `Drop`, and when a settlement could not be confirmed): an open
    /// hold is released, and a hold that was committed after all (its commit's answer was
    /// lost) is refunded, once, with a [`EntryKind::Refund`] row. In-memory ledgers do it at
    /// once; remote ones queue it and retry until it lands. Holds also expire on their own
    /// ([`Ledger::sweep_expired_holds`]).
    fn release_detached(&self, hold: Hold);

    /// Pushes the expiry of each of `holds` that is still open to one hold TTL from now:
    /// what keeps the holds of requests still in flight from being swept, however long they
    /// take. Returns how many were still open.
    fn extend_holds(&self, holds: Vec<Hold>) -> BoxFuture<Result<usize, BackendError>>;

    /// How long a hold that nobody extends stays open before the sweeper releases it.
    fn hold_ttl(&self) -> Duration;

    /// Subscribes `org` to `plan` or changes its plan: a new period starts now, plan credits
    /// become the plan's monthly credits, top-ups are kept. Subscribing an org to the plan it
    /// is already on changes nothing (no new period, no ledger row), so a retried
    /// subscription is safe.
    fn subscribe(&self, org: OrgId, plan: Plan) -> BoxFuture<Result<Account, BackendError>>;

    /// Cancels the subscription (plan credits are dropped, top-ups kept). `false` when the org
    /// is unknown or had no active subscription.
    fn cancel(&self, org: OrgId) -> BoxFuture<Result<bool, BackendError>>;

    /// Adds top-up credits. `None`: unknown org.
    fn top_up(&self, org: OrgId, amount: u64) -> BoxFuture<Result<Option<Account>, BackendError>>;

    /// Adds top-up credits once per `reference` (a payment's or a billing request's id): a
    /// repeat with a reference the ledger has applied already changes nothing and returns the
    /// account as it is, so a top-up whose answer was lost (a commit that failed ambiguously,
    /// a crash after it) can be retried without adding the credits twice. The ledger row
    /// carries the reference as its `request_id`. `None`: unknown org.
    fn top_up_once(
        &self,
        org: OrgId,
        amount: u64,
        reference: RequestId,
    ) -> BoxFuture<Result<Option<Account>, BackendError>>;

    /// Support adjustment: plan credits = `balance`, top-up credits = 0. `None`: unknown org.
    fn set_balance(
        &self,
        org: OrgId,
        balance: u64,
    ) -> BoxFuture<Result<Option<Account>, BackendError>>;

    /// The org's account, renewed first if its period is over. `None`: unknown org.
    fn account(&self, org: OrgId) -> BoxFuture<Result<Option<Account>, BackendError>>;

    /// The org's ledger rows, oldest first.
    fn entries(&self, org: OrgId) -> BoxFuture<Result<Vec<LedgerEntry>, BackendError>>;

    /// Renews every account whose period is over (the periodic job). Returns how many
    /// accounts were renewed.
    fn renew_due(&self) -> BoxFuture<Result<usize, BackendError>>;

    /// Releases holds older than the hold TTL (left by a crashed or stuck process). Returns
    /// how many were released.
    fn sweep_expired_holds(&self) -> BoxFuture<Result<usize, BackendError>>;

    /// Holds currently open (a gauge for `/metrics`).
    fn open_holds(&self) -> u64;
}

impl<T: Ledger + ?Sized> Ledger for Arc<T> {
    fn hold_for_key(
        &self,
        org: OrgId,
        amount: u64,
        request_id: Option<RequestId>,
        budget: Option<KeyBudget>,
    ) -> BoxFuture<Result<HoldOutcome, BackendError>> {
        (**self).hold_for_key(org, amount, request_id, budget)
    }

    fn key_spend(
        &self,
        org: OrgId,
        keys: Vec<KeyId>,
    ) -> BoxFuture<Result<HashMap<KeyId, u64>, BackendError>> {
        (**self).key_spend(org, keys)
    }

    fn commit(&self, hold: Hold) -> BoxFuture<Result<CommitOutcome, BackendError>> {
        (**self).commit(hold)
    }

    fn release(&self, hold: Hold) -> BoxFuture<Result<ReleaseOutcome, BackendError>> {
        (**self).release(hold)
    }

    fn release_detached(&self, hold: Hold) {
        (**self).release_detached(hold)
    }

    fn extend_holds(&self, holds: Vec<Hold>) -> BoxFuture<Result<usize, BackendError>> {
        (**self).extend_holds(holds)
    }

    fn hold_ttl(&self) -> Duration {
        (**self).hold_ttl()
    }

    fn subscribe(&self, org: OrgId, plan: Plan) -> BoxFuture<Result<Account, BackendError>> {
        (**self).subscribe(org, plan)
    }

    fn cancel(&self, org: OrgId) -> BoxFuture<Result<bool, BackendError>> {
        (**self).cancel(org)
    }

    fn top_up(&self, org: OrgId, amount: u64) -> BoxFuture<Result<Option<Account>, BackendError>> {
        (**self).top_up(org, amount)
    }
    fn top_up_once(
        &self,
        org: OrgId,
        amount: u64,
        reference: RequestId,
    ) -> BoxFuture<Result<Option<Account>, BackendError>> {
        (**self).top_up_once(org, amount, reference)
    }

    fn set_balance(
        &self,
        org: OrgId,
        balance: u64,
    ) -> BoxFuture<Result<Option<Account>, BackendError>> {
        (**self).set_balance(org, balance)
    }

    fn account(&self, org: OrgId) -> BoxFuture<Result<Option<Account>, BackendError>> {
        (**self).account(org)
    }

    fn entries(&self, org: OrgId) -> BoxFuture<Result<Vec<LedgerEntry>, BackendError>> {
        (**self).entries(org)
    }

    fn renew_due(&self) -> BoxFuture<Result<usize, BackendError>> {
        (**self).renew_due()
    }

    fn sweep_expired_holds(&self) -> BoxFuture<Result<usize, BackendError>> {
        (**self).sweep_expired_holds()
    }

    fn open_holds(&self) -> u64 {
        (**self).open_holds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(plan: Option<Plan>, plan_credits: u64, topup: u64, held: u64) -> Account {
        Account {
            org: OrgId::new(),
            plan,
            plan_credits,
            topup_credits: topup,
            held,
            period_start_ms: 1_675_150_502_748,
            period_end_ms: 1_677_569_702_748,
        }
    }

    #[test]
    fn balance_and_available() {
        let a = account(Some(Plan::Basic), 10, 5, 3);
        assert_eq!(a.balance(), Some(15));
        assert_eq!(a.available(), Some(12));
        let over = account(Some(Plan::Free), 1, 0, 4);
        assert_eq!(over.available(), Some(0));
        let unlimited = account(Some(Plan::Enterprise), 0, 7, 0);
        assert_eq!(unlimited.balance(), None);
        assert_eq!(unlimited.available(), None);
    }

    #[test]
    fn credits_view_has_the_contract_shape() {
        let a = account(Some(Plan::Basic), 990, 50, 0);
        assert_eq!(
            serde_json::to_value(a.credits_view()).unwrap(),
            serde_json::json!({
                "plan": "basic",
                "balance": 1040,
                "plan_credits": 990,
                "topup_credits": 50,
                "period_end": "2023-02-28T07:35:02.748Z"
            })
        );
        let e = account(Some(Plan::Enterprise), 0, 0, 0);
        assert_eq!(
            serde_json::to_value(e.credits_view()).unwrap()["balance"],
            serde_json::Value::Null
        );
        let cancelled = account(None, 0, 20, 0);
        assert_eq!(
            serde_json::to_value(cancelled.credits_view()).unwrap(),
            serde_json::json!({
                "plan": null,
                "balance": 20,
                "plan_credits": 0,
                "topup_credits": 20,
                "period_end": null
            })
        );
    }

    #[test]
    fn entry_kinds_serialize_in_snake_case() {
        assert_eq!(
            serde_json::to_string(&EntryKind::TopUp).unwrap(),
            "\"top_up\""
        );
        assert_eq!(
            serde_json::to_string(&EntryKind::PlanChange).unwrap(),
            "\"plan_change\""
        );
    }
}
