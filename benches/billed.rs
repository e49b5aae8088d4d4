//! Billed requests per second through the turnkey gateway: memory backends against
//! PostgreSQL backends, in one run, under the same load.
//!
//! `cargo bench --bench billed` (release). `cargo test --benches` runs it as a short smoke test.
//!
//! # What runs
//!
//! As operators measure a proxy: an external load generator and a cheap static upstream, so
//! the gateway's own cost is not diluted by an in-process client. The gateways run on the
//! **server runtime** of this process (`TOLLGATE_BILLED_SERVER_THREADS` workers, default 2);
//! the upstream is Debian's nginx (`nginx-light`, started here on a loopback port with a
//! generated config, one static JSON answer to every path); the load is `wrk` (Debian's `wrk`
//! 4.1, up to 2 threads) with `TOLLGATE_BILLED_CONNS` keep-alive connections (default 64),
//! `TOLLGATE_BILLED_WARMUP_MS` (default 1000) unrecorded then `TOLLGATE_BILLED_SECS` (default
//! 3, whole seconds) recorded, its Lua script cycling through the target's tenants (each
//! request with its tenant's API key). Without wrk or nginx, the gateways' in-process
//! sandboxes answer and an in-process client on the **client runtime**
//! (`TOLLGATE_BILLED_CLIENT_THREADS`, default 1) drives the load, and the output says so.
//!
//! Two gateways (`gateway::start`, everything else default):
//!
//! - **memory**: memory backends;
//! - **postgres**: PostgreSQL backends (`Config::database_url`, `session_key`), in a fresh
//!   schema (`tollgate_postgres::testing::TestDb`, on `DATABASE_URL` or the default test
//!   server) passed as `?options=-csearch_path%3D<schema>`, dropped at the end. When the server
//!   is unreachable the PostgreSQL part is skipped with a note and the memory part still runs.
//!
//! Each serves one org on the `pro` plan with a balance of 10¹² credits (`Ledger::set_balance`)
//! and one model on its sandbox, and the load is `GET /api/models/<model>/users/me` (cost 1):
//! every request holds a credit, gets a 200 and is charged — a *billed* request. Limits do not
//! bind: bursts of `u32::MAX` (`Config::burst`) and a 1 ms window (`Config::window`, there is no
//! knob for the per-window limit of 300 on `pro`: 300 per millisecond is out of reach of 64
//! connections). The window store is in memory with both backends (the gateway keeps windows
//! in memory unless `REDIS_URL` is set), so the difference is the key store, ledger, session
//! store and log sink.
//!
//! A third target, `postgres/<n>orgs`, loads the PostgreSQL gateway with the same
//! connections spread over `TOLLGATE_BILLED_ORGS` such orgs (default 16; connection `i` bills
//! org `i mod n`; ≤ 1 leaves it out): a billed request updates its org's account row twice
//! (hold, commit), and those updates queue on the row's lock, each held until its commit is
//! flushed to the WAL — so one org's rate is bounded by the server's commit latency, and
//! this target shows how much of the gap is that bound. It runs on a PostgreSQL gateway of its
//! own (`postgres-many`), beside a twin without usage rollups
//! (`postgres-no-rollups/<n>orgs`, `Config::usage_rollups = false`): the pair's throughput
//! ratio, round by round, is what the rollups cost. `TOLLGATE_BILLED_AA=1` turns the twin's
//! rollups on too — a control run: the ratio it prints is the pair's bias when nothing
//! differs. Every gateway's request log is written out before each run. The three
//! PostgreSQL gateways share one fresh schema; the pair's request-path pools are 16 each.
//!
//! The targets run one after the other in `TOLLGATE_BILLED_ROUNDS` paired rounds (default 5;
//! every other round in reverse order), then the one-org targets as many rounds at one
//! connection of `TOLLGATE_BILLED_LIGHT_SECS` (default 1; 0 skips them): latency without
//! queueing. The PostgreSQL/memory ratios are the median of each round's own ratio, pooled
//! beside it. The server's `synchronous_commit`, `fsync`, `wal_sync_method` and
//! `commit_delay` are printed: they set that bound.
//! `p50`/`p99` are nearest-rank over every recorded latency (request written to last body byte
//! read). `cpu µs/req` is this process's CPU (client, gateway, sandbox) per answered request;
//! `other procs` is the CPU the rest of the machine used meanwhile — the PostgreSQL server's
//! backends are there, along with whatever else runs on the host.
//!
//! # Exactness
//!
//! After the load, for each target and each of its orgs: the balance fell by exactly the
//! number of 200s the load got, the ledger holds exactly one `charge` row of 1 credit per 200
//! (load and sanity check), each with its own request id, and no hold is left open. Any miss, any non-200, transport
//! error or timeout fails the run (exit status 1).
//!
//! # PostgreSQL round trips per billed request
//!
//! `pg_stat_statements` needs `shared_preload_libraries`, and database-wide counters
//! (`pg_stat_database.xact_commit`) count every other client of a shared server. So a third
//! gateway, on a schema of its own, reaches PostgreSQL through a counting TCP proxy written
//! below, which reads the frontend protocol: each `Sync` (extended protocol) or `Query`
//! (simple protocol) is one round trip, attributed to the statement it executed (prepared
//! statements are named per connection by their `Parse`). After a warm-up and an idle
//! interval (background jobs, listener heartbeats: reported), exactly
//! `TOLLGATE_BILLED_COUNT_REQUESTS` (default 10 000; 0 skips this part) billed requests run
//! at the same concurrency; then the request log is flushed, and the round trips are divided
//! by the requests. The rows each table gained (`pg_stat_user_tables` of that schema, read
//! once the server has published its backends' counters: 11 s or more after each phase) are
//! reported the same way. That gateway is not timed: the proxy costs CPU. Its ledger is
//! checked for exactness too.
//!
//! Nothing leaves 127.0.0.1 except the PostgreSQL connections to `DATABASE_URL`; every request
//! is under a 10 s timeout, and at most [`driver::MAX_SAMPLES`] latencies are kept per phase.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::Empty;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use tollgate::gateway::{self, Config, RunningGateway};
use tollgate_core::{OrgId, Plan};
use tollgate_credit_meter::{EntryKind, Ledger, LedgerEntry, MAX_ENTRIES_PER_ORG};
use tollgate_postgres::testing::TestDb;
use tollgate_upstream_sign::Session;

#[path = "driver/mod.rs"]
mod driver;

use driver::{
    connect, env_number, exchange, load_average, median, print_table, run_pass, runtimes, Answer,
    Load, RoundFigures, Style, Summary,
};

/// Column widths of the per-round lines and tables.
const STYLE: Style = Style {
    round_width: 2,
    name_width: 17,
    rps_width: 8,
    ms_width: 7,
    other_procs_width: 12,
    cpu_needs_ok: false,
};

/// The billed org's balance: far more than any run can spend.
const BALANCE: u64 = 1_000_000_000_000;

fn main() {
    driver::main("billed", Settings::from_env, run);
}

/// The run's parameters.
#[derive(Debug, Clone)]
struct Settings {
    heavy: Load,
    light: Option<Load>,
    rounds: usize,
    /// Orgs the PostgreSQL gateway's second target spreads its connections over (≤ 1: none).
    orgs: usize,
    count_requests: u64,
    server_threads: usize,
    client_threads: usize,
    full: bool,
}

