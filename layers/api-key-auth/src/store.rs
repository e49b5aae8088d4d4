//! [`KeyStore`]: where keys, subscriptions and model ownership live.

use std::fmt;
use std::sync::Arc;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};
use tollgate_core::time::rfc3339_from_ms;
use tollgate_core::{BackendError, BoxFuture, KeyId, ModelId, OrgId, Plan, Principal};

use crate::key::KeyHash;

/// What a valid key grants: the key, its org, and the org's active plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyGrant {
    /// The key.
    pub key: KeyId,
    /// The key's organization.
    pub org: OrgId,
    /// The organization's active plan; `None` when it has no active subscription.
    pub plan: Option<Plan>,
}

impl KeyGrant {
    /// The [`Principal`] the grant stands for, when the org has an active plan.
    pub fn principal(&self) -> Option<Principal> {
        self.plan.map(|plan| Principal {
            org: self.org,
            key: self.key,
            plan,
        })
    }
}

/// A key just created: the only moment its secret exists outside the client's hands.
/// `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The key's public id.
    pub id: KeyId,
    /// The full key (`sk_live_…`), shown once to the admin and never stored.
    pub secret: String,
    /// The display prefix kept by the store (`sk_live_ab12`).
    pub prefix: String,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Whether a key still opens the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// The key authenticates requests.
    Active,
    /// The key was revoked (or rotated away) and is refused with 401.
    Revoked,
}

impl KeyStatus {
    /// `active` or `revoked`, as in the admin API.
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
        }
    }
}

impl fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the admin API shows of a key: never the secret, only its display prefix.
///
/// Serializes to the admin API's list item (docs/contract.md §5):
/// `{"id", "name", "prefix", "status", "created_at", "last_used_at"}` with RFC 3339 times
/// (`last_used_at` is `null` for a key never used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's public id.
    pub id: KeyId,
    /// The organization the key belongs to.
    pub org: OrgId,
    /// The name the admin gave it.
    pub name: String,
    /// The display prefix (`sk_live_ab12`).
    pub prefix: String,
    /// Active or revoked.
    pub status: KeyStatus,
    /// When it was created, ms since the epoch.
    pub created_at_ms: u64,
    /// When it last authenticated a request, ms since the epoch, to within a second (see
    /// [`KeyStore::record_use`]); `None` if never.
    pub last_used_at_ms: Option<u64>,
}

impl Serialize for KeyInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("KeyInfo", 6)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("prefix", &self.prefix)?;
        st.serialize_field("status", &self.status)?;
        st.serialize_field("created_at", &rfc3339_from_ms(self.created_at_ms))?;
        st.serialize_field("last_used_at", &self.last_used_at_ms.map(rfc3339_from_ms))?;
        st.end()
    }
}

/// Keys, subscriptions and model ownership, as the auth layer and the admin API need them.
///
/// Object-safe: a gateway picks its backend at run time as `Arc<dyn KeyStore>`. Every async
/// method returns a [`BoxFuture`] that owns what it needs (`'static`). Organizations are not
/// created here: an org id the store has not seen simply has no subscription, no keys and no
/// models.
pub trait KeyStore: Send + Sync + 'static {
    /// The grant of the key whose hash is `hash`; `None` when no active key has that hash
    /// (unknown or revoked). Implementations compare the stored hash with `hash` in constant
    /// time.
    fn lookup(&self, hash: KeyHash) -> BoxFuture<Result<Option<KeyGrant>, BackendError>>;

    /// Whether `model` belongs to `org` (`false` for an unknown model too).
    fn owns_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>>;

    /// Notes that `key` authenticated a request at `at_ms`. Called on every authenticated
    /// request, so it must be cheap and never block on I/O: implementations keep last-used
    /// times to a resolution of one second (the memory store updates an atomic at most once
    /// per second of clock per key; a persistent store buffers and writes in batches).
    fn record_use(&self, key: KeyId, at_ms: u64);

    /// Subscribes `org` to `plan` or changes its plan; `None` cancels the subscription, after
    /// which the org's keys get 402 `NO_SUBSCRIPTION`.
    fn set_subscription(
        &self,
        org: OrgId,
        plan: Option<Plan>,
    ) -> BoxFuture<Result<(), BackendError>>;

    /// Gives `model` to `org`. Returns `false`, changing nothing, when the model already
    /// belongs to another org (a model has exactly one owner); adding it twice to the same
    /// org is fine.
    fn add_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>>;

    /// Creates an active key for `org`; the returned secret is never seen again.
    fn create_key(&self, org: OrgId, name: String) -> BoxFuture<Result<NewKey, BackendError>>;

    /// Revokes `key` (at once: the next lookup refuses it). `false` when the key is unknown;
    /// revoking a revoked key is a no-op that returns `true`.
    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>>;

    /// Issues a new key with the same org and name and revokes the old one, atomically.
    /// `None` when the key is unknown. Rotating an already revoked key issues a new key too
    /// (the old one stays revoked).
    fn rotate_key(&self, key: KeyId) -> BoxFuture<Result<Option<NewKey>, BackendError>>;

    /// The org's keys, active and revoked, oldest first.
    fn list_keys(&self, org: OrgId) -> BoxFuture<Result<Vec<KeyInfo>, BackendError>>;

    /// One key, or `None` when unknown.
    fn key_info(&self, key: KeyId) -> BoxFuture<Result<Option<KeyInfo>, BackendError>>;
}

