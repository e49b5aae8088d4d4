//! Signing in and out, invites, and the password of the signed-in user.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;

use tollgate_accounts::{
    check_new_password, constant_time_eq, normalize_email, SecretToken, SessionSubject, SignInGate,
    User, ABSOLUTE_TIMEOUT, MAX_PASSWORD_BYTES, MIN_PASSWORD_CHARS,
};
use tollgate_core::{BoxError, Clock as _, ErrorCode, Rejection, SystemClock};

use super::auth::{self, check_csrf, forbidden, origin_ok, Viewer, Who};
use super::http::{
    clear_session_cookie, json_error, read_form, redirect, session_cookie, set_cookie, wants_html,
    with_code, with_retry_after,
};
use super::views::{AccountPage, Frame, InvitePage, LoginPage};
use super::Site;
use super::{pages, render};
use crate::gateway::app::GatewayBody;

type Answer = Result<Response<GatewayBody>, Rejection>;

/// The one answer to every failed sign-in, whatever failed.
const BAD_CREDENTIALS: &str = "The email or password is incorrect.";

/// The throttle key of the operator's sign-ins from `client`: per address, so wrong tokens
/// sent from one place cannot lock the operator out everywhere (the token is a long random
/// secret: it is guessing from one address that needs slowing down).
fn operator_key(client: Option<std::net::IpAddr>) -> String {
    match client {
        Some(ip) => format!("operator:{ip}"),
        None => "operator".to_owned(),
    }
}

fn notice_for(query: &str) -> Option<String> {
    let done = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "done")
        .map(|(_, v)| v.into_owned())?;
    match done.as_str() {
        "signed-out" => Some("You are signed out.".to_owned()),
        "password-set" => {
            Some("Your password is set. Sign in with your email and new password.".to_owned())
        }
        "password-changed" => {
            Some("Your password is changed. Your other sessions were signed out.".to_owned())
        }
        _ => None,
    }
}

pub async fn login_form(state: &Site<'_>, headers: &HeaderMap, query: &str) -> Answer {
    if auth::viewer(state, headers).await?.is_some() {
        return Ok(redirect("/dashboard"));
    }
    Ok(render(
        StatusCode::OK,
        &LoginPage {
            frame: Frame::bare("Sign in"),
            error: None,
            notice: notice_for(query),
            operator_enabled: state.operator_allowed(),
        },
    ))
}

/// The login page again with an error (browsers), or `{error, code}`, with `status`.
fn login_failure(state: &Site<'_>, html: bool, rejection: Rejection) -> Response<GatewayBody> {
    let status = rejection.status();
    let retry = rejection.retry_after_secs();
    let res = if html {
        with_code(
            render(
                status,
                &LoginPage {
                    frame: Frame::bare("Sign in"),
                    error: Some(rejection.message().to_owned()),
                    notice: None,
                    operator_enabled: state.operator_allowed(),
                },
            ),
            rejection.code(),
        )
    } else {
        json_error(rejection)
    };
    match retry {
        Some(secs) => with_retry_after(res, secs),
        None => res,
    }
}

fn throttled(until_ms: u64) -> Rejection {
    let secs = until_ms
        .saturating_sub(SystemClock.now_ms())
        .div_ceil(1000)
        .max(1);
    let minutes = secs.div_ceil(60);
    Rejection::new(ErrorCode::RateLimitExceeded)
        .with_message(format!(
            "Too many failed sign-in attempts. Try again in {minutes} minute{}.",
            if minutes == 1 { "" } else { "s" }
        ))
        .with_retry_after(secs)
}

fn bad_credentials() -> Rejection {
    Rejection::new(ErrorCode::Unauthorized).with_message(BAD_CREDENTIALS)
}

/// Starts a session for `subject` and sends the browser to `to` with its cookie.
async fn start_session(state: &Site<'_>, subject: SessionSubject, to: &str) -> Answer {
    let token = SecretToken::generate().map_err(|e| e.rejection())?;
    state
        .accounts
        .sessions
        .create(token.hash(), subject)
        .await
        .map_err(|e| e.rejection())?;
    Ok(set_cookie(
        redirect(to),
        session_cookie(
            token.expose(),
            ABSOLUTE_TIMEOUT.as_secs(),
            state.config.dashboard_insecure_cookies,
        ),
    ))
}

fn landing(user: &User) -> String {
    format!("/dashboard/orgs/{}", user.org)
}

