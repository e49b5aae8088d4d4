//! The `tollgate` binary as an operator runs it: `--version`, `--help`, bad values (exit 2),
//! secrets from files, the public and internal listeners, JSON logs on stderr and the banner
//! on stdout, an `https://` remote signer with a bearer token and a private CA, and the
//! drain on SIGTERM (a second signal exits at once).

mod support_bin;
mod support_proc;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use support_bin::{get, run, self_signed, signer, text, Gateway};
use support_proc::{Http, LogDir, ADMIN_TOKEN};

#[test]
fn version_and_help_describe_every_setting() {
    let out = run(&["--version"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout).trim(),
        format!("tollgate {}", env!("CARGO_PKG_VERSION"))
    );

    let out = run(&["--help"], &[]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    for var in [
        "TOLLGATE_BIND",
        "TOLLGATE_ADMIN_BIND",
        "TOLLGATE_ADMIN_TOKEN",
        "TOLLGATE_ADMIN_TOKEN_FILE",
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "REDIS_URL",
        "TOLLGATE_UPSTREAM",
        "TOLLGATE_SIGN_RULES",
        "TOLLGATE_SIGNER_URL",
        "TOLLGATE_SIGNER_TOKEN",
        "TOLLGATE_SIGNER_TIMEOUT_MS",
        "TOLLGATE_CA_FILE",
        "TOLLGATE_UPSTREAM_TIMEOUT_MS",
        "TOLLGATE_WINDOW_MS",
        "TOLLGATE_BURST",
        "TOLLGATE_RATE_LIMIT_FAILURE",
        "TOLLGATE_BODY_LIMIT",
        "TOLLGATE_SESSION_KEY",
        "TOLLGATE_SESSION_KEY_FILE",
        "TOLLGATE_DEMO",
        "TOLLGATE_HOLD_TTL_MS",
        "TOLLGATE_DRAIN_TIMEOUT_MS",
        "TOLLGATE_MAX_CONNECTIONS",
        "TOLLGATE_LOG_FORMAT",
        "RUST_LOG",
    ] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "{var} missing:\n{help}"
        );
    }
    for default in [
        "[default: 127.0.0.1:8080]",
        "[default: 2000]",
        "[default: 30000]",
        "[default: 60000]",
        "[default: free=5,basic=10,pro=30,enterprise=200]",
        "[default: open]",
        "[default: 1048576]",
        "[default: 300000]",
        "[default: 10000]",
        "[default: text]",
        "[default: info]",
        "Default: 127.0.0.1:8001",
    ] {
        assert!(help.contains(default), "{default} missing:\n{help}");
    }
    // A meaning for each, not just a name.
    assert!(
        help.contains("past it the answer is 413 PAYLOAD_TOO_LARGE"),
        "{help}"
    );
}

