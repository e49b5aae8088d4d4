//! The store's in-process caches: what exists (keys, plans, model owners), kept exact by
//! notifications, and, apart from it, what does not exist (unknown key hashes and models),
//! bounded and short-lived.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tollgate_core::{KeyId, ModelId, OrgId, Plan};
use tollgate_postgres::{InvalidatingCache, NotificationHandler};

use crate::key::KeyHash;
use crate::store::KeyLimits;

/// Things the database does not know, remembered for a short TTL so a client repeating a
/// bad key (or model id) does not cost a query each time.
///
/// Kept apart from the caches of things that exist, with its own bound, so no number of
/// unknown keys can evict a valid one. Sharded maps with a queue per shard in insertion
/// order: past the bound the oldest entries go first, so memory stays bounded under a spray
/// while a key repeated within its TTL is still answered here (it is re-queued on every
/// miss). O(1) per operation, no background work.
///
/// A negative entry must never outlive the row appearing. A writer that creates the row
/// invalidates the matching positive cache (bumping its epoch) and then this entry; a reader
/// inserts after its query and re-checks the epoch it took before the query, removing its
/// own entry when it changed. Whichever order they interleave in, no stale entry is left.
pub(super) struct Unknown<K> {
    shards: Box<[Mutex<Shard<K>>]>,
    hasher: RandomState,
    per_shard: usize,
    ttl: Duration,
}

struct Shard<K> {
    expiry: HashMap<K, Instant>,
    // Insertion order; an element whose time no longer matches `expiry` is stale.
    order: VecDeque<(K, Instant)>,
}

const SHARDS: usize = 16;

impl<K: Hash + Eq + Clone> Unknown<K> {
    pub(super) fn new(capacity: u64, ttl: Duration) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        // Fewer shards for a tiny bound, so each holds at least one entry.
        let shards = capacity.clamp(1, SHARDS);
        Unknown {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        expiry: HashMap::new(),
                        order: VecDeque::new(),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            // Rounded down, so the whole stays within `capacity`.
            per_shard: capacity / shards,
            ttl,
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K>> {
        let count = self.shards.len() as u64;
        let index = usize::try_from(self.hasher.hash_one(key) % count).unwrap_or(0);
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `key` was recently found not to exist.
    pub(super) fn contains(&self, key: &K) -> bool {
        let now = Instant::now();
        self.shard(key).expiry.get(key).is_some_and(|e| *e > now)
    }

    /// Remembers `key` as unknown, unless `positive` was invalidated since `epoch` was taken
    /// (before the query that found nothing).
    pub(super) fn insert_if_current<V: Clone>(
        &self,
        key: K,
        positive: &InvalidatingCache<K, V>,
        epoch: u64,
    ) {
        if self.per_shard == 0 {
            return;
        }
        let now = Instant::now();
        let expires = now.checked_add(self.ttl).unwrap_or(now);
        {
            let mut shard = self.shard(&key);
            shard.expiry.insert(key.clone(), expires);
            shard.order.push_back((key.clone(), expires));
            // Drop the oldest while over the bound, and expired ones at the front; the queue
            // itself is bounded too (re-inserted keys leave stale elements behind).
            while let Some((oldest, at)) = shard.order.front() {
                let over =
                    shard.expiry.len() > self.per_shard || shard.order.len() > 2 * self.per_shard;
                if !over && *at > now {
                    break;
                }
                let current = shard.expiry.get(oldest) == Some(at);
                if let Some((oldest, _)) = shard.order.pop_front() {
                    if current {
                        shard.expiry.remove(&oldest);
                    }
                }
            }
        }
        if positive.epoch() != epoch {
            self.invalidate(&key);
        }
    }

    pub(super) fn invalidate(&self, key: &K) {
        self.shard(key).expiry.remove(key);
    }

    pub(super) fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.expiry.clear();
            shard.order.clear();
        }
    }

    /// How many entries are held (expired ones included until they are dropped).
    pub(super) fn len(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .expiry
                    .len() as u64
            })
            .sum()
    }
}

/// Every cache of the store. Positive caches hold only what exists: active keys, plans,
/// owned models.
pub(super) struct KeyCache {
    pub(super) keys: InvalidatingCache<KeyHash, (KeyId, OrgId, KeyLimits)>,
    pub(super) plans: InvalidatingCache<OrgId, Option<Plan>>,
    pub(super) owners: InvalidatingCache<ModelId, OrgId>,
    /// Hashes with no active key (unknown or revoked).
    pub(super) unknown_keys: Unknown<KeyHash>,
    /// Model ids nobody owns.
    pub(super) unknown_models: Unknown<ModelId>,
    pub(super) ttl: Duration,
}

impl KeyCache {
    pub(super) fn new(capacity: usize, ttl: Duration, negative: (u64, Duration)) -> Self {
        let (negative_capacity, negative_ttl) = negative;
        KeyCache {
            keys: InvalidatingCache::new(capacity),
            plans: InvalidatingCache::new(capacity),
            owners: InvalidatingCache::new(capacity),
            unknown_keys: Unknown::new(negative_capacity, negative_ttl),
            unknown_models: Unknown::new(negative_capacity, negative_ttl),
            ttl,
        }
    }

    pub(super) fn apply(&self, change: Change) {
        match change {
            // A revoked key only becomes "unknown": its negative entry (if any) is right.
            Change::Key(id) => self.keys.invalidate_where(|_, (key, _, _)| *key == id),
            Change::Org(org) => self.plans.invalidate(&org),
            Change::Model(model) => {
                self.owners.invalidate(&model);
                self.unknown_models.invalidate(&model);
            }
        }
    }

    /// A key with this hash now exists (created here).
    pub(super) fn key_created(&self, hash: &KeyHash) {
        self.keys.invalidate(hash);
        self.unknown_keys.invalidate(hash);
    }
}

