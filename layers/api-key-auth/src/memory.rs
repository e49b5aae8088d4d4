//! [`MemoryKeyStore`]: a complete in-process [`KeyStore`] (tests, the demo gateway, single
//! replica deployments that re-create their keys at start).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::future::ready;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use subtle::ConstantTimeEq;
use tollgate_core::{
    BackendError, BoxFuture, Clock, KeyId, ModelId, OrgId, Plan, SharedClock, SystemClock,
};

use crate::key::{generate_key, GeneratedKey, KeyHash};
use crate::store::{KeyGrant, KeyInfo, KeyLimits, KeySpec, KeyStatus, KeyStore, NewKey};

/// Last-used times are kept to this resolution: a key's time is written at most once per
/// this many milliseconds of clock, however many requests it authenticates.
pub const LAST_USED_RESOLUTION_MS: u64 = 1_000;

/// `last_used` value of a key never used.
const NEVER: u64 = u64::MAX;

/// An in-memory [`KeyStore`]: keys indexed by hash behind one `RwLock`, last-used times in a
/// lock-free atomic per key. Only hashes are kept, never secrets.
///
/// Lookups, ownership checks and [`record_use`](KeyStore::record_use) take the read lock
/// only, so they run in parallel; administration takes the write lock briefly (key
/// generation happens outside it).
pub struct MemoryKeyStore {
    clock: SharedClock,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// Hash of every key not revoked → its id. A revoked key leaves this index; a key in a
    /// rotation's grace period or past its expiry stays, and lookups compare the times.
    by_hash: HashMap<KeyHash, KeyId>,
    keys: HashMap<KeyId, KeyRecord>,
    orgs: HashMap<OrgId, OrgRecord>,
    models: HashMap<ModelId, OrgId>,
}

struct KeyRecord {
    org: OrgId,
    name: String,
    prefix: String,
    hash: KeyHash,
    /// `Active` or `Revoked` (what was done to it; expiry and grace are times).
    status: KeyStatus,
    created_at_ms: u64,
    last_used_ms: AtomicU64,
    /// When it was revoked, or will be at the end of a rotation's grace period.
    revoked_at_ms: Option<u64>,
    expires_at_ms: Option<u64>,
    scopes: crate::store::Scopes,
    models: Option<Arc<[ModelId]>>,
    credit_limit: Option<u64>,
}

#[derive(Default)]
struct OrgRecord {
    plan: Option<Plan>,
    /// The org's keys in creation order.
    keys: Vec<KeyId>,
}

impl KeyRecord {
    fn info(&self, id: KeyId, now_ms: u64) -> KeyInfo {
        let last = self.last_used_ms.load(Ordering::Relaxed);
        KeyInfo {
            id,
            org: self.org,
            name: self.name.clone(),
            prefix: self.prefix.clone(),
            status: KeyStatus::at(
                now_ms,
                self.status == KeyStatus::Revoked,
                self.revoked_at_ms,
                self.expires_at_ms,
            ),
            created_at_ms: self.created_at_ms,
            last_used_at_ms: (last != NEVER).then_some(last),
            revoked_at_ms: self.revoked_at_ms,
            expires_at_ms: self.expires_at_ms,
            scopes: self.scopes,
            models: self.models.as_deref().map(<[ModelId]>::to_vec),
            credit_limit: self.credit_limit,
        }
    }

