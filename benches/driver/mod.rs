//! The load-driving code `benches/load.rs` and `benches/billed.rs` share: keep-alive client
//! connections, timed phases and paired rounds, latency statistics, CPU accounting from
//! `/proc`, and the result table. Each bench includes it with
//! `#[path = "driver/mod.rs"] mod driver;` and describes what it loads with [`Target`].

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// Most latencies kept per phase (all connections together).
pub const MAX_SAMPLES: usize = 4_000_000;
/// The longest a single request may take before it counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Errors whose details are printed, per phase.
pub const ERROR_SAMPLES: usize = 5;

/// A bench's `main`: reads its settings (`full` under `cargo bench`, which passes `--bench`;
/// anything else, such as `cargo test --benches`, is a smoke run) and runs it. A bad setting
/// exits with status 2, a failed run with status 1, each with `name: ` and the error.
pub fn main<S>(
    name: &str,
    from_env: fn(bool) -> Result<S, String>,
    run: fn(&S) -> Result<(), String>,
) {
    let full = std::env::args().any(|a| a == "--bench");
    let settings = match from_env(full) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&settings) {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

/// The server runtime (`server` threads) and the client runtime (`client` threads).
pub fn runtimes(
    server_threads: usize,
    client_threads: usize,
) -> Result<(Runtime, Runtime), String> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_threads)
        .thread_name("server")
        .enable_all()
        .build()
        .map_err(|e| format!("server runtime: {e}"))?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .thread_name("client")
        .enable_all()
        .build()
        .map_err(|e| format!("client runtime: {e}"))?;
    Ok((server_rt, client_rt))
}

/// A number from the environment, `default` when unset, an error when outside `min..=max`.
pub fn env_number<T>(name: &str, default: T, min: T, max: T) -> Result<T, String>
where
    T: FromStr + PartialOrd + Copy + std::fmt::Display,
{
    let Ok(raw) = std::env::var(name) else {
        return Ok(default);
    };
    match raw.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(format!(
            "{name} must be a number from {min} to {max} (got {raw:?})"
        )),
    }
}

/// How one phase loads its target.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub conns: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// One thing the client can load: an address and the requests to send it. Connection `i`
/// sends tenant `i % tenants()`'s requests.
pub trait Target: Send + Sync + 'static {
    /// Name in the tables.
    fn name(&self) -> &str;
    /// Short name the bench finds the target's summary by.
    fn id(&self) -> &str {
        self.name()
    }
    fn addr(&self) -> SocketAddr;
    fn tenants(&self) -> usize {
        1
    }
    fn request(&self, tenant: usize) -> Request<Empty<Bytes>>;
}

/// How a bench prints its per-round lines and tables (column widths), and whether a phase
/// without a 200 reports no CPU.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub round_width: usize,
    pub name_width: usize,
    pub rps_width: usize,
    pub ms_width: usize,
    pub other_procs_width: usize,
    pub cpu_needs_ok: bool,
}

// ---------------------------------------------------------------------------------------------
// The client.

pub type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

pub async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// What one exchange on a connection came to.
pub enum Answer {
    Done(StatusCode, Bytes),
    Transport(String),
    TimedOut,
}

pub async fn exchange(sender: &mut Sender, req: Request<Empty<Bytes>>) -> Answer {
    let round_trip = async {
        sender.ready().await?;
        let res = sender.send_request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, round_trip).await {
        Err(_) => Answer::TimedOut,
        Ok(Err(e)) => Answer::Transport(e.to_string()),
        Ok(Ok((status, body))) => Answer::Done(status, body),
    }
}

/// When a connection stops: at a time, or when a shared budget of requests runs out.
#[derive(Clone)]
struct Until {
    end: Instant,
    budget: Option<Arc<AtomicU64>>,
}

impl Until {
    /// Whether another request may start (taking it from the budget).
    fn take(&self) -> bool {
        Instant::now() < self.end
            && self.budget.as_ref().is_none_or(|b| {
                b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            })
    }
}

