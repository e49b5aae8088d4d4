//! [`MemoryWindowStore`]: an exact sliding log per bucket, in process memory.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tollgate_core::{BackendError, BoxFuture, SharedClock, SystemClock};

use crate::store::{BucketKey, Decision, WindowLimits, WindowStore, BURST_WINDOW_MS};

/// Number of independently locked shards (a power of two).
const SHARDS: usize = 64;
const SHARD_BITS: u32 = SHARDS.trailing_zeros();

/// The default interval between sweeps of a shard for idle buckets.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// An in-memory [`WindowStore`]: exact, safe under concurrent use, bounded in memory.
///
/// Each bucket is a sliding log — the admission times of the requests in the past window,
/// oldest first — so every decision is exact to the millisecond: capacity comes back one
/// request at a time, at the very millisecond each admitted request ages out. The burst
/// edge (the past second) is found by binary search in the same log, under the same lock,
/// so the window and the burst are one atomic decision.
///
/// Buckets are spread over 64 mutex-guarded shards. A bucket with nothing left in its
/// window is idle and is evicted: each shard is swept when a request touches it and the
/// sweep interval ([`DEFAULT_SWEEP_INTERVAL`]) has passed, and [`sweep`](Self::sweep) evicts
/// everywhere on demand (call it from a periodic task if traffic may stop entirely).
/// Memory per bucket is one `u64` per request admitted in the window.
///
/// The store counts for one process. Replicas that must share one limit need a shared store
/// (Redis).
///
/// ```
/// use std::sync::Arc;
/// use tollgate_core::{ManualClock, ModelId, OrgId};
/// use tollgate_sliding_window::{BucketKey, MemoryWindowStore, WindowLimits};
///
/// let store = MemoryWindowStore::new(Arc::new(ManualClock::new(0)));
/// let key = BucketKey::new(OrgId::new(), ModelId::new());
/// let limits = WindowLimits { limit: 2, burst: 5, window_ms: 60_000 };
/// assert!(store.check_now(key, limits, 1_000).admitted);
/// assert!(store.check_now(key, limits, 2_000).admitted);
/// let refused = store.check_now(key, limits, 3_000);
/// assert!(!refused.admitted);
/// // The first request leaves the window at 61 000 ms.
/// assert_eq!(refused.retry_after_ms, Some(58_000));
/// assert!(store.check_now(key, limits, 61_000).admitted);
/// ```
pub struct MemoryWindowStore {
    shards: Box<[CachePadded]>,
    shard_of: RandomState,
    clock: SharedClock,
    sweep_interval_ms: u64,
}

/// One shard on its own cache line, so that locking one does not slow its neighbours.
#[repr(align(64))]
struct CachePadded(Mutex<Shard>);

struct Shard {
    buckets: HashMap<BucketKey, Bucket>,
    next_sweep_ms: u64,
}

#[derive(Default)]
struct Bucket {
    /// Admission times in ms, non-decreasing, none older than `horizon_ms`.
    log: VecDeque<u64>,
    /// How long this bucket must remember an admission (from its latest limits).
    horizon_ms: u64,
}

impl MemoryWindowStore {
    /// An empty store reading time from `clock`.
    pub fn new(clock: SharedClock) -> Self {
        MemoryWindowStore {
            shards: (0..SHARDS)
                .map(|_| {
                    CachePadded(Mutex::new(Shard {
                        buckets: HashMap::new(),
                        next_sweep_ms: 0,
                    }))
                })
                .collect(),
            shard_of: RandomState::new(),
            clock,
            sweep_interval_ms: duration_ms(DEFAULT_SWEEP_INTERVAL),
        }
    }

