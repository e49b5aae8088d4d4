//! [`HoldKeeper`]: keeps the holds of requests still in flight from expiring.
//!
//! A hold expires after the ledger's hold TTL so that the credits of a replica that crashed
//! mid-request come back. A live request must never lose its hold that way, however long it
//! takes (a slow upstream, a long body, a slow commit): the sweeper would give its credits to
//! another request and the two would be charged from the same credits. So every hold the
//! meter grants is registered here until it is settled, and a background task
//! [extends](crate::Ledger::extend_holds) the registered holds that are a third of a TTL old,
//! in one ledger call per tick. The holds of a process that died are not extended by anyone
//! and expire as before.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::ledger::{Hold, HoldId, Ledger};

const SHARDS: usize = 16;
/// Holds extended per ledger call.
const BATCH: usize = 5_000;

struct Live {
    hold: Hold,
    extended_at: Instant,
}

/// The holds of one meter that are still in flight.
pub(crate) struct HoldKeeper {
    ledger: Arc<dyn Ledger>,
    shards: Box<[Mutex<HashMap<HoldId, Live>>]>,
    hasher: std::collections::hash_map::RandomState,
    task: OnceLock<()>,
}

impl HoldKeeper {
    pub(crate) fn new(ledger: Arc<dyn Ledger>) -> Arc<Self> {
        Arc::new(HoldKeeper {
            ledger,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            task: OnceLock::new(),
        })
    }

    fn shard(&self, id: HoldId) -> &Mutex<HashMap<HoldId, Live>> {
        &self.shards[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    /// How often the keeper looks for holds to extend: a third of the TTL, so a hold is
    /// extended before two thirds of its TTL have passed.
    fn every(&self) -> Duration {
        (self.ledger.hold_ttl() / 3).clamp(Duration::from_millis(20), Duration::from_secs(60))
    }

    /// Registers a granted hold; the extension task starts with the first one (it needs a
    /// tokio runtime; without one, holds are not extended).
    pub(crate) fn register(self: &Arc<Self>, hold: &Hold) {
        if self.task.get().is_none() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                self.task.get_or_init(|| {
                    runtime.spawn(run(Arc::downgrade(self), self.every()));
                });
            }
        }
        self.shard(hold.id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                hold.id,
                Live {
                    hold: hold.clone(),
                    extended_at: Instant::now(),
                },
            );
    }

    /// Forgets a hold that is being settled.
    pub(crate) fn forget(&self, id: HoldId) {
        self.shard(id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Holds not extended for `age`.
    fn due(&self, age: Duration) -> Vec<Hold> {
        let now = Instant::now();
        let mut due = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            due.extend(
                map.values()
                    .filter(|l| now.duration_since(l.extended_at) >= age)
                    .map(|l| l.hold.clone()),
            );
        }
        due
    }

    fn mark_extended(&self, holds: &[Hold], at: Instant) {
        for hold in holds {
            if let Some(live) = self
                .shard(hold.id)
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&hold.id)
            {
                live.extended_at = at;
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Extends due holds every `every` until the keeper (its meter) is gone.
async fn run(keeper: Weak<HoldKeeper>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(live) = keeper.upgrade() else {
            return;
        };
        let due = live.due(every);
        let ledger = Arc::clone(&live.ledger);
        drop(live);
        for batch in due.chunks(BATCH) {
            let started = Instant::now();
            match ledger.extend_holds(batch.to_vec()).await {
                Ok(_) => {
                    if let Some(live) = keeper.upgrade() {
                        live.mark_extended(batch, started);
                    }
                }
                Err(err) => tracing::warn!(
                    holds = batch.len(),
                    error = %err,
                    "could not extend the credit holds of requests in flight; retrying next tick"
                ),
            }
        }
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::{HoldOutcome, MemoryLedger};
    use tollgate_core::{OrgId, Plan, TokioClock};

    #[tokio::test(start_paused = true)]
    async fn registered_holds_are_extended_until_forgotten() {
        let clock = TokioClock::starting_at(1_700_000_000_000);
        let ledger = Arc::new(MemoryLedger::new(clock).with_hold_ttl(Duration::from_secs(3)));
        let org = OrgId::new();
        ledger.subscribe(org, Plan::Free).await.unwrap();
        let keeper = HoldKeeper::new(ledger.clone());
        let hold = |n| match ledger.hold_now(org, n, None, None) {
            HoldOutcome::Held(h) => h,
            other => panic!("{other:?}"),
        };
        let (kept, forgotten) = (hold(1), hold(2));
        keeper.register(&kept);
        keeper.register(&forgotten);
        assert_eq!(keeper.live(), 2);
        keeper.forget(forgotten.id);
        assert_eq!(keeper.live(), 1);
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ledger.sweep_expired_holds().await.unwrap();
        }
        // Ten seconds, over three TTLs: only the forgotten hold was swept.
        assert_eq!(ledger.open_holds(), 1);
        assert_eq!(ledger.account(org).await.unwrap().unwrap().held, 1);
        // The task ends with its meter.
        drop(keeper);
        tokio::time::sleep(Duration::from_secs(5)).await;
        ledger.sweep_expired_holds().await.unwrap();
        assert_eq!(ledger.open_holds(), 0);
    }
}
