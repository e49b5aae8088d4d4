//! The response future of [`UpstreamSign`](crate::UpstreamSign): look up the session → sign →
//! call the upstream → (read a 4xx body) → (mark the model disconnected) → answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, COOKIE, RETRY_AFTER, SET_COOKIE, USER_AGENT,
};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tollgate_core::{BackendError, BoxError, BoxFuture, ErrorCode, GateBody, ModelId, Rejection};
use tower_service::Service;

use crate::classify::{classify_error_body, classify_head, Verdict};
use crate::layer::Shared;
use crate::rules::Signature;
use crate::session::{ModelSession, ModelStatus, Session};
use crate::signer::SignError;

static SIGN: HeaderName = HeaderName::from_static("sign");
static TIME: HeaderName = HeaderName::from_static("time");
static APP_TOKEN: HeaderName = HeaderName::from_static("app-token");
static USER_ID: HeaderName = HeaderName::from_static("user-id");
static X_BC: HeaderName = HeaderName::from_static("x-bc");
const ACCEPT_VALUE: &str = "application/json, text/plain, */*";

/// The session as header values, checked once.
struct SessionHeaders {
    user_id: HeaderValue,
    cookie: HeaderValue,
    x_bc: HeaderValue,
    user_agent: HeaderValue,
}

impl SessionHeaders {
    /// `None` when a part cannot be sent as a header: such a session can never work.
    fn new(session: &Session) -> Option<Self> {
        let secret = |v: &str| {
            HeaderValue::from_str(v).ok().map(|mut h| {
                // Never indexed by HTTP/2 HPACK, and `Debug` prints "Sensitive".
                h.set_sensitive(true);
                h
            })
        };
        Some(SessionHeaders {
            user_id: HeaderValue::from_str(&session.user_id).ok()?,
            cookie: secret(&session.cookie)?,
            x_bc: secret(&session.x_bc)?,
            user_agent: HeaderValue::from_str(&session.user_agent).ok()?,
        })
    }
}

struct Pending<S, ReqBody> {
    inner: S,
    req: Request<ReqBody>,
}

type SessionFuture = BoxFuture<Result<Option<ModelSession>, BackendError>>;

/// The answer to a request whose session was replaced while it was in flight: the upstream
/// refused the old session, the model's new one has not been tried.
const STALE_SESSION: &str =
    "The model was reconnected while this request was in flight. Retry the request.";

pin_project! {
    #[project = StateProj]
    enum State<S, F, ReqBody, ResBody> {
        Session {
            fut: SessionFuture,
            pending: Option<Pending<S, ReqBody>>,
        },
        Sign {
            fut: BoxFuture<Result<Signature, SignError>>,
            pending: Option<Pending<S, ReqBody>>,
            headers: Option<SessionHeaders>,
        },
        Inner {
            #[pin]
            fut: F,
        },
        ReadError {
            #[pin]
            body: ResBody,
            status: StatusCode,
            buf: Vec<u8>,
        },
        Disconnect {
            fut: BoxFuture<Result<bool, BackendError>>,
            rejection: Option<Rejection>,
        },
        Reject {
            rejection: Option<Rejection>,
        },
        Done,
    }
}

pin_project! {
    /// The response future of [`UpstreamSign`](crate::UpstreamSign).
    pub struct ResponseFuture<S, F, ReqBody, ResBody> {
        #[pin]
        state: State<S, F, ReqBody, ResBody>,
        shared: Arc<Shared>,
        model: Option<ModelId>,
        // The version of the session the request is signed with: a disconnect applies to it
        // only, never to a session the model was reconnected with since.
        version: u64,
    }
}

impl<S, F, ReqBody, ResBody> std::fmt::Debug for ResponseFuture<S, F, ReqBody, ResBody> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> ResponseFuture<S, S::Future, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    pub(crate) fn new(
        shared: Arc<Shared>,
        inner: S,
        req: Request<ReqBody>,
        model: Option<ModelId>,
    ) -> Self {
        let state = match model {
            Some(model) => State::Session {
                fut: shared.sessions.session(model),
                pending: Some(Pending { inner, req }),
            },
            None => {
                tracing::error!(
                    "upstream request without a ModelId extension: the proxy must insert it"
                );
                State::Reject {
                    rejection: Some(
                        Rejection::new(ErrorCode::InternalError)
                            .with_message("The upstream request names no model."),
                    ),
                }
            }
        };
        ResponseFuture {
            state,
            shared,
            model,
            version: 0,
        }
    }
}

