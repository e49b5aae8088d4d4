//! [`ResponseFuture`]: check the window, then call the inner service (or refuse).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tollgate_core::{BackendError, BoxFuture, ErrorCode, GateBody, RateLimitInfo, Rejection};
use tower_service::Service;

use crate::store::{BucketKey, Decision};

pin_project! {
    /// The response future of [`PerModelSlidingWindow`](crate::PerModelSlidingWindow).
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
        // Waiting for the store's decision; holds the ready inner service and the request.
        Check {
            check: BoxFuture<Result<Decision, BackendError>>,
            service: Option<S>,
            request: Option<Request<ReqBody>>,
            key: BucketKey,
        },
        // Admitted (or not limited): the inner service is answering.
        Inner {
            #[pin]
            future: S::Future,
            info: Option<RateLimitInfo>,
        },
        // Answered by this layer.
        Reject {
            rejection: Option<Rejection>,
            info: Option<RateLimitInfo>,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn check(
        check: BoxFuture<Result<Decision, BackendError>>,
        service: S,
        request: Request<ReqBody>,
        key: BucketKey,
    ) -> Self {
        ResponseFuture {
            state: State::Check {
                check,
                service: Some(service),
                request: Some(request),
                key,
            },
        }
    }

    pub(crate) fn unlimited(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Inner { future, info: None },
        }
    }

    pub(crate) fn reject(rejection: Rejection, info: Option<RateLimitInfo>) -> Self {
        ResponseFuture {
            state: State::Reject {
                rejection: Some(rejection),
                info,
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<GateBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Check {
                    check,
                    service,
                    request,
                    key,
                } => {
                    let next = match ready!(check.as_mut().poll(cx)) {
                        Ok(decision) if decision.admitted => {
                            let (Some(mut service), Some(request)) =
                                (service.take(), request.take())
                            else {
                                panic!("ResponseFuture polled after completion");
                            };
                            State::Inner {
                                future: service.call(request),
                                info: Some(decision.rate_limit_info()),
                            }
                        }
                        Ok(decision) => {
                            let info = decision.rate_limit_info();
                            tracing::debug!(
                                org = %key.org,
                                model = %key.model,
                                limit = info.limit,
                                retry_after_secs = info.retry_after_secs,
                                "rate limit exceeded"
                            );
                            let mut rejection = Rejection::new(ErrorCode::RateLimitExceeded);
                            if let Some(secs) = info.retry_after_secs {
                                rejection = rejection.with_retry_after(secs);
                            }
                            State::Reject {
                                rejection: Some(rejection),
                                info: Some(info),
                            }
                        }
                        Err(error) => {
                            tracing::error!(
                                org = %key.org,
                                model = %key.model,
                                %error,
                                "rate-limit store failed; refusing the request"
                            );
                            State::Reject {
                                rejection: Some(error.rejection_from("rate_limits")),
                                info: None,
                            }
                        }
                    };
                    state.set(next);
                }
                StateProj::Inner { future, info } => {
                    let mut response = ready!(future.poll(cx))?.map(GateBody::inner);
                    if let Some(info) = info.take() {
                        annotate(&mut response, info);
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Reject { rejection, info } => {
                    let Some(rejection) = rejection.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    let mut response = rejection.into_response();
                    if let Some(info) = info.take() {
                        annotate(&mut response, info);
                    }
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

fn annotate<B>(response: &mut Response<B>, info: RateLimitInfo) {
    info.apply_headers(response.headers_mut());
    response.extensions_mut().insert(info);
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Check { .. } => "Check",
            State::Inner { .. } => "Inner",
            State::Reject { .. } => "Reject",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
