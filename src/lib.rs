//! # tollgate
//!
//! A stack of separately composable [`tower`] layers that turn any Rust HTTP service (axum,
//! hyper, tonic) into a metered, multi-tenant API gateway, plus a turnkey gateway
//! ([`gateway`], `examples/gateway.rs`) that stacks them in front of the OnlyFans web API.
//!
//! | layer | crate | feature |
//! |---|---|---|
//! | [`ApiKeyAuthLayer`](api_key_auth::ApiKeyAuthLayer) | `tollgate-api-key-auth` | `api-key-auth` |
//! | [`PerModelSlidingWindowLayer`](sliding_window::PerModelSlidingWindowLayer) | `tollgate-sliding-window` | `sliding-window` |
//! | [`CreditMeterLayer`](credit_meter::CreditMeterLayer) | `tollgate-credit-meter` | `credit-meter` |
//! | [`ResponseEnvelopeLayer`](response_envelope::ResponseEnvelopeLayer) | `tollgate-response-envelope` | `response-envelope` |
//! | [`RequestLoggerLayer`](request_logger::RequestLoggerLayer) | `tollgate-request-logger` | `request-logger` |
//! | [`UpstreamSignLayer`](upstream_sign::UpstreamSignLayer) | `tollgate-upstream-sign` | `upstream-sign` |
//! | [`IdempotencyLayer`](idempotency::IdempotencyLayer) | `tollgate-idempotency` | `idempotency` |
//!
//! The layers meet only through the typed extensions of [`core`] (`tollgate-core`). Stack them
//! outermost first as docs/contract.md §9 does: logger → envelope → auth → window → meter → your service.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tollgate::prelude::*;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let clock = SystemClock::shared();
//! let keys = MemoryKeyStore::new(clock.clone());
//! let ledger = MemoryLedger::new(clock.clone());
//! let org = OrgId::new();
//! let model = ModelId::new();
//! keys.set_subscription(org, Some(Plan::Basic)).await.unwrap();
//! keys.add_model(org, model).await.unwrap();
//! ledger.subscribe(org, Plan::Basic).await.unwrap();
//! let key = keys.create_key(org, "docs".into()).await.unwrap();
//!
//! let svc = ServiceBuilder::new()
//!     .response_envelope()
//!     .api_key_auth(keys)
//!     .per_model_sliding_window(MemoryWindowStore::new(clock))
//!     .credit_meter(ledger)
//!     .service(service_fn(|_req: Request<Full<Bytes>>| async {
//!         let mut res = Response::new(Full::new(Bytes::from(r#"{"id":1}"#)));
//!         res.headers_mut().insert("content-type", "application/json".parse().unwrap());
//!         Ok::<_, Infallible>(res)
//!     }));
//!
//! let req = Request::get(format!("/api/models/{model}/users/me"))
//!     .header("x-api-key", &key.secret)
//!     .body(Full::new(Bytes::new()))
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["ratelimit-remaining"], "59");
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(
//!     body,
//!     r#"{"data":{"id":1},"_meta":{"_credits":{"used":1,"balance":999},"_rate_limits":{"limit_minute":60,"remaining_minute":59}}}"#
//! );
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use tollgate_core as core;

#[cfg(feature = "api-key-auth")]
pub use tollgate_api_key_auth as api_key_auth;
#[cfg(feature = "credit-meter")]
pub use tollgate_credit_meter as credit_meter;
#[cfg(feature = "idempotency")]
pub use tollgate_idempotency as idempotency;
#[cfg(feature = "request-logger")]
pub use tollgate_request_logger as request_logger;
#[cfg(feature = "response-envelope")]
pub use tollgate_response_envelope as response_envelope;
#[cfg(feature = "sliding-window")]
pub use tollgate_sliding_window as sliding_window;
#[cfg(feature = "upstream-sign")]
pub use tollgate_upstream_sign as upstream_sign;

#[cfg(feature = "gateway")]
pub mod gateway;
#[cfg(feature = "sandbox")]
pub mod sandbox;

mod builder;
pub use builder::ServiceBuilderExt;

/// The types most users of the layers need.
pub mod prelude {
    pub use crate::ServiceBuilderExt;
    pub use tollgate_core::{
        Clock, CostTable, CreditReceipt, CreditSettlement, ErrorCode, GateBody, Identity,
        KeyCreditLimit, KeyId, ManualClock, ModelId, OrgId, Plan, Principal, RateLimitInfo,
        Rejection, RequestId, RouteSpec, SharedClock, SystemClock,
    };

    #[cfg(feature = "api-key-auth")]
    pub use tollgate_api_key_auth::{ApiKeyAuthLayer, KeyStore, MemoryKeyStore};
    #[cfg(feature = "credit-meter")]
    pub use tollgate_credit_meter::{CreditMeterLayer, Ledger, MemoryLedger};
    #[cfg(feature = "idempotency")]
    pub use tollgate_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryIdempotencyStore};
    #[cfg(feature = "request-logger")]
    pub use tollgate_request_logger::{LogSink, MemoryLogSink, RequestLoggerLayer};
    #[cfg(feature = "response-envelope")]
    pub use tollgate_response_envelope::ResponseEnvelopeLayer;
    #[cfg(feature = "sliding-window")]
    pub use tollgate_sliding_window::{
        MemoryWindowStore, PerModelSlidingWindowLayer, WindowPolicy, WindowStore,
    };
    #[cfg(feature = "upstream-sign")]
    pub use tollgate_upstream_sign::{
        MemorySessionStore, RemoteSigner, RulesSigner, SessionStore, Signer, UpstreamSignLayer,
    };
}
