//! [`MemoryLedger`]: a real in-memory [`Ledger`] for one process (tests, the demo gateway,
//! single-replica deployments).
//!
//! Each org has its own book behind its own mutex, so holds and charges of one org are atomic
//! with respect to each other while different orgs never contend. Every operation that can
//! change a balance first renews the org's period if it is over, so a request right after the
//! period end already sees the new plan credits.
//!
//! **Expired holds.** A hold that nobody [extends](Ledger::extend_holds) for the hold TTL
//! (default 5 minutes) is released by [`Ledger::sweep_expired_holds`]. If the request it
//! belonged to later succeeds after all, its commit re-checks the balance: it is charged only
//! if `balance − held` still covers it (the credits were given back and may have been held by
//! another request meanwhile), otherwise the commit answers [`CommitOutcome::Expired`] and
//! nothing is charged, so the balance can never go below zero and a hold is never charged
//! twice. A swept hold is remembered for one more TTL; a commit arriving later still charges
//! nothing.
//!
//! **Admin changes under holds.** If support lowers a balance, the plan changes or the org
//! cancels while holds are open, a later commit charges at most what is left (plan credits
//! first) and the rows record exactly what was taken.
//!
//! The ledger rows are kept in memory for the life of the process (append-only).

use std::collections::HashMap;
use std::fmt;
use std::future::ready;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tollgate_core::time::add_one_month_ms;
use tollgate_core::{
    BackendError, BoxFuture, Clock, KeyId, OrgId, Plan, RequestId, SharedClock, SystemClock,
};

use crate::ledger::{
    Account, CommitOutcome, EntryKind, Hold, HoldId, HoldOutcome, KeyBudget, Ledger, LedgerEntry,
    ReleaseOutcome, MAX_CREDITS,
};

/// Periods replayed one by one after an idle gap (100 years); past that the period restarts.
const MAX_CATCH_UP: usize = 1_200;

/// The default hold TTL: 5 minutes, well above the default upstream timeout (30 s).
pub const DEFAULT_HOLD_TTL: Duration = Duration::from_secs(5 * 60);

/// An in-memory [`Ledger`]. Share it with `Arc` (`Arc<MemoryLedger>` is a `Ledger` too).
pub struct MemoryLedger {
    clock: SharedClock,
    hold_ttl_ms: u64,
    books: RwLock<HashMap<OrgId, Arc<Mutex<Book>>>>,
    next_hold: AtomicU64,
    open_holds: AtomicU64,
}

struct HoldRecord {
    amount: u64,
    request_id: Option<RequestId>,
    expires_at_ms: u64,
    key: Option<KeyId>,
}

struct SweptHold {
    amount: u64,
    request_id: Option<RequestId>,
    forget_at_ms: u64,
    key: Option<KeyId>,
}

/// A committed hold, remembered for one TTL: what it took from each pot.
struct CommittedHold {
    from_plan: u64,
    from_topup: u64,
    request_id: Option<RequestId>,
    forget_at_ms: u64,
    key: Option<KeyId>,
}

/// One org's account, open holds and ledger rows.
struct Book {
    org: OrgId,
    plan: Option<Plan>,
    plan_credits: u64,
    topup_credits: u64,
    held: u64,
    period_start_ms: u64,
    period_end_ms: u64,
    holds: HashMap<HoldId, HoldRecord>,
    swept: HashMap<HoldId, SweptHold>,
    committed: HashMap<HoldId, CommittedHold>,
    /// Credits each key was charged in the current period (cleared when a period starts).
    key_spent: HashMap<KeyId, u64>,
    /// Credits each key has in open holds.
    key_held: HashMap<KeyId, u64>,
    /// The newest [`MAX_ENTRIES_PER_ORG`] ledger rows.
    entries: std::collections::VecDeque<LedgerEntry>,
    /// References of the top-ups applied by [`Ledger::top_up_once`] (operator-approved, so
    /// few; kept for the life of the process).
    applied: std::collections::HashSet<RequestId>,
}

