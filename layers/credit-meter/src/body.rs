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
use tollgate_core::{BoxError, CreditSettlement, GateBody};

use crate::settle::{SettleCall, Ticket};

/// Why a metered body ended with an error of the meter's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterBodyError {
    /// The charge could not be recorded, so the rest of the response is withheld.
    ChargeUnrecorded,
    /// The 2xx body was larger than the meter buffers to check it is JSON.
    TooLarge(usize),
}

impl fmt::Display for MeterBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeterBodyError::ChargeUnrecorded => f.write_str(
                "the charge for this response could not be recorded; the response is withheld",
            ),
            MeterBodyError::TooLarge(cap) => {
                write!(
                    f,
                    "the response body is larger than the meter's {cap} bytes"
                )
            }
        }
    }
}

impl std::error::Error for MeterBodyError {}

pin_project! {
    /// The response body of [`CreditMeter`](crate::CreditMeter).
    ///
    /// For a 2xx response of a priced route, the body charges the request when the inner
    /// body reaches its end: the commit completes *before* this body reports its own end,
    /// so a layer outside that waits for the end of the body finds the
    /// [`CreditReceipt`](tollgate_core::CreditReceipt) settled. A body error or dropping the
    /// body before its end releases the hold instead. The body is complete when the inner
    /// body ends, says [`Body::is_end_stream`], or has delivered the exact length it
    /// announced; the commit then runs before the last bytes are yielded, because a server
    /// that knows the length stops polling right after them. Until the hold is settled,
    /// [`Body::is_end_stream`] is `false`.
    ///
    /// When the request carried [`JsonBodyRequired`](tollgate_core::JsonBodyRequired), the
    /// 2xx body is buffered (up to the layer's cap) and charged only if it is valid JSON; it
    /// is then yielded as one frame (followed by trailers, if any). Otherwise frames stream
    /// through untouched.
    ///
    /// If the charge cannot be recorded, the body ends with a [`MeterBodyError`] in place of
    /// the data it held back, so a response is never delivered whole without its charge.
    pub struct MeterBody<B>
    where
        B: Body,
    {
        #[pin]
        inner: GateBody<B>,
        meter: Meter,
    }
}

enum Meter {
    /// Not metered (or already settled): the inner body is passed on as it is.
    Off,
    /// Reading the inner body. `buffer` is `Some` when it must be checked for JSON;
    /// `remaining` counts down the exact length the body announced, if it did.
    Streaming {
        ticket: Ticket,
        buffer: Option<Buffer>,
        trailers: Option<HeaderMap>,
        remaining: Option<u64>,
    },
    /// The inner body is complete (or failed); the hold is being committed or released.
    Settling {
        call: SettleCall,
        tail: Tail,
    },
    /// Settled; yielding what was held back.
    Tail(Tail),
    Done,
}

/// A 2xx body held back to check it is JSON, up to `cap` bytes.
struct Buffer {
    data: BytesMut,
    cap: usize,
}

/// What is yielded after the settlement, in order: an error, or the held-back data and
/// trailers; then the rest of the inner body unless it already ended.
struct Tail {
    error: Option<BoxError>,
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    inner_done: bool,
}

impl Tail {
    fn len(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }

    fn is_empty(&self) -> bool {
        self.error.is_none() && self.data.is_none() && self.trailers.is_none()
    }
}

