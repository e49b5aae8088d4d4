//! Credit metering for tower HTTP services: [`CreditMeterLayer`] and the [`Ledger`] behind
//! it (docs/contract.md §4).
//!
//! For each request the layer looks up the route in a [`CostTable`](tollgate_core::CostTable)
//! (docs/contract.md §2 by default) and then:
//!
//! - **No route** → 404 `NOT_FOUND`; nothing reaches the inner service. The meter only
//!   forwards requests it knows the price of.
//! - **Cost 0** → passed through untouched: no hold, no receipt.
//! - **Priced route** → reads the org from the [`Principal`](tollgate_core::Principal) request
//!   extension, so it must run *inside* the auth layer (a missing principal is a wiring bug:
//!   500 `INTERNAL_ERROR` and an error log). Then it places an atomic **hold** of the cost:
//!   402 `INSUFFICIENT_CREDITS` when `balance − held < cost`, 402 `NO_SUBSCRIPTION` when the
//!   org has no active subscription, 503/500 when the ledger fails. Unlimited plans hold
//!   nothing and never block.
//! - The hold is **committed** (charged) only when the inner response is 2xx *and* its body
//!   reached its end; it is **released** on anything else — a non-2xx status, an inner
//!   error, a body error, the response future or the body dropped early. Exactly once. The
//!   commit runs inside the body's `poll_frame` before it reports its end (and before the
//!   last bytes of a body of announced length, since servers stop polling after them), so a
//!   layer outside that waits for the end of the body sees the charge done. An empty 2xx is
//!   settled before the response is handed on. Holds that outlive a crash expire
//!   ([`MemoryLedger`] documents how a late commit of an expired hold is handled).
//! - Every response of a priced route that reached the inner service carries a
//!   [`CreditReceipt`](tollgate_core::CreditReceipt) in its extensions, settled as
//!   `Charged { used, balance }` (`balance: None` on unlimited plans) or `Released`.
//! - With the [`JsonBodyRequired`](tollgate_core::JsonBodyRequired) marker on the request
//!   (set by the response envelope), a 2xx body is buffered and charged only if it is valid
//!   JSON.
//!
//! The ledger keeps two pots per org — plan credits (reset to the plan's monthly credits at
//! each renewal, no roll-over) and top-up credits (kept until spent); charges take plan
//! credits first — and an append-only row for every balance change ([`LedgerEntry`]).
//! Periods renew on the request path and in the periodic job [`run_ledger_jobs`], which also
//! releases holds left behind past their TTL.
//!
//! Ledgers: [`MemoryLedger`] (feature `memory`, on by default) for one process, and
//! `PostgresLedger` (feature `postgres`) shared by any number of gateway replicas and kept
//! across restarts — one atomic statement per hold, commit or release.
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tollgate_core::{CreditReceipt, CreditSettlement, KeyId, ManualClock, OrgId, Plan, Principal};
//! use tollgate_credit_meter::{CreditMeterLayer, Ledger, MemoryLedger};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tollgate_core::BoxError> {
//! let ledger = Arc::new(MemoryLedger::new(ManualClock::new(1_700_000_000_000)));
//! let org = OrgId::new();
//! ledger.subscribe(org, Plan::Free).await?; // 100 plan credits
//! let principal = Principal { org, key: KeyId::new(), plan: Plan::Free };
//!
//! let service = ServiceBuilder::new()
//!     // Stands in for ApiKeyAuthLayer, which puts the Principal on the request.
//!     .map_request(move |mut req: Request<Full<Bytes>>| {
//!         req.extensions_mut().insert(principal);
//!         req
//!     })
//!     .layer(CreditMeterLayer::new(ledger.clone()))
//!     .service_fn(|_req| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{\"total\":12}"))))
//!     });
//!
//! // GET …/payouts/stats costs 2 credits.
//! let req = Request::get("/api/models/0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10/payouts/stats")
//!     .body(Full::default())?;
//! let res = service.oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! let receipt = res.extensions().get::<CreditReceipt>().cloned().unwrap();
//! assert_eq!(receipt.settlement(), None); // charged only once the body is delivered
//!
//! let body = res.into_body().collect().await?.to_bytes();
//! assert_eq!(body, "{\"total\":12}");
//! assert_eq!(
//!     receipt.settlement(),
//!     Some(CreditSettlement::Charged { used: 2, balance: Some(98) })
//! );
//! assert_eq!(ledger.open_holds(), 0);
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod future;
mod jobs;
mod keeper;
mod layer;
mod ledger;
#[cfg(feature = "memory")]
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod service;
mod settle;

pub use body::{MeterBody, MeterBodyError};
pub use future::ResponseFuture;
pub use jobs::run_ledger_jobs;
pub use layer::{CreditMeterLayer, DEFAULT_MAX_BUFFERED_BODY, DEFAULT_SETTLE_TIMEOUT};
pub use ledger::{
    Account, CommitOutcome, CreditsView, EntryKind, Hold, HoldId, HoldOutcome, KeyBudget, Ledger,
    LedgerEntry, ReleaseOutcome, MAX_CREDITS,
};
#[cfg(feature = "memory")]
pub use memory::{MemoryLedger, DEFAULT_HOLD_TTL, MAX_ENTRIES_PER_ORG};
#[cfg(feature = "postgres")]
pub use postgres::{
    PostgresLedger, DEFAULT_BATCHES_IN_FLIGHT, DEFAULT_BATCH_LOCK_TIMEOUT, DEFAULT_BATCH_SIZE,
    DEFAULT_ORG_CONCURRENCY, DEFAULT_RELEASE_QUEUE,
};
pub use service::CreditMeter;