impl Settings {
    fn from_env(full: bool) -> Result<Self, String> {
        let (secs, warmup_ms, conns, rounds, light_secs, count) = if full {
            (3.0, 1_000, 64, 5, 1.0, 10_000)
        } else {
            (0.3, 100, 8, 1, 0.2, 300)
        };
        let warmup = Duration::from_millis(env_number(
            "TOLLGATE_BILLED_WARMUP_MS",
            warmup_ms,
            0,
            60_000,
        )?);
        let light_secs = env_number("TOLLGATE_BILLED_LIGHT_SECS", light_secs, 0.0, 60.0)?;
        Ok(Settings {
            heavy: Load {
                conns: env_number("TOLLGATE_BILLED_CONNS", conns, 1, 1_024)?,
                warmup,
                duration: Duration::from_secs_f64(env_number(
                    "TOLLGATE_BILLED_SECS",
                    secs,
                    0.1,
                    300.0,
                )?),
            },
            light: (light_secs > 0.0).then(|| Load {
                conns: 1,
                warmup: warmup.min(Duration::from_millis(200)),
                duration: Duration::from_secs_f64(light_secs),
            }),
            rounds: env_number("TOLLGATE_BILLED_ROUNDS", rounds, 1, 20)?,
            orgs: env_number("TOLLGATE_BILLED_ORGS", 16, 0, 1_024)?,
            count_requests: env_number("TOLLGATE_BILLED_COUNT_REQUESTS", count, 0, 10_000_000)?,
            server_threads: env_number("TOLLGATE_BILLED_SERVER_THREADS", 2, 1, 64)?,
            client_threads: env_number("TOLLGATE_BILLED_CLIENT_THREADS", 1, 1, 64)?,
            full,
        })
    }
}

fn run(settings: &Settings) -> Result<(), String> {
    let (server_rt, client_rt) = runtimes(settings.server_threads, settings.client_threads)?;
    // The static upstream: nginx when installed, else the gateways' in-process sandboxes.
    let nginx = match find_program("nginx") {
        Some(binary) => {
            let nginx = Nginx::start(&binary)?;
            println!(
                "upstream: nginx at {} (a {} B JSON answer to every request)",
                nginx.url,
                static_body().len()
            );
            let _ = UPSTREAM.set(nginx.url.clone());
            Some(nginx)
        }
        None => {
            println!("upstream: in-process sandboxes (nginx not found: `apt-get install -y nginx-light`)");
            None
        }
    };

    let result = run_on(settings, &server_rt, &client_rt);
    // Connections and pools wind down on the server runtime; give them a moment before it
    // goes away, so PostgreSQL sees clean disconnects.
    server_rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    drop(client_rt);
    drop(server_rt);
    drop(nginx);
    result
}