/// The inner body is complete: commits (or, for a buffered body that is not JSON, releases)
/// and returns the data still to be yielded.
fn finish(
    ticket: Ticket,
    buffer: Option<Buffer>,
    last: Option<Bytes>,
) -> (SettleCall, Option<Bytes>) {
    match buffer {
        None => (ticket.commit(), last),
        Some(Buffer { data: mut buf, .. }) => {
            let data = match last {
                // A body of one frame needs no copy.
                Some(last) if buf.is_empty() => last,
                Some(last) => {
                    buf.extend_from_slice(&last);
                    buf.freeze()
                }
                None => buf.freeze(),
            };
            // A 2xx the envelope will turn into a 502 is not billed.
            let call = if is_json(&data) {
                ticket.receipt().mark_json_checked();
                ticket.commit()
            } else {
                ticket.release()
            };
            (call, (!data.is_empty()).then_some(data))
        }
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

    pub(crate) fn metered(body: B, ticket: Ticket, buffer_limit: Option<usize>) -> Self {
        let remaining = body.size_hint().exact();
        MeterBody {
            inner: GateBody::inner(body),
            meter: Meter::Streaming {
                ticket,
                buffer: buffer_limit.map(|cap| Buffer {
                    data: BytesMut::new(),
                    cap,
                }),
                trailers: None,
                remaining,
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
    // serde_json's slice reader skips string contents without checking UTF-8, and JSON must be
    // UTF-8: a body the envelope would refuse must never be charged.
    std::str::from_utf8(data)
        .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
}

impl<B> Body for MeterBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            match mem::replace(this.meter, Meter::Done) {
                Meter::Off => {
                    *this.meter = Meter::Off;
                    return this
                        .inner
                        .poll_frame(cx)
                        .map(|frame| frame.map(|f| f.map_err(Into::into)));
                }
                Meter::Streaming {
                    ticket,
                    mut buffer,
                    mut trailers,
                    mut remaining,
                } => match this.inner.as_mut().poll_frame(cx) {
                    Poll::Pending => {
                        *this.meter = Meter::Streaming {
                            ticket,
                            buffer,
                            trailers,
                            remaining,
                        };
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            if let Some(r) = remaining.as_mut() {
                                *r = r.saturating_sub(data.len() as u64);
                            }
                            // Settle *before* yielding the last bytes: a server that knows
                            // the length (or sees `is_end_stream`) stops polling right after
                            // them and drops the body.
                            if this.inner.is_end_stream() || remaining == Some(0) {
                                let (call, data) = finish(ticket, buffer, Some(data));
                                *this.meter = Meter::Settling {
                                    call,
                                    tail: Tail {
                                        error: None,
                                        data,
                                        trailers,
                                        inner_done: false,
                                    },
                                };
                                continue;
                            }
                            let frame = match buffer.as_mut() {
                                Some(buf) if buf.data.len() + data.len() > buf.cap => {
                                    // Too large to check: not charged, and not delivered
                                    // as a whole either.
                                    let cap = buf.cap;
                                    *this.meter = Meter::Settling {
                                        call: ticket.release(),
                                        tail: Tail {
                                            error: Some(MeterBodyError::TooLarge(cap).into()),
                                            data: None,
                                            trailers: None,
                                            inner_done: true,
                                        },
                                    };
                                    continue;
                                }
                                Some(buf) => {
                                    buf.data.extend_from_slice(&data);
                                    None
                                }
                                None => Some(Frame::data(data)),
                            };
                            *this.meter = Meter::Streaming {
                                ticket,
                                buffer,
                                trailers,
                                remaining,
                            };
                            if let Some(frame) = frame {
                                return Poll::Ready(Some(Ok(frame)));
                            }
                        }
                        Err(frame) => {
                            let frame = if buffer.is_some() {
                                if let Ok(more) = frame.into_trailers() {
                                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                                }
                                None
                            } else {
                                Some(frame)
                            };
                            *this.meter = Meter::Streaming {
                                ticket,
                                buffer,
                                trailers,
                                remaining,
                            };
                            if let Some(frame) = frame {
                                return Poll::Ready(Some(Ok(frame)));
                            }
                        }
                    },
                    Poll::Ready(Some(Err(error))) => {
                        *this.meter = Meter::Settling {
                            call: ticket.release(),
                            tail: Tail {
                                error: Some(error.into()),
                                data: None,
                                trailers: None,
                                inner_done: true,
                            },
                        };
                    }
                    Poll::Ready(None) => {
                        let (call, data) = finish(ticket, buffer, None);
                        *this.meter = Meter::Settling {
                            call,
                            tail: Tail {
                                error: None,
                                data,
                                trailers,
                                inner_done: true,
                            },
                        };
                    }
                },
                Meter::Settling { mut call, mut tail } => {
                    let Poll::Ready(settlement) = call.poll_settle(cx) else {
                        *this.meter = Meter::Settling { call, tail };
                        return Poll::Pending;
                    };
                    if settlement == CreditSettlement::Unrecorded {
                        // Not billed, so not delivered: the held-back data never leaves.
                        tail = Tail {
                            error: Some(MeterBodyError::ChargeUnrecorded.into()),
                            data: None,
                            trailers: None,
                            inner_done: true,
                        };
                    }
                    *this.meter = Meter::Tail(tail);
                }
                Meter::Tail(mut tail) => {
                    let frame = if let Some(error) = tail.error.take() {
                        Err(error)
                    } else if let Some(data) = tail.data.take() {
                        Ok(Frame::data(data))
                    } else if let Some(trailers) = tail.trailers.take() {
                        Ok(Frame::trailers(trailers))
                    } else {
                        // Anything the inner body still has (trailers) passes through.
                        *this.meter = if tail.inner_done {
                            Meter::Done
                        } else {
                            Meter::Off
                        };
                        continue;
                    };
                    *this.meter = Meter::Tail(tail);
                    return Poll::Ready(Some(frame));
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
            Meter::Tail(t) => t.is_empty() && (t.inner_done || self.inner.is_end_stream()),
            Meter::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.meter {
            Meter::Off => self.inner.size_hint(),
            Meter::Streaming { buffer, .. } => {
                let held = buffer.as_ref().map_or(0, |b| b.data.len() as u64);
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

#[cfg(test)]
mod json_tests {
    use super::is_json;

    #[test]
    fn only_utf8_json_counts_as_json() {
        assert!(is_json(br#"{"a":"b","n":[1,2.5,null]}"#));
        assert!(is_json("{\"name\":\"Stella 💕\"}".as_bytes()));
        // Valid JSON syntax around a string that is not UTF-8: the envelope refuses it, so
        // the meter must not charge it.
        assert!(!is_json(b"{\"a\":\"\xff\"}"));
        assert!(!is_json(b"<html></html>"));
        assert!(!is_json(b""));
    }
}
