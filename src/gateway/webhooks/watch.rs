//! The watcher: the events that follow from balances, periods and key expiries.
//!
//! - `credits.exhausted`: the request logger's worker reports orgs refused with 402
//!   `INSUFFICIENT_CREDITS` ([`Signals`]); the event id names the org's period, so it is
//!   sent at most once per period.
//! - `credits.low`: after a batch of charges (also reported by the worker) and at every scan,
//!   the balance is compared with the org's threshold; the org's "low" state is kept in the
//!   store, and its change to low writes the event in the same transaction, so each fall
//!   below the threshold is one event, on any number of replicas.
//! - `subscription.renewed`: the period's start is kept the same way; a new one is an event.
//! - `key.expiring`: every scan lists the org's keys; a live key expiring within 7 days is an
//!   event whose id names the key (once per key).
//!
//! Only orgs with at least one endpoint are looked at.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use tollgate_api_key_auth::{KeyStatus, KeyStore};
use tollgate_core::time::rfc3339_from_ms;
use tollgate_core::{BackendError, Clock as _, ErrorCode, OrgId, SystemClock};
use tollgate_credit_meter::{Account, Ledger};
use tollgate_request_logger::LogRecord;

use super::{
    key_data, Event, EventType, WebhookOptions, Webhooks, DEFAULT_LOW_PERCENT, KEY_EXPIRING_WITHIN,
};

/// What the request logger's worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Signal {
    /// Refused with 402 `INSUFFICIENT_CREDITS`.
    Exhausted(OrgId),
    /// Charged: the balance went down.
    Charged(OrgId),
}

/// How many reports may wait; more are dropped (the next scan catches up).
const QUEUE: usize = 1_024;

/// The sending side, handed to the request logger's tee.
#[derive(Debug, Clone)]
pub struct Signals {
    tx: mpsc::Sender<Signal>,
}

impl Signals {
    /// Reports what a batch of log records means for webhooks (never blocks).
    pub fn observe(&self, records: &[LogRecord]) {
        let mut seen = HashSet::new();
        for r in records {
            let Some(org) = r.org_id else { continue };
            if r.status == 402 && r.code == Some(ErrorCode::InsufficientCredits) {
                seen.insert(Signal::Exhausted(org));
            } else if r.credits > 0 {
                seen.insert(Signal::Charged(org));
            }
        }
        for signal in seen {
            // Full: dropped; the periodic scan looks at the balance anyway.
            let _ = self.tx.try_send(signal);
        }
    }
}

/// What the watcher reads.
#[derive(Clone)]
pub struct Watched {
    /// The outbox.
    pub webhooks: Webhooks,
    /// Balances and periods.
    pub ledger: Arc<dyn Ledger>,
    /// Keys and their expiries.
    pub keys: Arc<dyn KeyStore>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").finish_non_exhaustive()
    }
}

/// A channel for [`Signals`] and the watcher that reads it, scanning every
/// `options.scan_interval`.
pub fn spawn(watched: Watched, options: &WebhookOptions) -> (Signals, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let every = options.scan_interval;
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let with_endpoints: HashSet<OrgId> = match watched.webhooks.store.orgs_with_endpoints().await {
                        Ok(orgs) => orgs.into_iter().collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, "webhook watcher: listing endpoints failed");
                            continue;
                        }
                    };
                    watched.webhooks.set_orgs(with_endpoints.clone());
                    for org in &with_endpoints {
                        if let Err(e) = scan(&watched, *org).await {
                            tracing::warn!(org = %org, error = %e, "webhook watcher: scan failed");
                        }
                    }
                }
                Some(signal) = rx.recv() => {
                    let org = match signal { Signal::Exhausted(o) | Signal::Charged(o) => o };
                    if !watched.webhooks.has_endpoints(org) {
                        continue;
                    }
                    let done = match signal {
                        Signal::Exhausted(org) => exhausted(&watched, org).await,
                        Signal::Charged(org) => balance(&watched, org).await.map(|_| ()),
                    };
                    if let Err(e) = done {
                        tracing::warn!(org = %org, error = %e, "webhook watcher failed");
                    }
                }
            }
        }
    });
    (Signals { tx }, task)
}