/// What a notification on [`KEYS_CHANNEL`](super::KEYS_CHANNEL) says changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Key(KeyId),
    Org(OrgId),
    Model(ModelId),
}

impl Change {
    pub(super) fn payload(self) -> String {
        match self {
            Change::Key(id) => format!("key:{id}"),
            Change::Org(id) => format!("org:{id}"),
            Change::Model(id) => format!("model:{id}"),
        }
    }

    fn parse(payload: &str) -> Option<Change> {
        let (kind, id) = payload.split_once(':')?;
        match kind {
            "key" => id.parse().ok().map(Change::Key),
            "org" => id.parse().ok().map(Change::Org),
            "model" => id.parse().ok().map(Change::Model),
            _ => None,
        }
    }
}

impl NotificationHandler for KeyCache {
    fn notification(&self, payload: &str) {
        match Change::parse(payload) {
            Some(change) => self.apply(change),
            // From a newer version, or garbage: be safe.
            None => self.reset(),
        }
    }

    fn reset(&self) {
        self.keys.clear();
        self.plans.clear();
        self.owners.clear();
        self.unknown_keys.clear();
        self.unknown_models.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn cache(negative_capacity: u64) -> KeyCache {
        KeyCache::new(10, TTL, (negative_capacity, Duration::from_secs(2)))
    }

    #[test]
    fn change_payloads_round_trip() {
        for change in [
            Change::Key(KeyId::new()),
            Change::Org(OrgId::new()),
            Change::Model(ModelId::new()),
        ] {
            assert_eq!(Change::parse(&change.payload()), Some(change));
        }
        assert_eq!(Change::parse("key:nope"), None);
        assert_eq!(Change::parse("what"), None);
    }

    #[test]
    fn unknown_notifications_drop_the_whole_cache() {
        let cache = cache(10);
        let (key, org) = (KeyId::new(), OrgId::new());
        let hash = KeyHash::of("x");
        cache
            .keys
            .insert_if_current(hash, (key, org, KeyLimits::default()), 0, TTL);
        cache.plans.insert_if_current(org, Some(Plan::Pro), 0, TTL);
        let bogus = KeyHash::of("y");
        cache
            .unknown_keys
            .insert_if_current(bogus, &cache.keys, cache.keys.epoch());
        cache.notification(&Change::Key(KeyId::new()).payload());
        assert_eq!(
            cache.keys.get(&hash),
            Some((key, org, KeyLimits::default()))
        );
        cache.notification(&Change::Key(key).payload());
        assert_eq!(cache.keys.get(&hash), None);
        assert_eq!(cache.plans.get(&org), Some(Some(Plan::Pro)));
        assert!(cache.unknown_keys.contains(&bogus));
        cache.notification("v2:something-new");
        assert_eq!(cache.plans.get(&org), None);
        assert!(!cache.unknown_keys.contains(&bogus));
    }

    #[test]
    fn unknown_entries_expire_and_stay_within_their_bound() {
        let unknown = Unknown::new(32, Duration::from_millis(30));
        let positive: InvalidatingCache<u32, ()> = InvalidatingCache::new(1);
        unknown.insert_if_current(7, &positive, 0);
        assert!(unknown.contains(&7));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!unknown.contains(&7));
        // Far more keys than the bound, and one key re-inserted over and over (a TTL no busy
        // machine can outlast between two statements: this part is about the bound).
        let unknown = Unknown::new(32, Duration::from_secs(600));
        for k in 0..10_000 {
            unknown.insert_if_current(k, &positive, 0);
            unknown.insert_if_current(1_000_000, &positive, 0);
            assert!(unknown.len() <= 32);
            assert!(unknown.contains(&k));
            assert!(unknown.contains(&1_000_000));
        }
        for shard in unknown.shards.iter() {
            assert!(shard.lock().unwrap().order.len() <= 2 * 2);
        }
        unknown.invalidate(&1_000_000);
        assert!(!unknown.contains(&1_000_000));
        unknown.clear();
        assert_eq!(unknown.len(), 0);
    }

    #[test]
    fn a_negative_fill_racing_a_creation_is_not_kept() {
        let cache = cache(10);
        let model = ModelId::new();
        // A reader takes the epoch and queries: nobody owns the model yet...
        let epoch = cache.owners.epoch();
        // ...the model is added and announced before the reader stores its answer.
        cache.apply(Change::Model(model));
        cache
            .unknown_models
            .insert_if_current(model, &cache.owners, epoch);
        assert!(!cache.unknown_models.contains(&model));
        // A reader that started after the change keeps its (correct) entry.
        let epoch = cache.owners.epoch();
        cache
            .unknown_models
            .insert_if_current(model, &cache.owners, epoch);
        assert!(cache.unknown_models.contains(&model));
        cache.apply(Change::Model(model));
        assert!(!cache.unknown_models.contains(&model));
    }

    #[test]
    fn unknown_keys_never_displace_known_ones() {
        let cache = cache(100);
        let known: Vec<_> = (0..10)
            .map(|i| {
                let hash = KeyHash::of(&format!("known {i}"));
                let epoch = cache.keys.epoch();
                cache.keys.insert_if_current(
                    hash,
                    (KeyId::new(), OrgId::new(), KeyLimits::default()),
                    epoch,
                    TTL,
                );
                hash
            })
            .collect();
        for i in 0..5_000 {
            let epoch = cache.keys.epoch();
            cache.unknown_keys.insert_if_current(
                KeyHash::of(&format!("bogus {i}")),
                &cache.keys,
                epoch,
            );
        }
        assert!(known.iter().all(|h| cache.keys.get(h).is_some()));
        assert!(cache.unknown_keys.len() <= 100);
    }
}
