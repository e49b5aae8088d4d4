//! Settling a request's credits exactly once: the [`Ticket`] owns a granted hold until it is
//! committed or released; a [`SettleCall`] drives that ledger work; both finish their job
//! without awaiting when they are dropped.
//!
//! **When the charge cannot be recorded.** A 2xx is delivered only once its charge is in the
//! ledger: nothing is delivered unbilled and nothing is billed undelivered. The commit is
//! bounded by the meter's settle timeout. If it fails or does not answer in time, its outcome
//! is unknown (the statement may have been applied with its answer lost), so the hold is
//! *released* to find out: a release that finds the hold open (or already swept) proves
//! nothing was charged, and the response is withheld ([`CreditSettlement::Unrecorded`]); a
//! release that finds the hold committed proves the commit was applied, and the response is
//! delivered as charged. Only if the release cannot reach the ledger either is the response
//! withheld, and the hold handed to [`Ledger::release_detached`], whose background retries
//! release it — or refund it, if the commit had been applied — as soon as the ledger
//! answers. A hold is never pinned by a failed commit, and a withheld response is never
//! billed.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tollgate_core::{BackendError, BoxFuture, CreditReceipt, CreditSettlement};

use crate::keeper::HoldKeeper;
use crate::ledger::{CommitOutcome, Hold, HoldOutcome, Ledger, ReleaseOutcome};

/// Finishes a ledger call that its owner no longer waits for, without blocking: a call that
/// is already done (every in-memory call) completes right here; otherwise it is handed to the
/// tokio runtime, if there is one. Without a runtime the call is dropped and the ledger's
/// hold TTL is the backstop.
pub(crate) fn finish_detached<T: Send + 'static>(
    mut fut: BoxFuture<T>,
    then: impl FnOnce(T) + Send + 'static,
) {
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(value) => then(value),
        Poll::Pending => match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { then(fut.await) });
            }
            Err(_) => tracing::warn!(
                "a credit ledger call was abandoned outside a tokio runtime; \
                 its hold will be released when it expires"
            ),
        },
    }
}

/// Awaits `fut` for at most `limit`. An answer that is already there (every in-memory ledger)
/// needs no timer, and outside a tokio runtime there is no timer to use.
async fn bounded<T>(mut fut: BoxFuture<T>, limit: Duration) -> Option<T> {
    if let Poll::Ready(value) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
    {
        return Some(value);
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Some(fut.await);
    }
    tokio::time::timeout(limit, fut).await.ok()
}

/// A [`Ledger::hold`] call in flight. If dropped before it resolves (the response future was
/// dropped), a hold it grants is released.
pub(crate) struct HoldCall {
    fut: Option<BoxFuture<Result<HoldOutcome, BackendError>>>,
    ledger: Arc<dyn Ledger>,
}

impl HoldCall {
    pub(crate) fn new(
        fut: BoxFuture<Result<HoldOutcome, BackendError>>,
        ledger: Arc<dyn Ledger>,
    ) -> Self {
        HoldCall {
            fut: Some(fut),
            ledger,
        }
    }

    pub(crate) fn poll_outcome(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<HoldOutcome, BackendError>> {
        let Some(fut) = self.fut.as_mut() else {
            // Polled after completion: behave like a ledger that cannot answer.
            return Poll::Ready(Err(BackendError::other("credit hold polled twice")));
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(out)
    }

    pub(crate) fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }
}

impl Drop for HoldCall {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            let ledger = Arc::clone(&self.ledger);
            finish_detached(fut, move |outcome| {
                if let Ok(HoldOutcome::Held(hold)) = outcome {
                    ledger.release_detached(hold);
                }
            });
        }
    }
}

impl fmt::Debug for HoldCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldCall")
            .field("done", &self.fut.is_none())
            .finish()
    }
}

