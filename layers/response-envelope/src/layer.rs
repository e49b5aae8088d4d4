//! [`ResponseEnvelopeLayer`]: wraps every 2xx JSON response in `{"data", "_meta"}`.

use tower_layer::Layer;

use crate::service::ResponseEnvelope;

/// The largest 2xx body the envelope buffers by default (16 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Wraps each 2xx JSON response body as `{"data": <body>, "_meta": {...}}` (docs/contract.md §2).
///
/// - The body is spliced in byte for byte (validated, never re-serialized).
/// - `_meta._credits` comes from the [`CreditReceipt`](tollgate_core::CreditReceipt) response
///   extension once it is settled as charged; `_meta._rate_limits` from the
///   [`RateLimitInfo`](tollgate_core::RateLimitInfo) response extension. Absent parts are
///   omitted.
/// - A 2xx whose body is not JSON (wrong `content-type`, invalid JSON, larger than the
///   buffer limit, or broken mid-stream) becomes 502 `UPSTREAM_ERROR`.
/// - Non-2xx responses, `204`/`205` and responses to `HEAD` pass through untouched and
///   streamed.
///
/// The layer marks each request with [`JsonBodyRequired`](tollgate_core::JsonBodyRequired) so
/// a credit meter inside never bills a body the envelope will reject.
#[derive(Debug, Clone, Copy)]
pub struct ResponseEnvelopeLayer {
    max_body_bytes: usize,
}

impl ResponseEnvelopeLayer {
    /// An envelope that buffers 2xx bodies up to [`DEFAULT_MAX_BODY_BYTES`].
    pub fn new() -> Self {
        ResponseEnvelopeLayer {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// The largest 2xx body to buffer; a larger one becomes 502 `UPSTREAM_ERROR`.
    pub fn with_max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// The buffer limit in bytes.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }
}

impl Default for ResponseEnvelopeLayer {
    fn default() -> Self {
        ResponseEnvelopeLayer::new()
    }
}

impl<S> Layer<S> for ResponseEnvelopeLayer {
    type Service = ResponseEnvelope<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseEnvelope::new(inner, self.max_body_bytes)
    }
}
