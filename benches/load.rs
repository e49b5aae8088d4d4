//! Load test on loopback: the turnkey gateway in front of the sandbox upstream, against a bare
//! hyper forwarder in front of the same sandbox, in one run.
//!
//! `cargo bench --bench load` (release). `cargo test --benches` runs it as a short smoke test.
//!
//! # What runs
//!
//! One process, two tokio runtimes:
//!
//! - the **server runtime** (multi-thread, `TOLLGATE_LOAD_SERVER_THREADS` workers, default 2)
//!   runs the gateway (`gateway::start`: memory backends, in-process sandbox, demo tenant),
//!   the sandbox, and the bare forwarder written below;
//! - the **client runtime** (multi-thread, `TOLLGATE_LOAD_CLIENT_THREADS` workers, default 1)
//!   runs the load: `TOLLGATE_LOAD_CONNS` keep-alive HTTP/1.1 connections (default 64), each a
//!   loop of sequential requests, for `TOLLGATE_LOAD_WARMUP_MS` (default 1000) unrecorded then
//!   `TOLLGATE_LOAD_SECS` (default 3) recorded.
//!
//! Targets, each served on its own 127.0.0.1 port, all reaching the same sandbox:
//!
//! | target | path |
//! |---|---|
//! | sandbox direct | client → sandbox (`/api2/v2/users/me`, signed by the client): context only |
//! | bare forwarder | client → hyper server → pooled hyper-util client, signed upstream headers → sandbox, answer streamed back |
//! | gateway enterprise | client → gateway (logger, envelope, auth, window, meter, proxy, sign) → sandbox; the demo org moved to `enterprise` (unlimited credits: no hold) |
//! | gateway metered | the same, for a second org on `pro` with a large credit balance: every request holds and charges 1 credit |
//!
//! The targets run one after the other, in `TOLLGATE_LOAD_ROUNDS` rounds (default 5; every
//! other round in reverse order) so that background load on the machine falls on all of them
//! alike: on a shared host throughput swings by 2× from one minute to the next, so many short
//! paired rounds beat one long run. Then the same rounds again on a single connection, of
//! `TOLLGATE_LOAD_LIGHT_SECS` each (default 1; 0 skips them): latency without queueing, i.e.
//! what the proxy itself adds to one request. `TOLLGATE_LOAD_TARGETS=bare,enterprise` runs a
//! subset (of `direct`, `bare`, `enterprise`, `metered`), e.g. to profile one.
//!
//! Every latency is recorded (request written to last body byte read) and sorted; `p50` and
//! `p99` are nearest-rank. The tables pool the rounds; the gateway/bare comparisons are the
//! median of each round's own comparison (the two ran back to back), pooled figures beside
//! them. `cpu µs/req` is the whole process's CPU time (client, proxy and sandbox together,
//! from `/proc/self/stat`, 10 ms ticks) over the phase, warm-up included, divided by the
//! requests answered in it; subtracting the sandbox-direct figure leaves the proxy's own cost.
//! `other procs` is the CPU other processes of the machine used meanwhile (from `/proc/stat`),
//! to tell a disturbed round; contention outside a virtual machine does not show there.
//!
//! With 2 cores shared by 3 busy threads, the loaded pass is CPU-bound: its throughput ratio
//! compares CPU cost per request (diluted by the client's and sandbox's share, which both
//! proxies pay), and its latencies are mostly queueing (64 connections / throughput).
//!
//! The gateway's limits are lifted so the test measures the work, not 429s: a burst of
//! `u32::MAX` for every plan (`Config::burst`) and a 1 ms window (`Config::window`), because
//! `Config` has no knob for the per-window *limit* (9 999 for enterprise). The memory window
//! store still logs a full second of admissions (the burst horizon) and decides by binary
//! search over it, as it would with a 60 s window.
//!
//! Every non-200 answer, transport error or timeout is counted, and any of them fails the run
//! (exit status 1); so does a metered balance that did not fall by exactly the number of OK
//! answers the metered org got. The gateway-vs-bare targets (≥ 85 % throughput, ≤ 1 ms added
//! at p99) are reported as `ok` or `MISSED`, not asserted: on a shared machine they are
//! measurements.
//!
//! Nothing leaves 127.0.0.1; the run is bounded in time (printed at the start; every request
//! under a 10 s timeout) and in memory (at most [`driver::MAX_SAMPLES`] latencies per phase).

