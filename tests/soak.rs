//! A bounded soak of two gateway replicas on one PostgreSQL (and Redis, when reachable): mixed
//! customer traffic for `TOLLGATE_SOAK_SECS` (default 600) with upstream faults, client
//! hang-ups and PostgreSQL outages, then an audit of the money and of the processes' memory.
//!
//! Not part of CI (it is `#[ignore]`d). Run it with the release binary:
//!
//! ```sh
//! cargo build --release --example gateway
//! TOLLGATE_SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! PostgreSQL outages go through a TCP proxy in front of the server (every connection cut,
//! new ones refused, for 5 s), which the gateways cannot tell from a restart;
//! `TOLLGATE_SOAK_RESTART_POSTGRES=1` restarts the real server instead (`pg_ctlcluster`; only
//! on a machine nothing else uses it on).
//!
//! At the end: every 200 the clients read whole has exactly one charge row of the amount its
//! envelope reported; every refusal they read has none; every charge row belongs to a request
//! that was delivered (or whose client hung up after the gateway had sent it all — counted
//! and shown); Σ charges equals the balance's change; no hold is open; and each replica's
//! resident memory after warm-up stays within 25 % of where it was.

mod support_proc;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tokio::task::JoinSet;

use tollgate::sandbox::{sandbox_rules, Fault, FaultMode, Sandbox};
use tollgate_postgres::testing::TestDb;

use support_proc::{
    postgres_addr, session_key, shared_redis, url_in_schema, url_via, Gateway, GatewayEnv, Http,
    LogDir, TcpProxy,
};

/// Seconds into the run, and each replica's resident memory in KiB.
type RssSample = (f64, [u64; 2]);

/// What a client saw of one request.
#[derive(Debug, Clone)]
enum Seen {
    /// A 200 read whole, with the credits its envelope says were used.
    Delivered(u64),
    /// Any other answer, read whole.
    Refused(u16, String),
    /// The client gave up before the answer was whole.
    HungUp,
}

struct Route {
    method: Method,
    path: &'static str,
}

const ROUTES: &[Route] = &[
    Route {
        method: Method::GET,
        path: "/users/me",
    },
    Route {
        method: Method::GET,
        path: "/chats",
    },
    Route {
        method: Method::GET,
        path: "/payouts/stats",
    },
    Route {
        method: Method::POST,
        path: "/chats/42/messages",
    },
    Route {
        method: Method::GET,
        path: "/fans/info",
    },
];