    fn limits(&self) -> KeyLimits {
        let ends_at_ms = match (self.expires_at_ms, self.revoked_at_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        KeyLimits {
            ends_at_ms,
            scopes: self.scopes,
            models: self.models.clone(),
            credit_limit: self.credit_limit,
        }
    }

    /// The spec a key rotated from this one gets: everything but an expiry already past.
    fn spec_for_successor(&self, now_ms: u64) -> KeySpec {
        KeySpec {
            expires_at_ms: self.expires_at_ms.filter(|&t| t > now_ms),
            scopes: self.scopes,
            models: self.models.as_deref().map(<[ModelId]>::to_vec),
            credit_limit: self.credit_limit,
        }
    }

    /// Moves the last-used time forward to `at_ms` unless it was set less than
    /// [`LAST_USED_RESOLUTION_MS`] before; never moves it back.
    fn touch(&self, at_ms: u64) {
        let mut current = self.last_used_ms.load(Ordering::Relaxed);
        loop {
            if current != NEVER && at_ms < current.saturating_add(LAST_USED_RESOLUTION_MS) {
                return;
            }
            match self.last_used_ms.compare_exchange_weak(
                current,
                at_ms,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }
}

impl State {
    /// Adds an active key for `org`. `None` if the hash is already taken (a 2⁻²⁵⁶ event,
    /// handled rather than assumed away).
    fn insert_key(
        &mut self,
        org: OrgId,
        name: String,
        spec: KeySpec,
        key: &GeneratedKey,
        now_ms: u64,
    ) -> Option<KeyId> {
        let id = KeyId::new();
        match self.by_hash.entry(key.hash) {
            Entry::Occupied(_) => return None,
            Entry::Vacant(slot) => {
                slot.insert(id);
            }
        }
        self.keys.insert(
            id,
            KeyRecord {
                org,
                name,
                prefix: key.prefix.clone(),
                hash: key.hash,
                status: KeyStatus::Active,
                created_at_ms: now_ms,
                last_used_ms: AtomicU64::new(NEVER),
                revoked_at_ms: None,
                expires_at_ms: spec.expires_at_ms,
                scopes: spec.scopes,
                models: spec.models.map(Arc::from),
                credit_limit: spec.credit_limit,
            },
        );
        self.orgs.entry(org).or_default().keys.push(id);
        Some(id)
    }

    /// Revokes `key` at `at_ms`: at once when that is now (it leaves the hash index), else
    /// at the end of a grace period (an earlier revocation time is kept).
    fn revoke(&mut self, key: KeyId, now_ms: u64, at_ms: u64) -> bool {
        let Some(record) = self.keys.get_mut(&key) else {
            return false;
        };
        if record.status == KeyStatus::Active {
            let at = record.revoked_at_ms.map_or(at_ms, |t| t.min(at_ms));
            record.revoked_at_ms = Some(at);
            if at <= now_ms {
                record.status = KeyStatus::Revoked;
                self.by_hash.remove(&record.hash);
            }
        }
        true
    }
}

fn hash_collision() -> BackendError {
    BackendError::other("a newly generated key collided with an existing one twice")
}

impl MemoryKeyStore {
    /// An empty store stamping key creation times with `clock` (the default store uses the
    /// system clock).
    pub fn new(clock: SharedClock) -> Self {
        MemoryKeyStore {
            clock,
            state: RwLock::new(State::default()),
        }
    }

    // Nothing panics while a guard is held, but a poisoned lock must not take the gateway
    // down with it either: the state is still consistent, so keep using it.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lookup_now(&self, hash: &KeyHash) -> Option<KeyGrant> {
        let state = self.read();
        let id = *state.by_hash.get(hash)?;
        let record = state.keys.get(&id)?;
        // The index found the key; the decision itself is a constant-time comparison with
        // the stored hash.
        let matches = bool::from(record.hash.ct_eq(hash));
        (matches && record.status == KeyStatus::Active).then(|| KeyGrant {
            key: id,
            org: record.org,
            plan: state.orgs.get(&record.org).and_then(|o| o.plan),
            limits: record.limits(),
        })
    }

    fn create_key_now(
        &self,
        org: OrgId,
        name: String,
        spec: KeySpec,
    ) -> Result<NewKey, BackendError> {
        for _ in 0..2 {
            let key = generate_key()?;
            let now = self.clock.now_ms();
            if let Some(id) = self
                .write()
                .insert_key(org, name.clone(), spec.clone(), &key, now)
            {
                return Ok(NewKey {
                    id,
                    secret: key.secret,
                    prefix: key.prefix,
                });
            }
        }
        Err(hash_collision())
    }

    fn rotate_key_now(&self, old: KeyId, grace_ms: u64) -> Result<Option<NewKey>, BackendError> {
        for _ in 0..2 {
            let key = generate_key()?;
            let now = self.clock.now_ms();
            let mut state = self.write();
            let Some(record) = state.keys.get(&old) else {
                return Ok(None);
            };
            let (org, name) = (record.org, record.name.clone());
            let spec = record.spec_for_successor(now);
            if let Some(id) = state.insert_key(org, name, spec, &key, now) {
                state.revoke(old, now, now.saturating_add(grace_ms));
                return Ok(Some(NewKey {
                    id,
                    secret: key.secret,
                    prefix: key.prefix,
                }));
            }
        }
        Err(hash_collision())
    }
}

impl Default for MemoryKeyStore {
    fn default() -> Self {
        Self::new(SystemClock::shared())
    }
}

impl fmt::Debug for MemoryKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("MemoryKeyStore")
            .field("orgs", &state.orgs.len())
            .field("keys", &state.keys.len())
            .field("active_keys", &state.by_hash.len())
            .field("models", &state.models.len())
            .finish()
    }
}