use std::convert::Infallible;

// The allocator the gateway example uses; it serves every target of this process alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use tollgate::gateway::{self, Config, RunningGateway};
use tollgate::sandbox::{Sandbox, SandboxAccount};

#[path = "driver/mod.rs"]
mod driver;

use driver::{
    connect, env_number, exchange, load_average, median, print_table, run_pass, runtimes, Answer,
    Load, RoundFigures, Style, Summary, Target as _, REQUEST_TIMEOUT,
};

/// Column widths of the per-round lines and tables; a phase without a 200 reports no CPU.
const STYLE: Style = Style {
    round_width: 0,
    name_width: 20,
    rps_width: 9,
    ms_width: 6,
    other_procs_width: 14,
    cpu_needs_ok: true,
};

/// The admin token of the gateway under test (loopback only, this process only).
const ADMIN_TOKEN: &str = "load-test-admin-token";
/// Targets for the gateway against the bare forwarder.
const MIN_THROUGHPUT_RATIO: f64 = 0.85;
const MAX_ADDED_P99_MS: f64 = 1.0;

fn main() {
    driver::main("load", Settings::from_env, run);
}

/// The run's parameters.
#[derive(Debug, Clone)]
struct Settings {
    secs: f64,
    warmup: Duration,
    conns: usize,
    rounds: usize,
    /// Target ids to run (all when empty).
    only: Vec<&'static str>,
    /// Length of the light-load pass (one connection); 0 skips it.
    light_secs: f64,
    server_threads: usize,
    client_threads: usize,
    full: bool,
}

impl Settings {
    fn from_env(full: bool) -> Result<Self, String> {
        let (secs, warmup_ms, conns, rounds, light_secs) = if full {
            (3.0, 1_000, 64, 5, 1.0)
        } else {
            (0.3, 100, 8, 1, 0.2)
        };
        Ok(Settings {
            secs: env_number("TOLLGATE_LOAD_SECS", secs, 0.1, 300.0)?,
            warmup: Duration::from_millis(env_number(
                "TOLLGATE_LOAD_WARMUP_MS",
                warmup_ms,
                0,
                60_000,
            )?),
            conns: env_number("TOLLGATE_LOAD_CONNS", conns, 1, 1_024)?,
            rounds: env_number("TOLLGATE_LOAD_ROUNDS", rounds, 1, 10)?,
            only: env_targets()?,
            light_secs: env_number("TOLLGATE_LOAD_LIGHT_SECS", light_secs, 0.0, 60.0)?,
            server_threads: env_number("TOLLGATE_LOAD_SERVER_THREADS", 2, 1, 64)?,
            client_threads: env_number("TOLLGATE_LOAD_CLIENT_THREADS", 1, 1, 64)?,
            full,
        })
    }

    /// The pass under load.
    fn heavy(&self) -> Load {
        Load {
            conns: self.conns,
            warmup: self.warmup,
            duration: Duration::from_secs_f64(self.secs),
        }
    }

    /// The pass at light load: one connection, so latencies carry no queueing.
    fn light(&self) -> Option<Load> {
        (self.light_secs > 0.0).then(|| Load {
            conns: 1,
            warmup: self.warmup.min(Duration::from_millis(200)),
            duration: Duration::from_secs_f64(self.light_secs),
        })
    }
}

/// `TOLLGATE_LOAD_TARGETS=bare,enterprise` runs only those targets (to profile one).
fn env_targets() -> Result<Vec<&'static str>, String> {
    let Ok(raw) = std::env::var("TOLLGATE_LOAD_TARGETS") else {
        return Ok(Vec::new());
    };
    let mut ids = Vec::new();
    for id in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match TARGET_IDS.iter().find(|t| **t == id) {
            Some(t) => ids.push(*t),
            None => {
                return Err(format!(
                    "TOLLGATE_LOAD_TARGETS: unknown target {id:?} (expected a list of {})",
                    TARGET_IDS.join(", ")
                ))
            }
        }
    }
    Ok(ids)
}

