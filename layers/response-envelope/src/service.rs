//! [`ResponseEnvelope`]: the service produced by [`ResponseEnvelopeLayer`](crate::ResponseEnvelopeLayer).

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use tollgate_core::{BoxError, GateBody, JsonBodyRequired};
use tower_service::Service;

use crate::future::ResponseFuture;

/// Wraps 2xx JSON bodies of the inner service in `{"data", "_meta"}`.
#[derive(Debug, Clone)]
pub struct ResponseEnvelope<S> {
    inner: S,
    max_body_bytes: usize,
}

impl<S> ResponseEnvelope<S> {
    pub(crate) fn new(inner: S, max_body_bytes: usize) -> Self {
        ResponseEnvelope {
            inner,
            max_body_bytes,
        }
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ResponseEnvelope<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<GateBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Tell a credit meter inside that a non-JSON 2xx will reach the client as an error.
        req.extensions_mut().insert(JsonBodyRequired);
        let is_head = req.method() == Method::HEAD;
        ResponseFuture::new(self.inner.call(req), self.max_body_bytes, is_head)
    }
}
