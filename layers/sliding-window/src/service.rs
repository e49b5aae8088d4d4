//! [`PerModelSlidingWindow`], the service the layer builds.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tollgate_core::{ErrorCode, GateBody, Principal, Rejection};
use tower_service::Service;

use crate::future::ResponseFuture;
use crate::layer::Config;
use crate::store::{BucketKey, WindowStore};

/// Middleware limiting requests per (organization, model); see
/// [`PerModelSlidingWindowLayer`](crate::PerModelSlidingWindowLayer).
pub struct PerModelSlidingWindow<S, W> {
    inner: S,
    config: Arc<Config<W>>,
}

impl<S, W> PerModelSlidingWindow<S, W> {
    pub(crate) fn from_config(inner: S, config: Arc<Config<W>>) -> Self {
        PerModelSlidingWindow { inner, config }
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

impl<S: Clone, W> Clone for PerModelSlidingWindow<S, W> {
    fn clone(&self) -> Self {
        PerModelSlidingWindow {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: fmt::Debug, W> fmt::Debug for PerModelSlidingWindow<S, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerModelSlidingWindow")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

impl<S, W, ReqBody, ResBody> Service<Request<ReqBody>> for PerModelSlidingWindow<S, W>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    W: WindowStore,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<GateBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &*self.config;
        let route = config.cost_table.resolve(&mut req);
        let bucket = match &config.bucket_fn {
            Some(bucket_fn) => {
                let (parts, body) = req.into_parts();
                let bucket = bucket_fn(&parts, route.as_ref());
                req = Request::from_parts(parts, body);
                bucket
            }
            None => match route.and_then(|r| r.model()) {
                None => None,
                Some(model) => match req.extensions().get::<Principal>() {
                    Some(p) => Some((BucketKey::new(p.org, model), p.plan)),
                    None => {
                        tracing::error!(
                            path = %req.uri().path(),
                            "PerModelSlidingWindowLayer: request to a model route has no \
                             Principal extension; put ApiKeyAuthLayer outside (before) this \
                             layer, or choose buckets with `with_bucket_fn`"
                        );
                        return ResponseFuture::reject(
                            Rejection::new(ErrorCode::InternalError),
                            None,
                        );
                    }
                },
            },
        };
        let Some((key, plan)) = bucket else {
            return ResponseFuture::unlimited(self.inner.call(req));
        };
        let check = config.store.check(key, config.policy.limits(plan));
        // The ready service goes into the future; its clone stays for the next poll_ready.
        let clone = self.inner.clone();
        let ready = mem::replace(&mut self.inner, clone);
        ResponseFuture::check(check, ready, req, key)
    }
}