/// The targets, in the order they run.
const TARGET_IDS: [&str; 4] = ["direct", "bare", "enterprise", "metered"];

/// One thing the client can load: an address, a request, and (for the sandbox itself) the
/// signing the client must do per request.
struct Target {
    /// Short name for `TOLLGATE_LOAD_TARGETS`.
    id: &'static str,
    name: &'static str,
    addr: SocketAddr,
    path: String,
    uri: Uri,
    /// `host` and the target's own headers.
    headers: HeaderMap,
    /// Sign each request for the sandbox as the upstream requires.
    sign_for: Option<(Sandbox, SandboxAccount)>,
    check: fn(&Value) -> Result<(), String>,
}

impl Target {
    fn new(
        id: &'static str,
        name: &'static str,
        addr: SocketAddr,
        path: String,
        extra: &[(&'static str, &str)],
        sign_for: Option<(Sandbox, SandboxAccount)>,
        check: fn(&Value) -> Result<(), String>,
    ) -> Result<Arc<Target>, String> {
        let uri = Uri::try_from(path.as_str()).map_err(|e| format!("{name}: {path}: {e}"))?;
        let mut headers = HeaderMap::new();
        let value = |v: &str| HeaderValue::from_str(v).map_err(|e| format!("{name}: {e}"));
        headers.insert(HOST, value(&addr.to_string())?);
        for (header, v) in extra {
            headers.insert(HeaderName::from_static(header), value(v)?);
        }
        Ok(Arc::new(Target {
            id,
            name,
            addr,
            path,
            uri,
            headers,
            sign_for,
            check,
        }))
    }
}

impl driver::Target for Target {
    fn name(&self) -> &str {
        self.name
    }

    fn id(&self) -> &str {
        self.id
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn request(&self, _tenant: usize) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self.uri.clone();
        let headers = req.headers_mut();
        headers.clone_from(&self.headers);
        if let Some((sandbox, account)) = &self.sign_for {
            headers.extend(sandbox.signed_headers(account, &self.path));
        }
        req
    }
}

fn run(settings: &Settings) -> Result<(), String> {
    let (server_rt, client_rt) = runtimes(settings.server_threads, settings.client_threads)?;

    let setup = server_rt.block_on(start_servers())?;
    let tenants = client_rt.block_on(seed_tenants(&setup))?;
    let targets: Vec<Arc<Target>> = targets(&setup, &tenants)?
        .into_iter()
        .filter(|t| settings.only.is_empty() || settings.only.contains(&t.id))
        .collect();

    // Every target answers correctly before any load.
    for target in &targets {
        client_rt.block_on(sanity_check(target))?;
    }

    let heavy = settings.heavy();
    let light = settings.light();
    let heavy_time = (heavy.warmup + heavy.duration).as_secs_f64() * settings.rounds as f64;
    let light_time =
        light.map_or(0.0, |l| (l.warmup + l.duration).as_secs_f64()) * settings.rounds as f64;
    println!(
        "tollgate load test, loopback: {} round(s) × {} targets × ({:.1} s warm-up + {:.1} s) at {} connections, then as many rounds of {} at 1 connection; about {:.0} s",
        settings.rounds,
        targets.len(),
        heavy.warmup.as_secs_f64(),
        heavy.duration.as_secs_f64(),
        heavy.conns,
        light.map_or_else(
            || "nothing".to_owned(),
            |l| format!("{:.1} s", l.duration.as_secs_f64())
        ),
        (heavy_time + light_time) * targets.len() as f64
    );
    println!(
        "server runtime: {} worker(s) (gateway, forwarder, sandbox); client runtime: {} worker(s); {} CPU(s); load average before: {}",
        settings.server_threads,
        settings.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average().unwrap_or_else(|| "n/a".into())
    );
    if !settings.full {
        println!("(smoke run: `cargo bench --bench load` runs the full test)");
    }

    let metered_balance_before = client_rt.block_on(balance(&setup, &tenants.metered_key))?;
    let loaded = run_pass(&client_rt, &targets, heavy, settings.rounds, STYLE);
    let unloaded = light.map(|l| run_pass(&client_rt, &targets, l, settings.rounds, STYLE));
    let metered_balance_after = client_rt.block_on(balance(&setup, &tenants.metered_key))?;

    println!();
    println!("under load ({} connections):", heavy.conns);
    print_table(&loaded, STYLE);
    report_ratios(&loaded, true);
    if let Some(unloaded) = &unloaded {
        println!();
        println!("light load (1 connection, latency without queueing):");
        print_table(unloaded, STYLE);
        report_ratios(unloaded, false);
    }
    println!();

    let logger = setup.gateway.state().logger.stats();
    println!(
        "gateway request log: {} rows dropped (channel full), {} failed; load average after: {}",
        setup.gateway.state().logger.dropped_rows(),
        logger.failed_rows,
        load_average().unwrap_or_else(|| "n/a".into())
    );

    // Shut down before judging, so a failure still leaves no task behind.
    server_rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(10), setup.gateway.shutdown()).await;
    });
    drop(client_rt);
    server_rt.shutdown_timeout(Duration::from_secs(2));

    let mut failures = Vec::new();
    let all = || loaded.iter().chain(unloaded.iter().flatten());
    for s in all() {
        if s.errors.total() > 0 {
            failures.push(format!(
                "{}: {} non-200 answers, {} transport errors, {} timeouts; first: {}",
                s.name,
                s.errors.status,
                s.errors.transport,
                s.errors.timeout,
                s.errors.samples.join(" | ")
            ));
        }
    }
    let charged = metered_balance_before.saturating_sub(metered_balance_after);
    let metered_ok: u64 = all()
        .filter(|s| s.id == "metered")
        .map(Summary::ok_total)
        .sum();
    if charged != metered_ok {
        failures.push(format!(
            "gateway metered: balance fell by {charged} credits for {metered_ok} successful requests (cost 1 each)"
        ));
    } else {
        println!("gateway metered: charged exactly {charged} credits for {metered_ok} 200s");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}
