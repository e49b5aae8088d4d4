//! End to end: dashboard users and sessions (SPEC §10) over real HTTP on a loopback port.
//!
//! Invites, passwords, sign-in (cookie attributes, identical failures, the throttle), the
//! session's pages and its end (sign-out, password change, user deletion), CSRF and the
//! origin check, roles, tenancy, the operator, and the wall between API keys and sessions.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use common::{Answer, TestGateway};
use tollgate::core::{ManualClock, OrgId};
use tollgate::gateway::{self, memory_backends, AdminBind};

const PASSWORD: &str = "correct horse battery staple";

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

/// A browser-like client of one gateway: keeps the session cookie, sends forms.
struct Browser<'a> {
    gw: &'a TestGateway,
    /// The listener it talks to (`http://host:port`).
    base: String,
    cookie: Option<String>,
    /// Sends `Accept: text/html` (errors as pages) when set.
    html: bool,
}

impl<'a> Browser<'a> {
    fn new(gw: &'a TestGateway) -> Self {
        Browser::at(gw, gw.gw.base_url())
    }

    /// A browser of the listener at `base`.
    fn at(gw: &'a TestGateway, base: String) -> Self {
        Browser {
            gw,
            base,
            cookie: None,
            html: false,
        }
    }

    fn request(&self, method: Method, path: &str, body: Option<String>) -> Request<Full<Bytes>> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("tollgate_session={c}"));
        }
        if self.html {
            req = req.header("accept", "text/html,application/xhtml+xml");
        }
        if body.is_some() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        req.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap()
    }

    async fn get(&self, path: &str) -> Answer {
        self.gw.send(self.request(Method::GET, path, None)).await
    }

    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        self.gw
            .send(self.request(Method::POST, path, Some(form(fields))))
            .await
    }

    /// A post with the session's CSRF token read from `page`.
    async fn post_csrf(&self, page: &str, path: &str, fields: &[(&str, &str)]) -> Answer {
        let token = csrf_of(&self.get(page).await);
        let mut all = vec![("csrf_token", token.as_str())];
        all.extend_from_slice(fields);
        self.post(path, &all).await
    }

    /// Signs in; on success keeps the new cookie.
    async fn sign_in(&mut self, email: &str, password: &str) -> Answer {
        let answer = self
            .post(
                "/dashboard/login",
                &[("email", email), ("password", password)],
            )
            .await;
        if let Some(c) = session_of(&answer) {
            self.cookie = Some(c);
        }
        answer
    }
}

/// The session token a `Set-Cookie` sets (not when it clears it).
fn session_of(answer: &Answer) -> Option<String> {
    answer
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("tollgate_session="))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
        .find(|v| !v.is_empty())
}

/// The value of the first hidden `csrf_token` field of a page.
fn csrf_of(page: &Answer) -> String {
    let text = page.text();
    let at = text
        .find("name=\"csrf_token\" value=\"")
        .unwrap_or_else(|| panic!("a CSRF field in {} {text}", page.status));
    let rest = &text[at + "name=\"csrf_token\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

fn location(answer: &Answer) -> &str {
    answer
        .headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.code(), code, "{}", answer.text());
}

fn demo_org(gw: &TestGateway) -> OrgId {
    gw.gw.demo().unwrap().org
}

/// `GET /admin/orgs/:org/users` without the demo org's seeded owner (whose sign-in the demo
/// banner prints).
async fn users_of(gw: &TestGateway, org: OrgId) -> Value {
    let seeded = gw.gw.demo().map(|d| d.dashboard_email.clone());
    let answer = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/users"), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    Value::Array(
        answer
            .json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| Some(u["email"].as_str().unwrap_or_default().to_owned()) != seeded)
            .cloned()
            .collect(),
    )
}

/// `POST /admin/orgs/:org/users`; returns (user id, the invite URL's path).
async fn invite(gw: &TestGateway, org: OrgId, email: &str, role: &str) -> (String, String) {
    let answer = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/users"),
            Some(json!({"email": email, "role": role})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["email"], email.to_lowercase());
    assert_eq!(body["role"], role);
    let url = body["invite_url"].as_str().unwrap();
    let path = &url[url.find("/dashboard/invite/").expect("an invite path")..];
    (body["id"].as_str().unwrap().to_owned(), path.to_owned())
}

/// Invites and sets the password; returns the user id.
async fn user(gw: &TestGateway, org: OrgId, email: &str, role: &str) -> String {
    let (id, path) = invite(gw, org, email, role).await;
    let set = Browser::new(gw)
        .post(&path, &[("password", PASSWORD)])
        .await;
    assert_eq!(set.status, StatusCode::SEE_OTHER, "{}", set.text());
    id
}

async fn signed_in<'a>(gw: &'a TestGateway, email: &str) -> Browser<'a> {
    let mut b = Browser::new(gw);
    let answer = b.sign_in(email, PASSWORD).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.text());
    b
}

#[tokio::test]
async fn invite_set_password_sign_in_see_a_page_sign_out() {
    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    let (_, path) = invite(&gw, org, "Ana@Example.com", "owner").await;
    let listed = users_of(&gw, org).await;
    assert_eq!(listed[0]["email"], "ana@example.com");
    assert_eq!(listed[0]["status"], "invited");

    let anon = Browser::new(&gw);
    let form_page = anon.get(&path).await;
    assert_eq!(form_page.status, StatusCode::OK);
    assert!(form_page.text().contains("ana@example.com"));
    assert!(form_page.text().contains("name=\"password\""));
    assert_eq!(form_page.headers["cache-control"], "no-store");
    assert_eq!(form_page.headers["referrer-policy"], "same-origin");

    let short = anon.post(&path, &[("password", "too short")]).await;
    assert_error(&short, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    let mismatch = anon
        .post(
            &path,
            &[
                ("password", PASSWORD),
                ("password_confirm", "something else entirely"),
            ],
        )
        .await;
    assert_error(&mismatch, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    let set = anon
        .post(
            &path,
            &[("password", PASSWORD), ("password_confirm", PASSWORD)],
        )
        .await;
    assert_eq!(set.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&set), "/dashboard/login?done=password-set");

    // The invite was single use.
    assert_error(&anon.get(&path).await, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_error(
        &anon
            .post(&path, &[("password", "another long password")])
            .await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );

    let mut b = Browser::new(&gw);
    let login = b.sign_in("ana@example.com", PASSWORD).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.text());
    assert_eq!(location(&login), format!("/dashboard/orgs/{org}"));
    let cookie = login.headers["set-cookie"].to_str().unwrap().to_owned();
    let token = b.cookie.clone().unwrap();
    assert_eq!(token.len(), 64, "a 256-bit token: {cookie}");
    assert_eq!(
        cookie,
        format!("tollgate_session={token}; HttpOnly; SameSite=Lax; Path=/; Max-Age=604800; Secure")
    );

    let home = b.get("/dashboard").await;
    assert_eq!(home.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&home), format!("/dashboard/orgs/{org}"));
    let page = b.get(&format!("/dashboard/orgs/{org}")).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text();
    for needle in [
        "Overview",
        "Demo Org",
        "Basic",
        "1,000",
        "ana@example.com",
        "Sign out",
    ] {
        assert!(html.contains(needle), "{needle} in the overview");
    }
    assert!(page.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    let css = b
        .get(
            &html[html.find("/dashboard/static/").unwrap()..][..html
                [html.find("/dashboard/static/").unwrap()..]
                .find('"')
                .unwrap()],
        )
        .await;
    assert_eq!(css.status, StatusCode::OK);
    assert_eq!(css.headers["content-type"], "text/css; charset=utf-8");

    // Sign-out needs the CSRF token; then the cookie opens nothing.
    let forged = b.post("/dashboard/logout", &[]).await;
    assert_error(&forged, StatusCode::FORBIDDEN, "FORBIDDEN");
    let out = b
        .post_csrf("/dashboard/account", "/dashboard/logout", &[])
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(
        out.headers["set-cookie"],
        "tollgate_session=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0; Secure"
    );
    let after = b.get(&format!("/dashboard/orgs/{org}")).await;
    assert_eq!(after.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&after), "/dashboard/login");
    let login_page = Browser::new(&gw).get("/dashboard/login").await;
    assert_eq!(login_page.status, StatusCode::OK);
    assert!(
        login_page.text().contains("name=\"email\"")
            && login_page.text().contains("name=\"token\"")
    );
}