/// Ledger rows the memory ledger keeps per org, newest first out last: a process that runs
/// for months must not grow without bound (the PostgreSQL ledger keeps every row).
pub const MAX_ENTRIES_PER_ORG: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock cannot leave a book half-updated (every update
    // is a few plain assignments), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `new − old` as a ledger delta. Both are at most [`MAX_CREDITS`], so it always fits.
fn delta(new: u64, old: u64) -> i64 {
    let d = i128::from(new) - i128::from(old);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

fn out_of_range(what: &str, value: u64) -> BackendError {
    BackendError::other(format!(
        "{what} {value} is out of range: balances are limited to {MAX_CREDITS} credits"
    ))
}

impl Book {
    fn new(org: OrgId) -> Self {
        Book {
            org,
            plan: None,
            plan_credits: 0,
            topup_credits: 0,
            held: 0,
            period_start_ms: 0,
            period_end_ms: 0,
            holds: HashMap::new(),
            swept: HashMap::new(),
            committed: HashMap::new(),
            key_spent: HashMap::new(),
            key_held: HashMap::new(),
            entries: std::collections::VecDeque::new(),
            applied: std::collections::HashSet::new(),
        }
    }

    /// Adds `amount` to (or with `add == false`, takes it from) `key`'s tally in `map`,
    /// dropping tallies that reach zero.
    fn tally(map: &mut HashMap<KeyId, u64>, key: Option<KeyId>, amount: u64, add: bool) {
        let Some(key) = key else { return };
        if amount == 0 {
            return;
        }
        let entry = map.entry(key).or_insert(0);
        *entry = if add {
            entry.saturating_add(amount)
        } else {
            entry.saturating_sub(amount)
        };
        if *entry == 0 {
            map.remove(&key);
        }
    }

    /// A new period started: no key has spent anything in it yet.
    fn period_started(&mut self) {
        self.key_spent.clear();
    }

    fn balance(&self) -> u64 {
        self.plan_credits.saturating_add(self.topup_credits)
    }

    fn is_unlimited(&self) -> bool {
        self.plan.is_some_and(Plan::is_unlimited)
    }

    fn account(&self) -> Account {
        Account {
            org: self.org,
            plan: self.plan,
            plan_credits: self.plan_credits,
            topup_credits: self.topup_credits,
            held: self.held,
            period_start_ms: self.period_start_ms,
            period_end_ms: self.period_end_ms,
        }
    }

    fn record(
        &mut self,
        at_ms: u64,
        kind: EntryKind,
        delta_plan: i64,
        delta_topup: i64,
        request_id: Option<RequestId>,
    ) {
        let entry = LedgerEntry {
            at_ms,
            org: self.org,
            kind,
            delta_plan,
            delta_topup,
            balance_after: self.balance(),
            request_id: request_id.map(|id| id.as_str().to_owned()),
        };
        if self.entries.len() >= MAX_ENTRIES_PER_ORG {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    /// Starts every period that has ended by `now`, one ledger row each; returns how many.
    fn renew(&mut self, now: u64) -> usize {
        let Some(plan) = self.plan else { return 0 };
        let fresh = plan.monthly_credits().unwrap_or(0);
        let mut renewed = 0;
        // `u64::MAX`: the calendar has no next period.
        while self.period_end_ms != u64::MAX && now >= self.period_end_ms {
            let start = if renewed < MAX_CATCH_UP {
                self.period_end_ms
            } else {
                // The clock jumped by more than a century: start the period now rather than
                // replaying every month in between.
                tracing::warn!(org = %self.org, "clock jumped far ahead; billing period restarted now");
                now
            };
            let end = add_one_month_ms(start);
            let d = delta(fresh, self.plan_credits);
            self.period_start_ms = start;
            self.plan_credits = fresh;
            // Dated at the boundary: that is when the new period (and its credits) began.
            self.record(start, EntryKind::Renewal, d, 0, None);
            renewed += 1;
            if end <= start {
                // Past the end of the calendar: there is no next period.
                self.period_end_ms = u64::MAX;
                break;
            }
            self.period_end_ms = end;
        }
        if renewed > 0 {
            self.period_started();
        }
        renewed
    }

    /// Charges hold `id` `amount` (at most the balance): plan credits first, then top-ups,
    /// and remembers what it took for one TTL (until `forget_at_ms`). Returns the amount.
    fn charge(
        &mut self,
        id: HoldId,
        now: u64,
        forget_at_ms: u64,
        amount: u64,
        request_id: Option<RequestId>,
        key: Option<KeyId>,
    ) -> u64 {
        let amount = amount.min(self.balance());
        Self::tally(&mut self.key_spent, key, amount, true);
        let from_plan = amount.min(self.plan_credits);
        let from_topup = amount - from_plan;
        if amount > 0 {
            self.plan_credits -= from_plan;
            self.topup_credits -= from_topup;
            self.record(
                now,
                EntryKind::Charge,
                delta(0, from_plan),
                delta(0, from_topup),
                request_id.clone(),
            );
        }
        self.committed.insert(
            id,
            CommittedHold {
                from_plan,
                from_topup,
                request_id,
                forget_at_ms,
                key,
            },
        );
        amount
    }

    /// Gives a committed hold's charge back (a refund row), once.
    fn refund(&mut self, now: u64, id: HoldId) -> bool {
        let Some(c) = self.committed.remove(&id) else {
            return false;
        };
        Self::tally(
            &mut self.key_spent,
            c.key,
            c.from_plan + c.from_topup,
            false,
        );
        if c.from_plan + c.from_topup > 0 {
            self.plan_credits = self
                .plan_credits
                .saturating_add(c.from_plan)
                .min(MAX_CREDITS);
            self.topup_credits = self
                .topup_credits
                .saturating_add(c.from_topup)
                .min(MAX_CREDITS);
            self.record(
                now,
                EntryKind::Refund,
                delta(c.from_plan, 0),
                delta(c.from_topup, 0),
                c.request_id,
            );
        }
        true
    }
}

impl MemoryLedger {
    /// An empty ledger reading time from `clock`, with the [default hold
    /// TTL](DEFAULT_HOLD_TTL).
    pub fn new(clock: impl Clock) -> Self {
        MemoryLedger {
            clock: Arc::new(clock),
            hold_ttl_ms: DEFAULT_HOLD_TTL.as_millis() as u64,
            books: RwLock::new(HashMap::new()),
            next_hold: AtomicU64::new(1),
            open_holds: AtomicU64::new(0),
        }
    }

    /// How long a hold may stay open before the sweeper releases it. Keep it longer than the
    /// slowest response (upstream timeout plus body) so live requests are never swept.
    pub fn with_hold_ttl(mut self, ttl: Duration) -> Self {
        self.hold_ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The hold TTL.
    pub fn hold_ttl(&self) -> Duration {
        Duration::from_millis(self.hold_ttl_ms)
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn book(&self, org: OrgId) -> Option<Arc<Mutex<Book>>> {
        self.books
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&org)
            .cloned()
    }

    fn book_or_new(&self, org: OrgId) -> Arc<Mutex<Book>> {
        if let Some(book) = self.book(org) {
            return book;
        }
        let mut books = self.books.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            books
                .entry(org)
                .or_insert_with(|| Arc::new(Mutex::new(Book::new(org)))),
        )
    }

    fn all_books(&self) -> Vec<Arc<Mutex<Book>>> {
        self.books
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn hold_now(
        &self,
        org: OrgId,
        amount: u64,
        request_id: Option<RequestId>,
        budget: Option<KeyBudget>,
    ) -> HoldOutcome {
        let Some(book) = self.book(org) else {
            return HoldOutcome::NoSubscription;
        };
        let now = self.now();
        let mut b = lock(&book);
        b.renew(now);
        match b.plan {
            None => HoldOutcome::NoSubscription,
            Some(plan) if plan.is_unlimited() => HoldOutcome::Unlimited,
            Some(_) => {
                let key = budget.map(|b| b.key);
                if let Some(KeyBudget {
                    key,
                    limit: Some(limit),
                }) = budget
                {
                    let used = b
                        .key_spent
                        .get(&key)
                        .copied()
                        .unwrap_or(0)
                        .saturating_add(b.key_held.get(&key).copied().unwrap_or(0));
                    let left = limit.saturating_sub(used);
                    if left < amount {
                        return HoldOutcome::KeyLimit { available: left };
                    }
                }
                let available = b.balance().saturating_sub(b.held);
                if available < amount {
                    return HoldOutcome::Insufficient { available };
                }
                let id = HoldId(self.next_hold.fetch_add(1, Ordering::Relaxed));
                b.held += amount;
                Book::tally(&mut b.key_held, key, amount, true);
                b.holds.insert(
                    id,
                    HoldRecord {
                        amount,
                        request_id,
                        expires_at_ms: now.saturating_add(self.hold_ttl_ms),
                        key,
                    },
                );
                self.open_holds.fetch_add(1, Ordering::Relaxed);
                HoldOutcome::Held(Hold { id, org, amount })
            }
        }
    }

    fn commit_now(&self, hold: &Hold) -> CommitOutcome {
        let Some(book) = self.book(hold.org) else {
            return CommitOutcome::Unknown;
        };
        let now = self.now();
        let mut b = lock(&book);
        b.renew(now);
        let forget_at_ms = now.saturating_add(self.hold_ttl_ms);
        if let Some(rec) = b.holds.remove(&hold.id) {
            b.held = b.held.saturating_sub(rec.amount);
            Book::tally(&mut b.key_held, rec.key, rec.amount, false);
            self.open_holds.fetch_sub(1, Ordering::Relaxed);
            if b.is_unlimited() {
                // Upgraded to an unlimited plan while the request was in flight.
                b.charge(hold.id, now, forget_at_ms, 0, None, None);
                return CommitOutcome::Charged {
                    charged: 0,
                    balance: None,
                };
            }
            if rec.amount > b.balance() {
                tracing::warn!(
                    org = %hold.org,
                    hold = %hold.id,
                    amount = rec.amount,
                    balance = b.balance(),
                    "the balance was lowered while the hold was open; charging what is left"
                );
            }
            let charged = b.charge(
                hold.id,
                now,
                forget_at_ms,
                rec.amount,
                rec.request_id,
                rec.key,
            );
            return CommitOutcome::Charged {
                charged,
                balance: Some(b.balance()),
            };
        }
        if let Some(swept) = b.swept.remove(&hold.id) {
            if b.is_unlimited() {
                b.charge(hold.id, now, forget_at_ms, 0, None, None);
                return CommitOutcome::Charged {
                    charged: 0,
                    balance: None,
                };
            }
            let available = b.balance().saturating_sub(b.held);
            if available < swept.amount {
                return CommitOutcome::Expired;
            }
            tracing::warn!(
                org = %hold.org,
                hold = %hold.id,
                "committing a hold that had expired and was released; charged after re-checking the balance"
            );
            let charged = b.charge(
                hold.id,
                now,
                forget_at_ms,
                swept.amount,
                swept.request_id,
                swept.key,
            );
            return CommitOutcome::Charged {
                charged,
                balance: Some(b.balance()),
            };
        }
        CommitOutcome::Unknown
    }

    /// Releases `hold`; with `refund`, a committed hold is refunded instead of kept.
    fn release_now(&self, hold: &Hold, refund: bool) -> ReleaseOutcome {
        let Some(book) = self.book(hold.org) else {
            return ReleaseOutcome::Gone;
        };
        let now = self.now();
        let mut b = lock(&book);
        if let Some(rec) = b.holds.remove(&hold.id) {
            b.held = b.held.saturating_sub(rec.amount);
            Book::tally(&mut b.key_held, rec.key, rec.amount, false);
            self.open_holds.fetch_sub(1, Ordering::Relaxed);
            ReleaseOutcome::Released
        } else if b.swept.remove(&hold.id).is_some() {
            // Forgotten, so a stray commit cannot charge it later.
            ReleaseOutcome::Swept
        } else if let Some(c) = b.committed.get(&hold.id) {
            let charged = c.from_plan + c.from_topup;
            if refund {
                b.refund(now, hold.id);
            }
            ReleaseOutcome::Committed { charged }
        } else {
            ReleaseOutcome::Gone
        }
    }

    fn extend_now(&self, holds: &[Hold]) -> usize {
        let expires_at_ms = self.now().saturating_add(self.hold_ttl_ms);
        let mut open = 0;
        for hold in holds {
            let Some(book) = self.book(hold.org) else {
                continue;
            };
            let mut b = lock(&book);
            if let Some(rec) = b.holds.get_mut(&hold.id) {
                rec.expires_at_ms = rec.expires_at_ms.max(expires_at_ms);
                open += 1;
            }
        }
        open
    }

    fn subscribe_now(&self, org: OrgId, plan: Plan) -> Account {
        let book = self.book_or_new(org);
        let now = self.now();
        let mut b = lock(&book);
        b.renew(now);
        if b.plan == Some(plan) {
            // Already on this plan: a retried subscription starts no new period.
            return b.account();
        }
        let fresh = plan.monthly_credits().unwrap_or(0);
        let d = delta(fresh, b.plan_credits);
        b.plan = Some(plan);
        b.plan_credits = fresh;
        b.period_start_ms = now;
        b.period_end_ms = add_one_month_ms(now);
        b.period_started();
        b.record(now, EntryKind::PlanChange, d, 0, None);
        b.account()
    }

    fn cancel_now(&self, org: OrgId) -> bool {
        let Some(book) = self.book(org) else {
            return false;
        };
        let now = self.now();
        let mut b = lock(&book);
        b.renew(now);
        if b.plan.is_none() {
            return false;
        }
        let d = delta(0, b.plan_credits);
        b.plan = None;
        b.plan_credits = 0;
        b.record(now, EntryKind::Cancel, d, 0, None);
        true
    }

    fn top_up_now(&self, org: OrgId, amount: u64) -> Result<Option<Account>, BackendError> {
        let Some(book) = self.book(org) else {
            return Ok(None);
        };
        let now = self.now();
        let mut b = lock(&book);
        b.renew(now);
        if b.balance()
            .checked_add(amount)
            .is_none_or(|total| total > MAX_CREDITS)
        {
            return Err(out_of_range("top-up of", amount));
        }
        if amount > 0 {
            b.topup_credits += amount;
            b.record(now, EntryKind::TopUp, 0, delta(amount, 0), None);
        }
        Ok(Some(b.account()))
    }

    fn top_up_once_now(
        &self,
        org: OrgId,
        amount: u64,
        reference: RequestId,
    ) -> Result<Option<Account>, BackendError> {
        let Some(book) = self.book(org) else {
            return Ok(None);
        };
        let now = self.now();
        let mut b = lock(&book);
        b.renew(now);
        if b.applied.contains(&reference) {
            return Ok(Some(b.account()));
        }
        if b.balance()
            .checked_add(amount)
            .is_none_or(|total| total > MAX_CREDITS)
        {
            return Err(out_of_range("top-up of", amount));
        }
        if amount > 0 {
            b.topup_credits += amount;
            b.record(
                now,
                EntryKind::TopUp,
                0,
                delta(amount, 0),
                Some(reference.clone()),
            );
        }
        b.applied.insert(reference);
        Ok(Some(b.account()))
    }

    fn set_balance_now(&self, org: OrgId, balance: u64) -> Result<Option<Account>, BackendError> {
        if balance > MAX_CREDITS {
            return Err(out_of_range("balance", balance));
        }
        let Some(book) = self.book(org) else {
            return Ok(None);
        };
        let now = self.now();
        let mut b = lock(&book);
        b.renew(now);
        let dp = delta(balance, b.plan_credits);
        let dt = delta(0, b.topup_credits);
        b.plan_credits = balance;
        b.topup_credits = 0;
        b.record(now, EntryKind::Adjustment, dp, dt, None);
        Ok(Some(b.account()))
    }

    fn account_now(&self, org: OrgId) -> Option<Account> {
        let book = self.book(org)?;
        let now = self.now();
        let mut b = lock(&book);
        b.renew(now);
        Some(b.account())
    }

    fn renew_due_now(&self) -> usize {
        let now = self.now();
        self.all_books()
            .iter()
            .filter(|book| lock(book).renew(now) > 0)
            .count()
    }

    fn sweep_now(&self) -> usize {
        let now = self.now();
        let mut swept = 0;
        for book in self.all_books() {
            let mut b = lock(&book);
            b.swept.retain(|_, s| s.forget_at_ms > now);
            b.committed.retain(|_, c| c.forget_at_ms > now);
            let expired: Vec<HoldId> = b
                .holds
                .iter()
                .filter(|(_, h)| h.expires_at_ms <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                if let Some(rec) = b.holds.remove(&id) {
                    b.held = b.held.saturating_sub(rec.amount);
                    Book::tally(&mut b.key_held, rec.key, rec.amount, false);
                    self.open_holds.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(
                        org = %b.org,
                        hold = %id,
                        amount = rec.amount,
                        "released an expired credit hold"
                    );
                    b.swept.insert(
                        id,
                        SweptHold {
                            amount: rec.amount,
                            request_id: rec.request_id,
                            forget_at_ms: now.saturating_add(self.hold_ttl_ms),
                            key: rec.key,
                        },
                    );
                    swept += 1;
                }
            }
        }
        swept
    }
}

impl Default for MemoryLedger {
    /// An empty ledger on the system clock.
    fn default() -> Self {
        MemoryLedger::new(SystemClock)
    }
}

impl fmt::Debug for MemoryLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLedger")
            .field("hold_ttl_ms", &self.hold_ttl_ms)
            .field(
                "orgs",
                &self
                    .books
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len(),
            )
            .field("open_holds", &self.open_holds())
            .finish()
    }
}

impl Ledger for MemoryLedger {
    fn hold_for_key(
        &self,
        org: OrgId,
        amount: u64,
        request_id: Option<RequestId>,
        budget: Option<KeyBudget>,
    ) -> BoxFuture<Result<HoldOutcome, BackendError>> {
        Box::pin(ready(Ok(self.hold_now(org, amount, request_id, budget))))
    }

    fn key_spend(
        &self,
        org: OrgId,
        keys: Vec<KeyId>,
    ) -> BoxFuture<Result<HashMap<KeyId, u64>, BackendError>> {
        let spend = match self.book(org) {
            None => HashMap::new(),
            Some(book) => {
                let mut b = lock(&book);
                b.renew(self.now());
                keys.into_iter()
                    .filter_map(|k| b.key_spent.get(&k).map(|&spent| (k, spent)))
                    .collect()
            }
        };
        Box::pin(ready(Ok(spend)))
    }

    fn commit(&self, hold: Hold) -> BoxFuture<Result<CommitOutcome, BackendError>> {
        Box::pin(ready(Ok(self.commit_now(&hold))))
    }

    fn release(&self, hold: Hold) -> BoxFuture<Result<ReleaseOutcome, BackendError>> {
        Box::pin(ready(Ok(self.release_now(&hold, false))))
    }

    fn release_detached(&self, hold: Hold) {
        self.release_now(&hold, true);
    }

    fn extend_holds(&self, holds: Vec<Hold>) -> BoxFuture<Result<usize, BackendError>> {
        Box::pin(ready(Ok(self.extend_now(&holds))))
    }

    fn hold_ttl(&self) -> Duration {
        MemoryLedger::hold_ttl(self)
    }

    fn subscribe(&self, org: OrgId, plan: Plan) -> BoxFuture<Result<Account, BackendError>> {
        Box::pin(ready(Ok(self.subscribe_now(org, plan))))
    }

    fn cancel(&self, org: OrgId) -> BoxFuture<Result<bool, BackendError>> {
        Box::pin(ready(Ok(self.cancel_now(org))))
    }

    fn top_up(&self, org: OrgId, amount: u64) -> BoxFuture<Result<Option<Account>, BackendError>> {
        Box::pin(ready(self.top_up_now(org, amount)))
    }

    fn top_up_once(
        &self,
        org: OrgId,
        amount: u64,
        reference: RequestId,
    ) -> BoxFuture<Result<Option<Account>, BackendError>> {
        Box::pin(ready(self.top_up_once_now(org, amount, reference)))
    }

    fn set_balance(
        &self,
        org: OrgId,
        balance: u64,
    ) -> BoxFuture<Result<Option<Account>, BackendError>> {
        Box::pin(ready(self.set_balance_now(org, balance)))
    }

    fn account(&self, org: OrgId) -> BoxFuture<Result<Option<Account>, BackendError>> {
        Box::pin(ready(Ok(self.account_now(org))))
    }

    fn entries(&self, org: OrgId) -> BoxFuture<Result<Vec<LedgerEntry>, BackendError>> {
        let entries = self
            .book(org)
            .map(|book| lock(&book).entries.iter().cloned().collect())
            .unwrap_or_default();
        Box::pin(ready(Ok(entries)))
    }

    fn renew_due(&self) -> BoxFuture<Result<usize, BackendError>> {
        Box::pin(ready(Ok(self.renew_due_now())))
    }

    fn sweep_expired_holds(&self) -> BoxFuture<Result<usize, BackendError>> {
        Box::pin(ready(Ok(self.sweep_now())))
    }

    fn open_holds(&self) -> u64 {
        self.open_holds.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::ManualClock;

    #[test]
    fn deltas_fit_every_balance() {
        assert_eq!(delta(MAX_CREDITS, 0), i64::MAX);
        assert_eq!(delta(0, MAX_CREDITS), -i64::MAX);
        assert_eq!(delta(3, 5), -2);
    }

    #[test]
    fn renewal_ends_at_the_end_of_the_calendar() {
        // A clock far past anything a calendar can express must not loop forever.
        let clock = ManualClock::new(253_402_300_799_000); // 9999-12-31T23:59:59Z
        let ledger = MemoryLedger::new(clock.clone());
        let org = OrgId::new();
        ledger.subscribe_now(org, Plan::Free);
        clock.set(u64::MAX);
        let account = ledger.account_now(org).unwrap();
        assert_eq!(account.plan_credits, 100);
        assert_eq!(account.period_end_ms, u64::MAX);
        let rows = ledger.book(org).map(|b| lock(&b).entries.len()).unwrap();
        assert!(rows <= MAX_CATCH_UP + 2, "{rows} rows");
        // Nothing is left to renew, however often it is asked.
        assert_eq!(ledger.renew_due_now(), 0);
        assert!(matches!(
            ledger.hold_now(org, 1, None, None),
            HoldOutcome::Held(_)
        ));
    }

    #[test]
    fn the_gauge_follows_every_way_a_hold_ends() {
        let clock = ManualClock::new(0);
        let ledger = MemoryLedger::new(clock.clone()).with_hold_ttl(Duration::from_millis(10));
        let org = OrgId::new();
        ledger.subscribe_now(org, Plan::Free);
        let hold = |l: &MemoryLedger| match l.hold_now(org, 1, None, None) {
            HoldOutcome::Held(h) => h,
            other => panic!("{other:?}"),
        };
        let (a, b, _c) = (hold(&ledger), hold(&ledger), hold(&ledger));
        assert_eq!(ledger.open_holds(), 3);
        assert!(matches!(
            ledger.commit_now(&a),
            CommitOutcome::Charged { charged: 1, .. }
        ));
        assert_eq!(ledger.release_now(&b, false), ReleaseOutcome::Released);
        assert_eq!(ledger.release_now(&b, false), ReleaseOutcome::Gone);
        assert_eq!(
            ledger.release_now(&a, false),
            ReleaseOutcome::Committed { charged: 1 }
        );
        assert_eq!(ledger.open_holds(), 1);
        clock.set(10);
        assert_eq!(ledger.sweep_now(), 1);
        assert_eq!(ledger.open_holds(), 0);
        assert_eq!(ledger.account_now(org).unwrap().held, 0);
    }
}