/// The gateway against the bare forwarder (with the targets when `judge`), and each proxy's
/// own CPU per request.
fn report_ratios(summaries: &[Summary], judge: bool) {
    let find = |id: &str| summaries.iter().find(|s| s.id == id);
    if let Some(bare) = find("bare") {
        for gw in ["enterprise", "metered"].into_iter().filter_map(find) {
            compare(gw, bare, judge);
        }
    }
    if let Some(direct_cpu) = find("direct").and_then(Summary::cpu_us_per_req) {
        let mut line = String::from("proxy's own CPU per request (target − sandbox direct):");
        for s in summaries {
            if let (true, Some(cpu)) = (s.id != "direct", s.cpu_us_per_req()) {
                let _ = write!(line, " {} {:.1} µs;", s.name, cpu - direct_cpu);
            }
        }
        println!("{}", line.trim_end_matches(';'));
    }
}

/// The servers of the run, all on the server runtime.
struct Setup {
    gateway: RunningGateway,
    sandbox: Sandbox,
    account: SandboxAccount,
    /// A second listener of the gateway's own sandbox, for the forwarder and direct target.
    sandbox_addr: SocketAddr,
    forwarder_addr: SocketAddr,
    _sandbox_server: tollgate::sandbox::SandboxServer,
}

async fn start_servers() -> Result<Setup, String> {
    let config = Config {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_token: Some(ADMIN_TOKEN.to_owned()),
        demo: true,
        window: Duration::from_millis(1),
        burst: [u32::MAX; 4],
        ..Config::default()
    };
    let gateway = gateway::start(config)
        .await
        .map_err(|e| format!("gateway: {e}"))?;
    let sandbox = gateway
        .sandbox()
        .cloned()
        .ok_or("the gateway runs no in-process sandbox")?;
    let account = sandbox
        .accounts()
        .into_iter()
        .next()
        .ok_or("the demo tenant has no sandbox account")?;
    // The same sandbox (same state, same code) on another port: the gateway's pool and the
    // forwarder's pool do not share connections.
    let sandbox_server = sandbox
        .bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("sandbox: {e}"))?;
    let sandbox_addr = sandbox_server.local_addr();
    let forwarder_addr = start_forwarder(
        format!("http://{sandbox_addr}"),
        sandbox.clone(),
        account.clone(),
    )
    .await
    .map_err(|e| format!("forwarder: {e}"))?;
    Ok(Setup {
        gateway,
        sandbox,
        account,
        sandbox_addr,
        forwarder_addr,
        _sandbox_server: sandbox_server,
    })
}

