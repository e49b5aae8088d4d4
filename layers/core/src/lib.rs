//! Shared vocabulary of the tollgate layers.
//!
//! Every tollgate layer depends on this crate and on no other layer: the layers meet only
//! through the typed request and response extensions defined here. The crate does no I/O.
//!
//! - [`ids`]: [`OrgId`], [`ModelId`], [`KeyId`].
//! - [`plan`]: the subscription [`Plan`]s with their credits and rate limits (docs/contract.md §3).
//! - [`route`]: the [`CostTable`], a lookup from `(method, path)` to a priced route.
//! - [`ext`]: the extensions the layers exchange ([`Principal`], [`RateLimitInfo`],
//!   [`CreditReceipt`], [`RequestId`], …).
//! - [`error`]: [`ErrorCode`] and [`Rejection`], which renders the `{error, code}` body.
//! - [`body`]: [`GateBody`], a response body that is either the inner body or a rejection.
//! - [`clock`]: the [`Clock`] trait with a system, a manual and a tokio-driven clock.
//!
//! ```
//! use tollgate_core::{CostTable, ErrorCode, Plan};
//! use http::Method;
//!
//! let table = CostTable::onlyfans();
//! let m = table
//!     .lookup(&Method::GET, "/api/models/0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10/payouts/stats")
//!     .unwrap();
//! assert_eq!(m.cost(), 2);
//! assert_eq!(m.template(), "/api/models/:id/payouts/stats");
//! assert_eq!(Plan::Basic.requests_per_minute(), 60);
//! assert_eq!(ErrorCode::RateLimitExceeded.status(), http::StatusCode::TOO_MANY_REQUESTS);
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod clock;
pub mod error;
pub mod ext;
pub mod ids;
pub mod plan;
pub mod route;
pub mod time;

pub use body::GateBody;
#[cfg(feature = "tokio")]
pub use clock::TokioClock;
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use error::{BackendError, BackendErrorKind, BackendFailure, ErrorCode, Rejection};
pub use ext::{
    CreditReceipt, CreditSettlement, Identity, IdentitySlot, JsonBodyRequired, KeyCreditLimit,
    Principal, RateLimitInfo, RequestId,
};
pub use ids::{IdParseError, KeyId, ModelId, OrgId};
pub use plan::{Plan, PlanParseError};
pub use route::{CostTable, RouteMatch, RouteSpec, UpstreamTarget};

/// The error type of boxed, type-erased failures (the same shape tower and hyper use).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future type returned by backend traits (`KeyStore`, `WindowStore`, `Ledger`,
/// `LogSink`, `Signer`, `SessionStore`): boxed so the traits stay object-safe and a gateway
/// can pick its backends at run time (`Arc<dyn KeyStore>`).
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;
