//! [`InvalidatingCache`]: an in-process cache in front of PostgreSQL whose entries are evicted
//! by notifications (see [`Listener`](crate::Listener)) and expire after a TTL as a backstop.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// A map of values read from the database, safe against the classic stale-fill race.
///
/// A reader that misses takes [`epoch`](Self::epoch) *before* querying the database and
/// fills with [`insert_if_current`](Self::insert_if_current): if any invalidation happened in
/// between (a notification that the row changed, a reset after the listener reconnected),
/// the possibly stale value is not cached. Every entry also expires after its TTL.
///
/// Bounded: when full, expired entries are dropped, and if that is not enough the cache is
/// emptied (a cache refilled from the database is correct, only slower for a moment).
pub struct InvalidatingCache<K, V> {
    inner: RwLock<Inner<K, V>>,
    capacity: usize,
}

struct Inner<K, V> {
    epoch: u64,
    map: HashMap<K, (V, Instant)>,
}

impl<K, V> fmt::Debug for InvalidatingCache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the entries: they may be grants or sessions.
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("InvalidatingCache")
            .field("entries", &inner.map.len())
            .field("epoch", &inner.epoch)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl<K: Eq + Hash, V: Clone> InvalidatingCache<K, V> {
    /// An empty cache holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        InvalidatingCache {
            inner: RwLock::new(Inner {
                epoch: 0,
                map: HashMap::new(),
            }),
            capacity: capacity.max(1),
        }
    }

    // A panic elsewhere never leaves the map half-updated; keep serving.
    fn read(&self) -> RwLockReadGuard<'_, Inner<K, V>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner<K, V>> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The unexpired value cached for `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        let now = Instant::now();
        let inner = self.read();
        match inner.map.get(key) {
            Some((value, expires)) if *expires > now => Some(value.clone()),
            _ => None,
        }
    }

    /// The current invalidation epoch; take it before reading the database.
    pub fn epoch(&self) -> u64 {
        self.read().epoch
    }

    /// Caches `value` for `ttl`, unless something was invalidated since `epoch` was taken.
    /// Returns whether it was cached.
    pub fn insert_if_current(&self, key: K, value: V, epoch: u64, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut inner = self.write();
        if inner.epoch != epoch {
            return false;
        }
        if inner.map.len() >= self.capacity && !inner.map.contains_key(&key) {
            inner.map.retain(|_, (_, expires)| *expires > now);
            if inner.map.len() >= self.capacity {
                inner.map.clear();
            }
        }
        let expires = now.checked_add(ttl).unwrap_or(now);
        inner.map.insert(key, (value, expires));
        true
    }

    /// Evicts `key` (and makes in-flight fills of any key skip caching).
    pub fn invalidate(&self, key: &K) {
        let mut inner = self.write();
        inner.epoch += 1;
        inner.map.remove(key);
    }

    /// Evicts every entry for which `stale` is true.
    pub fn invalidate_where(&self, mut stale: impl FnMut(&K, &V) -> bool) {
        let mut inner = self.write();
        inner.epoch += 1;
        inner.map.retain(|k, (v, _)| !stale(k, v));
    }

    /// Evicts everything.
    pub fn clear(&self) {
        let mut inner = self.write();
        inner.epoch += 1;
        inner.map.clear();
    }

    /// How many entries are held (expired ones included until they are replaced).
    pub fn len(&self) -> usize {
        self.read().map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    #[test]
    fn a_fill_racing_an_invalidation_is_not_cached() {
        let cache = InvalidatingCache::new(10);
        let epoch = cache.epoch();
        // ... the database is read here, then the row changes and a notification arrives:
        cache.invalidate(&"k");
        assert!(!cache.insert_if_current("k", 1, epoch, TTL));
        assert_eq!(cache.get(&"k"), None);
        // A fill that started after the invalidation is cached.
        let epoch = cache.epoch();
        assert!(cache.insert_if_current("k", 2, epoch, TTL));
        assert_eq!(cache.get(&"k"), Some(2));
    }

    #[test]
    fn entries_expire() {
        let cache = InvalidatingCache::new(10);
        cache.insert_if_current("k", 1, 0, Duration::ZERO);
        assert_eq!(cache.get(&"k"), None);
        cache.insert_if_current("j", 1, 0, Duration::from_millis(30));
        assert_eq!(cache.get(&"j"), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get(&"j"), None);
    }

    #[test]
    fn invalidation_by_value_and_clear() {
        let cache = InvalidatingCache::new(10);
        for (k, v) in [("a", 1), ("b", 2), ("c", 1)] {
            let e = cache.epoch();
            cache.insert_if_current(k, v, e, TTL);
        }
        cache.invalidate_where(|_, v| *v == 1);
        assert_eq!(
            (cache.get(&"a"), cache.get(&"b"), cache.get(&"c")),
            (None, Some(2), None)
        );
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn stays_within_capacity() {
        let cache = InvalidatingCache::new(3);
        for k in 0..10 {
            let e = cache.epoch();
            assert!(cache.insert_if_current(k, k, e, TTL));
            assert!(cache.len() <= 3);
            assert_eq!(cache.get(&k), Some(k));
        }
        assert!(!format!("{cache:?}").contains("9,"));
    }
}
