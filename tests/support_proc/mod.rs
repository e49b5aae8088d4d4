//! Support of the multi-process tests (`tests/replicas.rs`): gateway processes (the `tollgate`
//! binary) on loopback ports, a private `redis-server`, a private three-node Redis
//! Cluster, a TCP proxy that can "stop" PostgreSQL, and an HTTP client.
//!
//! Every child process is killed when its guard is dropped (also when a test panics), and its
//! stdout/stderr go to a log file whose tail is printed when the test fails.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use tollgate_postgres::testing::{require_services, TestDb};

/// The admin token of the test gateways.
pub const ADMIN_TOKEN: &str = "replicas-admin-token";

/// Serializes the tests of one binary: they start processes and measure latencies, and the
/// machine is small; running them one at a time keeps the timing assertions meaningful.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the other tests of this binary to finish (a panicking test releases it too).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Skips (prints why, returns `None`) or, with `TOLLGATE_REQUIRE_SERVICES=1`, fails.
fn unavailable<T>(what: String) -> Option<T> {
    if require_services() {
        panic!("{what} (required: TOLLGATE_REQUIRE_SERVICES=1)");
    }
    eprintln!("skipping: {what}");
    None
}

/// A port nothing listens on right now (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `tollgate` binary cargo built for these tests.
pub fn gateway_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate"))
}

/// The URL of the shared Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`), when it
/// accepts connections.
pub async fn shared_redis() -> Option<String> {
    let url = std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let authority = url
        .split_once("://")
        .map_or(url.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let addr = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:6379")
    };
    match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await {
        Ok(Ok(_)) => Some(url),
        Ok(Err(e)) => unavailable(format!("Redis unreachable at {addr}: {e}")),
        Err(_) => unavailable(format!("Redis unreachable at {addr}: connect timed out")),
    }
}

/// A fresh 32-byte session key, as 64 hex digits.
pub fn session_key() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// `url` with every connection's `search_path` on `schema` (tokio-postgres passes the URL's
/// `options` parameter to the server at startup).
pub fn url_in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// The `host:port` a `postgres://` URL names (default port 5432), and where it sits in it.
fn authority(url: &str) -> (std::ops::Range<usize>, String) {
    let start = url.find("://").expect("a postgres:// URL") + 3;
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let start = url[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    let host_port = &url[start..end];
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    (start..end, host_port)
}

/// The `host:port` of the server a `postgres://` URL names.
pub fn postgres_addr(url: &str) -> String {
    authority(url).1
}

/// `url` (a `postgres://` URL) with its host and port replaced by `addr`.
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (range, _) = authority(url);
    format!("{}{addr}{}", &url[..range.start], &url[range.end..])
}

/// A directory of process logs; removed at the end unless the test failed or
/// `TOLLGATE_KEEP_LOGS` is set.
pub struct LogDir {
    path: PathBuf,
}

