//! The [`DashboardSessionStore`] extension point: signed-in dashboard sessions.

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{BackendError, BoxFuture};

use crate::token::TokenHash;
use crate::user::UserId;

/// A session unused for this long has ended.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(12 * 60 * 60);

/// A session ends this long after sign-in, however much it is used.
pub const ABSOLUTE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Who a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionSubject {
    /// A user of an organization.
    User(UserId),
    /// The operator, signed in with the admin token.
    Operator,
}

/// A live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DashboardSession {
    /// Who signed in.
    pub subject: SessionSubject,
    /// When (ms since the epoch).
    pub created_at_ms: u64,
    /// The last request made with it (ms since the epoch).
    pub last_seen_ms: u64,
}

/// Where dashboard sessions live, by the hash of their token. Object-safe.
///
/// A session is live while it was used within [`IDLE_TIMEOUT`] and began within
/// [`ABSOLUTE_TIMEOUT`] (times from the store's clock); an ended session is never returned
/// again.
pub trait DashboardSessionStore: Send + Sync + 'static {
    /// Stores a new session.
    fn create(
        &self,
        token: TokenHash,
        subject: SessionSubject,
    ) -> BoxFuture<Result<DashboardSession, BackendError>>;

    /// The live session of this token, marked as used now; `None` if unknown or ended.
    fn touch(&self, token: TokenHash) -> BoxFuture<Result<Option<DashboardSession>, BackendError>>;

    /// Ends one session (sign-out); `false` if there was none.
    fn revoke(&self, token: TokenHash) -> BoxFuture<Result<bool, BackendError>>;

    /// Ends every session of a user (password change, deletion); returns how many.
    fn revoke_user(&self, user: UserId) -> BoxFuture<Result<u64, BackendError>>;

    /// Deletes ended sessions; returns how many.
    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>>;
}

impl<T: DashboardSessionStore + ?Sized> DashboardSessionStore for Arc<T> {
    fn create(
        &self,
        token: TokenHash,
        subject: SessionSubject,
    ) -> BoxFuture<Result<DashboardSession, BackendError>> {
        (**self).create(token, subject)
    }
    fn touch(&self, token: TokenHash) -> BoxFuture<Result<Option<DashboardSession>, BackendError>> {
        (**self).touch(token)
    }
    fn revoke(&self, token: TokenHash) -> BoxFuture<Result<bool, BackendError>> {
        (**self).revoke(token)
    }
    fn revoke_user(&self, user: UserId) -> BoxFuture<Result<u64, BackendError>> {
        (**self).revoke_user(user)
    }
    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        (**self).purge_expired()
    }
}

/// Whether a session with these times is live at `now_ms`.
pub(crate) fn is_live(created_at_ms: u64, last_seen_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(last_seen_ms) < IDLE_TIMEOUT.as_millis() as u64
        && now_ms.saturating_sub(created_at_ms) < ABSOLUTE_TIMEOUT.as_millis() as u64
}
