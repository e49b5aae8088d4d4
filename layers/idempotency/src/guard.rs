//! Giving a lease back when the request it guards ends without a stored response: a
//! [`LeaseGuard`] releases on drop through a background task, so nothing awaits in `Drop`.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;

use crate::store::{IdempotencyStore, Lease};

/// Releases queued before further ones are left to expire with their lease TTL.
pub(crate) const RELEASE_QUEUE: usize = 1_024;

/// The background releaser of one layer, started on first use.
pub(crate) struct Releaser {
    store: Arc<dyn IdempotencyStore>,
    queue: OnceLock<Option<mpsc::Sender<Lease>>>,
    dropped: AtomicU64,
}

impl Releaser {
    pub(crate) fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Releaser {
            store,
            queue: OnceLock::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues the release of `lease` without waiting. When the queue is full (or there is no
    /// runtime to run it) the lease is left to expire and counted.
    pub(crate) fn release_detached(&self, lease: Lease) {
        let queue = self.queue.get_or_init(|| {
            let handle = tokio::runtime::Handle::try_current().ok()?;
            let (tx, mut rx) = mpsc::channel::<Lease>(RELEASE_QUEUE);
            let store = Arc::clone(&self.store);
            handle.spawn(async move {
                while let Some(lease) = rx.recv().await {
                    if let Err(err) = store.release(&lease).await {
                        tracing::warn!(
                            error = %err,
                            "could not release an idempotency lease; it is freed when its TTL passes"
                        );
                    }
                }
            });
            Some(tx)
        });
        let sent = queue.as_ref().map(|tx| tx.try_send(lease));
        if !matches!(sent, Some(Ok(()))) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "idempotency release queue unavailable; the lease is freed when its TTL passes"
            );
        }
    }

    /// Releases that could not be queued (left to their TTL).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Releaser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Releaser")
            .field("started", &self.queue.get().is_some())
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// Holds a lease while its request runs; dropped while still armed (the client hung up,
/// the inner service failed, the body failed) it queues a release.
pub(crate) struct LeaseGuard {
    lease: Option<Lease>,
    releaser: Arc<Releaser>,
}

impl LeaseGuard {
    pub(crate) fn new(lease: Lease, releaser: Arc<Releaser>) -> Self {
        LeaseGuard {
            lease: Some(lease),
            releaser,
        }
    }

    /// Takes the lease out: the guard no longer releases it.
    pub(crate) fn disarm(&mut self) -> Option<Lease> {
        self.lease.take()
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.releaser.release_detached(lease);
        }
    }
}

/// Runs `work` on its own task and waits for it: if the caller is dropped meanwhile (the
/// client hung up), the work still finishes. Without a runtime it runs inline.
pub(crate) async fn finish_detached<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.spawn(work).await.ok(),
        Err(_) => Some(work.await),
    }
}
