//! Who is asking: the session behind the cookie, the CSRF check of state-changing requests,
//! and which organizations a signed-in person may see and change.

use http::header::{HOST, ORIGIN};
use http::HeaderMap;

use tollgate_accounts::{constant_time_eq, Role, SecretToken, SessionSubject, User};
use tollgate_core::{ErrorCode, OrgId, Rejection};

use super::http::{cookie, Form, SESSION_COOKIE};
use super::Site;

/// The CSRF field of every dashboard form.
pub const CSRF_FIELD: &str = "csrf_token";

/// A signed-in person.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The session's token (from the cookie).
    pub token: SecretToken,
    pub who: Who,
}

#[derive(Debug, Clone)]
pub enum Who {
    User(User),
    /// Signed in with the admin token: every org, as an owner would.
    Operator,
}

impl Viewer {
    /// The CSRF token forms of this session carry.
    pub fn csrf(&self) -> String {
        self.token.csrf_token()
    }

    /// The signed-in user, unless it is the operator.
    pub fn user(&self) -> Option<&User> {
        match &self.who {
            Who::User(u) => Some(u),
            Who::Operator => None,
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self.who, Who::Operator)
    }

    /// The display name and role badge.
    pub fn label(&self) -> (String, &'static str) {
        match &self.who {
            Who::User(u) => (
                u.email.clone(),
                match u.role {
                    Role::Owner => "Owner",
                    Role::Viewer => "Viewer",
                },
            ),
            Who::Operator => ("Operator".to_owned(), "Operator"),
        }
    }

    /// Whether this person may see `org`'s pages, and whether they may change anything there.
    /// Another org's pages do not exist for a user (404, no existence oracle).
    pub fn access(&self, org: OrgId) -> Result<bool, Rejection> {
        match &self.who {
            Who::Operator => Ok(true),
            Who::User(u) if u.org == org => Ok(u.role.can_change()),
            Who::User(_) => Err(Rejection::new(ErrorCode::NotFound).with_message("No such page.")),
        }
    }

    /// Like [`access`](Viewer::access), for a change: a viewer gets 403 `FORBIDDEN`.
    pub fn may_change(&self, org: OrgId) -> Result<(), Rejection> {
        if self.access(org)? {
            Ok(())
        } else {
            Err(forbidden("Viewers can see everything but change nothing."))
        }
    }
}

pub fn forbidden(message: &'static str) -> Rejection {
    Rejection::new(ErrorCode::Forbidden).with_message(message)
}

/// The live session behind the request's cookie, if any (marking it as used).
pub async fn viewer(state: &Site<'_>, headers: &HeaderMap) -> Result<Option<Viewer>, Rejection> {
    let Some(token) = cookie(headers, SESSION_COOKIE).and_then(SecretToken::parse) else {
        return Ok(None);
    };
    let accounts = &state.accounts;
    let Some(session) = accounts
        .sessions
        .touch(token.hash())
        .await
        .map_err(|e| e.rejection())?
    else {
        return Ok(None);
    };
    let who = match session.subject {
        // Turned off since, or asked for on a listener without `/admin`.
        SessionSubject::Operator if state.operator_allowed() => Who::Operator,
        SessionSubject::Operator => return Ok(None),
        SessionSubject::User(id) => {
            match accounts.users.user(id).await.map_err(|e| e.rejection())? {
                Some(user) => Who::User(user),
                None => {
                    // The user was deleted: the session goes with them.
                    let _ = accounts.sessions.revoke(token.hash()).await;
                    return Ok(None);
                }
            }
        }
    };
    Ok(Some(Viewer { token, who }))
}

/// Whether the request's `Origin`, when present, is the dashboard's own (the host it was
/// sent to). Browsers send it with every form post; `null` (an opaque origin) fails.
pub fn origin_ok(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(Ok(host))) = (origin.to_str(), headers.get(HOST).map(|h| h.to_str()))
    else {
        return false;
    };
    origin.split_once("://").is_some_and(|(scheme, authority)| {
        matches!(scheme, "http" | "https") && authority.eq_ignore_ascii_case(host)
    })
}

/// The CSRF check of a state-changing request of a signed-in session: its origin, and the
/// form's token. Anything missing or wrong is 403 `FORBIDDEN`.
pub fn check_csrf(viewer: &Viewer, headers: &HeaderMap, form: &Form) -> Result<(), Rejection> {
    if !origin_ok(headers) {
        return Err(forbidden("The request did not come from the dashboard."));
    }
    if !constant_time_eq(form.get(CSRF_FIELD), &viewer.csrf()) {
        return Err(forbidden(
            "The form is missing its security token or it is stale. Reload the page and try again.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins() {
        assert!(origin_ok(&headers(&[("host", "gw.example:8080")])));
        assert!(origin_ok(&headers(&[
            ("host", "gw.example:8080"),
            ("origin", "https://gw.example:8080")
        ])));
        assert!(origin_ok(&headers(&[
            ("host", "GW.example"),
            ("origin", "http://gw.example")
        ])));
        assert!(!origin_ok(&headers(&[
            ("host", "gw.example"),
            ("origin", "https://evil.example")
        ])));
        assert!(!origin_ok(&headers(&[
            ("host", "gw.example"),
            ("origin", "null")
        ])));
        assert!(!origin_ok(&headers(&[("origin", "https://gw.example")])));
        assert!(!origin_ok(&headers(&[
            ("host", "gw.example"),
            ("origin", "https://gw.example.evil")
        ])));
    }
}
