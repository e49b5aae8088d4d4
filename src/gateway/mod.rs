//! The turnkey gateway: the six layers in front of the OnlyFans web API (or the sandbox), the
//! admin API, `/api/credits`, `/api/logs`, `/healthz`, `/readyz` and `/metrics`.
//!
//! [`start`] builds everything from a [`Config`], binds the listeners (the public one, and
//! the internal one of the admin API, metrics and probes unless it is
//! [`AdminBind::Public`]) and serves until [`RunningGateway::shutdown`]. The `tollgate`
//! binary is [`cli::run`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), tollgate::core::BoxError> {
//! use tollgate::gateway::{self, Config};
//!
//! let config = Config {
//!     bind: "127.0.0.1:0".parse()?,
//!     admin_token: Some("a-long-admin-token".into()),
//!     ..Config::default() // the demo: memory backends, the sandbox, one listener
//! };
//! let running = gateway::start(config).await?;
//! println!("{}", running.demo_curl().unwrap());
//! running.shutdown().await; // drains requests in flight, flushes the logs
//! # Ok(())
//! # }
//! ```

pub mod accounts;
pub mod admin;
mod admin_accounts;
mod admin_webhooks;
pub mod app;
pub mod backends;
pub mod billing;
pub mod cli;
mod completion;
pub mod config;
pub mod dashboard;
mod demo;
pub mod local;
pub mod metrics;
pub mod orgs;
#[cfg(feature = "postgres")]
pub mod postgres_orgs;
pub mod proxy;
pub mod query;
pub mod readiness;
pub mod server;
pub mod state;
pub mod tls;
pub mod usage;
pub mod webhooks;
pub mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_service::Service;

use tollgate_api_key_auth::{ApiKeyAuthLayer, MemoryKeyStore};
use tollgate_core::Clock as _;
use tollgate_core::{BoxError, CostTable, ErrorCode, Plan, Rejection, SharedClock, SystemClock};
use tollgate_credit_meter::{CreditMeterLayer, Ledger, MemoryLedger};
use tollgate_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryIdempotencyStore};
use tollgate_request_logger::{LogSink, MemoryLogSink, RequestLoggerLayer};
use tollgate_response_envelope::ResponseEnvelopeLayer;
use tollgate_sliding_window::{MemoryWindowStore, PerModelSlidingWindowLayer};
use tollgate_upstream_sign::{
    sandbox_rules, MemorySessionStore, RemoteSigner, RulesSigner, Signer, UpstreamSignLayer,
};

use crate::sandbox::{Sandbox, SandboxServer};

pub use app::{App, GatewayBody, PeerAddr, Surface};
pub use completion::ResponseBody;
pub use config::{AdminBind, Config, ConfigError, LogFormat, RateLimitFailure};
pub use demo::Demo;
pub use orgs::{MemoryOrgStore, OrgStore};
pub use state::{AppState, Backends};

use server::{ServeOptions, Served};

/// A gateway serving on its listeners.
pub struct RunningGateway {
    public: Served,
    internal: Option<Served>,
    state: Arc<AppState>,
    demo: Option<Demo>,
    sandbox: Option<(Sandbox, SandboxServer)>,
    jobs: Vec<JoinHandle<()>>,
    upkeep: Vec<state::Upkeep>,
    /// Re-reads `TOLLGATE_SIGN_RULES`; stops when dropped.
    _rules_watcher: Option<tollgate_upstream_sign::RulesWatcher>,
}

impl std::fmt::Debug for RunningGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningGateway")
            .field("addr", &self.public.local_addr())
            .field("admin_addr", &self.admin_addr())
            .finish_non_exhaustive()
    }
}

impl RunningGateway {
    /// The address of the public listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.public.local_addr()
    }

    /// `http://<public address>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr())
    }

    /// The address of the internal listener (`/admin`, `/metrics`, `/readyz`), or `None`
    /// when they are served on the public one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.internal.as_ref().map(Served::local_addr)
    }

    /// `http://<address>` of wherever `/admin`, `/metrics` and `/readyz` are served.
    pub fn admin_base_url(&self) -> String {
        format!("http://{}", self.admin_addr().unwrap_or(self.local_addr()))
    }

    /// The demo tenant, in demo mode.
    pub fn demo(&self) -> Option<&Demo> {
        self.demo.as_ref()
    }

    /// The in-process sandbox upstream, when no upstream was configured.
    pub fn sandbox(&self) -> Option<&Sandbox> {
        self.sandbox.as_ref().map(|(s, _)| s)
    }

    /// The shared state (backends, counters).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// A ready-to-paste curl line for the demo model.
    pub fn demo_curl(&self) -> Option<String> {
        self.demo.as_ref().map(|d| {
            format!(
                "curl -s {}/api/models/{}/users/me -H 'X-API-Key: {}'",
                self.base_url(),
                d.model,
                d.key
            )
        })
    }

    /// Drains and stops: `/readyz` answers 503 from now on; the public listener stops
    /// accepting and its requests in flight finish (credit holds settle with them) within the
    /// drain timeout, past which they are dropped (holds released, nothing charged); then the
    /// internal listener stops, the log queue is flushed and the background jobs stop.
    pub async fn shutdown(self) {
        self.state
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.public.drain().await;
        if let Some(internal) = self.internal {
            internal.drain().await;
        }
        self.state.logger.flush().await;
        for job in &self.upkeep {
            job().await;
        }
        for job in &self.jobs {
            job.abort();
        }
        if let Some((_, server)) = self.sandbox {
            server.shutdown().await;
        }
    }
}

