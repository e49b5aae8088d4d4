//! [`KeyStore`]: where keys, subscriptions and model ownership live.

use std::fmt;
use std::sync::Arc;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};
use tollgate_core::time::rfc3339_from_ms;
use tollgate_core::{BackendError, BoxFuture, KeyId, ModelId, OrgId, Plan, Principal};

use crate::key::KeyHash;

/// Which kinds of request a key may make (docs/contract.md §13): `read` covers `GET` (and
/// `HEAD`) routes, `write` covers `POST` and `DELETE`. A key has at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scopes {
    /// `GET` routes.
    pub read: bool,
    /// `POST` and `DELETE` routes.
    pub write: bool,
}

impl Scopes {
    /// Both scopes: the default of a new key.
    pub const ALL: Scopes = Scopes {
        read: true,
        write: true,
    };
    /// `read` only.
    pub const READ: Scopes = Scopes {
        read: true,
        write: false,
    };
    /// `write` only.
    pub const WRITE: Scopes = Scopes {
        read: false,
        write: true,
    };

    /// Whether a request with `method` is within these scopes.
    pub fn allows(self, method: &http::Method) -> bool {
        if *method == http::Method::GET || *method == http::Method::HEAD {
            self.read
        } else {
            self.write
        }
    }

    /// The scope names, in the admin API's order (`["read", "write"]`).
    pub fn names(self) -> Vec<&'static str> {
        let mut names = Vec::with_capacity(2);
        if self.read {
            names.push("read");
        }
        if self.write {
            names.push("write");
        }
        names
    }

    /// Parses a list of scope names; `None` when it is empty or names an unknown scope.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Scopes> {
        let mut scopes = Scopes {
            read: false,
            write: false,
        };
        for name in names {
            match name {
                "read" => scopes.read = true,
                "write" => scopes.write = true,
                _ => return None,
            }
        }
        (scopes.read || scopes.write).then_some(scopes)
    }
}

impl Default for Scopes {
    fn default() -> Self {
        Scopes::ALL
    }
}

/// What a key may do beyond authenticating (docs/contract.md §13), chosen when it is created.
/// The default is a key without expiry, with both scopes, for every model of its org, and
/// without a credit limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeySpec {
    /// From then on (ms since the epoch) the key is refused with 401 and lists as `expired`.
    pub expires_at_ms: Option<u64>,
    /// The kinds of request it may make.
    pub scopes: Scopes,
    /// The org's models it may use; `None`: all of them.
    pub models: Option<Vec<ModelId>>,
    /// The most credits it may spend per billing period; `None`: no limit of its own.
    pub credit_limit: Option<u64>,
}

/// The limits of a valid key, as the auth layer enforces them on each request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct KeyLimits {
    /// When the key stops authenticating (ms since the epoch): its expiry, or the end of the
    /// grace period of a rotation, whichever comes first. `None`: never.
    pub ends_at_ms: Option<u64>,
    /// The kinds of request it may make.
    pub scopes: Scopes,
    /// The models it may use; `None`: every model of its org.
    pub models: Option<Arc<[ModelId]>>,
    /// Its credit limit per billing period.
    pub credit_limit: Option<u64>,
}

impl KeyLimits {
    /// Whether the key still authenticates at `now_ms`.
    pub fn is_live_at(&self, now_ms: u64) -> bool {
        self.ends_at_ms.is_none_or(|end| now_ms < end)
    }

    /// Whether the key may use `model`.
    pub fn allows_model(&self, model: ModelId) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(&model))
    }
}

/// What a valid key grants: the key, its org, the org's active plan and the key's limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyGrant {
    /// The key.
    pub key: KeyId,
    /// The key's organization.
    pub org: OrgId,
    /// The organization's active plan; `None` when it has no active subscription.
    pub plan: Option<Plan>,
    /// What the key may do.
    pub limits: KeyLimits,
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
    /// The key authenticates requests (a key rotated with a grace period stays active until
    /// the grace period ends).
    Active,
    /// The key was revoked (or rotated away, and its grace period is over) and is refused
    /// with 401.
    Revoked,
    /// The key's `expires_at` has passed: it is refused with 401.
    Expired,
}