/// What settling needs besides the hold: the ledger, the keeper of live holds and the bound
/// on each ledger call.
#[derive(Clone)]
pub(crate) struct Settler {
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) keeper: Arc<HoldKeeper>,
    pub(crate) timeout: Duration,
}

/// A granted request: its receipt and its hold (`None` on an unlimited plan). While the
/// ticket lives, the hold is kept from expiring; dropping an unsettled ticket releases the
/// hold at once (`release_detached`) and settles the receipt as released.
pub(crate) struct Ticket {
    settler: Settler,
    receipt: CreditReceipt,
    hold: Option<Hold>,
}

impl Ticket {
    pub(crate) fn new(settler: Settler, receipt: CreditReceipt, hold: Option<Hold>) -> Self {
        if let Some(hold) = &hold {
            settler.keeper.register(hold);
        }
        Ticket {
            settler,
            receipt,
            hold,
        }
    }

    pub(crate) fn receipt(&self) -> &CreditReceipt {
        &self.receipt
    }

    /// Charges the request: commits the hold (on an unlimited plan there is nothing to
    /// commit and the receipt says `balance: None`).
    pub(crate) fn commit(mut self) -> SettleCall {
        let cost = self.receipt.cost();
        match self.hold.take() {
            Some(hold) => SettleCall {
                fut: Some(Box::pin(commit(self.settler.clone(), hold.clone(), cost))),
                receipt: self.receipt.clone(),
                abandon: Some((self.settler.clone(), hold)),
            },
            None => SettleCall::new(
                Box::pin(std::future::ready(CreditSettlement::Charged {
                    used: cost,
                    balance: None,
                })),
                self.receipt.clone(),
            ),
        }
    }

