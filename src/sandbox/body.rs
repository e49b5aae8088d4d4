//! The sandbox's response body: whole, or cut mid-stream by a fault.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A sandbox response body.
///
/// A whole body is sent as one frame. A body cut by [`FaultMode::CutBody`](super::FaultMode)
/// announces its full length, sends the first half, and then fails with [`BodyCut`] (over a
/// socket, the server aborts the connection, so the client sees an incomplete body).
#[derive(Debug)]
pub struct SandboxBody {
    state: State,
}

#[derive(Debug)]
enum State {
    Whole(Option<Bytes>),
    Cut {
        head: Option<Bytes>,
        full_len: u64,
        // Whether the body already returned `Pending` once after the head, so a server
        // flushes the head before the failure tears the connection down.
        flushed: bool,
    },
}

/// The error a cut body ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyCut;

impl fmt::Display for BodyCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the sandbox cut the response body mid-stream (injected fault)")
    }
}

impl std::error::Error for BodyCut {}

impl SandboxBody {
    /// A whole body.
    pub fn whole(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        SandboxBody {
            state: State::Whole((!data.is_empty()).then_some(data)),
        }
    }

    /// A body that announces `data`'s length, sends its first half and then fails.
    pub fn cut(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        let full_len = data.len() as u64;
        let head = data.slice(..data.len() / 2);
        SandboxBody {
            state: State::Cut {
                head: (!head.is_empty()).then_some(head),
                full_len,
                flushed: false,
            },
        }
    }

    /// Whether this body will fail before its end.
    pub fn is_cut(&self) -> bool {
        matches!(self.state, State::Cut { .. })
    }
}

impl Body for SandboxBody {
    type Data = Bytes;
    type Error = BodyCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyCut>>> {
        // `SandboxBody` is `Unpin`: no projection needed.
        match &mut self.get_mut().state {
            State::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            State::Cut { head, flushed, .. } => {
                if let Some(head) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                if !*flushed {
                    *flushed = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(BodyCut)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            // The promised length: the client must notice that the body falls short.
            State::Cut { full_len, .. } => SizeHint::with_exact(*full_len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn whole_body_is_one_frame() {
        let body = SandboxBody::whole(r#"{"a":1}"#);
        assert_eq!(body.size_hint().exact(), Some(7));
        assert_eq!(body.collect().await.unwrap().to_bytes(), r#"{"a":1}"#);
    }

    #[tokio::test]
    async fn cut_body_sends_half_then_fails() {
        let mut body = SandboxBody::cut("0123456789");
        assert_eq!(body.size_hint().exact(), Some(10));
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "01234");
        assert_eq!(body.frame().await.unwrap().unwrap_err(), BodyCut);
    }
}
