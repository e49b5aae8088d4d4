//! Support of the tests of the `tollgate` binary (`tests/tollgate_binary.rs`): running it to
//! completion, a gateway process with its stdout and stderr apart, and a signing service
//! (plain or TLS with a self-signed certificate) that wants a bearer token.
#![allow(dead_code)]

use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::support_proc::{free_port, Http, LogDir};
use tollgate::upstream_sign::{sandbox_rules, RulesSigner, Signer};

/// The binary cargo built for these tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_tollgate");

/// Runs the binary to completion with only `env` in its environment.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BINARY);
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    // Bounded: a binary that does not exit on a bad value would hang the suite.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    let out = child.wait_with_output().expect("the binary's output");
    drop(watchdog);
    out
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A gateway process with its stdout and stderr in separate files; killed when dropped.
pub struct Gateway {
    child: Option<Child>,
    pub public: SocketAddr,
    pub internal: Option<SocketAddr>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Gateway {
    /// Starts the binary with `env` (and loopback listeners) and waits for `/healthz`.
    pub async fn start(logs: &LogDir, name: &str, env: &[(&str, &str)], internal: bool) -> Gateway {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let internal = internal.then(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let stdout = logs.file(&format!("{name}-stdout"));
        let stderr = logs.file(&format!("{name}-stderr"));
        let mut cmd = Command::new(BINARY);
        cmd.env_clear()
            .env("TOLLGATE_BIND", public.to_string())
            .env(
                "TOLLGATE_ADMIN_BIND",
                internal.map_or("public".to_owned(), |a: SocketAddr| a.to_string()),
            )
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut gw = Gateway {
            child: Some(cmd.spawn().expect("the gateway starts")),
            public,
            internal,
            stdout,
            stderr,
        };
        let http = Http::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = gw.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("exited at start with {status}:\n{}", gw.stderr());
            }
            let req = Request::get(gw.url("/healthz"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            if let Ok(Ok(a)) =
                tokio::time::timeout(Duration::from_secs(1), http.try_send(req)).await
            {
                if a.status == StatusCode::OK && gw.stdout().contains("demo key:") {
                    return gw;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not healthy within 30 s:\n{}",
                gw.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    pub fn internal_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.internal.expect("an internal listener")
        )
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// A line of the banner, e.g. `demo key:`.
    pub fn banner(&self, label: &str) -> String {
        self.stdout()
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {label:?} in the banner:\n{}", self.stdout()))
    }

    pub fn demo_path(&self, rest: &str) -> String {
        format!("/api/models/{}{rest}", self.banner("demo model:"))
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {limit:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
                "---- stdout ----\n{}\n---- stderr ----\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }
}

pub fn get(url: String, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::get(url);
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

/// A signing service (signatures of the sandbox rules, so the sandbox accepts them) that
/// wants `Authorization: Bearer <token>`, over TLS when `tls` is given, answering after
/// `delay`. Counts the requests it signed.
pub async fn signer(
    tls: Option<rustls::ServerConfig>,
    token: &'static str,
    delay: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let signed = Arc::new(AtomicUsize::new(0));
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let rules = Arc::new(RulesSigner::new(sandbox_rules()));
    let counter = Arc::clone(&signed);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (rules, counter, acceptor) = (rules.clone(), counter.clone(), acceptor.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (rules, counter) = (rules.clone(), counter.clone());
                    async move {
                        let authorized = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            == Some(&format!("Bearer {token}"));
                        let body: Value = serde_json::from_slice(
                            &req.into_body().collect().await.unwrap().to_bytes(),
                        )
                        .unwrap();
                        tokio::time::sleep(delay).await;
                        let (status, answer) = if authorized {
                            let s = rules
                                .sign(
                                    body["path"].as_str().unwrap(),
                                    body["user_id"].as_str().unwrap(),
                                )
                                .await
                                .unwrap();
                            counter.fetch_add(1, Ordering::SeqCst);
                            (
                                200,
                                json!({"sign": s.sign, "time": s.time, "app_token": s.app_token}),
                            )
                        } else {
                            (401, json!({"error": "unauthorized"}))
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            });
        }
    });
    (addr, signed)
}

/// A self-signed certificate for `localhost` (written as PEM to `pem`) and a TLS server
/// configuration presenting it.
pub fn self_signed(pem: &Path) -> rustls::ServerConfig {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(pem, certified.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap()
}
