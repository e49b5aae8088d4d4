//! API key authentication for tollgate: [`ApiKeyAuthLayer`] and the [`KeyStore`] behind it.
//!
//! Clients send `X-API-Key: sk_live_…`. For each request, in the contract's order (docs/contract.md §2):
//!
//! 1. **Key** — missing, malformed, unknown or revoked → 401 `INVALID_API_KEY`. A key sent as
//!    `Authorization` instead gets the same code with a message naming the right header.
//! 2. **Subscription** — the key's org has no active plan → 402 `NO_SUBSCRIPTION`.
//! 3. **Model ownership** — the route's model (`:id`) is not the org's, or does not exist →
//!    401 `INVALID_API_KEY` with exactly the body of an unknown key, so ids cannot be probed.
//!    Routes without a model (`/api/credits`, `/api/logs`) skip this.
//!
//! Routes come from a [`CostTable`](tollgate_core::CostTable) (the OnlyFans table unless set
//! with [`ApiKeyAuthLayer::with_cost_table`]). Requests matching no route pass through
//! untouched by default: deciding that a path is a 404 belongs to whatever routes, and the
//! contract answers 404 before 401. [`UnmatchedRoutes::Authenticate`] requires a key there
//! too.
//!
//! Every refusal with 401 or 402 `NO_SUBSCRIPTION` carries `RateLimit-Limit: 0`,
//! `RateLimit-Remaining: 0` and `RateLimit-Reset: 0`: such a caller has no rate-limit window
//! (windows belong to an org's subscription and model) and may send no request until it
//! presents a valid key of a subscribed org, which waiting does not change, so there is no
//! `Retry-After`. The refused request takes no capacity from any window.
//!
//! An admitted request reaches the inner service with a [`Principal`](tollgate_core::Principal)
//! and the [`RouteMatch`](tollgate_core::RouteMatch) in its extensions and without its
//! `X-API-Key` header; its response gets the `Principal` in its extensions, for the layers
//! outside (the request logger). Rejections issued after the key was identified say whose it
//! was too: the ownership 401 carries the `Principal`, and the 402 carries the [`KeyGrant`]
//! (a `Principal` needs a plan, which that org lacks). Store failures become 503
//! `SERVICE_UNAVAILABLE` / 500 `INTERNAL_ERROR` responses, never errors.
//!
//! Keys are `sk_live_` + 64 lowercase hex characters (32 random bytes) and are stored only as
//! their SHA-256 plus a 12-character display prefix ([`key`]). [`MemoryKeyStore`] is a
//! complete in-process store (cargo feature `memory`, on by default); [`PostgresKeyStore`]
//! (cargo feature `postgres`) keeps everything in PostgreSQL, shared by any number of
//! replicas, behind a cache that `LISTEN`/`NOTIFY` keeps exact.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tollgate_api_key_auth::{ApiKeyAuthLayer, KeyStore, MemoryKeyStore};
//! use tollgate_core::{ModelId, OrgId, Plan, Principal};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let store = Arc::new(MemoryKeyStore::default());
//! let (org, model) = (OrgId::new(), ModelId::new());
//! store.set_subscription(org, Some(Plan::Basic)).await?;
//! store.add_model(org, model).await?;
//! let key = store.create_key(org, "backend".to_owned()).await?;
//!
//! let app = ServiceBuilder::new()
//!     .layer(ApiKeyAuthLayer::new(Arc::clone(&store)))
//!     .service(service_fn(|req: Request<Full<Bytes>>| async move {
//!         // The handler knows who is calling.
//!         let plan = req.extensions().get::<Principal>().map(|p| p.plan.name());
//!         Ok::<_, Infallible>(Response::new(Full::from(plan.unwrap_or("nobody"))))
//!     }));
//!
//! let uri = format!("/api/models/{model}/users/me");
//! let req = Request::get(&uri).header("x-api-key", &key.secret).body(Full::default())?;
//! let res = app.clone().oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.extensions().get::<Principal>().map(|p| p.org), Some(org));
//! assert_eq!(res.into_body().collect().await?.to_bytes(), "basic");
//!
//! let res = app.oneshot(Request::get(&uri).body(Full::default())?).await?;
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(res.headers()["ratelimit-remaining"], "0");
//! assert_eq!(
//!     res.into_body().collect().await?.to_bytes(),
//!     r#"{"error":"The API key is missing, unknown or revoked.","code":"INVALID_API_KEY"}"#
//! );
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod key;
mod store;

mod future;
mod layer;
mod service;

#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;

pub use future::ResponseFuture;
pub use key::{generate_key, GeneratedKey, KeyHash};
pub use layer::{ApiKeyAuthLayer, UnmatchedRoutes};
#[cfg(feature = "memory")]
pub use memory::{MemoryKeyStore, LAST_USED_RESOLUTION_MS};
#[cfg(feature = "postgres")]
pub use postgres::{KeyCacheStats, PostgresKeyStore, PostgresKeyStoreBuilder};
pub use service::{ApiKeyAuth, WRONG_HEADER_MESSAGE, X_API_KEY};
pub use store::{KeyGrant, KeyInfo, KeyLimits, KeySpec, KeyStatus, KeyStore, NewKey, Scopes};