/// Looks at one org now: its period, its balance and its keys (also run when an endpoint
/// is registered, so the states it is compared with start from then).
pub async fn scan(watched: &Watched, org: OrgId) -> Result<(), BackendError> {
    if let Some(account) = balance(watched, org).await? {
        period(watched, &account).await?;
    }
    expiring_keys(watched, org).await
}

/// `credits.low`: the org's low state, recorded; its change to low is the event.
async fn balance(watched: &Watched, org: OrgId) -> Result<Option<Account>, BackendError> {
    let Some(account) = watched.ledger.account(org).await? else {
        return Ok(None);
    };
    let (Some(plan), Some(balance)) = (account.plan, account.balance()) else {
        return Ok(Some(account));
    };
    let threshold = match watched.webhooks.store.low_threshold(org).await? {
        Some(t) => t,
        None => plan.monthly_credits().unwrap_or(0) * DEFAULT_LOW_PERCENT / 100,
    };
    let low = balance < threshold;
    let now = SystemClock.now_ms();
    // Each fall below the threshold is its own occurrence (only the observer that records
    // the change writes the event).
    let event = low.then(|| {
        Event::new(
            EventType::CreditsLow,
            org,
            &format!("{}:{}", account.period_start_ms, uuid::Uuid::new_v4()),
            now,
            json!({
                "balance": balance,
                "threshold": threshold,
                "plan": plan,
                "period_end": rfc3339_from_ms(account.period_end_ms),
            }),
        )
    });
    let state = if low { "low" } else { "ok" };
    if watched
        .webhooks
        .store
        .observe(org, "credits.low".into(), state.into(), event)
        .await?
        && low
    {
        watched.webhooks.wake();
    }
    Ok(Some(account))
}

/// `subscription.renewed`: the period's start, recorded; a new one is the event.
async fn period(watched: &Watched, account: &Account) -> Result<(), BackendError> {
    let Some(plan) = account.plan else {
        return Ok(());
    };
    let start = account.period_start_ms.to_string();
    let event = Event::new(
        EventType::SubscriptionRenewed,
        account.org,
        &start,
        SystemClock.now_ms(),
        json!({
            "plan": plan,
            "plan_credits": account.plan_credits,
            "period_start": rfc3339_from_ms(account.period_start_ms),
            "period_end": rfc3339_from_ms(account.period_end_ms),
        }),
    );
    if watched
        .webhooks
        .store
        .observe(account.org, "period".into(), start, Some(event))
        .await?
    {
        watched.webhooks.wake();
    }
    Ok(())
}

/// `credits.exhausted`, once per period.
async fn exhausted(watched: &Watched, org: OrgId) -> Result<(), BackendError> {
    let Some(account) = watched.ledger.account(org).await? else {
        return Ok(());
    };
    watched
        .webhooks
        .emit(Event::new(
            EventType::CreditsExhausted,
            org,
            &account.period_start_ms.to_string(),
            SystemClock.now_ms(),
            json!({
                "plan": account.plan,
                "balance": account.balance(),
                "period_end": account.plan.map(|_| rfc3339_from_ms(account.period_end_ms)),
            }),
        ))
        .await;
    Ok(())
}

/// `key.expiring`, once per key.
async fn expiring_keys(watched: &Watched, org: OrgId) -> Result<(), BackendError> {
    let now = SystemClock.now_ms();
    let horizon = now.saturating_add(KEY_EXPIRING_WITHIN.as_millis() as u64);
    for key in watched.keys.list_keys(org).await? {
        let Some(expires) = key.expires_at_ms else {
            continue;
        };
        if key.status == KeyStatus::Active && expires > now && expires <= horizon {
            watched
                .webhooks
                .emit(Event::new(
                    EventType::KeyExpiring,
                    org,
                    &key.id.to_string(),
                    now,
                    key_data(key.id, &key.name, &key.prefix, expires),
                ))
                .await;
        }
    }
    Ok(())
}
