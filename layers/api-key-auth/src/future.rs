//! [`ResponseFuture`]: key lookup → subscription → model ownership → the inner service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tollgate_core::{
    BackendError, BoxFuture, ErrorCode, GateBody, Identity, IdentitySlot, KeyCreditLimit, ModelId,
    Principal, RateLimitInfo, Rejection,
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
    fn call(mut self, principal: Principal, credit_limit: Option<u64>) -> S::Future {
        self.request.extensions_mut().insert(principal);
        if let Some(limit) = credit_limit {
            self.request.extensions_mut().insert(KeyCreditLimit(limit));
        }
        self.service.call(self.request)
    }
}

/// Whether the key's scopes and models cover the request (decided when the key is known,
/// answered after the model ownership check: a model of another org is 401, not 403).
#[derive(Debug, Clone, Copy)]
struct Permission {
    allowed: bool,
    credit_limit: Option<u64>,
}

fn forbidden<B>(principal: Principal) -> Response<GateBody<B>> {
    tracing::debug!(
        org = %principal.org,
        key = %principal.key,
        "the key's scopes or models do not cover this request"
    );
    reject(Rejection::new(ErrorCode::KeyForbidden), Some(principal))
}

/// The inner call, or the 403 when the key may not make it.
fn admit<S, ReqBody, ResBody>(
    call: PendingCall<S, ReqBody>,
    principal: Principal,
    permission: Permission,
) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>>,
{
    if permission.allowed {
        State::Inner {
            future: call.call(principal, permission.credit_limit),
            principal: Some(principal),
        }
    } else {
        State::Respond {
            response: Some(forbidden(principal)),
        }
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
            permission: Permission,
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

    /// A live key: subscription (402), then model ownership (401), then the key's scopes
    /// and models (403).
    fn granted(
        grant: KeyGrant,
        call: PendingCall<S, ReqBody>,
        now: u64,
    ) -> State<S, ReqBody, ResBody> {
        if let Some(slot) = call.request.extensions().get::<IdentitySlot>() {
            slot.set(Identity {
                org: grant.org,
                key: grant.key,
            });
        }
        call.config.store.record_use(grant.key, now);
        let permission = Permission {
            allowed: grant.limits.scopes.allows(call.request.method())
                && call.model.is_none_or(|m| grant.limits.allows_model(m)),
            credit_limit: grant.limits.credit_limit,
        };
        match (grant.principal(), call.model) {
            (None, _) => {
                tracing::debug!(
                    org = %grant.org,
                    key = %grant.key,
                    "organization has no active subscription"
                );
                let identity = Identity {
                    org: grant.org,
                    key: grant.key,
                };
                // No plan, so no `Principal`: the grant tells outer layers whose key it was.
                let mut response = reject(Rejection::new(ErrorCode::NoSubscription), Some(grant));
                response.extensions_mut().insert(identity);
                State::Respond {
                    response: Some(response),
                }
            }
            (Some(principal), Some(model)) => State::Ownership {
                check: call.config.store.owns_model(grant.org, model),
                principal,
                permission,
                call: Some(call),
            },
            (Some(principal), None) => admit(call, principal, permission),
        }
    }
}

/// The rate-limit state of a caller the layer refused with 401, 402 `NO_SUBSCRIPTION` or 403
/// `KEY_FORBIDDEN`: no (org, model) window applies to the request, and it may not be sent
/// until the caller authenticates (subscribes, uses a key allowed to make it), so
/// `RateLimit-Limit: 0`, `RateLimit-Remaining: 0`, `RateLimit-Reset: 0` (waiting does not
/// help, hence no `Retry-After`). Nothing is counted against any window.
pub(crate) const NO_QUOTA: RateLimitInfo = RateLimitInfo {
    limit: 0,
    remaining: 0,
    reset_secs: 0,
    retry_after_secs: None,
};

/// Renders a refusal of the layer: the `{error, code}` body, plus the [`NO_QUOTA`]
/// `RateLimit-*` headers on 401, 402 and 403 (every response carries them; store failures
/// are not about the caller's quota and get none).
pub(crate) fn refusal<B>(rejection: Rejection) -> Response<GateBody<B>> {
    let quota = matches!(
        rejection.code(),
        ErrorCode::InvalidApiKey | ErrorCode::NoSubscription | ErrorCode::KeyForbidden
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
                            let now = call.config.clock.now_ms();
                            if !grant.limits.is_live_at(now) {
                                tracing::debug!(
                                    key = %grant.key,
                                    "API key expired or past its rotation's grace period"
                                );
                                State::Respond {
                                    response: Some(reject::<_, Principal>(invalid_key(), None)),
                                }
                            } else {
                                Self::granted(grant, call, now)
                            }
                        }
                    }
                }
                StateProj::Ownership {
                    check,
                    principal,
                    permission,
                    call,
                } => {
                    let outcome = ready!(check.as_mut().poll(cx));
                    let call = call.take().expect(POLLED_AFTER_COMPLETION);
                    let (principal, permission) = (*principal, *permission);
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
                        Ok(true) => admit(call, principal, permission),
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