    /// Gives the credits back.
    pub(crate) fn release(mut self) -> SettleCall {
        let fut: BoxFuture<CreditSettlement> = match self.hold.take() {
            Some(hold) => Box::pin(release(self.settler.clone(), hold)),
            None => Box::pin(std::future::ready(CreditSettlement::Released)),
        };
        SettleCall::new(fut, self.receipt.clone())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Unsettled (not committed or released): the request is gone.
        if let Some(hold) = self.hold.take() {
            self.settler.keeper.forget(hold.id);
            self.settler.ledger.release_detached(hold);
            self.receipt.settle(CreditSettlement::Released);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("receipt", &self.receipt)
            .field("hold", &self.hold)
            .finish()
    }
}

/// Commits `hold`; when the commit's outcome is not known, settles it by releasing.
async fn commit(settler: Settler, hold: Hold, cost: u64) -> CreditSettlement {
    let outcome = bounded(settler.ledger.commit(hold.clone()), settler.timeout).await;
    let settlement = match outcome {
        Some(Ok(CommitOutcome::Charged { charged, balance })) => CreditSettlement::Charged {
            // On an unlimited plan nothing is taken; the receipt shows the route's cost.
            used: if balance.is_some() { charged } else { cost },
            balance,
        },
        Some(Ok(CommitOutcome::Expired)) => {
            tracing::warn!(
                org = %hold.org,
                hold = %hold.id,
                "the credit hold expired and its credits were spent meanwhile; the response \
                 is withheld and nothing is charged"
            );
            CreditSettlement::Unrecorded
        }
        Some(Ok(CommitOutcome::Unknown)) => {
            tracing::error!(
                org = %hold.org,
                hold = %hold.id,
                "the ledger does not know the credit hold; the response is withheld and \
                 nothing is charged"
            );
            CreditSettlement::Unrecorded
        }
        failed => {
            match failed {
                Some(Err(err)) => tracing::warn!(
                    org = %hold.org,
                    hold = %hold.id,
                    error = %err,
                    "committing a credit hold failed; releasing it to learn whether it was charged"
                ),
                _ => tracing::warn!(
                    org = %hold.org,
                    hold = %hold.id,
                    timeout_ms = settler.timeout.as_millis() as u64,
                    "committing a credit hold did not answer in time; releasing it to learn \
                     whether it was charged"
                ),
            }
            resolve(&settler, hold.clone()).await
        }
    };
    settler.keeper.forget(hold.id);
    settlement
}

/// Settles a hold whose commit failed: the release says whether the commit was applied.
async fn resolve(settler: &Settler, hold: Hold) -> CreditSettlement {
    match bounded(settler.ledger.release(hold.clone()), settler.timeout).await {
        Some(Ok(ReleaseOutcome::Released | ReleaseOutcome::Swept | ReleaseOutcome::Gone)) => {
            CreditSettlement::Unrecorded
        }
        Some(Ok(ReleaseOutcome::Committed { charged })) => {
            // The commit was applied after all: the response is paid for, deliver it.
            let balance = bounded(settler.ledger.account(hold.org), settler.timeout)
                .await
                .and_then(Result::ok)
                .flatten()
                .and_then(|account| account.balance());
            tracing::info!(
                org = %hold.org,
                hold = %hold.id,
                "the failed commit had been applied; the response is delivered as charged"
            );
            CreditSettlement::Charged {
                used: charged,
                balance,
            }
        }
        failed => {
            if let Some(Err(err)) = &failed {
                tracing::warn!(org = %hold.org, hold = %hold.id, error = %err, "releasing the credit hold failed too; it is retried in the background");
            }
            settler.ledger.release_detached(hold);
            CreditSettlement::Unrecorded
        }
    }
}

/// Releases `hold`, handing the release to the ledger's background retries if it fails.
async fn release(settler: Settler, hold: Hold) -> CreditSettlement {
    settler.keeper.forget(hold.id);
    match bounded(settler.ledger.release(hold.clone()), settler.timeout).await {
        Some(Ok(_)) => {}
        failed => {
            if let Some(Err(err)) = &failed {
                tracing::warn!(org = %hold.org, hold = %hold.id, error = %err, "releasing a credit hold failed; it is retried in the background");
            }
            settler.ledger.release_detached(hold);
        }
    }
    CreditSettlement::Released
}

/// A commit or release in flight. Settles the receipt when it completes.
///
/// Dropped first, a release is finished in the background ([`finish_detached`]) and settles
/// the receipt then. A commit is *abandoned*: its body was never handed on, so the request
/// must not be charged; the hold is given back with [`Ledger::release_detached`], which
/// refunds it if the commit statement had already been applied.
pub(crate) struct SettleCall {
    fut: Option<BoxFuture<CreditSettlement>>,
    receipt: CreditReceipt,
    /// For a commit: how to give the hold back if the call is dropped before it completes.
    abandon: Option<(Settler, Hold)>,
}

impl SettleCall {
    fn new(fut: BoxFuture<CreditSettlement>, receipt: CreditReceipt) -> Self {
        SettleCall {
            fut: Some(fut),
            receipt,
            abandon: None,
        }
    }

    pub(crate) fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<CreditSettlement> {
        let Some(fut) = self.fut.as_mut() else {
            return Poll::Ready(
                self.receipt
                    .settlement()
                    .unwrap_or(CreditSettlement::Released),
            );
        };
        let settlement = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        self.receipt.settle(settlement);
        Poll::Ready(settlement)
    }
}

impl Future for SettleCall {
    type Output = CreditSettlement;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CreditSettlement> {
        self.get_mut().poll_settle(cx)
    }
}

impl Drop for SettleCall {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return;
        };
        match self.abandon.take() {
            Some((settler, hold)) => {
                drop(fut);
                settler.keeper.forget(hold.id);
                settler.ledger.release_detached(hold);
                self.receipt.settle(CreditSettlement::Released);
            }
            None => {
                let receipt = self.receipt.clone();
                finish_detached(fut, move |settlement| {
                    receipt.settle(settlement);
                });
            }
        }
    }
}

impl fmt::Debug for SettleCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SettleCall")
            .field("receipt", &self.receipt)
            .field("done", &self.fut.is_none())
            .finish()
    }
}