pub async fn login<B>(state: &Site<'_>, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    if !origin_ok(&headers) {
        return Err(forbidden("The request did not come from the dashboard."));
    }
    let client = req
        .extensions()
        .get::<crate::gateway::app::PeerAddr>()
        .map(|p| p.0.ip());
    let html = wants_html(&headers);
    let form = read_form(req).await?;
    let users = &state.accounts.users;

    if !form.get("token").is_empty() {
        // The operator: only where the admin API is served.
        let Some(expected) = state
            .config
            .admin_token
            .as_deref()
            .filter(|_| state.operator_allowed())
        else {
            return Ok(login_failure(state, html, bad_credentials()));
        };
        let gate = users
            .sign_in_attempt(operator_key(client))
            .await
            .map_err(|e| e.rejection())?;
        if let SignInGate::Throttled { until_ms } = gate {
            return Ok(login_failure(state, html, throttled(until_ms)));
        }
        if !constant_time_eq(form.get("token"), expected) {
            return Ok(login_failure(state, html, bad_credentials()));
        }
        users
            .sign_in_succeeded(operator_key(client))
            .await
            .map_err(|e| e.rejection())?;
        return start_session(state, SessionSubject::Operator, "/dashboard/orgs").await;
    }

    let typed = form.get("email");
    let email = normalize_email(typed);
    // Junk that is no email is throttled (and answered) like an unknown email.
    let key = format!(
        "email:{}",
        email.clone().unwrap_or_else(|| typed.trim().to_lowercase())
    );
    let gate = users
        .sign_in_attempt(key.clone())
        .await
        .map_err(|e| e.rejection())?;
    if let SignInGate::Throttled { until_ms } = gate {
        return Ok(login_failure(state, html, throttled(until_ms)));
    }
    let credentials = match email {
        Some(email) => users.credentials(email).await.map_err(|e| e.rejection())?,
        None => None,
    };
    let password = form.get("password");
    // Unknown email, no password set yet, or an impossible password: the same Argon2id
    // work against a dummy hash, so neither the answer nor its timing tells them apart.
    let hash = credentials
        .as_ref()
        .and_then(|c| c.password_hash.as_deref())
        .filter(|_| password.len() <= MAX_PASSWORD_BYTES);
    let checked = truncated(password, MAX_PASSWORD_BYTES);
    let matches = state
        .accounts
        .passwords
        .verify(checked, hash)
        .await
        .map_err(|e| e.rejection())?;
    match credentials {
        Some(c) if matches => {
            users
                .sign_in_succeeded(key)
                .await
                .map_err(|e| e.rejection())?;
            start_session(state, SessionSubject::User(c.user.id), &landing(&c.user)).await
        }
        _ => Ok(login_failure(state, html, bad_credentials())),
    }
}

pub async fn logout<B>(state: &Site<'_>, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    let viewer = auth::viewer(state, &headers).await?;
    let form = read_form(req).await?;
    if let Some(viewer) = viewer {
        check_csrf(&viewer, &headers, &form)?;
        state
            .accounts
            .sessions
            .revoke(viewer.token.hash())
            .await
            .map_err(|e| e.rejection())?;
    }
    Ok(set_cookie(
        redirect("/dashboard/login?done=signed-out"),
        clear_session_cookie(state.config.dashboard_insecure_cookies),
    ))
}

fn invalid_invite() -> Rejection {
    Rejection::new(ErrorCode::NotFound).with_message(
        "This invite link is invalid, has expired or was already used. Ask for a new invite.",
    )
}

async fn pending_invite(state: &Site<'_>, token: &str) -> Result<(SecretToken, User), Rejection> {
    let token = SecretToken::parse(token).ok_or_else(invalid_invite)?;
    let user = state
        .accounts
        .users
        .pending_invite(token.hash())
        .await
        .map_err(|e| e.rejection())?
        .ok_or_else(invalid_invite)?;
    Ok((token, user))
}

fn invite_page(token: &SecretToken, user: &User, error: Option<String>) -> InvitePage {
    InvitePage {
        frame: Frame::bare("Set your password"),
        email: user.email.clone(),
        role: user.role.as_str(),
        action: format!("/dashboard/invite/{}", token.expose()),
        error,
        min_chars: MIN_PASSWORD_CHARS,
    }
}

pub async fn invite_form(state: &Site<'_>, token: &str) -> Answer {
    let (token, user) = pending_invite(state, token).await?;
    Ok(render(StatusCode::OK, &invite_page(&token, &user, None)))
}

