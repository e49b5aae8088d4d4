//! [`Listener`]: `LISTEN` on a channel over a dedicated connection, so every replica learns
//! within a second that rows it caches have changed.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};
use tollgate_core::BackendError;

use crate::pool::check_identifier;

/// Receives what a [`Listener`] hears.
pub trait NotificationHandler: Send + Sync + 'static {
    /// A notification on the channel, with its payload.
    fn notification(&self, payload: &str);

    /// Notifications may have been missed (the listening connection was lost, or was just
    /// (re)established): drop everything cached.
    fn reset(&self);
}

/// Timing of a [`Listener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerOptions {
    /// How often the listening connection proves it is alive (default 250 ms).
    pub heartbeat_interval: Duration,
    /// How long a heartbeat may take before the connection counts as lost (default 750 ms).
    pub heartbeat_timeout: Duration,
    /// How long after a heartbeat *started* caches may still be trusted without a newer
    /// one (default 1 s): the bound on how late a change can be noticed when the listening
    /// connection silently dies.
    pub trust_window: Duration,
    /// The longest wait between reconnection attempts (default 5 s; starts at 100 ms and
    /// doubles).
    pub max_backoff: Duration,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            heartbeat_interval: Duration::from_millis(250),
            heartbeat_timeout: Duration::from_millis(750),
            trust_window: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
        }
    }
}

struct State {
    base: Instant,
    /// Milliseconds since `base` until which caches may be trusted; 0 = not trusted.
    trusted_until_ms: AtomicU64,
    connected: AtomicBool,
    sessions: AtomicU64,
}

impl State {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn distrust(&self) {
        self.trusted_until_ms.store(0, Ordering::SeqCst);
    }
}

/// `LISTEN <channel>` on its own connection (pool connections cannot deliver
/// notifications), forwarding every notification to a [`NotificationHandler`].
///
/// The connection is re-established with exponential backoff whenever it fails; each time it
/// is (re)established the handler is [`reset`](NotificationHandler::reset), since
/// notifications sent meanwhile were lost. A heartbeat (`SELECT 1`) every 250 ms proves the
/// connection alive: PostgreSQL sends a listening session its pending notifications before
/// answering a query, so once a heartbeat started at `t` has answered, every change committed
/// before `t` has been handed to the handler. [`is_live`](Self::is_live) is true only within
/// the trust window after the start of the last answered heartbeat; callers must not serve
/// from their cache when it is false.
///
/// Dropping the `Listener` stops its task and closes the connection.
pub struct Listener {
    state: Arc<State>,
    task: JoinHandle<()>,
    channel: String,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("channel", &self.channel)
            .field("live", &self.is_live())
            .field("connected", &self.state.connected.load(Ordering::SeqCst))
            .finish()
    }
}

/// How long [`Listener::start`] waits for the first heartbeat.
pub const START_WAIT: Duration = Duration::from_secs(2);

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Starts listening on `channel` (a plain identifier) with the given connection
    /// configuration. Must be called within a tokio runtime. Returns at once; use
    /// [`wait_live`](Self::wait_live) to wait for the first heartbeat.
    pub fn spawn(
        config: tokio_postgres::Config,
        channel: &str,
        handler: Arc<dyn NotificationHandler>,
        options: ListenerOptions,
    ) -> Result<Listener, BackendError> {
        check_identifier(channel)?;
        let state = Arc::new(State {
            base: Instant::now(),
            trusted_until_ms: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(
            config,
            channel.to_owned(),
            handler,
            options,
            Arc::clone(&state),
        ));
        Ok(Listener {
            state,
            task,
            channel: channel.to_owned(),
        })
    }

    /// [`spawn`](Self::spawn), then waits up to `START_WAIT` (2 s) for the first heartbeat. A
    /// listener not live yet is still returned (caches it feeds stay unused until it is),
    /// with a warning naming `what` it serves.
    pub async fn start(
        config: tokio_postgres::Config,
        channel: &str,
        handler: Arc<dyn NotificationHandler>,
        options: ListenerOptions,
        what: &str,
    ) -> Result<Listener, BackendError> {
        let listener = Listener::spawn(config, channel, handler, options)?;
        if !listener.wait_live(START_WAIT).await {
            tracing::warn!(
                channel,
                "{what} listener not live yet: the database is read until it is"
            );
        }
        Ok(listener)
    }

    /// Whether caches fed by this listener may be trusted right now.
    pub fn is_live(&self) -> bool {
        self.state.now_ms() < self.state.trusted_until_ms.load(Ordering::SeqCst)
    }

    /// Whether the listening connection is currently up.
    pub fn is_connected(&self) -> bool {
        self.state.connected.load(Ordering::SeqCst)
    }

    /// How many times the listening connection was established.
    pub fn sessions(&self) -> u64 {
        self.state.sessions.load(Ordering::SeqCst)
    }

    /// Waits until the listener is live, at most `timeout`; returns whether it is.
    pub async fn wait_live(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.is_live() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn run(
    config: tokio_postgres::Config,
    channel: String,
    handler: Arc<dyn NotificationHandler>,
    options: ListenerOptions,
    state: Arc<State>,
) {
    let first_backoff = Duration::from_millis(100);
    let mut backoff = first_backoff;
    loop {
        let established = state.sessions.load(Ordering::SeqCst);
        if let Err(err) = session(&config, &channel, &*handler, &options, &state).await {
            tracing::warn!(channel = %channel, error = %err, "listener connection failed");
        }
        if state.sessions.load(Ordering::SeqCst) != established {
            // The connection worked until now: retry quickly.
            backoff = first_backoff;
        }
        state.distrust();
        state.connected.store(false, Ordering::SeqCst);
        handler.reset();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(options.max_backoff.max(first_backoff));
    }
}

/// One listening connection, until it fails.
async fn session(
    config: &tokio_postgres::Config,
    channel: &str,
    handler: &dyn NotificationHandler,
    options: &ListenerOptions,
    state: &State,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n).is_err() {
                        return;
                    }
                }
                Some(Ok(_notice)) => {}
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "listener connection lost");
                    return;
                }
                None => return,
            }
        }
    });
    // Stop the driver (and close the socket) however this session ends.
    let _driver = AbortOnDrop(driver);

    client.batch_execute(&format!("LISTEN {channel}")).await?;
    state.sessions.fetch_add(1, Ordering::SeqCst);
    state.connected.store(true, Ordering::SeqCst);
    // Anything sent before LISTEN took effect was missed.
    handler.reset();
    tracing::debug!(channel, "listening");

    let mut ticker = tokio::time::interval(options.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            n = rx.recv() => match n {
                Some(n) => handler.notification(n.payload()),
                // The driver ended: the connection is gone.
                None => return Ok(()),
            },
            _ = ticker.tick() => {
                let started = state.now_ms();
                match tokio::time::timeout(options.heartbeat_timeout, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {
                        // Notifications arrive before the heartbeat's answer: hand them over
                        // before extending the trust.
                        while let Ok(n) = rx.try_recv() {
                            handler.notification(n.payload());
                        }
                        let window = u64::try_from(options.trust_window.as_millis()).unwrap_or(u64::MAX);
                        state.trusted_until_ms.store(started.saturating_add(window).max(1), Ordering::SeqCst);
                    }
                    Ok(Err(err)) => return Err(err),
                    Err(_elapsed) => {
                        tracing::warn!(channel, "listener heartbeat timed out");
                        return Ok(());
                    }
                }
            }
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
