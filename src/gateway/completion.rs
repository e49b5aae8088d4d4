//! Counting requests whose client went away: the response future dropped before the head,
//! or the body dropped before its end (`tollgate_requests_abandoned_total`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use tollgate_core::{BoxError, RouteMatch};

use super::app::GatewayBody;
use super::metrics::Metrics;

/// Armed while a request is unanswered or its body unfinished; counts the request as
/// abandoned when dropped armed.
#[derive(Debug)]
pub(crate) struct Completion {
    armed: Option<(Arc<Metrics>, Option<RouteMatch>)>,
}

impl Completion {
    /// A guard for a request to `route` (`None`: no route matched).
    pub(crate) fn new(metrics: Arc<Metrics>, route: Option<RouteMatch>) -> Self {
        Completion {
            armed: Some((metrics, route)),
        }
    }

    /// The route template the request is counted under.
    pub(crate) fn template(&self) -> &str {
        match &self.armed {
            Some((_, Some(route))) => route.template(),
            _ => super::metrics::UNMATCHED,
        }
    }

    /// The response went out whole (or failed on the gateway's side): nothing to count.
    pub(crate) fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some((metrics, route)) = self.armed.take() {
            let template = route
                .as_ref()
                .map_or(super::metrics::UNMATCHED, |r| r.template());
            metrics.record_abandoned(template);
        }
    }
}

pin_project! {
    /// The body of every gateway response: the boxed body, plus (for customer API
    /// responses) the guard that counts it as abandoned when it is dropped before its end.
    pub struct ResponseBody {
        #[pin]
        inner: GatewayBody,
        completion: Option<Completion>,
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("watched", &self.completion.is_some())
            .finish_non_exhaustive()
    }
}

impl ResponseBody {
    /// A body nobody watches.
    pub fn new(inner: GatewayBody) -> Self {
        ResponseBody {
            inner,
            completion: None,
        }
    }

    /// A body whose early drop counts its request as abandoned.
    pub(crate) fn watched(inner: GatewayBody, mut completion: Completion) -> Self {
        if inner.is_end_stream() {
            // Nothing to send (204, empty bodies): the head was the whole response.
            completion.disarm();
        }
        ResponseBody {
            inner,
            completion: Some(completion),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let finished = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if finished {
            if let Some(c) = this.completion.as_mut() {
                c.disarm();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn body(chunks: &'static [&'static str]) -> GatewayBody {
        let frames = chunks
            .iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes()))));
        super::super::app::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn only_a_body_dropped_before_its_end_counts() {
        let metrics = Arc::new(Metrics::default());
        let guard = || Completion::new(Arc::clone(&metrics), None);

        let whole = ResponseBody::watched(body(&["a", "b"]), guard());
        assert_eq!(whole.collect().await.unwrap().to_bytes(), "ab");
        let empty =
            ResponseBody::watched(super::super::app::boxed(Full::new(Bytes::new())), guard());
        drop(empty);
        let full = ResponseBody::watched(
            super::super::app::boxed(Full::new(Bytes::from_static(b"x"))),
            guard(),
        );
        assert_eq!(full.collect().await.unwrap().to_bytes(), "x");
        assert_eq!(metrics.abandoned("unmatched"), 0);

        let mut partial = ResponseBody::watched(body(&["a", "b"]), guard());
        let first = partial.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        drop(partial);
        assert_eq!(metrics.abandoned("unmatched"), 1);

        drop(guard());
        assert_eq!(metrics.abandoned("unmatched"), 2);
    }
}