/// What one connection saw in one phase.
#[derive(Default)]
struct ConnResult {
    /// Latencies (ns) of the 200s started after warm-up.
    latencies: Vec<u64>,
    /// 200s over the whole phase, warm-up included.
    ok_total: u64,
    last_done: Option<Instant>,
    errors: Errors,
}

#[derive(Default, Clone)]
pub struct Errors {
    pub status: u64,
    pub transport: u64,
    pub timeout: u64,
    pub samples: Vec<String>,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.status + self.transport + self.timeout
    }

    fn note(&mut self, sample: impl FnOnce() -> String) {
        if self.samples.len() < ERROR_SAMPLES {
            self.samples.push(sample());
        }
    }

    fn merge(&mut self, other: Errors) {
        self.status += other.status;
        self.transport += other.transport;
        self.timeout += other.timeout;
        for s in other.samples {
            self.note(|| s);
        }
    }
}

async fn connection_loop<T: Target>(
    target: Arc<T>,
    tenant: usize,
    measure_from: Instant,
    until: Until,
    cap: usize,
) -> ConnResult {
    let mut out = ConnResult {
        latencies: Vec::with_capacity(cap.min(1 << 16)),
        ..ConnResult::default()
    };
    let mut taken = false;
    'connect: while taken || until.take() {
        taken = true;
        let mut sender = match connect(target.addr()).await {
            Ok(s) => s,
            Err(e) => {
                out.errors.transport += 1;
                out.errors.note(|| e);
                taken = false;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        loop {
            if !taken && !until.take() {
                break 'connect;
            }
            taken = false;
            let req = target.request(tenant);
            let start = Instant::now();
            let answer = exchange(&mut sender, req).await;
            let done = Instant::now();
            match answer {
                Answer::Done(StatusCode::OK, _) => {
                    out.ok_total += 1;
                    if start >= measure_from && out.latencies.len() < cap {
                        out.latencies.push(nanos(done - start));
                        out.last_done = Some(done);
                    }
                }
                Answer::Done(status, body) => {
                    out.errors.status += 1;
                    out.errors
                        .note(|| format!("{status} {}", String::from_utf8_lossy(&body)));
                }
                Answer::Transport(e) => {
                    out.errors.transport += 1;
                    out.errors.note(|| e);
                    // The connection is in an unknown state: open a new one.
                    continue 'connect;
                }
                Answer::TimedOut => {
                    out.errors.timeout += 1;
                    out.errors.note(|| "timed out".to_owned());
                    continue 'connect;
                }
            }
        }
    }
    out
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One target under load for one warm-up plus duration (or one budget of requests).
pub struct Phase {
    pub stats: Stats,
    pub ok_total: u64,
    /// 200s per tenant of the target, warm-up included.
    pub ok_by_tenant: Vec<u64>,
    pub errors: Errors,
    /// This process's CPU time over the phase.
    pub cpu: Option<Duration>,
    /// Cores busy outside this process over the phase, on average.
    pub elsewhere: Option<f64>,
}

/// Loads `target` with `load.conns` connections until the phase ends or `budget` (requests,
/// shared by all connections) runs out.
pub async fn drive<T: Target>(target: Arc<T>, load: Load, budget: Option<Arc<AtomicU64>>) -> Phase {
    let cpu_before = process_cpu();
    let machine_before = machine_busy();
    let begin = Instant::now();
    let measure_from = begin + load.warmup;
    let until = Until {
        end: measure_from + load.duration,
        budget,
    };
    let cap = MAX_SAMPLES / load.conns;
    let tenants = target.tenants();
    let handles: Vec<JoinHandle<ConnResult>> = (0..load.conns)
        .map(|i| {
            tokio::spawn(connection_loop(
                Arc::clone(&target),
                i % tenants,
                measure_from,
                until.clone(),
                cap,
            ))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = Errors::default();
    let mut ok_by_tenant = vec![0; tenants];
    let mut last_done = measure_from;
    for (i, handle) in handles.into_iter().enumerate() {
        match handle.await {
            Ok(r) => {
                latencies.extend_from_slice(&r.latencies);
                ok_by_tenant[i % tenants] += r.ok_total;
                errors.merge(r.errors);
                if let Some(t) = r.last_done {
                    last_done = last_done.max(t);
                }
            }
            Err(e) => {
                errors.transport += 1;
                errors.note(|| format!("connection task failed: {e}"));
            }
        }
    }
    let wall = begin.elapsed();
    let cpu = match (cpu_before, process_cpu()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    // CPU the rest of the machine used meanwhile: other processes competing for the cores.
    let elsewhere = match (machine_before, machine_busy(), cpu) {
        (Some(a), Some(b), Some(ours)) => {
            Some(b.saturating_sub(a).saturating_sub(ours).as_secs_f64() / wall.as_secs_f64())
        }
        _ => None,
    };
    Phase {
        stats: Stats::new(latencies, last_done.saturating_duration_since(measure_from)),
        ok_total: ok_by_tenant.iter().sum(),
        ok_by_tenant,
        errors,
        cpu,
        elsewhere,
    }
}

/// Runs every target `rounds` times, every other round in reverse order, printing a line per
/// phase, and pools each target's rounds.
pub fn run_pass<T: Target>(
    client_rt: &Runtime,
    targets: &[Arc<T>],
    load: Load,
    rounds: usize,
    style: Style,
) -> Vec<Summary> {
    let mut results: Vec<Vec<Phase>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        // Every other round backwards, so a drift in background load falls on all alike.
        let order: Vec<usize> = if round % 2 == 1 {
            (0..targets.len()).collect()
        } else {
            (0..targets.len()).rev().collect()
        };
        for i in order {
            let target = &targets[i];
            let mut phase = client_rt.block_on(drive(Arc::clone(target), load, None));
            if style.cpu_needs_ok && phase.ok_total == 0 {
                phase.cpu = None;
            }
            println!(
                "  {:>2} conn(s), round {round:>rw$}  {:<nw$} {:>fw$.0} req/s  p50 {:>mw$.3} ms  p99 {:>mw$.3} ms  errors {}  other processes {}",
                load.conns,
                target.name(),
                phase.stats.rps(),
                phase.stats.percentile_ms(0.50),
                phase.stats.percentile_ms(0.99),
                phase.errors.total(),
                phase
                    .elsewhere
                    .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2} cores")),
                rw = style.round_width,
                nw = style.name_width,
                fw = style.rps_width,
                mw = style.ms_width,
            );
            results[i].push(phase);
        }
    }
    targets
        .iter()
        .zip(results)
        .map(|(t, phases)| Summary::pool(&**t, phases))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report.

/// Sorted latencies over a measured span.
pub struct Stats {
    pub sorted_ns: Vec<u64>,
    pub elapsed: Duration,
}

impl Stats {
    pub fn new(mut latencies: Vec<u64>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        Stats {
            sorted_ns: latencies,
            elapsed,
        }
    }

    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.sorted_ns.len() as f64 / secs
        } else {
            0.0
        }
    }

    /// Nearest-rank percentile, in ms.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.sorted_ns.is_empty() {
            return f64::NAN;
        }
        let rank = (p * self.sorted_ns.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.sorted_ns.len()) - 1;
        self.sorted_ns[i] as f64 / 1e6
    }

    pub fn max_ms(&self) -> f64 {
        self.sorted_ns.last().map_or(f64::NAN, |&n| n as f64 / 1e6)
    }
}