#[tokio::test]
async fn insecure_cookies_drop_secure_and_invite_links_use_http() {
    let mut config = common::test_config();
    config.dashboard_insecure_cookies = true;
    let gw = common::start(config).await;
    let org = demo_org(&gw);
    let answer = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/users"),
            Some(json!({"email": "ana@example.com", "role": "viewer"})),
        )
        .await;
    let url = answer.json()["invite_url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with(&format!("http://{}/dashboard/invite/", gw.gw.local_addr())),
        "{url}"
    );
    let path = &url[url.find("/dashboard").unwrap()..];
    Browser::new(&gw)
        .post(path, &[("password", PASSWORD)])
        .await;
    let login = Browser::new(&gw).sign_in("ana@example.com", PASSWORD).await;
    let cookie = login.headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.ends_with("; HttpOnly; SameSite=Lax; Path=/; Max-Age=604800"),
        "{cookie}"
    );
}

#[tokio::test]
async fn expired_invites_are_refused() {
    let clock = ManualClock::new(tollgate::core::Clock::now_ms(&tollgate::core::SystemClock));
    let backends = memory_backends(std::sync::Arc::new(clock.clone()));
    let gw = TestGateway::new(
        gateway::start_with(common::test_config(), backends)
            .await
            .unwrap(),
    );
    let (_, path) = invite(&gw, demo_org(&gw), "late@example.com", "owner").await;
    clock.advance(Duration::from_secs(72 * 3600 - 1));
    assert_eq!(Browser::new(&gw).get(&path).await.status, StatusCode::OK);
    clock.advance(Duration::from_secs(1));
    let b = Browser::new(&gw);
    assert_error(&b.get(&path).await, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_error(
        &b.post(&path, &[("password", PASSWORD)]).await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    let html = Browser {
        html: true,
        ..Browser::new(&gw)
    }
    .get(&path)
    .await;
    assert_eq!(html.status, StatusCode::NOT_FOUND);
    assert!(html
        .text()
        .contains("invalid, has expired or was already used"));
    assert_error(
        &b.get("/dashboard/invite/not-a-token").await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    let failed = Browser::new(&gw).sign_in("late@example.com", "").await;
    assert_error(&failed, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
}

#[tokio::test]
async fn wrong_password_and_unknown_email_look_alike_and_the_sixth_failure_gets_429() {
    let gw = common::start(common::test_config()).await;
    user(&gw, demo_org(&gw), "ana@example.com", "owner").await;
    let mut b = Browser::new(&gw);

    let timed = |email: String, password: &'static str| {
        let gw = &gw;
        async move {
            let started = Instant::now();
            let answer = Browser::new(gw).sign_in(&email, password).await;
            (answer, started.elapsed())
        }
    };
    let mut wrong_times = Vec::new();
    let mut unknown_times = Vec::new();
    let mut answers = Vec::new();
    for i in 0..3 {
        let (wrong, t1) = timed("ana@example.com".into(), "not the password at all").await;
        let (unknown, t2) =
            timed(format!("nobody{i}@example.com"), "not the password at all").await;
        wrong_times.push(t1);
        unknown_times.push(t2);
        answers.push((wrong, unknown));
    }
    for (wrong, unknown) in &answers {
        assert_error(wrong, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        assert_eq!(wrong.status, unknown.status);
        assert_eq!(
            wrong.headers["content-type"],
            unknown.headers["content-type"]
        );
        assert_eq!(wrong.body, unknown.body, "identical answers");
        assert!(wrong.headers.get("set-cookie").is_none());
    }
    // Both ran Argon2id: the unknown email is not answered without the work.
    let (w, u) = (
        wrong_times.iter().min().unwrap(),
        unknown_times.iter().min().unwrap(),
    );
    assert!(
        u.as_secs_f64() >= w.as_secs_f64() * 0.3,
        "unknown email {u:?} vs wrong password {w:?}"
    );

    // The same for browsers: the page, not JSON, and still identical.
    b.html = true;
    let wrong = b.sign_in("ana@example.com", "still not the password").await;
    let unknown = b
        .sign_in("nobody-html@example.com", "still not the password")
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.body, unknown.body);
    assert!(wrong.text().contains("The email or password is incorrect."));
    assert!(wrong.text().contains("name=\"password\""), "the form again");

    // That was failure 4 for ana; one more, then the 6th attempt is refused even with the
    // right password, for the rest of the window.
    b.html = false;
    assert_error(
        &b.sign_in("ana@example.com", "wrong again, fifth").await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    );
    let sixth = b.sign_in("ana@example.com", PASSWORD).await;
    assert_error(&sixth, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED");
    let retry: u64 = sixth.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (800..=900).contains(&retry),
        "the rest of the 15-minute window: {retry}"
    );
    assert!(b.cookie.is_none());
    // Other emails are not affected.
    user(&gw, demo_org(&gw), "bob@example.com", "viewer").await;
    assert_eq!(
        b.sign_in("bob@example.com", PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn a_password_change_ends_the_users_other_sessions() {
    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    user(&gw, org, "ana@example.com", "viewer").await;
    let mut here = signed_in(&gw, "ana@example.com").await;
    let elsewhere = signed_in(&gw, "ana@example.com").await;
    let old_here = here.cookie.clone();
    let page = format!("/dashboard/orgs/{org}");
    assert_eq!(elsewhere.get(&page).await.status, StatusCode::OK);

    let wrong = here
        .post_csrf(
            "/dashboard/account",
            "/dashboard/account/password",
            &[
                ("current_password", "not my password"),
                ("new_password", "a brand new password"),
            ],
        )
        .await;
    assert_error(&wrong, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    let short = here
        .post_csrf(
            "/dashboard/account",
            "/dashboard/account/password",
            &[("current_password", PASSWORD), ("new_password", "short")],
        )
        .await;
    assert_error(&short, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    let no_csrf = here
        .post(
            "/dashboard/account/password",
            &[
                ("current_password", PASSWORD),
                ("new_password", "a brand new password"),
            ],
        )
        .await;
    assert_error(&no_csrf, StatusCode::FORBIDDEN, "FORBIDDEN");

    // A viewer may change their own password.
    let changed = here
        .post_csrf(
            "/dashboard/account",
            "/dashboard/account/password",
            &[
                ("current_password", PASSWORD),
                ("new_password", "a brand new password"),
            ],
        )
        .await;
    assert_eq!(changed.status, StatusCode::SEE_OTHER, "{}", changed.text());
    assert_eq!(
        location(&changed),
        "/dashboard/account?done=password-changed"
    );
    here.cookie = session_of(&changed);
    assert_ne!(here.cookie, old_here);
    assert_eq!(
        here.get(&page).await.status,
        StatusCode::OK,
        "this browser stays signed in"
    );
    let ended = elsewhere.get(&page).await;
    assert_eq!(ended.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&ended), "/dashboard/login");
    let old = Browser {
        cookie: old_here,
        ..Browser::new(&gw)
    };
    assert_eq!(
        old.get(&page).await.status,
        StatusCode::SEE_OTHER,
        "the old cookie is dead too"
    );

    let mut b = Browser::new(&gw);
    assert_error(
        &b.sign_in("ana@example.com", PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    );
    assert_eq!(
        b.sign_in("ana@example.com", "a brand new password")
            .await
            .status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn viewers_change_nothing_and_every_change_needs_the_csrf_token_and_origin() {
    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    user(&gw, org, "owner@example.com", "owner").await;
    user(&gw, org, "viewer@example.com", "viewer").await;
    let owner = signed_in(&gw, "owner@example.com").await;
    let viewer = signed_in(&gw, "viewer@example.com").await;
    let team = format!("/dashboard/orgs/{org}/team");
    let invite_path = format!("{team}/invite");

    let viewer_page = viewer.get(&team).await;
    assert_eq!(viewer_page.status, StatusCode::OK);
    assert!(
        !viewer_page.text().contains("Create invite"),
        "no action buttons for viewers"
    );
    let by_viewer = viewer
        .post_csrf(
            &team,
            &invite_path,
            &[("email", "x@example.com"), ("role", "viewer")],
        )
        .await;
    assert_error(&by_viewer, StatusCode::FORBIDDEN, "FORBIDDEN");

    let fields = [("email", "new@example.com"), ("role", "viewer")];
    assert_error(
        &owner.post(&invite_path, &fields).await,
        StatusCode::FORBIDDEN,
        "FORBIDDEN",
    );
    let wrong = owner
        .post(
            &invite_path,
            &[("csrf_token", &"0".repeat(64)), fields[0], fields[1]],
        )
        .await;
    assert_error(&wrong, StatusCode::FORBIDDEN, "FORBIDDEN");
    // Another session's token does not do either.
    let viewers_token = csrf_of(&viewer.get(&team).await);
    let borrowed = owner
        .post(
            &invite_path,
            &[("csrf_token", &viewers_token), fields[0], fields[1]],
        )
        .await;
    assert_error(&borrowed, StatusCode::FORBIDDEN, "FORBIDDEN");
    // The right token from another site.
    let token = csrf_of(&owner.get(&team).await);
    let mut cross = owner.request(
        Method::POST,
        &invite_path,
        Some(form(&[("csrf_token", &token), fields[0], fields[1]])),
    );
    cross
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    assert_error(&gw.send(cross).await, StatusCode::FORBIDDEN, "FORBIDDEN");
    assert_eq!(
        users_of(&gw, org).await.as_array().unwrap().len(),
        2,
        "nothing was created"
    );

    // With the token and our own origin it works: the invite link is shown once.
    let mut ok = owner.request(
        Method::POST,
        &invite_path,
        Some(form(&[("csrf_token", &token), fields[0], fields[1]])),
    );
    let origin = format!("http://{}", gw.gw.local_addr());
    ok.headers_mut().insert("origin", origin.parse().unwrap());
    let created = gw.send(ok).await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text());
    assert!(created.text().contains("/dashboard/invite/"));
    assert!(
        !owner.get(&team).await.text().contains("/dashboard/invite/"),
        "not shown again"
    );
    assert!(owner.get(&team).await.text().contains("new@example.com"));
}

#[tokio::test]
async fn a_user_of_one_org_never_sees_or_changes_another() {
    let gw = common::start(common::test_config()).await;
    let a = demo_org(&gw);
    let b_org = gw
        .admin(
            Method::POST,
            "/admin/orgs",
            Some(json!({"name": "Other Org"})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b: OrgId = b_org.parse().unwrap();
    user(&gw, a, "ana@a.example", "owner").await;
    let bobs_id = user(&gw, b, "bob@b.example", "owner").await;
    let ana = signed_in(&gw, "ana@a.example").await;
    let own_team = format!("/dashboard/orgs/{a}/team");

    for path in [
        format!("/dashboard/orgs/{b}"),
        format!("/dashboard/orgs/{b}/team"),
        format!("/dashboard/orgs/{}", OrgId::new()),
    ] {
        assert_error(&ana.get(&path).await, StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    let invite_b = ana
        .post_csrf(
            &own_team,
            &format!("/dashboard/orgs/{b}/team/invite"),
            &[("email", "x@example.com"), ("role", "owner")],
        )
        .await;
    assert_error(&invite_b, StatusCode::NOT_FOUND, "NOT_FOUND");
    let remove_b = ana
        .post_csrf(
            &own_team,
            &format!("/dashboard/orgs/{b}/team/{bobs_id}/remove"),
            &[],
        )
        .await;
    assert_error(&remove_b, StatusCode::NOT_FOUND, "NOT_FOUND");
    // Bob's id under ana's own org is no user of hers either.
    let remove_via_a = ana
        .post_csrf(
            &own_team,
            &format!("/dashboard/orgs/{a}/team/{bobs_id}/remove"),
            &[],
        )
        .await;
    assert_error(&remove_via_a, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert!(!ana.get(&own_team).await.text().contains("bob@b.example"));
    let bobs = gw
        .admin(Method::GET, &format!("/admin/orgs/{b}/users"), None)
        .await
        .json();
    assert_eq!(bobs.as_array().unwrap().len(), 1, "bob is still there");
    let orgs = ana.get("/dashboard/orgs").await;
    assert_eq!(
        orgs.status,
        StatusCode::SEE_OTHER,
        "users do not get the operator's list"
    );
}

#[tokio::test]
async fn api_keys_open_no_dashboard_and_sessions_call_no_api() {
    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    user(&gw, org, "ana@example.com", "owner").await;
    let b = signed_in(&gw, "ana@example.com").await;
    let key = gw.key();

    let with_key = gw
        .send(gw.request(
            Method::GET,
            &format!("/dashboard/orgs/{org}"),
            Some(&key),
            None,
        ))
        .await;
    assert_eq!(with_key.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&with_key), "/dashboard/login");
    let mut bearer = gw.request(Method::GET, "/dashboard", None, None);
    bearer
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    assert_eq!(gw.send(bearer).await.status, StatusCode::SEE_OTHER);

    for path in [
        gw.model_path("/users/me"),
        "/api/credits".to_owned(),
        "/api/usage".to_owned(),
    ] {
        let answer = b.get(&path).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "INVALID_API_KEY");
    }
    assert_eq!(gw.balance().await, Some(1000), "nothing was charged");
}

#[tokio::test]
async fn the_operator_signs_in_with_the_admin_token_and_sees_every_org() {
    let gw = common::start(common::test_config()).await;
    let named = gw
        .admin(
            Method::POST,
            "/admin/orgs",
            Some(json!({"name": "<script>alert(1)</script> & Co"})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut op = Browser::new(&gw);
    let wrong = op
        .post("/dashboard/login", &[("token", "not-the-token")])
        .await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let login = op
        .post("/dashboard/login", &[("token", common::ADMIN_TOKEN)])
        .await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&login), "/dashboard/orgs");
    op.cookie = session_of(&login);
    let list = op.get("/dashboard/orgs").await;
    assert_eq!(list.status, StatusCode::OK);
    let html = list.text();
    assert!(html.contains("Demo Org") && html.contains(&named));
    assert!(
        html.contains("&#60;script&#62;alert(1)&#60;/script&#62; &#38; Co")
            || html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co"),
        "escaped"
    );
    assert!(!html.contains("<script>alert(1)"));
    let overview = op.get(&format!("/dashboard/orgs/{named}")).await;
    assert_eq!(overview.status, StatusCode::OK);
    assert!(!overview.text().contains("<script>alert"));
    // The operator may change any org: invite its first owner from the dashboard.
    let team = format!("/dashboard/orgs/{named}/team");
    let created = op
        .post_csrf(
            &team,
            &format!("{team}/invite"),
            &[("email", "first@example.com"), ("role", "owner")],
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text());

    // Where the admin API is off, the token opens nothing.
    let mut config = common::test_config();
    config.admin_token = None;
    let closed = common::start(config).await;
    let refused = Browser::new(&closed)
        .post("/dashboard/login", &[("token", common::ADMIN_TOKEN)])
        .await;
    assert_error(&refused, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert!(!Browser::new(&closed)
        .get("/dashboard/login")
        .await
        .text()
        .contains("name=\"token\""));
}

/// The dashboard is on both listeners, but the admin token signs the operator in only where
/// `/admin` is served, and an operator's session counts only there (browsers send the
/// cookies of one host to all its ports).
#[tokio::test]
async fn the_operator_signs_in_only_on_the_listener_that_serves_admin() {
    let mut config = common::test_config();
    config.admin_bind = AdminBind::Separate("127.0.0.1:0".parse().unwrap());
    config.dashboard_insecure_cookies = true;
    let gw = common::start(config).await;
    let internal = gw.gw.admin_base_url();
    assert_ne!(internal, gw.gw.base_url(), "two listeners");

    // The public listener: no token field, a posted token is a failed sign-in, no /admin.
    let public = Browser::new(&gw);
    let page = public.get("/dashboard/login").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("name=\"email\""));
    assert!(!page.text().contains("name=\"token\""));
    let refused = public
        .post("/dashboard/login", &[("token", common::ADMIN_TOKEN)])
        .await;
    assert_error(&refused, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(session_of(&refused), None);
    let admin_here = gw
        .send(
            Request::get(gw.url("/admin/orgs"))
                .header("authorization", format!("Bearer {}", common::ADMIN_TOKEN))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_error(&admin_here, StatusCode::NOT_FOUND, "NOT_FOUND");

    // The internal listener: the operator signs in and sees every org.
    let mut op = Browser::at(&gw, internal.clone());
    assert!(op
        .get("/dashboard/login")
        .await
        .text()
        .contains("name=\"token\""));
    let login = op
        .post("/dashboard/login", &[("token", common::ADMIN_TOKEN)])
        .await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.text());
    assert_eq!(location(&login), "/dashboard/orgs");
    op.cookie = session_of(&login);
    assert!(op.cookie.is_some());
    let orgs = op.get("/dashboard/orgs").await;
    assert_eq!(orgs.status, StatusCode::OK);
    assert!(orgs.text().contains("Demo Org"));

    // The same cookie on the public listener opens nothing.
    let mut carried = Browser::new(&gw);
    carried.cookie = op.cookie.clone();
    let away = carried.get("/dashboard/orgs").await;
    assert_eq!(away.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&away), "/dashboard/login");
    // …and stays good where it belongs.
    assert_eq!(op.get("/dashboard/orgs").await.status, StatusCode::OK);

    // Customers use the dashboard on the public listener (invited through the internal one).
    let org = demo_org(&gw);
    let invited = gw
        .send(
            Request::post(format!("{internal}/admin/orgs/{org}/users"))
                .header("authorization", format!("Bearer {}", common::ADMIN_TOKEN))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    json!({"email": "pub@example.com", "role": "owner"}).to_string(),
                )))
                .unwrap(),
        )
        .await;
    assert_eq!(invited.status, StatusCode::CREATED, "{}", invited.text());
    let url = invited.json()["invite_url"].as_str().unwrap().to_owned();
    let path = &url[url.find("/dashboard/invite/").unwrap()..];
    let set = public.post(path, &[("password", PASSWORD)]).await;
    assert_eq!(set.status, StatusCode::SEE_OTHER, "{}", set.text());
    let mut customer = Browser::new(&gw);
    let signed = customer.sign_in("pub@example.com", PASSWORD).await;
    assert_eq!(signed.status, StatusCode::SEE_OTHER, "{}", signed.text());
    let home = customer.get(&format!("/dashboard/orgs/{org}")).await;
    assert_eq!(home.status, StatusCode::OK);
    assert!(home.text().contains("Demo Org"));
    // A customer's session is good on both listeners.
    let mut inside = Browser::at(&gw, internal);
    inside.cookie = customer.cookie.clone();
    assert_eq!(
        inside.get(&format!("/dashboard/orgs/{org}")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_admin_users_api_validates_lists_and_deletes() {
    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    let users = format!("/admin/orgs/{org}/users");
    for (body, code) in [
        (json!({"role": "owner"}), "INVALID_REQUEST"),
        (json!({"email": "a@example.com"}), "INVALID_REQUEST"),
        (
            json!({"email": "not an email", "role": "owner"}),
            "INVALID_REQUEST",
        ),
        (
            json!({"email": "a@example.com", "role": "admin"}),
            "INVALID_REQUEST",
        ),
        (json!({"email": 5, "role": "owner"}), "INVALID_REQUEST"),
    ] {
        let answer = gw.admin(Method::POST, &users, Some(body.clone())).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, code);
    }
    let unknown = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{}/users", OrgId::new()),
            Some(json!({"email": "a@example.com", "role": "owner"})),
        )
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_error(
        &gw.admin(
            Method::GET,
            &format!("/admin/orgs/{}/users", OrgId::new()),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );

    let id = user(&gw, org, "ana@example.com", "owner").await;
    // Emails are unique across the installation, whatever their case.
    let other = gw
        .admin(Method::POST, "/admin/orgs", Some(json!({"name": "B"})))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let taken = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{other}/users"),
            Some(json!({"email": "ANA@example.com", "role": "viewer"})),
        )
        .await;
    assert_error(&taken, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    let listed = users_of(&gw, org).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["role"], "owner");
    assert_eq!(listed[0]["status"], "active");
    assert!(listed[0].get("invite_url").is_none() && listed[0].get("password").is_none());

    let b = signed_in(&gw, "ana@example.com").await;
    let deleted = gw
        .admin(Method::DELETE, &format!("/admin/users/{id}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.json(), json!({"id": id, "deleted": true}));
    assert_eq!(
        b.get(&format!("/dashboard/orgs/{org}")).await.status,
        StatusCode::SEE_OTHER,
        "the session ended"
    );
    assert_error(
        &gw.admin(Method::DELETE, &format!("/admin/users/{id}"), None)
            .await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_error(
        &gw.admin(Method::DELETE, "/admin/users/nope", None).await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_error(
        &Browser::new(&gw).sign_in("ana@example.com", PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    );
}

// ---------------------------------------------------------------------------------------------
// API Keys and Webhooks pages (SPEC §12, §13, §15)

/// The first `sk_live_…` secret in a page.
fn secret_in(page: &Answer, prefix: &str) -> Option<String> {
    let text = page.text();
    let at = text.find(&format!("value=\"{prefix}"))?;
    let rest = &text[at + "value=\"".len()..];
    Some(rest[..rest.find('"').unwrap()].to_owned())
}

/// A customer call with `key`.
async fn api(gw: &TestGateway, method: Method, path: &str, key: &str) -> Answer {
    let mut req = gw.request(method.clone(), path, Some(key), None);
    if method == Method::POST {
        *req.body_mut() = Full::new(Bytes::from_static(b"{\"text\":\"hi\"}"));
        req.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
    }
    gw.send(req).await
}

#[tokio::test]
async fn an_owner_creates_rotates_and_revokes_keys_in_the_dashboard() {
    let mut config = common::test_config();
    config.burst = [5, 1_000, 30, 200];
    let gw = common::start(config).await;
    let org = demo_org(&gw);
    let model = gw.model();
    user(&gw, org, "keys@example.com", "owner").await;
    let mut owner = signed_in(&gw, "keys@example.com").await;
    let page_path = format!("/dashboard/orgs/{org}/keys");
    let page = owner.get(&page_path).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    assert!(page.text().contains("Create key"));
    assert!(page.text().contains("aria-current=\"page\">API Keys<"));

    // Create: a read-only key for the demo model with a limit and an expiry, named with markup.
    let tomorrow = chrono_date(2);
    let name = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>";
    let model_field = format!("model_{model}");
    let created = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/create"),
            &[
                ("name", name),
                ("expires_on", &tomorrow),
                ("scopes", "read"),
                ("credit_limit", "3"),
                (&model_field, "on"),
            ],
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text());
    let secret = secret_in(&created, "sk_live_").expect("the new secret on the page");
    // Its copy button waits for the script: without it, nothing that does not work shows.
    assert!(created
        .text()
        .contains("data-copy=\"new-secret\" hidden>Copy</button>"));
    assert!(
        !created.text().contains("<script>alert(1)"),
        "the name is escaped"
    );
    assert!(
        created.text().contains("&#60;script&#62;alert(1)"),
        "shown as text"
    );
    assert!(!created.text().contains("<img src=x"));
    let reloaded = owner.get(&page_path).await;
    assert!(!reloaded.text().contains(&secret), "shown only once");
    assert!(
        reloaded.text().contains(&secret[..12]),
        "its prefix is listed"
    );

    // It is the key the form described.
    let keys = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/keys"), None)
        .await
        .json();
    let key = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .expect("the new key")
        .clone();
    assert_eq!(key["scopes"], json!(["read"]));
    assert_eq!(key["models"], json!([model]));
    assert_eq!(key["credit_limit"], 3);
    // Valid through the chosen day: it expires when the next one starts.
    let day_after = chrono_date(3);
    assert!(key["expires_at"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{day_after}T00:00:00")));
    let read = api(&gw, Method::GET, &gw.model_path("/users/me"), &secret).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    let write = api(
        &gw,
        Method::POST,
        &gw.model_path("/chats/1/messages"),
        &secret,
    )
    .await;
    assert_eq!(write.status, StatusCode::FORBIDDEN, "{}", write.text());
    assert_eq!(write.code(), "KEY_FORBIDDEN");

    // Bad input: the page again with the reason, nothing created.
    owner.html = true;
    for (fields, needle) in [
        (vec![("name", "  ")], "name"),
        (
            vec![("name", "x"), ("credit_limit", "lots")],
            "credit limit",
        ),
        (vec![("name", "x"), ("expires_on", "2001-01-01")], "future"),
        (
            vec![("name", "x"), ("expires_on", "+262143-12-31")],
            "expiry date",
        ),
        (vec![("name", "x"), ("scopes", "admin")], "access"),
    ] {
        let answer = owner
            .post_csrf(&page_path, &format!("{page_path}/create"), &fields)
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{fields:?}");
        assert!(answer.text().contains("role=\"alert\""), "{fields:?}");
        assert!(
            answer.text().to_lowercase().contains(needle),
            "{fields:?}: {}",
            answer.text()
        );
    }
    owner.html = false;
    let count = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/keys"), None)
        .await
        .json()
        .as_array()
        .unwrap()
        .len();
    assert_eq!(count, 2, "the demo key and the new one only");

    // Rotate with no grace: the new secret once, the old key refused at once.
    let id = key["id"].as_str().unwrap();
    let rotated = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/{id}/rotate"),
            &[("grace_seconds", "0")],
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    let new_secret = secret_in(&rotated, "sk_live_").expect("the rotated secret");
    assert_ne!(new_secret, secret);
    let old = api(&gw, Method::GET, &gw.model_path("/users/me"), &secret).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    let new = api(&gw, Method::GET, &gw.model_path("/users/me"), &new_secret).await;
    assert_eq!(new.status, StatusCode::OK, "{}", new.text());
    let listed = owner.get(&page_path).await.text();
    assert!(listed.contains("Revoked") && listed.contains("Active"));

    // Revoke asks for the confirmation, then the key is refused.
    let new_id = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/keys"), None)
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name && k["status"] == "active")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let unconfirmed = owner
        .post_csrf(&page_path, &format!("{page_path}/{new_id}/revoke"), &[])
        .await;
    assert_eq!(unconfirmed.status, StatusCode::BAD_REQUEST);
    let still = api(&gw, Method::GET, &gw.model_path("/users/me"), &new_secret).await;
    assert_eq!(still.status, StatusCode::OK);
    let revoked = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/{new_id}/revoke"),
            &[("confirm", "yes")],
        )
        .await;
    assert_eq!(revoked.status, StatusCode::SEE_OTHER, "{}", revoked.text());
    let after = api(&gw, Method::GET, &gw.model_path("/users/me"), &new_secret).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);

    // Another org's key is not found through this org's pages.
    let other = gw
        .admin(Method::POST, "/admin/orgs", Some(json!({"name": "Other"})))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let foreign = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{other}/keys"),
            Some(json!({"name": "theirs"})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cross = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/{foreign}/revoke"),
            &[("confirm", "yes")],
        )
        .await;
    assert_eq!(cross.status, StatusCode::NOT_FOUND);
}

/// `YYYY-MM-DD`, `days` from today (UTC).
fn chrono_date(days: u64) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + days * 86_400_000;
    tollgate::core::time::rfc3339_from_ms(ms)[..10].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_manages_webhooks_in_the_dashboard_and_a_viewer_only_looks() {
    let mut config = common::test_config();
    config.webhook_allow_private = true;
    let gw = common::start(config).await;
    let org = demo_org(&gw);
    user(&gw, org, "hooks@example.com", "owner").await;
    user(&gw, org, "looks@example.com", "viewer").await;
    let mut owner = signed_in(&gw, "hooks@example.com").await;
    let viewer = signed_in(&gw, "looks@example.com").await;
    let page_path = format!("/dashboard/orgs/{org}/webhooks");
    let (url, received) = common::receiver().await;

    let empty = owner.get(&page_path).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert!(empty.text().contains("No endpoints yet"));
    let created = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/create"),
            &[
                ("url", &url),
                ("event_model.disconnected", "on"),
                ("event_credits.low", "on"),
            ],
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text());
    let secret = secret_in(&created, "whsec_").expect("the signing secret on the page");
    assert!(
        !owner.get(&page_path).await.text().contains(&secret),
        "shown once"
    );
    let listed = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/webhooks"), None)
        .await
        .json();
    assert_eq!(listed[0]["url"], url.as_str());
    assert_eq!(
        listed[0]["events"],
        json!(["credits.low", "model.disconnected"])
    );
    let id = listed[0]["id"].as_str().unwrap().to_owned();

    // A test event: delivered, and the page shows it.
    let tested = owner
        .post_csrf(&page_path, &format!("{page_path}/{id}/test"), &[])
        .await;
    assert_eq!(tested.status, StatusCode::OK);
    assert!(tested.text().contains("webhook.test event is on its way"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = owner.get(&page_path).await.text();
        if text.contains("Delivered") && text.contains("HTTP 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the delivery never showed: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(received.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The viewer sees the endpoint and its deliveries, and no action.
    let seen = viewer.get(&page_path).await;
    assert_eq!(seen.status, StatusCode::OK);
    assert!(seen.text().contains(&url) && seen.text().contains("Delivered"));
    for action in [
        "Add endpoint",
        "Send a test event",
        "Rotate secret",
        "Remove endpoint",
    ] {
        assert!(!seen.text().contains(action), "a viewer sees {action}");
    }
    let forged = viewer
        .post_csrf(
            &page_path,
            &format!("{page_path}/{id}/delete"),
            &[("confirm", "yes")],
        )
        .await;
    assert_error(&forged, StatusCode::FORBIDDEN, "FORBIDDEN");

    // Bad input: the reason on the page.
    owner.html = true;
    let bad = owner
        .post_csrf(&page_path, &format!("{page_path}/create"), &[("url", &url)])
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.text().contains("role=\"alert\"") && bad.text().contains("events"));
    owner.html = false;

    // Rotate: a new secret, shown once.
    let rotated = owner
        .post_csrf(&page_path, &format!("{page_path}/{id}/rotate"), &[])
        .await;
    assert_eq!(rotated.status, StatusCode::OK);
    let new_secret = secret_in(&rotated, "whsec_").unwrap();
    assert_ne!(new_secret, secret);

    // Remove needs the confirmation.
    let unconfirmed = owner
        .post_csrf(&page_path, &format!("{page_path}/{id}/delete"), &[])
        .await;
    assert_eq!(unconfirmed.status, StatusCode::BAD_REQUEST);
    let removed = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/{id}/delete"),
            &[("confirm", "yes")],
        )
        .await;
    assert_eq!(removed.status, StatusCode::SEE_OTHER);
    assert!(owner
        .get(&page_path)
        .await
        .text()
        .contains("No endpoints yet"));
}

#[tokio::test]
async fn the_dashboard_refuses_a_private_webhook_address_without_the_test_setting() {
    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    user(&gw, org, "strict@example.com", "owner").await;
    let mut owner = signed_in(&gw, "strict@example.com").await;
    owner.html = true;
    let page_path = format!("/dashboard/orgs/{org}/webhooks");
    let answer = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/create"),
            &[
                ("url", "https://127.0.0.1:9/x"),
                ("event_credits.low", "on"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.text().contains("loopback"), "{}", answer.text());
    assert!(owner
        .get(&page_path)
        .await
        .text()
        .contains("No endpoints yet"));
}

#[tokio::test]
async fn a_disconnected_model_shows_and_the_reconnect_form_brings_it_back() {
    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    user(&gw, org, "models@example.com", "owner").await;
    user(&gw, org, "watcher@example.com", "viewer").await;
    let mut owner = signed_in(&gw, "models@example.com").await;
    let viewer = signed_in(&gw, "watcher@example.com").await;
    let page_path = format!("/dashboard/orgs/{org}/models");
    let key = gw.key();

    let page = owner.get(&page_path).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("Demo Model") && page.text().contains("Connected"));
    assert!(page.text().contains("Never"), "never disconnected yet");

    // The upstream refuses the session: the page says so, with when.
    let sandbox = gw.gw.sandbox().unwrap();
    let account = sandbox.accounts().remove(0);
    assert!(sandbox.expire_session(&account.user_id));
    let refused = api(&gw, Method::GET, &gw.model_path("/users/me"), &key).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    let page = owner.get(&page_path).await.text();
    assert!(page.contains(">Disconnected<"), "{page}");
    assert!(
        page.contains(&chrono_date(0)),
        "the day it was disconnected: {page}"
    );

    // A viewer sees it, without the form.
    let seen = viewer.get(&page_path).await.text();
    assert!(seen.contains(">Disconnected<") && !seen.contains("Reconnect Demo Model"));

    // Bad session material: the reason, still disconnected.
    owner.html = true;
    let model = gw.model();
    let bad = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/{model}/reconnect"),
            &[
                ("cookie", ""),
                ("user_id", "1"),
                ("x_bc", "x"),
                ("user_agent", "u"),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.text().contains("session.cookie"), "{}", bad.text());
    owner.html = false;

    // The reconnect form with fresh material: connected, and calls work again.
    let fresh = sandbox.refresh_session(&account.user_id).unwrap();
    let done = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/{model}/reconnect"),
            &[
                ("cookie", &fresh.cookie),
                ("user_id", &fresh.user_id),
                ("x_bc", &fresh.x_bc),
                ("user_agent", &fresh.user_agent),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text());
    assert!(done.text().contains("Demo Model is connected again"));
    let ok = api(&gw, Method::GET, &gw.model_path("/users/me"), &key).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());

    // Adding a model: connected at once, callable with the org's keys.
    let second = sandbox.add_account();
    let added = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/add"),
            &[
                ("name", "Second <b>model</b>"),
                ("cookie", &second.cookie),
                ("user_id", &second.user_id),
                ("x_bc", &second.x_bc),
                ("user_agent", &second.user_agent),
            ],
        )
        .await;
    assert_eq!(added.status, StatusCode::OK, "{}", added.text());
    assert!(!added.text().contains("<b>model</b>"));
    let models = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/models"), None)
        .await
        .json();
    let id = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "Second <b>model</b>")
        .expect("the new model")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let call = api(
        &gw,
        Method::GET,
        &format!("/api/models/{id}/users/me"),
        &key,
    )
    .await;
    assert_eq!(call.status, StatusCode::OK, "{}", call.text());
    // Another org's model cannot be reconnected through this org's page.
    let other = gw
        .admin(
            Method::POST,
            "/admin/orgs",
            Some(json!({"name": "Elsewhere"})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let theirs = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{other}/models"),
            Some(json!({"name": "theirs", "session": sandbox.add_account().session_json()})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cross = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/{theirs}/reconnect"),
            &[
                ("cookie", "c"),
                ("user_id", "1"),
                ("x_bc", "x"),
                ("user_agent", "u"),
            ],
        )
        .await;
    assert_eq!(cross.status, StatusCode::NOT_FOUND);
}

/// The operator, signed in with the admin token.
async fn operator(gw: &TestGateway) -> Browser<'_> {
    let mut op = Browser::new(gw);
    let login = op
        .post("/dashboard/login", &[("token", common::ADMIN_TOKEN)])
        .await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    op.cookie = session_of(&login);
    op
}

#[tokio::test]
async fn top_ups_and_paid_plans_wait_for_the_operator_who_approves_or_declines() {
    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    user(&gw, org, "payer@example.com", "owner").await;
    user(&gw, org, "reader@example.com", "viewer").await;
    let owner = signed_in(&gw, "payer@example.com").await;
    let viewer = signed_in(&gw, "reader@example.com").await;
    let op = operator(&gw).await;
    let page_path = format!("/dashboard/orgs/{org}/billing");
    let before = gw.balance().await.unwrap();

    let page = owner.get(&page_path).await;
    assert_eq!(page.status, StatusCode::OK);
    let text = page.text();
    for plan in [
        "Free",
        "Basic",
        "Pro",
        "Enterprise",
        "$29/month",
        "Current plan",
    ] {
        assert!(text.contains(plan), "{plan} on the page");
    }
    assert!(
        text.contains("Plan change"),
        "the subscription's ledger row"
    );

    // A top-up is a request: nothing changes until the operator approves.
    let asked = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/topup"),
            &[("amount", "2500")],
        )
        .await;
    assert_eq!(asked.status, StatusCode::OK, "{}", asked.text());
    assert!(asked.text().contains("2,500 top-up credits requested"));
    assert!(asked.text().contains(">Pending<"));
    assert_eq!(gw.balance().await, Some(before));
    // So is a paid plan.
    let pro = owner
        .post_csrf(&page_path, &format!("{page_path}/plan"), &[("plan", "pro")])
        .await;
    assert_eq!(pro.status, StatusCode::OK);
    assert!(pro.text().contains("Pro plan requested"));
    assert!(pro.text().contains(">Requested<"));

    // The operator's list shows both; a user cannot see it.
    let pending = op.get("/dashboard/pending").await;
    assert_eq!(pending.status, StatusCode::OK);
    assert!(pending.text().contains("2,500 top-up credits") && pending.text().contains("Pro plan"));
    assert_eq!(
        owner.get("/dashboard/pending").await.status,
        StatusCode::NOT_FOUND
    );
    let forged = owner
        .post_csrf(
            &page_path,
            "/dashboard/pending/00000000-0000-0000-0000-000000000000/approve",
            &[],
        )
        .await;
    assert_eq!(forged.status, StatusCode::NOT_FOUND);

    // Approve the top-up: the balance and the ledger show it, once.
    let approve = |text: &str, what: &str| {
        let at = text
            .find(what)
            .unwrap_or_else(|| panic!("{what} in {text}"));
        let rest = &text[at..];
        let start = rest.find("/dashboard/pending/").unwrap();
        let end = rest[start..].find('"').unwrap();
        rest[start..start + end].to_owned()
    };
    let topup_approve = approve(&pending.text(), "2,500 top-up credits");
    assert!(topup_approve.ends_with("/approve"));
    let done = op
        .post_csrf("/dashboard/pending", &topup_approve, &[])
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text());
    assert!(done.text().contains("approved and applied"));
    assert_eq!(gw.balance().await, Some(before + 2_500));
    let again = op
        .post_csrf("/dashboard/pending", &topup_approve, &[])
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "decided once");
    assert_eq!(gw.balance().await, Some(before + 2_500));
    // The application's answer lost after the ledger applied it (a commit that failed
    // ambiguously) reopens the request; approving it again adds nothing more.
    let id: uuid::Uuid = topup_approve
        .trim_start_matches("/dashboard/pending/")
        .trim_end_matches("/approve")
        .parse()
        .unwrap();
    gw.gw.state().billing.reopen(id).await.unwrap();
    let reapproved = op
        .post_csrf("/dashboard/pending", &topup_approve, &[])
        .await;
    assert_eq!(reapproved.status, StatusCode::OK, "{}", reapproved.text());
    assert_eq!(gw.balance().await, Some(before + 2_500), "applied once");
    // Nothing is left for the reconciliation to do.
    let state = gw.gw.state();
    tollgate::gateway::billing::reconcile_top_ups(state)
        .await
        .unwrap();
    assert_eq!(gw.balance().await, Some(before + 2_500));
    let billing = owner.get(&page_path).await.text();
    assert!(
        billing.contains("Top-up") && billing.contains("+2,500"),
        "{billing}"
    );
    assert!(billing.contains(">Approved<"));

    // Decline the plan: nothing changes.
    let pending = op.get("/dashboard/pending").await.text();
    let pro_decline = approve(&pending, "Pro plan").replace("/approve", "/decline");
    let declined = op.post_csrf("/dashboard/pending", &pro_decline, &[]).await;
    assert_eq!(declined.status, StatusCode::OK);
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await
        .json();
    assert_eq!(view["plan"], "basic");
    assert!(owner.get(&page_path).await.text().contains(">Declined<"));

    // Free takes effect at once.
    let free = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/plan"),
            &[("plan", "free")],
        )
        .await;
    assert_eq!(free.status, StatusCode::OK);
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await
        .json();
    assert_eq!(view["plan"], "free");

    // A viewer sees the page without a button; a forged post is 403.
    let seen = viewer.get(&page_path).await.text();
    assert!(!seen.contains("Request top-up") && !seen.contains("Cancel subscription"));
    assert!(!seen.contains("Request Pro"));
    let by_viewer = viewer
        .post_csrf(
            &page_path,
            &format!("{page_path}/topup"),
            &[("amount", "5")],
        )
        .await;
    assert_error(&by_viewer, StatusCode::FORBIDDEN, "FORBIDDEN");

    // Bad input, then a cancellation that needs its confirmation.
    let bad = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/topup"),
            &[("amount", "0")],
        )
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    let unconfirmed = owner
        .post_csrf(&page_path, &format!("{page_path}/cancel"), &[])
        .await;
    assert_error(&unconfirmed, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    let cancelled = owner
        .post_csrf(
            &page_path,
            &format!("{page_path}/cancel"),
            &[("confirm", "yes")],
        )
        .await;
    assert_eq!(cancelled.status, StatusCode::OK);
    let call = api(&gw, Method::GET, &gw.model_path("/users/me"), &gw.key()).await;
    assert_eq!(call.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(call.code(), "NO_SUBSCRIPTION");

    // Cancelled, Free is no longer at once (cancel-and-resubscribe would refill its credits
    // every time): a request, asked once however often it is clicked.
    let page = owner.get(&page_path).await.text();
    assert!(page.contains("Request Free") && !page.contains("Switch to Free"));
    for _ in 0..2 {
        let again = owner
            .post_csrf(
                &page_path,
                &format!("{page_path}/plan"),
                &[("plan", "free")],
            )
            .await;
        assert_eq!(again.status, StatusCode::OK);
        assert!(again.text().contains("Free plan requested"));
    }
    let view = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await
        .json();
    assert_eq!(view["plan"], Value::Null, "still cancelled");
    let pending = op.get("/dashboard/pending").await.text();
    assert_eq!(
        pending
            .matches("<td data-label=\"Asked for\">Free plan</td>")
            .count(),
        1,
        "{pending}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_calls_show_on_the_overview_and_usage_pages_and_download() {
    let mut config = common::test_config();
    config.burst = [5, 1_000, 30, 200];
    let gw = common::start(config).await;
    let org = demo_org(&gw);
    user(&gw, org, "counts@example.com", "viewer").await;
    let viewer = signed_in(&gw, "counts@example.com").await;
    let key = gw.key();
    for _ in 0..3 {
        let ok = api(&gw, Method::GET, &gw.model_path("/users/me"), &key).await;
        assert_eq!(ok.status, StatusCode::OK);
    }
    // A 402 after the balance is gone: a client error of the org.
    gw.admin(
        Method::PUT,
        &format!("/admin/orgs/{org}/credits"),
        Some(json!({"balance": 0})),
    )
    .await;
    let refused = api(&gw, Method::GET, &gw.model_path("/users/me"), &key).await;
    assert_eq!(refused.status, StatusCode::PAYMENT_REQUIRED);

    // The rollups are written by the log worker: wait for them.
    let usage_path = format!("/dashboard/orgs/{org}/usage");
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = viewer.get(&usage_path).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        let text = page.text();
        if text.contains("<td data-label=\"Requests\">4</td>") {
            break text;
        }
        assert!(Instant::now() < deadline, "the usage never showed: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(page.contains("<svg class=\"chart\""), "the chart is drawn");
    assert!(page.contains("<td data-label=\"Successful\">3</td>"));
    assert!(page.contains("<td data-label=\"Credits\">3</td>"));
    assert!(page.contains("/api/models/:id/users/me"), "recent requests");
    assert!(page.contains("Demo Model"));

    // Filters: only the 200s; a bad status is 400.
    let filtered = viewer.get(&format!("{usage_path}?status=200")).await.text();
    assert_eq!(filtered.matches("badge-2xx").count(), 3, "{filtered}");
    assert!(!filtered.contains("badge-4xx"));
    assert_error(
        &viewer.get(&format!("{usage_path}?status=abc")).await,
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    let last_hour = viewer
        .get(&format!("{usage_path}?period=1h&status=200"))
        .await
        .text();
    assert_eq!(last_hour.matches("badge-2xx").count(), 3);
    assert!(
        last_hour.contains("period=1h"),
        "the downloads keep the period"
    );
    assert_error(
        &viewer.get(&format!("{usage_path}?period=1y")).await,
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    let hourly = viewer.get(&format!("{usage_path}?granularity=hour")).await;
    assert_eq!(hourly.status, StatusCode::OK);
    assert!(hourly.text().contains("<td data-label=\"Requests\">4</td>"));

    // Downloads: the §6 export of the org.
    let ndjson = viewer
        .get(&format!(
            "/dashboard/orgs/{org}/logs?format=ndjson&status=200"
        ))
        .await;
    assert_eq!(ndjson.status, StatusCode::OK);
    assert!(ndjson.headers["content-disposition"]
        .to_str()
        .unwrap()
        .contains("requests.ndjson"));
    let lines: Vec<Value> = ndjson
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l["status"] == 200 && l["credits"] == 1));
    let recent = viewer
        .get(&format!(
            "/dashboard/orgs/{org}/logs?format=ndjson&period=1h"
        ))
        .await;
    assert_eq!(recent.text().lines().count(), 4);
    let csv = viewer
        .get(&format!("/dashboard/orgs/{org}/logs?format=csv"))
        .await;
    assert_eq!(csv.text().lines().count(), 1 + 4, "{}", csv.text());

    // The Overview: the period's counts, the chart, the busiest model and route.
    let overview = viewer.get(&format!("/dashboard/orgs/{org}")).await.text();
    assert!(overview.contains("<svg class=\"chart\""));
    assert!(overview.contains("Busiest models") && overview.contains("Demo Model"));
    assert!(overview.contains("<code>/api/models/:id/users/me</code>"));
    // Another org's usage is not reachable.
    let other = gw
        .admin(
            Method::POST,
            "/admin/orgs",
            Some(json!({"name": "Not yours"})),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        viewer
            .get(&format!("/dashboard/orgs/{other}/usage"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        viewer
            .get(&format!("/dashboard/orgs/{other}/logs?format=csv"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

/// A replica that stopped between approving a top-up and applying it (or whose ledger failed,
/// and then the reopen too) leaves an approved request without its credits; the
/// reconciliation applies it, once, however often it runs.
#[tokio::test]
async fn an_approved_top_up_left_unapplied_is_applied_once_by_the_reconciliation() {
    use tollgate::gateway::billing::{self, Ask, RequestState};

    let gw = common::start(common::test_config()).await;
    let org = demo_org(&gw);
    let state = gw.gw.state();
    let before = gw.balance().await.unwrap();
    let asked = billing::ask(
        state,
        org,
        Ask::TopUp { amount: 700 },
        "payer@example.com".into(),
    )
    .await
    .unwrap();
    assert_eq!(asked.state, RequestState::Pending);
    // Approved, and then the process stopped: nothing applied.
    state
        .billing
        .decide(asked.id, RequestState::Approved, 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gw.balance().await, Some(before));

    // (The gateway's own reconciliation job may get there first: either way, once.)
    assert!(billing::reconcile_top_ups(state).await.unwrap() <= 1);
    assert_eq!(gw.balance().await, Some(before + 700));
    for _ in 0..3 {
        assert_eq!(billing::reconcile_top_ups(state).await.unwrap(), 0);
    }
    assert_eq!(gw.balance().await, Some(before + 700), "once");
}