/// The timed passes with wrk, the table and ratios, and the exactness checks.
fn measure_with_wrk(
    settings: &Settings,
    server_rt: &Runtime,
    wrk: &std::path::Path,
    targets: &[Arc<Target>],
    light_targets: &[Arc<Target>],
    balances_before: Vec<Vec<u64>>,
    gateways: &[BilledGateway],
) -> Result<Vec<String>, String> {
    let dir = std::env::temp_dir().join(format!("tollgate-billed-wrk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("wrk scripts: {e}"))?;
    println!("client: wrk ({}), up to 2 threads", wrk.display());
    // Before each run every gateway's request log is written out, so no run pays for the
    // previous one's log writes (the rollups ride on them: leftovers would bias the on/off
    // pair by which target ran before).
    let settle = || {
        server_rt.block_on(async {
            for gw in gateways {
                gw.gateway.state().logger.flush().await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        })
    };
    let loaded = wrk_pass(wrk, targets, settings.heavy, settings.rounds, &dir, &settle)?;
    let unloaded = match settings.light {
        Some(l) => Some(wrk_pass(
            wrk,
            light_targets,
            l,
            settings.rounds,
            &dir,
            &settle,
        )?),
        None => None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    println!("under load ({} connections):", settings.heavy.conns);
    wrk_report(&loaded);
    if let Some(unloaded) = &unloaded {
        println!();
        println!("light load (1 connection, latency without queueing):");
        wrk_report(unloaded);
    }
    println!();
    let mut failures = Vec::new();
    for (target, before) in targets.iter().zip(balances_before) {
        let passes = std::iter::once(&loaded).chain(unloaded.as_ref());
        let (mut ok, mut slack) = (0, 0);
        for p in passes {
            if let Some(s) = p.iter().find(|s| s.name == target.name) {
                ok += s.ok;
                let conns = if s.rounds.is_empty() {
                    0
                } else {
                    settings.heavy.conns as u64
                };
                slack += s.runs * conns;
                if s.errors > 0 {
                    failures.push(format!("{}: {} non-2xx or socket errors", s.name, s.errors));
                }
            }
        }
        match server_rt.block_on(target.check_charged(&before, ok, slack)) {
            Ok(line) => println!("{line}"),
            Err(e) => failures.push(e),
        }
    }
    for gw in gateways {
        let logger = &gw.gateway.state().logger;
        server_rt.block_on(logger.flush());
        let log = logger.stats();
        println!(
            "{}: request log: {} rows written, {} dropped (queue full), {} failed",
            gw.name, log.written_rows, log.dropped_rows, log.failed_rows
        );
    }
    println!(
        "load average after: {}",
        load_average().unwrap_or_else(|| "n/a".into())
    );
    Ok(failures)
}

fn run_on(settings: &Settings, server_rt: &Runtime, client_rt: &Runtime) -> Result<(), String> {
    let memory = server_rt.block_on(BilledGateway::start("memory", None, true))?;
    let db = server_rt.block_on(TestDb::new());
    let mut gateways = vec![memory];
    let mut failures = Vec::new();
    match &db {
        Some(db) => {
            // With the usage rollups (the product) and without them, so their cost on the
            // request path shows in the same run.
            // `TOLLGATE_BILLED_AA=1`: the second gateway keeps its rollups too, a control
            // run telling what the pair's ratio is when nothing differs between them.
            let control = std::env::var("TOLLGATE_BILLED_AA").as_deref() == Ok("1");
            if control {
                println!("control run (TOLLGATE_BILLED_AA=1): both PostgreSQL gateways keep their rollups");
            }
            // Three gateways on one schema: the one-org target's, and a pair for the
            // many-org targets that differs only in the rollups — each gateway carries one
            // target, so neither of the pair inherits another target's caches, queues or
            // log backlog.
            for (name, rollups) in [("postgres", true), (MANY, true), (NO_ROLLUPS, control)] {
                let started = url_in_schema(db.url(), db.schema()).and_then(|url| {
                    server_rt.block_on(BilledGateway::start(name, Some(url), rollups))
                });
                match started {
                    Ok(gw) => gateways.push(gw),
                    Err(e) => failures.push(e),
                }
            }
        }
        None => println!(
            "PostgreSQL unreachable (see above): skipping the PostgreSQL gateway; the memory gateway runs alone"
        ),
    }

    if failures.is_empty() {
        match measure(settings, server_rt, client_rt, &gateways) {
            Ok(checks) => failures.extend(checks),
            Err(e) => failures.push(e),
        }
    }
    server_rt.block_on(async {
        for gw in gateways {
            let _ = tokio::time::timeout(Duration::from_secs(10), gw.gateway.shutdown()).await;
        }
        if let Some(db) = db {
            db.cleanup().await;
        }
    });

    // Round trips per billed request, on a gateway of their own (not timed).
    if settings.count_requests > 0 {
        if let Err(e) = count_round_trips(settings, server_rt, client_rt) {
            failures.push(e);
        }
    }

    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// The throughput passes and the exactness checks. `Err` for a setup failure; the list of
/// failed checks otherwise.
fn measure(
    settings: &Settings,
    server_rt: &Runtime,
    client_rt: &Runtime,
    gateways: &[BilledGateway],
) -> Result<Vec<String>, String> {
    // One org per gateway, plus, on PostgreSQL, the same load spread over several orgs: a
    // billed request locks its org's account row, so one org's requests queue behind each
    // other's commits while different orgs' do not.
    let mut targets = Vec::new();
    for gw in gateways {
        // The many-org targets, one per gateway of the pair (the rollups' cost is a question
        // of many tenants); the others carry the one-org target.
        let many = match gw.name {
            MANY => Some("postgres"),
            NO_ROLLUPS => Some(NO_ROLLUPS),
            _ => None,
        };
        match many {
            Some(prefix) if settings.orgs > 1 => {
                let name = format!("{prefix}/{}orgs", settings.orgs);
                targets.push(server_rt.block_on(gw.target(name, settings.orgs))?);
            }
            Some(_) => {}
            None => targets.push(server_rt.block_on(gw.target(gw.name.to_owned(), 1))?),
        }
    }
    for target in &targets {
        client_rt.block_on(sanity_check(target))?;
    }
    // At one connection only one org is ever loaded: the light pass runs the one-org targets.
    let light_targets: Vec<Arc<Target>> = targets
        .iter()
        .filter(|t| t.tenants.len() == 1)
        .cloned()
        .collect();

    let heavy = settings.heavy;
    let seconds = |l: &Load, n: usize| (l.warmup + l.duration).as_secs_f64() * n as f64;
    let total = (seconds(&heavy, targets.len())
        + settings
            .light
            .as_ref()
            .map_or(0.0, |l| seconds(l, light_targets.len())))
        * settings.rounds as f64;
    println!(
        "tollgate billed requests (pro plan, GET /api/models/<model>/users/me, cost 1, every request held and charged), loopback:"
    );
    println!(
        "{} round(s) × [{}] × ({:.1} s warm-up + {:.1} s) at {} connections, then as many at 1 connection ({}); about {:.0} s",
        settings.rounds,
        targets
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        heavy.warmup.as_secs_f64(),
        heavy.duration.as_secs_f64(),
        heavy.conns,
        settings.light.map_or_else(
            || "skipped".to_owned(),
            |l| format!("{:.1} s each", l.duration.as_secs_f64())
        ),
        total
    );
    println!(
        "server runtime: {} worker(s) (gateways, sandboxes); client runtime: {} worker(s); {} CPU(s); load average before: {}",
        settings.server_threads,
        settings.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average().unwrap_or_else(|| "n/a".into())
    );
    if let Some(pg) = gateways.iter().find(|g| g.name == "postgres") {
        println!(
            "postgres: fresh schema {}, request-path pools of 32 (one org) and {PAIR_POOL} (each of the many-org pair) connections; server settings: {}",
            pg.schema.as_deref().unwrap_or("?"),
            server_rt
                .block_on(pg.durability())
                .unwrap_or_else(|e| format!("unknown ({e})"))
        );
    }
    if !settings.full {
        println!("(smoke run: `cargo bench --bench billed` runs the full benchmark)");
    }

    let mut balances_before = Vec::new();
    for target in &targets {
        balances_before.push(server_rt.block_on(target.balances())?);
    }

    if let Some(wrk) = find_program("wrk").filter(|_| static_upstream().is_some()) {
        return measure_with_wrk(
            settings,
            server_rt,
            &wrk,
            &targets,
            &light_targets,
            balances_before,
            gateways,
        );
    }
    println!("(wrk or nginx not found: the in-process client and sandbox run instead; `apt-get install -y wrk nginx-light`)");
    let loaded = run_pass(client_rt, &targets, heavy, settings.rounds, STYLE);
    let unloaded = settings
        .light
        .map(|l| run_pass(client_rt, &light_targets, l, settings.rounds, STYLE));

    println!();
    println!("under load ({} connections):", heavy.conns);
    print_table(&loaded, STYLE);
    compare(&loaded);
    if let Some(unloaded) = &unloaded {
        println!();
        println!("light load (1 connection, latency without queueing):");
        print_table(unloaded, STYLE);
        compare(unloaded);
    }
    println!();

    let mut failures = Vec::new();
    for (target, before) in targets.iter().zip(balances_before) {
        let passes = std::iter::once(&loaded).chain(unloaded.as_ref());
        let summaries: Vec<&Summary> = passes
            .filter_map(|p| p.iter().find(|s| s.id == target.name))
            .collect();
        let mut ok = vec![0; target.tenants.len()];
        for s in &summaries {
            for (sum, n) in ok.iter_mut().zip(&s.ok_by_tenant) {
                *sum += n;
            }
            if s.errors.total() > 0 {
                failures.push(format!(
                    "{}: {} errors ({} non-200, {} transport, {} timeouts); e.g. {}",
                    s.name,
                    s.errors.total(),
                    s.errors.status,
                    s.errors.transport,
                    s.errors.timeout,
                    s.errors.samples.join(" | ")
                ));
            }
        }
        match server_rt.block_on(target.check_exact(&before, &ok)) {
            Ok(line) => println!("{line}"),
            Err(e) => failures.push(e),
        }
    }
    for gw in gateways {
        let logger = &gw.gateway.state().logger;
        server_rt.block_on(logger.flush());
        let log = logger.stats();
        println!(
            "{}: request log: {} rows written, {} dropped (queue full), {} failed",
            gw.name, log.written_rows, log.dropped_rows, log.failed_rows
        );
    }
    println!(
        "load average after: {}",
        load_average().unwrap_or_else(|| "n/a".into())
    );
    Ok(failures)
}

// ---------------------------------------------------------------------------------------------
// The gateways and their billed tenants.

/// A gateway on memory or PostgreSQL backends, with its in-process sandbox.
struct BilledGateway {
    name: &'static str,
    gateway: RunningGateway,
    schema: Option<String>,
}

impl BilledGateway {
    /// Starts a gateway (memory backends, or PostgreSQL at `database_url`) whose limits do
    /// not bind.
    async fn start(
        name: &'static str,
        database_url: Option<String>,
        usage_rollups: bool,
    ) -> Result<Self, String> {
        let schema = database_url.as_deref().and_then(schema_of);
        let config = Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream: static_upstream(),
            admin_token: None,
            session_key: database_url.as_ref().map(|_| random_key()),
            database_url,
            demo: false,
            window: Duration::from_millis(1),
            burst: [u32::MAX; 4],
            usage_rollups,
            database_pool_size: if matches!(name, MANY | NO_ROLLUPS) {
                PAIR_POOL
            } else {
                gateway::backends::REQUEST_POOL_SIZE
            },
            ..Config::default()
        };
        let gateway = gateway::start(config)
            .await
            .map_err(|e| format!("{name} gateway: {e}"))?;
        Ok(BilledGateway {
            name,
            gateway,
            schema,
        })
    }

    /// A target of `orgs` fresh billed tenants on this gateway.
    async fn target(&self, name: String, orgs: usize) -> Result<Arc<Target>, String> {
        let addr = self.gateway.local_addr();
        let mut tenants = Vec::with_capacity(orgs);
        for _ in 0..orgs {
            let (org, model, key) = seed(&self.gateway)
                .await
                .map_err(|e| format!("{name}: seeding a billed tenant: {e}"))?;
            let path = format!("/api/models/{model}/users/me");
            let uri = Uri::try_from(path.as_str()).map_err(|e| format!("{path}: {e}"))?;
            let value = |v: &str| HeaderValue::from_str(v).map_err(|e| format!("{name}: {e}"));
            let mut headers = HeaderMap::new();
            headers.insert(HOST, value(&addr.to_string())?);
            headers.insert(HeaderName::from_static("x-api-key"), value(&key)?);
            tenants.push(Tenant { org, uri, headers });
        }
        Ok(Arc::new(Target {
            name,
            addr,
            tenants,
            ledger: Arc::clone(&self.gateway.state().ledger),
        }))
    }

    /// `synchronous_commit` and `fsync` of the server: they bound a single org's billed rate.
    async fn durability(&self) -> Result<String, String> {
        let url = self.gateway.state().config.database_url.clone();
        let url = url.ok_or("no database")?;
        let pool = tollgate_postgres::connect(&url).map_err(|e| e.to_string())?;
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT name, setting FROM pg_settings \
                 WHERE name IN ('synchronous_commit', 'fsync', 'wal_sync_method', 'commit_delay') \
                 ORDER BY name",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows
            .iter()
            .map(|r| format!("{}={}", r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
            .join(", "))
    }
}

/// One billed tenant set up through the gateway's own backends (as its admin API would): an
/// org on `pro` with [`BALANCE`] credits, one model on the gateway's sandbox, one key.
/// Returns the org, the model and the key's secret.
async fn seed(gateway: &RunningGateway) -> Result<(OrgId, String, String), String> {
    // The static upstream takes any session; the sandbox wants one of its accounts.
    let session = match gateway.sandbox() {
        Some(sandbox) => {
            let account = sandbox.add_account();
            Session {
                cookie: account.cookie,
                user_id: account.user_id,
                x_bc: account.x_bc,
                user_agent: account.user_agent,
            }
        }
        None if static_upstream().is_some() => Session {
            cookie: "sess=billed-bench".to_owned(),
            user_id: "1".to_owned(),
            x_bc: "billed-bench-x-bc".to_owned(),
            user_agent: "billed-bench".to_owned(),
        },
        None => return Err("the gateway has no upstream".to_owned()),
    };
    let state = gateway.state();
    let e = |what: &'static str| move |err: tollgate_core::BackendError| format!("{what}: {err}");
    let org = state
        .orgs
        .create("Billed Bench Org".to_owned())
        .await
        .map_err(e("creating the org"))?;
    state
        .ledger
        .subscribe(org, Plan::Pro)
        .await
        .map_err(e("subscribing"))?;
    state
        .keys
        .set_subscription(org, Some(Plan::Pro))
        .await
        .map_err(e("subscribing the keys"))?;
    state
        .ledger
        .set_balance(org, BALANCE)
        .await
        .map_err(e("setting the balance"))?
        .ok_or("setting the balance: unknown org")?;
    let model = state
        .sessions
        .connect(org, "Billed Model".to_owned(), session)
        .await
        .map_err(e("connecting the model"))?;
    state
        .keys
        .add_model(org, model.id)
        .await
        .map_err(e("adding the model"))?;
    let key = state
        .keys
        .create_key(org, "billed".to_owned())
        .await
        .map_err(e("creating the key"))?;
    Ok((org, model.id.to_string(), key.secret))
}

/// A session-encryption key for this run only.
fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key
}

/// `url` with every connection's `search_path` on `schema`: `options=-csearch_path%3D<schema>`
/// in a `postgres://` URL (added to an `options` it already has), `options='…'` in a
/// `key=value` connection string.
fn url_in_schema(url: &str, schema: &str) -> Result<String, String> {
    if !schema
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!("schema {schema:?} is not a plain identifier"));
    }
    let setting = format!("-csearch_path%3D{schema}");
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Ok(format!("{url} options='-csearch_path={schema}'"));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    match pairs.iter_mut().find(|p| p.starts_with("options=")) {
        Some(options) => {
            options.push_str("%20");
            options.push_str(&setting);
        }
        None => pairs.push(format!("options={setting}")),
    }
    Ok(format!("{base}?{}", pairs.join("&")))
}

/// The schema a URL made by [`url_in_schema`] names.
fn schema_of(url: &str) -> Option<String> {
    let at = url.find("search_path")?;
    let rest = &url[at + "search_path".len()..];
    let rest = rest
        .strip_prefix("%3D")
        .or_else(|| rest.strip_prefix('='))?;
    Some(
        rest.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// The client.

/// One billed tenant's request.
struct Tenant {
    org: OrgId,
    uri: Uri,
    /// `host` and the tenant's `x-api-key`.
    headers: HeaderMap,
}

impl Tenant {
    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self.uri.clone();
        req.headers_mut().clone_from(&self.headers);
        req
    }
}

/// What one phase loads: a gateway and its tenants (connection `i` is tenant `i % n`'s), and
/// the ledger that bills them.
struct Target {
    name: String,
    addr: SocketAddr,
    tenants: Vec<Tenant>,
    ledger: Arc<dyn Ledger>,
}

impl Target {
    /// Each tenant's balance.
    async fn balances(&self) -> Result<Vec<u64>, String> {
        let mut out = Vec::with_capacity(self.tenants.len());
        for tenant in &self.tenants {
            out.push(self.balance(tenant.org).await?);
        }
        Ok(out)
    }

    async fn balance(&self, org: OrgId) -> Result<u64, String> {
        let account = self
            .ledger
            .account(org)
            .await
            .map_err(|e| format!("{}: reading the account: {e}", self.name))?
            .ok_or_else(|| format!("{}: the billed org has no account", self.name))?;
        account
            .balance()
            .ok_or_else(|| format!("{}: the billed org is on an unlimited plan", self.name))
    }

    /// The credits still held by this target's orgs once their holds have settled, waiting up
    /// to 5 s for detached releases: each account's own `held` (the
    /// [`open_holds`](Ledger::open_holds) gauge is database-wide as of the last sweep, so it
    /// also counts the holds other gateways on the schema had in flight at that moment).
    async fn settled_holds(&self) -> Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut held = 0;
            for tenant in &self.tenants {
                let account = self
                    .ledger
                    .account(tenant.org)
                    .await
                    .map_err(|e| format!("{}: reading the account: {e}", self.name))?;
                held += account.map_or(0, |a| a.held);
            }
            if held == 0 || Instant::now() >= deadline {
                return Ok(held);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Charged credits == 200s delivered, per org, read from the ledger: the balance fell by
    /// the load's 200s (`ok`, per tenant), and the ledger holds one charge row of 1 credit
    /// with its own request id per 200 (the load's and the sanity check's, which came
    /// before `before` was read). No hold is left open.
    async fn check_exact(&self, before: &[u64], ok: &[u64]) -> Result<String, String> {
        // Settlement runs before the last body byte, so nothing should be open; wait briefly
        // for a detached release anyway, so a straggler shows as what it is.
        let open = self.settled_holds().await?;
        let mut wrong = Vec::new();
        let (mut charged_sum, mut rows_sum, mut ids_sum) = (0u64, 0u64, 0u64);
        for ((tenant, &before), &ok) in self.tenants.iter().zip(before).zip(ok) {
            let after = self.balance(tenant.org).await?;
            let entries = self
                .ledger
                .entries(tenant.org)
                .await
                .map_err(|e| format!("{}: reading the ledger: {e}", self.name))?;
            let charges: Vec<_> = entries
                .iter()
                .filter(|e| e.kind == EntryKind::Charge)
                .collect();
            let credits: i64 = charges
                .iter()
                .map(|e| -(e.delta_plan + e.delta_topup))
                .sum();
            let ids: HashSet<&str> = charges
                .iter()
                .filter_map(|e| e.request_id.as_deref())
                .collect();
            let charged = before.saturating_sub(after);
            let expected_rows = ok + 1;
            charged_sum += charged;
            rows_sum += charges.len() as u64;
            ids_sum += ids.len() as u64;
            if after > before
                || charged != ok
                || charges.len() as u64 != expected_rows
                || credits != expected_rows as i64
                || ids.len() as u64 != expected_rows
            {
                wrong.push(format!(
                    "org {}: {ok} 200s under load, balance {before} → {after}, {} charge rows ({credits} credits, {} request ids) for {expected_rows} 200s",
                    tenant.org,
                    charges.len(),
                    ids.len()
                ));
            }
        }
        let ok_sum: u64 = ok.iter().sum();
        let line = format!(
            "{}: {ok_sum} billed 200s under load over {} org(s); balances fell by {charged_sum}; {rows_sum} charge rows of 1 credit with {ids_sum} distinct request ids for {} 200s (with the sanity checks); {open} credits still held",
            self.name,
            self.tenants.len(),
            ok_sum + self.tenants.len() as u64
        );
        if wrong.is_empty() && open == 0 {
            Ok(format!("{line}: exact"))
        } else {
            Err(format!("NOT EXACT: {line}; {}", wrong.join("; ")))
        }
    }
}

impl Target {
    /// As [`check_exact`](Target::check_exact), for wrk, which counts the 2xx of all tenants
    /// together (`ok`) and not the requests still in flight when it stops (at most `slack`):
    /// per org, one charge row of 1 credit with its own request id per credit the balance
    /// fell (plus the sanity check's); over all orgs, the balances fell by the 2xx wrk
    /// counted and at most `slack` more. No hold is left open.
    async fn check_charged(&self, before: &[u64], ok: u64, slack: u64) -> Result<String, String> {
        let open = self.settled_holds().await?;
        let mut wrong = Vec::new();
        let (mut charged_sum, mut refunds_sum) = (0u64, 0u64);
        for (tenant, &before) in self.tenants.iter().zip(before) {
            let after = self.balance(tenant.org).await?;
            let entries = self
                .ledger
                .entries(tenant.org)
                .await
                .map_err(|e| format!("{}: reading the ledger: {e}", self.name))?;
            let of_kind =
                |kind: EntryKind| -> Vec<_> { entries.iter().filter(|e| e.kind == kind).collect() };
            let (charges, refunds) = (of_kind(EntryKind::Charge), of_kind(EntryKind::Refund));
            let credits = |rows: &[&LedgerEntry]| -> i64 {
                rows.iter()
                    .map(|e| (e.delta_plan + e.delta_topup).abs())
                    .sum()
            };
            // A request whose client left while its charge was being recorded (wrk stopping
            // with requests in flight) was charged and then refunded, with one refund row of
            // the same request id: those count for nothing.
            let refunded: HashSet<&str> = refunds
                .iter()
                .filter_map(|e| e.request_id.as_deref())
                .collect();
            let ids: HashSet<&str> = charges
                .iter()
                .filter_map(|e| e.request_id.as_deref())
                .collect();
            let refunds_match = refunded.len() == refunds.len()
                && refunded.iter().all(|id| ids.contains(id))
                && credits(&refunds) == refunds.len() as i64;
            let net_rows = charges.len().saturating_sub(refunds.len()) as u64;
            let net_credits = credits(&charges) - credits(&refunds);
            let net_ids = ids.difference(&refunded).count() as u64;
            let charged = before.saturating_sub(after);
            charged_sum += charged;
            refunds_sum += refunds.len() as u64;
            let rows = charged + 1;
            // The memory ledger keeps an org's newest MAX_ENTRIES_PER_ORG rows (a long run
            // of the one-org target passes that): the rows it kept must then each be a charge
            // of 1 credit with its own request id, and the balance tells the rest.
            let complete = entries.len() < MAX_ENTRIES_PER_ORG;
            let rows_agree = if complete {
                refunds_match && net_rows == rows && net_credits == rows as i64 && net_ids == rows
            } else {
                credits(&charges) == charges.len() as i64 && ids.len() == charges.len()
            };
            if after > before || !rows_agree {
                wrong.push(format!(
                    "org {}: balance {before} → {after}, {} charge rows ({} credits, {} request ids), {} refund rows ({} credits, {} of charged requests)",
                    tenant.org,
                    charges.len(),
                    credits(&charges),
                    ids.len(),
                    refunds.len(),
                    credits(&refunds),
                    refunded.iter().filter(|id| ids.contains(*id)).count()
                ));
            }
        }
        let line = format!(
            "{}: wrk counted {ok} 2xx over {} org(s); balances fell by {charged_sum} (≤ {slack} in flight when wrk stopped); one charge row of 1 credit with its own request id per credit, net of {refunds_sum} refunds of requests abandoned when wrk stopped; {open} credits still held",
            self.name,
            self.tenants.len()
        );
        if wrong.is_empty()
            && open == 0
            && charged_sum >= ok
            && charged_sum - ok <= slack
            && refunds_sum <= slack
        {
            Ok(format!("{line}: exact"))
        } else {
            Err(format!("NOT EXACT: {line}; {}", wrong.join("; ")))
        }
    }
}

impl driver::Target for Target {
    fn name(&self) -> &str {
        &self.name
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn tenants(&self) -> usize {
        self.tenants.len()
    }

    fn request(&self, tenant: usize) -> Request<Empty<Bytes>> {
        self.tenants[tenant].request()
    }
}

/// One billed request per tenant, checked as a client would: 200, the envelope around the
/// profile, `_meta._credits` saying 1 credit used and a balance.
async fn sanity_check(target: &Target) -> Result<(), String> {
    for tenant in &target.tenants {
        sanity_check_one(target, tenant).await?;
    }
    Ok(())
}

async fn sanity_check_one(target: &Target, tenant: &Tenant) -> Result<(), String> {
    let mut sender = connect(target.addr).await?;
    let (status, body) = match exchange(&mut sender, tenant.request()).await {
        Answer::Done(status, body) => (status, body),
        Answer::Transport(e) => return Err(format!("{}: {e}", target.name)),
        Answer::TimedOut => return Err(format!("{}: timed out", target.name)),
    };
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "{}: {status}, not JSON ({e}): {}",
            target.name,
            String::from_utf8_lossy(&body)
        )
    })?;
    let credits = &v["_meta"]["_credits"];
    if status != StatusCode::OK
        || v["data"]["isAuth"].as_bool() != Some(true)
        || credits["used"].as_u64() != Some(1)
        || !credits["balance"].is_u64()
    {
        return Err(format!(
            "{}: not a billed 200 with the profile: {status} {v}",
            target.name
        ));
    }
    Ok(())
}

/// The PostgreSQL gateway without usage rollups (`Config::usage_rollups = false`).
const NO_ROLLUPS: &str = "postgres-no-rollups";

/// The PostgreSQL gateway of the many-org target with the rollups on (the pair of
/// [`NO_ROLLUPS`]).
const MANY: &str = "postgres-many";

/// The request-path pool of each gateway of the many-org pair; the one-org gateway keeps the
/// default (32): the three, with their admin pools and listeners, stay under the server's 100
/// connections.
const PAIR_POOL: usize = 16;

/// Each PostgreSQL target against memory: the median of each round's own comparison (they
/// ran back to back), the pooled figure beside it.
fn compare(summaries: &[Summary]) {
    let Some(mem) = summaries.iter().find(|s| s.name == "memory") else {
        return;
    };
    for pg in summaries.iter().filter(|s| s.name.starts_with("postgres")) {
        let paired = |f: fn(&RoundFigures, &RoundFigures) -> f64| {
            let per_round: Vec<f64> = pg
                .rounds
                .iter()
                .zip(&mem.rounds)
                .map(|(p, m)| f(p, m))
                .collect();
            (median(&per_round), per_round)
        };
        let (ratio, ratios) = paired(|p, m| p.rps / m.rps);
        let (p50_delta, _) = paired(|p, m| p.p50_ms - m.p50_ms);
        let (p99_delta, _) = paired(|p, m| p.p99_ms - m.p99_ms);
        let per_round = ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        let cpu = match (pg.cpu_us_per_req(), mem.cpu_us_per_req()) {
            (Some(p), Some(m)) => format!("; this process's CPU per request {:+.1} µs", p - m),
            _ => String::new(),
        };
        println!(
            "{} / memory: throughput ratio {ratio:.3} [rounds: {per_round}; pooled {:.3}], p50 {p50_delta:+.3} ms [pooled {:+.3}], p99 {p99_delta:+.3} ms [pooled {:+.3}]{cpu}",
            pg.name,
            pg.stats.rps() / mem.stats.rps(),
            pg.stats.percentile_ms(0.50) - mem.stats.percentile_ms(0.50),
            pg.stats.percentile_ms(0.99) - mem.stats.percentile_ms(0.99),
        );
    }
    let on = summaries
        .iter()
        .find(|s| s.name.starts_with("postgres/") && s.name.ends_with("orgs"));
    let off = summaries.iter().find(|s| s.name.starts_with(NO_ROLLUPS));
    if let (Some(on), Some(off)) = (on, off) {
        let per_round: Vec<f64> = on
            .rounds
            .iter()
            .zip(&off.rounds)
            .map(|(a, b)| a.rps / b.rps)
            .collect();
        let rounds = per_round
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "usage rollups on / off ({} vs {}): throughput ratio {:.3} [rounds: {rounds}; pooled {:.3}]",
            on.name,
            off.name,
            median(&per_round),
            on.stats.rps() / off.stats.rps(),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL round trips per billed request, through a counting proxy.

/// Round trips and executions of one statement.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct StatementCount {
    round_trips: u64,
    executes: u64,
}

/// What the proxy saw, by statement.
#[derive(Debug, Default)]
struct WireCounts {
    by_statement: Mutex<BTreeMap<String, StatementCount>>,
    /// Set when a connection's stream could not be parsed: its later traffic is not counted.
    unparsed_connections: AtomicU64,
}

impl WireCounts {
    fn add(&self, statement: &str, round_trips: u64, executes: u64) {
        let mut map = self
            .by_statement
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = map.entry(label(statement)).or_default();
        entry.round_trips += round_trips;
        entry.executes += executes;
    }

    fn snapshot(&self) -> BTreeMap<String, StatementCount> {
        self.by_statement
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// A statement's text on one line, shortened.
fn label(sql: &str) -> String {
    let one_line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(110) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

/// Counts differences between two snapshots.
fn delta(
    before: &BTreeMap<String, StatementCount>,
    after: &BTreeMap<String, StatementCount>,
) -> Vec<(String, StatementCount)> {
    let mut out: Vec<(String, StatementCount)> = after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                StatementCount {
                    round_trips: a.round_trips - b.round_trips,
                    executes: a.executes - b.executes,
                },
            )
        })
        .filter(|(_, c)| c.round_trips > 0 || c.executes > 0)
        .collect();
    out.sort_by(|a, b| b.1.round_trips.cmp(&a.1.round_trips).then(a.0.cmp(&b.0)));
    out
}

/// Startup-phase request codes that are followed by another untyped message.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Reads the frontend (client → server) side of one PostgreSQL connection.
#[derive(Default)]
struct FrontendParser {
    buf: Vec<u8>,
    /// Past the startup message: every message is `tag, length, body`.
    started: bool,
    broken: bool,
    /// Prepared statements of this connection, by name (`""`: the unnamed one).
    statements: HashMap<Vec<u8>, Arc<str>>,
    /// The statement the last `Bind` bound.
    bound: Option<Arc<str>>,
    /// Executed since the last `Sync`.
    executed: Vec<Arc<str>>,
    /// Parsed (prepared) since the last `Sync`.
    parsed: Vec<Arc<str>>,
}

impl FrontendParser {
    fn feed(&mut self, data: &[u8], counts: &WireCounts) {
        if self.broken {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(data);
        let mut at = 0;
        while let Some(used) = self.message(&buf[at..], counts) {
            at += used;
        }
        if self.broken {
            counts.unparsed_connections.fetch_add(1, Ordering::Relaxed);
            return;
        }
        buf.drain(..at);
        self.buf = buf;
    }

    /// Handles the first complete message of `rest`, returning its length.
    fn message(&mut self, rest: &[u8], counts: &WireCounts) -> Option<usize> {
        if !self.started {
            let len = be_u32(rest.get(..4)?) as usize;
            if len < 8 {
                self.broken = true;
                return None;
            }
            let message = rest.get(..len)?;
            let code = be_u32(&message[4..8]);
            if code != SSL_REQUEST && code != GSSENC_REQUEST {
                self.started = true;
            }
            return Some(len);
        }
        let len = be_u32(rest.get(1..5)?) as usize;
        if len < 4 {
            self.broken = true;
            return None;
        }
        let message = rest.get(..1 + len)?;
        let body = &message[5..];
        match message[0] {
            b'Q' => {
                let (sql, _) = cstr(body);
                counts.add(&String::from_utf8_lossy(sql), 1, 1);
            }
            b'P' => {
                let (name, rest) = cstr(body);
                let (sql, _) = cstr(rest);
                let sql: Arc<str> = Arc::from(String::from_utf8_lossy(sql).as_ref());
                self.statements.insert(name.to_vec(), Arc::clone(&sql));
                self.parsed.push(sql);
            }
            b'B' => {
                let (_portal, rest) = cstr(body);
                let (name, _) = cstr(rest);
                self.bound = self.statements.get(name).cloned();
            }
            b'E' => {
                let statement = self
                    .bound
                    .clone()
                    .unwrap_or_else(|| Arc::from("<unknown statement>"));
                self.executed.push(statement);
            }
            b'S' => {
                // One round trip: the client waits for ReadyForQuery.
                if let Some((first, others)) = self.executed.split_first() {
                    counts.add(first, 1, 1);
                    for other in others {
                        counts.add(other, 0, 1);
                    }
                } else if let Some(first) = self.parsed.first() {
                    counts.add(&format!("(prepare) {first}"), 1, 0);
                } else {
                    counts.add("(sync only)", 1, 0);
                }
                self.executed.clear();
                self.parsed.clear();
            }
            _ => {}
        }
        Some(1 + len)
    }
}

fn be_u32(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(b)
}

/// A NUL-terminated string at the start of `bytes`, and what follows it.
fn cstr(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == 0) {
        Some(end) => (&bytes[..end], &bytes[end + 1..]),
        None => (bytes, &[]),
    }
}

/// A TCP proxy to PostgreSQL that counts what clients send.
struct CountingProxy {
    addr: SocketAddr,
    counts: Arc<WireCounts>,
    accept: JoinHandle<()>,
}

impl CountingProxy {
    async fn start(upstream: String) -> std::io::Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(WireCounts::default());
        let shared = Arc::clone(&counts);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let upstream = upstream.clone();
                let counts = Arc::clone(&shared);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut client_rd, mut client_wr) = client.into_split();
                    let (mut server_rd, mut server_wr) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
                        let _ = client_wr.shutdown().await;
                    });
                    let mut parser = FrontendParser::default();
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match client_rd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        parser.feed(&buf[..n], &counts);
                        if server_wr.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_wr.shutdown().await;
                    let _ = down.await;
                });
            }
        });
        Ok(CountingProxy {
            addr,
            counts,
            accept,
        })
    }
}

