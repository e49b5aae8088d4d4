//! [`MemoryIdempotencyStore`]: the keys of one process.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tollgate_core::{BackendError, BoxFuture, Clock, SharedClock};

use crate::store::{
    millis, Begin, Fingerprint, IdempotencyStore, Lease, LeaseToken, StoredResponse,
};

/// An [`IdempotencyStore`] in process memory: exact for one gateway process (replicas need
/// the PostgreSQL or Redis store), forgotten on restart.
///
/// Time comes from the given [`Clock`], so tests can expire leases and responses without
/// waiting. Expired records are ignored at once and dropped by
/// [`purge_expired`](IdempotencyStore::purge_expired) (and, lazily, every 1,024 `begin`s).
///
/// ```
/// use std::time::Duration;
/// use http::Method;
/// use tollgate_core::ManualClock;
/// use tollgate_idempotency::{Begin, Fingerprint, IdempotencyStore, MemoryIdempotencyStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let clock = ManualClock::new(1_700_000_000_000);
/// let store = MemoryIdempotencyStore::new(clock.clone());
/// let fp = Fingerprint::new(&Method::POST, "/api/x", b"{}");
/// let lease_ttl = Duration::from_secs(30);
/// let Begin::Started(_lease) = store.begin("org-1", "k1", fp, lease_ttl).await.unwrap() else {
///     panic!("a new key starts");
/// };
/// assert_eq!(store.begin("org-1", "k1", fp, lease_ttl).await.unwrap(), Begin::InFlight);
/// // Another org's key of the same name is another key.
/// assert!(matches!(store.begin("org-2", "k1", fp, lease_ttl).await.unwrap(), Begin::Started(_)));
/// // The replica running it died: after the lease TTL the key is free again.
/// clock.advance(lease_ttl);
/// assert!(matches!(store.begin("org-1", "k1", fp, lease_ttl).await.unwrap(), Begin::Started(_)));
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryIdempotencyStore {
    inner: Arc<Inner>,
}

struct Inner {
    clock: SharedClock,
    records: Mutex<Records>,
}

#[derive(Default)]
struct Records {
    map: HashMap<(String, String), Record>,
    begins: u64,
}

struct Record {
    fingerprint: Fingerprint,
    expires_ms: u64,
    state: State,
}

enum State {
    InFlight(LeaseToken),
    Done(StoredResponse),
}

/// `begin`s between two lazy purges.
const PURGE_EVERY: u64 = 1_024;

impl MemoryIdempotencyStore {
    /// An empty store reading time from `clock`.
    pub fn new(clock: impl Clock) -> Self {
        MemoryIdempotencyStore {
            inner: Arc::new(Inner {
                clock: Arc::new(clock),
                records: Mutex::new(Records::default()),
            }),
        }
    }

    /// Records held, expired ones included until purged.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        // A panic while holding the lock leaves the map consistent (every update is one
        // insert or remove), so a poisoned lock is still usable.
        self.inner
            .records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    fn begin_now(&self, scope: &str, key: &str, fingerprint: Fingerprint, ttl: Duration) -> Begin {
        let now = self.now();
        let mut records = self.lock();
        records.begins += 1;
        if records.begins.is_multiple_of(PURGE_EVERY) {
            records.map.retain(|_, r| r.expires_ms > now);
        }
        let id = (scope.to_owned(), key.to_owned());
        if let Some(record) = records.map.get(&id).filter(|r| r.expires_ms > now) {
            return if record.fingerprint != fingerprint {
                Begin::Mismatch
            } else {
                match &record.state {
                    State::InFlight(_) => Begin::InFlight,
                    State::Done(response) => Begin::Replay(response.clone()),
                }
            };
        }
        let token = LeaseToken::generate();
        records.map.insert(
            id,
            Record {
                fingerprint,
                expires_ms: now.saturating_add(millis(ttl)),
                state: State::InFlight(token),
            },
        );
        Begin::Started(Lease::new(scope, key, token))
    }

    fn complete_now(&self, lease: &Lease, response: StoredResponse, ttl: Duration) -> bool {
        let now = self.now();
        let mut records = self.lock();
        match records
            .map
            .get_mut(&(lease.scope().to_owned(), lease.key().to_owned()))
        {
            Some(record) if matches!(record.state, State::InFlight(t) if t == lease.token()) => {
                record.state = State::Done(response);
                record.expires_ms = now.saturating_add(millis(ttl));
                true
            }
            _ => false,
        }
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let mut records = self.lock();
        let id = (lease.scope().to_owned(), lease.key().to_owned());
        let current = records
            .map
            .get(&id)
            .is_some_and(|r| matches!(r.state, State::InFlight(t) if t == lease.token()));
        if current {
            records.map.remove(&id);
        }
        current
    }
}

impl IdempotencyStore for MemoryIdempotencyStore {
    fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> BoxFuture<Result<Begin, BackendError>> {
        let outcome = self.begin_now(scope, key, fingerprint, lease_ttl);
        Box::pin(std::future::ready(Ok(outcome)))
    }

    fn complete(
        &self,
        lease: &Lease,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let stored = self.complete_now(lease, response, ttl);
        Box::pin(std::future::ready(Ok(stored)))
    }

    fn release(&self, lease: &Lease) -> BoxFuture<Result<bool, BackendError>> {
        let freed = self.release_now(lease);
        Box::pin(std::future::ready(Ok(freed)))
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        let now = self.now();
        let mut records = self.lock();
        let before = records.map.len();
        records.map.retain(|_, r| r.expires_ms > now);
        let purged = (before - records.map.len()) as u64;
        Box::pin(std::future::ready(Ok(purged)))
    }
}

impl fmt::Debug for MemoryIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryIdempotencyStore")
            .field("records", &self.len())
            .finish()
    }
}
