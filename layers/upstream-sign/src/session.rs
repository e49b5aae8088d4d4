//! The model's upstream session and the [`SessionStore`] extension point.

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;
use serde::{Deserialize, Serialize};
use tollgate_core::{BackendError, BoxFuture, ModelId, OrgId};

/// The OnlyFans session material of one connected account (docs/contract.md §5): sent as the `cookie`,
/// `user-id`, `x-bc` and `user-agent` headers of every upstream request.
///
/// `Debug` redacts the cookie and the device token; nothing in this crate logs a session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// At least `sess=…; auth_id=…`.
    pub cookie: String,
    /// The account id (`auth_id`).
    pub user_id: String,
    /// The device token the session was created with.
    pub x_bc: String,
    /// The user agent of the browser that created the session.
    pub user_agent: String,
}

impl Session {
    /// A session from its four parts.
    pub fn new(
        cookie: impl Into<String>,
        user_id: impl Into<String>,
        x_bc: impl Into<String>,
        user_agent: impl Into<String>,
    ) -> Self {
        Session {
            cookie: cookie.into(),
            user_id: user_id.into(),
            x_bc: x_bc.into(),
            user_agent: user_agent.into(),
        }
    }

    /// Checks that every part is present and can be sent as a header value (what the admin
    /// API should check before storing a session). The error names the field, never its value.
    pub fn validate(&self) -> Result<(), InvalidSession> {
        for (field, value) in [
            ("cookie", &self.cookie),
            ("user_id", &self.user_id),
            ("x_bc", &self.x_bc),
            ("user_agent", &self.user_agent),
        ] {
            if value.trim().is_empty() {
                return Err(InvalidSession {
                    field,
                    reason: "is empty",
                });
            }
            if HeaderValue::from_str(value).is_err() {
                return Err(InvalidSession {
                    field,
                    reason: "contains characters a header cannot carry",
                });
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("cookie", &"<redacted>")
            .field("user_id", &self.user_id)
            .field("x_bc", &"<redacted>")
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

/// A session part that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session `{field}` {reason}")]
pub struct InvalidSession {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Whether a model's session is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    /// The session works (as far as we know).
    Connected,
    /// The upstream said the session is dead; requests short-circuit with 502
    /// `MODEL_SESSION_EXPIRED` until the model is reconnected.
    Disconnected,
}

impl ModelStatus {
    /// `"connected"` or `"disconnected"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Connected => "connected",
            ModelStatus::Disconnected => "disconnected",
        }
    }
}

impl fmt::Display for ModelStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connected creator account, without its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The model's id.
    pub id: ModelId,
    /// The organization it belongs to.
    pub org: OrgId,
    /// A name for humans.
    pub name: String,
    /// Whether its session works.
    pub status: ModelStatus,
    /// When the upstream last refused its session (ms since the epoch); kept after a
    /// reconnect, `None` if that never happened.
    #[serde(default)]
    pub disconnected_at_ms: Option<u64>,
}

/// What the request path reads for a model: its session, its status and the session's
/// version.
///
/// The version identifies one session of the model: [`SessionStore::connect`] and every
/// [`SessionStore::reconnect`] give the model a new, higher one. A request remembers the
/// version it was signed with, so an answer that arrives after the model was reconnected
/// (the upstream refusing the *old* session) cannot disconnect the new one
/// ([`SessionStore::mark_disconnected`] applies only to the version it names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSession {
    /// The session material (`Debug` redacts its secrets).
    pub session: Session,
    /// Whether the session works.
    pub status: ModelStatus,
    /// The version of this session: greater after every connect or reconnect.
    pub version: u64,
}