/// `host:port` of a `postgres://` URL, and the URL with them replaced by `to`. `None` for a
/// `key=value` string or several hosts.
fn reroute(url: &str, to: SocketAddr) -> Option<(String, String)> {
    let scheme_end = url.find("://")? + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    let hostport = &authority[host_start..];
    if hostport.is_empty() || hostport.contains(',') {
        return None;
    }
    let upstream = if hostport.starts_with('[') {
        if hostport.contains("]:") {
            hostport.to_owned()
        } else {
            format!("{hostport}:5432")
        }
    } else if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let rerouted = format!(
        "{}{}{}{}",
        &url[..scheme_end],
        &authority[..host_start],
        to,
        &rest[authority_end..]
    );
    Some((upstream, rerouted))
}

/// Rows inserted, updated and deleted per table of `schema`, from `pg_stat_user_tables`.
type TableWrites = BTreeMap<String, [i64; 3]>;

async fn table_writes(db: &TestDb) -> Result<TableWrites, String> {
    let client = db.pool().get().await.map_err(|e| e.to_string())?;
    let schema = db.schema();
    let rows = client
        .query(
            "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_del \
             FROM pg_stat_user_tables WHERE schemaname = $1",
            &[&schema],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), [r.get(1), r.get(2), r.get(3)]))
        .collect())
}

