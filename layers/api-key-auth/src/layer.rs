//! [`ApiKeyAuthLayer`]: the layer and its options.

use std::fmt;
use std::sync::Arc;

use tollgate_core::{CostTable, SharedClock, SystemClock};
use tower_layer::Layer;

use crate::service::ApiKeyAuth;
use crate::store::KeyStore;

/// What the layer does with a request that matches no route of its [`CostTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnmatchedRoutes {
    /// Pass it to the inner service untouched, without asking for a key: whoever routes
    /// decides (e.g. 404 `NOT_FOUND`, `/healthz`). This keeps the contract's check order,
    /// where an unknown route is a 404 before it is a 401. The default.
    #[default]
    PassThrough,
    /// Require a valid key and an active subscription as for any route (there is no model to
    /// check). Use this when the layer guards an app whose routes are not all in the table.
    Authenticate,
}

/// Shared by the layer, every service it makes and their futures.
pub(crate) struct Config {
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) cost_table: CostTable,
    pub(crate) clock: SharedClock,
    pub(crate) unmatched: UnmatchedRoutes,
}

/// Authenticates requests by their `X-API-Key` header against a [`KeyStore`] (docs/contract.md §2).
///
/// In order: a missing, malformed, unknown or revoked key is refused with 401
/// `INVALID_API_KEY`; a key whose org has no active subscription with 402
/// `NO_SUBSCRIPTION`; a request for a model (the route's `:id`) that is not the org's with the
/// very same 401 as an unknown key, so nobody can probe which model ids exist. A backend
/// failure becomes 503 `SERVICE_UNAVAILABLE` or 500 `INTERNAL_ERROR`.
///
/// An admitted request carries the [`Principal`](tollgate_core::Principal) and the
/// [`RouteMatch`](tollgate_core::RouteMatch) in its extensions, and loses its `X-API-Key`
/// header so that the secret travels no further inside. The response gets the `Principal`
/// in its extensions too, for the layers outside.
#[derive(Clone)]
pub struct ApiKeyAuthLayer {
    config: Arc<Config>,
}

impl ApiKeyAuthLayer {
    /// A layer checking keys against `store` (any [`KeyStore`], including `Arc<dyn
    /// KeyStore>`), with the OnlyFans cost table and the system clock.
    pub fn new(store: impl KeyStore) -> Self {
        ApiKeyAuthLayer {
            config: Arc::new(Config {
                store: Arc::new(store),
                cost_table: CostTable::onlyfans(),
                clock: SystemClock::shared(),
                unmatched: UnmatchedRoutes::default(),
            }),
        }
    }

    /// The routes (and so the model of each request). An outer layer's
    /// [`RouteMatch`](tollgate_core::RouteMatch) in the request extensions takes precedence.
    pub fn with_cost_table(self, cost_table: CostTable) -> Self {
        self.map(|c| c.cost_table = cost_table)
    }

    /// The clock stamping [`KeyStore::record_use`].
    pub fn with_clock(self, clock: SharedClock) -> Self {
        self.map(|c| c.clock = clock)
    }

    /// What to do with requests matching no route (default: pass through).
    pub fn with_unmatched_routes(self, unmatched: UnmatchedRoutes) -> Self {
        self.map(|c| c.unmatched = unmatched)
    }

    fn map(self, f: impl FnOnce(&mut Config)) -> Self {
        // Options are set while building, before the config is shared; should a clone exist,
        // rebuild rather than change what it sees.
        let mut config = Arc::try_unwrap(self.config).unwrap_or_else(|shared| Config {
            store: Arc::clone(&shared.store),
            cost_table: shared.cost_table.clone(),
            clock: Arc::clone(&shared.clock),
            unmatched: shared.unmatched,
        });
        f(&mut config);
        ApiKeyAuthLayer {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for ApiKeyAuthLayer {
    type Service = ApiKeyAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyAuth::new(inner, Arc::clone(&self.config))
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("cost_table", &self.cost_table)
            .field("unmatched", &self.unmatched)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ApiKeyAuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyAuthLayer")
            .field("cost_table", &self.config.cost_table)
            .field("unmatched", &self.config.unmatched)
            .finish_non_exhaustive()
    }
}
