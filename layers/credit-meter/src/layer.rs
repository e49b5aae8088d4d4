//! [`CreditMeterLayer`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::CostTable;
use tower_layer::Layer;

use crate::keeper::HoldKeeper;
use crate::ledger::Ledger;
use crate::service::CreditMeter;
use crate::settle::Settler;

/// The default bound on each ledger call that settles a request (the commit, and the
/// release that settles a failed commit): 5 s.
pub const DEFAULT_SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The default cap on a 2xx body the meter buffers to check it is JSON before charging:
/// 16 MiB, as the response envelope's.
pub const DEFAULT_MAX_BUFFERED_BODY: usize = 16 * 1024 * 1024;

/// Meters credits per request: holds the route's cost before the inner service is called,
/// charges it when a 2xx response body has been delivered whole, and releases it otherwise.
///
/// See the [crate docs](crate) for the full behaviour and the layer order it expects.
#[derive(Clone)]
pub struct CreditMeterLayer {
    config: Arc<Config>,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) keeper: Arc<HoldKeeper>,
    pub(crate) cost_table: CostTable,
    pub(crate) settle_timeout: Duration,
    pub(crate) max_buffered_body: usize,
}

impl Config {
    pub(crate) fn settler(&self) -> Settler {
        Settler {
            ledger: Arc::clone(&self.ledger),
            keeper: Arc::clone(&self.keeper),
            timeout: self.settle_timeout,
        }
    }
}

impl CreditMeterLayer {
    /// A meter over `ledger`, pricing routes with [`CostTable::onlyfans`].
    pub fn new(ledger: impl Ledger) -> Self {
        Self::from_shared(Arc::new(ledger))
    }

    /// A meter over an already shared ledger (for example one picked at run time).
    pub fn from_shared(ledger: Arc<dyn Ledger>) -> Self {
        CreditMeterLayer {
            config: Arc::new(Config {
                keeper: HoldKeeper::new(Arc::clone(&ledger)),
                ledger,
                cost_table: CostTable::onlyfans(),
                settle_timeout: DEFAULT_SETTLE_TIMEOUT,
                max_buffered_body: DEFAULT_MAX_BUFFERED_BODY,
            }),
        }
    }

    /// Bounds each ledger call that settles a request (default [`DEFAULT_SETTLE_TIMEOUT`]).
    /// A 2xx whose commit fails or exceeds it is withheld rather than delivered unbilled
    /// (see [`CreditSettlement::Unrecorded`](tollgate_core::CreditSettlement::Unrecorded)).
    /// With a PostgreSQL ledger, keep it above the pool's `statement_timeout`, so a blocked
    /// commit is cancelled (and rolled back) by the server before the meter gives up on it.
    pub fn with_settle_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).settle_timeout = timeout;
        self
    }

    /// Caps a 2xx body the meter buffers to check that it is JSON before charging it (when
    /// the request carries [`JsonBodyRequired`](tollgate_core::JsonBodyRequired)); default
    /// [`DEFAULT_MAX_BUFFERED_BODY`]. A larger body is not charged and ends with an error.
    pub fn with_max_buffered_body(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_buffered_body = bytes;
        self
    }

    /// Prices routes with `table` instead. Requests matching no route get 404 `NOT_FOUND`.
    pub fn with_cost_table(mut self, table: CostTable) -> Self {
        Arc::make_mut(&mut self.config).cost_table = table;
        self
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.config.ledger
    }

    /// The cost table.
    pub fn cost_table(&self) -> &CostTable {
        &self.config.cost_table
    }
}

impl<S> Layer<S> for CreditMeterLayer {
    type Service = CreditMeter<S>;

    fn layer(&self, inner: S) -> CreditMeter<S> {
        CreditMeter::from_config(inner, Arc::clone(&self.config))
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("cost_table", &self.cost_table)
            .field("settle_timeout", &self.settle_timeout)
            .field("max_buffered_body", &self.max_buffered_body)
            .field("open_holds", &self.ledger.open_holds())
            .finish()
    }
}

impl fmt::Debug for CreditMeterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreditMeterLayer")
            .field("config", &self.config)
            .finish()
    }
}