/// `pg_stat_user_tables` once the server has published what its backends did. A backend
/// publishes its counters when it goes idle, but at most once a second, and otherwise only
/// after 10 s more of idleness (`PGSTAT_IDLE_INTERVAL`): so wait 11 s, then read until two
/// readings a second apart agree (at most 25 s in all).
async fn settled_table_writes(db: &TestDb) -> Result<TableWrites, String> {
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut last = table_writes(db).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = table_writes(db).await?;
        if now == last || start.elapsed() > Duration::from_secs(25) {
            return Ok(now);
        }
        last = now;
    }
}

fn count_round_trips(
    settings: &Settings,
    server_rt: &Runtime,
    client_rt: &Runtime,
) -> Result<(), String> {
    let Some(db) = server_rt.block_on(TestDb::new()) else {
        println!("PostgreSQL unreachable: round trips per billed request not measured");
        return Ok(());
    };
    let result = count_in(settings, server_rt, client_rt, &db);
    server_rt.block_on(db.cleanup());
    result
}

fn count_in(
    settings: &Settings,
    server_rt: &Runtime,
    client_rt: &Runtime,
    db: &TestDb,
) -> Result<(), String> {
    let url = url_in_schema(db.url(), db.schema())?;
    // The proxy's address is only known once it listens: reroute to a placeholder first to
    // learn the upstream, then for real.
    let Some((upstream, _)) = reroute(&url, SocketAddr::from(([127, 0, 0, 1], 0))) else {
        println!(
            "round trips per billed request not measured: DATABASE_URL is not a single-host postgres:// URL"
        );
        return Ok(());
    };
    let proxy = server_rt
        .block_on(CountingProxy::start(upstream))
        .map_err(|e| format!("counting proxy: {e}"))?;
    let (_, proxied_url) =
        reroute(&url, proxy.addr).ok_or("counting proxy: rerouting the URL failed")?;
    let gw = server_rt.block_on(BilledGateway::start("postgres", Some(proxied_url), true))?;
    let result = server_rt
        .block_on(gw.target("postgres (counted)".to_owned(), 1))
        .and_then(|target| {
            count_with(
                settings,
                server_rt,
                client_rt,
                db,
                &gw,
                &target,
                &proxy.counts,
            )
        });
    server_rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(10), gw.gateway.shutdown()).await;
    });
    proxy.accept.abort();
    result
}

