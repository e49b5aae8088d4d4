//! [`OrgGate`]: a bound on the ledger statements one org may have in flight at once.
//!
//! Statements of one org queue on the lock of its account row. When that row is slow (held by
//! a long transaction, or PostgreSQL struggling), every request of the org would hold a
//! pooled connection while it waits, and a few dozen requests of one tenant would take the
//! whole pool from everyone else. The gate lets at most `permits` holds and `permits`
//! settlements (commits and releases) of an org reach the pool at a time; the others wait for
//! a permit without holding a connection, for at most the gate's wait. Settlements have their
//! own permits so that requests already answered by the upstream never queue behind new ones.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tollgate_core::{BackendError, OrgId};

const SHARDS: usize = 32;

/// Which permits a statement takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// A hold: a new request.
    Hold,
    /// A commit or release: a request the upstream already answered.
    Settle,
}

struct OrgEntry {
    holds: Arc<Semaphore>,
    settles: Arc<Semaphore>,
}

type Shard = Mutex<HashMap<OrgId, Arc<OrgEntry>>>;

/// Per-org semaphores, created on demand and dropped when idle.
pub(super) struct OrgGate {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    permits: usize,
    wait: Duration,
}

/// A permit of one org; returned (and the org's entry forgotten when idle) on drop.
pub(super) struct OrgPermit {
    permit: Option<OwnedSemaphorePermit>,
    entry: Arc<OrgEntry>,
    gate: Arc<OrgGate>,
    org: OrgId,
}

impl OrgGate {
    pub(super) fn new(permits: usize, wait: Duration) -> Self {
        OrgGate {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            permits: permits.max(1),
            wait,
        }
    }

    fn shard(&self, org: OrgId) -> &Shard {
        &self.shards[(self.hasher.hash_one(org) as usize) % SHARDS]
    }

    /// Waits (at most the gate's wait time) for one of `org`'s permits of `lane`.
    pub(super) async fn enter(
        self: Arc<Self>,
        org: OrgId,
        lane: Lane,
    ) -> Result<OrgPermit, BackendError> {
        let entry = {
            let mut map = self
                .shard(org)
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(map.entry(org).or_insert_with(|| {
                Arc::new(OrgEntry {
                    holds: Arc::new(Semaphore::new(self.permits)),
                    settles: Arc::new(Semaphore::new(self.permits)),
                })
            }))
        };
        let semaphore = Arc::clone(match lane {
            Lane::Hold => &entry.holds,
            Lane::Settle => &entry.settles,
        });
        let (wait, permits) = (self.wait, self.permits);
        let mut guard = OrgPermit {
            permit: None,
            entry,
            gate: self,
            org,
        };
        let permit = match Arc::clone(&semaphore).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::time::timeout(wait, semaphore.acquire_owned())
                .await
                .map_err(|_| {
                    BackendError::unavailable(format!(
                        "the organization's credit ledger operations ({permits} at a time) \
                         made no room within {wait:?}"
                    ))
                })?
                .map_err(BackendError::other)?,
        };
        guard.permit = Some(permit);
        Ok(guard)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

impl Drop for OrgPermit {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut map = self
            .gate
            .shard(self.org)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only the map and this guard still know the entry: nobody holds or awaits a permit
        // (new users clone it under this same lock), so it can be forgotten.
        if Arc::strong_count(&self.entry) == 2 {
            map.remove(&self.org);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::BackendErrorKind;

    #[tokio::test(start_paused = true)]
    async fn bounds_one_org_without_touching_another() {
        let gate = Arc::new(OrgGate::new(2, Duration::from_millis(100)));
        let (a, b) = (OrgId::new(), OrgId::new());
        let p1 = gate.clone().enter(a, Lane::Hold).await.unwrap();
        let _p2 = gate.clone().enter(a, Lane::Hold).await.unwrap();
        // A third hold of org A waits, then gives up; org B is not affected, and neither
        // are org A's settlements.
        let err = gate.clone().enter(a, Lane::Hold).await.err().unwrap();
        assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
        let _pb = gate.clone().enter(b, Lane::Hold).await.unwrap();
        let _settle = gate.clone().enter(a, Lane::Settle).await.unwrap();
        drop(p1);
        let _p3 = gate.clone().enter(a, Lane::Hold).await.unwrap();
    }

    #[tokio::test]
    async fn idle_orgs_are_forgotten() {
        let gate = Arc::new(OrgGate::new(4, Duration::from_millis(100)));
        for _ in 0..100 {
            let _p = gate.clone().enter(OrgId::new(), Lane::Hold).await.unwrap();
        }
        assert_eq!(gate.tracked(), 0);
        let org = OrgId::new();
        let held = gate.clone().enter(org, Lane::Hold).await.unwrap();
        let other = gate.clone().enter(org, Lane::Settle).await.unwrap();
        drop(held);
        assert_eq!(gate.tracked(), 1, "still in use");
        drop(other);
        assert_eq!(gate.tracked(), 0);
    }
}
