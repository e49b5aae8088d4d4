//! [`MeterBody`]: the response body of [`CreditMeter`](crate::CreditMeter). It settles the
//! request's credit hold exactly once: committed when a 2xx body reaches its end, released on
//! a body error or when it is dropped before the end.

use std::fmt;
use std::mem;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tollgate_core::GateBody;

use crate::settle::{SettleCall, Ticket};

pin_project! {
    /// The response body of [`CreditMeter`](crate::CreditMeter).
    ///
    /// For a 2xx response of a priced route, the body charges the request when the inner
    /// body reaches its end: the commit completes *before* this body reports its own end,
    /// so a layer outside that waits for the end of the body finds the
    /// [`CreditReceipt`](tollgate_core::CreditReceipt) settled. A body error or dropping the
    /// body before its end releases the hold instead. Until the hold is settled,
    /// [`Body::is_end_stream`] is `false`, so servers keep polling to the end.
    ///
    /// When the request carried [`JsonBodyRequired`](tollgate_core::JsonBodyRequired), the
    /// 2xx body is buffered and charged only if it is valid JSON; it is then yielded as one
    /// frame (followed by trailers, if any). Otherwise frames stream through untouched.
    pub struct MeterBody<B>
    where
        B: Body,
    {
        #[pin]
        inner: GateBody<B>,
        meter: Meter<B::Error>,
    }
}

enum Meter<E> {
    /// Not metered: the body is passed on as it is.
    Off,
    /// Reading the inner body; `buffer` is `Some` when it must be checked for JSON.
    Streaming {
        ticket: Ticket,
        buffer: Option<BytesMut>,
        trailers: Option<HeaderMap>,
    },
    /// The inner body ended (or failed); the hold is being committed or released.
    Settling {
        call: SettleCall,
        tail: Tail<E>,
    },
    /// Settled; yielding what was held back.
    Tail(Tail<E>),
    Done,
}

struct Tail<E> {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    error: Option<E>,
}

impl<E> Tail<E> {
    fn len(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }
}

impl<B: Body> MeterBody<B> {
    /// The inner body, not metered.
    pub fn plain(body: B) -> Self {
        MeterBody {
            inner: GateBody::inner(body),
            meter: Meter::Off,
        }
    }

    /// A complete body produced by the layer (a rejection).
    pub fn full(data: impl Into<Bytes>) -> Self {
        MeterBody {
            inner: GateBody::full(data),
            meter: Meter::Off,
        }
    }

    pub(crate) fn metered(body: B, ticket: Ticket, json_required: bool) -> Self {
        MeterBody {
            inner: GateBody::inner(body),
            meter: Meter::Streaming {
                ticket,
                buffer: json_required.then(BytesMut::new),
                trailers: None,
            },
        }
    }
}

impl<B: Body> From<Bytes> for MeterBody<B> {
    fn from(data: Bytes) -> Self {
        MeterBody::full(data)
    }
}

fn is_json(data: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

impl<B> Body for MeterBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            match mem::replace(this.meter, Meter::Done) {
                Meter::Off => {
                    *this.meter = Meter::Off;
                    return this.inner.poll_frame(cx);
                }
                Meter::Streaming {
                    ticket,
                    mut buffer,
                    mut trailers,
                } => match this.inner.as_mut().poll_frame(cx) {
                    Poll::Pending => {
                        *this.meter = Meter::Streaming {
                            ticket,
                            buffer,
                            trailers,
                        };
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        let Some(buf) = buffer.as_mut() else {
                            *this.meter = Meter::Streaming {
                                ticket,
                                buffer,
                                trailers,
                            };
                            return Poll::Ready(Some(Ok(frame)));
                        };
                        match frame.into_data() {
                            Ok(data) => buf.extend_from_slice(&data),
                            Err(frame) => {
                                if let Ok(more) = frame.into_trailers() {
                                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                                }
                            }
                        }
                        *this.meter = Meter::Streaming {
                            ticket,
                            buffer,
                            trailers,
                        };
                    }
                    Poll::Ready(Some(Err(error))) => {
                        *this.meter = Meter::Settling {
                            call: ticket.release(),
                            tail: Tail {
                                data: None,
                                trailers: None,
                                error: Some(error),
                            },
                        };
                    }
                    Poll::Ready(None) => {
                        let (call, data) = match buffer {
                            None => (ticket.commit(), None),
                            Some(buf) => {
                                let data = buf.freeze();
                                // A 2xx the envelope will turn into a 502 is not billed.
                                let call = if is_json(&data) {
                                    ticket.commit()
                                } else {
                                    ticket.release()
                                };
                                (call, (!data.is_empty()).then_some(data))
                            }
                        };
                        *this.meter = Meter::Settling {
                            call,
                            tail: Tail {
                                data,
                                trailers,
                                error: None,
                            },
                        };
                    }
                },
                Meter::Settling { mut call, tail } => {
                    if call.poll_settle(cx).is_pending() {
                        *this.meter = Meter::Settling { call, tail };
                        return Poll::Pending;
                    }
                    *this.meter = Meter::Tail(tail);
                }
                Meter::Tail(mut tail) => {
                    let frame = if let Some(error) = tail.error.take() {
                        Some(Err(error))
                    } else if let Some(data) = tail.data.take() {
                        Some(Ok(Frame::data(data)))
                    } else {
                        tail.trailers.take().map(|t| Ok(Frame::trailers(t)))
                    };
                    if frame.is_some() {
                        *this.meter = Meter::Tail(tail);
                    }
                    return Poll::Ready(frame);
                }
                Meter::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.meter {
            Meter::Off => self.inner.is_end_stream(),
            // Not over until the hold is settled: the server must poll once more.
            Meter::Streaming { .. } | Meter::Settling { .. } => false,
            Meter::Tail(t) => t.error.is_none() && t.data.is_none() && t.trailers.is_none(),
            Meter::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.meter {
            Meter::Off => self.inner.size_hint(),
            Meter::Streaming { buffer, .. } => {
                let held = buffer.as_ref().map_or(0, |b| b.len() as u64);
                let inner = self.inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(held));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(held));
                }
                hint
            }
            Meter::Settling { tail, .. } | Meter::Tail(tail) => SizeHint::with_exact(tail.len()),
            Meter::Done => SizeHint::with_exact(0),
        }
    }
}

impl<B: Body> fmt::Debug for MeterBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.meter {
            Meter::Off => "off",
            Meter::Streaming { .. } => "streaming",
            Meter::Settling { .. } => "settling",
            Meter::Tail(_) => "tail",
            Meter::Done => "done",
        };
        f.debug_struct("MeterBody").field("meter", &state).finish()
    }
}