fn count_with(
    settings: &Settings,
    server_rt: &Runtime,
    client_rt: &Runtime,
    db: &TestDb,
    gw: &BilledGateway,
    target: &Arc<Target>,
    counts: &WireCounts,
) -> Result<(), String> {
    let n = settings.count_requests;
    let conns = settings.heavy.conns;
    println!();
    println!(
        "PostgreSQL round trips: a third gateway (fresh schema {}) through a counting proxy; warm-up, an idle interval, then exactly {n} billed requests at {conns} connections",
        db.schema(),
    );
    client_rt.block_on(sanity_check(target))?;
    let balances_before = server_rt.block_on(target.balances())?;
    // Warm-up: every pooled connection opened and its statements prepared, as in the timed
    // runs.
    let warm = Load {
        conns,
        warmup: Duration::ZERO,
        duration: settings.heavy.warmup.max(Duration::from_millis(500)),
    };
    let warm_phase = client_rt.block_on(driver::drive(Arc::clone(target), warm, None));
    let settle = || {
        server_rt.block_on(async {
            gw.gateway.state().logger.flush().await;
            let deadline = Instant::now() + Duration::from_secs(5);
            while gw.gateway.state().ledger.open_holds() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    settle();

    // What the gateway does with no traffic at all (background jobs, listener heartbeats),
    // while the server publishes the warm-up's table counters.
    let idle_before = counts.snapshot();
    let idle_started = Instant::now();
    let writes_before = server_rt.block_on(settled_table_writes(db))?;
    let idle_secs = idle_started.elapsed().as_secs_f64();
    let idle = delta(&idle_before, &counts.snapshot());
    let idle_trips: u64 = idle.iter().map(|(_, c)| c.round_trips).sum();

    let before = counts.snapshot();
    let started = Instant::now();
    let load = Load {
        conns,
        warmup: Duration::ZERO,
        duration: Duration::from_secs(600),
    };
    let budget = Arc::new(AtomicU64::new(n));
    let phase = client_rt.block_on(driver::drive(Arc::clone(target), load, Some(budget)));
    settle();
    let elapsed = started.elapsed();
    let during = delta(&before, &counts.snapshot());
    let writes_after = server_rt.block_on(settled_table_writes(db))?;

    let mut failures = Vec::new();
    for (what, p) in [("warm-up", &warm_phase), ("counted", &phase)] {
        if p.errors.total() > 0 {
            failures.push(format!(
                "{}, {what}: {} errors; e.g. {}",
                target.name,
                p.errors.total(),
                p.errors.samples.join(" | ")
            ));
        }
    }
    if phase.ok_total != n {
        failures.push(format!(
            "{}: {} of {n} requests got a 200",
            target.name, phase.ok_total
        ));
    }
    let unparsed = counts.unparsed_connections.load(Ordering::Relaxed);
    if unparsed > 0 {
        failures.push(format!(
            "counting proxy: {unparsed} connection(s) could not be parsed; counts are incomplete"
        ));
    }

    let per = |x: u64| x as f64 / n.max(1) as f64;
    let trips: u64 = during.iter().map(|(_, c)| c.round_trips).sum();
    let idle_share = idle_trips as f64 * elapsed.as_secs_f64() / idle_secs.max(1e-3);
    println!(
        "{n} billed requests in {:.2} s ({:.0} req/s through the proxy: not a throughput figure)",
        elapsed.as_secs_f64(),
        phase.stats.rps()
    );
    println!(
        "PostgreSQL round trips per billed request: {:.3} ({trips} in all; with no traffic the gateway made {idle_trips} in {idle_secs:.1} s, i.e. ≈{idle_share:.1} of them are background)",
        per(trips),
    );
    println!("  {:>9} {:>9}  statement", "trips/req", "execs/req");
    for (statement, c) in &during {
        println!(
            "  {:>9.4} {:>9.4}  {statement}",
            per(c.round_trips),
            per(c.executes)
        );
    }
    if !idle.is_empty() {
        println!("  with no traffic ({idle_secs:.1} s), in all:");
        for (statement, c) in &idle {
            println!("  {:>9} {:>9}  {statement}", c.round_trips, c.executes);
        }
    }
    println!("rows written per billed request (pg_stat_user_tables of that schema):");
    println!(
        "  {:>9} {:>9} {:>9}  table",
        "inserted", "updated", "deleted"
    );
    for (table, after) in &writes_after {
        let before = writes_before.get(table).copied().unwrap_or_default();
        let d: Vec<i64> = (0..3).map(|i| after[i] - before[i]).collect();
        if d.iter().any(|&x| x != 0) {
            let per = |x: i64| x as f64 / n.max(1) as f64;
            println!(
                "  {:>9.4} {:>9.4} {:>9.4}  {table}",
                per(d[0]),
                per(d[1]),
                per(d[2])
            );
        }
    }
    let ok: Vec<u64> = warm_phase
        .ok_by_tenant
        .iter()
        .zip(&phase.ok_by_tenant)
        .map(|(a, b)| a + b)
        .collect();
    match server_rt.block_on(target.check_exact(&balances_before, &ok)) {
        Ok(line) => println!("{line}"),
        Err(e) => failures.push(e),
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

// ---------------------------------------------------------------------------------------------
// The static upstream (nginx) and the load generator (wrk).

/// The static upstream's base URL, once [`Nginx`] runs; `None`: the in-process sandbox.
static UPSTREAM: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn static_upstream() -> Option<String> {
    UPSTREAM.get().cloned()
}

/// Where a program is: `$PATH`, then `/usr/sbin` and `/usr/bin`.
fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The upstream's answer to every request: a ~1 KB JSON profile (`isAuth: true`, as the
/// sanity check wants), the same bytes each time.
fn static_body() -> String {
    let mut about = String::new();
    while about.len() < 800 {
        about.push_str("a static upstream answer for the billed benchmark; ");
    }
    serde_json::json!({
        "id": 1,
        "isAuth": true,
        "name": "Billed Bench",
        "username": "billed",
        "about": about.trim_end(),
    })
    .to_string()
}

/// nginx serving [`static_body`] on a loopback port, from a temporary prefix; stopped on drop.
struct Nginx {
    child: std::process::Child,
    dir: std::path::PathBuf,
    url: String,
}

impl Nginx {
    fn start(binary: &std::path::Path) -> Result<Nginx, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("nginx: a free port: {e}"))?
            .port();
        let dir =
            std::env::temp_dir().join(format!("tollgate-billed-nginx-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| format!("nginx: {e}"))?;
        let body = static_body();
        assert!(!body.contains('\'') && !body.contains('$'));
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 120s;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      default_type application/json;\n\
                   return 200 '{body}';\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|e| format!("nginx: {e}"))?;
        let child = std::process::Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("nginx: {e}"))?;
        let mut nginx = Nginx {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || nginx.child.try_wait().ok().flatten().is_some() {
                let log =
                    std::fs::read_to_string(nginx.dir.join("logs/error.log")).unwrap_or_default();
                return Err(format!("nginx did not start: {log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one wrk run reported.
#[derive(Debug, Clone, Copy, Default)]
struct WrkRun {
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `1.23ms`, `456.78us`, `1.50s` as ms.
fn wrk_ms(text: &str) -> Option<f64> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

fn parse_wrk(out: &str) -> Result<WrkRun, String> {
    let mut run = WrkRun::default();
    let mut seen_rps = false;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => run.p50_ms = wrk_ms(v).unwrap_or(f64::NAN),
            ["99%", v] => run.p99_ms = wrk_ms(v).unwrap_or(f64::NAN),
            [n, "requests", "in", ..] => run.requests = n.parse().unwrap_or(0),
            ["Requests/sec:", v] => {
                run.rps = v.parse().unwrap_or(0.0);
                seen_rps = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => run.non_2xx = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                run.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    if seen_rps {
        Ok(run)
    } else {
        Err(format!("wrk printed no Requests/sec:\n{out}"))
    }
}

/// A Lua script sending each tenant's request in turn (per wrk thread).
fn wrk_script(target: &Target, dir: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let mut lua = String::from("local reqs = {}\n");
    for t in &target.tenants {
        let key = t
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        lua.push_str(&format!(
            "reqs[#reqs + 1] = wrk.format(\"GET\", \"{}\", {{ [\"x-api-key\"] = \"{}\" }})\n",
            t.uri, key
        ));
    }
    lua.push_str("local i = 0\nrequest = function()\n  i = i % #reqs + 1\n  return reqs[i]\nend\n");
    let path = dir.join(format!(
        "{}.lua",
        target
            .name
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    ));
    std::fs::write(&path, lua).map_err(|e| format!("wrk script: {e}"))?;
    Ok(path)
}

fn run_wrk(
    wrk: &std::path::Path,
    target: &Target,
    script: &std::path::Path,
    conns: usize,
    duration: Duration,
) -> Result<WrkRun, String> {
    let threads = conns.min(2);
    let out = std::process::Command::new(wrk)
        .arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        // Debian's wrk 4.1 takes whole seconds, minutes or hours only (no `ms`).
        .arg(format!(
            "-d{}s",
            duration.as_secs_f64().ceil().max(1.0) as u64
        ))
        .arg("--latency")
        .arg("--timeout")
        .arg("10s")
        .arg("-s")
        .arg(script)
        .arg(format!("http://{}", target.addr))
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(&text)
}

/// One target's wrk rounds.
struct WrkSummary {
    name: String,
    rounds: Vec<WrkRun>,
    /// 2xx counted by wrk over every run (warm-ups included), and the runs.
    ok: u64,
    runs: u64,
    errors: u64,
}

/// `rounds` paired rounds (every other one backwards) of each target: a warm-up run, then a
/// recorded one.
fn wrk_pass(
    wrk: &std::path::Path,
    targets: &[Arc<Target>],
    load: Load,
    rounds: usize,
    dir: &std::path::Path,
    settle: &dyn Fn(),
) -> Result<Vec<WrkSummary>, String> {
    let scripts = targets
        .iter()
        .map(|t| wrk_script(t, dir))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out: Vec<WrkSummary> = targets
        .iter()
        .map(|t| WrkSummary {
            name: t.name.clone(),
            rounds: Vec::new(),
            ok: 0,
            runs: 0,
            errors: 0,
        })
        .collect();
    for round in 1..=rounds {
        let order: Vec<usize> = if round % 2 == 1 {
            (0..targets.len()).collect()
        } else {
            (0..targets.len()).rev().collect()
        };
        for i in order {
            let (t, s) = (&targets[i], &mut out[i]);
            settle();
            let mut runs = Vec::new();
            if !load.warmup.is_zero() {
                runs.push(run_wrk(wrk, t, &scripts[i], load.conns, load.warmup)?);
            }
            let run = run_wrk(wrk, t, &scripts[i], load.conns, load.duration)?;
            runs.push(run);
            for r in &runs {
                s.ok += r.requests - r.non_2xx.min(r.requests);
                s.errors += r.non_2xx + r.socket_errors;
                s.runs += 1;
            }
            println!(
                "  {:>2} conn(s), round {round:>2}  {:<17} {:>8.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  non-2xx {}  socket errors {}",
                load.conns, t.name, run.rps, run.p50_ms, run.p99_ms, run.non_2xx, run.socket_errors
            );
            s.rounds.push(run);
        }
    }
    Ok(out)
}

/// The table of a wrk pass, then each PostgreSQL target against memory: the median of each
/// round's own ratio (they ran back to back).
fn wrk_report(summaries: &[WrkSummary]) {
    println!(
        "{:<17} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "target", "req/s", "", "p50 ms", "p99 ms", "errors"
    );
    for s in summaries {
        let rps: Vec<f64> = s.rounds.iter().map(|r| r.rps).collect();
        let p50: Vec<f64> = s.rounds.iter().map(|r| r.p50_ms).collect();
        let p99: Vec<f64> = s.rounds.iter().map(|r| r.p99_ms).collect();
        println!(
            "{:<17} {:>10.0} {:>10} {:>9.3} {:>9.3} {:>8}",
            s.name,
            median(&rps),
            "(median)",
            median(&p50),
            median(&p99),
            s.errors
        );
    }
    let Some(mem) = summaries.iter().find(|s| s.name == "memory") else {
        return;
    };
    for pg in summaries.iter().filter(|s| s.name.starts_with("postgres")) {
        let ratios: Vec<f64> = pg
            .rounds
            .iter()
            .zip(&mem.rounds)
            .map(|(p, m)| p.rps / m.rps)
            .collect();
        let p99: Vec<f64> = pg.rounds.iter().map(|r| r.p99_ms).collect();
        println!(
            "{} / memory: throughput ratio {:.3} [rounds: {}]; p99 {:.3} ms (median of rounds; max {:.3})",
            pg.name,
            median(&ratios),
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            median(&p99),
            p99.iter().copied().fold(f64::NAN, f64::max),
        );
    }
    // The usage rollups' cost: the same PostgreSQL gateway with and without them, over the
    // same orgs' load, paired by round.
    let on = summaries
        .iter()
        .find(|s| s.name.starts_with("postgres/") && s.name.ends_with("orgs"));
    let off = summaries.iter().find(|s| s.name.starts_with(NO_ROLLUPS));
    if let (Some(on), Some(off)) = (on, off) {
        let ratios: Vec<f64> = on
            .rounds
            .iter()
            .zip(&off.rounds)
            .map(|(a, b)| a.rps / b.rps)
            .collect();
        let total = |s: &WrkSummary| s.rounds.iter().map(|r| r.rps).sum::<f64>();
        println!(
            "usage rollups on / off ({} vs {}): throughput ratio {:.3} [rounds: {}; pooled {:.3}]",
            on.name,
            off.name,
            median(&ratios),
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            total(on) / total(off),
        );
    }
}