    /// Sets how often a shard touched by a request is swept for idle buckets (default
    /// 60 s). A shorter interval frees memory sooner at the price of more sweeps.
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval_ms = duration_ms(interval);
        self
    }

    /// Takes one decision at `now_ms` (milliseconds since the epoch) without reading the
    /// clock: the synchronous fast path behind [`WindowStore::check`].
    ///
    /// If `now_ms` is earlier than the bucket's latest admission (a clock stepped back),
    /// the decision is taken at that latest admission instead, so the log stays ordered and
    /// no request is ever counted twice or forgotten early.
    pub fn check_now(&self, key: BucketKey, limits: WindowLimits, now_ms: u64) -> Decision {
        let mut shard = self.lock(&key);
        if now_ms >= shard.next_sweep_ms {
            shard.sweep(now_ms);
            shard.next_sweep_ms = now_ms.saturating_add(self.sweep_interval_ms);
        }
        shard.buckets.entry(key).or_default().decide(limits, now_ms)
    }

    /// Evicts every idle bucket (nothing left in its window at `now_ms`); returns how many
    /// were evicted.
    pub fn sweep(&self, now_ms: u64) -> usize {
        self.shards.iter().map(|s| lock(&s.0).sweep(now_ms)).sum()
    }

    /// [`sweep`](Self::sweep) at the store clock's current time.
    pub fn sweep_now(&self) -> usize {
        self.sweep(self.clock.now_ms())
    }

    /// The number of buckets held (idle ones included until they are swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).buckets.len()).sum()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self, key: &BucketKey) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_index(key)].0)
    }

    fn shard_index(&self, key: &BucketKey) -> usize {
        // The top bits of a keyed hash: clients choose model ids, so the shard must not be
        // predictable from the id alone.
        (self.shard_of.hash_one(key) >> (u64::BITS - SHARD_BITS)) as usize
    }
}

impl Default for MemoryWindowStore {
    /// A store on the system clock.
    fn default() -> Self {
        MemoryWindowStore::new(SystemClock::shared())
    }
}

impl WindowStore for MemoryWindowStore {
    fn check(
        &self,
        key: BucketKey,
        limits: WindowLimits,
    ) -> BoxFuture<Result<Decision, BackendError>> {
        let decision = self.check_now(key, limits, self.clock.now_ms());
        Box::pin(std::future::ready(Ok(decision)))
    }
}

impl fmt::Debug for MemoryWindowStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryWindowStore")
            .field("buckets", &self.len())
            .field("shards", &SHARDS)
            .field("sweep_interval_ms", &self.sweep_interval_ms)
            .finish()
    }
}

/// Nothing in a critical section leaves a shard half-updated, so a poisoned lock (a panic
/// elsewhere while it was held) still guards consistent data.
fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Shard {
    fn sweep(&mut self, now_ms: u64) -> usize {
        let before = self.buckets.len();
        self.buckets.retain(|_, b| !b.is_idle(now_ms));
        let len = self.buckets.len();
        // Give memory back after a spike of buckets, keeping room to grow again.
        if self.buckets.capacity() > 64 && len < self.buckets.capacity() / 4 {
            self.buckets.shrink_to(len * 2);
        }
        before - len
    }
}

impl Bucket {
    fn is_idle(&self, now_ms: u64) -> bool {
        self.log
            .back()
            .is_none_or(|&t| now_ms.saturating_sub(t) >= self.horizon_ms)
    }

