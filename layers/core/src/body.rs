//! [`GateBody`]: the response body of a layer that either passes the inner response on or
//! answers by itself (a rejection, or a body it rebuilt).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Either the inner service's body or a complete body the layer produced.
    #[project = GateBodyProj]
    #[derive(Debug)]
    pub enum GateBody<B> {
        /// The inner service's body, untouched.
        Inner { #[pin] body: B },
        /// A whole body produced by the layer (sent as one frame).
        Full { data: Option<Bytes> },
    }
}

impl<B> GateBody<B> {
    /// Wraps the inner body.
    pub fn inner(body: B) -> Self {
        GateBody::Inner { body }
    }

    /// A complete body.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        GateBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        GateBody::Full { data: None }
    }
}

impl<B> From<Bytes> for GateBody<B> {
    fn from(data: Bytes) -> Self {
        GateBody::full(data)
    }
}

impl<B> Default for GateBody<B> {
    fn default() -> Self {
        GateBody::empty()
    }
}

impl<B> Body for GateBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project() {
            GateBodyProj::Inner { body } => body.poll_frame(cx),
            GateBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GateBody::Inner { body } => body.is_end_stream(),
            GateBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GateBody::Inner { body } => body.size_hint(),
            GateBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    #[tokio::test]
    async fn full_body_yields_once_with_exact_size() {
        let body: GateBody<Empty<Bytes>> = GateBody::full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let empty: GateBody<Empty<Bytes>> = GateBody::empty();
        assert!(empty.is_end_stream());
    }
}
