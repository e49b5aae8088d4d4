//! [`ResponseFuture`]: hold → inner call → settle or hand the hold to the body.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tollgate_core::{CreditSettlement, ErrorCode, Rejection};
use tower_service::Service;

use crate::body::MeterBody;
use crate::ledger::HoldOutcome;
use crate::settle::{HoldCall, SettleCall, Settler, Ticket};

pin_project! {
    /// The response future of [`CreditMeter`](crate::CreditMeter).
    ///
    /// Dropping it at any point settles nothing twice and charges nothing: a hold being
    /// granted or already granted is released.
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        Reject { rejection: Option<Rejection> },
        Check {
            hold: HoldCall,
            settler: Option<Settler>,
            cost: u64,
            // `Some(cap)`: the 2xx body must be JSON, buffered up to `cap` bytes to check.
            buffer_limit: Option<usize>,
            service: Option<S>,
            request: Option<Request<ReqBody>>,
        },
        Inner {
            #[pin]
            future: S::Future,
            // `None`: a free route, passed through without metering.
            metering: Option<(Ticket, Option<usize>)>,
        },
        // Settling before answering: non-2xx, errors, and 2xx whose body is already complete.
        Settling {
            call: SettleCall,
            outcome: Option<Result<S::Response, S::Error>>,
        },
        Done,
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn reject(rejection: Rejection) -> Self {
        ResponseFuture {
            state: State::Reject {
                rejection: Some(rejection),
            },
        }
    }

    pub(crate) fn unmetered(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Inner {
                future,
                metering: None,
            },
        }
    }

    pub(crate) fn check(
        hold: HoldCall,
        settler: Settler,
        cost: u64,
        buffer_limit: Option<usize>,
        service: S,
        request: Request<ReqBody>,
    ) -> Self {
        ResponseFuture {
            state: State::Check {
                hold,
                settler: Some(settler),
                cost,
                buffer_limit,
                service: Some(service),
                request: Some(request),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<tollgate_core::BoxError>,
{
    type Output = Result<Response<MeterBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reject { rejection } => {
                    let rejection = rejection
                        .take()
                        .unwrap_or_else(|| Rejection::new(ErrorCode::InternalError));
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(rejection.into_response()));
                }
                StateProj::Check {
                    hold,
                    settler,
                    cost,
                    buffer_limit,
                    service,
                    request,
                } => {
                    let outcome = std::task::ready!(hold.poll_outcome(cx));
                    let granted = match outcome {
                        Ok(HoldOutcome::Held(h)) => Some(h),
                        Ok(HoldOutcome::Unlimited) => None,
                        Ok(HoldOutcome::Insufficient { .. }) => {
                            this.state.set(State::Reject {
                                rejection: Some(Rejection::new(ErrorCode::InsufficientCredits)),
                            });
                            continue;
                        }
                        Ok(HoldOutcome::NoSubscription) => {
                            this.state.set(State::Reject {
                                rejection: Some(Rejection::new(ErrorCode::NoSubscription)),
                            });
                            continue;
                        }
                        Ok(HoldOutcome::KeyLimit { .. }) => {
                            this.state.set(State::Reject {
                                rejection: Some(Rejection::new(ErrorCode::KeyCreditLimit)),
                            });
                            continue;
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "the credit ledger failed to place a hold");
                            this.state.set(State::Reject {
                                rejection: Some(err.rejection_from("ledger")),
                            });
                            continue;
                        }
                    };
                    let receipt = tollgate_core::CreditReceipt::pending(*cost);
                    let (Some(settler), Some(mut service), Some(request)) =
                        (settler.take(), service.take(), request.take())
                    else {
                        if let Some(granted) = granted {
                            hold.ledger().release_detached(granted);
                        }
                        // Unreachable by construction; the ticket's drop releases the hold.
                        this.state.set(State::Reject {
                            rejection: Some(Rejection::new(ErrorCode::InternalError)),
                        });
                        continue;
                    };
                    let ticket = Ticket::new(settler, receipt, granted);
                    let metering = Some((ticket, *buffer_limit));
                    let future = service.call(request);
                    this.state.set(State::Inner { future, metering });
                }
                StateProj::Inner { future, metering } => {
                    let result = std::task::ready!(future.poll(cx));
                    let Some((ticket, buffer_limit)) = metering.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(result.map(|res| res.map(MeterBody::plain)));
                    };
                    match result {
                        Ok(mut res) if res.status().is_success() => {
                            res.extensions_mut().insert(ticket.receipt().clone());
                            let body = res.body();
                            if body.is_end_stream() || body.size_hint().exact() == Some(0) {
                                // Complete already (e.g. 204): a server would not poll it at
                                // all, so settle now. Empty is not JSON.
                                let call = if buffer_limit.is_some() {
                                    ticket.release()
                                } else {
                                    ticket.commit()
                                };
                                this.state.set(State::Settling {
                                    call,
                                    outcome: Some(Ok(res)),
                                });
                                continue;
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(
                                res.map(|body| MeterBody::metered(body, ticket, buffer_limit))
                            ));
                        }
                        mut outcome => {
                            if let Ok(res) = &mut outcome {
                                res.extensions_mut().insert(ticket.receipt().clone());
                            }
                            this.state.set(State::Settling {
                                call: ticket.release(),
                                outcome: Some(outcome),
                            });
                        }
                    }
                }
                StateProj::Settling { call, outcome } => {
                    let settlement = std::task::ready!(call.poll_settle(cx));
                    let outcome = outcome.take();
                    this.state.set(State::Done);
                    return Poll::Ready(match outcome {
                        // An empty 2xx whose charge could not be recorded is not delivered.
                        Some(Ok(res)) if settlement == CreditSettlement::Unrecorded => {
                            let (parts, _) = res.into_parts();
                            Ok(withheld(parts))
                        }
                        Some(result) => result.map(|res| res.map(MeterBody::plain)),
                        None => Ok(Rejection::new(ErrorCode::InternalError).into_response()),
                    });
                }
                StateProj::Done => {
                    // Polled after completion: answer instead of panicking.
                    return Poll::Ready(Ok(
                        Rejection::new(ErrorCode::InternalError).into_response()
                    ));
                }
            }
        }
    }
}

/// The 503 a withheld response is replaced by, keeping the response's extensions (the
/// receipt, and what outer layers put there) so the logger still attributes it.
fn withheld<B: Body>(parts: http::response::Parts) -> Response<MeterBody<B>> {
    let mut res: Response<MeterBody<B>> = Rejection::charge_unrecorded().into_response();
    let code = ErrorCode::ServiceUnavailable;
    *res.extensions_mut() = parts.extensions;
    res.extensions_mut().insert(code);
    res
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Reject { .. } => "reject",
            State::Check { .. } => "check",
            State::Inner { .. } => "inner",
            State::Settling { .. } => "settling",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