/// One target's figures in one round.
#[derive(Debug, Clone, Copy)]
pub struct RoundFigures {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// A target's rounds pooled.
pub struct Summary {
    pub id: String,
    pub name: String,
    pub stats: Stats,
    /// Each round's figures, for comparisons paired by round.
    pub rounds: Vec<RoundFigures>,
    /// Cores busy outside this process, averaged over the rounds.
    pub elsewhere: Option<f64>,
    /// 200s per tenant over the rounds, warm-up included.
    pub ok_by_tenant: Vec<u64>,
    pub errors: Errors,
    pub cpu: Option<Duration>,
}

impl Summary {
    fn pool<T: Target>(target: &T, phases: Vec<Phase>) -> Self {
        let mut latencies = Vec::new();
        let mut elapsed = Duration::ZERO;
        let mut ok_by_tenant: Vec<u64> = Vec::new();
        let mut errors = Errors::default();
        let mut cpu = Some(Duration::ZERO);
        let mut rounds = Vec::with_capacity(phases.len());
        let elsewhere: Option<Vec<f64>> = phases.iter().map(|p| p.elsewhere).collect();
        let elsewhere = elsewhere
            .filter(|e| !e.is_empty())
            .map(|e| e.iter().sum::<f64>() / e.len() as f64);
        for p in phases {
            rounds.push(RoundFigures {
                rps: p.stats.rps(),
                p50_ms: p.stats.percentile_ms(0.50),
                p99_ms: p.stats.percentile_ms(0.99),
            });
            latencies.extend_from_slice(&p.stats.sorted_ns);
            elapsed += p.stats.elapsed;
            ok_by_tenant.resize(p.ok_by_tenant.len().max(ok_by_tenant.len()), 0);
            for (sum, n) in ok_by_tenant.iter_mut().zip(&p.ok_by_tenant) {
                *sum += n;
            }
            errors.merge(p.errors);
            cpu = cpu.zip(p.cpu).map(|(a, b)| a + b);
        }
        Summary {
            id: target.id().to_owned(),
            name: target.name().to_owned(),
            stats: Stats::new(latencies, elapsed),
            rounds,
            elsewhere,
            ok_by_tenant,
            errors,
            cpu,
        }
    }

