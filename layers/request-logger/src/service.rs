//! [`RequestLogger`]: the service produced by [`RequestLoggerLayer`](crate::RequestLoggerLayer).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tollgate_core::{IdentitySlot, RequestId};
use tower_service::Service;

use crate::body::LogGuard;
use crate::future::ResponseFuture;
use crate::layer::Shared;
use crate::LoggedBody;

/// Logs each request through the inner service.
pub struct RequestLogger<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> RequestLogger<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        RequestLogger { inner, shared }
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

impl<S: Clone> Clone for RequestLogger<S> {
    fn clone(&self) -> Self {
        RequestLogger {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RequestLogger<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestLogger")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestLogger<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
{
    type Response = Response<LoggedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let start = Instant::now();
        let time_ms = self.shared.clock.now_ms();
        let request_id = RequestId::from_headers_or_generate(req.headers());
        req.extensions_mut().insert(request_id.clone());
        let identity_slot = IdentitySlot::new();
        req.extensions_mut().insert(identity_slot.clone());
        let route = self.shared.cost_table.resolve(&mut req);
        let template = route.as_ref().map(|m| m.template());
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            method = %req.method(),
            route = template,
        );
        let guard = LogGuard::new(
            Arc::clone(&self.shared),
            span.clone(),
            start,
            time_ms,
            request_id,
            req.method().as_str().to_owned(),
            template.map(str::to_owned),
            route.as_ref().and_then(|m| m.model()),
            identity_slot,
        );
        let future = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ResponseFuture::new(future, span, guard)
    }
}
