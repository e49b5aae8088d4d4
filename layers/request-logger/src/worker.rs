//! The background side of the logger: a bounded channel of records, the task that batches
//! them into the [`LogSink`], and the [`LoggerHandle`] to watch and flush it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::record::LogRecord;
use crate::sink::LogSink;

/// What travels from the requests to the worker.
pub(crate) enum Msg {
    Record(LogRecord),
    Flush(oneshot::Sender<()>),
}

/// Counters shared by the layer, the worker and the handles.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    dropped_rows: AtomicU64,
    written_rows: AtomicU64,
    failed_rows: AtomicU64,
    sink_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> LoggerStats {
        LoggerStats {
            dropped_rows: self.dropped_rows.load(Ordering::Relaxed),
            written_rows: self.written_rows.load(Ordering::Relaxed),
            failed_rows: self.failed_rows.load(Ordering::Relaxed),
            sink_errors: self.sink_errors.load(Ordering::Relaxed),
        }
    }
}

/// How the logger's rows fared so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoggerStats {
    /// Rows dropped because the channel was full (or the worker had stopped).
    pub dropped_rows: u64,
    /// Rows the sink accepted.
    pub written_rows: u64,
    /// Rows lost because the sink failed or timed out on their batch.
    pub failed_rows: u64,
    /// Failed or timed-out `write_batch` calls.
    pub sink_errors: u64,
}

/// The request side of the channel: never waits.
pub(crate) struct Submitter {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

impl Submitter {
    pub(crate) fn submit(&self, record: LogRecord) {
        if let Err(err) = self.tx.try_send(Msg::Record(record)) {
            let dropped = self.counters.dropped_rows.fetch_add(1, Ordering::Relaxed) + 1;
            // Warn on the 1st, 2nd, 4th, 8th… drop: visible without flooding the logs.
            if dropped.is_power_of_two() {
                let reason = match err {
                    mpsc::error::TrySendError::Full(_) => "the log channel is full",
                    mpsc::error::TrySendError::Closed(_) => "the log worker has stopped",
                };
                tracing::warn!(dropped_rows = dropped, "request log row dropped: {reason}");
            }
        }
    }
}

impl Clone for Submitter {
    fn clone(&self) -> Self {
        Submitter {
            tx: self.tx.clone(),
            counters: Arc::clone(&self.counters),
        }
    }
}

/// Watches and flushes the logger's background worker. Cheap to clone.
///
/// The handle does not keep the worker alive: once every layer and service is dropped the
/// worker writes what is queued and stops, and [`flush`](LoggerHandle::flush) waits for that.
#[derive(Clone)]
pub struct LoggerHandle {
    tx: mpsc::WeakSender<Msg>,
    counters: Arc<Counters>,
    stopped: watch::Receiver<bool>,
}

impl LoggerHandle {
    /// The counters so far.
    pub fn stats(&self) -> LoggerStats {
        self.counters.snapshot()
    }

    /// Rows dropped because the channel was full.
    pub fn dropped_rows(&self) -> u64 {
        self.counters.dropped_rows.load(Ordering::Relaxed)
    }

    /// Whether the worker has stopped (every sender dropped and the queue written out).
    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Waits until every row queued before this call has been handed to the sink (written or
    /// counted as failed). Used at graceful shutdown and in tests.
    ///
    /// Rows of requests whose response body has not ended yet are not queued yet. If the
    /// worker was never spawned ([`LogWorker`] not polled), this waits until it is.
    pub async fn flush(&self) {
        if let Some(tx) = self.tx.upgrade() {
            let (reply, done) = oneshot::channel();
            let sent = tx.send(Msg::Flush(reply)).await.is_ok();
            drop(tx);
            if sent {
                // An error means the worker went away; nothing more can be flushed.
                let _ = done.await;
                return;
            }
        }
        // Every sender is gone: the worker drains the queue and stops.
        let mut stopped = self.stopped.clone();
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }
}

impl fmt::Debug for LoggerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoggerHandle")
            .field("stats", &self.stats())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// The background worker's future: spawn it on a runtime (done for you by
/// [`RequestLoggerLayer::new`](crate::RequestLoggerLayer::new)). It completes once every
/// layer and service is dropped and the queue is written out.
#[must_use = "the worker writes nothing unless it is spawned or awaited"]
pub struct LogWorker {
    future: Pin<Box<dyn Future<Output = ()> + Send + 'static>>,
}

impl Future for LogWorker {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.future.as_mut().poll(cx)
    }
}

impl fmt::Debug for LogWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogWorker").finish_non_exhaustive()
    }
}

