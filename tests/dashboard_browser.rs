//! The dashboard in a real browser (docs/contract.md §12): headless Chromium driven through
//! ChromeDriver (WebDriver), against a gateway on loopback. The journeys of the dashboard
//! issue: the operator creates an org and invites its owner; the owner sets a password,
//! creates a key (its secret shown once), calls the API and sees the call on the Overview and
//! Usage pages, revokes the key, reconnects a disconnected model, requests a top-up that the
//! operator approves; a viewer sees no action and a forged post is refused; names with markup
//! render as text; every input is labelled and every button named. Screenshots of every page
//! at 375 px and 1280 px go to `target/dashboard-screenshots/`.
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and `chromium-driver`, installed by
//! `.ci/run`); without them the test is skipped, unless `TOLLGATE_REQUIRE_SERVICES=1`.

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use http::{Method, StatusCode};
use serde_json::json;

use common::TestGateway;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const PASSWORD: &str = "correct horse battery staple";
const XSS_NAME: &str =
    "Acme <script>window.__xss=1</script>\"><img src=x onerror=\"window.__xss=2\">";

/// ChromeDriver on a free port; killed when dropped.
struct Driver {
    child: Child,
    port: u16,
    _profile: TempDir,
}

impl Drop for Driver {
    /// Ends ChromeDriver and every browser it started, also when the test failed half-way
    /// (a browser left running would take CPU from every test after it): the driver runs in
    /// a process group of its own, which is killed whole, and any process still using the
    /// session's profile directory goes too.
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self._profile.0.display().to_string()])
            .status();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts ChromeDriver, or says why it cannot (`None`: skip).
async fn driver() -> Option<Driver> {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "browser tests need {} (apt-get install chromium chromium-driver)",
            missing.join(" and ")
        );
        if std::env::var("TOLLGATE_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!("skipped: {why}");
        return None;
    }
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("chromedriver starts");
    let profile =
        std::env::temp_dir().join(format!("tollgate-chromium-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&profile).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(Driver {
        child,
        port,
        _profile: TempDir(profile),
    })
}

/// A headless Chromium session (a profile of its own, nothing fetched from the network).
async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-quic", "--hide-scrollbars", "--window-size=1280,1000",
                format!("--user-data-dir={}", driver._profile.0.join(format!("p{}", free_port())).display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session")
}

/// The pages seen, for the screenshots and the accessibility check.
struct Tour {
    dir: PathBuf,
    seen: Vec<String>,
}

impl Tour {
    fn new() -> Tour {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        Tour {
            dir,
            seen: Vec::new(),
        }
    }

    /// Checks the page the browser shows and saves it at 375 and 1280 px wide, full height.
    async fn page(&mut self, c: &Client, name: &str) {
        accessible(c, name).await;
        no_script_ran(c, name).await;
        for width in [1280u32, 375] {
            let height: u64 = {
                c.set_window_size(width, 900).await.unwrap();
                let h = c
                    .execute("return document.documentElement.scrollHeight;", vec![])
                    .await
                    .unwrap();
                h.as_u64().unwrap_or(900).clamp(600, 6000)
            };
            c.set_window_size(width, height as u32).await.unwrap();
            let png = c.screenshot().await.unwrap();
            std::fs::write(self.dir.join(format!("{name}-{width}.png")), png).unwrap();
        }
        c.set_window_size(1280, 1000).await.unwrap();
        self.seen.push(name.to_owned());
    }
}

