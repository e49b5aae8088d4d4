//! [`MemoryUsageStore`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tollgate_core::{BackendError, BoxFuture, ModelId, OrgId, SharedClock};

use super::ready;
use crate::usage::{
    UsageBucket, UsageCounts, UsageKey, UsageQuery, UsageRow, UsageStore, USAGE_RETENTION,
};

/// A [`UsageStore`] in memory. Cloning shares the rollups.
#[derive(Clone)]
pub struct MemoryUsageStore {
    /// Ordered by (org, hour, …) so a query is a range scan.
    rows: Arc<Mutex<BTreeMap<UsageKey, UsageCounts>>>,
    clock: SharedClock,
}

impl fmt::Debug for MemoryUsageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryUsageStore")
            .field("rows", &self.lock().len())
            .finish()
    }
}

impl MemoryUsageStore {
    /// An empty store on `clock` (which sets the retention's horizon).
    pub fn new(clock: SharedClock) -> Self {
        MemoryUsageStore {
            rows: Arc::default(),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<UsageKey, UsageCounts>> {
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn bound(org: OrgId, hour_ms: u64) -> UsageKey {
    UsageKey {
        org,
        hour_ms,
        model: None,
        route: None,
    }
}

impl UsageStore for MemoryUsageStore {
    fn add(&self, rows: Vec<UsageRow>) -> BoxFuture<Result<(), BackendError>> {
        let mut stored = self.lock();
        for row in rows {
            stored.entry(row.key).or_default().add(&row.counts);
        }
        ready(Ok(()))
    }

    fn query(&self, q: UsageQuery) -> BoxFuture<Result<Vec<UsageBucket>, BackendError>> {
        let horizon = self
            .clock
            .now_ms()
            .saturating_sub(USAGE_RETENTION.as_millis() as u64);
        let from = q.from_ms.max(horizon);
        if from >= q.to_ms {
            return ready(Ok(Vec::new()));
        }
        let stored = self.lock();
        let mut buckets: HashMap<(u64, Option<ModelId>, Option<String>), UsageCounts> =
            HashMap::new();
        for (key, counts) in stored.range(bound(q.org, from)..bound(q.org, q.to_ms)) {
            let group = (
                q.granularity.floor(key.hour_ms),
                key.model.filter(|_| q.group_by.model),
                key.route.clone().filter(|_| q.group_by.route),
            );
            buckets.entry(group).or_default().add(counts);
        }
        let mut out: Vec<UsageBucket> = buckets
            .into_iter()
            .map(|((start_ms, model, route), counts)| UsageBucket {
                start_ms,
                model,
                route,
                counts,
            })
            .collect();
        out.sort_by(|a, b| (a.start_ms, a.model, &a.route).cmp(&(b.start_ms, b.model, &b.route)));
        ready(Ok(out))
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        let mut stored = self.lock();
        let before = stored.len();
        stored.retain(|key, _| key.hour_ms >= cutoff_ms);
        ready(Ok((before - stored.len()) as u64))
    }
}