/// Memory backends sharing one clock.
pub fn memory_backends(clock: SharedClock) -> Backends {
    memory_backends_with(clock, Duration::from_millis(300_000))
}

/// Memory backends whose credit holds expire after `hold_ttl`.
pub fn memory_backends_with(clock: SharedClock, hold_ttl: Duration) -> Backends {
    let windows = Arc::new(MemoryWindowStore::new(clock.clone()));
    let sweep = Arc::clone(&windows);
    let idempotency: Arc<dyn IdempotencyStore> =
        Arc::new(MemoryIdempotencyStore::new(clock.clone()));
    Backends {
        keys: Arc::new(MemoryKeyStore::new(clock.clone())),
        ledger: Arc::new(MemoryLedger::new(clock.clone()).with_hold_ttl(hold_ttl)),
        windows,
        upkeep: vec![
            Arc::new(move || {
                sweep.sweep_now();
                Box::pin(std::future::ready(()))
            }),
            purge_idempotency_keys(Arc::clone(&idempotency)),
        ],
        idempotency,
        sessions: Arc::new(MemorySessionStore::new()),
        logs: Arc::new(MemoryLogSink::new(clock.clone())),
        orgs: Arc::new(MemoryOrgStore::new()),
        accounts: accounts::Accounts::memory(clock),
        webhooks: Arc::new(webhooks::MemoryWebhookStore::new()),
        billing: Arc::new(billing::MemoryBillingRequests::new()),
    }
}

/// The upkeep job forgetting expired `Idempotency-Key` records.
pub fn purge_idempotency_keys(store: Arc<dyn IdempotencyStore>) -> state::Upkeep {
    Arc::new(move || {
        let purge = store.purge_expired();
        Box::pin(async move {
            if let Err(e) = purge.await {
                tracing::warn!(error = %e, "purging expired idempotency keys failed");
            }
        })
    })
}

/// Builds the gateway from `config` and serves it.
pub async fn start(config: Config) -> Result<RunningGateway, BoxError> {
    let backends = backends::from_config(&config, SystemClock::shared()).await?;
    start_with(config, backends).await
}