impl KeyStatus {
    /// `active`, `revoked` or `expired`, as in the admin API.
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }

    /// The status at `now_ms` of a key stored as `revoked` (or not), revoked from
    /// `revoked_at_ms` on (a time in the future during a rotation's grace period), and
    /// expiring at `expires_at_ms`. Revocation wins over expiry.
    pub fn at(
        now_ms: u64,
        revoked: bool,
        revoked_at_ms: Option<u64>,
        expires_at_ms: Option<u64>,
    ) -> Self {
        if revoked || revoked_at_ms.is_some_and(|t| t <= now_ms) {
            KeyStatus::Revoked
        } else if expires_at_ms.is_some_and(|t| t <= now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
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
/// Serializes to the admin API's list item (docs/contract.md §5, §13):
/// `{"id", "name", "prefix", "status", "created_at", "last_used_at", "expires_at", "scopes",
/// "models", "credit_limit"}` with RFC 3339 times (`last_used_at` is `null` for a key never
/// used, `expires_at` for a key that never expires, `models` for a key allowed every model,
/// `credit_limit` for a key without one). The gateway adds `credits_used_this_period` from
/// the ledger.
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
    /// Active, revoked or expired, at the time it was read.
    pub status: KeyStatus,
    /// When it was created, ms since the epoch.
    pub created_at_ms: u64,
    /// When it last authenticated a request, ms since the epoch, to within a second (see
    /// [`KeyStore::record_use`]); `None` if never.
    pub last_used_at_ms: Option<u64>,
    /// When it was revoked, or (during a rotation's grace period) will be; `None` if not.
    pub revoked_at_ms: Option<u64>,
    /// Its expiry, ms since the epoch; `None` if it never expires.
    pub expires_at_ms: Option<u64>,
    /// The kinds of request it may make.
    pub scopes: Scopes,
    /// The models it may use; `None`: every model of its org.
    pub models: Option<Vec<ModelId>>,
    /// Its credit limit per billing period; `None`: none.
    pub credit_limit: Option<u64>,
}

impl Serialize for KeyInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("KeyInfo", 10)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("prefix", &self.prefix)?;
        st.serialize_field("status", &self.status)?;
        st.serialize_field("created_at", &rfc3339_from_ms(self.created_at_ms))?;
        st.serialize_field("last_used_at", &self.last_used_at_ms.map(rfc3339_from_ms))?;
        st.serialize_field("expires_at", &self.expires_at_ms.map(rfc3339_from_ms))?;
        st.serialize_field("scopes", &self.scopes.names())?;
        st.serialize_field("models", &self.models)?;
        st.serialize_field("credit_limit", &self.credit_limit)?;
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
    /// time. A key past its expiry or its rotation's grace period may still be returned, with
    /// that time in [`KeyLimits::ends_at_ms`]: the auth layer refuses it by its own clock,
    /// so the change takes effect on every replica at that time, cache or no cache.
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

    /// Creates an active key for `org` with the default [`KeySpec`] (no expiry, both
    /// scopes, every model, no credit limit); the returned secret is never seen again.
    fn create_key(&self, org: OrgId, name: String) -> BoxFuture<Result<NewKey, BackendError>> {
        self.create_key_with(org, name, KeySpec::default())
    }

    /// Creates an active key for `org` with the expiry, scopes, models and credit limit of
    /// `spec`; the returned secret is never seen again. The caller has checked `spec`
    /// (an expiry in the future, models of the org).
    fn create_key_with(
        &self,
        org: OrgId,
        name: String,
        spec: KeySpec,
    ) -> BoxFuture<Result<NewKey, BackendError>>;

    /// Revokes `key` (at once: the next lookup refuses it, including a key still in a
    /// rotation's grace period). `false` when the key is unknown; revoking a revoked key is
    /// a no-op that returns `true`.
    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>>;

    /// [`rotate_key_with_grace`](KeyStore::rotate_key_with_grace) without a grace period:
    /// the old key is revoked at once.
    fn rotate_key(&self, key: KeyId) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
        self.rotate_key_with_grace(key, 0)
    }

    /// Issues a new key with the same org, name, scopes, models and credit limit (and the
    /// expiry, if it is still ahead) and revokes the old one `grace_ms` from now, atomically
    /// (`0`: at once). `None` when the key is unknown. Rotating an already revoked key
    /// issues a new key too (the old one stays revoked; a grace period never revives it, nor
    /// extends an earlier one).
    fn rotate_key_with_grace(
        &self,
        key: KeyId,
        grace_ms: u64,
    ) -> BoxFuture<Result<Option<NewKey>, BackendError>>;

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

    fn create_key_with(
        &self,
        org: OrgId,
        name: String,
        spec: KeySpec,
    ) -> BoxFuture<Result<NewKey, BackendError>> {
        (**self).create_key_with(org, name, spec)
    }

    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>> {
        (**self).revoke_key(key)
    }

    fn rotate_key_with_grace(
        &self,
        key: KeyId,
        grace_ms: u64,
    ) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
        (**self).rotate_key_with_grace(key, grace_ms)
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
            revoked_at_ms: Some(1_675_150_503_000),
            expires_at_ms: None,
            scopes: Scopes::ALL,
            models: None,
            credit_limit: None,
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
                "expires_at": null,
                "scopes": ["read", "write"],
                "models": null,
                "credit_limit": null,
            })
        );
        let model = ModelId::new();
        let used = KeyInfo {
            last_used_at_ms: Some(1_675_150_503_000),
            status: KeyStatus::Active,
            expires_at_ms: Some(1_675_150_600_000),
            scopes: Scopes::READ,
            models: Some(vec![model]),
            credit_limit: Some(3),
            ..info
        };
        let json = serde_json::to_value(&used).unwrap();
        assert_eq!(json["last_used_at"], "2023-01-31T07:35:03.000Z");
        assert_eq!(json["status"], "active");
        assert_eq!(json["expires_at"], "2023-01-31T07:36:40.000Z");
        assert_eq!(json["scopes"], serde_json::json!(["read"]));
        assert_eq!(json["models"], serde_json::json!([model.to_string()]));
        assert_eq!(json["credit_limit"], 3);
    }

    #[test]
    fn status_at_a_time_puts_revocation_before_expiry() {
        assert_eq!(KeyStatus::at(10, false, None, None), KeyStatus::Active);
        assert_eq!(KeyStatus::at(10, true, None, None), KeyStatus::Revoked);
        // A rotation's grace period: active until its end, then revoked.
        assert_eq!(KeyStatus::at(10, false, Some(11), None), KeyStatus::Active);
        assert_eq!(KeyStatus::at(11, false, Some(11), None), KeyStatus::Revoked);
        assert_eq!(KeyStatus::at(9, false, None, Some(10)), KeyStatus::Active);
        assert_eq!(KeyStatus::at(10, false, None, Some(10)), KeyStatus::Expired);
        assert_eq!(
            KeyStatus::at(10, false, Some(5), Some(5)),
            KeyStatus::Revoked
        );
    }

    #[test]
    fn scopes_follow_the_method() {
        use http::Method;
        assert!(Scopes::READ.allows(&Method::GET));
        assert!(!Scopes::READ.allows(&Method::POST));
        assert!(!Scopes::READ.allows(&Method::DELETE));
        assert!(Scopes::WRITE.allows(&Method::DELETE));
        assert!(!Scopes::WRITE.allows(&Method::GET));
        assert_eq!(Scopes::from_names(["write", "read"]), Some(Scopes::ALL));
        assert_eq!(Scopes::from_names([]), None);
        assert_eq!(Scopes::from_names(["admin"]), None);
        assert_eq!(Scopes::ALL.names(), ["read", "write"]);
    }

    #[test]
    fn grant_without_plan_has_no_principal() {
        let grant = KeyGrant {
            key: KeyId::new(),
            org: OrgId::new(),
            plan: None,
            limits: KeyLimits::default(),
        };
        assert_eq!(grant.principal(), None);
        let with_plan = KeyGrant {
            plan: Some(Plan::Pro),
            ..grant.clone()
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
