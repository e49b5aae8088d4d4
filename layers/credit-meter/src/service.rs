//! [`CreditMeter`]: the service produced by [`CreditMeterLayer`](crate::CreditMeterLayer).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tollgate_core::{ErrorCode, JsonBodyRequired, KeyCreditLimit, Principal, Rejection, RequestId};
use tower_service::Service;

use crate::body::MeterBody;
use crate::future::ResponseFuture;
use crate::layer::Config;
use crate::ledger::{KeyBudget, Ledger};
use crate::settle::HoldCall;

/// Meters the credits of the requests it forwards to `S`. Built by
/// [`CreditMeterLayer`](crate::CreditMeterLayer).
#[derive(Clone)]
pub struct CreditMeter<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> CreditMeter<S> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        CreditMeter { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.config.ledger
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CreditMeter<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<tollgate_core::BoxError>,
{
    type Response = Response<MeterBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let Some(route) = self.config.cost_table.resolve(&mut req) else {
            // Only priced routes are forwarded: an unknown route never reaches the service.
            return ResponseFuture::reject(Rejection::new(ErrorCode::NotFound));
        };
        let cost = route.cost();
        if cost == 0 {
            return ResponseFuture::unmetered(self.inner.call(req));
        }
        let Some(principal) = req.extensions().get::<Principal>().copied() else {
            tracing::error!(
                route = route.template(),
                "CreditMeterLayer found no Principal on a priced request: it must run inside \
                 ApiKeyAuthLayer (or another layer that inserts tollgate_core::Principal), \
                 e.g. ServiceBuilder::new().layer(auth).layer(credit_meter)"
            );
            return ResponseFuture::reject(Rejection::new(ErrorCode::InternalError));
        };
        let request_id = req.extensions().get::<RequestId>().cloned();
        let json_required = req.extensions().get::<JsonBodyRequired>().is_some();

        let ledger = &self.config.ledger;
        let hold = HoldCall::new(
            ledger.hold_for_key(
                principal.org,
                cost,
                request_id,
                Some(KeyBudget {
                    key: principal.key,
                    limit: req.extensions().get::<KeyCreditLimit>().map(|l| l.0),
                }),
            ),
            Arc::clone(ledger),
        );
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        let buffer_limit = json_required.then_some(self.config.max_buffered_body);
        ResponseFuture::check(
            hold,
            self.config.settler(),
            cost,
            buffer_limit,
            service,
            req,
        )
    }
}

impl<S: fmt::Debug> fmt::Debug for CreditMeter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreditMeter")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}