pub async fn accept_invite<B>(state: &Site<'_>, token: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    if !origin_ok(&headers) {
        return Err(forbidden("The request did not come from the dashboard."));
    }
    let html = wants_html(&headers);
    let form = read_form(req).await?;
    let (token, user) = pending_invite(state, token).await?;
    let password = form.get("password");
    let problem = if form.has("password_confirm") && form.get("password_confirm") != password {
        Some("The two passwords differ.".to_owned())
    } else {
        check_new_password(password).err().map(|e| e.to_string())
    };
    if let Some(problem) = problem {
        let rejection = Rejection::new(ErrorCode::InvalidRequest).with_message(problem.clone());
        return Ok(if html {
            with_code(
                render(
                    StatusCode::BAD_REQUEST,
                    &invite_page(&token, &user, Some(problem)),
                ),
                ErrorCode::InvalidRequest,
            )
        } else {
            json_error(rejection)
        });
    }
    let hash = state
        .accounts
        .passwords
        .hash(password)
        .await
        .map_err(|e| e.rejection())?;
    state
        .accounts
        .users
        .accept_invite(token.hash(), hash)
        .await
        .map_err(|e| e.rejection())?
        .ok_or_else(invalid_invite)?;
    Ok(redirect("/dashboard/login?done=password-set"))
}

fn account_page(viewer: &Viewer, notice: Option<String>, error: Option<String>) -> AccountPage {
    let (who, _) = viewer.label();
    AccountPage {
        frame: Frame::with_nav("Your account", pages::nav(viewer, None)),
        who,
        is_operator: viewer.is_operator(),
        notice,
        error,
        min_chars: MIN_PASSWORD_CHARS,
    }
}

pub async fn account(state: &Site<'_>, headers: &HeaderMap, query: &str) -> Answer {
    let Some(viewer) = auth::viewer(state, headers).await? else {
        return Ok(redirect("/dashboard/login"));
    };
    Ok(render(
        StatusCode::OK,
        &account_page(&viewer, notice_for(query), None),
    ))
}

/// `POST /dashboard/account/password` (`current_password`, `new_password`): sets the new
/// password, ends every session of the user, and signs this browser in again.
pub async fn change_password<B>(state: &Site<'_>, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    let Some(viewer) = auth::viewer(state, &headers).await? else {
        return Ok(redirect("/dashboard/login"));
    };
    let form = read_form(req).await?;
    check_csrf(&viewer, &headers, &form)?;
    let html = wants_html(&headers);
    let fail = |rejection: Rejection| -> Response<GatewayBody> {
        if html {
            let page = account_page(&viewer, None, Some(rejection.message().to_owned()));
            let res = with_code(render(rejection.status(), &page), rejection.code());
            match rejection.retry_after_secs() {
                Some(secs) => with_retry_after(res, secs),
                None => res,
            }
        } else {
            json_error(rejection)
        }
    };
    let Who::User(user) = &viewer.who else {
        return Ok(fail(
            Rejection::new(ErrorCode::InvalidRequest)
                .with_message("The operator signs in with the admin token and has no password."),
        ));
    };
    let users = &state.accounts.users;
    // Guessing the current password from a stolen session is throttled like signing in.
    let key = format!("email:{}", user.email);
    let gate = users
        .sign_in_attempt(key.clone())
        .await
        .map_err(|e| e.rejection())?;
    if let SignInGate::Throttled { until_ms } = gate {
        return Ok(fail(throttled(until_ms)));
    }
    let current = form.get("current_password");
    let hash = users
        .credentials(user.email.clone())
        .await
        .map_err(|e| e.rejection())?
        .and_then(|c| c.password_hash);
    let checked = truncated(current, MAX_PASSWORD_BYTES);
    if !state
        .accounts
        .passwords
        .verify(checked, hash.as_deref())
        .await
        .map_err(|e| e.rejection())?
    {
        return Ok(fail(
            Rejection::new(ErrorCode::InvalidRequest)
                .with_message("The current password is incorrect."),
        ));
    }
    users
        .sign_in_succeeded(key)
        .await
        .map_err(|e| e.rejection())?;
    let new = form.get("new_password");
    if let Err(e) = check_new_password(new) {
        return Ok(fail(
            Rejection::new(ErrorCode::InvalidRequest).with_message(e.to_string()),
        ));
    }
    let new_hash = state
        .accounts
        .passwords
        .hash(new)
        .await
        .map_err(|e| e.rejection())?;
    if !users
        .set_password(user.id, new_hash)
        .await
        .map_err(|e| e.rejection())?
    {
        return Err(Rejection::new(ErrorCode::NotFound).with_message("No such user."));
    }
    // Every session of the user ends, this one included; this browser gets a new one.
    state
        .accounts
        .sessions
        .revoke_user(user.id)
        .await
        .map_err(|e| e.rejection())?;
    start_session(
        state,
        SessionSubject::User(user.id),
        "/dashboard/account?done=password-changed",
    )
    .await
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