fn respond<B>(rejection: Rejection) -> Response<GateBody<B>> {
    rejection.into_response()
}

fn is_timeout(err: &BoxError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = source {
        if e.is::<tokio::time::error::Elapsed>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = e.source();
    }
    false
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, S::Future, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<GateBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Session { fut, pending } => {
                    let looked_up = ready!(fut.as_mut().poll(cx));
                    let next = match looked_up {
                        Err(e) => {
                            tracing::error!(model = ?this.model, error = %e, "session store failed");
                            State::Reject {
                                rejection: Some(e.rejection_from("sessions")),
                            }
                        }
                        Ok(None)
                        | Ok(Some(ModelSession {
                            status: ModelStatus::Disconnected,
                            ..
                        })) => State::Reject {
                            rejection: Some(Rejection::new(ErrorCode::ModelSessionExpired)),
                        },
                        Ok(Some(ModelSession {
                            session,
                            status: ModelStatus::Connected,
                            version,
                        })) => {
                            *this.version = version;
                            match (SessionHeaders::new(&session), pending.take()) {
                                (Some(headers), Some(pending)) => {
                                    let path = pending
                                        .req
                                        .uri()
                                        .path_and_query()
                                        .map_or("/", |pq| pq.as_str());
                                    State::Sign {
                                        fut: this.shared.signer.sign(path, &session.user_id),
                                        pending: Some(pending),
                                        headers: Some(headers),
                                    }
                                }
                                (None, _) => {
                                    // Stored session material that cannot go on the wire can
                                    // never work: the model must be reconnected.
                                    tracing::warn!(model = ?this.model,
                                        "model session holds characters a header cannot carry; disconnecting it");
                                    disconnect(
                                        this.shared,
                                        *this.model,
                                        *this.version,
                                        None,
                                        Rejection::new(ErrorCode::ModelSessionExpired),
                                    )
                                }
                                (Some(_), None) => internal_error(),
                            }
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Sign {
                    fut,
                    pending,
                    headers,
                } => {
                    let signed = ready!(fut.as_mut().poll(cx));
                    let (Some(Pending { mut inner, mut req }), Some(session)) =
                        (pending.take(), headers.take())
                    else {
                        this.state.set(internal_error());
                        continue;
                    };
                    let signature = signed.and_then(|s| {
                        let value = |v: &str| {
                            HeaderValue::from_str(v).map_err(|_| {
                                SignError::BadResponse("the signature is not header text".into())
                            })
                        };
                        Ok((value(&s.sign)?, value(&s.time)?, value(&s.app_token)?))
                    });
                    let (sign, time, app_token) = match signature {
                        Ok(values) => values,
                        Err(e) => {
                            tracing::warn!(model = ?this.model, error = %e,
                                "signing the upstream request failed");
                            this.state.set(State::Reject {
                                rejection: Some(Rejection::new(ErrorCode::SigningFailed)),
                            });
                            continue;
                        }
                    };
                    let is_write = matches!(
                        *req.method(),
                        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
                    );
                    let h = req.headers_mut();
                    h.insert(SIGN.clone(), sign);
                    h.insert(TIME.clone(), time);
                    h.insert(APP_TOKEN.clone(), app_token);
                    h.insert(USER_ID.clone(), session.user_id);
                    h.insert(COOKIE, session.cookie);
                    h.insert(X_BC.clone(), session.x_bc);
                    h.insert(USER_AGENT, session.user_agent);
                    h.insert(ACCEPT, HeaderValue::from_static(ACCEPT_VALUE));
                    if is_write {
                        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    }
                    let fut = inner.call(req);
                    this.state.set(State::Inner { fut });
                }
                StateProj::Inner { fut } => {
                    let res = match ready!(fut.poll(cx)) {
                        Ok(res) => res,
                        Err(e) => {
                            let e: BoxError = e.into();
                            let code = if is_timeout(&e) {
                                ErrorCode::UpstreamTimeout
                            } else {
                                ErrorCode::UpstreamError
                            };
                            tracing::warn!(model = ?this.model, error = %e,
                                "upstream request failed");
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(respond(Rejection::new(code))));
                        }
                    };
                    let status = res.status();
                    match classify_head(status, res.headers()) {
                        Verdict::Pass => {
                            this.state.set(State::Done);
                            let (mut parts, body) = res.into_parts();
                            // The upstream's cookies belong to the model's session: never
                            // hand them to API clients.
                            parts.headers.remove(SET_COOKIE);
                            return Poll::Ready(Ok(Response::from_parts(
                                parts,
                                GateBody::inner(body),
                            )));
                        }
                        Verdict::Reject {
                            rejection,
                            retry_after,
                        } => {
                            this.state.set(State::Done);
                            tracing::debug!(model = ?this.model,
                                status = status.as_u16(), code = %rejection.code(),
                                "upstream refused the request");
                            let mut out = respond::<ResBody>(rejection);
                            if let Some(v) = retry_after {
                                out.headers_mut().insert(RETRY_AFTER, v);
                            }
                            return Poll::Ready(Ok(out));
                        }
                        Verdict::Disconnect(rejection) => {
                            this.state.set(disconnect(
                                this.shared,
                                *this.model,
                                *this.version,
                                Some(status),
                                rejection,
                            ));
                        }
                        Verdict::ReadBody => {
                            this.state.set(State::ReadError {
                                body: res.into_body(),
                                status,
                                buf: Vec::new(),
                            });
                        }
                    }
                }
                StateProj::ReadError {
                    mut body,
                    status,
                    buf,
                } => {
                    let limit = this.shared.error_body_limit;
                    while buf.len() < limit {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                if let Ok(data) = frame.into_data() {
                                    let room = limit - buf.len();
                                    buf.extend_from_slice(&data[..data.len().min(room)]);
                                }
                            }
                            // A broken error body: classify with what arrived.
                            Some(Err(_)) | None => break,
                        }
                    }
                    let status = *status;
                    match classify_error_body(status, buf) {
                        Verdict::Disconnect(rejection) => {
                            this.state.set(disconnect(
                                this.shared,
                                *this.model,
                                *this.version,
                                Some(status),
                                rejection,
                            ));
                        }
                        Verdict::Reject {
                            rejection,
                            retry_after: _,
                        } => {
                            tracing::debug!(model = ?this.model,
                                status = status.as_u16(), code = %rejection.code(),
                                "upstream refused the request");
                            this.state.set(State::Reject {
                                rejection: Some(rejection),
                            });
                        }
                        Verdict::Pass | Verdict::ReadBody => {
                            this.state.set(State::Reject {
                                rejection: Some(Rejection::new(ErrorCode::UpstreamError)),
                            });
                        }
                    }
                }
                StateProj::Disconnect { fut, rejection } => {
                    let mut rejection = rejection
                        .take()
                        .unwrap_or_else(|| Rejection::new(ErrorCode::ModelSessionExpired));
                    match ready!(fut.as_mut().poll(cx)) {
                        Ok(true) => {}
                        Ok(false) => {
                            // Reconnected (or removed) while this request was out: the dead
                            // session was the old one and the model keeps its new one.
                            tracing::info!(model = ?this.model, version = *this.version,
                                "the upstream refused a session the model no longer uses; \
                                 it stays connected");
                            rejection = rejection.with_message(STALE_SESSION);
                        }
                        Err(e) => {
                            // The client still learns the session is dead; the next request
                            // will try again to persist it.
                            tracing::error!(model = ?this.model, error = %e,
                                "could not mark the model disconnected");
                        }
                    }
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(respond(rejection)));
                }
                StateProj::Reject { rejection } => {
                    let rejection = rejection
                        .take()
                        .unwrap_or_else(|| Rejection::new(ErrorCode::InternalError));
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(respond(rejection)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// A state the future cannot reach unless polled after a panic inside it.
fn internal_error<S, F, ReqBody, ResBody>() -> State<S, F, ReqBody, ResBody> {
    State::Reject {
        rejection: Some(Rejection::new(ErrorCode::InternalError)),
    }
}

/// Marks the model disconnected (if it still has the session of `version`), then answers
/// with `rejection`.
fn disconnect<S, F, ReqBody, ResBody>(
    shared: &Shared,
    model: Option<ModelId>,
    version: u64,
    upstream_status: Option<StatusCode>,
    rejection: Rejection,
) -> State<S, F, ReqBody, ResBody> {
    let Some(model) = model else {
        return State::Reject {
            rejection: Some(rejection),
        };
    };
    if let Some(status) = upstream_status {
        tracing::warn!(model = %model, status = status.as_u16(),
            "upstream says the model's session is dead; marking it disconnected");
    }
    State::Disconnect {
        fut: shared.sessions.mark_disconnected(model, version),
        rejection: Some(rejection),
    }
}
