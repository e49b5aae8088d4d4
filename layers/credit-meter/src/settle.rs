//! Settling a request's credits exactly once: the [`Ticket`] owns a granted hold until it is
//! committed or released; a [`SettleCall`] drives that ledger call; both finish their job
//! without awaiting when they are dropped.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tollgate_core::{BackendError, BoxFuture, CreditReceipt, CreditSettlement};

use crate::ledger::{Hold, HoldOutcome, Ledger};

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

/// A granted request: its receipt and its hold (`None` on an unlimited plan). Dropping an
/// unsettled ticket releases the hold at once (`release_detached`) and settles the receipt
/// as released.
pub(crate) struct Ticket {
    ledger: Arc<dyn Ledger>,
    receipt: CreditReceipt,
    hold: Option<Hold>,
    /// Cleared once a commit or release has been started: the ticket's drop then has
    /// nothing left to do.
    armed: bool,
}

impl Ticket {
    pub(crate) fn new(ledger: Arc<dyn Ledger>, receipt: CreditReceipt, hold: Option<Hold>) -> Self {
        Ticket {
            ledger,
            receipt,
            hold,
            armed: true,
        }
    }

    pub(crate) fn receipt(&self) -> &CreditReceipt {
        &self.receipt
    }

    /// Charges the request: commits the hold (on an unlimited plan there is nothing to
    /// commit and the receipt says `balance: None`).
    pub(crate) fn commit(mut self) -> SettleCall {
        self.armed = false;
        let op = match self.hold.take() {
            Some(hold) => SettleOp::Commit {
                fut: self.ledger.commit(hold.clone()),
                hold,
            },
            None => SettleOp::Settled(CreditSettlement::Charged {
                used: self.receipt.cost(),
                balance: None,
            }),
        };
        SettleCall::new(op, self.receipt.clone())
    }

    /// Gives the credits back.
    pub(crate) fn release(mut self) -> SettleCall {
        self.armed = false;
        let op = match self.hold.take() {
            Some(hold) => SettleOp::Release {
                fut: self.ledger.release(hold.clone()),
                hold,
            },
            None => SettleOp::Settled(CreditSettlement::Released),
        };
        SettleCall::new(op, self.receipt.clone())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(hold) = self.hold.take() {
            self.ledger.release_detached(hold);
        }
        self.receipt.settle(CreditSettlement::Released);
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

enum SettleOp {
    Commit {
        fut: BoxFuture<Result<Option<u64>, BackendError>>,
        hold: Hold,
    },
    Release {
        fut: BoxFuture<Result<(), BackendError>>,
        hold: Hold,
    },
    Settled(CreditSettlement),
}

impl SettleOp {
    fn poll(&mut self, cost: u64, cx: &mut Context<'_>) -> Poll<CreditSettlement> {
        match self {
            SettleOp::Commit { fut, hold } => {
                let result = std::task::ready!(fut.as_mut().poll(cx));
                Poll::Ready(settlement_of_commit(cost, hold, result))
            }
            SettleOp::Release { fut, hold } => {
                let result = std::task::ready!(fut.as_mut().poll(cx));
                Poll::Ready(settlement_of_release(hold, result))
            }
            SettleOp::Settled(s) => Poll::Ready(*s),
        }
    }

    /// The rest of the call as one future (only when its owner was dropped mid-call).
    fn into_future(self, cost: u64) -> BoxFuture<CreditSettlement> {
        match self {
            SettleOp::Commit { fut, hold } => {
                Box::pin(async move { settlement_of_commit(cost, &hold, fut.await) })
            }
            SettleOp::Release { fut, hold } => {
                Box::pin(async move { settlement_of_release(&hold, fut.await) })
            }
            SettleOp::Settled(s) => Box::pin(std::future::ready(s)),
        }
    }
}

fn settlement_of_commit(
    cost: u64,
    hold: &Hold,
    result: Result<Option<u64>, BackendError>,
) -> CreditSettlement {
    match result {
        Ok(balance) => CreditSettlement::Charged {
            used: cost,
            balance,
        },
        Err(err) => {
            // The response was delivered; the customer is not billed for it.
            tracing::error!(
                org = %hold.org,
                hold = %hold.id,
                error = %err,
                "committing a credit hold failed; the request was not charged"
            );
            CreditSettlement::Released
        }
    }
}

fn settlement_of_release(hold: &Hold, result: Result<(), BackendError>) -> CreditSettlement {
    if let Err(err) = result {
        tracing::error!(
            org = %hold.org,
            hold = %hold.id,
            error = %err,
            "releasing a credit hold failed; it will be released when it expires"
        );
    }
    CreditSettlement::Released
}

/// A commit or release in flight. Settles the receipt when it completes; if dropped first, the
/// call is finished in the background ([`finish_detached`]) and settles the receipt then.
pub(crate) struct SettleCall {
    op: Option<SettleOp>,
    receipt: CreditReceipt,
}

impl SettleCall {
    fn new(op: SettleOp, receipt: CreditReceipt) -> Self {
        SettleCall {
            op: Some(op),
            receipt,
        }
    }

    pub(crate) fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<CreditSettlement> {
        let Some(op) = self.op.as_mut() else {
            return Poll::Ready(
                self.receipt
                    .settlement()
                    .unwrap_or(CreditSettlement::Released),
            );
        };
        let settlement = std::task::ready!(op.poll(self.receipt.cost(), cx));
        self.op = None;
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
        if let Some(op) = self.op.take() {
            let receipt = self.receipt.clone();
            finish_detached(op.into_future(receipt.cost()), move |settlement| {
                receipt.settle(settlement);
            });
        }
    }
}

impl fmt::Debug for SettleCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SettleCall")
            .field("receipt", &self.receipt)
            .field("done", &self.op.is_none())
            .finish()
    }
}
