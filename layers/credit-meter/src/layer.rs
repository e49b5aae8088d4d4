//! [`CreditMeterLayer`].

use std::fmt;
use std::sync::Arc;

use tollgate_core::CostTable;
use tower_layer::Layer;

use crate::ledger::Ledger;
use crate::service::CreditMeter;

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
    pub(crate) cost_table: CostTable,
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
                ledger,
                cost_table: CostTable::onlyfans(),
            }),
        }
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
