//! [`ResponseFuture`]: key lookup → subscription → model ownership → the inner service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tollgate_core::{
    BackendError, BoxFuture, ErrorCode, GateBody, Identity, IdentitySlot, ModelId, Principal,
    RateLimitInfo, Rejection,
};
use tower_service::Service;

use crate::layer::Config;
use crate::service::invalid_key;
use crate::store::KeyGrant;

/// The inner call waiting for the checks: the ready service and the request.
pub(crate) struct PendingCall<S, ReqBody> {
    pub(crate) service: S,
    pub(crate) request: Request<ReqBody>,
    pub(crate) model: Option<ModelId>,
    pub(crate) config: Arc<Config>,
}

impl<S, ReqBody> PendingCall<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn call(mut self, principal: Principal) -> S::Future {
        self.request.extensions_mut().insert(principal);
        self.service.call(self.request)
    }
}

pin_project! {
    /// The response future of [`ApiKeyAuth`](crate::ApiKeyAuth).
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody, ResBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
    {
        // Waiting for the store to resolve the key's hash.
        Lookup {
            lookup: BoxFuture<Result<Option<KeyGrant>, BackendError>>,
            call: Option<PendingCall<S, ReqBody>>,
        },
        // Waiting for the store to say whether the org owns the route's model.
        Ownership {
            check: BoxFuture<Result<bool, BackendError>>,
            principal: Principal,
            call: Option<PendingCall<S, ReqBody>>,
        },
        // The inner service is answering.
        Inner {
            #[pin]
            future: S::Future,
            principal: Option<Principal>,
        },
        // The layer answers by itself.
        Respond {
            response: Option<Response<GateBody<ResBody>>>,
        },
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn pass_through(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Inner {
                future,
                principal: None,
            },
        }
    }

    pub(crate) fn rejected(response: Response<GateBody<ResBody>>) -> Self {
        ResponseFuture {
            state: State::Respond {
                response: Some(response),
            },
        }
    }

    pub(crate) fn lookup(
        lookup: BoxFuture<Result<Option<KeyGrant>, BackendError>>,
        call: PendingCall<S, ReqBody>,
    ) -> Self {
        ResponseFuture {
            state: State::Lookup {
                lookup,
                call: Some(call),
            },
        }
    }
}

/// The rate-limit state of a caller the layer refused with 401 or 402 `NO_SUBSCRIPTION`: no
/// (org, model) window applies to it, and it may send no request until it authenticates
/// (or subscribes), so `RateLimit-Limit: 0`, `RateLimit-Remaining: 0`, `RateLimit-Reset: 0`
/// (waiting does not help, hence no `Retry-After`). Nothing is counted against any window.
pub(crate) const NO_QUOTA: RateLimitInfo = RateLimitInfo {
    limit: 0,
    remaining: 0,
    reset_secs: 0,
    retry_after_secs: None,
};

/// Renders a refusal of the layer: the `{error, code}` body, plus the [`NO_QUOTA`]
/// `RateLimit-*` headers on 401 and 402 (every response carries them; store failures are
/// not about the caller's quota and get none).
pub(crate) fn refusal<B>(rejection: Rejection) -> Response<GateBody<B>> {
    let quota = matches!(
        rejection.code(),
        ErrorCode::InvalidApiKey | ErrorCode::NoSubscription
    );
    let mut response: Response<GateBody<B>> = rejection.into_response();
    if quota {
        NO_QUOTA.apply_headers(response.headers_mut());
    }
    response
}

/// A rejection response, carrying `extra` (what is known about the caller) in its
/// extensions for the layers outside.
fn reject<B, T>(rejection: Rejection, extra: Option<T>) -> Response<GateBody<B>>
where
    T: Clone + Send + Sync + 'static,
{
    let mut response: Response<GateBody<B>> = refusal(rejection);
    if let Some(extra) = extra {
        response.extensions_mut().insert(extra);
    }
    if let Some(principal) = response.extensions().get::<Principal>().copied() {
        response.extensions_mut().insert(Identity::from(principal));
    }
    response
}

