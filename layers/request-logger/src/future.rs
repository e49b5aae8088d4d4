//! [`ResponseFuture`]: the inner call, inside the request's span; its outcome goes into the log
//! row.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tollgate_core::ext::X_REQUEST_ID;
use tracing::Span;

use crate::body::{LogGuard, LoggedBody};

pin_project! {
    /// The response future of [`RequestLogger`](crate::RequestLogger). Dropped before the
    /// response arrives (the client went away), it logs the request with status 499.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        guard: Option<LogGuard>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, span: Span, guard: LogGuard) -> Self {
        ResponseFuture {
            inner,
            span,
            guard: Some(guard),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.span)
            .field("pending", &self.guard.is_some())
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<LoggedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.span.enter();
            ready!(this.inner.poll(cx))
        };
        let guard = this.guard.take();
        match result {
            Ok(mut res) => {
                let guard = guard.map(|mut guard| {
                    guard.record_response(&res);
                    res.headers_mut()
                        .insert(X_REQUEST_ID.clone(), guard.request_id().to_header_value());
                    res.extensions_mut().insert(guard.request_id().clone());
                    guard
                });
                Poll::Ready(Ok(res.map(|body| LoggedBody::new(body, guard))))
            }
            Err(err) => {
                if let Some(mut guard) = guard {
                    guard.record_service_error();
                }
                Poll::Ready(Err(err))
            }
        }
    }
}