#[test]
fn a_bad_value_exits_2_with_a_clear_message_and_no_secret() {
    let out = run(&[], &[("TOLLGATE_BIND", "nowhere")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("invalid value 'nowhere' for '--bind"), "{err}");
    assert!(err.contains("TOLLGATE_BIND"), "{err}");
    assert!(out.stdout.is_empty());

    let out = run(&["--bnd", "127.0.0.1:1"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("a similar argument exists: '--bind'"));

    let out = run(&[], &[("TOLLGATE_SESSION_KEY", "hunter2-not-hex")]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("TOLLGATE_SESSION_KEY") && err.contains("64 hex"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the secret is echoed: {err}");

    let out = run(&[], &[("TOLLGATE_ADMIN_TOKEN_FILE", "/nonexistent/token")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("TOLLGATE_ADMIN_TOKEN_FILE: cannot read /nonexistent/token"));
}

#[tokio::test]
async fn two_listeners_file_secrets_and_json_logs() {
    let logs = LogDir::new("binary-listeners");
    let token_file = logs.file("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let gw = Gateway::start(
        &logs,
        "gw",
        &[
            ("TOLLGATE_ADMIN_TOKEN_FILE", token_file.to_str().unwrap()),
            ("TOLLGATE_LOG_FORMAT", "json"),
            ("TOLLGATE_DEMO", "on"),
        ],
        true,
    )
    .await;
    let http = Http::new();
    let key = gw.banner("demo key:");

    // The public listener: the customer API and /healthz; nothing internal.
    let call = http
        .send(get(gw.url(&gw.demo_path("/users/me")), Some(&key)))
        .await;
    assert_eq!(call.status, StatusCode::OK, "{}", call.text());
    // The printed dashboard sign-in opens the demo org's dashboard.
    assert_eq!(gw.banner("dashboard:"), gw.url("/dashboard"));
    let sign_in = gw.banner("sign in:");
    let (email, password) = sign_in.split_once(" / ").expect("email / password");
    let form = format!("email={}&password={}", email.replace('@', "%40"), password);
    let login = http
        .send(
            Request::post(gw.url("/dashboard/login"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(form)))
                .unwrap(),
        )
        .await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.text());
    assert!(login
        .headers
        .get_all("set-cookie")
        .iter()
        .any(|c| c.to_str().unwrap().starts_with("tollgate_session=")));
    assert!(
        !gw.stderr().contains(password),
        "the password is not logged"
    );
    for path in ["/admin/orgs", "/metrics", "/readyz"] {
        let a = http
            .admin(Method::POST, gw.url(path), Some(json!({"name": "x"})))
            .await;
        a.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
        assert!(a.headers.contains_key("x-request-id"), "{path}");
    }
    // The internal one: the admin API (token from the file), metrics, probes; no /api.
    let org = http
        .admin(
            Method::POST,
            gw.internal_url("/admin/orgs"),
            Some(json!({"name": "Acme"})),
        )
        .await;
    assert_eq!(org.status, StatusCode::CREATED, "{}", org.text());
    let metrics = http.send(get(gw.internal_url("/metrics"), None)).await;
    assert!(
        metrics.text().contains("tollgate_requests_total"),
        "{}",
        metrics.text()
    );
    for path in ["/readyz", "/healthz"] {
        assert_eq!(
            http.send(get(gw.internal_url(path), None)).await.status,
            StatusCode::OK
        );
    }
    let api = http
        .send(get(gw.internal_url(&gw.demo_path("/users/me")), Some(&key)))
        .await;
    api.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");

    // The banner on stdout, one JSON object per log line on stderr, the token in neither.
    let stdout = gw.stdout();
    assert!(
        stdout.contains(&format!("tollgate listening on http://{}", gw.public)),
        "{stdout}"
    );
    assert!(stdout.contains(&format!(
        "admin API, /metrics and /readyz on http://{}",
        gw.internal.unwrap()
    )));
    let stderr = gw.stderr();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 2, "{stderr}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["message"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("tollgate gateway listening")),
        "{stderr}"
    );
    assert!(!stdout.contains(ADMIN_TOKEN) && !stderr.contains(ADMIN_TOKEN));
    assert!(
        !stdout.contains("\"level\""),
        "log lines on stdout: {stdout}"
    );
}

#[tokio::test]
async fn an_https_signer_with_a_private_ca_and_a_bearer_token() {
    let logs = LogDir::new("binary-https-signer");
    let pem = logs.file("ca.pem");
    let (addr, signed) = signer(Some(self_signed(&pem)), "signer-s3cret", Duration::ZERO).await;
    let token_file = logs.file("signer-token");
    std::fs::write(&token_file, "signer-s3cret\n").unwrap();
    let url = format!("https://localhost:{}/sign", addr.port());
    let base = [
        ("TOLLGATE_SIGNER_URL", url.as_str()),
        ("TOLLGATE_DEMO", "on"),
    ];
    let http = Http::new();

    let with = |extra: &[(&'static str, &str)]| {
        let mut env: Vec<(&str, &str)> = base.to_vec();
        env.extend_from_slice(extra);
        env.into_iter()
            .map(|(k, v)| (k, v.to_owned()))
            .collect::<Vec<_>>()
    };
    let trusted = with(&[
        ("TOLLGATE_CA_FILE", pem.to_str().unwrap()),
        ("TOLLGATE_SIGNER_TOKEN_FILE", token_file.to_str().unwrap()),
    ]);
    let env: Vec<(&str, &str)> = trusted.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = Gateway::start(&logs, "trusted", &env, false).await;
    let key = gw.banner("demo key:");
    let a = http
        .send(get(gw.url(&gw.demo_path("/users/me")), Some(&key)))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(
        signed.load(Ordering::SeqCst),
        1,
        "signed by the https signer"
    );
    assert!(!gw.stderr().contains("signer-s3cret"));
    drop(gw);

    // Without the CA the certificate is not trusted; without the token the signer refuses:
    // both are a signing failure, never charged.
    for (name, extra) in [
        (
            "untrusted",
            vec![("TOLLGATE_SIGNER_TOKEN", "signer-s3cret")],
        ),
        (
            "no-token",
            vec![("TOLLGATE_CA_FILE", pem.to_str().unwrap())],
        ),
    ] {
        let owned = with(&extra);
        let env: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let gw = Gateway::start(&logs, name, &env, false).await;
        let key = gw.banner("demo key:");
        let a = http
            .send(get(gw.url(&gw.demo_path("/users/me")), Some(&key)))
            .await;
        a.assert_error(StatusCode::BAD_GATEWAY, "SIGNING_FAILED");
        let credits = http.send(get(gw.url("/api/credits"), Some(&key))).await;
        assert_eq!(credits.json()["balance"], 1000, "{name}: nothing charged");
    }
    assert_eq!(signed.load(Ordering::SeqCst), 1);
}

/// Starts a request that stays in flight for `signer_delay` (the signer is slow) on a demo
/// gateway with `drain_ms`, and returns when the signer has it.
async fn gateway_with_a_request_in_flight(
    logs: &LogDir,
    signer_delay: Duration,
    drain_ms: &str,
) -> (
    Gateway,
    tokio::task::JoinHandle<Result<support_proc::Answer, String>>,
) {
    let (addr, _) = signer(None, "t0ken-value", signer_delay).await;
    let url = format!("http://{addr}/sign");
    let gw = Gateway::start(
        logs,
        "drain",
        &[
            ("TOLLGATE_SIGNER_URL", &url),
            ("TOLLGATE_SIGNER_TOKEN", "t0ken-value"),
            ("TOLLGATE_SIGNER_TIMEOUT_MS", "60000"),
            ("TOLLGATE_DRAIN_TIMEOUT_MS", drain_ms),
            ("TOLLGATE_DEMO", "on"),
        ],
        true,
    )
    .await;
    let req = get(
        gw.url(&gw.demo_path("/users/me")),
        Some(&gw.banner("demo key:")),
    );
    let in_flight =
        tokio::spawn(async move { Http::new().try_send(req).await.map_err(|e| e.to_string()) });
    // The request has reached the signer when the gateway's open-holds gauge says so.
    let http = Http::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = http
            .send(get(gw.internal_url("/metrics"), None))
            .await
            .text();
        if m.contains("tollgate_open_credit_holds 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the request did not start:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (gw, in_flight)
}

#[tokio::test]
async fn sigterm_drains_requests_in_flight_and_exits_0() {
    let logs = LogDir::new("binary-drain");
    let (mut gw, in_flight) =
        gateway_with_a_request_in_flight(&logs, Duration::from_millis(1_500), "20000").await;
    gw.signal("-TERM");
    let http = Http::new();
    // Draining: /readyz fails on the internal listener, the public one stops accepting.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = http.send(get(gw.internal_url("/readyz"), None)).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(a.json(), json!({"status": "draining"}));
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still {}", a.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The listener closes right after /readyz turns (its accept loop sees the stop), well
    // before the request in flight ends.
    let deadline = Instant::now() + Duration::from_millis(500);
    while tokio::net::TcpStream::connect(gw.public).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the public listener still accepts while draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!in_flight.is_finished(), "the request is still in flight");
    // The request in flight finishes (and is charged), then the process exits 0.
    let answer = in_flight
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", gw.stderr());
    assert!(gw.stderr().contains("stopped"), "{}", gw.stderr());
}

#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_drain_timeout_bounds_the_wait() {
    let logs = LogDir::new("binary-second-signal");
    // The request would stay in flight for a minute; the drain would wait 30 s.
    let (mut gw, in_flight) =
        gateway_with_a_request_in_flight(&logs, Duration::from_secs(60), "30000").await;
    gw.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    gw.signal("-INT");
    let status = gw.wait_exit(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{}", gw.stderr());
    assert!(in_flight.await.unwrap().is_err(), "the connection was cut");
    drop(gw);

    // With a short drain timeout, one signal is enough: the request is dropped (its hold
    // released, nothing charged) and the process still exits 0.
    let (mut gw, in_flight) =
        gateway_with_a_request_in_flight(&logs, Duration::from_secs(60), "500").await;
    let started = Instant::now();
    gw.signal("-TERM");
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", gw.stderr());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(gw.stderr().contains("drain timeout"), "{}", gw.stderr());
    assert!(in_flight.await.unwrap().is_err());
}
