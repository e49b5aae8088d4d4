//! [`ServiceBuilderExt`]: one method per tollgate layer on `tower::ServiceBuilder`.

use tower::layer::util::Stack;
use tower::ServiceBuilder;

/// Adds the tollgate layers to a [`ServiceBuilder`], each with its backend; configure a layer
/// further by building it yourself and passing it to `.layer(..)`.
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// [`ApiKeyAuthLayer`](crate::api_key_auth::ApiKeyAuthLayer) over `store`.
    #[cfg(feature = "api-key-auth")]
    fn api_key_auth<K: crate::api_key_auth::KeyStore>(
        self,
        store: K,
    ) -> ServiceBuilder<Stack<crate::api_key_auth::ApiKeyAuthLayer, L>>;

    /// [`PerModelSlidingWindowLayer`](crate::sliding_window::PerModelSlidingWindowLayer) over
    /// `store`, with the plans' default limits and a one-minute window.
    #[cfg(feature = "sliding-window")]
    fn per_model_sliding_window<W: crate::sliding_window::WindowStore>(
        self,
        store: W,
    ) -> ServiceBuilder<Stack<crate::sliding_window::PerModelSlidingWindowLayer<W>, L>>;

    /// [`CreditMeterLayer`](crate::credit_meter::CreditMeterLayer) over `ledger`.
    #[cfg(feature = "credit-meter")]
    fn credit_meter<G: crate::credit_meter::Ledger>(
        self,
        ledger: G,
    ) -> ServiceBuilder<Stack<crate::credit_meter::CreditMeterLayer, L>>;

    /// [`ResponseEnvelopeLayer`](crate::response_envelope::ResponseEnvelopeLayer).
    #[cfg(feature = "response-envelope")]
    fn response_envelope(
        self,
    ) -> ServiceBuilder<Stack<crate::response_envelope::ResponseEnvelopeLayer, L>>;

    /// A configured [`RequestLoggerLayer`](crate::request_logger::RequestLoggerLayer) (it
    /// comes with a handle for flushing and counters, so it is built by the caller).
    #[cfg(feature = "request-logger")]
    fn request_logger(
        self,
        layer: crate::request_logger::RequestLoggerLayer,
    ) -> ServiceBuilder<Stack<crate::request_logger::RequestLoggerLayer, L>>;

    /// [`UpstreamSignLayer`](crate::upstream_sign::UpstreamSignLayer) with `signer` and
    /// `sessions`, around an upstream HTTP client.
    #[cfg(feature = "upstream-sign")]
    fn upstream_sign<G: crate::upstream_sign::Signer, T: crate::upstream_sign::SessionStore>(
        self,
        signer: G,
        sessions: T,
    ) -> ServiceBuilder<Stack<crate::upstream_sign::UpstreamSignLayer, L>>;

    /// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) over `store`, with keys
    /// scoped to the caller's org (so it goes inside `api_key_auth`).
    #[cfg(feature = "idempotency")]
    fn idempotency<T: crate::idempotency::IdempotencyStore>(
        self,
        store: T,
    ) -> ServiceBuilder<Stack<crate::idempotency::IdempotencyLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "api-key-auth")]
    fn api_key_auth<K: crate::api_key_auth::KeyStore>(
        self,
        store: K,
    ) -> ServiceBuilder<Stack<crate::api_key_auth::ApiKeyAuthLayer, L>> {
        self.layer(crate::api_key_auth::ApiKeyAuthLayer::new(store))
    }

    #[cfg(feature = "sliding-window")]
    fn per_model_sliding_window<W: crate::sliding_window::WindowStore>(
        self,
        store: W,
    ) -> ServiceBuilder<Stack<crate::sliding_window::PerModelSlidingWindowLayer<W>, L>> {
        self.layer(crate::sliding_window::PerModelSlidingWindowLayer::new(
            store,
        ))
    }

    #[cfg(feature = "credit-meter")]
    fn credit_meter<G: crate::credit_meter::Ledger>(
        self,
        ledger: G,
    ) -> ServiceBuilder<Stack<crate::credit_meter::CreditMeterLayer, L>> {
        self.layer(crate::credit_meter::CreditMeterLayer::new(ledger))
    }

    #[cfg(feature = "response-envelope")]
    fn response_envelope(
        self,
    ) -> ServiceBuilder<Stack<crate::response_envelope::ResponseEnvelopeLayer, L>> {
        self.layer(crate::response_envelope::ResponseEnvelopeLayer::new())
    }

    #[cfg(feature = "request-logger")]
    fn request_logger(
        self,
        layer: crate::request_logger::RequestLoggerLayer,
    ) -> ServiceBuilder<Stack<crate::request_logger::RequestLoggerLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "upstream-sign")]
    fn upstream_sign<G: crate::upstream_sign::Signer, T: crate::upstream_sign::SessionStore>(
        self,
        signer: G,
        sessions: T,
    ) -> ServiceBuilder<Stack<crate::upstream_sign::UpstreamSignLayer, L>> {
        self.layer(crate::upstream_sign::UpstreamSignLayer::new(
            signer, sessions,
        ))
    }

    #[cfg(feature = "idempotency")]
    fn idempotency<T: crate::idempotency::IdempotencyStore>(
        self,
        store: T,
    ) -> ServiceBuilder<Stack<crate::idempotency::IdempotencyLayer, L>> {
        self.layer(crate::idempotency::IdempotencyLayer::new(store))
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