impl<T: KeyStore + ?Sized> KeyStore for Arc<T> {
    fn lookup(&self, hash: KeyHash) -> BoxFuture<Result<Option<KeyGrant>, BackendError>> {
        (**self).lookup(hash)
    }

    fn owns_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        (**self).owns_model(org, model)
    }

    fn record_use(&self, key: KeyId, at_ms: u64) {
        (**self).record_use(key, at_ms)
    }

    fn set_subscription(
        &self,
        org: OrgId,
        plan: Option<Plan>,
    ) -> BoxFuture<Result<(), BackendError>> {
        (**self).set_subscription(org, plan)
    }

    fn add_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        (**self).add_model(org, model)
    }

    fn create_key(&self, org: OrgId, name: String) -> BoxFuture<Result<NewKey, BackendError>> {
        (**self).create_key(org, name)
    }

    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>> {
        (**self).revoke_key(key)
    }

    fn rotate_key(&self, key: KeyId) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
        (**self).rotate_key(key)
    }

    fn list_keys(&self, org: OrgId) -> BoxFuture<Result<Vec<KeyInfo>, BackendError>> {
        (**self).list_keys(org)
    }

    fn key_info(&self, key: KeyId) -> BoxFuture<Result<Option<KeyInfo>, BackendError>> {
        (**self).key_info(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_info_serializes_to_the_admin_shape() {
        let id = KeyId::new();
        let info = KeyInfo {
            id,
            org: OrgId::new(),
            name: "ci".to_owned(),
            prefix: "sk_live_ab12".to_owned(),
            status: KeyStatus::Revoked,
            created_at_ms: 1_675_150_502_748,
            last_used_at_ms: None,
        };
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            serde_json::json!({
                "id": id.to_string(),
                "name": "ci",
                "prefix": "sk_live_ab12",
                "status": "revoked",
                "created_at": "2023-01-31T07:35:02.748Z",
                "last_used_at": null,
            })
        );
        let used = KeyInfo {
            last_used_at_ms: Some(1_675_150_503_000),
            status: KeyStatus::Active,
            ..info
        };
        let json = serde_json::to_value(&used).unwrap();
        assert_eq!(json["last_used_at"], "2023-01-31T07:35:03.000Z");
        assert_eq!(json["status"], "active");
    }

    #[test]
    fn grant_without_plan_has_no_principal() {
        let grant = KeyGrant {
            key: KeyId::new(),
            org: OrgId::new(),
            plan: None,
        };
        assert_eq!(grant.principal(), None);
        let with_plan = KeyGrant {
            plan: Some(Plan::Pro),
            ..grant
        };
        assert_eq!(
            with_plan.principal(),
            Some(Principal {
                org: grant.org,
                key: grant.key,
                plan: Plan::Pro
            })
        );
    }
}