impl LogDir {
    pub fn new(test: &str) -> LogDir {
        let path = std::env::temp_dir().join(format!(
            "tollgate-replicas-{test}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).expect("a log directory");
        LogDir { path }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.log"))
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("TOLLGATE_KEEP_LOGS").is_some() {
            eprintln!("process logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The last `max` bytes of a log file.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text
}

/// Environment of a gateway process (nothing is inherited from the test's environment).
#[derive(Clone, Debug, Default)]
pub struct GatewayEnv {
    vars: Vec<(String, String)>,
}

impl GatewayEnv {
    /// The admin API on (on the public listener), the demo off, `upstream` as upstream.
    pub fn new(upstream: &str) -> GatewayEnv {
        GatewayEnv::default()
            .set("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .set("TOLLGATE_ADMIN_BIND", "public")
            .set("TOLLGATE_UPSTREAM", upstream)
            .set("TOLLGATE_DEMO", "off")
            .set("RUST_LOG", "info")
    }

    /// PostgreSQL at `url` (with a session key). Each process opens at most 16 + 10
    /// connections, so the tests' replicas stay under the server's `max_connections` (100)
    /// even when a load opens every pool to its size.
    pub fn database(self, url: &str, session_key: &str) -> GatewayEnv {
        self.set("DATABASE_URL", url)
            .set("TOLLGATE_SESSION_KEY", session_key)
            .set("TOLLGATE_DATABASE_POOL_SIZE", "16")
    }

    /// Sets (or replaces) one variable.
    pub fn set(mut self, var: &str, value: &str) -> GatewayEnv {
        self.vars.retain(|(k, _)| k != var);
        self.vars.push((var.to_owned(), value.to_owned()));
        self
    }
}

/// A gateway process; killed when dropped.
pub struct Gateway {
    name: String,
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl Gateway {
    /// Starts the gateway binary with `env` on a free loopback port and waits until
    /// `/healthz` answers.
    pub async fn start(name: &str, env: &GatewayEnv, logs: &LogDir) -> Gateway {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = logs.file(name);
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("a log file");
        let err = out.try_clone().expect("a log file handle");
        let mut cmd = Command::new(gateway_binary());
        cmd.env_clear()
            .env("TOLLGATE_BIND", addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the gateway process starts");
        let mut gw = Gateway {
            name: name.to_owned(),
            child: Some(child),
            addr,
            log,
        };
        gw.wait_healthy().await;
        gw
    }

    async fn wait_healthy(&mut self) {
        let http = Http::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "gateway {} exited at start with {status}:\n{}",
                    self.name,
                    tail(&self.log, 4000)
                );
            }
            let req = Request::get(self.url("/healthz"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            if let Ok(Ok(res)) =
                tokio::time::timeout(Duration::from_secs(1), http.client.request(req)).await
            {
                if res.status() == StatusCode::OK {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway {} not healthy within 30 s:\n{}",
                self.name,
                tail(&self.log, 4000)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the process is running").id()
    }

    /// Sends SIGTERM and waits (up to 40 s: the drain takes at most 30 s) for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("`kill` runs");
        assert!(sent.success(), "SIGTERM to gateway {}", self.name);
        self.wait_exit(Duration::from_secs(40)).await
    }

    /// SIGKILL (no chance to settle anything) and waits for the exit.
    pub async fn kill(&mut self) -> ExitStatus {
        self.child
            .as_mut()
            .expect("the process is running")
            .kill()
            .expect("SIGKILL");
        self.wait_exit(Duration::from_secs(10)).await
    }

    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("the process is running");
        loop {
            if let Some(status) = child.try_wait().expect("the process's status") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway {} did not exit within {limit:?}:\n{}",
                self.name,
                tail(&self.log, 4000)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process's output so far (its end).
    pub fn log_tail(&self) -> String {
        tail(&self.log, 4000)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- gateway {} ({}) output, last lines ----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 3000)
            );
        }
    }
}

/// Whether `redis-server` can be run; skips or fails (`TOLLGATE_REQUIRE_SERVICES=1`) if not.
pub fn redis_server_available() -> bool {
    runnable("redis-server")
}

/// Whether `redis-server` and `redis-cli` (to create a cluster) can be run; skips or fails
/// (`TOLLGATE_REQUIRE_SERVICES=1`) if not.
pub fn redis_cluster_tools_available() -> bool {
    runnable("redis-server") && runnable("redis-cli")
}

/// Whether `<bin> --version` runs; skips or fails (`TOLLGATE_REQUIRE_SERVICES=1`) if not.
fn runnable(bin: &str) -> bool {
    match Command::new(bin).arg("--version").output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => unavailable::<()>(format!(
            "`{bin} --version` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
        .is_some(),
        Err(e) => unavailable::<()>(format!("{bin} cannot be run: {e}")).is_some(),
    }
}

/// A private `redis-server` (no persistence) on a fixed loopback port; killed when dropped.
pub struct RedisServer {
    port: u16,
    /// Options after the defaults (`--port`, `--bind`, no persistence, not daemonized).
    extra: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl RedisServer {
    /// Starts it on a free port.
    pub async fn start(logs: &LogDir) -> RedisServer {
        Self::start_with(free_port(), Vec::new(), logs.file("redis")).await
    }

    /// Starts it on `port` with `extra` options, its output appended to `log`.
    async fn start_with(port: u16, extra: Vec<String>, log: PathBuf) -> RedisServer {
        let mut server = RedisServer {
            port,
            extra,
            child: None,
            log,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// (Re)starts the server on its port (empty: nothing was saved) and waits for `PONG`.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("a log file");
        let err = out.try_clone().expect("a log file handle");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pong().await {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "redis-server exited with {status}:\n{}",
                    tail(&self.log, 2000)
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server not answering within 10 s:\n{}",
                tail(&self.log, 2000)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn pong(&self) -> bool {
        let attempt = async {
            let mut conn = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
            conn.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 7];
            conn.read_exact(&mut buf).await.ok()?;
            Some(&buf == b"+PONG\r\n")
        };
        tokio::time::timeout(Duration::from_millis(500), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// SIGKILL: connections drop, every key is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL redis-server");
            child.wait().expect("redis-server exits");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-node Redis Cluster (masters only) on free loopback ports: `redis-server
/// --cluster-enabled yes` children of this process (not daemonized, so their exits are
/// reaped), joined with `redis-cli --cluster create`. Dropping it kills the nodes and removes
/// their directory (cluster configuration files); their output goes to the [`LogDir`].
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok`. Check [`redis_cluster_tools_available`] first.
    pub async fn start(logs: &LogDir) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-redis-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the cluster nodes");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        let mut taken = Vec::new();
        for _ in 0..3 {
            let port = cluster_port(&taken);
            taken.push(port);
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("nodes-{port}.conf"),
                "--cluster-node-timeout",
                "5000",
                "--dir",
                cluster.dir.to_str().expect("a UTF-8 temporary directory"),
            ]
            .map(str::to_owned)
            .to_vec();
            let log = logs.file(&format!("redis-cluster-{port}"));
            cluster
                .nodes
                .push(RedisServer::start_with(port, extra, log).await);
        }

        let addrs: Vec<String> = taken.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let created = redis_cli(&args).await;
        assert!(
            created.is_ok(),
            "redis-cli --cluster create failed: {created:?}"
        );

        let deadline = Instant::now() + Duration::from_secs(20);
        for port in &taken {
            loop {
                let info = redis_cli(&["-p", &port.to_string(), "cluster", "info"])
                    .await
                    .unwrap_or_else(|e| e);
                if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster is not ok on node {port} within 20 s:\n{info}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cluster
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>`: every node a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The keys each node holds itself (`KEYS *` is not redirected: it lists the node's own
    /// slots only), by node port.
    pub async fn keys_by_node(&self) -> BTreeMap<u16, BTreeSet<String>> {
        let mut keys = BTreeMap::new();
        for node in &self.nodes {
            let port = node.port();
            let out = redis_cli(&["-p", &port.to_string(), "keys", "*"])
                .await
                .unwrap_or_else(|e| panic!("KEYS on node {port}: {e}"));
            let own = out
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            keys.insert(port, own);
        }
        keys
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port for a cluster node whose bus port (port + 10 000) is free too, and
/// neither of which is one of `taken` or their bus ports.
fn cluster_port(taken: &[u16]) -> u16 {
    loop {
        let port = free_port();
        if port > 55_000 {
            continue;
        }
        let bus = port + 10_000;
        let clashes = taken
            .iter()
            .any(|&t| [port, bus].iter().any(|p| *p == t || *p == t + 10_000));
        if !clashes && std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
}

/// Runs `redis-cli <args>`: its stdout, or stdout and stderr when it fails.
async fn redis_cli(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("redis-cli cannot be run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A TCP proxy in front of PostgreSQL. `stop` drops every open connection and closes the
/// listening port (new connections are refused); `start` listens on the same port again.
pub struct TcpProxy {
    addr: SocketAddr,
    target: String,
    running: Mutex<Option<ProxyRun>>,
}

struct ProxyRun {
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    /// A running proxy on a free port forwarding to `target` (`host:port`).
    pub async fn start_new(target: &str) -> TcpProxy {
        let proxy = TcpProxy {
            addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            target: target.to_owned(),
            running: Mutex::new(None),
        };
        proxy.start().await;
        proxy
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Listens (again) and forwards every accepted connection.
    pub async fn start(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("proxy: binding {} failed ({e}); retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("proxy: cannot listen on {} again: {e}", self.addr),
            }
        };
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target = self.target.clone();
        let tracked = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                let mut conns = tracked.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(conn);
            }
        });
        let previous = self
            .running
            .lock()
            .unwrap()
            .replace(ProxyRun { accept, conns });
        assert!(previous.is_none(), "the proxy was already running");
    }

    /// Closes the port and every connection through it (both sides see the close).
    pub async fn stop(&self) {
        let run = self.running.lock().unwrap().take();
        let Some(run) = run else { return };
        run.accept.abort();
        let _ = run.accept.await;
        let conns: Vec<JoinHandle<()>> = std::mem::take(&mut *run.conns.lock().unwrap());
        for conn in &conns {
            conn.abort();
        }
        for conn in conns {
            let _ = conn.await;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(run) = self.running.lock().unwrap().take() {
            run.accept.abort();
            for conn in run.conns.lock().unwrap().iter() {
                conn.abort();
            }
        }
    }
}

/// A whole HTTP answer and how long it took.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
}

impl Answer {
    /// The body as JSON (panics with the body text when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `code` of an `{error, code}` body ("" for other bodies).
    pub fn code(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// A numeric header.
    pub fn header_u64(&self, name: &str) -> Option<u64> {
        self.headers.get(name)?.to_str().ok()?.parse().ok()
    }

    /// Asserts the error body is exactly `{"error": <sentence>, "code": code}`.
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{status} {code}"
        );
        let body = self.json();
        let object = body.as_object().expect("an error body is a JSON object");
        assert_eq!(object.len(), 2, "exactly {{error, code}}: {body}");
        assert_eq!(body["code"], code, "{body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "a human sentence in `error`: {body}"
        );
    }
}

/// An HTTP/1.1 client (keep-alive) for the gateways.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http(),
        }
    }

    /// Sends a request and reads the whole answer.
    pub async fn try_send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        let started = Instant::now();
        let res = self.client.request(req).await?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
            elapsed: started.elapsed(),
        })
    }

    /// Sends a request and reads the whole answer (panics on a transport error or after
    /// 30 s).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let uri = req.uri().clone();
        tokio::time::timeout(Duration::from_secs(30), self.try_send(req))
            .await
            .unwrap_or_else(|_| panic!("{uri}: no answer within 30 s"))
            .unwrap_or_else(|e| panic!("{uri}: {e}"))
    }

    /// A customer API `GET` with `X-API-Key` and `X-Request-Id`.
    pub fn customer_request(url: String, key: &str, request_id: &str) -> Request<Full<Bytes>> {
        Request::get(url)
            .header("x-api-key", key)
            .header("x-request-id", request_id)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// A customer API `GET` with `X-API-Key` and `X-Request-Id`.
    pub async fn customer(&self, url: String, key: &str, request_id: &str) -> Answer {
        self.send(Self::customer_request(url, key, request_id))
            .await
    }

    /// An admin API call with the bearer token.
    pub async fn admin(&self, method: Method, url: String, body: Option<Value>) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.send(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
    }
}

/// A fresh PostgreSQL schema, or a skip (see [`TestDb::new`]).
pub async fn test_db() -> Option<TestDb> {
    TestDb::new().await
}