    /// One atomic decision (the caller holds the shard lock).
    ///
    /// A request admitted at `t` is counted in a window of length `len` while
    /// `now - t < len`; ages are compared rather than sums so that no timestamp overflows.
    fn decide(&mut self, limits: WindowLimits, now_ms: u64) -> Decision {
        // Keep the log ordered even if the clock stepped back.
        let now = now_ms.max(self.log.back().copied().unwrap_or(0));
        let horizon = limits.horizon_ms();
        self.horizon_ms = horizon;
        while self.log.front().is_some_and(|&t| now - t >= horizon) {
            self.log.pop_front();
        }
        let window = limits.window_ms;
        let first_in_window = if window >= horizon {
            0
        } else {
            self.log.partition_point(|&t| now - t >= window)
        };
        let first_in_burst = self.log.partition_point(|&t| now - t >= BURST_WINDOW_MS);
        let len = self.log.len();
        let in_window = len - first_in_window;
        let in_burst = len - first_in_burst;
        let limit = limits.limit as usize;
        let burst = limits.burst as usize;
        // Time left before the admission at `t` leaves a window of length `span`.
        let left = |t: u64, span: u64| span - (now - t);

        if in_window < limit && in_burst < burst {
            self.log.push_back(now);
            return Decision {
                admitted: true,
                limit: limits.limit,
                remaining: (limit - in_window - 1) as u32,
                reset_ms: left(self.log[first_in_window], window),
                retry_after_ms: None,
            };
        }

        // The earliest instant both counts are below their limits, with no admission in
        // between: when the entry `limit` places from the newest leaves the window, and the
        // entry `burst` places from the newest leaves the past second.
        let window_wait = match in_window.checked_sub(limit) {
            None => Some(0),
            Some(_) if limit == 0 => None,
            Some(_) => Some(left(self.log[len - limit], window)),
        };
        let burst_wait = match in_burst.checked_sub(burst) {
            None => Some(0),
            Some(_) if burst == 0 => None,
            Some(_) => Some(left(self.log[len - burst], BURST_WINDOW_MS)),
        };
        let retry_after_ms = match (window_wait, burst_wait) {
            (Some(w), Some(b)) => w.max(b),
            // A zero limit never admits; tell the client to come back after a window.
            _ => window.max(1),
        };
        Decision {
            admitted: false,
            limit: limits.limit,
            remaining: limits.limit.saturating_sub(in_window as u32),
            reset_ms: self
                .log
                .get(first_in_window)
                .map_or(0, |&oldest| left(oldest, window)),
            retry_after_ms: Some(retry_after_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tollgate_core::{ManualClock, ModelId, OrgId};

    fn key() -> BucketKey {
        BucketKey::new(OrgId::new(), ModelId::new())
    }

    fn limits(limit: u32, burst: u32, window_ms: u64) -> WindowLimits {
        WindowLimits {
            limit,
            burst,
            window_ms,
        }
    }

    fn store() -> MemoryWindowStore {
        MemoryWindowStore::new(Arc::new(ManualClock::new(0)))
    }

    /// The definition, computed the slow way: admissions `t` with `now < t + len` count.
    struct Reference {
        admitted: Vec<u64>,
    }

    impl Reference {
        fn count(&self, now: u64, len: u64) -> usize {
            self.admitted.iter().filter(|&&t| now < t + len).count()
        }

        fn fits(&self, now: u64, l: WindowLimits) -> bool {
            self.count(now, l.window_ms) < l.limit as usize
                && self.count(now, BURST_WINDOW_MS) < l.burst as usize
        }

        fn decide(&mut self, now: u64, l: WindowLimits) -> Decision {
            let admitted = self.fits(now, l);
            if admitted {
                self.admitted.push(now);
            }
            let in_window: Vec<u64> = self
                .admitted
                .iter()
                .copied()
                .filter(|&t| now < t + l.window_ms)
                .collect();
            let retry_after_ms = (!admitted).then(|| {
                // Counts only change when an admission leaves a window, so the first
                // admissible instant is the first such moment at which the request fits.
                let mut moments: Vec<u64> = self
                    .admitted
                    .iter()
                    .flat_map(|&t| [t + l.window_ms, t + BURST_WINDOW_MS])
                    .filter(|&at| at > now)
                    .collect();
                moments.sort_unstable();
                let at = moments.into_iter().find(|&at| self.fits(at, l)).unwrap();
                at - now
            });
            Decision {
                admitted,
                limit: l.limit,
                remaining: l.limit - in_window.len() as u32,
                reset_ms: in_window.first().map_or(0, |&t| t + l.window_ms - now),
                retry_after_ms,
            }
        }
    }

    /// A small deterministic generator (no `rand` dependency needed for a test).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn matches_the_definition_on_random_traffic() {
        let cases = [
            limits(10, 5, 60_000),
            limits(60, 10, 60_000),
            limits(7, 3, 2_500),
            limits(4, 3, 400),
            limits(3, 10, 1_000),
            limits(1, 1, 1),
        ];
        for (seed, l) in cases.into_iter().enumerate() {
            let store = store();
            let k = key();
            let mut reference = Reference {
                admitted: Vec::new(),
            };
            let mut rng = Lcg(seed as u64 + 1);
            let mut now = 1_700_000_000_000;
            for step in 0..3_000 {
                // Mostly dense traffic, with the odd long pause so the window drains.
                now += match rng.below(20) {
                    0 => rng.below(l.window_ms * 2 + 1),
                    1..=9 => rng.below(300),
                    _ => rng.below(3),
                };
                let expected = reference.decide(now, l);
                let got = store.check_now(k, l, now);
                assert_eq!(got, expected, "limits {l:?}, step {step}, now {now}");
            }
        }
    }

    #[test]
    fn capacity_returns_one_request_at_a_time() {
        let store = store();
        let k = key();
        let l = limits(3, 3, 10_000);
        for t in [0, 2_000, 4_000] {
            assert!(store.check_now(k, l, t).admitted);
        }
        let full = store.check_now(k, l, 9_999);
        assert_eq!(
            full,
            Decision {
                admitted: false,
                limit: 3,
                remaining: 0,
                reset_ms: 1,
                retry_after_ms: Some(1),
            }
        );
        let back = store.check_now(k, l, 10_000);
        assert!(back.admitted);
        assert_eq!(back.remaining, 0);
        assert_eq!(back.reset_ms, 2_000);
        assert!(!store.check_now(k, l, 11_999).admitted);
        assert!(store.check_now(k, l, 12_000).admitted);
    }

    #[test]
    fn retry_after_waits_for_both_window_and_burst() {
        let store = store();
        let k = key();
        // Window full at 10 with the 5 newest inside the last second: the window frees at
        // 60 000 (first admission ages out), by when the burst is long free.
        let l = limits(10, 5, 60_000);
        for t in [
            0, 100, 200, 300, 400, 50_000, 50_100, 50_200, 50_300, 50_400,
        ] {
            assert!(store.check_now(k, l, t).admitted, "{t}");
        }
        let d = store.check_now(k, l, 50_500);
        assert_eq!(d.retry_after_ms, Some(60_000 - 50_500));
        // Burst full, window not: wait for the oldest of the last second.
        let k2 = key();
        for t in [1_000, 1_200, 1_400, 1_600, 1_800] {
            assert!(store.check_now(k2, l, t).admitted);
        }
        let d = store.check_now(k2, l, 1_900);
        assert!(!d.admitted);
        assert_eq!(d.remaining, 5);
        assert_eq!(d.retry_after_ms, Some(100));
        assert!(store.check_now(k2, l, 2_000).admitted);
    }

    #[test]
    fn zero_limits_never_admit_and_never_panic() {
        let store = store();
        let k = key();
        for l in [limits(0, 5, 60_000), limits(5, 0, 60_000), limits(0, 0, 0)] {
            let d = store.check_now(k, l, 1_000);
            assert!(!d.admitted);
            assert!(d.retry_after_ms.unwrap() >= 1);
            assert_eq!(d.reset_ms, 0);
        }
    }

    #[test]
    fn clock_stepping_back_keeps_counting() {
        let store = store();
        let k = key();
        let l = limits(2, 5, 60_000);
        assert!(store.check_now(k, l, 100_000).admitted);
        assert!(store.check_now(k, l, 50_000).admitted);
        let d = store.check_now(k, l, 40_000);
        assert!(!d.admitted);
        assert_eq!(d.retry_after_ms, Some(60_000));
        assert!(store.check_now(k, l, 160_000).admitted);
    }

    #[test]
    fn time_near_the_end_of_u64_does_not_overflow() {
        let store = store();
        let k = key();
        let l = limits(1, 1, u64::MAX);
        assert!(store.check_now(k, l, u64::MAX - 5).admitted);
        let d = store.check_now(k, l, u64::MAX);
        assert!(!d.admitted);
        assert_eq!(d.reset_ms, u64::MAX - 5);
        assert_eq!(d.retry_after_ms, Some(u64::MAX - 5));
    }

    #[test]
    fn touched_shards_sweep_idle_buckets() {
        let store = store().with_sweep_interval(Duration::from_millis(0));
        let l = limits(5, 5, 1_000);
        for _ in 0..500 {
            store.check_now(key(), l, 10_000);
        }
        assert_eq!(store.len(), 500);
        // Still inside the window: nothing is idle.
        assert_eq!(store.sweep(10_999), 0);
        assert_eq!(store.len(), 500);
        // After the window, one request in each shard evicts that shard's idle buckets,
        // leaving only the buckets of the new requests.
        let mut fresh = Vec::new();
        let mut covered = [false; SHARDS];
        while covered.iter().any(|c| !c) {
            let k = key();
            covered[shard_index(&store, &k)] = true;
            fresh.push(k);
        }
        for k in &fresh {
            assert!(store.check_now(*k, l, 11_000).admitted);
        }
        assert_eq!(store.len(), fresh.len());
        assert_eq!(store.sweep(12_000), fresh.len());
        assert!(store.is_empty());
    }

    #[test]
    fn sweeps_wait_for_the_interval() {
        let store = store().with_sweep_interval(Duration::from_secs(60));
        let l = limits(5, 5, 1_000);
        let a = key();
        let mut b = key();
        while shard_index(&store, &b) != shard_index(&store, &a) {
            b = key();
        }
        store.check_now(a, l, 0);
        // `a` is idle at 5 000 but the shard was swept at 0: no sweep before 60 000.
        store.check_now(b, l, 5_000);
        assert_eq!(store.len(), 2);
        store.check_now(b, l, 60_000);
        assert_eq!(store.len(), 1);
    }

    fn shard_index(store: &MemoryWindowStore, key: &BucketKey) -> usize {
        store.shard_index(key)
    }
}