/// Every visible input, select and textarea has a label; every button and link an accessible
/// name; every table its headers.
async fn accessible(c: &Client, page: &str) {
    let problems = c
        .execute(
            r#"
            const problems = [];
            const named = (el) => (el.getAttribute('aria-label') || el.textContent || '').trim().length > 0;
            for (const el of document.querySelectorAll('input, select, textarea')) {
              // Hidden fields, and the username field kept for password managers.
              if (el.type === 'hidden' || el.getAttribute('aria-hidden') === 'true') continue;
              const byFor = el.id && document.querySelector(`label[for="${el.id}"]`);
              const wrapped = el.closest('label');
              if (!byFor && !wrapped && !el.getAttribute('aria-label')) problems.push('unlabelled ' + el.outerHTML.slice(0, 80));
            }
            for (const el of document.querySelectorAll('button, summary, a')) {
              if (!named(el)) problems.push('unnamed ' + el.outerHTML.slice(0, 80));
            }
            for (const t of document.querySelectorAll('table')) {
              if (!t.querySelector('th')) problems.push('a table without headers');
            }
            if (!document.querySelector('h1')) problems.push('no h1');
            return problems;
            "#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(problems, json!([]), "accessibility of {page}");
}

/// The markup of a name never ran (and the CSP would not let inline script run anyway).
async fn no_script_ran(c: &Client, page: &str) {
    let ran = c
        .execute(
            "return [typeof window.__xss, document.querySelectorAll('img[onerror]').length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(ran, json!(["undefined", 0]), "script ran on {page}");
}

async fn goto(c: &Client, base: &str, path: &str) {
    c.goto(&format!("{base}{path}")).await.unwrap();
}

async fn fill(c: &Client, css: &str, text: &str) {
    let el = c
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    el.clear().await.unwrap();
    el.send_keys(text).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Clicks the button whose text contains `text` and waits for the page its form answers
/// with (a new document, loaded).
async fn press(c: &Client, text: &str) {
    c.execute("window.__tollgate_old_page = true;", vec![])
        .await
        .unwrap();
    let xpath = format!("//button[contains(normalize-space(.), '{text}')]");
    c.find(Locator::XPath(&xpath))
        .await
        .unwrap_or_else(|e| panic!("a button {text:?}: {e}"))
        .click()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = c
            .execute(
                "return window.__tollgate_old_page === true ? 'old' : document.readyState;",
                vec![],
            )
            .await;
        if matches!(state, Ok(serde_json::Value::String(ref s)) if s == "complete") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pressing {text:?} loaded no page"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn value(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

/// The page's text (read by script: no element reference to go stale while a form's answer
/// loads; retried while the page is replaced).
async fn body_text(c: &Client) -> String {
    for _ in 0..50 {
        match c
            .execute(
                "return document.body ? document.body.innerText : null;",
                vec![],
            )
            .await
        {
            Ok(serde_json::Value::String(text)) => return text,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    panic!("the page never loaded");
}

async fn sign_in(c: &Client, base: &str, email: &str) {
    goto(c, base, "/dashboard/login").await;
    fill(c, "input[name=email]", email).await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "form button[type=submit]").await;
    wait_for_url(c, "/dashboard/orgs/").await;
}

/// Waits until the browser's URL contains `part` (a form's answer has loaded).
async fn wait_for_url(c: &Client, part: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(url) = c.current_url().await {
            if url.as_str().contains(part) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never reached a URL with {part:?}: {}",
            body_text(c).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn operator_sign_in(c: &Client) {
    click(c, "details.card-quiet > summary").await;
    fill(c, "input[name=token]", common::ADMIN_TOKEN).await;
    press(c, "Sign in as operator").await;
}

async fn sign_out(c: &Client) {
    press(c, "Sign out").await;
}

/// Follows an invite link: sets the password, then signs in.
async fn accept(c: &Client, tour: &mut Tour, base: &str, link: &str, email: &str) {
    c.goto(link).await.unwrap();
    tour.page(c, &format!("invite-{}", email.split('@').next().unwrap()))
        .await;
    fill(c, "input[name=password]", PASSWORD).await;
    fill(c, "input[name=password_confirm]", PASSWORD).await;
    click(c, "form button[type=submit]").await;
    wait_for_url(c, "done=password-set").await;
    sign_in(c, base, email).await;
}

/// A customer call with `key` (not through the browser).
async fn call(gw: &TestGateway, model: &str, key: &str) -> StatusCode {
    gw.send(gw.request(
        Method::GET,
        &format!("/api/models/{model}/users/me"),
        Some(key),
        None,
    ))
    .await
    .status
}

/// Reloads until the page's text contains `needle` (the rollups are written every few seconds).
async fn wait_for_text(c: &Client, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // Case-blind: badges are upper-cased by the stylesheet, and innerText follows it.
        if body_text(c)
            .await
            .to_lowercase()
            .contains(&needle.to_lowercase())
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never showed: {}",
            body_text(c).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        c.refresh().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboards_journeys_in_a_real_browser() {
    let Some(driver) = driver().await else { return };
    let mut config = common::test_config();
    config.dashboard_insecure_cookies = true;
    config.webhook_allow_private = true;
    config.burst = [5, 1_000, 30, 200];
    let gw = common::start(config).await;
    let base = gw.gw.base_url();
    let sandbox = gw.gw.sandbox().unwrap();
    let c = browser(&driver).await;
    let mut tour = Tour::new();

    // The operator signs in, creates an org (a name with markup) on Basic, invites an owner.
    goto(&c, &base, "/dashboard/login").await;
    tour.page(&c, "login").await;
    operator_sign_in(&c).await;
    wait_for_text(&c, "Organizations").await;
    fill(&c, "#org-name", XSS_NAME).await;
    press(&c, "Create organization").await;
    wait_for_text(&c, "Invite someone").await;
    let team_url = c.current_url().await.unwrap().to_string();
    let org = team_url
        .split("/dashboard/orgs/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        body_text(&c)
            .await
            .contains("<script>window.__xss=1</script>"),
        "the name as text"
    );
    fill(&c, "#invite-email", "owner@acme.test").await;
    click(&c, "#invite-role option[value=owner]").await;
    press(&c, "Create invite").await;
    let owner_link = value(&c, "#invite-link").await;
    fill(&c, "#invite-email", "viewer@acme.test").await;
    press(&c, "Create invite").await;
    let viewer_link = value(&c, "#invite-link").await;
    tour.page(&c, "team").await;
    goto(&c, &base, "/dashboard/orgs").await;
    assert!(body_text(&c).await.contains("Basic"), "subscribed");
    tour.page(&c, "operator-orgs").await;
    sign_out(&c).await;

    // The owner sets a password, signs in, adds a model and creates a key: shown once.
    accept(&c, &mut tour, &base, &owner_link, "owner@acme.test").await;
    wait_for_text(&c, "Overview").await;
    let account = sandbox.add_account();
    goto(&c, &base, &format!("/dashboard/orgs/{org}/models")).await;
    fill(&c, "#model-name", "Jane").await;
    fill(&c, "#model-user", &account.user_id).await;
    fill(&c, "#model-xbc", &account.x_bc).await;
    fill(&c, "#model-cookie", &account.cookie).await;
    fill(&c, "#model-ua", &account.user_agent).await;
    press(&c, "Add model").await;
    wait_for_text(&c, "Jane is connected").await;
    let models = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/models"), None)
        .await
        .json();
    let model = models[0]["id"].as_str().unwrap().to_owned();

    goto(&c, &base, &format!("/dashboard/orgs/{org}/keys")).await;
    fill(&c, "#key-name", "browser key").await;
    press(&c, "Create key").await;
    let secret = value(&c, "#new-secret").await;
    assert!(secret.starts_with("sk_live_"), "{secret}");
    // The script (an enhancement) shows the copy button next to the secret.
    let copy_shown = c
        .execute(
            "return !document.querySelector('button[data-copy=new-secret]').hidden;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(copy_shown, json!(true), "the copy button");
    tour.page(&c, "keys-created").await;
    c.refresh().await.unwrap();
    assert!(
        !c.source().await.unwrap().contains(&secret),
        "not shown after a reload"
    );

    // A page that is not there (another org's, or none): the error page.
    goto(
        &c,
        &base,
        &format!("/dashboard/orgs/{}", uuid::Uuid::new_v4()),
    )
    .await;
    wait_for_text(&c, "Not found").await;
    tour.page(&c, "not-found").await;

    // A call with that key shows on the Overview and the Usage pages.
    assert_eq!(call(&gw, &model, &secret).await, StatusCode::OK);
    goto(&c, &base, &format!("/dashboard/orgs/{org}")).await;
    wait_for_text(&c, "Jane").await;
    tour.page(&c, "overview").await;
    goto(&c, &base, &format!("/dashboard/orgs/{org}/usage")).await;
    wait_for_text(&c, "/api/models/:id/users/me").await;
    tour.page(&c, "usage").await;

    // Revoking it from the page: the next call is 401.
    goto(&c, &base, &format!("/dashboard/orgs/{org}/keys")).await;
    click(&c, "details.menu > summary").await;
    click(&c, "details.menu input[name=confirm]").await;
    press(&c, "Revoke browser key").await;
    wait_for_text(&c, "Revoked").await;
    tour.page(&c, "keys").await;
    assert_eq!(call(&gw, &model, &secret).await, StatusCode::UNAUTHORIZED);

    // A second key; the upstream drops the model's session: Disconnected, then reconnected.
    fill(&c, "#key-name", "second key").await;
    press(&c, "Create key").await;
    let second = value(&c, "#new-secret").await;
    assert!(sandbox.expire_session(&account.user_id));
    assert_eq!(call(&gw, &model, &second).await, StatusCode::BAD_GATEWAY);
    goto(&c, &base, &format!("/dashboard/orgs/{org}/models")).await;
    wait_for_text(&c, "Disconnected").await;
    tour.page(&c, "models-disconnected").await;
    let fresh = sandbox.refresh_session(&account.user_id).unwrap();
    let field = |name: &str| format!("form.reconnect-form input[name={name}]");
    fill(&c, &field("cookie"), &fresh.cookie).await;
    fill(&c, &field("user_id"), &fresh.user_id).await;
    fill(&c, &field("x_bc"), &fresh.x_bc).await;
    fill(&c, &field("user_agent"), &fresh.user_agent).await;
    press(&c, "Reconnect Jane").await;
    wait_for_text(&c, "Jane is connected again").await;
    assert!(body_text(&c).await.to_lowercase().contains("connected"));
    tour.page(&c, "models").await;
    assert_eq!(call(&gw, &model, &second).await, StatusCode::OK);

    // Webhooks: an endpoint, a test event delivered.
    let (hook_url, _hits) = common::receiver().await;
    goto(&c, &base, &format!("/dashboard/orgs/{org}/webhooks")).await;
    fill(&c, "#webhook-url", &hook_url).await;
    press(&c, "Add endpoint").await;
    assert!(value(&c, "#new-secret").await.starts_with("whsec_"));
    press(&c, "Send a test event").await;
    goto(&c, &base, &format!("/dashboard/orgs/{org}/webhooks")).await;
    wait_for_text(&c, "Delivered").await;
    tour.page(&c, "webhooks").await;

    // The owner asks for a top-up; the operator approves it; the balance and ledger show it.
    let balance_before = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await
        .json()["balance"]
        .as_u64()
        .unwrap();
    goto(&c, &base, &format!("/dashboard/orgs/{org}/billing")).await;
    fill(&c, "#topup-amount", "500").await;
    press(&c, "Request top-up").await;
    wait_for_text(&c, "500 top-up credits requested").await;
    tour.page(&c, "billing-requested").await;
    goto(&c, &base, "/dashboard/account").await;
    tour.page(&c, "account").await;
    sign_out(&c).await;
    goto(&c, &base, "/dashboard/login").await;
    operator_sign_in(&c).await;
    goto(&c, &base, "/dashboard/pending").await;
    wait_for_text(&c, "500 top-up credits").await;
    tour.page(&c, "pending").await;
    press(&c, "Approve").await;
    wait_for_text(&c, "approved and applied").await;
    let balance_after = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await
        .json()["balance"]
        .as_u64()
        .unwrap();
    assert_eq!(balance_after, balance_before + 500);
    goto(&c, &base, &format!("/dashboard/orgs/{org}/billing")).await;
    let billing = body_text(&c).await;
    assert!(
        billing.contains("Top-up") && billing.contains("+500"),
        "{billing}"
    );
    tour.page(&c, "billing-operator").await;
    sign_out(&c).await;

    // The viewer: every page without an action; a forged post is 403.
    accept(&c, &mut tour, &base, &viewer_link, "viewer@acme.test").await;
    for (name, path) in [
        ("viewer-overview", String::new()),
        ("viewer-keys", "/keys".to_owned()),
        ("viewer-models", "/models".to_owned()),
        ("viewer-billing", "/billing".to_owned()),
        ("viewer-usage", "/usage".to_owned()),
        ("viewer-webhooks", "/webhooks".to_owned()),
        ("viewer-team", "/team".to_owned()),
    ] {
        goto(&c, &base, &format!("/dashboard/orgs/{org}{path}")).await;
        let forms = c
            .execute(
                "return [...document.querySelectorAll('form[method=post]')].map(f => f.getAttribute('action')).filter(a => a !== '/dashboard/logout');",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(forms, json!([]), "{name}: a viewer sees actions");
        tour.page(&c, name).await;
    }
    // The page's own token, a form the viewer's page never offered: refused with the 403
    // page (the CSP lets no script fetch; a form is what a forger has).
    c.execute(
        r#"
        window.__tollgate_old_page = true;
        const token = document.querySelector('input[name=csrf_token]').value;
        const form = document.createElement('form');
        form.method = 'post';
        form.action = location.pathname.replace(/\/team$/, '') + '/keys/create';
        for (const [k, v] of [['csrf_token', token], ['name', 'forged']]) {
          const input = document.createElement('input');
          input.type = 'hidden'; input.name = k; input.value = v;
          form.appendChild(input);
        }
        document.body.appendChild(form);
        form.submit();
        "#,
        vec![],
    )
    .await
    .unwrap();
    wait_for_text(&c, "Viewers can see everything but change nothing").await;
    assert!(body_text(&c).await.contains("403"));
    let keys = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/keys"), None)
        .await
        .json();
    assert!(keys
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["name"] != "forged"));

    c.close().await.unwrap();
    assert!(tour.seen.len() >= 20, "{:?}", tour.seen);
    eprintln!(
        "screenshots of {} pages in {}",
        tour.seen.len(),
        tour.dir.display()
    );
    gw.gw.shutdown().await;
}
