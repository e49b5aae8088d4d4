//! [`RequestLoggerLayer`] and its [`RequestLoggerBuilder`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{Clock, CostTable, SharedClock, SystemClock};
use tower_layer::Layer;

use crate::service::RequestLogger;
use crate::sink::LogSink;
use crate::worker::{self, LogWorker, LoggerHandle, LoggerStats, Submitter, WorkerConfig};

/// Channel capacity by default: rows waiting for the sink before new ones are dropped.
pub const DEFAULT_CAPACITY: usize = 8_192;
/// Rows per `write_batch` at most, by default.
pub const DEFAULT_BATCH_SIZE: usize = 512;
/// A partial batch is written after this long by default.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A `write_batch` taking longer than this counts as failed, by default.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The outermost layer: gives each request its id, a `tracing` span and one log row.
///
/// Per request it
/// - takes the client's `X-Request-Id` when usable or generates one, puts the
///   [`RequestId`](tollgate_core::RequestId) in the request extensions and sends the id back
///   in the `X-Request-Id` header of every response;
/// - resolves the route with its [`CostTable`] (inner layers reuse the match);
/// - runs the inner service inside `info_span!("request", request_id, method, route)`;
/// - when the response body ends, fails or is dropped (or the service fails, or the client
///   goes away first) builds one [`LogRecord`](crate::LogRecord) and hands it to a background
///   worker over a bounded channel. A full channel drops the row and counts it: logging never
///   delays or fails a request.
#[derive(Clone)]
pub struct RequestLoggerLayer {
    pub(crate) shared: Arc<Shared>,
    handle: LoggerHandle,
}

/// What every service of the layer shares.
pub(crate) struct Shared {
    pub(crate) submitter: Submitter,
    pub(crate) cost_table: CostTable,
    pub(crate) clock: SharedClock,
}

impl RequestLoggerLayer {
    /// A logger writing to `sink` with the default settings, its worker spawned on the
    /// current tokio runtime.
    ///
    /// # Panics
    /// When called outside a tokio runtime; use
    /// [`RequestLoggerBuilder::build_with_worker`] to spawn the worker yourself.
    pub fn new<T: LogSink>(sink: T) -> Self {
        RequestLoggerBuilder::new(sink).build()
    }

    /// A builder for the channel and batching settings.
    pub fn builder<T: LogSink>(sink: T) -> RequestLoggerBuilder<T> {
        RequestLoggerBuilder::new(sink)
    }

    /// The routes used to record `route` and `model_id` (default [`CostTable::onlyfans`]).
    pub fn with_cost_table(self, cost_table: CostTable) -> Self {
        self.replace_shared(|shared| Shared {
            submitter: shared.submitter.clone(),
            cost_table,
            clock: Arc::clone(&shared.clock),
        })
    }

    /// The clock giving each row its `time` (default [`SystemClock`]).
    pub fn with_clock(self, clock: impl Clock) -> Self {
        let clock: SharedClock = Arc::new(clock);
        self.replace_shared(|shared| Shared {
            submitter: shared.submitter.clone(),
            cost_table: shared.cost_table.clone(),
            clock,
        })
    }

    /// A handle to the worker: counters and `flush`.
    pub fn handle(&self) -> LoggerHandle {
        self.handle.clone()
    }

    /// The counters so far (rows dropped, written, failed).
    pub fn stats(&self) -> LoggerStats {
        self.handle.stats()
    }

    fn replace_shared(self, f: impl FnOnce(&Shared) -> Shared) -> Self {
        RequestLoggerLayer {
            shared: Arc::new(f(&self.shared)),
            handle: self.handle,
        }
    }
}

impl<S> Layer<S> for RequestLoggerLayer {
    type Service = RequestLogger<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLogger::new(inner, Arc::clone(&self.shared))
    }
}

impl fmt::Debug for RequestLoggerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestLoggerLayer")
            .field("cost_table", &self.shared.cost_table)
            .field("handle", &self.handle)
            .finish()
    }
}

/// Settings of the log channel and worker; finish with [`build`](Self::build) or
/// [`build_with_worker`](Self::build_with_worker).
pub struct RequestLoggerBuilder<T> {
    sink: T,
    config: WorkerConfig,
}

impl<T: LogSink> RequestLoggerBuilder<T> {
    fn new(sink: T) -> Self {
        RequestLoggerBuilder {
            sink,
            config: WorkerConfig {
                capacity: DEFAULT_CAPACITY,
                batch_size: DEFAULT_BATCH_SIZE,
                flush_interval: DEFAULT_FLUSH_INTERVAL,
                write_timeout: DEFAULT_WRITE_TIMEOUT,
            },
        }
    }

    /// Rows that may wait for the sink before new ones are dropped (default
    /// [`DEFAULT_CAPACITY`]; at least 1).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.config.capacity = capacity.max(1);
        self
    }

    /// Rows per `write_batch` at most (default [`DEFAULT_BATCH_SIZE`]; at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.config.batch_size = batch_size.max(1);
        self
    }

    /// How long a partial batch may wait before it is written (default
    /// [`DEFAULT_FLUSH_INTERVAL`]).
    pub fn with_flush_interval(mut self, interval: Duration) -> Self {
        self.config.flush_interval = interval;
        self
    }

    /// How long one `write_batch` may take before its rows count as failed (default
    /// [`DEFAULT_WRITE_TIMEOUT`]).
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// The layer, with its worker spawned on the current tokio runtime.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn build(self) -> RequestLoggerLayer {
        let runtime = tokio::runtime::Handle::try_current().unwrap_or_else(|_| {
            panic!(
                "RequestLoggerLayer::new must be called inside a tokio runtime; \
                 use RequestLoggerLayer::builder(sink).build_with_worker() and spawn the worker"
            )
        });
        let (layer, worker) = self.build_with_worker();
        runtime.spawn(worker);
        layer
    }

    /// The layer and its worker, for the caller to spawn (or await).
    pub fn build_with_worker(self) -> (RequestLoggerLayer, LogWorker) {
        let (submitter, handle, worker) = worker::channel(self.sink, self.config);
        let shared = Shared {
            submitter,
            cost_table: CostTable::onlyfans(),
            clock: SystemClock::shared(),
        };
        let layer = RequestLoggerLayer {
            shared: Arc::new(shared),
            handle,
        };
        (layer, worker)
    }
}

impl<T> fmt::Debug for RequestLoggerBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestLoggerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
