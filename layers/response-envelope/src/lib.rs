//! `ResponseEnvelopeLayer`: the `{data, _meta}` shape of every successful gateway response
//! (docs/contract.md §2).
//!
//! A 2xx JSON response body is spliced, byte for byte, into
//! `{"data": <body>, "_meta": {"_credits": {"used", "balance"}, "_rate_limits":
//! {"limit_minute", "remaining_minute"}}}`. The meta parts come from the
//! [`CreditReceipt`](tollgate_core::CreditReceipt) and
//! [`RateLimitInfo`](tollgate_core::RateLimitInfo) response extensions that the credit meter
//! and the sliding window put there; a part whose extension is absent is left out. A 2xx that
//! is not JSON becomes 502 `UPSTREAM_ERROR`; every other response passes through untouched.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tollgate_core::RateLimitInfo;
//! use tollgate_response_envelope::ResponseEnvelopeLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let service = ServiceBuilder::new()
//!     .layer(ResponseEnvelopeLayer::new())
//!     .service(service_fn(|_req: Request<()>| async {
//!         let mut res = Response::new(Full::new(Bytes::from_static(br#"{"id":7}"#)));
//!         res.headers_mut().insert("content-type", "application/json".parse().unwrap());
//!         res.extensions_mut().insert(RateLimitInfo {
//!             limit: 60,
//!             remaining: 58,
//!             reset_secs: 60,
//!             retry_after_secs: None,
//!         });
//!         Ok::<_, std::convert::Infallible>(res)
//!     }));
//!
//! let res = service.oneshot(Request::new(())).await?;
//! let body = res.into_body().collect().await?.to_bytes();
//! assert_eq!(
//!     body,
//!     r#"{"data":{"id":7},"_meta":{"_rate_limits":{"limit_minute":60,"remaining_minute":58}}}"#
//! );
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod future;
pub mod layer;
pub mod service;

pub use future::ResponseFuture;
pub use layer::{ResponseEnvelopeLayer, DEFAULT_MAX_BODY_BYTES};
pub use service::ResponseEnvelope;