fn env_secs(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A cheap deterministic generator (no dependency): xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn restart_postgres() {
    let versions = std::fs::read_dir("/etc/postgresql").expect("/etc/postgresql");
    let version = versions
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a PostgreSQL cluster");
    let status = tokio::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .await
        .expect("pg_ctlcluster runs");
    assert!(status.success(), "PostgreSQL restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a soak of several minutes: cargo test --release --test soak -- --ignored"]
async fn two_replicas_stay_exact_and_flat_under_faults() {
    let secs = env_secs("TOLLGATE_SOAK_SECS", 600);
    let workers = env_secs("TOLLGATE_SOAK_WORKERS", 16) as usize;
    let real_restart = std::env::var("TOLLGATE_SOAK_RESTART_POSTGRES").as_deref() == Ok("1");
    let db = TestDb::new().await.expect("PostgreSQL for the soak");
    let logs = LogDir::new("soak");
    let proxy = TcpProxy::start_new(&postgres_addr(db.url())).await;
    let db_url = url_via(&url_in_schema(db.url(), db.schema()), proxy.addr());

    let sandbox = Sandbox::new(sandbox_rules());
    let upstream = sandbox.bind("127.0.0.1:0").await.unwrap();
    let accounts: Vec<_> = (0..4).map(|_| sandbox.add_account()).collect();
    let mut env = GatewayEnv::new(&upstream.base_url())
        .database(&db_url, &session_key())
        // A one-second window: hundreds of requests a second per model, with some 429s.
        .set("TOLLGATE_WINDOW_MS", "1000")
        .set("TOLLGATE_BURST", "pro=120")
        .set("TOLLGATE_UPSTREAM_TIMEOUT_MS", "3000")
        .set("TOLLGATE_HOLD_TTL_MS", "30000")
        .set("RUST_LOG", "warn");
    if let Some(redis) = shared_redis().await {
        env = env.set("REDIS_URL", &redis);
    }
    let (a, b) = tokio::join!(
        Gateway::start("A", &env, &logs),
        Gateway::start("B", &env, &logs)
    );
    let http = Http::new();

    // One pro org with a large balance, four models, two keys.
    let org = http
        .admin(
            Method::POST,
            a.url("/admin/orgs"),
            Some(json!({"name": "soak"})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (method, path, body) in [
        (
            Method::PUT,
            format!("/admin/orgs/{org}/subscription"),
            json!({"plan": "pro"}),
        ),
        (
            Method::PUT,
            format!("/admin/orgs/{org}/credits"),
            json!({"balance": 10_000_000}),
        ),
    ] {
        let answer = http.admin(method, a.url(&path), Some(body)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    let mut models = Vec::new();
    for (i, acct) in accounts.iter().enumerate() {
        let answer = http
            .admin(
                Method::POST,
                a.url(&format!("/admin/orgs/{org}/models")),
                Some(json!({"name": format!("m{i}"), "session": {
                    "cookie": acct.cookie, "user_id": acct.user_id,
                    "x_bc": acct.x_bc, "user_agent": acct.user_agent}})),
            )
            .await;
        models.push(answer.json()["id"].as_str().unwrap().to_owned());
    }
    let mut keys = Vec::new();
    for i in 0..2 {
        let answer = http
            .admin(
                Method::POST,
                a.url(&format!("/admin/orgs/{org}/keys")),
                Some(json!({"name": format!("k{i}")})),
            )
            .await;
        keys.push(answer.json()["key"].as_str().unwrap().to_owned());
    }
    let org_uuid: uuid::Uuid = org.parse().unwrap();
    let start_balance = balance(&db, org_uuid).await;

    let deadline = Instant::now() + Duration::from_secs(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    let sent = Arc::new(AtomicU64::new(0));
    let bases = Arc::new([a.url(""), b.url("")]);
    let models = Arc::new(models);
    let keys = Arc::new(keys);

    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let (http, stop, seen, sent) = (http.clone(), stop.clone(), seen.clone(), sent.clone());
        let (bases, models, keys) = (bases.clone(), models.clone(), keys.clone());
        tasks.spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("soak-{w}-{i}");
                let route = &ROUTES[rng.below(ROUTES.len() as u64) as usize];
                let url = format!(
                    "{}/api/models/{}{}",
                    bases[rng.below(2) as usize],
                    models[rng.below(models.len() as u64) as usize],
                    route.path
                );
                let mut req = Request::builder()
                    .method(route.method.clone())
                    .uri(url)
                    .header("x-api-key", &keys[rng.below(2) as usize])
                    .header("x-request-id", &id);
                let body = if route.method == Method::POST {
                    req = req.header("content-type", "application/json");
                    Bytes::from_static(br#"{"text":"soak"}"#)
                } else {
                    Bytes::new()
                };
                let req = req.body(Full::new(body)).unwrap();
                // One request in twenty hangs up after 0-40 ms.
                let patience = if rng.below(20) == 0 {
                    Duration::from_millis(rng.below(40))
                } else {
                    Duration::from_secs(30)
                };
                sent.fetch_add(1, Ordering::Relaxed);
                let outcome = match tokio::time::timeout(patience, http.try_send(req)).await {
                    Ok(Ok(answer)) if answer.status == StatusCode::OK => {
                        let used = answer.json()["_meta"]["_credits"]["used"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("{id}: no credits in {}", answer.text()));
                        Seen::Delivered(used)
                    }
                    Ok(Ok(answer)) => Seen::Refused(answer.status.as_u16(), answer.code()),
                    Ok(Err(_)) | Err(_) => Seen::HungUp,
                };
                seen.lock().unwrap().insert(id, outcome);
            }
        });
    }

    // Upstream faults every few seconds.
    {
        let (sandbox, stop) = (sandbox.clone(), stop.clone());
        tasks.spawn(async move {
            let mut rng = Rng(42);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(2_000 + rng.below(3_000))).await;
                let mode = match rng.below(5) {
                    0 => FaultMode::Fail(StatusCode::INTERNAL_SERVER_ERROR),
                    1 => FaultMode::Stall(Duration::from_millis(1_500)),
                    2 => FaultMode::CutBody,
                    3 => FaultMode::NonJson,
                    _ => FaultMode::Throttle {
                        retry_after_secs: 1,
                    },
                };
                sandbox.inject(Fault {
                    count: 3,
                    ..Fault::new(mode)
                });
            }
        });
    }

    // Resident memory of both replicas every 5 s.
    let pids = [a.pid(), b.pid()];
    let rss: Arc<Mutex<Vec<RssSample>>> = Arc::default();
    {
        let (rss, stop) = (rss.clone(), stop.clone());
        let began = Instant::now();
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sample = [rss_kib(pids[0]).unwrap_or(0), rss_kib(pids[1]).unwrap_or(0)];
                rss.lock()
                    .unwrap()
                    .push((began.elapsed().as_secs_f64(), sample));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }

    // PostgreSQL goes away for 5 s every quarter of the run.
    let mut outages = 0;
    let quarter = Duration::from_secs(secs / 4).max(Duration::from_secs(20));
    while Instant::now() + quarter < deadline {
        tokio::time::sleep(quarter).await;
        outages += 1;
        if real_restart {
            restart_postgres().await;
        } else {
            proxy.stop().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            proxy.start().await;
        }
        eprintln!("soak: PostgreSQL outage {outages} over");
    }
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}

    // Holds left by the outages and hang-ups are released (by the releasers' retries, or
    // at worst by the sweeper after the 30 s TTL).
    let settled_by = Instant::now() + Duration::from_secs(120);
    loop {
        let (open, held) = holds(&db, org_uuid).await;
        if open == 0 && held == 0 {
            break;
        }
        assert!(
            Instant::now() < settled_by,
            "{open} holds ({held} credits) still open"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The audit.
    let charges = charge_rows(&db, org_uuid).await;
    let seen = seen.lock().unwrap().clone();
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let (mut delivered, mut delivered_credits, mut hung_up, mut hung_up_charged) = (0, 0, 0, 0);
    for (id, outcome) in &seen {
        match outcome {
            Seen::Delivered(used) => {
                delivered += 1;
                delivered_credits += used;
                assert_eq!(
                    charges.get(id),
                    Some(used),
                    "{id}: delivered with {used} credits used"
                );
            }
            Seen::Refused(status, code) => {
                *codes.entry(format!("{status} {code}")).or_default() += 1;
                assert_eq!(
                    charges.get(id),
                    None,
                    "{id}: refused ({status} {code}) but charged"
                );
            }
            Seen::HungUp => {
                hung_up += 1;
                if charges.contains_key(id) {
                    hung_up_charged += 1;
                }
            }
        }
    }
    for id in charges.keys() {
        assert!(
            matches!(seen.get(id), Some(Seen::Delivered(_) | Seen::HungUp)),
            "{id} was charged but no client saw it delivered"
        );
    }
    let charged: u64 = charges.values().sum();
    let end_balance = balance(&db, org_uuid).await;
    assert_eq!(
        start_balance - end_balance,
        charged,
        "the balance moved by what was charged"
    );
    assert_eq!(
        charged,
        delivered_credits + hung_up_charged_credits(&seen, &charges),
        "charged = Σ cost of delivered 2xx"
    );

    let samples = rss.lock().unwrap().clone();
    let warm = samples.len() / 5;
    let after_warm_up = samples[warm].1;
    let last = samples.last().unwrap().1;
    let total = sent.load(Ordering::Relaxed);
    eprintln!(
        "soak: {secs} s, {workers} workers, {total} requests ({:.0}/s), {delivered} delivered \
         ({delivered_credits} credits), {hung_up} hung up ({hung_up_charged} of them charged: \
         the gateway had sent everything), {outages} PostgreSQL outages",
        total as f64 / secs as f64
    );
    eprintln!("soak: refusals {codes:?}");
    eprintln!("soak: charged (net of refunds) {charged} = balance {start_balance} → {end_balance}; holds open 0");
    eprintln!(
        "soak: RSS KiB A {} → {} , B {} → {} (after warm-up → end); samples {:?}",
        after_warm_up[0],
        last[0],
        after_warm_up[1],
        last[1],
        samples
            .iter()
            .step_by((samples.len() / 12).max(1))
            .map(|(t, s)| (*t as u64, s[0], s[1]))
            .collect::<Vec<_>>()
    );
    for r in 0..2 {
        assert!(
            last[r] as f64 <= after_warm_up[r] as f64 * 1.25,
            "replica {r}: RSS grew from {} to {} KiB",
            after_warm_up[r],
            last[r]
        );
    }
    assert!(delivered > 0 && !codes.is_empty());
    drop((a, b));
    upstream.shutdown().await;
    db.cleanup().await;
}

fn hung_up_charged_credits(seen: &HashMap<String, Seen>, charges: &HashMap<String, u64>) -> u64 {
    seen.iter()
        .filter(|(_, s)| matches!(s, Seen::HungUp))
        .filter_map(|(id, _)| charges.get(id))
        .sum()
}

async fn balance(db: &TestDb, org: uuid::Uuid) -> u64 {
    let client = db.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT plan_credits + topup_credits FROM tollgate_credit_accounts WHERE org = $1",
            &[&org],
        )
        .await
        .unwrap();
    u64::try_from(row.get::<_, i64>(0)).unwrap()
}

async fn holds(db: &TestDb, org: uuid::Uuid) -> (i64, i64) {
    let client = db.pool().get().await.unwrap();
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM tollgate_credit_holds WHERE org = $1 AND forget_at_ms IS NULL",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    let held: i64 = client
        .query_one(
            "SELECT held FROM tollgate_credit_accounts WHERE org = $1",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    (open, held)
}

/// request id → credits charged net of refunds (a refund gives back the charge of a
/// request whose response was withheld), asserting no request was charged twice.
async fn charge_rows(db: &TestDb, org: uuid::Uuid) -> HashMap<String, u64> {
    let client = db.pool().get().await.unwrap();
    let rows = client
        .query(
            "SELECT request_id, kind, -(delta_plan + delta_topup) FROM tollgate_credit_ledger \
             WHERE org = $1 AND kind IN ('charge', 'refund') ORDER BY id",
            &[&org],
        )
        .await
        .unwrap();
    let mut net: HashMap<String, i64> = HashMap::new();
    let mut charged_once = std::collections::HashSet::new();
    let mut refunds = 0;
    for row in rows {
        let id: Option<String> = row.get(0);
        let id = id.expect("every charge and refund row has its request id");
        let kind: &str = row.get(1);
        if kind == "charge" {
            assert!(charged_once.insert(id.clone()), "{id} charged twice");
        } else {
            refunds += 1;
        }
        *net.entry(id).or_default() += row.get::<_, i64>(2);
    }
    eprintln!("soak: {refunds} refunds of charges whose responses were withheld");
    net.into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|(id, n)| {
            (
                id,
                u64::try_from(n).expect("never refunded more than charged"),
            )
        })
        .collect()
}
