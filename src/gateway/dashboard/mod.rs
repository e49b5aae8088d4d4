//! The web dashboard under `/dashboard`: server-rendered pages (askama templates in
//! `templates/`, one stylesheet embedded in the binary), signed in with a session cookie.
//!
//! - Sessions: `POST /dashboard/login` with `email` + `password` (or `token`, the admin
//!   token, for the operator: only on a listener that serves `/admin`, and an operator's
//!   session is honoured only there too) sets the `tollgate_session` cookie
//!   (an opaque 256-bit token; only its SHA-256 is stored) and redirects (303) into the
//!   dashboard. Wrong password and unknown email get the same answer (401), after the same
//!   Argon2id work; after 5 failures for one email within 15 minutes the rest of that window
//!   gets 429. `POST /dashboard/logout` ends the session.
//! - Invites: `/dashboard/invite/<token>` shows a form that posts `password` (and
//!   optionally `password_confirm`); then the person signs in.
//! - Every state-changing request of a session must carry the session's CSRF token in the
//!   form field `csrf_token`, and its `Origin`, when sent, must be the dashboard's own; else
//!   403 `FORBIDDEN`. A viewer's change is 403 `FORBIDDEN` too; another org's pages are 404.
//! - A page asked for without a live session redirects to `/dashboard/login`. API keys play
//!   no part here, and the session cookie plays none in `/api`.
//! - Errors are HTML pages for browsers (`Accept: text/html`) and `{error, code}` JSON for
//!   other clients, with the same status.
//!
//! Org pages live under `/dashboard/orgs/<org>/…`; `/dashboard` sends a user to their org
//! and the operator to the list of orgs.

mod activity;
mod auth;
mod http;
mod manage;
mod money;
mod pages;
mod signin;
mod views;

use ::http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use ::http::{Method, Request, Response, StatusCode};
use askama::Template;
use bytes::Bytes;
use http_body::Body;
use http_body_util::Full;

use tollgate_core::{BoxError, ErrorCode, Rejection};

use self::http::{html, json_error, secure_headers, wants_html, with_code, with_retry_after};
use self::views::{ErrorPage, Frame};
use super::app::{boxed, GatewayBody};
use super::state::AppState;

pub use self::auth::CSRF_FIELD;
pub use self::http::SESSION_COOKIE;

/// The gateway as one listener's dashboard sees it: the state, and whether this listener
/// serves `/admin` (only there may the operator sign in with the admin token, and only there
/// is an operator's session honoured).
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    state: &'a AppState,
    admin_here: bool,
}

impl Site<'_> {
    /// Whether the operator may sign in (and stay signed in) here: the admin API is on, and
    /// served on this listener.
    pub fn operator_allowed(&self) -> bool {
        self.admin_here && self.state.config.admin_token.is_some()
    }
}

impl std::ops::Deref for Site<'_> {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        self.state
    }
}

/// Answers one `/dashboard` request; `admin_here`: whether this listener serves `/admin`.
pub async fn handle<B>(state: &AppState, req: Request<B>, admin_here: bool) -> Response<GatewayBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let html = wants_html(req.headers());
    let site = Site { state, admin_here };
    let mut res = match route(&site, req).await {
        Ok(res) => res,
        Err(rejection) => failure(html, rejection),
    };
    secure_headers(res.headers_mut());
    res
}

