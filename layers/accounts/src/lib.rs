//! Customer accounts of a tollgate gateway (not a layer): the people who sign in to its
//! dashboard, their sessions, and the usage rollups they are billed by.
//!
//! - [`UserStore`]: users (`owner` or `viewer` of one organization, email unique across the
//!   installation), single-use invites stored as hashes and valid [`INVITE_TTL`], Argon2id
//!   password hashes, and the sign-in throttle ([`MAX_SIGN_IN_FAILURES`] per
//!   [`SIGN_IN_WINDOW`]).
//! - [`DashboardSessionStore`]: sessions by the hash of an opaque random token, ending after
//!   [`IDLE_TIMEOUT`] unused or [`ABSOLUTE_TIMEOUT`] after sign-in.
//! - [`UsageStore`]: per (organization, model, route, UTC hour) counts of requests by outcome
//!   and credits, kept [`USAGE_RETENTION`]; writers add into rows, so replicas share them.
//! - [`Passwords`] (Argon2id), [`SecretToken`] / [`TokenHash`] (256-bit tokens, SHA-256 at
//!   rest).
//!
//! Each store has a memory implementation and, with the `postgres` feature, a PostgreSQL one
//! (`PostgresUserStore`, `PostgresDashboardSessionStore`, `PostgresUsageStore`), each with
//! its own migration set.
//!
//! ```
//! use std::sync::Arc;
//! use tollgate_accounts::{
//!     normalize_email, InviteOutcome, MemoryUserStore, NewInvite, Passwords, Role, SecretToken,
//!     UserStore,
//! };
//! use tollgate_core::{OrgId, SystemClock};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tollgate_core::BackendError> {
//! let users = MemoryUserStore::new(SystemClock::shared());
//! let passwords = Passwords::with_cost(64, 1)?; // cheap for the example; `new()` in production
//! let token = SecretToken::generate()?; // goes into the invite URL; only its hash is stored
//! let invite = NewInvite {
//!     org: OrgId::new(),
//!     email: normalize_email("Ana@Example.com").unwrap(),
//!     role: Role::Owner,
//!     token: token.hash(),
//! };
//! let InviteOutcome::Invited(user) = users.invite(invite).await? else { unreachable!() };
//! assert!(!user.active);
//!
//! let hash = passwords.hash("correct horse battery").await?;
//! let user = users.accept_invite(token.hash(), hash).await?.expect("a fresh invite");
//! assert!(user.active);
//! assert!(users.accept_invite(token.hash(), "x".into()).await?.is_none(), "single use");
//!
//! let creds = users.credentials("ana@example.com".into()).await?.unwrap();
//! assert!(passwords.verify("correct horse battery", creds.password_hash.as_deref()).await?);
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod memory;
pub mod password;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sessions;
pub mod token;
pub mod usage;
pub mod user;
pub mod users;

pub use memory::{MemoryDashboardSessionStore, MemoryUsageStore, MemoryUserStore};
pub use password::{
    check_new_password, Passwords, WeakPassword, DEFAULT_M_COST_KIB, DEFAULT_T_COST,
    MAX_PASSWORD_BYTES, MIN_PASSWORD_CHARS,
};
#[cfg(feature = "postgres")]
pub use postgres::{PostgresDashboardSessionStore, PostgresUsageStore, PostgresUserStore};
pub use sessions::{
    DashboardSession, DashboardSessionStore, SessionSubject, ABSOLUTE_TIMEOUT, IDLE_TIMEOUT,
};
pub use token::{constant_time_eq, SecretToken, TokenHash, TOKEN_LEN};
pub use usage::{
    Granularity, GroupBy, UsageBatch, UsageBucket, UsageCounts, UsageKey, UsageQuery, UsageRow,
    UsageStore, DAY_MS, HOUR_MS, USAGE_RETENTION,
};
pub use user::{
    normalize_email, Role, RoleParseError, User, UserId, UserIdParseError, MAX_EMAIL_LEN,
};
pub use users::{
    Credentials, InviteOutcome, NewInvite, SignInGate, UserStore, INVITE_TTL, MAX_SIGN_IN_FAILURES,
    SIGN_IN_WINDOW,
};
