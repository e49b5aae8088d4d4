//! The admin API's dashboard users: `POST /admin/orgs/:org/users {email, role}` → `{id,
//! email, role, invite_url}`, `GET /admin/orgs/:org/users`, `DELETE /admin/users/:user`.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use tollgate_accounts::{
    normalize_email, InviteOutcome, NewInvite, Role, SecretToken, User, UserId,
};
use tollgate_core::time::rfc3339_from_ms;
use tollgate_core::{ErrorCode, OrgId, Rejection};

use super::state::AppState;

type AdminResult = Result<Response<Full<Bytes>>, Rejection>;

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(value.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message.into())
}

/// The `Host` the request was sent to, when it is a plausible `host[:port]`.
pub(super) fn host_of<B>(req: &Request<B>) -> Option<String> {
    let host = req.headers().get(HOST)?.to_str().ok()?;
    let plausible = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    plausible.then(|| host.to_owned())
}

/// The invite link: absolute on the host the request came to (`https://` unless the
/// dashboard runs with insecure cookies, i.e. on plain HTTP), else a path.
pub(super) fn invite_url(state: &AppState, host: Option<&str>, token: &SecretToken) -> String {
    let path = format!("/dashboard/invite/{}", token.expose());
    match host {
        Some(host) => {
            let scheme = if state.config.dashboard_insecure_cookies {
                "http"
            } else {
                "https"
            };
            format!("{scheme}://{host}{path}")
        }
        None => path,
    }
}

/// Creates the user and their invite; the token is returned once, for the invite URL.
pub(super) async fn create_invite(
    state: &AppState,
    org: OrgId,
    email: &str,
    role: Role,
) -> Result<(User, SecretToken), Rejection> {
    let email =
        normalize_email(email).ok_or_else(|| invalid("`email` must be an email address."))?;
    let token = SecretToken::generate().map_err(|e| e.rejection())?;
    let outcome = state
        .accounts
        .users
        .invite(NewInvite {
            org,
            email,
            role,
            token: token.hash(),
        })
        .await
        .map_err(|e| e.rejection())?;
    match outcome {
        InviteOutcome::Invited(user) => Ok((user, token)),
        InviteOutcome::EmailTaken => Err(invalid("A user with this email already exists.")),
    }
}

/// A user as the admin API lists it.
pub(super) fn user_view(u: &User) -> Value {
    json!({
        "id": u.id,
        "email": u.email,
        "role": u.role,
        "status": u.status(),
        "created_at": rfc3339_from_ms(u.created_at_ms),
    })
}

pub(super) async fn invite(
    state: &AppState,
    org: OrgId,
    body: Value,
    host: Option<&str>,
) -> AdminResult {
    let email = match body.get("email") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(invalid("`email` must be a string.")),
        None => return Err(invalid("`email` is required.")),
    };
    let role: Role = match body.get("role") {
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| invalid("`role` must be owner or viewer."))?,
        Some(_) => return Err(invalid("`role` must be a string.")),
        None => return Err(invalid("`role` is required.")),
    };
    let (user, token) = create_invite(state, org, &email, role).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "id": user.id,
            "email": user.email,
            "role": user.role,
            "invite_url": invite_url(state, host, &token),
        }),
    ))
}

pub(super) async fn list_users(state: &AppState, org: OrgId) -> AdminResult {
    let users = state
        .accounts
        .users
        .users(org)
        .await
        .map_err(|e| e.rejection())?;
    Ok(json_response(
        StatusCode::OK,
        &Value::Array(users.iter().map(user_view).collect()),
    ))
}

/// Deletes the user and ends every session they have.
pub(super) async fn remove_user(state: &AppState, id: UserId) -> Result<Option<User>, Rejection> {
    let deleted = state
        .accounts
        .users
        .delete_user(id)
        .await
        .map_err(|e| e.rejection())?;
    if deleted.is_some() {
        state
            .accounts
            .sessions
            .revoke_user(id)
            .await
            .map_err(|e| e.rejection())?;
    }
    Ok(deleted)
}

pub(super) async fn delete_user(state: &AppState, user: &str) -> AdminResult {
    let not_found = || Rejection::new(ErrorCode::NotFound).with_message("No such user.");
    let id: UserId = user.parse().map_err(|_| not_found())?;
    let user = remove_user(state, id).await?.ok_or_else(not_found)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": user.id, "deleted": true}),
    ))
}