fn backend_failure<B>(
    error: &BackendError,
    what: &'static str,
    principal: Option<Principal>,
) -> Response<GateBody<B>> {
    tracing::error!(%error, "key store failed during {what}");
    reject(error.rejection_from("keys"), principal)
}

const POLLED_AFTER_COMPLETION: &str = "ResponseFuture polled after completion";

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<GateBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Lookup { lookup, call } => {
                    let outcome = ready!(lookup.as_mut().poll(cx));
                    // Present until this state is left, which happens right below.
                    let call = call.take().expect(POLLED_AFTER_COMPLETION);
                    match outcome {
                        Err(error) => State::Respond {
                            response: Some(backend_failure(&error, "key lookup", None)),
                        },
                        Ok(None) => {
                            tracing::debug!("unknown or revoked API key");
                            State::Respond {
                                response: Some(reject::<_, Principal>(invalid_key(), None)),
                            }
                        }
                        Ok(Some(grant)) => {
                            if let Some(slot) = call.request.extensions().get::<IdentitySlot>() {
                                slot.set(Identity {
                                    org: grant.org,
                                    key: grant.key,
                                });
                            }
                            let now = call.config.clock.now_ms();
                            call.config.store.record_use(grant.key, now);
                            match (grant.principal(), call.model) {
                                (None, _) => {
                                    tracing::debug!(
                                        org = %grant.org,
                                        key = %grant.key,
                                        "organization has no active subscription"
                                    );
                                    // No plan, so no `Principal`: the grant tells outer
                                    // layers whose key it was.
                                    let mut response = reject(
                                        Rejection::new(ErrorCode::NoSubscription),
                                        Some(grant),
                                    );
                                    response.extensions_mut().insert(Identity {
                                        org: grant.org,
                                        key: grant.key,
                                    });
                                    State::Respond {
                                        response: Some(response),
                                    }
                                }
                                (Some(principal), Some(model)) => State::Ownership {
                                    check: call.config.store.owns_model(grant.org, model),
                                    principal,
                                    call: Some(call),
                                },
                                (Some(principal), None) => State::Inner {
                                    future: call.call(principal),
                                    principal: Some(principal),
                                },
                            }
                        }
                    }
                }
                StateProj::Ownership {
                    check,
                    principal,
                    call,
                } => {
                    let outcome = ready!(check.as_mut().poll(cx));
                    let call = call.take().expect(POLLED_AFTER_COMPLETION);
                    let principal = *principal;
                    match outcome {
                        Err(error) => State::Respond {
                            response: Some(backend_failure(
                                &error,
                                "model ownership check",
                                Some(principal),
                            )),
                        },
                        Ok(false) => {
                            tracing::debug!(
                                org = %principal.org,
                                key = %principal.key,
                                "model is not the organization's (or does not exist)"
                            );
                            State::Respond {
                                response: Some(reject(invalid_key(), Some(principal))),
                            }
                        }
                        Ok(true) => State::Inner {
                            future: call.call(principal),
                            principal: Some(principal),
                        },
                    }
                }
                StateProj::Inner { future, principal } => {
                    let mut response = ready!(future.poll(cx))?.map(GateBody::inner);
                    if let Some(principal) = principal {
                        response.extensions_mut().insert(*principal);
                        response.extensions_mut().insert(Identity::from(*principal));
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Respond { response } => {
                    return Poll::Ready(Ok(response.take().expect(POLLED_AFTER_COMPLETION)));
                }
            };
            state.set(next);
        }
    }
}

impl<S, ReqBody, ResBody> fmt::Debug for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Lookup { .. } => "Lookup",
            State::Ownership { .. } => "Ownership",
            State::Inner { .. } => "Inner",
            State::Respond { .. } => "Respond",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