// ---------------------------------------------------------------------------------------------
// The bare forwarder: what any proxy in front of the sandbox must pay.

struct Forwarder {
    client: Client<HttpConnector, Incoming>,
    /// `http://127.0.0.1:<port>`.
    upstream: String,
    sandbox: Sandbox,
    account: SandboxAccount,
}

/// Headers that describe one hop only (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

async fn start_forwarder(
    upstream: String,
    sandbox: Sandbox,
    account: SandboxAccount,
) -> std::io::Result<SocketAddr> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector);
    let forwarder = Arc::new(Forwarder {
        client,
        upstream,
        sandbox,
        account,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let forwarder = Arc::clone(&forwarder);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req| forward(Arc::clone(&forwarder), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

type ForwardBody = Either<Incoming, Empty<Bytes>>;

/// `/api/models/<model>/<rest>?<query>` → `/api2/v2/<rest>?<query>`.
fn upstream_path(uri: &Uri) -> Option<String> {
    let rest = uri.path().strip_prefix("/api/models/")?;
    let (_model, rest) = rest.split_once('/')?;
    if rest.is_empty() {
        return None;
    }
    Some(match uri.query() {
        Some(q) => format!("/api2/v2/{rest}?{q}"),
        None => format!("/api2/v2/{rest}"),
    })
}

fn status_only(status: StatusCode) -> Response<ForwardBody> {
    let mut res = Response::new(Either::Right(Empty::new()));
    *res.status_mut() = status;
    res
}

async fn forward(
    fw: Arc<Forwarder>,
    req: Request<Incoming>,
) -> Result<Response<ForwardBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let Some(path_and_query) = upstream_path(&parts.uri) else {
        return Ok(status_only(StatusCode::NOT_FOUND));
    };
    let Ok(uri) = Uri::try_from(format!("{}{}", fw.upstream, path_and_query)) else {
        return Ok(status_only(StatusCode::BAD_REQUEST));
    };
    let mut upstream_req = Request::new(body);
    *upstream_req.method_mut() = parts.method;
    *upstream_req.uri_mut() = uri;
    let headers = upstream_req.headers_mut();
    *headers = fw.sandbox.signed_headers(&fw.account, &path_and_query);
    if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, ct.clone());
    }
    match fw.client.request(upstream_req).await {
        Ok(mut res) => {
            for name in HOP_BY_HOP {
                res.headers_mut().remove(name);
            }
            Ok(res.map(Either::Left))
        }
        Err(_) => Ok(status_only(StatusCode::BAD_GATEWAY)),
    }
}

// ---------------------------------------------------------------------------------------------
// Tenants, through the admin API as an operator would set them up.

struct Tenants {
    enterprise_model: String,
    enterprise_key: String,
    metered_model: String,
    metered_key: String,
}

/// Balance given to the metered org: far more than any run can spend.
const METERED_BALANCE: u64 = 1_000_000_000_000;

