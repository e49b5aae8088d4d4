//! Releases that nobody waits for ([`Ledger::release_detached`](crate::Ledger)): queued, sent
//! by a background task, and retried with back-off while the database fails, so a hold whose
//! request is gone does not keep the org's credits for a whole hold TTL because of one
//! failed statement. Past the TTL the sweeper would release it anyway, so retries stop there.
//! These releases are *voids*: a hold found committed (its commit's answer was lost, and the
//! response withheld) is refunded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tollgate_core::{BackendError, Clock, SharedClock};
use tollgate_postgres::to_backend_error;

use super::sql::{col, RELEASE};
use crate::ledger::{Hold, ReleaseOutcome};

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Releases one hold (with `refund`, a committed one is refunded) and says what it was.
pub(super) async fn release(
    pool: &Pool,
    hold: &Hold,
    refund: bool,
    now: i64,
) -> Result<ReleaseOutcome, BackendError> {
    let Ok(id) = i64::try_from(hold.id.0) else {
        return Ok(ReleaseOutcome::Gone); // never issued by this ledger
    };
    let client = pool.get().await.map_err(to_backend_error)?;
    let stmt = client
        .prepare_cached(RELEASE)
        .await
        .map_err(to_backend_error)?;
    let row = client
        .query_one(&stmt, &[hold.org.as_uuid(), &id, &refund, &now])
        .await
        .map_err(to_backend_error)?;
    let outcome: &str = col(&row, "outcome")?;
    let charged: i64 = col(&row, "charged")?;
    Ok(match outcome {
        "released" => ReleaseOutcome::Released,
        "swept" => ReleaseOutcome::Swept,
        "committed" | "refunded" => ReleaseOutcome::Committed {
            charged: u64::try_from(charged).unwrap_or(0),
        },
        "gone" => ReleaseOutcome::Gone,
        other => {
            return Err(BackendError::other(format!(
                "unexpected release outcome {other:?}"
            )))
        }
    })
}

/// The queue of detached releases and the background task that sends them, started by the
/// first release made inside a tokio runtime. Shared by the ledger (for
/// [`Ledger::release_detached`](crate::Ledger)) and its hold batches (for holds placed after
/// their request had gone: nobody would ever settle them).
pub(super) struct Detached {
    pub(super) pool: Pool,
    pub(super) clock: SharedClock,
    pub(super) open_holds: Arc<AtomicI64>,
    pub(super) ttl: Duration,
    pub(super) capacity: usize,
    pub(super) dropped: Arc<AtomicU64>,
    pub(super) tx: OnceLock<mpsc::Sender<Hold>>,
}

impl Detached {
    /// Queues a void of `hold`; when the queue is full (or there is no runtime) the hold is
    /// left to the sweeper and counted.
    pub(super) fn release(&self, hold: Hold) {
        let queued = match self.sender() {
            Some(tx) => tx.try_send(hold).map_err(|err| match err {
                mpsc::error::TrySendError::Full(hold) | mpsc::error::TrySendError::Closed(hold) => {
                    hold
                }
            }),
            None => Err(hold),
        };
        if let Err(hold) = queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                org = %hold.org,
                hold = %hold.id,
                "release queue full; the sweeper will release the hold after its TTL"
            );
        }
    }

    fn sender(&self) -> Option<&mpsc::Sender<Hold>> {
        if let Some(tx) = self.tx.get() {
            return Some(tx);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.capacity);
            runtime.spawn(release_worker(
                self.pool.clone(),
                Arc::clone(&self.clock),
                Arc::clone(&self.open_holds),
                self.ttl,
                rx,
            ));
            tx
        }))
    }
}

struct Retry {
    hold: Hold,
    at: Instant,
    wait: Duration,
    give_up: Instant,
}

/// Releases queued holds until the ledger is dropped and the queue is drained, retrying
/// failed ones (oldest first) with back-off until `ttl` after they were queued.
async fn release_worker(
    pool: Pool,
    clock: SharedClock,
    open_holds: Arc<AtomicI64>,
    ttl: Duration,
    mut rx: mpsc::Receiver<Hold>,
) {
    let mut retries: VecDeque<Retry> = VecDeque::new();
    let mut open = true;
    while open || !retries.is_empty() {
        let next_retry = retries.iter().map(|r| r.at).min();
        let job = tokio::select! {
            biased;
            queued = rx.recv(), if open => match queued {
                Some(hold) => {
                    let now = Instant::now();
                    Retry { hold, at: now, wait: FIRST_RETRY, give_up: now + ttl }
                }
                None => {
                    open = false;
                    continue;
                }
            },
            () = sleep_until(next_retry) => {
                let now = Instant::now();
                let Some(i) = retries.iter().position(|r| r.at <= now) else { continue };
                retries.remove(i).expect("index in range")
            }
        };
        let now = super::sql::to_sql(clock.now_ms());
        match release(&pool, &job.hold, true, now).await {
            Ok(ReleaseOutcome::Released) => {
                open_holds.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(ReleaseOutcome::Committed { charged }) => tracing::warn!(
                org = %job.hold.org,
                hold = %job.hold.id,
                charged,
                "a credit hold whose response was withheld had been charged; refunded"
            ),
            Ok(_) => {}
            Err(err) if Instant::now() + job.wait < job.give_up && open => {
                tracing::warn!(
                    org = %job.hold.org,
                    hold = %job.hold.id,
                    error = %err,
                    retry_in_ms = job.wait.as_millis() as u64,
                    "could not release a credit hold; retrying"
                );
                retries.push_back(Retry {
                    at: Instant::now() + job.wait,
                    wait: (job.wait * 2).min(MAX_RETRY),
                    ..job
                });
            }
            Err(err) => tracing::warn!(
                org = %job.hold.org,
                hold = %job.hold.id,
                error = %err,
                "could not release a credit hold; the sweeper will release it after its TTL"
            ),
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
