//! [`UpstreamSign`], the service the layer produces.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tollgate_core::{BoxError, GateBody, ModelId, RouteMatch};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::layer::Shared;

/// Signs requests to the upstream and classifies its answers. Made by
/// [`UpstreamSignLayer`](crate::UpstreamSignLayer).
///
/// Errors: `poll_ready` errors of the inner client are passed on as they are; an error of
/// the inner call (connection refused or reset) becomes a 502 `UPSTREAM_ERROR` response
/// (504 `UPSTREAM_TIMEOUT` when it is a timeout), so the response future never fails.
pub struct UpstreamSign<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> UpstreamSign<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        UpstreamSign { inner, shared }
    }

    /// The wrapped client.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped client, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the client.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for UpstreamSign<S> {
    fn clone(&self) -> Self {
        UpstreamSign {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for UpstreamSign<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSign")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for UpstreamSign<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<GateBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, S::Future, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let model = req.extensions().get::<ModelId>().copied().or_else(|| {
            req.extensions()
                .get::<RouteMatch>()
                .and_then(RouteMatch::model)
        });
        ResponseFuture::new(self.shared.clone(), inner, req, model)
    }
}