async fn seed_tenants(setup: &Setup) -> Result<Tenants, String> {
    let demo = setup
        .gateway
        .demo()
        .ok_or("the gateway seeded no demo tenant")?;
    let gw = setup.gateway.local_addr();
    let admin = move |method: Method, path: String, body: Value| async move {
        let (status, body) = call(
            gw,
            method.clone(),
            &path,
            &[("authorization", format!("Bearer {ADMIN_TOKEN}"))],
            Some(body),
        )
        .await?;
        if !status.is_success() {
            return Err(format!(
                "admin {method} {path}: {status} {}",
                String::from_utf8_lossy(&body)
            ));
        }
        serde_json::from_slice::<Value>(&body).map_err(|e| format!("admin {path}: {e}"))
    };

    // The demo org, moved to the unlimited plan.
    admin(
        Method::PUT,
        format!("/admin/orgs/{}/subscription", demo.org),
        json!({"plan": "enterprise"}),
    )
    .await?;

    // A paying org whose every request holds and charges credits.
    let org = admin(
        Method::POST,
        "/admin/orgs".into(),
        json!({"name": "Load Org"}),
    )
    .await?;
    let org = org["id"].as_str().ok_or("no org id")?.to_owned();
    admin(
        Method::PUT,
        format!("/admin/orgs/{org}/subscription"),
        json!({"plan": "pro"}),
    )
    .await?;
    admin(
        Method::PUT,
        format!("/admin/orgs/{org}/credits"),
        json!({"balance": METERED_BALANCE}),
    )
    .await?;
    let key = admin(
        Method::POST,
        format!("/admin/orgs/{org}/keys"),
        json!({"name": "load"}),
    )
    .await?;
    let model = admin(
        Method::POST,
        format!("/admin/orgs/{org}/models"),
        json!({"name": "Load Model", "session": setup.account.session_json()}),
    )
    .await?;
    Ok(Tenants {
        enterprise_model: demo.model.to_string(),
        enterprise_key: demo.key.clone(),
        metered_model: model["id"].as_str().ok_or("no model id")?.to_owned(),
        metered_key: key["key"].as_str().ok_or("no key")?.to_owned(),
    })
}

/// The metered org's balance, from `GET /api/credits`.
async fn balance(setup: &Setup, key: &str) -> Result<u64, String> {
    let (status, body) = call(
        setup.gateway.local_addr(),
        Method::GET,
        "/api/credits",
        &[("x-api-key", key.to_owned())],
        None,
    )
    .await?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("/api/credits: {e}"))?;
    v["balance"]
        .as_u64()
        .filter(|_| status == StatusCode::OK)
        .ok_or_else(|| format!("/api/credits: {status} {v}"))
}

fn targets(setup: &Setup, t: &Tenants) -> Result<Vec<Arc<Target>>, String> {
    let gw = setup.gateway.local_addr();
    Ok(vec![
        Target::new(
            "direct",
            "sandbox direct",
            setup.sandbox_addr,
            "/api2/v2/users/me".into(),
            &[],
            Some((setup.sandbox.clone(), setup.account.clone())),
            check_profile,
        )?,
        Target::new(
            "bare",
            "bare forwarder",
            setup.forwarder_addr,
            format!("/api/models/{}/users/me", t.enterprise_model),
            &[("x-api-key", &t.enterprise_key)],
            None,
            check_profile,
        )?,
        Target::new(
            "enterprise",
            "gateway enterprise",
            gw,
            format!("/api/models/{}/users/me", t.enterprise_model),
            &[("x-api-key", &t.enterprise_key)],
            None,
            check_unlimited_envelope,
        )?,
        Target::new(
            "metered",
            "gateway metered",
            gw,
            format!("/api/models/{}/users/me", t.metered_model),
            &[("x-api-key", &t.metered_key)],
            None,
            check_metered_envelope,
        )?,
    ])
}

fn check_profile(v: &Value) -> Result<(), String> {
    if v["isAuth"] == json!(true) && v["id"].is_u64() {
        Ok(())
    } else {
        Err(format!("not the users/me profile: {v}"))
    }
}

fn check_envelope(v: &Value) -> Result<(), String> {
    check_profile(&v["data"])?;
    if v["_meta"]["_credits"]["used"] != json!(1) {
        return Err(format!("`_meta._credits.used` is not 1: {v}"));
    }
    Ok(())
}

