//! Helpers for the tests against real Redis: the shared server of `REDIS_URL`, private
//! `redis-server` processes on spare loopback ports (for tests that stop Redis or count its
//! commands), and a three-node Redis Cluster.
//!
//! A missing server or binary skips the test with a printed note, unless
//! `TOLLGATE_REQUIRE_SERVICES=1`, which makes it a failure.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tollgate_core::OrgId;
use tollgate_sliding_window::RedisWindowStore;

/// `REDIS_URL`, or the local default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn services_required() -> bool {
    std::env::var("TOLLGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Skips the calling test (returns `None`) or, when services are required, fails it.
#[track_caller]
pub fn skip<T>(why: &str) -> Option<T> {
    if services_required() {
        panic!("TOLLGATE_REQUIRE_SERVICES=1 but {why}");
    }
    eprintln!("skipping: {why} (set TOLLGATE_REQUIRE_SERVICES=1 to fail instead)");
    None
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix() -> String {
    format!("tollgate-test-{}", OrgId::new())
}

/// A store on the shared server with a fresh key prefix, or `None` (skip) when the server
/// does not answer.
pub async fn shared_store() -> Option<RedisWindowStore> {
    let url = redis_url();
    let store = RedisWindowStore::open(&url)
        .expect("REDIS_URL is a valid Redis URL")
        .with_key_prefix(unique_prefix());
    match store.ping().await {
        Ok(()) => Some(store),
        Err(e) => skip(&format!("Redis at {url} is unreachable: {e}")),
    }
}

/// A plain connection for inspecting what the store wrote.
pub async fn admin(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `INFO commandstats` as `command → calls`.
pub async fn command_calls(conn: &mut MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    parse_command_calls(&info)
}

pub fn parse_command_calls(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

fn binaries_present() -> bool {
    ["redis-server", "redis-cli"].iter().all(|bin| {
        std::process::Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A loopback port nothing listens on (nor, for cluster nodes, on port + 10 000, the
/// cluster bus).
fn spare_port(with_bus: bool) -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !with_bus {
            return port;
        }
        if port <= 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

async fn redis_cli(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{text}{}",
            String::from_utf8_lossy(&out.stderr).into_owned()
        ))
    }
}

/// A `redis-server` of our own on a spare loopback port, with its own temporary directory;
/// shut down (and its directory removed) when dropped. It runs as our child process rather
/// than daemonized, so that its exit is reaped.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one, or `None` (skip) when `redis-server` is not installed.
    pub async fn start() -> Option<PrivateRedis> {
        Self::start_with(spare_port(false), &[]).await
    }

    async fn start_with(port: u16, extra: &[&str]) -> Option<PrivateRedis> {
        if !binaries_present() {
            return skip("redis-server / redis-cli are not installed");
        }
        let dir =
            std::env::temp_dir().join(format!("tollgate-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = PrivateRedis {
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.restart().await;
        Some(server)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let port = self.port.to_string();
        let dir = self.dir.to_str().unwrap().to_owned();
        let logfile = self.dir.join("redis.log").to_str().unwrap().to_owned();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--dir",
            &dir,
            "--logfile",
            &logfile,
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        args.extend(self.extra.iter().map(String::as_str));
        let child = std::process::Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_cli(&["-p", &port, "ping"])
                .await
                .is_ok_and(|out| out.trim() == "PONG")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not answer"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server at once, as a crash would (`SHUTDOWN NOSAVE`), and waits for it to
    /// exit.
    pub async fn kill(&mut self) {
        let port = self.port.to_string();
        // The connection drops as the server exits, so redis-cli may report an error.
        let _ = redis_cli(&["-p", &port, "shutdown", "nosave"]).await;
        let mut child = self.child.take().expect("the server is running");
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not stop"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl PrivateRedis {
    /// Freezes the server (`SIGSTOP`): connections stay open, nothing is answered — a hung
    /// host.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server run again (`SIGCONT`).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a frozen server too.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A three-node Redis Cluster (no replicas) on spare loopback ports.
pub struct Cluster {
    pub nodes: Vec<PrivateRedis>,
}

impl Cluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create` and waits for
    /// `cluster_state:ok` on every node; `None` (skip) without the binaries.
    pub async fn start() -> Option<Cluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = spare_port(true);
            let config = format!("nodes-{port}.conf");
            let node = PrivateRedis::start_with(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &config,
                    "--cluster-node-timeout",
                    "5000",
                ],
            )
            .await?;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = redis_cli(&args).await;
        assert!(out.is_ok(), "redis-cli --cluster create failed: {out:?}");
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            let port = node.port.to_string();
            loop {
                let info = redis_cli(&["-p", &port, "cluster", "info"])
                    .await
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster not ok on {port}: {info}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Some(Cluster { nodes })
    }

    /// `redis+cluster://` naming the given nodes as seeds.
    pub fn url(&self, seeds: &[usize]) -> String {
        let hosts: Vec<String> = seeds
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.nodes[i].port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The index of the node serving `key`'s slot (asked of the cluster itself).
    pub async fn node_of(&self, key: &str) -> usize {
        let mut conn = admin(&self.nodes[0].url()).await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .unwrap();
        let redis::Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS answered {slots:?}");
        };
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let (redis::Value::Int(start), redis::Value::Int(end), redis::Value::Array(master)) =
                (&fields[0], &fields[1], &fields[2])
            else {
                continue;
            };
            if (*start..=*end).contains(&slot) {
                let redis::Value::Int(port) = master[1] else {
                    panic!("CLUSTER SLOTS node without port: {master:?}");
                };
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port) == port)
                    .expect("slot served by one of our nodes");
            }
        }
        panic!("slot {slot} is not served");
    }
}
