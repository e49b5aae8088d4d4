//! `Idempotency-Key` for tower HTTP services: [`IdempotencyLayer`] and the
//! [`IdempotencyStore`] behind it.
//!
//! A client that retries a `POST` or `DELETE` after a timeout cannot know whether the first
//! attempt ran. With an `Idempotency-Key: <1–255 printable ASCII>` header it does not need
//! to: the layer runs the first request with a given key and answers every later one with
//! that key from the stored result.
//!
//! - **First request** with a (scope, key) — the scope is the caller's org by default —
//!   runs normally. Its final response (status, the headers that describe the body such as
//!   `content-type`, and the body) is stored for 24 h ([`with_ttl`](IdempotencyLayer::with_ttl)),
//!   whatever the status — except **429 and 5xx**, which are not stored: the key is freed
//!   so that a retry runs.
//! - **Same key, same request** (method, path with query, and body — SHA-256
//!   [`Fingerprint`]) → the stored response again, with `Idempotent-Replayed: true`. The inner
//!   service is not called, so nothing inside it (a rate limit, a credit meter) counts it.
//! - **Same key, another request** → 422 `IDEMPOTENCY_KEY_REUSED`.
//! - **Same key while the first is in flight** → 409 `IDEMPOTENCY_IN_PROGRESS` (with
//!   `Retry-After: 1`).
//! - A malformed key → 400 `INVALID_REQUEST`; a request body over the buffer limit → 413
//!   `PAYLOAD_TOO_LARGE`; the store failing → 503 `SERVICE_UNAVAILABLE` (the request is never
//!   run unguarded). Other methods, and requests without the header, pass through untouched.
//!
//! **Leases.** The first request holds its key under a *lease* with a random token. The lease
//! ends when the response is stored or the key released — released also when the client
//! hangs up mid-flight, the inner service fails, or the response body fails (a guard on drop
//! hands the release to a background task; nothing awaits in `Drop`). A request whose
//! process died holds the key until the lease TTL passes
//! ([`with_lease_ttl`](IdempotencyLayer::with_lease_ttl), default 30 s); then a retry runs.
//! A store accepts a completion or release only with the key's current token, so a late
//! finisher of an expired lease never overwrites a newer run's record.
//!
//! **Order.** The layer needs the caller's identity (the `Principal` of the auth layer, or
//! [`with_scope`](IdempotencyLayer::with_scope)), so it runs *inside* authentication, and
//! *outside* whatever must not count a replay: rate limits and credit meters. The stored
//! response is what the layer saw, so put a response-shaping layer (an envelope) inside it
//! for replays to be byte-identical. The response is buffered (up to
//! [`with_max_response_body`](IdempotencyLayer::with_max_response_body); a larger one is
//! passed on unstored) and the record is written before the response is handed on, so a
//! retry after the answer arrived always replays.
//!
//! Stores: [`MemoryIdempotencyStore`] (feature `memory`, default) for one process;
//! `PostgresIdempotencyStore` (feature `postgres`) and `RedisIdempotencyStore` (feature
//! `redis`) shared by any number of replicas.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tollgate_core::{KeyId, OrgId, Plan, Principal, SystemClock};
//! use tollgate_idempotency::{IdempotencyLayer, MemoryIdempotencyStore};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tollgate_core::BoxError> {
//! let principal = Principal { org: OrgId::new(), key: KeyId::new(), plan: Plan::Basic };
//! let sent = Arc::new(AtomicUsize::new(0));
//! let counter = sent.clone();
//! let mut service = ServiceBuilder::new()
//!     // Stands in for ApiKeyAuthLayer, which puts the Principal on the request.
//!     .map_request(move |mut req: Request<Full<Bytes>>| {
//!         req.extensions_mut().insert(principal);
//!         req
//!     })
//!     .layer(IdempotencyLayer::new(MemoryIdempotencyStore::new(SystemClock)))
//!     .service_fn(move |_req| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!         async move {
//!             let mut res = Response::new(Full::new(Bytes::from(format!("{{\"message\":{n}}}"))));
//!             *res.status_mut() = StatusCode::CREATED;
//!             Ok::<_, Infallible>(res)
//!         }
//!     });
//!
//! let send = |text: &'static str| {
//!     Request::post("/api/messages")
//!         .header("idempotency-key", "order-42")
//!         .body(Full::new(Bytes::from(text)))
//!         .unwrap()
//! };
//! let first = service.ready().await?.call(send("hello")).await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert_eq!(first.into_body().collect().await?.to_bytes(), "{\"message\":1}");
//!
//! // The retry is answered from the store: the service is not called again.
//! let retry = service.ready().await?.call(send("hello")).await?;
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await?.to_bytes(), "{\"message\":1}");
//! assert_eq!(sent.load(Ordering::SeqCst), 1);
//!
//! // The same key for another body is a client bug.
//! let reused = service.ready().await?.call(send("goodbye")).await?;
//! assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! let body = reused.into_body().collect().await?.to_bytes();
//! assert!(std::str::from_utf8(&body)?.contains("\"code\":\"IDEMPOTENCY_KEY_REUSED\""));
//! # Ok(())
//! # }
//! ```

mod body;
mod future;
mod guard;
mod layer;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod store;

pub use body::IdempotencyBody;
pub use future::{ResponseFuture, BACKEND};
pub use layer::{
    IdempotencyLayer, ScopeFn, DEFAULT_LEASE_TTL, DEFAULT_MAX_REQUEST_BODY,
    DEFAULT_MAX_RESPONSE_BODY, DEFAULT_TTL,
};
#[cfg(feature = "memory")]
pub use memory::MemoryIdempotencyStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresIdempotencyStore;
#[cfg(feature = "redis")]
pub use redis::{RedisIdempotencyStore, DEFAULT_KEY_PREFIX, DEFAULT_REDIS_TIMEOUT};
pub use service::{idempotency_key, Idempotency, MAX_KEY_LEN};
pub use store::{
    Begin, Fingerprint, IdempotencyStore, Lease, LeaseToken, StoredResponse, IDEMPOTENCY_KEY,
    IDEMPOTENT_REPLAYED,
};