fn check_unlimited_envelope(v: &Value) -> Result<(), String> {
    check_envelope(v)?;
    if !v["_meta"]["_credits"]["balance"].is_null() {
        return Err(format!("an unlimited plan shows a balance: {v}"));
    }
    Ok(())
}

fn check_metered_envelope(v: &Value) -> Result<(), String> {
    check_envelope(v)?;
    if !v["_meta"]["_credits"]["balance"].is_u64() {
        return Err(format!("a metered plan shows no balance: {v}"));
    }
    Ok(())
}

async fn sanity_check(target: &Target) -> Result<(), String> {
    let mut sender = connect(target.addr).await?;
    let (status, body) = match exchange(&mut sender, target.request(0)).await {
        Answer::Done(status, body) => (status, body),
        Answer::Transport(e) => return Err(format!("{}: {e}", target.name)),
        Answer::TimedOut => return Err(format!("{}: timed out", target.name)),
    };
    if status != StatusCode::OK {
        return Err(format!(
            "{}: {status} {}",
            target.name,
            String::from_utf8_lossy(&body)
        ));
    }
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| format!("{}: not JSON: {e}", target.name))?;
    (target.check)(&v).map_err(|e| format!("{}: {e}", target.name))
}

// ---------------------------------------------------------------------------------------------
// The client.

/// A one-off request on its own connection (admin calls, balance checks).
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&'static str, String)],
    body: Option<Value>,
) -> Result<(StatusCode, Bytes), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(CONNECTION, "close");
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let body = match body {
        Some(v) => {
            req = req.header(CONTENT_TYPE, "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let req = req.body(body).map_err(|e| e.to_string())?;
    let res = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| format!("{path}: timed out"))?
        .map_err(|e| format!("{path}: {e}"))?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{path}: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// The gateway against the bare forwarder. Each figure is the median over rounds of the
/// round's own comparison (the two ran back to back, under the same background load), with
/// the pooled figure beside it. `judge_throughput`: the throughput target applies (under
/// load; at one connection the throughput is only the inverse of the latency). The p99
/// target applies to both passes.
fn compare(gw: &Summary, bare: &Summary, judge_throughput: bool) {
    let paired = |f: fn(&RoundFigures, &RoundFigures) -> f64| {
        let per_round: Vec<f64> = gw
            .rounds
            .iter()
            .zip(&bare.rounds)
            .map(|(g, b)| f(g, b))
            .collect();
        (median(&per_round), per_round)
    };
    let (ratio, ratios) = paired(|g, b| g.rps / b.rps);
    let (p99_delta, _) = paired(|g, b| g.p99_ms - b.p99_ms);
    let (p50_delta, _) = paired(|g, b| g.p50_ms - b.p50_ms);
    let pooled_ratio = gw.stats.rps() / bare.stats.rps();
    let pooled_p99 = gw.stats.percentile_ms(0.99) - bare.stats.percentile_ms(0.99);
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    let per_round = ratios
        .iter()
        .map(|r| format!("{:.1}", r * 100.0))
        .collect::<Vec<_>>()
        .join(", ");
    let throughput = if judge_throughput {
        format!(
            "{:.1} % (target ≥ {:.0} %: {})",
            ratio * 100.0,
            MIN_THROUGHPUT_RATIO * 100.0,
            verdict(ratio >= MIN_THROUGHPUT_RATIO)
        )
    } else {
        format!("{:.1} %", ratio * 100.0)
    };
    println!(
        "{} / bare forwarder: throughput {throughput} [rounds: {per_round}; pooled {:.1} %], p99 {:+.3} ms (target ≤ {:.1} ms: {}) [pooled {:+.3} ms], p50 {:+.3} ms",
        gw.name,
        pooled_ratio * 100.0,
        p99_delta,
        MAX_ADDED_P99_MS,
        verdict(p99_delta <= MAX_ADDED_P99_MS),
        pooled_p99,
        p50_delta
    );
}