/// Where models and their sessions live. Implementations must be safe under concurrent use
/// and must never log session material.
pub trait SessionStore: Send + Sync + 'static {
    /// The model's session, status and session version; `None` when the model does not
    /// exist.
    fn session(&self, model: ModelId) -> BoxFuture<Result<Option<ModelSession>, BackendError>>;

    /// Marks the model `disconnected` (persisted) if its session is still the one of
    /// `version`; a model reconnected since keeps its new session and status.
    ///
    /// Returns `true` when the model is disconnected at `version` (by this call or an
    /// earlier one), `false` when nothing applied: the model does not exist, or its session
    /// was replaced since `version` was read.
    fn mark_disconnected(
        &self,
        model: ModelId,
        version: u64,
    ) -> BoxFuture<Result<bool, BackendError>>;

    /// Adds a new, connected model to `org`.
    fn connect(
        &self,
        org: OrgId,
        name: String,
        session: Session,
    ) -> BoxFuture<Result<ModelRecord, BackendError>>;

    /// Replaces the model's session (with a new version) and marks it connected; `None` when
    /// it does not exist.
    fn reconnect(
        &self,
        model: ModelId,
        session: Session,
    ) -> BoxFuture<Result<Option<ModelRecord>, BackendError>>;

    /// The model, without its session.
    fn model(&self, model: ModelId) -> BoxFuture<Result<Option<ModelRecord>, BackendError>>;

    /// The org's models, oldest first.
    fn list(&self, org: OrgId) -> BoxFuture<Result<Vec<ModelRecord>, BackendError>>;
}

macro_rules! forward_session_store {
    ($($ptr:ident),*) => {$(
        impl<T: SessionStore + ?Sized> SessionStore for $ptr<T> {
            fn session(
                &self,
                model: ModelId,
            ) -> BoxFuture<Result<Option<ModelSession>, BackendError>> {
                (**self).session(model)
            }

            fn mark_disconnected(
                &self,
                model: ModelId,
                version: u64,
            ) -> BoxFuture<Result<bool, BackendError>> {
                (**self).mark_disconnected(model, version)
            }

            fn connect(
                &self,
                org: OrgId,
                name: String,
                session: Session,
            ) -> BoxFuture<Result<ModelRecord, BackendError>> {
                (**self).connect(org, name, session)
            }

            fn reconnect(
                &self,
                model: ModelId,
                session: Session,
            ) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
                (**self).reconnect(model, session)
            }

            fn model(&self, model: ModelId) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
                (**self).model(model)
            }

            fn list(&self, org: OrgId) -> BoxFuture<Result<Vec<ModelRecord>, BackendError>> {
                (**self).list(org)
            }
        }
    )*};
}

forward_session_store!(Arc, Box);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_secrets() {
        let s = Session::new(
            "sess=SECRETCOOKIE; auth_id=42",
            "42",
            "XBCTOKEN",
            "Mozilla/5.0",
        );
        let text = format!("{s:?}");
        assert!(!text.contains("SECRETCOOKIE"), "{text}");
        assert!(!text.contains("XBCTOKEN"), "{text}");
        assert!(
            text.contains("42") && text.contains("Mozilla/5.0"),
            "{text}"
        );
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn validate_names_the_bad_field_only() {
        assert_eq!(Session::new("c", "1", "x", "ua").validate(), Ok(()));
        let err = Session::new("c", "1", "", "ua").validate().unwrap_err();
        assert_eq!(err.field, "x_bc");
        let err = Session::new("sess=a\r\nx: y", "1", "x", "ua")
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "cookie");
        assert!(!err.to_string().contains("sess=a"));
    }

    #[test]
    fn serde_shapes() {
        let s: Session =
            serde_json::from_str(r#"{"cookie":"c","user_id":"1","x_bc":"x","user_agent":"ua"}"#)
                .unwrap();
        assert_eq!(s, Session::new("c", "1", "x", "ua"));
        assert!(
            serde_json::from_str::<Session>(r#"{"cookie":"c","user_id":"1","x_bc":"x"}"#).is_err()
        );
        assert_eq!(
            serde_json::to_string(&ModelStatus::Disconnected).unwrap(),
            r#""disconnected""#
        );
        assert_eq!(
            serde_json::from_str::<ModelStatus>(r#""connected""#).unwrap(),
            ModelStatus::Connected
        );
    }
}