async fn route<B>(state: &Site<'_>, req: Request<B>) -> Result<Response<GatewayBody>, Rejection>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let segments: Vec<&str> = path
        .strip_prefix("/dashboard")
        .unwrap_or_default()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, []) => pages::home(state, req.headers()).await,
        (&Method::GET, ["static", "dashboard.css"]) => {
            Ok(asset(views::STYLESHEET, "text/css; charset=utf-8"))
        }
        (&Method::GET, ["static", "dashboard.js"]) => {
            Ok(asset(views::SCRIPT, "text/javascript; charset=utf-8"))
        }
        (&Method::GET, ["login"]) => signin::login_form(state, req.headers(), &query).await,
        (&Method::POST, ["login"]) => signin::login(state, req).await,
        (&Method::POST, ["logout"]) => signin::logout(state, req).await,
        (&Method::GET, ["invite", token]) => signin::invite_form(state, token).await,
        (&Method::POST, ["invite", token]) => {
            let token = (*token).to_owned();
            signin::accept_invite(state, &token, req).await
        }
        (&Method::GET, ["account"]) => signin::account(state, req.headers(), &query).await,
        (&Method::POST, ["account", "password"]) => signin::change_password(state, req).await,
        (&Method::GET, ["orgs"]) => pages::orgs(state, req.headers()).await,
        (&Method::POST, ["orgs", "create"]) => pages::create_org(state, req).await,
        (&Method::GET, ["orgs", org]) => pages::overview(state, req.headers(), org).await,
        (&Method::GET, ["orgs", org, "team"]) => pages::team(state, req.headers(), org).await,
        (&Method::GET, ["orgs", org, "keys"]) => manage::keys(state, req.headers(), org).await,
        (&Method::POST, ["orgs", org, "keys", "create"]) => {
            let org = (*org).to_owned();
            manage::key_create(state, &org, req).await
        }
        (&Method::POST, ["orgs", org, "keys", key, "revoke"]) => {
            let (org, key) = ((*org).to_owned(), (*key).to_owned());
            manage::key_revoke(state, &org, &key, req).await
        }
        (&Method::POST, ["orgs", org, "keys", key, "rotate"]) => {
            let (org, key) = ((*org).to_owned(), (*key).to_owned());
            manage::key_rotate(state, &org, &key, req).await
        }
        (&Method::GET, ["orgs", org, "models"]) => manage::models(state, req.headers(), org).await,
        (&Method::POST, ["orgs", org, "models", "add"]) => {
            let org = (*org).to_owned();
            manage::model_add(state, &org, req).await
        }
        (&Method::POST, ["orgs", org, "models", model, "reconnect"]) => {
            let (org, model) = ((*org).to_owned(), (*model).to_owned());
            manage::model_reconnect(state, &org, &model, req).await
        }
        (&Method::GET, ["orgs", org, "usage"]) => {
            activity::usage(state, req.headers(), org, &query).await
        }
        (&Method::GET, ["orgs", org, "logs"]) => {
            activity::download(state, req.headers(), org, &query).await
        }
        (&Method::GET, ["orgs", org, "billing"]) => money::billing(state, req.headers(), org).await,
        (
            &Method::POST,
            ["orgs", org, "billing", action @ ("plan" | "cancel" | "topup" | "set-plan" | "set-balance")],
        ) => {
            let (org, action) = ((*org).to_owned(), (*action).to_owned());
            money::billing_action(state, &org, &action, req).await
        }
        (&Method::GET, ["pending"]) => money::pending(state, req.headers()).await,
        (&Method::POST, ["pending", id, action @ ("approve" | "decline")]) => {
            let (id, action) = ((*id).to_owned(), (*action).to_owned());
            money::decide(state, &id, &action, req).await
        }
        (&Method::GET, ["orgs", org, "webhooks"]) => {
            manage::webhooks(state, req.headers(), org).await
        }
        (&Method::POST, ["orgs", org, "webhooks", "create"]) => {
            let org = (*org).to_owned();
            manage::webhook_create(state, &org, req).await
        }
        (&Method::POST, ["orgs", org, "webhooks", id, action @ ("delete" | "test" | "rotate")]) => {
            let (org, id, action) = ((*org).to_owned(), (*id).to_owned(), (*action).to_owned());
            manage::webhook_action(state, &org, &id, &action, req).await
        }
        (&Method::POST, ["orgs", org, "team", "invite"]) => {
            let org = (*org).to_owned();
            pages::team_invite(state, &org, req).await
        }
        (&Method::POST, ["orgs", org, "team", user, "remove"]) => {
            let (org, user) = ((*org).to_owned(), (*user).to_owned());
            pages::team_remove(state, &org, &user, req).await
        }
        _ => Err(Rejection::new(ErrorCode::NotFound).with_message("No such page.")),
    }
}

/// An embedded asset (the stylesheet, the enhancing script).
fn asset(body: &'static str, content_type: &'static str) -> Response<GatewayBody> {
    let mut res = Response::new(boxed(Full::new(Bytes::from_static(body.as_bytes()))));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The URL carries the assets' version, so it can be cached for long.
    res.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    res
}

fn failure(html_wanted: bool, rejection: Rejection) -> Response<GatewayBody> {
    if !html_wanted {
        return json_error(rejection);
    }
    let status = rejection.status();
    let code = rejection.code();
    let retry = rejection.retry_after_secs();
    let heading = match status {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::TOO_MANY_REQUESTS => "Too many attempts",
        StatusCode::SERVICE_UNAVAILABLE => "Temporarily unavailable",
        s if s.is_client_error() => "That did not work",
        _ => "Something went wrong",
    };
    let res = render(
        status,
        &ErrorPage {
            frame: Frame::bare(heading),
            status: status.as_u16(),
            heading: heading.to_owned(),
            message: rejection.message().to_owned(),
            back_href: "/dashboard",
            back_label: "Back to the dashboard",
        },
    );
    let res = with_code(res, code);
    match retry {
        Some(secs) => with_retry_after(res, secs),
        None => res,
    }
}

/// Renders a page; a template failure (which tests rule out) becomes a plain 500.
fn render(status: StatusCode, page: &impl Template) -> Response<GatewayBody> {
    match page.render() {
        Ok(body) => html(status, body),
        Err(e) => {
            tracing::error!(error = %e, "rendering a dashboard page failed");
            json_error(Rejection::new(ErrorCode::InternalError))
        }
    }
}