/// Builds the gateway on the given backends and serves it.
pub async fn start_with(config: Config, backends: Backends) -> Result<RunningGateway, BoxError> {
    let mut rules_watcher = None;

    // The upstream: configured, or the sandbox in-process.
    let (upstream, sandbox) = match &config.upstream {
        Some(url) => (url.clone(), None),
        None => {
            let sandbox = Sandbox::new(sandbox_rules());
            let server = sandbox.bind("127.0.0.1:0").await?;
            (server.base_url(), Some((sandbox, server)))
        }
    };

    // Outgoing TLS for the upstream and a remote signer.
    let tls = tls::client_config(config.ca_file.as_deref())?;

    // The signer: remote, a rules file (watched), or the sandbox rules.
    let signer: Arc<dyn Signer> = if let Some(url) = &config.signer_url {
        let connector = tls::connector(tls.clone(), config.signer_timeout);
        let mut remote = RemoteSigner::with_connector(url, config.signer_timeout, connector)?;
        if let Some(token) = &config.signer_token {
            remote = remote.with_bearer_token(token)?;
        }
        Arc::new(remote)
    } else if let Some(path) = &config.sign_rules {
        let (signer, watcher) = RulesSigner::watch(path.clone(), Duration::from_secs(1))?;
        rules_watcher = Some(watcher);
        Arc::new(signer)
    } else {
        Arc::new(RulesSigner::new(sandbox_rules()))
    };

    let webhook_tls = tls.clone();
    let https = tls::connector(tls, config.upstream_timeout);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(https);
    // Webhooks: the session store tells them about disconnects and reconnects.
    let hooks = webhooks::Webhooks::new(backends.webhooks.clone());
    let sessions: Arc<dyn tollgate_upstream_sign::SessionStore> = Arc::new(
        webhooks::WebhookSessions::new(backends.sessions.clone(), hooks.clone()),
    );
    let webhook_options = webhooks::WebhookOptions {
        allow_private: config.webhook_allow_private,
        retry_base: config.webhook_retry_base,
        scan_interval: config.webhook_scan_interval,
    };
    let (signals, watcher) = webhooks::watch::spawn(
        webhooks::watch::Watched {
            webhooks: hooks.clone(),
            ledger: backends.ledger.clone(),
            keys: backends.keys.clone(),
        },
        &webhook_options,
    );
    let dispatcher = webhooks::deliver::spawn(hooks.clone(), webhook_options, webhook_tls);
    let signed = UpstreamSignLayer::new(signer, sessions.clone()).layer(client);
    let metrics = Arc::new(metrics::Metrics::default());
    let proxy = proxy::Proxy::new(
        signed,
        &upstream,
        config.body_limit,
        config.upstream_timeout,
    )
    .with_metrics(Arc::clone(&metrics));

    // The logger's worker also feeds the usage rollups, off the request path.
    let tee = if config.usage_rollups {
        usage::UsageTee::new(backends.logs.clone(), backends.accounts.usage.clone())
    } else {
        usage::UsageTee::logs_only(backends.logs.clone())
    }
    .with_signals(signals);
    let logger_layer = RequestLoggerLayer::new(tee);
    let logger = logger_layer.handle();
    let state = Arc::new(AppState {
        config: config.clone(),
        keys: backends.keys.clone(),
        ledger: backends.ledger.clone(),
        windows: backends.windows.clone(),
        sessions,
        logs: backends.logs.clone(),
        orgs: backends.orgs.clone(),
        accounts: backends.accounts.clone(),
        webhooks: hooks,
        billing: backends.billing.clone(),
        idempotency: backends.idempotency.clone(),
        payments: Arc::new(billing::ManualApproval),
        metrics: Arc::clone(&metrics),
        logger,
        draining: std::sync::atomic::AtomicBool::new(false),
        readiness: Default::default(),
        admin_lockout: Default::default(),
    });

    let mut window =
        PerModelSlidingWindowLayer::new(backends.windows.clone()).with_window(config.window);
    for plan in Plan::ALL {
        window = window.with_burst(plan, config.burst_for(plan));
    }

    // Idempotency-Key (SPEC §14) right after authentication and model ownership, so a key
    // belongs to the caller's org, and before the window and the meter, so a replay is
    // neither counted nor billed. The envelope sits inside it, so the stored response is the
    // one the client got (`_meta` included) and a 503 the envelope makes of an unrecorded
    // charge is not stored. The lease outlives any request in flight (the hold TTL is above
    // the upstream timeout).
    let upstream_stack = ServiceBuilder::new()
        .map_response(app::box_response)
        .layer(ApiKeyAuthLayer::new(backends.keys.clone()))
        .layer(
            IdempotencyLayer::from_shared(backends.idempotency.clone())
                .with_lease_ttl(config.hold_ttl),
        )
        .layer(ResponseEnvelopeLayer::new())
        .layer(window)
        .layer(CreditMeterLayer::new(backends.ledger.clone()))
        .service(proxy);
    let local_state = Arc::clone(&state);
    let local_stack = ServiceBuilder::new()
        .map_response(app::box_response)
        .layer(ApiKeyAuthLayer::new(backends.keys.clone()))
        .layer(local::free_route_limit(
            backends.windows.clone(),
            config.window,
        ))
        .service(tower::service_fn(move |req: Request<Incoming>| {
            local::handle(Arc::clone(&local_state), req).map(Ok::<_, Infallible>)
        }));
    let dispatch = Dispatch {
        table: CostTable::onlyfans(),
        upstream: upstream_stack,
        local: local_stack,
    };
    let api = ServiceBuilder::new()
        .map_response(app::box_response)
        .layer(logger_layer)
        .service(dispatch);
    let app = App::new(Arc::clone(&state), api);

    let demo = if config.demo {
        let sandbox = sandbox.as_ref().map(|(s, _)| s);
        Some(demo::seed(&state, sandbox).await?)
    } else {
        None
    };

    let mut jobs = spawn_jobs(&state, backends.upkeep.clone());
    jobs.push(watcher);
    jobs.push(dispatcher);
    jobs.push(webhooks::spawn_purge(state.webhooks.clone()));
    jobs.push(accounts::spawn_upkeep(
        &backends.accounts,
        SystemClock::shared(),
    ));
    let upkeep = backends.upkeep.clone();

    let (public, internal) = serve_listeners(&config, app).await?;
    tracing::info!(
        addr = %public.local_addr(),
        admin_addr = %internal.as_ref().map_or("public".to_owned(), |s| s.local_addr().to_string()),
        upstream = %config::redact_url(&upstream),
        demo = config.demo,
        "tollgate gateway listening"
    );

    Ok(RunningGateway {
        public,
        internal,
        state,
        demo,
        sandbox,
        jobs,
        upkeep,
        _rules_watcher: rules_watcher,
    })
}

