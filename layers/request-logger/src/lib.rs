//! `RequestLoggerLayer`: one log row per request, off the request path (docs/contract.md §6).
//!
//! The outermost layer of a tollgate stack. Each request gets an id (the client's
//! `X-Request-Id` when usable), echoed in the `X-Request-Id` response header, and a `tracing`
//! span. When its response body ends (or fails, or is dropped) a [`LogRecord`] is built from
//! what the inner layers left in the response extensions (the
//! [`Principal`](tollgate_core::Principal), the [`ErrorCode`](tollgate_core::ErrorCode), the
//! settled [`CreditReceipt`](tollgate_core::CreditReceipt)) and handed to a background worker
//! over a bounded channel; the worker writes batches to a [`LogSink`]. A full channel drops
//! the row and counts it ([`LoggerStats::dropped_rows`]): logging never blocks or fails a
//! request.
//!
//! Sinks: [`MemoryLogSink`] (feature `memory`, on by default) keeps rows in memory with the
//! 14-day retention, filters and cursor paging; `PostgresLogSink` (feature `postgres`) keeps
//! them in PostgreSQL for every replica, in daily partitions (the retention drops whole
//! days). [`ExportFormat`] renders rows as NDJSON or CSV for `GET /api/logs`.
//!
//! ```
//! use std::sync::Arc;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tollgate_core::{ErrorCode, OrgId, Rejection, SystemClock};
//! use tollgate_request_logger::{LogSink, MemoryLogSink, RequestLoggerLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let sink = Arc::new(MemoryLogSink::new(SystemClock));
//! let logger = RequestLoggerLayer::new(sink.clone());
//! let handle = logger.handle();
//!
//! let service = ServiceBuilder::new()
//!     .layer(logger)
//!     .service(service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<Response<Full<Bytes>>, std::convert::Infallible>(
//!             Rejection::new(ErrorCode::NotFound).into_response(),
//!         )
//!     }));
//!
//! let req = Request::builder()
//!     .uri("/nowhere")
//!     .header("x-request-id", "req-1")
//!     .body(Full::default())?;
//! let res = service.oneshot(req).await?;
//! assert_eq!(res.headers()["x-request-id"], "req-1");
//! res.into_body().collect().await?; // the row is written when the body ends
//!
//! handle.flush().await;
//! let rows = sink.all();
//! assert_eq!(rows.len(), 1);
//! assert_eq!(rows[0].request_id, "req-1");
//! assert_eq!(rows[0].status, 404);
//! assert_eq!(rows[0].code, Some(ErrorCode::NotFound));
//! assert_eq!(rows[0].route, None);
//! assert_eq!(handle.stats().dropped_rows, 0);
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod future;
pub mod layer;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod record;
pub mod service;
pub mod sink;
pub mod worker;

pub use body::{LoggedBody, STATUS_CLIENT_CLOSED};
pub use future::ResponseFuture;
pub use layer::{
    RequestLoggerBuilder, RequestLoggerLayer, DEFAULT_BATCH_SIZE, DEFAULT_CAPACITY,
    DEFAULT_FLUSH_INTERVAL, DEFAULT_WRITE_TIMEOUT,
};
#[cfg(feature = "memory")]
pub use memory::{MemoryLogSink, DEFAULT_MAX_ANONYMOUS_ROWS, DEFAULT_MAX_ROWS};
#[cfg(feature = "postgres")]
pub use postgres::{PostgresLogSink, DEFAULT_ANONYMOUS_ROWS_PER_DAY};
pub use record::{ExportFormat, ExportFormatParseError, LogRecord, CSV_HEADER};
pub use service::RequestLogger;
pub use sink::{InvalidCursor, LogCursor, LogPage, LogQuery, LogSink, RETENTION};
pub use worker::{LogWorker, LoggerHandle, LoggerStats};
