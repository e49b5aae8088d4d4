//! Signs upstream requests with the OnlyFans "dynamic rules", attaches the model's session,
//! and classifies the upstream's answers into tollgate error codes.
//!
//! [`UpstreamSignLayer`] wraps the gateway's *outgoing* HTTP client (any
//! `Service<http::Request<B>, Response = http::Response<RB>>`, e.g. a `hyper_util` client). Each
//! request arrives with an absolute upstream URI and the [`ModelId`](tollgate_core::ModelId)
//! in its extensions (or a [`RouteMatch`](tollgate_core::RouteMatch) naming the model). The
//! layer:
//!
//! 1. looks the model's [`Session`] up in a [`SessionStore`]; no model, or a `disconnected`
//!    one → 502 `MODEL_SESSION_EXPIRED` and nothing is sent;
//! 2. asks a [`Signer`] to sign the raw `path?query` exactly as it goes on the wire; a failure
//!    → 502 `SIGNING_FAILED` and nothing is sent;
//! 3. sets `sign`, `time`, `app-token`, `user-id`, `cookie`, `x-bc`, `user-agent`,
//!    `accept: application/json, text/plain, */*`, and `content-type: application/json` on
//!    POST/PUT/PATCH/DELETE (replacing any the caller set);
//! 4. classifies the answer (reading at most 64 KiB of a 4xx body):
//!
//! | upstream | answer |
//! |---|---|
//! | 2xx with a JSON `content-type` | passed on, body streamed (`Set-Cookie` removed) |
//! | 2xx with another or no `content-type` | 502 `UPSTREAM_ERROR` |
//! | 401 `Please refresh the page` | 502 `SIGNING_FAILED`, the model stays connected |
//! | any other 401; 403 `Access denied.`; 400 code 301 / `Wrong user.` | model marked `disconnected`, 502 `MODEL_SESSION_EXPIRED` |
//! | 429 | 429 `UPSTREAM_RATE_LIMITED`, `Retry-After` passed on when present |
//! | any other 4xx | `UPSTREAM_REJECTED` with the upstream's status, its JSON body (or text, cut to 1 KiB) under `details` |
//! | 5xx, 1xx, 3xx | 502 `UPSTREAM_ERROR` |
//! | transport error of the client | 502 `UPSTREAM_ERROR` (504 `UPSTREAM_TIMEOUT` for a timeout) |
//!
//! A disconnect applies only to the session the request was signed with: every connect and
//! reconnect gives the model's session a new version ([`ModelSession::version`]), the
//! request carries the version it read, and [`SessionStore::mark_disconnected`] changes
//! nothing when the model was reconnected in the meantime. Such a request (the upstream
//! refused the *old* session) still gets 502 `MODEL_SESSION_EXPIRED`, with the sentence "The
//! model was reconnected while this request was in flight. Retry the request.", and the
//! model stays connected.
//!
//! Decisions worth knowing: a stored session part that cannot be sent as a header can never
//! work, so it is treated as a dead session (model disconnected, `MODEL_SESSION_EXPIRED`:
//! the fix is to reconnect it); a signature that is not header text is `SIGNING_FAILED`; a
//! session-store failure is 503 `SERVICE_UNAVAILABLE` / 500 `INTERNAL_ERROR`. The response
//! future never fails (`type Error = S::Error` is only produced by the client's
//! `poll_ready`). Cookies and device tokens are never logged (`Session`'s `Debug` redacts them,
//! and their header values are marked sensitive).
//!
//! Signers: [`RulesSigner`] signs locally with [`DynamicRules`] (any public feed layout),
//! reloadable by [`RulesSigner::replace`] or a file watcher ([`RulesSigner::watch`]);
//! [`RemoteSigner`] asks a signing service over HTTP with a timeout.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tollgate_core::{ModelId, OrgId};
//! use tollgate_upstream_sign::{
//!     sandbox_rules, MemorySessionStore, RulesSigner, Session, UpstreamSignLayer,
//! };
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let sessions = Arc::new(MemorySessionStore::new());
//! let model = ModelId::new();
//! sessions.insert(model, OrgId::new(), "demo", Session::new(
//!     "sess=abc; auth_id=42", "42", "device-token", "Mozilla/5.0",
//! ));
//!
//! // Stands in for the HTTP client: checks the signature like the upstream does.
//! let upstream = tower::service_fn(|req: Request<Full<Bytes>>| async move {
//!     let h = req.headers();
//!     let signed = sandbox_rules().verify(
//!         req.uri().path_and_query().unwrap().as_str(),
//!         h["user-id"].to_str().unwrap(),
//!         h["time"].to_str().unwrap(),
//!         h["sign"].to_str().unwrap(),
//!     );
//!     let status = if signed { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
//!     Ok::<_, std::convert::Infallible>(
//!         Response::builder()
//!             .status(status)
//!             .header("content-type", "application/json")
//!             .body(Full::new(Bytes::from_static(b"{\"isAuth\":true}")))
//!             .unwrap(),
//!     )
//! });
//!
//! let client = ServiceBuilder::new()
//!     .layer(UpstreamSignLayer::new(RulesSigner::new(sandbox_rules()), sessions.clone()))
//!     .service(upstream);
//!
//! let mut req = Request::get("http://127.0.0.1:8081/api2/v2/users/me?x=%20y")
//!     .body(Full::new(Bytes::new()))
//!     .unwrap();
//! req.extensions_mut().insert(model);
//! let res = client.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod classify;
mod future;
mod layer;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
mod remote;
pub mod rules;
mod rules_signer;
mod service;
mod session;
mod signer;

pub use future::ResponseFuture;
pub use layer::{UpstreamSignLayer, DEFAULT_ERROR_BODY_LIMIT};
#[cfg(feature = "memory")]
pub use memory::MemorySessionStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresSessionStore, PostgresSessionStoreBuilder};
pub use remote::{InvalidSignerToken, InvalidSignerUrl, RemoteSigner, DEFAULT_SIGNER_TIMEOUT};
pub use rules::{sandbox_rules, DynamicRules, RulesError, Signature, SANDBOX_RULES_JSON};
pub use rules_signer::{RulesFileError, RulesSigner, RulesWatcher, DEFAULT_RULES_POLL_INTERVAL};
pub use service::UpstreamSign;
pub use session::{InvalidSession, ModelRecord, ModelSession, ModelStatus, Session, SessionStore};
pub use signer::{SignError, Signer};
