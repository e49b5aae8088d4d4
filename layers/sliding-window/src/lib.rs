//! Per-(organization, model) rate limiting with an exact sliding window (docs/contract.md §3).
//!
//! [`PerModelSlidingWindowLayer`] gives every (organization, model) pair one bucket, shared by
//! all the organization's API keys. A request is admitted when fewer than the plan's limit
//! were admitted in the past window (60 s by default) *and* fewer than the plan's burst in
//! the past second; capacity comes back one request at a time, at the millisecond each
//! admitted request ages out. Refused requests take no capacity and are answered 429
//! `RATE_LIMIT_EXCEEDED` with `Retry-After`. Every response of a limited route carries the
//! `RateLimit-*` headers and a [`RateLimitInfo`](tollgate_core::RateLimitInfo) extension.
//!
//! The decision is taken by a [`WindowStore`]; [`MemoryWindowStore`] (feature `memory`, on
//! by default) is an exact in-process sliding log. With the feature `redis`,
//! `RedisWindowStore` shares one exact window per bucket between any number of replicas
//! through Redis or Redis Cluster (one server-side script, one round trip per decision), and
//! `FailoverWindowStore` (feature `memory`) puts a circuit breaker in front of it that fails
//! open to a local limiter or closed with 503 while Redis is down.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tollgate_core::{KeyId, ManualClock, ModelId, OrgId, Plan, Principal, RateLimitInfo};
//! use tollgate_sliding_window::{MemoryWindowStore, PerModelSlidingWindowLayer};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Infallible> {
//! let clock = ManualClock::new(1_700_000_000_000);
//! let store = MemoryWindowStore::new(Arc::new(clock.clone()));
//! let mut api = ServiceBuilder::new()
//!     .layer(PerModelSlidingWindowLayer::new(store))
//!     .service(service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
//!     }));
//!
//! // The auth layer would set this; here the caller is an org on the free plan
//! // (10 requests per minute, 5 per second).
//! let principal = Principal { org: OrgId::new(), key: KeyId::new(), plan: Plan::Free };
//! let model = ModelId::new();
//! let request = || {
//!     let mut req = Request::get(format!("/api/models/{model}/users/me"))
//!         .body(Full::default())
//!         .unwrap();
//!     req.extensions_mut().insert(principal);
//!     req
//! };
//!
//! for remaining in (5..10).rev() {
//!     let res = api.ready().await?.call(request()).await?;
//!     assert_eq!(res.status(), StatusCode::OK);
//!     assert_eq!(res.headers()["ratelimit-remaining"], remaining.to_string());
//! }
//! // A sixth request within the same second exceeds the burst.
//! let res = api.ready().await?.call(request()).await?;
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["retry-after"], "1");
//! assert_eq!(res.extensions().get::<RateLimitInfo>().unwrap().remaining, 5);
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(
//!     body,
//!     r#"{"error":"Rate limit exceeded. Slow down and try again.","code":"RATE_LIMIT_EXCEEDED"}"#
//! );
//!
//! // One second later the burst has passed.
//! clock.advance(std::time::Duration::from_secs(1));
//! let res = api.ready().await?.call(request()).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.headers()["ratelimit-remaining"], "4");
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "memory")]
mod failover;
mod future;
mod layer;
#[cfg(feature = "memory")]
mod memory;
mod policy;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod store;

#[cfg(feature = "memory")]
pub use failover::{
    CircuitState, FailoverWindowStore, FailureMode, FailureModeParseError, DEFAULT_COOL_DOWN,
    DEFAULT_FAILOVER_TIMEOUT, DEFAULT_FAILURE_THRESHOLD, MAX_QUEUED_WAIT,
};
pub use future::ResponseFuture;
pub use layer::{BucketFn, PerModelSlidingWindowLayer};
#[cfg(feature = "memory")]
pub use memory::{MemoryWindowStore, DEFAULT_SWEEP_INTERVAL};
pub use policy::{parse_plan_values, PolicyParseError, WindowPolicy};
#[cfg(feature = "redis")]
pub use redis::{RedisWindowStore, DEFAULT_KEY_PREFIX, DEFAULT_REDIS_TIMEOUT, MAX_REDIS_WINDOW_MS};
pub use service::PerModelSlidingWindow;
pub use store::{BucketKey, Decision, WindowLimits, WindowStore, BURST_WINDOW_MS};