/// Sends each `/api` request to the stack its route needs: proxied routes through the
/// envelope, auth, window and meter; the gateway's own routes through auth only. The stacks
/// are kept unboxed, so cloning one per request costs reference-count increments only.
#[derive(Clone)]
struct Dispatch<U, L> {
    table: CostTable,
    upstream: U,
    local: L,
}

impl<U, L> Service<Request<Incoming>> for Dispatch<U, L>
where
    U: Service<Request<Incoming>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    U::Future: Send,
    L: Service<Request<Incoming>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    L::Future: Send,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = tollgate_core::BoxFuture<Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        match self.table.resolve(&mut req) {
            None => Box::pin(std::future::ready(Ok(Rejection::new(ErrorCode::NotFound)
                .into_response::<Full<Bytes>>()
                .map(app::boxed)))),
            Some(m) if m.route().upstream().is_some() => {
                Box::pin(self.upstream.clone().oneshot(req))
            }
            Some(_) => Box::pin(self.local.clone().oneshot(req)),
        }
    }
}

/// Binds and serves the public listener and, unless it is [`AdminBind::Public`], the
/// internal one.
async fn serve_listeners<A>(
    config: &Config,
    app: App<A>,
) -> Result<(Served, Option<Served>), BoxError>
where
    A: Service<Request<Incoming>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + Unpin
        + 'static,
    A::Future: Send,
{
    let bind = |addr: SocketAddr, var: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| BoxError::from(format!("{var} {addr}: {e}")))
    };
    let public_listener = bind(config.bind, "TOLLGATE_BIND").await?;
    let internal_listener = match config.admin_bind {
        AdminBind::Public => None,
        AdminBind::Separate(addr) => Some(bind(addr, "TOLLGATE_ADMIN_BIND").await?),
    };
    let surface = if internal_listener.is_some() {
        Surface::Public
    } else {
        Surface::Both
    };
    // Each connection's service knows its client's address (the admin lockout is per client).
    let per_peer = |app: App<A>| move |peer: SocketAddr| app.for_peer(peer);
    let public = Served::spawn(
        public_listener,
        per_peer(app.clone().with_surface(surface)),
        ServeOptions {
            name: "public",
            max_connections: Some(config.max_connections),
            drain_timeout: config.drain_timeout,
        },
    )?;
    let internal = internal_listener
        .map(|listener| {
            // Not limited: probes and the operator must get through a public listener that
            // is full.
            Served::spawn(
                listener,
                per_peer(app.with_surface(Surface::Internal)),
                ServeOptions {
                    name: "internal",
                    max_connections: None,
                    drain_timeout: config.drain_timeout,
                },
            )
        })
        .transpose()?;
    Ok((public, internal))
}

fn spawn_jobs(state: &Arc<AppState>, upkeep: Vec<state::Upkeep>) -> Vec<JoinHandle<()>> {
    let renew = {
        let ledger = state.ledger.clone();
        // Sweep often enough that no hold outlives its TTL by more than half of it.
        let every =
            (state.config.hold_ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match ledger.renew_due().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(renewed = n, "renewed subscriptions"),
                    Err(e) => tracing::warn!(error = %e, "renewal job failed"),
                }
                if let Err(e) = ledger.sweep_expired_holds().await {
                    tracing::warn!(error = %e, "hold sweeper failed");
                }
            }
        })
    };
    let purge = {
        let logs = state.logs.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let cutoff = SystemClock
                    .now_ms()
                    .saturating_sub(tollgate_request_logger::RETENTION.as_millis() as u64);
                if let Err(e) = logs.purge_older_than(cutoff).await {
                    tracing::warn!(error = %e, "log purge failed");
                }
            }
        })
    };
    // Approved top-ups a stopped replica (or a failed ledger) left unapplied: at start, then
    // every few minutes. Each is applied once however many replicas see it.
    let reconcile = {
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(300));
            loop {
                tick.tick().await;
                if let Err(e) = billing::reconcile_top_ups(&state).await {
                    tracing::warn!(error = %e, "billing reconciliation failed");
                }
            }
        })
    };
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            for job in &upkeep {
                job().await;
            }
        }
    });
    vec![renew, purge, reconcile, upkeep]
}