/// Batching settings of the worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerConfig {
    pub(crate) capacity: usize,
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) write_timeout: Duration,
}

/// Creates the channel, the worker and a handle.
pub(crate) fn channel<T: LogSink>(
    sink: T,
    config: WorkerConfig,
) -> (Submitter, LoggerHandle, LogWorker) {
    let (tx, rx) = mpsc::channel(config.capacity.max(1));
    let (stopped_tx, stopped_rx) = watch::channel(false);
    let counters = Arc::new(Counters::default());
    let handle = LoggerHandle {
        tx: tx.downgrade(),
        counters: Arc::clone(&counters),
        stopped: stopped_rx,
    };
    let worker = Worker {
        sink,
        rx,
        counters: Arc::clone(&counters),
        batch: Vec::new(),
        batch_size: config.batch_size.max(1),
        flush_interval: config.flush_interval,
        write_timeout: config.write_timeout,
    };
    let future = Box::pin(async move {
        worker.run().await;
        stopped_tx.send_replace(true);
    });
    (Submitter { tx, counters }, handle, LogWorker { future })
}

struct Worker<T> {
    sink: T,
    rx: mpsc::Receiver<Msg>,
    counters: Arc<Counters>,
    batch: Vec<LogRecord>,
    batch_size: usize,
    flush_interval: Duration,
    write_timeout: Duration,
}

impl<T: LogSink> Worker<T> {
    async fn run(mut self) {
        /// How long the worker lets rows gather once it has drained the queue.
        const COALESCE: Duration = Duration::from_millis(10);
        let mut inbox = Vec::with_capacity(self.batch_size);
        // When the oldest row of the current batch must be written at the latest.
        let mut deadline: Option<Instant> = None;
        loop {
            let received = match deadline {
                None => self.rx.recv_many(&mut inbox, self.batch_size).await,
                Some(at) => {
                    match tokio::time::timeout_at(
                        at,
                        self.rx.recv_many(&mut inbox, self.batch_size),
                    )
                    .await
                    {
                        Ok(n) => n,
                        Err(_elapsed) => {
                            self.write().await;
                            deadline = None;
                            continue;
                        }
                    }
                }
            };
            if received == 0 {
                // Every sender is gone and the queue is empty.
                self.write().await;
                return;
            }
            for msg in inbox.drain(..) {
                match msg {
                    Msg::Record(record) => {
                        self.batch.push(record);
                        if self.batch.len() >= self.batch_size {
                            self.write().await;
                            deadline = None;
                        }
                    }
                    Msg::Flush(reply) => {
                        self.write().await;
                        deadline = None;
                        let _ = reply.send(());
                    }
                }
            }
            if !self.batch.is_empty() && deadline.is_none() {
                deadline = Some(Instant::now() + self.flush_interval);
            }
            if received < self.batch_size {
                // The queue is drained: let rows gather for a moment instead of waking for
                // every single one (a cross-thread wake-up per request is measurable under
                // load). Bounded by the flush deadline; the queue holds far more than this.
                let pause = Instant::now() + COALESCE;
                let until = deadline.map_or(pause, |d| d.min(pause));
                tokio::time::sleep_until(until).await;
            }
        }
    }

    /// Hands the current batch to the sink, once: a failure is counted and logged, not
    /// retried, so a broken sink cannot make the queue grow without bound.
    async fn write(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let rows = std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_size));
        let count = rows.len() as u64;
        let outcome = tokio::time::timeout(self.write_timeout, self.sink.write_batch(rows)).await;
        let error = match outcome {
            Ok(Ok(())) => {
                self.counters
                    .written_rows
                    .fetch_add(count, Ordering::Relaxed);
                return;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_elapsed) => format!("write timed out after {:?}", self.write_timeout),
        };
        self.counters.sink_errors.fetch_add(1, Ordering::Relaxed);
        self.counters
            .failed_rows
            .fetch_add(count, Ordering::Relaxed);
        tracing::warn!(rows = count, error = %error, "request log sink failed; rows lost");
    }
}