impl KeyStore for MemoryKeyStore {
    fn lookup(&self, hash: KeyHash) -> BoxFuture<Result<Option<KeyGrant>, BackendError>> {
        Box::pin(ready(Ok(self.lookup_now(&hash))))
    }

    fn owns_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        let owned = self.read().models.get(&model) == Some(&org);
        Box::pin(ready(Ok(owned)))
    }

    fn record_use(&self, key: KeyId, at_ms: u64) {
        if let Some(record) = self.read().keys.get(&key) {
            record.touch(at_ms);
        }
    }

    fn set_subscription(
        &self,
        org: OrgId,
        plan: Option<Plan>,
    ) -> BoxFuture<Result<(), BackendError>> {
        self.write().orgs.entry(org).or_default().plan = plan;
        Box::pin(ready(Ok(())))
    }

    fn add_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        let owner = *self.write().models.entry(model).or_insert(org);
        Box::pin(ready(Ok(owner == org)))
    }

    fn create_key_with(
        &self,
        org: OrgId,
        name: String,
        spec: KeySpec,
    ) -> BoxFuture<Result<NewKey, BackendError>> {
        Box::pin(ready(self.create_key_now(org, name, spec)))
    }

    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>> {
        let now = self.clock.now_ms();
        Box::pin(ready(Ok(self.write().revoke(key, now, now))))
    }

    fn rotate_key_with_grace(
        &self,
        key: KeyId,
        grace_ms: u64,
    ) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
        Box::pin(ready(self.rotate_key_now(key, grace_ms)))
    }

    fn list_keys(&self, org: OrgId) -> BoxFuture<Result<Vec<KeyInfo>, BackendError>> {
        let now = self.clock.now_ms();
        let state = self.read();
        let keys = state.orgs.get(&org).map_or_else(Vec::new, |o| {
            o.keys
                .iter()
                .filter_map(|id| state.keys.get(id).map(|r| r.info(*id, now)))
                .collect()
        });
        Box::pin(ready(Ok(keys)))
    }

    fn key_info(&self, key: KeyId) -> BoxFuture<Result<Option<KeyInfo>, BackendError>> {
        let now = self.clock.now_ms();
        let info = self.read().keys.get(&key).map(|r| r.info(key, now));
        Box::pin(ready(Ok(info)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_moves_forward_at_most_once_per_second() {
        let record = KeyRecord {
            org: OrgId::new(),
            name: String::new(),
            prefix: String::new(),
            hash: KeyHash::of("x"),
            status: KeyStatus::Active,
            created_at_ms: 0,
            last_used_ms: AtomicU64::new(NEVER),
            revoked_at_ms: None,
            expires_at_ms: None,
            scopes: crate::store::Scopes::ALL,
            models: None,
            credit_limit: None,
        };
        record.touch(0);
        assert_eq!(record.last_used_ms.load(Ordering::Relaxed), 0);
        record.touch(999);
        assert_eq!(record.last_used_ms.load(Ordering::Relaxed), 0);
        record.touch(1_000);
        assert_eq!(record.last_used_ms.load(Ordering::Relaxed), 1_000);
        // A late report from another thread never moves it back.
        record.touch(500);
        assert_eq!(record.last_used_ms.load(Ordering::Relaxed), 1_000);
    }
}
