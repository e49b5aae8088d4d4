//! Shared helpers of the end-to-end tests: start a gateway on a loopback port against the
//! in-process sandbox, and talk to it over real HTTP.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use tollgate::gateway::{self, Config, RunningGateway};

/// The admin token of test gateways.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A test configuration: loopback port 0, admin API on, demo tenant seeded, sandbox upstream.
pub fn test_config() -> Config {
    Config {
        bind: "127.0.0.1:0".parse().unwrap(),
        admin_token: Some(ADMIN_TOKEN.to_owned()),
        demo: true,
        ..Config::default()
    }
}

/// Starts a gateway with `config`.
pub async fn start(config: Config) -> TestGateway {
    let running = gateway::start(config).await.expect("gateway starts");
    TestGateway::new(running)
}

/// A running gateway and an HTTP client for it.
pub struct TestGateway {
    pub gw: RunningGateway,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

/// A whole response.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (panics with the body text when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `code` of an `{error, code}` body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }
}

impl TestGateway {
    pub fn new(gw: RunningGateway) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        TestGateway { gw, client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.gw.base_url(), path)
    }

    /// The demo key's secret.
    pub fn key(&self) -> String {
        self.gw.demo().expect("demo mode").key.clone()
    }

    /// The demo model's id.
    pub fn model(&self) -> String {
        self.gw.demo().expect("demo mode").model.to_string()
    }

    /// `/api/models/<demo model><rest>`.
    pub fn model_path(&self, rest: &str) -> String {
        format!("/api/models/{}{}", self.model(), rest)
    }

    /// Sends a request and reads the whole answer.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let res = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .expect("answer within 30 s")
            .expect("request sent");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("whole body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// A request with optional API key and body.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::builder().method(method).uri(self.url(path));
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .unwrap()
    }

    /// `GET path` with the demo key.
    pub async fn get(&self, path: &str) -> Answer {
        let key = self.key();
        self.send(self.request(Method::GET, path, Some(&key), None))
            .await
    }

    /// An admin API call.
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(self.url(path))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.send(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
    }

    /// The demo org's balance, read through the admin API.
    pub async fn balance(&self) -> Option<u64> {
        let org = self.gw.demo().expect("demo mode").org;
        let answer = self
            .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        answer.json()["balance"].as_u64()
    }
}

/// A webhook receiver on loopback answering 200 to everything: its URL and how many
/// requests it got.
pub async fn receiver() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, count)
}