    /// 200s over the rounds, warm-up included.
    pub fn ok_total(&self) -> u64 {
        self.ok_by_tenant.iter().sum()
    }

    /// This process's CPU per answered request, warm-up included.
    pub fn cpu_us_per_req(&self) -> Option<f64> {
        let cpu = self.cpu?;
        let ok_total = self.ok_total();
        (ok_total > 0).then(|| cpu.as_secs_f64() * 1e6 / ok_total as f64)
    }
}

pub fn print_table(summaries: &[Summary], style: Style) {
    let (nw, ow) = (style.name_width, style.other_procs_width);
    println!(
        "{:<nw$} {:>10} {:>10} {:>9} {:>9} {:>9} {:>11} {:>7} {:>ow$}",
        "target",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "cpu µs/req",
        "errors",
        "other procs"
    );
    for s in summaries {
        println!(
            "{:<nw$} {:>10} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>11} {:>7} {:>ow$}",
            s.name,
            s.stats.sorted_ns.len(),
            s.stats.rps(),
            s.stats.percentile_ms(0.50),
            s.stats.percentile_ms(0.99),
            s.stats.max_ms(),
            s.cpu_us_per_req()
                .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.1}")),
            s.errors.total(),
            s.elsewhere
                .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2} cores"))
        );
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// User plus system CPU time of this process (Linux; `None` elsewhere).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name (which may hold spaces): `state` is the first field, `utime` and
    // `stime` the 12th and 13th, in clock ticks (USER_HZ, 100 on Linux).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// CPU time all processes together ran since boot (Linux; `None` elsewhere): `user`, `nice`
/// and `system` of the `cpu` line of `/proc/stat`, in USER_HZ ticks (100 per second).
/// Interrupt and softirq time are left out: loopback TCP is mostly processed there, on
/// behalf of this process, without being charged to it.
fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .map(|t| t.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(Duration::from_millis(ticks * 10))
}

pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}
