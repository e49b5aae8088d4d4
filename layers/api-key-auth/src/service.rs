//! [`ApiKeyAuth`]: the service the layer wraps around an inner service.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use http::{Request, Response};
use tollgate_core::{ErrorCode, GateBody, Rejection};
use tower_service::Service;

use crate::future::{refusal, PendingCall, ResponseFuture};
use crate::key::{is_well_formed, KeyHash};
use crate::layer::{Config, UnmatchedRoutes};

/// The header a client sends its key in.
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The message of the 401 for a key sent as `Authorization` instead of `X-API-Key`.
pub const WRONG_HEADER_MESSAGE: &str =
    "The API key must be sent in the X-API-Key header, not in the Authorization header.";

/// Authenticates each request before the inner service sees it. Made by
/// [`ApiKeyAuthLayer`](crate::ApiKeyAuthLayer).
pub struct ApiKeyAuth<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> ApiKeyAuth<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        ApiKeyAuth { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for ApiKeyAuth<S> {
    fn clone(&self) -> Self {
        ApiKeyAuth {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ApiKeyAuth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyAuth")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

/// The 401 for a missing, malformed, unknown or revoked key, and for a model the org does
/// not own: one body for all, so none of them can be told apart.
pub(crate) fn invalid_key() -> Rejection {
    Rejection::new(ErrorCode::InvalidApiKey)
}

/// The hash of the presented key, or the 401 to answer with. Never hashes anything that is
/// not shaped like a key, so oversized or binary values cost nothing.
fn presented_key(headers: &HeaderMap) -> Result<KeyHash, Rejection> {
    let mut values = headers.get_all(&X_API_KEY).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if is_well_formed(value.as_bytes()) => {
            Ok(KeyHash::of_bytes(value.as_bytes()))
        }
        (None, _) if headers.contains_key(AUTHORIZATION) => {
            Err(invalid_key().with_message(WRONG_HEADER_MESSAGE))
        }
        // Missing, malformed, or sent twice (which one would be meant is anyone's guess).
        _ => Err(invalid_key()),
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ApiKeyAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<GateBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let route = self.config.cost_table.resolve(&mut req);
        if route.is_none() && self.config.unmatched == UnmatchedRoutes::PassThrough {
            return ResponseFuture::pass_through(self.inner.call(req));
        }
        let hash = match presented_key(req.headers()) {
            Ok(hash) => hash,
            Err(rejection) => {
                tracing::debug!(code = %rejection.code(), "request without a usable API key");
                return ResponseFuture::rejected(refusal(rejection));
            }
        };
        // The secret goes no further in than this layer.
        req.headers_mut().remove(&X_API_KEY);
        let lookup = self.config.store.lookup(hash);
        // `self.inner` is the service that was driven to readiness; keep a fresh clone for
        // the next call.
        let clone = self.inner.clone();
        let service = mem::replace(&mut self.inner, clone);
        ResponseFuture::lookup(
            lookup,
            PendingCall {
                service,
                request: req,
                model: route.and_then(|r| r.model()),
                config: Arc::clone(&self.config),
            },
        )
    }
}
