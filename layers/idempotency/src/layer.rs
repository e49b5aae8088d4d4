//! [`IdempotencyLayer`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{
    HeaderName, CONTENT_DISPOSITION, CONTENT_LANGUAGE, CONTENT_TYPE, ETAG, LAST_MODIFIED, LOCATION,
};
use http::request::Parts;
use tollgate_core::Principal;
use tower_layer::Layer;

use crate::guard::Releaser;
use crate::service::Idempotency;
use crate::store::IdempotencyStore;

/// How long a finished request's response is replayed: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a request in flight keeps its key when nothing completes or releases it (its
/// replica died): 30 seconds.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// The largest request body the layer buffers to fingerprint: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1024 * 1024;

/// The largest response body the layer stores for replay: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 1024 * 1024;

/// Picks whose keys a request's key belongs to (see [`IdempotencyLayer::with_scope`]).
pub type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Makes `POST` and `DELETE` requests carrying an `Idempotency-Key` header safe to retry: the
/// first runs, later ones with the same key get its stored response.
///
/// See the [crate docs](crate) for the full behaviour.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) releaser: Arc<Releaser>,
    pub(crate) ttl: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) scope: ScopeFn,
    pub(crate) replayed_headers: Arc<[HeaderName]>,
}

/// The default scope: the org of the [`Principal`] the auth layer put on the request.
fn principal_org(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<Principal>()
        .map(|p| p.org.to_string())
}

impl IdempotencyLayer {
    /// A layer keeping its keys in `store`, with keys scoped to the org of the request's
    /// [`Principal`] (so it must run inside the auth layer, or get
    /// [`with_scope`](Self::with_scope)).
    pub fn new(store: impl IdempotencyStore) -> Self {
        Self::from_shared(Arc::new(store))
    }

    /// A layer over an already shared store (for example one picked at run time).
    pub fn from_shared(store: Arc<dyn IdempotencyStore>) -> Self {
        IdempotencyLayer {
            config: Arc::new(Config {
                releaser: Arc::new(Releaser::new(Arc::clone(&store))),
                store,
                ttl: DEFAULT_TTL,
                lease_ttl: DEFAULT_LEASE_TTL,
                max_request_body: DEFAULT_MAX_REQUEST_BODY,
                max_response_body: DEFAULT_MAX_RESPONSE_BODY,
                scope: Arc::new(principal_org),
                replayed_headers: Arc::from(
                    [
                        CONTENT_TYPE,
                        CONTENT_LANGUAGE,
                        CONTENT_DISPOSITION,
                        LOCATION,
                        ETAG,
                        LAST_MODIFIED,
                    ]
                    .as_slice(),
                ),
            }),
        }
    }

    /// How long a finished request's response is kept for replay (default
    /// [`DEFAULT_TTL`], 24 h). After it, the key is free again.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        Arc::make_mut(&mut self.config).ttl = ttl;
        self
    }

    /// How long a request in flight holds its key if it neither finishes nor is released —
    /// because its replica died (default [`DEFAULT_LEASE_TTL`], 30 s). Until then a retry
    /// gets 409 `IDEMPOTENCY_IN_PROGRESS`; after it, a retry runs. Keep it above the longest
    /// time a request may take (the upstream timeout), or a slow request's retry runs while
    /// the first is still going.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        Arc::make_mut(&mut self.config).lease_ttl = ttl;
        self
    }

    /// The largest request body buffered to fingerprint the request (default
    /// [`DEFAULT_MAX_REQUEST_BODY`]); a larger one gets 413 `PAYLOAD_TOO_LARGE`.
    pub fn with_max_request_body(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_request_body = bytes;
        self
    }

    /// The largest response body stored for replay (default
    /// [`DEFAULT_MAX_RESPONSE_BODY`]). A larger response is passed on but not stored, and
    /// its key is freed: a retry runs again.
    pub fn with_max_response_body(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_response_body = bytes;
        self
    }

    /// Whose keys a request's key belongs to: two requests share a record only if their
    /// scope and key are equal. The default is the org of the request's [`Principal`]; a
    /// request without a scope gets 500 `INTERNAL_ERROR` (a wiring mistake, logged), never
    /// a record shared by every caller. Without an auth layer, say what scope means, e.g.
    /// `.with_scope(|_| Some("global".into()))` for a single tenant.
    pub fn with_scope(
        mut self,
        scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Arc::make_mut(&mut self.config).scope = Arc::new(scope);
        self
    }

    /// The response headers stored and replayed with the body (default `content-type`,
    /// `content-language`, `content-disposition`, `location`, `etag`, `last-modified`).
    /// Per-request headers (request ids, rate limits) should not be replayed.
    pub fn with_replayed_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        Arc::make_mut(&mut self.config).replayed_headers = names.into_iter().collect();
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.config.store
    }

    /// Releases that could not be queued for the background task and were left to the
    /// lease TTL.
    pub fn releases_dropped(&self) -> u64 {
        self.config.releaser.dropped()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency::from_config(inner, Arc::clone(&self.config))
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("ttl", &self.ttl)
            .field("lease_ttl", &self.lease_ttl)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("replayed_headers", &self.replayed_headers)
            .field("releaser", &self.releaser)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.config)
            .finish()
    }
}
