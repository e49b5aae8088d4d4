//! The [`UserStore`] extension point: users, their invites and passwords, and the sign-in
//! throttle.

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{BackendError, BoxFuture, OrgId};

use crate::token::TokenHash;
use crate::user::{Role, User, UserId};

/// How long an invite can be used.
pub const INVITE_TTL: Duration = Duration::from_secs(72 * 60 * 60);

/// The sign-in throttle's window: counted from the first attempt.
pub const SIGN_IN_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Failed sign-ins allowed per key (email) and window; further attempts are refused until
/// the window ends.
pub const MAX_SIGN_IN_FAILURES: u32 = 5;

/// A user to invite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInvite {
    /// The organization the user joins.
    pub org: OrgId,
    /// The normalized email ([`normalize_email`](crate::normalize_email)).
    pub email: String,
    /// The user's role.
    pub role: Role,
    /// The hash of the invite token (the token itself goes into the invite URL only).
    pub token: TokenHash,
}

/// The answer to [`UserStore::invite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InviteOutcome {
    /// The user exists (without a password) and the invite is valid for [`INVITE_TTL`].
    Invited(User),
    /// A user with this email already exists (in any organization).
    EmailTaken,
}

/// A user and their password hash, for signing in.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub user: User,
    /// The PHC string of the password; `None` until the invite is accepted.
    pub password_hash: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field(
                "password_hash",
                &self.password_hash.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

/// The answer to [`UserStore::sign_in_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInGate {
    /// The attempt may go ahead; it counts as a failure unless
    /// [`UserStore::sign_in_succeeded`] follows.
    Allowed,
    /// Too many failures in the current window: refuse without checking the password.
    Throttled {
        /// When the window ends (ms since the epoch).
        until_ms: u64,
    },
}

/// Where users, invites and the sign-in throttle live. Object-safe (`Arc<dyn UserStore>`).
///
/// Times come from the store's clock. Emails are compared as given: callers normalize them
/// with [`normalize_email`](crate::normalize_email) first.
pub trait UserStore: Send + Sync + 'static {
    /// Creates a user without a password and an invite for them, valid for [`INVITE_TTL`].
    fn invite(&self, invite: NewInvite) -> BoxFuture<Result<InviteOutcome, BackendError>>;

    /// The organization's users, oldest first.
    fn users(&self, org: OrgId) -> BoxFuture<Result<Vec<User>, BackendError>>;

    /// One user.
    fn user(&self, id: UserId) -> BoxFuture<Result<Option<User>, BackendError>>;

    /// Deletes a user and their invites; returns the user that was deleted.
    fn delete_user(&self, id: UserId) -> BoxFuture<Result<Option<User>, BackendError>>;

    /// The user a still-usable invite (not used, not expired) is for.
    fn pending_invite(&self, token: TokenHash) -> BoxFuture<Result<Option<User>, BackendError>>;

    /// Uses an invite: atomically marks it used and sets the user's password hash. `None`
    /// when the invite is unknown, used or expired (of two concurrent calls one wins).
    fn accept_invite(
        &self,
        token: TokenHash,
        password_hash: String,
    ) -> BoxFuture<Result<Option<User>, BackendError>>;

    /// The user with this email and their password hash.
    fn credentials(&self, email: String) -> BoxFuture<Result<Option<Credentials>, BackendError>>;

    /// Replaces a user's password hash; `false` for an unknown user.
    fn set_password(
        &self,
        id: UserId,
        password_hash: String,
    ) -> BoxFuture<Result<bool, BackendError>>;

    /// Counts a sign-in attempt for `key` (an email, or another principal's name) in the
    /// current window of [`SIGN_IN_WINDOW`], which starts at the first attempt. After
    /// [`MAX_SIGN_IN_FAILURES`] attempts that did not succeed, further ones are
    /// [`Throttled`](SignInGate::Throttled) until the window ends. Atomic: concurrent
    /// attempts cannot slip past the limit, also across replicas sharing a database.
    fn sign_in_attempt(&self, key: String) -> BoxFuture<Result<SignInGate, BackendError>>;

    /// The attempt succeeded: forgets the key's counted attempts.
    fn sign_in_succeeded(&self, key: String) -> BoxFuture<Result<(), BackendError>>;

    /// Deletes used and expired invites and ended throttle windows; returns how many rows
    /// went.
    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>>;
}

impl<T: UserStore + ?Sized> UserStore for Arc<T> {
    fn invite(&self, invite: NewInvite) -> BoxFuture<Result<InviteOutcome, BackendError>> {
        (**self).invite(invite)
    }
    fn users(&self, org: OrgId) -> BoxFuture<Result<Vec<User>, BackendError>> {
        (**self).users(org)
    }
    fn user(&self, id: UserId) -> BoxFuture<Result<Option<User>, BackendError>> {
        (**self).user(id)
    }
    fn delete_user(&self, id: UserId) -> BoxFuture<Result<Option<User>, BackendError>> {
        (**self).delete_user(id)
    }
    fn pending_invite(&self, token: TokenHash) -> BoxFuture<Result<Option<User>, BackendError>> {
        (**self).pending_invite(token)
    }
    fn accept_invite(
        &self,
        token: TokenHash,
        password_hash: String,
    ) -> BoxFuture<Result<Option<User>, BackendError>> {
        (**self).accept_invite(token, password_hash)
    }
    fn credentials(&self, email: String) -> BoxFuture<Result<Option<Credentials>, BackendError>> {
        (**self).credentials(email)
    }
    fn set_password(
        &self,
        id: UserId,
        password_hash: String,
    ) -> BoxFuture<Result<bool, BackendError>> {
        (**self).set_password(id, password_hash)
    }
    fn sign_in_attempt(&self, key: String) -> BoxFuture<Result<SignInGate, BackendError>> {
        (**self).sign_in_attempt(key)
    }
    fn sign_in_succeeded(&self, key: String) -> BoxFuture<Result<(), BackendError>> {
        (**self).sign_in_succeeded(key)
    }
    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        (**self).purge_expired()
    }
}
